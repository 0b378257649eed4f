//! Plans worked out without a map: ids, slots, rings, health flags and what is gone.

use super::*;
use crate::config::tests::GOOD;

/// GOOD (web: TCP on the pool 10.0.1.2:8080 weight 2 and 10.0.1.3:8080; dns: UDP on the
/// default group's 10.0.1.1) with an active-standby pair behind "db" and an HTTP listener.
fn config_text() -> String {
    let more = r#"
[[listeners]]
name = "db"
protocol = "tcp"
vip = "10.0.0.10"
port = 5432
group = "pair"
[[listeners]]
name = "site"
protocol = "http"
vip = "10.0.0.10"
port = 8000
[[groups]]
name = "pair"
type = "active-standby"
backends = [{ address = "10.0.3.1" }, { address = "10.0.3.2" }]
"#;
    format!("{GOOD}{more}")
}

const RING: u32 = 65537;

/// The ACL sets the entries of `applied` make live, as LISTENERS would hold them.
fn live_sets(applied: &AppliedMaps) -> LiveAclSets {
    applied
        .listeners
        .iter()
        .filter_map(|l| l.acl.as_ref().map(|a| (l.index, a.set)))
        .collect()
}

fn plan_of(
    text: &str,
    health: &BTreeMap<BackendKey, HealthStatus>,
    previous: &AppliedMaps,
) -> Plan {
    let config = Config::parse(text, "plan.toml").unwrap();
    plan(&config, health, previous, RING, &live_sets(previous)).unwrap()
}

fn key(listener: &str, address: &str, port: u16) -> BackendKey {
    BackendKey {
        listener: listener.into(),
        address: address.parse().unwrap(),
        port,
    }
}

fn id(plan: &Plan, key: &BackendKey) -> u32 {
    plan.applied
        .backends
        .iter()
        .find(|b| &b.key == key)
        .unwrap_or_else(|| panic!("{key:?} is not planned"))
        .id
}

fn listener<'a>(plan: &'a Plan, name: &str) -> &'a PlannedListener {
    plan.listeners.iter().find(|l| l.name == name).unwrap()
}

fn unhealthy(keys: &[BackendKey]) -> BTreeMap<BackendKey, HealthStatus> {
    keys.iter()
        .map(|k| {
            let verdict = HealthStatus {
                healthy: false,
                reason: "refused".into(),
                since_unix_ns: 0,
                confirmed: true,
                slow_start_percent: None,
            };
            (k.clone(), verdict)
        })
        .collect()
}

#[test]
fn a_first_plan_numbers_from_zero_and_leaves_http_listeners_to_the_proxy() {
    let plan = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let names: Vec<&str> = plan
        .applied
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(names, vec!["web", "dns", "db"]);
    let indices: Vec<u32> = plan.listeners.iter().map(|l| l.index).collect();
    assert_eq!(indices, vec![0, 1, 2]);
    // New ids go out in key order: db's, then dns's, then web's.
    assert_eq!(id(&plan, &key("db", "10.0.3.1", 5432)), 0);
    assert_eq!(id(&plan, &key("dns", "10.0.1.1", 53)), 2);
    assert_eq!(id(&plan, &key("web", "10.0.1.3", 8080)), 4);
    // Every Maglev listener builds its first ring; only Maglev listeners have rings.
    assert_eq!(listener(&plan, "web").rebuild, Some(0));
    assert_eq!(listener(&plan, "dns").rebuild, Some(0));
    assert_eq!(listener(&plan, "db").rebuild, None);
    assert_eq!(plan.ring_slots, vec![0, 1, 2, 3]);
    let web = listener(&plan, "web");
    assert_eq!(web.ring_identities, vec!["10.0.1.2:8080", "10.0.1.3:8080"]);
    assert_eq!(web.ring_input, vec![(3, 2), (4, 1)]);
    let db = listener(&plan, "db").entry;
    assert_eq!(
        db.flags & LISTENER_F_ACTIVE_STANDBY,
        LISTENER_F_ACTIVE_STANDBY
    );
    assert_eq!((db.active_id, db.standby_id), (0, 1));
    assert!(plan
        .backends
        .iter()
        .all(|(_, b)| b.flags == BACKEND_F_PRESENT));
    assert!(plan.health.iter().all(|(_, w)| *w == HealthWrite::Up));
    assert!(plan.gone_listeners.is_empty() && plan.gone_backend_ids.is_empty());
}

