//! A small HTTP server speaking the Kubernetes list/watch protocol for Services,
//! EndpointSlices and Nodes, as the API server does: JSON bodies as it sends them (list items
//! without kind/apiVersion, `metadata.resourceVersion` everywhere), `?watch=1` streams of
//! ADDED/MODIFIED/DELETED/BOOKMARK events from a resourceVersion, `410 Gone` (an ERROR event
//! with a `Status`) for a compacted one, label and field selectors, discovery for kubectl.
//! Fault hooks: drop every watch, answer 500 for a while, compact the history.
//!
//! Streaming lists (`sendInitialEvents=true` on a watch: the current objects as ADDED events,
//! then a BOOKMARK annotated `k8s.io/initial-events-end`), or a 422 for them as a server
//! without the WatchList feature answers. Every write gets `managedFields`, as the API
//! server's field manager adds them. Requests are counted by verb and resource. Objects are
//! serialized once, when written, so serving a list or a watch is copying bytes.
//!
//! Writes as the API server answers them (`writes`): create (POST), replace (PUT) and delete
//! (DELETE) with their `AlreadyExists`, `NotFound` and resourceVersion `Conflict` answers,
//! `fieldValidation`, and the OpenAPI v3 documents kubectl reads before writing (`openapi`).
//! Each write goes through the same path as [`FakeApiServer::apply`] and
//! [`FakeApiServer::delete`], so watches see it as an event with a new resourceVersion.
//!
//! It runs on its own thread and tokio runtime, on 127.0.0.1, and stops on drop.

mod meta;
mod openapi;
mod writes;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    /// The API group ("" for the core group).
    fn group(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io",
            _ => "",
        }
    }
    /// The resource as the API server names it in messages ("endpointslices.discovery.k8s.io").
    fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }
    fn namespaced(self) -> bool {
        self != Kind::Node
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }
    fn of(v: &Value) -> Option<Kind> {
        match v.get("kind")?.as_str()? {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }
}

type Key = (Kind, String, String);

/// An object as written: its value (for selectors) and its JSON, with and without
/// kind/apiVersion (list items carry none, as the API server sends them).
struct Stored {
    value: Value,
    json: String,
    item: String,
}

