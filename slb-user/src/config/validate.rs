//! Validation of a parsed config, by part: sizes, interfaces, groups and their backends, then
//! each listener by kind (what every listener needs, what only TCP/UDP or only HTTP(S) listeners
//! take, health checks). Every error names the field and the value that is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use slb_common::maglev::is_prime;
use slb_common::{
    MAX_ACL_ENTRIES, MAX_ACL_PREFIXES_PER_LISTENER, MAX_BACKENDS, MAX_LISTENERS, MAX_RING_SIZE,
    MAX_WLC_BACKENDS,
};

use super::edit::BackendName;
use super::resolve::{Endpoint, ResolvedBackend, ResolvedListener};
use super::{
    invalid, AclMode, Announce, BackendSpec, CheckKind, Config, ConfigError, ConnectionLimits,
    CookiePersistence, DsrMode, Forwarding, Group, GroupKind, HealthCheck, Interface, Listener,
    Protocol, Scheduler, SnatPorts, DEFAULT_GROUP, MAX_ANNOUNCE_DELAY, MAX_BACKEND_CONNECTIONS,
    MAX_BACKEND_MAX_CONNECTIONS, MAX_CHECK_INTERVAL, MAX_CHECK_TIMEOUT, MAX_IDLE_TIMEOUT,
    MAX_NEW_CONNECTIONS_PER_SECOND, MAX_PERSISTENCE_TIMEOUT, MAX_QUEUED_REQUESTS, MAX_SLOW_START,
    MAX_THRESHOLD, MAX_WEIGHT, MIN_CHECK_INTERVAL, MIN_ICMP_CHECK_INTERVAL, MIN_IDLE_TIMEOUT,
    MIN_SLOW_START,
};

/// Names a field of one listener: `listeners[<i>] (<name>).<field>`.
type FieldOf<'a> = &'a dyn Fn(&str) -> String;

/// The defined groups by name.
type Groups<'a> = BTreeMap<&'a str, &'a Group>;

/// What the listeners seen so far claim, so the next one cannot claim it again.
#[derive(Default)]
struct Claims<'a> {
    names: BTreeSet<&'a str>,
    /// (VIP, port, protocol) of each listener.
    endpoints: BTreeSet<(IpAddr, u16, u8)>,
    /// (backend address, port, protocol) → the TCP/UDP listener it serves.
    /// Backend endpoints by the listener that claims them, and whether it is full NAT.
    reply_endpoints: BTreeMap<(IpAddr, u16, u8), (&'a str, bool)>,
    /// (VIP, port, protocol) → name of every listener of the config, which no backend may be.
    own_listeners: BTreeMap<(IpAddr, u16, u8), &'a str>,
    backends: usize,
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sizes()?;
        validate_interfaces(&self.interfaces)?;
        if let Some(announce) = &self.announce {
            validate_announce(announce, &self.instance)?;
        }
        let groups = validate_groups(&self.groups)?;
        validate_backends("default_group", &self.default_group.backends)?;
        validate_backend_limits(
            "default_group",
            GroupKind::Vserver,
            &self.default_group.backends,
        )?;
        validate_connection_limits("default_group", &self.default_group.limits())?;
        validate_slow_start(
            "default_group",
            GroupKind::Vserver,
            self.default_group.slow_start,
        )?;
        if self.listeners.len() > MAX_LISTENERS as usize {
            return Err(invalid(
                "listeners",
                format!(
                    "{} listeners, at most {MAX_LISTENERS} are supported",
                    self.listeners.len()
                ),
            ));
        }
        let mut claims = Claims {
            own_listeners: self
                .listeners
                .iter()
                .map(|l| ((l.vip, l.port, l.protocol.ip_protocol()), l.name.as_str()))
                .collect(),
            ..Claims::default()
        };
        for (i, l) in self.listeners.iter().enumerate() {
            self.validate_listener(i, l, &groups, &mut claims)?;
        }
        validate_acl_total(&self.listeners)?;
        if claims.backends > MAX_BACKENDS as usize {
            return Err(invalid(
                "listeners",
                format!(
                    "{} listener backends in all, at most {MAX_BACKENDS} are supported",
                    claims.backends
                ),
            ));
        }
        Ok(())
    }

    fn validate_sizes(&self) -> Result<(), ConfigError> {
        if !(slb_common::MIN_MAX_CONNECTIONS..=slb_common::MAX_MAX_CONNECTIONS)
            .contains(&self.max_connections)
        {
            return Err(invalid(
                "max_connections",
                format!(
                    "{} must be between {} and {}",
                    self.max_connections,
                    slb_common::MIN_MAX_CONNECTIONS,
                    slb_common::MAX_MAX_CONNECTIONS
                ),
            ));
        }
        if !is_prime(self.maglev_table_size) || self.maglev_table_size > MAX_RING_SIZE {
            return Err(invalid(
                "maglev_table_size",
                format!(
                    "{} must be a prime no larger than {MAX_RING_SIZE} (e.g. 65537 or 655373)",
                    self.maglev_table_size
                ),
            ));
        }
        Ok(())
    }

    fn validate_listener<'a>(
        &'a self,
        i: usize,
        l: &'a Listener,
        groups: &Groups<'_>,
        claims: &mut Claims<'a>,
    ) -> Result<(), ConfigError> {
        validate_name(format!("listeners[{i}].name"), &l.name)?;
        let label = format!("listeners[{i}] ({})", l.name);
        let at = |f: &str| format!("{label}.{f}");
        if !claims.names.insert(&l.name) {
            return Err(invalid(
                at("name"),
                format!("listener {:?} is defined twice", l.name),
            ));
        }
        self.validate_listener_endpoint(&at, l, claims)?;
        let kind = match &l.group {
            None => GroupKind::Vserver,
            Some(g) => {
                groups
                    .get(g.as_str())
                    .ok_or_else(|| {
                        invalid(
                            at("group"),
                            format!(
                                "no group named {g:?} (defined groups: {})",
                                group_list(groups)
                            ),
                        )
                    })?
                    .kind
            }
        };
        if l.protocol.is_l7() {
            validate_l7_listener(&at, l, kind, groups)?;
        } else {
            validate_l4_only_fields(&at, l)?;
        }
        if let Some(check) = &l.health_check {
            validate_health_check(&at("health_check"), check, l.protocol)?;
        }
        let resolved = self.resolve(l);
        validate_listener_slow_start(&at, l, &resolved)?;
        validate_scheduler(&at, l, &resolved)?;
        validate_listener_backend_limits(&at, l, &resolved)?;
        refuse_own_listeners_as_backends(&at, &resolved, &claims.own_listeners)?;
        refuse_mixed_families(&label, &resolved)?;
        let backends = &resolved.group().backends;
        validate_dsr_mode(&at, l)?;
        validate_full_nat(&at, l)?;
        // A backend's reply to an SNAT address that is also a VIP would be taken for a client's
        // packet to a listener.
        if let Some(vip) = l
            .snat_addresses
            .iter()
            .find(|a| self.listeners.iter().any(|o| o.vip == **a))
        {
            return Err(invalid(
                at("snat_addresses"),
                format!("{vip} is a VIP; an SNAT address must be an address of this host that no listener uses"),
            ));
        }
        if l.forwarding == Forwarding::Dsr {
            validate_direct_return(&at, l, &resolved)?;
        } else if !l.protocol.is_l7() {
            claim_reply_endpoints(&at, l, backends, &mut claims.reply_endpoints)?;
        }
        validate_timeouts(&at, l)?;
        validate_admission(&at, l)?;
        claims.backends += backends.len();
        // Maglev needs many more slots than backends to balance them.
        if (self.maglev_table_size as usize) < backends.len() * 10 {
            return Err(invalid(
                "maglev_table_size",
                format!(
                    "{} is too small for listener {:?} with {} backends (needs at least 10 slots per backend)",
                    self.maglev_table_size,
                    l.name,
                    backends.len()
                ),
            ));
        }
        Ok(())
    }

    /// The listener's port, VIP and (VIP, port, protocol), which no other listener may have.
    fn validate_listener_endpoint(
        &self,
        at: FieldOf<'_>,
        l: &Listener,
        claims: &mut Claims<'_>,
    ) -> Result<(), ConfigError> {
        if l.port == 0 {
            return Err(invalid(at("port"), "0 is not a valid port"));
        }
        if !self.vips.is_empty() && !self.vips.contains(&l.vip) {
            return Err(invalid(
                at("vip"),
                format!("{} is not one of the instance's vips", l.vip),
            ));
        }
        validate_unicast(at("vip"), l.vip)?;
        if !claims
            .endpoints
            .insert((l.vip, l.port, l.protocol.ip_protocol()))
        {
            return Err(invalid(
                at("port"),
                format!(
                    "{}/{} is already used by another listener",
                    Endpoint::new(l.vip, l.port),
                    l.protocol
                ),
            ));
        }
        Ok(())
    }
}

