//! The agent protocol: how the zygote host tools talk to the in-guest agent.
//!
//! The host reaches the agent over vsock port [`AGENT_VSOCK_PORT`]. Both
//! directions carry *frames*:
//!
//! ```text
//! +----------------+--------+---------------------+
//! | len: u32 (LE)  | kind   | payload (len-1)     |
//! +----------------+--------+---------------------+
//! ```
//!
//! `len` counts the kind byte and the payload, and must be in
//! `1..=`[`MAX_FRAME_LEN`]. Kind 0 ([`FrameKind::Control`]) carries JSON: a
//! [`Request`] from host to agent, a [`Response`] from agent to host. Kinds
//! 1-3 carry raw stdin/stdout/stderr bytes of the running command.
//!
//! Host-to-agent frames are [`HostFrame`]s, agent-to-host frames are
//! [`AgentFrame`]s. Each is encoded into one buffer and written with one
//! `write_all`, because every syscall is expensive in the guest.
//!
//! See `docs/agent-protocol.md` for the full protocol.
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 52;

/// Version of this protocol, sent by the agent in [`Response::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest allowed value of a frame's length field (kind byte + payload).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Largest payload one frame can carry.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - 1;

/// Bytes before the payload: the `u32` length and the kind byte.
pub const HEADER_LEN: usize = 5;

/// Console line the agent writes first thing when it runs as PID 1.
pub const START_MARKER: &str = "zygote-agent: start";

/// Console line the agent writes once it listens on vsock. Without a vsock
/// device the line still starts with this marker, followed by
/// ` (no vsock: <reason>)`.
pub const READY_MARKER: &str = "zygote-agent: ready";

/// Errors of encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying reader or writer failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes the frame part (header or body) needed.
        needed: usize,
        /// Bytes read before the end of the stream.
        got: usize,
    },
    /// A frame with length 0 (no kind byte).
    #[error("frame length 0 (a frame has at least its kind byte)")]
    EmptyFrame,
    /// A frame longer than [`MAX_FRAME_LEN`].
    #[error("frame length {0} exceeds the maximum {MAX_FRAME_LEN}")]
    FrameTooLarge(u64),
    /// A kind byte that is not a known [`FrameKind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A known kind that does not belong in this direction (e.g. a Stdout
    /// frame sent by the host).
    #[error("{0:?} frame not allowed in this direction")]
    UnexpectedKind(FrameKind),
    /// A control frame whose payload is not a valid message.
    #[error("invalid control message: {0}")]
    BadJson(#[source] serde_json::Error),
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON [`Request`] (host to agent) or [`Response`] (agent to host).
    Control = 0,
    /// Bytes for the command's stdin; empty means end of stdin.
    Stdin = 1,
    /// Bytes the command wrote to stdout.
    Stdout = 2,
    /// Bytes the command wrote to stderr.
    Stderr = 3,
}

impl FrameKind {
    /// The kind for a kind byte, if known.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Control),
            1 => Some(Self::Stdin),
            2 => Some(Self::Stdout),
            3 => Some(Self::Stderr),
            _ => None,
        }
    }
}

/// The header of a frame carrying `payload_len` bytes of `kind`.
///
/// Lets a writer put the header in front of a payload it read in place (one
/// buffer, one write) without copying.
pub fn frame_header(kind: FrameKind, payload_len: usize) -> Result<[u8; HEADER_LEN], ProtoError> {
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(ProtoError::FrameTooLarge(payload_len as u64 + 1));
    }
    let len = (payload_len as u32 + 1).to_le_bytes();
    Ok([len[0], len[1], len[2], len[3], kind as u8])
}

/// A frame whose length and kind are valid, its payload not yet decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The frame's kind.
    pub kind: FrameKind,
    /// The bytes after the kind byte.
    pub payload: &'a [u8],
}

/// Splits the first frame off `buf`.
///
/// Returns `Ok(None)` while `buf` holds less than one whole frame, else the
/// frame and the number of bytes it took. A bad length is reported as soon
/// as the 4 length bytes are there, so a reader never waits for (or
/// allocates) an oversize frame.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(RawFrame<'_>, usize)>, ProtoError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = check_len(len_bytes)?;
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let kind = FrameKind::from_u8(body[0]).ok_or(ProtoError::UnknownKind(body[0]))?;
    Ok(Some((
        RawFrame {
            kind,
            payload: &body[1..],
        },
        4 + len,
    )))
}

