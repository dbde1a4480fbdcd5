//! Sync against a fake datapath that applies each operation to an in-memory copy of the maps
//! and, after every single operation, checks what a reader (the eBPF programs) could see.
use super::*;
use crate::model::{FrontendSpec, ServiceRef};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Backend(u32),
    DelBackend(u32),
    Slot(u16),
    DelSlot(u16),
    Master(u16),
    DelMaster,
    RevNat(u16),
    DelRevNat(u16),
    Vip(u32),
    DelVip,
}

#[derive(Default)]
struct Fake {
    maps: MapState,
    ops: Vec<Op>,
    /// Fail the operation with this index (0-based, counted over the fake's lifetime).
    fail_at: Option<usize>,
    calls: usize,
}

impl Fake {
    fn step(&mut self, op: Op) -> Result<(), DatapathError> {
        let n = self.calls;
        self.calls += 1;
        if self.fail_at == Some(n) {
            return Err(DatapathError::Map {
                map: "fake",
                op: "update",
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.ops.push(op);
        Ok(())
    }

    /// The reader invariant: every master's slots 1..=count exist and name existing backends,
    /// and its rev-NAT entry exists and holds its address.
    fn check_reader_view(&self) {
        for (k, v) in &self.maps.services {
            if k.slot != 0 {
                continue;
            }
            for slot in 1..=v.count {
                let sk = ServiceKey { slot, ..*k };
                let s = self
                    .maps
                    .services
                    .get(&sk)
                    .unwrap_or_else(|| panic!("torn: {k:?} slot {slot} missing"));
                assert!(
                    self.maps.backends.contains_key(&s.backend_id),
                    "torn: backend {} missing",
                    s.backend_id
                );
            }
            let rn = self
                .maps
                .rev_nat
                .get(&v.rev_nat_id)
                .expect("torn: rev-NAT missing");
            assert_eq!((rn.vip_be, rn.port_be), (k.vip_be, k.port_be));
        }
    }
}

impl Datapath for Fake {
    fn update_backend(&mut self, id: u32, b: Backend) -> Result<(), DatapathError> {
        self.step(Op::Backend(id))?;
        self.maps.backends.insert(id, b);
        self.check_reader_view();
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.step(Op::DelBackend(id))?;
        self.maps.backends.remove(&id);
        self.check_reader_view();
        Ok(())
    }
    fn update_service(&mut self, k: ServiceKey, v: ServiceValue) -> Result<(), DatapathError> {
        self.step(if k.slot == 0 {
            Op::Master(v.count)
        } else {
            Op::Slot(k.slot)
        })?;
        self.maps.services.insert(k, v);
        self.check_reader_view();
        Ok(())
    }
    fn delete_service(&mut self, k: ServiceKey) -> Result<(), DatapathError> {
        self.step(if k.slot == 0 {
            Op::DelMaster
        } else {
            Op::DelSlot(k.slot)
        })?;
        self.maps.services.remove(&k);
        self.check_reader_view();
        Ok(())
    }
    fn update_rev_nat(&mut self, id: u16, v: RevNat) -> Result<(), DatapathError> {
        self.step(Op::RevNat(id))?;
        self.maps.rev_nat.insert(id, v);
        self.check_reader_view();
        Ok(())
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<(), DatapathError> {
        self.step(Op::DelRevNat(id))?;
        self.maps.rev_nat.remove(&id);
        self.check_reader_view();
        Ok(())
    }
    fn update_vip(&mut self, vip: u32, n: u32) -> Result<(), DatapathError> {
        self.step(Op::Vip(n))?;
        self.maps.vips.insert(vip, n);
        self.check_reader_view();
        Ok(())
    }
    fn delete_vip(&mut self, vip: u32) -> Result<(), DatapathError> {
        self.step(Op::DelVip)?;
        self.maps.vips.remove(&vip);
        self.check_reader_view();
        Ok(())
    }
}

fn fe(vip: &str, port: u16) -> Frontend {
    Frontend {
        vip: vip.parse().unwrap(),
        port,
        proto: Proto::Tcp,
    }
}

fn desired(entries: &[(Frontend, &[(&str, u16)])]) -> Desired {
    let mut d = Desired::default();
    for (f, bs) in entries {
        d.frontends.insert(
            *f,
            FrontendSpec {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: "svc".into(),
                },
                backends: bs
                    .iter()
                    .map(|(ip, port)| BackendAddr {
                        ip: ip.parse().unwrap(),
                        port: *port,
                    })
                    .collect(),
                no_local_endpoints: false,
            },
        );
    }
    d
}

fn ops(s: &mut Syncer<Fake>) -> Vec<Op> {
    std::mem::take(&mut s.dp.ops)
}

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

#[test]
fn backends_written_by_a_failed_update_are_removed_once_unused() {
    let f = fe("10.96.0.10", 80);
    let d = desired(&[(f, &[("10.1.0.2", 8080), ("10.1.0.3", 8080)])]);
    let mut s = Syncer::new(Fake::default(), MapState::default());
    s.dp.fail_at = Some(1); // the second backend of the run
    assert_eq!(s.sync(&d).errors.len(), 1);
    assert!(
        s.dp.ops.contains(&Op::Backend(1)),
        "the first backend was written"
    );
    assert_eq!(s.state(), &s.dp.maps);
    s.dp.fail_at = None;
    s.sync(&Desired::default());
    assert_eq!(s.dp.maps, MapState::default(), "nothing is left behind");
}

#[test]
fn a_failed_write_keeps_the_old_state_and_the_next_sync_converges() {
    let f = fe("10.96.0.10", 80);
    let before = desired(&[(f, &[("10.1.0.1", 8080)])]);
    let after = desired(&[(f, &[("10.1.0.2", 8080), ("10.1.0.3", 8080)])]);
    // Fail each operation of the update in turn: the reader view stays valid (checked by the
    // fake on every op), the mirror matches the maps, and a retry converges.
    for fail in 0..8 {
        let mut s = Syncer::new(Fake::default(), MapState::default());
        s.sync(&before);
        let base = s.dp.calls;
        s.dp.fail_at = Some(base + fail);
        let r = s.sync(&after);
        assert_eq!(s.state(), &s.dp.maps, "fail at {fail}: mirror equals maps");
        if !r.errors.is_empty() {
            let m = s.dp.maps.services[&service_key(&f, 0)];
            assert!(m.count >= 1, "fail at {fail}: the old master keeps serving");
        }
        s.dp.fail_at = None;
        let r = s.sync(&after);
        assert!(r.errors.is_empty());
        let mut fresh = Syncer::new(Fake::default(), MapState::default());
        fresh.sync(&after);
        assert_eq!(
            view(&s.dp.maps),
            view(&fresh.dp.maps),
            "fail at {fail}: converged"
        );
    }
}

/// Maps reduced to what a reader resolves (ids are the writer's business).
fn view(m: &MapState) -> BTreeMap<ServiceKey, (u16, Vec<Backend>)> {
    m.services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| {
            let bs = (1..=v.count)
                .map(|i| m.backends[&m.services[&ServiceKey { slot: i, ..*k }].backend_id])
                .collect();
            (*k, (v.flags, bs))
        })
        .collect()
}

#[test]
fn restart_from_the_maps_rewrites_nothing_and_removes_stale_entries() {
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 53));
    let mut s = Syncer::new(Fake::default(), MapState::default());
    s.sync(&desired(&[
        (a, &[("10.1.0.1", 8080)]),
        (b, &[("10.1.0.2", 53)]),
    ]));
    let maps = s.dp.maps.clone();

