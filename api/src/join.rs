//! The daemon's side of cluster membership (`zygote daemon --join URL`):
//! it heartbeats to the scheduler with what this host has and runs, and
//! converges the host to the assignment each answer carries. It starts the
//! slots it is assigned and lacks (cloning the master; booting the master
//! first if this host was chosen to make it, or fetching its snapshot from
//! the peer that holds it), stops the scheduler's instances it is no longer
//! assigned (a slot placed again elsewhere while this host was cut off is
//! stopped here on its first heartbeat back), and runs the apps' health
//! checks, reporting an instance `failed` after `failures_to_replace`
//! misses so the scheduler places it again.
//!
//! Instances it starts carry the labels [`LABEL_APP`] and [`LABEL_SLOT`];
//! nothing else on the host is touched. It must not decide placement: the
//! scheduler does; and it never blocks the async runtime (runtime calls run
//! on blocking threads).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host::runtime::{
    InstanceFilter, InstanceState, InstancesRequest, MasterRequest, MasterStatus, Runtime,
    RuntimeError, Tenant,
};
use proto::ExecRequest;
use scheduler::store::MasterHeld;
use scheduler::wire::{
    AssignedInstance, Assignment, CapacityReport, HostReport, InstanceReport, MasterAssignment,
    MasterReport, LABEL_APP, LABEL_SLOT,
};
use tokio::sync::Notify;

use crate::client::{segment, Client, ClientError, Endpoint};

/// How long a master's warm-up may take when this host boots it.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(600);
/// After a master failed here, wait this long before making it again.
const MASTER_RETRY: Duration = Duration::from_secs(30);

/// How the daemon joins.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// The scheduler replicas' URLs (`http://ADDR:PORT`); heartbeats go to
    /// one and move to the next when it does not answer.
    pub schedulers: Vec<String>,
    /// The bearer token for the scheduler (and peer daemons).
    pub token: Option<String>,
    /// This host's id in the cluster.
    pub host_id: String,
    /// Where peers and the scheduler reach this daemon (`http://ADDR:PORT`).
    pub address: String,
    /// Zone.
    pub zone: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Health {
    next_at: Instant,
    failures: u32,
}

#[derive(Debug, Default)]
struct Local {
    /// Instance ids being started.
    starting: HashSet<String>,
    /// Masters (daemon names) being fetched from a peer.
    fetching: HashSet<String>,
    /// Slots that failed here (to start, or their health checks), reported
    /// until the scheduler stops assigning them: id → (app, slot, reason).
    failed: HashMap<String, (String, u32, String)>,
    /// Health-check bookkeeping per instance id.
    health: HashMap<String, Health>,
    /// Health checks running.
    checking: HashSet<String>,
    /// A master that failed here may be made again after this.
    master_retry: HashMap<String, Instant>,
    /// Whether the last heartbeat failed (to log once per outage).
    unreachable: bool,
}

/// The membership agent. Run it with [`Agent::run`].
pub struct Agent {
    rt: Arc<Runtime>,
    cfg: JoinConfig,
    clients: Vec<Client>,
    /// The replica heartbeats go to now.
    current: std::sync::atomic::AtomicUsize,
    local: Mutex<Local>,
    wake: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tenant(t: &Option<String>) -> Tenant {
    match t {
        None => Tenant::admin(),
        Some(name) => Tenant {
            name: name.clone(),
            admin: false,
            max_instances: None,
            max_memory_mib: None,
        },
    }
}

/// Errors of joining.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The scheduler URL does not parse.
    #[error("--join {0:?}: use http://ADDR:PORT")]
    Url(String),
    /// A heartbeat failed.
    #[error("heartbeat to the scheduler failed")]
    Heartbeat(#[source] ClientError),
}

impl Agent {
    /// An agent for `rt` joining as `cfg` says.
    pub fn new(rt: Arc<Runtime>, cfg: JoinConfig) -> Result<Arc<Self>, JoinError> {
        let mut clients = Vec::new();
        for url in &cfg.schedulers {
            match Endpoint::parse(url) {
                Ok(e @ Endpoint::Tcp(_)) => clients.push(Client::new(e, cfg.token.clone())),
                _ => return Err(JoinError::Url(url.clone())),
            }
        }
        if clients.is_empty() {
            return Err(JoinError::Url(String::new()));
        }
        Ok(Arc::new(Agent {
            rt,
            clients,
            current: Default::default(),
            cfg,
            local: Mutex::default(),
            wake: Notify::new(),
        }))
    }

