//! The scheduler's store: the one trait ([`Store`]) through which the
//! scheduler keeps what it must not lose across restarts (apps' desired
//! state, hosts, placement records, host leases), the typed records it
//! holds, and the store's errors; and [`Leadership`], which scheduler
//! replica is the active one. Backends live beside it: [`embedded`] (redb,
//! one machine) and [`etcd`] (a cluster); both pass the same behaviour suite
//! (`suite.rs`).
//!
//! Changes are pushed, not polled: [`Store::watch`] hands out a
//! `tokio::sync::watch::Receiver` of the store revision after the last
//! change of an app, a host or a placement (lease renewals do not wake it).
//!
//! It must not: read a clock (every time is passed in by the caller, so
//! leases and tests are deterministic), place clones (that is
//! [`crate::placement`]), or do I/O outside a backend module. Only the
//! backends talk to a database (neon's `persistence.rs` rule).
//!
//! # Why the trait is synchronous
//!
//! The embedded backend (redb) is a blocking API whose write transactions
//! are serialised by the database itself; an async trait would only wrap
//! each call in `spawn_blocking`. Store calls are few and coarse (a batch of
//! placements is one call), so the async scheduler calls the store from a
//! blocking thread, and the etcd backend drives its async client on a
//! runtime it owns (so it works from any thread, including a
//! `spawn_blocking` thread of the caller's runtime). A sync trait also keeps
//! the shared test suite plain.

pub mod embedded;
pub mod etcd;
#[cfg(test)]
mod suite;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The record format this build writes and reads. A record carrying another
/// `version` is refused with [`StoreError::UnsupportedVersion`].
pub const FORMAT_VERSION: u32 = 1;

/// A point in time the caller read from its clock: milliseconds since the
/// Unix epoch. The store never reads a clock itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Millis(pub u64);

impl Millis {
    /// `self + d`, saturating at the end of time rather than wrapping.
    pub fn saturating_add(self, d: Duration) -> Millis {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Millis(self.0.saturating_add(ms))
    }
}

/// The image spec of an app's master: what the scheduler boots (or ships)
/// where clones of it are needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MasterSpec {
    /// The image name.
    pub name: String,
    /// Guest RAM of the master (and of each clone), MiB.
    pub memory_mib: u64,
    /// vCPUs of the master (and of each clone).
    pub vcpus: u32,
    /// The command the master runs to warm up before it is frozen.
    pub warmup: Option<String>,
    /// Hosts that should hold the master frozen ahead of demand (the
    /// scheduler ships it there even before a clone is placed); 0: only
    /// where clones are.
    #[serde(default)]
    pub ahead: u32,
}

/// Spread or pack (mirrors [`crate::placement::Strategy`]'s two kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Keep the app's counts even across `spread_by` domains.
    Spread,
    /// Fill the fewest hosts.
    Binpack,
}

/// The domain a `spread` app is spread over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SpreadBy {
    /// Even counts per host.
    Host,
    /// Even counts per zone.
    Zone,
}

/// Where an app's instances may go and how they are laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// Spread or pack.
    pub strategy: Strategy,
    /// What `spread` spreads over (ignored by `binpack`).
    pub spread_by: SpreadBy,
    /// Label selectors every host must satisfy, as written by the user
    /// (`k=v`, `k!=v`, `k in (a,b)`); parsed by [`crate::placement::Selector`].
    pub constraints: Vec<String>,
    /// At most this many of the app's instances on one host.
    pub max_per_host: Option<u32>,
}

/// How the app's instances are health-checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthSpec {
    /// The command run in the guest; `None`: the agent's ping only.
    pub command: Option<String>,
    /// Seconds between checks.
    pub interval_s: u32,
    /// Consecutive failures after which the instance is replaced.
    pub failures_to_replace: u32,
}

/// What happens to an app's instances when their host is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnHostLoss {
    /// Place them again elsewhere.
    Recreate,
    /// Leave the slots empty until the host returns.
    Leave,
}

/// An app's desired state, as the user declared it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    /// The master image its clones come from.
    pub master: MasterSpec,
    /// How many instances should run.
    pub instances: u32,
    /// Placement rules.
    pub placement: PlacementSpec,
    /// Health checks.
    pub health: HealthSpec,
    /// Recreate or leave the instances of a lost host.
    pub on_host_loss: OnHostLoss,
    /// The user's labels on the app.
    pub labels: BTreeMap<String, String>,
}

/// A stored app: its spec and the generation it is at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    /// Record format ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The app's name (its key).
    pub name: String,
    /// Strictly increases on every change of the app, and is never reused,
    /// not even after the app is deleted and declared again: it is the
    /// store revision of the app's last change (etcd's `mod_revision`), so
    /// it is not contiguous.
    pub generation: u64,
    /// The desired state.
    pub spec: AppSpec,
}

