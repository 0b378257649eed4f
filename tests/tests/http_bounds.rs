//! The HTTP proxy's resource bounds, on real traffic: a backend gets at most `max_connections`
//! connections however many streams a client opens (the excess waits in a bounded queue, then
//! gets 503); a client that stops reading is cut off after `client_timeout` and the backend's
//! response is dropped; an upload may take longer than `backend_timeout` (which counts from the
//! end of the body) but may not stall; a request that comes round a loop gets 508. Each event
//! is counted in `slb status`.

mod http_common;

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use http_common::{client_builder, get, L7Setup};
use slb_tests::config::http_listener;
use slb_tests::http::{tcp_connect_in, vip_http, HTTP_PORT};
use slb_tests::{require_root, VIP};

/// The `[[groups]]` table named `name` of a config.
fn group_table<'a>(config: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    config["groups"]
        .as_array_mut()
        .expect("groups")
        .iter_mut()
        .filter_map(toml::Value::as_table_mut)
        .find(|g| g["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no group {name}"))
}

/// The `[[listeners]]` table named `name` of a config.
fn listener_table<'a>(config: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    config["listeners"]
        .as_array_mut()
        .expect("listeners")
        .iter_mut()
        .filter_map(toml::Value::as_table_mut)
        .find(|l| l["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no listener {name}"))
}

/// What the backend says of its connections (`/connections`, asked through slb).
#[derive(Debug, serde::Deserialize)]
struct BackendConnections {
    /// Most client (slb) connections ever open at once.
    peak: u64,
    /// `/stream` bodies being sent.
    streams: u64,
}

fn backend_connections(setup: &L7Setup) -> BackendConnections {
    let client = client_builder(&[], vip_http(), Duration::from_secs(5))
        .build()
        .expect("client");
    let answer = setup.client.run(async move {
        get(&client, &format!("http://{VIP}:{HTTP_PORT}/connections"))
            .await
            .expect("GET /connections")
    });
    assert_eq!(answer.status, 200, "{}", answer.text());
    serde_json::from_slice(&answer.body).expect("/connections answers JSON")
}

const MAX_CONNECTIONS: usize = 4;
const MAX_QUEUED: usize = 4;
const CLIENT_STREAMS: usize = 20;

