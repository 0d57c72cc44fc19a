//! Randomized tests of virtio-vsock: its queue handling under a guest that
//! writes anything into its rings (descriptor tables, indirect tables,
//! available rings, packet headers), and its host side under a guest that
//! sends any header on live connections.
//!
//! * Queues, predictable: with no host connection, every TX chain is
//!   dropped (counted, when malformed or refused), answered with a reset
//!   (a connection-less packet) or ignored (a reset); every reset reaches
//!   the guest in the next usable RX buffer; every unusable RX buffer is
//!   returned empty and counted. A model predicts each used entry, each
//!   reset and the count.
//! * Queues, chaos: buffers anywhere (rings included), restores, resets,
//!   kicks of any queue: no panic, no hang, no more used than available.
//! * Headers on live connections: any operation, length, credit and port
//!   from the guest, with host peers that write, read or hang up: no panic,
//!   host-side buffers stay within the credit the device gave, the guest
//!   never gets more data than it gave credit for, and what a host peer
//!   reads is exactly a prefix of what the guest sent it.
//!
//! Test code only.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just};
use proptest::strategy::Strategy;
use proptest::test_runner::TestCaseError;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packet::*;
use super::*;
use crate::devices::virtio::ring_fuzz::{
    config, queue_script, read_chain, walk, Area, Mode, QueueScript, RingDriver, Verdict,
};
use crate::devices::virtio::test_utils::mem;

const GUEST_CID: u64 = 3;
/// Where the TX packet headers the guest prepared are.
const TX_DATA: u64 = 0x10_0000;
const HEADER_SLOTS: u64 = 64;

fn sock_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "zygote-vsock-fuzz-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

/// The three queues' places; everything a model reads lies below every
/// buffer the device writes (RX data last).
fn rx_area() -> Area {
    Area {
        rings: 0x1000,
        indirect: 0x8_0000..0x8_0200,
        data: 0x40_0000..0x50_0000,
        hot: Vec::new(),
    }
}

fn tx_area() -> Area {
    Area {
        rings: 0x1_0000,
        indirect: 0x8_1000..0x8_1200,
        data: TX_DATA..TX_DATA + 0x8_0000,
        hot: (0..HEADER_SLOTS).map(|i| TX_DATA + 0x100 * i).collect(),
    }
}

fn ev_area() -> Area {
    Area {
        rings: 0x2_0000,
        indirect: 0x8_2000..0x8_2200,
        data: 0x60_0000..0x61_0000,
        hot: Vec::new(),
    }
}

