//! Several slb nodes behind an ECMP router ([`ScaleOut`]): each node's slb announces the VIPs
//! through its BIRD, the router spreads the client's flows over the nodes by an L4 hash, and
//! the nodes forward by direct return (L2), so any node carries any flow. The tests check the
//! spread over the nodes, that every node picks the same backend for a flow, and that no
//! connection is lost when a node leaves (`slb stop`, BIRD killed, the node hung), when it comes
//! back, and when one node withdraws because its checks fail while the others serve on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use slb_tests::config::Protocol;
use slb_tests::report::assert_balanced;
use slb_tests::scale_out::{
    listener_name, new_connections_per_node, NodeMode, ScaleOut, BFD_INTERVAL_MS, BFD_MULTIPLIER,
};
use slb_tests::segment::Segment;
use slb_tests::slb::{applied_state, slb_binary, Instance};
use slb_tests::traffic::{tcp_connections, udp_flows};
use slb_tests::{exec, require_root, Family, LongLivedStreams, TrafficOptions, TrafficReport};
use slb_user::maps::CounterMaps;

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const NODES: usize = 3;
const WEIGHTS: [u32; 3] = [1, 2, 3];
const FLOWS: usize = 3000;
/// How far a node's share of the flows may be from a third, in percentage points.
const NODE_SHARE_TOLERANCE_PP: f64 = 5.0;
/// Long-lived connections held open through the node changes.
const STREAMS: usize = 150;
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(15);
/// Every node runs with `--keep-serving`: a SIGTERM leaves its data plane (and its
/// announcements) in place for the next start; `slb stop` withdraws and detaches.
const KEEP_SERVING: &[&str] = &["--keep-serving"];

/// The nodes' slb instances, started with `--keep-serving`; index `k - 1` is node `k`.
fn start_nodes(scale: &ScaleOut, tag: &str, mode: NodeMode) -> Vec<Instance> {
    scale
        .start_slb(&slb_binary(), tag, &WEIGHTS, mode, KEEP_SERVING)
        .expect("start slb on every node")
}

fn all_nodes() -> BTreeSet<usize> {
    (1..=NODES).collect()
}

fn all_but(k: usize) -> BTreeSet<usize> {
    (1..=NODES).filter(|&n| n != k).collect()
}

fn assert_node_shares(what: &str, counts: &[u64]) {
    let total: u64 = counts.iter().sum();
    let shares: Vec<String> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "node {}: {c} ({:.1} %)",
                i + 1,
                *c as f64 * 100.0 / total as f64
            )
        })
        .collect();
    println!("{what}: {}", shares.join(", "));
    assert_eq!(total, FLOWS as u64, "{what}: {counts:?}");
    for (i, c) in counts.iter().enumerate() {
        let share = *c as f64 * 100.0 / total as f64;
        assert!(
            (share - 100.0 / NODES as f64).abs() <= NODE_SHARE_TOLERANCE_PP,
            "{what}: node {} carried {share:.1} % of the flows",
            i + 1
        );
    }
}

fn backend_of_port(report: &TrafficReport) -> BTreeMap<u16, String> {
    report.backend_by_port.clone()
}

