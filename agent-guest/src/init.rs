//! What the agent does as PID 1, and the vsock listener.

use std::ffi::{CStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use crate::spawn::DEFAULT_PATH;
use crate::sys::{self, cvt};

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (`_IO(7, 0xb9)`), on `/dev/vsock`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// Writes the start marker; if there is no console on fd 1 (the initramfs
/// lacked /dev/console), mounts devtmpfs, opens /dev/console (or, failing
/// that, /dev/null) as fds 0-2 and writes it there.
pub fn start_console() {
    if sys::console_line(proto::START_MARKER).is_ok() {
        return;
    }
    mount(
        c"devtmpfs",
        c"/dev",
        c"devtmpfs",
        libc::MS_NOSUID,
        Some(c"mode=0755"),
    );
    // Without a console, /dev/null: fds 0-2 must be taken, or pipes made
    // later would land there and be clobbered when commands get their stdio.
    let Ok(console) = sys::open(c"/dev/console", libc::O_RDWR | libc::O_NOCTTY)
        .or_else(|_| sys::open(c"/dev/null", libc::O_RDWR))
    else {
        return;
    };
    let fd = console.into_raw_fd();
    for target in 0..3 {
        if fd != target {
            // SAFETY: dup2 takes no pointers.
            unsafe { libc::dup2(fd, target) };
        }
    }
    if fd > 2 {
        // SAFETY: `fd` is ours and no longer used.
        unsafe { libc::close(fd) };
    }
    let _ = sys::console_line(proto::START_MARKER);
}

/// Mounts `fstype` on `target`, creating `target` if missing; "already
/// mounted" is fine, other failures are logged.
fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong, data: Option<&CStr>) {
    let data_ptr = data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
    let attempt = || {
        // SAFETY: all strings are NUL-terminated; data is one or NULL.
        cvt(unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                data_ptr,
            )
        })
    };
    // The directories are in the initramfs: try the mount first (one
    // syscall), mkdir only when it is missing.
    let mut result = attempt();
    if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
        // SAFETY: `target` is NUL-terminated.
        unsafe { libc::mkdir(target.as_ptr(), 0o755) };
        result = attempt();
    }
    match result {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => sys::log(&format!("mount {}: {e}", target.to_string_lossy())),
    }
}

/// PID 1 setup: filesystems, hostname, loopback, power signals.
pub fn setup_pid1() {
    const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;
    mount(
        c"proc",
        c"/proc",
        c"proc",
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    );
    mount(
        c"sysfs",
        c"/sys",
        c"sysfs",
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    );
    mount(
        c"devtmpfs",
        c"/dev",
        c"devtmpfs",
        libc::MS_NOSUID,
        Some(c"mode=0755"),
    );
    mount(
        c"tmpfs",
        c"/tmp",
        c"tmpfs",
        NOSUID_NODEV,
        Some(c"mode=1777"),
    );
    mount(
        c"tmpfs",
        c"/run",
        c"tmpfs",
        NOSUID_NODEV,
        Some(c"mode=0755"),
    );
    let name = b"zygote";
    // SAFETY: `name` is valid for its length.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        sys::log(&format!("sethostname: {}", io::Error::last_os_error()));
    }
    // Programs reach their own servers on 127.0.0.1 (clones inherit it).
    if let Err(e) = crate::net::loopback_up() {
        sys::log(&e);
    }
    install_power_signals();
}

/// Flushes filesystems and reboots, which ends the VM: the kernel runs
/// with `reboot=k`, so the reset is a write of 0xfe to the i8042 port that
/// the VMM treats as the end. Returns only if the reboot failed.
pub fn power_off() {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    sys::log(&format!("reboot: {}", io::Error::last_os_error()));
}

extern "C" fn on_power_signal(_sig: libc::c_int) {
    // Only async-signal-safe syscalls here.
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}

/// busybox `poweroff`, `halt` and `reboot` signal PID 1 with SIGUSR2,
/// SIGUSR1 and SIGTERM: all of them end the VM.
///
/// Handlers rather than blocking the signals and a sigwait thread: the
/// signal mask is inherited by threads and spawned commands, and a handler
/// costs no thread. Handlers are reset to the default in spawned commands
/// (by exec, and explicitly by the spawn code before it).
fn install_power_signals() {
    for sig in [libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: a zeroed sigaction is valid; the handler has the
        // `void (*)(int)` signature sa_sigaction takes without SA_SIGINFO.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_power_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigfillset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                sys::log(&format!("sigaction({sig}): {}", io::Error::last_os_error()));
            }
        }
    }
}

/// The environment of commands: the agent's own, with PATH (and, as PID 1,
/// HOME) set to the guest's defaults.
pub fn base_env(pid1: bool) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let mut set = |key: &str, value: &str, force: bool| match env.iter_mut().find(|(k, _)| k == key)
    {
        Some(slot) if force => slot.1 = value.into(),
        Some(_) => {}
        None => env.push((key.into(), value.into())),
    };
    set("PATH", DEFAULT_PATH, pid1);
    if pid1 {
        set("HOME", "/root", true);
    }
    env
}

/// A listening vsock stream socket on `port`, any CID.
pub fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket succeeded; the descriptor is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm of the given size.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen takes no pointers.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 64) })?;
    Ok(sock)
}

/// A listening Unix socket at `path` (`@name`: abstract), for running the
/// agent on a development host (`--unix-listen`); the guest uses vsock.
pub fn listen_unix(path: &str) -> io::Result<OwnedFd> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let listener = match path.strip_prefix('@') {
        Some(name) => UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?,
        None => UnixListener::bind(path)?,
    };
    Ok(listener.into())
}

/// Why vsock will not work even though the socket listens: with the vsock
/// core built in, bind and listen succeed without any transport device;
/// the local CID tells (VMADDR_CID_ANY = no device). `None` if it looks
/// fine or cannot be told.
pub fn vsock_problem() -> Option<String> {
    let dev = sys::open(c"/dev/vsock", libc::O_RDONLY).ok()?;
    let mut cid: libc::c_uint = 0;
    // SAFETY: the ioctl writes one unsigned int to `cid`.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) };
    (rc == 0 && cid == libc::VMADDR_CID_ANY).then(|| "no vsock transport device".to_string())
}

/// Accepts one connection (close-on-exec); retries on EINTR and aborted
/// connections.
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    loop {
        // SAFETY: NULL address pointers are allowed.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 succeeded; the descriptor is ours.
            return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR | libc::ECONNABORTED) => {}
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_env_defaults() {
        let env = base_env(true);
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("PATH"), Some(DEFAULT_PATH.into()));
        assert_eq!(get("HOME"), Some("/root".into()));
        // Not PID 1: an existing PATH is kept.
        let env = base_env(false);
        assert!(env.iter().any(|(k, _)| k == "PATH"));
    }
}
