//! Property tests of the placement core over random clusters and requests:
//! determinism, no host over its memory or start slots, constraints never
//! violated, spread even to ±1, binpack filling the fewest hosts, the frozen
//! master preferred, a batch equal to as many single placements, and
//! releases that give everything back.
//!
//! It must not: run unbounded (few cases, small clusters: seconds in all),
//! or check the core against itself where an independent check is possible
//! (limits and constraints are re-checked from the input hosts).

use std::collections::BTreeMap;

use proptest::prelude::*;
use scheduler::placement::{
    Batch, CloneMemory, Cluster, Host, HostId, MasterState, Request, Selector, SpreadBy,
    Strategy as Plan,
};

fn arb_host(i: usize) -> impl Strategy<Value = Host> {
    (
        (512u64..8192, 0u64..=100),
        1u32..8,
        0u32..20,
        prop::bool::weighted(0.1),
        0usize..3,
        prop::option::of(prop::sample::select(vec!["ssd", "hdd"])),
        prop::option::of(prop::bool::ANY),
        0u32..4,
        prop::sample::select(vec![10_000_000u64, 100_000_000, 1_000_000_000]),
    )
        .prop_map(
            move |((total, free_pct), cpus, slots, drained, zone, disk, master, n, link)| {
                let mut labels = BTreeMap::new();
                if let Some(d) = disk {
                    labels.insert("disk".to_string(), d.to_string());
                }
                let mut masters = BTreeMap::new();
                match master {
                    Some(true) => {
                        masters.insert("py".to_string(), MasterState::Frozen);
                    }
                    Some(false) => {
                        masters.insert("py".to_string(), MasterState::Files);
                    }
                    None => {}
                }
                let mut instances = BTreeMap::new();
                if n > 0 {
                    instances.insert("web".to_string(), n);
                }
                Host {
                    id: HostId(format!("h{i:02}")),
                    zone: format!("z{zone}"),
                    labels,
                    memory_total_mib: total,
                    memory_free_mib: total * free_pct / 100,
                    cpus,
                    start_slots_free: slots,
                    drained,
                    masters,
                    instances,
                    link_bytes_per_s: link,
                }
            },
        )
}

fn arb_hosts() -> impl Strategy<Value = Vec<Host>> {
    (1usize..12).prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
}

fn arb_strategy() -> impl Strategy<Value = Plan> {
    prop::sample::select(vec![
        Plan::Binpack,
        Plan::Spread(SpreadBy::Host),
        Plan::Spread(SpreadBy::Zone),
    ])
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        (128u64..512, prop::option::of(8u64..96), 0u64..512),
        1u32..4,
        prop::sample::select(vec![
            vec![],
            vec!["disk=ssd"],
            vec!["disk!=hdd"],
            vec!["disk in (ssd,hdd)"],
        ]),
        prop::option::of(1u32..6),
        arb_strategy(),
    )
        .prop_map(
            |((guest, private, master), vcpus, sel, max, strategy)| Request {
                app: "web".into(),
                image: "py".into(),
                memory: CloneMemory {
                    guest_ram_mib: guest,
                    private_mib_per_clone: private,
                    master_mib: master,
                },
                vcpus,
                constraints: sel.iter().map(|s| s.parse::<Selector>().unwrap()).collect(),
                max_per_host: max,
                strategy,
                snapshot_bytes: 200_000_000,
            },
        )
}

fn can_take_another(c: &Cluster, r: &Request, h: &HostId) -> bool {
    c.evaluate(r, h).unwrap().is_ok()
}

fn counts(c: &Cluster, hosts: &[Host]) -> BTreeMap<HostId, u32> {
    hosts
        .iter()
        .map(|h| (h.id.clone(), c.app_count(&h.id, "web").unwrap()))
        .collect()
}

