//! The child's side of a spawn: everything between `clone3` and `execve`,
//! run from a [`Plan`] the parent prepared (every string, array and
//! descriptor number already in place).
//!
//! It must only make raw system calls (`sys.rs`): it runs in the memory of
//! a multi-threaded parent, so it may not allocate, take a lock, or call
//! glibc code that keeps process or thread state. It never returns: it ends
//! in `execve` or `_exit(127)` after writing the failing [`Step`] and errno
//! on the report pipe.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::error::Step;
use crate::sys;

/// Everything the child needs, built by the parent before `clone3`.
pub(crate) struct Plan {
    /// The parent's end of the report pipe (closed first in the child, so
    /// that the child can tell when the parent is gone).
    pub report_read: RawFd,
    /// The child's end of the report pipe (close-on-exec: EOF on the
    /// parent's side means `execve` succeeded).
    pub report_write: RawFd,
    /// `setsid`.
    pub setsid: bool,
    /// cgroup v1 `tasks` files to write `0` to (this thread, which is the
    /// whole single-threaded child).
    pub cgroup_procs: Vec<RawFd>,
    /// Network namespace to `setns` into.
    pub netns: Option<RawFd>,
    /// First descriptor number above every target.
    pub floor: RawFd,
    /// (source, target) descriptor pairs, stdio included, sorted by target.
    pub maps: Vec<(RawFd, RawFd)>,
    /// One slot per `maps` entry for the moved copy of its source.
    pub scratch: Vec<RawFd>,
    /// The program, opened `O_PATH`.
    pub exec_fd: RawFd,
    /// NULL-terminated `argv` (pointers into the parent's `CString`s).
    pub argv: Vec<*const libc::c_char>,
    /// NULL-terminated `envp`.
    pub envp: Vec<*const libc::c_char>,
    /// The confinement, if any (`None` is `--no-jail`).
    pub jail: Option<JailPlan>,
    /// `PR_SET_PDEATHSIG(SIGKILL)`.
    pub die_with_parent: bool,
}

/// Where the jail's root is attached in the template mount namespace
/// (an empty directory of its read-only tmpfs).
pub(crate) const ATTACH: &CStr = c"/jail";

/// The confinement part of a [`Plan`].
pub(crate) struct JailPlan {
    /// The template mount namespace: one read-only tmpfs holding [`ATTACH`].
    pub mount_ns: RawFd,
    /// The root directory, a detached mount (`nosuid,nodev`).
    pub root: OwnedFd,
    /// Per bind: the source, a detached mount with its flags, and where to
    /// attach it (under [`ATTACH`]).
    pub binds: Vec<(OwnedFd, CString)>,
    /// Where to mount `proc` (under [`ATTACH`]), if asked.
    pub proc_target: Option<CString>,
    /// Hostname in the new UTS namespace.
    pub hostname: Vec<u8>,
    /// (resource, value) pairs, soft = hard = value.
    pub rlimits: Vec<(i32, u64)>,
    /// Unprivileged ids.
    pub uid: u32,
    /// Unprivileged gid.
    pub gid: u32,
    /// Highest capability number the kernel knows.
    pub last_cap: u32,
}

/// Writes the failing step and errno to the report pipe and exits.
fn fail(report: RawFd, step: Step, errno: i32) -> ! {
    let (code, index) = step.encode();
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&code.to_le_bytes());
    msg[4..8].copy_from_slice(&index.to_le_bytes());
    msg[8..12].copy_from_slice(&errno.to_le_bytes());
    // 12 bytes on a pipe are written whole (PIPE_BUF); if the write fails
    // there is nothing better to do than exit.
    sys::write(report, &msg);
    sys::exit(127)
}

/// Fails with `step` if `r` (a system call's return) is negative.
fn check(report: RawFd, r: i64, step: Step) {
    if r < 0 {
        fail(report, step, sys::errno());
    }
}

/// The entry point of the child of `sys::clone3_vfork`: `plan` is the
/// parent's [`Plan`].
///
/// # Safety
///
/// `plan` must point to a valid [`Plan`] that nothing else touches until
/// the child has called `execve` or exited (the parent is suspended).
pub(crate) unsafe extern "C" fn entry(plan: *mut std::ffi::c_void) -> ! {
    // SAFETY: the caller passes the parent's plan, unused by anyone else
    // while the parent is suspended.
    unsafe { run(&mut *plan.cast::<Plan>()) }
}

