//! The sync's batched map writes against the kernel: what `BPF_MAP_UPDATE_BATCH` reports when
//! it stops part way, and a full sync through the pinned maps reading back as the mirror says.
//! Privileged (creates BPF maps): run with `cargo xtask test`.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use proxy_agent::{
    cleanup, conntrack, loader,
    maps::{PinnedMaps, update_batch},
    model::{BackendAddr, Desired, Frontend, FrontendSpec, Proto, ServiceRef},
    sync::{Syncer, backend_value},
};
use proxy_tests::{
    host::{BpffsDir, require_root},
    unique,
};

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_batch_that_fills_the_map_reports_how_many_it_wrote() {
    require_root();
    let map: HashMap<MapData, u32, u64> = HashMap::create(4, 0).expect("a 4-entry hash map");
    let keys: Vec<u32> = (1..=6).collect();
    let values: Vec<u64> = keys.iter().map(|k| u64::from(*k) * 10).collect();
    let (written, e) = update_batch(&map, &keys, &values).expect_err("6 entries do not fit in 4");
    assert_eq!(written, 4);
    assert_eq!(e.raw_os_error(), Some(libc::E2BIG), "{e}");
    for k in &keys[..4] {
        assert_eq!(map.get(k, 0).unwrap(), u64::from(*k) * 10);
    }
    assert!(
        map.get(&5, 0).is_err(),
        "nothing past the failure is written"
    );
    // Updating entries that exist needs no room.
    update_batch(&map, &keys[..4], &[7; 4]).expect("overwrites fit");
    assert_eq!(map.get(&1, 0).unwrap(), 7);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_full_sync_through_the_pinned_maps_reads_back_as_its_mirror() {
    require_root();
    let pins = BpffsDir::new(&unique("mw"));
    let _ebpf = loader::load(&pins.path).expect("object loads");
    let mut desired = Desired::default();
    for i in 0..300u32 {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
        let backends = (0..(i % 12))
            .map(|j| BackendAddr {
                // Every third Service shares its pods with the one before: shared backends.
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + (i / 3) * 16 + j),
                port: 8080,
            })
            .collect();
        desired.frontends.insert(
            Frontend {
                vip,
                port: 80,
                proto: Proto::Tcp,
            },
            FrontendSpec {
                service: ServiceRef::new(Some("bench"), &format!("s{i}")),
                backends,
                no_local_endpoints: false,
                affinity_timeout_s: 0,
                algorithm: None,
                about: Default::default(),
            },
        );
    }
    let maps = PinnedMaps::open(&pins.path).unwrap();
    let state = maps.dump().unwrap();
    let mut syncer = Syncer::new(maps, state);
    let report = syncer.sync(&desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let kernel = PinnedMaps::open(&pins.path).unwrap().dump().unwrap();
    assert_eq!(
        &kernel,
        syncer.state(),
        "the maps hold what the mirror says"
    );
    assert_eq!(syncer.frontend_count(), 300);
    // A restarted writer finds everything in place and writes nothing.
    let mut again = Syncer::new(PinnedMaps::open(&pins.path).unwrap(), kernel);
    let report = again.sync(&desired);
    assert_eq!((report.updates, report.deletes), (0, 0));
}

/// A pin an agent of another layout left (another value size, or another kind of map with the
/// same sizes) is refused at load, naming the map, and never reused.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_pinned_map_of_another_layout_is_refused() {
    use proxy_agent::{loader::LoaderError, maps::MapsError};
    use proxy_common::{MAPS, MapKind, SVC_MAP};
    require_root();
    let svc = MAPS.iter().find(|m| m.name == SVC_MAP).unwrap();
    for (kind, value_size) in [
        (MapKind::HashMap, svc.value_size + 8),
        (MapKind::LruHashMap, svc.value_size),
    ] {
        let pins = BpffsDir::new(&unique("layout"));
        loader::ensure_bpffs_dir(&pins.path).unwrap();
        let obj = aya_obj::Map::new_from_params(
            kind.bpf_map_type(),
            svc.key_size,
            value_size,
            svc.max_entries,
            0,
        );
        let map = MapData::create(obj, SVC_MAP, None).unwrap();
        map.pin(pins.path.join(SVC_MAP)).unwrap();
        match loader::load(&pins.path) {
            Err(LoaderError::Maps(e @ MapsError::Layout { .. })) => {
                assert!(e.to_string().contains(SVC_MAP), "{e}");
            }
            Err(e) => panic!("{kind:?}/{value_size}: another error: {e}"),
            Ok(_) => panic!("{kind:?}/{value_size}: the pin was reused"),
        }
    }
}

