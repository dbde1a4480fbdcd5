//! The load-balancing core: the one place a backend is chosen, for the socket hooks and the
//! packet path alike (Cilium's `lb4_lookup_service`, `lb4_select_backend_id` and
//! `__lb4_lookup_backend`). A feature of backend choice is written here, once: the
//! no-endpoint verdict, ClientIP affinity, then the frontend's algorithm (random, or its
//! Maglev table).

use aya_ebpf::{Global, bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, Counter, SVC_FLAG_NO_LOCAL_ENDPOINTS,
    ServiceKey, ServiceValue, maglev_element, maglev_index,
};

use crate::{
    clock,
    maps::{
        BACKENDS, PROXY_AFF_V1, PROXY_AFFM_V1, PROXY_MAGLEV_V1, PROXY_SVC_V1, PROXY_VIP_V1, count,
    },
};

/// The Maglev table size the agent built its tables with (set at load time; 0: none).
#[unsafe(no_mangle)]
static PROXY_MAGLEV_SIZE: Global<u32> = Global::new(proxy_common::MAGLEV_DEFAULT_TABLE_SIZE);

/// Why a frontend has no backend for a new connection.
#[derive(Clone, Copy)]
pub enum NoBackend {
    /// No usable endpoint at all: refuse, as kube-proxy's REJECT.
    Refused,
    /// iTP=Local, with endpoints only on other nodes: never a remote one, and never "refused".
    NoLocal,
}

/// A backend and its id (a flow keeps its backend while the id still maps to it).
#[derive(Clone, Copy)]
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
}

/// The outcome of choosing a backend for a new connection.
pub enum Selection {
    Backend(Chosen),
    Reject(NoBackend),
    /// A slot or backend the master promised was missing (counted): the connection proceeds
    /// untranslated, never broken by an internal miss.
    Missing,
}

/// Who opens a new connection, as the choice needs it.
pub struct Flow {
    /// The client for ClientIP affinity ([`proxy_common::AFFINITY_CLIENT_NETNS`] or
    /// [`proxy_common::AFFINITY_CLIENT_IP`], and its id); kind 0: unknown, no affinity.
    pub client_kind: u8,
    pub client: u64,
    /// Maglev's hash of the connection (the 5-tuple, or the socket cookie).
    pub hash: u32,
}

/// The master entry of frontend `key` (slot 0), if it is one.
#[inline(always)]
pub fn lookup_service(key: ServiceKey) -> Option<ServiceValue> {
    // SAFETY: copied out at once; the writer replaces entries, never mutates them.
    unsafe { PROXY_SVC_V1.get(key) }.copied()
}

#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKENDS.get(id) }.copied()
}

/// A backend for a new connection `flow` to frontend `svc`, whose master is `master`.
#[inline(always)]
pub fn select_backend(svc: ServiceKey, master: &ServiceValue, flow: &Flow) -> Selection {
    if master.count == 0 {
        return Selection::Reject(if master.flags & SVC_FLAG_NO_LOCAL_ENDPOINTS != 0 {
            NoBackend::NoLocal
        } else {
            NoBackend::Refused
        });
    }
    let affinity = (master.affinity_timeout_s != 0 && flow.client_kind != 0)
        .then(|| AffinityKey::new(flow.client_kind, flow.client, master.rev_nat_id));
    let now = clock::now_s();
    if let Some(key) = &affinity
        && let Some(chosen) = remembered(key, master, now)
    {
        return Selection::Backend(chosen);
    }
    let id = match master.maglev_table {
        0 => None,
        table => maglev_backend_id(table, flow.hash),
    };
    let chosen = id
        .or_else(|| random_backend_id(svc, master))
        .and_then(|id| {
            Some(Chosen {
                id,
                backend: lookup_backend(id)?,
            })
        });
    match chosen {
        Some(c) => {
            if let Some(key) = &affinity {
                remember(key, c.id, now);
            }
            Selection::Backend(c)
        }
        None => {
            count(Counter::BackendMissing);
            Selection::Missing
        }
    }
}

/// The backend this client was last sent to, while its entry is live and the backend is
/// still one the frontend may use; the entry's timer restarts (at most once a second).
#[inline(always)]
fn remembered(key: &AffinityKey, master: &ServiceValue, now: u32) -> Option<Chosen> {
    // SAFETY: copied out at once.
    let v = unsafe { PROXY_AFF_V1.get(key) }.copied()?;
    if v.expired(now, master.affinity_timeout_s) {
        return None;
    }
    let usable = AffinityMatchKey::new(v.backend_id, master.rev_nat_id);
    // SAFETY: only the presence is read.
    unsafe { PROXY_AFFM_V1.get(usable) }?;
    let backend = lookup_backend(v.backend_id)?;
    if v.last_used_s != now {
        remember(key, v.backend_id, now);
    }
    count(Counter::AffinityReused);
    Some(Chosen {
        id: v.backend_id,
        backend,
    })
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, now: u32) {
    let v = AffinityValue {
        backend_id,
        last_used_s: now,
    };
    if PROXY_AFF_V1.insert(*key, v, BPF_ANY.into()).is_err() {
        count(Counter::AffinityUpdateFailed);
    }
}

/// The backend id in entry `hash % size` of Maglev table `table` (None where the agent has
/// not written the table yet: the caller chooses at random).
#[inline(always)]
fn maglev_backend_id(table: u16, hash: u32) -> Option<u32> {
    let size = PROXY_MAGLEV_SIZE.load();
    if size == 0 {
        return None;
    }
    let (element, half) = maglev_element(maglev_index(table, size, hash));
    let id = PROXY_MAGLEV_V1.get(element)?.backend_id[half];
    (id != 0).then_some(id)
}

/// The backend id of a slot chosen at random among the master's `count` (> 0).
#[inline(always)]
fn random_backend_id(svc: ServiceKey, master: &ServiceValue) -> Option<u32> {
    // SAFETY: plain helper call.
    let pick = unsafe { bpf_get_prandom_u32() } % u32::from(master.count);
    let slot = svc.with_slot(pick as u16 + 1);
    // SAFETY: copied out at once.
    unsafe { PROXY_SVC_V1.get(slot) }.map(|s| s.backend_id)
}

/// Whether `addr` is a ClusterIP (of any frontend).
#[inline(always)]
pub fn is_vip(addr_be: u32) -> bool {
    // SAFETY: only the presence is read.
    unsafe { PROXY_VIP_V1.get(addr_be) }.is_some()
}
