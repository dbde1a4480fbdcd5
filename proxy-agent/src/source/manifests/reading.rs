//! Reading many files at once: parsed on worker threads (parsing YAML is most of a cold
//! start) and handed back in directory order.

use std::{collections::HashSet, ffi::OsString, path::Path, sync::Arc, time::Instant};

use super::{Fingerprint, Loaded, load};

/// A read in progress (see [`super::ManifestDir::start_rescan`]).
#[derive(Debug)]
pub struct Reading {
    pub(super) parsing: Parsing,
    /// Manifest files present (those not listed were removed).
    pub(super) seen: HashSet<OsString>,
    pub(super) started: Instant,
}

impl Reading {
    /// When the read began.
    pub fn started(&self) -> Instant {
        self.started
    }
}

/// How often a read in progress hands the index over (see [`super::ManifestDir::finish_rescan`]):
/// often enough that programming keeps pace with parsing, seldom enough that each pass's
/// fixed cost stays small.
pub const PROGRESS_FILES: usize = 512;

/// Files being parsed: on worker threads when there are many (parsing YAML is most of a cold
/// start), otherwise by the caller when it indexes them.
#[derive(Debug)]
pub(super) struct Parsing {
    pub(super) todo: Arc<[(OsString, Fingerprint)]>,
    pub(super) parsed: Parsed,
}

#[derive(Debug)]
pub(super) enum Parsed {
    Here,
    /// Chunks of consecutive files as (index of the first in `todo`, their results).
    Workers {
        chunks: std::sync::mpsc::Receiver<(usize, Vec<Loaded>)>,
        workers: Vec<std::thread::JoinHandle<()>>,
    },
}

impl Parsing {
    pub(super) fn start(dir: &Path, max_bytes: u64, todo: Vec<(OsString, Fingerprint)>) -> Parsing {
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
                .map_or(1, std::num::NonZero::get)
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
                        .map(|(name, _)| load(&dir.join(name), max_bytes))
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
