//! QEMU's own snapshot restore, the peer of a zygote clone: boot the same
//! kernel, initramfs and command line under `qemu-system-x86_64 -M microvm`
//! (as [`crate::bench::qemu_boot_once`] does), save the agent-ready VM with
//! QMP `migrate` to a file, then start fresh QEMU processes with `-incoming`
//! from that file and time each one until the VM runs again.
//!
//! What was found with QEMU 7.2 (Debian 12) on `kvm_pvm`:
//!
//! - The `microvm` machine migrates as is: with `acpi=off`, `-nodefaults`,
//!   the isa-serial console, the virtio-mmio transports and one
//!   `virtio-rng-device`, save and load both succeed with the very same
//!   command line on both sides. No machine option had to change.
//! - QEMU 7.2 has no `file:` migration URI (it came with 8.2), so the state
//!   goes through `exec:cat`. QEMU 8.2 and later get `file:`.
//! - `migrate` is throttled to QEMU's default `max-bandwidth` (128 MiB/s
//!   in 7.2), which a save to a local file has no reason to be: it is raised
//!   to 1 TiB/s before the save, so `save_ms` is the real cost (an 18 MB
//!   state: ~30 ms instead of ~140 ms).
//! - `migrate` of a running VM is a live (pre-copy) migration that stops the
//!   VM for its last pass; for the idle, agent-ready guest that is two or
//!   three short passes.
//! - The restored guest is alive: its `jiffies_64` (read over HMP) catches
//!   up with host time when it next wakes. With the image's `NO_HZ_IDLE`
//!   kernel an idle guest, restored or not, burns almost no host CPU, so a
//!   quiet QEMU process is not a sign of a hung restore.
//! - Without `-S` a loaded VM runs at once; QMP sees `RESUME`. When the load
//!   finishes before our QMP session is set up, the event is not ours to see
//!   and `query-status` saying `running` marks the time instead (an upper
//!   bound, a few ms late at most).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use host::vmm::VmSpec;

/// How long one QMP step (connect, save, load) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// `max-bandwidth` for the save, bytes/s: no throttle for a local file.
const SAVE_BANDWIDTH: u64 = 1 << 40;

