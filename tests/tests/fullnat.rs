//! Full NAT (`forwarding = "fullnat"`): the backends have no route to the client at all (their
//! default routes are removed), and see every connection come from slb's SNAT address, which
//! they reach over their own link. 3000 TCP connections and 3000 UDP flows over backends
//! weighted 1:2:3; established connections through a reweight and a removal; active/standby
//! failover; the SNAT mappings queryable with `slb snat`; and a deliberately tiny port range
//! that runs out.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use slb_tests::config::{
    group, health_check, listener, BackendSpec, CheckKind, Forwarding, GroupKind, Protocol,
};
use slb_tests::report::assert_balanced;
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{tcp_connections, udp_flows};
use slb_tests::{
    require_root, vip_tcp, vip_udp, LongLivedStreams, SlbConfig, SlbDaemon, Topology,
    TrafficOptions, BACKEND_PORT, CLIENT_ADDR, SECOND_BACKEND_PORT, VIP, VIP_TCP_PORT,
    VIP_UDP_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const WEIGHTS: [u32; 3] = [1, 2, 3];
const FLOWS: usize = 3000;
/// slb's SNAT address: on its loopback, reached by each backend over its own link.
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 200, 250, 1);
/// The tiny-range listener's port and its four SNAT ports.
const TINY_PORT: u16 = 81;
const TINY_PORTS: &str = "20000-20003";

/// The topology with full NAT's premises: the SNAT address on slb's `lo`, and backends whose
/// only route off their link is to the SNAT address (none to the client).
fn topology(tag: &str, backends: usize) -> Topology {
    let topo = Topology::builder()
        .tag(tag)
        .backends(backends)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    topo.exec_in(
        topo.slb_ns(),
        ["ip", "addr", "add", &format!("{SNAT}/32"), "dev", "lo"],
    )
    .expect("SNAT address");
    for i in 1..=backends {
        let ns = topo.backend_ns(i).to_owned();
        let gateway = Ipv4Addr::new(10, 200, 10 + i as u8, 1).to_string();
        topo.exec_in(&ns, ["ip", "-4", "route", "del", "default"])
            .expect("remove the backend's default route");
        topo.exec_in(
            &ns,
            ["ip", "route", "add", &format!("{SNAT}/32"), "via", &gateway],
        )
        .expect("route to the SNAT address");
        let routes = topo.exec_in(&ns, ["ip", "-4", "route", "get", &CLIENT_ADDR.to_string()]);
        assert!(
            routes.is_err(),
            "backend {i} still has a route to the client: {routes:?}"
        );
    }
    topo
}

/// Group `pool` of backends `1..=weights.len()`, a TCP and a UDP full NAT listener over it, and
/// a TCP full NAT listener with four SNAT ports over group `tiny`: backend 1 alone, on its second
/// port (ports are per SNAT address and backend endpoint: four ports, four flows).
fn fullnat_config(instance: &str, weights: &[u32]) -> SlbConfig {
    let mut config = SlbConfig::new(instance, WEIGHTS.len());
    let backends = weights
        .iter()
        .enumerate()
        .filter(|(_, &w)| w > 0)
        .map(|(k, &weight)| BackendSpec {
            address: Topology::backend_addr(k + 1).into(),
            port: Some(BACKEND_PORT),
            weight,
            max_connections: None,
        })
        .collect();
    config
        .groups
        .push(group("pool", GroupKind::Vserver, backends));
    let tiny = vec![BackendSpec {
        address: Topology::backend_addr(1).into(),
        port: Some(SECOND_BACKEND_PORT),
        weight: 1,
        max_connections: None,
    }];
    config.groups.push(group("tiny", GroupKind::Vserver, tiny));
    for (name, protocol, port, group) in [
        ("tcp-fullnat", Protocol::Tcp, VIP_TCP_PORT, "pool"),
        ("udp-fullnat", Protocol::Udp, VIP_UDP_PORT, "pool"),
        ("tcp-tiny", Protocol::Tcp, TINY_PORT, "tiny"),
    ] {
        let mut l = listener(name, protocol, port, Some(group));
        l.forwarding = Forwarding::Fullnat;
        l.snat_addresses = vec![SNAT.into()];
        if port == TINY_PORT {
            l.snat_ports = Some(TINY_PORTS.into());
        }
        config.listener(l);
    }
    config
}

fn counter(daemon: &SlbDaemon, name: &str) -> u64 {
    let status = daemon.status().expect("status");
    status.counters.get(name).copied().unwrap_or(0)
}

