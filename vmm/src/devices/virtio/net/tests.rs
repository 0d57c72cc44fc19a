//! Tests of the virtio-net device: deterministic ones with a datagram
//! socket standing in for the tap (frames and headers both ways, mergeable
//! buffers, malformed chains, flow control without RX buffers, the
//! disconnected mode), and ones on a real tap in a private network
//! namespace of the test's own thread. Test code: it unwraps and asserts
//! freely.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4,
};
use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::test_utils::{desc, mem, DriverQueue, DESC_NEXT, DESC_WRITE};

/// `VIRTIO_F_VERSION_1`, which every driver accepts.
pub(super) const V1: u64 = 1 << VIRTIO_F_VERSION_1;
/// Mergeable RX buffers.
pub(super) const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
/// Where test buffers live in guest memory.
pub(super) const DATA: u64 = 0x10_0000;

/// A `SOCK_SEQPACKET` pair: one end as the device's "tap" (one frame per
/// read and per writev, like a tap), the other end the test's.
pub(super) fn socket_tap() -> (Tap, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array, which we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Tap::from_socket(a), b)
}

/// Sends one message on `fd`.
pub(super) fn send(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: the pointer and length describe `bytes`.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "send: {}",
        io::Error::last_os_error()
    );
}

/// Receives one message from `fd` without waiting.
pub(super) fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_PACKET_LEN + 100];
    // SAFETY: the pointer and length describe `buf`, writable.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "recv: {e}");
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// Whether `fd` is readable now.
pub(super) fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, no waiting.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    assert!(r >= 0);
    p.revents & libc::POLLIN != 0
}

/// An Ethernet frame of `len` bytes (broadcast, a local experimental
/// ethertype), its payload a pattern from `seed`.
pub(super) fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    f.truncate(len);
    f
}

/// A header followed by `frame`.
pub(super) fn packet(hdr: VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut p = hdr.to_bytes().to_vec();
    p.extend_from_slice(frame);
    p
}

/// A device activated on two queues of `size`, as a driver that accepted
/// `features` would leave it.
pub(super) struct Rig<'a> {
    pub(super) net: Net,
    pub(super) rx: DriverQueue<'a>,
    pub(super) tx: DriverQueue<'a>,
    pub(super) irq: Interrupt,
    pub(super) m: &'a GuestMemoryMmap,
}

pub(super) fn rig(
    m: &GuestMemoryMmap,
    features: u64,
    tap: Option<Tap>,
    size: u16,
    event_idx: bool,
) -> Rig<'_> {
    let rx = DriverQueue::new(m, 0x1_0000, size);
    let tx = DriverQueue::new(m, 0x2_0000, size);
    let irq = Interrupt::new().unwrap();
    let mut net = Net::new(MacAddr([2, 0, 0, 0, 0, 7]), tap).unwrap();
    net.ack_features(features);
    let (mut q0, mut q1) = (rx.create_queue(), tx.create_queue());
    q0.set_event_idx(event_idx);
    q1.set_event_idx(event_idx);
    net.activate(m.clone(), vec![q0, q1], irq.clone()).unwrap();
    // What the transport does after an activation: kick every queue.
    net.process_queue(RXQ);
    net.process_queue(TXQ);
    Rig {
        net,
        rx,
        tx,
        irq,
        m,
    }
}

impl Rig<'_> {
    /// Writes `bytes` in pieces of the given sizes into guest memory and
    /// makes them one TX chain.
    fn tx_chain(&mut self, bytes: &[u8], pieces: &[usize]) -> u16 {
        let mut bufs = Vec::new();
        let mut at = 0;
        for (i, &n) in pieces.iter().enumerate() {
            let addr = DATA + 0x2_0000 * i as u64;
            self.m
                .write_slice(&bytes[at..at + n], GuestAddress(addr))
                .unwrap();
            bufs.push((addr, n as u32, false));
            at += n;
        }
        assert_eq!(at, bytes.len(), "pieces cover the packet");
        self.tx.add_chain(&bufs)
    }

    /// Posts one RX buffer of `len` bytes at the `slot`-th 64 KiB of the
    /// RX area (in two descriptors when `split`).
    fn rx_buffer(&mut self, slot: u64, len: u32, split: bool) -> u16 {
        let addr = 0x80_0000 + 0x1_0000 * slot;
        if split {
            self.rx
                .add_chain(&[(addr, 5, true), (addr + 0x100, len - 5, true)])
        } else {
            self.rx.add_chain(&[(addr, len, true)])
        }
    }

    fn rx_bytes(&self, slot: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.m
            .read_slice(&mut out, GuestAddress(0x80_0000 + 0x1_0000 * slot))
            .unwrap();
        out
    }

    fn poll_fd(&self) -> RawFd {
        let fds = self.net.extra_fds();
        assert_eq!(fds.len(), 1);
        fds[0]
    }
}

