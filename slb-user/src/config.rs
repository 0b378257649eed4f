//! The config file: what the user writes (serde, TOML) and its validation. Every error names the
//! field and the value that is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slb_common::maglev::is_prime;

use crate::instance::InstanceName;
use slb_common::{DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_LISTENERS, MAX_RING_SIZE};

/// Largest backend weight: weights are ring credits, so very large ones only slow the build.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// Served by slb's HTTP proxy on the VIP; the XDP program lets it through to the stack.
    Http,
    /// HTTP over TLS, terminated by slb's proxy.
    Https,
}

impl Listener {
    /// How long the data plane keeps a silent flow of this (tcp/udp) listener.
    pub fn idle_timeout_s(&self) -> u32 {
        match (self.idle_timeout, self.protocol) {
            (Some(t), _) => t.as_secs() as u32,
            (None, Protocol::Udp) => slb_common::DEFAULT_UDP_IDLE_TIMEOUT_S,
            (None, _) => slb_common::DEFAULT_TCP_IDLE_TIMEOUT_S,
        }
    }
}

impl Protocol {
    pub fn ip_protocol(self) -> u8 {
        match self {
            Protocol::Tcp | Protocol::Http | Protocol::Https => slb_common::IPPROTO_TCP,
            Protocol::Udp => slb_common::IPPROTO_UDP,
        }
    }

    /// Served by the proxy in the daemon rather than by the XDP program.
    pub fn is_l7(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Http => "http",
            Protocol::Https => "https",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Driver mode: the program runs before the kernel allocates an skb.
    #[default]
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Generic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names the pin directory /sys/fs/bpf/slb/<instance> and the state directory; checked
    /// when parsed, so it is always one safe path component.
    pub instance: InstanceName,
    /// Optional list of the instance's VIPs; when given, every listener's VIP must be in it.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
    #[serde(default = "default_ring_size")]
    pub maglev_table_size: u32,
    /// Entries of the connection table: established flows the data plane remembers (about
    /// 120 bytes of kernel memory each). Fixed while the instance runs.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub default_group: DefaultGroup,
    #[serde(default)]
    pub groups: Vec<Group>,
    /// HTTP(S) listeners append one JSON line per request here.
    #[serde(default)]
    pub access_log: Option<std::path::PathBuf>,
    #[serde(default)]
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Serve Prometheus metrics on 127.0.0.1:<port>/metrics (off when absent). Read at start.
    #[serde(default)]
    pub prometheus_port: Option<u16>,
}

fn default_max_connections() -> u32 {
    slb_common::DEFAULT_MAX_CONNECTIONS
}

fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mode: AttachMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub protocol: Protocol,
    pub vip: IpAddr,
    pub port: u16,
    /// A VServer group name; absent means the default group.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Source-address session persistence.
    #[serde(default)]
    pub persistence: Option<Persistence>,
    /// TCP/UDP: how long a flow may stay silent before the balancer forgets it (default 900s
    /// for TCP, 90s for UDP). A forgotten flow's next packet is balanced again.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// What to do when every backend of the group is unhealthy.
    #[serde(default)]
    pub on_all_unhealthy: AllUnhealthy,
    /// HTTP(S): forwarding rules, checked exact domain, then wildcard domain, then path prefix.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// HTTPS: certificates, chosen by SNI; the first is used when no name matches.
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    /// HTTP(S): how a backend is chosen within a group.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// HTTP(S): cookie session persistence.
    #[serde(default)]
    pub cookie: Option<CookiePersistence>,
    /// HTTP(S): add X-Forwarded-For, X-Forwarded-Proto and X-Real-IP.
    #[serde(default = "default_true")]
    pub forwarded_headers: bool,
    /// HTTP(S): time a backend has to start answering before the client gets 504.
    #[serde(default = "default_backend_timeout", with = "humantime_serde")]
    pub backend_timeout: Duration,
    /// HTTP(S): time a client has to send a request's headers (slow clients are cut off).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
}

