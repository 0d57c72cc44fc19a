//! Thin wrappers over the few libc calls the agent makes.
//!
//! Every syscall costs ~0.5 ms in the guest, so these do exactly one call
//! each (plus retries on EINTR) and no probing.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `Err(last OS error)` if `r` is negative.
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The errno of an I/O error, 0 if it has none.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Writes all of `buf` to `fd`, retrying on EINTR and short writes.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice for its whole length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// One `read`, retried on EINTR.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable slice for its whole length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `write` (no retry on short writes), retried on EINTR.
pub fn write_once(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable slice for its whole length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes `line` on a line of its own to fd 1 (the console), in one write.
pub fn console_line(line: &str) -> io::Result<()> {
    write_all(1, format!("\n{line}\n").as_bytes())
}

/// Logs `msg` to stderr (the console when PID 1) in one write; errors are
/// dropped, there is nowhere else to report them.
pub fn log(msg: &str) {
    let _ = write_all(2, format!("zygote-agent: {msg}\n").as_bytes());
}

/// A pipe whose both ends are close-on-exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets O_NONBLOCK on a descriptor whose other status flags are all clear
/// (a fresh pipe end), in one fcntl.
pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })?;
    Ok(())
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: eventfd succeeded, so `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd's counter, waking its poller.
pub fn eventfd_signal(fd: RawFd) {
    let _ = write_once(fd, &1u64.to_ne_bytes());
}

/// Resets an eventfd's counter (non-blocking: no-op when it is zero).
pub fn eventfd_drain(fd: RawFd) {
    let mut buf = [0u8; 8];
    let _ = read(fd, &mut buf);
}

/// `open(path, flags | O_CLOEXEC)`.
pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: open succeeded, so `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILLs the process group `pid` and the process `pid` itself (in case
/// it left the group). Errors (already gone) are ignored.
pub fn kill_tree(pid: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill takes no pointers.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Milliseconds since boot (CLOCK_BOOTTIME, a vDSO call: no syscall).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Decoded `waitpid` status: `(exit code, signal)`.
pub fn decode_wait_status(status: i32) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

/// Microseconds since `t` (vDSO clock: no syscall), saturating at
/// `u32::MAX`: what the agent reports of its own steps.
pub fn us_since(t: std::time::Instant) -> u32 {
    t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_decoding() {
        // Encodings as the kernel makes them.
        assert_eq!(decode_wait_status(0), (Some(0), None));
        assert_eq!(decode_wait_status(3 << 8), (Some(3), None));
        assert_eq!(decode_wait_status(255 << 8), (Some(255), None));
        assert_eq!(decode_wait_status(9), (None, Some(9)));
        assert_eq!(decode_wait_status(15 | 0x80), (None, Some(15))); // core dumped
        assert_eq!(decode_wait_status(0x137f), (None, None)); // stopped
    }

    #[test]
    fn pipes_and_eventfds() {
        let (r, w) = pipe().unwrap();
        write_all(w.as_raw_fd(), b"abc").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(read(r.as_raw_fd(), &mut buf).unwrap(), 3);
        set_nonblocking(&r).unwrap();
        assert_eq!(
            read(r.as_raw_fd(), &mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let ev = eventfd().unwrap();
        eventfd_drain(ev.as_raw_fd()); // zero: must not block
        eventfd_signal(ev.as_raw_fd());
        eventfd_signal(ev.as_raw_fd());
        assert_eq!(read(ev.as_raw_fd(), &mut buf).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(buf), 2);
    }

    #[test]
    fn uptime_is_monotonic() {
        let a = uptime_ms();
        let b = uptime_ms();
        assert!(a > 0 && b >= a);
    }
}