impl Stored {
    fn new(value: Value) -> Arc<Stored> {
        let json = value.to_string();
        let mut bare = value.clone();
        if let Some(o) = bare.as_object_mut() {
            o.remove("kind");
            o.remove("apiVersion");
        }
        Arc::new(Stored {
            item: bare.to_string(),
            json,
            value,
        })
    }
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Arc<Stored>>,
    /// (resourceVersion, event type, kind, object) in resourceVersion order.
    log: Vec<(u64, &'static str, Kind, Arc<Stored>)>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted_rv: u64,
    fail_until: Option<Instant>,
    /// Bumped to end every open watch.
    watch_epoch: u64,
    requests: u64,
    /// Requests by "verb resource" ("list endpointslices", "watch services", "get", ...).
    by_verb: BTreeMap<String, u64>,
    /// Refuse `sendInitialEvents` (a server without the WatchList feature).
    refuse_streaming: bool,
    /// Time spent storing writes and building responses (not the HTTP layer's).
    busy: Duration,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl Shared {
    /// Stores `obj` (created, or replacing the one of its key) with the fields the API server
    /// sets itself, logs its ADDED or MODIFIED event at a new resourceVersion, wakes the
    /// watches. The one write path: in-process `apply` and HTTP create and replace.
    fn write(&self, kind: Kind, obj: Value, manager: &str) -> Arc<Stored> {
        self.write_if(kind, obj, manager, |_| Ok::<_, Infallible>(()))
            .unwrap_or_else(|e| match e {})
    }

    /// Like [`Self::write`], if `check` (given the stored object, under the same lock) agrees.
    fn write_if<E>(
        &self,
        kind: Kind,
        mut obj: Value,
        manager: &str,
        check: impl FnOnce(Option<&Value>) -> Result<(), E>,
    ) -> Result<Arc<Stored>, E> {
        let started = Instant::now();
        let mut g = self.inner.lock().unwrap();
        let key = key_of(kind, &obj);
        let old = g.objects.get(&key).cloned();
        check(old.as_deref().map(|o| &o.value))?;
        g.rv += 1;
        let rv = g.rv;
        meta::system_fields(kind, &mut obj, old.as_deref().map(|o| &o.value), rv);
        if obj["metadata"].get("managedFields").is_none() {
            obj["metadata"]["managedFields"] = meta::managed_fields(kind, &obj, manager);
        }
        let ty = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let stored = Stored::new(obj);
        g.objects.insert(key, stored.clone());
        g.log.push((rv, ty, kind, stored.clone()));
        g.busy += started.elapsed();
        drop(g);
        self.changed.notify_waiters();
        Ok(stored)
    }

    /// Removes the object at `key` if `check` (given it, under the same lock) agrees, and logs
    /// its DELETED event at a new resourceVersion; the object as it was stored (None: there
    /// was none).
    fn remove_if<E>(
        &self,
        key: &Key,
        check: impl FnOnce(&Value) -> Result<(), E>,
    ) -> Result<Option<Arc<Stored>>, E> {
        let mut g = self.inner.lock().unwrap();
        let Some(stored) = g.objects.get(key).cloned() else {
            return Ok(None);
        };
        check(&stored.value)?;
        g.objects.remove(key);
        g.rv += 1;
        let rv = g.rv;
        let mut obj = stored.value.clone();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        g.log.push((rv, "DELETED", key.0, Stored::new(obj)));
        drop(g);
        self.changed.notify_waiters();
        Ok(Some(stored))
    }
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn key_of(kind: Kind, v: &Value) -> Key {
    let ns = if kind == Kind::Node {
        String::new()
    } else {
        v.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    };
    (
        kind,
        ns,
        v.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    )
}

impl FakeApiServer {
    pub fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1000,
                ..Default::default()
            }),
            changed: Notify::new(),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                let app = Router::new().fallback(handle).with_state(s);
                // As Go's net/http (the API server) does: a watch event is written at once,
                // not held back by Nagle until the client's delayed ACK (40 ms).
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(5))?;
        Ok(FakeApiServer {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED), as `kubectl apply` would.
    pub fn apply(&self, obj: Value) {
        let kind = Kind::of(&obj).expect("a Service, EndpointSlice or Node");
        let manager = match kind {
            Kind::EndpointSlice => "endpointslice-controller",
            _ => "kubectl-client-side-apply",
        };
        self.shared.write(kind, obj, manager);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let ns = if kind.namespaced() { namespace } else { "" };
        let key = (kind, ns.to_string(), name.to_string());
        let _ = self.shared.remove_if(&key, |_| Ok::<_, Infallible>(()));
    }

    /// Ends every open watch (as an API server restart or a network cut does).
    pub fn drop_watches(&self) {
        self.shared.inner.lock().unwrap().watch_epoch += 1;
        self.shared.changed.notify_waiters();
    }

    /// Answers every request with 500 for `d` (and ends the open watches).
    pub fn fail_for(&self, d: Duration) {
        self.shared.inner.lock().unwrap().fail_until = Some(Instant::now() + d);
        self.drop_watches();
    }

    /// Compacts the history: a watch resumed from an older resourceVersion gets 410 Gone.
    pub fn expire_history(&self) {
        {
            let mut g = self.shared.inner.lock().unwrap();
            g.compacted_rv = g.rv;
            g.log.clear();
        }
        self.drop_watches();
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.shared.inner.lock().unwrap().requests
    }

    /// Requests so far by "verb resource": "list services", "watch endpointslices" (a watch
    /// with `sendInitialEvents` is "watch-list ..."), "create endpointslices", "update
    /// services", "delete endpointslices", "get", "discovery", "openapi".
    pub fn requests_by_verb(&self) -> BTreeMap<String, u64> {
        self.shared.inner.lock().unwrap().by_verb.clone()
    }

    /// Time the server spent storing writes and building responses so far (its share of a
    /// measurement; the HTTP layer's is not in it).
    pub fn busy(&self) -> Duration {
        self.shared.inner.lock().unwrap().busy
    }

    /// Answers `sendInitialEvents` with 422, as a server without the WatchList feature does.
    pub fn refuse_streaming_lists(&self, refuse: bool) {
        self.shared.inner.lock().unwrap().refuse_streaming = refuse;
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.drop_watches();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A failure about one object, with the `details` the API server adds (`kind` holds the
/// resource, as in `NewNotFound`/`NewConflict`).
fn object_status(code: u16, reason: &str, message: &str, kind: Kind, name: &str) -> Value {
    let mut v = status(code, reason, message);
    v["details"] = details(name, kind.group(), kind.plural());
    v
}

/// `StatusDetails`, leaving out what is empty (`omitempty`: the core group, no name).
fn details(name: &str, group: &str, kind: &str) -> Value {
    let mut d = json!({"kind": kind});
    for (field, value) in [("name", name), ("group", group)] {
        if !value.is_empty() {
            d[field] = json!(value);
        }
    }
    d
}

/// The 404 `Status` for a missing object, as `NewNotFound` words it.
fn not_found(kind: Kind, name: &str) -> Value {
    let msg = format!("{} \"{name}\" not found", kind.qualified());
    object_status(404, "NotFound", &msg, kind, name)
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

/// `a`, `!a`, `a=b`, `a!=b`, comma-separated (the forms kube-proxy's informers use).
fn matches_selector(labels: Option<&Value>, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            get(k) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            get(k.trim_end_matches('=')) == Some(v)
        } else {
            get(term).is_some()
        }
    })
}

fn matches_fields(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some(("metadata.name", v)) => {
                obj.pointer("/metadata/name").and_then(Value::as_str)
                    == Some(v.trim_start_matches('='))
            }
            Some(("metadata.namespace", v)) => {
                obj.pointer("/metadata/namespace").and_then(Value::as_str)
                    == Some(v.trim_start_matches('='))
            }
            _ => true,
        })
}

