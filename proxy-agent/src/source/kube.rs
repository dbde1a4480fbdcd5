//! The Kubernetes API source: kube-rs reflectors (list+watch, default backoff, relist on
//! 410 Gone) for Services, EndpointSlices and this node's Node. The stores keep the last
//! state the API server sent, so an API server that goes away changes nothing: the model keeps
//! seeing the same objects until the watches resume and the reflectors converge.

use std::{
    cell::Cell,
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use super::{Progress, Snapshot, Source};
use crate::model::{Index, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ObjectRef, ServiceRef, Slice};

/// kube-proxy's informer selector: objects of other proxies and headless ones are not ours.
fn not_ours() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// EndpointSlice annotation: when the endpoints controller saw the change that made the slice.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub struct KubeSource {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    nodes: reflector::Store<Node>,
    tasks: Vec<JoinHandle<()>>,
    /// The stores' objects as indexed, by address (the Arc kept here keeps an address from
    /// being reused while indexed): a store replaces an object it updates, so a new address is
    /// a change, and a refresh costs a walk of the stores plus what changed.
    indexed: HashMap<usize, (Indexed, Cell<bool>)>,
    index: Index,
    /// The newest `last-change-trigger-time` among each Service's slices as they arrived
    /// (read once per slice version, not per sync).
    triggers: HashMap<ServiceRef, SystemTime>,
}

/// A stored object and the model's view of it.
enum Indexed {
    Service(Arc<Service>),
    /// The model keeps a slim view of each slice (see [`Slice`]); the stored object is
    /// kept for its address.
    Slice {
        _stored: Arc<EndpointSlice>,
        slim: Arc<Slice>,
    },
    Node(Arc<Node>),
}

impl Indexed {
    fn object(&self) -> ObjectRef<'_> {
        match self {
            Indexed::Service(s) => ObjectRef::Service(s),
            Indexed::Slice { slim, .. } => ObjectRef::Slice(slim),
            Indexed::Node(n) => ObjectRef::Node(n),
        }
    }
}

/// The Service a slice belongs to (for its trigger time).
fn owner(slice: &EndpointSlice) -> Option<ServiceRef> {
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get(crate::model::LABEL_SERVICE_NAME)?;
    Some(ServiceRef::new(slice.metadata.namespace.as_deref(), name))
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    wake: Arc<Notify>,
) -> (reflector::Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if failing {
                        info!(%kind, "watch resumed");
                        failing = false;
                    }
                    // The model finds what changed (objects are shared, so unchanged ones
                    // compare equal by pointer).
                    wake.notify_one();
                }
                Err(e) => {
                    // The store keeps its last state; the backoff paces the retries.
                    if !failing {
                        warn!(%kind, error = %e, "watch failed; keeping the last known state and retrying");
                        failing = true;
                    }
                }
            }
        }
    });
    (store, task)
}

