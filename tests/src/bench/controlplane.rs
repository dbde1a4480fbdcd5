//! Control plane: programming N Services x M endpoints from nothing, then one endpoint change
//! at a time, through the agent's real path (manifest files -> source -> model -> sync -> map
//! writes) and through kube-proxy's two rule loaders (`iptables-restore`, `nft -f`).

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{BACKEND_MAP, Backend, PROTO_TCP, SVC_MAP, ServiceKey, ServiceValue};
use serde::Serialize;

use super::{
    kube_proxy,
    workload::{self, Svc},
};
use crate::{
    agent::{Agent, Manifests},
    apiserver::FakeApiServer,
    host::{BpffsDir, Cgroup, Netns, sh},
    unique,
};

#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].as_secs_f64() * 1e3
        };
        Percentiles {
            samples: v.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Programmer {
    pub name: &'static str,
    /// From nothing to every Service programmed (the median run where there are several).
    pub full_seconds: f64,
    /// Fastest and slowest of the runs (None: one run).
    pub full_range: Option<(f64, f64)>,
    /// The agent's own account of that sync; None for kube-proxy's loaders, whose time is
    /// all in the command.
    pub agent_sync: Option<SyncPhases>,
    pub change: Percentiles,
    /// The agent's own account of one change (median of each phase over the changes'
    /// syncs): the rest of a change's latency is inotify and the reader polling the maps.
    pub agent_change: Option<SyncPhases>,
    pub peak_rss_mib: Option<f64>,
    pub kernel_memory_mib: Option<f64>,
    /// Through the fake API server: its own time (storing writes, building responses) in
    /// the full programming (s) and per change (µs, the mean over the changes).
    pub server: Option<(f64, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints: usize,
    pub programmers: Vec<Programmer>,
}

/// The agent's cold starts measured (each from empty maps); the median is reported. One run
/// varies by ±15 % on a 2-vCPU VM (the files' writeback, the other core's work).
const AGENT_FULL_RUNS: usize = 3;

/// The changes of one programmer stop after this long (the samples taken are reported).
const CHANGES_BUDGET: Duration = Duration::from_secs(90);

/// A deterministic sequence of changes: (Service index, endpoint index, new IP).
fn changes(n: usize, m: usize, count: usize) -> Vec<(usize, usize, Ipv4Addr)> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|c| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 1)) + c as u32);
            ((x % n as u64) as usize, ((x >> 32) % m as u64) as usize, ip)
        })
        .collect()
}

/// The backends the maps hold for `svc`'s TCP frontend.
struct MapReader {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
}

impl MapReader {
    fn open(pins: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| {
            MapData::from_pin(pins.join(name)).with_context(|| format!("opening pinned {name}"))
        };
        Ok(MapReader {
            services: BpfHashMap::try_from(aya::maps::Map::HashMap(open(SVC_MAP)?))?,
            backends: BpfHashMap::try_from(aya::maps::Map::HashMap(open(BACKEND_MAP)?))?,
        })
    }

    fn has_backend(&self, svc: &Svc, ip: Ipv4Addr) -> bool {
        let master = ServiceKey::master(
            u32::from(svc.vip).to_be(),
            workload::TCP_PORT.to_be(),
            PROTO_TCP,
        );
        let key = |slot: u16| master.with_slot(slot);
        let Ok(master) = self.services.get(&key(0), 0) else {
            return false;
        };
        (1..=master.count).any(|slot| {
            self.services
                .get(&key(slot), 0)
                .and_then(|v| self.backends.get(&v.backend_id, 0))
                .is_ok_and(|b| b.addr_be == u32::from(ip).to_be())
        })
    }
}

fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Kernel memory of the pinned maps, as `bpftool map show` reports it (memlock).
fn maps_memlock_mib(pins: &Path) -> anyhow::Result<f64> {
    let mut total = 0u64;
    for name in proxy_common::MAPS.iter().map(|m| m.name) {
        let path = pins.join(name);
        let out = sh(
            "bpftool",
            &["-j", "map", "show", "pinned", path.to_str().expect("utf-8")],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).context("bpftool output")?;
        total += v["bytes_memlock"].as_u64().unwrap_or(0);
    }
    Ok(total as f64 / (1024.0 * 1024.0))
}

