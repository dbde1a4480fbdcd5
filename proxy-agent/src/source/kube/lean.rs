//! What the agent decodes of the API's objects: only the fields the model reads. The watcher
//! decodes these instead of k8s-openapi's types, so `managedFields`, `status`, the
//! `last-applied-configuration` annotation and other objects' fields are skipped as the JSON
//! is read (their values are never built; of an ignored label or annotation only the key is
//! read, and dropped), and what is kept is what the manifests source keeps: the typed
//! Service and Node with their metadata cut down, and the slim [`Slice`].
//!
//! Fields the model validates are lenient here (defaults for missing ones): an odd object is
//! the model's problem to report, not a decode error that would fail a whole list.

use std::{borrow::Cow, collections::BTreeMap, fmt, marker::PhantomData, time::SystemTime};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    api::core::v1::{Node, Service, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

use crate::model::{
    ANNOTATION_LB_ALGORITHM, LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME, Slice,
    SliceEndpoint, SlicePort,
};

use super::TRIGGER_TIME_ANNOTATION;

/// Which labels and annotations of a kind the model reads.
pub trait Keep {
    fn label(key: &str) -> bool;
    fn annotation(key: &str) -> bool;
}

pub struct ServiceKeep;
impl Keep for ServiceKeep {
    fn label(key: &str) -> bool {
        key == LABEL_SERVICE_PROXY_NAME || key == LABEL_HEADLESS
    }
    fn annotation(key: &str) -> bool {
        key == ANNOTATION_LB_ALGORITHM
    }
}

pub struct SliceKeep;
impl Keep for SliceKeep {
    fn label(key: &str) -> bool {
        key == LABEL_SERVICE_NAME || key == LABEL_SERVICE_PROXY_NAME || key == LABEL_HEADLESS
    }
    fn annotation(key: &str) -> bool {
        key == TRIGGER_TIME_ANNOTATION
    }
}

/// A Node keeps all its labels (one object; topology labels may be read later).
pub struct NodeKeep;
impl Keep for NodeKeep {
    fn label(_: &str) -> bool {
        true
    }
    fn annotation(_: &str) -> bool {
        false
    }
}

/// `metadata`, with the labels and annotations `K` keeps.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound = "")]
struct WireMeta<K: Keep> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    deletion_timestamp: Option<Time>,
    #[serde(default, deserialize_with = "labels::<_, K>")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "annotations::<_, K>")]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(skip)]
    _keep: PhantomData<K>,
}

impl<K: Keep> From<WireMeta<K>> for ObjectMeta {
    fn from(m: WireMeta<K>) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            resource_version: m.resource_version,
            deletion_timestamp: m.deletion_timestamp,
            labels: m.labels,
            annotations: m.annotations,
            ..Default::default()
        }
    }
}

fn labels<'de, D: Deserializer<'de>, K: Keep>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(Filtered(K::label))
}

fn annotations<'de, D: Deserializer<'de>, K: Keep>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(Filtered(K::annotation))
}

/// A string map of which only the keys `self.0` accepts are kept (the others' values are
/// skipped unread).
struct Filtered(fn(&str) -> bool);