#[test]
fn http_backend_connections_are_capped_then_queued_then_refused() {
    require_root("http_backend_connections_are_capped_then_queued_then_refused");
    let setup = L7Setup::start_edited(
        "h7cap",
        1,
        |c, _| {
            c.group("pool", &[(1, 1)]);
            c.listener(http_listener("web", HTTP_PORT, "pool"));
        },
        |t| {
            let pool = group_table(t, "pool");
            pool.insert("max_connections".into(), (MAX_CONNECTIONS as i64).into());
            pool.insert("max_queued_requests".into(), (MAX_QUEUED as i64).into());
            pool.insert("queue_timeout".into(), "5s".into());
        },
    );
    // One HTTP/2 connection (h2c) with 20 concurrent streams to a backend that takes 1 s per
    // request: without a cap, each stream is a backend connection of its own.
    let client = client_builder(&[], vip_http(), Duration::from_secs(20))
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let answers = setup.client.run(async move {
        let requests: Vec<_> = (0..CLIENT_STREAMS)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    get(&client, &format!("http://{VIP}:{HTTP_PORT}/slow?ms=1000"))
                        .await
                        .expect("GET")
                })
            })
            .collect();
        let mut answers = Vec::new();
        for r in requests {
            answers.push(r.await.expect("request task"));
        }
        answers
    });
    let served: Vec<_> = answers.iter().filter(|a| a.status == 200).collect();
    let refused: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    let slowest_refusal = refused.iter().map(|a| a.elapsed).max();
    let backend = backend_connections(&setup);
    println!(
        "{CLIENT_STREAMS} streams, max_connections {MAX_CONNECTIONS}, max_queued_requests \
         {MAX_QUEUED}: {} served (slowest {:?}), {} refused with 503 (slowest {slowest_refusal:?}); \
         the backend saw at most {} connections at once",
        served.len(),
        served.iter().map(|a| a.elapsed).max(),
        refused.len(),
        backend.peak
    );
    assert_eq!(
        served.len(),
        MAX_CONNECTIONS + MAX_QUEUED,
        "the cap's requests and the queue's are served: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), CLIENT_STREAMS - MAX_CONNECTIONS - MAX_QUEUED);
    assert!(
        refused[0].text().contains("connections are all busy"),
        "{}",
        refused[0].text()
    );
    assert!(
        slowest_refusal < Some(Duration::from_millis(900)),
        "a full queue refuses at once, not after the backend answers"
    );
    assert!(
        backend.peak as usize <= MAX_CONNECTIONS,
        "the backend saw {} connections at once, max_connections is {MAX_CONNECTIONS}",
        backend.peak
    );
    assert_eq!(
        setup
            .daemon
            .wait_proxy_counter("requests_queued", MAX_QUEUED as u64),
        MAX_QUEUED as u64
    );
    let refused_count = refused.len() as u64;
    assert_eq!(
        setup
            .daemon
            .wait_proxy_counter("requests_refused_queue_full", refused_count),
        refused_count
    );
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn http_client_that_stops_reading_is_cut_off_and_the_backend_released() {
    require_root("http_client_that_stops_reading_is_cut_off_and_the_backend_released");
    let setup = L7Setup::start_edited(
        "h7stall",
        1,
        |c, _| {
            c.group("pool", &[(1, 1)]);
            c.listener(http_listener("web", HTTP_PORT, "pool"));
        },
        |t| {
            listener_table(t, "web").insert("client_timeout".into(), "1s".into());
        },
    );
    // 64 MiB, far more than the socket buffers on the way hold: once they are full, slb's
    // writes to the client wait.
    const BODY_KB: usize = 64 * 1024;
    let mut stream = tcp_connect_in(setup.topo.client_ns(), vip_http(), Duration::from_secs(3))
        .expect("connect");
    let started = Instant::now();
    stream
        .write_all(format!("GET /stream?kb={BODY_KB} HTTP/1.1\r\nHost: {VIP}\r\n\r\n").as_bytes())
        .expect("send the request");
    // The client reads nothing from here on. The backend's stream ends when slb drops it.
    let mut seen_streaming = false;
    let released_after = loop {
        let streams = backend_connections(&setup).streams;
        seen_streaming |= streams == 1;
        if seen_streaming && streams == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the backend still sends to a client that stopped reading {:?} ago \
             (client_timeout {CLIENT_TIMEOUT:?}); streaming seen: {seen_streaming}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // What the client can still read is what the buffers held, then the end.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "closed".to_owned(),
            Ok(n) => received += n,
            Err(e) => break e.to_string(),
        }
    };
    println!(
        "a client that stopped reading: the backend's stream released after {released_after:?} \
         (client_timeout {CLIENT_TIMEOUT:?}); the client got {received} of {} bytes, then: {end}",
        BODY_KB * 1024
    );
    assert!(
        released_after >= CLIENT_TIMEOUT,
        "released after {released_after:?}, before client_timeout"
    );
    assert!(
        received < BODY_KB * 1024 && (end == "closed" || end.contains("reset")),
        "the client's connection ends early: {received} bytes, then {end}"
    );
    assert_eq!(
        setup.daemon.wait_proxy_counter("client_send_timeouts", 1),
        1
    );
    // The listener serves on.
    assert_eq!(backend_connections(&setup).streams, 0);
}