/// Validates a little-endian length field; returns it as usize.
fn check_len(len_bytes: &[u8]) -> Result<usize, ProtoError> {
    let mut le = [0u8; 4];
    le.copy_from_slice(len_bytes);
    let len = u32::from_le_bytes(le);
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if len as usize > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge(len.into()));
    }
    Ok(len as usize)
}

/// Reads into `buf` until it is full; returns how many bytes were read
/// (less than `buf.len()` only at end of stream).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame: `Ok(None)` on end of stream at a frame boundary.
fn read_raw(r: &mut impl Read) -> Result<Option<(FrameKind, Vec<u8>)>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    // The length first, alone: a frame of length 1 has no more bytes than
    // its kind, and EOF right here is the clean end.
    let got = read_full(r, &mut header[..4])?;
    if got == 0 {
        return Ok(None);
    }
    if got < 4 {
        return Err(ProtoError::Truncated { needed: 4, got });
    }
    let len = check_len(&header[..4])?;
    // Only now, with `len` validated, allocate.
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(ProtoError::Truncated { needed: len, got });
    }
    let kind = FrameKind::from_u8(body[0]).ok_or(ProtoError::UnknownKind(body[0]))?;
    body.remove(0);
    Ok(Some((kind, body)))
}

/// Encodes a frame of `kind` around `payload` into one buffer.
fn encode_bytes(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let header = frame_header(kind, payload.len())?;
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(payload);
    Ok(buf)
}

/// Encodes a control frame around the JSON of `msg` into one buffer.
fn encode_json(msg: &impl Serialize) -> Result<Vec<u8>, ProtoError> {
    let mut buf = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut buf, msg).map_err(ProtoError::BadJson)?;
    let header = frame_header(FrameKind::Control, buf.len() - HEADER_LEN)?;
    buf[..HEADER_LEN].copy_from_slice(&header);
    Ok(buf)
}

/// What both directions' frames can do. Implementors give decoding from a
/// validated raw frame and encoding; reading, writing and buffer decoding
/// come with the trait.
pub trait Frame: Sized {
    /// Decodes a frame whose length and kind were already validated.
    fn from_raw(raw: RawFrame<'_>) -> Result<Self, ProtoError>;

    /// The frame as bytes: header and payload in one buffer.
    fn encode(&self) -> Result<Vec<u8>, ProtoError>;

    /// Decodes the first frame of `buf`: `Ok(None)` while it is incomplete,
    /// else the frame and the number of bytes it took.
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtoError> {
        match parse_frame(buf)? {
            None => Ok(None),
            Some((raw, used)) => Ok(Some((Self::from_raw(raw)?, used))),
        }
    }

    /// Writes the frame with a single `write_all`.
    fn write_to(&self, w: &mut impl Write) -> Result<(), ProtoError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Reads one frame; `Ok(None)` on end of stream at a frame boundary.
    fn read_from(r: &mut impl Read) -> Result<Option<Self>, ProtoError> {
        match read_raw(r)? {
            None => Ok(None),
            Some((kind, payload)) => Self::from_raw(RawFrame {
                kind,
                payload: &payload,
            })
            .map(Some),
        }
    }
}

/// A frame from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostFrame {
    /// A control message.
    Request(Request),
    /// Bytes for the running command's stdin; empty means end of stdin.
    Stdin(Vec<u8>),
}

impl Frame for HostFrame {
    fn from_raw(raw: RawFrame<'_>) -> Result<Self, ProtoError> {
        match raw.kind {
            FrameKind::Control => Ok(Self::Request(
                serde_json::from_slice(raw.payload).map_err(ProtoError::BadJson)?,
            )),
            FrameKind::Stdin => Ok(Self::Stdin(raw.payload.to_vec())),
            other => Err(ProtoError::UnexpectedKind(other)),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        match self {
            Self::Request(req) => encode_json(req),
            Self::Stdin(data) => encode_bytes(FrameKind::Stdin, data),
        }
    }
}

/// A frame from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentFrame {
    /// A control message.
    Response(Response),
    /// Bytes the running command wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes the running command wrote to stderr.
    Stderr(Vec<u8>),
}

