//! What a frontend is, for the people reading `proxy-agent services`: its Service port's name
//! and its endpoints by condition, and from them why the frontend is in its state ("no
//! ready endpoints (2 terminating)"). The sync never reads any of it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::topology::{Endpoint, Rule};

/// A frontend's Service port, as the model saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortAbout {
    /// The Service port's name ("" for the one unnamed port a Service may have).
    pub port_name: Arc<str>,
    /// Which of kube-proxy's rules chose its backends.
    pub rule: Rule,
    pub endpoints: EndpointCounts,
}

/// A Service port's endpoints (merged over its slices, one per address and port), by
/// condition. New fields must have a default: a newer `proxy-agent services` reads an older
/// agent's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointCounts {
    pub ready: u32,
    /// Terminating (of which `serving_terminating` still serve: the fallback when none is
    /// ready).
    pub terminating: u32,
    pub serving_terminating: u32,
    /// Neither ready nor terminating (starting, or failing its readiness probe).
    pub not_ready: u32,
    /// On this node, whatever their condition; and of those, the ready ones.
    pub local: u32,
    pub local_ready: u32,
}

impl EndpointCounts {
    pub fn of(endpoints: &[Endpoint]) -> Self {
        let mut c = EndpointCounts::default();
        for e in endpoints {
            match (e.ready, e.terminating) {
                (true, _) => c.ready += 1,
                (false, true) => c.terminating += 1,
                (false, false) => c.not_ready += 1,
            }
            c.serving_terminating += u32::from(!e.ready && e.terminating && e.serving);
            c.local += u32::from(e.local);
            c.local_ready += u32::from(e.local && e.ready);
        }
        c
    }

    pub fn total(&self) -> u32 {
        self.ready + self.terminating + self.not_ready
    }
}

/// A frontend's state as the programs act on it (see `proxy-agent services`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Connections go to `backends` backends.
    Active { backends: usize },
    /// No endpoint: connections are refused (ECONNREFUSED, kube-proxy's REJECT).
    Reject,
    /// iTP=Local and no endpoint on this node: EHOSTUNREACH.
    NoLocalEndpoints,
}

