//! Packet-level tests of the XDP program through BPF_PROG_TEST_RUN: crafted frames in, verdict
//! and rewritten frame out. Each test runs in a thread of its own inside a fresh network
//! namespace (network namespaces are per thread), with two veth pairs and static neighbours so
//! the program's FIB lookups have real answers.

use std::net::Ipv4Addr;

use slb_common::wire::{ipv4_frame, parse_ipv4_frame, L4Spec, ParsedFrame, TCP_ACK, TCP_SYN};
use slb_user::applied::{BackendKey, HealthStatus};
use slb_user::config::Config;
use slb_user::testbed::{self, in_fresh_netns, Testbed, BACKEND_MAC, CLIENT_MAC};

#[path = "packets/ipv6.rs"]
mod ipv6;
#[path = "packets/load.rs"]
mod load;
#[path = "packets/policy.rs"]
mod policy;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const RING_SIZE: u32 = 1009;
const CLIENT: [u8; 4] = [10, 10, 0, 2];
const VIP: [u8; 4] = [10, 99, 0, 10];
const BACKEND_A: [u8; 4] = [10, 20, 0, 2];
const BACKEND_B: [u8; 4] = [10, 20, 0, 3];

fn config(weight_a: u32, weight_b: u32) -> String {
    format!(
        r#"
instance = "pkt"
maglev_table_size = {RING_SIZE}
[[interfaces]]
name = "in0"
[[listeners]]
name = "web"
protocol = "tcp"
vip = "10.99.0.10"
port = 80
group = "pool"
[[listeners]]
name = "dns"
protocol = "udp"
vip = "10.99.0.10"
port = 53
group = "pool"
[[listeners]]
name = "drained"
protocol = "tcp"
vip = "10.99.0.10"
port = 81
group = "empty"
[[listeners]]
name = "sticky"
protocol = "tcp"
vip = "10.99.0.10"
port = 82
group = "sticky"
persistence = {{ timeout = "60s" }}
[[listeners]]
name = "strict"
protocol = "tcp"
vip = "10.99.0.10"
port = 84
group = "strict"
on_all_unhealthy = "drop"
[[listeners]]
name = "pair"
protocol = "tcp"
vip = "10.99.0.10"
port = 83
group = "pair"
health_check = {{ type = "tcp" }}
[[groups]]
name = "pair"
type = "active-standby"
backends = [{{ address = "10.20.0.2", port = 8083 }}, {{ address = "10.20.0.3", port = 8083 }}]
[[groups]]
name = "pool"
backends = [{{ address = "10.20.0.2", port = 8080, weight = {weight_a} }}, {{ address = "10.20.0.3", port = 8080, weight = {weight_b} }}]
[[groups]]
name = "sticky"
backends = [{{ address = "10.20.0.2", port = 8082, weight = {weight_a} }}, {{ address = "10.20.0.3", port = 8082, weight = {weight_b} }}]
[[groups]]
name = "strict"
backends = [{{ address = "10.20.0.2", port = 8084, weight = {weight_a} }}, {{ address = "10.20.0.3", port = 8084, weight = {weight_b} }}]
[[groups]]
name = "empty"
backends = [{{ address = "10.20.0.2", port = 8081, weight = 0 }}]
"#
    )
}

/// A testbed with `config` applied.
fn testbed(config: &Config) -> Testbed {
    let mut h = harness();
    h.reconciler
        .apply(config, &Default::default())
        .expect("apply");
    h
}

fn listener_index(h: &Testbed, name: &str) -> u32 {
    h.reconciler
        .state()
        .listeners
        .iter()
        .find(|l| l.name == name)
        .expect("listener")
        .index
}

fn listener_counters(h: &Testbed, name: &str) -> slb_common::TrafficCounters {
    h.reconciler
        .maps()
        .counters
        .listener(listener_index(h, name))
        .expect("LISTENER_STATS")
}

/// The testbed with `config(1, 1)` applied.
fn harness() -> Testbed {
    Testbed::new(&config(1, 1), RING_SIZE).expect("testbed")
}

fn mac_of(iface: &str) -> [u8; 6] {
    testbed::mac_of(iface).expect("MAC")
}

fn tcp(src_port: u16, dst_port: u16, flags: u8) -> L4Spec {
    L4Spec::tcp(src_port, dst_port, flags)
}

fn udp(src_port: u16, dst_port: u16) -> L4Spec {
    L4Spec::udp(src_port, dst_port)
}

const SYN: u8 = TCP_SYN;
const ACK: u8 = TCP_ACK;

/// A frame from the client's MAC.
fn frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], l4: L4Spec) -> Vec<u8> {
    ipv4_frame(dst_mac, CLIENT_MAC, src, dst, l4)
}

/// Parses a frame, asserting both checksums are valid.
fn parse_valid(f: &[u8]) -> ParsedFrame {
    parse_ipv4_frame(f).unwrap_or_else(|e| panic!("{e}: {f:02x?}"))
}

fn ipv4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// A TCP handshake from the client's `port` to VIP:`vip_port` (SYN, then ACK), which puts the
/// flow in the connection table; returns the backend the ACK went to.
fn establish(h: &Testbed, port: u16, vip_port: u16) -> [u8; 4] {
    let in_mac = mac_of("in0");
    h.run(
        &frame(in_mac, CLIENT, VIP, tcp(port, vip_port, SYN)),
        h.in_index,
    );
    let (_, out) = h.run(
        &frame(in_mac, CLIENT, VIP, tcp(port, vip_port, ACK)),
        h.in_index,
    );
    parse_valid(&out).dst
}

#[test]
fn new_tcp_flow_is_rewritten_to_a_backend_and_redirected() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40000, 80, SYN)), h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse_valid(&out);
        assert!(
            p.dst == BACKEND_A || p.dst == BACKEND_B,
            "destination {} is a backend",
            ipv4(p.dst)
        );
        assert_eq!(p.dst_port, 8080);
        assert_eq!(p.src, CLIENT, "the backend sees the client's real address");
        assert_eq!(p.src_port, 40000);
        assert_eq!(p.ttl, 63);
        assert_eq!(p.dst_mac, BACKEND_MAC);
        assert_eq!(p.src_mac, h.out_mac);
        let c = h.counters();
        assert_eq!((c.redirected, c.malformed), (1, 0));
    });
}

#[test]
fn known_flow_keeps_its_backend_after_the_ring_changes_and_replies_are_translated() {
    in_fresh_netns(|| {
        let mut h = harness();
        let in_mac = mac_of("in0");
        // Find one flow per backend so we can move each away.
        let mut first = None;
        for port in 40000..40100 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, SYN)), h.in_index);
            let p = parse_valid(&out);
            if first.is_none() {
                first = Some((port, p.dst));
            }
        }
        let (port, backend) = first.unwrap();
        // Reweight so that the flow's backend gets nothing new.
        let (wa, wb) = if backend == BACKEND_A { (0, 1) } else { (1, 0) };
        h.reconciler
            .apply(
                &Config::parse(&config(wa, wb), "test").unwrap(),
                &Default::default(),
            )
            .unwrap();

        let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, ACK)), h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            parse_valid(&out).dst,
            backend,
            "an established flow stays on its (drained) backend"
        );
        let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(50000, 80, SYN)), h.in_index);
        assert_ne!(
            parse_valid(&out).dst,
            backend,
            "a new flow avoids the drained backend"
        );

        // The backend's reply leaves as VIP:80 towards the client.
        let out_mac = h.out_mac;
        let (verdict, out) = h.run(
            &frame(out_mac, backend, CLIENT, tcp(8080, port, SYN | ACK)),
            h.out_index,
        );
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse_valid(&out);
        assert_eq!((p.src, p.src_port), (VIP, 80));
        assert_eq!((p.dst, p.dst_port), (CLIENT, port));
        assert_eq!(p.dst_mac, CLIENT_MAC);
        assert_eq!(h.counters().replies_translated, 1);
    });
}