#[test]
fn a_weight_of_zero_drains_a_maglev_backend() {
    let drained = config_text().replace(
        "{ address = \"10.0.1.3\", port = 8080 }",
        "{ address = \"10.0.1.3\", port = 8080, weight = 0 }",
    );
    let plan = plan_of(&drained, &BTreeMap::new(), &AppliedMaps::default());
    let id = id(&plan, &key("web", "10.0.1.3", 8080));
    let backend = plan.backends.iter().find(|(i, _)| *i == id).unwrap().1;
    assert_eq!(backend.flags, BACKEND_F_PRESENT | BACKEND_F_DRAINING);
    assert_eq!(listener(&plan, "web").ring_input, vec![(3, 2), (id, 0)]);
}

#[test]
fn a_new_plan_keeps_ids_slots_and_rings_and_rebuilds_only_what_changed() {
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let reweighted = config_text().replace(
        "{ address = \"10.0.1.3\", port = 8080 }",
        "{ address = \"10.0.1.3\", port = 8080, weight = 3 }, \
         { address = \"10.0.1.4\", port = 8080 }",
    );
    let second = plan_of(&reweighted, &BTreeMap::new(), &first.applied);
    for b in &first.applied.backends {
        assert_eq!(id(&second, &b.key), b.id, "{:?}", b.key);
    }
    // The one new backend takes the lowest free id.
    assert_eq!(id(&second, &key("web", "10.0.1.4", 8080)), 5);
    let web = listener(&second, "web");
    assert_eq!((web.index, web.rebuild), (0, Some(1)));
    assert_eq!(web.entry.ring_index, ring_slot(0, 1));
    let dns = listener(&second, "dns");
    assert_eq!((dns.index, dns.rebuild), (1, None));
    assert_eq!(dns.entry.ring_index, ring_slot(1, 0));
    assert!(second.gone_backend_ids.is_empty());
}

#[test]
fn an_unhealthy_server_fails_over_first_and_a_maglev_backend_goes_down_after_the_rings() {
    let dead = [key("db", "10.0.3.1", 5432), key("web", "10.0.1.2", 8080)];
    let plan = plan_of(&config_text(), &unhealthy(&dead), &AppliedMaps::default());
    let write = |k: &BackendKey| {
        let id = id(&plan, k);
        plan.health.iter().find(|(i, _)| *i == id).unwrap().1
    };
    assert_eq!(write(&dead[0]), HealthWrite::DownFirst);
    assert_eq!(write(&dead[1]), HealthWrite::DownLast);
    assert_eq!(write(&key("web", "10.0.1.3", 8080)), HealthWrite::Up);
    assert_eq!(plan.health.last().unwrap().1, HealthWrite::DownLast);
    // The ring leaves the unhealthy backend out.
    assert_eq!(listener(&plan, "web").ring_input, vec![(3, 0), (4, 1)]);
}

#[test]
fn with_every_backend_down_a_listener_forwards_to_all_or_drops_as_configured() {
    let dead = [key("web", "10.0.1.2", 8080), key("web", "10.0.1.3", 8080)];
    let plan = plan_of(&config_text(), &unhealthy(&dead), &AppliedMaps::default());
    let web = listener(&plan, "web");
    assert_eq!(
        web.entry.flags & LISTENER_F_IGNORE_HEALTH,
        LISTENER_F_IGNORE_HEALTH
    );
    assert_eq!(web.ring_input, vec![(3, 2), (4, 1)]);

    let dropping = config_text().replace(
        "port = 80\ngroup = \"pool\"",
        "port = 80\ngroup = \"pool\"\non_all_unhealthy = \"drop\"",
    );
    let plan = plan_of(&dropping, &unhealthy(&dead), &AppliedMaps::default());
    let web = listener(&plan, "web");
    assert_eq!(web.entry.flags & LISTENER_F_IGNORE_HEALTH, 0);
    assert_eq!(web.ring_input, vec![(3, 0), (4, 0)]);
}

