//! Where the packet path's time goes, per kind of packet: the TC program run in the kernel on
//! crafted packets (`BPF_PROG_TEST_RUN`, its own timing of each run), over as many distinct
//! flows as runs, with one frontend programmed by the agent's writer. What it leaves out: a
//! packet a TCP socket sent is usually a clone (TCP keeps the original for retransmission),
//! and the kernel copies a clone's header before the program's first write; the data-plane
//! rows' BPF ns/run include that, these do not.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use proxy_agent::{
    loader,
    maps::PinnedMaps,
    model::{BackendAddr, Desired, Frontend, FrontendSpec, Proto, ServiceRef},
    sync::Syncer,
};
use serde::Serialize;

use crate::{
    host::BpffsDir,
    packets::{ACK, RST, packet, syn_ack, with_flags},
    unique,
};

#[derive(Clone, Debug, Serialize)]
pub struct PacketCost {
    pub packet: &'static str,
    /// What the program does with it.
    pub work: &'static str,
    pub ns_per_run: f64,
}

const CLIENT: [u8; 4] = [10, 1, 0, 2];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND: [u8; 4] = [10, 1, 0, 5];

/// A kind of packet: its name, what the program does with it, the packet of a flow's port.
type Kind<'a> = (&'static str, &'static str, &'a dyn Fn(u16) -> Vec<u8>);

/// Runs each kind of packet `flows` times (one flow each) and reports the mean run time.
pub fn measure(flows: u16) -> anyhow::Result<Vec<PacketCost>> {
    let pins = BpffsDir::new(&unique("pcost"));
    let ebpf = load_tc(&pins)?;
    let mut desired = Desired::default();
    desired.frontends.insert(
        Frontend {
            vip: Ipv4Addr::from(VIP),
            port: 80,
            proto: Proto::Tcp,
        },
        FrontendSpec {
            service: ServiceRef::new(Some("bench"), "web"),
            backends: vec![BackendAddr {
                ip: BACKEND.into(),
                port: 8080,
            }],
            no_local_endpoints: false,
            affinity_timeout_s: 0,
            algorithm: None,
            about: Default::default(),
        },
    );
    let maps = PinnedMaps::open(&pins.path)?;
    let state = maps.dump()?;
    anyhow::ensure!(Syncer::new(maps, state).sync(&desired).errors.is_empty());
    let run = |make: &dyn Fn(u16) -> Vec<u8>| mean_run_ns(&ebpf, flows, make);
    let client = |port, flags| with_flags(packet(6, CLIENT, port, VIP, 80, 0, 0, true), flags);
    let reply = |port, flags| with_flags(packet(6, BACKEND, 8080, CLIENT, port, 0, 0, true), flags);
    // In a connection's order: each kind runs once per flow, after the kinds before it.
    let kinds: [Kind; 8] = [
        ("not IP (ARP)", "nothing: the program's floor", &|_| {
            let mut p = packet(6, CLIENT, 1, VIP, 80, 0, 0, true);
            p[12..14].copy_from_slice(&[0x08, 0x06]);
            p
        }),
        (
            "TCP to a pod, untracked",
            "a conntrack miss, a frontend miss",
            &|port| with_flags(packet(6, CLIENT, port, BACKEND, 8080, 0, 0, true), ACK),
        ),
        (
            "SYN to the VIP",
            "a miss, the frontend, its slot and backend, two conntrack inserts, the rewrite",
            &|port| packet(6, CLIENT, port, VIP, 80, 0, 0, true),
        ),
        (
            "SYN-ACK from the backend",
            "a conntrack hit, the rewrite",
            &|port| syn_ack(packet(6, BACKEND, 8080, CLIENT, port, 0, 0, true)),
        ),
        (
            "client ACK",
            "a hit, a state change (and the other entry refreshed), the rewrite",
            &|port| client(port, ACK),
        ),
        (
            "client ACK, same second",
            "a hit, nothing written, the rewrite",
            &|port| client(port, ACK),
        ),
        (
            "backend ACK",
            "a hit, a state change, the rewrite",
            &|port| reply(port, ACK),
        ),
        (
            "client RST",
            "a hit, both entries closed, the rewrite",
            &|port| client(port, RST),
        ),
    ];
    kinds
        .into_iter()
        .map(|(packet, work, make)| {
            Ok(PacketCost {
                packet,
                work,
                ns_per_run: run(make)?,
            })
        })
        .collect()
}

/// The object loaded with its maps pinned in `pins`, and its TC program loaded (not attached).
pub(crate) fn load_tc(pins: &BpffsDir) -> anyhow::Result<aya::Ebpf> {
    let mut ebpf = loader::load(&pins.path)?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(loader::TC_PROGRAM)
        .context("TC program")?
        .try_into()?;
    prog.load()?;
    Ok(ebpf)
}

/// The TC program's mean run time over `flows` runs, run `i` on the packet `make(10_000 + i)`.
pub(crate) fn mean_run_ns(
    ebpf: &aya::Ebpf,
    flows: u16,
    make: &dyn Fn(u16) -> Vec<u8>,
) -> anyhow::Result<f64> {
    let prog: &SchedClassifier = ebpf.program(loader::TC_PROGRAM).context("TC")?.try_into()?;
    let mut total = 0u128;
    for i in 0..flows {
        let input = make(10_000 + i);
        let mut out = vec![0u8; input.len() + 64];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&input);
        opts.data_out = Some(&mut out);
        total += prog.test_run(opts)?.duration.as_nanos();
    }
    Ok(total as f64 / f64::from(flows))
}
