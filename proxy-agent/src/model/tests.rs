//! Table-driven model tests. Inputs are written as the JSON a user or the API server would
//! send; cases follow kube-proxy's endpointslicecache and ServiceChangeTracker tests.
use serde_json::{Value, json};

use super::*;

fn sourced<T: serde::de::DeserializeOwned>(v: Value) -> Sourced<T> {
    Sourced {
        origin: Arc::from("test.yaml"),
        object: Arc::new(serde_json::from_value(v).expect("valid test object")),
    }
}

fn svc(name: &str, ip: &str, ports: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"clusterIP": ip, "ports": ports}})
}

fn slice(name: &str, svc: &str, ports: Value, endpoints: Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": name, "namespace": "default",
                        "labels": {"kubernetes.io/service-name": svc}},
           "ports": ports, "endpoints": endpoints})
}

fn ep(ip: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-b"})
}

fn with(mut v: Value, path: &[&str], value: Value) -> Value {
    let mut cur = &mut v;
    for p in &path[..path.len() - 1] {
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(p.to_string())
            .or_insert(json!({}));
    }
    cur[path[path.len() - 1]] = value;
    v
}

#[derive(Default)]
struct Case {
    name: &'static str,
    services: Vec<Value>,
    slices: Vec<Value>,
    nodes: Vec<Value>,
    /// "vip:port/PROTO" -> sorted backends "ip:port"; a leading "!" marks no_local_endpoints.
    want: &'static [(&'static str, &'static [&'static str])],
    /// (field, reason) of every expected problem, in order.
    problems: &'static [(&'static str, ProblemReason)],
    held: &'static [&'static str],
    held_services: &'static [&'static str],
}

fn run(cases: Vec<Case>) {
    for c in cases {
        let objects = Objects {
            services: c.services.into_iter().map(sourced).collect(),
            slices: c.slices.into_iter().map(sourced).collect(),
            nodes: c.nodes.into_iter().map(sourced).collect(),
        };
        let d = build(&objects, "node-a");
        let got: Vec<(String, Vec<String>)> = d
            .frontends
            .iter()
            .map(|(f, s)| {
                let mut key = f.to_string();
                if s.no_local_endpoints {
                    key.insert(0, '!');
                }
                (
                    key,
                    s.backends
                        .iter()
                        .map(|b| format!("{}:{}", b.ip, b.port))
                        .collect(),
                )
            })
            .collect();
        let want: Vec<(String, Vec<String>)> = c
            .want
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(got, want, "case {:?}: frontends", c.name);
        let problems: Vec<(String, ProblemReason)> = d
            .problems
            .iter()
            .map(|p| (p.field.clone(), p.reason))
            .collect();
        let want_p: Vec<(String, ProblemReason)> = c
            .problems
            .iter()
            .map(|(f, r)| (f.to_string(), *r))
            .collect();
        assert_eq!(
            problems, want_p,
            "case {:?}: problems {:?}",
            c.name, d.problems
        );
        let held: Vec<String> = d.held_vips.iter().map(|v| v.to_string()).collect();
        assert_eq!(held, c.held, "case {:?}: held VIPs", c.name);
        let held_svcs: Vec<String> = d.held_services.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            held_svcs, c.held_services,
            "case {:?}: held Services",
            c.name
        );
    }
}

fn http() -> Value {
    json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}])
}
fn http_slice_port() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

