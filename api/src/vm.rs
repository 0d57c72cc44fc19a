//! A microVM as seen from the host tools: a `zygote-vmm` child process, its
//! private runtime directory (vsock socket, console log), and the events it
//! reports. Dropping a [`VmProcess`] kills the VMM and removes the directory:
//! nothing is left behind.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmm::events::{now_us, Event, ExitReason};

use crate::paths::{self, GuestImage};

/// Errors starting or talking to a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file is missing.
    #[error(transparent)]
    Paths(#[from] paths::PathError),
    /// The runtime directory could not be made.
    #[error("cannot create runtime directory {path}: {source}")]
    RuntimeDir {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// VMM binary.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM ended before its agent was ready (or while in use).
    #[error("{}", exit_sentence(.reason, .message))]
    Exited {
        /// Why.
        reason: ExitReason,
        /// Detail from the VMM.
        message: String,
    },
    /// The agent did not announce itself in time.
    #[error("the guest agent was not ready within {0:?} (see the console with --console)")]
    ReadyTimeout(Duration),
    /// The VM could not be frozen.
    #[error("cannot freeze the VM: {0}")]
    Freeze(String),
    /// The VMM's vsock socket refused the agent's port.
    #[error("cannot reach the guest agent over vsock: {0}")]
    Connect(String),
}

fn exit_sentence(reason: &ExitReason, message: &str) -> String {
    match reason {
        ExitReason::Panic => format!("guest kernel panicked: {message}"),
        ExitReason::Shutdown => "the guest shut down".to_string(),
        ExitReason::Frozen => "the VM was frozen".to_string(),
        ExitReason::Error => message.to_string(),
        _ => format!("the VM failed: {message}"),
    }
}

/// Host timestamps (CLOCK_MONOTONIC µs) of one VM's life.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Just before the VMM process was spawned.
    pub spawn_us: u64,
    /// The VMM's `main` ran.
    pub started_us: Option<u64>,
    /// vCPU 0 entered the guest.
    pub vcpu_running_us: Option<u64>,
    /// The agent ran as /init.
    pub agent_start_us: Option<u64>,
    /// The agent listened on vsock.
    pub agent_ready_us: Option<u64>,
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Guest image.
    pub image: GuestImage,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Show the serial console on our stderr (else it goes to a log file).
    pub console: bool,
    /// Where the VM's runtime directory goes (default: [`runtime_root`]).
    pub runtime_root: Option<PathBuf>,
    /// Boot a VM that can be frozen into this (new, empty) snapshot
    /// directory, through [`VmProcess::freeze`].
    pub snapshot_dir: Option<PathBuf>,
}

/// A running VMM process.
pub struct VmProcess {
    child: Option<Child>,
    dir: PathBuf,
    events: mpsc::Receiver<Event>,
    /// Timestamps so far.
    pub timeline: Timeline,
    exit: Option<(ExitReason, String)>,
    console_log: Option<PathBuf>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The directory for per-VM runtime files: `$ZYGOTE_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/zygote`, else `/run/zygote` when writable, else the
/// temp dir.
pub fn runtime_root() -> PathBuf {
    if let Some(p) = std::env::var_os("ZYGOTE_RUNTIME_DIR") {
        return p.into();
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&p).join("zygote");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/run/zygote");
    }
    std::env::temp_dir().join("zygote")
}

