//! The active/standby test, for either address family: an active/standby group behind a UDP
//! and a TCP listener; when the active server dies, traffic moves to the standby; when it is
//! back, new flows return to it. The standby is never probed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use slb_tests::config::{
    group, health_check, CheckKind, GroupKind, HealthCheck, TCP_LISTENER, UDP_LISTENER,
};
use slb_tests::slb::{
    slb_binary, status_backend, unique_instance, unix_ns_now, BackendStatus, Role,
};
use slb_tests::topology::{read_peer_log, ServerOptions};
use slb_tests::traffic::{
    ms, per_backend, tcp_connections, udp_flows, Attempt, ConnectionLoop, UdpStream,
};
use slb_tests::{Family, SlbConfig, SlbDaemon, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
/// Probe interval of the TCP check and of the UDP check that expects an answer.
pub const INTERVAL: Duration = Duration::from_millis(200);
pub const TIMEOUT: Duration = Duration::from_millis(200);
pub const THRESHOLD: u32 = 2;
const MARGIN: Duration = Duration::from_millis(400);
const PAIR: &str = "pair";

fn since_unix_ns(backend: &BackendStatus) -> u128 {
    backend
        .health
        .as_ref()
        .unwrap_or_else(|| panic!("no health.since_unix_ns: {backend:#?}"))
        .since_unix_ns
}

fn reason(backend: &BackendStatus) -> &str {
    backend.health.as_ref().map_or("", |h| h.reason.as_str())
}

/// The whole test over `family`'s VIP, client and backend addresses, in namespaces tagged
/// `tag`, with `udp_check` (probing every `udp_interval`) on the UDP listener.
pub fn fails_over_and_back(
    family: Family,
    tag: &str,
    udp_check: HealthCheck,
    udp_interval: Duration,
) {
    let slb = slb_binary();
    let logs = tempfile::tempdir().expect("temp dir for peer logs");
    let log_of = |i: usize| logs.path().join(format!("b{i}.peers"));
    let mut topo = Topology::builder()
        .tag(tag)
        .backends(2)
        .build()
        .expect("create topology");
    for i in 1..=2 {
        topo.start_backend_server_with(
            i,
            Path::new(SERVER),
            &ServerOptions {
                log_peers: Some(log_of(i)),
            },
        )
        .expect("start backend server");
    }
    let (active, standby) = (family.backend_addr(1), family.backend_addr(2));

    let mut config = SlbConfig::standard_in(family, &unique_instance(tag), &[1, 1]);
    config.groups = vec![group(
        PAIR,
        GroupKind::ActiveStandby,
        config.groups[0].backends.clone(),
    )];
    let tcp_check = health_check(CheckKind::Tcp, INTERVAL, TIMEOUT, THRESHOLD, THRESHOLD);
    for (name, check) in [(TCP_LISTENER, tcp_check), (UDP_LISTENER, udp_check)] {
        let l = config.listener_mut(name);
        l.group = Some(PAIR.to_owned());
        l.health_check = Some(check);
    }
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");

    let status = daemon.status().expect("slb status");
    for listener in [TCP_LISTENER, UDP_LISTENER] {
        let a = status_backend(&status, listener, active).expect("active in status");
        let s = status_backend(&status, listener, standby).expect("standby in status");
        assert_eq!(a.role, Some(Role::Active), "{a:#?}");
        assert_eq!(s.role, Some(Role::Standby), "{s:#?}");
        assert!(a.health.is_some(), "the active is not checked: {a:#?}");
        assert!(s.health.is_none(), "the standby is checked: {s:#?}");
    }

    // Everything goes to the active.
    let stream = UdpStream::start(topo.client_ns(), family.vip_udp(), Duration::from_millis(5))
        .expect("start the UDP stream");
    let client = ConnectionLoop::start(
        topo.client_ns(),
        family.vip_tcp(),
        1,
        Duration::from_millis(10),
        Duration::from_secs(1),
    );
    std::thread::sleep(Duration::from_secs(1));
    let early = stream.snapshot();
    assert!(
        early.replies.len() > 50 && early.replies.iter().all(|r| r.backend == "b1"),
        "before the failure the stream should be answered by b1: {} replies, backends {:?}",
        early.replies.len(),
        early
            .replies
            .iter()
            .map(|r| r.backend.as_str())
            .collect::<BTreeSet<_>>()
    );

    // The active dies.
    let stopped_at = unix_ns_now();
    topo.stop_backend_server(1)
        .expect("stop the active's server");
    let udp_verdict = daemon
        .wait_backend_health(UDP_LISTENER, active, false, Duration::from_secs(5))
        .expect("the active is declared unhealthy on the UDP listener");
    let tcp_verdict = daemon
        .wait_backend_health(TCP_LISTENER, active, false, Duration::from_secs(5))
        .expect("the active is declared unhealthy on the TCP listener");
    let udp_unhealthy_at = since_unix_ns(&udp_verdict);
    let tcp_unhealthy_at = since_unix_ns(&tcp_verdict);
    println!(
        "active declared unhealthy {:.1} ms (udp check: {}) and {:.1} ms (tcp check: {}) after the stop",
        ms(udp_unhealthy_at as i128 - stopped_at as i128),
        reason(&udp_verdict),
        ms(tcp_unhealthy_at as i128 - stopped_at as i128),
        reason(&tcp_verdict),
    );
    // Stay down long enough to see the verdict hold, then check where new flows go.
    std::thread::sleep(Duration::from_millis(2500));
    let status = daemon.status().expect("slb status");
    for listener in [UDP_LISTENER, TCP_LISTENER] {
        let a = status_backend(&status, listener, active).expect("active in status");
        assert!(
            !a.healthy,
            "the dead active was declared healthy again on {listener}: {a:#?}\n{}",
            daemon.log()
        );
    }
    let udp_down = udp_flows(
        topo.client_ns(),
        family.vip_udp(),
        30000,
        &TrafficOptions::new(50),
    )
    .expect("new UDP flows while the active is down");
    let tcp_down = tcp_connections(topo.client_ns(), family.vip_tcp(), &TrafficOptions::new(50))
        .expect("new TCP connections while the active is down");
    println!(
        "{}\n{}",
        udp_down.summary("new UDP flows while the active is down"),
        tcp_down.summary("new TCP connections while the active is down")
    );
    let restart_began = unix_ns_now();

    // The active comes back.
    topo.restart_backend_server(1)
        .expect("restart the active's server");
    let restarted_at = unix_ns_now();
    for listener in [UDP_LISTENER, TCP_LISTENER] {
        daemon
            .wait_backend_health(listener, active, true, Duration::from_secs(5))
            .expect("the active is declared healthy again");
    }
    println!(
        "active healthy again on both listeners {:.1} ms after its server listened",
        ms(unix_ns_now() as i128 - restarted_at as i128)
    );
    let back_from = restarted_at + (INTERVAL.max(udp_interval) * THRESHOLD + MARGIN).as_nanos();
    std::thread::sleep(Duration::from_nanos(
        back_from.saturating_sub(unix_ns_now()) as u64,
    ));
    let udp_back = udp_flows(
        topo.client_ns(),
        family.vip_udp(),
        31000,
        &TrafficOptions::new(50),
    )
    .expect("new UDP flows after the active is back");
    let tcp_back = tcp_connections(topo.client_ns(), family.vip_tcp(), &TrafficOptions::new(50))
        .expect("new TCP connections after the active is back");
    println!(
        "{}\n{}",
        udp_back.summary("new UDP flows after the active is back"),
        tcp_back.summary("new TCP connections after the active is back")
    );
    std::thread::sleep(Duration::from_millis(500));
    let attempts = client.stop().expect("TCP loop");
    let stream_peer = SocketAddr::new(family.client_addr(), stream.local_addr().port());
    let report = stream.stop();

    // ---- the UDP stream ----
    assert!(!report.sent.is_empty(), "the UDP stream sent nothing");
    let lost = report.unanswered();
    let replies_by: BTreeMap<&str, usize> =
        report.replies.iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.backend.as_str()).or_default() += 1;
            m
        });
    let first_b2_reply = report.replies.iter().find(|r| r.backend == "b2");
    println!(
        "UDP stream: {} datagrams sent, {} answered {replies_by:?}, {} lost, {} bad replies",
        report.sent.len(),
        report.replies.len(),
        lost.len(),
        report.bad_replies.len()
    );
    assert!(
        report.bad_replies.is_empty(),
        "bad replies: {:?}",
        report.bad_replies
    );
    let first_b2_reply = first_b2_reply.expect("the stream was never answered by the standby");
    // Moved once: b1 before the failure, b2 from then on (it stays there after b1 is back).
    let after_move: Vec<&str> = report
        .replies
        .iter()
        .filter(|r| r.seq >= first_b2_reply.seq)
        .map(|r| r.backend.as_str())
        .filter(|b| *b != "b2")
        .collect();
    assert!(
        after_move.is_empty(),
        "the stream went back and forth: {} replies from other backends after moving to b2",
        after_move.len()
    );
    let sent_at: BTreeMap<u64, u128> = report.sent.iter().copied().collect();
    let lost_after_move: Vec<u64> = lost
        .iter()
        .copied()
        .filter(|s| sent_at[s] > udp_unhealthy_at + MARGIN.as_nanos())
        .collect();
    let tail = report.sent.last().map_or(0, |(s, _)| *s);
    // The very last datagrams may still be in flight when the stream stopped.
    let lost_after_move: Vec<u64> = lost_after_move
        .into_iter()
        .filter(|s| *s + 5 < tail)
        .collect();
    assert!(
        lost_after_move.is_empty(),
        "datagrams lost after the failover: {lost_after_move:?}"
    );

    // ---- failover time, from the standby's receive log ----
    let standby_log = read_peer_log(&log_of(2)).expect("standby peer log");
    let first_at_standby = standby_log
        .iter()
        .filter(|e| !e.tcp && e.peer == stream_peer)
        .map(|e| e.at_unix_ns)
        .min()
        .expect("the standby's log has no datagram of the stream");
    let failover_ns = first_at_standby as i128 - udp_unhealthy_at as i128;
    let lost_window: Vec<u64> = lost.iter().copied().filter(|s| *s + 5 < tail).collect();
    println!(
        "failover time: first stream datagram at the standby {:.1} ms after the active's \
         unhealthy verdict ({:.1} ms after the server was killed); {} datagrams of the stream lost",
        ms(failover_ns),
        ms(first_at_standby as i128 - stopped_at as i128),
        lost_window.len()
    );
    assert!(
        failover_ns < 1_000_000_000,
        "failover took {:.1} ms",
        ms(failover_ns)
    );

    // ---- the standby was never probed ----
    let strangers: BTreeSet<IpAddr> = standby_log
        .iter()
        .map(|e| e.peer.ip())
        .filter(|ip| *ip != family.client_addr())
        .collect();
    assert!(
        strangers.is_empty(),
        "the standby saw peers other than the client (health probes?): {strangers:?}"
    );
    // And the log would have shown probes: the active's does.
    let active_log = read_peer_log(&log_of(1)).expect("active peer log");
    let probers: BTreeSet<IpAddr> = active_log
        .iter()
        .map(|e| e.peer.ip())
        .filter(|ip| *ip != family.client_addr())
        .collect();
    println!(
        "peers: standby saw {} entries, all from the client; active saw probes from {probers:?}",
        standby_log.len()
    );
    assert!(
        !probers.is_empty(),
        "the active's peer log shows no health probes"
    );

    // ---- new flows: standby while the active is down, active once it is back ----
    for (what, r, want) in [
        ("new UDP flows while the active is down", &udp_down, "b2"),
        (
            "new TCP connections while the active is down",
            &tcp_down,
            "b2",
        ),
        ("new UDP flows after the active is back", &udp_back, "b1"),
        (
            "new TCP connections after the active is back",
            &tcp_back,
            "b1",
        ),
    ] {
        assert!(
            r.failures.is_empty() && r.answered() == 50 && r.counts.get(want) == Some(&50),
            "{what}: expected all 50 on {want}\n{}",
            r.summary(what)
        );
    }

    // ---- the TCP loop ----
    let tcp_cutoff = tcp_unhealthy_at.max(stopped_at) + MARGIN.as_nanos();
    let down: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_unix_ns >= tcp_cutoff && a.end_unix_ns < restart_began)
        .collect();
    let back: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_unix_ns >= back_from)
        .collect();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    println!(
        "TCP loop: {} connections; while down {:?}; after the return {:?}; {} failed (all within {:.0} ms of the stop: {})",
        attempts.len(),
        per_backend(down.iter().copied()),
        per_backend(back.iter().copied()),
        failed.len(),
        ms((tcp_cutoff - stopped_at) as i128),
        failed.iter().all(|a| a.start_unix_ns < tcp_cutoff && a.end_unix_ns >= stopped_at)
    );
    assert!(
        failed
            .iter()
            .all(|a| a.start_unix_ns < tcp_cutoff && a.end_unix_ns >= stopped_at),
        "TCP connections failed outside the detection window: {:?}",
        failed
            .iter()
            .map(|a| format!(
                "{:+.1} ms: {}",
                ms(a.start_unix_ns as i128 - stopped_at as i128),
                a.outcome.as_ref().unwrap_err()
            ))
            .collect::<Vec<_>>()
    );
    let down_counts = per_backend(down.iter().copied());
    assert!(
        !down.is_empty() && down_counts.keys().all(|b| b == "b2"),
        "while the active was down, the TCP loop should reach only b2: {down_counts:?}"
    );
    let back_counts = per_backend(back.iter().copied());
    assert!(
        !back.is_empty() && back_counts.keys().all(|b| b == "b1"),
        "after the active came back, new TCP connections should reach only b1: {back_counts:?}"
    );

    let status = daemon.status().expect("slb status");
    println!(
        "counters: standby_picks {:?} flows_repicked {:?}",
        status.counters.get("standby_picks"),
        status.counters.get("flows_repicked")
    );
    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
