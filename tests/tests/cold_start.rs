//! A cold start from empty maps programs Services while their files are still being parsed
//! (several model and write passes in the first sync), and ends where one full sync would: an
//! agent restarted on the same pins, whose first sync is a full one against what the maps
//! hold, finds nothing to write.
//! Privileged (loads the datapath): run with `cargo xtask test`.

use std::{collections::BTreeSet, net::Ipv4Addr};

use proxy_agent::{
    maps::PinnedMaps,
    model::{Frontend, Proto},
    sync::{MapState, service_key},
};
use proxy_tests::{
    agent::{Agent, Manifests},
    host::{BpffsDir, Cgroup, require_root},
    unique,
};

fn manifest(name: &str, vip: Ipv4Addr, pods: &[Ipv4Addr]) -> String {
    format!("{}---\n{}", service(name, vip), slice(name, pods))
}

fn service(name: &str, vip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: cs}}\n\
         spec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    )
}

fn slice(name: &str, pods: &[Ipv4Addr]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|ip| format!("- {{addresses: [\"{ip}\"]}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: cs, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: \"\", port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

/// The pod addresses the maps send `vip:80/TCP` to (None: no such frontend).
fn backends(state: &MapState, vip: Ipv4Addr) -> Option<BTreeSet<Ipv4Addr>> {
    let f = Frontend {
        vip,
        port: 80,
        proto: Proto::Tcp,
    };
    let master = state.services.get(&service_key(&f, 0))?;
    Some(
        (1..=master.count)
            .map(|slot| {
                let id = state.services[&service_key(&f, slot)].backend_id;
                Ipv4Addr::from(u32::from_be(state.backends[&id].addr_be))
            })
            .collect(),
    )
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_cold_start_programs_while_reading_and_ends_where_a_full_sync_does() {
    require_root();
    let manifests = Manifests::new().unwrap();
    // More files than two of the read's hand-overs (PROGRESS_FILES each).
    let n = 2 * proxy_agent::source::manifests::PROGRESS_FILES + 200;
    for i in 0..n {
        let (hi, lo) = ((i / 200) as u8, (i % 200) as u8);
        let text = manifest(
            &format!("s{i:05}"),
            ip(10, 96, hi, lo + 10),
            &[ip(10, 1, hi, lo + 1), ip(10, 2, hi, lo + 1)],
        );
        manifests.write(&format!("m-{i:05}.yaml"), &text).unwrap();
    }
    // Read first, settled last (files are read in name order):
    // - a Service whose EndpointSlice is in the last file;
    // - two Services on one ClusterIP:port, where the one read last comes first by name
    //   and so owns it (as kube-proxy, one Service per ClusterIP:port).
    let (split, contested) = (ip(10, 97, 0, 1), ip(10, 97, 0, 2));
    manifests
        .write("a-split.yaml", &service("split", split))
        .unwrap();
    manifests
        .write("z-split.yaml", &slice("split", &[ip(10, 3, 0, 1)]))
        .unwrap();
    manifests
        .write(
            "a-loser.yaml",
            &manifest("b-loser", contested, &[ip(10, 3, 0, 2)]),
        )
        .unwrap();
    manifests
        .write(
            "z-winner.yaml",
            &manifest("a-winner", contested, &[ip(10, 3, 0, 3)]),
        )
        .unwrap();

    let cgroup = Cgroup::new(&unique("cs")).unwrap();
    let pins = BpffsDir::new(&unique("cs"));
    let mut agent = Agent::start(&manifests.dir, &cgroup.path, &pins).unwrap();
    let log = agent.log_text();
    let first = log
        .lines()
        .find(|l| l.contains("synced"))
        .unwrap_or_else(|| panic!("a first sync: {log}"));
    let passes: usize = first
        .split(" passes=")
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("passes in {first}"));
    assert!(first.contains("kind=\"full\""), "{first}");
    assert!(
        passes >= 3,
        "{n} files are programmed in passes as they are read: {first}"
    );
    assert!(first.contains(&format!("services={}", n + 2)), "{first}");

    let state = PinnedMaps::open(&pins.path).unwrap().dump().unwrap();
    assert_eq!(
        backends(&state, split),
        Some([ip(10, 3, 0, 1)].into()),
        "the Service gets the endpoints of its slice, read last"
    );
    assert_eq!(
        backends(&state, contested),
        Some([ip(10, 3, 0, 3)].into()),
        "the ClusterIP:port belongs to the Service first by name, read last"
    );
    assert_eq!(
        backends(&state, ip(10, 96, 0, 10)),
        Some([ip(10, 1, 0, 1), ip(10, 2, 0, 1)].into())
    );
    let masters = state.services.keys().filter(|k| k.slot == 0).count();
    assert_eq!(masters, n + 2);

    // A full sync against what the maps hold (a restarted agent) has nothing to write.
    agent.stop();
    let again = Agent::start(&manifests.dir, &cgroup.path, &pins).unwrap();
    let log = again.log_text();
    assert!(
        !log.contains("synced"),
        "the cold start left what a full sync wants: {log}"
    );
    drop(again);
    drop(agent);
}