#[test]
fn the_guest_sees_its_mac_the_link_and_the_offered_features() {
    let (tap, _peer) = socket_tap();
    let net = Net::new(MacAddr([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]), Some(tap)).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(
        cfg,
        [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 1, 0],
        "MAC, then LINK_UP"
    );
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 1);
    let f = net.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert!(has(f, bit), "feature {bit} offered");
    }
    // Control queue, multiqueue and UFO are not.
    for bit in [17, 22, 10, 14] {
        assert!(!has(f, bit), "feature {bit} not offered");
    }
    // A driver gets only what was offered.
    let mut net = net;
    net.ack_features(u64::MAX);
    assert_eq!(net.acked_features(), f);
    // The config space is read-only.
    net.write_config(0, &[0; 6]);
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[0..6], [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);

    // Without a tap: the link is down.
    let net = Net::new(DEFAULT_MAC, None).unwrap();
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0, 0, 0, 0, 1, 0, 0]);
    assert!(net.extra_fds().is_empty(), "nothing to poll");

    let e = Net::new(MacAddr([1, 0, 0x5e, 0, 0, 1]), None).unwrap_err();
    assert!(matches!(e, NetError::MulticastMac(_)), "{e}");
}

#[test]
fn offloads_follow_what_the_driver_accepted() {
    let bits = |b: &[u32]| b.iter().fold(0u64, |f, &x| f | 1 << x);
    assert_eq!(tap_offload(V1), 0);
    // Segmentation without checksum offload is not a thing.
    assert_eq!(tap_offload(bits(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
    assert_eq!(
        tap_offload(bits(&[VIRTIO_NET_F_GUEST_CSUM])),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offload(bits(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    // ECN alone means nothing; host-side features are not the tap's.
    assert_eq!(
        tap_offload(bits(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_CSUM
        ])),
        libc::TUN_F_CSUM
    );
}

#[test]
fn a_tx_frame_reaches_the_tap_whole_however_the_guest_split_it() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1 | (1 << VIRTIO_NET_F_CSUM), Some(tap), 16, false);
    let f = frame(1514, 3);
    let hdr = VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: 34,
        csum_offset: 6,
        num_buffers: 0x4242,
        ..Default::default()
    };
    // The header split over two descriptors, the frame over three.
    let head = r.tx_chain(&packet(hdr, &f), &[5, 7, 100, 1000, 414]);
    r.net.process_queue(TXQ);
    assert_eq!(r.tx.pop_used(), Some((head, 0)));
    assert_eq!(r.irq.eventfd().read().unwrap(), 1, "the guest is told");
    let got = recv(&peer).expect("a frame on the tap");
    let sent = VnetHdr {
        num_buffers: 0,
        ..hdr
    };
    assert_eq!(
        got,
        packet(sent, &f),
        "num_buffers is zeroed, the rest as is"
    );
    assert_eq!(recv(&peer), None, "one frame");
    let c = r.net.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (1, 1514, 0));
    assert_eq!(r.net.rejected().count, 0);

    // The largest packet goes through, in one descriptor.
    let big = frame(MAX_FRAME_LEN, 9);
    let head = r.tx_chain(&packet(VnetHdr::default(), &big), &[MAX_PACKET_LEN]);
    r.net.process_queue(TXQ);
    assert_eq!(r.tx.pop_used(), Some((head, 0)));
    assert_eq!(recv(&peer).unwrap().len(), MAX_PACKET_LEN);
}

#[test]
fn malformed_tx_chains_are_returned_counted_and_never_reach_the_tap() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1, Some(tap), 16, false);
    let ok = packet(VnetHdr::default(), &frame(60, 1));
    // Too short: a header and less than an Ethernet header.
    r.tx_chain(&ok[..VNET_HDR_LEN + 13], &[VNET_HDR_LEN + 13]);
    // Too long.
    let long = vec![0u8; MAX_PACKET_LEN + 1];
    r.tx_chain(&long, &[40_000, MAX_PACKET_LEN + 1 - 40_000]);
    // A header the driver did not negotiate (checksum offload).
    let csum = VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        ..Default::default()
    };
    r.tx_chain(&packet(csum, &frame(60, 1)), &[72]);
    // Segmentation that was not negotiated.
    let gso = VnetHdr {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        gso_size: 1000,
        ..Default::default()
    };
    r.tx_chain(&packet(gso, &frame(60, 1)), &[72]);
    // A device-writable descriptor, outside memory, a loop, a bad head.
    r.tx.add_raw(&[(10, desc(DATA, 72, DESC_WRITE, 0))], 10);
    r.tx.add_raw(&[(11, desc(0x1_0000_0000, 72, 0, 0))], 11);
    r.tx.add_raw(
        &[
            (12, desc(DATA, 72, DESC_NEXT, 13)),
            (13, desc(DATA, 72, DESC_NEXT, 12)),
        ],
        12,
    );
    r.tx.add_raw(&[], 99);
    r.net.process_queue(TXQ);
    let used: Vec<_> = std::iter::from_fn(|| r.tx.pop_used()).collect();
    // Head 99 cannot be returned; every other chain is, with length 0.
    assert_eq!(used.len(), 7, "{used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(recv(&peer), None, "nothing reached the tap");
    let rej = r.net.rejected();
    assert_eq!(rej.count, 8);
    assert!(rej.last.unwrap().starts_with("TX: "));
    assert_eq!(r.net.counters().tx_frames, 0);
    assert!(!r.irq.needs_reset());
    // The device goes on.
    r.tx_chain(&ok, &[ok.len()]);
    r.net.process_queue(TXQ);
    assert_eq!(recv(&peer).unwrap(), ok);
}

