//! `cargo xtask vm-test`: the privileged end-to-end suite under other kernels, in qemu.
//!
//! Each kernel is a Debian `linux-image-*-unsigned` package, downloaded with `apt-get
//! download` and unpacked under `target/vm/<release>` (never installed). The guest boots the
//! package's ELF `vmlinux` under TCG (this host's /dev/kvm cannot run these kernels) with a
//! busybox initramfs (`xtask/vm/init`); its root is the host's `/` over 9p, read-only, with a
//! tmpfs overlay, so the test binaries built here run there as they are, and it has no
//! network card. `xtask/vm/suite.sh` runs the tests inside and prints the counts.
//! ../shared/kernel-lab/README.md has what was learned getting here.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, root, run};

/// A kernel the suite runs on: where its package comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 11 (bullseye); also Amazon Linux 2's series.
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12 (bookworm); also Amazon Linux 2023's series.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12 (bookworm), its newer kernel.
    #[value(name = "6.12")]
    V6_12,
    /// All of the above.
    All,
}

impl Kernel {
    fn expand(list: &[Kernel]) -> Vec<Kernel> {
        let mut out: Vec<Kernel> = Vec::new();
        for k in list {
            let more: &[Kernel] = match k {
                Kernel::All => &[Kernel::V5_10, Kernel::V6_1, Kernel::V6_12],
                one => std::slice::from_ref(one),
            };
            for m in more {
                if !out.contains(m) {
                    out.push(*m);
                }
            }
        }
        out
    }

    /// The Debian suite and the package name pattern (the newest match is taken).
    fn package(self) -> (&'static str, &'static str) {
        match self {
            Kernel::V5_10 => ("bullseye", r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$"),
            Kernel::V6_1 => ("bookworm", r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$"),
            Kernel::V6_12 => (
                "bookworm",
                r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
            ),
            Kernel::All => unreachable!("expanded"),
        }
    }

    /// What the kernel lacks of the datapath's features (probe names), for the suite's check
    /// of the probes (`PXT_EXPECT_FEATURES`).
    fn lacks(self) -> &'static str {
        match self {
            Kernel::V5_10 => "bpf_set_retval=no tcx=no",
            Kernel::V6_1 => "tcx=no",
            Kernel::V6_12 | Kernel::All => "",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kernel::V5_10 => "5.10",
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
            Kernel::All => "all",
        }
    }
}

fn cache() -> PathBuf {
    root().join("target/vm")
}

/// The host tools the runner needs, installed with apt where missing.
fn ensure_host_tools() -> anyhow::Result<()> {
    let need = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("depmod", "kmod"),
        ("xz", "xz-utils"),
        ("zstd", "zstd"),
        ("bc", "bc"),
    ];
    let missing: Vec<&str> = need
        .iter()
        .filter(|(bin, _)| crate::toolchain::which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    // busybox must be the static one: it runs in the initramfs.
    let static_busybox = Path::new("/bin/busybox").exists()
        && Command::new("file")
            .arg("-L")
            .arg("/bin/busybox")
            .output()
            .map(|o| !String::from_utf8_lossy(&o.stdout).contains("dynamically"))
            .unwrap_or(true);
    let mut pkgs = missing;
    if !static_busybox && !pkgs.contains(&"busybox-static") {
        pkgs.push("busybox-static");
    }
    if pkgs.is_empty() {
        return Ok(());
    }
    eprintln!("xtask vm-test: installing {}", pkgs.join(" "));
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// apt options for a suite other than the host's, from a private configuration (the host's
/// /etc/apt is never changed); empty for the host's own suite.
fn apt_options(suite: &str) -> anyhow::Result<Vec<String>> {
    let host_suite = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .unwrap_or_default();
    if suite == host_suite {
        return Ok(Vec::new());
    }
    let dir = cache().join(format!("apt-{suite}"));
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    // The archive this machine's apt already uses (its mirror may be the only one reachable).
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    let uris: Vec<&str> = sources
        .lines()
        .filter_map(|l| {
            l.strip_prefix("URIs:").or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().next())
            })
        })
        .map(str::trim)
        .collect();
    let main = uris
        .first()
        .copied()
        .unwrap_or("http://deb.debian.org/debian");
    let security = uris
        .iter()
        .find(|u| u.contains("security"))
        .copied()
        .unwrap_or("http://security.debian.org/debian-security");
    fs::write(
        dir.join("sources.list"),
        format!("deb {main} {suite} main\ndeb {security} {suite}-security main\n"),
    )?;
    let d = dir.display();
    let opts = vec![
        format!("-o=Dir::Etc::SourceList={d}/sources.list"),
        "-o=Dir::Etc::SourceParts=/dev/null".to_string(),
        format!("-o=Dir::State::Lists={d}/lists"),
        format!("-o=Dir::Cache={d}/cache"),
        "-o=APT::Sandbox::User=root".to_string(),
    ];
    if fs::read_dir(dir.join("lists"))?.count() <= 2 {
        run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    }
    Ok(opts)
}

