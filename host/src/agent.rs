//! Host side of the agent protocol (see docs/agent-protocol.md): talks to
//! the in-guest agent through the VMM's vsock Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::{
    AgentFrame, ErrorCode, ExecRequest, ExitStatus, Frame, HostFrame, Identity, ProtoError,
    Request, Response,
};

use proto::events::now_us;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The vsock connection could not be made.
    #[error("cannot reach the guest agent over vsock: {0}")]
    Connect(String),
    /// The byte stream broke the protocol or the connection dropped.
    #[error("agent connection: {0}")]
    Proto(#[from] ProtoError),
    /// The agent closed the connection.
    #[error("the guest agent closed the connection")]
    Closed,
    /// The agent speaks another protocol version.
    #[error("the guest agent speaks protocol {agent}, this zygote speaks {ours}: rebuild the guest image")]
    Version {
        /// The agent's version.
        agent: u32,
        /// Ours.
        ours: u32,
    },
    /// The agent answered with something that does not fit the request.
    #[error("unexpected answer from the guest agent: {0}")]
    Unexpected(String),
    /// The agent refused the request.
    #[error("{message}")]
    Remote {
        /// Kind of failure.
        code: ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// Writing the command's output locally failed.
    #[error("cannot write command output: {0}")]
    Output(std::io::Error),
}

/// How stale the wall clock given to a clone may be before it is sent again.
pub const CLOCK_SLACK: std::time::Duration = std::time::Duration::from_millis(800);

/// One connection to the agent.
pub struct AgentClient {
    stream: UnixStream,
    /// The agent's version string from its hello (empty on a connection
    /// carried from the master, which had the hello).
    pub agent_version: String,
    /// Whether the connection was carried from the master's snapshot (no
    /// hello on it).
    pub carried: bool,
    /// How long the guest took for the parts of the last identity it set.
    pub identity_timings: Option<proto::IdentityTimings>,
}

impl AgentClient {
    /// Connects through the VMM's vsock socket at `uds` and reads the hello
    /// (unless the VMM handed over the connection carried from the master,
    /// whose hello the master's host read).
    pub fn connect(uds: &Path) -> Result<Self, AgentError> {
        let c = connect_vsock(uds, proto::AGENT_VSOCK_PORT)?;
        if c.carried {
            Ok(Self::carried(c.stream))
        } else {
            Self::over(c.stream)
        }
    }

    /// A client on the connection carried from the master (no hello).
    fn carried(stream: UnixStream) -> Self {
        AgentClient {
            stream,
            agent_version: String::new(),
            carried: true,
            identity_timings: None,
        }
    }

    /// Connects to a fresh clone and makes it unique in one round trip: the
    /// identity and a ping go out right behind the connection request, before
    /// the agent's hello arrives, so nothing else can run in the guest first.
    /// On the connection carried from the master (the VMM hands it over at
    /// once, the agent already waits on it) the identity is the first thing
    /// the agent reads. Returns the client and when (CLOCK_MONOTONIC µs) the
    /// connection was made (the hello arrived, or the carried connection
    /// was handed over), the identity's answer and the pong arrived. All of
    /// it within `timeout`.
    /// The identity is made by `identity` once the guest accepted the
    /// connection, so that the wall clock in it is as fresh as it can be;
    /// if the guest took longer than [`CLOCK_SLACK`] to apply it (a busy
    /// host), a second one is sent, whose clock is then off by at most the
    /// time that one takes.
    pub fn connect_identified(
        uds: &Path,
        identity: impl Fn() -> std::io::Result<Identity>,
        timeout: std::time::Duration,
    ) -> Result<(Self, [u64; 3]), AgentError> {
        let deadline = std::time::Instant::now() + timeout;
        let VsockStream {
            mut stream,
            carried,
        } = connect_vsock_within(uds, proto::AGENT_VSOCK_PORT, timeout)?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        stream
            .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .map_err(ProtoError::Io)?;
        let made = now_us();
        // One write: one packet for the guest, one wake-up of the agent.
        let mut both =
            HostFrame::Request(Request::Identity(identity().map_err(AgentError::Output)?))
                .encode()?;
        both.extend(HostFrame::Request(Request::Ping).encode()?);
        stream.write_all(&both).map_err(ProtoError::Io)?;
        let (mut client, hello) = if carried {
            (Self::carried(stream), made)
        } else {
            (Self::over(stream)?, now_us())
        };
        match client.next()? {
            AgentFrame::Response(Response::IdentitySet { timings }) => {
                client.identity_timings = Some(timings)
            }
            AgentFrame::Response(Response::Error { code, message }) => {
                return Err(AgentError::Remote { code, message })
            }
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        let mut identified = now_us();
        match client.next()? {
            AgentFrame::Response(Response::Pong { .. }) => {}
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        if identified.saturating_sub(made) > CLOCK_SLACK.as_micros() as u64 {
            client.set_identity(identity().map_err(AgentError::Output)?)?;
            identified = now_us();
        }
        let pong = now_us();
        client
            .stream
            .set_read_timeout(None)
            .map_err(ProtoError::Io)?;
        Ok((client, [hello, identified, pong]))
    }

    /// Uses an already connected stream (reads the hello first).
    pub fn over(mut stream: UnixStream) -> Result<Self, AgentError> {
        match AgentFrame::read_from(&mut stream)? {
            Some(AgentFrame::Response(Response::Hello {
                protocol_version,
                agent_version,
            })) => {
                if protocol_version != proto::PROTOCOL_VERSION {
                    return Err(AgentError::Version {
                        agent: protocol_version,
                        ours: proto::PROTOCOL_VERSION,
                    });
                }
                Ok(AgentClient {
                    stream,
                    agent_version,
                    carried: false,
                    identity_timings: None,
                })
            }
            Some(other) => Err(AgentError::Unexpected(format!(
                "{other:?} instead of hello"
            ))),
            None => Err(AgentError::Closed),
        }
    }

    /// Bounds how long one read of an answer waits (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), AgentError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| AgentError::Proto(ProtoError::Io(e)))
    }

    /// The connection itself (after the hello), for a caller that relays
    /// frames on its own (the daemon's streamed exec).
    pub fn into_stream(self) -> std::io::Result<UnixStream> {
        Ok(self.stream)
    }

    fn send(&mut self, req: Request) -> Result<(), AgentError> {
        HostFrame::Request(req).write_to(&mut self.stream)?;
        Ok(())
    }

    fn next(&mut self) -> Result<AgentFrame, AgentError> {
        AgentFrame::read_from(&mut self.stream)?.ok_or(AgentError::Closed)
    }

    /// Pings the agent; returns the guest's uptime in ms.
    pub fn ping(&mut self) -> Result<u64, AgentError> {
        self.send(Request::Ping)?;
        match self.next()? {
            AgentFrame::Response(Response::Pong { uptime_ms }) => Ok(uptime_ms),
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Runs a command; streams its stdout/stderr to `stdout`/`stderr` and
    /// feeds it `stdin` (when given, `req.stdin` is set for you). Returns
    /// how it ended.
    pub fn exec(
        &mut self,
        mut req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, AgentError> {
        req.stdin = stdin.is_some();
        self.send(Request::Exec(req))?;
        match self.next()? {
            AgentFrame::Response(Response::Started { .. }) => {}
            AgentFrame::Response(Response::Error { code, message }) => {
                return Err(AgentError::Remote { code, message })
            }
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        let done = Arc::new(AtomicBool::new(false));
        if let Some(mut input) = stdin {
            let mut w = self
                .stream
                .try_clone()
                .map_err(|e| AgentError::Proto(ProtoError::Io(e)))?;
            let done = done.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match input.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    if HostFrame::Stdin(buf[..n].to_vec())
                        .write_to(&mut w)
                        .is_err()
                        || n == 0
                    {
                        return;
                    }
                }
            });
        }
        let result = loop {
            match self.next() {
                Ok(AgentFrame::Stdout(b)) => stdout.write_all(&b).map_err(AgentError::Output)?,
                Ok(AgentFrame::Stderr(b)) => stderr.write_all(&b).map_err(AgentError::Output)?,
                Ok(AgentFrame::Response(Response::Exited(status))) => break Ok(status),
                Ok(AgentFrame::Response(Response::Error { code, message })) => {
                    break Err(AgentError::Remote { code, message })
                }
                Ok(other) => break Err(AgentError::Unexpected(format!("{other:?}"))),
                Err(e) => break Err(e),
            }
        };
        done.store(true, Ordering::Release);
        let _ = stdout.flush();
        let _ = stderr.flush();
        result
    }

    /// Runs a command without stdin and collects its output.
    pub fn exec_collect(
        &mut self,
        req: ExecRequest,
    ) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), AgentError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = self.exec(req, None, &mut out, &mut err)?;
        Ok((status, out, err))
    }

    /// Makes the guest unique (entropy, hostname, id, wall clock); the
    /// first request to send to a fresh clone.
    pub fn set_identity(&mut self, identity: Identity) -> Result<(), AgentError> {
        self.send(Request::Identity(identity))?;
        match self.next()? {
            AgentFrame::Response(Response::IdentitySet { timings }) => {
                self.identity_timings = Some(timings);
                Ok(())
            }
            AgentFrame::Response(Response::Error { code, message }) => {
                Err(AgentError::Remote { code, message })
            }
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts the agent's TCP test server on guest `port` (0: one the
    /// guest picks); returns the port it listens on.
    pub fn net_test(&mut self, port: u16) -> Result<u16, AgentError> {
        self.send(Request::NetTest { port })?;
        match self.next()? {
            AgentFrame::Response(Response::NetTestListening { port }) => Ok(port),
            AgentFrame::Response(Response::Error { code, message }) => {
                Err(AgentError::Remote { code, message })
            }
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Readies a master's guest for its freeze (see
    /// [`Request::PrepareFreeze`]); returns how many TCP connections it
    /// aborted.
    pub fn prepare_freeze(&mut self) -> Result<u32, AgentError> {
        self.send(Request::PrepareFreeze)?;
        match self.next()? {
            AgentFrame::Response(Response::FreezeReady {
                connections_aborted,
            }) => Ok(connections_aborted),
            AgentFrame::Response(Response::Error { code, message }) => {
                Err(AgentError::Remote { code, message })
            }
            other => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the guest to power off.
    pub fn shutdown(&mut self) -> Result<(), AgentError> {
        self.send(Request::Shutdown)?;
        match self.next() {
            Ok(AgentFrame::Response(Response::ShuttingDown)) | Err(AgentError::Closed) => Ok(()),
            Ok(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(e),
        }
    }
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent_version", &self.agent_version)
            .field("carried", &self.carried)
            .finish()
    }
}

/// A vsock connection made through a VMM's Unix socket.
#[derive(Debug)]
pub struct VsockStream {
    /// The byte stream to the guest port.
    pub stream: UnixStream,
    /// The VMM handed over the connection carried from the master's
    /// snapshot (its guest end was open before the clone existed) instead
    /// of making a new one.
    pub carried: bool,
}

/// Connects to a VMM's vsock Unix socket and asks for guest `port`
/// (Firecracker's `CONNECT` handshake), waiting up to 10 s for the guest.
pub fn connect_vsock(uds: &Path, port: u32) -> Result<VsockStream, AgentError> {
    connect_vsock_within(uds, port, Duration::from_secs(10))
}

/// [`connect_vsock`], waiting at most `timeout` for the guest's answer.
/// The VMM answers `OK <host port>`, followed by ` carried` when it handed
/// over the connection carried from the master (the first `CONNECT` to
/// that guest port after a restore gets it).
pub fn connect_vsock_within(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<VsockStream, AgentError> {
    let err = |e: std::io::Error| AgentError::Connect(e.to_string());
    let mut s = UnixStream::connect(uds)
        .map_err(|e| AgentError::Connect(format!("{}: {e}", uds.display())))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(err)?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(err)?;
    // Read the reply byte by byte: nothing after the newline is ours to take.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(AgentError::Connect(format!("guest refused port {port}"))),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => return Err(AgentError::Connect("bad reply to CONNECT".into())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AgentError::Connect(format!(
                    "the guest did not answer the connection to port {port} within {timeout:?}"
                )))
            }
            Err(e) => return Err(err(e)),
        }
    }
    s.set_read_timeout(None).map_err(err)?;
    let line = String::from_utf8_lossy(&line);
    let mut words = line.split(' ');
    let carried = match (words.next(), words.next(), words.next(), words.next()) {
        (Some("OK"), Some(_), None, None) => false,
        (Some("OK"), Some(_), Some("carried"), None) => true,
        _ => {
            return Err(AgentError::Connect(format!(
                "unexpected reply to CONNECT {port}: {line}"
            )))
        }
    };
    Ok(VsockStream { stream: s, carried })
}

/// A new identity for VM `vm_id`: 64 bytes from the host's `getrandom`, the
/// host's wall clock now, and `hostname`.
pub fn fresh_identity(vm_id: &str, hostname: &str) -> std::io::Result<Identity> {
    let mut entropy = vec![0u8; 64];
    let mut filled = 0;
    while filled < entropy.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `entropy`.
        let n = unsafe {
            libc::getrandom(
                entropy[filled..].as_mut_ptr().cast(),
                entropy.len() - filled,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(std::io::Error::other)?;
    Ok(Identity {
        entropy,
        hostname: hostname.to_string(),
        vm_id: vm_id.to_string(),
        wall_clock_ns: now.as_nanos() as u64,
        net: None,
    })
}
