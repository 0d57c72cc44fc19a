//! The SIGSYS handler a seccomp trap runs: one line on stderr naming the
//! forbidden call, its thread kind and its first arguments, then death by
//! SIGSYS (see [`super`] for why trap and not kill).
//!
//! Everything here runs inside a signal handler on a thread whose filter
//! refused a call: it must not allocate, lock, or make any system call but
//! `write`, `getpid`, `gettid`, `tgkill` and `exit_group`, which every
//! filter allows.

use std::ffi::{c_int, c_void};

use super::names::SYSCALL_NAMES;
use super::{current_kind, SeccompError, ThreadKind};

/// `si_code` of a SIGSYS sent by a seccomp trap.
const SYS_SECCOMP: c_int = 1;

/// The start of a SIGSYS `siginfo_t` on 64-bit Linux: the common header,
/// then the union's `_sigsys` member (`include/uapi/asm-generic/siginfo.h`).
#[repr(C)]
struct SigsysInfo {
    _signo: c_int,
    _errno: c_int,
    code: c_int,
    _pad: c_int,
    _call_addr: *mut c_void,
    syscall: c_int,
    _arch: u32,
}

/// Installs the handler for the whole process. Call it before the first
/// filter is installed (`rt_sigaction` is on no list).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero `sigaction` is a valid value (no handler, empty
    // mask, no flags); the fields that matter are set below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    // SA_RESETHAND: a second SIGSYS (say, from inside this handler) kills
    // by default. SA_NODEFER: the SIGSYS the handler raises is not held
    // back until it returns.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER | libc::SA_ONSTACK;
    // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is a fully initialised sigaction whose handler has the
    // SA_SIGINFO signature; the old action is not asked for.
    let r = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

extern "C" fn on_sigsys(_signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SIGSYS delivered to
    // an SA_SIGINFO handler; `SigsysInfo` is a prefix of its layout.
    let (code, nr) = unsafe {
        let i = &*(info as *const SigsysInfo);
        (i.code, i.syscall)
    };
    if code == SYS_SECCOMP {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted
        // thread's ucontext_t, valid for the handler's duration.
        let args = unsafe { syscall_args(context) };
        let line = report_line(current_kind(), nr, args);
        let bytes = line.as_bytes();
        // SAFETY: `bytes` is a valid buffer of `bytes.len()` bytes; write(2)
        // is async-signal-safe.
        unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
    }
    die()
}

/// The first four arguments of the trapped call, from the registers the
/// x86_64 syscall ABI passes them in.
///
/// # Safety
///
/// `context` must be the `ucontext_t` a signal handler was given.
unsafe fn syscall_args(context: *mut c_void) -> [u64; 4] {
    // SAFETY: the caller guarantees `context` is a live ucontext_t.
    let g = unsafe { &(*(context as *const libc::ucontext_t)).uc_mcontext.gregs };
    [
        g[libc::REG_RDI as usize] as u64,
        g[libc::REG_RSI as usize] as u64,
        g[libc::REG_RDX as usize] as u64,
        g[libc::REG_R10 as usize] as u64,
    ]
}

/// Ends the process by SIGSYS: SA_RESETHAND made it the default action on
/// entry, and SA_NODEFER left it unblocked, so it is delivered as the
/// `tgkill` returns.
fn die() -> ! {
    // SAFETY: getpid, gettid and tgkill take no pointers; _exit never
    // returns. All are async-signal-safe.
    unsafe {
        let pid = libc::getpid();
        let tid = libc::syscall(libc::SYS_gettid);
        libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS);
        // Not reached unless SIGSYS could not be sent.
        libc::_exit(128 + libc::SIGSYS)
    }
}

/// The name of x86_64 system call `nr`, when known.
pub(super) fn syscall_name(nr: c_int) -> Option<&'static str> {
    let nr = u32::try_from(nr).ok()?;
    SYSCALL_NAMES
        .binary_search_by_key(&nr, |&(n, _)| n)
        .ok()
        .map(|i| SYSCALL_NAMES[i].1)
}

/// A line built without allocating.
pub(super) struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }

    /// Appends `s`, cut at the buffer's end.
    fn push(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn push_digits(&mut self, mut v: u64, base: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b"0123456789abcdef"[(v % base) as usize];
            v /= base;
            if v == 0 {
                break;
            }
        }
        for &b in &tmp[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    /// The bytes so far.
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The report of a trapped call `nr` with `args` on a thread of `kind`:
/// `zygote-vmm: seccomp: forbidden system call: NAME (NR) on the KIND
/// thread (args 0x.. 0x.. 0x.. 0x..)` and a newline. The host looks for the
/// `zygote-vmm: seccomp: forbidden system call: ` prefix in `vmm.log`.
pub(super) fn report_line(kind: Option<ThreadKind>, nr: c_int, args: [u64; 4]) -> Line {
    let mut l = Line::new();
    l.push("zygote-vmm: seccomp: forbidden system call: ");
    match syscall_name(nr) {
        Some(name) => {
            l.push(name);
            l.push(" (");
            l.push_digits(u64::from(nr.unsigned_abs()), 10);
            l.push(")");
        }
        None => {
            if nr < 0 {
                l.push("-");
            }
            l.push_digits(u64::from(nr.unsigned_abs()), 10);
        }
    }
    match kind {
        Some(k) => {
            l.push(" on the ");
            l.push(k.name());
            l.push(" thread");
        }
        None => l.push(" on a thread without a filter of its own"),
    }
    l.push(" (args");
    for a in args {
        l.push(" 0x");
        l.push_digits(a, 16);
    }
    l.push(")");
    // Room for the newline is kept even when the text was cut.
    if l.len == l.buf.len() {
        l.len -= 1;
    }
    l.push("\n");
    l
}
