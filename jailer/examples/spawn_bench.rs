//! Measures what confinement costs a spawn: the time from the call to the
//! program running (`execve` done) for `std::process::Command`, the
//! jailer without a jail, and the jailer with a jail in several shapes,
//! on the same static program (`/bin/busybox true`). Prints p50/p99/mean of
//! the wall time, and the CPU time (caller and child, user and system) per
//! spawn, which a loaded machine disturbs less.
//!
//! ```text
//! cargo run --release -p jailer --example spawn_bench -- [--count N] [--ballast MIB]
//! ```
//!
//! `--ballast` first touches that much anonymous memory in this process,
//! to show how the caller's size affects a fork-like spawn (a daemon is
//! tens of MiB). Run as root. This is a measurement, not a test: it must
//! not be linked into anything.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use jailer::cgroup::{Cgroups, Limits};
use jailer::{spawn, wait, Bind, Jail, NetNs, Spawn};

const BUSYBOX: &str = "/bin/busybox";
/// What a glibc program such as the VMM needs bound (see
/// `jailer::elf_runtime_files`).
const LIBS: [&str; 3] = [
    "/lib64/ld-linux-x86-64.so.2",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libgcc_s.so.1",
];

fn main() {
    let mut count = 200usize;
    let mut ballast_mib = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--count" => count = args.next().and_then(|v| v.parse().ok()).expect("--count N"),
            "--ballast" => {
                ballast_mib = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--ballast MIB")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "run as root: a jail needs CAP_SYS_ADMIN");
    let ballast: Vec<u8> = vec![1u8; ballast_mib << 20];
    println!("spawns of `busybox true`, {count} each, caller ballast {ballast_mib} MiB; µs from the call to the program running");
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>8}",
        "", "p50", "p99", "mean", "cpu"
    );

    let work = tempfile::Builder::new()
        .prefix("jailer-bench")
        .tempdir()
        .expect("tempdir");
    let roots = RootMaker {
        base: work.path().to_path_buf(),
        next: 0,
    };
    let mut roots = roots;

    report(
        "std::process::Command",
        measure(count, || {
            let t = Instant::now();
            let mut c = Command::new(BUSYBOX).arg("true").spawn().expect("spawn");
            let d = t.elapsed();
            c.wait().expect("wait");
            d
        }),
    );
    report(
        "jailer, no jail",
        measure(count, || timed(&Spawn::new(BUSYBOX).arg("true"))),
    );

    // A network namespace made once, joined by every spawn (what a pool
    // of namespaces gives the clone path).
    let pooled = netns_holder(&mut roots);
    let jail = |roots: &mut RootMaker, netns: NetNs| {
        let mut j = Jail::new(roots.make(), 64_000, 64_000).bind(Bind::same_path(BUSYBOX));
        j.netns = netns;
        j
    };
    report(
        "jail, joined netns",
        measure(count, || {
            let s = Spawn::new(BUSYBOX)
                .arg("true")
                .jail(jail(&mut roots, join(&pooled)));
            timed(&s)
        }),
    );
    report(
        "jail, joined netns, +3 read-only binds",
        measure(count, || {
            let mut j = jail(&mut roots, join(&pooled));
            for lib in LIBS {
                j = j.bind(Bind::same_path(lib));
            }
            timed(&Spawn::new(BUSYBOX).arg("true").jail(j))
        }),
    );
    // One root for every jail, its mount points made once: each jail's
    // mounts live in its own namespace, so they can share it (the VM's
    // own writable directory would be one more bind).
    let shared = roots.make();
    report(
        "jail, joined netns, +3 binds, shared root",
        measure(count, || {
            let mut j = Jail::new(&shared, 64_000, 64_000).bind(Bind::same_path(BUSYBOX));
            j.netns = join(&pooled);
            for lib in LIBS {
                j = j.bind(Bind::same_path(lib));
            }
            timed(&Spawn::new(BUSYBOX).arg("true").jail(j))
        }),
    );
    report(
        "jail, host netns",
        measure(count, || {
            timed(
                &Spawn::new(BUSYBOX)
                    .arg("true")
                    .jail(jail(&mut roots, NetNs::Host)),
            )
        }),
    );
    report(
        "jail, new netns",
        measure(count, || {
            timed(
                &Spawn::new(BUSYBOX)
                    .arg("true")
                    .jail(jail(&mut roots, NetNs::New)),
            )
        }),
    );

    // SAFETY: no preconditions.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        println!("(VM cgroups skipped: a real-time task cannot join a cgroup v1 cpu group without an RT budget)");
        return;
    }
    let cgroups =
        Cgroups::detect(&format!("jailer-bench-{}", std::process::id())).expect("cgroups");
    let limits = Limits {
        memory_max: Some(256 << 20),
        swap_max: Some(0),
        pids_max: Some(64),
        ..Default::default()
    };
    let mut n = 0;
    let mut create = Vec::new();
    let mut remove = Vec::new();
    let spawns = measure(count, || {
        n += 1;
        let t = Instant::now();
        let cg = cgroups
            .create(&format!("vm-{n}"), &limits)
            .expect("create cgroup");
        create.push(t.elapsed());
        let s = Spawn::new(BUSYBOX)
            .arg("true")
            .jail(jail(&mut roots, join(&pooled)))
            .cgroup(cg.placement());
        let d = timed(&s);
        let t = Instant::now();
        cg.remove().expect("remove cgroup");
        remove.push(t.elapsed());
        d
    });
    report("jail, joined netns, in a VM cgroup", spawns);
    report("  cgroup create (with limits)", create);
    report("  cgroup remove", remove);
    for dir in cgroups.parent_dirs() {
        let _ = fs::remove_dir(dir);
    }
    drop(ballast);
}

