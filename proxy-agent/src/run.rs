//! `proxy-agent run`: load the datapath, then keep its maps equal to the source, one
//! direction only: source -> model -> sync -> maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{signal::unix::SignalKind, sync::Notify};
use tracing::{info, warn};

use crate::{
    loader,
    maps::PinnedMaps,
    metrics::{self, Health, Metrics, SyncKind},
    model::{Built, Changes, Index, Model, Problem, ProblemReason, ServiceRef},
    source::{
        kube::KubeSource,
        manifests::{ManifestDir, ManifestWatch, Reading, Rescan, SourceError, Work},
    },
    sync::{SyncReport, Syncer},
    tc::{self, TcAttacher},
};

pub enum SourceConfig {
    Manifests(PathBuf),
    Kubeconfig(PathBuf),
    InCluster,
}

pub struct RunConfig {
    pub source: SourceConfig,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// /healthz fails when the last successful sync is older than this.
    pub healthz_max_age: Duration,
    /// Full resync period (safety net).
    pub resync: Duration,
    /// Interfaces (names or globs) for the packet path; empty: socket path only.
    pub tc_interfaces: Vec<String>,
}

/// Problems are logged once each (not at every sync) and counted by reason.
#[derive(Default)]
struct Rejections {
    logged: HashSet<String>,
    by_reason: BTreeMap<ProblemReason, u64>,
}

impl Rejections {
    fn report<'a>(&mut self, problems: impl Iterator<Item = &'a Problem>, metrics: &Metrics) {
        let mut current = HashSet::new();
        for p in problems {
            let text = p.to_string();
            if !self.logged.contains(&text) {
                metrics.record_problem(p.reason);
                let total = self.by_reason.entry(p.reason).or_default();
                *total += 1;
                warn!(origin = %p.origin, kind = p.kind, namespace = %p.namespace, name = %p.name,
                      field = %p.field, reason = p.reason.as_str(), rejected_total = *total,
                      "{}", p.detail);
            }
            current.insert(text);
        }
        self.logged = current;
    }
}

enum Source {
    Manifests {
        dir: ManifestDir,
        /// Started after the first read (see [`Source::watch`]); until then every read is a
        /// full one.
        watch: Option<ManifestWatch>,
        /// The first read, begun before the datapath loaded (see [`Agent::first_sync`]); the
        /// first snapshot takes it instead of reading again.
        first_read: Option<FirstRead>,
    },
    Kube(KubeSource),
}

enum FirstRead {
    /// Files still being parsed.
    Parsing(Reading),
    /// The read's outcome and how long it took.
    Done(Result<Rescan, SourceError>, Duration),
}

/// What a source has now.
struct Snapshot<'a> {
    index: std::borrow::Cow<'a, Index>,
    /// The Services whose objects changed since the previous snapshot (None: unknown).
    touched: Option<BTreeSet<ServiceRef>>,
    file_problems: Vec<Problem>,
    /// Nothing changed since the last snapshot.
    unchanged: bool,
    /// How long the read took, when it was done before the snapshot was asked for.
    read_before: Option<Duration>,
}

