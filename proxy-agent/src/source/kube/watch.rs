//! One kube-rs watcher per resource, its events handed to the source over a channel (the
//! source applies them to its index when the agent reads). kube-rs's reflector store is not
//! used: it would hold a second, full copy of every object; the source's index is the store.

use std::{
    fmt::Debug,
    sync::{Arc, mpsc::Sender},
};

use futures::StreamExt as _;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{
    metrics::{Metrics, ResourceLabel},
    wake::Wake,
};

/// The three resources the source follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource3 {
    Service = 0,
    Slice = 1,
    Node = 2,
}

impl Resource3 {
    pub const ALL: [Resource3; 3] = [Resource3::Service, Resource3::Slice, Resource3::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource3::Service => "services",
            Resource3::Slice => "endpointslices",
            Resource3::Node => "nodes",
        }
    }

    /// Which change its events are (kube-proxy counts Services and EndpointSlices).
    pub fn change_kind(self) -> Option<crate::model::ChangeKind> {
        match self {
            Resource3::Service => Some(crate::model::ChangeKind::Service),
            Resource3::Slice => Some(crate::model::ChangeKind::EndpointSlice),
            Resource3::Node => None,
        }
    }
}

/// How a watcher gets its first list (and every relist).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InitialList {
    /// A watch with `sendInitialEvents` (streaming list, KEP-3157): served from the API
    /// server's watch cache, object by object, so the agent programs as they arrive. Falls
    /// back to `list` on a server that refuses it.
    Streaming,
    /// One `resourceVersion=0` list (served from the watch cache, unpaged: a paged list
    /// would be read from etcd), then a watch.
    List,
}

/// What a watcher delivers, by resource.
pub struct Delivery<T> {
    pub resource: Resource3,
    pub event: watcher::Event<T>,
}

/// What every watcher shares: how it lists, where its events go, whom they wake, and the
/// metrics it counts in.
pub struct Outlet<T> {
    pub initial: InitialList,
    pub tx: Sender<Delivery<T>>,
    pub wake: Wake,
    pub metrics: Arc<Metrics>,
}

impl<T> Clone for Outlet<T> {
    fn clone(&self) -> Self {
        Outlet {
            initial: self.initial,
            tx: self.tx.clone(),
            wake: self.wake.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Starts a watcher of `K` whose events, as `T`, go out through `out`.
pub fn spawn<K, T>(
    resource: Resource3,
    api: Api<K>,
    config: watcher::Config,
    out: Outlet<T>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: From<K> + Send + 'static,
{
    let Outlet {
        initial,
        tx,
        wake,
        metrics,
    } = out;
    let map = T::from;
    let label = ResourceLabel {
        resource: resource.as_str(),
    };
    tokio::spawn(async move {
        let mut strategy = initial;
        'strategy: loop {
            let cfg = match strategy {
                InitialList::Streaming => config.clone().streaming_lists(),
                InitialList::List => {
                    let mut c = config.clone().any_semantic();
                    // kube-rs leaves resourceVersion=0 out of a paged list.
                    c.page_size = None;
                    c
                }
            };
            let stream = watcher(api.clone(), cfg).default_backoff();
            let mut stream = std::pin::pin!(stream);
            let mut failing = false;
            let mut listed_once = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        if failing {
                            info!(resource = resource.as_str(), "watch resumed");
                            failing = false;
                        }
                        if matches!(event, watcher::Event::Init) {
                            if listed_once {
                                metrics.kube_relists.get_or_create(&label).inc();
                            }
                            listed_once = true;
                        }
                        let event = match event {
                            watcher::Event::Apply(o) => watcher::Event::Apply(map(o)),
                            watcher::Event::Delete(o) => watcher::Event::Delete(map(o)),
                            watcher::Event::InitApply(o) => watcher::Event::InitApply(map(o)),
                            watcher::Event::Init => watcher::Event::Init,
                            watcher::Event::InitDone => watcher::Event::InitDone,
                        };
                        if matches!(
                            event,
                            watcher::Event::Apply(_)
                                | watcher::Event::Delete(_)
                                | watcher::Event::InitApply(_)
                        ) {
                            metrics.record_queued_change(resource.change_kind());
                        }
                        if tx.send(Delivery { resource, event }).is_err() {
                            return; // the source is gone
                        }
                        wake.wake();
                    }
                    Err(e) => {
                        metrics.kube_watch_errors.get_or_create(&label).inc();
                        if strategy == InitialList::Streaming && refuses_streaming(&e) {
                            warn!(resource = resource.as_str(), error = %e,
                                  "the API server refuses streaming lists; listing instead");
                            strategy = InitialList::List;
                            continue 'strategy;
                        }
                        // The index keeps its last state; the backoff (with jitter) paces the
                        // retries.
                        if !failing {
                            warn!(resource = resource.as_str(), error = %e,
                                  "watch failed; keeping the last known state and retrying");
                            failing = true;
                        }
                    }
                }
            }
            return;
        }
    })
}

/// A server without streaming lists (the WatchList feature off, or older than 1.27) rejects
/// `sendInitialEvents` / `resourceVersionMatch` on a watch as an invalid request.
fn refuses_streaming(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::InitialListFailed(kube::Error::Api(status)) => {
            matches!(status.code, 400 | 422)
        }
        watcher::Error::WatchError(status) => matches!(status.code, 400 | 422),
        _ => false,
    }
}