/// The cleanup thread's work runs after the sync that removed backends, perhaps after later
/// ones too: a removed backend's UDP flows (both directions) are forgotten, but a backend a
/// later sync added again keeps its flows.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn cleanup_forgets_the_flows_of_removed_backends_only() {
    use proxy_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_MAP, CT_UDP, CtKey, CtValue, PROTO_UDP};
    require_root();
    let pins = BpffsDir::new(&unique("clean"));
    let _ebpf = loader::load(&pins.path).expect("object loads");
    let vip = Ipv4Addr::new(10, 96, 0, 53);
    let (again, gone) = (
        BackendAddr {
            ip: Ipv4Addr::new(10, 1, 0, 5),
            port: 5353,
        },
        BackendAddr {
            ip: Ipv4Addr::new(10, 1, 0, 6),
            port: 5353,
        },
    );
    let mut desired = Desired::default();
    desired.frontends.insert(
        Frontend {
            vip,
            port: 53,
            proto: Proto::Udp,
        },
        FrontendSpec {
            service: ServiceRef::new(Some("default"), "dns"),
            backends: vec![again],
            no_local_endpoints: false,
            affinity_timeout_s: 0,
            algorithm: None,
            about: Default::default(),
        },
    );
    let maps = PinnedMaps::open(&pins.path).unwrap();
    let state = maps.dump().unwrap();
    let mut syncer = Syncer::new(maps, state);
    assert!(syncer.sync(&desired).errors.is_empty());
    let (again_be, gone_be) = (
        backend_value(&again, Proto::Udp),
        backend_value(&gone, Proto::Udp),
    );
    let again_id = *syncer
        .state()
        .backends
        .iter()
        .find(|(_, b)| **b == again_be)
        .unwrap()
        .0;
    // One flow from a client to each, as the TC program records them.
    let md = MapData::from_pin(pins.path.join(CT_MAP)).unwrap();
    let mut ct: HashMap<_, CtKey, CtValue> =
        HashMap::try_from(aya::maps::Map::LruHashMap(md)).unwrap();
    let client = u32::from(Ipv4Addr::new(10, 1, 0, 2)).to_be();
    let vip_be = u32::from(vip).to_be();
    let flow = |b: proxy_common::Backend, id: u32, sport: u16| {
        let fwd = CtKey::new(client, sport.to_be(), vip_be, 53u16.to_be(), PROTO_UDP);
        let reply = CtKey::new(b.addr_be, b.port_be, client, sport.to_be(), PROTO_UDP);
        let now = conntrack::now_s();
        [
            (
                fwd,
                CtValue::new(b.addr_be, b.port_be, 1, id, CT_DIR_FORWARD, CT_UDP, now),
            ),
            (
                reply,
                CtValue::new(vip_be, 53u16.to_be(), 1, id, CT_DIR_REPLY, CT_UDP, now),
            ),
        ]
    };
    let entries: Vec<_> = flow(again_be, again_id, 40000)
        .into_iter()
        .chain(flow(gone_be, 4242, 40001))
        .collect();
    for (k, v) in &entries {
        ct.insert(k, v, 0).unwrap();
    }
    // Both were removed by earlier syncs; `again` has been added back since.
    let done = cleanup::clean(&pins.path, &[again_be, gone_be]);
    assert_eq!(done.flows, 2, "{done:?}");
    for (i, (k, _)) in entries.iter().enumerate() {
        assert_eq!(ct.get(k, 0).is_ok(), i < 2, "entry {i}: {k:?}");
    }
}