#[test]
fn an_rx_frame_lands_in_one_buffer_with_its_header() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1, Some(tap), 16, false);
    let head = r.rx_buffer(0, 1526, true);
    let f = frame(1514, 5);
    // What a tap hands over: flags may say DATA_VALID, num_buffers is junk.
    let from_tap = VnetHdr {
        flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
        num_buffers: 0xbeef,
        ..Default::default()
    };
    send(&peer, &packet(from_tap, &f));
    assert!(readable(r.poll_fd()), "the event loop wakes up");
    r.net.process_extra_fd(0, EventSet::IN);
    assert_eq!(r.rx.pop_used(), Some((head, 1526)));
    assert_eq!(r.irq.eventfd().read().unwrap(), 1);
    // The buffer was split 5 + 1521 bytes.
    let mut got = r.rx_bytes(0, 5);
    let mut rest = vec![0u8; 1521];
    m.read_slice(&mut rest, GuestAddress(0x80_0000 + 0x100))
        .unwrap();
    got.extend(rest);
    let expected = VnetHdr {
        num_buffers: 1,
        ..Default::default()
    };
    assert_eq!(
        got,
        packet(expected, &f),
        "flags cleared without GUEST_CSUM"
    );
    let c = r.net.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (1, 1514, 0));
    assert!(!readable(r.poll_fd()), "nothing more to read");
}

