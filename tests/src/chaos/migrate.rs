//! An upgrade across a map layout change, under load: the agent stopped (SIGTERM) and a build
//! whose backend map has another layout started (the `abi-next` rehearsal: `PROXY_BE_V1`
//! becomes `PROXY_BE_V2`), with a backend replaced while neither runs, while both paths
//! connect and hold a long-lived connection each.
//! Then a downgrade to the first build, which must refuse to start and leave the datapath
//! serving, and the newer build started again.

use std::{
    path::Path,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use super::{bed::Bed, probe::monotonic_ns, verdict::Epoch};

/// The map the rehearsal changes, before and after.
const OLD_PIN: &str = "PROXY_BE_V1";
const NEW_PIN: &str = "PROXY_BE_V2";

#[derive(Clone, Debug, Serialize)]
pub struct MigrateReport {
    pub seconds: f64,
    /// From SIGTERM to the new build ready.
    pub upgrade_ms: f64,
    /// Map entries the new build's first sync wrote: the backend replaced while it was down
    /// (the carried entries are not the sync's).
    pub upgrade_map_writes: u64,
    /// Entries carried from the old backend map, as the new build logged them.
    pub carried: Option<u64>,
    /// The directory's pins before the upgrade and after it.
    pub pins_before: Vec<String>,
    pub pins_after: Vec<String>,
    /// The older build's exit code and error line, started on the newer build's pins.
    pub downgrade_exit: Option<i32>,
    pub downgrade_error: String,
    /// Map entries the newer build wrote when started again after the refused downgrade.
    pub restart_map_writes: u64,
    pub paths: Vec<super::PathReport>,
    /// What did not hold (empty: all of it did).
    pub problems: Vec<String>,
}

const UP: Duration = Duration::from_millis(700);

pub fn run(bed: &mut Bed, next: &Path) -> anyhow::Result<MigrateReport> {
    let first = bed.agent_bin.clone();
    let ips = bed.pod_ips(&[0, 1, 2]);
    let three = bed.names(&ips);
    bed.set_web(&ips, &[])?;
    bed.wait_web(&three, Duration::from_secs(5))
        .context("web was never programmed")?;
    let mut epochs = vec![Epoch {
        written_ns: 0,
        applied_ns: Some(0),
        backends: three,
    }];
    let mut problems = Vec::new();
    let pins_before = bed.pin_names()?;
    if !pins_before.iter().any(|p| p == OLD_PIN) {
        problems.push(format!("{OLD_PIN} was not pinned before the upgrade"));
    }
    let probes = bed.start_probes(Duration::from_secs(120))?;
    let start = Instant::now();
    sleep(UP);

    // The upgrade, as a rolling update does it, with a backend replaced while neither build
    // runs: the new one carries the old state, attaches, then writes the change.
    let t = Instant::now();
    if !bed.terminate_agent() {
        problems.push("SIGTERM: the agent did not exit within 10 s".into());
    }
    let after = bed.pod_ips(&[0, 1, 4]);
    let written_ns = monotonic_ns();
    bed.set_web(&after, &[])?;
    bed.agent_bin = next.to_path_buf();
    bed.start_agent().context("the newer build did not start")?;
    // Programmed by the first sync, before ready (the maps cannot be read back here: their
    // layout is the newer build's), so in force from then at the latest.
    epochs.push(Epoch {
        written_ns,
        applied_ns: Some(monotonic_ns()),
        backends: bed.names(&after),
    });
    let upgrade_ms = t.elapsed().as_secs_f64() * 1e3;
    let upgrade_map_writes = bed.map_writes()?;
    let log = bed.agent_log();
    let carried = (log.lines())
        .find(|l| l.contains("carried a previous layout") && l.contains(OLD_PIN))
        .and_then(|l| field(l, "entries"));
    match carried {
        Some(n) if n > 0 => {}
        _ => problems.push(format!(
            "the newer build carried nothing from {OLD_PIN}:\n{log}"
        )),
    }
    // The replaced backend: a backend, a slot; the old backend's deletion. The carried
    // entries are not the sync's.
    if !(1..=8).contains(&upgrade_map_writes) {
        problems.push(format!(
            "the newer build's first sync wrote {upgrade_map_writes} entries, not the replaced backend's"
        ));
    }
    let pins_after = bed.pin_names()?;
    if pins_after.iter().any(|p| p == OLD_PIN) || !pins_after.iter().any(|p| p == NEW_PIN) {
        problems.push(format!(
            "after the upgrade the pins are {pins_after:?}: {NEW_PIN} expected, {OLD_PIN} removed"
        ));
    }
    sleep(UP);

    // The downgrade: refused, touching nothing; the datapath serves meanwhile.
    if !bed.terminate_agent() {
        problems.push("SIGTERM: the newer build did not exit within 10 s".into());
    }
    let mut older = bed.spawn_agent(&first)?;
    let downgrade_exit = older.wait_exit_within(Duration::from_secs(20));
    let older_log = older.log_text();
    drop(older);
    let downgrade_error = (older_log.lines())
        .find(|l| l.contains("downgrade"))
        .unwrap_or_default()
        .to_string();
    if downgrade_exit.is_none_or(|c| c == 0)
        || !downgrade_error.contains(NEW_PIN)
        || !downgrade_error.contains(OLD_PIN)
    {
        problems.push(format!(
            "the older build was not refused naming {NEW_PIN} and {OLD_PIN} (exit {downgrade_exit:?}):\n{older_log}"
        ));
    }
    if bed.pin_names()? != pins_after {
        problems.push(format!(
            "the refused downgrade changed the pins: {:?} -> {:?}",
            pins_after,
            bed.pin_names()?
        ));
    }
    sleep(UP);
    bed.start_agent()
        .context("the newer build did not start again")?;
    let restart_map_writes = bed.map_writes()?;
    if restart_map_writes > 0 {
        problems.push(format!(
            "the newer build started again on unchanged input wrote {restart_map_writes} entries"
        ));
    }
    sleep(UP);

    let seconds = start.elapsed().as_secs_f64();
    let paths = super::finish(probes, &epochs)?;
    problems.extend(paths.iter().flat_map(super::PathReport::problems));
    Ok(MigrateReport {
        seconds,
        upgrade_ms,
        upgrade_map_writes,
        carried,
        pins_before,
        pins_after,
        downgrade_exit,
        downgrade_error,
        restart_map_writes,
        paths,
        problems,
    })
}

/// `name=N` in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
