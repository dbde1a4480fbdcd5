//! The manifests directory as a [`Source`]: the first read (begun before the datapath loads),
//! then the watch's events, file by file; periodic full reads as a safety net.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::warn;

use super::{ManifestDir, ManifestWatch, Reading, Rescan, SourceError, Work};
use crate::{
    model::Index,
    source::{Progress, Snapshot, Source},
    wake::Wake,
};

pub struct ManifestSource {
    dir: ManifestDir,
    /// Started by [`Source::follow`]; until then every read is a full one.
    watch: Option<ManifestWatch>,
    /// The first read, begun by [`Self::start`]; the first [`Source::read`] finishes it.
    first_read: Option<Result<Reading, SourceError>>,
}

impl ManifestSource {
    /// Begins reading the whole directory on worker threads.
    pub fn start(dir: ManifestDir) -> Self {
        ManifestSource {
            first_read: Some(dir.start_rescan()),
            dir,
            watch: None,
        }
    }

    pub fn dir(&self) -> &ManifestDir {
        &self.dir
    }
}

impl Source for ManifestSource {
    fn read(&mut self, full: bool, progress: Option<Progress<'_>>) -> Option<Snapshot<'_>> {
        if let Some(w) = self.watch.as_mut() {
            w.follow_name();
        }
        let work = self.watch.as_ref().map_or(
            Work {
                all: true,
                ..Work::default()
            },
            |w| w.take(Instant::now()),
        );
        tracing::debug!(all = work.all, paths = ?work.paths, full, "manifests work");
        let mut read_before: Option<Duration> = None;
        let read: Result<Rescan, SourceError> = match self.first_read.take() {
            Some(Ok(reading)) => {
                let started = reading.started();
                let r = match progress {
                    Some(p) => self.dir.finish_rescan(reading, p),
                    None => self.dir.finish_rescan(reading, |_: &mut Index| {}),
                };
                read_before = Some(started.elapsed());
                r
            }
            Some(Err(e)) => Err(e),
            None if full || work.all => self.dir.rescan(),
            None => Ok(self.dir.rescan_paths(&work.paths)),
        };
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                // A directory that vanished is not "every object deleted".
                warn!(error = %e, "cannot read the manifests; the programmed state is kept");
                return None;
            }
        };
        let problems = self.dir.problems().cloned().collect();
        let touched = self.dir.take_touched();
        let changes = self.dir.take_changes();
        Some(Snapshot {
            touched,
            index: self.dir.index(),
            problems,
            unchanged: !read.changed,
            read_before,
            changes,
        })
    }

    fn reads_progressively(&self) -> bool {
        true
    }

    /// Starts watching the directory. Called after the first read: while watched, the
    /// agent's own opens of thousands of files are as many inotify events, which cost a tenth
    /// of a cold start (and can overflow the event queue). What changed during that read is
    /// found by one more full read, the watch's first work.
    fn follow(&mut self, wake: &Wake) -> anyhow::Result<()> {
        if self.watch.is_none() {
            let w = ManifestWatch::start(self.dir.dir(), wake.clone())
                .with_context(|| format!("watching {}", self.dir.dir().display()))?;
            w.read_all_next();
            self.watch = Some(w);
            wake.wake();
        }
        Ok(())
    }

    fn next_read(&self) -> Option<Instant> {
        self.watch.as_ref()?.next_due()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    /// The first read runs unwatched (begun as `run` begins it, taken by the first snapshot
    /// with its own time); a file written after it, before the watch started (no event names
    /// it), is read as soon as watching starts, and then only events cause reads.
    #[test]
    fn a_change_before_watching_starts_is_read_once_it_does() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.yaml"), service("a", "10.96.0.1")).unwrap();
        let mut source = ManifestSource::start(ManifestDir::new(tmp.path()).unwrap());
        let services = |s: &ManifestSource| s.dir().objects().services.len();
        let first = source.read(false, None).expect("readable");
        assert!(first.read_before.is_some(), "the begun read is taken");
        assert!(!first.unchanged);
        assert_eq!(services(&source), 1);
        std::fs::write(tmp.path().join("b.yaml"), service("b", "10.96.0.2")).unwrap();

        source.follow(&Wake::default()).unwrap();
        assert!(!source.read(false, None).expect("readable").unchanged);
        assert_eq!(services(&source), 2, "b.yaml is read");
        let snap = source.read(false, None).expect("readable");
        assert!(snap.unchanged, "no event, no read");
    }
}
