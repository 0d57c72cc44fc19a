//! How this host confines each VMM it starts: the jail ([`jailer::Jail`]:
//! namespaces, a root of the VM's own, an unprivileged uid, no
//! capabilities, `no_new_privs`, rlimits), its cgroup, and the descriptors
//! it inherits (`/dev/kvm`, its tap). [`VmmProcess::spawn`](crate::vmm::VmmProcess::spawn)
//! asks [`prepare`] for a [`Confined`] plan and spawns through
//! `jailer::spawn`, jailed or not: one code path.
//!
//! A VM's runtime directory gets a `root/` that becomes the VMM's `/`:
//!
//! ```text
//! root/vsock.sock, root/control.sock, root/console.log   made by the VMM (its uid owns root/)
//! root/snapshot/        a clone's master snapshot (read-only bind), or a master's own (writable)
//! root/kernel, root/initrd                               a booted VM's (read-only binds)
//! root/lib…, root/usr/lib…                               the VMM's ELF interpreter and libraries (read-only)
//! vsock.sock -> root/vsock.sock, control.sock, console.log   symlinks: host paths stay the same
//! ```
//!
//! Each jailed VM gets a uid (= gid) of its own from a range, leased with a
//! file per uid (`/run/zygote-jail/uids/N`, one place per machine, made with
//! `O_EXCL`, so processes racing for one never both get it); a lease whose
//! VMM is gone is taken back by [`sweep`], as are cgroups without a live
//! process (what a `kill -9` of the caller leaves).
//!
//! `--no-jail` ([`Settings::jail`] false) keeps the same path with no
//! confinement: for debugging only.
//!
//! It must not: run guest code or link KVM code (the VMM does), or keep a
//! VM's resources after [`Confined::release`].

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use jailer::cgroup::{Cgroups, Limits, VmCgroup};
use jailer::{Bind, Jail, NetNs};

use crate::paths;

/// Descriptor number of `/dev/kvm` in a VMM (`--kvm-fd`).
pub const KVM_FD: i32 = 3;
/// Descriptor number of the tap in a VMM (`--tap-fd`).
pub const TAP_FD: i32 = 4;
/// The directory inside a runtime directory that becomes the VMM's root.
pub const ROOT_DIR: &str = "root";

/// How VMMs are confined on this host (one setting per process: the CLI
/// and the daemon set it from their flags before they start a VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Jail every VMM; false is `--no-jail` (debugging only).
    pub jail: bool,
    /// First uid (and gid) of the range VMMs run as.
    pub uid_base: u32,
    /// How many uids the range has (at most that many jailed VMs at once).
    pub uid_count: u32,
    /// The cgroup under this process's own that holds the VMs' cgroups.
    pub cgroup_parent: String,
    /// Memory a VMM may use beyond its guest's RAM (page tables, device
    /// buffers, the VMM's own heap and stacks), in MiB.
    pub vmm_allowance_mib: u64,
    /// Most tasks (threads) a VMM may have.
    pub pids_max: u64,
}

impl Default for Settings {
    /// Jailed (unless `ZYGOTE_NO_JAIL=1`), uids 900000-965535, cgroups under
    /// `zygote`, 64 MiB and 64 tasks beyond the guest.
    fn default() -> Self {
        Settings {
            jail: std::env::var_os("ZYGOTE_NO_JAIL").is_none_or(|v| v.is_empty() || v == "0"),
            uid_base: 900_000,
            uid_count: 65_536,
            cgroup_parent: default_cgroup_parent(),
            vmm_allowance_mib: 64,
            pids_max: 64,
        }
    }
}