    let mut restarted = Syncer::new(
        Fake {
            maps: maps.clone(),
            ..Default::default()
        },
        maps,
    );
    restarted.sync(&desired(&[(a, &[("10.1.0.1", 8080)])]));
    assert_eq!(
        ops(&mut restarted),
        vec![
            Op::DelMaster,
            Op::DelVip,
            Op::DelSlot(1),
            Op::DelRevNat(2),
            Op::DelBackend(2)
        ]
    );
}

#[test]
fn restart_after_a_crash_mid_update_cleans_orphans() {
    let f = fe("10.96.0.10", 80);
    let mut maps = MapState::default();
    // A writer died after writing a backend, a slot and a rev-NAT, before the master.
    maps.backends.insert(
        7,
        Backend {
            addr_be: 1,
            port_be: 1,
            proto: 6,
            _pad: 0,
        },
    );
    maps.services.insert(
        service_key(&f, 1),
        ServiceValue {
            backend_id: 7,
            ..Default::default()
        },
    );
    maps.rev_nat.insert(3, rev_nat_value(&f));
    maps.vips.insert(u32::from(f.vip).to_be(), 1);
    let mut s = Syncer::new(
        Fake {
            maps: maps.clone(),
            ..Default::default()
        },
        maps,
    );
    s.sync(&Desired::default());
    assert_eq!(s.dp.maps, MapState::default());
}

#[test]
fn a_full_map_refuses_the_frontend_and_keeps_the_rest() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    // Pretend the backend map is nearly full.
    for id in 1..=BACKEND_MAP_ENTRIES - 1 {
        s.state.backends.insert(
            id + 1_000_000,
            Backend {
                addr_be: id,
                port_be: 0,
                proto: 6,
                _pad: 0,
            },
        );
    }
    let (ok, big) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let r = s.sync(&desired(&[
        (ok, &[("10.1.0.1", 8080)]),
        (big, &[("10.1.0.2", 8080), ("10.1.0.3", 8080)]),
    ]));
    assert_eq!(r.errors.len(), 1);
    assert_eq!(r.errors[0].0, big);
    assert!(matches!(
        r.errors[0].1,
        DatapathError::Full {
            map: BACKEND_MAP,
            ..
        }
    ));
    assert!(s.dp.maps.services.contains_key(&service_key(&ok, 0)));
    assert!(!s.dp.maps.services.contains_key(&service_key(&big, 0)));
}

