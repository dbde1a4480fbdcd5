//! Which connects went wrong, judged against what the maps held when each one was made.
//!
//! The driver records every change it makes as an [`Epoch`]: when it wrote it, and when it
//! first saw it in the pinned maps. Between the two the datapath may still use the previous
//! epoch, so an attempt is judged against every epoch that may have been in force while it
//! ran. Seeing a change in the maps can only come after the write to them, so this errs on
//! the lenient side and never blames a connect for a change not yet made.

use std::collections::BTreeSet;

use serde::Serialize;

use super::probe::{Attempt, Outcome};

/// One state of a Service's backends (pod names).
#[derive(Clone, Debug)]
pub struct Epoch {
    pub written_ns: u64,
    /// When the driver saw it in the maps (None: never).
    pub applied_ns: Option<u64>,
    pub backends: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub attempts: usize,
    pub replies: usize,
    /// Refused, timed out or broken while every epoch in force had backends.
    pub failed: usize,
    /// Refused while an epoch in force had none: what a Service without endpoints does.
    pub refused_empty: usize,
    /// Answered by a pod that no epoch in force had.
    pub wrong_backend: usize,
    /// Replies that took a second or more (a SYN retransmitted).
    pub slow: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The slowest refusal while empty ("refuses at once").
    pub refusal_max_ms: f64,
    /// A few of the failed and wrong attempts, for the report.
    pub examples: Vec<String>,
    /// A few of the slow ones.
    pub slow_examples: Vec<String>,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.wrong_backend == 0 && self.attempts > 0
    }
}

/// The epochs that may have been in force at some time in `[start, end]`: epoch `k` from its
/// write until a later one is seen in the maps (the driver writes one at a time, so a later
/// state seen means this one is over, even if the one right after it was never seen).
fn in_force<'a>(
    epochs: &'a [Epoch],
    until: &'a [u64],
    start: u64,
    end: u64,
) -> impl Iterator<Item = &'a Epoch> {
    (epochs.iter().zip(until))
        .filter(move |(e, until)| e.written_ns <= end && **until > start)
        .map(|(e, _)| e)
}

/// When each epoch stops being in force: the first time a later one was seen.
fn ends(epochs: &[Epoch]) -> Vec<u64> {
    let mut until = vec![u64::MAX; epochs.len()];
    let mut seen = u64::MAX;
    for k in (0..epochs.len()).rev() {
        until[k] = seen;
        seen = seen.min(epochs[k].applied_ns.unwrap_or(u64::MAX));
    }
    until
}

