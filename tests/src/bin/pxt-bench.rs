//! `pxt-bench`: the benchmark behind `cargo xtask bench` (see `proxy_tests::bench`). Root only;
//! every namespace, cgroup and pin it makes is removed when it is done, also on failure.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use proxy_tests::{
    bench::{
        choice_cost,
        controlplane::{self, ControlPlane, Shape},
        dataplane::{self, Row, Settings},
        packet_cost,
        report::{self, Machine, Results},
    },
    host::{require_root, sh},
};

#[derive(Parser)]
struct Args {
    /// The agent binary (release build).
    #[arg(long)]
    agent: PathBuf,
    /// The load generator binary.
    #[arg(long)]
    load: PathBuf,
    /// Where the result JSON and SVG go.
    #[arg(long)]
    out: PathBuf,
    /// A short run (small sizes, 1 s windows): checks the benchmark works, numbers are rough.
    #[arg(long)]
    quick: bool,
    /// Skip the data plane (control plane only).
    #[arg(long)]
    skip_dataplane: bool,
    /// Skip the control plane (data plane only).
    #[arg(long)]
    skip_controlplane: bool,
    /// Data plane sizes (numbers of Services) instead of the defaults, e.g. `--sizes 1,1000`.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Window groups of the interleaved socket-path-vs-direct measurement, per size, instead
    /// of the default (0 skips it).
    #[arg(long)]
    interleaved_windows: Option<usize>,
    /// Data plane rounds instead of the default (more rounds: a steadier median).
    #[arg(long)]
    rounds: Option<usize>,
    /// Only the backend-choice costs (random, ClientIP affinity, Maglev) and the control plane
    /// with and without Maglev (no data-plane load, no kube-proxy loaders).
    #[arg(long)]
    choice_only: bool,
    /// Only the control plane's two sources: the agent through the manifests and through the
    /// Kubernetes API, in one run (no data plane, no Maglev, no kube-proxy loaders).
    #[arg(long)]
    kube_only: bool,
    /// In the control plane, measure only the agent (kube-proxy's loaders take minutes at
    /// 10,000 Services).
    #[arg(long)]
    skip_kube_proxy: bool,
    /// How the run was started, for the result file.
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let first_line = |cmd: &str, args: &[&str]| {
        sh(cmd, args)
            .map(|s| s.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_else(|_| format!("{cmd}: not found"))
    };
    Machine {
        kernel: first_line("uname", &["-r"]),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        memory_gib: mem_kb / (1024.0 * 1024.0),
        iptables: first_line("iptables-restore", &["--version"]),
        nft: first_line("nft", &["--version"]),
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    require_root();
    // SAFETY: set before any thread starts; the test harness's Agent reads it.
    unsafe { std::env::set_var("PROXY_AGENT_BIN", &args.agent) };
    // Rounds: each row is measured that many times, interleaved with the others (so slow
    // drift of the machine hits every row alike), and the median round is reported, with the
    // median of the rounds' ratios to direct (each round's rows against its own direct).
    let (default_sizes, default_rounds, window, warmup, workers, cp_n, cp_m, cp_changes): (
        &[usize],
        usize,
        _,
        _,
        _,
        _,
        _,
        _,
    ) = if args.quick {
        (&[1, 100], 1, 1000, 200, 2, 1000, 10, 20)
    } else {
        (&[1, 1000, 10000], 3, 3000, 500, 4, 10000, 10, 200)
    };
    // Interleaved: 60 groups of three 300 ms windows give the ratio's median within about
    // 1 % on the 2-CPU VM this was made on (its windows spread +-5 %).
    let (default_interleaved, interleaved_ms) = if args.quick { (4, 300) } else { (60, 300) };
    let sizes: &[usize] = args.sizes.as_deref().unwrap_or(default_sizes);
    let rounds = args.rounds.unwrap_or(default_rounds).max(1);
    let settings = Settings {
        load_bin: args.load.clone(),
        workers,
        warmup: Duration::from_millis(warmup),
        duration: Duration::from_millis(window),
        endpoints: 3,
        interleaved_windows: args.interleaved_windows.unwrap_or(default_interleaved),
        interleaved_window: Duration::from_millis(interleaved_ms),
    };
    let mut results = Results {
        date: sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])?
            .trim()
            .to_string(),
        command: args.command.clone(),
        machine: machine(),
        settings: serde_json::json!({
            "quick": args.quick, "sizes": sizes, "rounds": rounds, "endpoints_per_service": 3,
            "window_ms": window, "warmup_ms": warmup, "workers": workers,
            "interleaved": {"windows": settings.interleaved_windows, "window_ms": interleaved_ms},
            "controlplane": {"services": cp_n, "endpoints": cp_m, "changes": cp_changes},
        }),
        dataplane: vec![],
        interleaved: vec![],
        packet_cost: vec![],
        choice_cost: vec![],
        controlplane: None,
    };

