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

use foldhash::HashMap;
use k8s_openapi::api::{core::v1::Node, core::v1::Service};

mod slice;
pub use slice::{Slice, SliceEndpoint, SlicePort};

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

/// Computes the frontends this node must program. Pure and deterministic: the reference
/// for [`Model`], which gives the same answer incrementally.
pub fn build(objects: &Objects, node_name: &str) -> Desired {
    Model::default()
        .build(&Index::from_objects(objects), Changes::All, node_name, true)
        .desired
}

/// Where an object sits in its source: (origin, position, unique within the origin). Orders
/// duplicates the way the source lists them.
pub type Pos = (Arc<str>, usize);

/// One object, for sources that index objects one by one.
#[derive(Clone, Copy, Debug)]
pub enum ObjectRef<'a> {
    Service(&'a Arc<Service>),
    Slice(&'a Arc<Slice>),
    Node(&'a Arc<Node>),
}

/// One Service's objects: its Service (more than one only when manifests repeat a name) and
/// its EndpointSlices, in name order.
#[derive(Clone, Debug, Default)]
struct Group {
    services: SortedVec<Pos, Sourced<Service>>,
    slices: SortedVec<(String, Pos), Sourced<Slice>>,
}

/// A map for a handful of entries (a Service's objects, a frontend's claimants): a sorted
/// Vec. A BTreeMap allocates nodes of 11 slots, about 1 KiB per Service at this size.
#[derive(Clone, Debug)]
struct SortedVec<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedVec<K, V> {
    fn default() -> Self {
        SortedVec(Vec::new())
    }
}

impl<K: Ord, V> SortedVec<K, V> {
    fn insert(&mut self, k: K, v: V) {
        match self.0.binary_search_by(|(e, _)| e.cmp(&k)) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }

    fn remove(&mut self, k: &K) {
        if let Ok(i) = self.0.binary_search_by(|(e, _)| e.cmp(k)) {
            self.0.remove(i);
        }
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Group {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }
}

/// A source's objects, grouped by the Service they belong to: the model's input. Sources keep
/// it up to date (a manifest file's objects are removed and re-added as a whole), so a change
/// costs its own size, not the cluster's.
#[derive(Clone, Debug, Default)]
pub struct Index {
    groups: BTreeMap<ServiceRef, Group>,
    /// Services without a name and slices that name no Service: reported, never programmed.
    unnamed: BTreeMap<Pos, Sourced<Service>>,
    unowned: BTreeMap<(String, Pos), Sourced<Slice>>,
    nodes: BTreeMap<Pos, Sourced<Node>>,
    /// Services whose objects were added or removed since [`Self::take_touched`]; None:
    /// not known (a new index).
    touched: Option<BTreeSet<ServiceRef>>,
}

/// The objects of one origin (a manifest file), in the order it lists them.
#[derive(Clone, Debug, Default)]
pub struct ObjectSet {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<Slice>>,
    pub nodes: Vec<Arc<Node>>,
}

impl ObjectSet {
    /// Each object with its position among those of its kind (as the set lists them).
    fn each(&self) -> impl Iterator<Item = (usize, ObjectRef<'_>)> {
        let services = self.services.iter().map(ObjectRef::Service).enumerate();
        let slices = self.slices.iter().map(ObjectRef::Slice).enumerate();
        let nodes = self.nodes.iter().map(ObjectRef::Node).enumerate();
        services.chain(slices).chain(nodes)
    }

    /// One kind of this set's objects, each with `origin`.
    fn sourced<'a, T: 'a>(
        &'a self,
        origin: &'a Arc<str>,
        kind: impl Fn(&'a ObjectSet) -> &'a Vec<Arc<T>>,
    ) -> impl Iterator<Item = Sourced<T>> + 'a {
        kind(self).iter().map(move |o| Sourced {
            origin: origin.clone(),
            object: o.clone(),
        })
    }
}

impl Objects {
    /// Adds the objects of one origin (in its order) after those already here.
    pub fn extend_from(&mut self, origin: &Arc<str>, set: &ObjectSet) {
        self.services.extend(set.sourced(origin, |s| &s.services));
        self.slices.extend(set.sourced(origin, |s| &s.slices));
        self.nodes.extend(set.sourced(origin, |s| &s.nodes));
    }
}

/// Which Service a slice feeds; None: not for this datapath (IPv6, FQDN, another proxy's).
enum SliceOwner {
    Service(ServiceRef),
    Unowned,
}

fn slice_owner(slice: &Slice) -> Option<SliceOwner> {
    // IPv6 and FQDN slices are not for this (IPv4) datapath.
    if slice.address_type != "IPv4" || slice.not_ours {
        return None;
    }
    Some(
        match slice.service_name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => SliceOwner::Service(ServiceRef::new(slice.namespace.as_deref(), name)),
            None => SliceOwner::Unowned,
        },
    )
}

impl Index {
    pub fn from_objects(objects: &Objects) -> Self {
        let mut index = Index::default();
        for (i, s) in objects.services.iter().enumerate() {
            index.add_service((s.origin.clone(), i), s.clone());
        }
        for (i, s) in objects.slices.iter().enumerate() {
            index.add_slice((s.origin.clone(), i), s.clone());
        }
        for (i, n) in objects.nodes.iter().enumerate() {
            index.nodes.insert((n.origin.clone(), i), n.clone());
        }
        index
    }

    /// Adds the objects of `origin`.
    pub fn insert(&mut self, origin: &Arc<str>, set: &ObjectSet) {
        for (i, o) in set.each() {
            self.add((origin.clone(), i), o);
        }
    }

    /// Adds one object at `pos` (unique among the objects indexed).
    pub fn add(&mut self, pos: Pos, object: ObjectRef<'_>) {
        let origin = pos.0.clone();
        match object {
            ObjectRef::Service(s) => self.add_service(
                pos,
                Sourced {
                    origin,
                    object: s.clone(),
                },
            ),
            ObjectRef::Slice(s) => self.add_slice(
                pos,
                Sourced {
                    origin,
                    object: s.clone(),
                },
            ),
            ObjectRef::Node(n) => {
                self.nodes.insert(
                    pos,
                    Sourced {
                        origin,
                        object: n.clone(),
                    },
                );
            }
        }
    }

    /// Removes the objects `origin` added with [`Self::insert`] (the same `set`).
    pub fn remove(&mut self, origin: &Arc<str>, set: &ObjectSet) {
        for (i, o) in set.each() {
            self.remove_one(&(origin.clone(), i), o);
        }
    }

    /// Removes the object [`Self::add`] put at `pos` (the same object).
    pub fn remove_one(&mut self, pos: &Pos, object: ObjectRef<'_>) {
        match object {
            ObjectRef::Service(s) => match service_ref(s) {
                Some(r) => {
                    self.touch(&r);
                    if let Some(g) = self.groups.get_mut(&r) {
                        g.services.remove(pos);
                        if g.is_empty() {
                            self.groups.remove(&r);
                        }
                    }
                }
                None => {
                    self.unnamed.remove(pos);
                }
            },
            ObjectRef::Slice(s) => {
                let key = (s.name.clone().unwrap_or_default(), pos.clone());
                match slice_owner(s) {
                    Some(SliceOwner::Service(r)) => {
                        self.touch(&r);
                        if let Some(g) = self.groups.get_mut(&r) {
                            g.slices.remove(&key);
                            if g.is_empty() {
                                self.groups.remove(&r);
                            }
                        }
                    }
                    Some(SliceOwner::Unowned) => {
                        self.unowned.remove(&key);
                    }
                    None => {}
                }
            }
            ObjectRef::Node(_) => {
                self.nodes.remove(pos);
            }
        }
    }

    fn add_service(&mut self, pos: Pos, s: Sourced<Service>) {
        match service_ref(&s.object) {
            Some(r) => {
                self.touch(&r);
                self.groups.entry(r).or_default().services.insert(pos, s);
            }
            None => {
                self.unnamed.insert(pos, s);
            }
        }
    }

    fn add_slice(&mut self, pos: Pos, s: Sourced<Slice>) {
        let key = (s.object.name.clone().unwrap_or_default(), pos);
        match slice_owner(&s.object) {
            Some(SliceOwner::Service(r)) => {
                self.touch(&r);
                self.groups.entry(r).or_default().slices.insert(key, s);
            }
            Some(SliceOwner::Unowned) => {
                self.unowned.insert(key, s);
            }
            None => {}
        }
    }

    /// The Services whose objects changed since the last call (None: any may have), for
    /// [`Model::build`].
    pub fn take_touched(&mut self) -> Option<BTreeSet<ServiceRef>> {
        self.touched.replace(BTreeSet::new())
    }

    fn touch(&mut self, r: &ServiceRef) {
        if let Some(t) = &mut self.touched {
            t.insert(r.clone());
        }
    }

    /// Whether some object of this Service is indexed.
    pub fn contains(&self, service: &ServiceRef) -> bool {
        self.groups.contains_key(service)
    }

    /// Number of Services (names) indexed.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// What the model computed for one Service from its objects alone (before frontends are
/// checked against other Services'), kept while its objects stay the same.
#[derive(Debug)]
struct Cached {
    /// The inputs, kept alive so pointer equality means "the same object".
    services: Vec<Arc<Service>>,
    /// Where each Service object came from (its clash problems name it).
    origins: Vec<Arc<str>>,
    slices: Vec<Arc<Slice>>,
    outcomes: Vec<(ServiceOutcome, Vec<Problem>)>,
    slice_problems: Vec<Problem>,
    /// Per Service object: the frontends it lost to another Service, as problems (empty: it
    /// owns all of its frontends).
    clashes: Vec<Vec<Problem>>,
}

impl Cached {
    fn same_inputs(&self, g: &Group) -> bool {
        self.services.len() == g.services.len()
            && self.slices.len() == g.slices.len()
            && self
                .services
                .iter()
                .zip(g.services.values())
                .all(|(a, b)| Arc::ptr_eq(a, &b.object))
            && self
                .slices
                .iter()
                .zip(g.slices.values())
                .all(|(a, b)| Arc::ptr_eq(a, &b.object))
    }

    /// The frontends each valid Service object claims: (object, frontend).
    fn claims(&self) -> impl Iterator<Item = (usize, Frontend)> + '_ {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, (o, problems))| match o {
                ServiceOutcome::Frontends { frontends, .. } if valid(problems) => {
                    Some(frontends.iter().map(move |(f, _)| (i, *f)))
                }
                _ => None,
            })
            .flatten()
    }

    /// Per Service object: its frontends are not programmed, and what is programmed for
    /// it stays as it is.
    fn held(&self, i: usize) -> bool {
        match &self.outcomes[i] {
            (ServiceOutcome::Skipped, _) => false,
            (ServiceOutcome::Invalid { .. }, _) => true,
            (ServiceOutcome::Frontends { .. }, problems) => {
                !valid(problems) || !self.clashes[i].is_empty()
            }
        }
    }

    /// Whether this Service has anything to report or hold: the complete lists of problems
    /// and held VIPs are rebuilt from such Services only.
    fn noted(&self) -> bool {
        !self.slice_problems.is_empty()
            || self.outcomes.iter().any(|(_, p)| !p.is_empty())
            || (0..self.outcomes.len()).any(|i| self.held(i))
    }
}

