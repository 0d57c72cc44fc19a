//! The TCP test server of the `net_test` request: sink, echo and source
//! connections (wire protocol in [`proto::net_test`]), served in-process so
//! that the host can measure a guest's network without spawning anything
//! (a fork+exec costs ~1.6 s of emulated guest kernel; a forking server
//! would measure that, not the network).
//!
//! Each server is a listening socket and [`WORKERS`] threads blocked in
//! `accept` on it: no thread is made per connection (a dozen syscalls, each
//! ~0.5 ms in the guest), and a connection costs `accept`, its reads and
//! writes, and `close`. The socket options every connection needs (timeouts,
//! `TCP_NODELAY`) are set once on the listening socket, whose connections
//! inherit them. Servers stay until the guest ends; there are at most
//! [`MAX_SERVERS`] of them.
//!
//! Bounded in everything a client controls: connections served at once
//! (the workers; more wait in the backlog), memory (one buffer per worker),
//! time (idle timeout and a limit per connection), and what a source
//! connection may ask for. A client can make its own connection fail, never
//! the agent.
//!
//! It must not: touch the agent's vsock connections, or spawn processes.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::net_test::{Mode, CONNECTION_LIMIT, IDLE_TIMEOUT, MAX_SOURCE_BYTES};
use proto::ErrorCode;

use crate::sys::cvt;

/// Threads accepting on one server: the connections it serves at once.
pub const WORKERS: usize = 4;
/// Servers (ports) at most.
pub const MAX_SERVERS: usize = 4;
/// Each worker's buffer, and the largest read or write it makes. (On the
/// heap: a static buffer of zeros would be read-only data, 256 KiB more
/// of initramfs for every boot to load.)
const BUF_LEN: usize = 256 * 1024;
/// Stack of a worker thread (its buffer is on the heap).
const WORKER_STACK: usize = 128 * 1024;
/// Pause after an `accept` that failed for lack of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a server could not be started.
#[derive(Debug)]
pub enum StartError {
    /// Another program in the guest has the port.
    InUse(u16),
    /// [`MAX_SERVERS`] servers run already.
    TooMany,
    /// An OS error.
    Os {
        /// What failed, for the message.
        what: &'static str,
        /// The error.
        error: io::Error,
    },
}

impl StartError {
    /// The protocol's error code and message for it.
    pub fn to_error(&self) -> (ErrorCode, String) {
        match self {
            Self::InUse(port) => (
                ErrorCode::InvalidRequest,
                format!("TCP port {port} is in use in the guest by another program"),
            ),
            Self::TooMany => (
                ErrorCode::InvalidRequest,
                format!("{MAX_SERVERS} test servers run already"),
            ),
            Self::Os { what, error } => (ErrorCode::Internal, format!("{what}: {error}")),
        }
    }
}

/// The servers started so far, by port.
pub struct Servers {
    ports: Mutex<Vec<u16>>,
}

impl Servers {
    /// No servers yet.
    pub const fn new() -> Self {
        Servers {
            ports: Mutex::new(Vec::new()),
        }
    }

    /// Serves `port` on `addr` (0: a port the kernel picks) unless this
    /// port is served already; returns the port once connections are
    /// accepted (queued in the backlog until a worker takes them).
    pub fn start(&self, addr: Ipv4Addr, port: u16) -> Result<u16, StartError> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        if port != 0 && ports.contains(&port) {
            return Ok(port);
        }
        if ports.len() >= MAX_SERVERS {
            return Err(StartError::TooMany);
        }
        let listener = listen(addr, port)?;
        let port = listener
            .local_addr()
            .map_err(|error| StartError::Os {
                what: "getsockname",
                error,
            })?
            .port();
        let listener = Arc::new(listener);
        let mut started = 0;
        let mut last_error = None;
        for _ in 0..WORKERS {
            let listener = listener.clone();
            match std::thread::Builder::new()
                .stack_size(WORKER_STACK)
                .spawn(move || work(&listener))
            {
                Ok(_) => started += 1,
                Err(e) => last_error = Some(e),
            }
        }
        if started == 0 {
            // Dropping the last reference closes the socket.
            return Err(StartError::Os {
                what: "start a test server thread",
                error: last_error.unwrap_or_else(|| io::ErrorKind::Other.into()),
            });
        }
        ports.push(port);
        Ok(port)
    }
}

/// The agent's servers.
static SERVERS: Servers = Servers::new();

