//! HTTPS listener with two certificates chosen by SNI, HTTP/2 and HTTP/1.x by ALPN, the
//! server's cipher order, one header limit for both protocols, a WebSocket echo through the
//! HTTP listener, a streamed response body, and uploads however the client frames them.

mod http_common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use http_common::{client_builder, get, send, L7Setup, TestPki};
use slb_tests::config::{http_listener, https_listener};
use slb_tests::http::{vip_http, vip_https, HTTPS_PORT, HTTP_PORT};
use slb_tests::{require_root, CLIENT_ADDR};
use tokio_tungstenite::tungstenite::Message;

const TIMEOUT: Duration = Duration::from_secs(5);
const A: &str = "a.example.test";
const B: &str = "b.example.test";

#[test]
fn https_sni_picks_the_certificate_and_alpn_the_protocol() {
    require_root("https_sni_picks_the_certificate_and_alpn_the_protocol");
    let mut pki = None;
    let setup = L7Setup::start("h7tls", 2, |c, dir| {
        let p = TestPki::generate(dir, &[A, B]);
        c.group("pool", &[(1, 1), (2, 1)]);
        c.listener(https_listener(
            "secure",
            HTTPS_PORT,
            "pool",
            vec![p.certificate_config(A), p.certificate_config(B)],
        ));
        pki = Some(p);
    });
    let pki = pki.expect("certificates generated");
    let h2_client = client_builder(&[A, B], vip_https(), TIMEOUT)
        .add_root_certificate(pki.root())
        .tls_info(true)
        .build()
        .expect("client");
    let h1_client = client_builder(&[A, B], vip_https(), TIMEOUT)
        .add_root_certificate(pki.root())
        .tls_info(true)
        .http1_only()
        .build()
        .expect("client");
    // Without SNI (an IP address) the first certificate is the fallback; it does not match the
    // address, so this client does not verify it.
    let no_sni_client = client_builder(&[], vip_https(), TIMEOUT)
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .expect("client");
    let answers = setup.client.run(async move {
        let mut out = Vec::new();
        for (label, client) in [("h2", &h2_client), ("http/1.1", &h1_client)] {
            for domain in [A, B] {
                let url = format!("https://{domain}:{HTTPS_PORT}/hello");
                for _ in 0..2 {
                    let response = client
                        .get(&url)
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("{label} GET {url}: {e:?}"));
                    let version = response.version();
                    let der = response
                        .extensions()
                        .get::<reqwest::tls::TlsInfo>()
                        .and_then(|i| i.peer_certificate())
                        .map(<[u8]>::to_vec);
                    let status = response.status().as_u16();
                    let body = response.bytes().await.expect("body").to_vec();
                    out.push((label, Some(domain), url.clone(), version, der, status, body));
                }
            }
        }
        let url = format!("https://{}/hello", vip_https());
        let response = no_sni_client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
        let version = response.version();
        let der = response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(<[u8]>::to_vec);
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body").to_vec();
        out.push(("h2", None, url, version, der, status, body));
        out
    });
    let mut backends = std::collections::BTreeSet::new();
    for (label, domain, url, version, der, status, body) in &answers {
        let der = der
            .as_ref()
            .expect("the client recorded the server certificate");
        let presented = pki.domain_of(der);
        let echo = slb_tests::http::Echo::parse(body).expect("backend echo");
        println!(
            "{label:8} {url}: {version:?}, status {status}, certificate for {presented:?} ({} bytes DER), backend {} saw X-Forwarded-Proto {:?}, X-Real-IP {:?}",
            der.len(),
            echo.backend,
            echo.x_forwarded_proto,
            echo.x_real_ip
        );
        assert_eq!(*status, 200, "{url}");
        let expected_cert = domain.unwrap_or(A);
        assert_eq!(
            presented,
            Some(expected_cert),
            "{url}: wrong certificate (SNI {domain:?})"
        );
        let contains_name = der
            .windows(expected_cert.len())
            .any(|w| w == expected_cert.as_bytes());
        assert!(
            contains_name,
            "the certificate does not carry {expected_cert}"
        );
        let expected_version = if *label == "h2" {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(
            *version, expected_version,
            "{label} {url}: negotiated version"
        );
        assert_eq!(echo.x_forwarded_proto.as_deref(), Some("https"));
        assert_eq!(
            echo.x_real_ip.as_deref(),
            Some(CLIENT_ADDR.to_string().as_str())
        );
        assert_eq!(echo.path, "/hello");
        if let Some(d) = domain {
            assert_eq!(
                echo.host.as_deref(),
                Some(format!("{d}:{HTTPS_PORT}").as_str()),
                "{url}: Host (from :authority for h2) is kept"
            );
        }
        backends.insert(echo.backend);
    }
    assert_eq!(backends.len(), 2, "HTTPS requests spread: {backends:?}");
}

