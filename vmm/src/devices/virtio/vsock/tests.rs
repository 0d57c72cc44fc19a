//! vsock tests: a small guest driver model on top of the mock queues, talking to the device
//! either directly or through the MMIO transport and a real event loop.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::*;
use super::persist::{SavedConnection, VsockConstructorArgs, VsockState};
use super::*;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{desc, mem, Buf, DriverQueue, DESC_NEXT};
use crate::devices::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::persist::Persist;

const GUEST_CID: u64 = 3;
const RXQ_ADDR: u64 = 0x1_0000;
const TXQ_ADDR: u64 = 0x2_0000;
const EVQ_ADDR: u64 = 0x3_0000;
const RX_SLOTS: u64 = 0x10_0000;
const RX_SLOT_SIZE: u64 = 0x2000;
const RX_SLOT_COUNT: u64 = 128;
const TX_SLOTS: u64 = 0x40_0000;
const TX_SLOT_SIZE: u64 = 0x1_1000;
const TX_SLOT_COUNT: u64 = 64;
const GUEST_BUF_ALLOC: u32 = 256 << 10;

fn sock_path(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "zygote-vsock-{name}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// How the guest model reaches the device.
trait Backend {
    /// Notify queue `q`.
    fn kick(&mut self, q: usize);
    /// Give the device a chance to run, waiting up to `ms` for it to do something.
    fn pump(&mut self, ms: i32);
}

/// Calls the device directly (single-threaded).
struct Direct {
    dev: Vsock,
}

impl Backend for Direct {
    fn kick(&mut self, q: usize) {
        self.dev.process_queue(q);
    }
    fn pump(&mut self, ms: i32) {
        let fd = self.dev.extra_fds()[0];
        if poll_in(fd, ms) {
            self.dev.process_extra_fd(0, EventSet::IN);
        }
    }
}

/// Through `MmioTransport` and an `EventManager` running on its own thread.
struct ViaTransport {
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
    irq_evt: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend for ViaTransport {
    fn kick(&mut self, q: usize) {
        self.queue_evts[q].write(1).unwrap();
    }
    fn pump(&mut self, ms: i32) {
        if poll_in(self.irq_evt.as_raw_fd(), ms) {
            let _ = self.irq_evt.read();
            let mut t = self.transport.lock().unwrap();
            let mut b = [0u8; 4];
            t.read(0x60, &mut b);
            t.write(0x64, &b);
        }
    }
}

impl Drop for ViaTransport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

#[derive(Clone, Copy)]
enum RxLayout {
    /// Linux: 44-byte header descriptor + 4 KiB data descriptor.
    Split,
    /// One descriptor for everything.
    Single,
    /// Header split across descriptors.
    Odd,
}

/// The driver side: queues, buffers, packet (de)serialization.
struct Guest<'a> {
    m: &'a GuestMemoryMmap,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    ev: DriverQueue<'a>,
    layout: RxLayout,
    /// Kick only when the device asked for it (`VIRTIO_RING_F_EVENT_IDX`).
    event_idx: bool,
    rx_free: Vec<u64>,
    rx_inflight: HashMap<u16, (u64, Vec<Buf>)>,
    tx_free: Vec<u64>,
    tx_inflight: HashMap<u16, u64>,
}

fn read_stream(m: &GuestMemoryMmap, bufs: &[Buf], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for &(addr, blen, _) in bufs {
        if out.len() == len {
            break;
        }
        let n = (blen as usize).min(len - out.len());
        let mut b = vec![0u8; n];
        m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

impl<'a> Guest<'a> {
    fn new(m: &'a GuestMemoryMmap, layout: RxLayout) -> Self {
        Guest {
            m,
            rx: DriverQueue::new(m, RXQ_ADDR, RX_QUEUE_SIZE),
            tx: DriverQueue::new(m, TXQ_ADDR, QUEUE_SIZE),
            ev: DriverQueue::new(m, EVQ_ADDR, EVENT_QUEUE_SIZE),
            layout,
            event_idx: false,
            rx_free: (0..RX_SLOT_COUNT)
                .map(|i| RX_SLOTS + i * RX_SLOT_SIZE)
                .collect(),
            rx_inflight: HashMap::new(),
            tx_free: (0..TX_SLOT_COUNT)
                .map(|i| TX_SLOTS + i * TX_SLOT_SIZE)
                .collect(),
            tx_inflight: HashMap::new(),
        }
    }

    fn queues(&self) -> Vec<Queue> {
        vec![
            self.rx.create_queue(),
            self.tx.create_queue(),
            self.ev.create_queue(),
        ]
    }

    fn rx_bufs(&self, base: u64) -> Vec<Buf> {
        match self.layout {
            RxLayout::Split => vec![(base, 44, true), (base + 0x100, 4096, true)],
            RxLayout::Single => vec![(base, 44 + 4096, true)],
            RxLayout::Odd => vec![
                (base, 10, true),
                (base + 0x40, 50, true),
                (base + 0x100, 4000, true),
            ],
        }
    }

    /// Adds up to `n` RX buffers; returns how many.
    fn fill_rx(&mut self, n: usize) -> usize {
        let mut added = 0;
        while added < n {
            if self.rx.free_descriptors() < self.rx_bufs(0).len() {
                break;
            }
            let Some(base) = self.rx_free.pop() else {
                break;
            };
            let bufs = self.rx_bufs(base);
            let head = self.rx.add_chain(&bufs);
            self.rx_inflight.insert(head, (base, bufs));
            added += 1;
        }
        added
    }

    /// Collects received packets, recycling their buffers.
    fn recv(&mut self, b: &mut dyn Backend) -> Vec<(VsockHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rx.pop_used() {
            let (base, bufs) = self.rx_inflight.remove(&head).expect("unknown rx head");
            self.rx_free.push(base);
            if len == 0 {
                continue;
            }
            assert!(len as usize >= HDR_SIZE, "short rx packet {len}");
            let bytes = read_stream(self.m, &bufs, len as usize);
            let hdr = VsockHeader::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                len as usize - HDR_SIZE,
                "hdr.len vs used len"
            );
            out.push((hdr, bytes[HDR_SIZE..].to_vec()));
        }
        let old = self.rx.avail_idx();
        if self.fill_rx(usize::MAX) > 0 && self.rx.needs_kick(self.event_idx, old) {
            b.kick(RXQ);
        }
        out
    }

    fn reclaim_tx(&mut self) {
        while let Some((head, len)) = self.tx.pop_used() {
            assert_eq!(len, 0);
            let slot = self.tx_inflight.remove(&head).expect("unknown tx head");
            self.tx_free.push(slot);
        }
    }

    /// Queues one packet on the TX queue (header and payload in separate descriptors, like
    /// Linux) and notifies the device.
    fn send(&mut self, b: &mut dyn Backend, hdr: &VsockHeader, payload: &[u8]) {
        assert!(payload.len() <= 0x1_0000);
        let start = Instant::now();
        let slot = loop {
            self.reclaim_tx();
            if let Some(s) = self.tx_free.pop() {
                break s;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "tx queue stuck");
            b.pump(10);
        };
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
        let old = self.tx.avail_idx();
        let head = self.tx.add_chain(&bufs);
        self.tx_inflight.insert(head, slot);
        if self.tx.needs_kick(self.event_idx, old) {
            b.kick(TXQ);
        }
    }
}

/// Guest-side state of one stream connection.
struct GuestConn {
    port: u32,
    host_port: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
}

impl GuestConn {
    fn hdr(&mut self, op: u16, len: usize) -> VsockHeader {
        self.last_fwd_sent = self.fwd_cnt;
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: self.port,
            dst_port: self.host_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn update_credit(&mut self, h: &VsockHeader) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

fn wait_packets(b: &mut dyn Backend, g: &mut Guest) -> Vec<(VsockHeader, Vec<u8>)> {
    let start = Instant::now();
    loop {
        let p = g.recv(b);
        if !p.is_empty() {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no packet from the device"
        );
        b.pump(20);
    }
}

fn wait_one(b: &mut dyn Backend, g: &mut Guest) -> (VsockHeader, Vec<u8>) {
    let mut p = wait_packets(b, g);
    assert_eq!(p.len(), 1, "expected one packet, got {p:?}");
    p.pop().unwrap()
}

/// Host connects, guest accepts: returns the host stream and the guest's view.
fn handshake(
    b: &mut dyn Backend,
    g: &mut Guest,
    path: &std::path::Path,
    port: u32,
) -> (UnixStream, GuestConn) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = wait_one(b, g);
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.src_cid, HOST_CID);
    assert_eq!(req.dst_cid, GUEST_CID);
    assert_eq!(req.dst_port, port);
    assert_eq!(req.type_, TYPE_STREAM);
    assert!(req.src_port >= 1 << 30);
    let mut c = GuestConn {
        port,
        host_port: req.src_port,
        fwd_cnt: 0,
        last_fwd_sent: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
    };
    c.update_credit(&req);
    let resp = c.hdr(OP_RESPONSE, 0);
    g.send(b, &resp, &[]);
    let expected = format!("OK {}\n", req.src_port);
    let mut line = vec![0u8; expected.len()];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut line).unwrap();
    assert_eq!(String::from_utf8(line).unwrap(), expected);
    (s, c)
}

fn direct(m: &GuestMemoryMmap, g: &mut Guest, path: &std::path::Path) -> Direct {
    let mut dev = Vsock::new(GUEST_CID, path).unwrap();
    dev.activate(m.clone(), g.queues(), Interrupt::new().unwrap())
        .unwrap();
    g.fill_rx(64);
    Direct { dev }
}

#[test]
fn rejects_reserved_cids_and_reports_config() {
    let path = sock_path("cid");
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(
            Vsock::new(cid, &path),
            Err(Error::InvalidCid(c)) if c == cid
        ));
    }
    let dev = Vsock::new(0x1234_5678, &path).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(
        dev.queue_max_sizes(),
        &[RX_QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE]
    );
    let mut lo = [0u8; 4];
    dev.read_config(0, &mut lo);
    assert_eq!(u32::from_le_bytes(lo), 0x1234_5678);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    // The config space is read-only: a write is refused, and counted.
    let mut dev = dev;
    dev.write_config(0, &[9]);
    dev.read_config(0, &mut lo);
    assert_eq!(u32::from_le_bytes(lo), 0x1234_5678);
    assert_eq!(dev.rejected().count, 1);
    // The path is taken while the device lives, and released afterwards.
    assert!(matches!(Vsock::new(5, &path), Err(Error::Bind { .. })));
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn round_trip_through_unix_socket() {
    let m = mem();
    let path = sock_path("rt");
    for layout in [RxLayout::Split, RxLayout::Single, RxLayout::Odd] {
        let mut g = Guest::new(&m, layout);
        let mut d = direct(&m, &mut g, &path);
        let (mut s, mut c) = handshake(&mut d, &mut g, &path, 1024);

        // host -> guest
        s.write_all(b"hello guest").unwrap();
        let (h, data) = wait_one(&mut d, &mut g);
        assert_eq!(h.op, OP_RW);
        assert_eq!((h.src_port, h.dst_port), (c.host_port, c.port));
        assert_eq!(data, b"hello guest");
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);

        // guest -> host
        let hdr = c.hdr(OP_RW, 11);
        g.send(&mut d, &hdr, b"hello host!");
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host!");

        // Credit request -> credit update carrying fwd_cnt = 11.
        let hdr = c.hdr(OP_CREDIT_REQUEST, 0);
        g.send(&mut d, &hdr, &[]);
        let (h, _) = wait_one(&mut d, &mut g);
        assert_eq!(h.op, OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, 11);

        // Host closes: SHUTDOWN (both) then RST, connection gone.
        drop(s);
        let mut pkts = Vec::new();
        while pkts.len() < 2 {
            pkts.extend(wait_packets(&mut d, &mut g));
        }
        assert_eq!(pkts[0].0.op, OP_SHUTDOWN);
        assert_eq!(pkts[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(pkts[1].0.op, OP_RST);
        assert_eq!(d.dev.connection_count(), 0);
        drop(d);
    }
}

#[test]
fn guest_refuses_connection() {
    let m = mem();
    let path = sock_path("refuse");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = wait_one(&mut d, &mut g);
    assert_eq!(req.op, OP_REQUEST);
    let rst = VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 52,
        dst_port: req.src_port,
        type_: TYPE_STREAM,
        op: OP_RST,
        ..Default::default()
    };
    g.send(&mut d, &rst, &[]);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "unix stream closed");
    assert_eq!(d.dev.connection_count(), 0);
}