/// Where an agent's sync spent its time (seconds), from its log line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SyncPhases {
    /// Reading and parsing the manifest files (or refreshing the API source's index).
    pub read: f64,
    pub model: f64,
    /// Diff and map writes.
    pub write: f64,
    /// The read, then the model and writes after it. A first sync from empty maps models and
    /// writes while it reads: then `model` and `write` overlap `read` and exceed
    /// `total - read`.
    pub total: f64,
}

/// The phases of the agent's syncs of `kind` ("full" or "partial"), from its log.
fn syncs(log: &str, kind: &str) -> Vec<SyncPhases> {
    let kind = format!("kind=\"{kind}\"");
    log.lines()
        .filter(|l| l.contains("synced") && l.contains(&kind))
        .filter_map(sync_phases)
        .collect()
}

/// Each phase's median.
fn median_phases(syncs: &[SyncPhases]) -> Option<SyncPhases> {
    let median = |f: fn(&SyncPhases) -> f64| {
        let mut v: Vec<f64> = syncs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Some(SyncPhases {
        read: median(|s| s.read)?,
        model: median(|s| s.model)?,
        write: median(|s| s.write)?,
        total: median(|s| s.total)?,
    })
}

fn sync_phases(line: &str) -> Option<SyncPhases> {
    let field = |name: &str| -> Option<f64> {
        let v = line.split(&format!(" {name}=")).nth(1)?;
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<f64>().ok().map(|us| us / 1e6)
    };
    Some(SyncPhases {
        read: field("read_us")?,
        model: field("model_us")?,
        write: field("write_us")?,
        total: field("elapsed_us")?,
    })
}

pub fn agent(n: usize, m: usize, count: usize) -> anyhow::Result<Programmer> {
    agent_with("this project (agent, manifests)", n, m, count, &[])
}

/// [`agent`] with every Service on Maglev: a table per frontend, built and written by the
/// agent (`--maglev-tables` sized to hold them all).
pub fn agent_maglev(n: usize, m: usize, count: usize) -> anyhow::Result<Programmer> {
    let frontends: usize = (workload::services(n, m, None).iter())
        .map(|s| s.ports().len())
        .sum();
    let tables = (frontends + 1).min(usize::from(u16::MAX)).to_string();
    agent_with(
        "this project (agent, manifests, Maglev)",
        n,
        m,
        count,
        &["--lb-algorithm", "maglev", "--maglev-tables", &tables],
    )
}

fn agent_with(
    name: &'static str,
    n: usize,
    m: usize,
    count: usize,
    extra: &[&str],
) -> anyhow::Result<Programmer> {
    let mut svcs = workload::services(n, m, None);
    let manifests = Manifests::new()?;
    for s in &svcs {
        std::fs::write(manifests.dir.join(s.file_name()), s.manifest())?;
    }
    // Each run: a fresh cgroup and bpffs directory (empty maps); the last one stays for the
    // changes. Dropped in order: the agent, then its pins, then its cgroup.
    let mut runs = Vec::with_capacity(AGENT_FULL_RUNS);
    let mut last = None;
    for _ in 0..AGENT_FULL_RUNS {
        drop(last.take()); // the previous run's agent is gone before this one starts
        let cgroup = Cgroup::new(&unique("cp"))?;
        let pins = BpffsDir::new(&unique("cp"));
        let started = Instant::now();
        let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), manifests.dir.as_ref()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let agent = Agent::start_with(&args, &cgroup.path, &pins)?;
        let seconds = started.elapsed().as_secs_f64();
        runs.push((seconds, syncs(&agent.log_text(), "full").into_iter().next()));
        last = Some((agent, pins, cgroup));
    }
    let (agent, pins, _cgroup) = last.expect("at least one run");
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let full_range = (runs.len() > 1).then(|| (runs[0].0, runs[runs.len() - 1].0));
    let (full_seconds, agent_sync) = runs.swap_remove(runs.len() / 2);
    let maps = MapReader::open(&pins.path)?;
    if !maps.has_backend(&svcs[n - 1], svcs[n - 1].endpoints[0]) {
        bail!("the agent reported ready without the last Service programmed");
    }

    let samples = time_changes(&mut svcs, count, &maps, &agent, |s| {
        manifests.write(&s.file_name(), &s.manifest())
    })?;
    let peak_rss_mib = agent.pid().and_then(vm_hwm_mib);
    let agent_change = median_phases(&syncs(&agent.log_text(), "partial"));
    Ok(Programmer {
        agent_change,
        name,
        full_seconds,
        full_range,
        agent_sync,
        change: Percentiles::of(samples),
        peak_rss_mib,
        kernel_memory_mib: Some(maps_memlock_mib(&pins.path)?),
        server: None,
    })
}