fn validate_interfaces(interfaces: &[Interface]) -> Result<(), ConfigError> {
    if interfaces.is_empty() {
        return Err(invalid(
            "interfaces",
            "at least one interface to attach to is required",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, iface) in interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}].name");
        if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains('/') {
            return Err(invalid(
                field,
                format!("{:?} is not a valid interface name", iface.name),
            ));
        }
        if !seen.insert(&iface.name) {
            return Err(invalid(field, format!("{:?} is listed twice", iface.name)));
        }
    }
    Ok(())
}

/// A backend that is one of this instance's own listeners sends every request (or packet)
/// around again: the proxy recursed thousands of times on one request.
fn refuse_own_listeners_as_backends(
    at: FieldOf<'_>,
    resolved: &ResolvedListener<'_>,
    own: &BTreeMap<(IpAddr, u16, u8), &str>,
) -> Result<(), ConfigError> {
    let protocol = resolved.listener.protocol.ip_protocol();
    for group in &resolved.groups {
        for b in &group.backends {
            if let Some(name) = own.get(&(b.address, b.port, protocol)) {
                return Err(invalid(
                    at("group"),
                    format!(
                        "backend {} of group {:?} is this instance's own listener {name:?}: traffic would loop through slb",
                        b.endpoint(),
                        group.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_announce(announce: &Announce, instance: &str) -> Result<(), ConfigError> {
    let absolute = |field: &str, path: &std::path::Path| {
        if path.is_absolute() && path.file_name().is_some() {
            Ok(())
        } else {
            Err(invalid(
                format!("announce.{field}"),
                format!("{} must be an absolute path to a file", path.display()),
            ))
        }
    };
    absolute("bird_socket", &announce.bird_socket)?;
    if let Some(file) = &announce.include_file {
        absolute("include_file", file)?;
    }
    // A BIRD symbol, with room for the "_v4"/"_v6" slb appends.
    let protocol = announce.protocol(instance);
    let ok = (1..=60).contains(&protocol.len())
        && protocol.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && protocol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        let which = if announce.protocol.is_some() {
            format!("{protocol:?}")
        } else {
            format!("the default {protocol:?} (from the instance name)")
        };
        return Err(invalid(
            "announce.protocol",
            format!(
                "{which} is not a BIRD protocol name: use 1 to 60 letters, digits or '_', \
                 beginning with a letter or '_'"
            ),
        ));
    }
    for (field, value) in [
        ("withdraw_grace", announce.withdraw_grace),
        ("settle_time", announce.settle_time),
    ] {
        if value > MAX_ANNOUNCE_DELAY {
            return Err(invalid(
                format!("announce.{field}"),
                format!(
                    "{} is longer than the {} allowed",
                    humantime::format_duration(value),
                    humantime::format_duration(MAX_ANNOUNCE_DELAY)
                ),
            ));
        }
    }
    Ok(())
}

/// Listener and group names appear in logs, terminals, metrics labels and file contents: 1 to 63
/// letters, digits, '.', '_' or '-', beginning with a letter or digit.
fn validate_name(field: String, name: &str) -> Result<(), ConfigError> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{name:?} is not a name: use 1 to 63 letters, digits, '.', '_' or '-', beginning with a letter or digit"
        ),
    ))
}

/// A VIP or a backend is one host: not 0.0.0.0 or ::, the broadcast address or a multicast
/// group. An IPv6 one is also not an IPv4 address in IPv6 clothing (the maps store IPv4 as
/// `::ffff:a.b.c.d`, so a mapped VIP or backend would be the IPv4 one), not link-local (it names
/// no interface, and the config has no place for a scope) and not loopback (never on the wire).
fn validate_unicast(field: String, address: IpAddr) -> Result<(), ConfigError> {
    let broadcast = matches!(address, IpAddr::V4(v4) if v4.is_broadcast());
    if address.is_unspecified() || address.is_multicast() || broadcast {
        return Err(invalid(
            field,
            format!("{address} is not a unicast address"),
        ));
    }
    let IpAddr::V6(v6) = address else {
        return Ok(());
    };
    if v6.is_loopback() {
        return Err(invalid(
            field,
            format!("{address} is the IPv6 loopback address; use an address of an interface"),
        ));
    }
    if let Some(v4) = v6.to_ipv4() {
        return Err(invalid(
            field,
            format!("{address} is an IPv4-mapped or IPv4-compatible IPv6 address; write the IPv4 address {v4}"),
        ));
    }
    if v6.is_unicast_link_local() {
        return Err(invalid(
            field,
            format!("{address} is link-local (fe80::/10), which needs an interface scope; use a global or unique-local address"),
        ));
    }
    Ok(())
}

/// The rule of address families for a tcp/udp listener: every backend has the VIP's family,
/// because the data plane rewrites the addresses of a packet and cannot turn an IPv4 packet
/// into an IPv6 one. HTTP(S) listeners may mix, as the proxy opens its own connections.
fn refuse_mixed_families(
    listener_label: &str,
    resolved: &ResolvedListener<'_>,
) -> Result<(), ConfigError> {
    let l = resolved.listener;
    if l.protocol.is_l7() {
        return Ok(());
    }
    for group in &resolved.groups {
        for b in &group.backends {
            if b.address.is_ipv6() != l.vip.is_ipv6() {
                return Err(invalid(
                    listener_label,
                    format!(
                        "backend {} of group {:?} is {} but the listener's VIP {} is {} (tcp/udp listeners rewrite addresses, not address families)",
                        b.endpoint(),
                        group.name,
                        family(b.address),
                        l.vip,
                        family(l.vip)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn family(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// The proxy's bounds on connections to a group's backends: at least one connection, a queue
/// of any length up to the limit (0: 503 at once when all connections are busy), a wait that
/// is brief but long enough to be a wait.
fn validate_connection_limits(group: &str, limits: &ConnectionLimits) -> Result<(), ConfigError> {
    if !(1..=MAX_BACKEND_CONNECTIONS).contains(&limits.max_connections) {
        return Err(invalid(
            format!("{group}.max_connections"),
            format!(
                "{} must be between 1 and {MAX_BACKEND_CONNECTIONS}",
                limits.max_connections
            ),
        ));
    }
    if limits.max_queued_requests > MAX_QUEUED_REQUESTS {
        return Err(invalid(
            format!("{group}.max_queued_requests"),
            format!(
                "{} must be at most {MAX_QUEUED_REQUESTS}",
                limits.max_queued_requests
            ),
        ));
    }
    if !(Duration::from_millis(1)..=Duration::from_secs(60)).contains(&limits.queue_timeout) {
        return Err(invalid(
            format!("{group}.queue_timeout"),
            format!(
                "{} must be between 1ms and 60s",
                humantime::format_duration(limits.queue_timeout)
            ),
        ));
    }
    Ok(())
}

/// Checks each group and its backends; returns the groups by name.
fn validate_groups(defined: &[Group]) -> Result<Groups<'_>, ConfigError> {
    let mut groups = Groups::new();
    for (i, group) in defined.iter().enumerate() {
        validate_name(format!("groups[{i}].name"), &group.name)?;
        if group.name == DEFAULT_GROUP {
            return Err(invalid(
                format!("groups[{i}].name"),
                format!(
                    "{:?} is reserved or empty; name the group something else",
                    group.name
                ),
            ));
        }
        if groups.insert(&group.name, group).is_some() {
            return Err(invalid(
                format!("groups[{i}].name"),
                format!("group {:?} is defined twice", group.name),
            ));
        }
        let label = format!("groups[{i}] ({})", group.name);
        validate_backends(&label, &group.backends)?;
        validate_backend_limits(&label, group.kind, &group.backends)?;
        validate_connection_limits(&label, &group.limits())?;
        validate_slow_start(&label, group.kind, group.slow_start)?;
        if group.kind == GroupKind::ActiveStandby && group.backends.len() != 2 {
            return Err(invalid(
                format!("groups[{i}] ({}).backends", group.name),
                format!(
                    "an active-standby group has exactly two servers (the active first, then the standby); this one has {}",
                    group.backends.len()
                ),
            ));
        }
    }
    Ok(groups)
}

fn validate_slow_start(
    label: &str,
    kind: GroupKind,
    slow_start: Option<Duration>,
) -> Result<(), ConfigError> {
    let Some(slow_start) = slow_start else {
        return Ok(());
    };
    if kind == GroupKind::ActiveStandby {
        return Err(invalid(
            format!("{label}.slow_start"),
            "applies to weighted groups; an active-standby group has no weights to ramp",
        ));
    }
    if !(MIN_SLOW_START..=MAX_SLOW_START).contains(&slow_start) {
        return Err(invalid(
            format!("{label}.slow_start"),
            format!(
                "{} must be between 1s and 1h",
                humantime::format_duration(slow_start)
            ),
        ));
    }
    Ok(())
}

/// Per-backend `max_connections`: in bounds, and only where the data plane can enforce it: a
/// weighted group (an active-standby pair has its own rule) small enough for the least-loaded
/// scan that moves a new flow off a backend at its limit.
fn validate_backend_limits(
    group: &str,
    kind: GroupKind,
    backends: &[BackendSpec],
) -> Result<(), ConfigError> {
    for (i, b) in backends.iter().enumerate() {
        let Some(max) = b.max_connections else {
            continue;
        };
        let field = format!("{group}.backends[{i}].max_connections");
        if !(1..=MAX_BACKEND_MAX_CONNECTIONS).contains(&max) {
            return Err(invalid(
                field,
                format!("{max} must be between 1 and {MAX_BACKEND_MAX_CONNECTIONS}"),
            ));
        }
        if kind == GroupKind::ActiveStandby {
            return Err(invalid(
                field,
                "an active-standby group has its own rule (the active server while it is healthy, \
                    else the standby); max_connections is for vserver groups",
            ));
        }
        if backends.len() > MAX_WLC_BACKENDS as usize {
            return Err(invalid(
                field,
                format!(
                    "the group has {} backends; a backend at its max_connections hands new flows \
                        to the least loaded of at most {MAX_WLC_BACKENDS}",
                    backends.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Which schedulers a listener's protocol and group allow: TCP `maglev` or `wlc`, UDP `maglev`
/// (least connections counts what a SYN opens and a FIN or RST closes), HTTP(S) `wrr` or
/// `wlc`; `wlc` at L4 only on a weighted group the data plane's scan covers.
fn validate_scheduler(
    at: FieldOf<'_>,
    l: &Listener,
    resolved: &ResolvedListener<'_>,
) -> Result<(), ConfigError> {
    let Some(scheduler) = l.scheduler else {
        return Ok(());
    };
    let refused = match (l.protocol, scheduler) {
        (Protocol::Http | Protocol::Https, Scheduler::Maglev) => format!(
            "maglev is the tcp/udp listeners' consistent hashing; a {} listener takes wrr (the \
                default) or wlc",
            l.protocol
        ),
        (Protocol::Http | Protocol::Https, _) => return Ok(()),
        (_, Scheduler::Wrr) => format!(
            "wrr is the http/https proxy's round robin; a {} listener takes maglev (the default){}",
            l.protocol,
            if l.protocol == Protocol::Tcp {
                " or wlc"
            } else {
                ""
            }
        ),
        (Protocol::Udp, Scheduler::Wlc) => "wlc needs TCP's connection state (a SYN opens a \
            connection, a FIN or RST closes it); a udp listener takes maglev"
            .to_string(),
        (_, Scheduler::Maglev) => return Ok(()),
        (Protocol::Tcp, Scheduler::Wlc) => {
            let group = resolved.group();
            if group.kind == GroupKind::ActiveStandby {
                format!(
                    "group {:?} is active-standby, which has its own rule (the active server while \
                        it is healthy, else the standby); wlc is for vserver groups",
                    group.name
                )
            } else if group.backends.len() > MAX_WLC_BACKENDS as usize {
                format!(
                    "group {:?} has {} backends; wlc picks among at most {MAX_WLC_BACKENDS}",
                    group.name,
                    group.backends.len()
                )
            } else {
                return Ok(());
            }
        }
    };
    Err(invalid(at("scheduler"), refused))
}

/// Per-backend `max_connections` is the data plane's: an HTTP(S) listener's group cannot have
/// it (the proxy's limit is the group's own `max_connections`).
fn validate_listener_backend_limits(
    at: FieldOf<'_>,
    l: &Listener,
    resolved: &ResolvedListener<'_>,
) -> Result<(), ConfigError> {
    if !l.protocol.is_l7() {
        return Ok(());
    }
    for group in &resolved.groups {
        if let Some(b) = group.backends.iter().find(|b| b.max_connections.is_some()) {
            return Err(invalid(
                at("group"),
                format!(
                    "group {:?} sets max_connections on backend {}, which the data plane enforces \
                        for tcp/udp listeners; this one is {} (the proxy's limit is the group's own \
                        max_connections: connections slb opens to each backend)",
                    group.name,
                    b.endpoint(),
                    l.protocol
                ),
            ));
        }
    }
    Ok(())
}

/// A group's `slow_start` ramps a backend that its checks find healthy, in the data plane's
/// rings: the listeners it serves are tcp/udp and checked.
fn validate_listener_slow_start(
    at: FieldOf<'_>,
    l: &Listener,
    resolved: &ResolvedListener<'_>,
) -> Result<(), ConfigError> {
    let Some(group) = resolved.groups.iter().find(|g| g.slow_start.is_some()) else {
        return Ok(());
    };
    if l.protocol.is_l7() {
        return Err(invalid(
            at("group"),
            format!(
                "group {:?} has slow_start, which ramps the data plane's rings of tcp/udp listeners; this one is {} (give it a group without slow_start)",
                group.name, l.protocol
            ),
        ));
    }
    if l.health_check.is_none() {
        return Err(invalid(
            at("health_check"),
            format!(
                "group {:?} has slow_start, which starts when a backend's checks find it healthy: give the listener a health_check",
                group.name
            ),
        ));
    }
    Ok(())
}

/// The balancer recognises a backend's replies by their source alone, so a backend endpoint
/// belongs to one TCP/UDP listener.
/// A NAT listener's backend endpoints are its own: its replies are recognised by them. Full
/// NAT listeners may share endpoints among themselves (their replies are recognised by the
/// flow's SNAT port), but not with a NAT listener, whose reply translation would catch them.
fn claim_reply_endpoints<'a>(
    at: FieldOf<'_>,
    l: &'a Listener,
    backends: &[ResolvedBackend],
    claimed: &mut BTreeMap<(IpAddr, u16, u8), (&'a str, bool)>,
) -> Result<(), ConfigError> {
    let full_nat = l.forwarding == Forwarding::Fullnat;
    for b in backends {
        let endpoint = (b.address, b.port, l.protocol.ip_protocol());
        match claimed.insert(endpoint, (&l.name, full_nat)) {
            Some((_, true)) if full_nat => {}
            Some((other, _)) if other != l.name => {
                return Err(invalid(
                    at("group"),
                    format!(
                        "backend {}/{} also serves listener {other:?}; the balancer \
                         recognises a backend's replies by its address and port, so each \
                         belongs to one tcp/udp listener (give one of them another \
                         backend port in a VServer group)",
                        b.endpoint(),
                        l.protocol
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate_timeouts(at: FieldOf<'_>, l: &Listener) -> Result<(), ConfigError> {
    if let Some(timeout) = l.idle_timeout {
        if l.protocol.is_l7() {
            return Err(invalid(
                at("idle_timeout"),
                "is for tcp/udp listeners; http/https listeners have header_timeout and backend_timeout",
            ));
        }
        if !(MIN_IDLE_TIMEOUT..=MAX_IDLE_TIMEOUT).contains(&timeout) {
            return Err(invalid(
                at("idle_timeout"),
                format!(
                    "{} must be between 10s and 1h",
                    humantime::format_duration(timeout)
                ),
            ));
        }
    }
    if let Some(p) = &l.persistence {
        if p.timeout < Duration::from_secs(1) || p.timeout > MAX_PERSISTENCE_TIMEOUT {
            return Err(invalid(
                at("persistence.timeout"),
                format!(
                    "{} must be between 1s and 24h",
                    humantime::format_duration(p.timeout)
                ),
            ));
        }
        if let Some(prefix) = p.ipv6_prefix {
            if l.vip.is_ipv4() {
                return Err(invalid(
                    at("persistence.ipv6_prefix"),
                    format!(
                        "applies to listeners on an IPv6 VIP; this one's VIP {} is IPv4 (IPv4 clients are keyed on their whole address)",
                        l.vip
                    ),
                ));
            }
            if !(1..=128).contains(&prefix) {
                return Err(invalid(
                    at("persistence.ipv6_prefix"),
                    format!("{prefix} must be between 1 and 128 (bits of the client address)"),
                ));
            }
        }
    }
    Ok(())
}

/// Every listener's access list in the one ACL map, with room for the largest to be written
/// into its second set while it changes.
fn validate_acl_total(listeners: &[Listener]) -> Result<(), ConfigError> {
    let sizes = listeners
        .iter()
        .filter_map(|l| l.acl.as_ref().map(|a| (l.name.as_str(), a.cidrs.len())));
    let total: usize = sizes.clone().map(|(_, n)| n).sum();
    // The first of the largest.
    let Some((largest, most)) = sizes.rev().max_by_key(|(_, n)| *n) else {
        return Ok(());
    };
    if total + most > MAX_ACL_ENTRIES as usize {
        return Err(invalid(
            "listeners",
            format!(
                "the access lists hold {total} prefixes in all; with room to rewrite the largest ({most}, listener {largest:?}) during a change, at most {MAX_ACL_ENTRIES} fit"
            ),
        ));
    }
    Ok(())
}

/// The access list and the limit on new flows, which the data plane enforces (on tcp/udp
/// listeners only: slb's proxy accepts http/https connections).
fn validate_admission(at: FieldOf<'_>, l: &Listener) -> Result<(), ConfigError> {
    let l4_only = |field: &str| {
        invalid(
            at(field),
            format!(
                "is enforced by the XDP data plane, for tcp/udp listeners; this one is {} (slb's proxy answers it)",
                l.protocol
            ),
        )
    };
    if let Some(acl) = &l.acl {
        if l.protocol.is_l7() {
            return Err(l4_only("acl"));
        }
        if acl.cidrs.len() > MAX_ACL_PREFIXES_PER_LISTENER {
            return Err(invalid(
                at("acl.cidrs"),
                format!(
                    "{} prefixes, at most {MAX_ACL_PREFIXES_PER_LISTENER} per listener",
                    acl.cidrs.len()
                ),
            ));
        }
        if acl.cidrs.is_empty() && acl.mode == AclMode::Allow {
            return Err(invalid(
                at("acl.cidrs"),
                "is empty: an allow list without prefixes admits no client (remove the acl to admit every client)",
            ));
        }
        acl.prefixes(l.vip)
            .map_err(|e| invalid(at(&format!("acl.cidrs[{}]", e.index)), e.message))?;
    }
    if let Some(limit) = l.max_new_connections_per_second {
        if l.protocol.is_l7() {
            return Err(l4_only("max_new_connections_per_second"));
        }
        if !(1..=MAX_NEW_CONNECTIONS_PER_SECOND).contains(&limit) {
            return Err(invalid(
                at("max_new_connections_per_second"),
                format!("{limit} must be between 1 and {MAX_NEW_CONNECTIONS_PER_SECOND}"),
            ));
        }
    }
    if let Some(burst) = l.new_connections_burst {
        let Some(limit) = l.max_new_connections_per_second else {
            return Err(invalid(
                at("new_connections_burst"),
                "applies with max_new_connections_per_second, which is not set",
            ));
        };
        if !(1..=limit.saturating_mul(60)).contains(&burst) {
            return Err(invalid(
                at("new_connections_burst"),
                format!(
                    "{burst} must be between 1 and 60 seconds' worth of max_new_connections_per_second ({})",
                    u64::from(limit) * 60
                ),
            ));
        }
    }
    Ok(())
}

/// Direct server return sends the client's packet unchanged: to a tcp/udp listener's backends
/// listening on the listener's own port (nothing rewrites it), which slb must keep checking (a
/// health check also keeps each backend's MAC address known to the kernel, which the data plane
/// needs: it cannot hand a packet to the stack to resolve it).
fn validate_direct_return(
    at: FieldOf<'_>,
    l: &Listener,
    resolved: &ResolvedListener<'_>,
) -> Result<(), ConfigError> {
    if l.protocol.is_l7() {
        return Err(invalid(
            at("forwarding"),
            format!(
                "dsr applies to tcp/udp listeners; this one is {} (slb's proxy answers it)",
                l.protocol
            ),
        ));
    }
    for group in &resolved.groups {
        for b in &group.backends {
            if b.port != l.port {
                return Err(invalid(
                    at("forwarding"),
                    format!(
                        "dsr sends the client's packet unchanged, to port {}, but backend {} of group {:?} listens on {}: give it port {}",
                        l.port,
                        b.endpoint(),
                        group.name,
                        b.port,
                        l.port
                    ),
                ));
            }
        }
    }
    if l.health_check.is_none() {
        return Err(invalid(
            at("health_check"),
            "dsr needs a health check: it is also what keeps the MAC address of each backend (or of the gateway towards it) known to this host, which direct return sends to",
        ));
    }
    Ok(())
}

/// `dsr` only with `forwarding = "dsr"`, and `tunnel_source` exactly with `dsr = "ipip"`: an
/// address of the VIP's family that can be a packet's source.
fn validate_dsr_mode(at: FieldOf<'_>, l: &Listener) -> Result<(), ConfigError> {
    if let (Some(mode), None) = (l.dsr, l.dsr_mode()) {
        return Err(invalid(
            at("dsr"),
            format!(
                "dsr = \"{mode}\" applies only with forwarding = \"dsr\" (this listener forwards by {})",
                l.forwarding
            ),
        ));
    }
    match (l.dsr_mode(), l.tunnel_source) {
        (Some(DsrMode::Ipip), None) => Err(invalid(
            at("tunnel_source"),
            "dsr = \"ipip\" needs tunnel_source: the address of this host the tunnelled packets come from (the backends' decapsulators accept it)",
        )),
        (Some(DsrMode::Ipip), Some(source)) => {
            if source.is_ipv4() != l.vip.is_ipv4() {
                return Err(invalid(
                    at("tunnel_source"),
                    format!(
                        "{source} is not of the VIP's family ({}): packets to an {} VIP are tunnelled in {}",
                        l.vip,
                        if l.vip.is_ipv4() { "IPv4" } else { "IPv6" },
                        if l.vip.is_ipv4() { "IPv4" } else { "IPv6" },
                    ),
                ));
            }
            if source.is_unspecified() || source.is_multicast() || is_broadcast(source) {
                return Err(invalid(
                    at("tunnel_source"),
                    format!("{source} cannot be a packet's source address"),
                ));
            }
            Ok(())
        }
        (_, Some(source)) => Err(invalid(
            at("tunnel_source"),
            format!("{source}: a tunnel source applies only with dsr = \"ipip\""),
        )),
        (_, None) => Ok(()),
    }
}

/// `snat_addresses` and `snat_ports` exactly with `forwarding = "fullnat"`, which applies to
/// IPv4 tcp/udp listeners: 1 to 16 unicast addresses of the VIP's family, a valid port range.
fn validate_full_nat(at: FieldOf<'_>, l: &Listener) -> Result<(), ConfigError> {
    if l.forwarding != Forwarding::Fullnat {
        let full_nat_fields = [
            ("snat_addresses", !l.snat_addresses.is_empty()),
            ("snat_ports", l.snat_ports.is_some()),
        ];
        if let Some((field, _)) = full_nat_fields.iter().find(|(_, set)| *set) {
            return Err(invalid(
                at(field),
                format!(
                    "apply only with forwarding = \"fullnat\" (this listener forwards by {})",
                    l.forwarding
                ),
            ));
        }
        return Ok(());
    }
    if l.protocol.is_l7() {
        return Err(invalid(
            at("forwarding"),
            format!(
                "fullnat applies to tcp/udp listeners; this one is {} (slb's proxy answers it, from its own address already)",
                l.protocol
            ),
        ));
    }
    if l.vip.is_ipv6() {
        return Err(invalid(
            at("forwarding"),
            "fullnat is IPv4-only for now; an IPv6 listener forwards by nat or dsr",
        ));
    }
    if l.snat_addresses.is_empty() || l.snat_addresses.len() > slb_common::MAX_SNAT_ADDRESSES {
        return Err(invalid(
            at("snat_addresses"),
            format!(
                "fullnat needs 1 to {} addresses of this host that the backends' connections come from; {} given",
                slb_common::MAX_SNAT_ADDRESSES,
                l.snat_addresses.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for addr in &l.snat_addresses {
        if addr.is_ipv4() != l.vip.is_ipv4() {
            return Err(invalid(
                at("snat_addresses"),
                format!("{addr} is not of the VIP's family ({})", l.vip),
            ));
        }
        if addr.is_unspecified() || addr.is_multicast() || is_broadcast(*addr) || addr.is_loopback()
        {
            return Err(invalid(
                at("snat_addresses"),
                format!("{addr} cannot be a packet's source address towards a backend"),
            ));
        }
        if !seen.insert(*addr) {
            return Err(invalid(
                at("snat_addresses"),
                format!("{addr} is listed twice"),
            ));
        }
    }
    if let Some(text) = &l.snat_ports {
        SnatPorts::parse(text).map_err(|e| invalid(at("snat_ports"), e))?;
    }
    Ok(())
}

fn is_broadcast(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V4(v4) if v4.is_broadcast())
}

fn validate_l4_only_fields(at: FieldOf<'_>, l: &Listener) -> Result<(), ConfigError> {
    let l7_fields = [
        ("rules", !l.rules.is_empty()),
        ("certificates", !l.certificates.is_empty()),
        ("cookie", l.cookie.is_some()),
    ];
    for (name, set) in l7_fields {
        if set {
            return Err(invalid(
                at(name),
                format!(
                    "only applies to http/https listeners; this one is {}",
                    l.protocol
                ),
            ));
        }
    }
    Ok(())
}

fn validate_domain(field: String, domain: &str) -> Result<(), ConfigError> {
    let name = domain.strip_prefix("*.").unwrap_or(domain);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !ok {
        return Err(invalid(
            field,
            format!("{domain:?} is not a domain name or *.wildcard"),
        ));
    }
    Ok(())
}

/// An HTTP path as rules and checks take it: absolute, without spaces or control characters.
fn validate_path(field: String, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            field,
            format!("{path:?} must start with '/' and contain no spaces"),
        ));
    }
    Ok(())
}

fn validate_l7_listener(
    at: FieldOf<'_>,
    l: &Listener,
    kind: GroupKind,
    groups: &Groups<'_>,
) -> Result<(), ConfigError> {
    if kind == GroupKind::ActiveStandby {
        return Err(invalid(
            at("group"),
            "active-standby groups serve only tcp/udp listeners",
        ));
    }
    if l.persistence.is_some() {
        return Err(invalid(
            at("persistence"),
            "source-address persistence is for tcp/udp listeners; use cookie for http/https",
        ));
    }
    validate_rules(at, l, groups)?;
    validate_certificates(at, l)?;
    if let Some(CookiePersistence::Rewrite { name }) = &l.cookie {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                at("cookie.name"),
                format!("{name:?} is not a cookie name"),
            ));
        }
    }
    if l.backend_timeout < Duration::from_millis(100)
        || l.backend_timeout > Duration::from_secs(3600)
    {
        return Err(invalid(
            at("backend_timeout"),
            "must be between 100ms and 1h",
        ));
    }
    if l.header_timeout < Duration::from_millis(100) || l.header_timeout > Duration::from_secs(300)
    {
        return Err(invalid(
            at("header_timeout"),
            "must be between 100ms and 300s",
        ));
    }
    if l.client_timeout < Duration::from_millis(100) || l.client_timeout > Duration::from_secs(3600)
    {
        return Err(invalid(
            at("client_timeout"),
            "must be between 100ms and 1h",
        ));
    }
    Ok(())
}

fn validate_rules(at: FieldOf<'_>, l: &Listener, groups: &Groups<'_>) -> Result<(), ConfigError> {
    for (i, rule) in l.rules.iter().enumerate() {
        let field = |f: &str| at(&format!("rules[{i}].{f}"));
        if rule.domain.is_none() && rule.path.is_none() {
            return Err(invalid(
                field("domain"),
                "a rule needs a domain, a path, or both",
            ));
        }
        if let Some(d) = &rule.domain {
            validate_domain(field("domain"), d)?;
        }
        if let Some(p) = &rule.path {
            validate_path(field("path"), p)?;
        }
        if rule.group == DEFAULT_GROUP {
            continue;
        }
        match groups.get(rule.group.as_str()) {
            None => {
                return Err(invalid(
                    field("group"),
                    format!(
                        "no group named {:?} (defined groups: {})",
                        rule.group,
                        group_list(groups)
                    ),
                ));
            }
            Some(g) if g.kind == GroupKind::ActiveStandby => {
                return Err(invalid(
                    field("group"),
                    "active-standby groups serve only tcp/udp listeners",
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// An HTTPS listener's certificates: there is one at least, with valid domains (their files are
/// loaded after validation, by [`super::LoadedCertificates::load`]).
fn validate_certificates(at: FieldOf<'_>, l: &Listener) -> Result<(), ConfigError> {
    match l.protocol {
        Protocol::Https if l.certificates.is_empty() => {
            return Err(invalid(
                at("certificates"),
                "an https listener needs at least one certificate",
            ));
        }
        Protocol::Http if !l.certificates.is_empty() => {
            return Err(invalid(
                at("certificates"),
                "only https listeners take certificates",
            ));
        }
        _ => {}
    }
    for (i, cert) in l.certificates.iter().enumerate() {
        for (j, d) in cert.domains.iter().enumerate() {
            validate_domain(at(&format!("certificates[{i}].domains[{j}]")), d)?;
        }
    }
    Ok(())
}

fn validate_health_check(at: &str, c: &HealthCheck, protocol: Protocol) -> Result<(), ConfigError> {
    let field = |f: &str| format!("{at}.{f}");
    match (c.kind, protocol) {
        (CheckKind::Http, Protocol::Udp) => {
            return Err(invalid(
                field("type"),
                "an HTTP check needs a TCP listener; this listener is UDP (use tcp or udp)",
            ));
        }
        (CheckKind::Udp, Protocol::Tcp | Protocol::Http | Protocol::Https) => {
            return Err(invalid(
                field("type"),
                format!("a UDP check needs a UDP listener; this listener is {protocol} (use tcp or http)"),
            ));
        }
        _ => {}
    }
    if c.port == Some(0) {
        return Err(invalid(field("port"), "0 is not a valid port"));
    }
    validate_check_timing(&field, c)?;
    validate_check_fields(&field, c)
}

/// Interval, timeout and thresholds of a check.
fn validate_check_timing(field: FieldOf<'_>, c: &HealthCheck) -> Result<(), ConfigError> {
    if c.interval < MIN_CHECK_INTERVAL || c.interval > MAX_CHECK_INTERVAL {
        return Err(invalid(
            field("interval"),
            format!(
                "{} must be between 100ms and 300s",
                humantime::format_duration(c.interval)
            ),
        ));
    }
    // Linux sends ICMP errors to a host at most once a second (after a burst of 6); a faster
    // check that learns "dead" only from port-unreachable would read the gaps as "alive".
    if c.kind == CheckKind::Udp && c.expect.is_none() && c.interval < MIN_ICMP_CHECK_INTERVAL {
        return Err(invalid(
            field("interval"),
            format!(
                "{} is too short for a UDP check without `expect`: it learns of a dead server only from ICMP port-unreachable, which Linux rate-limits to one per second per host; use 1s or more, or set `expect`",
                humantime::format_duration(c.interval)
            ),
        ));
    }
    if c.timeout < MIN_CHECK_INTERVAL || c.timeout > MAX_CHECK_TIMEOUT || c.timeout > c.interval {
        return Err(invalid(
            field("timeout"),
            format!(
                "{} must be between 100ms and 60s and no longer than the interval ({})",
                humantime::format_duration(c.timeout),
                humantime::format_duration(c.interval)
            ),
        ));
    }
    for (name, value) in [
        ("healthy_threshold", c.healthy_threshold),
        ("unhealthy_threshold", c.unhealthy_threshold),
    ] {
        if !(1..=MAX_THRESHOLD).contains(&value) {
            return Err(invalid(
                field(name),
                format!("{value} must be between 1 and {MAX_THRESHOLD}"),
            ));
        }
    }
    Ok(())
}

/// The fields only HTTP checks or only UDP checks take, and their values.
fn validate_check_fields(field: FieldOf<'_>, c: &HealthCheck) -> Result<(), ConfigError> {
    let http_only = [
        ("path", c.path.is_some()),
        ("host", c.host.is_some()),
        ("expected_codes", c.expected_codes.is_some()),
    ];
    let udp_only = [
        ("payload", c.payload.is_some()),
        ("expect", c.expect.is_some()),
    ];
    for (name, set) in http_only {
        if set && c.kind != CheckKind::Http {
            return Err(invalid(field(name), "only applies to http checks"));
        }
    }
    for (name, set) in udp_only {
        if set && c.kind != CheckKind::Udp {
            return Err(invalid(field(name), "only applies to udp checks"));
        }
    }
    if let Some(path) = &c.path {
        validate_path(field("path"), path)?;
    }
    if let Some(host) = &c.host {
        if host.is_empty() || host.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Err(invalid(
                field("host"),
                format!("{host:?} is not a valid Host header"),
            ));
        }
    }
    if let Some(codes) = &c.expected_codes {
        if codes.is_empty() {
            return Err(invalid(
                field("expected_codes"),
                "must list at least one code or class",
            ));
        }
        if let Some(bad) = codes.iter().find(|code| !valid_status_pattern(code)) {
            return Err(invalid(
                field("expected_codes"),
                format!("{bad:?} is not a status class (2xx) or code (204)"),
            ));
        }
    }
    Ok(())
}

fn valid_status_pattern(pattern: &str) -> bool {
    matches!(pattern.as_bytes(), [b'1'..=b'5', b'x', b'x'])
        || pattern
            .parse::<u16>()
            .is_ok_and(|c| (100..600).contains(&c))
}

fn group_list(groups: &Groups<'_>) -> String {
    if groups.is_empty() {
        "none".into()
    } else {
        groups.keys().copied().collect::<Vec<_>>().join(", ")
    }
}

fn validate_backends(group: &str, backends: &[BackendSpec]) -> Result<(), ConfigError> {
    let mut seen = BTreeSet::new();
    for (i, b) in backends.iter().enumerate() {
        let field = |f: &str| format!("{group}.backends[{i}].{f}");
        validate_unicast(field("address"), b.address)?;
        if b.port == Some(0) {
            return Err(invalid(field("port"), "0 is not a valid port"));
        }
        if b.weight > MAX_WEIGHT {
            return Err(invalid(
                field("weight"),
                format!("{} is above the maximum {MAX_WEIGHT}", b.weight),
            ));
        }
        if !seen.insert((b.address, b.port)) {
            return Err(invalid(
                field("address"),
                format!(
                    "{} is listed twice in the group",
                    BackendName {
                        address: b.address,
                        port: b.port
                    }
                ),
            ));
        }
    }
    Ok(())
}