/// `zygote` for the default state directory; `zygote-HASH` for another
/// (several daemons on one machine, tests): each sweeps only its own.
fn default_cgroup_parent() -> String {
    let root = paths::runtime_root();
    if std::env::var_os("ZYGOTE_RUNTIME_DIR").is_none() {
        return "zygote".into();
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in root.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("zygote-{h:08x}")
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets this process's confinement before its first VM; later calls (and
/// calls after a VM started) keep the first setting and return false.
pub fn configure(settings: Settings) -> bool {
    SETTINGS.set(settings).is_ok()
}

/// This process's confinement settings.
pub fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

/// Errors confining a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user use it?)")]
    Kvm(#[source] io::Error),
    /// The VMM's shared libraries could not be found.
    #[error("cannot list the VMM's libraries to put in its jail")]
    Elf(#[source] jailer::ElfError),
    /// This host's cgroups could not be read.
    #[error("cannot find this process's cgroups: {0}")]
    NoCgroups(String),
    /// The VM's cgroup could not be made.
    #[error("cannot make the VM's cgroup")]
    Cgroup(#[source] jailer::cgroup::CgroupError),
    /// Every uid of the range is leased.
    #[error("all {0} uids for jailed VMMs are in use (see the uid range of the daemon or CLI)")]
    NoUid(u32),
    /// A file of the jail could not be made.
    #[error("cannot prepare the jail at {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ConfineError + '_ {
    move |source| ConfineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What every VMM of this process shares: opened once.
#[derive(Debug)]
struct Shared {
    kvm: OwnedFd,
    /// The VMM binary's interpreter and libraries.
    libs: Vec<PathBuf>,
    cgroups: Result<Cgroups, String>,
}

fn shared(vmm: &Path) -> Result<&'static Shared, ConfineError> {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    if let Some(s) = SHARED.get() {
        return Ok(s);
    }
    let kvm: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(ConfineError::Kvm)?
        .into();
    let libs = jailer::elf_runtime_files(vmm).map_err(ConfineError::Elf)?;
    // Kept as text: found once, needed only by jailed VMs.
    let cgroups = Cgroups::detect(&settings().cgroup_parent).map_err(|e| e.to_string());
    // A racing thread may have set it first; either value is as good.
    let _ = SHARED.set(Shared { kvm, libs, cgroups });
    Ok(SHARED.get().expect("set above"))
}

/// What a VM may use, as its request asked (each `None`: the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VmLimits {
    /// Memory of the VMM process in MiB (guest pages it touched, its own
    /// heap and buffers); default: guest RAM + [`Settings::vmm_allowance_mib`].
    /// Lower overcommits: a VM that exceeds it is killed alone.
    pub memory_max_mib: Option<u64>,
    /// CPU time, in cores (`cpu.max`; 0.5 = half a core).
    pub cpus: Option<f64>,
    /// CPU weight against other VMs (`cpu.weight`, 1-10000; 100 by default).
    pub cpu_weight: Option<u16>,
}

impl VmLimits {
    /// Checks the values before anything is made.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.memory_max_mib {
            if !(16..=1 << 20).contains(&m) {
                return Err(format!("memory limit {m} MiB is not 16-1048576"));
            }
        }
        if let Some(c) = self.cpus {
            if !(0.01..=1024.0).contains(&c) {
                return Err(format!("cpus {c} is not 0.01-1024"));
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(format!("cpu weight {w} is not 1-10000"));
            }
        }
        Ok(())
    }
}

/// What a VM is, as far as its confinement goes.
#[derive(Debug, Clone)]
pub struct VmFiles {
    /// Files and directories the VMM reads: (host path, path in the jail).
    pub read: Vec<(PathBuf, PathBuf)>,
    /// A directory the VMM writes (a master's snapshot): (host, in the jail).
    pub write: Option<(PathBuf, PathBuf)>,
    /// Guest RAM, MiB (the memory limit is this plus the allowance).
    pub memory_mib: u64,
    /// What the request asked for.
    pub limits: VmLimits,
}

/// A VM's confinement, prepared: hand its parts to `jailer::spawn`, then
/// keep it until the VM has ended and [`Confined::release`] it.
#[derive(Debug)]
pub struct Confined {
    /// The jail (`None`: `--no-jail`).
    pub jail: Option<Jail>,
    /// `/dev/kvm`, to pass at [`KVM_FD`].
    pub kvm: OwnedFd,
    cgroup: Option<VmCgroup>,
    memory_max: Option<u64>,
    /// Whether the cgroup saw an OOM kill, read when it was removed.
    oom_at_release: bool,
    uid_lease: Option<PathBuf>,
}

impl Confined {
    /// Records the VMM that holds the uid lease, so that [`sweep`] can tell
    /// when it is gone.
    pub fn set_owner(&self, pid: u32, start_ticks: u64) {
        if let Some(l) = &self.uid_lease {
            let _ = fs::write(l, format!("{pid} {start_ticks}\n"));
        }
    }

    /// Where the VM starts (its cgroup), for `jailer::Spawn::cgroup`.
    pub fn placement(&self) -> Option<jailer::cgroup::Placement> {
        self.cgroup.as_ref().map(|c| c.placement())
    }

    /// Whether the VM's cgroup saw an out-of-memory kill.
    pub fn oom_killed(&self) -> bool {
        self.oom_at_release
            || self
                .cgroup
                .as_ref()
                .is_some_and(|c| c.oom_killed().unwrap_or(false))
    }