#[test]
fn bad_connect_lines_close_the_stream() {
    let m = mem();
    let path = sock_path("badline");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    for line in [
        &b"HELLO 52\n"[..],
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
        &[b'x'; 100],
    ] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(line).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 4];
        let start = Instant::now();
        loop {
            d.pump(20);
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => panic!("unexpected data"),
                Err(_) => assert!(start.elapsed() < Duration::from_secs(5), "not closed"),
            }
        }
    }
    assert_eq!(d.dev.connection_count(), 0);
    assert!(g.recv(&mut d).is_empty(), "the guest heard nothing");
}

#[test]
fn guest_initiated_connections_are_reset() {
    let m = mem();
    let path = sock_path("guestreq");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let req = VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 4000,
        dst_port: 80,
        type_: TYPE_STREAM,
        op: OP_REQUEST,
        buf_alloc: 4096,
        ..Default::default()
    };
    g.send(&mut d, &req, &[]);
    let (h, _) = wait_one(&mut d, &mut g);
    assert_eq!(h.op, OP_RST);
    assert_eq!((h.src_port, h.dst_port), (80, 4000));
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
    // It is counted as refused.
    let rejected = d.dev.rejected();
    assert_eq!(rejected.count, 1);
    assert_eq!(
        rejected.last.as_deref(),
        Some("TX packet dropped: guest-initiated connection from guest port 4000 to host port 80 refused (not supported)")
    );
    // An RST to an unknown connection gets no answer, and is no fault.
    let rst = VsockHeader { op: OP_RST, ..req };
    g.send(&mut d, &rst, &[]);
    d.pump(20);
    assert!(g.recv(&mut d).is_empty());
    // Neither is a straggler of a connection that is gone (it gets a reset).
    let late = VsockHeader {
        op: OP_CREDIT_UPDATE,
        ..req
    };
    g.send(&mut d, &late, &[]);
    assert_eq!(wait_one(&mut d, &mut g).0.op, OP_RST);
    // An operation that does not exist is.
    let unknown = VsockHeader { op: 99, ..req };
    g.send(&mut d, &unknown, &[]);
    assert_eq!(wait_one(&mut d, &mut g).0.op, OP_RST);
    let rejected = d.dev.rejected();
    assert_eq!(rejected.count, 2);
    assert_eq!(
        rejected.last.as_deref(),
        Some("TX packet dropped: unknown operation 99")
    );
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let m = mem();
    let path = sock_path("badtx");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let (mut s, mut c) = handshake(&mut d, &mut g, &path, 1024);
    assert_eq!(d.dev.rejected().count, 0, "a handshake is no fault");

    let good = c.hdr(OP_RW, 4);
    let slot = TX_SLOTS + 60 * TX_SLOT_SIZE;
    m.write_slice(&good.to_bytes(), GuestAddress(slot)).unwrap();
    m.write_slice(b"evil", GuestAddress(slot + 0x100)).unwrap();
    let bad_cid = VsockHeader { src_cid: 7, ..good };
    m.write_slice(&bad_cid.to_bytes(), GuestAddress(slot + 0x200))
        .unwrap();
    let bad_type = VsockHeader { type_: 2, ..good };
    m.write_slice(&bad_type.to_bytes(), GuestAddress(slot + 0x300))
        .unwrap();
    let too_long = VsockHeader { len: 5000, ..good };
    m.write_slice(&too_long.to_bytes(), GuestAddress(slot + 0x400))
        .unwrap();
    let huge = VsockHeader {
        len: u32::MAX,
        ..good
    };
    m.write_slice(&huge.to_bytes(), GuestAddress(slot + 0x500))
        .unwrap();

    let cases: Vec<Vec<Buf>> = vec![
        // Chain shorter than the header.
        vec![(slot, 20, false)],
        vec![(slot, 20, false), (slot + 20, 10, false)],
        // Header + payload in a write-only descriptor.
        vec![(slot, 44, false), (slot + 0x100, 4, true)],
        // Everything write-only.
        vec![(slot, 44, true)],
        // Outside guest memory.
        vec![(0x1_0000_0000, 44, false)],
        vec![(slot, 44, false), (0xfff_fffe, 0x1000, false)],
        // len beyond the descriptors.
        vec![(slot + 0x400, 44, false), (slot + 0x100, 4, false)],
        vec![(slot + 0x500, 44, false)],
        // Wrong CID / type.
        vec![(slot + 0x200, 44, false), (slot + 0x100, 4, false)],
        vec![(slot + 0x300, 44, false), (slot + 0x100, 4, false)],
        // Zero-length descriptors only.
        vec![(slot, 0, false), (slot, 0, false)],
    ];
    g.reclaim_tx();
    for (i, bufs) in cases.iter().enumerate() {
        let head = g.tx.add_chain(bufs);
        d.kick(TXQ);
        assert_eq!(g.tx.pop_used(), Some((head, 0)));
        assert_eq!(d.dev.rejected().count, i as u64 + 1, "{bufs:?}");
    }
    assert_eq!(
        d.dev.rejected().last.as_deref(),
        Some("TX packet dropped: packet of 0 bytes is shorter than the header")
    );
    // A loop and an out-of-range next index.
    let free = 200;
    g.tx.add_raw(
        &[
            (free, desc(slot, 44, DESC_NEXT, free + 1)),
            (free + 1, desc(slot + 0x100, 4, DESC_NEXT, free)),
        ],
        free,
    );
    d.kick(TXQ);
    assert_eq!(g.tx.pop_used(), Some((free, 0)));
    g.tx.add_raw(&[(free, desc(slot, 44, DESC_NEXT, 999))], free);
    d.kick(TXQ);
    assert_eq!(g.tx.pop_used(), Some((free, 0)));
    assert_eq!(d.dev.rejected().count, cases.len() as u64 + 2);

    // Nothing reached the host, no reply to the guest, the connection still works.
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert!(s.read(&mut buf).is_err());
    assert!(g.recv(&mut d).is_empty());
    assert_eq!(d.dev.connection_count(), 1);
    s.set_nonblocking(false).unwrap();
    // Header split across two descriptors, payload in a third one.
    let hdr = c.hdr(OP_RW, 4).to_bytes();
    m.write_slice(&hdr, GuestAddress(slot + 0x800)).unwrap();
    g.tx.add_chain(&[
        (slot + 0x800, 30, false),
        (slot + 0x800 + 30, 14, false),
        (slot + 0x100, 4, false),
    ]);
    d.kick(TXQ);
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"evil");
    assert_eq!(d.dev.rejected().count, cases.len() as u64 + 2);
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let m = mem();
    let path = sock_path("badrx");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    dev.activate(m.clone(), g.queues(), Interrupt::new().unwrap())
        .unwrap();
    let mut d = Direct { dev };
    // Bad buffers first, then a good one.
    let bad: Vec<Vec<Buf>> = vec![
        vec![(RX_SLOTS, 20, true)],
        vec![(RX_SLOTS, 44, false), (RX_SLOTS + 0x100, 4096, true)],
        vec![(0x2_0000_0000, 4096, true)],
        vec![(RX_SLOTS, 0, true)],
    ];
    let mut bad_heads = Vec::new();
    for b in &bad {
        bad_heads.push(g.rx.add_chain(b));
    }
    let base = RX_SLOTS + 0x8000;
    let good = vec![(base, 44, true), (base + 0x100, 4096, true)];
    let good_head = g.rx.add_chain(&good);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    let start = Instant::now();
    let mut used = Vec::new();
    while used.len() < 5 {
        assert!(start.elapsed() < Duration::from_secs(5));
        d.pump(20);
        used.extend(std::iter::from_fn(|| g.rx.pop_used()));
    }
    for (i, h) in bad_heads.iter().enumerate() {
        assert_eq!(used[i], (*h, 0));
    }
    assert_eq!(used[4].0, good_head);
    let rejected = d.dev.rejected();
    assert_eq!(rejected.count, 4);
    assert_eq!(
        rejected.last.as_deref(),
        Some("RX buffer of 0 bytes cannot hold a packet header (44 bytes): returned unused")
    );
    let bytes = read_stream(&m, &good, used[4].1 as usize);
    let hdr = VsockHeader::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
    assert_eq!(hdr.op, OP_REQUEST);
    assert_eq!(hdr.dst_port, 9);
}

