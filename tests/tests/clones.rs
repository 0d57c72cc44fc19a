//! End-to-end tests of masters and clones through the `zygote` CLI: one
//! real master (cold boot + warm-up) for the whole run, then clones of it,
//! as a user would drive them. Guest kernel code is slow on hosts whose KVM
//! emulates it, so everything shares that master and each guest command is
//! one process.

use std::collections::HashSet;
use std::path::Path;
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use host::agent::AgentClient;
use host::store::Store;
use proto::events::{DevicePhase, Event};
use zygote_tests::{image, ok, processes_mentioning, Sandbox};

const MASTER: &str = "warm";
/// A file in tmpfs, a running process, and a value in that process's memory.
const WARMUP: &str = "echo warm-state > /tmp/state; \
    SECRET=kept-in-memory sleep 31337 & echo sleeper=$!";

fn clone_ids(sandbox: &Sandbox, count: usize) -> Vec<String> {
    let out = sandbox.zygote(
        &[
            "clone",
            MASTER,
            "--count",
            &count.to_string(),
            "--detach",
            "--timeout",
            "240",
        ],
        b"",
    );
    let ids: Vec<String> = ok(&out, "zygote clone")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), count, "one id per clone");
    ids
}

fn exec(sandbox: &Sandbox, id: &str, args: &[&str]) -> Output {
    let mut argv = vec!["exec", id, "--"];
    argv.extend_from_slice(args);
    sandbox.zygote(&argv, b"")
}

/// The first 32 of 4096 random bytes clone `id` reads, and the text of its
/// hostname followed by `files`.
fn random_and_files(sandbox: &Sandbox, id: &str, files: &[&str]) -> (Vec<u8>, String) {
    let mut args = vec![
        "head",
        "-q",
        "-c",
        "4096",
        "/dev/urandom",
        "/proc/sys/kernel/hostname",
    ];
    args.extend_from_slice(files);
    let out = exec(sandbox, id, &args);
    assert!(out.status.success(), "{id}: {out:?}");
    let (random, rest) = out.stdout.split_at(4096);
    (
        random[..32].to_vec(),
        String::from_utf8_lossy(rest).into_owned(),
    )
}

