//! Unit tests of the placement core: one test per filter rule, per score
//! field, for reservations, shortfalls and the model's errors.
//!
//! They must not: depend on anything but the public behaviour of
//! [`Cluster`] (scores are read through [`Cluster::evaluate`]).

use super::*;

fn host(id: &str) -> Host {
    Host {
        id: id.into(),
        zone: "z1".into(),
        labels: BTreeMap::new(),
        memory_total_mib: 16_384,
        memory_free_mib: 16_384,
        cpus: 8,
        start_slots_free: 100,
        drained: false,
        masters: BTreeMap::new(),
        instances: BTreeMap::new(),
        link_bytes_per_s: 100_000_000,
    }
}

fn req() -> Request {
    Request {
        app: "web".into(),
        image: "py".into(),
        memory: CloneMemory {
            guest_ram_mib: 256,
            private_mib_per_clone: Some(16),
            master_mib: 256,
        },
        vcpus: 1,
        constraints: Vec::new(),
        max_per_host: None,
        strategy: Strategy::Spread(SpreadBy::Host),
        snapshot_bytes: 100_000_000,
    }
}

fn with_master(mut h: Host, s: MasterState) -> Host {
    h.masters.insert("py".into(), s);
    h
}

fn place_on(c: &mut Cluster, r: &Request) -> String {
    c.place(r).unwrap().host.0
}

fn rejection(c: &Cluster, r: &Request, id: &str) -> Option<Rejection> {
    c.evaluate(r, &id.into()).unwrap().err()
}

#[test]
fn drained_hosts_take_nothing() {
    let mut b = host("b");
    b.drained = true;
    let mut c = Cluster::new([host("a"), b]).unwrap();
    assert_eq!(rejection(&c, &req(), "b"), Some(Rejection::Drained));
    for _ in 0..5 {
        assert_eq!(place_on(&mut c, &req()), "a");
    }
}

#[test]
fn selectors_filter_hosts() {
    let mut a = host("a");
    a.labels.insert("disk".into(), "hdd".into());
    let mut b = host("b");
    b.labels.insert("disk".into(), "ssd".into());
    let c = Cluster::new([a, b, host("c")]).unwrap();
    let mut r = req();
    r.constraints = vec!["disk=ssd".parse().unwrap()];
    assert_eq!(rejection(&c, &r, "a"), Some(Rejection::Constraints));
    assert_eq!(rejection(&c, &r, "b"), None);
    assert_eq!(rejection(&c, &r, "c"), Some(Rejection::Constraints));
    r.constraints = vec!["disk!=ssd".parse().unwrap()];
    assert_eq!(rejection(&c, &r, "a"), None);
    assert_eq!(rejection(&c, &r, "b"), Some(Rejection::Constraints));
    assert_eq!(rejection(&c, &r, "c"), None);
    r.constraints = vec!["disk in (hdd,nvme)".parse().unwrap()];
    assert_eq!(rejection(&c, &r, "a"), None);
    assert_eq!(rejection(&c, &r, "b"), Some(Rejection::Constraints));
    // A value no host has ever reported matches nothing.
    r.constraints = vec!["disk=tape".parse().unwrap()];
    assert_eq!(rejection(&c, &r, "b"), Some(Rejection::Constraints));
}

#[test]
fn a_clone_needs_as_many_cpus_as_vcpus() {
    let mut a = host("a");
    a.cpus = 2;
    let c = Cluster::new([a]).unwrap();
    let mut r = req();
    r.vcpus = 2;
    assert_eq!(rejection(&c, &r, "a"), None);
    r.vcpus = 3;
    assert_eq!(rejection(&c, &r, "a"), Some(Rejection::Cpus));
}

#[test]
fn max_per_host_counts_running_and_in_flight() {
    let mut a = host("a");
    a.instances.insert("web".into(), 1);
    let mut c = Cluster::new([a]).unwrap();
    let mut r = req();
    r.max_per_host = Some(3);
    let batch = c.place_batch(&r, 5).unwrap();
    assert_eq!(batch.placed(), 2);
    let s = batch.shortfall.unwrap();
    assert_eq!(s.rejected.max_per_host, 1);
    assert_eq!(s.reason, ShortfallReason::Constraints);
}