#[test]
fn translation_follows_kube_proxy() {
    run(vec![
        Case {
            name: "basic: three ready endpoints, sorted",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([ep("10.1.0.3"), ep("10.1.0.1"), ep("10.1.0.2")]),
            )],
            want: &[(
                "10.96.0.10:80/TCP",
                &["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"],
            )],
            ..Default::default()
        },
        Case {
            name: "named targetPort: each slice carries its own port number",
            services: vec![svc(
                "web",
                "10.96.0.10",
                json!([{"name": "http", "port": 80, "targetPort": "web"}]),
            )],
            slices: vec![
                slice(
                    "web-a",
                    "web",
                    json!([{"name": "http", "port": 8080}]),
                    json!([ep("10.1.0.1")]),
                ),
                slice(
                    "web-b",
                    "web",
                    json!([{"name": "http", "port": 9090}]),
                    json!([ep("10.1.0.2")]),
                ),
            ],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080", "10.1.0.2:9090"])],
            ..Default::default()
        },
        Case {
            name: "ports are joined by name and protocol",
            services: vec![svc(
                "dns",
                "10.96.0.53",
                json!([
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
            )],
            slices: vec![slice(
                "dns-1",
                "dns",
                json!([
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
                {"name": "dns", "port": 9999, "protocol": "TCP"}]),
                json!([ep("10.1.0.1")]),
            )],
            want: &[
                ("10.96.0.53:53/TCP", &["10.1.0.1:5354"]),
                ("10.96.0.53:53/UDP", &["10.1.0.1:5353"]),
            ],
            ..Default::default()
        },
        Case {
            name: "unnamed port matches unnamed slice port; nil-name slice ports are ignored",
            services: vec![svc(
                "one",
                "10.96.0.11",
                json!([{"port": 80, "targetPort": 8080}]),
            )],
            slices: vec![
                slice(
                    "one-1",
                    "one",
                    json!([{"name": "", "port": 8080}]),
                    json!([ep("10.1.0.1")]),
                ),
                slice(
                    "one-2",
                    "one",
                    json!([{"port": 8081}]),
                    json!([ep("10.1.0.2")]),
                ),
            ],
            want: &[("10.96.0.11:80/TCP", &["10.1.0.1:8080"])],
            ..Default::default()
        },
        Case {
            name: "conditions: unready excluded, nil conditions mean ready",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([
                {"addresses": ["10.1.0.1"], "conditions": {"ready": false, "serving": false}},
                {"addresses": ["10.1.0.2"], "conditions": {}},
                {"addresses": ["10.1.0.3"]}]),
            )],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.2:8080", "10.1.0.3:8080"])],
            ..Default::default()
        },
        Case {
            name: "serving+terminating used only when nothing is ready",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([
                {"addresses": ["10.1.0.1"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": false, "terminating": true}}]),
            )],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            ..Default::default()
        },
        Case {
            name: "no slices: frontend with no backends (REJECT)",
            services: vec![svc("web", "10.96.0.10", http())],
            want: &[("10.96.0.10:80/TCP", &[])],
            ..Default::default()
        },
        Case {
            name: "iTP Local: only local endpoints",
            services: vec![with(
                svc("web", "10.96.0.10", http()),
                &["spec", "internalTrafficPolicy"],
                json!("Local"),
            )],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([
                ep("10.1.0.1"),
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "nodeName": "node-a"}]),
            )],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.2:8080"])],
            ..Default::default()
        },
        Case {
            name: "iTP Local with only remote endpoints: no backends, flagged (not REJECT)",
            services: vec![with(
                svc("web", "10.96.0.10", http()),
                &["spec", "internalTrafficPolicy"],
                json!("Local"),
            )],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([ep("10.1.0.1")]),
            )],
            want: &[("!10.96.0.10:80/TCP", &[])],
            ..Default::default()
        },
        Case {
            name: "duplicate endpoints across slices count once",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![
                slice(
                    "web-1",
                    "web",
                    http_slice_port(),
                    json!([ep("10.1.0.1"), ep("10.1.0.2")]),
                ),
                slice("web-2", "web", http_slice_port(), json!([ep("10.1.0.2")])),
            ],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080", "10.1.0.2:8080"])],
            ..Default::default()
        },
        Case {
            name: "duplicate endpoint: the local copy wins (kube-proxy addEndpoints)",
            services: vec![with(
                svc("web", "10.96.0.10", http()),
                &["spec", "internalTrafficPolicy"],
                json!("Local"),
            )],
            slices: vec![
                slice("web-1", "web", http_slice_port(), json!([ep("10.1.0.1")])),
                slice(
                    "web-2",
                    "web",
                    http_slice_port(),
                    json!([{"addresses": ["10.1.0.1"], "nodeName": "node-a"}]),
                ),
            ],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            ..Default::default()
        },
        Case {
            name: "slices of other Services and namespaces do not join",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![
                slice(
                    "other-1",
                    "other",
                    http_slice_port(),
                    json!([ep("10.1.0.9")]),
                ),
                with(
                    slice("web-x", "web", http_slice_port(), json!([ep("10.1.0.8")])),
                    &["metadata", "namespace"],
                    json!("prod"),
                ),
            ],
            want: &[("10.96.0.10:80/TCP", &[])],
            ..Default::default()
        },
        Case {
            name: "IPv6 and FQDN slices are ignored; dual-stack Service uses its IPv4 ClusterIP",
            services: vec![with(
                svc("web", "fd00::10", http()),
                &["spec", "clusterIPs"],
                json!(["fd00::10", "10.96.0.10"]),
            )],
            slices: vec![
                with(
                    slice(
                        "web-v6",
                        "web",
                        http_slice_port(),
                        json!([{"addresses": ["fd00::1"]}]),
                    ),
                    &["addressType"],
                    json!("IPv6"),
                ),
                with(
                    slice(
                        "web-fqdn",
                        "web",
                        http_slice_port(),
                        json!([{"addresses": ["a.example"]}]),
                    ),
                    &["addressType"],
                    json!("FQDN"),
                ),
                slice("web-v4", "web", http_slice_port(), json!([ep("10.1.0.1")])),
            ],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            ..Default::default()
        },
        Case {
            name: "zone hints: this node's zone from its Node labels",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([
                {"addresses": ["10.1.0.1"], "hints": {"forZones": [{"name": "zone-a"}]}},
                {"addresses": ["10.1.0.2"], "hints": {"forZones": [{"name": "zone-b"}]}}]),
            )],
            nodes: vec![json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}}})],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            ..Default::default()
        },
    ]);
}

