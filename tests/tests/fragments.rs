//! Fragmented UDP through the VIP: 3000-byte requests and 3000-byte answers cross veths with an
//! MTU of 1500, so the client's kernel fragments every request and the backend's every answer;
//! slb balances the request's fragments to one backend and translates every fragment of the
//! answer, so the client reassembles datagrams whose source is the VIP.

use std::net::SocketAddr;
use std::path::Path;

use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::fragmented_udp_request;
use slb_tests::{in_netns, require_root, vip_udp, SlbConfig, SlbDaemon, Topology};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const REQUESTS: usize = 100;
const PAYLOAD: usize = 3000;

#[test]
fn fragmented_udp_requests_and_answers_go_through_the_vip() {
    require_root("fragmented_udp_requests_and_answers_go_through_the_vip");
    let topo = Topology::builder()
        .tag("frag")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("frag"), &[1, 1]);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");

    let results = in_netns(topo.client_ns(), || {
        (0..REQUESTS)
            .map(|i| fragmented_udp_request(i, vip_udp(), PAYLOAD))
            .collect::<Vec<_>>()
    })
    .expect("enter the client namespace");
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    let answered: Vec<&(String, SocketAddr)> = results.iter().flatten().collect();
    let backends: std::collections::BTreeSet<&str> =
        answered.iter().map(|(b, _)| b.as_str()).collect();
    println!(
        "{} of {REQUESTS} {PAYLOAD}-byte requests answered by {backends:?}; failures: {failures:#?}",
        answered.len()
    );
    assert_eq!(answered.len(), REQUESTS, "{failures:#?}");
    assert!(
        answered
            .iter()
            .all(|(_, peer)| peer.ip() == slb_tests::CLIENT_ADDR),
        "backends see the client's address"
    );
    assert_eq!(backends.len(), 2, "requests reach both backends");

    // Each request and each answer is 3 fragments: 2 later ones each way per exchange.
    let status = daemon.status().expect("slb status");
    let counters = &status.counters;
    println!("counters: {counters:#?}");
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);
    assert!(
        count("fragments_balanced") >= 2 * REQUESTS as u64,
        "{counters:#?}"
    );
    assert!(
        count("fragments_translated") >= 2 * REQUESTS as u64,
        "{counters:#?}"
    );
    assert_eq!(count("fragments_dropped_orphan"), 0, "{counters:#?}");

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