#[test]
fn three_nodes_share_the_flows_and_agree_on_every_backend() {
    require_root("ecmp");
    let scale = ScaleOut::build("ecmp", NODES, WEIGHTS.len(), Path::new(SERVER)).expect("build");
    let started = Instant::now();
    let nodes = start_nodes(&scale, "ecmp", NodeMode::Dsr);
    for family in [Family::V4, Family::V6] {
        let took = scale
            .wait_routed(family, &all_nodes(), started, CONVERGENCE_TIMEOUT)
            .expect("every node announces the VIP");
        println!(
            "{family:?}: the router routes the VIP to all {NODES} nodes {} ms after the first slb \
             started",
            took.as_millis()
        );
    }
    let pool_weights: Vec<(String, u32)> = (1..=WEIGHTS.len())
        .map(|i| (slb_tests::Topology::backend_name(i), WEIGHTS[i - 1]))
        .collect();
    for family in [Family::V4, Family::V6] {
        let client = scale.segment.client_ns().to_owned();
        let (tcp, tcp_nodes) =
            new_connections_per_node(&nodes, &listener_name(Protocol::Tcp, family), || {
                tcp_connections(&client, family.vip_tcp(), &TrafficOptions::new(FLOWS))
                    .expect("TCP connections")
            })
            .expect("per-node counts");
        assert_balanced(
            "TCP connections",
            &tcp,
            FLOWS,
            &pool_weights,
            Segment::client_addr(family),
        );
        assert_node_shares(&format!("{family:?} TCP connections per node"), &tcp_nodes);

        let udp_listener = listener_name(Protocol::Udp, family);
        let (udp, udp_nodes) = new_connections_per_node(&nodes, &udp_listener, || {
            udp_flows(
                &client,
                family.vip_udp(),
                20000,
                &TrafficOptions::new(FLOWS),
            )
            .expect("UDP flows")
        })
        .expect("per-node counts");
        assert_balanced(
            "UDP flows",
            &udp,
            FLOWS,
            &pool_weights,
            Segment::client_addr(family),
        );
        assert_node_shares(&format!("{family:?} UDP flows per node"), &udp_nodes);

        // The same flows again, all through one node at a time: every node sends each flow to
        // the backend that answered it the first time, whichever node carried it then.
        let first = backend_of_port(&udp);
        for k in 1..=NODES {
            scale.steer(Some(k)).expect("steer");
            let (again, counted) = new_connections_per_node(&nodes, &udp_listener, || {
                udp_flows(
                    &client,
                    family.vip_udp(),
                    20000,
                    &TrafficOptions::new(FLOWS),
                )
                .expect("UDP flows through one node")
            })
            .expect("per-node counts");
            scale.steer(None).expect("unsteer");
            let differing: Vec<String> = backend_of_port(&again)
                .iter()
                .filter(|(port, backend)| first.get(port) != Some(backend))
                .map(|(port, backend)| {
                    format!("port {port}: {backend}, first {:?}", first.get(port))
                })
                .collect();
            println!(
                "{family:?}: all {FLOWS} flows through node {k}: {} answered, {} by another \
                 backend than the first time; node {k} counted {} flows it had not seen",
                again.answered(),
                differing.len(),
                counted[k - 1]
            );
            assert_eq!(again.answered(), FLOWS, "{family:?} through node {k}");
            assert!(
                differing.is_empty(),
                "{family:?}: node {k} sent {} flows elsewhere: {:?}",
                differing.len(),
                &differing[..differing.len().min(10)]
            );
            // Only node k carried them; the flows it had not seen were new to it.
            let others: u64 = (1..=NODES)
                .filter(|&n| n != k)
                .map(|n| counted[n - 1])
                .sum();
            assert_eq!(others, 0, "{family:?}: {counted:?}");
            assert_eq!(
                counted[k - 1],
                FLOWS as u64 - udp_nodes[k - 1],
                "{family:?}: node {k}"
            );
        }
    }
    drop(nodes);
}

/// How the node leaves in [`nodes_that_leave_and_return_lose_no_connection`].
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// `slb stop`: slb withdraws through BIRD, forwards through its grace, then detaches.
    SlbStopped,
    /// BIRD killed: its BGP connection closes (slb's data plane forwards on meanwhile).
    BirdKilled,
    /// Every frame to and from the node dropped: BFD finds it silent.
    Hung,
}

