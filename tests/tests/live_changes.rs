//! Reloading the config (new backend, new weights) keeps established connections on their
//! backends while new connections follow the new weights.

use std::path::Path;
use std::time::Duration;

use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::SHARE_TOLERANCE_PP;
use slb_tests::{
    require_root, vip_tcp, Distribution, LongLivedStreams, SlbConfig, SlbDaemon, Topology,
    TrafficOptions,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");

#[test]
fn live_changes_keep_established_connections() {
    require_root("live_changes_keep_established_connections");
    let slb = slb_binary();
    let server = Path::new(SERVER);
    let mut topo = Topology::builder()
        .tag("live")
        .backends(3)
        .test_servers(server)
        .build()
        .expect("create topology");
    let instance = unique_instance("live");
    let mut daemon = SlbDaemon::start(
        &slb,
        topo.slb_ns(),
        &SlbConfig::standard(&instance, &[1, 1, 1]),
    )
    .expect("start slb");

    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 20, Duration::from_secs(3))
            .expect("open long-lived streams");
    streams.assert_all_answer(2, Duration::ZERO, "before the reload");
    let before = streams.backends();
    println!(
        "streams per backend before the reload: {:?}",
        streams.counts()
    );
    assert!(
        streams.counts().len() >= 2,
        "20 streams over 3 equal backends should use more than one: {:?}",
        streams.counts()
    );

    // A fourth backend appears, and backend 1 triples its weight: 3:1:1:3.
    let added = topo.add_backend().expect("add backend namespace");
    assert_eq!(added, 4);
    topo.start_backend_server(added, server)
        .expect("start the new backend's server");
    let config = SlbConfig::standard(&instance, &[3, 1, 1, 3]);
    let generation = daemon.reload_with(&config).expect("reload slb");
    assert_eq!(
        generation, 2,
        "the reload should be the second applied config"
    );

    streams.assert_all_answer(5, Duration::ZERO, "after the reload");
    assert_eq!(
        streams.backends(),
        before,
        "streams must stay on their backends"
    );

    let n = 1600;
    let tcp = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(n))
        .expect("run TCP connections");
    let table = Distribution::new(
        "new TCP connections after the reload",
        &config.pool_weights(),
        &tcp.counts,
    );
    println!("{}\n{table}", tcp.summary("TCP"));
    assert!(
        tcp.failures.is_empty() && tcp.answered() == n,
        "{}",
        tcp.summary("TCP")
    );
    if let Err(e) = table.check(SHARE_TOLERANCE_PP) {
        panic!("{e}");
    }

    // The old streams survived the burst of new connections too.
    streams.assert_all_answer(1, Duration::ZERO, "after the new connections");

    drop(streams);
    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