#[test]
fn full_nat_balances_by_weight_and_backends_answer_slb_without_a_route_to_the_client() {
    require_root(
        "full_nat_balances_by_weight_and_backends_answer_slb_without_a_route_to_the_client",
    );
    let topo = topology("fnat", WEIGHTS.len());
    let instance = unique_instance("fnat");
    let mut daemon = SlbDaemon::start(
        &slb_binary(),
        topo.slb_ns(),
        &fullnat_config(&instance, &WEIGHTS),
    )
    .expect("start slb");
    let pool: Vec<(String, u32)> = (1..=WEIGHTS.len())
        .map(|i| (Topology::backend_name(i), WEIGHTS[i - 1]))
        .collect();

    let tcp = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(FLOWS))
        .expect("TCP connections");
    assert_balanced("TCP connections", &tcp, FLOWS, &pool, IpAddr::V4(SNAT));
    let udp = udp_flows(
        topo.client_ns(),
        vip_udp(),
        20000,
        &TrafficOptions::new(FLOWS),
    )
    .expect("UDP flows");
    assert_balanced("UDP flows", &udp, FLOWS, &pool, IpAddr::V4(SNAT));
    let status = daemon.status().expect("status");
    let count = |name: &str| status.counters.get(name).copied().unwrap_or(0);
    println!(
        "mappings made {}, replies translated {}, ports exhausted {}",
        count("snat_mappings_made"),
        count("snat_replies_translated"),
        count("snat_ports_exhausted")
    );
    assert!(count("snat_mappings_made") >= (2 * FLOWS) as u64);
    // A SYN-ACK and an answer per connection, an answer per datagram.
    assert!(count("snat_replies_translated") >= (3 * FLOWS) as u64);
    assert_eq!(count("snat_ports_exhausted"), 0);
    assert_eq!(count("replies_translated"), 0, "no reply went by endpoint");

    // Which client an SNAT port stands for: `slb snat`, from the map the data plane uses.
    let out = daemon
        .cli([
            "snat",
            "-i",
            &instance,
            "--address",
            &CLIENT_ADDR.to_string(),
            "--json",
        ])
        .expect("slb snat");
    let flows: Vec<serde_json::Value> =
        serde_json::from_str(out.expect_success().expect("slb snat succeeds")).expect("JSON");
    println!("slb snat lists {} flows of the client", flows.len());
    assert!(flows.len() >= FLOWS, "{} flows listed", flows.len());
    for f in &flows {
        assert_eq!(
            f["snat"].as_str().unwrap().split(':').next(),
            Some("10.200.250.1")
        );
        assert!(
            f["client"].as_str().unwrap().starts_with("10.200.1.2:"),
            "{f}"
        );
    }

    // Established connections stay through a reweight and the removal of another backend.
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 30, Duration::from_secs(3))
            .expect("open long-lived streams");
    streams.assert_all_answer(2, Duration::ZERO, "before the changes");
    let mut leaving = streams.split_off_backend(&Topology::backend_name(3));
    let before = streams.backends();
    daemon
        .reload_with(&fullnat_config(&instance, &[3, 1, 0]))
        .expect("reload");
    streams.assert_all_answer(5, Duration::ZERO, "after the reweight and the removal");
    assert_eq!(
        streams.backends(),
        before,
        "streams must stay on their backends"
    );
    let cut = leaving.ping_each().iter().filter(|r| r.is_err()).count();
    println!(
        "{cut} of {} streams of the removed backend ended",
        leaving.len()
    );

    // The tiny range: four connections hold its four ports; a fifth finds none.
    let tiny = std::net::SocketAddr::new(VIP.into(), TINY_PORT);
    let mut held = LongLivedStreams::open(topo.client_ns(), tiny, 4, Duration::from_secs(3))
        .expect("four connections on four ports");
    let fifth = LongLivedStreams::open(topo.client_ns(), tiny, 1, Duration::from_secs(2));
    assert!(fifth.is_err(), "a fifth connection got a port");
    let exhausted = counter(&daemon, "snat_ports_exhausted");
    println!("a fifth connection on four ports: refused, snat_ports_exhausted {exhausted}");
    assert!(exhausted >= 1);
    held.assert_all_answer(2, Duration::ZERO, "the four holders");

    // Closed, the four give their ports back: the daemon's upkeep frees a closed flow's mapping
    // 10 s after the client's FIN (sweeps every 5 s), and a new connection gets a port.
    drop(held);
    let closed = std::time::Instant::now();
    let deadline = closed + Duration::from_secs(30);
    loop {
        match LongLivedStreams::open(topo.client_ns(), tiny, 1, Duration::from_secs(2)) {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no port came back within 30 s of the close: {e:#}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "a port came back {:.1} s after the four connections closed",
        closed.elapsed().as_secs_f64()
    );
}

#[test]
fn full_nat_active_standby_fails_over_and_back() {
    require_root("full_nat_active_standby_fails_over_and_back");
    let mut topo = topology("fnatas", 2);
    let instance = unique_instance("fnatas");
    let mut config = SlbConfig::new(&instance, 2);
    let pair = (1..=2)
        .map(|i| BackendSpec {
            address: Topology::backend_addr(i).into(),
            port: Some(BACKEND_PORT),
            weight: 1,
            max_connections: None,
        })
        .collect();
    config
        .groups
        .push(group("pair", GroupKind::ActiveStandby, pair));
    let mut l = listener("pair", Protocol::Tcp, VIP_TCP_PORT, Some("pair"));
    l.forwarding = Forwarding::Fullnat;
    l.snat_addresses = vec![SNAT.into()];
    l.health_check = Some(health_check(
        CheckKind::Tcp,
        Duration::from_millis(200),
        Duration::from_millis(200),
        2,
        2,
    ));
    config.listener(l);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let client_ns = topo.client_ns().to_owned();
    let to = |what: &str| {
        let report = tcp_connections(&client_ns, vip_tcp(), &TrafficOptions::new(200))
            .expect("TCP connections");
        println!("{}", report.summary(what));
        assert!(report.failures.is_empty(), "{}", report.summary(what));
        assert_eq!(report.peer_ips(), [IpAddr::V4(SNAT)].into(), "{what}");
        report.counts
    };
    let (b1, b2) = (Topology::backend_name(1), Topology::backend_name(2));
    let healthy = |want: bool| {
        daemon
            .wait_backend_health(
                "pair",
                Topology::backend_addr(1),
                want,
                Duration::from_secs(5),
            )
            .expect("the active's health");
    };
    assert_eq!(to("to the active").keys().collect::<Vec<_>>(), vec![&b1]);
    topo.stop_backend_server(1)
        .expect("stop the active's server");
    healthy(false);
    assert_eq!(to("to the standby").keys().collect::<Vec<_>>(), vec![&b2]);
    topo.restart_backend_server(1)
        .expect("restart the active's server");
    healthy(true);
    assert_eq!(
        to("back to the active").keys().collect::<Vec<_>>(),
        vec![&b1]
    );
}
