//! The decision order on synthetic map contents, and the argument syntax.

use std::collections::HashMap;

use slb_common::{ipv4_mapped, HEALTH_UP, LISTENER_F_DSR};

use super::*;

const NOW: u64 = 1_000_000_000_000;
const SIZE: u32 = 13;

#[derive(Default)]
struct Fake {
    connections: HashMap<FlowKey, Connection>,
    half_open: HashMap<u32, HalfOpen>,
    persistence: HashMap<(PersistTable, PersistKey), Persisted>,
    backends: HashMap<u32, Backend>,
    health: HashMap<u32, u32>,
    ring: Vec<u32>,
    /// (set, client address) pairs the access lists hold.
    acl: Vec<(u32, Addr)>,
    new_flow_limit: Option<NewFlowLimit>,
    /// BACKEND_CONNECTIONS by id (absent: 0).
    open: HashMap<u32, u32>,
    /// The live ring's WLC set.
    wlc: Option<WlcSet>,
}

impl FlowMaps for Fake {
    fn connection(&self, flow: &FlowKey) -> Option<Connection> {
        self.connections.get(flow).copied()
    }
    fn half_open(&self, slot: u32) -> Option<HalfOpen> {
        Some(self.half_open.get(&slot).copied().unwrap_or_default())
    }
    fn persisted(&self, table: PersistTable, key: &PersistKey) -> Option<Persisted> {
        self.persistence.get(&(table, *key)).copied()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        Some(self.backends.get(&id).copied().unwrap_or_default())
    }
    fn health(&self, id: u32) -> u32 {
        self.health.get(&id).copied().unwrap_or(HEALTH_UP)
    }
    fn ring_slot(&self, ring_index: u32, slot: u32) -> Option<u32> {
        assert_eq!(ring_index, 1, "the listener's live ring");
        self.ring.get(slot as usize).copied()
    }
    fn acl_lists(&self, set: u32, client: &Addr) -> bool {
        self.acl.contains(&(set, *client))
    }
    fn new_flow_limit(&self, _index: u32) -> Option<NewFlowLimit> {
        self.new_flow_limit
    }
    fn open_connections(&self, id: u32) -> u32 {
        self.open.get(&id).copied().unwrap_or(0)
    }
    fn wlc_set(&self, ring_index: u32) -> Option<WlcSet> {
        assert_eq!(ring_index, 1, "the listener's live ring's set");
        self.wlc
    }
}

fn backend(last: u8, flags: u8) -> Backend {
    Backend {
        addr: ipv4_mapped([10, 0, 0, last]),
        port: 8080,
        flags,
        ..Default::default()
    }
}

/// Backends 1, 2, 3 present, 4 present and draining; a ring of 13 slots cycling 1, 2, 3.
fn fake() -> Fake {
    let mut maps = Fake::default();
    for id in 1..=3 {
        maps.backends
            .insert(id, backend(id as u8, BACKEND_F_PRESENT));
    }
    maps.backends
        .insert(4, backend(4, BACKEND_F_PRESENT | BACKEND_F_DRAINING));
    maps.ring = (0..SIZE).map(|slot| slot % 3 + 1).collect();
    maps
}

fn listener(flags: u32) -> ListenerEntry {
    ListenerEntry {
        index: 7,
        ring_index: 1,
        ring_size: SIZE,
        flags,
        persist_timeout_s: 60,
        ..Default::default()
    }
}

fn flow(port: u16) -> FlowKey {
    FlowKey::ipv4([198, 51, 100, 7], [192, 0, 2, 10], port, 80, IPPROTO_TCP)
}

fn ring_slot_of(flow: &FlowKey) -> u32 {
    flow_hash(flow, FLOW_HASH_SEED) % SIZE
}

fn connection(id: u32, last_seen_ns: u64) -> Connection {
    Connection {
        backend_id: id,
        listener_index: 7,
        last_seen_ns,
        flags: 0,
        _pad: 0,
    }
}

