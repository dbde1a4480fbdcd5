//! Backend choice beyond random: ClientIP session affinity and Maglev lookup tables, read by
//! the one selection core both datapaths share.

use core::mem::size_of;

/// [`AffinityKey::kind`]: the client is a network namespace (socket path: a pod, by its
/// `bpf_get_netns_cookie`, as Cilium's socket LB does).
pub const AFFINITY_CLIENT_NETNS: u8 = 1;
/// [`AffinityKey::kind`]: the client is a source IPv4 address (packet path).
pub const AFFINITY_CLIENT_IP: u8 = 2;

/// Key of [`crate::AFFINITY_MAP`]: {frontend (rev-NAT id), client}.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    /// A netns cookie, or an IPv4 address (network order) in the low 32 bits.
    pub client: u64,
    pub rev_nat_id: u16,
    /// [`AFFINITY_CLIENT_NETNS`] or [`AFFINITY_CLIENT_IP`]: the two never collide.
    pub kind: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

impl AffinityKey {
    #[inline(always)]
    pub const fn new(kind: u8, client: u64, rev_nat_id: u16) -> Self {
        AffinityKey {
            client,
            rev_nat_id,
            kind,
            _pad: [0; 5],
        }
    }
}

/// Value of [`crate::AFFINITY_MAP`]: the backend a client was sent to, and when it last
/// opened a connection (the datapath's clock, `CLOCK_MONOTONIC` seconds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityValue {
    pub backend_id: u32,
    pub last_used_s: u32,
}
const _: () = assert!(size_of::<AffinityValue>() == 8);

impl AffinityValue {
    /// Whether the entry is older than `timeout_s` at `now_s`. One used "later" than now (on
    /// another CPU meanwhile) is live; the clock may start near 0, so times wrap.
    #[inline(always)]
    pub const fn expired(&self, now_s: u32, timeout_s: u32) -> bool {
        let age = now_s.wrapping_sub(self.last_used_s) as i32;
        age > 0 && age as u32 > timeout_s
    }
}

/// Key of [`crate::AFFINITY_MATCH_MAP`]: backend `backend_id` is a usable backend of the
/// frontend `rev_nat_id` right now (Cilium's `lb_affinity_match`). A remembered backend is
/// reused only while its entry exists, so a backend that went away, became unready or is not
/// allowed by iTP=Local is chosen again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityMatchKey {
    /// First, so the keys of one frontend sort together (the agent reads them as a range).
    pub rev_nat_id: u16,
    pub _pad: u16,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<AffinityMatchKey>() == 8);

impl AffinityMatchKey {
    #[inline(always)]
    pub const fn new(backend_id: u32, rev_nat_id: u16) -> Self {
        AffinityMatchKey {
            rev_nat_id,
            _pad: 0,
            backend_id,
        }
    }
}

/// Name of the load-time constant holding the Maglev table size (a prime; 0: no tables).
pub const MAGLEV_SIZE_GLOBAL: &str = "PROXY_MAGLEV_SIZE";
/// Name of the load-time constant saying whether `bpf_get_netns_cookie` may be called from
/// the socket hooks (1) or not (0: socket-path affinity is off).
pub const NETNS_COOKIE_GLOBAL: &str = "PROXY_NETNS_COOKIE";

/// Value of [`crate::MAGLEV_MAP`]: two consecutive table entries. The kernel lays array
/// values out 8 bytes apart, so a lone u32 per element would waste half the map; in pairs the
/// map's memory (which the agent maps) is exactly the tables' entries end to end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MaglevPair {
    pub backend_id: [u32; 2],
}
const _: () = assert!(size_of::<MaglevPair>() == 8);

/// Elements of [`crate::MAGLEV_MAP`] for `tables` tables of `size` entries: a header element
/// (`[size, MAGLEV_HEADER_MAGIC]`: the size its entries were written for), then the tables.
pub const fn maglev_map_entries(tables: u32, size: u32) -> u32 {
    1 + (tables * size).div_ceil(2)
}

/// The second word of [`crate::MAGLEV_MAP`]'s header element.
pub const MAGLEV_HEADER_MAGIC: u32 = 0x4d47_4c56;

/// The element of [`crate::MAGLEV_MAP`] that holds entry `index` (see [`maglev_index`]), and
/// which of its two.
#[inline(always)]
pub const fn maglev_element(index: u32) -> (u32, usize) {
    (index / 2 + 1, (index & 1) as usize)
}

/// Entry `hash % size` of table `table` (1-based, as [`crate::ServiceValue::maglev_table`]
/// holds it), counted over all tables end to end (Katran's `ch_rings`): a change writes
/// entries, never a map-in-map slot. Its element: [`maglev_element`].
#[inline(always)]
pub const fn maglev_index(table: u16, size: u32, hash: u32) -> u32 {
    (table as u32 - 1) * size + hash % size
}

/// murmur3's 32-bit finalizer: every input bit reaches every output bit.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Maglev's hash of a packet's 5-tuple (packet path): the same 5-tuple always picks the
/// same entry of its frontend's table.
#[inline(always)]
pub const fn tuple_hash(saddr: u32, sport: u16, daddr: u32, dport: u16, proto: u8) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    fmix32(saddr ^ fmix32(daddr ^ fmix32(ports ^ ((proto as u32) << 24) ^ 0x5bd1_e995)))
}

/// Maglev's hash of a socket (socket path): its cookie, so one socket (an unconnected UDP
/// socket's every sendmsg) keeps its backend while unrelated backends change.
#[inline(always)]
pub const fn cookie_hash(cookie: u64) -> u32 {
    fmix32(cookie as u32 ^ fmix32((cookie >> 32) as u32 ^ 0x5bd1_e995))
}