/// A collection pass (under short lifetimes, as a test configures them) deletes exactly the
/// entries older than their state's lifetime, reads more entries than one batch holds, and
/// counts what it saw by state.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn conntrack_collection_removes_exactly_the_expired_entries() {
    use proxy_common::{
        CT_CLOSING, CT_DIR_FORWARD, CT_ESTABLISHED, CT_STATES, CT_SYN, CT_UDP, CtKey, CtTimeouts,
        CtValue,
    };
    require_root();
    let pins = BpffsDir::new(&unique("gc"));
    let _ebpf = loader::load(&pins.path).expect("object loads");
    let mut ct = conntrack::open(&pins.path).unwrap();
    let timeouts = CtTimeouts {
        syn_s: 5,
        established_s: 50,
        closing_s: 2,
        udp_s: 8,
    };
    // (state, idle for, expired); 0: seen this second (the datapath refreshing it now).
    let cases = [
        (CT_ESTABLISHED, 0, false),
        (CT_SYN, 4, false),
        (CT_SYN, 7, true),
        (CT_ESTABLISHED, 40, false),
        (CT_ESTABLISHED, 60, true),
        (CT_CLOSING, 1, false),
        (CT_CLOSING, 5, true),
        (CT_UDP, 7, false),
        (CT_UDP, 12, true),
    ];
    const EACH: u32 = 1000;
    let now = conntrack::now_s();
    let key = |case: usize, i: u32| CtKey::new(case as u32 + 1, 1, i, 1, 6);
    for (case, (state, idle, _)) in cases.iter().enumerate() {
        for i in 0..EACH {
            let seen = now.wrapping_sub(*idle);
            let v = CtValue::new(1, 1, 1, 1, CT_DIR_FORWARD, *state, seen);
            ct.insert(key(case, i), v, 0).unwrap();
        }
    }
    let pass = conntrack::collect(&mut ct, &timeouts, now).unwrap();
    let each = EACH as usize;
    assert_eq!(pass.entries, cases.len() * each);
    let expired = cases.iter().filter(|c| c.2).count();
    assert_eq!(pass.collected, expired * each);
    let by_state = CT_STATES.map(|(s, _)| cases.iter().filter(|c| c.0 == s).count() * each);
    assert_eq!(pass.by_state, by_state);
    for (case, (state, idle, expired)) in cases.iter().enumerate() {
        for i in 0..EACH {
            assert_eq!(
                ct.get(&key(case, i), 0).is_err(),
                *expired,
                "state {state}, idle {idle} s"
            );
        }
    }
    let again = conntrack::collect(&mut ct, &timeouts, now).unwrap();
    assert_eq!(
        (again.entries, again.collected),
        ((cases.len() - expired) * each, 0)
    );
}