fn persisted(id: u32, age_s: u64) -> Persisted {
    Persisted {
        backend_id: id,
        _pad: 0,
        last_seen_ns: NOW - age_s * 1_000_000_000,
    }
}

fn persist_key(flow: &FlowKey) -> PersistKey {
    PersistKey {
        client: flow.src,
        listener_index: 7,
    }
}

fn half_open_entry(flow: &FlowKey, id: u32) -> (u32, HalfOpen) {
    let hash = flow_hash(flow, FLOW_HASH_SEED);
    let entry = HalfOpen {
        flow: *flow,
        backend_id: id,
        check: half_open_check(hash, id),
        _pad: [0; 4],
    };
    (half_open_slot(hash), entry)
}

fn decide_for(maps: &impl FlowMaps, f: &FlowKey, l: &ListenerEntry) -> Decision {
    decide(maps, f, &f.src, l, NOW)
}

#[test]
fn a_new_flow_takes_its_ring_slot_of_the_shared_flow_hash() {
    let maps = fake();
    for port in 40000..40050 {
        let f = flow(port);
        let slot = ring_slot_of(&f);
        let d = decide_for(&maps, &f, &listener(0));
        assert_eq!(d.backend, Ok(maps.ring[slot as usize]), "port {port}");
        assert_eq!(d.via, Some(Via::Ring { slot, size: SIZE }));
        assert_eq!(d.repicked_from, None);
    }
}

#[test]
fn the_connection_table_comes_first_and_keeps_its_backend() {
    let mut maps = fake();
    let f = flow(40000);
    let ring_pick = maps.ring[ring_slot_of(&f) as usize];
    let other = ring_pick % 3 + 1;
    maps.connections
        .insert(f, connection(other, NOW - 3_200_000_000));
    // Persistence and the half-open table name yet another backend: not asked.
    let (slot, entry) = half_open_entry(&f, ring_pick);
    maps.half_open.insert(slot, entry);
    maps.persistence.insert(
        (PersistTable::Established, persist_key(&f)),
        persisted(ring_pick, 1),
    );
    let d = decide_for(&maps, &f, &listener(LISTENER_F_PERSIST));
    assert_eq!(d.backend, Ok(other));
    assert_eq!(
        d.via,
        Some(Via::Connection {
            age_ns: 3_200_000_000,
            closing: false
        })
    );
    // Closing flows keep their backend too, and say so.
    maps.connections.get_mut(&f).unwrap().flags = CONN_F_CLOSING;
    let d = decide_for(&maps, &f, &listener(0));
    assert!(matches!(d.via, Some(Via::Connection { closing: true, .. })));
}

#[test]
fn a_connection_to_an_unusable_backend_is_balanced_again() {
    let f = flow(40001);
    let ring_pick = fake().ring[ring_slot_of(&f) as usize];
    let other = ring_pick % 3 + 1;

    // Removed (no longer present).
    let mut maps = fake();
    maps.connections.insert(f, connection(other, NOW));
    maps.backends.get_mut(&other).unwrap().flags = 0;
    let d = decide_for(&maps, &f, &listener(0));
    assert_eq!(d.backend, Ok(ring_pick));
    assert_eq!(d.repicked_from, Some(other));
    assert!(matches!(d.via, Some(Via::Ring { .. })));

    // Unhealthy: balanced again, unless the listener ignores health (all its backends down).
    let mut maps = fake();
    maps.connections.insert(f, connection(other, NOW));
    maps.health.insert(other, HEALTH_DOWN);
    assert_eq!(decide_for(&maps, &f, &listener(0)).backend, Ok(ring_pick));
    let d = decide_for(&maps, &f, &listener(LISTENER_F_IGNORE_HEALTH));
    assert_eq!(d.backend, Ok(other));
    assert!(matches!(d.via, Some(Via::Connection { .. })));
}

