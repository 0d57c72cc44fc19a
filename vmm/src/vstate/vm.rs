//! The KVM VM: memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::KVM_TSS_ADDRESS;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualisation or load the kvm module)")]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error("no permission to open /dev/kvm (run as root or join the group that owns /dev/kvm)")]
    KvmPermission,
    /// A KVM capability the VMM needs is missing.
    #[error("this host's KVM lacks a capability zygote needs: {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm with a clear error when it is missing or not allowed.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::Kvm {
            what: "open /dev/kvm",
            source: e,
        },
    })
}

/// Creates a VM with `mem` as its RAM, an in-kernel irqchip and a PIT.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::Pit2, "PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the
        // caller keeps alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    Ok(vm)
}