/// Runs the child's set-up and executes the program.
///
/// # Safety
///
/// Must be called only in the child of `sys::clone3` or
/// `sys::clone3_vfork`, with a plan whose descriptors and pointers the
/// parent made valid.
pub(crate) unsafe fn run(plan: &mut Plan) -> ! {
    let mut report = plan.report_write;
    sys::close(plan.report_read);

    if plan.setsid {
        check(report, sys::setsid(), Step::Setsid);
    }
    for &fd in &plan.cgroup_procs {
        if sys::write(fd, b"0") != 1 {
            fail(report, Step::JoinCgroup, sys::errno());
        }
    }
    if let Some(ns) = plan.netns {
        check(report, sys::setns(ns, libc::CLONE_NEWNET), Step::JoinNetns);
    }
    // Mounts use the detached trees' descriptors: before any dup below
    // may reuse their numbers.
    if let Some(jail) = &plan.jail {
        enter_root(report, jail);
    }

    // Descriptors: first copy everything still needed above every target,
    // so that no dup below can clobber it, then place each source at its
    // target, then mark all the rest close-on-exec.
    let moved = sys::dup_above(report, plan.floor);
    check(report, moved, Step::MoveFds);
    report = moved as RawFd;
    let exec_fd = sys::dup_above(plan.exec_fd, plan.floor);
    check(report, exec_fd, Step::MoveFds);
    for (slot, &(source, _)) in plan.scratch.iter_mut().zip(&plan.maps) {
        let r = sys::dup_above(source, plan.floor);
        check(report, r, Step::MoveFds);
        *slot = r as RawFd;
    }
    for (&copy, &(_, target)) in plan.scratch.iter().zip(&plan.maps) {
        check(report, sys::dup_to(copy, target), Step::MapFds);
    }
    let mut start: u32 = 0;
    for &(_, target) in &plan.maps {
        let target = target as u32;
        if target > start {
            check(
                report,
                sys::close_range_cloexec(start, target - 1),
                Step::CloseFds,
            );
        }
        start = target + 1;
    }
    check(
        report,
        sys::close_range_cloexec(start, u32::MAX),
        Step::CloseFds,
    );

    if let Some(jail) = &plan.jail {
        drop_privileges(report, jail);
    }

    if plan.die_with_parent {
        // After the uid change, which clears the death signal.
        let r = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        check(report, r, Step::ParentDeathSignal);
        // If the parent died before the prctl, the signal will never come.
        // The parent holds the report pipe's read end until we exec, so a
        // pipe without readers means it is gone. getppid() cannot tell: in
        // a new PID namespace it is 0 whatever happened.
        if sys::pipe_reader_gone(report) {
            fail(report, Step::ParentGone, libc::ESRCH);
        }
    }

    // The parent blocked every signal around clone3; handlers were reset
    // by CLONE_CLEAR_SIGHAND. Restore what a new program expects: nothing
    // blocked, SIGPIPE at its default (Rust callers ignore it, and an
    // ignored signal stays ignored across exec).
    check(report, sys::reset_signals(), Step::Signals);

    // SAFETY: argv and envp are the parent's NULL-terminated arrays of C
    // strings, alive until the parent resumes after the exec.
    unsafe { sys::execveat_fd(exec_fd as RawFd, plan.argv.as_ptr(), plan.envp.as_ptr()) };
    fail(report, Step::Exec, sys::errno())
}

/// Enters a mount namespace holding only the jail's root and binds, and
/// makes that root its `/`.
///
/// The namespace is a private copy of the template (one read-only tmpfs),
/// not of the host's: no host mount is copied in, so none has to be
/// unmounted again (which costs an RCU grace period), and none is left
/// reachable, even hidden. The root and the binds are mounts the parent
/// detached from the host's tree (`open_tree`), attached here.
fn enter_root(report: RawFd, jail: &JailPlan) {
    check(
        report,
        sys::setns(jail.mount_ns, libc::CLONE_NEWNS),
        Step::EnterMountNs,
    );
    check(report, sys::unshare(libc::CLONE_NEWNS), Step::EnterMountNs);
    check(
        report,
        sys::move_mount_tree(jail.root.as_raw_fd(), ATTACH),
        Step::AttachRoot,
    );
    for (i, (tree, target)) in jail.binds.iter().enumerate() {
        check(
            report,
            sys::move_mount_tree(tree.as_raw_fd(), target),
            Step::Bind(i),
        );
    }
    if let Some(target) = &jail.proc_target {
        // Mounted from inside the new PID namespace: it shows only the
        // jailed process and its threads.
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(
            report,
            sys::mount(Some(c"proc"), target, Some(c"proc"), flags),
            Step::MountProc,
        );
    }
    // The template's tmpfs stays below, empty and read-only; leaving the
    // chroot would need CAP_SYS_CHROOT, which is dropped below.
    check(report, sys::chdir(ATTACH), Step::Chroot);
    check(report, sys::chroot(c"."), Step::Chroot);
    check(report, sys::chdir(c"/"), Step::Chroot);
}

/// Hostname, limits and credentials of a jail.
fn drop_privileges(report: RawFd, jail: &JailPlan) {
    check(report, sys::sethostname(&jail.hostname), Step::Hostname);

    // Before the uid change: raising a hard limit needs CAP_SYS_RESOURCE.
    for &(resource, value) in &jail.rlimits {
        check(report, sys::set_rlimit(resource, value), Step::Rlimit);
    }

    check(report, sys::raw_clear_groups(), Step::Setgroups);
    check(report, sys::raw_setresgid(jail.gid), Step::Setgid);
    // Dropping from the bounding set needs CAP_SETPCAP: before setuid.
    for cap in 0..=jail.last_cap {
        let r = sys::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong);
        check(report, r, Step::DropBoundingSet);
    }
    let r = sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    );
    check(report, r, Step::ClearAmbient);
    // With every uid non-zero the kernel clears the permitted and
    // effective sets; capset clears the inheritable set too.
    check(report, sys::raw_setresuid(jail.uid), Step::Setuid);
    check(report, sys::clear_capabilities(), Step::ClearCapabilities);
    check(
        report,
        sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1),
        Step::NoNewPrivs,
    );
}
