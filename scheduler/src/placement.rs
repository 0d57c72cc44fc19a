//! The placement core: an in-memory model of the hosts ([`Cluster`], rebuilt
//! from what they report) that answers "which host does the next clone of
//! this app go to", one clone at a time ([`Cluster::place`]) or N in one pass
//! ([`Cluster::place_batch`]), and counts every answer as a reservation until
//! the caller releases it.
//!
//! Filter (hard rules, see [`Rejection`]): drained hosts, label selectors,
//! CPUs, `max_per_host`, memory, start slots. Score ([`Score`], compared
//! field by field): spread tier (`spread` only), frozen master, master files,
//! transfer cost, packing, balance, host id.
//!
//! Memory reserved for one clone ([`CloneMemory::reserve_mib`]): the master's
//! measured private memory per clone when it has been measured, else the
//! guest's whole RAM; plus, on a host that does not hold the master frozen,
//! the master's own memory once (it must be thawed or received there).
//!
//! It must not: do I/O, read a clock, draw random numbers, or depend on any
//! ordering but host ids (interned names are compared for equality only).
//! The same model and the same requests always give the same placements.

mod score;
mod selector;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

pub use score::{MasterRank, Rejection, Rejections, Score};
pub use selector::{Selector, SelectorError};

/// A host's id, as it joined (its order is the final tie-break).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub String);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for HostId {
    fn from(s: &str) -> Self {
        HostId(s.to_string())
    }
}

/// What a host holds of one image's master (absent: not in the map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MasterState {
    /// Frozen in memory: clones start at once.
    Frozen,
    /// Snapshot files on disk: cheap to thaw, nothing to transfer.
    Files,
}

/// What a host reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Its id.
    pub id: HostId,
    /// Its zone (`spread_by: zone`).
    pub zone: String,
    /// Its labels, matched by the apps' selectors.
    pub labels: BTreeMap<String, String>,
    /// Memory it gives to VMs, MiB.
    pub memory_total_mib: u64,
    /// Of which free now, MiB (not counting placements in flight).
    pub memory_free_mib: u64,
    /// CPUs (a clone may not have more vCPUs than this).
    pub cpus: u32,
    /// Clone starts it will accept now (not counting placements in flight).
    pub start_slots_free: u32,
    /// Drained: takes no new clones.
    pub drained: bool,
    /// The masters it holds, by image name.
    pub masters: BTreeMap<String, MasterState>,
    /// Its running instances, by app name.
    pub instances: BTreeMap<String, u32>,
    /// The rate at which a master's snapshot reaches it, bytes per second
    /// (more than 0).
    pub link_bytes_per_s: u64,
}

/// What one clone of an image costs in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneMemory {
    /// The guest's RAM, MiB: what a clone may grow to.
    pub guest_ram_mib: u64,
    /// The master's measured private memory per clone, MiB (what a clone
    /// really costs once its pages are shared copy-on-write), if measured.
    pub private_mib_per_clone: Option<u64>,
    /// The master's own memory, MiB: reserved once on a host that does not
    /// already hold the master frozen.
    pub master_mib: u64,
}

impl CloneMemory {
    /// The hard reservation for one clone: the measured private memory
    /// (never more than the guest's RAM), or the guest's RAM when nothing
    /// has been measured yet. Clones that dirty more than was measured are
    /// the host daemon's to refuse; the scheduler packs by what clones cost.
    pub fn reserve_mib(&self) -> u64 {
        self.private_mib_per_clone
            .map_or(self.guest_ram_mib, |p| p.min(self.guest_ram_mib))
    }
}

/// What the hosts of a `spread` app are spread over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpreadBy {
    /// Even counts per host.
    Host,
    /// Even counts per zone (then per host inside a zone).
    Zone,
}

/// Spread or pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Keep the app's counts even across hosts or zones.
    Spread(SpreadBy),
    /// Fill the fewest hosts (the fullest host that fits first).
    Binpack,
}

