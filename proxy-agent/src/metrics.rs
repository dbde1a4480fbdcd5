//! Prometheus metrics (prometheus-client) and the health/metrics HTTP endpoints.
//!
//! Names follow kube-proxy's where one exists (`*_sync_proxy_rules_*`,
//! `network_programming_duration_seconds`), under the `proxy_` prefix.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::{BACKEND_MAP, CT_MAP, CT_STATES, REV_NAT_MAP, SVC_MAP};
use tracing::warn;

use crate::{maps::PinnedMaps, model::ProblemReason, sync::MapState};

/// Which kind of sync (the `kind` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SyncKind {
    /// Everything compared.
    Full,
    /// Only the Services a change touched.
    Partial,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

impl EncodeLabelValue for SyncKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub kind: SyncKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapName {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteOp {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CtState {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureName {
    pub name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicy {
    pub traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: u16,
}

type GaugeF64 = Gauge<f64, std::sync::atomic::AtomicU64>;

pub struct Metrics {
    pub registry: Registry,
    /// The maps' capacities, for their fill ratios.
    capacity: crate::capacity::Capacity,
    pub datapath_feature: Family<FeatureName, Gauge>,
    pub sync_duration: Family<SyncLabels, Histogram>,
    pub programming_latency: Histogram,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub rejected: Family<Reason, Counter>,
    pub map_fill: Family<MapName, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub sync_errors: Counter,
    pub map_writes: Family<WriteOp, Counter>,
    pub frontends_refused: Gauge,
    pub maglev_table_fallbacks: Counter,
    pub conntrack_entries: Family<CtState, Gauge>,
    pub conntrack_collected: Counter,
    pub kube_relists: Family<ResourceLabel, Counter>,
    pub kube_watch_errors: Family<ResourceLabel, Counter>,
    pub sync_last: GaugeF64,
    pub sync_last_queued: GaugeF64,
    pub service_changes: Counter,
    pub service_changes_pending: Gauge,
    pub endpoint_changes: Counter,
    pub endpoint_changes_pending: Gauge,
    pub no_local_endpoints: Family<TrafficPolicy, Gauge>,
    pub healthz_answers: Family<Code, Counter>,
    pub livez_answers: Family<Code, Counter>,
}

/// Reads the datapath's per-CPU counters at scrape time.
#[derive(Debug)]
struct DatapathCounters {
    bpffs_dir: PathBuf,
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = match PinnedMaps::open(&self.bpffs_dir).and_then(|m| m.counters()) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read datapath counters for a scrape");
                return Ok(());
            }
        };
        let mut desc = encoder.encode_descriptor(
            "datapath_events",
            "Datapath decisions by reason (summed over CPUs), read from the pinned counters map",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (c, v) in counters {
            let labels = Reason { reason: c.name() };
            ConstCounter::new(v).encode(desc.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub fn new(bpffs_dir: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("proxy");
        let sync_duration = Family::<SyncLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to compute and write one sync",
            sync_duration.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the map write",
            programming_latency.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "frontends_programmed",
            "ClusterIP:port/protocol frontends in the maps",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register(
            "backends_programmed",
            "Distinct backends in the maps",
            backends.clone(),
        );
        let rejected = Family::<Reason, Counter>::default();
        registry.register(
            "objects_rejected",
            "Objects or fields not programmed, by reason",
            rejected.clone(),
        );
        let map_fill = Family::<MapName, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "map_fill_ratio",
            "Entries / capacity of each writer-owned map, and of the conntrack map (at its last collection pass)",
            map_fill.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "sync_errors",
            "Frontends a sync could not write (kept their old state)",
            sync_errors.clone(),
        );
        let map_writes = Family::<WriteOp, Counter>::default();
        registry.register(
            "map_writes",
            "Map entries written by syncs and retries, by op (update, delete): a restart on unchanged input writes none",
            map_writes.clone(),
        );
        let frontends_refused = Gauge::default();
        registry.register(
            "frontends_refused",
            "Frontends refused as a whole because a map is full, waiting for room (retried with backoff, and as soon as a delete makes room)",
            frontends_refused.clone(),
        );
        let maglev_table_fallbacks = Counter::default();
        registry.register(
            "maglev_table_fallbacks",
            "Frontends written with random choice though they ask for Maglev: every table was taken (--maglev-tables)",
            maglev_table_fallbacks.clone(),
        );
        let conntrack_entries = Family::<CtState, Gauge>::default();
        registry.register(
            "conntrack_entries",
            "Packet-path conntrack entries by state (syn, established, closing, udp), at the last collection pass",
            conntrack_entries.clone(),
        );
        let conntrack_collected = Counter::default();
        registry.register(
            "conntrack_collected",
            "Expired packet-path conntrack entries deleted by the agent",
            conntrack_collected.clone(),
        );
        let datapath_feature = Family::<FeatureName, Gauge>::default();
        registry.register(
            "datapath_feature",
            "Whether the kernel offers a feature the datapath uses (1) or does without it (0), probed at start",
            datapath_feature.clone(),
        );
        let kube_relists = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "kube_relists",
            "Lists of a resource after the first one (a watch that could not resume, e.g. 410 Gone), Kubernetes API source",
            kube_relists.clone(),
        );
        let kube_watch_errors = Family::<ResourceLabel, Counter>::default();
        registry.register(
            "kube_watch_errors",
            "Failed lists and watches of a resource (each retried after a backoff with jitter), Kubernetes API source",
            kube_watch_errors.clone(),
        );
        // kube-proxy's names for what it has too (its `kubeproxy_` prefix is `proxy_` here).
        let sync_last = GaugeF64::default();
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "When the last sync that kept the datapath in sync ended (seconds since the epoch)",
            sync_last.clone(),
        );
        let sync_last_queued = GaugeF64::default();
        registry.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "When a source last asked for a sync (a change): newer than the last sync's end for long means a sync hangs",
            sync_last_queued.clone(),
        );
        let service_changes = Counter::default();
        registry.register(
            "sync_proxy_rules_service_changes",
            "Service changes: watch events (Kubernetes API source, as kube-proxy counts them), or Services whose content changed (manifests)",
            service_changes.clone(),
        );
        let service_changes_pending = Gauge::default();
        registry.register(
            "sync_proxy_rules_service_changes_pending",
            "Service events received and not yet taken by a sync (Kubernetes API source)",
            service_changes_pending.clone(),
        );
        let endpoint_changes = Counter::default();
        registry.register(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlice changes: watch events (Kubernetes API source, as kube-proxy counts them), or EndpointSlices whose content changed (manifests)",
            endpoint_changes.clone(),
        );
        let endpoint_changes_pending = Gauge::default();
        registry.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "EndpointSlice events received and not yet taken by a sync (Kubernetes API source)",
            endpoint_changes_pending.clone(),
        );
        let no_local_endpoints = Family::<TrafficPolicy, Gauge>::default();
        registry.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Service ports with a Local traffic policy and no local endpoint (they reject), by policy",
            no_local_endpoints.clone(),
        );
        let healthz_answers = Family::<Code, Counter>::default();
        registry.register(
            "proxy_healthz",
            "/healthz answers by HTTP status code",
            healthz_answers.clone(),
        );
        let livez_answers = Family::<Code, Counter>::default();
        registry.register(
            "proxy_livez",
            "/livez answers by HTTP status code",
            livez_answers.clone(),
        );
        registry.register_collector(Box::new(DatapathCounters { bpffs_dir }));
        Metrics {
            registry,
            capacity: Default::default(),
            datapath_feature,
            sync_duration,
            programming_latency,
            frontends,
            backends,
            rejected,
            map_fill,
            sync_errors,
            map_writes,
            frontends_refused,
            maglev_table_fallbacks,
            conntrack_entries,
            conntrack_collected,
            kube_relists,
            kube_watch_errors,
            sync_last,
            sync_last_queued,
            service_changes,
            service_changes_pending,
            endpoint_changes,
            endpoint_changes_pending,
            no_local_endpoints,
            healthz_answers,
            livez_answers,
        }
    }

    /// The wake-up the sources use: it records when a sync was last asked for.
    pub fn wake(&self) -> crate::wake::Wake {
        crate::wake::Wake::recording(self.sync_last_queued.clone())
    }

    /// A watch delivered an event of this kind (None: not a Service or an EndpointSlice):
    /// a change, as kube-proxy counts them (every event), pending until a sync takes it.
    pub fn record_queued_change(&self, kind: Option<crate::model::ChangeKind>) {
        match kind {
            Some(crate::model::ChangeKind::Service) => {
                self.service_changes.inc();
                self.service_changes_pending.inc();
            }
            Some(crate::model::ChangeKind::EndpointSlice) => {
                self.endpoint_changes.inc();
                self.endpoint_changes_pending.inc();
            }
            None => {}
        }
    }

    /// A sync took its source's changes: nothing is pending any more. `c`: the changes a
    /// source without events of its own counted (a manifests directory: the objects whose
    /// content changed).
    pub fn record_changes(&self, c: crate::model::ObjectChanges) {
        self.service_changes.inc_by(c.services as u64);
        self.endpoint_changes.inc_by(c.endpoint_slices as u64);
        self.service_changes_pending.set(0);
        self.endpoint_changes_pending.set(0);
    }

    /// A sync ended with the datapath in sync.
    pub fn record_synced(&self) {
        (self.sync_last).set(crate::wake::unix_seconds(SystemTime::now()));
    }

    /// With the maps' capacities (the `--max-*` flags) instead of the default ones.
    pub fn with_capacity(mut self, capacity: crate::capacity::Capacity) -> Self {
        self.capacity = capacity;
        self
    }

    pub fn record_features(&self, features: &crate::features::Features) {
        for f in crate::features::Feature::ALL {
            self.datapath_feature
                .get_or_create(&FeatureName { name: f.name() })
                .set(i64::from(features.has(f)));
        }
    }

    pub fn record_problem(&self, reason: ProblemReason) {
        self.rejected
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Map entries written (syncs, and retries of refused frontends).
    pub fn record_writes(&self, updates: usize, deletes: usize) {
        let w = &self.map_writes;
        (w.get_or_create(&WriteOp { op: "update" })).inc_by(updates as u64);
        (w.get_or_create(&WriteOp { op: "delete" })).inc_by(deletes as u64);
    }

    /// What the maps hold after a sync: `frontends` programmed, `no_local` of them
    /// rejecting for want of a local endpoint.
    pub fn record_state(&self, state: &MapState, frontends: usize, no_local: usize) {
        self.frontends.set(frontends as i64);
        // internalTrafficPolicy only: externalTrafficPolicy is for NodePorts and load
        // balancers, which this datapath does not serve.
        (self.no_local_endpoints)
            .get_or_create(&TrafficPolicy {
                traffic_policy: "internal",
            })
            .set(no_local as i64);
        self.backends.set(state.backends.len() as i64);
        for (map, n) in [
            (SVC_MAP, state.services.len()),
            (BACKEND_MAP, state.backends.len()),
            (REV_NAT_MAP, state.rev_nat.len()),
        ] {
            self.record_fill(map, n);
        }
    }

    /// What a conntrack collection pass saw: entries by state, the map's fill (before the
    /// pass deleted anything), what it deleted.
    pub fn record_conntrack(&self, pass: &crate::conntrack::Pass) {
        for ((_, name), n) in CT_STATES.iter().zip(pass.by_state) {
            self.conntrack_entries
                .get_or_create(&CtState { state: name })
                .set(n as i64);
        }
        self.conntrack_collected.inc_by(pass.collected as u64);
        self.record_fill(CT_MAP, pass.entries);
    }

    fn record_fill(&self, map: &'static str, entries: usize) {
        let capacity = self.capacity.of(map).unwrap_or(1).max(1);
        (self.map_fill.get_or_create(&MapName { map })).set(entries as f64 / f64::from(capacity));
    }

    /// Latency from an EndpointSlice change (its trigger time) to now, when it was written.
    pub fn record_programming(&self, trigger: SystemTime) {
        if let Ok(d) = SystemTime::now().duration_since(trigger) {
            self.programming_latency.observe(d.as_secs_f64());
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// What /healthz and /livez answer from.
pub struct Health {
    synced: AtomicBool,
    /// This node's Node has a deletion timestamp (the Kubernetes API source).
    node_deleting: AtomicBool,
    last_sync: Mutex<Instant>,
    max_age: Duration,
}

impl Health {
    pub fn new(max_age: Duration) -> Self {
        Health {
            synced: AtomicBool::new(false),
            node_deleting: AtomicBool::new(false),
            last_sync: Mutex::new(Instant::now()),
            max_age,
        }
    }

    pub fn synced(&self) {
        *self.last_sync.lock().expect("not poisoned") = Instant::now();
        self.synced.store(true, Ordering::Release);
    }

    pub fn set_node_deleting(&self, deleting: bool) {
        self.node_deleting.store(deleting, Ordering::Release);
    }

    /// Whether /healthz sends traffic here: not while the node is being deleted
    /// (kube-proxy's `nodeEligible`). /livez ignores it.
    pub fn node_eligible(&self) -> bool {
        !self.node_deleting.load(Ordering::Acquire)
    }

    /// Healthy once the first full sync is done and the last sync is recent enough.
    pub fn healthy(&self) -> (bool, Duration) {
        let age = self.last_sync.lock().expect("not poisoned").elapsed();
        (
            self.synced.load(Ordering::Acquire) && age <= self.max_age,
            age,
        )
    }
}

type HealthState = State<(Arc<Health>, Arc<Metrics>)>;

async fn healthz(State((h, m)): HealthState) -> impl IntoResponse {
    answer(&h, true, &m.healthz_answers)
}

async fn livez(State((h, m)): HealthState) -> impl IntoResponse {
    answer(&h, false, &m.livez_answers)
}

/// /healthz (`node_rule`) and /livez: in sync, and for /healthz the node not being deleted.
/// Each answer is counted by its code.
fn answer(
    h: &Health,
    node_rule: bool,
    answers: &Family<Code, Counter>,
) -> impl IntoResponse + use<> {
    let (synced, age) = h.healthy();
    let eligible = h.node_eligible();
    let ok = synced && (eligible || !node_rule);
    let body = format!(
        "{{\"healthy\":{ok},\"lastSyncAgeSeconds\":{:.3},\"nodeEligible\":{eligible}}}\n",
        age.as_secs_f64()
    );
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    answers
        .get_or_create(&Code {
            code: code.as_u16(),
        })
        .inc();
    (code, body)
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

/// /healthz and /livez. Every endpoint is read-only: GET (and HEAD) only, anything else 405.
fn health_app(health: Arc<Health>, m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state((health, m))
}

/// /metrics and /debug/services, read-only as [`health_app`].
fn metrics_app(m: Arc<Metrics>, asks: crate::debug::Asks) -> Router {
    (Router::new().route("/metrics", get(metrics)).with_state(m)).merge(crate::debug::router(asks))
}

/// Serves /healthz and /livez on `health_addr`, /metrics and /debug/services on
/// `metrics_addr`.
pub async fn serve(
    health_addr: SocketAddr,
    metrics_addr: SocketAddr,
    health: Arc<Health>,
    m: Arc<Metrics>,
    asks: crate::debug::Asks,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (health_app, metrics_app) = (health_app(health, m.clone()), metrics_app(m, asks));
    let hl = tokio::net::TcpListener::bind(health_addr)
        .await
        .with_context(|| format!("binding --health-addr {health_addr}"))?;
    let ml = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {metrics_addr}"))?;
    tokio::spawn(async move { axum::serve(hl, health_app).await });
    // With the peer's address: /debug/services answers loopback peers only.
    let metrics_app = metrics_app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(ml, metrics_app).await });
    Ok(())
}

/// The name of every metric the agent exports, as scraped (a counter with its `_total`), for
/// the checks that the README and the dashboard name only what exists.
pub fn every_metric_name() -> Vec<String> {
    every_metric().0
}

/// The label names the agent's metrics carry (`le` of histograms included).
pub fn every_metric_label() -> std::collections::BTreeSet<String> {
    every_metric().1
}

fn every_metric() -> (Vec<String>, std::collections::BTreeSet<String>) {
    let m = Metrics::new("/nonexistent".into());
    // A family is rendered once it has a member: one each. Every field named, so a new
    // one cannot be forgotten here.
    let Metrics {
        registry: _,
        capacity: _,
        datapath_feature,
        sync_duration,
        programming_latency: _,
        frontends: _,
        backends: _,
        rejected,
        map_fill,
        sync_errors: _,
        map_writes,
        frontends_refused: _,
        maglev_table_fallbacks: _,
        conntrack_entries,
        conntrack_collected: _,
        kube_relists,
        kube_watch_errors,
        sync_last: _,
        sync_last_queued: _,
        service_changes: _,
        service_changes_pending: _,
        endpoint_changes: _,
        endpoint_changes_pending: _,
        no_local_endpoints,
        healthz_answers,
        livez_answers,
    } = &m;
    let _ = datapath_feature.get_or_create(&FeatureName { name: "x" });
    let _ = (sync_duration).get_or_create(&SyncLabels {
        kind: SyncKind::Full,
    });
    let _ = rejected.get_or_create(&Reason { reason: "x" });
    let _ = map_fill.get_or_create(&MapName { map: "x" });
    let _ = map_writes.get_or_create(&WriteOp { op: "x" });
    let _ = conntrack_entries.get_or_create(&CtState { state: "x" });
    for f in [kube_relists, kube_watch_errors] {
        let _ = f.get_or_create(&ResourceLabel { resource: "x" });
    }
    let _ = (no_local_endpoints).get_or_create(&TrafficPolicy {
        traffic_policy: "x",
    });
    for f in [healthz_answers, livez_answers] {
        let _ = f.get_or_create(&Code { code: 200 });
    }
    let text = m.render();
    let mut labels: std::collections::BTreeSet<String> = (text.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(l.split_once('{')?.1.split_once('}')?.0))
        .flat_map(|set| set.split(','))
        .filter_map(|kv| Some(kv.split_once('=')?.0.to_string()))
        .collect();
    labels.insert("reason".into()); // proxy_datapath_events_total's, below
    let mut names: Vec<String> = (text.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| match kind {
            "counter" => format!("{name}_total"),
            _ => name.to_string(),
        })
        .collect();
    // Read from the datapath at scrape time (nothing to read here).
    names.push("proxy_datapath_events_total".into());
    (names, labels)
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// The status line's code of `method path` against `app` (served on a loopback port).
    async fn status(app: Router, method: &str, path: &str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(l, app).await });
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.split_whitespace().nth(1).unwrap().parse().unwrap()
        })
        .await
        .unwrap()
    }

    /// kube-proxy's `proxy_healthz_total{code}` and `proxy_livez_total{code}`, and its two
    /// sync timestamps (under this agent's prefix).
    #[tokio::test]
    async fn health_answers_and_sync_times_are_counted_as_kube_proxy_counts_them() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let m = Arc::new(Metrics::new("/nonexistent".into()));
        assert_eq!(
            status(health_app(health.clone(), m.clone()), "GET", "/healthz").await,
            503
        );
        health.synced();
        for _ in 0..2 {
            assert_eq!(
                status(health_app(health.clone(), m.clone()), "GET", "/healthz").await,
                200
            );
        }
        assert_eq!(
            status(health_app(health.clone(), m.clone()), "GET", "/livez").await,
            200
        );
        let text = m.render();
        for line in [
            "proxy_proxy_healthz_total{code=\"503\"} 1",
            "proxy_proxy_healthz_total{code=\"200\"} 2",
            "proxy_proxy_livez_total{code=\"200\"} 1",
            "proxy_sync_proxy_rules_last_timestamp_seconds 0.0",
            "proxy_sync_proxy_rules_last_queued_timestamp_seconds 0.0",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        let before = crate::wake::unix_seconds(SystemTime::now());
        m.wake().wake();
        m.record_synced();
        let (queued, synced) = (m.sync_last_queued.get(), m.sync_last.get());
        assert!(
            queued >= before && synced >= queued,
            "{before} {queued} {synced}"
        );
    }

    /// The README's metrics table names every metric the agent registers.
    #[test]
    fn the_readme_lists_every_metric() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let names = every_metric_name();
        assert!(names.len() > 20, "{names:?}");
        for name in names {
            assert!(
                readme.contains(&format!("| `{name}`")) || readme.contains(&format!("| `{name}{{")),
                "{name} is not in the README's metrics table"
            );
        }
    }

    #[tokio::test]
    async fn every_endpoint_is_read_only() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        health.synced();
        let m = Arc::new(Metrics::new("/nonexistent".into()));
        for path in ["/healthz", "/livez"] {
            assert_eq!(
                status(health_app(health.clone(), m.clone()), "GET", path).await,
                200
            );
            for method in ["POST", "PUT", "PATCH", "DELETE"] {
                assert_eq!(
                    status(health_app(health.clone(), m.clone()), method, path).await,
                    405,
                    "{method} {path}"
                );
            }
        }
        let (asks, mut answers) = crate::debug::channel("/sys/fs/bpf/test".into());
        // The sync loop's part: an answer to every question.
        tokio::spawn(async move {
            loop {
                let _ = answers.next().await.send(Vec::new());
            }
        });
        let app = || metrics_app(m.clone(), asks.clone());
        for path in ["/metrics", "/debug/services"] {
            assert_eq!(status(app(), "GET", path).await, 200, "{path}");
            for method in ["POST", "PUT", "PATCH", "DELETE"] {
                assert_eq!(status(app(), method, path).await, 405, "{method} {path}");
            }
        }
        assert_eq!(status(app(), "GET", "/debug").await, 404);
    }
}
