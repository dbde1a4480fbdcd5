//! The map ABI shared by the eBPF programs (`proxy-ebpf`) and the agent (`proxy-agent`).
//!
//! This crate is the only place the layout of the pinned maps is written down. Rules:
//! - every type is `#[repr(C)]` with explicit padding fields and a size assertion;
//! - byte order is in the field name (`*_be` = network byte order);
//! - no `bool`, `Option` or enums in map values (flags are integers);
//! - a layout change bumps the `_V<n>` suffix of the map names, so an agent never reuses a
//!   pinned map of another layout (the agent also checks key/value sizes of existing pins).
//!
//! With the `user` feature the types implement `aya::Pod`, and derive `bytemuck::Pod`, which
//! refuses to compile if a type has implicit padding: a second guard on the layout.
#![no_std]

use core::mem::size_of;

/// Frontends: key {vip, port, proto, slot}; slot 0 is the master entry, slots 1..=count hold
/// backend ids (Cilium's `lb4_services_v2` layout).
pub const SVC_MAP: &str = "PROXY_SVC_V1";
/// Backends: backend id -> {ip, port, proto}.
pub const BACKEND_MAP: &str = "PROXY_BE_V1";
/// Reverse NAT: rev-NAT id -> {vip, port}.
pub const REV_NAT_MAP: &str = "PROXY_RNAT_V1";
/// Socket reverse NAT (LRU): {socket cookie, backend ip, backend port} -> {vip, port}.
pub const SOCK_REV_NAT_MAP: &str = "PROXY_SKNAT_V1";
/// TCP socket reverse NAT (array): slot `cookie % SOCK_SLOT_MAP_ENTRIES` -> [`SockSlot`]
/// {cookie, backend ip, backend port, vip, port}. A TCP socket has one peer, so it needs no
/// hash key; UDP sockets keep using [`SOCK_REV_NAT_MAP`].
pub const SOCK_SLOT_MAP: &str = "PROXY_SKSLOT_V1";
/// Per-CPU counters indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "PROXY_CNT_V1";

/// ClusterIPs: vip -> number of frontends on it (the packet path drops ICMP to these).
pub const VIP_MAP: &str = "PROXY_VIP_V1";
/// Packet-path connection tracking (LRU): a forward and a reply entry per flow.
pub const CT_MAP: &str = "PROXY_CT_V1";

/// Every map the programs use, for pinning and ABI checks.
pub const MAP_NAMES: [&str; 8] = [
    SVC_MAP,
    BACKEND_MAP,
    REV_NAT_MAP,
    SOCK_REV_NAT_MAP,
    SOCK_SLOT_MAP,
    COUNTERS_MAP,
    VIP_MAP,
    CT_MAP,
];

/// Capacity of [`SVC_MAP`]: masters plus backend slots of all frontends.
pub const SVC_MAP_ENTRIES: u32 = 262_144;
/// Capacity of [`BACKEND_MAP`].
pub const BACKEND_MAP_ENTRIES: u32 = 131_072;
/// Capacity of [`REV_NAT_MAP`]; rev-NAT ids are u16 and 0 is never used.
pub const REV_NAT_MAP_ENTRIES: u32 = 65_535;
/// Capacity of [`SOCK_REV_NAT_MAP`] (LRU: old sockets' entries are evicted).
pub const SOCK_REV_NAT_MAP_ENTRIES: u32 = 262_144;
/// Capacity of [`SOCK_SLOT_MAP`] (a power of two: the slot is a mask of the cookie).
pub const SOCK_SLOT_MAP_ENTRIES: u32 = 262_144;
const _: () = assert!(SOCK_SLOT_MAP_ENTRIES.is_power_of_two());
/// Capacity of [`COUNTERS_MAP`]: room for future reasons without an ABI bump.
pub const COUNTERS_MAP_ENTRIES: u32 = 32;
/// Capacity of [`VIP_MAP`].
pub const VIP_MAP_ENTRIES: u32 = 65_536;
/// Capacity of [`CT_MAP`] (LRU: when full, the least recently used flows are evicted).
pub const CT_MAP_ENTRIES: u32 = 262_144;

