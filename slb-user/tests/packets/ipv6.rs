//! The IPv6 program (`slb_xdp6`, reached from `slb_xdp` through PROGRAMS) through
//! BPF_PROG_TEST_RUN: the IPv4 cases' twins, and what IPv6 does differently (no header
//! checksum, hop limit, UDP checksum mandatory, extension headers, Packet Too Big).

use std::net::Ipv6Addr;

use slb_common::wire::{
    echo_request, icmpv6_error, ipv6_frame, ipv6_frame_with, ipv6_udp_fragments,
    neighbour_advertisement, neighbour_solicitation, parse_icmpv6_error, parse_ipv6_frame,
    parse_ipv6_udp_fragments, router_advertisement, router_solicitation, Ipv6FrameOptions,
    ParsedFrame6, ICMPV6_DEST_UNREACHABLE, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED,
    NEXTHDR_DEST_OPTS, NEXTHDR_HOP_BY_HOP, NEXTHDR_ROUTING,
};

use super::*;

const CLIENT6: [u8; 16] = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2).octets();
const VIP6: [u8; 16] = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10).octets();
const BACKEND6_A: [u8; 16] = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 2).octets();
const BACKEND6_B: [u8; 16] = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 3).octets();

fn addr(text: &str) -> [u8; 16] {
    text.parse::<Ipv6Addr>().expect("an IPv6 address").octets()
}

/// A dual-stack config: the IPv4 listeners of `config` and IPv6 twins (VIP fd00:99::10,
/// backends fd00:20::2 and ::3), one of them persistent per /64.
fn config6(weight_a: u32, weight_b: u32) -> String {
    format!(
        r#"{}
[[listeners]]
name = "web6"
protocol = "tcp"
vip = "fd00:99::10"
port = 80
group = "pool6"
[[listeners]]
name = "dns6"
protocol = "udp"
vip = "fd00:99::10"
port = 53
group = "pool6"
[[listeners]]
name = "sticky6"
protocol = "tcp"
vip = "fd00:99::10"
port = 82
group = "sticky6"
persistence = {{ timeout = "60s", ipv6_prefix = 64 }}
[[listeners]]
name = "loose6"
protocol = "tcp"
vip = "fd00:99::10"
port = 85
group = "loose6"
persistence = {{ timeout = "60s" }}
[[groups]]
name = "pool6"
backends = [{{ address = "fd00:20::2", port = 8080, weight = {weight_a} }}, {{ address = "fd00:20::3", port = 8080, weight = {weight_b} }}]
[[groups]]
name = "sticky6"
backends = [{{ address = "fd00:20::2", port = 8082 }}, {{ address = "fd00:20::3", port = 8082 }}]
[[groups]]
name = "loose6"
backends = [{{ address = "fd00:20::2", port = 8085 }}, {{ address = "fd00:20::3", port = 8085 }}]
"#,
        config(1, 1)
    )
}

fn harness6() -> Testbed {
    Testbed::new(&config6(1, 1), RING_SIZE).expect("testbed")
}

/// A frame from the client's MAC.
fn frame6(dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16], l4: L4Spec) -> Vec<u8> {
    ipv6_frame(dst_mac, CLIENT_MAC, src, dst, l4)
}

/// Parses a frame, asserting its L4 checksum is valid.
fn parse_valid6(f: &[u8]) -> ParsedFrame6 {
    parse_ipv6_frame(f).unwrap_or_else(|e| panic!("{e}: {f:02x?}"))
}

/// SYN then ACK from the client's `port` to the VIP's `vip_port`: the flow enters the
/// connection table; returns the backend the ACK went to.
fn establish6(h: &Testbed, port: u16, vip_port: u16) -> [u8; 16] {
    let in_mac = mac_of("in0");
    h.run(
        &frame6(in_mac, CLIENT6, VIP6, tcp(port, vip_port, SYN)),
        h.in_index,
    );
    let (_, out) = h.run(
        &frame6(in_mac, CLIENT6, VIP6, tcp(port, vip_port, ACK)),
        h.in_index,
    );
    parse_valid6(&out).dst
}

#[test]
fn ipv6_tcp_flow_is_rewritten_to_a_backend_with_its_hop_limit_and_checksum() {
    in_fresh_netns(|| {
        let h = harness6();
        let sent = frame6(mac_of("in0"), CLIENT6, VIP6, tcp(40000, 80, SYN));
        let (verdict, out) = h.run(&sent, h.in_index);
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        let p = parse_valid6(&out);
        assert!(p.dst == BACKEND6_A || p.dst == BACKEND6_B, "{p:?}");
        assert_eq!((p.src, p.src_port, p.dst_port), (CLIENT6, 40000, 8080));
        assert_eq!(p.hop_limit, parse_valid6(&sent).hop_limit - 1);
        assert_eq!(p.dst_mac, BACKEND_MAC, "the backend's neighbour entry");
        assert_eq!(p.src_mac, h.out_mac);
        let c = h.counters();
        assert_eq!(
            (c.ipv6_passed, c.half_open_tracked, c.redirected),
            (0, 1, 1),
            "{c:?}"
        );
    });
}

