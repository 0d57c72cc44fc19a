//! Clones: VMM processes restored from a master's snapshot, each with its
//! own copy-on-write view of the master's RAM, its own vsock socket and its
//! own identity. A clone outlives the command that made it when detached.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::events::{now_us, Event};
use proto::launch::VmSource;

use crate::agent::{fresh_identity, AgentClient, AgentError};
use crate::procfs;
use crate::store::{
    check_name, unix_now, CloneRecord, MasterRecord, Store, StoreError, RECORD_VERSION,
};
use crate::vmm::{self, SpawnOptions, Timeline, VmError, VmmProcess};

/// Errors starting or managing clones.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The state directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VMM could not be started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The clone's VMM ended before the clone was ready.
    #[error("clone {id} failed to start: {message}")]
    Died {
        /// Clone id.
        id: String,
        /// What the VMM said.
        message: String,
    },
    /// The clone's agent did not answer in time.
    #[error("clone {id}: the guest agent did not answer within {timeout:?} (last error: {last})")]
    Timeout {
        /// Clone id.
        id: String,
        /// How long we waited.
        timeout: Duration,
        /// The last connection error.
        last: String,
    },
    /// The agent refused the identity or the ping.
    #[error("clone {id}: {source}")]
    Agent {
        /// Clone id.
        id: String,
        /// Agent error.
        #[source]
        source: AgentError,
    },
    /// The clone is not running.
    #[error("clone {0} is not running (see `zygote ps`; `zygote kill {0}` removes it)")]
    NotRunning(String),
    /// Its network could not be set up.
    #[error(transparent)]
    Net(#[from] Box<crate::vmnet::VmNetError>),
}

/// A clone that answered.
#[derive(Debug)]
pub struct Started {
    /// Its id (and hostname).
    pub id: String,
    /// Its VMM (timeline included).
    pub vmm: VmmProcess,
    /// The connection the ping went over (open, ready for requests).
    pub agent: AgentClient,
    /// Its network (holds its published ports while the handle lives).
    pub net: Option<crate::net::Attachment>,
}

impl Started {
    /// The VMM process id.
    pub fn pid(&self) -> u32 {
        self.vmm.pid()
    }

    /// When each phase ended.
    pub fn timeline(&self) -> &Timeline {
        &self.vmm.timeline
    }

    /// Gives up the process handle: the clone keeps running on its own.
    pub fn release(&mut self) {
        self.vmm.release();
    }
}

/// How to start clones.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// Outlive the calling process (new session, no parent-death signal).
    pub detach: bool,
    /// How long a clone may take to answer.
    pub timeout: Duration,
    /// How many clones to bring up at once.
    pub parallel: usize,
    /// Each clone's cgroup limits.
    pub limits: crate::confine::VmLimits,
    /// Each clone's network.
    pub net: crate::vmnet::NetRequest,
    /// Reset each clone's vsock transport and connect anew instead of
    /// taking over the agent connection carried from the master (what a
    /// Firecracker restore does; `bench clone --connection reset`).
    pub vsock_reset: bool,
}