/// Why a frontend is in `state`, from what the model saw of its port (None: the maps alone,
/// without the agent).
pub fn reason(state: State, about: Option<&PortAbout>) -> String {
    let Some(a) = about else {
        return match state {
            State::Active { backends } => plural(backends, "backend"),
            State::Reject => "no usable endpoints".into(),
            State::NoLocalEndpoints => "iTP=Local: no local endpoints".into(),
        };
    };
    let e = &a.endpoints;
    match (state, a.rule) {
        (State::Active { .. }, Rule::Ready) => plural(e.ready as usize, "ready endpoint"),
        (State::Active { backends }, Rule::NodeHints) => {
            format!(
                "{backends} of {} ready: topology hints for this node",
                e.ready
            )
        }
        (State::Active { backends }, Rule::ZoneHints) => {
            format!(
                "{backends} of {} ready: topology hints for this zone",
                e.ready
            )
        }
        (State::Active { backends }, Rule::ServingTerminating) => {
            format!("no ready endpoints: using {backends} serving while terminating")
        }
        (State::Active { backends }, Rule::LocalReady) => format!(
            "iTP=Local: {backends} ready on this node, of {}",
            plural(e.total() as usize, "endpoint")
        ),
        (State::Active { backends }, Rule::LocalServingTerminating) => format!(
            "iTP=Local: none ready on this node: using {backends} serving while terminating"
        ),
        (State::Reject, _) if e.total() == 0 => "no endpoints".into(),
        (State::Reject, _) => {
            let mut parts = Vec::new();
            if e.terminating > 0 {
                parts.push(format!("{} terminating", e.terminating));
            }
            if e.not_ready > 0 {
                parts.push(format!("{} not ready", e.not_ready));
            }
            format!("no ready endpoints ({})", parts.join(", "))
        }
        (State::NoLocalEndpoints, _) if e.local == 0 => format!(
            "iTP=Local: no local endpoints ({} on other nodes)",
            e.total()
        ),
        (State::NoLocalEndpoints, _) => format!(
            "iTP=Local: no usable local endpoints ({} on this node, none ready or serving)",
            e.local
        ),
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::topology::{TrafficPolicy, categorize};

    fn ep(ready: bool, serving: bool, terminating: bool, local: bool) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            port: 80,
            ready,
            serving,
            terminating,
            local,
            zone_hints: Default::default(),
            node_hints: Default::default(),
        }
    }

    #[test]
    fn counts_sort_endpoints_by_condition() {
        let c = EndpointCounts::of(&[
            ep(true, true, false, true),
            ep(false, true, true, false),
            ep(false, false, true, false),
            ep(false, false, false, true),
        ]);
        assert_eq!(
            c,
            EndpointCounts {
                ready: 1,
                terminating: 2,
                serving_terminating: 1,
                not_ready: 1,
                local: 2,
                local_ready: 1,
            }
        );
        assert_eq!(c.total(), 4);
    }

    /// The reason for what kube-proxy's endpoint selection ([`categorize`]) decided, with the
    /// state the sync programs from it.
    #[test]
    fn reasons_name_what_kube_proxy_decided() {
        use TrafficPolicy::{Cluster, Local};
        let ready = ep(true, true, false, false);
        let terminating = ep(false, false, true, false);
        let serving_terminating = ep(false, true, true, false);
        let not_ready = ep(false, false, false, false);
        let local = ep(true, true, false, true);
        let local_serving_terminating = ep(false, true, true, true);
        let local_not_ready = ep(false, false, false, true);
        let mut node_hinted = ready.clone();
        node_hinted.node_hints.insert("node-a".into());
        let mut other_hinted = ready.clone();
        other_hinted.node_hints.insert("node-b".into());
        let mut zone_hinted = ready.clone();
        zone_hinted.zone_hints.insert("zone-a".into());
        let mut other_zone = ready.clone();
        other_zone.zone_hints.insert("zone-b".into());
        let cases: &[(TrafficPolicy, &[&Endpoint], &str)] = &[
            (Cluster, &[], "no endpoints"),
            (
                Cluster,
                &[&terminating, &terminating],
                "no ready endpoints (2 terminating)",
            ),
            (
                Cluster,
                &[&terminating, &not_ready],
                "no ready endpoints (1 terminating, 1 not ready)",
            ),
            (Cluster, &[&ready, &ready, &not_ready], "2 ready endpoints"),
            (
                Cluster,
                &[&serving_terminating, &terminating],
                "no ready endpoints: using 1 serving while terminating",
            ),
            (
                Cluster,
                &[&node_hinted, &other_hinted],
                "1 of 2 ready: topology hints for this node",
            ),
            (
                Cluster,
                &[&zone_hinted, &other_zone],
                "1 of 2 ready: topology hints for this zone",
            ),
            (
                Local,
                &[&ready, &ready],
                "iTP=Local: no local endpoints (2 on other nodes)",
            ),
            (
                Local,
                &[&local_not_ready, &ready],
                "iTP=Local: no usable local endpoints (1 on this node, none ready or serving)",
            ),
            (
                Local,
                &[&local, &ready],
                "iTP=Local: 1 ready on this node, of 2 endpoints",
            ),
            (
                Local,
                &[&local_serving_terminating, &ready],
                "iTP=Local: none ready on this node: using 1 serving while terminating",
            ),
        ];
        for (policy, eps, want) in cases {
            let eps: Vec<Endpoint> = eps.iter().map(|e| (*e).clone()).collect();
            let sel = categorize(&eps, *policy, "node-a", Some("zone-a"));
            // As the sync programs it (service.rs).
            let state = match (sel.reachable.len(), sel.has_any) {
                (0, true) => State::NoLocalEndpoints,
                (0, false) => State::Reject,
                (n, _) => State::Active { backends: n },
            };
            let about = PortAbout {
                port_name: "http".into(),
                rule: sel.rule,
                endpoints: EndpointCounts::of(&eps),
            };
            assert_eq!(reason(state, Some(&about)), *want, "{policy:?} {eps:?}");
        }
        assert_eq!(reason(State::Active { backends: 1 }, None), "1 backend");
        assert_eq!(reason(State::Reject, None), "no usable endpoints");
    }
}
