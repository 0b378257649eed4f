//! A reload (SIGHUP) with changed rules while an HTTP/1.1 keep-alive connection sits idle and
//! another carries a slow request: the slow request completes with 200, both connections keep
//! working, and requests after the reload follow the new rules.

mod http_common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use http_common::L7Setup;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use slb_tests::config::{domain_rule, http_listener, path_rule};
use slb_tests::http::{vip_http, wait_access_log, Echo, HTTP_PORT};
use slb_tests::require_root;

const HOST: &str = "app.example.test";
const SLOW_MS: u64 = 1500;

/// One keep-alive HTTP/1.1 connection from the client namespace, driven by hyper.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    local: std::net::SocketAddr,
}

impl Conn {
    async fn open() -> Conn {
        let stream = tokio::net::TcpStream::connect(vip_http())
            .await
            .expect("connect to the VIP");
        let local = stream.local_addr().expect("local address");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("client connection ended: {e}");
            }
        });
        Conn { sender, local }
    }

    /// GET `path` on this connection; fails if the connection is gone.
    async fn get(&mut self, path: &str) -> Result<(u16, Echo, Duration), String> {
        let started = Instant::now();
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection {} not usable: {e}", self.local))?;
        let req = hyper::Request::get(path)
            .header("host", format!("{HOST}:{HTTP_PORT}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path} on {}: {e}", self.local))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body of GET {path}: {e}"))?
            .to_bytes();
        let echo = Echo::parse(&body).map_err(|e| format!("{e:#}"))?;
        Ok((status, echo, started.elapsed()))
    }
}

#[test]
fn http_reload_keeps_connections_and_applies_new_rules() {
    require_root("http_reload_keeps_connections_and_applies_new_rules");
    // /svc goes to group api (b1) before the reload and to group img (b2) after it;
    // everything else to the listener's group (b3).
    let mut setup = L7Setup::start("h7reload", 3, |c, _| {
        c.group("pool", &[(3, 1)])
            .group("api", &[(1, 1)])
            .group("img", &[(2, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.rules = vec![path_rule("/svc", "api")];
        c.listener(web);
    });
    let mut new_config = setup.config.clone();
    new_config.listener_mut("web").rules = vec![
        path_rule("/svc", "img"),
        domain_rule("other.example.test", "api"),
    ];

    // Connection A: one request, then idle (keep-alive) through the reload.
    // Connection B: one request, then a slow one in flight during the reload.
    let (slow_sent_tx, slow_sent_rx) = std::sync::mpsc::channel::<()>();
    let (reloaded_tx, reloaded_rx) = tokio::sync::oneshot::channel::<()>();
    let task = setup.client.spawn(async move {
        let mut a = Conn::open().await;
        let mut b = Conn::open().await;
        let a_before = a.get("/svc/before").await.expect("A before the reload");
        let b_before = b.get("/svc/before").await.expect("B before the reload");
        let slow_started = Instant::now();
        let slow = tokio::spawn(async move {
            let r = b.get(&format!("/slow?ms={SLOW_MS}")).await;
            (b, r, slow_started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(50)).await; // the request is on its way
        slow_sent_tx.send(()).expect("main thread waits");
        reloaded_rx.await.expect("reload signal");
        let reload_seen = slow_started.elapsed();
        let a_after = a.get("/svc/after").await;
        let (mut b, slow_result, slow_took) = slow.await.expect("slow task");
        let b_after = b.get("/svc/after").await;
        let mut c = Conn::open().await;
        let c_after = c.get("/svc/after").await;
        let c_other = c.get("/").await;
        (
            (a.local, b.local, c.local),
            a_before,
            b_before,
            reload_seen,
            slow_result,
            slow_took,
            a_after,
            b_after,
            c_after,
            c_other,
        )
    });
    slow_sent_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the slow request was sent");
    let generation = setup.daemon.generation().expect("generation");
    let reload_started = Instant::now();
    setup
        .daemon
        .write_config_text(&new_config.to_toml())
        .expect("write the new config");
    let next = setup.daemon.reload().expect("SIGHUP reload");
    let reload_took = reload_started.elapsed();
    reloaded_tx.send(()).expect("client task waits");
    let (
        (a_local, b_local, c_local),
        a_before,
        b_before,
        reload_seen,
        slow_result,
        slow_took,
        a_after,
        b_after,
        c_after,
        c_other,
    ) = setup.client.join(task);

    println!(
        "reload to generation {next} took {reload_took:.2?}, done {reload_seen:.2?} into the {SLOW_MS} ms request"
    );
    println!(
        "before: A ({a_local}) /svc -> {} {}, B ({b_local}) /svc -> {} {}",
        a_before.0, a_before.1.backend, b_before.0, b_before.1.backend
    );
    let show = |r: &Result<(u16, Echo, Duration), String>| match r {
        Ok((s, e, d)) => format!("{s} {} in {d:.2?}", e.backend),
        Err(e) => format!("error: {e}"),
    };
    println!(
        "in flight on B during the reload: /slow -> {} (took {slow_took:.2?})",
        show(&slow_result)
    );
    println!("after: A /svc -> {}", show(&a_after));
    println!("after: B /svc -> {}", show(&b_after));
    println!(
        "after: new connection C ({c_local}) /svc -> {}, / -> {}",
        show(&c_after),
        show(&c_other)
    );

    assert_eq!(next, generation + 1);
    assert_eq!((a_before.0, a_before.1.backend.as_str()), (200, "b1"));
    assert_eq!((b_before.0, b_before.1.backend.as_str()), (200, "b1"));
    assert!(
        reload_seen < Duration::from_millis(SLOW_MS),
        "the reload ({reload_seen:?}) was not done while the slow request was in flight"
    );
    let (status, echo, _) = slow_result.expect("the in-flight request survives the reload");
    assert_eq!((status, echo.backend.as_str()), (200, "b3"));
    for (name, r) in [("A", &a_after), ("B", &b_after), ("C", &c_after)] {
        let (status, echo, _) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("connection {name} after the reload: {e}"));
        assert_eq!(
            (*status, echo.backend.as_str()),
            (200, "b2"),
            "connection {name}: /svc must follow the new rule to group img"
        );
    }
    let (status, echo, _) = c_other.expect("C /");
    assert_eq!((status, echo.backend.as_str()), (200, "b3"));

    // slb saw A and B each as one TCP connection before and after the reload.
    let log = wait_access_log(&setup.access_log(), |log| {
        log.iter().filter(|l| l.path == "/svc/after").count() >= 3
    });
    for (name, local) in [("A", a_local), ("B", b_local)] {
        let client = format!("10.200.1.2:{}", local.port());
        let lines: Vec<(String, u16, String)> = log
            .iter()
            .filter(|l| l.client.to_string() == client)
            .map(|l| (l.path.clone(), l.status, l.group.clone()))
            .collect();
        println!("access log for connection {name} ({client}): {lines:?}");
        assert!(
            lines
                .iter()
                .any(|(p, _, g)| p == "/svc/before" && g == "api")
                && lines
                    .iter()
                    .any(|(p, _, g)| p == "/svc/after" && g == "img"),
            "connection {name}: {lines:?}"
        );
    }
}
