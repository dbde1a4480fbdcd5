//! Privileged end to end: what must hold when the node's datapath is under strain (a full
//! map) or misused (two agents on one bpffs directory). Run by `cargo xtask test` (as root).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{AGENT_CAPABILITIES, Agent, Manifests, agent_bin, free_port, frontends, http_get},
    client::{self, Report},
    cluster::{Cluster, TCP_PORT},
    host::{BpffsDir, require_root, scaled, wait_for},
    unique,
};

const VIP: &str = "10.96.0.10";

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{name: http, port: 80, targetPort: {TCP_PORT}, protocol: TCP}}\n"
    )
}

/// EndpointSlices of `service` for `ips`, 1,000 endpoints each (the API server's limit), as
/// one multi-document file.
fn slices(service: &str, ips: &[String]) -> String {
    let mut out = String::new();
    for (n, chunk) in ips.chunks(1000).enumerate() {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{n}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports:\n- {{name: http, port: {TCP_PORT}, protocol: TCP}}\nendpoints:\n"
        ));
        for ip in chunk {
            out.push_str(&format!(
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"
            ));
        }
    }
    out
}

fn client(cluster: &Cluster, addr: &str, count: u32) -> Report {
    client::run(
        cluster,
        Path::new(env!("CARGO_BIN_EXE_pxt-client")),
        "tcp",
        addr,
        count,
    )
}

fn serves(cluster: &Cluster, n: u32) {
    let r = client(cluster, &format!("{VIP}:80"), n);
    assert!(
        r.errors.is_empty() && r.replies.values().sum::<u32>() == n,
        "{r:?}"
    );
}

/// A 3-pod cluster, manifests with the `web` Service over its pods, and a bpffs directory.
fn web() -> (Cluster, Manifests, Vec<String>, BpffsDir) {
    require_root();
    let cluster = Cluster::new(3, &[]).expect("mini cluster");
    let manifests = Manifests::new().unwrap();
    let pods: Vec<String> = cluster.pods.iter().map(|p| p.ip.to_string()).collect();
    manifests
        .write("web-svc.yaml", &service("web", VIP))
        .unwrap();
    manifests
        .write("web-slices.yaml", &slices("web", &pods))
        .unwrap();
    (cluster, manifests, pods, BpffsDir::new(&unique("bpf")))
}

/// How many backends the maps hold for `vip`:80 (None: no frontend).
fn backends_of(pins: &BpffsDir, vip: &str) -> Option<usize> {
    (frontends(pins).into_iter())
        .find(|f| f.vip.to_string() == vip && f.port == 80)
        .map(|f| f.backends.len())
}

