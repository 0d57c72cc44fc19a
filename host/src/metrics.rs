//! What the host runtime counts, as Prometheus metric families
//! (`prometheus-client`): instances by state, clone latency per phase, cold
//! boots, exec latency, VMM exits by reason, memory. The daemon adds its
//! HTTP metrics to the same registry and serves it at `/metrics`.
//!
//! It must not: serve anything (that is the api crate), or cost more than
//! an atomic add on the clone path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A `phase` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `spawn_to_running`, `spawn_to_connected`, `spawn_to_identity`, `spawn_to_ping`.
    pub phase: String,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why a VMM ended (`shutdown`, `panic`, `killed`, ...).
    pub reason: String,
}

/// A `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `starting`, `running`, `exited`, `failed`.
    pub state: String,
}

/// A `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `private` or `shared`.
    pub kind: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 1 ms .. ~65 s, doubling: covers a host-side clone (ms) and an emulated
    // guest's cold boot (tens of seconds).
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

/// The runtime's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Instances by state (set when listed or changed).
    pub instances: Family<StateLabel, Gauge>,
    /// Clone start latency per phase, seconds.
    pub clone_latency: Family<PhaseLabel, Histogram>,
    /// Cold boot + warm-up of masters, seconds.
    pub cold_boot: Histogram,
    /// Short exec round trips, seconds.
    pub exec_latency: Histogram,
    /// VMM processes that ended, by reason.
    pub vmm_exits: Family<ReasonLabel, Counter>,
    /// Clones that failed to start.
    pub clone_failures: Counter,
    /// Memory of live clones, bytes: `private` (their own pages and VMM) and
    /// `shared` (master pages they map and only read).
    pub memory: Family<KindLabel, Gauge>,
    /// Requests refused for lack of a start slot.
    pub admission_refused: Counter,
}

impl Metrics {
    /// New metrics, registered in `registry` under `zygote_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            instances: Family::default(),
            clone_latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            cold_boot: Histogram::new(latency_buckets()),
            exec_latency: Histogram::new(latency_buckets()),
            vmm_exits: Family::default(),
            clone_failures: Counter::default(),
            memory: Family::default(),
            admission_refused: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("zygote");
        r.register("instances", "Instances by state", m.instances.clone());
        r.register(
            "clone_latency_seconds",
            "Clone start latency from the VMM spawn, per phase",
            m.clone_latency.clone(),
        );
        r.register(
            "master_cold_boot_seconds",
            "Cold boot plus warm-up of a master",
            m.cold_boot.clone(),
        );
        r.register(
            "exec_latency_seconds",
            "Short exec requests, from request to exit status",
            m.exec_latency.clone(),
        );
        r.register(
            "vmm_exits",
            "VMM processes that ended, by reason",
            m.vmm_exits.clone(),
        );
        r.register(
            "clone_failures",
            "Clones that failed to start",
            m.clone_failures.clone(),
        );
        r.register(
            "clone_memory_bytes",
            "Memory of live clones: private (own pages) and shared (master pages)",
            m.memory.clone(),
        );
        r.register(
            "admission_refused",
            "Clone requests refused because every start slot was in use",
            m.admission_refused.clone(),
        );
        m
    }

    /// Counts a VMM's end.
    pub fn vmm_exit(&self, reason: &str) {
        self.vmm_exits
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records one clone's phases (ms from the spawn).
    pub fn clone_started(&self, phases: &[(&str, Option<f64>)]) {
        for (phase, ms) in phases {
            if let Some(ms) = ms {
                self.clone_latency
                    .get_or_create(&PhaseLabel {
                        phase: phase.to_string(),
                    })
                    .observe(ms / 1000.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_things_show_in_the_text_format() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.vmm_exit("panic");
        m.clone_started(&[("spawn_to_running", Some(3.0)), ("spawn_to_ping", None)]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("zygote_vmm_exits_total{reason=\"panic\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("zygote_clone_latency_seconds_count{phase=\"spawn_to_running\"} 1"),
            "{text}"
        );
        assert!(!text.contains("phase=\"spawn_to_ping\""));
    }
}
