//! The etcd backend against a real, private etcd per test
//! ([`crate::store::testing::Etcd`]): the shared suite, then what only this
//! backend has (prefixes, connect errors, transaction limits, watches that
//! survive an etcd restart, election).

use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::time::Instant;

use super::*;
use crate::store::suite::{self, host_info, spec, Harness};
use crate::store::testing::{Etcd, MAX_TXN_OPS};
use crate::store::{PlacementOp, PlacementState};

/// A unique prefix per store in one etcd.
fn prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "/test-{}-{}/",
        std::process::id(),
        N.fetch_add(1, AtomicOrdering::Relaxed)
    )
}

/// One private etcd per test; reopening reconnects to it under the same
/// prefix.
struct EtcdHarness {
    etcd: Etcd,
    prefix: String,
}

impl Harness for EtcdHarness {
    type S = EtcdStore;
    fn new() -> Self {
        EtcdHarness {
            etcd: Etcd::start(),
            prefix: prefix(),
        }
    }
    fn open(&mut self) -> EtcdStore {
        EtcdStore::connect(&self.etcd.endpoints(), Some(&self.prefix)).expect("connect to etcd")
    }
}

suite::store_suite!(EtcdHarness);

fn place(slot: u32, host: &str) -> PlacementWrite {
    PlacementWrite {
        slot,
        expect: Expect::Absent,
        op: PlacementOp::Put {
            host: host.into(),
            instance_id: format!("i-{slot}"),
            state: PlacementState::Placed,
        },
    }
}

/// Wait until `rx` holds at least `rev`, or fail after `within`.
fn wait_for_rev(rx: &watch::Receiver<u64>, rev: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while *rx.borrow() < rev {
        assert!(
            Instant::now() < deadline,
            "the watch still says {} after {within:?}, want {rev}",
            *rx.borrow()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn prefixes_isolate_stores_in_one_etcd() {
    let etcd = Etcd::start();
    let a = EtcdStore::connect(&etcd.endpoints(), Some("/a")).unwrap();
    let b = EtcdStore::connect(&etcd.endpoints(), Some("/ab/")).unwrap();
    assert_eq!(a.prefix(), "/a/");
    a.put_app("web", &spec(1), Expect::Absent).unwrap();
    b.put_app("api", &spec(1), Expect::Absent).unwrap();
    let names = |s: &EtcdStore| -> Vec<String> {
        s.list_apps().unwrap().into_iter().map(|a| a.name).collect()
    };
    assert_eq!(names(&a), ["web"]);
    assert_eq!(names(&b), ["api"]);
    let default = EtcdStore::connect(&etcd.endpoints(), None).unwrap();
    assert_eq!(default.prefix(), DEFAULT_PREFIX);
    assert!(default.list_apps().unwrap().is_empty());
}

#[test]
fn an_unreachable_etcd_fails_naming_its_endpoints() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let err = EtcdStore::connect(std::slice::from_ref(&endpoint), None).unwrap_err();
    assert!(
        started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let source = std::error::Error::source(&err).expect("a source");
    let etcd = source.downcast_ref::<EtcdError>().expect("an EtcdError");
    assert!(
        matches!(etcd, EtcdError::Unreachable { endpoints, .. } if *endpoints == endpoint),
        "{etcd:?}"
    );
    assert!(source.to_string().contains(&endpoint), "{source}");
    assert!(err.to_string().contains("connecting to etcd"), "{err}");
}

#[test]
fn corrupt_and_foreign_records_are_refused() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    store.put_raw_app("web", b"{not json").unwrap();
    let err = store.get_app("web").unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { kind: Kind::App, key, .. } if key == "web"),
        "{err:?}"
    );
    store
        .put_raw_app("api", br#"{"version": 2, "name": "api"}"#)
        .unwrap();
    let err = store.get_app("api").unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedVersion { found: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn a_batch_of_hundreds_of_slots_is_one_transaction() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    let g = store
        .put_app("web", &spec(400), Expect::Absent)
        .unwrap()
        .generation;
    let writes: Vec<_> = (0..400).map(|s| place(s, "h1")).collect();
    let placed = store
        .commit_placements("web", Expect::At(g), &writes)
        .unwrap();
    assert_eq!(placed.len(), 400);
    assert!(placed.iter().all(|p| p.revision == placed[0].revision));
    let listed = store.list_placements(&PlacementFilter::default()).unwrap();
    assert_eq!(listed, placed, "ordered by slot, not by key text");
    // The same batch again fails on its first slot, and names it.
    let err = store
        .commit_placements("web", Expect::At(g), &writes)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { kind: Kind::Placement, key, .. } if key == "web/0"),
        "{err:?}"
    );
}

