//! The model, computed incrementally (kube-proxy's change trackers, whose pending changes a
//! sync applies): a Service's frontends are recomputed only when its objects, or this node's
//! zone, changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use foldhash::HashMap;
use k8s_openapi::api::core::v1::Service;

use super::{
    Desired, Frontend, FrontendSpec, LABEL_SERVICE_NAME, LABEL_ZONE, Problem, ProblemReason,
    ServiceRef, Slice, Sourced,
    endpointslice_cache::merge_slices,
    index::{Group, Index},
    ownership::Ownership,
    problem::{Named, problem},
    service::{ServiceOutcome, cluster_ipv4s, service_frontends},
};

/// What the model computed for one Service from its objects alone (before frontends are
/// checked against other Services'), kept while its objects stay the same.
#[derive(Debug)]
pub(super) struct Cached {
    /// The inputs, kept alive so pointer equality means "the same object".
    pub(super) services: Vec<Arc<Service>>,
    /// Where each Service object came from (its clash problems name it).
    pub(super) origins: Vec<Arc<str>>,
    pub(super) slices: Vec<Arc<Slice>>,
    pub(super) outcomes: Vec<(ServiceOutcome, Vec<Problem>)>,
    pub(super) slice_problems: Vec<Problem>,
    /// Per Service object: the frontends it lost to another Service, as problems (empty: it
    /// owns all of its frontends).
    pub(super) clashes: Vec<Vec<Problem>>,
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
    pub(super) fn claims(&self) -> impl Iterator<Item = (usize, Frontend)> + '_ {
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

    /// The frontends its Service objects program (those not held).
    fn programmed(&self) -> impl Iterator<Item = &(Frontend, FrontendSpec)> + '_ {
        (self.outcomes.iter().enumerate()).flat_map(|(i, (outcome, _))| match outcome {
            ServiceOutcome::Frontends { frontends, .. } if !self.held(i) => frontends.as_slice(),
            _ => &[],
        })
    }

    /// Whether this Service has anything to report or hold: the complete lists of problems
    /// and held VIPs are rebuilt from such Services only.
    fn noted(&self) -> bool {
        !self.slice_problems.is_empty()
            || self.outcomes.iter().any(|(_, p)| !p.is_empty())
            || (0..self.outcomes.len()).any(|i| self.held(i))
    }
}

/// An object defined again (same kind, namespace and name): reported, and ignored.
fn duplicate<T: Named>(s: &Sourced<T>, kind: &'static str, used: &str) -> Problem {
    problem(
        s,
        kind,
        "metadata.name",
        ProblemReason::DuplicateObject,
        format!("defined again; the definition in {used} is used (the first by file name)"),
    )
}

/// A Service object's problems that still let it program its frontends.
pub(super) fn valid(problems: &[Problem]) -> bool {
    problems.iter().all(|p| {
        matches!(
            p.reason,
            ProblemReason::UnsupportedProtocol | ProblemReason::IgnoredAnnotation
        )
    })
}

/// Why a Service's programmed state is kept as it was ([`Model::hold`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hold {
    /// An object of it is invalid now.
    Invalid,
    /// It lost a frontend to another Service (a ClusterIP clash).
    Clash,
}

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
/// among its claimants only, so a pass costs what changed, not the cluster. [`super::build`] is
/// the same computation from scratch.
#[derive(Debug, Default)]
pub struct Model {
    node_name: String,
    zone: Option<String>,
    cache: HashMap<ServiceRef, Cached>,
    ownership: Ownership,
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
        // Services the model had before a reset: one removed in this same pass must still be
        // reported changed, or its frontends would outlive it.
        let mut forgotten = BTreeSet::new();
        if zone != self.zone || node_name != self.node_name {
            // Endpoint selection depends on both: everything is recomputed.
            forgotten = self.cache.keys().cloned().collect();
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
                .chain(&forgotten)
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
                self.ownership.unclaim(&r, &old);
            }
            if let Some(g) = group {
                let c = self.compute(g, node_name);
                self.ownership.claim(&r, &c);
                self.cache.insert(r.clone(), c);
            }
            changed.insert(r);
        }
        changed.extend(self.ownership.resolve(&mut self.cache));
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
            if let Some(c) = self.cache.get(r) {
                out.frontends.extend(c.programmed().cloned());
            }
        }
        Built {
            desired: out,
            changed: (!full).then_some(changed),
        }
    }

    /// Every frontend the model programs, with its spec, as a full pass emits them (in no
    /// particular order): what `/debug/services` names.
    pub fn frontends(&self) -> impl Iterator<Item = &(Frontend, FrontendSpec)> + '_ {
        self.cache.values().flat_map(Cached::programmed)
    }

    /// Why what is programmed for this Service is kept as it was, if it is.
    pub fn hold(&self, service: &ServiceRef) -> Option<Hold> {
        let c = self.cache.get(service)?;
        let held = (0..c.outcomes.len()).filter(|&i| c.held(i));
        held.map(|i| match c.clashes[i].is_empty() {
            true => Hold::Invalid,
            false => Hold::Clash,
        })
        .min()
    }

    /// Whether what is programmed on `vip` is kept as it is, because an invalid (or
    /// clashing) Service names it.
    pub fn holds_vip(&self, vip: std::net::Ipv4Addr) -> bool {
        (self.noted.iter())
            .filter_map(|r| self.cache.get(r))
            .any(|c| {
                (c.outcomes.iter().enumerate()).any(|(i, (o, _))| match o {
                    ServiceOutcome::Invalid { vips } | ServiceOutcome::Frontends { vips, .. } => {
                        c.held(i) && vips.contains(&vip)
                    }
                    ServiceOutcome::Skipped => false,
                })
            })
    }

    fn compute(&self, g: &Group, node_name: &str) -> Cached {
        let mut slice_problems = Vec::new();
        // One object per name: a slice or Service defined again (another file, another
        // document) is reported and ignored; the first by origin (file name) is used.
        let mut slices_used: Vec<(&str, &Sourced<Slice>)> = Vec::with_capacity(g.slices.len());
        for ((name, _), s) in g.slices.iter() {
            match slices_used.last() {
                Some((first_name, first)) if *first_name == name && !name.is_empty() => {
                    slice_problems.push(duplicate(s, "EndpointSlice", &first.origin));
                }
                _ => slices_used.push((name, s)),
            }
        }
        let slices_used = slices_used.into_iter().map(|(_, s)| s);
        // A slice naming its Service's ClusterIP would send connections in a loop.
        let own_vips: Vec<_> = (g.services.values())
            .flat_map(|s| cluster_ipv4s(&s.object))
            .collect();
        let slices = merge_slices(slices_used, node_name, &own_vips, &mut slice_problems);
        let first_origin = g.services.values().next().map(|s| s.origin.clone());
        let outcomes: Vec<_> = (g.services.values().enumerate())
            .map(|(i, s)| match &first_origin {
                Some(first) if i > 0 => (
                    ServiceOutcome::Skipped,
                    vec![duplicate(s, "Service", first)],
                ),
                _ => {
                    let mut problems = Vec::new();
                    let zone = self.zone.as_deref();
                    let o = service_frontends(s, &slices, node_name, zone, &mut problems);
                    (o, problems)
                }
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
