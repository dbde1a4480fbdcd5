//! The agent binary under test, its manifests directory and its pins.

use std::{
    fs,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData};
use proxy_agent::{
    inspect::{self, FrontendView},
    maps,
};
use proxy_common::{SOCK_SLOT_MAP, SockRevNatKey, SockSlot};

use crate::{
    host::{BpffsDir, scaled},
    unique,
};

/// Where the agent binary is: `$PROXY_AGENT_BIN` (set by `cargo xtask test`), else the
/// workspace's debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("PROXY_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/proxy-agent")
        })
}

/// Runs `proxy-agent ARGS --bpffs-dir PINS` (a command that reads or writes the pins, such as
/// `services` or `bpf-log-level`), which must succeed: its stdout.
pub fn cli(pins: &BpffsDir, args: &[&str]) -> String {
    let out = std::process::Command::new(agent_bin())
        .args(args)
        .arg("--bpffs-dir")
        .arg(&pins.path)
        .output()
        .expect("running proxy-agent");
    assert!(
        out.status.success(),
        "proxy-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A manifests directory, removed on drop.
pub struct Manifests {
    pub dir: PathBuf,
}

impl Manifests {
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("m"));
        fs::create_dir_all(&dir)?;
        Ok(Manifests { dir })
    }

    /// Writes atomically (write + rename), as editors and config managers do.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.dir.join(name))?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        Ok(fs::remove_file(self.dir.join(name))?)
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The Linux capabilities the agent needs, as `deploy/capabilities` grants them (the README
/// says why each).
pub const AGENT_CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_RESOURCE",
];

/// A free TCP port on loopback (the agent binds it right after; tests run few agents).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `proxy-agent run`; stopped on drop (its pins stay until `pins` drops).
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub health_addr: String,
    pub metrics_addr: String,
}

impl Agent {
    /// `proxy-agent run --manifests DIR` on `cgroup`, pinned in `pins`.
    pub fn start(manifests: &Path, cgroup: &Path, pins: &BpffsDir) -> anyhow::Result<Self> {
        Self::start_with(
            &["--manifests".as_ref(), manifests.as_os_str()],
            cgroup,
            pins,
        )
    }

    /// `proxy-agent run ARGS` on `cgroup`, pinned in `pins`; waits until it is ready.
    pub fn start_with(
        args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pins: &BpffsDir,
    ) -> anyhow::Result<Self> {
        Self::start_in(None, args, cgroup, pins)
    }

    /// Like [`Self::start_with`], inside the network namespace at `netns` (as on a node).
    pub fn start_in(
        netns: Option<&Path>,
        args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pins: &BpffsDir,
    ) -> anyhow::Result<Self> {
        let mut agent = Self::spawn_in(netns, args, cgroup, pins)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Like [`Self::start_in`], without waiting until the agent is ready.
    pub fn spawn_in(
        netns: Option<&Path>,
        args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pins: &BpffsDir,
    ) -> anyhow::Result<Self> {
        Self::spawn_bin_in(&agent_bin(), netns, args, cgroup, pins)
    }

    /// Like [`Self::spawn_in`], with another agent binary (another build).
    pub fn spawn_bin_in(
        bin: &Path,
        netns: Option<&Path>,
        args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pins: &BpffsDir,
    ) -> anyhow::Result<Self> {
        // nsenter switches only the network namespace, so the agent still sees the host's
        // cgroup and bpffs mounts (`ip netns exec` would remount /sys).
        let cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        Self::spawn(cmd, args, cgroup, pins)
    }

    /// Waits until the agent exits by itself, at most `bound` ([`scaled`]): its exit code
    /// (None: it did not exit, and is left running, or a signal ended it).
    pub fn wait_exit_within(&mut self, bound: Duration) -> Option<i32> {
        let deadline = Instant::now() + scaled(bound);
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            sleep(Duration::from_millis(20));
        }
        None
    }

    /// Like [`Self::start_with`], with only these capabilities (names as in a Pod's
    /// `securityContext.capabilities.add`): the agent is exec'd by `setpriv` with that bounding
    /// set, so a root process has those and no other.
    pub fn start_with_capabilities(
        capabilities: &[&str],
        args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pins: &BpffsDir,
    ) -> anyhow::Result<Self> {
        let caps: Vec<String> = (capabilities.iter())
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .arg("--inh-caps=-all")
            .arg("--")
            .arg(agent_bin());
        let mut agent = Self::spawn(cmd, args, cgroup, pins)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// `cmd` (which ends in the agent binary) with `run` and its arguments.
    fn spawn(
        mut cmd: Command,
        args: &[&std::ffi::OsStr],
        cgroup: &Path,
        pins: &BpffsDir,
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", unique("agent")));
        let out = fs::File::create(&log)?;
        let health_addr = format!("127.0.0.1:{}", free_port());
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let child = cmd
            .args([
                "run",
                "--node-name",
                "node-a",
                "--health-addr",
                &health_addr,
                "--metrics-addr",
                &metrics_addr,
            ])
            .args(args)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpffs-dir")
            .arg(&pins.path)
            .env(
                "RUST_LOG",
                std::env::var("PXT_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it with `cargo xtask test`)",
                    agent_bin().display()
                )
            })?;
        Ok(Agent {
            child: Some(child),
            log,
            health_addr,
            metrics_addr,
        })
    }

