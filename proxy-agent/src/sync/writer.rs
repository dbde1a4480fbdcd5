//! The commit order: how one frontend's entries are written so that a reader (the eBPF
//! programs) never sees a master whose slots or backends are missing.
//!
//! update: new backends -> affinity matches (the usable backends, under the new master's
//!         id and, while it is read, the old one's) -> slots 1..n -> rev-NAT
//!         -> Maglev table -> the VIP of a new frontend -> master (the commit point, one
//!         atomic update) -> delete slots n+1..old_n, matches no longer usable, a table no
//!         longer named -> release the old rev-NAT entry -> delete unreferenced backends;
//! delete: master first -> slots -> matches -> table -> rev-NAT -> unreferenced backends.
//!
//! Every write that succeeds is recorded in the [`Mirror`] as it happens, so a failure part
//! way leaves the mirror equal to the maps, and the next sync takes it from there.

use std::collections::{BTreeMap, BTreeSet};

use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceValue};

use super::{
    Datapath, DatapathError, SyncReport,
    choice::{ChoiceConfig, maglev_table},
    ids::BackendIds,
    mirror::TableContent,
    mirror::{Mirror, rev_nat_value, service_key},
    plan::{Plan, RevNatPlan},
};
use crate::model::Frontend;

pub(super) struct Writer<'a, D: Datapath> {
    pub dp: &'a mut D,
    pub mirror: &'a mut Mirror,
    pub ids: &'a mut BackendIds,
    pub choice: &'a ChoiceConfig,
    pub report: &'a mut SyncReport,
}

