//! The objects of a source, grouped by the Service they belong to: the model's input, kept up
//! to date object by object by the sources.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};

use super::{Objects, ServiceRef, Slice, Sourced};

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
pub(super) struct Group {
    pub(super) services: SortedVec<Pos, Sourced<Service>>,
    pub(super) slices: SortedVec<(String, Pos), Sourced<Slice>>,
}

/// A map for a handful of entries (a Service's objects, a frontend's claimants): a sorted
/// Vec. A BTreeMap allocates nodes of 11 slots, about 1 KiB per Service at this size.
#[derive(Clone, Debug)]
pub(super) struct SortedVec<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedVec<K, V> {
    fn default() -> Self {
        SortedVec(Vec::new())
    }
}

impl<K: Ord, V> SortedVec<K, V> {
    pub(super) fn insert(&mut self, k: K, v: V) {
        match self.0.binary_search_by(|(e, _)| e.cmp(&k)) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }

    pub(super) fn remove(&mut self, k: &K) {
        if let Ok(i) = self.0.binary_search_by(|(e, _)| e.cmp(k)) {
            self.0.remove(i);
        }
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(super) fn len(&self) -> usize {
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
    pub(super) groups: BTreeMap<ServiceRef, Group>,
    /// Services without a name and slices that name no Service: reported, never programmed.
    pub(super) unnamed: BTreeMap<Pos, Sourced<Service>>,
    pub(super) unowned: BTreeMap<(String, Pos), Sourced<Slice>>,
    pub(super) nodes: BTreeMap<Pos, Sourced<Node>>,
    /// Services whose objects were added or removed since [`Self::take_touched`]; None:
    /// not known (a new index).
    touched: Option<BTreeSet<ServiceRef>>,
    /// Objects added, changed or removed since [`Self::take_changes`], by kind and identity.
    /// Sources update an object by removing it and adding its new version (a manifest file
    /// all of its objects): one change, and none if the new version is the old one.
    changes: BTreeMap<(ChangeKind, ServiceRef), Change>,
}

/// What happened to one object since [`Index::take_changes`].
#[derive(Clone, Debug)]
enum Change {
    /// Removed (so far): this version, to tell an update that changes nothing.
    Removed(Removed),
    Changed,
}

#[derive(Clone, Debug, PartialEq)]
enum Removed {
    Service(Arc<Service>),
    Slice(Arc<Slice>),
}

/// Which kind of object changed (kube-proxy counts Service and EndpointSlice changes apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    Service,
    EndpointSlice,
}

/// How many distinct objects of each kind changed, for
/// `proxy_sync_proxy_rules_{service,endpoint}_changes_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectChanges {
    pub services: usize,
    pub endpoint_slices: usize,
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

/// A slice's identity among changes (its namespace and name; ServiceRef is that shape).
fn slice_id(s: &Slice) -> (ChangeKind, ServiceRef) {
    let id = ServiceRef::new(
        s.namespace.as_deref(),
        s.name.as_deref().unwrap_or_default(),
    );
    (ChangeKind::EndpointSlice, id)
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
                    self.removed(
                        (ChangeKind::Service, r.clone()),
                        Removed::Service(s.clone()),
                    );
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
                if slice_owner(s).is_some() {
                    self.removed(slice_id(s), Removed::Slice(s.clone()));
                }
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
                let now = Removed::Service(s.object.clone());
                self.added((ChangeKind::Service, r.clone()), &now);
                self.groups.entry(r).or_default().services.insert(pos, s);
            }
            None => {
                self.unnamed.insert(pos, s);
            }
        }
    }

    fn add_slice(&mut self, pos: Pos, s: Sourced<Slice>) {
        if slice_owner(&s.object).is_some() {
            self.added(slice_id(&s.object), &Removed::Slice(s.object.clone()));
        }
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
    /// [`super::Model::build`].
    pub fn take_touched(&mut self) -> Option<BTreeSet<ServiceRef>> {
        self.touched.replace(BTreeSet::new())
    }

    /// How many objects changed since the last call, by kind.
    pub fn take_changes(&mut self) -> ObjectChanges {
        let changes = std::mem::take(&mut self.changes);
        let services = changes
            .keys()
            .filter(|(k, _)| *k == ChangeKind::Service)
            .count();
        ObjectChanges {
            services,
            endpoint_slices: changes.len() - services,
        }
    }

    fn removed(&mut self, id: (ChangeKind, ServiceRef), old: Removed) {
        self.changes.entry(id).or_insert(Change::Removed(old));
    }

    /// `now` added: no change if it is the version removed since the last take.
    fn added(&mut self, id: (ChangeKind, ServiceRef), now: &Removed) {
        match self.changes.get(&id) {
            Some(Change::Removed(old)) if old == now => {
                self.changes.remove(&id);
            }
            _ => {
                self.changes.insert(id, Change::Changed);
            }
        }
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

    /// Whether some EndpointSlice of this Service is indexed.
    pub fn has_slices(&self, service: &ServiceRef) -> bool {
        self.groups
            .get(service)
            .is_some_and(|g| !g.slices.is_empty())
    }

    /// Number of Services (names) indexed.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// A Service's namespace/name; None without a name.
pub fn service_ref(svc: &Service) -> Option<ServiceRef> {
    let name = svc.metadata.name.as_deref().filter(|n| !n.is_empty())?;
    Some(ServiceRef::new(svc.metadata.namespace.as_deref(), name))
}
