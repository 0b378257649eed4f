//! An HTTP listener on an IPv6 VIP: IPv6 clients are served (by IPv4 backends: the proxy opens
//! its own connections, so a group may have either family), and the backends learn the IPv6
//! client from X-Forwarded-For and X-Real-IP.

mod http_common;

use std::net::SocketAddr;
use std::time::Duration;

use http_common::{client_builder, count_backends, get, send, L7Setup, TestPki};
use slb_tests::config::{http_listener, listener_on, Listener, Protocol};
use slb_tests::http::{wait_access_log, HTTPS_PORT, HTTP_PORT};
use slb_tests::{require_root, CLIENT_ADDR6, VIP6};

const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn http_listener_on_an_ipv6_vip_serves_ipv6_clients_and_names_them_to_the_backends() {
    require_root("http_listener_on_an_ipv6_vip_serves_ipv6_clients_and_names_them_to_the_backends");
    let setup = L7Setup::start("h7v6", 2, |c, _| {
        c.group("pool", &[(1, 1), (2, 1)]);
        c.listener(listener_on(
            VIP6.into(),
            "web6",
            Protocol::Http,
            HTTP_PORT,
            Some("pool"),
        ));
        // The IPv4 twin on the same port: one listener per address and port.
        c.listener(http_listener("web4", HTTP_PORT, "pool"));
    });
    let host = "v6.example.test";
    let vip6 = SocketAddr::new(VIP6.into(), HTTP_PORT);
    let client = client_builder(&[host], vip6, TIMEOUT)
        .build()
        .expect("client");
    let (answers, chained) = setup.client.run(async move {
        let url = format!("http://{host}:{HTTP_PORT}/who");
        let mut answers = Vec::new();
        for _ in 0..40 {
            answers.push(get(&client, &url).await.expect("GET over IPv6"));
        }
        let chained = send(client.get(&url).header("x-forwarded-for", "2001:db8::7"))
            .await
            .expect("GET with X-Forwarded-For");
        (answers, chained)
    });
    let counts = count_backends(&answers);
    println!("40 requests to [{VIP6}]:{HTTP_PORT} went to {counts:?}");
    assert!(answers.iter().all(|a| a.status == 200), "{counts:?}");
    assert_eq!(counts.len(), 2, "both backends serve: {counts:?}");

    let client_ip = CLIENT_ADDR6.to_string();
    let e = answers[0].echo();
    println!(
        "backend saw: Host {:?}, X-Forwarded-For {:?}, X-Real-IP {:?}, peer {}",
        e.host, e.x_forwarded_for, e.x_real_ip, e.peer
    );
    assert_eq!(e.x_forwarded_for.as_deref(), Some(client_ip.as_str()));
    assert_eq!(e.x_real_ip.as_deref(), Some(client_ip.as_str()));
    assert_eq!(
        e.host.as_deref(),
        Some(format!("{host}:{HTTP_PORT}").as_str())
    );
    let peer: SocketAddr = e.peer.parse().expect("the backend's peer is an address");
    assert!(
        peer.is_ipv4(),
        "the proxy reaches the IPv4 backend over IPv4: {peer}"
    );
    assert_eq!(
        chained.echo().x_forwarded_for.as_deref(),
        Some(format!("2001:db8::7, {client_ip}").as_str()),
        "slb appends the IPv6 client"
    );

    // The access log names the listener and the IPv6 client.
    let ours: Vec<_> = wait_access_log(&setup.access_log(), |log| {
        log.iter().filter(|r| r.listener == "web6").count() >= 41
    })
    .into_iter()
    .filter(|r| r.listener == "web6")
    .collect();
    assert_eq!(ours.len(), 41, "records of web6");
    let client6 = std::net::IpAddr::from(CLIENT_ADDR6);
    assert!(
        ours.iter().all(|r| r.client.ip() == client6),
        "clients logged: {:?}",
        ours.iter().map(|r| r.client).collect::<Vec<_>>()
    );
}

#[test]
fn https_listener_on_an_ipv6_vip_serves_http2_to_ipv6_clients() {
    require_root("https_listener_on_an_ipv6_vip_serves_http2_to_ipv6_clients");
    let host = "secure6.example.test";
    let mut pki = None;
    let setup = L7Setup::start("h7tls6", 2, |c, dir| {
        let p = TestPki::generate(dir, &[host]);
        c.group("pool", &[(1, 1), (2, 1)]);
        c.listener(Listener {
            certificates: vec![p.certificate_config(host)],
            ..listener_on(
                VIP6.into(),
                "secure6",
                Protocol::Https,
                HTTPS_PORT,
                Some("pool"),
            )
        });
        pki = Some(p);
    });
    let pki = pki.expect("certificates generated");
    let client = client_builder(&[host], SocketAddr::new(VIP6.into(), HTTPS_PORT), TIMEOUT)
        .add_root_certificate(pki.root())
        .build()
        .expect("client");
    let answers = setup.client.run(async move {
        let url = format!("https://{host}:{HTTPS_PORT}/who");
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(get(&client, &url).await.expect("GET over TLS and IPv6"));
        }
        answers
    });
    let counts = count_backends(&answers);
    println!("10 HTTPS requests to [{VIP6}]:{HTTPS_PORT} went to {counts:?}");
    assert!(answers.iter().all(|a| a.status == 200), "{counts:?}");
    assert!(
        answers
            .iter()
            .all(|a| a.version == reqwest::Version::HTTP_2),
        "ALPN picks HTTP/2"
    );
    let e = answers[0].echo();
    let client_ip = CLIENT_ADDR6.to_string();
    assert_eq!(e.x_forwarded_for.as_deref(), Some(client_ip.as_str()));
    assert_eq!(e.x_forwarded_proto.as_deref(), Some("https"));
}