impl Frame for AgentFrame {
    fn from_raw(raw: RawFrame<'_>) -> Result<Self, ProtoError> {
        match raw.kind {
            FrameKind::Control => Ok(Self::Response(
                serde_json::from_slice(raw.payload).map_err(ProtoError::BadJson)?,
            )),
            FrameKind::Stdout => Ok(Self::Stdout(raw.payload.to_vec())),
            FrameKind::Stderr => Ok(Self::Stderr(raw.payload.to_vec())),
            other => Err(ProtoError::UnexpectedKind(other)),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        match self {
            Self::Response(resp) => encode_json(resp),
            Self::Stdout(data) => encode_bytes(FrameKind::Stdout, data),
            Self::Stderr(data) => encode_bytes(FrameKind::Stderr, data),
        }
    }
}

/// A control message from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`] without spawning.
    Ping,
    /// Runs a command; see [`ExecRequest`].
    Exec(ExecRequest),
    /// Powers the guest off after answering [`Response::ShuttingDown`].
    Shutdown,
    /// Makes this guest unique: sent right after a clone resumes, before
    /// anything else runs in it. Answered with [`Response::IdentitySet`].
    Identity(Identity),
    /// Sent to a master right before it is frozen: the agent aborts the
    /// TCP connections that leave the guest (their programs see
    /// `ECONNABORTED`, in every clone; their peers get a reset) and removes
    /// the address its network identity set, so that a clone inherits
    /// neither. Answered with [`Response::FreezeReady`].
    PrepareFreeze,
    /// Starts the agent's TCP test server (see [`net_test`]) on `port` of
    /// every guest address, in-process (nothing is spawned); answered with
    /// [`Response::NetTestListening`] once it accepts connections. Asking
    /// again for a port it already serves is answered the same way.
    ///
    /// Added without a protocol version change: an agent that predates it
    /// answers with an `invalid_request` error ("unknown variant").
    NetTest {
        /// The guest's TCP port; 0: one the guest's kernel picks (a new
        /// server on every such request).
        port: u16,
    },
}

/// What makes one VM different from its siblings (see "Restoring
/// Uniqueness in MicroVM Snapshots", Brooker et al., 2021).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Fresh host entropy, mixed into the guest kernel's pool
    /// (`RNDADDENTROPY`) before its CRNG is reseeded; 16 to 512 bytes.
    pub entropy: Vec<u8>,
    /// The guest's new hostname.
    pub hostname: String,
    /// The VM's id, written to `/run/zygote/id` for programs in the guest.
    pub vm_id: String,
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub wall_clock_ns: u64,
    /// The VM's network identity, for a VM with a virtio-net device: set
    /// on the interface before the agent answers, and the master's
    /// neighbour (ARP) entries are flushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetIdentity>,
}

/// One VM's address on its network: the agent sets it in-process (ioctls,
/// no `ip` process) on `interface`, brings the interface up, and routes
/// everything that is not on the link through `gateway`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIdentity {
    /// The guest interface (`eth0`: the first virtio-net device).
    pub interface: String,
    /// Its MAC address (unicast).
    pub mac: crate::launch::MacAddr,
    /// Its IPv4 address.
    pub address: std::net::Ipv4Addr,
    /// The prefix length of the link's network (1-32).
    pub prefix_len: u8,
    /// The default gateway (on the link).
    pub gateway: std::net::Ipv4Addr,
}

/// Bounds on [`Identity::entropy`].
pub const IDENTITY_ENTROPY_BYTES: std::ops::RangeInclusive<usize> = 16..=512;

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` unless it
    /// contains a `/`.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those of) the agent's default
    /// environment (`PATH=/bin:/sbin:/usr/bin:/usr/sbin`, `HOME=/root`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's (`/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the host sends Stdin frames; if false the command's stdin
    /// is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command's process group with SIGKILL after this long.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request to run `argv` with defaults: no extra environment, no
    /// cwd, stdin from `/dev/null`, no timeout.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// How long the guest took for each part of an [`Identity`], in µs of its
/// own monotonic clock: where a clone's time to its first answer goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityTimings {
    /// Entropy added and the CRNG reseeded.
    pub entropy_us: u32,
    /// Hostname set.
    pub hostname_us: u32,
    /// Wall clock set.
    pub clock_us: u32,
    /// `/run/zygote/id` written.
    pub id_file_us: u32,
    /// Network identity (MAC, address, route) applied; 0 without one.
    pub net_us: u32,
    /// Of which: the MAC address set.
    #[serde(default)]
    pub net_mac_us: u32,
    /// Of which: the address (and its subnet's route) added.
    #[serde(default)]
    pub net_addr_us: u32,
    /// Of which: the default route added.
    #[serde(default)]
    pub net_route_us: u32,
}