impl KubeSource {
    /// Starts the three reflectors; `wake` is notified on every change.
    pub fn start(client: Client, node_name: &str, wake: Arc<Notify>) -> Self {
        let selected = || watcher::Config::default().labels(&not_ours());
        let (services, t1) = spawn_reflector(
            Api::<Service>::all(client.clone()),
            selected(),
            wake.clone(),
        );
        let (slices, t2) = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            selected(),
            wake.clone(),
        );
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let (nodes, t3) = spawn_reflector(Api::<Node>::all(client), node_cfg, wake);
        KubeSource {
            services,
            slices,
            nodes,
            tasks: vec![t1, t2, t3],
            indexed: HashMap::new(),
            index: Index::default(),
            triggers: HashMap::new(),
        }
    }

    /// Waits until every store holds a complete first list.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        Ok(())
    }

    /// Brings the index up to date with the stores: objects the stores no longer hold (or
    /// replaced) leave it, new ones enter it. The index records the Services this touched.
    pub fn refresh(&mut self) -> &mut Index {
        let origin: Arc<str> = Arc::from("kube-apiserver");
        // Mark what the stores hold, add what is new, then sweep what was not marked. The
        // stores are walked by address only: taking (cloning) every object would touch each
        // one's memory, milliseconds at 20,000 objects.
        for (_, seen) in self.indexed.values() {
            seen.set(false);
        }
        let indexed = &self.indexed;
        let is_new = |address: usize| match indexed.get(&address) {
            Some((_, seen)) => {
                seen.set(true);
                false
            }
            None => true,
        };
        let services = self
            .services
            .state_filter(|o| is_new(o as *const Service as usize));
        let slices = self
            .slices
            .state_filter(|o| is_new(o as *const EndpointSlice as usize));
        let nodes = self
            .nodes
            .state_filter(|o| is_new(o as *const Node as usize));
        let mut add = |address: usize, e: Indexed| {
            self.index.add((origin.clone(), address), e.object());
            self.indexed.insert(address, (e, Cell::new(true)));
        };
        for o in services {
            add(Arc::as_ptr(&o) as usize, Indexed::Service(o));
        }
        for o in slices {
            if let (Some(svc), Some(t)) = (owner(&o), trigger_time(&o)) {
                let newest = self.triggers.entry(svc).or_insert(t);
                *newest = (*newest).max(t);
            }
            let slim = Arc::new(Slice::from(&*o));
            add(
                Arc::as_ptr(&o) as usize,
                Indexed::Slice { _stored: o, slim },
            );
        }
        for o in nodes {
            add(Arc::as_ptr(&o) as usize, Indexed::Node(o));
        }
        self.indexed.retain(|address, (e, seen)| {
            if !seen.get() {
                self.index
                    .remove_one(&(origin.clone(), *address), e.object());
            }
            seen.get()
        });
        if self.triggers.len() > 2 * self.index.len() + 64 {
            // Services deleted since: forgotten now and then, not on every sync.
            let index = &self.index;
            self.triggers.retain(|svc, _| index.contains(svc));
        }
        &mut self.index
    }
}

