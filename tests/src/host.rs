//! Guards for host objects. Each removes what it made on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn require_root() {
    assert_eq!(
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() },
        0,
        "privileged test: run as root (`cargo xtask test` does)"
    );
}

/// A child cgroup of the cgroup2 mount.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = proxy_agent::loader::cgroup2_mount()?;
        let path = root.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Kill stragglers (a client that outlived a failed test), then remove the directory;
        // removing it also detaches any program still attached to it.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(3);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
    }
}

/// A network namespace (`ip netns`), so `nsenter --net=/run/netns/NAME` finds it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// PROGRAM ARGS... in this namespace (`nsenter`: unlike `ip netns exec`, it keeps the
    /// host's /sys, where bpffs is mounted): its standard output.
    pub fn exec(&self, program: &Path, args: &[&str]) -> anyhow::Result<String> {
        let program = program.to_string_lossy();
        let net = format!("--net={}", self.path().display());
        let mut all = vec![net.as_str(), "--", &*program];
        all.extend_from_slice(args);
        sh("nsenter", &all)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A directory for one agent's pins.
pub struct BpffsDir {
    pub path: PathBuf,
}

impl BpffsDir {
    pub fn new(name: &str) -> Self {
        BpffsDir {
            path: Path::new("/sys/fs/bpf").join(name),
        }
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        // Unpinning the links detaches the programs; then the maps go.
        let _ = proxy_agent::loader::cleanup(&self.path);
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `d` times how much slower than a native host the machine running the tests may be:
/// `PXT_TIME_SCALE` (set by `cargo xtask vm-test`, whose guests are emulated), else 1. Every
/// bound a test waits for or asserts on goes through it, so a slow emulated kernel fails only
/// on behaviour, never on speed; on a native host the bounds are as written.
pub fn scaled(d: Duration) -> Duration {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let scale = *SCALE.get_or_init(|| {
        std::env::var("PXT_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s >= 1)
            .unwrap_or(1)
    });
    d * scale
}

/// Polls `f` every 10 ms until it returns Some, for at most `limit` ([`scaled`]).
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let limit = scaled(limit);
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some((v, start.elapsed()));
        }
        if start.elapsed() > limit {
            return None;
        }
        sleep(Duration::from_millis(10));
    }
}
