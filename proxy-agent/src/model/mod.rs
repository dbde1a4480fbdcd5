//! The heart of the agent: a pure function from Kubernetes objects (Services, EndpointSlices,
//! this node) to the frontends this node must program. Follows kube-proxy: its skip rules
//! (`ShouldSkipService` and the informers' label selectors), its EndpointSlice cache (ports
//! joined by name and protocol per slice, endpoints deduplicated by ip:port), and its endpoint
//! selection ([`topology::categorize`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};

mod about;
mod endpointslice_cache;
mod index;
mod ownership;
mod pass;
mod problem;
mod service;
mod slice;
pub mod topology;

pub use about::{EndpointCounts, PortAbout, State, reason};
pub use index::{ChangeKind, Index, ObjectChanges, ObjectRef, ObjectSet, Pos, service_ref};
pub use pass::{Built, Changes, Hold, Model};
pub use problem::{Problem, ProblemReason};
pub use slice::{Slice, SliceEndpoint, SlicePort};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Per-Service choice of algorithm (`random` or `maglev`), over the node's `--lb-algorithm`.
pub const ANNOTATION_LB_ALGORITHM: &str = "service.ebpf-proxy.io/lb-algorithm";

pub use service::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S};

/// How a frontend chooses a backend for a new connection (after affinity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// A random backend per connection (kube-proxy's).
    #[default]
    Random,
    /// Maglev consistent hashing: a connection's hash picks its backend from a lookup table,
    /// and a backend change moves few connections' choice.
    Maglev,
}

impl Algorithm {
    /// The annotation's value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "random" => Some(Algorithm::Random),
            "maglev" => Some(Algorithm::Maglev),
            _ => None,
        }
    }
}

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
    /// ClientIP session affinity's timeout; 0: no affinity.
    pub affinity_timeout_s: u32,
    /// The Service's own algorithm (its annotation); None: the node's.
    pub algorithm: Option<Algorithm>,
    /// Its port's name and endpoints, for `proxy-agent services` (not written to the maps).
    pub about: PortAbout,
}

impl FrontendSpec {
    /// Whether `other` asks the maps for the same as this one (`about` is for people only).
    pub fn programs_same(&self, other: &FrontendSpec) -> bool {
        let FrontendSpec {
            service,
            backends,
            no_local_endpoints,
            affinity_timeout_s,
            algorithm,
            about: _,
        } = self;
        *service == other.service
            && *backends == other.backends
            && *no_local_endpoints == other.no_local_endpoints
            && *affinity_timeout_s == other.affinity_timeout_s
            && *algorithm == other.algorithm
    }
}

/// A Service's namespace and name. Shared strings: every frontend, claim and map owner
/// names its Service, and a clone should not cost two allocations.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceRef {
    /// `namespace` None is "default", as in the API.
    pub fn new(namespace: Option<&str>, name: &str) -> Self {
        ServiceRef {
            namespace: namespace.unwrap_or("default").into(),
            name: name.into(),
        }
    }
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
    pub slices: Vec<Sourced<Slice>>,
    pub nodes: Vec<Sourced<Node>>,
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

/// Computes the frontends this node must program. Pure and deterministic: the reference
/// for [`Model`], which gives the same answer incrementally.
pub fn build(objects: &Objects, node_name: &str) -> Desired {
    Model::default()
        .build(&Index::from_objects(objects), Changes::All, node_name, true)
        .desired
}
#[cfg(test)]
pub(crate) mod tests;
