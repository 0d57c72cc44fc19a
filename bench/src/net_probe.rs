//! The host side of a network measurement: a client of the agent's TCP
//! test server (wire protocol in [`proto::net_test`]) that times uploads
//! into its sink, downloads from its source, and small echoed requests,
//! each bounded in bytes and time so that a slow or silent guest ends the
//! measurement instead of hanging it.
//!
//! It must not: start anything (the caller has a server listening at the
//! address it passes), or decide what the numbers mean.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proto::net_test::{source_request, Mode};
use serde::Serialize;

/// How long a connect, read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per write of an upload.
const CHUNK: usize = 256 * 1024;

/// Errors of a measurement.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A connection to the server failed or broke.
    #[error("{addr}: {what}: {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server answered something else than the protocol says.
    #[error("{addr}: {what}")]
    Wrong {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        what: WrongAnswer,
    },
}

/// How an answer was wrong.
#[derive(Debug, thiserror::Error)]
pub enum WrongAnswer {
    /// The sink counted other than what was sent.
    #[error("the sink counted {got} bytes, {sent} were sent")]
    Count {
        /// Sent.
        sent: u64,
        /// Counted.
        got: u64,
    },
    /// The echo differs from the request.
    #[error("the echo differs from the request")]
    Echo,
}

/// One timed transfer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: u64,
    /// From connecting to the last byte (upload: to the sink's count).
    pub secs: f64,
}

impl Transfer {
    /// Throughput, MB/s (10^6 bytes per second).
    pub fn mb_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

/// A client of one server.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The server (a published port on the host, or the guest's address).
    pub addr: SocketAddr,
}