/// Makes `count` endpoint changes, one at a time, each by `write`, and times each from the
/// write until the maps hold the new backend (bounded: 2 s each, [`CHANGES_BUDGET`] in all).
fn time_changes(
    svcs: &mut [Svc],
    count: usize,
    maps: &MapReader,
    agent: &Agent,
    mut write: impl FnMut(&Svc) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    let (n, m) = (svcs.len(), svcs[0].endpoints.len());
    let mut samples = Vec::with_capacity(count);
    let budget = Instant::now() + CHANGES_BUDGET;
    for (i, j, ip) in changes(n, m, count) {
        if Instant::now() > budget {
            break;
        }
        svcs[i].endpoints[j] = ip;
        let s = &svcs[i];
        let t0 = Instant::now();
        write(s)?;
        loop {
            if maps.has_backend(s, ip) {
                samples.push(t0.elapsed());
                break;
            }
            if t0.elapsed() > Duration::from_secs(2) {
                bail!(
                    "change {} not programmed after 2 s:\n{}",
                    samples.len(),
                    agent.log_text()
                );
            }
            sleep(Duration::from_micros(50));
        }
    }
    Ok(samples)
}

/// A Service's objects as the API server holds them (JSON), from its manifest.
fn api_objects(s: &Svc) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde::Deserialize as _;
    yaml_serde::Deserializer::from_str(&s.manifest())
        .map(|doc| serde_json::Value::deserialize(doc).context("the bench's own manifest"))
        .collect()
}

/// The agent through the Kubernetes API source: the fake API server (list/watch, JSON as the
/// API server sends it) holds the Services and slices; a change is a slice update. Full
/// programming here is one cold start: listing 20,000 objects over HTTP is most of it.
pub fn agent_kube(n: usize, m: usize, count: usize) -> anyhow::Result<Programmer> {
    let mut svcs = workload::services(n, m, None);
    let api = FakeApiServer::start()?;
    for s in &svcs {
        for o in api_objects(s)? {
            api.apply(o);
        }
    }
    let kubeconfig = Manifests::new()?;
    kubeconfig.write("kubeconfig", &api.kubeconfig())?;
    let path = kubeconfig.dir.join("kubeconfig");
    let cgroup = Cgroup::new(&unique("cpk"))?;
    let pins = BpffsDir::new(&unique("cpk"));
    let started = Instant::now();
    let busy_before = api.busy();
    let agent = Agent::start_with(
        &["--kubeconfig".as_ref(), path.as_os_str()],
        &cgroup.path,
        &pins,
    )?;
    let full_seconds = started.elapsed().as_secs_f64();
    let busy_full = api.busy() - busy_before;
    let busy_before = api.busy();
    let agent_sync = syncs(&agent.log_text(), "full").into_iter().next();
    let maps = MapReader::open(&pins.path)?;
    if !maps.has_backend(&svcs[n - 1], svcs[n - 1].endpoints[0]) {
        bail!("the agent reported ready without the last Service programmed");
    }
    let samples = time_changes(&mut svcs, count, &maps, &agent, |s| {
        // The slice is the manifest's second object.
        let slice = api_objects(s)?.pop().context("a slice")?;
        api.apply(slice);
        Ok(())
    })?;
    let server_per_change_us =
        (api.busy() - busy_before).as_secs_f64() * 1e6 / samples.len().max(1) as f64;
    let peak_rss_mib = agent.pid().and_then(vm_hwm_mib);
    let agent_change = median_phases(&syncs(&agent.log_text(), "partial"));
    let kernel_memory_mib = Some(maps_memlock_mib(&pins.path)?);
    drop(agent);
    Ok(Programmer {
        agent_change,
        name: "this project (agent, Kubernetes API)",
        full_seconds,
        full_range: None,
        agent_sync,
        change: Percentiles::of(samples),
        peak_rss_mib,
        kernel_memory_mib,
        server: Some((busy_full.as_secs_f64(), server_per_change_us)),
    })
}

