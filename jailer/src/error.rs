//! What can go wrong when spawning a process: [`JailError`], and [`Step`],
//! the step of the child's set-up that failed (reported by the child over
//! its report pipe as a step code and an errno).
//!
//! This module must not decide anything: it names failures, with the hint
//! a user needs to fix them.

use std::io;
use std::path::PathBuf;

/// A step the child performs between `clone3` and `execve`, in this order.
/// A failing step is reported with the OS error it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// `setsid`: detach into a session of its own.
    Setsid,
    /// Join a cgroup v1 hierarchy (write `0` to its `tasks`).
    JoinCgroup,
    /// `setns` into the given network namespace.
    JoinNetns,
    /// Copy the given descriptors out of the way of their targets.
    MoveFds,
    /// `dup2` each descriptor (stdio included) onto its target number.
    MapFds,
    /// Mark every other descriptor close-on-exec.
    CloseFds,
    /// Enter a mount namespace of its own (a copy of the jailer's empty
    /// template).
    EnterMountNs,
    /// Attach the jail root.
    AttachRoot,
    /// Attach one of [`crate::Jail::binds`] (by index).
    Bind(usize),
    /// Mount a fresh `proc` at `/proc` inside the root.
    MountProc,
    /// `chroot` into the jail root.
    Chroot,
    /// `sethostname` in the new UTS namespace.
    Hostname,
    /// Set a resource limit.
    Rlimit,
    /// Drop supplementary groups.
    Setgroups,
    /// `setresgid` to the jail's gid.
    Setgid,
    /// Drop a capability from the bounding set.
    DropBoundingSet,
    /// Clear the ambient capabilities.
    ClearAmbient,
    /// `setresuid` to the jail's uid.
    Setuid,
    /// Clear the remaining (inheritable) capabilities.
    ClearCapabilities,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// `PR_SET_PDEATHSIG`.
    ParentDeathSignal,
    /// The caller died before the child could arm its death signal.
    ParentGone,
    /// Reset the signal mask (and `SIGPIPE`) to their defaults.
    Signals,
    /// `execveat` of the program.
    Exec,
}

impl Step {
    /// Wire code (child to parent), with the bind index for [`Step::Bind`].
    pub(crate) fn encode(self) -> (u32, u32) {
        match self {
            Step::Bind(i) => (8, i as u32),
            other => (other.code(), 0),
        }
    }

    fn code(self) -> u32 {
        match self {
            Step::Setsid => 0,
            Step::JoinCgroup => 1,
            Step::JoinNetns => 2,
            Step::MoveFds => 3,
            Step::MapFds => 4,
            Step::CloseFds => 5,
            Step::EnterMountNs => 6,
            Step::AttachRoot => 7,
            Step::Bind(_) => 8,
            Step::MountProc => 9,
            Step::Chroot => 10,
            Step::Hostname => 11,
            Step::Rlimit => 12,
            Step::Setgroups => 13,
            Step::Setgid => 14,
            Step::DropBoundingSet => 15,
            Step::ClearAmbient => 16,
            Step::Setuid => 17,
            Step::ClearCapabilities => 18,
            Step::NoNewPrivs => 19,
            Step::ParentDeathSignal => 20,
            Step::ParentGone => 21,
            Step::Signals => 22,
            Step::Exec => 23,
        }
    }

    /// Inverse of [`Step::encode`].
    pub(crate) fn decode(code: u32, index: u32) -> Option<Step> {
        const ALL: [Step; 24] = [
            Step::Setsid,
            Step::JoinCgroup,
            Step::JoinNetns,
            Step::MoveFds,
            Step::MapFds,
            Step::CloseFds,
            Step::EnterMountNs,
            Step::AttachRoot,
            Step::Bind(0),
            Step::MountProc,
            Step::Chroot,
            Step::Hostname,
            Step::Rlimit,
            Step::Setgroups,
            Step::Setgid,
            Step::DropBoundingSet,
            Step::ClearAmbient,
            Step::Setuid,
            Step::ClearCapabilities,
            Step::NoNewPrivs,
            Step::ParentDeathSignal,
            Step::ParentGone,
            Step::Signals,
            Step::Exec,
        ];
        match ALL.get(code as usize)? {
            Step::Bind(_) => Some(Step::Bind(index as usize)),
            s => Some(*s),
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Step::Setsid => "start a session of its own (setsid)",
            Step::JoinCgroup => "join its cgroup (cgroup v1 tasks)",
            Step::JoinNetns => "enter its network namespace (setns)",
            Step::MoveFds => "copy its descriptors out of the way",
            Step::MapFds => "place its descriptors at their numbers (dup2)",
            Step::CloseFds => "mark the other descriptors close-on-exec",
            Step::EnterMountNs => "enter a mount namespace of its own",
            Step::AttachRoot => "attach the jail root",
            Step::Bind(i) => return write!(f, "attach bind #{i}"),
            Step::MountProc => "mount proc in the jail root",
            Step::Chroot => "chroot into the jail root",
            Step::Hostname => "set its hostname",
            Step::Rlimit => "set a resource limit",
            Step::Setgroups => "drop its supplementary groups",
            Step::Setgid => "change to the jail's gid",
            Step::DropBoundingSet => "drop the capability bounding set",
            Step::ClearAmbient => "clear its ambient capabilities",
            Step::Setuid => "change to the jail's uid",
            Step::ClearCapabilities => "clear its capabilities",
            Step::NoNewPrivs => "set no_new_privs",
            Step::ParentDeathSignal => "arm its parent-death signal",
            Step::ParentGone => "start: its parent died during the set-up",
            Step::Signals => "reset its signal mask",
            Step::Exec => "execute the program",
        };
        f.write_str(s)
    }
}

