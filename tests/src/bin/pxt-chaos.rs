//! `pxt-chaos`: run by `cargo xtask chaos` (as root). Restarts and upgrades the agent, churns
//! endpoints, then upgrades it across a map layout change (and refuses the downgrade), while a
//! client pod connects through both datapaths; prints what it saw and exits non-zero if a
//! connect failed, reached a wrong backend, or a long-lived connection broke.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use proxy_tests::chaos::{self, bed::Bed, churn, migrate, restart};

#[derive(Parser)]
struct Args {
    /// The agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// The `pxt-probe` binary.
    #[arg(long)]
    probe: PathBuf,
    /// An agent built with `--features abi-next` (another backend map layout): the last
    /// scenario upgrades to it under load and tries the downgrade back (skipped without).
    #[arg(long)]
    next_agent: Option<PathBuf>,
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

    let m = match &a.next_agent {
        Some(next) => {
            eprintln!("chaos: upgrade across a map layout change, then the downgrade ...");
            let m = migrate::run(&mut bed, next)?;
            println!(
                "\n## Upgrade across a map layout change under load ({} -> {}), then the downgrade, {:.1} s\n",
                m.pins_before
                    .iter()
                    .find(|p| p.starts_with("PROXY_BE_"))
                    .map_or("?", |p| p.as_str()),
                m.pins_after
                    .iter()
                    .find(|p| p.starts_with("PROXY_BE_"))
                    .map_or("?", |p| p.as_str()),
                m.seconds
            );
            print!("{}", chaos::table(&m.paths));
            println!(
                "\nSIGTERM -> newer build ready: {:.0} ms; backends carried over: {}; entries its first sync wrote (a backend replaced while down): {}. The older build on the newer pins: exit {:?}, `{}`. The newer build started again wrote {}.",
                m.upgrade_ms,
                m.carried.map_or("?".into(), |n| n.to_string()),
                m.upgrade_map_writes,
                m.downgrade_exit,
                m.downgrade_error.trim(),
                m.restart_map_writes
            );
            Some(m)
        }
        None => {
            println!("\n(no --next-agent: the upgrade across a map layout change was not run)");
            None
        }
    };

    if let Some(path) = &a.json {
        let all = serde_json::json!({ "restart": r, "churn": c, "migrate": m });
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    let (m_paths, m_problems) = m.map_or((vec![], vec![]), |m| (m.paths, m.problems));
    for p in r.paths.iter().chain(&c.paths).chain(&m_paths) {
        for e in &p.verdict.slow_examples {
            eprintln!("slow ({}): {e}", p.path.label());
        }
    }
    let problems: Vec<&String> = (r.problems.iter())
        .chain(&c.problems)
        .chain(&m_problems)
        .collect();
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
