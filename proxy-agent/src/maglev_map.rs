//! The Maglev map (`PROXY_MAGLEV_V1`), mapped into the agent's memory (`BPF_F_MMAPABLE`): a
//! table is written as memory, not an entry per syscall (16381 syscalls a table would cost as
//! much as a thousand Services' other writes).
//!
//! Layout (u32s, as the mapping sees the map's `MaglevPair` elements): `[size, MAGIC]`, then
//! every table end to end. The header says which table size the entries were written for: an
//! agent started with another `--maglev-table-size` clears the entries before its programs
//! (which index by the new size) are attached, so nothing reads a table at the wrong offsets;
//! a cleared entry means "choose at random" until the first sync rewrites the tables.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    ptr::NonNull,
};

use aya::maps::MapData;
use proxy_common::{MAGLEV_HEADER_MAGIC, MAGLEV_MAP};

use crate::{maps::MapsError, sync::DatapathError};

/// u32s before the first table: the header element.
const HEADER: usize = 2;

pub struct MaglevTables {
    ptr: NonNull<u32>,
    /// u32s in the mapping (header included).
    len: usize,
    /// Keeps the map open while it is mapped.
    _fd: OwnedFd,
}

// SAFETY: the mapping is owned by this value; only `&mut self` writes through it.
unsafe impl Send for MaglevTables {}

impl MaglevTables {
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let path = dir.join(MAGLEV_MAP);
        let open = |source| MapsError::Open {
            path: path.clone(),
            source,
        };
        let md = MapData::from_pin(&path).map_err(open)?;
        let info = md.info().map_err(open)?;
        // Two u32s per element (`MaglevPair`, 8 bytes, as the kernel spaces array values).
        let len = info.max_entries() as usize * 2;
        let syscall = |op, source| MapsError::Syscall {
            map: MAGLEV_MAP,
            op,
            source,
        };
        let fd = (md.fd().as_fd().try_clone_to_owned()).map_err(|e| syscall("dup", e))?;
        // SAFETY: a shared mapping of the map's value area (`len` u32s; the kernel rounds it up
        // to pages), valid while `fd` is open.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 4,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(syscall("mmap", std::io::Error::last_os_error()));
        }
        Ok(MaglevTables {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a pointer"),
            len,
            _fd: fd,
        })
    }

    fn range(&self, table: u16, size: usize) -> Option<std::ops::Range<usize>> {
        let start = HEADER + usize::from(table).checked_sub(1)? * size;
        (start + size <= self.len).then_some(start..start + size)
    }

    /// Table `table` (1-based) of `size` entries, as the programs read it.
    pub fn table(&self, table: u16, size: usize) -> Option<&[u32]> {
        let r = self.range(table, size)?;
        // SAFETY: within the mapping; u32s, aligned (page-aligned base).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(r.start), size) })
    }

    /// Makes table `table` equal to `entries` (one per entry), writing only those that differ;
    /// returns how many did.
    pub fn write(&mut self, table: u16, entries: &[u32]) -> Result<usize, DatapathError> {
        let r = (self.range(table, entries.len())).ok_or_else(|| DatapathError::Full {
            map: MAGLEV_MAP,
            capacity: self.len as u32,
            what: format!("table {table} of {} entries does not fit", entries.len()),
        })?;
        let changed = self.store(r.start, entries);
        // The table is complete before the master that names it is written.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(changed)
    }

    /// Stores `values` from u32 `at` on, each whole (volatile: the programs read entries
    /// concurrently; every store happens, none is torn or merged).
    fn store(&mut self, at: usize, values: &[u32]) -> usize {
        assert!(at + values.len() <= self.len);
        let mut changed = 0;
        for (i, want) in values.iter().enumerate() {
            // SAFETY: within the mapping (asserted), and `&mut self` is its only writer.
            unsafe {
                let e = self.ptr.as_ptr().add(at + i);
                if e.read_volatile() != *want {
                    e.write_volatile(*want);
                    changed += 1;
                }
            }
        }
        changed
    }

    /// Ready for tables of `size` entries: if the entries were written for another size, they
    /// are cleared first (an entry of 0 means "choose at random"). Returns whether they were.
    pub fn prepare(&mut self, size: u32) -> bool {
        let header = [size, MAGLEV_HEADER_MAGIC];
        // SAFETY: the header lies within the mapping (the map has at least its element).
        let found = unsafe {
            [
                self.ptr.as_ptr().read_volatile(),
                self.ptr.as_ptr().add(1).read_volatile(),
            ]
        };
        if found == header {
            return false;
        }
        let cleared = found != [0, 0];
        if cleared {
            let zeros = vec![0u32; self.len - HEADER];
            self.store(HEADER, &zeros);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.store(0, &header);
        cleared
    }
}

impl Drop for MaglevTables {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 4) };
    }
}

/// Removes the Maglev map's pin when its capacity is not `entries` (other `--maglev-tables`
/// or `--maglev-table-size`), so the load creates one of the right size: the tables are
/// derived state, rewritten by the first sync, and the programs attached meanwhile choose at
/// random from the new map's zeros; the old programs keep theirs until they are replaced.
/// Returns whether it did.
pub fn retire_if_resized(dir: &Path, entries: u32) -> Result<bool, MapsError> {
    let path = dir.join(MAGLEV_MAP);
    if !path.exists() {
        return Ok(false);
    }
    let open = |source| MapsError::Open {
        path: path.clone(),
        source,
    };
    let info = MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map_err(open)?;
    if info.max_entries() == entries {
        return Ok(false);
    }
    std::fs::remove_file(&path).map_err(|source| MapsError::Unpin {
        path: path.clone(),
        source,
    })?;
    Ok(true)
}
