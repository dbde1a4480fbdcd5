//! The result file, the tables and the plot.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    controlplane::ControlPlane,
    dataplane::{Interleaved, Measurement, Row, Spread},
};

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub iptables: String,
    pub nft: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub settings: serde_json::Value,
    pub dataplane: Vec<Measurement>,
    /// The socket path against direct, interleaved in one cluster (per size).
    pub interleaved: Vec<Interleaved>,
    /// The packet path's run time per kind of packet (`BPF_PROG_TEST_RUN`).
    pub packet_cost: Vec<super::packet_cost::PacketCost>,
    /// What each way of choosing a backend costs per new connection, on both paths.
    #[serde(default)]
    pub choice_cost: Vec<super::choice_cost::ChoiceCost>,
    pub controlplane: Option<ControlPlane>,
}

fn direct(all: &[Measurement], n: usize) -> Option<&Measurement> {
    all.iter().find(|m| m.row == Row::Direct && m.services == n)
}

/// Markdown tables (they read as plain text too).
pub fn tables(r: &Results) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "Machine: {} ({} CPUs, {:.0} GiB), kernel {}; {}; {}\n",
        m.cpu, m.cpus, m.memory_gib, m.kernel, m.iptables, m.nft
    );
    let _ = writeln!(
        out,
        "TCP connection rate (connect, read greeting, close with RST; closed loop):\n"
    );
    let _ = writeln!(
        out,
        "| services | datapath | conn/s (median) | rounds min-max | vs direct (median of rounds, min-max) | p50 µs | p99 µs | BPF ns/run | BPF runs/conn | BPF ns/conn |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for x in &r.dataplane {
        // Paired by round when there are rounds (see Measurement::vs_direct).
        let ratio = match x.vs_direct.as_slice() {
            [] => direct(&r.dataplane, x.services)
                .map(|d| format!("{:.3}", x.tcp.rate / d.tcp.rate))
                .unwrap_or_else(|| "-".into()),
            [only] => format!("{only:.3}"),
            all => format!(
                "{:.3} ({:.2}-{:.2})",
                all[all.len() / 2],
                all[0],
                all[all.len() - 1]
            ),
        };
        let (ns, runs, per_conn) = match &x.kernel {
            Some(k) => (
                format!("{:.0}", k.ns_per_run),
                format!("{:.1}", k.runs_per_op),
                format!("{:.0}", k.ns_per_op),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let spread = match (x.rounds.first(), x.rounds.last()) {
            (Some(lo), Some(hi)) => format!("{lo:.0}-{hi:.0}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.0} | {:.0} | {} | {} | {} |",
            x.services,
            x.row,
            x.tcp.rate,
            spread,
            ratio,
            x.tcp.p50_us,
            x.tcp.p99_us,
            ns,
            runs,
            per_conn
        );
    }
    if !r.interleaved.is_empty() {
        let _ = writeln!(
            out,
            "\nSocket path against direct, interleaved (one cluster with the agent loaded; three clients take turns in short windows; each group of three windows gives one ratio):\n"
        );
        let _ = writeln!(
            out,
            "| services | window groups x ms | direct conn/s | socket path conn/s | socket path / direct (median, quartiles) | pod IPs from the hooked cgroup / direct |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
        let spread = |s: &Spread| format!("{:.3} ({:.3}-{:.3})", s.median, s.q1, s.q3);
        for i in &r.interleaved {
            let _ = writeln!(
                out,
                "| {} | {} x {} | {:.0} | {:.0} | {} | {} |",
                i.services,
                i.windows,
                i.window_ms,
                i.direct,
                i.socket,
                spread(&i.socket_vs_direct),
                spread(&i.hooked_vs_direct)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nUDP request/response rate (one connected socket per worker):\n"
    );
    let _ = writeln!(
        out,
        "| services | datapath | req/s | vs direct | p50 µs | p99 µs |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|");
    for x in &r.dataplane {
        let Some(u) = &x.udp else { continue };
        let ratio = direct(&r.dataplane, x.services)
            .and_then(|d| d.udp.as_ref())
            .map(|d| format!("{:.3}", u.rate / d.rate))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {:.0} | {:.0} |",
            x.services, x.row, u.rate, ratio, u.p50_us, u.p99_us
        );
    }
    if !r.packet_cost.is_empty() {
        let _ = writeln!(
            out,
            "\nPacket path per kind of packet (BPF_PROG_TEST_RUN on crafted packets, one flow per run; without the copy of a cloned packet's header that real TCP traffic adds):\n"
        );
        let _ = writeln!(out, "| packet | what the program does | ns/run |");
        let _ = writeln!(out, "|---|---|---:|");
        for c in &r.packet_cost {
            let _ = writeln!(out, "| {} | {} | {:.0} |", c.packet, c.work, c.ns_per_run);
        }
    }
    if !r.choice_cost.is_empty() {
        let _ = writeln!(
            out,
            "\nBackend choice per new connection (socket path: connect4's run time over real connects; packet path: the TC program on a new flow's SYN, BPF_PROG_TEST_RUN):\n"
        );
        let _ = writeln!(
            out,
            "| choice | socket path ns/connect | packet path ns/new flow |"
        );
        let _ = writeln!(out, "|---|---:|---:|");
        for c in &r.choice_cost {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0} |",
                c.choice, c.socket_ns_per_connect, c.packet_ns_per_new_flow
            );
        }
    }
    if let Some(cp) = &r.controlplane {
        let _ = writeln!(
            out,
            "\nControl plane: {} Services x {} endpoints from nothing, then {} single endpoint changes:\n",
            cp.services,
            cp.endpoints,
            cp.programmers.first().map_or(0, |p| p.change.samples)
        );
        let _ = writeln!(
            out,
            "| programmer | full program s (median, runs min-max) | agent first sync s: total (read / model / write) | change p50 ms | change p99 ms | change max ms | agent per change µs (median): total (read / model / write) | peak RSS MiB | kernel map MiB |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
        for p in &cp.programmers {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                p.name,
                match p.full_range {
                    Some((lo, hi)) => format!("{:.3} ({lo:.2}-{hi:.2})", p.full_seconds),
                    None => format!("{:.3}", p.full_seconds),
                },
                p.agent_sync.as_ref().map_or("-".into(), |a| format!(
                    "{:.3} ({:.3} / {:.3} / {:.3})",
                    a.total, a.read, a.model, a.write
                )),
                p.change.p50_ms,
                p.change.p99_ms,
                p.change.max_ms,
                p.agent_change.as_ref().map_or("-".into(), |a| format!(
                    "{:.0} ({:.0} / {:.0} / {:.0})",
                    a.total * 1e6,
                    a.read * 1e6,
                    a.model * 1e6,
                    a.write * 1e6
                )),
                opt(p.peak_rss_mib, 1),
                opt(p.kernel_memory_mib, 1),
            );
        }
        for p in &cp.programmers {
            if let Some((full, change_us)) = p.server {
                let _ = writeln!(
                    out,
                    "\n{}: the fake API server's own time (storing writes, building responses; not its HTTP layer) was {:.3} s of the full programming and {:.0} µs per change.",
                    p.name, full, change_us
                );
            }
        }
    }
    out
}

/// Grouped bars: TCP conn/s per datapath, one group per number of Services. A plain SVG
/// writer (some 60 lines) rather than a plotting crate with a font stack to build.
pub fn svg(r: &Results) -> String {
    let sizes: Vec<usize> = {
        let mut v: Vec<usize> = r.dataplane.iter().map(|m| m.services).collect();
        v.dedup();
        v
    };
    let colors = ["#555555", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e"];
    let max = r
        .dataplane
        .iter()
        .map(|m| m.tcp.rate)
        .fold(1.0f64, f64::max);
    let (w, h, left, top, bottom) = (900.0, 460.0, 70.0, 40.0, 120.0);
    let plot_h = h - top - bottom;
    let group_w = (w - left - 20.0) / sizes.len().max(1) as f64;
    let bar_w = group_w * 0.8 / Row::ALL.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"20\" font-size=\"14\">TCP connections/s to one ClusterIP (higher is better), by number of Services</text>\n"
    );
    for t in 0..=4 {
        let v = max * f64::from(t) / 4.0;
        let y = top + plot_h - plot_h * f64::from(t) / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>",
            w - 10.0,
            left - 5.0,
            y + 4.0,
            v
        );
    }
    for (g, n) in sizes.iter().enumerate() {
        let x0 = left + g as f64 * group_w + group_w * 0.1;
        for (i, row) in Row::ALL.iter().enumerate() {
            let Some(m) = r
                .dataplane
                .iter()
                .find(|m| m.row == *row && m.services == *n)
            else {
                continue;
            };
            let bh = plot_h * m.tcp.rate / max;
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {:.0} conn/s</title></rect>",
                x0 + i as f64 * bar_w,
                top + plot_h - bh,
                bar_w * 0.9,
                colors[i],
                row,
                m.tcp.rate
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{n} Services</text>",
            x0 + group_w * 0.4,
            top + plot_h + 18.0
        );
    }
    for (i, row) in Row::ALL.iter().enumerate() {
        let y = h - bottom + 45.0 + (i / 3) as f64 * 20.0;
        let x = left + (i % 3) as f64 * 260.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{y:.1}\">{row}</text>",
            y - 10.0,
            colors[i],
            x + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}
