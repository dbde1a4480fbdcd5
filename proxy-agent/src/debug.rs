//! `/debug/services` on the metrics address: the frontends the agent programmed, with the
//! Service and port name each is for and why it is in its state, read-only (GET). Asked of the
//! sync loop, which owns the model and the maps' mirror, so it costs nothing until asked, and
//! the answer is what the loop had between two syncs.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, State as AxumState},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    inspect::{self, AgentView, FrontendView, state_of},
    model::{Algorithm, Frontend, FrontendSpec, Hold, Model, State, reason},
    sync::{Datapath, Syncer, service_key},
};

/// How long the endpoint waits for the sync loop (busy with a long sync) before it answers 503.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

type Ask = oneshot::Sender<Vec<FrontendView>>;

/// The endpoint's side: asks the sync loop.
#[derive(Clone)]
pub struct Asks {
    tx: mpsc::Sender<Ask>,
    bpffs_dir: Arc<PathBuf>,
}

/// The sync loop's side: [`Answers::next`] in its `select!`, then [`describe`].
pub struct Answers {
    rx: mpsc::Receiver<Ask>,
}

pub fn channel(bpffs_dir: PathBuf) -> (Asks, Answers) {
    // A few readers at once; more are told to come back (503) rather than queued.
    let (tx, rx) = mpsc::channel(4);
    let asks = Asks {
        tx,
        bpffs_dir: Arc::new(bpffs_dir),
    };
    (asks, Answers { rx })
}

impl Answers {
    /// The next question (pending forever once every [`Asks`] is gone).
    pub async fn next(&mut self) -> Ask {
        match self.rx.recv().await {
            Some(ask) => ask,
            None => std::future::pending().await,
        }
    }
}

pub fn router(asks: Asks) -> Router {
    Router::new()
        .route("/debug/services", get(services))
        .with_state(asks)
}

async fn services(
    AxumState(asks): AxumState<Asks>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> axum::response::Response {
    // Service names and pod IPs, for the node's own tools: --metrics-addr is bound to every
    // address for Prometheus in the DaemonSet, and the answer costs the sync loop a walk.
    if !peer.ip().is_loopback() {
        let why = "/debug/services answers on loopback only (proxy-agent services on the node)\n";
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    let busy = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{why}; try again\n"),
        )
    };
    let (tx, rx) = oneshot::channel();
    if asks.tx.try_send(tx).is_err() {
        return busy("too many /debug/services requests at once").into_response();
    }
    match tokio::time::timeout(ANSWER_WITHIN, rx).await {
        Ok(Ok(services)) => {
            let view = AgentView {
                bpffs_dir: asks.bpffs_dir.to_path_buf(),
                svc_map_id: inspect::svc_map_id(&asks.bpffs_dir),
                services,
            };
            match serde_json::to_string(&view) {
                Ok(body) => ([("content-type", "application/json")], body).into_response(),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            }
        }
        Ok(Err(_)) => busy("the agent is stopping").into_response(),
        Err(_) => {
            busy("the agent is busy with a sync (or has not finished its first)").into_response()
        }
    }
}