#[test]
fn services_kube_proxy_does_not_proxy_are_skipped() {
    run(vec![
        Case {
            name: "headless",
            services: vec![svc("h", "None", http())],
            ..Default::default()
        },
        Case {
            name: "no clusterIP",
            services: vec![
                json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "n"}, "spec": {"ports": [{"port": 80}]}}),
            ],
            ..Default::default()
        },
        Case {
            name: "ExternalName",
            services: vec![with(
                svc("e", "10.96.0.12", http()),
                &["spec", "type"],
                json!("ExternalName"),
            )],
            ..Default::default()
        },
        Case {
            name: "another proxy's Service",
            services: vec![with(
                svc("p", "10.96.0.13", http()),
                &["metadata", "labels"],
                json!({"service.kubernetes.io/service-proxy-name": "other"}),
            )],
            ..Default::default()
        },
        Case {
            name: "headless label",
            services: vec![with(
                svc("p", "10.96.0.14", http()),
                &["metadata", "labels"],
                json!({"service.kubernetes.io/headless": ""}),
            )],
            ..Default::default()
        },
        Case {
            name: "IPv6-only",
            services: vec![svc("v6", "fd00::1", http())],
            ..Default::default()
        },
    ]);
}

#[test]
fn invalid_objects_are_reported_by_field_and_held() {
    use ProblemReason::*;
    run(vec![
        Case {
            name: "unparseable ClusterIP",
            services: vec![svc("bad", "10.96.0.999", http())],
            problems: &[("spec.clusterIP", InvalidIp)],
            held_services: &["default/bad"],
            ..Default::default()
        },
        Case {
            name: "port out of range: held at its VIP",
            services: vec![svc(
                "bad",
                "10.96.0.10",
                json!([{"name": "http", "port": 70000}]),
            )],
            problems: &[("spec.ports[0].port", InvalidPort)],
            held: &["10.96.0.10"],
            held_services: &["default/bad"],
            ..Default::default()
        },
        Case {
            name: "unknown protocol: held",
            services: vec![svc(
                "bad",
                "10.96.0.10",
                json!([{"name": "x", "port": 80, "protocol": "QUIC"}]),
            )],
            problems: &[("spec.ports[0].protocol", UnsupportedProtocol)],
            held: &["10.96.0.10"],
            held_services: &["default/bad"],
            ..Default::default()
        },
        Case {
            name: "SCTP: only that port is skipped",
            services: vec![svc(
                "mix",
                "10.96.0.10",
                json!([
                {"name": "s", "port": 9, "protocol": "SCTP"}, {"name": "http", "port": 80}]),
            )],
            slices: vec![slice(
                "mix-1",
                "mix",
                http_slice_port(),
                json!([ep("10.1.0.1")]),
            )],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            problems: &[("spec.ports[0].protocol", UnsupportedProtocol)],
            ..Default::default()
        },
        Case {
            name: "bad internalTrafficPolicy",
            services: vec![with(
                svc("bad", "10.96.0.10", http()),
                &["spec", "internalTrafficPolicy"],
                json!("Nearby"),
            )],
            problems: &[("spec.internalTrafficPolicy", InvalidValue)],
            held: &["10.96.0.10"],
            held_services: &["default/bad"],
            ..Default::default()
        },
        Case {
            name: "two Services claim one frontend: the first (by namespace/name) keeps it",
            services: vec![
                svc("b", "10.96.0.10", http()),
                svc("a", "10.96.0.10", http()),
            ],
            slices: vec![slice(
                "a-1",
                "a",
                http_slice_port(),
                json!([ep("10.1.0.1")]),
            )],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            problems: &[("spec.clusterIP", DuplicateFrontend)],
            held: &["10.96.0.10"],
            held_services: &["default/b"],
            ..Default::default()
        },
        Case {
            name: "slice: bad endpoint address dropped, others kept; nameless slice ignored",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![
                slice(
                    "web-1",
                    "web",
                    http_slice_port(),
                    json!([{"addresses": ["10.1.0.300"]}, ep("10.1.0.1")]),
                ),
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                       "metadata": {"name": "orphan", "namespace": "default"}, "endpoints": []}),
                slice(
                    "web-2",
                    "web",
                    json!([{"name": "http", "port": 70000}]),
                    json!([ep("10.1.0.2")]),
                ),
            ],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            problems: &[
                ("metadata.labels[kubernetes.io/service-name]", MissingField),
                ("endpoints[0].addresses[0]", InvalidIp),
                ("ports[0].port", InvalidPort),
            ],
            ..Default::default()
        },
    ]);
}