/// The IPv4 TCP listener's packet counter on each node, read from the maps its data plane
/// counts in (0 for a node whose slb is stopped).
fn tcp_packets(nodes: &[Instance]) -> Vec<u64> {
    let listener = listener_name(Protocol::Tcp, Family::V4);
    nodes
        .iter()
        .map(|n| {
            let dir = slb_user::instance::pin_dir(&n.instance);
            let Ok(maps) = CounterMaps::open(&dir) else {
                return 0;
            };
            let Some(state) = applied_state(&n.instance) else {
                return 0;
            };
            let Some(index) = state
                .listeners
                .iter()
                .find(|l| l.name == listener)
                .map(|l| l.index)
            else {
                return 0;
            };
            maps.listener(index).map_or(0, |c| c.packets)
        })
        .collect()
}

/// Pings each stream in turn and tells which node carried it, by whose listener counted its
/// packets. A straggler of earlier traffic counted meanwhile on another node would blur that:
/// a stream that answered while more than one node counted is pinged again (up to 5 times)
/// until one node alone did. The first ping's outcome is the stream's.
fn ping_tracking_nodes(
    nodes: &[Instance],
    streams: &mut LongLivedStreams,
) -> Vec<(Result<(), String>, Option<usize>)> {
    (0..streams.len())
        .map(|i| {
            let mut outcome = None;
            let mut node = None;
            for _ in 0..5 {
                let before = tcp_packets(nodes);
                let result = streams.ping_one(i);
                let after = tcp_packets(nodes);
                let carried: Vec<usize> = (0..NODES)
                    .filter(|&n| after[n] > before[n])
                    .map(|n| n + 1)
                    .collect();
                let failed = result.is_err();
                outcome.get_or_insert(result);
                // Ambiguous to the end: no node rather than a guess.
                node = (carried.len() == 1).then(|| carried[0]);
                if failed || carried.len() == 1 {
                    break;
                }
            }
            (outcome.expect("pinged at least once"), node)
        })
        .collect()
}

/// Where each stream is carried now (pinging it).
fn stream_nodes(nodes: &[Instance], streams: &mut LongLivedStreams) -> Vec<usize> {
    ping_tracking_nodes(nodes, streams)
        .into_iter()
        .enumerate()
        .map(|(i, (result, node))| {
            result.unwrap_or_else(|e| panic!("stream {i}: {e}"));
            node.unwrap_or_else(|| {
                panic!("stream {i}: no single node counted its packets in 5 pings")
            })
        })
        .collect()
}

