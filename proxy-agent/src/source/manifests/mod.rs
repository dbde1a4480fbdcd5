//! The manifests source: a directory of YAML/JSON files holding `v1/Service`,
//! `discovery.k8s.io/v1/EndpointSlice` and `v1/Node` objects (multi-document files and
//! `kind: List` accepted; other kinds are ignored). Each document stands alone, and an object
//! whose document is broken keeps its last good version (every object of a file that does not
//! parse at all does), so an editor's half-written save or a typo never takes down what is
//! serving.

mod parse;
mod reading;
mod source;
mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime},
};

use self::{
    parse::{FileParse, file_problem, parse_file, with_held},
    reading::{Parsed, Parsing},
};
pub use self::{
    reading::{PROGRESS_FILES, Reading},
    source::ManifestSource,
    watch::{ManifestWatch, SETTLE, Work},
};
use crate::model::{Index, ObjectSet, Objects, Problem};

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
type Loaded = (Arc<str>, FileParse);

/// Files larger than this are refused (`--max-manifest-bytes`): reading and parsing one
/// costs several times its size in memory.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 << 20;

fn load(path: &Path, max_bytes: u64) -> Loaded {
    use std::io::Read as _;
    let origin: Arc<str> = Arc::from(path.display().to_string());
    let mut text = String::new();
    // Read at most one byte past the limit: a file that grows meanwhile is refused too.
    let read = fs::File::open(path).and_then(|f| {
        f.take(max_bytes.saturating_add(1))
            .read_to_string(&mut text)
    });
    let parsed = match read {
        Err(e) => FileParse::unreadable(vec![file_problem(&origin, "file", e.to_string())]),
        Ok(n) if n as u64 > max_bytes => FileParse::unreadable(vec![file_problem(
            &origin,
            "file",
            format!("larger than {max_bytes} bytes (--max-manifest-bytes); not read"),
        )]),
        Ok(_) => parse_file(&origin, path, &text),
    };
    (origin, parsed)
}

/// One file's text parsed as the source parses it, on its own (no last good objects to keep):
/// its valid objects and the problems of the rest. For checks from outside the source (the
/// fuzz targets, `proxy_agent::fuzzing`).
pub fn parse_text(file_name: &str, text: &str) -> (ObjectSet, Vec<Problem>) {
    let origin: Arc<str> = Arc::from(file_name);
    let parsed = parse_file(&origin, Path::new(file_name), text);
    (parsed.objects, parsed.problems)
}

#[derive(Debug)]
struct FileEntry {
    origin: Arc<str>,
    fingerprint: Fingerprint,
    /// What the file contributes: its valid objects, and the last good versions of those
    /// whose documents are broken now.
    objects: FileObjects,
    /// Problems of the current content (non-empty: some `objects` may be from an older version).
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
    /// Larger files are refused.
    max_file_bytes: u64,
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
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        })
    }

    /// Refuses files larger than `bytes` (a parse problem of the file: its last good
    /// objects stay).
    pub fn with_max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = bytes;
        self
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
            parsing: Parsing::start(&self.dir, self.max_file_bytes, todo),
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
                    gone.push(name.to_os_string());
                }
                None => {}
            }
        }
        self.apply_all(
            Parsing::start(&self.dir, self.max_file_bytes, todo),
            &mut out,
            |_| {},
        );
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
                let files = todo
                    .iter()
                    .map(|(name, _)| load(&self.dir.join(name), self.max_file_bytes));
                apply(self, 0, files.collect());
                next = todo.len();
                since_progress = next;
            }
            Parsed::Workers { chunks, workers } => {
                // Chunks arrive in any order; they are indexed in directory order.
                let mut early: BTreeMap<usize, Vec<Loaded>> = BTreeMap::new();
                for (from, files) in chunks {
                    early.insert(from, files);
                    // Handed over every PROGRESS_FILES files applied, however the chunks
                    // arrived (a late first chunk releases them all at once).
                    while let Some(files) = early.remove(&next) {
                        let n = files.len();
                        apply(self, next, files);
                        next += n;
                        since_progress += n;
                        if since_progress >= PROGRESS_FILES && next < todo.len() {
                            progress(&mut self.index);
                            since_progress = 0;
                        }
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

    /// Indexes one file's new content; objects whose documents are broken keep their last
    /// good versions.
    fn apply(
        &mut self,
        name: OsString,
        fingerprint: Fingerprint,
        origin: Arc<str>,
        parsed: FileParse,
        out: &mut Rescan,
    ) {
        out.changed = true;
        let previous = self.files.remove(&name);
        let FileParse {
            objects,
            problems,
            hold,
        } = parsed;
        out.new_problems.extend(problems.iter().cloned());
        let objects = match previous {
            Some(p) => {
                self.index.remove(&p.origin, &p.objects);
                with_held(objects, &p.objects, &hold)
            }
            None => objects,
        };
        self.index.insert(&origin, &objects);
        let entry = FileEntry {
            origin,
            fingerprint,
            objects,
            problems,
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

    /// How many objects changed since the last call (see [`Index::take_changes`]).
    pub fn take_changes(&mut self) -> crate::model::ObjectChanges {
        self.index.take_changes()
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

#[cfg(test)]
mod tests;
