//! Randomized tests of the agent protocol's frame readers, the parsers of
//! bytes the other side of a vsock connection sent: [`parse_frame`] and
//! [`Frame::decode`] (the agent's buffered reader, the daemon's WebSocket
//! relay) and [`Frame::read_from`] (the host's blocking reader).
//!
//! Each property runs a fixed number of cases on streams of valid frames,
//! hostile headers and garbage, cut at arbitrary points: every stream ends
//! in frames or a typed error, the two readers agree, and no allocation is
//! larger than the frame limit, or than a frame whose length was checked.
//! Test code only: it owns the test binary's global allocator, which
//! measures the largest allocation of the thread under test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Read};

use proptest::prelude::*;

use super::*;

thread_local! {
    /// The largest allocation (or reallocation) this thread made since
    /// [`largest_allocation`] reset it.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting each thread's largest request.
struct Measuring;

fn note(size: usize) {
    // `try_with`: a const-initialized `Cell` has no destructor, but an
    // allocation during thread teardown must not panic.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's own
// arguments, so `Measuring` upholds exactly `System`'s guarantees; `note`
// only touches a const-initialized thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is `System`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`,
        // with `layout`: the caller's contract for `realloc` is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

/// Runs `f` and returns its result and the largest allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

/// A reader that hands out `data` in the given chunk sizes (cycled), and
/// fails with `Interrupted` before the chunks marked so.
struct Chunked<'a> {
    data: &'a [u8],
    cuts: &'a [(usize, bool)],
    turn: usize,
    interrupted: bool,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (size, interrupt) = self.cuts[self.turn % self.cuts.len()];
        if interrupt && !self.interrupted {
            self.interrupted = true;
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.interrupted = false;
        self.turn += 1;
        let n = size.max(1).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// One piece of a stream: a valid frame or something hostile.
#[derive(Debug, Clone)]
enum Piece {
    /// A frame from the host.
    Host(HostFrame),
    /// A frame from the agent.
    Agent(AgentFrame),
    /// A length field, then `body` (which may be shorter or longer).
    Header { len: u32, body: Vec<u8> },
    /// Anything.
    Garbage(Vec<u8>),
}

impl Piece {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Piece::Host(f) => f.encode().unwrap(),
            Piece::Agent(f) => f.encode().unwrap(),
            Piece::Header { len, body } => {
                let mut b = len.to_le_bytes().to_vec();
                b.extend_from_slice(body);
                b
            }
            Piece::Garbage(b) => b.clone(),
        }
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => (0usize..200_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..24).prop_map(|c| c.into_iter().collect())
}

fn host_frame() -> impl Strategy<Value = HostFrame> {
    prop_oneof![
        Just(HostFrame::Request(Request::Ping)),
        Just(HostFrame::Request(Request::Shutdown)),
        any::<u16>().prop_map(|port| HostFrame::Request(Request::NetTest { port })),
        (
            proptest::collection::vec(text(), 0..4),
            any::<Option<u64>>()
        )
            .prop_map(|(argv, timeout_ms)| {
                HostFrame::Request(Request::Exec(ExecRequest {
                    argv,
                    timeout_ms,
                    ..ExecRequest::default()
                }))
            }),
        payload().prop_map(HostFrame::Stdin),
    ]
}

fn agent_frame() -> impl Strategy<Value = AgentFrame> {
    prop_oneof![
        any::<u64>().prop_map(|uptime_ms| AgentFrame::Response(Response::Pong { uptime_ms })),
        any::<u16>().prop_map(|port| AgentFrame::Response(Response::NetTestListening { port })),
        text().prop_map(|message| AgentFrame::Response(Response::Error {
            code: ErrorCode::Internal,
            message
        })),
        (any::<Option<i32>>(), any::<Option<i32>>()).prop_map(|(code, signal)| {
            AgentFrame::Response(Response::Exited(ExitStatus {
                code,
                signal,
                timed_out: false,
            }))
        }),
        payload().prop_map(AgentFrame::Stdout),
        payload().prop_map(AgentFrame::Stderr),
    ]
}

/// Length fields a hostile peer would try.
fn hostile_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(MAX_FRAME_LEN as u32),
        Just(MAX_FRAME_LEN as u32 + 1),
        Just(u32::MAX),
        Just(i32::MAX as u32 + 1),
        1u32..64,
        any::<u32>(),
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => host_frame().prop_map(Piece::Host),
        3 => agent_frame().prop_map(Piece::Agent),
        2 => (hostile_len(), proptest::collection::vec(any::<u8>(), 0..80))
            .prop_map(|(len, body)| Piece::Header { len, body }),
        1 => proptest::collection::vec(any::<u8>(), 0..16).prop_map(Piece::Garbage),
    ]
}