    /// Heartbeats and converges until `stop` is set.
    pub async fn run(self: Arc<Self>, stop: Arc<AtomicBool>) {
        let mut every = Duration::from_secs(1);
        tracing::info!(
            schedulers = %self.cfg.schedulers.join(","),
            host = %self.cfg.host_id,
            address = %self.cfg.address,
            "joining the cluster"
        );
        while !stop.load(Ordering::Relaxed) {
            match self.heartbeat().await {
                Ok(a) => {
                    every = Duration::from_millis(a.heartbeat_ms.clamp(100, 60_000));
                    let was = std::mem::replace(&mut lock(&self.local).unreachable, false);
                    if was {
                        tracing::info!("the scheduler answers again");
                    }
                    self.converge(&a).await;
                }
                Err(e) => {
                    let was = std::mem::replace(&mut lock(&self.local).unreachable, true);
                    if !was {
                        tracing::warn!(error = %crate::error::chain(&e), "heartbeat failed; retrying");
                    }
                }
            }
            // The next heartbeat: on time, or sooner when a start or stop
            // finished (so the scheduler hears of it at once), but never
            // more than ten a second.
            let t0 = Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.wake.notified() => {
                    let spent = t0.elapsed();
                    if spent < Duration::from_millis(100) {
                        tokio::time::sleep(Duration::from_millis(100) - spent).await;
                    }
                }
            }
        }
    }

