//! The single writer of the datapath maps. Keeps a mirror of exactly what the maps hold
//! (loaded from the maps at start, so a restarted agent converges without rewriting live
//! entries), diffs the model's [`Desired`] state against it, and writes in commit order:
//!
//! update: new backends -> slots 1..n -> rev-NAT -> master (the commit point, one atomic
//!         update) -> delete slots n+1..old_n -> delete unreferenced backends;
//! delete: master first -> slots -> rev-NAT -> unreferenced backends.
//!
//! So a reader (the eBPF programs) never sees a master whose slots or backends are missing.
//! A frontend's new backends and its changed slots each go to the kernel as one run (one
//! batch syscall on the pinned maps), in that same order.
//! The mirror only records operations that succeeded, so a failed write is retried by the next
//! sync (level-triggered), and nothing already programmed is lost.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use foldhash::HashMap;
use proxy_common::{
    BACKEND_MAP, BACKEND_MAP_ENTRIES, Backend, REV_NAT_MAP, REV_NAT_MAP_ENTRIES, RevNat,
    SVC_FLAG_NO_LOCAL_ENDPOINTS, SVC_MAP, SVC_MAP_ENTRIES, ServiceKey, ServiceValue,
};

use crate::model::{BackendAddr, Desired, Frontend, Proto, ServiceRef};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{op} on map {map} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} is full ({capacity} entries): {what}")]
    Full {
        map: &'static str,
        capacity: u32,
        what: String,
    },
}

/// A run of writes that stopped at a failure.
#[derive(Debug)]
pub struct Partial {
    /// How many of the run's entries were written (in order) before `error`.
    pub written: usize,
    pub error: DatapathError,
}

/// Where the sync writes: the pinned BPF maps, or a fake in tests.
pub trait Datapath {
    fn update_backend(&mut self, id: u32, backend: Backend) -> Result<(), DatapathError>;
    /// Writes `backends[i]` under `ids[i]`, in order. The pinned maps write the run with one
    /// syscall (`BPF_MAP_UPDATE_BATCH`): a Service's backends and slots are most of a cold
    /// start's writes.
    fn update_backends(&mut self, ids: &[u32], backends: &[Backend]) -> Result<(), Partial> {
        for (i, (id, b)) in ids.iter().zip(backends).enumerate() {
            self.update_backend(*id, *b)
                .map_err(|error| Partial { written: i, error })?;
        }
        Ok(())
    }
    /// Like [`Self::update_backends`], for service-map entries (a frontend's slots).
    fn update_services(
        &mut self,
        keys: &[ServiceKey],
        values: &[ServiceValue],
    ) -> Result<(), Partial> {
        for (i, (k, v)) in keys.iter().zip(values).enumerate() {
            self.update_service(*k, *v)
                .map_err(|error| Partial { written: i, error })?;
        }
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError>;
    fn update_service(&mut self, key: ServiceKey, value: ServiceValue)
    -> Result<(), DatapathError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), DatapathError>;
    fn update_rev_nat(&mut self, id: u16, value: RevNat) -> Result<(), DatapathError>;
    fn delete_rev_nat(&mut self, id: u16) -> Result<(), DatapathError>;
    fn update_vip(&mut self, vip_be: u32, frontends: u32) -> Result<(), DatapathError>;
    fn delete_vip(&mut self, vip_be: u32) -> Result<(), DatapathError>;
}

/// The content of the writer-owned maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u16, RevNat>,
    /// ClusterIP (network order) -> number of frontends (masters) on it.
    pub vips: BTreeMap<u32, u32>,
}

impl MapState {
    /// Nothing programmed (a fresh datapath).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.backends.is_empty()
            && self.rev_nat.is_empty()
            && self.vips.is_empty()
    }
}

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

pub fn service_key(f: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        vip_be: u32::from(f.vip).to_be(),
        port_be: f.port.to_be(),
        slot,
        proto: f.proto.number(),
        _pad: [0; 3],
    }
}