/// A host's capacity as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory for guests, MiB.
    pub memory_mib: u64,
    /// CPUs.
    pub cpus: u32,
    /// Clones it may be starting at once.
    pub start_slots: u32,
    /// Memory still free for guests as the host's own admission counts it,
    /// MiB (not counting placements the scheduler has in flight).
    #[serde(default)]
    pub memory_free_mib: u64,
    /// Start slots free now.
    #[serde(default)]
    pub start_slots_free: u32,
}

/// How a host holds a master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MasterHeld {
    /// Frozen in memory: clones start at once.
    Frozen,
    /// Only its snapshot files: it must be thawed first.
    Files,
    /// Being made there (booting, warming) or received from a peer.
    Pending,
}

/// A host's membership state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Takes new instances.
    Up,
    /// Its instances are being moved away; takes no new ones.
    Draining,
    /// Empty after a drain; takes no new instances.
    Drained,
    /// Its lease expired.
    Lost,
}

/// What a host reports about itself (and the scheduler's view of its state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Its zone.
    pub zone: String,
    /// Its labels (matched by constraints).
    pub labels: BTreeMap<String, String>,
    /// Where its daemon's API answers.
    pub address: String,
    /// Its capacity.
    pub capacity: Capacity,
    /// Masters it holds, by image name.
    pub masters: BTreeMap<String, MasterHeld>,
    /// Bytes of each frozen master's snapshot that travel to another host
    /// (its data, not its holes), by image name, as reported.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshot_bytes: BTreeMap<String, u64>,
    /// When its last heartbeat arrived (the caller's clock).
    pub last_heartbeat: Millis,
    /// Membership state.
    pub state: HostState,
}

/// A stored host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Record format ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The host's id (its key).
    pub id: String,
    /// Store revision of the record's last change.
    pub revision: u64,
    /// What it reported.
    pub info: HostInfo,
}

/// The life of one placed instance slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementState {
    /// Chosen a host; the clone is not started yet.
    Placed,
    /// The host reports the clone running.
    Running,
    /// Being stopped (surplus, replaced, or its app deleted).
    Stopping,
    /// The clone failed to start or its health checks failed.
    Failed,
}

/// One instance slot of an app and where it is placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Record format ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The app.
    pub app: String,
    /// The slot index, `0..instances`.
    pub slot: u32,
    /// Store revision of the record's last change: the record version that
    /// a compare-and-set names.
    pub revision: u64,
    /// The host it is placed on.
    pub host: String,
    /// The instance's id on that host.
    pub instance_id: String,
    /// Its state.
    pub state: PlacementState,
}

/// A host's liveness lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Record format ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The host it keeps alive.
    pub host: String,
    /// The lease's time to live, as granted.
    pub ttl_ms: u64,
    /// It expires at this time (the caller's clock at the grant + TTL).
    pub expires_at: Millis,
}

impl Lease {
    /// Whether the lease has run out at `now` (the caller's clock).
    pub fn is_expired(&self, now: Millis) -> bool {
        now >= self.expires_at
    }
}

/// The condition a compare-and-set puts on a key's current revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No condition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this revision (an app's generation, a
    /// record's `revision`).
    At(u64),
}

/// What a compare-and-set found instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The key does not exist.
    Absent,
    /// The key is at this revision.
    At(u64),
}

impl Expect {
    /// Whether `found` satisfies this condition.
    pub fn holds(self, found: Found) -> bool {
        match (self, found) {
            (Expect::Any, _) => true,
            (Expect::Absent, Found::Absent) => true,
            (Expect::At(want), Found::At(have)) => want == have,
            _ => false,
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Any => f.write_str("anything"),
            Expect::Absent => f.write_str("absent"),
            Expect::At(r) => write!(f, "revision {r}"),
        }
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Absent => f.write_str("absent"),
            Found::At(r) => write!(f, "revision {r}"),
        }
    }
}

/// What a placement write does to its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementOp {
    /// Create or replace the slot's record.
    Put {
        /// The host.
        host: String,
        /// The instance's id on that host.
        instance_id: String,
        /// Its state.
        state: PlacementState,
    },
    /// Remove the slot's record.
    Delete,
}

/// One slot's write in [`Store::commit_placements`], guarded by the slot
/// record's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementWrite {
    /// The slot.
    pub slot: u32,
    /// The condition on the slot's record: `Absent` to place an empty slot.
    pub expect: Expect,
    /// What to write.
    pub op: PlacementOp,
}

