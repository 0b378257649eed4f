//! HTTP listener when backends fail: an HTTP health check takes a stopped backend out (after
//! detection every request succeeds), a group with no healthy backend answers 503, a slow
//! backend 504, and a backend that refuses connections 502. An HTTPS listener takes verdicts
//! without reading its certificate files again.

mod http_common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_common::{client_builder, get, L7Setup, TestPki};
use slb_tests::config::{
    backend, group, health_check, http_listener, https_listener, BackendSpec, CheckKind, GroupKind,
};
use slb_tests::http::{vip_http, vip_https, wait_access_log, HTTPS_PORT, HTTP_PORT};
use slb_tests::slb::applied_state;
use slb_tests::{require_root, SlbDaemon, Topology, VIP};

const INTERVAL: Duration = Duration::from_millis(300);
const CHECK_TIMEOUT: Duration = Duration::from_millis(200);
const UNHEALTHY_THRESHOLD: u32 = 2;
const HEALTHY_THRESHOLD: u32 = 2;
/// Slack on top of the detection window: scheduling, the proxy picking up the verdict, and
/// the request in flight when it lands.
const MARGIN: Duration = Duration::from_millis(400);

/// `healthy` of the backend at `address` of HTTP(S) listener `listener` in the daemon's state
/// file (`proxy_listeners`), if it lists it with a health verdict. (`slb status` does not show
/// HTTP(S) listeners.)
fn proxy_backend_healthy(daemon: &SlbDaemon, listener: &str, address: Ipv4Addr) -> Option<bool> {
    let state = applied_state(daemon.instance())?;
    let health = state
        .proxy_listeners
        .iter()
        .find(|l| l.name == listener)?
        .backends
        .iter()
        .find(|b| b.address == address)?
        .health
        .as_ref()?;
    Some(health.healthy)
}

