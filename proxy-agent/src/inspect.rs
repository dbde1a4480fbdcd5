//! `proxy-agent services`: what the pinned maps say, resolved the way the programs resolve it,
//! with the names (Service, port name) and reasons that only the running agent knows, asked
//! from its `/debug/services` (see `debug`). Without the agent it works from the maps alone.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use proxy_common::{Counter, SVC_FLAG_NO_LOCAL_ENDPOINTS, ServiceValue};
use serde::{Deserialize, Serialize};

use crate::{
    maps::{MapsError, PinnedMaps},
    model::{EndpointCounts, Frontend, Proto, State, reason},
    sync::{MapState, frontend_of},
};

/// One frontend. The JSON form of `proxy-agent services -o json` and of `/debug/services`
/// (documented in the README; fields are only ever added, and a new one must be an `Option`
/// or have a default, so a newer command reads an older agent's answer).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrontendView {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// The Service as `namespace/name`, and its port's name: from the agent (null from the
    /// maps alone).
    pub service: Option<String>,
    pub port_name: Option<String>,
    /// "active", "reject" (no endpoints: ECONNREFUSED), "no-local-endpoints" (EHOSTUNREACH),
    /// or, from the agent only, "refused" (not programmed: a map is full).
    pub state: String,
    /// Why it is in its state, in words.
    pub reason: String,
    /// Its port's endpoints by condition (from the agent; null from the maps alone).
    pub endpoints: Option<EndpointCounts>,
    pub rev_nat_id: u16,
    /// "random" or "maglev" (the frontend has a Maglev table).
    pub algorithm: String,
    /// ClientIP session affinity's timeout; 0: none.
    pub affinity_timeout_s: u32,
    pub backends: Vec<BackendView>,
}

impl FrontendView {
    pub fn frontend(&self) -> Option<Frontend> {
        let proto = match self.protocol.as_str() {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            _ => return None,
        };
        Some(Frontend {
            vip: self.vip,
            port: self.port,
            proto,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendView {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// `/debug/services`' answer: the agent's frontends, and which pins they are in (so a reader
/// never takes another agent's names for its maps').
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentView {
    pub bpffs_dir: PathBuf,
    /// The kernel's id of its pinned service map: the same map, whatever the path says (mount
    /// namespaces). Null if it could not be read.
    #[serde(default)]
    pub svc_map_id: Option<u32>,
    pub services: Vec<FrontendView>,
}

/// The kernel's id of the service map pinned in `dir`.
pub fn svc_map_id(dir: &Path) -> Option<u32> {
    aya::maps::MapInfo::from_pin(dir.join(proxy_common::SVC_MAP))
        .ok()
        .map(|i| i.id())
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub services: Vec<FrontendView>,
    pub counters: BTreeMap<&'static str, u64>,
    /// Where the names came from (the agent's `/debug/services`); null: the maps alone.
    pub names_from: Option<String>,
    /// Why the agent gave no names (null: it did, or it was not asked).
    pub names_error: Option<String>,
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
        names_from: None,
        names_error: None,
    })
}

/// The state a master entry programs.
pub fn state_of(m: &ServiceValue) -> State {
    match (m.count, m.flags & SVC_FLAG_NO_LOCAL_ENDPOINTS != 0) {
        (0, true) => State::NoLocalEndpoints,
        (0, false) => State::Reject,
        (n, _) => State::Active {
            backends: n as usize,
        },
    }
}

pub fn state_name(s: State) -> &'static str {
    match s {
        State::Active { .. } => "active",
        State::Reject => "reject",
        State::NoLocalEndpoints => "no-local-endpoints",
    }
}

/// Frontends as a reader of the maps sees them: masters and the backends their slots
/// resolve to, without names.
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
            .collect::<Vec<_>>();
        // What the programs do: a slot naming no backend is a connect that fails.
        let s = match state_of(m) {
            State::Active { .. } => State::Active {
                backends: backends.len(),
            },
            other => other,
        };
        out.push(FrontendView {
            vip: f.vip,
            port: f.port,
            protocol: f.proto.to_string(),
            service: None,
            port_name: None,
            state: state_name(s).into(),
            reason: reason(s, None),
            endpoints: None,
            rev_nat_id: m.rev_nat_id,
            algorithm: if m.maglev_table != 0 {
                "maglev"
            } else {
                "random"
            }
            .into(),
            affinity_timeout_s: m.affinity_timeout_s,
            backends,
        });
    }
    out
}

/// The maps' frontends with the agent's names and reasons, and the frontends the agent has
/// but could not program (refused). The maps stay the truth: a frontend the agent describes in
/// another state than the maps hold (a sync between the two reads) keeps the maps' reason.
pub fn with_names(maps: Vec<FrontendView>, agent: Vec<FrontendView>) -> Vec<FrontendView> {
    let key = |v: &FrontendView| (v.vip, v.port, v.protocol.clone());
    let mut named: HashMap<_, FrontendView> = agent.into_iter().map(|v| (key(&v), v)).collect();
    let mut out: Vec<FrontendView> = maps
        .into_iter()
        .map(|mut v| {
            if let Some(a) = named.remove(&key(&v)) {
                v.service = a.service;
                v.port_name = a.port_name;
                v.endpoints = a.endpoints;
                // The agent's reason describes its state: only where the maps agree.
                if (a.state == v.state && a.backends == v.backends) || a.state == "refused" {
                    v.reason = a.reason;
                }
            }
            v
        })
        .collect();
    let mut refused: Vec<FrontendView> = named
        .into_values()
        .filter(|v| v.state == "refused")
        .collect();
    refused.sort_by_key(key);
    out.extend(refused);
    out
}

