//! The fields the API server sets on every write, whatever the body says: identity and
//! versions (the registry's `FillObjectMetaSystemFields`, the kinds' strategies) and the
//! field manager's `managedFields`.

use serde_json::{Value, json};

use super::Kind;

/// The metadata the API server sets on a write, whatever the body says: the resourceVersion;
/// on create a new uid, the creation time and (EndpointSlices) generation 1; on update those
/// of the stored object, the generation bumped when more than metadata (or the labels)
/// changed, as the EndpointSlice strategy's `PrepareForUpdate` does. Services and Nodes have
/// no generation.
pub(super) fn system_fields(kind: Kind, obj: &mut Value, old: Option<&Value>, rv: u64) {
    let generation = (kind == Kind::EndpointSlice).then(|| match old {
        None => 1,
        Some(old) => {
            let gen_of = |v: &Value| v.pointer("/metadata/generation").and_then(Value::as_i64);
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(o) = v.as_object_mut() {
                    o.remove("metadata");
                }
                v
            };
            let labels = |v: &Value| v.pointer("/metadata/labels").cloned();
            let changed = strip(obj) != strip(old) || labels(obj) != labels(old);
            gen_of(old).unwrap_or(1) + i64::from(changed)
        }
    });
    let meta = obj
        .as_object_mut()
        .expect("an object")
        .entry("metadata")
        .or_insert(json!({}));
    meta["resourceVersion"] = json!(rv.to_string());
    if !kind.namespaced() {
        if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
    } else if meta.get("namespace").is_none_or(|n| n.as_str() == Some("")) {
        meta["namespace"] = json!("default");
    }
    let field = |name: &str, fresh: Value| {
        old.and_then(|o| o.pointer(&format!("/metadata/{name}")).cloned())
            .unwrap_or(fresh)
    };
    meta["uid"] = field("uid", json!(new_uid()));
    meta["creationTimestamp"] = field("creationTimestamp", json!(now()));
    if let Some(g) = generation {
        meta["generation"] = json!(g);
    }
}

/// A random (version 4) UUID, as the API server gives every new object.
fn new_uid() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// Now, in the API server's format (RFC 3339, whole seconds, UTC).
fn now() -> String {
    let t = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(t.as_second())
        .expect("now is a valid time")
        .to_string()
}

/// The `managedFields` the API server's field manager records for a write: one entry naming
/// the fields set (as `kubectl` or a controller writes them), of about the real size.
pub(super) fn managed_fields(kind: Kind, obj: &Value, manager: &str) -> Value {
    fn fields(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (format!("f:{k}"), fields(v)))
                    .collect(),
            ),
            _ => json!({}),
        }
    }
    let mut set = serde_json::Map::new();
    for (k, v) in obj.as_object().into_iter().flatten() {
        match k.as_str() {
            "kind" | "apiVersion" | "status" => {}
            "metadata" => {
                let labels = v.get("labels").map(fields).unwrap_or(json!({}));
                set.insert("f:metadata".into(), json!({"f:labels": labels}));
            }
            _ => {
                set.insert(format!("f:{k}"), fields(v));
            }
        }
    }
    json!([{"manager": manager, "operation": "Update", "apiVersion": kind.api_version(),
            "time": now(), "fieldsType": "FieldsV1", "fieldsV1": set}])
}
