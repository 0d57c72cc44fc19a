//! The host runtime as a long-lived service: what the daemon serves. It
//! owns every master and clone of one state directory, by tenant; admits
//! clone requests (start slots, memory, quotas); supervises every VMM
//! through its pidfd (a death is noticed at once: the instance becomes
//! `failed` with its exit reason and console tail, its files are freed);
//! enforces TTLs; and on start adopts the clones a previous daemon left
//! running (matched by pid and start time) and removes what is dead.
//!
//! Calls block (a clone start waits for the guest's agent): the HTTP layer
//! runs them on blocking threads. Another tenant's objects are reported as
//! not found, never as forbidden.
//!
//! It must not: speak HTTP or know about tokens (it gets a [`Tenant`]),
//! touch KVM, or keep a VMM alive that nobody can see (every VMM it starts
//! is in the store and in its table).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use proto::events::ExitReason;
use proto::ExecRequest;
use serde::Serialize;

use crate::agent::{AgentClient, AgentError};
use crate::clone::{self, CloneError, Ownership};
use crate::master::{self, CreateOptions, MasterError, Phase};
use crate::metrics::{KindLabel, Metrics, StateLabel};
use crate::procfs;
use crate::store::{unix_now, MasterRecord, Store, StoreError};
use crate::vmm::{self, Timeline, VmSpec, VmmProcess};

/// Settings of a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Clones that may be starting at once on this host; a request that
    /// finds none free is refused ([`RuntimeError::Busy`]).
    pub max_starting: usize,
    /// Guest memory of live VMs may reach this fraction of host RAM; a
    /// clone or master beyond it is refused ([`RuntimeError::Memory`]).
    pub memory_ratio: f64,
    /// How long a clone may take to answer.
    pub clone_timeout: Duration,
    /// How long a master's cold boot may take.
    pub boot_timeout: Duration,
    /// How many clones one request starts at once (within the slots).
    pub parallel: usize,
}

/// The default number of clones starting at once: twice the CPUs, 2 to
/// 64. A clone's start is guest work; more in flight than the CPUs can run
/// only makes each one slower (measured with `zygote bench scale` on 2
/// CPUs: 16 slots a host gave 2.1 clones/s, 4 gave 3.5/s and a 7× lower p50).
pub fn default_max_starting() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 2).clamp(2, 64)
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_starting: default_max_starting(),
            memory_ratio: 1.5,
            clone_timeout: Duration::from_secs(120),
            boot_timeout: Duration::from_secs(300),
            parallel: 8,
        }
    }
}

/// Who is asking, with their limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Tenant name (`admin` for the host's admin).
    pub name: String,
    /// The host's admin: owns what the local CLI made, sees everything.
    pub admin: bool,
    /// Most live instances it may have.
    pub max_instances: Option<usize>,
    /// Most guest memory its live instances may use, MiB.
    pub max_memory_mib: Option<u64>,
}

impl Tenant {
    /// The host's admin (the Unix socket's caller, the local CLI).
    pub fn admin() -> Self {
        Tenant {
            name: "admin".into(),
            admin: true,
            max_instances: None,
            max_memory_mib: None,
        }
    }

    fn owner(&self) -> Option<String> {
        (!self.admin).then(|| self.name.clone())
    }

    fn owns(&self, owner: &Option<String>) -> bool {
        match owner {
            None => self.admin,
            Some(t) => self.admin || *t == self.name,
        }
    }
}

/// Errors of the runtime, each mapped to one HTTP status by the api crate.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such object for this tenant.
    #[error("no {what} {id:?}")]
    NotFound {
        /// `master` or `instance`.
        what: &'static str,
        /// What was asked for.
        id: String,
    },
    /// The request conflicts with the object's state.
    #[error("{0}")]
    Conflict(String),
    /// A tenant quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// Every start slot is in use: try again later.
    #[error("all {slots} start slots of this host are in use; retry in {retry_after_s} s")]
    Busy {
        /// Slots on this host.
        slots: usize,
        /// Suggested wait.
        retry_after_s: u64,
    },
    /// The host's memory limit would be exceeded.
    #[error("{0}")]
    Memory(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Masters.
    #[error(transparent)]
    Master(#[from] MasterError),
    /// Clones.
    #[error(transparent)]
    Clone(#[from] CloneError),
    /// The agent.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The state directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VMM.
    #[error(transparent)]
    Vm(#[from] vmm::VmError),
}

/// State of an instance (a clone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Spawned, not answering yet.
    Starting,
    /// Its agent answered.
    Running,
    /// The guest shut down.
    Exited,
    /// It did not start, or its VMM died.
    Failed,
}

impl InstanceState {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Running => "running",
            InstanceState::Exited => "exited",
            InstanceState::Failed => "failed",
        }
    }

    /// Parses a state name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            InstanceState::Starting,
            InstanceState::Running,
            InstanceState::Exited,
            InstanceState::Failed,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// Milliseconds from the VMM's spawn to each phase of a clone's start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Timings {
    /// The VMM process ran.
    pub started_ms: Option<f64>,
    /// vCPUs resumed the guest.
    pub running_ms: Option<f64>,
    /// The agent's hello arrived.
    pub connected_ms: Option<f64>,
    /// The identity was applied.
    pub identity_ms: Option<f64>,
    /// The agent answered a ping: the instance is running.
    pub ready_ms: Option<f64>,
}

impl From<&Timeline> for Timings {
    fn from(t: &Timeline) -> Self {
        Timings {
            started_ms: t.ms_since_spawn(t.started_us),
            running_ms: t.ms_since_spawn(t.vcpu_running_us),
            connected_ms: t.ms_since_spawn(t.connected_us),
            identity_ms: t.ms_since_spawn(t.identity_us),
            ready_ms: t.ms_since_spawn(t.ping_us),
        }
    }
}

/// Memory of a live instance's VMM process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MemoryUse {
    /// Pages only this instance has (its copy-on-write guest pages and the
    /// VMM's heap): `Private_Dirty`, KiB.
    pub private_kib: u64,
    /// Resident pages shared with others (the master's, read-only), KiB.
    pub shared_kib: u64,
    /// Guest RAM it was given, MiB.
    pub guest_mib: u64,
}

/// One instance as reported.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstanceInfo {
    /// Id (also the guest's hostname).
    pub id: String,
    /// The master's name.
    pub master: String,
    /// State.
    pub state: InstanceState,
    /// Why it failed or exited.
    pub reason: Option<String>,
    /// The last console lines of a failed instance.
    pub console_tail: Option<Vec<String>>,
    /// VMM process id (while it runs).
    pub pid: Option<u32>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created (Unix seconds).
    pub created_unix_s: u64,
    /// When its TTL ends (Unix seconds).
    pub ttl_deadline_unix_s: Option<u64>,
    /// Start phases (none for an adopted instance's earlier life).
    pub timings: Timings,
    /// Memory, while it runs.
    pub memory: Option<MemoryUse>,
    /// Its network (a clone of a master with a NIC that was given one).
    pub net: Option<InstanceNet>,
}