impl Source for KubeSource {
    /// The index follows the stores object by object: a read costs a walk of the stores
    /// (pointer comparisons) and what it touched, and names the Services touched.
    fn read(&mut self, _full: bool, _progress: Option<Progress<'_>>) -> Option<Snapshot<'_>> {
        let index = self.refresh();
        let touched = index.take_touched();
        Some(Snapshot {
            index,
            touched,
            problems: vec![],
            unchanged: false,
            read_before: None,
        })
    }

    /// The reflectors follow from the start (they notify the agent's wake-up).
    fn follow(&mut self, _wake: &Arc<Notify>) -> anyhow::Result<()> {
        Ok(())
    }

    fn trigger_time(&self, service: &ServiceRef) -> Option<SystemTime> {
        self.triggers.get(service).copied()
    }
}

/// A slice's `last-change-trigger-time` annotation.
fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let t = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?
        .parse::<Timestamp>()
        .ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(t.as_nanosecond().max(0) as u64))
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": ip,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}],
        }))
        .unwrap()
    }

    fn service(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
        }))
        .unwrap()
    }

    fn touched(k: &mut KubeSource) -> Option<Vec<String>> {
        let t = k.refresh().take_touched()?;
        Some(t.iter().map(|r| r.name.to_string()).collect())
    }

    /// A refresh indexes what the stores changed, and nothing else: an unchanged object stays
    /// the same model input (the model recomputes a Service whose inputs are new objects), and
    /// the index always equals one built from scratch from the stores.
    #[tokio::test]
    async fn a_refresh_indexes_only_what_the_stores_changed() {
        let (slices, mut slice_w) = reflector::store::<EndpointSlice>();
        let (services, mut svc_w) = reflector::store::<Service>();
        let (nodes, _w) = reflector::store::<Node>();
        svc_w.apply_watcher_event(&watcher::Event::Apply(service("web", "10.96.0.10")));
        svc_w.apply_watcher_event(&watcher::Event::Apply(service("api", "10.96.0.11")));
        slice_w.apply_watcher_event(&watcher::Event::Apply(slice("a", "10.1.0.1")));
        slice_w.apply_watcher_event(&watcher::Event::Apply(slice("b", "10.1.0.2")));
        let mut k = KubeSource {
            services,
            slices,
            nodes,
            tasks: vec![],
            indexed: HashMap::new(),
            index: Index::default(),
            triggers: HashMap::new(),
        };
        let from_scratch = |k: &KubeSource| {
            let origin: Arc<str> = Arc::from("kube-apiserver");
            let objects = crate::model::Objects {
                services: k
                    .services
                    .state()
                    .into_iter()
                    .map(|object| crate::model::Sourced {
                        origin: origin.clone(),
                        object,
                    })
                    .collect(),
                slices: k
                    .slices
                    .state()
                    .iter()
                    .map(|o| crate::model::Sourced {
                        origin: origin.clone(),
                        object: Arc::new(Slice::from(&**o)),
                    })
                    .collect(),
                nodes: vec![],
            };
            crate::model::build(&objects, "node-a")
        };
        let built = |k: &mut KubeSource| {
            crate::model::Model::default()
                .build(k.refresh(), crate::model::Changes::All, "node-a", true)
                .desired
        };
        assert_eq!(
            touched(&mut k),
            None,
            "a new index: everything is to be computed"
        );
        assert_eq!(built(&mut k), from_scratch(&k));
        assert_eq!(touched(&mut k), Some(vec![]), "nothing changed");

        // One slice replaced: its Service only; the other slice stays the same input.
        let slim_a = |k: &KubeSource| {
            k.indexed
                .values()
                .find_map(|(e, _)| match e {
                    Indexed::Slice { slim, .. } if slim.name.as_deref() == Some("a") => {
                        Some(slim.clone())
                    }
                    _ => None,
                })
                .expect("slice a is indexed")
        };
        let a = slim_a(&k);
        slice_w.apply_watcher_event(&watcher::Event::Apply(slice("b", "10.1.0.3")));
        assert_eq!(touched(&mut k), Some(vec!["web".to_string()]));
        assert!(Arc::ptr_eq(&a, &slim_a(&k)), "unchanged slice, same view");
        assert_eq!(built(&mut k), from_scratch(&k));

        // A Service deleted, then one added.
        svc_w.apply_watcher_event(&watcher::Event::Delete(service("api", "10.96.0.11")));
        assert_eq!(touched(&mut k), Some(vec!["api".to_string()]));
        svc_w.apply_watcher_event(&watcher::Event::Apply(service("db", "10.96.0.12")));
        assert_eq!(touched(&mut k), Some(vec!["db".to_string()]));
        assert_eq!(built(&mut k), from_scratch(&k));
        slice_w.apply_watcher_event(&watcher::Event::Delete(slice("a", "10.1.0.1")));
        k.refresh();
        assert_eq!(k.indexed.len(), 3, "views of deleted objects are dropped");
        assert_eq!(built(&mut k), from_scratch(&k));

        // A slice's trigger time is read as it arrives; the newest one counts.
        let web = ServiceRef::new(Some("default"), "web");
        assert_eq!(k.trigger_time(&web), None);
        for (ip, at) in [
            ("10.1.0.4", "2026-01-01T00:00:02Z"),
            ("10.1.0.5", "2026-01-01T00:00:01Z"),
        ] {
            let mut s = slice("b", ip);
            s.metadata.annotations =
                Some([(TRIGGER_TIME_ANNOTATION.to_string(), at.to_string())].into());
            slice_w.apply_watcher_event(&watcher::Event::Apply(s));
            k.refresh();
        }
        let newest: Timestamp = "2026-01-01T00:00:02Z".parse().unwrap();
        assert_eq!(
            k.trigger_time(&web),
            Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(newest.as_nanosecond() as u64))
        );
    }
}