/// One clone of an app to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The app (instances are counted per app).
    pub app: String,
    /// The image whose master it clones.
    pub image: String,
    /// What a clone costs in memory.
    pub memory: CloneMemory,
    /// Its vCPUs.
    pub vcpus: u32,
    /// Label selectors every chosen host must satisfy.
    pub constraints: Vec<Selector>,
    /// At most this many of the app's instances on one host.
    pub max_per_host: Option<u32>,
    /// Spread or pack.
    pub strategy: Strategy,
    /// Bytes of the master's snapshot that travel to a host lacking it
    /// (the sparse data only).
    pub snapshot_bytes: u64,
}

/// One placement in flight: it counts against its host (memory, start slot,
/// the app's count, the master arriving there) until released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Unique within its [`Cluster`].
    pub id: u64,
    /// The chosen host.
    pub host: HostId,
    /// The app.
    pub app: String,
    /// The image.
    pub image: String,
    /// Memory reserved for the clone, MiB (the master's, if it had to
    /// arrive, is held by the host until its last such reservation goes).
    pub memory_mib: u64,
    /// The score the host won with.
    pub score: Score,
    joined_master: bool,
}

/// Why clones were left unplaced, summed up for a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShortfallReason {
    /// There are no hosts at all.
    NoHosts,
    /// Some hosts satisfy the constraints and are not drained, but none has
    /// room (memory, start slots, CPUs).
    Capacity,
    /// No undrained host satisfies the selectors or `max_per_host`.
    Constraints,
    /// Every host is drained.
    Drained,
}

impl fmt::Display for ShortfallReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShortfallReason::NoHosts => "there are no hosts",
            ShortfallReason::Capacity => "the hosts that match have no room left",
            ShortfallReason::Constraints => "no undrained host satisfies the constraints",
            ShortfallReason::Drained => "every host is drained",
        })
    }
}

/// Not every clone asked for could be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placed {placed} of {requested} clones: {reason} (hosts turned away: {rejected})")]
pub struct Shortfall {
    /// Clones asked for.
    pub requested: u32,
    /// Clones placed.
    pub placed: u32,
    /// The reason, summed up: [`ShortfallReason::Capacity`] if any host
    /// failed only for room, else `Constraints` if any failed a selector or
    /// `max_per_host`, else `Drained`.
    pub reason: ShortfallReason,
    /// How many hosts each rule turned away for the next clone.
    pub rejected: Rejections,
}

/// The placement core's errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Two hosts reported the same id.
    #[error("host {0} is reported twice")]
    DuplicateHost(HostId),
    /// A host reported a link rate of 0 (no transfer could reach it).
    #[error("host {0} reports a link rate of 0 bytes/s")]
    ZeroLinkRate(HostId),
    /// A host reported more free memory than it has.
    #[error("host {0} reports more free memory than its total")]
    FreeAboveTotal(HostId),
    /// A request asked for clones with no memory.
    #[error("app {0}: a clone needs guest RAM (guest_ram_mib is 0)")]
    ZeroMemory(String),
    /// A request asked for clones with no vCPU.
    #[error("app {0}: a clone needs at least one vCPU")]
    ZeroVcpus(String),
    /// A release named a host the model does not know.
    #[error("host {0} is unknown")]
    UnknownHost(HostId),
    /// A release named a reservation already released, or never made.
    #[error("reservation {0} is not held by its host")]
    UnknownReservation(u64),
    /// A single placement found no host.
    #[error(transparent)]
    Unplaceable(#[from] Shortfall),
}

/// The result of [`Cluster::place_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Clones placed per host.
    pub per_host: BTreeMap<HostId, u32>,
    /// One reservation per clone placed, in placement order.
    pub reservations: Vec<Reservation>,
    /// Set when fewer than asked were placed: never a silent shortfall.
    pub shortfall: Option<Shortfall>,
}

impl Batch {
    /// Clones placed.
    pub fn placed(&self) -> u32 {
        self.reservations.len() as u32
    }
}

/// Names interned to small numbers, compared for equality only.
#[derive(Debug, Clone, Default)]
struct Interner {
    ids: BTreeMap<String, u32>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(s.to_string(), id);
        id
    }

    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// A master arriving on a host for placements in flight.
#[derive(Debug, Clone)]
struct InFlightMaster {
    image: u32,
    refs: u32,
    master_mib: u64,
}

