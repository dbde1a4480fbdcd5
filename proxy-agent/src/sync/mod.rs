//! The single writer of the datapath maps: diffs the model's [`crate::model::Desired`] state against the
//! [`Mirror`] of what the maps hold and writes what differs, frontend by frontend, in commit
//! order (`writer`), with ids allocated before anything is written (`ids`).
//!
//! A frontend's new backends and its changed slots each go to the kernel as one run (one
//! batch syscall on the pinned maps). A frontend refused for want of room (a map full) keeps
//! its previous state, untouched, and is retried with backoff, and at once when room is made
//! (`refused`). After a syscall error part way, its old master stays, over slots of which
//! some may already name new backends (each one existing, of the old or the new set: what a
//! reader sees mid-update too); the next sync finishes it. `tests/properties.rs` checks both.

mod choice;
mod datapath;
mod ids;
mod mirror;
mod plan;
mod refused;
mod writer;

use std::{collections::BTreeSet, time::Instant};

use proxy_common::Backend;

use self::{
    choice::TableIds,
    ids::{BackendIds, RevNatIds},
    refused::Refused,
    writer::Writer,
};
pub use self::{
    choice::{ChoiceConfig, maglev_table},
    datapath::{Datapath, DatapathError, Partial},
    mirror::{
        MapState, Mirror, TableContent, backend_value, frontend_of, rev_nat_value, service_key,
    },
};
use crate::capacity::Capacity;
use crate::model::{Desired, Frontend, FrontendSpec, ServiceRef};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub updates: usize,
    pub deletes: usize,
    /// Frontends that could not be written (map full, syscall error); their previous state
    /// stays programmed, and they are retried (see the module's doc).
    pub errors: Vec<(Frontend, DatapathError)>,
    /// Of `errors`, the frontends refused for want of room that were not refused before (or
    /// were, with another spec): what is worth a log line.
    pub newly_refused: BTreeSet<Frontend>,
    /// Refused frontends programmed by this sync.
    pub no_longer_refused: Vec<Frontend>,
    /// Refused frontends this sync did not try again (their retry is not due).
    pub deferred: usize,
    /// Backends deleted by this sync (their UDP flows are forgotten, as kube-proxy does).
    pub removed_backends: Vec<Backend>,
    /// Services whose frontends this sync wrote (for network programming latency).
    pub written_services: BTreeSet<ServiceRef>,
    /// Frontends that asked for Maglev and got random choice: every table was taken
    /// (`--maglev-tables`). The next sync tries again.
    pub tables_full: Vec<Frontend>,
}

pub struct Syncer<D: Datapath> {
    dp: D,
    mirror: Mirror,
    backend_ids: BackendIds,
    rev_nat_ids: RevNatIds,
    table_ids: TableIds,
    choice: ChoiceConfig,
    capacity: Capacity,
    refused: Refused,
}

impl SyncReport {
    /// Only data problems stopped writes (a map full): restarting would not fix them, so
    /// the agent is keeping the datapath in sync as far as it can hold it.
    pub fn in_sync(&self) -> bool {
        (self.errors.iter()).all(|(_, e)| matches!(e, DatapathError::Full { .. }))
    }
}

impl<D: Datapath> Syncer<D> {
    /// Starts from what the maps hold now (empty maps for a fresh datapath), with the default
    /// [`ChoiceConfig`].
    pub fn new(dp: D, state: MapState) -> Self {
        Self::with_choice(dp, state, ChoiceConfig::default())
    }

    pub fn with_choice(dp: D, state: MapState, choice: ChoiceConfig) -> Self {
        let mut mirror = Mirror::new(state);
        // The backends of the tables masters name are referenced until the tables change:
        // read them (a crash may have left a table naming backends no slot has any more).
        let named: BTreeSet<u16> = (mirror.state().services.iter())
            .filter(|(k, v)| k.slot == 0 && v.maglev_table != 0)
            .map(|(_, v)| v.maglev_table)
            .collect();
        for t in named {
            let entries = dp.maglev_table(t, choice.maglev_size);
            mirror.set_table_content(t, Some(TableContent::of(&entries, None)));
        }
        Syncer {
            dp,
            backend_ids: BackendIds::new(mirror.state(), mirror.non_slot_references()),
            rev_nat_ids: RevNatIds::default(),
            table_ids: TableIds::default(),
            choice,
            capacity: Capacity::default(),
            refused: Refused::default(),
            mirror,
        }
    }

