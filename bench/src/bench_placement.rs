//! `zygote bench placement`: how fast the scheduler's placement core places
//! clones on simulated hosts: in batches ([`Cluster::place_batch`],
//! `batch_per_s`) and one at a time ([`Cluster::place`], `single_per_s`),
//! against the bars (50,000/s and 10,000/s with 1,000 hosts).
//!
//! The hosts vary in memory, CPUs, start slots, zones, labels, the masters
//! they hold and the apps they run, drawn from a fixed seed, so two runs
//! place on the same model. Requests rotate through spread by host, spread
//! by zone and binpack, with and without selectors.
//!
//! It must not: time anything but placement calls (the model is cloned
//! outside the timed sections), or use a random source other than its seed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use scheduler::placement::{
    CloneMemory, Cluster, Host, HostId, MasterState, Request, Selector, SpreadBy, Strategy,
};
use serde::Serialize;

use crate::stats::percentile;

/// The bar for batches, clones per second.
pub const BATCH_BAR_PER_S: f64 = 50_000.0;
/// The bar for single placements, per second.
pub const SINGLE_BAR_PER_S: f64 = 10_000.0;

/// Options.
#[derive(Debug, Clone)]
pub struct PlacementBenchOptions {
    /// Simulated hosts.
    pub hosts: usize,
    /// Clones per batch.
    pub batch: u32,
    /// Batches, and rounds of `batch` single placements, each on a fresh
    /// copy of the model.
    pub rounds: u32,
    /// The seed of the simulated hosts.
    pub seed: u64,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct PlacementReport {
    /// Simulated hosts.
    pub hosts: usize,
    /// The seed.
    pub seed: u64,
    /// Clones per batch.
    pub batch_size: u32,
    /// Batches placed.
    pub batches: u32,
    /// Clones placed in batches.
    pub batch_clones: u64,
    /// Clones placed per second in batches.
    pub batch_per_s: f64,
    /// Single placements made.
    pub singles: u64,
    /// Single placements per second.
    pub single_per_s: f64,
    /// One single placement, µs: median.
    pub single_p50_us: f64,
    /// One single placement, µs: 99th percentile.
    pub single_p99_us: f64,
    /// Clones asked for but not placed (a shortfall; 0 expected here).
    pub unplaced: u64,
    /// The batch bar, per second.
    pub batch_bar_per_s: f64,
    /// The single bar, per second.
    pub single_bar_per_s: f64,
    /// Whether both bars are met.
    pub bars_met: bool,
}

impl PlacementReport {
    /// One JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// A table, with the bars.
    pub fn to_table(&self) -> String {
        let met = |v: f64, bar: f64| if v >= bar { "met" } else { "MISSED" };
        let mut t = String::new();
        t.push_str(&format!(
            "placement core, {} simulated hosts (seed {}), {} rounds of {}\n",
            self.hosts, self.seed, self.batches, self.batch_size
        ));
        t.push_str(&format!(
            "{:<28} {:>14} {:>12} {:>8}\n",
            "", "per second", "bar", ""
        ));
        t.push_str(&format!(
            "{:<28} {:>14.0} {:>12.0} {:>8}\n",
            "clones placed in batches",
            self.batch_per_s,
            self.batch_bar_per_s,
            met(self.batch_per_s, self.batch_bar_per_s)
        ));
        t.push_str(&format!(
            "{:<28} {:>14.0} {:>12.0} {:>8}\n",
            "single placements",
            self.single_per_s,
            self.single_bar_per_s,
            met(self.single_per_s, self.single_bar_per_s)
        ));
        t.push_str(&format!(
            "single placement: p50 {:.1} µs, p99 {:.1} µs; unplaced: {}\n",
            self.single_p50_us, self.single_p99_us, self.unplaced
        ));
        t
    }
}

/// splitmix64: a small deterministic generator for the simulated hosts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const IMAGES: [&str; 4] = ["python", "node", "postgres", "ml"];
const APPS: [&str; 6] = ["web", "api", "worker", "db", "batch", "notebook"];

/// The simulated hosts: memory 16–256 GiB, 8–64 CPUs, 16–128 start slots,
/// 8 zones, `disk` and `arch` labels, ~2% drained, each image frozen on ~5%
/// of hosts and present as files on ~20%, a few running apps each.
pub fn simulated_hosts(n: usize, seed: u64) -> Vec<Host> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let total = 16_384 * (1 + rng.below(16));
            let used = total * rng.below(60) / 100;
            let mut labels = BTreeMap::new();
            labels.insert(
                "disk".to_string(),
                if rng.below(3) == 0 { "hdd" } else { "ssd" }.to_string(),
            );
            labels.insert(
                "arch".to_string(),
                ["x86", "x86", "x86", "arm"][rng.below(4) as usize].to_string(),
            );
            let mut masters = BTreeMap::new();
            for image in IMAGES {
                match rng.below(100) {
                    0..5 => {
                        masters.insert(image.to_string(), MasterState::Frozen);
                    }
                    5..25 => {
                        masters.insert(image.to_string(), MasterState::Files);
                    }
                    _ => {}
                }
            }
            let mut instances = BTreeMap::new();
            for app in APPS {
                if rng.below(3) == 0 {
                    instances.insert(app.to_string(), 1 + rng.below(20) as u32);
                }
            }
            Host {
                id: HostId(format!("host-{i:05}")),
                zone: format!("zone-{}", rng.below(8)),
                labels,
                memory_total_mib: total,
                memory_free_mib: total - used,
                cpus: 8 << rng.below(4),
                start_slots_free: 16 + rng.below(113) as u32,
                drained: rng.below(50) == 0,
                masters,
                instances,
                link_bytes_per_s: [125_000_000, 1_250_000_000, 3_125_000_000]
                    [rng.below(3) as usize],
            }
        })
        .collect()
}