#[test]
fn memory_is_a_hard_limit_including_the_master_where_it_is_not_frozen() {
    let mut a = host("a");
    a.memory_free_mib = 256 + 16 * 3;
    let mut c = Cluster::new([a]).unwrap();
    // The first clone brings the master (256) and costs 16; then 16 each.
    let batch = c.place_batch(&req(), 10).unwrap();
    assert_eq!(batch.placed(), 3);
    assert_eq!(c.free_mib(&"a".into()), Some(0));
    assert_eq!(batch.shortfall.unwrap().reason, ShortfallReason::Capacity);
    // Frozen there already: no master to bring, 16 per clone.
    let mut b = with_master(host("b"), MasterState::Frozen);
    b.memory_free_mib = 16 * 3;
    let mut c = Cluster::new([b]).unwrap();
    assert_eq!(c.place_batch(&req(), 10).unwrap().placed(), 3);
}

#[test]
fn unmeasured_clones_reserve_the_whole_guest_ram() {
    let mut m = req().memory;
    assert_eq!(m.reserve_mib(), 16);
    m.private_mib_per_clone = None;
    assert_eq!(m.reserve_mib(), 256);
    m.private_mib_per_clone = Some(1000);
    assert_eq!(m.reserve_mib(), 256, "never more than the guest can use");
}

#[test]
fn start_slots_count_placements_in_flight() {
    let mut a = host("a");
    a.start_slots_free = 2;
    let mut c = Cluster::new([a, host("b")]).unwrap();
    let mut r = req();
    r.strategy = Strategy::Binpack;
    let batch = c.place_batch(&r, 6).unwrap();
    // A burst does not pile onto "a" past its two slots.
    assert_eq!(batch.per_host.get(&"a".into()), Some(&2));
    assert_eq!(batch.per_host.get(&"b".into()), Some(&4));
    assert_eq!(rejection(&c, &r, "a"), Some(Rejection::StartSlots));
}

#[test]
fn frozen_beats_files_beats_transfer() {
    let mut c = Cluster::new([
        host("a"),
        with_master(host("b"), MasterState::Files),
        with_master(host("c"), MasterState::Frozen),
    ])
    .unwrap();
    let mut r = req();
    r.strategy = Strategy::Binpack;
    let s = |c: &Cluster, id: &str| c.evaluate(&r, &id.into()).unwrap().unwrap();
    assert_eq!(s(&c, "a").master, MasterRank::Absent);
    assert!(s(&c, "a").transfer_ms > 0);
    assert_eq!(s(&c, "b").master, MasterRank::Files);
    assert_eq!(s(&c, "b").transfer_ms, 0);
    assert_eq!(place_on(&mut c, &r), "c");
    let mut c = Cluster::new([host("a"), with_master(host("b"), MasterState::Files)]).unwrap();
    assert_eq!(place_on(&mut c, &r), "b");
}

#[test]
fn a_faster_link_wins_among_hosts_lacking_the_master() {
    let mut a = host("a");
    a.link_bytes_per_s = 10_000_000;
    let mut b = host("b");
    b.link_bytes_per_s = 1_000_000_000;
    let mut c = Cluster::new([a, b]).unwrap();
    let r = req();
    assert_eq!(
        c.evaluate(&r, &"a".into()).unwrap().unwrap().transfer_ms,
        10_000
    );
    assert_eq!(place_on(&mut c, &r), "b");
}

