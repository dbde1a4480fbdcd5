//! What backend choice costs in the kernel, per new connection, for each way of choosing:
//! random, random with ClientIP affinity (every connection after the first reuses the
//! client's backend), and Maglev.
//!
//! - Socket path: connect4's run time (BPF run-time statistics) over real TCP connects from a
//!   pod of a mini-cluster, one Service per way of choosing, programmed by the agent.
//! - Packet path: the TC program on crafted SYNs to the VIP, each a new flow from one client
//!   (`BPF_PROG_TEST_RUN`): the choice plus the conntrack inserts and the rewrite.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use proxy_agent::{
    maps::PinnedMaps,
    model::{Algorithm, BackendAddr, Desired, Frontend, FrontendSpec, Proto, ServiceRef},
    sync::{ChoiceConfig, Syncer},
};
use serde::Serialize;

use super::{kernel_cost, packet_cost};
use crate::{
    agent::{Agent, Manifests},
    client,
    cluster::{Cluster, TCP_PORT},
    host::BpffsDir,
    packets::packet,
    unique,
};

#[derive(Clone, Debug, Serialize)]
pub struct ChoiceCost {
    pub choice: &'static str,
    /// connect4's mean run time per connect.
    pub socket_ns_per_connect: f64,
    /// The TC program's mean run time on a new flow's SYN.
    pub packet_ns_per_new_flow: f64,
}

/// The ways of choosing: (name, Service spec lines, annotations).
const CHOICES: [(&str, &str, &str); 3] = [
    ("random", "", "{}"),
    (
        "random + ClientIP affinity",
        "  sessionAffinity: ClientIP\n",
        "{}",
    ),
    ("Maglev", "", "{service.ebpf-proxy.io/lb-algorithm: maglev}"),
];

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 7, i as u8 + 1)
}

/// `connects` TCP connects per way of choosing, and `flows` SYNs.
pub fn measure(connects: u32, flows: u16) -> anyhow::Result<Vec<ChoiceCost>> {
    let socket = socket_path(connects).context("socket path")?;
    let packet = packet_path(flows).context("packet path")?;
    Ok((CHOICES.iter().zip(socket).zip(packet))
        .map(|(((choice, _, _), s), p)| ChoiceCost {
            choice,
            socket_ns_per_connect: s,
            packet_ns_per_new_flow: p,
        })
        .collect())
}

fn socket_path(connects: u32) -> anyhow::Result<Vec<f64>> {
    let cluster = Cluster::new(3, &[])?;
    let manifests = Manifests::new()?;
    let ips: Vec<String> = cluster.pods.iter().map(|p| p.ip.to_string()).collect();
    for (i, (_, spec, annotations)) in CHOICES.iter().enumerate() {
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: c{i}, namespace: default, annotations: {annotations}}}\nspec:\n  clusterIP: {}\n{spec}  ports:\n  - {{name: http, port: 80, targetPort: {TCP_PORT}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: c{i}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: c{i}}}\naddressType: IPv4\nports:\n- {{name: http, port: {TCP_PORT}}}\nendpoints:\n",
            vip(i)
        );
        for ip in &ips {
            s.push_str(&format!("- addresses: [\"{ip}\"]\n"));
        }
        manifests.write(&format!("c{i}.yaml"), &s)?;
    }
    let pins = BpffsDir::new(&unique("choice"));
    let agent = Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins)?;
    let client_bin = std::env::current_exe()?
        .parent()
        .context("bench binary's directory")?
        .join("pxt-client");
    let links = vec![pins.path.join("links").join("proxy_connect4")];
    let mut out = Vec::new();
    for i in 0..CHOICES.len() {
        let addr = format!("{}:80", vip(i));
        // Warm: the first connects make the affinity entry and fault in the map pages.
        client::run(&cluster, &client_bin, "tcp", &addr, 20);
        let cost = kernel_cost::during(&links, || {
            let r = client::run(&cluster, &client_bin, "tcp", &addr, connects);
            anyhow::ensure!(r.errors.is_empty(), "{r:?}\n{}", agent.log_text());
            Ok(u64::from(r.replies.values().sum::<u32>()))
        })?;
        out.push(cost.ns_per_run);
    }
    drop(agent);
    Ok(out)
}

fn packet_path(flows: u16) -> anyhow::Result<Vec<f64>> {
    const CLIENT: [u8; 4] = [10, 1, 0, 2];
    let pins = BpffsDir::new(&unique("choicepkt"));
    let ebpf = packet_cost::load_tc(&pins)?;
    let mut desired = Desired::default();
    for (i, (_, spec, annotations)) in CHOICES.iter().enumerate() {
        desired.frontends.insert(
            Frontend {
                vip: vip(i),
                port: 80,
                proto: Proto::Tcp,
            },
            FrontendSpec {
                service: ServiceRef::new(Some("bench"), &format!("c{i}")),
                backends: (1..=3)
                    .map(|j| BackendAddr {
                        ip: Ipv4Addr::new(10, 1, 0, 10 + j),
                        port: 8080,
                    })
                    .collect(),
                no_local_endpoints: false,
                affinity_timeout_s: if spec.is_empty() { 0 } else { 10_800 },
                algorithm: annotations.contains("maglev").then_some(Algorithm::Maglev),
                about: Default::default(),
            },
        );
    }
    let maps = PinnedMaps::open(&pins.path)?;
    let state = maps.dump()?;
    let mut syncer = Syncer::with_choice(maps, state, ChoiceConfig::default());
    anyhow::ensure!(syncer.sync(&desired).errors.is_empty());
    (0..CHOICES.len())
        .map(|i| {
            let make = |port| packet(6, CLIENT, port, vip(i).octets(), 80, 0, 0, true);
            packet_cost::mean_run_ns(&ebpf, flows, &make)
        })
        .collect()
}
