//! The PMTU test, for either address family: the balancer's link towards the backend has a
//! smaller MTU than the client's path, so the client's full-size segments do not fit. slb must
//! answer them with an ICMP "fragmentation needed" / ICMPv6 "Packet Too Big" quoting the packet
//! as the client sent it (to the VIP); an error quoting the backend's address would be ignored
//! by the client and the upload would stall.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::{Family, SlbConfig, SlbDaemon, Topology, BACKEND_PORT};

/// Uploads per test, each on a new connection.
pub const UPLOADS: usize = 10;

/// One upload through the VIP: `bytes`, then the sink's count back.
fn upload(to: SocketAddr, bytes: usize) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&vec![b'x'; bytes])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// [`UPLOADS`] uploads of `bytes` each from the client to `family`'s TCP VIP while slb's side
/// of the link to the one backend has MTU `backend_side_mtu`; asserts that all of them arrive
/// whole and that slb counted at least one `icmp_too_big_sent`.
pub fn uploads_discover_a_smaller_backend_side_mtu(
    family: Family,
    tag: &str,
    backend_side_mtu: u32,
    bytes: usize,
) {
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag(tag)
        .backends(1)
        .build()
        .expect("create topology");
    // The balancer's side of the backend link only: the backend still advertises an MSS for
    // 1500 bytes, as a backend behind a router with a smaller link would.
    topo.exec_in(
        topo.slb_ns(),
        [
            "ip",
            "link",
            "set",
            "s1",
            "mtu",
            &backend_side_mtu.to_string(),
        ],
    )
    .expect("set the MTU");

    // A sink on the backend: counts what it got until EOF and says so.
    let listener = topo
        .in_netns(topo.backend_ns(1), || {
            TcpListener::bind((family.unspecified(), BACKEND_PORT))
        })
        .expect("enter the backend namespace")
        .expect("bind the sink");
    let sink = std::thread::spawn(move || {
        for _ in 0..UPLOADS {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(15)));
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            let _ = conn.write_all(format!("ok {}", got.len()).as_bytes());
        }
    });

    let config = SlbConfig::standard_in(family, &unique_instance(tag), &[1]);
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");

    let results: Vec<std::io::Result<String>> = topo
        .in_netns(topo.client_ns(), || {
            (0..UPLOADS)
                .map(|_| upload(family.vip_tcp(), bytes))
                .collect()
        })
        .expect("enter the client namespace");
    let expected = format!("ok {bytes}");
    let done = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|a| *a == expected))
        .count();
    let status = daemon.status().expect("slb status");
    let counters = &status.counters;
    let too_big_sent = counters.get("icmp_too_big_sent").copied();
    println!(
        "PMTU ({family:?}, MTU {backend_side_mtu} towards the backend): {done} of {UPLOADS} \
         uploads of {bytes} bytes done; icmp_too_big_sent {too_big_sent:?}; results {results:?}",
    );
    assert_eq!(done, UPLOADS, "{results:?}");
    assert!(
        too_big_sent.unwrap_or(0) >= 1,
        "the client learnt the MTU from slb's ICMP error: {counters:#?}"
    );
    let _ = sink.join();
}
