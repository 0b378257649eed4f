//! Project tasks: `cargo xtask setup | test | demo | bench | package`.

mod bench;
mod demo;
mod package;
mod scale_out_demo;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Development tasks for slb")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (nightly rust-src, bpf-linker, iproute2,
    /// ethtool, ping, bpftool, bird2, nftables); does nothing for what is already there.
    Setup,
    /// Setup, build the workspace, and run every test.
    Test,
    /// Setup, build slb (release), and balance TCP and UDP traffic, over IPv4 and over IPv6,
    /// across three backends in network namespaces, printing both distributions and
    /// `slb status`. Needs root.
    Demo {
        /// TCP connections, and also UDP flows, to send to each VIP (IPv4 and IPv6).
        #[arg(long, default_value_t = 3000)]
        connections: usize,
        /// Weights of the backends (one backend each).
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        weights: Vec<u32>,
        /// Instead: three slb nodes behind an ECMP router, announcing the VIP through BIRD
        /// (BGP with BFD); traffic per node and per backend, then one node stopped and started
        /// again under long-lived connections.
        #[arg(long)]
        scale_out: bool,
    },
    /// Setup, build (release), and run the benchmark suites one after the other, writing
    /// target/bench/<suite>.{md,json} and target/bench/summary.{md,json}. Needs root. Nothing
    /// is asserted: these are measurements.
    Bench {
        /// Suites to run, in this order.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "dataplane,capacity,l4,http"
        )]
        suites: Vec<bench::Suite>,
        /// Length of each measured end-to-end run, in seconds.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
        /// Also measure the XDP program of this git revision (built in target/bench/against),
        /// round for round beside this build's, in the dataplane suite's per-packet tables.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
    /// Setup, build slb (release), and make the Debian package: the binary, the systemd unit,
    /// the man page, bash/zsh/fish completions, the config skeleton /etc/slb/slb.toml and
    /// /var/log/slb. Prints the path of the .deb (target/debian/slb_<version>-1_<arch>.deb).
    Package,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Test => test(),
        Task::Demo {
            connections,
            weights,
            scale_out,
        } => demo(connections, &weights, scale_out),
        Task::Bench {
            suites,
            seconds,
            against,
        } => bench(&suites, seconds, against.as_deref()),
        Task::Package => {
            let deb = package::package()?;
            println!("{}", deb.display());
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), else the one on PATH.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited output; a failure names the command.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = describe(cmd);
    eprintln!("xtask: running {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// Runs `cmd` quietly and returns its trimmed stdout if it succeeded.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- setup ----

fn setup() -> anyhow::Result<()> {
    let sysroot = ensure_nightly_rust_src()?;
    ensure_bpf_linker(&sysroot)?;
    ensure_packages()?;
    Ok(())
}

/// Makes sure the nightly toolchain (which aya-build uses to build the eBPF program) has
/// rust-src, and returns its sysroot.
fn ensure_nightly_rust_src() -> anyhow::Result<PathBuf> {
    let sysroot = || output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]));
    let sysroot = match sysroot() {
        Some(s) => PathBuf::from(s),
        None => {
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            PathBuf::from(sysroot().context("rustc +nightly still does not run")?)
        }
    };
    if !sysroot.join("lib/rustlib/src").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(sysroot)
}

/// Installs bpf-linker against the LLVM that ships with the nightly toolchain, unless a working
/// one is already on PATH.
fn ensure_bpf_linker(nightly_sysroot: &Path) -> anyhow::Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let lib_dir = nightly_sysroot.join("lib");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .collect();
    libs.sort();
    let Some(llvm) = libs.pop() else {
        bail!("no libLLVM.so.* in {}", lib_dir.display());
    };
    let versioned = llvm
        .file_name()
        .and_then(OsStr::to_str)
        .context("non-UTF-8 libLLVM name")?
        .to_owned();
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = versioned
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM major version from {versioned}"))?
        .to_owned();

    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home).join(".cache/slb/llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", versioned.as_str()] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    }
    run(cargo()
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))?;
    ensure!(
        output(Command::new("bpf-linker").arg("--version")).is_some(),
        "bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)"
    );
    Ok(())
}

/// Debian packages the tests and the demo use, by the binary each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    // The scale-out tests and demo run BIRD on the router and on every slb node.
    ("bird", "bird2"),
    ("nft", "nftables"),
];

fn ensure_packages() -> anyhow::Result<()> {
    ensure_package_list(PACKAGES)
}

