//! The heart of the agent: a pure function from Kubernetes objects (Services, EndpointSlices,
//! this node) to the frontends this node must program. Follows kube-proxy: its skip rules
//! (`ShouldSkipService` and the informers' label selectors), its EndpointSlice cache (ports
//! joined by name and protocol per slice, endpoints deduplicated by ip:port), and its endpoint
//! selection ([`crate::endpoints::categorize`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

use crate::endpoints::{self, Endpoint, TrafficPolicy};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => proxy_common::PROTO_TCP,
            Proto::Udp => proxy_common::PROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::PROTO_TCP => Some(Proto::Tcp),
            proxy_common::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// A ClusterIP:port/protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.proto)
    }
}

/// A backend pod IP:targetPort (its protocol is its frontend's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// What one frontend must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceRef,
    /// Backends in a stable order (sorted), so unchanged sets are not rewritten.
    pub backends: Vec<BackendAddr>,
    /// Endpoints exist but none this node may use (iTP=Local): fail with EHOSTUNREACH.
    pub no_local_endpoints: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object with where it came from (a manifest file, or the API server). Shared, not
/// copied: the sources hand the model the objects they hold.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: Arc<str>,
    pub object: Arc<T>,
}

/// The model's input: every object the source currently holds.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Sourced<Service>>,
    pub slices: Vec<Sourced<EndpointSlice>>,
    pub nodes: Vec<Sourced<Node>>,
}

/// Why an object (or part of one) was not programmed; the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemReason {
    Parse,
    MissingField,
    InvalidIp,
    InvalidPort,
    InvalidValue,
    UnsupportedProtocol,
    DuplicateFrontend,
    TooManyBackends,
}

impl ProblemReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemReason::Parse => "parse_error",
            ProblemReason::MissingField => "missing_field",
            ProblemReason::InvalidIp => "invalid_ip",
            ProblemReason::InvalidPort => "invalid_port",
            ProblemReason::InvalidValue => "invalid_value",
            ProblemReason::UnsupportedProtocol => "unsupported_protocol",
            ProblemReason::DuplicateFrontend => "duplicate_frontend",
            ProblemReason::TooManyBackends => "too_many_backends",
        }
    }
}

/// Something that could not be programmed, naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Arc<str>,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub reason: ProblemReason,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {}/{}: field {}: {}",
            self.origin, self.kind, self.namespace, self.name, self.field, self.detail
        )
    }
}

/// The model's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    pub problems: Vec<Problem>,
    /// VIPs of Services that are invalid right now: the sync leaves what is programmed for
    /// them as it is (the last good state keeps serving) instead of deleting it.
    pub held_vips: BTreeSet<Ipv4Addr>,
    /// Services that are invalid right now (their ClusterIP may not even parse): the sync
    /// keeps the frontends it last wrote for them.
    pub held_services: BTreeSet<ServiceRef>,
}

/// Computes the frontends this node must program. Pure and deterministic.
pub fn build(objects: &Objects, node_name: &str) -> Desired {
    let mut out = Desired::default();
    let zone = objects
        .nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(node_name))
        .and_then(|n| n.object.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned());
    let slices = merge_slices(&objects.slices, node_name, &mut out.problems);

    let mut services: Vec<&Sourced<Service>> = objects.services.iter().collect();
    services.sort_by(|a, b| {
        let key = |s: &Sourced<Service>| {
            (
                s.object.metadata.namespace.clone(),
                s.object.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    for svc in services {
        let mut problems = Vec::new();
        match service_frontends(svc, &slices, node_name, zone.as_deref(), &mut problems) {
            ServiceOutcome::Skipped => {}
            ServiceOutcome::Frontends { vips, frontends } => {
                let mut held = !problems
                    .iter()
                    .all(|p| p.reason == ProblemReason::UnsupportedProtocol);
                if !held {
                    let clash: Vec<Frontend> = frontends
                        .iter()
                        .map(|(f, _)| *f)
                        .filter(|f| out.frontends.contains_key(f))
                        .collect();
                    for f in &clash {
                        let owner = &out.frontends[f].service;
                        problems.push(problem(
                            svc,
                            "Service",
                            "spec.clusterIP",
                            ProblemReason::DuplicateFrontend,
                            format!("{f} is already used by Service {owner}"),
                        ));
                    }
                    held = !clash.is_empty();
                }
                if held {
                    out.held_vips.extend(vips);
                    out.held_services.extend(service_ref(&svc.object));
                } else {
                    out.frontends.extend(frontends);
                }
            }
            ServiceOutcome::Invalid { vips } => {
                out.held_vips.extend(vips);
                out.held_services.extend(service_ref(&svc.object));
            }
        }
        out.problems.extend(problems);
    }
    out
}

fn service_ref(svc: &Service) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().filter(|n| !n.is_empty())?,
    })
}