#[test]
fn what_the_config_no_longer_has_is_planned_away() {
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let without_dns = config_text().replace(
        "[[listeners]]\nname = \"dns\"\nprotocol = \"udp\"\nvip = \"10.0.0.10\"\nport = 53\n",
        "",
    );
    let second = plan_of(&without_dns, &BTreeMap::new(), &first.applied);
    let dns_key = listener_key(Protocol::Udp, "10.0.0.10".parse().unwrap(), 53);
    assert_eq!(
        second.gone_listeners,
        vec![GoneListener {
            index: 1,
            remove_key: Some(dns_key),
            free_ring_slots: vec![2, 3],
            clear_acl_sets: vec![],
        }]
    );
    assert_eq!(second.gone_backend_ids, vec![2]);
    let address: IpAddr = "10.0.1.1".parse().unwrap();
    assert_eq!(
        second.gone_replies,
        vec![(address, 53, slb_common::IPPROTO_UDP)]
    );
    assert_eq!(second.gone_addresses, vec![address]);
    // The listeners that stay keep their slots.
    let indices: Vec<u32> = second.listeners.iter().map(|l| l.index).collect();
    assert_eq!(indices, vec![0, 2]);
}

#[test]
fn a_listener_that_moves_to_another_port_replaces_its_old_key() {
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let moved = config_text().replace("port = 80\n", "port = 8081\n");
    let second = plan_of(&moved, &BTreeMap::new(), &first.applied);
    let web = listener(&second, "web");
    let vip = "10.0.0.10".parse().unwrap();
    assert_eq!(web.key, listener_key(Protocol::Tcp, vip, 8081));
    assert_eq!(web.old_key, Some(listener_key(Protocol::Tcp, vip, 80)));
    assert_eq!(listener(&second, "dns").old_key, None);
}

#[test]
fn a_backend_added_as_another_is_removed_does_not_take_the_id_being_cleared() {
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let swapped = config_text().replace(
        "{ address = \"10.0.3.1\" }, { address = \"10.0.3.2\" }",
        "{ address = \"10.0.3.9\" }, { address = \"10.0.3.2\" }",
    );
    let second = plan_of(&swapped, &BTreeMap::new(), &first.applied);
    let removed = id(&first, &key("db", "10.0.3.1", 5432));
    assert_eq!(second.gone_backend_ids, vec![removed]);
    // The apply clears the removed backend's entry after writing the new ones: sharing its id
    // would leave the new active server without an entry.
    let added = id(&second, &key("db", "10.0.3.9", 5432));
    assert_ne!(added, removed);
    assert_eq!(added, 5);
    assert_eq!(listener(&second, "db").entry.active_id, added);
    // Freed ids are handed out again by the next apply.
    let third = plan_of(
        &swapped.replace("{ address = \"10.0.3.2\" }]", "{ address = \"10.0.3.3\" }]"),
        &BTreeMap::new(),
        &second.applied,
    );
    assert_eq!(id(&third, &key("db", "10.0.3.3", 5432)), removed);
}

#[test]
fn free_ids_are_the_lowest_unused_in_order() {
    let mut free = FreeIds::new(BTreeSet::from([0, 1, 3, 6]), 8);
    let taken: Vec<u32> = std::iter::from_fn(|| free.take()).collect();
    assert_eq!(taken, vec![2, 4, 5, 7]);
}