#[test]
fn udp_flows_are_balanced_and_a_zero_checksum_stays_zero() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let mut seen = std::collections::BTreeSet::new();
        for port in 1000..1200 {
            let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, udp(port, 53)), h.in_index);
            assert_eq!(verdict, XDP_REDIRECT);
            let p = parse_valid(&out);
            assert_eq!(p.dst_port, 8080);
            seen.insert(p.dst);
        }
        assert_eq!(
            seen.len(),
            2,
            "200 UDP flows reach both equal-weight backends"
        );
        let mut spec = udp(2000, 53);
        spec.zero_udp_checksum = true;
        let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, spec), h.in_index);
        assert_eq!(parse_valid(&out).l4_checksum, 0);
    });
}

#[test]
fn traffic_that_is_not_for_a_listener_passes_untouched_and_is_counted() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "other port",
                frame(in_mac, CLIENT, VIP, tcp(40000, 22, SYN)),
            ),
            (
                "other address",
                frame(in_mac, CLIENT, [10, 10, 0, 1], tcp(40000, 80, SYN)),
            ),
            (
                "udp to the tcp port",
                frame(in_mac, CLIENT, VIP, udp(40000, 80)),
            ),
        ];
        let mut arp = frame([0xff; 6], CLIENT, VIP, tcp(1, 1, 0));
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        cases.push(("arp", arp));
        let mut icmp = frame(in_mac, CLIENT, VIP, tcp(1, 80, 0));
        icmp[14 + 9] = 1;
        cases.push(("icmp", icmp));
        for (name, f) in &cases {
            let (verdict, out) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_PASS, "{name}");
            assert_eq!(&out, f, "{name} is not modified");
        }
        let c = h.counters();
        assert_eq!(c.not_for_us_passed, 4);
        assert_eq!(c.non_ip_passed, 1);

        // A fragment to an address that is neither a VIP nor a backend's.
        let mut fragment = frame(in_mac, CLIENT, [10, 10, 0, 1], tcp(40000, 80, SYN));
        fragment[14 + 6] = 0x20; // more fragments
        assert_eq!(h.run(&fragment, h.in_index).0, XDP_PASS);
        let mut options = frame(in_mac, CLIENT, VIP, tcp(40000, 80, SYN));
        options[14] = 0x46;
        assert_eq!(h.run(&options, h.in_index).0, XDP_PASS);
        let mut expired = frame(in_mac, CLIENT, VIP, tcp(40001, 80, SYN));
        expired[14 + 8] = 1;
        assert_eq!(h.run(&expired, h.in_index).0, XDP_PASS);
        let c = h.counters();
        assert_eq!(
            (
                c.fragments_passed,
                c.ip_options_passed,
                c.ttl_expired_passed
            ),
            (1, 1, 1)
        );
    });
}

#[test]
fn listener_without_weighted_backends_drops_with_a_counter() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let (verdict, _) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40000, 81, SYN)), h.in_index);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(h.counters().no_backend_dropped, 1);
    });
}

#[test]
fn random_and_truncated_frames_only_ever_pass_or_drop() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let templates = [
            frame(in_mac, CLIENT, [10, 10, 0, 1], tcp(40000, 80, SYN)),
            frame(in_mac, CLIENT, [10, 10, 0, 1], udp(40000, 53)),
            frame(in_mac, CLIENT, VIP, tcp(40000, 22, SYN)),
        ];
        let mut runs = 0;
        for i in 0..3000 {
            let f: Vec<u8> = if i % 2 == 0 {
                let len = 14 + (next() % 100) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let t = &templates[(next() % 3) as usize];
                let mut f = t[..14 + (next() as usize % (t.len() - 13))].to_vec();
                // Flip one byte outside the addresses and ports, so it stays non-listener traffic.
                let at = (next() as usize) % f.len();
                if !(26..38).contains(&at) {
                    f[at] ^= next() as u8;
                }
                f
            };
            let (verdict, _) = h.run(&f, h.in_index);
            assert!(
                verdict == XDP_PASS || verdict == XDP_DROP,
                "frame {f:02x?} gave verdict {verdict}"
            );
            runs += 1;
        }
        assert_eq!(runs, 3000);
        assert!(
            h.counters().malformed > 0,
            "truncated frames are counted as malformed"
        );
    });
}

/// The backend port of a listener of `config` (each listener's backends have their own, so the
/// balancer knows a reply's listener by its source endpoint).
fn backend_port(listener: &str) -> u16 {
    match listener {
        "pair" => 8083,
        "sticky" => 8082,
        "strict" => 8084,
        _ => 8080,
    }
}

/// Health verdicts as the daemon would pass them: `down` backends of `listener` are unhealthy.
fn verdicts(
    listener: &str,
    down: &[[u8; 4]],
) -> std::collections::BTreeMap<BackendKey, HealthStatus> {
    down.iter()
        .map(|a| {
            let key = BackendKey {
                listener: listener.into(),
                address: ipv4(*a).into(),
                port: backend_port(listener),
            };
            (
                key,
                HealthStatus {
                    healthy: false,
                    reason: "test".into(),
                    since_unix_ns: 0,
                    confirmed: true,
                    slow_start_percent: None,
                },
            )
        })
        .collect()
}

#[test]
fn persistence_keeps_a_client_address_on_one_backend() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let mut sticky = std::collections::BTreeSet::new();
        let mut spread = std::collections::BTreeSet::new();
        for port in 30000..30200 {
            // Persistence is recorded when a connection is established (its first ACK), so a
            // SYN flood of spoofed sources cannot churn it.
            h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 82, SYN)), h.in_index);
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 82, ACK)), h.in_index);
            sticky.insert(parse_valid(&out).dst);
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, SYN)), h.in_index);
            spread.insert(parse_valid(&out).dst);
        }
        assert_eq!(
            sticky.len(),
            1,
            "200 connections with persistence land on one backend"
        );
        assert_eq!(spread.len(), 2, "without persistence they spread");
        assert_eq!(h.counters().persistence_hits, 199);
    });
}

#[test]
fn concurrent_handshakes_of_one_client_follow_one_backend_under_persistence() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        // 100 SYNs before any handshake completes (a browser opening connections at once).
        let mut picked = std::collections::BTreeSet::new();
        for port in 31000..31100 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 82, SYN)), h.in_index);
            picked.insert(parse_valid(&out).dst);
        }
        for port in 31000..31100 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 82, ACK)), h.in_index);
            picked.insert(parse_valid(&out).dst);
        }
        assert_eq!(picked.len(), 1, "{picked:?}");
        // A spoofed SYN flood writes only the pending table: the client stays where it is.
        let mut f = frame(in_mac, [172, 16, 0, 0], VIP, tcp(1024, 82, SYN));
        for i in 0..20_000u32 {
            f[27..30].copy_from_slice(&i.to_be_bytes()[1..]);
            h.run(&f, h.in_index);
        }
        let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(31200, 82, SYN)), h.in_index);
        assert!(picked.contains(&parse_valid(&out).dst));
    });
}

