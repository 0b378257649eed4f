//! A listener as the rest of slb sees it: its groups looked up and each backend's effective port
//! decided once. A backend without a port of its own serves on the listener's port; that rule
//! lives here and nowhere else.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use super::{
    BackendSpec, Config, ConnectionLimits, GroupKind, InitialHealth, Listener, DEFAULT_GROUP,
};

/// An address and port as slb names them everywhere (status, reports, logs, history samples,
/// Maglev identities): `10.0.0.1:80` or `[2001:db8::1]:80`, exactly as `SocketAddr` prints them,
/// since the distribution report joins these names with the access log's `SocketAddr` strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
}

impl Endpoint {
    pub fn new(address: IpAddr, port: u16) -> Endpoint {
        Endpoint { address, port }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that table columns (`{:<22}`) line up as they do for strings.
        f.pad(&SocketAddr::new(self.address, self.port).to_string())
    }
}

/// A listener with the groups it forwards to.
pub struct ResolvedListener<'a> {
    pub listener: &'a Listener,
    /// Its own group first, then, for HTTP(S), each further group its rules name, once.
    pub groups: Vec<ResolvedGroup<'a>>,
}

impl<'a> ResolvedListener<'a> {
    /// The group the listener forwards to when no rule matches: a TCP/UDP listener's only one.
    pub fn group(&self) -> &ResolvedGroup<'a> {
        &self.groups[0]
    }
}

/// A group as one listener sees it: its backends on their effective ports.
pub struct ResolvedGroup<'a> {
    pub name: &'a str,
    pub kind: GroupKind,
    /// Its backends' health at the daemon's start, before their checks answer.
    pub initial_health: InitialHealth,
    /// How long a backend that becomes healthy ramps up to its full weight.
    pub slow_start: Option<std::time::Duration>,
    pub backends: Vec<ResolvedBackend>,
    /// HTTP(S): the proxy's connections to each backend.
    pub limits: ConnectionLimits,
}

/// A backend of a group, on the port it serves this listener on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedBackend {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// TCP/UDP: open connections past which it takes no new flow.
    pub max_connections: Option<u32>,
}

impl ResolvedBackend {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.address, self.port)
    }

    pub(crate) fn of(spec: &BackendSpec, listener: &Listener) -> ResolvedBackend {
        ResolvedBackend {
            address: spec.address,
            port: spec.port.unwrap_or(listener.port),
            weight: spec.weight,
            max_connections: spec.max_connections,
        }
    }
}

impl Config {
    /// Every listener, resolved. For a validated config: a group name it does not know stands
    /// for the default group.
    pub fn resolved_listeners(&self) -> Vec<ResolvedListener<'_>> {
        self.listeners.iter().map(|l| self.resolve(l)).collect()
    }

    /// One listener of this config, resolved (see [`Config::resolved_listeners`]).
    pub fn resolve<'a>(&'a self, listener: &'a Listener) -> ResolvedListener<'a> {
        let lookup = |name: &'a str| {
            let (name, kind, specs, limits, initial_health, slow_start) =
                match self.groups.iter().find(|g| g.name == name) {
                    Some(g) if name != DEFAULT_GROUP => (
                        name,
                        g.kind,
                        &g.backends,
                        g.limits(),
                        g.initial_health,
                        g.slow_start,
                    ),
                    _ => (
                        DEFAULT_GROUP,
                        GroupKind::Vserver,
                        &self.default_group.backends,
                        self.default_group.limits(),
                        self.default_group.initial_health,
                        self.default_group.slow_start,
                    ),
                };
            ResolvedGroup {
                name,
                kind,
                initial_health,
                slow_start,
                limits,
                backends: specs
                    .iter()
                    .map(|spec| ResolvedBackend::of(spec, listener))
                    .collect(),
            }
        };
        let mut groups = vec![lookup(listener.group.as_deref().unwrap_or(DEFAULT_GROUP))];
        for rule in &listener.rules {
            if !groups.iter().any(|g| g.name == rule.group) {
                groups.push(lookup(&rule.group));
            }
        }
        ResolvedListener { listener, groups }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::GOOD;

    /// GOOD with an HTTP listener whose rules name the pool twice and the default group.
    fn config() -> Config {
        let site = "[[listeners]]\nname = \"site\"\nprotocol = \"http\"\nvip = \"10.0.0.10\"\n\
                    port = 8000\nrules = [{ path = \"/api\", group = \"pool\" }, \
                    { path = \"/static\", group = \"default\" }, { path = \"/v2\", group = \"pool\" }]\n";
        Config::parse(&format!("{GOOD}{site}"), "t").unwrap()
    }

    fn backend(address: &str, port: u16, weight: u32) -> ResolvedBackend {
        ResolvedBackend {
            address: address.parse().unwrap(),
            port,
            weight,
            max_connections: None,
        }
    }

    #[test]
    fn endpoints_read_address_colon_port_and_pad_like_strings() {
        let endpoint = Endpoint::new("10.0.1.2".parse().unwrap(), 8080);
        assert_eq!(endpoint.to_string(), "10.0.1.2:8080");
        assert_eq!(format!("[{endpoint:<15}]"), "[10.0.1.2:8080  ]");
        let endpoint = Endpoint::new("2001:db8::1".parse().unwrap(), 80);
        assert_eq!(format!("[{endpoint:<18}]"), "[[2001:db8::1]:80  ]");
    }

    #[test]
    fn endpoints_print_as_socket_addresses_do_in_both_families() {
        for text in ["10.0.1.2:8080", "[2001:db8::1]:80", "[::ffff:10.0.0.1]:53"] {
            let socket: SocketAddr = text.parse().unwrap();
            let endpoint = Endpoint::new(socket.ip(), socket.port());
            assert_eq!(endpoint.to_string(), socket.to_string());
            assert_eq!(endpoint.to_string(), text);
        }
    }

    #[test]
    fn backends_without_a_port_serve_on_the_listeners() {
        let config = config();
        let resolved = config.resolved_listeners();
        let web = &resolved[0];
        assert_eq!(
            (web.group().name, web.group().kind),
            ("pool", GroupKind::Vserver)
        );
        assert_eq!(
            web.group().backends,
            vec![backend("10.0.1.2", 8080, 2), backend("10.0.1.3", 8080, 1)]
        );
        let dns = &resolved[1];
        assert_eq!(dns.group().name, DEFAULT_GROUP);
        assert_eq!(dns.group().backends, vec![backend("10.0.1.1", 53, 1)]);
    }

    #[test]
    fn an_http_listener_has_its_own_group_then_each_rule_group_once() {
        let config = config();
        let site = config.resolve(&config.listeners[2]);
        let names: Vec<&str> = site.groups.iter().map(|g| g.name).collect();
        assert_eq!(names, vec![DEFAULT_GROUP, "pool"]);
        assert_eq!(site.groups[0].backends, vec![backend("10.0.1.1", 8000, 1)]);
        assert_eq!(site.groups[1].backends[0], backend("10.0.1.2", 8080, 2));
    }
}
