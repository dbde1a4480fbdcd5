//! The manifests source: a directory of YAML/JSON files holding `v1/Service`,
//! `discovery.k8s.io/v1/EndpointSlice` and `v1/Node` objects (multi-document files and
//! `kind: List` accepted; other kinds are ignored). Each file is parsed whole: a file that does
//! not parse keeps the objects it had at its last good parse, so an editor's half-written save
//! or a typo never takes down what is serving.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};
use serde::Deserialize;
use serde_json::Value;

use crate::model::{Index, ObjectSet, Objects, Problem, ProblemReason, Slice};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("manifests directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file's objects.
type FileObjects = ObjectSet;

/// What tells a file's versions apart: modification time and size.
type Fingerprint = (SystemTime, u64);

/// A file read and parsed: its origin (the path, as problems name it) and its objects.
type Loaded = (Arc<str>, Result<FileObjects, Vec<Problem>>);

fn load(path: &Path) -> Loaded {
    let origin: Arc<str> = Arc::from(path.display().to_string());
    let parsed = fs::read_to_string(path)
        .map_err(|e| vec![file_problem(&origin, "file", e.to_string())])
        .and_then(|text| parse_file(&origin, path, &text));
    (origin, parsed)
}

#[derive(Debug)]
struct FileEntry {
    origin: Arc<str>,
    fingerprint: Fingerprint,
    /// What the file contributes: its last good parse (empty if it never parsed).
    objects: FileObjects,
    /// Problems of the current content (non-empty: `objects` is from an older version).
    problems: Vec<Problem>,
}

/// The directory's state, rescanned on change.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    /// By file name: the directory is not read recursively, and names compare as bytes
    /// where paths compare component by component (a tenth of a 10k-file rescan).
    files: BTreeMap<OsString, FileEntry>,
    /// Files whose current content has problems (so listing them costs their number).
    troubled: BTreeSet<OsString>,
    /// The files' objects grouped for the model, updated file by file.
    index: Index,
}

/// What a rescan found.
#[derive(Debug, Default)]
pub struct Rescan {
    /// Some file was added, changed or removed.
    pub changed: bool,
    /// Problems of files that changed in this rescan (report each once).
    pub new_problems: Vec<Problem>,
}