/// A Service object's problems that still let it program its frontends.
fn valid(problems: &[Problem]) -> bool {
    problems
        .iter()
        .all(|p| p.reason == ProblemReason::UnsupportedProtocol)
}

/// A Service object (its Service's name, its position among objects of that name) claiming
/// frontends. Ordered as ownership is decided: the first valid claimant owns a frontend.
type Claim = (ServiceRef, usize);

/// Which Services changed since the model's previous pass, as the source knows it.
#[derive(Clone, Copy, Debug)]
pub enum Changes<'a> {
    /// Unknown: every Service is compared with what the model has.
    All,
    /// Only these Services' objects changed (see [`Index::take_touched`]).
    Only(&'a BTreeSet<ServiceRef>),
}

impl<'a> From<Option<&'a BTreeSet<ServiceRef>>> for Changes<'a> {
    /// What a source's `take_touched` says: None is unknown.
    fn from(touched: Option<&'a BTreeSet<ServiceRef>>) -> Self {
        touched.map_or(Changes::All, Changes::Only)
    }
}

/// The model, computed incrementally: a Service's frontends are recomputed only when its
/// objects (or this node's zone) changed, and who owns a contended frontend is decided
/// among its claimants only, so a pass costs what changed, not the cluster. [`build`] is
/// the same computation from scratch.
#[derive(Debug, Default)]
pub struct Model {
    node_name: String,
    zone: Option<String>,
    cache: HashMap<ServiceRef, Cached>,
    /// Every claimed frontend and its claimants.
    claims: HashMap<Frontend, SortedVec<Claim, ()>>,
    /// Frontends with more than one claimant: the only place a clash can be.
    contended: BTreeSet<Frontend>,
    /// Services with a clash now.
    clashed: BTreeSet<ServiceRef>,
    /// Services with problems or held objects (see [`Cached::noted`]).
    noted: BTreeSet<ServiceRef>,
}

