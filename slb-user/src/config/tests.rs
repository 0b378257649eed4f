//! Parsing and validation of whole config files: each error names the field and the value.

use std::time::Duration;

use super::*;

/// A valid config the tests of config and reconcile vary: a TCP listener on a VServer group
/// whose backends have their own port, a UDP listener on the default group.
pub(crate) const GOOD: &str = r#"
instance = "t1"
vips = ["10.0.0.10"]
[[interfaces]]
name = "eth0"
[[listeners]]
name = "web"
protocol = "tcp"
vip = "10.0.0.10"
port = 80
group = "pool"
[[listeners]]
name = "dns"
protocol = "udp"
vip = "10.0.0.10"
port = 53
[default_group]
backends = [{ address = "10.0.1.1" }]
[[groups]]
name = "pool"
backends = [{ address = "10.0.1.2", port = 8080, weight = 2 }, { address = "10.0.1.3", port = 8080 }]
"#;

fn error_of(text: &str) -> String {
    Config::parse(text, "test.toml").unwrap_err().to_string()
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(GOOD, "test.toml").unwrap();
    assert_eq!(c.maglev_table_size, 65537);
    assert_eq!(c.interfaces[0].mode, AttachMode::Native);
    assert_eq!(c.groups[0].backends[1].weight, 1);
    assert_eq!(c.default_group.backends[0].port, None);
}

