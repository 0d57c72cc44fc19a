//! A `zygote-vmm` process as the host sees it: one type, [`VmmProcess`],
//! for a booted VM, a master being warmed up, and a clone, with one
//! [`Timeline`] of its life.
//!
//! Each VMM gets a directory of its own (its *runtime directory*):
//!
//! ```text
//! vsock.sock     host side of the guest's virtio-vsock
//! control.sock   the VMM's control socket (VMs that may be frozen)
//! console.log    the serial console (unless it goes to the caller's stderr)
//! events.jsonl   what the VMM reports (proto::events), one JSON line each
//! vmm.log        the VMM's own stderr
//! ```
//!
//! Events go to a file, not a pipe, so that a VMM that outlives the process
//! that started it (a detached clone, a daemon restart) can still be read
//! and adopted. The process is watched and signalled through a pidfd, never
//! a bare pid that may have been reused.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::ctl::{CtlRequest, CtlResponse};
use proto::events::{now_us, DevicePhase, Event, ExitReason};
use proto::launch::{BootSource, ConsoleTarget, SnapshotCheck, VmSource, VmmLaunch};

use crate::confine::{self, Confined, VmFiles};
use crate::paths;
use crate::procfs;

/// File names inside a VMM's runtime directory.
pub mod files {
    /// Host side of virtio-vsock.
    pub const VSOCK: &str = "vsock.sock";
    /// Control socket.
    pub const CONTROL: &str = "control.sock";
    /// Serial console.
    pub const CONSOLE: &str = "console.log";
    /// Events.
    pub const EVENTS: &str = "events.jsonl";
    /// The VMM's stderr.
    pub const VMM_LOG: &str = "vmm.log";
}

