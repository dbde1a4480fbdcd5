use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_agent::{inspect, loader, run};

/// eBPF ClusterIP load balancing: keeps the datapath's maps equal to the cluster's Services.
#[derive(Parser)]
#[command(name = "proxy-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath and keep it in sync with a source.
    Run {
        /// Directory of Service / EndpointSlice / Node manifests (YAML or JSON).
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig of the cluster to watch (neither flag: in-cluster config).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name, for internalTrafficPolicy: Local and topology hints.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// cgroup v2 directory to attach the socket programs to (default: the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// bpffs directory for the pinned maps and links.
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Print the frontends and backends programmed in the pinned maps (no agent needed).
    Services {
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach the programs and remove the pinned maps and links.
    Cleanup {
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run {
            manifests,
            kubeconfig,
            node_name,
            cgroup,
            bpffs_dir,
        } => {
            let Some(manifests) = manifests else {
                let which = kubeconfig
                    .map(|k| format!("--kubeconfig {}", k.display()))
                    .unwrap_or("in-cluster config".into());
                bail!(
                    "the Kubernetes API source ({which}) is not available in this version; \
                     run with --manifests DIR"
                );
            };
            let cgroup = match cgroup {
                Some(c) => c,
                None => loader::cgroup2_mount()?,
            };
            let node_name = node_name.unwrap_or_else(hostname);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run::run(run::RunConfig {
                manifests,
                node_name,
                cgroup,
                bpffs_dir,
            }))
        }
        Command::Services { bpffs_dir, output } => {
            let view = inspect::inspect(&bpffs_dir)?;
            match output {
                Output::Table => print!("{}", inspect::render_table(&view)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
            }
            Ok(())
        }
        Command::Cleanup { bpffs_dir } => {
            let done = loader::cleanup(&bpffs_dir)
                .with_context(|| format!("cleaning up {}", bpffs_dir.display()))?;
            println!(
                "removed {} links and {} maps from {}",
                done.links.len(),
                done.maps.len(),
                bpffs_dir.display()
            );
            Ok(())
        }
    }
}
