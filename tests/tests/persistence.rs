//! Source-address persistence pins every connection of a client address to one backend; a
//! listener on the same backends without persistence spreads them by weight.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use slb_tests::config::{listener, Persistence, Protocol, TCP_LISTENER};
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::SHARE_TOLERANCE_PP;
use slb_tests::{
    require_root, vip_tcp, Distribution, SlbConfig, SlbDaemon, Topology, TrafficOptions, VIP,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const SPREAD_PORT: u16 = 81;
/// Connections for the spread check. With 600, a share's standard deviation is about 2 points
/// and 2 of 40 batches measured here went past 5 points; with 1800 it is about 1.2 points.
const SPREAD_CONNECTIONS: usize = 1800;

#[test]
fn persistence_pins_a_client_address() {
    require_root("persistence_pins_a_client_address");
    let slb = slb_binary();
    let weights = [1, 2, 3];
    let topo = Topology::builder()
        .tag("pers")
        .backends(weights.len())
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("pers"), &weights);
    config.listener_mut(TCP_LISTENER).persistence = Some(Persistence {
        timeout: Duration::from_secs(60),
        ipv6_prefix: None,
    });
    // The second listener: the same servers and weights, no persistence (replaces the UDP
    // listener).
    let second = config.add_second_pool();
    config.listeners[1] = listener("tcp-spread", Protocol::Tcp, SPREAD_PORT, Some(second));
    let pool = config.pool_weights();
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");

    // The first connection creates the client's persistence entry; the other 199 (32 at a
    // time) must all follow it.
    let first = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(1))
        .expect("first connection");
    let pinned_to = first
        .counts
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| panic!("{}", first.summary("first connection")));
    let rest = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(199))
        .expect("199 more connections");
    println!(
        "persistent listener: first connection on {pinned_to}; {}",
        rest.summary("199 more connections")
    );
    assert!(
        rest.failures.is_empty() && rest.answered() == 199,
        "{}",
        rest.summary("persistent listener")
    );
    assert_eq!(
        rest.counts.keys().collect::<Vec<_>>(),
        vec![&pinned_to],
        "all 200 connections should land on {pinned_to}: {:?}",
        rest.counts
    );
    assert_eq!(rest.distinct_source_ports, 199, "each from its own port");

    let n = SPREAD_CONNECTIONS;
    let spread = tcp_connections(
        topo.client_ns(),
        SocketAddr::new(IpAddr::V4(VIP), SPREAD_PORT),
        &TrafficOptions::new(n),
    )
    .expect("connections to the listener without persistence");
    let table = Distribution::new("listener without persistence", &pool, &spread.counts);
    println!(
        "{}\n{table}",
        spread.summary("listener without persistence")
    );
    assert!(
        spread.failures.is_empty() && spread.answered() == n,
        "{}",
        spread.summary("listener without persistence")
    );
    if let Err(e) = table.check(SHARE_TOLERANCE_PP) {
        panic!("{e}");
    }

    let status = daemon.status().expect("slb status");
    let hits = status.counters.get("persistence_hits").copied();
    println!("persistence_hits: {hits:?}");
    assert!(
        hits.is_some_and(|h| h >= 199),
        "persistence_hits should count the 199 pinned connections: {:#?}",
        status.counters
    );
    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
