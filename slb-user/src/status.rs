//! `slb status`: what the daemon applied (state file) joined with what the maps count.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use serde::Serialize;
use slb_common::GlobalCounters;

use crate::config::GroupKind;
use crate::daemon::state_file;
use crate::dataplane::pin_dir;
use crate::health::HealthStatus;
use crate::maps::{sum_traffic, PinnedMaps};
use crate::reconcile::{AppliedState, Role};

#[derive(Debug, Serialize)]
pub struct Status {
    pub instance: String,
    pub generation: u64,
    pub interfaces: Vec<String>,
    pub listeners: Vec<ListenerStatus>,
    pub backends: Vec<BackendStatus>,
    pub counters: BTreeMap<&'static str, u64>,
    /// Changes made through the admin API since the file was last read (dropped by a reload).
    pub runtime_changes: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub protocol: String,
    pub vip: String,
    pub port: u16,
    pub group: String,
    pub group_type: GroupKind,
    pub health_check: bool,
    pub persistence_timeout_s: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub connections: u64,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub id: u32,
    pub listener: String,
    pub group: String,
    pub role: Option<Role>,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    /// `true` unless a health check declared it unhealthy.
    pub healthy: bool,
    /// `None` when not health-checked.
    pub health: Option<HealthStatus>,
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub connections: u64,
}

pub fn collect(instance: &str) -> anyhow::Result<Status> {
    crate::dataplane::ensure_bpffs()?;
    let path = state_file(instance);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "instance {instance:?} is not running here (no {})",
            path.display()
        )
    })?;
    let state: AppliedState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let maps = PinnedMaps::open(&pin_dir(instance))?;

    let mut conns_by_backend: BTreeMap<u32, u64> = BTreeMap::new();
    let mut conns_by_listener: BTreeMap<u32, u64> = BTreeMap::new();
    for entry in maps.connections.iter() {
        let (_, conn) = entry.context("reading CONNECTIONS")?;
        *conns_by_backend.entry(conn.backend_id).or_default() += 1;
        *conns_by_listener.entry(conn.listener_index).or_default() += 1;
    }

    let mut listeners = Vec::new();
    for l in &state.listeners {
        let t = sum_traffic(
            &maps
                .listener_stats
                .get(&l.index, 0)
                .context("reading LISTENER_STATS")?,
        );
        listeners.push(ListenerStatus {
            name: l.name.clone(),
            protocol: l.protocol.to_string(),
            vip: l.vip.to_string(),
            port: l.port,
            group: l.group.clone(),
            group_type: l.group_kind,
            health_check: l.health_check,
            persistence_timeout_s: l.persistence_timeout_s,
            packets: t.packets,
            bytes: t.bytes,
            new_connections: t.new_connections,
            connections: conns_by_listener.get(&l.index).copied().unwrap_or(0),
        });
    }
    let mut backends = Vec::new();
    for b in &state.backends {
        let t = sum_traffic(
            &maps
                .backend_stats
                .get(&b.id, 0)
                .context("reading BACKEND_STATS")?,
        );
        backends.push(BackendStatus {
            id: b.id,
            listener: b.key.listener.clone(),
            group: b.group.clone(),
            role: b.role,
            address: b.key.address.to_string(),
            port: b.key.port,
            weight: b.weight,
            healthy: b.health.as_ref().is_none_or(|h| h.healthy),
            health: b.health.clone(),
            packets: t.packets,
            bytes: t.bytes,
            new_connections: t.new_connections,
            connections: conns_by_backend.get(&b.id).copied().unwrap_or(0),
        });
    }
    let mut global = GlobalCounters::default();
    for per_cpu in maps
        .global_stats
        .get(&0, 0)
        .context("reading GLOBAL_STATS")?
        .iter()
    {
        global.add(per_cpu);
    }
    let counters = GlobalCounters::FIELDS
        .iter()
        .copied()
        .zip(global.values())
        .collect();
    let warnings = no_normal_server_warnings(&listeners, &backends);
    Ok(Status {
        instance: state.instance,
        generation: state.generation,
        interfaces: state.interfaces,
        listeners,
        backends,
        counters,
        runtime_changes: state.runtime_changes,
        warnings,
    })
}

/// The seed's advice: every group needs at least one normal server (healthy, weight > 0).
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
    let _ = writeln!(
        out,
        "instance {} (config generation {}), attached to {}",
        status.instance,
        status.generation,
        status.interfaces.join(", ")
    );
    let _ = writeln!(
        out,
        "\nLISTENER            PROTO  VIP:PORT               GROUP           CONNS   NEW_CONNS     PACKETS"
    );
    for l in &status.listeners {
        let _ = writeln!(
            out,
            "{:<19} {:<6} {:<22} {:<15} {:>5} {:>11} {:>11}",
            l.name,
            l.protocol,
            format!("{}:{}", l.vip, l.port),
            l.group,
            l.connections,
            l.new_connections,
            l.packets
        );
    }
    let _ = writeln!(
        out,
        "\nBACKEND                LISTENER            GROUP           ROLE     WEIGHT  HEALTH     CONNS   NEW_CONNS     PACKETS"
    );
    for b in &status.backends {
        let health = match &b.health {
            None => "-",
            Some(h) if h.healthy => "healthy",
            Some(_) => "UNHEALTHY",
        };
        let role = match b.role {
            Some(Role::Active) => "active",
            Some(Role::Standby) => "standby",
            None => "-",
        };
        let _ = writeln!(
            out,
            "{:<22} {:<19} {:<15} {:<8} {:>6}  {:<9} {:>6} {:>11} {:>11}",
            format!("{}:{}", b.address, b.port),
            b.listener,
            b.group,
            role,
            b.weight,
            health,
            b.connections,
            b.new_connections,
            b.packets
        );
    }
    for b in status.backends.iter().filter(|b| !b.healthy) {
        if let Some(h) = &b.health {
            let _ = writeln!(
                out,
                "  {}:{} on {}: {}",
                b.address, b.port, b.listener, h.reason
            );
        }
    }
    if !status.runtime_changes.is_empty() {
        let _ = writeln!(
            out,
            "\nRUNTIME CHANGES (dropped by the next reload of the file)"
        );
        for c in &status.runtime_changes {
            let _ = writeln!(out, "  {c}");
        }
    }
    for w in &status.warnings {
        let _ = writeln!(out, "\nWARNING: {w}");
    }
    let _ = writeln!(out, "\nCOUNTERS");
    for (name, value) in &status.counters {
        if *value > 0 {
            let _ = writeln!(out, "  {name:<24} {value}");
        }
    }
    out
}