#[test]
fn random_sequences_keep_the_reader_view_whole_and_converge() {
    // Deterministic pseudo-random walk over desired states; the fake checks the reader
    // invariant after every operation, and each sync must end equal to a fresh build.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut s = Syncer::new(Fake::default(), MapState::default());
    for _ in 0..300 {
        let mut d = Desired::default();
        for svc in 0..rnd(6) {
            let f = Frontend {
                vip: Ipv4Addr::new(10, 96, 0, svc as u8),
                port: 80,
                proto: if rnd(2) == 0 { Proto::Tcp } else { Proto::Udp },
            };
            let backends = (0..rnd(5))
                .map(|_| BackendAddr {
                    ip: Ipv4Addr::new(10, 1, 0, rnd(8) as u8),
                    port: 8080 + rnd(2) as u16,
                })
                .collect::<BTreeSet<_>>();
            d.frontends.insert(
                f,
                FrontendSpec {
                    service: ServiceRef {
                        namespace: "d".into(),
                        name: format!("s{svc}").into(),
                    },
                    backends: backends.into_iter().collect(),
                    no_local_endpoints: false,
                },
            );
        }
        let r = s.sync(&d);
        assert!(r.errors.is_empty());
        assert_eq!(s.state(), &s.dp.maps);
        assert_eq!(s.frontend_count(), d.frontends.len(), "masters counted");
        let mut fresh = Syncer::new(Fake::default(), MapState::default());
        fresh.sync(&d);
        assert_eq!(view(&s.dp.maps), view(&fresh.dp.maps));
        assert_eq!(
            s.dp.maps.backends.len(),
            fresh.dp.maps.backends.len(),
            "no leaked backends"
        );
        assert_eq!(
            s.dp.maps.rev_nat.len(),
            fresh.dp.maps.rev_nat.len(),
            "no leaked rev-NAT entries"
        );
    }
}

#[test]
fn a_scoped_sync_touches_only_the_named_services() {
    let svc = |name: &str| ServiceRef {
        namespace: "default".into(),
        name: name.into(),
    };
    let mut d = Desired::default();
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    for (f, name) in [(a, "a"), (b, "b")] {
        d.frontends.insert(
            f,
            FrontendSpec {
                service: svc(name),
                backends: vec![BackendAddr {
                    ip: "10.1.0.1".parse().unwrap(),
                    port: 80,
                }],
                no_local_endpoints: false,
            },
        );
    }
    let mut s = Syncer::new(Fake::default(), MapState::default());
    s.sync(&d);
    ops(&mut s);
    // Both changed, but only "b" is in scope.
    for spec in d.frontends.values_mut() {
        spec.backends.push(BackendAddr {
            ip: "10.1.0.2".parse().unwrap(),
            port: 80,
        });
    }
    let scope: BTreeSet<ServiceRef> = [svc("b")].into();
    s.sync_scoped(&d, Some(&scope));
    assert_eq!(s.dp.maps.services[&service_key(&a, 0)].count, 1);
    assert_eq!(s.dp.maps.services[&service_key(&b, 0)].count, 2);
    // Deleting "b" in a scoped sync that names it.
    d.frontends.remove(&b);
    s.sync_scoped(&d, Some(&scope));
    assert!(!s.dp.maps.services.contains_key(&service_key(&b, 0)));
    assert!(s.dp.maps.services.contains_key(&service_key(&a, 0)));
}

#[test]
fn vips_count_their_frontends() {
    let vip = u32::from("10.96.0.10".parse::<Ipv4Addr>().unwrap()).to_be();
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.10", 443));
    let mut s = Syncer::new(Fake::default(), MapState::default());
    s.sync(&desired(&[
        (a, &[("10.1.0.1", 8080)]),
        (b, &[("10.1.0.1", 8443)]),
    ]));
    assert_eq!(s.dp.maps.vips.get(&vip), Some(&2));
    s.sync(&desired(&[(b, &[("10.1.0.1", 8443)])]));
    assert_eq!(s.dp.maps.vips.get(&vip), Some(&1));
    s.sync(&Desired::default());
    assert!(s.dp.maps.vips.is_empty());
    // Drift found in the maps at start is mended by a full sync.
    let mut maps = MapState::default();
    maps.vips.insert(7, 3);
    let mut s = Syncer::new(
        Fake {
            maps: maps.clone(),
            ..Default::default()
        },
        maps,
    );
    s.sync(&desired(&[(a, &[("10.1.0.1", 8080)])]));
    assert_eq!(s.dp.maps.vips, [(vip, 1)].into());
}
