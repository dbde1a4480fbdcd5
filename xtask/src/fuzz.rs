//! `cargo xtask fuzz`: the `cargo fuzz` targets of `proxy-agent/fuzz/`, each for a bounded time
//! from the committed seeds, with libFuzzer's memory and input-size limits.

use std::{path::Path, process::Command};

use anyhow::bail;

use crate::{root, run, toolchain};

/// The targets (`proxy-agent/fuzz/fuzz_targets/*.rs`), each a property of
/// `proxy_agent::fuzzing`.
const TARGETS: &[&str] = &["manifest", "model"];

/// Largest input (bytes) and memory (MiB) per run: a hostile file must not need more.
const MAX_LEN: u32 = 64 << 10;
const RSS_LIMIT_MB: u32 = 2048;

pub fn fuzz(seconds: u32, only: Option<&str>) -> anyhow::Result<()> {
    if let Some(t) = only.filter(|t| !TARGETS.contains(t)) {
        bail!("no fuzz target {t}; there are {TARGETS:?}");
    }
    ensure_cargo_fuzz()?;
    let crate_dir = root().join("proxy-agent");
    let scratch = root().join("target/fuzz-corpus");
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        // New inputs go to a scratch corpus: the committed seeds stay as they are.
        let found = scratch.join(target);
        std::fs::create_dir_all(&found)?;
        let seeds = crate_dir.join("fuzz/corpus").join(target);
        println!("xtask fuzz: {target} for {seconds} s");
        run(nightly_cargo(&crate_dir)
            .args(["fuzz", "run", target])
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-malloc_limit_mb={RSS_LIMIT_MB}"))
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}

/// `cargo +nightly` in `dir`, building the agent without its eBPF programs (the targets
/// check parsing and the model; the sanitizers' flags would not build a BPF object).
fn nightly_cargo(dir: &Path) -> Command {
    let mut c = toolchain::rustup_nightly(&["cargo"]);
    c.current_dir(dir).env("AYA_BUILD_SKIP", "1");
    c
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let have = nightly_cargo(&root())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("xtask fuzz: installing cargo-fuzz");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
