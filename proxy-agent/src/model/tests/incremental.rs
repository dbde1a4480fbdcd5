//! The incremental model against a fresh build.
use super::*;

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

/// A pass in which this node's zone changes recomputes everything; a Service removed in that
/// same pass is still reported changed, so the writer deletes its frontends (found by the
/// `model` fuzz target: the agent kept them until the next full sync).
#[test]
fn a_service_removed_in_the_pass_that_changes_the_zone_is_reported_changed() {
    fn arc<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("valid test object"))
    }
    let node = |zone: &str| ObjectSet {
        nodes: vec![arc(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {LABEL_ZONE: zone}}}))],
        ..ObjectSet::default()
    };
    let web = ObjectSet {
        services: vec![arc(svc(
            "web",
            "10.96.0.10",
            json!([{"name": "http", "port": 80}]),
        ))],
        ..ObjectSet::default()
    };
    let (a, n): (Arc<str>, Arc<str>) = (Arc::from("a.yaml"), Arc::from("n.yaml"));
    let (mut index, mut model) = (Index::default(), Model::default());
    index.insert(&a, &web);
    index.insert(&n, &node("z1"));
    let touched = index.take_touched();
    let first = model.build(&index, touched.as_ref().into(), "node-a", false);
    assert_eq!(first.desired.frontends.len(), 1);
    index.remove(&a, &web);
    index.remove(&n, &node("z1"));
    index.insert(&n, &node("z2"));
    let touched = index.take_touched();
    let second = model.build(&index, touched.as_ref().into(), "node-a", false);
    let web_ref = ServiceRef {
        namespace: "default".into(),
        name: "web".into(),
    };
    assert!(second.changed.expect("partial").contains(&web_ref));
    assert!(second.desired.frontends.is_empty());
}

/// kube-proxy's `sync_proxy_rules_{service,endpoint}_changes_total` count objects changed, by
/// kind. A manifest file is re-read whole (its objects removed and added again): only the
/// objects whose content changed count, an object removed counts, and the slices of another
/// proxy do not.
#[test]
fn changes_count_the_objects_whose_content_changed_by_kind() {
    fn arc<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("valid test object"))
    }
    let port = json!([{"name": "http", "port": 80}]);
    let web_slice = |ip: &str| {
        arc(slice(
            "web-1",
            "web",
            json!([{"name": "http", "port": 8080}]),
            json!([ep(ip)]),
        ))
    };
    let file = |ip: &str| ObjectSet {
        services: vec![arc(svc("web", "10.96.0.10", port.clone()))],
        slices: vec![web_slice(ip)],
        ..ObjectSet::default()
    };
    let other = ObjectSet {
        slices: vec![arc(with(
            slice("x-1", "x", json!([]), json!([])),
            &["metadata", "labels", LABEL_SERVICE_PROXY_NAME],
            json!("another-proxy"),
        ))],
        ..ObjectSet::default()
    };
    let (a, o): (Arc<str>, Arc<str>) = (Arc::from("a.yaml"), Arc::from("o.yaml"));
    let mut index = Index::default();
    index.insert(&a, &file("10.1.0.1"));
    index.insert(&o, &other);
    let counts = |index: &mut Index| {
        let c = index.take_changes();
        (c.services, c.endpoint_slices)
    };
    assert_eq!(counts(&mut index), (1, 1));
    // Re-read unchanged: nothing. The slice changed: the slice only.
    index.remove(&a, &file("10.1.0.1"));
    index.insert(&a, &file("10.1.0.1"));
    assert_eq!(counts(&mut index), (0, 0));
    index.remove(&a, &file("10.1.0.1"));
    index.insert(&a, &file("10.1.0.2"));
    assert_eq!(counts(&mut index), (0, 1));
    // Two updates of one slice between syncs: one object changed.
    index.remove(&a, &file("10.1.0.2"));
    index.insert(&a, &file("10.1.0.3"));
    index.remove(&a, &file("10.1.0.3"));
    index.insert(&a, &file("10.1.0.4"));
    assert_eq!(counts(&mut index), (0, 1));
    // The file removed: both.
    index.remove(&a, &file("10.1.0.4"));
    assert_eq!(counts(&mut index), (1, 1));
}