#[test]
fn ipv6_known_flow_keeps_its_backend_after_the_ring_changes_and_replies_are_translated() {
    in_fresh_netns(|| {
        let mut h = harness6();
        let backend = establish6(&h, 40001, 80);
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), 1);
        // All new flows to the other backend now; the known one stays.
        let (a, b) = if backend == BACKEND6_A {
            (0, 1)
        } else {
            (1, 0)
        };
        h.reconciler
            .apply(
                &Config::parse(&config6(a, b), "test").unwrap(),
                &Default::default(),
            )
            .unwrap();
        let in_mac = mac_of("in0");
        let (_, out) = h.run(
            &frame6(in_mac, CLIENT6, VIP6, tcp(40001, 80, ACK)),
            h.in_index,
        );
        assert_eq!(parse_valid6(&out).dst, backend);
        for port in 41000..41020 {
            let (_, out) = h.run(
                &frame6(in_mac, CLIENT6, VIP6, tcp(port, 80, SYN)),
                h.in_index,
            );
            assert_ne!(
                parse_valid6(&out).dst,
                backend,
                "new flows avoid the drained backend"
            );
        }

        // The reply: source back to the VIP:80, towards the client's neighbour.
        let reply = ipv6_frame(
            h.out_mac,
            BACKEND_MAC,
            backend,
            CLIENT6,
            tcp(8080, 40001, ACK),
        );
        let (verdict, out) = h.run(&reply, h.out_index);
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        let p = parse_valid6(&out);
        assert_eq!(
            (p.src, p.src_port, p.dst, p.dst_port),
            (VIP6, 80, CLIENT6, 40001)
        );
        assert_eq!(p.dst_mac, CLIENT_MAC);
        assert_eq!(h.counters().replies_translated, 1);
    });
}

#[test]
fn ipv6_udp_is_balanced_and_a_zero_checksum_is_dropped_without_state() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let mut seen = std::collections::BTreeSet::new();
        for port in 50000..50040 {
            let (verdict, out) = h.run(&frame6(in_mac, CLIENT6, VIP6, udp(port, 53)), h.in_index);
            assert_eq!(verdict, XDP_REDIRECT);
            let p = parse_valid6(&out);
            assert_eq!(p.dst_port, 8080);
            seen.insert(p.dst);
        }
        assert_eq!(seen.len(), 2, "40 flows over two equal backends use both");
        let entries = flow_entries(&h, "CONNECTIONS").len();

        let mut zero = udp(51000, 53);
        zero.zero_udp_checksum = true;
        let (verdict, _) = h.run(&frame6(in_mac, CLIENT6, VIP6, zero), h.in_index);
        assert_eq!(verdict, XDP_DROP, "UDP over IPv6 must carry a checksum");
        assert_eq!(h.counters().malformed, 1);
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), entries);
    });
}

#[test]
fn ipv6_traffic_that_is_not_for_a_listener_passes_untouched_and_is_counted() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let other = addr("fd00:99::11");
        let router = addr("fe80::1");
        let with_header = |next: u8| {
            ipv6_frame_with(
                in_mac,
                CLIENT_MAC,
                CLIENT6,
                VIP6,
                tcp(40002, 80, SYN),
                &Ipv6FrameOptions {
                    extension_header: Some(next),
                    ..Ipv6FrameOptions::default()
                },
            )
        };
        let mut hop_limit_one = frame6(in_mac, CLIENT6, VIP6, tcp(40003, 80, SYN));
        hop_limit_one[21] = 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "another port",
                frame6(in_mac, CLIENT6, VIP6, tcp(40004, 8080, SYN)),
            ),
            (
                "another address",
                frame6(in_mac, CLIENT6, other, tcp(40005, 80, SYN)),
            ),
            (
                "neighbour solicitation",
                neighbour_solicitation(CLIENT_MAC, CLIENT6, VIP6),
            ),
            (
                "neighbour advertisement",
                neighbour_advertisement(in_mac, CLIENT_MAC, CLIENT6, VIP6, CLIENT6),
            ),
            (
                "router solicitation",
                router_solicitation(CLIENT_MAC, CLIENT6),
            ),
            (
                "router advertisement",
                router_advertisement(CLIENT_MAC, router),
            ),
            (
                "echo request",
                echo_request(in_mac, CLIENT_MAC, CLIENT6, VIP6, (7, 1)),
            ),
            (
                "hop-by-hop options to the VIP",
                with_header(NEXTHDR_HOP_BY_HOP),
            ),
            ("routing header to the VIP", with_header(NEXTHDR_ROUTING)),
            (
                "destination options to the VIP",
                with_header(NEXTHDR_DEST_OPTS),
            ),
            ("hop limit 1 to the VIP", hop_limit_one),
        ];
        for (case, f) in &cases {
            let (verdict, out) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_PASS, "{case}");
            assert_eq!(&out, f, "{case}: passed byte for byte");
        }
        let c = h.counters();
        assert_eq!(c.ipv6_extension_headers_passed, 3, "{c:?}");
        assert_eq!(c.ttl_expired_passed, 1, "{c:?}");
        assert_eq!(c.not_for_us_passed, cases.len() as u64 - 4, "{c:?}");
        assert_eq!((c.ipv6_passed, c.malformed), (0, 0), "{c:?}");
        assert!(flow_entries(&h, "CONNECTIONS").is_empty());
        assert!(half_open_flows(&h).is_empty());
    });
}

