//! What `pxt-client` reports, and running it as a pod of a [`Cluster`].

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{cluster::Cluster, host::scaled};

/// One JSON object per client run, so tests assert on data, not on log text.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Report {
    /// Greeting (pod name) -> how many times.
    pub replies: BTreeMap<String, u32>,
    /// Peer as the socket reports it (getpeername for TCP, recvfrom's source for UDP).
    pub peers: BTreeMap<String, u32>,
    /// errno name -> how many times.
    pub errors: BTreeMap<String, u32>,
    /// Slowest failed attempt, in microseconds.
    pub max_error_us: u64,
    /// The last reply (pod name), for "the flow moved" checks.
    #[serde(default)]
    pub last: String,
}

impl Report {
    /// Every one of `n` attempts failed with ECONNREFUSED, none slower than 50 ms (the
    /// datapath answers at once, as kube-proxy's REJECT does).
    pub fn assert_refused_at_once(&self, n: u32) {
        self.assert_failed_at_once("ECONNREFUSED", n);
    }

    /// Every one of `n` attempts failed with `errno`, none slower than 50 ms ([`scaled`], but
    /// never up to the first SYN retransmission at 1 s: a refusal that needed one fails).
    pub fn assert_failed_at_once(&self, errno: &str, n: u32) {
        assert_eq!(self.errors.get(errno), Some(&n), "{self:?}");
        let bound = scaled(Duration::from_millis(50)).min(Duration::from_millis(900));
        assert!(
            u128::from(self.max_error_us) < bound.as_micros(),
            "slowest refusal took {} us (bound {bound:?})",
            self.max_error_us
        );
    }
}

/// The errnos the socket path alone refuses with on this kernel: (no endpoints, no local
/// endpoints). ECONNREFUSED and EHOSTUNREACH through `bpf_set_retval`; EPERM on kernels
/// without it (before 5.18), as the README's kernel table says.
pub fn socket_refusals() -> (&'static str, &'static str) {
    use proxy_agent::features::{Feature, Features};
    if Features::probe().has(Feature::SetRetval) {
        ("ECONNREFUSED", "EHOSTUNREACH")
    } else {
        ("EPERM", "EPERM")
    }
}

fn args(mode: &str, addr: &str, count: u32) -> Vec<String> {
    [
        mode,
        addr,
        "--count",
        &count.to_string(),
        "--timeout-ms",
        "1000",
    ]
    .map(String::from)
    .to_vec()
}

fn parse(out: std::process::Output) -> Report {
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `pxt-client MODE ADDR --count N` as the cluster's client pod, in the hooked cgroup
/// (the socket path translates), with 1 s timeouts.
pub fn run(cluster: &Cluster, bin: &Path, mode: &str, addr: &str, count: u32) -> Report {
    run_with(cluster, bin, false, mode, addr, count, &[])
}

/// Like [`run`], outside the hooked cgroup: only the node's packet path can translate.
pub fn run_unhooked(cluster: &Cluster, bin: &Path, mode: &str, addr: &str, count: u32) -> Report {
    run_with(cluster, bin, true, mode, addr, count, &[])
}

/// Like [`run`] (`unhooked`: like [`run_unhooked`]) with more client flags.
pub fn run_with(
    cluster: &Cluster,
    bin: &Path,
    unhooked: bool,
    mode: &str,
    addr: &str,
    count: u32,
    extra: &[&str],
) -> Report {
    let mut a = args(mode, addr, count);
    a.extend(extra.iter().map(std::string::ToString::to_string));
    let out = if unhooked {
        cluster.run_client_unhooked(bin, &a)
    } else {
        cluster.run_client(bin, &a)
    };
    parse(out.expect("client runs"))
}

/// Starts a client without waiting (e.g. a long loop): as the cluster's client pod in the
/// hooked cgroup, or `unhooked`, outside it. Its stdin is a pipe (`tcp-hold` waits on it).
pub fn spawn(
    cluster: &Cluster,
    bin: &Path,
    unhooked: bool,
    mode: &str,
    addr: &str,
    count: u32,
) -> std::process::Child {
    let mut cmd = if unhooked {
        cluster.client_command_unhooked(bin)
    } else {
        cluster.client_command(bin)
    };
    cmd.args(args(mode, addr, count))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("client starts")
}

/// Waits for a client started by [`spawn`].
pub fn finish(child: std::process::Child) -> Report {
    parse(child.wait_with_output().expect("client ends"))
}
