//! Masters: a VM booted once, warmed up, then frozen into a snapshot that
//! clones start from. Also moving a master to disk and back
//! (`snapshot save` / `snapshot load`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::ExecRequest;

use crate::agent::{fresh_identity, AgentClient, AgentError};
use crate::store::{check_name, unix_now, MasterRecord, Store, StoreError, RECORD_VERSION};
use crate::vmm::{VmError, VmSpec, VmmProcess};

/// Errors making or moving masters.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// The state directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The agent failed.
    #[error("warm-up: {0}")]
    Agent(#[from] AgentError),
    /// Its network could not be set up.
    #[error(transparent)]
    Net(#[from] Box<crate::vmnet::VmNetError>),
    /// The warm-up command failed.
    #[error("the warm-up command failed ({0}); the master was not created")]
    Warmup(String),
    /// A snapshot file problem.
    #[error(transparent)]
    Snapshot(#[from] snapshotter::Error),
    /// The snapshot's state is not a VM this zygote can start.
    #[error("snapshot {path}: {why}")]
    BadState {
        /// The snapshot.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Clones of the master still run.
    #[error("{count} clone(s) of {name:?} still run: kill them first, or pass --force (they keep running)")]
    InUse {
        /// Master.
        name: String,
        /// Live clones.
        count: usize,
    },
}

/// Where a master being made is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Cold boot, until the agent answers.
    Booting,
    /// The warm-up command runs (then the freeze).
    Warming,
    /// Frozen and recorded.
    Frozen,
}

/// What `master create` needs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Master name.
    pub name: String,
    /// Image and VM shape (its `snapshot_dir` is set here).
    pub spec: VmSpec,
    /// Shell command run (with `sh -c`) before the freeze.
    pub warmup: Option<String>,
    /// How long the boot may take.
    pub boot_timeout: Duration,
    /// How long the warm-up may take.
    pub warmup_timeout: Duration,
    /// The owning tenant (`None`: the host's admin).
    pub tenant: Option<String>,
    /// The name the owner knows it by, when the store name differs.
    pub display_name: Option<String>,
    /// The owner's labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Give it a network device (and its warm-up a network as asked):
    /// its clones then get networks of their own. `None`: no NIC.
    pub net: Option<crate::vmnet::NetRequest>,
}

/// Boots a VM, runs the warm-up (its stdout and stderr go to `warmup_out`), freezes
/// it, and records it as master `opts.name`. Nothing is left behind on error.
pub fn create(
    store: &Store,
    opts: &CreateOptions,
    warmup_out: &mut dyn std::io::Write,
    progress: &mut dyn FnMut(Phase, &str),
) -> Result<MasterRecord, MasterError> {
    let tmp = store.new_master_dir(&opts.name)?;
    let result = create_in(store, &tmp, opts, warmup_out, progress);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Releases a VM's address (and its published ports) when dropped.
struct ReleaseOnDrop(String, Option<crate::net::Attachment>, bool);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.1.take();
        if self.2 {
            crate::vmnet::release(&self.0);
        }
    }
}

/// The VM id a master's network lease is held under: unique among the
/// masters of every state directory of the host (they share its network).
fn master_vm_id(store_name: &str) -> String {
    format!("{store_name}-master-{}", crate::clone::random_suffix())
}

