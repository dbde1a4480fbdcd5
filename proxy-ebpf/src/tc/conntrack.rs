//! Connection tracking for translated flows, in the LRU `PROXY_CT_V2` (layout and lifetimes in
//! proxy-common): a forward entry (the client's packets keep their backend) and a reply entry
//! (the backend's answers go back to the VIP) per flow, each with its TCP state and when it was
//! last seen. One lookup of a packet's own tuple finds either. An expired entry is absent; the
//! agent deletes it later.
//!
//! A packet of a flow that was not translated is never rewritten: a reply entry answers only
//! its own flow, so a SYN on it (a connection opening from the backend's side) or a SYN-ACK
//! once its handshake is over (a new, direct connection to the pod on a reused tuple) is left
//! alone.

use aya_ebpf::{Global, bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use proxy_common::{
    CT_CLOSING, CT_DIR_FORWARD, CT_DIR_REPLY, CT_ESTABLISHED, CT_SYN, CT_UDP, Counter, CtKey,
    CtTimeouts, CtValue,
};

use super::parse::{PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::{
    lb::{self, Chosen},
    maps::{PROXY_CT_V2, count},
};

/// Lifetimes per state, set by the agent at load time (its `--conntrack-*` flags).
#[unsafe(no_mangle)]
static PROXY_CT_TIMEOUTS: Global<CtTimeouts> = Global::new(CtTimeouts::DEFAULT);

/// The datapath's clock: `CLOCK_MONOTONIC` in seconds (the agent collects by the same).
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32
}

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
    fn key(&self) -> CtKey {
        CtKey::new(self.saddr, self.sport, self.daddr, self.dport, self.proto)
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

    /// The packet this answer answers, as its sender addressed it: to `addr`:`port` (the VIP).
    #[inline(always)]
    fn request_to(&self, addr: u32, port: u16) -> Tuple {
        Tuple {
            saddr: self.daddr,
            sport: self.dport,
            daddr: addr,
            dport: port,
            proto: self.proto,
        }
    }
}

/// What a packet's conntrack entry says about it.
pub enum Tracked {
    /// Rewrite it as the entry says (a forward entry: to its backend; a reply: from its VIP).
    Rewrite(CtValue),
    /// Another flow's packet on a tracked tuple: leave it as it is.
    Leave,
    /// No live entry: a new flow, if it is to a frontend.
    New,
}

/// The state after a packet with `flags`: FIN or RST closes; a plain ACK of this side ends
/// its handshake.
#[inline(always)]
fn next_state(state: u8, tcp: bool, flags: u8) -> u8 {
    if !tcp {
        return CT_UDP;
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        return CT_CLOSING;
    }
    if state == CT_SYN && flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        return CT_ESTABLISHED;
    }
    state
}

/// Looks the packet's own tuple up and follows its flow: the state from the TCP flags and the
/// last-seen time are written at most once a second (or on a change), so most packets write
/// nothing; a forward entry's backend is checked to still exist then.
#[inline(always)]
pub fn track(t: &Tuple, flags: u8, now: u32) -> Tracked {
    let key = t.key();
    let Some(e) = PROXY_CT_V2.get_ptr_mut(key) else {
        return Tracked::New;
    };
    // SAFETY: a map value pointer, valid for this program run; copied out at once.
    let v = unsafe { *e };
    if v.expired(now, &PROXY_CT_TIMEOUTS.load()) {
        return Tracked::New;
    }
    let tcp = t.proto == PROTO_TCP;
    if tcp && flags & TCP_SYN != 0 {
        let ack = flags & TCP_ACK != 0;
        match v.dir {
            CT_DIR_REPLY if !ack => {
                count(Counter::TcOtherFlowPassed);
                return Tracked::Leave;
            }
            CT_DIR_REPLY if v.state != CT_SYN => {
                // The tuple belongs to another connection now: the entry is stale.
                let _ = PROXY_CT_V2.remove(key);
                count(Counter::TcOtherFlowPassed);
                return Tracked::Leave;
            }
            // A client reopening a tuple whose connection is over: a new flow. (A SYN sent
            // again while the handshake is open keeps its backend.)
            CT_DIR_FORWARD if !ack && v.state != CT_SYN => return Tracked::New,
            _ => {}
        }
    }
    let state = next_state(v.state, tcp, flags);
    if state != v.state || now != v.seen_s {
        if v.dir == CT_DIR_FORWARD && !backend_is(&v) {
            return Tracked::New;
        }
        // SAFETY: as above; plain stores into this entry's value.
        unsafe {
            (*e).state = state;
            (*e).seen_s = now;
        }
        // The flow's other entry lives as long: a flow busy one way only keeps both (once a
        // second: a state change within the second leaves it). A reset ends both directions
        // at once (the other side sends nothing more).
        let reset = flags & TCP_RST != 0;
        if now != v.seen_s || reset {
            let other = match v.dir {
                CT_DIR_FORWARD => t.reply_from(v.addr_be, v.port_be),
                _ => t.request_to(v.addr_be, v.port_be),
            };
            touch(&other, now, reset);
        }
    }
    Tracked::Rewrite(v)
}

/// The live reply entry of `t` (an ICMP error's quoted flow, seen from its backend), if any.
#[inline(always)]
pub fn reply(t: &Tuple, now: u32) -> Option<CtValue> {
    // SAFETY: copied out at once.
    let v = unsafe { PROXY_CT_V2.get(t.key()) }.copied()?;
    (v.dir == CT_DIR_REPLY && !v.expired(now, &PROXY_CT_TIMEOUTS.load())).then_some(v)
}

/// The flow's backend still exists with the address the entry holds.
#[inline(always)]
fn backend_is(v: &CtValue) -> bool {
    lb::lookup_backend(v.backend_id)
        .is_some_and(|b| b.addr_be == v.addr_be && b.port_be == v.port_be)
}

/// Marks the entry of `t` seen at `now` (and closing, with `close`).
#[inline(always)]
fn touch(t: &Tuple, now: u32, close: bool) {
    if let Some(e) = PROXY_CT_V2.get_ptr_mut(t.key()) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe {
            if close {
                (*e).state = CT_CLOSING;
            }
            (*e).seen_s = now;
        }
    }
}

/// Records the new flow `t` (client -> VIP, a packet with `flags`) to `chosen`; returns the
/// forward entry. A failed write is counted and the flow still translated.
#[inline(always)]
pub fn create(t: &Tuple, flags: u8, chosen: &Chosen, rev_nat_id: u16, now: u32) -> CtValue {
    let b = chosen.backend;
    let tcp = t.proto == PROTO_TCP;
    let opening = if tcp { CT_SYN } else { CT_UDP };
    let forward = CtValue::new(
        b.addr_be,
        b.port_be,
        rev_nat_id,
        chosen.id,
        CT_DIR_FORWARD,
        next_state(opening, tcp, flags),
        now,
    );
    let reply = CtValue::new(
        t.daddr,
        t.dport,
        rev_nat_id,
        chosen.id,
        CT_DIR_REPLY,
        opening,
        now,
    );
    let reply_key = t.reply_from(b.addr_be, b.port_be).key();
    // The reply entry first: a reply can never arrive before it.
    if PROXY_CT_V2
        .insert(reply_key, reply, BPF_ANY.into())
        .is_err()
        || PROXY_CT_V2
            .insert(t.key(), forward, BPF_ANY.into())
            .is_err()
    {
        count(Counter::CtUpdateFailed);
    }
    forward
}
