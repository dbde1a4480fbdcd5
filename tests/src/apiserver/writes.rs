//! Create (POST to a collection), replace (PUT to an object) and delete (DELETE on an
//! object), answered as the API server answers them for Services, EndpointSlices and Nodes
//! (apiserver's `endpoints/handlers/{create,update,delete}.go`, the generic registry store
//! and the kinds' strategies):
//! - create: 201 and the stored object; `409 AlreadyExists` if it exists; `400 BadRequest`
//!   for a namespace in the body other than the URL's; `422 Invalid` without a name (no
//!   `generateName` here); `500` for a body carrying a resourceVersion, as etcd3's store says;
//! - replace: 200 and the stored object; `404 NotFound` if missing (these kinds do not
//!   create on update); `409 Conflict` when the body's resourceVersion is set and not the
//!   stored one (unset: an unconditional update, which these kinds allow); `400` for a name
//!   or namespace other than the URL's;
//! - delete: `404` if missing; `409 Conflict` for `DeleteOptions.preconditions` (uid,
//!   resourceVersion) that do not match; 200 and the deleted object for a Service
//!   (`ReturnDeletedObject`), 200 and a `Status` of success naming it for the others.
//!
//! `fieldValidation` as the API server applies it: `Strict` refuses unknown fields (400),
//! `Warn` (the default) names them in `Warning` headers, `Ignore` drops them silently. Bodies
//! must decode as the typed object (k8s-openapi's types, which ignore unknown fields: a field
//! lost on the way through them is unknown). Not here: PATCH (405), `dryRun`,
//! `generateName`, finalizers and graceful deletion (these kinds have none by default).

use std::sync::Arc;

use axum::{
    http::{Method, StatusCode, header::HeaderValue},
    response::{IntoResponse, Response},
};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

use super::{
    Key, Kind, Query, Shared, Stored, details, json_response, not_found, object_path,
    object_status, resource, status,
};

/// The API server's default limit on a request body (3 MiB).
pub(super) const MAX_BODY: usize = 3 * 1024 * 1024;

/// A write answered, or refused with a `Status`.
type Answer = Result<Response, Refusal>;

/// A failure `Status` and its HTTP code.
struct Refusal {
    code: StatusCode,
    status: Value,
}

impl Refusal {
    fn new(code: StatusCode, status: Value) -> Refusal {
        Refusal { code, status }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        json_response(self.code, &self.status)
    }
}

/// The verb a write is counted under ("create endpointslices", "update services", ...).
pub(super) fn verb(method: &Method, path: &str) -> String {
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => return method.as_str().to_lowercase(),
    };
    let kind = object_path(path)
        .map(|k| k.0)
        .or_else(|| resource(path).map(|r| r.0));
    format!("{verb} {}", kind.map_or("unknown", Kind::plural))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Validation {
    Strict,
    Warn,
    Ignore,
}

struct Options {
    validation: Validation,
    manager: String,
}

impl Options {
    /// `fieldValidation` and `fieldManager`; without a manager, the user agent's program
    /// name, as the API server derives it (`kubectl/v1.32.4 (linux/amd64) ...` -> `kubectl`).
    fn of(q: &Query, user_agent: &str) -> Options {
        let validation = match q.field_validation.as_str() {
            "Strict" => Validation::Strict,
            "Ignore" => Validation::Ignore,
            _ => Validation::Warn,
        };
        let manager = Some(q.field_manager.as_str())
            .filter(|m| !m.is_empty())
            .or_else(|| user_agent.split('/').next().filter(|m| !m.is_empty()))
            .unwrap_or("unknown")
            .to_string();
        Options {
            validation,
            manager,
        }
    }
}

/// A write request: the verb from the method, the target from the path.
pub(super) fn handle(
    s: &Shared,
    method: &Method,
    path: &str,
    query: &Query,
    user_agent: &str,
    body: &[u8],
) -> Response {
    let opts = Options::of(query, user_agent);
    let answer = match (method, object_path(path), resource(path)) {
        (&Method::POST, None, Some((kind, ns))) if ns.is_some() != (kind == Kind::Node) => {
            create(s, kind, &ns.unwrap_or_default(), &opts, body)
        }
        (&Method::PUT, Some(key), _) => replace(s, key, &opts, body),
        (&Method::DELETE, Some(key), _) => delete(s, &key, body),
        _ => Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        )),
    };
    answer.unwrap_or_else(IntoResponse::into_response)
}

