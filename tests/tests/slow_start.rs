//! Slow start on real traffic: a backend that comes back takes a small share of new
//! connections, then more, then its full share, while established connections stay put.

use std::path::Path;
use std::time::{Duration, Instant};

use slb_tests::config::{health_check, CheckKind, POOL_GROUP, TCP_LISTENER, UDP_LISTENER};
use slb_tests::slb::{slb_binary, status_backend, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::{
    require_root, vip_tcp, LongLivedStreams, SlbConfig, SlbDaemon, Topology, TrafficOptions,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const SLOW_START: Duration = Duration::from_secs(8);
const CONNECTIONS: usize = 600;

/// The slow start step of backend `i` in status (`None`: at full weight).
fn slow_start_percent(daemon: &SlbDaemon, i: usize) -> Option<u32> {
    let status = daemon.status().expect("status");
    let b = status_backend(&status, TCP_LISTENER, Topology::backend_addr(i)).expect("backend");
    b.health.as_ref().and_then(|h| h.slow_start_percent)
}

/// Backend 2's share of `CONNECTIONS` new connections, in percent.
fn share_of_b2(topo: &Topology) -> f64 {
    let report = tcp_connections(
        topo.client_ns(),
        vip_tcp(),
        &TrafficOptions::new(CONNECTIONS),
    )
    .expect("connections");
    assert_eq!(report.answered(), CONNECTIONS, "{:?}", report.failures);
    let b2 = report
        .counts
        .get(&Topology::backend_name(2))
        .copied()
        .unwrap_or(0);
    100.0 * b2 as f64 / CONNECTIONS as f64
}

#[test]
fn a_recovered_backend_ramps_up_to_its_share_and_established_connections_stay() {
    require_root("a_recovered_backend_ramps_up_to_its_share_and_established_connections_stay");
    let mut topo = Topology::builder()
        .tag("slowst")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("slowst"), &[10, 10]);
    config.listeners.retain(|l| l.name != UDP_LISTENER);
    config.listener_mut(TCP_LISTENER).health_check = Some(health_check(
        CheckKind::Tcp,
        Duration::from_millis(100),
        Duration::from_millis(100),
        2,
        2,
    ));
    config.group_mut(POOL_GROUP).slow_start = Some(SLOW_START);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    for i in 1..=2 {
        daemon
            .wait_backend_health(
                TCP_LISTENER,
                Topology::backend_addr(i),
                true,
                Duration::from_secs(3),
            )
            .expect("healthy");
    }
    assert_eq!(
        slow_start_percent(&daemon, 2),
        None,
        "no slow start at the daemon's start"
    );

    // Backend 2 goes down and comes back.
    topo.stop_backend_server(2).expect("stop b2");
    daemon
        .wait_backend_health(
            TCP_LISTENER,
            Topology::backend_addr(2),
            false,
            Duration::from_secs(3),
        )
        .expect("b2 unhealthy");
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 20, Duration::from_secs(2))
            .expect("streams, all on b1");
    topo.start_backend_server(2, Path::new(SERVER))
        .expect("start b2");
    daemon
        .wait_backend_health(
            TCP_LISTENER,
            Topology::backend_addr(2),
            true,
            Duration::from_secs(3),
        )
        .expect("b2 healthy again");
    let back = Instant::now();

    // Each step's share, measured between two reads of the step (a sample across a step is
    // left out).
    let mut seen = Vec::new();
    let sample = |seen: &mut Vec<(Duration, Option<u32>, f64)>| {
        let before = slow_start_percent(&daemon, 2);
        let share = share_of_b2(&topo);
        if slow_start_percent(&daemon, 2) == before {
            seen.push((back.elapsed(), before, share));
        }
        before
    };
    let first_percent = sample(&mut seen);
    streams.assert_all_answer(1, Duration::from_millis(10), "after b2 came back");
    while slow_start_percent(&daemon, 2).is_some() {
        assert!(
            back.elapsed() < SLOW_START + Duration::from_secs(3),
            "{seen:?}"
        );
        std::thread::sleep(Duration::from_millis(700));
        sample(&mut seen);
    }
    let done_share = share_of_b2(&topo);
    streams.assert_all_answer(1, Duration::from_millis(10), "after the slow start");
    for (at, percent, share) in &seen {
        println!("{:.1} s after b2 came back: slow start {percent:?} %, b2 took {share:.1} % of {CONNECTIONS} new connections", at.as_secs_f64());
    }
    println!("done: b2 took {done_share:.1} %; the 20 connections on b1 answered throughout");
    // Weights 10:10 with b2 at p %: a share of p / (100 + p) of the new connections.
    assert_eq!(
        first_percent,
        Some(10),
        "the first step, read as b2 came back"
    );
    for (_, percent, share) in &seen {
        let p = f64::from(percent.unwrap_or(100));
        let expected = 100.0 * p / (100.0 + p);
        assert!(
            (share - expected).abs() < 10.0,
            "{share:.1} % at {percent:?}: {seen:?}"
        );
    }
    let steps: Vec<u32> = seen.iter().filter_map(|(_, p, _)| *p).collect();
    assert!(
        steps.len() >= 3 && steps.windows(2).all(|w| w[0] <= w[1]),
        "{seen:?}"
    );
    assert!((done_share - 50.0).abs() < 10.0, "{done_share}");
}