#[test]
fn respects_guest_credit() {
    let m = mem();
    let path = sock_path("credit");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = wait_one(&mut d, &mut g);
    // The guest only has 100 bytes of buffer space.
    let mut c = GuestConn {
        port: 7,
        host_port: req.src_port,
        fwd_cnt: 0,
        last_fwd_sent: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
    };
    let mut resp = c.hdr(OP_RESPONSE, 0);
    resp.buf_alloc = 100;
    g.send(&mut d, &resp, &[]);
    let mut line = [0u8; 14];
    s.read_exact(&mut line).unwrap();

    s.write_all(&[1u8; 1000]).unwrap();
    let mut got = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        for (h, data) in g.recv(&mut d) {
            assert_eq!(h.op, OP_RW);
            got += data.len();
        }
        d.pump(20);
    }
    assert_eq!(got, 100, "only the credit the guest gave");
    // With no credit the stream is not watched: nothing to spin on.
    assert!(!poll_in(d.dev.extra_fds()[0], 0));
    // The guest consumes and says so: the rest flows.
    c.fwd_cnt = 100;
    let mut upd = c.hdr(OP_CREDIT_UPDATE, 0);
    upd.buf_alloc = 1000;
    g.send(&mut d, &upd, &[]);
    let start = Instant::now();
    while got < 1000 {
        assert!(start.elapsed() < Duration::from_secs(5), "stalled at {got}");
        for (_, data) in g.recv(&mut d) {
            got += data.len();
        }
        d.pump(20);
    }
    assert_eq!(got, 1000);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let m = mem();
    let path = sock_path("overrun");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let (s, mut c) = handshake(&mut d, &mut g, &path, 1024);
    // The host does not read: the device buffers up to CONN_BUF_ALLOC, then resets.
    let chunk = vec![0xabu8; 0x1_0000];
    let mut sent = 0usize;
    let mut reset = false;
    while sent < 64 << 20 && !reset {
        let h = c.hdr(OP_RW, chunk.len());
        g.send(&mut d, &h, &chunk);
        sent += chunk.len();
        for (h, _) in g.recv(&mut d) {
            if h.op == OP_RST {
                reset = true;
            }
        }
    }
    assert!(reset, "no RST after {sent} bytes");
    let rejected = d.dev.rejected();
    assert!(rejected.count >= 1);
    let last = rejected.last.unwrap();
    assert!(
        last.starts_with("TX packet dropped: host port ")
            && last.contains("exceed the connection's credit of 262144: connection reset"),
        "{last}"
    );
    drop(s);
}

