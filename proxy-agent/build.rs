//! Builds `proxy-ebpf` for `bpfel-unknown-none` with the nightly toolchain and bpf-linker, and
//! leaves the object at `$OUT_DIR/proxy.bpf.o` for `include_bytes!`.
//!
//! Not aya-build: aya-build 0.2 always passes `-Z build-std=core` on nightly, which fails on
//! machines whose toolchain has no rust-src but ships a prebuilt `core` for the BPF target.
//! Here we detect which of the two the machine has.
//!
//! `AYA_BUILD_SKIP=1` (aya-build's switch) skips the eBPF build and embeds an empty object, so
//! the userspace crates can be checked, linted and documented without the eBPF toolchain. Such
//! an agent refuses to load a datapath (`loader::LoaderError::NoPrograms`).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    if let Err(msg) = run() {
        // A build script error is shown verbatim by cargo; keep it actionable.
        eprintln!("error: building the eBPF programs failed:\n{msg}");
        std::process::exit(1);
    }
}

const SKIP: &str = "AYA_BUILD_SKIP";

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed={SKIP}");
    if env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
        println!(
            "cargo:warning={SKIP} is set: no eBPF programs are built; this agent cannot load a datapath"
        );
        return std::fs::write(out_dir.join("proxy.bpf.o"), b"").map_err(|e| e.to_string());
    }
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("no CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent().ok_or("no workspace root")?;
    let ebpf_dir = root.join("proxy-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("proxy-common/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("proxy-common/Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_TOOLCHAIN");

    let toolchain = env::var("PROXY_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let rustup = |args: &[&str]| -> Command {
        let mut c = Command::new("rustup");
        c.args(["run", &toolchain]).args(args);
        // The outer (stable) cargo's settings must not leak into the nightly build.
        for key in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_RUSTFLAGS",
            "RUSTUP_TOOLCHAIN",
            "CARGO",
        ] {
            c.env_remove(key);
        }
        c
    };

    let libdir = rustup(&["rustc", "--print", "target-libdir", "--target", TARGET])
        .output()
        .map_err(|e| format!("cannot run rustup ({e}); install Rust with rustup"))?;
    if !libdir.status.success() {
        return Err(format!(
            "the `{toolchain}` toolchain is not usable: {}\n  fix: rustup toolchain install {toolchain}",
            String::from_utf8_lossy(&libdir.stderr).trim()
        ));
    }
    let libdir = PathBuf::from(String::from_utf8_lossy(&libdir.stdout).trim());
    let prebuilt_core = has_core(&libdir);
    let sysroot = rustup(&["rustc", "--print", "sysroot"])
        .output()
        .map_err(|e| e.to_string())?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let rust_src = sysroot.join("lib/rustlib/src/rust/library/core").is_dir();
    if !prebuilt_core && !rust_src {
        return Err(format!(
            "the `{toolchain}` toolchain has neither a prebuilt core for {TARGET} nor rust-src.\n  \
             fix: rustup component add rust-src --toolchain {toolchain}\n  \
             (offline: ../shared/toolchain/install-ebpf-toolchain builds a prebuilt core)"
        ));
    }
    let Some(linker) = which("bpf-linker") else {
        return Err(
            "bpf-linker is not on PATH.\n  fix: cargo install bpf-linker \
                    (or run ../shared/toolchain/install-ebpf-toolchain)"
                .into(),
        );
    };

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = rustup(&["cargo", "build", "--release", "--target", TARGET]);
    cmd.arg("--manifest-path").arg(ebpf_dir.join("Cargo.toml"));
    // The programs' maps follow the agent's: the rehearsal of the next layout change.
    if env::var_os("CARGO_FEATURE_ABI_NEXT").is_some() {
        cmd.args(["--features", "abi-next"]);
    }
    cmd.arg("--target-dir").arg(&target_dir);
    if !prebuilt_core {
        cmd.args(["-Z", "build-std=core"]);
    }
    // BTF for the maps (field names in `bpftool map dump`) needs debug info and --btf.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    // rustc finds bpf-linker on PATH; it may only be in ~/.cargo/bin.
    let path = env::var_os("PATH").unwrap_or_default();
    let linker_dir = linker.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = env::join_paths(std::iter::once(linker_dir).chain(env::split_paths(&path)))
        .map_err(|e| e.to_string())?;
    cmd.env("PATH", path);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{cmd:?} failed with {status}"));
    }
    let obj = target_dir.join(TARGET).join("release").join("proxy");
    std::fs::copy(&obj, out_dir.join("proxy.bpf.o"))
        .map_err(|e| format!("copying {} failed: {e}", obj.display()))?;
    Ok(())
}

fn has_core(libdir: &Path) -> bool {
    std::fs::read_dir(libdir)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore"))
        })
        .unwrap_or(false)
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
