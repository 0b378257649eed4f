//! HTTP(S) listeners facing bad input: a malformed request line gets 400, oversized headers
//! 431, a slowloris client is cut off after header_timeout, all while other clients are
//! served; certificate files that are missing or not PEM are refused by `slb check-config`
//! and by a running daemon on SIGHUP, naming the file, and the old config keeps serving.

mod http_common;

use std::io::Write as _;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_common::{client_builder, get, read_to_end, L7Setup, TestPki};
use slb_tests::config::{http_listener, https_listener};
use slb_tests::http::{tcp_connect_in, vip_http, vip_https, HTTPS_PORT, HTTP_PORT};
use slb_tests::{require_root, VIP};

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after its last byte a slowloris connection may stay open.
const CUT_OFF_WITHIN: Duration = Duration::from_secs(3);
const REJECTED: &str = "SIGHUP reload rejected, the running config stays";

/// Slb with an HTTP listener (header_timeout 1 s) over two backends.
fn start(tag: &str) -> L7Setup {
    L7Setup::start(tag, 2, |c, _| {
        c.group("pool", &[(1, 1), (2, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.header_timeout = Duration::from_secs(1);
        c.listener(web);
    })
}

/// A client of the HTTP listener that stands for the other clients, which must be served.
fn other_client() -> reqwest::Client {
    client_builder(&[], vip_http(), Duration::from_secs(3))
        .build()
        .expect("client")
}

/// A raw connection to the HTTP listener from the client namespace.
fn connect(setup: &L7Setup) -> TcpStream {
    tcp_connect_in(setup.topo.client_ns(), vip_http(), Duration::from_secs(3)).expect("connect")
}

/// Another client is still served (200).
fn check_served(setup: &L7Setup, client: &reqwest::Client, what: &str) {
    let client = client.clone();
    let a = setup.client.run(async move {
        get(&client, &format!("http://{VIP}:{HTTP_PORT}/ok"))
            .await
            .expect("GET")
    });
    assert_eq!(a.status, 200, "{what}: another client is not served");
    println!(
        "{what}: another client still gets 200 from {:?}",
        a.backend()
    );
}

#[test]
fn http_malformed_request_lines_get_400() {
    require_root("http_malformed_request_lines_get_400");
    let setup = start("h7mal");
    let client = other_client();
    let connect = || connect(&setup);
    let check_served = |what: &str| check_served(&setup, &client, what);

    // Malformed request lines.
    for (what, request) in [
        (
            "a request line without a version",
            &b"THIS IS NOT HTTP\r\n\r\n"[..],
        ),
        (
            "binary garbage",
            &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        ),
        (
            "a bad header line",
            &b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"[..],
        ),
    ] {
        let mut s = connect();
        s.write_all(request).expect("send");
        let out = read_to_end(&mut s, Duration::from_secs(3));
        println!(
            "{what}: {:?}, then {} after {:.2?}",
            out.status_line(),
            out.end,
            out.after
        );
        assert!(
            out.status_line().starts_with("HTTP/1.1 400"),
            "{what}: expected 400, got {:?}",
            String::from_utf8_lossy(&out.bytes)
        );
        check_served(what);
    }
}

#[test]
fn http_oversized_headers_get_431() {
    require_root("http_oversized_headers_get_431");
    let setup = start("h7big");
    let client = other_client();
    let connect = || connect(&setup);
    let check_served = |what: &str| check_served(&setup, &client, what);

    // 100 KiB of headers, past the 64 KiB limit. The sender runs on its own thread: the
    // proxy may stop reading (and reset) once it has refused the request.
    let mut s = connect();
    let mut request = b"GET /big HTTP/1.1\r\nHost: big.example.test\r\n".to_vec();
    for k in 0..100 {
        request.extend_from_slice(format!("X-Filler-{k:03}: {}\r\n", "y".repeat(1008)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let header_bytes = request.len();
    let mut writer = s.try_clone().expect("clone socket");
    let sender = std::thread::spawn(move || writer.write_all(&request).map_err(|e| e.to_string()));
    let out = read_to_end(&mut s, Duration::from_secs(3));
    let sent = sender.join().expect("sender thread");
    println!(
        "{header_bytes} bytes of headers: {:?}, then {} after {:.2?} (sending: {sent:?})",
        out.status_line(),
        out.end,
        out.after
    );
    assert!(
        out.status_line().starts_with("HTTP/1.1 431"),
        "oversized headers: expected 431, got {:?} ({})",
        String::from_utf8_lossy(&out.bytes[..out.bytes.len().min(200)]),
        out.end
    );
    check_served("after oversized headers");
}

#[test]
fn http_slowloris_clients_are_cut_off_after_header_timeout() {
    require_root("http_slowloris_clients_are_cut_off_after_header_timeout");
    let setup = start("h7slow");
    let client = other_client();
    let connect = || connect(&setup);

    // Slowloris: partial headers, then silence, on several connections, while another client
    // keeps sending requests.
    let mut slow: Vec<(TcpStream, Instant)> = (0..8)
        .map(|k| {
            let mut s = connect();
            s.write_all(
                format!("GET /slow-{k} HTTP/1.1\r\nHost: slow.example.test\r\nX-Partial: ")
                    .as_bytes(),
            )
            .expect("send partial header");
            (s, Instant::now())
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let served = setup.client.spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(
                    get(&client, &format!("http://{VIP}:{HTTP_PORT}/meanwhile"))
                        .await
                        .map(|a| a.status)
                        .map_err(|e| e.to_string()),
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        }
    });
    let mut cut_after = Vec::new();
    for (s, sent_at) in slow.iter_mut() {
        let out = read_to_end(s, Duration::from_secs(6));
        cut_after.push((sent_at.elapsed(), out.end.clone(), out.status_line()));
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = setup.client.join(served);
    for (k, (after, end, line)) in cut_after.iter().enumerate() {
        println!("slowloris {k}: {end} {after:.2?} after its partial header; answer {line:?}");
    }
    let ok = statuses.iter().filter(|s| matches!(s, Ok(200))).count();
    println!(
        "meanwhile another client got {ok} of {} requests answered 200",
        statuses.len()
    );
    for (k, (after, end, _)) in cut_after.iter().enumerate() {
        assert!(
            end.starts_with("closed"),
            "slowloris connection {k} still open after {after:?}"
        );
        assert!(
            *after >= HEADER_TIMEOUT - Duration::from_millis(100) && *after <= CUT_OFF_WITHIN,
            "slowloris connection {k} closed {after:?} after its partial header (header_timeout {HEADER_TIMEOUT:?})"
        );
    }
    assert!(
        statuses.len() >= 20,
        "too few requests meanwhile: {}",
        statuses.len()
    );
    assert_eq!(
        ok,
        statuses.len(),
        "others must be served meanwhile: {statuses:?}"
    );
}

/// A connection that sends nothing at all (or only part of the HTTP/2 preface) must be cut
/// off after header_timeout like any slow client.
#[test]
fn http_silent_connection_is_cut_off_after_header_timeout() {
    require_root("http_silent_connection_is_cut_off_after_header_timeout");
    let setup = L7Setup::start("h7idle", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        let mut web = http_listener("web", HTTP_PORT, "pool");
        web.header_timeout = Duration::from_secs(1);
        c.listener(web);
    });
    let ns = setup.topo.client_ns().to_owned();
    let mut outcomes = Vec::new();
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("part of the HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..]),
    ] {
        let mut s = tcp_connect_in(&ns, vip_http(), Duration::from_secs(3)).expect("connect");
        s.write_all(bytes).expect("send");
        let out = read_to_end(&mut s, CUT_OFF_WITHIN + Duration::from_secs(1));
        println!(
            "a connection that sent {what}: {} after {:.2?}",
            out.end, out.after
        );
        outcomes.push((what, out.end, out.after));
    }
    for (what, end, after) in outcomes {
        assert!(
            end.starts_with("closed") && after <= CUT_OFF_WITHIN,
            "a connection that sent {what} is {end} after {after:?} (header_timeout {HEADER_TIMEOUT:?})"
        );
    }
}

#[test]
fn https_bad_certificate_files_are_refused_and_the_old_config_serves() {
    require_root("https_bad_certificate_files_are_refused_and_the_old_config_serves");
    const A: &str = "a.example.test";
    const B: &str = "b.example.test";
    let mut pki = None;
    let mut setup = L7Setup::start("h7cert", 1, |c, dir| {
        let p = TestPki::generate(dir, &[A, B]);
        c.group("pool", &[(1, 1)]);
        c.listener(https_listener(
            "secure",
            HTTPS_PORT,
            "pool",
            vec![p.certificate_config(A), p.certificate_config(B)],
        ));
        pki = Some(p);
    });
    let pki = pki.expect("certificates");
    let dir = setup.dir.path().to_owned();
    let client = client_builder(&[A, B], vip_https(), Duration::from_secs(3))
        .add_root_certificate(pki.root())
        .tls_info(true)
        .build()
        .expect("client");
    let served_by = |what: &str| {
        let client = client.clone();
        let ders = setup.client.run(async move {
            let mut ders = Vec::new();
            for d in [A, B] {
                let r = client
                    .get(format!("https://{d}:{HTTPS_PORT}/"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET https://{d}: {e:?}"));
                assert_eq!(r.status(), 200);
                ders.push(
                    r.extensions()
                        .get::<reqwest::tls::TlsInfo>()
                        .and_then(|i| i.peer_certificate())
                        .map(<[u8]>::to_vec)
                        .expect("peer certificate"),
                );
            }
            ders
        });
        let names: Vec<Option<&str>> = ders.iter().map(|d| pki.domain_of(d)).collect();
        println!("{what}: HTTPS answers, certificates {names:?}");
        assert_eq!(names, vec![Some(A), Some(B)], "{what}");
    };
    served_by("at start");
    let generation = setup.daemon.generation().expect("generation");

    let missing = dir.join("missing.pem");
    let not_pem = dir.join("not-a-cert.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").expect("write");
    let not_pem_key = dir.join("not-a-key.key");
    std::fs::write(&not_pem_key, "neither is this a key\n").expect("write");
    type BreakConfig<'a> = Box<dyn Fn(&mut slb_tests::SlbConfig) + 'a>;
    let variants: Vec<(&str, BreakConfig, &Path)> = vec![
        (
            "a missing certificate file",
            Box::new(|c| c.listener_mut("secure").certificates[1].cert = missing.clone()),
            &missing,
        ),
        (
            "a certificate file that is not PEM",
            Box::new(|c| c.listener_mut("secure").certificates[0].cert = not_pem.clone()),
            &not_pem,
        ),
        (
            "a key file that is not PEM",
            Box::new(|c| c.listener_mut("secure").certificates[1].key = not_pem_key.clone()),
            &not_pem_key,
        ),
    ];
    for (k, (what, change, file)) in variants.iter().enumerate() {
        let mut bad = setup.config.clone();
        change(&mut bad);
        let text = bad.to_toml();
        let path = dir.join(format!("bad-{k}.toml"));
        std::fs::write(&path, &text).expect("write config");
        let out = setup
            .daemon
            .cli([Path::new("check-config").as_os_str(), path.as_os_str()])
            .expect("run check-config");
        println!("{what}: check-config says: {}", out.error_summary());
        assert!(!out.success(), "check-config accepted {what}:\n{out}");
        let file_name = file.display().to_string();
        assert!(
            out.stderr.contains(&file_name),
            "check-config's error for {what} does not name {file_name}:\n{out}"
        );

        let rejected_before = setup.daemon.log_count(REJECTED);
        setup.daemon.write_config_text(&text).expect("write config");
        setup.daemon.sighup().expect("SIGHUP");
        setup
            .daemon
            .wait_for_log(REJECTED, rejected_before + 1, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: no rejection logged: {e:#}"));
        let log = setup.daemon.log();
        let line = log
            .lines()
            .filter(|l| l.contains(REJECTED))
            .nth(rejected_before)
            .expect("the rejection line");
        assert!(
            line.contains(&file_name),
            "the daemon's rejection of {what} does not name {file_name}: {line}"
        );
        assert_eq!(
            setup.daemon.generation(),
            Some(generation),
            "{what}: the generation changed"
        );
        served_by(&format!("after SIGHUP with {what}"));
    }
    // The good config still reloads.
    setup
        .daemon
        .write_config_text(&setup.config.to_toml())
        .expect("restore config");
    let next = setup.daemon.reload().expect("reload the good config");
    assert_eq!(next, generation + 1);
    served_by("after reloading the good config");
}
