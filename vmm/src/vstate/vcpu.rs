//! vCPUs: boot-time register state and the run loop (one thread each).
//!
//! A vCPU thread reaches devices only through its [`Bus`] and stops or
//! parks only through [`RunControl`]; it must not end the process or hold
//! a device lock across `KVM_RUN`.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::control::RunControl;
use super::state::VcpuState;
use super::wakeups::{ExitCounters, VmmExit};
use crate::layout::*;

/// Errors configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: KVM {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the boot GDT or page tables failed.
    #[error("cannot write {0} to guest memory")]
    GuestWrite(&'static str),
}

/// How a vCPU reaches devices: port and MMIO accesses.
pub trait Bus: Send + Sync {
    /// Guest wrote `data` to I/O port `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// Guest reads I/O port `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// Guest wrote `data` at guest-physical `addr` outside RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]);
    /// Guest reads guest-physical `addr` outside RAM.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VM is ending (someone set the stop flag, e.g. the i8042 reset).
    Stopped,
    /// KVM reported a guest shutdown (triple fault).
    Shutdown,
    /// A system event (reset, shutdown, crash) from KVM.
    SystemEvent(u32),
    /// KVM failed to emulate an instruction: its bytes, when known.
    EmulationFailure(Vec<u8>),
    /// Another internal error.
    InternalError(u32),
    /// KVM could not enter the guest, or another error.
    Error(String),
}