    /// The memory limit of the VM's cgroup, if it has one.
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_max
    }

    /// Gives back what the VM held (its cgroup, its uid). Call once the
    /// VMM has ended; harmless twice.
    pub fn release(&mut self) {
        if let Some(c) = self.cgroup.take() {
            self.oom_at_release |= c.oom_killed().unwrap_or(false);
            if let Err(e) = c.remove() {
                tracing::warn!(cgroup = c.name(), "cannot remove a VM's cgroup: {e}");
            }
        }
        if let Some(l) = self.uid_lease.take() {
            let _ = fs::remove_file(l);
        }
    }

    /// Keeps what the VM holds for a process that outlives this handle (a
    /// detached VM): [`sweep`] takes it back once the VMM is gone.
    pub fn keep(&mut self) {
        self.cgroup.take();
        self.uid_lease.take();
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        self.release();
    }
}

/// Prepares the confinement of the VM whose runtime directory is `dir`
/// (named like the VM), for the VMM binary `vmm`, jailed or not
/// (`--no-jail`). The VMM must then be launched with the jail paths of
/// [`VmFiles`] and the sockets at [`jail_path`].
pub fn prepare(
    dir: &Path,
    vmm: &Path,
    files: &VmFiles,
    netns: Option<OwnedFd>,
    jailed: bool,
) -> Result<Confined, ConfineError> {
    let sh = shared(vmm)?;
    let kvm = sh
        .kvm
        .as_fd()
        .try_clone_to_owned()
        .map_err(ConfineError::Kvm)?;
    if !jailed {
        return Ok(Confined {
            jail: None,
            kvm,
            cgroup: None,
            uid_lease: None,
            memory_max: None,
            oom_at_release: false,
        });
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("vm")
        .to_string();
    let (uid, uid_lease) = lease_uid(&name)?;
    let uid_file = dir.join(UID_FILE);
    fs::write(&uid_file, format!("{uid}\n")).map_err(io_err(&uid_file))?;
    let mut confined = Confined {
        jail: None,
        kvm,
        cgroup: None,
        uid_lease: Some(uid_lease),
        memory_max: None,
        oom_at_release: false,
    };
    let root = dir.join(ROOT_DIR);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .or_else(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(io_err(&root))?;
    std::os::unix::fs::chown(&root, Some(uid), Some(uid)).map_err(io_err(&root))?;
    for name in ["vsock.sock", "control.sock", "console.log"] {
        let link = dir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new(ROOT_DIR).join(name), &link).map_err(io_err(&link))?;
    }
    let mut jail = Jail::new(&root, uid, uid);
    jail.hostname = "zygote-vmm".into();
    jail.netns = match netns {
        Some(fd) => NetNs::Join(fd),
        None => NetNs::New,
    };
    for lib in &sh.libs {
        jail.binds.push(Bind::same_path(lib));
    }
    for (host, inside) in &files.read {
        make_readable(host)?;
        jail.binds.push(Bind::readonly(host, inside));
    }
    if let Some((host, inside)) = &files.write {
        std::os::unix::fs::chown(host, Some(uid), Some(uid)).map_err(io_err(host))?;
        jail.binds.push(Bind::writable(host, inside));
    }
    {
        let cgroups = sh
            .cgroups
            .as_ref()
            .map_err(|e| ConfineError::NoCgroups(e.clone()))?;
        let memory_max = files
            .limits
            .memory_max_mib
            .unwrap_or(files.memory_mib + settings().vmm_allowance_mib)
            << 20;
        let period_us = 100_000;
        let limits = Limits {
            memory_max: Some(memory_max),
            // No swap: a VM's memory is RAM or nothing, as its limit says.
            swap_max: Some(0),
            pids_max: Some(settings().pids_max),
            cpu_max: files.limits.cpus.map(|c| jailer::cgroup::CpuMax {
                quota_us: ((c * period_us as f64) as u64).max(1000),
                period_us,
            }),
            cpu_weight: files.limits.cpu_weight,
        };
        let cg = cgroups
            .create(&name, &limits)
            .map_err(ConfineError::Cgroup)?;
        confined.cgroup = Some(cg);
        confined.memory_max = Some(memory_max);
    }
    confined.jail = Some(jail);
    Ok(confined)
}

/// Makes what a jailed VMM reads readable by its uid: the files (and
/// directories) themselves get read (and search) permission for others.
/// Their parents on the host stay as they are (the runtime and cache
/// directories are the owner's alone): the jail reaches them through its
/// binds only.
fn make_readable(path: &Path) -> Result<(), ConfineError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode();
    let want = if meta.is_dir() { 0o005 } else { 0o004 };
    if mode & want != want {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | want)).map_err(io_err(path))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(path))?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file() || t.is_dir()) {
                make_readable(&entry.path())?;
            }
        }
    }
    Ok(())
}

