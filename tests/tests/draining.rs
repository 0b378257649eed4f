//! `slb backend set-weight ... --weight 0` drains a backend at runtime: its established
//! connections keep working, new ones go elsewhere; `slb reload` drops the runtime change.

use std::path::Path;
use std::time::Duration;

use slb_tests::config::{POOL_GROUP, TCP_LISTENER};
use slb_tests::slb::{slb_binary, status_backend, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::{
    require_root, vip_tcp, Distribution, LongLivedStreams, SlbConfig, SlbDaemon, Topology,
    TrafficOptions, BACKEND_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");

#[test]
fn draining_keeps_established_connections() {
    require_root("draining_keeps_established_connections");
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("drain")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("drain"), &[1, 1, 1]);
    let pool = config.pool_weights();
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let b1 = Topology::backend_addr(1);

    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 20, Duration::from_secs(3))
            .expect("open long-lived streams");
    let before = streams.backends();
    let on_b1 = before.iter().filter(|b| *b == "b1").count();
    println!("streams per backend: {:?}", streams.counts());
    assert!(
        on_b1 > 0,
        "none of 20 streams landed on b1 (1:1:1): {:?}",
        streams.counts()
    );

    // Drain backend 1 through the admin API.
    let generation = daemon.generation().expect("generation");
    let out = daemon
        .cli([
            "backend",
            "set-weight",
            "-i",
            daemon.instance(),
            "--group",
            POOL_GROUP,
            "--address",
            &b1.to_string(),
            "--port",
            &BACKEND_PORT.to_string(),
            "--weight",
            "0",
        ])
        .expect("run slb backend set-weight");
    println!("set-weight: {}", out.stdout.trim());
    out.expect_success().expect("slb backend set-weight 0");
    let drained_generation = daemon.generation().expect("generation");
    assert_eq!(
        drained_generation,
        generation + 1,
        "a runtime change is a config change"
    );

    // Established streams, b1's included, keep answering, on the same backends.
    streams.assert_all_answer(5, Duration::from_millis(200), "after draining b1");
    assert_eq!(
        streams.backends(),
        before,
        "streams must stay on their backends"
    );

    let n = 600;
    let drained = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(n))
        .expect("new connections while b1 drains");
    println!(
        "{}\n{}",
        drained.summary("new connections while b1 drains"),
        Distribution::new(
            "while b1 drains",
            &SlbConfig::standard(daemon.instance(), &[0, 1, 1]).pool_weights(),
            &drained.counts
        )
    );
    assert!(
        drained.failures.is_empty() && drained.answered() == n,
        "{}",
        drained.summary("new connections while b1 drains")
    );
    assert!(
        !drained.counts.contains_key("b1"),
        "a draining backend got new connections: {:?}",
        drained.counts
    );

    let status = daemon.status().expect("slb status");
    let changes = &status.runtime_changes;
    println!("runtime_changes: {changes:?}");
    assert!(!changes.is_empty(), "no runtime change listed: {status:#?}");
    let entry = status_backend(&status, TCP_LISTENER, b1).expect("b1 in status");
    assert_eq!(entry.weight, 0, "{entry:#?}");
    assert!(
        entry.connections >= on_b1 as u64,
        "status should count b1's {on_b1} established streams: {entry:#?}"
    );

    // The file still says weight 1: a reload drops the runtime change.
    let out = daemon
        .cli(["reload", "-i", daemon.instance()])
        .expect("run slb reload");
    println!("reload: {}", out.stdout.trim());
    out.expect_success().expect("slb reload");
    assert_eq!(
        daemon.generation(),
        Some(drained_generation + 1),
        "the reload should be the next generation"
    );
    let status = daemon.status().expect("slb status");
    assert_eq!(
        status.runtime_changes.len(),
        0,
        "the reload should drop runtime changes: {status:#?}"
    );
    let entry = status_backend(&status, TCP_LISTENER, b1).expect("b1 in status");
    assert_eq!(entry.weight, 1, "{entry:#?}");

    let restored = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(n))
        .expect("new connections after the reload");
    let table = Distribution::new("after the reload", &pool, &restored.counts);
    println!(
        "{}\n{table}",
        restored.summary("new connections after the reload")
    );
    assert!(
        restored.failures.is_empty() && restored.answered() == n,
        "{}",
        restored.summary("new connections after the reload")
    );
    let b1_share = table.rows[0].share_pct;
    assert!(
        b1_share >= 20.0,
        "b1 should get about a third of new connections again, got {b1_share:.1}%\n{table}"
    );

    streams.assert_all_answer(2, Duration::from_millis(100), "after the reload");
    assert_eq!(
        streams.backends(),
        before,
        "streams must stay on their backends"
    );

    drop(streams);
    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
