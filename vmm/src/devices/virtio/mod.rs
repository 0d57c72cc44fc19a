//! Virtio devices and the virtio-mmio transport.
//!
//! Layout of this module:
//!
//! * [`VirtioDevice`] is the interface between a transport and a device model (Firecracker /
//!   Cloud Hypervisor style): the device describes itself (type, queues, features, config space)
//!   and gets activated with the guest memory, its ready queues and an [`Interrupt`] handle.
//! * [`mmio::MmioTransport`] implements the virtio-mmio (version 2) register interface on top of
//!   a boxed [`VirtioDevice`] and is the single `event_manager` subscriber for that device (queue
//!   ioeventfds + the device's own fds).
//! * [`rng::Rng`] (virtio-rng), [`vsock::Vsock`] (virtio-vsock with a Unix-socket host side)
//!   and [`net::Net`] (virtio-net with a tap backend) are the device models.
//! * [`persist`] saves and restores a transport, its queues and (through each model's own
//!   `persist.rs`) the model inside it.
//! * [`report::RejectReporter`] puts what each device refused from the guest
//!   ([`VirtioDevice::rejected`]) on the VMM's events stream, paced.
//!
//! Threading model: MMIO register accesses run on vCPU threads, queue processing runs on the
//! single device event-loop thread. Both go through the same `Mutex<MmioTransport>`, so a device
//! model never sees concurrent calls. The guest is untrusted: everything it puts into registers
//! or rings is validated, and a malformed request never panics the VMM.

use std::io;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::EventSet;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub mod chain;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod report;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod ring_fuzz;
#[cfg(test)]
pub(crate) mod test_utils;

pub use chain::DescriptorError;
pub use mmio::MmioTransport;
pub use net::{Net, TYPE_NET};
pub use rng::Rng;
pub use vsock::Vsock;

/// Virtio device type id of the entropy device.
pub const TYPE_RNG: u32 = 4;
/// Virtio device type id of the socket device.
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: the device is compliant with virtio 1.0+ (mandatory for virtio-mmio v2).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: `used_event` / `avail_event` notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Interrupt status bit: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration (or the device status) changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Device status bit: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status bit: the guest has a driver for the device.
pub const STATUS_DRIVER: u32 = 2;
/// Device status bit: the driver is set up and ready to drive the device.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status bit: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status bit: the device hit an error the driver must recover from by resetting it.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
/// Device status bit: the driver gave up on the device.
pub const STATUS_FAILED: u32 = 128;

/// Errors of the virtio devices and of the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An eventfd could not be created.
    #[error("failed to create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A device declared a queue maximum size virtio-queue does not accept.
    #[error("invalid maximum size {size} for queue {index}: {source}")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The rejected maximum size.
        size: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A device was activated with the wrong number of queues.
    #[error("device expects {expected} queues, got {actual}")]
    QueueCount {
        /// Number of queues the device declares.
        expected: usize,
        /// Number of queues it was given.
        actual: usize,
    },
    /// A queue is not ready or its rings are not inside guest memory.
    #[error("queue {0} is not ready or its rings are not inside guest memory")]
    InvalidQueue(usize),
    /// The device was activated twice without a reset in between.
    #[error("device is already activated")]
    AlreadyActivated,
    /// A descriptor chain put into a queue by the guest is malformed.
    #[error("malformed descriptor chain: {0}")]
    Descriptor(#[from] DescriptorError),
    /// The vsock guest CID is reserved or out of range.
    #[error("invalid vsock guest CID {0} (must be in 3..=0xffff_fffe)")]
    InvalidCid(u64),
    /// The vsock Unix listener could not be created.
    #[error("failed to bind the vsock Unix socket {path}: {source}")]
    Bind {
        /// Path of the Unix socket.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// An epoll operation failed.
    #[error("epoll operation failed: {0}")]
    Epoll(#[source] io::Error),
}

/// Logs a warning about something the guest (or a host peer) did wrong, rate limited per call
/// site so that a hostile guest cannot flood the VMM's stderr.
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static COUNT: ::std::sync::atomic::AtomicU64 = ::std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, ::std::sync::atomic::Ordering::Relaxed);
        if n < 10 || n.is_power_of_two() {
            eprintln!(
                "zygote-vmm: virtio: {} (occurrence {})",
                format_args!($($arg)*),
                n + 1
            );
        }
    }};
}
pub(crate) use warn_limited;