    /// With the maps' capacities (the `--max-*` flags) instead of the default ones.
    pub fn with_capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = capacity;
        self
    }

    /// Frontends (masters) in the maps, counted as they are written rather than walked.
    pub fn frontend_count(&self) -> usize {
        self.mirror.masters()
    }

    /// Frontends programmed to reject for want of a local endpoint (iTP=Local).
    pub fn no_local_count(&self) -> usize {
        self.mirror.no_local_masters()
    }

    /// Frontends refused for want of room, still waiting for it.
    pub fn refused_count(&self) -> usize {
        self.refused.len()
    }

    /// Whether `f` is refused for want of room (its previous state, if any, is what the maps
    /// hold).
    pub fn is_refused(&self, f: &Frontend) -> bool {
        self.refused.contains(f)
    }

    /// How `spec` chooses backends on this node (its annotation, or the node's algorithm).
    pub fn algorithm_of(&self, spec: &FrontendSpec) -> crate::model::Algorithm {
        self.choice.algorithm_of(spec)
    }

    /// The Service that `f` was last written for (None: found in the maps at start).
    pub fn owner(&self, f: &Frontend) -> Option<&ServiceRef> {
        self.mirror.owner(f)
    }

    /// When [`Self::retry_refused`] has a refused frontend to try again.
    pub fn next_retry(&self) -> Option<Instant> {
        self.refused.next_retry()
    }

    /// Tries again the refused frontends whose retry is due at `now`, as they were last
    /// desired (a change to their Service since would have gone through a sync).
    pub fn retry_refused(&mut self, now: Instant) -> SyncReport {
        let mut report = SyncReport::default();
        for (f, spec) in self.refused.due(now) {
            self.upsert(&mut report, &f, &spec, now);
        }
        report
    }

    pub fn state(&self) -> &MapState {
        self.mirror.state()
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    /// Makes the maps equal to `desired`, except for held VIPs and Services, whose entries are
    /// left alone.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        self.sync_scoped(desired, None)
    }

    /// Like [`Self::sync`], but with `scope` only the frontends of those Services are looked
    /// at (a partial sync after a change to a few Services). Frontends of unknown owner (found
    /// in the maps at start) are only handled by full syncs.
    pub fn sync_scoped(
        &mut self,
        desired: &Desired,
        scope: Option<&BTreeSet<ServiceRef>>,
    ) -> SyncReport {
        let now = Instant::now();
        let mut report = SyncReport::default();
        let in_scope = |owner: Option<&ServiceRef>| match (scope, owner) {
            (None, _) => true,
            (Some(set), Some(o)) => set.contains(o),
            (Some(_), None) => false,
        };

        // Frontends present in the maps; a scoped sync needs only its Services' (each was
        // written with an owner).
        let applied: BTreeSet<Frontend> = match scope {
            None => self.mirror.frontends(),
            Some(set) => set
                .iter()
                .flat_map(|s| self.mirror.owned_by(s))
                .copied()
                .collect(),
        };
        for f in applied {
            let owner = self.mirror.owner(&f);
            if !in_scope(owner) {
                continue;
            }
            let held_owner = owner.is_some_and(|o| desired.held_services.contains(o));
            if desired.frontends.contains_key(&f)
                || desired.held_vips.contains(&f.vip)
                || held_owner
            {
                continue;
            }
            match self.writer(&mut report).delete(&f) {
                Ok(()) => {
                    if let Some(owner) = self.mirror.set_owner(f, None) {
                        report.written_services.insert(owner);
                    }
                }
                Err(e) => report.errors.push((f, e)),
            }
        }
        if report.deletes > 0 {
            self.refused.room_made(now);
        }
        // Refused frontends no longer wanted are forgotten.
        (self.refused)
            .retain(|f, spec| !in_scope(Some(&spec.service)) || desired.frontends.contains_key(f));
        for (f, spec) in &desired.frontends {
            if !in_scope(Some(&spec.service)) {
                continue;
            }
            if self.refused.defers(f, spec, now) {
                report.deferred += 1;
                continue;
            }
            self.upsert(&mut report, f, spec, now);
        }
        if scope.is_none()
            && let Err(e) = self.writer(&mut report).collect_orphans()
        {
            tracing::warn!(error = %e, "could not remove orphaned map entries; will retry");
        }
        report
    }

    /// Writes one frontend, keeping the refusals' book.
    fn upsert(&mut self, report: &mut SyncReport, f: &Frontend, spec: &FrontendSpec, now: Instant) {
        let deletes = report.deletes;
        let writes = report.updates + report.deletes;
        let written = self
            .plan(f, spec)
            .and_then(|plan| self.writer(report).upsert(plan));
        match written {
            Ok(()) => {
                self.mirror.set_owner(*f, Some(&spec.service));
                if report.updates + report.deletes > writes {
                    report.written_services.insert(spec.service.clone());
                }
                if self.refused.forget(f) {
                    report.no_longer_refused.push(*f);
                }
            }
            Err(e) => {
                let full = matches!(e, DatapathError::Full { .. });
                // A refused frontend's retry moves on whatever failed it, or its timer would
                // be due again at once.
                if full || self.refused.contains(f) {
                    let news = self.refused.refuse(*f, spec, now);
                    if news && full {
                        report.newly_refused.insert(*f);
                    }
                }
                report.errors.push((*f, e));
            }
        }
        if report.deletes > deletes {
            // Entries this write released (old slots, backends) may be what another needs.
            self.refused.room_made(now);
        }
    }

    fn writer<'a>(&'a mut self, report: &'a mut SyncReport) -> Writer<'a, D> {
        Writer {
            dp: &mut self.dp,
            mirror: &mut self.mirror,
            ids: &mut self.backend_ids,
            choice: &self.choice,
            report,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
