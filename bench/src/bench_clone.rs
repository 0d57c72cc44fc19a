//! `zygote bench clone`: boot one master cold, warm it up, freeze it, then
//! time its clones against that cold boot (and, with `--peer qemu`, against
//! QEMU restoring a saved VM): clone latency by phase, creation rate one at a
//! time and in parallel, an idle clone's CPU and private memory, the same
//! clone latency from a much bigger master, a networked clone's throughput
//! and request latency through a published port, and (with `--density`)
//! how many clones one host keeps alive.
//!
//! Everything the run creates (masters, clones, VM runtime directories) lives
//! in a private state root of its own, never the user's masters, and is
//! removed on every path by [`Workspace`]'s `Drop`.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proto::{ErrorCode, ExecRequest};
use serde::Serialize;

use crate::net_probe::{Probe, ProbeError, Transfer};
use crate::peer::QemuRestoreSample;
use crate::plot::{PlotError, Series};
use crate::stats::{Summary, TailSummary};
use host::agent::{AgentClient, AgentError};
use host::clone::{CloneError, CloneOptions, Started};
use host::master::{CreateOptions, MasterError};
use host::store::{MasterRecord, Store};
use host::vmm::VmSpec;

/// The default warm-up: a few seconds of guest shell work that leaves state
/// behind (a file in tmpfs and a running process).
pub const DEFAULT_WARMUP: &str = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
    echo warm > /tmp/state; sleep 100000 >/dev/null 2>&1 &";

/// Name of the master the clones come from.
const MASTER: &str = "bench";
/// Name of the big master (memory-size independence).
const BIG_MASTER: &str = "bench-big";
/// Clones of the big master.
const BIG_CLONES: usize = 5;
/// QEMU restores (at most).
const QEMU_RESTORES: usize = 5;
/// Clones spawned at once to measure the host's creation rate.
const BURST: usize = 50;
/// Pause between a clone answering and the idle measurement.
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// `--density` stops below this much host `MemAvailable`.
const DENSITY_MIN_AVAILABLE_KIB: u64 = 2 << 20;
/// How long pinging every clone of `--density` may take; clones that have not
/// answered by then are killed (and counted as not answering).
const DENSITY_PING_LIMIT: Duration = Duration::from_secs(300);
/// Threads that ping the density clones.
const PING_THREADS: usize = 8;
/// How long one clone may take to answer its ping.
const CLONE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit of `exec true` in a clone.
const EXEC_TIMEOUT_MS: u64 = 120_000;
/// The guest port of the agent's TCP test server in the network part.
const NET_GUEST_PORT: u16 = 5201;
/// Each transfer of the network part stops after this many bytes...
const NET_TRANSFER_BYTES: u64 = 256 << 20;
/// ...or after this long.
const NET_TRANSFER_TIME: Duration = Duration::from_secs(3);
/// Transfers each way, on each path.
const NET_TRANSFER_ROUNDS: usize = 2;
/// Requests timed on each path (new connection each, and on one connection).
const NET_REQUESTS: usize = 200;
/// Requests sent in a row on one path before the other path's turn.
const NET_REQUEST_BATCH: usize = 20;
/// Size of a request (and of its echoed answer).
const NET_REQUEST_BYTES: usize = 100;
/// Requests on each path before the timed ones (first connections).
const NET_WARMUP_REQUESTS: usize = 5;
/// The requests of one path stop after this long, timed or not.
const NET_REQUEST_TIME: Duration = Duration::from_secs(30);

/// Errors of `zygote bench clone` that stop the run.
#[derive(Debug, thiserror::Error)]
pub enum CloneBenchError {
    /// Making a master failed.
    #[error("master {name}: {source}")]
    Master {
        /// Master name.
        name: String,
        /// Why.
        #[source]
        source: MasterError,
    },
    /// Starting a clone failed.
    #[error(transparent)]
    Clone(#[from] CloneError),
    /// Talking to a clone's agent failed.
    #[error("clone {id}: {source}")]
    Agent {
        /// Clone id.
        id: String,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// The private state directory.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Measuring a clone's network failed.
    #[error(transparent)]
    Net(#[from] ProbeError),
    /// Something measured is not what it should be.
    #[error("{0}")]
    Failed(String),
    /// SIGINT or SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CloneBenchOptions {
    /// Image and VM shape of the master (`memory_mib`: its RAM).
    pub spec: VmSpec,
    /// How long a cold boot may take to reach the agent.
    pub boot_timeout: Duration,
    /// Clones started one after another, and clones started in parallel.
    pub count: usize,
    /// Clones brought up at once (parallel rate and density).
    pub parallel: usize,
    /// Warm-up shell command (`sh -c`); empty for none.
    pub warmup: String,
    /// Also time QEMU's save/restore.
    pub peer_qemu: bool,
    /// Also fill the host with clones.
    pub density: bool,
    /// `--density` stops at this many clones.
    pub density_limit: usize,
    /// `--density` stops when more clones than this failed to start.
    pub density_max_failures: usize,
    /// `--density` stops starting clones after this long.
    pub density_time: Duration,
    /// Clone starts of the stress run (`--starts`, 0: none): `parallel`
    /// at a time, each killed once it answered, while two other clones
    /// keep the CPU busy.
    pub starts: usize,
    /// RAM of the second master, MiB (0: skip it).
    pub big_memory_mib: u64,
    /// How long the idle clone's CPU time is measured.
    pub idle_window: Duration,
    /// Jail the VMMs (`--no-jail`: not; the comparison runs both anyway).
    pub jail: bool,
    /// Give the master a NIC and each clone a network (`--no-net`: not).
    pub net: bool,
    /// Clones of the main run reset their vsock transport and connect
    /// anew instead of taking over the master's carried agent connection
    /// (`--connection reset`).
    pub vsock_reset: bool,
    /// Also start `count` clones each way, in turn, and compare them.
    pub compare_connection: bool,
}

/// Clones of the master whose memory file was dropped from the page cache
/// right before (what a host sees after a restart), and clones with it in
/// the cache, in turn.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ColdCache {
    /// KiB of the memory file allocated (what the master touched).
    pub file_allocated_kib: u64,
    /// KiB of it still in the page cache after each drop.
    pub resident_kib_after_drop: Vec<u64>,
    /// Clones started right after the drop.
    pub cold: Vec<CloneSample>,
    /// Clones started with the file in the cache.
    pub warm: Vec<CloneSample>,
}

/// Clones of the same master started in turn taking over the carried
/// agent connection and resetting the transport (`--compare-connection`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectionComparison {
    /// Clones that took over the carried connection.
    pub carry: Vec<CloneSample>,
    /// Clones that reset the transport and connected anew.
    pub reset: Vec<CloneSample>,
}

/// Clones of the same master started in turn with their jail and network
/// and with neither: what confinement adds to the clone path.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Confinement {
    /// Whether the "with" clones had networks (the master has a NIC).
    pub net: bool,
    /// Jailed (and networked) clones.
    pub with: Vec<CloneSample>,
    /// Jailed clones without a network.
    pub jail_only: Vec<CloneSample>,
    /// Clones with no jail and no network.
    pub without: Vec<CloneSample>,
}

/// A networked clone's network, measured from the host through a
/// published port on 127.0.0.1 (DNAT) and directly to the clone's address,
/// in turn, against the agent's TCP test server.
#[derive(Debug, Clone, Serialize)]
pub struct NetResult {
    /// The host port published to the clone.
    pub host_port: u16,
    /// The guest port the test server listens on.
    pub guest_port: u16,
    /// Each transfer stopped after this many bytes...
    pub transfer_limit_bytes: u64,
    /// ...or after this many seconds.
    pub transfer_limit_s: f64,
    /// Host -> clone (into the sink), through the published port.
    pub upload: Vec<Transfer>,
    /// Clone -> host (from the source), through the published port.
    pub download: Vec<Transfer>,
    /// Host -> clone, to the clone's address.
    pub upload_direct: Vec<Transfer>,
    /// Clone -> host, to the clone's address.
    pub download_direct: Vec<Transfer>,
    /// Size of each request and of its answer.
    pub request_bytes: usize,
    /// Connect, send a request, read its echo: ms each, published port.
    pub request_ms: Vec<f64>,
    /// The same, to the clone's address.
    pub request_ms_direct: Vec<f64>,
    /// A request and its echo on one open connection: ms each, published port.
    pub round_trip_ms: Vec<f64>,
    /// The same, to the clone's address.
    pub round_trip_ms_direct: Vec<f64>,
}

/// MB/s over all of `v`: its bytes over its time.
fn mb_s(v: &[Transfer]) -> Option<f64> {
    let bytes: u64 = v.iter().map(|t| t.bytes).sum();
    let secs: f64 = v.iter().map(|t| t.secs).sum();
    (secs > 0.0).then(|| bytes as f64 / secs / 1e6)
}

/// One clone started on its own.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloneSample {
    /// Spawn → the VMM's `main` ran.
    pub started_ms: Option<f64>,
    /// Spawn → vCPUs resumed the guest.
    pub running_ms: Option<f64>,
    /// Spawn → the agent took the clone's identity.
    pub identity_ms: f64,
    /// Spawn → the agent answered a ping.
    pub ready_ms: f64,
    /// Ping answered → `exec true` answered (0 when not measured).
    pub exec_true_ms: f64,
    /// Wall time of the whole `clone::start` call.
    pub start_call_ms: f64,
    /// Private memory of the VMM after `exec true`, KiB.
    pub private_kib_after_exec: Option<u64>,
    /// Guest pages copied (anonymous) after `exec true`, KiB.
    pub guest_copied_kib_after_exec: Option<u64>,
    /// The vsock device's steps to the first answer, ms since the spawn.
    pub steps: StepsMs,
}

/// A clone's vsock steps ([`host::vmm::VsockSteps`]), ms since its spawn.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepsMs {
    /// The transport reset was posted (reset path).
    pub reset_posted_ms: Option<f64>,
    /// The guest handled it (reset path).
    pub reset_acked_ms: Option<f64>,
    /// The host took over the carried connection (carry path).
    pub carried_ms: Option<f64>,
    /// A connection request went to the guest (reset path).
    pub requested_ms: Option<f64>,
    /// The guest accepted it (reset path).
    pub accepted_ms: Option<f64>,
    /// The first host data (the identity) went to the guest.
    pub first_rx_ms: Option<f64>,
    /// The first guest data came back.
    pub first_tx_ms: Option<f64>,
    /// Interrupts raised until then.
    pub irqs: u32,
    /// Interrupts raised again by the watchdog.
    pub irqs_reraised: u32,
    /// How long the guest took for each part of the identity (µs, the
    /// guest's clock).
    pub identity: proto::IdentityTimings,
}

/// The cold boot of the master.
#[derive(Debug, Clone, Serialize)]
pub struct ColdSample {
    /// VMM spawn → agent ready.
    pub boot_ms: f64,
    /// The warm-up command (0 without one).
    pub warmup_ms: f64,
    /// `boot_ms + warmup_ms`: when a warmed VM could answer.
    pub ready_ms: f64,
}

/// Where a VMM process's memory is, from /proc/PID/smaps (KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryBreakdown {
    /// Private_Dirty, all mappings: what only this clone uses. (Guest
    /// pages it only read are the master's page cache: Private_Clean while
    /// no other clone happens to map them, shared as soon as one does.)
    pub private_kib: u64,
    /// Pss, all mappings.
    pub pss_kib: u64,
    /// Rss, all mappings.
    pub rss_kib: u64,
    /// Private_Dirty of the guest RAM mapping: the clone's copies of the
    /// master's pages (copy-on-write faults) and pages the master never had.
    pub guest_private_kib: u64,
    /// Resident pages of the guest RAM mapping (mostly the master's, shared).
    pub guest_rss_kib: u64,
    /// Private_Dirty of every other mapping: the VMM's own (heap, stacks,
    /// KVM's per-vCPU pages).
    pub vmm_private_kib: u64,
    /// Anonymous pages of the guest RAM mapping: the pages this clone
    /// copied (written after the restore).
    pub guest_anon_kib: u64,
    /// Anonymous pages of every other mapping (heap, stacks).
    pub vmm_anon_kib: u64,
}

/// An idle clone.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// Length of the CPU measurement.
    pub window_s: f64,
    /// utime + stime of the VMM over the window, clock ticks.
    pub cpu_ticks: u64,
    /// Clock ticks per second.
    pub clk_tck: u64,
    /// % of one host core.
    pub cpu_pct: f64,
    /// Memory when the window started.
    pub memory_start: MemoryBreakdown,
    /// Memory when the window ended.
    pub memory: MemoryBreakdown,
    /// RssAnon + RssFile + RssShmem from /proc/PID/status, at the end.
    pub status_rss: Option<(u64, u64, u64, u64)>,
    /// What woke the clone over the window, per second.
    pub wakeups: Option<IdleWakeups>,
}

/// What woke an idle clone, per second over the window: from two of its
/// VMM's [`Event::Wakeups`](proto::events::Event::Wakeups), asked for at
/// the window's start and end, and from the vCPU threads' voluntary
/// context switches (`/proc/PID/task/TID/status`) as a host-side check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleWakeups {
    /// Seconds between the two counts.
    pub window_s: f64,
    /// Wake-ups of the guest: its halts, each ended by one (KVM's
    /// `halt_exits`); the vCPU threads' voluntary context switches where
    /// KVM keeps no statistics.
    pub per_s: f64,
    /// The same wake-ups by cause: `guest_timer` (interrupts KVM injected
    /// that no device raised: the guest's own LAPIC timer),
    /// `irq_<device>` (interrupts the VMM's devices raised),
    /// `vmm_exit_<reason>` (exits to the VMM: MMIO, port I/O).
    pub by_cause: std::collections::BTreeMap<String, f64>,
    /// KVM woke a sleeping vCPU thread (`halt_wakeup`).
    pub halt_wakeups_per_s: Option<f64>,
    /// Exits of the guest to KVM, any reason.
    pub kvm_exits_per_s: Option<f64>,
    /// Voluntary context switches of the vCPU threads.
    pub vcpu_switches_per_s: Option<f64>,
}

