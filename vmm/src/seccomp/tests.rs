//! Tests of the filters: they compile, and in a forked child that installs
//! one, an allowed call works and a forbidden one ends the child by SIGSYS
//! with the report line on its stderr.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use super::sigsys::{report_line, syscall_name};
use super::*;

const CLONE: Profile = Profile { can_freeze: false };
const MASTER: Profile = Profile { can_freeze: true };

/// How a forked child ended, and what it wrote to its stdout and stderr.
struct ChildEnd {
    status: libc::c_int,
    stdout: String,
    stderr: String,
}

impl ChildEnd {
    fn killed_by(&self) -> Option<libc::c_int> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }

    fn exit_code(&self) -> Option<libc::c_int> {
        libc::WIFEXITED(self.status).then(|| libc::WEXITSTATUS(self.status))
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    std::fs::File::from(fd).read_to_string(&mut s).unwrap();
    s
}

/// Writes `s` to fd 1 from the child (async-signal-safe).
fn say(s: &str) {
    // SAFETY: `s` is a valid buffer of `s.len()` bytes.
    unsafe { libc::write(1, s.as_ptr().cast(), s.len()) };
}

/// Forks; the child installs the SIGSYS handler and `filter` as `kind`,
/// then runs `body` and exits with its return value. In the child only
/// async-signal-safe calls are made (the test harness has other threads).
fn in_child(kind: ThreadKind, filter: &BpfProgram, body: impl FnOnce() -> i32) -> ChildEnd {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    use std::os::fd::AsRawFd;
    let (out_w_fd, err_w_fd) = (out_w.as_raw_fd(), err_w.as_raw_fd());
    // SAFETY: fork(2); the child below only makes async-signal-safe calls
    // and leaves through _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: dup2 onto the standard fds, in the child only.
        unsafe {
            libc::dup2(out_w_fd, 1);
            libc::dup2(err_w_fd, 2);
        }
        let code = if install_sigsys_handler().is_err() || install(kind, filter).is_err() {
            90
        } else {
            body()
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    drop((out_w, err_w));
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    ChildEnd {
        status,
        stdout: read_all(out_r),
        stderr: read_all(err_r),
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[test]
fn every_filter_compiles_to_bpf() {
    for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
        for profile in [CLONE, MASTER] {
            let bpf = compile(kind, profile)
                .unwrap_or_else(|e| panic!("{kind} {profile:?}: {}", crate::error_chain(&e)));
            // The arch check, the number load, and at least one jump and
            // return per allowed call.
            let calls = rules(kind, profile).unwrap().len();
            assert!(
                bpf.len() > 2 * calls,
                "{kind} {profile:?}: {} instructions",
                bpf.len()
            );
        }
    }
}

#[test]
fn a_master_may_do_more_than_a_clone() {
    for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
        let clone = rules(kind, CLONE).unwrap();
        let master = rules(kind, MASTER).unwrap();
        assert!(clone.keys().all(|nr| master.contains_key(nr)), "{kind}");
    }
    let main_clone = rules(ThreadKind::Main, CLONE).unwrap();
    let main_master = rules(ThreadKind::Main, MASTER).unwrap();
    assert!(!main_clone.contains_key(&libc::SYS_openat));
    assert!(main_master.contains_key(&libc::SYS_openat));
    // Only main ends the process; only a vCPU ends a thread.
    let vcpu = rules(ThreadKind::Vcpu, MASTER).unwrap();
    assert!(vcpu.contains_key(&libc::SYS_exit) && !vcpu.contains_key(&libc::SYS_exit_group));
    assert!(main_master.contains_key(&libc::SYS_exit_group));
    assert!(!main_master.contains_key(&libc::SYS_exit));
    // No thread may start threads or processes, open sockets, or execute.
    for kind in [ThreadKind::Main, ThreadKind::Vcpu] {
        let r = rules(kind, MASTER).unwrap();
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_rt_sigaction,
            libc::SYS_ptrace,
        ] {
            assert!(!r.contains_key(&nr), "{kind} allows {nr}");
        }
    }
}

#[test]
fn ioctl_numbers_are_the_kernels() {
    // From the kernel's uapi headers (linux/kvm.h, linux/if_tun.h).
    assert_eq!(KVM_RUN(), 0xae80);
    assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
    assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
    assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
    assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
    assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
    assert_eq!(tap_ioctls(), [0x4004_54d0, 0x4004_54d8]);
}

