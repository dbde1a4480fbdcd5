//! The chaos test bed: a routed mini-cluster, one agent with both datapaths on it (socket
//! programs on the client pod's cgroup, TC on the node's pod interfaces), the Services the
//! scenarios change, and the probes: one client process per path, the packet path's from a
//! second client pod. (From one pod, the two paths' connections can meet on one wire tuple:
//! `--one-client` shows it. kube-proxy's NAT remaps the source port on such a clash; this
//! packet path does not yet.)

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    io::Read as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::probe::{ProbeResult, monotonic_ns};
use crate::{
    agent::{Agent, Manifests, frontends, http_get},
    cluster::{Cluster, ECHO_PORT, TCP_PORT},
    host::BpffsDir,
    servers::enter_netns,
    unique,
};

/// The Service the scenarios change (port 80 -> the pods' greeting on 8080).
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A Service the restart scenario removes while the agent is down.
pub const OLD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The long-lived connections' Service (port 7 -> echo on 7007), never changed, so the
/// long-lived connections measure restarts and the churn of another Service only.
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

/// Backend pods; the Services use some of them, so a reply from another is a wrong backend.
pub const PODS: usize = 5;

fn service(name: &str, vip: Ipv4Addr, port: u16, target: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{name: p, port: {port}, targetPort: {target}, protocol: TCP}}\n"
    )
}

/// An EndpointSlice of `service`: `ready` pods serve, `not_ready` ones are listed but do not.
fn slice(service: &str, target: u16, ready: &[Ipv4Addr], not_ready: &[Ipv4Addr]) -> String {
    let all = (ready.iter().map(|ip| (ip, true))).chain(not_ready.iter().map(|ip| (ip, false)));
    let endpoints: String = all
        .map(|(ip, r)| format!("\n- addresses: [\"{ip}\"]\n  conditions: {{ready: {r}}}"))
        .collect();
    let endpoints = if endpoints.is_empty() {
        " []".into()
    } else {
        endpoints
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: p, port: {target}, protocol: TCP}}\nendpoints:{endpoints}\n"
    )
}

/// Which path a probe's connects take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// In the hooked cgroup: translated at connect().
    Socket,
    /// Outside it: translated per packet by TC on the node.
    Packet,
}

impl Path {
    pub const BOTH: [Path; 2] = [Path::Socket, Path::Packet];

    pub fn label(self) -> &'static str {
        match self {
            Path::Socket => "socket path",
            Path::Packet => "packet path (TC)",
        }
    }
}

/// A running probe; killed on drop if never finished.
pub struct Probe {
    pub path: Path,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl Probe {
    /// Closes its stdin (the probe's stop signal) and reads its result, within 10 s.
    /// Closes its stdin: the probe's stop signal (see [`Self::finish`]).
    pub fn stop(&mut self) {
        drop(self.stdin.take());
    }

    pub fn finish(mut self) -> anyhow::Result<ProbeResult> {
        self.stop();
        let mut child = self.child.take().context("finished twice")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        // Read while it writes: its result is larger than a pipe holds.
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            stdout.read_to_string(&mut out).map(|_| out)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{:?} probe did not stop", self.path);
            }
            sleep(Duration::from_millis(20));
        }
        let out = (reader.join()).map_err(|_| anyhow::anyhow!("reading the probe panicked"))??;
        serde_json::from_str(&out)
            .with_context(|| format!("{:?} probe printed {out:.200}", self.path))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Field order is drop order: the agent stops first, the namespaces go last.
pub struct Bed {
    agent: Option<Agent>,
    /// The build [`Self::start_agent`] starts.
    pub agent_bin: PathBuf,
    pub manifests: Manifests,
    pub pins: BpffsDir,
    pub cluster: Cluster,
    pub probe_bin: PathBuf,
    pub rate: u32,
    /// The paths probed.
    pub paths: Vec<Path>,
    /// Both probes from the one client pod (default: the packet path's from a second pod).
    pub one_client: bool,
}

impl Bed {
    /// `web` over pods 0-2, `old` over pod 3, `echo` over pods 0-2; the agent started.
    pub fn new(probe_bin: PathBuf, rate: u32) -> anyhow::Result<Self> {
        let cluster = Cluster::routed(PODS).context("mini cluster")?;
        let manifests = Manifests::new()?;
        let mut bed = Bed {
            agent: None,
            agent_bin: crate::agent::agent_bin(),
            manifests,
            pins: BpffsDir::new(&unique("chaos")),
            cluster,
            probe_bin,
            rate,
            paths: Path::BOTH.to_vec(),
            one_client: false,
        };
        bed.cluster.add_routed_client()?;
        let three = bed.pod_ips(&[0, 1, 2]);
        let m = &bed.manifests;
        m.write("web-svc.yaml", &service("web", WEB_VIP, 80, TCP_PORT))?;
        bed.set_web(&three, &[])?;
        m.write("old-svc.yaml", &service("old", OLD_VIP, 80, TCP_PORT))?;
        m.write(
            "old-slice.yaml",
            &slice("old", TCP_PORT, &bed.pod_ips(&[3]), &[]),
        )?;
        m.write("echo-svc.yaml", &service("echo", ECHO_VIP, 7, ECHO_PORT))?;
        m.write("echo-slice.yaml", &slice("echo", ECHO_PORT, &three, &[]))?;
        bed.start_agent()?;
        Ok(bed)
    }

