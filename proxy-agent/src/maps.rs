//! The pinned BPF maps, opened from bpffs: the sync's real [`Datapath`], and the reader for
//! `proxy-agent services`. Opening from the pins (not from the loaded object) gives the agent
//! and the inspection command one code path, and works without a running agent.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, Map, MapData, MapError, PerCpuArray},
};
use proxy_common::{
    AFFINITY_MATCH_MAP, AffinityMatchKey, BACKEND_MAP, Backend, COUNTERS_MAP, Counter, MAGLEV_MAP,
    MAPS, MapLayout, REV_NAT_MAP, RevNat, SOCK_REV_NAT_MAP, SVC_MAP, ServiceKey, ServiceValue,
    SockRevNatKey, SockRevNatValue, VIP_MAP,
};

use crate::capacity::{self, Capacity};
use crate::maglev_map::MaglevTables;
use crate::sync::{Datapath, DatapathError, MapState, Partial};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "cannot open pinned map {path}: {source} (is the datapath loaded? run `proxy-agent run` first)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "pinned map {path} has (map type, key size, value size, max_entries) {found:?}, this agent \
         expects {expected:?}; \
         it was made by an incompatible version: run `proxy-agent cleanup` (connections through \
         the old datapath will stop being translated) and start again"
    )]
    Layout {
        path: PathBuf,
        expected: (u32, u32, u32, u32),
        found: (u32, u32, u32, u32),
    },
    #[error(
        "{}: the kernel cannot resize a map; start with the pinned sizes, or run `proxy-agent \
         cleanup` first (connections through the datapath lose their translation until the \
         agent has started again)",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Capacity(Vec<CapacityMismatch>),
    #[error("{op} on map {map}: {source}")]
    Syscall {
        map: &'static str,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// A pinned map whose capacity is not what its flag asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityMismatch {
    pub path: PathBuf,
    pub flag: &'static str,
    pub pinned: u32,
    pub asked: u32,
}

impl std::fmt::Display for CapacityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pinned map {} holds {} entries, and {} asks for {}",
            self.path.display(),
            self.pinned,
            self.flag,
            self.asked
        )
    }
}

/// The maps' layouts with the capacities set at load time: `capacity` (the `--max-*` flags)
/// and `maglev_entries` (the Maglev map's, from its flags).
pub fn layouts(capacity: Capacity, maglev_entries: u32) -> impl Iterator<Item = MapLayout> {
    MAPS.iter().map(move |l| MapLayout {
        max_entries: match l.name {
            MAGLEV_MAP => maglev_entries,
            name => capacity.of(name).unwrap_or(l.max_entries),
        },
        ..*l
    })
}

/// Checks every map already pinned in `dir` against the ABI (aya reuses a pin without
/// checking its sizes). Maps that are not pinned yet are fine: they will be created. The
/// capacities set by flags are whatever the maps were created with (checked at load).
pub fn check_pinned_layouts(dir: &Path) -> Result<(), MapsError> {
    check_layouts(dir, MAPS.iter().copied(), |name| {
        name == MAGLEV_MAP || capacity::flag_of(name).is_some()
    })
}

/// [`check_pinned_layouts`], with the capacities `layouts` gives; `any_size(name)`: accept
/// any capacity of that map. A map whose capacity alone differs, and is set by a flag, is a
/// [`MapsError::Capacity`], which names every such map at once.
pub fn check_layouts(
    dir: &Path,
    layouts: impl Iterator<Item = MapLayout>,
    any_size: impl Fn(&str) -> bool,
) -> Result<(), MapsError> {
    let mut mismatches = Vec::new();
    for layout in layouts {
        let path = dir.join(layout.name);
        if !path.exists() {
            continue;
        }
        let md = MapData::from_pin(&path).map_err(|source| MapsError::Open {
            path: path.clone(),
            source,
        })?;
        let info = md.info().map_err(|source| MapsError::Open {
            path: path.clone(),
            source,
        })?;
        // (An unknown map type never matches.)
        let kind = info.map_type().map_or(u32::MAX, |t| t as u32);
        let found = (kind, info.key_size(), info.value_size(), info.max_entries());
        let max_entries = if any_size(layout.name) {
            info.max_entries()
        } else {
            layout.max_entries
        };
        let expected = (
            layout.kind.bpf_map_type(),
            layout.key_size,
            layout.value_size,
            max_entries,
        );
        if let Some(flag) = capacity::flag_of(layout.name)
            && found != expected
            && (found.0, found.1, found.2) == (expected.0, expected.1, expected.2)
        {
            mismatches.push(CapacityMismatch {
                path,
                flag,
                pinned: found.3,
                asked: expected.3,
            });
            continue;
        }
        if found != expected {
            return Err(MapsError::Layout {
                path,
                expected,
                found,
            });
        }
    }
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(MapsError::Capacity(mismatches))
    }
}

pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u16, RevNat>,
    vips: HashMap<MapData, u32, u32>,
    counters: PerCpuArray<MapData, u64>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u32>,
    /// Mapped at its first use: only the writer needs it, not a metrics scrape.
    maglev: std::cell::OnceCell<MaglevTables>,
    dir: PathBuf,
}

/// Opens the map pinned as `dir/name`, as aya's `wrap` kind, typed as `T`.
pub fn open_pinned<T>(
    dir: &Path,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let md = MapData::from_pin(&path).map_err(|source| MapsError::Open { path, source })?;
    T::try_from(wrap(md)).map_err(|source| MapsError::Read { map: name, source })
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        check_pinned_layouts(dir)?;
        Ok(PinnedMaps {
            services: open_pinned(dir, SVC_MAP, Map::HashMap)?,
            backends: open_pinned(dir, BACKEND_MAP, Map::HashMap)?,
            rev_nat: open_pinned(dir, REV_NAT_MAP, Map::HashMap)?,
            vips: open_pinned(dir, VIP_MAP, Map::HashMap)?,
            counters: open_pinned(dir, COUNTERS_MAP, Map::PerCpuArray)?,
            affinity_match: open_pinned(dir, AFFINITY_MATCH_MAP, Map::HashMap)?,
            maglev: std::cell::OnceCell::new(),
            dir: dir.to_path_buf(),
        })
    }

    fn maglev(&self) -> Result<&MaglevTables, MapsError> {
        if let Some(m) = self.maglev.get() {
            return Ok(m);
        }
        let m = MaglevTables::open(&self.dir)?;
        Ok(self.maglev.get_or_init(|| m))
    }

    /// Everything the writer owns, as it is in the kernel now.
    pub fn dump(&self) -> Result<MapState, MapsError> {
        Ok(MapState {
            services: read_all(&self.services, SVC_MAP)?,
            backends: read_all(&self.backends, BACKEND_MAP)?,
            rev_nat: read_all(&self.rev_nat, REV_NAT_MAP)?,
            vips: read_all(&self.vips, VIP_MAP)?,
            affinity_match: read_all(&self.affinity_match, AFFINITY_MATCH_MAP)?
                .into_keys()
                .collect(),
        })
    }

    /// Datapath counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu =
                    self.counters
                        .get(&(*c as u32), 0)
                        .map_err(|source| MapsError::Read {
                            map: COUNTERS_MAP,
                            source,
                        })?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }
}

fn read_all<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, MapsError> {
    map.iter()
        .map(|kv| kv.map_err(|source| MapsError::Read { map: name, source }))
        .collect()
}

/// The socket reverse-NAT map, to ask whether this datapath translated a socket.
pub fn open_sock_rev_nat(
    dir: &Path,
) -> Result<HashMap<MapData, SockRevNatKey, SockRevNatValue>, MapsError> {
    open_pinned(dir, SOCK_REV_NAT_MAP, Map::LruHashMap)
}

fn map_err(map: &'static str, op: &'static str, e: MapError) -> DatapathError {
    let source = match e {
        MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    };
    DatapathError::Map { map, op, source }
}

/// A delete of an absent key is what we wanted anyway.
fn absent_ok(r: Result<(), MapError>, map: &'static str) -> Result<(), DatapathError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(map, "delete", e)),
    }
}

/// The bpf(2) system call, for the commands aya 0.14 has no wrapper for.
///
/// # Safety
/// `attr` must be valid for `cmd`: every pointer in it to memory of the sizes the kernel will
/// read and write, alive for the call.
pub(crate) unsafe fn bpf(
    cmd: aya_obj::generated::bpf_cmd,
    attr: &mut aya_obj::generated::bpf_attr,
) -> std::io::Result<()> {
    // SAFETY: as the caller promises.
    unsafe { bpf_fd(cmd, attr) }.map(drop)
}

/// [`bpf`] for the commands that return a value (a new descriptor for loads).
///
/// # Safety
/// As for [`bpf`].
pub(crate) unsafe fn bpf_fd(
    cmd: aya_obj::generated::bpf_cmd,
    attr: &mut aya_obj::generated::bpf_attr,
) -> std::io::Result<i32> {
    // SAFETY: as the caller promises.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut aya_obj::generated::bpf_attr,
            std::mem::size_of::<aya_obj::generated::bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}

