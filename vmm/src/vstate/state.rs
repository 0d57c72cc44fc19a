//! Typed, serializable state of the KVM objects: what a frozen master keeps
//! and a clone restores. Each `save` reads the state out of KVM; each
//! `restore` writes it into a freshly created object, in the order KVM needs.
//!
//! A vCPU must not be in `KVM_RUN` while its state is saved or restored.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took only part of a list (MSRs, CPUID).
    #[error("KVM accepted {set} of {total} {what}")]
    Partial {
        /// What list.
        what: &'static str,
        /// How many were taken.
        set: usize,
        /// How many were given.
        total: usize,
    },
    /// A list is too long for KVM's fixed-size structures.
    #[error("too many {0} in the saved state")]
    TooMany(&'static str),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// `IA32_TSC_DEADLINE`: restored after the TSC, or the deadline it holds
/// would be read against the wrong clock.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC ID).
    pub index: u8,
    /// The CPUID it was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lets us read, TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended register state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("index", &self.index)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// Reads the MSRs `indices` of `vcpu`: how many KVM read (it stops at the
/// first it cannot), and the values.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(usize, Msrs), StateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany("MSRs"))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("get MSRs"))?;
    Ok((read, msrs))
}

/// The MSRs of `vcpu` that KVM can read: its index list, less those that
/// fail, with the TSC deadline moved last.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let mut indices: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(kvm_err("get MSR index list"))?
        .as_slice()
        .to_vec();
    // KVM_GET_MSRS stops at the first MSR it cannot read: drop it, go on.
    loop {
        let (read, _) = read_msrs(vcpu, &indices)?;
        if read == indices.len() {
            break;
        }
        indices.remove(read);
    }
    if let Some(pos) = indices.iter().position(|&i| i == MSR_IA32_TSC_DEADLINE) {
        let deadline = indices.remove(pos);
        indices.push(deadline);
    }
    Ok(indices)
}

