//! What a frozen VM is, as the VMM writes it into a snapshot's manifest
//! (the `state` document of `snapshotter`'s format): its own version, the
//! fingerprint of the host it was frozen on, KVM state of the VM and each
//! vCPU, each device's state, and the layout they were found at.
//!
//! It owns [`VmSnapshot`] and the checks a snapshot passes before a guest
//! runs from it: the state version (before anything else is parsed), the
//! layout and the RAM size ([`VmSnapshot::read`]), and the host fingerprint
//! ([`VmSnapshot::check_host`]).
//! Each part's own state and checks belong to that part (`persist.rs` next
//! to each device, [`crate::vstate::state`]), and this module must not
//! duplicate them, nor build anything: it only reads and checks. A
//! snapshot is untrusted input: every device is rebuilt at the only
//! addresses this VMM would put it, and its state goes through the
//! device's own checks.

use serde::{Deserialize, Serialize};

use crate::devices::legacy::persist::SerialState;
use crate::devices::virtio::persist::{DeviceModelState, VirtioDeviceState};
use crate::layout::{MAX_GSI, VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::vstate::fingerprint::{HostFingerprint, HostMismatch, ProbeError};
use crate::vstate::state::{VcpuState, VmState};
use crate::vstate::vm::{self, VmError};

/// The version of [`VmSnapshot`] this VMM writes and reads. Version 1 (the
/// snapshots that have no `state_version`) had no host fingerprint and no
/// per-device versions.
pub const STATE_VERSION: u32 = 2;

/// Most virtio devices a VM has: one per GSI above the legacy ones.
pub const MAX_VIRTIO_DEVICES: usize = (MAX_GSI - VIRTIO_FIRST_GSI + 1) as usize;

/// One virtio-mmio device and where it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// The device model and its transport.
    pub device: VirtioDeviceState,
}

/// A frozen VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`STATE_VERSION`].
    pub state_version: u32,
    /// The host it was frozen on.
    pub host: HostFingerprint,
    /// Guest RAM in MiB (the memory file's size).
    pub memory_mib: u64,
    /// The kernel command line it booted with (for humans).
    pub cmdline: String,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// virtio devices, in window order.
    pub devices: Vec<DeviceSnapshot>,
    /// The serial console.
    pub serial: SerialState,
}

/// Opens the snapshot in `dir` and checks that this VMM can restore it on
/// this host: what `zygote-vmm --check-snapshot` answers ([`open`]).
pub fn check(dir: &std::path::Path) -> Result<VmSnapshot, CheckError> {
    open(dir, &vm::open_kvm()?).map(|(_, state)| state)
}

/// Opens the snapshot in `dir` ([`snapshotter::open`]: files, sizes,
/// checksums), reads its VM state ([`VmSnapshot::read`]) and compares the
/// host it was frozen on with this one ([`VmSnapshot::check_host`]): the
/// first step of every restore.
///
/// Reading this host's fingerprint costs one `KVM_GET_SUPPORTED_CPUID`:
/// tens of µs on bare metal, most of a millisecond on a nested host, where
/// every CPUID it runs traps.
pub fn open(
    dir: &std::path::Path,
    kvm: &kvm_ioctls::Kvm,
) -> Result<(snapshotter::Snapshot, VmSnapshot), CheckError> {
    let snap = snapshotter::open(dir)?;
    let state = VmSnapshot::read(&snap)?;
    state.check_host(&HostFingerprint::of_host(kvm)?)?;
    Ok((snap, state))
}

