//! What building and testing the datapath needs, checked before anything is built:
//! nightly (aya-ebpf needs it), either rust-src or a prebuilt `core` for bpfel-unknown-none,
//! bpf-linker, and the host tools the tests and the demo use. What can be installed is
//! installed; otherwise the error says exactly what is missing and how to get it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

const TARGET: &str = "bpfel-unknown-none";
/// The project's shared installer, present on this project's machines and in CI (it also
/// builds a prebuilt `core` where rust-src cannot be downloaded).
const SHARED_INSTALLER: &str = "../shared/toolchain/install-ebpf-toolchain";

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")))
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

#[derive(Debug)]
struct Missing(Vec<(&'static str, &'static str)>);

/// Whether nightly has a prebuilt `core` for the BPF target (else it needs
/// `-Z build-std=core` and rust-src).
pub fn has_prebuilt_core() -> bool {
    let libdir = output(&mut rustup_nightly(&[
        "rustc",
        "--print",
        "target-libdir",
        "--target",
        TARGET,
    ]));
    libdir.is_some_and(|d| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore"))
        })
    })
}

/// A command run with the nightly toolchain, none of the outer cargo's settings leaking in.
pub fn rustup_nightly(args: &[&str]) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly"]).args(args);
    c.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO");
    c
}

fn check() -> Missing {
    let mut m = Vec::new();
    if which("rustup").is_none() {
        m.push(("rustup", "install Rust with rustup: https://rustup.rs"));
        return Missing(m);
    }
    if !ok(&mut rustup_nightly(&["rustc", "--version"])) {
        m.push((
            "the nightly toolchain",
            "rustup toolchain install nightly --profile minimal",
        ));
    } else {
        let prebuilt = has_prebuilt_core();
        let sysroot =
            output(&mut rustup_nightly(&["rustc", "--print", "sysroot"])).unwrap_or_default();
        let src = Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .is_dir();
        if !prebuilt && !src {
            m.push((
                "core for bpfel-unknown-none (rust-src or prebuilt)",
                "rustup component add rust-src --toolchain nightly",
            ));
        }
    }
    if which("bpf-linker").is_none() {
        m.push(("bpf-linker", "cargo install bpf-linker (needs LLVM matching nightly's; see https://github.com/aya-rs/bpf-linker)"));
    }
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("bpftool", "bpftool"),
        ("ping", "iputils-ping"),
        ("tcpdump", "tcpdump"),
        // Checksum-offload off in the capture test.
        ("ethtool", "ethtool"),
        // The benchmark's kube-proxy rows.
        ("iptables-restore", "iptables"),
        ("nft", "nftables"),
    ] {
        if which(bin).is_none() {
            m.push((bin, pkg));
        }
    }
    Missing(m)
}

fn try_install(mut missing: Missing) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let shared = root.join(SHARED_INSTALLER);
    if shared.is_file() {
        eprintln!(
            "xtask: installing the eBPF toolchain with {}",
            shared.display()
        );
        let _ = Command::new(&shared).status();
        missing = check();
    }
    let mut apt_updated = false;
    for (what, how) in &missing.0 {
        let cmd: Option<Vec<&str>> = match *what {
            "the nightly toolchain" => Some(vec![
                "rustup",
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
            w if w.starts_with("core for") => Some(vec![
                "rustup",
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]),
            "bpf-linker" => Some(vec!["cargo", "+nightly", "install", "bpf-linker"]),
            "ip" | "nsenter" | "bpftool" | "ping" | "tcpdump" | "ethtool" | "kubectl"
            | "iptables-restore" | "nft"
                if which("apt-get").is_some() =>
            {
                if !apt_updated {
                    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
                    apt_updated = true;
                }
                Some(vec!["apt-get", "install", "-y", "-qq", how])
            }
            _ => None,
        };
        if let Some(cmd) = cmd {
            eprintln!("xtask: {what} is missing; running: {}", cmd.join(" "));
            let _ = Command::new(cmd[0]).args(&cmd[1..]).status();
        }
    }
}

pub fn ensure() -> anyhow::Result<()> {
    let missing = check();
    if missing.0.is_empty() {
        return Ok(());
    }
    try_install(missing);
    let still = check();
    if still.0.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = still
        .0
        .iter()
        .map(|(what, how)| format!("  - {what}: {how}"))
        .collect();
    bail!(
        "the eBPF toolchain is incomplete; missing:\n{}",
        lines.join("\n")
    )
}

/// After the privileged tests: nothing of theirs may be left on the machine.
pub fn check_host_clean() -> anyhow::Result<()> {
    let mut left = Vec::new();
    if let Some(ns) = output(Command::new("ip").args(["netns", "list"])) {
        left.extend(
            ns.lines()
                .filter(|l| l.starts_with("pxt"))
                .map(|l| format!("netns {l}")),
        );
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        left.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("pxt"))
                .map(|n| format!("bpffs /sys/fs/bpf/{n}")),
        );
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if let Some(cg) = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        && let Ok(rd) = std::fs::read_dir(cg[1])
    {
        left.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("pxt"))
                .map(|n| format!("cgroup {}/{n}", cg[1])),
        );
    }
    if !left.is_empty() {
        bail!("the tests left state on this machine: {}", left.join(", "));
    }
    println!("xtask: host clean (no test namespaces, cgroups or pins left)");
    Ok(())
}
