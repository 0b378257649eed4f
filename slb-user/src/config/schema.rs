//! What the user writes: the config file's types as serde reads them from TOML, their defaults
//! and the limits validation holds them to.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slb_common::DEFAULT_RING_SIZE;

use crate::instance::InstanceName;

/// Largest backend weight: weights are ring credits, so very large ones only slow the build.
pub const MAX_WEIGHT: u32 = 10_000;

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
    /// The secret that keys cookie persistence's backend tokens (created with a random secret
    /// when missing); every slb node that serves the same listeners needs the same file.
    #[serde(default = "default_cookie_secret_file")]
    pub cookie_secret_file: std::path::PathBuf,
    /// Announce the VIPs over BGP through BIRD (off when absent). Fixed while the daemon runs.
    #[serde(default)]
    pub announce: Option<Announce>,
    /// The HTTPS listeners' certificates as [`Config::parse`] loaded them.
    #[serde(skip)]
    pub certificates: super::LoadedCertificates,
}

/// `[announce]`: slb writes a BIRD `static` protocol per address family into `include_file`,
/// with a route for each VIP this node can serve, and has BIRD re-read its config through its
/// control socket whenever that changes; BIRD's BGP sessions carry the routes to the routers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// BIRD's control socket (`bird -s`).
    #[serde(default = "default_bird_socket")]
    pub bird_socket: std::path::PathBuf,
    /// The file slb owns and BIRD's config includes; by default
    /// `/run/slb/.bird/<instance>.conf`.
    #[serde(default)]
    pub include_file: Option<std::path::PathBuf>,
    /// Prefix of the two protocols' names (`<protocol>_v4`, `<protocol>_v6`); by default
    /// `slb_<instance>` with `-` written as `_`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// On `slb stop`, how long slb keeps forwarding after it withdrew the VIPs, so that the
    /// routers move the flows elsewhere before this node stops carrying them.
    #[serde(default = "default_withdraw_grace", with = "humantime_serde")]
    pub withdraw_grace: Duration,
    /// A withdrawn address (or one at start) is announced only once the health verdicts of its
    /// backends have not changed for this long, so that this node's Maglev rings agree with
    /// the other nodes' before the routers move flows to it.
    #[serde(default = "default_settle_time", with = "humantime_serde")]
    pub settle_time: Duration,
}

/// Where Debian's bird2 puts its control socket.
pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
/// Longest [`Announce::withdraw_grace`] (a stop is not to hang for minutes) and
/// [`Announce::settle_time`].
pub const MAX_ANNOUNCE_DELAY: Duration = Duration::from_secs(60);

fn default_bird_socket() -> std::path::PathBuf {
    DEFAULT_BIRD_SOCKET.into()
}

fn default_withdraw_grace() -> Duration {
    Duration::from_secs(1)
}

fn default_settle_time() -> Duration {
    Duration::from_secs(2)
}

impl Announce {
    /// The file the announcements are written to.
    pub fn include_file(&self, instance: &str) -> std::path::PathBuf {
        self.include_file
            .clone()
            .unwrap_or_else(|| crate::instance::default_include_file(instance))
    }

