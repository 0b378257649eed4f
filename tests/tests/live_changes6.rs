//! Live changes over IPv6 while 20 long-lived IPv6 TCP connections keep exchanging data: a
//! config reload reweights the backends, `slb backend set-weight` reweights one named by its
//! IPv6 address (`[A]:P`), `slb backend remove` removes another (`A` and `--port`). Streams keep
//! their backends through every change, except those of the removed backend: as documented,
//! a flow keeps its backend "unless that backend is removed", so those are re-balanced and the
//! new backend, which never saw the connection, resets them. New connections follow the
//! weights of the moment and never reach the removed backend.

use std::path::Path;
use std::time::Duration;

use slb_tests::config::{POOL_GROUP, TCP_LISTENER};
use slb_tests::slb::{slb_binary, status_backend, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::SHARE_TOLERANCE_PP;
use slb_tests::{
    require_root, vip6_tcp, Distribution, Family, LongLivedStreams, SlbConfig, SlbDaemon, Topology,
    TrafficOptions, BACKEND_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const STREAMS: usize = 20;
/// New connections per distribution check: a share's standard deviation is at most 1.25
/// percentage points, so 5 points is 4 of them.
const NEW_CONNECTIONS: usize = 1600;

/// `NEW_CONNECTIONS` new connections to the IPv6 VIP: all answered, spread as `weights` say.
fn check_new_connections(topo: &Topology, what: &str, weights: &[(String, u32)]) {
    let tcp = tcp_connections(
        topo.client_ns(),
        vip6_tcp(),
        &TrafficOptions::new(NEW_CONNECTIONS),
    )
    .expect("run TCP connections");
    let table = Distribution::new(what, weights, &tcp.counts);
    println!("{}\n{table}", tcp.summary(what));
    assert!(
        tcp.failures.is_empty() && tcp.answered() == NEW_CONNECTIONS,
        "{}",
        tcp.summary(what)
    );
    assert_eq!(
        tcp.peer_ips(),
        [Family::V6.client_addr()].into(),
        "{what}: backends must see the client's IPv6 address"
    );
    if let Err(e) = table.check(SHARE_TOLERANCE_PP) {
        panic!("{e}");
    }
}

#[test]
fn live_changes_over_ipv6_keep_established_connections() {
    require_root("live_changes_over_ipv6_keep_established_connections");
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("live6")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let instance = unique_instance("live6");
    let mut daemon = SlbDaemon::start(
        &slb,
        topo.slb_ns(),
        &SlbConfig::standard_v6(&instance, &[1, 1, 1]),
    )
    .expect("start slb");

    let mut streams = LongLivedStreams::open(
        topo.client_ns(),
        vip6_tcp(),
        STREAMS,
        Duration::from_secs(3),
    )
    .expect("open long-lived IPv6 streams");
    streams.assert_all_answer(2, Duration::from_millis(50), "before the changes");
    let before = streams.backends();
    println!("streams per backend at the start: {:?}", streams.counts());
    assert!(
        streams.counts().len() >= 2,
        "{STREAMS} streams over 3 equal backends should use more than one: {:?}",
        streams.counts()
    );

    // 1. A reload reweights: 3:1:1.
    let config = SlbConfig::standard_v6(&instance, &[3, 1, 1]);
    let generation = daemon.reload_with(&config).expect("reload slb");
    assert_eq!(generation, 2, "the reload should be the second config");
    streams.assert_all_answer(5, Duration::from_millis(50), "after the reload");
    assert_eq!(
        streams.backends(),
        before,
        "streams must stay on their backends"
    );
    check_new_connections(
        &topo,
        "new connections after the reload (3:1:1)",
        &config.pool_weights(),
    );
    streams.assert_all_answer(1, Duration::from_millis(50), "after the new connections");

    // 2. The admin API reweights backend 2, named `[A]:P`: 3:3:1.
    let b2 = Topology::backend_addr6(2);
    let out = daemon
        .cli([
            "backend",
            "set-weight",
            "-i",
            &instance,
            "--group",
            POOL_GROUP,
            "--address",
            &format!("[{b2}]:{BACKEND_PORT}"),
            "--weight",
            "3",
        ])
        .expect("run slb backend set-weight");
    println!("set-weight: {}", out.stdout.trim());
    out.expect_success().expect("slb backend set-weight");
    assert_eq!(
        daemon.generation(),
        Some(3),
        "a runtime change is a config change"
    );
    let status = daemon.status().expect("slb status");
    let entry = status_backend(&status, TCP_LISTENER, b2).expect("b2 in status");
    assert_eq!(entry.weight, 3, "{entry:#?}");
    streams.assert_all_answer(5, Duration::from_millis(50), "after set-weight");
    assert_eq!(
        streams.backends(),
        before,
        "streams must stay on their backends"
    );
    let weights = SlbConfig::standard_v6(&instance, &[3, 3, 1]).pool_weights();
    check_new_connections(&topo, "new connections after set-weight (3:3:1)", &weights);

    // 3. The admin API removes the first backend that serves a stream, named `A` + `--port`.
    let counts = streams.counts();
    let removed = (1..=3)
        .find(|&i| counts.contains_key(&Topology::backend_name(i)))
        .expect("some backend serves a stream");
    let removed_name = Topology::backend_name(removed);
    let removed_addr = Topology::backend_addr6(removed);
    let mut orphans = streams.split_off_backend(&removed_name);
    let survivors_before = streams.backends();
    println!(
        "removing {removed_name} ({removed_addr}), which serves {} of the {STREAMS} streams",
        orphans.len()
    );
    let out = daemon
        .cli([
            "backend",
            "remove",
            "-i",
            &instance,
            "--group",
            POOL_GROUP,
            "--address",
            &removed_addr.to_string(),
            "--port",
            &BACKEND_PORT.to_string(),
        ])
        .expect("run slb backend remove");
    println!("remove: {}", out.stdout.trim());
    out.expect_success().expect("slb backend remove");
    assert_eq!(
        daemon.generation(),
        Some(4),
        "a runtime change is a config change"
    );
    let status = daemon.status().expect("slb status");
    assert!(
        status_backend(&status, TCP_LISTENER, removed_addr).is_none(),
        "the removed backend is still listed: {status:#?}"
    );

    // The other backends' streams carry on where they were.
    assert!(!streams.is_empty(), "every stream was on {removed_name}");
    streams.assert_all_answer(5, Duration::from_millis(50), "after the removal");
    assert_eq!(
        streams.backends(),
        survivors_before,
        "streams must stay on their backends"
    );
    // The removed backend's streams get no answer any more.
    let orphan_results = orphans.ping_each();
    println!("streams of the removed backend after the removal: {orphan_results:?}");
    assert!(
        orphan_results.iter().all(Result::is_err),
        "a stream of the removed backend {removed_name} still got answers: {orphan_results:?}"
    );

    let weights: Vec<(String, u32)> = weights
        .into_iter()
        .filter(|(name, _)| *name != removed_name)
        .collect();
    check_new_connections(&topo, "new connections after the removal", &weights);
    streams.assert_all_answer(1, Duration::from_millis(50), "at the end");

    drop((streams, orphans));
    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
