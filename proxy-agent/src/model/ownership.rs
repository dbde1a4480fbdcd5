//! Who owns a ClusterIP:port claimed by more than one Service: the first valid claimant, as
//! kube-proxy keeps one Service per frontend. Claims are kept as Services change, so a clash is
//! decided among a contended frontend's claimants only.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use foldhash::HashMap;

use super::{
    Frontend, Problem, ProblemReason, ServiceRef, Sourced, index::SortedVec, pass::Cached,
    problem::problem, service::ServiceOutcome,
};

/// A Service object (its Service's name, its position among objects of that name) claiming
/// frontends. Ordered as ownership is decided: the first valid claimant owns a frontend.
pub(super) type Claim = (ServiceRef, usize);

#[derive(Debug, Default)]
pub(super) struct Ownership {
    /// Every claimed frontend and its claimants.
    claims: HashMap<Frontend, SortedVec<Claim, ()>>,
    /// Frontends with more than one claimant: the only place a clash can be.
    contended: BTreeSet<Frontend>,
    /// Services with a clash now.
    clashed: BTreeSet<ServiceRef>,
}

impl Ownership {
    pub(super) fn claim(&mut self, r: &ServiceRef, c: &Cached) {
        for (i, f) in c.claims() {
            let set = self.claims.entry(f).or_default();
            set.insert((r.clone(), i), ());
            if set.len() > 1 {
                self.contended.insert(f);
            }
        }
    }

    pub(super) fn unclaim(&mut self, r: &ServiceRef, c: &Cached) {
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
    pub(super) fn resolve(
        &mut self,
        cache: &mut HashMap<ServiceRef, Cached>,
    ) -> BTreeSet<ServiceRef> {
        let claimants: BTreeSet<&Claim> = self
            .contended
            .iter()
            .flat_map(|f| self.claims[f].keys())
            .collect();
        let mut owners: HashMap<Frontend, &ServiceRef> = HashMap::default();
        let mut clashes: BTreeMap<Claim, Vec<Problem>> = BTreeMap::new();
        for (r, i) in claimants {
            let c = &cache[r];
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
            let Some(c) = cache.get_mut(r) else {
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
}
