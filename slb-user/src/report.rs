//! `slb report distribution`: is traffic spread the way the weights say? For each backend, its
//! share of new connections (L4, from the counters) or requests (HTTP(S), from the access log)
//! next to its weight share, the deviation and a verdict — the seed's troubleshooting steps,
//! built in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;

use crate::applied::AppliedState;
use crate::metrics::read_history;
use crate::proxy::access_log::AccessLogRecord;
use crate::status;

/// Smallest deviation (percentage points) called skewed; with little traffic the allowance grows
/// to three standard deviations of a fair draw, so chance alone is not called skew.
pub const MIN_SKEW_POINTS: f64 = 1.0;

/// Allowed deviation for a backend with weight share `p` (0..1) over `n` draws.
pub fn allowed_deviation(p: f64, n: u64) -> f64 {
    if n == 0 {
        return f64::INFINITY;
    }
    let sigma_points = (p * (1.0 - p) / n as f64).sqrt() * 100.0;
    (3.0 * sigma_points).max(MIN_SKEW_POINTS)
}
/// Fewer new connections/requests than this is too little to judge.
pub const MIN_SAMPLE: u64 = 100;

#[derive(Debug, Serialize)]
pub struct Report {
    pub instance: String,
    /// Start of the period (unix seconds); `None` = since the data plane started.
    pub since_unix_s: Option<u64>,
    pub listeners: Vec<ListenerReport>,
}