impl VmProcess {
    /// Starts a VMM process for `spec`.
    pub fn spawn(spec: &VmSpec) -> Result<Self, VmError> {
        let vmm = paths::vmm_binary()?;
        let root = spec.runtime_root.clone().unwrap_or_else(runtime_root);
        let dir = root.join(format!(
            "vm-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| VmError::RuntimeDir {
                path: dir.clone(),
                source,
            })?;
        let console_log = (!spec.console).then(|| dir.join("console.log"));
        let mut cmd = Command::new(&vmm);
        cmd.arg("--kernel")
            .arg(&spec.image.kernel)
            .arg("--initrd")
            .arg(&spec.image.initramfs)
            .arg("--cmdline")
            .arg(&spec.image.cmdline)
            .arg("--memory")
            .arg(spec.memory_mib.to_string())
            .arg("--vcpus")
            .arg(spec.vcpus.to_string())
            .arg("--vsock")
            .arg(dir.join("vsock.sock"))
            .arg("--console")
            .arg(match &console_log {
                Some(p) => p.as_os_str().to_owned(),
                None => "stderr".into(),
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(snap) = &spec.snapshot_dir {
            cmd.arg("--snapshot-dir")
                .arg(snap)
                .arg("--control")
                .arg(dir.join("control.sock"));
        }
        cmd.stderr(if spec.console {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        let spawn_us = now_us();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(VmError::Spawn { path: vmm, source });
            }
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(ev) = serde_json::from_str::<Event>(&line) {
                    if tx.send(ev).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(VmProcess {
            child: Some(child),
            dir,
            events: rx,
            timeline: Timeline {
                spawn_us,
                ..Default::default()
            },
            exit: None,
            console_log,
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The VM's private runtime directory (removed when dropped).
    pub fn runtime_dir(&self) -> &Path {
        &self.dir
    }

    /// The host side of the VM's vsock device.
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// Freezes a VM started with [`VmSpec::snapshot_dir`]: its vCPUs stop
    /// for good, its state is written next to its RAM, and the VMM process
    /// ends. Returns what the VMM reported (pause and save times).
    pub fn freeze(&mut self, timeout: Duration) -> Result<vmm::ctl::CtlResponse, VmError> {
        use vmm::ctl::{call, CtlRequest};
        let response = call(&self.dir.join("control.sock"), &CtlRequest::Freeze, timeout)
            .map_err(|e| VmError::Freeze(format!("control socket: {e}")))?;
        if !response.ok {
            return Err(VmError::Freeze(
                response.error.unwrap_or_else(|| "no reason given".into()),
            ));
        }
        match self.wait_exit(timeout)? {
            (ExitReason::Frozen, _) => Ok(response),
            (reason, message) => Err(VmError::Freeze(format!(
                "the VMM ended with {reason:?} instead: {message}"
            ))),
        }
    }

    fn record(&mut self, ev: Event) {
        match ev {
            Event::Started { t_us } => self.timeline.started_us = Some(t_us),
            Event::VcpuRunning { t_us } => self.timeline.vcpu_running_us = Some(t_us),
            Event::AgentStart { t_us } => self.timeline.agent_start_us = Some(t_us),
            Event::AgentReady { t_us } => self.timeline.agent_ready_us = Some(t_us),
            Event::Exit {
                reason, message, ..
            } => self.exit = Some((reason, message)),
        }
    }

    fn exited_error(&mut self) -> VmError {
        let (reason, message) = self.exit.clone().unwrap_or((
            ExitReason::Error,
            "the VMM process ended without saying why".to_string(),
        ));
        let mut message = message;
        if !matches!(reason, ExitReason::Shutdown | ExitReason::Frozen) {
            if let Some(tail) = self.console_tail(8) {
                message.push_str("\n  last console lines:\n");
                message.push_str(&tail);
            }
        }
        VmError::Exited { reason, message }
    }

    /// The last `n` lines of the console log, when it goes to a file.
    pub fn console_tail(&self, n: usize) -> Option<String> {
        let text = std::fs::read_to_string(self.console_log.as_ref()?).ok()?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return None;
        }
        let start = lines.len().saturating_sub(n);
        Some(
            lines[start..]
                .iter()
                .map(|l| format!("    {l}\n"))
                .collect(),
        )
    }

    /// Waits until the agent says it is ready, the VM ends, or `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.timeline.agent_ready_us.is_some() {
                return Ok(());
            }
            if self.exit.is_some() {
                self.reap();
                return Err(self.exited_error());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VmError::ReadyTimeout(timeout));
            }
            match self.events.recv_timeout(left) {
                Ok(ev) => self.record(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.reap();
                    return Err(self.exited_error());
                }
            }
        }
    }

    /// Opens a stream to guest vsock `port` (Firecracker's `CONNECT` handshake).
    pub fn connect(&self, port: u32) -> Result<UnixStream, VmError> {
        connect_vsock(&self.vsock_path(), port)
    }

    /// Waits for the VMM to exit on its own, up to `timeout`; then kills it.
    /// Returns how the VM ended.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitReason, String), VmError> {
        let deadline = Instant::now() + timeout;
        while self.exit.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.kill();
                return Err(VmError::Exited {
                    reason: ExitReason::Error,
                    message: format!("the VM did not shut down within {timeout:?} and was killed"),
                });
            }
            match self.events.recv_timeout(left) {
                Ok(ev) => self.record(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.reap();
        match self.exit.clone() {
            Some(e) => Ok(e),
            None => Err(self.exited_error()),
        }
    }

    /// How the VM ended, as an error to show (for callers that lost the agent).
    pub fn end_error(&mut self) -> VmError {
        let _ = self.wait_exit(Duration::from_secs(5));
        self.exited_error()
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }

    /// Kills the VMM now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Remove the runtime root too if we were its last user.
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Connects to a VMM's vsock Unix socket and asks for guest `port`.
pub fn connect_vsock(uds: &Path, port: u32) -> Result<UnixStream, VmError> {
    connect_vsock_within(uds, port, Duration::from_secs(10))
}

/// [`connect_vsock`], waiting at most `timeout` for the guest's answer.
pub fn connect_vsock_within(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VmError> {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(uds)
        .map_err(|e| VmError::Connect(format!("{}: {e}", uds.display())))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| VmError::Connect(e.to_string()))?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| VmError::Connect(e.to_string()))?;
    // Read the reply byte by byte: nothing after the newline is ours to take.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Err(VmError::Connect(format!("guest refused port {port}"))),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(b[0]),
            Ok(_) => return Err(VmError::Connect("bad reply to CONNECT".into())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(VmError::Connect(format!(
                    "the guest did not answer the connection to port {port} within {timeout:?}"
                )))
            }
            Err(e) => return Err(VmError::Connect(e.to_string())),
        }
    }
    s.set_read_timeout(None)
        .map_err(|e| VmError::Connect(e.to_string()))?;
    if !line.starts_with(b"OK ") {
        return Err(VmError::Connect(format!(
            "unexpected reply to CONNECT {port}: {}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(s)
}