#[test]
fn a_large_frame_spreads_over_mergeable_buffers_published_at_once() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let csum_tso = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4);
    let mut r = rig(&m, V1 | MRG | csum_tso, Some(tap), 16, false);
    let heads: Vec<u16> = (0..4).map(|i| r.rx_buffer(i, 1536, false)).collect();
    let f = frame(4054, 8);
    let gso = VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    send(&peer, &packet(gso, &f));
    r.net.process_extra_fd(0, EventSet::IN);
    let used: Vec<_> = std::iter::from_fn(|| r.rx.pop_used()).collect();
    assert_eq!(
        used,
        vec![
            (heads[0], 1536),
            (heads[1], 1536),
            (heads[2], 4066 - 2 * 1536)
        ]
    );
    let mut got = Vec::new();
    for (i, (_, len)) in used.iter().enumerate() {
        got.extend(r.rx_bytes(i as u64, *len as usize));
    }
    let expected = VnetHdr {
        num_buffers: 3,
        ..gso
    };
    assert_eq!(got, packet(expected, &f));
    // A small frame takes one buffer (the fourth).
    send(&peer, &packet(VnetHdr::default(), &frame(60, 1)));
    r.net.process_extra_fd(0, EventSet::IN);
    assert_eq!(r.rx.pop_used(), Some((heads[3], 72)));
    assert_eq!(
        r.rx_bytes(3, 12),
        VnetHdr {
            num_buffers: 1,
            ..Default::default()
        }
        .to_bytes()
    );
}

#[test]
fn without_rx_buffers_the_device_holds_one_frame_and_stops_polling_the_tap() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1 | MRG, Some(tap), 16, true);
    let (a, b, c) = (frame(1000, 1), frame(3000, 2), frame(200, 3));
    send(&peer, &packet(VnetHdr::default(), &a));
    send(&peer, &packet(VnetHdr::default(), &b));
    let fd = r.poll_fd();
    assert!(readable(fd));
    r.net.process_extra_fd(0, EventSet::IN);
    // A is in hand, B still in the tap, and the loop no longer wakes up.
    assert!(r.net.rx_pending.is_some());
    assert!(!readable(fd), "no busy loop while the guest has no buffers");
    assert_eq!(r.rx.avail_event(), 0, "the driver is asked to kick");
    // One buffer is not enough for B.
    let old = r.rx.avail_idx();
    let h0 = r.rx_buffer(0, 1536, false);
    assert!(r.rx.needs_kick(true, old));
    r.net.process_queue(RXQ);
    assert_eq!(r.rx.pop_used(), Some((h0, 1012)));
    assert!(r.net.rx_pending.is_some(), "B waits for more buffers");
    assert_eq!(r.rx.pop_used(), None);
    assert!(!readable(fd));
    assert_eq!(r.rx.avail_event(), 1);
    // Two more: B goes in, the tap is polled again.
    let old = r.rx.avail_idx();
    let h1 = r.rx_buffer(1, 1536, false);
    let h2 = r.rx_buffer(2, 1536, false);
    assert!(r.rx.needs_kick(true, old));
    r.net.process_queue(RXQ);
    assert_eq!(r.rx.pop_used(), Some((h1, 1536)));
    assert_eq!(r.rx.pop_used(), Some((h2, 3012 - 1536)));
    assert!(r.net.rx_pending.is_none());
    send(&peer, &packet(VnetHdr::default(), &c));
    assert!(readable(fd), "polled again");
    // Nothing was lost on the way.
    let c = r.net.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (2, 0));
}

#[test]
fn frames_that_cannot_fit_are_dropped_and_counted() {
    let m = mem();
    let (tap, peer) = socket_tap();
    // Without mergeable buffers, a frame must fit one buffer.
    let mut r = rig(&m, V1, Some(tap), 16, false);
    let head = r.rx_buffer(0, 1526, false);
    send(&peer, &packet(VnetHdr::default(), &frame(3000, 1)));
    send(&peer, &packet(VnetHdr::default(), &frame(100, 2)));
    // A partial checksum for a driver without GUEST_CSUM.
    let partial = VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        ..Default::default()
    };
    send(&peer, &packet(partial, &frame(100, 3)));
    // Too short to be a frame, too long to be one.
    send(&peer, &[0u8; VNET_HDR_LEN + 5]);
    send(&peer, &vec![0u8; MAX_PACKET_LEN + 1]);
    r.net.process_extra_fd(0, EventSet::IN);
    // The large frame was dropped, the buffer kept for the next one.
    assert_eq!(r.rx.pop_used(), Some((head, 112)));
    assert_eq!(r.rx_bytes(0, 112)[12..], frame(100, 2)[..]);
    let c = r.net.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 4));
    assert_eq!(r.net.rejected().count, 0, "not the guest's doing");

    // With mergeable buffers, a frame larger than a full ring is dropped,
    // not held forever.
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1 | MRG, Some(tap), 4, false);
    for i in 0..4 {
        r.rx_buffer(i, 100, false);
    }
    send(&peer, &packet(VnetHdr::default(), &frame(1000, 1)));
    send(&peer, &packet(VnetHdr::default(), &frame(300, 2)));
    r.net.process_extra_fd(0, EventSet::IN);
    let used: Vec<_> = std::iter::from_fn(|| r.rx.pop_used()).collect();
    assert_eq!(used, vec![(0, 100), (1, 100), (2, 100), (3, 12)]);
    assert_eq!(r.net.counters().rx_dropped, 1);
}