#[test]
fn active_standby_fails_over_on_the_health_flag_and_back() {
    in_fresh_netns(|| {
        let mut h = harness();
        let in_mac = mac_of("in0");
        let config = Config::parse(&config(1, 1), "test").unwrap();
        let dst_of = |h: &Testbed, port: u16, flags: u8| {
            let (verdict, out) = h.run(
                &frame(in_mac, CLIENT, VIP, tcp(port, 83, flags)),
                h.in_index,
            );
            assert_eq!(verdict, XDP_REDIRECT);
            parse_valid(&out).dst
        };
        assert_eq!(
            dst_of(&h, 41000, SYN),
            BACKEND_A,
            "the active server takes new flows"
        );

        h.reconciler
            .apply(&config, &verdicts("pair", &[BACKEND_A]))
            .unwrap();
        assert_eq!(
            dst_of(&h, 41001, SYN),
            BACKEND_B,
            "active down: new flows go to the standby"
        );
        assert_eq!(
            dst_of(&h, 41000, ACK),
            BACKEND_B,
            "the active's flows move to the standby"
        );
        let c = h.counters();
        assert!(c.standby_picks >= 2 && c.flows_repicked == 1, "{c:?}");

        h.reconciler.apply(&config, &Default::default()).unwrap();
        assert_eq!(
            dst_of(&h, 41002, SYN),
            BACKEND_A,
            "active back: new flows return at once"
        );
        assert_eq!(
            dst_of(&h, 41000, ACK),
            BACKEND_B,
            "moved flows stay on the standby"
        );
    });
}

#[test]
fn flows_on_an_unhealthy_backend_are_rebalanced_and_new_ones_avoid_it() {
    in_fresh_netns(|| {
        let mut h = harness();
        let in_mac = mac_of("in0");
        let config = Config::parse(&config(1, 1), "test").unwrap();
        let mut on_a = Vec::new();
        for port in 42000..42100 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, SYN)), h.in_index);
            if parse_valid(&out).dst == BACKEND_A {
                on_a.push(port);
            }
        }
        assert!(!on_a.is_empty());
        h.reconciler
            .apply(&config, &verdicts("web", &[BACKEND_A]))
            .unwrap();
        for &port in &on_a {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, ACK)), h.in_index);
            assert_eq!(parse_valid(&out).dst, BACKEND_B);
        }
        for port in 43000..43100 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, SYN)), h.in_index);
            assert_eq!(parse_valid(&out).dst, BACKEND_B);
        }
        assert_eq!(h.counters().flows_repicked, on_a.len() as u64);

        // Both down with the default forward-all policy: traffic keeps flowing to both.
        h.reconciler
            .apply(&config, &verdicts("web", &[BACKEND_A, BACKEND_B]))
            .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for port in 44000..44100 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, SYN)), h.in_index);
            seen.insert(parse_valid(&out).dst);
        }
        assert_eq!(
            seen.len(),
            2,
            "forward-all spreads over every backend when all are down"
        );

        // The same on a listener configured to drop.
        h.reconciler
            .apply(&config, &verdicts("strict", &[BACKEND_A, BACKEND_B]))
            .unwrap();
        let (verdict, _) = h.run(&frame(in_mac, CLIENT, VIP, tcp(45000, 84, SYN)), h.in_index);
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(h.counters().no_backend_dropped, 1);
    });
}

#[test]
fn next_hop_cache_follows_a_neighbour_change_within_a_second() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let send = |h: &Testbed| {
            let (verdict, out) =
                h.run(&frame(in_mac, CLIENT, VIP, tcp(46000, 80, ACK)), h.in_index);
            assert_eq!(verdict, XDP_REDIRECT);
            parse_valid(&out)
        };
        let first = send(&h);
        assert_eq!(first.dst_mac, BACKEND_MAC);
        let again = send(&h);
        assert_eq!(again.dst_mac, BACKEND_MAC);
        let c = h.counters();
        assert_eq!((c.fib_lookups, c.next_hop_cached), (1, 1), "{c:?}");

        // The backend moves to another MAC: cached for at most NEXT_HOP_TTL_NS.
        let backend = std::net::Ipv4Addr::from(first.dst).to_string();
        let status = std::process::Command::new("ip")
            .args([
                "neigh",
                "replace",
                &backend,
                "lladdr",
                "02:00:00:00:00:09",
                "dev",
                "out0",
                "nud",
                "permanent",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(std::time::Duration::from_nanos(
            slb_common::NEXT_HOP_TTL_NS + 100_000_000,
        ));
        assert_eq!(send(&h).dst_mac, [0x02, 0, 0, 0, 0, 0x09]);
        assert_eq!(h.counters().fib_lookups, 2);
    });
}

#[test]
fn rings_are_written_through_the_mapping_and_the_kernel_sees_them() {
    in_fresh_netns(|| {
        let mut h = harness();
        let maps = h.reconciler.maps();
        // Ring memory follows the config: two rings (live and idle) per listener with a Maglev
        // group (web, dns, drained, sticky, strict; the active/standby pair needs none).
        let in_kernel: Vec<u32> = (0..slb_common::RING_SLOTS)
            .filter(|slot| maps.rings.get(slot, 0).is_ok())
            .collect();
        let mapped: Vec<u32> = h.reconciler.mapped_rings().keys().copied().collect();
        assert_eq!(in_kernel, mapped);
        assert_eq!(mapped.len(), 10, "{mapped:?}");
        let mut owners = std::collections::BTreeSet::new();
        for (&slot, ring) in h.reconciler.mapped_rings() {
            let inner = maps.rings.get(&slot, 0).expect("the ring in RINGS");
            let inner: aya::maps::Array<_, u32> =
                aya::maps::Array::try_from(aya::maps::Map::Array(inner)).expect("an array");
            assert_eq!(inner.len(), RING_SIZE);
            for i in 0..RING_SIZE {
                let through_syscall = inner.get(&i, 0).expect("ring lookup");
                let through_mapping = ring
                    .slot(i as usize)
                    .expect("slot in the mapping")
                    .load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(through_syscall, through_mapping, "ring {slot} slot {i}");
                owners.insert(through_syscall);
            }
        }
        assert!(
            owners.len() >= 3,
            "the rings name backends (and empty slots): {owners:?}"
        );

        // A listener that goes away takes its ring memory with it.
        let mut text = config(1, 1);
        let start = text
            .find("[[listeners]]\nname = \"strict\"")
            .expect("strict listener");
        let end = start + text[start..].find("on_all_unhealthy = \"drop\"\n").unwrap() + 26;
        text.replace_range(start..end, "");
        h.reconciler
            .apply(&Config::parse(&text, "test").unwrap(), &Default::default())
            .unwrap();
        let maps = h.reconciler.maps();
        let left = (0..slb_common::RING_SLOTS)
            .filter(|slot| maps.rings.get(slot, 0).is_ok())
            .count();
        assert_eq!(left, 8);
        assert_eq!(h.reconciler.mapped_rings().len(), 8);
    });
}

