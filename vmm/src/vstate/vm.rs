//! The KVM VM: `/dev/kvm` (opened, or inherited from the spawner with
//! `--kvm-fd`), memory slots, in-kernel irqchip and PIT.

use std::io;
use std::os::fd::{FromRawFd, RawFd};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION, KVM_PIT_SPEAKER_DUMMY,
};
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
    /// `--kvm-fd` named stdin, stdout or stderr.
    #[error("descriptor {0} is one of stdin, stdout and stderr, not /dev/kvm: pass /dev/kvm at 3 or above")]
    KvmFdReserved(RawFd),
    /// `--kvm-fd` named a descriptor that is not open.
    #[error("no descriptor {fd} is open in the VMM: the spawner must keep /dev/kvm open across exec (no FD_CLOEXEC)")]
    KvmFdNotOpen {
        /// The descriptor.
        fd: RawFd,
        /// What fstat said.
        #[source]
        source: io::Error,
    },
    /// `--kvm-fd` named something else than /dev/kvm.
    #[error("descriptor {fd} is not /dev/kvm (a character device 10:232): pass an open /dev/kvm with --kvm-fd")]
    NotKvm {
        /// The descriptor.
        fd: RawFd,
    },
    /// /dev/kvm speaks another API version.
    #[error("/dev/kvm speaks KVM API version {0}, this VMM speaks {KVM_API_VERSION}")]
    ApiVersion(i32),
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

/// The misc device minor of /dev/kvm (`KVM_MINOR`).
const KVM_MINOR: u32 = 232;
/// The major number of misc devices.
const MISC_MAJOR: u32 = 10;

/// `/dev/kvm`: the descriptor the spawner passed (`--kvm-fd`, a confined
/// VMM cannot open it), else opened here.
pub fn kvm(inherited: Option<RawFd>) -> Result<Kvm, VmError> {
    match inherited {
        None => open_kvm(),
        Some(fd) => kvm_from_inherited_fd(fd),
    }
}

/// Takes over the `/dev/kvm` the spawner passed at descriptor `fd`: checks
/// that it is open and is /dev/kvm, marks it close-on-exec. Call it before
/// this process opens files of its own, so that an open descriptor at that
/// number can only be the inherited one.
pub fn kvm_from_inherited_fd(fd: RawFd) -> Result<Kvm, VmError> {
    if (0..=2).contains(&fd) {
        return Err(VmError::KvmFdReserved(fd));
    }
    // SAFETY: `stat` is plain old data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` to the pointer, which points to
    // one we own; on a descriptor that is not open it fails without writing.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(VmError::KvmFdNotOpen {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    let is_kvm = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && libc::major(st.st_rdev) == MISC_MAJOR
        && libc::minor(st.st_rdev) == KVM_MINOR;
    if !is_kvm {
        return Err(VmError::NotKvm { fd });
    }
    // SAFETY: F_SETFD with an integer argument only changes the
    // descriptor's flags. A failure leaves it inheritable, which is all.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open and is /dev/kvm (checked above), and
    // nothing else in this process owns it: the spawner passed it at this
    // number to be the VMM's /dev/kvm (`--kvm-fd`), and it is taken over
    // before the VMM opens files of its own (see above). From here the
    // `Kvm` closes it.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION as i32 {
        return Err(VmError::ApiVersion(version));
    }
    Ok(kvm)
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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn an_inherited_kvm_fd_must_be_open_and_be_dev_kvm() {
        assert!(matches!(
            kvm_from_inherited_fd(2),
            Err(VmError::KvmFdReserved(2))
        ));
        let e = kvm_from_inherited_fd(1_000_000).unwrap_err();
        assert!(
            matches!(e, VmError::KvmFdNotOpen { fd: 1_000_000, .. }),
            "{e}"
        );
        // /dev/null is a character device, but not 10:232. It stays ours.
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = kvm_from_inherited_fd(null.as_raw_fd()).unwrap_err();
        assert!(matches!(e, VmError::NotKvm { .. }), "{e}");
        assert!(e.to_string().contains("--kvm-fd"), "{e}");
        drop(null);

        let kvm = std::fs::File::open("/dev/kvm").expect("/dev/kvm (tests need KVM)");
        let fd = kvm.into_raw_fd();
        let kvm = kvm_from_inherited_fd(fd).unwrap();
        assert_eq!(kvm.get_api_version(), KVM_API_VERSION as i32);
        // SAFETY: F_GETFD only reads the flags of a descriptor `kvm` owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert!(kvm.check_extension(Cap::Irqchip), "a usable /dev/kvm");
    }
}
