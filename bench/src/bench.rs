//! `zygote bench boot`: cold-boot N VMs in turn and time each phase, with
//! QEMU's `microvm` machine on the same kernel and initramfs as the peer.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proto::ExecRequest;
use serde::Serialize;

use crate::stats::Summary;
use host::agent::{AgentClient, AgentError};
use host::procfs;
use host::vmm::{VmError, VmSpec, VmmProcess};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A zygote VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The peer failed.
    #[error("QEMU peer: {0}")]
    Peer(String),
    /// A VM reported no timestamp for a phase.
    #[error("missing timestamp for {0}")]
    Missing(&'static str),
}

/// One zygote cold boot, in ms from spawning the VMM process.
#[derive(Debug, Clone, Serialize)]
pub struct BootSample {
    /// Spawn → vCPU 0 enters the guest.
    pub to_first_instruction: f64,
    /// First instruction → the agent runs as /init.
    pub kernel_to_init: f64,
    /// /init → agent listens on vsock.
    pub init_to_ready: f64,
    /// Ready → first `exec true` answered (connect, hello, spawn, exit).
    pub ready_to_exec: f64,
    /// Spawn → agent ready.
    pub ready: f64,
    /// VMM RSS minus guest RAM (RssAnon + RssFile), KiB.
    pub vmm_overhead_kib: u64,
}

/// One QEMU cold boot.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSample {
    /// Spawn → the agent's ready line on the console.
    pub ready: f64,
    /// QEMU's RSS at that point, KiB.
    pub rss_kib: u64,
}

fn ms(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1000.0
}

/// Boots one zygote VM and measures it.
pub fn boot_once(spec: &VmSpec, timeout: Duration) -> Result<BootSample, BenchError> {
    let mut vm = VmmProcess::boot(spec)?;
    vm.wait_ready(timeout)?;
    let t = vm.timeline;
    let vcpu = t
        .vcpu_running_us
        .ok_or(BenchError::Missing("first instruction"))?;
    let init = t.agent_start_us.ok_or(BenchError::Missing("agent start"))?;
    let ready = t.agent_ready_us.ok_or(BenchError::Missing("agent ready"))?;
    let mut agent = AgentClient::connect(&vm.vsock_path())?;
    let (status, _, _) = agent.exec_collect(ExecRequest::new(["true"]))?;
    let exec_done = proto::events::now_us();
    if !status.success() {
        return Err(BenchError::Peer(format!(
            "`true` failed in the guest: {status:?}"
        )));
    }
    let overhead = procfs::rss(vm.pid()).map(|r| r.anon + r.file).unwrap_or(0);
    let _ = agent.shutdown();
    let _ = vm.wait_exit(Duration::from_secs(30));
    Ok(BootSample {
        to_first_instruction: ms(t.spawn_us, vcpu),
        kernel_to_init: ms(vcpu, init),
        init_to_ready: ms(init, ready),
        ready_to_exec: ms(ready, exec_done),
        ready: ms(t.spawn_us, ready),
        vmm_overhead_kib: overhead,
    })
}

/// Makes sure `qemu-system-x86_64` is installed: only the benchmarks'
/// peer needs it, so it is installed (Debian's `qemu-system-x86`, nothing
/// removed or downgraded) when a benchmark that compares with it runs.
pub fn ensure_qemu(progress: &mut dyn FnMut(&str)) -> Result<(), BenchError> {
    let found = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if found("qemu-system-x86_64") {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        return Err(BenchError::Peer(
            "qemu-system-x86_64 is not installed: apt-get install --no-install-recommends qemu-system-x86".into(),
        ));
    }
    progress("installing the QEMU peer (Debian's qemu-system-x86)");
    let quiet = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let _ = quiet(Command::new("apt-get").args(["update", "-qq"]));
    let ok = quiet(Command::new("apt-get").args([
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "--no-remove",
        "qemu-system-x86",
    ]));
    if ok && found("qemu-system-x86_64") {
        Ok(())
    } else {
        Err(BenchError::Peer(
            "could not install qemu-system-x86 with apt-get without removing or downgrading \
             what is installed (a newer qemu-utils, say): install a qemu-system-x86_64 in PATH \
             by hand, or run the benchmark without the QEMU peer"
                .into(),
        ))
    }
}

/// `qemu-system-x86_64 -M microvm` with the same kernel, initramfs, command
/// line, memory and vCPUs as `spec`, console on its stdout: the peer every
/// benchmark compares with (boot, and save/restore in [`crate::peer`]).
pub fn qemu_microvm(spec: &VmSpec) -> Command {
    let cmdline = vmm::builder::kernel_cmdline(&spec.image.cmdline, &[]);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args([
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(["-device", "virtio-rng-device"])
    .arg("-kernel")
    .arg(&spec.image.kernel)
    .arg("-initrd")
    .arg(&spec.image.initramfs)
    .arg("-append")
    .arg(&cmdline);
    cmd
}

/// Boots the same kernel and initramfs under `qemu-system-x86_64 -M microvm`.
pub fn qemu_boot_once(spec: &VmSpec, timeout: Duration) -> Result<PeerSample, BenchError> {
    let start = Instant::now();
    let mut child = qemu_microvm(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            BenchError::Peer(format!(
                "cannot start qemu-system-x86_64 (apt-get install qemu-system-x86): {e}"
            ))
        })?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim_end_matches('\r').starts_with(proto::READY_MARKER) {
                let _ = tx.send(Instant::now());
                break;
            }
        }
    });
    let result = match rx.recv_timeout(timeout) {
        Ok(at) => {
            let rss = procfs::rss(child.id()).map(|r| r.total).unwrap_or(0);
            Ok(PeerSample {
                ready: at.duration_since(start).as_secs_f64() * 1000.0,
                rss_kib: rss,
            })
        }
        Err(_) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = child.kill();
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            Err(BenchError::Peer(format!(
                "no ready line within {timeout:?}: {}",
                err.trim()
            )))
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Results of `zygote bench boot`.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// zygote's samples.
    pub zygote: Vec<BootSample>,
    /// QEMU's samples (with `--peer qemu`).
    pub qemu: Vec<PeerSample>,
}

