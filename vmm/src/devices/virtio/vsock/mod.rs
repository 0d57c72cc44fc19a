//! virtio-vsock with a Unix-socket host side (Firecracker convention).
//!
//! Host-initiated connections only: a host process connects to the Unix socket given to
//! [`Vsock::new`] and writes `CONNECT <guest port>\n`. The device sends the guest an
//! `OP_REQUEST` from host CID 2 and a freshly allocated host port; when the guest answers
//! `OP_RESPONSE`, `OK <host port>\n` is written to the Unix stream, after which bytes flow both
//! ways unchanged. If nothing listens on the guest port (`OP_RST`), the Unix stream is closed.
//!
//! Not supported (yet): guest-initiated connections (a guest `OP_REQUEST` is answered with
//! `OP_RST`, so `connect()` in the guest fails) and `SEQPACKET` sockets (the feature is not
//! offered).
//!
//! After a snapshot restore the master's idle connections are carried: the first host
//! `CONNECT` to such a connection's guest port takes it over, answered `OK <host port>
//! carried\n` with no packet to the guest, and the master's other connections are reset one by
//! one (see [`persist`]). With `--vsock-reset`, or a snapshot that does not list its
//! connections, the event queue instead carries its one event,
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`; new host connections then wait until the guest has
//! handled it (it hands the event buffer back, which notifies the event queue) or
//! [`RESET_GRACE`] passed. The steps of a restored device to its first guest data are recorded
//! for the events stream ([`VirtioDevice::take_phases`]).
//!
//! The device's snapshot state (its guest CID and connections) is in [`persist`]. It must not trust a packet
//! the guest sends: lengths, CIDs and the socket type are checked before anything is copied.
//! Whatever it refuses from the guest (malformed chains and headers, protocol violations,
//! corrupted rings) is counted ([`VirtioDevice::rejected`]).

mod connection;
mod muxer;
pub mod packet;
pub mod persist;

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use event_manager::EventSet;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::timerfd::TimerFd;

use self::muxer::{Muxer, Refusal};
use self::packet::{
    VsockHeader, HDR_SIZE, HOST_CID, MAX_PKT_PAYLOAD, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM,
};
use self::persist::SavedConnection;
use super::chain::{self, ChainBuffers, DescriptorError, Direction, RingError};
use super::persist::DeviceModelState;
use super::Active;
use super::{
    read_config_bytes, warn_limited, Error, Interrupt, Rejected, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};
use crate::persist::Persist;
use proto::events::DevicePhase;

pub use self::connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use self::muxer::MAX_CONNECTIONS;

/// Largest size of the transmit queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest size of the receive queue. Linux fills the whole RX queue with
/// 4 KiB buffers when it probes the device; at 256 that probe cost ~0.85 s
/// of emulated boot on hosts that emulate the guest kernel, at 64 a quarter
/// of it. Linux 6.1 uses two descriptors per buffer, so 64 entries are 32
/// buffers (128 KiB): less than a connection's 256 KiB of credit, so bulk
/// host-to-guest data waits for the guest to return buffers, never more.
pub const RX_QUEUE_SIZE: u16 = 64;
/// Longest wait, after a restore, for the guest to handle the transport
/// reset before host connections go through anyway.
pub const RESET_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// While the guest has not acknowledged an interrupt (or, after a restore,
/// not handled the transport reset), the device raises it again this often:
/// an edge-triggered interrupt that reaches a guest not ready for it is
/// otherwise lost, and the guest would never look at its queues again.
pub const RESET_NUDGE: std::time::Duration = std::time::Duration::from_millis(50);
/// Ticks of [`RESET_NUDGE`] between raising the interrupt again while the
/// guest has not handled a transport reset.
const RESET_RERAISE_TICKS: u32 = 4;
/// Ticks of [`RESET_NUDGE`] an interrupt may stay unacknowledged before it
/// is taken for lost and raised again.
const LOST_IRQ_TICKS: u32 = 10;
/// Largest size of the event queue (Linux posts 8 event buffers).
pub const EVENT_QUEUE_SIZE: u16 = 16;
/// Index of the receive (device → driver) queue.
pub const RXQ: usize = 0;
/// Index of the transmit (driver → device) queue.
pub const TXQ: usize = 1;
/// Index of the event queue.
pub const EVQ: usize = 2;

const QUEUE_SIZES: [u16; 3] = [RX_QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE];

/// The virtio-vsock device model (device id 19; queues rx, tx, event).
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    muxer: Muxer,
    active: Option<Active>,
    scratch: Vec<u8>,
    /// Ticks while an interrupt is unacknowledged or the guest's transport
    /// reset is awaited (see [`RESET_NUDGE`], [`RESET_GRACE`]).
    reset_timer: TimerFd,
    /// Whether `reset_timer` ticks.
    nudging: bool,
    /// Ticks the interrupt has stayed unacknowledged.
    pending_ticks: u32,
    /// When that wait ends at the latest.
    reset_deadline: Option<std::time::Instant>,
    /// What the device refused from the guest.
    rejected: Rejected,
    /// The master's connections, from the snapshot, until
    /// [`VirtioDevice::restored`] takes them (`None`: reset the transport).
    saved: Option<Vec<SavedConnection>>,
    /// Steps recorded for the events stream.
    trace: Trace,
}

/// Most steps kept for the events stream between two reports.
const MAX_STEPS: usize = 64;

/// What a restored device records on the way to the first answer (see
/// [`DevicePhase`]): the steps until the first guest data, and interrupts
/// raised again whenever.
#[derive(Debug, Default)]
struct Trace {
    /// Whether steps are recorded.
    on: bool,
    steps: Vec<(DevicePhase, u64)>,
    /// The interrupt count last seen.
    irqs: u64,
    /// Whether host data reached the guest yet.
    rx_seen: bool,
    /// The muxer's count of carried connections taken over, last seen.
    claims: u64,
}

impl Trace {
    /// Records `phase` if steps are recorded.
    fn note(&mut self, phase: DevicePhase) {
        if self.on {
            self.always(phase);
        }
    }

    /// Records `phase` (bounded: the oldest steps stay).
    fn always(&mut self, phase: DevicePhase) {
        if self.steps.len() < MAX_STEPS {
            self.steps.push((phase, proto::events::now_us()));
        }
    }
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("activated", &self.active.is_some())
            .field("connections", &self.muxer.connection_count())
            .finish()
    }
}

impl Vsock {
    /// Creates the device and binds a non-blocking Unix listener at `uds_path` (which must not
    /// exist; it is removed again when the device is dropped). `guest_cid` must be in
    /// `3..=0xffff_fffe`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        if !(3..=0xffff_fffe).contains(&guest_cid) {
            return Err(Error::InvalidCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            acked_features: 0,
            muxer: Muxer::new(guest_cid, uds_path)?,
            active: None,
            scratch: vec![0; MAX_PKT_PAYLOAD],
            reset_timer: TimerFd::new().map_err(|e| Error::EventFd(e.into()))?,
            reset_deadline: None,
            nudging: false,
            pending_ticks: 0,
            rejected: Rejected::default(),
            saved: None,
            trace: Trace::default(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of open host connections (any state).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Parses and dispatches one TX chain.
    fn handle_tx_chain(
        muxer: &mut Muxer,
        mem: &GuestMemoryMmap,
        scratch: &mut [u8],
        guest_cid: u64,
        bufs: &ChainBuffers,
    ) -> Result<u16, TxError> {
        let mut raw = [0u8; HDR_SIZE];
        if bufs.len() < HDR_SIZE {
            return Err(TxError::ShorterThanHeader(bufs.len()));
        }
        bufs.read_at(mem, 0, &mut raw)?;
        let hdr = VsockHeader::from_bytes(&raw);
        let len = hdr.len as usize;
        let room = bufs.len() - HDR_SIZE;
        if len > MAX_PKT_PAYLOAD || len > room {
            return Err(TxError::PayloadTooLong { len, room });
        }
        if hdr.src_cid != guest_cid || hdr.dst_cid != HOST_CID {
            return Err(TxError::Cids {
                src: hdr.src_cid,
                dst: hdr.dst_cid,
            });
        }
        if hdr.type_ != TYPE_STREAM {
            return Err(TxError::SocketType(hdr.type_));
        }
        let payload = &mut scratch[..len];
        if bufs.read_at(mem, HDR_SIZE, payload)? != len {
            return Err(TxError::ShortPayload);
        }
        muxer.handle_guest_packet(&hdr, payload)?;
        Ok(hdr.op)
    }

    fn process_tx(&mut self) {
        let Some(Active { mem, queues, irq }) = self.active.as_mut() else {
            return;
        };
        let txq = &mut queues[TXQ];
        let rejected = &mut self.rejected;
        let mut used_any = false;
        let mut idle_rounds = 0;
        'rounds: loop {
            let mut popped = false;
            loop {
                let c = match chain::try_pop_chain(txq, mem, irq) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(source) => {
                        Rejection::Ring {
                            queue: "TX",
                            source,
                        }
                        .count(rejected);
                        break 'rounds;
                    }
                };
                popped = true;
                let head = c.head_index();
                let res = c
                    .buffers(Direction::DeviceReadable)
                    .map_err(TxError::from)
                    .and_then(|bufs| {
                        Self::handle_tx_chain(
                            &mut self.muxer,
                            mem,
                            &mut self.scratch,
                            self.guest_cid,
                            &bufs,
                        )
                    });
                match res {
                    Ok(OP_RESPONSE) => self.trace.note(DevicePhase::ConnectionAccepted),
                    Ok(OP_RW) if self.trace.on => {
                        self.trace.note(DevicePhase::FirstTx);
                        self.trace.on = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn_limited!("vsock: dropping TX packet: {}", crate::error_chain(&e));
                        Rejection::Tx(e).count(rejected);
                    }
                }
                if let Err(source) = chain::try_add_used(txq, mem, head, 0, irq) {
                    Rejection::Ring {
                        queue: "TX",
                        source,
                    }
                    .count(rejected);
                    break 'rounds;
                }
                used_any = true;
            }
            idle_rounds = if popped { 0 } else { idle_rounds + 1 };
            if irq.needs_reset() || idle_rounds > 1 || !chain::enable_notification(txq, mem, irq) {
                break;
            }
        }
        if used_any {
            chain::notify_used(txq, mem, irq);
        }
    }

    /// Moves pending host → guest packets into RX buffers.
    fn process_rx(&mut self) {
        let Some(Active { mem, queues, irq }) = self.active.as_mut() else {
            return;
        };
        let rxq = &mut queues[RXQ];
        let rejected = &mut self.rejected;
        let mut used_any = false;
        let mut retries = 0;
        while self.muxer.has_rx() && !irq.needs_reset() {
            let c = match chain::try_pop_chain(rxq, mem, irq) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    // Out of RX buffers: ask the guest to tell us when it adds some. If it did
                    // in the meantime, go on.
                    if retries < 2 && chain::enable_notification(rxq, mem, irq) {
                        retries += 1;
                        continue;
                    }
                    break;
                }
                Err(source) => {
                    Rejection::Ring {
                        queue: "RX",
                        source,
                    }
                    .count(rejected);
                    break;
                }
            };
            retries = 0;
            let head = c.head_index();
            let refused = match c.buffers(Direction::DeviceWritable) {
                Ok(b) if b.len() >= HDR_SIZE => Ok(b),
                Ok(b) => Err(Rejection::RxTooSmall(b.len())),
                Err(e) => Err(Rejection::RxBuffer(e)),
            };
            let bufs = match refused {
                Ok(b) => b,
                Err(e) => {
                    warn_limited!("vsock: dropping RX buffer: {}", crate::error_chain(&e));
                    e.count(rejected);
                    match chain::try_add_used(rxq, mem, head, 0, irq) {
                        Ok(()) => used_any = true,
                        Err(source) => Rejection::Ring {
                            queue: "RX",
                            source,
                        }
                        .count(rejected),
                    }
                    continue;
                }
            };
            let max_payload = (bufs.len() - HDR_SIZE).min(MAX_PKT_PAYLOAD);
            let Some((hdr, n)) = self.muxer.next_rx(max_payload, &mut self.scratch) else {
                // Nothing to send after all: give the buffer back to the ring.
                rxq.go_to_previous_position();
                break;
            };
            match hdr.op {
                OP_REQUEST => self.trace.note(DevicePhase::ConnectionRequested),
                OP_RW if !self.trace.rx_seen => {
                    self.trace.rx_seen = true;
                    self.trace.note(DevicePhase::FirstRx);
                }
                _ => {}
            }
            let written = bufs
                .write_at(mem, 0, &hdr.to_bytes())
                .and_then(|_| bufs.write_at(mem, HDR_SIZE, &self.scratch[..n]));
            if let Err(e) = written {
                // Cannot happen for validated buffers; the packet is lost.
                warn_limited!("vsock: writing an RX packet failed: {e}");
            }
            match chain::try_add_used(rxq, mem, head, (HDR_SIZE + n) as u32, irq) {
                Ok(()) => used_any = true,
                Err(source) => Rejection::Ring {
                    queue: "RX",
                    source,
                }
                .count(rejected),
            }
        }
        if used_any {
            chain::notify_used(rxq, mem, irq);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        warn_limited!("vsock: guest wrote to the read-only config space");
        Rejection::ConfigWrite.count(&mut self.rejected);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        Active::install(&mut self.active, QUEUE_SIZES.len(), mem, queues, interrupt)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.muxer.reset();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RXQ => self.process_rx(),
            TXQ => {
                self.process_tx();
                self.process_rx();
            }
            // The guest handed an event buffer back: it has handled the
            // transport reset, new host connections can go through.
            EVQ => {
                if self.muxer.is_held() {
                    self.trace.note(DevicePhase::TransportResetAcked);
                }
                self.end_reset_wait()
            }
            _ => {}
        }
        self.watch_interrupt();
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.epoll_fd(), self.reset_timer.as_raw_fd()]
    }

    fn process_extra_fd(&mut self, index: usize, _events: EventSet) {
        if index == 1 {
            let _ = self.reset_timer.wait();
            self.nudge_tick();
            return;
        }
        self.muxer.process_host_events();
        if self.muxer.claims != self.trace.claims {
            self.trace.claims = self.muxer.claims;
            self.trace.note(DevicePhase::ConnectionCarried);
        }
        self.process_rx();
        self.watch_interrupt();
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues[..])
    }

    fn save_model(&self) -> DeviceModelState {
        DeviceModelState::Vsock(self.save())
    }

    fn rejected(&self) -> Rejected {
        self.rejected.clone()
    }

    fn take_phases(&mut self, out: &mut Vec<(DevicePhase, u64)>) {
        out.append(&mut self.trace.steps);
    }

    /// The master's idle connections are carried into the clone (the
    /// first host `CONNECT` to their guest port takes each over), the
    /// others are reset one by one. Without a list of them (`--vsock-reset`
    /// or an older snapshot) host connections do not survive: the guest
    /// is told with a transport reset event, so that it drops every
    /// connection (listening sockets stay) and re-reads the guest CID.
    fn restored(&mut self) {
        self.muxer.reset();
        self.muxer.randomize_ports();
        self.trace.on = true;
        self.trace.irqs = self.active.as_ref().map_or(0, |a| a.irq.raised());
        if let Some(saved) = self.saved.take() {
            if self.muxer.restore_connections(&saved) > 0 {
                self.trace.note(DevicePhase::StaleConnectionsReset);
                self.process_rx();
                self.watch_interrupt();
            }
            return;
        }
        let Some(Active { mem, queues, irq }) = self.active.as_mut() else {
            return;
        };
        let evq = &mut queues[EVQ];
        let rejected = &mut self.rejected;
        let c = match chain::try_pop_chain(evq, mem, irq) {
            Ok(Some(c)) => c,
            Ok(None) => {
                warn_limited!("vsock: no event buffer for the transport reset");
                return;
            }
            Err(source) => {
                Rejection::Ring {
                    queue: "event",
                    source,
                }
                .count(rejected);
                return;
            }
        };
        let head = c.head_index();
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let len = match c.buffers(Direction::DeviceWritable) {
            Ok(b) if b.len() >= event.len() => b.write_at(mem, 0, &event).unwrap_or(0),
            Ok(b) => {
                Rejection::EventTooSmall(b.len()).count(rejected);
                0
            }
            Err(e) => {
                Rejection::EventBuffer(e).count(rejected);
                0
            }
        };
        if let Err(source) = chain::try_add_used(evq, mem, head, len as u32, irq) {
            Rejection::Ring {
                queue: "event",
                source,
            }
            .count(rejected);
        }
        // Ask to be told when the guest hands the buffer back.
        chain::notify_on_next_avail(evq, mem, irq);
        irq.signal_used_queue();
        self.trace.note(DevicePhase::TransportResetPosted);
        self.muxer.hold(true);
        self.reset_deadline = Some(std::time::Instant::now() + RESET_GRACE);
        self.start_nudging();
    }
}

impl Vsock {
    fn start_nudging(&mut self) {
        if !self.nudging {
            let _ = self.reset_timer.reset(RESET_NUDGE, Some(RESET_NUDGE));
            self.nudging = true;
        }
    }

    /// Ticks while the guest owes an acknowledgement.
    fn watch_interrupt(&mut self) {
        if self.trace.on {
            let raised = self.active.as_ref().map_or(0, |a| a.irq.raised());
            if raised != self.trace.irqs {
                self.trace.irqs = raised;
                self.trace.note(DevicePhase::IrqRaised);
            }
        }
        let pending = self
            .active
            .as_ref()
            .is_some_and(|a| a.irq.status() & VIRTIO_MMIO_INT_VRING != 0);
        if pending {
            self.start_nudging();
        }
    }

    fn nudge_tick(&mut self) {
        let late = self
            .reset_deadline
            .is_none_or(|d| std::time::Instant::now() >= d);
        if self.muxer.is_held() && late {
            warn_limited!("vsock: the guest did not acknowledge the transport reset in time");
            self.trace.note(DevicePhase::TransportResetLate);
            self.end_reset_wait();
        }
        // Raising it again costs the guest an interrupt, which is dear on
        // hosts that emulate the guest kernel: only after a while, sooner
        // while a transport reset is awaited.
        let every = if self.muxer.is_held() {
            RESET_RERAISE_TICKS
        } else {
            LOST_IRQ_TICKS
        };
        let pending = match self.active.as_ref() {
            Some(a) if a.irq.status() & VIRTIO_MMIO_INT_VRING != 0 => {
                self.pending_ticks += 1;
                if self.pending_ticks.is_multiple_of(every) {
                    // The used buffers stay where they are.
                    a.irq.signal_used_queue();
                    self.trace.always(DevicePhase::IrqReraised);
                }
                true
            }
            _ => {
                self.pending_ticks = 0;
                false
            }
        };
        if !pending && !self.muxer.is_held() {
            let _ = self.reset_timer.clear();
            self.nudging = false;
        }
    }

    fn end_reset_wait(&mut self) {
        if self.muxer.is_held() {
            self.muxer.hold(false);
            self.reset_deadline = None;
            // Connections that waited in the backlog.
            self.muxer.process_host_events();
            self.process_rx();
        }
    }
}

/// What the device refuses from the guest (counted in [`Vsock::rejected`]).
#[derive(Debug, thiserror::Error)]
enum Rejection {
    /// A packet the guest sent, dropped (its buffer is returned).
    #[error("TX packet dropped")]
    Tx(#[source] TxError),
    /// A receive buffer whose descriptor chain is malformed: returned unused.
    #[error("RX buffer returned unused")]
    RxBuffer(#[source] DescriptorError),
    /// A receive buffer too small for a packet header: returned unused.
    #[error(
        "RX buffer of {0} bytes cannot hold a packet header ({HDR_SIZE} bytes): returned unused"
    )]
    RxTooSmall(usize),
    /// An event buffer whose descriptor chain is malformed.
    #[error("event buffer returned unused")]
    EventBuffer(#[source] DescriptorError),
    /// An event buffer too small for an event.
    #[error("event buffer of {0} bytes cannot hold an event (4 bytes): returned unused")]
    EventTooSmall(usize),
    /// A queue's rings are corrupted: the device needs a reset.
    #[error("{queue} queue unusable")]
    Ring {
        /// Which queue.
        queue: &'static str,
        /// What is wrong with it.
        #[source]
        source: RingError,
    },
    /// A write to the read-only configuration space: ignored.
    #[error("write to the read-only configuration space ignored")]
    ConfigWrite,
}

impl Rejection {
    /// Counts this refusal in `rejected`, with its causes.
    fn count(self, rejected: &mut Rejected) {
        rejected.record(crate::error_chain(&self));
    }
}

/// Why a packet the guest sent is dropped.
#[derive(Debug, thiserror::Error)]
enum TxError {
    /// The descriptor chain is malformed.
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// Too short for a header.
    #[error("packet of {0} bytes is shorter than the header")]
    ShorterThanHeader(usize),
    /// The header announces more payload than the chain holds (or than a
    /// packet may carry).
    #[error("payload length {len} exceeds the buffer ({room} bytes)")]
    PayloadTooLong {
        /// Announced payload length.
        len: usize,
        /// Bytes after the header.
        room: usize,
    },
    /// Not from this guest, or not to the host.
    #[error("bad CIDs {src} -> {dst}")]
    Cids {
        /// Source CID.
        src: u64,
        /// Destination CID.
        dst: u64,
    },
    /// Not a stream socket.
    #[error("unsupported socket type {0}")]
    SocketType(u16),
    /// Fewer payload bytes than announced could be read.
    #[error("short payload")]
    ShortPayload,
    /// The host side refused it (a protocol violation or an unsupported
    /// request).
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The only vsock event: the transport was reset (e.g. after a restore).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
