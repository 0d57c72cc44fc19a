//! Host side of the vsock device: the Unix listener, the connections and the list of
//! connections that have packets for the guest.
//!
//! All host fds live in a private epoll set whose fd is the only one the event loop watches for
//! this device (nested epoll, as in Firecracker). Registration changes can therefore happen
//! anywhere the device lock is held (guest TX processing on the event loop, reset on a vCPU
//! thread) without access to the event manager.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{pending, Connection, State, Violation, CONN_BUF_ALLOC};
use super::packet::{
    VsockHeader, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RST, TYPE_STREAM,
};
use super::persist::{CarriedCounters, SavedConnection};
use crate::devices::virtio::{warn_limited, Error};

/// Most simultaneous host connections (each may buffer up to `CONN_BUF_ALLOC` bytes).
pub const MAX_CONNECTIONS: usize = 256;
/// Most queued connection-less control packets (RST replies) before new ones are dropped.
const MAX_RAW_PACKETS: usize = 1024;
/// First host-side port handed out to connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// epoll token of the listener (connection tokens always have a nonzero id in the high half).
const LISTENER_TOKEN: u64 = 0;
const EPOLL_BATCH: usize = 64;

/// A guest packet the host side refused (the device counts it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refusal {
    /// The guest tried to connect to the host, which is not supported: it
    /// gets a reset.
    #[error("guest-initiated connection from guest port {src_port} to host port {dst_port} refused (not supported)")]
    GuestConnect {
        /// The guest's port.
        src_port: u32,
        /// The host port it asked for.
        dst_port: u32,
    },
    /// An operation that does not exist.
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    /// The guest does not take the resets queued for it: this one is lost.
    #[error(
        "{MAX_RAW_PACKETS} resets wait for the guest to take them: one to guest port {0} dropped"
    )]
    ResetQueueFull(u32),
    /// The packet broke its connection's protocol.
    #[error("host port {port}")]
    Connection {
        /// The host port of the connection.
        port: u32,
        /// What it did.
        #[source]
        source: Violation,
    },
}

#[derive(Debug, Clone, Copy)]
enum RxItem {
    /// A connection with `pending` packets: (local port, token).
    Conn(u32, u64),
    /// A stand-alone control packet.
    Raw(VsockHeader),
}

/// The host side of the vsock device.
#[derive(Debug)]
pub(super) struct Muxer {
    guest_cid: u64,
    listener: UnixListener,
    listener_paused: bool,
    /// New host connections wait in the socket's backlog (see [`Muxer::hold`]).
    held: bool,
    uds_path: PathBuf,
    epoll: Epoll,
    conns: HashMap<u32, Connection>,
    rxq: VecDeque<RxItem>,
    raw_count: usize,
    next_port: u32,
    next_id: u32,
    events: Vec<EpollEvent>,
    /// Connections carried from the master's snapshot that no host stream
    /// took over yet, by host port: the first `CONNECT` to their guest
    /// port does ([`Muxer::restore_connections`]).
    parked: HashMap<u32, Parked>,
    /// How many carried connections host streams took over.
    pub claims: u64,
}

