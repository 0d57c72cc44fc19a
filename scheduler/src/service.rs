//! The scheduler as a service: apps declared by users, hosts that heartbeat,
//! and the reconcile step that turns the difference between desired and
//! actual into placement records. Everything it knows is in the [`Store`]
//! (so any replica can answer a heartbeat, and a new leader starts from
//! what the old one wrote); the only state of its own is a short event log
//! per app and the last shortfall, both for users to read.
//!
//! It must not: speak HTTP (the `api` crate serves it), read a clock
//! (callers pass `now`), or start anything on a host itself: hosts *pull*
//! their assignment in the heartbeat answer and converge to it.
//!
//! # The reconcile step
//!
//! [`Scheduler::reconcile`] is idempotent and safe to run twice at once:
//! every write is a compare-and-set on the app's generation and each slot's
//! revision, so of two reconcilers that planned from the same state one
//! wins and the other's batch is refused whole (and re-planned next round).
//! One step:
//!
//! 1. hosts whose lease ran out become `lost`;
//! 2. per app: slots at or past `instances` are deleted (their host stops
//!    them); slots on lost hosts (`recreate`), draining hosts, or that
//!    failed are placed again; empty slots are placed; all in one batch of
//!    the placement core, committed in one transaction;
//! 3. records of deleted apps are deleted;
//! 4. draining hosts with nothing left become `drained`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::placement::{self, CloneMemory, Cluster, HostId, Request, Selector};
use crate::store::{
    self, App, AppSpec, Capacity, Expect, HealthSpec, HostInfo, HostState, MasterHeld, MasterSpec,
    Millis, OnHostLoss, Placement, PlacementFilter, PlacementOp, PlacementSpec, PlacementState,
    PlacementWrite, Store, StoreError,
};
use crate::wire::{
    AppBody, AppEvent, AppStatus, AssignedInstance, Assignment, CapacityReport, HealthBody,
    HostCount, HostReport, HostView, MasterAssignment, MasterBody, MasterSource, PlacementBody,
    ShortfallView,
};

/// Events kept per app.
const EVENTS_KEPT: usize = 50;
/// Most instances an app may declare.
pub const MAX_INSTANCES: u32 = 10_000;
/// Assumed rate at which a master's snapshot reaches a host, bytes/s (until
/// hosts measure their links).
const LINK_BYTES_PER_S: u64 = 200 << 20;

/// Timing of membership.
#[derive(Debug, Clone)]
pub struct Config {
    /// A host is lost this long after its last heartbeat.
    pub lease_ttl: Duration,
    /// Hosts heartbeat this often.
    pub heartbeat: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ttl: Duration::from_secs(4),
            heartbeat: Duration::from_millis(1000),
        }
    }
}

/// The service's errors.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The app or host does not exist (or belongs to another tenant).
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// `app` or `host`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The request is malformed; says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A caller: `None` is the cluster's admin (sees every app), `Some(t)` a
/// tenant (sees its own apps, by the names it gave them).
pub type Tenant = Option<String>;

/// The store key of `name` for `tenant`: the name itself for the admin,
/// `NAME.TENANT` for a tenant (the daemon's convention for masters too).
pub fn app_key(tenant: &Tenant, name: &str) -> String {
    match tenant {
        None => name.to_string(),
        Some(t) => format!("{name}.{t}"),
    }
}

/// Splits a store key into (tenant, name as its owner knows it).
pub fn split_key(key: &str) -> (Tenant, &str) {
    match key.split_once('.') {
        Some((name, t)) => (Some(t.to_string()), name),
        None => (None, key),
    }
}

/// Checks an app or master name: 1–24 of `a-z 0-9 -`, starting with a
/// letter or digit (instance ids `NAME-SLOT-TAG` must fit the daemon's 40).
pub fn check_name(what: &str, name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!(
            "{what} name {name:?}: use 1-24 characters a-z, 0-9 and '-', starting with a letter or digit"
        )))
    }
}

