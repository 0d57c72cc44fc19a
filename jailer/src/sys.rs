//! Raw Linux system calls for the jailer, each through `syscall(2)` and
//! nothing else: no allocation, no locks, no glibc state (glibc's own
//! wrappers may touch the calling thread's cancellation state or, for the
//! `setxid` family, signal every thread glibc believes exists). That makes
//! them safe in the child of `clone3`, which shares the suspended parent's
//! memory until it calls `execve`.
//!
//! This module must not hold policy: which call runs when is decided in
//! `child.rs` and `spawn.rs`.

use std::ffi::{c_void, CStr};
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

/// `clone3` with `CLONE_VM | CLONE_VFORK` in `args.flags` and a stack of
/// its own in `args.stack`/`args.stack_size`: the child runs `child(arg)` on
/// that stack, in the caller's memory, while the calling thread waits until
/// the child has called `execve` or exited (like `posix_spawn`: no page
/// tables copied, no copy-on-write faults afterwards). Returns the child's
/// pid.
///
/// # Safety
///
/// `args` must hold `CLONE_VM | CLONE_VFORK` and a valid, writable stack
/// not used by anything else until this returns. `child` must never
/// return and may only make raw system calls (this module) and write
/// memory the caller does not rely on: it runs on the caller's memory,
/// with the caller's thread-local storage.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn clone3_vfork(
    args: &mut CloneArgs,
    child: unsafe extern "C" fn(*mut c_void) -> !,
    arg: *mut c_void,
) -> io::Result<libc::pid_t> {
    let ret: i64;
    // SAFETY: the syscall returns twice. In the parent only rax (the
    // result), rcx and r11 change, as declared. The child starts at the
    // next instruction with rsp at the top of its own 16-byte aligned
    // stack (so `call` gives the callee the ABI's alignment), clears the
    // frame pointer, and calls `child(arg)`, which never returns (ud2
    // guards that); it never reaches Rust code of this function.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") child,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    Ok(ret as libc::pid_t)
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

/// One raw system call with up to five integer or pointer arguments.
macro_rules! raw {
    ($nr:expr $(, $a:expr)*) => {
        // SAFETY: the callers below pass the kernel's documented argument
        // types; pointers are valid for the call (see each caller).
        unsafe { libc::syscall($nr $(, $a)*) }
    };
}

/// `close(fd)`.
pub(crate) fn close(fd: RawFd) -> i64 {
    raw!(libc::SYS_close, fd)
}

/// `write(fd, buf)`.
pub(crate) fn write(fd: RawFd, buf: &[u8]) -> i64 {
    raw!(libc::SYS_write, fd, buf.as_ptr(), buf.len())
}

/// `setsid()`.
pub(crate) fn setsid() -> i64 {
    raw!(libc::SYS_setsid)
}

/// `setns(fd, nstype)`.
pub(crate) fn setns(fd: RawFd, nstype: i32) -> i64 {
    raw!(libc::SYS_setns, fd, nstype)
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, min)`: a close-on-exec copy at `min` or above.
pub(crate) fn dup_above(fd: RawFd, min: RawFd) -> i64 {
    raw!(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, min)
}

/// `dup3(old, new, 0)`: `new` becomes a copy of `old`, inherited by exec.
pub(crate) fn dup_to(old: RawFd, new: RawFd) -> i64 {
    raw!(libc::SYS_dup3, old, new, 0)
}

/// `mount(source, target, fstype, flags, NULL)`.
pub(crate) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> i64 {
    let opt = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    raw!(
        libc::SYS_mount,
        opt(source),
        target.as_ptr(),
        opt(fstype),
        flags,
        std::ptr::null::<c_void>()
    )
}

/// `chdir(path)`.
pub(crate) fn chdir(path: &CStr) -> i64 {
    raw!(libc::SYS_chdir, path.as_ptr())
}

/// `sethostname(name)`.
pub(crate) fn sethostname(name: &[u8]) -> i64 {
    raw!(libc::SYS_sethostname, name.as_ptr(), name.len())
}

/// `prctl(option, arg2, 0, 0, 0)`.
pub(crate) fn prctl(option: i32, arg2: libc::c_ulong) -> i64 {
    raw!(libc::SYS_prctl, option, arg2, 0usize, 0usize, 0usize)
}

/// Whether the read end of the pipe `write_end` has been closed by all
/// (`ppoll` reports `POLLERR` on the write end then).
pub(crate) fn pipe_reader_gone(write_end: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: write_end,
        events: 0,
        revents: 0,
    };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let r = raw!(
        libc::SYS_ppoll,
        &mut pfd as *mut libc::pollfd,
        1usize,
        &zero as *const libc::timespec,
        std::ptr::null::<c_void>(),
        8usize
    );
    r > 0 && pfd.revents & libc::POLLERR != 0
}

/// Sets `SIGPIPE` back to its default action and unblocks every signal.
pub(crate) fn reset_signals() -> i64 {
    /// The kernel's `struct sigaction` (no restorer needed for SIG_DFL).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let r = raw!(
        libc::SYS_rt_sigaction,
        libc::SIGPIPE,
        &dfl as *const KernelSigaction,
        std::ptr::null_mut::<KernelSigaction>(),
        8usize
    );
    if r < 0 {
        return r;
    }
    let empty: u64 = 0;
    raw!(
        libc::SYS_rt_sigprocmask,
        libc::SIG_SETMASK,
        &empty as *const u64,
        std::ptr::null_mut::<u64>(),
        8usize
    )
}

/// `_exit(code)`: ends the process (its only thread) at once.
pub(crate) fn exit(code: i32) -> ! {
    raw!(libc::SYS_exit_group, code);
    // exit_group does not return.
    loop {
        std::hint::spin_loop();
    }
}

/// `pivot_root(new_root, put_old)`.
pub(crate) fn pivot_root(new_root: &CStr, put_old: &CStr) -> i64 {
    raw!(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr())
}

/// `chroot(path)`.
pub(crate) fn chroot(path: &CStr) -> i64 {
    raw!(libc::SYS_chroot, path.as_ptr())
}

/// `unshare(flags)`.
pub(crate) fn unshare(flags: i32) -> i64 {
    raw!(libc::SYS_unshare, flags)
}

/// `move_mount(tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`:
/// attaches the detached mount tree `tree` (from [`open_tree_clone`]) at
/// `target` in the caller's mount namespace.
pub(crate) fn move_mount_tree(tree: RawFd, target: &CStr) -> i64 {
    const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
    raw!(
        libc::SYS_move_mount,
        tree,
        c"".as_ptr(),
        libc::AT_FDCWD,
        target.as_ptr(),
        MOVE_MOUNT_F_EMPTY_PATH
    )
}

/// Per-mount flags for [`open_tree_clone`].
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// No set-user-ID or file capabilities honoured.
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// No device nodes usable.
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;

/// A detached copy of the mount at `path` (not of the mounts below it),
/// with the per-mount flags `attrs` set: `open_tree(OPEN_TREE_CLONE)` then
/// `mount_setattr`. Nothing is visible anywhere until it is attached with
/// [`move_mount_tree`]; closing an unattached one unmounts it.
pub(crate) fn open_tree_clone(path: &CStr, attrs: u64) -> io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: u32 = 0x1;
    let r = raw!(
        libc::SYS_open_tree,
        libc::AT_FDCWD,
        path.as_ptr(),
        OPEN_TREE_CLONE | libc::O_CLOEXEC as u32
    );
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
    /// `struct mount_attr` (version 0).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let r = raw!(
        libc::SYS_mount_setattr,
        tree.as_raw_fd(),
        c"".as_ptr(),
        libc::AT_EMPTY_PATH,
        &attr as *const MountAttr,
        std::mem::size_of::<MountAttr>()
    );
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
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