fn cuts() -> impl Strategy<Value = Vec<(usize, bool)>> {
    proptest::collection::vec(
        (
            prop_oneof![1usize..8, 1usize..70_000],
            proptest::bool::weighted(0.1),
        ),
        1..8,
    )
}

/// The largest length field among the frames `buf` holds whose length is
/// valid: the most any reader may allocate for a frame.
fn largest_valid_len(buf: &[u8]) -> usize {
    let mut at = 0;
    let mut largest = 0;
    while let Some(len) = buf.get(at..at + 4) {
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            break;
        }
        largest = largest.max(len);
        at += 4 + len;
    }
    largest
}

/// What reading `buf` frame by frame gives: each frame's decoding, then how
/// it ends (`None`: cleanly, at a frame boundary).
type Outcome<F> = (Vec<Result<F, String>>, Option<String>);

/// The buffered reader's view ([`Frame::decode`]), as the agent reads.
fn decode_all<F: Frame>(buf: &[u8]) -> Outcome<F> {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        if at == buf.len() {
            return (frames, None);
        }
        match parse_frame(&buf[at..]) {
            Ok(None) => return (frames, Some("truncated".into())),
            Err(e) => return (frames, Some(kind_of(&e))),
            Ok(Some((raw, used))) => {
                assert!(used > 4 && used <= buf.len() - at);
                assert_eq!(raw.payload.len(), used - HEADER_LEN);
                frames.push(F::from_raw(raw).map_err(|e| kind_of(&e)));
                at += used;
            }
        }
    }
}

/// The blocking reader's view ([`Frame::read_from`]), as the host reads.
/// A frame whose payload does not decode ends it: the stream is still
/// delimited, but `read_from` reports the error.
fn read_all<F: Frame>(r: &mut impl Read) -> Outcome<F> {
    let mut frames = Vec::new();
    loop {
        match F::read_from(r) {
            Ok(Some(f)) => frames.push(Ok(f)),
            Ok(None) => return (frames, None),
            Err(e @ (ProtoError::BadJson(_) | ProtoError::UnexpectedKind(_))) => {
                frames.push(Err(kind_of(&e)))
            }
            Err(e) => return (frames, Some(kind_of(&e))),
        }
    }
}

