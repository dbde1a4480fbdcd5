//! Frontends refused for want of room (a map full): a data problem that retrying at every
//! sync cannot fix, so each is retried with backoff, and at once when its spec changes or a
//! delete makes room. Other write errors (a failed syscall) are retried at every sync.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::model::{Frontend, FrontendSpec};

/// The first retry after a refusal; each later one waits twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(super) struct Refusal {
    /// The spec that was refused (a different one is tried at once).
    pub spec: FrontendSpec,
    pub attempts: u32,
    pub retry_at: Instant,
}

#[derive(Debug, Default)]
pub(super) struct Refused {
    by_frontend: HashMap<Frontend, Refusal>,
}

impl Refused {
    pub fn len(&self) -> usize {
        self.by_frontend.len()
    }

    pub fn contains(&self, f: &Frontend) -> bool {
        self.by_frontend.contains_key(f)
    }

    /// `f` with `spec` was refused before and its retry is not due.
    pub fn defers(&self, f: &Frontend, spec: &FrontendSpec, now: Instant) -> bool {
        (self.by_frontend.get(f)).is_some_and(|r| r.spec.programs_same(spec) && now < r.retry_at)
    }

    /// Records a refusal; true if it is news (not refused before, or refused with another
    /// spec), which is what gets logged.
    pub fn refuse(&mut self, f: Frontend, spec: &FrontendSpec, now: Instant) -> bool {
        let r = self.by_frontend.entry(f).or_insert_with(|| Refusal {
            spec: spec.clone(),
            attempts: 0,
            retry_at: now,
        });
        // Another spec starts the backoff again; a change people see only (endpoint counts
        // in `about`) does not.
        let other = !r.spec.programs_same(spec);
        let news = r.attempts == 0 || other;
        if other {
            r.attempts = 0;
        }
        if r.spec != *spec {
            r.spec = spec.clone();
        }
        r.attempts += 1;
        let backoff = FIRST_BACKOFF.saturating_mul(1 << (r.attempts - 1).min(16));
        r.retry_at = now + backoff.min(MAX_BACKOFF);
        news
    }

    /// `f` is programmed (or no longer wanted): true if it had been refused.
    pub fn forget(&mut self, f: &Frontend) -> bool {
        self.by_frontend.remove(f).is_some()
    }

    /// Room was made: every refused frontend is due now.
    pub fn room_made(&mut self, now: Instant) {
        for r in self.by_frontend.values_mut() {
            r.retry_at = r.retry_at.min(now);
        }
    }

    /// The earliest retry due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.by_frontend.values().map(|r| r.retry_at).min()
    }

    /// The refused frontends due at `now`, with their specs.
    pub fn due(&self, now: Instant) -> Vec<(Frontend, FrontendSpec)> {
        (self.by_frontend.iter())
            .filter(|(_, r)| r.retry_at <= now)
            .map(|(f, r)| (*f, r.spec.clone()))
            .collect()
    }

    /// Drops the refusals `keep` says are no longer wanted.
    pub fn retain(&mut self, mut keep: impl FnMut(&Frontend, &FrontendSpec) -> bool) {
        self.by_frontend.retain(|f, r| keep(f, &r.spec));
    }
}