#[test]
fn malformed_ipv6_frames_are_dropped_counted_and_create_no_state() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        type Mutation = fn(&mut Vec<u8>);
        // (class, listener port, protocol is TCP, how to break a valid frame)
        let classes: [(&str, u16, bool, Mutation); 7] = [
            ("payload length past the frame", 80, true, |f| {
                let len = u16::from_be_bytes([f[18], f[19]]) + 8;
                f[18..20].copy_from_slice(&len.to_be_bytes());
            }),
            ("version 4 in an IPv6 frame", 80, true, |f| f[14] = 0x40),
            ("multicast source", 80, true, |f| f[22] = 0xff),
            ("TCP data offset below 5", 80, true, |f| f[66] = 0x40),
            ("TCP data offset past the packet", 80, true, |f| {
                f[66] = 0xf0
            }),
            ("SYN with FIN", 80, true, |f| f[67] = 0x03),
            ("UDP length past the packet", 53, false, |f| {
                f[58..60].copy_from_slice(&300u16.to_be_bytes())
            }),
        ];
        let mut sent = 0;
        for (k, (class, port, is_tcp, mutate)) in classes.iter().enumerate() {
            for v in 0..10u16 {
                let src_port = 20000 + k as u16 * 100 + v;
                let l4 = if *is_tcp {
                    tcp(src_port, *port, SYN)
                } else {
                    udp(src_port, *port)
                };
                let mut f = frame6(in_mac, CLIENT6, VIP6, l4);
                mutate(&mut f);
                assert_eq!(h.run(&f, h.in_index).0, XDP_DROP, "{class} ({v})");
                sent += 1;
            }
        }
        // Cut short: inside the IPv6 header, and inside the TCP header.
        let whole = frame6(in_mac, CLIENT6, VIP6, tcp(21000, 80, SYN));
        for len in [20, 53, 60, 70] {
            assert_eq!(h.run(&whole[..len], h.in_index).0, XDP_DROP, "{len} bytes");
            sent += 1;
        }
        let c = h.counters();
        assert_eq!(c.malformed, sent, "{c:?}");
        assert_eq!(
            (c.redirected, c.tx, c.half_open_tracked),
            (0, 0, 0),
            "{c:?}"
        );
        assert!(flow_entries(&h, "CONNECTIONS").is_empty());
        assert!(half_open_flows(&h).is_empty());
        // Unbroken, the same frame is balanced.
        assert_eq!(h.run(&whole, h.in_index).0, XDP_REDIRECT);
    });
}

#[test]
fn random_and_truncated_ipv6_frames_only_ever_pass_or_drop() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let base = frame6(in_mac, CLIENT6, VIP6, tcp(22000, 80, SYN));
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..2000 {
            let mut f = base.clone();
            // Random bytes over the IPv6 and TCP headers (the addresses and the VIP's port stay
            // mostly, so many frames still reach the listener lookups), then a random cut.
            for _ in 0..4 {
                let at = 14 + (next() % (f.len() as u64 - 14)) as usize;
                f[at] = next() as u8;
            }
            f.truncate(14 + (next() % (f.len() as u64 - 13)) as usize);
            let (verdict, _) = h.run(&f, h.in_index);
            assert!(
                [XDP_PASS, XDP_DROP, XDP_REDIRECT].contains(&verdict),
                "frame {i}: verdict {verdict}"
            );
            if verdict == XDP_REDIRECT {
                // Only a frame that still parses as a valid one to the VIP may be forwarded.
                assert!(
                    f.len() >= 74,
                    "frame {i} forwarded although cut to {}",
                    f.len()
                );
            }
        }
    });
}

