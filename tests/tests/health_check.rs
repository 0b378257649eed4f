//! A TCP health check takes a dead backend out of the listener's table within its detection
//! window and lets it back in once it answers again, while a client keeps opening connections.

use std::path::Path;
use std::time::Duration;

use slb_tests::config::{health_check, CheckKind, TCP_LISTENER, UDP_LISTENER};
use slb_tests::slb::{slb_binary, status_backend, unique_instance, unix_ns_now};
use slb_tests::traffic::{ms, per_backend, udp_flows, Attempt, ConnectionLoop};
use slb_tests::{require_root, vip_tcp, Family, SlbConfig, SlbDaemon, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(200);
const HEALTHY_THRESHOLD: u32 = 2;
const UNHEALTHY_THRESHOLD: u32 = 2;
/// Slack on top of the windows the check parameters promise: scheduling, the map write, and
/// the client's attempt in flight.
const MARGIN: Duration = Duration::from_millis(400);
/// How long each phase of steady traffic runs.
const PHASE: Duration = Duration::from_millis(1500);

#[test]
fn health_check_removes_a_dead_backend_and_readmits_it() {
    require_root("health_check_removes_a_dead_backend_and_readmits_it");
    let slb = slb_binary();
    let mut topo = Topology::builder()
        .tag("hc")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("hc"), &[1, 1, 1]);
    config.listener_mut(TCP_LISTENER).health_check = Some(health_check(
        CheckKind::Tcp,
        INTERVAL,
        TIMEOUT,
        HEALTHY_THRESHOLD,
        UNHEALTHY_THRESHOLD,
    ));
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let b2 = Topology::backend_addr(2);
    let detection_window = INTERVAL * UNHEALTHY_THRESHOLD + TIMEOUT;
    let readmission_window = INTERVAL * HEALTHY_THRESHOLD;

    // Checked from the start, and healthy.
    for i in 1..=3 {
        let b = daemon
            .wait_backend_health(
                TCP_LISTENER,
                Topology::backend_addr(i),
                true,
                Duration::from_secs(1),
            )
            .expect("backend healthy at start");
        assert!(b.health.is_some(), "backend {i} is not checked: {b:#?}");
    }

    let client = ConnectionLoop::start(
        topo.client_ns(),
        vip_tcp(),
        2,
        Duration::from_millis(5),
        Duration::from_secs(1),
    );
    std::thread::sleep(PHASE);

    // Backend 2 dies.
    let stopped_at = unix_ns_now();
    topo.stop_backend_server(2).expect("stop backend 2");
    let unhealthy = daemon
        .wait_backend_health(TCP_LISTENER, b2, false, Duration::from_secs(5))
        .expect("backend 2 is declared unhealthy");
    let observed_unhealthy_at = unix_ns_now();
    let health = unhealthy.health.as_ref().expect("health.since_unix_ns");
    let reason = health.reason.clone();
    let verdict_at = health.since_unix_ns;
    let detection_ns = verdict_at as i128 - stopped_at as i128;
    let observed_ns = observed_unhealthy_at as i128 - stopped_at as i128;
    println!(
        "detection: verdict {:.1} ms after the stop, seen in `slb status` after {:.1} ms \
         (window interval×unhealthy_threshold+timeout = {detection_window:?}); reason: {reason}",
        ms(detection_ns),
        ms(observed_ns)
    );
    assert!(
        !reason.is_empty(),
        "no reason for the verdict: {unhealthy:#?}"
    );
    assert!(!health.healthy, "{unhealthy:#?}");
    assert!(
        detection_ns >= 0
            && detection_ns as u128 <= (detection_window + Duration::from_millis(100)).as_nanos(),
        "verdict {:.1} ms after the stop, the window is {detection_window:?}",
        ms(detection_ns)
    );
    assert!(
        observed_ns as u128 <= (detection_window + MARGIN).as_nanos(),
        "status showed the verdict {:.1} ms after the stop",
        ms(observed_ns)
    );
    let cutoff = stopped_at + (detection_window + MARGIN).as_nanos();
    std::thread::sleep(PHASE + detection_window + MARGIN);

    // Backend 2 comes back.
    let restart_began = unix_ns_now();
    topo.restart_backend_server(2).expect("restart backend 2");
    let restarted_at = unix_ns_now();
    daemon
        .wait_backend_health(TCP_LISTENER, b2, true, Duration::from_secs(5))
        .expect("backend 2 is declared healthy again");
    let readmitted_ns = unix_ns_now() as i128 - restarted_at as i128;
    println!(
        "readmission: `slb status` showed backend 2 healthy {:.1} ms after its server listened again \
         (healthy_threshold×interval = {readmission_window:?})",
        ms(readmitted_ns)
    );
    let readmit_from = restarted_at + (readmission_window + MARGIN).as_nanos();
    let wait = Duration::from_nanos(
        (readmit_from.saturating_sub(unix_ns_now()) as u64).min(10_000_000_000),
    );
    std::thread::sleep(wait + PHASE);
    let attempts = client.stop().expect("client loop");

    // Phases: before the stop, between the cutoff and the restart, after readmission.
    let before: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.end_unix_ns < stopped_at)
        .collect();
    let removed: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_unix_ns >= cutoff && a.end_unix_ns < restart_began)
        .collect();
    let back: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_unix_ns >= readmit_from)
        .collect();
    let failures: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    println!(
        "{} connections: before the stop {:?}; after the detection window, while down {:?}; \
         after readmission {:?}; {} failed",
        attempts.len(),
        per_backend(before.iter().copied()),
        per_backend(removed.iter().copied()),
        per_backend(back.iter().copied()),
        failures.len()
    );
    let first = failures.iter().min_by_key(|a| a.start_unix_ns);
    let last = failures.iter().max_by_key(|a| a.start_unix_ns);
    if let (Some(first), Some(last)) = (first, last) {
        println!(
            "failures started between {:+.1} ms and {:+.1} ms after the stop (cutoff {:+.0} ms), e.g. {}",
            ms(first.start_unix_ns as i128 - stopped_at as i128),
            ms(last.start_unix_ns as i128 - stopped_at as i128),
            ms((cutoff - stopped_at) as i128),
            first.outcome.as_ref().unwrap_err()
        );
    }

    let before_counts = per_backend(before.iter().copied());
    assert_eq!(
        before_counts.len(),
        3,
        "all three backends should serve before the stop: {before_counts:?}"
    );
    assert!(
        before.iter().all(|a| a.outcome.is_ok()),
        "failures before the stop"
    );
    // Failures only inside the detection window.
    let late: Vec<String> = failures
        .iter()
        .filter(|a| a.start_unix_ns >= cutoff || a.end_unix_ns < stopped_at)
        .map(|a| {
            format!(
                "{:+.1} ms: {}",
                ms(a.start_unix_ns as i128 - stopped_at as i128),
                a.outcome.as_ref().unwrap_err()
            )
        })
        .collect();
    assert!(
        late.is_empty(),
        "connections failed outside the detection window (cutoff {:.0} ms after the stop):\n  {}",
        ms((cutoff - stopped_at) as i128),
        late.join("\n  ")
    );
    assert!(
        removed.len() >= 50,
        "too few connections while backend 2 was out: {}",
        removed.len()
    );
    let removed_counts = per_backend(removed.iter().copied());
    assert!(
        !removed_counts.contains_key("b2"),
        "backend 2 got new connections after the detection window: {removed_counts:?}"
    );
    let back_counts = per_backend(back.iter().copied());
    assert!(
        back_counts.get("b2").copied().unwrap_or(0) > 0,
        "backend 2 got no new connections after it was readmitted: {back_counts:?}"
    );

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}