#[test]
fn the_half_open_table_holds_a_handshake_s_pick_while_its_slot_is_the_flow_s() {
    let mut maps = fake();
    let f = flow(40002);
    let ring_pick = maps.ring[ring_slot_of(&f) as usize];
    let other = ring_pick % 3 + 1;
    let (slot, entry) = half_open_entry(&f, other);
    maps.half_open.insert(slot, entry);
    let d = decide_for(&maps, &f, &listener(0));
    assert_eq!((d.backend, d.via), (Ok(other), Some(Via::HalfOpen)));

    // A torn slot (check word of another backend) reads as empty.
    let mut torn = entry;
    torn.check ^= 1;
    maps.half_open.insert(slot, torn);
    assert_eq!(decide_for(&maps, &f, &listener(0)).backend, Ok(ring_pick));

    // Another flow took the slot over.
    let mut taken = entry;
    taken.flow.src_port += 1;
    maps.half_open.insert(slot, taken);
    assert_eq!(decide_for(&maps, &f, &listener(0)).backend, Ok(ring_pick));

    // Its backend was removed since: the ring again, noted.
    maps.half_open.insert(slot, entry);
    maps.backends.get_mut(&other).unwrap().flags = 0;
    let d = decide_for(&maps, &f, &listener(0));
    assert_eq!((d.backend, d.repicked_from), (Ok(ring_pick), Some(other)));
}

#[test]
fn active_standby_follows_the_active_s_health_only() {
    let mut maps = fake();
    let mut l = listener(LISTENER_F_ACTIVE_STANDBY);
    l.active_id = 2;
    l.standby_id = 3;
    let f = flow(40003);
    let d = decide_for(&maps, &f, &l);
    assert_eq!(d.backend, Ok(2));
    assert_eq!(
        d.via,
        Some(Via::ActiveStandby {
            active: 2,
            active_healthy: true
        })
    );
    maps.health.insert(2, HEALTH_DOWN);
    let d = decide_for(&maps, &f, &l);
    assert_eq!(d.backend, Ok(3));
    assert_eq!(
        d.via,
        Some(Via::ActiveStandby {
            active: 2,
            active_healthy: false
        })
    );
    // A standby that is not present: the data plane drops (a failed lookup).
    maps.backends.get_mut(&3).unwrap().flags = 0;
    assert_eq!(
        decide_for(&maps, &f, &l).backend,
        Err(NoBackend::NotPresent { id: 3 })
    );
}

#[test]
fn persistence_holds_while_fresh_and_usable_established_before_pending() {
    let f = flow(40004);
    let ring_pick = fake().ring[ring_slot_of(&f) as usize];
    let other = ring_pick % 3 + 1;
    let third = other % 3 + 1;
    let l = listener(LISTENER_F_PERSIST);
    let key = persist_key(&f);

    let mut maps = fake();
    maps.persistence
        .insert((PersistTable::Pending, key), persisted(third, 5));
    let d = decide_for(&maps, &f, &l);
    assert_eq!(d.backend, Ok(third));
    assert_eq!(
        d.via,
        Some(Via::Persistence {
            table: PersistTable::Pending,
            client: f.src,
            age_ns: 5_000_000_000
        })
    );
    maps.persistence
        .insert((PersistTable::Established, key), persisted(other, 10));
    let d = decide_for(&maps, &f, &l);
    assert_eq!(d.backend, Ok(other));
    assert!(matches!(
        d.via,
        Some(Via::Persistence {
            table: PersistTable::Established,
            ..
        })
    ));

    // Stale entries, a draining or unhealthy backend, or a listener without persistence: the
    // ring.
    let mut stale = fake();
    stale
        .persistence
        .insert((PersistTable::Established, key), persisted(other, 61));
    assert_eq!(decide_for(&stale, &f, &l).backend, Ok(ring_pick));
    let mut draining = fake();
    draining
        .persistence
        .insert((PersistTable::Established, key), persisted(4, 1));
    assert_eq!(decide_for(&draining, &f, &l).backend, Ok(ring_pick));
    let mut down = fake();
    down.persistence
        .insert((PersistTable::Established, key), persisted(other, 1));
    down.health.insert(other, HEALTH_DOWN);
    assert_eq!(decide_for(&down, &f, &l).backend, Ok(ring_pick));
    assert_eq!(decide_for(&maps, &f, &listener(0)).backend, Ok(ring_pick));
}

