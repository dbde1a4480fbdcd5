//! How many entries the maps hold: the `--max-*` flags, with proxy-common's sizes as defaults.
//! A capacity is set when a map is created; a pinned map keeps its own, since the kernel
//! cannot resize a map. An agent whose flags ask for other sizes than the pins have is refused
//! at start (see [`crate::maps::MapsError::Capacity`]), rather than migrating: its flows and
//! affinities would be lost on the way.

use proxy_common::{
    AFFINITY_MAP, AFFINITY_MAP_ENTRIES, AFFINITY_MATCH_MAP, BACKEND_MAP, BACKEND_MAP_ENTRIES,
    CT_MAP, CT_MAP_ENTRIES, REV_NAT_MAP, REV_NAT_MAP_ENTRIES, SVC_MAP, SVC_MAP_ENTRIES,
};

/// Smallest capacity a flag accepts: room for a few frontends and flows.
pub const MIN_ENTRIES: u32 = 16;
/// Largest capacity a flag accepts (the kernel allocates hash maps up front, about 100 bytes
/// an entry, so this is already more than a gigabyte of the node's memory).
pub const MAX_ENTRIES: u32 = 1 << 24;
/// Largest `frontends`: rev-NAT ids are u16, and 0 is never used.
pub const MAX_FRONTENDS: u32 = u16::MAX as u32;

/// The capacities of the maps that are sized by flags; every other map's is fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Entries of the service map: one per frontend (a Service port) plus one per backend
    /// slot (`--max-services`, as Cilium's `--bpf-lb-service-map-max`). The affinity-match
    /// map has as many: an entry per slot at most.
    pub services: u32,
    /// Distinct backends (pod IP, port, protocol) over all frontends (`--max-backends`).
    pub backends: u32,
    /// Frontends: one rev-NAT entry each (`--max-frontends`).
    pub frontends: u32,
    /// Packet-path connection tracking, two entries per flow; least recently used flows are
    /// evicted when it is full (`--max-conntrack`).
    pub conntrack: u32,
    /// ClientIP affinity records, one per client and frontend; least recently used first
    /// evicted (`--max-affinity`).
    pub affinity: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            services: SVC_MAP_ENTRIES,
            backends: BACKEND_MAP_ENTRIES,
            frontends: REV_NAT_MAP_ENTRIES,
            conntrack: CT_MAP_ENTRIES,
            affinity: AFFINITY_MAP_ENTRIES,
        }
    }
}

/// The flag that sizes `map`, if a flag does.
pub fn flag_of(map: &str) -> Option<&'static str> {
    Some(match map {
        SVC_MAP | AFFINITY_MATCH_MAP => "--max-services",
        BACKEND_MAP => "--max-backends",
        REV_NAT_MAP => "--max-frontends",
        CT_MAP => "--max-conntrack",
        AFFINITY_MAP => "--max-affinity",
        _ => return None,
    })
}

impl Capacity {
    /// The capacity this sets for `map`; None for a map of fixed size.
    pub fn of(&self, map: &str) -> Option<u32> {
        Some(match map {
            SVC_MAP | AFFINITY_MATCH_MAP => self.services,
            BACKEND_MAP => self.backends,
            REV_NAT_MAP => self.frontends,
            CT_MAP => self.conntrack,
            AFFINITY_MAP => self.affinity,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::MAPS;

    use super::*;

    /// The defaults are the built object's sizes, and every sized map is one of the ABI's,
    /// named by a flag.
    #[test]
    fn defaults_are_the_abi_sizes_and_every_sized_map_has_a_flag() {
        let c = Capacity::default();
        let sized: Vec<_> = MAPS.iter().filter(|l| c.of(l.name).is_some()).collect();
        assert_eq!(sized.len(), 6);
        for l in sized {
            assert_eq!(c.of(l.name), Some(l.max_entries), "{}", l.name);
            assert!(flag_of(l.name).is_some(), "{}", l.name);
        }
        for l in MAPS.iter().filter(|l| c.of(l.name).is_none()) {
            assert_eq!(flag_of(l.name), None, "{}", l.name);
        }
        assert!(c.frontends <= MAX_FRONTENDS);
        for n in [c.services, c.backends, c.conntrack, c.affinity] {
            assert!((MIN_ENTRIES..=MAX_ENTRIES).contains(&n));
        }
    }
}