#[test]
fn a_vcpu_thread_may_run_kvm_but_dies_by_sigsys_on_a_forbidden_call() {
    let filter = compile(ThreadKind::Vcpu, CLONE).unwrap();
    let end = in_child(ThreadKind::Vcpu, &filter, || {
        // Allowed: KVM_RUN reaches the kernel, which finds no such fd.
        // SAFETY: ioctl on an invalid fd with no argument pointer.
        let r = unsafe { libc::ioctl(-1, KVM_RUN() as _, 0) };
        if r == -1 && errno() == libc::EBADF {
            say("kvm_run reached the kernel\n");
        }
        // Forbidden: the child ends here.
        // SAFETY: socket(2) with constant arguments.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        say("socket returned\n");
        0
    });
    assert_eq!(end.killed_by(), Some(libc::SIGSYS), "{}", end.stderr);
    assert_eq!(end.stdout, "kvm_run reached the kernel\n");
    assert!(
        end.stderr.starts_with(
            "zygote-vmm: seccomp: forbidden system call: socket (41) on the vcpu thread (args 0x2 0x1 "
        ),
        "{:?}",
        end.stderr
    );
}

#[test]
fn a_vcpu_thread_may_not_make_other_kvm_ioctls() {
    const KVM_CREATE_VCPU: u64 = 0xae41;
    let filter = compile(ThreadKind::Vcpu, MASTER).unwrap();
    let end = in_child(ThreadKind::Vcpu, &filter, || {
        // SAFETY: ioctl on an invalid fd with an integer argument.
        unsafe { libc::ioctl(-1, KVM_CREATE_VCPU as _, 1) };
        0
    });
    assert_eq!(end.killed_by(), Some(libc::SIGSYS));
    assert!(
        end.stderr
            .contains("ioctl (16) on the vcpu thread (args 0x"),
        "{:?}",
        end.stderr
    );
    assert!(end.stderr.contains(" 0xae41 0x1 "), "{:?}", end.stderr);
}

#[test]
fn a_clones_main_thread_may_not_open_files_a_masters_may() {
    let opener = || {
        // SAFETY: openat with a valid NUL-terminated path; the fd is closed.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
        if fd >= 0 {
            // SAFETY: our own fd.
            unsafe { libc::close(fd) };
            say("opened\n");
        }
        0
    };
    let clone = compile(ThreadKind::Main, CLONE).unwrap();
    let end = in_child(ThreadKind::Main, &clone, opener);
    assert_eq!(end.killed_by(), Some(libc::SIGSYS));
    assert!(
        end.stderr.contains("openat (257) on the main thread"),
        "{:?}",
        end.stderr
    );
    assert_eq!(end.stdout, "");

    let master = compile(ThreadKind::Main, MASTER).unwrap();
    let end = in_child(ThreadKind::Main, &master, opener);
    assert_eq!(end.exit_code(), Some(0), "{}", end.stderr);
    assert_eq!(end.stdout, "opened\n");
}

#[test]
fn no_thread_may_map_executable_memory() {
    let filter = compile(ThreadKind::Main, MASTER).unwrap();
    let map = |prot| {
        move || {
            // SAFETY: a fresh anonymous mapping, unmapped right away.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                // SAFETY: `p` is the 4096-byte mapping made above.
                unsafe { libc::munmap(p, 4096) };
                say("mapped\n");
            }
            0
        }
    };
    let end = in_child(
        ThreadKind::Main,
        &filter,
        map(libc::PROT_READ | libc::PROT_WRITE),
    );
    assert_eq!(
        (end.exit_code(), end.stdout.as_str()),
        (Some(0), "mapped\n")
    );
    let end = in_child(
        ThreadKind::Main,
        &filter,
        map(libc::PROT_READ | libc::PROT_EXEC),
    );
    assert_eq!(end.killed_by(), Some(libc::SIGSYS));
    assert!(
        end.stderr.contains("mmap (9) on the main thread"),
        "{:?}",
        end.stderr
    );
}

#[test]
fn the_report_names_the_call_its_thread_and_arguments() {
    let l = report_line(Some(ThreadKind::Vcpu), 41, [2, 0x80001, 0, u64::MAX]);
    assert_eq!(
        std::str::from_utf8(l.as_bytes()).unwrap(),
        "zygote-vmm: seccomp: forbidden system call: socket (41) on the vcpu thread \
         (args 0x2 0x80001 0x0 0xffffffffffffffff)\n"
    );
    let l = report_line(None, 9999, [0; 4]);
    assert_eq!(
        std::str::from_utf8(l.as_bytes()).unwrap(),
        "zygote-vmm: seccomp: forbidden system call: 9999 on a thread without a filter of \
         its own (args 0x0 0x0 0x0 0x0)\n"
    );
    assert_eq!(syscall_name(0), Some("read"));
    assert_eq!(syscall_name(435), Some("clone3"));
    assert_eq!(syscall_name(-1), None);
    // The table is sorted (the handler searches it by halves).
    assert!(names::SYSCALL_NAMES.windows(2).all(|w| w[0].0 < w[1].0));
}

#[test]
fn a_conflicting_list_is_refused() {
    let mut l = List::new(ThreadKind::Main);
    l.allow(libc::SYS_ioctl)
        .allow_arg_in(libc::SYS_ioctl, 1, &[1]);
    assert!(matches!(
        l.build(),
        Err(SeccompError::Conflict { syscall, .. }) if syscall == libc::SYS_ioctl
    ));
}