fn default_true() -> bool {
    true
}
fn default_backend_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A forwarding rule of an HTTP(S) listener. `domain` is exact (`www.example.com`) or a wildcard
/// (`*.example.com`, any depth of subdomain); `path` is a prefix. A rule with both needs both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM certificate chain.
    pub cert: std::path::PathBuf,
    /// PEM private key.
    pub key: std::path::PathBuf,
    /// SNI names this certificate serves (exact or `*.example.com`).
    #[serde(default)]
    pub domains: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Weighted round robin.
    #[default]
    Wrr,
    /// Weighted least connections (in-flight requests / weight).
    Wlc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum CookiePersistence {
    /// slb sets its own cookie naming the backend.
    Insert {
        #[serde(default = "default_cookie_timeout", with = "humantime_serde")]
        timeout: Duration,
    },
    /// slb keys on a cookie the application sets (by its value).
    Rewrite { name: String },
}

fn default_cookie_timeout() -> Duration {
    Duration::from_secs(3600)
}

/// Name of the cookie slb inserts.
pub const INSERT_COOKIE: &str = "SLB_SERVER";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllUnhealthy {
    /// Keep forwarding to all backends by weight, as if none were unhealthy: a health checker
    /// that cannot reach anything is more often wrong than every backend at once.
    #[default]
    ForwardAll,
    /// Drop new flows (counted as `no_backend_dropped`).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port to probe instead of the backend's port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy.
    #[serde(default = "default_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
    /// HTTP: request path.
    #[serde(default)]
    pub path: Option<String>,
    /// HTTP: Host header (default: the backend address).
    #[serde(default)]
    pub host: Option<String>,
    /// HTTP: accepted status classes or codes, e.g. ["2xx", "3xx"] (the default) or ["204"].
    #[serde(default)]
    pub expected_codes: Option<Vec<String>>,
    /// UDP: payload to send (default "slb-health-check").
    #[serde(default)]
    pub payload: Option<String>,
    /// UDP: a reply must arrive and contain this string. Without it, a reply or silence for the
    /// whole timeout counts as healthy and only an ICMP port-unreachable as unhealthy.
    #[serde(default)]
    pub expect: Option<String>,
}

fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_threshold() -> u32 {
    3
}

pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// Shortest interval of a UDP check that relies on ICMP port-unreachable (no `expect`).
pub const MIN_ICMP_CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_THRESHOLD: u32 = 10;

impl HealthCheck {
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    pub fn payload(&self) -> &str {
        self.payload.as_deref().unwrap_or("slb-health-check")
    }

    /// Whether `status` is one of the expected codes.
    pub fn accepts_status(&self, status: u16) -> bool {
        match &self.expected_codes {
            None => (200..400).contains(&status),
            Some(codes) => codes.iter().any(|c| status_matches(c, status)),
        }
    }
}

fn status_matches(pattern: &str, status: u16) -> bool {
    match pattern.as_bytes() {
        [d, b'x', b'x'] if (b'1'..=b'5').contains(d) => status / 100 == u16::from(d - b'0'),
        _ => pattern.parse::<u16>() == Ok(status),
    }
}