#[test]
fn a_master_in_flight_counts_as_frozen_for_the_next_clone() {
    let mut c = Cluster::new([host("a"), host("b")]).unwrap();
    let mut r = req();
    r.strategy = Strategy::Binpack;
    let first = c.place(&r).unwrap();
    assert_eq!(first.score.master, MasterRank::Absent);
    let second = c.place(&r).unwrap();
    assert_eq!(second.host, first.host);
    assert_eq!(second.score.master, MasterRank::Frozen);
    assert_eq!(c.free_mib(&first.host), Some(16_384 - 256 - 2 * 16));
    // Releasing both gives the master's memory back too.
    c.release(&first).unwrap();
    assert_eq!(c.free_mib(&first.host), Some(16_384 - 256 - 16));
    c.release(&second).unwrap();
    assert_eq!(c.free_mib(&first.host), Some(16_384));
}

#[test]
fn binpack_takes_the_fullest_host_that_fits() {
    let mut a = host("a");
    a.memory_free_mib = 8_000;
    let mut b = host("b");
    b.memory_free_mib = 2_000;
    let mut tiny = host("c");
    tiny.memory_free_mib = 100;
    let mut c = Cluster::new([a, b, tiny]).unwrap();
    let mut r = req();
    r.strategy = Strategy::Binpack;
    assert_eq!(place_on(&mut c, &r), "b");
}

#[test]
fn spread_by_host_evens_counts_and_prefers_the_emptier_host() {
    let mut a = host("a");
    a.instances.insert("web".into(), 2);
    let mut b = host("b");
    b.memory_free_mib = 4_000;
    let mut c = Cluster::new([a, b, host("c")]).unwrap();
    // Equal count (0) on b and c: c has more free memory (balance).
    assert_eq!(place_on(&mut c, &req()), "c");
    let batch = c.place_batch(&req(), 5).unwrap();
    let count = |id: &str| c.app_count(&id.into(), "web").unwrap();
    // b and c now have the master arriving: at count 2 they beat a.
    assert_eq!((count("a"), count("b"), count("c")), (2, 3, 3));
    assert_eq!(batch.per_host.get(&"a".into()), None);
}

#[test]
fn spread_by_zone_evens_zones_then_hosts() {
    let mut hosts = Vec::new();
    for (id, zone) in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")] {
        let mut h = with_master(host(id), MasterState::Frozen);
        h.zone = zone.into();
        hosts.push(h);
    }
    let mut c = Cluster::new(hosts).unwrap();
    let mut r = req();
    r.strategy = Strategy::Spread(SpreadBy::Zone);
    let batch = c.place_batch(&r, 6).unwrap();
    let n = |id: &str| batch.per_host.get(&HostId::from(id)).copied().unwrap_or(0);
    assert_eq!(n("b1"), 3);
    assert_eq!((n("a1"), n("a2"), n("a3")), (1, 1, 1));
    // Where only one host of a zone holds the master, it takes the zone's
    // share: the master's location decides within a spread tier.
    let mut hosts = Vec::new();
    for (id, zone) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        let mut h = host(id);
        h.zone = zone.into();
        hosts.push(h);
    }
    hosts[1] = with_master(hosts[1].clone(), MasterState::Frozen);
    let mut c = Cluster::new(hosts).unwrap();
    let batch = c.place_batch(&r, 4).unwrap();
    let n = |id: &str| batch.per_host.get(&HostId::from(id)).copied().unwrap_or(0);
    assert_eq!((n("a1"), n("a2"), n("b1")), (0, 2, 2));
}

#[test]
fn spread_puts_the_frozen_master_first_among_equal_counts() {
    let mut c = Cluster::new([
        host("a"),
        host("b"),
        with_master(host("c"), MasterState::Frozen),
    ])
    .unwrap();
    assert_eq!(place_on(&mut c, &req()), "c");
    // 30 over 3 hosts with the master frozen on one only: 10 each.
    let batch = c.place_batch(&req(), 29).unwrap();
    let total: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|h| c.app_count(&(*h).into(), "web").unwrap())
        .collect();
    assert_eq!(total, vec![10, 10, 10]);
    assert!(batch.shortfall.is_none());
}