impl PlacementWrite {
    /// The record a `Put` stores for `app` at store revision `revision`;
    /// `None` for a `Delete`. Every backend writes exactly this.
    pub fn record(&self, app: &str, revision: u64) -> Option<Placement> {
        match &self.op {
            PlacementOp::Put {
                host,
                instance_id,
                state,
            } => Some(Placement {
                version: FORMAT_VERSION,
                app: app.to_owned(),
                slot: self.slot,
                revision,
                host: host.clone(),
                instance_id: instance_id.clone(),
                state: *state,
            }),
            PlacementOp::Delete => None,
        }
    }
}

/// Which placement records [`Store::list_placements`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementFilter {
    /// Only this app's.
    pub app: Option<String>,
    /// Only those on this host.
    pub host: Option<String>,
}

/// The kind of record an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An app.
    App,
    /// A host.
    Host,
    /// A placement record.
    Placement,
    /// A host's lease.
    Lease,
    /// The store's own metadata.
    Meta,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::App => "app",
            Kind::Host => "host",
            Kind::Placement => "placement",
            Kind::Lease => "lease",
            Kind::Meta => "store metadata",
        })
    }
}

/// The store's errors. `Conflict` is the expected outcome of a lost race,
/// not a fault: the caller re-reads and decides again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("{kind} {key} not found")]
    NotFound {
        /// Its kind.
        kind: Kind,
        /// Its key.
        key: String,
    },
    /// A compare-and-set lost: the record changed since the caller read it.
    /// Nothing of the write was applied.
    #[error("conflict on {kind} {key}: expected {expected}, found {found}; re-read and retry")]
    Conflict {
        /// The kind of the record whose condition failed.
        kind: Kind,
        /// Its key.
        key: String,
        /// The condition.
        expected: Expect,
        /// What was there.
        found: Found,
    },
    /// The stored bytes do not decode as a record.
    #[error("{kind} {key} is corrupt in the store")]
    Corrupt {
        /// Its kind.
        kind: Kind,
        /// Its key.
        key: String,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
    /// The record was written in a format this build does not read.
    #[error("{kind} {key} is in record format {found}; this build reads format {supported} only")]
    UnsupportedVersion {
        /// Its kind.
        kind: Kind,
        /// Its key.
        key: String,
        /// The record's `version`.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// The database could not be opened, read or written.
    #[error("store I/O failed while {context}")]
    Io {
        /// What the store was doing.
        context: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Shorthand for the store's results.
pub type Result<T> = std::result::Result<T, StoreError>;

/// What the scheduler keeps across restarts. Every call is atomic: it
/// applies whole or not at all. Writes that name an [`Expect`] are
/// compare-and-set: when the condition fails nothing is written and
/// [`StoreError::Conflict`] says what was expected and what was found.
///
/// Revisions (app generations, record revisions) come from one store-wide
/// counter that every successful write bumps, as etcd's revision does; a
/// revision is never reused, so a stale reader cannot match a record that
/// was deleted and written again.
pub trait Store: Send + Sync {
    /// Declare or change an app's desired state if its generation is
    /// `expect` (`Absent` to create only, `Any` to overwrite); returns the
    /// stored app with its new generation.
    fn put_app(&self, name: &str, spec: &AppSpec, expect: Expect) -> Result<App>;
    /// The app, or `NotFound`.
    fn get_app(&self, name: &str) -> Result<App>;
    /// Every app, by name.
    fn list_apps(&self) -> Result<Vec<App>>;
    /// Remove an app's desired state if its generation is `expect`. Its
    /// placement records stay: the reconciler stops those instances and
    /// deletes them with `commit_placements(name, Expect::Absent, ..)`.
    fn delete_app(&self, name: &str, expect: Expect) -> Result<()>;

    /// Record what a host reported if its record is at `expect`.
    fn put_host(&self, id: &str, info: &HostInfo, expect: Expect) -> Result<Host>;
    /// The host, or `NotFound`.
    fn get_host(&self, id: &str) -> Result<Host>;
    /// Every host, by id.
    fn list_hosts(&self) -> Result<Vec<Host>>;
    /// Forget a host if its record is at `expect` (its lease too).
    fn delete_host(&self, id: &str, expect: Expect) -> Result<()>;

    /// Apply `writes` to `app`'s slots in one transaction, if the app's
    /// generation is `app_generation` *and* every slot's record satisfies
    /// its own `expect`; otherwise nothing is written and the first failed
    /// condition is returned as a `Conflict`. Two reconcilers that read the
    /// same generation and both place an empty slot (`Expect::Absent`):
    /// exactly one wins. Returns the records written by `Put`s, in order.
    fn commit_placements(
        &self,
        app: &str,
        app_generation: Expect,
        writes: &[PlacementWrite],
    ) -> Result<Vec<Placement>>;
    /// One slot's record, or `NotFound`.
    fn get_placement(&self, app: &str, slot: u32) -> Result<Placement>;
    /// The records that match `filter`, ordered by (app, slot).
    fn list_placements(&self, filter: &PlacementFilter) -> Result<Vec<Placement>>;

    /// Grant or renew `host`'s lease: it expires `ttl` after `now`.
    fn grant_lease(&self, host: &str, ttl: Duration, now: Millis) -> Result<Lease>;
    /// The host's lease, or `NotFound` (never granted, or revoked).
    fn get_lease(&self, host: &str) -> Result<Lease>;
    /// Drop the host's lease (a clean leave); `NotFound` if it had none.
    fn revoke_lease(&self, host: &str) -> Result<()>;
    /// The leases that have run out at `now`, by host id.
    fn expired_leases(&self, now: Millis) -> Result<Vec<Lease>>;

    /// Changes, pushed: the receiver holds the store revision after the
    /// last committed change of an app, a host or a placement (lease grants
    /// and revokes do not count: heartbeats would wake the scheduler all the
    /// time), starting at the store's revision when it was opened. Await
    /// `changed()` on it, then re-list; several changes may be folded into
    /// one wake-up, and the value only rises. The etcd backend re-establishes
    /// its watch when the stream breaks; a scheduler still re-lists now and
    /// then, as a watch cannot report what it missed while etcd was
    /// unreachable until it is back.
    fn watch(&self) -> watch::Receiver<u64>;
}

/// Which of several scheduler replicas is the active one. One candidate at
/// a time holds leadership; the others wait in [`Leadership::campaign`].
pub trait Leadership: Send + Sync {
    /// Block until `candidate` (a name shown by [`Leadership::leader`], e.g.
    /// the replica's address) leads. `ttl` bounds how long a leader that
    /// died silently keeps the others waiting (the etcd backend keeps a
    /// lease of that TTL alive in the background). Call it from a blocking
    /// thread. Leadership lasts until the guard is dropped (which resigns)
    /// or the guard reports it lost.
    fn campaign(&self, candidate: &str, ttl: Duration) -> Result<LeaderGuard>;
    /// The current leader's candidate name, `None` if nobody leads.
    fn leader(&self) -> Result<Option<String>>;
}

/// Held while leading. Dropping it resigns. Once lost (the backend could not
/// renew it in time, or it was revoked), it stays lost: the holder must stop
/// acting as the leader and campaign again.
pub struct LeaderGuard {
    candidate: String,
    leading: watch::Receiver<bool>,
    resign: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl fmt::Debug for LeaderGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderGuard")
            .field("candidate", &self.candidate)
            .field("leading", &self.is_leader())
            .finish()
    }
}

impl LeaderGuard {
    /// A guard for `candidate`: leading while `leading` says `true` (a
    /// closed channel means lost); `resign` runs once on drop.
    pub(crate) fn new(
        candidate: &str,
        leading: watch::Receiver<bool>,
        resign: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        LeaderGuard {
            candidate: candidate.to_owned(),
            leading,
            resign: Some(Box::new(resign)),
        }
    }

    /// The name this guard campaigned with.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// Whether leadership is still held.
    pub fn is_leader(&self) -> bool {
        self.leading.has_changed().is_ok() && *self.leading.borrow()
    }

    /// A receiver that turns `false` (or closes) when leadership is lost.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Wait until leadership is lost.
    pub async fn lost(&self) {
        let mut rx = self.leading.clone();
        // An error means the sender is gone: lost as well.
        let _ = rx.wait_for(|leading| !leading).await;
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        if let Some(resign) = self.resign.take() {
            resign();
        }
    }
}

/// Encode a record as the bytes a backend stores.
pub(crate) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serialising these plain structs (string keys, no floats) cannot fail.
    serde_json::to_vec(record).expect("store records always serialise")
}

/// Decode stored bytes, refusing a record of another format version.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    kind: Kind,
    key: &str,
    bytes: &[u8],
) -> Result<T> {
    #[derive(Deserialize)]
    struct Peek {
        version: u32,
    }
    let corrupt = |source| StoreError::Corrupt {
        kind,
        key: key.to_owned(),
        source,
    };
    let peek: Peek = serde_json::from_slice(bytes).map_err(corrupt)?;
    if peek.version != FORMAT_VERSION {
        return Err(StoreError::UnsupportedVersion {
            kind,
            key: key.to_owned(),
            found: peek.version,
            supported: FORMAT_VERSION,
        });
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}