impl Probe {
    fn io(&self, what: &'static str) -> impl Fn(io::Error) -> ProbeError + '_ {
        move |source| ProbeError::Io {
            addr: self.addr,
            what,
            source,
        }
    }

    fn wrong(&self, what: WrongAnswer) -> ProbeError {
        ProbeError::Wrong {
            addr: self.addr,
            what,
        }
    }

    fn connect(&self) -> Result<TcpStream, ProbeError> {
        let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT).map_err(self.io("connect"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| s.set_nodelay(true))
            .map_err(self.io("socket options"))?;
        Ok(s)
    }

    /// Sends to the sink until `max_bytes` are sent or `max_time` passed,
    /// then waits for its count (which must match).
    pub fn upload(&self, max_bytes: u64, max_time: Duration) -> Result<Transfer, ProbeError> {
        let t = Instant::now();
        let mut s = self.connect()?;
        s.write_all(&[Mode::Sink as u8])
            .map_err(self.io("send the mode"))?;
        let chunk = vec![0x5au8; CHUNK];
        let mut sent = 0u64;
        while sent < max_bytes && t.elapsed() < max_time {
            let k = (max_bytes - sent).min(CHUNK as u64) as usize;
            s.write_all(&chunk[..k]).map_err(self.io("upload"))?;
            sent += k as u64;
        }
        s.shutdown(Shutdown::Write)
            .map_err(self.io("end the upload"))?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .map_err(self.io("read the sink's count"))?;
        let secs = t.elapsed().as_secs_f64();
        let got = u64::from_be_bytes(count);
        if got != sent {
            return Err(self.wrong(WrongAnswer::Count { sent, got }));
        }
        Ok(Transfer { bytes: sent, secs })
    }

    /// Asks the source for `max_bytes` and reads until they came or
    /// `max_time` passed (then hangs up).
    pub fn download(&self, max_bytes: u64, max_time: Duration) -> Result<Transfer, ProbeError> {
        let t = Instant::now();
        let mut s = self.connect()?;
        s.write_all(&source_request(max_bytes))
            .map_err(self.io("send the request"))?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < max_bytes && t.elapsed() < max_time {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => got += k as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("download")(e)),
            }
        }
        Ok(Transfer {
            bytes: got,
            secs: t.elapsed().as_secs_f64(),
        })
    }

    /// `n` requests of `size` bytes echoed back, each on a new connection
    /// as an HTTP/1.0 client makes them: connect, send, read the whole
    /// answer (the close is not waited for). Milliseconds each; stops
    /// early, with what it has, once `max_time` passed.
    pub fn requests(
        &self,
        n: usize,
        size: usize,
        max_time: Duration,
    ) -> Result<Vec<f64>, ProbeError> {
        let mut req = vec![Mode::Echo as u8];
        req.extend((0..size).map(|i| b'a' + (i % 26) as u8));
        let mut back = vec![0u8; size];
        let start = Instant::now();
        let mut out = Vec::with_capacity(n.min(4096));
        while out.len() < n && start.elapsed() < max_time {
            let t = Instant::now();
            let mut s = self.connect()?;
            s.write_all(&req).map_err(self.io("send a request"))?;
            s.read_exact(&mut back).map_err(self.io("read an answer"))?;
            out.push(t.elapsed().as_secs_f64() * 1000.0);
            if back != req[1..] {
                return Err(self.wrong(WrongAnswer::Echo));
            }
        }
        Ok(out)
    }

    /// `n` round trips of `size` bytes on one connection. Milliseconds
    /// each; stops early once `max_time` passed.
    pub fn round_trips(
        &self,
        n: usize,
        size: usize,
        max_time: Duration,
    ) -> Result<Vec<f64>, ProbeError> {
        let msg: Vec<u8> = (0..size).map(|i| b'A' + (i % 26) as u8).collect();
        let mut back = vec![0u8; size];
        let start = Instant::now();
        let mut s = self.connect()?;
        s.write_all(&[Mode::Echo as u8])
            .map_err(self.io("send the mode"))?;
        let mut out = Vec::with_capacity(n.min(4096));
        while out.len() < n && start.elapsed() < max_time {
            let t = Instant::now();
            s.write_all(&msg).map_err(self.io("send a request"))?;
            s.read_exact(&mut back).map_err(self.io("read an answer"))?;
            out.push(t.elapsed().as_secs_f64() * 1000.0);
            if back != msg {
                return Err(self.wrong(WrongAnswer::Echo));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, TcpListener};

    /// A server of the protocol on the loopback, one thread per
    /// connection, the way the agent's answers (a stand-in: the bench does
    /// not link the agent). `lie` makes the sink miscount and the echo
    /// change a byte.
    fn server(lie: bool) -> Probe {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut mode = [0u8; 1];
                    if s.read_exact(&mut mode).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    match Mode::from_u8(mode[0]) {
                        Some(Mode::Sink) => {
                            let mut n = 0u64;
                            while let Ok(k @ 1..) = s.read(&mut buf) {
                                n += k as u64;
                            }
                            let _ = s.write_all(&(n + u64::from(lie)).to_be_bytes());
                        }
                        Some(Mode::Echo) => {
                            while let Ok(k @ 1..) = s.read(&mut buf) {
                                if lie {
                                    buf[0] ^= 1;
                                }
                                if s.write_all(&buf[..k]).is_err() {
                                    return;
                                }
                            }
                        }
                        Some(Mode::Source) => {
                            let mut len = [0u8; 8];
                            if s.read_exact(&mut len).is_err() {
                                return;
                            }
                            let mut left = u64::from_be_bytes(len);
                            while left > 0 {
                                let k = left.min(buf.len() as u64) as usize;
                                if s.write_all(&buf[..k]).is_err() {
                                    return;
                                }
                                left -= k as u64;
                            }
                        }
                        None => {}
                    }
                });
            }
        });
        Probe { addr }
    }

    #[test]
    fn transfers_move_what_they_say() {
        let p = server(false);
        let up = p
            .upload(3 * CHUNK as u64 + 7, Duration::from_secs(20))
            .unwrap();
        assert_eq!(up.bytes, 3 * CHUNK as u64 + 7);
        assert!(up.secs > 0.0 && up.mb_s() > 0.0);
        let down = p.download(5 << 20, Duration::from_secs(20)).unwrap();
        assert_eq!(down.bytes, 5 << 20);
        // Bounded by time: stops early with what it has.
        let up = p.upload(u64::MAX, Duration::from_millis(200)).unwrap();
        assert!(up.bytes > 0 && up.secs < 5.0, "{up:?}");
        let down = p.download(1 << 40, Duration::from_millis(200)).unwrap();
        assert!(down.bytes > 0 && down.secs < 5.0, "{down:?}");
    }

    #[test]
    fn requests_and_round_trips_are_timed() {
        let p = server(false);
        let r = p.requests(20, 100, Duration::from_secs(20)).unwrap();
        assert_eq!(r.len(), 20);
        assert!(r.iter().all(|ms| *ms > 0.0));
        let r = p.round_trips(30, 100, Duration::from_secs(20)).unwrap();
        assert_eq!(r.len(), 30);
        // Bounded by time.
        let r = p
            .round_trips(usize::MAX, 10, Duration::from_millis(100))
            .unwrap();
        assert!(!r.is_empty());
    }

    #[test]
    fn wrong_answers_and_no_server_are_errors() {
        let p = server(true);
        let e = p.upload(1000, Duration::from_secs(20)).unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::Wrong {
                    what: WrongAnswer::Count {
                        sent: 1000,
                        got: 1001
                    },
                    ..
                }
            ),
            "{e}"
        );
        let e = p.requests(1, 10, Duration::from_secs(20)).unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::Wrong {
                    what: WrongAnswer::Echo,
                    ..
                }
            ),
            "{e}"
        );
        // Nobody listening.
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let e = Probe { addr }
            .upload(10, Duration::from_secs(1))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProbeError::Io {
                    what: "connect",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn throughput_arithmetic() {
        let t = Transfer {
            bytes: 50_000_000,
            secs: 0.5,
        };
        assert_eq!(t.mb_s(), 100.0);
        assert_eq!(
            Transfer {
                bytes: 5,
                secs: 0.0
            }
            .mb_s(),
            0.0
        );
    }
}
