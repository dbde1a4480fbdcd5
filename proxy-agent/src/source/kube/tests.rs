use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::*;
use crate::model::{self, Changes, Desired, Model, Objects, Sourced};

fn service(name: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "7",
                     "managedFields": [{"manager": "kubectl", "operation": "Update",
                                        "fieldsV1": {"f:spec": {"f:ports": {}}}}],
                     "labels": {"app": name},
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080}]},
        "status": {"loadBalancer": {}},
    })
}

fn slice(name: &str, svc: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "9",
                     "labels": {"kubernetes.io/service-name": svc},
                     "managedFields": [{"manager": "kube-controller-manager"}]},
        "addressType": "IPv4",
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node-a"}],
    })
}

fn node(labels: Value, deleting: bool) -> Value {
    let mut n = json!({"metadata": {"name": "node-a", "labels": labels},
                       "status": {"images": [{"names": ["a"], "sizeBytes": 1}]}});
    if deleting {
        n["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
    }
    n
}

/// A source fed by hand, as the watchers feed it.
struct Feed {
    tx: mpsc::Sender<Delivery<Decoded>>,
    source: KubeSource,
    model: Model,
}

impl Feed {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Feed {
            tx,
            source: KubeSource::with_channel(rx, "node-a"),
            model: Model::default(),
        }
    }

    fn send(&self, resource: Resource3, event: watcher::Event<Value>) {
        let decode = |v: Value| -> Decoded {
            match resource {
                Resource3::Service => serde_json::from_value::<LeanService>(v).unwrap().into(),
                Resource3::Slice => serde_json::from_value::<LeanSlice>(v).unwrap().into(),
                Resource3::Node => serde_json::from_value::<LeanNode>(v).unwrap().into(),
            }
        };
        let event = match event {
            watcher::Event::Apply(v) => watcher::Event::Apply(decode(v)),
            watcher::Event::Delete(v) => watcher::Event::Delete(decode(v)),
            watcher::Event::InitApply(v) => watcher::Event::InitApply(decode(v)),
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
        };
        self.tx.send(Delivery { resource, event }).unwrap();
    }

    /// A whole list of one resource.
    fn list(&self, resource: Resource3, objects: Vec<Value>) {
        self.send(resource, watcher::Event::Init);
        for o in objects {
            self.send(resource, watcher::Event::InitApply(o));
        }
        self.send(resource, watcher::Event::InitDone);
    }

    /// Applies what was sent and models it; the names of the Services it touched (None:
    /// all).
    fn touched(&mut self) -> Option<Vec<String>> {
        self.source.drain();
        let t = self.source.index.take_touched();
        let changes: Changes = t.as_ref().into();
        (self.model).build(&self.source.index, changes, "node-a", false);
        Some(t?.iter().map(|r| r.name.to_string()).collect())
    }

    /// What the model makes of the index now.
    fn built(&mut self) -> Desired {
        self.touched();
        (self.model)
            .build(
                &self.source.index,
                Changes::Only(&Default::default()),
                "node-a",
                true,
            )
            .desired
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = (self.source.kinds[Resource3::Service as usize].held)
            .iter()
            .filter(|(_, h)| h.indexed)
            .map(|(k, _)| k.1.clone())
            .collect();
        v.sort();
        v
    }
}

/// The same objects decoded as k8s-openapi's types, built from scratch.
fn from_scratch(services: &[Value], slices: &[Value], nodes: &[Value]) -> Desired {
    let origin: Arc<str> = Arc::from(ORIGIN);
    fn sourced<T>(origin: &Arc<str>, object: Arc<T>) -> Sourced<T> {
        Sourced {
            origin: origin.clone(),
            object,
        }
    }
    let objects = Objects {
        services: (services.iter())
            .map(|v| {
                sourced(
                    &origin,
                    Arc::new(serde_json::from_value::<Service>(v.clone()).unwrap()),
                )
            })
            .collect(),
        slices: (slices.iter())
            .map(|v| {
                let s: EndpointSlice = serde_json::from_value(v.clone()).unwrap();
                sourced(&origin, Arc::new(Slice::from(&s)))
            })
            .collect(),
        nodes: (nodes.iter())
            .map(|v| {
                sourced(
                    &origin,
                    Arc::new(serde_json::from_value::<Node>(v.clone()).unwrap()),
                )
            })
            .collect(),
    };
    model::build(&objects, "node-a")
}

