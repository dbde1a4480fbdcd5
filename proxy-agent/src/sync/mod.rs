//! The single writer of the datapath maps: diffs the model's [`crate::model::Desired`] state against the
//! [`Mirror`] of what the maps hold and writes what differs, frontend by frontend, in commit
//! order (`writer`), with ids allocated before anything is written (`ids`).
//!
//! A frontend's new backends and its changed slots each go to the kernel as one run (one
//! batch syscall on the pinned maps). A frontend that cannot be written (map full, syscall
//! error) keeps its previous state, and the next sync retries it.

mod datapath;
mod ids;
mod mirror;
mod writer;

use std::collections::BTreeSet;

use proxy_common::{
    BACKEND_MAP, BACKEND_MAP_ENTRIES, Backend, REV_NAT_MAP, REV_NAT_MAP_ENTRIES,
    SVC_FLAG_NO_LOCAL_ENDPOINTS, SVC_MAP, SVC_MAP_ENTRIES,
};

pub use self::{
    datapath::{Datapath, DatapathError, Partial},
    mirror::{MapState, Mirror, backend_value, frontend_of, rev_nat_value, service_key},
};
use self::{
    ids::{BackendIds, RevNatIds},
    writer::{Plan, RevNatPlan, Writer},
};
use crate::model::{Desired, Frontend, FrontendSpec, ServiceRef};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub updates: usize,
    pub deletes: usize,
    /// Frontends that could not be written (map full, syscall error); their previous state
    /// stays programmed and the next sync retries.
    pub errors: Vec<(Frontend, DatapathError)>,
    /// Backends deleted by this sync (their UDP flows are forgotten, as kube-proxy does).
    pub removed_backends: Vec<Backend>,
    /// Services whose frontends this sync wrote (for network programming latency).
    pub written_services: BTreeSet<ServiceRef>,
}

pub struct Syncer<D: Datapath> {
    dp: D,
    mirror: Mirror,
    backend_ids: BackendIds,
    rev_nat_ids: RevNatIds,
}

impl<D: Datapath> Syncer<D> {
    /// Starts from what the maps hold now (empty maps for a fresh datapath).
    pub fn new(dp: D, state: MapState) -> Self {
        Syncer {
            dp,
            backend_ids: BackendIds::new(&state),
            rev_nat_ids: RevNatIds::default(),
            mirror: Mirror::new(state),
        }
    }

    /// Frontends (masters) in the maps, counted as they are written rather than walked.
    pub fn frontend_count(&self) -> usize {
        self.mirror.masters()
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
        for (f, spec) in &desired.frontends {
            if !in_scope(Some(&spec.service)) {
                continue;
            }
            let writes = report.updates + report.deletes;
            let written = self
                .plan(f, spec)
                .and_then(|plan| self.writer(&mut report).upsert(&plan));
            match written {
                Ok(()) => {
                    self.mirror.set_owner(*f, Some(&spec.service));
                    if report.updates + report.deletes > writes {
                        report.written_services.insert(spec.service.clone());
                    }
                }
                Err(e) => report.errors.push((*f, e)),
            }
        }
        if scope.is_none()
            && let Err(e) = self.writer(&mut report).collect_orphans()
        {
            tracing::warn!(error = %e, "could not remove orphaned map entries; will retry");
        }
        report
    }

    fn writer<'a>(&'a mut self, report: &'a mut SyncReport) -> Writer<'a, D> {
        Writer {
            dp: &mut self.dp,
            mirror: &mut self.mirror,
            ids: &mut self.backend_ids,
            report,
        }
    }

    /// What writing `f` takes: refused as a whole (before anything is written) when a map
    /// cannot hold it, rather than half-written; otherwise its ids.
    fn plan(&mut self, f: &Frontend, spec: &FrontendSpec) -> Result<Plan, DatapathError> {
        let state = self.mirror.state();
        let values: Vec<Backend> = (spec.backends.iter())
            .map(|b| backend_value(b, f.proto))
            .collect();
        let mut new_backends: Vec<Backend> = (values.iter())
            .filter(|b| self.backend_ids.get(b).is_none())
            .copied()
            .collect();
        new_backends.sort_unstable();
        new_backends.dedup();
        if state.backends.len() + new_backends.len() > BACKEND_MAP_ENTRIES as usize {
            return Err(DatapathError::Full {
                map: BACKEND_MAP,
                capacity: BACKEND_MAP_ENTRIES,
                what: format!("{f} needs {} new backends", new_backends.len()),
            });
        }
        let old_master = self.mirror.master(f);
        let present = self.mirror.slot_count(f) + usize::from(old_master.is_some());
        let extra = (values.len() + 1).saturating_sub(present);
        if state.services.len() + extra > SVC_MAP_ENTRIES as usize {
            return Err(DatapathError::Full {
                map: SVC_MAP,
                capacity: SVC_MAP_ENTRIES,
                what: format!("{f} needs {extra} more entries"),
            });
        }
        // Keep the master's rev-NAT id while it still maps to this frontend.
        let rev_nat = match old_master {
            Some(m) if self.mirror.rev_nat(m.rev_nat_id) == Some(rev_nat_value(f)) => {
                RevNatPlan::Keep(m.rev_nat_id)
            }
            _ => {
                let mirror = &self.mirror;
                let id = (self.rev_nat_ids)
                    .allocate(|id| mirror.rev_nat(id).is_some())
                    .ok_or_else(|| DatapathError::Full {
                        map: REV_NAT_MAP,
                        capacity: REV_NAT_MAP_ENTRIES,
                        what: format!("no rev-NAT id left for {f}"),
                    })?;
                RevNatPlan::New(id)
            }
        };
        let (mut new_ids, mut new_backends) = (Vec::new(), Vec::new());
        let slots = (values.iter())
            .map(|b| match self.backend_ids.get(b) {
                Some(id) => id,
                None => {
                    let id = self.backend_ids.allocate(*b);
                    new_ids.push(id);
                    new_backends.push(*b);
                    id
                }
            })
            .collect();
        Ok(Plan {
            frontend: *f,
            slots,
            new_ids,
            new_backends,
            rev_nat,
            flags: if spec.no_local_endpoints {
                SVC_FLAG_NO_LOCAL_ENDPOINTS
            } else {
                0
            },
        })
    }
}

#[cfg(test)]
mod tests;
