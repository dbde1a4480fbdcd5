//! The agent against the Kubernetes list/watch protocol (the fake API server in
//! `proxy_tests::apiserver`), with a netns mini-cluster as the data plane. Privileged: run
//! with `cargo xtask test`.

use std::{path::Path, time::Duration};

use proxy_tests::{
    agent::{Agent, Manifests, frontends, http_get},
    apiserver::{FakeApiServer, Kind},
    client::{self, Report},
    cluster::{Cluster, TCP_PORT},
    demo::{self, Kubectl},
    host::{BpffsDir, require_root, scaled, wait_for},
    unique,
};
use serde_json::{Value, json};

const VIP: &str = "10.96.0.10";

fn service(name: &str, vip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": vip, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

/// A slice whose endpoints controller saw the change now.
fn slice(service: &str, ips: &[String]) -> Value {
    slice_at(
        service,
        ips,
        &k8s_openapi::jiff::Timestamp::now().to_string(),
    )
}

/// A slice with its `last-change-trigger-time` at `trigger`.
fn slice_at(service: &str, ips: &[String], trigger: &str) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service},
                        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": trigger}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}], "endpoints": eps})
}

/// Drop order: agent, pins, kubeconfig dir, API server, cluster.
struct Fixture {
    agent: Agent,
    pins: BpffsDir,
    _kubeconfig: Manifests,
    api: FakeApiServer,
    cluster: Cluster,
}

impl Fixture {
    fn new(pins: BpffsDir, setup: impl FnOnce(&FakeApiServer, &Cluster)) -> Fixture {
        require_root();
        let cluster = Cluster::new(3, &[]).expect("mini cluster");
        let api = FakeApiServer::start().unwrap();
        setup(&api, &cluster);
        let kubeconfig = Manifests::new().unwrap();
        kubeconfig.write("kubeconfig", &api.kubeconfig()).unwrap();
        let path = kubeconfig.dir.join("kubeconfig");
        let agent = Agent::start_with(
            &["--kubeconfig".as_ref(), path.as_os_str()],
            &cluster.cgroup_path(),
            &pins,
        )
        .expect("agent starts");
        Fixture {
            agent,
            pins,
            _kubeconfig: kubeconfig,
            api,
            cluster,
        }
    }

    fn ips(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|i| self.cluster.pods[*i].ip.to_string())
            .collect()
    }

    fn client(&self, addr: &str, count: u32) -> Report {
        client::run(
            &self.cluster,
            Path::new(env!("CARGO_BIN_EXE_pxt-client")),
            "tcp",
            addr,
            count,
        )
    }

    fn backends(&self, vip: &str) -> Option<Vec<String>> {
        frontends(&self.pins)
            .into_iter()
            .find(|f| f.vip.to_string() == vip && f.port == 80)
            .map(|f| f.backends.iter().map(|b| b.ip.to_string()).collect())
    }

    fn wait_backends(&self, vip: &str, want: &[String], limit: Duration) -> Duration {
        match wait_for(limit, || {
            (self.backends(vip).as_deref() == Some(want)).then_some(())
        }) {
            Some((_, took)) => took,
            None => panic!(
                "{vip} never had {want:?} (has {:?}); agent log:\n{}",
                self.backends(vip),
                self.agent.log_text()
            ),
        }
    }

    fn serves(&self, n: usize) {
        let r = self.client(&format!("{VIP}:80"), 30);
        assert!(r.errors.is_empty() && r.replies.len() == n, "{r:?}");
    }
}

fn web(api: &FakeApiServer, c: &Cluster) {
    api.apply(service("web", VIP));
    api.apply(slice(
        "web",
        &c.pods.iter().map(|p| p.ip.to_string()).collect::<Vec<_>>(),
    ));
}

