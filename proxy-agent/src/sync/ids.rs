//! Id allocation: backend ids (shared by every frontend that has the same backend, counted by
//! the slots that reference them) and rev-NAT ids (one per frontend). Ids are handed to the
//! writer before it writes anything (Cilium's `upsertServiceProto` is handed its ids too).

use std::collections::BTreeSet;

use foldhash::{HashMap, HashSet};
use proxy_common::{Backend, REV_NAT_MAP_ENTRIES};

use super::mirror::MapState;

#[derive(Debug, Default)]
pub struct BackendIds {
    /// Every backend in the maps or about to be written, and its id.
    ids: HashMap<Backend, u32>,
    /// The ids of `ids` (an id is taken until its backend is deleted or never written).
    taken: HashSet<u32>,
    /// Number of slots (over all frontends) that reference each id.
    refs: HashMap<u32, u32>,
    /// Ids nothing may reference any more: deleted at the end of the current update unless
    /// referenced again by then.
    unreferenced: BTreeSet<u32>,
    /// Written and never referenced yet: no connection can have used them.
    fresh: HashSet<u32>,
    next: u32,
}

impl BackendIds {
    /// The ids of what the maps hold now; `others`: the references that are not slots
    /// (Maglev tables' and affinity matches' backend ids).
    pub fn new(state: &MapState, others: impl Iterator<Item = u32>) -> Self {
        let mut refs: HashMap<u32, u32> = HashMap::default();
        for (k, v) in &state.services {
            if k.slot != 0 {
                *refs.entry(v.backend_id).or_insert(0) += 1;
            }
        }
        for id in others {
            *refs.entry(id).or_insert(0) += 1;
        }
        BackendIds {
            ids: state.backends.iter().map(|(id, b)| (*b, *id)).collect(),
            // Ids slots reference are taken even without a backend entry (a crash between
            // writes): a new backend under such an id would be routed to by the stale slot.
            taken: state.backends.keys().chain(refs.keys()).copied().collect(),
            unreferenced: state
                .backends
                .keys()
                .filter(|id| !refs.contains_key(*id))
                .copied()
                .collect(),
            refs,
            fresh: HashSet::default(),
            next: 1,
        }
    }

    pub fn get(&self, b: &Backend) -> Option<u32> {
        self.ids.get(b).copied()
    }

    /// A new id for `b`, which has none, from 1 to twice the map's `capacity` (ids are never
    /// 0); None when every one is taken (the capacity check before makes that impossible
    /// unless stale references hold them).
    pub fn allocate(&mut self, b: Backend, capacity: u32) -> Option<u32> {
        let last = capacity.saturating_mul(2).max(1);
        for _ in 0..last {
            let id = self.next;
            self.next = if id >= last { 1 } else { id + 1 };
            if self.taken.insert(id) {
                self.ids.insert(b, id);
                return Some(id);
            }
        }
        None
    }

    /// Frees the id of `b`: deleted from the maps, or never written.
    pub fn release(&mut self, id: u32, b: &Backend) {
        self.taken.remove(&id);
        self.fresh.remove(&id);
        if self.ids.get(b) == Some(&id) {
            self.ids.remove(b);
        }
    }

    /// A slot (or a table, or an affinity match) now references `id`.
    pub fn reference(&mut self, id: u32) {
        *self.refs.entry(id).or_insert(0) += 1;
        self.unreferenced.remove(&id);
        self.fresh.remove(&id);
    }

    /// A slot that referenced `id` is gone (or changed).
    pub fn unreference(&mut self, id: u32) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
                self.unreferenced.insert(id);
            }
        }
    }

    /// Written, not referenced yet: collected unless a slot references it before then.
    pub fn written_unreferenced(&mut self, id: u32) {
        if !self.refs.contains_key(&id) {
            self.unreferenced.insert(id);
            self.fresh.insert(id);
        }
    }

    /// Written and never referenced since: nothing can have connected to it.
    pub fn is_fresh(&self, id: u32) -> bool {
        self.fresh.contains(&id)
    }

    /// The first id on the list to collect.
    pub fn next_unreferenced(&self) -> Option<u32> {
        self.unreferenced.first().copied()
    }

    pub fn is_referenced(&self, id: u32) -> bool {
        self.refs.contains_key(&id)
    }

    /// Takes `id` off the list to collect (it was collected, or is referenced again).
    pub fn collected(&mut self, id: u32) {
        self.unreferenced.remove(&id);
    }
}

/// Rev-NAT ids: one per frontend, so an entry still holding a frontend's address is no one
/// else's. 0 is never used.
#[derive(Debug)]
pub struct RevNatIds {
    next: u16,
}

impl Default for RevNatIds {
    fn default() -> Self {
        RevNatIds { next: 1 }
    }
}

impl RevNatIds {
    /// A free id (`taken` says which are in use), or None when all are.
    pub fn allocate(&mut self, taken: impl Fn(u16) -> bool) -> Option<u16> {
        for _ in 0..REV_NAT_MAP_ENTRIES {
            let id = self.next;
            self.next = if id == u16::MAX { 1 } else { id + 1 };
            if !taken(id) {
                return Some(id);
            }
        }
        None
    }
}