#[test]
fn a_batch_beyond_max_txn_ops_is_refused_whole_with_the_fix() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    let g = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let writes: Vec<_> = (0..MAX_TXN_OPS).map(|s| place(s, "h1")).collect();
    let err = store
        .commit_placements("web", Expect::At(g), &writes)
        .unwrap_err();
    let source = std::error::Error::source(&err).expect("a source");
    let etcd_err = source.downcast_ref::<EtcdError>().expect("an EtcdError");
    assert!(
        matches!(etcd_err, EtcdError::TooManyOps { ops, .. } if *ops == MAX_TXN_OPS as usize + 1),
        "{etcd_err:?}"
    );
    assert!(source.to_string().contains("--max-txn-ops"), "{source}");
    assert!(store
        .list_placements(&PlacementFilter::default())
        .unwrap()
        .is_empty());
}

#[test]
fn a_batch_naming_a_slot_twice_is_refused() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    let g = store
        .put_app("web", &spec(1), Expect::Absent)
        .unwrap()
        .generation;
    let err = store
        .commit_placements("web", Expect::At(g), &[place(0, "h1"), place(0, "h2")])
        .unwrap_err();
    let source = std::error::Error::source(&err).expect("a source");
    assert!(
        matches!(
            source.downcast_ref::<EtcdError>(),
            Some(EtcdError::DuplicateSlot { slot: 0, .. })
        ),
        "{err:?}"
    );
}

#[test]
fn it_works_from_a_blocking_thread_of_another_runtime() {
    let etcd = Etcd::start();
    let endpoints = etcd.endpoints();
    for flavour in ["current_thread", "multi_thread"] {
        let rt = match flavour {
            "current_thread" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            _ => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        };
        let eps = endpoints.clone();
        let names = rt.block_on(async move {
            let store = tokio::task::spawn_blocking(move || {
                EtcdStore::connect(&eps, Some(&prefix())).unwrap()
            })
            .await
            .unwrap();
            let store = Arc::new(store);
            let s = Arc::clone(&store);
            let names = tokio::task::spawn_blocking(move || {
                s.put_app("web", &spec(1), Expect::Absent).unwrap();
                s.list_apps().unwrap()
            })
            .await
            .unwrap();
            // Dropped on a runtime worker: must not block or panic.
            drop(store);
            names
        });
        assert_eq!(names.len(), 1, "{flavour}");
    }
}

#[test]
fn watch_wakes_on_apps_hosts_and_placements_but_not_leases() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    let rx = store.watch();
    let start = *rx.borrow();
    let app = store.put_app("web", &spec(1), Expect::Absent).unwrap();
    assert!(app.generation > start);
    wait_for_rev(&rx, app.generation, Duration::from_secs(5));
    let host = store
        .put_host("h1", &host_info("a", 1), Expect::Absent)
        .unwrap();
    wait_for_rev(&rx, host.revision, Duration::from_secs(5));
    let placed = store
        .commit_placements("web", Expect::At(app.generation), &[place(0, "h1")])
        .unwrap();
    wait_for_rev(&rx, placed[0].revision, Duration::from_secs(5));
    // A lease renewal is a write, but not a change the scheduler acts on.
    store
        .grant_lease("h1", Duration::from_secs(5), Millis(0))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(*rx.borrow(), placed[0].revision);
    // Deletes count, and another store's writes are seen too.
    let other = EtcdStore::connect(&etcd.endpoints(), Some(store.prefix())).unwrap();
    other.delete_app("web", Expect::Any).unwrap();
    wait_for_rev(&rx, placed[0].revision + 2, Duration::from_secs(5));
}

#[test]
fn watch_is_async_friendly() {
    let etcd = Etcd::start();
    let store = Arc::new(EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap());
    let mut rx = store.watch();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = Arc::clone(&store);
    let generation = rt.block_on(async move {
        let writer = tokio::task::spawn_blocking(move || {
            s.put_app("web", &spec(1), Expect::Absent)
                .unwrap()
                .generation
        });
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("woken within 5 s")
            .unwrap();
        let g = writer.await.unwrap();
        assert!(*rx.borrow() <= g);
        g
    });
    assert!(generation > 0);
}

