//! Watching the directory: inotify events (through notify) sorted per file, so the agent
//! reads only what changed, and a file as soon as it is complete.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Files written in place (no close seen yet) are read once quiet this long; closed, renamed,
/// created and removed files are read at once.
pub const SETTLE: Duration = Duration::from_millis(100);

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
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    if event.need_rescan() {
        return EventClass::RescanAll;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Create(_)
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(_)) => EventClass::Ready,
        EventKind::Modify(_) | EventKind::Any | EventKind::Other => EventClass::Writing,
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
    _watcher: notify::RecommendedWatcher,
}

impl ManifestWatch {
    /// Starts watching `dir`; `wake` is notified on every relevant event.
    pub fn start(dir: &Path, wake: Arc<tokio::sync::Notify>) -> notify::Result<Self> {
        use notify::Watcher as _;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let shared = pending.clone();
        let watched = dir.to_path_buf();
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
                }
                drop(p);
                wake.notify_one();
            })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(ManifestWatch {
            pending,
            _watcher: watcher,
        })
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
