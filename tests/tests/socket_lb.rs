//! Privileged end to end: the agent binary, a manifests directory, and a netns mini-cluster
//! whose backends are real TCP/UDP servers. Run by `cargo xtask test` (as root).
//! Marked `#[ignore]` so a plain unprivileged `cargo test` skips them instead of failing.

use std::{path::Path, time::Duration};

use proxy_tests::{
    agent::{
        Agent, Manifests, frontends, http_get, move_tcp_record, sock_rev_nat_entries,
        tcp_sock_slots,
    },
    client::{self, Report},
    cluster::{Cluster, Pod, TCP_PORT, UDP_PORT},
    host::{BpffsDir, require_root, scaled, wait_for},
    unique,
};

const VIP: &str = "10.96.0.10";

/// Drop order is field order: agent stops, pins go (detaching the programs), then the
/// manifests and the cluster.
struct Fixture {
    agent: Agent,
    pins: BpffsDir,
    manifests: Manifests,
    cluster: Cluster,
}

impl Fixture {
    /// A 3-pod cluster, its manifests (made from the cluster, so they can name pod IPs), an
    /// agent serving them.
    fn new(files: impl FnOnce(&Cluster) -> Vec<(&'static str, String)>) -> Fixture {
        require_root();
        let cluster = Cluster::new(3, &[9090]).expect("mini cluster");
        let manifests = Manifests::new().unwrap();
        for (name, text) in files(&cluster) {
            manifests.write(name, &text).unwrap();
        }
        let pins = BpffsDir::new(&unique("bpf"));
        let agent =
            Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
        Fixture {
            agent,
            pins,
            manifests,
            cluster,
        }
    }

    fn pods(&self) -> Vec<&Pod> {
        self.cluster.pods.iter().collect()
    }

    /// Runs `proxy-agent ARGS --bpffs-dir <this fixture's pins>`, which must succeed.
    fn agent_cli(&self, args: &[&str]) -> String {
        proxy_tests::agent::cli(&self.pins, args)
    }

    /// The VIP is not translated any more: a connect reaches no pod.
    fn assert_vip_not_served(&self) {
        let r = self.client("tcp", &format!("{VIP}:80"), 1);
        assert!(r.replies.is_empty(), "{r:?}");
    }

    fn client(&self, mode: &str, addr: &str, count: u32) -> Report {
        client::run(
            &self.cluster,
            Path::new(env!("CARGO_BIN_EXE_pxt-client")),
            mode,
            addr,
            count,
        )
    }

    /// Waits (at most 5 s) until the maps hold `backends` for VIP:port, returning how long.
    fn wait_backends(&self, port: u16, proto: &str, backends: &[String]) -> Duration {
        let r = wait_for(Duration::from_secs(5), || {
            frontends(&self.pins)
                .into_iter()
                .find(|f| f.vip.to_string() == VIP && f.port == port && f.protocol == proto)
                .filter(|f| {
                    f.backends
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect::<Vec<_>>()
                        == backends
                })
        });
        match r {
            Some((_, elapsed)) => elapsed,
            None => panic!(
                "maps never held {backends:?} for {VIP}:{port}; agent log:\n{}",
                self.agent.log_text()
            ),
        }
    }
}

fn service(name: &str, vip: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: http, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: {UDP_PORT}, protocol: UDP}}\n"
    )
}

fn slice(service: &str, pods: &[&Pod], http_port: u16, node: &str) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: http, port: {http_port}, protocol: TCP}}\n- {{name: dns, port: {UDP_PORT}, protocol: UDP}}\nendpoints:\n"
    );
    for p in pods {
        s.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n",
            p.ip
        ));
    }
    s
}

fn addrs(pods: &[&Pod], port: u16) -> Vec<String> {
    pods.iter().map(|p| format!("{}:{port}", p.ip)).collect()
}