/// `--service` and `--vip`.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `namespace/name`.
    pub service: Option<String>,
    pub vip: Option<Ipv4Addr>,
}

impl Filter {
    pub fn keeps(&self, v: &FrontendView) -> bool {
        self.vip.is_none_or(|ip| v.vip == ip)
            && (self.service.as_deref()).is_none_or(|s| v.service.as_deref() == Some(s))
    }
}

/// Why the names could not be had from the agent.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no answer from the agent at {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("the agent at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the agent at {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the agent at {addr} sent an answer that is not /debug/services': {source}")]
    Decode {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error("the agent at {addr} programs {theirs}, not {ours}")]
    OtherPins {
        addr: SocketAddr,
        theirs: PathBuf,
        ours: PathBuf,
    },
}

/// The running agent's frontends, from its `/debug/services` on `addr`, if it programs the
/// maps in `bpffs_dir`.
pub fn ask_agent(
    addr: SocketAddr,
    bpffs_dir: &Path,
    timeout: Duration,
) -> Result<Vec<FrontendView>, AskError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AskError::Http {
            addr,
            source: e.into(),
        })?;
    let body = rt
        .block_on(async { tokio::time::timeout(timeout, get(addr, "/debug/services")).await })
        .map_err(|_| AskError::Timeout { addr, timeout })??;
    let view: AgentView =
        serde_json::from_slice(&body).map_err(|source| AskError::Decode { addr, source })?;
    let same = match (view.svc_map_id, svc_map_id(bpffs_dir)) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => {
            let (a, b) = (&view.bpffs_dir, bpffs_dir);
            let canonical = |p: &Path| p.canonicalize().ok();
            a == b || canonical(a).is_some_and(|a| canonical(b) == Some(a))
        }
    };
    if !same {
        return Err(AskError::OtherPins {
            addr,
            theirs: view.bpffs_dir,
            ours: bpffs_dir.to_path_buf(),
        });
    }
    Ok(view.services)
}