/// Rewrites the IPv4 header checksum after a test changed the header.
fn fix_ip_checksum(f: &mut [u8]) {
    f[24..26].copy_from_slice(&[0, 0]);
    let c = slb_common::checksum::internet_checksum(0, &f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// The flows the half-open table holds (slots whose check is whole), by reading every slot.
fn half_open_flows(h: &Testbed) -> Vec<slb_common::FlowKey> {
    let data = aya::maps::MapData::from_pin(h.pin_dir().join("HALF_OPEN")).expect("pinned map");
    let table: aya::maps::Array<_, slb_common::HalfOpen> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
    table
        .iter()
        .map(|slot| slot.expect("slot"))
        .filter(|slot| {
            let hash = slb_common::hash::flow_hash(&slot.flow, 0);
            slot.flow.protocol != 0
                && slot.check == slb_common::half_open_check(hash, slot.backend_id)
        })
        .map(|slot| slot.flow)
        .collect()
}

/// Entries of a pinned hash map of flows, by walking it.
fn flow_entries(h: &Testbed, map: &str) -> Vec<(slb_common::FlowKey, slb_common::Connection)> {
    let data = aya::maps::MapData::from_pin(h.pin_dir().join(map)).expect("pinned map");
    let table: aya::maps::HashMap<_, slb_common::FlowKey, slb_common::Connection> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("hash map");
    table
        .iter()
        .map(|entry| entry.expect("map entry"))
        .collect()
}

#[test]
fn malformed_frames_are_dropped_counted_and_create_no_state() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        type Mutation = fn(&mut Vec<u8>);
        // (class, listener port, protocol is TCP, how to break a valid frame)
        let classes: [(&str, u16, bool, Mutation); 8] = [
            ("IP total length past the frame", 80, true, |f| {
                let len = u16::from_be_bytes([f[16], f[17]]) + 40;
                f[16..18].copy_from_slice(&len.to_be_bytes());
                fix_ip_checksum(f);
            }),
            ("IP total length shorter than the headers", 80, true, |f| {
                f[16..18].copy_from_slice(&30u16.to_be_bytes());
                fix_ip_checksum(f);
            }),
            (
                "IP total length shorter than the IP header",
                80,
                true,
                |f| {
                    f[16..18].copy_from_slice(&12u16.to_be_bytes());
                    fix_ip_checksum(f);
                },
            ),
            ("reserved IP flag", 80, true, |f| {
                f[20] |= 0x80;
                fix_ip_checksum(f);
            }),
            ("TCP data offset below 5", 80, true, |f| f[46] = 0x40),
            ("TCP data offset past the packet", 80, true, |f| {
                f[46] = 0xf0
            }),
            ("SYN with FIN", 80, true, |f| f[47] = 0x03),
            ("UDP length past the packet", 53, false, |f| {
                f[38..40].copy_from_slice(&200u16.to_be_bytes())
            }),
        ];
        let mut sent = 0;
        for (k, (class, port, is_tcp, mutate)) in classes.iter().enumerate() {
            for v in 0..25u16 {
                let src_port = 20000 + k as u16 * 100 + v;
                let l4 = if *is_tcp {
                    tcp(src_port, *port, SYN)
                } else {
                    udp(src_port, *port)
                };
                let mut f = frame(in_mac, CLIENT, VIP, l4);
                mutate(&mut f);
                let (verdict, _) = h.run(&f, h.in_index);
                assert_eq!(verdict, XDP_DROP, "{class} (variant {v}) must be dropped");
                sent += 1;
            }
        }
        // UDP lengths below the header, and a short UDP length on a reply from a backend.
        for v in 0..25u16 {
            let mut f = frame(in_mac, CLIENT, VIP, udp(30000 + v, 53));
            f[38..40].copy_from_slice(&(v % 8).to_be_bytes());
            assert_eq!(h.run(&f, h.in_index).0, XDP_DROP, "UDP length {}", v % 8);
            let mut reply = frame(h.out_mac, BACKEND_A, CLIENT, udp(8080, 30000 + v));
            reply[38..40].copy_from_slice(&300u16.to_be_bytes());
            assert_eq!(h.run(&reply, h.out_index).0, XDP_DROP, "malformed reply");
            sent += 2;
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

        // The same frames unbroken are balanced: the drops above are the mutations' doing.
        let (verdict, _) = h.run(&frame(in_mac, CLIENT, VIP, tcp(20000, 80, SYN)), h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
    });
}

#[test]
fn a_syn_flood_fills_only_the_half_open_table() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        // One established flow.
        let backend = establish(&h, 40000, 80);
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), 1);

        // More spoofed SYNs than the half-open table holds.
        let flood = slb_common::MAX_HALF_OPEN + 10_000;
        let mut f = frame(in_mac, [172, 16, 0, 0], VIP, tcp(1024, 80, SYN));
        for i in 0..flood {
            // A new source address and port per SYN; checksums do not matter to the balancer.
            f[27..30].copy_from_slice(&i.to_be_bytes()[1..]);
            f[34..36].copy_from_slice(&(1024 + (i % 60000) as u16).to_be_bytes());
            assert_eq!(h.run(&f, h.in_index).0, XDP_REDIRECT);
        }
        let c = h.counters();
        assert_eq!(c.half_open_tracked, u64::from(flood) + 1, "{c:?}");
        let established = flow_entries(&h, "CONNECTIONS");
        assert_eq!(
            established.len(),
            1,
            "SYNs must not enter the connection table"
        );
        // The flood took over slots: most of the table holds its flows now.
        let held = half_open_flows(&h).len();
        assert!(
            held > slb_common::MAX_HALF_OPEN as usize / 2,
            "{held} slots hold flood flows"
        );

        // The established flow keeps its backend, and its replies are translated.
        let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40000, 80, ACK)), h.in_index);
        assert_eq!(parse_valid(&out).dst, backend);
        let (verdict, out) = h.run(
            &frame(h.out_mac, backend, CLIENT, tcp(8080, 40000, ACK)),
            h.out_index,
        );
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(parse_valid(&out).src, VIP);
    });
}

#[test]
fn replies_need_no_flow_state_and_traffic_to_this_host_is_not_translated() {
    in_fresh_netns(|| {
        let h = harness();
        // A reply of a flow this node never saw (another node's, or from before a restart).
        let (verdict, out) = h.run(
            &frame(h.out_mac, BACKEND_B, CLIENT, udp(8080, 41000)),
            h.out_index,
        );
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse_valid(&out);
        assert_eq!(
            (p.src, p.src_port, p.dst, p.dst_port),
            (VIP, 53, CLIENT, 41000)
        );
        // The active/standby listener's backends have their own port, hence their own VIP port.
        let (_, out) = h.run(
            &frame(h.out_mac, BACKEND_B, CLIENT, tcp(8083, 41000, ACK)),
            h.out_index,
        );
        assert_eq!(parse_valid(&out).src_port, 83);

        // A health check's answer, to this host's own address: untouched.
        let this_host = [10, 20, 0, 1];
        let answer = frame(h.out_mac, BACKEND_A, this_host, tcp(8080, 51000, SYN | ACK));
        let (verdict, out) = h.run(&answer, h.out_index);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, answer, "passed unmodified");
        let c = h.counters();
        assert_eq!(
            (c.local_from_backend_passed, c.replies_translated),
            (1, 2),
            "{c:?}"
        );
    });
}