    if args.kube_only {
        args.skip_dataplane = true;
        args.skip_kube_proxy = true;
    }
    let skip_load = args.skip_dataplane || args.choice_only;
    for &n in sizes.iter().filter(|_| !skip_load) {
        let mut by_row: Vec<Vec<_>> = Row::ALL.iter().map(|_| Vec::new()).collect();
        for round in 1..=rounds {
            for (i, row) in Row::ALL.into_iter().enumerate() {
                eprintln!("bench: data plane, {n} Services, round {round}/{rounds}, {row} ...");
                let m = dataplane::measure(row, n, &settings)
                    .with_context(|| format!("data plane: {row}, {n} Services"))?;
                eprintln!(
                    "bench:   {:.0} conn/s, p50 {:.0} µs, p99 {:.0} µs",
                    m.tcp.rate, m.tcp.p50_us, m.tcp.p99_us
                );
                by_row[i].push(m);
            }
        }
        results.dataplane.extend(dataplane::summarize(by_row));
        if settings.interleaved_windows > 0 {
            eprintln!(
                "bench: data plane, {n} Services, socket path and direct interleaved ({} x 3 windows) ...",
                settings.interleaved_windows
            );
            let i = dataplane::interleaved(n, &settings)
                .with_context(|| format!("data plane: interleaved, {n} Services"))?;
            eprintln!(
                "bench:   socket path / direct {:.3} ({:.3}-{:.3})",
                i.socket_vs_direct.median, i.socket_vs_direct.q1, i.socket_vs_direct.q3
            );
            results.interleaved.push(i);
        }
    }

    if !args.skip_dataplane {
        eprintln!("bench: packet path per kind of packet (BPF_PROG_TEST_RUN) ...");
        let flows = if args.quick { 2_000 } else { 20_000 };
        if !args.choice_only {
            results.packet_cost = packet_cost::measure(flows).context("packet path per packet")?;
        }
        eprintln!("bench: backend choice per new connection (random, ClientIP, Maglev) ...");
        let connects = if args.quick { 500 } else { 5_000 };
        results.choice_cost =
            choice_cost::measure(connects, flows).context("backend choice per connection")?;
    }

    if !args.skip_controlplane {
        eprintln!("bench: control plane, {cp_n} x {cp_m}, agent ...");
        let agent = controlplane::agent(cp_n, cp_m, cp_changes).context("control plane: agent")?;
        let mut programmers = vec![agent];
        if !args.kube_only {
            eprintln!("bench: control plane, {cp_n} x {cp_m}, agent with Maglev ...");
            programmers.push(
                controlplane::agent_maglev(cp_n, cp_m, cp_changes)
                    .context("control plane: agent, Maglev")?,
            );
        }
        if !args.choice_only {
            eprintln!(
                "bench: control plane, {cp_n} x {cp_m}, agent through the Kubernetes API ..."
            );
            programmers.push(
                controlplane::agent_kube(cp_n, cp_m, cp_changes)
                    .context("control plane: agent, Kubernetes API")?,
            );
        }
        if !args.skip_kube_proxy && !args.choice_only {
            eprintln!("bench: control plane, iptables-restore ...");
            programmers.push(
                controlplane::kube_proxy_shape(Shape::Iptables, cp_n, cp_m, cp_changes)
                    .context("control plane: iptables")?,
            );
            eprintln!("bench: control plane, nft ...");
            programmers.push(
                controlplane::kube_proxy_shape(Shape::Nftables, cp_n, cp_m, cp_changes)
                    .context("control plane: nftables")?,
            );
        }
        results.controlplane = Some(ControlPlane {
            services: cp_n,
            endpoints: cp_m,
            programmers,
        });
    }

    let text = report::tables(&results);
    println!("{text}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stamp = results.date.replace([':', '-'], "");
    let base = args.out.join(format!(
        "bench-{stamp}{}",
        if args.quick { "-quick" } else { "" }
    ));
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(base.with_extension("svg"), report::svg(&results))?;
    std::fs::write(base.with_extension("md"), &text)?;
    println!("bench: wrote {}.{{json,svg,md}}", base.display());
    Ok(())
}
