//! `cargo bench -p slb-user --bench dataplane` (root): per-packet cost of slb's XDP program above a
//! floor program (see per_packet.rs for the method), the connection-table sweep, Maglev build
//! time, balance and disruption, control-plane apply time and daemon memory. Writes
//! target/bench/dataplane.{md,json}. Nothing here asserts a time: these are measurements.
//!
//! `SLB_BENCH_AGAINST=/path/to/other/slb` (set by `cargo xtask bench --against REV`) measures
//! that revision's program in the same run, round for round beside this build's.
//! `SLB_BENCH_ROUNDS` changes the number of rounds (31); `SLB_BENCH_QUICK=1` measures only the
//! per-packet cost with a full connection table (while working on the data plane).

#[path = "dataplane/per_packet.rs"]
mod per_packet;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use slb_common::maglev::{build_table, MaglevBackend};
use slb_common::{ipv4_mapped, Connection, FlowKey};
use slb_user::testbed::{in_fresh_netns, Testbed};

const VIP: [u8; 4] = [10, 99, 0, 10];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// The daemon's sweep of a connection table holding 1M flows: a walk that keeps every entry,
/// then one that removes them all (the prefilled entries were last seen at boot).
fn sweep_cost() -> anyhow::Result<serde_json::Value> {
    const FLOWS: u32 = 1_000_000;
    let bed = Testbed::new(
        &per_packet::config("bench", 1, 10, true, false, per_packet::Modes::NatOnly),
        65537,
    )?;
    let mut conns = slb_user::maps::PinnedMaps::open(bed.pin_dir())?.connections;
    for i in 0..FLOWS {
        let key = FlowKey {
            src: ipv4_mapped([172, 16, (i >> 8) as u8, i as u8]),
            dst: ipv4_mapped(VIP),
            src_port: (i >> 16) as u16,
            dst_port: 80,
            protocol: 6,
            _pad: [0; 3],
        };
        conns.insert(key, Connection::default(), 0)?;
    }
    let sweeper = slb_user::flows::Sweeper::open(bed.pin_dir())?;
    let mut sweeps = Vec::new();
    for (what, timeout_s) in [
        ("walk, nothing expires", u32::MAX),
        ("walk and remove all", 10),
    ] {
        let timeouts = slb_user::flows::Timeouts::from([(0, timeout_s)]);
        let started = Instant::now();
        let counts = sweeper.sweep(&timeouts, &[0], &[0])?;
        sweeps.push(json!({
            "sweep": what,
            "flows": FLOWS,
            "ms": started.elapsed().as_secs_f64() * 1000.0,
            "entries_left": counts.entries,
            "removed": counts.expired,
        }));
    }
    Ok(json!(sweeps))
}

fn maglev_suite() -> serde_json::Value {
    let mut rows = Vec::new();
    for &m in &[65537u32, 655373] {
        for &n in &[10usize, 100, 1000] {
            let ids: Vec<String> = (0..n)
                .map(|i| format!("10.1.{}.{}:8080", i / 256, i % 256))
                .collect();
            let backends = |skip: Option<usize>| -> Vec<MaglevBackend<'_>> {
                ids.iter()
                    .enumerate()
                    .map(|(i, id)| MaglevBackend {
                        identity: id.as_bytes(),
                        weight: if Some(i) == skip { 0 } else { 1 },
                    })
                    .collect()
            };
            let mut times = Vec::new();
            let mut table = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                table = build_table(&backends(None), m).expect("table");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let mut counts = vec![0usize; n];
            for &s in &table {
                counts[s as usize] += 1;
            }
            let ideal = f64::from(m) / n as f64;
            let max_dev = counts
                .iter()
                .map(|&c| (c as f64 - ideal).abs() / ideal)
                .fold(0.0, f64::max);
            let removed = build_table(&backends(Some(n / 2)), m).expect("table");
            let moved_remove =
                table.iter().zip(&removed).filter(|(a, b)| a != b).count() as f64 / f64::from(m);
            rows.push(json!({
                "table_size": m,
                "backends": n,
                "build_ms": median(&mut times),
                "max_share_deviation_pct": max_dev * 100.0,
                // Stateless tables: adding backend n/2 back compares the same two tables.
                "moved_on_remove_or_add": moved_remove,
                "ideal": 1.0 / n as f64,
                "ratio_to_ideal": moved_remove * n as f64,
            }));
        }
    }
    json!(rows)
}

/// A `/proc/<pid>/status` field in KiB: `VmRSS` (all resident pages, including the mapped
/// RINGS, which is kernel memory shared with the program) or `RssAnon` (the daemon's own heap).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Apply time of a 50 × 100 config into the maps, and the daemon's memory idle and under it.
fn control_plane() -> anyhow::Result<serde_json::Value> {
    let big = per_packet::config("bench", 50, 100, true, false, per_packet::Modes::NatOnly);
    let t = Instant::now();
    let bed = Testbed::new(&big, 65537)?;
    let setup_and_apply = t.elapsed();
    // Apply once more with every weight changed, so every ring is rebuilt.
    let reweighted = big.replace(" },", ", weight = 2 },");
    let mut reconciler_config = slb_user::config::Config::parse(&reweighted, "bench")?;
    reconciler_config.instance = "bench".parse().expect("a valid instance name");
    let mut bed = bed;
    let t = Instant::now();
    bed.reconciler
        .apply(&reconciler_config, &Default::default())?;
    let reapply = t.elapsed();
    drop(bed);

    // The real daemon, idle (no listeners) and under the big config.
    let slb = env!("CARGO_BIN_EXE_slb");
    let mut rss = Vec::new();
    let instance = format!("bench-rss-{}", std::process::id());
    for (what, text) in [
        (
            "idle (no listeners)",
            per_packet::config(&instance, 0, 1, true, false, per_packet::Modes::NatOnly),
        ),
        (
            "50 listeners x 100 backends",
            per_packet::config(&instance, 50, 100, true, false, per_packet::Modes::NatOnly),
        ),
    ] {
        let started = Instant::now();
        let daemon = per_packet::Daemon::spawn(std::path::Path::new(slb), &instance, &text, None)?;
        let ready = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let kib = status_kib(daemon.pid(), "VmRSS");
        let anon_kib = status_kib(daemon.pid(), "RssAnon");
        drop(daemon);
        rss.push(json!({"config": what, "rss_kib": kib, "rss_anon_kib": anon_kib, "start_to_ready_ms": ready.as_secs_f64() * 1000.0}));
    }
    Ok(json!({
        "setup_and_first_apply_50x100_ms": setup_and_apply.as_secs_f64() * 1000.0,
        "reapply_all_rings_50x100_ms": reapply.as_secs_f64() * 1000.0,
        "daemon": rss,
    }))
}

