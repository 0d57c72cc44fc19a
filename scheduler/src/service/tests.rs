//! The service over the embedded store: declare, heartbeat, reconcile, and
//! what each host is told to run.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::store::embedded::EmbeddedStore;
use crate::wire::{InstanceReport, MasterReport};

const SEC: u64 = 1000;

fn service() -> (tempfile::TempDir, Arc<Scheduler<EmbeddedStore>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (
        dir,
        Arc::new(Scheduler::new(Box::new(store), Config::default())),
    )
}

fn body(instances: u32) -> AppBody {
    serde_json::from_value(serde_json::json!({
        "master": {"name": "py", "memory_mib": 128},
        "instances": instances,
    }))
    .unwrap()
}

fn report(host: &str, zone: &str) -> HostReport {
    HostReport {
        address: format!("http://{host}:7070"),
        zone: zone.into(),
        labels: BTreeMap::from([("host".into(), host.into())]),
        capacity: CapacityReport {
            memory_total_mib: 16_384,
            memory_free_mib: 16_384,
            cpus: 4,
            start_slots: 64,
            start_slots_free: 64,
        },
        masters: vec![],
        instances: vec![],
    }
}

/// Every host heartbeats, reporting every slot placed on it as running and
/// each master it was assigned as frozen.
fn converge(
    s: &Scheduler<EmbeddedStore>,
    hosts: &[&str],
    now: Millis,
) -> BTreeMap<String, Assignment> {
    let mut out = BTreeMap::new();
    for h in hosts {
        let mut r = report(h, "z");
        let placed = s
            .store()
            .list_placements(&PlacementFilter {
                app: None,
                host: Some(h.to_string()),
            })
            .unwrap();
        r.instances = placed
            .iter()
            .filter(|p| matches!(p.state, PlacementState::Placed | PlacementState::Running))
            .map(|p| InstanceReport {
                app: p.app.clone(),
                slot: p.slot,
                instance_id: p.instance_id.clone(),
                state: "running".into(),
                reason: None,
            })
            .collect();
        r.masters = vec![MasterReport {
            name: "py".into(),
            state: MasterHeld::Frozen,
            snapshot_bytes: None,
        }];
        out.insert(h.to_string(), s.heartbeat(h, &r, now).unwrap());
    }
    out
}

fn per_host(s: &Scheduler<EmbeddedStore>) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    for p in s
        .store()
        .list_placements(&PlacementFilter::default())
        .unwrap()
    {
        *m.entry(p.host).or_default() += 1;
    }
    m
}

#[test]
fn apply_is_idempotent_and_validates() {
    let (_d, s) = service();
    let (a, created) = s.apply_app(&None, "web", &body(3), Millis(0)).unwrap();
    assert!(created);
    let (b, created) = s.apply_app(&None, "web", &body(3), Millis(1)).unwrap();
    assert!(!created);
    assert_eq!(a.generation, b.generation, "the same body changes nothing");
    let (c, _) = s.apply_app(&None, "web", &body(4), Millis(2)).unwrap();
    assert!(c.generation > b.generation);
    assert_eq!(c.desired, 4);

    let mut bad = body(1);
    bad.placement.constraints = vec!["zone in (a".into()];
    let e = s.apply_app(&None, "web", &bad, Millis(3)).unwrap_err();
    assert!(e.to_string().contains("placement.constraints"), "{e}");
    let e = s.apply_app(&None, "Web!", &body(1), Millis(3)).unwrap_err();
    assert!(e.to_string().contains("app name"), "{e}");
    let e = s
        .apply_app(&None, "web", &body(MAX_INSTANCES + 1), Millis(3))
        .unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    assert!(matches!(
        s.app(&None, "nope", Millis(3)),
        Err(ServiceError::NotFound { .. })
    ));
}

#[test]
fn tenants_see_their_own_apps_only() {
    let (_d, s) = service();
    s.apply_app(&Some("acme".into()), "web", &body(1), Millis(0))
        .unwrap();
    s.apply_app(&None, "web", &body(1), Millis(0)).unwrap();
    let acme = s.apps(&Some("acme".into()), Millis(0)).unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0].name, "web");
    assert!(s.apps(&Some("other".into()), Millis(0)).unwrap().is_empty());
    assert_eq!(
        s.apps(&None, Millis(0)).unwrap().len(),
        2,
        "the admin sees both"
    );
    assert!(matches!(
        s.app(&Some("other".into()), "web", Millis(0)),
        Err(ServiceError::NotFound { .. })
    ));
}

