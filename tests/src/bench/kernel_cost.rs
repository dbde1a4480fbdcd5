//! In-kernel cost of our programs: BPF run-time statistics (the BPF_ENABLE_STATS file
//! descriptor, so they are switched off again when it closes, even if the bench dies), read
//! through the programs behind our pinned links.

use std::path::PathBuf;

use anyhow::Context as _;
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
    sys::{Stats, enable_stats},
};
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelCost {
    /// Program runs during the window (all programs of the row).
    pub runs: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    /// Operations (connections) the load generator completed in the window.
    pub ops: u64,
    pub runs_per_op: f64,
    pub ns_per_op: f64,
}

fn program_ids(links: &[PathBuf]) -> anyhow::Result<Vec<u32>> {
    links
        .iter()
        .map(|p| {
            let link: FdLink = PinnedLink::from_pin(p)
                .with_context(|| format!("opening {}", p.display()))?
                .into();
            Ok(link.info()?.program_id())
        })
        .collect()
}

/// (runs, run time) summed over `ids`.
fn totals(ids: &[u32]) -> (u64, u64) {
    loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .fold((0, 0), |(n, t), p| {
            (n + p.run_count(), t + p.run_time().as_nanos() as u64)
        })
}

/// Runs `work` (which returns the operations it completed) with run-time statistics on.
pub fn during(
    links: &[PathBuf],
    work: impl FnOnce() -> anyhow::Result<u64>,
) -> anyhow::Result<KernelCost> {
    let ids = program_ids(links)?;
    let stats = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let (n0, t0) = totals(&ids);
    let ops = work()?;
    let (n1, t1) = totals(&ids);
    drop(stats);
    let (runs, run_time_ns) = (n1 - n0, t1 - t0);
    Ok(KernelCost {
        runs,
        run_time_ns,
        ns_per_run: run_time_ns as f64 / runs.max(1) as f64,
        ops,
        runs_per_op: runs as f64 / ops.max(1) as f64,
        ns_per_op: run_time_ns as f64 / ops.max(1) as f64,
    })
}
