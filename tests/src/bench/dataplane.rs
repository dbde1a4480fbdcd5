//! Data plane: connection rate and latency through each datapath, side by side on one
//! routed mini-cluster shape (client pod -> node -> backend pods).

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    kernel_cost::{self, KernelCost},
    kube_proxy,
    load::{LoadResult, Mode},
    servers::Greeters,
    workload::{self, Svc},
};
use crate::{
    agent::{Agent, Manifests},
    cluster::Cluster,
    host::{BpffsDir, sh},
    unique,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Row {
    Direct,
    Socket,
    Packet,
    Iptables,
    Nftables,
}

impl Row {
    pub const ALL: [Row; 5] = [
        Row::Direct,
        Row::Socket,
        Row::Packet,
        Row::Iptables,
        Row::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Row::Direct => "direct to pod IP",
            Row::Socket => "this project, socket path",
            Row::Packet => "this project, packet path (TC)",
            Row::Iptables => "kube-proxy iptables shape",
            Row::Nftables => "kube-proxy nftables shape",
        }
    }

    /// UDP request/response is measured for these.
    pub fn has_udp(self) -> bool {
        matches!(self, Row::Direct | Row::Socket | Row::Packet)
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub load_bin: PathBuf,
    pub workers: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub endpoints: usize,
    /// Window groups of [`interleaved`] (0: not measured), and each window's length.
    pub interleaved_windows: usize,
    pub interleaved_window: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub row: Row,
    pub services: usize,
    pub tcp: LoadResult,
    pub udp: Option<LoadResult>,
    /// In-kernel cost of our programs during a separate TCP run (stats on).
    pub kernel: Option<KernelCost>,
    pub setup_seconds: f64,
    /// TCP conn/s of every round (this measurement is the median one).
    pub rounds: Vec<f64>,
    /// Of every round (sorted): the TCP rate over direct's in the same round. The rows of a
    /// round run one after the other, so the machine's drift between rounds cancels out.
    pub vs_direct: Vec<f64>,
}

/// Each row's median round, with its rounds' ratios to direct (see
/// [`Measurement::vs_direct`]). `by_row` holds each row's measurements in round order.
pub fn summarize(by_row: Vec<Vec<Measurement>>) -> Vec<Measurement> {
    let direct: Vec<f64> = by_row
        .iter()
        .find(|rounds| rounds.first().is_some_and(|m| m.row == Row::Direct))
        .map(|rounds| rounds.iter().map(|m| m.tcp.rate).collect())
        .unwrap_or_default();
    by_row
        .into_iter()
        .filter_map(|rounds| {
            let mut ratios: Vec<f64> = rounds
                .iter()
                .zip(&direct)
                .map(|(m, d)| m.tcp.rate / d)
                .collect();
            ratios.sort_by(f64::total_cmp);
            let mut m = median(rounds)?;
            m.vs_direct = ratios;
            Some(m)
        })
        .collect()
}

/// The median round (by TCP rate), carrying every round's rate.
pub fn median(mut rounds: Vec<Measurement>) -> Option<Measurement> {
    rounds.sort_by(|a, b| a.tcp.rate.total_cmp(&b.tcp.rate));
    let rates: Vec<f64> = rounds.iter().map(|m| m.tcp.rate).collect();
    let mid = rounds.len().checked_sub(1)? / 2;
    let mut m = rounds.swap_remove(mid);
    m.rounds = rates;
    Some(m)
}

/// What makes the client's traffic reach the pods in one row; dropped after it.
enum Datapath {
    None,
    Agent {
        _agent: Agent,
        pins: BpffsDir,
        _manifests: Manifests,
    },
    Netfilter,
}

fn in_node(cluster: &Cluster, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let ns = format!("--net={}", cluster.node.path().display());
    let mut all = vec![ns.as_str(), cmd];
    all.extend_from_slice(args);
    sh("nsenter", &all)
}

fn write_manifests(svcs: &[Svc]) -> anyhow::Result<Manifests> {
    let m = Manifests::new()?;
    for s in svcs {
        std::fs::write(m.dir.join(s.file_name()), s.manifest())?;
    }
    Ok(m)
}

fn setup(row: Row, cluster: &Cluster, svcs: &[Svc]) -> anyhow::Result<Datapath> {
    Ok(match row {
        Row::Direct => Datapath::None,
        Row::Socket | Row::Packet => {
            let manifests = write_manifests(svcs)?;
            let pins = BpffsDir::new(&unique("bench"));
            let dir = manifests.dir.as_os_str();
            let agent = if row == Row::Socket {
                Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins)?
            } else {
                Agent::start_in(
                    Some(&cluster.node.path()),
                    &[
                        "--manifests".as_ref(),
                        dir,
                        "--tc-interface".as_ref(),
                        "vclient".as_ref(),
                        "--tc-interface".as_ref(),
                        "vpod*".as_ref(),
                    ],
                    &cluster.cgroup_path(),
                    &pins,
                )?
            };
            Datapath::Agent {
                _agent: agent,
                pins,
                _manifests: manifests,
            }
        }
        Row::Iptables => {
            let path = std::env::temp_dir().join(format!("{}.rules", unique("ipt")));
            std::fs::write(
                &path,
                kube_proxy::iptables_full(&workload::ports(svcs), workload::CLUSTER_CIDR),
            )?;
            let r = in_node(
                cluster,
                "iptables-restore",
                &[path.to_str().expect("utf-8")],
            );
            let _ = std::fs::remove_file(&path);
            r?;
            Datapath::Netfilter
        }
        Row::Nftables => {
            let path = std::env::temp_dir().join(format!("{}.nft", unique("nft")));
            std::fs::write(
                &path,
                kube_proxy::nft_full(
                    &workload::ports(svcs),
                    workload::CLUSTER_CIDR,
                    workload::SERVICE_CIDR,
                ),
            )?;
            let r = in_node(cluster, "nft", &["-f", path.to_str().expect("utf-8")]);
            let _ = std::fs::remove_file(&path);
            r?;
            Datapath::Netfilter
        }
    })
}

