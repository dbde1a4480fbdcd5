//! The agent's sync: read the source, build the model, write what differs, then report
//! (problems, metrics, health) and hand slow cleanup to its thread. One direction only:
//! source -> model -> sync -> maps.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use proxy_common::Backend;
use tracing::{debug, info, warn};

use crate::{
    cleanup::Cleaner,
    maps::PinnedMaps,
    metrics::{Health, Metrics, SyncKind, SyncLabels},
    model::{Built, Changes, Index, Model, Problem, ProblemReason, ServiceRef},
    source::Source,
    sync::{DatapathError, SyncReport, Syncer},
};

/// How one sync reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// Everything is read, modeled and compared; what the maps hold that nothing owns is
    /// removed.
    Full,
    /// Only what changed since the last sync is read, and only the Services it touched are
    /// modeled and written.
    Partial,
    /// A first sync from empty maps (a fresh node, nothing to keep serving): Services are
    /// programmed while the first read goes on (partial passes of what each part touched),
    /// then the rest as one last partial pass. It programs everything, as a full sync.
    Progressive,
}

pub struct Agent {
    pub source: Box<dyn Source>,
    pub syncer: Syncer<PinnedMaps>,
    pub model: Model,
    pub node_name: String,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub cleaner: Cleaner,
    rejections: Rejections,
    /// When this agent started, and the last trigger time counted per Service (see
    /// [`Agent::record_programming`]).
    started: SystemTime,
    last_trigger: HashMap<ServiceRef, SystemTime>,
}

/// Model passes and their writes already made for the sync in progress.
#[derive(Default)]
struct Passes {
    count: usize,
    model: Duration,
    write: Duration,
    updates: usize,
    deletes: usize,
    errors: usize,
    /// Some pass failed to write for another reason than a full map.
    out_of_sync: bool,
    removed_backends: Vec<Backend>,
}

impl Passes {
    fn add(&mut self, p: &Programmed) {
        self.count += 1;
        self.model += p.model;
        self.write += p.write;
        self.updates += p.report.updates;
        self.deletes += p.report.deletes;
        self.errors += p.report.errors.len();
        self.out_of_sync |= !p.report.in_sync();
        self.removed_backends
            .extend_from_slice(&p.report.removed_backends);
    }
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
    log_writes(&report);
    Programmed {
        built,
        report,
        model: modeled,
        write: started.elapsed() - modeled,
    }
}

/// Write failures, each refusal once (until it is programmed, or refused with another spec).
fn log_writes(report: &SyncReport) {
    for (frontend, err) in &report.errors {
        match err {
            DatapathError::Full { .. } if report.newly_refused.contains(frontend) => warn!(
                %frontend, error = %err,
                "frontend refused: a map is full; its previous state is kept, and it is \
                 programmed as soon as there is room"
            ),
            DatapathError::Full { .. } => debug!(%frontend, error = %err, "frontend still refused"),
            DatapathError::Map { .. } => warn!(
                %frontend, error = %err,
                "frontend not programmed; its previous state is kept, and the next sync retries"
            ),
        }
    }
    for frontend in &report.no_longer_refused {
        info!(%frontend, "frontend programmed: there is room for it now");
    }
    for frontend in &report.tables_full {
        warn!(%frontend, "no Maglev table free (--maglev-tables): this frontend chooses at random");
    }
}

impl Agent {
    pub fn new(
        source: Box<dyn Source>,
        syncer: Syncer<PinnedMaps>,
        node_name: String,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        cleaner: Cleaner,
    ) -> Self {
        Agent {
            source,
            syncer,
            model: Model::default(),
            node_name,
            metrics,
            health,
            cleaner,
            rejections: Rejections::default(),
            started: SystemTime::now(),
            last_trigger: HashMap::new(),
        }
    }

    /// The first sync, level-triggered: from empty maps, progressive where the source reads
    /// progressively (see `Pass`); otherwise (maps pinned by an earlier agent) one full sync
    /// once all is read, so what is serving changes only once the model is complete.
    pub fn first_sync(&mut self) {
        let pass = if self.syncer.state().is_empty() && self.source.reads_progressively() {
            Pass::Progressive
        } else {
            Pass::Full
        };
        self.run(pass);
    }

    /// A sync: `full` reads and compares everything (the periodic safety net); otherwise
    /// what changed since the last one.
    pub fn sync(&mut self, full: bool) {
        self.run(if full { Pass::Full } else { Pass::Partial });
    }

    /// When refused frontends are due to be tried again (see [`Self::retry_refused`]).
    pub fn next_retry(&self) -> Option<Instant> {
        self.syncer.next_retry()
    }

    /// Tries again the frontends refused for want of room whose retry is due. On its own,
    /// not inside a sync: a full map never delays other changes, and a retry costs what is
    /// refused only.
    pub fn retry_refused(&mut self) {
        let report = self.syncer.retry_refused(Instant::now());
        log_writes(&report);
        self.metrics.record_writes(report.updates, report.deletes);
        self.metrics.sync_errors.inc_by(report.errors.len() as u64);
        (self.metrics.frontends_refused).set(self.syncer.refused_count() as i64);
        self.cleaner.removed(&report.removed_backends);
        self.metrics.record_state(
            self.syncer.state(),
            self.syncer.frontend_count(),
            self.syncer.no_local_count(),
        );
        self.record_programming(&report);
    }