#[derive(Debug)]
struct InterruptInner {
    status: AtomicU32,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
    evt: EventFd,
    /// Interrupts raised since the device was created (wake-up accounting,
    /// the vsock device's steps).
    raised: AtomicU64,
}

/// Interrupt handle shared by a transport and its device.
///
/// It holds the virtio-mmio interrupt status bits (bit 0: used ring, bit 1: configuration change)
/// and the eventfd the transport registers with `KVM_IRQFD`. Signalling sets the bit and writes
/// the eventfd; the guest reads `InterruptStatus` and acknowledges through `InterruptACK`.
/// Cloning is cheap (`Arc`).
#[derive(Debug, Clone)]
pub struct Interrupt {
    inner: Arc<InterruptInner>,
}

impl Interrupt {
    /// Creates a handle with a fresh non-blocking eventfd.
    pub fn new() -> Result<Self, Error> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        Ok(Interrupt {
            inner: Arc::new(InterruptInner {
                status: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                config_generation: AtomicU32::new(0),
                evt,
                raised: AtomicU64::new(0),
            }),
        })
    }

    fn trigger(&self, bit: u32) {
        self.inner.status.fetch_or(bit, Ordering::SeqCst);
        self.inner.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.inner.evt.write(1) {
            warn_limited!("failed to signal the interrupt eventfd: {e}");
        }
    }

    /// Tells the driver that one or more used rings were updated.
    pub fn signal_used_queue(&self) {
        self.trigger(VIRTIO_MMIO_INT_VRING);
    }

    /// Bumps the configuration generation and tells the driver the configuration changed.
    pub fn signal_config_change(&self) {
        self.inner.config_generation.fetch_add(1, Ordering::SeqCst);
        self.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Puts the device into the `DEVICE_NEEDS_RESET` state (e.g. the guest corrupted a ring) and
    /// notifies the driver through a configuration-change interrupt.
    pub fn set_needs_reset(&self) {
        if !self.inner.needs_reset.swap(true, Ordering::SeqCst) {
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.inner.needs_reset.load(Ordering::SeqCst)
    }

    /// Current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::SeqCst)
    }

    /// Clears the given interrupt status bits (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Interrupts raised since this handle was created, re-raises included.
    pub fn raised(&self) -> u64 {
        self.inner.raised.load(Ordering::Relaxed)
    }

    /// Current configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.inner.config_generation.load(Ordering::SeqCst)
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }

    /// Clears the interrupt status and the needs-reset flag (device reset).
    pub(crate) fn reset(&self) {
        self.inner.status.store(0, Ordering::SeqCst);
        self.inner.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Sets the saved status bits, config generation and reset flag of a
    /// restored device (without signalling: the restored guest state
    /// already reflects any interrupt that was raised).
    pub(crate) fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.inner.status.store(
            status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG),
            Ordering::SeqCst,
        );
        self.inner
            .config_generation
            .store(config_generation, Ordering::SeqCst);
        self.inner.needs_reset.store(needs_reset, Ordering::SeqCst);
    }
}

/// A virtio device model driven by a transport (see [`mmio::MmioTransport`]).
///
/// Call sequence: the transport reads the static description (`device_type`, `queue_max_sizes`,
/// `avail_features`, config space), hands over the features the driver accepted
/// (`ack_features`, only a subset of `avail_features`), then calls `activate` once the driver set
/// `DRIVER_OK`. After activation, `process_queue` runs whenever the guest notifies a queue, and
/// `process_extra_fd` whenever one of `extra_fds` is ready. `reset` returns the device to its
/// pre-activation state (the driver wrote 0 to the status register). All calls happen under the
/// transport's lock, so they are never concurrent.
pub trait VirtioDevice: Send {
    /// Virtio device type id (e.g. [`TYPE_RNG`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;

