//! A listener's admission policy on real traffic: an access list that refuses one client
//! address and serves another, changed live (established flows kept, then cut), and a limit on
//! new connections under a bounded burst.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use slb_tests::config::TCP_LISTENER;
use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::{tcp_connections, tcp_request_from};
use slb_tests::{
    require_root, vip6_tcp, vip_tcp, LongLivedStreams, SlbConfig, SlbDaemon, Topology,
    TrafficOptions, CLIENT_ADDR, CLIENT_ADDR6,
};
use slb_user::config::{Acl, AclEstablished, AclMode};
use slb_user::status::ListenerStatus;

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
/// The client namespace's second address: another client.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 3);

fn tcp_listener(daemon: &SlbDaemon) -> ListenerStatus {
    daemon
        .status()
        .expect("status")
        .listeners
        .into_iter()
        .find(|l| l.name == TCP_LISTENER)
        .expect("the TCP listener in status")
}

/// How many of `n` connection attempts from `source` to the VIP of its family (TCP listener)
/// were answered, each given 300 ms.
fn answered_from(topo: &Topology, source: impl Into<IpAddr>, n: usize) -> usize {
    let source = source.into();
    let target = if source.is_ipv4() {
        vip_tcp()
    } else {
        vip6_tcp()
    };
    (0..n)
        .filter(|_| {
            tcp_request_from(topo.client_ns(), source, target, Duration::from_millis(300)).is_ok()
        })
        .count()
}

fn pin_this_thread_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

fn deny(config: &mut SlbConfig, client: Ipv4Addr, established: AclEstablished) {
    config.listener_mut(TCP_LISTENER).acl = Some(Acl {
        mode: AclMode::Deny,
        cidrs: vec![format!("{client}/32")],
        established,
    });
}

#[test]
fn an_access_list_refuses_its_clients_and_a_live_change_keeps_or_cuts_their_flows() {
    require_root("an_access_list_refuses_its_clients_and_a_live_change_keeps_or_cuts_their_flows");
    let topo = Topology::builder()
        .tag("acl")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    topo.exec_in(
        topo.client_ns(),
        [
            "ip",
            "addr",
            "add",
            &format!("{OTHER_CLIENT}/24"),
            "dev",
            "c0",
        ],
    )
    .expect("second client address");
    let mut config = SlbConfig::standard(&unique_instance("acl"), &[1, 1]);
    deny(&mut config, OTHER_CLIENT, AclEstablished::Keep);
    let mut daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");

    let allowed = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(200))
        .expect("connections");
    println!(
        "{}",
        allowed.summary(&format!("from {CLIENT_ADDR}, not listed"))
    );
    assert_eq!(allowed.answered(), 200, "{:?}", allowed.failures);
    let refused = answered_from(&topo, OTHER_CLIENT, 10);
    let listener = tcp_listener(&daemon);
    println!(
        "from {OTHER_CLIENT}, denied: {refused} of 10 answered, {} packets dropped by the list",
        listener.acl_dropped
    );
    assert_eq!(refused, 0);
    assert!(listener.acl_dropped >= 10, "{listener:#?}");
    let explained = |from: Ipv4Addr| {
        let out = daemon
            .cli([
                "explain",
                "-i",
                daemon.instance(),
                "--from",
                &format!("{from}:40000"),
                "--to",
                &format!("{}/tcp", vip_tcp()),
            ])
            .expect("run slb explain");
        out.expect_success().expect("slb explain").to_owned()
    };
    let why = explained(OTHER_CLIENT);
    println!("slb explain, denied client:\n{why}");
    assert!(
        why.contains("the listener's access list denies the client"),
        "{why}"
    );
    assert!(explained(CLIENT_ADDR).contains("ring: slot"));

    // The list changes to deny the first client: its open connections go on, its new ones are
    // refused, and the other client is served.
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 10, Duration::from_millis(500))
            .expect("open streams");
    deny(&mut config, CLIENT_ADDR, AclEstablished::Keep);
    daemon.reload_with(&config).expect("reload");
    streams.assert_all_answer(3, Duration::from_millis(50), "denied, established kept");
    let refused_now = answered_from(&topo, CLIENT_ADDR, 5);
    let served_now = answered_from(&topo, OTHER_CLIENT, 10);
    println!(
        "after the change: 10 of 10 established streams answer; new from {CLIENT_ADDR}: {refused_now} of 5; from {OTHER_CLIENT}: {served_now} of 10"
    );
    assert_eq!((refused_now, served_now), (0, 10));

    // The same list, cutting established flows: the streams' next packets are dropped.
    deny(&mut config, CLIENT_ADDR, AclEstablished::Cut);
    daemon.reload_with(&config).expect("reload");
    let cut = streams.ping_each().iter().filter(|r| r.is_err()).count();
    println!("established = \"cut\": {cut} of 10 streams cut");
    assert_eq!(cut, 10);
    assert!(daemon.log_count("panicked") == 0, "{}", daemon.log());
}

