//! Table-driven model tests. Inputs are written as the JSON a user or the API server would
//! send; cases follow kube-proxy's endpointslicecache and ServiceChangeTracker tests.
use serde_json::{Value, json};

use super::*;

/// A test object as a source holds it (from `test.yaml`).
pub(crate) fn sourced<T: serde::de::DeserializeOwned>(v: Value) -> Sourced<T> {
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
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.iter().map(std::string::ToString::to_string).collect(),
                )
            })
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
        let held: Vec<String> = d
            .held_vips
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        assert_eq!(held, c.held, "case {:?}: held VIPs", c.name);
        let held_svcs: Vec<String> = d
            .held_services
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
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

mod choice;
mod incremental;
mod invalid;
mod translation;