/// Events are applied one by one: a change touches its Service only, an object listed again
/// unchanged touches nothing, and the index always builds what the full objects build.
#[test]
fn events_touch_only_what_they_change() {
    let mut f = Feed::new();
    f.list(Resource3::Node, vec![node(json!({}), false)]);
    f.list(
        Resource3::Slice,
        vec![
            slice("web-1", "web", "10.1.0.1"),
            slice("api-1", "api", "10.1.0.2"),
        ],
    );
    f.list(
        Resource3::Service,
        vec![service("web", "10.96.0.10"), service("api", "10.96.0.11")],
    );
    assert_eq!(
        f.touched(),
        None,
        "a new index: everything is to be computed"
    );
    let built = f.built();
    assert_eq!(built.frontends.len(), 2);
    assert!(built.frontends.values().all(|f| f.backends.len() == 1));
    assert_eq!(
        built,
        from_scratch(
            &[service("web", "10.96.0.10"), service("api", "10.96.0.11")],
            &[
                slice("web-1", "web", "10.1.0.1"),
                slice("api-1", "api", "10.1.0.2")
            ],
            &[node(json!({}), false)],
        )
    );

    f.send(
        Resource3::Slice,
        watcher::Event::Apply(slice("web-1", "web", "10.1.0.3")),
    );
    assert_eq!(f.touched(), Some(vec!["web".to_string()]));
    // The same object again (a resync, or another resourceVersion of an unchanged object).
    let mut again = slice("web-1", "web", "10.1.0.3");
    again["metadata"]["resourceVersion"] = json!("12");
    f.send(Resource3::Slice, watcher::Event::Apply(again));
    assert_eq!(f.touched(), Some(vec![]));
    f.send(
        Resource3::Service,
        watcher::Event::Delete(service("api", "10.96.0.11")),
    );
    assert_eq!(f.touched(), Some(vec!["api".to_string()]));
    assert_eq!(
        f.built(),
        from_scratch(
            &[service("web", "10.96.0.10")],
            &[
                slice("web-1", "web", "10.1.0.3"),
                slice("api-1", "api", "10.1.0.2")
            ],
            &[node(json!({}), false)],
        )
    );
}

