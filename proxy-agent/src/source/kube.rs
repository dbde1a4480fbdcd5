//! The Kubernetes API source: kube-rs reflectors (list+watch, default backoff, relist on
//! 410 Gone) for Services, EndpointSlices and this node's Node. The stores keep the last
//! state the API server sent, so an API server that goes away changes nothing: the model keeps
//! seeing the same objects until the watches resume and the reflectors converge.

use std::{
    collections::{BTreeMap, HashMap},
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

use crate::model::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, Objects, ServiceRef, Slice, Sourced};

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
    /// The model's view of each stored slice, kept while the store holds the same object
    /// (keyed by its address, which the Arc kept alongside keeps from being reused), so an
    /// unchanged slice stays the same input to the model.
    slim: HashMap<usize, (Arc<EndpointSlice>, Arc<Slice>)>,
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
            slim: HashMap::new(),
        }
    }

    /// Waits until every store holds a complete first list.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        Ok(())
    }

    pub fn objects(&mut self) -> Objects {
        fn sourced<K>(store: &reflector::Store<K>) -> Vec<Sourced<K>>
        where
            K: Resource + Clone + 'static,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            let origin: Arc<str> = Arc::from("kube-apiserver");
            store
                .state()
                .iter()
                .map(|o| Sourced {
                    origin: origin.clone(),
                    object: o.clone(),
                })
                .collect()
        }
        let origin: Arc<str> = Arc::from("kube-apiserver");
        let mut slim = HashMap::with_capacity(self.slim.len());
        let slices = self
            .slices
            .state()
            .into_iter()
            .map(|o| {
                let key = Arc::as_ptr(&o) as usize;
                let s = match self.slim.remove(&key) {
                    Some((_, s)) => s,
                    None => Arc::new(Slice::from(&*o)),
                };
                slim.insert(key, (o, s.clone()));
                Sourced {
                    origin: origin.clone(),
                    object: s,
                }
            })
            .collect();
        self.slim = slim;
        Objects {
            services: sourced(&self.services),
            slices,
            nodes: sourced(&self.nodes),
        }
    }

    /// For network programming latency: the newest `last-change-trigger-time` of each
    /// Service's EndpointSlices.
    pub fn trigger_times(&self) -> BTreeMap<ServiceRef, SystemTime> {
        let mut out = BTreeMap::new();
        for s in self.slices.state() {
            let Some(owner) = owner(&s) else { continue };
            let Some(t) = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            else {
                continue;
            };
            let Ok(ts) = t.parse::<Timestamp>() else {
                continue;
            };
            let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(ts.as_nanosecond().max(0) as u64);
            let e = out.entry(owner).or_insert(t);
            if t > *e {
                *e = t;
            }
        }
        out
    }
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

    /// The model recomputes a Service when an input is a different object: an unchanged
    /// slice must come out as the same `Arc<Slice>` every time.
    #[tokio::test]
    async fn unchanged_slices_stay_the_same_model_input() {
        let (slices, mut writer) = reflector::store::<EndpointSlice>();
        let (services, _w1) = reflector::store::<Service>();
        let (nodes, _w2) = reflector::store::<Node>();
        writer.apply_watcher_event(&watcher::Event::Apply(slice("a", "10.1.0.1")));
        writer.apply_watcher_event(&watcher::Event::Apply(slice("b", "10.1.0.2")));
        let mut k = KubeSource {
            services,
            slices,
            nodes,
            tasks: vec![],
            slim: HashMap::new(),
        };
        let by_name = |o: &Objects| -> BTreeMap<String, Arc<Slice>> {
            o.slices
                .iter()
                .map(|s| (s.object.name.clone().unwrap(), s.object.clone()))
                .collect()
        };
        let first = by_name(&k.objects());
        writer.apply_watcher_event(&watcher::Event::Apply(slice("b", "10.1.0.3")));
        let second = by_name(&k.objects());
        assert!(Arc::ptr_eq(&first["a"], &second["a"]), "unchanged");
        assert!(!Arc::ptr_eq(&first["b"], &second["b"]), "replaced");
        assert_eq!(
            second["b"].endpoints[0].address.as_deref(),
            Some("10.1.0.3")
        );
        writer.apply_watcher_event(&watcher::Event::Delete(slice("a", "10.1.0.1")));
        assert_eq!(by_name(&k.objects()).len(), 1);
        assert_eq!(k.slim.len(), 1, "views of deleted slices are dropped");
    }
}