/// A verdict planned alone writes what a whole plan with that verdict writes for its listener.
fn assert_verdict_plans_as_a_whole_plan_would(dead: &BackendKey, expected: HealthWrite) {
    let text = config_text();
    let config = Config::parse(&text, "plan.toml").unwrap();
    let before = plan_of(&text, &BTreeMap::new(), &AppliedMaps::default()).applied;
    let health = unhealthy(std::slice::from_ref(dead));
    let whole = plan(&config, &health, &before, RING, &live_sets(&before)).unwrap();
    let VerdictPlan::Write(verdict) =
        plan_verdict(&config, &health, &before, RING, &live_sets(&before), dead)
    else {
        panic!("{dead:?}: not planned on its own");
    };
    let VerdictWrite {
        id,
        health: write,
        listener: planned,
        applied_listener,
    } = *verdict;
    assert_eq!((id, write), (self::id(&whole, dead), expected));
    let expected_listener = listener(&whole, &dead.listener);
    assert_eq!(planned.entry, expected_listener.entry);
    assert_eq!(planned.ring_input, expected_listener.ring_input);
    assert_eq!(planned.rebuild, expected_listener.rebuild);
    assert_eq!(planned.replies, expected_listener.replies);
    let whole_applied = whole
        .applied
        .listeners
        .iter()
        .find(|l| l.name == dead.listener)
        .unwrap();
    assert_eq!(
        serde_json::to_value(&applied_listener).unwrap(),
        serde_json::to_value(whole_applied).unwrap()
    );
}

#[test]
fn a_verdict_on_an_active_server_is_its_flag_alone() {
    let active = key("db", "10.0.3.1", 5432);
    assert_verdict_plans_as_a_whole_plan_would(&active, HealthWrite::DownFirst);
    let config = Config::parse(&config_text(), "plan.toml").unwrap();
    let before = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default()).applied;
    let health = unhealthy(std::slice::from_ref(&active));
    let VerdictPlan::Write(verdict) = plan_verdict(
        &config,
        &health,
        &before,
        RING,
        &live_sets(&before),
        &active,
    ) else {
        panic!("not planned");
    };
    assert_eq!(
        verdict.listener.rebuild, None,
        "a failover rebuilds no ring"
    );
}

#[test]
fn a_verdict_on_a_maglev_backend_rebuilds_its_listeners_ring_only() {
    assert_verdict_plans_as_a_whole_plan_would(
        &key("web", "10.0.1.2", 8080),
        HealthWrite::DownLast,
    );
}

#[test]
fn a_verdict_the_maps_cannot_take_alone_says_so() {
    let config = Config::parse(&config_text(), "plan.toml").unwrap();
    let before = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default()).applied;
    let site = key("site", "10.0.1.1", 8000);
    let verdict = plan_verdict(
        &config,
        &unhealthy(std::slice::from_ref(&site)),
        &before,
        RING,
        &live_sets(&before),
        &site,
    );
    assert!(matches!(verdict, VerdictPlan::NotInMaps), "{verdict:?}");
    // Nothing applied yet (an earlier apply failed): only a whole plan can say.
    let web = key("web", "10.0.1.2", 8080);
    let verdict = plan_verdict(
        &config,
        &unhealthy(std::slice::from_ref(&web)),
        &AppliedMaps::default(),
        RING,
        &LiveAclSets::new(),
        &web,
    );
    assert!(
        matches!(verdict, VerdictPlan::PlanEverything),
        "{verdict:?}"
    );
}

#[test]
fn a_direct_return_listener_is_flagged_and_translates_no_replies() {
    let dsr = config_text().replace(
        "port = 53\n",
        "port = 53\nforwarding = \"dsr\"\nhealth_check = { type = \"udp\" }\n",
    );
    let plan = plan_of(&dsr, &BTreeMap::new(), &AppliedMaps::default());
    let dns = listener(&plan, "dns");
    assert_eq!(dns.entry.flags & LISTENER_F_DSR, LISTENER_F_DSR);
    assert!(dns.replies.is_empty(), "{:?}", dns.replies);
    let web = listener(&plan, "web");
    assert_eq!(web.entry.flags & LISTENER_F_DSR, 0);
    assert_eq!(
        web.replies.len(),
        2,
        "NAT listeners still translate replies"
    );
}

