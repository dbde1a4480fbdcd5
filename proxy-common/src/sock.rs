//! What the socket programs remember of each translated socket, for the reverse hooks.

use core::mem::size_of;

use crate::SOCK_SLOT_MAP_ENTRIES;

/// Key of [`crate::SOCK_REV_NAT_MAP`].
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

impl SockRevNatKey {
    /// The socket with this cookie, talking to backend addr:port.
    #[inline(always)]
    pub const fn new(cookie: u64, addr_be: u32, port_be: u16) -> Self {
        SockRevNatKey {
            cookie,
            addr_be,
            port_be,
            _pad: 0,
        }
    }
}

/// Value of [`crate::SOCK_REV_NAT_MAP`]. `rev_nat_id` lets the reverse path check that the
/// frontend still exists before it rewrites an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockRevNatValue {
    pub vip_be: u32,
    pub port_be: u16,
    pub rev_nat_id: u16,
}
const _: () = assert!(size_of::<SockRevNatValue>() == 8);

/// Value of [`crate::SOCK_SLOT_MAP`]: a connected TCP socket (by cookie), the backend it was
/// given, and the frontend it reports instead.
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

    /// The socket `key` names reports `rev` as its peer.
    #[inline(always)]
    pub const fn new(key: SockRevNatKey, rev: SockRevNatValue) -> Self {
        SockSlot {
            cookie: key.cookie,
            addr_be: key.addr_be,
            port_be: key.port_be,
            _pad: 0,
            rev,
        }
    }

    /// Whether this slot holds the socket `key` names (a slot is shared by cookies
    /// [`SOCK_SLOT_MAP_ENTRIES`] apart).
    #[inline(always)]
    pub const fn holds(&self, key: &SockRevNatKey) -> bool {
        self.cookie == key.cookie && self.addr_be == key.addr_be && self.port_be == key.port_be
    }
}

/// How the socket programs refuse a connect or send to a Service with no usable endpoint:
/// the `PROXY_REJECT_MODE` global, set by the agent from what the kernel offers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectMode {
    /// The syscall fails with ECONNREFUSED (no endpoints) or EHOSTUNREACH (no local
    /// endpoints), through `bpf_set_retval` (Linux 5.18+).
    Errno = 0,
    /// No `bpf_set_retval`, the packet path attached: a Service with no endpoints is left
    /// untranslated, and the TC program answers it with ICMP port unreachable (ECONNREFUSED,
    /// as kube-proxy's REJECT); no local endpoints fails with EPERM.
    PacketPath = 1,
    /// No `bpf_set_retval`, no packet path: the syscall fails with EPERM, the kernel's errno
    /// for a sock_addr program's refusal.
    Eperm = 2,
}

/// The name of the programs' global holding the [`RejectMode`] (a `u32`).
pub const REJECT_MODE_GLOBAL: &str = "PROXY_REJECT_MODE";
