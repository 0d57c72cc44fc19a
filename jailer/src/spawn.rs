//! What to spawn ([`Spawn`], [`Jail`], [`Bind`], ...) and the parent's side
//! of [`spawn`]: check the request, build every string, array and
//! descriptor the child needs (the child may not allocate), create the
//! bind mount points, `clone3`, and read the child's report.
//!
//! One code path for every process: a [`Spawn`] without a [`Jail`] (the
//! `--no-jail` debugging mode) goes through the same clone, descriptor
//! mapping and report, and only skips the confinement.
//!
//! This module must not run code in the child (that is `child.rs`) or know
//! what the program is.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::cgroup::Placement;
use crate::child::{self, JailPlan, Plan};
use crate::error::{JailError, Step};
use crate::process::{self, Jailed};
use crate::sys;

/// A process to start: the program, its arguments and environment, the
/// descriptors it inherits, and optionally a cgroup and a [`Jail`].
#[derive(Debug)]
pub struct Spawn {
    /// The program, a path on the host. It is opened before the clone and
    /// executed through that descriptor, so it need not be inside the jail
    /// root (its interpreter and libraries must be: [`crate::elf_runtime_files`]).
    pub program: PathBuf,
    /// `argv[0]`; the program path if `None`.
    pub arg0: Option<OsString>,
    /// `argv[1..]`.
    pub args: Vec<OsString>,
    /// The whole environment: nothing of the caller's is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// Descriptor 0.
    pub stdin: Stdio,
    /// Descriptor 1.
    pub stdout: Stdio,
    /// Descriptor 2.
    pub stderr: Stdio,
    /// Other descriptors it inherits, each at the given number (above 2).
    /// Every descriptor not named here or in stdio is closed at exec.
    pub fds: Vec<(OwnedFd, RawFd)>,
    /// Start a session of its own (`setsid`), so that it outlives the
    /// caller's terminal and process group.
    pub detach: bool,
    /// `SIGKILL` it when the caller dies (`PR_SET_PDEATHSIG`). The kernel
    /// sends it when the *thread* that called [`spawn`] exits, not the
    /// process: a multi-threaded caller must spawn from a thread that lives
    /// as long as the process (not a pool thread that may be retired), or
    /// leave this off and supervise through the pidfd.
    pub die_with_parent: bool,
    /// The cgroup it starts in ([`crate::cgroup::VmCgroup::placement`]).
    pub cgroup: Option<Placement>,
    /// The confinement; `None` runs the program unconfined (debugging only).
    pub jail: Option<Jail>,
}

/// Where one of the standard descriptors comes from.
#[derive(Debug, Default)]
pub enum Stdio {
    /// `/dev/null` (opened by the parent: the jail has no `/dev`).
    #[default]
    Null,
    /// The caller's own descriptor of the same number (`/dev/null` if the
    /// caller has it closed).
    Inherit,
    /// This descriptor.
    Fd(OwnedFd),
}

/// The confinement of a spawned process. Set up in the child, in this
/// order, before the program runs: new PID, IPC, UTS and cgroup namespaces
/// (and network, see [`NetNs`]); a mount namespace holding only [`Jail::root`]
/// and the binds, with the root as `/`; the hostname; rlimits; no
/// supplementary groups, `uid`/`gid`; no capabilities (bounding, ambient,
/// permitted, effective, inheritable); `no_new_privs`.
///
/// Jails may share one root: each has its own mount namespace, so their
/// binds never meet. A root made once with every mount point in it (and
/// each VM's own writable directory as a bind) saves the per-spawn cost of
/// creating mount points, the largest part of a jail's cost (see
/// `examples/spawn_bench.rs`).
#[derive(Debug)]
pub struct Jail {
    /// The directory that becomes `/`: absolute, existing. The process sees
    /// only what is in it and the binds. The jail's uid needs search (`x`)
    /// permission on it and write permission where the program creates
    /// files (sockets, logs). Missing mount points are created in it.
    pub root: PathBuf,
    /// Mount the root read-only (binds keep their own flags): for a root
    /// shared by jails, whose writable parts are binds.
    pub readonly_root: bool,
    /// Host files and directories mounted inside the root.
    pub binds: Vec<Bind>,
    /// Unprivileged uid (not 0, not `u32::MAX`).
    pub uid: u32,
    /// Unprivileged gid (not 0, not `u32::MAX`).
    pub gid: u32,
    /// Its network namespace.
    pub netns: NetNs,
    /// Hostname inside its UTS namespace.
    pub hostname: String,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// Mount a `proc` of its own PID namespace at `/proc` (it shows only the
    /// process itself; `/proc/meminfo` and the like still describe the host).
    pub proc: bool,
}

