//! The child's side of a spawn: everything between `clone3` and `execve`,
//! run from a [`Plan`] the parent prepared (every string, array and
//! descriptor number already in place).
//!
//! It must only make system calls: the child of a multi-threaded parent may
//! not allocate, take a lock, or call glibc code that keeps process state
//! (see `sys.rs`). It never returns: it ends in `execve` or `_exit(127)`
//! after writing the failing [`Step`] and errno on the report pipe.

use std::ffi::CString;
use std::os::fd::RawFd;

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
    /// cgroup v1 `cgroup.procs` files to write `0` to.
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

/// The confinement part of a [`Plan`].
pub(crate) struct JailPlan {
    /// The root directory (absolute).
    pub root: CString,
    /// (source, absolute target on the host, read-only) per bind.
    pub binds: Vec<(CString, CString, bool)>,
    /// Where to mount `proc` (absolute on the host), if asked.
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
    // SAFETY: `msg` is a live stack buffer; write and _exit are
    // async-signal-safe. A short write cannot happen for 12 bytes on a
    // pipe (PIPE_BUF), and there is nothing better to do if it fails.
    unsafe {
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// Fails with `step` if `r` (a system call's return) is negative.
fn check(report: RawFd, r: i64, step: Step) {
    if r < 0 {
        fail(report, step, sys::errno());
    }
}

/// Runs the child's set-up and executes the program.
///
/// # Safety
///
/// Must be called only in the child of `sys::clone3`, with a plan whose
/// descriptors and pointers the parent made valid (the child has its own
/// copy of them).
pub(crate) unsafe fn run(plan: &mut Plan) -> ! {
    let mut report = plan.report_write;
    // SAFETY: (the whole function) every call below is a single system call on
    // integers, on descriptors the plan names, or on pointers into the
    // plan's strings and arrays, which live in this process's copy of the
    // parent's memory and are never freed here.
    unsafe {
        libc::close(plan.report_read);

        if plan.setsid {
            check(report, libc::setsid() as i64, Step::Setsid);
        }
        for &fd in &plan.cgroup_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(report, Step::JoinCgroup, sys::errno());
            }
        }
        if let Some(ns) = plan.netns {
            check(
                report,
                libc::setns(ns, libc::CLONE_NEWNET) as i64,
                Step::JoinNetns,
            );
        }

        // Descriptors: first copy everything still needed above every
        // target, so that no dup2 below can clobber it, then place each
        // source at its target, then mark all the rest close-on-exec.
        let moved = libc::fcntl(report, libc::F_DUPFD_CLOEXEC, plan.floor);
        check(report, moved as i64, Step::MoveFds);
        report = moved;
        let exec_fd = libc::fcntl(plan.exec_fd, libc::F_DUPFD_CLOEXEC, plan.floor);
        check(report, exec_fd as i64, Step::MoveFds);
        for (slot, &(source, _)) in plan.scratch.iter_mut().zip(&plan.maps) {
            *slot = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, plan.floor);
            check(report, *slot as i64, Step::MoveFds);
        }
        for (&copy, &(_, target)) in plan.scratch.iter().zip(&plan.maps) {
            check(report, libc::dup2(copy, target) as i64, Step::MapFds);
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
            confine(report, jail);
        }

        if plan.die_with_parent {
            // After the uid change, which clears the death signal.
            let r = libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            check(report, r as i64, Step::ParentDeathSignal);
            // If the parent died before the prctl, the signal will never
            // come. The parent holds the report pipe's read end until we
            // exec (it is blocked reading it), so a pipe without readers
            // means the parent is gone. getppid() cannot tell: in a new
            // PID namespace it is 0 whatever happened.
            let mut pfd = libc::pollfd {
                fd: report,
                events: 0,
                revents: 0,
            };
            if libc::poll(&mut pfd, 1, 0) > 0 && pfd.revents & libc::POLLERR != 0 {
                fail(report, Step::ParentGone, libc::ESRCH);
            }
        }