#[test]
fn fin_and_rst_mark_a_flow_closing_and_count_it_closed() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        for (port, last) in [(40001u16, FIN | ACK), (40002, RST)] {
            establish(&h, port, 80);
            h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, last)), h.in_index);
            // A retransmitted FIN is not a second close.
            h.run(&frame(in_mac, CLIENT, VIP, tcp(port, 80, last)), h.in_index);
        }
        let entries = flow_entries(&h, "CONNECTIONS");
        assert_eq!(entries.len(), 2);
        assert!(
            entries
                .iter()
                .all(|(_, c)| c.flags & slb_common::CONN_F_CLOSING != 0),
            "{entries:?}"
        );
        let web = h
            .reconciler
            .state()
            .listeners
            .iter()
            .find(|l| l.name == "web")
            .unwrap()
            .index;
        let stats = h.reconciler.maps().counters.listener(web).unwrap();
        assert_eq!(
            (stats.new_connections, stats.closed_connections),
            (2, 2),
            "{stats:?}"
        );
    });
}

const ICMP: u8 = 1;

/// An ICMP error (`kind`, `code`; next-hop MTU `mtu`) from `src` to `dst` quoting the IP header
/// and first 8 payload bytes of `about` (a frame).
fn icmp_error(
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    (kind, code, mtu): (u8, u8, u16),
    about: &[u8],
) -> Vec<u8> {
    use slb_common::checksum::internet_checksum;
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&about[14..42]);
    let c = internet_checksum(0, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    slb_common::wire::ipv4_packet_frame(dst_mac, CLIENT_MAC, src, dst, ICMP, &icmp)
}

/// An ICMP error frame as the balancer left it: outer and quoted addresses and ports, after
/// checking the outer IP, ICMP and quoted IP checksums.
#[derive(Debug, PartialEq)]
struct IcmpSeen {
    src: [u8; 4],
    dst: [u8; 4],
    kind: u8,
    code: u8,
    mtu: u16,
    inner_src: [u8; 4],
    inner_dst: [u8; 4],
    inner_ports: (u16, u16),
}

fn parse_icmp(f: &[u8]) -> IcmpSeen {
    use slb_common::checksum::internet_checksum;
    assert_eq!(f[23], ICMP, "an ICMP packet: {f:02x?}");
    assert_eq!(internet_checksum(0, &f[14..34]), 0, "outer IP checksum");
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    assert_eq!(internet_checksum(0, &f[34..14 + total]), 0, "ICMP checksum");
    assert_eq!(internet_checksum(0, &f[42..62]), 0, "quoted IP checksum");
    let a = |i: usize| [f[i], f[i + 1], f[i + 2], f[i + 3]];
    IcmpSeen {
        src: a(26),
        dst: a(30),
        kind: f[34],
        code: f[35],
        mtu: u16::from_be_bytes([f[40], f[41]]),
        inner_src: a(54),
        inner_dst: a(58),
        inner_ports: (
            u16::from_be_bytes([f[62], f[63]]),
            u16::from_be_bytes([f[64], f[65]]),
        ),
    }
}

/// `f` padded to an IP packet of `ip_len` bytes (DF stays as built: set).
fn padded(mut f: Vec<u8>, ip_len: usize) -> Vec<u8> {
    f.resize(14 + ip_len, 0);
    f[16..18].copy_from_slice(&(ip_len as u16).to_be_bytes());
    fix_ip_checksum(&mut f);
    f
}

fn set_mtu(iface: &str, mtu: u16) {
    let status = std::process::Command::new("ip")
        .args(["link", "set", iface, "mtu", &mtu.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_packet_too_big_for_the_backend_side_gets_frag_needed_quoting_the_vip() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        set_mtu("out0", 1400);
        let big = padded(frame(in_mac, CLIENT, VIP, tcp(40000, 80, ACK)), 1500);
        let (verdict, out) = h.run(&big, h.in_index);
        assert_eq!(verdict, XDP_TX, "answered back out of the client side");
        assert_eq!(out.len(), 14 + 56);
        assert_eq!(&out[0..6], &CLIENT_MAC[..], "back to the sender's MAC");
        let seen = parse_icmp(&out);
        assert_eq!(
            seen,
            IcmpSeen {
                src: VIP,
                dst: CLIENT,
                kind: 3,
                code: 4,
                mtu: 1400,
                inner_src: CLIENT,
                inner_dst: VIP,
                inner_ports: (40000, 80),
            }
        );
        // A packet that fits goes through; one without DF is left to the stack to fragment.
        let fits = padded(frame(in_mac, CLIENT, VIP, tcp(40000, 80, ACK)), 1400);
        assert_eq!(h.run(&fits, h.in_index).0, XDP_REDIRECT);
        let mut no_df = big.clone();
        no_df[20] = 0;
        fix_ip_checksum(&mut no_df);
        assert_eq!(h.run(&no_df, h.in_index).0, XDP_PASS);
        assert_eq!(h.counters().icmp_too_big_sent, 1);
    });
}

#[test]
fn a_reply_too_big_for_the_client_side_gets_frag_needed_quoting_the_backend() {
    in_fresh_netns(|| {
        let h = harness();
        set_mtu("in0", 1400);
        let reply = padded(
            frame(h.out_mac, BACKEND_A, CLIENT, tcp(8080, 40000, ACK)),
            1500,
        );
        let (verdict, out) = h.run(&reply, h.out_index);
        assert_eq!(verdict, XDP_TX);
        let seen = parse_icmp(&out);
        assert_eq!(
            (
                seen.src,
                seen.dst,
                seen.mtu,
                seen.inner_src,
                seen.inner_dst,
                seen.inner_ports
            ),
            (CLIENT, BACKEND_A, 1400, BACKEND_A, CLIENT, (8080, 40000)),
            "the backend gets an error about its own packet"
        );
    });
}

#[test]
fn icmp_errors_about_balanced_flows_are_translated_both_ways() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        // A TCP and a UDP flow.
        let tcp_backend = establish(&h, 40000, 80);
        let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, udp(40001, 53)), h.in_index);
        let udp_backend = parse_valid(&out).dst;

        // A router on the client's side cannot pass the VIP's replies.
        let router = [10, 10, 0, 254];
        for (about, backend, ports) in [
            (tcp(80, 40000, ACK), tcp_backend, (8080, 40000)),
            (udp(53, 40001), udp_backend, (8080, 40001)),
        ] {
            let reply = frame(h.out_mac, VIP, CLIENT, about);
            let err = icmp_error(in_mac, router, VIP, (3, 4, 1280), &reply);
            let (verdict, out) = h.run(&err, h.in_index);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(&out[0..6], &BACKEND_MAC[..]);
            let seen = parse_icmp(&out);
            assert_eq!(
                (
                    seen.src,
                    seen.dst,
                    seen.inner_src,
                    seen.inner_dst,
                    seen.inner_ports,
                    seen.mtu
                ),
                (router, backend, backend, CLIENT, ports, 1280),
                "to the backend, about its own packet"
            );
        }
        // The quoted UDP checksum was updated with the address and port.
        let reply = frame(h.out_mac, VIP, CLIENT, udp(53, 40001));
        let (_, out) = h.run(
            &icmp_error(in_mac, router, VIP, (11, 0, 0), &reply),
            h.in_index,
        );
        let direct = frame(h.out_mac, udp_backend, CLIENT, udp(8080, 40001));
        assert_eq!(
            &out[62..70],
            &direct[34..42],
            "quoted UDP header as the backend sent it"
        );

        // A router on the backends' side cannot pass a packet to the backend.
        let router = [10, 20, 0, 254];
        let to_backend = frame(h.out_mac, CLIENT, BACKEND_A, udp(40002, 8080));
        let err = icmp_error(h.out_mac, router, CLIENT, (3, 1, 0), &to_backend);
        let (verdict, out) = h.run(&err, h.out_index);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(&out[0..6], &CLIENT_MAC[..]);
        let seen = parse_icmp(&out);
        assert_eq!(
            (
                seen.src,
                seen.dst,
                seen.inner_src,
                seen.inner_dst,
                seen.inner_ports
            ),
            (router, CLIENT, CLIENT, VIP, (40002, 53)),
            "to the client, about the packet it sent to the VIP"
        );

        // About a flow nobody knows: passed untouched.
        let stranger = frame(h.out_mac, VIP, [10, 10, 0, 77], tcp(80, 1234, ACK));
        let err = icmp_error(in_mac, router, VIP, (3, 4, 1280), &stranger);
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