/// The newest package matching `pattern`, as apt knows it.
fn newest_package(opts: &[String], pattern: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(opts)
        .args(["search", "--names-only", pattern])
        .output()
        .context("apt-cache search")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    // Version order: compare the numbers in the name.
    names.sort_by_key(|n| {
        n.split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u64>().ok())
            .collect::<Vec<_>>()
    });
    names.pop().with_context(|| {
        format!("no package matches {pattern} (is apt's package list current? `apt-get update`)")
    })
}

/// A kernel ready to boot: its release name and directory.
struct Prepared {
    release: String,
    dir: PathBuf,
}

/// Downloads and unpacks the kernel (once; the cache keeps it), takes its ELF vmlinux out,
/// and builds its initramfs.
fn prepare(kernel: Kernel) -> anyhow::Result<Prepared> {
    let (suite, pattern) = kernel.package();
    let marker = cache().join(format!("{}.release", kernel.label()));
    if let Ok(release) = fs::read_to_string(&marker) {
        let dir = cache().join(release.trim());
        if dir.join("vmlinux").exists() && dir.join("initrd.gz").exists() {
            return Ok(Prepared {
                release: release.trim().to_string(),
                dir,
            });
        }
    }
    let opts = apt_options(suite)?;
    let package = newest_package(&opts, pattern)?;
    let release = package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_string();
    eprintln!("xtask vm-test: {} is {package}", kernel.label());
    let debs = cache().join("debs");
    fs::create_dir_all(&debs)?;
    let download = || {
        run(Command::new("apt-get")
            .current_dir(&debs)
            .args(&opts)
            .args(["download", "-qq", &package]))
    };
    if download().is_err() {
        // The package lists may name a version the archive has since replaced.
        run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
        download()?;
    }
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .with_context(|| format!("{package}: downloaded .deb not found in {}", debs.display()))?;
    let dir = cache().join(&release);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    fs::remove_file(&deb)?;
    run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
    extract_vmlinux(
        &dir.join(format!("boot/vmlinuz-{release}")),
        &dir.join("vmlinux"),
    )?;
    build_initramfs(&dir, &release)?;
    fs::write(&marker, &release)?;
    Ok(Prepared { release, dir })
}

/// Takes the ELF kernel out of a bzImage: the first compressed stream (xz, zstd or gzip)
/// that decompresses to an ELF file.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> anyhow::Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let formats: [(&[u8], &str); 3] = [
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\x1f\x8b\x08", "gzip"),
    ];
    for (magic, tool) in formats {
        let starts = image
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i);
        for at in starts.take(16) {
            let mut child = Command::new(tool)
                .args(["-dc"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("running {tool}"))?;
            let mut stdin = child.stdin.take().expect("piped");
            let data = image[at..].to_vec();
            // (Trailing bytes after the stream make the tool complain; the output is whole.)
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
            let output = child.wait_with_output()?;
            let _ = writer.join();
            if output.stdout.starts_with(b"\x7fELF") {
                fs::write(out, &output.stdout)?;
                return Ok(());
            }
        }
    }
    bail!("no ELF vmlinux found in {}", bzimage.display())
}