#[test]
fn thirty_spread_over_three_hosts_and_one_boots_the_master() {
    let (_d, s) = service();
    let hosts = ["h1", "h2", "h3"];
    for h in hosts {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    s.apply_app(&None, "web", &body(30), Millis(0)).unwrap();
    let step = s.reconcile(Millis(10)).unwrap();
    assert_eq!(step.placed, 30);
    assert_eq!(
        per_host(&s).values().copied().collect::<Vec<_>>(),
        [10, 10, 10]
    );

    // Exactly one host is told to boot the master; the others wait for it.
    let a: Vec<Assignment> = hosts
        .iter()
        .map(|h| s.heartbeat(h, &report(h, "z"), Millis(20)).unwrap())
        .collect();
    let boots: Vec<usize> = (0..3)
        .filter(|i| a[*i].masters[0].source.is_none())
        .collect();
    assert_eq!(boots, [0], "the first host by id boots it");
    for x in &a[1..] {
        let src = x.masters[0].source.as_ref().unwrap();
        assert_eq!((src.host.as_str(), src.ready), ("h1", false));
    }
    // Once h1 reports it frozen, the others fetch it from there.
    let mut r = report("h1", "z");
    r.masters = vec![MasterReport {
        name: "py".into(),
        state: MasterHeld::Frozen,
        snapshot_bytes: Some(1 << 20),
    }];
    s.heartbeat("h1", &r, Millis(30)).unwrap();
    let x = s.heartbeat("h2", &report("h2", "z"), Millis(30)).unwrap();
    let src = x.masters[0].source.as_ref().unwrap();
    assert_eq!((src.host.as_str(), src.ready), ("h1", true));
    assert_eq!(x.instances.len(), 10);

    converge(&s, &hosts, Millis(40));
    let st = s.app(&None, "web", Millis(40)).unwrap();
    assert_eq!((st.running, st.starting, st.desired), (30, 0, 30));
    assert!(st.shortfall.is_none());
    // Nothing to do: reconcile again changes nothing.
    assert_eq!(s.reconcile(Millis(50)).unwrap(), Step::default());
}

#[test]
fn a_lost_host_is_replaced_and_told_to_stop_when_it_returns() {
    let (_d, s) = service();
    let hosts = ["h1", "h2", "h3"];
    for h in hosts {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    s.apply_app(&None, "web", &body(30), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    let before = converge(&s, &hosts, Millis(2 * SEC));
    let old: Vec<String> = before["h3"]
        .instances
        .iter()
        .map(|i| i.instance_id.clone())
        .collect();
    assert_eq!(old.len(), 10);

    // h3 stops heartbeating; the others go on.
    let t = Millis(2 * SEC + 4 * SEC + 1);
    converge(&s, &hosts[..2], Millis(5 * SEC));
    let step = s.reconcile(t).unwrap();
    assert_eq!(step.lost, 1);
    assert_eq!(step.placed, 10);
    assert_eq!(per_host(&s).values().copied().collect::<Vec<_>>(), [15, 15]);
    assert_eq!(s.hosts(t).unwrap()[2].state, "lost");

    // h3 returns reporting its old instances: it is assigned none of them.
    let mut r = report("h3", "z");
    r.instances = before["h3"]
        .instances
        .iter()
        .map(|i| InstanceReport {
            app: i.app.clone(),
            slot: i.slot,
            instance_id: i.instance_id.clone(),
            state: "running".into(),
            reason: None,
        })
        .collect();
    let back = s.heartbeat("h3", &r, t).unwrap();
    assert!(back.instances.is_empty(), "{:?}", back.instances);
    assert_eq!(s.hosts(t).unwrap()[2].state, "up");
    // The replacements have new ids.
    let now: Vec<String> = s
        .store()
        .list_placements(&PlacementFilter::default())
        .unwrap()
        .into_iter()
        .map(|p| p.instance_id)
        .collect();
    assert!(old.iter().all(|o| !now.contains(o)));
    assert_eq!(now.len(), 30);
}

#[test]
fn leave_keeps_the_slots_of_a_lost_host_and_says_so() {
    let (_d, s) = service();
    for h in ["h1", "h2"] {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    let mut b = body(4);
    b.on_host_loss = OnHostLoss::Leave;
    s.apply_app(&None, "web", &b, Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    converge(&s, &["h1", "h2"], Millis(SEC));
    converge(&s, &["h1"], Millis(4 * SEC));
    let step = s.reconcile(Millis(6 * SEC)).unwrap();
    assert_eq!((step.lost, step.placed), (1, 0));
    let st = s.app(&None, "web", Millis(6 * SEC)).unwrap();
    assert_eq!(st.running, 4, "records stay as they were");
    let st_short = st.shortfall;
    assert!(st_short.is_none() || st_short.unwrap().reason == "host_lost");
}

#[test]
fn scale_down_and_delete_stop_instances() {
    let (_d, s) = service();
    s.heartbeat("h1", &report("h1", "z"), Millis(0)).unwrap();
    s.apply_app(&None, "web", &body(5), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    s.scale(&None, "web", 2, Millis(2)).unwrap();
    assert_eq!(s.reconcile(Millis(3)).unwrap().stopped, 3);
    let a = s.heartbeat("h1", &report("h1", "z"), Millis(4)).unwrap();
    assert_eq!(
        a.instances.iter().map(|i| i.slot).collect::<Vec<_>>(),
        [0, 1]
    );
    s.delete_app(&None, "web", Millis(5)).unwrap();
    let a = s.heartbeat("h1", &report("h1", "z"), Millis(6)).unwrap();
    assert!(
        a.instances.is_empty(),
        "a deleted app's instances are not assigned"
    );
    assert_eq!(s.reconcile(Millis(7)).unwrap().stopped, 2);
    assert!(per_host(&s).is_empty());
}

#[test]
fn a_drain_moves_instances_then_the_host_is_drained() {
    let (_d, s) = service();
    for h in ["h1", "h2"] {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    s.apply_app(&None, "web", &body(6), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    assert_eq!(per_host(&s)["h1"], 3);
    assert_eq!(s.drain("h1", true, Millis(2)).unwrap().state, "draining");
    s.reconcile(Millis(3)).unwrap();
    assert_eq!(per_host(&s).get("h1"), None);
    assert_eq!(per_host(&s)["h2"], 6);
    s.reconcile(Millis(4)).unwrap();
    assert_eq!(s.hosts(Millis(4)).unwrap()[0].state, "drained");
    assert_eq!(s.drain("h1", false, Millis(5)).unwrap().state, "up");
    assert!(matches!(
        s.drain("nope", true, Millis(5)),
        Err(ServiceError::NotFound { .. })
    ));
}

#[test]
fn shortfalls_are_stated_never_silent() {
    let (_d, s) = service();
    s.heartbeat("h1", &report("h1", "z"), Millis(0)).unwrap();
    let mut b = body(3);
    b.placement.constraints = vec!["gpu=yes".into()];
    s.apply_app(&None, "gpu", &b, Millis(0)).unwrap();
    // 16 GiB at 128 MiB a clone (+ the master): 127 fit.
    let mut r = report("h1", "z");
    r.capacity.start_slots = 1000;
    r.capacity.start_slots_free = 1000;
    s.heartbeat("h1", &r, Millis(0)).unwrap();
    s.apply_app(&None, "big", &body(200), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    let gpu = s.app(&None, "gpu", Millis(1)).unwrap().shortfall.unwrap();
    assert_eq!((gpu.reason.as_str(), gpu.unplaced), ("constraints", 3));
    let big = s.app(&None, "big", Millis(1)).unwrap();
    let short = big.shortfall.unwrap();
    assert_eq!(short.reason, "capacity");
    assert_eq!((big.starting, short.unplaced), (127, 73));
    assert!(big.events.iter().any(|e| e.action == "shortfall"));
}

#[test]
fn start_slots_pace_starts_but_do_not_steer_a_spread() {
    let (_d, s) = service();
    for h in ["h1", "h2", "h3"] {
        let mut r = report(h, "z");
        r.capacity.start_slots = 4;
        r.capacity.start_slots_free = 4;
        s.heartbeat(h, &r, Millis(0)).unwrap();
    }
    s.apply_app(&None, "web", &body(30), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    // Every slot is placed at once, 10 a host, although each host starts
    // only 4 at a time: its daemon starts the rest as its slots free up.
    assert_eq!(
        per_host(&s).values().copied().collect::<Vec<_>>(),
        [10, 10, 10]
    );
    let st = s.app(&None, "web", Millis(1)).unwrap();
    assert_eq!(st.starting, 30);
    assert!(st.shortfall.is_none());
    // h1 (which holds the master) reports its 10 running first; nothing
    // moves to it.
    converge(&s, &["h1"], Millis(2));
    s.reconcile(Millis(3)).unwrap();
    assert_eq!(
        per_host(&s).values().copied().collect::<Vec<_>>(),
        [10, 10, 10]
    );
}

#[test]
fn failed_instances_are_replaced() {
    let (_d, s) = service();
    s.heartbeat("h1", &report("h1", "z"), Millis(0)).unwrap();
    s.apply_app(&None, "web", &body(1), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    let a = s.heartbeat("h1", &report("h1", "z"), Millis(2)).unwrap();
    let first = a.instances[0].instance_id.clone();
    let mut r = report("h1", "z");
    r.instances = vec![InstanceReport {
        app: "web".into(),
        slot: 0,
        instance_id: first.clone(),
        state: "failed".into(),
        reason: Some("health check failed 3 times".into()),
    }];
    let a = s.heartbeat("h1", &r, Millis(3)).unwrap();
    assert!(a.instances.is_empty(), "a failed slot is not assigned");
    s.reconcile(Millis(1000)).unwrap();
    let a = s.heartbeat("h1", &report("h1", "z"), Millis(1001)).unwrap();
    assert_eq!(a.instances.len(), 1);
    assert_ne!(a.instances[0].instance_id, first);
    let ev = s.app(&None, "web", Millis(1001)).unwrap().events;
    assert!(
        ev.iter()
            .any(|e| e.action == "failed" && e.reason.contains("health")),
        "{ev:?}"
    );
}

#[test]
fn concurrent_reconcilers_place_each_slot_once() {
    let (_d, s) = service();
    for h in ["h1", "h2", "h3"] {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    s.apply_app(&None, "web", &body(60), Millis(0)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.reconcile(Millis(1)).unwrap())
        })
        .collect();
    let placed: u32 = threads.into_iter().map(|t| t.join().unwrap().placed).sum();
    assert_eq!(placed, 60, "exactly one reconciler's batch landed");
    let recs = s
        .store()
        .list_placements(&PlacementFilter::default())
        .unwrap();
    assert_eq!(recs.len(), 60);
}

#[test]
fn masters_ahead_go_to_the_first_matching_hosts() {
    let (_d, s) = service();
    for h in ["h1", "h2", "h3"] {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    let mut b = body(0);
    b.master.ahead = 2;
    s.apply_app(&None, "web", &b, Millis(0)).unwrap();
    let got: Vec<usize> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| {
            s.heartbeat(h, &report(h, "z"), Millis(1))
                .unwrap()
                .masters
                .len()
        })
        .collect();
    assert_eq!(got, [1, 1, 0]);
}

#[test]
fn a_heartbeat_with_an_unusable_address_is_refused_and_records_nothing() {
    let (_d, s) = service();
    for bad in [
        "",
        "10.0.0.1:7070",
        "http://",
        "http://h",
        "http://h:0",
        "http://h:99999",
        "http://h:70/x",
        "ftp://h:1",
        "http://a b:1",
    ] {
        let mut r = report("h1", "z");
        r.address = bad.into();
        let e = s.heartbeat("h1", &r, Millis(0)).unwrap_err();
        assert!(e.to_string().contains("http://HOST:PORT"), "{bad:?}: {e}");
    }
    assert!(s.hosts(Millis(0)).unwrap().is_empty());
    for good in [
        "http://10.0.0.1:7070",
        "http://[::1]:7070",
        "http://host-1.example:80",
    ] {
        let mut r = report("h1", "z");
        r.address = good.into();
        s.heartbeat("h1", &r, Millis(0)).unwrap();
    }
}

#[test]
fn a_new_leader_gives_hosts_one_lease_before_it_finds_them_lost() {
    let (_d, s) = service();
    for h in ["h1", "h2"] {
        s.heartbeat(h, &report(h, "z"), Millis(0)).unwrap();
    }
    s.apply_app(&None, "web", &body(4), Millis(0)).unwrap();
    s.reconcile(Millis(1)).unwrap();
    converge(&s, &["h1", "h2"], Millis(SEC));
    // The scheduler was down for 10 s: both leases ran out meanwhile. The
    // replica that now leads does not find the hosts lost at once…
    let t = Millis(11 * SEC);
    s.begin_leading(t);
    let step = s.reconcile(t).unwrap();
    assert_eq!(
        (step.lost, step.placed),
        (0, 0),
        "nothing lost or placed again during the grace"
    );
    // …h1 checks in within the lease; h2 does not.
    converge(&s, &["h1"], Millis(12 * SEC));
    let step = s.reconcile(Millis(15 * SEC + 1)).unwrap();
    assert_eq!(
        step.lost, 1,
        "h2, silent for a whole lease after the new lead, is lost"
    );
    assert_eq!(step.placed, 2, "its 2 instances are placed again");
    assert_eq!(per_host(&s)["h1"], 4);
}