#[test]
fn malformed_rx_buffers_are_returned_empty_and_counted() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1 | MRG, Some(tap), 16, false);
    let a = r.rx_buffer(0, 1536, false);
    // Device-readable, too small for a header, outside memory.
    r.rx.add_raw(&[(10, desc(0x80_0000, 100, 0, 0))], 10);
    r.rx.add_raw(&[(11, desc(0x80_0000, 11, DESC_WRITE, 0))], 11);
    r.rx.add_raw(&[(12, desc(0x1_0000_0000, 100, DESC_WRITE, 0))], 12);
    let b = r.rx_buffer(1, 1536, false);
    let c = r.rx_buffer(2, 1536, false);
    // A frame that needs two buffers: the first one held is given back
    // unused with the malformed ones, the frame goes into the next two.
    send(&peer, &packet(VnetHdr::default(), &frame(2000, 4)));
    r.net.process_extra_fd(0, EventSet::IN);
    let used: Vec<_> = std::iter::from_fn(|| r.rx.pop_used()).collect();
    assert_eq!(
        used,
        vec![
            (a, 0),
            (10, 0),
            (11, 0),
            (12, 0),
            (b, 1536),
            (c, 2012 - 1536)
        ]
    );
    assert_eq!(r.net.rejected().count, 3);
    assert!(r.net.rejected().last.unwrap().starts_with("RX: "));
    assert_eq!(r.net.counters().rx_frames, 1);
    assert!(!r.irq.needs_reset());
}

#[test]
fn a_corrupted_rx_ring_stops_the_device_without_spinning() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let r = rig(&m, V1, Some(tap), 16, false);
    let mut r = r;
    let (_, avail, _) = r.rx.addrs();
    m.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    send(&peer, &packet(VnetHdr::default(), &frame(60, 1)));
    r.net.process_extra_fd(0, EventSet::IN);
    assert!(r.irq.needs_reset());
    assert!(!readable(r.poll_fd()), "the tap is no longer polled");
    // The driver resets the device: it is inactive, and a readable tap
    // does not wake the loop.
    r.net.reset();
    send(&peer, &packet(VnetHdr::default(), &frame(60, 2)));
    r.net.process_extra_fd(0, EventSet::IN);
    assert!(!readable(r.poll_fd()));
    assert!(!r.net.is_activated());
}

#[test]
fn a_device_without_a_tap_consumes_tx_and_receives_nothing() {
    let m = mem();
    let mut r = rig(&m, V1, None, 16, false);
    r.rx_buffer(0, 1526, false);
    let p = packet(VnetHdr::default(), &frame(100, 1));
    let head = r.tx_chain(&p, &[p.len()]);
    r.net.process_queue(TXQ);
    assert_eq!(r.tx.pop_used(), Some((head, 0)));
    r.net.process_queue(RXQ);
    assert_eq!(r.rx.pop_used(), None);
    let c = r.net.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (0, 1));
    assert!(!r.net.link_up());
}

