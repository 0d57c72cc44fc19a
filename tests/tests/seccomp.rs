//! End-to-end tests of the VMM's seccomp filters on real KVM: a master is
//! booted, warmed up and frozen with its filters on (its freeze writes the
//! snapshot under them), its clones run and serve commands confined, every
//! VMM thread shows `Seccomp: 2` from the host, and a forbidden system call
//! in a VMM thread ends the VMM by SIGSYS, reported as a seccomp violation.
//!
//! The violation is made by a test-only hook of debug builds of
//! `zygote-vmm` (`vmm::seccomp::test_hook`), asked for through the
//! environment; the VMMs here are the debug builds `cargo build` makes.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use host::store::Store;
use proto::launch::{ConsoleTarget, VmSource, VmmLaunch};
use zygote_tests::{bin, image, kill_processes_mentioning, ok, Sandbox};

const MASTER: &str = "confined";
/// `vmm::seccomp::test_hook::ENV`: `main` or `vcpu` makes that thread kind
/// call `socket(AF_INET, ...)` right after its filter is installed.
const VIOLATION: &str = "ZYGOTE_VMM_TEST_SECCOMP_VIOLATION";

/// Runs the `zygote` CLI on the sandbox with `env` added to its (and so
/// its VMMs') environment.
fn zygote_with(sandbox: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin("zygote"))
        .args(args)
        .env("ZYGOTE_RUNTIME_DIR", &sandbox.dir)
        .env("ZYGOTE_VMM", bin("zygote-vmm"))
        .env_remove(VIOLATION)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run zygote")
}

/// The `Seccomp:`, `Seccomp_filters:` and `NoNewPrivs:` values of each
/// thread of `pid` whose name is `main_name` or starts with `vcpu`:
/// `(thread name, is the main thread, seccomp mode, filters, no_new_privs)`.
fn thread_confinement(pid: u32) -> Vec<(String, bool, String, String, String)> {
    let mut out = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VMM's threads");
    for task in tasks.flatten() {
        let tid: u32 = task.file_name().to_string_lossy().parse().expect("a tid");
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let name = field("Name:");
        if tid == pid || name.starts_with("vcpu") {
            out.push((
                name,
                tid == pid,
                field("Seccomp:"),
                field("Seccomp_filters:"),
                field("NoNewPrivs:"),
            ));
        }
    }
    out.sort();
    out
}

/// A `zygote-vmm` restoring `snapshot`, started directly (as the host
/// does, with its files in `dir`), with or without filters and a hook.
fn spawn_clone_vmm(snapshot: &Path, dir: &Path, seccomp: bool, violation: Option<&str>) -> Child {
    std::fs::create_dir_all(dir).expect("VMM dir");
    let launch = VmmLaunch {
        source: VmSource::Restore {
            snapshot: snapshot.to_path_buf(),
        },
        vsock: Some(dir.join("vsock.sock")),
        control: None,
        console: ConsoleTarget::File(dir.join("console.log")),
        detach: false,
        kvm_fd: None,
        tap_fd: None,
        seccomp,
        vsock_reset: false,
    };
    let mut cmd = Command::new(bin("zygote-vmm"));
    cmd.args(launch.to_args())
        .env_remove(VIOLATION)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("events.jsonl")).expect("events file"))
        .stderr(std::fs::File::create(dir.join("vmm.log")).expect("vmm.log"));
    if let Some(kind) = violation {
        cmd.env(VIOLATION, kind);
    }
    cmd.spawn().expect("spawn zygote-vmm")
}

