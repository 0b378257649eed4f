//! The tasks that need slb-tests (built with feature `full`). `cargo xtask` has run `setup`
//! before any of them (see main.rs), so none runs it again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _};
use clap::{Parser, Subcommand};

use crate::{
    bench, cargo, demo, ensure_package_list, output, package, run, scale_out_demo, setup,
    workspace_root,
};

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

pub fn main() -> anyhow::Result<()> {
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

// ---- test ----

fn test() -> anyhow::Result<()> {
    // The default members are every crate but slb-ebpf, which only builds for the BPF target
    // (slb-user's build script builds it with nightly). Building first puts the `slb` binary
    // where the integration tests look for it.
    run(cargo().arg("build"))?;
    // xtask's own tests are in its `full` build.
    run(cargo().args(["test", "--features", "xtask/full", "--", "--test-threads=2"]))?;
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
pub(crate) fn target_dir() -> anyhow::Result<PathBuf> {
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
