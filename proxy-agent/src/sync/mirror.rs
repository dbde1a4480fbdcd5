//! What the writer-owned maps hold, as far as the writer knows: loaded from the maps at
//! start, and changed only by writes that succeeded, so a failed write is retried by the next
//! sync (level-triggered) and nothing already programmed is forgotten. Also who each frontend
//! was written for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use foldhash::HashMap;
use proxy_common::{AffinityMatchKey, Backend, RevNat, ServiceKey, ServiceValue};

use crate::model::{BackendAddr, Frontend, Proto, ServiceRef};

/// The content of the writer-owned maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u16, RevNat>,
    /// ClusterIP (network order) -> number of frontends (masters) on it.
    pub vips: BTreeMap<u32, u32>,
    /// The usable backends of frontends with session affinity.
    pub affinity_match: BTreeSet<AffinityMatchKey>,
}

impl MapState {
    /// Nothing programmed (a fresh datapath).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.backends.is_empty()
            && self.rev_nat.is_empty()
            && self.vips.is_empty()
            && self.affinity_match.is_empty()
    }
}

/// Frontend `f`'s entry in `slot` (0: its master).
pub fn service_key(f: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::master(u32::from(f.vip).to_be(), f.port.to_be(), f.proto.number()).with_slot(slot)
}

/// The frontend a map key belongs to (None for a protocol this agent never writes).
pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        vip: Ipv4Addr::from(u32::from_be(key.vip_be)),
        port: u16::from_be(key.port_be),
        proto: Proto::from_number(key.proto)?,
    })
}

pub fn backend_value(b: &BackendAddr, proto: Proto) -> Backend {
    Backend::new(u32::from(b.ip).to_be(), b.port.to_be(), proto.number())
}

pub fn rev_nat_value(f: &Frontend) -> RevNat {
    RevNat::new(u32::from(f.vip).to_be(), f.port.to_be())
}

#[derive(Debug, Default)]
pub struct Mirror {
    state: MapState,
    /// Masters in `state.services`, counted as they are written rather than walked.
    masters: usize,
    /// Of those, the masters that reject for want of a local endpoint (iTP=Local).
    no_local: usize,
    /// The Service each frontend was last written for (unknown for entries found in the maps
    /// at start), so an invalid Service keeps its frontends even when its VIP is unreadable.
    owners: HashMap<Frontend, ServiceRef>,
    /// The inverse of `owners`: a scoped sync visits only its Services' frontends.
    by_owner: HashMap<ServiceRef, BTreeSet<Frontend>>,
    /// Maglev tables named by masters, and how many masters name each (one, unless the maps
    /// were written by something else).
    tables: HashMap<u16, u32>,
    /// What each Maglev table holds, as far as the writer knows: the backend ids in it (they
    /// count as references: a table's backends are not deleted while it names them) and the
    /// slots it was built from (unknown for tables found at start, so the first sync
    /// compares every table).
    table_content: HashMap<u16, TableContent>,
}

/// A master that rejects for want of a local endpoint.
fn no_local(v: &ServiceValue) -> bool {
    v.count == 0 && v.flags & proxy_common::SVC_FLAG_NO_LOCAL_ENDPOINTS != 0
}

/// See [`Mirror`]'s `table_content`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableContent {
    pub built_from: Option<Vec<u32>>,
    /// Distinct, sorted; no 0.
    pub ids: Vec<u32>,
}

impl TableContent {
    pub fn of(entries: &[u32], built_from: Option<Vec<u32>>) -> Self {
        let mut ids: Vec<u32> = entries.iter().copied().filter(|id| *id != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        TableContent { built_from, ids }
    }
}

impl Mirror {
    pub fn new(state: MapState) -> Self {
        let mut tables: HashMap<u16, u32> = HashMap::default();
        for (k, v) in &state.services {
            if k.slot == 0 && v.maglev_table != 0 {
                *tables.entry(v.maglev_table).or_default() += 1;
            }
        }
        let masters = state.services.iter().filter(|(k, _)| k.slot == 0);
        Mirror {
            masters: masters.clone().count(),
            no_local: masters.filter(|(_, v)| no_local(v)).count(),
            state,
            tables,
            ..Mirror::default()
        }
    }

    /// Whether a master names Maglev table `id`.
    pub fn table_in_use(&self, id: u16) -> bool {
        self.tables.contains_key(&id)
    }

    /// How many masters name Maglev table `id`.
    pub fn table_users(&self, id: u16) -> u32 {
        self.tables.get(&id).copied().unwrap_or(0)
    }

    pub fn table_content(&self, id: u16) -> Option<&TableContent> {
        self.table_content.get(&id)
    }

    /// Records what table `id` holds now (None: nothing, it was cleared); returns what it
    /// held.
    pub fn set_table_content(
        &mut self,
        id: u16,
        content: Option<TableContent>,
    ) -> Option<TableContent> {
        match content {
            Some(c) => self.table_content.insert(id, c),
            None => self.table_content.remove(&id),
        }
    }

    /// Tables that hold backends and that no master names (left by a failed update).
    pub fn unnamed_tables(&self) -> Vec<u16> {
        (self.table_content.keys())
            .filter(|t| !self.tables.contains_key(t))
            .copied()
            .collect()
    }