#[test]
fn an_empty_slot_or_a_missing_ring_has_no_backend() {
    let f = flow(40005);
    let slot = ring_slot_of(&f);
    let mut maps = fake();
    maps.ring[slot as usize] = NO_BACKEND;
    let d = decide_for(&maps, &f, &listener(LISTENER_F_DSR));
    assert_eq!(d.backend, Err(NoBackend::EmptySlot { slot, size: SIZE }));
    maps.ring.clear();
    assert_eq!(
        decide_for(&maps, &f, &listener(0)).backend,
        Err(NoBackend::NoRing)
    );
    let mut no_ring = listener(0);
    no_ring.ring_size = 0;
    assert_eq!(
        decide_for(&maps, &f, &no_ring).backend,
        Err(NoBackend::NoRing)
    );
}

#[test]
fn without_a_backend_only_its_flows_and_its_slots_move() {
    let maps = fake();
    // The ring without backend 2: its slots go to 1 and 3.
    let ring: Vec<u32> = maps
        .ring
        .iter()
        .enumerate()
        .map(|(i, &id)| if id == 2 { [1, 3][i % 2] } else { id })
        .collect();
    let mut maps = maps;
    let (mut on_2, mut elsewhere) = (None, None);
    for port in 41000..41100 {
        let f = flow(port);
        match maps.ring[ring_slot_of(&f) as usize] {
            2 => on_2 = Some(f),
            _ => elsewhere = Some(f),
        }
    }
    let (on_2, elsewhere) = (on_2.unwrap(), elsewhere.unwrap());
    let view = Without {
        maps: &maps,
        removed: 2,
        ring: &ring,
    };
    let l = listener(0);
    let new = decide_for(&view, &on_2, &l);
    assert_eq!(new.backend, Ok(ring[ring_slot_of(&on_2) as usize]));
    assert_ne!(new.backend, Ok(2));
    assert_eq!(
        decide_for(&view, &elsewhere, &l).backend,
        decide_for(&maps, &elsewhere, &l).backend
    );

    // An established flow on 2 is balanced again; one on 3 whose slot is 2's keeps 3.
    maps.connections.insert(on_2, connection(2, NOW));
    let view = Without {
        maps: &maps,
        removed: 2,
        ring: &ring,
    };
    let d = decide_for(&view, &on_2, &l);
    assert_eq!(d.repicked_from, Some(2));
    assert_eq!(d.backend, new.backend);
    maps.connections.insert(on_2, connection(3, NOW));
    let view = Without {
        maps: &maps,
        removed: 2,
        ring: &ring,
    };
    assert_eq!(decide_for(&view, &on_2, &l).backend, Ok(3));
}

#[test]
fn flow_keys_are_the_data_plane_s() {
    let to: ListenerAddr = "192.0.2.10:80/tcp".parse().unwrap();
    let key = flow_key("198.51.100.7:40000".parse().unwrap(), &to).unwrap();
    assert_eq!(
        key,
        FlowKey::ipv4([198, 51, 100, 7], [192, 0, 2, 10], 40000, 80, IPPROTO_TCP)
    );
    assert_eq!(key.src, ipv4_mapped([198, 51, 100, 7]));
    let to6: ListenerAddr = "[2001:db8::10]:53/UDP".parse().unwrap();
    let client6: SocketAddr = "[2001:db8:1:2::7]:40000".parse().unwrap();
    let key6 = flow_key(client6, &to6).unwrap();
    let std::net::IpAddr::V6(src) = client6.ip() else {
        unreachable!()
    };
    assert_eq!(key6.src, src.octets());
    assert_eq!((key6.src_port, key6.dst_port), (40000, 53));
    assert_eq!(key6.protocol, IPPROTO_UDP);
    assert!(flow_key(client6, &to).is_none(), "families differ");

    // An IPv6 client persists by its prefix.
    let mut l = listener(LISTENER_F_PERSIST);
    l.persist_ipv6_prefix = 64;
    let client = persistence_client(&key6, &l, true);
    let expected: std::net::Ipv6Addr = "2001:db8:1:2::".parse().unwrap();
    assert_eq!(client, expected.octets());
    assert_eq!(persistence_client(&key6, &listener(0), true), key6.src);
}