/// Runs `pxt-load` as the client pod: in its cgroup (socket path) or only its netns.
fn load(
    cluster: &Cluster,
    hooked: bool,
    s: &Settings,
    mode: Mode,
    targets: &[SocketAddr],
    (warmup, duration): (Duration, Duration),
) -> anyhow::Result<LoadResult> {
    let mut cmd: Command = if hooked {
        cluster.client_command(&s.load_bin)
    } else {
        cluster.client_command_unhooked(&s.load_bin)
    };
    cmd.arg("--mode")
        .arg(match mode {
            Mode::Tcp => "tcp",
            Mode::Udp => "udp",
        })
        // Direct spreads connections over the pods at random, as every other row's load
        // balancing does: taken in turn, 4 closed-loop workers on 3 pods would be spread more
        // evenly than any Service can be, and direct would also be measuring that.
        .arg("--pick")
        .arg("random")
        .arg("--workers")
        .arg(s.workers.to_string())
        .arg("--warmup-ms")
        .arg(warmup.as_millis().to_string())
        .arg("--duration-ms")
        .arg(duration.as_millis().to_string());
    for t in targets {
        cmd.arg("--target").arg(t.to_string());
    }
    let out = cmd.output().context("running pxt-load")?;
    if !out.status.success() {
        bail!(
            "pxt-load failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let r: LoadResult = serde_json::from_slice(&out.stdout).context("pxt-load output")?;
    if r.ops == 0 {
        bail!("no operation succeeded ({} errors)", r.errors);
    }
    Ok(r)
}

/// A routed cluster with three greeting pods, and `n` Services on them.
fn cluster_with_pods(n: usize, s: &Settings) -> anyhow::Result<(Cluster, Vec<Greeters>, Vec<Svc>)> {
    let mut cluster = Cluster::routed(0)?;
    let mut greeters = Vec::new();
    for _ in 0..3 {
        let pod = cluster.add_routed_pod_without_servers()?;
        greeters.push(Greeters::start(
            &pod.netns.path(),
            &pod.name,
            workload::TCP_TARGET_PORT,
            workload::UDP_TARGET_PORT,
            2,
        )?);
    }
    let pods: Vec<Ipv4Addr> = cluster.pods.iter().map(|p| p.ip).collect();
    let svcs = workload::services(n, s.endpoints, Some(&pods));
    Ok((cluster, greeters, svcs))
}

/// One row at one size, on a fresh cluster (so no row inherits another's conntrack or hooks).
pub fn measure(row: Row, n: usize, s: &Settings) -> anyhow::Result<Measurement> {
    let (cluster, greeters, svcs) = cluster_with_pods(n, s)?;
    let pods: Vec<Ipv4Addr> = cluster.pods.iter().map(|p| p.ip).collect();
    let target = svcs.last().expect("n >= 1");
    let started = std::time::Instant::now();
    let dp = setup(row, &cluster, &svcs)?;
    let setup_seconds = started.elapsed().as_secs_f64();
    let (tcp_targets, udp_targets): (Vec<SocketAddr>, Vec<SocketAddr>) = match row {
        // The physical limit: the same three pods, no translation.
        Row::Direct => (
            pods.iter()
                .map(|ip| SocketAddr::from((*ip, workload::TCP_TARGET_PORT)))
                .collect(),
            pods.iter()
                .map(|ip| SocketAddr::from((*ip, workload::UDP_TARGET_PORT)))
                .collect(),
        ),
        _ => (
            vec![SocketAddr::from((target.vip, workload::TCP_PORT))],
            vec![SocketAddr::from((target.vip, workload::UDP_PORT))],
        ),
    };
    let hooked = row == Row::Socket;
    let window = (s.warmup, s.duration);
    let tcp = load(&cluster, hooked, s, Mode::Tcp, &tcp_targets, window)?;
    let udp = if row.has_udp() {
        Some(load(&cluster, hooked, s, Mode::Udp, &udp_targets, window)?)
    } else {
        None
    };
    let kernel = match &dp {
        Datapath::Agent { pins, .. } => {
            let links = links_of(&pins.path, row)?;
            // No warm-up here: every program run in the window belongs to a counted connection.
            let short = (Duration::ZERO, s.duration.min(Duration::from_secs(2)));
            Some(kernel_cost::during(&links, || {
                load(&cluster, hooked, s, Mode::Tcp, &tcp_targets, short).map(|r| r.ops)
            })?)
        }
        _ => None,
    };
    drop(dp);
    drop(greeters);
    Ok(Measurement {
        row,
        services: n,
        tcp,
        udp,
        kernel,
        setup_seconds,
        rounds: vec![],
        vs_direct: vec![],
    })
}

/// Who connects in a window of [`interleaved`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// Outside the hooked cgroup, to the pod IPs: no program runs.
    Direct,
    /// In the hooked cgroup, to the ClusterIP: the socket path.
    Socket,
    /// In the hooked cgroup, to the pod IPs: the hook runs and translates nothing.
    HookedDirect,
}

/// The socket path against direct, measured so that a few percent can be seen: the rows of
/// [`measure`] each run on their own cluster, whose rate differs by several percent from the
/// next one's (as do rounds), which hides an effect of 2-3 %. Here one cluster with the agent
/// loaded serves three clients in turn, in short windows and rotating order, and each group
/// of three windows gives one ratio: drift of the machine over seconds cancels out.
#[derive(Clone, Debug, Serialize)]
pub struct Interleaved {
    pub services: usize,
    pub windows: usize,
    pub window_ms: u64,
    /// Mean conn/s of each client's windows.
    pub direct: f64,
    pub socket: f64,
    pub hooked_direct: f64,
    /// Socket path over direct, per window group.
    pub socket_vs_direct: Spread,
    /// Pod IPs from the hooked cgroup over direct: what the hook costs a connection it does
    /// not translate.
    pub hooked_vs_direct: Spread,
}

/// Median and quartiles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
}

