//! The behaviour suite every [`Store`] backend must pass: one function per
//! behaviour, generic over a [`Harness`] that makes and reopens a backend,
//! and [`store_suite!`] that turns them into `#[test]`s inside a backend's
//! test module (`store_suite!(MyHarness);`). Both backends run it.
//!
//! It must not: depend on one backend's internals, or read a clock (times
//! are fixed [`Millis`] values).

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::time::Duration;

use super::*;

/// Makes a backend for one test.
pub(crate) trait Harness {
    /// The backend.
    type S: Store;
    /// A new, empty place to keep a store (a temp dir, an etcd and a key
    /// prefix). Tests keep it for as long as they use a store opened in it.
    fn new() -> Self;
    /// Open the store kept there; called again after dropping the previous
    /// handle, it must see everything that handle committed.
    fn open(&mut self) -> Self::S;
}

pub(crate) fn spec(instances: u32) -> AppSpec {
    AppSpec {
        master: MasterSpec {
            name: "py-web".into(),
            memory_mib: 256,
            vcpus: 1,
            warmup: Some("python -c 'import app'".into()),
            ahead: 0,
        },
        instances,
        placement: PlacementSpec {
            strategy: Strategy::Spread,
            spread_by: SpreadBy::Zone,
            constraints: vec!["disk=ssd".into(), "zone in (a,b)".into()],
            max_per_host: Some(4),
        },
        health: HealthSpec {
            command: Some("curl -fs localhost:8080/health".into()),
            interval_s: 5,
            failures_to_replace: 3,
        },
        on_host_loss: OnHostLoss::Recreate,
        labels: BTreeMap::from([("team".into(), "web".into())]),
    }
}

pub(crate) fn host_info(zone: &str, heartbeat: u64) -> HostInfo {
    HostInfo {
        zone: zone.into(),
        labels: BTreeMap::from([("disk".into(), "ssd".into())]),
        address: "10.0.0.2:7070".into(),
        capacity: Capacity {
            memory_mib: 16_384,
            cpus: 8,
            start_slots: 4,
            memory_free_mib: 12_000,
            start_slots_free: 4,
        },
        masters: BTreeMap::from([("py-web".into(), MasterHeld::Frozen)]),
        snapshot_bytes: BTreeMap::from([("py-web".into(), 20 << 20)]),
        last_heartbeat: Millis(heartbeat),
        state: HostState::Up,
    }
}

fn put(host: &str, instance: &str) -> PlacementOp {
    PlacementOp::Put {
        host: host.into(),
        instance_id: instance.into(),
        state: PlacementState::Placed,
    }
}

fn place(slot: u32, host: &str) -> PlacementWrite {
    PlacementWrite {
        slot,
        expect: Expect::Absent,
        op: put(host, &format!("i-{slot}")),
    }
}

fn assert_conflict(err: StoreError, want_kind: Kind, want_expected: Expect, want_found: Found) {
    match err {
        StoreError::Conflict {
            kind,
            expected,
            found,
            ..
        } => {
            assert_eq!(
                (kind, expected, found),
                (want_kind, want_expected, want_found)
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn assert_not_found(result: Result<impl std::fmt::Debug>, want: Kind) {
    match result {
        Err(StoreError::NotFound { kind, .. }) => assert_eq!(kind, want),
        other => panic!("expected {want} not found, got {other:?}"),
    }
}

pub(crate) fn app_round_trips<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let app = store.put_app("web", &spec(3), Expect::Absent).unwrap();
    assert_eq!(app.version, FORMAT_VERSION);
    assert_eq!(app.spec, spec(3));
    assert_eq!(store.get_app("web").unwrap(), app);
    store.put_app("api", &spec(1), Expect::Absent).unwrap();
    let names: Vec<_> = store
        .list_apps()
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["api", "web"]);
}

pub(crate) fn missing_records_are_not_found<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    assert_not_found(store.get_app("web"), Kind::App);
    assert_not_found(store.delete_app("web", Expect::Any), Kind::App);
    assert_not_found(store.get_host("h1"), Kind::Host);
    assert_not_found(store.delete_host("h1", Expect::Any), Kind::Host);
    assert_not_found(store.get_placement("web", 0), Kind::Placement);
    assert_not_found(store.get_lease("h1"), Kind::Lease);
    assert_not_found(store.revoke_lease("h1"), Kind::Lease);
}

pub(crate) fn generation_rises_on_every_change_and_is_never_reused<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g1 = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let g2 = store
        .put_app("web", &spec(2), Expect::At(g1))
        .unwrap()
        .generation;
    let g3 = store
        .put_app("web", &spec(2), Expect::Any)
        .unwrap()
        .generation;
    assert!(g1 < g2 && g2 < g3, "{g1} {g2} {g3}");
    store.delete_app("web", Expect::At(g3)).unwrap();
    let g4 = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    assert!(
        g4 > g3,
        "a re-created app must not reuse a generation: {g4} <= {g3}"
    );
}

