//! One manifest file into objects: multi-document YAML or JSON, `kind: List` unwrapped,
//! other kinds ignored. Each document stands alone: one that is not a valid object is reported,
//! naming the field, and only that object keeps its previous version; a file that is not YAML
//! (or JSON) at all, or a document that names no object, keeps every previous object of the file.

use std::{path::Path, sync::Arc};

use k8s_openapi::api::{core::v1::Node, core::v1::Service};
use serde::Deserialize;
use serde_json::Value;

use super::FileObjects;
use crate::model::{Problem, ProblemReason, Slice};

pub(super) fn file_problem(
    origin: &Arc<str>,
    field: impl Into<String>,
    detail: impl Into<String>,
) -> Problem {
    Problem {
        origin: origin.clone(),
        kind: "File",
        namespace: String::new(),
        name: String::new(),
        field: field.into(),
        reason: ProblemReason::Parse,
        detail: detail.into(),
    }
}

/// Which of a file's previous objects stay while its current content has problems.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Hold {
    /// Those with these identities (documents that name their object but are not valid).
    Named(Vec<Identity>),
    /// All that the current content does not declare again (it is not all readable, or a
    /// broken document does not say which object it is).
    Everything,
}

/// An object's identity within one source: kind, namespace (empty for Nodes), name.
pub(super) type Identity = (&'static str, String, String);

/// What one file holds now.
#[derive(Debug)]
pub(super) struct FileParse {
    /// The valid objects.
    pub objects: FileObjects,
    /// What is wrong with the rest (empty: the whole file is good).
    pub problems: Vec<Problem>,
    pub hold: Hold,
}

impl FileParse {
    /// The file could not be read or parsed at all.
    pub fn unreadable(problems: Vec<Problem>) -> Self {
        FileParse {
            objects: FileObjects::default(),
            problems,
            hold: Hold::Everything,
        }
    }
}

/// `kind`'s identity as a document of a file names it.
fn identity(kind: &'static str, namespace: &str, name: &str) -> Identity {
    let namespace = if kind == "Node" { "" } else { namespace };
    (kind, namespace.to_string(), name.to_string())
}

/// The identities of `set`'s objects, as [`identity`] forms them from documents.
pub(super) fn identities(set: &FileObjects) -> impl Iterator<Item = (Identity, ObjectIndex)> + '_ {
    let ns = |n: &Option<String>| n.clone().unwrap_or_else(|| "default".into());
    let services = set.services.iter().enumerate().map(move |(i, s)| {
        let m = &s.metadata;
        let name = m.name.clone().unwrap_or_default();
        (
            identity("Service", &ns(&m.namespace), &name),
            ObjectIndex::Service(i),
        )
    });
    let slices = set.slices.iter().enumerate().map(move |(i, s)| {
        let name = s.name.clone().unwrap_or_default();
        (
            identity("EndpointSlice", &ns(&s.namespace), &name),
            ObjectIndex::Slice(i),
        )
    });
    let nodes = set.nodes.iter().enumerate().map(|(i, n)| {
        let name = n.metadata.name.clone().unwrap_or_default();
        (identity("Node", "", &name), ObjectIndex::Node(i))
    });
    services.chain(slices).chain(nodes)
}

/// Where an object is in a [`FileObjects`].
#[derive(Clone, Copy, Debug)]
pub(super) enum ObjectIndex {
    Service(usize),
    Slice(usize),
    Node(usize),
}

/// `now`'s objects, and those of `previous` that `hold` keeps and `now` does not declare again.
pub(super) fn with_held(mut now: FileObjects, previous: &FileObjects, hold: &Hold) -> FileObjects {
    if matches!(hold, Hold::Named(ids) if ids.is_empty()) {
        return now;
    }
    let declared: std::collections::HashSet<Identity> =
        identities(&now).map(|(id, _)| id).collect();
    let kept: Vec<ObjectIndex> = identities(previous)
        .filter(|(id, _)| !declared.contains(id))
        .filter(|(id, _)| match hold {
            Hold::Everything => true,
            Hold::Named(ids) => ids.contains(id),
        })
        .map(|(_, at)| at)
        .collect();
    for at in kept {
        match at {
            ObjectIndex::Service(i) => now.services.push(previous.services[i].clone()),
            ObjectIndex::Slice(i) => now.slices.push(previous.slices[i].clone()),
            ObjectIndex::Node(i) => now.nodes.push(previous.nodes[i].clone()),
        }
    }
    now
}

/// Parses one file into objects; each document stands alone (see the module's comment).
pub(super) fn parse_file(origin: &Arc<str>, path: &Path, text: &str) -> FileParse {
    match parse_documents(origin, path, text) {
        Ok(parse) => parse,
        Err(problems) => FileParse::unreadable(problems),
    }
}

