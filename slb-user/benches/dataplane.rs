//! `cargo bench -p slb-user --bench dataplane` (root): per-packet cost of slb's XDP program next to
//! a floor program, with table sizes; Maglev build time, balance and disruption; control-plane
//! apply time and daemon memory. Writes target/bench/dataplane.{md,json}. Nothing here asserts a
//! time: these are measurements.
//!
//! Per-packet cost: BPF_PROG_TEST_RUN with repeat = 1, many times, taking the kernel's own
//! measurement of each run. (With repeat > 1 the kernel re-runs the program on the frame it
//! already rewrote, which measures the wrong path for a NAT program.)

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::json;
use slb_common::maglev::{build_table, MaglevBackend};
use slb_common::wire::{ipv4_frame, parse_ipv4_frame, L4Spec, TCP_ACK, TCP_SYN};
use slb_common::{ipv4_mapped, Connection, FlowKey};
use slb_user::testbed::{in_fresh_netns, Testbed, CLIENT_MAC, FLOOR_PROGRAM};

const BATCHES: usize = 7;
const RUNS_PER_BATCH: usize = 3000;
const VIP: [u8; 4] = [10, 99, 0, 10];

struct Stat {
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Median of batch medians, with the spread of the batch medians.
fn measure(mut run_once: impl FnMut(usize) -> Duration) -> Stat {
    let mut batch_medians = Vec::new();
    let mut i = 0;
    for _ in 0..BATCHES {
        let mut samples: Vec<f64> = (0..RUNS_PER_BATCH)
            .map(|_| {
                i += 1;
                run_once(i).as_nanos() as f64
            })
            .collect();
        batch_medians.push(median(&mut samples));
    }
    let min = batch_medians.iter().cloned().fold(f64::MAX, f64::min);
    let max = batch_medians.iter().cloned().fold(0.0, f64::max);
    Stat {
        median_ns: median(&mut batch_medians),
        min_ns: min,
        max_ns: max,
    }
}

/// `listeners` TCP listeners (VIP:80, 81, ...) and a UDP one (VIP:53), each over the same
/// `backends` servers; TCP listener `l` reaches them on port 8080 + l (a backend endpoint serves
/// one tcp/udp listener), the UDP one on 8080.
fn config(listeners: usize, backends: usize) -> String {
    let mut c = String::from(
        "instance = \"bench\"\nmax_connections = 1048576\n[[interfaces]]\nname = \"in0\"\n",
    );
    for l in 0..listeners {
        let _ = write!(
            c,
            "[[listeners]]\nname = \"tcp{l}\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = {}\ngroup = \"pool{l}\"\n",
            80 + l
        );
    }
    let _ = write!(c, "[[listeners]]\nname = \"udp\"\nprotocol = \"udp\"\nvip = \"10.99.0.10\"\nport = 53\ngroup = \"pool0\"\n");
    for l in 0..listeners.max(1) {
        let _ = write!(c, "[[groups]]\nname = \"pool{l}\"\nbackends = [\n");
        for b in 0..backends {
            let _ = writeln!(
                c,
                "  {{ address = \"10.20.{}.{}\", port = {} }},",
                b / 253,
                2 + b % 253,
                8080 + l
            );
        }
        c.push_str("]\n");
    }
    c
}

fn client(i: usize) -> [u8; 4] {
    [10, 10, (i >> 16) as u8, 2]
}

/// Per-packet costs for one table shape.
fn per_packet(
    label: &str,
    listeners: usize,
    backends: usize,
    fill_connections: usize,
) -> anyhow::Result<serde_json::Value> {
    let bed = Testbed::new(&config(listeners, backends), 65537)?;
    let mac = bed.in_mac;
    if fill_connections > 0 {
        let mut conns = slb_user::maps::PinnedMaps::open(bed.pin_dir())?.connections;
        for i in 0..fill_connections as u32 {
            let key = FlowKey {
                src: ipv4_mapped([172, 16, (i >> 8) as u8, i as u8]),
                dst: ipv4_mapped(VIP),
                src_port: (i >> 16) as u16,
                dst_port: 80,
                protocol: 6,
                _pad: [0; 3],
            };
            conns.insert(
                key,
                Connection {
                    backend_id: 0,
                    listener_index: 0,
                    last_seen_ns: 0,
                    ..Default::default()
                },
                0,
            )?;
        }
    }
    let est_tcp = ipv4_frame(
        mac,
        CLIENT_MAC,
        client(0),
        VIP,
        L4Spec::tcp(40000, 80, TCP_ACK),
    );
    let est_udp = ipv4_frame(mac, CLIENT_MAC, client(0), VIP, L4Spec::udp(40000, 53));
    let other = ipv4_frame(
        mac,
        CLIENT_MAC,
        client(0),
        VIP,
        L4Spec::tcp(40000, 22, TCP_SYN),
    );
    // Establish the flows and learn the backend the TCP one went to, for the reply.
    let first = bed.run_program("slb_xdp", &est_tcp, bed.in_index)?;
    let backend = parse_ipv4_frame(&first.frame).map_err(anyhow::Error::msg)?;
    bed.run_program("slb_xdp", &est_udp, bed.in_index)?;
    let reply = ipv4_frame(
        bed.out_mac,
        [2, 0, 0, 0, 0, 2],
        backend.dst,
        client(0),
        L4Spec::tcp(8080, 40000, TCP_ACK),
    );

    let run = |program: &str, frame: &[u8], ingress: u32| {
        bed.run_program(program, frame, ingress)
            .expect("test run")
            .duration
    };
    let floor = measure(|_| run(FLOOR_PROGRAM, &est_tcp, bed.in_index));
    let scenarios: Vec<(&str, Stat)> = vec![
        (
            "established TCP",
            measure(|_| run("slb_xdp", &est_tcp, bed.in_index)),
        ),
        (
            "new flow (SYN)",
            measure(|i| {
                let f = ipv4_frame(
                    mac,
                    CLIENT_MAC,
                    client(i),
                    VIP,
                    L4Spec::tcp((i % 60000) as u16 + 1024, 80, TCP_SYN),
                );
                run("slb_xdp", &f, bed.in_index)
            }),
        ),
        (
            "established UDP",
            measure(|_| run("slb_xdp", &est_udp, bed.in_index)),
        ),
        (
            "return path",
            measure(|_| run("slb_xdp", &reply, bed.out_index)),
        ),
        (
            "not for a listener",
            measure(|_| run("slb_xdp", &other, bed.in_index)),
        ),
    ];
    let mut rows = vec![
        json!({"scenario": "floor (MAC swap + XDP_TX)", "median_ns": floor.median_ns, "min_ns": floor.min_ns, "max_ns": floor.max_ns, "ratio_to_floor": 1.0}),
    ];
    for (name, s) in scenarios {
        rows.push(json!({
            "scenario": name,
            "median_ns": s.median_ns,
            "min_ns": s.min_ns,
            "max_ns": s.max_ns,
            "ratio_to_floor": s.median_ns / floor.median_ns,
        }));
    }
    // The daemon's sweep of the connection table: a walk that keeps every entry, then one that
    // removes them all (the prefilled entries were last seen at boot).
    let mut sweeps = Vec::new();
    if fill_connections > 0 {
        let sweeper = slb_user::flows::Sweeper::open(bed.pin_dir())?;
        for (what, timeout_s) in [
            ("walk, nothing expires", u32::MAX),
            ("walk and remove all", 10),
        ] {
            let timeouts = slb_user::flows::Timeouts::from([(0, timeout_s)]);
            let started = Instant::now();
            let counts = sweeper.sweep(&timeouts, &[0], &[0])?;
            sweeps.push(json!({
                "sweep": what,
                "ms": started.elapsed().as_secs_f64() * 1000.0,
                "entries_left": counts.entries,
                "removed": counts.expired,
            }));
        }
    }
    Ok(
        json!({"tables": label, "listeners": listeners, "backends": backends, "connections_prefilled": fill_connections, "rows": rows, "sweeps": sweeps}),
    )
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
    let big = config(50, 100);
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
    for (what, text) in [
        ("idle (no listeners)", config(0, 1)),
        ("50 listeners x 100 backends", big.clone()),
    ] {
        let dir = tempfile_dir()?;
        let instance = format!("bench-rss-{}", std::process::id());
        let text = text.replace(
            "instance = \"bench\"",
            &format!("instance = \"{instance}\""),
        );
        let path = dir.join("slb.toml");
        std::fs::write(&path, text)?;
        let started = Instant::now();
        let mut child = std::process::Command::new(slb)
            .args(["run", "-c", path.to_str().expect("utf-8")])
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let state = std::path::Path::new("/run/slb")
            .join(&instance)
            .join("state.json");
        while !state.exists() && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ready = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let kib = status_kib(child.id(), "VmRSS");
        let anon_kib = status_kib(child.id(), "RssAnon");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        rss.push(json!({"config": what, "rss_kib": kib, "rss_anon_kib": anon_kib, "start_to_ready_ms": ready.as_secs_f64() * 1000.0}));
    }
    Ok(json!({
        "setup_and_first_apply_50x100_ms": setup_and_apply.as_secs_f64() * 1000.0,
        "reapply_all_rings_50x100_ms": reapply.as_secs_f64() * 1000.0,
        "daemon": rss,
    }))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "slb-bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn main() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        println!("dataplane bench skipped: needs root (BPF_PROG_TEST_RUN, namespaces)");
        return Ok(());
    }
    let started = Instant::now();
    let shapes: [(&str, usize, usize, usize); 4] = [
        ("1 listener, 10 backends", 1, 10, 0),
        ("50 listeners, 10 backends", 50, 10, 0),
        ("1 listener, 1000 backends", 1, 1000, 0),
        ("1 listener, 10 backends, 1M connections", 1, 10, 1_000_000),
    ];
    let mut per_packet_results = Vec::new();
    for (label, listeners, backends, connections) in shapes {
        // Each shape gets a namespace (and testbed) of its own.
        per_packet_results.push(in_fresh_netns(move || {
            per_packet(label, listeners, backends, connections)
        })?);
    }
    let maglev = maglev_suite();
    let control = in_fresh_netns(control_plane)?;