    /// The prefix of the BIRD protocols' names.
    pub fn protocol(&self, instance: &str) -> String {
        self.protocol
            .clone()
            .unwrap_or_else(|| format!("slb_{}", instance.replace('-', "_")))
    }
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
    /// TCP/UDP: how packets reach the backends.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// With `forwarding = "dsr"`: how the unchanged packet reaches the backend (default `l2`).
    #[serde(default)]
    pub dsr: Option<DsrMode>,
    /// With `dsr = "ipip"`: the outer source address of the tunnelled packets, an address of
    /// this host in the VIP's family (the backends' decapsulators accept it).
    #[serde(default)]
    pub tunnel_source: Option<IpAddr>,
    /// With `forwarding = "fullnat"`: addresses of this host the backends see the listener's
    /// connections come from (1 to 16).
    #[serde(default)]
    pub snat_addresses: Vec<IpAddr>,
    /// With `forwarding = "fullnat"`: the source ports used on them, `"first-last"` (default
    /// `"1024-32767"`, below the kernel's ephemeral ports).
    #[serde(default)]
    pub snat_ports: Option<String>,
    /// TCP/UDP: which client addresses may use the listener, enforced by the data plane before
    /// a packet creates any state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<Acl>,
    /// TCP/UDP: new flows the listener takes per second, all CPUs together; the ones above are
    /// dropped (a TCP client retransmits its SYN a second later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_connections_per_second: Option<u32>,
    /// With `max_new_connections_per_second`: how many new flows may come at once after a quiet
    /// spell (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections_burst: Option<u32>,
    /// HTTP(S): forwarding rules, checked exact domain, then wildcard domain, then path prefix.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// HTTPS: certificates, chosen by SNI; the first is used when no name matches.
    #[serde(default)]
    pub certificates: Vec<Certificate>,
    /// How a new flow's or request's backend is chosen within the group; by default `maglev`
    /// for TCP/UDP and `wrr` for HTTP(S) (see [`Listener::scheduler`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Scheduler>,
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
    /// HTTP(S): longest a client may stall while a request body comes in or a response goes
    /// out (sends no byte of the body, or takes no byte of the response); it is then cut off,
    /// so a client cannot hold a backend connection by not reading.
    #[serde(default = "default_client_timeout", with = "humantime_serde")]
    pub client_timeout: Duration,
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
fn default_client_timeout() -> Duration {
    Duration::from_secs(30)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// TCP/UDP (their default): weighted consistent hashing of the flow (the Maglev ring), the
    /// same backend for a flow on every node.
    Maglev,
    /// HTTP(S) (their default): weighted round robin.
    Wrr,
    /// Weighted least connections. HTTP(S): in-flight requests per weight. TCP: a new flow's
    /// SYN goes to the backend with the fewest open connections per weight on this node.
    Wlc,
}

impl Scheduler {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::Wrr => "wrr",
            Scheduler::Wlc => "wlc",
        }
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Listener {
    /// The listener's scheduler: the one it names, else its protocol's default (`maglev` for
    /// TCP/UDP, `wrr` for HTTP(S)).
    pub fn scheduler(&self) -> Scheduler {
        self.scheduler.unwrap_or(if self.protocol.is_l7() {
            Scheduler::Wrr
        } else {
            Scheduler::Maglev
        })
    }
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

/// Where the cookie secret is kept unless the config says otherwise: one per node, shared by
/// its instances.
pub const DEFAULT_COOKIE_SECRET_FILE: &str = "/var/lib/slb/cookie-secret";

fn default_cookie_secret_file() -> std::path::PathBuf {
    DEFAULT_COOKIE_SECRET_FILE.into()
}

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

/// How a tcp/udp listener's packets reach its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// The backend's address and port are written into the packet; the backend answers slb's
    /// side of the route, and slb writes the VIP back into the replies.
    #[default]
    Nat,
    /// Direct server return: the packet goes unchanged to the backend (see [`DsrMode`]); the
    /// backend holds the VIP and answers the client itself, so replies do not pass slb.
    /// Backends with the listener's port.
    Dsr,
    /// Full NAT: source and destination rewritten; the backend sees the connection come from
    /// one of slb's SNAT addresses and answers slb, whatever its routes.
    Fullnat,
}

/// How a DSR listener's unchanged packet reaches the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsrMode {
    /// In a frame to the backend's MAC address: backends on a link of slb's.
    #[default]
    L2,
    /// Inside an outer IP header to the backend's address (IPv4 in IPv4, IPv6 in IPv6):
    /// backends anywhere routable, which strip the outer header (`slb decap`).
    Ipip,
}

impl std::fmt::Display for DsrMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DsrMode::L2 => "l2",
            DsrMode::Ipip => "ipip",
        })
    }
}

/// A full NAT listener's source ports, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatPorts {
    pub first: u16,
    pub last: u16,
}

impl SnatPorts {
    pub const DEFAULT: SnatPorts = SnatPorts {
        first: slb_common::DEFAULT_SNAT_FIRST_PORT,
        last: slb_common::DEFAULT_SNAT_LAST_PORT,
    };

    /// `"first-last"`, 1 ≤ first ≤ last ≤ 65535.
    pub fn parse(text: &str) -> Result<SnatPorts, String> {
        let (first, last) = text.split_once('-').ok_or_else(|| {
            format!("{text:?}: write the range as \"first-last\", e.g. \"1024-32767\"")
        })?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{text:?}: {p:?} is not a port (1-65535)"))
        };
        let (first, last) = (port(first)?, port(last)?);
        if first > last {
            return Err(format!("{text:?}: the first port is above the last"));
        }
        Ok(SnatPorts { first, last })
    }

    pub fn count(self) -> u32 {
        u32::from(self.last - self.first) + 1
    }
}