#[test]
fn http2_stream_the_client_stops_reading_is_cut_off_and_the_backend_released() {
    require_root("http2_stream_the_client_stops_reading_is_cut_off_and_the_backend_released");
    let setup = L7Setup::start_edited(
        "h7stall2",
        1,
        |c, _| {
            c.group("pool", &[(1, 1)]);
            c.listener(http_listener("web", HTTP_PORT, "pool"));
        },
        |t| {
            listener_table(t, "web").insert("client_timeout".into(), "1s".into());
        },
    );
    // HTTP/2 (h2c) with a 64 KiB stream window: a response the client does not read fills the
    // window and its stream stalls, while the connection itself goes on being read.
    let client = client_builder(&[], vip_http(), Duration::from_secs(30))
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(65_535)
        .build()
        .expect("client");
    let started = Instant::now();
    let unread = setup.client.run({
        let client = client.clone();
        async move {
            client
                .get(format!("http://{VIP}:{HTTP_PORT}/stream?kb={}", 64 * 1024))
                .send()
                .await
                .expect("response head")
        }
    });
    assert_eq!(unread.status(), 200);
    let mut seen_streaming = false;
    let released_after = loop {
        let streams = backend_connections(&setup).streams;
        seen_streaming |= streams == 1;
        if seen_streaming && streams == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the backend still sends to a stream its client stopped reading {:?} ago \
             (client_timeout {CLIENT_TIMEOUT:?}); streaming seen: {seen_streaming}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The stream is cut, the connection serves on.
    let (body, next) = setup.client.run(async move {
        let body = unread.bytes().await;
        let next = get(&client, &format!("http://{VIP}:{HTTP_PORT}/"))
            .await
            .expect("GET on the same connection");
        (body, next)
    });
    println!(
        "an HTTP/2 stream its client stopped reading: the backend's stream released after \
         {released_after:?} (client_timeout {CLIENT_TIMEOUT:?}); reading it then: {}; the \
         connection's next request: {}",
        match &body {
            Ok(b) => format!("{} bytes", b.len()),
            Err(e) => format!("error {e}"),
        },
        next.status
    );
    assert!(
        released_after >= CLIENT_TIMEOUT,
        "released after {released_after:?}"
    );
    assert!(
        body.is_err(),
        "the cut stream ends in an error, not as complete"
    );
    assert_eq!(next.status, 200);
    assert_eq!(next.version, reqwest::Version::HTTP_2);
    assert_eq!(
        setup.daemon.wait_proxy_counter("client_send_timeouts", 1),
        1
    );
}

/// Sends `head` then `body` in `chunks` pieces `gap` apart over a connection of its own, and
/// returns the response (read to the end) and how long it took from the request's start.
fn upload(setup: &L7Setup, head: &str, chunks: &[Vec<u8>], gap: Duration) -> (String, Duration) {
    let mut stream = tcp_connect_in(setup.topo.client_ns(), vip_http(), Duration::from_secs(3))
        .expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let started = Instant::now();
    stream.write_all(head.as_bytes()).expect("send the head");
    for chunk in chunks {
        std::thread::sleep(gap);
        if stream.write_all(chunk).is_err() {
            break; // slb answered and closed before the body was through
        }
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    (
        String::from_utf8_lossy(&response).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn http_upload_longer_than_backend_timeout_succeeds_but_a_stalled_one_gets_408() {
    require_root("http_upload_longer_than_backend_timeout_succeeds_but_a_stalled_one_gets_408");
    let setup = L7Setup::start_edited(
        "h7upload",
        1,
        |c, _| {
            c.group("pool", &[(1, 1)]);
            let mut web = http_listener("web", HTTP_PORT, "pool");
            web.backend_timeout = Duration::from_secs(1);
            c.listener(web);
        },
        |t| {
            listener_table(t, "web").insert("client_timeout".into(), "1s".into());
        },
    );
    // 25 pieces of 64 KiB, 100 ms apart: 2.5 s of upload, backend_timeout is 1 s.
    let chunks = vec![vec![b'u'; 64 * 1024]; 25];
    let total: usize = chunks.iter().map(Vec::len).sum();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {VIP}\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n"
    );
    let (slow, slow_took) = upload(&setup, &head, &chunks, Duration::from_millis(100));
    println!(
        "a 2.5 s upload with backend_timeout 1s: {:?} after {slow_took:?}",
        slow.lines().next()
    );
    assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
    assert!(slow.contains(&format!("received {total} bytes")), "{slow}");

    // The same head, one piece, then silence: cut off after client_timeout.
    let (stalled, stalled_took) = upload(&setup, &head, &chunks[..1], Duration::ZERO);
    println!(
        "an upload that stalls, client_timeout 1s: {:?} after {stalled_took:?}",
        stalled.lines().next()
    );
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert!(
        stalled_took >= CLIENT_TIMEOUT && stalled_took < CLIENT_TIMEOUT + Duration::from_secs(2),
        "408 after {stalled_took:?}, client_timeout is {CLIENT_TIMEOUT:?}"
    );
    assert_eq!(
        setup.daemon.wait_proxy_counter("client_body_timeouts", 1),
        1
    );
}

#[test]
fn http_request_looping_back_through_a_backend_gets_508() {
    require_root("http_request_looping_back_through_a_backend_gets_508");
    let setup = L7Setup::start("h7loop", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        // Without the marker the loop ends only when the first hop times out.
        web.backend_timeout = Duration::from_secs(3);
        c.listener(web);
    });
    let client = client_builder(&[], vip_http(), Duration::from_secs(10))
        .build()
        .expect("client");
    // The backend sends the request back to the VIP, as a misconfigured server or proxy
    // behind slb would.
    let answer = setup.client.run(async move {
        get(
            &client,
            &format!("http://{VIP}:{HTTP_PORT}/relay?to={VIP}:{HTTP_PORT}"),
        )
        .await
        .expect("GET")
    });
    println!(
        "a request relayed back to the VIP: {} {:?} in {:?}",
        answer.status,
        answer.text().trim(),
        answer.elapsed
    );
    assert_eq!(answer.status, 508, "{}", answer.text());
    assert!(answer.text().contains("Loop Detected"), "{}", answer.text());
    assert_eq!(setup.daemon.wait_proxy_counter("loops_refused", 1), 1);
}

/// The soft open-files limit under which exactly one descriptor number is free in a process
/// whose open descriptors are `open` (a new descriptor takes the lowest free number, and the
/// limit bounds the number, not the count).
fn limit_leaving_one_free(open: &std::collections::BTreeSet<u64>) -> u64 {
    let mut free = 0;
    for n in 0.. {
        if !open.contains(&n) {
            free += 1;
            if free == 2 {
                return n;
            }
        }
    }
    unreachable!("the numbers are unbounded")
}

/// Sets the soft open-files limit of process `pid`, returning the limits it had.
fn set_soft_nofile(pid: u32, soft: Option<u64>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `new` and writes `old`, both valid for the call.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    if let Some(soft) = soft {
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        let rc =
            unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }
    old
}

#[test]
fn http_out_of_file_descriptors_is_slbs_own_503_not_a_backend_failure() {
    require_root("http_out_of_file_descriptors_is_slbs_own_503_not_a_backend_failure");
    let setup = L7Setup::start("h7emfile", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let pid = setup.daemon.pid().expect("daemon pid");
    // No request has been made, so the pool holds no backend connection: the next request
    // needs a new one. Leave one descriptor free: the client's connection takes it.
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let limit = limit_leaving_one_free(&open);
    let old = set_soft_nofile(pid, Some(limit));
    let client = client_builder(&[], vip_http(), Duration::from_secs(5))
        .build()
        .expect("client");
    let url = format!("http://{VIP}:{HTTP_PORT}/");
    let starved = setup.client.run({
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url).await.expect("GET") }
    });
    set_soft_nofile(pid, Some(old.rlim_cur));
    let after = setup
        .client
        .run(async move { get(&client, &url).await.expect("GET") });
    let log = setup.daemon.log();
    println!(
        "soft open-files limit {limit} ({} open): {} {:?}; limit restored: {}",
        open.len(),
        starved.status,
        starved.text().trim(),
        after.status
    );
    assert_eq!(starved.status, 503, "{}", starved.text());
    assert!(
        starved.text().contains("out of file descriptors"),
        "{}",
        starved.text()
    );
    assert!(
        log.contains("slb is out of file descriptors") && !log.contains("backend failed"),
        "the log blames slb, not the backend:\n{log}"
    );
    assert_eq!(after.status, 200, "{}", after.text());
    assert!(
        setup
            .daemon
            .wait_proxy_counter("out_of_file_descriptors", 1)
            >= 1
    );
}
