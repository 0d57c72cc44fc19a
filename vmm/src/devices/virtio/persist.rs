//! Saving and restoring a virtio-mmio device through [`Persist`]: its
//! transport registers, its queues ([`QueueState`]) and, through the device
//! model's own `persist.rs`, the model inside it ([`DeviceModelState`]).
//!
//! It owns the transport's saved state ([`MmioState`]), the queue's, and
//! the one place that maps a saved model to its device type
//! ([`MmioTransport`]'s `restore`). A model's own state belongs to the
//! model (`vsock/persist.rs`, `rng/persist.rs`, `net/persist.rs`). It must not trust the
//! state: a device type, queue count, queue size, ring address or feature
//! set that does not fit the device is an error, and rings must lie inside
//! guest memory before a device is activated on them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::mmio::{MmioRegisters, MmioTransport};
use super::net::persist::{NetConstructorArgs, NetRestoreError, NetState};
use super::net::tap::Tap;
use super::rng::persist::{RngConstructorArgs, RngRestoreError, RngState};
use super::vsock::persist::{VsockConstructorArgs, VsockRestoreError, VsockState};
use super::{
    Error, Net, Rng, VirtioDevice, Vsock, STATUS_DRIVER_OK, STATUS_FEATURES_OK, TYPE_NET, TYPE_RNG,
    TYPE_VSOCK,
};
use crate::persist::{check_version, Persist, VersionError};

/// Version of [`MmioState`] and of the [`QueueState`]s inside it.
pub const MMIO_STATE_VERSION: u32 = 1;

/// A queue's configuration and ring positions, serializable
/// (`virtio_queue::QueueState` is not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(s: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(s: QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// What a restored queue needs besides its state.
#[derive(Debug, Clone, Copy)]
pub struct QueueConstructorArgs {
    /// The largest size the device offers for this queue: the saved one
    /// must be the same.
    pub max_size: u16,
}

/// Why a queue state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    /// The saved queue belongs to a device with other queue sizes.
    #[error("the saved queue holds at most {saved} entries, this device's {device}")]
    MaxSize {
        /// The saved maximum size.
        saved: u16,
        /// The device's.
        device: u16,
    },
    /// Its size or a ring address is invalid (virtio-queue's checks).
    #[error("the saved queue's size or ring addresses are invalid")]
    Invalid(#[source] virtio_queue::Error),
}

impl Persist for Queue {
    type State = QueueState;
    type ConstructorArgs = QueueConstructorArgs;
    type Error = QueueRestoreError;

    fn save(&self) -> QueueState {
        self.state().into()
    }

    fn restore(args: QueueConstructorArgs, state: &QueueState) -> Result<Self, Self::Error> {
        if state.max_size != args.max_size {
            return Err(QueueRestoreError::MaxSize {
                saved: state.max_size,
                device: args.max_size,
            });
        }
        Queue::try_from(virtio_queue::QueueState::from(*state)).map_err(QueueRestoreError::Invalid)
    }
}

/// Everything a transport holds for its device, for a snapshot: registers,
/// queues, interrupt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// [`MMIO_STATE_VERSION`].
    pub version: u32,
    /// The device type the state belongs to.
    pub device_type: u32,
    /// Transport registers.
    pub regs: MmioRegisters,
    /// Queues as programmed through the registers.
    pub queues: Vec<QueueState>,
    /// The activated device's live queues (their ring positions are the
    /// ones that count); `None` when the device was not activated.
    pub active_queues: Option<Vec<QueueState>>,
    /// Interrupt status bits.
    pub interrupt_status: u32,
    /// Config generation.
    pub config_generation: u32,
    /// `DEVICE_NEEDS_RESET` was set.
    pub needs_reset: bool,
}