/// Checks a declared app and turns it into the stored spec.
pub fn validate(body: &AppBody) -> Result<AppSpec, ServiceError> {
    let bad = |s: String| Err(ServiceError::Invalid(s));
    check_name("master", &body.master.name)?;
    if !(16..=1 << 20).contains(&body.master.memory_mib) {
        return bad(format!(
            "master.memory_mib {}: use 16 to 1048576",
            body.master.memory_mib
        ));
    }
    if !(1..=64).contains(&body.master.vcpus) {
        return bad(format!("master.vcpus {}: use 1 to 64", body.master.vcpus));
    }
    if body.master.ahead > 1000 {
        return bad(format!("master.ahead {}: use 0 to 1000", body.master.ahead));
    }
    if body.instances > MAX_INSTANCES {
        return bad(format!(
            "instances {}: at most {MAX_INSTANCES}",
            body.instances
        ));
    }
    for c in &body.placement.constraints {
        if let Err(e) = c.parse::<Selector>() {
            return bad(format!("placement.constraints {c:?}: {e}"));
        }
    }
    if body.placement.max_per_host == Some(0) {
        return bad("placement.max_per_host 0: use at least 1, or omit it".into());
    }
    if !(1..=86_400).contains(&body.health.interval_s) {
        return bad(format!(
            "health.interval_s {}: use 1 to 86400",
            body.health.interval_s
        ));
    }
    if !(1..=1000).contains(&body.health.failures_to_replace) {
        return bad(format!(
            "health.failures_to_replace {}: use 1 to 1000",
            body.health.failures_to_replace
        ));
    }
    for k in body.labels.keys() {
        if k.is_empty() || k.len() > 63 {
            return bad(format!("label key {k:?}: use 1-63 characters"));
        }
    }
    Ok(AppSpec {
        master: MasterSpec {
            name: body.master.name.clone(),
            memory_mib: body.master.memory_mib,
            vcpus: body.master.vcpus,
            warmup: body.master.warmup.clone(),
            ahead: body.master.ahead,
        },
        instances: body.instances,
        placement: PlacementSpec {
            strategy: body.placement.strategy,
            spread_by: body.placement.spread_by,
            constraints: body.placement.constraints.clone(),
            max_per_host: body.placement.max_per_host,
        },
        health: HealthSpec {
            command: body.health.command.clone(),
            interval_s: body.health.interval_s,
            failures_to_replace: body.health.failures_to_replace,
        },
        on_host_loss: body.on_host_loss,
        labels: body.labels.clone(),
    })
}

fn body_of(spec: &AppSpec) -> AppBody {
    AppBody {
        master: MasterBody {
            name: spec.master.name.clone(),
            memory_mib: spec.master.memory_mib,
            vcpus: spec.master.vcpus,
            warmup: spec.master.warmup.clone(),
            ahead: spec.master.ahead,
        },
        instances: spec.instances,
        placement: PlacementBody {
            strategy: spec.placement.strategy,
            spread_by: spec.placement.spread_by,
            constraints: spec.placement.constraints.clone(),
            max_per_host: spec.placement.max_per_host,
        },
        health: HealthBody {
            command: spec.health.command.clone(),
            interval_s: spec.health.interval_s,
            failures_to_replace: spec.health.failures_to_replace,
        },
        on_host_loss: spec.on_host_loss,
        labels: spec.labels.clone(),
    }
}

/// The daemon's name of an app's master: `NAME` or `NAME.TENANT`.
pub fn master_key(app_key: &str, spec: &AppSpec) -> String {
    match split_key(app_key).0 {
        None => spec.master.name.clone(),
        Some(t) => format!("{}.{t}", spec.master.name),
    }
}

fn state_str(s: HostState) -> &'static str {
    match s {
        HostState::Up => "up",
        HostState::Draining => "draining",
        HostState::Drained => "drained",
        HostState::Lost => "lost",
    }
}

fn held_str(m: MasterHeld) -> &'static str {
    match m {
        MasterHeld::Frozen => "frozen",
        MasterHeld::Files => "files",
        MasterHeld::Pending => "pending",
    }
}

/// What one reconcile step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Hosts found lost.
    pub lost: u32,
    /// Slots placed (new or again).
    pub placed: u32,
    /// Slot records deleted (surplus, deleted apps).
    pub stopped: u32,
    /// Apps whose batch lost a race (re-planned next step).
    pub conflicts: u32,
}