impl Jail {
    /// A jail rooted at `root` (writable) running as `uid`:`gid`, in a new
    /// empty network namespace, hostname `zygote`, default [`Rlimits`], no
    /// binds, no `/proc`.
    pub fn new(root: impl Into<PathBuf>, uid: u32, gid: u32) -> Jail {
        Jail {
            root: root.into(),
            readonly_root: false,
            binds: Vec::new(),
            uid,
            gid,
            netns: NetNs::New,
            hostname: "zygote".to_string(),
            rlimits: Rlimits::default(),
            proc: false,
        }
    }

    /// Adds a bind.
    pub fn bind(mut self, bind: Bind) -> Jail {
        self.binds.push(bind);
        self
    }
}

/// A host path mounted inside the jail root (always `nosuid,nodev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host path (file or directory; a symlink is followed).
    pub source: PathBuf,
    /// Where it appears inside the jail: an absolute path, as the jailed
    /// process sees it. Its mount point (an empty file or directory) is
    /// created in the root by [`spawn`] if missing.
    pub target: PathBuf,
    /// Mounted read-only.
    pub readonly: bool,
}

impl Bind {
    /// `source` read-only at `target`.
    pub fn readonly(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Bind {
        Bind {
            source: source.into(),
            target: target.into(),
            readonly: true,
        }
    }

    /// `source` read-write at `target`.
    pub fn writable(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Bind {
        Bind {
            source: source.into(),
            target: target.into(),
            readonly: false,
        }
    }

    /// `path` read-only at the same path inside the jail (for the program's
    /// interpreter and libraries).
    pub fn same_path(path: impl Into<PathBuf>) -> Bind {
        let path = path.into();
        Bind::readonly(path.clone(), path)
    }
}

/// The network namespace of a jailed process.
#[derive(Debug, Default)]
pub enum NetNs {
    /// A new, empty one (only a loopback device, down).
    #[default]
    New,
    /// This one (an open `/proc/PID/ns/net` or `/run/netns/NAME`), entered
    /// with `setns` before the jail drops its capabilities.
    Join(OwnedFd),
    /// The caller's own (debugging only).
    Host,
}

/// Resource limits of a jailed process (soft = hard). `None` keeps the
/// caller's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`: open descriptors.
    pub nofile: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file it may write, in bytes (beyond it the
    /// write fails and `SIGXFSZ` kills it). A VMM that writes guest memory
    /// to a file needs at least the guest's RAM.
    pub fsize: Option<u64>,
    /// `RLIMIT_CORE`: core dump size; 0 so that guest memory never lands in
    /// a core file.
    pub core: Option<u64>,
}

impl Default for Rlimits {
    /// 4096 open files, no file size limit, no core dumps.
    fn default() -> Self {
        Rlimits {
            nofile: Some(4096),
            fsize: None,
            core: Some(0),
        }
    }
}

impl Spawn {
    /// `program` with no arguments, an empty environment, stdio on
    /// `/dev/null`, no other descriptors, not detached, dying with the
    /// caller, no cgroup, no jail.
    pub fn new(program: impl Into<PathBuf>) -> Spawn {
        Spawn {
            program: program.into(),
            arg0: None,
            args: Vec::new(),
            env: Vec::new(),
            stdin: Stdio::Null,
            stdout: Stdio::Null,
            stderr: Stdio::Null,
            fds: Vec::new(),
            detach: false,
            die_with_parent: true,
            cgroup: None,
            jail: None,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Spawn {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Spawn {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Spawn {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Passes `fd` at number `target`.
    pub fn fd(mut self, fd: OwnedFd, target: RawFd) -> Spawn {
        self.fds.push((fd, target));
        self
    }

    /// Confines it.
    pub fn jail(mut self, jail: Jail) -> Spawn {
        self.jail = Some(jail);
        self
    }

    /// Starts it in this cgroup.
    pub fn cgroup(mut self, placement: Placement) -> Spawn {
        self.cgroup = Some(placement);
        self
    }
}

/// Starts `spec`'s program, confined by its jail if it has one, as a direct
/// child of the caller, and returns once it runs the program (or failed to).
///
/// The calling thread blocks until the child has called `execve` (about
/// the time of a fork and an exec): call it from a thread that may block.
/// On error no child is left: one that failed during its set-up has been
/// reaped. A child killed before it could exec (by a signal, or an OOM
/// kill in its cgroup) is returned like one that exec'd and died at once:
/// [`crate::wait`] tells how it ended.
pub fn spawn(spec: &Spawn) -> Result<Jailed, JailError> {
    spawn_with(spec, CloneStyle::NATIVE)
}

/// How the child is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloneStyle {
    /// `CLONE_VM | CLONE_VFORK` on a stack of its own: the caller's page
    /// tables are not copied and it takes no copy-on-write faults after.
    Vfork,
    /// Like `fork`: the child gets a copy of the caller's memory.
    Fork,
}

impl CloneStyle {
    /// `Vfork` where its trampoline exists (x86_64), else `Fork`.
    const NATIVE: CloneStyle = if cfg!(target_arch = "x86_64") {
        CloneStyle::Vfork
    } else {
        CloneStyle::Fork
    };
}

fn spawn_with(spec: &Spawn, style: CloneStyle) -> Result<Jailed, JailError> {
    let mut keep = Keep::default();
    let mut plan = prepare(spec, &mut keep)?;

    let mut pidfd: RawFd = -1;
    let mut args = sys::CloneArgs {
        flags: libc::CLONE_PIDFD as u64 | sys::CLONE_CLEAR_SIGHAND,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(jail) = &spec.jail {
        // No CLONE_NEWNS: the child enters a copy of the template instead
        // of a copy of the caller's mounts.
        args.flags |=
            (libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP)
                as u64;
        if matches!(jail.netns, NetNs::New) {
            args.flags |= libc::CLONE_NEWNET as u64;
        }
    }
    if let Some(fd) = spec.cgroup.as_ref().and_then(Placement::v2_dir) {
        args.flags |= sys::CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }

    // Every signal blocked across the clone, so that no handler of the
    // caller runs in the child before CLONE_CLEAR_SIGHAND's defaults and
    // the exec take over (the child unblocks just before execve).
    let old_mask = block_all_signals()?;
    let r = clone_child(style, &mut args, &mut plan);
    restore_signals(&old_mask);
    let pid = r.map_err(|source| JailError::Clone { source })?;
    // SAFETY: clone3 with CLONE_PIDFD stored a new descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop(keep.report_write.take());

    match read_report(keep.report_read.as_mut().expect("made in prepare")) {
        Ok(None) => Ok(Jailed {
            pid: pid as u32,
            pidfd,
        }),
        Ok(Some((step, errno))) => {
            // It _exits right after its report: reap it.
            let _ = process::wait(&pidfd, false);
            Err(step_error(spec, step, pid as u32, errno))
        }
        Err(source) => {
            let _ = process::kill(&pidfd, libc::SIGKILL);
            let _ = process::wait(&pidfd, false);
            Err(JailError::Report { source })
        }
    }
}

/// Makes the child, which runs `plan`; returns its pid in the parent only.
fn clone_child(
    style: CloneStyle,
    args: &mut sys::CloneArgs,
    plan: &mut Plan,
) -> io::Result<libc::pid_t> {
    #[cfg(target_arch = "x86_64")]
    if style == CloneStyle::Vfork {
        let stack = ChildStack::new()?;
        args.flags |= (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
        args.stack = stack.base as u64;
        args.stack_size = stack.len as u64;
        // SAFETY: the stack is ours and unused until clone3 returns (the
        // parent is suspended until the child has exec'd or exited);
        // `child::entry` only makes raw system calls on the plan and never
        // returns; the plan outlives the child's use of it.
        return unsafe { sys::clone3_vfork(args, child::entry, (plan as *mut Plan).cast()) };
    }
    let _ = style;
    // SAFETY: the child runs only `child::run`, which makes raw system
    // calls on its copy of the plan and ends in execve or _exit; it never
    // returns here.
    match unsafe { sys::clone3(args) }? {
        // SAFETY: we are the child of clone3, with our copy of the plan.
        0 => unsafe { child::run(plan) },
        pid => Ok(pid),
    }
}

/// The child's stack for a `Vfork` clone: 256 KiB with a guard page below.
#[cfg(target_arch = "x86_64")]
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl ChildStack {
    const LEN: usize = 256 << 10;
    const GUARD: usize = 4096;

    fn new() -> io::Result<ChildStack> {
        // SAFETY: a fresh anonymous private mapping, ours alone.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack {
            base,
            len: Self::LEN,
        };
        // SAFETY: the lowest page of our own mapping.
        if unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our mapping; the child no longer uses it (it exec'd or
        // exited before clone3 returned to the parent).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// What the plan points into, kept alive (and closed) by the parent.
#[derive(Default)]
struct Keep {
    strings: Vec<CString>,
    program: Option<OwnedFd>,
    null: Option<OwnedFd>,
    report_read: Option<fs::File>,
    report_write: Option<OwnedFd>,
}

fn prepare(spec: &Spawn, keep: &mut Keep) -> Result<Plan, JailError> {
    // Descriptor targets: distinct, above stdio.
    let mut targets: Vec<RawFd> = spec.fds.iter().map(|(_, t)| *t).collect();
    targets.sort_unstable();
    for (i, &t) in targets.iter().enumerate() {
        let why = if t < 0 {
            Some("negative")
        } else if t <= 2 {
            Some("stdio")
        } else if i > 0 && targets[i - 1] == t {
            Some("used twice")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(JailError::FdTarget { target: t, why });
        }
    }

    let jail = match &spec.jail {
        Some(j) => Some(prepare_jail(j)?),
        None => None,
    };

    let program = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&spec.program)
        .map_err(|source| JailError::Program {
            path: spec.program.clone(),
            source,
        })?;

    let mut argv = Vec::with_capacity(spec.args.len() + 2);
    let arg0 = spec.arg0.as_deref().unwrap_or(spec.program.as_os_str());
    argv.push(cstring(arg0, || "argument 0".to_string())?);
    for (i, a) in spec.args.iter().enumerate() {
        argv.push(cstring(a, || format!("argument {}", i + 1))?);
    }
    let mut envp = Vec::with_capacity(spec.env.len() + 1);
    for (k, v) in &spec.env {
        if k.as_bytes().contains(&b'=') || k.is_empty() {
            return Err(JailError::EnvName {
                name: k.to_string_lossy().into_owned(),
            });
        }
        let mut kv = k.clone();
        kv.push("=");
        kv.push(v);
        envp.push(cstring(&kv, || format!("environment variable {k:?}"))?);
    }
    let argv_ptrs = null_terminated(&argv);
    let envp_ptrs = null_terminated(&envp);
    keep.strings.extend(argv);
    keep.strings.extend(envp);

    let mut maps: Vec<(RawFd, RawFd)> = Vec::with_capacity(spec.fds.len() + 3);
    for (target, stdio) in [&spec.stdin, &spec.stdout, &spec.stderr]
        .into_iter()
        .enumerate()
    {
        let target = target as RawFd;
        let source = match stdio {
            Stdio::Fd(fd) => fd.as_raw_fd(),
            // SAFETY: F_GETFD on a number we do not own only asks whether
            // it is open.
            Stdio::Inherit if unsafe { libc::fcntl(target, libc::F_GETFD) } >= 0 => target,
            Stdio::Inherit | Stdio::Null => dev_null(keep)?,
        };
        maps.push((source, target));
    }
    maps.extend(spec.fds.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)));
    maps.sort_unstable_by_key(|&(_, t)| t);
    let floor = maps.last().map_or(3, |&(_, t)| t + 1);

    let (read, write) = pipe()?;
    let plan = Plan {
        report_read: read.as_raw_fd(),
        report_write: write.as_raw_fd(),
        setsid: spec.detach,
        cgroup_procs: spec
            .cgroup
            .as_ref()
            .map(|p| p.v1_procs().collect())
            .unwrap_or_default(),
        netns: match &spec.jail {
            Some(Jail {
                netns: NetNs::Join(fd),
                ..
            }) => Some(fd.as_raw_fd()),
            _ => None,
        },
        floor,
        scratch: vec![-1; maps.len()],
        maps,
        exec_fd: program.as_raw_fd(),
        argv: argv_ptrs,
        envp: envp_ptrs,
        jail,
        die_with_parent: spec.die_with_parent,
    };
    keep.program = Some(program.into());
    keep.report_read = Some(fs::File::from(read));
    keep.report_write = Some(write);
    Ok(plan)
}

fn prepare_jail(jail: &Jail) -> Result<JailPlan, JailError> {
    if [jail.uid, jail.gid]
        .iter()
        .any(|&id| id == 0 || id == u32::MAX)
    {
        return Err(JailError::PrivilegedId {
            uid: jail.uid,
            gid: jail.gid,
        });
    }
    let root_err = |source| JailError::Root {
        path: jail.root.clone(),
        source,
    };
    if !jail.root.is_absolute() {
        return Err(root_err(None));
    }
    let root_dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(&jail.root)
        .map_err(|e| root_err(Some(e)))?;

    let root_path = path_cstring(&jail.root)?;
    let mut attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    if jail.readonly_root {
        attrs |= sys::MOUNT_ATTR_RDONLY;
    }
    let root = sys::open_tree_clone(&root_path, attrs).map_err(|e| root_err(Some(e)))?;

    let mut binds = Vec::with_capacity(jail.binds.len());
    for bind in &jail.binds {
        let relative = inside_root(&bind.target)?;
        let source_err = |source| JailError::BindSource {
            path: bind.source.clone(),
            source,
        };
        let meta = fs::metadata(&bind.source).map_err(source_err)?;
        make_mount_point(&root_dir, relative, meta.is_dir()).map_err(|source| {
            JailError::MountPoint {
                root: jail.root.clone(),
                target: bind.target.clone(),
                source_path: bind.source.clone(),
                source,
            }
        })?;
        let mut attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
        if bind.readonly {
            attrs |= sys::MOUNT_ATTR_RDONLY;
        }
        let tree = sys::open_tree_clone(&path_cstring(&bind.source)?, attrs).map_err(source_err)?;
        binds.push((tree, attach_path(relative)?));
    }
    let proc_target = if jail.proc {
        let target = Path::new("proc");
        make_mount_point(&root_dir, target, true).map_err(|source| JailError::MountPoint {
            root: jail.root.clone(),
            target: PathBuf::from("/proc"),
            source_path: PathBuf::from("proc"),
            source,
        })?;
        Some(attach_path(target)?)
    } else {
        None
    };

    let mut rlimits = Vec::with_capacity(3);
    let r = &jail.rlimits;
    for (resource, value) in [
        (libc::RLIMIT_NOFILE, r.nofile),
        (libc::RLIMIT_FSIZE, r.fsize),
        (libc::RLIMIT_CORE, r.core),
    ] {
        if let Some(v) = value {
            rlimits.push((resource as i32, v));
        }
    }

    Ok(JailPlan {
        mount_ns: template_mount_ns()?,
        root,
        binds,
        proc_target,
        hostname: jail.hostname.as_bytes().to_vec(),
        rlimits,
        uid: jail.uid,
        gid: jail.gid,
        last_cap: last_cap()?,
    })
}

/// Where `relative` (inside the jail root) is in the template namespace.
fn attach_path(relative: &Path) -> Result<CString, JailError> {
    let mut p = child::ATTACH.to_bytes().to_vec();
    p.push(b'/');
    p.extend_from_slice(relative.as_os_str().as_bytes());
    CString::new(p).map_err(|_| JailError::Nul {
        what: format!("path {}", relative.display()),
    })
}

/// The template mount namespace, made once per process: a single
/// read-only tmpfs holding the empty directory [`child::ATTACH`]. Each jail
/// enters a private copy of it, so no jail copies (or later unmounts) the
/// host's mounts.
fn template_mount_ns() -> Result<RawFd, JailError> {
    static NS: OnceLock<OwnedFd> = OnceLock::new();
    static MAKING: Mutex<()> = Mutex::new(());
    if let Some(ns) = NS.get() {
        return Ok(ns.as_raw_fd());
    }
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ns) = NS.get() {
        return Ok(ns.as_raw_fd());
    }
    // In a thread of its own: unshare and pivot_root change that thread
    // only, and it ends right after.
    let made = std::thread::scope(|s| s.spawn(make_template).join())
        .unwrap_or_else(|_| Err(io::Error::other("the thread making it panicked")));
    let ns = made.map_err(|source| JailError::Prepare {
        what: "make the template mount namespace",
        source,
    })?;
    Ok(NS.get_or_init(|| ns).as_raw_fd())
}

fn make_template() -> io::Result<OwnedFd> {
    let os = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: single system calls on C string literals; they change this
    // thread's mount namespace, root and cwd only (unshare gives it its
    // own fs_struct), and the thread ends when this returns.
    unsafe {
        os(libc::unshare(libc::CLONE_NEWNS))?;
        let ns = fs::File::open("/proc/thread-self/ns/mnt")?;
        os(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        // Over any directory of this private copy: /proc exists.
        os(libc::mount(
            c"tmpfs".as_ptr(),
            c"/proc".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0755,size=4k,nr_inodes=4".as_ptr().cast(),
        ))?;
        os(libc::mkdir(c"/proc/jail".as_ptr(), 0o755))?;
        os(libc::chdir(c"/proc".as_ptr()))?;
        os(sys::pivot_root(c".", c".") as libc::c_int)?;
        os(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        os(libc::chdir(c"/".as_ptr()))?;
        os(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        ))?;
        Ok(ns.into())
    }
}

/// `target` (absolute, no `..`, not `/`) as a path relative to the root.
fn inside_root(target: &Path) -> Result<&Path, JailError> {
    let bad = || JailError::BindTargetPath {
        target: target.to_path_buf(),
    };
    let relative = target.strip_prefix("/").map_err(|_| bad())?;
    if relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(bad());
    }
    Ok(relative)
}

/// Creates `relative` under `root` (parents as directories, the last one a
/// directory or an empty file), refusing symlinks on the way: the root may
/// be writable by a previous jailed process, which must not steer where
/// root creates files on the host.
fn make_mount_point(root: &fs::File, relative: &Path, dir: bool) -> io::Result<()> {
    let mut parts = relative.components().peekable();
    let mut at: Option<OwnedFd> = None;
    while let Some(Component::Normal(name)) = parts.next() {
        let base = at.as_ref().map_or(root.as_raw_fd(), |f| f.as_raw_fd());
        let name = CString::new(name.as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let last = parts.peek().is_none();
        if last && !dir {
            // SAFETY: `name` is a C string; the new fd is owned below.
            let fd = unsafe {
                libc::openat(
                    base,
                    name.as_ptr(),
                    libc::O_CREAT
                        | libc::O_RDONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC
                        | libc::O_NONBLOCK,
                    0o644,
                )
            };
            if fd < 0 {
                // EISDIR: a directory cannot take a file's mount. ENXIO (a
                // socket or FIFO without reader) is left for the mount.
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENXIO) {
                    return Err(e);
                }
            } else {
                // SAFETY: openat returned a new fd we own.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            return Ok(());
        }
        // SAFETY: `name` is a C string.
        let r = unsafe { libc::mkdirat(base, name.as_ptr(), 0o755) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        // SAFETY: as above; O_NOFOLLOW refuses a symlink in its place.
        let fd = unsafe {
            libc::openat(
                base,
                name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a new fd we own.
        at = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(())
}

fn cstring(s: &OsStr, what: impl FnOnce() -> String) -> Result<CString, JailError> {
    CString::new(s.as_bytes()).map_err(|_| JailError::Nul { what: what() })
}

fn path_cstring(p: &Path) -> Result<CString, JailError> {
    cstring(p.as_os_str(), || format!("path {}", p.display()))
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn dev_null(keep: &mut Keep) -> Result<RawFd, JailError> {
    if keep.null.is_none() {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|source| JailError::Prepare {
                what: "open /dev/null for stdio",
                source,
            })?;
        keep.null = Some(f.into());
    }
    Ok(keep
        .null
        .as_ref()
        .map(|f| f.as_raw_fd())
        .expect("set above"))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(JailError::Prepare {
            what: "create the report pipe",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: pipe2 returned two new descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The highest capability number of the running kernel.
fn last_cap() -> Result<u32, JailError> {
    static LAST_CAP: OnceLock<u32> = OnceLock::new();
    if let Some(c) = LAST_CAP.get() {
        return Ok(*c);
    }
    let err = |source| JailError::Prepare {
        what: "read /proc/sys/kernel/cap_last_cap",
        source,
    };
    let s = fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(err)?;
    let c = s.trim().parse().map_err(|_| {
        err(io::Error::new(
            io::ErrorKind::InvalidData,
            s.trim().to_string(),
        ))
    })?;
    Ok(*LAST_CAP.get_or_init(|| c))
}

fn block_all_signals() -> Result<libc::sigset_t, JailError> {
    // SAFETY: sigset_t is plain data, filled by sigfillset; the old mask
    // is written into `old`.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let r = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        if r != 0 {
            return Err(JailError::Prepare {
                what: "block signals around the clone",
                source: io::Error::from_raw_os_error(r),
            });
        }
        Ok(old)
    }
}

fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: `old` is the mask pthread_sigmask returned.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// Reads the child's report: `None` at EOF (it executed the program),
/// else the failing step and errno.
fn read_report(pipe: &mut fs::File) -> io::Result<Option<(Step, i32)>> {
    let mut buf = [0u8; 12];
    let mut got = 0;
    while got < buf.len() {
        match pipe.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    match got {
        0 => Ok(None),
        12 => {
            let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
            let step = Step::decode(word(0), word(4)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown step code {}", word(0)),
                )
            })?;
            Ok(Some((step, word(8) as i32)))
        }
        n => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("a report of {n} bytes instead of 12"),
        )),
    }
}

fn step_error(spec: &Spawn, step: Step, pid: u32, errno: i32) -> JailError {
    let source = io::Error::from_raw_os_error(errno);
    match step {
        Step::Exec => JailError::Exec {
            program: spec.program.clone(),
            source,
        },
        Step::Bind(i) => match spec.jail.as_ref().and_then(|j| j.binds.get(i)) {
            Some(b) => JailError::Bind {
                source_path: b.source.clone(),
                target: b.target.clone(),
                source,
            },
            None => JailError::Step { step, pid, source },
        },
        step => JailError::Step { step, pid, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_targets_must_stay_inside_the_root() {
        assert_eq!(
            inside_root(Path::new("/lib/libc.so.6")).unwrap(),
            Path::new("lib/libc.so.6")
        );
        for bad in ["lib/libc.so.6", "/", "/lib/../../etc/passwd", "/./x/.."] {
            assert!(
                matches!(
                    inside_root(Path::new(bad)),
                    Err(JailError::BindTargetPath { .. })
                ),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn fd_targets_must_be_distinct_and_above_stdio() {
        let devnull = || fs::File::open("/dev/null").unwrap().into();
        for (targets, bad) in [(vec![1], 1), (vec![5, 5], 5), (vec![-1], -1)] {
            let mut s = Spawn::new("/bin/true");
            for t in targets {
                s = s.fd(devnull(), t);
            }
            match spawn(&s) {
                Err(JailError::FdTarget { target, .. }) => assert_eq!(target, bad),
                other => panic!("expected FdTarget {bad}, got {other:?}"),
            }
        }
    }

    #[test]
    fn mount_points_are_made_without_following_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let dir = fs::File::open(root.path()).unwrap();
        make_mount_point(&dir, Path::new("a/b/file"), false).unwrap();
        make_mount_point(&dir, Path::new("a/c"), true).unwrap();
        assert!(root.path().join("a/b/file").is_file());
        assert!(root.path().join("a/c").is_dir());
        // Again: already there is fine.
        make_mount_point(&dir, Path::new("a/b/file"), false).unwrap();
        // A file's mount point cannot be a directory, nor the reverse.
        let e = make_mount_point(&dir, Path::new("a/c"), false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{e}");
        let e = make_mount_point(&dir, Path::new("a/b/file"), true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{e}");

        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).unwrap();
        let e = make_mount_point(&dir, Path::new("evil/file"), false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{e}");
        std::os::unix::fs::symlink(outside.path().join("f"), root.path().join("evil-file"))
            .unwrap();
        let e = make_mount_point(&dir, Path::new("evil-file"), false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(
            fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing created outside"
        );
    }

    #[test]
    fn a_failing_bind_step_names_that_bind() {
        let s = Spawn::new("/bin/true").jail(
            Jail::new("/srv/vm", 1000, 1000)
                .bind(Bind::same_path("/lib/a.so"))
                .bind(Bind::readonly("/var/lib/zygote/master/mem", "/mem")),
        );
        match step_error(&s, Step::Bind(1), 9, libc::EINVAL) {
            JailError::Bind {
                source_path,
                target,
                source,
            } => {
                assert_eq!(source_path, Path::new("/var/lib/zygote/master/mem"));
                assert_eq!(target, Path::new("/mem"));
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
            }
            other => panic!("expected Bind, got {other:?}"),
        }
        assert!(matches!(
            step_error(&s, Step::Setuid, 9, libc::EPERM),
            JailError::Step {
                step: Step::Setuid,
                pid: 9,
                ..
            }
        ));
    }

    #[test]
    fn a_nul_in_an_argument_is_refused_before_any_process_exists() {
        let s = Spawn::new("/bin/true").arg(OsString::from("a\0b"));
        assert!(matches!(spawn(&s), Err(JailError::Nul { what }) if what == "argument 1"));
    }

    #[test]
    fn a_bad_environment_name_is_refused() {
        for name in ["", "A=B"] {
            let s = Spawn::new("/bin/true").env(name, "1");
            assert!(
                matches!(spawn(&s), Err(JailError::EnvName { name: n }) if n == name),
                "{name:?}"
            );
        }
    }

    #[test]
    fn the_environment_is_exactly_what_was_given() {
        let (mut r, w) = {
            let mut fds = [-1; 2];
            // SAFETY: room for two descriptors, owned below.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: two new descriptors we own.
            unsafe { (fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        let mut s = Spawn::new("/bin/busybox")
            .arg("env")
            .env("ZYGOTE_VM", "clone-1");
        s.stdout = Stdio::Fd(w);
        let j = spawn(&s).unwrap();
        drop(s);
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "ZYGOTE_VM=clone-1\n");
        assert_eq!(
            process::wait(&j.pidfd, false).unwrap(),
            Some(process::Exit::Code(0))
        );
    }

    #[test]
    fn a_privileged_jail_is_refused() {
        let s = Spawn::new("/bin/true").jail(Jail::new("/", 0, 1000));
        assert!(matches!(
            spawn(&s),
            Err(JailError::PrivilegedId { uid: 0, .. })
        ));
        // (uid_t)-1 would leave the ids unchanged, i.e. root.
        let s = Spawn::new("/bin/true").jail(Jail::new("/", 1000, u32::MAX));
        assert!(matches!(
            spawn(&s),
            Err(JailError::PrivilegedId { gid: u32::MAX, .. })
        ));
    }

    #[test]
    fn the_unjailed_path_runs_a_program_and_reports_its_exit() {
        let j = spawn(&Spawn::new("/bin/sh").args(["-c", "exit 7"])).expect("spawn /bin/sh");
        assert_eq!(
            process::wait(&j.pidfd, false).unwrap(),
            Some(process::Exit::Code(7))
        );
    }

    #[test]
    fn both_clone_styles_map_descriptors_and_report_a_failing_step() {
        for style in [CloneStyle::Vfork, CloneStyle::Fork] {
            let (mut r, w) = {
                let mut fds = [-1; 2];
                // SAFETY: room for two descriptors, owned below.
                assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                // SAFETY: two new descriptors we own.
                unsafe { (fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
            };
            let s = Spawn::new("/bin/sh")
                .args(["-c", "echo $0 >&7", "mapped"])
                .fd(w, 7);
            let j = spawn_with(&s, style).expect("spawn /bin/sh");
            drop(s);
            let mut out = String::new();
            r.read_to_string(&mut out).unwrap();
            assert_eq!(out, "mapped\n", "{style:?}");
            assert_eq!(
                process::wait(&j.pidfd, false).unwrap(),
                Some(process::Exit::Code(0))
            );

            // A step that fails in the child: exec of a file that is not
            // executable. The child is reaped.
            let dir = tempfile::tempdir().unwrap();
            let text = dir.path().join("text");
            fs::write(&text, "not a program").unwrap();
            match spawn_with(&Spawn::new(&text), style) {
                Err(JailError::Exec { program, source }) => {
                    assert_eq!(program, text);
                    assert_eq!(source.raw_os_error(), Some(libc::EACCES), "{style:?}");
                }
                other => panic!("{style:?}: expected Exec, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        match spawn(&Spawn::new("/nonexistent/program")) {
            Err(JailError::Program { path, source }) => {
                assert_eq!(path, Path::new("/nonexistent/program"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Program, got {other:?}"),
        }
    }
}
