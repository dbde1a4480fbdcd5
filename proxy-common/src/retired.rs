//! Layouts of retired maps ([`crate::RETIRED_MAPS`]), kept so that an upgrade can carry their
//! entries over into the maps that replace them.

/// `PROXY_CT_V1`, replaced by `PROXY_CT_V2` (entries gained a direction, a TCP state and a
/// last-seen time; the direction left the key).
pub mod v1 {
    use core::mem::size_of;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    #[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
    pub struct CtKey {
        pub saddr_be: u32,
        pub daddr_be: u32,
        pub sport_be: u16,
        pub dport_be: u16,
        pub proto: u8,
        /// 0: the client's packets; 1: the backend's replies.
        pub dir: u8,
        pub _pad: [u8; 2],
    }
    const _: () = assert!(size_of::<CtKey>() == 16);

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
}