impl Spread {
    /// None for no values. Quartiles by linear interpolation between the sorted values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| -> Option<f64> {
            let pos = q * (v.len().checked_sub(1)? as f64);
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
        };
        Some(Spread {
            median: at(0.5)?,
            q1: at(0.25)?,
            q3: at(0.75)?,
        })
    }
}

/// One group's rates, `[direct, socket, hooked direct]`, to the two ratios' spreads.
fn interleaved_ratios(groups: &[[f64; 3]]) -> Option<(Spread, Spread)> {
    let ratio = |i: usize| -> Vec<f64> { groups.iter().map(|g| g[i] / g[0]).collect() };
    Some((Spread::of(&ratio(1))?, Spread::of(&ratio(2))?))
}

/// See [`Interleaved`].
pub fn interleaved(n: usize, s: &Settings) -> anyhow::Result<Interleaved> {
    let (cluster, greeters, svcs) = cluster_with_pods(n, s)?;
    let target = svcs.last().expect("n >= 1");
    let dp = setup(Row::Socket, &cluster, &svcs)?;
    let pods: Vec<SocketAddr> = cluster
        .pods
        .iter()
        .map(|p| SocketAddr::from((p.ip, workload::TCP_TARGET_PORT)))
        .collect();
    let vip = [SocketAddr::from((target.vip, workload::TCP_PORT))];
    // Long enough for the workers to start; every window is a new process.
    let window = (Duration::from_millis(50), s.interleaved_window);
    let clients = [Client::Direct, Client::Socket, Client::HookedDirect];
    let mut groups = Vec::with_capacity(s.interleaved_windows);
    for g in 0..s.interleaved_windows {
        let mut rates = [0.0; 3];
        // Rotating order: no client is always the one after another.
        for i in 0..clients.len() {
            let c = (g + i) % clients.len();
            let (hooked, targets): (bool, &[SocketAddr]) = match clients[c] {
                Client::Direct => (false, &pods),
                Client::Socket => (true, &vip),
                Client::HookedDirect => (true, &pods),
            };
            rates[c] = load(&cluster, hooked, s, Mode::Tcp, targets, window)?.rate;
        }
        groups.push(rates);
    }
    drop(dp);
    drop(greeters);
    let (socket_vs_direct, hooked_vs_direct) =
        interleaved_ratios(&groups).context("no window measured")?;
    let mean = |i: usize| groups.iter().map(|g| g[i]).sum::<f64>() / groups.len() as f64;
    Ok(Interleaved {
        services: n,
        windows: groups.len(),
        window_ms: s.interleaved_window.as_millis() as u64,
        direct: mean(0),
        socket: mean(1),
        hooked_direct: mean(2),
        socket_vs_direct,
        hooked_vs_direct,
    })
}

