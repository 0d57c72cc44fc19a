//! The connection handler driven over a `UnixStream` pair, on the host:
//! real commands, real pipes, the real reaper. Nothing here needs PID 1.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use proto::{AgentFrame, ErrorCode, ExecRequest, ExitStatus, Frame, HostFrame, Request, Response};

use crate::conn::{serve, Agent};
use crate::reaper::Reaper;

static SHUTDOWNS: AtomicUsize = AtomicUsize::new(0);
static IDENTITIES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| Agent {
        base_env: crate::init::base_env(false),
        reaper: Reaper::global(),
        shutdown: Box::new(|| {
            SHUTDOWNS.fetch_add(1, Ordering::SeqCst);
        }),
        apply_identity: Box::new(|id| {
            IDENTITIES.lock().unwrap().push(id.hostname.clone());
            Ok(proto::IdentityTimings {
                hostname_us: 7,
                ..Default::default()
            })
        }),
        prepare_freeze: Box::new(|| Ok(3)),
        // The real server, on the loopback only.
        start_net_test: Box::new(|port| {
            static SERVERS: crate::net_test::Servers = crate::net_test::Servers::new();
            SERVERS
                .start(std::net::Ipv4Addr::LOCALHOST, port)
                .map_err(|e| e.to_error())
        }),
    })
}

/// The host end of a connection served by a thread.
struct Host {
    s: UnixStream,
}

/// Everything an exec produced.
#[derive(Debug, Default)]
struct Outcome {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
    error: Option<(ErrorCode, String)>,
    other: Vec<Response>,
}

impl Host {
    fn connect() -> Host {
        Self::connect_with(|| {})
    }