    /// Up to 60 s ([`scaled`]): a bound, not a measure.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_ready_within(Duration::from_secs(60))
    }

    /// Waits until the agent is ready, at most `bound` ([`scaled`]).
    pub fn wait_ready_within(&mut self, bound: Duration) -> anyhow::Result<()> {
        let bound = scaled(bound);
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            // The "ready" event, in the text or the JSON log format.
            let log = self.log_text();
            if log.contains(" ready") || log.contains("\"message\":\"ready\"") {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent exited with {status}:\n{}", self.log_text());
            }
            sleep(Duration::from_millis(20));
        }
        bail!("agent not ready after {bound:?}:\n{}", self.log_text())
    }

    /// The agent's process id (None once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the agent at once (SIGKILL), as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the agent as an operator would (SIGTERM), bounded; SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.terminate_within(Duration::from_secs(5));
    }

    /// Sends SIGTERM; whether the agent exited within `bound` ([`scaled`]; it is killed if not).
    pub fn terminate_within(&mut self, bound: Duration) -> bool {
        let bound = scaled(bound);
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return true;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_file(&self.log);
    }
}

/// `GET path` over HTTP/1.0 on `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// The frontends in the pinned maps.
pub fn frontends(pins: &BpffsDir) -> Vec<FrontendView> {
    inspect::inspect(&pins.path)
        .map_err(anyhow::Error::from)
        .map(|i| i.services)
        .unwrap_or_else(|e| {
            eprintln!("inspect: {e:#}");
            Vec::new()
        })
}

/// `PROXY_SKSLOT_V1`, the TCP sockets' reverse NAT.
fn open_sock_slots(pins: &BpffsDir) -> anyhow::Result<Array<MapData, SockSlot>> {
    let path = pins.path.join(SOCK_SLOT_MAP);
    let map = MapData::from_pin(&path).with_context(|| format!("{}", path.display()))?;
    Ok(Array::try_from(Map::Array(map))?)
}

/// The TCP sockets the socket path recorded: the used slots of `PROXY_SKSLOT_V1`.
pub fn tcp_sock_slots(pins: &BpffsDir) -> anyhow::Result<Vec<SockSlot>> {
    let mut used = Vec::new();
    for s in open_sock_slots(pins)?.iter() {
        let s = s?;
        if s.cookie != 0 {
            used.push(s);
        }
    }
    Ok(used)
}

/// Moves a TCP socket's record from its `PROXY_SKSLOT_V1` slot to `PROXY_SKNAT_V1`, where the
/// programs before the slots recorded it (`to_lru` false: only clears the slot). Returns the
/// record.
pub fn move_tcp_record(pins: &BpffsDir, cookie: u64, to_lru: bool) -> anyhow::Result<SockSlot> {
    let mut slots = open_sock_slots(pins)?;
    let index = SockSlot::index(cookie);
    let record = slots.get(&index, 0)?;
    if record.cookie != cookie {
        bail!("slot {index} holds cookie {}, not {cookie}", record.cookie);
    }
    if to_lru {
        let key = SockRevNatKey::new(cookie, record.addr_be, record.port_be);
        maps::open_sock_rev_nat(&pins.path)?.insert(key, record.rev, 0)?;
    }
    slots.set(index, SockSlot::default(), 0)?;
    Ok(record)
}

/// How many entries `PROXY_SKNAT_V1` (the UDP sockets' reverse NAT) holds.
pub fn sock_rev_nat_entries(pins: &BpffsDir) -> anyhow::Result<usize> {
    Ok(maps::open_sock_rev_nat(&pins.path)?.keys().count())
}

/// How the packet-path program runs on `ifname` in `ns`, as the kernel reports it (through
/// `proxy-agent status`): `(tcx, clsact filter priorities)`; `None` if the interface is gone.
pub fn tc_attachment(ns: &crate::host::Netns, ifname: &str) -> Option<(bool, Vec<u64>)> {
    let out = ns
        .exec(
            &agent_bin(),
            &["status", "--interface", ifname, "-o", "json"],
        )
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let i = v["interfaces"].as_array()?.first()?;
    let prios = i["clsact_priorities"]
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    Some((i["tcx"].as_bool()?, prios))
}

/// Whether the packet-path program runs on `ifname` in `ns`, one way or the other.
pub fn tc_attached(ns: &crate::host::Netns, ifname: &str) -> bool {
    tc_attachment(ns, ifname).is_some_and(|(tcx, prios)| tcx || !prios.is_empty())
}

/// The pinned link `links/name`: `(link id, program id)`; None if there is no such pin.
pub fn pinned_link(pins: &BpffsDir, name: &str) -> Option<(u32, u32)> {
    let link = aya::programs::links::PinnedLink::from_pin(pins.path.join("links").join(name));
    let info = aya::programs::links::FdLink::from(link.ok()?).info().ok()?;
    Some((info.id(), info.program_id()))
}
