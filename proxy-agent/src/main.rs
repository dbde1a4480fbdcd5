use std::{
    io::{self, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use proxy_agent::{capacity, inspect, loader, model::Algorithm, run, status};

// A cold start parses thousands of small YAML files on every core, then builds the model: both
// allocate many short-lived objects, where mimalloc's per-thread heaps take about a quarter off
// the time glibc's malloc needs (measured on the bench's 10k Services).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc gives freed memory back to the system `purge_delay` ms after it is freed (1000 by
/// default in mimalloc 3). A cold start frees about as fast as it allocates: with the default,
/// its peak RSS varied from 84 to 98 MiB at 10k Services; with 10 ms it stays at 80 MiB, as
/// fast (1 ms: 79 MiB, but slower).
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return; // the operator's choice
    }
    // `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3); the Rust bindings name
    // only some options.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a plain option value; no allocation is affected retroactively.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
}

/// eBPF ClusterIP load balancing: keeps the datapath's maps equal to the cluster's Services.
#[derive(Parser)]
#[command(name = "proxy-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines (stderr) are written: text, or one JSON object a line with the same
    /// fields.
    #[arg(long, global = true, value_enum, default_value_t = proxy_agent::logging::Format::Text)]
    log_format: proxy_agent::logging::Format,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath and keep it in sync with a source.
    #[command(after_help = "\
Examples:
  proxy-agent run --manifests /etc/proxy/manifests --cgroup /sys/fs/cgroup/kubepods.slice
  proxy-agent run --kubeconfig ~/.kube/config --tc-interface 'veth*' --lb-algorithm maglev
  proxy-agent run   # in a pod: the in-cluster config, NODE_NAME from the downward API")]
    Run(Box<RunArgs>),
    /// Print the frontends and backends programmed in the pinned maps, with the Service and
    /// port name each is for and why it is in its state, asked from the running agent
    /// (its /debug/services); without the agent, from the maps alone.
    #[command(after_help = "\
Examples:
  proxy-agent services
  proxy-agent services --service kube-system/kube-dns
  proxy-agent services --vip 10.96.0.10 -o json | jq '.services[0].reason'
  proxy-agent services --no-agent --bpffs-dir /sys/fs/bpf/proxy")]
    Services {
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Only the frontends of this Service (needs the running agent, which has the names).
        #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_service_name)]
        service: Option<String>,
        /// Only the frontends of this ClusterIP.
        #[arg(long, value_name = "IP")]
        vip: Option<std::net::Ipv4Addr>,
        /// The running agent's --metrics-addr, where it serves /debug/services.
        #[arg(long, default_value = "127.0.0.1:10249")]
        agent_addr: SocketAddr,
        /// Do not ask the agent: the maps alone, without names.
        #[arg(long, conflicts_with = "service")]
        no_agent: bool,
    },
    /// What this kernel offers the datapath, the program variants the agent would load, and
    /// how the packet-path program is attached to the interfaces matching GLOBs (all, when none
    /// is given). Needs root (the probes load programs).
    #[command(after_help = "\
