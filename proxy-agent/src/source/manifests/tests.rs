use std::{thread::sleep, time::Duration};

use super::*;

const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.1.0.1]
";

fn write(dir: &Path, name: &str, text: &str) {
    // Distinct mtimes/sizes are what rescan looks at; make sure a rewrite is seen.
    sleep(Duration::from_millis(10));
    fs::write(dir.join(name), text).unwrap();
}

fn counts(m: &ManifestDir) -> (usize, usize, usize) {
    let o = m.objects();
    (o.services.len(), o.slices.len(), o.nodes.len())
}

#[test]
fn multi_document_files_lists_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "all.yaml", &format!("{SVC}---\n{SLICE}---\n"));
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ignored"}}]});
    write(tmp.path(), "nodes.json", &list.to_string());
    write(tmp.path(), ".hidden.yaml", "not: [valid");
    write(tmp.path(), "notes.txt", "not a manifest");
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    assert!(r.changed);
    assert!(r.new_problems.is_empty(), "{:?}", r.new_problems);
    assert_eq!(counts(&m), (1, 1, 1));
    assert!(
        !m.rescan().unwrap().changed,
        "nothing changed, nothing reported"
    );
}

#[test]
fn a_file_that_does_not_parse_keeps_its_last_good_objects() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "web.yaml", SVC);
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    write(
        tmp.path(),
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web\n",
    );
    let r = m.rescan().unwrap();
    assert_eq!(r.new_problems.len(), 1);
    let p = &r.new_problems[0];
    assert_eq!(p.reason, ProblemReason::Parse);
    assert!(p.origin.ends_with("web.yaml"), "{p}");
    assert!(p.field.starts_with("line "), "{p}");
    assert_eq!(counts(&m), (1, 0, 0), "the last good Service is kept");
    assert_eq!(m.problems().count(), 1);

    write(
        tmp.path(),
        "web.yaml",
        &SVC.replace("10.96.0.10", "10.96.0.20"),
    );
    let r = m.rescan().unwrap();
    assert!(r.new_problems.is_empty());
    assert_eq!(m.problems().count(), 0);
    let ip = m.objects().services[0]
        .object
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .clone();
    assert_eq!(ip.as_deref(), Some("10.96.0.20"));
}

#[test]
fn a_field_of_the_wrong_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "web.yaml",
        &SVC.replace("port: 80,", "port: eighty,"),
    );
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    assert_eq!(r.new_problems.len(), 1);
    let p = &r.new_problems[0];
    assert_eq!(
        (p.kind, p.name.as_str(), p.field.as_str()),
        ("Service", "web", "spec.ports[0].port")
    );
    assert_eq!(counts(&m), (0, 0, 0));
}

#[test]
fn objects_without_kind_and_old_apis_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", "metadata: {name: x}\n");
    write(
        tmp.path(),
        "b.yaml",
        &SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"),
    );
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    let r = m.rescan().unwrap();
    let reasons: Vec<_> = r.new_problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        vec![ProblemReason::MissingField, ProblemReason::InvalidValue]
    );
}

#[test]
fn removing_a_file_removes_its_objects() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "web.yaml", SVC);
    write(tmp.path(), "slice.yml", SLICE);
    let mut m = ManifestDir::new(tmp.path()).unwrap();
    m.rescan().unwrap();
    assert_eq!(counts(&m), (1, 1, 0));
    fs::remove_file(tmp.path().join("slice.yml")).unwrap();
    assert!(m.rescan().unwrap().changed);
    assert_eq!(counts(&m), (1, 0, 0));
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let err = ManifestDir::new(Path::new("/nonexistent/manifests")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/manifests"));
}