/// One host as the model holds it: what it reported, with names interned,
/// plus the placements in flight on it.
#[derive(Debug, Clone)]
struct HostModel {
    report: Host,
    zone: u32,
    labels: Vec<(u32, u32)>,
    masters: Vec<(u32, MasterState)>,
    instances: Vec<(u32, u32)>,
    reserved_clone_mib: u64,
    reserved_slots: u32,
    reserved_apps: Vec<(u32, u32)>,
    in_flight: Vec<InFlightMaster>,
    held: Vec<u64>,
}

fn count_of(v: &[(u32, u32)], key: u32) -> u32 {
    v.iter().find(|(k, _)| *k == key).map_or(0, |(_, c)| *c)
}

fn bump(v: &mut Vec<(u32, u32)>, key: u32, up: bool) {
    match v.iter_mut().find(|(k, _)| *k == key) {
        Some((_, c)) if up => *c += 1,
        Some((_, c)) => *c = c.saturating_sub(1),
        None if up => v.push((key, 1)),
        None => {}
    }
}

impl HostModel {
    fn new(report: Host, strings: &mut Interner) -> Self {
        let mut m = HostModel {
            report: report.clone(),
            zone: 0,
            labels: Vec::new(),
            masters: Vec::new(),
            instances: Vec::new(),
            reserved_clone_mib: 0,
            reserved_slots: 0,
            reserved_apps: Vec::new(),
            in_flight: Vec::new(),
            held: Vec::new(),
        };
        m.set_report(report, strings);
        m
    }

    fn set_report(&mut self, report: Host, strings: &mut Interner) {
        self.zone = strings.intern(&report.zone);
        self.labels = report
            .labels
            .iter()
            .map(|(k, v)| (strings.intern(k), strings.intern(v)))
            .collect();
        self.masters = report
            .masters
            .iter()
            .map(|(k, s)| (strings.intern(k), *s))
            .collect();
        self.instances = report
            .instances
            .iter()
            .map(|(k, c)| (strings.intern(k), *c))
            .collect();
        self.report = report;
    }

    fn app_count(&self, app: Option<u32>) -> u32 {
        app.map_or(0, |a| {
            count_of(&self.instances, a) + count_of(&self.reserved_apps, a)
        })
    }

    fn master(&self, image: Option<u32>) -> MasterRank {
        let Some(image) = image else {
            return MasterRank::Absent;
        };
        if self.in_flight.iter().any(|m| m.image == image) {
            return MasterRank::Frozen;
        }
        match self.masters.iter().find(|(k, _)| *k == image) {
            Some((_, MasterState::Frozen)) => MasterRank::Frozen,
            Some((_, MasterState::Files)) => MasterRank::Files,
            None => MasterRank::Absent,
        }
    }

    fn free_mib(&self) -> u64 {
        let masters: u64 = self.in_flight.iter().map(|m| m.master_mib).sum();
        self.report
            .memory_free_mib
            .saturating_sub(self.reserved_clone_mib + masters)
    }

    fn slots_free(&self) -> u32 {
        self.report
            .start_slots_free
            .saturating_sub(self.reserved_slots)
    }
}

/// A label selector with its names interned (`None`: no host has it).
#[derive(Debug, Clone)]
enum Sel {
    Eq(Option<u32>, Option<u32>),
    Ne(Option<u32>, Option<u32>),
    In(Option<u32>, Vec<u32>),
}

fn label(labels: &[(u32, u32)], key: Option<u32>) -> Option<u32> {
    let key = key?;
    labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

impl Sel {
    fn matches(&self, labels: &[(u32, u32)]) -> bool {
        match self {
            Sel::Eq(k, v) => v.is_some() && label(labels, *k) == *v,
            Sel::Ne(k, v) => v.is_none() || label(labels, *k) != *v,
            Sel::In(k, vs) => label(labels, *k).is_some_and(|x| vs.contains(&x)),
        }
    }
}

/// A request with its names interned, checked once per call.
#[derive(Debug, Clone)]
struct Resolved {
    app: Option<u32>,
    image: Option<u32>,
    selectors: Vec<Sel>,
    clone_mib: u64,
    master_mib: u64,
    vcpus: u32,
    max_per_host: u32,
    strategy: Strategy,
    snapshot_bytes: u64,
}

/// The in-memory model of the hosts, with the placements in flight.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    hosts: Vec<HostModel>,
    strings: Interner,
    next_reservation: u64,
}