/// The `p` quantile of sorted nanoseconds, in milliseconds (0 if none).
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// `epochs` in the order written (the first one in force before any attempt).
pub fn judge(epochs: &[Epoch], attempts: &[Attempt]) -> Verdict {
    let mut v = Verdict {
        attempts: attempts.len(),
        ..Verdict::default()
    };
    let mut latencies = Vec::new();
    let mut refusal_max = 0u64;
    let until = ends(epochs);
    for a in attempts {
        let took = a.end_ns.saturating_sub(a.start_ns);
        // A reply's backend was chosen by the time the connect returned; a failure may come
        // from anything until the end.
        let chosen_by = match a.outcome {
            Outcome::Reply(_) => a.connected_ns,
            _ => a.end_ns,
        };
        let mut states = in_force(epochs, &until, a.start_ns, chosen_by).peekable();
        let (mut allowed, mut empty) = (BTreeSet::new(), states.peek().is_none());
        for e in states {
            allowed.extend(e.backends.iter().cloned());
            empty |= e.backends.is_empty();
        }
        let problem = match &a.outcome {
            Outcome::Reply(pod) => {
                v.replies += 1;
                latencies.push(took);
                if took >= 1_000_000_000 {
                    v.slow += 1;
                    if v.slow_examples.len() < 5 {
                        v.slow_examples.push(format!(
                            "at {} ns, {} ms: {pod}",
                            a.start_ns,
                            took / 1_000_000
                        ));
                    }
                }
                (!allowed.contains(pod)).then(|| {
                    v.wrong_backend += 1;
                    format!("{pod} answered; in force: {allowed:?}")
                })
            }
            Outcome::Refused if empty => {
                v.refused_empty += 1;
                refusal_max = refusal_max.max(took);
                None
            }
            other => {
                v.failed += 1;
                Some(format!("{other:?}; in force: {allowed:?}"))
            }
        };
        if let Some(p) = problem
            && v.examples.len() < 5
        {
            v.examples.push(format!(
                "at {} ns, {} ms: {p}",
                a.start_ns,
                took / 1_000_000
            ));
        }
    }
    latencies.sort_unstable();
    v.p50_ms = percentile(&latencies, 0.5);
    v.p99_ms = percentile(&latencies, 0.99);
    v.max_ms = latencies.last().map_or(0.0, |l| *l as f64 / 1e6);
    v.refusal_max_ms = refusal_max as f64 / 1e6;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pods: &[&str]) -> BTreeSet<String> {
        pods.iter().map(ToString::to_string).collect()
    }

    fn epoch(written: u64, applied: Option<u64>, pods: &[&str]) -> Epoch {
        Epoch {
            written_ns: written,
            applied_ns: applied,
            backends: set(pods),
        }
    }

    fn at(start: u64, outcome: Outcome) -> Attempt {
        Attempt {
            start_ns: start,
            connected_ns: start + 1,
            end_ns: start + 1,
            outcome,
        }
    }

    fn reply(pod: &str) -> Outcome {
        Outcome::Reply(pod.into())
    }

    /// a, b until 100 written (seen at 110); then b alone until 200 (seen at 210); then none.
    fn timeline() -> Vec<Epoch> {
        vec![
            epoch(0, Some(0), &["a", "b"]),
            epoch(100, Some(110), &["b"]),
            epoch(200, Some(210), &[]),
        ]
    }

    #[test]
    fn each_attempt_is_judged_by_what_may_have_been_in_force() {
        let cases: &[(u64, Outcome, &str)] = &[
            (50, reply("a"), "ok"),
            (105, reply("a"), "ok"), // written, not yet seen: the old state may hold
            (120, reply("a"), "wrong"), // a was removed, and the maps said so
            (120, reply("b"), "ok"),
            (150, reply("c"), "wrong"), // never a backend
            (150, Outcome::Refused, "failed"),
            (150, Outcome::Timeout, "failed"),
            (205, Outcome::Refused, "refused"), // none written, not yet seen
            (205, reply("b"), "ok"),
            (220, Outcome::Refused, "refused"),
            (220, reply("b"), "wrong"),
            (220, Outcome::Timeout, "failed"), // no endpoints refuses, never hangs
        ];
        for (start, outcome, want) in cases {
            let v = judge(&timeline(), &[at(*start, outcome.clone())]);
            let got = match (v.failed, v.wrong_backend, v.refused_empty) {
                (0, 0, 0) => "ok",
                (1, 0, 0) => "failed",
                (0, 1, 0) => "wrong",
                (0, 0, 1) => "refused",
                _ => "several",
            };
            assert_eq!(got, *want, "{outcome:?} at {start}: {v:?}");
        }
    }

    #[test]
    fn a_change_never_seen_leaves_both_states_in_force_until_a_later_one_is_seen() {
        let epochs = [epoch(0, Some(0), &["a"]), epoch(100, None, &["b"])];
        let v = judge(&epochs, &[at(1000, reply("a")), at(1000, reply("b"))]);
        assert!(v.clean(), "{v:?}");
        let mut epochs = epochs.to_vec();
        epochs.push(epoch(2000, Some(2010), &["c"]));
        let v = judge(&epochs, &[at(3000, reply("a"))]);
        assert_eq!(
            v.wrong_backend, 1,
            "a's state ended when c's was seen: {v:?}"
        );
    }

    /// A reply is judged by the states in force until its connect returned: where its
    /// backend was chosen. A slow greeting does not widen what it may have reached.
    #[test]
    fn a_reply_is_judged_by_when_it_connected() {
        let epochs = [epoch(0, Some(0), &["a"]), epoch(100, Some(110), &["b"])];
        // Connected at 60, greeted at 5000: b came in later, so b cannot have been chosen.
        let mut slow = at(50, reply("b"));
        (slow.connected_ns, slow.end_ns) = (60, 5000);
        assert_eq!(judge(&epochs, &[slow.clone()]).wrong_backend, 1);
        slow.connected_ns = 4999;
        assert!(judge(&epochs, &[slow]).clean());
    }

    #[test]
    fn latency_counts_replies_only() {
        let mut slow = at(10, reply("a"));
        slow.end_ns = 10 + 1_500_000_000;
        let v = judge(&timeline(), &[at(5, reply("b")), slow]);
        assert_eq!((v.replies, v.slow, v.max_ms), (2, 1, 1500.0));
        assert!(judge(&timeline(), &[]).attempts == 0 && !judge(&timeline(), &[]).clean());
    }
}