pub(crate) fn stale_app_writes_conflict<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g1 = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    assert_conflict(
        store.put_app("web", &spec(5), Expect::Absent).unwrap_err(),
        Kind::App,
        Expect::Absent,
        Found::At(g1),
    );
    let g2 = store
        .put_app("web", &spec(2), Expect::At(g1))
        .unwrap()
        .generation;
    assert_conflict(
        store.put_app("web", &spec(9), Expect::At(g1)).unwrap_err(),
        Kind::App,
        Expect::At(g1),
        Found::At(g2),
    );
    assert_conflict(
        store.delete_app("web", Expect::At(g1)).unwrap_err(),
        Kind::App,
        Expect::At(g1),
        Found::At(g2),
    );
    assert_eq!(
        store.get_app("web").unwrap().spec.instances,
        2,
        "losers wrote nothing"
    );
}

pub(crate) fn racing_app_writers_exactly_one_wins<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let racers = 6u32;
    let barrier = Barrier::new(racers as usize);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..racers)
            .map(|i| {
                let (store, barrier) = (&store, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    store.put_app("web", &spec(10 + i), Expect::At(g))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
        }
    }
    assert_eq!(&store.get_app("web").unwrap(), winners[0]);
}

pub(crate) fn racing_reconcilers_place_a_slot_once<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let hosts = ["h1", "h2", "h3", "h4"];
    let barrier = Barrier::new(hosts.len());
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|host| {
                let (store, barrier) = (&store, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    store.commit_placements("web", Expect::At(g), &[place(0, host)])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let stored = store.get_placement("web", 0).unwrap();
    assert_eq!(&vec![stored], winners[0]);
    assert_eq!(
        store
            .list_placements(&PlacementFilter::default())
            .unwrap()
            .len(),
        1
    );
}

pub(crate) fn a_placement_batch_is_all_or_nothing<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g = store
        .put_app("web", &spec(3), Expect::Absent)
        .unwrap()
        .generation;
    let first = store
        .commit_placements("web", Expect::At(g), &[place(2, "h1")])
        .unwrap();
    let err = store
        .commit_placements(
            "web",
            Expect::At(g),
            &[place(0, "h1"), place(1, "h2"), place(2, "h3")],
        )
        .unwrap_err();
    assert_conflict(
        err,
        Kind::Placement,
        Expect::Absent,
        Found::At(first[0].revision),
    );
    let all = store.list_placements(&PlacementFilter::default()).unwrap();
    assert_eq!(all, first, "slots 0 and 1 were not written");
}

pub(crate) fn a_stale_app_generation_refuses_placements<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g1 = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let g2 = store
        .put_app("web", &spec(0), Expect::At(g1))
        .unwrap()
        .generation;
    assert_conflict(
        store
            .commit_placements("web", Expect::At(g1), &[place(0, "h1")])
            .unwrap_err(),
        Kind::App,
        Expect::At(g1),
        Found::At(g2),
    );
    assert_conflict(
        store
            .commit_placements("gone", Expect::At(g1), &[place(0, "h1")])
            .unwrap_err(),
        Kind::App,
        Expect::At(g1),
        Found::Absent,
    );
    assert!(store
        .list_placements(&PlacementFilter::default())
        .unwrap()
        .is_empty());
}

