//! Raw Linux system calls the jailer needs and `libc` does not wrap (or
//! wraps through glibc code that must not run in a child made by a raw
//! `clone3`). Each wrapper is one system call: no allocation, no locks, no
//! glibc state, so the child may call them between `clone3` and `execve`.
//!
//! This module must not hold policy: which call runs when is decided in
//! `child.rs` and `spawn.rs`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `CLONE_CLEAR_SIGHAND` (Linux 5.5): the child starts with every handled
/// signal reset to its default action (ignored ones stay ignored).
pub(crate) const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
/// `CLONE_INTO_CGROUP` (Linux 5.7): the child starts in the cgroup v2
/// directory given in `clone_args.cgroup`.
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `clone3(2)` (version 2, 88 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `clone3` without `CLONE_VM`: like `fork`, it returns twice, 0 in the
/// child and the child's pid (in the caller's PID namespace) in the parent.
///
/// # Safety
///
/// In a multi-threaded caller the child is a copy of the calling thread
/// only: until it calls `execve` or `_exit` it must run only
/// async-signal-safe code (no allocation, no locks another thread may have
/// held, no glibc functions that keep per-process state such as the
/// `setxid` family), and it must never return into the caller's code.
/// Pointers in `args` must be valid for the call.
pub(crate) unsafe fn clone3(args: &mut CloneArgs) -> io::Result<libc::pid_t> {
    // SAFETY: `args` is a valid `clone_args` of the size passed; the
    // caller upholds the child's restrictions (see above).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as libc::pid_t)
}

/// `pivot_root(new_root, put_old)`.
///
/// # Safety
///
/// Both pointers must be NUL-terminated strings.
pub(crate) unsafe fn pivot_root(
    new_root: *const libc::c_char,
    put_old: *const libc::c_char,
) -> i64 {
    // SAFETY: the caller passes valid C strings; the call reads only them.
    unsafe { libc::syscall(libc::SYS_pivot_root, new_root, put_old) }
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: executes the file `fd`
/// refers to. Returns only on failure.
///
/// # Safety
///
/// `argv` and `envp` must be NULL-terminated arrays of NUL-terminated
/// strings.
pub(crate) unsafe fn execveat_fd(
    fd: RawFd,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> i64 {
    const EMPTY: &[u8; 1] = b"\0";
    // SAFETY: the caller passes valid arrays; EMPTY is a C string.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            EMPTY.as_ptr(),
            argv,
            envp,
            libc::AT_EMPTY_PATH,
        )
    }
}

/// `close_range(first, last, CLOSE_RANGE_CLOEXEC)` (Linux 5.11): marks the
/// descriptors in the range close-on-exec.
pub(crate) fn close_range_cloexec(first: u32, last: u32) -> i64 {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: integer arguments only; no descriptor is closed now.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, CLOSE_RANGE_CLOEXEC) }
}

/// `prlimit64(0, resource, {value, value}, NULL)`: sets both the soft and
/// the hard limit of the calling process.
pub(crate) fn set_rlimit(resource: i32, value: u64) -> i64 {
    #[repr(C)]
    struct Rlimit64 {
        cur: u64,
        max: u64,
    }
    let lim = Rlimit64 {
        cur: value,
        max: value,
    };
    // SAFETY: `lim` lives on our stack for the call; the old value is not
    // asked for (NULL).
    unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            resource,
            &lim as *const Rlimit64,
            std::ptr::null_mut::<Rlimit64>(),
        )
    }
}

/// `setresuid`/`setresgid`/`setgroups` as the raw system calls, which
/// change the calling thread only. glibc's wrappers instead signal every
/// thread glibc believes exists so that all change together; in a child
/// made by a raw `clone3` that list is the parent's, so those wrappers
/// must not be called there.
pub(crate) fn raw_setresgid(gid: u32) -> i64 {
    // SAFETY: plain integer arguments; changes only this thread's ids.
    unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }
}

/// See [`raw_setresgid`].
pub(crate) fn raw_setresuid(uid: u32) -> i64 {
    // SAFETY: plain integer arguments; changes only this thread's ids.
    unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }
}

/// `setgroups(0, NULL)`: no supplementary groups. See [`raw_setresgid`].
pub(crate) fn raw_clear_groups() -> i64 {
    // SAFETY: a zero-length list is never read.
    unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) }
}

/// `capset` with every set (effective, permitted, inheritable) empty.
pub(crate) fn clear_capabilities() -> i64 {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version 3 takes a header and two data words, both on our
    // stack for the duration of the call.
    unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) }
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: a NULL siginfo is allowed; the fd is borrowed for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `pidfd_open(pid, 0)`.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The calling thread's `errno`.
pub(crate) fn errno() -> i32 {
    // SAFETY: `__errno_location` returns this thread's errno slot, which
    // a child made by `clone3` keeps (its TLS register is the parent
    // thread's, in its own copy of the memory).
    unsafe { *libc::__errno_location() }
}
