//! Direct server return (`forwarding = "dsr"`) with slb, the backends and a router on a bridge,
//! the client behind the router ([`Segment`]), in both ways DSR reaches a backend: `dsr = "l2"`
//! to the backends' own addresses on the segment, and `dsr = "ipip"` to their remote addresses
//! (routed through the router, as backends in another subnet), with slb's decapsulator on the
//! backends. For IPv4 and IPv6, 3000 TCP connections and 3000 UDP flows over backends weighted
//! 1:2:3: each backend's share within tolerance of its weight's, the client's own address seen
//! by the backends, and the answers taking the path DSR promises, from the backends through the
//! router, never through slb; then full-size transfers and fragmented datagrams.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use slb_tests::config::{
    group, health_check, listener_on, BackendSpec, CheckKind, DsrMode, Forwarding, GroupKind,
    HealthCheck, Listener, Protocol,
};
use slb_tests::report::assert_balanced;
use slb_tests::segment::{Segment, SLB_INTERFACE};
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{fragmented_udp_request, tcp_connections, tcp_transfer, udp_flows};
use slb_tests::{
    in_netns, require_root, Family, LongLivedStreams, SlbConfig, SlbDaemon, TrafficOptions,
    VIP_TCP_PORT, VIP_UDP_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const WEIGHTS: [u32; 3] = [1, 2, 3];
const FLOWS: usize = 3000;
/// Datagrams sent in fragments, per family.
const FRAGMENTED: usize = 60;
/// Full-size transfers per family, and their size.
const TRANSFERS: usize = 3;
const TRANSFER_BYTES: usize = 200_000;

fn pool(family: Family) -> &'static str {
    match family {
        Family::V4 => "pool",
        Family::V6 => "pool6",
    }
}

/// slb on the segment: per family a group of the three backends (on the listeners' own ports)
/// and a TCP and a UDP listener forwarding to it by direct return, each with a TCP check (the
/// UDP listener's on the backends' TCP port: their UDP servers answer on the VIP only).
fn dsr_config(instance: &str, mode: DsrMode) -> SlbConfig {
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
                address: backend_addr(mode, family, i),
                port: None,
                weight: WEIGHTS[i - 1],
                max_connections: None,
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
            direct_return(&mut listener, mode, family);
            listener.health_check = Some(HealthCheck {
                port: Some(VIP_TCP_PORT),
                ..check.clone()
            });
            config.listener(listener);
        }
    }
    config
}

/// The address a listener of `mode` reaches backend `i` by: its own on the segment (L2), or
/// its remote one behind the router (IP-in-IP).
fn backend_addr(mode: DsrMode, family: Family, i: usize) -> IpAddr {
    match mode {
        DsrMode::L2 => Segment::backend_addr(family, i),
        DsrMode::Ipip => Segment::remote_backend_addr(family, i),
    }
}

/// Makes `listener` forward by direct return in `mode` (tunnelled from slb's segment address).
fn direct_return(listener: &mut Listener, mode: DsrMode, family: Family) {
    listener.forwarding = Forwarding::Dsr;
    listener.dsr = Some(mode);
    if mode == DsrMode::Ipip {
        listener.tunnel_source = Some(Segment::slb_addr(family));
    }
}

/// The segment, with slb's decapsulator on every backend for IP-in-IP.
fn segment(tag: &str, mode: DsrMode) -> Segment {
    let mut segment = Segment::build(tag, WEIGHTS.len(), Path::new(SERVER)).expect("segment");
    if mode == DsrMode::Ipip {
        segment
            .attach_decapsulators(&slb_binary())
            .expect("attach the decapsulators");
    }
    segment
}

/// What the backends' decapsulators counted, summed.
fn decapsulated(segment: &Segment) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for i in 1..=segment.backend_count() {
        let args = [
            "--netns",
            segment.backend_ns(i),
            "decap",
            "status",
            "--iface",
            "b0",
            "--json",
        ];
        let text = slb_tests::exec::run(std::process::Command::new(slb_binary()).args(args))
            .expect("decap status");
        let status: serde_json::Value = serde_json::from_str(&text).expect("decap status JSON");
        for (name, value) in status["counters"].as_object().expect("counters") {
            *total.entry(name.clone()).or_default() += value.as_u64().expect("a count");
        }
    }
    total
}

#[test]
fn dsr_balances_by_weight_and_answers_bypass_slb() {
    balances_by_weight_and_answers_bypass_slb("dsr", DsrMode::L2);
}