#[test]
fn ipv6_persistence_keys_clients_by_their_prefix_when_configured() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        // Twenty hosts of one /64 (as rotating privacy addresses would be): one backend for all
        // on the /64 listener; spread over both on the /128 one.
        let host = |i: u16| {
            let mut a = addr("fd00:10::1:0:0:0");
            a[14..16].copy_from_slice(&i.to_be_bytes());
            a
        };
        let backends = |port: u16| -> std::collections::BTreeSet<[u8; 16]> {
            (1..=20u16)
                .map(|i| {
                    let f = frame6(in_mac, host(i), VIP6, tcp(30000 + i, port, SYN));
                    let (verdict, out) = h.run(&f, h.in_index);
                    assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
                    parse_valid6(&out).dst
                })
                .collect()
        };
        assert_eq!(backends(82).len(), 1, "one /64: one backend");
        assert_eq!(backends(85).len(), 2, "per address: both backends");
        assert!(h.counters().persistence_hits >= 19, "{:?}", h.counters());
    });
}

#[test]
fn an_ipv6_packet_too_big_for_the_backend_side_gets_packet_too_big_quoting_the_vip() {
    in_fresh_netns(|| {
        let h = harness6();
        set_mtu("out0", 1280);
        let in_mac = mac_of("in0");
        let payload = vec![0u8; 1300];
        let big = ipv6_frame_with(
            in_mac,
            CLIENT_MAC,
            CLIENT6,
            VIP6,
            tcp(40010, 80, ACK),
            &Ipv6FrameOptions {
                payload: &payload,
                ..Ipv6FrameOptions::default()
            },
        );
        let (verdict, out) = h.run(&big, h.in_index);
        assert_eq!(verdict, XDP_TX, "{:?}", h.counters());
        let e = parse_icmpv6_error(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
        assert_eq!((e.kind, e.code, e.mtu), (ICMPV6_PACKET_TOO_BIG, 0, 1280));
        assert_eq!(
            (e.src, e.dst),
            (VIP6, CLIENT6),
            "from the VIP to the client"
        );
        assert_eq!(
            (e.inner_src, e.inner_dst, e.inner_ports),
            (CLIENT6, VIP6, (40010, 80)),
            "quoting the packet as the client sent it"
        );
        assert_eq!(&out[0..6], &CLIENT_MAC, "back to the client's MAC");
        assert_eq!(h.counters().icmp_too_big_sent, 1);
        // A packet that fits is balanced as usual.
        let small = frame6(in_mac, CLIENT6, VIP6, tcp(40011, 80, SYN));
        assert_eq!(h.run(&small, h.in_index).0, XDP_REDIRECT);
    });
}

#[test]
fn ipv4_and_ipv6_listeners_of_one_config_do_not_interfere() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40020, 80, SYN)), h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
        let v4 = parse_valid(&out);
        assert!(v4.dst == BACKEND_A || v4.dst == BACKEND_B);
        let (verdict, out) = h.run(
            &frame6(in_mac, CLIENT6, VIP6, tcp(40020, 80, SYN)),
            h.in_index,
        );
        assert_eq!(verdict, XDP_REDIRECT);
        let v6 = parse_valid6(&out);
        assert!(v6.dst == BACKEND6_A || v6.dst == BACKEND6_B);
        // The IPv6 VIP on an IPv4 listener's port number with IPv4's address is no listener.
        let (verdict, _) = h.run(
            &frame(in_mac, CLIENT, [10, 99, 0, 11], tcp(40021, 80, SYN)),
            h.in_index,
        );
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(h.counters().half_open_tracked, 2);
    });
}