/// One HTTP/1.1 GET on loopback or the node (hyper's connection API: no pool, no TLS needed).
async fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, AskError> {
    use http_body_util::{BodyExt as _, Empty};
    let http = |e: Box<dyn std::error::Error + Send + Sync>| AskError::Http { addr, source: e };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| http(e.into()))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| http(e.into()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<hyper::body::Bytes>::new())
        .map_err(|e| http(e.into()))?;
    let resp = send.send_request(req).await.map_err(|e| http(e.into()))?;
    let status = resp.status().as_u16();
    let body = (resp.into_body().collect().await)
        .map_err(|e| http(e.into()))?
        .to_bytes()
        .to_vec();
    if status != 200 {
        return Err(AskError::Status {
            addr,
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Ok(body)
}

pub fn render_table(i: &Inspection) -> String {
    let mut rows = vec![
        [
            "FRONTEND", "PROTO", "SERVICE", "STATE", "REASON", "CHOICE", "BACKENDS",
        ]
        .map(String::from),
    ];
    for f in &i.services {
        let backends = if f.backends.is_empty() {
            "-".to_string()
        } else {
            (f.backends.iter())
                .map(|b| format!("{}:{}", b.ip, b.port))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let choice = match f.affinity_timeout_s {
            0 => f.algorithm.clone(),
            t => format!("{}+ClientIP/{t}s", f.algorithm),
        };
        let service = match (&f.service, f.port_name.as_deref()) {
            (None, _) => "-".to_string(),
            (Some(s), None | Some("")) => s.clone(),
            (Some(s), Some(p)) => format!("{s}:{p}"),
        };
        rows.push([
            format!("{}:{}", f.vip, f.port),
            f.protocol.clone(),
            service,
            f.state.clone(),
            f.reason.clone(),
            choice,
            backends,
        ]);
    }
    let mut widths = [0; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, w) in r.iter().zip(widths).take(6) {
            let _ = write!(line, "{c:<w$}  ");
        }
        line.push_str(&r[6]);
        let _ = writeln!(s, "{}", line.trim_end());
    }
    match (&i.names_from, &i.names_error) {
        (Some(url), _) => {
            let _ = writeln!(s, "(names and reasons from the agent: {url})");
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "(from the maps alone, without names: {e})");
        }
        (None, None) => {
            let _ = writeln!(s, "(from the maps alone, without names)");
        }
    }
    let _ = writeln!(s, "\n{:<30} {:>12}  MEANING", "COUNTER", "VALUE");
    for c in Counter::ALL {
        if let Some(v) = i.counters.get(c.name()) {
            let _ = writeln!(s, "{:<30} {v:>12}  {}", c.name(), c.help());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(vip: [u8; 4], port: u16, state: &str, reason: &str) -> FrontendView {
        FrontendView {
            vip: Ipv4Addr::from(vip),
            port,
            protocol: "TCP".into(),
            service: None,
            port_name: None,
            state: state.into(),
            reason: reason.into(),
            endpoints: None,
            rev_nat_id: 1,
            algorithm: "random".into(),
            affinity_timeout_s: 0,
            backends: vec![],
        }
    }

    fn named(mut v: FrontendView, service: &str) -> FrontendView {
        v.service = Some(service.into());
        v.port_name = Some("http".into());
        v.endpoints = Some(EndpointCounts::default());
        v
    }

    #[test]
    fn names_join_the_maps_by_frontend_and_the_maps_stay_the_truth() {
        let maps = vec![
            view([10, 96, 0, 1], 80, "active", "2 backends"),
            view([10, 96, 0, 2], 80, "reject", "no usable endpoints"),
            view([10, 96, 0, 3], 80, "active", "1 backend"),
        ];
        let agent = vec![
            named(
                view([10, 96, 0, 1], 80, "active", "2 ready endpoints"),
                "a/one",
            ),
            // The agent programmed it since the maps were read: names, not its reason.
            named(
                view([10, 96, 0, 2], 80, "active", "1 ready endpoint"),
                "a/two",
            ),
            named(
                view([10, 96, 0, 9], 80, "refused", "refused: a map is full"),
                "a/nine",
            ),
            // Gone from the maps: not shown.
            named(
                view([10, 96, 0, 8], 80, "active", "1 ready endpoint"),
                "a/eight",
            ),
        ];
        let out = with_names(maps, agent);
        let got: Vec<_> = (out.iter())
            .map(|v| {
                (
                    v.vip.octets()[3],
                    v.service.as_deref(),
                    v.state.as_str(),
                    v.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, Some("a/one"), "active", "2 ready endpoints"),
                (2, Some("a/two"), "reject", "no usable endpoints"),
                (3, None, "active", "1 backend"),
                (9, Some("a/nine"), "refused", "refused: a map is full"),
            ]
        );
    }

    /// An agent programming other pins (another agent on the node, a test's) gives no names;
    /// an agent's error answer is passed on.
    #[test]
    fn names_come_only_from_the_agent_of_these_pins() {
        use axum::{Router, http::StatusCode, routing::get};
        let serve = |app: Router| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            let addr = l.local_addr().unwrap();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(l).unwrap();
                    axum::serve(l, app).await.unwrap();
                });
            });
            addr
        };
        let theirs =
            serde_json::json!({"bpffs_dir": "/sys/fs/bpf/other", "services": []}).to_string();
        let other =
            serve(Router::new().route("/debug/services", get(move || async move { theirs })));
        let within = Duration::from_secs(5);
        let ours = Path::new("/sys/fs/bpf/proxy-test-ours");
        let err = ask_agent(other, ours, within).unwrap_err();
        assert!(matches!(err, AskError::OtherPins { .. }), "{err}");
        let dir = serde_json::json!({"bpffs_dir": ours, "services": []}).to_string();
        let same = serve(Router::new().route("/debug/services", get(move || async move { dir })));
        assert_eq!(ask_agent(same, ours, within).unwrap(), vec![]);
        let busy = serve(Router::new().route(
            "/debug/services",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "busy; try again") }),
        ));
        let err = ask_agent(busy, ours, within).unwrap_err();
        assert!(matches!(err, AskError::Status { status: 503, .. }), "{err}");
    }

    #[test]
    fn filters_select_by_service_and_vip() {
        let a = named(view([10, 96, 0, 1], 80, "active", ""), "a/one");
        let b = named(view([10, 96, 0, 2], 80, "active", ""), "b/two");
        let by_service = Filter {
            service: Some("b/two".into()),
            vip: None,
        };
        assert!(!by_service.keeps(&a) && by_service.keeps(&b));
        let by_vip = Filter {
            service: None,
            vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
        };
        assert!(by_vip.keeps(&a) && !by_vip.keeps(&b));
        assert!(Filter::default().keeps(&a));
    }

    #[test]
    fn the_table_names_the_service_and_port_and_says_where_names_came_from() {
        let i = Inspection {
            services: vec![named(
                view(
                    [10, 96, 0, 1],
                    80,
                    "reject",
                    "no ready endpoints (2 terminating)",
                ),
                "default/web",
            )],
            counters: BTreeMap::new(),
            names_from: Some("http://127.0.0.1:10249/debug/services".into()),
            names_error: None,
        };
        let t = render_table(&i);
        let row = t.lines().nth(1).unwrap();
        assert!(row.contains("default/web:http"), "{t}");
        assert!(row.contains("no ready endpoints (2 terminating)"), "{t}");
        assert!(
            t.contains("from the agent: http://127.0.0.1:10249/debug/services"),
            "{t}"
        );
    }
}