fn web_fixture() -> Fixture {
    let f = Fixture::new(|c| {
        let pods: Vec<&Pod> = c.pods.iter().collect();
        vec![
            ("web-svc.yaml", service("web", VIP, "")),
            ("web-slice.yaml", slice("web", &pods, TCP_PORT, "node-b")),
        ]
    });
    f.wait_backends(80, "TCP", &addrs(&f.pods(), TCP_PORT));
    f
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn tcp_to_the_vip_reaches_the_target_port_and_the_peer_is_the_vip() {
    let f = web_fixture();
    let r = f.client("tcp", &format!("{VIP}:80"), 5);
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.replies.values().sum::<u32>(), 5);
    assert!(r.replies.keys().all(|k| k.starts_with("pod-")), "{r:?}");
    // getpeername() reports the ClusterIP, not the pod.
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        vec![&format!("{VIP}:80")]
    );
    // Each TCP socket's reverse mapping is one array slot, keyed by its cookie; the UDP
    // sockets' LRU is not written (an LRU insert per connect cost about 2 % of the rate).
    let slots = tcp_sock_slots(&f.pins).unwrap();
    assert_eq!(slots.len(), 5, "{slots:?}");
    let pods: Vec<u32> = f.pods().iter().map(|p| u32::from(p.ip).to_be()).collect();
    for s in &slots {
        assert!(pods.contains(&s.addr_be), "{s:?}");
        assert_eq!(u16::from_be(s.port_be), TCP_PORT, "{s:?}");
        assert_eq!(
            (s.rev.vip_be, u16::from_be(s.rev.port_be)),
            (
                u32::from(VIP.parse::<std::net::Ipv4Addr>().unwrap()).to_be(),
                80
            ),
            "{s:?}"
        );
    }
    assert_eq!(sock_rev_nat_entries(&f.pins).unwrap(), 0);
    let r = f.client("udp-connected", &format!("{VIP}:53"), 1);
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(sock_rev_nat_entries(&f.pins).unwrap(), 1);
}