/// Errors of the QEMU save/restore peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// QEMU could not be installed.
    #[error("the QEMU peer: {0}")]
    Setup(#[source] crate::bench::BenchError),
    /// `qemu-system-x86_64` is not installed.
    #[error("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {0}")]
    QemuMissing(#[source] std::io::Error),
    /// QEMU answered a QMP command with an error, or said something we do not
    /// understand.
    #[error("QMP `{command}`: {message}")]
    Qmp {
        /// The command (or `greeting`).
        command: String,
        /// QEMU's message.
        message: String,
    },
    /// A phase did not finish in time.
    #[error("QEMU {phase}: nothing within {after:?}{}", stderr_suffix(.stderr))]
    Timeout {
        /// The phase that timed out.
        phase: &'static str,
        /// How long we waited.
        after: Duration,
        /// QEMU's stderr so far.
        stderr: String,
    },
    /// QEMU ended during a phase.
    #[error("QEMU ended during {phase}{}", stderr_suffix(.stderr))]
    Exited {
        /// The phase.
        phase: &'static str,
        /// QEMU's stderr.
        stderr: String,
    },
    /// A host I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PeerError {
    let what = what.into();
    move |source| PeerError::Io { what, source }
}

/// One QEMU save/restore measurement.
#[derive(Debug, Clone, Serialize)]
pub struct QemuRestoreSample {
    /// `migrate` of the booted, agent-ready VM to a file: ms from the command
    /// to "completed".
    pub save_ms: f64,
    /// Size of the migration file in bytes.
    pub state_bytes: u64,
    /// New qemu process spawned with `-incoming` -> the VM is running again
    /// (QMP `query-status` says running / the RESUME event), in ms from spawn.
    pub restore_running_ms: f64,
}

/// Boots `spec`'s image under QEMU microvm once (timeout `boot_timeout` to
/// agent-ready on serial), saves it to a migration file in a temp dir with
/// QMP `migrate` (`exec:cat > FILE`, or `file:FILE` on QEMU 8.2+), quits it,
/// then restores it `count` times: each a fresh QEMU process with the same
/// command line plus `-incoming`, without `-S` so it runs as soon as it is
/// loaded, timed from spawn to running and then killed. Returns one sample
/// per restore (`save_ms` and `state_bytes` repeated). Every process and temp
/// file is gone when this returns, on every path.
pub fn qemu_restore(
    spec: &VmSpec,
    boot_timeout: Duration,
    count: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<QemuRestoreSample>, PeerError> {
    // Declared first so it is dropped last, after every QEMU using it.
    let dir = TempDir::new()?;
    let state = dir.path().join("state");

    progress("qemu: cold boot to agent ready");
    let qmp_path = dir.path().join("boot.qmp");
    let start = Instant::now();
    let mut qemu = Qemu::spawn(spec, &qmp_path, &dir.path().join("boot.stderr"), None, true)?;
    let stdout = qemu.child.stdout.take().expect("stdout is piped");
    let ready = wait_marker(stdout, spec.console);
    let ready_at = match ready.recv_timeout(boot_timeout) {
        Ok(at) => at,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(qemu.timeout("boot to agent ready", boot_timeout))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => return Err(qemu.exited("boot to agent ready")),
    };
    progress(&format!(
        "qemu: agent ready in {:.0} ms",
        ms(ready_at - start)
    ));

    let mut qmp = Qmp::connect(&qmp_path, &mut qemu, "boot")?;
    let file_uri = qmp.version >= (8, 2);
    qmp.execute(
        &mut qemu,
        "migrate-set-parameters",
        json!({ "max-bandwidth": SAVE_BANDWIDTH }),
    )?;
    qmp.execute(
        &mut qemu,
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "events", "state": true }] }),
    )?;
    let (save_uri, load_uri) = if file_uri {
        let f = state.display().to_string();
        (format!("file:{f}"), format!("file:{f}"))
    } else {
        let f = shell_quote(&state.display().to_string());
        (format!("exec:cat > {f}"), format!("exec:cat {f}"))
    };
    qmp.events.clear();
    let t = Instant::now();
    qmp.execute(&mut qemu, "migrate", json!({ "uri": save_uri }))?;
    let (done, ev) = qmp.wait_event(&mut qemu, "save", |name, data| {
        name == "MIGRATION"
            && matches!(
                data["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
    })?;
    if ev["status"] != "completed" {
        let info = qmp.execute(&mut qemu, "query-migrate", json!({}))?;
        return Err(PeerError::Qmp {
            command: "migrate".into(),
            message: info["error-desc"]
                .as_str()
                .unwrap_or("migration failed")
                .to_string(),
        });
    }
    let save_ms = ms(done - t);
    let state_bytes = std::fs::metadata(&state)
        .map_err(io_err(format!("migration file {}", state.display())))?
        .len();
    progress(&format!(
        "qemu: saved {state_bytes} bytes in {save_ms:.1} ms ({save_uri_kind})",
        save_uri_kind = if file_uri { "file:" } else { "exec:cat" }
    ));
    let _ = qmp.execute(&mut qemu, "quit", json!({}));
    drop(qmp);
    qemu.wait_exit(Duration::from_secs(10));
    drop(qemu);

    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let qmp_path = dir.path().join(format!("restore-{i}.qmp"));
        let stderr = dir.path().join(format!("restore-{i}.stderr"));
        let start = Instant::now();
        let mut qemu = Qemu::spawn(spec, &qmp_path, &stderr, Some(&load_uri), false)?;
        let mut qmp = Qmp::connect(&qmp_path, &mut qemu, "restore")?;
        let status = qmp.execute(&mut qemu, "query-status", json!({}))?;
        let running_at = match (status["status"].as_str(), qmp.seen("RESUME")) {
            (_, Some(at)) => at,
            (Some("running"), None) => Instant::now(),
            (Some("inmigrate"), None) => {
                qmp.wait_event(&mut qemu, "restore", |name, _| name == "RESUME")?
                    .0
            }
            (other, None) => {
                return Err(PeerError::Qmp {
                    command: "query-status".into(),
                    message: format!("VM is {} after load, not running", other.unwrap_or("?")),
                })
            }
        };
        let restore_running_ms = ms(running_at - start);
        progress(&format!(
            "qemu: restore {}/{count}: running in {restore_running_ms:.1} ms",
            i + 1
        ));
        samples.push(QemuRestoreSample {
            save_ms,
            state_bytes,
            restore_running_ms,
        });
        // Killed when dropped, before the next one starts.
    }
    Ok(samples)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `s` in single quotes for `/bin/sh` (QEMU runs `exec:` URIs with it).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Reads the serial console until EOF; sends the time the agent's ready
/// line appears. Keeps draining afterwards so QEMU never blocks on the pipe.
fn wait_marker(stdout: std::process::ChildStdout, echo: bool) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r');
            if echo {
                eprintln!("{line}");
            }
            if line.starts_with(proto::READY_MARKER) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Instant::now());
                }
            }
        }
    });
    rx
}

