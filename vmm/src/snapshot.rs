//! What a frozen VM is, as the VMM writes it into a snapshot's manifest
//! (the `state` document of `snapshotter`'s format): KVM state of the VM and
//! each vCPU, each device's state, and the layout they were found at.
//!
//! A snapshot is untrusted input when it is read back: every device is
//! rebuilt at the only addresses this VMM would put it, and queues and
//! features go through the transport's checks.

use serde::{Deserialize, Serialize};

use crate::devices::virtio::mmio::MmioState;
use crate::layout::{VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::vstate::state::{VcpuState, VmState};

/// Which device model a virtio transport carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-vsock (host side: a Unix socket, connections are not carried over).
    Vsock,
    /// virtio-rng.
    Rng,
}

/// One virtio-mmio device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Device model.
    pub kind: DeviceKind,
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// Transport and queue state.
    pub mmio: MmioState,
}

/// The 8250 UART's registers (`vm_superio::SerialState`, which is not serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification.
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status.
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            // A guest cannot have queued more than the UART's FIFO.
            in_buffer: s.in_buffer.iter().take(64).copied().collect(),
        }
    }
}

/// A frozen VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Guest RAM in MiB (the memory file's size).
    pub memory_mib: u64,
    /// The guest's vsock CID.
    pub guest_cid: u64,
    /// The kernel command line it booted with (for humans).
    pub cmdline: String,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// virtio devices, in window order.
    pub devices: Vec<DeviceSnapshot>,
    /// The serial console.
    pub serial: SerialSnapshot,
}

/// Opens the snapshot in `dir` and checks that this VMM can restore it:
/// what `zygote-vmm --check-snapshot` answers, and the first step of every
/// restore.
pub fn check(dir: &std::path::Path) -> Result<VmSnapshot, CheckError> {
    let snap = snapshotter::open(dir)?;
    Ok(VmSnapshot::read(&snap)?)
}

/// Why a snapshot cannot be restored here.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The files: missing, another format version, checksums.
    #[error(transparent)]
    Files(#[from] snapshotter::Error),
    /// The VM state.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// A snapshot that does not describe a VM this VMM can rebuild.
#[derive(Debug, thiserror::Error)]
#[error("snapshot state does not fit this VMM: {0}")]
pub struct LayoutError(pub String);

impl VmSnapshot {
    /// The VM state of an opened snapshot, checked: it parses, its layout
    /// is this VMM's ([`VmSnapshot::check_layout`]) and its RAM size is the
    /// memory file's. What every restore and every `snapshot load` runs.
    pub fn read(snap: &snapshotter::Snapshot) -> Result<Self, LayoutError> {
        let state: VmSnapshot = serde_json::from_str(snap.state_json())
            .map_err(|e| LayoutError(format!("VM state does not parse: {e}")))?;
        state.check_layout(crate::boot::mptable::MAX_VCPUS)?;
        if state.memory_mib << 20 != snap.manifest.memory.size {
            return Err(LayoutError(format!(
                "state says {} MiB of RAM, the memory file has {} bytes",
                state.memory_mib, snap.manifest.memory.size
            )));
        }
        Ok(state)
    }

    /// Checks the parts that the transports do not: vCPU indexes and device
    /// windows must be exactly where this VMM puts them.
    pub fn check_layout(&self, max_vcpus: u8) -> Result<(), LayoutError> {
        if self.vcpus.is_empty() || self.vcpus.len() > usize::from(max_vcpus) {
            return Err(LayoutError(format!("{} vCPUs", self.vcpus.len())));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return Err(LayoutError(format!("vCPU {i} has index {}", v.index)));
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
            let gsi = VIRTIO_FIRST_GSI + i as u32;
            if d.base != base || d.gsi != gsi {
                return Err(LayoutError(format!(
                    "device {i} at {:#x}/GSI {} (expected {base:#x}/GSI {gsi})",
                    d.base, d.gsi
                )));
            }
        }
        if self
            .devices
            .iter()
            .filter(|d| d.kind == DeviceKind::Vsock)
            .count()
            > 1
        {
            return Err(LayoutError("more than one vsock device".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::MmioRegisters;

    fn device(kind: DeviceKind, i: u64) -> DeviceSnapshot {
        DeviceSnapshot {
            kind,
            base: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_FIRST_GSI + i as u32,
            mmio: MmioState {
                device_type: 0,
                regs: MmioRegisters::default(),
                queues: Vec::new(),
                active_queues: None,
                interrupt_status: 0,
                config_generation: 0,
                needs_reset: false,
            },
        }
    }

    fn vm_and_vcpu() -> (VmState, VcpuState) {
        use crate::vstate::state::readable_msrs;
        use crate::vstate::vcpu::Vcpu;
        use crate::vstate::vm::{create_vm, open_kvm};
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        let fd = crate::memory::create_memfd(2 << 20).unwrap();
        let mem = crate::memory::map_guest_memory(&fd, 2 << 20, libc::MAP_SHARED).unwrap();
        let vm = create_vm(&kvm, &mem).unwrap();
        let vcpu = Vcpu::new(&kvm, &vm, 0, 1, None).unwrap();
        let msrs = readable_msrs(&kvm, vcpu.fd()).unwrap();
        (
            VmState::save(&vm).unwrap(),
            VcpuState::save(vcpu.fd(), 0, &msrs).unwrap(),
        )
    }

    #[test]
    fn devices_and_vcpus_must_be_where_this_vmm_puts_them() {
        let (vm, vcpu) = vm_and_vcpu();
        let mut snap = VmSnapshot {
            memory_mib: 2,
            guest_cid: 3,
            cmdline: String::new(),
            vm,
            vcpus: vec![vcpu],
            devices: vec![device(DeviceKind::Vsock, 0), device(DeviceKind::Rng, 1)],
            serial: SerialSnapshot::default(),
        };
        snap.check_layout(4).unwrap();

        snap.devices[1].base += 0x10;
        let e = snap.check_layout(4).unwrap_err().to_string();
        assert!(e.contains("device 1"), "{e}");
        snap.devices[1] = device(DeviceKind::Vsock, 1);
        assert!(snap.check_layout(4).is_err(), "two vsock devices");
        snap.devices.pop();

        snap.vcpus[0].index = 1;
        assert!(snap
            .check_layout(4)
            .unwrap_err()
            .to_string()
            .contains("index 1"));
        snap.vcpus.clear();
        assert!(snap.check_layout(4).is_err(), "no vCPU");
    }

    #[test]
    fn serial_state_round_trips_and_bounds_the_fifo() {
        let s = SerialSnapshot {
            line_control: 3,
            scratch: 7,
            in_buffer: vec![b'x'; 1000],
            ..Default::default()
        };
        let back: vm_superio::serial::SerialState = (&s).into();
        assert_eq!((back.line_control, back.scratch), (3, 7));
        assert_eq!(back.in_buffer.len(), 64);
    }
}