/// busybox, the init, and the modules the guest needs before its root is mounted
/// (virtio-pci, 9p, overlay), decompressed, in dependency order.
fn build_initramfs(dir: &Path, release: &str) -> anyhow::Result<()> {
    let work = dir.join("initramfs");
    let _ = fs::remove_dir_all(&work);
    for d in [
        "bin", "sbin", "proc", "sys", "dev", "mods", "host", "ovl", "newroot", "etc",
    ] {
        fs::create_dir_all(work.join(d))?;
    }
    fs::copy("/bin/busybox", work.join("bin/busybox"))?;
    fs::copy(root().join("xtask/vm/init"), work.join("init"))?;
    let mut order = Vec::new();
    for module in ["virtio_pci", "9pnet_virtio", "9p", "overlay"] {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(dir)
            .args(["-S", release, "--show-depends", module])
            .output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(path) = line.strip_prefix("insmod ") else {
                continue; // builtin
            };
            let path = path.split_whitespace().next().unwrap_or_default();
            let file = Path::new(path);
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let plain = name
                .trim_end_matches(".xz")
                .trim_end_matches(".zst")
                .to_string();
            if order.contains(&plain) {
                continue;
            }
            let target = work.join("mods").join(&plain);
            if name.ends_with(".xz") || name.ends_with(".zst") {
                let tool = if name.ends_with(".xz") { "xz" } else { "zstd" };
                let data = Command::new(tool).arg("-dc").arg(file).output()?;
                fs::write(&target, data.stdout)?;
            } else {
                fs::copy(file, &target)?;
            }
            order.push(plain);
        }
    }
    fs::write(work.join("mods/order"), order.join("\n") + "\n")?;
    let cpio = format!(
        "cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        work.display(),
        dir.join("initrd.gz").display()
    );
    run(Command::new("sh").args(["-c", &cpio]))?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

/// Test binaries the guests skip: what they check does not depend on the kernel, and each
/// costs minutes under emulation. `kube_source` drives the agent's Kubernetes client against
/// the test API server; the datapath it programs is the socket path `socket_lb` checks on every
/// kernel.
const HOST_ONLY: &[&str] = &["kube_source"];

/// How much slower than a native host an emulated guest may run the suite: every bound the
/// tests wait for or assert on is multiplied by it (`PXT_TIME_SCALE`, `proxy_tests::host::scaled`).
const TIME_SCALE: u32 = 5;

/// Builds the agent, the test tools and the test binaries; returns the list file the guest
/// reads ("NAME EXECUTABLE PACKAGE_DIR" per line), without [`HOST_ONLY`].
fn build_tests(out: &Path) -> anyhow::Result<PathBuf> {
    run(cargo().args(["build", "-p", "proxy-agent", "-p", "proxy-tests", "--bins"]))?;
    let mut child = cargo()
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let v: serde_json::Value = match serde_json::from_str(&line?) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest), Some(name)) = (
            v["executable"].as_str(),
            v["manifest_path"].as_str(),
            v["target"]["name"].as_str(),
        ) else {
            continue;
        };
        if HOST_ONLY.contains(&name) {
            continue;
        }
        let dir = Path::new(manifest).parent().unwrap_or(Path::new("/"));
        lines.push(format!("{name} {exe} {}", dir.display()));
    }
    if !child.wait()?.success() {
        bail!("building the tests failed");
    }
    let list = out.join("tests.txt");
    fs::write(&list, lines.join("\n") + "\n")?;
    Ok(list)
}

/// One kernel's result.
struct Outcome {
    passed: u64,
    failed: u64,
    exit: Option<i32>,
    took: Duration,
}

