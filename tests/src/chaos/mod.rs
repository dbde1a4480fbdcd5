//! `cargo xtask chaos`: the agent restarted, upgraded and fed endpoint churn while a client
//! pod connects through both datapaths. Every connect is judged against what the maps held
//! when it was made ([`verdict`]); the run prints what it saw and fails if anything broke.

pub mod bed;
pub mod churn;
pub mod migrate;
pub mod probe;
pub mod restart;
pub mod verdict;

use std::fmt::Write as _;

use serde::Serialize;

use self::{
    bed::Path,
    probe::{Echo, ProbeResult},
    verdict::Verdict,
};

/// What one path's probe saw in one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct PathReport {
    pub path: Path,
    /// Connects per second, over the probe's run.
    pub rate: f64,
    pub verdict: Verdict,
    pub echo: Option<Echo>,
}

impl PathReport {
    pub fn new(path: Path, verdict: Verdict, result: &ProbeResult) -> Self {
        let a = &result.attempts;
        let span = match (a.first(), a.last()) {
            (Some(f), Some(l)) => l.end_ns.saturating_sub(f.start_ns) as f64 / 1e9,
            _ => 0.0,
        };
        PathReport {
            path,
            rate: if span > 0.0 {
                a.len() as f64 / span
            } else {
                0.0
            },
            verdict,
            echo: result.echo.clone(),
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let (p, v) = (self.path.label(), &self.verdict);
        let mut out = Vec::new();
        if v.attempts == 0 {
            out.push(format!("{p}: no connects were made"));
        }
        if v.failed > 0 {
            out.push(format!("{p}: {} connects failed", v.failed));
        }
        if v.wrong_backend > 0 {
            out.push(format!(
                "{p}: {} connects reached a wrong backend",
                v.wrong_backend
            ));
        }
        out.extend(v.examples.iter().map(|e| format!("{p}: {e}")));
        match &self.echo {
            Some(Echo {
                broken: Some((_, why)),
                round_trips,
            }) => out.push(format!(
                "{p}: the long-lived connection broke after {round_trips} round trips: {why}"
            )),
            Some(Echo { round_trips: 0, .. }) | None => {
                out.push(format!("{p}: the long-lived connection made no round trip"));
            }
            Some(_) => {}
        }
        out
    }
}

/// Stops the probes and judges what each saw against `epochs`.
pub fn finish(
    mut probes: Vec<bed::Probe>,
    epochs: &[verdict::Epoch],
) -> anyhow::Result<Vec<PathReport>> {
    // All at once: each runs until it is told, and judging one takes a while.
    probes.iter_mut().for_each(bed::Probe::stop);
    probes
        .into_iter()
        .map(|p| {
            let path = p.path;
            let result = p.finish()?;
            let v = verdict::judge(epochs, &result.attempts);
            Ok(PathReport::new(path, v, &result))
        })
        .collect()
}

/// The per-path table of one scenario.
pub fn table(paths: &[PathReport]) -> String {
    let mut s = String::from(
        "| path | connects | conn/s | failed | wrong backend | refused, no endpoints | p50 ms | p99 ms | max ms | ≥ 1 s | long-lived connection |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for p in paths {
        let v = &p.verdict;
        let echo = match &p.echo {
            Some(Echo {
                broken: None,
                round_trips,
            }) => format!("held, {round_trips} round trips"),
            Some(Echo {
                broken: Some((_, why)),
                round_trips,
            }) => format!("BROKE after {round_trips}: {why}"),
            None => "none".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {} | {echo} |",
            p.path.label(),
            v.attempts,
            p.rate,
            v.failed,
            v.wrong_backend,
            v.refused_empty,
            v.p50_ms,
            v.p99_ms,
            v.max_ms,
            v.slow,
        );
    }
    s
}