#[test]
fn problems_name_file_object_and_field() {
    let objects = Objects {
        services: vec![Sourced {
            origin: Arc::from("/m/web.yaml"),
            object: Arc::new(serde_json::from_value(svc("web", "not-an-ip", http())).unwrap()),
        }],
        ..Default::default()
    };
    let d = build(&objects, "node-a");
    assert_eq!(
        d.problems[0].to_string(),
        "/m/web.yaml: Service default/web: field spec.clusterIP: \"not-an-ip\" is not an IP address"
    );
}

/// The incremental model agrees with [`build`] after every step of random edits: files of
/// Services and slices added, replaced and removed, with clashing ClusterIPs, a Service and
/// its slices in different files, and zone changes of this node.
#[test]
fn incremental_model_equals_a_fresh_build_after_every_change() {
    // A small deterministic generator (xorshift): no extra dependency for one test.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    fn arc<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("valid test object"))
    }
    let mut files: BTreeMap<String, ObjectSet> = BTreeMap::new();
    let mut index = Index::default();
    let mut model = Model::default();
    let mut view: BTreeMap<Frontend, FrontendSpec> = BTreeMap::new();
    for step in 0..400 {
        let name = format!("f{}.yaml", next(12));
        let origin: Arc<str> = Arc::from(name.as_str());
        if let Some(old) = files.remove(&name) {
            index.remove(&origin, &old);
        }
        if next(4) != 0 {
            let mut set = ObjectSet::default();
            for _ in 0..=next(3) {
                let svc_name = format!("s{}", next(6));
                match next(5) {
                    // Few VIPs for many names: clashes happen.
                    0..=1 => set.services.push(arc(svc(
                        &svc_name,
                        &format!("10.96.0.{}", next(4) + 1),
                        json!([{"name": "http", "port": 80}]),
                    ))),
                    2 => set
                        .services
                        .push(arc(svc(&svc_name, "bogus", json!([{"port": 80}])))),
                    3 => set.slices.push(arc(slice(
                        &format!("{svc_name}-{}", next(3)),
                        &svc_name,
                        json!([{"name": "http", "port": 8080}]),
                        json!([ep(&format!("10.1.0.{}", next(5) + 1)), ep("10.1.0.9")]),
                    ))),
                    _ => set
                        .nodes
                        .push(arc(json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": "node-a",
                                     "labels": {LABEL_ZONE: format!("z{}", next(2))}}}))),
                }
            }
            index.insert(&origin, &set);
            files.insert(name, set);
        }
        let mut objects = Objects::default();
        for (f, set) in &files {
            objects.extend_from(&Arc::from(f.as_str()), set);
        }
        let want = build(&objects, "node-a");
        let touched = index.take_touched();
        let partial = model.build(&index, touched.as_ref().into(), "node-a", false);
        let changed = partial.changed.expect("a partial pass names what changed");
        view.retain(|_, spec| !changed.contains(&spec.service));
        assert!(
            partial
                .desired
                .frontends
                .values()
                .all(|s| changed.contains(&s.service)),
            "step {step}: a partial pass only carries changed Services"
        );
        view.extend(partial.desired.frontends);
        assert_eq!(view, want.frontends, "step {step}: frontends");
        assert_eq!(
            partial.desired.problems, want.problems,
            "step {step}: problems"
        );
        assert_eq!(partial.desired.held_vips, want.held_vips, "step {step}");
        assert_eq!(
            partial.desired.held_services, want.held_services,
            "step {step}"
        );
        if step % 50 == 0 {
            assert_eq!(
                model.build(&index, Changes::All, "node-a", true).desired,
                want,
                "step {step}: full"
            );
        }
    }
}