#[test]
fn listener_and_client_syntax_errors_name_the_expected_form() {
    for bad in [
        "192.0.2.10:80",
        "192.0.2.10/tcp",
        "192.0.2.10:80/sctp",
        "vip:80/tcp",
    ] {
        let e = bad.parse::<ListenerAddr>().unwrap_err();
        assert!(e.contains("expected VIP:PORT/tcp"), "{bad}: {e}");
    }
    let ok: ListenerAddr = "[2001:db8::10]:443/tcp".parse().unwrap();
    assert_eq!(ok.to_string(), "[2001:db8::10]:443/tcp");
    for bad in ["198.51.100.7", "2001:db8::7:40000", "[2001:db8::7]", "x:1"] {
        let e = parse_client(bad).unwrap_err();
        assert!(e.contains("expected ADDR:PORT"), "{bad}: {e}");
    }
}

#[test]
fn answers_render_the_reason_in_a_line() {
    let reason = Reason::Ring {
        slot: 12345,
        size: 65537,
        backend_slots: 21846,
        table_share_pct: 33.33,
        weight_share_pct: Some(33.3),
    };
    assert_eq!(
        reason.to_string(),
        "ring: slot 12345 of 65537 → this backend, which holds 21846 slots (33.3 % of the \
         table; weight share 33.3 %)"
    );
    let reason = Reason::Connection {
        last_packet_ms: 3210,
        closing: false,
        idle_timeout_s: 900,
    };
    assert_eq!(
        reason.to_string(),
        "connection table: established, last packet 3.2 s ago (idle timeout 900 s)"
    );
}

fn applied_listener(name: &str, protocol: crate::config::Protocol, port: u16) -> AppliedListener {
    AppliedListener {
        name: name.into(),
        protocol,
        vip: "192.0.2.10".parse().unwrap(),
        port,
        group: "pool".into(),
        group_kind: GroupKind::Vserver,
        index: 0,
        ring: 0,
        ring_input: Vec::new(),
        flags: 0,
        persistence_timeout_s: None,
        idle_timeout_s: 90,
        health_check: false,
        snat: None,
        acl: None,
        new_flow_limit: None,
    }
}

#[test]
fn a_listener_is_found_by_vip_port_and_protocol_and_the_proxy_s_are_named_as_such() {
    use crate::applied::ProxyListenerInfo;
    use crate::config::Protocol;
    let state = AppliedState {
        instance: "web".into(),
        listeners: vec![
            applied_listener("dns", Protocol::Udp, 53),
            applied_listener("ssh", Protocol::Tcp, 22),
        ],
        proxy_listeners: vec![ProxyListenerInfo {
            name: "site".into(),
            protocol: Protocol::Https,
            vip: "192.0.2.10".parse().unwrap(),
            port: 443,
            cookie_persistence: false,
            backends: Vec::new(),
        }],
        ..Default::default()
    };
    let find = |to: &str| find_listener(&state, &to.parse().unwrap()).map(|l| l.name.clone());
    assert_eq!(find("192.0.2.10:53/udp").unwrap(), "dns");
    assert_eq!(find("192.0.2.10:22/tcp").unwrap(), "ssh");
    let e = find("192.0.2.10:443/tcp").unwrap_err().to_string();
    assert!(
        e.contains("HTTPS listener \"site\"") && e.contains("not by the XDP program"),
        "{e}"
    );
    let e = find("192.0.2.10:53/tcp").unwrap_err().to_string();
    assert!(
        e.starts_with("no listener 192.0.2.10:53/tcp in instance \"web\"; its listeners: ")
            && e.contains("dns 192.0.2.10:53/udp")
            && e.contains("ssh 192.0.2.10:22/tcp")
            && e.contains("site 192.0.2.10:443 (https, the proxy's)"),
        "{e}"
    );
}

