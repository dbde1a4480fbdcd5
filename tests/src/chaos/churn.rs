//! Endpoint churn under load: `web`'s EndpointSlice rewritten many times a second, with a
//! scale 3 -> 0 -> 3 every 40 updates, while both paths connect continuously. Each update is
//! timed from the write to the moment the pinned maps hold it.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    bed::{Bed, PODS},
    probe::monotonic_ns,
    verdict::{Epoch, percentile},
};

#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    pub seconds: f64,
    pub updates: usize,
    pub scale_to_zero: usize,
    /// Write -> seen in the pinned maps.
    pub apply_p50_ms: f64,
    pub apply_p99_ms: f64,
    pub apply_max_ms: f64,
    pub paths: Vec<super::PathReport>,
    pub problems: Vec<String>,
}

/// Which pods are ready at update `k` (and which are listed, not ready).
fn step(k: usize, rng: &mut fastrand::Rng) -> (Vec<usize>, Vec<usize>) {
    match k % 40 {
        30 | 35 => (vec![0, 1, 2], vec![]),
        // Scaled to 0: the pods go not ready, then away (each update differs).
        31 => (vec![], vec![0, 1, 2]),
        32 => (vec![], vec![0, 1]),
        33 => (vec![], vec![0]),
        34 => (vec![], vec![]),
        _ => {
            let ready: Vec<usize> = (0..PODS).filter(|_| rng.bool()).collect();
            let ready = if ready.is_empty() {
                vec![rng.usize(0..PODS)]
            } else {
                ready
            };
            let rest = (0..PODS).filter(|p| !ready.contains(p)).collect();
            (ready, rest)
        }
    }
}

pub fn run(bed: &Bed, duration: Duration, per_second: u32) -> anyhow::Result<ChurnReport> {
    let mut rng = fastrand::Rng::with_seed(16);
    let three = bed.pod_ips(&[0, 1, 2]);
    bed.set_web(&three, &[])?;
    let applied = bed
        .wait_web(&bed.names(&three), Duration::from_secs(5))
        .context("web back to 3 pods")?;
    let mut epochs = vec![Epoch {
        written_ns: 0,
        applied_ns: Some(applied),
        backends: bed.names(&three),
    }];
    let probes = bed.start_probes(duration + Duration::from_secs(60))?;
    sleep(Duration::from_millis(500));
    let tick = Duration::from_secs(1) / per_second.max(1);
    let steps = (duration.as_secs_f64() * f64::from(per_second)) as usize;
    let start = Instant::now();
    let mut apply = Vec::new();
    let mut problems = Vec::new();
    for k in 0..steps {
        let at = start + tick * k as u32;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            sleep(wait);
        }
        let (ready, not_ready) = step(k, &mut rng);
        let (ready, not_ready) = (bed.pod_ips(&ready), bed.pod_ips(&not_ready));
        let written_ns = monotonic_ns();
        bed.set_web(&ready, &not_ready)?;
        let backends = bed.names(&ready);
        let applied_ns = bed.wait_web(&backends, Duration::from_secs(5));
        match applied_ns {
            Some(t) => apply.push(t - written_ns),
            None => problems.push(format!("update {k} ({backends:?}) not programmed in 5 s")),
        }
        epochs.push(Epoch {
            written_ns,
            applied_ns,
            backends,
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    sleep(Duration::from_millis(300));
    let paths = super::finish(probes, &epochs)?;
    problems.extend(paths.iter().flat_map(super::PathReport::problems));
    apply.sort_unstable();
    Ok(ChurnReport {
        seconds,
        updates: steps,
        scale_to_zero: (0..steps).filter(|k| k % 40 == 31).count(),
        apply_p50_ms: percentile(&apply, 0.5),
        apply_p99_ms: percentile(&apply, 0.99),
        apply_max_ms: apply.last().map_or(0.0, |v| *v as f64 / 1e6),
        paths,
        problems,
    })
}
