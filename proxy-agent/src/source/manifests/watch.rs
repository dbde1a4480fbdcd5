//! Watching the directory: inotify events (through notify) sorted per file, so the agent
//! reads only what changed, and a file as soon as it is complete.
//!
//! An inotify watch follows an inode, not a name. A directory deleted and created again, or
//! a name swapped to a symlink to another directory (as configuration managers do), would
//! leave the watch on the old inode, deaf. So the parent directory is watched too, for
//! events naming the directory, and each read checks which inode the name resolves to; when
//! it changed, the directory is watched afresh and read whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Files being written (created or modified, no close seen yet) are read once quiet this
/// long: a writer that holds its file open may pause between writes, and a half-written file
/// would be programmed as it is. Closed, renamed and removed files are read at once.
pub const SETTLE: Duration = Duration::from_secs(2);

/// What a file event means for the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EventClass {
    /// The file is complete (closed after writing, renamed into place) or gone: read it now.
    Ready,
    /// The file is being written: wait for its close (or for [`SETTLE`] of quiet).
    Writing,
    /// The watcher lost events: read the whole directory.
    RescanAll,
    Ignore,
}

pub(super) fn classify(event: &notify::Event) -> EventClass {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    if event.need_rescan() {
        return EventClass::RescanAll;
    }
    match event.kind {
        // A new directory is complete (kubelet's `..<timestamp>`); a new file is being
        // written until it is closed (a `cp` is an empty file first).
        EventKind::Create(CreateKind::Folder)
        | EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(_)) => EventClass::Ready,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => {
            EventClass::Writing
        }
        EventKind::Access(_) => EventClass::Ignore,
    }
}

/// Where one event goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    Ignore,
    /// Read the whole directory.
    All,
    Ready(Vec<PathBuf>),
    Writing(Vec<PathBuf>),
    /// The directory's name may now lead elsewhere: watch it afresh and read it whole.
    Moved,
}

/// Routes an event of the watch on `dir`. Reading the directory makes events too (opening
/// it, opening its files): those are ignored, or every read would cause another.
pub(super) fn route(event: &notify::Event, dir: &Path) -> Route {
    let class = classify(event);
    match class {
        EventClass::Ignore => return Route::Ignore,
        EventClass::RescanAll => return Route::All,
        EventClass::Ready | EventClass::Writing => {}
    }
    // The parent's watch: only the directory's own name counts (it was removed, created,
    // renamed or replaced); the parent's other entries are none of ours.
    if event.paths.iter().any(|p| p == dir) {
        // Writes to the directory inode itself (its attributes, its entries) are not.
        return match class {
            EventClass::Ready => Route::Moved,
            _ => Route::Ignore,
        };
    }
    if (event.paths.iter()).all(|p| p.parent() == dir.parent() && p.parent() != Some(dir)) {
        return Route::Ignore;
    }
    let whole_dir = event.paths.iter().any(|path| {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // The directory itself moved or was deleted: the full read reports it (and keeps
        // the programmed state). `..data` and friends: kubelet updates a mounted ConfigMap
        // by swapping a symlinked directory, so the files' own names see no event.
        path.parent() != Some(dir) || name.starts_with("..")
    });
    match (whole_dir, class) {
        (true, EventClass::Ready) => Route::All,
        // Writes to the directory inode itself or to kubelet's staging files: their
        // completion (a rename) is what counts.
        (true, _) => Route::Ignore,
        (false, EventClass::Ready) => Route::Ready(event.paths.clone()),
        (false, _) => Route::Writing(event.paths.clone()),
    }
}

/// File events not yet read.
#[derive(Debug, Default)]
struct Pending {
    all: bool,
    /// The directory's name may lead to another inode than the one watched.
    moved: bool,
    ready: BTreeSet<PathBuf>,
    /// Files being written, with their last event.
    writing: BTreeMap<PathBuf, Instant>,
}

/// What to read now.
#[derive(Debug, Default)]
pub struct Work {
    /// Rescan the whole directory.
    pub all: bool,
    pub paths: BTreeSet<PathBuf>,
}

