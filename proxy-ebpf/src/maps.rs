//! The pinned maps, declared from proxy-common's table (their names are the ABI names, and
//! the agent's ABI test compares the built object with the table), and the counters.

use aya_ebpf::btf_maps::{Array, HashMap, LruHashMap, PerCpuArray};
use proxy_common::Counter;

/// The aya type of a map of the table: arrays have no key type (they are indexed by u32).
macro_rules! map_type {
    (HashMap, $k:ty, $v:ty, $n:expr) => { HashMap<$k, $v, { $n as usize }> };
    (LruHashMap, $k:ty, $v:ty, $n:expr) => { LruHashMap<$k, $v, { $n as usize }> };
    (Array, $k:ty, $v:ty, $n:expr) => { Array<$v, { $n as usize }> };
    (MmapArray, $k:ty, $v:ty, $n:expr) => {
        Array<$v, { $n as usize }, { proxy_common::BPF_F_MMAPABLE as usize }>
    };
    (PerCpuArray, $k:ty, $v:ty, $n:expr) => { PerCpuArray<$v, { $n as usize }> };
}

macro_rules! declare_maps {
    ($( $(#[$doc:meta])* $def:ident = $name:ident: $kind:ident<$k:ty, $v:ty>[$n:expr]; )*) => {
        $(
            $(#[$doc])*
            #[aya_ebpf::macros::btf_map]
            pub static $name: map_type!($kind, $k, $v, $n) = <map_type!($kind, $k, $v, $n)>::new();
        )*
    };
}
proxy_common::map_table!(declare_maps);

/// The backend map under its name in this build (the `abi-next` rehearsal renames it).
#[cfg(not(feature = "abi-next"))]
pub use self::PROXY_BE_V1 as BACKENDS;
#[cfg(feature = "abi-next")]
pub use self::PROXY_BE_V2 as BACKENDS;

#[inline(always)]
pub fn count(reason: Counter) {
    if let Some(slot) = PROXY_CNT_V1.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot is only touched by programs running on this CPU.
        unsafe { *slot += 1 };
    }
}
