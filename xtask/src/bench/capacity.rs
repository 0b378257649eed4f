//! Capacity suite: how many frames per second one CPU can balance, with the load generator out
//! of the picture. `xdp_replay` (slb-user/examples) pushes one UDP frame over and over into the
//! balancer namespace's client-side interface with BPF_PROG_TEST_RUN in live-frames mode, the
//! kernel's own packet generator, from a thread pinned to the balancer CPU; the frames then take
//! (a) slb's XDP program, which rewrites and redirects them to a backend (NAT), or sends them
//! unchanged to a backend's MAC address (DSR, the cheapest path: no rewrite, no reply), or (b) the kernel
//! stack with nftables DNAT, or (c) the kernel stack routing them unchanged (the floor of
//! forwarding without a balancer). Each with one flow and with a new flow per frame. The
//! backends' interfaces count what arrives.

use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::process::Command;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::json;
use slb_tests::exec;
use slb_tests::slb::{pin_dir, unique_instance};
use slb_tests::{vip_udp, SlbConfig, SlbDaemon, Topology, CLIENT_ADDR, VIP, VIP_UDP_PORT};

use super::l4::{with_nft_dnat, WEIGHTS};
use super::{place_network_processing, BenchEnv, Section, BALANCER_CPU, GENERATOR_CPU};

const FRAMES: u32 = 3_000_000;
const CLIENT_PORT: u16 = 40000;

#[derive(Debug, Clone, Copy, Deserialize)]
struct Replay {
    ns_per_frame: f64,
    frames_per_second: f64,
}

#[derive(Debug, Clone)]
struct Row {
    path: &'static str,
    /// CPUs pushing frames at once.
    cpus: usize,
    flows: &'static str,
    replay: Replay,
    delivered: f64,
}

fn counter(topo: &Topology, ns: &str, iface: &str, what: &str) -> anyhow::Result<u64> {
    let out = topo.exec_in(
        ns,
        ["cat", &format!("/sys/class/net/{iface}/statistics/{what}")],
    )?;
    Ok(out.trim().parse()?)
}

fn backend_rx(topo: &Topology) -> anyhow::Result<u64> {
    (1..=topo.backend_count())
        .map(|i| counter(topo, topo.backend_ns(i), "b0", "rx_packets"))
        .sum()
}

fn mac(topo: &Topology, ns: &str, iface: &str) -> anyhow::Result<String> {
    Ok(topo
        .exec_in(ns, ["cat", &format!("/sys/class/net/{iface}/address")])?
        .trim()
        .to_owned())
}

struct Replayer<'a> {
    env: &'a BenchEnv,
    topo: &'a Topology,
    client_mac: String,
}