impl<'de> Visitor<'de> for Filtered {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of strings")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if (self.0)(&key) {
                out.insert(key.into_owned(), map.next_value::<String>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// Implements `kube::Resource` for a lean type, with its kind's API coordinates.
macro_rules! resource {
    ($ty:ty, $kind:literal, $group:literal, $version:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                $version.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Service as the model reads it.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WireService")]
pub struct LeanService {
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
}
resource!(
    LeanService,
    "Service",
    "",
    "v1",
    "services",
    NamespaceResourceScope
);

#[derive(Deserialize)]
struct WireService {
    metadata: WireMeta<ServiceKeep>,
    #[serde(default)]
    spec: Option<ServiceSpec>,
}

impl From<WireService> for LeanService {
    fn from(w: WireService) -> Self {
        LeanService {
            metadata: w.metadata.into(),
            spec: w.spec,
        }
    }
}

impl LeanService {
    /// The model's input: the resourceVersion dropped, so an object listed again unchanged
    /// compares equal to the one held.
    pub fn into_service(mut self) -> Service {
        self.metadata.resource_version = None;
        Service {
            metadata: self.metadata,
            spec: self.spec,
            status: None,
        }
    }
}

/// A Node: its name, labels and deletion timestamp.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WireNode")]
pub struct LeanNode {
    pub metadata: ObjectMeta,
}
resource!(LeanNode, "Node", "", "v1", "nodes", ClusterResourceScope);

#[derive(Deserialize)]
struct WireNode {
    metadata: WireMeta<NodeKeep>,
}

impl From<WireNode> for LeanNode {
    fn from(w: WireNode) -> Self {
        LeanNode {
            metadata: w.metadata.into(),
        }
    }
}

impl LeanNode {
    pub fn into_node(mut self) -> Node {
        self.metadata.resource_version = None;
        Node {
            metadata: self.metadata,
            ..Default::default()
        }
    }
}

/// An EndpointSlice as the model reads it ([`Slice`]), with its metadata for the watcher.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WireSlice")]
pub struct LeanSlice {
    pub metadata: ObjectMeta,
    pub slice: Slice,
}
resource!(
    LeanSlice,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    NamespaceResourceScope
);

impl LeanSlice {
    /// Its `last-change-trigger-time` annotation.
    pub fn trigger_time(&self) -> Option<SystemTime> {
        super::parse_trigger_time(
            self.metadata
                .annotations
                .as_ref()?
                .get(TRIGGER_TIME_ANNOTATION)?,
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSlice {
    metadata: WireMeta<SliceKeep>,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    ports: Option<Vec<WirePort>>,
    #[serde(default)]
    endpoints: Option<Vec<WireEndpoint>>,
}

#[derive(Deserialize)]
struct WirePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i32>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<WireConditions>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    hints: Option<WireHints>,
}

#[derive(Deserialize)]
struct WireConditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireHints {
    #[serde(default)]
    for_zones: Option<Vec<WireName>>,
    #[serde(default)]
    for_nodes: Option<Vec<WireName>>,
}

#[derive(Deserialize)]
struct WireName {
    #[serde(default)]
    name: String,
}

impl From<WireSlice> for LeanSlice {
    fn from(w: WireSlice) -> Self {
        let metadata: ObjectMeta = w.metadata.into();
        let labels = metadata.labels.as_ref();
        let slice = Slice {
            name: metadata.name.clone(),
            namespace: metadata.namespace.clone(),
            service_name: labels.and_then(|l| l.get(LABEL_SERVICE_NAME)).cloned(),
            not_ours: labels.is_some_and(|l| {
                l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
            }),
            address_type: w.address_type,
            ports: (w.ports.into_iter().flatten())
                .map(|p| SlicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                })
                .collect(),
            endpoints: (w.endpoints.into_iter().flatten())
                .map(|e| {
                    let c = e.conditions;
                    let names = |n: Option<Vec<WireName>>| {
                        n.into_iter().flatten().map(|n| n.name).collect()
                    };
                    let (zones, nodes) = match e.hints {
                        Some(h) => (names(h.for_zones), names(h.for_nodes)),
                        None => Default::default(),
                    };
                    SliceEndpoint {
                        address: e.addresses.into_iter().next(),
                        ready: c.as_ref().and_then(|c| c.ready),
                        serving: c.as_ref().and_then(|c| c.serving),
                        terminating: c.as_ref().and_then(|c| c.terminating),
                        node_name: e.node_name,
                        zone_hints: zones,
                        node_hints: nodes,
                    }
                })
                .collect(),
        };
        LeanSlice { metadata, slice }
    }
}