#[test]
fn errors_name_the_field_and_value() {
    let e = error_of(&GOOD.replace(
        "group = \"pool\"\n[[listeners]]",
        "group = \"nope\"\n[[listeners]]",
    ));
    assert!(
        e.contains("listeners[0] (web).group") && e.contains("\"nope\"") && e.contains("pool"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("weight = 2", "weight = -1"));
    assert!(e.contains("weight") && e.contains("test.toml"), "{e}");

    let e = error_of(&GOOD.replace(
        "instance = \"t1\"",
        "instance = \"t1\"\nmaglev_table_size = 65536",
    ));
    assert!(
        e.contains("maglev_table_size") && e.contains("65536"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("port = 53", "port = 0"));
    assert!(e.contains("listeners[1] (dns).port"), "{e}");

    let e = error_of(&GOOD.replace("port = 53", "port = 80\nprotocol2 = 1"));
    assert!(e.contains("protocol2"), "{e}");

    let e = error_of(&GOOD.replace("protocol = \"udp\"", "protocol = \"sctp\""));
    assert!(e.contains("sctp"), "{e}");

    let e = error_of(&GOOD.replace(
        "vip = \"10.0.0.10\"\nport = 53",
        "vip = \"10.0.0.11\"\nport = 53",
    ));
    assert!(
        e.contains("listeners[1] (dns).vip") && e.contains("10.0.0.11"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("\"10.0.1.3\", port = 8080", "\"10.0.1.2\", port = 8080"));
    assert!(
        e.contains("groups[0] (pool).backends[1].address") && e.contains("twice"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("weight = 2", "weight = 20000"));
    assert!(
        e.contains("groups[0] (pool).backends[0].weight") && e.contains("20000"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("instance = \"t1\"", "instance = \"a/b\""));
    assert!(e.contains("instance") && e.contains("a/b"), "{e}");

    let e = error_of(&GOOD.replace("address = \"10.0.1.1\"", "address = \"10.0.1.300\""));
    assert!(
        e.contains("10.0.1.300") && e.contains("invalid IP address syntax"),
        "{e}"
    );
}

#[test]
fn active_standby_needs_exactly_two_servers() {
    let three = format!(
        "{GOOD}\n[[groups]]\nname = \"db\"\ntype = \"active-standby\"\nbackends = [{{ address = \"10.0.2.1\" }}, {{ address = \"10.0.2.2\" }}, {{ address = \"10.0.2.3\" }}]\n"
    );
    let e = error_of(&three);
    assert!(
        e.contains("groups[1] (db).backends") && e.contains("exactly two") && e.contains("has 3"),
        "{e}"
    );
    let two = three.replace(", { address = \"10.0.2.3\" }", "");
    let c = Config::parse(&two, "t").unwrap();
    assert_eq!(c.groups[1].kind, GroupKind::ActiveStandby);
}

#[test]
fn health_check_must_fit_the_listener_and_its_ranges() {
    let with_check = |listener: &str, check: &str| {
        GOOD.replace(
            &format!("name = \"{listener}\"\n"),
            &format!("name = \"{listener}\"\nhealth_check = {check}\n"),
        )
    };
    let e = error_of(&with_check("dns", "{ type = \"http\" }"));
    assert!(
        e.contains("listeners[1] (dns).health_check.type")
            && e.contains("HTTP check needs a TCP listener"),
        "{e}"
    );
    let e = error_of(&with_check("web", "{ type = \"udp\" }"));
    assert!(e.contains("listeners[0] (web).health_check.type"), "{e}");
    let e = error_of(&with_check(
        "dns",
        "{ type = \"udp\", interval = \"200ms\", timeout = \"200ms\" }",
    ));
    assert!(
        e.contains("dns).health_check.interval") && e.contains("rate-limits"),
        "{e}"
    );
    Config::parse(
        &with_check(
            "dns",
            "{ type = \"udp\", interval = \"200ms\", timeout = \"200ms\", expect = \"pong\" }",
        ),
        "t",
    )
    .unwrap();
    let e = error_of(&with_check(
        "web",
        "{ type = \"tcp\", interval = \"10ms\" }",
    ));
    assert!(
        e.contains("health_check.interval") && e.contains("10ms"),
        "{e}"
    );
    let e = error_of(&with_check(
        "web",
        "{ type = \"tcp\", interval = \"1s\", timeout = \"2s\" }",
    ));
    assert!(
        e.contains("health_check.timeout") && e.contains("no longer than the interval"),
        "{e}"
    );
    let e = error_of(&with_check(
        "web",
        "{ type = \"tcp\", unhealthy_threshold = 0 }",
    ));
    assert!(
        e.contains("unhealthy_threshold") && e.contains("between 1 and 10"),
        "{e}"
    );
    let e = error_of(&with_check(
        "web",
        "{ type = \"http\", expected_codes = [\"2xy\"] }",
    ));
    assert!(e.contains("expected_codes") && e.contains("2xy"), "{e}");
    let e = error_of(&with_check("web", "{ type = \"tcp\", path = \"/x\" }"));
    assert!(
        e.contains("health_check.path") && e.contains("only applies to http"),
        "{e}"
    );
    let ok = Config::parse(&with_check("web", "{ type = \"http\", path = \"/healthz\", expected_codes = [\"2xx\", \"301\"], interval = \"500ms\", timeout = \"300ms\" }"), "t").unwrap();
    let check = ok.listeners[0].health_check.as_ref().unwrap();
    assert_eq!(check.interval, Duration::from_millis(500));
    assert!(check.accepts_status(204) && check.accepts_status(301) && !check.accepts_status(302));
}

#[test]
fn persistence_timeout_is_bounded() {
    let e = error_of(&GOOD.replace(
        "port = 53\n",
        "port = 53\npersistence = { timeout = \"2d\" }\n",
    ));
    assert!(e.contains("listeners[1] (dns).persistence.timeout"), "{e}");
    let c = Config::parse(
        &GOOD.replace(
            "port = 53\n",
            "port = 53\npersistence = { timeout = \"5m\" }\n",
        ),
        "t",
    )
    .unwrap();
    assert_eq!(
        c.listeners[1].persistence.unwrap().timeout,
        Duration::from_secs(300)
    );
}

#[test]
fn ring_too_small_for_the_group_is_rejected() {
    let e = error_of(&GOOD.replace(
        "instance = \"t1\"",
        "instance = \"t1\"\nmaglev_table_size = 13",
    ));
    assert!(
        e.contains("maglev_table_size") && e.contains("\"web\"") && e.contains("2 backends"),
        "{e}"
    );
}

#[test]
fn duplicate_listener_endpoint_is_rejected() {
    let e = error_of(&GOOD.replace(
        "protocol = \"udp\"\nvip = \"10.0.0.10\"\nport = 53",
        "protocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = 80",
    ));
    assert!(e.contains("10.0.0.10:80/tcp is already used"), "{e}");
}

#[test]
fn a_backend_endpoint_serves_one_tcp_udp_listener() {
    // Without a port of its own, the default group's 10.0.1.2 serves the second listener on
    // its port 8080: the endpoint the pool's 10.0.1.2:8080 already serves for "web".
    let shared = GOOD.replace(
        "backends = [{ address = \"10.0.1.1\" }]",
        "backends = [{ address = \"10.0.1.2\" }]",
    )
        + "[[listeners]]\nname = \"alt\"\nprotocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = 8080\n";
    let e = error_of(&shared);
    assert!(
        e.contains("listeners[2] (alt).group")
            && e.contains("backend 10.0.1.2:8080/tcp also serves listener \"web\""),
        "{e}"
    );
    // The same endpoint under UDP is another one.
    Config::parse(
        &shared.replace(
            "name = \"alt\"\nprotocol = \"tcp\"",
            "name = \"alt\"\nprotocol = \"udp\"",
        ),
        "t",
    )
    .unwrap();
}

#[test]
fn names_are_a_safe_character_set() {
    for (bad, field) in [
        ("name = \"web\"", "listeners[0].name"),
        ("name = \"pool\"", "groups[0].name"),
    ] {
        for name in [
            "we\\nb",
            "we\\u001b[31mb",
            "",
            "-web",
            "web b",
            &"w".repeat(64),
        ] {
            let e = error_of(&GOOD.replacen(bad, &format!("name = \"{name}\""), 1));
            assert!(
                e.contains(field) && e.contains("is not a name"),
                "{name}: {e}"
            );
            assert!(
                !e.contains('\n') && !e.contains('\u{1b}'),
                "raw in the error: {e:?}"
            );
        }
    }
    let ok = GOOD
        .replace("name = \"web\"", "name = \"web-1.a_b\"")
        .replace("name = \"pool\"", "name = \"Pool2\"")
        .replace("group = \"pool\"", "group = \"Pool2\"");
    Config::parse(&ok, "test.toml").unwrap();
}

#[test]
fn vips_and_backends_are_unicast_addresses() {
    for vip in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
        let text = GOOD.replace("vips = [\"10.0.0.10\"]\n", "").replace(
            "vip = \"10.0.0.10\"\nport = 80",
            &format!("vip = \"{vip}\"\nport = 80"),
        );
        let e = error_of(&text);
        assert!(
            e.contains("listeners[0] (web).vip") && e.contains(&format!("{vip} is not a unicast")),
            "{vip}: {e}"
        );
    }
    for address in ["0.0.0.0", "255.255.255.255", "239.1.1.1"] {
        let e = error_of(&GOOD.replace("10.0.1.3", address));
        assert!(
            e.contains("groups[0] (pool).backends[1].address") && e.contains("not a unicast"),
            "{address}: {e}"
        );
    }
}

/// A dual-stack config: an IPv6 tcp listener on IPv6 backends, an IPv6 http listener whose
/// groups mix families, and an IPv4 udp listener.
pub(crate) const GOOD6: &str = r#"
instance = "t6"
vips = ["10.0.0.10", "2001:db8::10"]
[[interfaces]]
name = "eth0"
[[listeners]]
name = "web6"
protocol = "tcp"
vip = "2001:db8::10"
port = 80
group = "pool6"
[[listeners]]
name = "site6"
protocol = "http"
vip = "2001:db8::10"
port = 8000
rules = [{ path = "/v6", group = "pool6" }]
[[listeners]]
name = "dns"
protocol = "udp"
vip = "10.0.0.10"
port = 53
group = "pool"
[default_group]
backends = [{ address = "10.0.1.1", port = 8000 }]
[[groups]]
name = "pool"
backends = [{ address = "10.0.0.1", port = 53 }]
[[groups]]
name = "pool6"
backends = [{ address = "2001:db8:1::2", port = 8080 }, { address = "fd00::3", port = 8080 }]
"#;

#[test]
fn ipv6_vips_and_backends_are_accepted() {
    let c = Config::parse(GOOD6, "t").unwrap();
    assert_eq!(
        c.listeners[0].vip,
        "2001:db8::10".parse::<std::net::IpAddr>().unwrap()
    );
    let web6 = c.resolve(&c.listeners[0]);
    assert_eq!(
        web6.group().backends[0].endpoint().to_string(),
        "[2001:db8:1::2]:8080"
    );
}

#[test]
fn ipv6_vips_and_backends_are_global_or_unique_local_unicast() {
    let refusals = [
        ("::", "is not a unicast address"),
        ("ff02::1", "is not a unicast address"),
        ("::1", "is the IPv6 loopback address"),
        (
            "::ffff:10.0.0.1",
            "is an IPv4-mapped or IPv4-compatible IPv6 address; write the IPv4 address 10.0.0.1",
        ),
        (
            "::a00:1",
            "is an IPv4-mapped or IPv4-compatible IPv6 address; write the IPv4 address 10.0.0.1",
        ),
        ("fe80::1", "is link-local (fe80::/10)"),
        ("febf::1", "is link-local (fe80::/10)"),
    ];
    for (address, why) in refusals {
        let text = GOOD6
            .replace("vips = [\"10.0.0.10\", \"2001:db8::10\"]\n", "")
            .replace(
                "vip = \"2001:db8::10\"\nport = 80",
                &format!("vip = \"{address}\"\nport = 80"),
            );
        let e = error_of(&text);
        assert!(
            e.starts_with(&format!("listeners[0] (web6).vip: {address} {why}")),
            "{address}: {e}"
        );
        let e = error_of(&GOOD6.replace("fd00::3", address));
        assert!(
            e.starts_with(&format!(
                "groups[1] (pool6).backends[1].address: {address} {why}"
            )),
            "{address}: {e}"
        );
    }
}

#[test]
fn a_tcp_udp_listener_forwards_to_backends_of_its_vips_family_only() {
    // The udp listener on an IPv6 VIP with the IPv4 pool.
    let text = GOOD6.replace(
        "name = \"dns\"\nprotocol = \"udp\"\nvip = \"10.0.0.10\"",
        "name = \"dns6\"\nprotocol = \"udp\"\nvip = \"2001:db8::10\"",
    );
    assert_eq!(
        error_of(&text),
        "listeners[2] (dns6): backend 10.0.0.1:53 of group \"pool\" is IPv4 but the listener's \
         VIP 2001:db8::10 is IPv6 (tcp/udp listeners rewrite addresses, not address families)"
    );
    // The IPv6 tcp listener on the default group, which is IPv4.
    let e = error_of(&GOOD6.replace("group = \"pool6\"\n[[listeners]]", "[[listeners]]"));
    assert!(
        e.starts_with("listeners[0] (web6): backend 10.0.1.1:8000 of group \"default\" is IPv4"),
        "{e}"
    );
    // An IPv4 tcp listener on a group with an IPv6 member, e.g. an active/standby pair.
    let pair = "[[groups]]\nname = \"db\"\ntype = \"active-standby\"\n\
                backends = [{ address = \"10.0.2.2\", port = 5432 }, { address = \"2001:db8::5\", port = 5432 }]\n\
                [[listeners]]\nname = \"db\"\nprotocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = 5432\ngroup = \"db\"\n";
    let e = error_of(&format!("{GOOD6}{pair}"));
    assert!(
        e.starts_with("listeners[3] (db): backend [2001:db8::5]:5432 of group \"db\" is IPv6 but the listener's VIP 10.0.0.10 is IPv4"),
        "{e}"
    );
}

#[test]
fn an_ipv6_persistence_prefix_is_1_to_128_bits_on_an_ipv6_listener() {
    let with_persistence = |text: &str, listener: &str, persistence: &str| {
        text.replace(
            &format!("name = \"{listener}\"\n"),
            &format!("name = \"{listener}\"\npersistence = {persistence}\n"),
        )
    };
    let c = Config::parse(
        &with_persistence(GOOD6, "web6", "{ timeout = \"5m\", ipv6_prefix = 64 }"),
        "t",
    )
    .unwrap();
    assert_eq!(c.listeners[0].persist_ipv6_prefix(), 64);
    let c = Config::parse(
        &with_persistence(GOOD6, "web6", "{ timeout = \"5m\" }"),
        "t",
    )
    .unwrap();
    assert_eq!(c.listeners[0].persist_ipv6_prefix(), 128);
    assert_eq!(c.listeners[2].persist_ipv6_prefix(), 128, "no persistence");
    for bad in [0, 129] {
        let e = error_of(&with_persistence(
            GOOD6,
            "web6",
            &format!("{{ timeout = \"5m\", ipv6_prefix = {bad} }}"),
        ));
        assert_eq!(
            e,
            format!("listeners[0] (web6).persistence.ipv6_prefix: {bad} must be between 1 and 128 (bits of the client address)")
        );
    }
    let e = error_of(&with_persistence(
        GOOD6,
        "dns",
        "{ timeout = \"5m\", ipv6_prefix = 64 }",
    ));
    assert!(
        e.starts_with("listeners[2] (dns).persistence.ipv6_prefix: applies to listeners on an IPv6 VIP; this one's VIP 10.0.0.10 is IPv4"),
        "{e}"
    );
    // Persistence by source address is refused on http(s) whatever it holds.
    let e = error_of(&with_persistence(
        GOOD6,
        "site6",
        "{ timeout = \"5m\", ipv6_prefix = 64 }",
    ));
    assert!(
        e.contains(
            "listeners[1] (site6).persistence: source-address persistence is for tcp/udp listeners"
        ),
        "{e}"
    );
}

#[test]
fn only_regular_files_are_read_as_configs() {
    let dir = std::env::temp_dir().join(format!("slb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo.toml");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Would wait for a writer forever if it were opened.
    let e = Config::load(&fifo).unwrap_err().to_string();
    assert!(
        e.contains("fifo.toml") && e.contains("not a regular file"),
        "{e}"
    );
    let e = Config::load(&dir).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let good = dir.join("good.toml");
    std::fs::write(&good, GOOD).unwrap();
    Config::load(&good).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backend_that_is_one_of_the_instances_own_listeners_is_refused() {
    // The pool's second backend becomes the web listener itself.
    let looped = GOOD.replace("vips = [\"10.0.0.10\"]\n", "").replace(
        "{ address = \"10.0.1.3\", port = 8080 }",
        "{ address = \"10.0.0.10\", port = 80 }",
    );
    let e = error_of(&looped);
    assert!(
        e.contains("listeners[0] (web).group")
            && e.contains("10.0.0.10:80")
            && e.contains("own listener \"web\""),
        "{e}"
    );
    // The same address on another port is an ordinary backend.
    Config::parse(&looped.replace("port = 80 }", "port = 81 }"), "test.toml").unwrap();
    // The admin API's edits are validated the same way.
    let running =
        Config::parse(&GOOD.replace("vips = [\"10.0.0.10\"]\n", ""), "test.toml").unwrap();
    let e = running
        .edit_backend(&BackendEdit {
            group: "pool".into(),
            address: "10.0.0.10".parse().unwrap(),
            port: Some(80),
            action: EditAction::Add {
                weight: 1,
                max_connections: None,
            },
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("own listener \"web\""), "{e}");
}

/// GOOD with an HTTP listener on the pool (`extra` goes into the listener).
fn with_http_listener(extra: &str) -> String {
    format!(
        "{GOOD}[[listeners]]\nname = \"site\"\nprotocol = \"http\"\nvip = \"10.0.0.10\"\n\
         port = 8000\ngroup = \"pool\"\n{extra}\n"
    )
}

#[test]
fn proxy_connection_limits_default_and_are_bounded() {
    let c = Config::parse(&with_http_listener(""), "t").unwrap();
    let limits = c.groups[0].limits();
    assert_eq!(limits, ConnectionLimits::default());
    assert_eq!(
        (limits.max_connections, limits.max_queued_requests),
        (1024, 1024)
    );
    assert_eq!(limits.queue_timeout, Duration::from_secs(1));
    assert_eq!(c.default_group.limits(), ConnectionLimits::default());
    assert_eq!(c.listeners[2].client_timeout, Duration::from_secs(30));

    let pool = "name = \"pool\"\n";
    let set = |fields: &str| with_http_listener("").replace(pool, &format!("{pool}{fields}\n"));
    let c = Config::parse(
        &set("max_connections = 4\nmax_queued_requests = 0\nqueue_timeout = \"250ms\""),
        "t",
    )
    .unwrap();
    assert_eq!(
        c.groups[0].limits(),
        ConnectionLimits {
            max_connections: 4,
            max_queued_requests: 0,
            queue_timeout: Duration::from_millis(250),
        }
    );
    let c = Config::parse(
        &with_http_listener("").replace(
            "[default_group]\n",
            "[default_group]\nmax_connections = 7\n",
        ),
        "t",
    )
    .unwrap();
    assert_eq!(c.default_group.limits().max_connections, 7);

    for (fields, field) in [
        ("max_connections = 0", "groups[0] (pool).max_connections"),
        (
            "max_connections = 65537",
            "groups[0] (pool).max_connections",
        ),
        (
            "max_queued_requests = 65537",
            "groups[0] (pool).max_queued_requests",
        ),
        ("queue_timeout = \"0s\"", "groups[0] (pool).queue_timeout"),
        ("queue_timeout = \"61s\"", "groups[0] (pool).queue_timeout"),
    ] {
        let e = error_of(&set(fields));
        assert!(e.contains(field), "{fields}: {e}");
    }
    let e = error_of(&with_http_listener("").replace(
        "[default_group]\n",
        "[default_group]\nmax_connections = 0\n",
    ));
    assert!(e.contains("default_group.max_connections"), "{e}");
    let e = error_of(&set("max_connection = 4"));
    assert!(
        e.contains("max_connection"),
        "a misspelt field is refused: {e}"
    );
}

#[test]
fn client_timeout_is_bounded() {
    let c = Config::parse(&with_http_listener("client_timeout = \"2s\""), "t").unwrap();
    assert_eq!(c.listeners[2].client_timeout, Duration::from_secs(2));
    for bad in ["50ms", "2h"] {
        let e = error_of(&with_http_listener(&format!("client_timeout = \"{bad}\"")));
        assert!(
            e.contains("listeners[2] (site).client_timeout"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn direct_return_needs_the_listeners_port_and_a_health_check() {
    // The UDP listener on the default group (backend port = listener port) as DSR.
    let dsr = GOOD.replace(
        "port = 53\n",
        "port = 53\nforwarding = \"dsr\"\nhealth_check = { type = \"udp\" }\n",
    );
    let c = Config::parse(&dsr, "test.toml").unwrap();
    assert_eq!(c.listeners[1].forwarding, Forwarding::Dsr);
    assert_eq!(
        c.listeners[0].forwarding,
        Forwarding::Nat,
        "nat is the default"
    );

    let e = error_of(&GOOD.replace("port = 53\n", "port = 53\nforwarding = \"dsr\"\n"));
    assert!(
        e.contains("listeners[1] (dns).health_check") && e.contains("dsr needs a health check"),
        "{e}"
    );

    // The TCP listener's group serves on 8080, not 80.
    let e = error_of(&GOOD.replace(
        "port = 80\n",
        "port = 80\nforwarding = \"dsr\"\nhealth_check = { type = \"tcp\" }\n",
    ));
    assert!(
        e.contains("listeners[0] (web).forwarding")
            && e.contains("10.0.1.2:8080")
            && e.contains("give it port 80"),
        "{e}"
    );

    let http = GOOD.replace(
        "protocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = 80\n",
        "protocol = \"http\"\nvip = \"10.0.0.10\"\nport = 80\nforwarding = \"dsr\"\n",
    );
    let e = error_of(&http);
    assert!(
        e.contains("listeners[0] (web).forwarding") && e.contains("tcp/udp"),
        "{e}"
    );

    let e = error_of(&GOOD.replace("port = 53\n", "port = 53\nforwarding = \"tunnel\"\n"));
    assert!(e.contains("forwarding") && e.contains("tunnel"), "{e}");
}

#[test]
fn direct_return_endpoints_are_no_reply_endpoints() {
    // A NAT listener and a DSR listener over the same backend endpoint: replies are recognised
    // by endpoint for the NAT one only (the DSR backend answers from the VIP), so nothing is
    // shared; two NAT listeners over it are refused.
    let extra = |forwarding: &str| {
        GOOD.replace(
            "port = 53\n",
            &format!(
                "port = 53\n\
                 [[listeners]]\nname = \"alt\"\nprotocol = \"udp\"\nvip = \"10.0.0.10\"\nport = 55\ngroup = \"dns54\"\n\
                 [[listeners]]\nname = \"dns54\"\nprotocol = \"udp\"\nvip = \"10.0.0.10\"\nport = 54\ngroup = \"dns54\"\n\
                 forwarding = \"{forwarding}\"\nhealth_check = {{ type = \"udp\" }}\n"
            ),
        ) + "[[groups]]\nname = \"dns54\"\nbackends = [{ address = \"10.0.1.1\", port = 54 }]\n"
    };
    Config::parse(&extra("dsr"), "test.toml").unwrap();
    let e = error_of(&extra("nat"));
    assert!(e.contains("10.0.1.1:54"), "{e}");
}

#[test]
fn a_tunnel_needs_a_source_of_the_vips_family_and_only_a_tunnel_takes_one() {
    let dns = |fields: &str| GOOD.replace("port = 53\n", &format!("port = 53\n{fields}\n"));
    let c = Config::parse(
        &dns("forwarding = \"dsr\"\ndsr = \"ipip\"\ntunnel_source = \"10.0.0.2\"\nhealth_check = { type = \"udp\" }"),
        "test.toml",
    )
    .unwrap();
    assert_eq!(c.listeners[1].dsr_mode(), Some(DsrMode::Ipip));
    assert_eq!(c.listeners[0].dsr_mode(), None);
    let c = Config::parse(
        &dns("forwarding = \"dsr\"\nhealth_check = { type = \"udp\" }"),
        "test.toml",
    )
    .unwrap();
    assert_eq!(
        c.listeners[1].dsr_mode(),
        Some(DsrMode::L2),
        "l2 is the default"
    );

    for (fields, field, words) in [
        (
            "forwarding = \"dsr\"\ndsr = \"ipip\"",
            "listeners[1] (dns).tunnel_source",
            "needs tunnel_source",
        ),
        (
            "forwarding = \"dsr\"\ndsr = \"ipip\"\ntunnel_source = \"fd00::2\"",
            "listeners[1] (dns).tunnel_source",
            "not of the VIP's family",
        ),
        (
            "forwarding = \"dsr\"\ndsr = \"ipip\"\ntunnel_source = \"0.0.0.0\"",
            "listeners[1] (dns).tunnel_source",
            "cannot be a packet's source",
        ),
        (
            "dsr = \"ipip\"\ntunnel_source = \"10.0.0.2\"",
            "listeners[1] (dns).dsr",
            "only with forwarding = \"dsr\"",
        ),
        (
            "forwarding = \"dsr\"\nhealth_check = { type = \"udp\" }\ntunnel_source = \"10.0.0.2\"",
            "listeners[1] (dns).tunnel_source",
            "only with dsr = \"ipip\"",
        ),
        ("forwarding = \"dsr\"\ndsr = \"gre\"", "dsr", "gre"),
    ] {
        let e = error_of(&dns(fields));
        assert!(e.contains(field) && e.contains(words), "{fields}: {e}");
    }
}

#[test]
fn full_nat_needs_snat_addresses_of_the_vips_family_and_a_valid_port_range() {
    let dns = |fields: &str| GOOD.replace("port = 53\n", &format!("port = 53\n{fields}\n"));
    let c = Config::parse(
        &dns("forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\", \"10.0.0.3\"]\nsnat_ports = \"20000-20099\""),
        "test.toml",
    )
    .unwrap();
    assert_eq!(c.listeners[1].forwarding, Forwarding::Fullnat);
    assert_eq!(
        c.listeners[1].snat_ports(),
        SnatPorts {
            first: 20000,
            last: 20099
        }
    );
    assert_eq!(c.listeners[1].snat_ports().count(), 100);
    let c = Config::parse(
        &dns("forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\"]"),
        "test.toml",
    )
    .unwrap();
    assert_eq!(c.listeners[1].snat_ports(), SnatPorts::DEFAULT);

    for (fields, field, words) in [
        (
            "forwarding = \"fullnat\"",
            "listeners[1] (dns).snat_addresses",
            "1 to 16",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"fd00::2\"]",
            "listeners[1] (dns).snat_addresses",
            "not of the VIP's family",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\", \"10.0.0.2\"]",
            "listeners[1] (dns).snat_addresses",
            "listed twice",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"127.0.0.1\"]",
            "listeners[1] (dns).snat_addresses",
            "cannot be a packet's source",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\"]\nsnat_ports = \"3000-2000\"",
            "listeners[1] (dns).snat_ports",
            "above the last",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\"]\nsnat_ports = \"0-10\"",
            "listeners[1] (dns).snat_ports",
            "is not a port",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\"]\nsnat_ports = \"1024\"",
            "listeners[1] (dns).snat_ports",
            "first-last",
        ),
        (
            "snat_addresses = [\"10.0.0.2\"]",
            "listeners[1] (dns).snat_addresses",
            "only with forwarding = \"fullnat\"",
        ),
        (
            "forwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.10\"]",
            "listeners[1] (dns).snat_addresses",
            "is a VIP",
        ),
        (
            "snat_ports = \"1-2\"",
            "listeners[1] (dns).snat_ports",
            "only with forwarding = \"fullnat\"",
        ),
    ] {
        let e = error_of(&dns(fields));
        assert!(e.contains(field) && e.contains(words), "{fields}: {e}");
    }
}

#[test]
fn full_nat_listeners_share_backend_endpoints_among_themselves_only() {
    let second = |forwarding: &str| {
        GOOD.replace(
            "port = 53\n",
            &format!(
                "port = 53\ngroup = \"pool\"\nforwarding = \"fullnat\"\nsnat_addresses = [\"10.0.0.2\"]\n\
                 [[listeners]]\nname = \"dns2\"\nprotocol = \"udp\"\nvip = \"10.0.0.10\"\nport = 54\n\
                 group = \"pool\"\nforwarding = \"{forwarding}\"\n{}",
                if forwarding == "fullnat" {
                    "snat_addresses = [\"10.0.0.2\"]\n"
                } else {
                    ""
                }
            ),
        )
    };
    Config::parse(&second("fullnat"), "test.toml").unwrap();
    let e = error_of(&second("nat"));
    assert!(e.contains("also serves listener"), "{e}");
}

#[test]
fn announcing_defaults_to_debians_bird_and_a_file_per_instance() {
    let c = Config::parse(&format!("{GOOD}[announce]\n"), "test.toml").unwrap();
    let a = c.announce.expect("[announce]");
    assert_eq!(a.bird_socket, std::path::Path::new("/run/bird/bird.ctl"));
    assert_eq!(
        a.include_file("web-1"),
        std::path::Path::new("/run/slb/.bird/web-1.conf")
    );
    assert_eq!(a.protocol("web-1"), "slb_web_1");
    assert_eq!(a.withdraw_grace, Duration::from_secs(1));
    assert_eq!(a.settle_time, Duration::from_secs(2));
    assert!(Config::parse(GOOD, "test.toml").unwrap().announce.is_none());
}

#[test]
fn announce_options_are_checked() {
    for (option, error) in [
        (
            r#"bird_socket = "bird.ctl""#,
            "announce.bird_socket: bird.ctl must be an absolute path to a file",
        ),
        (
            r#"include_file = "/""#,
            "announce.include_file: / must be an absolute path to a file",
        ),
        (
            r#"protocol = "slb-web""#,
            "announce.protocol: \"slb-web\" is not a BIRD protocol name: use 1 to 60 letters, \
             digits or '_', beginning with a letter or '_'",
        ),
        (
            r#"protocol = "1slb""#,
            "announce.protocol: \"1slb\" is not a BIRD protocol name",
        ),
        (
            r#"withdraw_grace = "2m""#,
            "announce.withdraw_grace: 2m is longer than the 1m allowed",
        ),
        (
            r#"settle_time = "61s""#,
            "announce.settle_time: 1m 1s is longer than the 1m allowed",
        ),
        (r#"bgp = true"#, "unknown field `bgp`"),
    ] {
        let e = error_of(&format!("{GOOD}[announce]\n{option}\n"));
        assert!(e.contains(error), "{option}: {e}");
    }
    let long = "i".repeat(64);
    let e = error_of(&format!(
        "{}[announce]\n",
        GOOD.replace("instance = \"t1\"", &format!("instance = \"{long}\""))
    ));
    assert!(
        e.contains(&format!(
            "announce.protocol: the default \"slb_{long}\" (from the instance name) is not a BIRD \
             protocol name"
        )),
        "{e}"
    );
}

#[test]
fn a_group_may_start_unhealthy() {
    let c = Config::parse(GOOD, "test.toml").unwrap();
    assert_eq!(c.groups[0].initial_health, InitialHealth::Healthy);
    assert_eq!(c.default_group.initial_health, InitialHealth::Healthy);
    let text = GOOD.replace(
        "[default_group]\n",
        "[default_group]\ninitial_health = \"unhealthy\"\n",
    );
    let c = Config::parse(&text, "test.toml").unwrap();
    assert_eq!(c.default_group.initial_health, InitialHealth::Unhealthy);
    let e = error_of(&GOOD.replace(
        "[default_group]\n",
        "[default_group]\ninitial_health = \"sick\"\n",
    ));
    assert!(
        e.contains("unknown variant `sick`, expected `healthy` or `unhealthy`"),
        "{e}"
    );
}

#[test]
fn access_lists_and_new_flow_limits_are_checked() {
    let web = |fields: &str| {
        GOOD.replacen(
            "name = \"web\"\n",
            &format!("name = \"web\"\n{fields}\n"),
            1,
        )
    };
    let ok = Config::parse(
        &web(r#"acl = { mode = "deny", cidrs = ["10.0.0.0/8", "192.0.2.1", "0.0.0.0/0"] }"#),
        "t",
    )
    .unwrap();
    let acl = ok.listeners[0].acl.as_ref().unwrap();
    assert_eq!(
        (acl.mode, acl.established),
        (AclMode::Deny, AclEstablished::Keep)
    );
    assert_eq!(acl.prefixes(ok.listeners[0].vip).unwrap().len(), 3);

    let cases = [
        (r#"acl = { mode = "allow", cidrs = ["10.0.0.1/8"] }"#, "listeners[0] (web).acl.cidrs[0]: \"10.0.0.1/8\" has bits set past its /8; write 10.0.0.0/8"),
        (r#"acl = { mode = "allow", cidrs = ["10.0.0.0/8", "nonsense"] }"#, "acl.cidrs[1]: \"nonsense\" is not an address or a prefix"),
        (r#"acl = { mode = "allow", cidrs = ["10.0.0.0/33"] }"#, "acl.cidrs[0]: \"10.0.0.0/33\" is not an address or a prefix"),
        (r#"acl = { mode = "allow", cidrs = ["2001:db8::/32"] }"#, "\"2001:db8::/32\" can never match: the listener's VIP 10.0.0.10 takes only IPv4 clients"),
        (r#"acl = { mode = "allow", cidrs = ["10.0.0.0/8", "10.0.0.0/8"] }"#, "acl.cidrs[1]: \"10.0.0.0/8\" is listed twice"),
        (r#"acl = { mode = "allow", cidrs = [] }"#, "acl.cidrs: is empty: an allow list without prefixes admits no client"),
        (r#"acl = { mode = "permit", cidrs = [] }"#, "unknown variant `permit`, expected `allow` or `deny`"),
        (r#"acl = { mode = "deny", cidrs = [], established = "drop" }"#, "unknown variant `drop`, expected `keep` or `cut`"),
        ("max_new_connections_per_second = 0", "max_new_connections_per_second: 0 must be between 1 and 100000000"),
        ("new_connections_burst = 10", "new_connections_burst: applies with max_new_connections_per_second, which is not set"),
        ("max_new_connections_per_second = 10\nnew_connections_burst = 601", "new_connections_burst: 601 must be between 1 and 60 seconds' worth of max_new_connections_per_second (600)"),
    ];
    for (fields, expected) in cases {
        let e = error_of(&web(fields));
        assert!(e.contains(expected), "{fields}: {e}");
    }
    let http = format!(
        "{GOOD}\n[[listeners]]\nname = \"site\"\nprotocol = \"http\"\nvip = \"10.0.0.10\"\nport = 8000\nacl = {{ mode = \"deny\", cidrs = [\"10.0.0.0/8\"] }}\n"
    );
    let e = error_of(&http);
    assert!(e.contains("(site).acl: is enforced by the XDP data plane, for tcp/udp listeners; this one is http"), "{e}");
    let too_many: Vec<String> = (0..=slb_common::MAX_ACL_PREFIXES_PER_LISTENER)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let e = error_of(&web(&format!(
        r#"acl = {{ mode = "deny", cidrs = [{}] }}"#,
        too_many.join(",")
    )));
    assert!(
        e.contains("acl.cidrs: 16385 prefixes, at most 16384 per listener"),
        "{e}"
    );

    // Eight full lists leave no room for one to change.
    let full: Vec<String> = (0..slb_common::MAX_ACL_PREFIXES_PER_LISTENER)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let mut many = GOOD.to_string();
    for i in 0..8 {
        many.push_str(&format!(
            "\n[[listeners]]\nname = \"l{i}\"\nprotocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = {}\nacl = {{ mode = \"deny\", cidrs = [{}] }}\n",
            9000 + i,
            full.join(",")
        ));
    }
    let e = error_of(&many);
    assert!(
        e.contains("listeners: the access lists hold 131072 prefixes in all; with room to rewrite the largest (16384, listener \"l0\") during a change, at most 131072 fit"),
        "{e}"
    );
}

#[test]
fn slow_start_needs_a_weighted_group_a_checked_tcp_udp_listener_and_a_sane_duration() {
    let with_check = GOOD.replacen(
        "name = \"web\"\n",
        "name = \"web\"\nhealth_check = { type = \"tcp\" }\n",
        1,
    );
    let pool = |text: &str, slow_start: &str| {
        text.replacen(
            "name = \"pool\"\n",
            &format!("name = \"pool\"\nslow_start = \"{slow_start}\"\n"),
            1,
        )
    };
    let ok = Config::parse(&pool(&with_check, "30s"), "t").unwrap();
    assert_eq!(ok.groups[0].slow_start, Some(Duration::from_secs(30)));
    let e = error_of(&pool(GOOD, "30s"));
    assert!(
        e.contains("(web).health_check: group \"pool\" has slow_start, which starts when a backend's checks find it healthy"),
        "{e}"
    );
    let e = error_of(&pool(&with_check, "2h"));
    assert!(
        e.contains("(pool).slow_start: 2h must be between 1s and 1h"),
        "{e}"
    );
    let e = error_of(&pool(&with_check, "500ms"));
    assert!(e.contains("must be between 1s and 1h"), "{e}");
}

/// GOOD with `line` added to listener `listener` (after its port).
fn with_listener_line(listener: &str, port: u16, line: &str) -> String {
    let needle = format!("name = \"{listener}\"\nprotocol");
    assert!(GOOD.contains(&needle) || with_http_listener("").contains(&needle));
    with_http_listener("").replace(
        &format!("port = {port}\n"),
        &format!("port = {port}\n{line}\n"),
    )
}

/// A group of `count` backends 10.0.3.x:8080 and a TCP listener "big" on it.
fn with_big_group(count: usize, backend_extra: &str, listener_extra: &str) -> String {
    let backends: Vec<String> = (1..=count)
        .map(|i| format!("{{ address = \"10.0.3.{i}\", port = 8080{backend_extra} }}"))
        .collect();
    format!(
        "{GOOD}[[groups]]\nname = \"big\"\nbackends = [{}]\n[[listeners]]\nname = \"big\"\n\
         protocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = 81\ngroup = \"big\"\n{listener_extra}\n",
        backends.join(", ")
    )
}

#[test]
fn schedulers_default_per_protocol_and_are_refused_where_they_cannot_work() {
    let c = Config::parse(&with_http_listener(""), "t").unwrap();
    let scheduler = |name: &str| {
        c.listeners
            .iter()
            .find(|l| l.name == name)
            .unwrap()
            .scheduler()
    };
    assert_eq!(scheduler("web"), Scheduler::Maglev);
    assert_eq!(scheduler("dns"), Scheduler::Maglev);
    assert_eq!(scheduler("site"), Scheduler::Wrr);
    for (listener, port, scheduler) in [
        ("web", 80, Scheduler::Wlc),
        ("web", 80, Scheduler::Maglev),
        ("dns", 53, Scheduler::Maglev),
        ("site", 8000, Scheduler::Wlc),
        ("site", 8000, Scheduler::Wrr),
    ] {
        let text = with_listener_line(listener, port, &format!("scheduler = \"{scheduler}\""));
        let c = Config::parse(&text, "t").unwrap();
        let l = c.listeners.iter().find(|l| l.name == listener).unwrap();
        assert_eq!(l.scheduler(), scheduler);
    }
    let refused = |listener: &str, port: u16, scheduler: &str| {
        error_of(&with_listener_line(
            listener,
            port,
            &format!("scheduler = \"{scheduler}\""),
        ))
    };
    assert_eq!(
        refused("dns", 53, "wlc"),
        "listeners[1] (dns).scheduler: wlc needs TCP's connection state (a SYN opens \
         a connection, a FIN or RST closes it); a udp listener takes maglev"
    );
    let e = refused("web", 80, "wrr");
    assert!(
        e.contains("listeners[0] (web).scheduler: wrr is the http/https proxy's round robin")
            && e.contains("maglev (the default) or wlc"),
        "{e}"
    );
    let e = refused("site", 8000, "maglev");
    assert!(
        e.contains("listeners[2] (site).scheduler: maglev is the tcp/udp listeners'"),
        "{e}"
    );
}

#[test]
fn wlc_needs_a_weighted_group_the_data_plane_can_scan() {
    let pair = "[[groups]]\nname = \"db\"\ntype = \"active-standby\"\n\
                backends = [{ address = \"10.0.2.2\", port = 5432 }, { address = \"10.0.2.3\", port = 5432 }]\n\
                [[listeners]]\nname = \"db\"\nprotocol = \"tcp\"\nvip = \"10.0.0.10\"\nport = 5432\n\
                group = \"db\"\nscheduler = \"wlc\"\n";
    let e = error_of(&format!("{GOOD}{pair}"));
    assert!(
        e.contains("listeners[2] (db).scheduler: group \"db\" is active-standby"),
        "{e}"
    );
    let limit = slb_common::MAX_WLC_BACKENDS as usize;
    Config::parse(&with_big_group(limit, "", "scheduler = \"wlc\""), "t").unwrap();
    let e = error_of(&with_big_group(limit + 1, "", "scheduler = \"wlc\""));
    assert!(
        e.contains("listeners[2] (big).scheduler: group \"big\" has 65 backends; wlc picks among at most 64"),
        "{e}"
    );
    // Maglev has no such limit.
    Config::parse(&with_big_group(limit + 1, "", ""), "t").unwrap();
}

#[test]
fn a_backends_max_connections_is_bounded_and_only_for_tcp_udp_weighted_groups() {
    let limited = GOOD.replace("weight = 2 }", "weight = 2, max_connections = 1000 }");
    let c = Config::parse(&limited, "t").unwrap();
    assert_eq!(c.groups[0].backends[0].max_connections, Some(1000));
    assert_eq!(c.groups[0].backends[1].max_connections, None);
    for bad in [0, MAX_BACKEND_MAX_CONNECTIONS + 1] {
        let e = error_of(&GOOD.replace(
            "weight = 2 }",
            &format!("weight = 2, max_connections = {bad} }}"),
        ));
        assert_eq!(
            e,
            format!(
                "groups[0] (pool).backends[0].max_connections: {bad} must be between 1 \
                 and {MAX_BACKEND_MAX_CONNECTIONS}"
            )
        );
    }
    // The same group under an HTTP listener: the proxy has its own, per-group limit.
    let e = error_of(&format!(
        "{limited}[[listeners]]\nname = \"site\"\nprotocol = \"http\"\nvip = \"10.0.0.10\"\n\
         port = 8000\ngroup = \"pool\"\n"
    ));
    assert!(
        e.contains("listeners[2] (site).group: group \"pool\" sets max_connections on backend 10.0.1.2:8080")
            && e.contains("the group's own max_connections"),
        "{e}"
    );
    let pair = "[[groups]]\nname = \"db\"\ntype = \"active-standby\"\n\
                backends = [{ address = \"10.0.2.2\", port = 5432, max_connections = 5 }, { address = \"10.0.2.3\", port = 5432 }]\n";
    let e = error_of(&format!("{GOOD}{pair}"));
    assert!(
        e.contains(
            "groups[1] (db).backends[0].max_connections: an active-standby group has its own rule"
        ),
        "{e}"
    );
    let limit = slb_common::MAX_WLC_BACKENDS as usize;
    Config::parse(&with_big_group(limit, ", max_connections = 10", ""), "t").unwrap();
    let e = error_of(&with_big_group(limit + 1, ", max_connections = 10", ""));
    assert!(
        e.contains("groups[1] (big).backends[0].max_connections: the group has 65 backends")
            && e.contains("at most 64"),
        "{e}"
    );
}

#[test]
fn unset_scheduler_and_limits_stay_out_of_the_serialized_config() {
    let c = Config::parse(&with_http_listener(""), "t").unwrap();
    let text = toml::to_string(&c).unwrap();
    assert!(
        !text.contains("scheduler") && !text.contains("max_connections = 1000"),
        "{text}"
    );
    let limited = with_listener_line("web", 80, "scheduler = \"wlc\"")
        .replace("weight = 2 }", "weight = 2, max_connections = 1000 }");
    let limited = limited.replace(
        "name = \"site\"\nprotocol = \"http\"\nvip = \"10.0.0.10\"\nport = 8000\ngroup = \"pool\"\n",
        "name = \"site\"\nprotocol = \"http\"\nvip = \"10.0.0.10\"\nport = 8000\n",
    );
    let c = Config::parse(&limited, "t").unwrap();
    let again = Config::parse(&toml::to_string(&c).unwrap(), "t").unwrap();
    assert_eq!(again.listeners, c.listeners);
    assert_eq!(again.groups, c.groups);
}

#[test]
fn a_runtime_add_takes_max_connections_under_the_same_rules() {
    let add = |c: &Config, group: &str, max| {
        c.edit_backend(&BackendEdit {
            group: group.into(),
            address: "10.0.1.9".parse().unwrap(),
            port: Some(8080),
            action: EditAction::Add {
                weight: 1,
                max_connections: Some(max),
            },
        })
    };
    let c = Config::parse(GOOD, "t").unwrap();
    let (next, what) = add(&c, "pool", 500).unwrap();
    assert_eq!(
        what,
        "added backend 10.0.1.9:8080 with weight 1 and max_connections 500 to group pool"
    );
    assert_eq!(next.groups[0].backends[2].max_connections, Some(500));
    let e = add(&c, "pool", 0).unwrap_err().to_string();
    assert!(e.contains("max_connections: 0 must be between 1"), "{e}");
    let http = Config::parse(&with_http_listener(""), "t").unwrap();
    let e = add(&http, "pool", 500).unwrap_err().to_string();
    assert!(
        e.contains("(site).group: group \"pool\" sets max_connections"),
        "{e}"
    );
}