impl IdleWakeups {
    /// Rates between two counts `dt_s` seconds apart; `switches` are the
    /// vCPU threads' voluntary context switches at both ends.
    fn between(
        a: &proto::events::WakeupCounts,
        b: &proto::events::WakeupCounts,
        dt_s: f64,
        switches: Option<(u64, u64)>,
    ) -> Self {
        let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt_s;
        let opt = |x: Option<u64>, y: Option<u64>| Some(rate(x?, y?));
        let mut by_cause = std::collections::BTreeMap::new();
        let mut device_total = 0.0;
        for (dev, &n) in &b.device_irqs {
            let r = rate(a.device_irqs.get(dev).copied().unwrap_or(0), n);
            device_total += r;
            by_cause.insert(format!("irq_{dev}"), r);
        }
        if let Some(injected) = opt(a.irq_injections, b.irq_injections) {
            by_cause.insert("guest_timer".into(), (injected - device_total).max(0.0));
        }
        for (reason, &n) in &b.vmm_exits {
            let r = rate(a.vmm_exits.get(reason).copied().unwrap_or(0), n);
            by_cause.insert(format!("vmm_exit_{reason}"), r);
        }
        let vcpu_switches_per_s = switches.map(|(x, y)| rate(x, y));
        IdleWakeups {
            window_s: dt_s,
            per_s: opt(a.halts, b.halts)
                .or(vcpu_switches_per_s)
                .unwrap_or(f64::NAN),
            by_cause,
            halt_wakeups_per_s: opt(a.halt_wakeups, b.halt_wakeups),
            kvm_exits_per_s: opt(a.kvm_exits, b.kvm_exits),
            vcpu_switches_per_s,
        }
    }

    /// `guest_timer 0.12, irq_rng 0.05, ...`: the non-zero causes, largest first.
    fn causes_line(&self) -> String {
        let mut c: Vec<(&String, &f64)> = self.by_cause.iter().filter(|(_, &v)| v > 0.0).collect();
        c.sort_by(|x, y| y.1.total_cmp(x.1));
        if c.is_empty() {
            return "none".into();
        }
        c.iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Asks the clone's VMM for its wake-up counts (through its pidfd) and
/// waits up to 2 s for the answer in its events file.
fn wakeup_counts(vmm: &host::vmm::VmmProcess) -> Option<(u64, proto::events::WakeupCounts)> {
    let seen = host::vmm::read_events(vmm.dir())
        .iter()
        .filter(|e| matches!(e, proto::events::Event::Wakeups { .. }))
        .count();
    let fd = vmm.pidfd()?;
    let signal = rustix::process::Signal::from_named_raw(proto::events::WAKEUPS_SIGNAL)?;
    rustix::process::pidfd_send_signal(fd, signal).ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let found = host::vmm::read_events(vmm.dir())
            .into_iter()
            .filter_map(|e| match e {
                proto::events::Event::Wakeups { t_us, counts } => Some((t_us, counts)),
                _ => None,
            })
            .nth(seen);
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// `0.123`, or `-` for a rate not measured.
fn fmt_rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.3}"))
}

/// Voluntary context switches of a VMM's vCPU threads (named `vcpuN`).
fn vcpu_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = None;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).ok()?;
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())?;
        total = Some(total.unwrap_or(0) + n);
    }
    total
}

/// Clones started in parallel.
#[derive(Debug, Clone, Serialize)]
pub struct ParallelResult {
    /// Clones at once.
    pub parallel: usize,
    /// Clones that answered.
    pub started: usize,
    /// Clones that failed.
    pub failed: usize,
    /// `clone::start` call → all answered.
    pub wall_ms: f64,
    /// Spawn → ping answered, each clone.
    pub ready_ms: Vec<f64>,
}

/// `--starts N`: clone starts, `parallel` at a time, each killed once it
/// answered, while another clone keeps a core busy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StressResult {
    /// Starts asked for.
    pub starts: usize,
    /// Clones started at once.
    pub parallel: usize,
    /// Clones that answered.
    pub answered: usize,
    /// Clones that did not (within their timeout) or failed.
    pub failed: usize,
    /// The first few failures.
    pub failures: Vec<String>,
    /// Spawn → ping answered, each clone that answered.
    pub ready_ms: Vec<f64>,
    /// Interrupts the vsock watchdog raised again, over every clone.
    pub interrupts_reraised: u64,
    /// Clones in which it fired.
    pub clones_with_reraise: usize,
    /// Wall time of the run.
    pub wall_ms: f64,
}

/// Clones spawned at once without waiting for their agents: the host's
/// side of creation.
#[derive(Debug, Clone, Serialize)]
pub struct BurstResult {
    /// Clones spawned.
    pub count: usize,
    /// Of those, how many had their vCPUs running within the timeout.
    pub running: usize,
    /// First spawn -> last clone's vCPUs running, ms.
    pub wall_ms: f64,
}

impl BurstResult {
    /// Clones per second brought to running.
    pub fn per_s(&self) -> f64 {
        self.running as f64 / (self.wall_ms / 1000.0)
    }
}

/// Clones of the big master.
#[derive(Debug, Clone, Serialize)]
pub struct BigResult {
    /// Its RAM, MiB.
    pub memory_mib: u64,
    /// Its cold boot to agent ready.
    pub boot_ms: f64,
    /// Its clones.
    pub clones: Vec<CloneSample>,
}

/// `--density`.
#[derive(Debug, Clone, Serialize)]
pub struct DensityResult {
    /// The limit asked for.
    pub limit: usize,
    /// Clones started.
    pub started: usize,
    /// Clones that answered the final ping.
    pub alive: usize,
    /// Clones that failed to start.
    pub failed: usize,
    /// Why the first of them failed.
    pub first_failure: Option<String>,
    /// Why no more clones were started.
    pub stop_reason: String,
    /// Sum of the clones' Pss, KiB.
    pub total_pss_kib: u64,
    /// Sum of the clones' private memory, KiB.
    pub total_private_kib: u64,
    /// Sum of the clones' anonymous memory (copied guest pages, heaps), KiB.
    pub total_anon_kib: u64,
    /// Host MemAvailable before the first clone, KiB.
    pub mem_available_before_kib: u64,
    /// Host MemAvailable with every clone alive, KiB.
    pub mem_available_after_kib: u64,
    /// Spawn → ping answered, each clone, in start order.
    pub ready_ms: Vec<f64>,
    /// Starting all of them.
    pub start_wall_ms: f64,
    /// Pinging all of them.
    pub ping_wall_ms: f64,
    /// Killing all of them.
    pub kill_wall_ms: f64,
    /// VMM processes of the run still there once the kill returned.
    pub vmms_left: usize,
}

/// Results of `zygote bench clone`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloneReport {
    /// Master RAM, MiB.
    pub memory_mib: u64,
    /// Master vCPUs.
    pub vcpus: u8,
    /// The warm-up command.
    pub warmup: String,
    /// Disk blocks of the master's memory file (the pages it touched), KiB.
    pub master_allocated_kib: Option<u64>,
    /// The master's cold boot (one: each costs a whole boot).
    pub cold: Vec<ColdSample>,
    /// Clones started one after another.
    pub clones: Vec<CloneSample>,
    /// With and without jail and network, in turn.
    pub confinement: Option<Confinement>,
    /// A networked clone's throughput and request latency.
    pub net: Option<NetResult>,
    /// Clones started in parallel.
    pub parallel: Option<ParallelResult>,
    /// Clones spawned at once, to vCPUs running.
    pub burst: Option<BurstResult>,
    /// An idle clone.
    pub idle: Option<IdleResult>,
    /// Clones of the big master.
    pub big: Option<BigResult>,
    /// The same snapshot started as a fresh VMM process and as a `fork()`
    /// of a prepared one (µs, start -> vCPU 0 running), in turns.
    pub fork_vs_spawn: Option<crate::fork_bench::ForkBench>,
    /// QEMU restores.
    pub qemu: Option<Vec<QemuRestoreSample>>,
    /// `--density`.
    pub density: Option<DensityResult>,
    /// Whether the main run's clones reset the vsock transport
    /// (`--connection reset`) instead of taking over the carried agent
    /// connection.
    pub vsock_reset: bool,
    /// `--compare-connection`.
    pub connection: Option<ConnectionComparison>,
    /// Clones of a master whose memory file is not in the page cache.
    pub cold_cache: Option<ColdCache>,
    /// `--starts`.
    pub stress: Option<StressResult>,
    /// Optional parts that failed (the rest was measured).
    pub errors: Vec<String>,
}

// ---------------------------------------------------------------- /proc

/// utime + stime (clock ticks) from the text of /proc/PID/stat.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces; fields
    // after it start at field 3 (state): utime is field 14, stime 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of process `pid`, clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// `ticks` of CPU time over `wall`, as % of one core.
pub fn cpu_pct(ticks: u64, clk_tck: u64, wall: Duration) -> f64 {
    let wall = wall.as_secs_f64();
    if wall <= 0.0 || clk_tck == 0 {
        return 0.0;
    }
    ticks as f64 / clk_tck as f64 / wall * 100.0
}

/// A field of /proc/meminfo text, KiB.
pub fn parse_meminfo(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Host MemAvailable, KiB.
pub fn mem_available_kib() -> Option<u64> {
    parse_meminfo(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

fn is_mapping_header(line: &str) -> bool {
    let Some(range) = line.split_whitespace().next() else {
        return false;
    };
    let mut ends = range.splitn(2, '-');
    let hex = |s: Option<&str>| {
        s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    hex(ends.next()) && hex(ends.next())
}

/// Sorts the text of /proc/PID/smaps into guest RAM (the mapping of the file
/// `guest_ram`, known by its inode when given: a jailed VMM maps it under
/// another path, its jail's) and everything else.
pub fn parse_smaps(text: &str, guest_ram: &str, guest_inode: Option<u64>) -> MemoryBreakdown {
    let mut m = MemoryBreakdown::default();
    let mut guest = false;
    for line in text.lines() {
        if is_mapping_header(line) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.get(5..).unwrap_or_default().join(" ");
            let inode = fields.get(4).and_then(|i| i.parse::<u64>().ok());
            guest = (guest_inode.is_some() && inode == guest_inode)
                || (!guest_ram.is_empty() && path.trim_end_matches(" (deleted)") == guest_ram);
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(name), Some(value)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match name {
            "Rss:" => {
                m.rss_kib += kib;
                if guest {
                    m.guest_rss_kib += kib;
                }
            }
            "Pss:" => m.pss_kib += kib,
            "Anonymous:" => {
                if guest {
                    m.guest_anon_kib += kib;
                } else {
                    m.vmm_anon_kib += kib;
                }
            }
            "Private_Dirty:" => {
                m.private_kib += kib;
                if guest {
                    m.guest_private_kib += kib;
                } else {
                    m.vmm_private_kib += kib;
                }
            }
            _ => {}
        }
    }
    m
}

/// The memory of VMM `pid` whose guest RAM is the file `guest_ram`.
pub fn memory_of(pid: u32, guest_ram: &str) -> Option<MemoryBreakdown> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let inode = std::fs::metadata(guest_ram).ok().map(|m| m.ino());
    Some(parse_smaps(&text, guest_ram, inode))
}

/// KiB of the file at `path` in the page cache (`mincore` of a read-only
/// mapping of it).
pub fn resident_kib(path: &str) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len() as usize;
    if len == 0 {
        return Some(0);
    }
    // SAFETY: a fresh shared read-only mapping of a file this function
    // holds open; only `mincore` looks at it, and it is unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr..addr+len` is the mapping made above and `vec` has one
    // byte per page of it.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    (r == 0).then(|| vec.iter().filter(|b| **b & 1 != 0).count() as u64 * 4)
}

/// Drops the file at `path` from the page cache, as a host restart would:
/// this file's share of `echo 3 > /proc/sys/vm/drop_caches`, without
/// emptying the whole host's cache (its pages are clean: the master is
/// frozen and its file synced; pages a live clone maps stay). Returns the
/// KiB still resident.
pub fn evict_from_page_cache(path: &str) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: an advice call on an fd this function holds open.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return None;
    }
    resident_kib(path)
}

