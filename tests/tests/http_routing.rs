//! HTTP listener: domain and path rules pick the group, weighted round robin spreads requests
//! by weight, weighted least connections avoids the busier backend, cookies keep a client on
//! its backend (insert and rewrite) with tokens keyed by the node's secret, and the backend gets
//! the forwarded headers.

mod http_common;

use std::collections::BTreeSet;
use std::time::Duration;

use http_common::{client_builder, count_backends, get, send, Answer, L7Setup};
use slb_tests::config::{domain_rule, http_listener, path_rule, CookiePersistence, Scheduler};
use slb_tests::http::{vip_http, wait_access_log, HTTP_PORT};
use slb_tests::SHARE_TOLERANCE_PP;
use slb_tests::{require_root, Distribution, CLIENT_ADDR, VIP};

const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn http_rules_route_by_domain_and_path() {
    require_root("http_rules_route_by_domain_and_path");
    // b1 serves group api, b2 group img, b3 the listener's own group.
    let setup = L7Setup::start("h7route", 3, |c, _| {
        c.group("pool", &[(3, 1)])
            .group("api", &[(1, 1)])
            .group("img", &[(2, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.rules = vec![
            domain_rule("api.example.test", "api"),
            domain_rule("*.img.example.test", "img"),
            path_rule("/static", "api"),
        ];
        c.listener(web);
    });
    let domains = [
        "api.example.test",
        "x.img.example.test",
        "a.b.img.example.test",
        "img.example.test",
        "other.example.test",
    ];
    // (host, path, expected backend, expected group, why)
    let cases: Vec<(&str, &str, &str, &str, &str)> = vec![
        ("api.example.test", "/", "b1", "api", "exact domain"),
        (
            "api.example.test",
            "/static/x.css",
            "b1",
            "api",
            "exact domain (with a path rule that also matches)",
        ),
        ("x.img.example.test", "/", "b2", "img", "wildcard domain"),
        (
            "a.b.img.example.test",
            "/static/y.png",
            "b2",
            "img",
            "wildcard domain, two levels deep, beats the path rule",
        ),
        (
            "img.example.test",
            "/",
            "b3",
            "pool",
            "the wildcard does not match its apex: listener's group",
        ),
        (
            "other.example.test",
            "/static/z.js",
            "b1",
            "api",
            "path prefix",
        ),
        (
            "other.example.test",
            "/",
            "b3",
            "pool",
            "unmatched: listener's group",
        ),
        (
            "10.200.100.10",
            "/",
            "b3",
            "pool",
            "unmatched (IP host): listener's group",
        ),
    ];
    let client = client_builder(&domains, vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let answers: Vec<(Answer, String)> = setup.client.run({
        let cases: Vec<(String, String)> = cases
            .iter()
            .map(|(h, p, ..)| (h.to_string(), p.to_string()))
            .collect();
        async move {
            let mut out = Vec::new();
            for (host, path) in cases {
                let url = format!("http://{host}:{HTTP_PORT}{path}");
                let a = get(&client, &url)
                    .await
                    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
                out.push((a, url));
            }
            out
        }
    });
    for ((host, path, backend, group, why), (answer, url)) in cases.iter().zip(&answers) {
        assert_eq!(answer.status, 200, "GET {url}: {}", answer.text());
        let echo = answer.echo();
        println!(
            "GET {url} -> {} (group {group}: {why}); backend saw Host {:?}, path {}",
            echo.backend,
            echo.host.as_deref().unwrap_or(""),
            echo.path
        );
        assert_eq!(echo.backend, *backend, "GET {url} ({why})");
        assert_eq!(echo.path, *path, "GET {url}: path as the backend saw it");
        assert_eq!(
            echo.host.as_deref(),
            Some(format!("{host}:{HTTP_PORT}").as_str()),
            "GET {url}: Host is kept"
        );
    }
    // The access log names the group and backend of each request, in order.
    let log = wait_access_log(&setup.access_log(), |log| log.len() >= cases.len());
    assert_eq!(
        log.len(),
        cases.len(),
        "one access log line per request: {log:#?}"
    );
    for (line, (host, path, backend, group, _)) in log.iter().zip(&cases) {
        let backend_idx: usize = backend[1..].parse().unwrap();
        assert_eq!(line.listener, "web");
        assert_eq!(&line.group, group, "{line:?}");
        assert_eq!(line.path, *path, "{line:?}");
        assert!(line.host.starts_with(host), "{line:?}");
        assert_eq!(line.status, 200, "{line:?}");
        assert_eq!(
            line.backend.map(|b| b.to_string()).as_deref(),
            Some(format!("10.200.{}.2:8080", 10 + backend_idx).as_str()),
            "{line:?}"
        );
        assert!(line.client.ip() == CLIENT_ADDR, "{line:?}");
    }
    println!(
        "access log: {} lines, e.g. {:?}",
        log.len(),
        std::fs::read_to_string(setup.access_log())
            .unwrap_or_default()
            .lines()
            .next()
    );
}

#[test]
fn http_weighted_round_robin_spreads_by_weight() {
    require_root("http_weighted_round_robin_spreads_by_weight");
    let setup = L7Setup::start("h7wrr", 3, |c, _| {
        c.group("pool", &[(1, 1), (2, 2), (3, 3)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let n = 3000;
    let workers = 8;
    let client = client_builder(&[], vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let started = std::time::Instant::now();
    let answers: Vec<Result<Answer, String>> = setup.client.run(async move {
        let mut tasks = Vec::new();
        for w in 0..workers {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for k in (w..n).step_by(workers) {
                    let url = format!("http://{VIP}:{HTTP_PORT}/req/{k}");
                    out.push(get(&client, &url).await.map_err(|e| format!("{url}: {e}")));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("worker"));
        }
        all
    });
    let elapsed = started.elapsed();
    let failures: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    let ok: Vec<&Answer> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    let not_200: Vec<String> = ok
        .iter()
        .filter(|a| a.status != 200)
        .map(|a| format!("{} {}", a.status, a.text()))
        .collect();
    let table = Distribution::new(
        "HTTP requests per backend (WRR 1:2:3, 8 keep-alive workers)",
        &setup.config.group_weights("pool"),
        &count_backends(ok.iter().copied()),
    );
    let mut latencies: Vec<Duration> = ok.iter().map(|a| a.elapsed).collect();
    latencies.sort();
    println!(
        "{n} requests in {elapsed:.2?} ({:.0} req/s), latency p50 {:.2?} p99 {:.2?}\n{table}",
        n as f64 / elapsed.as_secs_f64(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        not_200.is_empty(),
        "{} not 200: {:?}",
        not_200.len(),
        &not_200[..not_200.len().min(5)]
    );
    assert_eq!(table.total, n);
    if let Err(e) = table.check(SHARE_TOLERANCE_PP) {
        panic!("{e}");
    }
}

/// Slb with one HTTP listener `name` on `port` over three backends (1:1:1), with `cookie`
/// persistence.
fn start_cookie(tag: &str, name: &str, port: u16, cookie: CookiePersistence) -> L7Setup {
    L7Setup::start(tag, 3, |c, _| {
        c.group("pool", &[(1, 1), (2, 1), (3, 1)]);
        let mut listener = http_listener(name, port, "pool");
        listener.cookie = Some(cookie);
        c.listener(listener);
    })
}

const COOKIE_HOST: &str = "shop.example.test";

#[test]
fn http_cookie_insert_keeps_sessions() {
    require_root("http_cookie_insert_keeps_sessions");
    let insert = CookiePersistence::Insert {
        timeout: Duration::from_secs(600),
    };
    let setup = start_cookie("h7ckins", "insert", HTTP_PORT, insert);
    let host = COOKIE_HOST;
    let insert_url = format!("http://{host}:{HTTP_PORT}/cart");

    // Insert: a client with a cookie jar gets SLB_SERVER once and stays on that backend.
    let with_jar = client_builder(&[host], vip_http(), TIMEOUT)
        .cookie_store(true)
        .build()
        .expect("client");
    let without_jar = client_builder(&[host], vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let (sticky, spread) = setup.client.run({
        let url = insert_url.clone();
        async move {
            let mut sticky = Vec::new();
            for _ in 0..100 {
                sticky.push(get(&with_jar, &url).await.expect("GET with cookie jar"));
            }
            let mut spread = Vec::new();
            for _ in 0..90 {
                spread.push(get(&without_jar, &url).await.expect("GET without cookies"));
            }
            (sticky, spread)
        }
    });
    assert!(sticky.iter().all(|a| a.status == 200));
    let first_cookie = sticky[0].set_cookies();
    println!("insert: first answer sets {first_cookie:?}");
    assert!(
        first_cookie.iter().any(|c| c.starts_with("SLB_SERVER=")),
        "no SLB_SERVER cookie inserted: {first_cookie:?}"
    );
    let sticky_counts = count_backends(&sticky);
    println!("insert: 100 requests with the cookie went to {sticky_counts:?}");
    assert_eq!(
        sticky_counts.len(),
        1,
        "a client returning the cookie moved: {sticky_counts:?}"
    );
    // The client sent the cookie from the second request on: the backend saw it.
    let token = first_cookie[0].split(';').next().unwrap().to_owned();
    assert_eq!(sticky[1].echo().cookie.as_deref(), Some(token.as_str()));
    assert!(
        sticky[1..].iter().all(|a| a.set_cookies().is_empty()),
        "slb sets the cookie again although the client returned it"
    );
    let spread_counts = count_backends(&spread);
    println!("insert: 90 requests without cookies went to {spread_counts:?}");
    assert_eq!(
        spread_counts.len(),
        3,
        "requests without a cookie should spread: {spread_counts:?}"
    );
    assert!(
        spread_counts.values().all(|&c| c == 30),
        "WRR 1:1:1 over 90 requests: {spread_counts:?}"
    );
}

#[test]
fn http_cookie_rewrite_keeps_sessions() {
    require_root("http_cookie_rewrite_keeps_sessions");
    let rewrite = CookiePersistence::Rewrite {
        name: "SESSIONID".to_owned(),
    };
    let setup = start_cookie("h7ckrw", "rewrite", HTTP_PORT + 1, rewrite);
    let host = COOKIE_HOST;
    let rewrite_base = format!("http://{host}:{}", HTTP_PORT + 1);

    // Rewrite: the application's SESSIONID is prefixed with the backend's token on the way out
    // and restored on the way in.
    let client = client_builder(&[host], vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let (set, returned, others) = setup.client.run({
        let base = rewrite_base.clone();
        async move {
            let set = get(&client, &format!("{base}/set-cookie/SESSIONID/abc"))
                .await
                .expect("GET set-cookie");
            let value = set
                .set_cookies()
                .into_iter()
                .find(|c| c.starts_with("SESSIONID="))
                .expect("the client gets the SESSIONID cookie")
                .split(';')
                .next()
                .unwrap()
                .to_owned();
            let mut returned = Vec::new();
            for _ in 0..50 {
                returned.push(
                    send(client.get(format!("{base}/app")).header("cookie", &value))
                        .await
                        .expect("GET with SESSIONID"),
                );
            }
            let mut others = Vec::new();
            for _ in 0..30 {
                others.push(get(&client, &format!("{base}/app")).await.expect("GET"));
            }
            (set, returned, others)
        }
    });
    let seen = set.set_cookies();
    let origin = set.backend().expect("X-Backend");
    println!("rewrite: {origin} set SESSIONID=abc, the client saw {seen:?}");
    let value = seen
        .iter()
        .find_map(|c| c.strip_prefix("SESSIONID="))
        .and_then(|v| v.split(';').next())
        .expect("SESSIONID in Set-Cookie");
    let (prefix, original) = value.split_once('.').unwrap_or_else(|| {
        panic!("the client's SESSIONID {value:?} is not prefixed with a backend token")
    });
    assert_eq!(
        original, "abc",
        "the application's value follows the prefix"
    );
    assert!(!prefix.is_empty());
    let returned_counts = count_backends(&returned);
    println!("rewrite: 50 requests returning SESSIONID={value} went to {returned_counts:?}");
    assert_eq!(
        returned_counts.keys().collect::<Vec<_>>(),
        vec![&origin],
        "requests returning the cookie must go to the backend that set it"
    );
    for a in &returned {
        assert_eq!(
            a.echo().cookie.as_deref(),
            Some("SESSIONID=abc"),
            "the backend must get its own cookie value back"
        );
    }
    let other_counts = count_backends(&others);
    println!("rewrite: 30 requests without the cookie went to {other_counts:?}");
    assert_eq!(other_counts.len(), 3, "{other_counts:?}");
}

#[test]
fn http_forwarded_headers_reach_the_backend() {
    require_root("http_forwarded_headers_reach_the_backend");
    let setup = L7Setup::start("h7fwd", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
        let mut plain = http_listener("plain", HTTP_PORT + 1, "pool");
        plain.forwarded_headers = false;
        c.listener(plain);
    });
    let host = "www.example.test";
    let client = client_builder(&[host], vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let (fresh, chained, plain) = setup.client.run(async move {
        let url = format!("http://{host}:{HTTP_PORT}/who");
        let fresh = get(&client, &url).await.expect("GET");
        let chained = send(client.get(&url).header("x-forwarded-for", "192.0.2.7"))
            .await
            .expect("GET with X-Forwarded-For");
        let plain = get(&client, &format!("http://{host}:{}/who", HTTP_PORT + 1))
            .await
            .expect("GET plain");
        (fresh, chained, plain)
    });
    let client_ip = CLIENT_ADDR.to_string();
    let e = fresh.echo();
    println!(
        "backend saw: Host {:?}, X-Forwarded-For {:?}, X-Forwarded-Proto {:?}, X-Real-IP {:?}, peer {}",
        e.host, e.x_forwarded_for, e.x_forwarded_proto, e.x_real_ip, e.peer
    );
    assert_eq!(
        e.host.as_deref(),
        Some(format!("{host}:{HTTP_PORT}").as_str())
    );
    assert_eq!(e.x_forwarded_for.as_deref(), Some(client_ip.as_str()));
    assert_eq!(e.x_forwarded_proto.as_deref(), Some("http"));
    assert_eq!(e.x_real_ip.as_deref(), Some(client_ip.as_str()));
    let c = chained.echo();
    println!(
        "with X-Forwarded-For: 192.0.2.7 from the client, the backend saw {:?}",
        c.x_forwarded_for
    );
    assert_eq!(
        c.x_forwarded_for.as_deref(),
        Some(format!("192.0.2.7, {client_ip}").as_str()),
        "slb appends the client to X-Forwarded-For"
    );
    assert_eq!(c.x_real_ip.as_deref(), Some(client_ip.as_str()));
    let p = plain.echo();
    println!(
        "forwarded_headers = false: {:?} {:?} {:?}",
        p.x_forwarded_for, p.x_forwarded_proto, p.x_real_ip
    );
    assert_eq!(
        (p.x_forwarded_for, p.x_forwarded_proto, p.x_real_ip),
        (None, None, None),
        "forwarded_headers = false adds nothing"
    );
    let peers: BTreeSet<String> = [e.peer, c.peer]
        .iter()
        .map(|p| p.split(':').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        peers,
        BTreeSet::from(["10.200.11.1".to_owned()]),
        "the proxy connects from its own address on the backend side"
    );
}

/// With `scheduler = "wlc"`, requests go to the backend with the fewest requests in flight:
/// while one backend holds more slow requests than the other, every quick request goes to the
/// other one (round robin would alternate).
#[test]
fn http_weighted_least_connections_avoids_the_busier_backend() {
    require_root("http_weighted_least_connections_avoids_the_busier_backend");
    let setup = L7Setup::start("h7wlc", 2, |c, _| {
        c.group("pool", &[(1, 1), (2, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.scheduler = Some(Scheduler::Wlc);
        c.listener(web);
    });
    let client = client_builder(&[], vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let (slow, quick) = setup.client.run(async move {
        // Three slow requests in flight: one backend holds two of them, the other one.
        let mut slow = Vec::new();
        for k in 0..3 {
            let client = client.clone();
            slow.push(tokio::spawn(async move {
                get(
                    &client,
                    &format!("http://{VIP}:{HTTP_PORT}/slow?ms=2500&k={k}"),
                )
                .await
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut quick = Vec::new();
        for k in 0..20 {
            quick.push(get(&client, &format!("http://{VIP}:{HTTP_PORT}/quick/{k}")).await);
        }
        let mut slow_answers = Vec::new();
        for s in slow {
            slow_answers.push(s.await.expect("slow request task"));
        }
        (slow_answers, quick)
    });
    let slow_backends: Vec<String> = slow
        .into_iter()
        .map(|a| {
            let a = a.expect("slow request");
            assert_eq!(a.status, 200, "{}", a.text());
            a.backend().expect("slow answer names its backend")
        })
        .collect();
    let quick_backends: Vec<String> = quick
        .into_iter()
        .map(|a| {
            let a = a.expect("quick request");
            assert_eq!(a.status, 200, "{}", a.text());
            a.backend().expect("quick answer names its backend")
        })
        .collect();
    println!("slow requests on {slow_backends:?}; quick requests on {quick_backends:?}");
    let busier = ["b1", "b2"]
        .into_iter()
        .max_by_key(|b| slow_backends.iter().filter(|s| s == b).count())
        .expect("two backends");
    assert_eq!(
        slow_backends.iter().filter(|s| *s == busier).count(),
        2,
        "the slow requests should split 2:1, got {slow_backends:?}"
    );
    assert!(
        quick_backends.iter().all(|b| b != busier),
        "a quick request went to {busier}, which had two slow requests in flight: {quick_backends:?}"
    );
}

/// The token in `SLB_SERVER` is keyed by the cookie secret: a node with another secret names
/// the same backend otherwise (so the token cannot be worked out from the backend's address),
/// and nodes (or restarts) with the same secret agree.
#[test]
fn http_cookie_tokens_are_keyed_by_the_cookie_secret() {
    require_root("http_cookie_tokens_are_keyed_by_the_cookie_secret");
    let mut setup = L7Setup::start("h7ckey", 1, |c, dir| {
        std::fs::write(dir.join("secret-a"), "the first node secret, 32 bytes\n").unwrap();
        std::fs::write(dir.join("secret-b"), "another node secret, of 32 bytes\n").unwrap();
        c.cookie_secret_file = dir.join("secret-a");
        c.group("pool", &[(1, 1)]);
        let mut insert = http_listener("insert", HTTP_PORT, "pool");
        insert.cookie = Some(CookiePersistence::Insert {
            timeout: Duration::from_secs(600),
        });
        c.listener(insert);
    });
    let client = client_builder(&[], vip_http(), TIMEOUT)
        .build()
        .expect("client");
    let token = |setup: &L7Setup| {
        let client = client.clone();
        let answer = setup
            .client
            .run(async move { get(&client, &format!("http://{VIP}:{HTTP_PORT}/")).await })
            .expect("GET");
        assert_eq!(answer.status, 200);
        answer
            .set_cookies()
            .iter()
            .find_map(|c| c.strip_prefix("SLB_SERVER="))
            .and_then(|c| c.split(';').next())
            .map(str::to_owned)
            .expect("an SLB_SERVER cookie")
    };
    let with_a = token(&setup);
    let dir = setup.dir.path().to_owned();
    setup.config.cookie_secret_file = dir.join("secret-b");
    setup
        .daemon
        .write_config_text(&setup.config.to_toml())
        .expect("write config");
    setup.daemon.reload().expect("reload with secret B");
    let with_b = token(&setup);
    setup.config.cookie_secret_file = dir.join("secret-a");
    setup
        .daemon
        .write_config_text(&setup.config.to_toml())
        .expect("write config");
    setup.daemon.reload().expect("reload with secret A");
    let with_a_again = token(&setup);
    println!("b1's token: secret A {with_a}, secret B {with_b}, secret A again {with_a_again}");
    assert_eq!(with_a.len(), 16);
    assert_ne!(with_a, with_b, "the token depends on the secret");
    assert_eq!(
        with_a, with_a_again,
        "the same secret names the backend alike"
    );
}
