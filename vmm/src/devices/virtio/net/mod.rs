//! virtio-net (device id 1) with a tap backend: one RX and one TX queue, a
//! MAC in the config space, the link status, checksum and TCP segmentation
//! offloads both ways and mergeable RX buffers.
//!
//! It owns the two queues and the frames on them: TX chains are checked
//! (bounded to [`MAX_PACKET_LEN`], header sane for what was negotiated)
//! and written to the tap with one `writev` straight from guest memory;
//! frames read from the tap are copied into the guest's RX buffers. The tap
//! itself is [`tap`]'s, the header rules [`header`]'s, the saved state
//! [`persist`]'s. It must not trust the guest: a malformed chain is
//! returned with length 0 and counted ([`VirtioDevice::rejected`]), never
//! a panic; and it must not let a guest that posts no RX buffers make the
//! event loop spin.
//!
//! # Offloads, and why these
//!
//! Offered: `VIRTIO_NET_F_CSUM` and `HOST_TSO4/6` (+ `HOST_ECN`): the guest
//! may send partial checksums and TCP segments of up to 64 KiB, which the
//! tap (`virtio_net_hdr_to_skb`) finishes or segments in the host, for no
//! work here but passing the header on. `GUEST_CSUM` and `GUEST_TSO4/6`
//! (+ `GUEST_ECN`): the tap may hand over the same ([`Tap::set_offload`],
//! set from what the driver accepted), so host-to-guest TCP moves in
//! 64 KiB frames too. `MRG_RXBUF` is what makes the latter practical:
//! without it Linux posts a 64 KiB buffer (17 descriptors) per RX slot to
//! be ready for the largest frame; with it, it posts page-sized buffers and
//! the device spreads a large frame over as many as it needs
//! (`num_buffers`). Not offered: UFO/USO (Linux dropped UFO; USO needs a
//! 6.2 tap), the control queue, multiqueue, MTU and announce, none of which
//! a microVM behind a per-VM tap needs.
//!
//! # RX flow control
//!
//! The event loop polls [`VirtioDevice::extra_fds`] level-triggered. The
//! device does not give it the tap but a private epoll set holding the tap
//! (an epoll descriptor is readable while a descriptor in its set is): when
//! the guest has no RX buffer for the frame in hand, the device keeps that
//! frame, takes the tap out of its set (so the loop stops waking up),
//! asks the driver for a notification (`avail_event`), and puts the tap
//! back once the driver posted buffers and the frame went in. A tap that
//! fails (its interface deleted) is dropped and the link reported down.
//!
//! # Disconnected
//!
//! A device without a tap (a clone restored without `--tap-fd` from a
//! master that had one) keeps its config and queues, so the guest's driver
//! stays valid: its link is down, TX frames are consumed and dropped,
//! nothing is received.
//!
//! # System calls
//!
//! On the event-loop thread: `read` and `writev` on the tap, `epoll_ctl` on
//! the private epoll set, `ioctl(TUNSETOFFLOAD)` after each activation,
//! `write` on the interrupt eventfd. Nothing new on vCPU threads: an
//! activation there only records that the offloads must be set.

pub mod header;
pub mod persist;
mod ring;
pub mod tap;

