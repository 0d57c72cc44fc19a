//! One host connection: Hello, then requests in sequence.
//!
//! Generic over the stream (`Read + Write + AsRawFd`) so the same code
//! serves a vsock connection in the guest and a `UnixStream` in tests.
//!
//! Syscall budget: a Ping costs one `read` and one `write`. During an exec
//! a single thread multiplexes the connection, the command's stdout,
//! stderr and stdin pipes and its exit notification (an eventfd) with
//! `poll`; it is the only writer of the connection, so frames never
//! interleave. Output is read straight into a buffer behind a reserved
//! frame header and sent with one write per chunk.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::{
    frame_header, parse_frame, AgentFrame, ErrorCode, ExecRequest, ExitStatus, Frame, FrameKind,
    HostFrame, Identity, IdentityTimings, ProtoError, Request, Response, HEADER_LEN,
    PROTOCOL_VERSION,
};

use crate::reaper::Reaper;
use crate::spawn;
use crate::sys;

/// Largest chunk of command output sent in one frame.
pub const OUTPUT_CHUNK: usize = 64 * 1024;
/// After the command exited, stop forwarding output once its pipes were
/// quiet this long (a background grandchild may hold them open forever).
pub const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// After the command exited, stop forwarding output after this long at
/// the latest.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Smallest read from the connection.
const READ_CHUNK: usize = 16 * 1024;

/// Applies a validated [`Identity`] to the system; says how long each
/// part took.
pub type ApplyIdentity = dyn Fn(&Identity) -> Result<IdentityTimings, String> + Send + Sync;

/// What [`Agent::prepare_freeze`] is.
pub type PrepareFreeze = dyn Fn() -> Result<u32, String> + Send + Sync;
/// Starts the TCP test server on a port ([`crate::net_test`]); returns the
/// port it listens on, or the error to answer with.
pub type StartNetTest = dyn Fn(u16) -> Result<u16, (ErrorCode, String)> + Send + Sync;

/// What every connection of the agent shares.
pub struct Agent {
    /// The environment commands start with (request variables are added).
    pub base_env: Vec<(OsString, OsString)>,
    /// Routes command exits.
    pub reaper: Option<&'static Reaper>,
    /// Powers the guest off; called after `ShuttingDown` was sent. Returns
    /// only where powering off is not possible (tests, not PID 1).
    pub shutdown: Box<dyn Fn() + Send + Sync>,
    /// Applies a validated identity (the real one changes the system:
    /// PID 1 only).
    pub apply_identity: Box<ApplyIdentity>,
    /// Drops what a clone must not inherit before a master's freeze;
    /// returns how many connections it aborted.
    pub prepare_freeze: Box<PrepareFreeze>,
    /// Starts the TCP test server (the real one listens on every guest
    /// address).
    pub start_net_test: Box<StartNetTest>,
}

/// The connection is finished (closed by the host, broken or shut down).
#[derive(Debug)]
struct Closed;

type Flow = Result<(), Closed>;

/// Serves one connection until the host closes it or it breaks.
pub fn serve<S: Read + Write + AsRawFd>(stream: S, agent: &Agent) {
    let mut conn = Conn {
        stream,
        inbuf: Vec::new(),
        start: 0,
        end: 0,
        outbuf: Vec::new(),
        events: None,
        held: Vec::new(),
    };
    let _ = conn.run(agent);
}

/// A frame read from the host: `Err` if its payload was bad (the frame was
/// still delimited and skipped, the stream is intact).
type Incoming = Result<HostFrame, ProtoError>;

struct Conn<S> {
    stream: S,
    /// Received bytes; `start..end` not yet decoded.
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Output chunk buffer: header space + up to OUTPUT_CHUNK bytes.
    outbuf: Vec<u8>,
    /// Eventfd announcing command exits, made at the first exec.
    events: Option<OwnedFd>,
    /// Answers not written yet ([`Conn::send`]).
    held: Vec<u8>,
}