/// Boots `k` and runs the suite in it; the console goes to `out/console.log`.
fn boot(
    kernel: Kernel,
    k: &Prepared,
    list: &Path,
    args: &[String],
    out: &Path,
) -> anyhow::Result<Outcome> {
    let script = out.join("run.sh");
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    fs::write(
        &script,
        format!(
            "#!/bin/bash\nexport PROXY_AGENT_BIN={} VM_OUT={} PXT_EXPECT_FEATURES='{}' PXT_TIME_SCALE={}\nexec {} {} {}\n",
            root().join("target/debug/proxy-agent").display(),
            out.display(),
            kernel.lacks(),
            TIME_SCALE,
            root().join("xtask/vm/suite.sh").display(),
            list.display(),
            quoted.join(" ")
        ),
    )?;
    let started = Instant::now();
    let log_path = out.join("console.log");
    let mut log = fs::File::create(&log_path)?;
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=3 kp_run={} kp_out={} kp_mods={}",
        script.display(),
        out.display(),
        k.dir.join("lib/modules").join(&k.release).display()
    );
    let mut child = Command::new("timeout")
        .args(["--foreground", "-k", "10", "1800", "qemu-system-x86_64"])
        // This host's /dev/kvm cannot run these kernels: TCG, every CPU feature it emulates.
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3G",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(k.dir.join("vmlinux"))
        .arg("-initrd")
        .arg(k.dir.join("initrd.gz"))
        .args(["-append", &append])
        .args([
            "-fsdev",
            "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        ])
        .args(["-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot"])
        .arg("-fsdev")
        .arg(format!(
            "local,id=out,path={},security_model=none,multidevs=remap",
            out.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=out,mount_tag=kpout"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu")?;
    let (mut passed, mut failed, mut exit) = (0, 0, None);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.unwrap_or_default();
        writeln!(log, "{line}")?;
        // The suite's own lines and failures are shown; the rest is in the log.
        if line.starts_with("vm-suite:") || line.contains("FAILED") || line.contains("panicked") {
            println!("  {}: {line}", k.release);
        }
        if let Some(counts) = line
            .strip_prefix("vm-suite: ")
            .filter(|l| l.ends_with(" failed"))
        {
            let nums: Vec<u64> = counts
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|p| p.parse().ok())
                .collect();
            if let [p, f] = nums[..] {
                (passed, failed) = (p, f);
            }
        }
        if let Some(rc) = line.split("KP_EXIT=").nth(1) {
            exit = rc.split_whitespace().next().and_then(|r| r.parse().ok());
        }
    }
    child.wait()?;
    Ok(Outcome {
        passed,
        failed,
        exit,
        took: started.elapsed(),
    })
}

pub fn vm_test(kernels: &[Kernel], args: &[String]) -> anyhow::Result<()> {
    ensure_host_tools()?;
    let kernels = Kernel::expand(if kernels.is_empty() {
        &[Kernel::All]
    } else {
        kernels
    });
    let prepared: Vec<(Kernel, Prepared)> = kernels
        .iter()
        .map(|k| prepare(*k).map(|p| (*k, p)))
        .collect::<anyhow::Result<_>>()?;
    let results = cache().join("out");
    fs::create_dir_all(&results)?;
    let list = build_tests(&results)?;
    let mut summary = Vec::new();
    let mut ok = true;
    for (kernel, k) in &prepared {
        let out = results.join(&k.release);
        fs::create_dir_all(&out)?;
        println!("xtask vm-test: {} ({}): booting", kernel.label(), k.release);
        let o = boot(*kernel, k, &list, args, &out)?;
        let good = o.exit == Some(0) && o.failed == 0 && o.passed > 0;
        ok &= good;
        let line = format!(
            "xtask vm-test: {} ({}): {} passed, {} failed in {:.0}s{}",
            kernel.label(),
            k.release,
            o.passed,
            o.failed,
            o.took.as_secs_f64(),
            match o.exit {
                Some(0) => String::new(),
                Some(n) => format!(
                    " ({n} failing test binaries; console: {})",
                    out.join("console.log").display()
                ),
                None => format!(
                    " (no exit status: the guest did not finish; console: {})",
                    out.join("console.log").display()
                ),
            }
        );
        println!("{line}");
        summary.push(line);
    }
    println!("{}", summary.join("\n"));
    if !ok {
        bail!("vm-test failed on some kernel");
    }
    Ok(())
}