fn placed_on(b: &Batch, h: &HostId) -> u32 {
    b.per_host.get(h).copied().unwrap_or(0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn same_input_same_output(hosts in arb_hosts(), r in arb_request(), n in 0u32..60) {
        let mut c1 = Cluster::new(hosts.clone()).unwrap();
        let mut c2 = Cluster::new(hosts.into_iter().rev()).unwrap();
        let b1 = c1.place_batch(&r, n).unwrap();
        let b2 = c2.place_batch(&r, n).unwrap();
        prop_assert_eq!(&b1, &b2);
        prop_assert_eq!(c1.place(&r).ok(), c2.place(&r).ok());
    }

    #[test]
    fn no_host_over_memory_slots_or_constraints(hosts in arb_hosts(), r in arb_request(), n in 0u32..60) {
        let mut c = Cluster::new(hosts.clone()).unwrap();
        let b = c.place_batch(&r, n).unwrap();
        prop_assert_eq!(b.placed() + b.shortfall.as_ref().map_or(0, |s| s.requested - s.placed), n);
        prop_assert_eq!(b.per_host.values().sum::<u32>(), b.placed());
        for h in &hosts {
            let k = placed_on(&b, &h.id);
            if k == 0 {
                continue;
            }
            let frozen = h.masters.get("py") == Some(&MasterState::Frozen);
            let need = u64::from(k) * r.memory.reserve_mib()
                + if frozen { 0 } else { r.memory.master_mib };
            prop_assert!(need <= h.memory_free_mib, "{} over memory: {} > {}", h.id, need, h.memory_free_mib);
            prop_assert!(k <= h.start_slots_free);
            prop_assert!(!h.drained);
            prop_assert!(h.cpus >= r.vcpus);
            prop_assert!(r.constraints.iter().all(|s| s.matches(&h.labels)));
            let before = h.instances.get("web").copied().unwrap_or(0);
            prop_assert!(before + k <= r.max_per_host.unwrap_or(u32::MAX));
        }
        if let Some(s) = &b.shortfall {
            // A shortfall means nothing is left that could take one more.
            for h in &hosts {
                prop_assert!(!can_take_another(&c, &r, &h.id));
            }
            let rej = s.rejected;
            let sum = rej.drained + rej.constraints + rej.cpus + rej.max_per_host + rej.memory + rej.start_slots;
            prop_assert_eq!(sum as usize, hosts.len());
        }
    }

    #[test]
    fn spread_by_host_keeps_counts_within_one(hosts in arb_hosts(), mut r in arb_request(), n in 0u32..60) {
        r.strategy = Plan::Spread(SpreadBy::Host);
        let mut c = Cluster::new(hosts.clone()).unwrap();
        let b = c.place_batch(&r, n).unwrap();
        let after = counts(&c, &hosts);
        // Every host that got a clone ends at most one above every host
        // that could still take one (from any starting counts).
        for h in hosts.iter().filter(|h| placed_on(&b, &h.id) > 0) {
            for g in hosts.iter().filter(|g| can_take_another(&c, &r, &g.id)) {
                prop_assert!(after[&h.id] <= after[&g.id] + 1, "{}={} vs {}={}", h.id, after[&h.id], g.id, after[&g.id]);
            }
        }
    }

    #[test]
    fn binpack_leaves_at_most_one_host_partly_filled(hosts in arb_hosts(), mut r in arb_request(), n in 0u32..60) {
        r.strategy = Plan::Binpack;
        let mut c = Cluster::new(hosts.clone()).unwrap();
        let b = c.place_batch(&r, n).unwrap();
        let open = b.per_host.keys().filter(|h| can_take_another(&c, &r, h)).count();
        prop_assert!(open <= 1, "{} hosts used but still open", open);
    }

    #[test]
    fn binpack_uses_the_fewest_identical_hosts(n_hosts in 1usize..10, per_host in 1u32..8, n in 0u32..60) {
        let hosts: Vec<Host> = (0..n_hosts).map(|i| Host {
            id: HostId(format!("h{i}")),
            zone: "z".into(),
            labels: BTreeMap::new(),
            memory_total_mib: 64 * u64::from(per_host),
            memory_free_mib: 64 * u64::from(per_host),
            cpus: 4,
            start_slots_free: 100,
            drained: false,
            masters: [("py".to_string(), MasterState::Frozen)].into(),
            instances: BTreeMap::new(),
            link_bytes_per_s: 1,
        }).collect();
        let r = Request {
            app: "web".into(),
            image: "py".into(),
            memory: CloneMemory { guest_ram_mib: 64, private_mib_per_clone: None, master_mib: 64 },
            vcpus: 1,
            constraints: vec![],
            max_per_host: None,
            strategy: Plan::Binpack,
            snapshot_bytes: 0,
        };
        let mut c = Cluster::new(hosts).unwrap();
        let b = c.place_batch(&r, n).unwrap();
        let fit = n.min(per_host * n_hosts as u32);
        prop_assert_eq!(b.placed(), fit);
        prop_assert_eq!(b.per_host.len() as u32, fit.div_ceil(per_host));
    }

    #[test]
    fn a_frozen_master_wins_over_an_otherwise_better_host(hosts in arb_hosts(), mut r in arb_request(), strategy in arb_strategy()) {
        r.strategy = strategy;
        let c0 = Cluster::new(hosts.clone()).unwrap();
        let mut c = c0.clone();
        let Ok(res) = c.place(&r) else { return Ok(()); };
        let chosen = hosts.iter().find(|h| h.id == res.host).unwrap();
        let chosen_frozen = chosen.masters.get("py") == Some(&MasterState::Frozen);
        for h in &hosts {
            let Ok(s) = c0.evaluate(&r, &h.id).unwrap() else { continue; };
            let frozen = h.masters.get("py") == Some(&MasterState::Frozen);
            // Among hosts equal on the spread tier (all of them for binpack),
            // an eligible frozen host means the chosen one is frozen.
            if frozen && s.spread_tier == res.score.spread_tier {
                prop_assert!(chosen_frozen, "chose {} over frozen {}", res.host, h.id);
            }
            prop_assert!(s.spread_tier >= res.score.spread_tier);
        }
    }

    #[test]
    fn a_batch_equals_as_many_single_placements(hosts in arb_hosts(), r in arb_request(), n in 0u32..60) {
        let mut cb = Cluster::new(hosts.clone()).unwrap();
        let mut cs = cb.clone();
        let b = cb.place_batch(&r, n).unwrap();
        let mut singles = Vec::new();
        for _ in 0..n {
            match cs.place(&r) {
                Ok(res) => singles.push(res),
                Err(_) => break,
            }
        }
        let seq_b: Vec<&HostId> = b.reservations.iter().map(|x| &x.host).collect();
        let seq_s: Vec<&HostId> = singles.iter().map(|x| &x.host).collect();
        prop_assert_eq!(seq_b, seq_s);
        prop_assert_eq!(counts(&cb, &hosts), counts(&cs, &hosts));
    }

    #[test]
    fn releasing_every_reservation_restores_the_model(hosts in arb_hosts(), r in arb_request(), n in 0u32..60) {
        let c0 = Cluster::new(hosts.clone()).unwrap();
        let mut c = c0.clone();
        let b = c.place_batch(&r, n).unwrap();
        for res in b.reservations.iter().rev() {
            c.release(res).unwrap();
        }
        for h in &hosts {
            prop_assert_eq!(c.free_mib(&h.id), c0.free_mib(&h.id));
            prop_assert_eq!(c.slots_free(&h.id), c0.slots_free(&h.id));
            prop_assert_eq!(c.app_count(&h.id, "web"), c0.app_count(&h.id, "web"));
        }
    }
}