#[test]
fn an_access_list_refuses_before_any_table_unless_it_keeps_the_established_flow() {
    use slb_common::{
        LISTENER_F_ACL_ALLOW, LISTENER_F_ACL_CUT_ESTABLISHED, LISTENER_F_ACL_DENY,
        LISTENER_F_ACL_SET,
    };
    let mut maps = fake();
    let (known, new) = (flow(41000), flow(41001));
    maps.connections.insert(known, connection(2, NOW));
    // The client is listed in set 1 of listener 7 (its second set).
    maps.acl.push((7 * 2 + 1, known.src));
    let deny = listener(LISTENER_F_ACL_DENY | LISTENER_F_ACL_SET);
    assert_eq!(
        decide_for(&maps, &known, &deny).backend,
        Ok(2),
        "established: kept"
    );
    assert_eq!(
        decide_for(&maps, &new, &deny).backend,
        Err(NoBackend::AclRefused {
            allow_list: false,
            cut: false
        })
    );
    let cut = listener(LISTENER_F_ACL_DENY | LISTENER_F_ACL_SET | LISTENER_F_ACL_CUT_ESTABLISHED);
    assert_eq!(
        decide_for(&maps, &known, &cut).backend,
        Err(NoBackend::AclRefused {
            allow_list: false,
            cut: true
        })
    );
    // Listed in the set the listener uses, an allow list admits; in the other set, it refuses.
    let allow = listener(LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_SET);
    assert_eq!(
        decide_for(&maps, &new, &allow).backend,
        Ok(maglev_owner(&maps, &new))
    );
    assert_eq!(
        decide_for(&maps, &new, &listener(LISTENER_F_ACL_ALLOW)).backend,
        Err(NoBackend::AclRefused {
            allow_list: true,
            cut: false
        })
    );
}

fn maglev_owner(maps: &Fake, f: &FlowKey) -> u32 {
    maps.ring[ring_slot_of(f) as usize]
}

#[test]
fn an_empty_bucket_refuses_new_flows_only() {
    let mut maps = fake();
    let (known, new) = (flow(42000), flow(42001));
    maps.connections.insert(known, connection(3, NOW));
    let limited = listener(slb_common::LISTENER_F_NEW_FLOW_LIMIT);
    // 100 a second, bursts of 10: a bucket ten intervals ahead of now is empty.
    let limit = |ahead_ns: u64| NewFlowLimit {
        interval_ns: 10_000_000,
        burst_ns: 9 * 10_000_000,
        next_ns: NOW + ahead_ns,
    };
    maps.new_flow_limit = Some(limit(90_000_000));
    assert_eq!(
        decide_for(&maps, &new, &limited).backend,
        Ok(maglev_owner(&maps, &new))
    );
    maps.new_flow_limit = Some(limit(100_000_000));
    assert_eq!(
        decide_for(&maps, &new, &limited).backend,
        Err(NoBackend::RateLimited { per_second: 100 })
    );
    assert_eq!(
        decide_for(&maps, &known, &limited).backend,
        Ok(3),
        "known flows go on"
    );
}

/// `fake()` with the ring's input as its WLC set: 1 (weight 1), 2 (weight 2), 3 (weight 1),
/// with `open` connections each.
fn wlc_fake(open: [u32; 3]) -> Fake {
    let mut maps = fake();
    let mut set = WlcSet::default();
    for (i, weight) in [1, 2, 1].into_iter().enumerate() {
        set.members[i] = slb_common::WlcMember {
            id: i as u32 + 1,
            weight,
        };
        maps.open.insert(i as u32 + 1, open[i]);
    }
    set.count = 3;
    maps.wlc = Some(set);
    maps
}