/// What the maps hold (the syncer's mirror of them), with the model's names and reasons, and
/// the frontends refused for want of room that the maps do not hold at all.
pub fn describe<D: Datapath>(model: &Model, syncer: &Syncer<D>) -> Vec<FrontendView> {
    let specs: HashMap<Frontend, &FrontendSpec> = model.frontends().map(|(f, s)| (*f, s)).collect();
    let maps = syncer.state();
    let mut out = inspect::frontends(maps);
    for v in &mut out {
        let Some(f) = v.frontend() else { continue };
        let owner = syncer.owner(&f);
        v.service = owner.map(ToString::to_string);
        // The model's spec, if it is for the Service the maps were written for.
        let spec = (specs.get(&f)).filter(|s| owner.is_none_or(|o| *o == s.service));
        if let Some(spec) = spec {
            v.service = Some(spec.service.to_string());
            v.port_name = Some(spec.about.port_name.to_string());
            v.endpoints = Some(spec.about.endpoints);
        }
        let programmed = maps.services.get(&service_key(&f, 0)).map(state_of);
        let hold = owner.and_then(|o| model.hold(o));
        v.reason = match (spec, programmed) {
            _ if syncer.is_refused(&f) => REFUSED_KEPT.into(),
            _ if hold == Some(Hold::Invalid) => HELD_INVALID.into(),
            _ if hold == Some(Hold::Clash) => HELD_CLASH.into(),
            (None, _) if model.holds_vip(f.vip) => HELD_VIP.into(),
            (Some(spec), Some(state)) if state == wanted(spec) => reason(state, Some(&spec.about)),
            (Some(_), _) => PENDING.into(),
            (None, _) => v.reason.clone(),
        };
    }
    let mut refused: Vec<FrontendView> = (specs.iter())
        .filter(|(f, _)| syncer.is_refused(f) && !maps.services.contains_key(&service_key(f, 0)))
        .map(|(f, spec)| FrontendView {
            vip: f.vip,
            port: f.port,
            protocol: f.proto.to_string(),
            service: Some(spec.service.to_string()),
            port_name: Some(spec.about.port_name.to_string()),
            state: "refused".into(),
            reason: REFUSED.into(),
            endpoints: Some(spec.about.endpoints),
            rev_nat_id: 0,
            algorithm: match syncer.algorithm_of(spec) {
                Algorithm::Random => "random",
                Algorithm::Maglev => "maglev",
            }
            .into(),
            affinity_timeout_s: spec.affinity_timeout_s,
            backends: Vec::new(),
        })
        .collect();
    refused.sort_by_key(FrontendView::frontend);
    out.extend(refused);
    out
}

/// The state the sync programs for `spec` (as `plan` writes its master).
fn wanted(spec: &FrontendSpec) -> State {
    match (spec.backends.len(), spec.no_local_endpoints) {
        (0, true) => State::NoLocalEndpoints,
        (0, false) => State::Reject,
        (n, _) => State::Active { backends: n },
    }
}

const REFUSED: &str =
    "refused: a map is full (see --max-* and the fill metrics); programmed when there is room";
const REFUSED_KEPT: &str =
    "refused: a map is full; the state shown is its previous one, until there is room";
const HELD_INVALID: &str =
    "its Service is invalid now: its last good state is kept (see the agent's log)";
const HELD_CLASH: &str =
    "its Service clashes with another on a ClusterIP: its last state is kept (see the agent's log)";
const HELD_VIP: &str = "an invalid Service names this ClusterIP: what is programmed on it is kept (see the agent's log)";
const PENDING: &str =
    "the maps differ from the model: a write failed or is still to come (the next sync retries)";

#[cfg(test)]
mod tests {

    use serde_json::{Value, json};

    use super::*;
    use crate::{
        capacity::Capacity,
        model::{Changes, EndpointCounts, Index, Objects, tests::sourced},
        sync::{MapState, tests::Fake},
    };