impl Listener {
    /// A full NAT listener's source ports (validated: an invalid range is refused first).
    pub fn snat_ports(&self) -> SnatPorts {
        self.snat_ports
            .as_deref()
            .and_then(|text| SnatPorts::parse(text).ok())
            .unwrap_or(SnatPorts::DEFAULT)
    }

    /// How a DSR listener's packets reach the backends; `None` for any other listener.
    pub fn dsr_mode(&self) -> Option<DsrMode> {
        (self.forwarding == Forwarding::Dsr).then(|| self.dsr.unwrap_or_default())
    }
}

impl std::fmt::Display for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Forwarding::Nat => "nat",
            Forwarding::Dsr => "dsr",
            Forwarding::Fullnat => "fullnat",
        })
    }
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
    /// HTTP: Host header (default: the backend's address, IPv6 in brackets, and its port
    /// unless 80).
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

/// A listener's access list: client prefixes (`10.0.0.0/8`, `2001:db8::/32`, or single
/// addresses) that are the only ones let in (`allow`) or the ones kept out (`deny`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    pub mode: AclMode,
    pub cidrs: Vec<String>,
    /// What a changed list does to flows it no longer admits that are already established.
    #[serde(default)]
    pub established: AclEstablished,
}

impl Acl {
    /// The list's prefixes, or what is wrong with the first entry that is not one: an address
    /// or `address/length` with no bits set past the length, in the listener VIP's family.
    pub fn prefixes(&self, vip: IpAddr) -> Result<Vec<ipnet::IpNet>, AclEntryError> {
        let mut seen = std::collections::BTreeSet::new();
        self.cidrs
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let wrong = |message: String| AclEntryError { index, message };
                let prefix: ipnet::IpNet = match entry.parse() {
                    Ok(prefix) => prefix,
                    Err(_) => entry
                        .parse::<IpAddr>()
                        .map(ipnet::IpNet::from)
                        .map_err(|_| {
                            wrong(format!(
                                "{entry:?} is not an address or a prefix such as 10.0.0.0/8 or 2001:db8::/32"
                            ))
                        })?,
                };
                if prefix.trunc() != prefix {
                    return Err(wrong(format!(
                        "{entry:?} has bits set past its /{}; write {}",
                        prefix.prefix_len(),
                        prefix.trunc()
                    )));
                }
                if prefix.addr().is_ipv4() != vip.is_ipv4() {
                    return Err(wrong(format!(
                        "{entry:?} can never match: the listener's VIP {vip} takes only {} clients",
                        if vip.is_ipv4() { "IPv4" } else { "IPv6" }
                    )));
                }
                if !seen.insert(prefix) {
                    return Err(wrong(format!("{entry:?} is listed twice")));
                }
                Ok(prefix)
            })
            .collect()
    }
}

/// An entry of an access list that is not a prefix the listener can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntryError {
    pub index: usize,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclMode {
    Allow,
    Deny,
}

impl AclMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AclMode::Allow => "allow",
            AclMode::Deny => "deny",
        }
    }
}

