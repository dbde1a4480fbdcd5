//! `cargo xtask lint`: what CI checks of the code itself, on the workspace and on the eBPF crate
//! (a workspace of its own, built with nightly for the BPF target): rustfmt, clippy with
//! warnings as errors, and the documentation of the userspace crates built with the eBPF build
//! skipped (`AYA_BUILD_SKIP=1`), which shows they need no eBPF toolchain for that.

use crate::{cargo, root, run, toolchain};

const EBPF_TARGET: &str = "bpfel-unknown-none";

pub fn lint() -> anyhow::Result<()> {
    let ebpf_manifest = root().join("proxy-ebpf/Cargo.toml");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args(["fmt", "--all", "--check", "--manifest-path"])
        .arg(&ebpf_manifest))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut ebpf =
        toolchain::rustup_nightly(&["cargo", "clippy", "--release", "--target", EBPF_TARGET]);
    ebpf.current_dir(root())
        .arg("--manifest-path")
        .arg(&ebpf_manifest)
        .arg("--target-dir")
        .arg(root().join("target/ebpf-lint"));
    if !toolchain::has_prebuilt_core() {
        ebpf.args(["-Z", "build-std=core"]);
    }
    run(ebpf.args(["--", "-D", "warnings"]))?;
    run(cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("AYA_BUILD_SKIP", "1")
        .env("RUSTDOCFLAGS", "-D warnings"))
}