fn private_kib(sandbox: &Sandbox, id: &str) -> u64 {
    let out = ok(&sandbox.zygote(&["ps", "--json"], b""), "zygote ps");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("ps --json");
    rows.iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["private_kib"].as_u64())
        .unwrap_or_else(|| panic!("{id} not in ps: {out}"))
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn clones_of_a_warm_master() {
    let _ = image();
    let sandbox = Sandbox::new("clones");
    let store = Store::at(sandbox.dir.clone());

    // The master: cold boot, warm-up, freeze.
    let out = sandbox.zygote(
        &[
            "master",
            "create",
            MASTER,
            "--memory",
            "128",
            "--warmup",
            WARMUP,
            "--boot-timeout",
            "240",
        ],
        b"",
    );
    ok(&out, "master create");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let sleeper: u32 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("sleeper="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("warm-up output missing: {stderr}"));
    let ls = ok(&sandbox.zygote(&["master", "ls"], b""), "master ls");
    assert!(ls.lines().any(|l| l.starts_with(MASTER)), "{ls}");
    // The frozen master keeps no process.
    assert!(processes_mentioning(&sandbox.dir.to_string_lossy()).is_empty());

    // Ten clones: each has the warm-up's state, and each is unique.
    let ids = clone_ids(&sandbox, 10);
    let environ = format!("/proc/{sleeper}/environ");
    let mut randoms = HashSet::new();
    let mut hostnames = HashSet::new();
    for id in &ids {
        let (random, text) = random_and_files(&sandbox, id, &["/tmp/state", &environ]);
        let mut lines = text.lines();
        let hostname = lines.next().unwrap_or_default().to_string();
        assert_eq!(hostname, *id, "the hostname is the clone id");
        assert_eq!(lines.next(), Some("warm-state"), "{id}: tmpfs file");
        assert!(
            text.contains("SECRET=kept-in-memory"),
            "{id}: the warm-up's process and its memory are there: {text:?}"
        );
        randoms.insert(random);
        hostnames.insert(hostname);
    }
    assert_eq!(
        randoms.len(),
        10,
        "every clone reads different random bytes"
    );
    assert_eq!(hostnames.len(), 10);

    // Each clone's host took over the agent connection carried from the
    // master: no transport reset, no new connection. A clone made the
    // other way (reset, connect anew: what a Firecracker restore does)
    // answers too, and is as unique.
    let phases = |id: &str| -> Vec<DevicePhase> {
        host::vmm::read_events(&store.clone_dir(id))
            .into_iter()
            .filter_map(|e| match e {
                Event::DevicePhase { phase, .. } => Some(phase),
                _ => None,
            })
            .collect()
    };
    for id in &ids {
        let p = phases(id);
        assert!(p.contains(&DevicePhase::ConnectionCarried), "{id}: {p:?}");
        assert!(
            !p.contains(&DevicePhase::TransportResetPosted),
            "{id}: {p:?}"
        );
    }
    let out = sandbox.zygote(&["clone", MASTER, "--detach", "--connection", "reset"], b"");
    let reset_id = ok(&out, "clone --connection reset").trim().to_string();
    let p = phases(&reset_id);
    for step in [
        DevicePhase::TransportResetPosted,
        DevicePhase::ConnectionRequested,
        DevicePhase::ConnectionAccepted,
    ] {
        assert!(p.contains(&step), "{reset_id}: {step:?} in {p:?}");
    }
    assert!(!p.contains(&DevicePhase::ConnectionCarried), "{p:?}");
    let (random, text) = random_and_files(&sandbox, &reset_id, &[]);
    assert_eq!(text.trim(), reset_id);
    assert!(randoms.insert(random), "its random bytes are its own");
    ok(&sandbox.zygote(&["kill", &reset_id], b""), "kill");

    // The wall clock was set from the host's at clone time.
    let before = unix_s();
    let out = exec(&sandbox, &ids[0], &["date", "+%s"]);
    let after = unix_s();
    let guest: u64 = ok(&out, "date").trim().parse().expect("date +%s");
    assert!(
        guest + 1 >= before && guest <= after + 1,
        "guest clock {guest} outside host [{before}, {after}]"
    );

    // Isolation: what clone A writes, B and later clones do not see.
    let (a, b) = (&ids[0], &ids[1]);
    let a_before = private_kib(&sandbox, a);
    let out = exec(
        &sandbox,
        a,
        &[
            "sh",
            "-c",
            "echo from-a > /tmp/state; head -c 24m /dev/zero > /tmp/big",
        ],
    );
    ok(&out, "write in clone A");
    let a_after = private_kib(&sandbox, a);
    assert!(
        a_after >= a_before + 24 * 1024,
        "clone A's writes are its own memory: {a_before} -> {a_after} KiB"
    );
    assert!(
        private_kib(&sandbox, b) < a_before + 8 * 1024,
        "clone B did not pay for A's writes"
    );
    let later = clone_ids(&sandbox, 1).remove(0);
    for id in [b, &later] {
        let out = exec(&sandbox, id, &["cat", "/tmp/state", "/tmp/big"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "warm-state\n", "{id}");
        assert!(!out.status.success(), "{id}: /tmp/big must not exist");
    }

    // Killing a clone (or its VMM dying) leaves its siblings and the master alone.
    ok(&sandbox.zygote(&["kill", a], b""), "kill");
    let rec = store.clone_record(b).expect("record of B");
    let c = &ids[2];
    let c_pid = store.clone_record(c).unwrap().pid;
    // SAFETY: plain kill(2) of the clone's VMM: a crash from outside.
    unsafe { libc::kill(c_pid as i32, libc::SIGKILL) };
    let out = exec(&sandbox, b, &["cat", "/tmp/state"]);
    assert_eq!(ok(&out, "B after A was killed"), "warm-state\n");
    assert!(rec.alive());
    let ps = ok(&sandbox.zygote(&["ps"], b""), "ps");
    assert!(!ps.contains(a.as_str()), "killed clone is gone: {ps}");
    assert!(
        ps.lines()
            .any(|l| l.starts_with(c.as_str()) && l.contains("exited")),
        "{ps}"
    );
    let out = exec(&sandbox, c, &["true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));

    // A master with clones is not removed by accident.
    let out = sandbox.zygote(&["master", "rm", MASTER], b"");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("still run"));

    ok(&sandbox.zygote(&["kill", "--all"], b""), "kill --all");

    // Fifty clones at once, each answering its agent.
    let many = clone_ids(&sandbox, 50);
    for id in &many {
        let mut agent = AgentClient::connect(&store.clone_dir(id).join("vsock.sock"))
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        agent.ping().unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    for id in [&many[0], &many[24], &many[49]] {
        ok(&exec(&sandbox, id, &["true"]), "exec in one of 50");
    }
    ok(&sandbox.zygote(&["kill", "--all"], b""), "kill --all");

    snapshots_round_trip(&sandbox);

    ok(&sandbox.zygote(&["kill", "--all"], b""), "kill --all");
    for name in [MASTER, "loaded"] {
        ok(&sandbox.zygote(&["master", "rm", name], b""), "master rm");
    }
    std::fs::remove_dir_all(sandbox.dir.join("saved")).unwrap();
    let _ = std::fs::remove_dir(sandbox.dir.join("clones"));
    let _ = std::fs::remove_dir(sandbox.dir.join("masters"));
    sandbox.assert_clean();
}

fn load_fails(sandbox: &Sandbox, dir: &Path, expect: &str) {
    let out = sandbox.zygote(
        &["snapshot", "load", &dir.to_string_lossy(), "--as", "bad"],
        b"",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "loading {} worked", dir.display());
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(!sandbox.dir.join("masters/bad").exists());
}

/// Save -> load -> clone, and damaged snapshots refused by name.
fn snapshots_round_trip(sandbox: &Sandbox) {
    let saved = sandbox.dir.join("saved");
    let dir = saved.join("snap");
    std::fs::create_dir_all(&saved).unwrap();
    ok(
        &sandbox.zygote(&["snapshot", "save", MASTER, &dir.to_string_lossy()], b""),
        "snapshot save",
    );
    let memory = dir.join("memory");
    let meta = std::fs::metadata(&memory).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), 128 << 20);
    assert!(
        meta.blocks() * 512 < meta.len(),
        "zero pages are not stored"
    );

    // Damaged copies, each refused with the reason.
    let copy = |name: &str| {
        let d = saved.join(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["memory", "snapshot.json"] {
            let out = std::process::Command::new("cp")
                .args(["--sparse=always"])
                .arg(dir.join(f))
                .arg(d.join(f))
                .status()
                .unwrap();
            assert!(out.success());
        }
        d
    };
    let corrupt = copy("corrupt");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(corrupt.join("memory"))
            .unwrap();
        f.write_all_at(b"\xde\xad\xbe\xef", 1 << 20).unwrap();
    }
    load_fails(sandbox, &corrupt, "checksum");
    let truncated = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    load_fails(sandbox, &truncated, "memory");
    let other = copy("other-version");
    let manifest = other.join("snapshot.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["version"] = 99.into();
    std::fs::write(&manifest, v.to_string()).unwrap();
    load_fails(sandbox, &other, "version 99");
    load_fails(sandbox, &saved.join("missing"), "no snapshot");

    // The good one becomes a master whose clones have the warm state.
    let out = sandbox.zygote(
        &["snapshot", "load", &dir.to_string_lossy(), "--as", "loaded"],
        b"",
    );
    assert_eq!(ok(&out, "snapshot load").trim(), "loaded");
    let out = sandbox.zygote(&["clone", "loaded", "--detach"], b"");
    let id = ok(&out, "clone of loaded").trim().to_string();
    let out = exec(sandbox, &id, &["cat", "/tmp/state"]);
    assert_eq!(
        ok(&out, "state in a clone of a loaded snapshot"),
        "warm-state\n"
    );
}