#[test]
fn guest_shutdown_flushes_then_closes() {
    let m = mem();
    let path = sock_path("gshut");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let (mut s, mut c) = handshake(&mut d, &mut g, &path, 1024);
    // Send more than the Unix socket buffer holds while the host does not read yet.
    let total = 200 << 10;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    for chunk in data.chunks(0x1_0000) {
        let h = c.hdr(OP_RW, chunk.len());
        g.send(&mut d, &h, chunk);
        c.tx_cnt += chunk.len() as u32;
    }
    let mut h = c.hdr(OP_SHUTDOWN, 0);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(&mut d, &h, &[]);
    let mut ops = Vec::new();
    while !ops.contains(&OP_RST) {
        ops.extend(wait_packets(&mut d, &mut g).into_iter().map(|(h, _)| h.op));
    }
    // Possibly credit updates for what was flushed so far, then the RST.
    assert!(ops[..ops.len() - 1]
        .iter()
        .all(|&op| op == OP_CREDIT_UPDATE));
    // The host still gets everything, then EOF.
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    });
    let start = Instant::now();
    while d.dev.connection_count() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        d.pump(20);
    }
    assert_eq!(reader.join().unwrap(), data);
}

#[test]
fn host_half_close_keeps_guest_to_host_open() {
    let m = mem();
    let path = sock_path("halfclose");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let (mut s, mut c) = handshake(&mut d, &mut g, &path, 1024);
    s.write_all(b"request").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut pkts = Vec::new();
    while pkts.len() < 2 {
        pkts.extend(wait_packets(&mut d, &mut g));
    }
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!(pkts[0].1, b"request");
    assert_eq!(pkts[1].0.op, OP_SHUTDOWN);
    assert_eq!(pkts[1].0.flags, SHUTDOWN_SEND);
    // The guest answers and closes.
    let h = c.hdr(OP_RW, 8);
    g.send(&mut d, &h, b"response");
    let mut h = c.hdr(OP_SHUTDOWN, 0);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(&mut d, &h, &[]);
    let (rst, _) = wait_one(&mut d, &mut g);
    assert_eq!(rst.op, OP_RST);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"response");
    assert_eq!(d.dev.connection_count(), 0);
}