impl AclEstablished {
    /// What happens to the established flows a changed list refuses.
    pub fn describe(self) -> &'static str {
        match self {
            AclEstablished::Keep => "kept",
            AclEstablished::Cut => "cut",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AclEstablished {
    /// They go on until they end; the list applies to new flows.
    #[default]
    Keep,
    /// Their next packet is dropped.
    Cut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persistence {
    /// How long a client address stays with its backend after its last new connection.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// IPv6 listeners: clients whose addresses share this many leading bits are one client
    /// (1-128; absent: 128, each address). IPv6 hosts rotate their addresses within their
    /// /64 (RFC 8981), so /64 keeps such a client with its backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<u8>,
}

/// An IPv6 client's whole address is its key unless `ipv6_prefix` says otherwise.
pub const DEFAULT_PERSISTENCE_IPV6_PREFIX: u8 = 128;

impl Listener {
    /// How many leading bits of an IPv6 client address persistence keys on (see
    /// [`Persistence::ipv6_prefix`]); 128 for a listener without persistence or without a
    /// prefix. IPv4 clients are always keyed on their whole address.
    pub fn persist_ipv6_prefix(&self) -> u8 {
        self.persistence
            .and_then(|p| p.ipv6_prefix)
            .unwrap_or(DEFAULT_PERSISTENCE_IPV6_PREFIX)
    }
}

pub const MAX_PERSISTENCE_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Above this, a limit on new flows is no limit: one CPU's XDP path admits fewer.
pub const MAX_NEW_CONNECTIONS_PER_SECOND: u32 = 100_000_000;
/// Bounds of a group's `slow_start`.
pub const MIN_SLOW_START: Duration = Duration::from_secs(1);
pub const MAX_SLOW_START: Duration = Duration::from_secs(3600);
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultGroup {
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// What the health checks take the backends for when the daemon starts (see
    /// [`InitialHealth`]).
    #[serde(default)]
    pub initial_health: InitialHealth,
    /// TCP/UDP with health checks: how long a backend that becomes healthy (recovered, or added
    /// and past its first checks) takes to reach its full weight.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_start: Option<Duration>,
    /// HTTP(S): see [`ConnectionLimits`].
    #[serde(default = "default_backend_connections")]
    pub max_connections: u32,
    #[serde(default = "default_queued_requests")]
    pub max_queued_requests: u32,
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
}

/// HTTP(S): how many connections the proxy keeps to each backend of a group (busy, idle and
/// being opened), and how many requests, for how long, may wait for one when all are busy;
/// beyond that a request gets 503. Bounds what clients can make slb open, whatever their
/// number of HTTP/2 streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: u32,
    pub max_queued_requests: u32,
    pub queue_timeout: Duration,
}

impl Default for DefaultGroup {
    fn default() -> Self {
        let limits = ConnectionLimits::default();
        DefaultGroup {
            backends: Vec::new(),
            initial_health: InitialHealth::default(),
            slow_start: None,
            max_connections: limits.max_connections,
            max_queued_requests: limits.max_queued_requests,
            queue_timeout: limits.queue_timeout,
        }
    }
}

impl DefaultGroup {
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_queued_requests: self.max_queued_requests,
            queue_timeout: self.queue_timeout,
        }
    }
}

impl Group {
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_queued_requests: self.max_queued_requests,
            queue_timeout: self.queue_timeout,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: default_backend_connections(),
            max_queued_requests: default_queued_requests(),
            queue_timeout: default_queue_timeout(),
        }
    }
}

fn default_backend_connections() -> u32 {
    1024
}
fn default_queued_requests() -> u32 {
    1024
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Most connections to one backend (each is a file descriptor of the daemon).
pub const MAX_BACKEND_CONNECTIONS: u32 = 65_536;
/// Most requests waiting for a connection to one backend.
pub const MAX_QUEUED_REQUESTS: u32 = 65_536;

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
    /// What the health checks take the backends for when the daemon starts (see
    /// [`InitialHealth`]).
    #[serde(default)]
    pub initial_health: InitialHealth,
    /// TCP/UDP with health checks: how long a backend that becomes healthy (recovered, or added
    /// and past its first checks) takes to reach its full weight.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub slow_start: Option<Duration>,
    /// HTTP(S): see [`ConnectionLimits`].
    #[serde(default = "default_backend_connections")]
    pub max_connections: u32,
    #[serde(default = "default_queued_requests")]
    pub max_queued_requests: u32,
    #[serde(default = "default_queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
}

/// A checked backend's health before its first checks have answered, when the daemon starts.
/// A backend added to a running daemon (a reload, the admin API) always starts unhealthy: it
/// takes no new flows until it has passed `healthy_threshold` checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialHealth {
    /// Traffic at once, as before checks existed; `unhealthy_threshold` failures take it away.
    #[default]
    Healthy,
    /// No new flows until the backend has passed `healthy_threshold` checks.
    Unhealthy,
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
    /// TCP/UDP: open connections past which the backend takes no new flow (they go to the
    /// least loaded backend with room, or are dropped when none has). Absent: no limit. Not the
    /// group's `max_connections`, which bounds the HTTP(S) proxy's own connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// Largest per-backend `max_connections`: far above what a connection table holds, so a
/// typo of extra digits is caught rather than taken for no limit.
pub const MAX_BACKEND_MAX_CONNECTIONS: u32 = 10_000_000;

fn default_weight() -> u32 {
    1
}

/// Name the default group goes by in status output and errors.
pub const DEFAULT_GROUP: &str = "default";
