//! The command-line contract, unprivileged parts.
use std::process::Command;

fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_kubeconfig_is_named_before_anything_is_loaded() {
    let (ok, err) = agent(&["run", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert!(!ok);
    assert!(
        err.contains("reading kubeconfig /nonexistent/kubeconfig"),
        "{err}"
    );
}

#[test]
fn a_missing_manifests_dir_is_named() {
    let (ok, err) = agent(&["run", "--manifests", "/nonexistent/manifests"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/manifests"), "{err}");
}

#[test]
fn manifests_and_kubeconfig_are_exclusive() {
    let (ok, err) = agent(&["run", "--manifests", "/tmp", "--kubeconfig", "/k"]);
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn services_without_a_datapath_names_the_missing_pin() {
    let (ok, err) = agent(&["services", "--bpffs-dir", "/nonexistent/bpffs/proxy"]);
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/bpffs/proxy/PROXY_SVC_V1"),
        "{err}"
    );
}

#[test]
fn cleanup_of_nothing_succeeds() {
    let (ok, err) = agent(&["cleanup", "--bpffs-dir", "/nonexistent/bpffs/proxy"]);
    assert!(ok, "{err}");
}

#[test]
fn a_bad_tc_interface_glob_is_named_before_anything_is_loaded() {
    let (ok, err) = agent(&[
        "run",
        "--manifests",
        "/tmp",
        "--tc-interface",
        "veth[",
        "--bpffs-dir",
        "/nonexistent/pins",
    ]);
    assert!(!ok);
    assert!(err.contains("--tc-interface \"veth[\""), "{err}");
    assert!(
        !std::path::Path::new("/nonexistent").exists(),
        "a refused run left a directory behind"
    );
}

#[test]
fn conntrack_lifetimes_are_durations_of_at_least_a_second() {
    for (flag, value) in [
        ("--conntrack-udp-timeout", "0s"),
        ("--conntrack-tcp-timeout-established", "100y"),
        ("--conntrack-tcp-timeout-syn", "soon"),
    ] {
        let (ok, err) = agent(&["run", "--manifests", "/nonexistent", flag, value]);
        assert!(!ok);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
    // kube-proxy's spelling parses (the run then fails on the missing directory).
    let (ok, err) = agent(&[
        "run",
        "--manifests",
        "/nonexistent",
        "--conntrack-tcp-timeout-established",
        "24h0m0s",
    ]);
    assert!(!ok && err.contains("/nonexistent"), "{err}");
}

/// Every subcommand's `--help` ends with examples.
#[test]
fn every_subcommand_has_examples_in_its_help() {
    for sub in ["run", "services", "status", "cleanup"] {
        let out = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub}");
        let help = String::from_utf8_lossy(&out.stdout);
        let examples = help.split_once("Examples:").map(|(_, e)| e).unwrap_or("");
        assert!(
            examples.contains(&format!("proxy-agent {sub}")),
            "{sub}: {help}"
        );
    }
}

/// An error is one line naming what failed, with its causes, and a non-zero exit.
#[test]
fn an_error_is_one_line() {
    let (ok, err) = agent(&["run", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
    assert!(
        err.contains("No such file"),
        "the cause is on the line: {err}"
    );
}

/// With `--log-format json` the error line is a JSON object, as every log line is.
#[test]
fn a_json_error_is_one_json_line() {
    let (ok, err) = agent(&[
        "run",
        "--log-format",
        "json",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(err.trim_end()).expect("JSON");
    assert_eq!(v["level"], "ERROR", "{err}");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("/nonexistent/kubeconfig"), "{err}");
}
