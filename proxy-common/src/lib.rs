//! The map ABI shared by the eBPF programs (`proxy-ebpf`) and the agent (`proxy-agent`).
//!
//! This crate is the only place the layout of the pinned maps is written down. Rules:
//! - every type is `#[repr(C)]` with explicit padding fields and a size assertion;
//! - byte order is in the field name (`*_be` = network byte order);
//! - no `bool`, `Option` or enums in map values (flags are integers);
//! - a layout change bumps the `_V<n>` suffix of the map names, so an agent never reuses a
//!   pinned map of another layout (the agent also checks key/value sizes of existing pins);
//! - the agent migrates from a pin of an older version of one of its maps: it carries the
//!   entries over (old layouts are kept here, as [`v1`]; the converters are in the
//!   agent's `migrate` module) before anything uses the new map, then removes the old pin; a pin of a
//!   newer version is a downgrade, which it refuses.
//!
//! What is here: the maps, one line each ([`map_table!`]); the counters, one line each
//! ([`Counter`]); the key and value types with their constructors. Nothing else.
//!
//! With the `user` feature the types implement `aya::Pod`, and derive `bytemuck::Pod`, which
//! refuses to compile if a type has implicit padding: a second guard on the layout.
#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

mod affinity;
mod bpf_log;
mod conntrack;
mod counters;
mod retired;
mod service;
mod sock;

pub use affinity::*;
pub use bpf_log::*;
pub use conntrack::*;
pub use counters::*;
#[cfg(feature = "abi-next")]
pub use retired::be_v1;
pub use retired::v1;
pub use service::*;
pub use sock::*;

/// Every pinned map, one line each: `NAME_CONST = MAP_NAME: Kind<Key, Value>[capacity];`.
///
/// `MAP_NAME` is the ABI name (the symbol in the object, the pin's file name): at most 15
/// bytes, versioned. `Kind` is the `aya_ebpf::btf_maps` type (arrays are indexed by `u32`).
/// The programs declare their maps from this table (`proxy-ebpf/src/maps.rs`) and this crate
/// derives [`MAPS`] from it, so a new map is one line here.
///
/// Call it with the name of a macro that takes the lines; see `define_maps` below.
#[macro_export]
macro_rules! map_table {
    ($then:ident) => {
        $crate::__with_backend_map_name!($then);
    };
    // The backend map's name, which the `abi-next` rehearsal changes (chosen in this crate).
    (@named $then:ident, $backends:ident) => {
        $then! {
            /// Frontends: key {vip, port, proto, slot}; slot 0 is the master entry, slots
            /// 1..=count hold backend ids (Cilium's `lb4_services_v2` layout).
            SVC_MAP = PROXY_SVC_V1:
                HashMap<$crate::ServiceKey, $crate::ServiceValue>[$crate::SVC_MAP_ENTRIES];
            /// Backends: backend id (never 0) -> {ip, port, proto}.
            BACKEND_MAP = $backends: HashMap<u32, $crate::Backend>[$crate::BACKEND_MAP_ENTRIES];
            /// Reverse NAT: rev-NAT id (never 0) -> {vip, port}.
            REV_NAT_MAP = PROXY_RNAT_V1: HashMap<u16, $crate::RevNat>[$crate::REV_NAT_MAP_ENTRIES];
            /// Socket reverse NAT (LRU): {socket cookie, backend ip, backend port} -> {vip, port}.
            SOCK_REV_NAT_MAP = PROXY_SKNAT_V1:
                LruHashMap<$crate::SockRevNatKey, $crate::SockRevNatValue>[$crate::SOCK_REV_NAT_MAP_ENTRIES];
            /// TCP socket reverse NAT (array): slot [`SockSlot::index`] of the cookie ->
            /// [`SockSlot`]. A TCP socket has one peer, so it needs no hash key; UDP sockets
            /// keep using `PROXY_SKNAT_V1`.
            SOCK_SLOT_MAP = PROXY_SKSLOT_V1: Array<u32, $crate::SockSlot>[$crate::SOCK_SLOT_MAP_ENTRIES];
            /// Per-CPU counters indexed by [`Counter`].
            COUNTERS_MAP = PROXY_CNT_V1: PerCpuArray<u32, u64>[$crate::COUNTERS_MAP_ENTRIES];
            /// ClusterIPs: vip -> number of frontends on it (the packet path drops ICMP to these).
            VIP_MAP = PROXY_VIP_V1: HashMap<u32, u32>[$crate::VIP_MAP_ENTRIES];
            /// Packet-path connection tracking (LRU): a forward and a reply entry per flow, with
            /// its TCP state and when it was last seen.
            CT_MAP = PROXY_CT_V2: LruHashMap<$crate::CtKey, $crate::CtValue>[$crate::CT_MAP_ENTRIES];
            /// ClientIP session affinity (LRU): {frontend, client} -> {backend id, last used}.
            AFFINITY_MAP = PROXY_AFF_V1:
                LruHashMap<$crate::AffinityKey, $crate::AffinityValue>[$crate::AFFINITY_MAP_ENTRIES];
            /// The usable backends of each frontend with affinity: {backend id, rev-NAT id} -> 1.
            AFFINITY_MATCH_MAP = PROXY_AFFM_V1:
                HashMap<$crate::AffinityMatchKey, u32>[$crate::AFFINITY_MATCH_MAP_ENTRIES];
            /// Maglev lookup tables, end to end (see [`maglev_index`]), two entries per array
            /// element ([`MaglevPair`]): entry -> backend id (0: not written, choose at
            /// random). Its size is set at load time ([`maglev_map_entries`] of the agent's
            /// `--maglev-tables` and `--maglev-table-size`); mmapable, so the agent writes a
            /// table as memory rather than an entry per syscall.
            MAGLEV_MAP = PROXY_MAGLEV_V1: MmapArray<u32, $crate::MaglevPair>[$crate::MAGLEV_MAP_ENTRIES];
            /// The programs' log level, one element ([`LogLevel`]; 0, off, until the agent
            /// writes it): read on slow paths only, so changing it needs no reload.
            LOG_LEVEL_MAP = PROXY_LOG_V1: Array<u32, $crate::LogLevel>[1];
        }
    };
}

