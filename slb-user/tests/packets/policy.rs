//! Listener admission through BPF_PROG_TEST_RUN: access lists at their prefixes' edges (IPv4
//! and IPv6), what a changed list does to established flows, and the limit on new flows.

use std::net::Ipv6Addr;
use std::time::Instant;

use slb_common::wire::ipv6_frame;
use slb_common::TCP_FLAG_FIN;

use super::*;

const VIP6: [u8; 16] = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10).octets();

/// `config(1, 1)` with its `web` listener (:80) given `acl`, and an IPv6 listener `web6` with
/// `acl6`, both TOML inline tables (or empty for none).
fn with_acls(acl: &str, acl6: &str) -> Config {
    let mut text = config(1, 1);
    if !acl.is_empty() {
        text = text.replacen(
            "port = 80\ngroup = \"pool\"\n",
            &format!("port = 80\ngroup = \"pool\"\nacl = {acl}\n"),
            1,
        );
    }
    text.push_str(
        "[[listeners]]\nname = \"web6\"\nprotocol = \"tcp\"\nvip = \"fd00:99::10\"\nport = 80\ngroup = \"pool6\"\n",
    );
    if !acl6.is_empty() {
        text.push_str(&format!("acl = {acl6}\n"));
    }
    text.push_str(
        "[[groups]]\nname = \"pool6\"\nbackends = [{ address = \"fd00:20::2\", port = 8080 }]\n",
    );
    Config::parse(&text, "test").expect("config")
}

/// The verdict on a SYN from `src` to the IPv4 VIP's port 80.
fn syn_from(h: &Testbed, src: [u8; 4], port: u16) -> u32 {
    h.run(&frame(h.in_mac, src, VIP, tcp(port, 80, SYN)), h.in_index)
        .0
}

fn syn6_from(h: &Testbed, src: &str, port: u16) -> u32 {
    let src: Ipv6Addr = src.parse().expect("IPv6 address");
    let sent = ipv6_frame(h.in_mac, CLIENT_MAC, src.octets(), VIP6, tcp(port, 80, SYN));
    h.run(&sent, h.in_index).0
}

#[test]
fn an_allow_list_admits_exactly_its_prefixes_in_both_families() {
    in_fresh_netns(|| {
        let h = testbed(&with_acls(
            r#"{ mode = "allow", cidrs = ["10.10.0.0/24", "10.30.0.7", "172.16.0.0/12"] }"#,
            r#"{ mode = "allow", cidrs = ["fd00:10::/64", "fd00:11::5"] }"#,
        ));
        let v4 = [
            ([10, 10, 0, 0], XDP_REDIRECT),
            ([10, 10, 0, 255], XDP_REDIRECT),
            ([10, 9, 255, 255], XDP_DROP),
            ([10, 10, 1, 0], XDP_DROP),
            ([10, 30, 0, 7], XDP_REDIRECT),
            ([10, 30, 0, 6], XDP_DROP),
            ([10, 30, 0, 8], XDP_DROP),
            ([172, 16, 0, 0], XDP_REDIRECT),
            ([172, 31, 255, 255], XDP_REDIRECT),
            ([172, 32, 0, 0], XDP_DROP),
            ([172, 15, 255, 255], XDP_DROP),
        ];
        for (i, (src, expected)) in v4.iter().enumerate() {
            assert_eq!(
                syn_from(&h, *src, 42000 + i as u16),
                *expected,
                "{} (XDP_DROP = {XDP_DROP})",
                ipv4(*src)
            );
        }
        let v6 = [
            ("fd00:10::", XDP_REDIRECT),
            ("fd00:10::ffff:ffff:ffff:ffff", XDP_REDIRECT),
            ("fd00:10:0:1::", XDP_DROP),
            ("fd00:f:ffff:ffff:ffff:ffff:ffff:ffff", XDP_DROP),
            ("fd00:11::5", XDP_REDIRECT),
            ("fd00:11::4", XDP_DROP),
            ("fd00:11::6", XDP_DROP),
        ];
        for (i, (src, expected)) in v6.iter().enumerate() {
            assert_eq!(syn6_from(&h, src, 43000 + i as u16), *expected, "{src}");
        }
        assert_eq!(listener_counters(&h, "web").acl_dropped, 6);
        assert_eq!(listener_counters(&h, "web6").acl_dropped, 4);
        let c = h.counters();
        assert_eq!(c.acl_dropped, 10);
        // Refused before any state: only the 8 admitted SYNs took a half-open slot.
        assert_eq!(c.half_open_tracked, 8, "{c:?}");
        // Another listener on the VIP has no list: it takes every client.
        let other = h.run(
            &frame(h.in_mac, [10, 9, 255, 255], VIP, udp(44000, 53)),
            h.in_index,
        );
        assert_eq!(other.0, XDP_REDIRECT);
    });
}