/// An upgrade from the conntrack layout without states: the flows the old map holds are
/// carried into the new one (TCP as established, UDP as UDP), except where the programs now
/// in place already track them, and the old map's pin is removed.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn flows_of_the_previous_conntrack_layout_are_carried_over() {
    use proxy_common::{
        CT_DIR_FORWARD, CT_DIR_REPLY, CT_ESTABLISHED, CT_SYN, CT_UDP, CtKey, CtValue, v1,
    };
    require_root();
    let pins = BpffsDir::new(&unique("ctv1"));
    let _ebpf = loader::load(&pins.path).expect("object loads");
    let old_path = pins.path.join("PROXY_CT_V1");
    let obj = aya_obj::Map::new_from_params(
        9, // BPF_MAP_TYPE_LRU_HASH
        std::mem::size_of::<v1::CtKey>() as u32,
        std::mem::size_of::<v1::CtValue>() as u32,
        1024,
        0,
    );
    MapData::create(obj, "PROXY_CT_V1", None)
        .unwrap()
        .pin(&old_path)
        .unwrap();
    let md = MapData::from_pin(&old_path).unwrap();
    let mut old: HashMap<_, v1::CtKey, v1::CtValue> =
        HashMap::try_from(aya::maps::Map::LruHashMap(md)).unwrap();
    let key = |proto, sport: u16, dir| v1::CtKey {
        saddr_be: 1,
        daddr_be: 2,
        sport_be: sport,
        dport_be: 3,
        proto,
        dir,
        _pad: [0; 2],
    };
    let value = v1::CtValue {
        addr_be: 4,
        port_be: 5,
        rev_nat_id: 6,
        backend_id: 7,
        _pad: 0,
    };
    for (proto, sport, dir) in [(6, 10, 0), (6, 11, 1), (17, 12, 0), (6, 13, 0)] {
        old.insert(key(proto, sport, dir), value, 0).unwrap();
    }
    // A flow the new programs already track.
    let mut ct = conntrack::open(&pins.path).unwrap();
    let newer = CtValue::new(9, 9, 9, 9, CT_DIR_FORWARD, CT_SYN, 1);
    ct.insert(CtKey::new(1, 13, 2, 3, 6), newer, 0).unwrap();
    drop(old);

    let t = proxy_common::CtTimeouts::DEFAULT;
    let now = 100_000;
    let carried = conntrack::carry_over(&pins.path, &t, now).unwrap();
    assert_eq!(carried, 3);
    assert!(old_path.exists(), "kept until retired");
    assert_eq!(
        conntrack::carry_over(&pins.path, &t, now).unwrap(),
        0,
        "a second pass copies only what is new"
    );
    proxy_agent::migrate::retire(&pins.path).unwrap();
    assert!(!old_path.exists(), "the old pin is removed");
    let get = |proto, sport| ct.get(&CtKey::new(1, sport, 2, 3, proto), 0).unwrap();
    // Carried entries have a short lifetime left: a flow long gone does not stay for hours.
    let at =
        |dir, state, grace| CtValue::new(4, 5, 6, 7, dir, state, now - (t.lifetime(state) - grace));
    let tcp = conntrack::CARRY_OVER_GRACE_TCP_S;
    let udp = conntrack::CARRY_OVER_GRACE_UDP_S;
    assert_eq!(get(6, 10), at(CT_DIR_FORWARD, CT_ESTABLISHED, tcp));
    assert_eq!(get(6, 11), at(CT_DIR_REPLY, CT_ESTABLISHED, tcp));
    assert_eq!(get(17, 12), at(CT_DIR_FORWARD, CT_UDP, udp));
    assert!(!get(6, 10).expired(now + tcp - 1, &t) && get(6, 10).expired(now + tcp + 1, &t));
    assert_eq!(get(6, 13), newer, "what the new programs wrote is kept");
}