/// Fresh jail roots, one per spawn (as each VM has its own).
struct RootMaker {
    base: PathBuf,
    next: usize,
}

impl RootMaker {
    fn make(&mut self) -> PathBuf {
        self.next += 1;
        let p = self.base.join(format!("root-{}", self.next));
        fs::create_dir(&p).expect("root dir");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod root");
        p
    }
}

/// A sleeping jailed process in a new network namespace, and that
/// namespace opened.
fn netns_holder(roots: &mut RootMaker) -> OwnedFd {
    let s = Spawn::new(BUSYBOX)
        .args(["sleep", "1000"])
        .jail(Jail::new(roots.make(), 64_000, 64_000).bind(Bind::same_path(BUSYBOX)));
    let holder = spawn(&s).expect("spawn the netns holder");
    let ns = fs::File::open(format!("/proc/{}/ns/net", holder.pid)).expect("open its netns");
    // The namespace lives as long as the descriptor: the holder may go.
    jailer::kill(&holder.pidfd, libc::SIGKILL).expect("kill holder");
    wait(&holder.pidfd, false).expect("reap holder");
    ns.into()
}

fn join(ns: &OwnedFd) -> NetNs {
    NetNs::Join(ns.try_clone().expect("dup netns"))
}

fn timed(s: &Spawn) -> Duration {
    let t = Instant::now();
    let j = spawn(s).expect("spawn");
    let d = t.elapsed();
    wait(&j.pidfd, false).expect("wait");
    d
}

/// Wall times of `count` runs of `f` (after a few warm-up runs), and the
/// CPU time this process and its reaped children used per run.
struct Sample {
    wall: Vec<Duration>,
    cpu_per_run: Option<Duration>,
}

fn measure(count: usize, mut f: impl FnMut() -> Duration) -> Sample {
    for _ in 0..count.min(10) {
        f();
    }
    let before = cpu_used();
    let wall = (0..count).map(|_| f()).collect();
    let cpu = cpu_used().saturating_sub(before);
    Sample {
        wall,
        cpu_per_run: Some(cpu / count as u32),
    }
}

/// User + system time of this process and its reaped children.
fn cpu_used() -> Duration {
    let mut total = Duration::ZERO;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: rusage is plain data filled by getrusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is ours for the call.
        unsafe { libc::getrusage(who, &mut ru) };
        for tv in [ru.ru_utime, ru.ru_stime] {
            total +=
                Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
        }
    }
    total
}

fn report(name: &str, sample: impl Into<Sample>) {
    let Sample {
        mut wall,
        cpu_per_run,
    } = sample.into();
    wall.sort();
    let us = |x: Duration| x.as_secs_f64() * 1e6;
    let p = |q: f64| us(wall[((wall.len() as f64 - 1.0) * q).round() as usize]);
    let mean = wall.iter().map(|x| us(*x)).sum::<f64>() / wall.len() as f64;
    let cpu = cpu_per_run.map_or(String::new(), |c| format!("{:>8.0}", us(c)));
    println!(
        "{name:<44} {:>8.0} {:>8.0} {:>8.0} {cpu}",
        p(0.5),
        p(0.99),
        mean
    );
}

impl From<Vec<Duration>> for Sample {
    fn from(wall: Vec<Duration>) -> Sample {
        Sample {
            wall,
            cpu_per_run: None,
        }
    }
}
