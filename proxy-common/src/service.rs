//! Frontends, backends and reverse NAT: the maps the agent writes and both datapaths read.

use core::mem::size_of;

/// Master entry flag: the Service has endpoints, but none this node may use
/// (internalTrafficPolicy: Local with only remote endpoints). Connects fail with EHOSTUNREACH,
/// never ECONNREFUSED, which would claim the Service has no endpoints at all.
pub const SVC_FLAG_NO_LOCAL_ENDPOINTS: u16 = 1 << 0;

/// Key of [`crate::SVC_MAP`].
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

impl ServiceKey {
    /// The master entry (slot 0) of frontend vip:port/proto.
    #[inline(always)]
    pub const fn master(vip_be: u32, port_be: u16, proto: u8) -> Self {
        ServiceKey {
            vip_be,
            port_be,
            slot: 0,
            proto,
            _pad: [0; 3],
        }
    }

    /// The same frontend's entry in `slot` (1..=count: backend slots).
    #[inline(always)]
    pub const fn with_slot(self, slot: u16) -> Self {
        ServiceKey { slot, ..self }
    }
}

/// Value of [`crate::SVC_MAP`]. In the master (slot 0): `count`, `rev_nat_id`, `flags`,
/// `maglev_table`, `affinity_timeout_s`; in a backend slot: `backend_id` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u16,
    /// The frontend's Maglev table in [`crate::MAGLEV_MAP`], 1-based; 0: random choice.
    /// (Was padding: masters written before Maglev hold 0.)
    pub maglev_table: u16,
    /// ClientIP session affinity timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

impl ServiceValue {
    /// A backend slot's value.
    pub const fn slot(backend_id: u32) -> Self {
        ServiceValue {
            backend_id,
            count: 0,
            rev_nat_id: 0,
            flags: 0,
            maglev_table: 0,
            affinity_timeout_s: 0,
        }
    }

    /// A master entry's value (random choice, no affinity: see [`Self::with_choice`]).
    pub const fn master(count: u16, rev_nat_id: u16, flags: u16) -> Self {
        ServiceValue {
            backend_id: 0,
            count,
            rev_nat_id,
            flags,
            maglev_table: 0,
            affinity_timeout_s: 0,
        }
    }

    /// This master with its Maglev table (0: none) and affinity timeout (0: none).
    pub const fn with_choice(self, maglev_table: u16, affinity_timeout_s: u32) -> Self {
        ServiceValue {
            maglev_table,
            affinity_timeout_s,
            ..self
        }
    }
}

/// Value of [`crate::BACKEND_MAP`] (key: backend id, u32, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    /// The `abi-next` rehearsal's layout change: a reserved word (zero).
    #[cfg(feature = "abi-next")]
    pub _next: u32,
}
#[cfg(not(feature = "abi-next"))]
const _: () = assert!(size_of::<Backend>() == 8);
#[cfg(feature = "abi-next")]
const _: () = assert!(size_of::<Backend>() == 12);

impl Backend {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Backend {
            addr_be,
            port_be,
            proto,
            _pad: 0,
            #[cfg(feature = "abi-next")]
            _next: 0,
        }
    }
}

/// Value of [`crate::REV_NAT_MAP`] (key: rev-NAT id, u16, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RevNat {
    pub vip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<RevNat>() == 8);

impl RevNat {
    pub const fn new(vip_be: u32, port_be: u16) -> Self {
        RevNat {
            vip_be,
            port_be,
            _pad: 0,
        }
    }
}
