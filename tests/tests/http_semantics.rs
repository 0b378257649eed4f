//! HTTP rules the proxy keeps on real traffic: one Host per request (and one at all over
//! HTTP/1.1), and request targets it cannot forward answered by slb (CONNECT, `OPTIONS *`, a
//! target that is not a path).

mod http_common;

use std::time::Duration;

use http_common::{raw_exchange, L7Setup};
use slb_tests::http::{L7Listener, HTTP_PORT};
use slb_tests::require_root;

const ANSWER_WITHIN: Duration = Duration::from_secs(3);

#[test]
fn http_host_headers_and_request_targets_slb_does_not_forward() {
    require_root("http_host_headers_and_request_targets_slb_does_not_forward");
    let setup = L7Setup::start("h7sem", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(L7Listener::http("web", HTTP_PORT, "pool"));
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
