//! The Kubernetes API source: one kube-rs watcher per resource (Services, EndpointSlices and
//! this node's Node), decoding only what the model reads (see [`lean`]), whose events are
//! applied to the model's index one by one: a change costs what it touches.
//!
//! Every (re)list is level-triggered: objects listed again unchanged touch nothing, and when
//! the list is complete, objects it did not name are removed (a delete missed while the watch
//! was down). The index keeps the last state the API server sent, so an API server that goes
//! away changes nothing until the watches resume.

pub mod lean;
pub mod watch;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service},
    jiff::Timestamp,
};
use kube::{Api, Client, runtime::watcher};
use tokio::task::JoinHandle;
use tracing::info;

use self::{
    lean::{LeanNode, LeanService, LeanSlice},
    watch::{Delivery, InitialList, Resource3},
};
use super::{Progress, Snapshot, Source};
use crate::{
    metrics::Metrics,
    model::{Index, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, ObjectRef, ServiceRef, Slice},
    wake::Wake,
};

/// kube-proxy's informer selector: objects of other proxies and headless ones are not ours.
fn not_ours() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// EndpointSlice annotation: when the endpoints controller saw the change that made the slice.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The origin of every object of this source, in the index and in problems.
const ORIGIN: &str = "kube-apiserver";

/// An object as the model reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    Slice(Arc<Slice>),
    Node(Arc<Node>),
}

impl Object {
    fn as_ref(&self) -> ObjectRef<'_> {
        match self {
            Object::Service(s) => ObjectRef::Service(s),
            Object::Slice(s) => ObjectRef::Slice(s),
            Object::Node(n) => ObjectRef::Node(n),
        }
    }
}

/// What a watcher hands over: the object, its key, and (for a slice) its trigger time.
pub struct Decoded {
    key: Key,
    object: Object,
    trigger: Option<SystemTime>,
}

/// (namespace, name); a Node's namespace is empty.
type Key = (String, String);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl From<LeanService> for Decoded {
    fn from(s: LeanService) -> Self {
        Decoded {
            key: key_of(&s.metadata),
            object: Object::Service(Arc::new(s.into_service())),
            trigger: None,
        }
    }
}

impl From<LeanSlice> for Decoded {
    fn from(s: LeanSlice) -> Self {
        Decoded {
            key: key_of(&s.metadata),
            trigger: s.trigger_time(),
            object: Object::Slice(Arc::new(s.slice)),
        }
    }
}

impl From<LeanNode> for Decoded {
    fn from(n: LeanNode) -> Self {
        Decoded {
            key: key_of(&n.metadata),
            object: Object::Node(Arc::new(n.into_node())),
            trigger: None,
        }
    }
}

/// One object held: where it sits in the index, and whether it is in it (a Service waits
/// out of it during the first list until its slices can be there too).
struct Held {
    pos: usize,
    object: Object,
    indexed: bool,
}

/// The objects of one resource, and the relist in progress.
#[derive(Default)]
struct Kind {
    held: HashMap<Key, Held>,
    /// Keys a (re)list named so far; Some between its Init and InitDone.
    relisting: Option<HashSet<Key>>,
    /// A first list completed.
    listed: bool,
}

pub struct KubeSource {
    rx: mpsc::Receiver<Delivery<Decoded>>,
    kinds: [Kind; 3],
    next_pos: usize,
    index: Index,
    origin: Arc<str>,
    node_name: String,
    /// Services held back during the first list because none of their slices had arrived.
    waiting: HashMap<ServiceRef, Vec<Key>>,
    /// The newest `last-change-trigger-time` among each Service's slices as they arrived.
    triggers: HashMap<ServiceRef, SystemTime>,
    /// This node's Node was deleted (a delete event, or a relist without it) and has not
    /// come back.
    node_gone: bool,
    tasks: Vec<JoinHandle<()>>,
}

/// How many objects a progressive first read applies between two programming passes, at
/// most (fewer when the stream pauses).
const PROGRESS_BATCH: usize = 512;
/// A pause in the stream this long, during a first read, is used for a programming pass.
const PROGRESS_PAUSE: Duration = Duration::from_millis(5);
/// A first read that waits this long for the lists says so (and goes on waiting).
const LIST_WAIT_LOG: Duration = Duration::from_secs(10);