/// Waits until `child` ends, or panics after `timeout`.
fn wait_end(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM did not end within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the VMM in `dir` reports its vCPUs running.
fn wait_vcpus_running(child: &mut Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
        if events.contains("\"vcpu_running\"") {
            return;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "the VMM ended ({status}) before its vCPUs ran:\n{}",
                std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no vcpu_running event:\n{events}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn vmm_threads_are_confined_and_a_violation_is_reported_as_one() {
    let _ = image();
    let sandbox = Sandbox::new("seccomp");
    let store = Store::at(sandbox.dir.clone());
    let direct: PathBuf =
        std::env::temp_dir().join(format!("zygote-test-{}-seccomp-direct", std::process::id()));
    let _ = std::fs::remove_dir_all(&direct);

    // The master boots, warms up and is frozen with its filters on.
    let out = zygote_with(
        &sandbox,
        &[
            "master",
            "create",
            MASTER,
            "--vcpus",
            "2",
            "--warmup",
            "echo confined > /tmp/state",
            "--boot-timeout",
            "240",
        ],
        &[],
    );
    ok(&out, "master create");

    // A clone runs normally, confined: every thread has its own filter.
    let out = zygote_with(
        &sandbox,
        &["clone", MASTER, "--detach", "--timeout", "240"],
        &[],
    );
    let id = ok(&out, "clone").trim().to_string();
    let out = zygote_with(&sandbox, &["exec", &id, "--", "cat", "/tmp/state"], &[]);
    assert_eq!(ok(&out, "exec"), "confined\n");
    let pid = store.clone_record(&id).expect("clone record").pid;
    let threads = thread_confinement(pid);
    assert_eq!(
        threads.iter().filter(|t| t.0.starts_with("vcpu")).count(),
        2,
        "{threads:?}"
    );
    assert!(threads.iter().any(|t| t.1), "{threads:?}");
    for (name, _, mode, filters, nnp) in &threads {
        assert_eq!(
            (mode.as_str(), filters.as_str(), nnp.as_str()),
            ("2", "1", "1"),
            "thread {name} of the clone's VMM: Seccomp, Seccomp_filters, NoNewPrivs"
        );
    }
    // Still serving after the look.
    let out = zygote_with(&sandbox, &["exec", &id, "--", "echo", "still"], &[]);
    assert_eq!(ok(&out, "exec"), "still\n");

    // A forbidden call on either thread kind ends the clone's VMM, and
    // the user is told it was its seccomp filter, which call, and where.
    for kind in ["vcpu", "main"] {
        let out = zygote_with(
            &sandbox,
            &["clone", MASTER, "--detach", "--timeout", "240"],
            &[(VIOLATION, kind)],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind}: the clone started: {stderr}");
        assert!(
            stderr.contains(&format!(
                "the VMM was killed by its seccomp filter: a forbidden system call: socket (41) on the {kind} thread"
            )),
            "{kind}: {stderr}"
        );
    }

    // The same VMM started directly: it dies by SIGSYS, before any vCPU
    // ran, and says why on its stderr.
    let snapshot = store.master(MASTER).expect("master record").snapshot;
    for kind in ["vcpu", "main"] {
        let dir = direct.join(format!("sigsys-{kind}"));
        let mut child = spawn_clone_vmm(&snapshot, &dir, true, Some(kind));
        let status = wait_end(&mut child, Duration::from_secs(30));
        let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {status}: {log}"
        );
        assert!(
            log.contains(&format!(
                "zygote-vmm: seccomp: forbidden system call: socket (41) on the {kind} thread (args 0x2 "
            )),
            "{kind}: {log}"
        );
        let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
        assert!(!events.contains("vcpu_running"), "{kind}: {events}");
    }

    // Without filters (--no-seccomp, for debugging) the hook's call is
    // made and nothing happens: it is the filter that kills.
    let dir = direct.join("unconfined");
    let mut child = spawn_clone_vmm(&snapshot, &dir, false, Some("main"));
    wait_vcpus_running(&mut child, &dir);
    for (name, _, mode, _, _) in thread_confinement(child.id()) {
        assert_eq!(mode, "0", "thread {name} without filters");
    }
    assert!(child.try_wait().expect("wait").is_none(), "it runs on");
    child.kill().expect("kill the unconfined VMM");
    child.wait().expect("reap it");

    let out = zygote_with(&sandbox, &["kill", "--all"], &[]);
    ok(&out, "kill --all");
    let out = zygote_with(&sandbox, &["master", "rm", MASTER], &[]);
    ok(&out, "master rm");
    assert_eq!(kill_processes_mentioning(&direct), 0, "direct VMMs left");
    let _ = std::fs::remove_dir_all(&direct);
    let _ = std::fs::remove_dir(sandbox.dir.join("clones"));
    let _ = std::fs::remove_dir(sandbox.dir.join("masters"));
    sandbox.assert_clean();
}