/// Why a transport state cannot be restored around a device.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    /// Another state version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The state belongs to another kind of device.
    #[error("the saved transport belongs to device type {saved}, not {device}")]
    DeviceType {
        /// The saved device type.
        saved: u32,
        /// The device's.
        device: u32,
    },
    /// A queue count that is not the device's.
    #[error("the saved transport has {actual} {what} queues, the device {expected}")]
    QueueCount {
        /// "configured" or "active".
        what: &'static str,
        /// The device's number of queues.
        expected: usize,
        /// The saved number.
        actual: usize,
    },
    /// A queue that does not fit.
    #[error("saved queue {index} does not fit the device")]
    Queue {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: QueueRestoreError,
    },
    /// An active queue that is not ready, or whose rings lie outside guest
    /// memory.
    #[error("saved active queue {0} is not ready or its rings are not inside guest memory")]
    QueueOutsideMemory(usize),
    /// Active queues on a device the driver never set `DRIVER_OK` on.
    #[error("the saved device is active but its driver never finished setting it up (status {status:#x})")]
    ActiveWithoutDriver {
        /// The saved status register.
        status: u32,
    },
    /// Negotiated features the device does not offer.
    #[error("the saved features {saved:#x} include some the device does not offer ({offered:#x})")]
    Features {
        /// Saved driver features.
        saved: u64,
        /// What the device offers.
        offered: u64,
    },
    /// The transport's eventfds could not be created.
    #[error("cannot create the transport")]
    Create(#[source] Error),
    /// The device refused its restored queues.
    #[error("the device refused its restored queues")]
    Activate(#[source] Error),
}

impl MmioTransport {
    /// The transport's and its device's queue state. The device must be
    /// quiescent (vCPUs paused, event loop not inside it).
    pub fn save_transport(&self) -> MmioState {
        let active = self.device.queues();
        MmioState {
            version: MMIO_STATE_VERSION,
            device_type: self.device.device_type(),
            regs: self.regs,
            queues: self.queues.iter().map(Persist::save).collect(),
            active_queues: (self.device.is_activated() && !active.is_empty())
                .then(|| active.iter().map(Persist::save).collect()),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
        }
    }

    /// Rebuilds a transport around a fresh `device` from a saved state,
    /// re-activating the device where it was active (and telling it so,
    /// [`VirtioDevice::restored`]).
    pub fn restore_transport(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        state: &MmioState,
    ) -> Result<Self, TransportRestoreError> {
        use TransportRestoreError as E;
        check_version("virtio-mmio transport", state.version, MMIO_STATE_VERSION)?;
        if state.device_type != device.device_type() {
            return Err(E::DeviceType {
                saved: state.device_type,
                device: device.device_type(),
            });
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        let queues = |what, saved: &[QueueState]| -> Result<Vec<Queue>, E> {
            if saved.len() != max_sizes.len() {
                return Err(E::QueueCount {
                    what,
                    expected: max_sizes.len(),
                    actual: saved.len(),
                });
            }
            saved
                .iter()
                .zip(&max_sizes)
                .enumerate()
                .map(|(index, (s, &max_size))| {
                    Queue::restore(QueueConstructorArgs { max_size }, s)
                        .map_err(|source| E::Queue { index, source })
                })
                .collect()
        };
        let configured = queues("configured", &state.queues)?;
        let active = match &state.active_queues {
            None => None,
            Some(saved) => {
                if state.regs.status & STATUS_DRIVER_OK == 0 {
                    return Err(E::ActiveWithoutDriver {
                        status: state.regs.status,
                    });
                }
                Some(queues("active", saved)?)
            }
        };

        let mut t = Self::new(device, mem).map_err(E::Create)?;
        t.queues = configured;
        t.regs = state.regs;
        if t.regs.status & STATUS_FEATURES_OK != 0 {
            let offered = t.device.avail_features();
            if t.regs.driver_features & !offered != 0 {
                return Err(E::Features {
                    saved: t.regs.driver_features,
                    offered,
                });
            }
            t.device.ack_features(t.regs.driver_features);
        }
        // The saved interrupt state first: what `restored` raises (a
        // transport reset, a link change) comes on top of it.
        t.interrupt.restore(
            state.interrupt_status,
            state.config_generation,
            state.needs_reset,
        );
        if let Some(active) = active {
            if let Some(i) = active
                .iter()
                .position(|q| !q.ready() || !q.is_valid(&t.mem))
            {
                return Err(E::QueueOutsideMemory(i));
            }
            t.device
                .activate(t.mem.clone(), active, t.interrupt.clone())
                .map_err(E::Activate)?;
            t.device.restored();
        }
        Ok(t)
    }
}

/// A device model's own state, by kind: what the transport cannot know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceModelState {
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-rng.
    Rng(RngState),
    /// virtio-net.
    Net(NetState),
}

impl DeviceModelState {
    /// The device's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceModelState::Vsock(_) => "vsock",
            DeviceModelState::Rng(_) => "rng",
            DeviceModelState::Net(_) => "net",
        }
    }

    /// The virtio device type of the model.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceModelState::Vsock(_) => TYPE_VSOCK,
            DeviceModelState::Rng(_) => TYPE_RNG,
            DeviceModelState::Net(_) => TYPE_NET,
        }
    }
}

