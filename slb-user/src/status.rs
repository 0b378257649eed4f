//! `slb status`: what the daemon applied (state file) joined with what the maps count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::IpAddr;

use aya::maps::MapError;
use serde::{Deserialize, Serialize};
use slb_common::pinned::{self, PinnedMap};
use slb_common::GlobalCounters;

use crate::announce::AnnounceStatus;
use crate::applied::{
    AppliedState, Endpoint, HealthStatus, ProxyBackendInfo, ProxyListenerInfo, Role, StateFileError,
};
use crate::config::GroupKind;
use crate::flows::FlowCounts;
use crate::instance::pin_dir;
use crate::maps::{CounterMaps, OpenMapError};

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub instance: String,
    pub generation: u64,
    pub interfaces: Vec<String>,
    /// Whether the program really runs on each of `interfaces` (see [`crate::links`]).
    pub interface_states: Vec<crate::links::InterfaceState>,
    pub listeners: Vec<ListenerStatus>,
    pub backends: Vec<BackendStatus>,
    pub counters: BTreeMap<String, u64>,
    /// Fill of the connection table as of the last sweep.
    pub connection_table: ConnectionTable,
    /// Changes made through the admin API since the file was last read (dropped by a reload):
    /// the latest ones, and how many came before them.
    pub runtime_changes: Vec<String>,
    pub runtime_changes_earlier: u64,
    pub warnings: Vec<String>,
    /// HTTP(S) listeners (served by the proxy; their traffic is in the access log).
    pub proxy_listeners: Vec<ProxyListenerInfo>,
    /// What the proxy counts of its bounds (see `proxy::counters`).
    pub proxy_counters: BTreeMap<String, u64>,
    /// The addresses announced through BIRD, with `[announce]`.
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
    /// Backends drained with a deadline (`slb backend drain`).
    #[serde(default)]
    pub drains: Vec<crate::applied::Drain>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionTable {
    pub entries: u64,
    pub capacity: u32,
    /// Entries the last sweep removed as idle.
    pub expired_last_sweep: u64,
    pub swept_at_unix_s: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub protocol: String,
    pub vip: IpAddr,
    pub port: u16,
    pub group: String,
    pub group_type: GroupKind,
    /// How packets reach the backends: `nat`, `dsr`, `dsr-ipip` or `fullnat`.
    #[serde(default)]
    pub forwarding: String,
    pub health_check: bool,
    pub persistence_timeout_s: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub connections: u64,
    /// Its access list, as the data plane holds it.
    #[serde(default)]
    pub acl: Option<AclStatus>,
    /// Packets its access list dropped.
    #[serde(default)]
    pub acl_dropped: u64,
    #[serde(default)]
    pub max_new_connections_per_second: Option<u32>,
    #[serde(default)]
    pub new_connections_burst: Option<u32>,
    /// New flows over the limit, dropped.
    #[serde(default)]
    pub rate_limited: u64,
    /// How new flows pick a backend: `maglev`, `wlc` or `active-standby`.
    #[serde(default)]
    pub scheduler: String,
    /// New flows dropped because every backend that could take them was at its
    /// `max_connections`.
    #[serde(default)]
    pub at_capacity: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclStatus {
    pub mode: crate::config::AclMode,
    pub prefixes: usize,
    pub established: crate::config::AclEstablished,
}

impl ListenerStatus {
    /// Whether an access list or a limit on new flows applies to it.
    pub fn has_admission_policy(&self) -> bool {
        self.acl.is_some() || self.max_new_connections_per_second.is_some()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub id: u32,
    pub listener: String,
    pub group: String,
    pub role: Option<Role>,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// `true` unless a health check declared it unhealthy.
    pub healthy: bool,
    /// `None` when not health-checked.
    pub health: Option<HealthStatus>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    /// Open flows as of the last sweep of the connection table plus those opened and closed
    /// since (what drains wait for): corrects itself at each sweep.
    pub connections: u64,
    /// Open connections now, as the data plane counts them for `wlc` and `max_connections`
    /// (BACKEND_CONNECTIONS): exact, but a flow the full connection table evicted stays counted.
    #[serde(default)]
    pub open_connections: u64,
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// New flows sent to another backend because this one was at its `max_connections`.
    #[serde(default)]
    pub at_capacity: u64,
}

impl BackendStatus {
    /// Its key as health and drains name it.
    pub fn key(&self) -> crate::applied::BackendKey {
        crate::applied::BackendKey {
            listener: self.listener.clone(),
            address: self.address,
            port: self.port,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.address, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Bpffs(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    OpenMap(#[from] OpenMapError),
    #[error("reading {map}: {source}")]
    Counter { map: &'static str, source: MapError },
}

fn counter_error(map: &PinnedMap) -> impl Fn(MapError) -> StatusError {
    let map = map.name;
    move |source| StatusError::Counter { map, source }
}

/// The status of a running instance as a CLI command sees it: from the files and pins its
/// daemon publishes (the daemon itself builds it from what it holds, see `metrics`).
pub fn collect(instance: &str) -> Result<Status, StatusError> {
    crate::dataplane::ensure_bpffs()?;
    let state = AppliedState::read(instance)?;
    let counters = CounterMaps::open(&pin_dir(instance))?;
    // The sweeper's tally plus the counters since: no walk of the connection table here.
    let flows = crate::flows::read_counts(instance);
    let interface_states = crate::links::interface_states(
        &pin_dir(instance),
        &state.interfaces,
        crate::links::read_history(instance),
    );
    let proxy_counters = crate::proxy::counters::read(instance);
    Status::build(&state, &counters, &flows, interface_states, proxy_counters)
}

impl Status {
    /// The applied `state` joined with what the data plane counts now and what the last sweep
    /// of the connection table found.
    pub fn build(
        state: &AppliedState,
        counters: &CounterMaps,
        flows: &FlowCounts,
        interface_states: Vec<crate::links::InterfaceState>,
        proxy_counters: BTreeMap<String, u64>,
    ) -> Result<Status, StatusError> {
        let listeners = listener_statuses(state, counters, flows)?;
        let backends = backend_statuses(state, counters, flows)?;
        let global = counters
            .global()
            .map_err(counter_error(&pinned::GLOBAL_STATS))?;
        let counters = GlobalCounters::FIELDS
            .iter()
            .map(|name| name.to_string())
            .zip(global.values())
            .collect();
        let mut warnings = no_normal_server_warnings(&listeners, &backends);
        warnings.extend(proxy_group_warnings(&state.proxy_listeners));
        for i in interface_states.iter().filter(|i| !i.attached) {
            warnings.push(format!("interface {}: {}", i.name, i.state));
        }
        let announce = AnnounceStatus::read(&state.instance);
        if let Some(a) = announce.as_ref().filter(|a| !a.in_bird) {
            warnings.push(format!(
                "BIRD does not have this node's announcements yet (slb retries every second): {}",
                a.last
                    .as_ref()
                    .map_or("not tried yet", |l| l.message.as_str())
            ));
        }
        Ok(Status {
            instance: state.instance.clone(),
            generation: state.generation,
            interfaces: state.interfaces.clone(),
            interface_states,
            listeners,
            backends,
            counters,
            connection_table: ConnectionTable {
                entries: flows.entries,
                capacity: flows.capacity,
                expired_last_sweep: flows.expired,
                swept_at_unix_s: flows.swept_at_unix_s,
            },
            runtime_changes: state.runtime_changes.clone(),
            runtime_changes_earlier: state.runtime_changes_earlier,
            proxy_listeners: state.proxy_listeners.clone(),
            proxy_counters,
            warnings,
            announce,
            drains: state.drains.clone(),
        })
    }
}

fn listener_statuses(
    state: &AppliedState,
    counters: &CounterMaps,
    flows: &FlowCounts,
) -> Result<Vec<ListenerStatus>, StatusError> {
    state
        .listeners
        .iter()
        .map(|l| {
            let t = counters
                .listener(l.index)
                .map_err(counter_error(&pinned::LISTENER_STATS))?;
            Ok(ListenerStatus {
                forwarding: forwarding_of(l.flags).into(),
                name: l.name.clone(),
                protocol: l.protocol.to_string(),
                vip: l.vip,
                port: l.port,
                group: l.group.clone(),
                group_type: l.group_kind,
                health_check: l.health_check,
                persistence_timeout_s: l.persistence_timeout_s,
                packets: t.packets,
                bytes: t.bytes,
                new_connections: t.new_connections,
                connections: flows
                    .listeners
                    .get(&l.index)
                    .copied()
                    .unwrap_or_default()
                    .current(&t),
                acl: l.acl.as_ref().map(|a| AclStatus {
                    mode: a.mode,
                    prefixes: a.prefixes,
                    established: a.established,
                }),
                acl_dropped: t.acl_dropped,
                max_new_connections_per_second: l.new_flow_limit.map(|n| n.per_second),
                new_connections_burst: l.new_flow_limit.map(|n| n.burst),
                rate_limited: t.rate_limited,
                scheduler: scheduler_of(l.flags).into(),
                at_capacity: t.at_capacity,
            })
        })
        .collect()
}

fn backend_statuses(
    state: &AppliedState,
    counters: &CounterMaps,
    flows: &FlowCounts,
) -> Result<Vec<BackendStatus>, StatusError> {
    state
        .backends
        .iter()
        .map(|b| {
            let t = counters
                .backend(b.id)
                .map_err(counter_error(&pinned::BACKEND_STATS))?;
            let open = counters.backend_connections.open_connections(b.id);
            Ok(BackendStatus {
                id: b.id,
                listener: b.key.listener.clone(),
                group: b.group.clone(),
                role: b.role,
                address: b.key.address,
                port: b.key.port,
                weight: b.weight,
                healthy: b.health.as_ref().is_none_or(|h| h.healthy),
                health: b.health.clone(),
                packets: t.packets,
                bytes: t.bytes,
                new_connections: t.new_connections,
                connections: flows
                    .backends
                    .get(&b.id)
                    .copied()
                    .unwrap_or_default()
                    .current(&t),
                open_connections: u64::from(open),
                max_connections: b.max_connections,
                at_capacity: t.at_capacity,
            })
        })
        .collect()
}

/// Groups of HTTP(S) listeners with no normal server (healthy, weight > 0).
fn proxy_group_warnings(proxy_listeners: &[ProxyListenerInfo]) -> Vec<String> {
    let mut warnings = Vec::new();
    for l in proxy_listeners {
        let mut groups: Vec<&str> = l.backends.iter().map(|b| b.group.as_str()).collect();
        groups.dedup();
        for g in groups {
            let normal = l.backends.iter().any(|b| {
                b.group == g && b.weight > 0 && b.health.as_ref().is_none_or(|h| h.healthy)
            });
            if !normal {
                warnings.push(format!(
                    "listener {}: group {g} has no normal server (healthy, weight > 0)",
                    l.name
                ));
            }
        }
    }
    warnings
}

/// Listeners whose group has no normal server (healthy, weight > 0) to take new flows.
fn no_normal_server_warnings(
    listeners: &[ListenerStatus],
    backends: &[BackendStatus],
) -> Vec<String> {
    listeners
        .iter()
        .filter(|l| {
            !backends
                .iter()
                .any(|b| b.listener == l.name && b.healthy && (b.weight > 0 || b.role.is_some()))
        })
        .map(|l| {
            format!(
                "listener {}: group {} has no normal server (healthy, weight > 0)",
                l.name, l.group
            )
        })
        .collect()
}

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    render_header(&mut out, status);
    render_listeners(&mut out, status);
    render_admission(&mut out, status);
    render_capacity(&mut out, status);
    render_announcements(&mut out, status);
    render_backends(&mut out, status);
    render_drains(&mut out, status);
    render_changes_and_warnings(&mut out, status);
    render_proxy_listeners(&mut out, status);
    let _ = writeln!(out, "\nCOUNTERS");
    for (name, value) in &status.counters {
        if *value > 0 {
            let _ = writeln!(out, "  {name:<24} {value}");
        }
    }
    if status.proxy_counters.values().any(|&v| v > 0) {
        let _ = writeln!(out, "\nPROXY COUNTERS");
        for (name, value) in &status.proxy_counters {
            if *value > 0 {
                let _ = writeln!(out, "  {name:<32} {value}");
            }
        }
    }
    out
}

fn health_word(health: Option<&HealthStatus>) -> &'static str {
    match health {
        None => "-",
        Some(h) if h.healthy => "healthy",
        Some(_) => "UNHEALTHY",
    }
}

fn render_header(out: &mut String, status: &Status) {
    let _ = writeln!(
        out,
        "instance {} (config generation {}), attached to {}",
        status.instance,
        status.generation,
        crate::links::describe(&status.interface_states)
    );
    let table = &status.connection_table;
    let _ = writeln!(
        out,
        "connection table: {} of {} entries ({:.1} %) at the last sweep{}, {} idle removed",
        table.entries,
        table.capacity,
        if table.capacity == 0 {
            0.0
        } else {
            table.entries as f64 * 100.0 / f64::from(table.capacity)
        },
        match std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|now| now.as_secs().saturating_sub(table.swept_at_unix_s))
        {
            Ok(age) if table.swept_at_unix_s > 0 => format!(" ({age} s ago)"),
            _ => " (none yet)".to_string(),
        },
        table.expired_last_sweep
    );
}

/// Width of a column of endpoints: its widest, and no less than an IPv4 `address:port` takes,
/// so IPv4-only tables keep their layout and an IPv6 endpoint (up to 47 characters) does not
/// push the rest of its row out of line.
fn endpoint_width(endpoints: impl IntoIterator<Item = Endpoint>) -> usize {
    endpoints
        .into_iter()
        .map(|e| e.to_string().len())
        .fold(22, usize::max)
}

/// A listener's forwarding mode, by its `LISTENER_F_*` flags.
fn forwarding_of(flags: u32) -> &'static str {
    use slb_common::{LISTENER_F_DSR, LISTENER_F_FULLNAT, LISTENER_F_TUNNEL};
    if flags & LISTENER_F_FULLNAT != 0 {
        "fullnat"
    } else if flags & LISTENER_F_TUNNEL != 0 {
        "dsr-ipip"
    } else if flags & LISTENER_F_DSR != 0 {
        "dsr"
    } else {
        "nat"
    }
}

/// How a listener's new flows pick a backend, by its `LISTENER_F_*` flags.
fn scheduler_of(flags: u32) -> &'static str {
    use slb_common::{LISTENER_F_ACTIVE_STANDBY, LISTENER_F_WLC};
    if flags & LISTENER_F_ACTIVE_STANDBY != 0 {
        "active-standby"
    } else if flags & LISTENER_F_WLC != 0 {
        "wlc"
    } else {
        "maglev"
    }
}

fn render_listeners(out: &mut String, status: &Status) {
    let vip_width = endpoint_width(
        status
            .listeners
            .iter()
            .map(|l| Endpoint::new(l.vip, l.port)),
    );
    let _ = writeln!(
        out,
        "\nLISTENER            PROTO  {:<vip_width$} FORWARD  SCHED   GROUP           CONNS   NEW_CONNS     PACKETS",
        "VIP:PORT"
    );
    for l in &status.listeners {
        let _ = writeln!(
            out,
            "{:<19} {:<6} {:<vip_width$} {:<8} {:<7} {:<15} {:>5} {:>11} {:>11}",
            l.name,
            l.protocol,
            Endpoint::new(l.vip, l.port),
            l.forwarding,
            l.scheduler,
            l.group,
            l.connections,
            l.new_connections,
            l.packets
        );
    }
}

/// Listeners with an access list or a limit on new flows, and what those dropped.
fn render_admission(out: &mut String, status: &Status) {
    let limited: Vec<&ListenerStatus> = status
        .listeners
        .iter()
        .filter(|l| l.has_admission_policy())
        .collect();
    if limited.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nADMISSION\nLISTENER            ACCESS LIST                           DROPPED  NEW FLOWS/S (BURST)   DROPPED"
    );
    for l in limited {
        let acl = match &l.acl {
            Some(a) => format!(
                "{} {} prefix{}, established {}",
                a.mode.as_str(),
                a.prefixes,
                if a.prefixes == 1 { "" } else { "es" },
                a.established.describe()
            ),
            None => "-".into(),
        };
        let limit = match (l.max_new_connections_per_second, l.new_connections_burst) {
            (Some(rate), Some(burst)) => format!("{rate} ({burst})"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<19} {acl:<37} {:>7}  {limit:<20} {:>8}",
            l.name, l.acl_dropped, l.rate_limited
        );
    }
}

/// Backends with `max_connections` and what turning new flows away cost: flows moved off a full
/// backend, and flows a listener dropped because every backend was full.
fn render_capacity(out: &mut String, status: &Status) {
    let limited: Vec<&BackendStatus> = status
        .backends
        .iter()
        .filter(|b| b.max_connections.is_some() || b.at_capacity > 0)
        .collect();
    let dropping: Vec<&ListenerStatus> = status
        .listeners
        .iter()
        .filter(|l| l.at_capacity > 0)
        .collect();
    if limited.is_empty() && dropping.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nCAPACITY");
    for l in dropping {
        let _ = writeln!(
            out,
            "  listener {}: {} new flow(s) dropped, every backend at its max_connections",
            l.name, l.at_capacity
        );
    }
    for b in limited {
        let max = b
            .max_connections
            .map_or_else(|| "no limit".to_string(), |m| m.to_string());
        let _ = writeln!(
            out,
            "  {} on {}: {} open of {max}, {} new flow(s) sent elsewhere at capacity",
            b.endpoint(),
            b.listener,
            b.open_connections,
            b.at_capacity
        );
    }
}

fn render_announcements(out: &mut String, status: &Status) {
    let Some(a) = &status.announce else {
        return;
    };
    let [v4, v6] = crate::announce::protocol_names(&a.target.protocol);
    let _ = writeln!(
        out,
        "\nANNOUNCED THROUGH BIRD ({}, protocols {v4} and {v6} in {})",
        a.target.bird_socket.display(),
        a.target.include_file.display()
    );
    let width = a
        .announcements
        .iter()
        .map(|x| x.address.to_string().len() + 4)
        .max()
        .unwrap_or(0)
        .max(18);
    let _ = writeln!(out, "{:<width$} ROLE  STATE      WHY", "PREFIX");
    for x in &a.announcements {
        let prefix = crate::announce::host_prefix(x.address);
        let role = x.role.as_str();
        let state = if x.announced {
            "announced"
        } else {
            "withdrawn"
        };
        let _ = writeln!(out, "{prefix:<width$} {role:<5} {state:<10} {}", x.reason);
    }
    if let Some(last) = &a.last {
        let ago = crate::health::unix_ns(std::time::SystemTime::now())
            .saturating_sub(last.at_unix_ns)
            / 1_000_000_000;
        let _ = writeln!(
            out,
            "BIRD: {} ({} s ago){}",
            last.message,
            ago,
            if a.in_bird {
                ""
            } else {
                "; retrying every second"
            }
        );
    }
}

fn render_drains(out: &mut String, status: &Status) {
    use crate::applied::DrainPhase;
    if status.drains.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nDRAINS");
    let now = crate::health::unix_ns(std::time::SystemTime::now());
    for d in &status.drains {
        let state = match d.phase {
            DrainPhase::Draining => format!(
                "draining: {} connection(s) left, {} s to the deadline{}",
                d.left,
                d.deadline_unix_ns.saturating_sub(now) / 1_000_000_000,
                if d.remove { ", then removed" } else { "" }
            ),
            DrainPhase::Drained => "drained (weight 0, no connection left)".into(),
            DrainPhase::Removed => "drained and removed".into(),
            DrainPhase::TimedOut => {
                format!("TIMED OUT with {} connection(s) left (weight 0)", d.left)
            }
            DrainPhase::RemovedAtDeadline => {
                format!("removed at the deadline, ending {} connection(s)", d.left)
            }
            DrainPhase::RemoveFailed => format!(
                "drained, but NOT REMOVED: {}",
                d.note.as_deref().unwrap_or("the removal was refused")
            ),
            DrainPhase::Ended => d.note.clone().unwrap_or_else(|| "ended".into()),
        };
        let _ = writeln!(out, "  {}: {state}", d.describe());
    }
}

fn render_backends(out: &mut String, status: &Status) {
    let backend_width = endpoint_width(status.backends.iter().map(BackendStatus::endpoint));
    let _ = writeln!(
        out,
        "\n{:<backend_width$} LISTENER            GROUP           ROLE     WEIGHT  HEALTH     CONNS   NEW_CONNS     PACKETS",
        "BACKEND"
    );
    for b in &status.backends {
        let role = match b.role {
            Some(Role::Active) => "active",
            Some(Role::Standby) => "standby",
            None => "-",
        };
        let _ = writeln!(
            out,
            "{:<backend_width$} {:<19} {:<15} {:<8} {:>6}  {:<9} {:>6} {:>11} {:>11}",
            b.endpoint(),
            b.listener,
            b.group,
            role,
            b.weight,
            health_word(b.health.as_ref()),
            b.open_connections,
            b.new_connections,
            b.packets
        );
    }
    for b in status.backends.iter().filter(|b| !b.healthy) {
        if let Some(h) = &b.health {
            let _ = writeln!(out, "  {} on {}: {}", b.endpoint(), b.listener, h.reason);
        }
    }
    for b in &status.backends {
        if let Some(percent) = b.health.as_ref().and_then(|h| h.slow_start_percent) {
            let _ = writeln!(
                out,
                "  {} on {}: slow start, {percent} % of its weight for new flows",
                b.endpoint(),
                b.listener
            );
        }
    }
}

fn render_changes_and_warnings(out: &mut String, status: &Status) {
    if !status.runtime_changes.is_empty() {
        let _ = writeln!(
            out,
            "\nRUNTIME CHANGES (dropped by the next reload of the file)"
        );
        if status.runtime_changes_earlier > 0 {
            let _ = writeln!(
                out,
                "  ... {} earlier change(s), in the daemon's log",
                status.runtime_changes_earlier
            );
        }
        for c in &status.runtime_changes {
            let _ = writeln!(out, "  {c}");
        }
    }
    for w in &status.warnings {
        let _ = writeln!(out, "\nWARNING: {w}");
    }
}

fn render_proxy_listeners(out: &mut String, status: &Status) {
    if status.proxy_listeners.is_empty() {
        return;
    }
    let listeners = &status.proxy_listeners;
    let vip_width = endpoint_width(listeners.iter().map(|l| Endpoint::new(l.vip, l.port)));
    let backend_width = endpoint_width(
        listeners
            .iter()
            .flat_map(|l| l.backends.iter().map(ProxyBackendInfo::endpoint)),
    );
    let _ = writeln!(
        out,
        "\nHTTP(S) LISTENER    PROTO  {:<vip_width$} GROUP           {:<backend_width$} WEIGHT  HEALTH",
        "VIP:PORT", "BACKEND"
    );
    for l in listeners {
        for b in &l.backends {
            let _ = writeln!(
                out,
                "{:<19} {:<6} {:<vip_width$} {:<15} {:<backend_width$} {:>6}  {}",
                l.name,
                l.protocol,
                Endpoint::new(l.vip, l.port),
                b.group,
                b.endpoint(),
                b.weight,
                health_word(b.health.as_ref())
            );
        }
    }
}

/// The status as OpenMetrics text (the `prometheus-client` crate's encoding): counters are
/// sampled as `<name>_total`, the exposition ends with `# EOF`.
pub fn render_prometheus(status: &Status) -> String {
    let mut registry = Registry::default();
    register_listener_metrics(&mut registry, status);
    register_backend_metrics(&mut registry, status);
    register_instance_metrics(&mut registry, status);
    let mut text = String::new();
    encode(&mut text, &registry).expect("encoding into a String cannot fail");
    text
}

/// The content type of [`render_prometheus`]'s text.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddressLabels {
    instance: String,
    address: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    instance: String,
    listener: String,
    protocol: String,
    vip: String,
    port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    instance: String,
    listener: String,
    group: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    instance: String,
    event: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// A counter family with one sample per item.
fn counters<L, T>(
    items: &[T],
    labels: impl Fn(&T) -> L,
    value: impl Fn(&T) -> u64,
) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Counter>::default();
    for item in items {
        family.get_or_create(&labels(item)).inc_by(value(item));
    }
    family
}