fn main() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        println!("dataplane bench skipped: needs root (BPF_PROG_TEST_RUN, namespaces)");
        return Ok(());
    }
    let started = Instant::now();
    let rounds: usize = match std::env::var("SLB_BENCH_ROUNDS") {
        Ok(text) => text
            .parse()
            .context("SLB_BENCH_ROUNDS: a number of rounds")?,
        Err(_) => 31,
    };
    // Only what the control plane may leave in its own namespace differs between shapes; the
    // first one is the table of the goals (a full connection table).
    let shapes = [
        per_packet::Shape {
            label: "1 listener, 10 backends, connection table full (1M flows)",
            listeners: 1,
            backends: 10,
            prefill: 1 << 20,
            scaling: true,
        },
        per_packet::Shape {
            label: "50 listeners, 10 backends",
            listeners: 50,
            backends: 10,
            prefill: 0,
            scaling: false,
        },
        per_packet::Shape {
            label: "1 listener, 1000 backends",
            listeners: 1,
            backends: 1000,
            prefill: 0,
            scaling: false,
        },
    ];
    let quick = std::env::var_os("SLB_BENCH_QUICK").is_some();
    let subjects = per_packet::subjects();
    let mut per_packet_results = Vec::new();
    let measured = if quick { 1 } else { shapes.len() };
    for shape in shapes.into_iter().take(measured) {
        let subjects = subjects.clone();
        // Each shape gets a thread of its own: the measurement leaves it in other namespaces.
        per_packet_results.push(
            std::thread::spawn(move || per_packet::measure(shape, &subjects, rounds))
                .join()
                .map_err(|_| anyhow::anyhow!("the per-packet measurement panicked"))??,
        );
    }
    if quick {
        for table in &per_packet_results {
            println!("{}", per_packet::markdown(table));
        }
        return Ok(());
    }
    let sweeps = in_fresh_netns(sweep_cost)?;
    let maglev = maglev_suite();
    let control = in_fresh_netns(control_plane)?;

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Per-packet cost (ns above the baseline, median of {rounds} rounds)\n\n\
         A wrapper restores the frame and tail-calls the program a running `slb run` pinned; \
         BPF_PROG_TEST_RUN repeats it 100 000 times per figure, and the kernel's mean per run \
         minus that of the same wrapper tail-calling a floor program (MAC swap, XDP_TX), run just \
         before and after, is the packet's cost. Rounds alternate between programs.\n"
    );
    for table in &per_packet_results {
        md.push_str(&per_packet::markdown(table));
    }
    for s in sweeps.as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "- connection-table sweep of {} flows ({}): {:.0} ms; {} removed, {} left",
            s["flows"],
            s["sweep"].as_str().unwrap_or(""),
            s["ms"].as_f64().unwrap_or(0.0),
            s["removed"],
            s["entries_left"]
        );
    }
    md.push('\n');
    let _ = writeln!(md, "## Maglev\n\n| M | N | build ms | max share deviation | moved on remove/add | ideal 1/N | ratio |\n|---:|---:|---:|---:|---:|---:|---:|");
    for r in maglev.as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.2}% | {:.4} | {:.4} | {:.2} |",
            r["table_size"],
            r["backends"],
            r["build_ms"].as_f64().unwrap_or(0.0),
            r["max_share_deviation_pct"].as_f64().unwrap_or(0.0),
            r["moved_on_remove_or_add"].as_f64().unwrap_or(0.0),
            r["ideal"].as_f64().unwrap_or(0.0),
            r["ratio_to_ideal"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        md,
        "\n## Control plane\n\n- setup + first apply of 50 listeners × 100 backends: {:.0} ms\n- re-apply with every ring rebuilt: {:.0} ms",
        control["setup_and_first_apply_50x100_ms"].as_f64().unwrap_or(0.0),
        control["reapply_all_rings_50x100_ms"].as_f64().unwrap_or(0.0)
    );
    for d in control["daemon"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "- daemon, {}: RSS {} KiB (own heap, RssAnon: {} KiB; the rest is mostly the mapped rings, kernel memory), start to ready {:.0} ms",
            d["config"].as_str().unwrap_or(""),
            d["rss_kib"],
            d["rss_anon_kib"],
            d["start_to_ready_ms"].as_f64().unwrap_or(0.0)
        );
    }
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("dataplane.md"), &md)?;
    std::fs::write(
        out_dir.join("dataplane.json"),
        serde_json::to_vec_pretty(
            &json!({"per_packet": per_packet_results, "sweeps": sweeps, "maglev": maglev, "control_plane": control}),
        )?,
    )?;
    println!(
        "{md}\n(written to target/bench/dataplane.{{md,json}} in {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