impl KubeSource {
    /// Starts the three watchers; `wake` is notified of every event. Nothing is awaited: the
    /// first [`Source::read`] waits for the lists (programming as they arrive when the maps
    /// are empty).
    pub fn start(
        client: Client,
        node_name: &str,
        initial: InitialList,
        wake: Wake,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let selected = || watcher::Config::default().labels(&not_ours());
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let out = watch::Outlet {
            initial,
            tx,
            wake,
            metrics,
        };
        let tasks = vec![
            watch::spawn(
                Resource3::Service,
                Api::<LeanService>::all(client.clone()),
                selected(),
                out.clone(),
            ),
            watch::spawn(
                Resource3::Slice,
                Api::<LeanSlice>::all(client.clone()),
                selected(),
                out.clone(),
            ),
            watch::spawn(Resource3::Node, Api::<LeanNode>::all(client), node_cfg, out),
        ];
        let mut source = KubeSource::with_channel(rx, node_name);
        source.tasks = tasks;
        source
    }

    fn with_channel(rx: mpsc::Receiver<Delivery<Decoded>>, node_name: &str) -> Self {
        KubeSource {
            rx,
            kinds: Default::default(),
            next_pos: 0,
            index: Index::default(),
            origin: Arc::from(ORIGIN),
            node_name: node_name.to_string(),
            waiting: HashMap::new(),
            triggers: HashMap::new(),
            node_gone: false,
            tasks: vec![],
        }
    }

    /// Every resource has completed a first list.
    fn listed(&self) -> bool {
        self.kinds.iter().all(|k| k.listed)
    }

    /// Applies what the watchers delivered so far; returns how many events.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Ok(d) = self.rx.try_recv() {
            self.apply(d);
            n += 1;
        }
        n
    }

    /// Waits for the first lists, applying events as they arrive; `progress` (from empty
    /// maps) is handed the index every [`PROGRESS_BATCH`] objects or at a pause, once this
    /// node's Node is known.
    fn read_first_lists(&mut self, mut progress: Option<Progress<'_>>) {
        let started = Instant::now();
        let mut next_log = started + LIST_WAIT_LOG;
        let mut since_progress = 0;
        while !self.listed() {
            match self.rx.recv_timeout(PROGRESS_PAUSE) {
                Ok(d) => {
                    self.apply(d);
                    since_progress += 1;
                    if since_progress < PROGRESS_BATCH {
                        continue;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if since_progress > 0
                && self.kinds[Resource3::Node as usize].listed
                && let Some(p) = progress.as_mut()
            {
                p(&mut self.index);
                since_progress = 0;
            }
            if Instant::now() >= next_log {
                let pending: Vec<&str> = (Resource3::ALL.iter())
                    .filter(|r| !self.kinds[**r as usize].listed)
                    .map(|r| r.as_str())
                    .collect();
                info!(
                    waited_s = started.elapsed().as_secs(),
                    ?pending,
                    "still waiting for the first lists from the API server"
                );
                next_log += LIST_WAIT_LOG;
            }
        }
    }

    fn apply(&mut self, d: Delivery<Decoded>) {
        let r = d.resource as usize;
        match d.event {
            watcher::Event::Init => self.kinds[r].relisting = Some(HashSet::new()),
            watcher::Event::InitApply(o) => {
                if let Some(seen) = &mut self.kinds[r].relisting {
                    seen.insert(o.key.clone());
                }
                self.upsert(d.resource, o);
            }
            watcher::Event::Apply(o) => self.upsert(d.resource, o),
            watcher::Event::Delete(o) => self.delete(d.resource, &o.key),
            watcher::Event::InitDone => {
                let seen = self.kinds[r].relisting.take().unwrap_or_default();
                let gone: Vec<Key> = (self.kinds[r].held.keys())
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.delete(d.resource, &key);
                }
                let first = !self.kinds[r].listed;
                self.kinds[r].listed = true;
                if first && d.resource == Resource3::Slice {
                    // Every slice is known: the Services still waiting have none.
                    for (_, keys) in std::mem::take(&mut self.waiting) {
                        for key in keys {
                            self.enter(Resource3::Service, &key);
                        }
                    }
                }
            }
        }
    }

    fn upsert(&mut self, resource: Resource3, o: Decoded) {
        let r = resource as usize;
        if resource == Resource3::Node {
            self.node_gone = false;
        }
        if let (Object::Slice(s), Some(t)) = (&o.object, o.trigger)
            && let Some(svc) = slice_service(s)
        {
            let newest = self.triggers.entry(svc).or_insert(t);
            *newest = (*newest).max(t);
        }
        let released = match &o.object {
            Object::Slice(s) => slice_service(s).and_then(|svc| self.waiting.remove(&svc)),
            _ => None,
        };
        if let Some(held) = self.kinds[r].held.get_mut(&o.key) {
            if held.object != o.object {
                let pos = (self.origin.clone(), held.pos);
                if held.indexed {
                    self.index.remove_one(&pos, held.object.as_ref());
                    self.index.add(pos, o.object.as_ref());
                }
                held.object = o.object;
            } // else listed again unchanged (a relist): nothing to do
        } else {
            let pos = self.next_pos;
            self.next_pos += 1;
            // During the first list, a Service none of whose slices arrived yet waits:
            // programmed now, it would refuse connections its endpoints serve a moment later.
            let wait = match &o.object {
                Object::Service(s) if !self.kinds[Resource3::Slice as usize].listed => {
                    crate::model::service_ref(s).filter(|svc| !self.index.has_slices(svc))
                }
                _ => None,
            };
            let indexed = wait.is_none();
            if indexed {
                self.index
                    .add((self.origin.clone(), pos), o.object.as_ref());
            }
            if let Some(svc) = wait {
                self.waiting.entry(svc).or_default().push(o.key.clone());
            }
            let held = Held {
                pos,
                object: o.object,
                indexed,
            };
            self.kinds[r].held.insert(o.key, held);
        }
        for key in released.into_iter().flatten() {
            self.enter(Resource3::Service, &key);
        }
    }

    /// Puts a waiting object into the index.
    fn enter(&mut self, resource: Resource3, key: &Key) {
        if let Some(held) = self.kinds[resource as usize].held.get_mut(key)
            && !held.indexed
        {
            held.indexed = true;
            (self.index).add((self.origin.clone(), held.pos), held.object.as_ref());
        }
    }

    fn delete(&mut self, resource: Resource3, key: &Key) {
        let Some(held) = self.kinds[resource as usize].held.remove(key) else {
            return;
        };
        if resource == Resource3::Node {
            // The watch selects this node's Node by name: any Node deleted is this one.
            self.node_gone = true;
        }
        if held.indexed {
            (self.index).remove_one(&(self.origin.clone(), held.pos), held.object.as_ref());
        } else if let Object::Service(s) = &held.object
            && let Some(svc) = crate::model::service_ref(s)
            && let Some(keys) = self.waiting.get_mut(&svc)
        {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.waiting.remove(&svc);
            }
        }
        if self.triggers.len() > 2 * self.index.len() + 64 {
            // Services deleted since: forgotten now and then, not on every delete.
            let index = &self.index;
            self.triggers.retain(|svc, _| index.contains(svc));
        }
    }

    /// This node's Node has a deletion timestamp, or was deleted. (A Node never seen, as
    /// when the agent runs with a name no Node has, does not count: nothing says it goes.)
    fn node_deleting(&self) -> bool {
        self.node_gone
            || self.kinds[Resource3::Node as usize]
                .held
                .get(&(String::new(), self.node_name.clone()))
                .is_some_and(|h| match &h.object {
                    Object::Node(n) => n.metadata.deletion_timestamp.is_some(),
                    _ => false,
                })
    }
}