#[test]
fn http_websocket_echo_through_the_listener() {
    require_root("http_websocket_echo_through_the_listener");
    let setup = L7Setup::start("h7ws", 2, |c, _| {
        c.group("pool", &[(1, 1), (2, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let results = setup.client.run(async move {
        let mut results = Vec::new();
        for session in 0..2 {
            let stream = tokio::net::TcpStream::connect(vip_http())
                .await
                .expect("connect to the VIP");
            let url = format!("ws://ws.example.test:{HTTP_PORT}/ws");
            let (mut ws, response) = tokio_tungstenite::client_async(url.as_str(), stream)
                .await
                .unwrap_or_else(|e| panic!("WebSocket handshake through slb: {e}"));
            let backend = response
                .headers()
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            let mut echoed = Vec::new();
            let started = Instant::now();
            for k in 0..10 {
                let text = format!("session {session} message {k}");
                ws.send(Message::text(text.clone())).await.expect("send");
                let reply = tokio::time::timeout(TIMEOUT, ws.next())
                    .await
                    .expect("echo within 5 s")
                    .expect("stream open")
                    .expect("message");
                echoed.push((text, reply));
            }
            let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
            ws.send(Message::binary(blob.clone()))
                .await
                .expect("send binary");
            let reply = tokio::time::timeout(TIMEOUT, ws.next())
                .await
                .expect("binary echo within 5 s")
                .expect("stream open")
                .expect("message");
            let rtt = started.elapsed();
            ws.close(None).await.expect("close");
            results.push((backend, echoed, blob, reply, rtt));
        }
        results
    });
    let mut backends = Vec::new();
    for (backend, echoed, blob, reply, elapsed) in results {
        println!(
            "WebSocket via slb to {backend}: {} text messages and a 100000-byte binary echoed in {elapsed:.2?}",
            echoed.len()
        );
        for (sent, got) in echoed {
            assert_eq!(got, Message::text(sent.clone()), "echo of {sent:?}");
        }
        assert_eq!(reply, Message::binary(blob), "binary echo");
        backends.push(backend);
    }
    assert!(backends.iter().all(|b| b.starts_with('b')), "{backends:?}");
    assert_ne!(
        backends[0], backends[1],
        "the two sessions are balanced: {backends:?}"
    );
}

#[test]
fn http_response_body_streams() {
    require_root("http_response_body_streams");
    let setup = L7Setup::start("h7strm", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let client = client_builder(&[], vip_http(), Duration::from_secs(20))
        .build()
        .expect("client");
    // 40 chunks of 1 KiB, 50 ms apart: about 2 s in all.
    let (first, total, bytes, ordered, big) = setup.client.run(async move {
        let started = Instant::now();
        let mut response = client
            .get(format!("http://{}/stream?kb=40&ms=50", vip_http()))
            .send()
            .await
            .expect("GET /stream");
        assert_eq!(response.status(), 200);
        let mut first = None;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            first.get_or_insert_with(|| started.elapsed());
            body.extend_from_slice(&chunk);
        }
        let total = started.elapsed();
        let ordered = body
            .chunks(1024)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == b'a' + (i % 26) as u8));
        // And a large body without pauses arrives whole.
        let big = get(&client, &format!("http://{}/stream?kb=20480", vip_http()))
            .await
            .expect("GET 20 MiB");
        (first, total, body.len(), ordered, big)
    });
    let first = first.expect("at least one chunk");
    println!(
        "streamed 40 KiB in {total:.2?}, first bytes after {first:.2?}; 20 MiB body: {} bytes in {:.2?}",
        big.body.len(),
        big.elapsed
    );
    assert_eq!(bytes, 40 * 1024);
    assert!(ordered, "chunks arrived out of order or corrupted");
    assert!(total >= Duration::from_millis(1800), "{total:?}");
    assert!(
        first < Duration::from_millis(500),
        "the first chunk took {first:?}: slb buffers the body instead of streaming it"
    );
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), 20480 * 1024);
}

/// A TLS handshake with the HTTPS listener offering `alpn` and `suites` (in that order of
/// preference), then `request` sent and the answer read to its end: the negotiated protocol
/// and cipher suite, and the answer's first line.
async fn handshake_and_ask(
    pki_ca_pem: String,
    alpn: Vec<Vec<u8>>,
    suites: Vec<tokio_rustls::rustls::SupportedCipherSuite>,
    request: &'static [u8],
) -> Result<(Option<Vec<u8>>, String, String), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_certs(&pki_ca_pem) {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..rustls::crypto::ring::default_provider()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider.into())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(vip_https())
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(A).expect("server name");
    let mut tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let protocol = session.alpn_protocol().map(<[u8]>::to_vec);
    let suite = format!(
        "{:?}",
        session.negotiated_cipher_suite().expect("a suite").suite()
    );
    tls.write_all(request).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut answer)).await;
    let first_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok((protocol, suite, first_line))
}

