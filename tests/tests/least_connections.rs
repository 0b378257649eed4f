//! L4 least connections and per-backend `max_connections` on real traffic: a backend holding
//! 50 long connections gets none of the new ones while the others have fewer; a backend at its
//! `max_connections` takes no more, and status shows each backend's open connections as the
//! data plane counts them.

use std::path::Path;
use std::time::Duration;

use slb_tests::config::{Scheduler, POOL_GROUP, TCP_LISTENER, UDP_LISTENER};
use slb_tests::slb::{slb_binary, status_backend, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::{
    require_root, vip_tcp, LongLivedStreams, SlbConfig, SlbDaemon, Topology, TrafficOptions,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");

fn open_connections(daemon: &SlbDaemon, i: usize) -> u64 {
    let status = daemon.status().expect("status");
    status_backend(&status, TCP_LISTENER, Topology::backend_addr(i))
        .expect("backend in status")
        .open_connections
}

#[test]
fn new_connections_avoid_the_backend_holding_fifty_long_ones() {
    require_root("new_connections_avoid_the_backend_holding_fifty_long_ones");
    let topo = Topology::builder()
        .tag("wlc")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    // Backends 2 and 3 drained at first: the 50 long connections all go to backend 1.
    let mut config = SlbConfig::standard(&unique_instance("wlc"), &[1, 0, 0]);
    config.listeners.retain(|l| l.name != UDP_LISTENER);
    config.listener_mut(TCP_LISTENER).scheduler = Some(Scheduler::Wlc);
    let mut daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 50, Duration::from_secs(2))
            .expect("50 long connections");
    assert_eq!(
        streams.counts().get(&Topology::backend_name(1)).copied(),
        Some(50),
        "{:?}",
        streams.counts()
    );
    assert_eq!(open_connections(&daemon, 1), 50);

    // All three at weight 1: new connections go to the two that hold none.
    for b in &mut config.group_mut(POOL_GROUP).backends {
        b.weight = 1;
    }
    daemon.write_config(&config).expect("reweight");
    daemon.reload().expect("reload");
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(300))
        .expect("connections");
    assert_eq!(report.answered(), 300, "{:?}", report.failures);
    let got = |i: usize| {
        report
            .counts
            .get(&Topology::backend_name(i))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "300 new connections with 50 held by b1: b1 {}, b2 {}, b3 {}",
        got(1),
        got(2),
        got(3)
    );
    assert_eq!(got(1), 0);
    // Equally loaded, they share: each about 150 (ties are drawn per flow).
    assert!(got(2) >= 60 && got(3) >= 60, "{:?}", report.counts);
    streams.assert_all_answer(1, Duration::from_millis(10), "after the new connections");
    assert_eq!(open_connections(&daemon, 1), 50);
    drop(streams);
    // The 50 closed: their FINs take them off backend 1's count.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while open_connections(&daemon, 1) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "b1's count stays above 0"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_backend_at_max_connections_takes_no_more_and_a_full_listener_refuses() {
    require_root("a_backend_at_max_connections_takes_no_more_and_a_full_listener_refuses");
    let topo = Topology::builder()
        .tag("maxconn")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("maxconn"), &[1, 1]);
    config.listeners.retain(|l| l.name != UDP_LISTENER);
    let pool = config.group_mut(POOL_GROUP);
    pool.backends[0].max_connections = Some(5);
    pool.backends[1].max_connections = Some(10);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 15, Duration::from_secs(2))
            .expect("15 long connections");
    let counts = streams.counts();
    assert_eq!(
        (
            counts.get(&Topology::backend_name(1)).copied(),
            counts.get(&Topology::backend_name(2)).copied()
        ),
        (Some(5), Some(10)),
        "{counts:?}"
    );
    assert_eq!(
        (open_connections(&daemon, 1), open_connections(&daemon, 2)),
        (5, 10)
    );
    // Full: a new connection's SYNs are dropped (counted), and it times out.
    let mut options = TrafficOptions::new(3);
    options.timeout = Duration::from_millis(300);
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &options).expect("connections");
    assert_eq!(report.answered(), 0, "{:?}", report.counts);
    let status = daemon.status().expect("status");
    let dropped = status
        .listeners
        .iter()
        .find(|l| l.name == TCP_LISTENER)
        .expect("listener")
        .at_capacity;
    assert!(dropped >= 3, "{dropped}");
    streams.assert_all_answer(1, Duration::from_millis(10), "at capacity");
}