/// Watches the directory (inotify via notify) and sorts its events per file, so the agent
/// reads only what changed, and a file as soon as it is complete.
pub struct ManifestWatch {
    pending: Arc<Mutex<Pending>>,
    watcher: notify::RecommendedWatcher,
    /// The directory, absolute (event paths are compared with it).
    dir: PathBuf,
    /// (device, inode) of what the watch on `dir` follows; None: not watched (it is gone).
    watched: Option<(u64, u64)>,
}

/// What `dir` resolves to now.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

impl ManifestWatch {
    /// Starts watching `dir`; `wake` is notified on every relevant event.
    pub fn start(dir: &Path, wake: crate::wake::Wake) -> notify::Result<Self> {
        use notify::Watcher as _;
        let dir = std::path::absolute(dir)?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let shared = pending.clone();
        let watched = dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                let route = match &res {
                    Ok(event) => route(event, &watched),
                    // An error may mean lost events: the directory is read again.
                    Err(_) => Route::All,
                };
                let mut p = shared.lock().expect("not poisoned");
                match route {
                    Route::Ignore => return,
                    Route::All => p.all = true,
                    Route::Ready(paths) => {
                        for path in paths {
                            p.writing.remove(&path);
                            p.ready.insert(path);
                        }
                    }
                    Route::Writing(paths) => {
                        let now = Instant::now();
                        for path in paths {
                            p.writing.insert(path, now);
                        }
                    }
                    Route::Moved => p.moved = true,
                }
                drop(p);
                wake.wake();
            })?;
        if let Some(parent) = dir.parent() {
            watcher.watch(parent, notify::RecursiveMode::NonRecursive)?;
        }
        let id = identity(&dir);
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        Ok(ManifestWatch {
            pending,
            watcher,
            dir,
            watched: id,
        })
    }

    /// Follows the directory's name: if it now resolves to another directory than the one
    /// watched (deleted and created again, or a symlink swapped), watches that one and makes
    /// the next work a full read. Cheap (one stat); called before each read.
    pub fn follow_name(&mut self) {
        use notify::Watcher as _;
        let moved = std::mem::take(&mut self.pending.lock().expect("not poisoned").moved);
        let now = identity(&self.dir);
        // The same directory (an event about its name may only have touched it); a gone one
        // is looked for again after an event about its name.
        if now == self.watched && (now.is_some() || !moved) {
            return;
        }
        // The old inode's watch is gone with it, or still follows an unnamed directory.
        let _ = self.watcher.unwatch(&self.dir);
        self.watched = None;
        if now.is_some() {
            match self
                .watcher
                .watch(&self.dir, notify::RecursiveMode::NonRecursive)
            {
                Ok(()) => {
                    tracing::info!(dir = %self.dir.display(), "the manifests directory was replaced; watching the new one");
                    self.watched = now;
                }
                Err(e) => tracing::warn!(dir = %self.dir.display(), error = %e,
                                         "cannot watch the manifests directory; retrying at the next read"),
            }
        }
        self.read_all_next();
    }

    /// Makes the next work a full read of the directory.
    pub fn read_all_next(&self) {
        self.pending.lock().expect("not poisoned").all = true;
    }

    /// When files being written should be looked at again (None: none is).
    pub fn next_due(&self) -> Option<Instant> {
        let p = self.pending.lock().expect("not poisoned");
        p.writing.values().min().map(|t| *t + SETTLE)
    }

    /// Takes what should be read at `now`.
    pub fn take(&self, now: Instant) -> Work {
        let mut p = self.pending.lock().expect("not poisoned");
        let mut paths = std::mem::take(&mut p.ready);
        let quiet: Vec<PathBuf> = p
            .writing
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= SETTLE)
            .map(|(path, _)| path.clone())
            .collect();
        for path in quiet {
            p.writing.remove(&path);
            paths.insert(path);
        }
        Work {
            all: std::mem::take(&mut p.all),
            paths,
        }
    }
}