/// Errors starting, watching or stopping a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file zygote needs is missing.
    #[error(transparent)]
    Paths(#[from] paths::PathError),
    /// A file in the runtime directory could not be made.
    #[error("cannot create {path}: {source}")]
    RuntimeDir {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {path}")]
    Spawn {
        /// VMM binary.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<jailer::JailError>,
    },
    /// The snapshot check could not be run.
    #[error("cannot run {path} to check a snapshot")]
    Check {
        /// VMM binary.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's confinement could not be prepared.
    #[error(transparent)]
    Confine(Box<confine::ConfineError>),
    /// The VM ended before it was ready (or while in use).
    #[error("{}", exit_sentence(.reason, .message))]
    Exited {
        /// Why.
        reason: ExitReason,
        /// Detail from the VMM (with the console's last lines).
        message: String,
    },
    /// The agent did not announce itself in time.
    #[error("the guest agent was not ready within {0:?} (see the console with --console)")]
    ReadyTimeout(Duration),
    /// The VMM refused or failed the freeze.
    #[error("cannot freeze the VM: {0}")]
    Freeze(String),
    /// The control socket could not be used.
    #[error("cannot reach the VMM's control socket: {0}")]
    Control(#[source] std::io::Error),
    /// The process is not the VMM it was recorded as (gone, or its pid reused).
    #[error("process {pid} is gone or is no longer this VM's VMM")]
    Gone {
        /// The recorded pid.
        pid: u32,
    },
}

impl From<confine::ConfineError> for VmError {
    fn from(e: confine::ConfineError) -> Self {
        VmError::Confine(Box::new(e))
    }
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

/// Host timestamps (`CLOCK_MONOTONIC` µs) of one VM's life, from the VMM's
/// events and from the host's own steps. A field is `None` until it happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Timeline {
    /// Just before the VMM process was spawned.
    pub spawn_us: u64,
    /// The VMM's `main` ran.
    pub started_us: Option<u64>,
    /// vCPU 0 entered (or, for a clone, resumed) the guest.
    pub vcpu_running_us: Option<u64>,
    /// The agent ran as /init (booted VMs).
    pub agent_start_us: Option<u64>,
    /// The agent listened on vsock (booted VMs).
    pub agent_ready_us: Option<u64>,
    /// The agent's hello arrived over a vsock connection (clones).
    pub connected_us: Option<u64>,
    /// The agent took the VM's identity (clones).
    pub identity_us: Option<u64>,
    /// The agent answered a ping (clones).
    pub ping_us: Option<u64>,
    /// The vsock device's steps on the way there (restored VMs).
    pub vsock: VsockSteps,
    /// How long the guest took for each part of its identity (clones).
    pub identity: proto::IdentityTimings,
}

/// When a restored VM's vsock device took each step to its first answer
/// (`CLOCK_MONOTONIC` µs, from its [`Event::DevicePhase`] events; the
/// first of each), and how often it raised an interrupt again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VsockSteps {
    /// The transport reset event was posted.
    pub reset_posted_us: Option<u64>,
    /// The guest handled it (or it was given up on: `reset_late`).
    pub reset_acked_us: Option<u64>,
    /// The guest did not handle it in time.
    pub reset_late: bool,
    /// The master's other connections were reset one by one.
    pub stale_reset_us: Option<u64>,
    /// The host took over the carried connection.
    pub carried_us: Option<u64>,
    /// A connection request went to the guest.
    pub requested_us: Option<u64>,
    /// The guest accepted it.
    pub accepted_us: Option<u64>,
    /// The first host data went to the guest.
    pub first_rx_us: Option<u64>,
    /// The first guest data came back.
    pub first_tx_us: Option<u64>,
    /// Interrupts raised until then (steps with an interrupt).
    pub irqs: u32,
    /// Interrupts raised again because the guest had not acknowledged
    /// them (the lost-interrupt watchdog).
    pub irqs_reraised: u32,
}

impl VsockSteps {
    fn record(&mut self, phase: DevicePhase, t_us: u64) {
        let first = |slot: &mut Option<u64>| {
            slot.get_or_insert(t_us);
        };
        match phase {
            DevicePhase::TransportResetPosted => first(&mut self.reset_posted_us),
            DevicePhase::TransportResetAcked => first(&mut self.reset_acked_us),
            DevicePhase::TransportResetLate => {
                self.reset_late = true;
                first(&mut self.reset_acked_us)
            }
            DevicePhase::StaleConnectionsReset => first(&mut self.stale_reset_us),
            DevicePhase::ConnectionCarried => first(&mut self.carried_us),
            DevicePhase::ConnectionRequested => first(&mut self.requested_us),
            DevicePhase::ConnectionAccepted => first(&mut self.accepted_us),
            DevicePhase::FirstRx => first(&mut self.first_rx_us),
            DevicePhase::FirstTx => first(&mut self.first_tx_us),
            DevicePhase::IrqRaised => self.irqs += 1,
            DevicePhase::IrqReraised => self.irqs_reraised += 1,
        }
    }
}

impl Timeline {
    /// Milliseconds from the spawn to `at`.
    pub fn ms_since_spawn(&self, at: Option<u64>) -> Option<f64> {
        at.map(|t| t.saturating_sub(self.spawn_us) as f64 / 1000.0)
    }

    fn record(&mut self, ev: &Event) {
        match *ev {
            Event::Started { t_us } => self.started_us = Some(t_us),
            Event::VcpuRunning { t_us } => self.vcpu_running_us = Some(t_us),
            Event::AgentStart { t_us } => self.agent_start_us = Some(t_us),
            Event::AgentReady { t_us } => self.agent_ready_us = Some(t_us),
            Event::DeviceRejected { .. } => {}
            Event::DevicePhase { t_us, phase, .. } => self.vsock.record(phase, t_us),
            Event::Wakeups { .. } => {}
            Event::Exit { .. } => {}
        }
    }
}

/// How to spawn a VMM.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// Show the serial console on this process's stderr (else it goes to
    /// `console.log` in the runtime directory).
    pub console_to_stderr: bool,
    /// The VMM outlives this process (own session, no parent-death signal).
    pub detach: bool,
    /// Give the VMM a control socket (needed to freeze it).
    pub control: bool,
    /// Kill the VMM and remove the runtime directory when the handle is
    /// dropped without [`VmmProcess::release`] (VMs that belong to one
    /// command: `run`, a master being made).
    pub remove_dir_on_drop: bool,
    /// Its cgroup limits (defaults from the guest's size).
    pub limits: confine::VmLimits,
    /// Jail it (`None`: as this process's [`confine::settings`] say).
    pub jail: Option<bool>,
    /// A restored VM resets its vsock transport instead of carrying the
    /// master's agent connection (`zygote-vmm --vsock-reset`): what a
    /// Firecracker restore does, for comparison.
    pub vsock_reset: bool,
}

/// A VM to boot: image and shape.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Guest image.
    pub image: paths::GuestImage,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Show the serial console on our stderr (else it goes to a log file).
    pub console: bool,
    /// Where the VM's runtime directory goes (default: [`paths::runtime_root`]).
    pub runtime_root: Option<PathBuf>,
    /// Boot a VM that can be frozen into this (new, empty) snapshot
    /// directory, through [`VmmProcess::freeze`].
    pub snapshot_dir: Option<PathBuf>,
}