#[test]
fn an_ipv6_reply_too_big_for_the_client_side_gets_packet_too_big_quoting_the_backend() {
    in_fresh_netns(|| {
        let h = harness6();
        let backend = establish6(&h, 40030, 80);
        set_mtu("in0", 1280);
        let payload = vec![0u8; 1300];
        let big = ipv6_frame_with(
            h.out_mac,
            BACKEND_MAC,
            backend,
            CLIENT6,
            tcp(8080, 40030, ACK),
            &Ipv6FrameOptions {
                payload: &payload,
                ..Ipv6FrameOptions::default()
            },
        );
        let (verdict, out) = h.run(&big, h.out_index);
        assert_eq!(verdict, XDP_TX, "{:?}", h.counters());
        let e = parse_icmpv6_error(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
        assert_eq!((e.kind, e.mtu), (ICMPV6_PACKET_TOO_BIG, 1280));
        assert_eq!(
            (e.src, e.dst),
            (CLIENT6, backend),
            "to the backend, from the client"
        );
        assert_eq!(
            (e.inner_src, e.inner_dst, e.inner_ports),
            (backend, CLIENT6, (8080, 40030)),
            "quoting the reply as the backend sent it"
        );
        assert_eq!(h.counters().replies_translated, 0);
    });
}

#[test]
fn icmpv6_errors_about_balanced_flows_are_translated_both_ways() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let tcp_backend = establish6(&h, 40040, 80);
        let (_, out) = h.run(&frame6(in_mac, CLIENT6, VIP6, udp(40041, 53)), h.in_index);
        let udp_backend = parse_valid6(&out).dst;

        // A router on the client's side cannot pass the VIP's replies.
        let router = addr("fd00:10::fe");
        for (about, backend, ports) in [
            (tcp(80, 40040, ACK), tcp_backend, (8080, 40040)),
            (udp(53, 40041), udp_backend, (8080, 40041)),
        ] {
            let reply = ipv6_frame(h.out_mac, BACKEND_MAC, VIP6, CLIENT6, about);
            let err = icmpv6_error(
                in_mac,
                CLIENT_MAC,
                router,
                VIP6,
                (ICMPV6_PACKET_TOO_BIG, 0, 1280),
                &reply[14..],
            );
            let (verdict, out) = h.run(&err, h.in_index);
            assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
            assert_eq!(&out[0..6], &BACKEND_MAC[..]);
            let seen = parse_icmpv6_error(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
            assert_eq!(
                (
                    seen.src,
                    seen.dst,
                    seen.inner_src,
                    seen.inner_dst,
                    seen.inner_ports,
                    seen.mtu
                ),
                (router, backend, backend, CLIENT6, ports, 1280),
                "to the backend, about its own packet"
            );
            assert_eq!(seen.hop_limit, 63);
        }
        // The quoted UDP checksum was updated with the address and port.
        let reply = ipv6_frame(h.out_mac, BACKEND_MAC, VIP6, CLIENT6, udp(53, 40041));
        let err = icmpv6_error(
            in_mac,
            CLIENT_MAC,
            router,
            VIP6,
            (ICMPV6_TIME_EXCEEDED, 0, 0),
            &reply[14..],
        );
        let (_, out) = h.run(&err, h.in_index);
        let direct = ipv6_frame(
            h.out_mac,
            BACKEND_MAC,
            udp_backend,
            CLIENT6,
            udp(8080, 40041),
        );
        assert_eq!(
            &out[102..110],
            &direct[54..62],
            "quoted UDP header as the backend sent it"
        );

        // A router on the backends' side cannot pass a packet to the backend.
        let router = addr("fd00:20::fe");
        let to_backend = ipv6_frame(h.out_mac, CLIENT_MAC, CLIENT6, BACKEND6_A, udp(40042, 8080));
        let err = icmpv6_error(
            h.out_mac,
            BACKEND_MAC,
            router,
            CLIENT6,
            (ICMPV6_DEST_UNREACHABLE, 4, 0),
            &to_backend[14..],
        );
        let (verdict, out) = h.run(&err, h.out_index);
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        assert_eq!(&out[0..6], &CLIENT_MAC[..]);
        let seen = parse_icmpv6_error(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
        assert_eq!(
            (
                seen.src,
                seen.dst,
                seen.inner_src,
                seen.inner_dst,
                seen.inner_ports
            ),
            (router, CLIENT6, CLIENT6, VIP6, (40042, 53)),
            "to the client, about the packet it sent to the VIP"
        );

        // About a flow nobody knows: passed untouched.
        let stranger = ipv6_frame(
            h.out_mac,
            BACKEND_MAC,
            VIP6,
            addr("fd00:10::77"),
            tcp(80, 1234, ACK),
        );
        let err = icmpv6_error(
            in_mac,
            CLIENT_MAC,
            addr("fd00:10::fe"),
            VIP6,
            (ICMPV6_PACKET_TOO_BIG, 0, 1280),
            &stranger[14..],
        );
        let (verdict, out) = h.run(&err, h.in_index);
        assert_eq!((verdict, &out), (XDP_PASS, &err));
        let c = h.counters();
        assert_eq!(
            (c.icmp_errors_translated, c.icmp_errors_unmatched),
            (4, 1),
            "{c:?}"
        );
    });
}

