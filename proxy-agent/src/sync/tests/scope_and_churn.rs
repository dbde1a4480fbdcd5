//! Random churn against the reader invariant, scoped syncs, VIP counts.
use super::*;

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
                    affinity_timeout_s: 0,
                    algorithm: None,
                    about: Default::default(),
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
                affinity_timeout_s: 0,
                algorithm: None,
                about: Default::default(),
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

/// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: frontends that reject for want of
/// a local endpoint, kept as they are written (and found again at start), never walked.
#[test]
fn frontends_without_a_local_endpoint_are_counted_as_written() {
    let mut s = Syncer::new(Fake::default(), MapState::default());
    let (a, b) = (fe("10.96.0.10", 80), fe("10.96.0.11", 80));
    let mut d = desired(&[(a, &[]), (b, &[("10.1.0.1", 8080)])]);
    d.frontends.get_mut(&a).unwrap().no_local_endpoints = true;
    s.sync(&d);
    assert_eq!(s.no_local_count(), 1);
    // A restart reads it back from the maps.
    let again = Syncer::new(Fake::default(), s.dp.maps.clone());
    assert_eq!(again.no_local_count(), 1);
    // A local endpoint comes: no longer counted; gone again, counted once.
    s.sync(&desired(&[
        (a, &[("10.1.0.2", 8080)]),
        (b, &[("10.1.0.1", 8080)]),
    ]));
    assert_eq!(s.no_local_count(), 0);
    s.sync(&d);
    s.sync(&d);
    assert_eq!(s.no_local_count(), 1);
    // The frontend removed.
    s.sync(&desired(&[(b, &[("10.1.0.1", 8080)])]));
    assert_eq!(s.no_local_count(), 0);
}
