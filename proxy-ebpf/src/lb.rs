//! The load-balancing core: the one place a backend is chosen, for the socket hooks and the
//! packet path alike (Cilium's `lb4_lookup_service`, `lb4_select_backend_id` and
//! `__lb4_lookup_backend`). A feature of backend choice (affinity, an algorithm) is written
//! here, once.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Backend, Counter, SVC_FLAG_NO_LOCAL_ENDPOINTS, ServiceKey, ServiceValue};

use crate::maps::{PROXY_BE_V1, PROXY_SVC_V1, PROXY_VIP_V1, count};

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

/// The master entry of frontend `key` (slot 0), if it is one.
#[inline(always)]
pub fn lookup_service(key: ServiceKey) -> Option<ServiceValue> {
    // SAFETY: copied out at once; the writer replaces entries, never mutates them.
    unsafe { PROXY_SVC_V1.get(key) }.copied()
}

#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { PROXY_BE_V1.get(id) }.copied()
}

/// A backend for a new connection to frontend `svc`, whose master is `master`.
#[inline(always)]
pub fn select_backend(svc: ServiceKey, master: &ServiceValue) -> Selection {
    if master.count == 0 {
        return Selection::Reject(if master.flags & SVC_FLAG_NO_LOCAL_ENDPOINTS != 0 {
            NoBackend::NoLocal
        } else {
            NoBackend::Refused
        });
    }
    let chosen = select_backend_id(svc, master).and_then(|id| {
        Some(Chosen {
            id,
            backend: lookup_backend(id)?,
        })
    });
    match chosen {
        Some(c) => Selection::Backend(c),
        None => {
            count(Counter::BackendMissing);
            Selection::Missing
        }
    }
}

/// The backend id of a slot chosen at random among the master's `count` (> 0).
#[inline(always)]
fn select_backend_id(svc: ServiceKey, master: &ServiceValue) -> Option<u32> {
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
