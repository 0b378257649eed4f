//! Backend load through BPF_PROG_TEST_RUN: the data plane's open-connection counts follow the
//! connection table through opens, closes, reopened ports, re-picks and the sweeper's expiry;
//! least connections places each new flow on the least loaded backend for its weight; a
//! backend at its `max_connections` takes no new flow, and a listener whose backends are all
//! full drops them, counted.

use std::collections::BTreeMap;

use slb_common::TCP_FLAG_FIN;
use slb_user::flows::Sweeper;

use super::*;

/// `config(1, 1)` plus a listener `lc` (:85) over the group `lc`, whose backends are given as
/// TOML inline tables, with `extra` lines for the listener (e.g. its scheduler).
fn with_load_listener(backends: &[&str], extra: &str) -> Config {
    let mut text = config(1, 1);
    text.push_str(&format!(
        "[[listeners]]\nname = \"lc\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = 85\ngroup = \"lc\"\n{extra}\n[[groups]]\nname = \"lc\"\nbackends = [{}]\n",
        backends.join(", ")
    ));
    Config::parse(&text, "test").expect("config")
}

/// Open connections by backend address, as the data plane counts them, for `listener`.
fn open_by_backend(h: &Testbed, listener: &str) -> BTreeMap<[u8; 4], u32> {
    h.reconciler
        .state()
        .backends
        .iter()
        .filter(|b| b.key.listener == listener)
        .map(|b| {
            let std::net::IpAddr::V4(a) = b.key.address else {
                panic!("IPv4 backend")
            };
            let open = h
                .reconciler
                .maps()
                .counters
                .backend_connections
                .open_connections(b.id);
            (a.octets(), open)
        })
        .collect()
}

/// Open connections by backend address, as the connection table holds them (entries not
/// closing), for the listener on `vip_port`.
fn open_in_table(h: &Testbed, vip_port: u16) -> BTreeMap<[u8; 4], u32> {
    let mut open = BTreeMap::new();
    let backends: BTreeMap<u32, [u8; 4]> = h
        .reconciler
        .state()
        .backends
        .iter()
        .filter_map(|b| match b.key.address {
            std::net::IpAddr::V4(a) if b.key.port == backend_port_of(vip_port) => {
                Some((b.id, a.octets()))
            }
            _ => None,
        })
        .collect();
    for address in backends.values() {
        open.insert(*address, 0);
    }
    for (flow, conn) in flow_entries(h, "CONNECTIONS") {
        if flow.dst_port != vip_port || conn.flags & slb_common::CONN_F_CLOSING != 0 {
            continue;
        }
        *open.entry(backends[&conn.backend_id]).or_insert(0) += 1;
    }
    open
}

fn backend_port_of(vip_port: u16) -> u16 {
    if vip_port == 85 {
        8085
    } else {
        8000 + vip_port
    }
}

/// A SYN then an ACK on `port` to `vip_port`: the backend the flow went to, or `None` when the
/// SYN was dropped.
fn open_flow(h: &Testbed, port: u16, vip_port: u16) -> Option<[u8; 4]> {
    let (verdict, _) = h.run(
        &frame(h.in_mac, CLIENT, VIP, tcp(port, vip_port, SYN)),
        h.in_index,
    );
    if verdict == XDP_DROP {
        return None;
    }
    let (_, out) = h.run(
        &frame(h.in_mac, CLIENT, VIP, tcp(port, vip_port, ACK)),
        h.in_index,
    );
    Some(parse_valid(&out).dst)
}

fn close_flow(h: &Testbed, port: u16, vip_port: u16, flags: u8) {
    h.run(
        &frame(h.in_mac, CLIENT, VIP, tcp(port, vip_port, flags)),
        h.in_index,
    );
}

fn total(counts: &BTreeMap<[u8; 4], u32>) -> u32 {
    counts.values().sum()
}

