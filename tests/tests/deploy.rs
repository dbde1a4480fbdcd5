//! `deploy/` parses into the Kubernetes API types, and says what a node agent needs.
use std::{collections::BTreeMap, fs, path::Path};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// Every document of every YAML file in deploy/, by kind (kustomization.yaml apart).
fn documents() -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for entry in fs::read_dir(deploy_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml")
            || path.ends_with("kustomization.yaml")
        {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = v["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()))
                .to_string();
            out.entry(kind).or_default().push(v);
        }
    }
    out
}

fn one<T: serde::de::DeserializeOwned>(docs: &BTreeMap<String, Vec<Value>>, kind: &str) -> T {
    let v = docs
        .get(kind)
        .and_then(|v| v.first())
        .unwrap_or_else(|| panic!("no {kind} in deploy/"));
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object_and_kustomize_lists_it() {
    let docs = documents();
    let _: Namespace = one(&docs, "Namespace");
    let _: ConfigMap = one(&docs, "ConfigMap");
    let kustomization: Value =
        yaml_serde::from_str(&fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap())
            .unwrap();
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for entry in fs::read_dir(deploy_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is not in kustomization.yaml"
            );
        }
    }
    for r in listed {
        assert!(
            deploy_dir().join(r).exists(),
            "kustomization lists missing {r}"
        );
    }
}

#[test]
fn the_daemonset_runs_a_privileged_node_agent_with_probes_and_host_mounts() {
    let docs = documents();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let c = &pod.containers[0];
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let node_name = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );

    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (
            g.path.clone().unwrap(),
            serde_json::to_value(&g.port).unwrap(),
        )
    };
    assert_eq!(
        probe(&c.liveness_probe),
        ("/livez".into(), Value::from(10256))
    );
    assert_eq!(
        probe(&c.readiness_probe),
        ("/healthz".into(), Value::from(10256))
    );

    let volumes = pod.volumes.unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = c.volume_mounts.as_ref().unwrap();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.mount_path.clone())
            .unwrap()
    };
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(mount("bpffs"), "/sys/fs/bpf");
    assert_eq!(host_path("cgroup").as_deref(), Some("/sys/fs/cgroup"));
    let args = c.args.clone().unwrap();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .map(str::to_string)
            .unwrap()
    };
    assert_eq!(
        arg("--cgroup"),
        mount("cgroup"),
        "the agent attaches to the mounted host cgroup root"
    );
    assert!(
        arg("--bpffs-dir").starts_with(&mount("bpffs")),
        "pins live on the host's bpffs"
    );
    assert!(arg("--health-addr").ends_with(":10256"));

    // The agent binary accepts these arguments (it fails later, on the missing source dir).
    let bin = proxy_tests::agent::agent_bin();
    let out = std::process::Command::new(&bin)
        .args(&args)
        .args(["--manifests", "/nonexistent/dir"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/dir"),
        "{}: {err}",
        bin.display()
    );
}

#[test]
fn rbac_grants_read_only_access_to_what_the_agent_watches() {
    let docs = documents();
    let role: ClusterRole = one(&docs, "ClusterRole");
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    let sa: ServiceAccount = one(&docs, "ServiceAccount");
    let mut granted: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for rule in role.rules.unwrap() {
        for g in rule.api_groups.clone().unwrap_or_default() {
            for r in rule.resources.clone().unwrap_or_default() {
                granted.insert((g.clone(), r), rule.verbs.clone());
            }
        }
    }
    let read = vec!["get".to_string(), "list".into(), "watch".into()];
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        assert_eq!(
            granted.get(&(group.into(), resource.into())),
            Some(&read),
            "{group}/{resource}"
        );
    }
    assert_eq!(granted.len(), 3, "nothing else is granted: {granted:?}");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), Some(subject.name.clone())),
        ("ServiceAccount", sa.metadata.name.clone())
    );
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn the_dockerfile_builds_the_agent_in_stages() {
    let text = fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert_eq!(
        text.lines().filter(|l| l.starts_with("FROM ")).count(),
        2,
        "build and runtime stages"
    );
    assert!(text.contains("cargo build --release -p proxy-agent"));
    assert!(text.contains("bpf-linker"));
    assert!(text.contains("COPY --from=build /src/target/release/proxy-agent"));
}

/// `kubectl kustomize` of `deploy/` as a user turns one of its Components on: a copy, with the
/// component's commented line enabled. The rendered documents.
fn render_with(component: &str) -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |from: &Path, to: &Path| {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let path = e.unwrap().path();
            if path.is_file() {
                fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
            }
        }
    };
    copy(deploy_dir(), tmp.path());
    copy(&deploy_dir().join(component), &tmp.path().join(component));
    let k = fs::read_to_string(tmp.path().join("kustomization.yaml")).unwrap();
    let commented = "# components:\n# - capabilities\n# - monitoring";
    assert!(k.contains(commented), "{k}");
    let k = k.replace(commented, &format!("components:\n- {component}"));
    fs::write(tmp.path().join("kustomization.yaml"), k).unwrap();
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(tmp.path())
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