/// Runs `count` boots of each, alternating zygote and the peer so that
/// machine noise hits both alike. `progress` is told about each boot.
pub fn bench_boot(
    spec: &VmSpec,
    count: usize,
    peer: bool,
    timeout: Duration,
    progress: &mut dyn FnMut(&str),
) -> Result<BootReport, BenchError> {
    let mut report = BootReport {
        zygote: Vec::new(),
        qemu: Vec::new(),
    };
    for i in 0..count {
        let s = boot_once(spec, timeout)?;
        progress(&format!(
            "boot {}/{count}: zygote ready in {:.0} ms",
            i + 1,
            s.ready
        ));
        report.zygote.push(s);
        if peer {
            ensure_qemu(progress)?;
            let q = qemu_boot_once(spec, timeout)?;
            progress(&format!(
                "boot {}/{count}: qemu ready in {:.0} ms",
                i + 1,
                q.ready
            ));
            report.qemu.push(q);
        }
    }
    Ok(report)
}

impl BootReport {
    fn zygote_summary(&self, f: impl Fn(&BootSample) -> f64) -> Option<Summary> {
        Summary::of(&self.zygote.iter().map(f).collect::<Vec<_>>())
    }

    /// zygote p50 ready / QEMU p50 ready (below 1.0: zygote is faster).
    pub fn ratio_ready_p50(&self) -> Option<f64> {
        let z = self.zygote_summary(|s| s.ready)?;
        let q = Summary::of(&self.qemu.iter().map(|s| s.ready).collect::<Vec<_>>())?;
        Some(z.p50 / q.p50)
    }

    /// The JSON object `--json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        let phases = serde_json::json!({
            "process_to_first_instruction_ms": self.zygote_summary(|s| s.to_first_instruction),
            "first_instruction_to_init_ms": self.zygote_summary(|s| s.kernel_to_init),
            "init_to_agent_ready_ms": self.zygote_summary(|s| s.init_to_ready),
            "agent_ready_to_exec_true_ms": self.zygote_summary(|s| s.ready_to_exec),
        });
        let overhead = self
            .zygote
            .iter()
            .map(|s| s.vmm_overhead_kib)
            .max()
            .unwrap_or(0);
        let mut out = serde_json::json!({
            "zygote": {
                "ready_ms": self.zygote_summary(|s| s.ready),
                "phases": phases,
                "vmm_overhead_kib": overhead,
                "boots": self.zygote.len(),
            }
        });
        if !self.qemu.is_empty() {
            out["qemu"] = serde_json::json!({
                "ready_ms": Summary::of(&self.qemu.iter().map(|s| s.ready).collect::<Vec<_>>()),
                "rss_kib": self.qemu.iter().map(|s| s.rss_kib).max().unwrap_or(0),
                "boots": self.qemu.len(),
            });
            out["ratio_ready_p50"] = serde_json::json!(self.ratio_ready_p50());
        }
        out
    }

    /// The human-readable table.
    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let row = |t: &mut String, name: &str, s: Option<Summary>| {
            if let Some(s) = s {
                t.push_str(&format!(
                    "{name:<38} {:>10.1} {:>10.1} {:>10.1}\n",
                    s.min, s.p50, s.max
                ));
            }
        };
        t.push_str(&format!(
            "{:<38} {:>10} {:>10} {:>10}\n",
            "phase (ms)", "min", "p50", "max"
        ));
        row(
            &mut t,
            "zygote: process start -> first instr.",
            self.zygote_summary(|s| s.to_first_instruction),
        );
        row(
            &mut t,
            "zygote: first instr. -> /init",
            self.zygote_summary(|s| s.kernel_to_init),
        );
        row(
            &mut t,
            "zygote: /init -> agent ready",
            self.zygote_summary(|s| s.init_to_ready),
        );
        row(
            &mut t,
            "zygote: agent ready -> `exec true` done",
            self.zygote_summary(|s| s.ready_to_exec),
        );
        row(
            &mut t,
            "zygote: process start -> agent ready",
            self.zygote_summary(|s| s.ready),
        );
        if !self.qemu.is_empty() {
            row(
                &mut t,
                "qemu microvm: start -> agent ready",
                Summary::of(&self.qemu.iter().map(|s| s.ready).collect::<Vec<_>>()),
            );
        }
        let overhead = self
            .zygote
            .iter()
            .map(|s| s.vmm_overhead_kib)
            .max()
            .unwrap_or(0);
        t.push_str(&format!(
            "\nzygote VMM memory beyond guest RAM: {overhead} KiB (RssAnon + RssFile, max)\n"
        ));
        if let Some(q) = self.qemu.iter().map(|s| s.rss_kib).max() {
            t.push_str(&format!("qemu RSS (incl. guest RAM touched): {q} KiB\n"));
        }
        if let Some(r) = self.ratio_ready_p50() {
            t.push_str(&format!(
                "ratio zygote/qemu, p50 time to agent ready: {r:.3}\n"
            ));
        }
        t
    }
}