#[test]
fn connections_before_activation_and_reset() {
    let m = mem();
    let path = sock_path("preact");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    // The host connects before the guest driver is up.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    for _ in 0..3 {
        if poll_in(dev.extra_fds()[0], 50) {
            dev.process_extra_fd(0, EventSet::IN);
        }
    }
    assert_eq!(dev.connection_count(), 1);
    dev.activate(m.clone(), g.queues(), Interrupt::new().unwrap())
        .unwrap();
    g.fill_rx(8);
    let mut d = Direct { dev };
    d.kick(RXQ);
    let (req, _) = wait_one(&mut d, &mut g);
    assert_eq!(req.op, OP_REQUEST);
    // A device reset drops the connection.
    d.dev.reset();
    assert_eq!(d.dev.connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
}

/// Drives one connection in both directions at once until `total` bytes went each way,
/// checking content and order. Returns the guest's received byte count.
fn pattern(i: usize, seed: u8) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9)).wrapping_add(seed as usize) as u8
}

fn bidirectional(b: &mut dyn Backend, g: &mut Guest, path: &std::path::Path, total: usize) {
    let (s, mut c) = handshake(b, g, path, 1024);
    let mut s_read = s.try_clone().unwrap();
    s_read.set_read_timeout(None).unwrap();
    let mut s_write = s;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..total).map(|i| pattern(i, 1)).collect();
        // Uneven writes.
        let mut off = 0;
        let mut n = 1;
        while off < total {
            let end = (off + n).min(total);
            s_write.write_all(&data[off..end]).unwrap();
            off = end;
            n = (n * 3 + 7) % 100_000 + 1;
        }
        s_write
    });
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        while got < total {
            let n = s_read.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {got} bytes");
            for (k, &byte) in buf[..n].iter().enumerate() {
                assert_eq!(byte, pattern(got + k, 2), "host byte {}", got + k);
            }
            got += n;
        }
        s_read
    });

    let mut sent = 0usize;
    let mut received = 0usize;
    let mut chunk = 1usize;
    let start = Instant::now();
    let mut last_progress = Instant::now();
    // Until the host threads are done too: the last guest bytes reach the
    // host socket only while the device is pumped, so joining the reader
    // before that would wait forever.
    while sent < total || received < total || !writer.is_finished() || !reader.is_finished() {
        assert!(
            last_progress.elapsed() < Duration::from_secs(20),
            "stalled: sent {sent} received {received}, host writer done: {}, host reader done: {}",
            writer.is_finished(),
            reader.is_finished()
        );
        let mut progress = false;
        for (h, data) in g.recv(b) {
            assert_eq!((h.src_port, h.dst_port), (c.host_port, c.port));
            c.update_credit(&h);
            match h.op {
                OP_RW => {
                    for (k, &byte) in data.iter().enumerate() {
                        assert_eq!(
                            byte,
                            pattern(received + k, 1),
                            "guest byte {}",
                            received + k
                        );
                    }
                    received += data.len();
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(data.len() as u32);
                    progress = true;
                }
                OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op}"),
            }
        }
        // Like Linux: tell the host about freed space once its view gets low.
        if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) > GUEST_BUF_ALLOC - (64 << 10) {
            let h = c.hdr(OP_CREDIT_UPDATE, 0);
            g.send(b, &h, &[]);
        }
        if sent < total {
            let n = chunk.min(total - sent).min(c.credit() as usize);
            if n > 0 {
                let data: Vec<u8> = (sent..sent + n).map(|i| pattern(i, 2)).collect();
                let h = c.hdr(OP_RW, n);
                g.send(b, &h, &data);
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                sent += n;
                chunk = (chunk * 5 + 3) % 0x1_0000 + 1;
                progress = true;
            }
        }
        if progress {
            last_progress = Instant::now();
        } else {
            b.pump(5);
        }
    }
    let s_write = writer.join().unwrap();
    let _s_read = reader.join().unwrap();
    eprintln!(
        "bidirectional {} MiB each way in {:?}",
        total >> 20,
        start.elapsed()
    );
    // Host closes: the guest hears SHUTDOWN + RST.
    drop(s_write);
    drop(_s_read);
    let mut ops = Vec::new();
    while !ops.contains(&OP_RST) {
        ops.extend(wait_packets(b, g).into_iter().map(|(h, _)| h.op));
    }
    // A late credit update for the last guest data may come first.
    ops.retain(|&op| op != OP_CREDIT_UPDATE);
    assert_eq!(ops, vec![OP_SHUTDOWN, OP_RST]);
}

#[test]
fn bulk_transfer_direct() {
    let m = mem();
    let path = sock_path("bulk");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    bidirectional(&mut d, &mut g, &path, 2 << 20);
    assert_eq!(d.dev.connection_count(), 0);
}