    /// Connects, running `setup` in the serving thread first.
    fn connect_with(setup: impl FnOnce() + Send + 'static) -> Host {
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        thread::spawn(move || {
            setup();
            serve(guest, agent());
        });
        let mut h = Host { s: host };
        match h.recv() {
            Some(AgentFrame::Response(Response::Hello {
                protocol_version,
                agent_version,
            })) => {
                assert_eq!(protocol_version, proto::PROTOCOL_VERSION);
                assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        h
    }

    fn send(&mut self, frame: HostFrame) {
        frame.write_to(&mut self.s).unwrap();
    }

    fn request(&mut self, req: Request) {
        self.send(HostFrame::Request(req));
    }

    fn recv(&mut self) -> Option<AgentFrame> {
        AgentFrame::read_from(&mut self.s).unwrap()
    }

    fn recv_response(&mut self) -> Response {
        match self.recv() {
            Some(AgentFrame::Response(r)) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// Reads frames until the exec ends (Exited or Error).
    fn collect(&mut self) -> Outcome {
        let mut out = Outcome::default();
        loop {
            match self.recv() {
                Some(AgentFrame::Stdout(d)) => out.stdout.extend(d),
                Some(AgentFrame::Stderr(d)) => out.stderr.extend(d),
                Some(AgentFrame::Response(Response::Started { pid })) => {
                    assert!(out.pid.is_none(), "two Started");
                    out.pid = Some(pid);
                }
                Some(AgentFrame::Response(Response::Exited(st))) => {
                    out.exit = Some(st);
                    return out;
                }
                Some(AgentFrame::Response(Response::Error { code, message }))
                    if out.pid.is_none() =>
                {
                    out.error = Some((code, message));
                    return out;
                }
                Some(AgentFrame::Response(other)) => out.other.push(other),
                None => panic!("connection closed during exec: {out:?}"),
            }
        }
    }

    fn exec(&mut self, req: ExecRequest) -> Outcome {
        self.request(Request::Exec(req));
        self.collect()
    }

    fn sh(&mut self, script: &str) -> Outcome {
        self.exec(ExecRequest::new(["sh", "-c", script]))
    }

    fn ping(&mut self) {
        self.request(Request::Ping);
        assert!(matches!(self.recv_response(), Response::Pong { .. }));
    }
}

fn exited(code: i32) -> Option<ExitStatus> {
    Some(ExitStatus {
        code: Some(code),
        signal: None,
        timed_out: false,
    })
}

/// Whether any process of group `pgid` exists.
fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

fn wait_group_gone(pgid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !group_alive(pgid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn hello_and_ping() {
    let mut h = Host::connect();
    h.ping();
    h.ping();
}

#[test]
fn echo() {
    let mut h = Host::connect();
    let out = h.exec(ExecRequest::new(["echo", "hello", "world"]));
    assert!(out.pid.is_some());
    assert_eq!(out.stdout, b"hello world\n");
    assert_eq!(out.stderr, b"");
    assert_eq!(out.exit, exited(0));
    // The connection serves more requests.
    let out = h.sh("echo err >&2; exit 3");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit, exited(3));
    h.ping();
}

#[test]
fn killed_by_signal() {
    let mut h = Host::connect();
    let out = h.sh("kill -TERM $$");
    let st = out.exit.unwrap();
    assert_eq!((st.code, st.signal, st.timed_out), (None, Some(15), false));
    assert_eq!(st.shell_code(), 143);
}

#[test]
fn not_found_keeps_the_connection() {
    let mut h = Host::connect();
    let out = h.exec(ExecRequest::new(["no-such-command-zygote"]));
    let (code, msg) = out.error.unwrap();
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(msg, "no-such-command-zygote: command not found");
    let out = h.exec(ExecRequest::new(["/no/such/path"]));
    assert_eq!(out.error.unwrap().0, ErrorCode::NotFound);
    h.ping();
    assert_eq!(h.sh("exit 0").exit, exited(0));
}

#[test]
fn permission_denied() {
    let path = std::env::temp_dir().join(format!("zygote-agent-noexec-{}", std::process::id()));
    std::fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
    let mut h = Host::connect();
    let out = h.exec(ExecRequest::new([path.to_str().unwrap()]));
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.error.unwrap().0, ErrorCode::PermissionDenied);
    h.ping();
}

#[test]
fn invalid_requests_keep_the_connection() {
    let mut h = Host::connect();
    let out = h.exec(ExecRequest::new(Vec::<String>::new()));
    assert_eq!(out.error.unwrap().0, ErrorCode::InvalidRequest);
    let mut req = ExecRequest::new(["true"]);
    req.cwd = Some("/no/such/dir".into());
    assert_eq!(h.exec(req).error.unwrap().0, ErrorCode::InvalidRequest);
    // Bad JSON in a well-delimited frame: an error, the stream stays.
    let payload = br#"{"type":"frobnicate"}"#;
    let mut buf = proto::frame_header(proto::FrameKind::Control, payload.len())
        .unwrap()
        .to_vec();
    buf.extend_from_slice(payload);
    h.s.write_all(&buf).unwrap();
    match h.recv_response() {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidRequest),
        other => panic!("{other:?}"),
    }
    // A delimited frame of the wrong direction (Stdout): an error too.
    h.s.write_all(&[3, 0, 0, 0, 2, b'h', b'i']).unwrap();
    match h.recv_response() {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidRequest),
        other => panic!("{other:?}"),
    }
    // Stdin with no command running is dropped.
    h.send(HostFrame::Stdin(b"stray".to_vec()));
    h.ping();
}

#[test]
fn broken_framing_closes_the_connection() {
    for bad in [&[0u8, 0, 0, 0][..], &[1, 0, 0, 0, 77], &[0xff; 4]] {
        let mut h = Host::connect();
        h.s.write_all(bad).unwrap();
        match h.recv_response() {
            Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidRequest),
            other => panic!("{other:?}"),
        }
        assert!(h.recv().is_none(), "connection should be closed");
    }
}

#[test]
fn env_and_cwd() {
    let mut h = Host::connect();
    let mut req = ExecRequest::new(["sh", "-c", "echo \"$FOO\"; pwd"]);
    req.env = vec![("FOO".into(), "bar baz".into())];
    req.cwd = Some("/tmp".into());
    let out = h.exec(req);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bar baz\n/tmp\n");
    assert_eq!(out.exit, exited(0));
}

#[test]
fn clean_signal_state_and_own_process_group() {
    // Commands must not inherit the serving thread's signal mask.
    let mut h = Host::connect_with(|| {
        // SAFETY: plain sigset manipulation of this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
    });
    let out = h.exec(ExecRequest::new([
        "cat",
        "/proc/self/stat",
        "/proc/self/status",
    ]));
    assert_eq!(out.exit, exited(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    assert_eq!(field("SigBlk:"), 0, "signal mask leaked");
    assert_eq!(
        field("SigIgn:") & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE ignored"
    );
    // /proc/self/stat: "pid (comm) state ppid pgrp ..."
    let stat = text.lines().next().unwrap();
    let pid: u32 = stat.split(' ').next().unwrap().parse().unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let pgrp: u32 = after_comm.split(' ').nth(2).unwrap().parse().unwrap();
    assert_eq!(Some(pid), out.pid);
    assert_eq!(pgrp, pid, "not in its own process group");
}

#[test]
fn stdin_round_trip() {
    let mut h = Host::connect();
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = true;
    h.request(Request::Exec(req));
    // 4 MiB through cat, written while the output is read: the host side
    // writes from another thread, as a real host must.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut w = h.s.try_clone().unwrap();
    let expected = data.clone();
    let writer = thread::spawn(move || {
        for chunk in data.chunks(60_000) {
            HostFrame::Stdin(chunk.to_vec()).write_to(&mut w).unwrap();
        }
        HostFrame::Stdin(Vec::new()).write_to(&mut w).unwrap();
    });
    let out = h.collect();
    writer.join().unwrap();
    assert_eq!(out.exit, exited(0));
    assert!(
        out.stdout == expected,
        "stdin/stdout mismatch ({} bytes)",
        out.stdout.len()
    );
}

#[test]
fn stdin_not_requested_is_dev_null() {
    let mut h = Host::connect();
    let out = h.exec(ExecRequest::new(["cat"]));
    assert_eq!(out.exit, exited(0));
    assert_eq!(out.stdout, b"");
}

#[test]
fn stdin_closed_early_by_the_command() {
    let mut h = Host::connect();
    let mut req = ExecRequest::new(["head", "-c", "5"]);
    req.stdin = true;
    h.request(Request::Exec(req));
    let mut w = h.s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for _ in 0..64 {
            // Errors are fine once the exec is over.
            if HostFrame::Stdin(vec![b'x'; 32 * 1024])
                .write_to(&mut w)
                .is_err()
            {
                return;
            }
        }
        let _ = HostFrame::Stdin(Vec::new()).write_to(&mut w);
    });
    let out = h.collect();
    writer.join().unwrap();
    assert_eq!(out.stdout, b"xxxxx");
    assert_eq!(out.exit, exited(0));
    h.ping();
}

fn seq(from: u64, to: u64) -> Vec<u8> {
    let mut s = String::new();
    for i in from..=to {
        s.push_str(&i.to_string());
        s.push('\n');
    }
    s.into_bytes()
}

#[test]
fn ten_mib_on_stdout_and_stderr_at_once() {
    let mut h = Host::connect();
    let out = h.sh("seq 1 1600000 & seq 10000000 11300000 >&2; wait");
    assert_eq!(out.exit, exited(0));
    assert!(out.stdout.len() > 10 << 20 && out.stderr.len() > 10 << 20);
    assert!(out.stdout == seq(1, 1_600_000), "stdout corrupted");
    assert!(
        out.stderr == seq(10_000_000, 11_300_000),
        "stderr corrupted"
    );
}

#[test]
fn timeout_kills_the_group() {
    let mut h = Host::connect();
    let mut req = ExecRequest::new(["sh", "-c", "sleep 30 & sleep 30"]);
    req.timeout_ms = Some(300);
    let start = Instant::now();
    let out = h.exec(req);
    let st = out.exit.unwrap();
    assert!(st.timed_out);
    assert_eq!(st.signal, Some(libc::SIGKILL));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(wait_group_gone(out.pid.unwrap(), Duration::from_secs(5)));
}

#[test]
fn background_grandchild_does_not_hold_the_exec() {
    let mut h = Host::connect();
    let start = Instant::now();
    let out = h.sh("sleep 20 & echo started");
    let took = start.elapsed();
    assert_eq!(out.stdout, b"started\n");
    assert_eq!(out.exit, exited(0));
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let pgid = out.pid.unwrap();
    assert!(group_alive(pgid), "the background sleep should still run");
    // SAFETY: kills the test's own leftover process group.
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
    h.ping();
}

#[test]
fn dropped_connection_kills_the_command() {
    let mut h = Host::connect();
    h.request(Request::Exec(ExecRequest::new([
        "sh",
        "-c",
        "sleep 30 & echo ready; sleep 30",
    ])));
    let Response::Started { pid } = h.recv_response() else {
        panic!("no Started");
    };
    assert!(matches!(h.recv(), Some(AgentFrame::Stdout(d)) if d == b"ready\n"));
    drop(h);
    assert!(
        wait_group_gone(pid, Duration::from_secs(5)),
        "process group {pid} survived its connection"
    );
}

#[test]
fn requests_during_an_exec() {
    let mut h = Host::connect();
    h.request(Request::Exec(ExecRequest::new(["sleep", "0.3"])));
    h.request(Request::Ping);
    h.request(Request::Exec(ExecRequest::new(["true"])));
    let out = h.collect();
    assert_eq!(out.exit, exited(0));
    assert!(matches!(out.other[0], Response::Pong { .. }), "{out:?}");
    assert!(
        matches!(
            &out.other[1],
            Response::Error {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn concurrent_connections() {
    let start = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                let mut h = Host::connect();
                let out = h.sh(&format!("sleep 0.5; echo {i}"));
                assert_eq!(out.stdout, format!("{i}\n").as_bytes());
                assert_eq!(out.exit, exited(0));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn immediate_exit_is_not_lost() {
    // Many short commands: exits racing with registration must all arrive.
    let mut h = Host::connect();
    for _ in 0..50 {
        assert_eq!(h.exec(ExecRequest::new(["true"])).exit, exited(0));
    }
}

#[test]
fn shutdown() {
    let before = SHUTDOWNS.load(Ordering::SeqCst);
    let mut h = Host::connect();
    h.request(Request::Shutdown);
    assert_eq!(h.recv_response(), Response::ShuttingDown);
    assert!(h.recv().is_none(), "connection should close after shutdown");
    assert!(SHUTDOWNS.load(Ordering::SeqCst) > before);
}

#[test]
fn identity_is_validated_then_applied() {
    let mut h = Host::connect();
    let id = proto::Identity {
        entropy: vec![9; 32],
        hostname: "clone-7".into(),
        vm_id: "c7".into(),
        wall_clock_ns: 1_800_000_000_000_000_000,
        net: None,
    };
    h.request(Request::Identity(id.clone()));
    let timings = proto::IdentityTimings {
        hostname_us: 7,
        ..Default::default()
    };
    assert_eq!(h.recv_response(), Response::IdentitySet { timings });
    assert!(IDENTITIES.lock().unwrap().contains(&"clone-7".to_string()));
    // Too little entropy: refused, nothing applied, the connection goes on.
    h.request(Request::Identity(proto::Identity {
        entropy: vec![1; 4],
        hostname: "clone-8".into(),
        ..id
    }));
    assert!(matches!(
        h.recv_response(),
        Response::Error {
            code: ErrorCode::InvalidRequest,
            ..
        }
    ));
    assert!(!IDENTITIES.lock().unwrap().contains(&"clone-8".to_string()));
    h.ping();
}

#[test]
fn a_freeze_is_prepared_and_says_what_it_aborted() {
    let mut h = Host::connect();
    h.request(Request::PrepareFreeze);
    assert_eq!(
        h.recv_response(),
        Response::FreezeReady {
            connections_aborted: 3
        }
    );
    h.ping();
}

#[test]
fn net_test_starts_a_server_once() {
    use std::io::Read;
    let mut h = Host::connect();
    h.request(Request::NetTest { port: 0 });
    let port = match h.recv_response() {
        Response::NetTestListening { port } => port,
        other => panic!("{other:?}"),
    };
    assert_ne!(port, 0);
    // Serving: a sink connection gets its count.
    let mut s = crate::net_test::connect(port);
    s.write_all(b"s12345").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).unwrap();
    assert_eq!(u64::from_be_bytes(count), 5);
    // Asked again, on another connection and during an exec: the same one.
    let mut h2 = Host::connect();
    h2.request(Request::NetTest { port });
    assert_eq!(h2.recv_response(), Response::NetTestListening { port });
    h2.request(Request::Exec(ExecRequest::new(["sleep", "0.2"])));
    assert!(matches!(h2.recv_response(), Response::Started { .. }));
    h2.request(Request::NetTest { port });
    assert_eq!(h2.recv_response(), Response::NetTestListening { port });
    assert_eq!(h2.collect().exit, exited(0));
    // A port another program has: an error, and the connection goes on.
    let other = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
    let taken = other.local_addr().unwrap().port();
    h.request(Request::NetTest { port: taken });
    match h.recv_response() {
        Response::Error {
            code: ErrorCode::InvalidRequest,
            message,
        } => assert!(message.contains("in use"), "{message}"),
        other => panic!("{other:?}"),
    }
    h.ping();
}

#[test]
fn pool_reuses_threads() {
    static POOL: crate::conn::Pool<UnixStream> = crate::conn::Pool::new();
    for round in 0..5 {
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        POOL.dispatch(agent(), guest);
        let mut h = Host { s: host };
        assert!(matches!(h.recv_response(), Response::Hello { .. }));
        assert_eq!(
            h.sh(&format!("echo {round}")).stdout,
            format!("{round}\n").as_bytes()
        );
        drop(h);
        // Let the worker go idle before the next connection.
        let start = Instant::now();
        while POOL.lock_idle() == 0 && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(
        POOL.threads(),
        1,
        "connections should reuse the idle thread"
    );
    // Concurrent connections get threads of their own.
    let hosts: Vec<Host> = (0..3)
        .map(|_| {
            let (host, guest) = UnixStream::pair().unwrap();
            POOL.dispatch(agent(), guest);
            let mut h = Host { s: host };
            assert!(matches!(h.recv_response(), Response::Hello { .. }));
            h
        })
        .collect();
    assert_eq!(POOL.threads(), 3);
    for mut h in hosts {
        h.ping();
    }
}