/// The Service a slice feeds (its `kubernetes.io/service-name` label).
fn slice_service(s: &Slice) -> Option<ServiceRef> {
    let name = s.service_name.as_deref().filter(|n| !n.is_empty())?;
    Some(ServiceRef::new(s.namespace.as_deref(), name))
}

impl Source for KubeSource {
    /// Applies the events delivered since the last read. The first read waits for the
    /// first lists of all three resources (off the async workers), programming through
    /// `progress` as objects arrive when it is given.
    fn read(&mut self, _full: bool, progress: Option<Progress<'_>>) -> Option<Snapshot<'_>> {
        if !self.listed() {
            tokio::task::block_in_place(|| self.read_first_lists(progress));
        }
        self.drain();
        let touched = self.index.take_touched();
        // Counted per event by the watchers, as kube-proxy counts them.
        let _ = self.index.take_changes();
        Some(Snapshot {
            index: &self.index,
            touched,
            problems: vec![],
            unchanged: false,
            read_before: None,
            changes: Default::default(),
        })
    }

    fn reads_progressively(&self) -> bool {
        true
    }

    /// The watchers follow from the start (they notify the agent's wake-up).
    fn follow(&mut self, _wake: &Wake) -> anyhow::Result<()> {
        Ok(())
    }

    fn trigger_time(&self, service: &ServiceRef) -> Option<SystemTime> {
        self.triggers.get(service).copied()
    }

    fn node_deleting(&self) -> bool {
        KubeSource::node_deleting(self)
    }
}

/// A `last-change-trigger-time` annotation's value.
pub(crate) fn parse_trigger_time(value: &str) -> Option<SystemTime> {
    let t = value.parse::<Timestamp>().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(t.as_nanosecond().max(0) as u64))
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests;