/// A model pass.
#[derive(Debug, Default)]
pub struct Built {
    /// With `full`: every frontend. Otherwise the frontends of the `changed` Services only;
    /// `problems`, `held_vips` and `held_services` are always complete.
    pub desired: Desired,
    /// Services whose frontends may differ from the previous pass (None with `full`).
    pub changed: Option<BTreeSet<ServiceRef>>,
}

impl Model {
    /// One pass over `index`. `changes` must name every Service whose objects changed since
    /// this model's previous pass (or be [`Changes::All`]).
    pub fn build(
        &mut self,
        index: &Index,
        changes: Changes<'_>,
        node_name: &str,
        full: bool,
    ) -> Built {
        let zone = index
            .nodes
            .values()
            .find(|n| n.object.metadata.name.as_deref() == Some(node_name))
            .and_then(|n| n.object.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned());
        let mut changes = changes;
        if zone != self.zone || node_name != self.node_name {
            // Endpoint selection depends on both: everything is recomputed.
            *self = Model {
                zone,
                node_name: node_name.to_string(),
                ..Model::default()
            };
            changes = Changes::All;
        }
        let candidates: BTreeSet<ServiceRef> = match changes {
            Changes::All => self
                .cache
                .keys()
                .chain(index.groups.keys())
                .cloned()
                .collect(),
            Changes::Only(set) => set.clone(),
        };

        // Services whose objects changed: recomputed, their claims replaced.
        let mut changed = BTreeSet::new();
        for r in candidates {
            let group = index.groups.get(&r);
            if let (Some(c), Some(g)) = (self.cache.get(&r), group)
                && c.same_inputs(g)
            {
                continue;
            }
            if let Some(old) = self.cache.remove(&r) {
                self.unclaim(&r, &old);
            }
            if let Some(g) = group {
                let c = self.compute(g, node_name);
                self.claim(&r, &c);
                self.cache.insert(r.clone(), c);
            }
            changed.insert(r);
        }
        changed.extend(self.resolve_clashes());
        for r in &changed {
            if self.cache.get(r).is_some_and(Cached::noted) {
                self.noted.insert(r.clone());
            } else {
                self.noted.remove(r);
            }
        }

        let mut out = Desired::default();
        for s in index.unnamed.values() {
            let mut problems = Vec::new();
            service_frontends(s, &BTreeMap::new(), node_name, None, &mut problems);
            out.problems.extend(problems);
        }
        for s in index.unowned.values() {
            out.problems.push(problem(
                s,
                "EndpointSlice",
                format!("metadata.labels[{LABEL_SERVICE_NAME}]"),
                ProblemReason::MissingField,
                "the slice names no Service; ignored",
            ));
        }
        for r in &self.noted {
            let c = &self.cache[r];
            out.problems.extend(c.slice_problems.iter().cloned());
            for (i, ((outcome, problems), clashes)) in c.outcomes.iter().zip(&c.clashes).enumerate()
            {
                out.problems.extend(problems.iter().cloned());
                out.problems.extend(clashes.iter().cloned());
                if c.held(i) {
                    out.held_services.insert(r.clone());
                    if let ServiceOutcome::Invalid { vips }
                    | ServiceOutcome::Frontends { vips, .. } = outcome
                    {
                        out.held_vips.extend(vips.iter().copied());
                    }
                }
            }
        }
        let emit: Box<dyn Iterator<Item = &ServiceRef>> = if full {
            Box::new(self.cache.keys())
        } else {
            Box::new(changed.iter())
        };
        for r in emit {
            let Some(c) = self.cache.get(r) else { continue };
            for (i, (outcome, _)) in c.outcomes.iter().enumerate() {
                if let (ServiceOutcome::Frontends { frontends, .. }, false) = (outcome, c.held(i)) {
                    out.frontends.extend(frontends.iter().cloned());
                }
            }
        }
        Built {
            desired: out,
            changed: (!full).then_some(changed),
        }
    }