/// Writes `values[i]` under `keys[i]`, in order, with one `BPF_MAP_UPDATE_BATCH` (kernel
/// 5.6+; aya 0.14 has no wrapper for it). On failure, the kernel reports how many entries it
/// wrote before the one that failed.
pub fn update_batch<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, std::io::Error)> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    // SAFETY: bpf_attr is plain data; all-zero is its "no flags, no options" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.keys = keys.as_ptr() as u64;
    attr.batch.values = values.as_ptr() as u64;
    attr.batch.count = keys.len() as u32;
    attr.batch.map_fd = map.map().fd().as_fd().as_raw_fd() as u32;
    // SAFETY: the kernel reads `count` keys and values from the two live slices (Pod types
    // laid out as the map's key and value) and writes only `attr`.
    let Err(error) = (unsafe { bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }) else {
        return Ok(());
    };
    // SAFETY: the kernel set `count` to the number of entries it wrote.
    let written = unsafe { attr.batch.count } as usize;
    Err((written.min(keys.len()), error))
}

/// A run of updates as one batch; one entry by one where the kernel has no batch updates.
fn update_run<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<(), Partial> {
    let single = |map: &mut HashMap<MapData, K, V>, from: usize| {
        for (i, (k, v)) in keys.iter().zip(values).enumerate().skip(from) {
            map.insert(k, v, 0).map_err(|e| Partial {
                written: i,
                error: map_err(name, "update", e),
            })?;
        }
        Ok(())
    };
    if keys.len() < 2 {
        return single(map, 0);
    }
    match update_batch(map, keys, values) {
        Ok(()) => Ok(()),
        Err((0, e)) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
            // 524 is the kernel's ENOTSUPP: no batch operations on this kernel or map.
            single(map, 0)
        }
        Err((written, source)) => Err(Partial {
            written,
            error: DatapathError::Map {
                map: name,
                op: "batch update",
                source,
            },
        }),
    }
}

impl Datapath for PinnedMaps {
    fn update_backend(&mut self, id: u32, b: Backend) -> Result<(), DatapathError> {
        self.backends
            .insert(id, b, 0)
            .map_err(|e| map_err(BACKEND_MAP, "update", e))
    }
    fn update_backends(&mut self, ids: &[u32], backends: &[Backend]) -> Result<(), Partial> {
        update_run(&mut self.backends, BACKEND_MAP, ids, backends)
    }
    fn update_services(
        &mut self,
        keys: &[ServiceKey],
        values: &[ServiceValue],
    ) -> Result<(), Partial> {
        update_run(&mut self.services, SVC_MAP, keys, values)
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        absent_ok(self.backends.remove(&id), BACKEND_MAP)
    }
    fn update_service(
        &mut self,
        key: ServiceKey,
        value: ServiceValue,
    ) -> Result<(), DatapathError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_err(SVC_MAP, "update", e))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), DatapathError> {
        absent_ok(self.services.remove(&key), SVC_MAP)
    }
    fn update_rev_nat(&mut self, id: u16, value: RevNat) -> Result<(), DatapathError> {
        self.rev_nat
            .insert(id, value, 0)
            .map_err(|e| map_err(REV_NAT_MAP, "update", e))
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<(), DatapathError> {
        absent_ok(self.rev_nat.remove(&id), REV_NAT_MAP)
    }
    fn update_vip(&mut self, vip_be: u32, frontends: u32) -> Result<(), DatapathError> {
        self.vips
            .insert(vip_be, frontends, 0)
            .map_err(|e| map_err(VIP_MAP, "update", e))
    }
    fn delete_vip(&mut self, vip_be: u32) -> Result<(), DatapathError> {
        absent_ok(self.vips.remove(&vip_be), VIP_MAP)
    }
    fn update_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError> {
        self.affinity_match
            .insert(key, 1, 0)
            .map_err(|e| map_err(AFFINITY_MATCH_MAP, "update", e))
    }
    fn delete_affinity_match(&mut self, key: AffinityMatchKey) -> Result<(), DatapathError> {
        absent_ok(self.affinity_match.remove(&key), AFFINITY_MATCH_MAP)
    }
    fn write_maglev_table(&mut self, table: u16, entries: &[u32]) -> Result<usize, DatapathError> {
        self.maglev().map_err(|e| DatapathError::Map {
            map: MAGLEV_MAP,
            op: "mmap",
            source: std::io::Error::other(e.to_string()),
        })?;
        let m = self.maglev.get_mut().expect("mapped above");
        m.write(table, entries)
    }
    fn maglev_table(&self, table: u16, size: u32) -> Vec<u32> {
        match self.maglev() {
            Ok(m) => m.table(table, size as usize).map(<[u32]>::to_vec),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Maglev tables");
                None
            }
        }
        .unwrap_or_default()
    }
}
