//! What a frontend is, for the people reading `proxy-agent services`: its Service port's name
//! and its endpoints by condition, and from them why the frontend is in its state ("no
//! ready endpoints (2 terminating)"). The sync never reads any of it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::topology::{Endpoint, TrafficPolicy};

/// A frontend's Service port, as the model saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortAbout {
    /// The Service port's name ("" for the one unnamed port a Service may have).
    pub port_name: Arc<str>,
    pub traffic_policy: TrafficPolicy,
    pub endpoints: EndpointCounts,
}

/// A Service port's endpoints (merged over its slices), by condition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCounts {
    pub ready: u32,
    /// Terminating (of which `serving_terminating` still serve: the fallback when none is
    /// ready).
    pub terminating: u32,
    pub serving_terminating: u32,
    /// Neither ready nor terminating (starting, or failing its readiness probe).
    pub not_ready: u32,
    /// On this node, whatever their condition.
    pub local: u32,
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
    match state {
        State::Active { backends } if a.traffic_policy == TrafficPolicy::Local => {
            format!(
                "iTP=Local: {backends} local of {}",
                plural(e.total() as usize, "endpoint")
            )
        }
        State::Active { .. } if e.ready == 0 => format!(
            "no ready endpoints: using {} serving while terminating",
            e.serving_terminating
        ),
        State::Active { backends } if backends < e.ready as usize => {
            format!("{backends} of {} ready (topology hints)", e.ready)
        }
        State::Active { .. } => plural(e.ready as usize, "ready endpoint"),
        State::Reject if e.total() == 0 => "no endpoints".into(),
        State::Reject => {
            let mut parts = Vec::new();
            if e.terminating > 0 {
                parts.push(format!("{} terminating", e.terminating));
            }
            if e.not_ready > 0 {
                parts.push(format!("{} not ready", e.not_ready));
            }
            format!("no ready endpoints ({})", parts.join(", "))
        }
        State::NoLocalEndpoints => format!(
            "iTP=Local: no local endpoints ({} on other nodes)",
            e.total() - e.local.min(e.total())
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

    fn about(policy: TrafficPolicy, eps: &[Endpoint]) -> PortAbout {
        PortAbout {
            port_name: "http".into(),
            traffic_policy: policy,
            endpoints: EndpointCounts::of(eps),
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
                local: 2
            }
        );
        assert_eq!(c.total(), 4);
    }

    #[test]
    fn reasons_name_what_kube_proxy_decided_on() {
        use TrafficPolicy::{Cluster, Local};
        let ready = ep(true, true, false, false);
        let terminating = ep(false, false, true, false);
        let serving_terminating = ep(false, true, true, false);
        let not_ready = ep(false, false, false, false);
        let local = ep(true, true, false, true);
        let cases: &[(State, PortAbout, &str)] = &[
            (State::Reject, about(Cluster, &[]), "no endpoints"),
            (
                State::Reject,
                about(Cluster, &[terminating.clone(), terminating.clone()]),
                "no ready endpoints (2 terminating)",
            ),
            (
                State::Reject,
                about(Cluster, &[terminating.clone(), not_ready.clone()]),
                "no ready endpoints (1 terminating, 1 not ready)",
            ),
            (
                State::Active { backends: 2 },
                about(Cluster, &[ready.clone(), ready.clone(), not_ready.clone()]),
                "2 ready endpoints",
            ),
            (
                State::Active { backends: 1 },
                about(Cluster, &[serving_terminating.clone(), terminating.clone()]),
                "no ready endpoints: using 1 serving while terminating",
            ),
            (
                State::Active { backends: 1 },
                about(Cluster, &[ready.clone(), ready.clone()]),
                "1 of 2 ready (topology hints)",
            ),
            (
                State::NoLocalEndpoints,
                about(Local, &[ready.clone(), ready.clone()]),
                "iTP=Local: no local endpoints (2 on other nodes)",
            ),
            (
                State::Active { backends: 1 },
                about(Local, &[local.clone(), ready.clone()]),
                "iTP=Local: 1 local of 2 endpoints",
            ),
        ];
        for (state, about, want) in cases {
            assert_eq!(reason(*state, Some(about)), *want, "{state:?} {about:?}");
        }
        assert_eq!(reason(State::Active { backends: 1 }, None), "1 backend");
        assert_eq!(reason(State::Reject, None), "no usable endpoints");
    }
}
