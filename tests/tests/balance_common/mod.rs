//! The balance test, for either address family: 3000 TCP connections and 3000 UDP flows to the
//! VIP over backends weighted 1:2:3, each backend's share within 5 percentage points of its
//! weight's, the client's own address seen by the backends, and `slb status` in agreement.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use slb_tests::report::assert_balanced;
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{tcp_connections, tcp_roundtrip_to_host, udp_flows};
use slb_tests::{Family, SlbConfig, SlbDaemon, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");

/// The whole test over `family`'s VIP, client and backend addresses, in namespaces tagged
/// `tag`.
pub fn balances_tcp_and_udp_by_weight(family: Family, tag: &str) {
    let slb = slb_binary();
    let weights = [1, 2, 3];
    let topo = Topology::builder()
        .tag(tag)
        .backends(weights.len())
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard_in(family, &unique_instance(tag), &weights);
    let pool = config.pool_weights();
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");

    // Traffic to the load balancer host itself still works with XDP attached.
    let host = family.slb_client_side_addr();
    let ping = topo
        .exec_in(
            topo.client_ns(),
            ["ping", "-c", "3", "-i", "0.2", "-W", "2", &host.to_string()],
        )
        .expect("ping from the client to the slb host");
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    tcp_roundtrip_to_host(
        topo.slb_ns(),
        topo.client_ns(),
        SocketAddr::new(host, 2222),
        Duration::from_secs(3),
    )
    .expect("TCP from the client to a listener on the slb host");

    let n = 3000;
    let tcp = tcp_connections(topo.client_ns(), family.vip_tcp(), &TrafficOptions::new(n))
        .expect("run TCP connections");
    assert_balanced("TCP connections", &tcp, n, &pool, family.client_addr());
    let udp = udp_flows(
        topo.client_ns(),
        family.vip_udp(),
        20000,
        &TrafficOptions::new(n),
    )
    .expect("run UDP flows");
    assert_balanced("UDP flows", &udp, n, &pool, family.client_addr());

    // Status reports the configured backends and counts at least the flows they served. A
    // backend may be listed once per listener that uses it, so entries are summed by address.
    let status = daemon.status().expect("slb status");
    let backends = &status.backends;
    let configured: BTreeSet<IpAddr> = (1..=weights.len())
        .map(|i| family.backend_addr(i))
        .collect();
    let listed: BTreeSet<IpAddr> = backends.iter().map(|b| b.address).collect();
    assert_eq!(listed, configured, "status backends: {status:#?}");
    for (k, (name, weight)) in pool.iter().enumerate() {
        let addr = family.backend_addr(k + 1);
        let entries: Vec<_> = backends.iter().filter(|b| b.address == addr).collect();
        for b in &entries {
            assert_eq!(b.weight, *weight, "weight of {addr}: {status:#?}");
        }
        let new: u64 = entries.iter().map(|b| b.new_connections).sum();
        let served =
            tcp.counts.get(name).copied().unwrap_or(0) + udp.counts.get(name).copied().unwrap_or(0);
        println!("status: {addr} ({name}) {new} new connections, {served} answered");
        assert!(
            new >= served as u64,
            "status says {addr} had {new} new connections, it answered {served}: {status:#?}"
        );
    }
    assert_eq!(status.listeners.len(), 2, "{status:#?}");

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