/// An instance's network, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InstanceNet {
    /// Its IPv4 address, reachable from the host (and from its tenant's
    /// other instances when both asked for `peers`).
    pub address: String,
    /// Its MAC address (derived from its id).
    pub mac: String,
    /// Host ports forwarded to it.
    pub ports: Vec<InstancePort>,
    /// Whether it may reach beyond the host.
    pub egress: bool,
    /// Whether it may reach its tenant's other instances that asked for peers.
    pub peers: bool,
}

/// A host port forwarded to an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InstancePort {
    /// The host's port.
    pub host_port: u16,
    /// The instance's port.
    pub guest_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl InstanceNet {
    fn new(
        address: std::net::Ipv4Addr,
        mac: proto::launch::MacAddr,
        ports: &[crate::net::Publish],
        egress: bool,
        peers: bool,
    ) -> InstanceNet {
        InstanceNet {
            address: address.to_string(),
            mac: mac.to_string(),
            ports: ports
                .iter()
                .map(|p| InstancePort {
                    host_port: p.host_port,
                    guest_port: p.guest_port,
                    protocol: p.protocol.to_string(),
                })
                .collect(),
            egress,
            peers,
        }
    }

    /// What an attached clone was given.
    fn attached(a: &crate::net::Attachment, req: &crate::vmnet::NetRequest) -> InstanceNet {
        InstanceNet::new(
            a.identity.address,
            a.identity.mac,
            &a.published,
            req.egress,
            req.peers,
        )
    }

    /// What a running clone holds, from its lease (an adopted clone).
    fn leased(vm_id: &str) -> Option<InstanceNet> {
        let lease = crate::vmnet::network().ok()?.lease(vm_id).ok()??;
        Some(InstanceNet::new(
            lease.address,
            proto::launch::MacAddr::derived(vm_id),
            &lease.publish,
            lease.egress,
            lease.peers,
        ))
    }
}

/// Status of a master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MasterStatus {
    /// Cold boot.
    Booting,
    /// Warm-up running (then the freeze).
    Warming,
    /// Frozen: clones can start.
    Frozen,
    /// It could not be made.
    Failed,
}

/// One master as reported.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MasterInfo {
    /// Name (as its owner knows it).
    pub name: String,
    /// Status.
    pub status: MasterStatus,
    /// Why it failed.
    pub reason: Option<String>,
    /// Last console or warm-up lines of a failed master.
    pub console_tail: Option<Vec<String>>,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Warm-up command.
    pub warmup: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Live clones.
    pub clones_alive: usize,
    /// Bytes of its snapshot on disk (memory actually stored + state).
    pub snapshot_bytes: Option<u64>,
    /// Cold boot to agent ready, ms.
    pub boot_ms: Option<f64>,
    /// Warm-up, ms.
    pub warmup_ms: Option<f64>,
    /// When it was made (Unix seconds).
    pub created_unix_s: u64,
}

/// What a new master is.
#[derive(Debug, Clone)]
pub struct MasterRequest {
    /// Name.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Warm-up shell command.
    pub warmup: Option<String>,
    /// How long the warm-up may take.
    pub warmup_timeout: Duration,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// A network device (and what the warm-up's network allows); `None`:
    /// no NIC, and its clones have no network.
    pub net: Option<crate::vmnet::NetRequest>,
}

/// What new instances are.
#[derive(Debug, Clone)]
pub struct InstancesRequest {
    /// The master's name.
    pub master: String,
    /// How many.
    pub count: usize,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Kill each after this long.
    pub ttl: Option<Duration>,
    /// The id to give the one instance asked for (`count` must be 1); an
    /// id in use, even by an ended instance still listed, is refused.
    pub id: Option<String>,
    /// Each instance's cgroup limits.
    pub limits: crate::confine::VmLimits,
    /// Each instance's network.
    pub net: crate::vmnet::NetRequest,
}

/// Filters of an instance listing.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    /// Only this master's.
    pub master: Option<String>,
    /// Only in this state.
    pub state: Option<InstanceState>,
    /// Only with all these labels.
    pub labels: BTreeMap<String, String>,
}

/// The result of a short exec.
#[derive(Debug, Clone, Serialize)]
pub struct ExecOutput {
    /// Exit code (when it exited).
    pub exit_code: Option<i32>,
    /// Signal (when one ended it).
    pub signal: Option<i32>,
    /// Whether the timeout ended it.
    pub timed_out: bool,
    /// Standard output (up to the cap).
    pub stdout: Vec<u8>,
    /// Standard error (up to the cap).
    pub stderr: Vec<u8>,
    /// Whether stdout went past the cap (the rest was discarded).
    pub stdout_truncated: bool,
    /// Whether stderr went past the cap.
    pub stderr_truncated: bool,
}

/// Most bytes of each stream a short exec returns.
pub const EXEC_OUTPUT_CAP: usize = 4 << 20;

/// The host's resources as reported.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HostInfo {
    /// Host RAM, MiB.
    pub memory_total_mib: u64,
    /// Guest RAM promised to live instances and masters being made, MiB.
    pub memory_committed_mib: u64,
    /// Most guest RAM that may be committed (ratio × total), MiB.
    pub memory_limit_mib: u64,
    /// Memory only clones have (their own pages), MiB.
    pub memory_private_mib: u64,
    /// Master pages mapped by clones (counted once), MiB.
    pub memory_shared_mib: u64,
    /// CPUs.
    pub cpus: usize,
    /// Masters by name (frozen ones).
    pub masters: Vec<String>,
    /// Instances by state.
    pub instances: BTreeMap<String, usize>,
    /// Start slots in use.
    pub start_slots_in_use: usize,
    /// Start slots.
    pub start_slots: usize,
}

/// A counting semaphore for start slots.
#[derive(Debug)]
struct Slots {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn try_take(&self) -> bool {
        let mut u = lock(&self.used);
        if *u < self.max {
            *u += 1;
            true
        } else {
            false
        }
    }