    /// Backend ids that tables and affinity matches reference (as slots do).
    pub fn non_slot_references(&self) -> impl Iterator<Item = u32> + '_ {
        (self.table_content.values())
            .flat_map(|c| c.ids.iter().copied())
            .chain(self.state.affinity_match.iter().map(|k| k.backend_id))
    }

    fn count_table(&mut self, master: Option<ServiceValue>, add: bool) {
        let Some(t) = master.map(|m| m.maglev_table).filter(|t| *t != 0) else {
            return;
        };
        if add {
            *self.tables.entry(t).or_default() += 1;
        } else if let Some(n) = self.tables.get_mut(&t) {
            *n -= 1;
            if *n == 0 {
                self.tables.remove(&t);
            }
        }
    }

    /// The matches of frontend `rev_nat_id` (its keys sort together).
    pub fn affinity_matches(&self, rev_nat_id: u16) -> impl Iterator<Item = &AffinityMatchKey> {
        let lo = AffinityMatchKey::new(0, rev_nat_id);
        let hi = AffinityMatchKey::new(u32::MAX, rev_nat_id);
        self.state.affinity_match.range(lo..=hi)
    }

    pub fn has_affinity_match(&self, key: &AffinityMatchKey) -> bool {
        self.state.affinity_match.contains(key)
    }

    pub fn set_affinity_match(&mut self, key: AffinityMatchKey, present: bool) {
        if present {
            self.state.affinity_match.insert(key);
        } else {
            self.state.affinity_match.remove(&key);
        }
    }

    pub fn state(&self) -> &MapState {
        &self.state
    }

    pub fn masters(&self) -> usize {
        self.masters
    }

    /// Masters that reject for want of a local endpoint.
    pub fn no_local_masters(&self) -> usize {
        self.no_local
    }

    pub fn master(&self, f: &Frontend) -> Option<ServiceValue> {
        self.state.services.get(&service_key(f, 0)).copied()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.state.services.get(key).copied()
    }

    /// How many of `f`'s slots 1..=`upto` are present (slots are written in place).
    pub fn slots_present(&self, f: &Frontend, upto: usize) -> usize {
        if upto == 0 {
            return 0;
        }
        let hi = service_key(f, u16::try_from(upto).unwrap_or(u16::MAX));
        (self.state.services.range(service_key(f, 1)..=hi))
            .filter(|(k, _)| frontend_of(k) == Some(*f))
            .count()
    }

    /// Highest slot index present for `f` (slots may outlive their master after a crash).
    pub fn slot_count(&self, f: &Frontend) -> usize {
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

    /// Frontends present in the maps (masters, and slots left without a master by a crash).
    pub fn frontends(&self) -> BTreeSet<Frontend> {
        self.state.services.keys().filter_map(frontend_of).collect()
    }

    pub fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Option<ServiceValue> {
        let old = self.state.services.insert(key, value);
        if key.slot == 0 {
            if old.is_none() {
                self.masters += 1;
            }
            self.no_local += usize::from(no_local(&value));
            self.no_local -= usize::from(old.as_ref().is_some_and(no_local));
            self.count_table(old, false);
            self.count_table(Some(value), true);
        }
        old
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Option<ServiceValue> {
        let old = self.state.services.remove(key);
        if key.slot == 0 && old.is_some() {
            self.masters -= 1;
            self.no_local -= usize::from(old.as_ref().is_some_and(no_local));
            self.count_table(old, false);
        }
        old
    }

    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.state.backends.get(&id).copied()
    }

    pub fn set_backend(&mut self, id: u32, b: Backend) {
        self.state.backends.insert(id, b);
    }

    pub fn remove_backend(&mut self, id: u32) -> Option<Backend> {
        self.state.backends.remove(&id)
    }

    pub fn rev_nat(&self, id: u16) -> Option<RevNat> {
        self.state.rev_nat.get(&id).copied()
    }

    pub fn set_rev_nat(&mut self, id: u16, rn: RevNat) {
        self.state.rev_nat.insert(id, rn);
    }

    pub fn remove_rev_nat(&mut self, id: u16) {
        self.state.rev_nat.remove(&id);
    }

    pub fn vip_frontends(&self, vip_be: u32) -> Option<u32> {
        self.state.vips.get(&vip_be).copied()
    }

    pub fn set_vip(&mut self, vip_be: u32, frontends: u32) {
        self.state.vips.insert(vip_be, frontends);
    }

    pub fn remove_vip(&mut self, vip_be: u32) {
        self.state.vips.remove(&vip_be);
    }

    pub fn owner(&self, f: &Frontend) -> Option<&ServiceRef> {
        self.owners.get(f)
    }

    /// The frontends last written for `service`.
    pub fn owned_by(&self, service: &ServiceRef) -> impl Iterator<Item = &Frontend> {
        self.by_owner.get(service).into_iter().flatten()
    }

    /// Records who wrote `f` (None: nobody, it was deleted); returns the previous owner.
    pub fn set_owner(&mut self, f: Frontend, owner: Option<&ServiceRef>) -> Option<ServiceRef> {
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
}
