//! kube-proxy's EndpointSliceCache for one Service: its slices' endpoints merged per Service
//! port.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{Problem, ProblemReason, Proto, Slice, Sourced, problem::problem, topology::Endpoint};

/// Endpoints of one Service's ports: (port name, protocol) -> endpoints.
pub(super) type EndpointsByPort = BTreeMap<(String, Proto), Vec<Endpoint>>;

/// kube-proxy's EndpointSliceCache for one Service: endpoints per (port name, protocol),
/// merged over the Service's slices (given in name order, so the result is deterministic),
/// deduplicated by ip:port (a local copy wins, as in kube-proxy).
pub(super) fn merge_slices<'a>(
    slices: impl Iterator<Item = &'a Sourced<Slice>>,
    node_name: &str,
    own_vips: &[Ipv4Addr],
    problems: &mut Vec<Problem>,
) -> EndpointsByPort {
    // Deduplicated by ip:port while merging.
    let mut merged: BTreeMap<_, BTreeMap<(Ipv4Addr, u16), Endpoint>> = BTreeMap::new();
    for src in slices {
        let slice = &src.object;
        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().enumerate() {
            let Some(addr) = &ep.address else {
                continue;
            };
            let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                problems.push(problem(
                    src,
                    "EndpointSlice",
                    format!("endpoints[{i}].addresses[0]"),
                    ProblemReason::InvalidIp,
                    format!("{addr:?} is not an IPv4 address; endpoint ignored"),
                ));
                continue;
            };
            let what = not_a_pod_address(ip).or_else(|| {
                own_vips
                    .contains(&ip)
                    .then_some("the Service's own ClusterIP")
            });
            if let Some(what) = what {
                problems.push(problem(
                    src,
                    "EndpointSlice",
                    format!("endpoints[{i}].addresses[0]"),
                    ProblemReason::InvalidIp,
                    format!("{ip} is {what}, not a pod's address; endpoint ignored"),
                ));
                continue;
            }
            let ready = ep.ready.unwrap_or(true);
            // The port is filled in per slice port below.
            endpoints.push(Endpoint {
                ip,
                port: 0,
                ready,
                serving: ep.serving.unwrap_or(ready),
                terminating: ep.terminating.unwrap_or(false),
                local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                zone_hints: ep.zone_hints.clone(),
                node_hints: ep.node_hints.clone(),
            });
        }
        for (i, port) in slice.ports.iter().enumerate() {
            // kube-proxy ignores ports with a nil name or a nil/zero port.
            let Some(name) = port.name.clone() else {
                continue;
            };
            let Some(num) = port.port.filter(|p| *p != 0) else {
                continue;
            };
            let Ok(num) = u16::try_from(num) else {
                problems.push(problem(
                    src,
                    "EndpointSlice",
                    format!("ports[{i}].port"),
                    ProblemReason::InvalidPort,
                    format!("{num} is not in 1..65535; port ignored"),
                ));
                continue;
            };
            let proto = match port.protocol.as_deref() {
                None | Some("TCP") => Proto::Tcp,
                Some("UDP") => Proto::Udp,
                // SCTP or unknown: no Service port of ours can join it.
                Some(_) => continue,
            };
            let set = merged.entry((name, proto)).or_default();
            for e in &endpoints {
                if e.local || !set.contains_key(&(e.ip, num)) {
                    set.insert(
                        (e.ip, num),
                        Endpoint {
                            port: num,
                            ..e.clone()
                        },
                    );
                }
            }
        }
    }
    merged
        .into_iter()
        .map(|(k, v)| (k, v.into_values().collect()))
        .collect()
}

/// Addresses no pod has, which the API server's EndpointSlice validation refuses too
/// (`ValidateEndpointIP`: unspecified, loopback, link-local; here also broadcast and
/// multicast, which no connect can reach as one backend).
fn not_a_pod_address(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}
