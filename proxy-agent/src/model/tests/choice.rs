//! Session affinity and the per-Service algorithm: defaults, validation (kube-proxy's and the
//! API server's: `timeoutSeconds` in 1..=86400), and an invalid value holding the Service.
use super::*;

/// A frontend's affinity timeout and algorithm, or the problems (field, reason) that hold it.
type Choice = Result<(u32, Option<Algorithm>), Vec<(String, ProblemReason)>>;

/// The model of `service` with one endpoint.
fn model_of(service: Value) -> Desired {
    let objects = Objects {
        services: vec![sourced(service)],
        slices: vec![sourced(slice(
            "s-1",
            "s",
            http_slice_port(),
            json!([ep("10.0.1.1")]),
        ))],
        nodes: vec![],
    };
    build(&objects, "node-a")
}

/// The affinity timeout and algorithm the model gives `svc`'s frontend, or its problems.
fn choice_of(service: Value) -> Choice {
    let d = model_of(service);
    if !d.problems.is_empty() {
        assert!(d.frontends.is_empty(), "an invalid Service writes nothing");
        assert_eq!(d.held_services.len(), 1, "and keeps what is programmed");
        return Err(d
            .problems
            .iter()
            .map(|p| (p.field.clone(), p.reason))
            .collect());
    }
    let (_, spec) = d.frontends.iter().next().expect("one frontend");
    Ok((spec.affinity_timeout_s, spec.algorithm))
}

fn affinity(kind: Value, timeout: Option<Value>) -> Value {
    let mut v = with(
        svc("s", "10.96.0.10", http()),
        &["spec", "sessionAffinity"],
        kind,
    );
    if let Some(t) = timeout {
        v = with(
            v,
            &[
                "spec",
                "sessionAffinityConfig",
                "clientIP",
                "timeoutSeconds",
            ],
            t,
        );
    }
    v
}

#[test]
fn session_affinity_timeouts() {
    const T: &str = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
    let bad =
        |field: &str| -> Choice { Err(vec![(field.to_string(), ProblemReason::InvalidValue)]) };
    let cases: Vec<(&str, Value, Choice)> = vec![
        ("no affinity", svc("s", "10.96.0.10", http()), Ok((0, None))),
        ("None", affinity(json!("None"), None), Ok((0, None))),
        (
            "None ignores a timeout",
            affinity(json!("None"), Some(json!(5))),
            Ok((0, None)),
        ),
        (
            "ClientIP defaults to 3 hours",
            affinity(json!("ClientIP"), None),
            Ok((DEFAULT_AFFINITY_TIMEOUT_S, None)),
        ),
        (
            "ClientIP with a timeout",
            affinity(json!("ClientIP"), Some(json!(2))),
            Ok((2, None)),
        ),
        (
            "lowest",
            affinity(json!("ClientIP"), Some(json!(1))),
            Ok((1, None)),
        ),
        (
            "highest",
            affinity(json!("ClientIP"), Some(json!(86400))),
            Ok((86400, None)),
        ),
        ("zero", affinity(json!("ClientIP"), Some(json!(0))), bad(T)),
        (
            "negative",
            affinity(json!("ClientIP"), Some(json!(-5))),
            bad(T),
        ),
        (
            "over a day",
            affinity(json!("ClientIP"), Some(json!(86401))),
            bad(T),
        ),
        (
            "unknown kind",
            affinity(json!("Cookie"), None),
            bad("spec.sessionAffinity"),
        ),
    ];
    for (name, service, want) in cases {
        assert_eq!(choice_of(service), want, "case {name:?}");
    }
}

#[test]
fn the_algorithm_annotation() {
    let annotated = |v: &str| {
        with(
            svc("s", "10.96.0.10", http()),
            &["metadata", "annotations"],
            json!({ ANNOTATION_LB_ALGORITHM: v }),
        )
    };
    assert_eq!(
        choice_of(annotated("maglev")),
        Ok((0, Some(Algorithm::Maglev)))
    );
    assert_eq!(
        choice_of(annotated("random")),
        Ok((0, Some(Algorithm::Random)))
    );
    // An unknown value is reported, and the Service is proxied with the node's algorithm.
    let d = model_of(annotated("Maglev"));
    let field = format!("metadata.annotations[{ANNOTATION_LB_ALGORITHM:?}]");
    let problems: Vec<_> = d
        .problems
        .iter()
        .map(|p| (p.field.clone(), p.reason))
        .collect();
    assert_eq!(problems, vec![(field, ProblemReason::IgnoredAnnotation)]);
    assert!(d.held_services.is_empty());
    let spec = d.frontends.values().next().expect("still proxied");
    assert_eq!(spec.algorithm, None);
}

/// A Service turning invalid keeps its programmed frontends: its state is held, not dropped.
#[test]
fn an_invalid_timeout_holds_the_service() {
    run(vec![Case {
        name: "timeoutSeconds 0",
        services: vec![affinity(json!("ClientIP"), Some(json!(0)))],
        slices: vec![slice(
            "s-1",
            "s",
            http_slice_port(),
            json!([ep("10.0.1.1")]),
        )],
        problems: &[(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ProblemReason::InvalidValue,
        )],
        held: &["10.96.0.10"],
        held_services: &["default/s"],
        ..Default::default()
    }]);
}
