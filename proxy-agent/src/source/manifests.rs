//! The manifests source: a directory of YAML/JSON files holding `v1/Service`,
//! `discovery.k8s.io/v1/EndpointSlice` and `v1/Node` objects (multi-document files and
//! `kind: List` accepted; other kinds are ignored). Each file is parsed whole: a file that does
//! not parse keeps the objects it had at its last good parse, so an editor's half-written save
//! or a typo never takes down what is serving.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use serde_json::Value;

use crate::model::{Objects, Problem, ProblemReason, Sourced};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("manifests directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file's objects.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    nodes: Vec<Arc<Node>>,
}

#[derive(Debug)]
struct FileEntry {
    fingerprint: (SystemTime, u64),
    /// What the file contributes: its last good parse (empty if it never parsed).
    objects: FileObjects,
    /// Problems of the current content (non-empty: `objects` is from an older version).
    problems: Vec<Problem>,
}

/// The directory's state, rescanned on change.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
}

/// What a rescan found.
#[derive(Debug, Default)]
pub struct Rescan {
    /// Some file was added, changed or removed.
    pub changed: bool,
    /// Problems of files that changed in this rescan (report each once).
    pub new_problems: Vec<Problem>,
}

fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // Editors' swap and backup files are not manifests.
    !name.starts_with('.')
        && !name.ends_with('~')
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

impl ManifestDir {
    pub fn new(dir: &Path) -> Result<Self, SourceError> {
        let meta = fs::metadata(dir).map_err(|source| SourceError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SourceError::Dir {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(ManifestDir {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads files whose size or mtime changed, drops removed ones.
    pub fn rescan(&mut self) -> Result<Rescan, SourceError> {
        let mut out = Rescan::default();
        let entries = fs::read_dir(&self.dir).map_err(|source| SourceError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        let mut seen = Vec::new();
        for path in paths {
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            seen.push(path.clone());
            let fingerprint = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self
                .files
                .get(&path)
                .is_some_and(|f| f.fingerprint == fingerprint)
            {
                continue;
            }
            out.changed = true;
            let origin: Arc<str> = Arc::from(path.display().to_string());
            let parsed = fs::read_to_string(&path)
                .map_err(|e| vec![file_problem(&origin, "file", e.to_string())])
                .and_then(|text| parse_file(&origin, &path, &text));
            let previous = self
                .files
                .remove(&path)
                .map(|f| f.objects)
                .unwrap_or_default();
            let entry = match parsed {
                Ok(objects) => FileEntry {
                    fingerprint,
                    objects,
                    problems: vec![],
                },
                Err(problems) => {
                    out.new_problems.extend(problems.iter().cloned());
                    FileEntry {
                        fingerprint,
                        objects: previous,
                        problems,
                    }
                }
            };
            self.files.insert(path, entry);
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        out.changed |= self.files.len() != before;
        Ok(out)
    }

    /// Problems of the files' current contents.
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.files.values().flat_map(|f| f.problems.iter())
    }

    pub fn objects(&self) -> Objects {
        fn sourced<T>(origin: &Arc<str>, objects: &[Arc<T>]) -> impl Iterator<Item = Sourced<T>> {
            objects.iter().map(|o| Sourced {
                origin: origin.clone(),
                object: o.clone(),
            })
        }
        let mut out = Objects::default();
        for (path, f) in &self.files {
            let origin: Arc<str> = Arc::from(path.display().to_string());
            out.services.extend(sourced(&origin, &f.objects.services));
            out.slices.extend(sourced(&origin, &f.objects.slices));
            out.nodes.extend(sourced(&origin, &f.objects.nodes));
        }
        out
    }
}

fn file_problem(origin: &Arc<str>, field: impl Into<String>, detail: impl Into<String>) -> Problem {
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
fn parse_file(origin: &Arc<str>, path: &Path, text: &str) -> Result<FileObjects, Vec<Problem>> {
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
            ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(doc) {
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
    serde_path_to_error::deserialize(doc).map_err(|e| (e.path().to_string(), e.inner().to_string()))
}

#[cfg(test)]
mod tests;