impl Replayer<'_> {
    /// The driver on `cpu`, sending from its own client port (one flow per CPU, as RSS spreads
    /// flows over CPUs; new flows are distinct per CPU too).
    fn command(
        &self,
        cpu: u32,
        target: &str,
        dst: SocketAddrV4,
        pins: Option<&std::path::Path>,
        new_flows: bool,
    ) -> Command {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpu.to_string()])
            .arg(self.env.bin("examples/xdp_replay"))
            .args(["--netns", self.topo.slb_ns(), "--target", target])
            .args(["--iface", "s0", "--src-mac", &self.client_mac])
            .args([
                "--src",
                &SocketAddrV4::new(CLIENT_ADDR, CLIENT_PORT + cpu as u16).to_string(),
            ])
            .args(["--dst", &dst.to_string()])
            .args(["--frames", &FRAMES.to_string()]);
        if let Some(pins) = pins {
            cmd.arg("--pins").arg(pins);
        }
        if new_flows {
            cmd.arg("--new-flows");
        }
        cmd
    }

    /// Pushes `FRAMES` frames from the balancer CPU, or from each of both CPUs at once.
    fn run(
        &self,
        path: &'static str,
        target: &str,
        dst: SocketAddrV4,
        pins: Option<&std::path::Path>,
        new_flows: bool,
        both_cpus: bool,
    ) -> anyhow::Result<Row> {
        let cpus: &[u32] = if both_cpus {
            &[GENERATOR_CPU, BALANCER_CPU]
        } else {
            &[BALANCER_CPU]
        };
        // Loading takes a moment: the drivers start pushing together, 2 s from now.
        let start_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            + 2000;
        let before = backend_rx(self.topo)?;
        let outputs = std::thread::scope(|scope| {
            let runs: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    let mut cmd = self.command(cpu, target, dst, pins, new_flows);
                    if both_cpus {
                        cmd.args(["--start-at-unix-ms", &start_at.to_string()]);
                    }
                    scope.spawn(move || exec::run(&mut cmd))
                })
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("driver thread"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let after = backend_rx(self.topo)?;
        let mut replays = Vec::new();
        for out in &outputs {
            let replay: Replay = serde_json::from_str(out.trim())
                .with_context(|| format!("xdp_replay printed {out:?}"))?;
            replays.push(replay);
        }
        // Frames of all drivers over the time the slowest took.
        let frames = f64::from(FRAMES) * replays.len() as f64;
        let slowest_ns = replays.iter().map(|r| r.ns_per_frame).fold(0.0, f64::max);
        let replay = Replay {
            ns_per_frame: slowest_ns / replays.len() as f64,
            frames_per_second: frames / (slowest_ns * f64::from(FRAMES) / 1e9),
        };
        let row = Row {
            path,
            cpus: cpus.len(),
            flows: if new_flows {
                "new flow per frame"
            } else {
                "one flow"
            },
            delivered: (after - before) as f64 / frames,
            replay,
        };
        println!(
            "    {:28} {} CPU {:20} {:>7.0} ns/frame {:>6.2} Mframes/s  delivered {:.1}%",
            row.path,
            row.cpus,
            row.flows,
            row.replay.ns_per_frame,
            row.replay.frames_per_second / 1e6,
            row.delivered * 100.0
        );
        Ok(row)
    }
}

pub fn run(env: &BenchEnv) -> anyhow::Result<Section> {
    let topo = Topology::builder()
        .tag("bcap")
        .backends(WEIGHTS.len())
        .build()?;
    place_network_processing(&topo)?;
    let replayer = Replayer {
        env,
        topo: &topo,
        client_mac: mac(&topo, topo.client_ns(), "c0")?,
    };
    let vip = match vip_udp() {
        std::net::SocketAddr::V4(v) => v,
        std::net::SocketAddr::V6(_) => unreachable!("the test VIP is IPv4"),
    };
    let mut rows = Vec::new();

    // (a) slb, on the maps of a running instance.
    {
        let config = SlbConfig::standard(&unique_instance("bcap"), &WEIGHTS);
        let daemon = SlbDaemon::start(&env.slb(), topo.slb_ns(), &config)?;
        let pins = pin_dir(daemon.instance());
        for both_cpus in [false, true] {
            for new_flows in [false, true] {
                rows.push(replayer.run(
                    "slb (XDP)",
                    "slb",
                    vip,
                    Some(&pins),
                    new_flows,
                    both_cpus,
                )?);
            }
        }
        daemon.stop()?;
    }
    // (a') slb with the UDP listener forwarding by direct return (the backends on the listener's
    // port, on links of slb's own). Its required check probes servers that do not exist; at
    // this interval it declares nothing during the run.
    {
        let instance = unique_instance("bcapd");
        let mut config = SlbConfig::new(&instance, WEIGHTS.len());
        let backends = WEIGHTS
            .iter()
            .enumerate()
            .map(|(k, &weight)| slb_tests::config::BackendSpec {
                address: Topology::backend_addr(k + 1).into(),
                port: None,
                weight,
                max_connections: None,
            })
            .collect();
        config.groups.push(slb_tests::config::group(
            "pool",
            slb_tests::config::GroupKind::Vserver,
            backends,
        ));
        let mut l = slb_tests::config::listener(
            "udp-dsr",
            slb_tests::config::Protocol::Udp,
            VIP_UDP_PORT,
            Some("pool"),
        );
        l.forwarding = slb_tests::config::Forwarding::Dsr;
        l.health_check = Some(slb_tests::config::health_check(
            slb_tests::config::CheckKind::Udp,
            std::time::Duration::from_secs(300),
            std::time::Duration::from_secs(1),
            1,
            10,
        ));
        config.listener(l);
        let daemon = SlbDaemon::start(&env.slb(), topo.slb_ns(), &config)?;
        let pins = pin_dir(daemon.instance());
        for new_flows in [false, true] {
            rows.push(replayer.run("slb DSR (XDP)", "slb", vip, Some(&pins), new_flows, false)?);
        }
        daemon.stop()?;
    }
    // (b) nftables DNAT, the same rules as the L4 suite.
    rows.extend(with_nft_dnat(&topo, || {
        [false, true]
            .into_iter()
            .map(|new_flows| replayer.run("nftables DNAT", "stack", vip, None, new_flows, false))
            .collect::<anyhow::Result<Vec<_>>>()
    })?);
    // (c) plain forwarding to one backend, no balancer.
    let backend = SocketAddrV4::new(Topology::backend_addr(1), VIP_UDP_PORT);
    for new_flows in [false, true] {
        rows.push(replayer.run(
            "kernel routing, no balancer",
            "stack",
            backend,
            None,
            new_flows,
            false,
        )?);
    }
    Ok(section(&rows))
}