fn rustls_pki_certs(pem: &str) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("CA PEM")
}

#[test]
fn https_serves_http10_only_clients_and_picks_the_cipher_in_its_own_order() {
    require_root("https_serves_http10_only_clients_and_picks_the_cipher_in_its_own_order");
    use tokio_rustls::rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
    };
    let mut pki = None;
    let setup = L7Setup::start("h7alpn", 1, |c, dir| {
        let p = TestPki::generate(dir, &[A]);
        c.group("pool", &[(1, 1)]);
        c.listener(https_listener(
            "secure",
            HTTPS_PORT,
            "pool",
            vec![p.certificate_config(A)],
        ));
        pki = Some(p);
    });
    let ca = pki.expect("certificates").ca_pem;
    const HTTP10: &[u8] = b"GET / HTTP/1.0\r\nHost: a.example.test\r\n\r\n";
    let (http10, preferring_aes128) = setup.client.run(async move {
        let http10 = handshake_and_ask(
            ca.clone(),
            vec![b"http/1.0".to_vec()],
            vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256],
            HTTP10,
        )
        .await;
        // A client that prefers the weaker suite gets the server's first choice it offers.
        let preferring_aes128 = handshake_and_ask(
            ca,
            vec![b"http/1.1".to_vec()],
            vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384],
            HTTP10,
        )
        .await;
        (http10, preferring_aes128)
    });
    println!("ALPN [http/1.0]: {http10:?}");
    println!("client preferring AES-128: {preferring_aes128:?}");
    let (protocol, _, first_line) = http10.expect("an http/1.0-only client is served");
    assert_eq!(protocol.as_deref(), Some(&b"http/1.0"[..]));
    assert!(
        first_line.starts_with("HTTP/1.") && first_line.contains(" 200 "),
        "answer: {first_line:?}"
    );
    let (_, suite, _) = preferring_aes128.expect("handshake");
    assert_eq!(
        suite, "TLS13_AES_256_GCM_SHA384",
        "the server's order decides"
    );
}