/// The backend map's ABI name, for [`map_table!`]: `PROXY_BE_V1`, or `PROXY_BE_V2` in the
/// `abi-next` rehearsal (see the feature in Cargo.toml).
#[cfg(not(feature = "abi-next"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_backend_map_name {
    ($then:ident) => {
        $crate::map_table!(@named $then, PROXY_BE_V1);
    };
}
#[cfg(feature = "abi-next")]
#[doc(hidden)]
#[macro_export]
macro_rules! __with_backend_map_name {
    ($then:ident) => {
        $crate::map_table!(@named $then, PROXY_BE_V2);
    };
}

/// The kinds of map in [`map_table!`] (named as `aya_ebpf::btf_maps` names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    HashMap,
    LruHashMap,
    Array,
    /// An array with `BPF_F_MMAPABLE`.
    MmapArray,
    PerCpuArray,
}

impl MapKind {
    /// The kernel's `enum bpf_map_type` value.
    pub const fn bpf_map_type(self) -> u32 {
        match self {
            MapKind::HashMap => 1,
            MapKind::Array | MapKind::MmapArray => 2,
            MapKind::PerCpuArray => 6,
            MapKind::LruHashMap => 9,
        }
    }
}

/// A map's name, kind, key and value sizes and capacity, as the agent expects them; compared
/// with existing pins and with the built object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapLayout {
    /// The layout of a map with these key and value types.
    pub const fn of<K, V>(name: &'static str, kind: MapKind, max_entries: u32) -> Self {
        assert!(name.len() <= 15, "the kernel keeps 15 bytes of a map name");
        MapLayout {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }
}

