//! Measures the two ways to start a clone that the design weighs, in one
//! run, on one snapshot (see docs/design/clones.md):
//!
//! - **spawn**: a fresh `zygote-vmm --restore` process (fork + exec of the
//!   VMM binary, read the snapshot, map its memory, KVM restore);
//! - **fork**: a process that read the snapshot and mapped its memory once
//!   `fork()`s; the child only creates its own KVM VM and vCPUs (KVM file
//!   descriptors do not survive a fork) and restores them.
//!
//! Each sample is the time from the start (spawn or `fork()`) to the
//! clone's vCPU 0 entering the guest. The clones are killed right after.
//! The fork server is single-threaded when it forks, as it must be.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::events::{now_us, Event, EventSink};
use proto::launch::{VmSource, VmmLaunch};
use vmm::builder::{prepare_restore, run_restored};

/// Samples of both ways, in µs.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ForkBench {
    /// Fresh process: spawn -> vCPU running.
    pub spawn_us: Vec<u64>,
    /// Fork of a prepared process: fork -> vCPU running.
    pub fork_us: Vec<u64>,
}

/// Reads events from `r` until a `vcpu_running` (its time) or EOF / timeout.
fn running_at(r: impl std::io::Read) -> Option<u64> {
    for line in BufReader::new(r).lines() {
        let line = line.ok()?;
        if let Ok(Event::VcpuRunning { t_us }) = serde_json::from_str(&line) {
            return Some(t_us);
        }
    }
    None
}

/// Runs `count` clones of the snapshot at `snapshot` each way, alternating;
/// vsock sockets are made in `dir`. Must run in a single-threaded process
/// (`zygote-bench fork-bench`).
pub fn run(snapshot: &Path, count: usize, dir: &Path) -> Result<ForkBench, String> {
    let vmm_bin = host::paths::vmm_binary().map_err(|e| e.to_string())?;
    let kvm = vmm::vstate::vm::open_kvm().map_err(|e| vmm::error_chain(&e))?;
    let prepared = prepare_restore(snapshot, kvm).map_err(|e| vmm::error_chain(&e))?;
    let mut out = ForkBench::default();
    for i in 0..count {
        // (a) A fresh VMM process.
        let uds = dir.join(format!("spawn-{i}.sock"));
        let t0 = now_us();
        let mut launch = VmmLaunch::new(VmSource::Restore {
            snapshot: snapshot.to_path_buf(),
        });
        launch.vsock = Some(uds.clone());
        let mut child = Command::new(&vmm_bin)
            .args(launch.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let t = running_at(stdout);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&uds);
        out.spawn_us
            .push(t.ok_or("the spawned clone never ran")?.saturating_sub(t0));

        // (b) fork() of this prepared process.
        let uds = dir.join(format!("fork-{i}.sock"));
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: pipe2 returned two fresh descriptors that we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let t0 = now_us();
        // SAFETY: this process is single-threaded here (no thread was
        // started, and spawned children do not count), so the child may run
        // arbitrary code after fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if pid == 0 {
            drop(rd);
            let events = Arc::new(EventSink::new(Box::new(std::fs::File::from(wr))));
            let mut launch = VmmLaunch::new(VmSource::Restore {
                snapshot: snapshot.to_path_buf(),
            });
            launch.vsock = Some(uds);
            let _ = run_restored(&prepared, &launch, events);
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        drop(wr);
        let started = Instant::now();
        let t = running_at(std::fs::File::from(rd));
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        let _ = std::fs::remove_file(&uds);
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the forked clone took more than 30 s".into());
        }
        out.fork_us
            .push(t.ok_or("the forked clone never ran")?.saturating_sub(t0));
    }
    Ok(out)
}