fn ensure_package_list(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(bin, _)| find_program(bin).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))
    };
    if install().is_err() {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update"))?;
        install().with_context(|| format!("installing {}", missing.join(" ")))?;
    }
    Ok(())
}

/// Looks `name` up on PATH and in the sbin directories, which a non-login PATH may lack.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// ---- test ----

fn test() -> anyhow::Result<()> {
    setup()?;
    // The default members are every crate but slb-ebpf, which only builds for the BPF target
    // (slb-user's build script builds it with nightly). Building first puts the `slb` binary
    // where the integration tests look for it.
    run(cargo().arg("build"))?;
    run(cargo().args(["test", "--", "--test-threads=2"]))?;
    Ok(())
}

// ---- demo ----

fn demo(connections: usize, weights: &[u32], scale_out: bool) -> anyhow::Result<()> {
    ensure!(!weights.is_empty(), "give at least one weight");
    ensure!(connections > 0, "give at least one connection");
    ensure!(
        slb_tests::is_root(),
        "the demo creates network namespaces and attaches XDP programs: run it as root"
    );
    setup()?;
    let bin_dir = build_release_binaries()?;
    if scale_out {
        scale_out_demo::demo(&bin_dir, connections, weights)
    } else {
        demo::demo(&bin_dir, connections, weights)
    }
}

// ---- bench ----

/// Debian packages the benchmarks add to [`PACKAGES`]: the balancers slb is compared with,
/// the HTTP load generators (and nghttp, openssl for the HTTPS case), and CPU pinning.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("nghttp", "nghttp2-client"),
    ("openssl", "openssl"),
    ("nft", "nftables"),
    ("taskset", "util-linux"),
];

fn bench(suites: &[bench::Suite], seconds: u64, against: Option<&str>) -> anyhow::Result<()> {
    ensure!(!suites.is_empty(), "give at least one suite");
    ensure!(
        slb_tests::is_root(),
        "the benchmarks create network namespaces and attach XDP programs: run them as root"
    );
    setup()?;
    ensure_package_list(BENCH_PACKAGES)?;
    let bin_dir = build_release_binaries()?;
    // The capacity suite's live-frames driver.
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "slb-user",
        "--example",
        "xdp_replay",
    ]))?;
    let target = target_dir()?;
    let against_rev = against;
    let against = against
        .map(|rev| build_revision(rev, &target.join("bench").join("against")))
        .transpose()?;
    let env = bench::BenchEnv {
        bin_dir,
        out_dir: target.join("bench"),
        duration: std::time::Duration::from_secs(seconds),
        against: against_rev.map(str::to_owned),
    };
    bench::run(&env, suites, || {
        let mut cmd = cargo();
        cmd.args(["bench", "-p", "slb-user", "--bench", "dataplane"]);
        if let Some((label, slb)) = &against {
            cmd.env("SLB_BENCH_AGAINST", slb)
                .env("SLB_BENCH_AGAINST_LABEL", label);
        }
        run(&mut cmd)
    })
}

/// Builds `slb` of git revision `rev` in a worktree under `dir` (kept, with its own target
/// directory, for the next run): its label (`rev` and the short hash) and the binary.
fn build_revision(rev: &str, dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let hash = output(Command::new("git").current_dir(workspace_root()).args([
        "rev-parse",
        "--verify",
        "--short=10",
        &format!("{rev}^{{commit}}"),
    ]))
    .with_context(|| format!("--against {rev}: not a git revision of this repository"))?;
    let tree = dir.join(&hash);
    if !tree.join("Cargo.toml").exists() {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_dir_all(&tree);
        run(Command::new("git")
            .current_dir(workspace_root())
            .args(["worktree", "add", "--detach", "--force"])
            .arg(&tree)
            .arg(&hash))?;
    }
    let target = dir.join("target");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&tree)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--release", "-p", "slb-user", "--bin", "slb"]),
    )?;
    let label = if rev == hash {
        hash.clone()
    } else {
        format!("{rev} ({hash})")
    };
    Ok((label, target.join("release").join("slb")))
}

/// Builds `slb` and the test binaries (backends, load generator) in release mode and returns
/// the directory they are in.
fn build_release_binaries() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "slb-user",
        "-p",
        "slb-tests",
        "--bins",
    ]))?;
    Ok(target_dir()?.join("release"))
}

/// Target directory as cargo reports it (honours CARGO_TARGET_DIR and config).
fn target_dir() -> anyhow::Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}
