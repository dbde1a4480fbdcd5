//! How Services and slices become frontends: kube-proxy's cases.
use super::*;

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
