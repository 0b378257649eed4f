//! `cargo xtask bench`: the benchmark suites, run one after the other in one go, each writing a
//! markdown table and JSON under target/bench/, plus a summary of the run (machine, commands,
//! every table) in target/bench/summary.md. Nothing here asserts a time.
//!
//! CPU placement on a 2-core machine: the load generator and the backends run on CPU 0, a
//! user-space balancer (HAProxy, slb's L7 proxy) on CPU 1. In-kernel balancing (slb's XDP
//! program, nftables DNAT) runs in softirq on whichever CPU handles the packet, which on veth
//! is mostly the sender's, so it shares CPU 0 with the generator for the forward direction.

pub mod capacity;
pub mod h2load;
pub mod http;
pub mod l4;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use clap::ValueEnum;
use serde_json::json;

/// CPU of the load generator and the backends.
pub const GENERATOR_CPU: u32 = 0;
/// CPU of a user-space balancer.
pub const BALANCER_CPU: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Per-packet cost of the XDP program next to a floor program, table sizes, Maglev quality
    /// and build time, control-plane apply time and memory (`cargo bench -p slb-user`).
    Dataplane,
    /// New TCP connections per second and UDP request/response rate through slb, HAProxy (TCP
    /// mode) and nftables DNAT.
    L4,
    /// HTTP requests per second and latency through slb's HTTP listener and HAProxy (HTTP mode).
    Http,
    /// Frames per second one CPU balances, driven by the kernel's live-frames generator: slb
    /// vs nftables DNAT vs plain routing.
    Capacity,
}

impl Suite {
    fn file_stem(self) -> &'static str {
        match self {
            Suite::Dataplane => "dataplane",
            Suite::L4 => "l4",
            Suite::Http => "http",
            Suite::Capacity => "capacity",
        }
    }
}

/// What a suite needs: where the release binaries are, where results go, how long each
/// measured run lasts.
#[derive(Debug, Clone)]
pub struct BenchEnv {
    pub bin_dir: PathBuf,
    pub out_dir: PathBuf,
    pub duration: Duration,
    /// The git revision measured beside this build (`--against`), as given.
    pub against: Option<String>,
}

impl BenchEnv {
    pub fn slb(&self) -> PathBuf {
        self.bin_dir.join("slb")
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// A suite's results: a markdown section and the same figures as JSON.
#[derive(Debug, Clone)]
pub struct Section {
    pub markdown: String,
    pub json: serde_json::Value,
}

/// `taskset -c CPU ip netns exec NS ARGS...`: a command pinned to one CPU inside a namespace.
pub fn pinned_in<S: AsRef<std::ffi::OsStr>>(ns: &str, cpu: u32, args: &[S]) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "ip", "netns", "exec", ns])
        .args(args);
    cmd
}

/// Starts HAProxy in the foreground on `config` in namespace `ns`, pinned to [`BALANCER_CPU`].
/// taskset and `ip netns exec` exec it in place, so the guard's pid is HAProxy's.
pub fn spawn_haproxy(ns: &str, config: &Path) -> anyhow::Result<slb_tests::exec::ChildGuard> {
    let mut cmd = pinned_in(
        ns,
        BALANCER_CPU,
        &[
            "haproxy".as_ref(),
            "-db".as_ref(),
            "-f".as_ref(),
            config.as_os_str(),
        ],
    );
    Ok(slb_tests::exec::ChildGuard::spawn(&mut cmd)?)
}

/// Pins an already running process (all its threads) to `cpu`.
pub fn pin_process(pid: u32, cpu: u32) -> anyhow::Result<()> {
    slb_tests::exec::run(Command::new("taskset").args([
        "-a",
        "-p",
        "-c",
        &cpu.to_string(),
        &pid.to_string(),
    ]))
    .with_context(|| format!("pinning process {pid} to CPU {cpu}"))?;
    Ok(())
}

fn write_section(out_dir: &Path, suite: Suite, section: &Section) -> anyhow::Result<()> {
    let stem = suite.file_stem();
    std::fs::write(out_dir.join(format!("{stem}.md")), &section.markdown)?;
    std::fs::write(
        out_dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&section.json)?,
    )?;
    Ok(())
}

