//! `cargo xtask demo`: namespaces (client, slb, backends), slb with a dual-stack listener pair
//! (TCP and UDP on an IPv4 VIP and the same on an IPv6 VIP, each over the same backends and
//! weights), traffic of both families, and the distributions over the backends.
//!
//! The topology, the config and the traffic generators are the test harness's
//! (`slb_tests`), which are dual stack: the demo only picks the families and prints.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Context as _};
use slb_tests::slb::unique_instance;
use slb_tests::traffic::{tcp_connections, udp_flows};
use slb_tests::{
    Distribution, Family, SlbConfig, SlbDaemon, Topology, TrafficOptions, TrafficReport,
};

/// UDP source ports of the flows: IPv4 from this one up, IPv6 likewise (a socket per flow).
const UDP_BASE_PORT: u16 = 20000;

pub fn demo(bin_dir: &Path, connections: usize, weights: &[u32]) -> anyhow::Result<()> {
    let slb = bin_dir.join("slb");
    let server = bin_dir.join("slb-test-server");
    let steps = Steps::stopped_by_ctrl_c()?;

    // Declared before the daemon, so it is dropped (namespaces deleted) after the daemon stops.
    steps.next(&format!(
        "creating namespaces (client, slb, {} backends, IPv4 and IPv6) and starting the backend \
         servers",
        weights.len()
    ))?;
    let topo = Topology::builder()
        .tag("demo")
        .backends(weights.len())
        .test_servers(&server)
        .build()?;
    let config = SlbConfig::standard_dual_stack(&unique_instance("demo"), weights);
    steps.next(&format!(
        "starting slb in namespace {} with this config:\n{}",
        topo.slb_ns(),
        config.to_toml()
    ))?;
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config)?;
    let pool = config.pool_weights();
    let mut reports = Vec::new();
    for family in [Family::V4, Family::V6] {
        reports.extend(family_traffic(&steps, &topo, family, connections, &pool)?);
    }
    print_status(&steps, &daemon)?;

    steps.next("stopping slb and deleting the namespaces")?;
    let exit = daemon.stop()?;
    println!("slb exited: {exit}");
    let failed: Vec<String> = reports
        .iter()
        .filter(|(_, r)| !r.failures.is_empty())
        .map(|(what, r)| format!("{} {what}", r.failures.len()))
        .collect();
    ensure!(failed.is_empty(), "requests failed: {}", failed.join(", "));
    Ok(())
}

/// `connections` TCP connections, then as many UDP flows, to the `family` VIP from the client
/// namespace, each printed as a summary and the distribution over the backends of `pool`.
fn family_traffic(
    steps: &Steps,
    topo: &Topology,
    family: Family,
    connections: usize,
    pool: &[(String, u32)],
) -> anyhow::Result<[(String, TrafficReport); 2]> {
    let name = family.name();
    let opts = TrafficOptions::new(connections);
    steps.next(&format!(
        "{connections} {name} TCP connections to {}",
        family.vip_tcp()
    ))?;
    let tcp = tcp_connections(topo.client_ns(), family.vip_tcp(), &opts)?;
    let tcp_what = format!("{name} TCP");
    println!("{}", tcp.summary(&tcp_what));
    println!(
        "{}",
        Distribution::new(
            &format!("{name} TCP connections per backend"),
            pool,
            &tcp.counts
        )
    );

    steps.next(&format!(
        "{connections} {name} UDP flows to {}",
        family.vip_udp()
    ))?;
    let udp = udp_flows(topo.client_ns(), family.vip_udp(), UDP_BASE_PORT, &opts)?;
    let udp_what = format!("{name} UDP");
    println!("{}", udp.summary(&udp_what));
    println!(
        "{}",
        Distribution::new(&format!("{name} UDP flows per backend"), pool, &udp.counts)
    );
    Ok([(tcp_what, tcp), (udp_what, udp)])
}

/// The demo's steps, announced one by one; after a Ctrl-C, the next one fails instead, so the
/// demo stops and cleans up.
pub struct Steps {
    interrupted: Arc<AtomicBool>,
}

impl Steps {
    pub fn stopped_by_ctrl_c() -> anyhow::Result<Self> {
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        ctrlc::set_handler(move || {
            if !flag.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted: stopping after the current step and cleaning up");
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Self { interrupted })
    }

    pub fn next(&self, what: &str) -> anyhow::Result<()> {
        ensure!(!self.interrupted.load(Ordering::SeqCst), "interrupted");
        println!("==> {what}");
        Ok(())
    }
}

fn print_status(steps: &Steps, daemon: &SlbDaemon) -> anyhow::Result<()> {
    steps.next("slb status")?;
    let instance = daemon.instance().to_owned();
    print!(
        "{}",
        daemon
            .cli(["status", "--instance", &instance])?
            .expect_success()?
    );
    steps.next("slb report distribution")?;
    print!(
        "{}",
        daemon
            .cli(["report", "distribution", "--instance", &instance])?
            .expect_success()?
    );
    Ok(())
}