#[test]
fn watch_resumes_after_etcd_restarts() {
    let mut etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    let rx = store.watch();
    let first = store.put_app("web", &spec(1), Expect::Absent).unwrap();
    wait_for_rev(&rx, first.generation, Duration::from_secs(5));
    etcd.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(store.list_apps().is_err(), "etcd is down");
    etcd.restart().expect("etcd restarts");
    // A write by another client while this store's watch reconnects.
    let other = EtcdStore::connect(&etcd.endpoints(), Some(store.prefix())).unwrap();
    let second = other
        .put_app("web", &spec(2), Expect::At(first.generation))
        .unwrap();
    wait_for_rev(&rx, second.generation, Duration::from_secs(15));
    assert_eq!(store.get_app("web").unwrap(), second);
}

/// Campaign on another thread; the guard comes back on the channel.
fn campaign_in_thread(
    store: &Arc<EtcdStore>,
    name: &'static str,
    ttl: Duration,
) -> std::sync::mpsc::Receiver<LeaderGuard> {
    let (tx, rx) = std::sync::mpsc::channel();
    let store = Arc::clone(store);
    std::thread::spawn(move || {
        let guard = store.campaign(name, ttl).expect("campaign");
        let _ = tx.send(guard);
    });
    rx
}

#[test]
fn one_candidate_leads_and_the_other_takes_over_when_it_resigns() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Arc::new(EtcdStore::connect(&etcd.endpoints(), Some(&p)).unwrap());
    let b = Arc::new(EtcdStore::connect(&etcd.endpoints(), Some(&p)).unwrap());
    assert_eq!(a.leader().unwrap(), None);
    let ttl = Duration::from_secs(3);
    let first = a.campaign("a", ttl).unwrap();
    assert!(first.is_leader());
    assert_eq!(first.candidate(), "a");
    assert_eq!(b.leader().unwrap().as_deref(), Some("a"));
    let waiting = campaign_in_thread(&b, "b", ttl);
    // b waits while a leads, past a's lease TTL (a's keep-alive holds it).
    assert!(waiting.recv_timeout(ttl + Duration::from_secs(1)).is_err());
    assert!(first.is_leader());
    let dropped = Instant::now();
    drop(first);
    let second = waiting
        .recv_timeout(Duration::from_secs(5))
        .expect("b leads within 5 s of a resigning");
    eprintln!("takeover after a resign: {:?}", dropped.elapsed());
    assert!(second.is_leader());
    assert_eq!(a.leader().unwrap().as_deref(), Some("b"));
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.leader().unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "b's resign did not clear the leader"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_revoked_lease_loses_leadership_promptly_and_the_other_takes_over() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Arc::new(EtcdStore::connect(&etcd.endpoints(), Some(&p)).unwrap());
    let b = Arc::new(EtcdStore::connect(&etcd.endpoints(), Some(&p)).unwrap());
    let ttl = Duration::from_secs(3);
    let first = a.campaign("a", ttl).unwrap();
    let waiting = campaign_in_thread(&b, "b", ttl);
    std::thread::sleep(Duration::from_millis(300));
    // Revoke a's lease behind its back: what etcd does when a's keep-alives
    // stop reaching it for a TTL.
    let leader_key = format!("{p}leader");
    let revoked = run_on(&a.handle, Some(REQUEST_TIMEOUT), {
        let mut c = a.client.clone();
        async move {
            let resp = c.leader(leader_key).await.map_err(EtcdError::Rpc)?;
            let lease = resp.kv().map(|kv| kv.lease()).unwrap_or(0);
            c.lease_revoke(lease).await.map_err(EtcdError::Rpc)?;
            Ok(())
        }
    });
    revoked.unwrap();
    let revoked_at = Instant::now();
    let second = waiting
        .recv_timeout(Duration::from_secs(5))
        .expect("b leads within 5 s of a's lease going");
    assert!(second.is_leader());
    assert_eq!(a.leader().unwrap().as_deref(), Some("b"));
    // a's guard notices at its next keep-alive: within a third of the TTL
    // (plus a round trip).
    let deadline = revoked_at + ttl;
    while first.is_leader() {
        assert!(Instant::now() < deadline, "a still thinks it leads");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("a knew it lost after {:?}", revoked_at.elapsed());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(1), first.lost())
            .await
            .expect("lost() returns once lost");
    });
}

#[test]
fn a_dead_etcd_loses_leadership() {
    let mut etcd = Etcd::start();
    let a = EtcdStore::connect(&etcd.endpoints(), Some(&prefix())).unwrap();
    let ttl = Duration::from_secs(2);
    let guard = a.campaign("a", ttl).unwrap();
    assert!(guard.is_leader());
    etcd.kill();
    let killed = Instant::now();
    while guard.is_leader() {
        assert!(
            killed.elapsed() < ttl + Duration::from_secs(1),
            "still leading {:?} after etcd died",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("lost {:?} after etcd died", killed.elapsed());
}