/// Eight random hex digits: what makes a VM id unique (clones' ids and
/// masters' network leases).
pub(crate) fn random_suffix() -> String {
    let mut b = [0u8; 4];
    // SAFETY: the pointer and length describe `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = now_us() ^ u64::from(std::process::id()) << 32;
        b.copy_from_slice(&t.to_le_bytes()[..4]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Starts reading the master's memory file into the page cache on a
/// thread of its own (off the clone's path). After a host restart or a
/// fresh `snapshot load` the file is not cached, and a clone would fault
/// its pages in from disk one small read at a time; this reads the file's
/// data (what the master touched: its extents by `SEEK_DATA`/`SEEK_HOLE`,
/// never its holes) in large requests. When it is cached, each page costs
/// a lookup (about 6,000 for a master that touched 25 MiB), on another
/// core.
pub fn warm_page_cache(memory: &Path) {
    let memory = memory.to_path_buf();
    let _ = std::thread::Builder::new()
        .name("warm-page-cache".into())
        .spawn(move || {
            if let Ok(f) = std::fs::File::open(&memory) {
                for (off, len) in data_extents(&f) {
                    use std::os::fd::AsRawFd;
                    // SAFETY: an advice call on an fd this thread holds open.
                    unsafe {
                        libc::posix_fadvise(
                            f.as_raw_fd(),
                            off as libc::off_t,
                            len as libc::off_t,
                            libc::POSIX_FADV_WILLNEED,
                        )
                    };
                }
            }
        });
}

/// The `(offset, length)` of each stretch of data in `f` (its holes left
/// out).
fn data_extents(f: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: libc::off_t = 0;
    loop {
        // SAFETY: lseek on an fd `f` holds open.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            return out; // ENXIO: no data from `pos` on
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole <= data {
            return out;
        }
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
}

/// A clone's VMM, spawned but not yet answering.
#[derive(Debug)]
pub struct Spawned {
    /// Its id.
    pub id: String,
    /// Its VMM.
    pub vmm: VmmProcess,
    /// Its network, attached (its identity goes to the agent).
    pub net: Option<crate::net::Attachment>,
}

/// Who owns a clone and what it carries (daemon clones).
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    /// The tenant (`None`: the host's admin).
    pub tenant: Option<String>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// When it is to be killed (Unix seconds).
    pub ttl_deadline_unix_s: Option<u64>,
    /// The id to give it (the scheduler names its instances); `None`:
    /// `MASTER-RANDOM`. An id in use is refused.
    pub id: Option<String>,
    /// Its cgroup limits.
    pub limits: crate::confine::VmLimits,
    /// Its network.
    pub net: crate::vmnet::NetRequest,
    /// Jail it (`None`: as this process's settings say; the benchmark
    /// compares both in one run).
    pub jail: Option<bool>,
    /// Reset its vsock transport instead of carrying the master's agent
    /// connection ([`CloneOptions::vsock_reset`]).
    pub vsock_reset: bool,
}

fn spawn_one(
    store: &Store,
    master: &MasterRecord,
    opts: &CloneOptions,
) -> Result<Spawned, CloneError> {
    let owner = Ownership {
        limits: opts.limits,
        net: opts.net.clone(),
        vsock_reset: opts.vsock_reset,
        ..Ownership::default()
    };
    spawn(store, master, opts.detach, &owner)
}

/// Spawns one clone of `master` (recorded in the store before this
/// returns); [`handshake`] then makes it answer. Dropping the result kills
/// the VMM and removes its files.
pub fn spawn(
    store: &Store,
    master: &MasterRecord,
    detach: bool,
    owner: &Ownership,
) -> Result<Spawned, CloneError> {
    let (id, dir) = loop {
        if let Some(id) = &owner.id {
            check_name(id)?;
            break (id.clone(), store.new_clone_dir(id)?);
        }
        let id = format!("{}-{}", master.name, random_suffix());
        match store.new_clone_dir(&id) {
            Ok(dir) => break (id, dir),
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        }
    };
    let opts = SpawnOptions {
        detach,
        remove_dir_on_drop: true,
        limits: owner.limits,
        jail: owner.jail,
        vsock_reset: owner.vsock_reset,
        ..Default::default()
    };
    warm_page_cache(&master.snapshot.join(snapshotter::MEMORY_FILE));
    let source = VmSource::Restore {
        snapshot: master.snapshot.clone(),
    };
    if !master.net && owner.net.wants_network() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(Box::new(crate::vmnet::VmNetError::NoNic(master.name.clone())).into());
    }
    let mut net = None;
    if master.net && !owner.net.disabled {
        match crate::vmnet::VmNet::take() {
            Ok(n) => net = Some(n),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Box::new(e).into());
            }
        }
    }
    let fds = match net.as_ref().map(|n| n.fds()).transpose() {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(Box::new(e).into());
        }
    };
    let vmm = match VmmProcess::spawn_with_net(source, &dir, &opts, fds) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
    };
    // On error from here the handle's drop kills the VMM and removes the
    // directory; an address already leased is released.
    let attachment = match net {
        Some(mut n) => {
            if let Err(e) = n.attach(&id, owner.tenant.as_deref(), &owner.net, vmm.pid()) {
                crate::vmnet::release(&id);
                return Err(Box::new(e).into());
            }
            n.finish()
        }
        None => None,
    };
    let rec = CloneRecord {
        version: RECORD_VERSION,
        id: id.clone(),
        master: master.name.clone(),
        pid: vmm.pid(),
        pid_start: vmm.start_ticks(),
        created_unix_s: unix_now(),
        tenant: owner.tenant.clone(),
        labels: owner.labels.clone(),
        ttl_deadline_unix_s: owner.ttl_deadline_unix_s,
    };
    // On error the handle's drop kills the VMM and removes the directory.
    if let Err(e) = crate::store::write_record(&dir.join("clone.json"), &rec) {
        crate::vmnet::release(&id);
        return Err(e.into());
    }
    Ok(Spawned {
        id,
        vmm,
        net: attachment,
    })
}

