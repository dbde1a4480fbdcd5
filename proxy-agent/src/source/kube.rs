//! The Kubernetes API source: kube-rs reflectors (list+watch, default backoff, relist on
//! 410 Gone) for Services, EndpointSlices and this node's Node. The stores keep the last
//! state the API server sent, so an API server that goes away changes nothing: the model keeps
//! seeing the same objects until the watches resume and the reflectors converge.

use std::{
    collections::BTreeMap,
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

use crate::model::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, Objects, ServiceRef, Sourced};

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
}

/// The Service a slice belongs to (for its trigger time).
fn owner(slice: &EndpointSlice) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: slice
            .metadata
            .labels
            .as_ref()?
            .get(crate::model::LABEL_SERVICE_NAME)?
            .clone(),
    })
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
        }
    }

    /// Waits until every store holds a complete first list.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        Ok(())
    }

    pub fn objects(&self) -> Objects {
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
        Objects {
            services: sourced(&self.services),
            slices: sourced(&self.slices),
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