    fn take(&self) {
        let mut u = lock(&self.used);
        while *u >= self.max {
            u = self.freed.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        *u += 1;
    }

    fn give(&self) {
        *lock(&self.used) -= 1;
        self.freed.notify_one();
    }

    fn in_use(&self) -> usize {
        *lock(&self.used)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Instance {
    id: String,
    /// The master's store name.
    master: String,
    /// The master's name as its owner knows it.
    master_name: String,
    owner: Option<String>,
    labels: BTreeMap<String, String>,
    guest_mib: u64,
    state: InstanceState,
    reason: Option<String>,
    console_tail: Option<Vec<String>>,
    created_unix_s: u64,
    ttl_deadline_unix_s: Option<u64>,
    timeline: Timeline,
    vmm: Option<VmmProcess>,
    agent: Option<SharedAgent>,
    memory_cache: Option<(Instant, MemoryUse)>,
    ended_at: Option<Instant>,
    net: Option<InstanceNet>,
}

/// An instance's kept agent connection (reconnected when it broke).
type SharedAgent = Arc<Mutex<Option<AgentClient>>>;

#[derive(Debug, Clone)]
struct MasterEntry {
    store_name: String,
    name: String,
    owner: Option<String>,
    status: MasterStatus,
    reason: Option<String>,
    console_tail: Option<Vec<String>>,
    memory_mib: u64,
    vcpus: u8,
    warmup: Option<String>,
    labels: BTreeMap<String, String>,
    boot_ms: Option<f64>,
    warmup_ms: Option<f64>,
    created_unix_s: u64,
    snapshot: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Tables {
    instances: HashMap<String, Instance>,
    masters: HashMap<String, MasterEntry>,
}

/// Ended instances kept for inspection, at most.
const KEEP_ENDED: usize = 1000;

/// The runtime. Share it in an `Arc`.
#[derive(Debug)]
pub struct Runtime {
    store: Store,
    cfg: RuntimeConfig,
    tables: Mutex<Tables>,
    slots: Slots,
    metrics: Arc<Metrics>,
    watcher: crate::supervise::Watcher,
    stopping: AtomicBool,
}

/// What the runtime found when it opened its state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Live clones taken over.
    pub adopted: usize,
    /// Dead clones whose files were removed.
    pub cleaned: usize,
    /// Masters found.
    pub masters: usize,
}

impl Runtime {
    /// Opens the runtime over `store`: adopts live clones, cleans dead ones,
    /// and starts supervising.
    pub fn open(
        store: Store,
        cfg: RuntimeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, Adoption), RuntimeError> {
        let watcher = crate::supervise::Watcher::new().map_err(|e| {
            RuntimeError::Store(StoreError::Io {
                path: "epoll".into(),
                source: e,
            })
        })?;
        let rt = Arc::new(Runtime {
            slots: Slots {
                max: cfg.max_starting.max(1),
                used: Mutex::new(0),
                freed: Condvar::new(),
            },
            store,
            cfg,
            tables: Mutex::new(Tables::default()),
            metrics,
            watcher,
            stopping: AtomicBool::new(false),
        });
        let adoption = rt.adopt();
        crate::supervise::start(&rt);
        Ok((rt, adoption))
    }

    /// The state directory.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn adopt(&self) -> Adoption {
        let mut found = Adoption::default();
        // Masters being made by a daemon that was killed: their VMMs died
        // with it; their runtime directories did not.
        found.cleaned += vmm::remove_abandoned_runtime_dirs(&self.store.root().join("vms"));
        // Cgroups and uids of VMs that ended while no daemon watched them.
        let swept = crate::confine::sweep();
        if swept > 0 {
            tracing::info!(
                swept,
                "took back the cgroups and uids of VMs that ended unwatched"
            );
        }
        let mut t = lock(&self.tables);
        for m in self.store.masters().into_iter().flatten() {
            found.masters += 1;
            t.masters.insert(m.name.clone(), entry_of(&m));
        }
        for rec in self.store.clones().into_iter().flatten() {
            let dir = self.store.clone_dir(&rec.id);
            let vmm = rec
                .alive()
                .then(|| VmmProcess::adopt(&dir, rec.pid, rec.pid_start).ok())
                .flatten();
            let Some(vmm) = vmm else {
                let _ = std::fs::remove_dir_all(&dir);
                found.cleaned += 1;
                continue;
            };
            found.adopted += 1;
            let (guest_mib, master_name) = t
                .masters
                .get(&rec.master)
                .map(|m| (m.memory_mib, m.name.clone()))
                .unwrap_or((0, rec.master.clone()));
            if let Some(fd) = vmm.pidfd() {
                let _ = self.watcher.watch(&rec.id, fd);
            }
            let had_nic = self.store.master(&rec.master).is_ok_and(|m| m.net);
            let net = had_nic.then(|| InstanceNet::leased(&rec.id)).flatten();
            t.instances.insert(
                rec.id.clone(),
                Instance {
                    id: rec.id.clone(),
                    master: rec.master.clone(),
                    master_name,
                    owner: rec.tenant.clone(),
                    labels: rec.labels.clone(),
                    guest_mib,
                    state: InstanceState::Running,
                    reason: None,
                    console_tail: None,
                    created_unix_s: rec.created_unix_s,
                    ttl_deadline_unix_s: rec.ttl_deadline_unix_s,
                    timeline: vmm.timeline,
                    vmm: Some(vmm),
                    agent: Some(Arc::new(Mutex::new(None))),
                    memory_cache: None,
                    ended_at: None,
                    net,
                },
            );
        }
        found
    }

    // ------------------------------------------------------------ masters

    fn store_name(tenant: &Tenant, name: &str) -> String {
        match tenant.owner() {
            None => name.to_string(),
            Some(t) => format!("{name}.{t}"),
        }
    }

    /// A master as `viewer` sees it: a tenant by the name it gave, the
    /// host's admin (who sees every tenant's) by its name on this host.
    fn master_info(&self, t: &Tables, m: &MasterEntry, viewer: &Tenant) -> MasterInfo {
        let clones_alive = t
            .instances
            .values()
            .filter(|i| {
                i.master == m.store_name
                    && matches!(i.state, InstanceState::Starting | InstanceState::Running)
            })
            .count();
        MasterInfo {
            name: if viewer.admin {
                m.store_name.clone()
            } else {
                m.name.clone()
            },
            status: m.status,
            reason: m.reason.clone(),
            console_tail: m.console_tail.clone(),
            memory_mib: m.memory_mib,
            vcpus: m.vcpus,
            warmup: m.warmup.clone(),
            labels: m.labels.clone(),
            clones_alive,
            snapshot_bytes: m.snapshot.as_deref().map(dir_bytes),
            boot_ms: m.boot_ms,
            warmup_ms: m.warmup_ms,
            created_unix_s: m.created_unix_s,
        }
    }

    fn find_master<'a>(
        &self,
        t: &'a Tables,
        tenant: &Tenant,
        name: &str,
    ) -> Result<&'a MasterEntry, RuntimeError> {
        let not_found = || RuntimeError::NotFound {
            what: "master",
            id: name.to_string(),
        };
        // The admin may name any master by its store name.
        let m = t
            .masters
            .get(&Self::store_name(tenant, name))
            .or_else(|| tenant.admin.then(|| t.masters.get(name)).flatten())
            .ok_or_else(not_found)?;
        if tenant.owns(&m.owner) {
            Ok(m)
        } else {
            Err(not_found())
        }
    }