    /// Features the driver accepted (always a subset of `avail_features`).
    fn ack_features(&mut self, features: u64);

    /// Reads the device-specific configuration space; `offset` is relative to its start.
    /// Bytes beyond the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; read-only devices ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the guest memory, its queues (validated by the transport: ready,
    /// rings inside guest memory, one per `queue_max_sizes` entry) and the interrupt handle.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error>;

    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;

    /// Returns to the pre-activation state: drops the queues and memory and any guest-visible
    /// state (e.g. open vsock connections).
    fn reset(&mut self);

    /// The guest notified queue `index` (called on the event-loop thread).
    fn process_queue(&mut self, index: usize);

    /// Additional file descriptors the device wants the event loop to poll for `EPOLLIN`
    /// (level triggered). They must stay open and valid for the device's whole lifetime.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// The extra fd `extra_fds()[index]` is ready (called on the event-loop thread, also before
    /// activation).
    fn process_extra_fd(&mut self, _index: usize, _events: EventSet) {}

    /// The live queues of an activated device (for snapshots); empty when not activated.
    fn queues(&self) -> &[Queue] {
        &[]
    }

    /// Called once after the device was re-activated from a snapshot, in
    /// the new process: state the device could not carry over (host
    /// connections, say) is reset here, and the guest told if it must be.
    fn restored(&mut self) {}

    /// The model's own state, for a snapshot: its [`crate::persist::Persist`]
    /// state, by kind. (The transport saves the queues and registers.)
    fn save_model(&self) -> persist::DeviceModelState;

    /// What this device refused from the guest so far (malformed chains,
    /// bad headers, requests it cannot serve), and the last reason: a
    /// misbehaving guest is made visible from outside by the VMM, which
    /// reports these counts.
    fn rejected(&self) -> Rejected {
        Rejected::default()
    }

    /// Moves the steps the device recorded since the last call (with their
    /// `CLOCK_MONOTONIC` µs) into `out`; the VMM reports them as
    /// [`proto::events::Event::DevicePhase`]. Devices that record none
    /// keep the default.
    fn take_phases(&mut self, _out: &mut Vec<(proto::events::DevicePhase, u64)>) {}
}

/// A device's count of refused guest requests ([`VirtioDevice::rejected`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejected {
    /// How many since the device was created.
    pub count: u64,
    /// Why the last one was refused.
    pub last: Option<String>,
}

impl Rejected {
    /// Counts one refusal for `reason`.
    pub fn record(&mut self, reason: impl std::fmt::Display) {
        self.count += 1;
        self.last = Some(reason.to_string());
    }
}

/// What an activated device works with: guest memory, its queues and its
/// interrupt. Shared by the device models so that activation is checked the
/// same way everywhere.
pub(crate) struct Active {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queues: Vec<Queue>,
    pub(crate) irq: Interrupt,
}

impl Active {
    /// Activates `slot` with `queues`, refusing a second activation or a
    /// queue count other than `expected`.
    pub(crate) fn install(
        slot: &mut Option<Active>,
        expected: usize,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Interrupt,
    ) -> Result<(), Error> {
        if slot.is_some() {
            return Err(Error::AlreadyActivated);
        }
        if queues.len() != expected {
            return Err(Error::QueueCount {
                expected,
                actual: queues.len(),
            });
        }
        *slot = Some(Active { mem, queues, irq });
        Ok(())
    }
}

/// Copies `data.len()` bytes at `offset` out of a configuration space, zero-filling whatever lies
/// outside of it.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.set_needs_reset();
        irq.set_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }
}