#[test]
fn fragmented_ipv6_udp_is_balanced_and_its_fragmented_replies_translated() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let request = ipv6_udp_fragments(
            in_mac,
            CLIENT_MAC,
            (CLIENT6, 41000),
            (VIP6, 53),
            3000,
            7,
            1500,
        );
        assert_eq!(request.len(), 3);
        let mut out = Vec::new();
        for f in &request {
            let (verdict, o) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
            assert_eq!(o[..6], BACKEND_MAC, "sent to the backend's MAC");
            out.push(o);
        }
        let p = parse_ipv6_udp_fragments(&out).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.dst == BACKEND6_A || p.dst == BACKEND6_B, "{p:?}");
        assert_eq!(
            (p.src, p.src_port, p.dst_port, p.hop_limit),
            (CLIENT6, 41000, 8080, 63)
        );

        // The backend's answer, fragmented too, leaves as VIP:53 in every fragment.
        let reply = ipv6_udp_fragments(
            h.out_mac,
            BACKEND_MAC,
            (p.dst, 8080),
            (CLIENT6, 41000),
            3000,
            9,
            1500,
        );
        let mut out = Vec::new();
        for f in &reply {
            let (verdict, o) = h.run(f, h.out_index);
            assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
            assert_eq!(o[..6], CLIENT_MAC);
            out.push(o);
        }
        let r = parse_ipv6_udp_fragments(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (r.src, r.src_port, r.dst, r.dst_port),
            (VIP6, 53, CLIENT6, 41000)
        );
        let c = h.counters();
        assert_eq!(
            (
                c.fragments_tracked,
                c.fragments_balanced,
                c.fragments_translated
            ),
            (2, 2, 2),
            "{c:?}"
        );
        assert_eq!(
            (
                c.fragments_dropped_orphan,
                c.fragments_passed,
                c.ipv6_passed
            ),
            (0, 0, 0)
        );
    });
}

#[test]
fn orphan_ipv6_fragments_of_ours_are_dropped_and_foreign_fragments_pass_untouched() {
    in_fresh_netns(|| {
        let h = harness6();
        let in_mac = mac_of("in0");
        let request = ipv6_udp_fragments(
            in_mac,
            CLIENT_MAC,
            (CLIENT6, 41001),
            (VIP6, 53),
            3000,
            11,
            1500,
        );
        let reply = ipv6_udp_fragments(
            h.out_mac,
            BACKEND_MAC,
            (BACKEND6_A, 8080),
            (CLIENT6, 41001),
            3000,
            12,
            1500,
        );
        for f in request[1..].iter() {
            assert_eq!(h.run(f, h.in_index).0, XDP_DROP);
        }
        for f in reply[1..].iter() {
            assert_eq!(h.run(f, h.out_index).0, XDP_DROP);
        }
        let c = h.counters();
        assert_eq!(c.fragments_dropped_orphan, 4, "{c:?}");
        assert_eq!((c.redirected, c.fragments_tracked), (0, 0), "{c:?}");

        // Not ours: another address, and a VIP port no listener has (whose later fragments
        // follow their first one).
        let other = ipv6_udp_fragments(
            in_mac,
            CLIENT_MAC,
            (CLIENT6, 41002),
            (addr("fd00:10::1"), 53),
            3000,
            13,
            1500,
        );
        let no_listener = ipv6_udp_fragments(
            in_mac,
            CLIENT_MAC,
            (CLIENT6, 41002),
            (VIP6, 54),
            3000,
            14,
            1500,
        );
        for (i, f) in other.iter().chain(&no_listener).enumerate() {
            let (verdict, out) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_PASS, "fragment {i}: {:?}", h.counters());
            assert_eq!(&out, f, "passed unmodified");
        }
        let c = h.counters();
        assert_eq!(
            (c.fragments_passed, c.fragments_dropped_orphan),
            (6, 4),
            "{c:?}"
        );
        assert!(flow_entries(&h, "CONNECTIONS").is_empty());
    });
}

#[test]
fn ipv6_replies_need_no_flow_state_and_traffic_to_this_host_is_not_translated() {
    in_fresh_netns(|| {
        let h = harness6();
        // A reply of a flow this node never saw (another node's, or from before a restart).
        let (verdict, out) = h.run(
            &ipv6_frame(
                h.out_mac,
                BACKEND_MAC,
                BACKEND6_B,
                CLIENT6,
                udp(8080, 41000),
            ),
            h.out_index,
        );
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        let p = parse_valid6(&out);
        assert_eq!(
            (p.src, p.src_port, p.dst, p.dst_port),
            (VIP6, 53, CLIENT6, 41000)
        );
        // A health check's answer, to this host's own address: untouched.
        let this_host = addr("fd00:20::1");
        let answer = ipv6_frame(
            h.out_mac,
            BACKEND_MAC,
            BACKEND6_A,
            this_host,
            tcp(8080, 51000, SYN | ACK),
        );
        let (verdict, out) = h.run(&answer, h.out_index);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, answer, "passed unmodified");
        let c = h.counters();
        assert_eq!(
            (c.local_from_backend_passed, c.replies_translated),
            (1, 1),
            "{c:?}"
        );
    });
}

