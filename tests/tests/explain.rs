//! `slb explain` against real traffic: for 1000 UDP flows with chosen source ports the backend
//! explain names (by the listener's ring) is the one that answers each flow, and afterwards
//! explain finds each flow in the connection table with that backend; TCP connections are found
//! there too; `--without` predicts where new flows go once a backend is really removed; and a
//! listener that does not exist is refused with the instance's listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Instant;

use slb_tests::config::POOL_GROUP;
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{tcp_connections, udp_flows};
use slb_tests::{
    require_root, vip_tcp, vip_udp, SlbConfig, SlbDaemon, Topology, TrafficOptions, BACKEND_PORT,
    CLIENT_ADDR,
};
use slb_user::explain::{Explanation, Reason};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const FLOWS: usize = 1000;
/// Source ports of the first flows, and of the new flows after the removal (below the
/// client's ephemeral range, so no other socket holds them).
const FIRST_PORT: u16 = 21000;
const NEW_PORT: u16 = 23000;
const TCP_CONNECTIONS: usize = 200;
const WEIGHTS: [u32; 3] = [1, 2, 3];
/// The backend `--without` names and the test then removes.
const REMOVED: usize = 3;

/// `slb explain --json` for the flows from `ports` of the client to `to`.
fn explain(
    daemon: &SlbDaemon,
    to: &str,
    ports: impl Iterator<Item = u16>,
    extra: &[&str],
) -> Vec<Explanation> {
    let froms: Vec<String> = ports.map(|p| format!("{CLIENT_ADDR}:{p}")).collect();
    let mut args = vec!["explain", "-i", daemon.instance(), "--json", "--to", to];
    for from in &froms {
        args.extend(["--from", from]);
    }
    args.extend_from_slice(extra);
    let out = daemon.cli(&args).expect("run slb explain");
    let stdout = out.expect_success().expect("slb explain");
    let answers: Vec<Explanation> = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("slb explain --json: {e}: {stdout}"));
    assert_eq!(answers.len(), froms.len(), "one answer per flow");
    answers
}

/// Sends one UDP flow from each port `base_port..base_port + FLOWS` and checks that each was
/// answered by the backend `predicted` names for its port.
fn answered_as_predicted(
    topo: &Topology,
    base_port: u16,
    predicted: &BTreeMap<u16, String>,
    predictor: &str,
) {
    let udp = udp_flows(
        topo.client_ns(),
        vip_udp(),
        base_port,
        &TrafficOptions::new(FLOWS),
    )
    .expect("run UDP flows");
    assert!(
        udp.failures.is_empty() && udp.answered() == FLOWS,
        "{}",
        udp.summary("UDP flows")
    );
    let agreeing = predicted
        .iter()
        .filter(|(port, backend)| udp.backend_by_port.get(port) == Some(backend))
        .count();
    println!("{agreeing} of {FLOWS} flows answered by {predictor}");
    for (port, backend) in predicted {
        assert_eq!(
            udp.backend_by_port.get(port),
            Some(backend),
            "source port {port}: {predictor} was {backend}"
        );
    }
}

/// The backend an answer names, as the test server's name (`b<i>`).
fn named(answer: &slb_user::explain::Answer, names: &BTreeMap<IpAddr, String>) -> String {
    let backend = answer
        .backend
        .as_ref()
        .unwrap_or_else(|| panic!("no backend: {answer:?}"));
    assert_eq!(backend.port, BACKEND_PORT, "{answer:?}");
    names
        .get(&backend.address)
        .unwrap_or_else(|| panic!("{} is no backend of the topology", backend.address))
        .clone()
}

/// Backend `i`'s (1-based) share of `weights` in percent, without backend `without`.
fn share(weights: &[u32], i: usize, without: Option<usize>) -> f64 {
    let total: u32 = (1..=weights.len())
        .filter(|&k| Some(k) != without)
        .map(|k| weights[k - 1])
        .sum();
    100.0 * f64::from(weights[i - 1]) / f64::from(total)
}