#[test]
fn a_deny_list_keeps_or_cuts_the_established_flows_it_comes_to_refuse() {
    in_fresh_netns(|| {
        let mut h = testbed(&with_acls("", ""));
        let denied = [10, 10, 7, 1];
        let in_mac = h.in_mac;
        let established = |h: &Testbed, port: u16| {
            h.run(&frame(in_mac, denied, VIP, tcp(port, 80, SYN)), h.in_index);
            h.run(&frame(in_mac, denied, VIP, tcp(port, 80, ACK)), h.in_index)
                .0
        };
        assert_eq!(established(&h, 45000), XDP_REDIRECT);
        // Between its SYN and its first ACK: established too.
        assert_eq!(syn_from(&h, denied, 45001), XDP_REDIRECT);

        let deny = |established: &str| {
            with_acls(
                &format!(
                    r#"{{ mode = "deny", cidrs = ["10.10.7.0/24"], established = "{established}" }}"#
                ),
                "",
            )
        };
        h.reconciler
            .apply(&deny("keep"), &Default::default())
            .unwrap();
        let ack = |h: &Testbed, port: u16| {
            h.run(&frame(in_mac, denied, VIP, tcp(port, 80, ACK)), h.in_index)
                .0
        };
        assert_eq!(ack(&h, 45000), XDP_REDIRECT, "established flow kept");
        assert_eq!(ack(&h, 45001), XDP_REDIRECT, "half-open flow kept");
        assert_eq!(syn_from(&h, denied, 45002), XDP_DROP, "new flow refused");
        assert_eq!(ack(&h, 45003), XDP_DROP, "a flow it never saw is new");
        assert_eq!(
            syn_from(&h, [10, 10, 8, 1], 45004),
            XDP_REDIRECT,
            "not listed"
        );
        assert_eq!(listener_counters(&h, "web").acl_dropped, 2);
        // A kept flow closes; a SYN reusing its port opens a new flow, which is refused.
        let fin = h.run(
            &frame(in_mac, denied, VIP, tcp(45001, 80, TCP_FLAG_FIN | ACK)),
            h.in_index,
        );
        assert_eq!(fin.0, XDP_REDIRECT, "the kept flow's close goes through");
        assert_eq!(
            syn_from(&h, denied, 45001),
            XDP_DROP,
            "its port reused: a new flow"
        );
        assert_eq!(listener_counters(&h, "web").acl_dropped, 3);

        // The same list, now cutting: only the flags change, and the flows go.
        h.reconciler
            .apply(&deny("cut"), &Default::default())
            .unwrap();
        assert_eq!(ack(&h, 45000), XDP_DROP, "established flow cut");
        assert_eq!(ack(&h, 45001), XDP_DROP);
        assert_eq!(listener_counters(&h, "web").acl_dropped, 5);

        // The list removed: every client again, the cut flows too.
        h.reconciler
            .apply(&with_acls("", ""), &Default::default())
            .unwrap();
        assert_eq!(ack(&h, 45000), XDP_REDIRECT);
        assert_eq!(syn_from(&h, denied, 45005), XDP_REDIRECT);
        let maps = h.reconciler.maps();
        assert_eq!(maps.acl.keys().count(), 0, "no entry of the list is left");
    });
}