#[test]
fn a_tap_that_goes_away_takes_the_link_down() {
    let m = mem();
    let (tap, peer) = socket_tap();
    let mut r = rig(&m, V1, Some(tap), 16, false);
    drop(peer);
    r.net.process_extra_fd(0, EventSet::IN);
    assert!(!r.net.link_up());
    assert_ne!(
        r.irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG,
        0
    );
    let mut cfg = [0u8; 8];
    r.net.read_config(0, &mut cfg);
    assert_eq!(cfg[6..], [0, 0]);
    assert!(!readable(r.poll_fd()));
    // TX goes on, into nothing.
    let p = packet(VnetHdr::default(), &frame(100, 1));
    let head = r.tx_chain(&p, &[p.len()]);
    r.net.process_queue(TXQ);
    assert_eq!(r.tx.pop_used(), Some((head, 0)));
    assert_eq!(r.net.counters().tx_dropped, 1);
}

/// Runs `f` on a thread of its own in a new network namespace (gone when
/// the thread and the descriptors it opened are).
fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare moves this thread (only) into a new network
            // namespace; it touches no memory.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap()
    })
}

/// Brings interface `name` up (in this thread's namespace).
fn link_up(name: &str) {
    // SAFETY: a plain datagram socket for interface ioctls.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain old data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS read and write one ifreq we own.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
            0
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr), 0);
    }
}

/// A raw packet socket on interface `name`; with `vnet_hdr`, what it sends
/// starts with a 10-byte `virtio_net_hdr`.
fn packet_socket(name: &str, vnet_hdr: bool) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with integer arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
    // SAFETY: fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0);
    // SAFETY: `sockaddr_ll` is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind reads one sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
    if vnet_hdr {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one int.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(r, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
    }
    sock
}

/// Waits up to 5 s for a frame of our ethertype (or IPv4 to 10.0.0.2) on a
/// packet socket, skipping the host's own chatter.
fn recv_ours(sock: &OwnedFd) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        assert!(std::time::Instant::now() < deadline, "no frame arrived");
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        unsafe { libc::poll(&mut p, 1, 100) };
        if let Some(f) = recv(sock) {
            let ours = f.len() >= 14 && (f[12..14] == [0x88, 0xb5] || f[30..34] == [10, 0, 0, 2]);
            if ours {
                return f;
            }
        }
    }
}

/// An Ethernet + IPv4 + TCP frame to 10.0.0.2 with `payload` bytes.
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 7, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    // Ports 1000 -> 2000, seq 1, ack 1, data offset 5, ACK|PSH, window.
    f.extend_from_slice(&[
        0x03, 0xe8, 0x07, 0xd0, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff,
    ]);
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend((0..payload).map(|i| i as u8));
    f
}

