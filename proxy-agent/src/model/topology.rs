//! Which endpoints of a Service port this node may use: kube-proxy's `CategorizeEndpoints`
//! (pkg/proxy/topology.go), restricted to ClusterIP traffic, so only
//! `internalTrafficPolicy` applies. Pure; the table tests below are kube-proxy's own cases.

use std::{collections::BTreeSet, net::Ipv4Addr};

/// One endpoint of one Service port, after EndpointSlice merging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName` equals this node's name.
    pub local: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    fn usable_fallback(&self) -> bool {
        self.serving && self.terminating
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// Where this node's traffic to one Service port may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Endpoints this node may pick from (kube-proxy's `allReachableEndpoints`).
    pub reachable: Vec<Endpoint>,
    /// Some endpoint is usable somewhere in the cluster (`hasAnyEndpoints`). With `reachable`
    /// empty this means "iTP=Local and none here", which must not be answered as "no endpoints".
    pub has_any: bool,
    /// Which of kube-proxy's rules chose `reachable` (for people: `proxy-agent services`).
    pub rule: Rule,
}

/// The rule [`categorize`] applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Rule {
    /// Every ready endpoint.
    #[default]
    Ready,
    /// The ready endpoints hinted for this node, or for this node's zone.
    NodeHints,
    ZoneHints,
    /// None ready: the serving, terminating ones (kube-proxy's fallback).
    ServingTerminating,
    /// iTP=Local: this node's ready endpoints, or, none of them ready, its serving,
    /// terminating ones.
    LocalReady,
    LocalServingTerminating,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

/// kube-proxy's `CategorizeEndpoints` for ClusterIP traffic.
pub fn categorize(
    endpoints: &[Endpoint],
    policy: TrafficPolicy,
    node_name: &str,
    zone: Option<&str>,
) -> Selection {
    match policy {
        TrafficPolicy::Cluster => {
            let topology = topology_from_hints(endpoints, node_name, zone);
            let mut reachable: Vec<Endpoint> = endpoints
                .iter()
                .filter(|ep| ep.ready && available_for_topology(ep, topology, node_name, zone))
                .cloned()
                .collect();
            let mut rule = match topology {
                Topology::None => Rule::Ready,
                Topology::SameNode => Rule::NodeHints,
                Topology::SameZone => Rule::ZoneHints,
            };
            // No ready endpoint anywhere (topology was already ignored if none were ready for
            // it): fall back to serving+terminating ones.
            if reachable.is_empty() {
                reachable = endpoints
                    .iter()
                    .filter(|ep| ep.usable_fallback())
                    .cloned()
                    .collect();
                rule = Rule::ServingTerminating;
            }
            let has_any = !reachable.is_empty();
            Selection {
                reachable,
                has_any,
                rule,
            }
        }
        TrafficPolicy::Local => {
            let has_any = endpoints.iter().any(|ep| ep.ready || ep.usable_fallback());
            let local_ready = endpoints.iter().any(|ep| ep.local && ep.ready);
            let reachable = endpoints
                .iter()
                .filter(|ep| {
                    ep.local
                        && if local_ready {
                            ep.ready
                        } else {
                            ep.usable_fallback()
                        }
                })
                .cloned()
                .collect();
            let rule = if local_ready {
                Rule::LocalReady
            } else {
                Rule::LocalServingTerminating
            };
            Selection {
                reachable,
                has_any,
                rule,
            }
        }
    }
}

/// kube-proxy's `topologyModeFromHints`: node hints if every ready endpoint has one and one
/// names this node; else zone hints if every ready endpoint has one and one names our zone.
fn topology_from_hints(endpoints: &[Endpoint], node_name: &str, zone: Option<&str>) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|ep| ep.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if ready.iter().all(|ep| !ep.node_hints.is_empty())
        && ready.iter().any(|ep| ep.node_hints.contains(node_name))
    {
        return Topology::SameNode;
    }
    if let Some(zone) = zone
        && ready.iter().all(|ep| !ep.zone_hints.is_empty())
        && ready.iter().any(|ep| ep.zone_hints.contains(zone))
    {
        return Topology::SameZone;
    }
    Topology::None
}