/// A carried connection waiting for its host stream.
#[derive(Debug, Clone, Copy)]
struct Parked {
    peer_port: u32,
    counters: CarriedCounters,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        let bind_err = |source| Error::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        let setup = || -> Result<Epoll, Error> {
            listener.set_nonblocking(true).map_err(bind_err)?;
            let epoll = Epoll::new().map_err(Error::Epoll)?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
                )
                .map_err(Error::Epoll)?;
            Ok(epoll)
        };
        let epoll = setup().inspect_err(|_| {
            let _ = std::fs::remove_file(uds_path);
        })?;
        Ok(Muxer {
            guest_cid,
            listener,
            listener_paused: false,
            held: false,
            uds_path: uds_path.to_path_buf(),
            epoll,
            conns: HashMap::new(),
            rxq: VecDeque::new(),
            raw_count: 0,
            next_port: FIRST_LOCAL_PORT,
            next_id: 1,
            events: vec![EpollEvent::default(); EPOLL_BATCH],
            parked: HashMap::new(),
            claims: 0,
        })
    }

    /// The epoll fd to watch for `EPOLLIN`.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets wait for guest RX buffers.
    pub fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Handles whatever is ready on the host fds (never blocks).
    pub fn process_host_events(&mut self) {
        let n = match self.epoll.wait(0, &mut self.events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn_limited!("vsock: epoll_wait failed: {e}");
                }
                return;
            }
        };
        for i in 0..n {
            let ev = self.events[i];
            let token = ev.data();
            if token == LISTENER_TOKEN {
                self.accept_all();
                continue;
            }
            let port = token as u32;
            match self.conns.get_mut(&port) {
                Some(conn) if conn.token == token => conn.handle_host_event(ev.event_set()),
                // Stale event of a connection dropped earlier in this batch.
                _ => continue,
            }
            self.after_change(port);
        }
    }

    fn pause_listener(&mut self) {
        if !self.listener_paused {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.listener.as_raw_fd(),
                EpollEvent::default(),
            );
            self.listener_paused = true;
        }
    }

    /// Leaves new host connections in the Unix socket's backlog (`hold`)
    /// or takes them again: a restored guest must finish its transport
    /// reset first, or the reset would also drop the new connections.
    pub fn hold(&mut self, hold: bool) {
        self.held = hold;
        if hold {
            self.pause_listener();
        } else {
            self.resume_listener();
        }
    }

    /// Starts host port numbers at a random point: a restored guest may
    /// still hold sockets of the master's connections, and a new connection
    /// from the same host port would be taken for one of them.
    pub fn randomize_ports(&mut self) {
        let mut b = [0u8; 4];
        // SAFETY: the pointer and length describe `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        let r = if n == 4 {
            u32::from_ne_bytes(b)
        } else {
            proto::events::now_us() as u32
        };
        // Somewhere in the first half of the range, far from its end.
        self.next_port = FIRST_LOCAL_PORT + (r & ((1 << 29) - 1));
    }

    /// Whether new connections are held.
    pub fn is_held(&self) -> bool {
        self.held
    }

    fn resume_listener(&mut self) {
        if self.listener_paused && !self.held {
            let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
            if self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
                .is_ok()
            {
                self.listener_paused = false;
            }
        }
    }

    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY.
            self.next_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.contains_key(&p) && !self.parked.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // E.g. EMFILE: stop watching the listener (it would stay readable and make
                    // the loop spin) until a connection goes away.
                    warn_limited!("vsock: accept failed: {e}");
                    self.pause_listener();
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                warn_limited!("vsock: too many connections, refusing a host connection");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Some(port) = self.alloc_port() else {
                continue;
            };
            let token = (u64::from(self.next_id) << 32) | u64::from(port);
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            self.conns
                .insert(port, Connection::new(stream, token, port));
            self.after_change(port);
        }
    }

    /// Applies the consequences of a state change of connection `port`: drops it when it is
    /// finished, fixes its epoll interest and queues it for RX if it has packets. A host
    /// stream that just asked for a guest port with a carried connection takes that one
    /// over instead.
    fn after_change(&mut self, port: u32) {
        let Some(conn) = self.conns.get_mut(&port) else {
            return;
        };
        if conn.state == State::LocalInit && conn.pending & pending::REQUEST != 0 {
            let peer = conn.peer_port;
            // The lowest host port first: the same choice every time.
            let carried = self
                .parked
                .iter()
                .filter(|(_, p)| p.peer_port == peer)
                .map(|(&lp, _)| lp)
                .min();
            if let Some(carried) = carried {
                return self.claim(port, carried);
            }
        }
        if !conn.is_finished() {
            if let Err(e) = conn.update_interest(&self.epoll) {
                warn_limited!("vsock: epoll update failed: {e}");
                conn.kill();
            }
        }
        if conn.is_finished() {
            conn.deregister(&self.epoll);
            self.conns.remove(&port);
            self.resume_listener();
            return;
        }
        if conn.pending != 0 && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(port, conn.token));
        }
    }

    /// Host stream `port` (its `CONNECT` line just read) takes over the
    /// carried connection at host port `carried`.
    fn claim(&mut self, port: u32, carried: u32) {
        let (Some(mut conn), Some(parked)) =
            (self.conns.remove(&port), self.parked.remove(&carried))
        else {
            return;
        };
        conn.deregister(&self.epoll);
        let token = (u64::from(self.next_id) << 32) | u64::from(carried);
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let resumed = Connection::resume(
            conn.stream,
            token,
            carried,
            parked.peer_port,
            &parked.counters,
        );
        self.conns.insert(carried, resumed);
        self.claims += 1;
        self.after_change(carried);
    }

    /// The host connections the guest knows of, for a snapshot: per guest
    /// port the newest idle one is carried (with the parked ones, which
    /// are idle by definition), every other one is listed to be reset.
    pub fn saved_connections(&self) -> Vec<SavedConnection> {
        let mut out: Vec<SavedConnection> = self
            .parked
            .iter()
            .map(|(&local_port, p)| SavedConnection {
                local_port,
                peer_port: p.peer_port,
                carried: Some(p.counters),
            })
            .collect();
        let mut live: Vec<&Connection> = self.conns.values().filter(|c| c.guest_knows()).collect();
        // Newest first (the id is the token's high half).
        live.sort_by_key(|c| std::cmp::Reverse(c.token >> 32));
        for c in live {
            let taken = out
                .iter()
                .any(|s| s.peer_port == c.peer_port && s.carried.is_some());
            out.push(SavedConnection {
                local_port: c.local_port,
                peer_port: c.peer_port,
                carried: if taken { None } else { c.carriable() },
            });
        }
        out.sort_by_key(|s| s.local_port);
        out
    }

    /// Takes a restored VM's connections from its master's snapshot: the
    /// carried ones wait for their host stream, a reset goes to the guest
    /// for each other one. Returns how many were reset.
    pub fn restore_connections(&mut self, saved: &[SavedConnection]) -> usize {
        let mut reset = 0;
        for s in saved {
            match s.carried {
                Some(counters) => {
                    self.parked.insert(
                        s.local_port,
                        Parked {
                            peer_port: s.peer_port,
                            counters,
                        },
                    );
                }
                None => {
                    if self
                        .push_raw(self.header_to(s.local_port, s.peer_port, OP_RST))
                        .is_ok()
                    {
                        reset += 1;
                    }
                }
            }
        }
        reset
    }

    /// Handles a guest packet for a parked connection, if it is one:
    /// credit bookkeeping is kept, anything else ends the carriage (the
    /// caller then answers as for an unknown connection: a reset).
    fn parked_packet(&mut self, hdr: &VsockHeader) -> Option<Result<(), Refusal>> {
        let p = self.parked.get_mut(&hdr.dst_port)?;
        if p.peer_port != hdr.src_port {
            return None;
        }
        p.counters.peer_buf_alloc = hdr.buf_alloc;
        p.counters.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_CREDIT_UPDATE => Some(Ok(())),
            OP_CREDIT_REQUEST => {
                p.counters.fwd_cnt_told = p.counters.fwd_cnt;
                let fwd_cnt = p.counters.fwd_cnt;
                let mut h = self.header_to(hdr.dst_port, hdr.src_port, OP_CREDIT_UPDATE);
                h.buf_alloc = CONN_BUF_ALLOC;
                h.fwd_cnt = fwd_cnt;
                Some(self.push_raw(h))
            }
            _ => {
                warn_limited!(
                    "vsock: operation {} on carried connection {}: reset",
                    hdr.op,
                    hdr.dst_port
                );
                self.parked.remove(&hdr.dst_port);
                None
            }
        }
    }

    /// A connection-less packet from host port `local` to guest port `peer`.
    fn header_to(&self, local: u32, peer: u32, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn push_raw(&mut self, h: VsockHeader) -> Result<(), Refusal> {
        if self.raw_count >= MAX_RAW_PACKETS {
            warn_limited!("vsock: too many queued control packets, dropping one");
            return Err(Refusal::ResetQueueFull(h.dst_port));
        }
        self.raw_count += 1;
        self.rxq.push_back(RxItem::Raw(h));
        Ok(())
    }

    fn push_rst_reply(&mut self, hdr: &VsockHeader) -> Result<(), Refusal> {
        self.push_raw(self.header_to(hdr.dst_port, hdr.src_port, OP_RST))
    }

    /// Handles a validated packet from the guest (CIDs and type already
    /// checked); returns what it refused.
    pub fn handle_guest_packet(
        &mut self,
        hdr: &VsockHeader,
        payload: &[u8],
    ) -> Result<(), Refusal> {
        let port = hdr.dst_port;
        let known = self
            .conns
            .get(&port)
            .is_some_and(|c| c.peer_port == hdr.src_port && c.state != State::AwaitConnectLine);
        if !known {
            if let Some(done) = self.parked_packet(hdr) {
                return done;
            }
            // A reset answers everything but a reset. Guest-initiated
            // connection requests are not supported (yet): the guest's
            // connect() fails with ECONNRESET. Other known operations are
            // stragglers of a connection that is gone (no fault).
            if hdr.op == OP_RST {
                return Ok(());
            }
            self.push_rst_reply(hdr)?;
            return match hdr.op {
                OP_REQUEST => Err(Refusal::GuestConnect {
                    src_port: hdr.src_port,
                    dst_port: hdr.dst_port,
                }),
                op if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&op) => {
                    Err(Refusal::UnknownOp(op))
                }
                _ => Ok(()),
            };
        }
        let result = match self.conns.get_mut(&port) {
            Some(conn) => conn
                .handle_guest_packet(hdr, payload)
                .map_err(|source| Refusal::Connection { port, source }),
            None => Ok(()),
        };
        self.after_change(port);
        result
    }

    /// Produces the next packet for the guest: header and payload length (payload at the start
    /// of `buf`, at most `max_payload` bytes). `None` once nothing is pending.
    pub fn next_rx(&mut self, max_payload: usize, buf: &mut [u8]) -> Option<(VsockHeader, usize)> {
        while let Some(item) = self.rxq.pop_front() {
            match item {
                RxItem::Raw(h) => {
                    self.raw_count -= 1;
                    return Some((h, 0));
                }
                RxItem::Conn(port, token) => {
                    let pkt = match self.conns.get_mut(&port) {
                        Some(conn) if conn.token == token => {
                            conn.in_rxq = false;
                            conn.next_rx(max_payload, buf, self.guest_cid)
                        }
                        _ => continue,
                    };
                    self.after_change(port);
                    if pkt.is_some() {
                        return pkt;
                    }
                }
            }
        }
        None
    }

    /// What the host side holds (for tests of the bounds): connections,
    /// queued packet sources, connection-less packets, and the most guest
    /// bytes one connection holds for its Unix stream.
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize, usize, usize) {
        let buffered = self.conns.values().map(Connection::buffered).max();
        (
            self.conns.len(),
            self.rxq.len(),
            self.raw_count,
            buffered.unwrap_or(0),
        )
    }

    /// Drops every connection (device reset): Unix peers see EOF.
    pub fn reset(&mut self) {
        for (_, mut conn) in self.conns.drain() {
            conn.deregister(&self.epoll);
        }
        self.parked.clear();
        self.rxq.clear();
        self.raw_count = 0;
        self.resume_listener();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