impl Cluster {
    /// A model of these hosts (in any order), with nothing in flight.
    pub fn new(hosts: impl IntoIterator<Item = Host>) -> Result<Self, PlacementError> {
        let mut c = Cluster::default();
        let mut hosts: Vec<Host> = hosts.into_iter().collect();
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        for w in hosts.windows(2) {
            if w[0].id == w[1].id {
                return Err(PlacementError::DuplicateHost(w[0].id.clone()));
            }
        }
        for h in hosts {
            check_host(&h)?;
            let m = HostModel::new(h, &mut c.strings);
            c.hosts.push(m);
        }
        Ok(c)
    }

    /// The hosts' ids, in order.
    pub fn host_ids(&self) -> impl Iterator<Item = &HostId> {
        self.hosts.iter().map(|h| &h.report.id)
    }

    /// Replaces what a host reported (or adds a new host). Its placements
    /// in flight still count until released: release a reservation once the
    /// host's report includes its clone (or the clone failed).
    pub fn report(&mut self, host: Host) -> Result<(), PlacementError> {
        check_host(&host)?;
        match self.hosts.binary_search_by(|h| h.report.id.cmp(&host.id)) {
            Ok(i) => self.hosts[i].set_report(host, &mut self.strings),
            Err(i) => {
                let m = HostModel::new(host, &mut self.strings);
                self.hosts.insert(i, m);
            }
        }
        Ok(())
    }

    /// Free memory on a host after its placements in flight, MiB.
    pub fn free_mib(&self, host: &HostId) -> Option<u64> {
        self.find(host).ok().map(|i| self.hosts[i].free_mib())
    }

    /// Start slots left on a host after its placements in flight.
    pub fn slots_free(&self, host: &HostId) -> Option<u32> {
        self.find(host).ok().map(|i| self.hosts[i].slots_free())
    }

    /// The app's instances on a host, running and in flight.
    pub fn app_count(&self, host: &HostId, app: &str) -> Option<u32> {
        let a = self.strings.get(app);
        self.find(host).ok().map(|i| self.hosts[i].app_count(a))
    }

    /// How a host stands for the next clone of `req`: its score, or the
    /// first rule that turns it away.
    pub fn evaluate(
        &self,
        req: &Request,
        host: &HostId,
    ) -> Result<Result<Score, Rejection>, PlacementError> {
        let r = self.resolve(req)?;
        let i = self.find(host)?;
        let zones = self.zone_counts(&r);
        Ok(self.eval(i, &r, &zones))
    }

    /// Places one clone: the best host by [`Score`], reserved at once.
    pub fn place(&mut self, req: &Request) -> Result<Reservation, PlacementError> {
        self.intern_request(req);
        let r = self.resolve(req)?;
        let zones = self.zone_counts(&r);
        let best = (0..self.hosts.len())
            .filter_map(|i| self.eval(i, &r, &zones).ok())
            .min();
        match best {
            Some(score) => Ok(self.reserve(req, &r, score)),
            None => Err(self.shortfall(&r, &zones, 1, 0).into()),
        }
    }