fn available_for_topology(ep: &Endpoint, t: Topology, node_name: &str, zone: Option<&str>) -> bool {
    match t {
        Topology::None => true,
        Topology::SameNode => ep.node_hints.contains(node_name),
        Topology::SameZone => zone.is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builder for kube-proxy's `BaseEndpointInfo{Endpoint: "10.0.0.0:80", ...}` literals.
    #[derive(Clone)]
    struct Ep(Endpoint);
    fn ep(addr: &str) -> Ep {
        let (ip, port) = addr.split_once(':').unwrap();
        Ep(Endpoint {
            ip: ip.parse().unwrap(),
            port: port.parse().unwrap(),
            ready: false,
            serving: false,
            terminating: false,
            local: false,
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        })
    }
    impl Ep {
        fn ready(mut self) -> Self {
            // kube-proxy: a Ready endpoint is also Serving.
            self.0.ready = true;
            self.0.serving = true;
            self
        }
        fn serving_terminating(mut self) -> Self {
            self.0.serving = true;
            self.0.terminating = true;
            self
        }
        fn local(mut self) -> Self {
            self.0.local = true;
            self
        }
        fn zones(mut self, z: &[&str]) -> Self {
            self.0.zone_hints = z.iter().map(std::string::ToString::to_string).collect();
            self
        }
        fn nodes(mut self, n: &[&str]) -> Self {
            self.0.node_hints = n.iter().map(std::string::ToString::to_string).collect();
            self
        }
    }

    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        policy: TrafficPolicy,
        endpoints: Vec<Ep>,
        reachable: &'static [&'static str],
        has_any: bool,
    }

    fn run(cases: Vec<Case>) {
        for c in cases {
            let eps: Vec<Endpoint> = c.endpoints.into_iter().map(|e| e.0).collect();
            let sel = categorize(&eps, c.policy, "node-a", c.zone);
            let got: BTreeSet<String> = sel
                .reachable
                .iter()
                .map(|e| format!("{}:{}", e.ip, e.port))
                .collect();
            let want: BTreeSet<String> = c
                .reachable
                .iter()
                .map(std::string::ToString::to_string)
                .collect();
            assert_eq!(got, want, "case {:?}: reachable", c.name);
            assert_eq!(sel.has_any, c.has_any, "case {:?}: has_any", c.name);
        }
    }

    use TrafficPolicy::{Cluster, Local};

    #[test]
    fn kube_proxy_categorize_endpoints_cases() {
        let four_zoned = || {
            vec![
                ep("10.1.2.3:80").zones(&["zone-a"]).ready(),
                ep("10.1.2.4:80").zones(&["zone-b"]).ready(),
                ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
                ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
            ]
        };
        run(vec![
            Case {
                name: "hints: same-zone filtering",
                zone: Some("zone-a"),
                policy: Cluster,
                endpoints: four_zoned(),
                reachable: &["10.1.2.3:80", "10.1.2.6:80"],
                has_any: true,
            },
            Case {
                name: "iTP Local: topology ignored for local endpoints",
                zone: Some("zone-a"),
                policy: Local,
                endpoints: vec![
                    ep("10.1.2.3:80").zones(&["zone-a"]).ready().local(),
                    ep("10.1.2.4:80").zones(&["zone-b"]).ready().local(),
                    ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
                ],
                reachable: &["10.1.2.3:80", "10.1.2.4:80"],
                has_any: true,
            },
            Case {
                name: "empty node labels: no filtering",
                zone: None,
                policy: Cluster,
                endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
                reachable: &["10.1.2.3:80"],
                has_any: true,
            },
            Case {
                name: "node in different zone: no filtering",
                zone: Some("zone-b"),
                policy: Cluster,
                endpoints: vec![ep("10.1.2.3:80").zones(&["zone-a"]).ready()],
                reachable: &["10.1.2.3:80"],
                has_any: true,
            },
            Case {
                name: "unready endpoint in our zone is not used",
                zone: Some("zone-a"),
                policy: Cluster,
                endpoints: vec![
                    ep("10.1.2.3:80").zones(&["zone-a"]).ready(),
                    ep("10.1.2.4:80").zones(&["zone-b"]).ready(),
                    ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    ep("10.1.2.6:80").zones(&["zone-a"]),
                ],
                reachable: &["10.1.2.3:80"],
                has_any: true,
            },
            Case {
                name: "only unready endpoints in same zone: should not filter",
                zone: Some("zone-a"),
                policy: Cluster,
                endpoints: vec![
                    ep("10.1.2.3:80").zones(&["zone-a"]),
                    ep("10.1.2.4:80").zones(&["zone-b"]).ready(),
                    ep("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    ep("10.1.2.6:80").zones(&["zone-a"]),
                ],
                reachable: &["10.1.2.4:80", "10.1.2.5:80"],
                has_any: true,
            },
            Case {
                name: "missing hints: no filtering",
                zone: Some("zone-a"),
                policy: Cluster,
                endpoints: vec![
                    ep("10.1.2.3:80").zones(&["zone-a"]).ready(),
                    ep("10.1.2.4:80").zones(&["zone-b"]).ready(),
                    ep("10.1.2.5:80").ready(),
                    ep("10.1.2.6:80").zones(&["zone-a"]).ready(),
                ],
                reachable: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"],
                has_any: true,
            },
            Case {
                name: "multiple hints per endpoint",
                zone: Some("zone-c"),
                policy: Cluster,
                endpoints: vec![
                    ep("10.1.2.3:80")
                        .zones(&["zone-a", "zone-b", "zone-c"])
                        .ready(),
                    ep("10.1.2.4:80").zones(&["zone-b", "zone-c"]).ready(),
                    ep("10.1.2.5:80").zones(&["zone-b", "zone-d"]).ready(),
                    ep("10.1.2.6:80").zones(&["zone-c"]).ready(),
                ],
                reachable: &["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"],
                has_any: true,
            },
            Case {
                name: "PreferSameNode: node hints win over zone hints",
                zone: Some("zone-a"),
                policy: Cluster,
                endpoints: vec![
                    ep("10.1.2.3:80")
                        .zones(&["zone-a"])
                        .nodes(&["node-a"])
                        .ready(),
                    ep("10.1.2.4:80")
                        .zones(&["zone-a"])
                        .nodes(&["node-b"])
                        .ready(),
                ],
                reachable: &["10.1.2.3:80"],
                has_any: true,
            },
            Case {
                name: "PreferSameNode: no hint for this node falls back to zone",
                zone: Some("zone-a"),
                policy: Cluster,
                endpoints: vec![
                    ep("10.1.2.3:80")
                        .zones(&["zone-a"])
                        .nodes(&["node-c"])
                        .ready(),
                    ep("10.1.2.4:80")
                        .zones(&["zone-b"])
                        .nodes(&["node-b"])
                        .ready(),
                ],
                reachable: &["10.1.2.3:80"],
                has_any: true,
            },
            Case {
                name: "iTP Local, with empty endpoints",
                zone: None,
                policy: Local,
                endpoints: vec![],
                reachable: &[],
                has_any: false,
            },
            Case {
                name: "iTP Local, but all endpoints are remote",
                zone: None,
                policy: Local,
                endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready()],
                reachable: &[],
                has_any: true,
            },
            Case {
                name: "iTP Local, all endpoints are local",
                zone: None,
                policy: Local,
                endpoints: vec![
                    ep("10.0.0.0:80").ready().local(),
                    ep("10.0.0.1:80").ready().local(),
                ],
                reachable: &["10.0.0.0:80", "10.0.0.1:80"],
                has_any: true,
            },
            Case {
                name: "iTP Local, some endpoints are local",
                zone: None,
                policy: Local,
                endpoints: vec![ep("10.0.0.0:80").ready().local(), ep("10.0.0.1:80").ready()],
                reachable: &["10.0.0.0:80"],
                has_any: true,
            },
            Case {
                name: "Cluster, endpoints not Ready",
                zone: None,
                policy: Cluster,
                endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80")],
                reachable: &[],
                has_any: false,
            },
            Case {
                name: "Cluster, some endpoints are Ready",
                zone: None,
                policy: Cluster,
                endpoints: vec![ep("10.0.0.0:80"), ep("10.0.0.1:80").ready()],
                reachable: &["10.0.0.1:80"],
                has_any: true,
            },
            Case {
                name: "Cluster, all endpoints are serving+terminating: fallback",
                zone: None,
                policy: Cluster,
                endpoints: vec![
                    ep("10.0.0.0:80").serving_terminating().local(),
                    ep("10.0.0.1:80").serving_terminating(),
                ],
                reachable: &["10.0.0.0:80", "10.0.0.1:80"],
                has_any: true,
            },
            Case {
                name: "Cluster, ready endpoints beat terminating ones",
                zone: None,
                policy: Cluster,
                endpoints: vec![
                    ep("10.0.0.0:80").ready(),
                    ep("10.0.0.1:80").local(),
                    ep("10.0.0.2:80").serving_terminating().local(),
                    ep("10.0.0.3:80").serving_terminating(),
                ],
                reachable: &["10.0.0.0:80"],
                has_any: true,
            },
            Case {
                name: "Cluster, terminating but not serving is never used",
                zone: None,
                policy: Cluster,
                endpoints: vec![{
                    let mut e = ep("10.0.0.0:80");
                    e.0.terminating = true;
                    e
                }],
                reachable: &[],
                has_any: false,
            },
            Case {
                name: "iTP Local, all endpoints remote and terminating",
                zone: None,
                policy: Local,
                endpoints: vec![
                    ep("10.0.0.0:80").serving_terminating(),
                    ep("10.0.0.1:80").serving_terminating(),
                ],
                reachable: &[],
                has_any: true,
            },
            Case {
                name: "iTP Local, local serving+terminating used when no local ready",
                zone: None,
                policy: Local,
                endpoints: vec![
                    ep("10.0.0.0:80").ready(),
                    ep("10.0.0.1:80").local(),
                    ep("10.0.0.2:80").serving_terminating().local(),
                    ep("10.0.0.3:80").serving_terminating(),
                ],
                reachable: &["10.0.0.2:80"],
                has_any: true,
            },
            Case {
                name: "no cluster endpoints for iTP Local internal-only service",
                zone: None,
                policy: Local,
                endpoints: vec![ep("10.0.0.0:80").ready(), ep("10.0.0.1:80").ready().local()],
                reachable: &["10.0.0.1:80"],
                has_any: true,
            },
        ]);
    }
}