fn create(s: &Shared, kind: Kind, ns: &str, opts: &Options, body: &[u8]) -> Answer {
    let (mut obj, warnings) = decode(kind, body, opts.validation)?;
    namespace_from_url(kind, &mut obj, ns)?;
    let name = meta_str(&obj, "name").to_string();
    if name.is_empty() {
        let mut v = status(
            422,
            "Invalid",
            &format!(
                "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                qualified_kind(kind)
            ),
        );
        v["details"] = details("", kind.group(), kind.name());
        v["details"]["causes"] = json!([{"reason": "FieldValueRequired",
            "message": "Required value: name or generateName is required", "field": "metadata.name"}]);
        return Err(Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, v));
    }
    if !meta_str(&obj, "resourceVersion").is_empty() {
        // etcd3's store refuses it with a plain error, which the API server sends as a 500.
        return Err(Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            status(
                500,
                "",
                "resourceVersion should not be set on objects to be created",
            ),
        ));
    }
    let stored = s.write_if(kind, obj, &opts.manager, |old| match old {
        Some(_) => Err(Refusal::new(
            StatusCode::CONFLICT,
            object_status(
                409,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", kind.qualified()),
                kind,
                &name,
            ),
        )),
        None => Ok(()),
    })?;
    Ok(object_response(StatusCode::CREATED, &stored, &warnings))
}

fn replace(s: &Shared, (kind, ns, name): Key, opts: &Options, body: &[u8]) -> Answer {
    let (mut obj, warnings) = decode(kind, body, opts.validation)?;
    let body_name = meta_str(&obj, "name");
    if body_name != name {
        return Err(bad_request(&format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    namespace_from_url(kind, &mut obj, &ns)?;
    let wanted_rv = meta_str(&obj, "resourceVersion").to_string();
    let stored = s.write_if(kind, obj, &opts.manager, |old| match old {
        None => Err(Refusal::new(StatusCode::NOT_FOUND, not_found(kind, &name))),
        Some(old) if !wanted_rv.is_empty() && meta_str(old, "resourceVersion") != wanted_rv => {
            Err(Refusal::new(
                StatusCode::CONFLICT,
                object_status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        kind.qualified()
                    ),
                    kind,
                    &name,
                ),
            ))
        }
        Some(_) => Ok(()),
    })?;
    Ok(object_response(StatusCode::OK, &stored, &warnings))
}

fn delete(s: &Shared, key: &Key, body: &[u8]) -> Answer {
    let (kind, _, name) = key;
    let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| bad_request(&e.to_string()))?
    };
    let precondition = |field: &str| {
        options
            .pointer(&format!("/preconditions/{field}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (want_uid, want_rv) = (precondition("uid"), precondition("resourceVersion"));
    let removed = s.remove_if(key, |old| {
        // rest.BeforeDelete's checks, which name the kind (not the resource) in the message.
        let failed = |what: &str, want: &str, have: &str, why: &str| {
            let mut v = status(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the {what} in the precondition ({want}) does not match the {what} in record ({have}). {why}",
                    qualified_kind(*kind)
                ),
            );
            v["details"] = details(name, kind.group(), kind.name());
            Err(Refusal::new(StatusCode::CONFLICT, v))
        };
        let (uid, rv) = (meta_str(old, "uid"), meta_str(old, "resourceVersion"));
        match (&want_uid, &want_rv) {
            (Some(want), _) if want != uid => failed(
                "UID",
                want,
                uid,
                "The object might have been deleted and then recreated",
            ),
            (_, Some(want)) if want != rv => {
                failed("ResourceVersion", want, rv, "The object might have been modified")
            }
            _ => Ok(()),
        }
    })?;
    let Some(removed) = removed else {
        return Err(Refusal::new(StatusCode::NOT_FOUND, not_found(*kind, name)));
    };
    if *kind == Kind::Service {
        return Ok(object_response(StatusCode::OK, &removed, &[]));
    }
    let mut details = details(name, kind.group(), kind.plural());
    details["uid"] = json!(meta_str(&removed.value, "uid"));
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": details}),
    ))
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// "EndpointSlice.discovery.k8s.io", "Service": how `NewInvalid` and `BeforeDelete` name it.
fn qualified_kind(kind: Kind) -> String {
    match kind.group() {
        "" => kind.name().to_string(),
        g => format!("{}.{g}", kind.name()),
    }
}