/// A gauge family with one sample per item that has a value.
fn gauges<L, T>(
    items: &[T],
    labels: impl Fn(&T) -> L,
    value: impl Fn(&T) -> Option<f64>,
) -> Family<L, FloatGauge>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, FloatGauge>::default();
    for item in items {
        if let Some(v) = value(item) {
            family.get_or_create(&labels(item)).set(v);
        }
    }
    family
}

fn register_listener_metrics(registry: &mut Registry, status: &Status) {
    let labels = |l: &ListenerStatus| ListenerLabels {
        instance: status.instance.clone(),
        listener: l.name.clone(),
        protocol: l.protocol.to_string(),
        vip: l.vip.to_string(),
        port: l.port.to_string(),
    };
    let traffic = |l: &ListenerStatus| Traffic {
        packets: l.packets,
        bytes: l.bytes,
        new_connections: l.new_connections,
        connections: l.connections,
    };
    register_traffic(
        registry,
        "slb_listener",
        [
            "Packets forwarded to backends",
            "Bytes forwarded to backends",
            "New flows balanced",
            "Open flows in the connection table at its last sweep, plus those opened and closed since",
        ],
        &status.listeners,
        labels,
        traffic,
    );
    registry.register(
        "slb_listener_acl_dropped",
        "Packets dropped by the listener's access list",
        counters(&status.listeners, labels, |l| l.acl_dropped),
    );
    registry.register(
        "slb_listener_rate_limited",
        "New flows dropped by the listener's max_new_connections_per_second",
        counters(&status.listeners, labels, |l| l.rate_limited),
    );
    registry.register(
        "slb_listener_at_capacity",
        "New flows dropped because every backend that could take them was at its max_connections",
        counters(&status.listeners, labels, |l| l.at_capacity),
    );
}

