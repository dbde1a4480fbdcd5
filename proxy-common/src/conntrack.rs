//! Packet-path connection tracking: written by the TC program, cleaned by the agent.

use core::mem::size_of;

/// Key of [`crate::CT_MAP`]: the packet's own addresses as seen on the wire.
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

impl CtKey {
    /// The entry of a packet saddr:sport -> daddr:dport in direction `dir`.
    #[inline(always)]
    pub const fn new(
        saddr_be: u32,
        sport_be: u16,
        daddr_be: u32,
        dport_be: u16,
        proto: u8,
        dir: u8,
    ) -> Self {
        CtKey {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            dir,
            _pad: [0; 2],
        }
    }

    /// The same packet's key in the other direction's table (same addresses).
    #[inline(always)]
    pub const fn with_dir(self, dir: u8) -> Self {
        CtKey { dir, ..self }
    }
}

/// Value of [`crate::CT_MAP`]: the address to write. Forward entries hold the backend (and
/// its id, so a flow whose backend is gone is re-balanced); reply entries hold the VIP.
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

impl CtValue {
    #[inline(always)]
    pub const fn new(addr_be: u32, port_be: u16, rev_nat_id: u16, backend_id: u32) -> Self {
        CtValue {
            addr_be,
            port_be,
            rev_nat_id,
            backend_id,
            _pad: 0,
        }
    }
}
