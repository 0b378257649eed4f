//! A backend's first moments: one added to a running daemon takes no new flows before it has
//! passed its health checks (a dead one: none at all), and a group configured with
//! `initial_health = "unhealthy"` takes none at the daemon's start until its checks pass.

use std::path::Path;
use std::time::Duration;

use slb_tests::config::{health_check, AllUnhealthy, CheckKind, POOL_GROUP, TCP_LISTENER};
use slb_tests::slb::{slb_binary, status_backend, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::{
    require_root, vip_tcp, SlbConfig, SlbDaemon, Topology, TrafficOptions, BACKEND_PORT,
};
use slb_user::config::InitialHealth;

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const CONNECTIONS: usize = 1000;

fn checked(config: &mut SlbConfig, interval: Duration) {
    config.listener_mut(TCP_LISTENER).health_check = Some(health_check(
        CheckKind::Tcp,
        interval,
        Duration::from_millis(200),
        2,
        2,
    ));
}

/// Waits until the TCP listener's backends 1 to `n` pass their checks.
fn wait_healthy(daemon: &SlbDaemon, n: usize, timeout: Duration) {
    for i in 1..=n {
        daemon
            .wait_backend_health(TCP_LISTENER, Topology::backend_addr(i), true, timeout)
            .unwrap_or_else(|e| panic!("b{i} healthy: {e:#}"));
    }
}

#[test]
fn a_backend_added_at_runtime_takes_no_flows_before_its_checks_pass() {
    require_root("a_backend_added_at_runtime_takes_no_flows_before_its_checks_pass");
    let mut topo = Topology::builder()
        .tag("added")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    // Backend 3 exists but its port is closed.
    topo.stop_backend_server(3).expect("stop b3's server");
    let mut config = SlbConfig::standard(&unique_instance("added"), &[1, 1]);
    checked(&mut config, Duration::from_millis(200));
    // slb's interface towards backend 3, for when it is added.
    let mut towards_b3 = config.interfaces[1].clone();
    towards_b3.name = "s3".into();
    config.interfaces.push(towards_b3);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    wait_healthy(&daemon, 2, Duration::from_secs(2));

    let b3 = Topology::backend_addr(3);
    let out = daemon
        .cli([
            "backend",
            "add",
            "-i",
            daemon.instance(),
            "--group",
            POOL_GROUP,
            "--address",
            &format!("{b3}:{BACKEND_PORT}"),
            "--weight",
            "1",
        ])
        .expect("run slb backend add");
    out.expect_success().expect("slb backend add");
    let status = daemon.status().expect("status");
    let added = status_backend(&status, TCP_LISTENER, b3).expect("b3 in status");
    println!(
        "b3 added: healthy {}, {:?}",
        added.healthy,
        added.health.as_ref().map(|h| &h.reason)
    );
    assert!(!added.healthy, "{added:#?}");

    let before = tcp_connections(
        topo.client_ns(),
        vip_tcp(),
        &TrafficOptions::new(CONNECTIONS),
    )
    .expect("connections");
    println!("{}", before.summary("with b3 added, port closed"));
    assert_eq!(before.answered(), CONNECTIONS, "{:?}", before.failures);
    assert_eq!(
        before
            .counts
            .get(&Topology::backend_name(3))
            .copied()
            .unwrap_or(0),
        0,
        "{:?}",
        before.counts
    );
    // Its checks fail: the verdict is confirmed, still unhealthy.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let status = daemon.status().expect("status");
        let b = status_backend(&status, TCP_LISTENER, b3).expect("b3 in status");
        assert!(!b.healthy, "{b:#?}");
        if b.health.as_ref().is_some_and(|h| h.confirmed) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never confirmed: {b:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Its server starts: once its checks pass, it takes its share.
    topo.start_backend_server(3, Path::new(SERVER))
        .expect("start b3's server");
    daemon
        .wait_backend_health(TCP_LISTENER, b3, true, Duration::from_secs(3))
        .expect("b3 passes its checks");
    let after = tcp_connections(
        topo.client_ns(),
        vip_tcp(),
        &TrafficOptions::new(CONNECTIONS),
    )
    .expect("connections");
    println!("{}", after.summary("with b3 passing its checks"));
    assert_eq!(after.answered(), CONNECTIONS, "{:?}", after.failures);
    let b3_share = after
        .counts
        .get(&Topology::backend_name(3))
        .copied()
        .unwrap_or(0);
    assert!(
        b3_share >= CONNECTIONS / 5,
        "b3 got {b3_share} of {CONNECTIONS}: {:?}",
        after.counts
    );
}

#[test]
fn a_group_that_starts_unhealthy_waits_for_its_checks() {
    require_root("a_group_that_starts_unhealthy_waits_for_its_checks");
    let topo = Topology::builder()
        .tag("cold")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("cold"), &[1, 1]);
    // Checks 2 s apart with 2 passes needed: the verdict comes about 2 s after the start.
    checked(&mut config, Duration::from_secs(2));
    config.listener_mut(TCP_LISTENER).on_all_unhealthy = AllUnhealthy::Drop;
    config.group_mut(POOL_GROUP).initial_health = InitialHealth::Unhealthy;
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let status = daemon.status().expect("status");
    for i in 1..=2 {
        let b = status_backend(&status, TCP_LISTENER, Topology::backend_addr(i))
            .expect("backend in status");
        println!(
            "b{i} at start: healthy {}, {:?}",
            b.healthy,
            b.health.as_ref().map(|h| &h.reason)
        );
        assert!(!b.healthy, "{b:#?}");
    }
    wait_healthy(&daemon, 2, Duration::from_secs(6));
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(300))
        .expect("connections");
    assert_eq!(report.answered(), 300, "{:?}", report.failures);
}

