//! Randomized tests of the virtio-net device: arbitrary descriptor tables
//! (addresses in and out of guest memory, any length, any flags, any
//! `next`, indirect tables of random bytes) and available rings (any
//! heads, a corrupted index), random features, and random frames from the
//! "tap" (a datagram socket) with random headers, fed to TX and RX
//! processing. Every case must end with the device alive and everything
//! accounted for: each chain served or rejected and counted, each frame
//! delivered, dropped or still waiting, memory bounded. Bounded so that the
//! whole file runs in a few seconds in a debug build.

use std::os::fd::{AsRawFd, OwnedFd};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::tests::{frame, packet, readable, recv, socket_tap, V1};
use super::*;
use crate::devices::virtio::test_utils::{desc, mem, DriverQueue, DESC_NEXT, DESC_WRITE, MEM_SIZE};

/// Where chains of the randomized cases point to (random bytes).
const AREA: u64 = 0x10_0000;
/// Its size (buffers may reach 64 KiB past it).
const AREA_LEN: usize = 0x4_0000;
/// How many well-formed packets are planted in it...
const PLANTED: u64 = 16;
/// ... this far apart.
const PLANT_STRIDE: u64 = 0x4000;

#[derive(Debug, Clone)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn raw_desc(size: u16) -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        6 => (0..PLANTED).prop_map(|i| AREA + i * PLANT_STRIDE),
        6 => (0..AREA_LEN as u64).prop_map(|o| AREA + o),
        1 => Just(MEM_SIZE as u64 - 8),
        1 => Just(MEM_SIZE as u64),
        1 => Just(0x1_0000_0000u64),
        1 => Just(u64::MAX - 4),
    ];
    let len = prop_oneof![
        4 => 0u32..64,
        2 => Just(VNET_HDR_LEN as u32),
        4 => 60u32..1600,
        1 => Just(4096u32),
        1 => Just(MAX_PACKET_LEN as u32),
        1 => Just(MAX_PACKET_LEN as u32 + 1),
        1 => Just(u32::MAX),
    ];
    // Mostly single or chained buffers of one direction; NEXT, WRITE and
    // INDIRECT in any combination too.
    let flags = prop_oneof![
        3 => Just(0u16),
        3 => Just(DESC_WRITE),
        2 => Just(DESC_NEXT),
        2 => Just(DESC_NEXT | DESC_WRITE),
        1 => 0u16..8,
    ];
    (addr, len, flags, 0..size + 4).prop_map(|(addr, len, flags, next)| RawDesc {
        addr,
        len,
        flags,
        next,
    })
}

/// One queue as a confused or hostile driver may leave it.
#[derive(Debug, Clone)]
struct RawQueue {
    descs: Vec<RawDesc>,
    heads: Vec<u16>,
    corrupt_idx: bool,
}

fn raw_queue(size: u16) -> impl Strategy<Value = RawQueue> {
    (
        proptest::collection::vec(raw_desc(size), usize::from(size)),
        proptest::collection::vec(0..size + 4, 0..=usize::from(size)),
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(descs, heads, corrupt_idx)| RawQueue {
            descs,
            heads,
            corrupt_idx,
        })
}

/// Writes `q` into the rings of `dq`.
fn install(m: &GuestMemoryMmap, dq: &DriverQueue<'_>, q: &RawQueue) {
    let (d, a, _) = dq.addrs();
    for (i, r) in q.descs.iter().enumerate() {
        m.write_obj(
            desc(r.addr, r.len, r.flags, r.next),
            GuestAddress(d + 16 * i as u64),
        )
        .unwrap();
    }
    for (i, &h) in q.heads.iter().enumerate() {
        m.write_obj(h, GuestAddress(a + 4 + 2 * i as u64)).unwrap();
    }
    let idx = if q.corrupt_idx {
        q.heads.len() as u16 + dq.size() + 1
    } else {
        q.heads.len() as u16
    };
    m.write_obj(idx, GuestAddress(a + 2)).unwrap();
}