pub(crate) fn a_placement_update_names_the_record_revision<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let placed = store
        .commit_placements("web", Expect::At(g), &[place(0, "h1")])
        .unwrap()
        .remove(0);
    let running = PlacementWrite {
        slot: 0,
        expect: Expect::At(placed.revision),
        op: PlacementOp::Put {
            host: "h1".into(),
            instance_id: "i-0".into(),
            state: PlacementState::Running,
        },
    };
    let updated = store
        .commit_placements("web", Expect::Any, std::slice::from_ref(&running))
        .unwrap()
        .remove(0);
    assert!(updated.revision > placed.revision);
    assert_eq!(updated.state, PlacementState::Running);
    // The same update from a reconciler that read the old record loses.
    assert_conflict(
        store
            .commit_placements("web", Expect::Any, &[running])
            .unwrap_err(),
        Kind::Placement,
        Expect::At(placed.revision),
        Found::At(updated.revision),
    );
    let delete = |expect| PlacementWrite {
        slot: 0,
        expect,
        op: PlacementOp::Delete,
    };
    assert!(store
        .commit_placements("web", Expect::Any, &[delete(Expect::At(placed.revision))])
        .is_err());
    let out = store
        .commit_placements("web", Expect::Any, &[delete(Expect::At(updated.revision))])
        .unwrap();
    assert!(out.is_empty(), "a delete returns no record");
    assert_not_found(store.get_placement("web", 0), Kind::Placement);
}

pub(crate) fn placements_list_by_app_and_host<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let web = store
        .put_app("web", &spec(3), Expect::Absent)
        .unwrap()
        .generation;
    let api = store
        .put_app("api", &spec(2), Expect::Absent)
        .unwrap()
        .generation;
    store
        .commit_placements(
            "web",
            Expect::At(web),
            &[place(0, "h1"), place(1, "h2"), place(2, "h1")],
        )
        .unwrap();
    store
        .commit_placements("api", Expect::At(api), &[place(0, "h2"), place(1, "h1")])
        .unwrap();
    let keys = |f: PlacementFilter| -> Vec<(String, u32, String)> {
        store
            .list_placements(&f)
            .unwrap()
            .into_iter()
            .map(|p| (p.app, p.slot, p.host))
            .collect()
    };
    let k = |a: &str, s: u32, h: &str| (a.to_string(), s, h.to_string());
    assert_eq!(keys(PlacementFilter::default()).len(), 5);
    assert_eq!(
        keys(PlacementFilter {
            app: Some("web".into()),
            host: None
        }),
        [k("web", 0, "h1"), k("web", 1, "h2"), k("web", 2, "h1")]
    );
    assert_eq!(
        keys(PlacementFilter {
            app: None,
            host: Some("h1".into())
        }),
        [k("api", 1, "h1"), k("web", 0, "h1"), k("web", 2, "h1")]
    );
    assert_eq!(
        keys(PlacementFilter {
            app: Some("api".into()),
            host: Some("h2".into())
        }),
        [k("api", 0, "h2")]
    );
    // An app whose name is a prefix of another's does not see its slots.
    let w = store
        .put_app("we", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    store
        .commit_placements("we", Expect::At(w), &[place(0, "h3")])
        .unwrap();
    assert_eq!(
        keys(PlacementFilter {
            app: Some("we".into()),
            host: None
        }),
        [k("we", 0, "h3")]
    );
}

pub(crate) fn deleting_an_app_keeps_its_placements_for_the_reconciler<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let g = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    store
        .commit_placements("web", Expect::At(g), &[place(0, "h1")])
        .unwrap();
    store.delete_app("web", Expect::At(g)).unwrap();
    let left = store.get_placement("web", 0).unwrap();
    // The reconciler cleans up under "the app is gone".
    let cleanup = PlacementWrite {
        slot: 0,
        expect: Expect::At(left.revision),
        op: PlacementOp::Delete,
    };
    store
        .commit_placements("web", Expect::Absent, &[cleanup])
        .unwrap();
    assert!(store
        .list_placements(&PlacementFilter::default())
        .unwrap()
        .is_empty());
}

