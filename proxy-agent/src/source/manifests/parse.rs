//! One manifest file into objects: multi-document YAML or JSON, `kind: List` unwrapped,
//! other kinds ignored; any problem rejects the whole file, naming the field.

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

/// Parses one file into objects; any problem rejects the whole file.
pub(super) fn parse_file(
    origin: &Arc<str>,
    path: &Path,
    text: &str,
) -> Result<FileObjects, Vec<Problem>> {
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
        let mut bad = |kind: &'static str, field: String, reason, detail: String| {
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
            ("v1", "Service") => match typed::<Service>(doc) {
                Ok(s) => out.services.push(Arc::new(s)),
                Err((field, e)) => bad("Service", field, ProblemReason::InvalidValue, e),
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
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Deserializes into a k8s-openapi type, naming the field that failed.
fn typed<T: serde::de::DeserializeOwned>(doc: Value) -> Result<T, (String, String)> {
    // Tracking the path costs about as much as the conversion: only a failure pays for it.
    if let Ok(t) = T::deserialize(&doc) {
        return Ok(t);
    }
    serde_path_to_error::deserialize(doc).map_err(|e| (e.path().to_string(), e.inner().to_string()))
}
