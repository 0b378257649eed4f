//! HTTP rules the proxy keeps on real traffic: one Host per request (and one at all over
//! HTTP/1.1), request targets it cannot forward answered by slb (CONNECT, `OPTIONS *`, a
//! target that is not a path), the request head a backend gets (origin form for upgrades too,
//! no headers the client's `Connection` names, no forwarding headers slb cannot vouch for),
//! path rules matched on the normalised path, and a client's broken request body counted as
//! the client's error, not the backend's.

mod http_common;

use std::io::Write as _;
use std::time::Duration;

use http_common::{raw_exchange, L7Setup, RecordingBackend};
use slb_tests::config::{http_listener, path_rule};
use slb_tests::http::{tcp_connect_in, vip_http, wait_access_log, HTTP_PORT};
use slb_tests::require_root;

const ANSWER_WITHIN: Duration = Duration::from_secs(3);

#[test]
fn http_host_headers_and_request_targets_slb_does_not_forward() {
    require_root("http_host_headers_and_request_targets_slb_does_not_forward");
    let setup = L7Setup::start("h7sem", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let ns = setup.topo.client_ns().to_owned();
    let cases: [(&str, &[u8], &str); 8] = [
        (
            "one Host",
            b"GET /ok HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "two Host headers",
            b"GET /two HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "HTTP/1.1 without Host",
            b"GET /none HTTP/1.1\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "HTTP/1.0 without Host",
            b"GET /old HTTP/1.0\r\n\r\n",
            "HTTP/1.0 200",
        ),
        (
            "CONNECT",
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            "OPTIONS *",
            b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            "a target without a leading slash",
            b"GET p41 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "the absolute form",
            b"GET http://a.test/abs HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, request, expected) in cases {
        let out = raw_exchange(&ns, request, ANSWER_WITHIN);
        println!("{what}: {:?}, then {}", out.status_line(), out.end);
        if !out.status_line().starts_with(expected) {
            wrong.push(format!(
                "{what}: expected {expected}, got {:?}",
                out.status_line()
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn http_request_head_as_the_backend_gets_it() {
    require_root("http_request_head_as_the_backend_gets_it");
    let mut setup = L7Setup::start("h7head", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.forwarded_headers = true;
        c.listener(web);
    });
    setup.backends.stop(1).expect("stop slb-http-backend");
    let backend = RecordingBackend::start_in(setup.topo.backend_ns(1));
    let ns = setup.topo.client_ns().to_owned();

    let upgrade = raw_exchange(
        &ns,
        b"GET /ws-origin?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        Duration::from_secs(1),
    );
    println!("WebSocket upgrade: {:?}", upgrade.status_line());
    assert!(upgrade.status_line().starts_with("HTTP/1.1 101"));
    let plain = raw_exchange(
        &ns,
        b"GET /hop HTTP/1.1\r\nHost: a.test\r\nConnection: close, X-Secret\r\n\
          X-Secret: for the proxy only\r\nX-Kept: 1\r\n\
          Forwarded: for=192.0.2.66;host=evil.test\r\nX-Forwarded-Host: evil.test\r\n\
          X-Forwarded-Port: 1\r\nX-Forwarded-For: 192.0.2.66\r\nX-Real-IP: 192.0.2.66\r\n\r\n",
        ANSWER_WITHIN,
    );
    assert!(plain.status_line().starts_with("HTTP/1.1 200"));

    let ws_heads = backend.heads_with("/ws-origin");
    let hop_heads = backend.heads_with("/hop");
    println!("the backend got:\n{ws_heads:#?}\n{hop_heads:#?}");
    let request_line = |heads: &[String]| {
        heads
            .first()
            .and_then(|h| h.lines().next())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(
        request_line(&ws_heads),
        "GET /ws-origin?q=1 HTTP/1.1",
        "an upgrade is sent in origin form"
    );
    let ws_head = ws_heads[0].to_ascii_lowercase();
    assert!(ws_head.contains("upgrade: websocket") && ws_head.contains("connection: upgrade"));
    assert_eq!(request_line(&hop_heads), "GET /hop HTTP/1.1");
    let head = hop_heads[0].to_ascii_lowercase();
    let has = |name: &str| head.lines().any(|l| l.starts_with(&format!("{name}:")));
    assert!(has("x-kept"));
    for dropped in [
        "x-secret",
        "forwarded",
        "x-forwarded-host",
        "x-forwarded-port",
    ] {
        assert!(!has(dropped), "{dropped} reached the backend:\n{head}");
    }
    assert!(
        head.contains("x-forwarded-for: 192.0.2.66, 10."),
        "slb appends the client's address last:\n{head}"
    );
    assert!(
        !head.contains("x-real-ip: 192.0.2.66"),
        "X-Real-IP is slb's:\n{head}"
    );
}

#[test]
fn http_path_rules_match_the_normalised_path() {
    require_root("http_path_rules_match_the_normalised_path");
    let setup = L7Setup::start("h7norm", 2, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.group("static", &[(2, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.rules = vec![path_rule("/static", "static")];
        c.listener(web);
    });
    let ns = setup.topo.client_ns().to_owned();
    let mut wrong = Vec::new();
    for (target, expected) in [
        ("/static/a.css", "b2"),
        ("/%73tatic/a.css", "b2"),
        ("/%73%74%61%74%69%63", "b2"),
        ("/x/../static/a.css", "b2"),
        ("/./static/a.css", "b2"),
        ("/static/../admin", "b1"),
        ("/other", "b1"),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        let out = raw_exchange(&ns, request.as_bytes(), ANSWER_WITHIN);
        let text = String::from_utf8_lossy(&out.bytes).to_ascii_lowercase();
        let backend = text
            .lines()
            .find_map(|l| l.strip_prefix("x-backend: "))
            .unwrap_or("none")
            .trim()
            .to_owned();
        println!("{target}: {:?} from {backend}", out.status_line());
        if backend != expected {
            wrong.push(format!(
                "{target}: expected {expected}, served by {backend}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn http_broken_request_bodies_are_the_clients_errors() {
    require_root("http_broken_request_bodies_are_the_clients_errors");
    let setup = L7Setup::start("h7body", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let ns = setup.topo.client_ns().to_owned();
    // The backend waits before it reads anything, so the body breaks while it is forwarded.
    let bad_chunk = raw_exchange(
        &ns,
        b"POST /slow?ms=2000&case=chunk HTTP/1.1\r\nHost: a.test\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        ANSWER_WITHIN,
    );
    println!("an invalid chunk size: {:?}", bad_chunk.status_line());
    assert!(
        bad_chunk.status_line().starts_with("HTTP/1.1 400"),
        "an invalid chunk size is the client's error: {:?}",
        bad_chunk.status_line()
    );
    {
        let mut s = tcp_connect_in(&ns, vip_http(), ANSWER_WITHIN).expect("connect");
        s.write_all(
            b"POST /slow?ms=2000&case=abort HTTP/1.1\r\nHost: a.test\r\n\
              Content-Length: 100000\r\n\r\nonly the start",
        )
        .expect("send");
        std::thread::sleep(Duration::from_millis(300));
        // The client gives up with most of its body unsent.
    }
    let statuses: Vec<u16> = wait_access_log(&setup.access_log(), |log| {
        log.iter().filter(|l| l.path == "/slow").count() >= 2
    })
    .iter()
    .filter(|l| l.path == "/slow")
    .map(|l| l.status)
    .collect();
    println!("access log statuses of the broken bodies: {statuses:?}");
    assert_eq!(statuses, [400, 499], "logged as client errors");
    let log = setup.daemon.log();
    assert!(
        !log.contains("backend failed"),
        "a client's broken body blamed on the backend:\n{log}"
    );
}
