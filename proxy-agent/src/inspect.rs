//! `proxy-agent services`: what the pinned maps say, resolved the way the programs resolve it.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use proxy_common::{Counter, SVC_FLAG_NO_LOCAL_ENDPOINTS};
use serde::Serialize;

use crate::{
    maps::{MapsError, PinnedMaps},
    sync::{MapState, frontend_of},
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// "active", "reject" (no endpoints: ECONNREFUSED) or "no-local-endpoints" (EHOSTUNREACH).
    pub state: &'static str,
    pub rev_nat_id: u16,
    /// "random" or "maglev" (the frontend has a Maglev table).
    pub algorithm: &'static str,
    /// ClientIP session affinity's timeout; 0: none.
    pub affinity_timeout_s: u32,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub ip: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub services: Vec<FrontendView>,
    pub counters: BTreeMap<&'static str, u64>,
}

pub fn inspect(dir: &Path) -> Result<Inspection, MapsError> {
    let maps = PinnedMaps::open(dir)?;
    let state = maps.dump()?;
    let counters = maps
        .counters()?
        .into_iter()
        .map(|(c, v)| (c.name(), v))
        .collect();
    Ok(Inspection {
        services: frontends(&state),
        counters,
    })
}

/// Frontends as a reader sees them: masters and the backends their slots resolve to.
pub fn frontends(state: &MapState) -> Vec<FrontendView> {
    let mut out = Vec::new();
    for (k, m) in state.services.iter().filter(|(k, _)| k.slot == 0) {
        let Some(f) = frontend_of(k) else { continue };
        let backends = (1..=m.count)
            .filter_map(|slot| state.services.get(&k.with_slot(slot)))
            .filter_map(|s| state.backends.get(&s.backend_id))
            .map(|b| BackendView {
                ip: Ipv4Addr::from(u32::from_be(b.addr_be)),
                port: u16::from_be(b.port_be),
            })
            .collect();
        let state = match (m.count, m.flags & SVC_FLAG_NO_LOCAL_ENDPOINTS != 0) {
            (0, true) => "no-local-endpoints",
            (0, false) => "reject",
            _ => "active",
        };
        out.push(FrontendView {
            vip: f.vip,
            port: f.port,
            protocol: f.proto.to_string(),
            state,
            rev_nat_id: m.rev_nat_id,
            algorithm: if m.maglev_table != 0 {
                "maglev"
            } else {
                "random"
            },
            affinity_timeout_s: m.affinity_timeout_s,
            backends,
        });
    }
    out
}

pub fn render_table(i: &Inspection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<5} {:<19} {:<16} BACKENDS",
        "FRONTEND", "PROTO", "STATE", "CHOICE"
    );
    for f in &i.services {
        let backends = if f.backends.is_empty() {
            "-".to_string()
        } else {
            f.backends
                .iter()
                .map(|b| format!("{}:{}", b.ip, b.port))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let choice = match f.affinity_timeout_s {
            0 => f.algorithm.to_string(),
            t => format!("{}+ClientIP/{t}s", f.algorithm),
        };
        let _ = writeln!(
            s,
            "{:<22} {:<5} {:<19} {:<16} {}",
            format!("{}:{}", f.vip, f.port),
            f.protocol,
            f.state,
            choice,
            backends
        );
    }
    let _ = writeln!(s, "\n{:<30} {:>12}  MEANING", "COUNTER", "VALUE");
    for c in Counter::ALL {
        if let Some(v) = i.counters.get(c.name()) {
            let _ = writeln!(s, "{:<30} {v:>12}  {}", c.name(), c.help());
        }
    }
    s
}