    /// Places `n` clones in one pass: every host is scored once, then the
    /// best is taken from a heap, reserved and scored again. A placement
    /// only ever worsens other hosts' scores (their zone's spread tier), so
    /// a popped score that is stale is re-scored and pushed back; the result
    /// is the same, host for host, as `n` calls to [`Cluster::place`].
    pub fn place_batch(&mut self, req: &Request, n: u32) -> Result<Batch, PlacementError> {
        self.intern_request(req);
        let r = self.resolve(req)?;
        let mut zones = self.zone_counts(&r);
        let mut heap: BinaryHeap<Reverse<Score>> = (0..self.hosts.len())
            .filter_map(|i| self.eval(i, &r, &zones).ok())
            .map(Reverse)
            .collect();
        let mut batch = Batch {
            per_host: BTreeMap::new(),
            reservations: Vec::with_capacity(n as usize),
            shortfall: None,
        };
        while batch.placed() < n {
            let Some(Reverse(stale)) = heap.pop() else {
                break;
            };
            let i = stale.host_rank as usize;
            let Ok(score) = self.eval(i, &r, &zones) else {
                continue;
            };
            if score != stale {
                heap.push(Reverse(score));
                continue;
            }
            let res = self.reserve(req, &r, score);
            if let Some(z) = zones.get_mut(self.hosts[i].zone as usize) {
                *z += 1;
            }
            *batch.per_host.entry(res.host.clone()).or_insert(0) += 1;
            batch.reservations.push(res);
            if let Ok(next) = self.eval(i, &r, &zones) {
                heap.push(Reverse(next));
            }
        }
        if batch.placed() < n {
            batch.shortfall = Some(self.shortfall(&r, &zones, n, batch.placed()));
        }
        Ok(batch)
    }

    /// Ends a placement in flight (its clone now shows in the host's report,
    /// or it failed): its memory, start slot and count go back.
    pub fn release(&mut self, res: &Reservation) -> Result<(), PlacementError> {
        let i = self.find(&res.host)?;
        let h = &mut self.hosts[i];
        let pos = h
            .held
            .iter()
            .position(|&id| id == res.id)
            .ok_or(PlacementError::UnknownReservation(res.id))?;
        h.held.swap_remove(pos);
        h.reserved_clone_mib = h.reserved_clone_mib.saturating_sub(res.memory_mib);
        h.reserved_slots = h.reserved_slots.saturating_sub(1);
        if let Some(app) = self.strings.get(&res.app) {
            bump(&mut h.reserved_apps, app, false);
        }
        if res.joined_master {
            if let Some(image) = self.strings.get(&res.image) {
                if let Some(p) = h.in_flight.iter().position(|m| m.image == image) {
                    h.in_flight[p].refs -= 1;
                    if h.in_flight[p].refs == 0 {
                        h.in_flight.swap_remove(p);
                    }
                }
            }
        }
        Ok(())
    }

    /// Interns the app and the image before a placement, so that the
    /// reservations made during one call are counted by the same call.
    fn intern_request(&mut self, req: &Request) {
        self.strings.intern(&req.app);
        self.strings.intern(&req.image);
    }

    fn find(&self, id: &HostId) -> Result<usize, PlacementError> {
        self.hosts
            .binary_search_by(|h| h.report.id.cmp(id))
            .map_err(|_| PlacementError::UnknownHost(id.clone()))
    }

    fn resolve(&self, req: &Request) -> Result<Resolved, PlacementError> {
        if req.memory.guest_ram_mib == 0 {
            return Err(PlacementError::ZeroMemory(req.app.clone()));
        }
        if req.vcpus == 0 {
            return Err(PlacementError::ZeroVcpus(req.app.clone()));
        }
        let s = &self.strings;
        let selectors = req
            .constraints
            .iter()
            .map(|c| match c {
                Selector::Eq(k, v) => Sel::Eq(s.get(k), s.get(v)),
                Selector::Ne(k, v) => Sel::Ne(s.get(k), s.get(v)),
                Selector::In(k, vs) => {
                    Sel::In(s.get(k), vs.iter().filter_map(|v| s.get(v)).collect())
                }
            })
            .collect();
        Ok(Resolved {
            app: s.get(&req.app),
            image: s.get(&req.image),
            selectors,
            clone_mib: req.memory.reserve_mib(),
            master_mib: req.memory.master_mib,
            vcpus: req.vcpus,
            max_per_host: req.max_per_host.unwrap_or(u32::MAX),
            strategy: req.strategy,
            snapshot_bytes: req.snapshot_bytes,
        })
    }

    /// The app's instances per zone (indexed by interned zone), for
    /// `spread` by zone; empty otherwise.
    fn zone_counts(&self, r: &Resolved) -> Vec<u32> {
        if r.strategy != Strategy::Spread(SpreadBy::Zone) {
            return Vec::new();
        }
        let mut zones = vec![0u32; self.strings.len()];
        for h in &self.hosts {
            zones[h.zone as usize] += h.app_count(r.app);
        }
        zones
    }