fn parse_documents(origin: &Arc<str>, path: &Path, text: &str) -> Result<FileParse, Vec<Problem>> {
    // Editors on Windows save UTF-8 with a byte order mark; neither parser takes it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let docs: Vec<Value> = if path.extension().and_then(|e| e.to_str()) == Some("json") {
        vec![serde_json::from_str(text).map_err(|e| {
            vec![file_problem(
                origin,
                format!("line {} column {}", e.line(), e.column()),
                e.to_string(),
            )]
        })?]
    } else {
        let mut docs = Vec::new();
        for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).map_err(|e| {
                let at = e
                    .location()
                    .map(|l| format!("line {} column {}", l.line(), l.column()))
                    .unwrap_or_else(|| format!("document {i}"));
                vec![file_problem(origin, at, e.to_string())]
            })?;
            docs.push(v);
        }
        docs
    };
    let mut out = FileObjects::default();
    let mut problems = Vec::new();
    let mut held = Vec::new();
    let mut hold_everything = false;
    let mut queue: Vec<(String, Value)> = docs
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("document {i}"), d))
        .collect();
    while let Some((at, doc)) = queue.pop() {
        if doc.is_null() {
            continue; // an empty document between `---` separators
        }
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let api = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        // An invalid object: reported; its previous version stays, or every previous object
        // of the file if this document does not say which object it is.
        let mut bad = |kind: &'static str, field: String, reason, detail: String| {
            match kind {
                "Service" | "EndpointSlice" | "Node" if !name.is_empty() => {
                    held.push(identity(kind, &namespace, &name));
                }
                _ => hold_everything = true,
            }
            problems.push(Problem {
                origin: origin.clone(),
                kind,
                namespace: namespace.clone(),
                name: name.clone(),
                field,
                reason,
                detail,
            });
        };
        match (api.as_str(), kind.as_str()) {
            (_, k) if k == "List" || (k.ends_with("List") && doc.get("items").is_some()) => {
                match doc.get("items").and_then(Value::as_array) {
                    Some(items) => {
                        queue.extend(
                            items
                                .iter()
                                .enumerate()
                                .map(|(j, it)| (format!("{at} items[{j}]"), it.clone())),
                        );
                    }
                    None => bad(
                        "List",
                        "items".into(),
                        ProblemReason::MissingField,
                        format!("{at}: a List needs an items array"),
                    ),
                }
            }
            ("v1", "Service") => match service_port_missing(&doc) {
                // k8s-openapi reads a missing required `port` as 0: say what is wrong.
                Some(field) => bad(
                    "Service",
                    field,
                    ProblemReason::MissingField,
                    "a Service port needs `port`".into(),
                ),
                None => match typed::<Service>(doc) {
                    Ok(s) => out.services.push(Arc::new(s)),
                    Err((field, e)) => bad("Service", field, ProblemReason::InvalidValue, e),
                },
            },
            ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<Slice>(doc) {
                Ok(s) => out.slices.push(Arc::new(s)),
                Err((field, e)) => bad("EndpointSlice", field, ProblemReason::InvalidValue, e),
            },
            ("v1", "Node") => match typed::<Node>(doc) {
                Ok(n) => out.nodes.push(Arc::new(n)),
                Err((field, e)) => bad("Node", field, ProblemReason::InvalidValue, e),
            },
            ("", _) | (_, "") => bad(
                "Object",
                format!("{at} apiVersion/kind"),
                ProblemReason::MissingField,
                "every object needs apiVersion and kind".into(),
            ),
            ("v1" | "discovery.k8s.io/v1beta1", "EndpointSlice" | "Endpoints") => bad(
                "Object",
                format!("{at} apiVersion"),
                ProblemReason::InvalidValue,
                format!("{api}/{kind} is not read; use discovery.k8s.io/v1 EndpointSlice"),
            ),
            // Other kinds (Deployments, ConfigMaps...) may share the directory; not ours.
            _ => tracing::debug!(file = %origin, %api, %kind, "ignoring object of another kind"),
        }
    }
    // Objects were popped from the back; restore file order for stable output.
    out.services.reverse();
    out.slices.reverse();
    out.nodes.reverse();
    problems.reverse();
    Ok(FileParse {
        objects: out,
        problems,
        hold: if hold_everything {
            Hold::Everything
        } else {
            Hold::Named(held)
        },
    })
}

/// The field of the first Service port without `port`, if any.
fn service_port_missing(doc: &Value) -> Option<String> {
    let ports = doc.pointer("/spec/ports")?.as_array()?;
    ports
        .iter()
        .position(|p| p.is_object() && p.get("port").is_none_or(Value::is_null))
        .map(|i| format!("spec.ports[{i}].port"))
}

/// Deserializes into a k8s-openapi type, naming the field that failed.
fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, (String, String)> {
    // Tracking the path costs about as much as the conversion: only a failure pays for it.
    if let Ok(t) = T::deserialize(&doc) {
        return Ok(t);
    }
    serde_path_to_error::deserialize(doc).map_err(|e| (e.path().to_string(), e.inner().to_string()))
}