impl VmSpec {
    /// The default image (what `scripts/setup` installed, or the
    /// environment's overrides) with this shape.
    pub fn new(
        kernel: Option<&Path>,
        rootfs: Option<&Path>,
        memory_mib: u64,
        vcpus: u8,
    ) -> Result<Self, VmError> {
        Ok(VmSpec {
            image: paths::GuestImage::resolve(kernel, rootfs)?,
            memory_mib,
            vcpus,
            console: false,
            runtime_root: None,
            snapshot_dir: None,
        })
    }

    /// What the VMM boots.
    pub fn boot_source(&self) -> BootSource {
        BootSource {
            kernel: self.image.kernel.clone(),
            initrd: Some(self.image.initramfs.clone()),
            cmdline: self.image.cmdline.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            guest_cid: proto::launch::DEFAULT_GUEST_CID,
            snapshot_dir: self.snapshot_dir.clone(),
            mac: None,
        }
    }
}

static NEXT_VM: AtomicU64 = AtomicU64::new(0);

/// Reads new lines of an `events.jsonl` file as they are written.
#[derive(Debug)]
struct EventTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl EventTail {
    fn read_new(&mut self) -> Vec<Event> {
        use std::io::{Seek, SeekFrom};
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        // An event line is small; a VMM writes a handful in its life.
        if f.take(1 << 20).read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let mut out = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Ok(ev) = serde_json::from_slice::<Event>(&line) {
                out.push(ev);
            }
        }
        out
    }
}