/// Why a snapshot cannot be restored here.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The files: missing, another format version, sizes, checksums.
    #[error(transparent)]
    Files(#[from] snapshotter::Error),
    /// The VM state is of another version.
    #[error("snapshot state version {found}, this VMM reads {supported}")]
    StateVersion {
        /// The snapshot's (1 when it has none).
        found: u64,
        /// [`STATE_VERSION`].
        supported: u32,
    },
    /// `state_version` is not a version number.
    #[error("the snapshot's state_version {0} is not a version number")]
    BadStateVersion(serde_json::Value),
    /// The VM state does not parse.
    #[error("the snapshot's VM state does not parse (corrupt, or written by another zygote-vmm)")]
    Parse(#[source] serde_json::Error),
    /// KVM could not be opened to read this host's fingerprint.
    #[error(transparent)]
    Kvm(#[from] VmError),
    /// This host's fingerprint could not be read.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The snapshot's guest depends on something this host lacks.
    #[error("the snapshot cannot run on this host")]
    Host(#[from] HostMismatch),
    /// The VM does not fit this VMM.
    #[error("the snapshot's VM does not fit this VMM")]
    Layout(#[from] LayoutError),
}

/// A snapshot that does not describe a VM this VMM can rebuild.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No vCPU, or more than this VMM runs.
    #[error("it has {count} vCPUs; this VMM runs 1 to {max}")]
    VcpuCount {
        /// The snapshot's.
        count: usize,
        /// [`crate::boot::mptable::MAX_VCPUS`].
        max: u8,
    },
    /// vCPUs out of order.
    #[error("its vCPU {position} has index {index}")]
    VcpuIndex {
        /// Position in the list.
        position: usize,
        /// The index it claims.
        index: u8,
    },
    /// More devices than interrupt lines.
    #[error("it has {0} virtio devices; this VMM has lines for {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
    /// A device window this VMM would not use.
    #[error("its device {index} is at {base:#x}/GSI {gsi}; this VMM puts it at {expected_base:#x}/GSI {expected_gsi}")]
    DeviceWindow {
        /// Position in the list.
        index: usize,
        /// Saved MMIO base.
        base: u64,
        /// Saved GSI.
        gsi: u32,
        /// Where this VMM puts device `index`.
        expected_base: u64,
        /// Its GSI.
        expected_gsi: u32,
    },
    /// Two vsock devices (a clone has one socket).
    #[error("it has more than one vsock device")]
    TwoVsock,
    /// The state's RAM size is not the memory file's.
    #[error("its state says {mib} MiB of RAM and its memory file has {bytes} bytes")]
    MemorySize {
        /// The state's.
        mib: u64,
        /// The memory file's.
        bytes: u64,
    },
}

impl VmSnapshot {
    /// The VM state of an opened snapshot, checked: its version is this
    /// VMM's (read before anything else), it parses, its layout is this
    /// VMM's ([`VmSnapshot::check_layout`]) and its RAM size is the memory
    /// file's. What every restore and every check runs, before
    /// [`VmSnapshot::check_host`].
    pub fn read(snap: &snapshotter::Snapshot) -> Result<Self, CheckError> {
        /// The one field every state version has (the rest is skipped).
        #[derive(Deserialize)]
        struct Probe {
            state_version: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_str(snap.state_json()).map_err(CheckError::Parse)?;
        match probe.state_version {
            // Version 1 did not name itself.
            None => {
                return Err(CheckError::StateVersion {
                    found: 1,
                    supported: STATE_VERSION,
                })
            }
            Some(v) => match v.as_u64() {
                Some(found) if found == u64::from(STATE_VERSION) => {}
                Some(found) => {
                    return Err(CheckError::StateVersion {
                        found,
                        supported: STATE_VERSION,
                    })
                }
                None => return Err(CheckError::BadStateVersion(v)),
            },
        }
        let state: VmSnapshot =
            serde_json::from_str(snap.state_json()).map_err(CheckError::Parse)?;
        state.check_layout(crate::boot::mptable::MAX_VCPUS)?;
        let bytes = snap.manifest.memory.size;
        if state.memory_mib.checked_mul(1 << 20) != Some(bytes) {
            return Err(LayoutError::MemorySize {
                mib: state.memory_mib,
                bytes,
            }
            .into());
        }
        Ok(state)
    }

    /// Checks that the host it was frozen on is one `host` (this one) can
    /// stand in for ([`HostFingerprint::check_runs_on`]).
    pub fn check_host(&self, host: &HostFingerprint) -> Result<(), CheckError> {
        Ok(self.host.check_runs_on(host)?)
    }

    /// Checks the parts that the devices' own restores do not: vCPU
    /// indexes and device windows must be exactly where this VMM puts them.
    pub fn check_layout(&self, max_vcpus: u8) -> Result<(), LayoutError> {
        if self.vcpus.is_empty() || self.vcpus.len() > usize::from(max_vcpus) {
            return Err(LayoutError::VcpuCount {
                count: self.vcpus.len(),
                max: max_vcpus,
            });
        }
        for (position, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != position {
                return Err(LayoutError::VcpuIndex {
                    position,
                    index: v.index,
                });
            }
        }
        if self.devices.len() > MAX_VIRTIO_DEVICES {
            return Err(LayoutError::TooManyDevices(self.devices.len()));
        }
        for (index, d) in self.devices.iter().enumerate() {
            let expected_base = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE;
            let expected_gsi = VIRTIO_FIRST_GSI + index as u32;
            if d.base != expected_base || d.gsi != expected_gsi {
                return Err(LayoutError::DeviceWindow {
                    index,
                    base: d.base,
                    gsi: d.gsi,
                    expected_base,
                    expected_gsi,
                });
            }
        }
        let vsocks = self
            .devices
            .iter()
            .filter(|d| matches!(d.device.model, DeviceModelState::Vsock(_)))
            .count();
        if vsocks > 1 {
            return Err(LayoutError::TwoVsock);
        }
        Ok(())
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::devices::virtio::mmio::MmioRegisters;
    use crate::devices::virtio::persist::MmioState;
    use crate::devices::virtio::rng::persist::{RngState, RNG_STATE_VERSION};
    use crate::devices::virtio::vsock::persist::{VsockState, VSOCK_STATE_VERSION};
    use crate::devices::virtio::{TYPE_RNG, TYPE_VSOCK};

    /// A device at window `i`, its transport as a fresh one (the fuzz
    /// tests build states from it too).
    pub(super) fn device(model: DeviceModelState, i: u64) -> DeviceSnapshot {
        let device_type = model.device_type();
        DeviceSnapshot {
            base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_FIRST_GSI + i as u32,
            device: VirtioDeviceState {
                model,
                transport: MmioState {
                    version: 1,
                    device_type,
                    regs: MmioRegisters::default(),
                    queues: Vec::new(),
                    active_queues: None,
                    interrupt_status: 0,
                    config_generation: 0,
                    needs_reset: false,
                },
            },
        }
    }

    fn vsock() -> DeviceModelState {
        DeviceModelState::Vsock(VsockState {
            version: VSOCK_STATE_VERSION,
            guest_cid: 3,
            connections: None,
        })
    }

    fn rng() -> DeviceModelState {
        DeviceModelState::Rng(RngState {
            version: RNG_STATE_VERSION,
        })
    }

    /// A paused, freshly created 2 MiB VM's state with a vsock and an rng
    /// device, as a freeze on this host writes it.
    fn frozen() -> VmSnapshot {
        use crate::vstate::state::readable_msrs;
        use crate::vstate::vcpu::Vcpu;
        use crate::vstate::vm::{create_vm, open_kvm};
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        let fd = crate::memory::create_memfd(2 << 20).unwrap();
        let mem = crate::memory::map_guest_memory(&fd, 2 << 20, libc::MAP_SHARED).unwrap();
        let vm = create_vm(&kvm, &mem).unwrap();
        let vcpu = Vcpu::new(&kvm, &vm, 0, 1, None).unwrap();
        let msrs = readable_msrs(&kvm, vcpu.fd()).unwrap();
        VmSnapshot {
            state_version: STATE_VERSION,
            host: HostFingerprint::of_host(&kvm).unwrap(),
            memory_mib: 2,
            cmdline: String::new(),
            vm: VmState::save(&vm).unwrap(),
            vcpus: vec![VcpuState::save(vcpu.fd(), 0, &msrs).unwrap()],
            devices: vec![device(vsock(), 0), device(rng(), 1)],
            serial: SerialState::default(),
        }
    }

    /// A directory removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "zygote-snapshot-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Writes `state` as a snapshot with a `mib` MiB memory file.
    fn write_snapshot(dir: &Path, state: &str, mib: u64) {
        let mem = std::fs::File::create(dir.join(snapshotter::MEMORY_FILE)).unwrap();
        mem.set_len(mib << 20).unwrap();
        snapshotter::write_manifest(dir, state, None).unwrap();
    }

    #[test]
    fn devices_and_vcpus_must_be_where_this_vmm_puts_them() {
        let mut snap = frozen();
        snap.check_layout(4).unwrap();

        snap.devices[1].base += 0x10;
        let e = snap.check_layout(4).unwrap_err();
        assert!(
            matches!(e, LayoutError::DeviceWindow { index: 1, .. }),
            "{e}"
        );
        snap.devices[1] = device(vsock(), 1);
        assert_eq!(snap.check_layout(4), Err(LayoutError::TwoVsock));
        snap.devices.pop();

        let mut many: Vec<_> = (0..=MAX_VIRTIO_DEVICES as u64)
            .map(|i| device(rng(), i))
            .collect();
        std::mem::swap(&mut snap.devices, &mut many);
        assert_eq!(
            snap.check_layout(4),
            Err(LayoutError::TooManyDevices(MAX_VIRTIO_DEVICES + 1))
        );
        std::mem::swap(&mut snap.devices, &mut many);

        snap.vcpus[0].index = 1;
        assert_eq!(
            snap.check_layout(4),
            Err(LayoutError::VcpuIndex {
                position: 0,
                index: 1
            })
        );
        snap.vcpus.clear();
        assert!(matches!(
            snap.check_layout(4),
            Err(LayoutError::VcpuCount { count: 0, .. })
        ));
    }

    #[test]
    fn a_frozen_vm_is_read_back_on_the_host_that_froze_it() {
        let dir = TempDir::new();
        let snap = frozen();
        let json = serde_json::to_string(&snap).unwrap();
        assert!(
            json.starts_with(r#"{"state_version":2,"host":{"cpu_vendor":"#),
            "{json}"
        );
        write_snapshot(dir.path(), &json, 2);
        let back = check(dir.path()).unwrap();
        assert_eq!(back.host, snap.host);
        assert_eq!(back.devices.len(), 2);
        assert_eq!(back.devices[0].device.model, vsock());
        assert_eq!(back.devices[1].device.transport.device_type, TYPE_RNG);
        assert_ne!(TYPE_RNG, TYPE_VSOCK);
        assert_eq!(back.serial, snap.serial);
    }

    #[test]
    fn other_state_versions_are_refused_before_anything_is_parsed() {
        let dir = TempDir::new();
        let mut value = serde_json::to_value(frozen()).unwrap();
        // Everything but the version may have changed.
        write_snapshot(
            dir.path(),
            r#"{"state_version": 3, "vcpus": "elsewhere"}"#,
            2,
        );
        let e = check(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                CheckError::StateVersion {
                    found: 3,
                    supported: 2
                }
            ),
            "{e}"
        );
        assert_eq!(e.to_string(), "snapshot state version 3, this VMM reads 2");

        // A snapshot from before versions: version 1.
        value.as_object_mut().unwrap().remove("state_version");
        value.as_object_mut().unwrap().remove("host");
        write_snapshot(dir.path(), &value.to_string(), 2);
        let e = check(dir.path()).unwrap_err();
        assert_eq!(e.to_string(), "snapshot state version 1, this VMM reads 2");

        write_snapshot(dir.path(), r#"{"state_version": "2"}"#, 2);
        assert!(matches!(
            check(dir.path()),
            Err(CheckError::BadStateVersion(_))
        ));
        for bad in ["[2]", r#"{"state_version": 2}"#, "null"] {
            write_snapshot(dir.path(), bad, 2);
            assert!(
                matches!(check(dir.path()), Err(CheckError::Parse(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_snapshot_from_an_incompatible_host_is_refused_with_the_reason() {
        let dir = TempDir::new();
        let mut snap = frozen();
        snap.host.cpu_vendor = if snap.host.cpu_vendor == "AuthenticAMD" {
            "GenuineIntel".into()
        } else {
            "AuthenticAMD".into()
        };
        write_snapshot(dir.path(), &serde_json::to_string(&snap).unwrap(), 2);
        let e = check(dir.path()).unwrap_err();
        assert!(
            matches!(e, CheckError::Host(HostMismatch::Vendor { .. })),
            "{e}"
        );
        let text = crate::error_chain(&e);
        assert!(
            text.starts_with("the snapshot cannot run on this host: the snapshot's CPU vendor is"),
            "{text}"
        );
    }

    #[test]
    fn the_ram_size_must_be_the_memory_files() {
        let dir = TempDir::new();
        let mut snap = frozen();
        write_snapshot(dir.path(), &serde_json::to_string(&snap).unwrap(), 4);
        let e = check(dir.path()).unwrap_err();
        assert!(
            matches!(
                e,
                CheckError::Layout(LayoutError::MemorySize {
                    mib: 2,
                    bytes: 0x40_0000
                })
            ),
            "{e}"
        );
        // A size that wraps around when shifted to bytes is no match.
        snap.memory_mib = (1 << 44) | 4;
        write_snapshot(dir.path(), &serde_json::to_string(&snap).unwrap(), 4);
        assert!(matches!(
            check(dir.path()),
            Err(CheckError::Layout(LayoutError::MemorySize { .. }))
        ));
    }
}