/// Gives a directory a jailed VMM wrote (a master's snapshot) back to this
/// process's user, readable by the VMMs that will read it.
pub fn reclaim(dir: &Path) -> Result<(), ConfineError> {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io_err(dir))?;
    for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let p = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(io_err(&p))?;
        }
    }
    make_readable(dir)
}

/// Where uid leases live: one place per machine, whatever the state
/// directory, so that two daemons (or a daemon and the CLI) never hand out
/// the same uid.
fn uid_dir() -> PathBuf {
    PathBuf::from("/run/zygote-jail/uids")
}

/// Leases a free uid of the range for VM `name`: the first free one from a
/// random start, taken with `O_EXCL`.
fn lease_uid(name: &str) -> Result<(u32, PathBuf), ConfineError> {
    let s = settings();
    let dir = uid_dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir))?;
    let count = s.uid_count.max(1);
    let start =
        (crate::store::unix_now() as u32 ^ std::process::id().wrapping_mul(2_654_435_761)) % count;
    for i in 0..count {
        let uid = s.uid_base + (start + i) % count;
        let path = dir.join(uid.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => {
                tracing::debug!(uid, vm = name, "uid leased");
                return Ok((uid, path));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(ConfineError::Io { path, source }),
        }
    }
    Err(ConfineError::NoUid(count))
}

/// Takes back what VMs that are gone still hold: uid leases whose VMM is
/// gone (or that never got one within a minute), and VM cgroups without a
/// process. Run when a CLI command or the daemon starts. Returns how many
/// were taken back.
pub fn sweep() -> usize {
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(uid_dir()) {
        for e in rd.flatten() {
            let owner = fs::read_to_string(e.path()).unwrap_or_default();
            let mut it = owner.split_whitespace().map(|w| w.parse::<u64>().ok());
            let stale = match (it.next().flatten(), it.next().flatten()) {
                (Some(pid), Some(start)) => !crate::procfs::is_same_live_process(pid as u32, start),
                _ => e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() >= 60),
            };
            if stale && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    if let Ok(cg) = Cgroups::detect(&settings().cgroup_parent) {
        n += cg.sweep().map(|v| v.len()).unwrap_or(0);
    }
    n
}

/// The file in a runtime directory that names the VM's uid.
const UID_FILE: &str = "jail.uid";

/// Gives back what the VM of runtime directory `dir` holds (its cgroup and
/// uid lease), for a VMM that has ended but was started by another process
/// (a detached clone being killed). Harmless when there is nothing.
pub fn release_dir(dir: &Path) {
    if let Ok(uid) = fs::read_to_string(dir.join(UID_FILE)) {
        let _ = fs::remove_file(uid_dir().join(uid.trim()));
    }
    let name = dir.file_name().and_then(|n| n.to_str());
    if let Some(name) = name {
        if let Ok(cg) = Cgroups::detect(&settings().cgroup_parent) {
            if let Ok(vm) = cg.open(name) {
                let _ = vm.remove();
            }
        }
    }
}

/// Why the VM of runtime directory `dir` ended, when its cgroup knows: it
/// was killed for exceeding its memory limit. For a VMM started by another
/// process (a detached clone); the spawner itself knows from its handle.
pub fn ended_reason(dir: &Path) -> Option<String> {
    let name = dir.file_name()?.to_str()?;
    let vm = Cgroups::detect(&settings().cgroup_parent)
        .ok()?
        .open(name)
        .ok()?;
    vm.oom_killed()
        .unwrap_or(false)
        .then(|| oom_message(vm.memory_max().ok().flatten()))
}

/// What a VM killed for its memory limit is told.
pub fn oom_message(limit_bytes: Option<u64>) -> String {
    match limit_bytes {
        Some(b) => format!(
            "the VM used more memory than its limit ({} MiB) and was killed",
            b >> 20
        ),
        None => "the VM used more memory than its limit and was killed".into(),
    }
}

/// The path inside the jail of a file the VMM makes in its root.
pub fn jail_path(name: &str) -> PathBuf {
    Path::new("/").join(name)
}