/// The events a VMM wrote to `dir/events.jsonl` so far.
pub fn read_events(dir: &Path) -> Vec<Event> {
    EventTail {
        path: dir.join(files::EVENTS),
        offset: 0,
        partial: Vec::new(),
    }
    .read_new()
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Why (from the VMM's last event, or [`ExitReason::Error`] when it
    /// died without saying: killed, crashed).
    pub reason: ExitReason,
    /// Detail.
    pub message: String,
}

/// The descriptors of a VM's network: its namespace (a jailed VMM joins
/// it) and its tap (the VMM's virtio-net backend).
#[derive(Debug)]
pub struct NetFds {
    /// The network namespace.
    pub netns: OwnedFd,
    /// The tap inside it.
    pub tap: OwnedFd,
}

/// A running (or ended) `zygote-vmm` process.
#[derive(Debug)]
pub struct VmmProcess {
    /// Whether this process spawned it (and so reaps it and knows how it
    /// ended); false for an adopted VMM.
    own_child: bool,
    /// How the process ended, once reaped.
    status: Option<jailer::Exit>,
    /// Its jail, cgroup and uid, given back once it has ended.
    confined: Option<Confined>,
    pidfd: Option<OwnedFd>,
    pid: u32,
    start_ticks: u64,
    dir: PathBuf,
    console_log: Option<PathBuf>,
    remove_dir_on_drop: bool,
    released: bool,
    events: EventTail,
    /// What happened so far.
    pub timeline: Timeline,
    exit: Option<VmExit>,
}

fn create(dir: &Path, name: &str) -> Result<File, VmError> {
    let path = dir.join(name);
    File::create(&path).map_err(|source| VmError::RuntimeDir { path, source })
}

impl VmmProcess {
    /// Boots `spec` in a VMM of this process's (it dies with this process)
    /// with a fresh runtime directory under the spec's runtime root; the
    /// VMM is killed and the directory removed when the handle is dropped.
    pub fn boot(spec: &VmSpec) -> Result<Self, VmError> {
        Self::boot_with_net(spec, None)
    }

    /// [`VmmProcess::boot`] with a network device on `net`'s tap (MAC:
    /// `mac`), the VMM in `net`'s namespace.
    pub fn boot_with_net(
        spec: &VmSpec,
        net: Option<(NetFds, proto::launch::MacAddr)>,
    ) -> Result<Self, VmError> {
        let root = spec
            .runtime_root
            .clone()
            .unwrap_or_else(paths::runtime_root);
        let dir = root.join(format!(
            "vm-{}-{}",
            std::process::id(),
            NEXT_VM.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| VmError::RuntimeDir {
                path: dir.clone(),
                source,
            })?;
        let opts = SpawnOptions {
            console_to_stderr: spec.console,
            detach: false,
            control: spec.snapshot_dir.is_some(),
            remove_dir_on_drop: true,
            limits: Default::default(),
            jail: None,
            vsock_reset: false,
        };
        let mut boot = spec.boot_source();
        let net = net.map(|(fds, mac)| {
            boot.mac = Some(mac);
            fds
        });
        VmmProcess::spawn_with_net(VmSource::Boot(boot), &dir, &opts, net).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    /// Starts `zygote-vmm` for `source`, with its files in `dir` (which must
    /// exist and is the VMM's alone), confined as this process's
    /// [`confine::settings`] say.
    pub fn spawn(source: VmSource, dir: &Path, opts: &SpawnOptions) -> Result<Self, VmError> {
        Self::spawn_with_net(source, dir, opts, None)
    }

    /// [`VmmProcess::spawn`] with a network: the VMM joins `net`'s namespace
    /// and gets its tap as the virtio-net backend.
    pub fn spawn_with_net(
        source: VmSource,
        dir: &Path,
        opts: &SpawnOptions,
        net: Option<NetFds>,
    ) -> Result<Self, VmError> {
        let vmm = paths::vmm_binary()?;
        let jailed = opts.jail.unwrap_or(confine::settings().jail);
        let restore = matches!(source, VmSource::Restore { .. });
        let (mut files, inside) = jail_view(&source)?;
        files.limits = opts.limits;
        let (netns, tap) = match net {
            Some(n) => (Some(n.netns), Some(n.tap)),
            None => (None, None),
        };
        let mut confined = confine::prepare(dir, &vmm, &files, netns, jailed)?;
        // Where the VMM sees its own files: its root when jailed.
        let own = |name: &str| {
            if jailed {
                confine::jail_path(name)
            } else {
                dir.join(name)
            }
        };
        let console_log = (!opts.console_to_stderr).then(|| dir.join(files::CONSOLE));
        let launch = VmmLaunch {
            source: if jailed { inside } else { source },
            vsock: Some(own(files::VSOCK)),
            control: opts.control.then(|| own(files::CONTROL)),
            console: match &console_log {
                Some(_) => ConsoleTarget::File(own(files::CONSOLE)),
                None => ConsoleTarget::Stderr,
            },
            detach: opts.detach,
            kvm_fd: Some(confine::KVM_FD),
            tap_fd: tap.as_ref().map(|_| confine::TAP_FD),
            seccomp: jailed,
            vsock_reset: opts.vsock_reset && restore,
        };
        let mut sp = jailer::Spawn::new(&vmm).args(launch.to_args());
        // `ps` shows which VM a (jailed) VMM runs: its arguments are paths
        // inside its jail, so argv[0] names its runtime directory.
        sp.arg0 = Some(dir.join("zygote-vmm").into());
        for (k, v) in std::env::vars_os() {
            let key = k.to_string_lossy();
            if key.starts_with("ZYGOTE_VMM_") || key == "RUST_BACKTRACE" {
                sp.env.push((k, v));
            }
        }
        sp.stdout = jailer::Stdio::Fd(create(dir, files::EVENTS)?.into());
        sp.stderr = if opts.console_to_stderr {
            jailer::Stdio::Inherit
        } else {
            jailer::Stdio::Fd(create(dir, files::VMM_LOG)?.into())
        };
        let kvm = confined
            .kvm
            .try_clone()
            .map_err(confine::ConfineError::Kvm)?;
        sp.fds.push((kvm, confine::KVM_FD));
        if let Some(t) = tap {
            sp.fds.push((t, confine::TAP_FD));
        }
        sp.detach = opts.detach;
        sp.die_with_parent = !opts.detach;
        sp.cgroup = confined.placement();
        sp.jail = confined.jail.take();
        let spawn_us = now_us();
        let child = jailer::spawn(&sp).map_err(|source| VmError::Spawn {
            path: vmm,
            source: Box::new(source),
        })?;
        let pid = child.pid;
        let start_ticks = procfs::start_ticks(pid).unwrap_or(0);
        confined.set_owner(pid, start_ticks);
        Ok(VmmProcess {
            own_child: true,
            status: None,
            confined: Some(confined),
            pidfd: Some(child.pidfd),
            pid,
            start_ticks,
            dir: dir.to_path_buf(),
            console_log,
            remove_dir_on_drop: opts.remove_dir_on_drop,
            released: false,
            events: EventTail {
                path: dir.join(files::EVENTS),
                offset: 0,
                partial: Vec::new(),
            },
            timeline: Timeline {
                spawn_us,
                ..Default::default()
            },
            exit: None,
        })
    }

    /// Takes over a VMM that another process started (a detached clone, a
    /// VM of a daemon that restarted): `pid` must still be the process that
    /// started at `start_ticks`. Its events so far are read from `dir`.
    pub fn adopt(dir: &Path, pid: u32, start_ticks: u64) -> Result<Self, VmError> {
        let pidfd = pidfd_open(pid).ok_or(VmError::Gone { pid })?;
        // Checked after the pidfd is open: if the start time matches now,
        // the pidfd is that process for good.
        if !procfs::is_same_live_process(pid, start_ticks) {
            return Err(VmError::Gone { pid });
        }
        let mut p = VmmProcess {
            own_child: false,
            status: None,
            confined: None,
            pidfd: Some(pidfd),
            pid,
            start_ticks,
            dir: dir.to_path_buf(),
            console_log: Some(dir.join(files::CONSOLE)),
            remove_dir_on_drop: false,
            released: false,
            events: EventTail {
                path: dir.join(files::EVENTS),
                offset: 0,
                partial: Vec::new(),
            },
            timeline: Timeline::default(),
            exit: None,
        };
        p.poll();
        p.timeline.spawn_us = p.timeline.started_us.unwrap_or(0);
        Ok(p)
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's start time (with the pid, it names the process).
    pub fn start_ticks(&self) -> u64 {
        self.start_ticks
    }

    /// The VM's runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host side of the VM's vsock device.
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join(files::VSOCK)
    }

    /// The pidfd, to wait on (readable once the process has exited).
    pub fn pidfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }

    /// Reads the events written since the last call and notices an exit.
    /// Returns how the VM ended, once it has.
    pub fn poll(&mut self) -> Option<&VmExit> {
        for ev in self.events.read_new() {
            self.timeline.record(&ev);
            if let Event::Exit {
                reason, message, ..
            } = ev
            {
                self.exit = Some(VmExit { reason, message });
            }
        }
        if self.exit.is_none() && self.process_ended() {
            // It may have written its last event just before it ended.
            for ev in self.events.read_new() {
                if let Event::Exit {
                    reason, message, ..
                } = ev
                {
                    self.exit = Some(VmExit { reason, message });
                }
            }
            if self.exit.is_none() {
                self.exit = Some(VmExit {
                    reason: ExitReason::Error,
                    message: self.death_message(),
                });
            }
        }
        self.exit.as_ref()
    }

    /// How the VM ended, if it has (as of the last [`VmmProcess::poll`]).
    pub fn exit(&self) -> Option<&VmExit> {
        self.exit.as_ref()
    }

    fn process_ended(&mut self) -> bool {
        let ended = match &self.pidfd {
            Some(fd) => pidfd_exited(fd),
            None => !procfs::is_same_live_process(self.pid, self.start_ticks),
        };
        if ended {
            self.reap();
        }
        ended
    }

    /// What to say about a VMM that ended without an exit event.
    fn death_message(&mut self) -> String {
        self.reap();
        if let Some(c) = &self.confined {
            if c.oom_killed() {
                return confine::oom_message(c.memory_limit());
            }
        }
        let log = std::fs::read_to_string(self.dir.join(files::VMM_LOG)).unwrap_or_default();
        if let Some(message) = seccomp_death(self.status.and_then(|s| s.signal()), &log) {
            return message;
        }
        let how = match self.status {
            Some(jailer::Exit::Signal { signal, .. }) => format!("killed by signal {signal}"),
            Some(jailer::Exit::Code(c)) => format!("exited with code {c}"),
            None => "ended".to_string(),
        };
        match log.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(last) => format!("the VMM {how}: {last}"),
            None => format!("the VMM {how} without saying why"),
        }
    }

    /// Polls until `done` holds for the timeline, the VM ends, or `timeout`.
    fn wait_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Timeline) -> bool,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let ended = self.poll().is_some();
            if done(&self.timeline) {
                return Ok(());
            }
            if ended {
                return Err(self.exited_error());
            }
            if Instant::now() >= deadline {
                return Err(VmError::ReadyTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the agent of a booted VM says it is ready.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), VmError> {
        self.wait_until(timeout, |t| t.agent_ready_us.is_some())
    }

    /// Waits until vCPU 0 runs the guest.
    pub fn wait_running(&mut self, timeout: Duration) -> Result<(), VmError> {
        self.wait_until(timeout, |t| t.vcpu_running_us.is_some())
    }

    /// The error that says how the VM ended, with the console's last lines
    /// when it did not end normally.
    pub fn exited_error(&mut self) -> VmError {
        let VmExit {
            reason,
            mut message,
        } = self.exit.clone().unwrap_or(VmExit {
            reason: ExitReason::Error,
            message: "the VMM process ended without saying why".into(),
        });
        if !matches!(reason, ExitReason::Shutdown | ExitReason::Frozen) {
            if let Some(tail) = self.console_tail(8) {
                message.push_str("\n  last console lines:\n");
                message.push_str(&tail);
            }
        }
        VmError::Exited { reason, message }
    }

    /// How the VM ended, as an error (for callers that lost the agent):
    /// waits a little for the VMM to say it.
    pub fn end_error(&mut self) -> VmError {
        let _ = self.wait_exit(Duration::from_secs(5));
        self.exited_error()
    }

    /// The last `n` non-empty lines of the console log, indented, when the
    /// console goes to a file.
    pub fn console_tail(&self, n: usize) -> Option<String> {
        let text = console_tail(self.console_log.as_ref()?, n);
        (!text.is_empty()).then(|| text.iter().map(|l| format!("    {l}\n")).collect())
    }

    /// Freezes a VM booted with a snapshot directory and a control socket:
    /// its vCPUs stop for good, its state is written next to its RAM, and
    /// the VMM ends. Returns what the VMM reported (pause and save times).
    pub fn freeze(&mut self, timeout: Duration) -> Result<CtlResponse, VmError> {
        let response =
            proto::ctl::call(&self.dir.join(files::CONTROL), &CtlRequest::Freeze, timeout)
                .map_err(VmError::Control)?;
        if !response.ok {
            return Err(VmError::Freeze(
                response.error.unwrap_or_else(|| "no reason given".into()),
            ));
        }
        match self.wait_exit(timeout)? {
            VmExit {
                reason: ExitReason::Frozen,
                ..
            } => Ok(response),
            VmExit { reason, message } => Err(VmError::Freeze(format!(
                "the VMM ended with {reason:?} instead: {message}"
            ))),
        }
    }

    /// Waits up to `timeout` for the VMM to end on its own; then kills it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<VmExit, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.poll() {
                let e = e.clone();
                self.reap();
                return Ok(e);
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(VmError::Exited {
                    reason: ExitReason::Error,
                    message: format!("the VM did not shut down within {timeout:?} and was killed"),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the process has ended (polls).
    pub fn has_exited(&mut self) -> bool {
        self.poll().is_some()
    }

    /// Collects the ended VMM's status (a child of this process only) and
    /// gives back its cgroup and uid.
    fn reap(&mut self) {
        if self.own_child && self.status.is_none() && !self.released {
            if let Some(fd) = &self.pidfd {
                if let Ok(Some(exit)) = jailer::wait(fd, !pidfd_exited(fd)) {
                    self.status = Some(exit);
                }
            }
        }
        if self.status.is_some() {
            if let Some(c) = &mut self.confined {
                c.release();
            }
        } else if !self.own_child && !self.released && self.pidfd.as_ref().is_some_and(pidfd_exited)
        {
            // An adopted VMM that has ended: what it held is found by its
            // runtime directory.
            confine::release_dir(&self.dir);
        }
    }

    /// Sends SIGKILL through the pidfd and returns at once (to stop many
    /// VMMs together, then [`VmmProcess::kill`] each to wait for it).
    pub fn signal_kill(&self) {
        if let Some(fd) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
    }

    /// Kills the VMM now (SIGKILL through its pidfd) and waits until it is
    /// gone (up to 5 s).
    pub fn kill(&mut self) {
        if let Some(fd) = &self.pidfd {
            kill_and_wait(fd, Instant::now() + Duration::from_secs(5));
        }
        self.reap();
        if self.exit.is_none() {
            self.poll();
        }
    }

    /// Keeps the VMM and its directory when the handle is dropped (the
    /// caller owns their lifetime from now on), while still watching it.
    pub fn keep_on_drop(&mut self) {
        self.remove_dir_on_drop = false;
    }

    /// Gives up the handle: the VMM keeps running and its directory stays.
    pub fn release(&mut self) {
        self.released = true;
        // Whoever takes over (or `confine::sweep`) gives its resources back.
        if let Some(c) = &mut self.confined {
            c.keep();
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.released || !self.remove_dir_on_drop {
            return;
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The runtime root too, if this was its last VM.
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// What a VMM reads and writes, and the same source as the VMM sees it
/// inside its jail.
fn jail_view(source: &VmSource) -> Result<(VmFiles, VmSource), VmError> {
    const SNAPSHOT: &str = "/snapshot";
    Ok(match source {
        VmSource::Boot(b) => {
            let mut read = vec![(b.kernel.clone(), PathBuf::from("/kernel"))];
            if let Some(i) = &b.initrd {
                read.push((i.clone(), PathBuf::from("/initrd")));
            }
            let inside = BootSource {
                kernel: "/kernel".into(),
                initrd: b.initrd.as_ref().map(|_| "/initrd".into()),
                snapshot_dir: b.snapshot_dir.as_ref().map(|_| SNAPSHOT.into()),
                ..b.clone()
            };
            let files = VmFiles {
                read,
                write: b
                    .snapshot_dir
                    .as_ref()
                    .map(|d| (d.clone(), PathBuf::from(SNAPSHOT))),
                memory_mib: b.memory_mib,
                limits: Default::default(),
            };
            (files, VmSource::Boot(inside))
        }
        VmSource::Restore { snapshot } | VmSource::CheckSnapshot { snapshot } => {
            let memory = snapshot.join("memory");
            let bytes = std::fs::metadata(&memory)
                .map(|m| m.len())
                .map_err(|source| VmError::RuntimeDir {
                    path: memory,
                    source,
                })?;
            let files = VmFiles {
                read: vec![(snapshot.clone(), PathBuf::from(SNAPSHOT))],
                write: None,
                memory_mib: bytes.div_ceil(1 << 20),
                limits: Default::default(),
            };
            let inside = match source {
                VmSource::Restore { .. } => VmSource::Restore {
                    snapshot: SNAPSHOT.into(),
                },
                _ => VmSource::CheckSnapshot {
                    snapshot: SNAPSHOT.into(),
                },
            };
            (files, inside)
        }
    })
}

/// Removes the `vm-PID-N` runtime directories under `root` whose creating
/// process (PID) is gone: VMs of a command or daemon that was killed before
/// it could clean up (their VMMs died with it). Returns how many.
pub fn remove_abandoned_runtime_dirs(root: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("vm-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id()
                && procfs::stat(pid).is_none()
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// Asks the VMM binary whether it can restore the snapshot in `dir` on
/// this host (`zygote-vmm --check-snapshot`): the same checks every restore
/// makes, without creating a VM. `Ok` carries its answer, refusals included.
pub fn check_snapshot(dir: &Path) -> Result<SnapshotCheck, VmError> {
    let vmm = paths::vmm_binary()?;
    let launch = VmmLaunch::new(VmSource::CheckSnapshot {
        snapshot: dir.to_path_buf(),
    });
    let out = Command::new(&vmm)
        .args(launch.to_args())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|source| VmError::Check {
            path: vmm.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).map_err(|e| VmError::Check {
        path: vmm,
        source: std::io::Error::other(format!(
            "unexpected answer to --check-snapshot ({e}): {text}"
        )),
    })
}

/// The last `n` non-empty lines of a console log.
pub fn console_tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    // Only the end matters: a console log can be long.
    let from = text.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&text[from..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// The line a VMM's SIGSYS handler writes to its stderr (`vmm.log`) when
/// its seccomp filter refused a call (`vmm::seccomp`), up to the call.
const SECCOMP_REPORT: &str = "zygote-vmm: seccomp: forbidden system call: ";

/// How a VMM that its seccomp filter killed ended, for a user: it died by
/// `signal` SIGSYS, or `log` holds its report of the call. `None` for any
/// other death. (An adopted VMM has no exit status: the log tells.)
fn seccomp_death(signal: Option<i32>, log: &str) -> Option<String> {
    const KILLED: &str = "the VMM was killed by its seccomp filter: a forbidden system call";
    let call = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(SECCOMP_REPORT).map(|(_, call)| call.trim()));
    match (call, signal) {
        (Some(call), _) => Some(format!("{KILLED}: {call}")),
        (None, Some(libc::SIGSYS)) => Some(format!(
            "{KILLED} (it died by SIGSYS; vmm.log names no call)"
        )),
        (None, _) => None,
    }
}

#[cfg(test)]
mod seccomp_death_tests {
    use super::seccomp_death;

    #[test]
    fn a_seccomp_death_names_the_call_and_its_thread() {
        let log = "zygote-vmm: seccomp: forbidden system call: socket (41) on the vcpu thread (args 0x2 0x80001 0x0 0x0)\n";
        assert_eq!(
            seccomp_death(Some(libc::SIGSYS), log).as_deref(),
            Some("the VMM was killed by its seccomp filter: a forbidden system call: socket (41) on the vcpu thread (args 0x2 0x80001 0x0 0x0)")
        );
        // An adopted VMM: no status, the log tells.
        assert!(seccomp_death(None, log)
            .unwrap()
            .contains("socket (41) on the vcpu thread"));
        // SIGSYS without a report is still a seccomp death.
        assert!(seccomp_death(Some(libc::SIGSYS), "")
            .unwrap()
            .starts_with("the VMM was killed by its seccomp filter: a forbidden system call"));
    }

    #[test]
    fn other_deaths_are_not_seccomp() {
        assert_eq!(
            seccomp_death(Some(libc::SIGKILL), "zygote-vmm: oops\n"),
            None
        );
        assert_eq!(seccomp_death(None, ""), None);
    }
}

/// A pidfd for `pid`, or `None` when the process is gone (or the kernel
/// has no pidfds).
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid as i32)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Whether the process behind `fd` has exited (its pidfd is readable).
pub fn pidfd_exited(fd: &OwnedFd) -> bool {
    wait_readable(fd, Duration::ZERO)
}

fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

/// Sends SIGKILL through `fd` and waits until the process has exited (its
/// pidfd is readable) or `deadline` passes.
fn kill_and_wait(fd: &OwnedFd, deadline: Instant) {
    let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
    while !pidfd_exited(fd) && Instant::now() < deadline {
        wait_readable(fd, Duration::from_millis(100));
    }
}

/// Kills the process `pid` that started at `start_ticks`, through a pidfd
/// (a pid that now names another process is left alone), and waits up to
/// 5 s for it to end. Returns whether it was that process and it ended.
pub fn kill_process(pid: u32, start_ticks: u64) -> bool {
    let Some(fd) = pidfd_open(pid) else {
        return false;
    };
    if !procfs::is_same_live_process(pid, start_ticks) {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    kill_and_wait(&fd, deadline);
    // Not our child: its parent (or init) reaps it; a zombie counts as gone.
    while procfs::is_same_live_process(pid, start_ticks) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    !procfs::is_same_live_process(pid, start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_as_they_are_written_even_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(files::EVENTS);
        let mut tail = EventTail {
            path: path.clone(),
            offset: 0,
            partial: Vec::new(),
        };
        assert!(tail.read_new().is_empty(), "no file yet");
        std::fs::write(
            &path,
            "{\"event\":\"started\",\"t_us\":5}\n{\"event\":\"vcpu_r",
        )
        .unwrap();
        assert_eq!(tail.read_new(), vec![Event::Started { t_us: 5 }]);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"unning\",\"t_us\":9}\nnot json\n").unwrap();
        assert_eq!(tail.read_new(), vec![Event::VcpuRunning { t_us: 9 }]);
        assert_eq!(read_events(dir.path()).len(), 2);
    }

    #[test]
    fn a_process_is_killed_through_its_pidfd_and_only_if_it_is_the_same() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let start = procfs::start_ticks(pid).unwrap();
        assert!(
            !kill_process(pid, start + 1),
            "another start time is another process"
        );
        assert!(procfs::is_same_live_process(pid, start));
        let fd = pidfd_open(pid).unwrap();
        assert!(!pidfd_exited(&fd));
        assert!(kill_process(pid, start));
        assert!(pidfd_exited(&fd));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn runtime_dirs_of_dead_processes_are_removed_and_others_kept() {
        let root = tempfile::tempdir().unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = root.path().join(format!("vm-{}-0", std::process::id()));
        let gone = root.path().join(format!("vm-{dead}-3"));
        let other = root.path().join("not-a-vm");
        for d in [&mine, &gone, &other] {
            std::fs::create_dir(d).unwrap();
        }
        assert_eq!(remove_abandoned_runtime_dirs(root.path()), 1);
        assert!(mine.exists() && other.exists() && !gone.exists());
    }

    #[test]
    fn console_tail_keeps_the_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(&p, "a\n\nb\n  \nc\nd\n").unwrap();
        assert_eq!(console_tail(&p, 2), vec!["c", "d"]);
        assert!(console_tail(&dir.path().join("none"), 3).is_empty());
    }
}