fn exit_message(dir: &Path) -> String {
    if let Some(reason) = crate::confine::ended_reason(dir) {
        return reason;
    }
    vmm::read_events(dir)
        .into_iter()
        .find_map(|e| match e {
            Event::Exit {
                reason, message, ..
            } => Some(format!("{message} ({reason:?})")),
            _ => None,
        })
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.join(vmm::files::VMM_LOG)).unwrap_or_default();
            let last = log
                .lines()
                .last()
                .unwrap_or("the VMM ended without saying why");
            last.to_string()
        })
}

/// Waits for the spawned clone's agent, gives it its identity, pings it,
/// all within `timeout`.
pub fn handshake(s: Spawned, timeout: Duration) -> Result<Started, CloneError> {
    let Spawned { id, mut vmm, net } = s;
    let net_identity = net.as_ref().map(|a| a.identity.clone());
    let deadline = Instant::now() + timeout;
    let uds = vmm.vsock_path();
    let mut last = String::from("no vsock socket yet");
    let (agent, [connected_us, identity_us, ping_us]) = loop {
        if let Some(end) = vmm.poll() {
            let message = format!("{} ({:?})", end.message, end.reason);
            return Err(CloneError::Died { id, message });
        }
        if Instant::now() >= deadline {
            return Err(CloneError::Timeout { id, timeout, last });
        }
        if uds.exists() {
            let left = deadline.saturating_duration_since(Instant::now());
            let identity = || {
                let mut i = fresh_identity(&id, &id)?;
                i.net = net_identity.clone();
                Ok(i)
            };
            match AgentClient::connect_identified(&uds, identity, left) {
                Ok(r) => break r,
                // The agent refused the identity, or no entropy could be
                // read: no point in retrying.
                Err(source @ (AgentError::Remote { .. } | AgentError::Output(_))) => {
                    return Err(CloneError::Agent { id, source });
                }
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    vmm.poll();
    vmm.timeline.connected_us = Some(connected_us);
    vmm.timeline.identity_us = Some(identity_us);
    vmm.timeline.ping_us = Some(ping_us);
    vmm.timeline.identity = agent.identity_timings.unwrap_or_default();
    Ok(Started {
        id,
        vmm,
        agent,
        net,
    })
}

/// Starts `count` clones of master `name`, `opts.parallel` at a time. Each
/// result is one clone; a clone that fails leaves nothing behind.
pub fn start(
    store: &Store,
    name: &str,
    count: usize,
    opts: &CloneOptions,
) -> Result<Vec<Result<Started, CloneError>>, CloneError> {
    let master = store.master(name)?;
    let parallel = opts.parallel.max(1);
    let timeout = opts.timeout;
    let mut results: Vec<Option<Result<Started, CloneError>>> = (0..count).map(|_| None).collect();
    // A pipeline, not batches: as soon as one clone answered (or failed)
    // the next is spawned, so `parallel` clones are always on their way
    // and a slow one holds up no other.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        let (mut next, mut in_flight) = (0, 0);
        loop {
            // Spawned from this thread: a child's parent-death signal
            // follows the thread that forked it.
            while next < count && in_flight < parallel {
                let i = next;
                next += 1;
                match spawn_one(store, &master, opts) {
                    Ok(s) => {
                        in_flight += 1;
                        let tx = tx.clone();
                        scope.spawn(move || {
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                handshake(s, timeout)
                            }))
                            .unwrap_or_else(|_| {
                                Err(CloneError::NotRunning("(handshake thread panicked)".into()))
                            });
                            let _ = tx.send((i, r));
                        });
                    }
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            if in_flight == 0 {
                break;
            }
            // Every handshake thread sends once, and this thread holds a
            // sender too: the channel cannot close under us.
            let Ok((i, r)) = rx.recv() else { break };
            results[i] = Some(r);
            in_flight -= 1;
        }
    });
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(CloneError::NotRunning("(never started)".into()))))
        .collect())
}

/// A live clone's agent.
pub fn connect(store: &Store, id: &str) -> Result<AgentClient, CloneError> {
    let rec = store.clone_record(id)?;
    if !rec.alive() {
        return Err(CloneError::NotRunning(id.to_string()));
    }
    AgentClient::connect(&store.clone_dir(id).join("vsock.sock")).map_err(|source| {
        CloneError::Agent {
            id: id.to_string(),
            source,
        }
    })
}