use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::EventSet;
use proto::launch::MacAddr;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use self::header::{check_tx, fix_rx, HeaderError, VnetHdr, ETH_HLEN, VNET_HDR_LEN};
use self::tap::Tap;
use super::chain::{self, ChainBuffers, DescriptorError, Direction};
use super::persist::DeviceModelState;
use super::{
    read_config_bytes, warn_limited, Active, Error, Interrupt, Rejected, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::persist::Persist;

pub use self::header::{MAX_FRAME_LEN, MAX_PACKET_LEN};

/// Virtio device type id of the network device.
pub const TYPE_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive (device → driver) queue.
pub const RXQ: usize = 0;
/// Index of the transmit (driver → device) queue.
pub const TXQ: usize = 1;
/// The MAC of a device booted without one (`--mac`): a locally
/// administered unicast address, the same in every such VM. Give each VM
/// that shares a network its own.
pub const DEFAULT_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
/// Frames moved from the tap per wake-up at most, so that one busy tap
/// does not starve the other devices on the event loop (the tap stays
/// readable, the loop comes back).
pub const RX_BATCH: usize = 64;
/// Most pieces a TX frame may be gathered from (`UIO_MAXIOV`, minus the
/// header's).
const MAX_TX_PIECES: usize = 1023;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

/// Why the device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A group address cannot be a NIC's.
    #[error("{0} is a multicast MAC address; a NIC needs a unicast one (first byte even)")]
    MulticastMac(MacAddr),
    /// The private epoll set for the tap could not be created.
    #[error("cannot create the epoll set that watches the tap")]
    Epoll(#[source] io::Error),
}

/// What the device moved and dropped, since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Their bytes (frames only, without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the tap that were dropped: too large for the guest's
    /// buffers, or with offloads the driver did not accept.
    pub rx_dropped: u64,
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Their bytes (frames only).
    pub tx_bytes: u64,
    /// Well-formed frames the guest sent that went nowhere: no tap
    /// (disconnected), or the tap's write failed.
    pub tx_dropped: u64,
}

/// `Vec<libc::iovec>` that may move between threads: it holds pointers
/// into guest memory only during one `process_tx` call and is emptied
/// before the call returns.
#[derive(Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the vector is empty outside `Net::process_tx` (cleared after each
// frame), and the device is only used under the transport's mutex; the
// pointers it briefly holds point into guest memory the device keeps
// mapped (its `Active::mem`) for that call.
unsafe impl Send for IoVecs {}

