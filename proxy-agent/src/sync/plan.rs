//! Planning one frontend's update before anything is written: refused as a whole when a map
//! cannot hold it, otherwise its ids (Cilium's `upsertServiceProto` is handed its ids too).

use proxy_common::{
    AFFINITY_MATCH_MAP, AffinityMatchKey, BACKEND_MAP, Backend, REV_NAT_MAP,
    SVC_FLAG_NO_LOCAL_ENDPOINTS, SVC_MAP,
};

use super::{
    Datapath, DatapathError, Syncer,
    mirror::{backend_value, rev_nat_value},
};
use crate::model::{Algorithm, Frontend, FrontendSpec};

/// One frontend's update, with its ids already allocated. The ids of `new_ids` are taken
/// from the moment the plan is made until the writer has written them (or released those it
/// could not): a plan is always handed to [`super::writer::Writer::upsert`], at once.
pub(super) struct Plan {
    pub frontend: Frontend,
    /// Backend ids for slots 1..=n, in order.
    pub slots: Vec<u32>,
    /// Backends to write first: new ids and their backends.
    pub new_ids: Vec<u32>,
    pub new_backends: Vec<Backend>,
    pub rev_nat: RevNatPlan,
    pub flags: u16,
    /// The backends of `slots`, in order (Maglev hashes their addresses).
    pub members: Vec<Backend>,
    pub affinity_timeout_s: u32,
    /// The rev-NAT ids under which the slots' backends are made usable by remembered choices
    /// before the commit: the new master's if it has affinity, and the old master's if it
    /// has (readers see it over the new slots until the commit).
    pub matches_under: Vec<u16>,
    /// The frontend's Maglev table (1-based), 0 for random choice.
    pub maglev_table: u16,
    /// Maglev was asked for and every table is taken: written with random choice.
    pub tables_full: bool,
}

/// The rev-NAT entry a frontend's master will name.
pub(super) enum RevNatPlan {
    /// Its master's entry still maps to it.
    Keep(u16),
    /// A new id, written before the master.
    New(u16),
}

impl<D: Datapath> Syncer<D> {
    /// What writing `f` takes: refused as a whole (before anything is written) when a map
    /// cannot hold it, rather than half-written; otherwise its ids.
    pub(super) fn plan(
        &mut self,
        f: &Frontend,
        spec: &FrontendSpec,
    ) -> Result<Plan, DatapathError> {
        let state = self.mirror.state();
        let capacity = self.capacity;
        let values: Vec<Backend> = (spec.backends.iter())
            .map(|b| backend_value(b, f.proto))
            .collect();
        let mut new_backends: Vec<Backend> = (values.iter())
            .filter(|b| self.backend_ids.get(b).is_none())
            .copied()
            .collect();
        new_backends.sort_unstable();
        new_backends.dedup();
        if state.backends.len() + new_backends.len() > capacity.backends as usize {
            return Err(DatapathError::Full {
                map: BACKEND_MAP,
                capacity: capacity.backends,
                what: format!("{f} needs {} new backends", new_backends.len()),
            });
        }
        // At most, before the slots past the new count go (after the commit): slots 1..=n
        // written in place, and a new master.
        let old_master = self.mirror.master(f);
        let extra = values.len() - self.mirror.slots_present(f, values.len())
            + usize::from(old_master.is_none());
        if state.services.len() + extra > capacity.services as usize {
            return Err(DatapathError::Full {
                map: SVC_MAP,
                capacity: capacity.services,
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
                // Counted first: a walk of every id, for each frontend refused, is what a full
                // map would cost at every retry.
                let room = mirror.state().rev_nat.len() < capacity.frontends as usize;
                let id = room
                    .then(|| (self.rev_nat_ids).allocate(|id| mirror.rev_nat(id).is_some()))
                    .flatten()
                    .ok_or_else(|| DatapathError::Full {
                        map: REV_NAT_MAP,
                        capacity: capacity.frontends,
                        what: format!("no rev-NAT id left for {f}"),
                    })?;
                RevNatPlan::New(id)
            }
        };
        // The writer adds the new slots' matches before the commit and removes the old ones
        // after it, so an update briefly holds both: under the new master's id, and under the
        // old master's while it has affinity (see the writer).
        let rev_nat_id = match rev_nat {
            RevNatPlan::Keep(id) | RevNatPlan::New(id) => id,
        };
        let mut matches_under = Vec::new();
        if spec.affinity_timeout_s != 0 {
            matches_under.push(rev_nat_id);
        }
        if let Some(m) = old_master
            && m.affinity_timeout_s != 0
            && !matches_under.contains(&m.rev_nat_id)
        {
            matches_under.push(m.rev_nat_id);
        }
        let matches: usize = (matches_under.iter())
            .map(|id| self.missing_matches(*id, &values))
            .sum();
        if self.mirror.state().affinity_match.len() + matches > capacity.services as usize {
            return Err(DatapathError::Full {
                map: AFFINITY_MATCH_MAP,
                capacity: capacity.services,
                what: format!("{f} needs {matches} more affinity matches"),
            });
        }
        let (mut new_ids, mut new_backends) = (Vec::new(), Vec::new());
        let mut slots = Vec::with_capacity(values.len());
        for b in &values {
            let id = match self.backend_ids.get(b) {
                Some(id) => id,
                None => {
                    // None only if stale references hold every id (never after the check
                    // above): refused like a full map rather than written over one.
                    let Some(id) = self.backend_ids.allocate(*b, capacity.backends) else {
                        for (id, b) in new_ids.iter().zip(&new_backends) {
                            self.backend_ids.release(*id, b);
                        }
                        return Err(DatapathError::Full {
                            map: BACKEND_MAP,
                            capacity: capacity.backends,
                            what: format!("no backend id left for {f}"),
                        });
                    };
                    new_ids.push(id);
                    new_backends.push(*b);
                    id
                }
            };
            slots.push(id);
        }
        let (maglev_table, tables_full) = self.plan_table(old_master, spec, values.len());
        Ok(Plan {
            frontend: *f,
            members: values,
            affinity_timeout_s: spec.affinity_timeout_s,
            matches_under,
            maglev_table,
            tables_full,
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

impl<D: Datapath> Syncer<D> {
    /// How many of `values` have no affinity match under `rev_nat_id` yet (new backends have
    /// none).
    fn missing_matches(&self, rev_nat_id: u16, values: &[Backend]) -> usize {
        (values.iter())
            .filter(|b| {
                self.backend_ids.get(b).is_none_or(|id| {
                    !(self.mirror).has_affinity_match(&AffinityMatchKey::new(id, rev_nat_id))
                })
            })
            .count()
    }

    /// The Maglev table of a frontend with `backends` backends (0: random choice; no table
    /// for none) and whether one was wanted and none was free. A frontend keeps its table.
    fn plan_table(
        &mut self,
        old_master: Option<proxy_common::ServiceValue>,
        spec: &FrontendSpec,
        backends: usize,
    ) -> (u16, bool) {
        if self.choice.algorithm_of(spec) != Algorithm::Maglev || backends == 0 {
            return (0, false);
        }
        let tables = self.choice.maglev_tables;
        // Kept while it is this frontend's alone (two masters naming one table can only be
        // a leftover of another writer: one of them gets a table of its own).
        if let Some(t) = old_master.map(|m| m.maglev_table)
            && (1..=tables).contains(&t)
            && self.mirror.table_users(t) == 1
        {
            return (t, false);
        }
        let mirror = &self.mirror;
        match self
            .table_ids
            .allocate(tables, |id| mirror.table_in_use(id))
        {
            Some(t) => (t, false),
            None => (0, true),
        }
    }
}
