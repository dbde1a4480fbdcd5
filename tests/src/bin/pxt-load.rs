//! `pxt-load`: the benchmark's load generator (see `proxy_tests::bench::load`). Prints one
//! JSON result line. Run inside the client pod (its netns, and its cgroup for the socket path).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use proxy_tests::bench::load::{self, Mode, Pick};

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Where to connect; repeat to spread operations over several.
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// How each TCP connection's target is chosen.
    #[arg(long, value_enum, default_value = "rotate")]
    pick: Pick,
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    #[arg(long, default_value_t = 3000)]
    duration_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.duration_ms > 0 && a.duration_ms <= 120_000,
        "--duration-ms: 1..120000"
    );
    anyhow::ensure!((1..=64).contains(&a.workers), "--workers: 1..64");
    let r = load::run(
        a.mode,
        &a.target,
        a.pick,
        a.workers,
        Duration::from_millis(a.warmup_ms),
        Duration::from_millis(a.duration_ms),
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
