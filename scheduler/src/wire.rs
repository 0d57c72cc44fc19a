//! The messages of the scheduler's API: what a user declares (an app), what
//! the scheduler shows (app status, hosts), and the daemon ↔ scheduler
//! heartbeat (a host's report in, its assignment out). Plain serde types
//! with OpenAPI schemas; the HTTP routes live in the `api` crate.
//!
//! The heartbeat is the whole membership protocol: a daemon that joined
//! posts its report every `heartbeat_ms`; the answer renews its lease and
//! lists every instance slot the host must run (*pull*, as Nomad's clients
//! do). The daemon starts what is listed and missing, stops what it runs
//! that is not listed, and stops its `recreate` instances by itself when it
//! could not renew its lease for most of a TTL (so a host cut off never
//! keeps a copy of a slot that was placed again elsewhere).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::{HealthSpec, MasterHeld, MasterSpec, OnHostLoss};

/// Label on a daemon's instances that names the scheduler app.
pub const LABEL_APP: &str = "zygote.app";
/// Label on a daemon's instances that names the slot.
pub const LABEL_SLOT: &str = "zygote.slot";

/// `PUT /v1/apps/{name}`: an app's desired state. Omitted fields take the
/// defaults shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppBody {
    /// The image spec: the scheduler makes this master where it is needed.
    pub master: MasterBody,
    /// How many instances should run (0 to 10000).
    #[schema(maximum = 10000)]
    pub instances: u32,
    /// Where instances go.
    #[serde(default)]
    pub placement: PlacementBody,
    /// How instances are checked.
    #[serde(default)]
    pub health: HealthBody,
    /// `recreate` (default): place a lost host's instances again elsewhere;
    /// `leave`: keep their slots until the host returns.
    #[serde(default = "default_on_host_loss")]
    pub on_host_loss: OnHostLoss,
    /// The user's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_on_host_loss() -> OnHostLoss {
    OnHostLoss::Recreate
}

/// The master an app clones.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MasterBody {
    /// Its name (one image cluster-wide, per tenant): 1-24 of `a-z 0-9 -`,
    /// starting with a letter or digit.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,23}$")]
    pub name: String,
    /// Guest RAM, MiB (16 to 1048576; default 256).
    #[serde(default = "default_memory")]
    #[schema(minimum = 16, maximum = 1048576, default = 256)]
    pub memory_mib: u64,
    /// vCPUs (1 to 64; default 1).
    #[serde(default = "default_vcpus")]
    #[schema(minimum = 1, maximum = 64, default = 1)]
    pub vcpus: u32,
    /// Warm-up shell command run before the freeze.
    #[serde(default)]
    pub warmup: Option<String>,
    /// Hosts that should hold the master ahead of demand (0 to 1000;
    /// default 0).
    #[serde(default)]
    #[schema(maximum = 1000)]
    pub ahead: u32,
}

fn default_memory() -> u64 {
    256
}

fn default_vcpus() -> u32 {
    1
}

/// Placement rules.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementBody {
    /// `spread` (default) or `binpack`.
    #[serde(default = "default_strategy")]
    pub strategy: crate::store::Strategy,
    /// What `spread` spreads over: `host` (default) or `zone`.
    #[serde(default = "default_spread_by")]
    pub spread_by: crate::store::SpreadBy,
    /// Label selectors every host must satisfy: `k=v`, `k!=v`, `k in (a,b)`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// At most this many of the app's instances on one host (at least 1;
    /// none: no limit).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_per_host: Option<u32>,
}

fn default_strategy() -> crate::store::Strategy {
    crate::store::Strategy::Spread
}

fn default_spread_by() -> crate::store::SpreadBy {
    crate::store::SpreadBy::Host
}

impl Default for PlacementBody {
    fn default() -> Self {
        PlacementBody {
            strategy: default_strategy(),
            spread_by: default_spread_by(),
            constraints: Vec::new(),
            max_per_host: None,
        }
    }
}

/// Health checks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthBody {
    /// A shell command run in the guest (exit 0 = healthy); none: the
    /// agent's ping.
    #[serde(default)]
    pub command: Option<String>,
    /// Seconds between checks (1 to 86400; default 10).
    #[serde(default = "default_interval")]
    #[schema(minimum = 1, maximum = 86400, default = 10)]
    pub interval_s: u32,
    /// Consecutive failures after which an instance is replaced (1 to
    /// 1000; default 3).
    #[serde(default = "default_failures")]
    #[schema(minimum = 1, maximum = 1000, default = 3)]
    pub failures_to_replace: u32,
}

fn default_interval() -> u32 {
    10
}

fn default_failures() -> u32 {
    3
}

impl Default for HealthBody {
    fn default() -> Self {
        HealthBody {
            command: None,
            interval_s: default_interval(),
            failures_to_replace: default_failures(),
        }
    }
}

/// Instances of an app on one host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct HostCount {
    /// Running (the host reports them).
    pub running: u32,
    /// Placed there and being started.
    pub starting: u32,
}

/// Why fewer instances run than were declared.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ShortfallView {
    /// `capacity`, `constraints`, `drained`, `no_hosts`, `host_lost` (slots
    /// of lost hosts left empty: `on_host_loss: leave`), `failures`
    /// (instances failed in the last minute; the message has the latest
    /// reason).
    pub reason: String,
    /// Instances that could not be placed.
    pub unplaced: u32,
    /// A sentence for the user.
    pub message: String,
}

