//! The OpenAPI v3 documents kubectl reads before a write. With `--validate=strict` (its
//! default) kubectl asks `/openapi/v3` for each group-version's document and looks in it
//! for the `fieldValidation` query parameter of the kind's PATCH operation (`resource`'s
//! `queryParamVerifierV3`): found, it leaves validation to the server and sends
//! `fieldValidation=Strict`; without any OpenAPI, it refuses to write ("failed to download
//! openapi"). So the documents list, per object path, its operations with that parameter and
//! their `x-kubernetes-group-version-kind`, as the API server's do; schemas are not served
//! (kubectl validates nothing itself once the server does).

use serde_json::{Value, json};

use super::Kind;

/// The document at `path` (`/openapi/v3`, or one group-version's), if it is one.
pub(super) fn document(path: &str) -> Option<Value> {
    let gvs = [
        ("api/v1", &[Kind::Service, Kind::Node][..]),
        ("apis/discovery.k8s.io/v1", &[Kind::EndpointSlice][..]),
    ];
    match path.trim_end_matches('/') {
        "/openapi/v3" => {
            let paths: serde_json::Map<String, Value> = gvs
                .iter()
                .map(|(gv, _)| {
                    // The hash only lets clients cache; the documents never change.
                    let url = format!("/openapi/v3/{gv}?hash=pxt1");
                    (gv.to_string(), json!({"serverRelativeURL": url}))
                })
                .collect();
            Some(json!({"paths": paths}))
        }
        p => {
            let (_, kinds) = gvs
                .iter()
                .find(|(gv, _)| p == format!("/openapi/v3/{gv}"))?;
            let paths: serde_json::Map<String, Value> = kinds
                .iter()
                .map(|k| (object_path(*k), operations(*k)))
                .collect();
            Some(json!({"openapi": "3.0.0",
                        "info": {"title": "Kubernetes", "version": "v1.33.0"},
                        "paths": paths, "components": {"schemas": {}}}))
        }
    }
}

fn object_path(kind: Kind) -> String {
    let prefix = match kind.group() {
        "" => "/api/v1".to_string(),
        g => format!("/apis/{g}/v1"),
    };
    if kind.namespaced() {
        format!(
            "{prefix}/namespaces/{{namespace}}/{}/{{name}}",
            kind.plural()
        )
    } else {
        format!("{prefix}/{}/{{name}}", kind.plural())
    }
}

/// get, put, patch and delete on one object, each naming its kind; the writes take
/// `fieldValidation`, `fieldManager` and `dryRun` as the API server's do.
fn operations(kind: Kind) -> Value {
    let gvk = json!({"group": kind.group(), "version": "v1", "kind": kind.name()});
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let op = |action: &str, writes: bool| {
        let mut params =
            vec![json!({"name": "pretty", "in": "query", "schema": {"type": "string"}})];
        if writes {
            params.extend(["dryRun", "fieldManager", "fieldValidation"].map(query));
        }
        json!({"operationId": format!("{action}{}", kind.name()), "parameters": params,
               "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk})
    };
    json!({"get": op("get", false), "put": op("put", true), "patch": op("patch", true),
           "delete": op("delete", false),
           "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]})
}