Examples:
  proxy-agent status
  proxy-agent status --interface 'veth*' -o json")]
    Status {
        /// Interfaces to report on (names or globs, as `--tc-interface`).
        #[arg(long = "interface", value_name = "GLOB")]
        interfaces: Vec<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show or set the level the running programs log at (forwarded into the agent's log),
    /// at once and without reloading them: it is a pinned map they read.
    #[command(after_help = "\
Examples:
  proxy-agent bpf-log-level            # the current level
  proxy-agent bpf-log-level info       # refused connects are logged by the agent
  proxy-agent bpf-log-level off --bpffs-dir /sys/fs/bpf/proxy")]
    BpfLogLevel {
        /// The new level (none: print the current one).
        #[arg(value_enum)]
        level: Option<proxy_agent::bpf_log::Level>,
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Detach the programs and remove the pinned maps and links, and this agent's tc filters
    /// (kernels without TCX) from the interfaces of this network namespace.
    #[command(after_help = "\
Examples:
  proxy-agent cleanup
  proxy-agent cleanup --bpffs-dir /sys/fs/bpf/proxy-test")]
    Cleanup {
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Directory of Service / EndpointSlice / Node manifests (YAML or JSON).
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Manifest files larger than this many bytes are refused (reported; their last good
    /// objects stay): parsing one costs several times its size in memory.
    #[arg(long, default_value_t = proxy_agent::source::manifests::DEFAULT_MAX_FILE_BYTES)]
    max_manifest_bytes: u64,
    /// Kubeconfig of the cluster to watch (neither flag: in-cluster config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// How the Kubernetes API source gets its lists: `streaming` (a watch with
    /// sendInitialEvents, from the API server's watch cache, programmed as objects arrive;
    /// falls back to `list` where the server refuses it) or `list` (resourceVersion=0 lists,
    /// from the watch cache).
    #[arg(long, value_enum, default_value = "streaming")]
    kube_initial_list: proxy_agent::source::kube::watch::InitialList,
    /// This node's name, for internalTrafficPolicy: Local and topology hints.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// cgroup v2 directory to attach the socket programs to (default: the cgroup2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Where /healthz and /livez are served (kube-proxy's port).
    #[arg(long, default_value = "0.0.0.0:10256")]
    health_addr: SocketAddr,
    /// Where /metrics is served (kube-proxy's port).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: SocketAddr,
    /// Full resync period, in seconds (a safety net; changes are applied as they come).
    #[arg(long, default_value_t = 30)]
    sync_period_seconds: u64,
    /// /healthz fails when the last successful sync is older than this, in seconds.
    #[arg(long, default_value_t = 120)]
    healthz_max_age_seconds: u64,
    /// Attach the packet path (TC ingress) to these interfaces: a name or a glob such as
    /// 'veth*'; repeatable. Interfaces that appear later are attached as they come.
    #[arg(long = "tc-interface", value_name = "NAME|GLOB")]
    tc_interfaces: Vec<String>,
    /// What the programs log, forwarded into this log (target `bpf`): `warn` failed map
    /// writes and drops, `info` also refused connects, `debug` also the packet path's
    /// per-packet refusals. Change it later with `proxy-agent bpf-log-level`.
    #[arg(long, value_enum, default_value_t = proxy_agent::bpf_log::Level::Off)]
    bpf_log_level: proxy_agent::bpf_log::Level,
    #[command(flatten)]
    conntrack: ConntrackArgs,
    #[command(flatten)]
    choice: ChoiceArgs,
    #[command(flatten)]
    capacity: CapacityArgs,
}

/// How many entries the maps hold. A map gets its size when it is created: an agent started
/// with other sizes than the pinned maps have is refused (start it with theirs, or run
/// `proxy-agent cleanup` first). A Service that does not fit is refused whole, reported, and
/// programmed as soon as there is room.
#[derive(clap::Args)]
struct CapacityArgs {
    /// Service map entries: one per Service port plus one per backend of it.
    #[arg(long, default_value_t = proxy_common::SVC_MAP_ENTRIES, value_parser = entries)]
    max_services: u32,
    /// Distinct backends (pod IP, port, protocol) over all Services.
    #[arg(long, default_value_t = proxy_common::BACKEND_MAP_ENTRIES, value_parser = entries)]
    max_backends: u32,
    /// Frontends (Service ports, each with its ClusterIP); at most 65535.
    #[arg(long, default_value_t = proxy_common::REV_NAT_MAP_ENTRIES,
          value_parser = clap::value_parser!(u32)
              .range(i64::from(capacity::MIN_ENTRIES)..=i64::from(capacity::MAX_FRONTENDS)))]
    max_frontends: u32,
    /// Packet-path conntrack entries, two per flow; when full, the least recently used
    /// flows are evicted.
    #[arg(long, default_value_t = proxy_common::CT_MAP_ENTRIES, value_parser = entries)]
    max_conntrack: u32,
    /// ClientIP affinity records (client x Service port); when full, the least recently
    /// used are forgotten.
    #[arg(long, default_value_t = proxy_common::AFFINITY_MAP_ENTRIES, value_parser = entries)]
    max_affinity: u32,
}

fn entries(s: &str) -> Result<u32, String> {
    let (min, max) = (capacity::MIN_ENTRIES, capacity::MAX_ENTRIES);
    match s.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: must be a number from {min} to {max}")),
    }
}

impl CapacityArgs {
    fn capacity(&self) -> capacity::Capacity {
        capacity::Capacity {
            services: self.max_services,
            backends: self.max_backends,
            frontends: self.max_frontends,
            conntrack: self.max_conntrack,
            affinity: self.max_affinity,
        }
    }
}

/// How a backend is chosen for a new connection (after ClientIP affinity).
#[derive(clap::Args)]
struct ChoiceArgs {
    /// For Services without the `service.ebpf-proxy.io/lb-algorithm` annotation.
    #[arg(long, value_enum, default_value_t = Algorithm::Random)]
    lb_algorithm: Algorithm,
    /// Entries per Maglev table: a prime (more entries, less disruption when backends
    /// change; 4 bytes each).
    #[arg(long, default_value_t = proxy_agent::maglev::DEFAULT_TABLE_SIZE,
          value_parser = table_size)]
    maglev_table_size: u32,
    /// How many frontends (Service ports) can use Maglev at once; the map takes
    /// tables x size x 4 bytes. Beyond it, a frontend falls back to random (logged).
    #[arg(long, default_value_t = proxy_common::MAGLEV_DEFAULT_TABLES as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    maglev_tables: u16,
}