#[test]
fn a_wlc_listener_sends_a_new_flow_to_the_fewest_connections_per_weight() {
    // Per weight: 5, 3, 4.
    let maps = wlc_fake([5, 6, 4]);
    let f = flow(40000);
    let d = decide_for(&maps, &f, &listener(LISTENER_F_WLC));
    assert_eq!(d.backend, Ok(2));
    assert_eq!(
        d.via,
        Some(Via::LeastConnections {
            open: 6,
            weight: 2,
            members: 3
        })
    );
    // A packet of a flow whose table entry is re-picked is no SYN: the ring.
    let mut maps = maps;
    maps.connections.insert(f, connection(9, NOW));
    let d = decide_for(&maps, &f, &listener(LISTENER_F_WLC));
    assert_eq!(
        d.via,
        Some(Via::Ring {
            slot: ring_slot_of(&f),
            size: SIZE
        })
    );
    assert_eq!(d.repicked_from, Some(9));
}

#[test]
fn least_connections_skips_unusable_members_and_spreads_ties_from_the_flow_hash() {
    let mut maps = wlc_fake([0, 0, 0]);
    // Weight per member equal: 1, 1, 1.
    maps.wlc.as_mut().unwrap().members[1].weight = 1;
    // Equally loaded: each flow's tie is drawn from its hash, the same for the flow every time,
    // and spread over the three.
    let mut chosen = std::collections::BTreeMap::new();
    for port in 40000..40090 {
        let f = flow(port);
        let d = decide_for(&maps, &f, &listener(LISTENER_F_WLC));
        assert_eq!(
            d.backend,
            decide_for(&maps, &f, &listener(LISTENER_F_WLC)).backend
        );
        *chosen.entry(d.backend.unwrap()).or_insert(0) += 1;
    }
    assert!(
        chosen.len() == 3 && chosen.values().all(|&n| n >= 15),
        "{chosen:?}"
    );
    maps.health.insert(2, HEALTH_DOWN);
    maps.open.insert(1, 9);
    let d = decide_for(&maps, &flow(40000), &listener(LISTENER_F_WLC));
    assert_eq!(d.backend, Ok(3), "2 is down, 1 is busier");
}

#[test]
fn a_new_flow_whose_pick_is_full_goes_to_the_least_loaded_with_room_or_is_dropped() {
    let f = flow(40000);
    let picked = fake().ring[ring_slot_of(&f) as usize];
    let mut maps = wlc_fake([3, 3, 3]);
    for id in 1..=3 {
        maps.backends.get_mut(&id).unwrap().max_connections = 3;
    }
    // Room on one backend other than the ring's pick.
    let other = picked % 3 + 1;
    maps.backends.get_mut(&other).unwrap().max_connections = 10;
    let d = decide_for(&maps, &f, &listener(LISTENER_F_MAX_CONNECTIONS));
    assert_eq!((d.backend, d.full), (Ok(other), Some(picked)));
    assert!(matches!(d.via, Some(Via::LeastConnections { open: 3, .. })));
    // Without the flag, nothing is checked.
    let d = decide_for(&maps, &f, &listener(0));
    assert_eq!((d.backend, d.full), (Ok(picked), None));
    // Every backend full: dropped.
    maps.backends.get_mut(&other).unwrap().max_connections = 3;
    let d = decide_for(&maps, &f, &listener(LISTENER_F_MAX_CONNECTIONS));
    assert_eq!(d.backend, Err(NoBackend::AtCapacity));
    let d = decide_for(
        &maps,
        &f,
        &listener(LISTENER_F_WLC | LISTENER_F_MAX_CONNECTIONS),
    );
    assert_eq!(d.backend, Err(NoBackend::AtCapacity));
    // An established flow keeps its backend, full or not.
    maps.connections.insert(f, connection(picked, NOW));
    let d = decide_for(&maps, &f, &listener(LISTENER_F_MAX_CONNECTIONS));
    assert_eq!((d.backend, d.full), (Ok(picked), None));
}
