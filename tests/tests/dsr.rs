//! Direct server return (`forwarding = "dsr"`) on one L2 segment: slb, the backends and a router
//! on a bridge, the client behind the router ([`Segment`]). For IPv4 and IPv6, 3000 TCP
//! connections and 3000 UDP flows over backends weighted 1:2:3: each backend's share within
//! tolerance of its weight's, the client's own address seen by the backends, and the answers
//! taking the path DSR promises, from the backends through the router, never through slb.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use slb_tests::config::{
    group, health_check, listener_on, BackendSpec, CheckKind, Forwarding, GroupKind, HealthCheck,
    Protocol,
};
use slb_tests::segment::{Segment, SLB_INTERFACE};
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{tcp_connections, udp_flows};
use slb_tests::{
    require_root, Distribution, Family, SlbConfig, SlbDaemon, TrafficOptions, TrafficReport,
    SHARE_TOLERANCE_PP, VIP_TCP_PORT, VIP_UDP_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const WEIGHTS: [u32; 3] = [1, 2, 3];
const FLOWS: usize = 3000;

fn pool(family: Family) -> &'static str {
    match family {
        Family::V4 => "pool",
        Family::V6 => "pool6",
    }
}

/// slb on the segment: per family a group of the three backends (on the listeners' own ports)
/// and a TCP and a UDP listener forwarding to it by direct return, each with a TCP check (the
/// UDP listener's on the backends' TCP port: their UDP servers answer on the VIP only).
fn dsr_config(instance: &str) -> SlbConfig {
    let mut config = SlbConfig::new(instance, 0);
    config.interfaces[0].name = SLB_INTERFACE.into();
    let check = health_check(
        CheckKind::Tcp,
        Duration::from_secs(1),
        Duration::from_millis(500),
        1,
        2,
    );
    for family in [Family::V4, Family::V6] {
        let backends = (1..=WEIGHTS.len())
            .map(|i| BackendSpec {
                address: Segment::backend_addr(family, i),
                port: None,
                weight: WEIGHTS[i - 1],
            })
            .collect();
        config
            .groups
            .push(group(pool(family), GroupKind::Vserver, backends));
        for (protocol, port) in [(Protocol::Tcp, VIP_TCP_PORT), (Protocol::Udp, VIP_UDP_PORT)] {
            let name = match family {
                Family::V4 => format!("{protocol}-dsr"),
                Family::V6 => format!("{protocol}-dsr6"),
            };
            let mut listener = listener_on(family.vip(), &name, protocol, port, Some(pool(family)));
            listener.forwarding = Forwarding::Dsr;
            listener.health_check = Some(HealthCheck {
                port: Some(VIP_TCP_PORT),
                ..check.clone()
            });
            config.listener(listener);
        }
    }
    config
}

fn check_balanced(what: &str, report: &TrafficReport, family: Family, pool: &[(String, u32)]) {
    let table = Distribution::new(what, pool, &report.counts);
    println!("{}\n{table}", report.summary(what));
    assert!(
        report.failures.is_empty() && report.answered() == FLOWS,
        "{what}: {} of {FLOWS} answered\n{}",
        report.answered(),
        report.summary(what)
    );
    if let Err(e) = table.check(SHARE_TOLERANCE_PP) {
        panic!("{e}");
    }
    assert_eq!(
        report.peer_ips(),
        BTreeSet::from([Segment::client_addr(family)]),
        "{what}: backends must see the client's real address"
    );
}

#[test]
fn dsr_balances_by_weight_and_answers_bypass_slb() {
    require_root("dsr_balances_by_weight_and_answers_bypass_slb");
    let segment = Segment::build("dsr", WEIGHTS.len(), Path::new(SERVER)).expect("segment");
    let config = dsr_config(&unique_instance("dsr"));
    let daemon = SlbDaemon::start(&slb_binary(), segment.slb_ns(), &config).expect("start slb");
    let pool_weights: Vec<(String, u32)> = (1..=WEIGHTS.len())
        .map(|i| (slb_tests::Topology::backend_name(i), WEIGHTS[i - 1]))
        .collect();
    for family in [Family::V4, Family::V6] {
        let counters_before = daemon.status().expect("status").counters;
        let (rx_before, tx_before) =
            Segment::interface_packets(segment.slb_ns(), SLB_INTERFACE).expect("counters");
        let tcp = tcp_connections(
            segment.client_ns(),
            family.vip_tcp(),
            &TrafficOptions::new(FLOWS),
        )
        .expect("TCP connections");
        check_balanced("TCP connections", &tcp, family, &pool_weights);
        let udp = udp_flows(
            segment.client_ns(),
            family.vip_udp(),
            20000,
            &TrafficOptions::new(FLOWS),
        )
        .expect("UDP flows");
        check_balanced("UDP flows", &udp, family, &pool_weights);

        let counters = daemon.status().expect("status").counters;
        let delta = |name: &str| {
            counters.get(name).copied().unwrap_or(0)
                - counters_before.get(name).copied().unwrap_or(0)
        };
        let (rx, tx) =
            Segment::interface_packets(segment.slb_ns(), SLB_INTERFACE).expect("counters");
        let (received, sent) = (rx - rx_before, tx - tx_before);
        let (bounced, unknown) = (delta("tx"), delta("not_for_us_passed"));
        println!(
            "{family:?}: slb's {SLB_INTERFACE} received {received} and sent {sent} packets; \
             XDP_TX {bounced}, not for a listener {unknown}, off-link {}, unresolved {}",
            delta("dsr_backend_off_link"),
            delta("dsr_next_hop_unresolved"),
        );
        // Every client packet (at least a SYN, an ACK and a FIN per connection, a datagram per
        // flow) went back out to a backend; the backends' answers (as many again, 12000 or
        // more) never came: what slb received beyond what it sent back out is its health
        // checks' answers (a few dozen a second) and neighbour discovery.
        assert!(
            bounced >= (3 * FLOWS + FLOWS) as u64,
            "{family:?}: only {bounced} packets sent on by XDP_TX"
        );
        assert!(
            received.saturating_sub(bounced) < (FLOWS / 3) as u64,
            "{family:?}: slb received {received} packets but sent {bounced} on: answers came \
             through slb"
        );
        assert!(
            unknown < (FLOWS / 3) as u64,
            "{family:?}: {unknown} packets for no listener reached slb (answers through slb?)"
        );
        assert_eq!(delta("dsr_backend_off_link"), 0);
        assert_eq!(delta("dsr_next_hop_unresolved"), 0);
        assert_eq!(delta("replies_translated"), 0);
    }
}
