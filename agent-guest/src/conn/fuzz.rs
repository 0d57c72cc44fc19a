//! Randomized tests of the agent's frame reader: the bytes the host sends
//! on a connection ([`Conn::next_frame`] over [`Conn::fill`]'s buffer),
//! arriving in arbitrary pieces over a real socket.
//!
//! Each case serves one connection whose host side writes valid frames,
//! hostile headers and garbage, cut at arbitrary points, then closes. The
//! connection must end (no hang), answer every frame it could delimit with
//! what the protocol says (a framing error with an error, then the end),
//! and never buffer more than one checked frame. Test code only: no
//! command runs (the agent has no reaper, so an exec is refused), and the
//! identity, test server and shutdown hooks do nothing.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use proto::{
    frame_header, AgentFrame, ExecRequest, Frame, FrameKind, HostFrame, Identity, ProtoError,
    Request, Response, MAX_FRAME_LEN,
};

use super::{Agent, Conn, READ_CHUNK};

/// An agent that runs nothing and changes nothing.
fn agent() -> Agent {
    Agent {
        base_env: Vec::new(),
        reaper: None,
        shutdown: Box::new(|| {}),
        apply_identity: Box::new(|_| Ok(Default::default())),
        prepare_freeze: Box::new(|| Ok(0)),
        // Port 1 stands for one that is taken.
        start_net_test: Box::new(|port| match port {
            1 => Err((proto::ErrorCode::InvalidRequest, "in use".into())),
            port => Ok(port),
        }),
    }
}

/// One piece of what the host sends.
#[derive(Debug, Clone)]
enum Piece {
    /// A valid frame.
    Frame(HostFrame),
    /// A length field, then `body` (which may be shorter or longer).
    Header { len: u32, body: Vec<u8> },
    /// A control frame whose JSON is damaged.
    BadControl(Vec<u8>),
}

impl Piece {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Piece::Frame(f) => f.encode().unwrap(),
            Piece::Header { len, body } => {
                let mut b = len.to_le_bytes().to_vec();
                b.extend_from_slice(body);
                b
            }
            Piece::BadControl(json) => {
                let mut b = frame_header(FrameKind::Control, json.len())
                    .unwrap()
                    .to_vec();
                b.extend_from_slice(json);
                b
            }
        }
    }
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("clone-1".to_string()),
        proptest::collection::vec(any::<char>(), 0..8).prop_map(|c| c.into_iter().collect()),
    ]
}

fn host_frame() -> impl Strategy<Value = HostFrame> {
    prop_oneof![
        3 => Just(HostFrame::Request(Request::Ping)),
        1 => Just(HostFrame::Request(Request::Shutdown)),
        1 => Just(HostFrame::Request(Request::PrepareFreeze)),
        1 => proptest::collection::vec(name(), 0..3)
            .prop_map(|argv| HostFrame::Request(Request::Exec(ExecRequest::new(argv)))),
        1 => prop_oneof![Just(1u16), any::<u16>()]
            .prop_map(|port| HostFrame::Request(Request::NetTest { port })),
        1 => (name(), 0usize..600, any::<u64>()).prop_map(|(hostname, n, wall_clock_ns)| {
            HostFrame::Request(Request::Identity(Identity {
                entropy: vec![7; n],
                hostname,
                vm_id: "vm-1".into(),
                wall_clock_ns,
                net: None,
            }))
        }),
        2 => prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (0usize..300_000).prop_map(|n| vec![b'x'; n]),
        ]
        .prop_map(HostFrame::Stdin),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        6 => host_frame().prop_map(Piece::Frame),
        2 => (
            prop_oneof![
                Just(0u32),
                Just(MAX_FRAME_LEN as u32),
                Just(MAX_FRAME_LEN as u32 + 1),
                Just(u32::MAX),
                1u32..40,
                any::<u32>(),
            ],
            proptest::collection::vec(any::<u8>(), 0..48),
        )
            .prop_map(|(len, body)| Piece::Header { len, body }),
        1 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Piece::BadControl),
    ]
}

/// What the agent must answer to one delimited frame, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Pong,
    /// An error (of any code: an exec is refused for several reasons).
    Error,
    IdentitySet,
    FreezeReady,
    NetTestListening(u16),
    ShuttingDown,
}

/// The answers the protocol requires for `stream`, and whether the agent
/// closes before the host does (a framing error or a shutdown).
fn expected_answers(stream: &[u8]) -> Vec<Answer> {
    let mut answers = Vec::new();
    let mut at = 0;
    loop {
        match HostFrame::decode(&stream[at..]) {
            // The end, or a frame cut short by the host's close: no answer.
            Ok(None) => return answers,
            Ok(Some((frame, used))) => {
                at += used;
                match frame {
                    HostFrame::Stdin(_) => {}
                    HostFrame::Request(Request::Ping) => answers.push(Answer::Pong),
                    HostFrame::Request(Request::Exec(_)) => answers.push(Answer::Error),
                    HostFrame::Request(Request::Identity(id)) => {
                        answers.push(match crate::identity::validate(&id) {
                            Ok(()) => Answer::IdentitySet,
                            Err(_) => Answer::Error,
                        })
                    }
                    HostFrame::Request(Request::PrepareFreeze) => answers.push(Answer::FreezeReady),
                    HostFrame::Request(Request::NetTest { port: 1 }) => answers.push(Answer::Error),
                    HostFrame::Request(Request::NetTest { port }) => {
                        answers.push(Answer::NetTestListening(port))
                    }
                    HostFrame::Request(Request::Shutdown) => {
                        answers.push(Answer::ShuttingDown);
                        return answers;
                    }
                }
            }
            // A delimited frame with a bad payload: answered, stream intact.
            Err(ProtoError::BadJson(_) | ProtoError::UnexpectedKind(_)) => {
                let len = u32::from_le_bytes(stream[at..at + 4].try_into().unwrap());
                at += 4 + len as usize;
                answers.push(Answer::Error);
            }
            // Broken framing: answered, then the connection ends.
            Err(_) => {
                answers.push(Answer::Error);
                return answers;
            }
        }
    }
}