/// DSR UDP listeners of both families, their backend on the link.
const DSR_FRAGMENTS_CONFIG: &str = r#"
instance = "pkt"
maglev_table_size = 1009
[[interfaces]]
name = "in0"
[[listeners]]
name = "direct4"
protocol = "udp"
vip = "10.99.0.10"
port = 87
group = "segment4"
forwarding = "dsr"
health_check = { type = "udp" }
[[listeners]]
name = "direct6"
protocol = "udp"
vip = "fd00:99::10"
port = 87
group = "segment6"
forwarding = "dsr"
health_check = { type = "udp" }
[[groups]]
name = "segment4"
backends = [{ address = "10.20.0.2" }]
[[groups]]
name = "segment6"
backends = [{ address = "fd00:20::2" }]
"#;

#[test]
fn dsr_sends_every_fragment_of_a_datagram_unchanged_to_the_first_ones_backend() {
    in_fresh_netns(|| {
        let mut h = Testbed::new(DSR_FRAGMENTS_CONFIG, RING_SIZE).expect("testbed");
        let in_mac = mac_of("in0");
        let request4 = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41000), (VIP, 87), 3000, 7);
        let request6 = ipv6_udp_fragments(
            in_mac,
            CLIENT_MAC,
            (CLIENT6, 41000),
            (VIP6, 87),
            3000,
            7,
            1500,
        );
        assert_eq!((request4.len(), request6.len()), (3, 3));
        for f in request4.iter().chain(&request6) {
            let (verdict, out) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
            assert_eq!(out[..6], BACKEND_MAC, "to the backend's MAC address");
            assert_eq!(out[6..12], h.out_mac);
            assert_eq!(
                out[12..],
                f[12..],
                "the fragment is the client's, unchanged"
            );
        }
        let c = h.counters();
        assert_eq!(
            (c.fragments_tracked, c.fragments_balanced, c.redirected),
            (2, 4, 6),
            "{c:?}"
        );
        assert_eq!(
            (
                c.fragments_passed,
                c.fragments_dropped_orphan,
                c.replies_translated
            ),
            (0, 0, 0)
        );

        // With its backend gone, a later fragment is dropped, never passed to the stack
        // (which would route it to the VIP).
        let later = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41001), (VIP, 87), 3000, 8);
        assert_eq!(h.run(&later[0], h.in_index).0, XDP_REDIRECT);
        let moved = DSR_FRAGMENTS_CONFIG.replace("10.20.0.2", "10.20.0.3");
        let moved = Config::parse(&moved, "moved").expect("config");
        h.reconciler
            .apply(&moved, &Default::default())
            .expect("apply");
        assert_eq!(h.run(&later[1], h.in_index).0, XDP_DROP);
        assert_eq!(h.counters().fragments_passed, 0);
    });
}

/// Tunnelling DSR listeners of both families, their backends behind a gateway.
const TUNNEL_CONFIG: &str = r#"
instance = "pkt"
maglev_table_size = 1009
[[interfaces]]
name = "in0"
[[listeners]]
name = "tunnel4"
protocol = "udp"
vip = "10.99.0.10"
port = 88
group = "remote4"
forwarding = "dsr"
dsr = "ipip"
tunnel_source = "10.20.0.1"
health_check = { type = "udp" }
[[listeners]]
name = "tunnel4tcp"
protocol = "tcp"
vip = "10.99.0.10"
port = 88
group = "remote4"
forwarding = "dsr"
dsr = "ipip"
tunnel_source = "10.20.0.1"
health_check = { type = "tcp" }
[[listeners]]
name = "tunnel6"
protocol = "udp"
vip = "fd00:99::10"
port = 88
group = "remote6"
forwarding = "dsr"
dsr = "ipip"
tunnel_source = "fd00:20::1"
health_check = { type = "udp" }
[[listeners]]
name = "tunnel4frag"
protocol = "udp"
vip = "10.99.0.10"
port = 89
group = "remote4b"
forwarding = "dsr"
dsr = "ipip"
tunnel_source = "10.20.0.1"
health_check = { type = "udp" }
[[groups]]
name = "remote4"
backends = [{ address = "10.30.0.5" }]
[[groups]]
name = "remote4b"
backends = [{ address = "10.30.0.6", port = 89 }]
[[groups]]
name = "remote6"
backends = [{ address = "fd00:30::5" }]
"#;