/// An error's kind, to compare the readers' (the truncation counts differ:
/// one reads in place, the other says how much it got).
fn kind_of(e: &ProtoError) -> String {
    match e {
        ProtoError::Io(e) => format!("io {e}"),
        ProtoError::Truncated { .. } => "truncated".into(),
        ProtoError::EmptyFrame => "empty".into(),
        ProtoError::FrameTooLarge(n) => format!("too large {n}"),
        ProtoError::UnknownKind(k) => format!("unknown kind {k}"),
        ProtoError::UnexpectedKind(k) => format!("unexpected kind {k:?}"),
        ProtoError::BadJson(_) => "bad json".into(),
    }
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES, when set, runs that many instead (a deeper run).
        cases: match std::env::var_os("PROPTEST_CASES") {
            Some(_) => ProptestConfig::default().cases,
            None => cases,
        },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Reads `stream` both ways as frames of type `F`, checks that they agree
/// and that no allocation exceeded what a checked length allows.
fn check_stream<F: Frame + PartialEq + std::fmt::Debug>(
    stream: &[u8],
    cuts: &[(usize, bool)],
) -> Result<(), TestCaseError> {
    let expected: Outcome<F> = decode_all(stream);
    let mut reader = Chunked {
        data: stream,
        cuts,
        turn: 0,
        interrupted: false,
    };
    let (got, largest) = largest_allocation(|| read_all::<F>(&mut reader));
    prop_assert_eq!(&got, &expected);
    // A frame's body, its payload copy and small JSON values: never more
    // than a checked frame length, and never more than the limit.
    let bound = largest_valid_len(stream) + 4096;
    prop_assert!(
        largest <= bound && largest <= MAX_FRAME_LEN + 4096,
        "allocated {} bytes, bound {}",
        largest,
        bound
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Any bytes: a frame, "more bytes needed" or a typed error, consistent
    /// with the length field; never a panic.
    #[test]
    fn parse_frame_takes_any_bytes(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
        match parse_frame(&buf) {
            Ok(Some((raw, used))) => {
                let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                prop_assert_eq!(used, 4 + len);
                prop_assert_eq!(raw.kind as u8, buf[4]);
                prop_assert_eq!(raw.payload, &buf[5..used]);
            }
            Ok(None) => {
                if buf.len() >= 4 {
                    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                    prop_assert!((1..=MAX_FRAME_LEN).contains(&len));
                    prop_assert!(buf.len() < 4 + len);
                }
            }
            Err(ProtoError::EmptyFrame) => prop_assert_eq!(&buf[..4], &[0; 4]),
            Err(ProtoError::FrameTooLarge(n)) => prop_assert!(n > MAX_FRAME_LEN as u64),
            Err(ProtoError::UnknownKind(k)) => prop_assert!(k > 3),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
        let _ = HostFrame::decode(&buf);
        let _ = AgentFrame::decode(&buf);
    }
}

proptest! {
    #![proptest_config(config(160))]

    /// Streams of valid frames, hostile headers and garbage, read by the
    /// host from the agent in arbitrary chunks.
    #[test]
    fn agent_streams_end_in_frames_or_errors(
        pieces in proptest::collection::vec(piece(), 0..6),
        cuts in cuts(),
    ) {
        let stream: Vec<u8> = pieces.iter().flat_map(Piece::bytes).collect();
        check_stream::<AgentFrame>(&stream, &cuts)?;
    }

    /// The same streams as the agent would read them from the host.
    #[test]
    fn host_streams_end_in_frames_or_errors(
        pieces in proptest::collection::vec(piece(), 0..6),
        cuts in cuts(),
    ) {
        let stream: Vec<u8> = pieces.iter().flat_map(Piece::bytes).collect();
        check_stream::<HostFrame>(&stream, &cuts)?;
    }

    /// Valid frames survive any cutting, and come out as they went in.
    #[test]
    fn valid_frames_round_trip_through_any_cuts(
        frames in proptest::collection::vec(host_frame(), 0..5),
        cuts in cuts(),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        let mut reader = Chunked { data: &stream, cuts: &cuts, turn: 0, interrupted: false };
        let (got, end) = read_all::<HostFrame>(&mut reader);
        prop_assert_eq!(end, None);
        let got: Vec<HostFrame> = got.into_iter().map(Result::unwrap).collect();
        prop_assert_eq!(got, frames);
    }

    /// A control frame's JSON with bytes flipped, cut or inserted: a
    /// message or `BadJson`, never a panic, the stream still delimited.
    #[test]
    fn corrupted_control_messages_are_bad_json(
        frame in host_frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut json = match &frame {
            HostFrame::Request(r) => serde_json::to_vec(r).unwrap(),
            HostFrame::Stdin(_) => b"{\"type\":\"ping\"}".to_vec(),
        };
        for (at, b) in flips {
            let i = at.index(json.len());
            json[i] ^= b;
        }
        json.truncate(cut.index(json.len() + 1));
        let mut buf = frame_header(FrameKind::Control, json.len()).unwrap().to_vec();
        buf.extend_from_slice(&json);
        buf.extend_from_slice(&HostFrame::Request(Request::Ping).encode().unwrap());
        let (frames, end) = decode_all::<HostFrame>(&buf);
        prop_assert_eq!(end, None);
        prop_assert_eq!(frames.len(), 2);
        match &frames[0] {
            Ok(HostFrame::Request(_)) => {}
            Err(kind) => prop_assert_eq!(kind, "bad json"),
            Ok(other) => prop_assert!(false, "{:?}", other),
        }
        prop_assert_eq!(&frames[1], &Ok(HostFrame::Request(Request::Ping)));
    }
}

/// A length field of 4 GiB - 1 is refused from its 4 bytes: the reader
/// neither waits for nor allocates the body.
#[test]
fn a_huge_length_allocates_nothing() {
    let mut stream = u32::MAX.to_le_bytes().to_vec();
    stream.extend_from_slice(&[0; 100]);
    let mut r = &stream[..];
    let (result, largest) = largest_allocation(|| HostFrame::read_from(&mut r));
    assert!(matches!(result, Err(ProtoError::FrameTooLarge(n)) if n == u64::from(u32::MAX)));
    assert!(largest < 4096, "allocated {largest} bytes");
    assert_eq!(r.len(), 100, "nothing read past the length");
}