/// A UDP datagram with `payload_len` bytes of payload, cut into IPv4 fragments of at most 1480
/// payload bytes (an MTU of 1500), as the sender's kernel does: one frame per fragment, IP id
/// `id`, the UDP checksum over the whole datagram in the first.
fn udp_fragments(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    (src, src_port): ([u8; 4], u16),
    (dst, dst_port): ([u8; 4], u16),
    payload_len: usize,
    id: u16,
) -> Vec<Vec<u8>> {
    use slb_common::checksum::{internet_checksum, ipv4_pseudo_header_sum};
    let mut seg = Vec::new();
    seg.extend_from_slice(&src_port.to_be_bytes());
    seg.extend_from_slice(&dst_port.to_be_bytes());
    seg.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend((0..payload_len).map(|i| (i * 7) as u8));
    let c = internet_checksum(ipv4_pseudo_header_sum(src, dst, 17, seg.len() as u16), &seg);
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    let chunks: Vec<&[u8]> = seg.chunks(1480).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(k, chunk)| {
            let more = if k + 1 < chunks.len() { 0x2000 } else { 0 };
            let frag_off = more | (k * 1480 / 8) as u16;
            let mut f = Vec::new();
            f.extend_from_slice(&dst_mac);
            f.extend_from_slice(&src_mac);
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            f.extend_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&frag_off.to_be_bytes());
            f.extend_from_slice(&[64, 17, 0, 0]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&dst);
            f.extend_from_slice(chunk);
            fix_ip_checksum(&mut f);
            f
        })
        .collect()
}

/// Checks that `frames` are the fragments of one datagram with valid IP header checksums, the
/// same addresses and TTL, and reassemble into a UDP datagram with a valid checksum. Returns
/// (src, src port, dst, dst port, ttl) of the reassembled datagram.
fn reassemble_udp(frames: &[Vec<u8>]) -> ([u8; 4], u16, [u8; 4], u16, u8) {
    use slb_common::checksum::{internet_checksum, ipv4_pseudo_header_sum};
    let ip = |f: &Vec<u8>| f[14..34].to_vec();
    let (src, dst) = (&ip(&frames[0])[12..16], &ip(&frames[0])[16..20]);
    let mut seg = Vec::new();
    for f in frames {
        assert_eq!(
            internet_checksum(0, &f[14..34]),
            0,
            "IP header checksum of {f:02x?}"
        );
        assert_eq!(
            (&f[26..30], &f[30..34]),
            (src, dst),
            "every fragment has the same addresses"
        );
        assert_eq!(f[22], frames[0][22], "every fragment has the same TTL");
        let frag_off = u16::from_be_bytes([f[20], f[21]]);
        assert_eq!(
            usize::from(frag_off & 0x1fff) * 8,
            seg.len(),
            "fragments in order"
        );
        seg.extend_from_slice(&f[34..]);
    }
    let src: [u8; 4] = src.try_into().unwrap();
    let dst: [u8; 4] = dst.try_into().unwrap();
    assert_eq!(usize::from(u16::from_be_bytes([seg[4], seg[5]])), seg.len());
    let sum = ipv4_pseudo_header_sum(src, dst, 17, seg.len() as u16);
    assert_eq!(
        internet_checksum(sum, &seg),
        0,
        "UDP checksum of the reassembled datagram"
    );
    let port = |at: usize| u16::from_be_bytes([seg[at], seg[at + 1]]);
    (src, port(0), dst, port(2), frames[0][22])
}

#[test]
fn fragmented_udp_is_balanced_and_its_fragmented_replies_translated() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let request = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41000), (VIP, 53), 3000, 7);
        assert_eq!(request.len(), 3);
        let mut out = Vec::new();
        for f in &request {
            let (verdict, o) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(o[..6], BACKEND_MAC, "sent to the backend's MAC");
            out.push(o);
        }
        let (src, src_port, backend, dst_port, ttl) = reassemble_udp(&out);
        assert!(
            backend == BACKEND_A || backend == BACKEND_B,
            "{}",
            ipv4(backend)
        );
        assert_eq!((src, src_port, dst_port, ttl), (CLIENT, 41000, 8080, 63));

        // The backend's answer, fragmented too, leaves as VIP:53 in every fragment.
        let reply = udp_fragments(
            BACKEND_MAC,
            h.out_mac,
            (backend, 8080),
            (CLIENT, 41000),
            3000,
            9,
        );
        let mut out = Vec::new();
        for f in &reply {
            let (verdict, o) = h.run(f, h.out_index);
            assert_eq!(verdict, XDP_REDIRECT);
            assert_eq!(o[..6], CLIENT_MAC);
            out.push(o);
        }
        assert_eq!(reassemble_udp(&out), (VIP, 53, CLIENT, 41000, 63));
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
                c.replies_translated,
                c.fragments_dropped_orphan,
                c.fragments_passed
            ),
            (1, 0, 0)
        );
    });
}

#[test]
fn orphan_fragments_of_ours_are_dropped_and_foreign_fragments_pass_untouched() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        // Later fragments whose first fragment never came: to the VIP, and from a backend
        // (which would show the client the backend's address).
        let request = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41001), (VIP, 53), 3000, 11);
        let reply = udp_fragments(
            BACKEND_MAC,
            h.out_mac,
            (BACKEND_A, 8080),
            (CLIENT, 41001),
            3000,
            12,
        );
        for f in &request[1..] {
            assert_eq!(h.run(f, h.in_index).0, XDP_DROP);
        }
        for f in &reply[1..] {
            assert_eq!(h.run(f, h.out_index).0, XDP_DROP);
        }
        let c = h.counters();
        assert_eq!(c.fragments_dropped_orphan, 4, "{c:?}");
        assert_eq!((c.redirected, c.fragments_tracked), (0, 0), "{c:?}");

        // Not ours: to another address, and to a VIP port no listener has (whose later
        // fragments follow their first one, not the orphan rule).
        let other = udp_fragments(
            CLIENT_MAC,
            in_mac,
            (CLIENT, 41002),
            ([10, 10, 0, 1], 53),
            3000,
            13,
        );
        let no_listener = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41002), (VIP, 54), 3000, 14);
        for f in other.iter().chain(&no_listener) {
            let (verdict, out) = h.run(f, h.in_index);
            assert_eq!(verdict, XDP_PASS);
            assert_eq!(&out, f, "passed unmodified");
        }
        let c = h.counters();
        assert_eq!(
            (c.fragments_passed, c.fragments_dropped_orphan),
            (6, 4),
            "{c:?}"
        );

        // A datagram whose first fragment is dropped (no backend) loses its later ones too.
        let mut f = udp_fragments(CLIENT_MAC, in_mac, (CLIENT, 41003), (VIP, 53), 3000, 15);
        // A TCP first fragment to the drained listener: TCP fragments are handled as UDP ones.
        for (k, frame) in f.iter_mut().enumerate() {
            frame[14 + 9] = 6;
            if k == 0 {
                // A TCP header: ports, seq, ack, data offset 5, SYN.
                frame[36..38].copy_from_slice(&81u16.to_be_bytes());
                frame[46] = 0x50;
                frame[47] = SYN;
            }
            fix_ip_checksum(frame);
        }
        assert_eq!(h.run(&f[0], h.in_index).0, XDP_DROP);
        assert_eq!(h.run(&f[1], h.in_index).0, XDP_DROP);
        let c = h.counters();
        assert_eq!(
            (
                c.no_backend_dropped,
                c.fragments_dropped_with_first,
                c.fragments_dropped_orphan
            ),
            (1, 1, 4),
            "{c:?}"
        );
    });
}

