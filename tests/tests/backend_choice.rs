//! Backend choice end to end, on both datapaths: ClientIP session affinity (kept, timed out,
//! switched at run time, its backend removed) and Maglev (a flow keeps its backend across an
//! unrelated backend's removal). One routed mini-cluster with the agent on the node and the
//! packet path on its interfaces: a client in the hooked cgroup goes through the socket path,
//! one outside it through the packet path. Privileged: run with `cargo xtask test`.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, Manifests, frontends},
    client::{self, Report},
    cluster::{Cluster, TCP_PORT, UDP_PORT},
    host::{BpffsDir, require_root, wait_for},
    unique,
};

const VIP: &str = "10.96.0.10";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Datapath {
    Socket,
    Packet,
}

/// The Service with `spec` lines (indented two spaces) and `annotations` (a YAML map), and its
/// endpoints `ips`.
fn web(spec: &str, annotations: &str, ips: &[String]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default, annotations: {annotations}}}\nspec:\n  clusterIP: {VIP}\n{spec}  ports:\n  - {{name: http, port: 80, targetPort: {TCP_PORT}}}\n  - {{name: dns, port: 53, targetPort: {UDP_PORT}, protocol: UDP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: {TCP_PORT}}}\n- {{name: dns, port: {UDP_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for ip in ips {
        s.push_str(&format!("- addresses: [\"{ip}\"]\n"));
    }
    s
}

/// Writes the Service with endpoints on pods `pods`.
fn write_web(m: &Manifests, c: &Cluster, spec: &str, annotations: &str, pods: &[usize]) {
    let ips: Vec<String> = pods.iter().map(|i| c.pods[*i].ip.to_string()).collect();
    m.write("web.yaml", &web(spec, annotations, &ips)).unwrap();
}

const CLIENT_IP: &str = "  sessionAffinity: ClientIP\n";

fn client_ip_for(seconds: u32) -> String {
    format!("{CLIENT_IP}  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {seconds}}}}}\n")
}

/// Drop order: agent, pins (detaching everything), manifests, cluster.
struct Fixture {
    agent: Agent,
    pins: BpffsDir,
    manifests: Manifests,
    cluster: Cluster,
    path: Datapath,
}

impl Fixture {
    fn new(path: Datapath, spec: &str, annotations: &str) -> Fixture {
        require_root();
        let cluster = Cluster::routed(3).expect("routed mini cluster");
        let manifests = Manifests::new().unwrap();
        let pins = BpffsDir::new(&unique("bpf"));
        write_web(&manifests, &cluster, spec, annotations, &[0, 1, 2]);
        let args: Vec<&std::ffi::OsStr> = vec![
            "--manifests".as_ref(),
            manifests.dir.as_os_str(),
            "--tc-interface".as_ref(),
            "vpod*".as_ref(),
            "--tc-interface".as_ref(),
            "vclient".as_ref(),
            // A UDP flow's entry is gone a second after its last packet, so a later run from
            // the same port is a new flow and is chosen again (Maglev's test).
            "--conntrack-udp-timeout".as_ref(),
            "1s".as_ref(),
        ];
        let agent = Agent::start_in(
            Some(&cluster.node.path()),
            &args,
            &cluster.cgroup_path(),
            &pins,
        )
        .expect("agent starts");
        Fixture {
            agent,
            pins,
            manifests,
            cluster,
            path,
        }
    }

    fn write(&self, spec: &str, annotations: &str, pods: &[usize]) {
        write_web(&self.manifests, &self.cluster, spec, annotations, pods);
    }

    /// Waits (at most 10 s) until VIP:80 has `backends` backends, `algorithm` and affinity
    /// timeout `affinity_s`.
    fn wait(&self, backends: usize, algorithm: &str, affinity_s: u32) {
        let r = wait_for(Duration::from_secs(10), || {
            frontends(&self.pins).into_iter().find(|f| {
                f.vip.to_string() == VIP
                    && f.port == 80
                    && f.backends.len() == backends
                    && f.algorithm == algorithm
                    && f.affinity_timeout_s == affinity_s
            })
        });
        assert!(
            r.is_some(),
            "maps never held {backends} backends, {algorithm}, affinity {affinity_s}: {:?}\n{}",
            frontends(&self.pins),
            self.agent.log_text()
        );
    }

    fn client(&self, mode: &str, port: u16, count: u32, extra: &[&str]) -> Report {
        client::run_with(
            &self.cluster,
            Path::new(env!("CARGO_BIN_EXE_pxt-client")),
            self.path == Datapath::Packet,
            mode,
            &format!("{VIP}:{port}"),
            count,
            extra,
        )
    }

    /// `count` TCP connections, none failing; the backends (pod names) that answered.
    fn connects(&self, count: u32) -> BTreeSet<String> {
        let r = self.client("tcp", 80, count, &[]);
        assert!(
            r.errors.is_empty(),
            "{:?}: {r:?}\n{}",
            self.path,
            self.agent.log_text()
        );
        assert_eq!(r.replies.values().sum::<u32>(), count, "{r:?}");
        r.replies.into_keys().collect()
    }
}

/// `last_used_s` of every session-affinity entry.
fn affinity_last_used(pins: &BpffsDir) -> Vec<u32> {
    use aya::maps::{HashMap, Map, MapData};
    use proxy_common::{AFFINITY_MAP, AffinityKey, AffinityValue};
    let map = MapData::from_pin(pins.path.join(AFFINITY_MAP)).unwrap();
    let map: HashMap<MapData, AffinityKey, AffinityValue> =
        HashMap::try_from(Map::LruHashMap(map)).unwrap();
    map.iter().map(|kv| kv.unwrap().1.last_used_s).collect()
}

/// The datapath's clock: CLOCK_MONOTONIC, in seconds.
fn monotonic_s() -> u64 {
    proxy_tests::chaos::probe::monotonic_ns() / 1_000_000_000
}

fn only(set: &BTreeSet<String>) -> String {
    assert_eq!(set.len(), 1, "one backend expected: {set:?}");
    set.iter().next().unwrap().clone()
}

fn pod_index(name: &str) -> usize {
    name.trim_start_matches("pod-").parse().unwrap()
}

/// Without affinity connections spread; with ClientIP (switched on at run time) 16 land on
/// one backend; that backend removed, they go to one other with no failed connect; switched
/// off, they spread again.
fn affinity_follows_the_service(path: Datapath) {
    let f = Fixture::new(path, "", "{}");
    f.wait(3, "random", 0);
    assert!(f.connects(30).len() >= 2, "random choice spreads");

    f.write(CLIENT_IP, "{}", &[0, 1, 2]);
    f.wait(3, "random", 10_800);
    let first = only(&f.connects(16));
    assert_eq!(only(&f.connects(16)), first, "kept across runs");

    let rest: Vec<usize> = (0..3).filter(|i| *i != pod_index(&first)).collect();
    f.write(CLIENT_IP, "{}", &rest);
    f.wait(2, "random", 10_800);
    let second = only(&f.connects(16));
    assert_ne!(second, first, "the removed backend is never chosen");

    f.write("", "{}", &rest);
    f.wait(2, "random", 0);
    assert_eq!(f.connects(30).len(), 2, "None spreads again");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn socket_path_affinity_follows_the_service() {
    affinity_follows_the_service(Datapath::Socket);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn packet_path_affinity_follows_the_service() {
    affinity_follows_the_service(Datapath::Packet);
}

/// With `timeoutSeconds: 6`, a client connecting for 8 s keeps its backend, and each connect
/// restarts the timer (the entry's last use is checked: a random re-choice could keep the
/// backend anyway); after 7 s idle it is chosen again (a new choice may be the same backend: up
/// to 8 tries). Nothing here assumes how long a connect takes: under emulation one can take a
/// second and more.
fn an_idle_client_is_chosen_again(path: Datapath) {
    const TIMEOUT_S: u32 = 6;
    let f = Fixture::new(path, &client_ip_for(TIMEOUT_S), "{}");
    f.wait(3, "random", TIMEOUT_S);
    let mut last = only(&f.connects(1));
    let start = Instant::now();
    let mut connects = 0;
    while start.elapsed() < Duration::from_secs(u64::from(TIMEOUT_S) + 2) && connects < 60 {
        std::thread::sleep(Duration::from_millis(300));
        // The datapath's clock (whole seconds) before this connect: the entry's last use
        // cannot be older if this connect used it.
        let before = monotonic_s();
        assert_eq!(only(&f.connects(1)), last, "{path:?}: the timer restarts");
        let used = affinity_last_used(&f.pins);
        assert!(
            used.len() == 1 && u64::from(used[0]) >= before,
            "{path:?}: entries last used {used:?}, this connect at {before} or later"
        );
        connects += 1;
    }
    let idle = Instant::now();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(u64::from(TIMEOUT_S) * 1000 + 1_200));
        let now = only(&f.connects(1));
        if now != last {
            return;
        }
        last = now;
    }
    panic!(
        "{path:?}: the same backend after 8 idle timeouts ({:?})",
        idle.elapsed()
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn socket_path_affinity_times_out() {
    an_idle_client_is_chosen_again(Datapath::Socket);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn packet_path_affinity_times_out() {
    an_idle_client_is_chosen_again(Datapath::Packet);
}

const MAGLEV: &str = "{service.ebpf-proxy.io/lb-algorithm: maglev}";

/// Packet path: the same 5-tuple (UDP from a fixed source port, its conntrack entry expired
/// in between) lands on the same backend, also after an unrelated backend is removed; only
/// the tuples that were on the removed one move.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn packet_path_maglev_keeps_a_tuple_on_its_backend() {
    let f = Fixture::new(Datapath::Packet, "", MAGLEV);
    f.wait(3, "maglev", 0);
    let ports: Vec<u16> = (41_001..41_013).collect();
    let round = |f: &Fixture| -> Vec<String> {
        let r: Vec<String> = (ports.iter())
            .map(|p| {
                let r = f.client("udp", 53, 1, &["--source-port", &p.to_string()]);
                assert!(r.errors.is_empty(), "port {p}: {r:?}");
                only(&r.replies.into_keys().collect())
            })
            .collect();
        // Every flow's conntrack entry expires (UDP: 1 s here) before the next round.
        std::thread::sleep(Duration::from_millis(2_100));
        r
    };
    let first = round(&f);
    assert!(
        first.iter().collect::<BTreeSet<_>>().len() >= 2,
        "tuples spread: {first:?}"
    );
    assert_eq!(round(&f), first, "a tuple keeps its backend as a new flow");

    let removed = "pod-2";
    f.write("", MAGLEV, &[0, 1]);
    f.wait(2, "maglev", 0);
    let after = round(&f);
    let kept = (first.iter().zip(&after)).filter(|(a, _)| *a != removed);
    let mut n = 0;
    for (a, b) in kept {
        assert_eq!(
            a, b,
            "a tuple not on {removed} moved: {first:?} -> {after:?}"
        );
        n += 1;
    }
    assert!(n >= 3, "too few tuples off {removed} to tell: {first:?}");
    assert!(!after.iter().any(|b| b == removed), "{after:?}");
}

/// Socket path: Maglev hashes the socket, so one unconnected UDP socket's datagrams all go
/// to one backend (random choice spreads them), and keep going there while an unrelated
/// backend is removed.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn socket_path_maglev_keeps_a_socket_on_its_backend() {
    let f = Fixture::new(Datapath::Socket, "", "{}");
    f.wait(3, "random", 0);
    let r = f.client("udp-loop", 53, 20, &[]);
    assert!(r.replies.len() >= 2, "random choice spreads: {r:?}");

    f.write("", MAGLEV, &[0, 1, 2]);
    f.wait(3, "maglev", 0);
    let r = f.client("udp-loop", 53, 20, &[]);
    assert_eq!(r.replies.len(), 1, "one socket, one backend: {r:?}");

    // 60 datagrams over 3 s; pod-2 goes after about one.
    let bin = Path::new(env!("CARGO_BIN_EXE_pxt-client"));
    let child = client::spawn(&f.cluster, bin, false, "udp-loop", &format!("{VIP}:53"), 60);
    std::thread::sleep(Duration::from_secs(1));
    f.write("", MAGLEV, &[0, 1]);
    f.wait(2, "maglev", 0);
    let r = client::finish(child);
    let names: BTreeSet<&String> = r.replies.keys().collect();
    assert!(
        names.len() == 1 || (names.len() == 2 && r.replies.contains_key("pod-2")),
        "the socket moved though its backend stayed: {r:?}"
    );
    assert!(r.errors.values().sum::<u32>() <= 2, "{r:?}");
}

/// Affinity and Maglev compose, affinity first: under Maglev alone a pod's TCP connections
/// (each its own socket, so its own hash) spread; with ClientIP on as well, all 16 go to the
/// backend the first one was given, reused from the affinity entry.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn socket_path_affinity_wins_over_maglev() {
    let f = Fixture::new(Datapath::Socket, "", MAGLEV);
    f.wait(3, "maglev", 0);
    assert!(
        f.connects(30).len() >= 2,
        "Maglev by socket spreads connections"
    );

    f.write(CLIENT_IP, MAGLEV, &[0, 1, 2]);
    f.wait(3, "maglev", 10_800);
    let reused = |f: &Fixture| {
        proxy_agent::inspect::inspect(&f.pins.path)
            .unwrap()
            .counters["affinity_reused"]
    };
    let before = reused(&f);
    only(&f.connects(16));
    assert!(reused(&f) - before >= 15, "the affinity entry chose them");
}
