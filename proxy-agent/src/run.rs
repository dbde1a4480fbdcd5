//! `proxy-agent run`: check the source and the host, load the datapath, then keep its maps
//! equal to the source ([`Agent`]), woken by the source's changes, file settling, interface
//! changes (the packet path) and a periodic full resync.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use proxy_common::CtTimeouts;
use tokio::{signal::unix::SignalKind, sync::Notify};
use tracing::{info, warn};

use crate::{
    agent::Agent,
    bpf_log,
    capacity::Capacity,
    cleanup::{Cleaner, Gc},
    conntrack, debug,
    features::{self, Feature, Features},
    loader, lock,
    maps::PinnedMaps,
    metrics::{self, Health, Metrics},
    migrate,
    source::{SourceConfig, kube::watch::InitialList},
    sync::{ChoiceConfig, Syncer},
    tc::{self, TcAttacher},
};

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
    /// Conntrack lifetimes per state, and how often expired entries are collected.
    pub ct_timeouts: CtTimeouts,
    pub ct_gc_interval: Duration,
    /// Backend choice: the node's algorithm and Maglev tables.
    pub choice: ChoiceConfig,
    /// The maps' capacities (the `--max-*` flags).
    pub capacity: Capacity,
    /// How the Kubernetes API source lists (streaming lists, or lists).
    pub kube_initial_list: InitialList,
    /// The programs' log level (`--bpf-log-level`).
    pub bpf_log_level: bpf_log::Level,
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    // Cheap checks of the source first (no network yet), then the host, then the API.
    let source = cfg.source.check().await?;
    loader::preflight(&cfg.cgroup)?;
    let features = Features::probe();
    let plan = features::plan(&features, !cfg.tc_interfaces.is_empty())?;
    info!(%features, reject = ?plan.reject, tc_attach = ?plan.tc_attach, "kernel features");
    if !plan.sock_destroy {
        warn!(
            "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY): connected UDP sockets to a removed backend stay until the application reconnects"
        );
    }
    let mut tc = TcAttacher::new(&cfg.tc_interfaces, &cfg.bpffs_dir, plan.tc_attach)?;
    // Once the arguments are known good, before anything in the directory is touched; held
    // until the agent exits.
    loader::ensure_bpffs_dir(&cfg.bpffs_dir)?;
    let _lock = lock::lock(&cfg.bpffs_dir)?;
    // A newer agent's maps are refused before anything is pinned: the datapath it attached
    // keeps serving.
    migrate::refuse_newer(&cfg.bpffs_dir)?;

    // The first read begins now (the manifests are parsed on worker threads while the
    // datapath loads); the first sync takes it.
    let metrics = Arc::new(Metrics::new(cfg.bpffs_dir.clone()).with_capacity(cfg.capacity));
    let wake = metrics.wake();
    let source = source.start(&cfg.node_name, cfg.kube_initial_list, &wake, &metrics);
    let settings = loader::Settings {
        ct_timeouts: cfg.ct_timeouts,
        reject: plan.reject,
        maglev_size: cfg.choice.maglev_size,
        maglev_tables: cfg.choice.maglev_tables,
        netns_cookie: features.has(Feature::NetnsCookie),
        capacity: cfg.capacity,
    };
    if !settings.netns_cookie {
        warn!(
            "this kernel has no bpf_get_netns_cookie for socket programs: ClientIP session affinity works on the packet path only"
        );
    }
    let mut ebpf = loader::load_with(&cfg.bpffs_dir, &settings)
        .with_context(|| format!("loading the datapath into {}", cfg.bpffs_dir.display()))?;
    // Before any program of this load is: they refer to its ring buffer, which the reader
    // holds until the agent exits. The level is the pinned one all programs read, the
    // running ones too.
    let _bpf_log = bpf_log::Reader::start(&mut ebpf).context("reading the programs' log")?;
    bpf_log::write_level(&cfg.bpffs_dir, cfg.bpf_log_level)
        .context("setting the programs' log level")?;
    // An upgrade across a layout change: what the older maps hold moves into the new ones
    // before the new programs are attached (ids included, so the maps that name backends and
    // frontends by id agree), and again after for the maps the old programs kept writing
    // (conntrack); then the old pins go. The new programs then see what the old ones saw, and
    // the first sync, after them, changes the new maps only: a sync before them would write
    // the maps both versions share (a slot naming a backend id) while the old programs, which
    // look the backend up in the old map, still run.
    let carry = |phase| -> anyhow::Result<()> {
        let context = migrate::CarryContext {
            timeouts: cfg.ct_timeouts,
            now_s: conntrack::now_s(),
        };
        for (from, entries) in migrate::carry(&cfg.bpffs_dir, phase, &context)? {
            info!(
                from,
                entries,
                ?phase,
                "carried a previous layout's entries over"
            );
        }
        Ok(())
    };
    carry(migrate::Phase::BeforeAttach)?;
    loader::attach_sockets(&mut ebpf, &cfg.bpffs_dir, &cfg.cgroup, plan.getpeername)
        .with_context(|| format!("attaching the socket programs to {}", cfg.cgroup.display()))?;
    let links_changed = Arc::new(Notify::new());
    // When a TC attach failed: retry soon rather than at the next event.
    const TC_RETRY: Duration = Duration::from_millis(250);
    let mut tc_retry: Option<Instant> = None;
    if !tc.is_empty() {
        tc::watch_links(links_changed.clone()).context("watching network interfaces (netlink)")?;
        tc_retry = tc.refresh(&mut ebpf)?.then(|| Instant::now() + TC_RETRY);
    }
    carry(migrate::Phase::AfterAttach)?;
    match migrate::retire(&cfg.bpffs_dir) {
        Ok(gone) if gone.is_empty() => {}
        Ok(gone) => info!(?gone, "removed the previous layout's maps"),
        Err(e) => warn!(error = %e, "could not remove the previous layout's maps"),
    }
    let maps = PinnedMaps::open(&cfg.bpffs_dir)?;
    let state = maps.dump()?;
    info!(bpffs_dir = %cfg.bpffs_dir.display(), cgroup = %cfg.cgroup.display(),
          bpf_log_level = cfg.bpf_log_level.name(),
          frontends_in_maps = state.services.keys().filter(|k| k.slot == 0).count(), "datapath attached");

    metrics.record_features(&features);
    let health = Arc::new(Health::new(cfg.healthz_max_age));
    let (asks, mut answers) = debug::channel(cfg.bpffs_dir.clone());
    metrics::serve(
        cfg.health_addr,
        cfg.metrics_addr,
        health.clone(),
        metrics.clone(),
        asks,
    )
    .await?;
    let gc = Gc {
        interval: cfg.ct_gc_interval,
        timeouts: cfg.ct_timeouts,
    };
    let cleaner = Cleaner::start(cfg.bpffs_dir.clone(), gc, metrics.clone())
        .context("starting the cleanup thread")?;
    let mut agent = Agent::new(
        source,
        Syncer::with_choice(maps, state, cfg.choice).with_capacity(cfg.capacity),
        cfg.node_name.clone(),
        metrics,
        health,
        cleaner,
    );

    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;

    // Level-triggered start: one full sync against what the pinned maps already hold, then ready.
    agent.first_sync();
    // Handled only from here: until the first sync is done (it can wait on the API server's
    // lists) SIGTERM and SIGINT keep their default action and end the agent at once; the
    // pinned datapath stays either way.
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    agent.source.follow(&wake)?;
    info!(node = %cfg.node_name, health = %cfg.health_addr, metrics = %cfg.metrics_addr, "ready");
    loop {
        tokio::select! {
            // No debounce: a change is programmed as soon as its file is complete; events that
            // arrive during a sync are coalesced into the next one.
            _ = wake.notified() => agent.sync(false),
            _ = tokio::time::sleep_until(agent.source.next_read().unwrap_or_else(Instant::now).into()),
                if agent.source.next_read().is_some() => agent.sync(false),
            _ = tokio::time::sleep_until(agent.next_retry().unwrap_or_else(Instant::now).into()),
                if agent.next_retry().is_some() => agent.retry_refused(),
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
            ask = answers.next() => {
                // A reader that gave up (timed out) is not answered: the walk costs the loop.
                if !ask.is_closed() {
                    let _ = ask.send(agent.describe());
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // No reader once the agent is gone: the programs stop building records for nobody (the
    // next agent writes its own level).
    if let Err(e) = bpf_log::write_level(&cfg.bpffs_dir, bpf_log::Level::Off) {
        warn!(error = %e, "could not turn the programs' log off");
    }
    // The pinned datapath stays: connections keep working while the agent is away.
    info!("stopping; the datapath stays pinned (remove it with `proxy-agent cleanup`)");
    Ok(())
}