/// The used ring's index and elements.
fn used(m: &GuestMemoryMmap, dq: &DriverQueue<'_>) -> Vec<(u32, u32)> {
    let (_, _, u) = dq.addrs();
    let idx: u16 = m.read_obj(GuestAddress(u + 2)).unwrap();
    (0..idx)
        .map(|i| {
            let slot = u64::from(i % dq.size());
            let id: u32 = m.read_obj(GuestAddress(u + 4 + 8 * slot)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(u + 8 + 8 * slot)).unwrap();
            (id, len)
        })
        .collect()
}

/// A frame from the tap: random header bytes, then a frame of `len` - 12.
fn tap_frame() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        2 => 1usize..40,
        4 => 26usize..1600,
        1 => Just(4066usize),
        1 => Just(MAX_PACKET_LEN),
        1 => Just(MAX_PACKET_LEN + 1),
    ];
    let flags =
        prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2), 1 => Just(3), 1 => any::<u8>()];
    let gso =
        prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(4), 1 => Just(0x81), 1 => any::<u8>()];
    (len, flags, gso, any::<u16>(), any::<u8>()).prop_map(|(len, flags, gso, size, seed)| {
        let hdr = VnetHdr {
            flags,
            gso_type: gso,
            gso_size: size,
            hdr_len: size / 3,
            csum_start: 34,
            csum_offset: 6,
            num_buffers: size,
        };
        let mut p = packet(hdr, &frame(len.saturating_sub(VNET_HDR_LEN), seed));
        p.truncate(len);
        p
    })
}

/// Sends `bytes` unless the socket is full; returns whether it went.
fn try_send(fd: &OwnedFd, bytes: &[u8]) -> bool {
    // SAFETY: the pointer and length describe `bytes`.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT,
        )
    };
    n == bytes.len() as isize
}

#[derive(Debug, Clone)]
struct Case {
    size: u16,
    tx: RawQueue,
    rx: RawQueue,
    features: u64,
    event_idx: bool,
    frames: Vec<Vec<u8>>,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![Just(4u16), Just(8), Just(16)].prop_flat_map(|size| {
        (
            raw_queue(size),
            raw_queue(size),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::vec(tap_frame(), 0..5),
            any::<u64>(),
        )
            .prop_map(move |(tx, rx, features, event_idx, frames, seed)| Case {
                size,
                tx,
                rx,
                features,
                event_idx,
                frames,
                seed,
            })
    })
}

