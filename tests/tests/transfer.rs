//! End-to-end test of masters travelling between daemons: two real
//! daemons (their own state directories, loopback TCP with tokens), one
//! real master booted on A, fetched by B through a test proxy that can cut
//! or corrupt the memory stream and counts the bytes on the wire, then
//! cloned on B. One master boot for the whole file (tens of seconds on
//! hosts whose KVM emulates guest kernel code).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::client::{Answer, Client};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zygote_tests::{call, image, kill_processes_mentioning, zygote_at, Daemon, Sandbox};

const TOKEN_A: &str = "acme-0123456789abcdef";
const TOKEN_B: &str = "beta-0123456789abcdef";
const TOKENS: &str = "acme-0123456789abcdef acme\nbeta-0123456789abcdef beta\n";
const MASTER: &str = "warm";
const MEMORY_MIB: u64 = 256;
const WARMUP: &str = "echo warm-state > /tmp/x";
const DAEMON_ARGS: &[&str] = &["--on-shutdown", "stop", "--max-starting", "2"];
const MIB: f64 = (1u64 << 20) as f64;

/// Kills what a failed test leaves and removes the daemons' side files.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            if std::thread::panicking() {
                kill_processes_mentioning(dir);
                for l in std::fs::read_dir(Daemon::etc_dir(dir))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if l.file_name().to_string_lossy().ends_with(".log") {
                        let text = std::fs::read_to_string(l.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(20).collect();
                        eprintln!("--- {} (last lines)", l.path().display());
                        for line in tail.iter().rev() {
                            eprintln!("{line}");
                        }
                    }
                }
            }
            let _ = std::fs::remove_dir_all(Daemon::etc_dir(dir));
        }
    }
}

fn expect(a: &Answer, status: u16, code: &str, what: &str) -> Value {
    assert_eq!(a.status.as_u16(), status, "{what}: {}", a.text());
    let v = a.json();
    if !code.is_empty() {
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
    }
    v
}

// ------------------------------------------------------------- proxy

/// What the proxy does to the next answer that gets this far.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Close the connection after this many bytes of the answer.
    Cut(u64),
    /// Flip the bits of the answer's byte at this position.
    Flip(u64),
}

#[derive(Default)]
struct ProxyState {
    fault: Option<Fault>,
    /// Bytes from the source to the receiver (all connections).
    down: u64,
    fired: bool,
}

