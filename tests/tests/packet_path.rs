//! The packet path end to end: a routed netns mini-cluster, the agent running in the node's
//! namespace with `--tc-interface`, and a client outside the hooked cgroup, so only the TC
//! program on the node can translate. Privileged: run with `cargo xtask test`.

use std::{path::Path, time::Duration};

use proxy_tests::{
    agent::{Agent, Manifests, agent_bin, pinned_link, tc_attached, tc_attachment},
    client::{self, Report},
    cluster::{Cluster, ECHO_PORT, TCP_PORT, UDP_PORT},
    host::{BpffsDir, require_root, scaled, wait_for},
    unique,
};

const VIP: &str = "10.96.0.10";

fn web_manifest(ips: &[String]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {TCP_PORT}}}\n  - {{name: dns, port: 53, targetPort: {UDP_PORT}, protocol: UDP}}\n  - {{name: echo, port: 7, targetPort: {ECHO_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: {TCP_PORT}}}\n- {{name: dns, port: {UDP_PORT}, protocol: UDP}}\n- {{name: echo, port: {ECHO_PORT}}}\nendpoints:\n"
    );
    for ip in ips {
        s.push_str(&format!("- addresses: [\"{ip}\"]\n"));
    }
    s
}

/// The agent on the node, the packet path on the pods' and the client's interfaces.
fn start_agent(cluster: &Cluster, manifests: &Manifests, pins: &BpffsDir) -> Agent {
    let args: Vec<&std::ffi::OsStr> = [
        "--manifests".as_ref(),
        manifests.dir.as_os_str(),
        "--tc-interface".as_ref(),
        "vpod*".as_ref(),
        "--tc-interface".as_ref(),
        "vclient".as_ref(),
    ]
    .to_vec();
    Agent::start_in(
        Some(&cluster.node.path()),
        &args,
        &cluster.cgroup_path(),
        pins,
    )
    .expect("agent starts")
}

/// Drop order: agent, pins (detaching everything), manifests, cluster.
struct Fixture {
    agent: Agent,
    pins: BpffsDir,
    manifests: Manifests,
    cluster: Cluster,
}

impl Fixture {
    fn new() -> Fixture {
        require_root();
        let cluster = Cluster::routed(3).expect("routed mini cluster");
        let manifests = Manifests::new().unwrap();
        let ips: Vec<String> = cluster.pods.iter().map(|p| p.ip.to_string()).collect();
        manifests.write("web.yaml", &web_manifest(&ips)).unwrap();
        manifests
            .write(
                "empty.yaml",
                "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - {name: http, port: 80}\n  - {name: dns, port: 53, protocol: UDP}\n",
            )
            .unwrap();
        // A Service whose backend has no listener on the target port.
        manifests
            .write(
                "deaf.yaml",
                &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: deaf, namespace: default}}\nspec:\n  clusterIP: 10.96.0.12\n  ports: [{{name: dns, port: 53, protocol: UDP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: deaf-1, namespace: default, labels: {{kubernetes.io/service-name: deaf}}}}\naddressType: IPv4\nports: [{{name: dns, port: 5999, protocol: UDP}}]\nendpoints: [{{addresses: [\"{}\"]}}]\n", ips[0]),
            )
            .unwrap();
        let pins = BpffsDir::new(&unique("bpf"));
        let agent = start_agent(&cluster, &manifests, &pins);
        Fixture {
            agent,
            pins,
            manifests,
            cluster,
        }
    }

    fn client(&self, mode: &str, addr: &str, count: u32) -> Report {
        client::run_unhooked(
            &self.cluster,
            Path::new(env!("CARGO_BIN_EXE_pxt-client")),
            mode,
            addr,
            count,
        )
    }

    /// The backends programmed for web's `port`/`protocol` ("TCP", "UDP"), from the pins.
    fn backends(&self, port: u16, protocol: &str) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
        let i = proxy_agent::inspect::inspect(&self.pins.path)?;
        Ok((i.services.iter())
            .filter(|s| s.vip.to_string() == VIP && s.port == port && s.protocol == protocol)
            .flat_map(|s| s.backends.iter().map(|b| b.ip))
            .collect())
    }

    /// UDP conntrack entries (either direction) that name `pod`.
    fn udp_flows_naming(&self, pod: std::net::Ipv4Addr) -> usize {
        let md = aya::maps::MapData::from_pin(self.pins.path.join(proxy_common::CT_MAP)).unwrap();
        let ct: aya::maps::HashMap<_, proxy_common::CtKey, proxy_common::CtValue> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(md)).unwrap();
        let pod = u32::from_ne_bytes(pod.octets());
        (ct.iter().flatten())
            .filter(|(k, v)| k.proto == 17 && (v.addr_be == pod || k.saddr_be == pod))
            .count()
    }

