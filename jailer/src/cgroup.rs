//! Per-VM cgroups: where they live ([`Cgroups::detect`]), making one with
//! its limits ([`Cgroups::create`] → [`VmCgroup`]), the descriptors a spawn
//! needs to start in it ([`Placement`]), what happened in it
//! ([`VmCgroup::oom_killed`], [`VmCgroup::memory_peak`]), and removing it
//! ([`VmCgroup::remove`], [`Cgroups::sweep`]).
//!
//! Both cgroup v2 (`memory.max`, `memory.swap.max`, `pids.max`, `cpu.max`,
//! `cpu.weight`; the child starts in it through `CLONE_INTO_CGROUP`) and,
//! per controller, cgroup v1 (`memory.limit_in_bytes`,
//! `memory.memsw.limit_in_bytes`, `pids.max`, `cpu.cfs_quota_us`,
//! `cpu.shares`; the child writes itself into `tasks` before its exec)
//! are handled, chosen at run time: on a hybrid host the controllers
//! are v1 and the v2 hierarchy still tracks the VM's processes (so that
//! `cgroup.kill` ends them all at once).
//!
//! VM cgroups are `<own>/<parent>/<name>` in each hierarchy, `<own>` being
//! the calling process's cgroup there: a VM never leaves the cgroup the
//! host confines the caller to.
//!
//! This module must not spawn processes or decide limits: the caller says
//! what each VM gets.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys;

/// A cgroup controller the jailer sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    /// `memory`: RAM (and swap) limit, OOM kills, peak usage.
    Memory,
    /// `pids`: number of tasks (threads count).
    Pids,
    /// `cpu`: bandwidth (quota per period) and weight.
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// Its name in `/proc/self/cgroup`, mount options and `cgroup.controllers`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

impl std::fmt::Display for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which cgroup version serves a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The unified hierarchy.
    V2,
    /// A legacy per-controller hierarchy.
    V1,
}

/// Limits of one VM's cgroup. `None` leaves a limit unset (inherited from
/// the parent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// RAM in bytes, for everything the VM's processes use (guest RAM they
    /// touch plus the VMM's own): `memory.max` / `memory.limit_in_bytes`.
    /// Beyond it the kernel reclaims, then OOM-kills inside this cgroup only.
    pub memory_max: Option<u64>,
    /// Swap in bytes on top of `memory_max` (0: never swap guest memory):
    /// `memory.swap.max` / `memory.memsw.limit_in_bytes` (= memory + swap;
    /// skipped when the host has no swap accounting).
    pub swap_max: Option<u64>,
    /// Tasks (processes and threads): `pids.max`.
    pub pids_max: Option<u64>,
    /// CPU bandwidth: `cpu.max` / `cpu.cfs_quota_us` and `cpu.cfs_period_us`.
    pub cpu_max: Option<CpuMax>,
    /// CPU weight, 1..=10000 (100 is the default share): `cpu.weight`, or
    /// `cpu.shares` = weight × 1024 / 100 on v1.
    pub cpu_weight: Option<u16>,
}

/// At most `quota_us` of CPU time every `period_us` (2 CPUs: quota = 2 × period).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    /// CPU time per period, in microseconds (at least 1000).
    pub quota_us: u64,
    /// The period, in microseconds (1000..=1000000).
    pub period_us: u64,
}