/// Maglev tables written through the agent's mapping are what the kernel's own lookup reads
/// (`bpf(BPF_MAP_LOOKUP_ELEM)`: entry i in element i / 2, half i % 2), each names only its
/// frontend's backends, affinity matches are in the kernel, and a restarted writer with the
/// same Services writes nothing, tables included.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn maglev_tables_and_affinity_read_back_through_the_kernel() {
    use aya::maps::{Array, Map};
    use proxy_agent::{
        model::Algorithm,
        sync::{ChoiceConfig, maglev_table},
    };
    use proxy_common::{MAGLEV_MAP, MaglevPair, maglev_element, maglev_index};
    require_root();
    let pins = BpffsDir::new(&unique("mg"));
    let settings = loader::Settings {
        maglev_size: 251,
        maglev_tables: 14,
        ..loader::Settings::default()
    };
    let _ebpf = loader::load_with(&pins.path, &settings).expect("object loads");
    let choice = ChoiceConfig {
        algorithm: Algorithm::Maglev,
        maglev_size: 251,
        maglev_tables: 14,
    };
    let mut desired = Desired::default();
    for i in 0..5u32 {
        let backends: Vec<BackendAddr> = (0..3 + i)
            .map(|j| BackendAddr {
                ip: Ipv4Addr::new(10, 1, i as u8, j as u8 + 1),
                port: 8080,
            })
            .collect();
        desired.frontends.insert(
            Frontend {
                vip: Ipv4Addr::new(10, 96, 1, i as u8),
                port: 80,
                proto: Proto::Tcp,
            },
            FrontendSpec {
                service: ServiceRef::new(Some("mg"), &format!("s{i}")),
                backends,
                no_local_endpoints: false,
                affinity_timeout_s: if i % 2 == 0 { 30 } else { 0 },
                algorithm: None,
                about: Default::default(),
            },
        );
    }
    let maps = PinnedMaps::open(&pins.path).unwrap();
    let state = maps.dump().unwrap();
    let mut syncer = Syncer::with_choice(maps, state, choice);
    let report = syncer.sync(&desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let kernel = PinnedMaps::open(&pins.path).unwrap().dump().unwrap();
    assert_eq!(&kernel, syncer.state());
    assert_eq!(
        kernel.affinity_match.len(),
        3 + 5 + 7,
        "frontends 0, 2 and 4"
    );

    let path = pins.path.join(MAGLEV_MAP);
    let array: Array<MapData, MaglevPair> =
        Array::try_from(Map::Array(MapData::from_pin(&path).unwrap())).unwrap();
    let entry = |i: u32| {
        let (element, half) = maglev_element(i);
        array.get(&element, 0).unwrap().backend_id[half]
    };
    for (k, m) in kernel.services.iter().filter(|(k, _)| k.slot == 0) {
        assert_ne!(m.maglev_table, 0, "{k:?}");
        let ids: Vec<u32> = (1..=m.count)
            .map(|slot| kernel.services[&k.with_slot(slot)].backend_id)
            .collect();
        let members: Vec<_> = ids.iter().map(|id| kernel.backends[id]).collect();
        let want = maglev_table(&ids, &members, 251, &[]);
        let got: Vec<u32> = (0..251)
            .map(|h| entry(maglev_index(m.maglev_table, 251, h)))
            .collect();
        assert_eq!(got, want, "table {} as the kernel reads it", m.maglev_table);
    }

    let mut again = Syncer::with_choice(
        PinnedMaps::open(&pins.path).unwrap(),
        kernel.clone(),
        choice,
    );
    let report = again.sync(&desired);
    assert_eq!((report.updates, report.deletes), (0, 0));
    drop((again, array));

    // Loaded again with the same geometry: the tables stay.
    let table_1 = |pins: &BpffsDir| {
        let a: Array<MapData, MaglevPair> = Array::try_from(Map::Array(
            MapData::from_pin(pins.path.join(MAGLEV_MAP)).unwrap(),
        ))
        .unwrap();
        let (e, h) = maglev_element(maglev_index(1, 251, 0));
        a.get(&e, 0).unwrap().backend_id[h]
    };
    drop(loader::load_with(&pins.path, &settings).unwrap());
    assert_ne!(table_1(&pins), 0, "same geometry: the tables stay");
    // Another table size with the same capacity (502 x 7 = 14 x 251 entries): cleared in
    // place before the new programs could read them at the wrong offsets.
    let other = loader::Settings {
        maglev_size: 7,
        maglev_tables: 502,
        ..settings
    };
    assert_eq!(other.maglev_entries(), settings.maglev_entries());
    let id = |pins: &BpffsDir| {
        let m = MapData::from_pin(pins.path.join(MAGLEV_MAP)).unwrap();
        m.info().unwrap().id()
    };
    let before = id(&pins);
    drop(loader::load_with(&pins.path, &other).unwrap());
    assert_eq!(id(&pins), before, "the same map");
    assert_eq!(table_1(&pins), 0, "another size: cleared");
    // Another capacity: a new map replaces the pin instead of the load being refused.
    let bigger = loader::Settings {
        maglev_tables: 16,
        ..settings
    };
    drop(loader::load_with(&pins.path, &bigger).expect("a resized map is replaced"));
    let info = MapData::from_pin(pins.path.join(MAGLEV_MAP))
        .unwrap()
        .info()
        .unwrap();
    assert_eq!(info.max_entries(), bigger.maglev_entries());
}
