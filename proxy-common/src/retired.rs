//! Layouts of retired maps (older versions of a map's name), kept so that an upgrade can carry
//! their entries over into the maps that replace them.

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

/// `PROXY_BE_V1` in the `abi-next` rehearsal, where `PROXY_BE_V2` replaces it (this version's
/// real layout: [`crate::Backend`] without the rehearsal's reserved word).
#[cfg(feature = "abi-next")]
pub mod be_v1 {
    use core::mem::size_of;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    #[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
    pub struct Backend {
        pub addr_be: u32,
        pub port_be: u16,
        pub proto: u8,
        pub _pad: u8,
    }
    const _: () = assert!(size_of::<Backend>() == 8);
}
