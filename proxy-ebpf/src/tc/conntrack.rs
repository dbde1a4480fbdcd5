//! Connection tracking for translated flows: a forward entry (the client's packets keep their
//! backend) and a reply entry (the backend's answers go back to the VIP) per flow, in the LRU
//! `PROXY_CT_V1`.

use aya_ebpf::bindings::BPF_ANY;
use proxy_common::{CT_DIR_FORWARD, CT_DIR_REPLY, Counter, CtKey, CtValue};

use crate::{
    lb::{self, Chosen},
    maps::{PROXY_CT_V1, count},
};

/// A packet's addresses and ports, as on the wire.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub sport: u16,
    pub daddr: u32,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    #[inline(always)]
    fn key(&self, dir: u8) -> CtKey {
        CtKey::new(
            self.saddr, self.sport, self.daddr, self.dport, self.proto, dir,
        )
    }

    /// The answer to this packet from `addr`:`port` (the backend it was sent to).
    #[inline(always)]
    pub fn reply_from(&self, addr: u32, port: u16) -> Tuple {
        Tuple {
            saddr: addr,
            sport: port,
            daddr: self.saddr,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// The VIP:port a backend's packet `t` answers for, if it is the reply of a translated flow.
#[inline(always)]
pub fn reply(t: &Tuple) -> Option<CtValue> {
    // SAFETY: copied out at once.
    unsafe { PROXY_CT_V1.get(t.key(CT_DIR_REPLY)) }.copied()
}

/// The backend of the translated flow `t` (client -> VIP) belongs to, while that backend
/// still exists with that address.
#[inline(always)]
pub fn established(t: &Tuple) -> Option<CtValue> {
    // SAFETY: copied out at once.
    let v = unsafe { PROXY_CT_V1.get(t.key(CT_DIR_FORWARD)) }.copied()?;
    lb::lookup_backend(v.backend_id)
        .filter(|b| b.addr_be == v.addr_be && b.port_be == v.port_be)
        .map(|_| v)
}

/// Records the new flow `t` (client -> VIP) to `chosen`; returns the forward entry. A failed
/// write is counted and the flow still translated.
#[inline(always)]
pub fn create(t: &Tuple, chosen: &Chosen, rev_nat_id: u16) -> CtValue {
    let b = chosen.backend;
    let forward = CtValue::new(b.addr_be, b.port_be, rev_nat_id, chosen.id);
    let reply = CtValue::new(t.daddr, t.dport, rev_nat_id, chosen.id);
    let reply_key = t.reply_from(b.addr_be, b.port_be).key(CT_DIR_REPLY);
    // The reply entry first: a reply can never arrive before it.
    if PROXY_CT_V1
        .insert(reply_key, reply, BPF_ANY.into())
        .is_err()
        || PROXY_CT_V1
            .insert(t.key(CT_DIR_FORWARD), forward, BPF_ANY.into())
            .is_err()
    {
        count(Counter::CtUpdateFailed);
    }
    forward
}