enum ServiceOutcome {
    /// Not ours to proxy (headless, ExternalName, another proxy's, IPv6-only).
    Skipped,
    Frontends {
        vips: Vec<Ipv4Addr>,
        frontends: Vec<(Frontend, FrontendSpec)>,
    },
    /// Invalid: nothing is changed for these VIPs.
    Invalid { vips: Vec<Ipv4Addr> },
}

fn problem<
    T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    src: &Sourced<T>,
    kind: &'static str,
    field: impl Into<String>,
    reason: ProblemReason,
    detail: impl Into<String>,
) -> Problem {
    let meta = src.object.metadata();
    Problem {
        origin: src.origin.clone(),
        kind,
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        field: field.into(),
        reason,
        detail: detail.into(),
    }
}

fn service_frontends(
    src: &Sourced<Service>,
    slices: &EndpointsByPort,
    node_name: &str,
    zone: Option<&str>,
    problems: &mut Vec<Problem>,
) -> ServiceOutcome {
    let svc = &src.object;
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
    {
        return ServiceOutcome::Skipped;
    }
    let Some(name) = svc.metadata.name.clone().filter(|n| !n.is_empty()) else {
        problems.push(problem(
            src,
            "Service",
            "metadata.name",
            ProblemReason::MissingField,
            "a Service needs a name",
        ));
        return ServiceOutcome::Invalid { vips: vec![] };
    };
    let service = ServiceRef {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name,
    };
    let Some(spec) = svc.spec.as_ref() else {
        return ServiceOutcome::Skipped;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return ServiceOutcome::Skipped;
    }

    // clusterIPs (dual stack) wins over clusterIP; "None" or empty means headless.
    let (field, ips): (&str, Vec<String>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
        (_, Some(ip)) => ("spec.clusterIP", vec![ip.clone()]),
        _ => ("spec.clusterIP", vec![]),
    };
    if ips.is_empty() || ips.iter().any(|ip| ip.is_empty() || ip == "None") {
        return ServiceOutcome::Skipped;
    }
    let mut vips = Vec::new();
    let mut invalid = false;
    for (i, ip) in ips.iter().enumerate() {
        let field = if field == "spec.clusterIPs" {
            format!("{field}[{i}]")
        } else {
            field.to_string()
        };
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
                problems.push(problem(
                    src,
                    "Service",
                    field,
                    ProblemReason::InvalidIp,
                    format!("{ip:?} is not a usable ClusterIP"),
                ));
                invalid = true;
            }
            Ok(IpAddr::V4(v4)) => vips.push(v4),
            // IPv6 is not supported by the datapath yet; the IPv4 family is still proxied.
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                problems.push(problem(
                    src,
                    "Service",
                    field,
                    ProblemReason::InvalidIp,
                    format!("{ip:?} is not an IP address"),
                ));
                invalid = true;
            }
        }
    }

    let policy = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            problems.push(problem(
                src,
                "Service",
                "spec.internalTrafficPolicy",
                ProblemReason::InvalidValue,
                format!("{other:?} is neither \"Cluster\" nor \"Local\""),
            ));
            invalid = true;
            TrafficPolicy::Cluster
        }
    };

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let proto = match p.protocol.as_deref() {
            None | Some("TCP") => Proto::Tcp,
            Some("UDP") => Proto::Udp,
            Some("SCTP") => {
                // Valid Kubernetes, not supported by this datapath: skip only this port.
                problems.push(problem(
                    src,
                    "Service",
                    format!("spec.ports[{i}].protocol"),
                    ProblemReason::UnsupportedProtocol,
                    "SCTP is not supported; this port is not proxied",
                ));
                continue;
            }
            Some(other) => {
                problems.push(problem(
                    src,
                    "Service",
                    format!("spec.ports[{i}].protocol"),
                    ProblemReason::UnsupportedProtocol,
                    format!("unknown protocol {other:?}"),
                ));
                invalid = true;
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port)
            .map_err(drop)
            .and_then(|v| if v == 0 { Err(()) } else { Ok(v) })
        else {
            problems.push(problem(
                src,
                "Service",
                format!("spec.ports[{i}].port"),
                ProblemReason::InvalidPort,
                format!("{} is not in 1..65535", p.port),
            ));
            invalid = true;
            continue;
        };
        ports.push((p.name.clone().unwrap_or_default(), proto, port));
    }
    if invalid {
        return ServiceOutcome::Invalid { vips };
    }
    if vips.is_empty() {
        return ServiceOutcome::Skipped;
    }

    let mut frontends = Vec::new();
    for (port_name, proto, port) in ports {
        let eps = slices
            .get(&(service.clone(), port_name.clone(), proto))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let sel = endpoints::categorize(eps, policy, node_name, zone);
        let mut backends: Vec<BackendAddr> = sel
            .reachable
            .iter()
            .map(|e| BackendAddr {
                ip: e.ip,
                port: e.port,
            })
            .collect();
        backends.sort();
        backends.dedup();
        if backends.len() > proxy_common::MAX_BACKENDS_PER_SERVICE {
            problems.push(problem(
                src,
                "Service",
                "spec.ports",
                ProblemReason::TooManyBackends,
                format!(
                    "port {port_name:?} has {} endpoints; at most {} are supported",
                    backends.len(),
                    proxy_common::MAX_BACKENDS_PER_SERVICE
                ),
            ));
            return ServiceOutcome::Invalid { vips };
        }
        let no_local_endpoints = backends.is_empty() && sel.has_any;
        for vip in &vips {
            frontends.push((
                Frontend {
                    vip: *vip,
                    port,
                    proto,
                },
                FrontendSpec {
                    service: service.clone(),
                    backends: backends.clone(),
                    no_local_endpoints,
                },
            ));
        }
    }
    ServiceOutcome::Frontends { vips, frontends }
}