impl<S: Read + Write + AsRawFd> Conn<S> {
    fn run(&mut self, agent: &Agent) -> Flow {
        self.send(Response::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })?;
        loop {
            let frame = match self.next_frame()? {
                Some(frame) => frame,
                None => {
                    // Closed by the host (at a frame boundary or not).
                    if self.fill()? == 0 {
                        return Err(Closed);
                    }
                    continue;
                }
            };
            match frame {
                Err(e) => self.send_error(ErrorCode::InvalidRequest, e.to_string())?,
                // Stdin for a command that has already exited: dropped.
                Ok(HostFrame::Stdin(_)) => {}
                Ok(HostFrame::Request(Request::Ping)) => self.pong()?,
                Ok(HostFrame::Request(Request::Shutdown)) => return self.shutdown(agent),
                Ok(HostFrame::Request(Request::Exec(req))) => self.exec(agent, &req)?,
                Ok(HostFrame::Request(Request::Identity(id))) => self.identity(agent, &id)?,
                Ok(HostFrame::Request(Request::PrepareFreeze)) => self.prepare_freeze(agent)?,
                Ok(HostFrame::Request(Request::NetTest { port })) => self.net_test(agent, port)?,
            }
        }
    }

    /// Sends one control message: one write, or none yet while another
    /// whole request waits in the input buffer (answers to pipelined
    /// requests, a clone's identity and ping, go out in one write: one
    /// packet, one wake-up of the host side). Whatever writes to the
    /// stream otherwise calls [`Conn::flush_held`] first.
    fn send(&mut self, resp: Response) -> Flow {
        let buf = AgentFrame::Response(resp).encode().map_err(|_| Closed)?;
        self.held.extend_from_slice(&buf);
        if matches!(parse_frame(&self.inbuf[self.start..self.end]), Ok(Some(_))) {
            return Ok(());
        }
        self.flush_held()
    }

    /// Writes the answers [`Conn::send`] held back.
    fn flush_held(&mut self) -> Flow {
        if self.held.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.held).map_err(|_| Closed);
        self.held.clear();
        r
    }

    fn send_error(&mut self, code: ErrorCode, message: String) -> Flow {
        self.send(Response::Error { code, message })
    }

    fn pong(&mut self) -> Flow {
        self.send(Response::Pong {
            uptime_ms: sys::uptime_ms(),
        })
    }

    fn identity(&mut self, agent: &Agent, id: &Identity) -> Flow {
        if let Err(message) = crate::identity::validate(id) {
            return self.send_error(ErrorCode::InvalidRequest, message);
        }
        match (agent.apply_identity)(id) {
            Ok(timings) => self.send(Response::IdentitySet { timings }),
            // A valid request the system refused (an ioctl, the clock).
            Err(message) => self.send_error(ErrorCode::Internal, message),
        }
    }

    fn prepare_freeze(&mut self, agent: &Agent) -> Flow {
        match (agent.prepare_freeze)() {
            Ok(connections_aborted) => self.send(Response::FreezeReady {
                connections_aborted,
            }),
            Err(message) => self.send_error(ErrorCode::Internal, message),
        }
    }

    fn net_test(&mut self, agent: &Agent, port: u16) -> Flow {
        match (agent.start_net_test)(port) {
            Ok(port) => self.send(Response::NetTestListening { port }),
            Err((code, message)) => self.send_error(code, message),
        }
    }

    fn shutdown(&mut self, agent: &Agent) -> Flow {
        self.send(Response::ShuttingDown)?;
        // Nothing after it is answered: out with what was held.
        self.flush_held()?;
        (agent.shutdown)();
        Err(Closed)
    }

    /// Decodes the next complete frame from the buffer, if there is one.
    /// A broken framing (bad length or kind) is answered with an error and
    /// ends the connection.
    fn next_frame(&mut self) -> Result<Option<Incoming>, Closed> {
        match parse_frame(&self.inbuf[self.start..self.end]) {
            Ok(None) => Ok(None),
            Ok(Some((raw, used))) => {
                let frame = HostFrame::from_raw(raw);
                self.start += used;
                Ok(Some(frame))
            }
            Err(e) => {
                let _ = self.send_error(ErrorCode::InvalidRequest, e.to_string());
                Err(Closed)
            }
        }
    }

    /// One read from the connection into the buffer, with room for at
    /// least the whole pending frame. Returns 0 at end of stream.
    fn fill(&mut self) -> Result<usize, Closed> {
        // Nothing held back while waiting for the host.
        self.flush_held()?;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let pending = &self.inbuf[self.start..self.end];
        // next_frame validated the length if 4 bytes are there.
        let need = match pending.get(..4) {
            Some(len) => 4 + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize,
            None => 4,
        };
        let want = need.max(READ_CHUNK);
        if self.inbuf.len() - self.start < want {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.inbuf.len() < want {
                self.inbuf.resize(want, 0);
            }
        }
        loop {
            match self.stream.read(&mut self.inbuf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Closed),
            }
        }
    }

    /// Runs one command to its end. `Err` only if the connection is over
    /// (the command is then killed).
    fn exec(&mut self, agent: &Agent, req: &ExecRequest) -> Flow {
        let prepared = match spawn::prepare(&agent.base_env, req) {
            Ok(p) => p,
            Err(e) => {
                let (code, message) = e.to_error();
                return self.send_error(code, message);
            }
        };
        let Some(reaper) = agent.reaper else {
            return self.send_error(ErrorCode::Internal, "no reaper thread".into());
        };
        if self.events.is_none() {
            match sys::eventfd() {
                Ok(fd) => self.events = Some(fd),
                Err(e) => return self.send_error(ErrorCode::Internal, format!("eventfd: {e}")),
            }
        }
        let events = self.events.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let child = match spawn::spawn(reaper, events, &prepared) {
            Ok(child) => child,
            Err(e) => {
                let (code, message) = e.to_error();
                return self.send_error(code, message);
            }
        };
        let pid = child.pid;
        let mut run = Running {
            pid,
            stdin: child.stdin,
            pending: Vec::new(),
            pending_off: 0,
            stdin_eof: false,
            outputs: [Some(child.stdout), Some(child.stderr)],
            status: None,
            deadline: prepared
                .timeout_ms
                .map(|ms| Instant::now() + Duration::from_millis(ms)),
            timed_out: false,
            exited_at: None,
            last_output: None,
        };
        let result = self
            .send(Response::Started { pid: pid as u32 })
            .and_then(|()| self.exec_loop(agent, reaper, events, &mut run));
        match result {
            Ok(()) => {
                let status = run.status.unwrap_or(0);
                let (code, signal) = sys::decode_wait_status(status);
                self.send(Response::Exited(ExitStatus {
                    code,
                    signal,
                    timed_out: run.timed_out,
                }))
            }
            Err(Closed) => {
                // The host is gone: nobody will read the output.
                let _ = reaper.kill_if_running(pid);
                reaper.forget(pid);
                Err(Closed)
            }
        }
    }

    fn exec_loop(
        &mut self,
        agent: &Agent,
        reaper: &Reaper,
        events: RawFd,
        run: &mut Running,
    ) -> Flow {
        if self.outbuf.len() < HEADER_LEN + OUTPUT_CHUNK {
            self.outbuf.resize(HEADER_LEN + OUTPUT_CHUNK, 0);
        }
        // Stdin frames may have come with the request.
        self.handle_frames(agent, run)?;
        loop {
            if run.status.is_some() && run.outputs.iter().all(Option::is_none) {
                return Ok(());
            }
            // The next timer: the timeout while the command runs, the drain
            // limits once it exited.
            let wake = match run.exited_at {
                Some(at) => Some((run.last_output.unwrap_or(at) + DRAIN_IDLE).min(at + DRAIN_MAX)),
                None => run.deadline,
            };
            let timeout_ms = match wake {
                None => -1,
                Some(w) => {
                    let left = w.saturating_duration_since(Instant::now());
                    // Round up: waking early would just poll again.
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };

            let stdin_busy = run.pending_off < run.pending.len();
            let fd_or_none = |f: &Option<File>| f.as_ref().map_or(-1, AsRawFd::as_raw_fd);
            let mut fds = [
                pollfd(
                    self.stream.as_raw_fd(),
                    // While the command does not take its stdin, stop
                    // reading more of it (HUP/ERR are reported anyway).
                    if stdin_busy { 0 } else { libc::POLLIN },
                ),
                pollfd(fd_or_none(&run.outputs[0]), libc::POLLIN),
                pollfd(fd_or_none(&run.outputs[1]), libc::POLLIN),
                pollfd(
                    if stdin_busy {
                        fd_or_none(&run.stdin)
                    } else {
                        -1
                    },
                    libc::POLLOUT,
                ),
                pollfd(if run.status.is_none() { events } else { -1 }, libc::POLLIN),
            ];
            self.flush_held()?;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Closed);
            }

            if let Some(w) = wake {
                let now = Instant::now();
                if now >= w {
                    if run.status.is_none() {
                        // Timed out: kill the whole group, then wait for the
                        // exit as usual.
                        run.timed_out = reaper.kill_if_running(run.pid);
                        run.deadline = None;
                    } else {
                        // Output drained as far as we wait for it.
                        return Ok(());
                    }
                }
            }

            let ready = |i: usize| fds[i].revents != 0;
            if ready(4) {
                sys::eventfd_drain(events);
                if let Some(status) = reaper.take(run.pid) {
                    run.status = Some(status);
                    run.exited_at = Some(Instant::now());
                    // Nobody reads stdin any more (grandchildren aside).
                    run.stdin = None;
                    run.pending.clear();
                    run.pending_off = 0;
                }
            }
            for (i, kind) in [(1, FrameKind::Stdout), (2, FrameKind::Stderr)] {
                if ready(i) {
                    self.forward_output(run, i - 1, kind)?;
                }
            }
            if ready(3) {
                run.flush_stdin();
            }
            if ready(0) {
                if self.fill()? == 0 {
                    // The host closed the connection mid-exec.
                    return Err(Closed);
                }
                self.handle_frames(agent, run)?;
            }
        }
    }

    /// Reads one chunk of output from `run.outputs[idx]` and sends it.
    fn forward_output(&mut self, run: &mut Running, idx: usize, kind: FrameKind) -> Flow {
        let Some(pipe) = &run.outputs[idx] else {
            return Ok(());
        };
        match sys::read(pipe.as_raw_fd(), &mut self.outbuf[HEADER_LEN..]) {
            Ok(0) => run.outputs[idx] = None,
            Ok(n) => {
                // Answers first, in order.
                self.flush_held()?;
                let header = frame_header(kind, n).map_err(|_| Closed)?;
                self.outbuf[..HEADER_LEN].copy_from_slice(&header);
                self.stream
                    .write_all(&self.outbuf[..HEADER_LEN + n])
                    .map_err(|_| Closed)?;
                if run.exited_at.is_some() {
                    run.last_output = Some(Instant::now());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => run.outputs[idx] = None,
        }
        Ok(())
    }

    /// Handles the frames received during an exec.
    fn handle_frames(&mut self, agent: &Agent, run: &mut Running) -> Flow {
        while let Some(frame) = self.next_frame()? {
            match frame {
                Err(e) => self.send_error(ErrorCode::InvalidRequest, e.to_string())?,
                Ok(HostFrame::Stdin(data)) => run.feed_stdin(data),
                Ok(HostFrame::Request(Request::Ping)) => self.pong()?,
                Ok(HostFrame::Request(Request::Exec(_))) => self.send_error(
                    ErrorCode::InvalidRequest,
                    "a command is already running on this connection".into(),
                )?,
                Ok(HostFrame::Request(Request::Shutdown)) => return self.shutdown(agent),
                Ok(HostFrame::Request(Request::Identity(id))) => self.identity(agent, &id)?,
                Ok(HostFrame::Request(Request::PrepareFreeze)) => self.send_error(
                    ErrorCode::InvalidRequest,
                    "a command is running on this connection: a master is frozen idle".into(),
                )?,
                Ok(HostFrame::Request(Request::NetTest { port })) => self.net_test(agent, port)?,
            }
        }
        run.flush_stdin();
        Ok(())
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// A running command, as its exec loop sees it.
struct Running {
    pid: i32,
    /// Write end of its stdin (non-blocking); None once closed.
    stdin: Option<File>,
    /// Stdin bytes received but not yet written; `pending_off..` remain.
    pending: Vec<u8>,
    pending_off: usize,
    /// The host sent the end of stdin.
    stdin_eof: bool,
    /// Read ends of stdout and stderr; None after EOF.
    outputs: [Option<File>; 2],
    /// Raw wait status once it exited.
    status: Option<i32>,
    deadline: Option<Instant>,
    timed_out: bool,
    exited_at: Option<Instant>,
    last_output: Option<Instant>,
}

impl Running {
    fn feed_stdin(&mut self, data: Vec<u8>) {
        if data.is_empty() {
            self.stdin_eof = true;
        } else if self.stdin.is_some() {
            if self.pending_off == self.pending.len() {
                self.pending = data;
                self.pending_off = 0;
            } else {
                self.pending.extend_from_slice(&data);
            }
        }
    }

    /// Writes as much pending stdin as the pipe takes; closes stdin when
    /// all is written after the host's EOF, or when the command closed it.
    fn flush_stdin(&mut self) {
        let Some(pipe) = &self.stdin else {
            return;
        };
        while self.pending_off < self.pending.len() {
            match sys::write_once(pipe.as_raw_fd(), &self.pending[self.pending_off..]) {
                Ok(n) => self.pending_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // EPIPE: the command closed its stdin; drop the rest.
                    self.stdin = None;
                    break;
                }
            }
        }
        self.pending.clear();
        self.pending_off = 0;
        if self.stdin_eof {
            self.stdin = None;
        }
    }
}

/// Threads serving connections, kept for reuse: creating a thread costs
/// ~10 syscalls (stack, malloc arena, signal setup), handing a connection
/// to an idle one a futex wake.
pub struct Pool<S> {
    state: Mutex<PoolState<S>>,
    wake: Condvar,
}

struct PoolState<S> {
    /// Connections handed over, not yet taken; never more than `idle`.
    queue: VecDeque<S>,
    /// Workers waiting for a connection.
    idle: usize,
    /// Threads started so far.
    started: usize,
}

/// Idle workers kept at most; more exit after their connection.
const MAX_IDLE: usize = 4;

impl<S: Read + Write + AsRawFd + Send + 'static> Pool<S> {
    /// An empty pool.
    pub const fn new() -> Self {
        Pool {
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                idle: 0,
                started: 0,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState<S>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `stream` on an idle worker, or on a new thread.
    pub fn dispatch(&'static self, agent: &'static Agent, stream: S) {
        {
            let mut state = self.lock();
            if state.idle > state.queue.len() {
                state.queue.push_back(stream);
                drop(state);
                self.wake.notify_one();
                return;
            }
            state.started += 1;
        }
        let spawned = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                serve(stream, agent);
                self.work(agent);
            });
        if let Err(e) = spawned {
            self.lock().started -= 1;
            sys::log(&format!("cannot start a connection thread: {e}"));
        }
    }

    /// Serves handed-over connections until enough workers are idle.
    fn work(&self, agent: &Agent) {
        loop {
            let mut state = self.lock();
            if state.idle >= MAX_IDLE {
                state.started -= 1;
                return;
            }
            state.idle += 1;
            let stream = loop {
                if let Some(s) = state.queue.pop_front() {
                    break s;
                }
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            };
            state.idle -= 1;
            drop(state);
            serve(stream, agent);
        }
    }

    /// Threads started and still alive (for tests).
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.lock().started
    }

    /// Idle workers (for tests).
    #[cfg(test)]
    pub fn lock_idle(&self) -> usize {
        self.lock().idle
    }
}

#[cfg(test)]
mod fuzz;