#[test]
fn ties_break_by_host_id_whatever_the_input_order() {
    let mut c1 = Cluster::new([host("b"), host("a"), host("c")]).unwrap();
    let mut c2 = Cluster::new([host("c"), host("b"), host("a")]).unwrap();
    assert_eq!(place_on(&mut c1, &req()), "a");
    assert_eq!(place_on(&mut c2, &req()), "a");
}

#[test]
fn shortfall_reasons() {
    let mut c = Cluster::default();
    let e = c.place(&req()).unwrap_err();
    assert!(
        matches!(e, PlacementError::Unplaceable(ref s) if s.reason == ShortfallReason::NoHosts)
    );
    let mut d = host("d");
    d.drained = true;
    let mut c = Cluster::new([d.clone()]).unwrap();
    let b = c.place_batch(&req(), 3).unwrap();
    assert_eq!(b.placed(), 0);
    assert_eq!(b.shortfall.unwrap().reason, ShortfallReason::Drained);
    let mut r = req();
    r.constraints = vec!["gpu=yes".parse().unwrap()];
    let mut c = Cluster::new([d, host("e")]).unwrap();
    let s = c.place_batch(&r, 3).unwrap().shortfall.unwrap();
    assert_eq!((s.requested, s.placed), (3, 0));
    assert_eq!(s.reason, ShortfallReason::Constraints);
    assert_eq!((s.rejected.drained, s.rejected.constraints), (1, 1));
    assert_eq!(
        s.to_string(),
        "placed 0 of 3 clones: no undrained host satisfies the constraints (hosts turned away: \
         1 drained, 1 constraints, 0 CPUs, 0 max_per_host, 0 memory, 0 start slots)"
    );
}

#[test]
fn release_gives_back_and_refuses_twice() {
    let mut c = Cluster::new([host("a")]).unwrap();
    let res = c.place(&req()).unwrap();
    assert_eq!(c.slots_free(&"a".into()), Some(99));
    assert_eq!(c.app_count(&"a".into(), "web"), Some(1));
    c.release(&res).unwrap();
    assert_eq!(c.slots_free(&"a".into()), Some(100));
    assert_eq!(c.app_count(&"a".into(), "web"), Some(0));
    assert_eq!(
        c.release(&res),
        Err(PlacementError::UnknownReservation(res.id))
    );
}

#[test]
fn a_new_report_replaces_the_old_and_reservations_still_count() {
    let mut c = Cluster::new([host("a")]).unwrap();
    let res = c.place(&req()).unwrap();
    let mut a = with_master(host("a"), MasterState::Frozen);
    a.memory_free_mib = 1_000;
    c.report(a).unwrap();
    c.report(host("b")).unwrap();
    assert_eq!(c.host_ids().count(), 2);
    // The master still arrives for `res`: 256 + 16 held until released.
    assert_eq!(c.free_mib(&"a".into()), Some(1_000 - 256 - 16));
    c.release(&res).unwrap();
    assert_eq!(c.free_mib(&"a".into()), Some(1_000));
}

#[test]
fn bad_input_is_a_typed_error() {
    assert_eq!(
        Cluster::new([host("a"), host("a")]).unwrap_err(),
        PlacementError::DuplicateHost("a".into())
    );
    let mut z = host("z");
    z.link_bytes_per_s = 0;
    assert!(matches!(
        Cluster::new([z]),
        Err(PlacementError::ZeroLinkRate(_))
    ));
    let mut f = host("f");
    f.memory_free_mib = f.memory_total_mib + 1;
    assert!(matches!(
        Cluster::new([f]),
        Err(PlacementError::FreeAboveTotal(_))
    ));
    let mut c = Cluster::new([host("a")]).unwrap();
    let mut r = req();
    r.memory.guest_ram_mib = 0;
    assert!(matches!(c.place(&r), Err(PlacementError::ZeroMemory(_))));
    let mut r = req();
    r.vcpus = 0;
    assert!(matches!(
        c.place_batch(&r, 1),
        Err(PlacementError::ZeroVcpus(_))
    ));
    assert!(matches!(
        c.evaluate(&req(), &"nope".into()),
        Err(PlacementError::UnknownHost(_))
    ));
}
