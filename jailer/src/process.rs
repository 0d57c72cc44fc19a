//! A spawned process as its parent holds it: [`Jailed`] (pid and pidfd),
//! waiting for it ([`wait`], which tells an exit code from a signal) and
//! signalling it ([`kill`]) through the pidfd, never through a pid that may
//! have been reused.
//!
//! This module must not spawn anything; see `spawn.rs`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::sys;

/// A process started by [`crate::spawn`]: a direct child of the caller,
/// which must reap it ([`wait`]) once it ends.
#[derive(Debug)]
pub struct Jailed {
    /// Its pid in the caller's PID namespace (inside its own PID namespace
    /// a jailed process is pid 1).
    pub pid: u32,
    /// A pidfd for it (close-on-exec): readable once it has ended; wait on
    /// it and signal through it.
    pub pidfd: OwnedFd,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it (`SIGSYS` is a seccomp violation, `SIGKILL` an
    /// OOM kill or an explicit kill).
    Signal {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl Exit {
    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(*c),
            Exit::Signal { .. } => None,
        }
    }

    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self {
            Exit::Code(_) => None,
            Exit::Signal { signal, .. } => Some(*signal),
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by signal {signal}")?;
                if let Some(name) = signal_name(*signal) {
                    write!(f, " ({name})")?;
                }
                if *core_dumped {
                    f.write_str(", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// Waits for the process behind `pidfd` (a child of the caller) to end and
/// reaps it. With `nohang`, returns `Ok(None)` at once if it still runs.
///
/// Errors: `ECHILD` if it is not the caller's child or was reaped already.
pub fn wait(pidfd: impl AsFd, nohang: bool) -> io::Result<Option<Exit>> {
    let fd = pidfd.as_fd().as_raw_fd();
    let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value and
        // tells "nothing happened" apart under WNOHANG (si_pid stays 0).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is ours for the call; the fd is borrowed.
        let r = unsafe { libc::waitid(libc::P_PIDFD, fd as libc::id_t, &mut info, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled in a SIGCHLD siginfo (or left zeros).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => Exit::Code(status),
            libc::CLD_DUMPED => Exit::Signal {
                signal: status,
                core_dumped: true,
            },
            _ => Exit::Signal {
                signal: status,
                core_dumped: false,
            },
        }));
    }
}

/// Sends `signal` to the process behind `pidfd`. `ESRCH` once it has ended.
pub fn kill(pidfd: impl AsFd, signal: i32) -> io::Result<()> {
    sys::pidfd_send_signal(pidfd.as_fd(), signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_says_code_or_signal() {
        assert_eq!(Exit::Code(3).to_string(), "exited with code 3");
        assert_eq!(Exit::Code(3).code(), Some(3));
        let sys = Exit::Signal {
            signal: libc::SIGSYS,
            core_dumped: false,
        };
        assert_eq!(sys.to_string(), "killed by signal 31 (SIGSYS)");
        assert_eq!(sys.signal(), Some(libc::SIGSYS));
        assert_eq!(sys.code(), None);
    }

    #[test]
    fn wait_on_a_pidfd_that_is_not_a_child_is_echild() {
        // Our own process is not our child.
        let me = sys::pidfd_open(std::process::id() as i32).expect("pidfd_open of ourselves");
        let e = wait(&me, true).expect_err("we are not our own child");
        assert_eq!(e.raw_os_error(), Some(libc::ECHILD));
    }
}