/// One thing the scheduler did to an app, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct AppEvent {
    /// When (Unix ms).
    pub at_ms: u64,
    /// `placed`, `replaced`, `stopped`, `failed`, `running`, `shortfall`.
    pub action: String,
    /// The slot, if about one.
    pub slot: Option<u32>,
    /// The host, if about one.
    pub host: Option<String>,
    /// Why.
    pub reason: String,
}

/// `GET /v1/apps/{name}`: desired vs actual.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AppStatus {
    /// Name (as its owner knows it).
    pub name: String,
    /// Rises with every change of the spec.
    pub generation: u64,
    /// The desired state as stored.
    pub spec: AppBody,
    /// Instances declared.
    pub desired: u32,
    /// Instances running.
    pub running: u32,
    /// Instances placed and being started.
    pub starting: u32,
    /// Per host.
    pub per_host: BTreeMap<String, HostCount>,
    /// Set when fewer run or are starting than declared.
    pub shortfall: Option<ShortfallView>,
    /// Hosts holding the app's master frozen.
    pub master_hosts: Vec<String>,
    /// The latest events, oldest first (at most 50).
    pub events: Vec<AppEvent>,
}

/// A host's capacity and what is free of it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct CapacityReport {
    /// Memory the daemon admits guests into, MiB.
    pub memory_total_mib: u64,
    /// Of which free (as its admission counts), MiB.
    pub memory_free_mib: u64,
    /// CPUs.
    pub cpus: u32,
    /// Clones it may start at once.
    pub start_slots: u32,
    /// Start slots free now.
    pub start_slots_free: u32,
}

/// A master a host holds or is making.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct MasterReport {
    /// Its name on the daemon (`NAME` or `NAME.TENANT`).
    pub name: String,
    /// `frozen` (clones start at once), `files`, or `pending` (booting,
    /// warming, or arriving from a peer).
    pub state: MasterHeld,
    /// Bytes of its snapshot that travel (data only).
    #[serde(default)]
    pub snapshot_bytes: Option<u64>,
}

/// One instance of a scheduler app as the host sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct InstanceReport {
    /// The app (store key: `NAME` or `NAME.TENANT`).
    pub app: String,
    /// Its slot.
    pub slot: u32,
    /// Its id on the host.
    pub instance_id: String,
    /// `starting`, `running`, `failed` (it ended or failed its health
    /// checks; `reason` says which).
    pub state: String,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/hosts/{id}/heartbeat`: what a daemon reports.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostReport {
    /// Where its API answers other daemons (`http://HOST:PORT`).
    #[schema(
        pattern = r"^http://[^/?#@ ]+:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$",
        max_length = 255
    )]
    pub address: String,
    /// Its zone.
    #[serde(default)]
    pub zone: String,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: CapacityReport,
    /// Masters held or being made.
    #[serde(default)]
    pub masters: Vec<MasterReport>,
    /// Its instances of scheduler apps.
    #[serde(default)]
    pub instances: Vec<InstanceReport>,
}

/// Where a host gets a master it lacks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct MasterSource {
    /// The host that holds it (or is making it: wait for it to freeze).
    pub host: String,
    /// Its daemon's address.
    pub address: String,
    /// Whether it is frozen there now (false: still being made).
    pub ready: bool,
}

/// What a host must make of a master.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct MasterAssignment {
    /// The app's master spec (the daemon's name is `name`, or
    /// `name.TENANT` for a tenant's app).
    pub spec: MasterSpec,
    /// The tenant that owns it (none: the admin).
    pub tenant: Option<String>,
    /// Fetch it from here; `None`: boot it here (this host was chosen to
    /// make it).
    pub source: Option<MasterSource>,
}

/// One instance slot a host must run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct AssignedInstance {
    /// App (store key).
    pub app: String,
    /// Slot.
    pub slot: u32,
    /// The id to give it.
    pub instance_id: String,
    /// The tenant it belongs to (none: the admin).
    pub tenant: Option<String>,
    /// The master (daemon name) it clones.
    pub master: String,
    /// How to check it.
    pub health: HealthSpec,
    /// What to do when this host loses its lease.
    pub on_host_loss: OnHostLoss,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    /// The lease runs out this long after the heartbeat arrived.
    pub lease_ttl_ms: u64,
    /// Send the next heartbeat within this long.
    pub heartbeat_ms: u64,
    /// Masters this host must hold (for the instances below, or ahead of
    /// demand).
    pub masters: Vec<MasterAssignment>,
    /// Every slot this host must run; anything else of a scheduler app it
    /// runs is to be stopped.
    pub instances: Vec<AssignedInstance>,
}

/// `GET /v1/hosts`: one host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    /// Its id.
    pub id: String,
    /// `up`, `draining`, `drained`, `lost`.
    pub state: String,
    /// Its daemon's address.
    pub address: String,
    /// Zone.
    pub zone: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Capacity as last reported.
    pub capacity: CapacityReport,
    /// Masters: `frozen`, `files` or `pending`, by daemon name.
    pub masters: BTreeMap<String, String>,
    /// Scheduler instances placed there, by app.
    pub instances: BTreeMap<String, HostCount>,
    /// Milliseconds since its last heartbeat.
    pub lease_age_ms: u64,
    /// Milliseconds until its lease runs out (0: expired).
    pub lease_left_ms: u64,
}
