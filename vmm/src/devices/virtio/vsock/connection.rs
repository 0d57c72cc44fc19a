//! One host-initiated vsock stream connection, bridged to a Unix stream.
//!
//! Credit accounting (virtio-vsock spec 5.10.6.3):
//!
//! * guest → host: we advertise `buf_alloc = CONN_BUF_ALLOC` and `fwd_cnt` = guest payload bytes
//!   actually written to the Unix stream. Bytes the stream could not take yet wait in `tx_buf`,
//!   which a compliant guest can never grow beyond `CONN_BUF_ALLOC`; a guest that overruns its
//!   credit gets the connection reset.
//! * host → guest: we only read from the Unix stream as much as the guest's credit
//!   (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) allows, and drop `EPOLLIN` interest while the
//!   credit is exhausted or a packet is already waiting for an RX buffer.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{
    VsockHeader, HOST_CID, MAX_PKT_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::persist::CarriedCounters;
use crate::devices::virtio::warn_limited;

/// Receive buffer space advertised to the guest, per connection.
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// Send a credit update once the guest's view of our free space drops below this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;
/// Longest accepted `CONNECT <port>` line.
const MAX_CONNECT_LINE: usize = 32;

/// Packets a connection wants to send to the guest.
pub(super) mod pending {
    /// `OP_REQUEST`.
    pub const REQUEST: u8 = 1;
    /// Data may be readable from the Unix stream.
    pub const RW: u8 = 2;
    /// `OP_CREDIT_UPDATE`.
    pub const CREDIT_UPDATE: u8 = 4;
    /// `OP_SHUTDOWN` with `Connection::shutdown_flags`.
    pub const SHUTDOWN: u8 = 8;
    /// `OP_RST`.
    pub const RST: u8 = 16;
}

/// What a guest packet on a connection did wrong (the device counts it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Violation {
    /// An operation the connection's state does not allow: reset.
    #[error("operation {op} on a connection in state {state:?}: connection reset")]
    UnexpectedOp {
        /// The packet's operation.
        op: u16,
        /// The connection's state.
        state: State,
    },
    /// More data than the credit the device gave: reset.
    #[error("{len} bytes with {buffered} already buffered exceed the connection's credit of {CONN_BUF_ALLOC}: connection reset")]
    CreditExceeded {
        /// Payload bytes of the packet.
        len: usize,
        /// Bytes received and not yet forwarded.
        buffered: u64,
    },
    /// Data after the guest said it would send no more: dropped.
    #[error("{0} bytes of data after the guest's SHUTDOWN: dropped")]
    DataAfterShutdown(usize),
}

/// Connection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Unix peer connected, waiting for its `CONNECT <port>\n` line.
    AwaitConnectLine,
    /// `OP_REQUEST` queued or sent, waiting for the guest's `OP_RESPONSE` / `OP_RST`.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// The vsock side is over: only queued control packets (RST / SHUTDOWN) and the remaining
    /// guest data in `tx_buf` are still delivered, then the connection is dropped.
    Closing,
}

