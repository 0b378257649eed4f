//! Upkeep of the connection table: the daemon sweeps it every few seconds, removing flows that
//! stayed silent longer than their listener's idle timeout (or than `TCP_CLOSING_TIMEOUT_S`
//! after the client's FIN/RST), so the table does not stay full, and tallies the flows per
//! listener and backend as it goes. Readers (`slb status`, Prometheus, the history) never walk
//! the table: they add the data plane's opened/closed counters since the sweep to its tally.
//!
//! The table is read and cleaned with the kernel's batch operations: a sweep of 1M entries is a
//! few hundred syscalls, not two million.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::MapData;
use serde::{Deserialize, Serialize};
use slb_common::pinned;
use slb_common::{
    Connection, FlowKey, SnatMapping, TrafficCounters, CONN_F_CLOSING, DEFAULT_TCP_IDLE_TIMEOUT_S,
    SNAT_F_CONFIRMED, SNAT_UNCONFIRMED_TIMEOUT_S, TCP_CLOSING_TIMEOUT_S,
};

use crate::maps::{bpf_batch, bpf_elem, BatchAttr, CounterMaps, ElemAttr, BPF_MAP_LOOKUP_BATCH};

/// How often the daemon sweeps: well under the shortest timeout (10 s).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
const BATCH: u32 = 4096;

/// Flows of one listener or backend as the last sweep found them, with the data plane's
/// counters read just before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Entries not closing (no FIN/RST from the client yet).
    pub open: u64,
    /// `new_connections` and `closed_connections` summed over CPUs at the sweep.
    pub opened_counter: u64,
    pub closed_counter: u64,
}

impl Tally {
    /// Open flows now: the sweep's count plus what opened and closed since.
    pub fn current(&self, now: &TrafficCounters) -> u64 {
        let opened = now.new_connections.saturating_sub(self.opened_counter);
        let closed = now.closed_connections.saturating_sub(self.closed_counter);
        (self.open + opened).saturating_sub(closed)
    }
}

/// What a sweep found; written to the instance's flows file for the CLI.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowCounts {
    pub swept_at_unix_s: u64,
    /// Entries in the table after the sweep, and its size.
    pub entries: u64,
    pub capacity: u32,
    /// Entries the sweep removed.
    pub expired: u64,
    /// Full NAT mappings left after the sweep, and how many it removed.
    #[serde(default)]
    pub snat_mappings: u64,
    #[serde(default)]
    pub snat_expired: u64,
    /// By listener index and by backend id.
    pub listeners: BTreeMap<u32, Tally>,
    pub backends: BTreeMap<u32, Tally>,
}

impl FlowCounts {
    /// Counts `conn`, an entry the table keeps: in `entries`, and as open for its listener and
    /// backend unless closing.
    fn tally(&mut self, conn: &Connection) {
        self.entries += 1;
        if conn.flags & CONN_F_CLOSING == 0 {
            if let Some(t) = self.listeners.get_mut(&conn.listener_index) {
                t.open += 1;
            }
            if let Some(t) = self.backends.get_mut(&conn.backend_id) {
                t.open += 1;
            }
        }
    }
}

/// The idle timeout (seconds) of each listener index.
pub type Timeouts = BTreeMap<u32, u32>;

/// Whether a flow last seen at `last_seen_ns` is over its timeout at `now_ns`.
pub fn expired(conn: &Connection, timeouts: &Timeouts, now_ns: u64) -> bool {
    let timeout_s = if conn.flags & CONN_F_CLOSING != 0 {
        TCP_CLOSING_TIMEOUT_S
    } else {
        // A listener that is gone keeps its flows for the longest default: its index may come
        // back with a reload, and the flows cost only table space meanwhile.
        timeouts
            .get(&conn.listener_index)
            .copied()
            .unwrap_or(DEFAULT_TCP_IDLE_TIMEOUT_S)
    };
    now_ns.saturating_sub(conn.last_seen_ns) > u64::from(timeout_s) * 1_000_000_000
}

