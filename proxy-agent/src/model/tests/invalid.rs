//! What kube-proxy skips, and invalid objects: reported by field, their state held.
use super::*;

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
            name: "unknown Service type",
            services: vec![with(
                svc("bad", "10.96.0.10", http()),
                &["spec", "type"],
                json!("ClusterIPP"),
            )],
            problems: &[("spec.type", InvalidValue)],
            held: &["10.96.0.10"],
            held_services: &["default/bad"],
            ..Default::default()
        },
        Case {
            name: "slice: addresses no pod has, and the Service's own ClusterIP, are dropped",
            services: vec![svc("web", "10.96.0.10", http())],
            slices: vec![slice(
                "web-1",
                "web",
                http_slice_port(),
                json!([
                    ep("0.0.0.0"),
                    ep("255.255.255.255"),
                    ep("127.0.0.1"),
                    ep("169.254.0.7"),
                    ep("224.0.0.5"),
                    ep("10.96.0.10"),
                    ep("10.1.0.1")
                ]),
            )],
            want: &[("10.96.0.10:80/TCP", &["10.1.0.1:8080"])],
            problems: &[
                ("endpoints[0].addresses[0]", InvalidIp),
                ("endpoints[1].addresses[0]", InvalidIp),
                ("endpoints[2].addresses[0]", InvalidIp),
                ("endpoints[3].addresses[0]", InvalidIp),
                ("endpoints[4].addresses[0]", InvalidIp),
                ("endpoints[5].addresses[0]", InvalidIp),
            ],
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

/// The same Service, or the same EndpointSlice, defined in two files is one object: the
/// definition in the first file by name is used, and the other one reported (naming its
/// file) and ignored, whichever order the files were read in.
#[test]
fn an_object_defined_in_two_files_is_used_once() {
    fn at<T: serde::de::DeserializeOwned>(origin: &str, v: Value) -> Sourced<T> {
        Sourced {
            origin: Arc::from(origin),
            ..sourced(v)
        }
    }
    let web_slice = |ip: &str| slice("web-1", "web", http_slice_port(), json!([ep(ip)]));
    for reversed in [false, true] {
        let mut services = vec![
            at("/m/a.yaml", svc("web", "10.96.0.10", http())),
            at("/m/b.yaml", svc("web", "10.96.0.11", http())),
        ];
        let mut slices = vec![
            at("/m/a.yaml", web_slice("10.1.0.1")),
            at("/m/c.yaml", web_slice("10.1.0.2")),
        ];
        if reversed {
            services.reverse();
            slices.reverse();
        }
        let objects = Objects {
            services,
            slices,
            ..Default::default()
        };
        let d = build(&objects, "node-a");
        let got: Vec<String> = (d.frontends.iter())
            .map(|(f, s)| {
                format!(
                    "{f} {:?}",
                    s.backends
                        .iter()
                        .map(|b| b.ip.to_string())
                        .collect::<Vec<_>>()
                )
            })
            .collect();
        assert_eq!(
            got,
            vec!["10.96.0.10:80/TCP [\"10.1.0.1\"]"],
            "reversed {reversed}"
        );
        let mut problems: Vec<String> = d.problems.iter().map(ToString::to_string).collect();
        problems.sort();
        assert_eq!(
            problems,
            vec![
                "/m/b.yaml: Service default/web: field metadata.name: defined again; the definition in /m/a.yaml is used (the first by file name)",
                "/m/c.yaml: EndpointSlice default/web-1: field metadata.name: defined again; the definition in /m/a.yaml is used (the first by file name)",
            ],
            "reversed {reversed}"
        );
        assert!(
            d.problems
                .iter()
                .all(|p| p.reason == ProblemReason::DuplicateObject)
        );
        assert!(d.held_vips.is_empty() && d.held_services.is_empty());
    }
}