/// Fills the area chains point to with bytes from `seed` (headers and
/// indirect tables of random content), with well-formed packets (a plain
/// header, a frame) planted every [`PLANT_STRIDE`] bytes.
fn fill(m: &GuestMemoryMmap, seed: u64) {
    let mut x = seed | 1;
    let bytes: Vec<u8> = (0..AREA_LEN + 0x1_0000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    m.write_slice(&bytes, GuestAddress(AREA)).unwrap();
    let good = packet(VnetHdr::default(), &frame(PLANT_STRIDE as usize, 0x5a));
    for i in 0..PLANTED {
        m.write_slice(&good, GuestAddress(AREA + i * PLANT_STRIDE))
            .unwrap();
    }
}

fn run(c: &Case) -> Result<(), TestCaseError> {
    let m = mem();
    fill(&m, c.seed);
    let (tap, peer) = socket_tap();
    let rxq = DriverQueue::new(&m, 0x1_0000, c.size);
    let txq = DriverQueue::new(&m, 0x2_0000, c.size);
    install(&m, &rxq, &c.rx);
    install(&m, &txq, &c.tx);
    let sent = c.frames.iter().filter(|f| try_send(&peer, f)).count() as u64;

    let mut net = Net::new(MacAddr([2, 0, 0, 0, 0, 9]), Some(tap)).unwrap();
    net.ack_features(c.features | V1);
    let acked = net.acked_features();
    let irq = Interrupt::new().unwrap();
    let (mut q0, mut q1) = (rxq.create_queue(), txq.create_queue());
    q0.set_event_idx(c.event_idx);
    q1.set_event_idx(c.event_idx);
    net.activate(m.clone(), vec![q0, q1], irq.clone()).unwrap();

    // TX: every chain is popped (unless the index is corrupt), and each is
    // written, dropped for lack of room in the socket, or rejected.
    net.process_queue(TXQ);
    let c_tx = net.counters();
    let tx_rejected = net.rejected().count;
    let popped = if c.tx.corrupt_idx {
        0
    } else {
        c.tx.heads.len()
    } as u64;
    prop_assert_eq!(c_tx.tx_frames + c_tx.tx_dropped + tx_rejected, popped);
    prop_assert_eq!(irq.needs_reset(), c.tx.corrupt_idx);
    let returned = c.tx.heads.iter().filter(|&&h| h < c.size).count();
    let tx_used = used(&m, &txq);
    prop_assert_eq!(tx_used.len(), if c.tx.corrupt_idx { 0 } else { returned });
    prop_assert!(tx_used.iter().all(|&(_, len)| len == 0));
    let mut on_tap = 0;
    while let Some(f) = recv(&peer) {
        on_tap += 1;
        prop_assert!((VNET_HDR_LEN + ETH_HLEN..=MAX_PACKET_LEN).contains(&f.len()));
        let hdr = VnetHdr::from_bytes(f[..VNET_HDR_LEN].try_into().unwrap());
        prop_assert_eq!(hdr.num_buffers, 0);
        prop_assert!(header::check_tx(&hdr, f.len() - VNET_HDR_LEN, acked).is_ok());
    }
    prop_assert_eq!(on_tap, c_tx.tx_frames);
    prop_assert!(net.tx_iov.0.is_empty() && net.tx_iov.0.capacity() <= 2 * 1024);

    // RX: each frame is delivered, dropped, in hand, or still in the tap.
    net.process_queue(RXQ);
    net.process_extra_fd(0, EventSet::IN);
    net.process_queue(RXQ);
    let c_rx = net.counters();
    let in_hand = u64::from(net.rx_pending.is_some());
    if in_hand == 1 {
        // Frames may wait in the tap: the loop must not wake up for them.
        prop_assert!(!readable(net.extra_fds()[0]), "no busy loop");
    }
    let mut left = 0;
    while let Ok(n) = net.tap.as_ref().unwrap().read(&mut net.rx_buf) {
        prop_assert!(n > 0);
        left += 1;
    }
    prop_assert_eq!(c_rx.rx_frames + c_rx.rx_dropped + in_hand + left, sent);
    if !irq.needs_reset() {
        for (_, len) in used(&m, &rxq) {
            prop_assert!(len as usize <= MAX_PACKET_LEN);
        }
    }
    prop_assert!(net.rx_held.capacity() <= 2 * 256 && net.rx_used.capacity() <= 2 * 256);

    // The device is alive: the driver resets it and sets it up again on
    // fresh rings, and frames go both ways.
    net.reset();
    while recv(&peer).is_some() {}
    while net.tap.as_ref().unwrap().read(&mut net.rx_buf).is_ok() {}
    let mut rxq = DriverQueue::new(&m, 0x3_0000, 16);
    let mut txq = DriverQueue::new(&m, 0x4_0000, 16);
    let irq = Interrupt::new().unwrap();
    net.ack_features(V1);
    net.activate(m.clone(), vec![rxq.create_queue(), txq.create_queue()], irq)
        .unwrap();
    net.process_queue(RXQ);
    let p = packet(VnetHdr::default(), &frame(100, 1));
    m.write_slice(&p, GuestAddress(0x50_0000)).unwrap();
    let head = txq.add_chain(&[(0x50_0000, p.len() as u32, false)]);
    net.process_queue(TXQ);
    prop_assert_eq!(txq.pop_used(), Some((head, 0)));
    prop_assert_eq!(recv(&peer), Some(p.clone()));
    let head = rxq.add_chain(&[(0x60_0000, 2048, true)]);
    prop_assert!(try_send(&peer, &p));
    net.process_extra_fd(0, EventSet::IN);
    prop_assert_eq!(rxq.pop_used(), Some((head, p.len() as u32)));
    let mut got = vec![0u8; p.len()];
    m.read_slice(&mut got, GuestAddress(0x60_0000)).unwrap();
    prop_assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_rings_leave_the_device_alive_and_every_chain_and_frame_accounted(c in case()) {
        run(&c)?;
    }
}