    pub fn pod_ips(&self, which: &[usize]) -> Vec<Ipv4Addr> {
        which.iter().map(|i| self.cluster.pods[*i].ip).collect()
    }

    /// The names that greet from these IPs.
    pub fn names(&self, ips: &[Ipv4Addr]) -> BTreeSet<String> {
        (self.cluster.pods.iter())
            .filter(|p| ips.contains(&p.ip))
            .map(|p| p.name.clone())
            .collect()
    }

    /// Writes `web`'s slice (renamed into place, as config managers do).
    pub fn set_web(&self, ready: &[Ipv4Addr], not_ready: &[Ipv4Addr]) -> anyhow::Result<()> {
        self.manifests
            .write("web-slice.yaml", &slice("web", TCP_PORT, ready, not_ready))
    }

    /// Removes the `old` Service's files.
    pub fn remove_old(&self) -> anyhow::Result<()> {
        self.manifests.remove("old-svc.yaml")?;
        self.manifests.remove("old-slice.yaml")
    }

    pub fn start_agent(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut agent = self.spawn_agent(&self.agent_bin.clone())?;
        agent.wait_ready_within(Duration::from_secs(60))?;
        self.agent = Some(agent);
        Ok(t.elapsed())
    }

    /// `bin` started on the bed as [`Self::start_agent`] starts it, not waited for.
    pub fn spawn_agent(&self, bin: &std::path::Path) -> anyhow::Result<Agent> {
        let dir = self.manifests.dir.clone();
        let args: [&OsStr; 6] = [
            "--manifests".as_ref(),
            dir.as_os_str(),
            "--tc-interface".as_ref(),
            "vclient*".as_ref(),
            "--tc-interface".as_ref(),
            "vpod*".as_ref(),
        ];
        Agent::spawn_bin_in(
            bin,
            Some(&self.cluster.node.path()),
            &args,
            &self.cluster.cgroup_path(),
            &self.pins,
        )
    }

    /// The names pinned in the bed's bpffs directory (maps, and `links`).
    pub fn pin_names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = (std::fs::read_dir(&self.pins.path)?)
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        Ok(names)
    }

    pub fn kill_agent(&mut self) {
        if let Some(a) = self.agent.as_mut() {
            a.kill();
        }
    }

    /// SIGTERM, as a rolling update does: whether it exited within 10 s.
    pub fn terminate_agent(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|a| a.terminate_within(Duration::from_secs(10)))
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    /// `proxy_map_writes_total`, both ops, of the running agent: scraped from inside the
    /// node namespace, where the agent listens.
    pub fn map_writes(&self) -> anyhow::Result<u64> {
        let agent = self.agent.as_ref().context("no agent")?;
        let (node, addr) = (self.cluster.node.path(), agent.metrics_addr.clone());
        let text = std::thread::spawn(move || -> anyhow::Result<String> {
            enter_netns(&node)?;
            let (code, text) = http_get(&addr, "/metrics");
            anyhow::ensure!(code == 200, "metrics answered {code}");
            Ok(text)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("scraping the metrics panicked"))??;
        let writes: Vec<u64> = (text.lines())
            .filter(|l| l.starts_with("proxy_map_writes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .collect();
        anyhow::ensure!(writes.len() == 2, "proxy_map_writes_total: {writes:?}");
        Ok(writes.iter().sum())
    }

    /// The pods `vip`:`port` has in the pinned maps (None: no frontend).
    pub fn programmed(&self, vip: Ipv4Addr, port: u16) -> Option<BTreeSet<String>> {
        let f = frontends(&self.pins)
            .into_iter()
            .find(|f| f.vip == vip && f.port == port)?;
        let ips: Vec<Ipv4Addr> = f.backends.iter().map(|b| b.ip).collect();
        Some(self.names(&ips))
    }

    /// Polls the pins (every 2 ms, up to `bound`) until `web` holds `want`: when it was seen.
    pub fn wait_web(&self, want: &BTreeSet<String>, bound: Duration) -> Option<u64> {
        let deadline = Instant::now() + bound;
        loop {
            // A frontend with no backends reads as the empty set (it refuses).
            if self.programmed(WEB_VIP, 80).unwrap_or_default() == *want {
                return Some(monotonic_ns());
            }
            if Instant::now() > deadline {
                return None;
            }
            sleep(Duration::from_millis(2));
        }
    }

    /// One probe process per path: connects to `web`, plus the echo; each stops when
    /// finished, or after `bound` whatever happens.
    pub fn start_probes(&self, bound: Duration) -> anyhow::Result<Vec<Probe>> {
        (self.paths.iter())
            .map(|path| {
                let mut cmd: Command = match path {
                    Path::Socket => self.cluster.client_command(&self.probe_bin),
                    Path::Packet if self.one_client => {
                        self.cluster.client_command_unhooked(&self.probe_bin)
                    }
                    Path::Packet => self.cluster.other_client_command(0, &self.probe_bin),
                };
                let mut child = cmd
                    .arg("--target")
                    .arg(format!("{WEB_VIP}:80"))
                    .arg("--echo")
                    .arg(format!("{ECHO_VIP}:7"))
                    .arg("--max-ms")
                    .arg(bound.as_millis().to_string())
                    .arg("--rate")
                    .arg(self.rate.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("starting pxt-probe")?;
                let stdin = child.stdin.take();
                Ok(Probe {
                    path: *path,
                    child: Some(child),
                    stdin,
                })
            })
            .collect()
    }
}