#[test]
fn a_real_tap_carries_frames_both_ways_with_their_headers() {
    in_private_netns(|| {
        let tap = Tap::create("zt0").expect("create a tap");
        assert_eq!(tap.name(), "zt0");
        link_up("zt0");
        let sock = packet_socket("zt0", false);
        let m = mem();
        let features = V1
            | MRG
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4);
        // The rig's activation sets the tap's offloads (TUNSETOFFLOAD).
        let mut r = rig(&m, features, Some(tap), 64, true);
        let offload = tap_offload(features);
        assert_eq!(offload, libc::TUN_F_CSUM | libc::TUN_F_TSO4);
        r.net
            .tap
            .as_ref()
            .unwrap()
            .set_offload(offload)
            .expect("TUNSETOFFLOAD");

        // Guest -> tap: the frame arrives on the interface as sent.
        let f = frame(800, 11);
        let p = packet(VnetHdr::default(), &f);
        r.tx_chain(&p, &[VNET_HDR_LEN, p.len() - VNET_HDR_LEN]);
        r.net.process_queue(TXQ);
        assert_eq!(r.net.counters().tx_frames, 1, "{:?}", r.net.rejected());
        assert_eq!(recv_ours(&sock), f);

        // A 4000-byte TCP segment with segmentation offload: the tap
        // takes it whole.
        let seg = tcp_frame(4000);
        let tso = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        let p = packet(tso, &seg);
        r.tx_chain(&p, &[p.len()]);
        r.net.process_queue(TXQ);
        let c = r.net.counters();
        assert_eq!(
            (c.tx_frames, c.tx_dropped),
            (2, 0),
            "{:?}",
            r.net.rejected()
        );

        // Interface -> guest: the frame lands in a buffer after a header.
        for i in 0..8 {
            r.rx_buffer(i, 2048, false);
        }
        let g = frame(1000, 12);
        // SAFETY: the pointer and length describe `g`.
        let n = unsafe { libc::send(sock.as_raw_fd(), g.as_ptr().cast(), g.len(), 0) };
        assert_eq!(n, g.len() as isize);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let got = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no frame in the guest"
            );
            r.net.process_extra_fd(0, EventSet::IN);
            if let Some((head, len)) = r.rx.pop_used() {
                let bytes = r.rx_bytes(u64::from(head), len as usize);
                if bytes[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5] {
                    break bytes;
                }
                // The host's own chatter (IPv6 neighbour discovery...).
                r.rx_buffer(u64::from(head), 2048, false);
                continue;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let hdr = VnetHdr::from_bytes(got[..VNET_HDR_LEN].try_into().unwrap());
        assert_eq!(hdr.num_buffers, 1);
        assert_eq!(hdr.gso_type, 0);
        assert_eq!(&got[VNET_HDR_LEN..], &g[..]);

        // A segmented TCP frame from the interface reaches the guest whole,
        // its segmentation in the header, over mergeable buffers.
        let gso_sock = packet_socket("zt0", true);
        let mut msg = tso.to_bytes()[..10].to_vec();
        msg.extend_from_slice(&seg);
        // SAFETY: the pointer and length describe `msg`.
        let n = unsafe { libc::send(gso_sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        assert_eq!(
            n,
            msg.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (hdr, bytes) = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no TCP frame in the guest"
            );
            r.net.process_extra_fd(0, EventSet::IN);
            let mut bytes = Vec::new();
            let mut want = 0;
            let mut hdr = VnetHdr::default();
            while let Some((head, len)) = r.rx.pop_used() {
                let b = r.rx_bytes(u64::from(head), len as usize);
                r.rx_buffer(u64::from(head), 2048, false);
                if want == 0 {
                    hdr = VnetHdr::from_bytes(b[..VNET_HDR_LEN].try_into().unwrap());
                    want = hdr.num_buffers;
                }
                bytes.extend(b);
                want -= 1;
                if want == 0 {
                    break;
                }
            }
            if bytes.len() > VNET_HDR_LEN + 34
                && bytes[VNET_HDR_LEN + 30..VNET_HDR_LEN + 34] == [10, 0, 0, 2]
            {
                break (hdr, bytes);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4 as u8, "{hdr:?}");
        assert_eq!(hdr.gso_size, 1448);
        assert!(hdr.num_buffers >= 2, "{hdr:?}");
        assert_eq!(bytes.len(), VNET_HDR_LEN + seg.len());
        assert_eq!(bytes[VNET_HDR_LEN + 54..], seg[54..], "the payload");
        assert_eq!(r.net.counters().rx_dropped, 0);
    });
}

#[test]
fn taps_without_a_vnet_header_or_not_taps_are_refused() {
    in_private_netns(|| {
        let fd = tap::open_tap("zt1", (libc::IFF_TAP | libc::IFF_NO_PI) as u16).unwrap();
        let e = Tap::from_fd(fd).unwrap_err();
        assert!(matches!(e, tap::TapError::Flags { .. }), "{e}");
        assert!(e.to_string().contains("IFF_VNET_HDR"), "{e}");
        let fd = tap::open_tap(
            "zt2",
            (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16,
        )
        .unwrap();
        assert!(matches!(Tap::from_fd(fd), Err(tap::TapError::Flags { .. })));
    });
    let file = std::fs::File::open("/dev/null").unwrap();
    let e = Tap::from_fd(file.into()).unwrap_err();
    assert!(matches!(e, tap::TapError::NotTap { .. }), "{e}");
    assert!(matches!(
        Tap::from_inherited_fd(1),
        Err(tap::TapError::Reserved(1))
    ));
    // A number nothing is open at.
    assert!(matches!(
        Tap::from_inherited_fd(1_000_000),
        Err(tap::TapError::NotOpen { fd: 1_000_000, .. })
    ));
}