/// A Service too big for what is left of the backend map is refused as a whole, once: the
/// agent stays healthy (restarting cannot make room), logs it once however many syncs go by,
/// programs unrelated changes at once, and programs the refused Service as soon as a delete
/// makes room.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_full_map_refuses_one_service_and_the_agent_stays_healthy() {
    let (cluster, manifests, pods, pins) = web();
    // A backend map of 64 (`--max-backends`): three Services of 24 backends beside web's 3,
    // two fit, the third does not.
    const CAPACITY: usize = 64;
    let each = CAPACITY * 3 / 8;
    let big = |k: usize| -> Vec<String> {
        (0..each)
            .map(|i| format!("10.{}.{}.{}", 100 + k, i / 250, i % 250 + 1))
            .collect()
    };
    for k in 1..=3 {
        let name = format!("big{k}");
        (manifests.write(
            &format!("{name}-svc.yaml"),
            &service(&name, &format!("10.96.1.{k}")),
        ))
        .unwrap();
        (manifests.write(&format!("{name}-slices.yaml"), &slices(&name, &big(k)))).unwrap();
    }
    let mut agent = Agent::spawn_in(
        None,
        &[
            "--manifests".as_ref(),
            manifests.dir.as_os_str(),
            "--sync-period-seconds".as_ref(),
            "2".as_ref(),
            "--healthz-max-age-seconds".as_ref(),
            "10".as_ref(),
            "--max-backends".as_ref(),
            CAPACITY.to_string().as_ref(),
        ],
        &cluster.cgroup_path(),
        &pins,
    )
    .expect("agent starts");
    agent.wait_ready_within(Duration::from_secs(60)).unwrap();
    let refused_lines = || agent.log_text().matches("frontend refused").count();
    wait_for(Duration::from_secs(60), || {
        (refused_lines() > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("nothing refused:\n{}", agent.log_text()));
    assert_eq!(backends_of(&pins, "10.96.1.1"), Some(each));
    assert_eq!(backends_of(&pins, "10.96.1.2"), Some(each));
    assert_eq!(backends_of(&pins, "10.96.1.3"), None);
    serves(&cluster, 20);

    // Several resyncs and more than the health window later: healthy, one line.
    std::thread::sleep(Duration::from_secs(12));
    let (code, body) = http_get(&agent.health_addr, "/healthz");
    assert_eq!(code, 200, "{body}\n{}", agent.log_text());
    assert_eq!(http_get(&agent.health_addr, "/livez").0, 200);
    assert_eq!(refused_lines(), 1, "{}", agent.log_text());
    let metrics = http_get(&agent.metrics_addr, "/metrics").1;
    assert!(metrics.contains("proxy_frontends_refused 1"), "{metrics}");
    // The fill ratio is of the map's own capacity.
    let fill = format!(
        "proxy_map_fill_ratio{{map=\"PROXY_BE_V1\"}} {}",
        (2 * each + 3) as f64 / CAPACITY as f64
    );
    assert!(metrics.contains(&fill), "{fill}\n{metrics}");

    // An unrelated change is programmed at once.
    manifests
        .write("late-svc.yaml", &service("late", "10.96.2.1"))
        .unwrap();
    manifests
        .write("late-slices.yaml", &slices("late", &pods[..1]))
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        (backends_of(&pins, "10.96.2.1") == Some(1)).then_some(())
    })
    .unwrap_or_else(|| panic!("an unrelated change waited:\n{}", agent.log_text()));

    // Room made: the refused Service is programmed without waiting for its backoff.
    manifests.remove("big1-slices.yaml").unwrap();
    manifests.remove("big1-svc.yaml").unwrap();
    wait_for(Duration::from_secs(30), || {
        (backends_of(&pins, "10.96.1.3") == Some(each)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "never programmed once there was room:\n{}",
            agent.log_text()
        )
    });
    assert!(agent.log_text().contains("there is room for it now"));
    let metrics = http_get(&agent.metrics_addr, "/metrics").1;
    assert!(metrics.contains("proxy_frontends_refused 0"), "{metrics}");
    serves(&cluster, 20);
}