/// Endpoints of one Service port: (Service, port name, protocol) -> endpoints.
type EndpointsByPort = BTreeMap<(ServiceRef, String, Proto), Vec<Endpoint>>;

/// kube-proxy's EndpointSliceCache: endpoints per (Service, port name, protocol), merged over
/// all slices of the Service, deduplicated by ip:port (a local copy wins, as in kube-proxy).
/// Slices are visited in name order so the result is deterministic.
fn merge_slices(
    slices: &[Sourced<EndpointSlice>],
    node_name: &str,
    problems: &mut Vec<Problem>,
) -> EndpointsByPort {
    let mut sorted: Vec<&Sourced<EndpointSlice>> = slices.iter().collect();
    sorted.sort_by(|a, b| {
        let key = |s: &Sourced<EndpointSlice>| {
            (
                s.object.metadata.namespace.clone(),
                s.object.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    // Deduplicated by ip:port while merging.
    let mut merged: BTreeMap<_, BTreeMap<(Ipv4Addr, u16), Endpoint>> = BTreeMap::new();
    for src in sorted {
        let slice = &src.object;
        // IPv6 and FQDN slices are not for this (IPv4) datapath.
        if slice.address_type != "IPv4" {
            continue;
        }
        let labels = slice.metadata.labels.as_ref();
        if labels.is_some_and(|l| {
            l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
        }) {
            continue;
        }
        let Some(svc_name) = labels
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|n| !n.is_empty())
        else {
            problems.push(problem(
                src,
                "EndpointSlice",
                format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                ProblemReason::MissingField,
                "the slice names no Service; ignored",
            ));
            continue;
        };
        let service = ServiceRef {
            namespace: slice
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: svc_name.clone(),
        };
        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            let Some(addr) = ep.addresses.first() else {
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
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let hints = ep.hints.as_ref();
            // The port is filled in per slice port below.
            endpoints.push(Endpoint {
                ip,
                port: 0,
                ready,
                serving: cond.and_then(|c| c.serving).unwrap_or(ready),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            });
        }
        for (i, port) in slice.ports.iter().flatten().enumerate() {
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
            let set = merged.entry((service.clone(), name, proto)).or_default();
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

#[cfg(test)]
mod tests;