fn mmio_write(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn mmio_read(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Brings the device up through the MMIO registers, as Linux does.
fn driver_init(t: &mut MmioTransport, g: &Guest) {
    assert_eq!(mmio_read(t, 0), 0x7472_6976);
    assert_eq!(mmio_read(t, 4), 2);
    assert_eq!(mmio_read(t, 8), 19);
    mmio_write(t, 0x70, 0);
    mmio_write(t, 0x70, STATUS_ACKNOWLEDGE);
    mmio_write(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    mmio_write(t, 0x14, 1);
    let hi = mmio_read(t, 0x10);
    mmio_write(t, 0x14, 0);
    let lo = mmio_read(t, 0x10);
    let features = (u64::from(hi) << 32) | u64::from(lo);
    mmio_write(t, 0x24, 1);
    mmio_write(t, 0x20, (features >> 32) as u32);
    mmio_write(t, 0x24, 0);
    mmio_write(t, 0x20, features as u32);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    mmio_write(t, 0x70, s);
    assert_eq!(mmio_read(t, 0x70), s);
    let mut cid = [0u8; 8];
    t.read(0x100, &mut cid[..4]);
    t.read(0x104, &mut cid[4..]);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let sizes = [RX_QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE];
    for (i, q) in [&g.rx, &g.tx, &g.ev].iter().enumerate() {
        let (d, a, u) = q.addrs();
        mmio_write(t, 0x30, i as u32);
        assert_eq!(mmio_read(t, 0x44), 0);
        assert_eq!(mmio_read(t, 0x34), u32::from(sizes[i]));
        mmio_write(t, 0x38, u32::from(sizes[i]));
        mmio_write(t, 0x80, d as u32);
        mmio_write(t, 0x84, (d >> 32) as u32);
        mmio_write(t, 0x90, a as u32);
        mmio_write(t, 0x94, (a >> 32) as u32);
        mmio_write(t, 0xa0, u as u32);
        mmio_write(t, 0xa4, (u >> 32) as u32);
        mmio_write(t, 0x44, 1);
    }
    mmio_write(t, 0x70, s | STATUS_DRIVER_OK);
    assert_eq!(mmio_read(t, 0x70), s | STATUS_DRIVER_OK);
    assert!(t.is_activated());
}

fn via_transport(m: &GuestMemoryMmap, g: &mut Guest, path: &std::path::Path) -> ViaTransport {
    let dev = Vsock::new(GUEST_CID, path).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), m.clone()).unwrap();
    let queue_evts = t
        .queue_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    let irq_evt = t.interrupt_evt().try_clone().unwrap();
    // Like Linux: buffers are queued right after DRIVER_OK, then the queue is kicked.
    driver_init(&mut t, g);
    let transport = Arc::new(Mutex::new(t));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    em.add_subscriber(transport.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            em.run_with_timeout(50).unwrap();
        }
    });
    let mut b = ViaTransport {
        transport,
        queue_evts,
        irq_evt,
        stop,
        thread: Some(thread),
    };
    g.fill_rx(128);
    b.kick(RXQ);
    b
}

#[test]
fn bulk_transfer_through_transport_and_event_loop() {
    let m = mem();
    let path = sock_path("e2e");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut b = via_transport(&m, &mut g, &path);
    bidirectional(&mut b, &mut g, &path, 10 << 20);
    // A second connection on the same device works too.
    bidirectional(&mut b, &mut g, &path, 1 << 20);
    // Reset through the status register.
    let mut t = b.transport.lock().unwrap();
    mmio_write(&mut t, 0x70, 0);
    assert!(!t.is_activated());
}

#[test]
fn bulk_transfer_with_event_idx() {
    let m = mem();
    let path = sock_path("evidx");
    let mut g = Guest::new(&m, RxLayout::Single);
    g.event_idx = true;
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mut queues = g.queues();
    for q in &mut queues {
        virtio_queue::QueueT::set_event_idx(q, true);
    }
    dev.activate(m.clone(), queues, Interrupt::new().unwrap())
        .unwrap();
    g.fill_rx(64);
    let mut d = Direct { dev };
    bidirectional(&mut d, &mut g, &path, 1 << 20);
}

#[test]
fn no_busy_loop_without_rx_buffers() {
    let m = mem();
    let path = sock_path("norx");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let (mut s, mut c) = handshake(&mut d, &mut g, &path, 1024);
    // Plenty of credit: RX buffers are the limit.
    let mut upd = c.hdr(OP_CREDIT_UPDATE, 0);
    upd.buf_alloc = 64 << 20;
    g.send(&mut d, &upd, &[]);
    // The host writes until its socket is full while the guest never returns RX buffers.
    s.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 4096];
    let mut sent = 0usize;
    let mut idle = 0;
    while idle < 20 {
        match s.write(&chunk) {
            Ok(n) => {
                sent += n;
                idle = 0;
            }
            Err(_) => idle += 1,
        }
        d.pump(1);
    }
    // More than the posted RX buffers can hold (split layout: 2 descriptors each).
    let posted = usize::from(RX_QUEUE_SIZE) / 2;
    assert!(sent > posted * 4096, "only {sent} bytes written");
    // Every RX buffer is used, the stream still has data, and the epoll fd is quiet: the
    // connection waits for RX buffers, not for EPOLLIN.
    assert!(!poll_in(d.dev.extra_fds()[0], 50));
    // Buffers come back: data flows again, in order.
    let mut got = 0usize;
    let start = Instant::now();
    while got < sent {
        for (h, data) in g.recv(&mut d) {
            assert_eq!((h.op, h.dst_port), (OP_RW, c.port));
            assert!(data.iter().all(|&b| b == 7));
            got += data.len();
        }
        d.pump(10);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "stalled at {got}"
        );
    }
    assert_eq!(got, sent);
}

#[test]
fn concurrent_connections_do_not_mix() {
    let m = mem();
    let path = sock_path("multi");
    let mut g = Guest::new(&m, RxLayout::Split);
    let mut d = direct(&m, &mut g, &path);
    let (s1, mut c1) = handshake(&mut d, &mut g, &path, 1);
    let (s2, mut c2) = handshake(&mut d, &mut g, &path, 2);
    let total = 1 << 20;
    let writers: Vec<_> = [(s1, 1u8), (s2, 2u8)]
        .into_iter()
        .map(|(mut s, seed)| {
            std::thread::spawn(move || {
                let data: Vec<u8> = (0..total).map(|i| pattern(i, seed)).collect();
                s.write_all(&data).unwrap();
                s
            })
        })
        .collect();
    let mut got = [0usize; 2];
    let start = Instant::now();
    while got != [total, total] {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "stalled at {got:?}"
        );
        for (h, data) in g.recv(&mut d) {
            assert_eq!(h.op, OP_RW);
            let (k, c) = if h.src_port == c1.host_port {
                (0, &mut c1)
            } else {
                assert_eq!(h.src_port, c2.host_port);
                (1, &mut c2)
            };
            assert_eq!(h.dst_port, c.port);
            for (i, &b) in data.iter().enumerate() {
                assert_eq!(b, pattern(got[k] + i, k as u8 + 1));
            }
            got[k] += data.len();
            c.fwd_cnt = got[k] as u32;
            if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) > GUEST_BUF_ALLOC / 2 {
                let h = c.hdr(OP_CREDIT_UPDATE, 0);
                g.send(&mut d, &h, &[]);
            }
        }
        d.pump(5);
    }
    for w in writers {
        drop(w.join().unwrap());
    }
}