fn table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    proxy_agent::maglev::validate_table_size(n).map_err(|e| e.to_string())
}

/// The packet path's connection tracking: how long an entry lives after its last packet (as
/// kube-proxy's and Cilium's flags; durations such as `90s`, `6h`, `1h30m`).
#[derive(clap::Args)]
struct ConntrackArgs {
    /// A TCP connection opening (SYN seen, not yet an ACK).
    #[arg(long, default_value = "60s", value_parser = lifetime)]
    conntrack_tcp_timeout_syn: u32,
    /// An established TCP connection (kube-proxy's default is 24h, Cilium's 6h).
    #[arg(long, default_value = "6h", value_parser = lifetime)]
    conntrack_tcp_timeout_established: u32,
    /// A TCP connection after a RST, or a FIN from both sides (a half-closed one is
    /// established).
    #[arg(long, default_value = "10s", value_parser = lifetime)]
    conntrack_tcp_timeout_close: u32,
    /// A UDP flow.
    #[arg(long, default_value = "60s", value_parser = lifetime)]
    conntrack_udp_timeout: u32,
    /// How often the agent deletes expired entries.
    #[arg(long, default_value = "10s", value_parser = gc_interval)]
    conntrack_gc_interval: Duration,
}

/// A lifetime in whole seconds: at least 1 s, at most 2^31 s.
fn lifetime(s: &str) -> Result<u32, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    match u32::try_from(d.as_secs()) {
        Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: must be between 1s and {}s", i32::MAX)),
    }
}

/// 1 s to a day: a pass more often is only cost, and less often only lets dead flows fill the
/// map.
fn gc_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{s:?}: must be between 1s and 24h"))
    }
}

impl ConntrackArgs {
    fn timeouts(&self) -> proxy_common::CtTimeouts {
        proxy_common::CtTimeouts {
            syn_s: self.conntrack_tcp_timeout_syn,
            established_s: self.conntrack_tcp_timeout_established,
            closing_s: self.conntrack_tcp_timeout_close,
            udp_s: self.conntrack_udp_timeout,
        }
    }
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

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    proxy_agent::logging::init(cli.log_format);
    match agent(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed, then its causes after colons (a cause may quote input:
            // escaped as the logs are).
            let line = proxy_agent::logging::error_line(cli.log_format, &format!("{e:#}"));
            let _ = writeln!(io::stderr(), "{line}");
            ExitCode::FAILURE
        }
    }
}

/// How long `services` waits for the agent's names before it shows the maps alone: longer
/// than the agent waits for its sync loop (5 s), so its "busy" answer is what is shown.
const ASK_AGENT_WITHIN: Duration = Duration::from_secs(6);

/// `--service`: a Service's `namespace/name`.
fn parse_service_name(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// Writes `text` to stdout. A reader that went away (`proxy-agent services | head -1`) ends
/// the command quietly, with status 0 (a C tool would die of SIGPIPE, just as quietly).
fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => r.context("writing to stdout"),
    }
}