/// Largest number of backends one frontend may have (`ServiceValue::count` is a u16).
pub const MAX_BACKENDS_PER_SERVICE: usize = u16::MAX as usize;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Master entry flag: the Service has endpoints, but none this node may use
/// (internalTrafficPolicy: Local with only remote endpoints). Connects fail with EHOSTUNREACH,
/// never ECONNREFUSED, which would claim the Service has no endpoints at all.
pub const SVC_FLAG_NO_LOCAL_ENDPOINTS: u16 = 1 << 0;

/// Key of [`SVC_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    /// 0: master entry; 1..=count: backend slots.
    pub slot: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<ServiceKey>() == 12);

/// Value of [`SVC_MAP`]. In the master (slot 0): `count`, `rev_nat_id`, `flags`,
/// `affinity_timeout_s`; in a backend slot: `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub _pad: u16,
    /// ClientIP session affinity timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

/// Value of [`BACKEND_MAP`] (key: backend id, u32, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Backend>() == 8);

/// Value of [`REV_NAT_MAP`] (key: rev-NAT id, u16, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RevNat {
    pub vip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<RevNat>() == 8);

/// Key of [`SOCK_REV_NAT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockRevNatKey>() == 16);

/// Value of [`SOCK_REV_NAT_MAP`]. `rev_nat_id` lets the reverse path check that the frontend
/// still exists before it rewrites an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevNatValue {
    pub vip_be: u32,
    pub port_be: u16,
    pub rev_nat_id: u16,
}
const _: () = assert!(size_of::<SockRevNatValue>() == 8);

/// Value of [`SOCK_SLOT_MAP`]: a connected TCP socket (by cookie), the backend it was given,
/// and the frontend it reports instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockSlot {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub rev: SockRevNatValue,
}
const _: () = assert!(size_of::<SockSlot>() == 24);

impl SockSlot {
    /// The slot of the socket with this cookie (the programs write it there, readers look).
    #[inline(always)]
    pub const fn index(cookie: u64) -> u32 {
        (cookie % SOCK_SLOT_MAP_ENTRIES as u64) as u32
    }
}

/// Key of [`CT_MAP`]: the packet's own addresses as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] (client -> VIP) or [`CT_DIR_REPLY`] (backend -> client).
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 16);

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Value of [`CT_MAP`]: the address to write. Forward entries hold the backend (and its id,
/// so a flow whose backend is gone is re-balanced); reply entries hold the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CtValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub rev_nat_id: u16,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CtValue>() == 16);

/// Index into [`COUNTERS_MAP`]: why a program did what it did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4 rewrote a ClusterIP:port to a backend.
    ConnectTranslated = 0,
    /// sendmsg4 rewrote a ClusterIP:port to a backend.
    SendmsgTranslated = 1,
    /// recvmsg4 rewrote a backend source back to the ClusterIP:port.
    RecvmsgReversed = 2,
    /// getpeername4 reported the ClusterIP:port instead of the backend.
    GetpeernameReversed = 3,
    /// The Service has no usable endpoint: rejected with ECONNREFUSED.
    NoEndpointsRejected = 4,
    /// iTP=Local and no local endpoint: rejected with EHOSTUNREACH.
    NoLocalEndpointsRejected = 5,
    /// A slot or backend the master promised was missing (a writer bug or a racing
    /// update): the connect proceeded untranslated.
    BackendMissing = 6,
    /// The socket reverse-NAT entry could not be written.
    SockRevNatUpdateFailed = 7,
    /// The packet path rewrote a packet to a VIP to its backend.
    TcTranslated = 8,
    /// The packet path rewrote a backend's reply back to the VIP.
    TcReversed = 9,
    /// The packet path answered a packet to a Service with no usable endpoint with ICMP port
    /// unreachable (kube-proxy's REJECT).
    TcNoEndpointsRejected = 10,
    /// ICMP to a ClusterIP, dropped (a ClusterIP is not a host).
    IcmpToVipDropped = 11,
    /// An IP fragment passed on untranslated (only whole packets are translated).
    FragmentPassed = 12,
    /// A conntrack entry could not be written (the flow was still translated).
    CtUpdateFailed = 13,
    /// iTP=Local with no local endpoint: dropped on the packet path (as kube-proxy does).
    TcNoLocalEndpointsDropped = 14,
}