/// The frontend a map key belongs to (None for a protocol this agent never writes).
pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        vip: Ipv4Addr::from(u32::from_be(key.vip_be)),
        port: u16::from_be(key.port_be),
        proto: Proto::from_number(key.proto)?,
    })
}

fn backend_value(b: &BackendAddr, proto: Proto) -> Backend {
    Backend {
        addr_be: u32::from(b.ip).to_be(),
        port_be: b.port.to_be(),
        proto: proto.number(),
        _pad: 0,
    }
}

fn rev_nat_value(f: &Frontend) -> RevNat {
    RevNat {
        vip_be: u32::from(f.vip).to_be(),
        port_be: f.port.to_be(),
        _pad: 0,
    }
}

pub struct Syncer<D: Datapath> {
    dp: D,
    /// Exactly what the maps hold (as far as this writer knows).
    state: MapState,
    backend_ids: HashMap<Backend, u32>,
    /// Number of slots (over all frontends) that reference each backend id.
    backend_refs: HashMap<u32, u32>,
    /// Backends whose last reference went away: deleted at the end of the current update.
    unreferenced: BTreeSet<u32>,
    next_backend_id: u32,
    next_rev_nat_id: u16,
    /// The Service each frontend was last written for (unknown for entries found in the maps
    /// at start), so an invalid Service keeps its frontends even when its VIP is unreadable.
    owners: HashMap<Frontend, ServiceRef>,
    /// The inverse of `owners`: a scoped sync visits only its Services' frontends.
    by_owner: HashMap<ServiceRef, BTreeSet<Frontend>>,
    /// Masters in `state.services`.
    masters: usize,
}

impl<D: Datapath> Syncer<D> {
    /// Starts from what the maps hold now (empty maps for a fresh datapath).
    pub fn new(dp: D, state: MapState) -> Self {
        let mut backend_ids = HashMap::default();
        for (id, b) in &state.backends {
            backend_ids.insert(*b, *id);
        }
        let mut backend_refs = HashMap::default();
        for (k, v) in &state.services {
            if k.slot != 0 {
                *backend_refs.entry(v.backend_id).or_insert(0) += 1;
            }
        }
        let unreferenced = state
            .backends
            .keys()
            .filter(|id| !backend_refs.contains_key(*id))
            .copied()
            .collect();
        Syncer {
            dp,
            backend_ids,
            backend_refs,
            unreferenced,
            next_backend_id: 1,
            next_rev_nat_id: 1,
            owners: HashMap::default(),
            by_owner: HashMap::default(),
            masters: state.services.keys().filter(|k| k.slot == 0).count(),
            state,
        }
    }

    /// Frontends (masters) in the maps, counted as they are written rather than walked.
    pub fn frontend_count(&self) -> usize {
        self.masters
    }

    pub fn state(&self) -> &MapState {
        &self.state
    }

    pub fn datapath(&self) -> &D {
        &self.dp
    }

    /// For maintenance outside the writer's maps (conntrack cleanup).
    pub fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
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

