//! The commit order of creates, updates and deletes, and what is left alone.
use super::*;

#[test]
fn create_writes_backends_then_slots_then_rev_nat_then_master() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    let r = s.sync(&desired(&[(f, &[("10.1.0.1", 8080), ("10.1.0.2", 8080)])]));
    assert!(r.errors.is_empty());
    assert_eq!(
        ops(&mut s),
        vec![
            Op::Backend(1),
            Op::Backend(2),
            Op::Slot(1),
            Op::Slot(2),
            Op::RevNat(1),
            Op::Vip(1),
            Op::Master(2)
        ]
    );
    assert_eq!(s.state(), &s.dp.maps, "mirror equals the maps");
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let d = desired(&[(fe("10.96.0.10", 80), &[("10.1.0.1", 8080)])]);
    let r = s.sync(&d);
    assert_eq!(
        r.written_services.len(),
        1,
        "the first sync writes the Service"
    );
    ops(&mut s);
    let r = s.sync(&d);
    assert_eq!((r.updates, r.deletes), (0, 0));
    assert!(r.written_services.is_empty());
    assert!(ops(&mut s).is_empty());
}

#[test]
fn shrink_commits_master_before_deleting_slots_and_backends() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    s.sync(&desired(&[(
        f,
        &[("10.1.0.1", 8080), ("10.1.0.2", 8080), ("10.1.0.3", 8080)],
    )]));
    ops(&mut s);
    let r = s.sync(&desired(&[(f, &[("10.1.0.1", 8080), ("10.1.0.3", 8080)])]));
    assert_eq!(
        r.removed_backends,
        vec![backend_value(
            &BackendAddr {
                ip: "10.1.0.2".parse().unwrap(),
                port: 8080
            },
            Proto::Tcp
        )]
    );
    assert_eq!(
        ops(&mut s),
        vec![
            Op::Slot(2),
            Op::Master(2),
            Op::DelSlot(3),
            Op::DelBackend(2)
        ]
    );
    assert_eq!(s.state(), &s.dp.maps);
}

#[test]
fn port_change_adds_new_backends_before_commit() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    s.sync(&desired(&[(f, &[("10.1.0.1", 8080)])]));
    ops(&mut s);
    s.sync(&desired(&[(f, &[("10.1.0.1", 9090)])]));
    // The slot now names the new backend; the master is unchanged (same count), so the slot
    // write is itself atomic; then the old backend goes.
    assert_eq!(
        ops(&mut s),
        vec![Op::Backend(2), Op::Slot(1), Op::DelBackend(1)]
    );
}

#[test]
fn delete_removes_master_first() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    s.sync(&desired(&[(f, &[("10.1.0.1", 8080), ("10.1.0.2", 8080)])]));
    ops(&mut s);
    s.sync(&Desired::default());
    assert_eq!(
        ops(&mut s),
        vec![
            Op::DelMaster,
            Op::DelVip,
            Op::DelSlot(1),
            Op::DelSlot(2),
            Op::DelRevNat(1),
            Op::DelBackend(1),
            Op::DelBackend(2)
        ]
    );
    assert_eq!(s.dp.maps, MapState::default());
}

#[test]
fn shared_backends_are_written_once_and_kept_while_referenced() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    s.sync(&desired(&[
        (a, &[("10.1.0.1", 8080)]),
        (b, &[("10.1.0.1", 8080)]),
    ]));
    assert_eq!(s.dp.maps.backends.len(), 1);
    ops(&mut s);
    s.sync(&desired(&[(b, &[("10.1.0.1", 8080)])]));
    assert_eq!(
        ops(&mut s),
        vec![Op::DelMaster, Op::DelVip, Op::DelSlot(1), Op::DelRevNat(1)]
    );
    assert_eq!(s.dp.maps.backends.len(), 1);
}

#[test]
fn held_vips_are_left_alone() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    s.sync(&desired(&[(f, &[("10.1.0.1", 8080)])]));
    ops(&mut s);
    let mut d = Desired::default();
    d.held_vips.insert(f.vip);
    s.sync(&d);
    assert!(ops(&mut s).is_empty());
    assert_eq!(s.dp.maps.services.len(), 2);
}

#[test]
fn held_services_keep_their_frontends_even_without_a_readable_vip() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    s.sync(&desired(&[(f, &[("10.1.0.1", 8080)])]));
    ops(&mut s);
    let mut d = Desired::default();
    d.held_services.insert(ServiceRef {
        namespace: "default".into(),
        name: "svc".into(),
    });
    s.sync(&d);
    assert!(ops(&mut s).is_empty());
    // Once the Service is gone for good, so are its frontends.
    s.sync(&Desired::default());
    assert_eq!(s.dp.maps, MapState::default());
}

#[test]
fn no_backends_programs_a_reject_master_and_flags() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let f = fe("10.96.0.10", 80);
    let mut d = desired(&[(f, &[])]);
    d.frontends.get_mut(&f).unwrap().no_local_endpoints = true;
    s.sync(&d);
    let m = s.dp.maps.services[&service_key(&f, 0)];
    assert_eq!((m.count, m.flags), (0, SVC_FLAG_NO_LOCAL_ENDPOINTS));
}
