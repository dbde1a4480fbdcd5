//! Connection tracking for translated flows, in the LRU `PROXY_CT_V2` (layout and lifetimes in
//! proxy-common): a forward entry (the client's packets keep their backend) and a reply entry
//! (the backend's answers go back to the VIP) per flow, each with its TCP state and when it was
//! last seen. One lookup of a packet's own tuple finds either. An expired entry is absent; the
//! agent deletes it later.
//!
//! A packet of a flow that was not translated is never rewritten: a reply entry answers only
//! its own flow, so a SYN on it (a connection opening from the backend's side) is left alone,
//! and a client's direct SYN to the pod on a reused tuple removes the entries of the flow it
//! replaces.

use aya_ebpf::{Global, bindings::BPF_ANY};
use proxy_common::{
    CT_CLOSING, CT_DIR_FORWARD, CT_DIR_REPLY, CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REPLY, CT_SYN,
    CT_UDP, Counter, CtKey, CtTimeouts, CtValue,
};

use super::parse::{PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::{
    lb::{self, Chosen},
    log::{event, host, proto_name},
    maps::{PROXY_CT_V2, count},
};

/// Lifetimes per state, set by the agent at load time (its `--conntrack-*` flags).
#[unsafe(no_mangle)]
static PROXY_CT_TIMEOUTS: Global<CtTimeouts> = Global::new(CtTimeouts::DEFAULT);

pub use crate::clock::now_s;

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

/// A flow's state and FINs after a packet with `flags` from the `dir` side: a plain ACK ends
/// the handshake; a RST, or a FIN from both sides, closes.
#[inline(always)]
fn next_state(state: u8, fins: u8, dir: u8, tcp: bool, flags: u8) -> (u8, u8) {
    if !tcp {
        return (CT_UDP, 0);
    }
    let fins = if flags & TCP_FIN != 0 {
        fins | fin_of(dir)
    } else {
        fins
    };
    if flags & TCP_RST != 0 || fins == CT_FIN_FORWARD | CT_FIN_REPLY {
        return (CT_CLOSING, fins);
    }
    if state == CT_SYN && flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        return (CT_ESTABLISHED, fins);
    }
    (state, fins)
}

#[inline(always)]
fn fin_of(dir: u8) -> u8 {
    if dir == CT_DIR_FORWARD {
        CT_FIN_FORWARD
    } else {
        CT_FIN_REPLY
    }
}

/// Looks the packet's own tuple up and follows its flow. Both entries of a flow hold its
/// state: a change is written to both at once; the last-seen time at most once a second, so
/// most packets write nothing. A UDP flow's or a SYN's backend is checked to still exist then.
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
    if tcp && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        match v.dir {
            // A connection the backend opens towards the client's port is not a reply.
            CT_DIR_REPLY => {
                count(Counter::TcOtherFlowPassed);
                return Tracked::Leave;
            }
            // A client reopening a tuple whose connection is over: a new flow. (A SYN sent
            // again while the handshake is open keeps its backend.)
            _ if v.state != CT_SYN => return Tracked::New,
            _ => {}
        }
    }
    // (A SYN-ACK on a reply entry is its flow's, sent again if the client's ACK was lost:
    // a direct connection on the same tuple removed the entry with its SYN, see
    // `forget_replaced`.)
    let (state, fins) = next_state(v.state, v.fins, v.dir, tcp, flags);
    let changed = state != v.state || fins != v.fins;
    if changed || now != v.seen_s {
        // A flow whose backend is gone moves to a live one only if nothing is lost by it: a
        // UDP flow (kube-proxy forgets those), or a handshake whose SYN is sent again. A TCP
        // connection stays on its pod after the pod leaves the Service, as with kube-proxy's
        // conntrack: a terminating pod finishes its connections.
        let movable = !tcp || flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if v.dir == CT_DIR_FORWARD && movable && !backend_is(&v) {
            return Tracked::New;
        }
        // SAFETY: as above; plain stores into this entry's value.
        unsafe {
            (*e).state = state;
            (*e).fins = fins;
            (*e).seen_s = now;
        }
        // The flow's other entry: a flow busy one way only keeps both alive.
        let other = match v.dir {
            CT_DIR_FORWARD => t.reply_from(v.addr_be, v.port_be),
            _ => t.request_to(v.addr_be, v.port_be),
        };
        follow(&other, now, state, fins);
    }
    Tracked::Rewrite(v)
}

/// A client's SYN to a pod directly (not to a frontend), on a tuple whose reply entry an
/// earlier translated flow left: that flow is over (the client's kernel reuses the port), so
/// both its entries go, and the pod's SYN-ACK will not be rewritten to come from the VIP.
/// Only such a SYN pays this lookup.
#[inline(always)]
pub fn forget_replaced(t: &Tuple, flags: u8) {
    if t.proto != PROTO_TCP || flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let answer = t.reply_from(t.daddr, t.dport);
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { PROXY_CT_V2.get(answer.key()) }).copied() else {
        return;
    };
    if v.dir != CT_DIR_REPLY {
        return;
    }
    let _ = PROXY_CT_V2.remove(answer.key());
    let _ = PROXY_CT_V2.remove(answer.request_to(v.addr_be, v.port_be).key());
    count(Counter::TcOtherFlowPassed);
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

/// Brings the flow's other entry, `t`, to its state, seen at `now`. FINs are merged, so the
/// two sides closing at once on two CPUs still close the flow.
#[inline(always)]
fn follow(t: &Tuple, now: u32, state: u8, fins: u8) {
    if let Some(e) = PROXY_CT_V2.get_ptr_mut(t.key()) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe {
            let fins = (*e).fins | fins;
            (*e).state = if state != CT_CLOSING && fins == CT_FIN_FORWARD | CT_FIN_REPLY {
                CT_CLOSING
            } else {
                state
            };
            (*e).fins = fins;
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
    // (Not always a SYN: a flow whose entries were lost or expired picks up where it is.)
    let (state, fins) = next_state(opening, 0, CT_DIR_FORWARD, tcp, flags);
    let mut forward = CtValue::new(
        b.addr_be,
        b.port_be,
        rev_nat_id,
        chosen.id,
        CT_DIR_FORWARD,
        state,
        now,
    );
    forward.fins = fins;
    let mut reply = CtValue::new(
        t.daddr,
        t.dport,
        rev_nat_id,
        chosen.id,
        CT_DIR_REPLY,
        state,
        now,
    );
    reply.fins = fins;
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
        let (vip, port, client, cport) = super::frontend_and_client(t);
        let (addr, bport) = host(b.addr_be, b.port_be);
        event!(
            Warn,
            super::PROGRAM,
            "ct_update_failed frontend={:i}:{}/{} client={:i}:{} backend={:i}:{}",
            vip,
            port,
            proto_name(t.proto),
            client,
            cport,
            addr,
            bport
        );
    }
    forward
}
