//! End-to-end tests of the jailer as root: real namespaces, mounts,
//! credentials and cgroups, checked from the host through `/proc` and the
//! cgroup files, and from inside through what the jailed program prints.
//!
//! They fail (not skip) when not run as root. They run one at a time (a
//! lock), so that "no child is left" can be checked with `waitid(P_ALL)`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jailer::cgroup::{CgroupError, Cgroups, Controller, CpuMax, Limits, Version};
use jailer::{
    elf_runtime_files, spawn, wait, Bind, Exit, Jail, JailError, Jailed, NetNs, Spawn, Stdio,
};

const BUSYBOX: &str = "/bin/busybox";

/// Serialises the tests and checks we are root.
fn setup() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the jailer tests need root (namespaces, mounts, setuid, cgroups)"
    );
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh jail root, searchable by the jail's uid.
struct Root {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn root() -> Root {
    let dir = tempfile::Builder::new()
        .prefix("jailer-test")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    Root {
        path: dir.path().to_path_buf(),
        _dir: dir,
    }
}

fn busybox_jail(root: &Root, id: u32) -> Jail {
    Jail::new(&root.path, id, id).bind(Bind::same_path(BUSYBOX))
}

/// Kills and reaps the process when dropped (a failing test leaves nothing).
struct Running(Option<Jailed>);

impl Running {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().pid
    }

    fn jailed(&self) -> &Jailed {
        self.0.as_ref().unwrap()
    }