    /// Starts making a master (cold boot, warm-up, freeze) in the
    /// background; returns at once with status `booting`.
    pub fn create_master(
        self: &Arc<Self>,
        tenant: &Tenant,
        req: MasterRequest,
    ) -> Result<MasterInfo, RuntimeError> {
        let store_name = Self::store_name(tenant, &req.name);
        crate::store::check_name(&req.name)?;
        crate::store::check_name(&store_name).map_err(|_| {
            RuntimeError::Invalid(format!(
                "master name {:?} is too long for tenant {:?} (name + '.' + tenant must fit 40 characters)",
                req.name, tenant.name
            ))
        })?;
        let mut spec = VmSpec::new(None, None, req.memory_mib, req.vcpus)?;
        spec.runtime_root = Some(self.store.root().join("vms"));
        let entry = {
            let mut t = lock(&self.tables);
            // A master that failed to be made gives its name back.
            if t.masters
                .get(&store_name)
                .is_some_and(|m| m.status == MasterStatus::Failed)
            {
                t.masters.remove(&store_name);
            }
            if t.masters.contains_key(&store_name) || self.store.master_dir(&store_name).exists() {
                return Err(RuntimeError::Conflict(format!(
                    "a master named {:?} exists already",
                    req.name
                )));
            }
            self.admit_memory(&t, tenant, req.memory_mib, 1)?;
            let entry = MasterEntry {
                store_name: store_name.clone(),
                name: req.name.clone(),
                owner: tenant.owner(),
                status: MasterStatus::Booting,
                reason: None,
                console_tail: None,
                memory_mib: req.memory_mib,
                vcpus: req.vcpus,
                warmup: req.warmup.clone(),
                labels: req.labels.clone(),
                boot_ms: None,
                warmup_ms: None,
                created_unix_s: unix_now(),
                snapshot: None,
            };
            t.masters.insert(store_name.clone(), entry.clone());
            entry
        };
        let opts = CreateOptions {
            name: store_name.clone(),
            spec,
            warmup: req.warmup,
            boot_timeout: self.cfg.boot_timeout,
            warmup_timeout: req.warmup_timeout,
            tenant: tenant.owner(),
            display_name: tenant.owner().map(|_| req.name.clone()),
            labels: req.labels,
            net: req.net,
        };
        let rt = self.clone();
        let info = self.master_info(&lock(&self.tables), &entry, tenant);
        tracing::info!(master = %store_name, tenant = %tenant.name, memory_mib = req.memory_mib, "making a master");
        std::thread::Builder::new()
            .name(format!("master-{store_name}"))
            .spawn(move || rt.make_master(opts))
            .map_err(|e| {
                lock(&self.tables).masters.remove(&store_name);
                RuntimeError::Conflict(format!("cannot start a thread: {e}"))
            })?;
        Ok(info)
    }