/// A relist (a watch that could not resume: 410 Gone, a restart) is level-triggered: what it
/// lists unchanged touches nothing, and what it does not list was deleted during the gap.
/// Until it completes, nothing is removed.
#[test]
fn a_relist_removes_what_vanished_during_the_gap() {
    let mut f = Feed::new();
    f.list(Resource3::Node, vec![node(json!({}), false)]);
    f.list(
        Resource3::Slice,
        vec![slice("a-1", "a", "10.1.0.1"), slice("b-1", "b", "10.1.0.2")],
    );
    f.list(
        Resource3::Service,
        vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
    );
    f.built();
    // The relist of slices: b-1 was deleted while the watch was down, a-1 changed, c-1 is new.
    f.send(Resource3::Slice, watcher::Event::Init);
    f.send(
        Resource3::Slice,
        watcher::Event::InitApply(slice("a-1", "a", "10.1.0.9")),
    );
    assert_eq!(f.touched(), Some(vec!["a".to_string()]));
    assert_eq!(
        f.built().frontends.len(),
        2,
        "b keeps its endpoint until the list is complete"
    );
    f.send(
        Resource3::Slice,
        watcher::Event::InitApply(slice("c-1", "c", "10.1.0.3")),
    );
    f.send(Resource3::Slice, watcher::Event::InitDone);
    assert_eq!(f.touched(), Some(vec!["b".to_string(), "c".to_string()]));
    // A relist of Services that names the same objects changes nothing.
    f.list(
        Resource3::Service,
        vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
    );
    assert_eq!(f.touched(), Some(vec![]));
    assert_eq!(
        f.built(),
        from_scratch(
            &[service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            &[slice("a-1", "a", "10.1.0.9"), slice("c-1", "c", "10.1.0.3")],
            &[node(json!({}), false)],
        )
    );
}

/// During the first list, a Service waits out of the index until one of its slices arrives,
/// or the slices' list ends (it has none): programmed earlier, it would refuse connections.
#[test]
fn during_the_first_list_a_service_waits_for_its_slices() {
    let mut f = Feed::new();
    f.send(Resource3::Service, watcher::Event::Init);
    f.send(Resource3::Slice, watcher::Event::Init);
    for (name, ip) in [
        ("a", "10.96.0.1"),
        ("b", "10.96.0.2"),
        ("gone", "10.96.0.3"),
    ] {
        f.send(
            Resource3::Service,
            watcher::Event::InitApply(service(name, ip)),
        );
    }
    f.source.drain();
    assert_eq!(f.names(), Vec::<String>::new());
    f.send(
        Resource3::Slice,
        watcher::Event::InitApply(slice("a-1", "a", "10.1.0.1")),
    );
    f.source.drain();
    assert_eq!(f.names(), vec!["a"]);
    f.send(Resource3::Service, watcher::Event::InitDone);
    // A Service deleted while it waits is forgotten (a relist is the only way a delete comes
    // during a first list).
    f.source
        .delete(Resource3::Service, &("default".into(), "gone".into()));
    f.send(Resource3::Slice, watcher::Event::InitDone);
    f.source.drain();
    assert_eq!(f.names(), vec!["a", "b"]);
    assert!(f.source.waiting.is_empty());
    // After the first list, a new Service enters at once.
    f.send(
        Resource3::Service,
        watcher::Event::Apply(service("c", "10.96.0.4")),
    );
    f.source.drain();
    assert_eq!(f.names(), vec!["a", "b", "c"]);
}

/// This Node's labels are followed (a zone change recomputes hints), and its deletion
/// timestamp is what /healthz reads.
#[test]
fn the_node_is_followed() {
    let mut f = Feed::new();
    f.list(
        Resource3::Node,
        vec![node(json!({"topology.kubernetes.io/zone": "z1"}), false)],
    );
    f.source.drain();
    assert!(!f.source.node_deleting());
    let zone = |f: &KubeSource| {
        let h = &f.kinds[Resource3::Node as usize].held[&(String::new(), "node-a".into())];
        match &h.object {
            Object::Node(n) => {
                n.metadata.labels.as_ref().unwrap()["topology.kubernetes.io/zone"].clone()
            }
            _ => unreachable!(),
        }
    };
    assert_eq!(zone(&f.source), "z1");
    f.send(
        Resource3::Node,
        watcher::Event::Apply(node(json!({"topology.kubernetes.io/zone": "z2"}), true)),
    );
    f.source.drain();
    assert_eq!(zone(&f.source), "z2");
    assert!(f.source.node_deleting());
    // Back without a deletion timestamp (the deletion was cancelled): eligible again; then
    // deleted outright (a Node has no finalizers): not eligible, until it is back.
    let steps = [
        (watcher::Event::Apply(node(json!({}), false)), false),
        (watcher::Event::Delete(node(json!({}), false)), true),
        (watcher::Event::Apply(node(json!({}), false)), false),
    ];
    for (event, deleting) in steps {
        f.send(Resource3::Node, event);
        f.source.drain();
        assert_eq!(f.source.node_deleting(), deleting);
    }
}

/// The lean decode keeps exactly what the model reads: the model's output from lean objects
/// equals its output from k8s-openapi's full objects, for slices with every field the
/// model reads; the rest (managedFields, status, other labels and annotations) is dropped.
#[test]
fn lean_objects_build_what_full_objects_build() {
    let full_slice = json!({
        "metadata": {"name": "web-x", "namespace": "prod", "resourceVersion": "5",
                     "labels": {"kubernetes.io/service-name": "web", "other": "x"},
                     "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:02Z",
                                     "big": "y".repeat(1000)},
                     "managedFields": [{"manager": "m", "fieldsV1": {"f:endpoints": {}}}]},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": ["10.1.0.1", "10.1.0.9"], "nodeName": "node-a",
             "conditions": {"ready": true, "serving": true, "terminating": false},
             "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
             "zone": "z1", "targetRef": {"kind": "Pod", "name": "p"}},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true,
                                                       "terminating": true}},
            {"addresses": ["10.1.0.3"]},
        ],
    });
    let full: EndpointSlice = serde_json::from_value(full_slice.clone()).unwrap();
    let lean: LeanSlice = serde_json::from_value(full_slice.clone()).unwrap();
    assert_eq!(lean.slice, Slice::from(&full));
    assert!(lean.trigger_time().is_some());
    let kept = lean.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        kept.keys().collect::<Vec<_>>(),
        vec![TRIGGER_TIME_ANNOTATION]
    );
    assert!(lean.metadata.managed_fields.is_none());

    let mut svc = service("web", "10.96.0.10");
    svc["metadata"]["namespace"] = json!("prod");
    svc["metadata"]["annotations"][model::ANNOTATION_LB_ALGORITHM] = json!("maglev");
    svc["spec"]["ports"] = json!([{"name": "http", "port": 80, "targetPort": "http"},
                                  {"name": "dns", "port": 53, "protocol": "UDP"}]);
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    let lean = serde_json::from_value::<LeanService>(svc.clone())
        .unwrap()
        .into_service();
    assert!(
        lean.metadata.labels.is_none(),
        "labels the model does not read are dropped"
    );
    assert_eq!(lean.metadata.annotations.as_ref().unwrap().len(), 1);
    assert!(lean.status.is_none() && lean.metadata.managed_fields.is_none());

    let mut f = Feed::new();
    f.list(
        Resource3::Node,
        vec![node(json!({"topology.kubernetes.io/zone": "z1"}), false)],
    );
    f.list(Resource3::Slice, vec![full_slice.clone()]);
    f.list(Resource3::Service, vec![svc.clone()]);
    let built = f.built();
    assert_eq!(built.frontends.len(), 2);
    assert_eq!(
        built,
        from_scratch(
            &[svc],
            &[full_slice],
            &[node(json!({"topology.kubernetes.io/zone": "z1"}), false)]
        )
    );
}