#[test]
fn restore_tells_the_guest_its_transport_was_reset() {
    let m = mem();
    let path = sock_path("restored");
    let mut g = Guest::new(&m, RxLayout::Split);
    // The driver posts an event buffer, as Linux does at probe.
    const EV_BUF: u64 = 0x3f_0000;
    g.ev.add_chain(&[(EV_BUF, 8, true)]);
    m.write_obj(0xffff_ffffu32, GuestAddress(EV_BUF)).unwrap();
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let irq = Interrupt::new().unwrap();
    dev.activate(m.clone(), g.queues(), irq.clone()).unwrap();
    dev.restored();
    let (_, len) = g.ev.pop_used().expect("an event was delivered");
    assert_eq!(len, 4);
    let id: u32 = m.read_obj(GuestAddress(EV_BUF)).unwrap();
    assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
    assert_ne!(
        irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_VRING,
        0
    );

    // Until the guest hands the event buffer back, a new host connection
    // waits: the reset would drop it too.
    g.fill_rx(64);
    let mut b = Direct { dev };
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    for _ in 0..5 {
        b.pump(20);
        assert!(
            g.recv(&mut b).is_empty(),
            "request sent before the reset was handled"
        );
    }
    g.ev.add_chain(&[(EV_BUF, 8, true)]);
    b.kick(EVQ);
    let (req, _) = wait_one(&mut b, &mut g);
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.dst_port, 52);
    drop(s);

    // A guest that never hands it back gets the interrupt again every
    // RESET_NUDGE, and holds connections for RESET_GRACE at most.
    b.dev.restored();
    assert!(g.ev.pop_used().is_some());
    let irq = b.dev.active.as_ref().unwrap().irq.clone();
    let start = Instant::now();
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 53\n").unwrap();
    let timer = b.dev.extra_fds()[1];
    let mut nudges = 0;
    let req = loop {
        assert!(
            start.elapsed() < RESET_GRACE * 3,
            "no request after the grace period"
        );
        if poll_in(timer, 10) {
            // The guest never acknowledges: each tick raises it again.
            let _ = irq.eventfd().read();
            b.dev.process_extra_fd(1, EventSet::IN);
            if irq.eventfd().read().is_ok() {
                nudges += 1;
            }
        }
        b.pump(0);
        if let Some((h, _)) = g.recv(&mut b).into_iter().find(|(h, _)| h.op == OP_REQUEST) {
            break h;
        }
    };
    assert_eq!(req.dst_port, 53);
    assert!(start.elapsed() >= RESET_GRACE - Duration::from_millis(50));
    assert!(nudges >= 10, "interrupt raised again {nudges} times");

    // Once the guest acknowledges, the ticks stop.
    irq.ack(u32::MAX);
    let _ = irq.eventfd().read();
    if poll_in(timer, 500) {
        b.dev.process_extra_fd(1, EventSet::IN);
    }
    assert!(!poll_in(timer, 200), "the timer stopped");

    // Without an event buffer, nothing breaks.
    b.dev.restored();
    assert!(g.ev.pop_used().is_none());
}

/// The device's queues as they are (what the transport saves).
fn queues_of(dev: &Vsock) -> Vec<Queue> {
    dev.queues()
        .iter()
        .map(|q| Queue::try_from(q.state()).unwrap())
        .collect()
}

/// A clone's device: rebuilt from the master's `saved` state over the same
/// guest memory and `queues`, its socket at `path`, restored (`reset`: as
/// with `--vsock-reset`).
fn restored_clone(
    m: &GuestMemoryMmap,
    saved: &VsockState,
    queues: Vec<Queue>,
    path: &std::path::Path,
    reset: bool,
) -> Direct {
    let args = VsockConstructorArgs {
        uds_path: path.to_path_buf(),
        reset,
    };
    let mut dev = Vsock::restore(args, saved).unwrap();
    dev.activate(m.clone(), queues, Interrupt::new().unwrap())
        .unwrap();
    dev.restored();
    Direct { dev }
}

/// Reads the `OK <port>[ carried]` line a host stream gets.
fn ok_line(b: &mut dyn Backend, s: &mut UnixStream) -> String {
    let start = Instant::now();
    while !poll_in(s.as_raw_fd(), 0) {
        assert!(start.elapsed() < Duration::from_secs(10), "no answer");
        b.pump(10);
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host and guest exchange `to_guest` and `to_host` on an established
/// connection; the guest model's counters follow.
fn exchange(
    b: &mut dyn Backend,
    g: &mut Guest,
    s: &mut UnixStream,
    c: &mut GuestConn,
    to_guest: &[u8],
    to_host: &[u8],
) -> VsockHeader {
    s.write_all(to_guest).unwrap();
    let (h, data) = wait_one(b, g);
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, c.host_port, c.port));
    assert_eq!(data, to_guest);
    c.update_credit(&h);
    c.fwd_cnt = c.fwd_cnt.wrapping_add(data.len() as u32);
    let out = c.hdr(OP_RW, to_host.len());
    c.tx_cnt = c.tx_cnt.wrapping_add(to_host.len() as u32);
    g.send(b, &out, to_host);
    let mut got = vec![0u8; to_host.len()];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, to_host);
    h
}