#[derive(Debug, Serialize)]
pub struct ListenerReport {
    pub listener: String,
    /// "new connections" (L4) or "requests" (HTTP(S)).
    pub unit: &'static str,
    pub total: u64,
    pub persistence: bool,
    pub backends: Vec<BackendShare>,
    pub verdict: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BackendShare {
    pub backend: String,
    pub group: String,
    pub weight: u32,
    pub healthy: bool,
    pub count: u64,
    pub share_pct: f64,
    pub weight_share_pct: f64,
    pub deviation_points: f64,
    /// Deviation still explained by chance for this much traffic.
    pub allowed_points: f64,
    /// With persistence: distinct client addresses on the backend and their share.
    pub clients: Option<u64>,
    pub client_share_pct: Option<f64>,
}

struct Row {
    backend: String,
    group: String,
    weight: u32,
    healthy: bool,
    count: u64,
    clients: Option<u64>,
}

fn judge(listener: &str, unit: &'static str, persistence: bool, rows: Vec<Row>) -> ListenerReport {
    let backends = shares(rows);
    let total: u64 = backends.iter().map(|b| b.count).sum();
    let skewed: Vec<&BackendShare> = backends
        .iter()
        .filter(|b| b.deviation_points.abs() > b.allowed_points)
        .collect();
    let verdict = verdict(total, unit, &skewed);
    let notes = notes(persistence, &backends, !skewed.is_empty());
    ListenerReport {
        listener: listener.into(),
        unit,
        total,
        persistence,
        backends,
        verdict,
        notes,
    }
}

/// Each backend's share of the traffic next to its share of the weight.
fn shares(rows: Vec<Row>) -> Vec<BackendShare> {
    let total: u64 = rows.iter().map(|r| r.count).sum();
    // Unhealthy backends get no traffic by design: the weight share is over the eligible ones.
    let eligible_weight: u64 = rows
        .iter()
        .filter(|r| r.healthy)
        .map(|r| u64::from(r.weight))
        .sum();
    let total_clients: u64 = rows.iter().filter_map(|r| r.clients).sum();
    let percent = |part: u64, whole: u64| {
        if whole > 0 {
            part as f64 * 100.0 / whole as f64
        } else {
            0.0
        }
    };
    rows.into_iter()
        .map(|r| {
            let share = percent(r.count, total);
            let weight_share = if r.healthy {
                percent(u64::from(r.weight), eligible_weight)
            } else {
                0.0
            };
            BackendShare {
                backend: r.backend,
                group: r.group,
                weight: r.weight,
                healthy: r.healthy,
                count: r.count,
                share_pct: share,
                weight_share_pct: weight_share,
                deviation_points: share - weight_share,
                allowed_points: allowed_deviation(weight_share / 100.0, total),
                clients: r.clients,
                client_share_pct: r.clients.map(|c| percent(c, total_clients)),
            }
        })
        .collect()
}

fn verdict(total: u64, unit: &str, skewed: &[&BackendShare]) -> String {
    if total < MIN_SAMPLE {
        format!("too little traffic to judge ({total} {unit}, need {MIN_SAMPLE})")
    } else if skewed.is_empty() {
        "balanced: every backend's share is within chance (3σ, at least 1 point) of its weight share".to_string()
    } else {
        let names: Vec<String> = skewed
            .iter()
            .map(|b| {
                format!(
                    "{} ({:+.1} points, chance allows ±{:.1})",
                    b.backend, b.deviation_points, b.allowed_points
                )
            })
            .collect();
        format!("skewed: {}", names.join(", "))
    }
}

/// What the reader should know to read the shares right.
fn notes(persistence: bool, backends: &[BackendShare], skewed: bool) -> Vec<String> {
    let mut notes = Vec::new();
    if persistence {
        notes.push(
            "session persistence is on: traffic follows client addresses (or cookies), so a few busy clients can skew shares; compare the per-client shares".into(),
        );
    }
    if backends.iter().any(|b| !b.healthy) {
        notes.push("unhealthy backends are expected to get nothing; their weight is left out of the weight shares".into());
    }
    if skewed && !persistence {
        notes.push(
            "check that every backend is healthy the whole period, that weights were not changed during it, and that long-lived connections (counted when they started) do not dominate".into(),
        );
    }
    notes
}

pub fn distribution(
    instance: &str,
    listener: Option<&str>,
    since: Option<Duration>,
) -> anyhow::Result<Report> {
    let state = AppliedState::read(instance)?;
    let current = status::collect(instance)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    let since_unix_s = since.map(|d| now.saturating_sub(d.as_secs()));

    // L4: counters now minus the newest sample at or before the start of the period.
    let base: BTreeMap<(String, String), u64> = match since_unix_s {
        None => BTreeMap::new(),
        Some(start) => {
            let history = read_history(instance);
            let sample = history
                .iter()
                .rev()
                .find(|s| s.unix_s <= start)
                .or(history.first());
            sample
                .map(|s| {
                    s.new_connections
                        .iter()
                        .map(|(l, b, n)| ((l.clone(), b.clone()), *n))
                        .collect()
                })
                .unwrap_or_default()
        }
    };
    let clients = clients_per_backend(instance)?;
    let mut listeners = Vec::new();
    for l in current
        .listeners
        .iter()
        .filter(|l| listener.is_none_or(|n| n == l.name))
    {
        let persistence = l.persistence_timeout_s.is_some();
        let rows = current
            .backends
            .iter()
            .filter(|b| b.listener == l.name)
            .map(|b| {
                let key = (b.listener.clone(), b.endpoint().to_string());
                Row {
                    backend: key.1.clone(),
                    group: b.group.clone(),
                    weight: b.weight,
                    healthy: b.healthy,
                    count: b
                        .new_connections
                        .saturating_sub(base.get(&key).copied().unwrap_or(0)),
                    clients: persistence.then(|| clients.get(&b.id).map_or(0, |c| c.len() as u64)),
                }
            })
            .collect();
        listeners.push(judge(&l.name, "new connections", persistence, rows));
    }

    listeners.extend(proxied_listener_reports(&state, listener, since_unix_s));
    if let Some(name) = listener {
        if listeners.is_empty() {
            anyhow::bail!("--listener: instance {instance:?} has no listener named {name:?}");
        }
    }
    Ok(Report {
        instance: instance.into(),
        since_unix_s,
        listeners,
    })
}

/// HTTP(S) listeners: their requests in the access log.
fn proxied_listener_reports(
    state: &AppliedState,
    listener: Option<&str>,
    since_unix_s: Option<u64>,
) -> Vec<ListenerReport> {
    let proxied: Vec<_> = state
        .proxy_listeners
        .iter()
        .filter(|l| listener.is_none_or(|n| n == l.name))
        .collect();
    if proxied.is_empty() {
        return Vec::new();
    }
    let log = state
        .access_log
        .as_ref()
        .map(std::fs::read_to_string)
        .transpose()
        .unwrap_or(None)
        .unwrap_or_default();
    let (requests, client_sets) = requests_per_backend(&log, since_unix_s);
    proxied
        .into_iter()
        .map(|l| {
            let rows = l
                .backends
                .iter()
                .map(|b| {
                    let key = (l.name.clone(), b.endpoint().to_string());
                    Row {
                        backend: key.1.clone(),
                        group: b.group.clone(),
                        weight: b.weight,
                        healthy: b.health.as_ref().is_none_or(|h| h.healthy),
                        count: requests.get(&key).copied().unwrap_or(0),
                        clients: l
                            .cookie_persistence
                            .then(|| client_sets.get(&key).map_or(0, |c| c.len() as u64)),
                    }
                })
                .collect();
            judge(&l.name, "requests", l.cookie_persistence, rows)
        })
        .collect()
}

/// (listener, backend address) as the access log names them.
type ListenerBackend = (String, String);

/// Requests per listener and backend in the access log since `since_unix_s`, and the distinct
/// client addresses among them; requests no backend answered (503) are left out.
fn requests_per_backend(
    log: &str,
    since_unix_s: Option<u64>,
) -> (
    BTreeMap<ListenerBackend, u64>,
    BTreeMap<ListenerBackend, BTreeSet<IpAddr>>,
) {
    let mut requests: BTreeMap<ListenerBackend, u64> = BTreeMap::new();
    let mut client_sets: BTreeMap<ListenerBackend, BTreeSet<IpAddr>> = BTreeMap::new();
    for record in log.lines().filter_map(AccessLogRecord::parse) {
        let in_period = since_unix_s.is_none_or(|start| {
            record
                .time
                .duration_since(SystemTime::UNIX_EPOCH)
                .is_ok_and(|t| t.as_secs() >= start)
        });
        let Some(backend) = record.backend.filter(|_| in_period) else {
            continue;
        };
        let key = (record.listener, backend.to_string());
        *requests.entry(key.clone()).or_default() += 1;
        client_sets
            .entry(key)
            .or_default()
            .insert(record.client.ip());
    }
    (requests, client_sets)
}

/// Distinct client addresses per backend id, from the connection table.
fn clients_per_backend(instance: &str) -> anyhow::Result<BTreeMap<u32, BTreeSet<[u8; 16]>>> {
    let maps = crate::maps::PinnedMaps::open(&crate::instance::pin_dir(instance))?;
    // A listener that persists IPv6 clients by prefix counts a prefix as one client, as the
    // data plane does.
    let mut prefixes: BTreeMap<u32, u32> = BTreeMap::new();
    for entry in maps.listeners.iter() {
        let (_, listener) = entry.context("reading LISTENERS")?;
        prefixes.insert(listener.index, listener.persist_ipv6_prefix);
    }
    let mut clients: BTreeMap<u32, BTreeSet<[u8; 16]>> = BTreeMap::new();
    for entry in maps.connections.iter() {
        let (flow, conn) = entry.context("reading CONNECTIONS")?;
        let prefix = prefixes.get(&conn.listener_index).copied().unwrap_or(128);
        clients
            .entry(conn.backend_id)
            .or_default()
            .insert(persisted_client(flow.src, prefix));
    }
    Ok(clients)
}

/// The client a persistence entry is for: an IPv6 address cut to `prefix` bits (an IPv4-mapped
/// address is always itself).
fn persisted_client(src: [u8; 16], prefix: u32) -> [u8; 16] {
    let ipv4_mapped = std::net::Ipv6Addr::from(src).to_ipv4_mapped().is_some();
    if ipv4_mapped || prefix == 0 || prefix >= 128 {
        return src;
    }
    let masked = slb_common::ipv6_prefix_words(slb_common::addr_words(&src), prefix);
    let mut out = [0u8; 16];
    for (chunk, word) in out.chunks_exact_mut(4).zip(masked) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    out
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let period = match report.since_unix_s {
        None => "since the data plane started".to_string(),
        Some(s) => format!(
            "since {}",
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
        ),
    };
    let _ = writeln!(
        out,
        "distribution report for instance {} ({period})",
        report.instance
    );
    for l in &report.listeners {
        let _ = writeln!(out, "\nlistener {}: {} {}", l.listener, l.total, l.unit);
        let _ = writeln!(
            out,
            "  {:<22} {:<12} {:>6} {:>9} {:>8} {:>12} {:>10} {:>8}{}",
            "BACKEND",
            "GROUP",
            "WEIGHT",
            "COUNT",
            "SHARE",
            "WEIGHT SHARE",
            "DEVIATION",
            "ALLOWED",
            if l.persistence {
                "   CLIENTS  CLIENT SHARE"
            } else {
                ""
            }
        );
        for b in &l.backends {
            let clients = match (b.clients, b.client_share_pct) {
                (Some(c), Some(p)) => format!(" {c:>9} {p:>12.1}%"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<22} {:<12} {:>6} {:>9} {:>7.1}% {:>11.1}% {:>+9.1}pp {:>6.1}pp{}{}",
                b.backend,
                b.group,
                b.weight,
                b.count,
                b.share_pct,
                b.weight_share_pct,
                b.deviation_points,
                b.allowed_points,
                clients,
                if b.healthy { "" } else { "  (unhealthy)" }
            );
        }
        let _ = writeln!(out, "  verdict: {}", l.verdict);
        for n in &l.notes {
            let _ = writeln!(out, "  note: {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn persisted_clients_are_cut_to_the_listener_prefix() {
        let a: std::net::Ipv6Addr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
        let cut: std::net::Ipv6Addr = "2001:db8:1:2::".parse().unwrap();
        let cut56: std::net::Ipv6Addr = "2001:db8:1::".parse().unwrap();
        assert_eq!(super::persisted_client(a.octets(), 64), cut.octets());
        assert_eq!(super::persisted_client(a.octets(), 56), cut56.octets());
        assert_eq!(super::persisted_client(a.octets(), 128), a.octets());
        let v4 = std::net::Ipv4Addr::new(10, 0, 0, 1)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(
            super::persisted_client(v4, 64),
            v4,
            "IPv4 clients are themselves"
        );
    }

    use super::*;

    fn row(name: &str, weight: u32, count: u64) -> Row {
        Row {
            backend: name.into(),
            group: "g".into(),
            weight,
            healthy: true,
            count,
            clients: None,
        }
    }

    #[test]
    fn chance_is_not_called_skew_but_real_skew_is() {
        let fair = judge(
            "l",
            "new connections",
            false,
            vec![row("a", 1, 35), row("b", 2, 105), row("c", 3, 160)],
        );
        assert!(fair.verdict.starts_with("balanced"), "{}", fair.verdict);
        let skewed = judge(
            "l",
            "new connections",
            false,
            vec![row("a", 1, 1000), row("b", 1, 2000)],
        );
        assert!(
            skewed.verdict.starts_with("skewed") && skewed.verdict.contains("a (-16.7 points"),
            "{}",
            skewed.verdict
        );
        let small = judge("l", "requests", true, vec![row("a", 1, 5)]);
        assert!(small.verdict.starts_with("too little"));
        assert!(small.notes[0].contains("persistence"));
    }

    #[test]
    fn access_log_requests_are_counted_per_backend_within_the_period() {
        let line = |time: &str, client: &str, backend: &str| {
            format!(
                r#"{{"time":"{time}","listener":"web","client":"{client}","host":"h","method":"GET","path":"/","status":200,"group":"g","backend":{backend},"duration_ms":1.0,"backend_ms":null}}"#
            )
        };
        let log = [
            line(
                "2026-01-01T00:00:00.000Z",
                "10.0.0.1:1000",
                r#""10.0.1.1:80""#,
            ),
            line(
                "2026-01-01T00:01:00.000Z",
                "10.0.0.1:1001",
                r#""10.0.1.1:80""#,
            ),
            line(
                "2026-01-01T00:01:00.000Z",
                "10.0.0.2:1000",
                r#""10.0.1.1:80""#,
            ),
            line("2026-01-01T00:01:00.000Z", "10.0.0.2:1000", "null"),
            "not a record".to_string(),
        ]
        .join("\n");
        let key = ("web".to_string(), "10.0.1.1:80".to_string());
        let (requests, clients) = requests_per_backend(&log, None);
        assert_eq!(
            requests.len(),
            1,
            "the 503 without a backend is not counted"
        );
        assert_eq!((requests[&key], clients[&key].len()), (3, 2));
        let minute = humantime::parse_rfc3339("2026-01-01T00:01:00Z").unwrap();
        let since = minute
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let (requests, clients) = requests_per_backend(&log, Some(since));
        assert_eq!((requests[&key], clients[&key].len()), (2, 2));
    }

    #[test]
    fn unhealthy_backends_leave_the_weight_shares() {
        let mut down = row("b", 1, 0);
        down.healthy = false;
        let r = judge("l", "new connections", false, vec![row("a", 1, 500), down]);
        assert_eq!(r.backends[0].weight_share_pct, 100.0);
        assert!(r.verdict.starts_with("balanced"), "{}", r.verdict);
    }
}