/// Pings every stream; prints how those that moved to another node and those that stayed
/// fared, and panics unless every one answered from its backend. Returns where each is now.
fn assert_streams_survive(
    nodes: &[Instance],
    streams: &mut LongLivedStreams,
    before: &[usize],
    when: &str,
) -> Vec<usize> {
    let results = ping_tracking_nodes(nodes, streams);
    let mut moved = (0, 0);
    let mut stayed = (0, 0);
    let mut failures = Vec::new();
    let mut now = Vec::new();
    for (i, (result, node)) in results.into_iter().enumerate() {
        let node = node.unwrap_or(0);
        now.push(node);
        let tally = if before[i] == node {
            &mut stayed
        } else {
            &mut moved
        };
        tally.0 += 1;
        match result {
            Ok(()) => tally.1 += 1,
            Err(e) => failures.push(format!("node {} -> {node}: {e}", before[i])),
        }
    }
    println!(
        "{when}: {} of {} connections that stayed on their node survived, {} of {} that moved \
         to another node",
        stayed.1, stayed.0, moved.1, moved.0
    );
    assert!(
        failures.is_empty(),
        "{when}: {} connections lost:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    now
}

#[test]
fn nodes_that_leave_and_return_lose_no_connection() {
    require_root("ecmpfail");
    let mut scale =
        ScaleOut::build("ecmpfail", NODES, WEIGHTS.len(), Path::new(SERVER)).expect("build");
    let started = Instant::now();
    let mut nodes = start_nodes(&scale, "ecmpfail", NodeMode::Dsr);
    scale
        .wait_routed(Family::V4, &all_nodes(), started, CONVERGENCE_TIMEOUT)
        .expect("every node announces the VIP");
    let mut streams = LongLivedStreams::open(
        scale.segment.client_ns(),
        Family::V4.vip_tcp(),
        STREAMS,
        Duration::from_secs(5),
    )
    .expect("open the streams");
    let mut on = stream_nodes(&nodes, &mut streams);
    let detection = Duration::from_millis(BFD_INTERVAL_MS * BFD_MULTIPLIER);
    println!(
        "{STREAMS} connections on nodes {:?}; BFD declares a silent peer down after {} ms",
        count_by_node(&on),
        detection.as_millis()
    );

    for (k, loss) in [
        (3, Loss::SlbStopped),
        (2, Loss::BirdKilled),
        (1, Loss::Hung),
    ] {
        let on_k = on.iter().filter(|&&n| n == k).count();
        let t = Instant::now();
        let converged = match loss {
            Loss::SlbStopped => scale
                .stop_slb_watching(&mut nodes[k - 1], k, Family::V4, CONVERGENCE_TIMEOUT)
                .map(|(converged, _)| converged),
            Loss::BirdKilled => {
                scale.node_bird(k).kill9();
                scale.wait_routed(Family::V4, &all_but(k), t, CONVERGENCE_TIMEOUT)
            }
            Loss::Hung => {
                scale.hang(k).expect("hang");
                scale.wait_routed(Family::V4, &all_but(k), t, CONVERGENCE_TIMEOUT)
            }
        }
        .expect("the router drops the lost node");
        println!(
            "{loss:?} on node {k} ({on_k} of {STREAMS} connections on it): the router routed \
             around it after {} ms",
            converged.as_millis()
        );
        if matches!(loss, Loss::Hung) {
            // Only BFD can tell a silent node: not before its detection time. (A killed BIRD's
            // kernel closes its BGP connection, which the router hears at once.)
            assert!(
                converged >= detection.saturating_sub(Duration::from_millis(BFD_INTERVAL_MS)),
                "{loss:?}: converged in {converged:?}, before BFD could have noticed"
            );
        }
        let after = assert_streams_survive(
            &nodes,
            &mut streams,
            &on,
            &format!("node {k} lost ({loss:?})"),
        );
        assert!(after.iter().all(|&n| n != k), "{after:?}");

        // The node comes back.
        let t = Instant::now();
        match loss {
            Loss::SlbStopped => {
                nodes[k - 1]
                    .start(KEEP_SERVING, &[])
                    .expect("start slb again");
            }
            Loss::BirdKilled => scale.node_bird(k).restart().expect("restart BIRD"),
            Loss::Hung => scale.unhang(k).expect("unhang"),
        }
        let back = scale
            .wait_routed(Family::V4, &all_nodes(), t, CONVERGENCE_TIMEOUT)
            .expect("the node is routed again");
        println!(
            "node {k} back ({loss:?} undone): routed again after {} ms",
            back.as_millis()
        );
        on = assert_streams_survive(
            &nodes,
            &mut streams,
            &after,
            &format!("node {k} back after {loss:?}"),
        );
    }

    // Node 2's checks fail (its own packets to the backends' port are dropped; the data
    // plane's are not): every backend is unhealthy there, so node 2 withdraws while the others
    // serve on; once its checks pass again, it announces again.
    let k = 2;
    let t = Instant::now();
    exec::exec_in(
        scale.segment.node_ns(k),
        [
            "nft",
            "add table inet slb_test_checks; \
             add chain inet slb_test_checks out { type filter hook output priority 0; }; \
             add rule inet slb_test_checks out tcp dport 80 drop",
        ],
    )
    .expect("block node 2's checks");
    let withdrawn = scale
        .wait_routed(Family::V4, &all_but(k), t, CONVERGENCE_TIMEOUT)
        .expect("node 2 withdraws");
    // The IPv6 VIP's own checks fail in their own time.
    scale
        .wait_routed(Family::V6, &all_but(k), t, CONVERGENCE_TIMEOUT)
        .expect("node 2 withdraws the IPv6 VIP");
    println!(
        "node {k}'s checks fail: withdrawn after {} ms (checks every 200 ms, 2 failures)",
        withdrawn.as_millis()
    );
    let status = nodes[k - 1]
        .cli(["status", "-i", &nodes[k - 1].instance])
        .expect("status");
    let text = status.expect_success().expect("status").to_owned();
    assert!(
        text.contains("withdrawn")
            && text.contains("every backend with weight is unhealthy")
            && !text.contains(" announced "),
        "{text}"
    );
    let include = std::fs::read_to_string(scale.include_file(k)).expect("include file");
    assert!(!include.contains("route "), "{include}");
    let after = assert_streams_survive(&nodes, &mut streams, &on, "node 2's checks failing");
    let t = Instant::now();
    exec::exec_in(
        scale.segment.node_ns(k),
        ["nft", "delete", "table", "inet", "slb_test_checks"],
    )
    .expect("unblock");
    let announced = scale
        .wait_routed(Family::V4, &all_nodes(), t, CONVERGENCE_TIMEOUT)
        .expect("node 2 announces again");
    println!(
        "node {k}'s checks pass again: announced after {} ms",
        announced.as_millis()
    );
    on = assert_streams_survive(
        &nodes,
        &mut streams,
        &after,
        "node 2's checks passing again",
    );

    // A restart with --keep-serving withdraws nothing: the route keeps all three nodes
    // throughout (looked at every few milliseconds), and the connections answer.
    let k = 1;
    nodes[k - 1].current().sigterm().expect("SIGTERM");
    assert_routed_throughout(&scale, Duration::from_secs(2), "node 1's daemon stopped");
    on = assert_streams_survive(
        &nodes,
        &mut streams,
        &on,
        "node 1's daemon stopped, data plane on",
    );
    nodes[k - 1]
        .start(KEEP_SERVING, &[])
        .expect("start slb again on the kept data plane");
    assert_routed_throughout(&scale, Duration::from_secs(2), "node 1's daemon restarted");
    on = assert_streams_survive(&nodes, &mut streams, &on, "node 1's daemon restarted");
    println!("node {k} restarted with --keep-serving: all {NODES} nodes routed throughout");

    // A daemon killed leaves its data plane and its announcement; `slb stop` then withdraws
    // the announcement before it removes the data plane.
    nodes[k - 1].current().kill9().expect("kill -9 slb");
    assert_routed_throughout(&scale, Duration::from_secs(1), "node 1's daemon killed");
    let (converged, out) = scale
        .stop_slb_watching(&mut nodes[k - 1], k, Family::V4, CONVERGENCE_TIMEOUT)
        .expect("slb stop after kill -9 withdraws");
    assert!(
        out.stdout.contains("withdrew the daemon's announcements"),
        "{out}"
    );
    println!(
        "node {k}'s daemon killed, then `slb stop`: routed around after {} ms",
        converged.as_millis()
    );
    assert_streams_survive(&nodes, &mut streams, &on, "slb stop after kill -9");
    drop(streams);
    drop(nodes);
}

fn count_by_node(on: &[usize]) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for n in on {
        *counts.entry(*n).or_default() += 1;
    }
    counts
}