#[test]
fn a_tunnelling_listener_is_flagged_and_its_backends_carry_the_tunnel_source() {
    let ipip = config_text().replace(
        "port = 53\n",
        "port = 53\nforwarding = \"dsr\"\ndsr = \"ipip\"\ntunnel_source = \"10.0.0.2\"\nhealth_check = { type = \"udp\" }\n",
    );
    let plan = plan_of(&ipip, &BTreeMap::new(), &AppliedMaps::default());
    let dns = listener(&plan, "dns");
    assert_eq!(
        dns.entry.flags & (LISTENER_F_DSR | LISTENER_F_TUNNEL),
        LISTENER_F_DSR | LISTENER_F_TUNNEL
    );
    assert!(dns.replies.is_empty(), "{:?}", dns.replies);
    let ids: BTreeSet<u32> = plan
        .applied
        .backends
        .iter()
        .filter(|b| b.key.listener == "dns")
        .map(|b| b.id)
        .collect();
    assert!(!ids.is_empty());
    for (id, backend) in &plan.backends {
        let expected = if ids.contains(id) {
            slb_common::ipv4_mapped([10, 0, 0, 2])
        } else {
            [0; 16]
        };
        assert_eq!(backend.tunnel_source, expected, "backend {id}");
    }
    let web = listener(&plan, "web");
    assert_eq!(web.entry.flags & (LISTENER_F_DSR | LISTENER_F_TUNNEL), 0);
}

#[test]
fn a_full_nat_listener_is_flagged_with_its_snat_pool_and_translates_no_replies_by_endpoint() {
    let fullnat = config_text().replace(
        "port = 53\n",
        "port = 53\nforwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\", \"10.0.0.3\"]\nsnat_ports = \"20000-20009\"\n",
    );
    let plan = plan_of(&fullnat, &BTreeMap::new(), &AppliedMaps::default());
    let dns = listener(&plan, "dns");
    assert_eq!(dns.entry.flags & LISTENER_F_FULLNAT, LISTENER_F_FULLNAT);
    assert!(dns.replies.is_empty(), "{:?}", dns.replies);
    let pool = dns.snat_pool.expect("a pool");
    assert_eq!(
        (pool.count, pool.first_port, pool.port_count),
        (2, 20000, 10)
    );
    assert_eq!(pool.addrs[0], slb_common::ipv4_mapped([10, 0, 0, 2]));
    assert_eq!(pool.addrs[1], slb_common::ipv4_mapped([10, 0, 0, 3]));
    assert!(listener(&plan, "web").snat_pool.is_none());
}