    /// Waits up to `limit` for it to end.
    fn wait_for(&mut self, limit: Duration) -> Exit {
        let j = self.0.take().expect("still ours");
        let until = Instant::now() + limit;
        loop {
            if let Some(exit) = wait(&j.pidfd, true).unwrap() {
                return exit;
            }
            if Instant::now() > until {
                let _ = jailer::kill(&j.pidfd, libc::SIGKILL);
                let _ = wait(&j.pidfd, false);
                panic!("pid {} still runs after {limit:?}", j.pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) -> Exit {
        jailer::kill(&self.jailed().pidfd, libc::SIGKILL).unwrap();
        self.wait_for(Duration::from_secs(10))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(j) = self.0.take() {
            let _ = jailer::kill(&j.pidfd, libc::SIGKILL);
            let _ = wait(&j.pidfd, false);
        }
    }
}

fn start(s: &Spawn) -> Running {
    Running(Some(
        spawn(s).unwrap_or_else(|e| panic!("spawn failed: {e} ({e:?})")),
    ))
}

fn pipe() -> (File, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two new descriptors we own.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Runs `s` with its stdout on a pipe; returns how it ended and what it
/// printed.
fn output(mut s: Spawn) -> (Exit, String) {
    let (mut r, w) = pipe();
    s.stdout = Stdio::Fd(w);
    let mut p = start(&s);
    drop(s);
    let mut out = String::new();
    r.read_to_string(&mut out).unwrap();
    (p.wait_for(Duration::from_secs(30)), out)
}

fn status(pid: u32) -> Vec<(String, String)> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn field(status: &[(String, String)], key: &str) -> String {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {key} in status"))
}

fn ns(pid: &str, name: &str) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/{name}")).unwrap()
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.insert(e.path().strip_prefix(dir).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// The caller has no child at all, running or zombie.
fn assert_no_children() {
    // SAFETY: siginfo_t is plain data.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is ours; WNOWAIT reaps nothing.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: filled by waitid when r == 0.
    let pid = unsafe { info.si_pid() };
    assert!(
        r < 0 && errno == Some(libc::ECHILD),
        "a child is left: waitid {r}, pid {pid}"
    );
}

fn sleeper() -> Spawn {
    Spawn::new(BUSYBOX).args(["sleep", "1000"])
}

#[test]
fn a_jailed_process_has_no_privileges_and_its_own_namespaces() {
    let _g = setup();
    let root = root();
    let mut p = start(&sleeper().jail(busybox_jail(&root, 64_101)));
    let pid = p.pid();

    let st = status(pid);
    assert_eq!(field(&st, "Uid"), "64101\t64101\t64101\t64101");
    assert_eq!(field(&st, "Gid"), "64101\t64101\t64101\t64101");
    assert_eq!(field(&st, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    // Pid 1 in a namespace of its own.
    assert_eq!(field(&st, "NSpid"), format!("{pid}\t1"));

    for name in ["mnt", "pid", "ipc", "uts", "net", "cgroup"] {
        assert_ne!(
            ns(&pid.to_string(), name),
            ns("self", name),
            "{name} namespace"
        );
    }

    // Its root holds the bind and nothing else of the host.
    let visible = tree(Path::new(&format!("/proc/{pid}/root")));
    assert_eq!(
        visible,
        ["bin", "bin/busybox"]
            .map(PathBuf::from)
            .into_iter()
            .collect()
    );
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mounts: Vec<(&str, &str)> = mounts
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[4], f[5])
        })
        .collect();
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert_eq!(mounts[0].0, "/");
    assert!(mounts[0].1.starts_with("rw,nosuid,nodev"), "{mounts:?}");
    assert_eq!(mounts[1].0, "/bin/busybox");
    assert!(mounts[1].1.starts_with("ro,nosuid,nodev"), "{mounts:?}");

    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        let l = limits.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(limit("Max open files"), "4096 4096");
    assert_eq!(limit("Max core file size"), "0 0");

    assert_eq!(
        p.kill(),
        Exit::Signal {
            signal: libc::SIGKILL,
            core_dumped: false
        }
    );
    assert_no_children();
}

#[test]
fn the_jails_mount_namespace_holds_no_host_mount() {
    let _g = setup();
    let root = root();
    let p = start(&sleeper().jail(busybox_jail(&root, 64_114)));
    let ns = File::open(format!("/proc/{}/ns/mnt", p.pid())).unwrap();
    let proc_dir = File::open("/proc").unwrap();
    // Entered from a thread of our own (with its own fs_struct, as setns
    // requires), read through our /proc, which that namespace lacks.
    let mountinfo = std::thread::scope(|t| {
        t.spawn(|| {
            // SAFETY: these change this thread's fs_struct and mount
            // namespace only; the thread ends right after.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_FS), 0);
                assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS), 0);
                let fd = libc::openat(
                    proc_dir.as_raw_fd(),
                    c"thread-self/mountinfo".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                );
                assert!(fd >= 0);
                let mut s = String::new();
                File::from_raw_fd(fd).read_to_string(&mut s).unwrap();
                s
            }
        })
        .join()
        .unwrap()
    });
    let mounts: BTreeSet<(String, String)> = mountinfo
        .lines()
        .map(|l| {
            let (left, right) = l.split_once(" - ").unwrap();
            (
                left.split(' ').nth(4).unwrap().to_string(),
                right.split(' ').next().unwrap().to_string(),
            )
        })
        .collect();
    let root_fs = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .map(|l| {
            l.split_once(" - ")
                .unwrap()
                .1
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .unwrap();
    assert_eq!(
        mounts,
        [
            ("/".to_string(), "tmpfs".to_string()),
            ("/jail".to_string(), root_fs.clone()),
            ("/jail/bin/busybox".to_string(), root_fs),
        ]
        .into_iter()
        .collect(),
        "only the empty template, the jail root and its bind"
    );
}

#[test]
fn a_jailed_process_joins_the_given_network_namespace() {
    let _g = setup();
    let root = root();
    let first = start(&sleeper().jail(busybox_jail(&root, 64_102)));
    let first_ns = ns(&first.pid().to_string(), "net");
    assert_ne!(first_ns, ns("self", "net"));

    let fd = File::open(format!("/proc/{}/ns/net", first.pid())).unwrap();
    let mut jail = busybox_jail(&root, 64_102);
    jail.netns = NetNs::Join(fd.into());
    let second = start(&sleeper().jail(jail));
    assert_eq!(ns(&second.pid().to_string(), "net"), first_ns);

    let mut jail = busybox_jail(&root, 64_102);
    jail.netns = NetNs::Host;
    let third = start(&sleeper().jail(jail));
    assert_eq!(ns(&third.pid().to_string(), "net"), ns("self", "net"));
}

#[test]
fn inside_the_jail_the_program_sees_only_its_root() {
    let _g = setup();
    let root = root();
    let mut jail = busybox_jail(&root, 64_103);
    jail.proc = true;
    jail.hostname = "vm-7".into();
    let (exit, out) = output(
        Spawn::new(BUSYBOX)
            .args([
                "sh",
                "-c",
                "hostname; id -u; id -g; echo $$; ls -a /; echo /proc/[0-9]*",
            ])
            .jail(jail),
    );
    assert_eq!(exit, Exit::Code(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["vm-7", "64103", "64103", "1", ".", "..", "bin", "proc", "/proc/1"],
        "hostname, ids, pid, root, and the only process /proc shows"
    );
    assert_no_children();
}

#[test]
fn jails_share_a_read_only_root_and_each_writes_only_its_own_directory() {
    let _g = setup();
    let shared = root();
    let mut outputs = Vec::new();
    let mut vm_dirs = Vec::new();
    for (i, id) in [64_115u32, 64_116].into_iter().enumerate() {
        let vm = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(vm.path(), Some(id), Some(id)).unwrap();
        let mut jail = busybox_jail(&shared, id).bind(Bind::writable(vm.path(), "/run/vm"));
        jail.readonly_root = true;
        let script = format!(
            "echo vm{i} > /run/vm/console.log; touch /intruder 2>/dev/null && echo wrote-root; ls /run/vm"
        );
        outputs.push(output(
            Spawn::new(BUSYBOX).args(["sh", "-c", &script]).jail(jail),
        ));
        vm_dirs.push(vm);
    }
    for (i, (exit, out)) in outputs.iter().enumerate() {
        assert_eq!(
            (*exit, out.as_str()),
            (Exit::Code(0), "console.log\n"),
            "jail {i}"
        );
        let log = fs::read_to_string(vm_dirs[i].path().join("console.log")).unwrap();
        assert_eq!(log, format!("vm{i}\n"));
    }
    assert!(!shared.path.join("intruder").exists());
    // The shared root holds only the mount points, made once.
    assert_eq!(
        tree(&shared.path),
        ["bin", "bin/busybox", "run", "run/vm"]
            .map(PathBuf::from)
            .into_iter()
            .collect()
    );
}

#[test]
fn descriptors_are_placed_at_their_numbers_and_nothing_else_leaks() {
    let _g = setup();
    let root = root();
    let (mut a_read, a_write) = pipe();
    let (mut b_read, b_write) = pipe();
    let (na, nb) = (a_write.as_raw_fd(), b_write.as_raw_fd());
    // A descriptor the caller forgot to mark close-on-exec.
    // SAFETY: dup of our own open descriptor; the copy is owned below.
    let leaked = unsafe { OwnedFd::from_raw_fd(libc::dup(a_read.as_raw_fd())) };

    // Swapped numbers: a goes to b's number and b to a's.
    let s = Spawn::new(BUSYBOX)
        .args(["sh", "-c", &format!("echo to-a >&{nb}; echo to-b >&{na}")])
        .fd(a_write, nb)
        .fd(b_write, na)
        .jail(busybox_jail(&root, 64_104));
    let mut p = start(&s);
    drop(s);
    assert_eq!(p.wait_for(Duration::from_secs(10)), Exit::Code(0));
    let (mut a, mut b) = (String::new(), String::new());
    a_read.read_to_string(&mut a).unwrap();
    b_read.read_to_string(&mut b).unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("to-a\n", "to-b\n"));

    // What a jailed process holds: stdio and the given ones only.
    let (_keep, w) = pipe();
    let s = sleeper().fd(w, 9).jail(busybox_jail(&root, 64_104));
    let p = start(&s);
    let fds: BTreeSet<String> = fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        fds,
        ["0", "1", "2", "9"].map(String::from).into_iter().collect()
    );
    drop(leaked);
}

#[test]
fn a_failing_step_is_a_typed_error_and_leaves_no_child() {
    let _g = setup();
    let root = root();

    // A bind source that does not exist: refused before any process.
    let jail = busybox_jail(&root, 64_105).bind(Bind::readonly("/nonexistent/vmlinux", "/vmlinux"));
    match spawn(&sleeper().jail(jail)) {
        Err(JailError::BindSource { path, source }) => {
            assert_eq!(path, Path::new("/nonexistent/vmlinux"));
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected BindSource, got {other:?}"),
    }
    assert_no_children();

    // A directory onto an existing file: refused while making the mount
    // point, before any process.
    fs::write(root.path.join("data"), "").unwrap();
    let jail = busybox_jail(&root, 64_105).bind(Bind::writable("/etc", "/data"));
    match spawn(&sleeper().jail(jail)) {
        Err(JailError::MountPoint { target, source, .. }) => {
            assert_eq!(target, Path::new("/data"));
            assert_eq!(source.raw_os_error(), Some(libc::ENOTDIR));
        }
        other => panic!("expected MountPoint, got {other:?}"),
    }
    assert_no_children();

    // A file onto an existing directory: refused the same way.
    fs::create_dir(root.path.join("conf")).unwrap();
    let jail = busybox_jail(&root, 64_105).bind(Bind::readonly("/etc/hostname", "/conf"));
    match spawn(&sleeper().jail(jail)) {
        Err(JailError::MountPoint { target, source, .. }) => {
            assert_eq!(target, Path::new("/conf"));
            assert_eq!(source.raw_os_error(), Some(libc::EISDIR));
        }
        other => panic!("expected MountPoint, got {other:?}"),
    }
    assert_no_children();

    // A dynamic program without its loader in the jail.
    match spawn(
        &Spawn::new("/bin/sh")
            .args(["-c", "true"])
            .jail(busybox_jail(&root, 64_105)),
    ) {
        Err(JailError::Exec { program, source }) => {
            assert_eq!(program, Path::new("/bin/sh"));
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected Exec, got {other:?}"),
    }
    assert_no_children();

    // Root, or the "unchanged" id, is refused.
    for (uid, gid) in [(0, 64_105), (64_105, u32::MAX)] {
        let jail = Jail::new(&root.path, uid, gid);
        assert!(matches!(
            spawn(&sleeper().jail(jail)),
            Err(JailError::PrivilegedId { .. })
        ));
    }
    assert_no_children();
}

#[test]
fn with_its_runtime_files_a_dynamic_program_runs_in_the_jail() {
    let _g = setup();
    let root = root();
    let mut jail = Jail::new(&root.path, 64_106, 64_106);
    for f in elf_runtime_files(Path::new("/bin/sh")).unwrap() {
        jail = jail.bind(Bind::same_path(f));
    }
    let (exit, out) = output(
        Spawn::new("/bin/sh")
            .args(["-c", "echo ok from $$"])
            .jail(jail),
    );
    assert_eq!((exit, out.as_str()), (Exit::Code(0), "ok from 1\n"));
}

#[test]
fn the_unjailed_path_runs_the_same_program() {
    let _g = setup();
    let (exit, out) =
        output(Spawn::new(BUSYBOX).args(["sh", "-c", "id -u; readlink /proc/$$/ns/mnt"]));
    assert_eq!(exit, Exit::Code(0));
    let mine = ns("self", "mnt");
    assert_eq!(
        out,
        format!("0\n{}\n", mine.display()),
        "root, in the caller's namespaces"
    );
    assert_no_children();
}

#[test]
fn a_process_killed_by_a_signal_is_reported_with_that_signal() {
    let _g = setup();
    let (exit, _) = output(Spawn::new(BUSYBOX).args(["sh", "-c", "kill -SYS $$"]));
    assert_eq!(exit.signal(), Some(libc::SIGSYS), "{exit}");
    assert_eq!(exit.code(), None);

    let root = root();
    let mut p = start(&sleeper().jail(busybox_jail(&root, 64_107)));
    assert_eq!(p.kill().signal(), Some(libc::SIGKILL));
}

#[test]
fn die_with_parent_follows_the_spawning_thread_and_detach_outlives_it() {
    let _g = setup();
    let root = root();
    let jail = || busybox_jail(&root, 64_108);

    let s = sleeper().jail(jail());
    let attached = std::thread::scope(|t| t.spawn(|| spawn(&s).unwrap()).join().unwrap());
    let mut attached = Running(Some(attached));
    assert_eq!(
        attached.wait_for(Duration::from_secs(10)).signal(),
        Some(libc::SIGKILL)
    );

    let mut s = sleeper().jail(jail());
    s.detach = true;
    s.die_with_parent = false;
    let detached = std::thread::scope(|t| t.spawn(|| spawn(&s).unwrap()).join().unwrap());
    let mut detached = Running(Some(detached));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        wait(&detached.jailed().pidfd, true).unwrap(),
        None,
        "still running"
    );
    let stat = fs::read_to_string(format!("/proc/{}/stat", detached.pid())).unwrap();
    let session: u32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(session, detached.pid(), "leads a session of its own");
    detached.kill();
}

#[test]
fn a_program_the_jail_cannot_read_runs_undumpable() {
    // execve makes a process dumpable again unless its program is
    // unreadable to it; an undumpable process's /proc files belong to root
    // and it cannot be ptraced by its own uid.
    let _g = setup();
    let root = root();
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut owners = Vec::new();
    for mode in [0o755, 0o711] {
        let prog = dir.path().join(format!("busybox-{mode:o}"));
        fs::copy(BUSYBOX, &prog).unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(mode)).unwrap();
        let p = start(
            &Spawn::new(&prog)
                .args(["sleep", "1000"])
                .jail(Jail::new(&root.path, 64_109, 64_109)),
        );
        let meta = fs::metadata(format!("/proc/{}/mem", p.pid())).unwrap();
        owners.push(std::os::unix::fs::MetadataExt::uid(&meta));
    }
    assert_eq!(owners, [64_109, 0]);
}

/// A parent name no other test (or test run) uses.
fn test_parent(tag: &str) -> String {
    format!("jailer-test-{}-{tag}", std::process::id())
}

fn cleanup_parent(c: &Cgroups) {
    for d in c.parent_dirs() {
        let _ = fs::remove_dir(d);
    }
}

#[test]
fn cgroup_limits_are_applied_and_the_process_starts_in_its_cgroup() {
    let _g = setup();
    let cgroups = Cgroups::detect(&test_parent("limits")).unwrap();
    let limits = Limits {
        memory_max: Some(64 << 20),
        swap_max: Some(0),
        pids_max: Some(32),
        cpu_max: Some(CpuMax {
            quota_us: 50_000,
            period_us: 100_000,
        }),
        cpu_weight: Some(50),
    };
    let vm = cgroups.create("vm-a", &limits).unwrap();
    assert!(matches!(
        cgroups.create("vm-a", &limits),
        Err(CgroupError::Exists { .. })
    ));

    let root = root();
    let mut p = start(
        &sleeper()
            .jail(busybox_jail(&root, 64_110))
            .cgroup(vm.placement()),
    );

    // In the VM's cgroup in every hierarchy, as the host sees it.
    let proc_cgroup = fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).unwrap();
    let suffix = format!("/{}/vm-a", cgroups.parent());
    for c in [Controller::Memory, Controller::Pids, Controller::Cpu] {
        if cgroups.version(c) == Some(Version::V1) {
            let line = proc_cgroup
                .lines()
                .find(|l| {
                    l.split(':')
                        .nth(1)
                        .unwrap()
                        .split(',')
                        .any(|n| n == c.name())
                })
                .unwrap();
            assert!(line.ends_with(&suffix), "{c}: {line}");
        }
    }
    if let Some(v2) = proc_cgroup.lines().find(|l| l.starts_with("0::")) {
        assert!(v2.ends_with(&suffix), "{v2}");
    }
    assert_eq!(vm.procs().unwrap(), vec![p.pid()]);

    let read = |c: Controller, v1: &str, v2: &str| {
        let (version, dir) = vm.controller_dir(c).unwrap();
        let file = if version == Version::V1 { v1 } else { v2 };
        fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        read(Controller::Memory, "memory.limit_in_bytes", "memory.max"),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        read(
            Controller::Memory,
            "memory.memsw.limit_in_bytes",
            "memory.swap.max"
        ),
        match vm.controller_dir(Controller::Memory).unwrap().0 {
            Version::V1 => (64u64 << 20).to_string(),
            Version::V2 => "0".to_string(),
        }
    );
    assert_eq!(read(Controller::Pids, "pids.max", "pids.max"), "32");
    assert_eq!(
        read(Controller::Cpu, "cpu.cfs_quota_us", "cpu.max"),
        match cgroups.version(Controller::Cpu) {
            Some(Version::V1) => "50000".to_string(),
            _ => "50000 100000".to_string(),
        }
    );
    assert_eq!(
        read(Controller::Cpu, "cpu.shares", "cpu.weight"),
        match cgroups.version(Controller::Cpu) {
            Some(Version::V1) => "512".to_string(),
            _ => "50".to_string(),
        }
    );

    p.kill();
    vm.remove().unwrap();
    for d in vm.dirs() {
        assert!(!d.exists(), "{d:?} left");
    }
    cleanup_parent(&cgroups);
}

#[test]
fn a_vm_over_its_memory_limit_is_oom_killed_alone() {
    let _g = setup();
    let cgroups = Cgroups::detect(&test_parent("oom")).unwrap();
    let limits = Limits {
        memory_max: Some(32 << 20),
        swap_max: Some(0),
        ..Default::default()
    };
    let hog_cg = cgroups.create("hog", &limits).unwrap();
    let calm_cg = cgroups.create("calm", &limits).unwrap();
    let root = root();

    let calm = start(
        &sleeper()
            .jail(busybox_jail(&root, 64_111))
            .cgroup(calm_cg.placement()),
    );
    // Doubles a string up to 128 MiB (bounded, should the limit not hold).
    let script = "a=x; i=0; while [ $i -lt 27 ]; do a=\"$a$a\"; i=$((i+1)); done; sleep 1000";
    let mut hog = start(
        &Spawn::new(BUSYBOX)
            .args(["sh", "-c", script])
            .jail(busybox_jail(&root, 64_112))
            .cgroup(hog_cg.placement()),
    );
    let exit = hog.wait_for(Duration::from_secs(60));
    assert_eq!(exit.signal(), Some(libc::SIGKILL), "{exit}");
    assert!(
        hog_cg.oom_killed().unwrap(),
        "the hog's cgroup reports the OOM kill"
    );
    let peak = hog_cg.memory_peak().unwrap().expect("a memory controller");
    assert!(peak <= 32 << 20 && peak > 16 << 20, "peak {peak}");

    assert_eq!(
        wait(&calm.jailed().pidfd, true).unwrap(),
        None,
        "the sibling still runs"
    );
    assert!(!calm_cg.oom_killed().unwrap());

    drop(calm);
    hog_cg.remove().unwrap();
    calm_cg.remove().unwrap();
    cleanup_parent(&cgroups);
}

#[test]
fn remove_kills_what_is_left_and_sweep_removes_only_empty_cgroups() {
    let _g = setup();
    let cgroups = Cgroups::detect(&test_parent("sweep")).unwrap();
    let live = cgroups.create("vm-live", &Limits::default()).unwrap();
    // As if the caller had been killed after creating it.
    let left = cgroups.create("vm-left", &Limits::default()).unwrap();
    let root = root();
    let mut s = sleeper()
        .jail(busybox_jail(&root, 64_113))
        .cgroup(live.placement());
    s.detach = true;
    let mut p = start(&s);

    assert_eq!(cgroups.sweep().unwrap(), vec!["vm-left".to_string()]);
    for d in left.dirs() {
        assert!(!d.exists(), "{d:?} left by sweep");
    }
    for d in live.dirs() {
        assert!(d.exists(), "{d:?} of a live VM removed by sweep");
    }
    assert_eq!(wait(&p.jailed().pidfd, true).unwrap(), None);

    // Adopted after a restart: opened by name, removed with its process.
    let adopted = cgroups.open("vm-live").unwrap();
    adopted.remove().unwrap();
    assert_eq!(
        p.wait_for(Duration::from_secs(10)).signal(),
        Some(libc::SIGKILL)
    );
    for d in live.dirs() {
        assert!(!d.exists(), "{d:?} left by remove");
    }
    live.remove().unwrap();
    assert!(matches!(
        cgroups.open("vm-live"),
        Err(CgroupError::NotFound { .. })
    ));
    assert_eq!(cgroups.sweep().unwrap(), Vec::<String>::new());
    cleanup_parent(&cgroups);
    for d in cgroups.parent_dirs() {
        assert!(!d.exists(), "{d:?}");
    }
}
