//! Packet-path connection tracking: written by the TC program, collected by the agent.
//!
//! A translated flow has two entries: one keyed by its client's packets (client -> VIP), one
//! by its backend's replies (backend -> client). Their tuples never coincide (a VIP is never a
//! client's address), so one lookup of a packet's own tuple finds either, and the entry says
//! which it is. Each entry carries its TCP state and when it was last seen; an entry older than
//! its state's lifetime ([`CtTimeouts`]) is expired: the programs treat it as absent, and the
//! agent deletes it.

use core::mem::size_of;

/// Key of [`crate::CT_MAP`]: a packet's own addresses and ports, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 16);

impl CtKey {
    /// The entry of a packet saddr:sport -> daddr:dport.
    #[inline(always)]
    pub const fn new(
        saddr_be: u32,
        sport_be: u16,
        daddr_be: u32,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        CtKey {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// [`CtValue::dir`]: the client's packets (to the VIP), rewritten to the backend.
pub const CT_DIR_FORWARD: u8 = 0;
/// [`CtValue::dir`]: the backend's replies (to the client), rewritten to come from the VIP.
pub const CT_DIR_REPLY: u8 = 1;

/// [`CtValue::state`]: a TCP connection opening (its SYN seen, its handshake not over).
pub const CT_SYN: u8 = 1;
/// [`CtValue::state`]: a TCP connection whose handshake is over (a plain ACK after the SYN),
/// until both sides have sent a FIN.
pub const CT_ESTABLISHED: u8 = 2;
/// [`CtValue::state`]: a FIN seen from both sides, or a RST from either.
pub const CT_CLOSING: u8 = 3;
/// [`CtValue::state`]: a UDP flow.
pub const CT_UDP: u8 = 4;

/// [`CtValue::fins`]: the client sent a FIN.
pub const CT_FIN_FORWARD: u8 = 1;
/// [`CtValue::fins`]: the backend sent a FIN.
pub const CT_FIN_REPLY: u8 = 2;

/// Every state, with its name (metrics, `proxy-agent services`).
pub const CT_STATES: [(u8, &str); 4] = [
    (CT_SYN, "syn"),
    (CT_ESTABLISHED, "established"),
    (CT_CLOSING, "closing"),
    (CT_UDP, "udp"),
];

/// Value of [`crate::CT_MAP`]: the address to write, and the flow's state. Forward entries
/// hold the backend (and its id, so a flow whose backend is gone is balanced anew); reply
/// entries hold the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub rev_nat_id: u16,
    pub backend_id: u32,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    /// [`CT_SYN`], [`CT_ESTABLISHED`], [`CT_CLOSING`] or [`CT_UDP`]: the flow's, the same in
    /// both of its entries.
    pub state: u8,
    /// The sides that sent a FIN: [`CT_FIN_FORWARD`], [`CT_FIN_REPLY`] (a half-closed
    /// connection stays established: the other side may go on sending).
    pub fins: u8,
    pub _pad: u8,
    /// When this entry last saw a packet: `CLOCK_MONOTONIC` in seconds (`bpf_ktime_get_ns`),
    /// refreshed at most once a second.
    pub seen_s: u32,
}
const _: () = assert!(size_of::<CtValue>() == 20);

impl CtValue {
    #[inline(always)]
    pub const fn new(
        addr_be: u32,
        port_be: u16,
        rev_nat_id: u16,
        backend_id: u32,
        dir: u8,
        state: u8,
        seen_s: u32,
    ) -> Self {
        CtValue {
            addr_be,
            port_be,
            rev_nat_id,
            backend_id,
            dir,
            state,
            fins: 0,
            _pad: 0,
            seen_s,
        }
    }

    /// Whether the entry has outlived its state's lifetime at `now_s` (the datapath's clock,
    /// in seconds). The programs and the agent's collector decide it the same way.
    ///
    /// The age is signed: an entry another CPU refreshed a moment ago may be "seen" a second
    /// after a `now_s` read just before, and is live. (Lifetimes are at most `i32::MAX`.)
    #[inline(always)]
    pub const fn expired(&self, now_s: u32, timeouts: &CtTimeouts) -> bool {
        (now_s.wrapping_sub(self.seen_s) as i32) > timeouts.lifetime(self.state) as i32
    }
}

/// How long an entry lives after its last packet, per state, in seconds. The agent sets them
/// in the programs at load time (the `PROXY_CT_TIMEOUTS` global) and collects by them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtTimeouts {
    pub syn_s: u32,
    pub established_s: u32,
    pub closing_s: u32,
    pub udp_s: u32,
}
const _: () = assert!(size_of::<CtTimeouts>() == 16);

/// The name of the programs' global holding the [`CtTimeouts`].
pub const CT_TIMEOUTS_GLOBAL: &str = "PROXY_CT_TIMEOUTS";

impl CtTimeouts {
    /// The kernel's and Cilium's: a handshake 60 s, an established connection 6 hours
    /// (Cilium's; kube-proxy's `--conntrack-tcp-timeout-established` is 24 hours), a closing
    /// one 10 s, UDP 60 s.
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        syn_s: 60,
        established_s: 6 * 3600,
        closing_s: 10,
        udp_s: 60,
    };

    #[inline(always)]
    pub const fn lifetime(&self, state: u8) -> u32 {
        match state {
            CT_SYN => self.syn_s,
            CT_ESTABLISHED => self.established_s,
            CT_UDP => self.udp_s,
            // Closing, and anything this version does not know: the shortest.
            _ => self.closing_s,
        }
    }
}