/// What a listener or a backend forwarded, and its current flows.
struct Traffic {
    packets: u64,
    bytes: u64,
    new_connections: u64,
    connections: u64,
}

/// `<prefix>_{packets,bytes,new_connections}_total` and `<prefix>_connections` of `items`, with
/// their help texts in that order.
fn register_traffic<T, L>(
    registry: &mut Registry,
    prefix: &str,
    help: [&str; 4],
    items: &[T],
    labels: impl Fn(&T) -> L + Copy,
    traffic: impl Fn(&T) -> Traffic + Copy,
) where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let [packets, bytes, new_connections, connections] = help;
    registry.register(
        format!("{prefix}_packets"),
        packets,
        counters(items, labels, |t| traffic(t).packets),
    );
    registry.register(
        format!("{prefix}_bytes"),
        bytes,
        counters(items, labels, |t| traffic(t).bytes),
    );
    registry.register(
        format!("{prefix}_new_connections"),
        new_connections,
        counters(items, labels, |t| traffic(t).new_connections),
    );
    registry.register(
        format!("{prefix}_connections"),
        connections,
        gauges(items, labels, |t| Some(traffic(t).connections as f64)),
    );
}

fn register_backend_metrics(registry: &mut Registry, status: &Status) {
    let labels = |b: &BackendStatus| BackendLabels {
        instance: status.instance.clone(),
        listener: b.listener.clone(),
        group: b.group.clone(),
        backend: b.endpoint().to_string(),
    };
    let traffic = |b: &BackendStatus| Traffic {
        packets: b.packets,
        bytes: b.bytes,
        new_connections: b.new_connections,
        connections: b.connections,
    };
    register_traffic(
        registry,
        "slb_backend",
        [
            "Packets forwarded to the backend",
            "Bytes forwarded to the backend",
            "New flows sent to the backend",
            "Open flows on the backend at the last sweep of the connection table, plus those \
             opened and closed since",
        ],
        &status.backends,
        labels,
        traffic,
    );
    let backends = &status.backends;
    registry.register(
        "slb_backend_weight",
        "Configured weight",
        gauges(backends, labels, |b| Some(f64::from(b.weight))),
    );
    // Not `slb_backend_connections`: that is the sweep's self-correcting tally, this the
    // data plane's exact count that wlc and max_connections act on.
    registry.register(
        "slb_backend_open_connections",
        "Open connections now, as the data plane counts them for wlc and max_connections",
        gauges(backends, labels, |b| Some(b.open_connections as f64)),
    );
    registry.register(
        "slb_backend_max_connections",
        "The backend's max_connections (backends with one only)",
        gauges(backends, labels, |b| b.max_connections.map(f64::from)),
    );
    registry.register(
        "slb_backend_at_capacity",
        "New flows sent to another backend because this one was at its max_connections",
        counters(backends, labels, |b| b.at_capacity),
    );
    registry.register(
        "slb_backend_up",
        "1 unless a health check declared the backend unhealthy",
        gauges(backends, labels, |b| {
            Some(if b.healthy { 1.0 } else { 0.0 })
        }),
    );
    registry.register(
        "slb_backend_health_changed_timestamp_seconds",
        "When the health state last changed (checked backends only)",
        gauges(backends, labels, |b| {
            b.health.as_ref().map(|h| h.since_unix_ns as f64 / 1e9)
        }),
    );
}