/// The inner packet of a tunnelled frame after checking the outer header (IPv4 in IPv4 or IPv6
/// in IPv6) from `source` to `backend`.
fn inner_of_tunnel(out: &[u8], source: &[u8], backend: &[u8]) -> Vec<u8> {
    use slb_common::checksum::internet_checksum;
    assert_eq!(out[..6], BACKEND_MAC, "to the gateway's MAC address");
    match u16::from_be_bytes([out[12], out[13]]) {
        0x0800 => {
            let outer = &out[14..34];
            assert_eq!(outer[0], 0x45);
            assert_eq!(internet_checksum(0, outer), 0, "outer header checksum");
            assert_eq!((outer[8], outer[9]), (64, 4), "TTL 64, IPv4 in IPv4");
            assert_eq!((&outer[12..16], &outer[16..20]), (source, backend));
            let inner = out[34..].to_vec();
            assert_eq!(
                usize::from(u16::from_be_bytes([outer[2], outer[3]])),
                20 + inner.len()
            );
            assert_eq!(
                outer[6] & 0x40,
                inner[6] & 0x40,
                "DF copied from the inner header"
            );
            inner
        }
        0x86dd => {
            let outer = &out[14..54];
            assert_eq!(outer[0] >> 4, 6);
            assert_eq!((outer[6], outer[7]), (41, 64), "IPv6 in IPv6, hop limit 64");
            assert_eq!((&outer[8..24], &outer[24..40]), (source, backend));
            let inner = out[54..].to_vec();
            assert_eq!(
                usize::from(u16::from_be_bytes([outer[4], outer[5]])),
                inner.len()
            );
            inner
        }
        other => panic!("ether type {other:#06x}"),
    }
}

#[test]
fn tunnelling_dsr_encapsulates_the_unchanged_packet_for_a_backend_behind_a_gateway() {
    in_fresh_netns(|| {
        let h = Testbed::new(TUNNEL_CONFIG, RING_SIZE).expect("testbed");
        for route in [
            ["-4", "route", "add", "10.30.0.0/24", "via", "10.20.0.3"],
            ["-6", "route", "add", "fd00:30::/64", "via", "fd00:20::3"],
        ] {
            let status = std::process::Command::new("ip")
                .args(route)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let in_mac = mac_of("in0");
        let (source4, backend4) = ([10, 20, 0, 1], [10, 30, 0, 5]);
        let (source6, backend6) = (addr("fd00:20::1"), addr("fd00:30::5"));

        let sent = frame(in_mac, CLIENT, VIP, udp(40000, 88));
        let (verdict, out) = h.run(&sent, h.in_index);
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        assert_eq!(inner_of_tunnel(&out, &source4, &backend4), sent[14..]);
        let sent6 = frame6(in_mac, CLIENT6, VIP6, udp(40000, 88));
        let (verdict, out) = h.run(&sent6, h.in_index);
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        assert_eq!(inner_of_tunnel(&out, &source6, &backend6), sent6[14..]);
        assert_eq!(h.counters().tunnel_encapsulated, 2);

        // A full-size packet with DF no longer fits with the outer header: "fragmentation
        // needed" names the MTU left for it; IPv6: Packet Too Big.
        let big = padded(frame(in_mac, CLIENT, VIP, tcp(40001, 88, ACK)), 1500);
        let (verdict, out) = h.run(&big, h.in_index);
        assert_eq!(verdict, XDP_TX);
        let seen = parse_icmp(&out);
        assert_eq!(
            (seen.src, seen.dst, seen.kind, seen.code, seen.mtu),
            (VIP, CLIENT, 3, 4, 1480)
        );
        // 40 + 8 + 1452: a 1500-byte IPv6 packet.
        let payload = vec![0u8; 1452];
        let big6 = ipv6_frame_with(
            in_mac,
            CLIENT_MAC,
            CLIENT6,
            VIP6,
            udp(40002, 88),
            &Ipv6FrameOptions {
                payload: &payload,
                ..Ipv6FrameOptions::default()
            },
        );
        let (verdict, out) = h.run(&big6, h.in_index);
        assert_eq!(verdict, XDP_TX);
        let e = parse_icmpv6_error(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (e.kind, e.mtu, e.src, e.dst),
            (ICMPV6_PACKET_TOO_BIG, 1460, VIP6, CLIENT6)
        );
        // Without DF, it is dropped and counted: fragmented by the stack, it would go to the VIP.
        let mut no_df = big.clone();
        no_df[20] = 0;
        fix_ip_checksum(&mut no_df);
        assert_eq!(h.run(&no_df, h.in_index).0, XDP_DROP);
        let c = h.counters();
        assert_eq!(
            (c.icmp_too_big_sent, c.dsr_too_big_dropped),
            (2, 1),
            "{c:?}"
        );

        // With room for the outer header, every fragment of a datagram is tunnelled to the
        // first one's backend (another one, whose next hop no cache holds with the old MTU).
        set_mtu("out0", 1600);
        let fragments = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41000), (VIP, 89), 3000, 9);
        assert_eq!(fragments.len(), 3);
        for f in &fragments {
            let (verdict, out) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
            assert_eq!(inner_of_tunnel(&out, &source4, &[10, 30, 0, 6]), f[14..]);
        }
        let c = h.counters();
        assert_eq!((c.fragments_tracked, c.fragments_balanced), (1, 2), "{c:?}");
        assert_eq!((c.tunnel_encapsulated, c.tunnel_failed), (5, 0));
    });
}
