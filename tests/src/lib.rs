//! Shared helpers for zygote's end-to-end tests: they boot real guest
//! kernels on real KVM and talk to the real in-guest agent. Nothing here is
//! mocked; a host without /dev/kvm or without the guest image fails loudly.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use api::client::{Client, Endpoint};
use host::paths::GuestImage;

/// Panics (does not skip) when the host has no KVM.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: zygote's end-to-end tests need KVM (they never skip)"
    );
}

/// The guest image `scripts/setup` built; panics with the fix when missing.
pub fn image() -> GuestImage {
    require_kvm();
    GuestImage::resolve(None, None).unwrap_or_else(|e| panic!("{e}: run ./scripts/setup first"))
}

/// The release string of the guest kernel in use (written by images/build-kernel).
pub fn kernel_release(image: &GuestImage) -> String {
    let real = std::fs::canonicalize(&image.kernel).expect("kernel path");
    let release = real.parent().expect("kernel dir").join("release");
    std::fs::read_to_string(&release)
        .unwrap_or_else(|e| panic!("{}: {e}", release.display()))
        .trim()
        .to_string()
}

/// A workspace binary (`zygote`, `zygote-vmm`) next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not built (cargo build --workspace)",
        p.display()
    );
    p
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private runtime directory for one test, so that leftovers can be
/// checked without racing other tests.
pub struct Sandbox {
    /// The directory (given to zygote as `ZYGOTE_RUNTIME_DIR`).
    pub dir: PathBuf,
}

impl Sandbox {
    /// A fresh, not yet existing directory path.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "zygote-test-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Sandbox { dir }
    }

    /// Runs the `zygote` CLI with this sandbox and `stdin` as its input.
    pub fn zygote(&self, args: &[&str], stdin: &[u8]) -> Output {
        zygote_at(&self.dir, args, stdin)
    }
}

/// Runs the `zygote` CLI on state directory `dir` with `stdin` as its input.
pub fn zygote_at(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(bin("zygote"))
        .args(args)
        .env("ZYGOTE_RUNTIME_DIR", dir)
        .env("ZYGOTE_VMM", bin("zygote-vmm"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zygote");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait zygote");
    writer.join().expect("stdin writer");
    out
}

/// Asserts that a `zygote` command succeeded (showing its output when it
/// did not) and returns its stdout.
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Sandbox {
    /// Asserts that nothing of this sandbox is left: no directory entries,
    /// no process that was given a path in it (a VMM).
    pub fn assert_clean(&self) {
        if self.dir.exists() {
            let left: Vec<_> = std::fs::read_dir(&self.dir)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "left behind in {}: {left:?}",
                self.dir.display()
            );
        }
        let needle = self.dir.to_string_lossy().to_string();
        let procs = processes_mentioning(&needle);
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // A failed test leaves no VM running (nor its address leased).
        if std::thread::panicking() {
            kill_processes_mentioning(&self.dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pids (and command lines) of processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) && pid != std::process::id() {
                found.push((pid, cmd));
            }
        }
    }
    found
}

/// Whether this host's KVM emulates guest kernel code (kvm_pvm): there a
/// second vCPU's bring-up hangs, so images boot with `maxcpus=1`.
pub fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A `zygote daemon` of one test, started as a child process: its state
/// directory (given), a Unix socket in it (the admin's), a loopback TCP
/// port with a tokens file (the tenants'), and its log. Dropping it stops
/// it (SIGTERM, then SIGKILL after 20 s).
pub struct Daemon {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The Unix socket.
    pub socket: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The tokens file (`TOKEN TENANT [limits]` lines).
    pub tokens: PathBuf,
    /// What the daemon wrote on stderr.
    pub log: PathBuf,
    child: Option<Child>,
}

/// Whether `GET /healthz` on `conn` answers 200 (a blocking call, usable
/// inside and outside an async runtime).
pub fn healthz_answers(mut conn: impl std::io::Read + std::io::Write) -> bool {
    let mut resp = String::new();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .and_then(|_| conn.read_to_string(&mut resp))
        .is_ok()
        && resp.starts_with("HTTP/1.1 200")
}