        // The parent blocked every signal around clone3; handlers were
        // reset by CLONE_CLEAR_SIGHAND. Restore what a new program
        // expects: nothing blocked, SIGPIPE at its default (Rust callers
        // ignore it, and an ignored signal stays ignored across exec).
        if libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR {
            fail(report, Step::Signals, sys::errno());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(
            report,
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) as i64,
            Step::Signals,
        );

        sys::execveat_fd(exec_fd, plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(report, Step::Exec, sys::errno())
    }
}

/// Mounts, hostname, limits and credentials of a jail.
///
/// # Safety
///
/// As [`run`]: only in the child, with a plan the parent made valid.
unsafe fn confine(report: RawFd, jail: &JailPlan) {
    let null = std::ptr::null::<libc::c_char>();
    let bind_flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: as in `run`: single system calls on the plan's C strings.
    unsafe {
        // Nothing done below may propagate to the host's mounts.
        let r = libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        check(report, r as i64, Step::MountPrivate);

        // pivot_root needs the new root to be a mount point.
        let r = libc::mount(
            jail.root.as_ptr(),
            jail.root.as_ptr(),
            null,
            libc::MS_BIND,
            std::ptr::null(),
        );
        check(report, r as i64, Step::BindRoot);
        let r = libc::mount(null, jail.root.as_ptr(), null, bind_flags, std::ptr::null());
        check(report, r as i64, Step::BindRoot);

        for (i, (source, target, readonly)) in jail.binds.iter().enumerate() {
            let r = libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            );
            check(report, r as i64, Step::Bind(i));
            // A bind mount takes its flags only from a second, remount call.
            let flags = if *readonly {
                bind_flags | libc::MS_RDONLY
            } else {
                bind_flags
            };
            let r = libc::mount(null, target.as_ptr(), null, flags, std::ptr::null());
            check(report, r as i64, Step::Bind(i));
        }
        if let Some(target) = &jail.proc_target {
            // Mounted from inside the new PID namespace: it shows only
            // the jailed process and its threads.
            let r = libc::mount(
                c"proc".as_ptr(),
                target.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            );
            check(report, r as i64, Step::MountProc);
        }

        // pivot_root(".", "."): the old root ends up stacked on the new
        // one, and unmounting "." detaches it; no directory for it needed.
        check(
            report,
            libc::chdir(jail.root.as_ptr()) as i64,
            Step::PivotRoot,
        );
        check(
            report,
            sys::pivot_root(c".".as_ptr(), c".".as_ptr()),
            Step::PivotRoot,
        );
        check(
            report,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as i64,
            Step::DetachOldRoot,
        );
        check(
            report,
            libc::chdir(c"/".as_ptr()) as i64,
            Step::DetachOldRoot,
        );

        let r = libc::sethostname(jail.hostname.as_ptr().cast(), jail.hostname.len());
        check(report, r as i64, Step::Hostname);

        // Before the uid change: raising a hard limit needs CAP_SYS_RESOURCE.
        for &(resource, value) in &jail.rlimits {
            check(report, sys::set_rlimit(resource, value), Step::Rlimit);
        }

        check(report, sys::raw_clear_groups(), Step::Setgroups);
        check(report, sys::raw_setresgid(jail.gid), Step::Setgid);
        // Dropping from the bounding set needs CAP_SETPCAP: before setuid.
        for cap in 0..=jail.last_cap {
            let r = libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            check(report, r as i64, Step::DropBoundingSet);
        }
        let r = libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        check(report, r as i64, Step::ClearAmbient);
        // With every uid non-zero the kernel clears the permitted and
        // effective sets; capset clears the inheritable set too.
        check(report, sys::raw_setresuid(jail.uid), Step::Setuid);
        check(report, sys::clear_capabilities(), Step::ClearCapabilities);
        let r = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
        check(report, r as i64, Step::NoNewPrivs);
    }
}