/// A TCP proxy in front of daemon A: every connection to it goes to A.
struct Proxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let requests = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut dr, &mut uw).await;
                        let _ = uw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    let mut pos = 0u64;
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut n = n;
                        let mut cut = false;
                        {
                            let mut s = st.lock().unwrap();
                            match s.fault {
                                Some(Fault::Cut(at)) if !s.fired && pos + n as u64 >= at => {
                                    n = (at - pos) as usize;
                                    cut = true;
                                    s.fired = true;
                                }
                                Some(Fault::Flip(at)) if !s.fired && pos + n as u64 > at => {
                                    buf[(at - pos) as usize] ^= 0x55;
                                    s.fired = true;
                                }
                                _ => {}
                            }
                            s.down += n as u64;
                        }
                        if dw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        pos += n as u64;
                        if cut {
                            break;
                        }
                    }
                    requests.abort();
                });
            }
        });
        Proxy { port, state }
    }

    fn arm(&self, fault: Option<Fault>) {
        let mut s = self.state.lock().unwrap();
        *s = ProxyState {
            fault,
            ..Default::default()
        };
    }

    fn down(&self) -> u64 {
        self.state.lock().unwrap().down
    }

    fn fired(&self) -> bool {
        self.state.lock().unwrap().fired
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

// -------------------------------------------------------------- test

#[test]
fn masters_travel_between_daemons() {
    let _ = image();
    let sa = Sandbox::new("xfer-a");
    let sb = Sandbox::new("xfer-b");
    let _cleanup = Cleanup(vec![sa.dir.clone(), sb.dir.clone()]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(travel(&sa, &sb));
}

async fn travel(sa: &Sandbox, sb: &Sandbox) {
    let mut da = Daemon::start(&sa.dir, TOKENS, DAEMON_ARGS);
    let a = da.tcp(Some(TOKEN_A));
    let master = make_master(&a).await;
    let cold_s = (master["boot_ms"].as_f64().unwrap_or(0.0)
        + master["warmup_ms"].as_f64().unwrap_or(0.0))
        / 1000.0;

    // B sends tenant acme's token to its peers.
    let etc_b = Daemon::etc_dir(&sb.dir);
    std::fs::create_dir_all(&etc_b).unwrap();
    let peer_token = etc_b.join("peer-token");
    std::fs::write(&peer_token, format!("{TOKEN_A}\n")).unwrap();
    let peer_arg = peer_token.display().to_string();
    let mut args = DAEMON_ARGS.to_vec();
    args.extend(["--peer-token-file", &peer_arg]);
    let mut db = Daemon::start(&sb.dir, TOKENS, &args);
    let b = db.admin();

    // --- The source side: the offer and the stream, by tenant.
    let offer = expect(
        &call(&a, "GET", "/v1/masters/warm/snapshot/offer", None).await,
        200,
        "",
        "offer",
    );
    let memory = offer["memory_size"].as_u64().unwrap();
    let payload = offer["payload_bytes"].as_u64().unwrap();
    let stream_bytes = 24 + offer["records"].as_u64().unwrap() * 16 + payload + 16;
    assert_eq!(memory, MEMORY_MIB << 20, "{}", offer["memory_size"]);
    assert_eq!(offer["manifest"]["format"], "zygote-snapshot");
    assert_eq!(
        offer["manifest"]["memory"]["crc32"], offer["memory_crc32"],
        "the manifest carries the memory CRC"
    );
    assert!(
        payload < memory / 2,
        "only data travels: {payload} of {memory} bytes"
    );
    let other = da.tcp(Some(TOKEN_B));
    expect(
        &call(&other, "GET", "/v1/masters/warm/snapshot/offer", None).await,
        404,
        "not_found",
        "another tenant's master",
    );
    expect(
        &call(&other, "GET", "/v1/masters/warm/snapshot/memory", None).await,
        404,
        "not_found",
        "another tenant's memory",
    );
    expect(
        &call(&a, "GET", "/v1/masters/warm/snapshot/memory?offset=5", None).await,
        400,
        "bad_request",
        "an offset not on a page",
    );

    let proxy = Proxy::start(da.port).await;
    let from = proxy.url();

    // --- Refusals: unknown master at the source, a tenant asking, a bad peer.
    let r = call(
        &b,
        "POST",
        "/v1/masters:fetch",
        Some(json!({"name": MASTER, "from": from, "source_name": "nope"})),
    )
    .await;
    let v = expect(&r, 404, "not_found", "unknown master at the source");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nope"),
        "{v}"
    );
    let r = call(
        &db.tcp(Some(TOKEN_A)),
        "POST",
        "/v1/masters:fetch",
        Some(json!({"name": MASTER, "from": from})),
    )
    .await;
    expect(&r, 403, "admin_only", "a tenant asks for a fetch");
    let r = call(
        &b,
        "POST",
        "/v1/masters:fetch",
        Some(json!({"name": MASTER, "from": "unix:/x"})),
    )
    .await;
    expect(&r, 400, "bad_request", "a Unix socket as the peer");

    // --- A corrupted record: refused, nothing registered, nothing kept.
    proxy.arm(Some(Fault::Flip(stream_bytes / 3)));
    let r = call(
        &b,
        "POST",
        "/v1/masters:fetch",
        Some(json!({"name": MASTER, "from": from})),
    )
    .await;
    assert!(proxy.fired(), "the proxy flipped a byte");
    let v = expect(&r, 422, "transfer_corrupt", "a flipped byte");
    eprintln!("corrupted stream: {}", v["error"]["message"]);
    expect(
        &call(&b, "GET", "/v1/masters/warm", None).await,
        404,
        "not_found",
        "no master after a corrupt transfer",
    );
    let transfers: Vec<_> = std::fs::read_dir(sb.dir.join("transfers"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(transfers.is_empty(), "left: {transfers:?}");

    // --- A cut stream: resumed where it stopped, not sent again.
    proxy.arm(Some(Fault::Cut(stream_bytes / 2)));
    let t0 = Instant::now();
    let r = call(
        &b,
        "POST",
        "/v1/masters:fetch",
        Some(json!({"name": MASTER, "from": from})),
    )
    .await;
    let f = expect(&r, 201, "", "fetch with a cut");
    assert!(proxy.fired(), "the proxy cut the stream");
    let t = &f["transfer"];
    eprintln!("cut and resumed: {t} (proxy saw {} bytes)", proxy.down());
    assert_eq!(
        (t["attempts"].as_u64(), t["resumed"].as_u64()),
        (Some(2), Some(1)),
        "{t}"
    );
    let wire = t["wire_bytes"].as_u64().unwrap();
    let resent = wire.saturating_sub(stream_bytes);
    assert!(
        wire >= stream_bytes && resent < stream_bytes / 4,
        "{wire} bytes on the wire for a {stream_bytes}-byte stream"
    );
    // The proxy's count adds HTTP heads and the offers; it is close.
    assert!(
        proxy.down() < wire + (64 << 10) && proxy.down() >= wire,
        "{}",
        proxy.down()
    );
    assert_eq!(f["master"]["name"], MASTER);
    assert_eq!(f["master"]["status"], "frozen");
    assert_eq!(f["master"]["memory_mib"], MEMORY_MIB);
    eprintln!("fetch with a cut took {:.2} s", t0.elapsed().as_secs_f64());

    // --- The same name again: 409, through the CLI too.
    let r = call(
        &b,
        "POST",
        "/v1/masters:fetch",
        Some(json!({"name": MASTER, "from": from})),
    )
    .await;
    expect(&r, 409, "conflict", "a name that exists");
    let sock = format!("unix:{}", db.socket.display());
    let out = cli(
        &sb.dir,
        &["--host", &sock, "master", "fetch", MASTER, "--from", &from],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists already"), "{err}");

    // --- A clean fetch through the CLI, measured: the numbers for the scheduler.
    proxy.arm(None);
    let out = cli(
        &sb.dir,
        &[
            "--host",
            &sock,
            "master",
            "fetch",
            "warm2",
            "--from",
            &from,
            "--source-name",
            MASTER,
        ],
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "warm2");
    let wire = proxy.down();
    eprintln!("{}", err.trim());
    eprintln!(
        "TRANSFER {MEMORY_MIB} MiB master: payload {:.1} MiB, stream {:.1} MiB, on the wire {:.1} MiB (HTTP included); the cold boot + warm-up it replaces took {cold_s:.1} s",
        payload as f64 / MIB,
        stream_bytes as f64 / MIB,
        wire as f64 / MIB,
    );
    assert!(wire < memory / 2, "{wire} bytes on the wire");
    expect(
        &call(&b, "DELETE", "/v1/masters/warm2", None).await,
        204,
        "",
        "rm warm2",
    );

    // --- B clones the fetched master; the clone has the master's warm-up state.
    let r = call(&b, "POST", "/v1/instances", Some(json!({"master": MASTER}))).await;
    let c = expect(&r, 201, "", "clone on B");
    let id = c["results"][0]["instance"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{c}"))
        .to_string();
    let r = call(
        &b,
        "POST",
        &format!("/v1/instances/{id}/exec"),
        Some(json!({"argv": ["cat", "/tmp/x"]})),
    )
    .await;
    let e = expect(&r, 200, "", "exec in the clone on B");
    assert_eq!(e["stdout"], "warm-state\n", "{e}");
    expect(
        &call(&b, "DELETE", &format!("/v1/instances/{id}"), None).await,
        204,
        "",
        "rm clone",
    );
    // Removing the fetched master removes its received snapshot.
    expect(
        &call(&b, "DELETE", "/v1/masters/warm", None).await,
        204,
        "",
        "rm master",
    );
    let left: Vec<_> = std::fs::read_dir(sb.dir.join("masters"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in B: {left:?}");

    assert!(db.stop().success(), "{}", db.log_text());
    assert!(da.stop().success(), "{}", da.log_text());
}

async fn make_master(a: &Client) -> Value {
    let r = call(
        a,
        "POST",
        "/v1/masters",
        Some(
            json!({"name": MASTER, "memory_mib": MEMORY_MIB, "warmup": WARMUP,
                    "warmup_timeout_s": 240}),
        ),
    )
    .await;
    expect(&r, 202, "", "POST /v1/masters");
    zygote_tests::wait_frozen(a, MASTER, Duration::from_secs(300)).await
}

/// The CLI on `dir`, off the async threads.
async fn cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        zygote_at(&dir, &args, b"")
    })
    .await
    .expect("zygote CLI")
}
