//! Privileged end to end: the programs' slow-path log (`--bpf-log-level`), forwarded into
//! the agent's output; off by default; changed on a running agent without reloading the
//! programs (`proxy-agent bpf-log-level`). Run by `cargo xtask test` (as root).

use std::{path::Path, time::Duration};

use proxy_tests::{
    agent::{Agent, Manifests, cli, frontends, pinned_link},
    client::{self, Report},
    cluster::Cluster,
    host::{BpffsDir, require_root, scaled, wait_for},
    unique,
};

/// A Service with no usable endpoint (its only endpoint is neither ready nor serving), and
/// one with `internalTrafficPolicy: Local` whose endpoint is on another node.
const FILES: &[(&str, &str)] = &[
    (
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\nspec:\n  clusterIP: 10.96.0.11\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: empty-1\n  namespace: default\n  labels: {kubernetes.io/service-name: empty}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]\nendpoints:\n- addresses: [\"10.200.0.10\"]\n  conditions: {ready: false, serving: false}\n",
    ),
    (
        "local.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: local, namespace: default}\nspec:\n  clusterIP: 10.96.0.12\n  internalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: local-1\n  namespace: default\n  labels: {kubernetes.io/service-name: local}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- addresses: [\"10.200.0.10\"]\n  nodeName: node-b\n",
    ),
];

/// Drop order is field order: agent stops, pins go, then the manifests and the cluster.
struct Fixture {
    agent: Agent,
    pins: BpffsDir,
    _manifests: Manifests,
    cluster: Cluster,
}

impl Fixture {
    /// The agent with `args` (after `--manifests DIR`) on a one-pod cluster, programmed.
    fn new(args: &[&str]) -> Fixture {
        require_root();
        let cluster = Cluster::new(1, &[]).expect("mini cluster");
        let manifests = Manifests::new().unwrap();
        for (name, text) in FILES {
            manifests.write(name, text).unwrap();
        }
        let pins = BpffsDir::new(&unique("bpf"));
        let mut all = vec![
            std::ffi::OsStr::new("--manifests"),
            manifests.dir.as_os_str(),
        ];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        let agent = Agent::start_with(&all, &cluster.cgroup_path(), &pins).expect("agent starts");
        wait_for(Duration::from_secs(5), || {
            (frontends(&pins).len() == 3).then_some(())
        })
        .unwrap_or_else(|| panic!("not programmed; agent log:\n{}", agent.log_text()));
        Fixture {
            agent,
            pins,
            _manifests: manifests,
            cluster,
        }
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

    /// `proxy-agent bpf-log-level ARGS --bpffs-dir <pins>`, which must succeed: its stdout.
    fn level_cli(&self, args: &[&str]) -> String {
        let mut all = vec!["bpf-log-level"];
        all.extend_from_slice(args);
        cli(&self.pins, &all)
    }

    /// The agent's log lines from the programs (target `bpf`) that contain every one of
    /// `parts`, waiting up to `bound` for one.
    fn wait_line(&self, bound: Duration, parts: &[&str]) -> Option<String> {
        wait_for(bound, || {
            self.agent
                .log_text()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_string)
        })
        .map(|(line, _)| line)
    }

    /// The ids of the socket programs' pinned links and of the programs they run.
    fn program_ids(&self) -> Vec<Option<(u32, u32)>> {
        ["proxy_connect4", "proxy_sendmsg4", "proxy_recvmsg4"]
            .iter()
            .map(|p| pinned_link(&self.pins, p))
            .collect()
    }
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn bpf_log_is_off_by_default_and_a_level_change_needs_no_reload() {
    let f = Fixture::new(&[]);
    let (refused, _) = client::socket_refusals();
    assert_eq!(f.level_cli(&[]).trim(), "off");

    // Off: refused connects are counted, and logged by nobody.
    f.client("tcp", "10.96.0.11:80", 3)
        .assert_failed_at_once(refused, 3);
    let quiet = f.wait_line(Duration::from_secs(1), &["no_endpoints_rejected"]);
    assert_eq!(quiet, None, "a record with logging off");
    assert!(
        !f.agent.log_text().contains(" bpf: "),
        "no forwarded line with logging off:\n{}",
        f.agent.log_text()
    );

    // On, in the running agent: the same programs, and their records appear.
    let before = f.program_ids();
    assert!(before.iter().all(Option::is_some), "{before:?}");
    let said = f.level_cli(&["info"]);
    assert!(said.contains("info (was off)"), "{said}");
    assert_eq!(f.level_cli(&[]).trim(), "info");
    f.client("tcp", "10.96.0.11:80", 1)
        .assert_failed_at_once(refused, 1);
    let line = f
        .wait_line(
            Duration::from_secs(5),
            &[
                " bpf: ",
                "program=proxy_connect4",
                "event=no_endpoints_rejected",
                "frontend=10.96.0.11:80/tcp",
            ],
        )
        .unwrap_or_else(|| panic!("no forwarded line; agent log:\n{}", f.agent.log_text()));
    assert!(line.contains("INFO"), "{line}");
    assert_eq!(f.program_ids(), before, "the programs were not reloaded");

    // Off again: nothing more.
    f.level_cli(&["off"]);
    let seen = f
        .agent
        .log_text()
        .matches("event=no_endpoints_rejected")
        .count();
    f.client("tcp", "10.96.0.11:80", 2)
        .assert_failed_at_once(refused, 2);
    std::thread::sleep(scaled(Duration::from_secs(1)));
    assert_eq!(
        f.agent
            .log_text()
            .matches("event=no_endpoints_rejected")
            .count(),
        seen,
        "records after the level went off"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn bpf_log_level_info_forwards_refusals_with_structured_fields_in_json() {
    let mut f = Fixture::new(&["--bpf-log-level", "info", "--log-format", "json"]);
    let (refused, no_local) = client::socket_refusals();
    f.client("tcp", "10.96.0.11:80", 1)
        .assert_failed_at_once(refused, 1);
    f.client("udp-connected", "10.96.0.11:53", 1)
        .assert_failed_at_once(refused, 1);
    f.client("tcp", "10.96.0.12:80", 1)
        .assert_failed_at_once(no_local, 1);

    let record = |event: &str, frontend: &str| -> serde_json::Value {
        let line = f
            .wait_line(
                Duration::from_secs(5),
                &[
                    "\"target\":\"bpf\"",
                    &format!("\"event\":\"{event}\""),
                    &format!("\"frontend\":\"{frontend}\""),
                ],
            )
            .unwrap_or_else(|| {
                panic!(
                    "no {event} record for {frontend}; agent log:\n{}",
                    f.agent.log_text()
                )
            });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let r = record("no_endpoints_rejected", "10.96.0.11:80/tcp");
    assert_eq!(r["level"], "INFO", "{r}");
    assert_eq!(r["program"], "proxy_connect4", "{r}");
    assert_eq!(
        r["message"],
        proxy_common::Counter::NoEndpointsRejected.help(),
        "{r}"
    );
    assert!(r["timestamp"].is_string(), "{r}");
    record("no_endpoints_rejected", "10.96.0.11:53/udp");
    let r = record("no_local_endpoints_rejected", "10.96.0.12:80/tcp");
    assert_eq!(r["program"], "proxy_connect4", "{r}");

    // Stopped, the agent reads no more records: the programs, which stay, build none.
    assert_eq!(f.level_cli(&[]).trim(), "info");
    f.agent.stop();
    assert_eq!(f.level_cli(&[]).trim(), "off");
}