#[test]
fn a_burst_of_new_connections_is_held_to_the_listeners_limit() {
    require_root("a_burst_of_new_connections_is_held_to_the_listeners_limit");
    let topo = Topology::builder()
        .tag("ratelim")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("ratelim"), &[1, 1]);
    const PER_SECOND: u32 = 20;
    const BURST: u32 = 30;
    let listener = config.listener_mut(TCP_LISTENER);
    listener.max_new_connections_per_second = Some(PER_SECOND);
    listener.new_connections_burst = Some(BURST);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");

    // 300 connections, 50 at a time, each given up before the client would resend its SYN
    // (1 s): every attempt is one new flow, admitted or dropped.
    let opts = TrafficOptions {
        concurrency: 50,
        timeout: Duration::from_millis(900),
        max_failures: usize::MAX,
        ..TrafficOptions::new(300)
    };
    // From one CPU (the client's threads inherit this thread's affinity, and a veth's XDP runs
    // where its packet was sent): the limit is then exact; two CPUs admitting at the same
    // instant may both pass.
    pin_this_thread_to_cpu(0);
    let started = Instant::now();
    let burst = tcp_connections(topo.client_ns(), vip_tcp(), &opts).expect("connections");
    let elapsed = started.elapsed();
    let listener = tcp_listener(&daemon);
    // The data plane's clock moves a tick (4 ms) at a time: at most one more.
    let most = BURST as f64 + PER_SECOND as f64 * elapsed.as_secs_f64() + 1.0;
    println!(
        "{}; {:.2} s: {} admitted (at most {most:.0} by {BURST} + {PER_SECOND}/s), {} dropped by the limit",
        burst.summary("burst"),
        elapsed.as_secs_f64(),
        listener.new_connections,
        listener.rate_limited
    );
    assert_eq!(burst.attempted, 300);
    assert!(burst.answered() >= BURST as usize, "{:?}", burst.counts);
    assert!(burst.answered() as f64 <= most, "{}", burst.answered());
    assert_eq!(listener.new_connections, burst.answered() as u64);
    assert_eq!(
        listener.rate_limited,
        (300 - burst.answered()) as u64,
        "{:?}",
        burst.failures.iter().take(3).collect::<Vec<_>>()
    );

    // Within the limit, every connection is taken.
    std::thread::sleep(Duration::from_secs(1));
    let paced: usize = (0..10)
        .filter(|_| {
            std::thread::sleep(Duration::from_millis(100));
            tcp_request_from(
                topo.client_ns(),
                IpAddr::V4(CLIENT_ADDR),
                vip_tcp(),
                Duration::from_secs(2),
            )
            .is_ok()
        })
        .count();
    println!("then 10 connections at 10/s: {paced} answered");
    assert_eq!(paced, 10);
}

