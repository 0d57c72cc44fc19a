//! What a VMM process tells the process that started it: one JSON object
//! per line on its stdout (a pipe or a file, the spawner's choice). Times are `CLOCK_MONOTONIC` in microseconds, the same
//! clock in every process, so the caller can line them up with its own.

use std::io::Write;
use std::sync::Mutex;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest shut down or rebooted (i8042 reset, agent `shutdown`, `poweroff`).
    Shutdown,
    /// The VM was frozen into a snapshot (a master): it never runs again.
    Frozen,
    /// The guest kernel panicked.
    Panic,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM could not emulate a guest instruction.
    EmulationFailure,
    /// Any other KVM or VMM failure.
    Error,
}

impl ExitReason {
    /// The VMM process's exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Shutdown | ExitReason::Frozen => 0,
            ExitReason::Panic => 2,
            ExitReason::TripleFault | ExitReason::EmulationFailure => 3,
            ExitReason::Error => 1,
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The VMM process is running (first thing in `main`).
    Started {
        /// Time.
        t_us: u64,
    },
    /// vCPU 0 is about to enter the guest for the first time.
    VcpuRunning {
        /// Time.
        t_us: u64,
    },
    /// The agent announced itself on the console: the kernel reached /init.
    AgentStart {
        /// Time.
        t_us: u64,
    },
    /// The agent listens on vsock.
    AgentReady {
        /// Time.
        t_us: u64,
    },
    /// A device refused more from the guest since it last said so
    /// (malformed requests, protocol violations, corrupted rings): a
    /// misbehaving guest, made visible. At most one per device per second,
    /// and a last one before [`Event::Exit`] if the count changed since.
    DeviceRejected {
        /// Time.
        t_us: u64,
        /// The device: `rng`, `vsock`, `net`...
        device: String,
        /// How many requests it refused since the VMM started.
        count: u64,
        /// Why it refused the last one.
        last: String,
    },
    /// A step of a device on the way to a restored VM's first answer, or
    /// an interrupt the device had to raise again (see [`DevicePhase`]).
    /// A restored VM's devices report their steps until the first guest
    /// data on a connection; re-raised interrupts always.
    DevicePhase {
        /// Time.
        t_us: u64,
        /// The device: `vsock`, `net`...
        device: String,
        /// What happened.
        phase: DevicePhase,
    },
    /// The VM ended; the process exits right after.
    Exit {
        /// Time.
        t_us: u64,
        /// Why.
        reason: ExitReason,
        /// Human-readable detail.
        message: String,
    },
    /// What has woken the VM since the VMM started, counted: written when
    /// the VMM is sent [`WAKEUPS_SIGNAL`], and never otherwise, so that
    /// asking costs an idle VM nothing. Two of them a window apart give
    /// the wake-ups per second by cause.
    Wakeups {
        /// Time.
        t_us: u64,
        /// The counts.
        counts: WakeupCounts,
    },
}

/// The signal that asks a VMM for an [`Event::Wakeups`].
pub const WAKEUPS_SIGNAL: libc::c_int = libc::SIGUSR1;

/// What has woken a VM, counted since its VMM started (see
/// [`Event::Wakeups`]). The KVM counts are summed over the vCPUs and absent
/// where the host's KVM has no statistics file descriptors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeupCounts {
    /// Times the guest halted (went idle) and was woken again: every
    /// wake-up of an idle guest ends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halts: Option<u64>,
    /// Times KVM woke a vCPU thread that slept in a halt (KVM's
    /// `halt_wakeup`): host-side wake-ups of the vCPU threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_wakeups: Option<u64>,
    /// Interrupts KVM injected into the guest: the guest's own timers
    /// (LAPIC) and the devices' ([`WakeupCounts::device_irqs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq_injections: Option<u64>,
    /// Exits from the guest to KVM, for any reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_exits: Option<u64>,
    /// Exits from KVM to the VMM, by reason (`pio`, `mmio`, `interrupted`).
    pub vmm_exits: BTreeMap<String, u64>,
    /// Interrupts the VMM's devices raised, by device (`vsock`, `net`, `rng`...).
    pub device_irqs: BTreeMap<String, u64>,
}

/// A device step reported by [`Event::DevicePhase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DevicePhase {
    /// vsock: the restored device posted a transport reset event (every
    /// connection of the master ends in the guest).
    TransportResetPosted,
    /// vsock: the guest handled it (handed the event buffer back).
    TransportResetAcked,
    /// vsock: the guest did not handle it in time; host connections go
    /// through anyway.
    TransportResetLate,
    /// vsock: connections of the master that could not be carried were
    /// reset one by one.
    StaleConnectionsReset,
    /// vsock: a host connection took over a connection carried from the
    /// master (no request to the guest).
    ConnectionCarried,
    /// vsock: a connection request went to the guest.
    ConnectionRequested,
    /// vsock: the guest accepted it.
    ConnectionAccepted,
    /// vsock: the first host data went to the guest.
    FirstRx,
    /// vsock: the first guest data came back (the device stops reporting
    /// steps).
    FirstTx,
    /// An interrupt was raised (reported while steps are).
    IrqRaised,
    /// An interrupt the guest had not acknowledged for a while was raised
    /// again (a lost interrupt, made visible; always reported).
    IrqReraised,
}

/// Microseconds of `CLOCK_MONOTONIC`.
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Writes events, one line each, to a shared writer.
pub struct EventSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl EventSink {
    /// Events go to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        EventSink {
            out: Mutex::new(out),
        }
    }

    /// Emits one event; a closed reader is not an error for the VM.
    pub fn emit(&self, event: &Event) {
        if let Ok(mut line) = serde_json::to_vec(event) {
            line.push(b'\n');
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_json_lines() {
        let e = Event::Exit {
            t_us: 5,
            reason: ExitReason::Panic,
            message: "x".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"event":"exit","t_us":5,"reason":"panic","message":"x"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
        assert!(now_us() > 0);
    }

    #[test]
    fn device_phases_are_tagged_json_lines() {
        let e = Event::DevicePhase {
            t_us: 9,
            device: "vsock".into(),
            phase: DevicePhase::ConnectionCarried,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"event":"device_phase","t_us":9,"device":"vsock","phase":"connection_carried"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }

    #[test]
    fn wakeup_counts_are_tagged_json_lines() {
        let e = Event::Wakeups {
            t_us: 9,
            counts: WakeupCounts {
                halts: Some(4),
                halt_wakeups: Some(3),
                irq_injections: Some(5),
                kvm_exits: None,
                vmm_exits: [("mmio".to_string(), 2)].into(),
                device_irqs: [("vsock".to_string(), 1)].into(),
            },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"event":"wakeups","t_us":9,"counts":{"halts":4,"halt_wakeups":3,"irq_injections":5,"vmm_exits":{"mmio":2},"device_irqs":{"vsock":1}}}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }

    #[test]
    fn device_rejections_are_tagged_json_lines() {
        let e = Event::DeviceRejected {
            t_us: 7,
            device: "vsock".into(),
            count: 3,
            last: "TX packet dropped: bad CIDs 9 -> 2".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"event":"device_rejected","t_us":7,"device":"vsock","count":3,"last":"TX packet dropped: bad CIDs 9 -> 2"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }
}