fn create_in(
    store: &Store,
    tmp: &Path,
    opts: &CreateOptions,
    warmup_out: &mut dyn std::io::Write,
    progress: &mut dyn FnMut(Phase, &str),
) -> Result<MasterRecord, MasterError> {
    let snap_dir = tmp.join("snapshot");
    std::fs::create_dir(&snap_dir).map_err(|source| StoreError::Io {
        path: snap_dir.clone(),
        source,
    })?;
    let mut spec = opts.spec.clone();
    spec.snapshot_dir = Some(snap_dir.clone());
    let t0 = Instant::now();
    let vm_id = master_vm_id(&opts.name);
    let mut net = match &opts.net {
        Some(_) => Some(crate::vmnet::VmNet::take().map_err(Box::new)?),
        None => None,
    };
    let fds = match &net {
        Some(n) => Some((
            n.fds().map_err(Box::new)?,
            proto::launch::MacAddr::derived(&vm_id),
        )),
        None => None,
    };
    let mut vm = VmmProcess::boot_with_net(&spec, fds)?;
    let net_identity = match (&mut net, &opts.net) {
        (Some(n), Some(req)) => Some(
            n.attach_pinned(&vm_id, opts.tenant.as_deref(), req, store.root())
                .map_err(Box::new)?,
        ),
        _ => None,
    };
    // The master keeps its address for as long as it exists (until
    // `master rm`, or until its state directory is removed), so that none
    // of its clones is ever given it; a master that is not made gives it
    // back.
    let mut lease = net.map(|n| ReleaseOnDrop(vm_id.clone(), n.finish(), true));
    progress(Phase::Booting, "booting the master");
    vm.wait_ready(opts.boot_timeout)?;
    let boot_ms = t0.elapsed().as_secs_f64() * 1000.0;
    progress(
        Phase::Booting,
        &format!("agent ready after {:.1} s", boot_ms / 1000.0),
    );
    // The master gets an identity too (its own name and the host's clock,
    // which the warm-up then sees), and the connection it arrives on
    // rehearses what every clone does first: the code and kernel paths of
    // a connection, an identity and a ping are then paged in in the frozen
    // guest, and clones do not pay those page faults again.
    let mut agent = AgentClient::connect(&vm.vsock_path())?;
    let mut identity = fresh_identity(&vm_id, &opts.name).map_err(AgentError::Output)?;
    identity.net = net_identity;
    agent.set_identity(identity)?;
    let mut warmup_ms = None;
    if let Some(cmd) = &opts.warmup {
        progress(Phase::Warming, &format!("warm-up: {cmd}"));
        let t = Instant::now();
        let mut req = ExecRequest::new(vec!["sh".into(), "-c".into(), cmd.clone()]);
        req.timeout_ms = Some(opts.warmup_timeout.as_millis() as u64);
        // Its stdout and stderr both go to `warmup_out`, in the order they
        // arrive (a failed warm-up's last lines are what its owner needs).
        let shared = std::cell::RefCell::new(warmup_out);
        let (mut out, mut err) = (Shared(&shared), Shared(&shared));
        let status = match agent.exec(req, None, &mut out, &mut err) {
            Ok(s) => s,
            Err(e @ AgentError::Remote { .. }) => return Err(e.into()),
            Err(_) => return Err(vm.end_error().into()),
        };
        if status.shell_code() != 0 {
            return Err(MasterError::Warmup(format!(
                "exit code {}",
                status.shell_code()
            )));
        }
        warmup_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
    }
    // What a clone must not inherit: the warm-up's TCP connections to
    // the outside (aborted: every clone's program sees the error at once,
    // instead of a connection that hangs) and the master's address.
    let aborted = agent.prepare_freeze()?;
    if aborted > 0 {
        progress(
            Phase::Warming,
            &format!("aborted {aborted} TCP connection(s) of the warm-up: clones see them reset"),
        );
    }
    agent.ping()?;
    // Open and idle at the freeze: every clone gets this connection, live,
    // with the agent already waiting on it (the VMM hands it to the first
    // host connection), so a clone skips the transport reset and a new
    // connection. Closed only after the freeze, which the guest never sees.
    let frozen = vm.freeze(Duration::from_secs(60))?;
    drop(agent);
    // The master's jailed VMM wrote the snapshot as its own uid: it becomes
    // this user's again, readable by the clones' VMMs (inside their jails).
    crate::confine::reclaim(&snap_dir).map_err(crate::vmm::VmError::from)?;
    progress(
        Phase::Frozen,
        &format!(
            "frozen: vCPUs paused in {:.1} ms, state saved in {:.1} ms",
            frozen.pause_ms.unwrap_or(0.0),
            frozen.save_ms.unwrap_or(0.0)
        ),
    );
    let rec = MasterRecord {
        version: RECORD_VERSION,
        name: opts.name.clone(),
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        warmup: opts.warmup.clone(),
        created_unix_s: unix_now(),
        snapshot: store.master_dir(&opts.name).join("snapshot"),
        boot_ms: Some(boot_ms),
        warmup_ms,
        tenant: opts.tenant.clone(),
        display_name: opts.display_name.clone(),
        labels: opts.labels.clone(),
        net: opts.net.is_some(),
        net_lease: opts.net.as_ref().map(|_| vm_id.clone()),
    };
    store.commit_master(tmp, &rec)?;
    if let Some(l) = &mut lease {
        l.2 = false;
    }
    Ok(rec)
}