/// `deploy/` with the `capabilities` Component on renders the same objects, with the DaemonSet
/// unprivileged: every capability dropped but exactly those the agent needs (which
/// `the_agent_runs_with_only_the_capabilities_it_documents` runs it with), and the bpffs
/// mount without the propagation only privileged containers may have.
#[test]
#[ignore = "needs kubectl (installed by `cargo xtask test`)"]
fn the_capabilities_variant_grants_exactly_what_the_agent_needs() {
    let docs = render_with("capabilities");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let ds: DaemonSet =
        serde_json::from_value((docs.iter().find(|d| d["kind"] == "DaemonSet").cloned()).unwrap())
            .unwrap();
    let c = &ds.spec.template.spec.unwrap().containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let mut add = caps.add.clone().unwrap();
    add.sort();
    let mut want: Vec<String> = (proxy_tests::agent::AGENT_CAPABILITIES.iter())
        .map(ToString::to_string)
        .collect();
    want.sort();
    assert_eq!(add, want);
    let bpffs = (c.volume_mounts.as_ref().unwrap().iter())
        .find(|m| m.name == "bpffs")
        .unwrap();
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert!(c.args.as_ref().unwrap().contains(&"run".to_string()));
}

/// Every metric name in an expression of the dashboard (`proxy_...`, a histogram's
/// `_bucket`, `_sum` and `_count` as its name).
fn dashboard_metrics() -> Vec<String> {
    fn exprs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e);
                }
                m.values().for_each(|v| exprs(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let text = fs::read_to_string(deploy_dir().join("monitoring/grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    assert!(found.len() >= 8, "{found:?}");
    let mut names = Vec::new();
    for e in found {
        let mut rest = e;
        while let Some(at) = rest.find("proxy_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            names.push(base.to_string());
        }
    }
    names
}

/// The dashboard queries only metrics the agent exports, and shows what an operator looks
/// at first: sync duration, programming latency, frontends and backends, rejections, datapath
/// events, conntrack and map fill.
#[test]
fn the_dashboard_queries_only_metrics_the_agent_exports() {
    let exported = proxy_agent::metrics::every_metric_name();
    let queried = dashboard_metrics();
    for name in &queried {
        assert!(
            exported.contains(name),
            "{name} is not a metric the agent exports"
        );
    }
    // Every label a query groups by or a legend shows: the agent's, or the target's.
    let mut labels = proxy_agent::metrics::every_metric_label();
    labels.extend(["instance", "job", "pod", "namespace"].map(String::from));
    let text = fs::read_to_string(deploy_dir().join("monitoring/grafana-dashboard.json")).unwrap();
    let mut used = Vec::new();
    for (open, close) in [("by (", ")"), ("{{", "}}")] {
        let mut rest = text.as_str();
        while let Some(at) = rest.find(open) {
            rest = &rest[at + open.len()..];
            let inner = &rest[..rest.find(close).unwrap()];
            used.extend(inner.split(',').map(|l| l.trim().to_string()));
        }
    }
    assert!(used.len() > 10, "{used:?}");
    for l in &used {
        assert!(
            labels.contains(l),
            "label {l} is not one the metrics carry: {labels:?}"
        );
    }
    for want in [
        "proxy_sync_proxy_rules_duration_seconds",
        "proxy_network_programming_duration_seconds",
        "proxy_frontends_programmed",
        "proxy_backends_programmed",
        "proxy_objects_rejected_total",
        "proxy_datapath_events_total",
        "proxy_conntrack_entries",
        "proxy_map_fill_ratio",
    ] {
        assert!(queried.iter().any(|n| n == want), "no panel shows {want}");
    }
}

/// The PodMonitor scrapes the DaemonSet's `metrics` port, which serves /metrics on all
/// addresses (the agent's default is loopback).
#[test]
fn the_pod_monitor_scrapes_the_metrics_port() {
    let text = fs::read_to_string(deploy_dir().join("monitoring/podmonitor.yaml")).unwrap();
    let pm: Value = yaml_serde::from_str(&text).unwrap();
    assert_eq!(pm["kind"], "PodMonitor");
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    let ds: DaemonSet = one(&documents(), "DaemonSet");
    let spec = ds.spec.template.spec.clone().unwrap();
    let c = &spec.containers[0];
    let declared = c.ports.as_ref().unwrap();
    let metrics = declared
        .iter()
        .find(|p| p.name.as_deref() == Some(port))
        .unwrap_or_else(|| panic!("no container port named {port}"));
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.contains(&format!(
            "--metrics-addr=0.0.0.0:{}",
            metrics.container_port
        )),
        "{args:?}"
    );
    // A PodMonitor selects pods: the pod template's labels.
    let labels = (ds.spec.template.metadata)
        .and_then(|m| m.labels)
        .unwrap_or_default();
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(labels.get(k).map(String::as_str), v.as_str(), "{k}");
    }
}

/// `deploy/` with the `monitoring` Component on renders the PodMonitor and the dashboard's
/// ConfigMap, labelled for Grafana's sidecar.
#[test]
#[ignore = "needs kubectl (installed by `cargo xtask test`)"]
fn the_monitoring_component_renders_a_pod_monitor_and_the_dashboard() {
    let docs = render_with("monitoring");
    assert!(docs.iter().any(|d| d["kind"] == "PodMonitor"), "{docs:?}");
    let cm = (docs.iter())
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "proxy-agent-dashboard")
        .unwrap_or_else(|| panic!("{docs:?}"));
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = cm["data"]["grafana-dashboard.json"].as_str().unwrap();
    let _: Value = serde_json::from_str(json).unwrap();
}