/// A control message from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// First message on every connection.
    Hello {
        /// The agent's [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The agent's crate version.
        agent_version: String,
    },
    /// Answer to [`Request::Ping`].
    Pong {
        /// Milliseconds since the guest booted.
        uptime_ms: u64,
    },
    /// The command of an [`Request::Exec`] runs; its output follows.
    Started {
        /// Its pid in the guest (also its process group id).
        pid: u32,
    },
    /// The command ended; the last message of an exec.
    Exited(ExitStatus),
    /// A request failed; the connection stays usable unless the framing
    /// itself was broken.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Answer to [`Request::Shutdown`]; the guest powers off next.
    ShuttingDown,
    /// Answer to [`Request::Identity`]: every part was applied.
    IdentitySet {
        /// How long each part took the guest (zeros from an agent that
        /// does not say).
        #[serde(default)]
        timings: IdentityTimings,
    },
    /// Answer to [`Request::PrepareFreeze`]: the guest may be frozen.
    FreezeReady {
        /// TCP connections aborted.
        connections_aborted: u32,
    },
    /// Answer to [`Request::NetTest`]: the test server accepts connections.
    NetTestListening {
        /// The port it listens on (the one picked, if 0 was asked for).
        port: u16,
    },
}

/// How a command ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// Whether the agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The status as a shell reports it: the exit code, or 128 + the
    /// signal number; 255 if neither is known.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 255,
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// `argv[0]` was not found.
    NotFound,
    /// `argv[0]` (or its interpreter) is not executable.
    PermissionDenied,
    /// The request was malformed or not allowed now.
    InvalidRequest,
    /// Spawning failed for another reason.
    SpawnFailed,
    /// The agent failed internally.
    Internal,
}