    /// Filter, then score, host `i` for the next clone.
    fn eval(&self, i: usize, r: &Resolved, zones: &[u32]) -> Result<Score, Rejection> {
        let h = &self.hosts[i];
        if h.report.drained {
            return Err(Rejection::Drained);
        }
        if !r.selectors.iter().all(|s| s.matches(&h.labels)) {
            return Err(Rejection::Constraints);
        }
        if r.vcpus > h.report.cpus {
            return Err(Rejection::Cpus);
        }
        let count = h.app_count(r.app);
        if count >= r.max_per_host {
            return Err(Rejection::MaxPerHost);
        }
        let master = h.master(r.image);
        let need = r.clone_mib
            + if master == MasterRank::Frozen {
                0
            } else {
                r.master_mib
            };
        let free = h.free_mib();
        if need > free {
            return Err(Rejection::Memory);
        }
        if h.slots_free() == 0 {
            return Err(Rejection::StartSlots);
        }
        let transfer_ms = if master == MasterRank::Absent {
            let ms =
                u128::from(r.snapshot_bytes) * 1000 / u128::from(h.report.link_bytes_per_s.max(1));
            u64::try_from(ms).unwrap_or(u64::MAX)
        } else {
            0
        };
        let free_after = free - need;
        let total = h.report.memory_total_mib.max(1);
        let used_after = total.saturating_sub(free_after);
        let (spread_tier, packing) = match r.strategy {
            Strategy::Spread(SpreadBy::Host) => (count, 0),
            Strategy::Spread(SpreadBy::Zone) => (
                zones.get(h.zone as usize).copied().unwrap_or(0),
                u64::from(count),
            ),
            Strategy::Binpack => (0, free_after),
        };
        Ok(Score {
            spread_tier,
            master,
            transfer_ms,
            packing,
            balance_permille: used_after * 1000 / total,
            host_rank: i as u32,
        })
    }

    fn reserve(&mut self, req: &Request, r: &Resolved, score: Score) -> Reservation {
        let i = score.host_rank as usize;
        let app = self.strings.intern(&req.app);
        let image = self.strings.intern(&req.image);
        let id = self.next_reservation;
        self.next_reservation += 1;
        let h = &mut self.hosts[i];
        let reported_frozen = h
            .masters
            .iter()
            .any(|(k, s)| *k == image && *s == MasterState::Frozen);
        let joined_master = !reported_frozen;
        if joined_master {
            match h.in_flight.iter_mut().find(|m| m.image == image) {
                Some(m) => m.refs += 1,
                None => h.in_flight.push(InFlightMaster {
                    image,
                    refs: 1,
                    master_mib: r.master_mib,
                }),
            }
        }
        h.reserved_clone_mib += r.clone_mib;
        h.reserved_slots += 1;
        bump(&mut h.reserved_apps, app, true);
        h.held.push(id);
        Reservation {
            id,
            host: h.report.id.clone(),
            app: req.app.clone(),
            image: req.image.clone(),
            memory_mib: r.clone_mib,
            score,
            joined_master,
        }
    }

    fn shortfall(&self, r: &Resolved, zones: &[u32], requested: u32, placed: u32) -> Shortfall {
        let mut rejected = Rejections::default();
        for i in 0..self.hosts.len() {
            if let Err(why) = self.eval(i, r, zones) {
                rejected.add(why);
            }
        }
        let reason = if self.hosts.is_empty() {
            ShortfallReason::NoHosts
        } else if rejected.cpus + rejected.memory + rejected.start_slots > 0 {
            ShortfallReason::Capacity
        } else if rejected.constraints + rejected.max_per_host > 0 {
            ShortfallReason::Constraints
        } else {
            ShortfallReason::Drained
        };
        Shortfall {
            requested,
            placed,
            reason,
            rejected,
        }
    }
}

fn check_host(h: &Host) -> Result<(), PlacementError> {
    if h.link_bytes_per_s == 0 {
        return Err(PlacementError::ZeroLinkRate(h.id.clone()));
    }
    if h.memory_free_mib > h.memory_total_mib {
        return Err(PlacementError::FreeAboveTotal(h.id.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
