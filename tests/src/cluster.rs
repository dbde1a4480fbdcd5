//! A netns "mini cluster" on one machine: a node namespace with a bridge, a client pod and
//! backend pods on veths. No interface or route is ever added to the root namespace, and the
//! node has no way out, so untranslated traffic to a VIP dies inside the test.
//!
//! ```text
//!   client (10.200.0.2) ──┐
//!   pod-0  (10.200.0.10) ─┼── br0 (10.200.0.1) in the node namespace
//!   pod-1  (10.200.0.11) ─┤
//!   pod-2  (10.200.0.12) ─┘
//! ```

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::Context as _;

use crate::{
    host::{Cgroup, Netns},
    servers::PodServers,
    unique,
};

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: Netns,
}

/// Field order is drop order: servers stop before their namespaces go, the cgroup last.
pub struct Cluster {
    servers: Vec<PodServers>,
    pub pods: Vec<Pod>,
    /// More client pods ([`Self::add_routed_client`]), outside the hooked cgroup.
    pub other_clients: Vec<Netns>,
    pub client: Netns,
    pub node: Netns,
    /// The client pod's cgroup: where the socket programs are attached.
    pub cgroup: Cgroup,
}

/// The pods' gateway on a routed cluster: held by every node-side veth (as Calico does).
pub const ROUTED_GATEWAY: &str = "169.254.1.1";

pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
/// A TCP echo server on routed clusters' pods: for connections that stay open.
pub const ECHO_PORT: u16 = 7007;

fn attach(node: &Netns, pod: &Netns, host_if: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ])?;
    node.ip(&["link", "set", host_if, "master", "br0", "up"])?;
    pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "default", "via", "10.200.0.1"])?;
    Ok(())
}

/// A node and a client pod, before any backend pod.
fn skeleton(
    setup_node: impl FnOnce(&Netns) -> anyhow::Result<()>,
    attach_client: impl FnOnce(&Netns, &Netns) -> anyhow::Result<()>,
) -> anyhow::Result<Cluster> {
    let id = unique("");
    let cgroup = Cgroup::new(&id)?;
    let node = Netns::new(&format!("{id}-node"))?;
    setup_node(&node)?;
    let client = Netns::new(&format!("{id}-client"))?;
    attach_client(&node, &client)?;
    Ok(Cluster {
        servers: vec![],
        pods: vec![],
        other_clients: vec![],
        client,
        node,
        cgroup,
    })
}

/// A pod on a routed node: a /32 on the pod side, a route and the gateway on the node side.
fn attach_routed(node: &Netns, pod: &Netns, host_if: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{ROUTED_GATEWAY}/32"),
        "dev",
        host_if,
    ])?;
    node.ip(&["link", "set", host_if, "up"])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if])?;
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&[
        "route",
        "add",
        ROUTED_GATEWAY,
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        ROUTED_GATEWAY,
        "dev",
        "eth0",
    ])?;
    Ok(())
}