/// Kills clone `id` (if it still runs) and removes its files.
pub fn kill(store: &Store, id: &str) -> Result<(), CloneError> {
    let rec = store.clone_record(id)?;
    // Through a pidfd, and only if the pid is still the clone's VMM.
    vmm::kill_process(rec.pid, rec.pid_start);
    let dir = store.clone_dir(id);
    crate::confine::release_dir(&dir);
    crate::vmnet::release(id);
    std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })?;
    Ok(())
}

/// What `ps` shows for one clone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CloneStatus {
    /// Id.
    pub id: String,
    /// Master.
    pub master: String,
    /// VMM pid.
    pub pid: u32,
    /// `running`, or `exited: <why>`.
    pub state: String,
    /// Seconds since it started.
    pub age_s: u64,
    /// Memory only this clone uses: Private_Dirty of the VMM process (its
    /// copy-on-write guest pages plus the VMM's own heap and stacks), KiB.
    /// Guest pages it only read are the master's page cache, shared by
    /// every clone, and counted in `pss_kib` only.
    pub private_kib: Option<u64>,
    /// Proportional set size of the VMM process, KiB.
    pub pss_kib: Option<u64>,
}

/// Every clone in the store.
pub fn ps(store: &Store) -> Vec<Result<CloneStatus, StoreError>> {
    let now = unix_now();
    store
        .clones()
        .into_iter()
        .map(|r| {
            r.map(|rec| {
                let alive = rec.alive();
                CloneStatus {
                    state: if alive {
                        "running".into()
                    } else {
                        format!("exited: {}", exit_message(&store.clone_dir(&rec.id)))
                    },
                    private_kib: alive
                        .then(|| procfs::smaps_rollup(rec.pid, "Private_Dirty"))
                        .flatten(),
                    pss_kib: alive
                        .then(|| procfs::smaps_rollup(rec.pid, "Pss"))
                        .flatten(),
                    age_s: now.saturating_sub(rec.created_unix_s),
                    id: rec.id,
                    master: rec.master,
                    pid: rec.pid,
                }
            })
        })
        .collect()
}

/// One clone of [`spawn_burst`].
#[derive(Debug, Clone)]
pub struct BurstClone {
    /// Its id (kill it with [`kill`]).
    pub id: String,
    /// When its VMM was spawned (CLOCK_MONOTONIC µs).
    pub spawn_us: u64,
    /// When its vCPU 0 resumed the guest, if it did within the timeout.
    pub running_us: Option<u64>,
}

/// Starts `count` clones of master `name` as fast as this host can, without
/// waiting for their agents: measures the host's side of clone creation
/// (process, mapping, KVM and device restore). The clones get no identity:
/// they are for measuring only, and the caller kills them.
pub fn spawn_burst(
    store: &Store,
    name: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<BurstClone>, CloneError> {
    let master = store.master(name)?;
    let mut spawned = Vec::with_capacity(count);
    for _ in 0..count {
        // On error the clones spawned so far are killed as their handles drop.
        let opts = CloneOptions {
            detach: false,
            timeout,
            parallel: 1,
            limits: Default::default(),
            net: Default::default(),
            vsock_reset: false,
        };
        spawned.push(spawn_one(store, &master, &opts)?);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline
        && spawned
            .iter_mut()
            .any(|s| s.vmm.poll().is_none() && s.vmm.timeline.vcpu_running_us.is_none())
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(spawned
        .into_iter()
        .map(|mut s| {
            // The caller kills them by id.
            s.vmm.release();
            BurstClone {
                id: s.id,
                spawn_us: s.vmm.timeline.spawn_us,
                running_us: s.vmm.timeline.vcpu_running_us,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn data_extents_skip_the_holes() {
        let path = std::env::temp_dir().join(format!("zygote-extents-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.write_all_at(&[2; 8192], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let ext = data_extents(&std::fs::File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        // Filesystems may round extents to their blocks; the data is
        // covered and the holes between are not read.
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert!(
            ext[0].0 == 0 && ext[0].1 >= 4096 && ext[0].1 < 1 << 20,
            "{ext:?}"
        );
        let (off, len) = ext[1];
        assert!(off <= 4 << 20 && off + len >= (4 << 20) + 8192, "{ext:?}");
        assert!(off + len < 8 << 20, "{ext:?}");
        // A missing file is no error.
        warm_page_cache(&path);
    }
}