    fn make_master(&self, opts: CreateOptions) {
        let name = opts.name.clone();
        let started = Instant::now();
        let mut warmup_out = TailBuffer::new(16 * 1024);
        let result = master::create(&self.store, &opts, &mut warmup_out, &mut |phase, _| {
            let status = match phase {
                Phase::Booting => MasterStatus::Booting,
                Phase::Warming => MasterStatus::Warming,
                Phase::Frozen => return,
            };
            if let Some(m) = lock(&self.tables).masters.get_mut(&name) {
                m.status = status;
            }
        });
        let mut t = lock(&self.tables);
        let Some(m) = t.masters.get_mut(&name) else {
            return;
        };
        match result {
            Ok(rec) => {
                self.metrics
                    .cold_boot
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    master = %name,
                    boot_ms = rec.boot_ms,
                    warmup_ms = rec.warmup_ms,
                    "master frozen"
                );
                *m = entry_of(&rec);
            }
            Err(e) => {
                tracing::warn!(master = %name, "master failed: {e}");
                m.status = MasterStatus::Failed;
                m.reason = Some(e.to_string());
                let out = warmup_out.lines(12);
                m.console_tail = (!out.is_empty()).then_some(out);
            }
        }
    }

    /// Every master of `tenant`.
    pub fn masters(&self, tenant: &Tenant) -> Vec<MasterInfo> {
        let t = lock(&self.tables);
        let mut v: Vec<MasterInfo> = t
            .masters
            .values()
            .filter(|m| tenant.owns(&m.owner))
            .map(|m| self.master_info(&t, m, tenant))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One master.
    pub fn master(&self, tenant: &Tenant, name: &str) -> Result<MasterInfo, RuntimeError> {
        let t = lock(&self.tables);
        let m = self.find_master(&t, tenant, name)?;
        Ok(self.master_info(&t, m, tenant))
    }

    /// Removes a master: refused while it is being made, or while clones of
    /// it live unless `force` (they keep running).
    pub fn delete_master(
        &self,
        tenant: &Tenant,
        name: &str,
        force: bool,
    ) -> Result<(), RuntimeError> {
        let mut t = lock(&self.tables);
        let m = self.find_master(&t, tenant, name)?;
        let info = self.master_info(&t, m, tenant);
        if matches!(m.status, MasterStatus::Booting | MasterStatus::Warming) {
            return Err(RuntimeError::Conflict(format!(
                "master {name:?} is still being made ({:?})",
                m.status
            )));
        }
        if info.clones_alive > 0 && !force {
            return Err(RuntimeError::Conflict(format!(
                "{} clone(s) of master {name:?} are alive: delete them first, or pass force=true (they keep running)",
                info.clones_alive
            )));
        }
        let store_name = m.store_name.clone();
        if m.status == MasterStatus::Frozen {
            let rec = self.store.master(&store_name).ok();
            self.store.remove_master(&store_name)?;
            if let Some(rec) = rec {
                rec.release_net();
            }
        }
        t.masters.remove(&store_name);
        Ok(())
    }

    /// Writes a frozen master's snapshot to the new directory `dst`.
    pub fn save_master(
        &self,
        tenant: &Tenant,
        name: &str,
        dst: &std::path::Path,
    ) -> Result<snapshotter::SaveStats, RuntimeError> {
        let store_name = {
            let t = lock(&self.tables);
            let m = self.find_master(&t, tenant, name)?;
            if m.status != MasterStatus::Frozen {
                return Err(RuntimeError::Conflict(format!(
                    "master {name:?} is not frozen yet"
                )));
            }
            m.store_name.clone()
        };
        Ok(master::save(&self.store, &store_name, dst)?)
    }

    /// The snapshot directory of a frozen master (what a peer is sent).
    pub fn master_snapshot(&self, tenant: &Tenant, name: &str) -> Result<PathBuf, RuntimeError> {
        let t = lock(&self.tables);
        let m = self.find_master(&t, tenant, name)?;
        match (&m.snapshot, m.status) {
            (Some(dir), MasterStatus::Frozen) => Ok(dir.clone()),
            _ => Err(RuntimeError::Conflict(format!(
                "master {name:?} is not frozen yet"
            ))),
        }
    }

    /// The name master `name` of `tenant` has in the store (what a
    /// transfer to it is kept under); checks the name.
    pub fn master_store_name(&self, tenant: &Tenant, name: &str) -> Result<String, RuntimeError> {
        crate::store::check_name(name)?;
        let store_name = Self::store_name(tenant, name);
        crate::store::check_name(&store_name).map_err(|_| {
            RuntimeError::Invalid(format!(
                "master name {name:?} is too long for tenant {:?} (name + '.' + tenant must fit 40 characters)",
                tenant.name
            ))
        })?;
        Ok(store_name)
    }

    /// Registers the snapshot in `dir` as a master of `tenant`.
    pub fn load_master(
        &self,
        tenant: &Tenant,
        dir: &std::path::Path,
        name: &str,
    ) -> Result<MasterInfo, RuntimeError> {
        self.register_master(tenant, dir, name, false)
    }

    /// As [`Runtime::load_master`] for a snapshot received from a peer
    /// (`host::transfer`): the directory is moved into the master's own.
    pub fn receive_master(
        &self,
        tenant: &Tenant,
        dir: &std::path::Path,
        name: &str,
    ) -> Result<MasterInfo, RuntimeError> {
        self.register_master(tenant, dir, name, true)
    }

    fn register_master(
        &self,
        tenant: &Tenant,
        dir: &std::path::Path,
        name: &str,
        take: bool,
    ) -> Result<MasterInfo, RuntimeError> {
        let store_name = Self::store_name(tenant, name);
        crate::store::check_name(name)?;
        if lock(&self.tables).masters.contains_key(&store_name) {
            return Err(RuntimeError::Conflict(format!(
                "a master named {name:?} exists already"
            )));
        }
        let mut rec = if take {
            master::load_moving(&self.store, dir, &store_name)?
        } else {
            master::load(&self.store, dir, Some(&store_name))?
        };
        if tenant.owner().is_some() {
            rec.tenant = tenant.owner();
            rec.display_name = Some(name.to_string());
            crate::store::write_record(
                &self.store.master_dir(&store_name).join("master.json"),
                &rec,
            )?;
        }
        let mut t = lock(&self.tables);
        let entry = entry_of(&rec);
        let info = self.master_info(&t, &entry, tenant);
        t.masters.insert(store_name, entry);
        Ok(info)
    }

    // ---------------------------------------------------------- instances

    fn committed_mib(t: &Tables, owner: Option<&Option<String>>) -> u64 {
        let live = t
            .instances
            .values()
            .filter(|i| owner.is_none_or(|o| i.owner == *o))
            .filter(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running))
            .map(|i| i.guest_mib);
        let making = t
            .masters
            .values()
            .filter(|m| owner.is_none_or(|o| m.owner == *o))
            .filter(|m| matches!(m.status, MasterStatus::Booting | MasterStatus::Warming))
            .map(|m| m.memory_mib);
        live.chain(making).sum()
    }

    fn memory_limit_mib(&self) -> u64 {
        (procfs::host_memory_mib() as f64 * self.cfg.memory_ratio) as u64
    }

    fn admit_memory(
        &self,
        t: &Tables,
        tenant: &Tenant,
        guest_mib: u64,
        count: usize,
    ) -> Result<(), RuntimeError> {
        let want = guest_mib.saturating_mul(count as u64);
        let committed = Self::committed_mib(t, None);
        let limit = self.memory_limit_mib();
        if committed.saturating_add(want) > limit {
            return Err(RuntimeError::Memory(format!(
                "{count} VM(s) of {guest_mib} MiB would commit {} MiB of guest memory on this host, over its limit of {limit} MiB ({} MiB committed; the limit is {} × host RAM)",
                committed + want,
                committed,
                self.cfg.memory_ratio
            )));
        }
        if let Some(max) = tenant.max_memory_mib {
            let mine = Self::committed_mib(t, Some(&tenant.owner()));
            if mine.saturating_add(want) > max {
                return Err(RuntimeError::Quota(format!(
                    "tenant {:?} may use {max} MiB of guest memory; {mine} MiB are in use and this needs {want} MiB more",
                    tenant.name
                )));
            }
        }
        if let Some(max) = tenant.max_instances {
            let mine = t
                .instances
                .values()
                .filter(|i| i.owner == tenant.owner())
                .filter(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running))
                .count();
            if guest_mib > 0 && count > 0 && mine + count > max {
                return Err(RuntimeError::Quota(format!(
                    "tenant {:?} may have {max} live instances; {mine} are alive and this asks for {count} more",
                    tenant.name
                )));
            }
        }
        Ok(())
    }

    /// Starts `req.count` clones; one result per clone, in order. The
    /// request is refused as a whole only when it cannot start at all
    /// (unknown master, no start slot free, memory or quota).
    pub fn create_instances(
        self: &Arc<Self>,
        tenant: &Tenant,
        req: InstancesRequest,
    ) -> Result<Vec<Result<InstanceInfo, RuntimeError>>, RuntimeError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(RuntimeError::Conflict("the daemon is shutting down".into()));
        }
        let (rec, guest_mib, master_name) = {
            let t = lock(&self.tables);
            if let Some(id) = &req.id {
                if req.count != 1 {
                    return Err(RuntimeError::Invalid(format!(
                        "an instance id names one instance; count is {}",
                        req.count
                    )));
                }
                if t.instances.contains_key(id) {
                    return Err(RuntimeError::Conflict(format!(
                        "an instance {id:?} exists already"
                    )));
                }
            }
            let m = self.find_master(&t, tenant, &req.master)?;
            if m.status != MasterStatus::Frozen {
                return Err(RuntimeError::Conflict(format!(
                    "master {:?} is not frozen yet (status {:?})",
                    req.master, m.status
                )));
            }
            self.admit_memory(&t, tenant, m.memory_mib, req.count)?;
            (
                self.store.master(&m.store_name)?,
                m.memory_mib,
                m.name.clone(),
            )
        };
        if !self.slots.try_take() {
            self.metrics.admission_refused.inc();
            return Err(RuntimeError::Busy {
                slots: self.slots.max,
                retry_after_s: 1,
            });
        }
        let owner = Ownership {
            tenant: tenant.owner(),
            labels: req.labels.clone(),
            ttl_deadline_unix_s: req.ttl.map(|d| unix_now() + d.as_secs().max(1)),
            id: req.id.clone(),
            limits: req.limits,
            net: req.net.clone(),
            jail: None,
            vsock_reset: false,
        };
        let parallel = self.cfg.parallel.clamp(1, req.count.max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Mutex<Option<Result<InstanceInfo, RuntimeError>>>> =
            (0..req.count).map(|_| Mutex::new(None)).collect();
        let first_slot = AtomicBool::new(true);
        std::thread::scope(|scope| {
            for _ in 0..parallel {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= req.count {
                        break;
                    }
                    // The request holds one slot already; every other clone
                    // waits for one.
                    if !first_slot.swap(false, Ordering::SeqCst) {
                        self.slots.take();
                    }
                    let r = self.start_one(&rec, &master_name, guest_mib, &owner, tenant);
                    self.slots.give();
                    *lock(&results[i]) = Some(r);
                });
            }
        });
        if first_slot.load(Ordering::SeqCst) {
            // No clone was asked for: the request's slot is still held.
            self.slots.give();
        }
        let ok = results
            .iter()
            .filter(|r| matches!(*lock(r), Some(Ok(_))))
            .count();
        tracing::info!(
            master = %rec.name,
            tenant = %tenant.name,
            requested = req.count,
            started = ok,
            "clones started"
        );
        Ok(results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| Err(RuntimeError::Invalid("not started".into())))
            })
            .collect())
    }

    fn start_one(
        &self,
        master: &MasterRecord,
        master_name: &str,
        guest_mib: u64,
        owner: &Ownership,
        tenant: &Tenant,
    ) -> Result<InstanceInfo, RuntimeError> {
        let spawned = match clone::spawn(&self.store, master, true, owner) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.clone_failures.inc();
                return Err(e.into());
            }
        };
        let id = spawned.id.clone();
        {
            let mut t = lock(&self.tables);
            t.instances.insert(
                id.clone(),
                Instance {
                    id: id.clone(),
                    master: master.name.clone(),
                    master_name: master_name.to_string(),
                    owner: owner.tenant.clone(),
                    labels: owner.labels.clone(),
                    guest_mib,
                    state: InstanceState::Starting,
                    reason: None,
                    console_tail: None,
                    created_unix_s: unix_now(),
                    ttl_deadline_unix_s: owner.ttl_deadline_unix_s,
                    timeline: spawned.vmm.timeline,
                    vmm: None,
                    agent: None,
                    memory_cache: None,
                    ended_at: None,
                    net: spawned
                        .net
                        .as_ref()
                        .map(|a| InstanceNet::attached(a, &owner.net)),
                },
            );
        }
        match clone::handshake(spawned, self.cfg.clone_timeout) {
            Ok(mut started) => {
                let t = &started.vmm.timeline;
                self.metrics.clone_started(&[
                    ("spawn_to_running", t.ms_since_spawn(t.vcpu_running_us)),
                    ("spawn_to_connected", t.ms_since_spawn(t.connected_us)),
                    ("spawn_to_identity", t.ms_since_spawn(t.identity_us)),
                    ("spawn_to_ping", t.ms_since_spawn(t.ping_us)),
                ]);
                // From now on the runtime owns the process; the handle no
                // longer removes anything by itself.
                started.vmm.keep_on_drop();
                let mut t = lock(&self.tables);
                let Some(inst) = t.instances.get_mut(&id) else {
                    // Deleted while starting.
                    started.vmm.kill();
                    let _ = std::fs::remove_dir_all(self.store.clone_dir(&id));
                    return Err(RuntimeError::NotFound {
                        what: "instance",
                        id,
                    });
                };
                if let Some(fd) = started.vmm.pidfd() {
                    let _ = self.watcher.watch(&id, fd);
                }
                inst.state = InstanceState::Running;
                inst.timeline = started.vmm.timeline;
                inst.vmm = Some(started.vmm);
                inst.agent = Some(Arc::new(Mutex::new(Some(started.agent))));
                Ok(self.info(inst, tenant))
            }
            Err(e) => {
                self.metrics.clone_failures.inc();
                tracing::warn!(instance = %id, "clone failed to start: {e}");
                let mut t = lock(&self.tables);
                if let Some(inst) = t.instances.get_mut(&id) {
                    inst.state = InstanceState::Failed;
                    inst.reason = Some(e.to_string());
                    inst.ended_at = Some(Instant::now());
                }
                Err(e.into())
            }
        }
    }

    /// An instance as `viewer` sees it (its master named as in [`Runtime::master_info`]).
    fn info(&self, i: &Instance, viewer: &Tenant) -> InstanceInfo {
        InstanceInfo {
            id: i.id.clone(),
            master: if viewer.admin {
                i.master.clone()
            } else {
                i.master_name.clone()
            },
            state: i.state,
            reason: i.reason.clone(),
            console_tail: i.console_tail.clone(),
            pid: i
                .vmm
                .as_ref()
                .filter(|_| matches!(i.state, InstanceState::Starting | InstanceState::Running))
                .map(|v| v.pid()),
            labels: i.labels.clone(),
            created_unix_s: i.created_unix_s,
            ttl_deadline_unix_s: i.ttl_deadline_unix_s,
            timings: Timings::from(&i.timeline),
            memory: i.memory_cache.map(|(_, m)| m),
            net: i.net.clone(),
        }
    }

    fn find_instance<'a>(
        t: &'a mut Tables,
        tenant: &Tenant,
        id: &str,
    ) -> Result<&'a mut Instance, RuntimeError> {
        match t.instances.get_mut(id) {
            Some(i) if tenant.owns(&i.owner) => Ok(i),
            _ => Err(RuntimeError::NotFound {
                what: "instance",
                id: id.to_string(),
            }),
        }
    }

    /// One instance (with its memory, read at most once a second).
    pub fn instance(&self, tenant: &Tenant, id: &str) -> Result<InstanceInfo, RuntimeError> {
        let mut t = lock(&self.tables);
        let inst = Self::find_instance(&mut t, tenant, id)?;
        refresh_memory(inst, Duration::from_secs(1));
        Ok(self.info(inst, tenant))
    }

    /// Instances of `tenant` that pass `filter`, sorted by id, from after
    /// `after`, at most `limit`. Returns them and whether more follow.
    pub fn instances(
        &self,
        tenant: &Tenant,
        filter: &InstanceFilter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<InstanceInfo>, bool) {
        let mut t = lock(&self.tables);
        let mut v: Vec<&mut Instance> = t
            .instances
            .values_mut()
            .filter(|i| tenant.owns(&i.owner))
            .filter(|i| {
                filter
                    .master
                    .as_ref()
                    .is_none_or(|m| i.master_name == *m || (tenant.admin && i.master == *m))
            })
            .filter(|i| filter.state.is_none_or(|s| i.state == s))
            .filter(|i| {
                filter
                    .labels
                    .iter()
                    .all(|(k, v)| i.labels.get(k) == Some(v))
            })
            .filter(|i| after.is_none_or(|a| i.id.as_str() > a))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        let more = v.len() > limit;
        (
            v.into_iter()
                .take(limit)
                .map(|i| {
                    refresh_memory(i, Duration::from_secs(2));
                    self.info(i, tenant)
                })
                .collect(),
            more,
        )
    }

    /// Kills an instance and forgets it.
    pub fn delete_instance(&self, tenant: &Tenant, id: &str) -> Result<(), RuntimeError> {
        self.remove_instance(tenant, id, "killed")
    }

    /// Kills an instance and forgets it; a running VMM's end is counted
    /// once, under `reason`.
    fn remove_instance(&self, tenant: &Tenant, id: &str, reason: &str) -> Result<(), RuntimeError> {
        let inst = {
            let mut t = lock(&self.tables);
            Self::find_instance(&mut t, tenant, id)?;
            t.instances.remove(id)
        };
        if let Some(mut inst) = inst {
            self.watcher.unwatch(id);
            if let Some(v) = &mut inst.vmm {
                v.kill();
                crate::vmnet::release(id);
                if inst.state == InstanceState::Running {
                    self.metrics.vmm_exit(reason);
                }
            } else if inst.state == InstanceState::Starting {
                // Its start thread sees it gone and kills it.
                return Ok(());
            }
            let _ = std::fs::remove_dir_all(self.store.clone_dir(id));
        }
        Ok(())
    }

    /// Sets an instance's TTL to `ttl` from now.
    pub fn extend_ttl(
        &self,
        tenant: &Tenant,
        id: &str,
        ttl: Duration,
    ) -> Result<InstanceInfo, RuntimeError> {
        let mut t = lock(&self.tables);
        let inst = Self::find_instance(&mut t, tenant, id)?;
        if !matches!(inst.state, InstanceState::Starting | InstanceState::Running) {
            return Err(RuntimeError::Conflict(format!(
                "instance {id} is {}",
                inst.state.as_str()
            )));
        }
        inst.ttl_deadline_unix_s = Some(unix_now() + ttl.as_secs().max(1));
        let path = self.store.clone_dir(id).join("clone.json");
        if let Ok(mut rec) = self.store.clone_record(id) {
            rec.ttl_deadline_unix_s = inst.ttl_deadline_unix_s;
            crate::store::write_record(&path, &rec)?;
        }
        Ok(self.info(inst, tenant))
    }

    fn live_agent(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<(SharedAgent, PathBuf), RuntimeError> {
        let mut t = lock(&self.tables);
        let inst = Self::find_instance(&mut t, tenant, id)?;
        if inst.state != InstanceState::Running {
            return Err(RuntimeError::Conflict(format!(
                "instance {id} is {}",
                inst.state.as_str()
            )));
        }
        let agent = inst
            .agent
            .get_or_insert_with(|| Arc::new(Mutex::new(None)))
            .clone();
        Ok((agent, self.store.clone_dir(id).join(vmm::files::VSOCK)))
    }

    /// Pings an instance's agent over its kept connection; returns the
    /// round trip in ms and the guest's uptime.
    pub fn health(&self, tenant: &Tenant, id: &str) -> Result<(f64, u64), RuntimeError> {
        let (agent, uds) = self.live_agent(tenant, id)?;
        let mut conn = lock(&agent);
        for attempt in 0..2 {
            if conn.is_none() {
                *conn = Some(AgentClient::connect(&uds)?);
            }
            let t0 = Instant::now();
            match conn.as_mut().map(|c| c.ping()) {
                Some(Ok(uptime)) => return Ok((t0.elapsed().as_secs_f64() * 1000.0, uptime)),
                Some(Err(e)) if attempt == 1 => return Err(e.into()),
                _ => *conn = None,
            }
        }
        unreachable!("the second attempt returns")
    }

    /// A fresh agent connection to a running instance (for a streamed exec).
    pub fn connect_agent(&self, tenant: &Tenant, id: &str) -> Result<AgentClient, RuntimeError> {
        let (_, uds) = self.live_agent(tenant, id)?;
        Ok(AgentClient::connect(&uds)?)
    }

    /// Runs a short command; output is capped at [`EXEC_OUTPUT_CAP`] per stream.
    pub fn exec(
        &self,
        tenant: &Tenant,
        id: &str,
        req: ExecRequest,
        stdin: Vec<u8>,
    ) -> Result<ExecOutput, RuntimeError> {
        let mut agent = self.connect_agent(tenant, id)?;
        let t0 = Instant::now();
        let (mut out, mut err) = (
            CappedBuffer::new(EXEC_OUTPUT_CAP),
            CappedBuffer::new(EXEC_OUTPUT_CAP),
        );
        let input: Option<Box<dyn std::io::Read + Send>> = if stdin.is_empty() {
            None
        } else {
            Some(Box::new(std::io::Cursor::new(stdin)))
        };
        let status = agent.exec(req, input, &mut out, &mut err)?;
        self.metrics
            .exec_latency
            .observe(t0.elapsed().as_secs_f64());
        Ok(ExecOutput {
            exit_code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            stdout: out.buf,
            stderr: err.buf,
        })
    }

    /// The console log of an instance (it may be gone once the instance ended).
    pub fn console_path(&self, tenant: &Tenant, id: &str) -> Result<PathBuf, RuntimeError> {
        let mut t = lock(&self.tables);
        Self::find_instance(&mut t, tenant, id)?;
        Ok(self.store.clone_dir(id).join(vmm::files::CONSOLE))
    }

    /// The host's resources.
    pub fn host(&self) -> HostInfo {
        let t = lock(&self.tables);
        let mut by_state: BTreeMap<String, usize> = ["starting", "running", "exited", "failed"]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        for i in t.instances.values() {
            *by_state.entry(i.state.as_str().into()).or_default() += 1;
        }
        let (private, shared) = t
            .instances
            .values()
            .filter_map(|i| i.memory_cache.map(|(_, m)| m))
            .fold((0, 0), |(p, s), m| (p + m.private_kib, s.max(m.shared_kib)));
        let mut masters: Vec<String> = t
            .masters
            .values()
            .filter(|m| m.status == MasterStatus::Frozen)
            .map(|m| m.store_name.clone())
            .collect();
        masters.sort();
        HostInfo {
            memory_total_mib: procfs::host_memory_mib(),
            memory_committed_mib: Self::committed_mib(&t, None),
            memory_limit_mib: self.memory_limit_mib(),
            memory_private_mib: private / 1024,
            memory_shared_mib: shared / 1024,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            masters,
            instances: by_state,
            start_slots_in_use: self.slots.in_use(),
            start_slots: self.slots.max,
        }
    }

    /// Refreshes the instance and memory gauges (before `/metrics` is read).
    pub fn refresh_gauges(&self) {
        let mut t = lock(&self.tables);
        let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        let (mut private, mut shared) = (0i64, 0i64);
        for i in t.instances.values_mut() {
            *counts.entry(i.state.as_str()).or_default() += 1;
            if i.state == InstanceState::Running {
                refresh_memory(i, Duration::from_secs(5));
                if let Some((_, m)) = i.memory_cache {
                    private += m.private_kib as i64 * 1024;
                    shared = shared.max(m.shared_kib as i64 * 1024);
                }
            }
        }
        for s in ["starting", "running", "exited", "failed"] {
            self.metrics
                .instances
                .get_or_create(&StateLabel { state: s.into() })
                .set(counts.get(s).copied().unwrap_or(0));
        }
        for (kind, v) in [("private", private), ("shared", shared)] {
            self.metrics
                .memory
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(v);
        }
    }

    // -------------------------------------------------------- supervision

    /// Called by the supervisor when instance `id`'s VMM ended.
    pub(crate) fn on_exit(&self, id: &str) {
        let mut t = lock(&self.tables);
        let Some(inst) = t.instances.get_mut(id) else {
            return;
        };
        let Some(vmm) = inst.vmm.as_mut() else {
            return;
        };
        let exit = vmm.poll().cloned();
        let Some(exit) = exit else {
            return;
        };
        vmm.kill(); // reaps it
        crate::vmnet::release(id);
        self.watcher.unwatch(id);
        let dir = self.store.clone_dir(id);
        let tail = vmm::console_tail(&dir.join(vmm::files::CONSOLE), 12);
        let reason_label = format!("{:?}", exit.reason).to_lowercase();
        self.metrics.vmm_exit(&reason_label);
        inst.ended_at = Some(Instant::now());
        inst.agent = None;
        inst.memory_cache = None;
        tracing::info!(instance = %id, reason = %reason_label, "VMM ended: {}", exit.message);
        if exit.reason == ExitReason::Shutdown {
            inst.state = InstanceState::Exited;
            inst.reason = Some("the guest shut down".into());
        } else {
            inst.state = InstanceState::Failed;
            inst.reason = Some(format!("{} ({reason_label})", exit.message));
            inst.console_tail = (!tail.is_empty()).then_some(tail);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Self::forget_oldest_ended(&mut t);
    }

    fn forget_oldest_ended(t: &mut Tables) {
        let ended: Vec<(Instant, String)> = t
            .instances
            .values()
            .filter_map(|i| i.ended_at.map(|at| (at, i.id.clone())))
            .collect();
        if ended.len() > KEEP_ENDED {
            let mut ended = ended;
            ended.sort();
            for (_, id) in ended.iter().take(ended.len() - KEEP_ENDED) {
                t.instances.remove(id);
            }
        }
    }

    /// Kills the instances whose TTL has passed (the supervisor calls it).
    pub(crate) fn enforce_ttls(&self) {
        let now = unix_now();
        let due: Vec<(String, Option<String>)> = lock(&self.tables)
            .instances
            .values()
            .filter(|i| i.state == InstanceState::Running)
            .filter(|i| i.ttl_deadline_unix_s.is_some_and(|d| d <= now))
            .map(|i| (i.id.clone(), i.owner.clone()))
            .collect();
        for (id, _) in due {
            tracing::info!(instance = %id, "TTL reached: killed");
            let _ = self.remove_instance(&Tenant::admin(), &id, "ttl");
        }
    }

    /// Stops serving: with `stop_instances`, kills every instance (else they
    /// keep running for the next daemon to adopt).
    pub fn shutdown(&self, stop_instances: bool) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut t = lock(&self.tables);
        if stop_instances {
            // Every VMM is told first, so they end together, not in turn.
            for v in t.instances.values().filter_map(|i| i.vmm.as_ref()) {
                v.signal_kill();
            }
        }
        for (id, inst) in t.instances.iter_mut() {
            if let Some(v) = inst.vmm.as_mut() {
                if stop_instances {
                    v.kill();
                    let _ = std::fs::remove_dir_all(self.store.clone_dir(id));
                } else {
                    v.release();
                }
            }
        }
        if stop_instances {
            t.instances.clear();
        }
    }

    pub(crate) fn watcher(&self) -> &crate::supervise::Watcher {
        &self.watcher
    }
}