    async fn heartbeat(self: &Arc<Self>) -> Result<Assignment, JoinError> {
        let me = self.clone();
        let report = tokio::task::spawn_blocking(move || me.report())
            .await
            .map_err(|e| JoinError::Heartbeat(ClientError::Http(e.to_string())))?;
        let body = serde_json::to_value(&report)
            .map_err(|e| JoinError::Heartbeat(ClientError::Http(e.to_string())))?;
        let path = format!("/v1/hosts/{}/heartbeat", segment(&self.cfg.host_id));
        // The current replica first, then each other one once.
        let n = self.clients.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let call = self.clients[i].post(&path, &body);
            let answer = match tokio::time::timeout(Duration::from_secs(5), call).await {
                Err(_) => Err(ClientError::Http("timed out after 5 s".into())),
                Ok(r) => r,
            }
            .and_then(|a| a.decode::<Assignment>());
            match answer {
                Ok(a) => {
                    if i != first {
                        tracing::info!(scheduler = %self.cfg.schedulers[i], "heartbeats now go to this replica");
                    }
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(a);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(JoinError::Heartbeat(last.unwrap_or_else(|| {
            ClientError::Http("no scheduler configured".into())
        })))
    }

    /// What this host has and runs, for the scheduler.
    fn report(&self) -> HostReport {
        let admin = Tenant::admin();
        let h = self.rt.host();
        let local = lock(&self.local);
        let mut masters: Vec<MasterReport> = self
            .rt
            .masters(&admin)
            .into_iter()
            .filter_map(|m| {
                let state = match m.status {
                    MasterStatus::Frozen => MasterHeld::Frozen,
                    MasterStatus::Booting | MasterStatus::Warming => MasterHeld::Pending,
                    MasterStatus::Failed => return None,
                };
                Some(MasterReport {
                    name: m.name,
                    state,
                    snapshot_bytes: m.snapshot_bytes,
                })
            })
            .collect();
        for name in &local.fetching {
            if !masters.iter().any(|m| &m.name == name) {
                masters.push(MasterReport {
                    name: name.clone(),
                    state: MasterHeld::Pending,
                    snapshot_bytes: None,
                });
            }
        }
        let mut instances = Vec::new();
        let mut seen = HashSet::new();
        for i in self.managed() {
            let (Some(app), Some(slot)) = (i.labels.get(LABEL_APP), slot_of(&i.labels)) else {
                continue;
            };
            seen.insert(i.id.clone());
            let failed = local.failed.get(&i.id);
            let (state, reason) = match (i.state, failed) {
                (_, Some((_, _, why))) => ("failed", Some(why.clone())),
                (InstanceState::Starting, _) => ("starting", None),
                (InstanceState::Running, _) => ("running", None),
                (InstanceState::Failed | InstanceState::Exited, _) => (
                    "failed",
                    Some(i.reason.unwrap_or_else(|| "it ended".to_string())),
                ),
            };
            instances.push(InstanceReport {
                app: app.clone(),
                slot,
                instance_id: i.id,
                state: state.into(),
                reason,
            });
        }
        for (id, (app, slot, why)) in &local.failed {
            if !seen.contains(id) {
                instances.push(InstanceReport {
                    app: app.clone(),
                    slot: *slot,
                    instance_id: id.clone(),
                    state: "failed".into(),
                    reason: Some(why.clone()),
                });
            }
        }
        HostReport {
            address: self.cfg.address.clone(),
            zone: self.cfg.zone.clone(),
            labels: self.cfg.labels.clone(),
            capacity: CapacityReport {
                memory_total_mib: h.memory_limit_mib,
                memory_free_mib: h.memory_limit_mib.saturating_sub(h.memory_committed_mib),
                cpus: h.cpus as u32,
                start_slots: h.start_slots as u32,
                start_slots_free: h.start_slots.saturating_sub(h.start_slots_in_use) as u32,
            },
            masters,
            instances,
        }
    }

    /// The scheduler's instances on this host, in every state.
    fn managed(&self) -> Vec<host::runtime::InstanceInfo> {
        let (all, _) = self.rt.instances(
            &Tenant::admin(),
            &InstanceFilter::default(),
            None,
            usize::MAX,
        );
        all.into_iter()
            .filter(|i| i.labels.contains_key(LABEL_APP))
            .collect()
    }

    /// Brings the host to the assignment: stop what is not assigned, make
    /// or fetch masters, start what is missing, check health.
    async fn converge(self: &Arc<Self>, a: &Assignment) {
        let assigned: HashMap<&str, &AssignedInstance> = a
            .instances
            .iter()
            .map(|i| (i.instance_id.as_str(), i))
            .collect();
        let me = self.clone();
        let managed = tokio::task::spawn_blocking(move || me.managed())
            .await
            .unwrap_or_default();
        {
            // Forget failures the scheduler has acted on.
            let mut l = lock(&self.local);
            l.failed.retain(|id, _| assigned.contains_key(id.as_str()));
            l.health.retain(|id, _| assigned.contains_key(id.as_str()));
        }

        // Stop (and forget) what is no longer assigned.
        for i in &managed {
            if !assigned.contains_key(i.id.as_str()) {
                let me = self.clone();
                let id = i.id.clone();
                let live = matches!(i.state, InstanceState::Starting | InstanceState::Running);
                tokio::task::spawn_blocking(move || {
                    if live {
                        tracing::info!(instance = %id, "stopping an instance no longer assigned here");
                    }
                    if let Err(e) = me.rt.delete_instance(&Tenant::admin(), &id) {
                        tracing::warn!(instance = %id, error = %e, "stopping failed");
                    }
                    me.wake.notify_one();
                });
            }
        }

        // Masters.
        let mut frozen = HashSet::new();
        for m in &a.masters {
            let key = daemon_name(m);
            match self.rt.master(&Tenant::admin(), &key) {
                Ok(info) if info.status == MasterStatus::Frozen => {
                    frozen.insert(key);
                }
                Ok(info) if info.status == MasterStatus::Failed => {
                    // Its slots here cannot start: say why, so the
                    // scheduler's status shows it (never a silent shortfall).
                    let why = format!(
                        "master {key} failed on this host: {}",
                        info.reason.as_deref().unwrap_or("no reason given")
                    );
                    let mut l = lock(&self.local);
                    for i in a.instances.iter().filter(|i| i.master == key) {
                        l.failed
                            .entry(i.instance_id.clone())
                            .or_insert_with(|| (i.app.clone(), i.slot, why.clone()));
                    }
                    drop(l);
                    self.retry_failed_master(&key, info.reason.as_deref());
                }
                Ok(_) => {}
                // Arriving from a peer: wait for it (never boot it too).
                Err(_) if lock(&self.local).fetching.contains(&key) => {}
                Err(_) => self.make_master(m, key),
            }
        }

        // Start what is missing, within the free start slots.
        let present: HashSet<&str> = managed.iter().map(|i| i.id.as_str()).collect();
        let mut free = {
            let h = self.rt.host();
            h.start_slots.saturating_sub(h.start_slots_in_use)
        };
        for i in &a.instances {
            if present.contains(i.instance_id.as_str()) || !frozen.contains(&i.master) {
                continue;
            }
            {
                let mut l = lock(&self.local);
                if free == 0
                    || l.starting.contains(&i.instance_id)
                    || l.failed.contains_key(&i.instance_id)
                {
                    continue;
                }
                l.starting.insert(i.instance_id.clone());
            }
            free -= 1;
            self.start(i.clone());
        }

        // Health checks of the running ones.
        let now = Instant::now();
        for i in &managed {
            let Some(asg) = assigned.get(i.id.as_str()) else {
                continue;
            };
            if i.state != InstanceState::Running {
                continue;
            }
            let due = {
                let mut l = lock(&self.local);
                let interval = Duration::from_secs(u64::from(asg.health.interval_s.max(1)));
                let h = l.health.entry(i.id.clone()).or_insert(Health {
                    next_at: now + interval,
                    failures: 0,
                });
                if now < h.next_at || l.checking.contains(&i.id) {
                    false
                } else {
                    l.checking.insert(i.id.clone());
                    true
                }
            };
            if due {
                self.check((*asg).clone());
            }
        }
    }

    fn retry_failed_master(&self, key: &str, reason: Option<&str>) {
        let mut l = lock(&self.local);
        let now = Instant::now();
        match l.master_retry.get(key) {
            None => {
                tracing::warn!(
                    master = key,
                    reason,
                    "master failed here; making it again in {} s",
                    MASTER_RETRY.as_secs()
                );
                l.master_retry.insert(key.to_string(), now + MASTER_RETRY);
            }
            Some(at) if now >= *at => {
                l.master_retry.remove(key);
                drop(l);
                let _ = self.rt.delete_master(&Tenant::admin(), key, true);
            }
            Some(_) => {}
        }
    }

    /// Boots the master here, or fetches it from the peer that has it.
    fn make_master(self: &Arc<Self>, m: &MasterAssignment, key: String) {
        match &m.source {
            None => {
                let t = tenant(&m.tenant);
                let req = MasterRequest {
                    name: m.spec.name.clone(),
                    memory_mib: m.spec.memory_mib,
                    vcpus: u8::try_from(m.spec.vcpus).unwrap_or(u8::MAX),
                    warmup: m.spec.warmup.clone(),
                    warmup_timeout: WARMUP_TIMEOUT,
                    labels: BTreeMap::new(),
                    net: None,
                };
                tracing::info!(master = %key, "this host was chosen to make the master: booting it");
                if let Err(e) = self.rt.create_master(&t, req) {
                    tracing::warn!(master = %key, error = %e, "could not start making the master");
                }
            }
            Some(src) if src.ready => {
                if !lock(&self.local).fetching.insert(key.clone()) {
                    return;
                }
                let me = self.clone();
                let m = m.clone();
                let src = src.clone();
                tokio::spawn(async move {
                    tracing::info!(master = %key, from = %src.host, "fetching the master's snapshot");
                    let t0 = Instant::now();
                    match fetch_master(&me.rt, &m, &src.address, me.cfg.token.clone()).await {
                        Ok(bytes) => tracing::info!(
                            master = %key,
                            from = %src.host,
                            bytes,
                            ms = t0.elapsed().as_millis() as u64,
                            "master received"
                        ),
                        Err(e) => {
                            tracing::warn!(master = %key, from = %src.host, error = %e, "fetching the master failed")
                        }
                    }
                    lock(&me.local).fetching.remove(&key);
                    me.wake.notify_one();
                });
            }
            // Its source is still making it: wait.
            Some(_) => {}
        }
    }

    fn start(self: &Arc<Self>, i: AssignedInstance) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let t = tenant(&i.tenant);
            let (_, name) = scheduler::service::split_key(&i.master);
            let req = InstancesRequest {
                limits: Default::default(),
                net: Default::default(),
                master: name.to_string(),
                count: 1,
                labels: BTreeMap::from([
                    (LABEL_APP.to_string(), i.app.clone()),
                    (LABEL_SLOT.to_string(), i.slot.to_string()),
                ]),
                ttl: None,
                id: Some(i.instance_id.clone()),
            };
            let result = me.rt.create_instances(&t, req).and_then(|mut v| {
                v.pop()
                    .unwrap_or_else(|| Err(RuntimeError::Invalid("no result".into())))
            });
            let mut l = me.local.lock().unwrap_or_else(|e| e.into_inner());
            l.starting.remove(&i.instance_id);
            match result {
                Ok(_) => {}
                // No start slot free now: the next heartbeat tries again.
                Err(RuntimeError::Busy { .. }) => {}
                Err(e) => {
                    let why = format!("could not start: {}", crate::error::chain(&e));
                    tracing::warn!(instance = %i.instance_id, reason = %why, "instance failed to start");
                    l.failed
                        .insert(i.instance_id.clone(), (i.app.clone(), i.slot, why));
                }
            }
            drop(l);
            me.wake.notify_one();
        });
    }

    fn check(self: &Arc<Self>, i: AssignedInstance) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let t = tenant(&i.tenant);
            let interval = Duration::from_secs(u64::from(i.health.interval_s.max(1)));
            let outcome: Result<(), String> = match &i.health.command {
                None => me
                    .rt
                    .health(&t, &i.instance_id)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Some(cmd) => {
                    let mut req = ExecRequest::new(["/bin/sh", "-c", cmd.as_str()]);
                    req.timeout_ms = Some(interval.as_millis() as u64);
                    match me.rt.exec(&t, &i.instance_id, req, Vec::new()) {
                        Ok(out) if out.exit_code == Some(0) => Ok(()),
                        Ok(out) => Err(format!(
                            "`{cmd}` exited with {:?}{}",
                            out.exit_code,
                            if out.timed_out { " (timed out)" } else { "" }
                        )),
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            let mut replace = None;
            {
                let mut l = me.local.lock().unwrap_or_else(|e| e.into_inner());
                l.checking.remove(&i.instance_id);
                if let Some(h) = l.health.get_mut(&i.instance_id) {
                    h.next_at = Instant::now() + interval;
                    match &outcome {
                        Ok(()) => h.failures = 0,
                        Err(why) => {
                            h.failures += 1;
                            tracing::warn!(instance = %i.instance_id, failures = h.failures, reason = %why, "health check failed");
                            if h.failures >= i.health.failures_to_replace {
                                replace = Some(format!(
                                    "health check failed {} times: {why}",
                                    h.failures
                                ));
                            }
                        }
                    }
                }
                if let Some(why) = &replace {
                    l.failed
                        .insert(i.instance_id.clone(), (i.app.clone(), i.slot, why.clone()));
                }
            }
            if replace.is_some() {
                let _ = me.rt.delete_instance(&Tenant::admin(), &i.instance_id);
                me.wake.notify_one();
            }
        });
    }
}

fn slot_of(labels: &BTreeMap<String, String>) -> Option<u32> {
    labels.get(LABEL_SLOT)?.parse().ok()
}

/// The daemon's name of an assigned master (`NAME` or `NAME.TENANT`).
fn daemon_name(m: &MasterAssignment) -> String {
    match &m.tenant {
        None => m.spec.name.clone(),
        Some(t) => format!("{}.{t}", m.spec.name),
    }
}

/// Receives `m`'s snapshot from the daemon at `from` and registers it here
/// under its tenant; returns the bytes that crossed the wire. The peer is
/// asked as the cluster's admin, so the source name is the daemon name.
async fn fetch_master(
    rt: &Arc<Runtime>,
    m: &MasterAssignment,
    from: &str,
    token: Option<String>,
) -> Result<u64, String> {
    let fetched = crate::peer::fetch_master(
        rt,
        &tenant(&m.tenant),
        from,
        token.as_deref(),
        &daemon_name(m),
        &m.spec.name,
    )
    .await
    .map_err(|e| format!("{} ({})", e.message, e.code))?;
    Ok(fetched.transfer.wire_bytes)
}