struct Query {
    /// A write's `fieldValidation` and `fieldManager` (see `writes`).
    field_validation: String,
    field_manager: String,
    watch: bool,
    send_initial_events: bool,
    rv: Option<u64>,
    bookmarks: bool,
    labels: String,
    fields: String,
    timeout: Duration,
}

fn parse_query(q: &str) -> Query {
    let mut out = Query {
        field_validation: String::new(),
        field_manager: String::new(),
        watch: false,
        send_initial_events: false,
        rv: None,
        bookmarks: false,
        labels: String::new(),
        fields: String::new(),
        timeout: Duration::from_secs(290),
    };
    for (k, v) in q.split('&').filter_map(|kv| kv.split_once('=')) {
        let v = percent_decode(v);
        match k {
            "watch" => out.watch = v == "1" || v == "true",
            "resourceVersion" => out.rv = v.parse().ok(),
            "allowWatchBookmarks" => out.bookmarks = v == "true",
            "sendInitialEvents" => out.send_initial_events = v == "true",
            "labelSelector" => out.labels = v,
            "fieldSelector" => out.fields = v,
            "fieldValidation" => out.field_validation = v,
            "fieldManager" => out.field_manager = v,
            "timeoutSeconds" => out.timeout = Duration::from_secs(v.parse().unwrap_or(290)),
            _ => {}
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(c) => {
                        out.push(c);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (kind, namespace, name) of a single-object path.
fn object_path(path: &str) -> Option<Key> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "services", name] => {
            Some((Kind::Service, ns.to_string(), name.to_string()))
        }
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
            name,
        ] => Some((Kind::EndpointSlice, ns.to_string(), name.to_string())),
        ["api", "v1", "nodes", name] => Some((Kind::Node, String::new(), name.to_string())),
        _ => None,
    }
}

/// (kind, namespace filter) for a resource path.
fn resource(path: &str) -> Option<(Kind, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "services"] => Some((Kind::Service, None)),
        ["api", "v1", "namespaces", ns, "services"] => Some((Kind::Service, Some(ns.to_string()))),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => Some((Kind::EndpointSlice, None)),
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ] => Some((Kind::EndpointSlice, Some(ns.to_string()))),
        ["api", "v1", "nodes"] => Some((Kind::Node, None)),
        _ => None,
    }
}