    fn claim(&mut self, r: &ServiceRef, c: &Cached) {
        for (i, f) in c.claims() {
            let set = self.claims.entry(f).or_default();
            set.insert((r.clone(), i), ());
            if set.len() > 1 {
                self.contended.insert(f);
            }
        }
    }

    fn unclaim(&mut self, r: &ServiceRef, c: &Cached) {
        for (i, f) in c.claims() {
            let Some(set) = self.claims.get_mut(&f) else {
                continue;
            };
            set.remove(&(r.clone(), i));
            match set.len() {
                0 => {
                    self.claims.remove(&f);
                    self.contended.remove(&f);
                }
                1 => {
                    self.contended.remove(&f);
                }
                _ => {}
            }
        }
    }

    /// Decides who owns each contended frontend: the first valid claimant, in (namespace,
    /// name, position) order, that has not itself lost a frontend (as kube-proxy, one
    /// Service per ClusterIP:port). Returns the Services whose clashes changed.
    fn resolve_clashes(&mut self) -> BTreeSet<ServiceRef> {
        let claimants: BTreeSet<&Claim> = self
            .contended
            .iter()
            .flat_map(|f| self.claims[f].keys())
            .collect();
        let mut owners: HashMap<Frontend, &ServiceRef> = HashMap::default();
        let mut clashes: BTreeMap<Claim, Vec<Problem>> = BTreeMap::new();
        for (r, i) in claimants {
            let c = &self.cache[r];
            let ServiceOutcome::Frontends { frontends, .. } = &c.outcomes[*i].0 else {
                continue;
            };
            let src = Sourced {
                origin: Arc::clone(&c.origins[*i]),
                object: Arc::clone(&c.services[*i]),
            };
            let lost: Vec<Problem> = frontends
                .iter()
                .filter_map(|(f, _)| {
                    let owner = owners.get(f)?;
                    Some(problem(
                        &src,
                        "Service",
                        "spec.clusterIP",
                        ProblemReason::DuplicateFrontend,
                        format!("{f} is already used by Service {owner}"),
                    ))
                })
                .collect();
            if lost.is_empty() {
                for (f, _) in frontends {
                    if self.contended.contains(f) {
                        owners.insert(*f, r);
                    }
                }
            } else {
                clashes.insert((r.clone(), *i), lost);
            }
        }
        let now: BTreeSet<ServiceRef> = clashes.keys().map(|(r, _)| r.clone()).collect();
        let mut changed = BTreeSet::new();
        for r in self.clashed.union(&now) {
            // A Service that clashed before may be gone (it is already among the changed).
            let Some(c) = self.cache.get_mut(r) else {
                continue;
            };
            let new: Vec<Vec<Problem>> = (0..c.outcomes.len())
                .map(|i| clashes.remove(&(r.clone(), i)).unwrap_or_default())
                .collect();
            if new != c.clashes {
                c.clashes = new;
                changed.insert(r.clone());
            }
        }
        self.clashed = now;
        changed
    }