/// One vCPU.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT: null, null, 64-bit code (selector 0x10), data (0x18), TSS (0x20),
/// the selectors the Linux boot protocol names.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(index: u16) -> kvm_segment {
    let e = GDT[index as usize];
    let flags = ((e >> 40) & 0xf0ff) as u16;
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: 0,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and identity-mapped page tables for the
/// first GiB (2 MiB pages): what the 64-bit boot protocol expects.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|_| VcpuError::GuestWrite("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|_| VcpuError::GuestWrite("IDT"))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(|_| VcpuError::GuestWrite("page tables"))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(|_| VcpuError::GuestWrite("page tables"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(|_| VcpuError::GuestWrite("page tables"))?;
    }
    Ok(())
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and gives it CPUID, MSRs and LAPIC
    /// wiring. vCPU 0 also gets the boot registers (entry point, long mode);
    /// the others wait for the guest's INIT/SIPI.
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        index: u8,
        count: u8,
        entry: Option<GuestAddress>,
    ) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(err("create vCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("get supported CPUID"))?;
        super::cpuid::filter_cpuid(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(err("set CPUID"))?;

        let msrs: Vec<kvm_msr_entry> = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
        ]
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
        let msrs = Msrs::from_entries(&msrs).map_err(|_| VcpuError::Kvm {
            index,
            what: "build MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let set = fd.set_msrs(&msrs).map_err(err("set MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Kvm {
                index,
                what: "set boot MSRs (some refused)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }

        let mut lapic = fd.get_lapic().map_err(err("get LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("set LAPIC"))?;

        if let Some(entry) = entry {
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            fd.set_fpu(&fpu).map_err(err("set FPU"))?;
            let regs = kvm_regs {
                rflags: 0x2,
                rip: entry.0,
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: ZERO_PAGE_START,
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(err("set registers"))?;
            let mut sregs = fd.get_sregs().map_err(err("get special registers"))?;
            sregs.gdt.base = GDT_START;
            sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_START;
            sregs.idt.limit = 7;
            sregs.cs = segment(2);
            sregs.ds = segment(3);
            sregs.es = segment(3);
            sregs.fs = segment(3);
            sregs.gs = segment(3);
            sregs.ss = segment(3);
            sregs.tr = segment(4);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            fd.set_sregs(&sregs).map_err(err("set special registers"))?;
        }
        Ok(Vcpu { fd, index })
    }

    /// Creates vCPU `state.index` of `vm` and gives it `state`: a clone's
    /// vCPU continues where the master's stopped.
    pub fn restore(vm: &VmFd, state: &VcpuState) -> Result<Self, super::state::StateError> {
        let fd = vm.create_vcpu(u64::from(state.index)).map_err(|source| {
            super::state::StateError::Kvm {
                what: "create vCPU",
                source,
            }
        })?;
        state.restore(&fd)?;
        Ok(Vcpu {
            fd,
            index: state.index,
        })
    }

    /// This vCPU's index (= APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until it stops or `control` stops it; parks (and
    /// saves its state, when asked) whenever `control` pauses the VM.
    /// Device accesses go to `bus`; every exit to the VMM is counted in
    /// `exits`.
    pub fn run(&mut self, bus: &dyn Bus, control: &RunControl, exits: &ExitCounters) -> VcpuStop {
        loop {
            if control.is_stopped() {
                return VcpuStop::Stopped;
            }
            if control.pause_requested() {
                self.complete_pending_io();
                let (fd, index) = (&self.fd, self.index);
                control.park(index, |msrs| VcpuState::save(fd, index, msrs));
                continue;
            }
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    exits.count(VmmExit::Pio);
                    bus.pio_write(port, data)
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    exits.count(VmmExit::Pio);
                    bus.pio_read(port, data)
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    exits.count(VmmExit::Mmio);
                    bus.mmio_write(addr, data)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    exits.count(VmmExit::Mmio);
                    bus.mmio_read(addr, data)
                }
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => return VcpuStop::Shutdown,
                Ok(VcpuExit::SystemEvent(kind, _)) => return VcpuStop::SystemEvent(kind),
                Ok(VcpuExit::InternalError) => return self.internal_error(),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return VcpuStop::Error(format!(
                        "KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
                    ))
                }
                Ok(other) => return VcpuStop::Error(format!("unexpected KVM exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    exits.count(VmmExit::Interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return VcpuStop::Error(format!("KVM_RUN failed: {e}")),
            }
        }
    }

    /// Lets KVM finish an I/O read it handed us (the value we filled in is
    /// consumed on the next `KVM_RUN`) without running the guest further,
    /// so that no exit is lost from a saved state.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn internal_error(&mut self) -> VcpuStop {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        if internal.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return VcpuStop::InternalError(internal.suberror);
        }
        // Emulation failure layout: data[0] = flags, then insn_size (u8)
        // followed by up to 15 instruction bytes.
        let flags = internal.data[0];
        if internal.ndata < 3
            || flags & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                == 0
        {
            return VcpuStop::EmulationFailure(Vec::new());
        }
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&internal.data[1].to_le_bytes());
        raw[8..].copy_from_slice(&internal.data[2].to_le_bytes());
        let size = usize::from(raw[0]).min(15);
        VcpuStop::EmulationFailure(raw[1..1 + size].to_vec())
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// What a failed instruction says about the guest image, for the known
/// cases of hosts that emulate guest kernel code (see images/README.md).
pub fn explain_emulation_failure(bytes: &[u8]) -> Option<&'static str> {
    let starts = |p: &[u8]| bytes.starts_with(p);
    if starts(&[0x48, 0x0f, 0xae]) || starts(&[0x0f, 0xae]) {
        Some("XSAVE/XRSTOR cannot be emulated here: boot the guest with `noxsave`")
    } else if starts(&[0xf3, 0x48, 0x0f, 0xb8]) || starts(&[0xf3, 0x0f, 0xb8]) {
        Some("POPCNT cannot be emulated here: add `popcnt` to the guest's `clearcpuid=`")
    } else if starts(&[0x0f, 0x01, 0xca]) || starts(&[0x0f, 0x01, 0xcb]) {
        Some("CLAC/STAC cannot be emulated here: add `smap` to the guest's `clearcpuid=`")
    } else if starts(&[0xf0, 0x48, 0x0f, 0xc7]) {
        Some("CMPXCHG16B cannot be emulated here: add `cx16` to the guest's `clearcpuid=`")
    } else if starts(&[0xcc]) || starts(&[0x9b]) {
        Some("INT3/FWAIT in guest kernel code cannot be emulated here: the guest kernel needs the pvm-native-guest patch and `pvm_native_guest` on its command line")
    } else if starts(&[0x0f, 0x0b]) {
        Some("UD2: the guest kernel hit a BUG() or WARN()")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let cs = segment(2);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (0x10, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(3);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x18, 0, 1, 3));
        let tr = segment(4);
        assert_eq!((tr.selector, tr.s, tr.type_), (0x20, 0, 0xb));
    }

    #[test]
    fn known_emulation_failures_are_explained() {
        assert!(explain_emulation_failure(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0])
            .unwrap()
            .contains("popcnt"));
        assert!(explain_emulation_failure(&[0x48, 0x0f, 0xae, 0x2f])
            .unwrap()
            .contains("noxsave"));
        assert!(explain_emulation_failure(&[0x90]).is_none());
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01;
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