impl Source {
    /// Reads what changed (everything with `full`); None when the source cannot be read.
    fn snapshot(&mut self, full: bool) -> Option<Snapshot<'_>> {
        match self {
            Source::Manifests {
                dir,
                watch,
                first_read,
            } => {
                let work = watch.as_ref().map_or(
                    Work {
                        all: true,
                        ..Work::default()
                    },
                    |w| w.take(Instant::now()),
                );
                tracing::debug!(all = work.all, paths = ?work.paths, full, "manifests work");
                let (rescan, read_before) = match first_read.take() {
                    Some(FirstRead::Parsing(r)) => {
                        let started = r.started();
                        (dir.finish_rescan(r, |_| {}), Some(started.elapsed()))
                    }
                    Some(FirstRead::Done(read, took)) => (read, Some(took)),
                    None if full || work.all => (dir.rescan(), None),
                    None => (Ok(dir.rescan_paths(&work.paths)), None),
                };
                let rescan = match rescan {
                    Ok(r) => r,
                    Err(e) => {
                        // A directory that vanished is not "every object deleted".
                        warn!(error = %e, "cannot read the manifests; the programmed state is kept");
                        return None;
                    }
                };
                let file_problems = dir.problems().cloned().collect();
                let touched = dir.take_touched();
                Some(Snapshot {
                    touched,
                    index: std::borrow::Cow::Borrowed(dir.index()),
                    file_problems,
                    unchanged: !rescan.changed,
                    read_before,
                })
            }
            // The index follows the stores object by object: a change costs a walk of the
            // stores (pointer comparisons) and what it touched, and the model recomputes only
            // the Services touched.
            Source::Kube(k) => {
                let index = k.refresh();
                Some(Snapshot {
                    touched: index.take_touched(),
                    index: std::borrow::Cow::Borrowed(index),
                    file_problems: vec![],
                    unchanged: false,
                    read_before: None,
                })
            }
        }
    }

    /// Starts watching the manifests directory. Called after the first read: while watched,
    /// the agent's own opens of thousands of files are as many inotify events, which cost a
    /// tenth of a cold start (and can overflow the event queue). What changed during that
    /// read is found by one more full read, the watch's first work.
    fn watch(&mut self, wake: &Arc<Notify>) -> anyhow::Result<()> {
        if let Source::Manifests { dir, watch, .. } = self
            && watch.is_none()
        {
            let w = ManifestWatch::start(dir.dir(), wake.clone())
                .with_context(|| format!("watching {}", dir.dir().display()))?;
            w.read_all_next();
            *watch = Some(w);
            wake.notify_one();
        }
        Ok(())
    }

    /// When files still being written should be read.
    fn next_read(&self) -> Option<Instant> {
        match self {
            Source::Manifests { watch, .. } => watch.as_ref()?.next_due(),
            Source::Kube(_) => None,
        }
    }
}

struct Agent {
    bpffs_dir: PathBuf,
    source: Source,
    syncer: Syncer<PinnedMaps>,
    model: Model,
    node_name: String,
    rejections: Rejections,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// When this agent started, and the last trigger time counted per Service (see sync).
    started: std::time::SystemTime,
    last_trigger: std::collections::HashMap<ServiceRef, std::time::SystemTime>,
}

/// Model passes and their writes already made for the sync in progress (the first sync's,
/// made while the manifests were still being parsed).
#[derive(Default)]
struct Passes {
    count: usize,
    model: Duration,
    write: Duration,
    updates: usize,
    deletes: usize,
    errors: usize,
    removed_backends: Vec<proxy_common::Backend>,
}

/// What one model pass and its writes did.
struct Programmed {
    built: Built,
    report: SyncReport,
    model: Duration,
    write: Duration,
}

/// One model pass over `index` and the writes it asks for (`full`: every frontend, and
/// entries nobody owns; otherwise only the Services `changes` names).
fn program(
    model: &mut Model,
    syncer: &mut Syncer<PinnedMaps>,
    node_name: &str,
    index: &Index,
    changes: Changes<'_>,
    full: bool,
) -> Programmed {
    let started = Instant::now();
    let built = model.build(index, changes, node_name, full);
    let modeled = started.elapsed();
    let report = syncer.sync_scoped(&built.desired, built.changed.as_ref());
    for (frontend, err) in &report.errors {
        warn!(%frontend, error = %err, "frontend not programmed; its previous state is kept");
    }
    Programmed {
        built,
        report,
        model: modeled,
        write: started.elapsed() - modeled,
    }
}

