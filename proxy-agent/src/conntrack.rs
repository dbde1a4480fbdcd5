//! The agent's side of the packet path's connection tracking: the datapath's clock, the pass
//! that deletes expired entries (the cleanup thread runs it every `--conntrack-gc-interval`),
//! and the carrying over of entries an earlier layout of the map holds.
//!
//! The programs treat an expired entry as absent, so collecting is only about room: a map full
//! of dead flows evicts live ones (it is an LRU). Expiry is decided by
//! [`CtValue::expired`], the same function the programs use.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{HashMap, IterableMap as _, Map, MapData};
use proxy_common::{
    CT_ESTABLISHED, CT_MAP, CT_STATES, CT_UDP, CtKey, CtTimeouts, CtValue, PROTO_TCP,
};

use crate::maps::{MapsError, bpf, open_pinned};

/// The datapath's clock: `CLOCK_MONOTONIC` in seconds, as the programs read it
/// (`bpf_ktime_get_ns`).
pub fn now_s() -> u32 {
    // SAFETY: timespec is plain data: all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes into the struct we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

pub type Conntrack = HashMap<MapData, CtKey, CtValue>;

pub fn open(bpffs_dir: &Path) -> Result<Conntrack, MapsError> {
    open_pinned(bpffs_dir, CT_MAP, Map::LruHashMap)
}

/// What one collection pass saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Entries seen, in all.
    pub entries: usize,
    /// Entries seen per state, as [`CT_STATES`] lists them (unknown states are not counted).
    pub by_state: [usize; CT_STATES.len()],
    /// Entries deleted as expired.
    pub collected: usize,
}

/// Entries read per syscall.
const CHUNK: usize = 4096;

/// One pass over the map: read in chunks (`BPF_MAP_LOOKUP_BATCH`; entry by entry where the
/// kernel has no batch lookups), each entry expired at `now_s` deleted, and what it saw
/// counted. Bounded: it visits each of the map's buckets once.
///
/// The datapath treats an expired entry as absent and may write a new one under its key
/// while the pass runs: each entry is read again just before it is deleted, and kept if it is
/// live by then. (What is left is a write in the microseconds between that read and the
/// delete, for a flow that was already being treated as new.)
pub fn collect(ct: &mut Conntrack, timeouts: &CtTimeouts, now_s: u32) -> Result<Pass, MapsError> {
    let read = |source| MapsError::Read {
        map: CT_MAP,
        source,
    };
    let mut pass = Pass::default();
    let mut stale = Vec::new();
    let mut see = |k: CtKey, v: CtValue, pass: &mut Pass| {
        pass.entries += 1;
        if let Some(i) = CT_STATES.iter().position(|(s, _)| *s == v.state) {
            pass.by_state[i] += 1;
        }
        if v.expired(now_s.saturating_sub(1), timeouts) {
            stale.push(k);
        }
    };
    match read_batched(ct, |k, v| see(k, v, &mut pass)) {
        Ok(()) => {}
        Err(e) if batch_unsupported(&e) => {
            pass = Pass::default();
            for kv in ct.iter() {
                let (k, v) = kv.map_err(read)?;
                see(k, v, &mut pass);
            }
        }
        Err(source) => {
            return Err(MapsError::Syscall {
                map: CT_MAP,
                op: "batch lookup",
                source,
            });
        }
    }
    for k in &stale {
        let still = ct
            .get(k, 0)
            .is_ok_and(|v| v.expired(now_s.saturating_sub(1), timeouts));
        // Gone already (evicted, or the other direction's delete) is fine.
        if still && ct.remove(k).is_ok() {
            pass.collected += 1;
        }
    }
    Ok(pass)
}

/// How long a carried-over entry lives if no packet comes: the earlier layouts did not expire
/// entries, so one may belong to a flow long gone. Any packet of a live flow refreshes it.
pub const CARRY_OVER_GRACE_TCP_S: u32 = 600;
/// The same for UDP, whose flows send often or are gone.
pub const CARRY_OVER_GRACE_UDP_S: u32 = 10;

/// The conntrack map of the layout without states or times.
pub const CT_V1: &str = "PROXY_CT_V1";

/// Copies the flows `PROXY_CT_V1` holds (an upgrade: the programs being put in place use the
/// current map) into the current map, where it has no entry for them yet, as established (or
/// UDP) with a short lifetime left ([`CARRY_OVER_GRACE_TCP_S`]). Run by
/// [`crate::migrate::carry`] before the new programs are attached, so they find the flows, and
/// again after, for what the old programs wrote meanwhile. Returns how many entries it copied.
pub fn carry_over(bpffs_dir: &Path, timeouts: &CtTimeouts, now_s: u32) -> Result<usize, MapsError> {
    if !bpffs_dir.join(CT_V1).exists() {
        return Ok(0);
    }
    let mut carried = 0;
    let mut current = open(bpffs_dir)?;
    let old: HashMap<MapData, proxy_common::v1::CtKey, proxy_common::v1::CtValue> =
        open_pinned(bpffs_dir, CT_V1, Map::LruHashMap)?;
    for kv in old.iter() {
        let (k, v) = kv.map_err(|source| MapsError::Read { map: CT_V1, source })?;
        let key = CtKey::new(k.saddr_be, k.sport_be, k.daddr_be, k.dport_be, k.proto);
        let (state, grace) = if k.proto == PROTO_TCP {
            (CT_ESTABLISHED, CARRY_OVER_GRACE_TCP_S)
        } else {
            (CT_UDP, CARRY_OVER_GRACE_UDP_S)
        };
        let left = timeouts.lifetime(state).saturating_sub(grace);
        let value = CtValue::new(
            v.addr_be,
            v.port_be,
            v.rev_nat_id,
            v.backend_id,
            // (The same values in both layouts.)
            k.dir,
            state,
            now_s.wrapping_sub(left),
        );
        // BPF_NOEXIST: what the current programs wrote is newer.
        if current.insert(key, value, 1).is_ok() {
            carried += 1;
        }
    }
    Ok(carried)
}

fn batch_unsupported(e: &std::io::Error) -> bool {
    // 524 is the kernel's ENOTSUPP: no batch operations on this kernel or map.
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524))
}

/// Reads every entry with `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+; aya 0.14 has no wrapper for
/// it), [`CHUNK`] at a time.
fn read_batched(ct: &Conntrack, mut f: impl FnMut(CtKey, CtValue)) -> std::io::Result<()> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    let fd = ct.map().fd().as_fd().as_raw_fd() as u32;
    let mut keys = vec![CtKey::default(); CHUNK];
    let mut values = vec![CtValue::default(); CHUNK];
    // The position to go on from: a bucket index for hash maps (room for a key, to be safe).
    let (mut at, mut next) = ([0u8; 16], [0u8; 16]);
    let mut first = true;
    loop {
        // SAFETY: bpf_attr is plain data: all-zero is its "no flags, no options" value.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.in_batch = if first { 0 } else { at.as_ptr() as u64 };
        attr.batch.out_batch = next.as_mut_ptr() as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = CHUNK as u32;
        attr.batch.map_fd = fd;
        // SAFETY: the kernel writes at most `count` keys and values into the two buffers
        // (laid out as the map's key and value), and the position into `next`; all outlive
        // the call.
        let result = unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // SAFETY: the kernel set `count` to the number of entries it copied.
        let n = (unsafe { attr.batch.count } as usize).min(CHUNK);
        // ENOENT: this is the last chunk.
        let last = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        for i in 0..n {
            f(keys[i], values[i]);
        }
        if last {
            return Ok(());
        }
        at = next;
        first = false;
    }
}
