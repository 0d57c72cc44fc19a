//! The VMM's seccomp filters: one allow-list per thread kind, compiled with
//! `seccompiler` from the rules below (Rust, no JSON), installed on each
//! thread before the guest runs, and the report a violation leaves.
//!
//! # Thread kinds
//!
//! A `zygote-vmm` process has exactly two kinds of threads once the guest
//! runs (nothing else is spawned; a `kvm-nx-lpage-recovery` task that KVM
//! may add to the process is the kernel's and makes no system calls):
//!
//! * **main** ([`ThreadKind::Main`]): the device event loop. It processes
//!   virtio queues (eventfds, `epoll`), the vsock muxer's Unix sockets
//!   (`accept4`, `recvfrom`, `sendto`, `shutdown`, `poll`, `FIONBIO`), the
//!   entropy device (`getrandom`), a tap device's frames (`read`, `readv`,
//!   `write`, `writev`, `TUNSETOFFLOAD`, `TUNSETVNETHDRSZ`), the control
//!   socket (`setsockopt(SO_RCVTIMEO)`), kicks vCPUs (`tgkill(SIGRTMIN)`)
//!   and removes its sockets at the end (`unlink`). A VM that may be frozen
//!   (a master, [`Profile::can_freeze`]) also reads the VM's KVM state
//!   (`KVM_GET_IRQCHIP`, `KVM_GET_PIT2`, `KVM_GET_CLOCK`) and writes the
//!   snapshot (`openat`, `statx`, `fsync`, `rename`, `chmod`); a clone may
//!   not open any file.
//! * **vcpu** ([`ThreadKind::Vcpu`]): `KVM_RUN`, `KVM_GET_REGS` (where it
//!   stopped), the device registers it reaches through MMIO and port exits
//!   (eventfd and console `write`s, a device's reset: `epoll_ctl`, `close`;
//!   a tap device's activation, which the guest's `DRIVER_OK` write starts
//!   on the vCPU that makes it: `TUNSETOFFLOAD`, `TUNSETVNETHDRSZ`) and the
//!   kick signal's return. A vCPU of a master also saves its state when the
//!   VM is frozen (the `KVM_GET_*` calls of [`crate::vstate::state`]).
//!
//! Both may use memory (`brk`; `mmap` and `mprotect` without `PROT_EXEC`,
//! `mmap` only anonymous; `munmap`, `mremap`, `madvise(MADV_DONTNEED)`),
//! private futexes, `close`, `write`, `fcntl(F_GETFD)`, `epoll_ctl`,
//! `clock_gettime` (the vDSO's fallback), signal masks, `sigaltstack`,
//! `rt_sigreturn`, `getpid`, `gettid`, `tgkill` with `SIGSYS` or `SIGABRT`
//! (dying of a violation or an abort), and their own ends (`exit` for a
//! vCPU, `exit_group` for main). Nothing may start a thread or a process,
//! open a socket, change a signal handler or map executable memory.
//!
//! Each thread gets exactly its own filter: each vCPU thread installs its
//! own first thing, the main thread installs its own once it has started
//! the vCPU threads (it starts none after), and no vCPU enters the guest
//! (its first `KVM_RUN`) before every filter is in place (see
//! `builder::run_machine`). `/proc/PID/task/TID/status` shows `Seccomp: 2`
//! and `Seccomp_filters: 1` for every thread.
//!
//! # A violation
//!
//! Anything else is `SECCOMP_RET_TRAP`: the call is not made, and the
//! thread gets `SIGSYS`. Its handler ([`install_sigsys_handler`]) writes one
//! line to the VMM's stderr (the runtime directory's `vmm.log`):
//!
//! ```text
//! zygote-vmm: seccomp: forbidden system call: socket (41) on the vcpu thread (args 0x2 0x80001 0x0 0x0)
//! ```
//!
//! and the process dies by `SIGSYS` at once; the host reports "killed by
//! its seccomp filter: a forbidden system call ...". Trap rather than
//! `SECCOMP_RET_KILL_PROCESS` because the line names the call, its thread
//! and its first arguments (for `ioctl` the second is the request), which
//! is what finding a missing call needs; it weakens nothing: the call is
//! never made either way, the handler is installed with `SA_RESETHAND` (a
//! second `SIGSYS` kills by default), `rt_sigaction` is not on any list (so
//! nothing can replace the handler) and a blocked `SIGSYS` is unblocked by
//! the kernel for a seccomp trap.
//!
//! To find a missing call: read the line, decide whether the VMM must make
//! it (a new device, a new library version), and add it to [`rules`] for
//! that thread kind with the narrowest argument conditions; `strace -f` on a
//! VMM started with `--no-seccomp` shows every call with its thread.
//! `--no-seccomp` (`VmmLaunch::seccomp == false`) installs no filter; it is
//! for debugging only.
//!
//! This module owns the rules, their compilation and installation and the
//! SIGSYS report. It must not make any system call on behalf of the VM, nor
//! relax a filter at run time: a thread's filter is final once installed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