#[test]
fn an_idle_connection_is_carried_into_a_clone_and_the_rest_are_reset() {
    let m = mem();
    let mut g = Guest::new(&m, RxLayout::Split);
    const EV_BUF: u64 = 0x3f_0000;
    g.ev.add_chain(&[(EV_BUF, 8, true)]);
    let master_path = sock_path("carry-master");
    let mut a = direct(&m, &mut g, &master_path);
    // An older connection to the agent's port, the newest one (idle after
    // an exchange), and one the guest half-closed.
    let (_old_s, old) = handshake(&mut a, &mut g, &master_path, 1024);
    let (mut s, mut c) = handshake(&mut a, &mut g, &master_path, 1024);
    exchange(&mut a, &mut g, &mut s, &mut c, b"warm-up", b"done!");
    let (_half_s, mut half) = handshake(&mut a, &mut g, &master_path, 7);
    let shut = half.hdr(OP_SHUTDOWN, 0);
    let mut shut = shut;
    shut.flags = SHUTDOWN_SEND;
    g.send(&mut a, &shut, &[]);
    a.pump(20);

    let saved = a.dev.save();
    // The queues as the guest left them (the transport saves them).
    let queues = queues_of(&a.dev);
    let conns = saved.connections.clone().unwrap();
    assert_eq!(conns.len(), 3, "{conns:?}");
    let carried: Vec<_> = conns.iter().filter(|s| s.carried.is_some()).collect();
    assert_eq!(carried.len(), 1, "{conns:?}");
    assert_eq!(carried[0].local_port, c.host_port, "the newest is carried");
    let counters = carried[0].carried.unwrap();
    assert_eq!(counters.fwd_cnt, 5, "the guest's 5 bytes were forwarded");
    assert_eq!(counters.rx_cnt, 7, "7 bytes went to the guest");
    drop(a);

    // The clone: same guest memory and queues, a new device.
    let clone_path = sock_path("carry-clone");
    let mut b = restored_clone(&m, &saved, queues, &clone_path, false);
    assert!(g.ev.pop_used().is_none(), "no transport reset");
    // The two others get a reset each.
    let mut resets: Vec<(u32, u32)> = wait_packets(&mut b, &mut g)
        .into_iter()
        .map(|(h, _)| {
            assert_eq!(h.op, OP_RST);
            (h.src_port, h.dst_port)
        })
        .collect();
    resets.sort();
    let mut want = vec![(old.host_port, 1024), (half.host_port, 7)];
    want.sort();
    assert_eq!(resets, want);

    // The first host connection to port 1024 takes the carried one over:
    // no request reaches the guest, and the data continues the counters.
    let mut s2 = UnixStream::connect(&clone_path).unwrap();
    s2.write_all(b"CONNECT 1024\n").unwrap();
    assert_eq!(
        ok_line(&mut b, &mut s2),
        format!("OK {} carried\n", c.host_port)
    );
    for _ in 0..3 {
        b.pump(10);
        assert!(g.recv(&mut b).is_empty(), "nothing went to the guest");
    }
    let h = exchange(&mut b, &mut g, &mut s2, &mut c, b"identity", b"set");
    assert_eq!(h.fwd_cnt, 5, "the host's count of guest bytes goes on");
    exchange(&mut b, &mut g, &mut s2, &mut c, b"ping", b"pong");

    // A second connection to the same port is a new one.
    let (_s3, c3) = handshake(&mut b, &mut g, &clone_path, 1024);
    assert_ne!(c3.host_port, c.host_port);

    let mut phases = Vec::new();
    b.dev.take_phases(&mut phases);
    let steps: Vec<DevicePhase> = phases
        .iter()
        .map(|&(p, _)| p)
        .filter(|p| *p != DevicePhase::IrqRaised)
        .collect();
    assert_eq!(
        steps,
        [
            DevicePhase::StaleConnectionsReset,
            DevicePhase::ConnectionCarried,
            DevicePhase::FirstRx,
            DevicePhase::FirstTx
        ]
    );
    assert!(phases.windows(2).all(|w| w[0].1 <= w[1].1), "in time order");
}

#[test]
fn a_carried_connection_the_guest_touches_before_the_host_is_reset() {
    let m = mem();
    let mut g = Guest::new(&m, RxLayout::Split);
    let master_path = sock_path("carry-touch-master");
    let mut a = direct(&m, &mut g, &master_path);
    let (_s, mut c) = handshake(&mut a, &mut g, &master_path, 1024);
    let saved = a.dev.save();
    let queues = queues_of(&a.dev);
    drop(a);

    let clone_path = sock_path("carry-touch-clone");
    let mut b = restored_clone(&m, &saved, queues, &clone_path, false);
    // Credit bookkeeping is fine while parked: a credit request is
    // answered.
    let req = c.hdr(OP_CREDIT_REQUEST, 0);
    g.send(&mut b, &req, &[]);
    let (h, _) = wait_one(&mut b, &mut g);
    assert_eq!((h.op, h.src_port), (OP_CREDIT_UPDATE, c.host_port));
    assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
    // Data nobody asked for ends the carriage with a reset.
    let data = c.hdr(OP_RW, 3);
    g.send(&mut b, &data, b"abc");
    let (h, _) = wait_one(&mut b, &mut g);
    assert_eq!((h.op, h.dst_port), (OP_RST, 1024));
    // The host then gets a new connection.
    let (_s2, c2) = handshake(&mut b, &mut g, &clone_path, 1024);
    assert_ne!(c2.host_port, c.host_port);
}

#[test]
fn a_reset_restore_or_an_old_state_resets_the_transport() {
    let m = mem();
    for (reset, listed) in [(true, true), (false, false)] {
        let mut g = Guest::new(&m, RxLayout::Split);
        const EV_BUF: u64 = 0x3f_0000;
        g.ev.add_chain(&[(EV_BUF, 8, true)]);
        let master_path = sock_path("reset-master");
        let mut a = direct(&m, &mut g, &master_path);
        let (_s, _c) = handshake(&mut a, &mut g, &master_path, 1024);
        let mut saved = a.dev.save();
        drop(a);
        if !listed {
            saved.connections = None;
        }
        let mut b = restored_clone(&m, &saved, g.queues(), &sock_path("reset-clone"), reset);
        assert!(g.ev.pop_used().is_some(), "a transport reset was posted");
        let mut phases = Vec::new();
        b.dev.take_phases(&mut phases);
        assert_eq!(phases[0].0, DevicePhase::TransportResetPosted);
    }
}

#[test]
fn bad_connection_lists_are_refused() {
    let saved = |conns: Vec<SavedConnection>| VsockState {
        version: persist::VSOCK_STATE_VERSION,
        guest_cid: 3,
        connections: Some(conns),
    };
    let conn = |p| SavedConnection {
        local_port: p,
        peer_port: 1024,
        carried: None,
    };
    let args = || VsockConstructorArgs {
        uds_path: sock_path("bad-list"),
        reset: false,
    };
    let e = Vsock::restore(args(), &saved(vec![conn(5), conn(5)])).unwrap_err();
    assert_eq!(e.to_string(), "the state lists host port 5 twice");
    let many = (0..=MAX_CONNECTIONS as u32).map(conn).collect();
    let e = Vsock::restore(args(), &saved(many)).unwrap_err();
    assert!(e.to_string().contains("at most 256"), "{e}");
}
