//! `pxt-probe`: the chaos load (see `proxy_tests::chaos::probe`). Run inside the client pod;
//! connects until its stdin closes (or `--max-ms`), then prints one JSON result.

use std::{
    io::Read as _,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use clap::Parser;
use proxy_tests::chaos::probe;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    target: SocketAddr,
    /// Also hold one long-lived connection to this echo server.
    #[arg(long)]
    echo: Option<SocketAddr>,
    /// Connects per second, paced (never a catch-up burst).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// A bound on the run, whatever stdin does.
    #[arg(long, default_value_t = 600_000)]
    max_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!((1..=100_000).contains(&a.rate), "--rate: 1..100000");
    anyhow::ensure!((1..=64).contains(&a.workers), "--workers: 1..64");
    anyhow::ensure!(a.max_ms <= 3_600_000, "--max-ms: at most an hour");
    static STOP: AtomicBool = AtomicBool::new(false);
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        // EOF (or an error): the driver is done.
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        STOP.store(true, Ordering::Relaxed);
    });
    let r = probe::run(
        a.target,
        a.rate,
        a.workers,
        a.echo,
        &STOP,
        Duration::from_millis(a.max_ms),
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