fn register_instance_metrics(registry: &mut Registry, status: &Status) {
    let instance = || InstanceLabels {
        instance: status.instance.clone(),
    };
    let table = &status.connection_table;
    let one = |value: f64| {
        let family = Family::<InstanceLabels, FloatGauge>::default();
        family.get_or_create(&instance()).set(value);
        family
    };
    registry.register(
        "slb_connection_table_entries",
        "Entries of the connection table at the last sweep",
        one(table.entries as f64),
    );
    registry.register(
        "slb_connection_table_capacity",
        "Size of the connection table (max_connections)",
        one(f64::from(table.capacity)),
    );
    let events: Vec<(&String, &u64)> = status.counters.iter().collect();
    registry.register(
        "slb_dataplane_events",
        "Packets that left the fast path, by what happened to them",
        counters(
            &events,
            |(event, _)| EventLabels {
                instance: status.instance.clone(),
                event: event.to_string(),
            },
            |(_, value)| **value,
        ),
    );
    let proxy_events: Vec<(&String, &u64)> = status.proxy_counters.iter().collect();
    registry.register(
        "slb_proxy_events",
        "HTTP(S) proxy: requests queued or refused at a backend's connection cap, clients cut \
         off for stalling, loops refused, file descriptors run out",
        counters(
            &proxy_events,
            |(event, _)| EventLabels {
                instance: status.instance.clone(),
                event: event.to_string(),
            },
            |(_, value)| **value,
        ),
    );
    if let Some(a) = &status.announce {
        let announced = Family::<AddressLabels, FloatGauge>::default();
        for x in &a.announcements {
            announced
                .get_or_create(&AddressLabels {
                    instance: status.instance.clone(),
                    address: x.address.to_string(),
                    role: x.role.as_str().into(),
                })
                .set(if x.announced && a.in_bird { 1.0 } else { 0.0 });
        }
        registry.register(
            "slb_announced",
            "1 while BIRD announces the address for this node, 0 while it is withdrawn",
            announced,
        );
    }
    registry.register(
        "slb_config_generation",
        "Config generation applied",
        one(status.generation as f64),
    );
}

