//! Spawning commands: `clone(CLONE_VM|CLONE_VFORK)` + `execve`, the way
//! posix_spawn works, minus its cost.
//!
//! Not `std::process::Command`: in a statically linked glibc binary it
//! falls back to fork+exec (~1.6 s in the guest) whenever a cwd is set (it
//! finds `posix_spawn_file_actions_addchdir_np` with dlsym, which fails
//! statically) or the environment sets PATH, and it lets the child inherit
//! the caller's signal mask. Not glibc's `posix_spawn` either: its child
//! resets all 64 signal dispositions one by one (~130 syscalls, ~65 ms in
//! the guest). The child here makes ~12 syscalls: new process group,
//! stdio, cwd, the 4 dispositions the agent changed, an empty signal mask,
//! exec.
//!
//! `argv[0]` is looked up in PATH here (one `statx` per PATH entry tried)
//! so that a missing command is reported without spawning at all.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use proto::{ErrorCode, ExecRequest};

use crate::reaper::Reaper;
use crate::sys;

/// PATH of commands when neither the agent's environment nor the request
/// sets one.
pub const DEFAULT_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// Why a command could not be started.
#[derive(Debug, PartialEq, Eq)]
pub enum SpawnError {
    /// The request itself is unusable (empty argv, NUL bytes, bad cwd...).
    Invalid(String),
    /// `argv[0]` is not in PATH.
    NotFound(String),
    /// An OS error (from the lookup, the pipes, the clone or the exec).
    Os {
        /// The errno.
        errno: i32,
        /// What failed, for the message.
        what: String,
    },
}

impl SpawnError {
    /// The protocol error code and message for this error.
    pub fn to_error(&self) -> (ErrorCode, String) {
        match self {
            Self::Invalid(msg) => (ErrorCode::InvalidRequest, msg.clone()),
            Self::NotFound(prog) => (ErrorCode::NotFound, format!("{prog}: command not found")),
            Self::Os { errno, what } => (
                errno_code(*errno),
                format!("{what}: {}", io::Error::from_raw_os_error(*errno)),
            ),
        }
    }
}

/// The error code of a failed spawn with this errno.
pub fn errno_code(errno: i32) -> ErrorCode {
    match errno {
        libc::ENOENT | libc::ENOTDIR => ErrorCode::NotFound,
        libc::EACCES | libc::EPERM => ErrorCode::PermissionDenied,
        _ => ErrorCode::SpawnFailed,
    }
}

/// A validated request, converted to what `execve` takes.
#[derive(Debug)]
pub struct Prepared {
    /// The program to execute, resolved against PATH.
    pub program: CString,
    /// `argv`, with `argv[0]` as the host gave it.
    pub argv: Vec<CString>,
    /// `envp` as `KEY=value` strings.
    pub envp: Vec<CString>,
    /// Working directory, if any.
    pub cwd: Option<CString>,
    /// Whether stdin is a pipe fed by the host (else /dev/null).
    pub stdin: bool,
    /// Kill after this many milliseconds (0 or none: never).
    pub timeout_ms: Option<u64>,
}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Invalid(format!("{what} contains a NUL byte")))
}