#[test]
fn open_connections_follow_the_table_through_close_reopen_repick_and_expiry() {
    in_fresh_netns(|| {
        let config = Config::parse(&config(1, 1), "test").unwrap();
        let mut h = testbed(&config);
        let ports: Vec<u16> = (41000..41012).collect();
        for &port in &ports {
            open_flow(&h, port, 80).expect("served");
        }
        assert_eq!(total(&open_by_backend(&h, "web")), 12);
        assert_eq!(open_by_backend(&h, "web"), open_in_table(&h, 80));

        // A FIN closes (once, however often it comes), a SYN on the closed port opens again, an
        // RST closes.
        close_flow(&h, ports[0], 80, TCP_FLAG_FIN | ACK);
        close_flow(&h, ports[0], 80, TCP_FLAG_FIN | ACK);
        close_flow(&h, ports[1], 80, 0x04);
        assert_eq!(total(&open_by_backend(&h, "web")), 10);
        h.run(
            &frame(h.in_mac, CLIENT, VIP, tcp(ports[0], 80, SYN)),
            h.in_index,
        );
        assert_eq!(total(&open_by_backend(&h, "web")), 11);
        assert_eq!(open_by_backend(&h, "web"), open_in_table(&h, 80));

        // Backend A declared down: its flows move to B with their next packet, and the counts
        // move with them.
        h.reconciler
            .apply(&config, &verdicts("web", &[BACKEND_A]))
            .unwrap();
        for &port in &ports[1..] {
            close_flow(&h, port, 80, ACK);
        }
        let moved = open_by_backend(&h, "web");
        assert_eq!(moved[&BACKEND_A], 0, "{moved:?}");
        assert_eq!(moved[&BACKEND_B], 11, "{moved:?}");
        assert_eq!(moved, open_in_table(&h, 80));

        // The sweeper expires the idle flows (a timeout of 0 s): each open one leaves its
        // backend's count; the closed one stays for its closing timeout.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let sweeper = Sweeper::open(h.pin_dir()).expect("sweeper");
        let web = listener_index(&h, "web");
        let timeouts = BTreeMap::from([(web, 0)]);
        let counts = sweeper.sweep(&timeouts, &[web], &[]).expect("sweep");
        assert_eq!(counts.expired, 11, "{counts:?}");
        assert_eq!(total(&open_by_backend(&h, "web")), 0);
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), 1);
    });
}

#[test]
fn least_connections_places_each_new_flow_on_the_least_loaded_backend_for_its_weight() {
    in_fresh_netns(|| {
        let h = testbed(&with_load_listener(
            &[
                r#"{ address = "10.20.0.2", port = 8085, weight = 1 }"#,
                r#"{ address = "10.20.0.3", port = 8085, weight = 3 }"#,
            ],
            r#"scheduler = "wlc""#,
        ));
        for port in 43000..43008 {
            open_flow(&h, port, 85).expect("served");
        }
        let counts = open_by_backend(&h, "lc");
        assert_eq!(
            (counts[&BACKEND_A], counts[&BACKEND_B]),
            (2, 6),
            "{counts:?}"
        );
        // Four of B's flows close: the next four new ones go to B, whose load per weight is
        // then the lowest each time (A: 2 for 1; B: 2 to 5 for 3).
        let on_b: Vec<u16> = flow_entries(&h, "CONNECTIONS")
            .into_iter()
            .filter(|(f, _)| f.dst_port == 85)
            .filter(|(_, c)| open_by_backend_id(&h, c.backend_id) == BACKEND_B)
            .map(|(f, _)| f.src_port)
            .take(4)
            .collect();
        for &port in &on_b {
            close_flow(&h, port, 85, TCP_FLAG_FIN | ACK);
        }
        let mut went_to = Vec::new();
        for port in 43100..43103 {
            went_to.push(open_flow(&h, port, 85).expect("served"));
        }
        assert!(went_to.iter().all(|b| *b == BACKEND_B), "{went_to:?}");
        let counts = open_by_backend(&h, "lc");
        assert_eq!((counts[&BACKEND_A], counts[&BACKEND_B]), (2, 5));
        assert_eq!(counts, open_in_table(&h, 85));
    });
}

fn open_by_backend_id(h: &Testbed, id: u32) -> [u8; 4] {
    let b = h
        .reconciler
        .state()
        .backends
        .iter()
        .find(|b| b.id == id)
        .expect("backend");
    match b.key.address {
        std::net::IpAddr::V4(a) => a.octets(),
        _ => panic!("IPv4 backend"),
    }
}

#[test]
fn a_full_backend_takes_no_new_flow_and_a_listener_of_full_backends_drops_them() {
    in_fresh_netns(|| {
        let h = testbed(&with_load_listener(
            &[
                r#"{ address = "10.20.0.2", port = 8085, max_connections = 2 }"#,
                r#"{ address = "10.20.0.3", port = 8085, max_connections = 3 }"#,
            ],
            "",
        ));
        let mut served = Vec::new();
        for port in 44000..44006 {
            served.push((port, open_flow(&h, port, 85)));
        }
        let counts = open_by_backend(&h, "lc");
        assert_eq!((counts[&BACKEND_A], counts[&BACKEND_B]), (2, 3));
        assert_eq!(served[5].1, None, "{served:?}");
        assert_eq!(h.counters().backends_full_dropped, 1);
        let stats = listener_counters(&h, "lc");
        assert_eq!(stats.at_capacity, 1, "{stats:?}");

        // One of A's flows ends: A has room for one more, whatever the ring says.
        let (port_on_a, _) = served
            .iter()
            .find(|(_, b)| *b == Some(BACKEND_A))
            .copied()
            .unwrap();
        close_flow(&h, port_on_a, 85, TCP_FLAG_FIN | ACK);
        assert_eq!(open_flow(&h, 44100, 85), Some(BACKEND_A));
        assert_eq!(open_flow(&h, 44101, 85), None);
        assert_eq!(h.counters().backends_full_dropped, 2);
    });
}
