//! The placement score: one plain struct compared field by field in
//! priority order (`derive(Ord)`, lower is better), and the filter's reasons
//! for turning a host away.
//!
//! It must not: compute anything; `placement` fills these in.

/// What a host holds of the requested image's master, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MasterRank {
    /// A frozen master in memory (reported, or arriving for a placement in
    /// flight): a clone starts at once.
    Frozen,
    /// The master's snapshot files on disk: cheap to thaw, no transfer.
    Files,
    /// Nothing: the snapshot must travel to this host first.
    Absent,
}

/// How good a host is for the next clone of a request; the smallest wins.
/// The fields are compared in declaration order, so the order of the fields
/// *is* the order of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Score {
    /// `spread` only: the app's instances (running and in flight) in this
    /// host's spread domain (the host, or its zone). Spreading is what the
    /// app asked for to survive a host or zone loss, so it comes before the
    /// master's location: the master's location decides *which* of the
    /// least-loaded hosts, not whether to pile onto one. Always 0 for
    /// `binpack`.
    pub spread_tier: u32,
    /// 1 and 2: a frozen master first, then the master's files.
    pub master: MasterRank,
    /// 3: milliseconds to move the master's snapshot here (0 when the host
    /// has it).
    pub transfer_ms: u64,
    /// 4: `binpack`: MiB left free after this clone (fewer is better: the
    /// fullest host that fits). `spread` by zone: the app's instances on
    /// this host (spread over the hosts inside a zone too). `spread` by
    /// host: 0 (the tier already holds it).
    pub packing: u64,
    /// 5: memory in use after this clone, per mille of the host's total
    /// (the emptier host first).
    pub balance_permille: u64,
    /// The tie-break: the host's rank in host-id order, so that the same
    /// input always gives the same output.
    pub host_rank: u32,
}

/// Why the filter turned a host away, in the order the rules are checked
/// (a host is counted under the first rule it fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// The host is drained.
    Drained,
    /// The host's labels fail one of the app's selectors.
    Constraints,
    /// The host has fewer CPUs than the clone has vCPUs.
    Cpus,
    /// The app already has `max_per_host` instances here (running or in
    /// flight).
    MaxPerHost,
    /// Not enough free memory for the clone's reservation (and the master's,
    /// when the host does not hold it frozen), counting placements in flight.
    Memory,
    /// No start slot left, counting placements in flight.
    StartSlots,
}

/// How many hosts each rule turned away when a placement fell short.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rejections {
    /// Drained hosts.
    pub drained: u32,
    /// Hosts whose labels fail the selectors.
    pub constraints: u32,
    /// Hosts with too few CPUs.
    pub cpus: u32,
    /// Hosts at the app's `max_per_host`.
    pub max_per_host: u32,
    /// Hosts short of memory.
    pub memory: u32,
    /// Hosts with no start slot.
    pub start_slots: u32,
}

impl std::fmt::Display for Rejections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} drained, {} constraints, {} CPUs, {} max_per_host, {} memory, {} start slots",
            self.drained,
            self.constraints,
            self.cpus,
            self.max_per_host,
            self.memory,
            self.start_slots
        )
    }
}

impl Rejections {
    /// Counts one host turned away for `r`.
    pub fn add(&mut self, r: Rejection) {
        match r {
            Rejection::Drained => self.drained += 1,
            Rejection::Constraints => self.constraints += 1,
            Rejection::Cpus => self.cpus += 1,
            Rejection::MaxPerHost => self.max_per_host += 1,
            Rejection::Memory => self.memory += 1,
            Rejection::StartSlots => self.start_slots += 1,
        }
    }
}