/// Checks every few milliseconds for `period` that the router routes to every node.
fn assert_routed_throughout(scale: &ScaleOut, period: Duration, when: &str) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert_eq!(
            scale.routed_nodes(Family::V4).expect("route"),
            all_nodes(),
            "{when}: a node was withdrawn"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Full NAT on several nodes: each node maps flows to its own SNAT address, which it announces
/// with the VIP, so the backends' replies (routed by the router) come back to the node that
/// made the mapping. A flow that ECMP moves to another node gets another SNAT address there,
/// which its backend takes for another connection: the connections on a lost node are lost,
/// the others survive (the lost node is the middle next hop, whose removal moves no other
/// node's flows).
#[test]
fn full_nat_nodes_announce_their_own_snat_addresses() {
    require_root("ecmpnat");
    let scale = ScaleOut::build("ecmpnat", NODES, WEIGHTS.len(), Path::new(SERVER)).expect("build");
    let started = Instant::now();
    let mut nodes = start_nodes(&scale, "ecmpnat", NodeMode::FullNat);
    scale
        .wait_routed(Family::V4, &all_nodes(), started, CONVERGENCE_TIMEOUT)
        .expect("every node announces the VIP");
    for k in 1..=NODES {
        scale
            .wait_routed_of(
                ScaleOut::snat_addr(k),
                &BTreeSet::from([k]),
                started,
                CONVERGENCE_TIMEOUT,
            )
            .expect("each node announces its SNAT address");
    }
    let client = scale.segment.client_ns().to_owned();
    let (tcp, per_node) =
        new_connections_per_node(&nodes, &listener_name(Protocol::Tcp, Family::V4), || {
            tcp_connections(&client, Family::V4.vip_tcp(), &TrafficOptions::new(FLOWS))
                .expect("TCP connections")
        })
        .expect("per-node counts");
    println!("{}", tcp.summary("full NAT TCP connections"));
    assert_eq!(tcp.answered(), FLOWS, "{}", tcp.summary("full NAT"));
    assert_node_shares("full NAT TCP connections per node", &per_node);
    let snat: BTreeSet<std::net::IpAddr> = (1..=NODES).map(ScaleOut::snat_addr).collect();
    assert_eq!(
        tcp.peer_ips(),
        snat,
        "the backends saw the nodes' SNAT addresses"
    );

    let mut streams = LongLivedStreams::open(
        &client,
        Family::V4.vip_tcp(),
        STREAMS / 2,
        Duration::from_secs(2),
    )
    .expect("open the streams");
    let on = stream_nodes(&nodes, &mut streams);
    let k = 2;
    let (converged, _) = scale
        .stop_slb_watching(&mut nodes[k - 1], k, Family::V4, CONVERGENCE_TIMEOUT)
        .expect("the router drops node 2");
    assert!(
        scale
            .routed_nodes_of(ScaleOut::snat_addr(k))
            .expect("route")
            .is_empty(),
        "node 2's SNAT address is withdrawn with it"
    );
    let results = ping_tracking_nodes(&nodes, &mut streams);
    let (mut stayed, mut stayed_ok, mut moved, mut moved_ok) = (0, 0, 0, 0);
    let mut lost_that_stayed = Vec::new();
    for (i, (result, _)) in results.iter().enumerate() {
        if on[i] == k {
            moved += 1;
            moved_ok += usize::from(result.is_ok());
        } else {
            stayed += 1;
            match result {
                Ok(()) => stayed_ok += 1,
                Err(e) => lost_that_stayed.push(e.clone()),
            }
        }
    }
    println!(
        "full NAT, node {k} stopped: routed around after {} ms; {stayed_ok} of {stayed} \
         connections on the other nodes survived, {moved_ok} of {moved} that were on node {k}",
        converged.as_millis()
    );
    assert!(lost_that_stayed.is_empty(), "{lost_that_stayed:?}");

    let t = Instant::now();
    nodes[k - 1]
        .start(KEEP_SERVING, &[])
        .expect("start slb again");
    let back = scale
        .wait_routed(Family::V4, &all_nodes(), t, CONVERGENCE_TIMEOUT)
        .expect("node 2 back");
    println!("node {k} back after {} ms", back.as_millis());
    let (again, per_node) =
        new_connections_per_node(&nodes, &listener_name(Protocol::Tcp, Family::V4), || {
            tcp_connections(&client, Family::V4.vip_tcp(), &TrafficOptions::new(FLOWS))
                .expect("TCP connections")
        })
        .expect("per-node counts");
    assert_eq!(
        again.answered(),
        FLOWS,
        "{}",
        again.summary("after node 2 returned")
    );
    assert_node_shares("full NAT TCP connections per node, node 2 back", &per_node);
    drop(streams);
    drop(nodes);
}