/// `proxy-agent run` with `extra` flags on these pins, expected to exit non-zero within
/// 120 s ([`scaled`]): its stderr.
fn refused_run(
    cluster: &Cluster,
    manifests: &Manifests,
    pins: &BpffsDir,
    extra: &[&str],
) -> String {
    let mut agent = Command::new(agent_bin())
        .args(["run", "--node-name", "node-a", "--manifests"])
        .arg(&manifests.dir)
        .arg("--cgroup")
        .arg(cluster.cgroup_path())
        .arg("--bpffs-dir")
        .arg(&pins.path)
        .args(["--health-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + scaled(Duration::from_secs(120));
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::io::read_to_string(agent.stderr.take().unwrap()).unwrap();
    let status = status.unwrap_or_else(|| panic!("the agent ran:\n{stderr}"));
    assert!(!status.success(), "{stderr}");
    stderr
}

/// The `--max-*` flags size the maps when they are created; an agent started again with
/// other sizes than the pinned maps have is refused before it touches anything, naming the
/// flag and both sizes, and the datapath keeps serving; with the pinned sizes it adopts them
/// without a write.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn map_sizes_are_flags_and_pinned_sizes_are_kept() {
    use proxy_common::{
        AFFINITY_MAP, AFFINITY_MATCH_MAP, BACKEND_MAP, CT_MAP, REV_NAT_MAP, SOCK_SLOT_MAP,
        SOCK_SLOT_MAP_ENTRIES, SVC_MAP,
    };
    let (cluster, manifests, _, pins) = web();
    let flags = [
        "--max-services",
        "4096",
        "--max-backends",
        "1024",
        "--max-frontends",
        "512",
        "--max-conntrack",
        "8192",
        "--max-affinity",
        "2048",
    ];
    let args = |flags: &[&str]| -> Vec<std::ffi::OsString> {
        let mut a = vec!["--manifests".into(), manifests.dir.clone().into_os_string()];
        a.extend(flags.iter().map(Into::into));
        a
    };
    let start = |flags: &[&str]| {
        let a = args(flags);
        let a: Vec<&std::ffi::OsStr> = a.iter().map(std::ffi::OsString::as_os_str).collect();
        Agent::start_with(&a, &cluster.cgroup_path(), &pins).expect("agent starts")
    };
    let mut agent = start(&flags);
    let size = |map: &str| {
        let md = aya::maps::MapData::from_pin(pins.path.join(map)).unwrap();
        md.info().unwrap().max_entries()
    };
    for (map, n) in [
        (SVC_MAP, 4096),
        (AFFINITY_MATCH_MAP, 4096),
        (BACKEND_MAP, 1024),
        (REV_NAT_MAP, 512),
        (CT_MAP, 8192),
        (AFFINITY_MAP, 2048),
        // Not sized by a flag: as built.
        (SOCK_SLOT_MAP, SOCK_SLOT_MAP_ENTRIES),
    ] {
        assert_eq!(size(map), n, "{map}");
    }
    serves(&cluster, 20);
    agent.stop();
    let before = frontends(&pins);

    let stderr = refused_run(&cluster, &manifests, &pins, &{
        let mut f = flags;
        f[3] = "2048";
        f
    });
    assert!(
        stderr.contains("holds 1024 entries, and --max-backends asks for 2048"),
        "{stderr}"
    );
    assert_eq!(size(BACKEND_MAP), 1024);
    assert_eq!(frontends(&pins), before);
    serves(&cluster, 20);
    // The default sizes differ from every one of these pins: each is named, at once.
    let stderr = refused_run(&cluster, &manifests, &pins, &[]);
    for flag in [
        "--max-services",
        "--max-backends",
        "--max-frontends",
        "--max-conntrack",
        "--max-affinity",
    ] {
        assert!(
            stderr.contains(&format!("{flag} asks for")),
            "{flag}: {stderr}"
        );
    }
    // Out of range: refused by the flag's own check.
    let stderr = refused_run(&cluster, &manifests, &pins, &["--max-frontends", "70000"]);
    assert!(stderr.contains("--max-frontends"), "{stderr}");

    let agent = start(&flags);
    let metrics = http_get(&agent.metrics_addr, "/metrics").1;
    assert!(
        metrics.contains("proxy_map_writes_total{op=\"update\"} 0"),
        "the pinned maps adopted as they are: {metrics}"
    );
    serves(&cluster, 20);
}

/// Pins of other versions of the agent's maps: a newer one (a newer agent ran here) is a
/// downgrade, refused before anything is pinned or attached, with the running datapath left
/// serving; an older one (an upgrade) is removed once the new programs are attached; and
/// `cleanup` removes every version.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_newer_layouts_pins_are_refused_and_an_older_ones_removed() {
    use proxy_common::{MAPS, VIP_MAP};
    let (cluster, manifests, _, pins) = web();
    let mut agent =
        Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
    serves(&cluster, 20);
    agent.stop();
    let vip = MAPS.iter().find(|m| m.name == VIP_MAP).unwrap();
    let pin_like = |name: &str| {
        let obj = aya_obj::Map::new_from_params(
            vip.kind.bpf_map_type(),
            vip.key_size,
            vip.value_size,
            16,
            0,
        );
        let map = aya::maps::MapData::create(obj, "PROXY_TEST", None).unwrap();
        map.pin(pins.path.join(name)).unwrap();
    };
    let listing = || {
        let mut names: Vec<String> = (std::fs::read_dir(&pins.path).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let links = || std::fs::read_dir(pins.path.join("links")).unwrap().count();

    pin_like("PROXY_VIP_V2");
    let (before, pinned, linked) = (frontends(&pins), listing(), links());
    let stderr = refused_run(&cluster, &manifests, &pins, &[]);
    for part in [
        "downgrade",
        "PROXY_VIP_V2",
        "PROXY_VIP_V1",
        "proxy-agent cleanup",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
    assert_eq!(listing(), pinned, "nothing pinned or removed");
    assert_eq!((frontends(&pins), links()), (before, linked));
    serves(&cluster, 20);
    std::fs::remove_file(pins.path.join("PROXY_VIP_V2")).unwrap();

    // An older version than the agent's (a map of a layout it replaced): removed after attach.
    pin_like("PROXY_VIP_V0");
    let _agent = Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
    assert!(
        !pins.path.join("PROXY_VIP_V0").exists(),
        "the older pin stays: {:?}",
        listing()
    );
    serves(&cluster, 20);
    drop(_agent);

    // (`proxy-agent cleanup`'s part for the pins; it also looks for tc filters on the
    // namespace's interfaces, which is not this test's business.)
    pin_like("PROXY_VIP_V7");
    let done = proxy_agent::loader::cleanup(&pins.path).unwrap();
    assert!(
        done.maps.iter().any(|m| m.ends_with("PROXY_VIP_V7")),
        "{:?}",
        done.maps
    );
    assert!(!pins.path.exists(), "cleanup removes every version");
}

/// `proxy-agent services | head -1`: a reader that went away ends the command quietly (it
/// panicked on the broken pipe before).
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn services_into_a_closed_pipe_ends_quietly() {
    let (cluster, manifests, _, pins) = web();
    let _agent = Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
    for output in ["table", "json"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(agent_bin())
            .args(["services", "-o", output, "--bpffs-dir"])
            .arg(&pins.path)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{output}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{output}: {stderr}");
    }
}

/// `--log-format json`: every line the agent writes is a JSON object, with the fields the
/// text form has (a sync's counts as numbers, at the top level).
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn json_logs_are_one_object_a_line_with_the_text_forms_fields() {
    let (cluster, manifests, _, pins) = web();
    let mut agent = Agent::start_with(
        &[
            "--manifests".as_ref(),
            manifests.dir.as_os_str(),
            "--log-format".as_ref(),
            "json".as_ref(),
        ],
        &cluster.cgroup_path(),
        &pins,
    )
    .expect("agent starts");
    serves(&cluster, 5);
    agent.stop();
    let log = agent.log_text();
    let lines: Vec<serde_json::Value> = (log.lines())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let synced = (lines.iter())
        .find(|v| v["message"] == "synced")
        .unwrap_or_else(|| panic!("no sync logged: {log}"));
    assert_eq!(synced["level"], "INFO");
    assert_eq!(synced["kind"], "full");
    assert!(
        synced["updates"].as_u64().is_some_and(|n| n > 0),
        "{synced}"
    );
    assert!(lines.iter().any(|v| v["message"] == "ready"), "{log}");
}

/// A second `run` on a bpffs directory in use is refused before it touches the pins or the
/// links, naming the running agent; the first one keeps serving, unchanged.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_second_agent_on_the_same_bpffs_dir_is_refused() {
    let (cluster, manifests, _, pins) = web();
    let first = Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
    let links = || {
        std::fs::read_dir(pins.path.join("links"))
            .map(Iterator::count)
            .unwrap()
    };
    let (before, links_before) = (frontends(&pins), links());

    let stderr = refused_run(&cluster, &manifests, &pins, &[]);
    let pid = first.pid().unwrap();
    assert!(
        stderr.contains(&format!("another agent (pid {pid}) is running on")),
        "{stderr}"
    );
    assert_eq!(frontends(&pins), before);
    assert_eq!(links(), links_before);
    serves(&cluster, 20);
    assert!(!first.log_text().contains("ERROR"), "{}", first.log_text());
}

/// A file name and an object name holding newlines and terminal escapes cannot forge a log
/// line: the agent's problem report names both, escaped, on one line.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn input_cannot_forge_log_lines() {
    require_root();
    let cluster = Cluster::new(1, &[]).expect("mini cluster");
    let manifests = Manifests::new().unwrap();
    let forged = "2026-12-02T00:00:00.000000Z  INFO proxy_agent: forged";
    let name = format!("evil\n{forged}\x1b[2J.yaml");
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: \"web\\n{forged}\\e[31m\"\n  namespace: default\nspec:\n  clusterIP: 10.96.0.999\n  ports: [{{port: 80}}]\n"
    );
    manifests.write(&name, &svc).unwrap();
    let pins = BpffsDir::new(&unique("bpf"));
    let agent = Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
    let log = agent.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("forged")).collect();
    assert!(!lines.is_empty(), "the problem was not reported:\n{log}");
    for line in &lines {
        assert!(
            line.contains("WARN") && line.contains("invalid_ip"),
            "a line of its own:\n{log}"
        );
    }
    assert!(
        !log.contains('\x1b'),
        "a raw escape reached the log:\n{log:?}"
    );
    assert!(log.contains("evil\\n2026"), "{log}");
}