fn agent(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let RunArgs {
                manifests,
                max_manifest_bytes,
                kubeconfig,
                kube_initial_list,
                node_name,
                cgroup,
                bpffs_dir,
                health_addr,
                metrics_addr,
                sync_period_seconds,
                healthz_max_age_seconds,
                tc_interfaces,
                bpf_log_level,
                conntrack,
                choice,
                capacity,
            } = *args;
            if u64::from(choice.maglev_tables) * u64::from(choice.maglev_table_size)
                > u64::from(u32::MAX)
            {
                anyhow::bail!(
                    "--maglev-tables {} x --maglev-table-size {} is more entries than a map holds",
                    choice.maglev_tables,
                    choice.maglev_table_size
                );
            }
            let source = match (manifests, kubeconfig) {
                (Some(dir), _) => {
                    proxy_agent::source::SourceConfig::Manifests(dir, max_manifest_bytes)
                }
                (None, Some(path)) => proxy_agent::source::SourceConfig::Kubeconfig(path),
                (None, None) => proxy_agent::source::SourceConfig::InCluster,
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
                source,
                node_name,
                cgroup,
                bpffs_dir,
                health_addr,
                metrics_addr,
                healthz_max_age: Duration::from_secs(healthz_max_age_seconds),
                resync: Duration::from_secs(sync_period_seconds.max(1)),
                tc_interfaces,
                ct_timeouts: conntrack.timeouts(),
                ct_gc_interval: conntrack.conntrack_gc_interval.max(Duration::from_secs(1)),
                choice: proxy_agent::sync::ChoiceConfig {
                    algorithm: choice.lb_algorithm,
                    maglev_size: choice.maglev_table_size,
                    maglev_tables: choice.maglev_tables,
                },
                capacity: capacity.capacity(),
                kube_initial_list,
                bpf_log_level,
            }))
        }
        Command::Services {
            bpffs_dir,
            output,
            service,
            vip,
            agent_addr,
            no_agent,
        } => {
            // A newer agent's maps: say so, rather than that one of ours is missing.
            proxy_agent::migrate::refuse_newer(&bpffs_dir)?;
            let mut view = inspect::inspect(&bpffs_dir)?;
            if !no_agent {
                match inspect::ask_agent(agent_addr, &bpffs_dir, ASK_AGENT_WITHIN) {
                    Ok(agent) => {
                        view.services = inspect::with_names(view.services, agent);
                        view.names_from = Some(format!("http://{agent_addr}/debug/services"));
                    }
                    Err(e) if service.is_some() => {
                        return Err(e).context(
                            "--service needs the Services' names, which the running agent has",
                        );
                    }
                    Err(e) => view.names_error = Some(e.to_string()),
                }
            }
            let filter = inspect::Filter { service, vip };
            view.services.retain(|v| filter.keeps(v));
            match output {
                Output::Table => out(&inspect::render_table(&view)),
                Output::Json => out(&format!("{}\n", serde_json::to_string_pretty(&view)?)),
            }
        }
        Command::Status { interfaces, output } => {
            let status = status::status(&interfaces)?;
            match output {
                Output::Table => out(&status::render(&status)),
                Output::Json => out(&format!("{}\n", serde_json::to_string_pretty(&status)?)),
            }
        }
        Command::BpfLogLevel { level, bpffs_dir } => {
            use proxy_agent::bpf_log;
            let was = bpf_log::read_level(&bpffs_dir)?;
            match level {
                None => out(&format!("{}\n", was.name())),
                Some(level) => {
                    bpf_log::write_level(&bpffs_dir, level)?;
                    out(&format!(
                        "bpf log level {} (was {}) in {}\n",
                        level.name(),
                        was.name(),
                        bpffs_dir.display()
                    ))
                }
            }
        }
        Command::Cleanup { bpffs_dir } => {
            let done = loader::cleanup(&bpffs_dir)
                .with_context(|| format!("cleaning up {}", bpffs_dir.display()))?;
            let filters = proxy_agent::tc::remove_clsact_filters();
            out(&format!(
                "removed {} links and {} maps from {}, and tc filters from {} interfaces\n",
                done.links.len(),
                done.maps.len(),
                bpffs_dir.display(),
                filters.len()
            ))
        }
    }
}
