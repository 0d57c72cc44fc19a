//! End-to-end test of the confinement of VMMs, through the `zygote` CLI on
//! one real master: what a user (or an auditor) checks from the host in
//! `/proc` of a clone's VMM, that a clone over its memory limit dies alone
//! and says why, and that nothing of a jail outlives its VM, also after a
//! `kill -9` of the VMM or of the `zygote` process that started it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use host::store::Store;
use zygote_tests::{bin, image, ok, Sandbox};

const MASTER: &str = "jailed";

fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The VMM's cgroup directories (one per hierarchy it is in below `/`).
fn cgroup_dirs(pid: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        if !path.contains("/zygote") {
            continue;
        }
        let mount = if controllers.is_empty() {
            ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .find(|m| Path::new(m).join("cgroup.controllers").exists())
                .unwrap_or("/sys/fs/cgroup")
                .to_string()
        } else {
            let c = controllers.split(',').next().unwrap_or_default();
            format!("/sys/fs/cgroup/{c}")
        };
        let dir = PathBuf::from(format!("{mount}{path}"));
        if dir.exists() {
            dirs.push(dir);
        }
    }
    dirs
}

fn memory_limit(dirs: &[PathBuf]) -> Option<u64> {
    dirs.iter().find_map(|d| {
        ["memory.max", "memory.limit_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            .and_then(|t| t.trim().parse().ok())
    })
}

fn pid_of(store: &Store, id: &str) -> u32 {
    store.clone_record(id).unwrap().pid
}

fn wait_gone(pid: u32, what: &str) {
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{what} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn uid_lease_exists(uid: &str) -> bool {
    Path::new("/run/zygote-jail/uids").join(uid).exists()
}

#[test]
fn every_vmm_is_jailed_limited_and_leaves_nothing_behind() {
    let _ = image();
    let sandbox = Sandbox::new("jail");
    let store = Store::at(sandbox.dir.clone());
    let out = sandbox.zygote(
        &[
            "master",
            "create",
            MASTER,
            "--memory",
            "128",
            "--boot-timeout",
            "240",
        ],
        b"",
    );
    ok(&out, "master create");

    let start = |extra: &[&str]| -> String {
        let mut args = vec!["clone", MASTER, "--detach", "--timeout", "240"];
        args.extend_from_slice(extra);
        ok(&sandbox.zygote(&args, b""), "zygote clone")
            .trim()
            .to_string()
    };
    let id = start(&[]);
    let pid = pid_of(&store, &id);

    // What /proc says of the clone's VMM (main thread and every thread).
    assert_ne!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_ne!(
        status_field(pid, "Gid").split_whitespace().next(),
        Some("0")
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.starts_with("kvm") {
            continue; // KVM's own kernel worker in the process: no syscalls.
        }
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "thread {} ({}) has no seccomp filter",
            task.display(),
            comm.trim()
        );
    }
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "the VMM shares the host's {kind} namespace"
        );
    }
    // Its root holds only what it needs: its sockets and console, the
    // master's snapshot, and its loader and libraries.
    let root: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let allowed: BTreeSet<&str> = [
        "vsock.sock",
        "console.log",
        "snapshot",
        "lib",
        "lib64",
        "usr",
    ]
    .into();
    for name in &root {
        assert!(
            allowed.contains(name.as_str()),
            "unexpected {name} in the VMM's root: {root:?}"
        );
    }
    assert!(
        root.contains("snapshot") && root.contains("vsock.sock"),
        "{root:?}"
    );
    let snap: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root/snapshot"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(snap.iter().any(|n| n == "memory"), "{snap:?}");
    // Its cgroup: guest RAM + the VMM's allowance.
    let dirs = cgroup_dirs(pid);
    assert!(!dirs.is_empty(), "the VMM is in no zygote cgroup");
    assert_eq!(memory_limit(&dirs), Some((128 + 64) << 20));
    let uid = status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(uid_lease_exists(&uid), "the uid is leased");

    // A clone over its memory limit is killed alone, and says why.
    let small = start(&["--memory-max", "40"]);
    let small_pid = pid_of(&store, &small);
    let out = sandbox.zygote(
        &[
            "exec",
            &small,
            "--",
            "sh",
            "-c",
            "head -c 100000000 /dev/zero > /tmp/big; echo survived",
        ],
        b"",
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("survived"),
        "the clone wrote 100 MB with a 40 MiB limit"
    );
    wait_gone(small_pid, "the clone over its limit");
    let ps = ok(&sandbox.zygote(&["ps"], b""), "ps");
    let line = ps
        .lines()
        .find(|l| l.starts_with(&small))
        .unwrap_or_default();
    assert!(line.contains("memory"), "ps does not say why: {ps}");
    let out = sandbox.zygote(&["exec", &id, "--", "echo", "sibling"], b"");
    assert_eq!(ok(&out, "exec in the sibling").trim(), "sibling");

    // Killing clones gives back their cgroups and uids.
    ok(&sandbox.zygote(&["kill", &id, &small], b""), "kill");
    wait_gone(pid, "the killed clone");
    for d in &dirs {
        assert!(!d.exists(), "{} is left behind", d.display());
    }
    assert!(!uid_lease_exists(&uid), "the uid lease is left behind");

    // kill -9 of a VMM: `zygote kill` then takes back what it held.
    let id = start(&[]);
    let pid = pid_of(&store, &id);
    let dirs = cgroup_dirs(pid);
    // SAFETY: kill() with a valid signal has no memory effects.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid, "the VMM killed by SIGKILL");
    ok(&sandbox.zygote(&["kill", &id], b""), "kill after SIGKILL");
    for d in &dirs {
        assert!(!d.exists(), "{} is left behind", d.display());
    }

    // kill -9 of the `zygote clone` that started a clone (not detached):
    // its VMM dies with it, and the next `zygote kill --all` takes back the
    // rest.
    let mut caller = Command::new(bin("zygote"))
        .args(["clone", MASTER, "--timeout", "240"])
        .env("ZYGOTE_RUNTIME_DIR", &sandbox.dir)
        .env("ZYGOTE_VMM", bin("zygote-vmm"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(caller.stdout.as_mut().unwrap());
        r.read_line(&mut line).unwrap();
    }
    let id = line.trim().to_string();
    let pid = pid_of(&store, &id);
    let dirs = cgroup_dirs(pid);
    caller.kill().unwrap();
    caller.wait().unwrap();
    wait_gone(pid, "the VMM of a killed caller");
    ok(&sandbox.zygote(&["kill", "--all"], b""), "kill --all");
    for d in &dirs {
        assert!(!d.exists(), "{} is left behind", d.display());
    }
    ok(&sandbox.zygote(&["master", "rm", MASTER], b""), "master rm");
    // The (empty) directories of the state directory may stay.
    let _ = std::fs::remove_dir(sandbox.dir.join("clones"));
    let _ = std::fs::remove_dir(sandbox.dir.join("masters"));
    sandbox.assert_clean();
}