/// A SYN flood from a denied prefix is dropped before it takes any state: the half-open table
/// is untouched, every flood packet is counted as refused, and the connections of the clients
/// the list admits go on.
#[test]
fn a_flood_from_a_denied_prefix_takes_no_state_and_admitted_clients_go_on() {
    require_root("a_flood_from_a_denied_prefix_takes_no_state_and_admitted_clients_go_on");
    const FLOOD_SYNS: u64 = 50_000;
    let topo = Topology::builder()
        .tag("aclflood")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("aclflood"), &[1, 1]);
    config.listener_mut(TCP_LISTENER).acl = Some(Acl {
        mode: AclMode::Deny,
        cidrs: vec!["10.251.0.0/16".into()],
        established: AclEstablished::Keep,
    });
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 20, Duration::from_secs(2))
            .expect("open streams");
    let counter = |name: &str| {
        let status = daemon.status().expect("status");
        status.counters.get(name).copied().unwrap_or(0)
    };
    let half_open_before = counter("half_open_tracked");
    let dropped_before = tcp_listener(&daemon).acl_dropped;

    let out = slb_tests::exec::run(&mut slb_tests::exec::command_in(
        topo.client_ns(),
        [
            env!("CARGO_BIN_EXE_slb-synflood").to_owned(),
            "--interface".into(),
            "c0".into(),
            "--target".into(),
            vip_tcp().to_string(),
            "--source-cidr".into(),
            "10.251.0.0/16".into(),
            "--count".into(),
            FLOOD_SYNS.to_string(),
            "--duration".into(),
            "10".into(),
            "--rate".into(),
            "50000".into(),
        ],
    ))
    .expect("run slb-synflood");
    let flood: serde_json::Value = serde_json::from_str(out.trim()).expect("slb-synflood's JSON");
    let sent = flood["sent"].as_u64().unwrap_or(0);
    let dropped = tcp_listener(&daemon).acl_dropped - dropped_before;
    let half_open = counter("half_open_tracked") - half_open_before;
    streams.assert_all_answer(3, Duration::from_millis(20), "after the flood");
    let after = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(200))
        .expect("connections");
    println!(
        "flood: {sent} SYNs from 10.251.0.0/16 ({:.0}/s): {dropped} refused by the list, {half_open} half-open entries made; 20 of 20 streams answered; {} of 200 new connections",
        flood["pps"].as_f64().unwrap_or(0.0),
        after.answered()
    );
    assert_eq!(sent, FLOOD_SYNS);
    // Every flood SYN that reached the program was refused (the link may drop some first).
    assert!(
        dropped <= sent && dropped >= sent * 9 / 10,
        "{dropped} of {sent}"
    );
    assert_eq!(half_open, 0, "the flood took no half-open slot");
    assert_eq!(after.answered(), 200, "{:?}", after.failures);
}

/// An IPv6 allow list on real traffic: the listed address is served, its neighbour in the same
/// /64 is refused.
#[test]
fn an_ipv6_allow_list_serves_only_the_listed_client() {
    require_root("an_ipv6_allow_list_serves_only_the_listed_client");
    let topo = Topology::builder()
        .tag("acl6")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let other: std::net::Ipv6Addr = "fd00:200:1::3".parse().unwrap();
    topo.exec_in(
        topo.client_ns(),
        [
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{other}/64"),
            "dev",
            "c0",
            "nodad",
        ],
    )
    .expect("second client address");
    let mut config = SlbConfig::standard_v6(&unique_instance("acl6"), &[1, 1]);
    config.listener_mut(TCP_LISTENER).acl = Some(Acl {
        mode: AclMode::Allow,
        cidrs: vec![format!("{CLIENT_ADDR6}/128")],
        established: AclEstablished::Keep,
    });
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let (listed, refused) = (
        answered_from(&topo, CLIENT_ADDR6, 50),
        answered_from(&topo, other, 10),
    );
    let dropped = tcp_listener(&daemon).acl_dropped;
    println!("IPv6 allow list: {CLIENT_ADDR6} {listed} of 50 answered, {other} {refused} of 10 ({dropped} packets refused)");
    assert_eq!((listed, refused), (50, 0));
    assert!(dropped >= 10, "{dropped}");
}