/// The virtio-net device model.
pub struct Net {
    mac: MacAddr,
    acked_features: u64,
    tap: Option<Tap>,
    /// The epoll set the event loop polls instead of the tap; it holds the
    /// tap while `tap_armed`. Present iff the device was created with a tap.
    rx_poll: Option<Epoll>,
    tap_armed: bool,
    /// Activated, but the offloads and the tap's polling not yet set up
    /// (done on the event-loop thread, not the vCPU thread that activated).
    setup_pending: bool,
    active: Option<Active>,
    /// One frame read from the tap (header + frame), up to one byte more
    /// than [`MAX_PACKET_LEN`] to see frames that are too large.
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` not yet given to the guest.
    rx_pending: Option<usize>,
    rx_held: Vec<(u16, ChainBuffers)>,
    rx_used: Vec<(u16, u32)>,
    tx_iov: IoVecs,
    /// The link status the restored guest last saw (see `restored`).
    restored_link_up: Option<bool>,
    rejected: Rejected,
    counters: NetCounters,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("tap", &self.tap.as_ref().map(Tap::name))
            .field("activated", &self.active.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// The tap offloads (`TUN_F_*`) that match the features the driver
/// accepted: what the tap may then hand over, the driver can take.
pub fn tap_offload(acked: u64) -> libc::c_uint {
    let mut flags = 0;
    if has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(acked, VIRTIO_NET_F_GUEST_ECN)
        {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

impl Net {
    /// Creates the device with `mac`, backed by `tap` (none: disconnected).
    pub fn new(mac: MacAddr, tap: Option<Tap>) -> Result<Self, NetError> {
        if !mac.is_unicast() {
            return Err(NetError::MulticastMac(mac));
        }
        let rx_poll = match &tap {
            Some(_) => Some(Epoll::new().map_err(NetError::Epoll)?),
            None => None,
        };
        Ok(Net {
            mac,
            acked_features: 0,
            tap,
            rx_poll,
            tap_armed: false,
            setup_pending: false,
            active: None,
            rx_buf: vec![0; MAX_PACKET_LEN + 1],
            rx_pending: None,
            rx_held: Vec::new(),
            rx_used: Vec::new(),
            tx_iov: IoVecs::default(),
            restored_link_up: None,
            rejected: Rejected::default(),
            counters: NetCounters::default(),
        })
    }

    /// The device's MAC (what the guest reads from the config space).
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Whether a tap is attached (the link status the guest sees).
    pub fn link_up(&self) -> bool {
        self.tap.is_some()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// What the device moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac.0);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..].copy_from_slice(&status.to_le_bytes());
        c
    }

    /// Puts the tap into, or takes it out of, the epoll set the event loop
    /// polls.
    fn set_armed(&mut self, armed: bool) {
        let (Some(tap), Some(poll)) = (&self.tap, &self.rx_poll) else {
            return;
        };
        if self.tap_armed == armed {
            return;
        }
        let (op, what) = if armed {
            (ControlOperation::Add, "watch")
        } else {
            (ControlOperation::Delete, "stop watching")
        };
        let event = EpollEvent::new(vmm_sys_util::epoll::EventSet::IN, 0);
        match poll.ctl(op, tap.as_raw_fd(), event) {
            Ok(()) => self.tap_armed = armed,
            Err(e) => warn_limited!("net: cannot {what} tap {}: {e}", tap.name()),
        }
    }

    /// What an activation leaves to the event-loop thread: the tap's
    /// offloads for the features the driver accepted, and its polling.
    fn finish_setup(&mut self) {
        if !self.setup_pending || self.active.is_none() {
            return;
        }
        self.setup_pending = false;
        if let Some(tap) = &self.tap {
            let flags = tap_offload(self.acked_features);
            if let Err(e) = tap.set_offload(flags) {
                // The tap then hands over plain frames only: still correct.
                warn_limited!("net: tap {} refused offloads {flags:#x}: {e}", tap.name());
            }
        }
        self.set_armed(true);
    }

    /// The tap failed for good (its interface is gone): drop it, report the
    /// link down.
    fn disconnect(&mut self, e: &io::Error) {
        if let Some(tap) = &self.tap {
            warn_limited!(
                "net: tap {} failed, the link is down from now on: {e}",
                tap.name()
            );
        }
        self.set_armed(false);
        self.tap = None;
        self.rx_pending = None;
        if let Some(a) = &self.active {
            a.irq.signal_config_change();
        }
    }

    fn process_tx(&mut self) {
        let Net {
            active,
            tap,
            tx_iov,
            rejected,
            counters,
            acked_features,
            ..
        } = self;
        let Some(Active { mem, queues, irq }) = active.as_mut() else {
            return;
        };
        let txq = &mut queues[TXQ];
        let mut used_any = false;
        let mut tap_failed = None;
        let mut idle_rounds = 0;
        loop {
            let mut popped = false;
            while let Some(p) = chain::try_pop_chain(txq, mem, irq).ok().flatten() {
                popped = true;
                let head = p.head_index();
                let sent = match p.direct() {
                    Ok(c) => send_tx_chain(c, mem, tap.as_ref(), &mut tx_iov.0, *acked_features),
                    Err(e) => Err(TxError::Descriptor(e)),
                };
                tx_iov.0.clear();
                match sent {
                    Ok(Some(len)) => {
                        counters.tx_frames += 1;
                        counters.tx_bytes += len as u64;
                    }
                    Ok(None) => counters.tx_dropped += 1,
                    Err(TxError::Tap(e)) if e.raw_os_error() == Some(libc::EBADFD) => {
                        counters.tx_dropped += 1;
                        tap_failed = Some(e);
                    }
                    Err(TxError::Tap(e)) if e.raw_os_error() != Some(libc::EINVAL) => {
                        warn_limited!("net: writing a frame to the tap failed: {e}");
                        counters.tx_dropped += 1;
                    }
                    Err(e) => {
                        warn_limited!("net: dropping a malformed TX frame: {e}");
                        rejected.record(format_args!("TX: {e}"));
                    }
                }
                if !chain::add_used(txq, mem, head, 0, irq) {
                    break;
                }
                used_any = true;
                if tap_failed.is_some() {
                    break;
                }
            }
            idle_rounds = if popped { 0 } else { idle_rounds + 1 };
            if tap_failed.is_some()
                || irq.needs_reset()
                || idle_rounds > 1
                || !chain::enable_notification(txq, mem, irq)
            {
                break;
            }
        }
        if used_any {
            chain::notify_used(txq, mem, irq);
        }
        if let Some(e) = tap_failed {
            self.disconnect(&e);
            // What the guest queued meanwhile is consumed (and dropped).
            self.process_tx();
        }
    }

    /// Reads frames from the tap into the guest's RX buffers until the tap
    /// is empty, the guest has no buffer for the next frame, or
    /// [`RX_BATCH`] frames went in.
    fn process_rx(&mut self) {
        let Net {
            active,
            tap,
            rx_buf,
            rx_pending,
            rx_held,
            rx_used,
            rejected,
            counters,
            acked_features,
            ..
        } = self;
        let (Some(Active { mem, queues, irq }), Some(tap)) = (active.as_mut(), tap.as_ref()) else {
            return;
        };
        let rxq = &mut queues[RXQ];
        let start = Wrapping(rxq.next_used());
        let mergeable = has(*acked_features, VIRTIO_NET_F_MRG_RXBUF);
        let mut frames = 0;
        let stop = loop {
            if irq.needs_reset() {
                break RxStop::Broken;
            }
            let n = match *rx_pending {
                Some(n) => n,
                None => {
                    if frames == RX_BATCH {
                        break RxStop::Batch;
                    }
                    match read_frame(tap, rx_buf, *acked_features) {
                        Ok(Some(n)) => {
                            *rx_pending = Some(n);
                            n
                        }
                        Ok(None) => {
                            counters.rx_dropped += 1;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxStop::Drained,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => break RxStop::TapFailed(e),
                    }
                }
            };
            let mut rx = RxRing {
                queue: rxq,
                mem,
                irq,
                held: &mut *rx_held,
                used: &mut *rx_used,
                rejected: &mut *rejected,
            };
            let delivered = if mergeable {
                rx.deliver_merged(&mut rx_buf[..n])
            } else {
                rx.deliver_single(&rx_buf[..n])
            };
            match delivered {
                Delivery::Delivered => {
                    counters.rx_frames += 1;
                    counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
                    *rx_pending = None;
                    frames += 1;
                }
                Delivery::TooLarge => {
                    counters.rx_dropped += 1;
                    *rx_pending = None;
                }
                Delivery::NoBuffers => {
                    if irq.needs_reset() || !ring::ask_for_buffers(rxq, mem, irq) {
                        break RxStop::NoBuffers;
                    }
                }
            }
        };
        ring::notify_since(rxq, mem, irq, start);
        match stop {
            RxStop::Drained | RxStop::Batch => self.set_armed(true),
            RxStop::NoBuffers | RxStop::Broken => self.set_armed(false),
            RxStop::TapFailed(e) => self.disconnect(&e),
        }
    }
}

/// Why `process_rx` stopped.
enum RxStop {
    /// The tap has nothing more.
    Drained,
    /// [`RX_BATCH`] frames went in; the tap may have more.
    Batch,
    /// The guest has no buffer for the frame in hand.
    NoBuffers,
    /// The rings are unusable until the driver resets the device.
    Broken,
    /// The tap failed.
    TapFailed(io::Error),
}

/// Reads one frame from the tap into `buf` and fixes its header for the
/// driver. `Ok(None)`: a frame was read and must be dropped.
fn read_frame(tap: &Tap, buf: &mut [u8], acked: u64) -> io::Result<Option<usize>> {
    let n = tap.read(buf)?;
    if n == 0 {
        // A tap never does; a closed socket standing in for one does.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the tap returned end of file",
        ));
    }
    if !(VNET_HDR_LEN + ETH_HLEN..=MAX_PACKET_LEN).contains(&n) {
        warn_limited!("net: dropping a {n}-byte frame from the tap");
        return Ok(None);
    }
    let mut raw = [0u8; VNET_HDR_LEN];
    raw.copy_from_slice(&buf[..VNET_HDR_LEN]);
    let mut hdr = VnetHdr::from_bytes(&raw);
    if let Err(e) = fix_rx(&mut hdr, acked, 1) {
        warn_limited!("net: dropping a frame from the tap: {e}");
        return Ok(None);
    }
    buf[..VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes());
    Ok(Some(n))
}

/// What became of the frame in hand.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// It cannot fit a buffer of this driver (without mergeable buffers):
    /// dropped, the buffer stays available.
    TooLarge,
    /// Not enough buffers now: the frame stays in hand, the buffers the
    /// device looked at stay available.
    NoBuffers,
}

/// The RX queue while one frame goes in.
struct RxRing<'a> {
    queue: &'a mut Queue,
    mem: &'a GuestMemoryMmap,
    irq: &'a Interrupt,
    held: &'a mut Vec<(u16, ChainBuffers)>,
    used: &'a mut Vec<(u16, u32)>,
    rejected: &'a mut Rejected,
}

/// The next RX buffer of the driver.
enum Next {
    /// A buffer that can take (part of) a frame.
    Buffer(u16, ChainBuffers),
    /// A malformed buffer (counted), to be returned with length 0.
    Malformed(u16),
    /// No more buffers (or a broken ring).
    Empty,
}

impl RxRing<'_> {
    /// Pops the next RX buffer and checks it.
    fn next_buffer(&mut self) -> Next {
        let Some(p) = chain::try_pop_chain(self.queue, self.mem, self.irq)
            .ok()
            .flatten()
        else {
            return Next::Empty;
        };
        let head = p.head_index();
        let reason = match p.buffers(Direction::DeviceWritable) {
            Ok(b) if b.len() >= VNET_HDR_LEN => return Next::Buffer(head, b),
            Ok(b) => format!("an RX buffer of {} bytes cannot hold the header", b.len()),
            Err(e) => format!("a malformed RX buffer: {e}"),
        };
        warn_limited!("net: returning {reason}");
        self.rejected.record(format_args!("RX: {reason}"));
        Next::Malformed(head)
    }

    /// Returns `heads` to the driver unused (length 0).
    fn give_back(&mut self, heads: impl IntoIterator<Item = u16>) -> bool {
        self.used.clear();
        self.used.extend(heads.into_iter().map(|h| (h, 0)));
        ring::publish(self.queue, self.mem, self.used, self.irq)
    }

    /// Without mergeable buffers: the whole frame in one buffer.
    fn deliver_single(&mut self, frame: &[u8]) -> Delivery {
        let (head, bufs) = loop {
            match self.next_buffer() {
                Next::Buffer(head, bufs) => break (head, bufs),
                Next::Malformed(head) => {
                    if !self.give_back([head]) {
                        return Delivery::NoBuffers;
                    }
                }
                Next::Empty => return Delivery::NoBuffers,
            }
        };
        if bufs.len() < frame.len() {
            warn_limited!(
                "net: dropping a {}-byte frame: the guest's RX buffers hold {} bytes",
                frame.len(),
                bufs.len()
            );
            self.queue.go_to_previous_position();
            return Delivery::TooLarge;
        }
        let len = match bufs.write_at(self.mem, 0, frame) {
            Ok(n) => n as u32,
            Err(e) => {
                warn_limited!("net: writing an RX frame failed: {e}");
                0
            }
        };
        ring::publish(self.queue, self.mem, &[(head, len)], self.irq);
        Delivery::Delivered
    }

    /// With mergeable buffers: as many buffers as the frame needs, their
    /// count in the header, all published at once.
    fn deliver_merged(&mut self, frame: &mut [u8]) -> Delivery {
        self.held.clear();
        let mut room = 0usize;
        while room < frame.len() {
            if self.held.len() >= usize::from(self.queue.size()) {
                // Every buffer the ring can hold would not do: it never fits.
                warn_limited!(
                    "net: dropping a {}-byte frame: a full RX ring holds {room} bytes",
                    frame.len()
                );
                self.roll_back();
                return Delivery::TooLarge;
            }
            match self.next_buffer() {
                Next::Buffer(head, bufs) => {
                    room += bufs.len();
                    self.held.push((head, bufs));
                }
                Next::Malformed(head) => {
                    // The buffers held so far cannot be rolled back past
                    // this one, which goes back to the driver: they go back
                    // with it, unused, and the frame starts over.
                    let held: Vec<u16> = self.held.drain(..).map(|(h, _)| h).collect();
                    room = 0;
                    if !self.give_back(held.into_iter().chain([head])) {
                        return Delivery::NoBuffers;
                    }
                }
                Next::Empty => {
                    self.roll_back();
                    return Delivery::NoBuffers;
                }
            }
        }
        // At most a queue's worth of buffers.
        let count = self.held.len() as u16;
        frame[10..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
        self.used.clear();
        let mut offset = 0;
        for (head, bufs) in self.held.drain(..) {
            let chunk = bufs.len().min(frame.len() - offset);
            let len = match bufs.write_at(self.mem, 0, &frame[offset..offset + chunk]) {
                Ok(n) => n as u32,
                Err(e) => {
                    warn_limited!("net: writing an RX frame failed: {e}");
                    0
                }
            };
            self.used.push((head, len));
            offset += chunk;
        }
        ring::publish(self.queue, self.mem, self.used, self.irq);
        Delivery::Delivered
    }

    /// Makes the buffers held (the last ones popped) available again.
    fn roll_back(&mut self) {
        for _ in 0..self.held.len() {
            self.queue.go_to_previous_position();
        }
        self.held.clear();
    }
}

/// Why a TX chain was not written.
#[derive(Debug, thiserror::Error)]
enum TxError {
    /// The chain itself is malformed.
    #[error(transparent)]
    Descriptor(#[from] DescriptorError),
    /// Longer than a header and the largest frame.
    #[error("the chain holds more than {MAX_PACKET_LEN} bytes")]
    TooLong,
    /// Gathered from too many pieces for one `writev`.
    #[error("the frame is spread over more than {MAX_TX_PIECES} pieces")]
    TooManyPieces,
    /// Shorter than a header and an Ethernet header.
    #[error("the chain holds {0} bytes, less than a header and an Ethernet header")]
    TooShort(usize),
    /// A header that was not negotiated.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The tap refused or failed the write.
    #[error("the tap refused the frame")]
    Tap(#[source] io::Error),
}

/// Checks one TX chain and writes its frame to `tap` (none: drops it).
/// Returns the frame's length if it was written, `None` if dropped.
/// `iov` is scratch space, left filled.
fn send_tx_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    tap: Option<&Tap>,
    iov: &mut Vec<libc::iovec>,
    acked: u64,
) -> Result<Option<usize>, TxError> {
    let mut raw = [0u8; VNET_HDR_LEN];
    // Slot 0: the header, from the copy checked here (the guest may change
    // its own meanwhile).
    iov.clear();
    iov.push(libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    });
    let len = gather_tx(chain, mem, &mut raw, iov)?;
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(TxError::TooShort(len));
    }
    let frame_len = len - VNET_HDR_LEN;
    let mut hdr = VnetHdr::from_bytes(&raw);
    check_tx(&hdr, frame_len, acked)?;
    // "The device MUST ignore num_buffers" on TX; the tap gets zero.
    hdr.num_buffers = 0;
    let raw = hdr.to_bytes();
    let Some(tap) = tap else {
        return Ok(None);
    };
    iov[0] = libc::iovec {
        iov_base: raw.as_ptr() as *mut libc::c_void,
        iov_len: VNET_HDR_LEN,
    };
    // SAFETY: iov[0] points to `raw`, alive until the end of this function;
    // every other iovec is a piece of guest memory that `gather_tx` took
    // from `mem.get_slices` (inside a mapped region), and `mem` keeps its
    // regions mapped for as long as it lives, which outlasts this call.
    let written = unsafe { tap.writev(iov) }.map_err(TxError::Tap)?;
    if written != len {
        // The tap takes a frame whole or not at all.
        warn_limited!("net: the tap took {written} of {len} bytes");
    }
    Ok(Some(frame_len))
}

/// Walks a TX chain: copies its first [`VNET_HDR_LEN`] bytes into `hdr`
/// and appends iovecs for the rest (the frame) to `iov`. Returns the
/// chain's length. Checks what `ChainBuffers::from_chain` checks
/// (device-readable only, inside guest memory, not truncated) and bounds
/// the length and the number of pieces.
fn gather_tx(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    hdr: &mut [u8; VNET_HDR_LEN],
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, TxError> {
    let mut total = 0usize;
    let mut got = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(DescriptorError::UnexpectedWritable.into());
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        let out_of_bounds = || DescriptorError::OutOfBounds {
            addr: desc.addr().0,
            len: desc.len(),
        };
        total += len;
        if total > MAX_PACKET_LEN {
            return Err(TxError::TooLong);
        }
        let mut addr = desc.addr();
        let mut rest = len;
        if got < VNET_HDR_LEN {
            let take = rest.min(VNET_HDR_LEN - got);
            mem.read_slice(&mut hdr[got..got + take], addr)
                .map_err(|_| out_of_bounds())?;
            got += take;
            rest -= take;
            addr = addr.checked_add(take as u64).ok_or_else(out_of_bounds)?;
        }
        if rest == 0 {
            continue;
        }
        let slices = mem
            .get_slices(addr, rest, Permissions::Read)
            .map_err(|_| out_of_bounds())?;
        for slice in slices {
            let slice = slice.map_err(|_| out_of_bounds())?;
            if iov.len() > MAX_TX_PIECES {
                return Err(TxError::TooManyPieces);
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    if count == 0 {
        return Err(DescriptorError::Empty.into());
    }
    if last_has_next {
        return Err(DescriptorError::Truncated.into());
    }
    Ok(total)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ]
        .iter()
        .fold(0, |f, &bit| f | (1u64 << bit))
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // With VIRTIO_F_VERSION_1 the MAC is read-only; Linux changes its
        // interface's address without telling the device.
        warn_limited!("net: guest wrote to the read-only config space");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        Active::install(&mut self.active, QUEUE_SIZES.len(), mem, queues, interrupt)?;
        self.setup_pending = true;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        // The tap leaves the epoll set on the event-loop thread, the next
        // time it is readable (`process_extra_fd`).
        self.active = None;
        self.acked_features = 0;
        self.setup_pending = false;
        self.rx_pending = None;
    }

    fn process_queue(&mut self, index: usize) {
        self.finish_setup();
        match index {
            // The driver posted RX buffers after the device asked for them.
            RXQ => self.process_rx(),
            TXQ => self.process_tx(),
            _ => {}
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        self.rx_poll.iter().map(|p| p.as_raw_fd()).collect()
    }

    fn process_extra_fd(&mut self, _index: usize, _events: EventSet) {
        if self.active.is_none() {
            self.set_armed(false);
            return;
        }
        self.finish_setup();
        self.process_rx();
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues[..])
    }

    fn restored(&mut self) {
        self.finish_setup();
        if let (Some(saved), Some(a)) = (self.restored_link_up.take(), &self.active) {
            if saved != self.link_up() {
                a.irq.signal_config_change();
            }
        }
    }

    fn save_model(&self) -> DeviceModelState {
        DeviceModelState::Net(self.save())
    }

    fn rejected(&self) -> Rejected {
        self.rejected.clone()
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