/// One virtio-mmio device as a snapshot holds it: the model and its
/// transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device model.
    pub model: DeviceModelState,
    /// Its transport and queues.
    pub transport: MmioState,
}

/// What a restored virtio device needs besides its state: the clone's
/// guest memory and host resources.
#[derive(Debug)]
pub struct MmioConstructorArgs {
    /// The clone's guest memory.
    pub mem: GuestMemoryMmap,
    /// The clone's vsock Unix socket (each clone has its own), if any.
    pub vsock_uds: Option<PathBuf>,
    /// Reset the vsock transport instead of carrying the master's idle
    /// connections (`--vsock-reset`).
    pub vsock_reset: bool,
    /// The clone's tap, for a net device (none: the device is restored
    /// disconnected).
    pub net_tap: Option<Tap>,
}

/// Why a virtio device cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRestoreError {
    /// The snapshot has a vsock device and the clone was given no socket.
    #[error("the snapshot has a vsock device: give the clone a vsock socket (--vsock)")]
    NoVsockSocket,
    /// The vsock model.
    #[error("cannot restore the vsock device")]
    Vsock(#[from] VsockRestoreError),
    /// The rng model.
    #[error("cannot restore the rng device")]
    Rng(#[from] RngRestoreError),
    /// The net model.
    #[error("cannot restore the net device")]
    Net(#[from] NetRestoreError),
    /// The transport around the model.
    #[error("cannot restore the {device} device's virtio-mmio transport")]
    Transport {
        /// The model's name.
        device: &'static str,
        /// Why.
        #[source]
        source: TransportRestoreError,
    },
}

impl Persist for MmioTransport {
    type State = VirtioDeviceState;
    type ConstructorArgs = MmioConstructorArgs;
    type Error = DeviceRestoreError;

    fn save(&self) -> VirtioDeviceState {
        VirtioDeviceState {
            model: self.device.save_model(),
            transport: self.save_transport(),
        }
    }

    fn restore(args: MmioConstructorArgs, state: &VirtioDeviceState) -> Result<Self, Self::Error> {
        let device: Box<dyn VirtioDevice> = match &state.model {
            DeviceModelState::Vsock(s) => {
                let uds_path = args.vsock_uds.ok_or(DeviceRestoreError::NoVsockSocket)?;
                let args = VsockConstructorArgs {
                    uds_path,
                    reset: args.vsock_reset,
                };
                Box::new(Vsock::restore(args, s)?)
            }
            DeviceModelState::Rng(s) => Box::new(Rng::restore(RngConstructorArgs, s)?),
            DeviceModelState::Net(s) => {
                Box::new(Net::restore(NetConstructorArgs { tap: args.net_tap }, s)?)
            }
        };
        Self::restore_transport(device, args.mem, &state.transport).map_err(|source| {
            DeviceRestoreError::Transport {
                device: state.model.name(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS};
    use crate::devices::virtio::test_utils::{
        mem, negotiate, r, setup_queue, w, DriverQueue, Dummy, MEM_SIZE,
    };
    use crate::devices::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, VIRTIO_F_VERSION_1};

    const DRIVER_OK: u32 =
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn queue_state_round_trips_and_bad_queues_are_refused() {
        let m = mem();
        let dq = DriverQueue::new(&m, 0x10000, 16);
        let mut q = dq.create_queue();
        q.set_next_avail(7);
        q.set_next_used(5);
        let saved = q.save();
        let args = QueueConstructorArgs { max_size: 16 };
        let back = Queue::restore(args, &saved).unwrap();
        assert_eq!(back.save(), saved);
        assert!(back.is_valid(&m));

        let e = Queue::restore(QueueConstructorArgs { max_size: 32 }, &saved).unwrap_err();
        assert!(
            matches!(
                e,
                QueueRestoreError::MaxSize {
                    saved: 16,
                    device: 32
                }
            ),
            "{e}"
        );
        for bad in [
            QueueState { size: 3, ..saved },
            QueueState { size: 0, ..saved },
            QueueState { size: 32, ..saved },
            QueueState {
                desc_table: 0x10001,
                ..saved
            },
            QueueState {
                avail_ring: 0x10001,
                ..saved
            },
            QueueState {
                used_ring: 0x10002,
                ..saved
            },
        ] {
            let e = Queue::restore(args, &bad).unwrap_err();
            assert!(matches!(e, QueueRestoreError::Invalid(_)), "{bad:?}: {e}");
        }
        let huge = QueueState {
            max_size: 1 << 15 | 1,
            ..saved
        };
        let args = QueueConstructorArgs {
            max_size: huge.max_size,
        };
        assert!(Queue::restore(args, &huge).is_err());
    }

    /// A Dummy transport the driver set up: features, both queues, DRIVER_OK.
    fn active_transport(m: &GuestMemoryMmap) -> MmioTransport {
        let mut t = MmioTransport::new(Box::new(Dummy::default()), m.clone()).unwrap();
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        negotiate(&mut t, v1 | 1);
        setup_queue(&mut t, 0, &DriverQueue::new(m, 0x10000, 16));
        setup_queue(&mut t, 1, &DriverQueue::new(m, 0x20000, 8));
        w(&mut t, REG_STATUS, DRIVER_OK);
        assert!(t.is_activated());
        t
    }

    #[test]
    fn transport_state_survives_save_serialize_restore() {
        let m = mem();
        let t = active_transport(&m);
        t.interrupt().signal_config_change();
        let saved = t.save_transport();
        assert!(saved.active_queues.is_some());
        let json = serde_json::to_vec(&saved).unwrap();
        let back: MmioState = serde_json::from_slice(&json).unwrap();

        let d = Dummy::default();
        let acked = d.acked.clone();
        let mut restored = MmioTransport::restore_transport(Box::new(d), m.clone(), &back).unwrap();
        assert!(restored.is_activated());
        assert_eq!(*acked.lock().unwrap(), (1u64 << VIRTIO_F_VERSION_1) | 1);
        assert_eq!(restored.save_transport(), saved);
        assert_eq!(r(&mut restored, REG_STATUS), DRIVER_OK);
        w(&mut restored, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut restored, REG_QUEUE_READY), 1);

        // A device the driver never touched round-trips too, inactive.
        let fresh = MmioTransport::new(Box::new(Dummy::default()), m.clone()).unwrap();
        let saved = fresh.save_transport();
        assert_eq!(saved.active_queues, None);
        let back = MmioTransport::restore_transport(Box::new(Dummy::default()), m, &saved).unwrap();
        assert!(!back.is_activated());
        assert_eq!(back.save_transport(), saved);
    }

    #[test]
    fn bad_transport_states_are_refused() {
        let m = mem();
        let saved = active_transport(&m).save_transport();
        let restore = |s: &MmioState| {
            MmioTransport::restore_transport(Box::new(Dummy::default()), m.clone(), s).map(|_| ())
        };
        type E = TransportRestoreError;

        let mut bad = saved.clone();
        bad.version = 9;
        assert!(matches!(restore(&bad), Err(E::Version(_))));
        let mut bad = saved.clone();
        bad.device_type = 7;
        assert!(matches!(
            restore(&bad),
            Err(E::DeviceType {
                saved: 7,
                device: 42
            })
        ));
        let mut bad = saved.clone();
        bad.queues.pop();
        assert!(matches!(
            restore(&bad),
            Err(E::QueueCount { actual: 1, .. })
        ));
        let mut bad = saved.clone();
        bad.active_queues
            .as_mut()
            .unwrap()
            .push(QueueState::default());
        assert!(matches!(
            restore(&bad),
            Err(E::QueueCount { actual: 3, .. })
        ));
        let mut bad = saved.clone();
        bad.queues[1].max_size = 16;
        assert!(matches!(restore(&bad), Err(E::Queue { index: 1, .. })));
        let mut bad = saved.clone();
        bad.active_queues.as_mut().unwrap()[1].size = 3;
        assert!(matches!(restore(&bad), Err(E::Queue { index: 1, .. })));
        // Rings (aligned) beyond the end of guest memory, or wrapping around it.
        for addr in [MEM_SIZE as u64 - 0x10, u64::MAX - 0xf] {
            let mut bad = saved.clone();
            bad.active_queues.as_mut().unwrap()[0].desc_table = addr;
            assert!(
                matches!(restore(&bad), Err(E::QueueOutsideMemory(0))),
                "{addr:#x}"
            );
        }
        let mut bad = saved.clone();
        bad.active_queues.as_mut().unwrap()[1].ready = false;
        assert!(matches!(restore(&bad), Err(E::QueueOutsideMemory(1))));
        let mut bad = saved.clone();
        bad.regs.status &= !STATUS_DRIVER_OK;
        assert!(matches!(restore(&bad), Err(E::ActiveWithoutDriver { .. })));
        let mut bad = saved.clone();
        bad.regs.driver_features |= 1 << 40;
        assert!(matches!(restore(&bad), Err(E::Features { .. })));
        // Whatever the guest left in a register is no reason to refuse.
        let mut odd = saved.clone();
        odd.regs.queue_sel = u32::MAX;
        odd.interrupt_status = u32::MAX;
        restore(&odd).unwrap();
    }

    #[test]
    fn a_device_restores_as_its_kind_or_not_at_all() {
        let m = mem();
        let rng = MmioTransport::new(Box::new(Rng::new()), m.clone()).unwrap();
        let saved = rng.save();
        assert_eq!(saved.model.name(), "rng");
        assert_eq!(saved.model.device_type(), TYPE_RNG);
        let json = serde_json::to_string(&saved).unwrap();
        assert!(json.contains(r#""kind":"rng""#), "{json}");
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        let args = || MmioConstructorArgs {
            mem: m.clone(),
            vsock_reset: false,
            vsock_uds: None,
            net_tap: None,
        };
        let restored = MmioTransport::restore(args(), &back).unwrap();
        assert_eq!(restored.save(), saved);

        // An rng model in a vsock transport: the transport refuses it.
        let mut bad = saved.clone();
        bad.transport.device_type = TYPE_VSOCK;
        let e = MmioTransport::restore(args(), &bad).unwrap_err();
        assert!(
            matches!(
                &e,
                DeviceRestoreError::Transport {
                    device: "rng",
                    source: TransportRestoreError::DeviceType { .. }
                }
            ),
            "{e}"
        );

        // A vsock device needs a socket.
        let vsock = VirtioDeviceState {
            model: DeviceModelState::Vsock(VsockState {
                version: crate::devices::virtio::vsock::persist::VSOCK_STATE_VERSION,
                guest_cid: 3,
                connections: None,
            }),
            transport: MmioState {
                device_type: TYPE_VSOCK,
                ..saved.transport
            },
        };
        assert!(matches!(
            MmioTransport::restore(args(), &vsock),
            Err(DeviceRestoreError::NoVsockSocket)
        ));
    }
}
