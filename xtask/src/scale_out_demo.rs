//! `cargo xtask demo --scale-out`: three slb nodes behind an ECMP router, each announcing the
//! VIPs through its own BIRD over BGP with BFD; traffic spread over the nodes and the backends;
//! then one node stopped while long-lived connections stay open, and started again.
//!
//! The topology and the nodes' config are the scale-out tests' ([`slb_tests::scale_out`]).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use slb_tests::config::Protocol;
use slb_tests::scale_out::{listener_name, new_connections_per_node, NodeMode, ScaleOut};
use slb_tests::slb::Instance;
use slb_tests::traffic::{tcp_connections, udp_flows};
use slb_tests::{exec, Distribution, Family, LongLivedStreams, TrafficOptions, TrafficReport};

use crate::demo::Steps;

const NODES: usize = 3;
const STREAMS: usize = 60;
/// The node the demo stops and starts again.
const STOPPED: usize = 3;
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(15);

pub fn demo(bin_dir: &Path, connections: usize, weights: &[u32]) -> anyhow::Result<()> {
    let slb = bin_dir.join("slb");
    let server = bin_dir.join("slb-test-server");
    let steps = Steps::stopped_by_ctrl_c()?;

    steps.next(&format!(
        "creating namespaces (client, router, {NODES} slb nodes, {} backends on one segment) and \
         starting BIRD on the router and on every node (BGP with BFD, 100 ms x 3)",
        weights.len()
    ))?;
    // Declared before the nodes, so it is dropped (BIRD stopped, namespaces deleted) after
    // them.
    let scale = ScaleOut::build("demo", NODES, weights.len(), &server)?;
    let config = scale.node_config("node-k", 1, weights, NodeMode::Dsr);
    steps.next(&format!(
        "starting slb on every node, each with this config (its own instance name, BIRD socket \
         and include file):\n{}",
        config.to_toml()
    ))?;
    let started = Instant::now();
    let mut nodes = scale.start_slb(&slb, "demo", weights, NodeMode::Dsr, &[])?;
    let all: std::collections::BTreeSet<usize> = (1..=NODES).collect();
    let took = scale.wait_routed(Family::V4, &all, started, CONVERGENCE_TIMEOUT)?;
    steps.next(&format!(
        "the router's route to the VIP, {} ms after the first slb started",
        took.as_millis()
    ))?;
    print!(
        "{}",
        exec::exec_in(
            scale.segment.router_ns(),
            ["ip", "route", "show", &Family::V4.vip().to_string()]
        )?
    );

    let pool: Vec<(String, u32)> = (1..=weights.len())
        .map(|i| (slb_tests::Topology::backend_name(i), weights[i - 1]))
        .collect();
    let node_names: Vec<(String, u32)> = (1..=NODES).map(|k| (format!("node {k}"), 1)).collect();
    let mut reports = Vec::new();
    let client = scale.segment.client_ns().to_owned();
    let opts = TrafficOptions::new(connections);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let target = match protocol {
            Protocol::Udp => Family::V4.vip_udp(),
            _ => Family::V4.vip_tcp(),
        };
        let what = match protocol {
            Protocol::Udp => "UDP flows",
            _ => "TCP connections",
        };
        steps.next(&format!(
            "{connections} {what} to {target} through the router"
        ))?;
        let (report, per_node) = new_connections_per_node(
            &nodes,
            &listener_name(protocol, Family::V4),
            || match protocol {
                Protocol::Udp => udp_flows(&client, target, 20000, &opts),
                _ => tcp_connections(&client, target, &opts),
            },
        )?;
        let report = report?;
        show(&report, what, &pool, &node_names, &per_node);
        reports.push(report);
    }

    steps.next(&format!(
        "{STREAMS} long-lived TCP connections, then `slb stop` on node {STOPPED}: it withdraws \
         the VIP through BIRD, forwards on for its grace, then detaches"
    ))?;
    let mut streams = LongLivedStreams::open(
        &client,
        Family::V4.vip_tcp(),
        STREAMS,
        Duration::from_secs(5),
    )?;
    let (converged, _) = scale.stop_slb_watching(
        &mut nodes[STOPPED - 1],
        STOPPED,
        Family::V4,
        CONVERGENCE_TIMEOUT,
    )?;
    println!(
        "the router routed around node {STOPPED} {} ms after `slb stop`",
        converged.as_millis()
    );
    print!(
        "{}",
        exec::exec_in(
            scale.segment.router_ns(),
            ["ip", "route", "show", &Family::V4.vip().to_string()]
        )?
    );
    let failures = streams.ping_all();
    println!(
        "long-lived connections: {} of {STREAMS} still answered by their backends",
        STREAMS - failures.len()
    );
    ensure!(failures.is_empty(), "connections lost: {failures:?}");

    steps.next(&format!(
        "{connections} TCP connections with node {STOPPED} stopped"
    ))?;
    let (tcp, per_node) =
        new_connections_per_node(&nodes, &listener_name(Protocol::Tcp, Family::V4), || {
            tcp_connections(&client, Family::V4.vip_tcp(), &opts)
        })?;
    let tcp = tcp?;
    let serving: Vec<(String, u32)> = (1..=NODES)
        .map(|k| (format!("node {k}"), u32::from(k != STOPPED)))
        .collect();
    show(&tcp, "TCP connections", &pool, &serving, &per_node);
    reports.push(tcp);

    steps.next(&format!(
        "starting slb on node {STOPPED} again: it announces once its checks have settled"
    ))?;
    let t = Instant::now();
    nodes[STOPPED - 1].start(&[], &[])?;
    let back = scale.wait_routed(Family::V4, &all, t, CONVERGENCE_TIMEOUT)?;
    println!(
        "routed to all {NODES} nodes again after {} ms",
        back.as_millis()
    );
    let failures = streams.ping_all();
    println!(
        "long-lived connections: {} of {STREAMS} still answered by their backends",
        STREAMS - failures.len()
    );
    ensure!(failures.is_empty(), "connections lost: {failures:?}");
    show_status(&steps, &nodes[0])?;

    steps.next("stopping slb and BIRD, deleting the namespaces")?;
    drop(streams);
    drop(nodes);
    let failed: usize = reports.iter().map(|r| r.failures.len()).sum();
    ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}

fn show(
    report: &TrafficReport,
    what: &str,
    pool: &[(String, u32)],
    nodes: &[(String, u32)],
    per_node: &[u64],
) {
    println!("{}", report.summary(what));
    let node_counts = nodes
        .iter()
        .zip(per_node)
        .map(|((name, _), count)| (name.clone(), *count as usize))
        .collect();
    println!(
        "{}",
        Distribution::new(&format!("{what} per slb node"), nodes, &node_counts)
    );
    println!(
        "{}",
        Distribution::new(&format!("{what} per backend"), pool, &report.counts)
    );
}

fn show_status(steps: &Steps, node: &Instance) -> anyhow::Result<()> {
    steps.next("slb status on node 1")?;
    print!(
        "{}",
        node.cli(["status", "--instance", &node.instance])?
            .expect_success()
            .context("slb status")?
    );
    Ok(())
}