        // Frontends present in the maps (masters, and slots left without a master by a crash);
        // a scoped sync needs only its Services' (each was written with an owner).
        let applied: BTreeSet<Frontend> = match scope {
            None => self.state.services.keys().filter_map(frontend_of).collect(),
            Some(set) => set
                .iter()
                .filter_map(|s| self.by_owner.get(s))
                .flatten()
                .copied()
                .collect(),
        };
        for f in applied {
            let owner = self.owners.get(&f);
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
            match self.delete_frontend(&f, &mut report) {
                Ok(()) => {
                    if let Some(owner) = self.set_owner(f, None) {
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
            let flags = if spec.no_local_endpoints {
                SVC_FLAG_NO_LOCAL_ENDPOINTS
            } else {
                0
            };
            let writes = report.updates + report.deletes;
            match self.update_frontend(f, &spec.backends, flags, &mut report) {
                Ok(()) => {
                    self.set_owner(*f, Some(&spec.service));
                    if report.updates + report.deletes > writes {
                        report.written_services.insert(spec.service.clone());
                    }
                }
                Err(e) => report.errors.push((*f, e)),
            }
        }
        if scope.is_none() {
            // Leftovers of a writer that died mid-update (found in the maps at start).
            if let Err(e) = self.collect_orphans(&mut report) {
                tracing::warn!(error = %e, "could not remove orphaned map entries; will retry");
            }
        }
        report
    }

    /// Records who wrote `f` (None: nobody, it was deleted); returns the previous owner.
    fn set_owner(&mut self, f: Frontend, owner: Option<&ServiceRef>) -> Option<ServiceRef> {
        let previous = match owner {
            Some(o) if self.owners.get(&f) == Some(o) => return Some(o.clone()),
            Some(o) => self.owners.insert(f, o.clone()),
            None => self.owners.remove(&f),
        };
        if let Some(p) = &previous
            && let Some(set) = self.by_owner.get_mut(p)
        {
            set.remove(&f);
            if set.is_empty() {
                self.by_owner.remove(p);
            }
        }
        if let Some(o) = owner {
            self.by_owner.entry(o.clone()).or_default().insert(f);
        }
        previous
    }

    fn collect_orphans(&mut self, report: &mut SyncReport) -> Result<(), DatapathError> {
        self.collect_backends(report)?;
        let used: BTreeSet<u16> = self
            .state
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.rev_nat_id)
            .collect();
        let orphans: Vec<u16> = self
            .state
            .rev_nat
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in orphans {
            self.dp.delete_rev_nat(id)?;
            self.state.rev_nat.remove(&id);
            report.deletes += 1;
        }
        // VIP counts are derived from the masters; mend any drift (e.g. a crash in between).
        let mut want: BTreeMap<u32, u32> = BTreeMap::new();
        for k in self.state.services.keys().filter(|k| k.slot == 0) {
            *want.entry(k.vip_be).or_default() += 1;
        }
        let stale: Vec<u32> = self
            .state
            .vips
            .keys()
            .filter(|v| !want.contains_key(v))
            .copied()
            .collect();
        for vip in stale {
            self.dp.delete_vip(vip)?;
            self.state.vips.remove(&vip);
            report.deletes += 1;
        }
        for (vip, n) in want {
            if self.state.vips.get(&vip) != Some(&n) {
                self.dp.update_vip(vip, n)?;
                self.state.vips.insert(vip, n);
                report.updates += 1;
            }
        }
        Ok(())
    }

    fn update_frontend(
        &mut self,
        f: &Frontend,
        backends: &[BackendAddr],
        flags: u16,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let master_key = service_key(f, 0);
        let old_master = self.state.services.get(&master_key).copied();
        let old_slots = self.slot_count(f);
        let values: Vec<Backend> = backends.iter().map(|b| backend_value(b, f.proto)).collect();

        // Capacity first: refuse the whole frontend rather than half-write it.
        let mut new_backends: Vec<Backend> = values
            .iter()
            .filter(|b| !self.backend_ids.contains_key(b))
            .copied()
            .collect();
        new_backends.sort_unstable();
        new_backends.dedup();
        if self.state.backends.len() + new_backends.len() > BACKEND_MAP_ENTRIES as usize {
            return Err(DatapathError::Full {
                map: BACKEND_MAP,
                capacity: BACKEND_MAP_ENTRIES,
                what: format!("{f} needs {} new backends", new_backends.len()),
            });
        }
        let extra =
            (values.len() + 1).saturating_sub(old_slots + usize::from(old_master.is_some()));
        if self.state.services.len() + extra > SVC_MAP_ENTRIES as usize {
            return Err(DatapathError::Full {
                map: SVC_MAP,
                capacity: SVC_MAP_ENTRIES,
                what: format!("{f} needs {extra} more entries"),
            });
        }

        // 1. backends (new ones, as one run)
        let mut ids = Vec::with_capacity(values.len());
        let (mut new_ids, mut new_values) = (Vec::new(), Vec::new());
        for b in &values {
            let id = match self.backend_ids.get(b) {
                Some(id) => *id,
                None => {
                    // Recorded now so a backend listed twice gets one id; undone below for
                    // those the write did not reach.
                    let id = self.alloc_backend_id();
                    self.state.backends.insert(id, *b);
                    self.backend_ids.insert(*b, id);
                    new_ids.push(id);
                    new_values.push(*b);
                    id
                }
            };
            ids.push(id);
        }
        if let Err(p) = self.dp.update_backends(&new_ids, &new_values) {
            for (id, b) in new_ids.iter().zip(&new_values).skip(p.written) {
                self.state.backends.remove(id);
                self.backend_ids.remove(b);
            }
            // Written but not referenced yet: collected unless a retry references them.
            self.unreferenced.extend(&new_ids[..p.written]);
            report.updates += p.written;
            return Err(p.error);
        }
        report.updates += new_ids.len();
        // 2. slots 1..n (those that differ, as one run)
        let (mut keys, mut slots) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
        for (i, id) in ids.iter().enumerate() {
            let key = service_key(f, i as u16 + 1);
            let value = ServiceValue {
                backend_id: *id,
                ..Default::default()
            };
            // A frontend without slots (a new one) has none to compare with.
            if old_slots == 0 || self.state.services.get(&key) != Some(&value) {
                keys.push(key);
                slots.push(value);
            }
        }
        let written = self.dp.update_services(&keys, &slots);
        let done = written.as_ref().map_or_else(|p| p.written, |()| keys.len());
        for (key, value) in keys.iter().zip(&slots).take(done) {
            self.record_slot(*key, *value, report);
        }
        written.map_err(|p| p.error)?;
        // 3. rev-NAT: keep the master's id while it still maps to this frontend.
        let rn = rev_nat_value(f);
        let rev_nat_id = match old_master {
            Some(m) if self.state.rev_nat.get(&m.rev_nat_id) == Some(&rn) => m.rev_nat_id,
            _ => {
                let id = self.alloc_rev_nat_id(f)?;
                self.dp.update_rev_nat(id, rn)?;
                self.state.rev_nat.insert(id, rn);
                report.updates += 1;
                id
            }
        };
        // A new frontend's VIP is known to the packet path before its master exists.
        if old_master.is_none() {
            self.add_vip(f, report)?;
        }
        // 4. master: the commit point.
        let master = ServiceValue {
            backend_id: 0,
            count: ids.len() as u16,
            rev_nat_id,
            flags,
            _pad: 0,
            affinity_timeout_s: 0,
        };
        if old_master != Some(master) {
            self.dp.update_service(master_key, master)?;
            if self.state.services.insert(master_key, master).is_none() {
                self.masters += 1;
            }
            report.updates += 1;
        }
        // 5. slots past the new count, then what nothing references any more.
        for slot in ids.len() + 1..=old_slots {
            self.remove_slot(service_key(f, slot as u16), report)?;
        }
        if let Some(m) = old_master
            && m.rev_nat_id != rev_nat_id
        {
            self.release_rev_nat(m.rev_nat_id, f, report)?;
        }
        self.collect_backends(report)
    }

    fn delete_frontend(
        &mut self,
        f: &Frontend,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let master_key = service_key(f, 0);
        let old_master = self.state.services.get(&master_key).copied();
        if old_master.is_some() {
            self.dp.delete_service(master_key)?;
            self.state.services.remove(&master_key);
            self.masters -= 1;
            report.deletes += 1;
            self.remove_vip(f, report)?;
        }
        for slot in 1..=self.slot_count(f) {
            self.remove_slot(service_key(f, slot as u16), report)?;
        }
        if let Some(m) = old_master {
            self.release_rev_nat(m.rev_nat_id, f, report)?;
        }
        self.collect_backends(report)
    }

    fn add_vip(&mut self, f: &Frontend, report: &mut SyncReport) -> Result<(), DatapathError> {
        let vip = u32::from(f.vip).to_be();
        let n = self.state.vips.get(&vip).copied().unwrap_or(0) + 1;
        self.dp.update_vip(vip, n)?;
        self.state.vips.insert(vip, n);
        report.updates += 1;
        Ok(())
    }

    fn remove_vip(&mut self, f: &Frontend, report: &mut SyncReport) -> Result<(), DatapathError> {
        let vip = u32::from(f.vip).to_be();
        match self.state.vips.get(&vip).copied() {
            Some(n) if n > 1 => {
                self.dp.update_vip(vip, n - 1)?;
                self.state.vips.insert(vip, n - 1);
            }
            Some(_) => {
                self.dp.delete_vip(vip)?;
                self.state.vips.remove(&vip);
            }
            None => return Ok(()),
        }
        report.deletes += 1;
        Ok(())
    }

    /// Highest slot index present for `f` (slots may outlive their master after a crash).
    fn slot_count(&self, f: &Frontend) -> usize {
        let lo = service_key(f, 1);
        let hi = service_key(f, u16::MAX);
        self.state
            .services
            .range(lo..=hi)
            .filter(|(k, _)| frontend_of(k) == Some(*f))
            .map(|(k, _)| k.slot as usize)
            .max()
            .unwrap_or(0)
    }

    /// Records a slot the maps now hold.
    fn record_slot(&mut self, key: ServiceKey, value: ServiceValue, report: &mut SyncReport) {
        let old = self.state.services.insert(key, value);
        *self.backend_refs.entry(value.backend_id).or_insert(0) += 1;
        self.unreferenced.remove(&value.backend_id);
        if let Some(old) = old {
            self.unref_backend(old.backend_id);
        }
        report.updates += 1;
    }

    fn remove_slot(
        &mut self,
        key: ServiceKey,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        let Some(old) = self.state.services.get(&key).copied() else {
            return Ok(());
        };
        self.dp.delete_service(key)?;
        self.state.services.remove(&key);
        self.unref_backend(old.backend_id);
        report.deletes += 1;
        Ok(())
    }

    fn unref_backend(&mut self, id: u32) {
        if let Some(n) = self.backend_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(&id);
                self.unreferenced.insert(id);
            }
        }
    }

    /// Deletes backends that no slot references any more.
    fn collect_backends(&mut self, report: &mut SyncReport) -> Result<(), DatapathError> {
        while let Some(id) = self.unreferenced.first().copied() {
            if !self.backend_refs.contains_key(&id) && self.state.backends.contains_key(&id) {
                self.dp.delete_backend(id)?;
                if let Some(b) = self.state.backends.remove(&id) {
                    self.backend_ids.remove(&b);
                    report.removed_backends.push(b);
                }
                report.deletes += 1;
            }
            self.unreferenced.remove(&id);
        }
        Ok(())
    }

    /// Deletes the rev-NAT entry of a frontend that no longer uses it. Each frontend gets an
    /// id of its own, so an entry still holding this frontend's address is no one else's.
    fn release_rev_nat(
        &mut self,
        id: u16,
        f: &Frontend,
        report: &mut SyncReport,
    ) -> Result<(), DatapathError> {
        if self.state.rev_nat.get(&id) == Some(&rev_nat_value(f)) {
            self.dp.delete_rev_nat(id)?;
            self.state.rev_nat.remove(&id);
            report.deletes += 1;
        }
        Ok(())
    }

    fn alloc_backend_id(&mut self) -> u32 {
        // The capacity check above guarantees a free id exists; ids are never 0.
        loop {
            let id = self.next_backend_id;
            self.next_backend_id = if id >= BACKEND_MAP_ENTRIES * 2 {
                1
            } else {
                id + 1
            };
            if !self.state.backends.contains_key(&id) {
                return id;
            }
        }
    }

    fn alloc_rev_nat_id(&mut self, f: &Frontend) -> Result<u16, DatapathError> {
        for _ in 0..REV_NAT_MAP_ENTRIES {
            let id = self.next_rev_nat_id;
            self.next_rev_nat_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.state.rev_nat.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(DatapathError::Full {
            map: REV_NAT_MAP,
            capacity: REV_NAT_MAP_ENTRIES,
            what: format!("no rev-NAT id left for {f}"),
        })
    }
}

#[cfg(test)]
mod tests;
