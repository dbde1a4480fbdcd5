//! What the model keeps of an EndpointSlice.

use std::collections::BTreeSet;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};

/// The parts of a `discovery.k8s.io/v1` EndpointSlice that endpoint selection reads (those
/// kube-proxy's EndpointSliceCache reads). Sources hold this rather than the object: in
/// k8s-openapi's layout an endpoint takes 352 bytes before its strings, so 10k slices of
/// 10 endpoints took ~40 MiB more. Deserializes as an EndpointSlice (errors name its fields).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "EndpointSlice")]
pub struct Slice {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// The `kubernetes.io/service-name` label.
    pub service_name: Option<String>,
    /// Labelled for another proxy (`service.kubernetes.io/service-proxy-name`) or headless.
    pub not_ours: bool,
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address (all of an endpoint's addresses are fungible; kube-proxy uses the
    /// first).
    pub address: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl From<&EndpointSlice> for Slice {
    fn from(s: &EndpointSlice) -> Self {
        let labels = s.metadata.labels.as_ref();
        Slice {
            name: s.metadata.name.clone(),
            namespace: s.metadata.namespace.clone(),
            service_name: labels.and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned(),
            not_ours: labels.is_some_and(|l| {
                l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
            }),
            address_type: s.address_type.clone(),
            ports: s
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .flatten()
                .map(|e| {
                    let cond = e.conditions.as_ref();
                    let hints = e.hints.as_ref();
                    SliceEndpoint {
                        address: e.addresses.first().cloned(),
                        ready: cond.and_then(|c| c.ready),
                        serving: cond.and_then(|c| c.serving),
                        terminating: cond.and_then(|c| c.terminating),
                        node_name: e.node_name.clone(),
                        zone_hints: hints
                            .and_then(|h| h.for_zones.as_ref())
                            .map(|z| z.iter().map(|z| z.name.clone()).collect())
                            .unwrap_or_default(),
                        node_hints: hints
                            .and_then(|h| h.for_nodes.as_ref())
                            .map(|n| n.iter().map(|n| n.name.clone()).collect())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Self {
        Slice::from(&s)
    }
}