macro_rules! define_maps {
    ($( $(#[$doc:meta])* $def:ident = $name:ident: $kind:ident<$k:ty, $v:ty>[$n:expr]; )*) => {
        $( $(#[$doc])* pub const $def: &str = stringify!($name); )*
        /// Every map the programs use, for pinning, cleanup and ABI checks.
        pub const MAPS: &[MapLayout] = &[
            $( MapLayout::of::<$k, $v>(stringify!($name), MapKind::$kind, $n) ),*
        ];
    };
}
map_table!(define_maps);

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

/// Capacity of [`AFFINITY_MAP`] (LRU: the least recently used clients are forgotten).
pub const AFFINITY_MAP_ENTRIES: u32 = 131_072;
/// Capacity of [`AFFINITY_MATCH_MAP`]: as many as there can be backend slots.
pub const AFFINITY_MATCH_MAP_ENTRIES: u32 = SVC_MAP_ENTRIES;
/// Default number of Maglev tables (frontends using Maglev) [`MAGLEV_MAP`] has room for.
pub const MAGLEV_DEFAULT_TABLES: u32 = 256;
/// Default Maglev table size (Cilium's; a prime).
pub const MAGLEV_DEFAULT_TABLE_SIZE: u32 = 16_381;
/// Capacity of [`MAGLEV_MAP`] in the built object; the agent sets its own at load time.
pub const MAGLEV_MAP_ENTRIES: u32 =
    maglev_map_entries(MAGLEV_DEFAULT_TABLES, MAGLEV_DEFAULT_TABLE_SIZE);
/// `BPF_F_MMAPABLE`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Largest number of backends one frontend may have (`ServiceValue::count` is a u16).
pub const MAX_BACKENDS_PER_SERVICE: usize = u16::MAX as usize;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

#[cfg(feature = "user")]
mod user {
    use super::*;
    /// `aya::Pod` for ABI types that are `bytemuck::Pod`, which checks at compile time that
    /// they are `#[repr(C)]` plain integers without implicit padding.
    const fn bytemuck_pod<T: bytemuck::Pod>() {}
    macro_rules! pod {
        ($($t:ty),*) => {$(
            const _: () = bytemuck_pod::<$t>();
            // SAFETY: bytemuck::Pod (derived, checked above) is a superset of aya::Pod's needs.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        ServiceKey,
        ServiceValue,
        Backend,
        RevNat,
        SockRevNatKey,
        SockRevNatValue,
        SockSlot,
        CtKey,
        CtValue,
        CtTimeouts,
        AffinityKey,
        AffinityValue,
        AffinityMatchKey,
        MaglevPair,
        LogLevel,
        v1::CtKey,
        v1::CtValue
    );
    #[cfg(feature = "abi-next")]
    pod!(be_v1::Backend);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry is expired only once older than its state's lifetime; one seen "later" than
    /// now (refreshed on another CPU meanwhile) is live; the clock may start near 0 (seen
    /// times then wrap).
    #[test]
    fn conntrack_expiry_by_state() {
        let t = CtTimeouts {
            syn_s: 60,
            established_s: 3600,
            closing_s: 10,
            udp_s: 30,
        };
        let at = |state, seen_s| CtValue::new(0, 0, 0, 0, CT_DIR_FORWARD, state, seen_s);
        let now = 100_000u32;
        for (state, lifetime) in [
            (CT_SYN, 60),
            (CT_ESTABLISHED, 3600),
            (CT_CLOSING, 10),
            (CT_UDP, 30),
            (0, 10),
        ] {
            assert!(!at(state, now - lifetime).expired(now, &t), "{state}");
            assert!(at(state, now - lifetime - 1).expired(now, &t), "{state}");
            assert!(!at(state, now + 1).expired(now, &t), "{state}: seen later");
            assert!(!at(state, now).expired(now, &t), "{state}");
        }
        // Up for 5 s; an entry idle for 20 s has a seen time before 0.
        assert!(at(CT_CLOSING, 5u32.wrapping_sub(20)).expired(5, &t));
        assert!(!at(CT_UDP, 5u32.wrapping_sub(20)).expired(5, &t));
    }

    /// The table's layouts are the types' sizes (the agent compares pins and the built object
    /// with these).
    #[test]
    fn layouts_come_from_the_types() {
        let by_name = |n: &str| MAPS.iter().find(|l| l.name == n).copied().unwrap();
        let svc = by_name(SVC_MAP);
        assert_eq!((svc.key_size, svc.value_size), (12, 16));
        assert_eq!(by_name(CT_MAP).kind, MapKind::LruHashMap);
        assert_eq!(by_name(SOCK_SLOT_MAP).value_size, 24);
        for (i, a) in MAPS.iter().enumerate() {
            assert!(MAPS[i + 1..].iter().all(|b| b.name != a.name), "{}", a.name);
        }
    }
}