    fn counter(&self, name: &str) -> u64 {
        proxy_agent::inspect::inspect(&self.pins.path)
            .map(|i| i.counters[name])
            .unwrap_or(0)
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn tcp_and_udp_from_an_unhooked_client_are_translated_on_the_node() {
    let f = Fixture::new();
    let r = f.client("tcp", &format!("{VIP}:80"), 60);
    assert!(r.errors.is_empty(), "{r:?}\n{}", f.agent.log_text());
    assert_eq!(r.replies.len(), 3, "every backend is used: {r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        vec![&format!("{VIP}:80")],
        "the client sees only the VIP"
    );
    let r = f.client("udp", &format!("{VIP}:53"), 20);
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        vec![&format!("{VIP}:53")]
    );
    assert!(f.counter("tc_translated") >= 80 && f.counter("tc_reversed") >= 80);
    assert_eq!(
        f.counter("connect_translated"),
        0,
        "the socket path did not see this client"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn ping_to_the_vip_gets_no_reply_and_is_counted() {
    let f = Fixture::new();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", f.cluster.client.path().display()))
        .args(["ping", "-c", "2", "-i", "0.2", "-W", "1", VIP])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains(" 0 received"),
        "{text}"
    );
    assert!(f.counter("icmp_to_vip_dropped") >= 2);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_interface_that_appears_later_is_attached_within_a_second() {
    let mut f = Fixture::new();
    // Timed from the moment a matching interface exists.
    f.cluster
        .node
        .ip(&[
            "link", "add", "vpod9", "type", "veth", "peer", "name", "xpeer9",
        ])
        .unwrap();
    let start = std::time::Instant::now();
    // Timed by the agent's word (asking the kernel through `proxy-agent status` takes a while
    // itself under emulation), then checked with the kernel: TCX where it has it, a clsact
    // filter elsewhere.
    let said = "packet path attached (TC ingress) interface=vpod9";
    wait_for(Duration::from_secs(3), || {
        f.agent.log_text().contains(said).then_some(())
    })
    .unwrap_or_else(|| panic!("vpod9 not attached:\n{}", f.agent.log_text()));
    let took = start.elapsed();
    assert!(
        took < scaled(Duration::from_secs(1)),
        "attaching took {took:?}:\n{}",
        f.agent.log_text()
    );
    assert!(tc_attached(&f.cluster.node, "vpod9"), "the kernel runs it");
    // One that goes away is forgotten, without errors.
    f.cluster.node.ip(&["link", "del", "vpod9"]).unwrap();
    let pin = f.pins.path.join("links/tc_vpod9");
    wait_for(Duration::from_secs(3), || (!pin.exists()).then_some(()))
        .expect("pin of a vanished interface removed (TCX; clsact has none)");
    assert!(
        !f.agent.log_text().contains("WARN"),
        "{}",
        f.agent.log_text()
    );

    // A new pod's interface is attached too, and carries traffic both ways.
    let pod = f.cluster.add_routed_pod().unwrap();
    let ip = pod.ip.to_string();
    wait_for(Duration::from_secs(3), || {
        tc_attached(&f.cluster.node, "vpod3").then_some(())
    })
    .unwrap_or_else(|| panic!("vpod3 not attached:\n{}", f.agent.log_text()));
    // Only the new pod serves: its replies come back through the new interface's program.
    f.manifests
        .write("web.yaml", &web_manifest(std::slice::from_ref(&ip)))
        .unwrap();
    wait_for(Duration::from_secs(3), || {
        let r = f.client("tcp", &format!("{VIP}:80"), 1);
        (r.replies.get("pod-3") == Some(&1)).then_some(())
    })
    .expect("traffic through the new interface");
    let r = f.client("tcp", &format!("{VIP}:80"), 10);
    assert_eq!(r.replies.get("pod-3"), Some(&10), "{r:?}");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn no_endpoints_is_rejected_like_kube_proxy() {
    let f = Fixture::new();
    // ICMP port unreachable from the VIP: the client's connect fails at once.
    f.client("tcp", "10.96.0.11:80", 5)
        .assert_refused_at_once(5);
    f.client("udp-connected", "10.96.0.11:53", 3)
        .assert_refused_at_once(3);
    assert!(f.counter("tc_no_endpoints_rejected") >= 8);
    // A client in the hooked cgroup gets ECONNREFUSED too, on every kernel: from the socket
    // path through bpf_set_retval, or, on kernels without it, from this program (the socket
    // path leaves the connect untranslated for it).
    let hooked = |mode, addr, n| {
        client::run(
            &f.cluster,
            Path::new(env!("CARGO_BIN_EXE_pxt-client")),
            mode,
            addr,
            n,
        )
    };
    hooked("tcp", "10.96.0.11:80", 5).assert_refused_at_once(5);
    hooked("udp-connected", "10.96.0.11:53", 3).assert_refused_at_once(3);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_backends_icmp_error_reaches_the_client_as_from_the_vip() {
    let f = Fixture::new();
    // pod-0 has nothing on 5999: its kernel's port unreachable, translated back to the VIP,
    // is what lets the connected socket see ECONNREFUSED.
    let r = f.client("udp-connected", "10.96.0.12:53", 3);
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&3), "{r:?}");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_udp_flow_on_one_source_port_follows_its_server_pod_being_replaced() {
    let f = Fixture::new();
    let ips: Vec<String> = f.cluster.pods.iter().map(|p| p.ip.to_string()).collect();
    f.manifests
        .write("web.yaml", &web_manifest(&ips[..1]))
        .unwrap();
    // On the maps, not after a fixed time: a flow started while the first state (all three
    // pods) is still programmed could begin on pod-1 and never be on pod-0 at all.
    let pod0 = f.cluster.pods[0].ip;
    wait_for(Duration::from_secs(5), || {
        f.backends(53, "UDP")
            .ok()
            .filter(|b| b == &[pod0])
            .map(drop)
    })
    .expect("web:53 programmed with pod-0 alone");
    let bin = Path::new(env!("CARGO_BIN_EXE_pxt-client"));
    let child = client::spawn(&f.cluster, bin, true, "udp-loop", &format!("{VIP}:53"), 100);
    wait_for(Duration::from_secs(5), || {
        (f.udp_flows_naming(pod0) > 0).then_some(())
    })
    .expect("the flow reaches pod-0");
    std::thread::sleep(scaled(Duration::from_millis(500)));
    // The server pod is replaced by one at another address.
    f.manifests
        .write("web.yaml", &web_manifest(&ips[1..2]))
        .unwrap();
    let r = client::finish(child);
    assert!(r.replies.get("pod-0").is_some_and(|n| *n > 5), "{r:?}");
    assert!(
        r.replies.get("pod-1").is_some_and(|n| *n > 5),
        "the flow moved to the new pod: {r:?}"
    );
    assert_eq!(r.last, "pod-1", "{r:?}");
    // kube-proxy's conntrack cleanup: no UDP flow still names the old pod.
    assert_eq!(
        f.udp_flows_naming(pod0),
        0,
        "UDP flows to the replaced pod are forgotten"
    );
    assert!(
        f.agent.log_text().contains("forgot UDP flows"),
        "{}",
        f.agent.log_text()
    );
    assert!(
        r.errors.values().sum::<u32>() <= 3,
        "only the change itself may lose a datagram: {r:?}"
    );
    // Every reply comes from the VIP, except at most one: a reply the old pod sent after the
    // agent forgot its flow passes untranslated, as with kube-proxy's conntrack flush (seen
    // under emulation, where the window between a datagram and its reply is wide).
    let old_pod = format!("{pod0}:{UDP_PORT}");
    let others: Vec<(&String, &u32)> = (r.peers.iter())
        .filter(|(p, _)| **p != format!("{VIP}:53"))
        .collect();
    assert!(
        others.iter().all(|(p, n)| **p == old_pod && **n <= 1),
        "{r:?}"
    );
}

/// `tcpdump -vv` in a namespace, for `secs`, printing each packet's checksum verdict;
/// returns once it is listening (it may take a while to start, e.g. under emulation).
fn capture(ns: &Path, filter: &str, secs: u32) -> std::process::Child {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args([
            "timeout",
            &secs.to_string(),
            "tcpdump",
            "-i",
            "eth0",
            "-nn",
            "-vv",
            "-l",
            filter,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump starts");
    // "listening on eth0, ..." on stderr; the rest of stderr is read (and dropped) by a thread.
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
        line.clear();
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    child
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn translated_packets_carry_valid_checksums_on_the_wire() {
    let f = Fixture::new();
    let ips: Vec<String> = f.cluster.pods.iter().map(|p| p.ip.to_string()).collect();
    f.manifests
        .write("web.yaml", &web_manifest(&ips[..1]))
        .unwrap();
    // veths offload checksums (a capture would show partial ones): real checksums on the wire.
    for ns in [f.cluster.client.path(), f.cluster.pods[0].netns.path()] {
        proxy_tests::host::sh(
            "nsenter",
            &[
                &format!("--net={}", ns.display()),
                "ethtool",
                "-K",
                "eth0",
                "tx",
                "off",
            ],
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    // Requests as the backend receives them (translated), replies as the client does (reversed).
    let at_backend = capture(&f.cluster.pods[0].netns.path(), "tcp or udp", 8);
    let at_client = capture(&f.cluster.client.path(), "tcp or udp", 8);
    let r = f.client("tcp", &format!("{VIP}:80"), 5);
    assert!(r.errors.is_empty(), "{r:?}");
    let r = f.client("udp", &format!("{VIP}:53"), 5);
    assert!(r.errors.is_empty(), "{r:?}");
    for (side, child, addr) in [
        ("backend", at_backend, ips[0].as_str()),
        ("client", at_client, VIP),
    ] {
        let text = String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned();
        let translated = text.matches(addr).count();
        let good = text.matches("(correct)").count() + text.matches("[udp sum ok]").count();
        assert!(
            translated >= 10 && good >= 10,
            "{side}: too few checked packets:\n{text}"
        );
        // tcpdump's words for a wrong TCP, UDP or IP checksum ("bad " alone also matched a
        // checksum value such as "0x4bad ").
        assert!(
            !text.contains("incorrect")
                && !text.contains("bad udp cksum")
                && !text.contains("bad cksum"),
            "{side}: a bad checksum:\n{text}"
        );
    }
}

/// A pod that talks to a Service through the packet path, then to one of its pods directly,
/// reuses source ports the translated connections used (the backend sees the same tuple): its
/// direct connections are its own, and none is hijacked by what those left behind.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn direct_connections_after_translated_ones_on_the_same_ports_are_not_hijacked() {
    let f = Fixture::new();
    let pod = f.cluster.pods[0].ip.to_string();
    f.manifests
        .write("web.yaml", &web_manifest(std::slice::from_ref(&pod)))
        .unwrap();
    let one = [f.cluster.pods[0].ip];
    wait_for(Duration::from_secs(5), || {
        f.backends(80, "TCP").ok().filter(|b| b == &one).map(drop)
    })
    .expect("web:80 programmed with pod-0 alone");
    // The client's ephemeral ports narrowed to 200 (a namespace's own setting), so that 2 s
    // of closed-loop connections through the VIP (connect, read, close with RST) use each
    // several times, and so will the direct connections after them.
    let ns = format!("--net={}", f.cluster.client.path().display());
    let range = "net.ipv4.ip_local_port_range=40000 40199";
    proxy_tests::host::sh("nsenter", &[&ns, "sysctl", "-qw", range]).unwrap();
    // Every port used at least twice: 2 s windows until then (one here; more on a slow,
    // emulated machine), at most 8.
    let mut ops = 0;
    for _ in 0..8 {
        let load = f
            .cluster
            .client_command_unhooked(Path::new(env!("CARGO_BIN_EXE_pxt-load")))
            .args([
                "--mode",
                "tcp",
                "--target",
                &format!("{VIP}:80"),
                "--workers",
                "2",
            ])
            .args(["--warmup-ms", "0", "--duration-ms", "2000"])
            .output()
            .unwrap();
        assert!(
            load.status.success(),
            "{}",
            String::from_utf8_lossy(&load.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&load.stdout).unwrap();
        ops += report["ops"].as_u64().unwrap_or(0);
        if ops > 400 {
            break;
        }
    }
    assert!(ops > 400, "only {ops} connections through the VIP");
    // Then straight to the pod.
    let r = f.client("tcp", &format!("{pod}:{TCP_PORT}"), 20);
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.replies.get("pod-0"), Some(&20), "{r:?}");
    assert!(f.counter("tc_other_flow_passed") > 0);
}

/// A long-lived TCP connection through the packet path keeps working while the agent is
/// killed (SIGKILL) and started again: the datapath and its conntrack are pinned, and the new
/// agent's programs take the flow over, to the same pod (of three).
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn an_established_flow_survives_the_agent_killed_and_started_again() {
    let mut f = Fixture::new();
    let bin = Path::new(env!("CARGO_BIN_EXE_pxt-client"));
    let vip = format!("{VIP}:7");
    // 150 round trips, one every 20 ms: about 3 s.
    let ifaces = ["vpod0", "vpod1", "vpod2", "vclient"];
    let links = |f: &Fixture| ifaces.map(|i| pinned_link(&f.pins, &format!("tc_{i}")));
    let before = links(&f);
    let tcx = tc_attachment(&f.cluster.node, "vclient").is_some_and(|(tcx, _)| tcx);
    assert!(
        !tcx || before.iter().all(Option::is_some),
        "TCX links unpinned: {before:?}"
    );
    let child = client::spawn(&f.cluster, bin, true, "tcp-echo", &vip, 150);
    std::thread::sleep(Duration::from_millis(700));
    f.agent.kill();
    std::thread::sleep(Duration::from_millis(300));
    f.agent = start_agent(&f.cluster, &f.manifests, &f.pins);
    // With TCX, the new program is swapped into the pinned link (the same link id): a
    // second link beside the old one would run both programs on each packet while the
    // agent starts, and the second would forget the flows the first had just translated.
    for ((iface, before), after) in ifaces.iter().zip(before).zip(links(&f)) {
        if let Some((link, prog)) = before {
            let (link_now, prog_now) = after.unwrap_or_else(|| panic!("{iface}: pin gone"));
            assert_eq!(
                link, link_now,
                "{iface}: a new TCX link replaced the pinned one"
            );
            assert_ne!(prog, prog_now, "{iface}: still the old program");
        }
    }
    let r = client::finish(child);
    assert!(r.errors.is_empty(), "{r:?}\n{}", f.agent.log_text());
    assert_eq!(r.replies.get("echo"), Some(&150), "{r:?}");
    assert_eq!(r.peers.keys().collect::<Vec<_>>(), [&vip], "{r:?}");
    // The new agent replaced the program in place: one attachment per interface, whichever
    // way this kernel attaches (TCX, or a clsact filter).
    for ifname in ifaces {
        let (tcx, clsact) = tc_attachment(&f.cluster.node, ifname).expect(ifname);
        assert_eq!(
            usize::from(tcx) + clsact.len(),
            1,
            "{ifname}: tcx={tcx} clsact={clsact:?}"
        );
    }
    // `cleanup` takes it off every interface.
    f.agent.stop();
    let pins = f.pins.path.to_string_lossy().into_owned();
    f.cluster
        .node
        .exec(&agent_bin(), &["cleanup", "--bpffs-dir", &pins])
        .unwrap();
    // (The kernel releases an unpinned link's attachment from a work queue: soon after.)
    for ifname in ifaces {
        wait_for(Duration::from_secs(2), || {
            let now = tc_attachment(&f.cluster.node, ifname).expect("the kernel answers");
            (now == (false, vec![])).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{ifname} still attached after cleanup: {:?}",
                tc_attachment(&f.cluster.node, ifname)
            )
        });
    }
}