/// The pinned links of the programs a row exercises.
fn links_of(pins: &Path, row: Row) -> anyhow::Result<Vec<PathBuf>> {
    let dir = pins.join("links");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let wanted = match row {
            Row::Socket => !name.starts_with("tc_"),
            Row::Packet => name.starts_with("tc_"),
            _ => false,
        };
        if wanted {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rate: f64) -> Measurement {
        Measurement {
            row: Row::Direct,
            services: 1,
            tcp: LoadResult {
                rate,
                ..Default::default()
            },
            udp: None,
            kernel: None,
            setup_seconds: 0.0,
            rounds: vec![],
            vs_direct: vec![],
        }
    }

    #[test]
    fn the_median_round_is_reported_with_every_round() {
        let got = median(vec![m(3.0), m(1.0), m(2.0)]).unwrap();
        assert_eq!((got.tcp.rate, got.rounds), (2.0, vec![1.0, 2.0, 3.0]));
        assert_eq!(median(vec![m(5.0)]).unwrap().tcp.rate, 5.0);
        assert!(median(vec![]).is_none());
    }

    #[test]
    fn spreads_are_medians_and_interpolated_quartiles() {
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!(
            s,
            Spread {
                median: 3.0,
                q1: 2.0,
                q3: 4.0
            }
        );
        let s = Spread::of(&[1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.q1, s.q3), (1.5, 1.25, 1.75));
        assert_eq!(Spread::of(&[7.0]).unwrap().q1, 7.0);
        assert!(Spread::of(&[]).is_none());
    }

    /// Each window group is its own ratio: a slow group counts as much as a fast one, and the
    /// means of the rates (which a slow group would pull) are not what is compared.
    #[test]
    fn interleaved_ratios_are_taken_within_each_group() {
        let (socket, hooked) =
            interleaved_ratios(&[[100.0, 98.0, 99.0], [50.0, 49.0, 50.0], [80.0, 76.0, 80.0]])
                .unwrap();
        let r = |s: Spread| format!("{:.4} {:.4} {:.4}", s.median, s.q1, s.q3);
        assert_eq!(r(socket), "0.9800 0.9650 0.9800");
        assert_eq!(r(hooked), "1.0000 0.9950 1.0000");
        assert!(interleaved_ratios(&[]).is_none());
    }

    /// Rounds pair up by their order: a round where the machine was slow for every row counts
    /// as the same ratio as a fast one.
    #[test]
    fn ratios_to_direct_pair_rows_by_round() {
        let row = |row, rates: &[f64]| -> Vec<Measurement> {
            rates.iter().map(|r| Measurement { row, ..m(*r) }).collect()
        };
        let got = summarize(vec![
            row(Row::Direct, &[100.0, 50.0, 80.0]),
            row(Row::Socket, &[99.0, 49.0, 79.0]),
        ]);
        assert_eq!(got[0].vs_direct, vec![1.0, 1.0, 1.0]);
        let ratios: Vec<String> = got[1].vs_direct.iter().map(|r| format!("{r:.4}")).collect();
        assert_eq!(ratios, ["0.9800", "0.9875", "0.9900"]);
        // The medians alone (79 over 80) would agree here, but not under drift within the
        // run: the pairing is what the column reports.
        assert_eq!(got[1].tcp.rate, 79.0);
    }
}