    fn compute(&self, g: &Group, node_name: &str) -> Cached {
        let mut slice_problems = Vec::new();
        let slices = merge_slices(g.slices.values(), node_name, &mut slice_problems);
        let outcomes: Vec<_> = g
            .services
            .values()
            .map(|s| {
                let mut problems = Vec::new();
                let o =
                    service_frontends(s, &slices, node_name, self.zone.as_deref(), &mut problems);
                (o, problems)
            })
            .collect();
        Cached {
            services: g.services.values().map(|s| s.object.clone()).collect(),
            origins: g.services.values().map(|s| s.origin.clone()).collect(),
            slices: g.slices.values().map(|s| s.object.clone()).collect(),
            clashes: vec![Vec::new(); outcomes.len()],
            outcomes,
            slice_problems,
        }
    }
}

fn service_ref(svc: &Service) -> Option<ServiceRef> {
    let name = svc.metadata.name.as_deref().filter(|n| !n.is_empty())?;
    Some(ServiceRef::new(svc.metadata.namespace.as_deref(), name))
}

#[derive(Debug)]
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

/// An object problems can name.
trait Named {
    fn namespace(&self) -> Option<&str>;
    fn name(&self) -> Option<&str>;
}

impl Named for Service {
    fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
    fn name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }
}

impl Named for Slice {
    fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

fn problem<T: Named>(
    src: &Sourced<T>,
    kind: &'static str,
    field: impl Into<String>,
    reason: ProblemReason,
    detail: impl Into<String>,
) -> Problem {
    Problem {
        origin: src.origin.clone(),
        kind,
        namespace: src.object.namespace().unwrap_or("default").into(),
        name: src.object.name().unwrap_or_default().into(),
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
            .get(&(port_name.clone(), proto))
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

/// Endpoints of one Service's ports: (port name, protocol) -> endpoints.
type EndpointsByPort = BTreeMap<(String, Proto), Vec<Endpoint>>;

/// kube-proxy's EndpointSliceCache for one Service: endpoints per (port name, protocol),
/// merged over the Service's slices (given in name order, so the result is deterministic),
/// deduplicated by ip:port (a local copy wins, as in kube-proxy).
fn merge_slices<'a>(
    slices: impl Iterator<Item = &'a Sourced<Slice>>,
    node_name: &str,
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

#[cfg(test)]
mod tests;