impl VcpuState {
    /// Reads the state of vCPU `index`; `msr_indices` from [`readable_msrs`].
    pub fn save(vcpu: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, StateError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("get MP state"))?;
        let regs = vcpu.get_regs().map_err(kvm_err("get registers"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("get special registers"))?;
        let xsave = vcpu.get_xsave().map_err(kvm_err("get XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm_err("get XCRs"))?;
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(kvm_err("get debug registers"))?;
        let lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get CPUID"))?
            .as_slice()
            .to_vec();
        let (read, msrs) = read_msrs(vcpu, msr_indices)?;
        if read != msr_indices.len() {
            return Err(StateError::Partial {
                what: "MSRs read",
                set: read,
                total: msr_indices.len(),
            });
        }
        let vcpu_events = vcpu.get_vcpu_events().map_err(kvm_err("get vCPU events"))?;
        Ok(VcpuState {
            index,
            cpuid,
            msrs: msrs.as_slice().to_vec(),
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Writes this state into a freshly created vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| StateError::TooMany("CPUID entries"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            // Not every host can scale the TSC; the guest then keeps
            // kvm-clock's view, which is corrected through the clock data.
            let _ = vcpu.set_tsc_khz(khz);
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("set MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(kvm_err("set registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("set special registers"))?;
        // SAFETY: KVM_SET_XSAVE copies more than the 4096-byte `kvm_xsave`
        // only for XSTATE features a process enabled dynamically
        // (arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM), AMX); zygote-vmm never
        // asks for them, so KVM reads exactly `size_of::<kvm_xsave>()`
        // bytes, all inside `self.xsave`. (Its contents are the guest's;
        // KVM validates them.)
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("set XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("set XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err("set debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm_err("set LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError::TooMany("MSRs"))?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
        if set != self.msrs.len() {
            return Err(StateError::Partial {
                what: "MSRs set",
                set,
                total: self.msrs.len(),
            });
        }
        vcpu.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm_err("set vCPU events"))?;
        Ok(())
    }
}

/// Everything KVM holds for the VM itself: the in-kernel interrupt
/// controllers, the PIT and kvm-clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvm-clock.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm_err("get irqchip"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the VM's state (all its vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("get PIT"))?,
            clock: vm.get_clock().map_err(kvm_err("get clock"))?,
        })
    }

    /// Writes this state into a fresh VM that has its irqchip and PIT.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_pit2(&self.pit).map_err(kvm_err("set PIT"))?;
        // Only the clock value carries over; flags describe the old host.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("set clock"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(kvm_err("set PIC master"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(kvm_err("set PIC slave"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(kvm_err("set IOAPIC"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;
    use crate::vstate::vcpu::{write_boot_tables, Vcpu};
    use crate::vstate::vm::{create_vm, open_kvm};
    use vm_memory::GuestAddress;

    fn vm() -> (Kvm, VmFd, vm_memory::GuestMemoryMmap) {
        let kvm = open_kvm().expect("these tests need /dev/kvm");
        let fd = memory::create_memfd(4 << 20).unwrap();
        let mem = memory::map_guest_memory(&fd, 4 << 20, libc::MAP_SHARED).unwrap();
        write_boot_tables(&mem).unwrap();
        let vm = create_vm(&kvm, &mem).unwrap();
        (kvm, vm, mem)
    }

    fn json_round_trip<T: Serialize + for<'de> Deserialize<'de>>(v: &T) -> T {
        serde_json::from_slice(&serde_json::to_vec(v).unwrap()).unwrap()
    }

    #[test]
    fn vcpu_state_survives_save_serialize_restore() {
        let (kvm, vm_a, _mem_a) = vm();
        let a = Vcpu::new(&kvm, &vm_a, 0, 1, Some(GuestAddress(0x100_0000))).unwrap();
        let mut regs = a.fd().get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = 42;
        a.fd().set_regs(&regs).unwrap();
        let msrs = readable_msrs(&kvm, a.fd()).unwrap();
        assert!(msrs.len() > 10, "only {} readable MSRs", msrs.len());
        let saved = json_round_trip(&VcpuState::save(a.fd(), 0, &msrs).unwrap());

        // A different VM, a vCPU configured differently (no boot registers).
        let (kvm_b, vm_b, _mem_b) = vm();
        let b = Vcpu::new(&kvm_b, &vm_b, 0, 1, None).unwrap();
        saved.restore(b.fd()).unwrap();
        let again = VcpuState::save(b.fd(), 0, &msrs).unwrap();

        assert_eq!(again.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(again.regs.r15, 42);
        assert_eq!(again.regs.rip, saved.regs.rip);
        assert_eq!(again.sregs.cr0, saved.sregs.cr0);
        assert_eq!(again.sregs.cr3, saved.sregs.cr3);
        assert_eq!(again.sregs.cr4, saved.sregs.cr4);
        assert_eq!(again.sregs.efer, saved.sregs.efer);
        assert_eq!(again.sregs.cs.selector, 0x10);
        assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
        assert_eq!(again.mp_state.mp_state, saved.mp_state.mp_state);
        assert_eq!(again.xcrs.nr_xcrs, saved.xcrs.nr_xcrs);
        assert_eq!(again.cpuid.len(), saved.cpuid.len());
        // MSRs come back, but the TSC (and what derives from it) moves on.
        for (x, y) in saved.msrs.iter().zip(&again.msrs) {
            assert_eq!(x.index, y.index);
            if x.index != 0x10 && x.index != MSR_IA32_TSC_DEADLINE {
                assert_eq!((x.index, x.data), (y.index, y.data), "MSR {:#x}", x.index);
            }
        }
        assert_eq!(again.msrs.last().map(|m| m.index), msrs.last().copied());
    }

    #[test]
    fn vm_state_survives_save_serialize_restore() {
        let (_kvm, vm_a, _mem_a) = vm();
        let saved = json_round_trip(&VmState::save(&vm_a).unwrap());
        let (_kvm_b, vm_b, _mem_b) = vm();
        saved.restore(&vm_b).unwrap();
        let again = VmState::save(&vm_b).unwrap();
        // SAFETY: reading the union members KVM filled for these chip ids.
        unsafe {
            assert_eq!(
                again.ioapic.chip.ioapic.base_address,
                saved.ioapic.chip.ioapic.base_address
            );
            assert_eq!(again.pic_master.chip.pic.imr, saved.pic_master.chip.pic.imr);
        }
        assert_eq!(again.pit.channels[0].count, saved.pit.channels[0].count);
        // The clock was set to the saved value and has only moved forward since.
        assert!(again.clock.clock >= saved.clock.clock);
        assert!(again.clock.clock - saved.clock.clock < 60_000_000_000);
    }
}
