//! A Service's frontends from its spec and its endpoints (kube-proxy's service change
//! tracker and `ServicePortInfo`): the skip rules, field validation, and for each port the
//! backends endpoint selection allows.

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;

use super::{
    ANNOTATION_LB_ALGORITHM, Algorithm, BackendAddr, EndpointCounts, Frontend, FrontendSpec,
    LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, PortAbout, Problem, ProblemReason, Proto, ServiceRef,
    Sourced,
    endpointslice_cache::EndpointsByPort,
    problem::problem,
    topology::{self, TrafficPolicy},
};

#[derive(Debug)]
pub(super) enum ServiceOutcome {
    /// Not ours to proxy (headless, ExternalName, another proxy's, IPv6-only).
    Skipped,
    Frontends {
        vips: Vec<Ipv4Addr>,
        frontends: Vec<(Frontend, FrontendSpec)>,
    },
    /// Invalid: nothing is changed for these VIPs.
    Invalid { vips: Vec<Ipv4Addr> },
}

pub(super) fn service_frontends(
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
    let service = ServiceRef::new(svc.metadata.namespace.as_deref(), &name);
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

    let affinity_timeout_s = match session_affinity(spec) {
        Ok(t) => t,
        Err((field, detail)) => {
            problems.push(problem(
                src,
                "Service",
                field,
                ProblemReason::InvalidValue,
                detail,
            ));
            invalid = true;
            0
        }
    };
    let annotations = svc.metadata.annotations.as_ref();
    let algorithm = match annotations.and_then(|a| a.get(ANNOTATION_LB_ALGORITHM)) {
        None => None,
        Some(v) => match Algorithm::parse(v) {
            Some(a) => Some(a),
            None => {
                problems.push(problem(
                    src,
                    "Service",
                    format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM:?}]"),
                    ProblemReason::IgnoredAnnotation,
                    format!(
                        "{v:?} is neither \"random\" nor \"maglev\": the node's algorithm is used"
                    ),
                ));
                // A typo in an optional hint must not stop the Service being proxied.
                None
            }
        },
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
    if let Some(t) =
        (spec.type_.as_deref()).filter(|t| !matches!(*t, "ClusterIP" | "NodePort" | "LoadBalancer"))
    {
        problems.push(problem(
            src,
            "Service",
            "spec.type",
            ProblemReason::InvalidValue,
            format!(
                "{t:?} is not a Service type (ClusterIP, NodePort, LoadBalancer, ExternalName)"
            ),
        ));
        invalid = true;
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
            .get(&(port_name.clone(), proto))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let sel = topology::categorize(eps, policy, node_name, zone);
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
        let about = PortAbout {
            port_name: port_name.as_str().into(),
            rule: sel.rule,
            endpoints: EndpointCounts::of(eps),
        };
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
                    affinity_timeout_s,
                    algorithm,
                    about: about.clone(),
                },
            ));
        }
    }
    ServiceOutcome::Frontends { vips, frontends }
}

/// Default of `sessionAffinityConfig.clientIP.timeoutSeconds` (kube-proxy's and the API's).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Largest valid `timeoutSeconds` (the API server's validation: one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The ClientIP affinity timeout (0: no affinity), or the field that is invalid and why.
fn session_affinity(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Result<u32, (&'static str, String)> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(0),
        Some("ClientIP") => {
            let timeout = (spec.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=i64::from(MAX_AFFINITY_TIMEOUT_S)).contains(&i64::from(t)) => {
                    Ok(t as u32)
                }
                Some(t) => Err((
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not in 1..={MAX_AFFINITY_TIMEOUT_S}"),
                )),
            }
        }
        Some(other) => Err((
            "spec.sessionAffinity",
            format!("{other:?} is neither \"None\" nor \"ClientIP\""),
        )),
    }
}

/// The IPv4 ClusterIPs a Service names, those that parse (for checks on its endpoints).
pub(super) fn cluster_ipv4s(s: &Service) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let spec = s.spec.as_ref();
    let ips = spec
        .and_then(|s| s.cluster_ips.as_deref())
        .unwrap_or_default();
    let ip = spec.and_then(|s| s.cluster_ip.as_deref());
    (ips.iter().map(String::as_str).chain(ip)).filter_map(|ip| ip.parse().ok())
}