fn is_manifest(file_name: &OsStr) -> bool {
    let path = Path::new(file_name);
    let name = file_name.to_str().unwrap_or("");
    // Editors' swap and backup files are not manifests.
    !name.starts_with('.')
        && !name.ends_with('~')
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

impl ManifestDir {
    pub fn new(dir: &Path) -> Result<Self, SourceError> {
        let meta = fs::metadata(dir).map_err(|source| SourceError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SourceError::Dir {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(ManifestDir {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            troubled: BTreeSet::new(),
            index: Index::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads files whose size or mtime changed, drops removed ones.
    pub fn rescan(&mut self) -> Result<Rescan, SourceError> {
        let reading = self.start_rescan()?;
        self.finish_rescan(reading, |_| {})
    }

    /// The first half of [`Self::rescan`]: lists the directory and starts parsing what
    /// changed on worker threads, which go on while the caller does something else.
    pub fn start_rescan(&self) -> Result<Reading, SourceError> {
        let started = Instant::now();
        let entries = fs::read_dir(&self.dir).map_err(|source| SourceError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let mut names: Vec<OsString> = entries.flatten().map(|e| e.file_name()).collect();
        names.sort();
        let mut seen = HashSet::with_capacity(names.len());
        let mut todo = Vec::new();
        for name in names {
            if let Some(fingerprint) = self.needs_read(&name, &mut seen) {
                todo.push((name, fingerprint));
            }
        }
        Ok(Reading {
            parsing: Parsing::start(&self.dir, todo),
            seen,
            started,
        })
    }

    /// The second half of [`Self::rescan`]: indexes the files as they are parsed (in
    /// directory order) and calls `progress` with the index each time some
    /// [`PROGRESS_FILES`] more are in, so the caller can program them while the rest parse.
    pub fn finish_rescan(
        &mut self,
        reading: Reading,
        progress: impl FnMut(&mut Index),
    ) -> Result<Rescan, SourceError> {
        let Reading { parsing, seen, .. } = reading;
        let mut out = Rescan::default();
        self.apply_all(parsing, &mut out, progress);
        let gone: Vec<OsString> = self
            .files
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        if !self.forget_gone(gone, &mut out) {
            return Err(SourceError::Dir {
                path: self.dir.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        Ok(out)
    }

    /// Forgets files that are no longer there; false (forgetting nothing) when the directory
    /// itself went away meanwhile: its files failed to read, they were not removed.
    fn forget_gone(&mut self, gone: Vec<OsString>, out: &mut Rescan) -> bool {
        if gone.is_empty() {
            return true;
        }
        if !self.dir.is_dir() {
            return false;
        }
        for name in gone {
            self.forget(&name);
            out.changed = true;
        }
        true
    }

    /// Re-reads just these files (from file events): a change costs its file, not the
    /// directory. Paths outside the directory or not manifests are ignored.
    pub fn rescan_paths<'a>(&mut self, paths: impl IntoIterator<Item = &'a PathBuf>) -> Rescan {
        let mut out = Rescan::default();
        let mut gone = Vec::new();
        let mut seen = HashSet::new();
        let mut todo = Vec::new();
        for path in paths {
            let Some(name) = path
                .file_name()
                .filter(|_| path.parent() == Some(&self.dir))
            else {
                continue;
            };
            match self.needs_read(name, &mut seen) {
                Some(fingerprint) => todo.push((name.to_os_string(), fingerprint)),
                None if !seen.contains(name) && self.files.contains_key(name) => {
                    gone.push(name.to_os_string())
                }
                None => {}
            }
        }
        self.apply_all(Parsing::start(&self.dir, todo), &mut out, |_| {});
        // A directory that is gone is not "every file removed": the full rescan reports it.
        self.forget_gone(gone, &mut out);
        out
    }

    /// The fingerprint of file `name` if it must be read (a manifest file that is new or
    /// changed); manifest files are added to `seen`.
    fn needs_read(&self, name: &OsStr, seen: &mut HashSet<OsString>) -> Option<Fingerprint> {
        if !is_manifest(name) {
            return None;
        }
        // Follows symlinks: a mounted ConfigMap's files are links into its data directory.
        let meta = fs::metadata(self.dir.join(name))
            .ok()
            .filter(fs::Metadata::is_file)?;
        seen.insert(name.to_os_string());
        let fingerprint = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let unchanged = self
            .files
            .get(name)
            .is_some_and(|f| f.fingerprint == fingerprint);
        (!unchanged).then_some(fingerprint)
    }

    /// Indexes the files of `parsing` in order as they come, calling `progress` every
    /// [`PROGRESS_FILES`] files (and after the last).
    fn apply_all(
        &mut self,
        parsing: Parsing,
        out: &mut Rescan,
        mut progress: impl FnMut(&mut Index),
    ) {
        let Parsing { todo, parsed } = parsing;
        let mut since_progress = 0;
        let mut next = 0;
        let mut apply = |dir: &mut Self, from: usize, files: Vec<Loaded>| {
            for (i, (origin, result)) in (from..).zip(files) {
                let (name, fingerprint) = &todo[i];
                dir.apply(name.clone(), *fingerprint, origin, result, out);
            }
        };
        match parsed {
            Parsed::Here => {
                let files = todo.iter().map(|(name, _)| load(&self.dir.join(name)));
                apply(self, 0, files.collect());
                next = todo.len();
                since_progress = next;
            }
            Parsed::Workers { chunks, workers } => {
                // Chunks arrive in any order; they are indexed in directory order.
                let mut early: BTreeMap<usize, Vec<Loaded>> = BTreeMap::new();
                for (from, files) in chunks {
                    early.insert(from, files);
                    while let Some(files) = early.remove(&next) {
                        let n = files.len();
                        apply(self, next, files);
                        next += n;
                        since_progress += n;
                    }
                    if since_progress >= PROGRESS_FILES && next < todo.len() {
                        progress(&mut self.index);
                        since_progress = 0;
                    }
                }
                for w in workers {
                    w.join().expect("parsing does not panic");
                }
            }
        }
        debug_assert_eq!(next, todo.len(), "every file is indexed");
        if since_progress > 0 {
            progress(&mut self.index);
        }
    }

    /// Indexes one file's new content; content that does not parse keeps the last good one.
    fn apply(
        &mut self,
        name: OsString,
        fingerprint: Fingerprint,
        origin: Arc<str>,
        parsed: Result<FileObjects, Vec<Problem>>,
        out: &mut Rescan,
    ) {
        out.changed = true;
        let previous = self.files.remove(&name);
        let entry = match (parsed, previous) {
            (Ok(objects), previous) => {
                if let Some(p) = previous {
                    self.index.remove(&p.origin, &p.objects);
                }
                self.index.insert(&origin, &objects);
                FileEntry {
                    origin,
                    fingerprint,
                    objects,
                    problems: vec![],
                }
            }
            // The last good parse stays (and stays indexed).
            (Err(problems), previous) => {
                out.new_problems.extend(problems.iter().cloned());
                let (origin, objects) = previous
                    .map(|p| (p.origin, p.objects))
                    .unwrap_or((origin, FileObjects::default()));
                FileEntry {
                    origin,
                    fingerprint,
                    objects,
                    problems,
                }
            }
        };
        if entry.problems.is_empty() {
            self.troubled.remove(&name);
        } else {
            self.troubled.insert(name.clone());
        }
        self.files.insert(name, entry);
    }

    fn forget(&mut self, name: &OsStr) {
        self.troubled.remove(name);
        if let Some(f) = self.files.remove(name) {
            self.index.remove(&f.origin, &f.objects);
        }
    }

    /// The objects of every file, grouped for the model.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The Services whose objects changed since the last call (see [`Index::take_touched`]).
    pub fn take_touched(&mut self) -> Option<BTreeSet<crate::model::ServiceRef>> {
        self.index.take_touched()
    }

    /// Problems of the files' current contents.
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.troubled
            .iter()
            .filter_map(|p| self.files.get(p))
            .flat_map(|f| f.problems.iter())
    }

    pub fn objects(&self) -> Objects {
        let mut out = Objects::default();
        for f in self.files.values() {
            out.extend_from(&f.origin, &f.objects);
        }
        out
    }
}

/// A read in progress (see [`ManifestDir::start_rescan`]).
#[derive(Debug)]
pub struct Reading {
    parsing: Parsing,
    /// Manifest files present (those not listed were removed).
    seen: HashSet<OsString>,
    started: Instant,
}

impl Reading {
    /// When the read began.
    pub fn started(&self) -> Instant {
        self.started
    }
}

/// How often a read in progress hands the index over (see [`ManifestDir::finish_rescan`]):
/// often enough that programming keeps pace with parsing, seldom enough that each pass's
/// fixed cost stays small.
pub const PROGRESS_FILES: usize = 512;

/// Files being parsed: on worker threads when there are many (parsing YAML is most of a cold
/// start), otherwise by the caller when it indexes them.
#[derive(Debug)]
struct Parsing {
    todo: Arc<[(OsString, Fingerprint)]>,
    parsed: Parsed,
}

#[derive(Debug)]
enum Parsed {
    Here,
    /// Chunks of consecutive files as (index of the first in `todo`, their results).
    Workers {
        chunks: std::sync::mpsc::Receiver<(usize, Vec<Loaded>)>,
        workers: Vec<std::thread::JoinHandle<()>>,
    },
}

impl Parsing {
    fn start(dir: &Path, todo: Vec<(OsString, Fingerprint)>) -> Parsing {
        // Plain threads rather than a pool crate: one loop, and no idle threads kept in the
        // agent between cold starts.
        const PER_THREAD_MIN: usize = 64;
        // Threads take the next few files as they go (files differ in size, and a core may be
        // busy with something else): none waits while another has a long queue.
        const TAKE: usize = 16;
        let todo: Arc<[(OsString, Fingerprint)]> = todo.into();
        let threads = if todo.len() < 2 * PER_THREAD_MIN {
            1 // (asking for the parallelism reads cgroup files: not for every edit)
        } else {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(todo.len() / PER_THREAD_MIN)
        };
        if threads == 1 {
            return Parsing {
                todo,
                parsed: Parsed::Here,
            };
        }
        let (tx, chunks) = std::sync::mpsc::channel();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (todo, next, tx, dir) = (todo.clone(), next.clone(), tx.clone(), dir.to_owned());
            let worker = move || {
                loop {
                    let from = next.fetch_add(TAKE, std::sync::atomic::Ordering::Relaxed);
                    if from >= todo.len() {
                        return;
                    }
                    let files = todo[from..todo.len().min(from + TAKE)]
                        .iter()
                        .map(|(name, _)| load(&dir.join(name)))
                        .collect();
                    if tx.send((from, files)).is_err() {
                        return; // the reader is gone
                    }
                }
            };
            match std::thread::Builder::new()
                .name("manifests-parse".into())
                .spawn(worker)
            {
                Ok(w) => workers.push(w),
                // Fewer threads only make the read slower; with none, it is done here.
                Err(e) => tracing::warn!(error = %e, "cannot start a parse thread"),
            }
        }
        if workers.is_empty() {
            return Parsing {
                todo,
                parsed: Parsed::Here,
            };
        }
        Parsing {
            todo,
            parsed: Parsed::Workers { chunks, workers },
        }
    }
}

/// Files written in place (no close seen yet) are read once quiet this long; closed, renamed,
/// created and removed files are read at once.
pub const SETTLE: Duration = Duration::from_millis(100);

/// What a file event means for the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventClass {
    /// The file is complete (closed after writing, renamed into place) or gone: read it now.
    Ready,
    /// The file is being written: wait for its close (or for [`SETTLE`] of quiet).
    Writing,
    /// The watcher lost events: read the whole directory.
    RescanAll,
    Ignore,
}

fn classify(event: &notify::Event) -> EventClass {
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
enum Route {
    Ignore,
    /// Read the whole directory.
    All,
    Ready(Vec<PathBuf>),
    Writing(Vec<PathBuf>),
}

/// Routes an event of the watch on `dir`. Reading the directory makes events too (opening
/// it, opening its files): those are ignored, or every read would cause another.
fn route(event: &notify::Event, dir: &Path) -> Route {
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

fn file_problem(origin: &Arc<str>, field: impl Into<String>, detail: impl Into<String>) -> Problem {
    Problem {
        origin: origin.clone(),
        kind: "File",
        namespace: String::new(),
        name: String::new(),
        field: field.into(),
        reason: ProblemReason::Parse,
        detail: detail.into(),
    }
}

/// Parses one file into objects; any problem rejects the whole file.
fn parse_file(origin: &Arc<str>, path: &Path, text: &str) -> Result<FileObjects, Vec<Problem>> {
    let docs: Vec<Value> = if path.extension().and_then(|e| e.to_str()) == Some("json") {
        vec![serde_json::from_str(text).map_err(|e| {
            vec![file_problem(
                origin,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )]
        })?]
    } else {
        let mut docs = Vec::new();
        for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).map_err(|e| {
                let at = e
                    .location()
                    .map(|l| format!("line {} column {}", l.line(), l.column()))
                    .unwrap_or_else(|| format!("document {i}"));
                vec![file_problem(origin, at, e.to_string())]
            })?;
            docs.push(v);
        }
        docs
    };
    let mut out = FileObjects::default();
    let mut problems = Vec::new();
    let mut queue: Vec<(String, Value)> = docs
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("document {i}"), d))
        .collect();
    while let Some((at, doc)) = queue.pop() {
        if doc.is_null() {
            continue; // an empty document between `---` separators
        }
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let api = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let mut bad = |kind: &'static str, field: String, reason, detail: String| {
            problems.push(Problem {
                origin: origin.clone(),
                kind,
                namespace: namespace.clone(),
                name: name.clone(),
                field,
                reason,
                detail,
            });
        };
        match (api.as_str(), kind.as_str()) {
            (_, k) if k == "List" || (k.ends_with("List") && doc.get("items").is_some()) => {
                match doc.get("items").and_then(Value::as_array) {
                    Some(items) => {
                        queue.extend(
                            items
                                .iter()
                                .enumerate()
                                .map(|(j, it)| (format!("{at} items[{j}]"), it.clone())),
                        );
                    }
                    None => bad(
                        "List",
                        "items".into(),
                        ProblemReason::MissingField,
                        format!("{at}: a List needs an items array"),
                    ),
                }
            }
            ("v1", "Service") => match typed::<Service>(doc) {
                Ok(s) => out.services.push(Arc::new(s)),
                Err((field, e)) => bad("Service", field, ProblemReason::InvalidValue, e),
            },
            ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<Slice>(doc) {
                Ok(s) => out.slices.push(Arc::new(s)),
                Err((field, e)) => bad("EndpointSlice", field, ProblemReason::InvalidValue, e),
            },
            ("v1", "Node") => match typed::<Node>(doc) {
                Ok(n) => out.nodes.push(Arc::new(n)),
                Err((field, e)) => bad("Node", field, ProblemReason::InvalidValue, e),
            },
            ("", _) | (_, "") => bad(
                "Object",
                format!("{at} apiVersion/kind"),
                ProblemReason::MissingField,
                "every object needs apiVersion and kind".into(),
            ),
            ("v1" | "discovery.k8s.io/v1beta1", "EndpointSlice" | "Endpoints") => bad(
                "Object",
                format!("{at} apiVersion"),
                ProblemReason::InvalidValue,
                format!("{api}/{kind} is not read; use discovery.k8s.io/v1 EndpointSlice"),
            ),
            // Other kinds (Deployments, ConfigMaps...) may share the directory; not ours.
            _ => tracing::debug!(file = %origin, %api, %kind, "ignoring object of another kind"),
        }
    }
    // Objects were popped from the back; restore file order for stable output.
    out.services.reverse();
    out.slices.reverse();
    out.nodes.reverse();
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Deserializes into a k8s-openapi type, naming the field that failed.
fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, (String, String)> {
    // Tracking the path costs about as much as the conversion: only a failure pays for it.
    if let Ok(t) = T::deserialize(&doc) {
        return Ok(t);
    }
    serde_path_to_error::deserialize(doc).map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

#[cfg(test)]
mod tests;