fn read_section(out_dir: &Path, suite: Suite) -> anyhow::Result<Section> {
    let stem = suite.file_stem();
    let markdown = std::fs::read_to_string(out_dir.join(format!("{stem}.md")))
        .with_context(|| format!("reading target/bench/{stem}.md"))?;
    let json = serde_json::from_str(&std::fs::read_to_string(
        out_dir.join(format!("{stem}.json")),
    )?)?;
    Ok(Section { markdown, json })
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "kernel": first_line(Command::new("uname").arg("-r")),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rustc": first_line(Command::new("rustc").arg("--version")),
        "haproxy": first_line(Command::new("haproxy").arg("-v")),
        "wrk": first_line(Command::new("wrk").arg("--version")),
        "h2load": first_line(Command::new("h2load").arg("--version")),
        "nft": first_line(Command::new("nft").arg("--version")),
        "date": first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
    })
}

/// Runs `suites` in order (the dataplane suite through `dataplane`, a closure that runs
/// `cargo bench`), then writes target/bench/summary.{md,json}.
pub fn run(
    env: &BenchEnv,
    suites: &[Suite],
    dataplane: impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&env.out_dir)?;
    let machine = machine();
    let mut summary = String::from("# slb benchmark run\n\n");
    let _ = writeln!(
        summary,
        "Machine: {} CPU(s), {}; kernel {}; {}; {}. Run on {}.\n",
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("?"),
        machine["haproxy"].as_str().unwrap_or("?"),
        machine["date"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        summary,
        "Command: `cargo xtask bench --suites {} --seconds {}{}`\n",
        suites
            .iter()
            .map(|s| s.file_stem())
            .collect::<Vec<_>>()
            .join(","),
        env.duration.as_secs(),
        env.against
            .as_deref()
            .map(|rev| format!(" --against {rev}"))
            .unwrap_or_default()
    );
    let mut results = serde_json::Map::new();
    for &suite in suites {
        println!("==> benchmark suite {}", suite.file_stem());
        match suite {
            Suite::Dataplane => dataplane()?,
            Suite::L4 => write_section(&env.out_dir, suite, &l4::run(env)?)?,
            Suite::Http => write_section(&env.out_dir, suite, &http::run(env)?)?,
            Suite::Capacity => write_section(&env.out_dir, suite, &capacity::run(env)?)?,
        }
        let section = read_section(&env.out_dir, suite)?;
        println!("{}", section.markdown);
        summary.push_str(&section.markdown);
        summary.push('\n');
        results.insert(suite.file_stem().to_owned(), section.json);
    }
    std::fs::write(env.out_dir.join("summary.md"), &summary)?;
    std::fs::write(
        env.out_dir.join("summary.json"),
        serde_json::to_string_pretty(&json!({"machine": machine, "results": results}))?,
    )?;
    println!(
        "results: {}/summary.md (and one .md/.json per suite)",
        env.out_dir.display()
    );
    Ok(())
}

