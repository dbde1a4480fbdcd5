//! The sync's batched map writes against the kernel: what `BPF_MAP_UPDATE_BATCH` reports when
//! it stops part way, and a full sync through the pinned maps reading back as the mirror says.
//! Privileged (creates BPF maps): run with `cargo xtask test`.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use proxy_agent::{
    loader,
    maps::{PinnedMaps, update_batch},
    model::{BackendAddr, Desired, Frontend, FrontendSpec, Proto, ServiceRef},
    sync::Syncer,
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