    fn svc(name: &str, ip: &str, local: bool) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                        "internalTrafficPolicy": if local { "Local" } else { "Cluster" }}})
    }

    fn slice(svc: &str, endpoints: &[(&str, bool, bool, bool)]) -> Value {
        let eps: Vec<Value> = (endpoints.iter())
            .map(|(ip, ready, serving, terminating)| {
                json!({"addresses": [ip], "nodeName": "node-b",
                       "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
            })
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": format!("{svc}-1"), "namespace": "default",
                            "labels": {"kubernetes.io/service-name": svc}},
               "ports": [{"name": "http", "port": 8080}], "endpoints": eps})
    }

    /// The reasons kube-proxy's choices come from, per frontend, from the model through the
    /// sync, as `/debug/services` shows them; and a frontend the maps had no room for.
    #[test]
    fn frontends_are_named_and_say_why_they_are_in_their_state() {
        let objects = Objects {
            services: ["web", "gone", "empty", "local", "late"]
                .iter()
                .enumerate()
                .map(|(i, n)| sourced(svc(n, &format!("10.96.0.{}", i + 1), *n == "local")))
                .collect(),
            slices: vec![
                sourced(slice(
                    "web",
                    &[
                        ("10.1.0.1", true, true, false),
                        ("10.1.0.2", false, false, true),
                    ],
                )),
                sourced(slice(
                    "gone",
                    &[
                        ("10.1.0.3", false, false, true),
                        ("10.1.0.4", false, false, true),
                    ],
                )),
                sourced(slice("local", &[("10.1.0.5", true, true, false)])),
                sourced(slice("late", &[("10.1.0.6", true, true, false)])),
            ],
            nodes: vec![],
        };
        let mut model = Model::default();
        let built = model.build(&Index::from_objects(&objects), Changes::All, "node-a", true);
        // Room for four frontends: the fifth ("late", last by address) is refused.
        let capacity = Capacity {
            frontends: 4,
            ..Capacity::default()
        };
        let mut syncer = Syncer::new(Fake::default(), MapState::default()).with_capacity(capacity);
        let report = syncer.sync(&built.desired);
        assert_eq!(report.errors.len(), 1, "{report:?}");

        let views = describe(&model, &syncer);
        let got: Vec<(String, Option<String>, String, String)> = (views.iter())
            .map(|v| {
                let svc = v
                    .service
                    .as_ref()
                    .map(|s| format!("{s}:{}", v.port_name.as_deref().unwrap_or("")));
                (
                    format!("{}:{}", v.vip, v.port),
                    svc,
                    v.state.clone(),
                    v.reason.clone(),
                )
            })
            .collect();
        let want = |f: &str, s: &str, state: &str, reason: &str| {
            (
                f.to_string(),
                Some(s.to_string()),
                state.to_string(),
                reason.to_string(),
            )
        };
        let refused = got.iter().find(|g| g.0 == "10.96.0.5:80").cloned();
        let mut got: Vec<_> = got.into_iter().filter(|g| g.0 != "10.96.0.5:80").collect();
        got.sort();
        assert_eq!(
            got,
            [
                want(
                    "10.96.0.1:80",
                    "default/web:http",
                    "active",
                    "1 ready endpoint"
                ),
                want(
                    "10.96.0.2:80",
                    "default/gone:http",
                    "reject",
                    "no ready endpoints (2 terminating)"
                ),
                want(
                    "10.96.0.3:80",
                    "default/empty:http",
                    "reject",
                    "no endpoints"
                ),
                want(
                    "10.96.0.4:80",
                    "default/local:http",
                    "no-local-endpoints",
                    "iTP=Local: no local endpoints (1 on other nodes)"
                ),
            ]
        );
        assert_eq!(
            refused,
            Some(want(
                "10.96.0.5:80",
                "default/late:http",
                "refused",
                REFUSED
            ))
        );
        let web = views.iter().find(|v| v.vip.octets()[3] == 1).unwrap();
        assert_eq!(
            web.endpoints,
            Some(EndpointCounts {
                ready: 1,
                terminating: 1,
                ..EndpointCounts::default()
            })
        );
        assert_eq!(web.backends.len(), 1);

        // "web" made invalid: its frontend keeps its last good state, and says why.
        let mut objects = objects;
        let mut bad = svc("web", "10.96.0.1", false);
        bad["spec"]["sessionAffinity"] = json!("Sometimes");
        objects.services[0] = sourced(bad);
        let built = model.build(&Index::from_objects(&objects), Changes::All, "node-a", true);
        syncer.sync(&built.desired);
        let views = describe(&model, &syncer);
        let web = views.iter().find(|v| v.vip.octets()[3] == 1).unwrap();
        assert_eq!(
            (
                web.service.as_deref(),
                web.state.as_str(),
                web.reason.as_str()
            ),
            (Some("default/web"), "active", HELD_INVALID)
        );
    }
}
