//! Restarts without dropping traffic: with `--keep-serving`, the data plane outlives the
//! daemon (kill -9 or SIGTERM), the next `slb run` adopts maps, links, counters and health
//! verdicts, and `slb stop` removes everything. A restart whose maps would not fit the pins
//! (another `maglev_table_size`) is refused and leaves the old data plane serving.

mod ops_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ops_common::{
    backend_new_connections, has_xdp, instance_stopped_on_drop, link_show,
    listener_new_connections, ADOPT_LINE,
};
use slb_tests::config::{health_check, CheckKind, TCP_LISTENER};
use slb_tests::slb::{
    pin_dir, slb_binary, state_dir, status_backend, unique_instance, unix_ns_now, Instance, Status,
    READY_LINE, START_TIMEOUT,
};
use slb_tests::traffic::{tcp_connections, Attempt, ConnectionLoop};
use slb_tests::{require_root, vip_tcp, LongLivedStreams, SlbConfig, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const STREAMS: usize = 20;
const PING_PERIOD: Duration = Duration::from_millis(50);
const KEEP: &[&str] = &["--keep-serving"];

/// Pings every long-lived stream every [`PING_PERIOD`] on a thread of its own.
struct Pinger {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(LongLivedStreams, PingStats)>>,
}

#[derive(Debug, Default)]
struct PingStats {
    rounds: u64,
    pings: u64,
    failures: Vec<String>,
    slowest_round: Duration,
}

impl Pinger {
    fn start(mut streams: LongLivedStreams) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut stats = PingStats::default();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let failures = streams.ping_all();
                    stats.slowest_round = stats.slowest_round.max(start.elapsed());
                    stats.rounds += 1;
                    stats.pings += streams.len() as u64;
                    for f in failures {
                        stats.failures.push(format!("round {}: {f}", stats.rounds));
                    }
                    std::thread::sleep(PING_PERIOD);
                }
                (streams, stats)
            })
        };
        Pinger {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> (LongLivedStreams, PingStats) {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().expect("pinger runs").join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Attempts of a connection loop that started at or after `from` and ended by `to` (unix ns).
fn within(attempts: &[Attempt], from: u128, to: u128) -> (usize, usize) {
    let inside: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_unix_ns >= from && a.end_unix_ns <= to)
        .collect();
    let ok = inside.iter().filter(|a| a.outcome.is_ok()).count();
    (ok, inside.len() - ok)
}

fn health_since(status: &Status) -> BTreeMap<String, (bool, u128)> {
    status
        .backends
        .iter()
        .filter(|b| b.listener == TCP_LISTENER)
        .map(|b| {
            (
                b.address.to_string(),
                b.health
                    .as_ref()
                    .map_or((false, 0), |h| (h.healthy, h.since_unix_ns)),
            )
        })
        .collect()
}

fn assert_serving_without_daemon(inst: &Instance, when: &str) {
    assert!(
        pin_dir(&inst.instance).join("links").join("s0").exists(),
        "{when}: the pinned link of s0 is gone"
    );
    let link = link_show(&inst.netns, "s0");
    assert!(has_xdp(&link), "{when}: s0 has no XDP program: {link}");
}

#[test]
fn restart_keeps_connections() {
    require_root("restart_keeps_connections");
    let slb = slb_binary();
    let mut topo = Topology::builder()
        .tag("rst")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let mut config = SlbConfig::standard(&unique_instance("rst"), &[1, 1, 1]);
    config.listener_mut(TCP_LISTENER).health_check = Some(health_check(
        CheckKind::Tcp,
        Duration::from_millis(200),
        Duration::from_millis(200),
        2,
        2,
    ));
    // Declared after the topology: dropped (slb stop) before the namespaces go.
    let mut inst =
        instance_stopped_on_drop(&slb, topo.slb_ns(), &config.instance, &config.to_toml());
    inst.start(KEEP, &[]).expect("start slb --keep-serving");
    let gen_a = inst.generation().expect("generation of the first run");
    for i in 1..=3 {
        let addr = Topology::backend_addr(i);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let status = inst.status().expect("slb status");
            let b = status_backend(&status, TCP_LISTENER, addr).expect("backend in status");
            if b.health.as_ref().is_some_and(|h| h.healthy) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "backend {addr} not healthy: {b:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let streams =
        LongLivedStreams::open(topo.client_ns(), vip_tcp(), STREAMS, Duration::from_secs(3))
            .expect("open long-lived streams");
    let stream_backends = streams.backends();
    println!("streams per backend: {:?}", streams.counts());
    let pinger = Pinger::start(streams);
    let conn_loop = ConnectionLoop::start(
        topo.client_ns(),
        vip_tcp(),
        4,
        Duration::from_millis(2),
        Duration::from_secs(3),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let status_a = inst.status().expect("slb status before the restarts");
    let health_a = health_since(&status_a);
    let new_a = listener_new_connections(&status_a, TCP_LISTENER);
    println!("before the restarts: generation {gen_a}, {new_a} new connections counted, health {health_a:?}");

    // (a) kill -9, a second without any daemon, then a new daemon adopts.
    let kill_ns = unix_ns_now();
    let killed_at = Instant::now();
    let exit = inst.current().kill9().expect("kill -9 the daemon");
    println!("daemon #1 killed: {exit}");
    assert_serving_without_daemon(&inst, "after kill -9");
    std::thread::sleep(Duration::from_secs(1));
    let (window_ok, window_failed) = within(&conn_loop.snapshot(), kill_ns, unix_ns_now());
    inst.spawn(KEEP, &[]).expect("start the second daemon");
    let spawn_gap = killed_at.elapsed();
    inst.current()
        .wait_for_log(READY_LINE, 1, START_TIMEOUT)
        .expect("second daemon ready");
    let no_daemon_a = killed_at.elapsed();
    let (gap_ok_a, gap_failed_a) = within(&conn_loop.snapshot(), kill_ns, unix_ns_now());
    println!(
        "kill -9: no daemon for {spawn_gap:.2?}, ready again after {no_daemon_a:.2?}; \
         {window_ok} connections answered with no daemon at all ({window_failed} failed), \
         {gap_ok_a} until the new daemon was ready ({gap_failed_a} failed)"
    );
    assert!(
        window_ok > 0,
        "no connection was answered while no daemon ran"
    );
    assert!(
        inst.current().log().contains(ADOPT_LINE),
        "the second daemon did not adopt the pins\n{}",
        inst.current().log_block()
    );
    let gen_b = inst.generation().expect("generation of the second run");
    assert!(
        gen_b > gen_a,
        "generation should continue from {gen_a}, is {gen_b}"
    );
    let status_b = inst.status().expect("slb status after kill -9");
    let new_b = listener_new_connections(&status_b, TCP_LISTENER);
    assert!(
        new_b >= new_a + window_ok as u64,
        "counters were reset: {new_a} new connections before kill -9, {new_b} after, \
         with {window_ok} made in between"
    );
    std::thread::sleep(Duration::from_secs(1));

    // (b) SIGTERM, then start again.
    let term_ns = unix_ns_now();
    let termed_at = Instant::now();
    let exit = inst.current().sigterm().expect("SIGTERM the daemon");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
    assert_serving_without_daemon(&inst, "after SIGTERM with --keep-serving");
    assert!(
        inst.state_path().exists(),
        "the state file must survive a --keep-serving exit"
    );
    std::thread::sleep(Duration::from_millis(500));
    inst.start(KEEP, &[]).expect("start the third daemon");
    let no_daemon_b = termed_at.elapsed();
    let (gap_ok_b, gap_failed_b) = within(&conn_loop.snapshot(), term_ns, unix_ns_now());
    println!(
        "SIGTERM: ready again after {no_daemon_b:.2?}; {gap_ok_b} connections answered meanwhile \
         ({gap_failed_b} failed)"
    );
    assert!(
        inst.current().log().contains(ADOPT_LINE),
        "the third daemon did not adopt the pins\n{}",
        inst.current().log_block()
    );
    let gen_c = inst.generation().expect("generation of the third run");
    assert!(
        gen_c > gen_b,
        "generation should continue from {gen_b}, is {gen_c}"
    );
    std::thread::sleep(Duration::from_secs(1));

    let (streams, pings) = pinger.stop();
    let attempts = conn_loop.stop().expect("stop the connection loop");
    let ok: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_ok()).collect();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for a in &ok {
        *per_backend
            .entry(a.backend().unwrap().to_owned())
            .or_default() += 1;
    }
    println!(
        "totals: {} short connections ({} failed) per backend {per_backend:?}; \
         {} stream pings in {} rounds (slowest round {:.2?}), {} ping failures; \
         generations {gen_a} -> {gen_b} -> {gen_c}",
        attempts.len(),
        failed.len(),
        pings.pings,
        pings.rounds,
        pings.slowest_round,
        pings.failures.len()
    );
    assert!(
        pings.failures.is_empty(),
        "{} stream pings failed:\n  {}",
        pings.failures.len(),
        pings
            .failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert_eq!(
        streams.backends(),
        stream_backends,
        "streams must stay on their backends"
    );
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed, e.g. {:?}",
        failed.len(),
        attempts.len(),
        failed
            .iter()
            .take(5)
            .map(|a| &a.outcome)
            .collect::<Vec<_>>()
    );
    assert!(
        ok.len() >= 1000,
        "expected thousands of short connections, got {}",
        ok.len()
    );

    // Counters survived both restarts: the maps count every connection made since the start.
    let status_c = inst.status().expect("slb status after the restarts");
    let new_c = listener_new_connections(&status_c, TCP_LISTENER);
    println!(
        "new_connections of {TCP_LISTENER}: {new_a} before, {new_b} after kill -9, {new_c} at the end; \
         per backend {:?}",
        backend_new_connections(&status_c, TCP_LISTENER)
    );
    assert!(
        new_c >= (ok.len() + STREAMS) as u64,
        "the listener counted {new_c} new connections, the clients made {} plus {STREAMS} streams",
        ok.len()
    );
    for i in 1..=3 {
        let name = Topology::backend_name(i);
        let addr = Topology::backend_addr(i);
        let b = status_backend(&status_c, TCP_LISTENER, addr).expect("backend in status");
        let seen = per_backend.get(&name).copied().unwrap_or(0)
            + stream_backends.iter().filter(|s| **s == name).count() as u64;
        let counted = b.new_connections;
        assert!(
            counted >= seen,
            "{name} counted {counted} new connections, the clients saw {seen}: {b:#?}"
        );
    }

    // Health: same verdicts, same times (no flap), nothing declared unhealthy.
    let health_c = health_since(&status_c);
    println!("health after the restarts: {health_c:?}");
    assert!(
        health_c.values().all(|(healthy, _)| *healthy) && health_c.len() == 3,
        "every backend should be healthy: {health_c:?}"
    );
    assert_eq!(
        health_c, health_a,
        "health verdicts should carry over unchanged (state and time)"
    );
    for d in inst.daemons() {
        assert!(
            !d.log().contains("backend is unhealthy"),
            "{} declared a backend unhealthy\n{}",
            d.label,
            d.log_block()
        );
    }

    // Health checking did resume: a backend that dies now is declared unhealthy.
    let b3 = Topology::backend_addr(3);
    topo.stop_backend_server(3).expect("stop backend 3");
    let stopped = Instant::now();
    loop {
        let status = inst.status().expect("slb status");
        let b = status_backend(&status, TCP_LISTENER, b3).expect("b3 in status");
        if !b.healthy {
            println!(
                "after the restarts, dead b3 declared unhealthy in {:.2?}",
                stopped.elapsed()
            );
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "health checking did not resume: b3 is down and still healthy: {b:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(streams);

    // slb stop removes everything.
    let out = inst.stop().expect("run slb stop");
    println!("slb stop: {}", out.stdout.trim());
    out.expect_success().expect("slb stop");
    assert!(
        !pin_dir(&inst.instance).exists(),
        "slb stop left {}",
        pin_dir(&inst.instance).display()
    );
    assert!(
        !state_dir(&inst.instance).exists(),
        "slb stop left {}",
        state_dir(&inst.instance).display()
    );
    let link = link_show(topo.slb_ns(), "s0");
    assert!(!has_xdp(&link), "s0 still has XDP after slb stop: {link}");
    assert!(
        !inst.current().running(),
        "the daemon still runs after slb stop"
    );
}

#[test]
fn restart_refuses_incompatible_pins() {
    require_root("restart_refuses_incompatible_pins");
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("rstbad")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("rstbad"), &[1, 1]);
    let mut inst =
        instance_stopped_on_drop(&slb, topo.slb_ns(), &config.instance, &config.to_toml());
    inst.start(KEEP, &[]).expect("start slb --keep-serving");
    let exit = inst.current().sigterm().expect("SIGTERM");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
    assert_serving_without_daemon(&inst, "after SIGTERM with --keep-serving");

    // Another ring size: RINGS would not fit.
    let mut other = config.clone();
    other.maglev_table_size = 1009;
    inst.write_config(&other.to_toml()).expect("write config");
    let started = Instant::now();
    inst.spawn(KEEP, &[])
        .expect("start slb with maglev_table_size 1009");
    let exit = inst
        .current()
        .wait_exit(START_TIMEOUT)
        .expect("the refusing daemon exits");
    let log = inst.current().log();
    let error = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("RINGS"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("refused in {:.2?} with {exit}:\n{error}", started.elapsed());
    assert!(!exit.success(), "slb must refuse the pins\n{log}");
    assert!(
        log.contains("RINGS") && log.contains("maglev_table_size"),
        "the error should name the RINGS map and maglev_table_size\n{log}"
    );
    assert!(
        !log.contains(ADOPT_LINE),
        "slb must not adopt pins it refused\n{log}"
    );

    // The old data plane keeps forwarding, untouched.
    assert_serving_without_daemon(&inst, "after the refused start");
    assert!(
        inst.state_path().exists(),
        "the refused start removed the state file"
    );
    let n = 200;
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(n))
        .expect("new connections after the refused start");
    println!("{}", report.summary("after the refused start"));
    assert!(
        report.failures.is_empty() && report.answered() == n,
        "{}",
        report.summary("after the refused start")
    );

    // The original config adopts the pins again.
    inst.write_config(&config.to_toml()).expect("write config");
    inst.start(KEEP, &[])
        .expect("restart on the original config");
    assert!(
        inst.current().log().contains(ADOPT_LINE),
        "{}",
        inst.current().log_block()
    );
    let status = inst.status().expect("slb status");
    let counted = listener_new_connections(&status, TCP_LISTENER);
    println!("after adopting again: {counted} new connections counted");
    assert!(counted >= n as u64, "counters lost: {counted} < {n}");

    let out = inst.stop().expect("run slb stop");
    out.expect_success().expect("slb stop");
    assert!(!pin_dir(&inst.instance).exists(), "slb stop left the pins");
    let link = link_show(topo.slb_ns(), "s0");
    assert!(!has_xdp(&link), "s0 still has XDP after slb stop: {link}");
}