    /// The frontends programmed, with names and reasons (`/debug/services`).
    pub fn describe(&self) -> Vec<crate::inspect::FrontendView> {
        crate::debug::describe(&self.model, &self.syncer)
    }

    fn run(&mut self, pass: Pass) {
        let started = Instant::now();
        let mut before = Passes::default();
        let (model, syncer, node_name) = (&mut self.model, &mut self.syncer, &self.node_name);
        let mut program_part = |index: &mut Index| {
            let touched = index.take_touched();
            let changes = touched.as_ref().into();
            before.add(&program(model, syncer, node_name, index, changes, false));
        };
        let progress: Option<&mut dyn FnMut(&mut Index)> = if pass == Pass::Progressive {
            Some(&mut program_part)
        } else {
            None
        };
        let Some(snap) = self.source.read(pass == Pass::Full, progress) else {
            return;
        };
        self.metrics.record_changes(snap.changes);
        if snap.unchanged && pass == Pass::Partial {
            // Nothing to write, and the maps are still what the last sync left: a sync all
            // the same, as kube-proxy counts one (its last-sync time follows the queued one).
            if self.health.healthy().0 {
                self.metrics.record_synced();
            }
            return;
        }
        let read_done = started.elapsed();
        // The first read may have run before (alongside the datapath's load): its own time.
        let read = snap.read_before.unwrap_or(read_done);
        let full = pass == Pass::Full;
        let p = program(
            &mut self.model,
            &mut self.syncer,
            &self.node_name,
            snap.index,
            snap.touched.as_ref().into(),
            full,
        );
        let desired = &p.built.desired;
        self.rejections.report(
            snap.problems.iter().chain(desired.problems.iter()),
            &self.metrics,
        );
        let errors = before.errors + p.report.errors.len();
        self.metrics.sync_errors.inc_by(errors as u64);
        (self.metrics.frontends_refused).set(self.syncer.refused_count() as i64);
        (self.metrics.maglev_table_fallbacks).inc_by(p.report.tables_full.len() as u64);
        before.removed_backends.extend(&p.report.removed_backends);
        self.cleaner.removed(&before.removed_backends);
        let kind = match pass {
            Pass::Partial => SyncKind::Partial,
            Pass::Full | Pass::Progressive => SyncKind::Full,
        };
        // Earlier passes ran during the read: they are inside `read` already.
        let elapsed = read + p.model + p.write;
        self.metrics
            .sync_duration
            .get_or_create(&SyncLabels { kind })
            .observe(elapsed.as_secs_f64());
        self.metrics.record_state(
            self.syncer.state(),
            self.syncer.frontend_count(),
            self.syncer.no_local_count(),
        );
        self.record_programming(&p.report);
        self.health.set_node_deleting(self.source.node_deleting());
        // A full map is a data problem a restart cannot fix: the agent is still keeping
        // the datapath in sync, as far as the maps hold it.
        if !before.out_of_sync && p.report.in_sync() {
            self.health.synced();
            self.metrics.record_synced();
        }
        let (updates, deletes) = (
            before.updates + p.report.updates,
            before.deletes + p.report.deletes,
        );
        self.metrics.record_writes(updates, deletes);
        // As a full sync, a progressive one counts every frontend programmed.
        let services = match (pass, p.built.changed.as_ref()) {
            (Pass::Progressive, _) => self.syncer.frontend_count(),
            (_, Some(scope)) => scope.len(),
            (_, None) => desired.frontends.len(),
        };
        if updates + deletes > 0 || errors > 0 {
            info!(
                kind = kind.as_str(),
                services,
                updates,
                deletes,
                errors,
                refused = self.syncer.refused_count(),
                // model and write passes (more than one: programmed while reading)
                passes = before.count + 1,
                read_us = read.as_micros() as u64,
                model_us = (before.model + p.model).as_micros() as u64,
                write_us = (before.write + p.write).as_micros() as u64,
                // the read, then what was modeled and written after it (a first sync from
                // empty maps models and writes while it reads)
                elapsed_us = elapsed.as_micros() as u64,
                "synced"
            );
        }
    }

    /// Network programming latency, as kube-proxy measures it: from the change that made an
    /// EndpointSlice (its trigger time) to the write it caused. Each trigger time counts
    /// once, and only if it happened while this agent was running (an old annotation read at
    /// start is not a latency).
    fn record_programming(&mut self, report: &SyncReport) {
        for svc in &report.written_services {
            let Some(t) = self.source.trigger_time(svc) else {
                continue;
            };
            let fresh = t > self.started && self.last_trigger.get(svc).is_none_or(|last| t > *last);
            if fresh {
                self.metrics.record_programming(t);
                self.last_trigger.insert(svc.clone(), t);
            }
        }
    }
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