/// The largest valid length field of the frames in `stream`.
fn largest_valid_len(stream: &[u8]) -> usize {
    let mut at = 0;
    let mut largest = 0;
    while let Some(len) = stream.get(at..at + 4) {
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            break;
        }
        largest = largest.max(len);
        at += 4 + len;
    }
    largest
}

/// Serves one connection whose host writes `stream` in pieces of `cuts`
/// bytes, then closes its sending side; returns what the agent answered
/// and the size of the agent's receive buffer at the end.
fn serve_stream(stream: Vec<u8>, cuts: Vec<usize>) -> (Vec<AgentFrame>, usize) {
    let (host, guest) = UnixStream::pair().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let agent = agent();
        let mut conn = Conn {
            stream: guest,
            inbuf: Vec::new(),
            start: 0,
            end: 0,
            outbuf: Vec::new(),
            events: None,
            held: Vec::new(),
        };
        let _ = conn.run(&agent);
        let _ = done_tx.send(conn.inbuf.len());
    });
    let mut writer = host.try_clone().unwrap();
    thread::spawn(move || {
        let mut rest = &stream[..];
        let mut turn = 0;
        while !rest.is_empty() {
            let n = cuts[turn % cuts.len()].clamp(1, rest.len());
            turn += 1;
            // The agent may close first (a framing error, a shutdown).
            if writer.write_all(&rest[..n]).is_err() {
                break;
            }
            rest = &rest[n..];
        }
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut reader = host;
    reader
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut frames = Vec::new();
    loop {
        match AgentFrame::read_from(&mut reader) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            // The agent closed with bytes of ours unread (it stopped at a
            // framing error or a shutdown): Linux says so after the data.
            Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the agent's answers do not parse, or it hangs: {e}"),
        }
    }
    let buffered = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the connection did not end");
    (frames, buffered)
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES, when set, runs that many instead (a deeper run).
        cases: match std::env::var_os("PROPTEST_CASES") {
            Some(_) => ProptestConfig::default().cases,
            None => 96,
        },
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_host_stream_gets_its_answers_and_ends(
        pieces in proptest::collection::vec(piece(), 0..6),
        cuts in proptest::collection::vec(prop_oneof![1usize..6, 1usize..100_000], 1..6),
    ) {
        let stream: Vec<u8> = pieces.iter().flat_map(Piece::bytes).collect();
        let expected = expected_answers(&stream);
        let bound = largest_valid_len(&stream) + 4;
        let (frames, buffered) = serve_stream(stream, cuts);
        let mut frames = frames.into_iter();
        match frames.next() {
            Some(AgentFrame::Response(Response::Hello { .. })) => {}
            other => prop_assert!(false, "first frame {:?}", other),
        }
        let answers: Vec<Answer> = frames
            .map(|f| match f {
                AgentFrame::Response(Response::Pong { .. }) => Answer::Pong,
                AgentFrame::Response(Response::Error { .. }) => Answer::Error,
                AgentFrame::Response(Response::IdentitySet { .. }) => Answer::IdentitySet,
                AgentFrame::Response(Response::FreezeReady { .. }) => Answer::FreezeReady,
                AgentFrame::Response(Response::NetTestListening { port }) => {
                    Answer::NetTestListening(port)
                }
                AgentFrame::Response(Response::ShuttingDown) => Answer::ShuttingDown,
                other => panic!("unexpected answer {other:?}"),
            })
            .collect();
        prop_assert_eq!(answers, expected);
        prop_assert!(
            buffered <= bound.max(READ_CHUNK),
            "buffered {} bytes, the largest frame has {}",
            buffered,
            bound
        );
    }
}

/// A host that announces 4 GiB and sends a little: refused from the length
/// alone, with nothing buffered for it.
#[test]
fn an_oversize_length_is_refused_without_buffering() {
    let mut stream = u32::MAX.to_le_bytes().to_vec();
    stream.extend_from_slice(&[1; 32]);
    let (frames, buffered) = serve_stream(stream, vec![3]);
    assert_eq!(frames.len(), 2, "{frames:?}");
    match &frames[1] {
        AgentFrame::Response(Response::Error { message, .. }) => {
            assert!(message.contains("exceeds the maximum"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(buffered <= READ_CHUNK);
}

/// A frame that arrives one byte at a time is answered once it is whole.
#[test]
fn a_frame_in_single_bytes_is_answered() {
    let stream = HostFrame::Request(Request::Ping).encode().unwrap();
    let (frames, _) = serve_stream(stream, vec![1]);
    assert!(matches!(
        frames.as_slice(),
        [
            AgentFrame::Response(Response::Hello { .. }),
            AgentFrame::Response(Response::Pong { .. })
        ]
    ));
}