#[test]
#[ignore = "needs kubectl (installed by `cargo xtask test`)"]
fn kubectl_reads_the_fake_api_server() {
    let api = FakeApiServer::start().unwrap();
    api.apply(service("web", VIP));
    api.apply(slice("web", &["10.1.0.1".into()]));
    let out = std::process::Command::new("kubectl")
        .args(["--server", &api.url(), "get", "svc,endpointslices", "-A"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("service/web") && text.contains("web-abc"),
        "{text}"
    );
    let out = std::process::Command::new("kubectl")
        .args([
            "--server",
            &api.url(),
            "get",
            "svc",
            "web",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        VIP,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `slice` with `metadata.resourceVersion` set (as a file saved from `kubectl get -o yaml`).
fn with_resource_version(slice: &str, rv: &str) -> String {
    slice.replacen(
        "  namespace: default\n",
        &format!("  namespace: default\n  resourceVersion: \"{rv}\"\n"),
        1,
    )
}

/// kubectl's writes get the API server's answers: created, AlreadyExists, replaced (kubectl
/// reads the resourceVersion first), Conflict for a stale one, strict field validation,
/// deleted, NotFound.
#[test]
#[ignore = "needs kubectl (installed by `cargo xtask test`)"]
fn kubectl_writes_get_the_api_servers_answers() {
    let api = FakeApiServer::start().unwrap();
    let k = Kubectl::new(&api).unwrap();
    let ips: Vec<std::net::Ipv4Addr> = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    let svc = k.write("svc.yaml", &demo::service_yaml()).unwrap();
    let slice = k.write("slice.yaml", &demo::slice_yaml(&ips)).unwrap();
    let p = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let out = k.ok(&["create", "-f", &p(&svc), "-f", &p(&slice)]).unwrap();
    assert!(
        out.contains("service/hello created")
            && out.contains("endpointslice.discovery.k8s.io/hello-x1 created"),
        "{out}"
    );
    let stderr = |args: &[&str]| {
        let out = k.run(args).unwrap();
        assert!(!out.status.success(), "kubectl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = stderr(&["create", "-f", &p(&slice)]);
    assert!(
        err.contains("Error from server (AlreadyExists)")
            && err.contains("endpointslices.discovery.k8s.io \"hello-x1\" already exists"),
        "{err}"
    );
    let rv_of = || {
        k.ok(&[
            "get",
            "endpointslice",
            demo::SLICE,
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .unwrap()
    };
    let first = rv_of();

    // No resourceVersion in the file: kubectl reads the current one, the update goes through.
    let fewer = k.write("fewer.yaml", &demo::slice_yaml(&ips[..2])).unwrap();
    let out = k.ok(&["replace", "-f", &p(&fewer)]).unwrap();
    assert!(
        out.contains("endpointslice.discovery.k8s.io/hello-x1 replaced"),
        "{out}"
    );
    assert_ne!(rv_of(), first);
    let addresses = k
        .ok(&[
            "get",
            "endpointslice",
            demo::SLICE,
            "-o",
            "jsonpath={.endpoints[*].addresses[0]}",
        ])
        .unwrap();
    assert_eq!(addresses, "10.1.0.1 10.1.0.2");

    // The resourceVersion read before that update: stale.
    let stale = k
        .write(
            "stale.yaml",
            &with_resource_version(&demo::slice_yaml(&ips[..1]), &first),
        )
        .unwrap();
    let err = stderr(&["replace", "-f", &p(&stale)]);
    assert!(
        err.contains("Error from server (Conflict)")
            && err.contains("Operation cannot be fulfilled on endpointslices.discovery.k8s.io \"hello-x1\": the object has been modified; please apply your changes to the latest version and try again"),
        "{err}"
    );

    // kubectl leaves validation to the server (it found fieldValidation in the OpenAPI).
    let typo = k
        .write(
            "typo.yaml",
            &demo::slice_yaml(&ips).replace("addressType:", "adressType: IPv4\naddressType:"),
        )
        .unwrap();
    let err = stderr(&["replace", "-f", &p(&typo)]);
    assert!(
        err.contains("strict decoding error: unknown field \"adressType\""),
        "{err}"
    );

    let out = k.ok(&["delete", "endpointslice", demo::SLICE]).unwrap();
    assert!(
        out.contains("endpointslice.discovery.k8s.io \"hello-x1\" deleted"),
        "{out}"
    );
    let err = stderr(&["delete", "endpointslice", demo::SLICE]);
    assert!(err.contains("Error from server (NotFound)"), "{err}");

    let counts = api.requests_by_verb();
    for (verb, n) in [
        ("create services", 1),
        ("create endpointslices", 2),
        ("update endpointslices", 3),
        ("delete endpointslices", 2),
    ] {
        assert_eq!(counts.get(verb), Some(&n), "{verb}: {counts:?}");
    }
}

/// The steps of `cargo xtask demo --kube`: the agent follows kubectl's create, replace and
/// delete of the EndpointSlice, and connects follow: spread, on the two left, refused.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn kubectl_create_replace_delete_are_followed() {
    let f = Fixture::new(BpffsDir::new(&unique("bpf")), |_, _| {});
    let k = Kubectl::new(&f.api).unwrap();
    let ips: Vec<std::net::Ipv4Addr> = f.cluster.pods.iter().map(|p| p.ip).collect();
    let p = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
    let svc = p(k.write("svc.yaml", &demo::service_yaml()).unwrap());
    let slice = p(k.write("slice.yaml", &demo::slice_yaml(&ips)).unwrap());
    let fewer = p(k.write("fewer.yaml", &demo::slice_yaml(&ips[..2])).unwrap());

    k.ok(&["create", "-f", &svc, "-f", &slice]).unwrap();
    f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(5));
    f.serves(3);

    k.ok(&["replace", "-f", &fewer]).unwrap();
    f.wait_backends(VIP, &f.ips(&[0, 1]), Duration::from_secs(5));
    let r = f.client(&format!("{VIP}:80"), 30);
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(
        r.replies.keys().collect::<Vec<_>>(),
        ["pod-0", "pod-1"],
        "only the endpoints left answer"
    );

    k.ok(&["delete", "endpointslice", demo::SLICE]).unwrap();
    f.wait_backends(VIP, &[], Duration::from_secs(5));
    let r = f.client(&format!("{VIP}:80"), 10);
    r.assert_failed_at_once(client::socket_refusals().0, 10);
    let counts = f.api.requests_by_verb();
    assert_eq!(counts.get("update endpointslices"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("delete endpointslices"), Some(&1), "{counts:?}");
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_agent_follows_creates_updates_and_deletes() {
    let f = Fixture::new(BpffsDir::new(&unique("bpf")), web);
    f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(5));
    f.serves(3);

    f.api.apply(slice("web", &f.ips(&[0, 2])));
    let took = f.wait_backends(VIP, &f.ips(&[0, 2]), Duration::from_secs(5));
    assert!(
        took < scaled(Duration::from_secs(1)),
        "an endpoint change took {took:?}"
    );
    f.serves(2);

    f.api.apply(service("other", "10.96.0.20"));
    f.api.apply(slice("other", &f.ips(&[1])));
    f.wait_backends("10.96.0.20", &f.ips(&[1]), Duration::from_secs(2));
    let r = f.client("10.96.0.20:80", 5);
    assert_eq!(r.replies.get("pod-1"), Some(&5), "{r:?}");

    f.api.delete(Kind::Service, "default", "other");
    wait_for(Duration::from_secs(2), || {
        f.backends("10.96.0.20").is_none().then_some(())
    })
    .expect("deleted Service removed");

    // Services kube-proxy does not proxy are skipped (selector on the watch).
    let mut headless = service("h", "10.96.0.30");
    headless["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    f.api.apply(headless);
    std::thread::sleep(Duration::from_millis(400));
    assert!(f.backends("10.96.0.30").is_none());
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn api_faults_never_touch_the_datapath_and_the_agent_converges() {
    let f = Fixture::new(BpffsDir::new(&unique("bpf")), web);
    f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(5));

    // Watches dropped (an API server restart): a change made meanwhile still arrives.
    f.api.drop_watches();
    f.serves(3);
    f.api.apply(slice("web", &f.ips(&[0, 1])));
    f.wait_backends(VIP, &f.ips(&[0, 1]), Duration::from_secs(10));

    // 500s for 3 s: the datapath keeps serving; the change made during the outage converges.
    f.api.fail_for(Duration::from_secs(3));
    f.serves(2);
    f.api.apply(slice("web", &f.ips(&[1, 2])));
    std::thread::sleep(Duration::from_millis(500));
    f.serves(2);
    f.wait_backends(VIP, &f.ips(&[1, 2]), Duration::from_secs(30));

    // History compacted (410 Gone on resume): the reflectors relist and converge.
    f.api.apply(slice("web", &f.ips(&[2])));
    f.api.expire_history();
    f.wait_backends(VIP, &f.ips(&[2]), Duration::from_secs(30));
    f.serves(1);
    let log = f.agent.log_text();
    assert!(
        log.contains("watch failed"),
        "the outage was not noticed:\n{log}"
    );
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn start_converges_on_the_pinned_maps_without_rewriting_live_entries() {
    require_root();
    // A datapath left by an earlier agent (manifests source) with two Services.
    let pins = BpffsDir::new(&unique("bpf"));
    let cluster_for_ips = ["10.200.0.10", "10.200.0.11", "10.200.0.12"];
    let m = Manifests::new().unwrap();
    let to_yaml = |v: Value| serde_json::to_string(&v).unwrap();
    let ips: Vec<String> = cluster_for_ips
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    m.write("a.json", &to_yaml(service("web", VIP))).unwrap();
    m.write("b.json", &to_yaml(slice("web", &ips))).unwrap();
    m.write("c.json", &to_yaml(service("stale", "10.96.0.99")))
        .unwrap();
    let cluster = Cluster::new(3, &[]).unwrap();
    assert_eq!(
        cluster
            .pods
            .iter()
            .map(|p| p.ip.to_string())
            .collect::<Vec<_>>(),
        ips
    );
    let mut first = Agent::start(&m.dir, &cluster.cgroup_path(), &pins).unwrap();
    wait_for(Duration::from_secs(5), || {
        (frontends(&pins).len() == 2).then_some(())
    })
    .unwrap();
    let web_before = frontends(&pins)
        .into_iter()
        .find(|f| f.vip.to_string() == VIP)
        .unwrap();
    first.stop();
    drop(cluster);

    let f = Fixture::new(pins, web);
    // The stale Service is gone; the live one kept its entries (same rev-NAT id, same backends).
    wait_for(Duration::from_secs(5), || {
        (frontends(&f.pins).len() == 1).then_some(())
    })
    .expect("stale frontend removed");
    let web_after = frontends(&f.pins)
        .into_iter()
        .find(|x| x.vip.to_string() == VIP)
        .unwrap();
    assert_eq!(web_after, web_before);
    f.serves(3);
}

#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn health_and_metrics_report_the_agent_and_the_datapath() {
    let f = Fixture::new(BpffsDir::new(&unique("bpf")), |api, c| {
        web(api, c);
        api.apply(service("bad", "10.96.0.999"));
    });
    f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(5));
    let (code, body) = http_get(&f.agent.health_addr, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"healthy\":true"), "{body}");
    assert_eq!(http_get(&f.agent.health_addr, "/livez").0, 200);
    f.serves(3);

    // A write caused by a change from before the agent started is not a programming latency.
    f.api
        .apply(slice_at("web", &f.ips(&[0]), "2026-01-01T00:00:00Z"));
    f.wait_backends(VIP, &f.ips(&[0]), Duration::from_secs(5));
    // A fresh change is counted once.
    f.api.apply(slice("web", &f.ips(&[0, 1])));
    f.wait_backends(VIP, &f.ips(&[0, 1]), Duration::from_secs(5));
    let (code, text) = http_get(&f.agent.metrics_addr, "/metrics");
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    assert_eq!(value("proxy_frontends_programmed "), 1.0);
    assert_eq!(value("proxy_backends_programmed "), 2.0);
    assert!(value("proxy_datapath_events_total{reason=\"connect_translated\"}") >= 30.0);
    assert_eq!(
        value("proxy_objects_rejected_total{reason=\"invalid_ip\"}"),
        1.0
    );
    assert!(value("proxy_sync_proxy_rules_duration_seconds_count{kind=\"full\"}") >= 1.0);
    assert!(value("proxy_sync_proxy_rules_duration_seconds_count{kind=\"partial\"}") >= 1.0);
    assert!(value("proxy_network_programming_duration_seconds_count") >= 1.0);
    assert_eq!(
        value("proxy_network_programming_duration_seconds_count "),
        1.0,
        "{text}"
    );
    assert!(
        value("proxy_network_programming_duration_seconds_sum ") < 5.0,
        "{text}"
    );
    assert!(value("proxy_map_fill_ratio{map=\"PROXY_SVC_V1\"}") > 0.0);
    // kube-proxy's: the two Services and the slice's three versions, each taken by a sync;
    // nothing pending once synced; the sync times; /healthz answered.
    assert!(
        value("proxy_sync_proxy_rules_service_changes_total ") >= 2.0,
        "{text}"
    );
    assert!(
        value("proxy_sync_proxy_rules_endpoint_changes_total ") >= 3.0,
        "{text}"
    );
    assert_eq!(
        value("proxy_sync_proxy_rules_endpoint_changes_pending "),
        0.0
    );
    assert_eq!(
        value("proxy_sync_proxy_rules_service_changes_pending "),
        0.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let synced = value("proxy_sync_proxy_rules_last_timestamp_seconds ");
    let queued = value("proxy_sync_proxy_rules_last_queued_timestamp_seconds ");
    assert!(
        now - synced < 60.0 && now - queued < 60.0,
        "{synced} {queued} {now}"
    );
    assert!(
        value("proxy_proxy_healthz_total{code=\"200\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        value("proxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"internal\"}"),
        0.0
    );
    // What the kernel offers, as probed here too.
    use proxy_agent::features::{Feature, Features};
    let probed = Features::probe();
    for f in Feature::ALL {
        let want = if probed.has(f) { 1.0 } else { 0.0 };
        assert_eq!(
            value(&format!("proxy_datapath_feature{{name=\"{}\"}}", f.name())),
            want,
            "{}",
            f.name()
        );
    }
}

/// A slice for `service` whose endpoints each hint one zone.
fn zoned_slice(service: &str, ips: &[(String, &str)]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|(ip, zone)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                                 "nodeName": "node-b", "zone": zone,
                                 "hints": {"forZones": [{"name": zone}]}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}],
           "endpoints": eps})
}

fn node(zone: &str, deleting: bool) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": zone}}});
    if deleting {
        n["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
    }
    n
}

fn metric(f: &Fixture, name: &str) -> f64 {
    let (_, text) = http_get(&f.agent.metrics_addr, "/metrics");
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Deletes made while the watches were down reach the datapath: the watch that resumes gets
/// 410 Gone, the relist is compared with what the agent holds, and what it no longer names
/// is removed. Endpoint changes keep coming during the relist; the last one wins.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_relist_after_410_loses_no_delete_and_converges_while_endpoints_change() {
    let f = Fixture::new(BpffsDir::new(&unique("bpf")), |api, c| {
        web(api, c);
        api.apply(service("other", "10.96.0.20"));
        api.apply(slice("other", &[c.pods[1].ip.to_string()]));
    });
    f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(5));
    f.wait_backends("10.96.0.20", &f.ips(&[1]), Duration::from_secs(5));

    // The gap: every request fails; meanwhile "other" is deleted and web changes; then the
    // history is compacted, so resuming is a 410 and a relist.
    f.api.fail_for(Duration::from_secs(2));
    f.api.delete(Kind::Service, "default", "other");
    f.api.delete(Kind::EndpointSlice, "default", "other-abc");
    f.api.apply(slice("web", &f.ips(&[0])));
    f.api.expire_history();
    // Endpoint changes during the relist.
    for i in 0..20 {
        f.api.apply(slice("web", &f.ips(&[i % 3])));
        std::thread::sleep(Duration::from_millis(100));
    }
    f.api.apply(slice("web", &f.ips(&[1, 2])));
    wait_for(Duration::from_secs(30), || {
        f.backends("10.96.0.20").is_none().then_some(())
    })
    .unwrap_or_else(|| panic!("a delete during the gap was lost:\n{}", f.agent.log_text()));
    f.wait_backends(VIP, &f.ips(&[1, 2]), Duration::from_secs(30));
    f.serves(2);
    assert!(metric(&f, "proxy_kube_relists_total{resource=\"services\"}") >= 1.0);
    assert!(
        metric(
            &f,
            "proxy_kube_watch_errors_total{resource=\"endpointslices\"}"
        ) >= 1.0
    );
}

/// This Node's zone label is followed: topology hints are evaluated again when it changes.
/// Its deletion timestamp makes /healthz answer 503 (kube-proxy's rule: load balancers stop
/// sending here), while /livez stays 200 (the kubelet must not restart the agent for it).
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_node_zone_and_deletion_are_followed() {
    let f = Fixture::new(BpffsDir::new(&unique("bpf")), |api, c| {
        api.apply(node("z1", false));
        api.apply(service("web", VIP));
        let ips: Vec<String> = c.pods.iter().map(|p| p.ip.to_string()).collect();
        api.apply(zoned_slice(
            "web",
            &[
                (ips[0].clone(), "z1"),
                (ips[1].clone(), "z2"),
                (ips[2].clone(), "z2"),
            ],
        ));
    });
    f.wait_backends(VIP, &f.ips(&[0]), Duration::from_secs(5));
    f.api.apply(node("z2", false));
    f.wait_backends(VIP, &f.ips(&[1, 2]), Duration::from_secs(5));
    f.serves(2);
    assert_eq!(http_get(&f.agent.health_addr, "/healthz").0, 200);

    f.api.apply(node("z2", true));
    let (code, body) = wait_for(Duration::from_secs(5), || {
        let (code, body) = http_get(&f.agent.health_addr, "/healthz");
        (code == 503).then_some((code, body))
    })
    .map(|(r, _)| r)
    .unwrap_or_else(|| panic!("/healthz never failed:\n{}", f.agent.log_text()));
    assert_eq!(code, 503);
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    assert_eq!(http_get(&f.agent.health_addr, "/livez").0, 200);
    f.serves(2);

    // The deletion cancelled, then the Node deleted outright: eligible, then not.
    let healthz_is = |want: u16| {
        wait_for(Duration::from_secs(5), || {
            (http_get(&f.agent.health_addr, "/healthz").0 == want).then_some(())
        })
        .unwrap_or_else(|| panic!("/healthz never {want}:\n{}", f.agent.log_text()));
    };
    f.api.apply(node("z2", false));
    healthz_is(200);
    f.api.delete(Kind::Node, "", "node-a");
    healthz_is(503);
    assert_eq!(http_get(&f.agent.health_addr, "/livez").0, 200);
    // Its zone gone with it, hints no longer apply: every endpoint serves.
    f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(5));
    f.serves(3);
}

/// An agent still waiting for its first lists (the API server failing) stops at once on
/// SIGTERM, as a pod being deleted must.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn sigterm_during_the_first_lists_stops_the_agent() {
    require_root();
    let cluster = Cluster::new(1, &[]).expect("mini cluster");
    let pins = BpffsDir::new(&unique("bpf"));
    let api = FakeApiServer::start().unwrap();
    api.fail_for(Duration::from_secs(60));
    let kubeconfig = Manifests::new().unwrap();
    kubeconfig.write("kubeconfig", &api.kubeconfig()).unwrap();
    let path = kubeconfig.dir.join("kubeconfig");
    let mut agent = Agent::spawn_in(
        None,
        &["--kubeconfig".as_ref(), path.as_os_str()],
        &cluster.cgroup_path(),
        &pins,
    )
    .expect("agent starts");
    wait_for(Duration::from_secs(30), || {
        agent.log_text().contains("datapath attached").then_some(())
    })
    .unwrap_or_else(|| panic!("the agent never attached:\n{}", agent.log_text()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!agent.log_text().contains(" ready"), "{}", agent.log_text());
    assert!(
        agent.terminate_within(Duration::from_secs(3)),
        "SIGTERM ignored while waiting for the lists:\n{}",
        agent.log_text()
    );
}

/// What one agent costs the API server: at start, one streaming-list watch per resource
/// (served from the watch cache), and nothing more while nothing changes (bookmarks arrive
/// on the open watches). A server without streaming lists gets one resourceVersion=0 list and
/// one watch per resource after the refused attempt.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn requests_per_start() {
    for refuse in [false, true] {
        let f = Fixture::new(BpffsDir::new(&unique("bpf")), |api, c| {
            api.refuse_streaming_lists(refuse);
            api.apply(node("z1", false));
            web(api, c);
            for i in 0..300 {
                let name = format!("s{i}");
                api.apply(service(
                    &name,
                    &format!("10.97.{}.{}", i / 200, i % 200 + 1),
                ));
                api.apply(slice(&name, &[c.pods[i % 3].ip.to_string()]));
            }
        });
        f.wait_backends(VIP, &f.ips(&[0, 1, 2]), Duration::from_secs(10));
        f.wait_backends("10.97.1.100", &f.ips(&[299 % 3]), Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(3));
        let counts = f.api.requests_by_verb();
        let want: std::collections::BTreeMap<String, u64> = ["services", "endpointslices", "nodes"]
            .iter()
            .flat_map(|r| {
                if refuse {
                    vec![
                        (format!("watch-list {r}"), 1),
                        (format!("list {r}"), 1),
                        (format!("watch {r}"), 1),
                    ]
                } else {
                    vec![(format!("watch-list {r}"), 1)]
                }
            })
            .collect();
        assert_eq!(counts, want, "refuse streaming lists: {refuse}");
        f.serves(3);
    }
}