// ---------------------------------------------------------------- signals

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM stop the run at the next step (so that
/// everything it made is cleaned up) instead of killing this process.
pub fn install_interrupt_handler() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn check_interrupted() -> Result<(), CloneBenchError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(CloneBenchError::Interrupted)
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------- workspace

/// The run's private state root and the clones alive in it. Dropping it
/// kills every clone and removes the whole directory (masters included).
struct Workspace {
    root: PathBuf,
    store: Store,
    live: Vec<Started>,
}

impl Workspace {
    fn new() -> Result<Self, CloneBenchError> {
        let root = host::paths::runtime_root().join(format!("bench-clone-{}", std::process::id()));
        // A leftover of a killed run that had the same pid.
        let _ = std::fs::remove_dir_all(&root);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|source| CloneBenchError::Io {
                path: root.clone(),
                source,
            })?;
        Ok(Workspace {
            store: Store::at(root.clone()),
            root,
            live: Vec::new(),
        })
    }

    fn kill_live(&mut self) {
        let mut live = std::mem::take(&mut self.live);
        kill_clones(&self.store, &mut live);
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        self.kill_live();
        for rec in self.store.clones().into_iter().flatten() {
            let _ = host::clone::kill(&self.store, &rec.id);
        }
        // Masters with a NIC hold an address on the host's network.
        for m in self.store.masters().into_iter().flatten() {
            m.release_net();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        if let Some(parent) = self.root.parent() {
            // Only when empty: it may be the user's state root.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Kills clones (SIGKILL to all first, then reaps each) and removes their
/// files.
fn kill_clones(store: &Store, clones: &mut Vec<Started>) {
    for s in clones.iter() {
        if let Some(fd) = s.vmm.pidfd() {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
    }
    for mut s in clones.drain(..) {
        s.vmm.kill();
        let _ = host::clone::kill(store, &s.id);
    }
}

/// Raises this process's open-files limit to its hard limit: `--density`
/// holds a few descriptors per live clone (its agent connection, its
/// pidfd), more than the usual soft limit of 1024 at a few hundred clones.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit out/in pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// How many processes run with `dir` in their command line (the VMMs of
/// the run: a jailed one's argv[0] names its runtime directory).
fn vmms_of(dir: &Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = std::process::id().to_string();
    procs
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.bytes().all(|b| b.is_ascii_digit()) && name != me.as_str()
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .count()
}

fn ms_between(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1000.0
}

fn sample_of(s: &Started, start_call_ms: f64) -> CloneSample {
    let t = s.timeline();
    let at = |us: Option<u64>| t.ms_since_spawn(us);
    let v = &t.vsock;
    let steps = StepsMs {
        reset_posted_ms: at(v.reset_posted_us),
        reset_acked_ms: at(v.reset_acked_us),
        carried_ms: at(v.carried_us),
        requested_ms: at(v.requested_us),
        accepted_ms: at(v.accepted_us),
        first_rx_ms: at(v.first_rx_us),
        first_tx_ms: at(v.first_tx_us),
        irqs: v.irqs,
        irqs_reraised: v.irqs_reraised,
        identity: t.identity,
    };
    CloneSample {
        steps,
        started_ms: t.ms_since_spawn(t.started_us),
        running_ms: t.ms_since_spawn(t.vcpu_running_us),
        identity_ms: t.ms_since_spawn(t.identity_us).unwrap_or(f64::NAN),
        ready_ms: t.ms_since_spawn(t.ping_us).unwrap_or(f64::NAN),
        exec_true_ms: 0.0,
        start_call_ms,
        private_kib_after_exec: None,
        guest_copied_kib_after_exec: None,
    }
}

fn elapsed_ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn guest_ram_path(rec: &MasterRecord) -> String {
    let p = rec.snapshot.join(snapshotter::MEMORY_FILE);
    std::fs::canonicalize(&p)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

struct Ctx<'a> {
    ws: Workspace,
    opts: &'a CloneBenchOptions,
    progress: &'a mut dyn FnMut(&str),
}

impl Ctx<'_> {
    fn say(&mut self, msg: &str) {
        (self.progress)(msg);
    }

    fn clone_opts(&self, parallel: usize) -> CloneOptions {
        CloneOptions {
            detach: false,
            timeout: CLONE_TIMEOUT,
            parallel,
            limits: Default::default(),
            net: Default::default(),
            vsock_reset: self.opts.vsock_reset,
        }
    }

    /// Up to 5 clones each right after the master's memory file was
    /// dropped from the page cache, and as many with it cached, in turn.
    fn cold_cache(&mut self, guest_ram: &str) -> Result<ColdCache, CloneBenchError> {
        let mut c = ColdCache {
            file_allocated_kib: std::fs::metadata(guest_ram)
                .map(|m| m.blocks() * 512 / 1024)
                .unwrap_or(0),
            ..Default::default()
        };
        let n = self.opts.count.min(5);
        for i in 0..n {
            check_interrupted()?;
            self.ws.kill_live();
            let left = evict_from_page_cache(guest_ram).ok_or_else(|| {
                CloneBenchError::Failed(format!("cannot drop {guest_ram} from the page cache"))
            })?;
            c.resident_kib_after_drop.push(left);
            let cold = self.start_one(MASTER)?;
            self.ws.kill_live();
            let warm = self.start_one(MASTER)?;
            self.ws.kill_live();
            self.say(&format!(
                "cold cache {}/{n}: {left} KiB left cached; ping answered +{:.1} ms cold, +{:.1} ms cached",
                i + 1,
                cold.ready_ms,
                warm.ready_ms
            ));
            c.cold.push(cold);
            c.warm.push(warm);
        }
        Ok(c)
    }

    /// `count` clones taking over the carried agent connection and as
    /// many resetting the transport, in turn (so drift hits both alike).
    fn connection_comparison(&mut self) -> Result<ConnectionComparison, CloneBenchError> {
        let mut c = ConnectionComparison::default();
        let n = self.opts.count;
        for i in 0..n {
            for reset in [false, true] {
                check_interrupted()?;
                let mut opts = self.clone_opts(1);
                opts.vsock_reset = reset;
                let s = self.start_with(MASTER, &opts)?;
                self.ws.kill_live();
                if reset {
                    c.reset.push(s);
                } else {
                    c.carry.push(s);
                }
            }
            let (a, b) = (&c.carry[i], &c.reset[i]);
            self.say(&format!(
                "connection {}/{n}: ping answered, carried +{:.1} ms, reset +{:.1} ms",
                i + 1,
                a.ready_ms,
                b.ready_ms
            ));
        }
        Ok(c)
    }

    /// `count` clones of the master with a jail and a network, as many
    /// with a jail only, and as many with neither, in turn (so drift hits
    /// all alike).
    fn confinement(&mut self) -> Result<Confinement, CloneBenchError> {
        let mut c = Confinement {
            net: self.opts.net,
            ..Default::default()
        };
        let master = self
            .ws
            .store
            .master(MASTER)
            .map_err(|e| CloneBenchError::Failed(e.to_string()))?;
        for i in 0..self.opts.count {
            for (jail, net) in [(true, true), (true, false), (false, false)] {
                check_interrupted()?;
                let owner = host::clone::Ownership {
                    jail: Some(jail),
                    net: host::vmnet::NetRequest {
                        disabled: !net,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let t = Instant::now();
                let s = host::clone::spawn(&self.ws.store, &master, false, &owner)
                    .and_then(|s| host::clone::handshake(s, CLONE_TIMEOUT))
                    .map_err(|e| CloneBenchError::Failed(e.to_string()))?;
                let sample = sample_of(&s, elapsed_ms(t));
                self.ws.live.push(s);
                self.ws.kill_live();
                match (jail, net) {
                    (true, true) => c.with.push(sample),
                    (true, false) => c.jail_only.push(sample),
                    _ => c.without.push(sample),
                }
            }
            self.say(&format!(
                "confinement {}/{}: running +{:.1} ms jailed vs +{:.1} ms bare",
                i + 1,
                self.opts.count,
                c.with.last().and_then(|s| s.running_ms).unwrap_or(f64::NAN),
                c.without
                    .last()
                    .and_then(|s| s.running_ms)
                    .unwrap_or(f64::NAN)
            ));
        }
        Ok(c)
    }

    /// One networked clone with a published port, its agent's TCP test
    /// server started: throughput each way and request latency, through
    /// the published port on 127.0.0.1 and directly to its address, in
    /// turn (so drift hits both alike).
    fn network(&mut self) -> Result<NetResult, CloneBenchError> {
        let master = self
            .ws
            .store
            .master(MASTER)
            .map_err(|e| CloneBenchError::Failed(e.to_string()))?;
        let host_port = free_host_port()?;
        let owner = host::clone::Ownership {
            jail: Some(self.opts.jail),
            net: host::vmnet::NetRequest {
                publish: vec![host::net::Publish {
                    host_port,
                    guest_port: NET_GUEST_PORT,
                    protocol: host::net::Protocol::Tcp,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let s = host::clone::spawn(&self.ws.store, &master, false, &owner)
            .and_then(|s| host::clone::handshake(s, CLONE_TIMEOUT))
            .map_err(|e| CloneBenchError::Failed(e.to_string()))?;
        let (id, uds) = (s.id.clone(), s.vmm.vsock_path());
        let address = s.net.as_ref().map(|a| a.identity.address);
        self.ws.live.push(s);
        let address =
            address.ok_or_else(|| CloneBenchError::Failed(format!("clone {id} has no network")))?;
        let guest_port = start_net_test(&id, &uds, NET_GUEST_PORT)?;
        let published = Probe {
            addr: (std::net::Ipv4Addr::LOCALHOST, host_port).into(),
        };
        let direct = Probe {
            addr: (address, guest_port).into(),
        };
        self.say(&format!(
            "network: clone {id}, test server on port {guest_port}, published as {}, direct {}",
            published.addr, direct.addr
        ));
        let mut r = NetResult {
            host_port,
            guest_port,
            transfer_limit_bytes: NET_TRANSFER_BYTES,
            transfer_limit_s: NET_TRANSFER_TIME.as_secs_f64(),
            upload: Vec::new(),
            download: Vec::new(),
            upload_direct: Vec::new(),
            download_direct: Vec::new(),
            request_bytes: NET_REQUEST_BYTES,
            request_ms: Vec::new(),
            request_ms_direct: Vec::new(),
            round_trip_ms: Vec::new(),
            round_trip_ms_direct: Vec::new(),
        };
        for p in [&published, &direct] {
            p.requests(NET_WARMUP_REQUESTS, NET_REQUEST_BYTES, NET_REQUEST_TIME)?;
        }
        let t = Instant::now();
        while r.request_ms.len() < NET_REQUESTS && t.elapsed() < NET_REQUEST_TIME {
            check_interrupted()?;
            for (p, v) in [
                (&published, &mut r.request_ms),
                (&direct, &mut r.request_ms_direct),
            ] {
                let n = NET_REQUEST_BATCH.min(NET_REQUESTS - v.len());
                v.extend(p.requests(n, NET_REQUEST_BYTES, NET_REQUEST_TIME)?);
            }
        }
        for (p, v) in [
            (&published, &mut r.round_trip_ms),
            (&direct, &mut r.round_trip_ms_direct),
        ] {
            check_interrupted()?;
            *v = p.round_trips(NET_REQUESTS, NET_REQUEST_BYTES, NET_REQUEST_TIME)?;
        }
        let p50 = |v: &[f64]| p50(v.iter().copied()).unwrap_or(f64::NAN);
        self.say(&format!(
            "network: {NET_REQUEST_BYTES} B request on a new connection p50 {:.2} ms published, {:.2} ms direct; on one connection {:.2} ms, {:.2} ms",
            p50(&r.request_ms),
            p50(&r.request_ms_direct),
            p50(&r.round_trip_ms),
            p50(&r.round_trip_ms_direct)
        ));
        for _ in 0..NET_TRANSFER_ROUNDS {
            check_interrupted()?;
            r.upload
                .push(published.upload(NET_TRANSFER_BYTES, NET_TRANSFER_TIME)?);
            r.upload_direct
                .push(direct.upload(NET_TRANSFER_BYTES, NET_TRANSFER_TIME)?);
            r.download
                .push(published.download(NET_TRANSFER_BYTES, NET_TRANSFER_TIME)?);
            r.download_direct
                .push(direct.download(NET_TRANSFER_BYTES, NET_TRANSFER_TIME)?);
        }
        let f = |v: &[Transfer]| mb_s(v).unwrap_or(f64::NAN);
        self.say(&format!(
            "network: host -> clone {:.1} MB/s published, {:.1} MB/s direct; clone -> host {:.1} MB/s, {:.1} MB/s",
            f(&r.upload),
            f(&r.upload_direct),
            f(&r.download),
            f(&r.download_direct)
        ));
        self.ws.kill_live();
        Ok(r)
    }

    fn make_master(
        &mut self,
        name: &str,
        memory_mib: u64,
        warmup: Option<String>,
        boot_timeout: Duration,
    ) -> Result<MasterRecord, CloneBenchError> {
        let mut spec = self.opts.spec.clone();
        spec.memory_mib = memory_mib;
        spec.runtime_root = Some(self.ws.root.join("vm"));
        let create = CreateOptions {
            name: name.to_string(),
            spec,
            warmup,
            boot_timeout,
            warmup_timeout: Duration::from_secs(600),
            tenant: None,
            display_name: None,
            labels: Default::default(),
            net: (self.opts.net && name == MASTER).then(Default::default),
        };
        let store = self.ws.store.clone();
        let progress = &mut *self.progress;
        let rec = host::master::create(&store, &create, &mut std::io::sink(), &mut |_, m| {
            progress(&format!("master {name} ({memory_mib} MiB): {m}"))
        })
        .map_err(|source| CloneBenchError::Master {
            name: name.to_string(),
            source,
        })?;
        check_interrupted()?;
        Ok(rec)
    }

    /// Starts one clone of `master` on its own; it stays in `ws.live`.
    fn start_one(&mut self, master: &str) -> Result<CloneSample, CloneBenchError> {
        self.start_with(master, &self.clone_opts(1))
    }

    /// [`Ctx::start_one`] with these options.
    fn start_with(
        &mut self,
        master: &str,
        opts: &CloneOptions,
    ) -> Result<CloneSample, CloneBenchError> {
        let t = Instant::now();
        let mut results = start_guarded(&self.ws.store, master, 1, opts)?;
        let call_ms = elapsed_ms(t);
        let mut s = results
            .pop()
            .ok_or_else(|| CloneBenchError::Failed("clone::start returned nothing".into()))??;
        // The VMM reports the device's last step right after it passed the
        // answer on: give it a moment to land in the events file.
        let until = Instant::now() + Duration::from_millis(100);
        while s.vmm.poll().is_none()
            && s.timeline().vsock.first_tx_us.is_none()
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let sample = sample_of(&s, call_ms);
        self.ws.live.push(s);
        Ok(sample)
    }

    fn exec_true(&mut self) -> Result<f64, CloneBenchError> {
        let s = self.ws.live.last_mut().expect("a live clone");
        let mut req = ExecRequest::new(["true"]);
        req.timeout_ms = Some(EXEC_TIMEOUT_MS);
        let t = Instant::now();
        let (status, _, _) =
            s.agent
                .exec_collect(req)
                .map_err(|source| CloneBenchError::Agent {
                    id: s.id.clone(),
                    source,
                })?;
        let ms = elapsed_ms(t);
        if !status.success() {
            return Err(CloneBenchError::Failed(format!(
                "clone {}: `true` failed: {status:?}",
                s.id
            )));
        }
        Ok(ms)
    }

    fn sequential(&mut self, guest_ram: &str) -> Result<Vec<CloneSample>, CloneBenchError> {
        let n = self.opts.count;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            check_interrupted()?;
            let mut sample = self.start_one(MASTER)?;
            sample.exec_true_ms = self.exec_true()?;
            let pid = self.ws.live.last().map(|s| s.pid()).unwrap_or(0);
            let mem = memory_of(pid, guest_ram);
            sample.private_kib_after_exec = mem.map(|m| m.private_kib);
            sample.guest_copied_kib_after_exec = mem.map(|m| m.guest_anon_kib);
            self.ws.kill_live();
            self.say(&format!(
                "clone {}/{n}: vCPUs running +{:.1} ms, identity +{:.1} ms, ping +{:.1} ms, then `exec true` {:.0} ms",
                i + 1,
                sample.running_ms.unwrap_or(f64::NAN),
                sample.identity_ms,
                sample.ready_ms,
                sample.exec_true_ms
            ));
            out.push(sample);
        }
        Ok(out)
    }

    fn idle(&mut self, guest_ram: &str) -> Result<IdleResult, CloneBenchError> {
        check_interrupted()?;
        self.start_one(MASTER)?;
        let pid = self.ws.live.last().map(|s| s.pid()).unwrap_or(0);
        let window = self.opts.idle_window;
        self.say(&format!(
            "idle clone: settling {:.0} s, then measuring CPU for {:.0} s",
            IDLE_SETTLE.as_secs_f64(),
            window.as_secs_f64()
        ));
        std::thread::sleep(IDLE_SETTLE);
        let memory_start = memory_of(pid, guest_ram).unwrap_or_default();
        let vmm = &self.ws.live.last().expect("a live clone").vmm;
        let w0 = wakeup_counts(vmm);
        let s0 = vcpu_switches(pid);
        let t0 = Instant::now();
        let c0 = cpu_ticks(pid);
        let deadline = t0 + window;
        while Instant::now() < deadline {
            check_interrupted()?;
            std::thread::sleep(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200)),
            );
        }
        let c1 = cpu_ticks(pid);
        let wall = t0.elapsed();
        let s1 = vcpu_switches(pid);
        let vmm = &self.ws.live.last().expect("a live clone").vmm;
        let wakeups = match (w0, wakeup_counts(vmm)) {
            (Some((ta, a)), Some((tb, b))) if tb > ta => Some(IdleWakeups::between(
                &a,
                &b,
                (tb - ta) as f64 / 1e6,
                s0.zip(s1),
            )),
            _ => None,
        };
        let memory = memory_of(pid, guest_ram).unwrap_or_default();
        let status_rss = host::procfs::rss(pid).map(|r| (r.total, r.anon, r.file, r.shmem));
        let (Some(c0), Some(c1)) = (c0, c1) else {
            return Err(CloneBenchError::Failed(
                "idle clone: cannot read its /proc/PID/stat (did it end?)".into(),
            ));
        };
        self.ws.kill_live();
        let tck = clk_tck();
        let ticks = c1.saturating_sub(c0);
        Ok(IdleResult {
            window_s: wall.as_secs_f64(),
            cpu_ticks: ticks,
            clk_tck: tck,
            cpu_pct: cpu_pct(ticks, tck, wall),
            memory_start,
            memory,
            status_rss,
            wakeups,
        })
    }

    fn parallel(&mut self) -> Result<ParallelResult, CloneBenchError> {
        check_interrupted()?;
        let (n, k) = (self.opts.count, self.opts.parallel.max(1));
        let t = Instant::now();
        let results = start_guarded(&self.ws.store, MASTER, n, &self.clone_opts(k))?;
        let wall_ms = elapsed_ms(t);
        let mut out = ParallelResult {
            parallel: k,
            started: 0,
            failed: 0,
            wall_ms,
            ready_ms: Vec::new(),
        };
        let mut first_error = None;
        for r in results {
            match r {
                Ok(s) => {
                    out.started += 1;
                    out.ready_ms.push(sample_of(&s, 0.0).ready_ms);
                    self.ws.live.push(s);
                }
                Err(e) => {
                    out.failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        self.ws.kill_live();
        if let Some(e) = first_error {
            self.say(&format!("parallel: {} clone(s) failed: {e}", out.failed));
        }
        if out.started == 0 {
            return Err(CloneBenchError::Failed("parallel: no clone started".into()));
        }
        Ok(out)
    }

    /// `--starts`: see [`StressResult`].
    fn stress(&mut self) -> Result<StressResult, CloneBenchError> {
        check_interrupted()?;
        let (n, k) = (self.opts.starts, self.opts.parallel.max(1));
        // The busy clone: a spin loop in its guest, detached from the exec.
        self.start_one(MASTER)?;
        let busy = self.ws.live.last_mut().expect("the busy clone");
        let mut req = ExecRequest::new([
            "sh",
            "-c",
            "sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 &",
        ]);
        req.timeout_ms = Some(EXEC_TIMEOUT_MS);
        busy.agent
            .exec_collect(req)
            .map_err(|source| CloneBenchError::Agent {
                id: busy.id.clone(),
                source,
            })?;
        let mut out = StressResult {
            starts: n,
            parallel: k,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut done = 0;
        while done < n {
            check_interrupted()?;
            let batch = k.min(n - done);
            done += batch;
            let results = start_guarded(&self.ws.store, MASTER, batch, &self.clone_opts(k))?;
            let mut started = Vec::new();
            for r in results {
                match r {
                    Ok(s) => started.push(s),
                    Err(e) => {
                        out.failed += 1;
                        self.say(&format!("starts: a clone failed: {e}"));
                        if out.failures.len() < 10 {
                            out.failures.push(e.to_string());
                        }
                    }
                }
            }
            for s in &mut started {
                s.vmm.poll();
                let t = s.timeline();
                out.ready_ms.push(sample_of(s, 0.0).ready_ms);
                let re = t.vsock.irqs_reraised;
                out.interrupts_reraised += u64::from(re);
                out.clones_with_reraise += usize::from(re > 0);
                out.answered += 1;
            }
            kill_clones(&self.ws.store, &mut started);
            if done % 50 < k || done == n {
                self.say(&format!(
                    "starts: {done}/{n} after {:.0} s, {} failed, {} interrupts raised again",
                    t0.elapsed().as_secs_f64(),
                    out.failed,
                    out.interrupts_reraised
                ));
            }
        }
        out.wall_ms = elapsed_ms(t0);
        self.ws.kill_live();
        Ok(out)
    }

    fn burst(&mut self) -> Result<BurstResult, CloneBenchError> {
        check_interrupted()?;
        let n = BURST;
        let r = host::clone::spawn_burst(&self.ws.store, MASTER, n, Duration::from_secs(60))
            .map_err(|e| CloneBenchError::Failed(format!("burst: {e}")));
        let clones = r?;
        for c in &clones {
            let _ = host::clone::kill(&self.ws.store, &c.id);
        }
        let first = clones.iter().map(|c| c.spawn_us).min().unwrap_or(0);
        let last = clones
            .iter()
            .filter_map(|c| c.running_us)
            .max()
            .unwrap_or(first);
        let running = clones.iter().filter(|c| c.running_us.is_some()).count();
        Ok(BurstResult {
            count: n,
            running,
            wall_ms: ms_between(first, last).max(0.001),
        })
    }

    fn big(&mut self) -> Result<BigResult, CloneBenchError> {
        let mib = self.opts.big_memory_mib;
        // The guest's early memory setup grows with its RAM.
        let timeout = self
            .opts
            .boot_timeout
            .max(Duration::from_secs(60 + mib / 4));
        let rec = self.make_master(BIG_MASTER, mib, None, timeout)?;
        let mut clones = Vec::new();
        for i in 0..BIG_CLONES {
            check_interrupted()?;
            let s = self.start_one(BIG_MASTER)?;
            self.ws.kill_live();
            self.say(&format!(
                "{mib} MiB master, clone {}/{BIG_CLONES}: vCPUs running +{:.1} ms, ping +{:.1} ms",
                i + 1,
                s.running_ms.unwrap_or(f64::NAN),
                s.ready_ms
            ));
            clones.push(s);
        }
        let _ = host::master::remove(&self.ws.store, BIG_MASTER, true);
        Ok(BigResult {
            memory_mib: mib,
            boot_ms: rec.boot_ms.unwrap_or(0.0),
            clones,
        })
    }

    fn density(&mut self) -> Result<DensityResult, CloneBenchError> {
        let limit = self.opts.density_limit;
        let k = self.opts.parallel.max(1);
        let before = mem_available_kib().unwrap_or(0);
        let t0 = Instant::now();
        let mut ready_ms = Vec::new();
        let mut clones: Vec<Started> = Vec::new();
        let mut last_report = 0;
        let mut failed = 0;
        let mut first_failure = None;
        let stop_reason = loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break "interrupted".to_string();
            }
            if clones.len() >= limit {
                break format!("reached --density-limit {limit}");
            }
            if t0.elapsed() >= self.opts.density_time {
                break format!(
                    "time limit: {:.0} s of starting clones (--density-time)",
                    self.opts.density_time.as_secs_f64()
                );
            }
            let avail = mem_available_kib().unwrap_or(u64::MAX);
            if avail < DENSITY_MIN_AVAILABLE_KIB {
                break format!(
                    "host MemAvailable {} MiB < {} MiB",
                    avail >> 10,
                    DENSITY_MIN_AVAILABLE_KIB >> 10
                );
            }
            let batch = k.min(limit - clones.len());
            let results = match start_guarded(&self.ws.store, MASTER, batch, &self.clone_opts(k)) {
                Ok(r) => r,
                Err(e) => break format!("clone start failed: {e}"),
            };
            let mut failure = None;
            for r in results {
                match r {
                    Ok(s) => {
                        ready_ms.push(sample_of(&s, 0.0).ready_ms);
                        clones.push(s);
                    }
                    Err(e) => {
                        failed += 1;
                        self.say(&format!("density: a clone failed to start: {e}"));
                        failure.get_or_insert(format!("a clone failed to start: {e}"));
                        first_failure.get_or_insert(e.to_string());
                    }
                }
            }
            if failed <= self.opts.density_max_failures {
                failure = None;
            }
            if clones.len() >= last_report + 50 || failure.is_some() {
                last_report = clones.len();
                let last = &ready_ms[ready_ms.len().saturating_sub(batch)..];
                self.say(&format!(
                    "density: {} clones alive after {:.0} s, last batch ready in {:.0}-{:.0} ms, MemAvailable {} MiB",
                    clones.len(),
                    t0.elapsed().as_secs_f64(),
                    last.iter().copied().fold(f64::INFINITY, f64::min),
                    last.iter().copied().fold(0.0, f64::max),
                    mem_available_kib().unwrap_or(0) >> 10
                ));
            }
            if let Some(f) = failure {
                break f;
            }
        };
        let start_wall_ms = elapsed_ms(t0);
        let started = clones.len();
        self.say(&format!(
            "density: stopped at {started} clones ({stop_reason}); pinging each"
        ));
        let after = mem_available_kib().unwrap_or(0);
        let (mut pss, mut private, mut anon) = (0, 0, 0);
        for s in &clones {
            anon += host::procfs::smaps_rollup(s.pid(), "Anonymous").unwrap_or(0);
            pss += host::procfs::smaps_rollup(s.pid(), "Pss").unwrap_or(0);
            private += host::procfs::smaps_rollup(s.pid(), "Private_Dirty").unwrap_or(0);
        }
        let t = Instant::now();
        let alive = ping_all(&mut clones, PING_THREADS, DENSITY_PING_LIMIT);
        let ping_wall_ms = elapsed_ms(t);
        self.say(&format!(
            "density: {alive}/{started} answered in {:.0} ms; killing them",
            ping_wall_ms
        ));
        let t = Instant::now();
        kill_clones(&self.ws.store, &mut clones);
        let kill_wall_ms = elapsed_ms(t);
        let vmms_left = vmms_of(&self.ws.root);
        if vmms_left > 0 {
            self.say(&format!(
                "density: {vmms_left} VMMs still run after the kill"
            ));
        }
        Ok(DensityResult {
            limit,
            started,
            alive,
            failed,
            first_failure,
            stop_reason,
            total_pss_kib: pss,
            total_private_kib: private,
            total_anon_kib: anon,
            mem_available_before_kib: before,
            mem_available_after_kib: after,
            ready_ms,
            start_wall_ms,
            ping_wall_ms,
            kill_wall_ms,
            vmms_left,
        })
    }
}

/// How long past its own timeout a `clone::start` call may run before its
/// clones are killed.
const START_GRACE: Duration = Duration::from_secs(15);

/// `clone::start`, but a call that runs past `opts.timeout` (per batch) has
/// the VMMs it started killed, which ends whatever read it is blocked in:
/// a clone whose guest accepts the vsock connection but never says hello
/// would otherwise hold the handshake forever.
fn start_guarded(
    store: &Store,
    master: &str,
    count: usize,
    opts: &CloneOptions,
) -> Result<Vec<Result<Started, CloneError>>, CloneError> {
    let before: std::collections::HashSet<String> =
        store.clones().into_iter().flatten().map(|c| c.id).collect();
    let batches = count.div_ceil(opts.parallel.max(1)).max(1) as u32;
    let limit = (opts.timeout + START_GRACE) * batches;
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let before = &before;
        scope.spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                for c in store.clones().into_iter().flatten() {
                    if c.master == master && !before.contains(&c.id) {
                        host::vmm::kill_process(c.pid, c.pid_start);
                    }
                }
            }
        });
        let r = host::clone::start(store, master, count, opts);
        drop(tx);
        r
    })
}

/// A TCP port no one on the host holds now (the kernel's pick).
fn free_host_port() -> Result<u16, CloneBenchError> {
    let io = |source| CloneBenchError::Io {
        path: PathBuf::from("0.0.0.0:0"),
        source,
    };
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).map_err(io)?;
    Ok(l.local_addr().map_err(io)?.port())
}

/// Starts the agent's TCP test server on `port` of clone `id`, over a
/// connection of its own to the agent at `uds`; returns the port it
/// listens on.
fn start_net_test(id: &str, uds: &Path, port: u16) -> Result<u16, CloneBenchError> {
    let agent = |source| CloneBenchError::Agent {
        id: id.to_string(),
        source,
    };
    let started = AgentClient::connect(uds).and_then(|mut c| {
        c.set_read_timeout(Some(CLONE_TIMEOUT))?;
        c.net_test(port)
    });
    match started {
        Err(AgentError::Remote { code, message })
            if code == ErrorCode::InvalidRequest && message.contains("unknown variant") =>
        {
            Err(CloneBenchError::Failed(format!(
                "clone {id}: its agent predates the net_test request: rebuild the guest initramfs (scripts/setup)"
            )))
        }
        r => r.map_err(agent),
    }
}

/// Pings every clone over its open connection, `threads` at a time; clones
/// that have not answered within `limit` are killed (which ends their
/// pings). Returns how many answered.
fn ping_all(clones: &mut [Started], threads: usize, limit: Duration) -> usize {
    if clones.is_empty() {
        return 0;
    }
    let answered: Vec<AtomicBool> = clones.iter().map(|_| AtomicBool::new(false)).collect();
    let pids: Vec<u32> = clones.iter().map(|s| s.pid()).collect();
    let chunk = clones.len().div_ceil(threads.max(1));
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let (answered, pids) = (&answered, &pids);
        scope.spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                for (i, pid) in pids.iter().enumerate() {
                    if !answered[i].load(Ordering::SeqCst) {
                        // SAFETY: kill(2) on the pid of a child we have not reaped.
                        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
                    }
                }
            }
        });
        let workers: Vec<_> = clones
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, part)| {
                scope.spawn(move || {
                    for (j, s) in part.iter_mut().enumerate() {
                        if s.agent.ping().is_ok() {
                            answered[c * chunk + j].store(true, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        drop(tx);
    });
    answered.iter().filter(|a| a.load(Ordering::SeqCst)).count()
}

/// Runs the whole benchmark. Optional parts that fail (QEMU peer, big
/// master, density) are noted in [`CloneReport::errors`]; the rest stops
/// the run. Everything it made is gone when it returns.
pub fn bench_clone(
    opts: &CloneBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<CloneReport, CloneBenchError> {
    if opts.count == 0 {
        return Err(CloneBenchError::Failed("--count must be at least 1".into()));
    }
    if opts.density {
        raise_open_files_limit();
    }
    let ws = Workspace::new()?;
    let mut ctx = Ctx { ws, opts, progress };
    let mut report = CloneReport {
        memory_mib: opts.spec.memory_mib,
        vcpus: opts.spec.vcpus,
        warmup: opts.warmup.clone(),
        vsock_reset: opts.vsock_reset,
        ..Default::default()
    };

    // 1. The master: the one cold boot.
    let warmup = (!opts.warmup.trim().is_empty()).then(|| opts.warmup.clone());
    let rec = ctx.make_master(MASTER, opts.spec.memory_mib, warmup, opts.boot_timeout)?;
    let boot_ms = rec.boot_ms.unwrap_or(0.0);
    let warmup_ms = rec.warmup_ms.unwrap_or(0.0);
    report.cold.push(ColdSample {
        boot_ms,
        warmup_ms,
        ready_ms: boot_ms + warmup_ms,
    });
    let guest_ram = guest_ram_path(&rec);
    report.master_allocated_kib = std::fs::metadata(&guest_ram)
        .ok()
        .map(|m| m.blocks() * 512 / 1024);
    ctx.say(&format!(
        "cold boot {boot_ms:.0} ms + warm-up {warmup_ms:.0} ms"
    ));

    // 2. Clones one after another.
    report.clones = ctx.sequential(&guest_ram)?;

    // 2°. Many starts, a few at a time, beside a busy clone (`--starts`).
    if opts.starts > 0 {
        match ctx.stress() {
            Ok(x) => report.stress = Some(x),
            Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
            Err(e) => report.errors.push(format!("starts: {e}")),
        }
    }

    // 2'. Taking over the carried agent connection vs resetting the
    // transport, in turn.
    if opts.compare_connection {
        match ctx.connection_comparison() {
            Ok(c) => report.connection = Some(c),
            Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
            Err(e) => report.errors.push(format!("connection comparison: {e}")),
        }
    }

    // 2''. After a host restart: the master's memory file not cached.
    match ctx.cold_cache(&guest_ram) {
        Ok(c) => report.cold_cache = Some(c),
        Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
        Err(e) => report.errors.push(format!("cold cache: {e}")),
    }

    // 2a. The same, with and without jail and network, in turn.
    match ctx.confinement() {
        Ok(c) => report.confinement = Some(c),
        Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
        Err(e) => report.errors.push(format!("confinement: {e}")),
    }

    // 2b. A networked clone's throughput and latency, through a published
    // port and directly.
    if opts.net {
        match ctx.network() {
            Ok(n) => report.net = Some(n),
            Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
            Err(e) => {
                ctx.ws.kill_live();
                ctx.say(&format!("network: {e}"));
                report.errors.push(format!("network: {e}"));
            }
        }
    }

    // 2c. Fresh process vs fork() of a prepared one, same snapshot.
    match fork_vs_spawn(&rec, opts.count) {
        Ok(f) => report.fork_vs_spawn = Some(f),
        Err(e) => report.errors.push(format!("fork vs spawn: {e}")),
    }

    // 4. An idle clone.
    let idle = ctx.idle(&guest_ram)?;
    ctx.say(&format!(
        "idle clone: {:.2}% of a core over {:.0} s, {} KiB private",
        idle.cpu_pct, idle.window_s, idle.memory.private_kib
    ));
    report.idle = Some(idle);

    // 3. Clones in parallel.
    let par = ctx.parallel()?;
    ctx.say(&format!(
        "parallel: {} clones ({} at once) answered in {:.0} ms",
        par.started, par.parallel, par.wall_ms
    ));
    report.parallel = Some(par);
    match ctx.burst() {
        Ok(b) => {
            ctx.say(&format!(
                "burst: {} of {} clones running {:.0} ms after the first spawn",
                b.running, b.count, b.wall_ms
            ));
            report.burst = Some(b);
        }
        Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
        Err(e) => report.errors.push(e.to_string()),
    }

    // 5. The big master.
    if opts.big_memory_mib > 0 {
        check_interrupted()?;
        match ctx.big() {
            Ok(b) => report.big = Some(b),
            Err(CloneBenchError::Interrupted) => return Err(CloneBenchError::Interrupted),
            Err(e) => {
                ctx.say(&format!("big master: {e}"));
                let _ = host::master::remove(&ctx.ws.store, BIG_MASTER, true);
                report
                    .errors
                    .push(format!("{} MiB master: {e}", opts.big_memory_mib));
            }
        }
    }

    // 6. QEMU's save/restore.
    if opts.peer_qemu {
        check_interrupted()?;
        let n = opts.count.min(QEMU_RESTORES);
        let progress = &mut *ctx.progress;
        let r = crate::bench::ensure_qemu(&mut |m| progress(m))
            .map_err(crate::peer::PeerError::Setup)
            .and_then(|_| {
                crate::peer::qemu_restore(&opts.spec, opts.boot_timeout, n, &mut |m| progress(m))
            });
        check_interrupted()?;
        match r {
            Ok(s) => report.qemu = Some(s),
            Err(e) => {
                ctx.say(&format!("qemu peer: {e}"));
                report.errors.push(format!("qemu peer: {e}"));
            }
        }
    }

    // 7. Density.
    if opts.density {
        check_interrupted()?;
        match ctx.density() {
            Ok(d) => report.density = Some(d),
            Err(e) => report.errors.push(format!("density: {e}")),
        }
        check_interrupted()?;
    }

    ctx.say("cleaning up");
    drop(ctx);
    Ok(report)
}

/// Runs `zygote-bench fork-bench` (a fresh, single-threaded process that
/// may fork) on `rec`'s snapshot.
fn fork_vs_spawn(rec: &MasterRecord, count: usize) -> Result<crate::fork_bench::ForkBench, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("zygote-fork-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .arg("fork-bench")
        .arg("--snapshot")
        .arg(&rec.snapshot)
        .arg("--dir")
        .arg(&dir)
        .arg("--count")
        .arg(count.to_string())
        .stdin(std::process::Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------- report

/// The vsock steps of `clones` (ms since spawn), one summary each.
fn steps_json(clones: &[CloneSample]) -> serde_json::Value {
    let s = |f: StepOf| summary(clones.iter().filter_map(|c| f(&c.steps)));
    serde_json::json!({
        "reset_posted_ms": s(|t| t.reset_posted_ms),
        "reset_acked_ms": s(|t| t.reset_acked_ms),
        "carried_ms": s(|t| t.carried_ms),
        "requested_ms": s(|t| t.requested_ms),
        "accepted_ms": s(|t| t.accepted_ms),
        "first_rx_ms": s(|t| t.first_rx_ms),
        "first_tx_ms": s(|t| t.first_tx_ms),
        "irqs": s(|t| Some(f64::from(t.irqs))),
        "identity_parts_ms": identity_parts()
            .into_iter()
            .map(|(name, f)| (name.to_string(), serde_json::json!(s(f))))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    })
}

/// One of a clone's vsock steps.
type StepOf = fn(&StepsMs) -> Option<f64>;

/// The parts of the identity the agent times, ms (`None` when it did not
/// say, e.g. no network).
fn identity_parts() -> [(&'static str, StepOf); 8] {
    fn ms(us: u32) -> Option<f64> {
        (us > 0).then(|| f64::from(us) / 1000.0)
    }
    [
        ("entropy + CRNG reseed", |t| ms(t.identity.entropy_us)),
        ("hostname", |t| ms(t.identity.hostname_us)),
        ("wall clock", |t| ms(t.identity.clock_us)),
        ("id file", |t| ms(t.identity.id_file_us)),
        ("network", |t| ms(t.identity.net_us)),
        ("network: MAC", |t| ms(t.identity.net_mac_us)),
        ("network: address", |t| ms(t.identity.net_addr_us)),
        ("network: default route", |t| ms(t.identity.net_route_us)),
    ]
}

/// How many of `clones` have step `f`, and its summary.
fn cl_steps(clones: &[CloneSample], f: StepOf) -> (usize, Option<Summary>) {
    let v: Vec<f64> = clones.iter().filter_map(|c| f(&c.steps)).collect();
    (v.len(), Summary::of(&v))
}

fn summary(v: impl IntoIterator<Item = f64>) -> Option<Summary> {
    Summary::of(&v.into_iter().collect::<Vec<_>>())
}

fn p50(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    summary(v).map(|s| s.p50)
}

impl CloneReport {
    /// Spawn → vCPUs running of the master's clones.
    pub fn clone_running(&self) -> Option<Summary> {
        summary(self.clones.iter().filter_map(|s| s.running_ms))
    }

    /// Spawn → ping answered of the master's clones.
    pub fn clone_ready(&self) -> Option<Summary> {
        summary(self.clones.iter().map(|s| s.ready_ms))
    }

    /// Cold boot + warm-up → ready.
    pub fn cold_ready(&self) -> Option<Summary> {
        summary(self.cold.iter().map(|c| c.ready_ms))
    }

    /// QEMU: new process → restored VM running.
    pub fn qemu_restore(&self) -> Option<Summary> {
        summary(self.qemu.iter().flatten().map(|q| q.restore_running_ms))
    }

    /// cold_ready p50 / clone_ready p50.
    pub fn ratio_cold_over_clone(&self) -> Option<f64> {
        Some(self.cold_ready()?.p50 / self.clone_ready()?.p50)
    }

    /// clone_running p50 / qemu_restore p50 (below 1.0: clones win).
    pub fn ratio_clone_over_qemu_restore(&self) -> Option<f64> {
        Some(self.clone_running()?.p50 / self.qemu_restore()?.p50)
    }

    /// Clones per second, one after another: N / the sum of the start calls.
    pub fn clones_per_s_sequential(&self) -> Option<f64> {
        let total: f64 = self.clones.iter().map(|s| s.start_call_ms).sum();
        (total > 0.0).then(|| self.clones.len() as f64 / (total / 1000.0))
    }

    /// Clones per second in parallel.
    pub fn clones_per_s(&self) -> Option<f64> {
        let p = self.parallel.as_ref()?;
        (p.wall_ms > 0.0).then(|| p.started as f64 / (p.wall_ms / 1000.0))
    }

    /// Clone → ping answered of the clones that took over the carried
    /// connection (`reset` false) or reset the transport: from
    /// `--compare-connection` if it ran, else from the main run's clones
    /// when they were made that way.
    pub fn clone_ready_by(&self, reset: bool) -> Option<Summary> {
        let v = match &self.connection {
            Some(c) if reset => &c.reset,
            Some(c) => &c.carry,
            None if reset == self.vsock_reset => &self.clones,
            None => return None,
        };
        summary(v.iter().map(|s| s.ready_ms))
    }

    /// p50 of clone → ping answered, carried over reset (the issue's bar:
    /// at most 0.5).
    pub fn ratio_carry_over_reset(&self) -> Option<f64> {
        let (c, r) = (self.clone_ready_by(false)?, self.clone_ready_by(true)?);
        (r.p50 > 0.0).then(|| c.p50 / r.p50)
    }

    /// Interrupts the vsock watchdog raised again, over every clone whose
    /// steps were recorded.
    pub fn interrupts_reraised(&self) -> u64 {
        let conf = self.confinement.iter().flat_map(|c| {
            c.with
                .iter()
                .chain(c.jail_only.iter())
                .chain(c.without.iter())
        });
        let cmp = self
            .connection
            .iter()
            .flat_map(|c| c.carry.iter().chain(c.reset.iter()));
        let sampled: u64 = self
            .clones
            .iter()
            .chain(conf)
            .chain(cmp)
            .map(|s| u64::from(s.steps.irqs_reraised))
            .sum();
        sampled + self.stress.as_ref().map_or(0, |x| x.interrupts_reraised)
    }

    /// Clones that did not answer in the runs that start many (`--starts`,
    /// the parallel run, `--density`).
    pub fn failed_starts(&self) -> usize {
        self.stress.as_ref().map_or(0, |x| x.failed)
            + self.parallel.as_ref().map_or(0, |p| p.failed)
            + self.density.as_ref().map_or(0, |d| d.failed)
    }

    /// The JSON object `--json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        let cl = |f: fn(&CloneSample) -> Option<f64>| summary(self.clones.iter().filter_map(f));
        let mut out = serde_json::json!({
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "warmup": self.warmup,
            "cold_samples": self.cold.len(),
            "cold_boot_ms": summary(self.cold.iter().map(|c| c.boot_ms)),
            "warmup_ms": summary(self.cold.iter().map(|c| c.warmup_ms)),
            "cold_ready_ms": self.cold_ready(),
            "clone_samples": self.clones.len(),
            "clone_started_ms": cl(|s| s.started_ms),
            "clone_running_ms": self.clone_running(),
            "clone_identity_ms": cl(|s| Some(s.identity_ms)),
            "clone_ready_ms": self.clone_ready(),
            "clone_exec_true_ms": cl(|s| Some(s.exec_true_ms)),
            "clone_private_kib_after_exec": summary(
                self.clones.iter().filter_map(|s| s.private_kib_after_exec.map(|k| k as f64))
            ),
            "clone_guest_copied_kib_after_exec": summary(
                self.clones.iter().filter_map(|s| s.guest_copied_kib_after_exec.map(|k| k as f64))
            ),
            "ratio_cold_over_clone": self.ratio_cold_over_clone(),
            "clones_per_s": self.clones_per_s(),
            "clones_per_s_sequential": self.clones_per_s_sequential(),
            "clones_per_s_running": self.burst.as_ref().map(|b| b.per_s()),
            "master_ram_kib": self.memory_mib * 1024,
            "master_allocated_kib": self.master_allocated_kib,
            "connection": if self.vsock_reset { "reset" } else { "carry" },
            "clone_ready_ms_carry": self.clone_ready_by(false),
            "clone_ready_ms_reset": self.clone_ready_by(true),
            "ratio_carry_over_reset": self.ratio_carry_over_reset(),
            "interrupts_reraised": self.interrupts_reraised(),
            "failed_starts": self.failed_starts(),
            "stress": self.stress.as_ref().map(|x| serde_json::json!({
                "starts": x.starts,
                "parallel": x.parallel,
                "answered": x.answered,
                "failed": x.failed,
                "failures": x.failures,
                "ready_ms": summary(x.ready_ms.iter().copied()),
                "interrupts_reraised": x.interrupts_reraised,
                "clones_with_reraise": x.clones_with_reraise,
                "wall_ms": x.wall_ms,
            })),
            "clone_steps_ms": steps_json(&self.clones),
            "clone_steps_ms_reset": self.connection.as_ref().map(|c| steps_json(&c.reset)),
            "clone_ready_ms_cold_cache": self.cold_cache.as_ref().and_then(|c| summary(c.cold.iter().map(|s| s.ready_ms))),
            "clone_ready_ms_warm_cache": self.cold_cache.as_ref().and_then(|c| summary(c.warm.iter().map(|s| s.ready_ms))),
            "clone_running_ms_cold_cache": self.cold_cache.as_ref().and_then(|c| summary(c.cold.iter().filter_map(|s| s.running_ms))),
            "cold_cache": self.cold_cache.as_ref().map(|c| serde_json::json!({
                "file_allocated_kib": c.file_allocated_kib,
                "resident_kib_after_drop": c.resident_kib_after_drop,
            })),
            "errors": self.errors,
        });
        if let Some(p) = &self.parallel {
            out["parallel"] = serde_json::json!({
                "clones": p.started,
                "failed": p.failed,
                "at_once": p.parallel,
                "wall_ms": p.wall_ms,
                "ready_ms": summary(p.ready_ms.iter().copied()),
            });
        }
        if let Some(i) = &self.idle {
            out["clone_idle_cpu_pct"] = i.cpu_pct.into();
            out["clone_idle_window_s"] = i.window_s.into();
            if let Some(w) = &i.wakeups {
                out["idle_wakeups_per_s"] = w.per_s.into();
                out["idle_wakeups"] = serde_json::json!(w);
            }
            out["clone_private_kib"] = i.memory.private_kib.into();
            out["clone_pss_kib"] = i.memory.pss_kib.into();
            out["clone_anon_kib"] = (i.memory.guest_anon_kib + i.memory.vmm_anon_kib).into();
            out["clone_guest_copied_kib"] = i.memory.guest_anon_kib.into();
            out["clone_memory"] = serde_json::json!({
                "at_window_start": i.memory_start,
                "at_window_end": i.memory,
            });
        }
        if let Some(b) = &self.big {
            let running = summary(b.clones.iter().filter_map(|s| s.running_ms));
            out["big_master"] = serde_json::json!({
                "memory_mib": b.memory_mib,
                "cold_boot_ms": b.boot_ms,
                "clone_running_ms": running,
                "clone_ready_ms": summary(b.clones.iter().map(|s| s.ready_ms)),
            });
            out["clone_running_ms_p50_by_memory_mib"] = serde_json::json!({
                self.memory_mib.to_string(): self.clone_running().map(|s| s.p50),
                b.memory_mib.to_string(): running.map(|s| s.p50),
            });
        }
        if let Some(c) = &self.confinement {
            let tail = |v: Vec<f64>| TailSummary::of(&v);
            let run = |v: &[CloneSample]| tail(v.iter().filter_map(|s| s.running_ms).collect());
            let ready = |v: &[CloneSample]| tail(v.iter().map(|s| s.ready_ms).collect());
            out["confinement_net"] = c.net.into();
            out["clone_running_ms_jail_net"] = serde_json::json!(run(&c.with));
            out["clone_running_ms_bare"] = serde_json::json!(run(&c.without));
            out["clone_running_ms_jail_only"] = serde_json::json!(run(&c.jail_only));
            out["clone_ready_ms_jail_only"] = serde_json::json!(ready(&c.jail_only));
            out["clone_ready_ms_jail_net"] = serde_json::json!(ready(&c.with));
            out["clone_ready_ms_bare"] = serde_json::json!(ready(&c.without));
            out["confinement_added_running_ms_p50"] = serde_json::json!(run(&c.with)
                .zip(run(&c.without))
                .map(|(a, b)| a.p50 - b.p50));
        }
        if let Some(n) = &self.net {
            out["net_upload_mb_s"] = serde_json::json!(mb_s(&n.upload));
            out["net_download_mb_s"] = serde_json::json!(mb_s(&n.download));
            out["net_upload_mb_s_direct"] = serde_json::json!(mb_s(&n.upload_direct));
            out["net_download_mb_s_direct"] = serde_json::json!(mb_s(&n.download_direct));
            out["published_port_request_ms"] = serde_json::json!(TailSummary::of(&n.request_ms));
            out["published_port_round_trip_ms"] =
                serde_json::json!(TailSummary::of(&n.round_trip_ms));
            out["direct_request_ms"] = serde_json::json!(TailSummary::of(&n.request_ms_direct));
            out["direct_round_trip_ms"] =
                serde_json::json!(TailSummary::of(&n.round_trip_ms_direct));
            out["net"] = serde_json::json!({
                "host_port": n.host_port,
                "guest_port": n.guest_port,
                "request_bytes": n.request_bytes,
                "transfer_limit_bytes": n.transfer_limit_bytes,
                "transfer_limit_s": n.transfer_limit_s,
                "upload": n.upload,
                "download": n.download,
                "upload_direct": n.upload_direct,
                "download_direct": n.download_direct,
            });
        }
        if let Some(f) = &self.fork_vs_spawn {
            let ms = |v: &[u64]| summary(v.iter().map(|&u| u as f64 / 1000.0));
            out["clone_start_spawn_ms"] = serde_json::json!(ms(&f.spawn_us));
            out["clone_start_fork_ms"] = serde_json::json!(ms(&f.fork_us));
        }
        if let Some(q) = &self.qemu {
            out["qemu_restore_ms"] = serde_json::json!(self.qemu_restore());
            out["qemu_save_ms"] = serde_json::json!(q.first().map(|s| s.save_ms));
            out["qemu_state_bytes"] = serde_json::json!(q.first().map(|s| s.state_bytes));
            out["ratio_clone_over_qemu_restore"] =
                serde_json::json!(self.ratio_clone_over_qemu_restore());
        }
        if let Some(d) = &self.density {
            out["density_alive"] = d.alive.into();
            out["density"] = serde_json::json!({
                "limit": d.limit,
                "started": d.started,
                "alive": d.alive,
                "failed": d.failed,
                "first_failure": d.first_failure,
                "stop_reason": d.stop_reason,
                "total_pss_kib": d.total_pss_kib,
                "total_private_kib": d.total_private_kib,
                "total_anon_kib": d.total_anon_kib,
                "mem_available_before_kib": d.mem_available_before_kib,
                "mem_available_after_kib": d.mem_available_after_kib,
                "ready_ms": summary(d.ready_ms.iter().copied()),
                "start_wall_ms": d.start_wall_ms,
                "ping_wall_ms": d.ping_wall_ms,
                "kill_wall_ms": d.kill_wall_ms,
                "vmms_left": d.vmms_left,
            });
        }
        out
    }

    /// The human-readable table.
    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, name: &str, n: usize, s: Option<Summary>| {
            if let Some(s) = s {
                t.push_str(&format!(
                    "{name:<46} {n:>4} {:>10.1} {:>10.1} {:>10.1}\n",
                    s.min, s.p50, s.max
                ));
            }
        };
        t.push_str(&format!(
            "{:<46} {:>4} {:>10} {:>10} {:>10}\n",
            "phase (ms)", "n", "min", "p50", "max"
        ));
        let m = self.memory_mib;
        let nc = self.cold.len();
        row(
            &mut t,
            "cold: process start -> agent ready",
            nc,
            summary(self.cold.iter().map(|c| c.boot_ms)),
        );
        row(
            &mut t,
            "cold: warm-up command",
            nc,
            summary(self.cold.iter().map(|c| c.warmup_ms)),
        );
        row(
            &mut t,
            "cold: boot + warm-up -> ready",
            nc,
            self.cold_ready(),
        );
        let cl = |f: fn(&CloneSample) -> Option<f64>| {
            let v: Vec<f64> = self.clones.iter().filter_map(f).collect();
            (v.len(), Summary::of(&v))
        };
        let n = self.clones.len();
        let (ns, s) = cl(|s| s.started_ms);
        row(&mut t, "clone: spawn -> VMM main", ns, s);
        let (nr, s) = cl(|s| s.running_ms);
        row(
            &mut t,
            &format!("clone ({m} MiB): spawn -> vCPUs running"),
            nr,
            s,
        );
        row(
            &mut t,
            "clone: spawn -> identity set",
            n,
            cl(|s| Some(s.identity_ms)).1,
        );
        let how = if self.vsock_reset {
            "transport reset"
        } else {
            "carried connection"
        };
        row(
            &mut t,
            &format!("clone: spawn -> ping answered ({how})"),
            n,
            self.clone_ready(),
        );
        // Where the time to the answer goes: the vsock device's steps.
        let steps: [(&str, StepOf); 7] = [
            ("  vsock: transport reset posted", |t| t.reset_posted_ms),
            ("  vsock: guest handled the reset", |t| t.reset_acked_ms),
            ("  vsock: carried connection taken over", |t| t.carried_ms),
            ("  vsock: connection request to the guest", |t| {
                t.requested_ms
            }),
            ("  vsock: guest accepted it", |t| t.accepted_ms),
            ("  vsock: identity reached the guest", |t| t.first_rx_ms),
            ("  vsock: first answer left the guest", |t| t.first_tx_ms),
        ];
        for (name, f) in steps {
            let (k, s) = cl_steps(&self.clones, f);
            if k > 0 {
                row(&mut t, name, k, s);
            }
        }
        // And what the guest spent applying the identity (durations).
        for (name, f) in identity_parts() {
            let (k, s) = cl_steps(&self.clones, f);
            if k > 0 {
                row(
                    &mut t,
                    &format!("  guest, identity: {name} (duration)"),
                    k,
                    s,
                );
            }
        }
        if let Some(c) = &self.cold_cache {
            let ready = |v: &[CloneSample]| summary(v.iter().map(|s| s.ready_ms));
            let run = |v: &[CloneSample]| summary(v.iter().filter_map(|s| s.running_ms));
            row(
                &mut t,
                "  memory file not cached: -> vCPUs running",
                c.cold.len(),
                run(&c.cold),
            );
            row(
                &mut t,
                "  memory file not cached: -> ping answered",
                c.cold.len(),
                ready(&c.cold),
            );
            row(
                &mut t,
                "  memory file cached (same turns): -> ping",
                c.warm.len(),
                ready(&c.warm),
            );
        }
        if let Some(c) = &self.connection {
            let ready = |v: &[CloneSample]| summary(v.iter().map(|s| s.ready_ms));
            row(
                &mut t,
                "  carried connection: -> ping answered",
                c.carry.len(),
                ready(&c.carry),
            );
            row(
                &mut t,
                "  transport reset: -> ping answered",
                c.reset.len(),
                ready(&c.reset),
            );
            for (name, f) in steps {
                let (k, s) = cl_steps(&c.reset, f);
                if k > 0 {
                    row(
                        &mut t,
                        &format!("  transport reset, {}", name.trim_start()),
                        k,
                        s,
                    );
                }
            }
        }
        row(
            &mut t,
            "clone: ping -> `exec true` answered",
            n,
            cl(|s| Some(s.exec_true_ms)).1,
        );
        if let Some(c) = &self.confinement {
            let run = |v: &[CloneSample]| summary(v.iter().filter_map(|s| s.running_ms));
            let ready = |v: &[CloneSample]| summary(v.iter().map(|s| s.ready_ms));
            // The issue's bar is on p50 and p99: the p99 goes in the label.
            let p99 = |v: Vec<f64>| {
                TailSummary::of(&v).map_or(String::new(), |t| format!(" (p99 {:.1})", t.p99))
            };
            let run99 = |v: &[CloneSample]| p99(v.iter().filter_map(|s| s.running_ms).collect());
            let ready99 = |v: &[CloneSample]| p99(v.iter().map(|s| s.ready_ms).collect());
            let what = if c.net { "jail + network" } else { "jail" };
            row(
                &mut t,
                &format!("  with {what}: -> vCPUs running{}", run99(&c.with)),
                c.with.len(),
                run(&c.with),
            );
            if c.net {
                row(
                    &mut t,
                    &format!("  with jail only: -> vCPUs running{}", run99(&c.jail_only)),
                    c.jail_only.len(),
                    run(&c.jail_only),
                );
            }
            row(
                &mut t,
                &format!("  with neither: -> vCPUs running{}", run99(&c.without)),
                c.without.len(),
                run(&c.without),
            );
            row(
                &mut t,
                &format!(
                    "  with {what}: -> ping (identity applied){}",
                    ready99(&c.with)
                ),
                c.with.len(),
                ready(&c.with),
            );
            row(
                &mut t,
                &format!("  with neither: -> ping{}", ready99(&c.without)),
                c.without.len(),
                ready(&c.without),
            );
        }
        if let Some(f) = &self.fork_vs_spawn {
            let ms = |v: &[u64]| summary(v.iter().map(|&u| u as f64 / 1000.0));
            row(
                &mut t,
                "  same, fresh process (no agent): -> running",
                f.spawn_us.len(),
                ms(&f.spawn_us),
            );
            row(
                &mut t,
                "  same, fork() of a prepared VMM: -> running",
                f.fork_us.len(),
                ms(&f.fork_us),
            );
        }
        if let Some(p) = &self.parallel {
            row(
                &mut t,
                &format!("clone, {} at once: spawn -> ping", p.parallel),
                p.ready_ms.len(),
                summary(p.ready_ms.iter().copied()),
            );
        }
        if let Some(b) = &self.big {
            let v: Vec<f64> = b.clones.iter().filter_map(|s| s.running_ms).collect();
            row(
                &mut t,
                &format!("clone ({} MiB): spawn -> vCPUs running", b.memory_mib),
                v.len(),
                Summary::of(&v),
            );
            row(
                &mut t,
                &format!("clone ({} MiB): spawn -> ping answered", b.memory_mib),
                b.clones.len(),
                summary(b.clones.iter().map(|s| s.ready_ms)),
            );
        }
        if let Some(q) = &self.qemu {
            row(
                &mut t,
                "qemu: -incoming spawn -> running",
                q.len(),
                self.qemu_restore(),
            );
        }
        if let Some(d) = &self.density {
            row(
                &mut t,
                "density clones: spawn -> ping answered",
                d.ready_ms.len(),
                summary(d.ready_ms.iter().copied()),
            );
        }
        if let Some(n) = &self.net {
            let b = n.request_bytes;
            for (name, v) in [
                (
                    format!("net: {b} B request, new conn, published"),
                    &n.request_ms,
                ),
                (
                    format!("net: {b} B request, new conn, direct"),
                    &n.request_ms_direct,
                ),
                (
                    format!("net: {b} B round trip, one conn, published"),
                    &n.round_trip_ms,
                ),
                (
                    format!("net: {b} B round trip, one conn, direct"),
                    &n.round_trip_ms_direct,
                ),
            ] {
                row(&mut t, &name, v.len(), summary(v.iter().copied()));
            }
        }
        t.push('\n');
        if nc == 1 {
            t.push_str("(one cold boot: each costs a whole boot)\n");
        }
        if let Some(r) = self.ratio_cold_over_clone() {
            t.push_str(&format!(
                "ratio cold boot + warm-up / clone -> ping, p50: {r:.0}x\n"
            ));
        }
        if let Some(b) = &self.big {
            let big = p50(b.clones.iter().filter_map(|s| s.running_ms));
            if let (Some(a), Some(z)) = (self.clone_running().map(|s| s.p50), big) {
                t.push_str(&format!(
                    "clone -> vCPUs running p50 by master RAM: {m} MiB {a:.1} ms, {} MiB {z:.1} ms (cold boot of the {} MiB master: {:.0} ms)\n",
                    b.memory_mib, b.memory_mib, b.boot_ms
                ));
            }
        }
        if let Some(q) = &self.qemu {
            if let Some(s) = q.first() {
                t.push_str(&format!(
                    "qemu save (migrate to file): {:.1} ms, state {} KiB\n",
                    s.save_ms,
                    s.state_bytes >> 10
                ));
            }
            if let Some(r) = self.ratio_clone_over_qemu_restore() {
                t.push_str(&format!(
                    "ratio clone -> vCPUs running / qemu restore -> running, p50: {r:.4}\n"
                ));
            }
        }
        if let Some(n) = &self.net {
            // Two decimals for what a slow guest gives (under 10 MB/s).
            let f = |v: &[Transfer]| match mb_s(v) {
                None => "-".to_string(),
                Some(x) if x < 10.0 => format!("{x:.2}"),
                Some(x) => format!("{x:.1}"),
            };
            let rounds = n.upload.len();
            t.push_str(&format!(
                "network host -> clone: {} MB/s through the published port 127.0.0.1:{}, {} MB/s direct; clone -> host: {} MB/s, {} MB/s ({rounds} transfers each, up to {} MiB or {:.0} s)\n",
                f(&n.upload),
                n.host_port,
                f(&n.upload_direct),
                f(&n.download),
                f(&n.download_direct),
                n.transfer_limit_bytes >> 20,
                n.transfer_limit_s
            ));
            let tail = |v: &[f64]| {
                TailSummary::of(v).map_or("-".to_string(), |s| {
                    format!("p50 {:.2} ms, p99 {:.2} ms", s.p50, s.p99)
                })
            };
            t.push_str(&format!(
                "request latency through the published port, {} B on a new connection each: {} (direct: {}); on one connection: {} (direct: {})\n",
                n.request_bytes,
                tail(&n.request_ms),
                tail(&n.request_ms_direct),
                tail(&n.round_trip_ms),
                tail(&n.round_trip_ms_direct)
            ));
        }
        if let Some(r) = self.clones_per_s_sequential() {
            t.push_str(&format!("clones/s one at a time: {r:.1}\n"));
        }
        if let (Some(r), Some(p)) = (self.clones_per_s(), &self.parallel) {
            t.push_str(&format!(
                "clones/s, {} at once: {r:.1} ({} clones in {:.0} ms{})\n",
                p.parallel,
                p.started,
                p.wall_ms,
                if p.failed > 0 {
                    format!(", {} failed", p.failed)
                } else {
                    String::new()
                }
            ));
        }
        if let Some(b) = &self.burst {
            t.push_str(&format!(
                "clones/s to vCPUs running (host side), {} spawned at once: {:.0} ({} running {:.0} ms after the first spawn)\n",
                b.count,
                b.per_s(),
                b.running,
                b.wall_ms
            ));
        }
        if let Some(x) = &self.stress {
            t.push_str(&format!(
                "starts: {} of {} clones answered ({} at once, beside a busy clone), {} failed, in {:.0} s; interrupts raised again {} times in {} clones\n",
                x.answered,
                x.starts,
                x.parallel,
                x.failed,
                x.wall_ms / 1000.0,
                x.interrupts_reraised,
                x.clones_with_reraise
            ));
        }
        t.push_str(&format!(
            "vsock interrupts raised again by the lost-interrupt watchdog: {}\n",
            self.interrupts_reraised()
        ));
        if let Some(i) = &self.idle {
            let mm = &i.memory;
            t.push_str(&format!(
                "idle clone CPU over {:.0} s: {:.2}% of one core ({} ticks at {}/s)\n",
                i.window_s, i.cpu_pct, i.cpu_ticks, i.clk_tck
            ));
            match &i.wakeups {
                Some(w) => t.push_str(&format!(
                    "idle clone wake-ups over {:.0} s: {:.3}/s (vCPU thread woken {}/s, context switches {}/s, guest exits to KVM {}/s); by cause /s: {}\n",
                    w.window_s,
                    w.per_s,
                    fmt_rate(w.halt_wakeups_per_s),
                    fmt_rate(w.vcpu_switches_per_s),
                    fmt_rate(w.kvm_exits_per_s),
                    w.causes_line()
                )),
                None => t.push_str("idle clone wake-ups: not counted (the VMM did not answer)\n"),
            }
            t.push_str(&format!(
                "idle clone memory: private {} KiB = guest RAM {} KiB (copied: {} KiB anonymous) + rest of the VMM {} KiB ({} KiB anonymous); Pss {} KiB; Rss {} KiB (guest RAM {} KiB); master RAM {} KiB\n",
                mm.private_kib,
                mm.guest_private_kib,
                mm.guest_anon_kib,
                mm.vmm_private_kib,
                mm.vmm_anon_kib,
                mm.pss_kib,
                mm.rss_kib,
                mm.guest_rss_kib,
                m * 1024
            ));
        }
        if let Some(s) = summary(
            self.clones
                .iter()
                .filter_map(|s| s.private_kib_after_exec.map(|k| k as f64)),
        ) {
            let copied = summary(
                self.clones
                    .iter()
                    .filter_map(|s| s.guest_copied_kib_after_exec.map(|k| k as f64)),
            );
            t.push_str(&format!(
                "clone private memory after `exec true`: p50 {:.0} KiB (max {:.0}); guest pages copied p50 {:.0} KiB\n",
                s.p50,
                s.max,
                copied.map_or(f64::NAN, |c| c.p50)
            ));
        }
        if let Some(a) = self.master_allocated_kib {
            t.push_str(&format!(
                "master memory file: {a} KiB allocated of {} KiB\n",
                m * 1024
            ));
        }
        if let Some(d) = &self.density {
            t.push_str(&format!(
                "density: {} of {} clones answered, {} failed to start (stopped: {}); Pss total {} MiB, private total {} MiB, anonymous total {} MiB; MemAvailable {} -> {} MiB; started in {:.0} s, pinged in {:.0} ms, killed in {:.0} ms\n",
                d.alive,
                d.started,
                d.failed,
                d.stop_reason,
                d.total_pss_kib >> 10,
                d.total_private_kib >> 10,
                d.total_anon_kib >> 10,
                d.mem_available_before_kib >> 10,
                d.mem_available_after_kib >> 10,
                d.start_wall_ms / 1000.0,
                d.ping_wall_ms,
                d.kill_wall_ms
            ));
        }
        for e in &self.errors {
            t.push_str(&format!("not measured: {e}\n"));
        }
        t
    }

    /// The series of the CDF plot.
    pub fn plot_series(&self) -> Vec<Series> {
        let m = self.memory_mib;
        let mut v = vec![
            Series {
                name: format!("clone ({m} MiB) → vCPUs running"),
                samples_ms: self.clones.iter().filter_map(|s| s.running_ms).collect(),
            },
            Series {
                name: "clone → ping answered".into(),
                samples_ms: self.clones.iter().map(|s| s.ready_ms).collect(),
            },
            Series {
                name: "clone → exec true answered".into(),
                samples_ms: self
                    .clones
                    .iter()
                    .map(|s| s.ready_ms + s.exec_true_ms)
                    .collect(),
            },
        ];
        if let Some(b) = &self.big {
            v.push(Series {
                name: format!("clone ({} MiB) → vCPUs running", b.memory_mib),
                samples_ms: b.clones.iter().filter_map(|s| s.running_ms).collect(),
            });
        }
        if let Some(q) = &self.qemu {
            v.push(Series {
                name: "QEMU restore → running".into(),
                samples_ms: q.iter().map(|s| s.restore_running_ms).collect(),
            });
        }
        v.push(Series {
            name: "cold boot + warm-up → ready".into(),
            samples_ms: self.cold.iter().map(|c| c.ready_ms).collect(),
        });
        v
    }

    /// Writes the CDF plot to `path`.
    pub fn write_plot(&self, path: &Path) -> Result<(), PlotError> {
        crate::plot::latency_cdf_svg(
            path,
            &format!(
                "zygote: clone vs cold boot ({} MiB, {} vCPU)",
                self.memory_mib, self.vcpus
            ),
            &self.plot_series(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::WakeupCounts;

    fn clone(running: f64, ready: f64) -> CloneSample {
        CloneSample {
            started_ms: Some(1.0),
            running_ms: Some(running),
            identity_ms: ready - 1.0,
            ready_ms: ready,
            exec_true_ms: 2000.0,
            start_call_ms: ready + 1.0,
            private_kib_after_exec: Some(900),
            guest_copied_kib_after_exec: Some(400),
            steps: StepsMs {
                carried_ms: Some(running + 1.0),
                first_rx_ms: Some(running + 2.0),
                first_tx_ms: Some(ready - 2.0),
                irqs: 2,
                irqs_reraised: 1,
                identity: proto::IdentityTimings {
                    net_us: 3000,
                    ..Default::default()
                },
                ..Default::default()
            },
        }
    }

    fn synthetic() -> CloneReport {
        CloneReport {
            memory_mib: 256,
            vcpus: 1,
            warmup: "true".into(),
            master_allocated_kib: Some(40_000),
            cold: vec![ColdSample {
                boot_ms: 38_000.0,
                warmup_ms: 2_000.0,
                ready_ms: 40_000.0,
            }],
            clones: vec![clone(5.0, 19.0), clone(4.0, 20.0), clone(6.0, 21.0)],
            confinement: Some(Confinement {
                net: true,
                with: vec![clone(6.0, 22.0)],
                jail_only: vec![clone(5.0, 20.0)],
                without: vec![clone(4.0, 19.0)],
            }),
            net: Some(NetResult {
                host_port: 40123,
                guest_port: 5201,
                transfer_limit_bytes: 256 << 20,
                transfer_limit_s: 3.0,
                upload: vec![
                    Transfer {
                        bytes: 100_000_000,
                        secs: 1.0,
                    },
                    Transfer {
                        bytes: 200_000_000,
                        secs: 1.0,
                    },
                ],
                download: vec![Transfer {
                    bytes: 50_000_000,
                    secs: 1.0,
                }],
                upload_direct: vec![Transfer {
                    bytes: 300_000_000,
                    secs: 2.0,
                }],
                download_direct: vec![],
                request_bytes: 100,
                request_ms: (1..=100).map(f64::from).collect(),
                request_ms_direct: vec![0.5, 0.7],
                round_trip_ms: vec![0.2, 0.3, 0.4],
                round_trip_ms_direct: vec![0.1],
            }),
            parallel: Some(ParallelResult {
                parallel: 8,
                started: 20,
                failed: 0,
                wall_ms: 400.0,
                ready_ms: vec![30.0, 40.0],
            }),
            idle: Some(IdleResult {
                window_s: 30.0,
                cpu_ticks: 3,
                clk_tck: 100,
                cpu_pct: 0.1,
                memory_start: MemoryBreakdown::default(),
                memory: MemoryBreakdown {
                    private_kib: 1500,
                    pss_kib: 2500,
                    rss_kib: 9000,
                    guest_private_kib: 600,
                    guest_rss_kib: 6000,
                    vmm_private_kib: 900,
                    guest_anon_kib: 500,
                    vmm_anon_kib: 800,
                },
                status_rss: None,
                wakeups: Some(IdleWakeups::between(
                    &WakeupCounts {
                        halts: Some(10),
                        irq_injections: Some(20),
                        device_irqs: [("rng".to_string(), 1)].into(),
                        ..Default::default()
                    },
                    &WakeupCounts {
                        halts: Some(16),
                        irq_injections: Some(26),
                        device_irqs: [("rng".to_string(), 3)].into(),
                        ..Default::default()
                    },
                    60.0,
                    Some((100, 112)),
                )),
            }),
            big: Some(BigResult {
                memory_mib: 2048,
                boot_ms: 60_000.0,
                clones: vec![clone(5.5, 22.0)],
            }),
            burst: Some(BurstResult {
                count: 50,
                running: 50,
                wall_ms: 250.0,
            }),
            fork_vs_spawn: Some(crate::fork_bench::ForkBench {
                spawn_us: vec![2700, 2900],
                fork_us: vec![1300, 1350],
            }),
            qemu: Some(vec![
                QemuRestoreSample {
                    save_ms: 30.0,
                    state_bytes: 18 << 20,
                    restore_running_ms: 100.0,
                },
                QemuRestoreSample {
                    save_ms: 30.0,
                    state_bytes: 18 << 20,
                    restore_running_ms: 120.0,
                },
            ]),
            density: Some(DensityResult {
                limit: 400,
                started: 400,
                alive: 399,
                failed: 0,
                first_failure: None,
                stop_reason: "reached --density-limit 400".into(),
                total_pss_kib: 800_000,
                total_private_kib: 600_000,
                total_anon_kib: 300_000,
                mem_available_before_kib: 20 << 20,
                mem_available_after_kib: 18 << 20,
                ready_ms: vec![20.0, 30.0],
                start_wall_ms: 9000.0,
                ping_wall_ms: 3000.0,
                kill_wall_ms: 500.0,
                vmms_left: 0,
            }),
            vsock_reset: false,
            stress: Some(StressResult {
                starts: 500,
                parallel: 8,
                answered: 499,
                failed: 1,
                failures: vec!["timed out".into()],
                ready_ms: vec![200.0, 300.0],
                interrupts_reraised: 2,
                clones_with_reraise: 1,
                wall_ms: 160_000.0,
            }),
            cold_cache: Some(ColdCache {
                file_allocated_kib: 25_000,
                resident_kib_after_drop: vec![0],
                cold: vec![clone(5.0, 60.0)],
                warm: vec![clone(5.0, 20.0)],
            }),
            connection: Some(ConnectionComparison {
                carry: vec![clone(4.0, 10.0), clone(4.0, 12.0)],
                reset: vec![clone(4.0, 30.0), clone(4.0, 40.0)],
            }),
            errors: vec![],
        }
    }

    #[test]
    fn a_file_leaves_the_page_cache_and_comes_back() {
        use std::io::{Read, Write};
        let path = std::env::temp_dir().join(format!("zygote-cache-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let p = path.to_str().unwrap();
        assert_eq!(resident_kib(p), Some(1024), "just written");
        let left = evict_from_page_cache(p).unwrap();
        assert!(left < 1024, "{left} KiB left");
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap();
        assert_eq!(resident_kib(p), Some(1024), "read back");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(resident_kib(p), None);
    }

    #[test]
    fn json_has_the_issue_fields() {
        let j = synthetic().to_json();
        for key in [
            "clone_running_ms",
            "clone_ready_ms",
            "cold_ready_ms",
            "qemu_restore_ms",
        ] {
            for f in ["min", "p50", "max"] {
                assert!(j[key][f].is_number(), "{key}.{f} in {j}");
            }
        }
        assert_eq!(j["clone_running_ms"]["p50"], 5.0);
        assert_eq!(j["clone_ready_ms"]["p50"], 20.0);
        assert_eq!(j["cold_ready_ms"]["p50"], 40_000.0);
        assert_eq!(j["ratio_cold_over_clone"], 2000.0);
        assert_eq!(j["clone_private_kib"], 1500);
        assert_eq!(j["clone_pss_kib"], 2500);
        assert_eq!(j["clone_idle_cpu_pct"], 0.1);
        assert_eq!(j["idle_wakeups_per_s"], 0.1);
        let cause = |c: &str| j["idle_wakeups"]["by_cause"][c].as_f64().unwrap();
        assert!((cause("guest_timer") - 4.0 / 60.0).abs() < 1e-9);
        assert!((cause("irq_rng") - 2.0 / 60.0).abs() < 1e-9);
        assert_eq!(j["idle_wakeups"]["vcpu_switches_per_s"], 0.2);
        assert_eq!(j["clones_per_s"], 50.0);
        assert_eq!(j["clones_per_s_running"], 200.0);
        assert_eq!(j["clones_per_s_sequential"], 3.0 / 0.063);
        assert_eq!(j["ratio_clone_over_qemu_restore"], 0.05);
        assert_eq!(j["qemu_restore_ms"]["p50"], 100.0);
        assert_eq!(j["density_alive"], 399);
        assert_eq!(j["clone_running_ms_p50_by_memory_mib"]["2048"], 5.5);
        assert_eq!(j["clone_running_ms_p50_by_memory_mib"]["256"], 5.0);
        assert_eq!(j["net_upload_mb_s"], 150.0);
        assert_eq!(j["net_download_mb_s"], 50.0);
        assert_eq!(j["net_upload_mb_s_direct"], 150.0);
        assert!(j["net_download_mb_s_direct"].is_null());
        let req = &j["published_port_request_ms"];
        assert_eq!(
            (&req["n"], &req["p50"], &req["p99"]),
            (&100.into(), &50.0.into(), &99.0.into())
        );
        assert_eq!(j["direct_request_ms"]["p50"], 0.5);
        assert_eq!(j["published_port_round_trip_ms"]["max"], 0.4);
        assert_eq!(j["direct_round_trip_ms"]["n"], 1);
        assert_eq!(j["net"]["host_port"], 40123);
        assert_eq!(j["connection"], "carry");
        let (c, r) = (&j["clone_ready_ms_carry"], &j["clone_ready_ms_reset"]);
        assert_eq!((&c["min"], &r["max"]), (&10.0.into(), &40.0.into()));
        let ratio = j["ratio_carry_over_reset"].as_f64().unwrap();
        let want = c["p50"].as_f64().unwrap() / r["p50"].as_f64().unwrap();
        assert!((ratio - want).abs() < 1e-9 && ratio < 0.5, "{ratio}");
        assert_eq!(
            j["interrupts_reraised"], 12,
            "one per clone sample, 2 in --starts"
        );
        assert_eq!(j["failed_starts"], 1);
        assert_eq!(j["stress"]["answered"], 499);
        assert_eq!(j["clone_steps_ms"]["carried_ms"]["p50"], 6.0);
        assert!(j["clone_steps_ms"]["requested_ms"].is_null());
        assert_eq!(j["clone_ready_ms_cold_cache"]["p50"], 60.0);
        assert_eq!(j["clone_ready_ms_warm_cache"]["p50"], 20.0);
        let parts = &j["clone_steps_ms"]["identity_parts_ms"];
        assert_eq!(parts["network"]["p50"], 3.0);
        assert!(parts["wall clock"].is_null(), "not reported: {parts}");
    }

    #[test]
    fn optional_parts_are_absent_when_not_run() {
        let mut r = synthetic();
        r.qemu = None;
        r.density = None;
        r.big = None;
        r.net = None;
        let j = r.to_json();
        assert!(j.get("net_upload_mb_s").is_none());
        assert!(j.get("published_port_request_ms").is_none());
        assert!(j.get("qemu_restore_ms").is_none());
        assert!(j.get("density_alive").is_none());
        assert!(j.get("big_master").is_none());
        let t = r.to_table();
        assert!(!t.contains("qemu"), "{t}");
        assert!(!t.contains("density"), "{t}");
        assert!(!t.contains("network host"), "{t}");
        assert!(!t.contains("request latency"), "{t}");
        assert!(!t.contains("net: "), "{t}");
    }

    #[test]
    fn table_shows_rows_and_ratios() {
        let t = synthetic().to_table();
        let line = |prefix: &str| {
            t.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in\n{t}"))
                .to_string()
        };
        let running = line("clone (256 MiB): spawn -> vCPUs running");
        let cols: Vec<&str> = running.split_whitespace().rev().take(4).collect();
        assert_eq!(cols, ["6.0", "5.0", "4.0", "3"], "{running}");
        assert!(line("cold: boot + warm-up -> ready").contains("40000.0"));
        assert!(line("  with jail + network: -> vCPUs running").ends_with("6.0"));
        assert!(line("  with neither: -> vCPUs running").ends_with("4.0"));
        assert!(line("clone (2048 MiB): spawn -> vCPUs running").contains("5.5"));
        assert!(line("qemu: -incoming spawn -> running").contains("100.0"));
        assert!(t.contains("(one cold boot"), "{t}");
        assert!(line("ratio cold boot").ends_with("2000x"));
        assert!(line("ratio clone -> vCPUs running / qemu").ends_with("0.0500"));
        assert!(line("clones/s, 8 at once").contains("50.0"));
        assert!(line("idle clone CPU").contains("0.10%"));
        assert!(line("vsock interrupts raised again").ends_with(": 12"));
        assert!(line("starts: 499 of 500").contains("1 failed, in 160 s"));
        assert!(line("clone: spawn -> ping answered (carried connection)").contains("20.0"));
        assert!(line("  vsock: carried connection taken over").contains("6.0"));
        assert!(line("  transport reset: -> ping answered").contains("30.0"));
        assert!(
            !t.contains("connection request to the guest"),
            "no such step"
        );
        assert!(line("idle clone wake-ups").contains("0.100/s"));
        assert!(line("idle clone wake-ups").contains("guest_timer 0.067, irq_rng 0.033"));
        assert!(line("idle clone memory").contains("private 1500 KiB"));
        assert!(line("density: ").contains("399 of 400"));
        assert!(line("net: 100 B request, new conn, published").ends_with("100.0"));
        assert!(line("net: 100 B round trip, one conn, direct").contains(" 1 "));
        let up = line("network host -> clone: ");
        assert!(
            up.contains("150.0 MB/s through the published port 127.0.0.1:40123"),
            "{up}"
        );
        assert!(up.contains("clone -> host: 50.0 MB/s, - MB/s"), "{up}");
        let mut slow = synthetic();
        if let Some(n) = slow.net.as_mut() {
            n.download[0].bytes = 500_000;
        }
        assert!(slow.to_table().contains("clone -> host: 0.50 MB/s"));
        let lat = line("request latency through the published port");
        assert!(lat.contains("p50 50.00 ms, p99 99.00 ms"), "{lat}");
        let mut r = synthetic();
        r.errors.push("qemu peer: boom".into());
        assert!(r.to_table().contains("not measured: qemu peer: boom"));
    }

    #[test]
    fn plot_has_one_series_per_measurement() {
        let s = synthetic().plot_series();
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names.iter().any(|n| n.contains("QEMU")));
        let exec = s.iter().find(|s| s.name.contains("exec true")).unwrap();
        assert_eq!(exec.samples_ms[0], 2019.0);
    }

    #[test]
    fn cpu_percent_arithmetic() {
        assert_eq!(cpu_pct(30, 100, Duration::from_secs(30)), 1.0);
        assert_eq!(cpu_pct(0, 100, Duration::from_secs(30)), 0.0);
        assert_eq!(cpu_pct(250, 100, Duration::from_secs(10)), 25.0);
        assert_eq!(cpu_pct(5, 100, Duration::ZERO), 0.0);
        let stat =
            "1234 (zygote vmm) S 1 1234 1234 0 -1 4194560 100 0 0 0 17 25 0 0 20 0 3 0 555 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(42));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let me = cpu_ticks(std::process::id());
        assert!(me.is_some());
        assert!(clk_tck() > 0);
    }

    #[test]
    fn meminfo_and_smaps_are_parsed() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(meminfo, "MemAvailable"), Some(20_000_000));
        assert_eq!(parse_meminfo(meminfo, "Mem"), None);
        assert!(mem_available_kib().is_some());
        let smaps = "\
5600-5700 r-xp 00000000 fd:00 42 /usr/bin/zygote-vmm
Rss:                 100 kB
Pss:                  50 kB
Private_Clean:        10 kB
Private_Dirty:         0 kB
7f00-7f80 rw-p 00000000 00:20 7 /state/masters/bench/snapshot/memory
Rss:                6000 kB
Pss:                 700 kB
Private_Clean:         0 kB
Private_Dirty:       600 kB
Anonymous:           500 kB
7f80-7f90 rw-p 00000000 00:00 0
Rss:                 900 kB
Pss:                 900 kB
Private_Clean:         0 kB
Private_Dirty:       890 kB
Anonymous:           880 kB
VmFlags: rd wr mr mw me ac
";
        let m = parse_smaps(smaps, "/state/masters/bench/snapshot/memory", None);
        assert_eq!(
            m,
            MemoryBreakdown {
                // Private_Clean (the binary's text) is not private memory.
                private_kib: 1490,
                pss_kib: 1650,
                rss_kib: 7000,
                guest_private_kib: 600,
                guest_rss_kib: 6000,
                vmm_private_kib: 890,
                guest_anon_kib: 500,
                vmm_anon_kib: 880,
            }
        );
        // A jailed VMM maps the same file under its jail's path: found by
        // its inode.
        let jailed = smaps.replace(
            "/state/masters/bench/snapshot/memory",
            "/jail/snapshot/memory",
        );
        assert_eq!(
            parse_smaps(&jailed, "/state/masters/bench/snapshot/memory", Some(7)),
            m
        );
        assert_eq!(
            parse_smaps(&jailed, "/state/masters/bench/snapshot/memory", None).guest_anon_kib,
            0,
            "by path alone the jailed mapping is not the guest's"
        );
        let own = memory_of(std::process::id(), "").unwrap();
        assert!(own.private_kib > 0 && own.guest_private_kib == 0);
    }
}