pub mod net_test;

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn host_round_trip(frame: HostFrame) {
        let mut buf = Vec::new();
        frame.write_to(&mut buf).unwrap();
        assert_eq!(buf, frame.encode().unwrap());
        let mut r = &buf[..];
        assert_eq!(HostFrame::read_from(&mut r).unwrap(), Some(frame.clone()));
        assert!(HostFrame::read_from(&mut r).unwrap().is_none());
        assert_eq!(
            HostFrame::decode(&buf).unwrap(),
            Some((frame, buf.len())),
            "decode from a slice"
        );
        assert!(HostFrame::decode(&buf[..buf.len() - 1]).unwrap().is_none());
    }

    fn agent_round_trip(frame: AgentFrame) {
        let mut buf = Vec::new();
        frame.write_to(&mut buf).unwrap();
        let mut r = &buf[..];
        assert_eq!(AgentFrame::read_from(&mut r).unwrap(), Some(frame.clone()));
        assert!(AgentFrame::read_from(&mut r).unwrap().is_none());
        assert_eq!(AgentFrame::decode(&buf).unwrap(), Some((frame, buf.len())));
    }

    #[test]
    fn host_frames_round_trip() {
        host_round_trip(HostFrame::Request(Request::Ping));
        host_round_trip(HostFrame::Request(Request::Shutdown));
        host_round_trip(HostFrame::Request(Request::Exec(ExecRequest::new([
            "true",
        ]))));
        host_round_trip(HostFrame::Request(Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo \"$X\"".into()],
            env: vec![("X".into(), "a b\n\u{e9}".into())],
            cwd: Some("/tmp".into()),
            stdin: true,
            timeout_ms: Some(1500),
        })));
        host_round_trip(HostFrame::Request(Request::NetTest { port: 0 }));
        host_round_trip(HostFrame::Request(Request::NetTest { port: u16::MAX }));
        host_round_trip(HostFrame::Stdin(b"some input\0\xff".to_vec()));
        host_round_trip(HostFrame::Stdin(Vec::new()));
        host_round_trip(HostFrame::Stdin(vec![7; MAX_PAYLOAD_LEN]));
    }

    #[test]
    fn agent_frames_round_trip() {
        for resp in [
            Response::Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
            },
            Response::Pong { uptime_ms: 1234 },
            Response::Started { pid: 42 },
            Response::Exited(ExitStatus {
                code: Some(3),
                signal: None,
                timed_out: false,
            }),
            Response::Exited(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
            }),
            Response::Error {
                code: ErrorCode::NotFound,
                message: "nope: command not found".into(),
            },
            Response::ShuttingDown,
            Response::FreezeReady {
                connections_aborted: 2,
            },
            Response::IdentitySet {
                timings: IdentityTimings::default(),
            },
            Response::IdentitySet {
                timings: IdentityTimings {
                    entropy_us: 1,
                    hostname_us: 2,
                    clock_us: 3,
                    id_file_us: 4,
                    net_us: 5,
                    net_mac_us: 6,
                    net_addr_us: 7,
                    net_route_us: 8,
                },
            },
            Response::NetTestListening { port: 5201 },
        ] {
            agent_round_trip(AgentFrame::Response(resp));
        }
        for code in [
            ErrorCode::NotFound,
            ErrorCode::PermissionDenied,
            ErrorCode::InvalidRequest,
            ErrorCode::SpawnFailed,
            ErrorCode::Internal,
        ] {
            agent_round_trip(AgentFrame::Response(Response::Error {
                code,
                message: String::new(),
            }));
        }
        agent_round_trip(AgentFrame::Stdout(b"out".to_vec()));
        agent_round_trip(AgentFrame::Stderr(b"err".to_vec()));
        agent_round_trip(AgentFrame::Stdout(Vec::new()));
    }

    #[test]
    fn json_shapes() {
        let req = Request::Exec(ExecRequest {
            argv: vec!["ls".into()],
            env: vec![("A".into(), "1".into())],
            cwd: None,
            stdin: false,
            timeout_ms: Some(5),
        });
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"type":"exec","argv":["ls"],"env":[["A","1"]],"cwd":null,"stdin":false,"timeout_ms":5}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Ping).unwrap(),
            r#"{"type":"ping"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::PrepareFreeze).unwrap(),
            r#"{"type":"prepare_freeze"}"#
        );
        // Optional fields may be left out.
        let min: Request = serde_json::from_str(r#"{"type":"exec","argv":["ls"]}"#).unwrap();
        assert_eq!(min, Request::Exec(ExecRequest::new(["ls"])));
        assert_eq!(
            serde_json::to_string(&Response::Exited(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true
            }))
            .unwrap(),
            r#"{"type":"exited","code":null,"signal":9,"timed_out":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Error {
                code: ErrorCode::PermissionDenied,
                message: "m".into()
            })
            .unwrap(),
            r#"{"type":"error","code":"permission_denied","message":"m"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::ShuttingDown).unwrap(),
            r#"{"type":"shutting_down"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::NetTest { port: 8080 }).unwrap(),
            r#"{"type":"net_test","port":8080}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::NetTestListening { port: 8080 }).unwrap(),
            r#"{"type":"net_test_listening","port":8080}"#
        );
        // A port out of range is bad JSON, not a truncated port.
        assert!(serde_json::from_str::<Request>(r#"{"type":"net_test","port":65536}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"net_test"}"#).is_err());
    }

    #[test]
    fn wire_layout() {
        let buf = AgentFrame::Stdout(b"hi".to_vec()).encode().unwrap();
        assert_eq!(buf, [3, 0, 0, 0, 2, b'h', b'i']);
        let buf = HostFrame::Stdin(Vec::new()).encode().unwrap();
        assert_eq!(buf, [1, 0, 0, 0, 1]);
        assert_eq!(
            frame_header(FrameKind::Stderr, 0x100).unwrap(),
            [1, 1, 0, 0, 3]
        );
    }

    #[test]
    fn truncated_frames() {
        let full = HostFrame::Request(Request::Ping).encode().unwrap();
        for cut in 1..full.len() {
            let mut r = &full[..cut];
            let err = HostFrame::read_from(&mut r).unwrap_err();
            assert!(
                matches!(err, ProtoError::Truncated { got, .. } if got < full.len()),
                "cut {cut}: {err}"
            );
            assert!(HostFrame::decode(&full[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn zero_and_oversize_lengths() {
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(
            HostFrame::read_from(&mut r),
            Err(ProtoError::EmptyFrame)
        ));
        assert!(matches!(
            AgentFrame::decode(&[0, 0, 0, 0]),
            Err(ProtoError::EmptyFrame)
        ));
        let over = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        let mut r: &[u8] = &over;
        assert!(matches!(
            AgentFrame::read_from(&mut r),
            Err(ProtoError::FrameTooLarge(n)) if n == MAX_FRAME_LEN as u64 + 1
        ));
        // Detected from the length alone: no need to wait for the body.
        assert!(matches!(
            HostFrame::decode(&u32::MAX.to_le_bytes()),
            Err(ProtoError::FrameTooLarge(_))
        ));
        // The largest allowed length is fine.
        let max = HostFrame::Stdin(vec![0; MAX_PAYLOAD_LEN]).encode().unwrap();
        assert_eq!(max.len(), 4 + MAX_FRAME_LEN);
        assert!(matches!(
            HostFrame::Stdin(vec![0; MAX_PAYLOAD_LEN + 1]).encode(),
            Err(ProtoError::FrameTooLarge(_))
        ));
        assert!(frame_header(FrameKind::Stdout, MAX_PAYLOAD_LEN + 1).is_err());
    }

    #[test]
    fn unknown_and_misdirected_kinds() {
        let mut r: &[u8] = &[1, 0, 0, 0, 9];
        assert!(matches!(
            HostFrame::read_from(&mut r),
            Err(ProtoError::UnknownKind(9))
        ));
        assert!(matches!(
            AgentFrame::decode(&[2, 0, 0, 0, 200, 0]),
            Err(ProtoError::UnknownKind(200))
        ));
        let stdout = AgentFrame::Stdout(b"x".to_vec()).encode().unwrap();
        assert!(matches!(
            HostFrame::decode(&stdout),
            Err(ProtoError::UnexpectedKind(FrameKind::Stdout))
        ));
        let stdin = HostFrame::Stdin(b"x".to_vec()).encode().unwrap();
        let mut r = &stdin[..];
        assert!(matches!(
            AgentFrame::read_from(&mut r),
            Err(ProtoError::UnexpectedKind(FrameKind::Stdin))
        ));
    }

    #[test]
    fn bad_json() {
        for payload in [
            &b"{not json"[..],
            br#"{"type":"no_such_request"}"#,
            br#"{"type":"exec"}"#,
            br#"{"type":"exec","argv":"ls"}"#,
            b"",
        ] {
            let mut buf = frame_header(FrameKind::Control, payload.len())
                .unwrap()
                .to_vec();
            buf.extend_from_slice(payload);
            let mut r = &buf[..];
            assert!(
                matches!(HostFrame::read_from(&mut r), Err(ProtoError::BadJson(_))),
                "{payload:?}"
            );
            // parse_frame still delimits it, so a reader can skip it.
            let (raw, used) = parse_frame(&buf).unwrap().unwrap();
            assert_eq!((raw.kind, used), (FrameKind::Control, buf.len()));
        }
        // A Request is not a Response.
        let ping = HostFrame::Request(Request::Ping).encode().unwrap();
        assert!(matches!(
            AgentFrame::decode(&ping),
            Err(ProtoError::BadJson(_))
        ));
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = HostFrame::Stdin(b"a".to_vec()).encode().unwrap();
        buf.extend(HostFrame::Request(Request::Ping).encode().unwrap());
        let (first, used) = HostFrame::decode(&buf).unwrap().unwrap();
        assert_eq!(first, HostFrame::Stdin(b"a".to_vec()));
        let (second, used2) = HostFrame::decode(&buf[used..]).unwrap().unwrap();
        assert_eq!(second, HostFrame::Request(Request::Ping));
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn shell_codes() {
        let st = |code, signal| ExitStatus {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(st(Some(0), None).shell_code(), 0);
        assert!(st(Some(0), None).success());
        assert_eq!(st(Some(42), None).shell_code(), 42);
        assert!(!st(Some(42), None).success());
        assert_eq!(st(None, Some(9)).shell_code(), 137);
        assert_eq!(st(None, Some(15)).shell_code(), 143);
        assert_eq!(st(None, None).shell_code(), 255);
    }

    #[test]
    fn markers() {
        assert!(!START_MARKER.contains('\n'));
        assert!(!READY_MARKER.contains('\n'));
        assert_ne!(START_MARKER, READY_MARKER);
    }
}