pub(crate) fn hosts_round_trip_with_cas<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let h1 = store
        .put_host("h1", &host_info("a", 1_000), Expect::Absent)
        .unwrap();
    assert_eq!(store.get_host("h1").unwrap(), h1);
    let mut draining = host_info("a", 2_000);
    draining.state = HostState::Draining;
    let h1b = store
        .put_host("h1", &draining, Expect::At(h1.revision))
        .unwrap();
    assert!(h1b.revision > h1.revision);
    assert_conflict(
        store
            .put_host("h1", &host_info("a", 3_000), Expect::At(h1.revision))
            .unwrap_err(),
        Kind::Host,
        Expect::At(h1.revision),
        Found::At(h1b.revision),
    );
    store
        .put_host("h2", &host_info("b", 1_000), Expect::Any)
        .unwrap();
    let listed = store.list_hosts().unwrap();
    assert_eq!(
        listed.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        ["h1", "h2"]
    );
    assert_eq!(listed[0].info.state, HostState::Draining);
    store
        .grant_lease("h2", Duration::from_secs(5), Millis(0))
        .unwrap();
    store.delete_host("h2", Expect::Any).unwrap();
    assert_not_found(store.get_host("h2"), Kind::Host);
    assert_not_found(store.get_lease("h2"), Kind::Lease);
}

pub(crate) fn leases_expire_by_the_callers_clock<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let ttl = Duration::from_secs(5);
    let lease = store.grant_lease("h1", ttl, Millis(1_000)).unwrap();
    assert_eq!((lease.expires_at, lease.ttl_ms), (Millis(6_000), 5_000));
    store.grant_lease("h2", ttl, Millis(3_000)).unwrap();
    let expired = |now| -> Vec<String> {
        store
            .expired_leases(Millis(now))
            .unwrap()
            .into_iter()
            .map(|l| l.host)
            .collect()
    };
    assert!(expired(5_999).is_empty());
    assert_eq!(expired(6_000), ["h1"]);
    assert_eq!(expired(8_000), ["h1", "h2"]);
    // A renewal moves the expiry from the renewal's time.
    store.grant_lease("h1", ttl, Millis(4_000)).unwrap();
    assert_eq!(store.get_lease("h1").unwrap().expires_at, Millis(9_000));
    assert_eq!(expired(8_000), ["h2"]);
    store.revoke_lease("h2").unwrap();
    assert!(expired(u64::MAX).iter().all(|h| h != "h2"));
    // A TTL beyond the end of time saturates instead of wrapping to the past.
    let forever = store.grant_lease("h3", Duration::MAX, Millis(1)).unwrap();
    assert!(!forever.is_expired(Millis(u64::MAX - 1)));
}

pub(crate) fn everything_survives_a_reopen<H: Harness>() {
    let mut harness = H::new();
    let store = harness.open();
    let app = store.put_app("web", &spec(2), Expect::Absent).unwrap();
    let host = store
        .put_host("h1", &host_info("a", 1_000), Expect::Absent)
        .unwrap();
    let placed = store
        .commit_placements(
            "web",
            Expect::At(app.generation),
            &[place(0, "h1"), place(1, "h1")],
        )
        .unwrap();
    let lease = store
        .grant_lease("h1", Duration::from_secs(10), Millis(1_000))
        .unwrap();
    drop(store);

    let store = harness.open();
    assert_eq!(store.get_app("web").unwrap(), app);
    assert_eq!(store.list_hosts().unwrap(), [host]);
    assert_eq!(
        store.list_placements(&PlacementFilter::default()).unwrap(),
        placed
    );
    assert_eq!(store.get_lease("h1").unwrap(), lease);
    // Revisions go on from where they were: a stale reader still loses.
    let next = store
        .put_app("web", &spec(3), Expect::At(app.generation))
        .unwrap();
    assert!(next.generation > placed[1].revision);
    assert!(store
        .put_app("web", &spec(4), Expect::At(app.generation))
        .is_err());
}

/// Expand the suite into `#[test]`s for a [`Harness`] type.
macro_rules! store_suite {
    ($harness:ty) => {
        $crate::store::suite::store_suite!(@tests $harness;
            app_round_trips,
            missing_records_are_not_found,
            generation_rises_on_every_change_and_is_never_reused,
            stale_app_writes_conflict,
            racing_app_writers_exactly_one_wins,
            racing_reconcilers_place_a_slot_once,
            a_placement_batch_is_all_or_nothing,
            a_stale_app_generation_refuses_placements,
            a_placement_update_names_the_record_revision,
            placements_list_by_app_and_host,
            deleting_an_app_keeps_its_placements_for_the_reconciler,
            hosts_round_trip_with_cas,
            leases_expire_by_the_callers_clock,
            everything_survives_a_reopen,
        );
    };
    (@tests $harness:ty; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                $crate::store::suite::$name::<$harness>();
            }
        )*
    };
}
pub(crate) use store_suite;
