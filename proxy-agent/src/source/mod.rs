//! Where objects come from: a manifests directory, or the Kubernetes API. Each keeps a model
//! [`Index`] up to date and reaches the rest of the agent through [`Source`] alone.

pub mod kube;
pub mod manifests;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use crate::{
    model::{Index, Problem, ServiceRef},
    wake::Wake,
};

/// What a source has now, for one sync.
pub struct Snapshot<'a> {
    pub index: &'a Index,
    /// The Services whose objects changed since the previous snapshot (None: unknown).
    pub touched: Option<BTreeSet<ServiceRef>>,
    /// Problems of the source's own input (files that do not parse), all of them each time.
    pub problems: Vec<Problem>,
    /// Nothing changed since the previous snapshot.
    pub unchanged: bool,
    /// How long the read took, when it began before it was asked for (the first read, begun
    /// while the datapath loaded).
    pub read_before: Option<Duration>,
    /// How many objects changed since the previous snapshot, for a source that does not
    /// count its events as they come (a manifests directory).
    pub changes: crate::model::ObjectChanges,
}

/// Called with the index while a long read goes on (a cold start), so that the Services read
/// so far can be programmed while the rest is read.
pub type Progress<'a> = &'a mut dyn FnMut(&mut Index);

/// A source of Services, EndpointSlices and Nodes, as the agent sees it (kube-proxy's
/// `ServiceHandler` and `EndpointSliceHandler` in `pkg/proxy/config`, pulled rather than
/// pushed: a source records what its watch delivered, the agent reads it when it syncs).
pub trait Source {
    /// Brings the index up to date and hands it over; None when the source cannot be read
    /// now (what is programmed is kept). `full`: read everything, not only what changed.
    fn read(&mut self, full: bool, progress: Option<Progress<'_>>) -> Option<Snapshot<'_>>;

    /// Whether a first read calls `progress` as it goes (so a first sync from empty maps can
    /// program while it reads).
    fn reads_progressively(&self) -> bool {
        false
    }

    /// Begins following changes, after the first sync; `wake` is notified of each.
    fn follow(&mut self, wake: &Wake) -> anyhow::Result<()>;

    /// When to read again though nothing woke the agent (a file still being written).
    fn next_read(&self) -> Option<Instant> {
        None
    }

    /// The newest `endpoints.kubernetes.io/last-change-trigger-time` of the Service's
    /// EndpointSlices, for network programming latency.
    fn trigger_time(&self, _service: &ServiceRef) -> Option<SystemTime> {
        None
    }

    /// This node's Node is being deleted (it has a deletion timestamp, or is gone): /healthz fails so
    /// that load balancers stop sending to the node, as kube-proxy's does.
    fn node_deleting(&self) -> bool {
        false
    }
}

/// Which source `proxy-agent run` was given.
pub enum SourceConfig {
    /// A manifests directory, and the largest file read.
    Manifests(PathBuf, u64),
    Kubeconfig(PathBuf),
    InCluster,
}

/// A source checked but not started: nothing read, no network used yet.
pub enum Checked {
    Manifests(manifests::ManifestDir),
    Kube(::kube::Client),
}

impl SourceConfig {
    /// The cheap checks: the directory exists, the kubeconfig reads.
    pub async fn check(&self) -> anyhow::Result<Checked> {
        let config = match self {
            SourceConfig::Manifests(dir, max_file_bytes) => {
                let dir = manifests::ManifestDir::new(dir)?.with_max_file_bytes(*max_file_bytes);
                return Ok(Checked::Manifests(dir));
            }
            SourceConfig::Kubeconfig(path) => {
                let kc = ::kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                let options = ::kube::config::KubeConfigOptions::default();
                ::kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            SourceConfig::InCluster => ::kube::Config::incluster().context(
                "in-cluster config (KUBERNETES_SERVICE_HOST and the service account); \
                 outside a pod use --kubeconfig or --manifests",
            )?,
        };
        Ok(Checked::Kube(::kube::Client::try_from(config)?))
    }
}

impl Checked {
    /// Begins the first read while the caller goes on (loading the datapath): the manifests
    /// are parsed on worker threads, the API's watchers begin their lists; the first
    /// [`Source::read`] takes what they have and waits for the rest. `wake` is notified of
    /// changes the API's watches deliver.
    pub fn start(
        self,
        node_name: &str,
        initial_list: kube::watch::InitialList,
        wake: &Wake,
        metrics: &Arc<crate::metrics::Metrics>,
    ) -> Box<dyn Source> {
        match self {
            Checked::Manifests(dir) => Box::new(manifests::ManifestSource::start(dir)),
            Checked::Kube(client) => Box::new(kube::KubeSource::start(
                client,
                node_name,
                initial_list,
                wake.clone(),
                metrics.clone(),
            )),
        }
    }
}