/// Serves `port` on every guest address (the `net_test` request).
pub fn start(port: u16) -> Result<u16, StartError> {
    SERVERS.start(Ipv4Addr::UNSPECIFIED, port)
}

/// A listening socket whose connections inherit the idle timeout on reads
/// and writes and `TCP_NODELAY` (Linux copies a listener's socket options
/// to the sockets `accept` returns).
fn listen(addr: Ipv4Addr, port: u16) -> Result<TcpListener, StartError> {
    let listener = TcpListener::bind((addr, port)).map_err(|error| {
        if error.kind() == io::ErrorKind::AddrInUse {
            StartError::InUse(port)
        } else {
            StartError::Os {
                what: "bind",
                error,
            }
        }
    })?;
    let fd = listener.as_raw_fd();
    let timeout = libc::timeval {
        tv_sec: IDLE_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    let os = |what| move |error| StartError::Os { what, error };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout).map_err(os("SO_RCVTIMEO"))?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout).map_err(os("SO_SNDTIMEO"))?;
    let one: libc::c_int = 1;
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one).map_err(os("TCP_NODELAY"))?;
    Ok(listener)
}

fn setsockopt<T>(fd: libc::c_int, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed, which is the
    // type the option takes (the callers pass `timeval` or `c_int`).
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A worker: accepts and serves connections, one at a time, forever.
fn work(listener: &TcpListener) {
    let mut buf = vec![0u8; BUF_LEN];
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // Its end (EOF, a timeout, a reset, a bad request) is the
                // client's business.
                let _ = serve(&mut stream, &mut buf, Instant::now() + CONNECTION_LIMIT);
                drop(stream);
            }
            // The listener's receive timeout also bounds `accept`: nobody
            // came, wait again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            // Out of descriptors or memory: let it pass.
            Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
        }
    }
}

/// Serves one connection (see [`proto::net_test`]); `buf` is the worker's
/// buffer. Generic over the stream for the tests.
pub fn serve<S: Read + Write>(s: &mut S, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let n = read(s, buf)?;
    if n == 0 {
        return Ok(());
    }
    let mode = Mode::from_u8(buf[0]).ok_or_else(|| bad("unknown mode"))?;
    match mode {
        Mode::Sink => {
            let mut total = (n - 1) as u64;
            loop {
                check(deadline)?;
                match read(s, buf)? {
                    0 => break,
                    k => total += k as u64,
                }
            }
            s.write_all(&total.to_be_bytes())
        }
        Mode::Echo => {
            if n > 1 {
                s.write_all(&buf[1..n])?;
            }
            loop {
                check(deadline)?;
                match read(s, buf)? {
                    0 => return Ok(()),
                    k => s.write_all(&buf[..k])?,
                }
            }
        }
        Mode::Source => {
            let mut len = [0u8; 8];
            let have = (n - 1).min(len.len());
            len[..have].copy_from_slice(&buf[1..1 + have]);
            s.read_exact(&mut len[have..])?;
            let mut left = u64::from_be_bytes(len);
            if left > MAX_SOURCE_BYTES {
                return Err(bad("source length above the limit"));
            }
            // Zeros: the buffer may hold an earlier connection's bytes.
            buf.fill(0);
            while left > 0 {
                check(deadline)?;
                let k = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..k])?;
                left -= k as u64;
            }
            Ok(())
        }
    }
}