impl Counter {
    pub const ALL: [Counter; 15] = [
        Counter::ConnectTranslated,
        Counter::SendmsgTranslated,
        Counter::RecvmsgReversed,
        Counter::GetpeernameReversed,
        Counter::NoEndpointsRejected,
        Counter::NoLocalEndpointsRejected,
        Counter::BackendMissing,
        Counter::SockRevNatUpdateFailed,
        Counter::TcTranslated,
        Counter::TcReversed,
        Counter::TcNoEndpointsRejected,
        Counter::IcmpToVipDropped,
        Counter::FragmentPassed,
        Counter::CtUpdateFailed,
        Counter::TcNoLocalEndpointsDropped,
    ];

    /// Stable snake_case name, for tables, JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectTranslated => "connect_translated",
            Counter::SendmsgTranslated => "sendmsg_translated",
            Counter::RecvmsgReversed => "recvmsg_reversed",
            Counter::GetpeernameReversed => "getpeername_reversed",
            Counter::NoEndpointsRejected => "no_endpoints_rejected",
            Counter::NoLocalEndpointsRejected => "no_local_endpoints_rejected",
            Counter::BackendMissing => "backend_missing",
            Counter::SockRevNatUpdateFailed => "sock_rev_nat_update_failed",
            Counter::TcTranslated => "tc_translated",
            Counter::TcReversed => "tc_reversed",
            Counter::TcNoEndpointsRejected => "tc_no_endpoints_rejected",
            Counter::IcmpToVipDropped => "icmp_to_vip_dropped",
            Counter::FragmentPassed => "fragment_passed",
            Counter::CtUpdateFailed => "ct_update_failed",
            Counter::TcNoLocalEndpointsDropped => "tc_no_local_endpoints_dropped",
        }
    }
}
const _: () = assert!(Counter::ALL.len() <= COUNTERS_MAP_ENTRIES as usize);

/// Key and value sizes of every map, as the agent expects them; compared with existing pins
/// and with the built object.
pub const MAP_LAYOUTS: [MapLayout; 8] = [
    MapLayout {
        name: SVC_MAP,
        key_size: 12,
        value_size: 16,
        max_entries: SVC_MAP_ENTRIES,
    },
    MapLayout {
        name: BACKEND_MAP,
        key_size: 4,
        value_size: 8,
        max_entries: BACKEND_MAP_ENTRIES,
    },
    MapLayout {
        name: REV_NAT_MAP,
        key_size: 2,
        value_size: 8,
        max_entries: REV_NAT_MAP_ENTRIES,
    },
    MapLayout {
        name: SOCK_REV_NAT_MAP,
        key_size: 16,
        value_size: 8,
        max_entries: SOCK_REV_NAT_MAP_ENTRIES,
    },
    MapLayout {
        name: SOCK_SLOT_MAP,
        key_size: 4,
        value_size: 24,
        max_entries: SOCK_SLOT_MAP_ENTRIES,
    },
    MapLayout {
        name: COUNTERS_MAP,
        key_size: 4,
        value_size: 8,
        max_entries: COUNTERS_MAP_ENTRIES,
    },
    MapLayout {
        name: VIP_MAP,
        key_size: 4,
        value_size: 4,
        max_entries: VIP_MAP_ENTRIES,
    },
    MapLayout {
        name: CT_MAP,
        key_size: 16,
        value_size: 16,
        max_entries: CT_MAP_ENTRIES,
    },
];
const _: () = {
    assert!(MAP_LAYOUTS[0].key_size as usize == size_of::<ServiceKey>());
    assert!(MAP_LAYOUTS[0].value_size as usize == size_of::<ServiceValue>());
    assert!(MAP_LAYOUTS[1].value_size as usize == size_of::<Backend>());
    assert!(MAP_LAYOUTS[2].key_size as usize == size_of::<u16>());
    assert!(MAP_LAYOUTS[2].value_size as usize == size_of::<RevNat>());
    assert!(MAP_LAYOUTS[3].key_size as usize == size_of::<SockRevNatKey>());
    assert!(MAP_LAYOUTS[3].value_size as usize == size_of::<SockRevNatValue>());
    assert!(MAP_LAYOUTS[4].value_size as usize == size_of::<SockSlot>());
    assert!(MAP_LAYOUTS[7].key_size as usize == size_of::<CtKey>());
    assert!(MAP_LAYOUTS[7].value_size as usize == size_of::<CtValue>());
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain integers with explicit padding (bytemuck::Pod
    // derives above check that at compile time).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for SockSlot {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
}