/// Errors finding, making, reading or removing cgroups.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// A cgroup name is not a single path component.
    #[error("{name:?} cannot name a cgroup: use a non-empty name without '/', not . or .., at most 255 bytes")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` could not be read.
    #[error("cannot read {path} to find this process's cgroups")]
    ProcSelf {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A limit needs a controller this process cannot use.
    #[error("no cgroup {controller} controller is available to this process (neither in its cgroup v2 cgroup.controllers nor mounted as cgroup v1); enable it on the host or leave that limit unset")]
    ControllerUnavailable {
        /// The controller.
        controller: Controller,
    },
    /// A limit is out of range.
    #[error("invalid cgroup limit: {what}")]
    InvalidLimit {
        /// What is wrong.
        what: String,
    },
    /// The VM's cgroup exists already.
    #[error("the cgroup {path} exists already (left by a VM that was not cleaned up: remove it or call Cgroups::sweep)")]
    Exists {
        /// The directory.
        path: PathBuf,
    },
    /// No cgroup of that name exists.
    #[error("no VM cgroup named {name:?} under {parent:?}")]
    NotFound {
        /// The VM's name.
        name: String,
        /// The parent.
        parent: String,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create the cgroup {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Controllers could not be enabled for children of a v2 cgroup.
    #[error("cannot enable {controllers} in {path} (EBUSY: that cgroup holds processes; cgroup v2 allows controllers only below cgroups without processes, so run the caller in a leaf cgroup of its delegated subtree and put the VMs beside it with Cgroups::with_v2_base)")]
    EnableControllers {
        /// The `cgroup.subtree_control` file.
        path: PathBuf,
        /// What was written.
        controllers: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A cgroup file could not be written.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A cgroup file could not be read (or parsed).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Processes remained in a cgroup after it was killed.
    #[error("processes are still in {path} {waited:?} after killing them (a process stuck in the kernel, or one that is not ours to kill); retry later")]
    StillPopulated {
        /// The directory.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove the cgroup {path}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, CgroupError>;

/// One hierarchy the jailer uses: the caller's own cgroup in it, and the
/// controllers it serves for us.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    version: Version,
    /// The caller's cgroup in it (a directory).
    own: PathBuf,
    controllers: Vec<Controller>,
}

/// Where VM cgroups live on this host: found once, then used for every VM.
#[derive(Debug, Clone)]
pub struct Cgroups {
    parent: String,
    /// The v2 hierarchy (tracks processes even with no controllers).
    v2: Option<Hierarchy>,
    /// The v1 hierarchies serving the controllers v2 does not.
    v1: Vec<Hierarchy>,
}

impl Cgroups {
    /// Finds this process's cgroups (from `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`) and places VM cgroups under `parent` (e.g.
    /// `zygote`) below them. Nothing is created until [`Cgroups::create`].
    pub fn detect(parent: &str) -> Result<Cgroups> {
        check_name(parent)?;
        let read = |p: &str| {
            fs::read_to_string(p).map_err(|source| CgroupError::ProcSelf {
                path: PathBuf::from(p),
                source,
            })
        };
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        let (v2, v1) = layout(
            &parse_mountinfo(&mountinfo),
            &parse_proc_cgroup(&own),
            |dir| fs::read_to_string(dir.join("cgroup.controllers")).ok(),
        );
        Ok(Cgroups {
            parent: parent.to_string(),
            v2,
            v1,
        })
    }

    /// Uses `base` instead of the caller's own v2 cgroup as the place of
    /// the parent. On a v2 host the caller's cgroup cannot both hold the
    /// caller and give controllers to children: run the caller in a leaf of
    /// its delegated cgroup (e.g. `<service>/daemon`) and pass the
    /// delegated cgroup (`<service>`) here.
    pub fn with_v2_base(mut self, base: PathBuf) -> Cgroups {
        if let Some(v2) = &mut self.v2 {
            v2.controllers = read_controllers(&base);
            v2.own = base;
            let served = v2.controllers.clone();
            for h in &mut self.v1 {
                h.controllers.retain(|c| !served.contains(c));
            }
            self.v1.retain(|h| !h.controllers.is_empty());
        }
        self
    }

    /// Which version serves `controller`, if any.
    pub fn version(&self, controller: Controller) -> Option<Version> {
        self.hierarchies()
            .find(|h| h.controllers.contains(&controller))
            .map(|h| h.version)
    }

    /// The parent's name.
    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// The parent directory in each hierarchy used.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.hierarchies()
            .map(|h| h.own.join(&self.parent))
            .collect()
    }

    fn hierarchies(&self) -> impl Iterator<Item = &Hierarchy> {
        self.v2.iter().chain(self.v1.iter())
    }

    /// Makes the cgroup of VM `name` with `limits`, ready for a spawn to
    /// start in ([`VmCgroup::placement`]). Fails if a limit needs a
    /// controller this host does not give us, or if the cgroup exists.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<VmCgroup> {
        check_name(name)?;
        check_limits(limits)?;
        for (needed, controller) in [
            (
                limits.memory_max.is_some() || limits.swap_max.is_some(),
                Controller::Memory,
            ),
            (limits.pids_max.is_some(), Controller::Pids),
            (
                limits.cpu_max.is_some() || limits.cpu_weight.is_some(),
                Controller::Cpu,
            ),
        ] {
            if needed && self.version(controller).is_none() {
                return Err(CgroupError::ControllerUnavailable { controller });
            }
        }

        let mut made: Vec<PathBuf> = Vec::new();
        let result = self.create_dirs(name, &mut made).and_then(|vm| {
            vm.apply(limits)?;
            Ok(vm)
        });
        if result.is_err() {
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    fn create_dirs(&self, name: &str, made: &mut Vec<PathBuf>) -> Result<VmCgroup> {
        let mut v2_dir = None;
        let mut v1_dirs = Vec::new();
        for h in self.hierarchies() {
            let parent = h.own.join(&self.parent);
            mkdir(&parent, true)?;
            if h.version == Version::V2 && !h.controllers.is_empty() {
                enable_controllers(&h.own, &h.controllers)?;
                enable_controllers(&parent, &h.controllers)?;
            }
            let dir = parent.join(name);
            mkdir(&dir, false)?;
            made.push(dir.clone());
            match h.version {
                Version::V2 => v2_dir = Some((dir, h.controllers.clone())),
                Version::V1 => v1_dirs.push((dir, h.controllers.clone())),
            }
        }
        VmCgroup::from_dirs(name, &self.parent, v2_dir, v1_dirs)
    }

    /// The existing cgroup of VM `name` (e.g. of a VM adopted after a
    /// restart of the caller), to watch or remove it.
    pub fn open(&self, name: &str) -> Result<VmCgroup> {
        check_name(name)?;
        let mut v2_dir = None;
        let mut v1_dirs = Vec::new();
        for h in self.hierarchies() {
            let dir = h.own.join(&self.parent).join(name);
            if !dir.is_dir() {
                continue;
            }
            match h.version {
                Version::V2 => v2_dir = Some((dir, h.controllers.clone())),
                Version::V1 => v1_dirs.push((dir, h.controllers.clone())),
            }
        }
        if v2_dir.is_none() && v1_dirs.is_empty() {
            return Err(CgroupError::NotFound {
                name: name.to_string(),
                parent: self.parent.clone(),
            });
        }
        VmCgroup::from_dirs(name, &self.parent, v2_dir, v1_dirs)
    }

    /// Removes every VM cgroup under the parent that holds no process (left
    /// over after the caller was killed) and returns their names. Run it
    /// before creating VM cgroups: one created but not yet started in
    /// looks the same as a leftover.
    pub fn sweep(&self) -> Result<Vec<String>> {
        let mut names = BTreeSet::new();
        for parent in self.parent_dirs() {
            let entries = match fs::read_dir(&parent) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(CgroupError::Read {
                        path: parent,
                        source,
                    })
                }
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    if let Some(n) = entry.file_name().to_str() {
                        names.insert(n.to_string());
                    }
                }
            }
        }
        let mut removed = Vec::new();
        for name in names {
            let vm = match self.open(&name) {
                Ok(vm) => vm,
                Err(CgroupError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if vm.procs()?.is_empty() {
                vm.remove()?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// The descriptors a spawn uses to start in a VM's cgroup: the v2
/// directory (for `CLONE_INTO_CGROUP`) and the v1 `tasks` files (the
/// child writes itself into them). Cheap to clone.
///
/// `tasks`, not `cgroup.procs`: the child is a single-threaded process,
/// so moving its one thread moves the process, and the kernel moves
/// `current` alone without taking the global threadgroup lock for writing
/// (which waits for an RCU grace period, 10-20 ms, whenever it was not
/// taken shortly before).
#[derive(Debug, Clone)]
pub struct Placement(Arc<PlacementFds>);

#[derive(Debug)]
struct PlacementFds {
    v2_dir: Option<OwnedFd>,
    v1_procs: Vec<OwnedFd>,
}

impl Placement {
    pub(crate) fn v2_dir(&self) -> Option<RawFd> {
        self.0.v2_dir.as_ref().map(|f| f.as_raw_fd())
    }

    pub(crate) fn v1_procs(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.0.v1_procs.iter().map(|f| f.as_raw_fd())
    }
}

/// One VM's cgroup (a directory in each hierarchy used). Dropping it
/// leaves the cgroup in place (a detached VM outlives its caller): call
/// [`VmCgroup::remove`] once the VM has ended.
#[derive(Debug)]
pub struct VmCgroup {
    name: String,
    parent: String,
    v2: Option<PathBuf>,
    v1: Vec<PathBuf>,
    /// The directory holding each controller, and its version.
    controllers: Vec<(Controller, Version, PathBuf)>,
    placement: Placement,
}

impl VmCgroup {
    fn from_dirs(
        name: &str,
        parent: &str,
        v2: Option<(PathBuf, Vec<Controller>)>,
        v1: Vec<(PathBuf, Vec<Controller>)>,
    ) -> Result<VmCgroup> {
        let mut controllers = Vec::new();
        let v2_dir = match &v2 {
            Some((dir, cs)) => {
                controllers.extend(cs.iter().map(|c| (*c, Version::V2, dir.clone())));
                Some(open(dir, libc::O_PATH | libc::O_DIRECTORY)?)
            }
            None => None,
        };
        let mut v1_procs = Vec::with_capacity(v1.len());
        for (dir, cs) in &v1 {
            controllers.extend(cs.iter().map(|c| (*c, Version::V1, dir.clone())));
            v1_procs.push(open(&dir.join("tasks"), libc::O_WRONLY)?);
        }
        Ok(VmCgroup {
            name: name.to_string(),
            parent: parent.to_string(),
            v2: v2.map(|(d, _)| d),
            v1: v1.into_iter().map(|(d, _)| d).collect(),
            controllers,
            placement: Placement(Arc::new(PlacementFds { v2_dir, v1_procs })),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The parent's name.
    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// What a [`crate::Spawn`] needs to start the VM's process in it.
    pub fn placement(&self) -> Placement {
        self.placement.clone()
    }

    /// Its directories, one per hierarchy (v2 first).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.v2.iter().chain(self.v1.iter()).cloned().collect()
    }

    /// The directory serving `controller`, and its version.
    pub fn controller_dir(&self, controller: Controller) -> Option<(Version, &Path)> {
        self.controllers
            .iter()
            .find(|(c, _, _)| *c == controller)
            .map(|(_, v, d)| (*v, d.as_path()))
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        if let Some((version, dir)) = self.controller_dir(Controller::Memory) {
            match version {
                Version::V2 => {
                    if let Some(m) = limits.memory_max {
                        write(&dir.join("memory.max"), &m.to_string())?;
                    }
                    if let Some(s) = limits.swap_max {
                        let f = dir.join("memory.swap.max");
                        if f.exists() {
                            write(&f, &s.to_string())?;
                        }
                    }
                }
                Version::V1 => {
                    if let Some(m) = limits.memory_max {
                        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if let (Some(s), true) = (limits.swap_max, memsw.exists()) {
                            write(&memsw, &m.saturating_add(s).to_string())?;
                        }
                    }
                }
            }
        }
        if let (Some(p), Some((_, dir))) = (limits.pids_max, self.controller_dir(Controller::Pids))
        {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let Some((version, dir)) = self.controller_dir(Controller::Cpu) {
            match version {
                Version::V2 => {
                    if let Some(c) = limits.cpu_max {
                        write(
                            &dir.join("cpu.max"),
                            &format!("{} {}", c.quota_us, c.period_us),
                        )?;
                    }
                    if let Some(w) = limits.cpu_weight {
                        write(&dir.join("cpu.weight"), &w.to_string())?;
                    }
                }
                Version::V1 => {
                    if let Some(c) = limits.cpu_max {
                        write(&dir.join("cpu.cfs_period_us"), &c.period_us.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &c.quota_us.to_string())?;
                    }
                    if let Some(w) = limits.cpu_weight {
                        write(&dir.join("cpu.shares"), &weight_to_shares(w).to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How many times the kernel OOM-killed a process in this cgroup
    /// (v2 `memory.events`, v1 `memory.oom_control`); 0 without a memory
    /// controller.
    pub fn oom_kills(&self) -> Result<u64> {
        let Some((version, dir)) = self.controller_dir(Controller::Memory) else {
            return Ok(0);
        };
        let (file, key) = match version {
            Version::V2 => (dir.join("memory.events"), "oom_kill"),
            Version::V1 => (dir.join("memory.oom_control"), "oom_kill"),
        };
        let text = read(&file)?;
        if let Some(n) = keyed(&text, key) {
            return Ok(n);
        }
        // Kernels before 4.13 have no v1 oom_kill count: a hit limit is
        // the best sign there is.
        let failcnt = dir.join("memory.failcnt");
        let n = parse_u64(&read(&failcnt)?, &failcnt)?;
        Ok(u64::from(n > 0))
    }

    /// Whether the kernel OOM-killed a process of this VM because it went
    /// over its memory limit (the reason to report when the VM died of
    /// `SIGKILL`).
    pub fn oom_killed(&self) -> Result<bool> {
        Ok(self.oom_kills()? > 0)
    }

    /// The most memory the cgroup used at once, in bytes (v2 `memory.peak`,
    /// v1 `memory.max_usage_in_bytes`); `None` if the host does not say.
    pub fn memory_peak(&self) -> Result<Option<u64>> {
        self.memory_stat_file("memory.peak", "memory.max_usage_in_bytes")
    }

    /// The cgroup's memory limit in bytes (v2 `memory.max`, v1
    /// `memory.limit_in_bytes`); `None` when it has none.
    pub fn memory_max(&self) -> Result<Option<u64>> {
        let Some((version, dir)) = self.controller_dir(Controller::Memory) else {
            return Ok(None);
        };
        let file = dir.join(match version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        });
        let text = read(&file)?;
        if text.trim() == "max" {
            return Ok(None);
        }
        Ok(Some(parse_u64(&text, &file)?))
    }

    /// The memory the cgroup uses now, in bytes.
    pub fn memory_current(&self) -> Result<Option<u64>> {
        self.memory_stat_file("memory.current", "memory.usage_in_bytes")
    }

    fn memory_stat_file(&self, v2: &str, v1: &str) -> Result<Option<u64>> {
        let Some((version, dir)) = self.controller_dir(Controller::Memory) else {
            return Ok(None);
        };
        let file = dir.join(match version {
            Version::V2 => v2,
            Version::V1 => v1,
        });
        match fs::read_to_string(&file) {
            Ok(s) => Ok(Some(parse_u64(&s, &file)?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CgroupError::Read { path: file, source }),
        }
    }

    /// The processes in the cgroup (in any of its hierarchies), by pid.
    pub fn procs(&self) -> Result<Vec<u32>> {
        let mut pids = BTreeSet::new();
        for dir in self.v2.iter().chain(self.v1.iter()) {
            pids.extend(procs_in(dir)?);
        }
        Ok(pids.into_iter().collect())
    }

    /// Kills whatever still runs in the cgroup and removes its directories.
    /// Idempotent: removing a removed cgroup succeeds. A process of the
    /// caller's that it killed is left for the caller to reap (a zombie
    /// does not keep the cgroup busy).
    pub fn remove(&self) -> Result<()> {
        self.kill_all()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = Instant::now();
        for dir in self.v2.iter().chain(self.v1.iter()) {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        if Instant::now() > deadline {
                            return Err(CgroupError::StillPopulated {
                                path: dir.clone(),
                                waited: started.elapsed(),
                            });
                        }
                        // Killed tasks leave the cgroup as they exit.
                        self.kill_all()?;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(source) => {
                        return Err(CgroupError::Remove {
                            path: dir.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// SIGKILL to every process in the cgroup: at once through v2's
    /// `cgroup.kill` when there is one, else one by one through pidfds.
    fn kill_all(&self) -> Result<()> {
        if let Some(dir) = &self.v2 {
            let kill = dir.join("cgroup.kill");
            match fs::write(&kill, "1") {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !dir.exists() {
                        return Ok(());
                    }
                    // A kernel before 5.14: no cgroup.kill.
                }
                Err(source) => {
                    return Err(CgroupError::Write {
                        path: kill,
                        value: "1".into(),
                        source,
                    })
                }
            }
        }
        for dir in self.v2.iter().chain(self.v1.iter()) {
            for pid in procs_in(dir)? {
                // Open the pidfd first, then check that the pid is still in
                // the cgroup: if it is, the pidfd is that process, never a
                // reused pid.
                let Ok(pidfd) = sys::pidfd_open(pid as i32) else {
                    continue;
                };
                if procs_in(dir)?.contains(&pid) {
                    let _ = sys::pidfd_send_signal(std::os::fd::AsFd::as_fd(&pidfd), libc::SIGKILL);
                }
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(CgroupError::InvalidName {
            name: name.to_string(),
        });
    }
    Ok(())
}

fn check_limits(l: &Limits) -> Result<()> {
    let bad = |what: String| Err(CgroupError::InvalidLimit { what });
    if let Some(w) = l.cpu_weight {
        if !(1..=10000).contains(&w) {
            return bad(format!("cpu weight {w} is outside 1..=10000"));
        }
    }
    if let Some(c) = l.cpu_max {
        if !(1000..=1_000_000).contains(&c.period_us) {
            return bad(format!(
                "cpu period {} µs is outside 1000..=1000000",
                c.period_us
            ));
        }
        if c.quota_us < 1000 {
            return bad(format!("cpu quota {} µs is below 1000", c.quota_us));
        }
    }
    if l.swap_max.is_some() && l.memory_max.is_none() {
        return bad("a swap limit needs a memory limit".to_string());
    }
    if l.pids_max == Some(0) {
        return bad("pids max 0 would not let the program start".to_string());
    }
    Ok(())
}

/// cgroup v2 weight (1..=10000, default 100) to v1 shares (default 1024),
/// as systemd converts them.
fn weight_to_shares(weight: u16) -> u64 {
    (u64::from(weight) * 1024 / 100).clamp(2, 262_144)
}

fn mkdir(dir: &Path, exist_ok: bool) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if exist_ok {
                Ok(())
            } else {
                Err(CgroupError::Exists {
                    path: dir.to_path_buf(),
                })
            }
        }
        Err(source) => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn enable_controllers(dir: &Path, controllers: &[Controller]) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = read(&file)?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == c.name()))
        .map(|c| format!("+{}", c.name()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    fs::write(&file, &value).map_err(|source| CgroupError::EnableControllers {
        path: file,
        controllers: value,
        source,
    })
}

fn open(path: &Path, flags: i32) -> Result<OwnedFd> {
    let f = fs::OpenOptions::new()
        .read(flags & libc::O_WRONLY == 0)
        .write(flags & libc::O_WRONLY != 0)
        .custom_flags(flags & !libc::O_WRONLY)
        .open(path)
        .map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(f.into())
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_u64(s: &str, path: &Path) -> Result<u64> {
    s.trim().parse().map_err(|_| CgroupError::Read {
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a number: {:?}", s.trim()),
        ),
    })
}

/// The value of `key` in a "key value" per line file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

fn procs_in(dir: &Path) -> Result<Vec<u32>> {
    let file = dir.join("cgroup.procs");
    match fs::read_to_string(&file) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CgroupError::Read { path: file, source }),
    }
}

fn read_controllers(dir: &Path) -> Vec<Controller> {
    let text = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    Controller::ALL
        .into_iter()
        .filter(|c| text.split_whitespace().any(|n| n == c.name()))
        .collect()
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The hierarchy path mounted (usually `/`).
    root: String,
    mount_point: PathBuf,
    version: Version,
    /// v1: the controllers (and `name=`) in its super options.
    options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let version = match right[0] {
            "cgroup2" => Version::V2,
            "cgroup" => Version::V1,
            _ => continue,
        };
        mounts.push(CgroupMount {
            root: unescape(left[3]),
            mount_point: PathBuf::from(unescape(left[4])),
            version,
            options: right[2].split(',').map(str::to_string).collect(),
        });
    }
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/cgroup`: hierarchy id, controllers, path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnCgroup {
    id: u32,
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<OwnCgroup> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.parse().ok()?;
            let controllers = it
                .next()?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let path = it.next()?.to_string();
            Some(OwnCgroup {
                id,
                controllers,
                path,
            })
        })
        .collect()
}

/// The directory of cgroup `path` (as in `/proc/self/cgroup`) under a
/// mount of hierarchy root `root`.
fn dir_under(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path.trim_start_matches('/')
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest.trim_start_matches('/')
    };
    Some(mount.mount_point.join(rel))
}

/// Picks the hierarchy for each controller: v2 where the caller's v2
/// cgroup offers it, else the v1 hierarchy mounted with it. The v2
/// hierarchy is kept even without controllers (it tracks processes).
fn layout(
    mounts: &[CgroupMount],
    own: &[OwnCgroup],
    controllers_of: impl Fn(&Path) -> Option<String>,
) -> (Option<Hierarchy>, Vec<Hierarchy>) {
    let v2 = own.iter().find(|c| c.id == 0).and_then(|c| {
        mounts
            .iter()
            .filter(|m| m.version == Version::V2)
            .find_map(|m| dir_under(m, &c.path))
            .map(|dir| {
                let text = controllers_of(&dir).unwrap_or_default();
                let controllers = Controller::ALL
                    .into_iter()
                    .filter(|c| text.split_whitespace().any(|n| n == c.name()))
                    .collect();
                Hierarchy {
                    version: Version::V2,
                    own: dir,
                    controllers,
                }
            })
    });
    let mut v1: Vec<Hierarchy> = Vec::new();
    for controller in Controller::ALL {
        if v2
            .as_ref()
            .is_some_and(|h| h.controllers.contains(&controller))
        {
            continue;
        }
        let Some(line) = own
            .iter()
            .find(|c| c.id != 0 && c.controllers.iter().any(|n| n == controller.name()))
        else {
            continue;
        };
        let Some(dir) = mounts
            .iter()
            .filter(|m| {
                m.version == Version::V1 && m.options.iter().any(|o| o == controller.name())
            })
            .find_map(|m| dir_under(m, &line.path))
        else {
            continue;
        };
        match v1.iter_mut().find(|h| h.own == dir) {
            Some(h) => h.controllers.push(controller),
            None => v1.push(Hierarchy {
                version: Version::V1,
                own: dir,
                controllers: vec![controller],
            }),
        }
    }
    (v2, v1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu,cpuacct:/
0::/svc
";

    #[test]
    fn hybrid_host_uses_v1_controllers_and_v2_for_tracking() {
        let (v2, v1) = layout(
            &parse_mountinfo(HYBRID_MOUNTINFO),
            &parse_proc_cgroup(HYBRID_CGROUP),
            |_| Some("hugetlb\n".into()),
        );
        let v2 = v2.expect("the unified hierarchy is there");
        assert_eq!(v2.own, Path::new("/sys/fs/cgroup/unified/svc"));
        assert!(v2.controllers.is_empty());
        assert_eq!(
            v1,
            vec![
                Hierarchy {
                    version: Version::V1,
                    own: PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"),
                    controllers: vec![Controller::Memory],
                },
                Hierarchy {
                    version: Version::V1,
                    own: PathBuf::from("/sys/fs/cgroup/pids/"),
                    controllers: vec![Controller::Pids],
                },
                Hierarchy {
                    version: Version::V1,
                    own: PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/"),
                    controllers: vec![Controller::Cpu],
                },
            ]
        );
    }

    #[test]
    fn pure_v2_host_uses_v2_for_what_it_offers() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/system.slice/zygote.service\n";
        let (v2, v1) = layout(
            &parse_mountinfo(mountinfo),
            &parse_proc_cgroup(own),
            |dir| {
                assert_eq!(dir, Path::new("/sys/fs/cgroup/system.slice/zygote.service"));
                Some("cpuset cpu io memory pids\n".into())
            },
        );
        let v2 = v2.unwrap();
        assert_eq!(
            v2.controllers,
            vec![Controller::Memory, Controller::Pids, Controller::Cpu]
        );
        assert!(v1.is_empty());
    }

    #[test]
    fn a_cgroup_namespace_mount_root_is_stripped() {
        // A container whose cgroup mount shows only its own subtree.
        let mountinfo = "35 31 0:32 /docker/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let own = "4:memory:/docker/x/inner\n";
        let (v2, v1) = layout(&parse_mountinfo(mountinfo), &parse_proc_cgroup(own), |_| {
            None
        });
        assert!(v2.is_none());
        assert_eq!(v1[0].own, Path::new("/sys/fs/cgroup/memory/inner"));
        // A path outside the mounted subtree cannot be reached.
        let own = "4:memory:/docker/xy\n";
        let (_, v1) = layout(&parse_mountinfo(mountinfo), &parse_proc_cgroup(own), |_| {
            None
        });
        assert!(v1.is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\\"), r"/a\\");
    }

    #[test]
    fn weights_map_to_shares_like_systemd() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10000), 102_400);
    }

    #[test]
    fn bad_names_and_limits_are_refused() {
        for n in ["", ".", "..", "a/b", &"x".repeat(256)] {
            assert!(
                matches!(check_name(n), Err(CgroupError::InvalidName { .. })),
                "{n:?}"
            );
        }
        check_name("vm-1").unwrap();
        for l in [
            Limits {
                cpu_weight: Some(0),
                ..Default::default()
            },
            Limits {
                cpu_max: Some(CpuMax {
                    quota_us: 50_000,
                    period_us: 10,
                }),
                ..Default::default()
            },
            Limits {
                swap_max: Some(0),
                ..Default::default()
            },
            Limits {
                pids_max: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(check_limits(&l), Err(CgroupError::InvalidLimit { .. })),
                "{l:?}"
            );
        }
    }

    #[test]
    fn a_v2_base_takes_over_the_controllers_it_offers() {
        let base = tempfile::tempdir().unwrap();
        fs::write(
            base.path().join("cgroup.controllers"),
            "cpuset memory pids\n",
        )
        .unwrap();
        let (v2, v1) = layout(
            &parse_mountinfo(HYBRID_MOUNTINFO),
            &parse_proc_cgroup(HYBRID_CGROUP),
            |_| Some(String::new()),
        );
        let cgroups = Cgroups {
            parent: "zygote".into(),
            v2,
            v1,
        }
        .with_v2_base(base.path().to_path_buf());
        assert_eq!(cgroups.version(Controller::Memory), Some(Version::V2));
        assert_eq!(cgroups.version(Controller::Pids), Some(Version::V2));
        assert_eq!(cgroups.version(Controller::Cpu), Some(Version::V1));
        assert_eq!(
            cgroups.parent_dirs(),
            vec![
                base.path().join("zygote"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/zygote")
            ]
        );
    }

    #[test]
    fn without_cgroup_kill_remove_kills_through_pidfds() {
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test needs root (cgroups)");
        let mut cgroups = Cgroups::detect(&format!("jailer-unit-{}", std::process::id())).unwrap();
        // As on a host without cgroup v2 (or before Linux 5.14).
        cgroups.v2 = None;
        assert!(
            !cgroups.v1.is_empty(),
            "this host has cgroup v1 controllers"
        );
        let vm = cgroups.create("vm", &Limits::default()).unwrap();
        let s = crate::Spawn::new("/bin/busybox")
            .args(["sleep", "1000"])
            .cgroup(vm.placement());
        let child = crate::spawn(&s).unwrap();
        assert_eq!(vm.procs().unwrap(), vec![child.pid]);
        vm.remove().unwrap();
        let exit = crate::wait(&child.pidfd, false).unwrap().unwrap();
        assert_eq!(exit.signal(), Some(libc::SIGKILL));
        for d in vm.dirs() {
            assert!(!d.exists(), "{d:?}");
        }
        for d in cgroups.parent_dirs() {
            fs::remove_dir(&d).unwrap();
        }
    }

    #[test]
    fn keyed_files_are_read_by_key() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(text, "oom_kill"), Some(3));
        assert_eq!(keyed(text, "oom"), None);
    }
}
