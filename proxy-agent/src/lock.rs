//! One agent per bpffs directory. `run` holds an exclusive `flock` on the directory itself
//! for as long as it runs (bpffs holds pinned objects only, no lock file); a second `run`
//! on the same directory is refused before it touches a pin or a link, naming the agent
//! that holds it (found in `/proc/locks`). The kernel drops the lock when the holder exits,
//! however it exits.

use std::{
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another agent ({holder}) is running on {dir}: one agent per bpffs directory (stop it, or give this one another --bpffs-dir)"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("locking {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

/// Takes the lock on `dir` (which must exist), or says who holds it.
pub fn lock(dir: &Path) -> Result<DirLock, LockError> {
    let io_err = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let f = File::open(dir).map_err(io_err)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(DirLock { _dir: f });
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(io_err(e));
    }
    let holder = (f.metadata().ok())
        .and_then(|m| holder(&fs::read_to_string("/proc/locks").ok()?, m.dev(), m.ino()))
        .map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"));
    Err(LockError::Held {
        dir: dir.to_path_buf(),
        holder,
    })
}

/// The pid holding a flock on inode `ino` of device `dev`, from `/proc/locks` lines such as
/// `3: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF` (device as hex major:minor).
fn holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with "N: ->"; only holders have the kind second.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:1f:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 777 00:1f:5678 0 EOF\n";
        let dev = libc::makedev(0, 0x1f);
        assert_eq!(holder(locks, dev, 5678), Some(1234));
        assert_eq!(holder(locks, dev, 42), None, "a POSIX lock is not ours");
        assert_eq!(holder(locks, libc::makedev(0, 0x20), 5678), None);
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        match lock(dir.path()) {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder, format!("pid {}", std::process::id()));
            }
            other => panic!("not refused: {other:?}"),
        }
        drop(held);
        lock(dir.path()).expect("free once dropped");
    }
}