fn discovery(path: &str, addr: &str) -> Option<Value> {
    let res = |name: &str, kind: &str, namespaced: bool, short: &[&str]| {
        json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind,
               "verbs": ["create", "delete", "get", "list", "update", "watch"], "shortNames": short})
    };
    Some(match path.trim_end_matches('/') {
        "/version" => {
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"})
        }
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]}),
        "/apis" => {
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "discovery.k8s.io",
                          "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
                          "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}}]})
        }
        "/api/v1" => {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
                          res("services", "Service", true, &["svc"]), res("nodes", "Node", false, &["no"])]})
        }
        "/apis/discovery.k8s.io/v1" => {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "discovery.k8s.io/v1",
                          "resources": [res("endpointslices", "EndpointSlice", true, &[])]})
        }
        _ => return None,
    })
}

async fn handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let q = parse_query(&query);
    let method = req.method().clone();
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let verb = if method != Method::GET {
        writes::verb(&method, &path)
    } else if discovery(&path, &host).is_some() {
        "discovery".to_string()
    } else if openapi::document(&path).is_some() {
        "openapi".to_string()
    } else if object_path(&path).is_some() {
        "get".to_string()
    } else {
        let plural = resource(&path).map_or("unknown", |(k, _)| k.plural());
        match (q.watch, q.send_initial_events) {
            (false, _) => format!("list {plural}"),
            (true, false) => format!("watch {plural}"),
            (true, true) => format!("watch-list {plural}"),
        }
    };
    {
        let mut g = s.inner.lock().unwrap();
        g.requests += 1;
        *g.by_verb.entry(verb).or_default() += 1;
        if g.fail_until.is_some_and(|t| Instant::now() < t) {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &status(500, "InternalError", "injected failure"),
            );
        }
    }
    if method != Method::GET {
        let agent = (req.headers().get("user-agent"))
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string();
        return match axum::body::to_bytes(req.into_body(), writes::MAX_BODY).await {
            Ok(body) => writes::handle(&s, &method, &path, &q, &agent, &body),
            Err(_) => json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &status(
                    413,
                    "RequestEntityTooLarge",
                    &format!("Request entity too large: limit is {}", writes::MAX_BODY),
                ),
            ),
        };
    }
    if let Some(v) = discovery(&path, &host) {
        return json_response(StatusCode::OK, &v);
    }
    if let Some(v) = openapi::document(&path) {
        return json_response(StatusCode::OK, &v);
    }
    if let Some(key) = object_path(&path) {
        let g = s.inner.lock().unwrap();
        return match g.objects.get(&key) {
            Some(o) => (
                StatusCode::OK,
                [("content-type", "application/json")],
                o.json.clone(),
            )
                .into_response(),
            None => json_response(StatusCode::NOT_FOUND, &not_found(key.0, &key.2)),
        };
    }
    let Some((kind, ns)) = resource(&path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ),
        );
    };
    let selected = move |obj: &Value| {
        ns.as_deref()
            .is_none_or(|n| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(n))
            && matches_selector(obj.pointer("/metadata/labels"), &q.labels)
            && matches_fields(obj, &q.fields)
    };
    if !q.watch {
        let started = Instant::now();
        let mut g = s.inner.lock().unwrap();
        let mut body = format!(
            "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{}\"}},\"items\":[",
            kind.name(),
            kind.api_version(),
            g.rv
        );
        let mut first = true;
        for o in (g.objects.range((kind, String::new(), String::new())..))
            .take_while(|((k, _, _), _)| *k == kind)
            .map(|(_, o)| o)
            .filter(|o| selected(&o.value))
        {
            if !first {
                body.push(',');
            }
            first = false;
            body.push_str(&o.item);
        }
        body.push_str("]}");
        g.busy += started.elapsed();
        return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    }

    // A watch: events after `rv` (or, for a streaming list, the current objects and the
    // bookmark that ends them), then live ones, bookmarks each second, until the timeout, a
    // fault hook, or the client going away.
    let (start_rv, epoch, initial) = {
        let started = Instant::now();
        let mut g = s.inner.lock().unwrap();
        if q.send_initial_events && g.refuse_streaming {
            // What ValidateListOptions answers when the WatchList feature is off.
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &status(
                    422,
                    "Invalid",
                    "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
                ),
            );
        }
        let rv = match (q.send_initial_events, q.rv) {
            // The watch cache's state now ("0", or unset: not older than now).
            (true, _) | (false, None | Some(0)) => g.rv,
            (false, Some(rv)) => rv,
        };
        if rv < g.compacted_rv {
            let ev = json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {rv} ({})", g.compacted_rv))});
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                format!("{ev}\n"),
            )
                .into_response();
        }
        let mut initial = String::new();
        if q.send_initial_events {
            for o in (g.objects.range((kind, String::new(), String::new())..))
                .take_while(|((k, _, _), _)| *k == kind)
                .map(|(_, o)| o)
                .filter(|o| selected(&o.value))
            {
                initial.push_str("{\"type\":\"ADDED\",\"object\":");
                initial.push_str(&o.json);
                initial.push_str("}\n");
            }
            let end = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": rv.to_string(),
                             "annotations": {"k8s.io/initial-events-end": "true"}}}});
            initial.push_str(&format!("{end}\n"));
        }
        g.busy += started.elapsed();
        (rv, g.watch_epoch, initial)
    };
    struct W {
        s: Arc<Shared>,
        last: u64,
        epoch: u64,
        deadline: Instant,
        next_bookmark: Instant,
        bookmarks: bool,
        pending: Option<String>,
    }
    let w = W {
        s,
        last: start_rv,
        epoch,
        deadline: Instant::now() + q.timeout,
        next_bookmark: Instant::now() + Duration::from_secs(1),
        bookmarks: q.bookmarks,
        pending: (!initial.is_empty()).then_some(initial),
    };
    let stream = futures::stream::unfold((w, selected), move |(mut w, selected)| async move {
        loop {
            if let Some(chunk) = w.pending.take() {
                return Some((Ok::<_, Infallible>(Bytes::from(chunk)), (w, selected)));
            }
            let now = Instant::now();
            if now >= w.deadline {
                return None;
            }
            let notified = w.s.changed.notified();
            {
                let started = Instant::now();
                let mut g = w.s.inner.lock().unwrap();
                if g.watch_epoch != w.epoch {
                    return None;
                }
                let from = g.log.partition_point(|(rv, ..)| *rv <= w.last);
                let mut chunk = String::new();
                for (_, ty, _, o) in
                    (g.log[from..].iter()).filter(|(_, _, k, o)| *k == kind && selected(&o.value))
                {
                    chunk.push_str(&format!("{{\"type\":\"{ty}\",\"object\":{}}}\n", o.json));
                }
                w.last = w.last.max(g.rv);
                g.busy += started.elapsed();
                if chunk.is_empty() && w.bookmarks && now >= w.next_bookmark {
                    chunk = format!(
                        "{}\n",
                        json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": g.rv.to_string()}}})
                    );
                    w.next_bookmark = now + Duration::from_secs(1);
                }
                if !chunk.is_empty() {
                    w.pending = Some(chunk);
                    continue;
                }
            }
            let wait = w
                .next_bookmark
                .min(w.deadline)
                .saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(wait.max(Duration::from_millis(10)), notified).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_follow_kubernetes_syntax() {
        let l = json!({"a": "1", "b": "2"});
        assert!(matches_selector(Some(&l), "a,!c"));
        assert!(!matches_selector(Some(&l), "!a"));
        assert!(matches_selector(Some(&l), "a=1,b!=3"));
        assert!(!matches_selector(Some(&l), "a==2"));
        assert!(matches_selector(None, "!service.kubernetes.io/headless"));
        assert_eq!(percent_decode("%21a%2C%21b"), "!a,!b");
    }
}