/// Merges `overrides` into `base` (same key: the override wins, in place).
pub fn merge_env(
    base: &[(OsString, OsString)],
    overrides: &[(String, String)],
) -> Result<Vec<(OsString, OsString)>, SpawnError> {
    let mut env = base.to_vec();
    for (k, v) in overrides {
        if k.is_empty() || k.contains('=') {
            return Err(SpawnError::Invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
        match env.iter_mut().find(|(key, _)| key == OsStr::new(k)) {
            Some(slot) => slot.1 = v.into(),
            None => env.push((k.into(), v.into())),
        }
    }
    Ok(env)
}

/// Finds `prog` in `path` the way `execvp` would; a name with a `/` is
/// used as is.
pub fn resolve(prog: &str, path: &OsStr) -> Result<Vec<u8>, SpawnError> {
    if prog.is_empty() {
        return Err(SpawnError::NotFound(String::new()));
    }
    if prog.contains('/') {
        return Ok(prog.as_bytes().to_vec());
    }
    let mut denied = false;
    for dir in path.as_bytes().split(|&b| b == b':') {
        if dir.is_empty() {
            continue;
        }
        let mut candidate = dir.to_vec();
        if candidate.last() != Some(&b'/') {
            candidate.push(b'/');
        }
        candidate.extend_from_slice(prog.as_bytes());
        if let Ok(meta) = std::fs::metadata(Path::new(OsStr::from_bytes(&candidate))) {
            if meta.is_file() {
                if meta.permissions().mode() & 0o111 != 0 {
                    return Ok(candidate);
                }
                denied = true;
            }
        }
    }
    if denied {
        Err(SpawnError::Os {
            errno: libc::EACCES,
            what: prog.to_string(),
        })
    } else {
        Err(SpawnError::NotFound(prog.to_string()))
    }
}

/// The guest image lists busybox's applets here instead of installing a
/// symlink per applet: each symlink costs ~40 ms of emulated initramfs
/// unpacking on hosts that emulate the guest kernel (266 of them: ~10 s of
/// boot). Busybox picks the applet from `argv[0]`, and its shell runs
/// applets without a `PATH` lookup.
pub const BUSYBOX_APPLETS: &str = "/etc/busybox.applets";
/// The busybox binary that runs applets.
pub const BUSYBOX: &str = "/bin/busybox";

/// `/bin/busybox` if `prog` is one of its applets (per [`BUSYBOX_APPLETS`]).
fn busybox_applet(prog: &str) -> Option<Vec<u8>> {
    static APPLETS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let applets = APPLETS.get_or_init(|| {
        std::fs::read_to_string(BUSYBOX_APPLETS)
            .map(|s| parse_applets(&s))
            .unwrap_or_default()
    });
    applets
        .binary_search_by(|a| a.as_str().cmp(prog))
        .ok()
        .map(|_| BUSYBOX.as_bytes().to_vec())
}

/// Sorted applet names from the list file's text (one per line).
fn parse_applets(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('/'))
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Validates `req` and resolves its program, with `base_env` as the
/// environment the request's variables are added to.
pub fn prepare(
    base_env: &[(OsString, OsString)],
    req: &ExecRequest,
) -> Result<Prepared, SpawnError> {
    let Some(prog) = req.argv.first() else {
        return Err(SpawnError::Invalid("empty argv".into()));
    };
    let argv = req
        .argv
        .iter()
        .map(|a| cstring("argv", a.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let env = merge_env(base_env, &req.env)?;
    let envp = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring("environment", kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = match &req.cwd {
        None => None,
        Some(dir) => {
            let c = cstring("cwd", dir.as_str())?;
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(SpawnError::Invalid(format!("cwd {dir}: not a directory"))),
                Err(e) => return Err(SpawnError::Invalid(format!("cwd {dir}: {e}"))),
            }
            Some(c)
        }
    };
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_os_str())
        .unwrap_or(OsStr::new(DEFAULT_PATH));
    let program = match resolve(prog, path) {
        Err(SpawnError::NotFound(name)) => match busybox_applet(prog) {
            Some(busybox) => busybox,
            None => return Err(SpawnError::NotFound(name)),
        },
        other => other?,
    };
    let program = cstring("argv[0]", program)?;
    Ok(Prepared {
        program,
        argv,
        envp,
        cwd,
        stdin: req.stdin,
        timeout_ms: req.timeout_ms.filter(|&t| t > 0),
    })
}

/// A started command: its pid (= process group) and our ends of its pipes.
pub struct Child {
    /// Pid and process group id.
    pub pid: i32,
    /// Write end of its stdin (non-blocking), if piped.
    pub stdin: Option<File>,
    /// Read end of its stdout.
    pub stdout: File,
    /// Read end of its stderr.
    pub stderr: File,
}

/// `/dev/null` opened once, shared by all spawns as the stdin of commands
/// without one (saves an `open` in every child).
fn dev_null() -> Option<RawFd> {
    static NULL: OnceLock<Option<OwnedFd>> = OnceLock::new();
    NULL.get_or_init(|| sys::open(c"/dev/null", libc::O_RDWR).ok())
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}

/// Starts `p` in a new process group, its exit routed by `reaper` to the
/// eventfd `notify`.
pub fn spawn(reaper: &Reaper, notify: RawFd, p: &Prepared) -> Result<Child, SpawnError> {
    let os = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| SpawnError::Os {
            errno: sys::errno_of(&e),
            what,
        }
    };
    let (out_r, out_w) = sys::pipe().map_err(os("pipe"))?;
    let (err_r, err_w) = sys::pipe().map_err(os("pipe"))?;
    let stdin = if p.stdin {
        let (r, w) = sys::pipe().map_err(os("pipe"))?;
        sys::set_nonblocking(&w).map_err(os("pipe"))?;
        Some((r, w))
    } else {
        None
    };
    let stdin_fd = match &stdin {
        Some((r, _)) => r.as_raw_fd(),
        None => dev_null().ok_or_else(|| SpawnError::Os {
            errno: libc::ENOENT,
            what: "/dev/null".into(),
        })?,
    };
    let stdio = [stdin_fd, out_w.as_raw_fd(), err_w.as_raw_fd()];
    let pid = reaper.spawn_watched(notify, || clone_exec(p, stdio))?;
    // The child's ends close here: only the child holds them now.
    Ok(Child {
        pid,
        stdin: stdin.map(|(_, w)| File::from(w)),
        stdout: File::from(out_r),
        stderr: File::from(err_r),
    })
}

/// What the child needs, all prepared before the clone: the child shares
/// our memory and runs on a borrowed stack, so it must not allocate, lock
/// or unwind. It only makes syscalls.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// NULL for no chdir.
    cwd: *const libc::c_char,
    /// Descriptors to become the child's 0, 1 and 2.
    stdio: [RawFd; 3],
    /// Set by the child if it fails before exec: errno, and which step.
    errno: AtomicI32,
    step: AtomicI32,
}

const STEP_SETPGID: i32 = 1;
const STEP_DUP2: i32 = 2;
const STEP_CHDIR: i32 = 3;
const STEP_EXEC: i32 = 4;

/// Stack of the child until it execs: it runs a handful of syscalls.
const CHILD_STACK: usize = 32 * 1024;

/// Signals whose disposition the agent changed: back to the default in the
/// child. (Exec resets handlers anyway, but a signal arriving between the
/// unblock and the exec would run the agent's handler in the child; and
/// SIGPIPE is ignored by the agent, which exec would keep.)
const RESET_SIGNALS: [libc::c_int; 4] =
    [libc::SIGPIPE, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2];

/// Sets the calling thread's full signal mask (all 64 signals, glibc's
/// internal ones included), returning the previous one.
fn set_sigmask(mask: u64) -> u64 {
    let mut old: u64 = 0;
    // SAFETY: the kernel reads and writes 8-byte masks at valid addresses.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            &mut old as *mut u64,
            8usize,
        )
    };
    old
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent keeps alive (it is
    // suspended by CLONE_VFORK until we exec or exit); everything below is
    // plain syscalls on valid pointers.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |step: i32| -> ! {
            a.errno.store(*libc::__errno_location(), Ordering::Relaxed);
            a.step.store(step, Ordering::Relaxed);
            libc::_exit(127)
        };
        if libc::setpgid(0, 0) != 0 {
            fail(STEP_SETPGID);
        }
        for (target, &src) in a.stdio.iter().enumerate() {
            let target = target as RawFd;
            if src == target {
                // dup2 onto itself would keep close-on-exec.
                libc::fcntl(src, libc::F_SETFD, 0);
            } else if libc::dup2(src, target) < 0 {
                fail(STEP_DUP2);
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
            fail(STEP_CHDIR);
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in RESET_SIGNALS {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        set_sigmask(0);
        libc::execve(a.program, a.argv, a.envp);
        fail(STEP_EXEC)
    }
}

/// Starts the command: `clone(CLONE_VM|CLONE_VFORK)` then, in the child,
/// setpgid, dup2 x3, chdir, 4 sigactions, sigprocmask and execve; about 15
/// syscalls in all. (glibc's posix_spawn resets all 64 signal dispositions
/// in the child, ~130 more syscalls: ~65 ms in the guest.)
fn clone_exec(p: &Prepared, stdio: [RawFd; 3]) -> Result<i32, SpawnError> {
    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let args = ChildArgs {
        program: p.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: p.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdio,
        errno: AtomicI32::new(0),
        step: AtomicI32::new(0),
    };
    // u128 elements: a 16-byte aligned stack.
    let mut stack: Vec<u128> = Vec::with_capacity(CHILD_STACK / 16);
    // SAFETY: one past the end of the allocation, the stack's top.
    let top = unsafe { stack.as_mut_ptr().add(CHILD_STACK / 16) };

    // No signal handler may run in the child before it reset them.
    let old_mask = set_sigmask(!0);
    // SAFETY: `child_main` only makes syscalls; `args`, the strings and
    // arrays it points to and `stack` outlive the call, since CLONE_VFORK
    // suspends us until the child has exec'd or exited.
    let pid = unsafe {
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&args as *const ChildArgs).cast_mut().cast(),
        )
    };
    let clone_err = io::Error::last_os_error();
    set_sigmask(old_mask);
    drop(stack);
    if pid < 0 {
        return Err(SpawnError::Os {
            errno: sys::errno_of(&clone_err),
            what: "clone".into(),
        });
    }
    // The child exited before exec: its zombie goes to the reaper, which
    // discards it (it is not registered).
    let errno = args.errno.load(Ordering::Relaxed);
    let name = p.argv[0].to_string_lossy();
    match args.step.load(Ordering::Relaxed) {
        0 => Ok(pid),
        STEP_EXEC => Err(SpawnError::Os {
            errno,
            what: name.into_owned(),
        }),
        STEP_CHDIR => Err(SpawnError::Invalid(format!(
            "cwd {}: {}",
            p.cwd
                .as_ref()
                .map_or(String::new(), |c| c.to_string_lossy().into_owned()),
            io::Error::from_raw_os_error(errno)
        ))),
        step => Err(SpawnError::Os {
            errno,
            what: if step == STEP_SETPGID {
                "setpgid"
            } else {
                "dup2"
            }
            .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_code(libc::ENOENT), ErrorCode::NotFound);
        let list = parse_applets("uname\nsh\n\n ls \nbad/name\nsh\n");
        assert_eq!(list, ["ls", "sh", "uname"]);
        assert_eq!(errno_code(libc::ENOTDIR), ErrorCode::NotFound);
        assert_eq!(errno_code(libc::EACCES), ErrorCode::PermissionDenied);
        assert_eq!(errno_code(libc::EPERM), ErrorCode::PermissionDenied);
        assert_eq!(errno_code(libc::ENOEXEC), ErrorCode::SpawnFailed);
        assert_eq!(errno_code(libc::ENOMEM), ErrorCode::SpawnFailed);
        let (code, msg) = SpawnError::NotFound("frob".into()).to_error();
        assert_eq!(
            (code, msg.as_str()),
            (ErrorCode::NotFound, "frob: command not found")
        );
        let (code, msg) = SpawnError::Os {
            errno: libc::EACCES,
            what: "x".into(),
        }
        .to_error();
        assert_eq!(code, ErrorCode::PermissionDenied);
        assert!(msg.starts_with("x: Permission denied"), "{msg}");
    }

    #[test]
    fn env_merging() {
        let base = env(&[("PATH", "/bin"), ("HOME", "/root")]);
        let merged = merge_env(
            &base,
            &[("HOME".into(), "/tmp".into()), ("X".into(), "1".into())],
        )
        .unwrap();
        assert_eq!(
            merged,
            env(&[("PATH", "/bin"), ("HOME", "/tmp"), ("X", "1")])
        );
        assert!(matches!(
            merge_env(&base, &[("A=B".into(), "1".into())]),
            Err(SpawnError::Invalid(_))
        ));
        assert!(matches!(
            merge_env(&base, &[(String::new(), "1".into())]),
            Err(SpawnError::Invalid(_))
        ));
    }

    #[test]
    fn path_lookup() {
        let dir = std::env::temp_dir().join(format!("zygote-agent-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("runme");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let noexec = dir.join("noexec");
        std::fs::write(&noexec, "").unwrap();
        std::fs::set_permissions(&noexec, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::create_dir_all(dir.join("adir")).unwrap();
        let path = format!("/nonexistent::{}", dir.display());

        assert_eq!(
            resolve("runme", OsStr::new(&path)).unwrap(),
            exe.as_os_str().as_bytes()
        );
        assert!(matches!(
            resolve("noexec", OsStr::new(&path)),
            Err(SpawnError::Os {
                errno: libc::EACCES,
                ..
            })
        ));
        assert_eq!(
            resolve("adir", OsStr::new(&path)),
            Err(SpawnError::NotFound("adir".into()))
        );
        assert_eq!(
            resolve("nope", OsStr::new(&path)),
            Err(SpawnError::NotFound("nope".into()))
        );
        assert_eq!(resolve("./x/y", OsStr::new("")).unwrap(), b"./x/y");
        assert!(matches!(
            resolve("", OsStr::new(&path)),
            Err(SpawnError::NotFound(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn request_validation() {
        let base = env(&[("PATH", DEFAULT_PATH)]);
        let req = |argv: &[&str]| ExecRequest::new(argv.iter().copied());
        assert!(matches!(
            prepare(&base, &req(&[])),
            Err(SpawnError::Invalid(_))
        ));
        assert!(matches!(
            prepare(&base, &req(&["sh", "a\0b"])),
            Err(SpawnError::Invalid(_))
        ));
        let mut r = req(&["sh"]);
        r.cwd = Some("/nonexistent-dir".into());
        assert!(matches!(prepare(&base, &r), Err(SpawnError::Invalid(_))));
        r.cwd = Some("/".into());
        r.timeout_ms = Some(0);
        r.env = vec![("A".into(), "b".into())];
        let p = prepare(&base, &r).unwrap();
        assert_eq!(p.timeout_ms, None);
        assert_eq!(p.cwd.as_deref(), Some(c"/"));
        assert!(p.program.as_bytes().ends_with(b"/sh"));
        assert_eq!(p.envp.last().unwrap().as_c_str(), c"A=b");
        // The request's PATH is the one searched.
        let mut r = req(&["sh"]);
        r.env = vec![("PATH".into(), "/nonexistent".into())];
        assert_eq!(
            prepare(&base, &r).unwrap_err(),
            SpawnError::NotFound("sh".into())
        );
    }
}