#[test]
fn explain_names_the_backend_real_packets_reach() {
    require_root("explain_names_the_backend_real_packets_reach");
    let topo = Topology::builder()
        .tag("expl")
        .backends(WEIGHTS.len())
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("expl"), &WEIGHTS);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let names: BTreeMap<IpAddr, String> = (1..=WEIGHTS.len())
        .map(|i| (Topology::backend_addr(i).into(), Topology::backend_name(i)))
        .collect();
    let udp_to = format!("{}/udp", vip_udp());
    let ports = || FIRST_PORT..FIRST_PORT + FLOWS as u16;

    // 1. Before any packet: every flow by its ring slot.
    let started = Instant::now();
    let before = explain(&daemon, &udp_to, ports(), &[]);
    println!("explain of {FLOWS} flows took {:.2?}", started.elapsed());
    let mut predicted = BTreeMap::new();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (port, e) in ports().zip(&before) {
        assert_eq!(e.from, SocketAddr::new(CLIENT_ADDR.into(), port));
        let Some(Reason::Ring {
            size,
            weight_share_pct,
            table_share_pct,
            ..
        }) = &e.answer.reason
        else {
            panic!("a new flow is balanced by the ring: {e:?}");
        };
        assert_eq!(*size, 65537, "{e:?}");
        let backend = named(&e.answer, &names);
        let i = backend[1..].parse::<usize>().unwrap();
        let weight_share = share(&WEIGHTS, i, None);
        assert!(
            weight_share_pct.is_some_and(|w| (w - weight_share).abs() < 0.01)
                && (table_share_pct - weight_share).abs() < 1.0,
            "{backend}'s weight share is {weight_share:.2} %: {e:?}"
        );
        *per_backend.entry(backend.clone()).or_default() += 1;
        predicted.insert(port, backend);
    }
    println!("explain's ring answers per backend: {per_backend:?}");

    // 2. One request per flow: each is answered by the backend explain named.
    answered_as_predicted(&topo, FIRST_PORT, &predicted, "the backend explain named");

    // 3. Now each flow is in the connection table, with the same backend.
    let after = explain(&daemon, &udp_to, ports(), &[]);
    for (port, e) in ports().zip(&after) {
        assert!(
            matches!(
                e.answer.reason,
                Some(Reason::Connection { closing: false, .. })
            ),
            "port {port}: {e:?}"
        );
        assert_eq!(named(&e.answer, &names), predicted[&port], "port {port}");
    }
    println!("{FLOWS} of {FLOWS} flows found in the connection table with that backend");
    // The same, as a person reads it: the first flow now, and a new one, with what a removal
    // would do to each.
    let removed_addr = format!("{}:{BACKEND_PORT}", Topology::backend_addr(REMOVED));
    let out = daemon
        .cli([
            "explain",
            "-i",
            daemon.instance(),
            "--from",
            &format!("{CLIENT_ADDR}:{FIRST_PORT}"),
            "--from",
            &format!("{CLIENT_ADDR}:{}", NEW_PORT - 1),
            "--to",
            &udp_to,
            "--without",
            &removed_addr,
        ])
        .expect("run slb explain");
    let text = out.expect_success().expect("slb explain");
    println!("{text}");
    for needle in [
        "listener udp-echo",
        "connection table: established, last packet",
        "ring: slot ",
        "% of the table; weight share ",
        &format!("without {removed_addr}: the flow would "),
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }

    // 4. TCP: connections that ran are in the connection table (closed: FIN seen) with the
    // backend that answered them.
    let tcp = tcp_connections(
        topo.client_ns(),
        vip_tcp(),
        &TrafficOptions::new(TCP_CONNECTIONS),
    )
    .expect("run TCP connections");
    assert!(
        tcp.failures.is_empty() && tcp.answered() == TCP_CONNECTIONS,
        "{}",
        tcp.summary("TCP connections")
    );
    let tcp_to = format!("{}/tcp", vip_tcp());
    let tcp_ports: Vec<u16> = tcp.backend_by_port.keys().copied().collect();
    let tcp_answers = explain(&daemon, &tcp_to, tcp_ports.iter().copied(), &[]);
    for (port, e) in tcp_ports.iter().zip(&tcp_answers) {
        assert!(
            matches!(e.answer.reason, Some(Reason::Connection { .. })),
            "TCP port {port}: {e:?}"
        );
        assert_eq!(
            named(&e.answer, &names),
            tcp.backend_by_port[port],
            "TCP port {port}"
        );
    }
    println!(
        "{} of {} TCP connections found in the connection table with the backend that answered",
        tcp_answers.len(),
        tcp_ports.len()
    );

    // 5. --without: where new flows would go without b3, then b3 really removed.
    let removed_name = Topology::backend_name(REMOVED);
    let new_ports = || NEW_PORT..NEW_PORT + FLOWS as u16;
    let what_if = explain(&daemon, &udp_to, new_ports(), &["--without", &removed_addr]);
    let mut after_removal = BTreeMap::new();
    let (mut moving, mut staying_elsewhere) = (0, 0);
    for (port, e) in new_ports().zip(&what_if) {
        let now = named(&e.answer, &names);
        let without = e.without.as_ref().expect("a --without answer");
        let then = named(&without.answer, &names);
        assert_ne!(then, removed_name, "port {port}: {e:?}");
        if let Some(Reason::Ring {
            weight_share_pct, ..
        }) = &without.answer.reason
        {
            let i = then[1..].parse::<usize>().unwrap();
            let expected = share(&WEIGHTS, i, Some(REMOVED));
            assert!(
                weight_share_pct.is_some_and(|w| (w - expected).abs() < 0.01),
                "without {removed_name}, {then}'s weight share is {expected:.2} %: {e:?}"
            );
        }
        assert_eq!(without.moves, now != then, "port {port}: {e:?}");
        if now == removed_name {
            assert!(without.moves, "port {port}: {e:?}");
            moving += 1;
        } else if !without.moves {
            staying_elsewhere += 1;
        }
        after_removal.insert(port, then);
    }
    println!(
        "--without {removed_addr}: {moving} of {FLOWS} new flows are {removed_name}'s and would \
         move; {staying_elsewhere} of the others would stay"
    );
    assert!(moving > 0, "some new flows are {removed_name}'s");
    // Established flows keep their backends unless it is the removed one.
    let established = explain(&daemon, &udp_to, ports(), &["--without", &removed_addr]);
    for (port, e) in ports().zip(&established) {
        let without = e.without.as_ref().expect("a --without answer");
        assert_eq!(
            without.moves,
            predicted[&port] == removed_name,
            "established flow from port {port}: {e:?}"
        );
    }

    let out = daemon
        .cli([
            "backend",
            "remove",
            "-i",
            daemon.instance(),
            "--group",
            POOL_GROUP,
            "--address",
            &removed_addr,
        ])
        .expect("run slb backend remove");
    out.expect_success().expect("slb backend remove");
    answered_as_predicted(
        &topo,
        NEW_PORT,
        &after_removal,
        &format!("the backend --without predicted (after removing {removed_name})"),
    );

    // 6. A listener that does not exist: refused, naming the instance's listeners.
    let out = daemon
        .cli([
            "explain",
            "-i",
            daemon.instance(),
            "--from",
            &format!("{CLIENT_ADDR}:1"),
            "--to",
            &format!("{}:54/udp", vip_udp().ip()),
        ])
        .expect("run slb explain");
    assert!(!out.success(), "{out}");
    let e = out.error_summary();
    assert!(
        e.contains("no listener") && e.contains("udp-echo") && e.contains("tcp-echo"),
        "{e}"
    );

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