/// The agent needs no more than the capabilities `deploy/capabilities` grants: run with that
/// bounding set and nothing else (its effective set checked in /proc), it loads, attaches,
/// programs and serves.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn the_agent_runs_with_only_the_capabilities_it_documents() {
    let (cluster, manifests, _, pins) = web();
    let agent = Agent::start_with_capabilities(
        AGENT_CAPABILITIES,
        &["--manifests".as_ref(), manifests.dir.as_os_str()],
        &cluster.cgroup_path(),
        &pins,
    )
    .expect("the agent starts with these capabilities");
    let number = |name: &str| -> u32 {
        match name {
            "NET_ADMIN" => 12,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "SYS_RESOURCE" => 24,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("unknown capability {other}"),
        }
    };
    let caps = |pid: &str, field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        (status.lines())
            .find_map(|l| l.strip_prefix(field))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    // Of those, what this machine can grant at all (a sandbox may lack some).
    let want: u64 =
        (AGENT_CAPABILITIES.iter()).fold(0, |m, c| m | 1 << number(c)) & caps("self", "CapBnd:");
    let eff = caps(&agent.pid().unwrap().to_string(), "CapEff:");
    assert_eq!(eff, want, "CapEff {eff:x}, want {want:x}");
    wait_for(Duration::from_secs(20), || {
        (backends_of(&pins, VIP) == Some(3)).then_some(())
    })
    .unwrap_or_else(|| panic!("not programmed:\n{}", agent.log_text()));
    serves(&cluster, 20);
}