#[test]
fn http_header_limit_is_the_same_over_http1_and_http2() {
    require_root("http_header_limit_is_the_same_over_http1_and_http2");
    let setup = L7Setup::start("h7hdr", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let h1 = client_builder(&[], vip_http(), TIMEOUT)
        .http1_only()
        .build()
        .expect("client");
    let h2 = client_builder(&[], vip_http(), TIMEOUT)
        .http2_prior_knowledge()
        .build()
        .expect("client");
    // 20 KiB passes both (hyper's HTTP/2 default of 16 KiB used to refuse it); 70 KiB neither
    // (HTTP/1.1 let it through when one read took it whole), nor 200 KiB.
    let outcomes = setup.client.run(async move {
        let mut outcomes = Vec::new();
        for (label, client) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
            for kib in [20usize, 70, 200] {
                let value = "v".repeat(kib * 1024);
                let outcome = send(
                    client
                        .get(format!("http://{}/", vip_http()))
                        .header("x-large", value),
                )
                .await
                .map(|a| a.status)
                .map_err(|e| format!("{e:?}"));
                outcomes.push((label, kib, outcome));
            }
        }
        outcomes
    });
    for (label, kib, outcome) in &outcomes {
        println!("{label}: a {kib} KiB header -> {outcome:?}");
    }
    for (label, kib, outcome) in outcomes {
        let expected = if kib == 20 { 200 } else { 431 };
        assert_eq!(outcome, Ok(expected), "{label} with a {kib} KiB header");
    }
}

/// Request bodies reach the backend byte for byte however the client frames them: over
/// HTTP/1.1 with a length or chunked, over HTTP/2 with a length or without one (slb then sends
/// it chunked). The pieces range from one byte to more than slb copies into a write (16 KiB).
#[test]
fn http_uploads_reach_the_backend_intact_however_framed() {
    require_root("http_uploads_reach_the_backend_intact_however_framed");
    let setup = L7Setup::start("h7upl", 1, |c, _| {
        c.group("pool", &[(1, 1)]);
        c.listener(http_listener("web", HTTP_PORT, "pool"));
    });
    let pieces: Vec<Vec<u8>> = [1usize, 700, 20_000, 3, 65_536, 16_384, 90_000]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|j| (j * 31 + i * 7 + j / 251) as u8).collect())
        .collect();
    let whole: Vec<u8> = pieces.concat();
    let h1 = client_builder(&[], vip_http(), TIMEOUT)
        .http1_only()
        .build()
        .expect("client");
    let h2 = client_builder(&[], vip_http(), TIMEOUT)
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = format!("http://{}/upload", vip_http());
    let answers = setup.client.run(async move {
        let mut answers = Vec::new();
        for (label, client) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
            for streamed in [false, true] {
                let body = if streamed {
                    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                        pieces.iter().cloned().map(Ok).collect();
                    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
                } else {
                    reqwest::Body::from(pieces.concat())
                };
                let answer = send(client.post(&url).body(body))
                    .await
                    .unwrap_or_else(|e| panic!("{label} upload (streamed {streamed}): {e:?}"));
                answers.push((label, streamed, answer.status, answer.text()));
            }
        }
        answers
    });
    let expected_hash = slb_tests::http::fnv1a64(&whole);
    for (label, streamed, status, text) in answers {
        println!("{label}, streamed {streamed}: {status} {text}");
        assert_eq!(status, 200, "{label}, streamed {streamed}: {text}");
        let framing = if streamed { "chunked" } else { "length" };
        assert_eq!(
            text.trim(),
            format!(
                "received {} bytes, fnv1a {expected_hash:016x}, framed by {framing}",
                whole.len()
            ),
            "{label}, streamed {streamed}"
        );
    }
}