/// One read, retried on EINTR.
fn read<S: Read>(s: &mut S, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

fn check(deadline: Instant) -> io::Result<()> {
    if Instant::now() >= deadline {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(())
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// For the tests: a connection to a server on the loopback.
#[cfg(test)]
pub fn connect(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Shutdown, TcpStream};

    /// A server of its own on the loopback, for one test.
    fn server() -> u16 {
        let servers: &'static Servers = Box::leak(Box::new(Servers::new()));
        servers.start(Ipv4Addr::LOCALHOST, 0).unwrap()
    }

    fn sink(port: u16, data: &[u8]) -> u64 {
        let mut s = connect(port);
        s.write_all(&[Mode::Sink as u8]).unwrap();
        s.write_all(data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing after the count");
        u64::from_be_bytes(count)
    }

    /// Whether the server closed `s` without a byte.
    fn closed_without_answer(s: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => rest.is_empty(),
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    #[test]
    fn sink_counts_what_it_got() {
        let port = server();
        assert_eq!(sink(port, b""), 0);
        assert_eq!(sink(port, b"x"), 1);
        let big = vec![7u8; 3 * BUF_LEN + 5];
        assert_eq!(sink(port, &big), big.len() as u64);
        // The mode byte and data in one write.
        let mut s = connect(port);
        s.write_all(b"sabc").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_be_bytes(count), 3);
    }

    #[test]
    fn echo_returns_everything_and_serves_round_trips() {
        let port = server();
        // One request per connection, as an HTTP/1.0 client.
        let mut s = connect(port);
        s.write_all(b"ehello").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"hello");
        // Round trips on one connection.
        let mut s = connect(port);
        s.write_all(&[Mode::Echo as u8]).unwrap();
        for i in 0..50u8 {
            let msg = [i; 64];
            s.write_all(&msg).unwrap();
            let mut got = [0u8; 64];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, msg);
        }
        // More than one buffer, read while it is written.
        let data: Vec<u8> = (0..2 * BUF_LEN + 3).map(|i| i as u8).collect();
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn source_sends_what_was_asked() {
        let port = server();
        for len in [0u64, 1, BUF_LEN as u64, 3 * BUF_LEN as u64 + 11] {
            let mut s = connect(port);
            s.write_all(&proto::net_test::source_request(len)).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert_eq!(got.len() as u64, len);
            assert!(got.iter().all(|b| *b == 0));
        }
        // The request in pieces.
        let mut s = connect(port);
        let req = proto::net_test::source_request(5);
        s.write_all(&req[..3]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(&req[3..]).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn bad_requests_close_the_connection_and_the_server_goes_on() {
        let port = server();
        let mut s = connect(port);
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(closed_without_answer(&mut s));
        let mut s = connect(port);
        s.write_all(&proto::net_test::source_request(MAX_SOURCE_BYTES + 1))
            .unwrap();
        assert!(closed_without_answer(&mut s));
        // A source request cut short.
        let mut s = connect(port);
        s.write_all(b"o\x00\x00").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert!(closed_without_answer(&mut s));
        // Connected and closed at once.
        drop(connect(port));
        assert_eq!(sink(port, b"still here"), 10);
    }

    #[test]
    fn more_clients_than_workers_are_all_served() {
        let port = server();
        // Every worker held by an idle connection: the next ones wait in
        // the backlog until one of those ends.
        let held: Vec<TcpStream> = (0..WORKERS)
            .map(|_| {
                let mut s = connect(port);
                s.write_all(b"e").unwrap();
                s
            })
            .collect();
        let clients: Vec<_> = (0..2 * WORKERS)
            .map(|i| std::thread::spawn(move || sink(port, &vec![1; i])))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
        for (i, c) in clients.into_iter().enumerate() {
            assert_eq!(c.join().unwrap(), i as u64);
        }
    }

    #[test]
    fn a_port_is_served_once_and_servers_are_bounded() {
        let servers: &'static Servers = Box::leak(Box::new(Servers::new()));
        let first = servers.start(Ipv4Addr::LOCALHOST, 0).unwrap();
        // Idempotent.
        assert_eq!(servers.start(Ipv4Addr::LOCALHOST, first).unwrap(), first);
        // A port another program holds.
        let other = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = other.local_addr().unwrap().port();
        let err = servers.start(Ipv4Addr::LOCALHOST, taken).unwrap_err();
        assert!(matches!(err, StartError::InUse(p) if p == taken), "{err:?}");
        let (code, msg) = err.to_error();
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(msg.contains(&taken.to_string()), "{msg}");
        for _ in 1..MAX_SERVERS {
            servers.start(Ipv4Addr::LOCALHOST, 0).unwrap();
        }
        let err = servers.start(Ipv4Addr::LOCALHOST, 0).unwrap_err();
        assert!(matches!(err, StartError::TooMany), "{err:?}");
        // Asking again for one it serves still works.
        assert_eq!(servers.start(Ipv4Addr::LOCALHOST, first).unwrap(), first);
    }

    #[test]
    fn connections_inherit_the_listeners_options() {
        let listener = listen(Ipv4Addr::LOCALHOST, 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = connect(port);
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.read_timeout().unwrap(), Some(IDLE_TIMEOUT));
        assert_eq!(accepted.write_timeout().unwrap(), Some(IDLE_TIMEOUT));
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn a_connection_past_its_deadline_is_ended() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"sxyz").unwrap();
        let mut buf = vec![0u8; 64];
        let past = Instant::now();
        let err = serve(&mut b, &mut buf, past).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
