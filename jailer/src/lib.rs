//! The jailer: starts a process (a VMM) confined before any of its code
//! runs, from the spawning side, with no KVM code.
//!
//! One code path for every process ([`spawn`]): the program's descriptors
//! are mapped to their numbers and every other one closed; with a [`Jail`]
//! the process also gets its own mount, PID, IPC, UTS, cgroup and network
//! namespaces, a root of its own (`chroot` into a directory holding only
//! what it needs: [`Bind`]s of host files, read-only where asked), an
//! unprivileged uid/gid without supplementary groups, no capabilities,
//! `no_new_privs` and rlimits; with a [`cgroup::Placement`] it starts in its
//! VM's cgroup ([`cgroup`]). Devices (`/dev/kvm`, a tap) are opened by the
//! caller and passed as descriptors: the jail has no `/dev`.
//!
//! The caller may be multi-threaded (a tokio daemon): everything that
//! allocates is prepared before `clone3`; the child, which borrows the
//! caller's memory until it execs (`CLONE_VM | CLONE_VFORK`, as
//! `posix_spawn` does, so the caller's size does not matter), then makes
//! only raw system calls, and reports a failing step and its errno on a
//! close-on-exec pipe (EOF: the program runs). The new process is
//! a direct child of the caller, returned with a pidfd ([`Jailed`]) to
//! [`wait`] on and [`kill`] through.
//!
//! A jailed process is pid 1 of its PID namespace: signals it has no
//! handler for are ignored there (except `SIGKILL` and `SIGSTOP` from the
//! caller), and `getpid()` inside says 1.
//!
//! Needs Linux 5.14 (`clone3` with `CLONE_INTO_CGROUP` and
//! `CLONE_CLEAR_SIGHAND`, `close_range` with `CLOSE_RANGE_CLOEXEC`, pidfds,
//! `cgroup.kill`, `open_tree`/`move_mount`/`mount_setattr`) and, for a
//! jail, `CAP_SYS_ADMIN`, `CAP_SYS_CHROOT`, `CAP_SETUID`, `CAP_SETGID` and
//! `CAP_SETPCAP` in the initial user namespace (root). See `README.md` for
//! what a caller must prepare and what it costs.
//!
//! This crate must not depend on the VMM or know what the program is.

pub mod cgroup;
mod child;
mod elf;
mod error;
mod process;
mod spawn;
mod sys;

pub use elf::{elf_runtime_files, ElfError};
pub use error::{JailError, Step};
pub use process::{kill, wait, Exit, Jailed};
pub use spawn::{spawn, Bind, Jail, NetNs, Rlimits, Spawn, Stdio};