/// Why [`crate::spawn`] failed. When it fails, no child is left running
/// (a child that got as far as reporting a step has been reaped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JailError {
    /// An argument or environment entry holds a NUL byte.
    #[error("the {what} holds a NUL byte; a process's arguments and environment cannot carry one")]
    Nul {
        /// Which string (e.g. "argument 2").
        what: String,
    },
    /// An environment variable's name is empty or holds `=`.
    #[error("environment variable name {name:?} is empty or holds '='; name it without '='")]
    EnvName {
        /// The name as given.
        name: String,
    },
    /// A descriptor target is reserved or given twice.
    #[error("descriptor target {target} is {why}; give each inherited descriptor its own number above 2 (stdio goes through Spawn::stdin/stdout/stderr)")]
    FdTarget {
        /// The target number.
        target: i32,
        /// "negative", "stdio" or "used twice".
        why: &'static str,
    },
    /// The jail would run as root (or keep the caller's ids).
    #[error("the jail's uid and gid must be unprivileged: neither 0 nor 4294967295, which setresuid reads as \"unchanged\" (got uid {uid}, gid {gid}); give it an id from the configured range")]
    PrivilegedId {
        /// Requested uid.
        uid: u32,
        /// Requested gid.
        gid: u32,
    },
    /// The jail root is not an absolute path to a directory.
    #[error("the jail root {path} is not an existing directory given by an absolute path; create it before spawning")]
    Root {
        /// The root.
        path: PathBuf,
        /// The OS error, if the check got one.
        #[source]
        source: Option<io::Error>,
    },
    /// A bind target is not an absolute path inside the root.
    #[error("bind target {target} must be an absolute path inside the jail root, other than / and without `..`")]
    BindTargetPath {
        /// The target as given.
        target: PathBuf,
    },
    /// A bind source cannot be found.
    #[error("bind source {path} cannot be read; make sure it exists before spawning")]
    BindSource {
        /// The source.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The mount point of a bind could not be made inside the root.
    #[error("cannot create the mount point {target} for {source_path} inside the jail root {root} (an existing symlink is refused, and a file cannot be mounted on a directory or the reverse)")]
    MountPoint {
        /// The jail root.
        root: PathBuf,
        /// The target inside the root.
        target: PathBuf,
        /// The bind's source.
        source_path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The program could not be opened.
    #[error("cannot open the program {path}")]
    Program {
        /// The program.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A resource the spawner needs (pipe, `/dev/null`, signal mask, the
    /// capability count) could not be had.
    #[error("cannot prepare the spawn: {what}")]
    Prepare {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `clone3` failed.
    #[error("cannot create the process (clone3); EPERM means the caller lacks CAP_SYS_ADMIN for the namespaces, EINVAL a kernel older than 5.7, ENOSPC a namespace limit reached")]
    Clone {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The child reported a failing step before `execve`.
    #[error("the jailed process (pid {pid}) could not {step}")]
    Step {
        /// The step.
        step: Step,
        /// The child's pid (reaped).
        pid: u32,
        /// The OS error it got.
        #[source]
        source: io::Error,
    },
    /// The child could not attach one of the jail's binds.
    #[error("the jailed process could not mount {source_path} at {target} in the jail root")]
    Bind {
        /// The bind's source on the host.
        source_path: PathBuf,
        /// The target inside the root.
        target: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `execve` failed in the child.
    #[error("cannot execute {program} in the jail (ENOENT: its interpreter or a library is not bound into the root, see elf_runtime_files; EACCES: the jail's uid may not execute it or traverse the root)")]
    Exec {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The child sent a report that cannot be read.
    #[error("the child's set-up report could not be read")]
    Report {
        /// The OS error (or the malformed report).
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_survives_the_wire() {
        for code in 0..24 {
            let step = Step::decode(code, 7).expect("every code up to Exec decodes");
            let (c, i) = step.encode();
            assert_eq!(c, code);
            if let Step::Bind(n) = step {
                assert_eq!((n, i), (7, 7));
            }
        }
        assert_eq!(Step::decode(24, 0), None);
        assert_eq!(Step::decode(u32::MAX, 0), None);
    }

    #[test]
    fn a_step_error_names_the_step_and_keeps_the_cause() {
        let e = JailError::Step {
            step: Step::Chroot,
            pid: 42,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert_eq!(
            e.to_string(),
            "the jailed process (pid 42) could not chroot into the jail root"
        );
        let cause = std::error::Error::source(&e).expect("the OS error is the source");
        assert_eq!(
            cause
                .downcast_ref::<io::Error>()
                .and_then(|e| e.raw_os_error()),
            Some(libc::EINVAL)
        );
    }
}