/// Whether `s` may be a tenant name: 1-20 of a-z, 0-9, '-'.
pub fn is_tenant_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 20
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn entry_of(m: &MasterRecord) -> MasterEntry {
    MasterEntry {
        store_name: m.name.clone(),
        name: m.display_name.clone().unwrap_or_else(|| m.name.clone()),
        owner: m.tenant.clone(),
        status: MasterStatus::Frozen,
        reason: None,
        console_tail: None,
        memory_mib: m.memory_mib,
        vcpus: m.vcpus,
        warmup: m.warmup.clone(),
        labels: m.labels.clone(),
        boot_ms: m.boot_ms,
        warmup_ms: m.warmup_ms,
        created_unix_s: m.created_unix_s,
        snapshot: Some(m.snapshot.clone()),
    }
}

/// Bytes a snapshot directory really takes on disk (sparse memory counted
/// by its blocks).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Reads a running instance's memory when what is cached is older than
/// `max_age` (`smaps_rollup` walks the process's page tables: not free).
fn refresh_memory(i: &mut Instance, max_age: Duration) {
    if i.state != InstanceState::Running {
        return;
    }
    let stale = i.memory_cache.is_none_or(|(at, _)| at.elapsed() > max_age);
    if let (true, Some(v)) = (stale, &i.vmm) {
        i.memory_cache = Some((Instant::now(), memory_of(v.pid(), i.guest_mib)));
    }
}