/// The requests the rounds rotate through.
pub fn requests() -> Vec<Request> {
    let sel = |s: &str| s.parse::<Selector>().expect("a valid selector");
    let req = |app: &str, image: &str, strategy, constraints: Vec<Selector>, max| Request {
        app: app.into(),
        image: image.into(),
        memory: CloneMemory {
            guest_ram_mib: 512,
            private_mib_per_clone: Some(24),
            master_mib: 512,
        },
        vcpus: 1,
        constraints,
        max_per_host: max,
        strategy,
        snapshot_bytes: 300_000_000,
    };
    vec![
        req(
            "web",
            "python",
            Strategy::Spread(SpreadBy::Host),
            vec![],
            None,
        ),
        req(
            "api",
            "node",
            Strategy::Spread(SpreadBy::Zone),
            vec![sel("disk=ssd")],
            Some(8),
        ),
        req(
            "batch",
            "ml",
            Strategy::Binpack,
            vec![sel("arch in (x86)")],
            None,
        ),
        req(
            "db",
            "postgres",
            Strategy::Spread(SpreadBy::Host),
            vec![sel("disk!=hdd")],
            Some(30),
        ),
    ]
}

/// Runs the benchmark.
pub fn bench_placement(o: &PlacementBenchOptions) -> Result<PlacementReport, String> {
    let model = Cluster::new(simulated_hosts(o.hosts, o.seed)).map_err(|e| e.to_string())?;
    let reqs = requests();
    let rounds = o.rounds.max(1);
    let mut unplaced = 0u64;

    let mut batch_time = Duration::ZERO;
    let mut batch_clones = 0u64;
    for round in 0..rounds {
        let mut c = model.clone();
        let r = &reqs[round as usize % reqs.len()];
        let t = Instant::now();
        let b = c.place_batch(r, o.batch).map_err(|e| e.to_string())?;
        batch_time += t.elapsed();
        batch_clones += u64::from(b.placed());
        unplaced += u64::from(o.batch - b.placed());
        std::hint::black_box(&b);
    }

    let mut single_time = Duration::ZERO;
    let mut singles = 0u64;
    let mut lat_us = Vec::with_capacity((rounds * o.batch) as usize);
    for round in 0..rounds {
        let mut c = model.clone();
        let r = &reqs[round as usize % reqs.len()];
        for _ in 0..o.batch {
            let t = Instant::now();
            let res = c.place(r);
            let dt = t.elapsed();
            single_time += dt;
            lat_us.push(dt.as_secs_f64() * 1e6);
            match res {
                Ok(res) => {
                    singles += 1;
                    std::hint::black_box(&res);
                }
                Err(_) => unplaced += 1,
            }
        }
    }

    let per_s = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let batch_per_s = per_s(batch_clones, batch_time);
    let single_per_s = per_s(singles, single_time);
    Ok(PlacementReport {
        hosts: o.hosts,
        seed: o.seed,
        batch_size: o.batch,
        batches: rounds,
        batch_clones,
        batch_per_s,
        singles,
        single_per_s,
        single_p50_us: percentile(&lat_us, 50.0).unwrap_or(0.0),
        single_p99_us: percentile(&lat_us, 99.0).unwrap_or(0.0),
        unplaced,
        batch_bar_per_s: BATCH_BAR_PER_S,
        single_bar_per_s: SINGLE_BAR_PER_S,
        bars_met: batch_per_s >= BATCH_BAR_PER_S && single_per_s >= SINGLE_BAR_PER_S,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_hosts_are_deterministic_and_varied() {
        let a = simulated_hosts(200, 7);
        assert_eq!(a, simulated_hosts(200, 7));
        assert_ne!(a, simulated_hosts(200, 8));
        let zones: std::collections::BTreeSet<_> = a.iter().map(|h| &h.zone).collect();
        assert!(zones.len() > 4);
        assert!(a
            .iter()
            .any(|h| h.masters.values().any(|m| *m == MasterState::Frozen)));
        assert!(a.iter().any(|h| h.drained));
    }

    #[test]
    fn a_small_run_places_everything_and_reports_the_fields() {
        let r = bench_placement(&PlacementBenchOptions {
            hosts: 50,
            batch: 100,
            rounds: 4,
            seed: 1,
        })
        .unwrap();
        assert_eq!(r.unplaced, 0);
        assert_eq!(r.batch_clones, 400);
        assert_eq!(r.singles, 400);
        let j = r.to_json();
        assert!(j["batch_per_s"].as_f64().unwrap() > 0.0);
        assert!(j["single_per_s"].as_f64().unwrap() > 0.0);
        assert!(r.to_table().contains("single placements"));
    }
}