impl Agent {
    /// The first sync. The manifests' first read began before the datapath was loaded; from
    /// empty maps (a fresh node, nothing to keep serving) Services are programmed as their
    /// files come in, as partial syncs of the Services each batch touched, so writing
    /// overlaps parsing. Otherwise (maps pinned by an earlier agent) one full sync once all
    /// is read, which also removes what the maps hold that nothing owns any more.
    fn first_sync(&mut self) {
        let Source::Manifests {
            dir, first_read, ..
        } = &mut self.source
        else {
            return self.sync(true);
        };
        let reading = match first_read.take() {
            Some(FirstRead::Parsing(r)) => r,
            other => {
                *first_read = other; // (a read that could not begin: the sync reports it)
                return self.sync(true);
            }
        };
        let progressive = self.syncer.state().is_empty();
        let started = reading.started();
        let mut passes = Passes::default();
        let (model, syncer, node_name) = (&mut self.model, &mut self.syncer, &self.node_name);
        let read = dir.finish_rescan(reading, |index| {
            if !progressive {
                return;
            }
            let touched = index.take_touched();
            let p = program(
                model,
                syncer,
                node_name,
                index,
                touched.as_ref().into(),
                false,
            );
            passes.count += 1;
            passes.model += p.model;
            passes.write += p.write;
            passes.updates += p.report.updates;
            passes.deletes += p.report.deletes;
            passes.errors += p.report.errors.len();
            passes.removed_backends.extend(p.report.removed_backends);
        });
        *first_read = Some(FirstRead::Done(read, started.elapsed()));
        if progressive {
            // What the last batch touched, and the problems, metrics and health of the whole.
            self.sync_after(false, Some(passes));
        } else {
            self.sync(true);
        }
    }

    /// One pass: snapshot the source, build the model, write what differs.
    fn sync(&mut self, full: bool) {
        self.sync_after(full, None);
    }

    /// [`Self::sync`], completing `before` (passes of this sync already made).
    fn sync_after(&mut self, full: bool, before: Option<Passes>) {
        let started = Instant::now();
        let Some(snap) = self.source.snapshot(full) else {
            return;
        };
        if snap.unchanged && !full && before.is_none() {
            return;
        }
        let read_done = started.elapsed();
        // The first read may have run before (alongside the datapath's load): its own time.
        let read = snap.read_before.unwrap_or(read_done);
        let Programmed {
            built,
            report,
            model: modeled,
            write: written,
        } = program(
            &mut self.model,
            &mut self.syncer,
            &self.node_name,
            &snap.index,
            snap.touched.as_ref().into(),
            full,
        );
        let desired = built.desired;
        self.rejections.report(
            snap.file_problems.iter().chain(desired.problems.iter()),
            &self.metrics,
        );
        let scope = built.changed.as_ref();
        let progressive = before.is_some();
        let before = before.unwrap_or_default();
        let errors = before.errors + report.errors.len();
        self.metrics.sync_errors.inc_by(errors as u64);
        // Only UDP has flows and connected sockets to clean (TCP connections to a removed pod
        // fail on their own, as with kube-proxy); skipping the walks keeps TCP changes fast.
        let removed_udp: Vec<proxy_common::Backend> = before
            .removed_backends
            .iter()
            .chain(&report.removed_backends)
            .filter(|b| b.proto == proxy_common::PROTO_UDP)
            .copied()
            .collect();
        if !removed_udp.is_empty() {
            match self.syncer.datapath_mut().forget_udp_flows(&removed_udp) {
                Ok(n) if n > 0 => info!(entries = n, "forgot UDP flows to removed backends"),
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "could not clean conntrack; stale flows are re-balanced by the datapath")
                }
            }
            self.destroy_stale_udp_sockets(&removed_udp);
        }
        // A progressive first sync (earlier passes) programs every Service: a full one.
        let kind = if scope.is_some() && !progressive {
            "partial"
        } else {
            "full"
        };
        let model_time = before.model + modeled;
        let write_time = before.write + written;
        // Earlier passes ran during the read: they are inside `read` already.
        let elapsed = read + modeled + written;
        self.metrics
            .sync_duration
            .get_or_create(&SyncKind { kind })
            .observe(elapsed.as_secs_f64());
        self.metrics
            .record_state(self.syncer.state(), self.syncer.frontend_count());
        if let Source::Kube(k) = &self.source
            && !report.written_services.is_empty()
        {
            // Network programming latency, as kube-proxy measures it: from the change that
            // made an EndpointSlice (its trigger time) to the write it caused. Each trigger
            // time counts once, and only if it happened while this agent was running (an old
            // annotation read at start is not a latency).
            for svc in &report.written_services {
                let Some(t) = k.trigger_time(svc) else {
                    continue;
                };
                let fresh =
                    t > self.started && self.last_trigger.get(svc).is_none_or(|last| t > *last);
                if fresh {
                    self.metrics.record_programming(t);
                    self.last_trigger.insert(svc.clone(), t);
                }
            }
        }
        if errors == 0 {
            self.health.synced();
        }
        let (updates, deletes) = (
            before.updates + report.updates,
            before.deletes + report.deletes,
        );
        // As a full sync, a progressive one counts every frontend programmed.
        let services = match scope {
            Some(s) if !progressive => s.len(),
            _ if progressive => self.syncer.frontend_count(),
            _ => desired.frontends.len(),
        };
        if updates + deletes > 0 || errors > 0 {
            info!(
                kind,
                services,
                updates,
                deletes,
                errors,
                // model and write passes (more than one: programmed while reading)
                passes = before.count + 1,
                read_us = read.as_micros() as u64,
                model_us = model_time.as_micros() as u64,
                write_us = write_time.as_micros() as u64,
                // the read, then what was modeled and written after it (a first sync from
                // empty maps models and writes while it reads)
                elapsed_us = elapsed.as_micros() as u64,
                "synced"
            );
        }
    }
}

