//! Restart and upgrade under load: the agent killed (SIGKILL) and started again, several
//! times, then stopped (SIGTERM) and started as a rolling update does, while both paths
//! connect continuously and hold a long-lived connection each. One restart follows changes
//! made while the agent was down: a backend replaced, a Service removed.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    bed::{Bed, OLD_VIP},
    probe::monotonic_ns,
    verdict::Epoch,
};

#[derive(Clone, Debug, Serialize)]
pub struct Restart {
    /// "kill -9" or "SIGTERM".
    pub how: &'static str,
    /// From the signal until the new agent was ready.
    pub down_ms: f64,
    /// When the signal was sent and when the new agent was ready (CLOCK_MONOTONIC ns).
    pub signal_ns: u64,
    pub ready_ns: u64,
    /// Map entries the new agent wrote by the time it was ready.
    pub map_writes: u64,
    /// Whether input changed while it was down.
    pub changed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestartReport {
    pub seconds: f64,
    pub restarts: Vec<Restart>,
    pub paths: Vec<super::PathReport>,
    /// What did not hold (empty: all of it did).
    pub problems: Vec<String>,
}

const DOWN: Duration = Duration::from_millis(300);
const UP: Duration = Duration::from_millis(700);

pub fn run(bed: &mut Bed, kills: usize) -> anyhow::Result<RestartReport> {
    let three = bed.names(&bed.pod_ips(&[0, 1, 2]));
    let mut epochs = vec![Epoch {
        written_ns: 0,
        applied_ns: Some(0),
        backends: three.clone(),
    }];
    bed.wait_web(&three, Duration::from_secs(5))
        .context("web was never programmed")?;
    // Each restart takes about 1.5 s; a bound well past that.
    let probes = bed.start_probes(Duration::from_secs(60 + 30 * (kills as u64 + 1)))?;
    let start = Instant::now();
    sleep(UP);
    let mut restarts = Vec::new();
    let mut problems = Vec::new();
    for i in 0..=kills {
        let sigterm = i == kills;
        let changed = kills > 0 && i == kills - 1;
        let down = Instant::now();
        let signal_ns = monotonic_ns();
        if sigterm {
            if !bed.terminate_agent() {
                problems.push("SIGTERM: the agent did not exit within 10 s".into());
            }
        } else {
            bed.kill_agent();
        }
        if changed {
            let after = bed.pod_ips(&[0, 1, 4]);
            epochs.push(Epoch {
                written_ns: monotonic_ns(),
                applied_ns: None,
                backends: bed.names(&after),
            });
            bed.set_web(&after, &[])?;
            bed.remove_old()?;
        }
        sleep(DOWN);
        bed.start_agent()?;
        let ready_ns = monotonic_ns();
        let down_ms = down.elapsed().as_secs_f64() * 1e3;
        let map_writes = bed.map_writes()?;
        if changed {
            let e = epochs.last_mut().expect("pushed");
            e.applied_ns = bed.wait_web(&e.backends, Duration::from_secs(5));
            if e.applied_ns.is_none() {
                problems.push("a backend replaced while down was not programmed".into());
            }
            if bed.programmed(OLD_VIP, 80).is_some() {
                problems.push("a Service removed while down is still in the maps".into());
            }
            if map_writes == 0 {
                problems.push("the restart after changes wrote nothing".into());
            }
        } else if map_writes > 0 {
            problems.push(format!(
                "restart {} on unchanged input wrote {map_writes} map entries",
                i + 1
            ));
        }
        restarts.push(Restart {
            how: if sigterm { "SIGTERM" } else { "kill -9" },
            down_ms,
            signal_ns,
            ready_ns,
            map_writes,
            changed,
        });
        sleep(UP);
    }
    let seconds = start.elapsed().as_secs_f64();
    let paths = super::finish(probes, &epochs)?;
    problems.extend(paths.iter().flat_map(super::PathReport::problems));
    Ok(RestartReport {
        seconds,
        restarts,
        paths,
        problems,
    })
}