fn bad_request(message: &str) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, status(400, "BadRequest", message))
}

/// The namespace of a namespaced object is the URL's: set when the body has none, refused
/// when it names another (`EnsureObjectNamespaceMatchesRequestNamespace`).
fn namespace_from_url(kind: Kind, obj: &mut Value, ns: &str) -> Result<(), Refusal> {
    if !kind.namespaced() {
        return Ok(());
    }
    match meta_str(obj, "namespace") {
        "" => {
            obj["metadata"]["namespace"] = json!(ns);
            Ok(())
        }
        n if n == ns => Ok(()),
        _ => Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
    }
}

fn object_response(code: StatusCode, stored: &Arc<Stored>, warnings: &[String]) -> Response {
    let mut r = (
        code,
        [("content-type", "application/json")],
        stored.json.clone(),
    )
        .into_response();
    for w in warnings {
        let text = format!("299 - {}", serde_json::to_string(w).expect("a string"));
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append("warning", v);
        }
    }
    r
}

/// The body as an object of `kind`: JSON; apiVersion and kind those of the URL (filled in
/// when absent, as the API server takes them from the URL); decodable as the typed object;
/// unknown fields handled as `validation` says (the warnings to send back).
fn decode(
    kind: Kind,
    body: &[u8],
    validation: Validation,
) -> Result<(Value, Vec<String>), Refusal> {
    let mut obj: Value = serde_json::from_slice(body).map_err(|e| {
        bad_request(&format!(
            "{} in version \"v1\" cannot be handled as a {}: {e}",
            kind.name(),
            kind.name()
        ))
    })?;
    let Some(fields) = obj.as_object_mut() else {
        return Err(bad_request("the body of the request was not a JSON object"));
    };
    let api_version = fields
        .entry("apiVersion")
        .or_insert(json!(kind.api_version()))
        .as_str()
        .unwrap_or_default()
        .to_string();
    if api_version != kind.api_version() {
        return Err(bad_request(&format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            kind.api_version()
        )));
    }
    let body_kind = fields.entry("kind").or_insert(json!(kind.name()));
    if body_kind.as_str() != Some(kind.name()) {
        return Err(bad_request(&format!(
            "the object provided is unrecognized (must be of type {}): {body_kind}",
            kind.name()
        )));
    }
    let kept = typed_round_trip(kind, &obj).map_err(|e| {
        bad_request(&format!(
            "{} in version \"v1\" cannot be handled as a {}: {e}",
            kind.name(),
            kind.name()
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(&obj, &kept, "", &mut unknown);
    let unknown: Vec<String> = unknown
        .iter()
        .map(|f| {
            format!(
                "unknown field {}",
                serde_json::to_string(f).expect("a string")
            )
        })
        .collect();
    match validation {
        Validation::Strict if !unknown.is_empty() => Err(bad_request(&format!(
            "strict decoding error: {}",
            unknown.join(", ")
        ))),
        Validation::Warn => Ok((kept, unknown)),
        _ => Ok((kept, Vec::new())),
    }
}

/// The object through its k8s-openapi type and back: what the API server would keep.
fn typed_round_trip(kind: Kind, obj: &Value) -> Result<Value, serde_json::Error> {
    fn through<T: serde::de::DeserializeOwned + serde::Serialize>(
        v: &Value,
    ) -> Result<Value, serde_json::Error> {
        serde_json::to_value(serde_json::from_value::<T>(v.clone())?)
    }
    match kind {
        Kind::Service => through::<Service>(obj),
        Kind::EndpointSlice => through::<EndpointSlice>(obj),
        Kind::Node => through::<Node>(obj),
    }
}

/// Paths of `sent` that `kept` lost ("spec.ports[0].nmae"), as the strict decoder names them.
/// A null is no field (the decoder takes it as unset).
fn unknown_fields(sent: &Value, kept: &Value, at: &str, out: &mut Vec<String>) {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            for (name, v) in sent {
                let path = if at.is_empty() {
                    name.clone()
                } else {
                    format!("{at}.{name}")
                };
                match kept.get(name) {
                    Some(k) => unknown_fields(v, k, &path, out),
                    None if v.is_null() => {}
                    None => out.push(path),
                }
            }
        }
        (Value::Array(sent), Value::Array(kept)) => {
            for (i, (s, k)) in sent.iter().zip(kept).enumerate() {
                unknown_fields(s, k, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