impl Agent {
    /// Connected UDP sockets the socket path pinned to removed backends are destroyed, so
    /// their applications reconnect to a live one.
    fn destroy_stale_udp_sockets(&self, removed: &[proxy_common::Backend]) {
        let translated = match crate::maps::open_sock_rev_nat(&self.bpffs_dir) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot read the socket reverse-NAT map; stale UDP sockets are kept");
                return;
            }
        };
        let lookup = move |k: &proxy_common::SockRevNatKey| translated.get(k, 0).is_ok();
        match crate::sockets::destroy_udp_sockets_to(removed, lookup) {
            Ok(n) if n > 0 => info!(
                sockets = n,
                "terminated connected UDP sockets to removed backends"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not terminate stale connected UDP sockets"),
        }
    }
}

async fn kube_client(source: &SourceConfig) -> anyhow::Result<kube::Client> {
    let config = match source {
        SourceConfig::Kubeconfig(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        _ => kube::Config::incluster().context("in-cluster config (KUBERNETES_SERVICE_HOST and the service account); outside a pod use --kubeconfig or --manifests")?,
    };
    Ok(kube::Client::try_from(config)?)
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    // Cheap checks of the source first (no network yet), then the host, then the API.
    let client = match &cfg.source {
        SourceConfig::Manifests(_) => None,
        other => Some(kube_client(other).await?),
    };
    let manifests = match &cfg.source {
        SourceConfig::Manifests(dir) => Some(ManifestDir::new(dir)?),
        _ => None,
    };
    let mut tc = TcAttacher::new(&cfg.tc_interfaces, &cfg.bpffs_dir)?;
    loader::preflight(&cfg.cgroup)?;

    let wake = Arc::new(Notify::new());
    let source = match (manifests, client) {
        (Some(dir), _) => {
            // The first read begins now: the files are parsed on worker threads while the
            // datapath loads, and the first sync indexes them (see Agent::first_sync).
            let first_read = match dir.start_rescan() {
                Ok(r) => FirstRead::Parsing(r),
                Err(e) => FirstRead::Done(Err(e), Duration::ZERO),
            };
            // File events name the files to read; periodic resyncs read the whole directory.
            Source::Manifests {
                dir,
                watch: None,
                first_read: Some(first_read),
            }
        }
        (None, Some(client)) => {
            let k = KubeSource::start(client, &cfg.node_name, wake.clone());
            info!("waiting for the first list of Services, EndpointSlices and this Node");
            k.wait_ready().await?;
            Source::Kube(k)
        }
        (None, None) => unreachable!("one source is always configured"),
    };

    let mut ebpf = loader::load(&cfg.bpffs_dir)
        .with_context(|| format!("loading the datapath into {}", cfg.bpffs_dir.display()))?;
    loader::attach_sockets(&mut ebpf, &cfg.bpffs_dir, &cfg.cgroup)
        .with_context(|| format!("attaching the socket programs to {}", cfg.cgroup.display()))?;
    let links_changed = Arc::new(Notify::new());
    // When a TC attach failed: retry soon rather than at the next event.
    const TC_RETRY: Duration = Duration::from_millis(250);
    let mut tc_retry: Option<Instant> = None;
    if !tc.is_empty() {
        tc::watch_links(links_changed.clone()).context("watching network interfaces (netlink)")?;
        tc_retry = tc.refresh(&mut ebpf)?.then(|| Instant::now() + TC_RETRY);
    }
    let maps = PinnedMaps::open(&cfg.bpffs_dir)?;
    let state = maps.dump()?;
    info!(bpffs_dir = %cfg.bpffs_dir.display(), cgroup = %cfg.cgroup.display(),
          frontends_in_maps = state.services.keys().filter(|k| k.slot == 0).count(), "datapath attached");

    let metrics = Arc::new(Metrics::new(cfg.bpffs_dir.clone()));
    let health = Arc::new(Health::new(cfg.healthz_max_age));
    metrics::serve(
        cfg.health_addr,
        cfg.metrics_addr,
        health.clone(),
        metrics.clone(),
    )
    .await?;
    let mut agent = Agent {
        bpffs_dir: cfg.bpffs_dir.clone(),
        source,
        syncer: Syncer::new(maps, state),
        model: Model::default(),
        node_name: cfg.node_name.clone(),
        rejections: Rejections::default(),
        metrics,
        health,
        started: std::time::SystemTime::now(),
        last_trigger: Default::default(),
    };

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;

    // Level-triggered start: one full sync against what the pinned maps already hold, then ready.
    agent.first_sync();
    agent.source.watch(&wake)?;
    info!(node = %cfg.node_name, health = %cfg.health_addr, metrics = %cfg.metrics_addr, "ready");
    loop {
        tokio::select! {
            // No debounce: a change is programmed as soon as its file is complete; events that
            // arrive during a sync are coalesced into the next one.
            _ = wake.notified() => agent.sync(false),
            _ = tokio::time::sleep_until(agent.source.next_read().unwrap_or_else(Instant::now).into()),
                if agent.source.next_read().is_some() => agent.sync(false),
            _ = links_changed.notified() => {
                tc_retry = tc.refresh(&mut ebpf)?.then(|| Instant::now() + TC_RETRY);
            }
            _ = tokio::time::sleep_until(tc_retry.unwrap_or_else(Instant::now).into()), if tc_retry.is_some() => {
                tc_retry = tc.refresh(&mut ebpf)?.then(|| Instant::now() + TC_RETRY);
            }
            _ = resync.tick() => {
                agent.sync(true);
                tc_retry = tc.refresh(&mut ebpf)?.then(|| Instant::now() + TC_RETRY);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // The pinned datapath stays: connections keep working while the agent is away.
    info!("stopping; the datapath stays pinned (remove it with `proxy-agent cleanup`)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    /// The first read runs unwatched (begun as `run` begins it, taken by the first snapshot
    /// with its own time); a file written after it, before the watch started (no event names
    /// it), is read as soon as watching starts, and then only events cause reads.
    #[test]
    fn a_change_before_watching_starts_is_read_once_it_does() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.yaml"), service("a", "10.96.0.1")).unwrap();
        let dir = ManifestDir::new(tmp.path()).unwrap();
        let reading = dir.start_rescan().unwrap();
        let mut source = Source::Manifests {
            dir,
            watch: None,
            first_read: Some(FirstRead::Parsing(reading)),
        };
        let services = |s: &Source| match s {
            Source::Manifests { dir, .. } => dir.objects().services.len(),
            Source::Kube(_) => unreachable!(),
        };
        let first = source.snapshot(false).expect("readable");
        assert!(first.read_before.is_some(), "the begun read is taken");
        assert!(!first.unchanged);
        assert_eq!(services(&source), 1);
        std::fs::write(tmp.path().join("b.yaml"), service("b", "10.96.0.2")).unwrap();

        source.watch(&Arc::new(Notify::new())).unwrap();
        assert!(!source.snapshot(false).expect("readable").unchanged);
        assert_eq!(services(&source), 2, "b.yaml is read");
        let snap = source.snapshot(false).expect("readable");
        assert!(snap.unchanged, "no event, no read");
    }
}
