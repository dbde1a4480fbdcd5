//! The writes over HTTP, as a client sends them (kubectl's own are in
//! `tests/tests/kube_source.rs`): what each answers, and the events the watches get.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use serde_json::{Value, json};

use crate::apiserver::FakeApiServer;

const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

/// One request; (status code, `Warning` headers, JSON body).
fn request(
    api: &FakeApiServer,
    method: &str,
    path: &str,
    body: &Value,
) -> (u16, Vec<String>, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut s = TcpStream::connect(api.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        api.addr,
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let warnings = head
        .lines()
        .filter_map(|l| l.strip_prefix("warning: "))
        .map(str::to_string)
        .collect();
    (
        code,
        warnings,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn slice(name: &str, ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The watch log: (resourceVersion, event type) of each event.
fn events(api: &FakeApiServer) -> Vec<(u64, &'static str)> {
    let g = api.shared.inner.lock().unwrap();
    g.log.iter().map(|(rv, ty, ..)| (*rv, *ty)).collect()
}

#[test]
fn create_stores_with_system_fields_then_answers_already_exists() {
    let api = FakeApiServer::start().unwrap();
    let (code, _, created) = request(&api, "POST", SLICES, &slice("web-a", &["10.1.0.1"]));
    assert_eq!(code, 201, "{created}");
    let meta = &created["metadata"];
    assert_eq!(meta["namespace"], "default", "the URL's namespace");
    assert_eq!(meta["generation"], 1);
    assert_eq!(meta["uid"].as_str().unwrap().len(), 36, "{meta}");
    assert!(meta["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(created["endpoints"][0]["addresses"][0], "10.1.0.1");
    assert_eq!(events(&api), [(rv(&created).parse().unwrap(), "ADDED")]);

    let (code, _, refused) = request(&api, "POST", SLICES, &slice("web-a", &["10.1.0.2"]));
    assert_eq!(code, 409);
    assert_eq!(refused["reason"], "AlreadyExists");
    assert_eq!(
        refused["message"],
        "endpointslices.discovery.k8s.io \"web-a\" already exists"
    );
    assert_eq!(
        refused["details"],
        json!({"name": "web-a", "group": "discovery.k8s.io", "kind": "endpointslices"})
    );
    assert_eq!(events(&api).len(), 1, "a refused create is no event");

    // Another namespace in the body than the URL's; a resourceVersion; no name.
    let mut other = slice("web-b", &[]);
    other["metadata"]["namespace"] = json!("kube-system");
    let (code, _, refused) = request(&api, "POST", SLICES, &other);
    assert_eq!(
        (code, refused["reason"].as_str()),
        (400, Some("BadRequest"))
    );
    assert_eq!(
        refused["message"],
        "the namespace of the provided object does not match the namespace sent on the request"
    );
    let mut with_rv = slice("web-b", &[]);
    with_rv["metadata"]["resourceVersion"] = json!("5");
    let (code, _, refused) = request(&api, "POST", SLICES, &with_rv);
    assert_eq!(code, 500);
    assert_eq!(
        refused["message"],
        "resourceVersion should not be set on objects to be created"
    );
    let (code, _, refused) = request(
        &api,
        "POST",
        SLICES,
        &json!({"addressType": "IPv4", "endpoints": []}),
    );
    assert_eq!((code, refused["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(events(&api).len(), 1);
}

#[test]
fn replace_is_conditional_on_a_set_resource_version_only() {
    let api = FakeApiServer::start().unwrap();
    let path = format!("{SLICES}/web-a");
    let (code, _, missing) = request(&api, "PUT", &path, &slice("web-a", &["10.1.0.1"]));
    assert_eq!(code, 404, "these kinds do not create on update");
    assert_eq!(
        missing["message"],
        "endpointslices.discovery.k8s.io \"web-a\" not found"
    );
    let (_, _, created) = request(&api, "POST", SLICES, &slice("web-a", &["10.1.0.1"]));

    // The stored resourceVersion: an update, which keeps uid and creation time.
    let mut next = slice("web-a", &["10.1.0.2"]);
    next["metadata"]["resourceVersion"] = json!(rv(&created));
    let (code, _, replaced) = request(&api, "PUT", &path, &next);
    assert_eq!(code, 200, "{replaced}");
    assert!(rv(&replaced).parse::<u64>().unwrap() > rv(&created).parse().unwrap());
    for field in ["uid", "creationTimestamp"] {
        assert_eq!(replaced["metadata"][field], created["metadata"][field]);
    }
    assert_eq!(replaced["metadata"]["generation"], 2);

    // The first resourceVersion again: stale now.
    let (code, _, refused) = request(&api, "PUT", &path, &next);
    assert_eq!((code, refused["reason"].as_str()), (409, Some("Conflict")));
    assert_eq!(
        refused["message"],
        "Operation cannot be fulfilled on endpointslices.discovery.k8s.io \"web-a\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // No resourceVersion: unconditional. A change of annotations only keeps the generation.
    let mut annotated = slice("web-a", &["10.1.0.2"]);
    annotated["metadata"]["annotations"] = json!({"a": "b"});
    let (code, _, replaced) = request(&api, "PUT", &path, &annotated);
    assert_eq!(code, 200, "{replaced}");
    assert_eq!(replaced["metadata"]["generation"], 2);

    let (code, _, refused) = request(&api, "PUT", &path, &slice("web-b", &[]));
    assert_eq!(code, 400);
    assert_eq!(
        refused["message"],
        "the name of the object (web-b) does not match the name on the URL (web-a)"
    );
    let types: Vec<&str> = events(&api).into_iter().map(|(_, t)| t).collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "MODIFIED"]);
    let rvs: Vec<u64> = events(&api).into_iter().map(|(rv, _)| rv).collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");
}

#[test]
fn delete_checks_preconditions_and_answers_per_kind() {
    let api = FakeApiServer::start().unwrap();
    let path = format!("{SLICES}/web-a");
    let (code, _, _) = request(&api, "DELETE", &path, &Value::Null);
    assert_eq!(code, 404);
    let (_, _, created) = request(&api, "POST", SLICES, &slice("web-a", &["10.1.0.1"]));
    let uid = created["metadata"]["uid"].as_str().unwrap();

    let stale = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": "1"}});
    let (code, _, refused) = request(&api, "DELETE", &path, &stale);
    assert_eq!((code, refused["reason"].as_str()), (409, Some("Conflict")));
    assert_eq!(
        refused["message"],
        format!(
            "Operation cannot be fulfilled on EndpointSlice.discovery.k8s.io \"web-a\": the ResourceVersion in the precondition (1) does not match the ResourceVersion in record ({}). The object might have been modified",
            rv(&created)
        )
    );
    let (code, _, refused) = request(
        &api,
        "DELETE",
        &path,
        &json!({"preconditions": {"uid": "x"}}),
    );
    assert_eq!(code, 409);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("the UID in the precondition (x) does not match the UID in record"),
        "{refused}"
    );

    let matching = json!({"propagationPolicy": "Background",
                          "preconditions": {"uid": uid, "resourceVersion": rv(&created)}});
    let (code, _, done) = request(&api, "DELETE", &path, &matching);
    assert_eq!(code, 200);
    assert_eq!(
        done,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
               "details": {"name": "web-a", "group": "discovery.k8s.io", "kind": "endpointslices", "uid": uid}})
    );
    assert_eq!(request(&api, "DELETE", &path, &Value::Null).0, 404);

    // A Service answers with the object deleted (`ReturnDeletedObject`).
    let (code, _, svc) = request(
        &api,
        "POST",
        "/api/v1/namespaces/default/services",
        &service("web"),
    );
    assert_eq!(code, 201, "{svc}");
    let (code, _, gone) = request(
        &api,
        "DELETE",
        "/api/v1/namespaces/default/services/web",
        &Value::Null,
    );
    assert_eq!(code, 200);
    assert_eq!(gone["kind"], "Service");
    assert_eq!(gone["metadata"]["uid"], svc["metadata"]["uid"]);
    let evs = events(&api);
    let types: Vec<&str> = evs.iter().map(|(_, t)| *t).collect();
    assert_eq!(types, ["ADDED", "DELETED", "ADDED", "DELETED"]);
    assert!(
        evs[1].0 > rv(&created).parse().unwrap(),
        "a delete gets a new resourceVersion"
    );

    let counts = api.requests_by_verb();
    assert_eq!(counts.get("delete endpointslices"), Some(&5));
    assert_eq!(counts.get("create endpointslices"), Some(&1));
    assert_eq!(counts.get("create services"), Some(&1));
    assert_eq!(counts.get("delete services"), Some(&1));
}

#[test]
fn field_validation_is_strict_warn_or_ignore() {
    let api = FakeApiServer::start().unwrap();
    let mut body = slice("web-a", &["10.1.0.1"]);
    body["endpoints"][0]["bogus"] = json!(1);
    body["colour"] = json!("red");
    let path = |v: &str| format!("{SLICES}?fieldManager=kubectl-create&fieldValidation={v}");
    let (code, _, refused) = request(&api, "POST", &path("Strict"), &body);
    assert_eq!(code, 400);
    let msg = refused["message"].as_str().unwrap();
    assert!(msg.starts_with("strict decoding error: "), "{msg}");
    assert!(
        msg.contains("unknown field \"endpoints[0].bogus\"")
            && msg.contains("unknown field \"colour\""),
        "{msg}"
    );

    let (code, warnings, created) = request(&api, "POST", &path("Warn"), &body);
    assert_eq!(code, 201);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.contains(&"299 - \"unknown field \\\"colour\\\"\"".to_string()),
        "{warnings:?}"
    );
    assert!(
        created.get("colour").is_none(),
        "unknown fields are dropped"
    );
    assert_eq!(
        created["metadata"]["managedFields"][0]["manager"],
        "kubectl-create"
    );

    body["metadata"]["name"] = json!("web-b");
    let (code, warnings, _) = request(&api, "POST", &path("Ignore"), &body);
    assert_eq!((code, warnings.len()), (201, 0));

    // A value of the wrong type is not an object of the kind.
    let mut bad = slice("web-c", &[]);
    bad["ports"][0]["port"] = json!("eighty");
    let (code, _, refused) = request(&api, "POST", SLICES, &bad);
    assert_eq!(code, 400, "{refused}");
}