/// Times `cmd file` in `ns`, with `text` as the file (the loader reads it as kube-proxy's
/// loaders read their stdin).
fn timed_load(ns: &Netns, cmd: &[&str], text: &str) -> anyhow::Result<Duration> {
    let path = std::env::temp_dir().join(format!("{}.rules", unique("cp")));
    std::fs::write(&path, text)?;
    let t0 = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(cmd)
        .arg(&path)
        .output();
    let elapsed = t0.elapsed();
    let _ = std::fs::remove_file(&path);
    let out = out.with_context(|| format!("running {}", cmd[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(elapsed)
}

#[derive(Clone, Copy)]
pub enum Shape {
    Iptables,
    Nftables,
}

pub fn kube_proxy_shape(
    shape: Shape,
    n: usize,
    m: usize,
    count: usize,
) -> anyhow::Result<Programmer> {
    let mut svcs = workload::services(n, m, None);
    let ns = Netns::new(&unique("cp"))?;
    let cidr = workload::CLUSTER_CIDR;
    let (name, full_cmd, partial_cmd): (_, &[&str], &[&str]) = match shape {
        Shape::Iptables => (
            "kube-proxy iptables shape (iptables-restore)",
            &["iptables-restore"],
            &["iptables-restore", "--noflush"],
        ),
        Shape::Nftables => (
            "kube-proxy nftables shape (nft -f)",
            &["nft", "-f"],
            &["nft", "-f"],
        ),
    };
    let ports = workload::ports(&svcs);
    let full = match shape {
        Shape::Iptables => kube_proxy::iptables_full(&ports, cidr),
        Shape::Nftables => kube_proxy::nft_full(&ports, cidr, workload::SERVICE_CIDR),
    };
    let full_seconds = timed_load(&ns, full_cmd, &full)?.as_secs_f64();
    let mut samples = Vec::with_capacity(count);
    let mut ports = ports;
    let budget = Instant::now() + CHANGES_BUDGET;
    for (i, j, ip) in changes(n, m, count) {
        if Instant::now() > budget {
            break;
        }
        let old = ports[i].clone();
        svcs[i].endpoints[j] = ip;
        ports[i] = svcs[i].ports().remove(0);
        let text = match shape {
            Shape::Iptables => kube_proxy::iptables_partial(&ports, &ports[i], &old, cidr),
            Shape::Nftables => kube_proxy::nft_partial(&ports[i], &old, cidr),
        };
        samples.push(timed_load(&ns, partial_cmd, &text)?);
    }
    Ok(Programmer {
        name,
        full_seconds,
        full_range: None,
        agent_sync: None,
        agent_change: None,
        change: Percentiles::of(samples),
        peak_rss_mib: None,
        kernel_memory_mib: None,
        server: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=200).map(Duration::from_millis).collect());
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (100.0, 198.0, 200.0));
    }

    #[test]
    fn changes_stay_in_range_and_use_fresh_addresses() {
        let c = changes(7, 3, 50);
        assert!(c.iter().all(|(i, j, _)| *i < 7 && *j < 3));
        let ips: std::collections::BTreeSet<_> = c.iter().map(|(_, _, ip)| *ip).collect();
        assert_eq!(ips.len(), 50);
    }

    #[test]
    fn the_agent_log_gives_its_syncs() {
        let line = |kind: &str, read: u32| {
            format!(
                "x INFO proxy_agent::run: synced kind=\"{kind}\" services=3 updates=9 deletes=0 errors=0 read_us={read} model_us=250 write_us=750 elapsed_us=1500\n"
            )
        };
        let log = [
            line("full", 500),
            line("partial", 100),
            line("partial", 300),
            line("partial", 200),
        ]
        .concat();
        assert_eq!(
            syncs(&log, "full"),
            vec![SyncPhases {
                read: 0.0005,
                model: 0.00025,
                write: 0.00075,
                total: 0.0015
            }]
        );
        let partial = syncs(&log, "partial");
        assert_eq!(partial.len(), 3);
        assert_eq!(median_phases(&partial).map(|p| p.read), Some(0.0002));
        assert_eq!(median_phases(&[]), None);
    }
}