/// Whether a full NAT mapping last seen at `last_seen_ns` is over its timeout at `now_ns`: its
/// listener's idle timeout, `TCP_CLOSING_TIMEOUT_S` after the client's FIN/RST, and
/// `SNAT_UNCONFIRMED_TIMEOUT_S` while only SYNs were seen (so spoofed SYNs hold ports briefly).
pub fn snat_expired(mapping: &SnatMapping, timeouts: &Timeouts, now_ns: u64) -> bool {
    let timeout_s = if mapping.flags & CONN_F_CLOSING != 0 {
        TCP_CLOSING_TIMEOUT_S
    } else if mapping.flags & SNAT_F_CONFIRMED == 0 {
        SNAT_UNCONFIRMED_TIMEOUT_S
    } else {
        timeouts
            .get(&mapping.listener_index)
            .copied()
            .unwrap_or(DEFAULT_TCP_IDLE_TIMEOUT_S)
    };
    now_ns.saturating_sub(mapping.last_seen_ns) > u64::from(timeout_s) * 1_000_000_000
}

/// Calls `visit` on every entry of the hash map `fd`, a batch at a time.
pub(crate) fn for_each_entry<K: Default + Clone, V: Default + Clone>(
    fd: RawFd,
    mut visit: impl FnMut(&K, &V),
) -> std::io::Result<()> {
    let mut keys = vec![K::default(); BATCH as usize];
    let mut values = vec![V::default(); BATCH as usize];
    let mut token: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH,
            map_fd: fd as u32,
            ..Default::default()
        };
        let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        for (key, value) in keys.iter().zip(&values).take(n) {
            visit(key, value);
        }
        match result {
            Ok(()) => {}
            // The end of the map.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// The maps a sweep reads, opened once from the instance's pins.
pub struct Sweeper {
    connections: MapData,
    snat_mappings: MapData,
    /// SNAT_MAPPINGS again, typed, for the re-check before each removal.
    snat_table: std::sync::Mutex<aya::maps::HashMap<MapData, FlowKey, SnatMapping>>,
    capacity: u32,
    /// Also the data plane's open-connection counts, which an expired open flow leaves.
    counters: CounterMaps,
}

impl Sweeper {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Sweeper> {
        let connections = crate::maps::open_data(pin_dir, &pinned::CONNECTIONS)?;
        let capacity = connections.info()?.max_entries();
        Ok(Sweeper {
            connections,
            snat_mappings: crate::maps::open_data(pin_dir, &pinned::SNAT_MAPPINGS)?,
            snat_table: std::sync::Mutex::new(crate::maps::open(pin_dir, &pinned::SNAT_MAPPINGS)?),
            capacity,
            counters: CounterMaps::open(pin_dir)?,
        })
    }

    /// Removes expired flows and tallies the rest. A flow that sends a packet between the read
    /// and the delete (microseconds, after ≥ 10 s of silence) keeps its entry: it is put back
    /// (see [`Sweeper::expire`]) and tallied with the rest.
    pub fn sweep(
        &self,
        timeouts: &Timeouts,
        listener_indices: &[u32],
        backend_ids: &[u32],
    ) -> anyhow::Result<FlowCounts> {
        let mut counts = FlowCounts {
            swept_at_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            capacity: self.capacity,
            ..Default::default()
        };
        // Counters first: a flow opened during the walk is then counted twice until the next
        // sweep rather than not at all.
        for &index in listener_indices {
            let t = self.counters.listener(index)?;
            counts.listeners.insert(index, snapshot(&t));
        }
        for &id in backend_ids {
            let t = self.counters.backend(id)?;
            counts.backends.insert(id, snapshot(&t));
        }
        let now = monotonic_ns();
        let fd = self.connections.fd().as_fd().as_raw_fd();
        let mut stale = Vec::new();
        for_each_entry(fd, |key: &FlowKey, conn: &Connection| {
            if expired(conn, timeouts, now) {
                stale.push((*key, conn.last_seen_ns));
                return;
            }
            counts.tally(conn);
        })
        .context("reading CONNECTIONS")?;
        self.expire(fd, &stale, &mut counts)
            .context("removing expired flows")?;

        // Full NAT mappings: their ports go back to the pool.
        let fd = self.snat_mappings.fd().as_fd().as_raw_fd();
        let mut stale: Vec<FlowKey> = Vec::new();
        for_each_entry(fd, |key: &FlowKey, mapping: &SnatMapping| {
            if snat_expired(mapping, timeouts, now) {
                stale.push(*key);
            } else {
                counts.snat_mappings += 1;
            }
        })
        .context("reading SNAT_MAPPINGS")?;
        // Each one read again just before it goes: a mapping is how its flow's packets find
        // their SNAT port, so one that a packet refreshed since the walk must stay (a connection
        // whose mapping went would claim another port, which its backend does not know).
        let mut table = self
            .snat_table
            .lock()
            .map_err(|_| anyhow::anyhow!("SNAT table handle poisoned"))?;
        for key in stale {
            match table.get(&key, 0) {
                Ok(m) if snat_expired(&m, timeouts, monotonic_ns()) => {
                    if table.remove(&key).is_ok() {
                        counts.snat_expired += 1;
                    }
                }
                Ok(_) => counts.snat_mappings += 1,
                // Gone already.
                Err(_) => {}
            }
        }
        Ok(counts)
    }
}

impl Sweeper {
    /// Removes the entries `stale` names (flow, and when it was last seen at the walk), each
    /// with one lookup-and-delete, so that what the delete removed is known: an open flow
    /// removed here leaves its backend's open-connection count (the data plane counts only what
    /// it links and unlinks itself; of it and this delete, only the one that unlinked an entry
    /// counts it off). An entry a packet refreshed since the walk is put back (and tallied),
    /// unless the flow's next packet linked a new one meanwhile. Counts the flows that expired.
    fn expire(
        &self,
        fd: RawFd,
        stale: &[(FlowKey, u64)],
        counts: &mut FlowCounts,
    ) -> std::io::Result<()> {
        for (key, seen_ns) in stale {
            let Some(conn) = take_entry::<FlowKey, Connection>(fd, key)? else {
                continue;
            };
            if conn.last_seen_ns != *seen_ns && insert_new(fd, key, &conn)? {
                counts.tally(&conn);
                continue;
            }
            if conn.flags & CONN_F_CLOSING == 0 {
                self.counters.backend_connections.take_one(conn.backend_id);
            }
            counts.expired += 1;
        }
        Ok(())
    }
}

/// Removes `key` from the hash map `fd` and returns what it held then; `None` when it was gone.
fn take_entry<K, V: Default>(fd: RawFd, key: &K) -> std::io::Result<Option<V>> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    match bpf_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Inserts `key` → `value` into the hash map `fd` unless the key is there: whether it did.
fn insert_new<K, V>(fd: RawFd, key: &K, value: &V) -> std::io::Result<bool> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_NOEXIST: u64 = 1;
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags: BPF_NOEXIST,
    };
    match bpf_elem(BPF_MAP_UPDATE_ELEM, &mut attr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

fn snapshot(t: &TrafficCounters) -> Tally {
    Tally {
        open: 0,
        opened_counter: t.new_connections,
        closed_counter: t.closed_connections,
    }
}

/// The clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn write_counts(instance: &str, counts: &FlowCounts) -> anyhow::Result<()> {
    let path = crate::instance::flows_file(instance);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(counts)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The last sweep's counts, or none before the first sweep.
pub fn read_counts(instance: &str) -> FlowCounts {
    std::fs::read(crate::instance::flows_file(instance))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// What the sweeper needs from the applied state: timeouts by listener index, and which
/// listener indices and backend ids to tally.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepPlan {
    pub timeouts: Timeouts,
    pub listener_indices: Vec<u32>,
    pub backend_ids: Vec<u32>,
}

impl SweepPlan {
    pub fn from_state(state: &crate::applied::AppliedMaps) -> SweepPlan {
        SweepPlan {
            timeouts: state
                .listeners
                .iter()
                .map(|l| (l.index, l.idle_timeout_s))
                .collect(),
            listener_indices: state.listeners.iter().map(|l| l.index).collect(),
            backend_ids: state.backends.iter().map(|b| b.id).collect(),
        }
    }
}

/// The daemon's sweeping task: sweeps now and then every `SWEEP_INTERVAL` with the plan the
/// daemon last published, and publishes what it found: in the flows file for the CLI, and on
/// `found` for the daemon's own readers.
pub async fn run(
    instance: String,
    pin_dir: PathBuf,
    plan: tokio::sync::watch::Receiver<SweepPlan>,
    found: tokio::sync::watch::Sender<FlowCounts>,
) {
    let sweeper = match Sweeper::open(&pin_dir) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            tracing::error!("connection table upkeep disabled: {e:#}");
            return;
        }
    };
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = plan.borrow().clone();
        let sweeper = sweeper.clone();
        let instance = instance.clone();
        let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<FlowCounts> {
            let counts = sweeper.sweep(
                &current.timeouts,
                &current.listener_indices,
                &current.backend_ids,
            )?;
            write_counts(&instance, &counts)?;
            Ok(counts)
        })
        .await;
        if let Ok(Ok(counts)) = &outcome {
            found.send_replace(counts.clone());
        }
        match outcome {
            Ok(Ok(counts)) if counts.expired > 0 => tracing::debug!(
                expired = counts.expired,
                entries = counts.entries,
                "connection table swept"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("sweeping the connection table: {e:#}"),
            Err(e) => tracing::warn!("sweeping the connection table: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(listener_index: u32, last_seen_s: u64, flags: u32) -> Connection {
        Connection {
            listener_index,
            last_seen_ns: last_seen_s * 1_000_000_000,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn idle_and_closing_timeouts() {
        let timeouts = Timeouts::from([(0, 30), (1, 900)]);
        let now = 1000 * 1_000_000_000;
        assert!(!expired(&conn(0, 975, 0), &timeouts, now));
        assert!(expired(&conn(0, 969, 0), &timeouts, now));
        assert!(!expired(&conn(1, 969, 0), &timeouts, now));
        // After FIN/RST the closing timeout applies whatever the listener's.
        assert!(expired(&conn(1, 989, CONN_F_CLOSING), &timeouts, now));
        assert!(!expired(&conn(1, 991, CONN_F_CLOSING), &timeouts, now));
        // An unknown listener keeps the longest default.
        assert!(!expired(&conn(7, 200, 0), &timeouts, now));
    }

    #[test]
    fn current_count_adds_what_opened_and_closed_since_the_sweep() {
        let tally = Tally {
            open: 10,
            opened_counter: 100,
            closed_counter: 90,
        };
        let now = TrafficCounters {
            new_connections: 105,
            closed_connections: 97,
            ..Default::default()
        };
        assert_eq!(tally.current(&now), 8);
    }

    #[test]
    fn snat_mappings_expire_by_idle_closing_and_unconfirmed_timeouts() {
        let timeouts = Timeouts::from([(1, 900)]);
        let mapping = |last_seen_s: u64, flags: u32| SnatMapping {
            listener_index: 1,
            last_seen_ns: last_seen_s * 1_000_000_000,
            flags,
            ..Default::default()
        };
        let now = 1_000 * 1_000_000_000;
        // Past the handshake: the listener's idle timeout.
        assert!(!snat_expired(
            &mapping(500, SNAT_F_CONFIRMED),
            &timeouts,
            now
        ));
        assert!(snat_expired(&mapping(50, SNAT_F_CONFIRMED), &timeouts, now));
        // Only SYNs seen: gone after SNAT_UNCONFIRMED_TIMEOUT_S.
        assert!(!snat_expired(&mapping(995, 0), &timeouts, now));
        assert!(snat_expired(&mapping(985, 0), &timeouts, now));
        // After the client's FIN/RST: TCP_CLOSING_TIMEOUT_S.
        let closing = SNAT_F_CONFIRMED | CONN_F_CLOSING;
        assert!(!snat_expired(&mapping(995, closing), &timeouts, now));
        assert!(snat_expired(&mapping(985, closing), &timeouts, now));
    }
}