fn section(rows: &[Row]) -> Section {
    let mut md = String::from("## Capacity: frames a CPU balances (live-frames generator)\n\n");
    let _ = writeln!(
        md,
        "`xdp_replay` pushes {FRAMES} 64-byte UDP frames (to {VIP}:{VIP_UDP_PORT}) into the \
         balancer namespace's client-side veth with BPF_PROG_TEST_RUN in live-frames mode, from \
         a thread on CPU {BALANCER_CPU} (with 2 CPUs: one driver on each CPU at once, each with \
         flows of its own); each frame is balanced and transmitted to a backend's veth within \
         that call, so ns/frame is the whole cost of balancing one packet, without a user-space \
         generator (with 2 CPUs: the slower driver's time over all frames). \"Delivered\" is \
         what the backends' interfaces received (a veth ring overflows when the receiving CPU \
         falls behind).\n"
    );
    md.push_str(
        "| path | CPUs | flows | ns/frame | Mframes/s | delivered |\n|---|---:|---|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.2} | {:.1}% |",
            r.path,
            r.cpus,
            r.flows,
            r.replay.ns_per_frame,
            r.replay.frames_per_second / 1e6,
            r.delivered * 100.0
        );
    }
    let find = |path: &str, cpus: usize, flows: &str| {
        rows.iter()
            .find(|r| r.path.starts_with(path) && r.cpus == cpus && r.flows == flows)
            .map(|r| r.replay.frames_per_second)
    };
    md.push('\n');
    for flows in ["one flow", "new flow per frame"] {
        if let (Some(slb), Some(nft)) = (find("slb", 1, flows), find("nftables", 1, flows)) {
            let _ = writeln!(
                md,
                "slb / nftables, one CPU, {flows}: ×{:.2} frames per second.  ",
                slb / nft
            );
        }
        if let (Some(nat), Some(dsr)) = (find("slb (XDP)", 1, flows), find("slb DSR", 1, flows)) {
            let _ = writeln!(
                md,
                "slb DSR / slb NAT, one CPU, {flows}: ×{:.2} frames per second.  ",
                dsr / nat
            );
        }
        if let (Some(one), Some(two)) = (find("slb", 1, flows), find("slb", 2, flows)) {
            let _ = writeln!(
                md,
                "slb from 1 to 2 CPUs, {flows}: ×{:.2} frames per second.  ",
                two / one
            );
        }
    }
    let json = json!({
        "frames": FRAMES,
        "rows": rows.iter().map(|r| json!({
            "path": r.path,
            "cpus": r.cpus,
            "flows": r.flows,
            "ns_per_frame": r.replay.ns_per_frame,
            "frames_per_second": r.replay.frames_per_second,
            "delivered": r.delivered,
        })).collect::<Vec<_>>(),
    });
    Section { markdown: md, json }
}
