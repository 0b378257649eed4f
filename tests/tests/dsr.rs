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
use slb_tests::report::assert_balanced;
use slb_tests::segment::{Segment, SLB_INTERFACE};
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{fragmented_udp_request, tcp_connections, udp_flows};
use slb_tests::{
    in_netns, require_root, Family, LongLivedStreams, SlbConfig, SlbDaemon, TrafficOptions,
    VIP_TCP_PORT, VIP_UDP_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const WEIGHTS: [u32; 3] = [1, 2, 3];
const FLOWS: usize = 3000;
/// Datagrams sent in fragments, per family.
const FRAGMENTED: usize = 60;

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
        assert_balanced(
            "TCP connections",
            &tcp,
            FLOWS,
            &pool_weights,
            Segment::client_addr(family),
        );
        let udp = udp_flows(
            segment.client_ns(),
            family.vip_udp(),
            20000,
            &TrafficOptions::new(FLOWS),
        )
        .expect("UDP flows");
        assert_balanced(
            "UDP flows",
            &udp,
            FLOWS,
            &pool_weights,
            Segment::client_addr(family),
        );

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

        // Datagrams past the MTU: every fragment of a request must reach the backend its first
        // fragment went to, or the backend cannot reassemble it and nothing answers.
        let counters_before = counters;
        let answered = in_netns(segment.client_ns(), || {
            (0..FRAGMENTED)
                .map(|i| fragmented_udp_request(i, family.vip_udp(), 3000))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .expect("enter the client namespace")
        .unwrap_or_else(|e| panic!("{family:?}: fragmented datagrams: {e:#}"));
        let backends: BTreeSet<&str> = answered.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(backends.len(), 3, "{family:?}: {backends:?}");
        let counters = daemon.status().expect("status").counters;
        let delta = |name: &str| {
            counters.get(name).copied().unwrap_or(0)
                - counters_before.get(name).copied().unwrap_or(0)
        };
        println!(
            "{family:?}: {FRAGMENTED} fragmented datagrams answered by {backends:?}; later \
             fragments sent on {}",
            delta("fragments_balanced")
        );
        // 3000 bytes in a 1500-byte MTU: three fragments, two after the first.
        assert_eq!(delta("fragments_balanced"), 2 * FRAGMENTED as u64);
        assert_eq!(
            delta("fragments_passed") + delta("fragments_dropped_orphan"),
            0
        );
    }
}

/// Under direct return too: established connections stay on their backends while the config
/// changes around them (a reweight, another backend removed), and an active/standby pair fails
/// over to the standby when the active's server dies and back when it returns.
#[test]
fn dsr_keeps_established_connections_and_fails_over() {
    require_root("dsr_keeps_established_connections_and_fails_over");
    let mut segment = Segment::build("dsrlive", 3, Path::new(SERVER)).expect("segment");
    let instance = unique_instance("dsrlive");
    let quick_check = health_check(
        CheckKind::Tcp,
        Duration::from_millis(200),
        Duration::from_millis(200),
        2,
        2,
    );
    let config_with = |weights: &[u32]| {
        let mut config = SlbConfig::new(&instance, 0);
        config.interfaces[0].name = SLB_INTERFACE.into();
        let backends = weights
            .iter()
            .enumerate()
            .map(|(k, &weight)| BackendSpec {
                address: Segment::backend_addr(Family::V4, k + 1),
                port: None,
                weight,
            })
            .collect();
        config
            .groups
            .push(group("pool", GroupKind::Vserver, backends));
        let pair = (1..=2)
            .map(|i| BackendSpec {
                address: Segment::backend_addr(Family::V6, i),
                port: None,
                weight: 1,
            })
            .collect();
        config
            .groups
            .push(group("pair", GroupKind::ActiveStandby, pair));
        for (vip, name, pool) in [
            (Family::V4.vip(), "web", "pool"),
            (Family::V6.vip(), "pair6", "pair"),
        ] {
            let mut listener = listener_on(vip, name, Protocol::Tcp, VIP_TCP_PORT, Some(pool));
            listener.forwarding = Forwarding::Dsr;
            listener.health_check = Some(quick_check.clone());
            config.listener(listener);
        }
        config
    };
    let mut daemon = SlbDaemon::start(&slb_binary(), segment.slb_ns(), &config_with(&[1, 1, 1]))
        .expect("start slb");

    let mut streams = LongLivedStreams::open(
        segment.client_ns(),
        Family::V4.vip_tcp(),
        30,
        Duration::from_secs(3),
    )
    .expect("open long-lived streams");
    streams.assert_all_answer(2, Duration::ZERO, "before the changes");
    let counts = streams.counts();
    println!("streams per backend: {counts:?}");
    assert!(
        counts.len() == 3,
        "30 streams over 3 equal backends: {counts:?}"
    );
    // Backend 1 triples its weight and backend 3 leaves: its streams go (its packets now go
    // elsewhere, where no connection knows them), every other stays where it is.
    let mut leaving = streams.split_off_backend("b3");
    let before = streams.backends();
    daemon
        .reload_with(&config_with(&[3, 1]))
        .expect("reload slb");
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

    // Active/standby: new connections go to the active (b1) while it is healthy.
    let target = Family::V6.vip_tcp();
    let client_ns = segment.client_ns().to_owned();
    let to = |what: &str| {
        let report = tcp_connections(&client_ns, target, &TrafficOptions::new(200))
            .expect("TCP connections");
        println!("{}", report.summary(what));
        assert!(report.failures.is_empty(), "{}", report.summary(what));
        report.counts
    };
    let b1 = slb_tests::Topology::backend_name(1);
    let b2 = slb_tests::Topology::backend_name(2);
    // The first IPv6 connection through this fresh segment takes one SYN retransmission (1 s)
    // whose cause is not found (no data-plane counter moves: not a drop of slb's), so the
    // measured rounds start after one.
    LongLivedStreams::open(&client_ns, target, 1, Duration::from_secs(5))
        .expect("a first IPv6 connection");
    assert_eq!(to("to the active").keys().collect::<Vec<_>>(), vec![&b1]);
    segment.stop_server(1);
    let healthy = |daemon: &SlbDaemon, want: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let status = daemon.status().expect("status");
            let active = slb_tests::slb::status_backend(
                &status,
                "pair6",
                Segment::backend_addr(Family::V6, 1),
            )
            .expect("the active in status")
            .healthy;
            if active == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the active's health stayed {active}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    healthy(&daemon, false);
    assert_eq!(to("to the standby").keys().collect::<Vec<_>>(), vec![&b2]);
    segment
        .start_server(1)
        .expect("restart the active's server");
    healthy(&daemon, true);
    assert_eq!(
        to("back to the active").keys().collect::<Vec<_>>(),
        vec![&b1]
    );
    let counters = daemon.status().expect("status").counters;
    for name in [
        "dsr_backend_off_link",
        "dsr_next_hop_unresolved",
        "fib_passed",
        "fib_dropped",
    ] {
        println!("{name}: {}", counters.get(name).copied().unwrap_or(0));
    }
}