/// The scheduler service. Share it in an `Arc`.
#[derive(Debug)]
pub struct Scheduler<S: Store + ?Sized> {
    store: Box<S>,
    cfg: Config,
    events: Mutex<BTreeMap<String, VecDeque<AppEvent>>>,
    shortfalls: Mutex<BTreeMap<String, ShortfallView>>,
    /// No host is found lost before this time: a lease TTL after this
    /// replica began to lead (see [`Scheduler::begin_leading`]).
    grace_until: Mutex<Millis>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Store + ?Sized> Scheduler<S> {
    /// A service over `store`.
    pub fn new(store: Box<S>, cfg: Config) -> Self {
        Scheduler {
            store,
            cfg,
            events: Mutex::default(),
            shortfalls: Mutex::default(),
            grace_until: Mutex::new(Millis(0)),
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The membership timing.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn event(
        &self,
        app: &str,
        now: Millis,
        action: &str,
        slot: Option<u32>,
        host: Option<&str>,
        reason: String,
    ) {
        tracing::info!(app, action, slot, host, %reason, "app event");
        let mut ev = lock(&self.events);
        let q = ev.entry(app.to_string()).or_default();
        if q.len() == EVENTS_KEPT {
            q.pop_front();
        }
        q.push_back(AppEvent {
            at_ms: now.0,
            action: action.into(),
            slot,
            host: host.map(str::to_string),
            reason,
        });
    }

    // ------------------------------------------------------------ apps

    /// Declares (or changes) `tenant`'s app `name`; idempotent: the same
    /// body again changes nothing and keeps the generation. Returns the
    /// status and whether the app was created.
    pub fn apply_app(
        &self,
        tenant: &Tenant,
        name: &str,
        body: &AppBody,
        now: Millis,
    ) -> Result<(AppStatus, bool), ServiceError> {
        check_name("app", name)?;
        let spec = validate(body)?;
        let key = app_key(tenant, name);
        loop {
            let (expect, created) = match self.store.get_app(&key) {
                Ok(app) if app.spec == spec => return Ok((self.status(&app, now)?, false)),
                Ok(app) => (Expect::At(app.generation), false),
                Err(StoreError::NotFound { .. }) => (Expect::Absent, true),
                Err(e) => return Err(e.into()),
            };
            match self.store.put_app(&key, &spec, expect) {
                Ok(app) => {
                    self.event(
                        &key,
                        now,
                        "declared",
                        None,
                        None,
                        format!(
                            "generation {}: {} instances",
                            app.generation, spec.instances
                        ),
                    );
                    return Ok((self.status(&app, now)?, created));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sets the app's instance count.
    pub fn scale(
        &self,
        tenant: &Tenant,
        name: &str,
        instances: u32,
        now: Millis,
    ) -> Result<AppStatus, ServiceError> {
        if instances > MAX_INSTANCES {
            return Err(ServiceError::Invalid(format!(
                "instances {instances}: at most {MAX_INSTANCES}"
            )));
        }
        let key = app_key(tenant, name);
        loop {
            let app = self.get(&key, name)?;
            let mut spec = app.spec.clone();
            spec.instances = instances;
            match self.store.put_app(&key, &spec, Expect::At(app.generation)) {
                Ok(app) => {
                    self.event(
                        &key,
                        now,
                        "scaled",
                        None,
                        None,
                        format!("to {instances} instances"),
                    );
                    return self.status(&app, now);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn get(&self, key: &str, name: &str) -> Result<App, ServiceError> {
        match self.store.get_app(key) {
            Ok(a) => Ok(a),
            Err(StoreError::NotFound { .. }) => Err(ServiceError::NotFound {
                kind: "app",
                name: name.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// `tenant`'s app `name`, desired vs actual.
    pub fn app(&self, tenant: &Tenant, name: &str, now: Millis) -> Result<AppStatus, ServiceError> {
        let key = app_key(tenant, name);
        let app = self.get(&key, name)?;
        self.status(&app, now)
    }

    /// Every app `tenant` can see, by name.
    pub fn apps(&self, tenant: &Tenant, now: Millis) -> Result<Vec<AppStatus>, ServiceError> {
        let apps = self.store.list_apps()?;
        let placements = self.store.list_placements(&PlacementFilter::default())?;
        let hosts = self.store.list_hosts()?;
        let mut out = Vec::new();
        for app in &apps {
            let (owner, _) = split_key(&app.name);
            if tenant.is_some() && owner != *tenant {
                continue;
            }
            let mine: Vec<&Placement> = placements.iter().filter(|p| p.app == app.name).collect();
            out.push(self.status_from(app, &mine, &hosts, tenant.is_none(), now));
        }
        Ok(out)
    }

    /// Removes `tenant`'s app `name`: its instances are stopped everywhere
    /// (the reconcile step deletes their records; hosts stop them).
    pub fn delete_app(&self, tenant: &Tenant, name: &str, now: Millis) -> Result<(), ServiceError> {
        let key = app_key(tenant, name);
        loop {
            let app = self.get(&key, name)?;
            match self.store.delete_app(&key, Expect::At(app.generation)) {
                Ok(()) => {
                    self.event(&key, now, "deleted", None, None, "by request".into());
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn status(&self, app: &App, now: Millis) -> Result<AppStatus, ServiceError> {
        let placements = self.store.list_placements(&PlacementFilter {
            app: Some(app.name.clone()),
            host: None,
        })?;
        let hosts = self.store.list_hosts()?;
        let refs: Vec<&Placement> = placements.iter().collect();
        Ok(self.status_from(app, &refs, &hosts, true, now))
    }

    fn status_from(
        &self,
        app: &App,
        placements: &[&Placement],
        hosts: &[store::Host],
        full_name: bool,
        now: Millis,
    ) -> AppStatus {
        let desired = app.spec.instances;
        let mut per_host: BTreeMap<String, HostCount> = BTreeMap::new();
        let (mut running, mut starting) = (0, 0);
        for p in placements.iter().filter(|p| p.slot < desired) {
            let e = per_host.entry(p.host.clone()).or_default();
            match p.state {
                PlacementState::Running => {
                    running += 1;
                    e.running += 1;
                }
                PlacementState::Placed => {
                    starting += 1;
                    e.starting += 1;
                }
                _ => {}
            }
        }
        let master = master_key(&app.name, &app.spec);
        let master_hosts = hosts
            .iter()
            .filter(|h| h.info.state != HostState::Lost)
            .filter(|h| h.info.masters.get(&master) == Some(&MasterHeld::Frozen))
            .map(|h| h.id.clone())
            .collect();
        let mut shortfall = lock(&self.shortfalls).get(&app.name).cloned();
        if shortfall.is_none() && running + starting < desired {
            let lost: BTreeSet<&str> = hosts
                .iter()
                .filter(|h| h.info.state == HostState::Lost)
                .map(|h| h.id.as_str())
                .collect();
            let held = placements
                .iter()
                .filter(|p| p.slot < desired && lost.contains(p.host.as_str()))
                .count() as u32;
            if held > 0 {
                shortfall = Some(ShortfallView {
                    reason: "host_lost".into(),
                    unplaced: held,
                    message: format!(
                        "{held} instance(s) wait for their lost host to return (on_host_loss: leave)"
                    ),
                });
            }
        }
        let events: Vec<AppEvent> = lock(&self.events)
            .get(&app.name)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default();
        if shortfall.is_none() && running < desired {
            // Slots that keep failing are placed again and show as
            // starting: say so, with the latest reason.
            let recent: Vec<&AppEvent> = events
                .iter()
                .filter(|e| e.action == "failed" && now.0.saturating_sub(e.at_ms) <= 60_000)
                .collect();
            if let Some(last) = recent.last() {
                shortfall = Some(ShortfallView {
                    reason: "failures".into(),
                    unplaced: desired - running,
                    message: format!(
                        "{} instance failure(s) in the last minute; the latest: {}",
                        recent.len(),
                        last.reason
                    ),
                });
            }
        }
        let (_, short) = split_key(&app.name);
        AppStatus {
            name: if full_name {
                app.name.clone()
            } else {
                short.to_string()
            },
            generation: app.generation,
            spec: body_of(&app.spec),
            desired,
            running,
            starting,
            per_host,
            shortfall,
            master_hosts,
            events,
        }
    }

    // ----------------------------------------------------------- hosts

    /// Every host, with its lease and what is placed there.
    pub fn hosts(&self, now: Millis) -> Result<Vec<HostView>, ServiceError> {
        let hosts = self.store.list_hosts()?;
        let placements = self.store.list_placements(&PlacementFilter::default())?;
        let mut out = Vec::with_capacity(hosts.len());
        for h in hosts {
            out.push(self.host_view(&h, &placements, now)?);
        }
        Ok(out)
    }

    fn host_view(
        &self,
        h: &store::Host,
        placements: &[Placement],
        now: Millis,
    ) -> Result<HostView, ServiceError> {
        let lease = match self.store.get_lease(&h.id) {
            Ok(l) => Some(l),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let mut instances: BTreeMap<String, HostCount> = BTreeMap::new();
        for p in placements.iter().filter(|p| p.host == h.id) {
            let e = instances.entry(p.app.clone()).or_default();
            match p.state {
                PlacementState::Running => e.running += 1,
                PlacementState::Placed => e.starting += 1,
                _ => {}
            }
        }
        let c = &h.info.capacity;
        Ok(HostView {
            id: h.id.clone(),
            state: state_str(h.info.state).into(),
            address: h.info.address.clone(),
            zone: h.info.zone.clone(),
            labels: h.info.labels.clone(),
            capacity: CapacityReport {
                memory_total_mib: c.memory_mib,
                memory_free_mib: c.memory_free_mib,
                cpus: c.cpus,
                start_slots: c.start_slots,
                start_slots_free: c.start_slots_free,
            },
            masters: h
                .info
                .masters
                .iter()
                .map(|(k, v)| (k.clone(), held_str(*v).to_string()))
                .collect(),
            instances,
            lease_age_ms: now.0.saturating_sub(h.info.last_heartbeat.0),
            lease_left_ms: lease.map_or(0, |l| l.expires_at.0.saturating_sub(now.0)),
        })
    }

    /// Starts (`drain = true`) or ends a drain of host `id`. A draining
    /// host takes no new instances; the reconcile step moves its instances
    /// elsewhere, then marks it `drained`.
    pub fn drain(&self, id: &str, drain: bool, now: Millis) -> Result<HostView, ServiceError> {
        check_host_id(id)?;
        loop {
            let h = match self.store.get_host(id) {
                Ok(h) => h,
                Err(StoreError::NotFound { .. }) => {
                    return Err(ServiceError::NotFound {
                        kind: "host",
                        name: id.to_string(),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let mut info = h.info.clone();
            info.state = match (drain, info.state) {
                (true, HostState::Up) => HostState::Draining,
                (true, s) => s,
                (false, HostState::Draining | HostState::Drained) => HostState::Up,
                (false, s) => s,
            };
            if info.state == h.info.state {
                let placements = self.store.list_placements(&PlacementFilter::default())?;
                return self.host_view(&h, &placements, now);
            }
            match self.store.put_host(id, &info, Expect::At(h.revision)) {
                Ok(h) => {
                    tracing::info!(
                        host = id,
                        state = state_str(h.info.state),
                        "host drain changed"
                    );
                    let placements = self.store.list_placements(&PlacementFilter::default())?;
                    return self.host_view(&h, &placements, now);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A host's heartbeat: records its report, renews its lease, brings the
    /// slots placed there up to date with what it runs, and answers with
    /// every slot it must run.
    pub fn heartbeat(
        &self,
        id: &str,
        report: &HostReport,
        now: Millis,
    ) -> Result<Assignment, ServiceError> {
        check_host_id(id)?;
        check_address(&report.address)?;
        let masters: BTreeMap<String, MasterHeld> = report
            .masters
            .iter()
            .map(|m| (m.name.clone(), m.state))
            .collect();
        let c = &report.capacity;
        // Record the report; a lost host that heartbeats is back.
        loop {
            let (expect, state, before) = match self.store.get_host(id) {
                Ok(h) => (Expect::At(h.revision), h.info.state, Some(h.info.state)),
                Err(StoreError::NotFound { .. }) => (Expect::Absent, HostState::Up, None),
                Err(e) => return Err(e.into()),
            };
            let state = if state == HostState::Lost {
                HostState::Up
            } else {
                state
            };
            let info = HostInfo {
                zone: report.zone.clone(),
                labels: report.labels.clone(),
                address: report.address.clone(),
                capacity: Capacity {
                    memory_mib: c.memory_total_mib,
                    cpus: c.cpus,
                    start_slots: c.start_slots,
                    memory_free_mib: c.memory_free_mib.min(c.memory_total_mib),
                    start_slots_free: c.start_slots_free.min(c.start_slots),
                },
                masters: masters.clone(),
                snapshot_bytes: report
                    .masters
                    .iter()
                    .filter_map(|m| Some((m.name.clone(), m.snapshot_bytes?)))
                    .collect(),
                last_heartbeat: now,
                state,
            };
            match self.store.put_host(id, &info, expect) {
                Ok(_) => {
                    match before {
                        None => tracing::info!(host = id, address = %report.address, "host joined"),
                        Some(HostState::Lost) => tracing::info!(host = id, "lost host returned"),
                        _ => {}
                    }
                    break;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.store.grant_lease(id, self.cfg.lease_ttl, now)?;

        // Bring this host's slot records up to date with what it runs.
        let records = self.store.list_placements(&PlacementFilter {
            app: None,
            host: Some(id.to_string()),
        })?;
        let reported: BTreeMap<(&str, u32), &crate::wire::InstanceReport> = report
            .instances
            .iter()
            .map(|i| ((i.app.as_str(), i.slot), i))
            .collect();
        let mut by_app: BTreeMap<&str, Vec<PlacementWrite>> = BTreeMap::new();
        for p in &records {
            let seen = reported
                .get(&(p.app.as_str(), p.slot))
                .filter(|i| i.instance_id == p.instance_id);
            let next = match (p.state, seen.map(|i| i.state.as_str())) {
                (PlacementState::Placed, Some("running")) => Some((PlacementState::Running, None)),
                (PlacementState::Placed | PlacementState::Running, Some("failed")) => Some((
                    PlacementState::Failed,
                    seen.and_then(|i| i.reason.clone())
                        .or_else(|| Some("the host reports it failed".into())),
                )),
                (PlacementState::Running, None) => Some((
                    PlacementState::Failed,
                    Some("the host no longer runs it".into()),
                )),
                _ => None,
            };
            if let Some((state, reason)) = next {
                if let Some(r) = reason {
                    self.event(&p.app, now, "failed", Some(p.slot), Some(id), r);
                } else {
                    self.event(
                        &p.app,
                        now,
                        "running",
                        Some(p.slot),
                        Some(id),
                        p.instance_id.clone(),
                    );
                }
                by_app
                    .entry(p.app.as_str())
                    .or_default()
                    .push(PlacementWrite {
                        slot: p.slot,
                        expect: Expect::At(p.revision),
                        op: PlacementOp::Put {
                            host: p.host.clone(),
                            instance_id: p.instance_id.clone(),
                            state,
                        },
                    });
            }
        }
        for (app, writes) in by_app {
            match self.store.commit_placements(app, Expect::Any, &writes) {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.assignment(id, now)
    }

    /// What host `id` must run and hold.
    fn assignment(&self, id: &str, _now: Millis) -> Result<Assignment, ServiceError> {
        let records = self.store.list_placements(&PlacementFilter {
            app: None,
            host: Some(id.to_string()),
        })?;
        let apps: BTreeMap<String, App> = self
            .store
            .list_apps()?
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect();
        let hosts = self.store.list_hosts()?;
        let all = self.store.list_placements(&PlacementFilter::default())?;
        let mut instances = Vec::new();
        let mut masters: BTreeMap<String, MasterAssignment> = BTreeMap::new();
        for p in &records {
            let Some(app) = apps.get(&p.app) else {
                continue;
            };
            if p.slot >= app.spec.instances
                || !matches!(p.state, PlacementState::Placed | PlacementState::Running)
            {
                continue;
            }
            let master = master_key(&app.name, &app.spec);
            let tenant = split_key(&app.name).0;
            if !masters.contains_key(&master) {
                let source = master_source(id, &master, &apps, &hosts, &all);
                masters.insert(
                    master.clone(),
                    MasterAssignment {
                        spec: app.spec.master.clone(),
                        tenant: tenant.clone(),
                        source,
                    },
                );
            }
            instances.push(AssignedInstance {
                app: p.app.clone(),
                slot: p.slot,
                instance_id: p.instance_id.clone(),
                tenant,
                master,
                health: app.spec.health.clone(),
                on_host_loss: app.spec.on_host_loss,
            });
        }
        // Masters wanted ahead of demand: the first `ahead` up hosts in id
        // order that match the app's constraints.
        for app in apps.values().filter(|a| a.spec.master.ahead > 0) {
            let master = master_key(&app.name, &app.spec);
            if masters.contains_key(&master) {
                continue;
            }
            let selectors: Vec<Selector> = app
                .spec
                .placement
                .constraints
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect();
            let chosen = hosts
                .iter()
                .filter(|h| h.info.state == HostState::Up)
                .filter(|h| selectors.iter().all(|s| s.matches(&h.info.labels)))
                .take(app.spec.master.ahead as usize)
                .any(|h| h.id == id);
            if chosen {
                let source = master_source(id, &master, &apps, &hosts, &all);
                masters.insert(
                    master,
                    MasterAssignment {
                        spec: app.spec.master.clone(),
                        tenant: split_key(&app.name).0,
                        source,
                    },
                );
            }
        }
        Ok(Assignment {
            lease_ttl_ms: self.cfg.lease_ttl.as_millis() as u64,
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
            masters: masters.into_values().collect(),
            instances,
        })
    }

    // -------------------------------------------------------- reconcile

    /// This replica leads from `now` (it started, or won an election). The
    /// leases in the store were renewed by whoever answered heartbeats
    /// before; while no replica answered (a scheduler restart, a
    /// handover), hosts could not renew them. So for one lease TTL no host
    /// is found lost: they get a full lease to reach this replica, and a
    /// scheduler outage never turns into every host lost and every
    /// instance placed again (Nomad resets heartbeat TTLs on a new leader
    /// for the same reason).
    pub fn begin_leading(&self, now: Millis) {
        *lock(&self.grace_until) = now.saturating_add(self.cfg.lease_ttl);
        tracing::info!(
            grace_ms = self.cfg.lease_ttl.as_millis() as u64,
            "leading: hosts get one lease to check in"
        );
    }

    /// One reconcile step at `now` (see the module doc). Idempotent.
    pub fn reconcile(&self, now: Millis) -> Result<Step, ServiceError> {
        let mut step = Step::default();
        // 1. Hosts whose lease ran out are lost (not during the grace that
        //    follows the start of this replica's lead).
        let grace = now < *lock(&self.grace_until);
        let expired: BTreeSet<String> = self
            .store
            .expired_leases(now)?
            .into_iter()
            .map(|l| l.host)
            .collect();
        let mut hosts = self.store.list_hosts()?;
        for h in hosts.iter_mut().filter(|_| !grace) {
            let leased = match self.store.get_lease(&h.id) {
                Ok(_) => !expired.contains(&h.id),
                Err(StoreError::NotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            if leased || h.info.state == HostState::Lost {
                continue;
            }
            let mut info = h.info.clone();
            info.state = HostState::Lost;
            match self.store.put_host(&h.id, &info, Expect::At(h.revision)) {
                Ok(new) => {
                    tracing::warn!(host = %h.id, "host lost: its lease ran out");
                    *h = new;
                    step.lost += 1;
                }
                Err(StoreError::Conflict { .. }) => step.conflicts += 1,
                Err(e) => return Err(e.into()),
            }
        }
        let by_id: BTreeMap<&str, &store::Host> =
            hosts.iter().map(|h| (h.id.as_str(), h)).collect();
        let apps = self.store.list_apps()?;
        let placements = self.store.list_placements(&PlacementFilter::default())?;

        // The placement model: hosts that are not lost; free memory and
        // start slots less what is placed there and not yet running.
        let mut cluster = self.model(&hosts, &apps, &placements)?;

        // 2. Each app.
        let mut shortfalls = BTreeMap::new();
        for app in &apps {
            let recs: Vec<&Placement> = placements.iter().filter(|p| p.app == app.name).collect();
            let desired = app.spec.instances;
            let mut writes = Vec::new();
            let mut again: Vec<(u32, Expect, &'static str)> = Vec::new();
            let mut taken = BTreeSet::new();
            for p in &recs {
                taken.insert(p.slot);
                if p.slot >= desired {
                    writes.push(PlacementWrite {
                        slot: p.slot,
                        expect: Expect::At(p.revision),
                        op: PlacementOp::Delete,
                    });
                    self.event(
                        &app.name,
                        now,
                        "stopped",
                        Some(p.slot),
                        Some(&p.host),
                        "surplus after a scale down".into(),
                    );
                    step.stopped += 1;
                    continue;
                }
                let host_state = by_id.get(p.host.as_str()).map(|h| h.info.state);
                let why = match (p.state, host_state) {
                    (PlacementState::Failed, _) => Some("it failed"),
                    (_, None) => Some("its host left"),
                    (_, Some(HostState::Lost)) if app.spec.on_host_loss == OnHostLoss::Recreate => {
                        Some("its host was lost")
                    }
                    (_, Some(HostState::Draining | HostState::Drained)) => {
                        Some("its host is draining")
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    again.push((p.slot, Expect::At(p.revision), why));
                }
            }
            for slot in 0..desired {
                if !taken.contains(&slot) {
                    again.push((slot, Expect::Absent, "new"));
                }
            }
            let previous = lock(&self.shortfalls).remove(&app.name);
            if !again.is_empty() {
                let req = request(app, &hosts);
                let batch = cluster
                    .place_batch(&req, again.len() as u32)
                    .map_err(|e| ServiceError::Invalid(format!("app {}: {e}", app.name)))?;
                for ((slot, expect, why), res) in again.iter().zip(&batch.reservations) {
                    writes.push(PlacementWrite {
                        slot: *slot,
                        expect: *expect,
                        op: PlacementOp::Put {
                            host: res.host.0.clone(),
                            instance_id: instance_id(&app.name, *slot, now),
                            state: PlacementState::Placed,
                        },
                    });
                    let action = if *why == "new" { "placed" } else { "replaced" };
                    self.event(
                        &app.name,
                        now,
                        action,
                        Some(*slot),
                        Some(&res.host.0),
                        why.to_string(),
                    );
                }
                if let Some(s) = &batch.shortfall {
                    let unplaced = s.requested - s.placed;
                    let reason = match s.reason {
                        placement::ShortfallReason::NoHosts => "no_hosts",
                        placement::ShortfallReason::Capacity => "capacity",
                        placement::ShortfallReason::Constraints => "constraints",
                        placement::ShortfallReason::Drained => "drained",
                    };
                    let message = s.to_string();
                    let view = ShortfallView {
                        reason: reason.into(),
                        unplaced,
                        message,
                    };
                    if previous.as_ref() != Some(&view) {
                        self.event(
                            &app.name,
                            now,
                            "shortfall",
                            None,
                            None,
                            view.message.clone(),
                        );
                    }
                    shortfalls.insert(app.name.clone(), view);
                }
            }
            if writes.is_empty() {
                continue;
            }
            match self
                .store
                .commit_placements(&app.name, Expect::At(app.generation), &writes)
            {
                Ok(_) => {
                    step.placed += writes
                        .iter()
                        .filter(|w| matches!(w.op, PlacementOp::Put { .. }))
                        .count() as u32
                }
                Err(StoreError::Conflict { .. }) => step.conflicts += 1,
                Err(e) => return Err(e.into()),
            }
        }
        lock(&self.shortfalls).extend(shortfalls);

        // 3. Records of deleted apps.
        let live: BTreeSet<&str> = apps.iter().map(|a| a.name.as_str()).collect();
        let mut orphans: BTreeMap<&str, Vec<PlacementWrite>> = BTreeMap::new();
        for p in placements.iter().filter(|p| !live.contains(p.app.as_str())) {
            orphans
                .entry(p.app.as_str())
                .or_default()
                .push(PlacementWrite {
                    slot: p.slot,
                    expect: Expect::At(p.revision),
                    op: PlacementOp::Delete,
                });
        }
        for (app, writes) in orphans {
            match self.store.commit_placements(app, Expect::Absent, &writes) {
                Ok(_) => {
                    step.stopped += writes.len() as u32;
                    lock(&self.shortfalls).remove(app);
                }
                Err(StoreError::Conflict { .. }) => step.conflicts += 1,
                Err(e) => return Err(e.into()),
            }
        }

        // 4. Draining hosts with nothing left are drained.
        for h in hosts.iter().filter(|h| h.info.state == HostState::Draining) {
            let left = self.store.list_placements(&PlacementFilter {
                app: None,
                host: Some(h.id.clone()),
            })?;
            if left.is_empty() {
                let mut info = h.info.clone();
                info.state = HostState::Drained;
                match self.store.put_host(&h.id, &info, Expect::At(h.revision)) {
                    Ok(_) => tracing::info!(host = %h.id, "host drained"),
                    Err(StoreError::Conflict { .. }) => step.conflicts += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(step)
    }

    fn model(
        &self,
        hosts: &[store::Host],
        apps: &[App],
        placements: &[Placement],
    ) -> Result<Cluster, ServiceError> {
        let apps: BTreeMap<&str, &App> = apps.iter().map(|a| (a.name.as_str(), a)).collect();
        let mut model = Vec::new();
        for h in hosts.iter().filter(|h| h.info.state != HostState::Lost) {
            let mut in_flight_mib = 0u64;
            let mut instances: BTreeMap<String, u32> = BTreeMap::new();
            for p in placements.iter().filter(|p| p.host == h.id) {
                if !matches!(p.state, PlacementState::Placed | PlacementState::Running) {
                    continue;
                }
                *instances.entry(p.app.clone()).or_default() += 1;
                if p.state == PlacementState::Placed {
                    in_flight_mib += apps
                        .get(p.app.as_str())
                        .map_or(0, |a| a.spec.master.memory_mib);
                }
            }
            let c = &h.info.capacity;
            let total = c.memory_mib.max(1);
            model.push(placement::Host {
                id: HostId(h.id.clone()),
                zone: h.info.zone.clone(),
                labels: h.info.labels.clone(),
                memory_total_mib: total,
                memory_free_mib: c.memory_free_mib.min(total).saturating_sub(in_flight_mib),
                cpus: c.cpus,
                // Start slots pace the starts on the host (its daemon
                // starts the slots assigned to it as its own slots free
                // up); they do not steer placement, or a spread app would
                // pile onto whichever host happens to start fastest (the
                // one that already holds the master).
                start_slots_free: u32::MAX,
                drained: h.info.state != HostState::Up,
                masters: h
                    .info
                    .masters
                    .iter()
                    .filter_map(|(k, v)| match v {
                        MasterHeld::Frozen => Some((k.clone(), placement::MasterState::Frozen)),
                        MasterHeld::Files => Some((k.clone(), placement::MasterState::Files)),
                        MasterHeld::Pending => None,
                    })
                    .collect(),
                instances,
                link_bytes_per_s: LINK_BYTES_PER_S,
            });
        }
        Cluster::new(model).map_err(|e| ServiceError::Invalid(format!("host reports: {e}")))
    }
}

/// A host id: 1–63 of `a-z A-Z 0-9 - _ .`.
pub fn check_host_id(id: &str) -> Result<(), ServiceError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!(
            "host id {id:?}: use 1-63 characters a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

/// A daemon's address as peers fetch masters from it: `http://HOST:PORT`
/// with a port, no path, at most 255 characters.
pub fn check_address(address: &str) -> Result<(), ServiceError> {
    let hostport = address.strip_prefix("http://").unwrap_or("");
    let ok = address.len() <= 255
        && hostport.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(['/', '?', '#', '@', ' '])
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
    if ok {
        Ok(())
    } else {
        Err(ServiceError::Invalid(format!(
            "address {address:?}: use http://HOST:PORT, where other daemons reach this one"
        )))
    }
}

/// An instance id for `app`'s `slot` placed at `now`: `NAME-SLOT-TAG`,
/// unique per placement (a slot placed again gets a new id, so a returning
/// host's old copy is told apart from the new one). The tag mixes the time
/// with the app's full key, so two tenants' apps of one name placed in the
/// same millisecond still differ.
fn instance_id(app: &str, slot: u32, now: Millis) -> String {
    let (_, name) = split_key(app);
    // FNV-1a of the key: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut n = (now.0 ^ h) % 36u64.pow(6);
    let mut tag = [b'0'; 6];
    for c in tag.iter_mut().rev() {
        let d = (n % 36) as u8;
        *c = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        n /= 36;
    }
    format!("{name}-{slot}-{}", String::from_utf8_lossy(&tag))
}

fn request(app: &App, hosts: &[store::Host]) -> Request {
    let master = master_key(&app.name, &app.spec);
    // What shipping the master costs: its data as a host holding it
    // reports it; the whole guest RAM until one does.
    let snapshot_bytes = hosts
        .iter()
        .filter(|h| h.info.masters.get(&master) == Some(&MasterHeld::Frozen))
        .filter_map(|h| h.info.snapshot_bytes.get(&master).copied())
        .max()
        .unwrap_or(app.spec.master.memory_mib << 20);
    Request {
        app: app.name.clone(),
        image: master,
        memory: CloneMemory {
            guest_ram_mib: app.spec.master.memory_mib,
            private_mib_per_clone: None,
            master_mib: app.spec.master.memory_mib,
        },
        vcpus: app.spec.master.vcpus,
        constraints: app
            .spec
            .placement
            .constraints
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        max_per_host: app.spec.placement.max_per_host,
        strategy: match app.spec.placement.strategy {
            store::Strategy::Binpack => placement::Strategy::Binpack,
            store::Strategy::Spread => {
                placement::Strategy::Spread(match app.spec.placement.spread_by {
                    store::SpreadBy::Host => placement::SpreadBy::Host,
                    store::SpreadBy::Zone => placement::SpreadBy::Zone,
                })
            }
        },
        snapshot_bytes,
    }
}

/// Where host `id` gets master `master`: `None` when it holds it, or when
/// it is the one host chosen to boot it (no host holds or makes it, and it
/// is the first, by id, of the up hosts with the master's slots placed);
/// otherwise the host that holds it frozen (or, while none does, the one
/// making it: wait for it).
fn master_source(
    id: &str,
    master: &str,
    apps: &BTreeMap<String, App>,
    hosts: &[store::Host],
    placements: &[Placement],
) -> Option<MasterSource> {
    let up = |h: &&store::Host| matches!(h.info.state, HostState::Up | HostState::Draining);
    let held = |h: &store::Host| h.info.masters.get(master).copied();
    let me = hosts.iter().find(|h| h.id == id);
    if me.and_then(held).is_some() {
        // Held (frozen or as files) or being made here already.
        return None;
    }
    let src = |h: &store::Host, ready| MasterSource {
        host: h.id.clone(),
        address: h.info.address.clone(),
        ready,
    };
    if let Some(h) = hosts
        .iter()
        .filter(up)
        .find(|h| held(h) == Some(MasterHeld::Frozen))
    {
        return Some(src(h, true));
    }
    if let Some(h) = hosts
        .iter()
        .filter(up)
        .find(|h| held(h) == Some(MasterHeld::Pending))
    {
        return Some(src(h, false));
    }
    // Nobody has it: the first up host (by id) with a slot of an app of
    // this master boots it; the others wait for it.
    let wanted: BTreeSet<&str> = placements
        .iter()
        .filter(|p| {
            apps.get(&p.app)
                .is_some_and(|a| master_key(&a.name, &a.spec) == master)
        })
        .map(|p| p.host.as_str())
        .collect();
    let seed = hosts
        .iter()
        .filter(up)
        .find(|h| wanted.contains(h.id.as_str()) || h.id == id)?;
    if seed.id == id {
        None
    } else {
        Some(src(seed, false))
    }
}

#[cfg(test)]
mod tests;