impl Cluster {
    /// A routed node (no bridge): every packet between pods crosses the node's L3 path, in
    /// both directions, so the node's TC programs see requests and replies. Pods are
    /// 10.201.0.10+i, the client 10.201.0.2; node-side veths are `vpod<i>` and `vclient`.
    pub fn routed(pods: usize) -> anyhow::Result<Self> {
        let mut cluster = skeleton(
            |node| {
                let ns = format!("--net={}", node.path().display());
                crate::host::sh("nsenter", &[&ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
                    .map(drop)
            },
            |node, client| attach_routed(node, client, "vclient", Ipv4Addr::new(10, 201, 0, 2)),
        )?;
        for _ in 0..pods {
            cluster.add_routed_pod()?;
        }
        Ok(cluster)
    }

    /// Adds one more pod to a routed cluster (a new `vpod<i>` appears on the node).
    pub fn add_routed_pod(&mut self) -> anyhow::Result<&Pod> {
        let pod = self.add_routed_pod_without_servers()?;
        let path = pod.netns.path();
        let servers = PodServers::start(&path, &pod.name, &[TCP_PORT], &[UDP_PORT])?;
        self.servers.push(servers);
        self.servers.push(PodServers::echo(&path, ECHO_PORT)?);
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Adds a pod with no server in it (the caller brings its own, e.g. the benchmark's).
    pub fn add_routed_pod_without_servers(&mut self) -> anyhow::Result<&Pod> {
        let i = self.pods.len();
        let name = format!("pod-{i}");
        let ip = Ipv4Addr::new(10, 201, 0, 10 + i as u8);
        let netns = Netns::new(&format!("{}-p{i}", self.id()))?;
        attach_routed(&self.node, &netns, &format!("vpod{i}"), ip)?;
        self.pods.push(Pod { name, ip, netns });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Another client pod on a routed cluster: 10.201.0.3, .4, ...; its node-side veth is
    /// `vclient<n>` (n from 1). Returns its index in [`Self::other_clients`].
    pub fn add_routed_client(&mut self) -> anyhow::Result<usize> {
        let n = self.other_clients.len() + 1;
        let netns = Netns::new(&format!("{}-c{n}", self.id()))?;
        let ip = Ipv4Addr::new(10, 201, 0, 2 + n as u8);
        attach_routed(&self.node, &netns, &format!("vclient{n}"), ip)?;
        self.other_clients.push(netns);
        Ok(n - 1)
    }

    /// `program` in another client pod's namespace ([`Self::add_routed_client`]).
    pub fn other_client_command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.other_clients[i].path().display()))
            .arg(program);
        c
    }

    /// The unique prefix of this cluster's namespaces.
    fn id(&self) -> String {
        self.node.name.trim_end_matches("-node").to_string()
    }

    /// `program` in the client pod's namespace only: outside the hooked cgroup, so only the
    /// packet path on the node can translate its traffic.
    pub fn client_command_unhooked(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.client.path().display()))
            .arg(program);
        c
    }

    /// Runs [`Self::client_command_unhooked`] to completion.
    pub fn run_client_unhooked(&self, program: &Path, args: &[String]) -> anyhow::Result<Output> {
        self.client_command_unhooked(program)
            .args(args)
            .output()
            .context("running the client")
    }

    /// `pods` backend pods, each serving its name on TCP 8080 and UDP 5353 plus `extra_tcp`.
    pub fn new(pods: usize, extra_tcp: &[u16]) -> anyhow::Result<Self> {
        let mut cluster = skeleton(
            |node| {
                node.ip(&["link", "add", "br0", "type", "bridge"])?;
                node.ip(&["addr", "add", "10.200.0.1/24", "dev", "br0"])?;
                node.ip(&["link", "set", "br0", "up"]).map(drop)
            },
            |node, client| attach(node, client, "vclient", Ipv4Addr::new(10, 200, 0, 2)),
        )?;
        let mut tcp = vec![TCP_PORT];
        tcp.extend_from_slice(extra_tcp);
        for i in 0..pods {
            let name = format!("pod-{i}");
            let ip = Ipv4Addr::new(10, 200, 0, 10 + i as u8);
            let netns = Netns::new(&format!("{}-p{i}", cluster.id()))?;
            attach(&cluster.node, &netns, &format!("vpod{i}"), ip)?;
            cluster
                .servers
                .push(PodServers::start(&netns.path(), &name, &tcp, &[UDP_PORT])?);
            cluster.pods.push(Pod { name, ip, netns });
        }
        Ok(cluster)
    }

    /// `program` as a client pod: first in the test cgroup, then in the client namespace (in
    /// that order: `ip netns exec` would hide the cgroup mount).
    pub fn client_command(&self, program: &Path) -> Command {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} \"$@\"",
            self.cgroup.path.display(),
            self.client.path().display()
        );
        let mut c = Command::new("sh");
        c.arg("-c").arg(script).arg("client").arg(program);
        c
    }

    /// Runs [`Self::client_command`] to completion.
    pub fn run_client(&self, program: &Path, args: &[String]) -> anyhow::Result<Output> {
        self.client_command(program)
            .args(args)
            .output()
            .context("running the client")
    }

    pub fn cgroup_path(&self) -> PathBuf {
        self.cgroup.path.clone()
    }
}