fn wait_proxy_health(
    daemon: &SlbDaemon,
    listener: &str,
    address: Ipv4Addr,
    want: bool,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if proxy_backend_healthy(daemon, listener, address) == Some(want) {
            return started.elapsed();
        }
        if started.elapsed() > timeout {
            panic!(
                "{address} on {listener} did not become {} within {timeout:?}; state: {}",
                if want { "healthy" } else { "unhealthy" },
                std::fs::read_to_string(daemon.state_path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One request of the client loop: when it was sent and when it ended (since the loop started),
/// and its status and backend, or the client error.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    done: Duration,
    outcome: Result<(u16, Option<String>), String>,
}

#[test]
fn http_health_check_fails_over_and_503_when_none_is_left() {
    require_root("http_health_check_fails_over_and_503_when_none_is_left");
    // One proxy thread: the other tests run with one per CPU.
    let mut setup = L7Setup::start_on_one_thread("h7fail", 3, |c, _| {
        c.group("pool", &[(1, 1), (2, 1), (3, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        let mut check = health_check(
            CheckKind::Http,
            INTERVAL,
            CHECK_TIMEOUT,
            HEALTHY_THRESHOLD,
            UNHEALTHY_THRESHOLD,
        );
        check.path = Some("/".to_owned());
        check.expected_codes = Some(vec!["2xx".to_owned()]);
        web.health_check = Some(check);
        c.listener(web);
    });
    let detection_window = INTERVAL * UNHEALTHY_THRESHOLD + CHECK_TIMEOUT;
    for i in 1..=3 {
        wait_proxy_health(
            &setup.daemon,
            "web",
            Topology::backend_addr(i),
            true,
            Duration::from_secs(3),
        );
    }

    // Two clients send a request every 10 ms each, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let loop_started = Instant::now();
    let client = client_builder(&[], vip_http(), Duration::from_secs(3))
        .build()
        .expect("client");
    let handle = setup.client.spawn({
        let stop = stop.clone();
        async move {
            let mut workers = Vec::new();
            for _ in 0..2 {
                let (client, stop) = (client.clone(), stop.clone());
                workers.push(tokio::spawn(async move {
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let at = loop_started.elapsed();
                        let outcome = get(&client, &format!("http://{VIP}:{HTTP_PORT}/"))
                            .await
                            .map(|a| (a.status, a.backend()))
                            .map_err(|e| e.to_string());
                        let done = loop_started.elapsed();
                        samples.push(Sample { at, done, outcome });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    samples
                }));
            }
            let mut all = Vec::new();
            for w in workers {
                all.extend(w.await.expect("worker"));
            }
            all.sort_by_key(|s| s.at);
            all
        }
    });
    std::thread::sleep(Duration::from_millis(1000));
    let stopped_at = loop_started.elapsed();
    setup.backends.stop(2).expect("stop b2");
    let detected_after = wait_proxy_health(
        &setup.daemon,
        "web",
        Topology::backend_addr(2),
        false,
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let samples = setup.client.join(handle);

    let settled = stopped_at + detection_window + MARGIN;
    // A request still in flight when b2 stops may fail with it, so it belongs to the window.
    let phase = |s: &Sample| {
        if s.done < stopped_at {
            "before"
        } else if s.at < settled {
            "window"
        } else {
            "after"
        }
    };
    let mut table: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for s in &samples {
        let what = match &s.outcome {
            Ok((status, backend)) => format!("{status} {}", backend.as_deref().unwrap_or("-")),
            Err(e) => format!("error {e}"),
        };
        *table.entry((phase(s), what)).or_default() += 1;
    }
    let failures: Vec<&Sample> = samples
        .iter()
        .filter(|s| !matches!(s.outcome, Ok((200, _))))
        .collect();
    let last_failure = failures.last().map(|s| s.at.saturating_sub(stopped_at));
    println!(
        "b2 stopped {stopped_at:.2?} into the loop; the state file shows it unhealthy {detected_after:.2?} later \
         (window interval×unhealthy_threshold+timeout = {detection_window:?}); {} requests, {} failed, \
         last failure {last_failure:.2?} after the stop",
        samples.len(),
        failures.len()
    );
    for ((phase, what), n) in &table {
        println!("  {phase:6} {what}: {n}");
    }
    assert!(
        detected_after <= detection_window + MARGIN,
        "detection took {detected_after:?}, window {detection_window:?} + {MARGIN:?}"
    );
    for s in &samples {
        match (phase(s), &s.outcome) {
            ("before", Ok((200, _))) => {}
            ("before", other) => panic!("failure before the stop at {:?}: {other:?}", s.at),
            ("window", Ok((200, _))) => {}
            ("window", Ok((502, None))) => {} // b2 picked before the verdict: refused
            ("window", other) => panic!("unexpected outcome during detection at {:?}: {other:?}", s.at),
            ("after", Ok((200, Some(b)))) if b != "b2" => {}
            (_, other) => panic!(
                "after the detection window ({:?} after the stop) every request must succeed on b1/b3, got {other:?}",
                s.at.saturating_sub(stopped_at)
            ),
        }
    }
    assert!(
        samples.iter().filter(|s| phase(s) == "after").count() > 50,
        "too few requests after the window to tell"
    );

    // Every backend gone: 503 with a readable body once the checks notice.
    let all_stopped = Instant::now();
    setup.backends.stop(1).expect("stop b1");
    setup.backends.stop(3).expect("stop b3");
    for i in [1, 3] {
        wait_proxy_health(
            &setup.daemon,
            "web",
            Topology::backend_addr(i),
            false,
            Duration::from_secs(5),
        );
    }
    let detected = all_stopped.elapsed();
    let client = client_builder(&[], vip_http(), Duration::from_secs(3))
        .build()
        .expect("client");
    let answers = setup.client.run(async move {
        let mut out = Vec::new();
        for _ in 0..5 {
            out.push(
                get(&client, &format!("http://{VIP}:{HTTP_PORT}/"))
                    .await
                    .expect("GET"),
            );
        }
        out
    });
    println!(
        "all backends stopped: unhealthy after {detected:.2?}; answers: {:?}",
        answers
            .iter()
            .map(|a| (a.status, a.text().trim().to_owned()))
            .collect::<Vec<_>>()
    );
    for a in &answers {
        assert_eq!(a.status, 503, "{}", a.text());
        assert!(
            a.text().contains("no healthy backend"),
            "503 body is not readable: {:?}",
            a.text()
        );
    }
    let log = wait_access_log(&setup.access_log(), |log| {
        log.iter().filter(|l| l.status == 503).count() >= 5
    });
    let logged_503 = log
        .iter()
        .filter(|l| l.status == 503 && l.backend.is_none())
        .count();
    assert_eq!(
        logged_503, 5,
        "the access log records the 503s without a backend"
    );

    // One comes back: it is readmitted after healthy_threshold good checks.
    let restarted = Instant::now();
    setup.backends.restart(3).expect("restart b3");
    let readmitted = wait_proxy_health(
        &setup.daemon,
        "web",
        Topology::backend_addr(3),
        true,
        Duration::from_secs(5),
    );
    let client = client_builder(&[], vip_http(), Duration::from_secs(3))
        .build()
        .expect("client");
    let back = setup.client.run(async move {
        get(&client, &format!("http://{VIP}:{HTTP_PORT}/"))
            .await
            .expect("GET")
    });
    println!(
        "b3 restarted: healthy {readmitted:.2?} later (restart took {:.2?} in all), answer {} from {:?}",
        restarted.elapsed(),
        back.status,
        back.backend()
    );
    assert_eq!(back.status, 200);
    assert_eq!(back.backend().as_deref(), Some("b3"));
}

#[test]
fn http_slow_backend_504_and_refused_backend_502() {
    require_root("http_slow_backend_504_and_refused_backend_502");
    let setup = L7Setup::start("h7gw", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        // Backend 1's host, on a port nothing listens on.
        c.groups.push(group(
            "dead",
            GroupKind::Vserver,
            vec![BackendSpec {
                port: Some(9),
                ..backend(1, 1)
            }],
        ));
        let mut slow = http_listener("slow", HTTP_PORT, "pool");
        slow.backend_timeout = Duration::from_millis(500);
        c.listener(slow);
        c.listener(http_listener("dead", HTTP_PORT + 1, "dead"));
    });
    let client = client_builder(&[], vip_http(), Duration::from_secs(10))
        .build()
        .expect("client");
    let (quick, timed_out, refused, after) = setup.client.run(async move {
        let base = format!("http://{VIP}:{HTTP_PORT}");
        let quick = get(&client, &format!("{base}/slow?ms=100"))
            .await
            .expect("GET");
        let timed_out = get(&client, &format!("{base}/slow?ms=2000"))
            .await
            .expect("GET");
        let refused = get(&client, &format!("http://{VIP}:{}/", HTTP_PORT + 1))
            .await
            .expect("GET");
        let after = get(&client, &format!("{base}/")).await.expect("GET");
        (quick, timed_out, refused, after)
    });
    println!(
        "backend_timeout 500ms: /slow?ms=100 -> {} in {:.2?}; /slow?ms=2000 -> {} {:?} in {:.2?}",
        quick.status,
        quick.elapsed,
        timed_out.status,
        timed_out.text().trim(),
        timed_out.elapsed
    );
    println!(
        "refusing backend: {} {:?} in {:.2?}",
        refused.status,
        refused.text().trim(),
        refused.elapsed
    );
    assert_eq!(quick.status, 200);
    assert_eq!(timed_out.status, 504, "{}", timed_out.text());
    assert!(
        timed_out.text().contains("Gateway Timeout"),
        "{}",
        timed_out.text()
    );
    assert!(
        timed_out.elapsed >= Duration::from_millis(450)
            && timed_out.elapsed < Duration::from_millis(1500),
        "504 after {:?}, backend_timeout is 500ms",
        timed_out.elapsed
    );
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert!(refused.text().contains("Bad Gateway"), "{}", refused.text());
    assert_eq!(after.status, 200, "the listener keeps serving");
    let log = wait_access_log(&setup.access_log(), |log| {
        [504, 502]
            .iter()
            .all(|s| log.iter().any(|l| l.status == *s))
    });
    let statuses: Vec<(String, u16)> = log.iter().map(|l| (l.listener.clone(), l.status)).collect();
    println!("access log: {statuses:?}");
    assert!(statuses.contains(&("slow".to_owned(), 504)));
    assert!(statuses.contains(&("dead".to_owned(), 502)));
}

/// The certificates are read when the config is loaded, not on each health verdict: with the
/// files gone (a renewal half done, a volume unmounted), a backend that stops is still taken
/// out of the HTTPS listener's balancing, and the listener keeps its certificate.
#[test]
fn https_health_verdicts_apply_while_the_certificate_files_are_gone() {
    require_root("https_health_verdicts_apply_while_the_certificate_files_are_gone");
    const DOMAIN: &str = "v.example.test";
    let mut pki = None;
    let mut setup = L7Setup::start("h7verd", 2, |c, dir| {
        let p = TestPki::generate(dir, &[DOMAIN]);
        c.group("pool", &[(1, 1), (2, 1)]);
        let mut secure = https_listener(
            "secure",
            HTTPS_PORT,
            "pool",
            vec![p.certificate_config(DOMAIN)],
        );
        secure.health_check = Some(health_check(
            CheckKind::Tcp,
            INTERVAL,
            CHECK_TIMEOUT,
            HEALTHY_THRESHOLD,
            UNHEALTHY_THRESHOLD,
        ));
        c.listener(secure);
        pki = Some(p);
    });
    let pki = pki.expect("certificates generated");
    let client = client_builder(&[DOMAIN], vip_https(), Duration::from_secs(3))
        .add_root_certificate(pki.root())
        .build()
        .expect("client");
    let backends_of_20 = |client: &reqwest::Client| {
        let client = client.clone();
        let answers = setup.client.run(async move {
            let mut answers = Vec::new();
            for _ in 0..20 {
                let url = format!("https://{DOMAIN}:{HTTPS_PORT}/");
                answers.push(match get(&client, &url).await {
                    Ok(a) => format!("{} {}", a.status, a.backend().as_deref().unwrap_or("-")),
                    Err(e) => format!("error {e}"),
                });
            }
            answers
        });
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for a in answers {
            *counts.entry(a).or_default() += 1;
        }
        counts
    };
    let before = backends_of_20(&client);
    println!("both backends up: {before:?}");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["200 b1", "200 b2"],
        "both backends serve"
    );

    for file in std::fs::read_dir(setup.dir.path()).expect("read the test dir") {
        let path = file.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "pem" || e == "key") {
            std::fs::remove_file(&path).expect("remove a certificate file");
        }
    }
    setup.backends.stop(2).expect("stop b2");
    // The state file is written after the verdict reached the data plane and the proxy.
    wait_proxy_health(
        &setup.daemon,
        "secure",
        Topology::backend_addr(2),
        false,
        Duration::from_secs(5),
    );

    let after = backends_of_20(&client);
    println!("b2 stopped, certificate files removed: {after:?}");
    assert_eq!(
        after,
        BTreeMap::from([("200 b1".to_owned(), 20)]),
        "after the verdict every request goes to b1, over the certificate loaded at start"
    );
    let log = setup.daemon.log();
    assert!(
        !log.contains("applying a health change"),
        "a health verdict must not need the certificate files:\n{log}"
    );
}