impl<D: Datapath> Writer<'_, D> {
    /// Writes `plan`; its new ids are written or released (see [`Plan`]).
    pub fn upsert(&mut self, plan: Plan) -> Result<(), DatapathError> {
        let f = &plan.frontend;
        let old_master = self.mirror.master(f);
        let old_slots = self.mirror.slot_count(f);
        if plan.tables_full {
            self.report.tables_full.push(*f);
        }
        // 1. backends (new ones, as one run)
        self.write_backends(&plan.new_ids, &plan.new_backends)?;
        // 2. affinity: the backends a remembered choice may go on using, before any slot
        // names them (under the ids the plan says; those of the old master go after).
        let rev_nat_id = match plan.rev_nat {
            RevNatPlan::Keep(id) | RevNatPlan::New(id) => id,
        };
        let usable: &[u32] = if plan.affinity_timeout_s != 0 {
            &plan.slots
        } else {
            &[]
        };
        if let RevNatPlan::New(id) = plan.rev_nat {
            // Left by a failed update of a frontend that had this id: never this one's.
            self.remove_affinity_matches(id, &[])?;
        }
        for id in &plan.matches_under {
            self.add_affinity_matches(*id, &plan.slots)?;
        }
        // 3. slots 1..n (those that differ, as one run)
        self.write_slots(f, &plan.slots, old_slots)?;
        // 4. rev-NAT
        if let RevNatPlan::New(id) = plan.rev_nat {
            let rn = rev_nat_value(f);
            self.dp.update_rev_nat(id, rn)?;
            self.mirror.set_rev_nat(id, rn);
            self.report.updates += 1;
        }
        // 5. Maglev: the table, before the master that names it; unless the master already
        // names it and it was built from these very slots.
        let t = plan.maglev_table;
        let current = old_master.is_some_and(|m| m.maglev_table == t)
            && (self.mirror.table_content(t))
                .is_some_and(|c| c.built_from.as_deref() == Some(&plan.slots[..]));
        if t != 0 && !current {
            let size = self.choice.maglev_size;
            let previous = self.dp.maglev_table(t, size);
            let table = maglev_table(&plan.slots, &plan.members, size, &previous);
            self.write_table(t, &table, Some(plan.slots.clone()))?;
        }
        // A new frontend's VIP is known to the packet path before its master exists.
        if old_master.is_none() {
            self.add_vip(f)?;
        }
        // 6. master: the commit point.
        let master = ServiceValue::master(plan.slots.len() as u16, rev_nat_id, plan.flags)
            .with_choice(plan.maglev_table, plan.affinity_timeout_s);
        if old_master != Some(master) {
            let key = service_key(f, 0);
            self.dp.update_service(key, master)?;
            self.mirror.set_service(key, master);
            self.report.updates += 1;
        }
        // 7. slots past the new count, then what nothing references any more.
        for slot in plan.slots.len() + 1..=old_slots {
            self.remove_slot(service_key(f, slot as u16))?;
        }
        let old_rev_nat = old_master.map(|m| m.rev_nat_id);
        for id in old_rev_nat.into_iter().chain([rev_nat_id]) {
            let keep = if id == rev_nat_id { usable } else { &[] };
            self.remove_affinity_matches(id, keep)?;
        }
        if let Some(m) = old_master
            && m.maglev_table != plan.maglev_table
        {
            self.release_table(m.maglev_table)?;
        }
        if let Some(m) = old_master
            && m.rev_nat_id != rev_nat_id
        {
            self.release_rev_nat(m.rev_nat_id, f)?;
        }
        self.collect_backends()
    }

    pub fn delete(&mut self, f: &Frontend) -> Result<(), DatapathError> {
        let master_key = service_key(f, 0);
        let old_master = self.mirror.master(f);
        if old_master.is_some() {
            self.dp.delete_service(master_key)?;
            self.mirror.remove_service(&master_key);
            self.report.deletes += 1;
            self.remove_vip(f)?;
        }
        for slot in 1..=self.mirror.slot_count(f) {
            self.remove_slot(service_key(f, slot as u16))?;
        }
        if let Some(m) = old_master {
            self.remove_affinity_matches(m.rev_nat_id, &[])?;
            self.release_table(m.maglev_table)?;
            self.release_rev_nat(m.rev_nat_id, f)?;
        }
        self.collect_backends()
    }

    /// Makes backends `ids` usable by remembered choices of frontend `rev_nat_id`.
    fn add_affinity_matches(&mut self, rev_nat_id: u16, ids: &[u32]) -> Result<(), DatapathError> {
        for id in ids {
            let key = AffinityMatchKey::new(*id, rev_nat_id);
            if !self.mirror.has_affinity_match(&key) {
                self.dp.update_affinity_match(key)?;
                self.mirror.set_affinity_match(key, true);
                // A match keeps its backend (whose id could otherwise be reused by another
                // frontend's backend, which a remembered choice would then reach).
                self.ids.reference(*id);
                self.report.updates += 1;
            }
        }
        Ok(())
    }

    /// Removes the matches of frontend `rev_nat_id` for backends not in `keep`.
    fn remove_affinity_matches(
        &mut self,
        rev_nat_id: u16,
        keep: &[u32],
    ) -> Result<(), DatapathError> {
        let keep: BTreeSet<u32> = keep.iter().copied().collect();
        let stale: Vec<AffinityMatchKey> = (self.mirror.affinity_matches(rev_nat_id))
            .filter(|k| !keep.contains(&k.backend_id))
            .copied()
            .collect();
        for key in stale {
            self.dp.delete_affinity_match(key)?;
            self.mirror.set_affinity_match(key, false);
            self.ids.unreference(key.backend_id);
            self.report.deletes += 1;
        }
        Ok(())
    }

    /// Writes Maglev table `table` (the entries that differ) and moves the references of its
    /// backends from what it held to what it holds.
    fn write_table(
        &mut self,
        table: u16,
        entries: &[u32],
        built_from: Option<Vec<u32>>,
    ) -> Result<(), DatapathError> {
        assert_eq!(
            entries.len(),
            self.choice.maglev_size as usize,
            "a whole table"
        );
        if self.dp.write_maglev_table(table, entries)? > 0 {
            self.report.updates += 1;
        }
        // A table built from slots names only (and, but for more backends than entries, all
        // of) their backends: no need to walk its entries.
        let content = match built_from {
            Some(slots) => TableContent::of(&slots, Some(slots.clone())),
            None => TableContent::of(entries, None),
        };
        for id in &content.ids {
            self.ids.reference(*id);
        }
        let cleared = content.ids.is_empty();
        let old = (self.mirror).set_table_content(table, (!cleared).then_some(content));
        for id in old.into_iter().flat_map(|c| c.ids) {
            self.ids.unreference(id);
        }
        Ok(())
    }

    /// Clears Maglev table `table` once no master names it (0: none), so a table read
    /// through a stale master has no backend to give, and a dump shows only live tables.
    fn release_table(&mut self, table: u16) -> Result<(), DatapathError> {
        if table == 0 || self.mirror.table_in_use(table) {
            return Ok(());
        }
        let zeros = vec![0; self.choice.maglev_size as usize];
        self.write_table(table, &zeros, None)
    }

    /// Leftovers of a writer that died mid-update (found in the maps at start): backends and
    /// rev-NAT entries nothing references, VIP counts that drifted from the masters.
    pub fn collect_orphans(&mut self) -> Result<(), DatapathError> {
        self.collect_backends()?;
        let state = self.mirror.state();
        let masters = || state.services.iter().filter(|(k, _)| k.slot == 0);
        let used: std::collections::BTreeSet<u16> = masters().map(|(_, v)| v.rev_nat_id).collect();
        let orphans: Vec<u16> = (state.rev_nat.keys())
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        // VIP counts are derived from the masters.
        let mut want: BTreeMap<u32, u32> = BTreeMap::new();
        for (k, _) in masters() {
            *want.entry(k.vip_be).or_default() += 1;
        }
        let stale: Vec<u32> = (state.vips.keys())
            .filter(|v| !want.contains_key(v))
            .copied()
            .collect();
        // Matches of frontends without affinity (or gone).
        let with_affinity: std::collections::BTreeSet<u16> = (masters())
            .filter(|(_, v)| v.affinity_timeout_s != 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        let stale_matches: Vec<AffinityMatchKey> = (state.affinity_match.iter())
            .filter(|k| !with_affinity.contains(&k.rev_nat_id))
            .copied()
            .collect();
        for id in orphans {
            self.dp.delete_rev_nat(id)?;
            self.mirror.remove_rev_nat(id);
            self.report.deletes += 1;
        }
        for vip in stale {
            self.dp.delete_vip(vip)?;
            self.mirror.remove_vip(vip);
            self.report.deletes += 1;
        }

        for key in stale_matches {
            self.dp.delete_affinity_match(key)?;
            self.mirror.set_affinity_match(key, false);
            self.ids.unreference(key.backend_id);
            self.report.deletes += 1;
        }
        // Tables a failed update wrote or left that no master names.
        for t in self.mirror.unnamed_tables() {
            self.release_table(t)?;
        }
        self.collect_backends()?;
        for (vip, n) in want {
            if self.mirror.vip_frontends(vip) != Some(n) {
                self.dp.update_vip(vip, n)?;
                self.mirror.set_vip(vip, n);
                self.report.updates += 1;
            }
        }
        Ok(())
    }

    fn write_backends(&mut self, ids: &[u32], backends: &[Backend]) -> Result<(), DatapathError> {
        let result = self.dp.update_backends(ids, backends);
        let written = result.as_ref().map_or_else(|p| p.written, |()| ids.len());
        for (i, (id, b)) in ids.iter().zip(backends).enumerate() {
            if i < written {
                self.mirror.set_backend(*id, *b);
                // Collected unless a slot (or a retry) references it.
                self.ids.written_unreferenced(*id);
            } else {
                self.ids.release(*id, b);
            }
        }
        self.report.updates += written;
        result.map_err(|p| p.error)
    }

    fn write_slots(
        &mut self,
        f: &Frontend,
        slots: &[u32],
        old_slots: usize,
    ) -> Result<usize, DatapathError> {
        let (mut keys, mut values) = (Vec::with_capacity(slots.len()), Vec::new());
        for (i, id) in slots.iter().enumerate() {
            let key = service_key(f, i as u16 + 1);
            let value = ServiceValue::slot(*id);
            // A frontend without slots (a new one) has none to compare with.
            if old_slots == 0 || self.mirror.service(&key) != Some(value) {
                keys.push(key);
                values.push(value);
            }
        }
        let result = self.dp.update_services(&keys, &values);
        let written = result.as_ref().map_or_else(|p| p.written, |()| keys.len());
        for (key, value) in keys.iter().zip(&values).take(written) {
            let old = self.mirror.set_service(*key, *value);
            self.ids.reference(value.backend_id);
            if let Some(old) = old {
                self.ids.unreference(old.backend_id);
            }
            self.report.updates += 1;
        }
        result.map(|()| written).map_err(|p| p.error)
    }

    fn remove_slot(&mut self, key: ServiceKey) -> Result<(), DatapathError> {
        let Some(old) = self.mirror.service(&key) else {
            return Ok(());
        };
        self.dp.delete_service(key)?;
        self.mirror.remove_service(&key);
        self.ids.unreference(old.backend_id);
        self.report.deletes += 1;
        Ok(())
    }

    fn add_vip(&mut self, f: &Frontend) -> Result<(), DatapathError> {
        let vip = u32::from(f.vip).to_be();
        let n = self.mirror.vip_frontends(vip).unwrap_or(0) + 1;
        self.dp.update_vip(vip, n)?;
        self.mirror.set_vip(vip, n);
        self.report.updates += 1;
        Ok(())
    }

    fn remove_vip(&mut self, f: &Frontend) -> Result<(), DatapathError> {
        let vip = u32::from(f.vip).to_be();
        match self.mirror.vip_frontends(vip) {
            Some(n) if n > 1 => {
                self.dp.update_vip(vip, n - 1)?;
                self.mirror.set_vip(vip, n - 1);
            }
            Some(_) => {
                self.dp.delete_vip(vip)?;
                self.mirror.remove_vip(vip);
            }
            None => return Ok(()),
        }
        self.report.deletes += 1;
        Ok(())
    }

    /// Deletes the rev-NAT entry of a frontend that no longer uses it. Each frontend gets an
    /// id of its own, so an entry still holding this frontend's address is no one else's.
    fn release_rev_nat(&mut self, id: u16, f: &Frontend) -> Result<(), DatapathError> {
        if self.mirror.rev_nat(id) == Some(rev_nat_value(f)) {
            self.dp.delete_rev_nat(id)?;
            self.mirror.remove_rev_nat(id);
            self.report.deletes += 1;
        }
        Ok(())
    }

    /// Deletes backends that no slot references any more.
    fn collect_backends(&mut self) -> Result<(), DatapathError> {
        while let Some(id) = self.ids.next_unreferenced() {
            if !self.ids.is_referenced(id)
                && let Some(b) = self.mirror.backend(id)
            {
                self.dp.delete_backend(id)?;
                self.mirror.remove_backend(id);
                // One no connection ever used has no flows or sockets to clean.
                if !self.ids.is_fresh(id) {
                    self.report.removed_backends.push(b);
                }
                self.ids.release(id, &b);
                self.report.deletes += 1;
            }
            self.ids.collected(id);
        }
        Ok(())
    }
}
