//! `cargo xtask`: the project's entry points. Deliberately depends on nothing of the project,
//! so it can check (and install) the eBPF toolchain before anything needs it.

mod fuzz;
mod lint;
mod toolchain;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the eBPF toolchain, installing what can be installed.
    Toolchain,
    /// Build the agent (release) and run `proxy-agent run <ARGS>` as root.
    BuildAndLoad {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy (warnings are errors) on the workspace and the eBPF crate, and the
    /// userspace documentation built without the eBPF toolchain (`AYA_BUILD_SKIP=1`).
    Lint,
    /// Run every test: unit tests, then the privileged end-to-end tests (as root).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The privileged end-to-end suite under other kernels (Debian's 5.10, 6.1, 6.12) in
    /// qemu: builds the tests here, boots each kernel, runs them inside; one line per kernel.
    VmTest {
        /// The kernels (repeat the flag for several; default: all).
        #[arg(long = "kernel", value_enum)]
        kernels: Vec<vm::Kernel>,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A netns mini-cluster, the agent on it, requests to a ClusterIP; cleans up after itself.
    Demo {
        /// Through the Kubernetes API source: the test API server, `kubectl create`,
        /// `replace` and `delete`, the requests following each.
        #[arg(long)]
        kube: bool,
    },
    /// The `cargo fuzz` targets (manifest parsing, the incremental model), each for a bounded
    /// time from the committed seeds; installs cargo-fuzz where missing (nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Restarts, upgrades and endpoint churn under load (as root): connects through both
    /// datapaths are judged against the maps; prints tables, fails if a guarantee broke.
    Chaos {
        /// 3 restarts and 10 s of churn (instead of 10 and 60).
        #[arg(long)]
        quick: bool,
        /// More options for `pxt-chaos` after `--` (`--help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (as root): data plane and control plane against direct, iptables and
    /// nftables; prints tables, writes JSON, Markdown and SVG results.
    Bench {
        /// Small sizes and 1 s windows: checks the benchmark runs (numbers are rough).
        #[arg(long)]
        quick: bool,
        /// Where results go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// More options for `pxt-bench` after `--` (e.g. `-- --sizes 1 --rounds 5
        /// --skip-controlplane`; `--help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} loads eBPF programs and creates network namespaces: run it as root (e.g. `sudo -E cargo xtask ...`)"
        );
    }
    Ok(())
}

fn status(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    cmd.status().with_context(|| format!("running {cmd:?}"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and sums the "test result:" lines.
fn run_counting(cmd: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| {
                rest.split(';').find_map(|part| {
                    part.trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(word)?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            };
            passed += num(" passed").unwrap_or(0);
            failed += num(" failed").unwrap_or(0);
        }
    }
    let st = child.wait()?;
    if !st.success() {
        println!("xtask: {passed} passed, {failed} failed");
        bail!("{cmd:?} failed ({st})");
    }
    Ok((passed, failed))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds the agent and the test tools (release); returns where they are.
fn build_release_bins() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-agent",
        "-p",
        "proxy-tests",
        "--bins",
    ]))?;
    Ok(root().join("target/release"))
}

/// The agent built with the next map layout rehearsed (`--features abi-next`), copied aside
/// as `target/release/proxy-agent-abi-next`.
fn build_abi_next_agent() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-agent",
        "--bin",
        "proxy-agent",
        "--features",
        "abi-next",
    ]))?;
    let dir = root().join("target/release");
    let next = dir.join("proxy-agent-abi-next");
    std::fs::copy(dir.join("proxy-agent"), &next)
        .with_context(|| format!("copying the abi-next agent to {}", next.display()))?;
    Ok(next)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Toolchain => toolchain::ensure(),
        Cmd::Lint => {
            toolchain::ensure()?;
            lint::lint()
        }
        Cmd::BuildAndLoad { args } => {
            toolchain::ensure()?;
            run(cargo().args(["build", "--release", "-p", "proxy-agent"]))?;
            let bin = root().join("target/release/proxy-agent");
            let mut args = args;
            if args.first().map(String::as_str) != Some("run") {
                args.insert(0, "run".into());
            }
            // Loading eBPF needs root: use sudo when we are not root (the build stays ours).
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                let Some(sudo) = toolchain::which("sudo") else {
                    bail!(
                        "loading eBPF programs needs root; run `cargo xtask build-and-load` as root"
                    );
                };
                let mut c = Command::new(sudo);
                c.arg("--preserve-env=RUST_LOG,NODE_NAME").arg(&bin);
                c
            };
            let st = status(cmd.args(&args))?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Cmd::Test { args } => {
            toolchain::ensure()?;
            require_root("cargo xtask test")?;
            run(cargo().args(["build", "-p", "proxy-agent", "-p", "proxy-tests", "--bins"]))?;
            let mut cmd = cargo();
            cmd.args([
                "test",
                "--workspace",
                "--",
                "--include-ignored",
                "--test-threads=2",
            ])
            .args(&args);
            cmd.env("PROXY_AGENT_BIN", root().join("target/debug/proxy-agent"));
            let (passed, failed) = run_counting(&mut cmd)?;
            toolchain::check_host_clean()?;
            // One closing line for the whole suite (cargo prints one per test binary).
            println!("xtask: {passed} passed, {failed} failed");
            Ok(())
        }
        Cmd::Bench { quick, out, args } => {
            toolchain::ensure()?;
            require_root("cargo xtask bench")?;
            let dir = build_release_bins()?;
            let out = if out.is_absolute() {
                out
            } else {
                root().join(out)
            };
            // How the run was started, for the result file.
            let mut command = String::from("cargo xtask bench");
            if quick {
                command.push_str(" --quick");
            }
            if !args.is_empty() {
                command.push_str(" -- ");
                command.push_str(&args.join(" "));
            }
            let mut cmd = Command::new(dir.join("pxt-bench"));
            cmd.arg("--agent")
                .arg(dir.join("proxy-agent"))
                .arg("--load")
                .arg(dir.join("pxt-load"))
                .arg("--out")
                .arg(&out)
                .arg("--command")
                .arg(&command);
            if quick {
                cmd.arg("--quick");
            }
            cmd.args(&args);
            let result = run(&mut cmd);
            // Whatever happened, nothing may be left behind.
            toolchain::check_host_clean()?;
            result
        }
        Cmd::Chaos { quick, args } => {
            toolchain::ensure()?;
            require_root("cargo xtask chaos")?;
            // First: it leaves its agent where the plain build then goes.
            let next = build_abi_next_agent()?;
            let dir = build_release_bins()?;
            let mut cmd = Command::new(dir.join("pxt-chaos"));
            cmd.arg("--agent")
                .arg(dir.join("proxy-agent"))
                .arg("--probe")
                .arg(dir.join("pxt-probe"))
                .arg("--next-agent")
                .arg(next);
            if quick {
                cmd.arg("--quick");
            }
            let result = run(cmd.args(&args));
            toolchain::check_host_clean()?;
            result
        }
        Cmd::VmTest { kernels, args } => {
            toolchain::ensure()?;
            require_root("cargo xtask vm-test")?;
            vm::vm_test(&kernels, &args)
        }
        Cmd::Fuzz { seconds, target } => {
            toolchain::ensure()?;
            fuzz::fuzz(seconds, target.as_deref())
        }
        Cmd::Demo { kube } => {
            toolchain::ensure()?;
            require_root("cargo xtask demo")?;
            let dir = build_release_bins()?;
            let mut cmd = Command::new(dir.join("pxt-demo"));
            cmd.arg("--agent")
                .arg(dir.join("proxy-agent"))
                .arg("--client")
                .arg(dir.join("pxt-client"));
            if kube {
                cmd.arg("--kube");
            }
            run(&mut cmd)
        }
    }
}