/// Random event sequences, as the watchers can deliver them (updates, deletes, relists, a
/// relist cut short by another failure), over a small set of objects: after every step the
/// event-driven index builds what the objects the API server holds build from scratch.
mod random_sequences {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const SERVICES: usize = 3;
    const SLICES: usize = 5;

    /// Object `i` of `resource`, in its `variant`.
    fn object(resource: Resource3, i: usize, variant: usize) -> Value {
        match resource {
            Resource3::Service => service(&format!("s{i}"), &format!("10.96.{variant}.{}", i + 1)),
            Resource3::Slice => slice(
                &format!("sl{i}"),
                &format!("s{}", i % SERVICES),
                &format!("10.1.{i}.{}", variant + 1),
            ),
            Resource3::Node => node(
                json!({"topology.kubernetes.io/zone": format!("z{variant}")}),
                false,
            ),
        }
    }

    fn count(resource: Resource3) -> usize {
        match resource {
            Resource3::Service => SERVICES,
            Resource3::Slice => SLICES,
            Resource3::Node => 1,
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Apply(Resource3, usize, usize),
        Delete(Resource3, usize),
        /// A complete relist naming these objects (in these variants).
        Relist(Resource3, Vec<(usize, usize)>),
        /// A relist that fails after its first `n` objects, then a complete one.
        CutRelist(Resource3, Vec<(usize, usize)>, usize, Vec<(usize, usize)>),
    }

    fn resource() -> impl Strategy<Value = Resource3> {
        prop_oneof![
            3 => Just(Resource3::Service),
            4 => Just(Resource3::Slice),
            1 => Just(Resource3::Node),
        ]
    }

    fn listing(r: Resource3) -> impl Strategy<Value = Vec<(usize, usize)>> {
        proptest::collection::btree_map(0..count(r), 0..2usize, 0..=count(r))
            .prop_map(|m| m.into_iter().collect())
    }

    fn step() -> impl Strategy<Value = Step> {
        resource().prop_flat_map(|r| {
            prop_oneof![
                4 => (0..count(r), 0..2usize).prop_map(move |(i, v)| Step::Apply(r, i, v)),
                2 => (0..count(r)).prop_map(move |i| Step::Delete(r, i)),
                1 => listing(r).prop_map(move |l| Step::Relist(r, l)),
                1 => (listing(r), 0..4usize, listing(r))
                    .prop_map(move |(a, n, b)| Step::CutRelist(r, a, n, b)),
            ]
        })
    }

    /// What the API server holds: (resource, object) -> variant.
    type Held = BTreeMap<(usize, usize), usize>;

    fn relist(f: &Feed, held: &mut Held, r: Resource3, objects: &[(usize, usize)]) {
        f.list(r, objects.iter().map(|&(i, v)| object(r, i, v)).collect());
        held.retain(|(res, _), _| *res != r as usize);
        held.extend(objects.iter().map(|&(i, v)| ((r as usize, i), v)));
    }

    fn from_held(held: &Held) -> Desired {
        let of = |r: Resource3| -> Vec<Value> {
            (held.iter())
                .filter(|((res, _), _)| *res == r as usize)
                .map(|(&(_, i), &v)| object(r, i, v))
                .collect()
        };
        from_scratch(
            &of(Resource3::Service),
            &of(Resource3::Slice),
            &of(Resource3::Node),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn the_index_builds_what_the_objects_build(
            first in (listing(Resource3::Service), listing(Resource3::Slice), listing(Resource3::Node)),
            order in Just(Resource3::ALL).prop_shuffle(),
            steps in proptest::collection::vec(step(), 0..25),
        ) {
            let mut f = Feed::new();
            let mut held = Held::new();
            for r in order {
                let objects = match r {
                    Resource3::Service => &first.0,
                    Resource3::Slice => &first.1,
                    Resource3::Node => &first.2,
                };
                relist(&f, &mut held, r, objects);
            }
            prop_assert_eq!(f.built(), from_held(&held), "after the first lists");
            for (n, step) in steps.iter().enumerate() {
                match step {
                    Step::Apply(r, i, v) => {
                        f.send(*r, watcher::Event::Apply(object(*r, *i, *v)));
                        held.insert((*r as usize, *i), *v);
                    }
                    Step::Delete(r, i) => {
                        let v = held.remove(&(*r as usize, *i)).unwrap_or(0);
                        f.send(*r, watcher::Event::Delete(object(*r, *i, v)));
                    }
                    Step::Relist(r, objects) => relist(&f, &mut held, *r, objects),
                    Step::CutRelist(r, cut, k, objects) => {
                        f.send(*r, watcher::Event::Init);
                        for &(i, v) in cut.iter().take(*k) {
                            f.send(*r, watcher::Event::InitApply(object(*r, i, v)));
                            // Applied as it came: the server held it then.
                            held.insert((*r as usize, i), v);
                        }
                        prop_assert_eq!(f.built(), from_held(&held), "step {}: mid-relist", n);
                        relist(&f, &mut held, *r, objects);
                    }
                }
                prop_assert_eq!(f.built(), from_held(&held), "step {}: {:?}", n, step);
            }
        }
    }
}