/// A dead UDP backend must stay unhealthy while it is dead. A UDP check without `expect` learns
/// of a dead server only from ICMP port unreachable, which the backends' kernels send at most
/// once a second per destination (after a burst of 6), so slb requires such checks to probe at
/// most once a second (it refuses faster ones); at that pace every probe of the dead server meets
/// its port unreachable.
#[test]
fn udp_health_check_keeps_a_dead_backend_unhealthy() {
    require_root("udp_health_check_keeps_a_dead_backend_unhealthy");
    udp_check_keeps_a_dead_backend_unhealthy(Family::V4, "hcudp");
}

/// The same over IPv6: the probes and the backends' ICMPv6 port unreachable (rate-limited as
/// ICMP's) travel over IPv6.
#[test]
fn udp_health_check_keeps_a_dead_ipv6_backend_unhealthy() {
    require_root("udp_health_check_keeps_a_dead_ipv6_backend_unhealthy");
    udp_check_keeps_a_dead_backend_unhealthy(Family::V6, "hcudp6");
}

fn udp_check_keeps_a_dead_backend_unhealthy(family: Family, tag: &str) {
    let slb = slb_binary();
    let mut topo = Topology::builder()
        .tag(tag)
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard_in(family, &unique_instance(tag), &[1, 1, 1]);
    config.listener_mut(UDP_LISTENER).health_check = Some(health_check(
        CheckKind::Udp,
        Duration::from_secs(1),
        Duration::from_millis(500),
        HEALTHY_THRESHOLD,
        UNHEALTHY_THRESHOLD,
    ));
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let b2 = family.backend_addr(2);

    let stopped_at = unix_ns_now();
    topo.stop_backend_server(2).expect("stop backend 2");
    let verdict = daemon
        .wait_backend_health(UDP_LISTENER, b2, false, Duration::from_secs(5))
        .expect("backend 2 is declared unhealthy");
    println!(
        "{} udp check: backend 2 unhealthy {:.1} ms after the stop: {}",
        family.name(),
        ms(verdict.health.as_ref().map_or(0, |h| h.since_unix_ns) as i128 - stopped_at as i128),
        verdict.health.as_ref().map_or("", |h| h.reason.as_str())
    );
    // Still dead 4 s (four more probes) later: still unhealthy, and new flows avoid it.
    std::thread::sleep(Duration::from_secs(4));
    let status = daemon.status().expect("slb status");
    let now = status_backend(&status, UDP_LISTENER, b2).expect("backend 2 in status");
    assert!(
        !now.healthy,
        "the dead backend 2 is healthy again: {now:#?}\n{}",
        daemon.log()
    );
    let mut opts = TrafficOptions::new(60);
    opts.timeout = Duration::from_millis(500);
    let flows = udp_flows(topo.client_ns(), family.vip_udp(), 40000, &opts).expect("UDP flows");
    println!(
        "{}",
        flows.summary("new UDP flows 4 s after backend 2 was declared unhealthy")
    );
    assert!(
        flows.failures.is_empty() && !flows.counts.contains_key("b2"),
        "{}",
        flows.summary("new UDP flows 4 s after backend 2 was declared unhealthy")
    );
}