/// `slb stats`: traffic per listener and backend; with `previous` (and the seconds since), also
/// rates.
pub fn render_stats(status: &Status, previous: Option<(&Status, f64)>) -> String {
    let mut out = String::new();
    let rate = |now: u64, before: Option<u64>| match (before, previous) {
        (Some(b), Some((_, secs))) if secs > 0.0 => {
            format!("{:.0}/s", now.saturating_sub(b) as f64 / secs)
        }
        _ => "-".into(),
    };
    let _ = writeln!(
        out,
        "{:<19} {:>12} {:>10} {:>14} {:>14} {:>10} {:>10} {:>10}",
        "LISTENER", "PACKETS", "PKT RATE", "BYTES", "NEW_CONNS", "CONN RATE", "CONNS", "REFUSED"
    );
    for l in &status.listeners {
        let before = previous.and_then(|(p, _)| p.listeners.iter().find(|x| x.name == l.name));
        // Dropped by the access list, the limit on new flows or for want of a backend with room
        // (`slb status` tells them apart).
        let refused = l.acl_dropped + l.rate_limited + l.at_capacity;
        let _ = writeln!(
            out,
            "{:<19} {:>12} {:>10} {:>14} {:>14} {:>10} {:>10} {:>10}",
            l.name,
            l.packets,
            rate(l.packets, before.map(|b| b.packets)),
            l.bytes,
            l.new_connections,
            rate(l.new_connections, before.map(|b| b.new_connections)),
            l.connections,
            refused
        );
    }
    let backend_width = endpoint_width(status.backends.iter().map(BackendStatus::endpoint));
    let _ = writeln!(
        out,
        "\n{:<backend_width$} {:<15} {:>12} {:>10} {:>14} {:>10} {:>8}  HEALTH (since)",
        "BACKEND", "LISTENER", "PACKETS", "PKT RATE", "NEW_CONNS", "CONN RATE", "CONNS",
    );
    for b in &status.backends {
        let before = previous.and_then(|(p, _)| {
            p.backends
                .iter()
                .find(|x| x.listener == b.listener && x.address == b.address && x.port == b.port)
        });
        let health = match &b.health {
            None => "not checked".to_string(),
            Some(h) => {
                let since =
                    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(h.since_unix_ns as u64);
                format!(
                    "{} ({})",
                    if h.healthy { "healthy" } else { "UNHEALTHY" },
                    humantime::format_rfc3339_seconds(since)
                )
            }
        };
        let _ = writeln!(
            out,
            "{:<backend_width$} {:<15} {:>12} {:>10} {:>14} {:>10} {:>8}  {}",
            b.endpoint(),
            b.listener,
            b.packets,
            rate(b.packets, before.map(|x| x.packets)),
            b.new_connections,
            rate(b.new_connections, before.map(|x| x.new_connections)),
            b.open_connections,
            health
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            instance: "edge".into(),
            generation: 3,
            interfaces: vec!["eth0".into()],
            interface_states: Vec::new(),
            listeners: vec![ListenerStatus {
                name: "web".into(),
                protocol: "tcp".into(),
                vip: "10.0.0.10".parse().unwrap(),
                port: 80,
                group: "pool".into(),
                group_type: GroupKind::Vserver,
                forwarding: "nat".into(),
                health_check: false,
                persistence_timeout_s: None,
                packets: 50,
                bytes: 5000,
                new_connections: 7,
                connections: 2,
                acl: Some(AclStatus {
                    mode: crate::config::AclMode::Deny,
                    prefixes: 12,
                    established: crate::config::AclEstablished::Keep,
                }),
                acl_dropped: 9,
                max_new_connections_per_second: Some(100),
                new_connections_burst: Some(200),
                rate_limited: 5,
                scheduler: "wlc".into(),
                at_capacity: 4,
            }],
            backends: vec![BackendStatus {
                id: 0,
                listener: "web".into(),
                group: "pool".into(),
                role: None,
                address: "10.0.1.2".parse().unwrap(),
                port: 8080,
                weight: 3,
                healthy: false,
                health: Some(HealthStatus {
                    healthy: false,
                    reason: "refused".into(),
                    since_unix_ns: 1_500_000_000,
                    confirmed: true,
                    slow_start_percent: None,
                }),
                packets: 50,
                bytes: 5000,
                new_connections: 7,
                connections: 2,
                open_connections: 3,
                max_connections: Some(10),
                at_capacity: 6,
            }],
            counters: BTreeMap::from([("malformed".to_string(), 4)]),
            connection_table: ConnectionTable {
                entries: 2,
                capacity: 1024,
                expired_last_sweep: 0,
                swept_at_unix_s: 0,
            },
            runtime_changes: Vec::new(),
            runtime_changes_earlier: 0,
            warnings: Vec::new(),
            proxy_listeners: Vec::new(),
            proxy_counters: BTreeMap::from([("loops_refused".to_string(), 2)]),
            announce: None,
            drains: Vec::new(),
        }
    }

    #[test]
    fn the_exposition_is_openmetrics_with_every_family() {
        let text = render_prometheus(&status());
        let listener =
            r#"{instance="edge",listener="web",protocol="tcp",vip="10.0.0.10",port="80"}"#;
        let backend = r#"{instance="edge",listener="web",group="pool",backend="10.0.1.2:8080"}"#;
        for line in [
            "# TYPE slb_listener_packets counter".to_string(),
            format!("slb_listener_packets_total{listener} 50"),
            format!("slb_listener_bytes_total{listener} 5000"),
            format!("slb_listener_new_connections_total{listener} 7"),
            format!("slb_listener_connections{listener} 2.0"),
            format!("slb_listener_acl_dropped_total{listener} 9"),
            format!("slb_listener_rate_limited_total{listener} 5"),
            format!("slb_backend_new_connections_total{backend} 7"),
            format!("slb_backend_weight{backend} 3.0"),
            format!("slb_backend_connections{backend} 2.0"),
            format!("slb_backend_open_connections{backend} 3.0"),
            format!("slb_backend_max_connections{backend} 10.0"),
            format!("slb_backend_at_capacity_total{backend} 6"),
            format!("slb_listener_at_capacity_total{listener} 4"),
            format!("slb_backend_up{backend} 0.0"),
            format!("slb_backend_health_changed_timestamp_seconds{backend} 1.5"),
            r#"slb_dataplane_events_total{instance="edge",event="malformed"} 4"#.to_string(),
            r#"slb_proxy_events_total{instance="edge",event="loops_refused"} 2"#.to_string(),
            r#"slb_connection_table_capacity{instance="edge"} 1024.0"#.to_string(),
            r#"slb_config_generation{instance="edge"} 3.0"#.to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// `status()` with an IPv6 listener "web6" on `vip` whose backend is `backend`:8080, after
    /// the IPv4 ones.
    fn dual_stack_status(vip: &str, backend: &str) -> Status {
        let mut status = status();
        let mut web6 = super::tests::status().listeners.remove(0);
        web6.name = "web6".into();
        web6.vip = vip.parse().unwrap();
        status.listeners.push(web6);
        let mut backend6 = super::tests::status().backends.remove(0);
        backend6.listener = "web6".into();
        backend6.address = backend.parse().unwrap();
        status.backends.push(backend6);
        status
    }

    #[test]
    fn ipv6_labels_read_as_socket_addresses_print() {
        let text = render_prometheus(&dual_stack_status("2001:db8::10", "2001:db8::2"));
        let listener =
            r#"{instance="edge",listener="web6",protocol="tcp",vip="2001:db8::10",port="80"}"#;
        let backend =
            r#"{instance="edge",listener="web6",group="pool",backend="[2001:db8::2]:8080"}"#;
        for line in [
            format!("slb_listener_packets_total{listener} 50"),
            format!("slb_backend_new_connections_total{backend} 7"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn endpoint_columns_are_as_wide_as_their_widest_endpoint() {
        // The column after an endpoint column starts at the same place in the header and in
        // every row.
        let aligned = |text: &str, header: &str, next_column: &str, rows: &[(&str, &str)]| {
            let header_line = text
                .lines()
                .find(|l| l.starts_with(header))
                .unwrap_or_else(|| panic!("no {header:?} header in\n{text}"));
            let at = header_line.find(next_column).unwrap();
            for (starts, next) in rows {
                let row = text.lines().find(|l| l.starts_with(starts)).unwrap();
                assert_eq!(row.find(next), Some(at), "{row:?} under {header_line:?}");
            }
        };
        // Wider than the 22 columns an IPv4 endpoint needs.
        let (vip, backend) = (
            "2001:db8:aaaa:bbbb:cccc:dddd:eeee:10",
            "2001:db8:aaaa:bbbb:cccc:dddd:eeee:2",
        );
        let dual = dual_stack_status(vip, backend);
        let text = render(&dual);
        aligned(
            &text,
            "LISTENER",
            "GROUP",
            &[("web ", "pool"), ("web6 ", "pool")],
        );
        aligned(
            &text,
            "BACKEND",
            "LISTENER",
            &[
                ("10.0.1.2:8080 ", "web "),
                (&format!("[{backend}]:8080 "), "web6"),
            ],
        );
        let stats = render_stats(&dual, None);
        aligned(
            &stats,
            "BACKEND",
            "LISTENER",
            &[
                ("10.0.1.2:8080 ", "web "),
                (&format!("[{backend}]:8080 "), "web6"),
            ],
        );
        // IPv4 keeps its 22 columns.
        let text = render(&status());
        assert!(text.contains("\n10.0.1.2:8080          web "), "{text}");
    }

    #[test]
    fn listeners_with_an_access_list_or_a_limit_show_what_they_dropped() {
        let mut status = status();
        let text = render(&status);
        assert!(
            text.contains("\nADMISSION\n")
                && text.contains(
                    "\nweb                 deny 12 prefixes, established kept          9  100 (200)                   5\n"
                ),
            "{text}"
        );
        let stats = render_stats(&status, None);
        let web = stats
            .lines()
            .find(|l| l.starts_with("web "))
            .expect("web in stats");
        assert!(
            stats.contains(" REFUSED\n") && web.ends_with(" 18"),
            "9 by the list, 5 by the limit and 4 at capacity: {stats}"
        );
        status.listeners[0].acl = None;
        status.listeners[0].max_new_connections_per_second = None;
        assert!(!render(&status).contains("ADMISSION"));
    }

    #[test]
    fn status_shows_the_scheduler_live_connections_and_what_capacity_turned_away() {
        let mut status = status();
        let text = render(&status);
        let web = text.lines().find(|l| l.starts_with("web ")).unwrap();
        assert!(web.contains(" nat      wlc     pool "), "{text}");
        let backend = text
            .lines()
            .find(|l| l.starts_with("10.0.1.2:8080 "))
            .unwrap();
        assert!(
            backend.contains("UNHEALTHY      3 "),
            "the live count: {text}"
        );
        assert!(
            text.contains(
                "\nCAPACITY\n  listener web: 4 new flow(s) dropped, every backend at its max_connections\n  \
                 10.0.1.2:8080 on web: 3 open of 10, 6 new flow(s) sent elsewhere at capacity\n"
            ),
            "{text}"
        );
        status.listeners[0].at_capacity = 0;
        status.backends[0].max_connections = None;
        status.backends[0].at_capacity = 0;
        assert!(!render(&status).contains("CAPACITY"));
    }
}