#[test]
fn a_running_full_nat_listener_keeps_its_snat_addresses_and_ports() {
    let with = |ports: &str| {
        config_text().replace(
            "port = 53\n",
            &format!("port = 53\nforwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\"]\nsnat_ports = \"{ports}\"\n"),
        )
    };
    let first = plan_of(
        &with("20000-20009"),
        &BTreeMap::new(),
        &AppliedMaps::default(),
    );
    // The same pool again (a reweight, a health change): planned as usual.
    plan_of(&with("20000-20009"), &BTreeMap::new(), &first.applied);
    let changed = Config::parse(&with("20000-20019"), "plan.toml").unwrap();
    let e = plan(
        &changed,
        &BTreeMap::new(),
        &first.applied,
        RING,
        &LiveAclSets::new(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("listener dns: snat_addresses and snat_ports cannot change"),
        "{e}"
    );
    // Removed, then added again (the operator's way to change it): planned.
    let removed = config_text();
    let gone = plan_of(&removed, &BTreeMap::new(), &first.applied);
    plan_of(&with("20000-20019"), &BTreeMap::new(), &gone.applied);
}

/// `config_text()` with `fields` added to the web listener (TCP 10.0.0.10:80).
fn web_with(fields: &str) -> String {
    config_text().replacen(
        "name = \"web\"\n",
        &format!("name = \"web\"\n{fields}\n"),
        1,
    )
}

#[test]
fn a_changed_access_list_goes_whole_into_the_other_set_and_the_old_one_is_emptied_after() {
    let allow = web_with(r#"acl = { mode = "allow", cidrs = ["10.1.0.0/16", "192.0.2.7"] }"#);
    let first = plan_of(&allow, &BTreeMap::new(), &AppliedMaps::default());
    let web = listener(&first, "web");
    let write = web.acl_write.as_ref().expect("a first list is written");
    assert_eq!(write.set, web.index * 2);
    assert_eq!(
        write.keys,
        vec![
            (
                32 + 96 + 16,
                AclPrefix {
                    set: write.set.to_be_bytes(),
                    addr: data_plane_addr("10.1.0.0".parse().unwrap())
                }
            ),
            (
                32 + 96 + 32,
                AclPrefix {
                    set: write.set.to_be_bytes(),
                    addr: data_plane_addr("192.0.2.7".parse().unwrap())
                }
            ),
        ]
    );
    assert!(web.acl_clear_after.is_empty());
    assert_eq!(
        web.entry.flags
            & (LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_SET | LISTENER_F_ACL_CUT_ESTABLISHED),
        LISTENER_F_ACL_ALLOW
    );

    // Unchanged: nothing written, the same set; the mode alone is a flag.
    let same = plan_of(&allow, &BTreeMap::new(), &first.applied);
    assert!(listener(&same, "web").acl_write.is_none());
    let deny = allow.replace("mode = \"allow\"", "mode = \"deny\", established = \"cut\"");
    let flipped = plan_of(&deny, &BTreeMap::new(), &first.applied);
    let web = listener(&flipped, "web");
    assert!(web.acl_write.is_none() && web.acl_clear_after.is_empty());
    assert_eq!(
        web.entry.flags
            & (LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_DENY | LISTENER_F_ACL_CUT_ESTABLISHED),
        LISTENER_F_ACL_DENY | LISTENER_F_ACL_CUT_ESTABLISHED
    );

    // Changed prefixes: the other set, switched to by the entry, the old one emptied after.
    let changed = allow.replace("\"192.0.2.7\"", "\"192.0.2.8\"");
    let second = plan_of(&changed, &BTreeMap::new(), &first.applied);
    let web = listener(&second, "web");
    let write = web.acl_write.as_ref().expect("the new list is written");
    assert_eq!(write.set, web.index * 2 + 1);
    assert_ne!(web.entry.flags & LISTENER_F_ACL_SET, 0);
    assert_eq!(web.acl_clear_after, vec![web.index * 2]);
    let third = plan_of(&allow, &BTreeMap::new(), &second.applied);
    let web = listener(&third, "web");
    assert_eq!(web.acl_write.as_ref().map(|w| w.set), Some(web.index * 2));
    assert_eq!(web.acl_clear_after, vec![web.index * 2 + 1]);

    // No list any more: both sets emptied after the entry stops looking.
    let none = plan_of(&config_text(), &BTreeMap::new(), &third.applied);
    let web = listener(&none, "web");
    assert_eq!(
        web.entry.flags & (LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_DENY),
        0
    );
    assert_eq!(web.acl_clear_after, vec![web.index * 2, web.index * 2 + 1]);
}

#[test]
fn a_new_flow_limit_is_written_only_when_it_changes() {
    let limited = web_with("max_new_connections_per_second = 200");
    let first = plan_of(&limited, &BTreeMap::new(), &AppliedMaps::default());
    let web = listener(&first, "web");
    assert_ne!(web.entry.flags & LISTENER_F_NEW_FLOW_LIMIT, 0);
    assert_eq!(
        web.new_flow_limit,
        Some(NewFlowLimit {
            interval_ns: 5_000_000,
            burst_ns: 199 * 5_000_000,
            next_ns: 0
        }),
        "the burst defaults to a second's worth"
    );
    let again = plan_of(&limited, &BTreeMap::new(), &first.applied);
    assert_eq!(
        listener(&again, "web").new_flow_limit,
        None,
        "the bucket is left as it is"
    );
    let burst = web_with("max_new_connections_per_second = 200\nnew_connections_burst = 1");
    let changed = plan_of(&burst, &BTreeMap::new(), &first.applied);
    assert_eq!(
        listener(&changed, "web").new_flow_limit,
        Some(NewFlowLimit {
            interval_ns: 5_000_000,
            burst_ns: 0,
            next_ns: 0
        })
    );
    let off = plan_of(&config_text(), &BTreeMap::new(), &changed.applied);
    assert_eq!(
        listener(&off, "web").entry.flags & LISTENER_F_NEW_FLOW_LIMIT,
        0
    );
}

/// Verdicts with `backend` healthy at `percent` of its slow start (`None`: done).
fn ramping(backend: &BackendKey, percent: Option<u32>) -> BTreeMap<BackendKey, HealthStatus> {
    let status = HealthStatus {
        healthy: true,
        reason: "passed".into(),
        since_unix_ns: 0,
        confirmed: true,
        slow_start_percent: percent,
    };
    BTreeMap::from([(backend.clone(), status)])
}

#[test]
fn a_backend_in_slow_start_gets_its_share_of_its_weight_in_the_ring_until_it_is_done() {
    // web: 10.0.1.2:8080 weight 2 and 10.0.1.3:8080 weight 1.
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let web = listener(&first, "web");
    let (a, b) = (key("web", "10.0.1.2", 8080), key("web", "10.0.1.3", 8080));
    let plain = web.ring_input.clone();
    assert_eq!(
        plain,
        vec![(id(&first, &a), 2), (id(&first, &b), 1)],
        "without slow start, the weights"
    );
    let step = plan_of(&config_text(), &ramping(&b, Some(25)), &first.applied);
    let web = listener(&step, "web");
    assert_eq!(
        web.ring_input,
        vec![(id(&first, &a), 200), (id(&first, &b), 25)],
        "in hundredths: the other at 100 %, the starting one at 25 %"
    );
    assert!(web.rebuild.is_some());
    let done = plan_of(&config_text(), &ramping(&b, None), &step.applied);
    assert_eq!(
        listener(&done, "web").ring_input,
        plain,
        "done: the weights again"
    );
}

#[test]
fn the_set_an_access_list_goes_to_is_the_one_the_data_plane_does_not_read() {
    let allow = web_with(r#"acl = { mode = "allow", cidrs = ["10.1.0.0/16"] }"#);
    let first = plan_of(&allow, &BTreeMap::new(), &AppliedMaps::default());
    let index = listener(&first, "web").index;
    // An apply switched the entry to set 1 and failed later: the state still says set 0.
    let stale = first.applied.clone();
    let switched = LiveAclSets::from([(index, 1)]);
    let config = Config::parse(&allow, "plan.toml").unwrap();
    let again = plan(&config, &BTreeMap::new(), &stale, RING, &switched).unwrap();
    let web = listener(&again, "web");
    let write = web
        .acl_write
        .as_ref()
        .expect("what set 1 holds is not trusted: rewritten");
    assert_eq!(write.set, index * 2, "into the set the entry does not read");
    assert_eq!(web.entry.flags & LISTENER_F_ACL_SET, 0);
    assert_eq!(web.acl_clear_after, vec![index * 2 + 1]);

    // A listener renamed on the same VIP and port takes the index: its list goes into the set
    // the old entry does not read, and the old one's set goes with the old listener.
    let renamed = allow.replacen("name = \"web\"\n", "name = \"www\"\n", 1);
    let config = Config::parse(&renamed, "plan.toml").unwrap();
    let plan = plan(
        &config,
        &BTreeMap::new(),
        &first.applied,
        RING,
        &live_sets(&first.applied),
    )
    .unwrap();
    let www = listener(&plan, "www");
    assert_eq!(www.index, index);
    assert_eq!(www.acl_write.as_ref().map(|w| w.set), Some(index * 2 + 1));
    assert!(
        www.acl_clear_after.is_empty(),
        "not before the old listener is gone"
    );
    let gone = plan
        .gone_listeners
        .iter()
        .find(|g| g.index == index)
        .expect("web is gone");
    assert_eq!(gone.clear_acl_sets, vec![index * 2]);
}

/// The members a planned WLC set holds, as (id, weight).
fn set_members(set: &WlcSet) -> Vec<(u32, u32)> {
    set.members[..set.count as usize]
        .iter()
        .map(|m| (m.id, m.weight))
        .collect()
}

#[test]
fn wlc_and_max_connections_are_flagged_and_limits_reach_the_backend_entries() {
    let text = web_with("scheduler = \"wlc\"")
        .replace("weight = 2 }", "weight = 2, max_connections = 100 }");
    let plan = plan_of(&text, &BTreeMap::new(), &AppliedMaps::default());
    let web = listener(&plan, "web").entry;
    assert_eq!(
        web.flags & (LISTENER_F_WLC | LISTENER_F_MAX_CONNECTIONS),
        LISTENER_F_WLC | LISTENER_F_MAX_CONNECTIONS
    );
    let dns = listener(&plan, "dns").entry;
    assert_eq!(dns.flags & (LISTENER_F_WLC | LISTENER_F_MAX_CONNECTIONS), 0);
    let limit = |k: &BackendKey| {
        plan.backends
            .iter()
            .find(|(i, _)| *i == id(&plan, k))
            .unwrap()
            .1
            .max_connections
    };
    assert_eq!(limit(&key("web", "10.0.1.2", 8080)), 100);
    assert_eq!(limit(&key("web", "10.0.1.3", 8080)), 0, "no limit");
    let applied = plan
        .applied
        .backends
        .iter()
        .find(|b| b.key == key("web", "10.0.1.2", 8080))
        .unwrap();
    assert_eq!(applied.max_connections, Some(100));
    // Maglev by default, even with a limit.
    let plan = plan_of(
        &config_text().replace("weight = 2 }", "weight = 2, max_connections = 100 }"),
        &BTreeMap::new(),
        &AppliedMaps::default(),
    );
    let web = listener(&plan, "web").entry;
    assert_eq!(
        web.flags & (LISTENER_F_WLC | LISTENER_F_MAX_CONNECTIONS),
        LISTENER_F_MAX_CONNECTIONS
    );
}

#[test]
fn the_wlc_set_is_the_ring_input_at_the_slot_the_entry_switches_to() {
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    for name in ["web", "dns"] {
        let l = listener(&first, name);
        let set = l.wlc_set.expect("every Maglev listener has a set");
        assert_eq!(set_members(&set), l.ring_input, "{name}");
    }
    assert!(listener(&first, "db").wlc_set.is_none(), "active-standby");
    // An unhealthy backend is in the set with weight 0, as in the ring; the rebuilt ring is the
    // other slot, and so is the set.
    let down = key("web", "10.0.1.3", 8080);
    let second = plan_of(
        &config_text(),
        &unhealthy(std::slice::from_ref(&down)),
        &first.applied,
    );
    let web = listener(&second, "web");
    assert_eq!(web.rebuild, Some(1));
    assert_eq!(web.entry.ring_index, ring_slot(web.index, 1));
    assert_eq!(
        set_members(&web.wlc_set.unwrap()),
        vec![
            (id(&first, &key("web", "10.0.1.2", 8080)), 2),
            (id(&first, &down), 0)
        ]
    );
    // Unchanged ring: the same set at the live slot, for a run that adopted the maps.
    let third = plan_of(&config_text(), &unhealthy(&[down]), &second.applied);
    let web = listener(&third, "web");
    assert_eq!(web.rebuild, None);
    assert_eq!(web.entry.ring_index, ring_slot(web.index, 1));
    assert_eq!(set_members(&web.wlc_set.unwrap()), web.ring_input);
}

#[test]
fn slow_start_scales_the_wlc_set_as_it_scales_the_ring() {
    let first = plan_of(&config_text(), &BTreeMap::new(), &AppliedMaps::default());
    let (a, b) = (key("web", "10.0.1.2", 8080), key("web", "10.0.1.3", 8080));
    let step = plan_of(&config_text(), &ramping(&b, Some(10)), &first.applied);
    let web = listener(&step, "web");
    assert_eq!(
        set_members(&web.wlc_set.unwrap()),
        vec![(id(&first, &a), 200), (id(&first, &b), 10)]
    );
}

#[test]
fn a_group_larger_than_the_scan_gets_an_empty_set() {
    let input: Vec<(u32, u32)> = (0..=MAX_WLC_BACKENDS).map(|i| (i, 1)).collect();
    assert_eq!(wlc_set(&input).count, 0);
    let set = wlc_set(&input[..MAX_WLC_BACKENDS as usize]);
    assert_eq!(set.count, MAX_WLC_BACKENDS);
    assert_eq!(set_members(&set), input[..MAX_WLC_BACKENDS as usize]);
}