/// A header a guest may send: mostly plausible, sometimes anything.
fn header() -> impl Strategy<Value = VsockHeader> {
    let cid = |good: u64| prop_oneof![8 => Just(good), 1 => any::<u64>()];
    let len = prop_oneof![
        4 => 0u32..64,
        1 => Just(MAX_PKT_PAYLOAD as u32),
        1 => Just(MAX_PKT_PAYLOAD as u32 + 1),
        1 => any::<u32>(),
    ];
    (
        (cid(GUEST_CID), cid(HOST_CID), any::<u32>(), any::<u32>()),
        (
            len,
            prop_oneof![8 => Just(TYPE_STREAM), 1 => any::<u16>()],
            prop_oneof![8 => 0u16..10, 1 => any::<u16>()],
        ),
        (any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_map(
            |(
                (src_cid, dst_cid, src_port, dst_port),
                (len, type_, op),
                (flags, buf_alloc, fwd_cnt),
            )| {
                VsockHeader {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
            },
        )
}

/// Which queue the guest notifies after a round.
#[derive(Debug, Clone, Copy)]
enum Kick {
    Tx,
    Rx,
}

/// What the device must do, as the model sees it.
#[derive(Default)]
struct Model {
    rejected: u64,
    /// Resets waiting for an RX buffer.
    pending: VecDeque<VsockHeader>,
    tx_next: u16,
    rx_next: u16,
    needs_reset: bool,
}

/// The RST the device answers `hdr` with.
fn rst_for(hdr: &VsockHeader) -> VsockHeader {
    VsockHeader {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: hdr.dst_port,
        dst_port: hdr.src_port,
        len: 0,
        type_: TYPE_STREAM,
        op: OP_RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

/// Byte ranges of the first `n` bytes of a chain.
fn prefix_ranges(segs: &[(u64, usize)], n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut left = n;
    for &(addr, len) in segs {
        if left == 0 {
            break;
        }
        let take = len.min(left);
        out.push((addr, addr + take as u64));
        left -= take;
    }
    out
}

fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter()
        .any(|&(s, e)| b.iter().any(|&(t, f)| s < f && t < e))
}

impl Model {
    /// The TX chains the driver made available, as the device must handle
    /// them: the used entries it returns.
    fn tx(&mut self, m: &GuestMemoryMmap, drv: &RingDriver) -> Option<Vec<(u32, u32)>> {
        let size = drv.size();
        let ahead = drv.avail_idx().wrapping_sub(self.tx_next);
        if ahead > size {
            self.rejected += 1;
            self.needs_reset = true;
            return None;
        }
        let mut used = Vec::new();
        for i in 0..ahead {
            let head = drv.head_at(self.tx_next.wrapping_add(i));
            if head < size {
                used.push((u32::from(head), 0));
            }
            let segs = match walk(m, drv.desc_table(), size, head, false) {
                Verdict::Valid(segs) => segs,
                Verdict::Invalid => {
                    self.rejected += 1;
                    continue;
                }
            };
            let total: usize = segs.iter().map(|s| s.1).sum();
            if total < HDR_SIZE {
                self.rejected += 1;
                continue;
            }
            let raw: [u8; HDR_SIZE] = read_chain(m, &segs, HDR_SIZE).try_into().unwrap();
            let hdr = VsockHeader::from_bytes(&raw);
            let len = hdr.len as usize;
            if len > MAX_PKT_PAYLOAD
                || len > total - HDR_SIZE
                || hdr.src_cid != GUEST_CID
                || hdr.dst_cid != HOST_CID
                || hdr.type_ != TYPE_STREAM
            {
                self.rejected += 1;
                continue;
            }
            // No host connection exists: everything but a reset is
            // answered with one, while there is room.
            if hdr.op == OP_RST {
                continue;
            }
            if self.pending.len() >= 1024 {
                self.rejected += 1;
                continue;
            }
            self.pending.push_back(rst_for(&hdr));
            if hdr.op == OP_REQUEST || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op) {
                self.rejected += 1;
            }
        }
        self.tx_next = self.tx_next.wrapping_add(ahead);
        Some(used)
    }

    /// The resets moving into RX buffers: the used entries, and for each
    /// written packet the header and where it went.
    #[allow(clippy::type_complexity)]
    fn rx(
        &mut self,
        m: &GuestMemoryMmap,
        drv: &RingDriver,
    ) -> (Vec<(u32, u32)>, Vec<(VsockHeader, Vec<(u64, u64)>)>) {
        let mut used = Vec::new();
        let mut written = Vec::new();
        let size = drv.size();
        while !self.pending.is_empty() && !self.needs_reset {
            let ahead = drv.avail_idx().wrapping_sub(self.rx_next);
            if ahead > size {
                self.rejected += 1;
                self.needs_reset = true;
                break;
            }
            if ahead == 0 {
                break;
            }
            let head = drv.head_at(self.rx_next);
            self.rx_next = self.rx_next.wrapping_add(1);
            match walk(m, drv.desc_table(), size, head, true) {
                Verdict::Valid(segs) if segs.iter().map(|s| s.1).sum::<usize>() >= HDR_SIZE => {
                    let hdr = self.pending.pop_front().unwrap();
                    used.push((u32::from(head), HDR_SIZE as u32));
                    written.push((hdr, prefix_ranges(&segs, HDR_SIZE)));
                }
                _ => {
                    self.rejected += 1;
                    if head < size {
                        used.push((u32::from(head), 0));
                    }
                }
            }
        }
        (used, written)
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn queues_account_for_every_chain(
        rx in queue_script(rx_area(), RX_QUEUE_SIZE, true, Mode::Predictable, 4..5),
        tx in queue_script(tx_area(), QUEUE_SIZE, false, Mode::Predictable, 4..5),
        headers in prop::collection::vec(header(), HEADER_SLOTS as usize),
        kicks in prop::collection::vec(prop_oneof![3 => Just(Kick::Tx), 1 => Just(Kick::Rx)], 4),
    ) {
        check_queues(&rx, &tx, &headers, &kicks)?;
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn queue_chaos_neither_panics_nor_hangs(
        rx in queue_script(rx_area(), RX_QUEUE_SIZE, true, Mode::Chaos, 3..4),
        tx in queue_script(tx_area(), QUEUE_SIZE, false, Mode::Chaos, 3..4),
        ev in queue_script(ev_area(), EVENT_QUEUE_SIZE, true, Mode::Chaos, 3..4),
        headers in prop::collection::vec(header(), HEADER_SLOTS as usize),
        actions in prop::collection::vec((0usize..5, any::<bool>(), any::<bool>()), 3),
    ) {
        let m = mem();
        let path = sock_path();
        for (i, h) in headers.iter().enumerate() {
            m.write_slice(&h.to_bytes(), GuestAddress(TX_DATA + 0x100 * i as u64)).unwrap();
        }
        let mut drivers = [
            RingDriver::new(&m, &rx_area(), &rx),
            RingDriver::new(&m, &tx_area(), &tx),
            RingDriver::new(&m, &ev_area(), &ev),
        ];
        let scripts = [&rx, &tx, &ev];
        let irq = Interrupt::new().unwrap();
        let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
        let queues = (0..3).map(|i| drivers[i].queue(scripts[i].event_idx)).collect();
        dev.activate(m.clone(), queues, irq.clone()).unwrap();
        let mut last = 0;
        for (round, &(kick, restore, reset)) in actions.iter().enumerate() {
            let before: Vec<(u16, u16)> =
                dev.queues().iter().map(|q| (q.next_avail(), q.next_used())).collect();
            for (d, s) in drivers.iter_mut().zip(scripts) {
                d.play(&s.rounds[round]);
            }
            if restore {
                dev.restored();
            }
            dev.process_queue(kick);
            for (q, (avail, used)) in dev.queues().iter().zip(before) {
                let popped = q.next_avail().wrapping_sub(avail);
                let returned = q.next_used().wrapping_sub(used);
                prop_assert!(popped <= q.size(), "popped {} of {}", popped, q.size());
                prop_assert!(returned <= popped);
            }
            let count = dev.rejected().count;
            prop_assert!(count >= last);
            last = count;
            if reset {
                dev.reset();
                prop_assert!(!dev.is_activated());
                dev.process_queue(TXQ);
                let queues = (0..3).map(|i| drivers[i].queue(scripts[i].event_idx)).collect();
                dev.activate(m.clone(), queues, irq.clone()).unwrap();
            }
        }
    }
}

/// Plays the scripts against a fresh device with no host connection and
/// checks every round against [`Model`].
fn check_queues(
    rx: &QueueScript,
    tx: &QueueScript,
    headers: &[VsockHeader],
    kicks: &[Kick],
) -> Result<(), TestCaseError> {
    let m = mem();
    let path = sock_path();
    for (i, h) in headers.iter().enumerate() {
        m.write_slice(&h.to_bytes(), GuestAddress(TX_DATA + 0x100 * i as u64))
            .unwrap();
    }
    let mut rxd = RingDriver::new(&m, &rx_area(), rx);
    let mut txd = RingDriver::new(&m, &tx_area(), tx);
    let evd = RingDriver::new(&m, &ev_area(), &ev_script());
    let irq = Interrupt::new().unwrap();
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    dev.activate(
        m.clone(),
        vec![
            rxd.queue(rx.event_idx),
            txd.queue(tx.event_idx),
            evd.queue(false),
        ],
        irq.clone(),
    )
    .unwrap();
    let mut model = Model::default();
    for ((rx_round, tx_round), kick) in rx.rounds.iter().zip(&tx.rounds).zip(kicks) {
        rxd.play(rx_round);
        txd.play(tx_round);
        let tx_used = match kick {
            Kick::Tx => model.tx(&m, &txd),
            Kick::Rx => Some(Vec::new()),
        };
        let (rx_used, written) = model.rx(&m, &rxd);
        dev.process_queue(match kick {
            Kick::Tx => TXQ,
            Kick::Rx => RXQ,
        });
        prop_assert_eq!(dev.rejected().count, model.rejected);
        prop_assert_eq!(irq.needs_reset(), model.needs_reset);
        prop_assert_eq!(rxd.take_used(), rx_used);
        match tx_used {
            Some(used) => prop_assert_eq!(txd.take_used(), used),
            None => return Ok(()),
        }
        // Each reset is in its buffer (unless a later one overwrote it).
        for (i, (hdr, ranges)) in written.iter().enumerate() {
            let clobbered = written[i + 1..]
                .iter()
                .any(|(_, later)| overlap(ranges, later))
                || ranges
                    .iter()
                    .enumerate()
                    .any(|(j, r)| overlap(&[*r], &ranges[j + 1..]));
            if clobbered {
                continue;
            }
            let segs: Vec<(u64, usize)> =
                ranges.iter().map(|&(s, e)| (s, (e - s) as usize)).collect();
            let got: [u8; HDR_SIZE] = read_chain(&m, &segs, HDR_SIZE).try_into().unwrap();
            prop_assert_eq!(VsockHeader::from_bytes(&got), *hdr);
        }
        if model.needs_reset {
            return Ok(());
        }
    }
    Ok(())
}

/// An event queue the guest never touches.
fn ev_script() -> QueueScript {
    QueueScript {
        size: EVENT_QUEUE_SIZE,
        event_idx: false,
        table: Vec::new(),
        indirect: Vec::new(),
        rounds: Vec::new(),
    }
}

/// One thing the guest or a host peer does on live connections.
#[derive(Debug, Clone)]
enum Step {
    /// The guest sends a packet on connection `conn` (any index: wrapped;
    /// `None`: ports that match nothing).
    Send {
        conn: Option<u8>,
        op: u16,
        /// The header's length field, relative to the payload's.
        len_delta: i32,
        payload: usize,
        buf_alloc: u32,
        fwd_cnt: Fwd,
        flags: u32,
        /// 0: a valid header; 1: another source CID; 2: another type.
        bad: u8,
    },
    /// A host peer writes `len` bytes (as many as its socket takes).
    HostWrite { conn: u8, len: usize },
    /// A host peer reads what arrived.
    HostRead { conn: u8 },
    /// A host peer shuts its sending side, or hangs up.
    HostClose { conn: u8, hang_up: bool },
}

/// The `fwd_cnt` a guest claims.
#[derive(Debug, Clone, Copy)]
enum Fwd {
    /// What it received: the honest value.
    Honest,
    /// Off by some bytes, either way.
    Off(i32),
    /// Anything.
    Any(u32),
}

fn step() -> impl Strategy<Value = Step> {
    let op = prop_oneof![
        8 => Just(OP_RW),
        2 => Just(OP_CREDIT_UPDATE),
        2 => Just(OP_CREDIT_REQUEST),
        1 => Just(OP_SHUTDOWN),
        1 => Just(OP_RST),
        1 => Just(OP_REQUEST),
        1 => Just(OP_RESPONSE),
        1 => any::<u16>(),
    ];
    let fwd = prop_oneof![
        4 => Just(Fwd::Honest),
        2 => (-300i32..300).prop_map(Fwd::Off),
        1 => any::<u32>().prop_map(Fwd::Any),
    ];
    let buf_alloc = prop_oneof![
        3 => Just(CONN_BUF_ALLOC),
        1 => Just(0u32),
        1 => 1u32..5000,
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ];
    let payload = prop_oneof![4 => 0usize..3000, 1 => 0usize..MAX_PKT_PAYLOAD + 200];
    let send = (
        (
            prop::option::weighted(0.9, any::<u8>()),
            op,
            prop_oneof![6 => Just(0i32), 1 => -5i32..5, 1 => any::<i32>()],
        ),
        (payload, buf_alloc, fwd),
        (
            prop_oneof![5 => Just(0u32), 1 => 0u32..4, 1 => any::<u32>()],
            prop_oneof![8 => Just(0u8), 1 => 1u8..3],
        ),
    )
        .prop_map(
            |((conn, op, len_delta), (payload, buf_alloc, fwd_cnt), (flags, bad))| Step::Send {
                conn,
                op,
                len_delta,
                payload,
                buf_alloc,
                fwd_cnt,
                flags,
                bad,
            },
        );
    prop_oneof![
        6 => send,
        3 => (any::<u8>(), prop_oneof![1usize..5000, 1usize..400_000])
            .prop_map(|(conn, len)| Step::HostWrite { conn, len }),
        3 => any::<u8>().prop_map(|conn| Step::HostRead { conn }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(conn, hang_up)| Step::HostClose { conn, hang_up }),
    ]
}

/// RX buffers: one 44 + 4096-byte buffer each.
const RX_BUF: u64 = 0x40_0000;
const RX_BUF_SIZE: u64 = 0x2000;
/// TX packets: header at the slot, payload 0x100 after it.
const TX_SLOT: u64 = 0x10_0000;
const TX_SLOT_SIZE: u64 = 0x1_1000;

/// One connection as the test sees both its ends.
struct Live {
    /// The host peer, until it hangs up.
    host: Option<UnixStream>,
    guest_port: u32,
    host_port: u32,
    /// What the host peer wrote, and what the guest got of it.
    host_wrote: Vec<u8>,
    guest_got: Vec<u8>,
    /// What the guest sent that the device accepted for it (the "OK"
    /// line first), and what the host peer read.
    guest_sent: Vec<u8>,
    host_got: Vec<u8>,
    /// The credit the guest last gave: (buf_alloc, fwd_cnt).
    credit: (u32, u32),
    /// Payload bytes the guest received (wrapping, like the device's count).
    rx_total: u32,
    /// The guest answered the connection request.
    opened: bool,
}

/// The guest side: well-formed rings, as a driver keeps them.
struct Guest<'a> {
    m: &'a GuestMemoryMmap,
    rx: crate::devices::virtio::test_utils::DriverQueue<'a>,
    tx: crate::devices::virtio::test_utils::DriverQueue<'a>,
    rx_bufs: HashMap<u16, u64>,
    next_tx: u64,
}

impl<'a> Guest<'a> {
    fn fill_rx(&mut self) {
        let mut slot = 0u64;
        while self.rx.free_descriptors() > 0 {
            while self
                .rx_bufs
                .values()
                .any(|&b| b == RX_BUF + slot * RX_BUF_SIZE)
            {
                slot += 1;
            }
            let base = RX_BUF + slot * RX_BUF_SIZE;
            let head = self.rx.add_chain(&[(base, (HDR_SIZE + 4096) as u32, true)]);
            self.rx_bufs.insert(head, base);
        }
    }

    /// Packets the device put into RX buffers since the last call.
    fn recv(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.pop_used() {
            let base = self.rx_bufs.remove(&head).expect("unknown RX head");
            assert!(len as usize >= HDR_SIZE, "RX packet of {len} bytes");
            let mut raw = [0u8; HDR_SIZE];
            self.m.read_slice(&mut raw, GuestAddress(base)).unwrap();
            let hdr = VsockHeader::from_bytes(&raw);
            assert_eq!(hdr.len as usize + HDR_SIZE, len as usize, "{hdr:?}");
            let mut data = vec![0u8; hdr.len as usize];
            self.m
                .read_slice(&mut data, GuestAddress(base + HDR_SIZE as u64))
                .unwrap();
            out.push((hdr, data));
        }
        self.fill_rx();
        out
    }

    /// Queues one packet (header and payload descriptors) on TX.
    fn send(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        while self.tx.pop_used().is_some() {}
        let slot = TX_SLOT + (self.next_tx % 4) * TX_SLOT_SIZE;
        self.next_tx += 1;
        self.m
            .write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        self.m
            .write_slice(payload, GuestAddress(slot + 0x100))
            .unwrap();
        let mut bufs = vec![(slot, HDR_SIZE as u32, false)];
        if !payload.is_empty() {
            bufs.push((slot + 0x100, payload.len() as u32, false));
        }
        self.tx.add_chain(&bufs);
    }
}

fn guest_hdr(c: &Live, op: u16) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: c.guest_port,
        dst_port: c.host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: c.credit.0,
        fwd_cnt: c.credit.1,
    }
}

/// Lets the device take host events and fill RX buffers.
fn pump(dev: &mut Vsock, g: &mut Guest) {
    dev.process_extra_fd(0, EventSet::IN);
    g.fill_rx();
    dev.process_queue(RXQ);
}

/// Checks the packets the guest received: data only on known connections,
/// within the credit the guest gave, in the order the host peer wrote it.
fn receive(dev: &mut Vsock, g: &mut Guest, conns: &mut [Live]) -> Result<(), TestCaseError> {
    pump(dev, g);
    for (hdr, data) in g.recv() {
        prop_assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
        let Some(c) = conns
            .iter_mut()
            .find(|c| c.host_port == hdr.src_port && c.guest_port == hdr.dst_port)
        else {
            // A reset for ports that match nothing.
            prop_assert_eq!(hdr.op, OP_RST);
            continue;
        };
        if hdr.op != OP_RW {
            continue;
        }
        c.rx_total = c.rx_total.wrapping_add(data.len() as u32);
        let in_flight = c.rx_total.wrapping_sub(c.credit.1);
        prop_assert!(
            in_flight <= c.credit.0,
            "{} bytes in flight, the guest gave {:?}",
            in_flight,
            c.credit
        );
        c.guest_got.extend_from_slice(&data);
        prop_assert!(
            c.host_wrote.starts_with(&c.guest_got),
            "the guest got bytes the host peer did not write"
        );
    }
    Ok(())
}

fn check_connections(responses: &[(bool, u32)], steps: &[Step]) -> Result<(), TestCaseError> {
    let m = mem();
    let path = sock_path();
    let mut g = Guest {
        m: &m,
        rx: crate::devices::virtio::test_utils::DriverQueue::new(&m, 0x1000, RX_QUEUE_SIZE),
        tx: crate::devices::virtio::test_utils::DriverQueue::new(&m, 0x1_0000, QUEUE_SIZE),
        rx_bufs: HashMap::new(),
        next_tx: 0,
    };
    let ev = crate::devices::virtio::test_utils::DriverQueue::new(&m, 0x2_0000, EVENT_QUEUE_SIZE);
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let queues = vec![g.rx.create_queue(), g.tx.create_queue(), ev.create_queue()];
    dev.activate(m.clone(), queues, Interrupt::new().unwrap())
        .unwrap();
    g.fill_rx();

    // Host peers connect; the guest accepts some.
    let mut conns: Vec<Live> = Vec::new();
    for (i, &(accept, buf_alloc)) in responses.iter().enumerate() {
        let guest_port = 1000 + i as u32;
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        host.set_nonblocking(true).unwrap();
        let mut req = None;
        for _ in 0..50 {
            pump(&mut dev, &mut g);
            if let Some((h, _)) = g.recv().into_iter().find(|(h, _)| h.op == OP_REQUEST) {
                req = Some(h);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let req = req.expect("no connection request");
        let mut c = Live {
            host: Some(host),
            guest_port,
            host_port: req.src_port,
            host_wrote: Vec::new(),
            guest_got: Vec::new(),
            guest_sent: Vec::new(),
            host_got: Vec::new(),
            credit: (buf_alloc, 0),
            rx_total: 0,
            opened: accept,
        };
        if accept {
            g.send(&guest_hdr(&c, OP_RESPONSE), &[]);
            dev.process_queue(TXQ);
            c.guest_sent = format!("OK {}\n", c.host_port).into_bytes();
        }
        conns.push(c);
    }
    prop_assert_eq!(dev.rejected().count, 0, "a handshake is no fault");

    let n = conns.len();
    for s in steps {
        match *s {
            Step::Send {
                conn,
                op,
                len_delta,
                payload,
                buf_alloc,
                fwd_cnt,
                flags,
                bad,
            } => {
                let data: Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
                let len =
                    (payload as i64 + i64::from(len_delta)).clamp(0, i64::from(u32::MAX)) as u32;
                let mut hdr = match conn {
                    Some(i) => {
                        let c = &mut conns[usize::from(i) % n];
                        let fwd = match fwd_cnt {
                            Fwd::Honest => c.rx_total,
                            Fwd::Off(d) => c.rx_total.wrapping_add(d as u32),
                            Fwd::Any(v) => v,
                        };
                        let valid =
                            bad == 0 && len as usize <= payload && len as usize <= MAX_PKT_PAYLOAD;
                        if valid {
                            c.credit = (buf_alloc, fwd);
                            if op == OP_RW {
                                c.guest_sent.extend_from_slice(&data[..len as usize]);
                            }
                            // The first answer opens the connection (if it
                            // is still waiting for one).
                            if op == OP_RESPONSE && !c.opened {
                                c.opened = true;
                                c.guest_sent
                                    .extend_from_slice(format!("OK {}\n", c.host_port).as_bytes());
                            }
                        }
                        VsockHeader {
                            buf_alloc,
                            fwd_cnt: fwd,
                            ..guest_hdr(c, op)
                        }
                    }
                    None => VsockHeader {
                        src_port: 7,
                        dst_port: 9,
                        buf_alloc,
                        ..guest_hdr(&conns[0], op)
                    },
                };
                hdr.len = len;
                hdr.flags = flags;
                match bad {
                    1 => hdr.src_cid = GUEST_CID + 1,
                    2 => hdr.type_ = 2,
                    _ => {}
                }
                g.send(&hdr, &data);
                dev.process_queue(TXQ);
            }
            Step::HostWrite { conn, len } => {
                let c = &mut conns[usize::from(conn) % n];
                if let Some(host) = &mut c.host {
                    let start = c.host_wrote.len();
                    let data: Vec<u8> = (start..start + len).map(|i| (i % 251) as u8).collect();
                    if let Ok(k) = host.write(&data) {
                        c.host_wrote.extend_from_slice(&data[..k]);
                    }
                }
            }
            Step::HostRead { conn } => {
                let c = &mut conns[usize::from(conn) % n];
                if let Some(host) = &mut c.host {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(k @ 1..) = host.read(&mut buf) {
                        c.host_got.extend_from_slice(&buf[..k]);
                    }
                    prop_assert!(
                        c.guest_sent.starts_with(&c.host_got),
                        "the host peer read bytes the guest did not send it"
                    );
                }
            }
            Step::HostClose { conn, hang_up } => {
                let c = &mut conns[usize::from(conn) % n];
                if hang_up {
                    c.host = None;
                } else if let Some(host) = &c.host {
                    let _ = host.shutdown(std::net::Shutdown::Write);
                }
            }
        }
        receive(&mut dev, &mut g, &mut conns)?;
        let (live, queued, raw, buffered) = dev.muxer.footprint();
        prop_assert!(live <= n);
        prop_assert!(queued <= n + raw && raw <= 1024);
        // The guest can make the device hold at most the credit it was
        // given (then the connection is reset), plus the "OK" line.
        prop_assert!(
            buffered <= CONN_BUF_ALLOC as usize + 32,
            "{} bytes held for one host peer",
            buffered
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn any_header_on_live_connections(
        responses in prop::collection::vec(
            (prop::bool::weighted(0.85), prop_oneof![3 => Just(CONN_BUF_ALLOC), 1 => any::<u32>(), 1 => 0u32..100]),
            1..4,
        ),
        steps in prop::collection::vec(step(), 1..24),
    ) {
        check_connections(&responses, &steps)?;
    }
}