/// One writer shared by two streams on one thread.
struct Shared<'a, 'b>(&'a std::cell::RefCell<&'b mut dyn std::io::Write>);

impl std::io::Write for Shared<'_, '_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Removes master `name`. Refused while clones of it run, unless `force`
/// (they keep running: their RAM mapping keeps the memory alive).
pub fn remove(store: &Store, name: &str, force: bool) -> Result<(), MasterError> {
    store.master(name)?;
    let live = store
        .clones()
        .into_iter()
        .flatten()
        .filter(|c| c.master == name && c.alive())
        .count();
    if live > 0 && !force {
        return Err(MasterError::InUse {
            name: name.to_string(),
            count: live,
        });
    }
    let rec = store.master(name).ok();
    store.remove_master(name)?;
    if let Some(rec) = rec {
        rec.release_net();
    }
    Ok(())
}

/// Checks that a snapshot describes a VM this zygote can start on this
/// host (the VMM's own restore checks, without starting it).
fn check_state(dir: &Path) -> Result<proto::launch::SnapshotCheck, MasterError> {
    let check = crate::vmm::check_snapshot(dir)?;
    if !check.ok {
        return Err(MasterError::BadState {
            path: dir.to_path_buf(),
            why: check
                .error
                .unwrap_or_else(|| "refused without a reason".into()),
        });
    }
    Ok(check)
}

/// Writes master `name` to `dst` (sparse memory, checksums, atomic).
pub fn save(store: &Store, name: &str, dst: &Path) -> Result<snapshotter::SaveStats, MasterError> {
    let rec = store.master(name)?;
    let snap = snapshotter::open(&rec.snapshot)?;
    Ok(snapshotter::save(&snap, dst)?)
}

/// Registers the snapshot in `dir` as master `name` (default: the
/// directory's name). The memory file is checked once here, then mapped
/// copy-on-write by every clone straight from `dir`.
pub fn load(store: &Store, dir: &Path, name: Option<&str>) -> Result<MasterRecord, MasterError> {
    load_as(store, dir, name, false)
}

/// As [`load`], but the snapshot in `dir` (a directory of the store's, e.g.
/// a received transfer) is moved into the master's directory, so that it
/// goes with the master when the master is removed. On error `dir` is
/// left where it was, or removed if it had been moved already.
pub fn load_moving(store: &Store, dir: &Path, name: &str) -> Result<MasterRecord, MasterError> {
    load_as(store, dir, Some(name), true)
}

fn load_as(
    store: &Store,
    dir: &Path,
    name: Option<&str>,
    take: bool,
) -> Result<MasterRecord, MasterError> {
    let dir = std::fs::canonicalize(dir).map_err(|_| snapshotter::Error::NotFound {
        path: dir.to_path_buf(),
    })?;
    let name = match name {
        Some(n) => n.to_string(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default(),
    };
    check_name(&name)?;
    let snap = snapshotter::open(&dir)?;
    snapshotter::verify_memory(&snap)?;
    let state = check_state(&dir)?;
    let tmp = store.new_master_dir(&name)?;
    let dir = if take {
        let inside = tmp.join("snapshot");
        if let Err(source) = std::fs::rename(&dir, &inside) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(StoreError::Io { path: dir, source }.into());
        }
        store.master_dir(&name).join("snapshot")
    } else {
        dir
    };
    let rec = MasterRecord {
        version: RECORD_VERSION,
        name: name.clone(),
        memory_mib: state.memory_mib,
        vcpus: state.vcpus,
        warmup: None,
        created_unix_s: unix_now(),
        snapshot: dir,
        boot_ms: None,
        warmup_ms: None,
        tenant: None,
        display_name: None,
        labels: Default::default(),
        net: state.net,
        net_lease: None,
    };
    let result = store.commit_master(&tmp, &rec);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(rec)
}