fn memory_of(pid: u32, guest_mib: u64) -> MemoryUse {
    let private = procfs::smaps_rollup(pid, "Private_Dirty").unwrap_or(0);
    let rss = procfs::smaps_rollup(pid, "Rss").unwrap_or(0);
    MemoryUse {
        private_kib: private,
        shared_kib: rss.saturating_sub(private),
        guest_mib,
    }
}

/// Keeps the first `cap` bytes written and counts the rest as truncated.
struct CappedBuffer {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl CappedBuffer {
    fn new(cap: usize) -> Self {
        CappedBuffer {
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }
}

impl std::io::Write for CappedBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.cap.saturating_sub(self.buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the last `cap` bytes written.
struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
    cut: bool,
}

impl TailBuffer {
    fn new(cap: usize) -> Self {
        TailBuffer {
            buf: Vec::new(),
            cap,
            cut: false,
        }
    }

    /// The last `n` non-empty whole lines.
    fn lines(&self, n: usize) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.buf);
        // After a cut the first line is only the end of one.
        let skip = usize::from(self.cut);
        let lines: Vec<&str> = text
            .lines()
            .skip(skip)
            .filter(|l| !l.trim().is_empty())
            .collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }
}

impl std::io::Write for TailBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
            self.cut = true;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn capped_output_keeps_the_head_and_says_it_was_cut() {
        let mut c = CappedBuffer::new(4);
        assert_eq!(c.write(b"abc").unwrap(), 3);
        assert_eq!(c.write(b"def").unwrap(), 3);
        assert_eq!(c.buf, b"abcd");
        assert!(c.truncated);
    }

    #[test]
    fn tail_buffer_keeps_the_last_lines() {
        let mut t = TailBuffer::new(13);
        t.write_all(b"first line\nsecond\nthird\n").unwrap();
        assert_eq!(t.lines(5), vec!["third"], "the cut line is dropped");
        let mut t = TailBuffer::new(100);
        t.write_all(b"a\n\nb\nc\n").unwrap();
        assert_eq!(t.lines(2), vec!["b", "c"]);
    }

    #[test]
    fn tenants_own_their_objects_and_the_admin_sees_all() {
        let a = Tenant {
            name: "acme".into(),
            admin: false,
            max_instances: None,
            max_memory_mib: None,
        };
        assert!(a.owns(&Some("acme".into())));
        assert!(!a.owns(&Some("other".into())));
        assert!(!a.owns(&None), "the admin's objects are not a tenant's");
        assert!(Tenant::admin().owns(&Some("acme".into())));
        assert_eq!(Runtime::store_name(&a, "web"), "web.acme");
        assert_eq!(Runtime::store_name(&Tenant::admin(), "web"), "web");
        assert!(is_tenant_name("acme-2") && !is_tenant_name("Acme") && !is_tenant_name("a.b"));
    }

    #[test]
    fn slots_are_counted() {
        let s = Slots {
            max: 2,
            used: Mutex::new(0),
            freed: Condvar::new(),
        };
        assert!(s.try_take() && s.try_take());
        assert!(!s.try_take());
        s.give();
        assert_eq!(s.in_use(), 1);
        s.take();
        assert_eq!(s.in_use(), 2);
    }

    #[test]
    fn states_parse_from_their_names() {
        for s in ["starting", "running", "exited", "failed"] {
            assert_eq!(InstanceState::parse(s).unwrap().as_str(), s);
        }
        assert!(InstanceState::parse("zombie").is_none());
    }
}