mod names;
mod sigsys;

pub use sigsys::install_sigsys_handler;

/// The kinds of threads a VMM runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: the device event loop.
    Main,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// Its name in reports ("main", "vcpu").
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the VM may do once it runs, which decides what its threads may
/// call beyond what every VM needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// The VM may be frozen into a snapshot (a master): its main thread
    /// reads KVM state and writes files, its vCPUs save their state.
    pub can_freeze: bool,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A rule could not be expressed (a bug in this module's rules).
    #[error("cannot build the {kind} thread's seccomp rules (a bug in zygote-vmm)")]
    Rule {
        /// Whose rules.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The same system call got an unconditional and a conditional rule.
    #[error("the {kind} thread's seccomp rules allow system call {syscall} both always and under conditions (a bug in zygote-vmm)")]
    Conflict {
        /// Whose rules.
        kind: ThreadKind,
        /// The call.
        syscall: i64,
    },
    /// The rules did not compile to BPF.
    #[error("cannot compile the {kind} thread's seccomp filter to BPF (a bug in zygote-vmm)")]
    Compile {
        /// Whose filter.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {kind} thread's seccomp filter (the host kernel must support seccomp filters; --no-seccomp runs without them, for debugging only)")]
    Install {
        /// Whose filter.
        kind: ThreadKind,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler that reports seccomp violations")]
    Handler(#[source] io::Error),
    /// A vCPU thread ended before it said whether its filter is installed.
    #[error("a vCPU thread ended before it installed its seccomp filter")]
    ThreadGone,
}

/// The filters of one VM, compiled before any thread needs them.
#[derive(Debug, Clone)]
pub struct Filters {
    /// The main thread's.
    pub main: BpfProgram,
    /// Every vCPU thread's.
    pub vcpu: BpfProgram,
}

impl Filters {
    /// Compiles both filters for a VM of `profile`.
    pub fn compile(profile: Profile) -> Result<Self, SeccompError> {
        Ok(Filters {
            main: compile(ThreadKind::Main, profile)?,
            vcpu: compile(ThreadKind::Vcpu, profile)?,
        })
    }
}

/// Compiles the filter of `kind` for a VM of `profile`.
pub fn compile(kind: ThreadKind, profile: Profile) -> Result<BpfProgram, SeccompError> {
    let rules = rules(kind, profile)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Compile { kind, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Compile { kind, source })
}

thread_local! {
    /// The kind of this thread, once its filter is installed (read by the
    /// SIGSYS handler: const-initialised, no destructor, so reading it is a
    /// plain TLS load).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// The kind of the calling thread, if it installed a filter.
pub(crate) fn current_kind() -> Option<ThreadKind> {
    KIND.try_with(Cell::get).ok().flatten()
}

/// Installs `filter` (from [`Filters`]) on the calling thread as its
/// `kind`'s filter. It holds for the rest of the thread's life.
pub fn install(kind: ThreadKind, filter: &BpfProgram) -> Result<(), SeccompError> {
    KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(filter).map_err(|source| {
        KIND.with(|k| k.set(None));
        SeccompError::Install { kind, source }
    })
}

/// The KVM ioctl numbers the filters name, declared as `kvm-ioctls` does
/// (which keeps its own private).
mod kvm_nr {
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
        kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };

    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
}
use kvm_nr::*;

/// The ioctls a tap device makes when the guest activates it (on whichever
/// thread the activating register write lands: a vCPU for MMIO, main for
/// a restore).
fn tap_ioctls() -> [u64; 2] {
    [libc::TUNSETOFFLOAD, libc::TUNSETVNETHDRSZ]
}

/// What a vCPU of a VM that may be frozen reads to save its state
/// (`VcpuState::save`).
fn vcpu_save_ioctls() -> [u64; 11] {
    [
        KVM_GET_MP_STATE(),
        KVM_GET_SREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_LAPIC(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_CPUID2(),
        KVM_GET_MSRS(),
        KVM_GET_VCPU_EVENTS(),
        // KVM_GET_REGS is on every vCPU's list.
        KVM_GET_REGS(),
    ]
}

/// Futex operations: private ones only (nothing is shared with another
/// process): wait, wake (std's locks and glibc's), and the bitset wait
/// std's parking uses for timeouts.
const FUTEX_OPS: [i32; 3] = [
    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
    libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG,
];

/// One syscall's entry: always allowed, or allowed when any rule matches.
enum Entry {
    Always,
    When(Vec<Vec<(u8, SeccompCmpOp, u64)>>),
}

/// The allow-list being built for one thread kind.
struct List {
    kind: ThreadKind,
    entries: BTreeMap<i64, Entry>,
    conflict: Option<i64>,
}

impl List {
    fn new(kind: ThreadKind) -> Self {
        List {
            kind,
            entries: BTreeMap::new(),
            conflict: None,
        }
    }

    /// Allows `nr` with any arguments.
    fn allow(&mut self, nr: i64) -> &mut Self {
        match self.entries.get(&nr) {
            Some(Entry::When(_)) => self.conflict = Some(nr),
            _ => {
                self.entries.insert(nr, Entry::Always);
            }
        }
        self
    }

    /// Allows `nr` when every `(argument, comparison, value)` holds (32-bit
    /// comparisons: every argument filtered here is an `int`, or a request
    /// number the kernel truncates to 32 bits).
    fn allow_if(&mut self, nr: i64, conditions: &[(u8, SeccompCmpOp, u64)]) -> &mut Self {
        match self
            .entries
            .entry(nr)
            .or_insert_with(|| Entry::When(Vec::new()))
        {
            Entry::When(rules) => rules.push(conditions.to_vec()),
            Entry::Always => self.conflict = Some(nr),
        }
        self
    }

    /// Allows `nr` when argument `arg` is one of `values`.
    fn allow_arg_in(&mut self, nr: i64, arg: u8, values: &[u64]) -> &mut Self {
        for &v in values {
            self.allow_if(nr, &[(arg, SeccompCmpOp::Eq, v)]);
        }
        self
    }

    fn build(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
        let kind = self.kind;
        if let Some(syscall) = self.conflict {
            return Err(SeccompError::Conflict { kind, syscall });
        }
        let rule_err = |source| SeccompError::Rule { kind, source };
        let mut out = BTreeMap::new();
        for (nr, entry) in self.entries {
            let rules = match entry {
                Entry::Always => Vec::new(),
                Entry::When(rules) => rules
                    .into_iter()
                    .map(|conds| {
                        let conds = conds
                            .into_iter()
                            .map(|(arg, op, value)| {
                                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(rule_err)?,
            };
            out.insert(nr, rules);
        }
        Ok(out)
    }
}

/// The allow-list of `kind` in a VM of `profile`: system call numbers, each
/// with the argument conditions under which it is allowed (none: always).
pub fn rules(
    kind: ThreadKind,
    profile: Profile,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    use SeccompCmpOp::{Eq, MaskedEq};
    let mut l = List::new(kind);

    // Every thread: memory (never executable, mappings only anonymous: the
    // guest's RAM is mapped before any filter), locks, its fds, time.
    l.allow(libc::SYS_brk)
        .allow_if(
            libc::SYS_mmap,
            &[
                (2, MaskedEq(libc::PROT_EXEC as u64), 0),
                (
                    3,
                    MaskedEq(libc::MAP_ANONYMOUS as u64),
                    libc::MAP_ANONYMOUS as u64,
                ),
            ],
        )
        .allow_if(
            libc::SYS_mprotect,
            &[(2, MaskedEq(libc::PROT_EXEC as u64), 0)],
        )
        .allow(libc::SYS_munmap)
        .allow(libc::SYS_mremap)
        .allow_arg_in(libc::SYS_madvise, 2, &[libc::MADV_DONTNEED as u64])
        .allow_arg_in(libc::SYS_futex, 1, &FUTEX_OPS.map(|op| op as u64))
        .allow(libc::SYS_write)
        .allow(libc::SYS_close)
        // Debug builds check an fd is open before closing it.
        .allow_arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])
        .allow(libc::SYS_epoll_ctl)
        // The vDSO answers these; the call is its fallback.
        .allow(libc::SYS_clock_gettime)
        // Signals: masks (glibc around thread exit and `pthread_kill`), the
        // kick handler's return, the alternate stack std frees at exit,
        // and dying by SIGSYS (the report) or SIGABRT (an abort).
        .allow(libc::SYS_rt_sigprocmask)
        .allow(libc::SYS_rt_sigreturn)
        .allow(libc::SYS_sigaltstack)
        .allow(libc::SYS_getpid)
        .allow(libc::SYS_gettid);
    let mut signals = vec![libc::SIGSYS as u64, libc::SIGABRT as u64];

    match kind {
        ThreadKind::Vcpu => {
            let mut ioctls = vec![KVM_RUN(), KVM_GET_REGS()];
            ioctls.extend(tap_ioctls());
            if profile.can_freeze {
                ioctls.extend(vcpu_save_ioctls());
            }
            ioctls.sort_unstable();
            ioctls.dedup();
            l.allow_arg_in(libc::SYS_ioctl, 1, &ioctls)
                // A vCPU thread ends with `exit`; only main ends the process.
                .allow(libc::SYS_exit);
        }
        ThreadKind::Main => {
            let mut ioctls = vec![libc::FIONBIO];
            ioctls.extend(tap_ioctls());
            if profile.can_freeze {
                ioctls.extend([KVM_GET_IRQCHIP(), KVM_GET_PIT2(), KVM_GET_CLOCK()]);
            }
            l.allow_arg_in(libc::SYS_ioctl, 1, &ioctls)
                // Device fds: eventfds, timerfds, the tap; the signalfd
                // that asks for the wake-up counts.
                .allow(libc::SYS_read)
                // KVM's statistics fds (vstate::wakeups).
                .allow(libc::SYS_pread64)
                .allow(libc::SYS_readv)
                .allow(libc::SYS_writev)
                .allow(libc::SYS_epoll_wait)
                .allow(libc::SYS_timerfd_settime)
                .allow(libc::SYS_getrandom)
                // Unix sockets: vsock host connections and the control
                // socket (listeners are bound before the filter).
                .allow(libc::SYS_accept4)
                .allow(libc::SYS_recvfrom)
                .allow(libc::SYS_sendto)
                .allow(libc::SYS_shutdown)
                .allow(libc::SYS_poll)
                .allow_if(
                    libc::SYS_setsockopt,
                    &[
                        (1, Eq, libc::SOL_SOCKET as u64),
                        (2, Eq, libc::SO_RCVTIMEO as u64),
                    ],
                )
                .allow_arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64])
                // The vsock and control sockets are removed at the end.
                .allow(libc::SYS_unlink)
                .allow(libc::SYS_exit_group);
            signals.push(crate::vstate::control::kick_signal() as u64);
            if profile.can_freeze {
                // Writing the snapshot (snapshotter::write_manifest) and
                // making the master's memory read-only.
                l.allow(libc::SYS_openat)
                    .allow(libc::SYS_statx)
                    .allow(libc::SYS_fsync)
                    .allow(libc::SYS_rename)
                    .allow(libc::SYS_chmod);
            }
        }
    }
    l.allow_arg_in(libc::SYS_tgkill, 2, &signals);
    l.build()
}

/// Test-only: makes a chosen thread kind call a forbidden system call
/// right after its filter is installed, so that tests can watch a VMM die
/// of a violation. Compiled into debug builds only; release binaries do
/// not contain it.
#[cfg(debug_assertions)]
pub mod test_hook {
    use super::ThreadKind;

    /// The environment variable that asks for a violation: `main` or
    /// `vcpu` (vCPU 0).
    pub const ENV: &str = "ZYGOTE_VMM_TEST_SECCOMP_VIOLATION";

    /// The thread kind the environment asks to violate its filter, if any.
    pub fn requested() -> Option<ThreadKind> {
        match std::env::var(ENV).ok()?.as_str() {
            "main" => Some(ThreadKind::Main),
            "vcpu" => Some(ThreadKind::Vcpu),
            _ => None,
        }
    }

    /// Opens an IPv4 socket, which no thread of a VMM may: with the
    /// filter installed the process dies here by SIGSYS. Without one the
    /// socket is closed again and nothing happens.
    pub fn violate() {
        // SAFETY: socket(2) with constant arguments; the fd it may return
        // is ours and closed right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by socket(2) and nobody else holds it.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests;