#[test]
fn a_changed_list_is_switched_to_whole_and_leaves_nothing_behind() {
    in_fresh_netns(|| {
        let mut h = testbed(&with_acls(
            r#"{ mode = "allow", cidrs = ["10.10.0.0/24"] }"#,
            "",
        ));
        // Thousands of prefixes: every /32 of 10.40.0.0/20 but one, and the list swapped in.
        let many: Vec<String> = (0..4096u32)
            .filter(|i| *i != 77)
            .map(|i| format!("\"10.40.{}.{}\"", i / 256, i % 256))
            .collect();
        let big = with_acls(
            &format!(r#"{{ mode = "allow", cidrs = [{}] }}"#, many.join(", ")),
            "",
        );
        h.reconciler.apply(&big, &Default::default()).unwrap();
        assert_eq!(
            h.reconciler.maps().acl.keys().count(),
            4095,
            "the old set is gone"
        );
        assert_eq!(
            syn_from(&h, [10, 10, 0, 1], 46000),
            XDP_DROP,
            "old list gone"
        );
        assert_eq!(syn_from(&h, [10, 40, 15, 255], 46001), XDP_REDIRECT);
        assert_eq!(
            syn_from(&h, [10, 40, 0, 77], 46002),
            XDP_DROP,
            "the one left out"
        );
        assert_eq!(syn_from(&h, [10, 40, 16, 0], 46003), XDP_DROP);
        // Reapplied unchanged: nothing is rewritten (the set in use stays).
        let set = h.reconciler.state().listeners[0].acl.clone();
        h.reconciler.apply(&big, &Default::default()).unwrap();
        assert_eq!(h.reconciler.state().listeners[0].acl, set);

        // A state that lags the maps (an apply that failed after the switch, a crash before
        // the state was written): applying the list the state records again must not trust
        // it, since the set the state names was emptied by the switch.
        let stale = h.reconciler.state().clone();
        let small = with_acls(r#"{ mode = "allow", cidrs = ["10.10.0.0/24"] }"#, "");
        h.reconciler.apply(&small, &Default::default()).unwrap();
        assert_eq!(syn_from(&h, [10, 10, 0, 1], 46004), XDP_REDIRECT);
        h.reconciler.adopt(stale);
        h.reconciler.apply(&big, &Default::default()).unwrap();
        assert_eq!(h.reconciler.maps().acl.keys().count(), 4095);
        assert_eq!(syn_from(&h, [10, 40, 15, 255], 46005), XDP_REDIRECT);
        assert_eq!(syn_from(&h, [10, 10, 0, 1], 46006), XDP_DROP);
    });
}

#[test]
fn a_renamed_listener_keeps_its_list_in_force_through_the_rename() {
    in_fresh_netns(|| {
        let deny = r#"{ mode = "deny", cidrs = ["10.10.7.0/24"] }"#;
        let mut h = testbed(&with_acls(deny, ""));
        let renamed = with_acls(deny, "");
        let mut renamed = renamed;
        renamed.listeners[0].name = "www".into();
        h.reconciler.apply(&renamed, &Default::default()).unwrap();
        assert_eq!(syn_from(&h, [10, 10, 7, 1], 49000), XDP_DROP);
        assert_eq!(syn_from(&h, [10, 10, 8, 1], 49001), XDP_REDIRECT);
        assert_eq!(
            h.reconciler.maps().acl.keys().count(),
            1,
            "the old set is emptied"
        );
        assert_eq!(listener_counters(&h, "www").acl_dropped, 1);
    });
}

#[test]
fn new_flows_over_the_limit_are_dropped_and_known_flows_are_not() {
    in_fresh_netns(|| {
        let mut text = config(1, 1);
        text = text.replacen(
            "port = 80\ngroup = \"pool\"\n",
            "port = 80\ngroup = \"pool\"\nmax_new_connections_per_second = 1\nnew_connections_burst = 5\n",
            1,
        );
        text = text.replacen(
            "port = 53\ngroup = \"pool\"\n",
            "port = 53\ngroup = \"pool\"\nmax_new_connections_per_second = 1\nnew_connections_burst = 3\n",
            1,
        );
        let h = testbed(&Config::parse(&text, "test").unwrap());
        let started = Instant::now();
        let syns: Vec<u32> = (0..50).map(|i| syn_from(&h, CLIENT, 47000 + i)).collect();
        let datagrams: Vec<u32> = (0..50)
            .map(|i| {
                h.run(
                    &frame(h.in_mac, CLIENT, VIP, udp(48000 + i, 53)),
                    h.in_index,
                )
                .0
            })
            .collect();
        // One new flow a second on top of the burst: however slowly this ran, no more.
        let extra = started.elapsed().as_secs() as usize + 1;
        let admitted = |verdicts: &[u32]| verdicts.iter().filter(|v| **v == XDP_REDIRECT).count();
        let (tcp_in, udp_in) = (admitted(&syns), admitted(&datagrams));
        assert!((5..=5 + extra).contains(&tcp_in), "{tcp_in} SYNs admitted");
        assert!(
            (3..=3 + extra).contains(&udp_in),
            "{udp_in} datagrams admitted"
        );
        assert_eq!(&syns[..5], &[XDP_REDIRECT; 5], "the burst goes first");
        assert_eq!(
            listener_counters(&h, "web").rate_limited,
            (50 - tcp_in) as u64
        );
        assert_eq!(
            listener_counters(&h, "dns").rate_limited,
            (50 - udp_in) as u64
        );
        assert_eq!(
            h.counters().new_flows_rate_limited,
            (100 - tcp_in - udp_in) as u64
        );

        // Admitted flows go on: a retransmitted SYN, the handshake's ACK, more datagrams.
        assert_eq!(syn_from(&h, CLIENT, 47000), XDP_REDIRECT);
        let ack = h.run(
            &frame(h.in_mac, CLIENT, VIP, tcp(47000, 80, ACK)),
            h.in_index,
        );
        assert_eq!(ack.0, XDP_REDIRECT);
        let again = h.run(&frame(h.in_mac, CLIENT, VIP, udp(48000, 53)), h.in_index);
        assert_eq!(again.0, XDP_REDIRECT);
        // A flow this node never saw, past its SYN (another node's, moved here): not new.
        let moved = h.run(
            &frame(h.in_mac, CLIENT, VIP, tcp(47999, 80, ACK)),
            h.in_index,
        );
        assert_eq!(moved.0, XDP_REDIRECT);
        // A high rate is held by the fine clock, not by the coarse one's ticks: 10000 a
        // second with no burst admits every SYN 200 µs after the one before.
        let fast = config(1, 1).replacen(
            "port = 84\ngroup = \"strict\"\n",
            "port = 84\ngroup = \"strict\"\nmax_new_connections_per_second = 10000\nnew_connections_burst = 1\n",
            1,
        );
        let mut h = h;
        h.reconciler
            .apply(&Config::parse(&fast, "test").unwrap(), &Default::default())
            .unwrap();
        let spaced = (0..20)
            .filter(|i| {
                std::thread::sleep(std::time::Duration::from_micros(200));
                let syn = frame(h.in_mac, CLIENT, VIP, tcp(50000 + i, 84, SYN));
                h.run(&syn, h.in_index).0 == XDP_REDIRECT
            })
            .count();
        assert_eq!(spaced, 20);
        // Other listeners have no limit.
        assert_eq!(
            h.run(
                &frame(h.in_mac, CLIENT, VIP, tcp(47998, 82, SYN)),
                h.in_index
            )
            .0,
            XDP_REDIRECT
        );
    });
}