/// Writes `text` into `path` in place (truncating the same inode, as an editor or `cp` does) in
/// two parts, `pause` apart; `during` is called every 20 ms of the pause, the file open, on
/// another thread: however long a call takes (a map read under qemu's emulation), the second
/// part comes after `pause`, not after the call (a pause grown past the agent's settle time
/// would make the half-written file a complete one).
fn write_slowly(
    path: &Path,
    text: &str,
    at: usize,
    pause: Duration,
    mut during: impl FnMut() + Send,
) {
    use std::{
        io::Write as _,
        sync::atomic::{AtomicBool, Ordering},
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(&text.as_bytes()[..at]).unwrap();
    f.flush().unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                during();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        std::thread::sleep(pause);
        f.write_all(&text.as_bytes()[at..]).unwrap();
        done.store(true, Ordering::Relaxed);
    });
}

/// A file written in place with a pause between its halves is read once it is closed, never
/// half-written: its first half alone is valid YAML with one endpoint, and the Service never
/// drops to it. A `.json` file copied in slowly gives no false parse error.
#[test]
#[ignore = "privileged: run with `cargo xtask test`"]
fn a_file_written_slowly_in_place_is_never_read_half_written() {
    let (cluster, manifests, pods, pins) = web();
    let agent = Agent::start(&manifests.dir, &cluster.cgroup_path(), &pins).expect("agent starts");
    wait_for(Duration::from_secs(10), || {
        (backends_of(&pins, VIP) == Some(3)).then_some(())
    })
    .expect("programmed");

    // Two endpoints; cut after the first one's line.
    let text = slices("web", &pods[..2]);
    let at = text
        .find(&pods[1])
        .and_then(|i| text[..i].rfind("- addresses"))
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    write_slowly(
        &manifests.dir.join("web-slices.yaml"),
        &text,
        at,
        Duration::from_millis(1_200),
        || {
            seen.insert(backends_of(&pins, VIP));
        },
    );
    assert_eq!(
        seen,
        [Some(3)].into(),
        "backends while half-written:\n{}",
        agent.log_text()
    );
    wait_for(Duration::from_secs(5), || {
        (backends_of(&pins, VIP) == Some(2)).then_some(())
    })
    .unwrap_or_else(|| panic!("the whole file never read:\n{}", agent.log_text()));
    serves(&cluster, 10);

    let json = format!(
        r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "other", "namespace": "default"}}, "spec": {{"clusterIP": "10.96.0.11", "ports": [{{"name": "http", "port": 80, "targetPort": {TCP_PORT}}}]}}}}"#
    );
    write_slowly(
        &manifests.dir.join("other.json"),
        &json,
        json.len() / 2,
        Duration::from_millis(600),
        || {},
    );
    wait_for(Duration::from_secs(5), || {
        frontends(&pins)
            .iter()
            .any(|f| f.vip.to_string() == "10.96.0.11")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("other.json never read:\n{}", agent.log_text()));
    assert!(
        !agent.log_text().contains("parse_error"),
        "{}",
        agent.log_text()
    );
}