fn valid_status_pattern(pattern: &str) -> bool {
    matches!(pattern.as_bytes(), [b'1'..=b'5', b'x', b'x'])
        || pattern
            .parse::<u16>()
            .is_ok_and(|c| (100..600).contains(&c))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persistence {
    /// How long a client address stays with its backend after its last new connection.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

pub const MAX_PERSISTENCE_TIMEOUT: Duration = Duration::from_secs(86_400);
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultGroup {
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    /// `vserver` (default): weighted Maglev over the backends. `active-standby`: exactly two
    /// servers, the first active, the second standby.
    #[serde(default, rename = "type")]
    pub kind: GroupKind,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupKind {
    #[default]
    Vserver,
    ActiveStandby,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: IpAddr,
    /// Backend port; absent means the listener's port (default group only makes sense this way).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Name the default group goes by in status output and errors.
pub const DEFAULT_GROUP: &str = "default";

/// A group as a listener sees it.
pub struct ListenerGroup<'a> {
    pub name: &'a str,
    pub kind: GroupKind,
    pub backends: &'a [BackendSpec],
}

impl Config {
    /// The groups a (validated) listener forwards to: its own group first, then, for HTTP(S),
    /// each further group its rules name, once.
    pub fn listener_groups<'a>(&'a self, l: &'a Listener) -> Vec<ListenerGroup<'a>> {
        let lookup = |name: &'a str| match self.groups.iter().find(|g| g.name == name) {
            Some(g) if name != DEFAULT_GROUP => ListenerGroup {
                name,
                kind: g.kind,
                backends: &g.backends,
            },
            _ => ListenerGroup {
                name: DEFAULT_GROUP,
                kind: GroupKind::Vserver,
                backends: &self.default_group.backends,
            },
        };
        let mut groups = vec![lookup(l.group.as_deref().unwrap_or(DEFAULT_GROUP))];
        for rule in &l.rules {
            if !groups.iter().any(|g| g.name == rule.group) {
                groups.push(lookup(&rule.group));
            }
        }
        groups
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
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
        if self.interfaces.is_empty() {
            return Err(invalid(
                "interfaces",
                "at least one interface to attach to is required",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, iface) in self.interfaces.iter().enumerate() {
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

        let mut groups: BTreeMap<&str, &Group> = BTreeMap::new();
        for (i, group) in self.groups.iter().enumerate() {
            if group.name.is_empty() || group.name == DEFAULT_GROUP {
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
            validate_backends(&format!("groups[{i}] ({})", group.name), &group.backends)?;
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
        validate_backends("default_group", &self.default_group.backends)?;

        if self.listeners.len() > MAX_LISTENERS as usize {
            return Err(invalid(
                "listeners",
                format!(
                    "{} listeners, at most {MAX_LISTENERS} are supported",
                    self.listeners.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        let mut endpoints = BTreeSet::new();
        // (backend address, port, protocol) → the L4 listener it serves.
        let mut reply_endpoints: BTreeMap<(IpAddr, u16, u8), &str> = BTreeMap::new();
        let mut backend_count = 0usize;
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |f: &str| format!("listeners[{i}] ({}).{f}", l.name);
            if l.name.is_empty() {
                return Err(invalid(format!("listeners[{i}].name"), "must not be empty"));
            }
            if !names.insert(&l.name) {
                return Err(invalid(
                    at("name"),
                    format!("listener {:?} is defined twice", l.name),
                ));
            }
            if l.port == 0 {
                return Err(invalid(at("port"), "0 is not a valid port"));
            }
            if !self.vips.is_empty() && !self.vips.contains(&l.vip) {
                return Err(invalid(
                    at("vip"),
                    format!("{} is not one of the instance's vips", l.vip),
                ));
            }
            if l.vip.is_ipv6() {
                return Err(invalid(
                    at("vip"),
                    format!("{}: IPv6 listeners are not supported yet", l.vip),
                ));
            }
            if !endpoints.insert((l.vip, l.port, l.protocol.ip_protocol())) {
                return Err(invalid(
                    at("port"),
                    format!(
                        "{}:{}/{} is already used by another listener",
                        l.vip, l.port, l.protocol
                    ),
                ));
            }
            let backends = match &l.group {
                None => &self.default_group.backends[..],
                Some(g) => {
                    &groups
                        .get(g.as_str())
                        .ok_or_else(|| {
                            invalid(
                                at("group"),
                                format!(
                                    "no group named {g:?} (defined groups: {})",
                                    group_list(&groups)
                                ),
                            )
                        })?
                        .backends[..]
                }
            };
            let kind = match &l.group {
                None => GroupKind::Vserver,
                Some(g) => groups[g.as_str()].kind,
            };
            if l.protocol.is_l7() {
                validate_l7_listener(&at, l, kind, &groups)?;
            } else {
                validate_l4_only_fields(&at, l)?;
            }
            if let Some(check) = &l.health_check {
                validate_health_check(&at("health_check"), check, l.protocol)?;
            }
            if !l.protocol.is_l7() {
                for b in backends {
                    let port = b.port.unwrap_or(l.port);
                    let endpoint = (b.address, port, l.protocol.ip_protocol());
                    match reply_endpoints.insert(endpoint, &l.name) {
                        Some(other) if other != l.name => {
                            return Err(invalid(
                                at("group"),
                                format!(
                                    "backend {}:{port}/{} also serves listener {other:?}; the balancer \
                                     recognises a backend's replies by its address and port, so each \
                                     belongs to one tcp/udp listener (give one of them another \
                                     backend port in a VServer group)",
                                    b.address, l.protocol
                                ),
                            ));
                        }
                        _ => {}
                    }
                }
            }
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
            }
            backend_count += backends.len();
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
        }
        if backend_count > MAX_BACKENDS as usize {
            return Err(invalid(
                "listeners",
                format!("{backend_count} listener backends in all, at most {MAX_BACKENDS} are supported"),
            ));
        }
        Ok(())
    }
}

fn validate_l4_only_fields(at: &dyn Fn(&str) -> String, l: &Listener) -> Result<(), ConfigError> {
    let l7_fields = [
        ("rules", !l.rules.is_empty()),
        ("certificates", !l.certificates.is_empty()),
        ("cookie", l.cookie.is_some()),
        ("scheduler", l.scheduler != Scheduler::default()),
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

fn validate_l7_listener(
    at: &dyn Fn(&str) -> String,
    l: &Listener,
    kind: GroupKind,
    groups: &BTreeMap<&str, &Group>,
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
            if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    field("path"),
                    format!("{p:?} must start with '/' and contain no spaces"),
                ));
            }
        }
        if rule.group != DEFAULT_GROUP {
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
    }
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
        crate::proxy::tls::load_certified_key(cert)
            .map_err(|message| invalid(at(&format!("certificates[{i}]")), message))?;
    }
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
        if !path.starts_with('/') || path.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Err(invalid(
                field("path"),
                format!("{path:?} must start with '/' and contain no spaces"),
            ));
        }
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

fn group_list(groups: &BTreeMap<&str, &Group>) -> String {
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
        if b.address.is_ipv6() {
            return Err(invalid(
                field("address"),
                format!("{}: IPv6 backends are not supported yet", b.address),
            ));
        }
        if b.address.is_unspecified() || b.address.is_multicast() {
            return Err(invalid(
                field("address"),
                format!("{} is not a unicast address", b.address),
            ));
        }
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
                    "{}:{} is listed twice in the group",
                    b.address,
                    b.port.map_or("<listener port>".into(), |p| p.to_string())
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
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

        let e = error_of(&GOOD.replace("maglev", "x").replace(
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
        assert!(e.contains("10.0.1.300") || e.contains("address"), "{e}");
    }

    #[test]
    fn active_standby_needs_exactly_two_servers() {
        let three = format!(
            "{GOOD}\n[[groups]]\nname = \"db\"\ntype = \"active-standby\"\nbackends = [{{ address = \"10.0.2.1\" }}, {{ address = \"10.0.2.2\" }}, {{ address = \"10.0.2.3\" }}]\n"
        );
        let e = error_of(&three);
        assert!(
            e.contains("groups[1] (db).backends")
                && e.contains("exactly two")
                && e.contains("has 3"),
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
        assert!(
            check.accepts_status(204) && check.accepts_status(301) && !check.accepts_status(302)
        );
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
}
