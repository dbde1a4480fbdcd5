//! `proxy-agent run`: load the datapath, then keep its maps equal to the source, one
//! direction only: source -> model -> sync -> maps.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::{signal::unix::SignalKind, sync::Notify};
use tracing::{info, warn};

use crate::{
    loader,
    maps::PinnedMaps,
    model::{self, ProblemReason},
    source::ManifestDir,
    sync::Syncer,
};

pub struct RunConfig {
    pub manifests: PathBuf,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
}

/// Coalesces bursts of file events (an editor's save is several) into one rescan.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Safety net for missed file events.
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Objects rejected so far, by reason (exported as a metric once the agent serves metrics).
#[derive(Default)]
struct Rejections {
    by_reason: BTreeMap<ProblemReason, u64>,
    /// Problems already logged: each is logged once, not at every sync.
    logged: HashSet<String>,
}

impl Rejections {
    fn report<'a>(&mut self, problems: impl Iterator<Item = &'a model::Problem>) {
        let mut current = HashSet::new();
        for p in problems {
            let text = p.to_string();
            if !self.logged.contains(&text) {
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

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    loader::preflight(&cfg.cgroup)?;
    let mut source = ManifestDir::new(&cfg.manifests)?;
    loader::load_and_attach(&cfg.bpffs_dir, &cfg.cgroup)
        .with_context(|| format!("loading the datapath into {}", cfg.bpffs_dir.display()))?;
    let maps = PinnedMaps::open(&cfg.bpffs_dir)?;
    let state = maps.dump()?;
    info!(bpffs_dir = %cfg.bpffs_dir.display(), cgroup = %cfg.cgroup.display(),
          frontends_in_maps = state.services.keys().filter(|k| k.slot == 0).count(),
          "datapath attached");
    let mut syncer = Syncer::new(maps, state);
    let mut rejections = Rejections::default();

    // File events only wake the loop; the loop rescans the directory (level-triggered).
    let wake = Arc::new(Notify::new());
    let waker = wake.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            waker.notify_one();
        }
    })
    .context("creating the file watcher")?;
    watcher
        .watch(&cfg.manifests, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", cfg.manifests.display()))?;

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;

    sync_once(
        &mut source,
        &mut syncer,
        &cfg.node_name,
        &mut rejections,
        true,
    );
    info!(node = %cfg.node_name, manifests = %cfg.manifests.display(), "ready");
    loop {
        tokio::select! {
            _ = wake.notified() => {
                tokio::time::sleep(DEBOUNCE).await;
                sync_once(&mut source, &mut syncer, &cfg.node_name, &mut rejections, false);
            }
            _ = resync.tick() => sync_once(&mut source, &mut syncer, &cfg.node_name, &mut rejections, true),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // The pinned datapath stays: connections keep working while the agent is away.
    info!("stopping; the datapath stays pinned (remove it with `proxy-agent cleanup`)");
    Ok(())
}

fn sync_once(
    source: &mut ManifestDir,
    syncer: &mut Syncer<PinnedMaps>,
    node_name: &str,
    rejections: &mut Rejections,
    full: bool,
) {
    let started = Instant::now();
    let rescan = match source.rescan() {
        Ok(r) => r,
        Err(e) => {
            // A directory that vanished is not "every object deleted": keep what is programmed.
            warn!(error = %e, "cannot read the manifests; the programmed state is kept");
            return;
        }
    };
    if !rescan.changed && !full {
        return;
    }
    let desired = model::build(&source.objects(), node_name);
    rejections.report(source.problems().chain(desired.problems.iter()));
    let report = syncer.sync(&desired);
    for (frontend, err) in &report.errors {
        warn!(%frontend, error = %err, "frontend not programmed; its previous state is kept");
    }
    if report.updates + report.deletes > 0 || !report.errors.is_empty() {
        info!(
            frontends = desired.frontends.len(),
            updates = report.updates,
            deletes = report.deletes,
            errors = report.errors.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "synced"
        );
    }
}