/// A TCP socket connected before an upgrade was recorded in `PROXY_SKNAT_V1` (the pinned LRU
/// the new programs reuse): getpeername() still reports the ClusterIP. Without any record it
/// reports the pod, which shows the record is what is read.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_tcp_socket_recorded_by_earlier_programs_still_reports_the_vip() {
    use std::io::{BufRead as _, Write as _};
    let f = web_fixture();
    for to_lru in [true, false] {
        let mut child = client::spawn(
            &f.cluster,
            Path::new(env!("CARGO_BIN_EXE_pxt-client")),
            false,
            "tcp-hold",
            &format!("{VIP}:80"),
            1,
        );
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let cookie: u64 = match line.trim().parse() {
            Ok(c) => c,
            Err(_) => panic!("no cookie: {line:?} {:?}", client::finish(child)),
        };
        let record = move_tcp_record(&f.pins, cookie, to_lru).unwrap();
        writeln!(child.stdin.take().unwrap()).unwrap();
        let r = client::finish(child);
        let pod = std::net::Ipv4Addr::from(u32::from_be(record.addr_be));
        let expected = if to_lru {
            format!("{VIP}:80")
        } else {
            format!("{pod}:{TCP_PORT}")
        };
        assert_eq!(r.peers.keys().collect::<Vec<_>>(), vec![&expected], "{r:?}");
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn three_hundred_connects_spread_over_three_backends() {
    let f = web_fixture();
    let r = f.client("tcp", &format!("{VIP}:80"), 300);
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.replies.len(), 3, "{r:?}");
    // Expected 100 each; 50 is more than 6 standard deviations away.
    for (pod, n) in &r.replies {
        assert!(*n >= 50, "{pod} got only {n} of 300: {r:?}");
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn udp_sendto_and_connected_udp_see_the_vip_as_the_source() {
    let f = web_fixture();
    for mode in ["udp", "udp-connected"] {
        let r = f.client(mode, &format!("{VIP}:53"), 20);
        assert!(r.errors.is_empty(), "{mode}: {r:?}");
        assert_eq!(r.replies.values().sum::<u32>(), 20, "{mode}: {r:?}");
        assert_eq!(
            r.peers.keys().collect::<Vec<_>>(),
            vec![&format!("{VIP}:53")],
            "{mode}: {r:?}"
        );
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn no_endpoints_is_refused_at_once_and_other_addresses_are_left_alone() {
    require_root();
    let empty_slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: empty-1\n  namespace: default\n  labels: {kubernetes.io/service-name: empty}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"10.200.0.10\"]\n  conditions: {ready: false, serving: false}\n";
    let local = service("local", "10.96.0.12", "  internalTrafficPolicy: Local\n");
    let local_slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: local-1\n  namespace: default\n  labels: {kubernetes.io/service-name: local}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"10.200.0.10\"]\n  nodeName: node-b\n";
    let f = Fixture::new(|_| {
        vec![
            ("empty.yaml", service("empty", "10.96.0.11", "")),
            ("empty-slice.yaml", empty_slice.to_string()),
            ("local.yaml", local),
            ("local-slice.yaml", local_slice.to_string()),
        ]
    });
    wait_for(Duration::from_secs(5), || {
        (frontends(&f.pins).len() == 4).then_some(())
    })
    .expect("programmed");

    // No ready or serving endpoint: ECONNREFUSED (kube-proxy's REJECT), well under 50 ms
    // (EPERM, as fast, on kernels without bpf_set_retval).
    let (refused, no_local) = client::socket_refusals();
    f.client("tcp", "10.96.0.11:80", 20)
        .assert_failed_at_once(refused, 20);
    f.client("udp-connected", "10.96.0.11:53", 1)
        .assert_failed_at_once(refused, 1);

    // iTP=Local with only remote endpoints: never a remote pod, never "no endpoints".
    f.client("tcp", "10.96.0.12:80", 5)
        .assert_failed_at_once(no_local, 5);

    // A port that is no Service's, and a pod IP directly, are not touched.
    let r = f.client("tcp", "10.96.0.11:81", 1);
    assert!(
        !r.errors.contains_key("ECONNREFUSED") && r.replies.is_empty(),
        "{r:?}"
    );
    let r = f.client("tcp", &format!("{}:{TCP_PORT}", f.cluster.pods[1].ip), 3);
    assert_eq!(r.replies.get("pod-1"), Some(&3), "{r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        vec![&format!("{}:{TCP_PORT}", f.cluster.pods[1].ip)]
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn manifest_edits_are_followed_within_a_second() {
    let f = web_fixture();
    let pods = f.pods();

    // Remove a backend.
    f.manifests
        .write(
            "web-slice.yaml",
            &slice("web", &[pods[0], pods[2]], TCP_PORT, "node-b"),
        )
        .unwrap();
    let took = f.wait_backends(80, "TCP", &addrs(&[pods[0], pods[2]], TCP_PORT));
    assert!(
        took < scaled(Duration::from_secs(1)),
        "backend removal took {took:?}"
    );
    let r = f.client("tcp", &format!("{VIP}:80"), 60);
    assert!(
        r.errors.is_empty() && !r.replies.contains_key("pod-1") && r.replies.len() == 2,
        "{r:?}"
    );

    // Change the target port (the named port now resolves to 9090).
    f.manifests
        .write("web-slice.yaml", &slice("web", &pods, 9090, "node-b"))
        .unwrap();
    let took = f.wait_backends(80, "TCP", &addrs(&pods, 9090));
    assert!(
        took < scaled(Duration::from_secs(1)),
        "port change took {took:?}"
    );
    let r = f.client("tcp", &format!("{VIP}:80"), 10);
    assert!(r.errors.is_empty(), "{r:?}");

    // Delete the Service's file: its frontends go, and the VIP is no longer translated.
    f.manifests.remove("web-svc.yaml").unwrap();
    let gone = wait_for(Duration::from_secs(1), || {
        frontends(&f.pins).is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "frontends still programmed: {:?}",
        frontends(&f.pins)
    );
    f.assert_vip_not_served();
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn malformed_files_and_invalid_objects_leave_the_previous_state_serving() {
    let f = web_fixture();
    let before = frontends(&f.pins);

    f.manifests
        .write(
            "web-slice.yaml",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nendpoints: [\n",
        )
        .unwrap();
    f.manifests
        .write("web-svc.yaml", &service("web", "10.96.0.999", ""))
        .unwrap();
    let logged = wait_for(Duration::from_secs(3), || {
        let log = f.agent.log_text();
        (log.contains("web-slice.yaml") && log.contains("spec.clusterIP")).then_some(())
    });
    assert!(
        logged.is_some(),
        "problems not reported with file and field:\n{}",
        f.agent.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(frontends(&f.pins), before, "the programmed state changed");
    let r = f.client("tcp", &format!("{VIP}:80"), 30);
    assert!(r.errors.is_empty() && r.replies.len() == 3, "{r:?}");

    // A good edit after the bad ones is applied.
    let pods = f.pods();
    f.manifests
        .write("web-svc.yaml", &service("web", VIP, ""))
        .unwrap();
    f.manifests
        .write(
            "web-slice.yaml",
            &slice("web", &[pods[1]], TCP_PORT, "node-b"),
        )
        .unwrap();
    f.wait_backends(80, "TCP", &addrs(&[pods[1]], TCP_PORT));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_datapath_outlives_the_agent_and_a_restart_rewrites_nothing() {
    let mut f = web_fixture();
    let before = frontends(&f.pins);
    f.agent.stop();
    let r = f.client("tcp", &format!("{VIP}:80"), 20);
    assert!(
        r.errors.is_empty() && r.replies.values().sum::<u32>() == 20,
        "stopped agent: {r:?}"
    );

    f.agent = Agent::start(&f.manifests.dir, &f.cluster.cgroup_path(), &f.pins).unwrap();
    assert_eq!(
        frontends(&f.pins),
        before,
        "rev-NAT ids and backends unchanged"
    );
    assert!(
        !f.agent.log_text().contains("synced"),
        "a restart on unchanged input wrote maps:\n{}",
        f.agent.log_text()
    );
    let (_, metrics) = http_get(&f.agent.metrics_addr, "/metrics");
    for op in ["update", "delete"] {
        let line = format!("proxy_map_writes_total{{op=\"{op}\"}} 0");
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    let r = f.client("tcp", &format!("{VIP}:80"), 20);
    assert!(r.errors.is_empty(), "{r:?}");

    // `cleanup` detaches: the VIP is no longer translated.
    f.agent.stop();
    f.agent_cli(&["cleanup"]);
    assert!(!f.pins.path.exists());
    f.assert_vip_not_served();
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn services_command_prints_the_table_and_json() {
    let f = web_fixture();
    let run = |fmt: &str| f.agent_cli(&["services", "-o", fmt]);
    let json: serde_json::Value = serde_json::from_str(&run("json")).unwrap();
    let svcs = json["services"].as_array().unwrap();
    assert_eq!(svcs.len(), 2);
    let tcp = svcs.iter().find(|s| s["protocol"] == "TCP").unwrap();
    assert_eq!(tcp["vip"], VIP);
    assert_eq!(tcp["state"], "active");
    assert_eq!(tcp["backends"].as_array().unwrap().len(), 3);
    let table = run("table");
    assert!(
        table.contains("10.96.0.10:80") && table.contains("10.200.0.11:8080"),
        "{table}"
    );

    // bpftool reads the pinned BTF maps with field names.
    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(f.pins.path.join("PROXY_SVC_V1"))
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dump.contains("\"vip_be\"") && dump.contains("\"rev_nat_id\""),
        "{dump}"
    );
}

/// `proxy-agent services` names each frontend's Service and port and says why it is in its
/// state, from the running agent's `/debug/services`; `--service` and `--vip` select; without
/// the agent it still works from the maps, without names.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn services_names_each_frontend_and_says_why_from_the_agent() {
    const DRAINING: &str = "10.96.0.20";
    let f = Fixture::new(|c| {
        let pods: Vec<&Pod> = c.pods.iter().collect();
        let mut draining = slice("draining", &pods[..2], TCP_PORT, "node-b");
        draining = draining.replace(
            "conditions: {ready: true}",
            "conditions: {ready: false, serving: false, terminating: true}",
        );
        vec![
            ("web-svc.yaml", service("web", VIP, "")),
            ("web-slice.yaml", slice("web", &pods, TCP_PORT, "node-b")),
            ("draining-svc.yaml", service("draining", DRAINING, "")),
            ("draining-slice.yaml", draining),
        ]
    });
    f.wait_backends(80, "TCP", &addrs(&f.pods(), TCP_PORT));
    let agent = f.agent.metrics_addr.clone();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["services", "-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&f.agent_cli(&all)).unwrap()
    };
    let find = |v: &serde_json::Value, vip: &str, port: u64| {
        (v["services"].as_array().unwrap().iter())
            .find(|s| s["vip"] == vip && s["port"] == port)
            .cloned()
            .unwrap_or_else(|| panic!("{vip}:{port} not in {v:#}"))
    };

    let all = json(&["--agent-addr", &agent]);
    assert_eq!(
        all["names_from"],
        format!("http://{agent}/debug/services"),
        "{all:#}"
    );
    let web = find(&all, VIP, 80);
    assert_eq!(
        (
            &web["service"],
            &web["port_name"],
            &web["state"],
            &web["reason"]
        ),
        (
            &"default/web".into(),
            &"http".into(),
            &"active".into(),
            &"3 ready endpoints".into()
        ),
        "{web:#}"
    );
    assert_eq!(web["endpoints"]["ready"], 3, "{web:#}");
    let draining = find(&all, DRAINING, 53);
    assert_eq!(
        (
            &draining["service"],
            &draining["port_name"],
            &draining["state"],
            &draining["reason"]
        ),
        (
            &"default/draining".into(),
            &"dns".into(),
            &"reject".into(),
            &"no ready endpoints (2 terminating)".into()
        ),
        "{draining:#}"
    );

    let only = |v: &serde_json::Value| -> Vec<String> {
        let mut out: Vec<String> = (v["services"].as_array().unwrap().iter())
            .map(|s| format!("{}:{}", s["vip"].as_str().unwrap(), s["port"]))
            .collect();
        out.sort();
        out
    };
    let by_service = json(&["--agent-addr", &agent, "--service", "default/draining"]);
    assert_eq!(
        only(&by_service),
        [format!("{DRAINING}:53"), format!("{DRAINING}:80")]
    );
    let by_vip = json(&["--agent-addr", &agent, "--vip", VIP]);
    assert_eq!(only(&by_vip), [format!("{VIP}:53"), format!("{VIP}:80")]);

    let table = f.agent_cli(&["services", "--agent-addr", &agent]);
    let row = (table.lines())
        .find(|l| l.starts_with(&format!("{DRAINING}:80")))
        .unwrap_or_default();
    assert!(
        row.contains("default/draining:http") && row.contains("no ready endpoints (2 terminating)"),
        "{table}"
    );

    // The maps alone: the same frontends, without names.
    let maps = json(&["--no-agent"]);
    assert_eq!(only(&maps), only(&all));
    assert!(
        maps["names_from"].is_null() && find(&maps, VIP, 80)["service"].is_null(),
        "{maps:#}"
    );
    // No agent where it is looked for: still the maps, saying why there are no names; a
    // --service filter, which needs them, fails in one line.
    let closed = format!("127.0.0.1:{}", proxy_tests::agent::free_port());
    let unreachable = json(&["--agent-addr", &closed]);
    assert_eq!(only(&unreachable), only(&all));
    assert!(
        unreachable["names_error"]
            .as_str()
            .is_some_and(|e| e.contains(&closed)),
        "{unreachable:#}"
    );
    let out = std::process::Command::new(proxy_tests::agent::agent_bin())
        .args([
            "services",
            "--service",
            "default/web",
            "--agent-addr",
            &closed,
            "--bpffs-dir",
        ])
        .arg(&f.pins.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.lines().count() == 1 && err.contains("--service needs"),
        "{err}"
    );

    // The endpoint itself: JSON naming the pins it programs.
    let (code, body) = http_get(&agent, "/debug/services");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["bpffs_dir"], f.pins.path.to_str().unwrap(), "{v:#}");
    assert_eq!(only(&v), only(&all));
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn run_refuses_clearly_without_root_or_cgroup_v2() {
    require_root();
    let m = Manifests::new().unwrap();
    let pins = BpffsDir::new(&unique("bpf"));
    let bin = proxy_tests::agent::agent_bin();
    let run = |prefix: &[&str], cgroup: &str| {
        let mut args: Vec<String> = prefix
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        args.push(bin.display().to_string());
        args.extend(["run", "--manifests"].map(String::from));
        args.push(m.dir.display().to_string());
        args.extend([
            "--cgroup".into(),
            cgroup.into(),
            "--bpffs-dir".into(),
            pins.path.display().to_string(),
        ]);
        let out = std::process::Command::new(&args[0])
            .args(&args[1..])
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cg2 = proxy_agent::loader::cgroup2_mount().unwrap();
    let (ok, err) = run(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &cg2.display().to_string(),
    );
    assert!(!ok && err.contains("needs root"), "{err}");
    let (ok, err) = run(&[], "/tmp");
    assert!(
        !ok && err.contains("/tmp is not a cgroup v2 directory"),
        "{err}"
    );
    assert!(!pins.path.exists(), "nothing was loaded");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_vanished_manifests_directory_keeps_the_datapath_serving() {
    let f = web_fixture();
    let before = frontends(&f.pins);
    let moved = f.manifests.dir.with_extension("away");
    std::fs::rename(&f.manifests.dir, &moved).unwrap();
    let warned = wait_for(Duration::from_secs(3), || {
        f.agent
            .log_text()
            .contains("cannot read the manifests")
            .then_some(())
    });
    std::fs::rename(&moved, &f.manifests.dir).unwrap();
    assert!(warned.is_some(), "{}", f.agent.log_text());
    assert_eq!(frontends(&f.pins), before, "{}", f.agent.log_text());
    let r = f.client("tcp", &format!("{VIP}:80"), 10);
    assert!(r.errors.is_empty(), "{r:?}");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_connected_udp_socket_to_a_removed_backend_is_terminated() {
    let f = web_fixture();
    let pods = f.pods();
    f.manifests
        .write(
            "web-slice.yaml",
            &slice("web", &[pods[0]], TCP_PORT, "node-b"),
        )
        .unwrap();
    f.wait_backends(80, "TCP", &addrs(&[pods[0]], TCP_PORT));
    let bin = Path::new(env!("CARGO_BIN_EXE_pxt-client"));
    let connects = || {
        proxy_agent::inspect::inspect(&f.pins.path)
            .map(|i| i.counters["connect_translated"])
            .unwrap_or(0)
    };
    let before = connects();
    let child = client::spawn(
        &f.cluster,
        bin,
        false,
        "udp-connected-loop",
        &format!("{VIP}:53"),
        60,
    );
    // Once its socket is connected (a client may take a while to start, e.g. under
    // emulation), some round trips with pod-0.
    wait_for(Duration::from_secs(10), || {
        (connects() > before).then_some(())
    })
    .expect("the client connected");
    std::thread::sleep(Duration::from_millis(600));
    // pod-0 is replaced by pod-1. (pod-0 still answers here, so without the termination the
    // socket would stay with it.)
    f.manifests
        .write(
            "web-slice.yaml",
            &slice("web", &[pods[1]], TCP_PORT, "node-b"),
        )
        .unwrap();
    let r = client::finish(child);
    assert!(r.replies.get("pod-0").is_some_and(|n| *n > 5), "{r:?}");
    assert!(
        r.replies.get("pod-1").is_some_and(|n| *n > 5),
        "reconnected to the new pod: {r:?}"
    );
    assert_eq!(r.last, "pod-1", "{r:?}");
    assert!(r.errors.values().sum::<u32>() <= 3, "{r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        vec![&format!("{VIP}:53")]
    );
    assert!(
        f.agent
            .log_text()
            .contains("terminated connected UDP sockets"),
        "{}",
        f.agent.log_text()
    );
}