#[test]
fn ipip_dsr_balances_by_weight_and_answers_bypass_slb() {
    balances_by_weight_and_answers_bypass_slb("ipip", DsrMode::Ipip);
}

fn balances_by_weight_and_answers_bypass_slb(tag: &str, mode: DsrMode) {
    require_root(tag);
    let segment = segment(tag, mode);
    let config = dsr_config(&unique_instance(tag), mode);
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
        if mode == DsrMode::Ipip {
            assert!(
                delta("tunnel_encapsulated") >= bounced,
                "{family:?}: {counters:#?}"
            );
        }

        // Full-size segments both ways: with the outer header a 1500-byte packet no longer fits
        // the segment, and the client learns that from slb's "fragmentation needed" / Packet
        // Too Big; the transfer completes in any case.
        let counters_before = counters;
        for k in 0..TRANSFERS {
            let (backend, echoed) =
                tcp_transfer(segment.client_ns(), family.vip_tcp(), TRANSFER_BYTES)
                    .unwrap_or_else(|e| panic!("{family:?}: transfer {k}: {e:#}"));
            assert!(
                echoed >= TRANSFER_BYTES,
                "{family:?}: {backend} echoed {echoed}"
            );
        }
        let counters = daemon.status().expect("status").counters;
        let delta = |name: &str| {
            counters.get(name).copied().unwrap_or(0)
                - counters_before.get(name).copied().unwrap_or(0)
        };
        let too_big = delta("icmp_too_big_sent");
        println!("{family:?}: {TRANSFERS} transfers of {TRANSFER_BYTES} bytes; frag-needed sent {too_big}");
        match mode {
            DsrMode::L2 => assert_eq!(too_big, 0),
            DsrMode::Ipip => assert!(too_big >= 1, "{family:?}: no frag-needed sent"),
        }

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
        // 3000 bytes in a 1500-byte MTU (or the 1480 / 1460 the client learnt for the
        // tunnel): three fragments, two after the first.
        assert_eq!(delta("fragments_balanced"), 2 * FRAGMENTED as u64);
        assert_eq!(
            delta("fragments_passed")
                + delta("fragments_dropped_orphan")
                + delta("dsr_too_big_dropped"),
            0
        );
    }
    if mode == DsrMode::Ipip {
        let decap = decapsulated(&segment);
        println!("decapsulators: {decap:?}");
        assert_eq!(
            decap["refused_source"] + decap["refused_vip"] + decap["unhandled"],
            0
        );
        assert!(decap["decapsulated"] >= 2 * (4 * FLOWS) as u64, "{decap:?}");
    }
}

/// Under direct return too: established connections stay on their backends while the config
/// changes around them (a reweight, another backend removed), and an active/standby pair fails
/// over to the standby when the active's server dies and back when it returns.
#[test]
fn dsr_keeps_established_connections_and_fails_over() {
    keeps_established_connections_and_fails_over("dsrlive", DsrMode::L2);
}

#[test]
fn ipip_dsr_keeps_established_connections_and_fails_over() {
    keeps_established_connections_and_fails_over("ipiplive", DsrMode::Ipip);
}

fn keeps_established_connections_and_fails_over(tag: &str, mode: DsrMode) {
    require_root(tag);
    let mut segment = segment(tag, mode);
    let instance = unique_instance(tag);
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
                address: backend_addr(mode, Family::V4, k + 1),
                port: None,
                weight,
                max_connections: None,
            })
            .collect();
        config
            .groups
            .push(group("pool", GroupKind::Vserver, backends));
        let pair = (1..=2)
            .map(|i| BackendSpec {
                address: backend_addr(mode, Family::V6, i),
                port: None,
                weight: 1,
                max_connections: None,
            })
            .collect();
        config
            .groups
            .push(group("pair", GroupKind::ActiveStandby, pair));
        for (family, name, pool) in [(Family::V4, "web", "pool"), (Family::V6, "pair6", "pair")] {
            let mut listener =
                listener_on(family.vip(), name, Protocol::Tcp, VIP_TCP_PORT, Some(pool));
            direct_return(&mut listener, mode, family);
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
        daemon
            .wait_backend_health(
                "pair6",
                backend_addr(mode, Family::V6, 1),
                want,
                Duration::from_secs(5),
            )
            .expect("the active's health");
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