/// A private temp directory, removed with everything in it when dropped.
struct TempDir(PathBuf);

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    fn new() -> Result<Self, PeerError> {
        let path = std::env::temp_dir().join(format!(
            "zygote-qemu-peer-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(format!("cannot create {}", path.display())))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A QEMU child process, killed and reaped when dropped.
struct Qemu {
    child: Child,
    stderr: PathBuf,
}

impl Qemu {
    /// Starts QEMU with the boot peer's command line plus a QMP socket and,
    /// for a restore, `-incoming`. The serial console goes to a pipe when
    /// `console_pipe`, else nowhere; stderr goes to `stderr`.
    fn spawn(
        spec: &VmSpec,
        qmp: &Path,
        stderr: &Path,
        incoming: Option<&str>,
        console_pipe: bool,
    ) -> Result<Self, PeerError> {
        // QEMU option values escape a comma by doubling it.
        let qmp_arg = format!(
            "unix:{},server=on,wait=off",
            qmp.display().to_string().replace(',', ",,")
        );
        let err_file =
            File::create(stderr).map_err(io_err(format!("cannot create {}", stderr.display())))?;
        let mut cmd = crate::bench::qemu_microvm(spec);
        cmd.args(["-qmp", &qmp_arg]);
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(if console_pipe {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(err_file)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => PeerError::QemuMissing(e),
                _ => PeerError::Io {
                    what: "cannot start qemu-system-x86_64".into(),
                    source: e,
                },
            })?;
        Ok(Qemu {
            child,
            stderr: stderr.to_path_buf(),
        })
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The error for QEMU having ended during `phase` (kills it if it has not).
    fn exited(&mut self, phase: &'static str) -> PeerError {
        self.wait_exit(Duration::from_secs(2));
        PeerError::Exited {
            phase,
            stderr: self.stderr_text(),
        }
    }

    fn timeout(&mut self, phase: &'static str, after: Duration) -> PeerError {
        let _ = self.child.kill();
        let _ = self.child.wait();
        PeerError::Timeout {
            phase,
            after,
            stderr: self.stderr_text(),
        }
    }

    /// Waits up to `timeout` for QEMU to end on its own, then kills it.
    fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.has_exited() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal synchronous QMP client: one JSON object per line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// QEMU's (major, minor) from the greeting.
    version: (u64, u64),
    /// Events read so far: name, when read, `data`.
    events: Vec<(String, Instant, Value)>,
    /// Phase name for errors.
    phase: &'static str,
    deadline: Instant,
}

impl Qmp {
    /// Connects to `path` (retrying until QEMU has made it), reads the
    /// greeting and leaves capabilities negotiation, all within
    /// [`STEP_TIMEOUT`].
    fn connect(path: &Path, qemu: &mut Qemu, phase: &'static str) -> Result<Self, PeerError> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if qemu.has_exited() => return Err(qemu.exited(phase)),
                Err(_) if Instant::now() >= deadline => {
                    return Err(qemu.timeout(phase, STEP_TIMEOUT))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let writer = stream
            .try_clone()
            .map_err(io_err("cannot clone the QMP socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            version: (0, 0),
            events: Vec::new(),
            phase,
            deadline,
        };
        let greeting = qmp.read(qemu)?;
        let v = &greeting["QMP"]["version"]["qemu"];
        match (v["major"].as_u64(), v["minor"].as_u64()) {
            (Some(major), Some(minor)) => qmp.version = (major, minor),
            _ => {
                return Err(PeerError::Qmp {
                    command: "greeting".into(),
                    message: format!("not a QMP greeting: {greeting}"),
                })
            }
        }
        qmp.execute(qemu, "qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Reads one message, within the current deadline.
    fn read(&mut self, qemu: &mut Qemu) -> Result<Value, PeerError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(qemu.timeout(self.phase, STEP_TIMEOUT));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(io_err("QMP socket timeout"))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(qemu.exited(self.phase)),
            Ok(_) => serde_json::from_str(&line).map_err(|e| PeerError::Qmp {
                command: "(reply)".into(),
                message: format!("bad JSON from QEMU ({e}): {}", line.trim()),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(qemu.timeout(self.phase, STEP_TIMEOUT))
            }
            Err(_) if qemu.has_exited() => Err(qemu.exited(self.phase)),
            Err(e) => Err(io_err("reading QMP")(e)),
        }
    }

    /// Reads one message; an event is recorded and `None` returned.
    fn read_reply(&mut self, qemu: &mut Qemu) -> Result<Option<Value>, PeerError> {
        let msg = self.read(qemu)?;
        if let Some(name) = msg["event"].as_str() {
            self.events
                .push((name.to_string(), Instant::now(), msg["data"].clone()));
            return Ok(None);
        }
        Ok(Some(msg))
    }

    /// Runs `command`; returns its `return` value, skipping events.
    fn execute(
        &mut self,
        qemu: &mut Qemu,
        command: &str,
        arguments: Value,
    ) -> Result<Value, PeerError> {
        self.deadline = Instant::now() + STEP_TIMEOUT;
        let mut msg = serde_json::to_string(&json!({
            "execute": command,
            "arguments": arguments,
        }))
        .expect("JSON");
        msg.push('\n');
        if let Err(e) = self.writer.write_all(msg.as_bytes()) {
            if qemu.has_exited() {
                return Err(qemu.exited(self.phase));
            }
            return Err(io_err(format!("sending QMP {command}"))(e));
        }
        loop {
            let Some(mut reply) = self.read_reply(qemu)? else {
                continue;
            };
            if let Some(err) = reply.get("error") {
                return Err(PeerError::Qmp {
                    command: command.into(),
                    message: err["desc"].as_str().unwrap_or("unknown error").to_string(),
                });
            }
            if let Some(ret) = reply.get_mut("return") {
                return Ok(ret.take());
            }
            return Err(PeerError::Qmp {
                command: command.into(),
                message: format!("unexpected reply: {reply}"),
            });
        }
    }

    /// When the first event named `name` was read, if it was.
    fn seen(&self, name: &str) -> Option<Instant> {
        self.events
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, at, _)| *at)
    }

    /// Waits (within [`STEP_TIMEOUT`]) for an event `matches` accepts,
    /// looking at the ones already read first. Returns when it was read and
    /// its `data`.
    fn wait_event(
        &mut self,
        qemu: &mut Qemu,
        phase: &'static str,
        matches: impl Fn(&str, &Value) -> bool,
    ) -> Result<(Instant, Value), PeerError> {
        self.phase = phase;
        self.deadline = Instant::now() + STEP_TIMEOUT;
        let mut checked = 0;
        loop {
            while checked < self.events.len() {
                let (name, at, data) = &self.events[checked];
                if matches(name, data) {
                    return Ok((*at, data.clone()));
                }
                checked += 1;
            }
            if let Some(reply) = self.read_reply(qemu)? {
                return Err(PeerError::Qmp {
                    command: "(event wait)".into(),
                    message: format!("unexpected reply: {reply}"),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("dir/a b"), "'dir/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    /// One cold boot (~35 s on `kvm_pvm`), one save, two restores.
    #[test]
    #[ignore = "boots a guest under QEMU: ~40 s"]
    fn qemu_save_and_restore_twice() {
        // `run::spec` resolves the image with `GuestImage::resolve(None, None)`
        // and fills in whatever else `VmSpec` holds.
        let spec = VmSpec::new(None, None, 128, 1).expect("guest image");
        let samples = qemu_restore(&spec, Duration::from_secs(180), 2, &mut |m| {
            eprintln!("{m}")
        })
        .expect("qemu save/restore");
        assert_eq!(samples.len(), 2);
        for s in &samples {
            eprintln!("{s:?}");
            assert!(s.restore_running_ms > 0.0);
            assert!(s.state_bytes > 0);
        }
    }
}