/// TLS 1.2 clients that ask to renegotiate are refused (rustls does that), counted in `slb
/// status`, and the daemon's log gets a count every few seconds instead of one WARN line per
/// attempt.
#[test]
fn https_renegotiation_attempts_are_counted_not_logged_one_by_one() {
    require_root("https_renegotiation_attempts_are_counted_not_logged_one_by_one");
    const ATTEMPTS: usize = 12;
    let mut pki = None;
    let mut setup = L7Setup::start("h7reneg", 1, |c, dir| {
        let p = TestPki::generate(dir, &[A]);
        c.group("pool", &[(1, 1)]);
        let mut secure =
            https_listener("secure", HTTPS_PORT, "pool", vec![p.certificate_config(A)]);
        // A connection that sends no request is closed after this: that ends each attempt.
        secure.header_timeout = Duration::from_secs(1);
        c.listener(secure);
        pki = Some(p);
    });
    drop(pki);
    let connect = vip_https().to_string();
    let attempts: Vec<_> = (0..ATTEMPTS)
        .map(|attempt| {
            let (ns, connect) = (setup.topo.client_ns().to_owned(), connect.clone());
            std::thread::spawn(move || {
                ask_to_renegotiate(&ns, &connect)
                    .unwrap_or_else(|e| panic!("attempt {attempt}: {e:#}"))
            })
        })
        .collect();
    for a in attempts {
        a.join().expect("attempt");
    }
    let summary = format!("refused_since_start={ATTEMPTS}");
    setup
        .daemon
        .wait_for_log(&summary, 1, Duration::from_secs(10))
        .expect("the count of refused renegotiations in the log");
    let counted = setup
        .daemon
        .wait_proxy_counter("tls_renegotiations_refused", ATTEMPTS as u64);
    assert_eq!(counted, ATTEMPTS as u64, "slb status counts them");
    let log = setup.daemon.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("renegotiat") || l.contains("NoRenegotiation"))
        .collect();
    println!(
        "{ATTEMPTS} renegotiation attempts; the log says:\n{}",
        lines.join("\n")
    );
    assert_eq!(
        log.matches("NoRenegotiation").count(),
        0,
        "no line per attempt:\n{log}"
    );
    assert!(
        lines.len() <= 3,
        "a few summary lines for {ATTEMPTS} attempts, not one each:\n{log}"
    );
}

/// One TLS 1.2 connection (openssl s_client, with `-msg` to show the handshake) that asks to
/// renegotiate once its handshake is done. Refused, s_client waits for a ServerHello that never
/// comes, with its renegotiating ClientHello sent, until slb closes the connection that sent no
/// request (header_timeout).
fn ask_to_renegotiate(ns: &str, connect: &str) -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};
    let args = [
        "openssl",
        "s_client",
        "-connect",
        connect,
        "-servername",
        A,
        "-tls1_2",
        "-msg",
    ];
    let mut child = slb_tests::exec::command_in(ns, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let started = Instant::now();
    let mut asked = false;
    // Lines until s_client ends (slb closed the connection), or the watchdog ends it.
    let (ended, ended_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            if ended_rx.recv_timeout(TIMEOUT).is_err() {
                // Still running: it is our child, not yet reaped, so the pid is still its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        })
    };
    for line in stdout.lines().map_while(Result::ok) {
        // The server's Finished: the handshake is done and s_client takes commands.
        if !asked && line.contains("<<< TLS 1.2, Handshake [length 0010], Finished") {
            stdin.write_all(b"R\n")?;
            asked = true;
        }
    }
    // stdout ended: s_client exited (not reaped yet, so the watchdog cannot hit another pid).
    let _ = ended.send(());
    watchdog.join().expect("watchdog");
    let status = child.wait()?;
    anyhow::ensure!(asked, "the handshake did not finish ({status})");
    anyhow::ensure!(
        started.elapsed() < TIMEOUT,
        "slb did not close the connection within {TIMEOUT:?}"
    );
    Ok(())
}