#[test]
fn an_ack_flood_fills_only_the_half_open_table_and_a_taken_over_flow_is_tracked() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        // One established flow.
        establish(&h, 40000, 80);
        // Spoofed ACKs, one per flow: balanced, but none enters the connection table.
        let mut f = frame(in_mac, [172, 16, 0, 0], VIP, tcp(1024, 80, ACK));
        for i in 0..20_000u32 {
            f[27..30].copy_from_slice(&i.to_be_bytes()[1..]);
            assert_eq!(h.run(&f, h.in_index).0, XDP_REDIRECT);
        }
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), 1);
        // A flow another node started (its SYN never came here): tracked from its second packet,
        // on the backend the ring gives its first.
        let (_, first) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40001, 80, ACK)), h.in_index);
        let (_, second) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40001, 80, ACK)), h.in_index);
        assert_eq!(parse_valid(&first).dst, parse_valid(&second).dst);
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), 2);
        let web = h
            .reconciler
            .state()
            .listeners
            .iter()
            .find(|l| l.name == "web")
            .unwrap()
            .index;
        let stats = h.reconciler.maps().counters.listener(web).unwrap();
        assert_eq!(stats.new_connections, 2, "{stats:?}");
    });
}

#[test]
fn a_listener_added_or_removed_by_a_reload_is_seen_by_the_endpoint_filter() {
    in_fresh_netns(|| {
        let mut h = harness();
        let in_mac = mac_of("in0");
        let to_late = frame(in_mac, CLIENT, VIP, tcp(47000, 85, SYN));
        let (verdict, out) = h.run(&to_late, h.in_index);
        assert_eq!(
            (verdict, &out),
            (XDP_PASS, &to_late),
            "no listener on :85 yet"
        );

        let with_late = format!(
            "{}[[listeners]]\nname = \"late\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = 85\ngroup = \"late\"\n[[groups]]\nname = \"late\"\nbackends = [{{ address = \"10.20.0.3\", port = 8085 }}]\n",
            config(1, 1)
        );
        h.reconciler
            .apply(
                &Config::parse(&with_late, "test").unwrap(),
                &Default::default(),
            )
            .unwrap();
        let (verdict, out) = h.run(&to_late, h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(parse_valid(&out).dst, BACKEND_B);
        // Its backend's replies are recognised too.
        let reply = frame(h.out_mac, BACKEND_B, CLIENT, tcp(8085, 47000, SYN | ACK));
        let (_, out) = h.run(&reply, h.out_index);
        assert_eq!(parse_valid(&out).src_port, 85);

        h.reconciler
            .apply(
                &Config::parse(&config(1, 1), "test").unwrap(),
                &Default::default(),
            )
            .unwrap();
        let (verdict, out) = h.run(&to_late, h.in_index);
        assert_eq!(
            (verdict, &out),
            (XDP_PASS, &to_late),
            "the listener is gone"
        );
    });
}

#[test]
fn a_backend_behind_an_interface_slb_is_not_attached_to_is_left_to_the_stack() {
    in_fresh_netns(|| {
        let h = harness();
        // Both backends now route out of side0, which is not in the devmap.
        for args in [
            "link add side0 type veth peer name side1",
            "link set side0 up",
            "link set side1 up",
            "route add 10.20.0.0/24 dev side0",
            "neigh replace 10.20.0.2 lladdr 02:00:00:00:00:03 dev side0 nud permanent",
            "neigh replace 10.20.0.3 lladdr 02:00:00:00:00:03 dev side0 nud permanent",
        ] {
            let status = std::process::Command::new("ip")
                .args(args.split(' '))
                .status()
                .expect("ip");
            assert!(status.success(), "ip {args}");
        }
        let in_mac = mac_of("in0");
        let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40000, 80, SYN)), h.in_index);
        assert_eq!(verdict, XDP_PASS);
        let p = parse_valid(&out);
        assert!(
            p.dst == BACKEND_A || p.dst == BACKEND_B,
            "rewritten for the stack to forward: {}",
            ipv4(p.dst)
        );
        assert_eq!(
            (p.dst_mac, p.src_mac),
            (in_mac, CLIENT_MAC),
            "still addressed to this host, or the stack would not take it"
        );
        let c = h.counters();
        assert_eq!(
            (c.egress_not_attached_passed, c.redirected, c.fib_passed),
            (1, 0, 0)
        );
    });
}

#[test]
fn a_half_open_slot_is_used_only_when_its_check_holds() {
    in_fresh_netns(|| {
        let h = harness();
        let in_mac = mac_of("in0");
        let syn = frame(in_mac, CLIENT, VIP, tcp(41000, 80, SYN));
        let (_, out) = h.run(&syn, h.in_index);
        let picked = parse_valid(&out).dst;
        let other = if picked == BACKEND_A {
            BACKEND_B
        } else {
            BACKEND_A
        };
        let flow = slb_common::FlowKey::ipv4(CLIENT, VIP, 41000, 80, 6);
        let hash = slb_common::hash::flow_hash(&flow, 0);
        let slot = slb_common::half_open_slot(hash);
        let data = aya::maps::MapData::from_pin(h.pin_dir().join("HALF_OPEN")).expect("pinned");
        let mut table: aya::maps::Array<_, slb_common::HalfOpen> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("array");
        let held = table.get(&slot, 0).expect("slot");
        assert_eq!(held.flow, flow, "the SYN took its slot");
        let other_id = (0..16)
            .find(|&id| {
                h.reconciler
                    .maps()
                    .backends
                    .get(&id, 0)
                    .is_ok_and(|b| b.addr == slb_common::ipv4_mapped(other) && b.port == 8080)
            })
            .expect("the other backend's id");
        let ack = frame(in_mac, CLIENT, VIP, tcp(41000, 80, ACK));

        // A torn slot: the other backend's id under the check of the first pick. The ACK asks
        // the ring again, which gives the first pick.
        let torn = slb_common::HalfOpen {
            backend_id: other_id,
            ..held
        };
        table.set(slot, torn, 0).expect("write slot");
        let (_, out) = h.run(&ack, h.in_index);
        assert_eq!(parse_valid(&out).dst, picked, "a torn slot reads as empty");
        assert!(
            flow_entries(&h, "CONNECTIONS").is_empty(),
            "nor was it promoted"
        );

        // A whole slot naming the other backend is followed (and the flow enters the table).
        let whole = slb_common::HalfOpen {
            backend_id: other_id,
            check: slb_common::half_open_check(hash, other_id),
            ..held
        };
        table.set(slot, whole, 0).expect("write slot");
        let (_, out) = h.run(&ack, h.in_index);
        assert_eq!(parse_valid(&out).dst, other, "the slot's pick is kept");
        assert_eq!(flow_entries(&h, "CONNECTIONS").len(), 1);
    });
}