/// `send(2)` without `SIGPIPE`.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice of `buf.len()` readable bytes and the fd is owned by
    // `stream`, which outlives the call.
    let r = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Whether the Unix peer closed both directions (as opposed to a `shutdown(SHUT_WR)`).
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid `pollfd`, the count is 1 and the timeout 0 (no blocking).
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// A host-initiated connection.
#[derive(Debug)]
pub(super) struct Connection {
    pub stream: UnixStream,
    /// Unique epoll token: `(id << 32) | local_port`.
    pub token: u64,
    /// Host-side vsock port (allocated by the muxer).
    pub local_port: u32,
    /// Guest-side vsock port (from the `CONNECT` line).
    pub peer_port: u32,
    pub state: State,
    /// Bitset of `pending::*`.
    pub pending: u8,
    /// Whether the muxer's RX list holds an entry for this connection.
    pub in_rxq: bool,
    shutdown_flags: u32,
    line: Vec<u8>,
    /// Bytes for the Unix stream that it could not take yet.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are not guest data (the `OK <port>\n` line).
    tx_prefix: usize,
    /// Guest payload bytes received.
    recv_cnt: Wrapping<u32>,
    /// Guest payload bytes written to the Unix stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// `SHUTDOWN_*` flags received from the guest.
    peer_shutdown: u32,
    /// The Unix peer will not send anything more.
    local_eof: bool,
    /// We shut down the write side of the Unix stream.
    write_shut: bool,
    interest: EventSet,
    registered: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, token: u64, local_port: u32) -> Self {
        Connection {
            stream,
            token,
            local_port,
            peer_port: 0,
            state: State::AwaitConnectLine,
            pending: 0,
            in_rxq: false,
            shutdown_flags: 0,
            line: Vec::new(),
            tx_buf: VecDeque::new(),
            tx_prefix: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            local_eof: false,
            write_shut: false,
            interest: EventSet::empty(),
            registered: false,
        }
    }

    /// Continues a connection carried from the master's snapshot over a
    /// new host stream: established, with the saved credit counters, and
    /// `OK <local port> carried` queued for the stream. The guest is not
    /// told anything: for its socket, nothing happened.
    pub fn resume(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        c: &CarriedCounters,
    ) -> Self {
        let mut conn = Connection::new(stream, token, local_port);
        conn.peer_port = peer_port;
        conn.state = State::Established;
        conn.recv_cnt = Wrapping(c.fwd_cnt);
        conn.fwd_cnt = Wrapping(c.fwd_cnt);
        conn.last_fwd_cnt_sent = Wrapping(c.fwd_cnt_told);
        conn.rx_cnt = Wrapping(c.rx_cnt);
        conn.peer_buf_alloc = c.peer_buf_alloc;
        conn.peer_fwd_cnt = Wrapping(c.peer_fwd_cnt);
        let line = format!("OK {local_port} carried\n");
        conn.tx_prefix = line.len();
        conn.tx_buf.extend(line.as_bytes());
        conn.flush();
        conn
    }

    /// What a clone continues this connection from, if it is idle:
    /// established, every guest byte forwarded to the host, neither side
    /// closing, no control packet owed but a credit update. `None` for any
    /// other connection (a clone resets it).
    pub fn carriable(&self) -> Option<CarriedCounters> {
        let owed = pending::REQUEST | pending::SHUTDOWN | pending::RST;
        let idle = self.state == State::Established
            && self.tx_buf.is_empty()
            && self.recv_cnt == self.fwd_cnt
            && !self.local_eof
            && !self.write_shut
            && self.peer_shutdown == 0
            && self.pending & owed == 0;
        idle.then_some(CarriedCounters {
            fwd_cnt: self.fwd_cnt.0,
            fwd_cnt_told: self.last_fwd_cnt_sent.0,
            rx_cnt: self.rx_cnt.0,
            peer_buf_alloc: self.peer_buf_alloc,
            peer_fwd_cnt: self.peer_fwd_cnt.0,
        })
    }

    /// Whether the guest knows of this connection (it was asked to accept
    /// it): a clone must reset it unless it is carried.
    pub fn guest_knows(&self) -> bool {
        match self.state {
            State::AwaitConnectLine => false,
            State::LocalInit => self.pending & pending::REQUEST == 0,
            State::Established | State::Closing => true,
        }
    }

    /// Guest bytes held for the Unix stream (for tests of the bounds).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Nothing left to do: the muxer drops the connection (closing the Unix stream).
    pub fn is_finished(&self) -> bool {
        self.state == State::Closing && self.pending == 0 && self.tx_buf.is_empty()
    }

    /// Credit the guest gave us for host → guest data.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Drops the connection without telling the guest anything.
    fn close_now(&mut self) {
        self.state = State::Closing;
        self.pending = 0;
        self.tx_buf.clear();
        self.tx_prefix = 0;
    }

    /// Aborts the connection: the guest gets an `OP_RST` (if it knows about the connection).
    pub fn kill(&mut self) {
        let guest_knows = self.guest_knows();
        self.close_now();
        if guest_knows {
            self.pending = pending::RST;
        }
    }

    /// Handles readiness of the Unix stream.
    pub fn handle_host_event(&mut self, events: EventSet) {
        let readable = events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
        let writable = events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR);
        match self.state {
            State::AwaitConnectLine => self.read_connect_line(),
            State::Established => {
                if readable && self.interest.contains(EventSet::IN) {
                    self.pending |= pending::RW;
                }
                if writable && !self.tx_buf.is_empty() {
                    self.flush();
                }
            }
            State::Closing => {
                if writable && !self.tx_buf.is_empty() {
                    self.flush();
                }
            }
            State::LocalInit => {}
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so that data following it stays in the
    /// socket).
    fn read_connect_line(&mut self) {
        loop {
            let mut b = [0u8; 1];
            match (&self.stream).read(&mut b) {
                Ok(0) => return self.close_now(),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => {
                    self.line.push(b[0]);
                    if self.line.len() > MAX_CONNECT_LINE {
                        warn_limited!("vsock: over-long CONNECT line, closing");
                        return self.close_now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close_now(),
            }
        }
        let port = std::str::from_utf8(&self.line)
            .ok()
            .map(|s| s.trim_end_matches('\r'))
            .and_then(|s| s.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        match port {
            Some(port) => {
                self.peer_port = port;
                self.state = State::LocalInit;
                self.pending |= pending::REQUEST;
                self.line = Vec::new();
            }
            None => {
                warn_limited!("vsock: malformed CONNECT line, closing");
                self.close_now();
            }
        }
    }

    /// Handles a packet the guest sent on this connection (credit and ports
    /// already matched); what it refused is returned, after its consequences
    /// (a reset) were applied.
    pub fn handle_guest_packet(
        &mut self,
        hdr: &VsockHeader,
        payload: &[u8],
    ) -> Result<(), Violation> {
        if matches!(self.state, State::Closing | State::AwaitConnectLine) {
            return Ok(());
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, hdr.op) {
            (State::LocalInit, OP_RESPONSE) if self.pending & pending::REQUEST == 0 => {
                self.state = State::Established;
                let line = format!("OK {}\n", self.local_port);
                self.tx_prefix = line.len();
                self.tx_buf.extend(line.as_bytes());
                self.flush();
            }
            // Nobody listens on that guest port.
            (State::LocalInit, OP_RST) => self.close_now(),
            (State::Established, OP_RW) => return self.recv_data(payload),
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => self.pending |= pending::CREDIT_UPDATE,
            (State::Established, OP_SHUTDOWN) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown & SHUTDOWN_RCV != 0 {
                    self.pending &= !pending::RW;
                }
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // The guest closed its socket and waits for our RST; the data it sent
                    // before is still flushed to the Unix stream.
                    self.state = State::Closing;
                    self.pending = pending::RST;
                } else {
                    self.flush();
                }
            }
            (State::Established, OP_RST) => {
                self.state = State::Closing;
                self.pending = 0;
            }
            (state, op) => {
                warn_limited!("vsock: unexpected op {op} in state {state:?}, resetting");
                self.kill();
                return Err(Violation::UnexpectedOp { op, state });
            }
        }
        Ok(())
    }

    fn recv_data(&mut self, payload: &[u8]) -> Result<(), Violation> {
        if payload.is_empty() {
            return Ok(());
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 || self.write_shut {
            warn_limited!("vsock: guest sent data after SHUTDOWN, dropped");
            return Err(Violation::DataAfterShutdown(payload.len()));
        }
        let buffered = u64::from((self.recv_cnt - self.fwd_cnt).0);
        if buffered + payload.len() as u64 > u64::from(CONN_BUF_ALLOC) {
            warn_limited!("vsock: guest exceeded its credit, resetting the connection");
            self.kill();
            return Err(Violation::CreditExceeded {
                len: payload.len(),
                buffered,
            });
        }
        self.recv_cnt += Wrapping(payload.len() as u32);
        let mut rest = payload;
        if self.tx_buf.is_empty() {
            loop {
                match send_nosignal(&self.stream, rest) {
                    Ok(n) => {
                        self.fwd_cnt += Wrapping(n as u32);
                        rest = &rest[n..];
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // The host side broke: nothing the guest did.
                        self.kill();
                        return Ok(());
                    }
                }
            }
        }
        self.tx_buf.extend(rest);
        self.after_forward();
        Ok(())
    }

    /// Writes as much of `tx_buf` to the Unix stream as it takes.
    fn flush(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let from_prefix = n.min(self.tx_prefix);
                    self.tx_prefix -= from_prefix;
                    self.fwd_cnt += Wrapping((n - from_prefix) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    if self.state == State::Closing {
                        self.tx_buf.clear();
                        self.tx_prefix = 0;
                    } else {
                        self.kill();
                    }
                    return;
                }
            }
        }
        self.after_forward();
    }

    /// Bookkeeping after guest data went (or did not go) to the Unix stream.
    fn after_forward(&mut self) {
        if !self.tx_buf.is_empty() {
            return self.maybe_credit_update();
        }
        if self.tx_buf.capacity() > 2 * MAX_PKT_PAYLOAD {
            self.tx_buf.shrink_to(MAX_PKT_PAYLOAD);
        }
        if self.state != State::Established {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            // Everything the guest sent is out: propagate its half-close.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.write_shut = true;
        }
        if self.local_eof && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            // Both directions are finished.
            self.state = State::Closing;
            self.pending &= pending::SHUTDOWN;
            self.pending |= pending::RST;
            return;
        }
        self.maybe_credit_update();
    }

    fn maybe_credit_update(&mut self) {
        if self.state != State::Established || self.fwd_cnt == self.last_fwd_cnt_sent {
            return;
        }
        let peer_view_used = (self.recv_cnt - self.last_fwd_cnt_sent).0;
        if CONN_BUF_ALLOC.saturating_sub(peer_view_used) < CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// The Unix stream returned EOF.
    fn on_local_eof(&mut self) {
        self.local_eof = true;
        self.pending &= !pending::RW;
        let guest_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty();
        if peer_hung_up(&self.stream) || guest_done {
            // The Unix peer is gone (or both directions are finished): orderly shutdown for the
            // guest, then reset.
            self.state = State::Closing;
            self.tx_buf.clear();
            self.tx_prefix = 0;
            self.shutdown_flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            self.pending = pending::SHUTDOWN | pending::RST;
        } else {
            // Half close: the guest reads EOF, and may keep sending.
            self.shutdown_flags = SHUTDOWN_SEND;
            self.pending |= pending::SHUTDOWN;
        }
    }

    fn header(&mut self, op: u16, guest_cid: u64) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Reads stream data for an `OP_RW` packet; `None` if there is nothing to send.
    fn read_data(&mut self, max_payload: usize, buf: &mut [u8]) -> Option<usize> {
        if self.state != State::Established
            || self.local_eof
            || self.peer_shutdown & SHUTDOWN_RCV != 0
        {
            self.pending &= !pending::RW;
            return None;
        }
        let want = max_payload
            .min(buf.len())
            .min(MAX_PKT_PAYLOAD)
            .min(self.peer_credit() as usize);
        if want == 0 {
            self.pending &= !pending::RW;
            return None;
        }
        loop {
            match (&self.stream).read(&mut buf[..want]) {
                Ok(0) => {
                    self.on_local_eof();
                    return None;
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    if n < want {
                        // Most likely drained; epoll tells us when there is more.
                        self.pending &= !pending::RW;
                    }
                    return Some(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending &= !pending::RW;
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill();
                    return None;
                }
            }
        }
    }

    /// Produces the next packet for the guest: the header and the number of payload bytes
    /// placed at the start of `buf` (at most `max_payload`).
    pub fn next_rx(
        &mut self,
        max_payload: usize,
        buf: &mut [u8],
        guest_cid: u64,
    ) -> Option<(VsockHeader, usize)> {
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            return Some((self.header(OP_REQUEST, guest_cid), 0));
        }
        if self.pending & pending::RW != 0 {
            if let Some(n) = self.read_data(max_payload, buf) {
                let mut h = self.header(OP_RW, guest_cid);
                h.len = n as u32;
                return Some((h, n));
            }
        }
        if self.pending & pending::CREDIT_UPDATE != 0 {
            return Some((self.header(OP_CREDIT_UPDATE, guest_cid), 0));
        }
        if self.pending & pending::SHUTDOWN != 0 {
            self.pending &= !pending::SHUTDOWN;
            let mut h = self.header(OP_SHUTDOWN, guest_cid);
            h.flags = self.shutdown_flags;
            return Some((h, 0));
        }
        if self.pending & pending::RST != 0 {
            self.pending &= !pending::RST;
            return Some((self.header(OP_RST, guest_cid), 0));
        }
        None
    }

    fn desired_interest(&self) -> EventSet {
        let mut s = EventSet::empty();
        match self.state {
            State::AwaitConnectLine => s |= EventSet::IN,
            State::LocalInit => {}
            State::Established => {
                if !self.local_eof
                    && self.peer_shutdown & SHUTDOWN_RCV == 0
                    && self.pending & pending::RW == 0
                    && self.peer_credit() > 0
                {
                    s |= EventSet::IN;
                }
                if !self.tx_buf.is_empty() {
                    s |= EventSet::OUT;
                }
            }
            State::Closing => {
                if !self.tx_buf.is_empty() {
                    s |= EventSet::OUT;
                }
            }
        }
        s
    }

    /// Brings the epoll registration in line with what the connection waits for. An fd with
    /// no interest is removed from the set, so a hung-up peer cannot make epoll spin.
    pub fn update_interest(&mut self, epoll: &Epoll) -> io::Result<()> {
        let want = self.desired_interest();
        let fd = self.stream.as_raw_fd();
        if want.is_empty() {
            if self.registered {
                epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
                self.registered = false;
            }
        } else if !self.registered {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, self.token))?;
            self.registered = true;
        } else if want != self.interest {
            epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, self.token),
            )?;
        }
        self.interest = want;
        Ok(())
    }

    /// Removes the fd from the epoll set (before the connection is dropped).
    pub fn deregister(&mut self, epoll: &Epoll) {
        if self.registered {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                self.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.registered = false;
        }
    }
}