/// The drain entry `slb status` shows for the backend at `address`.
fn drain_of(daemon: &SlbDaemon, address: std::net::IpAddr) -> slb_user::applied::Drain {
    daemon
        .status()
        .expect("status")
        .drains
        .into_iter()
        .find(|d| d.backend.address == address)
        .expect("a drain of the backend in slb status")
}

/// `slb backend drain` of backend `i` of the pool, with `extra` options.
fn drain_backend(daemon: &SlbDaemon, i: usize, extra: &[&str]) -> slb_tests::slb::CliOutput {
    let address = format!("{}:{BACKEND_PORT}", Topology::backend_addr(i));
    let mut args = vec![
        "backend",
        "drain",
        "-i",
        daemon.instance(),
        "--group",
        POOL_GROUP,
        "--address",
        &address,
    ];
    args.extend_from_slice(extra);
    daemon.cli(&args).expect("run slb backend drain")
}

#[test]
fn a_drain_ends_when_the_connections_are_gone_or_at_its_deadline() {
    use slb_tests::LongLivedStreams;
    use slb_user::applied::DrainPhase;
    require_root("a_drain_ends_when_the_connections_are_gone_or_at_its_deadline");
    let topo = Topology::builder()
        .tag("drain")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("drain"), &[1, 1, 1]);
    let daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 30, Duration::from_secs(5))
            .expect("open streams");
    let counts = streams.counts();
    let with_streams: Vec<usize> = (1..=3)
        .filter(|&i| counts.contains_key(&Topology::backend_name(i)))
        .collect();
    assert!(with_streams.len() >= 2, "streams on {counts:?}");
    let drain = |i: usize, extra: &[&str]| drain_backend(&daemon, i, extra);

    // 1. Drained with --remove: its streams go on until they close, then it leaves the group.
    let first = with_streams[0];
    let first_addr = std::net::IpAddr::from(Topology::backend_addr(first));
    let mut on_first = streams.split_off_backend(&Topology::backend_name(first));
    let out = drain(first, &["--timeout", "30s", "--remove", "--no-wait"]);
    println!("{}", out.stdout.trim());
    out.expect_success().expect("slb backend drain --no-wait");
    // Its streams are counted (the count between two sweeps of the connection table may be
    // one off: it adds what opened and closed since the last sweep to what the sweep saw).
    let d = drain_of(&daemon, first_addr);
    assert_eq!(d.phase, DrainPhase::Draining, "{d:?}");
    assert!(
        d.left.abs_diff(on_first.len() as u64) <= 1,
        "{d:?}, {} streams",
        on_first.len()
    );
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(300))
        .expect("connections");
    assert_eq!(report.answered(), 300, "{:?}", report.failures);
    assert_eq!(
        report.counts.get(&Topology::backend_name(first)),
        None,
        "a draining backend takes no new connection: {:?}",
        report.counts
    );
    on_first.assert_all_answer(2, Duration::from_millis(50), "while draining");
    let held = on_first.len();
    drop(on_first);
    // A count of 0 is confirmed by the next sweep of the connection table (every 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let d = drain_of(&daemon, first_addr);
        if d.phase == DrainPhase::Removed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{d:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = daemon.status().expect("status");
    assert!(
        status.backends.iter().all(|b| b.address != first_addr),
        "removed once drained"
    );
    println!("b{first}: {held} connections closed, drained and removed");
    streams.assert_all_answer(2, Duration::from_millis(50), "after the removal");

    // 2. A deadline with connections left: the command waits, reports and fails; the backend
    // stays at weight 0 and its connections go on.
    let second = with_streams[1];
    let second_addr = std::net::IpAddr::from(Topology::backend_addr(second));
    let left = streams.counts()[&Topology::backend_name(second)];
    let out = drain(second, &["--timeout", "2s"]);
    println!("{}\n{}", out.stdout.trim(), out.stderr.trim());
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("connection(s) left at the deadline"),
        "{out}"
    );
    assert!(out.stdout.contains("connection(s) left, "), "{out}");
    // Its streams (give or take one, as above; a short connection of earlier traffic may
    // also still be closing).
    let d = drain_of(&daemon, second_addr);
    assert_eq!(d.phase, DrainPhase::TimedOut, "{d:?}");
    assert!(d.left + 1 >= left as u64, "{d:?}, {left} streams");
    let text = daemon
        .cli(["status", "-i", daemon.instance()])
        .expect("status");
    assert!(text.stdout.contains("TIMED OUT with"), "{}", text.stdout);
    streams.assert_all_answer(2, Duration::from_millis(50), "after the deadline");

    // 3. Drained again, followed to the end: the command waits while the connections last and
    // returns once the last one closed.
    let mut on_second = streams.split_off_backend(&Topology::backend_name(second));
    let out = std::thread::scope(|scope| {
        let follower = scope.spawn(|| drain(second, &["--timeout", "30s"]));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while drain_of(&daemon, second_addr).phase != DrainPhase::Draining {
            assert!(
                std::time::Instant::now() < deadline,
                "the drain did not begin"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        on_second.assert_all_answer(1, Duration::from_millis(50), "while followed");
        drop(on_second);
        follower.join().expect("the drain command's thread")
    });
    println!("{}", out.stdout.trim());
    out.expect_success()
        .expect("the drain ends once the connections are gone");
    assert!(
        out.stdout
            .contains("drained, no connection left (weight 0)"),
        "{out}"
    );
    assert_eq!(drain_of(&daemon, second_addr).phase, DrainPhase::Drained);
    streams.assert_all_answer(2, Duration::from_millis(50), "after the second drain");
}

#[test]
fn a_reload_ends_a_drain_and_a_removal_at_the_deadline_ends_what_is_left() {
    use slb_tests::LongLivedStreams;
    use slb_user::applied::DrainPhase;
    require_root("a_reload_ends_a_drain_and_a_removal_at_the_deadline_ends_what_is_left");
    let topo = Topology::builder()
        .tag("drainend")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("drainend"), &[1, 1]);
    let mut daemon = SlbDaemon::start(&slb_binary(), topo.slb_ns(), &config).expect("start slb");
    let mut streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), 20, Duration::from_secs(2))
            .expect("open streams");
    let counts = streams.counts();
    let i = (1..=2)
        .find(|&i| counts.contains_key(&Topology::backend_name(i)))
        .expect("a backend with streams");
    let address = std::net::IpAddr::from(Topology::backend_addr(i));

    // A reload brings the file's weight back and ends the drain.
    drain_backend(&daemon, i, &["--timeout", "30s", "--no-wait"])
        .expect_success()
        .expect("drain");
    assert_eq!(drain_of(&daemon, address).phase, DrainPhase::Draining);
    daemon.reload().expect("reload");
    let status = daemon.status().expect("status");
    assert!(
        status.drains.iter().all(|d| d.backend.address != address),
        "{:?}",
        status.drains
    );
    let b = status_backend(&status, TCP_LISTENER, address).expect("backend in status");
    assert_eq!(b.weight, 1, "{b:#?}");
    streams.assert_all_answer(1, Duration::from_millis(50), "after the reload");

    // With --remove, the deadline removes it and ends its connections; the others go on.
    let mut on_it = streams.split_off_backend(&Topology::backend_name(i));
    let out = drain_backend(&daemon, i, &["--timeout", "1s", "--remove"]);
    println!("{}\n{}", out.stdout.trim(), out.stderr.trim());
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("removed at the deadline, ending its"),
        "{out}"
    );
    assert_eq!(
        drain_of(&daemon, address).phase,
        DrainPhase::RemovedAtDeadline
    );
    let status = daemon.status().expect("status");
    assert!(status.backends.iter().all(|b| b.address != address));
    let ended = on_it.ping_each().iter().filter(|r| r.is_err()).count();
    assert_eq!(
        ended,
        on_it.len(),
        "the removal ends the drained backend's connections"
    );
    streams.assert_all_answer(1, Duration::from_millis(50), "after the removal");
}