    let mut md = String::new();
    let _ = writeln!(md, "## Per-packet cost (BPF_PROG_TEST_RUN, kernel-measured, median of {BATCHES} batch medians of {RUNS_PER_BATCH} runs)\n");
    for table in &per_packet_results {
        let _ = writeln!(
            md,
            "### {}\n\n| scenario | ns/packet | min–max | × floor |\n|---|---:|---:|---:|",
            table["tables"].as_str().unwrap_or("")
        );
        for r in table["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0}–{:.0} | {:.2} |",
                r["scenario"].as_str().unwrap_or(""),
                r["median_ns"].as_f64().unwrap_or(0.0),
                r["min_ns"].as_f64().unwrap_or(0.0),
                r["max_ns"].as_f64().unwrap_or(0.0),
                r["ratio_to_floor"].as_f64().unwrap_or(0.0)
            );
        }
        for s in table["sweeps"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "- connection-table sweep ({}): {:.0} ms; {} removed, {} left",
                s["sweep"].as_str().unwrap_or(""),
                s["ms"].as_f64().unwrap_or(0.0),
                s["removed"],
                s["entries_left"]
            );
        }
        md.push('\n');
    }
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
            &json!({"per_packet": per_packet_results, "maglev": maglev, "control_plane": control}),
        )?,
    )?;
    println!(
        "{md}\n(written to target/bench/dataplane.{{md,json}} in {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