/// A free TCP port on 127.0.0.1 (free when asked).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Daemon {
    /// Starts `zygote daemon` on `state_dir` with `tokens` as its tokens
    /// file and `args` added (e.g. `--max-starting 4`); waits until
    /// `/healthz` answers on both listeners. The tokens file and the log
    /// live next to the state directory (`STATE_DIR.etc/`), not in it.
    pub fn start(state_dir: &Path, tokens: &str, args: &[&str]) -> Self {
        let etc = Self::etc_dir(state_dir);
        std::fs::create_dir_all(&etc).expect("daemon etc dir");
        let tokens_path = etc.join("tokens");
        std::fs::write(&tokens_path, tokens).expect("tokens file");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let log = etc.join(format!("daemon-{n}.log"));
        let socket = state_dir.join("zygote.sock");
        let port = free_port();
        let child = Command::new(bin("zygote"))
            .arg("daemon")
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tokens")
            .arg(&tokens_path)
            .args(args)
            .env("ZYGOTE_VMM", bin("zygote-vmm"))
            .arg("--log-format")
            .arg("json")
            .env("ZYGOTE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("spawn zygote daemon");
        let mut d = Daemon {
            state_dir: state_dir.to_path_buf(),
            socket,
            port,
            tokens: tokens_path,
            log,
            child: Some(child),
        };
        d.wait_serving(Duration::from_secs(20));
        d
    }

    /// Where a daemon of `state_dir` keeps its tokens file and logs.
    pub fn etc_dir(state_dir: &Path) -> PathBuf {
        let mut s = state_dir.as_os_str().to_owned();
        s.push(".etc");
        PathBuf::from(s)
    }

    fn wait_serving(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "zygote daemon exited ({status}) at start:\n{}",
                    self.log_text()
                );
            }
            let unix =
                std::os::unix::net::UnixStream::connect(&self.socket).is_ok_and(healthz_answers);
            let tcp =
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok_and(healthz_answers);
            if unix && tcp {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "zygote daemon did not serve /healthz within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("daemon runs")
    }

    /// A client on the Unix socket: the host's admin.
    pub fn admin(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone()), None)
    }

    /// A client on TCP with `token` (none: no Authorization header).
    pub fn tcp(&self, token: Option<&str>) -> Client {
        Client::new(
            Endpoint::Tcp(format!("127.0.0.1:{}", self.port)),
            token.map(str::to_string),
        )
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) of our own child, which has not been reaped
        // (it is reaped only in `stop`/`kill9`, which take the handle).
        let r = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(r, 0, "kill({}, {signal})", self.pid());
    }

    /// Replaces the tokens file and has the daemon reload it (SIGHUP);
    /// returns once its log says it did.
    pub fn reload_tokens(&self, tokens: &str) {
        let before = self.log_text().matches("tokens reloaded").count();
        std::fs::write(&self.tokens, tokens).expect("tokens file");
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log_text().matches("tokens reloaded").count() <= before {
            assert!(
                Instant::now() < deadline,
                "tokens not reloaded:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("the daemon was stopped already");
        };
        // SAFETY: kill(2) of our unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait daemon") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL (a crash), and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon runs");
        child.kill().expect("SIGKILL the daemon");
        child.wait().expect("reap the daemon");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Kills (SIGKILL, by pid) the processes whose command line names `dir`:
/// the VMMs of a test that failed half way. Returns how many.
pub fn kill_processes_mentioning(dir: &Path) -> usize {
    let procs = processes_mentioning(&dir.to_string_lossy());
    for (pid, _) in &procs {
        // SAFETY: kill(2) of a process this test started (its command line
        // names the test's private directory).
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    procs.len()
}

/// Polls `GET /v1/masters/{name}` through `c` until the master is frozen
/// (its JSON), panicking if it fails or takes longer than `timeout`.
pub async fn wait_frozen(c: &Client, name: &str, timeout: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    let path = format!("/v1/masters/{name}");
    loop {
        let a = c
            .get(&path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(a.status.as_u16(), 200, "GET {path}: {}", a.text());
        let v = a.json();
        match v["status"].as_str() {
            Some("frozen") => {
                eprintln!(
                    "master {name} frozen in {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                return v;
            }
            Some("booting" | "warming") => {}
            _ => panic!("master {name} did not freeze: {v:#}"),
        }
        assert!(
            t0.elapsed() < timeout,
            "master {name} not frozen after {timeout:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `method path` (with `body` for a POST) through `c`; the answer, or a
/// panic naming the call.
pub async fn call(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> api::client::Answer {
    let r = match (method, body) {
        ("GET", _) => c.get(path).await,
        ("DELETE", _) => c.delete(path).await,
        (_, b) => c.post(path, &b.unwrap_or(serde_json::json!({}))).await,
    };
    r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}