/// A DSR listener (VIP:85 over backend 10.20.0.2 on the segment, VIP:86 over 10.30.0.5 behind a
/// gateway).
const DSR_CONFIG: &str = r#"
instance = "pkt"
maglev_table_size = 1009
[[interfaces]]
name = "in0"
[[listeners]]
name = "direct"
protocol = "tcp"
vip = "10.99.0.10"
port = 85
group = "segment"
forwarding = "dsr"
health_check = { type = "tcp" }
[[listeners]]
name = "far"
protocol = "udp"
vip = "10.99.0.10"
port = 86
group = "beyond"
forwarding = "dsr"
health_check = { type = "udp" }
[[groups]]
name = "segment"
backends = [{ address = "10.20.0.2" }]
[[groups]]
name = "beyond"
backends = [{ address = "10.30.0.5" }]
"#;

#[test]
fn dsr_sends_the_packet_unchanged_to_the_backends_mac_and_only_on_the_link() {
    in_fresh_netns(|| {
        let h = Testbed::new(DSR_CONFIG, RING_SIZE).expect("testbed");
        let gateway = std::process::Command::new("ip")
            .args(["route", "add", "10.30.0.0/24", "via", "10.20.0.3"])
            .status()
            .expect("ip route");
        assert!(gateway.success());
        let in_mac = mac_of("in0");
        let sent = frame(in_mac, CLIENT, VIP, tcp(40000, 85, SYN));
        let (verdict, out) = h.run(&sent, h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
        let p = parse_valid(&out);
        assert_eq!(p.dst_mac, BACKEND_MAC, "to the backend's MAC address");
        assert_eq!(p.src_mac, h.out_mac);
        assert_eq!(
            out[12..],
            sent[12..],
            "the IP packet is the client's, byte for byte (VIP, port, TTL)"
        );
        assert_eq!((p.dst, p.dst_port, p.ttl), (VIP, 85, 64));
        let c = h.counters();
        assert_eq!(c.redirected, 1);
        assert_eq!(c.replies_translated, 0);

        // Through a gateway the packet would be routed back to the VIP: dropped, counted.
        let (verdict, _) = h.run(&frame(in_mac, CLIENT, VIP, udp(40001, 86)), h.in_index);
        assert_eq!(verdict, XDP_DROP);
        let c = h.counters();
        assert_eq!((c.dsr_backend_off_link, c.redirected), (1, 1));
    });
}

/// Full NAT listeners: TCP with a deliberately tiny port range (two ports), UDP with more.
const FULLNAT_CONFIG: &str = r#"
instance = "pkt"
maglev_table_size = 1009
[[interfaces]]
name = "in0"
[[listeners]]
name = "fn-tcp"
protocol = "tcp"
vip = "10.99.0.10"
port = 90
group = "fn"
forwarding = "fullnat"
snat_addresses = ["10.20.0.1"]
snat_ports = "20000-20001"
[[listeners]]
name = "fn-udp"
protocol = "udp"
vip = "10.99.0.10"
port = 91
group = "fn"
forwarding = "fullnat"
snat_addresses = ["10.20.0.1", "10.20.0.9"]
snat_ports = "30000-30099"
[[groups]]
name = "fn"
backends = [{ address = "10.20.0.2", port = 8090 }]
"#;

#[test]
fn full_nat_rewrites_both_ends_keeps_the_mapping_and_counts_exhausted_ports() {
    in_fresh_netns(|| {
        let h = Testbed::new(FULLNAT_CONFIG, RING_SIZE).expect("testbed");
        let in_mac = mac_of("in0");
        let snat = [10, 20, 0, 1];

        let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40000, 90, SYN)), h.in_index);
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        let p = parse_valid(&out);
        assert_eq!(
            (p.src, p.dst, p.dst_port, p.ttl),
            (snat, BACKEND_A, 8090, 63)
        );
        assert!((20000..=20001).contains(&p.src_port), "{}", p.src_port);
        assert_eq!(p.dst_mac, BACKEND_MAC);
        let port = p.src_port;
        // The same flow keeps its mapping, packet after packet.
        for _ in 0..3 {
            let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40000, 90, ACK)), h.in_index);
            assert_eq!(
                (parse_valid(&out).src, parse_valid(&out).src_port),
                (snat, port)
            );
        }

        // The backend answers the SNAT endpoint; the client sees the VIP.
        let (verdict, out) = h.run(
            &frame(h.out_mac, BACKEND_A, snat, tcp(8090, port, SYN | ACK)),
            h.out_index,
        );
        assert_eq!(verdict, XDP_REDIRECT, "{:?}", h.counters());
        let r = parse_valid(&out);
        assert_eq!(
            (r.src, r.src_port, r.dst, r.dst_port),
            (VIP, 90, CLIENT, 40000)
        );
        assert_eq!((r.dst_mac, r.ttl), (CLIENT_MAC, 63));

        // A second client flow takes the other port; a third finds none.
        let (_, out) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40001, 90, SYN)), h.in_index);
        let other = parse_valid(&out).src_port;
        assert_eq!(
            [port.min(other), port.max(other)],
            [20000, 20001],
            "the two ports"
        );
        let (verdict, _) = h.run(&frame(in_mac, CLIENT, VIP, tcp(40002, 90, SYN)), h.in_index);
        assert_eq!(verdict, XDP_DROP);
        // A reply to an SNAT port nobody holds is no one's: passed, untouched.
        let stray = frame(h.out_mac, BACKEND_A, snat, tcp(8090, 20555, ACK));
        assert_eq!(h.run(&stray, h.out_index), (XDP_PASS, stray.clone()));

        // UDP over two SNAT addresses.
        let (verdict, out) = h.run(&frame(in_mac, CLIENT, VIP, udp(41000, 91)), h.in_index);
        assert_eq!(verdict, XDP_REDIRECT);
        let u = parse_valid(&out);
        assert!(u.src == snat || u.src == [10, 20, 0, 9], "{:?}", u.src);
        assert!((30000..=30099).contains(&u.src_port));
        let (verdict, out) = h.run(
            &frame(h.out_mac, BACKEND_A, u.src, udp(8090, u.src_port)),
            h.out_index,
        );
        assert_eq!(verdict, XDP_REDIRECT);
        let ur = parse_valid(&out);
        assert_eq!(
            (ur.src, ur.src_port, ur.dst, ur.dst_port),
            (VIP, 91, CLIENT, 41000)
        );

        let c = h.counters();
        assert_eq!(
            (
                c.snat_mappings_made,
                c.snat_ports_exhausted,
                c.snat_replies_translated
            ),
            (3, 1, 2),
            "{c:?}"
        );
        assert_eq!(c.replies_translated, 0, "no reply went by endpoint");
    });
}