/// Moves the packet processing of every veth end to a NAPI kernel thread pinned like the
/// processes on that side: the slb namespace's interfaces (the balancer's work: XDP, forwarding,
/// conntrack, or the stack under HAProxy) to [`BALANCER_CPU`], the client's and the backends'
/// interfaces to [`GENERATOR_CPU`]. Without this, veth processes a packet in softirq on the
/// sending CPU, so the balancer's work would land wherever the generator runs.
/// Returns the NAPI threads on the generator's side (client and backends), whose CPU time
/// is the endpoints' share of packet processing.
pub fn place_network_processing(topo: &slb_tests::Topology) -> anyhow::Result<Vec<u32>> {
    let mut sides: Vec<(String, String, u32)> = topo
        .slb_interfaces()
        .into_iter()
        .map(|iface| (topo.slb_ns().to_owned(), iface, BALANCER_CPU))
        .collect();
    sides.push((topo.client_ns().to_owned(), "c0".to_owned(), GENERATOR_CPU));
    for i in 1..=topo.backend_count() {
        sides.push((
            topo.backend_ns(i).to_owned(),
            "b0".to_owned(),
            GENERATOR_CPU,
        ));
    }
    let mut pinned = 0;
    let mut generator_side = Vec::new();
    for (ns, iface, cpu) in &sides {
        // NAPI (and so its thread) exists only with GRO or XDP on a veth.
        slb_tests::exec::exec_in(ns, ["ethtool", "-K", iface, "gro", "on"])?;
        if *cpu == BALANCER_CPU {
            // veth hands a packet from a TSO-capable sender to the peer's NAPI only if the
            // packet is eligible for GRO; otherwise it goes to the backlog in softirq on the
            // sending CPU, which would put the endpoints' receive work on the balancer's CPU
            // whenever the kernel stack (nftables, HAProxy) rather than XDP forwards.
            slb_tests::exec::exec_in(ns, ["ethtool", "-K", iface, "tso", "off"])?;
        }
        // The thread is named napi/<interface>-<napi id>, and interface names repeat across
        // namespaces (every backend has a b0): ours is the one that appears now.
        let before = napi_threads(iface)?;
        slb_tests::exec::exec_in(
            ns,
            [
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{iface}/threaded"),
            ],
        )
        .with_context(|| format!("threaded NAPI on {iface} in {ns}"))?;
        for pid in napi_threads(iface)?.difference(&before) {
            pin_process(*pid, *cpu)?;
            pinned += 1;
            if *cpu == GENERATOR_CPU {
                generator_side.push(*pid);
            }
        }
    }
    ensure!(
        pinned >= sides.len(),
        "found {pinned} NAPI threads for {} interfaces",
        sides.len()
    );
    Ok(generator_side)
}

/// Kernel threads running NAPI for interfaces named `iface` (in any namespace).
fn napi_threads(iface: &str) -> anyhow::Result<std::collections::BTreeSet<u32>> {
    let prefix = format!("napi/{iface}-");
    let mut pids = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.starts_with(&prefix))
        {
            pids.insert(pid);
        }
    }
    Ok(pids)
}

/// CPU time of a process (all its threads, live and exited), in clock ticks.
pub fn process_cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name in parentheses may contain spaces; fields are counted after it.
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("unexpected {path}: {stat:?}"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); `fields[0]` is field 3.
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {}", i + 3))?
            .parse()
            .with_context(|| format!("{path} field {}", i + 3))
    };
    Ok(tick(11)? + tick(12)?)
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks_per_sec() -> anyhow::Result<f64> {
    let out = slb_tests::exec::run(std::process::Command::new("getconf").arg("CLK_TCK"))
        .context("asking getconf for CLK_TCK")?;
    out.trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {out:?}"))
}

/// (busy, total) jiffies of each of CPUs 0 and 1, from /proc/stat.
pub fn cpu_jiffies() -> anyhow::Result<[(u64, u64); 2]> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut per_cpu = [(0, 0); 2];
    for (cpu, slot) in [GENERATOR_CPU, BALANCER_CPU]
        .into_iter()
        .zip(per_cpu.iter_mut())
    {
        let label = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label.as_str()))
            .with_context(|| format!("/proc/stat has no {label} line"))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| {
                f.parse()
                    .with_context(|| format!("/proc/stat {label}: {f:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        ensure!(
            fields.len() == 8,
            "/proc/stat {label} line is short: {line:?}"
        );
        let total: u64 = fields.iter().sum();
        // idle and iowait
        *slot = (total - fields[3] - fields[4], total);
    }
    Ok(per_cpu)
}

/// How busy each of CPUs 0 and 1 was between two [`cpu_jiffies`] readings, from 0 to 1.
pub fn busy_between(before: &[(u64, u64); 2], after: &[(u64, u64); 2]) -> [f64; 2] {
    [0, 1].map(|i| {
        let (b0, t0) = before[i];
        let (b1, t1) = after[i];
        (b1 - b0) as f64 / (t1 - t0).max(1) as f64
    })
}
