//! `pxt-chaos`: run by `cargo xtask chaos` (as root). Restarts and upgrades the agent, then
//! churns endpoints, while a client pod connects through both datapaths; prints what it saw
//! and exits non-zero if a connect failed, reached a wrong backend, or a long-lived
//! connection broke.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use proxy_tests::chaos::{self, bed::Bed, churn, restart};

#[derive(Parser)]
struct Args {
    /// The agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// The `pxt-probe` binary.
    #[arg(long)]
    probe: PathBuf,
    /// 3 restarts and 10 s of churn instead of 10 and 60.
    #[arg(long)]
    quick: bool,
    /// SIGKILL restarts before the SIGTERM one.
    #[arg(long)]
    kills: Option<usize>,
    #[arg(long)]
    churn_seconds: Option<u64>,
    /// EndpointSlice updates per second.
    #[arg(long, default_value_t = 20)]
    churn_rate: u32,
    /// Connects per second on each path.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Probe only these paths (repeat; default: both).
    #[arg(long = "path", value_enum)]
    paths: Vec<chaos::bed::Path>,
    /// Both paths' probes from one client pod: its translated and untranslated connections
    /// can then share a wire tuple (a known gap of the packet path, not a restart's or
    /// churn's doing).
    #[arg(long)]
    one_client: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let kills = a.kills.unwrap_or(if a.quick { 3 } else { 10 });
    let churn_s = a.churn_seconds.unwrap_or(if a.quick { 10 } else { 60 });
    anyhow::ensure!(kills <= 100, "--kills: at most 100");
    anyhow::ensure!(churn_s <= 600, "--churn-seconds: at most 600");
    anyhow::ensure!((1..=100).contains(&a.churn_rate), "--churn-rate: 1..100");
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("PROXY_AGENT_BIN", &a.agent) };
    let mut bed = Bed::new(a.probe.clone(), a.rate).context("test bed")?;
    bed.one_client = a.one_client;
    if !a.paths.is_empty() {
        bed.paths = a.paths.clone();
    }

    eprintln!("chaos: {kills} x kill -9 and start, then SIGTERM and start ...");
    let r = restart::run(&mut bed, kills)?;
    println!(
        "\n## Restarts under load: {kills} x kill -9, then SIGTERM, {:.1} s\n",
        r.seconds
    );
    print!("{}", chaos::table(&r.paths));
    let downs: Vec<f64> = r.restarts.iter().map(|x| x.down_ms).collect();
    let unchanged: Vec<u64> = (r.restarts.iter())
        .filter(|x| !x.changed)
        .map(|x| x.map_writes)
        .collect();
    let changed: Vec<u64> = (r.restarts.iter())
        .filter(|x| x.changed)
        .map(|x| x.map_writes)
        .collect();
    println!(
        "\nsignal -> new agent ready: median {:.0} ms, max {:.0} ms. Map entries written by a restart: {:?} on unchanged input, {:?} after a backend was replaced and a Service removed while down.",
        median(&downs),
        downs.iter().copied().fold(0.0, f64::max),
        unchanged,
        changed
    );

    eprintln!(
        "chaos: {churn_s} s of endpoint churn at {}/s ...",
        a.churn_rate
    );
    let c = churn::run(&bed, Duration::from_secs(churn_s), a.churn_rate)?;
    println!(
        "\n## Endpoint churn under load: {} slice updates in {:.1} s ({:.1}/s), {} x scale 3 -> 0 -> 3\n",
        c.updates,
        c.seconds,
        c.updates as f64 / c.seconds,
        c.scale_to_zero
    );
    print!("{}", chaos::table(&c.paths));
    println!(
        "\nwrite -> in the pinned maps: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms. Slowest refusal with no endpoints: {}.",
        c.apply_p50_ms,
        c.apply_p99_ms,
        c.apply_max_ms,
        c.paths
            .iter()
            .map(|p| format!("{:.1} ms ({})", p.verdict.refusal_max_ms, p.path.label()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    if let Some(path) = &a.json {
        let all = serde_json::json!({ "restart": r, "churn": c });
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    for p in r.paths.iter().chain(&c.paths) {
        for e in &p.verdict.slow_examples {
            eprintln!("slow ({}): {e}", p.path.label());
        }
    }
    let problems: Vec<&String> = r.problems.iter().chain(&c.problems).collect();
    if !problems.is_empty() {
        eprintln!("\nchaos: what did not hold:");
        for p in &problems {
            eprintln!("- {p}");
        }
        eprintln!("\nagent log (last run):\n{}", bed.agent_log());
        anyhow::bail!("{} problems", problems.len());
    }
    println!("\nchaos: every guarantee held.");
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
