//! `slb explain`: which backend a flow goes to, and why, read from the maps the data plane reads.
//!
//! Two halves, as the reconciler has: [`decide`] is the data plane's decision order (connection
//! table, half-open table, then the listener's policy: active/standby, persistence, the Maglev
//! ring) over any [`FlowMaps`], a pure function unit-tested on synthetic map contents; the
//! [`PinnedFlowMaps`] implementation reads a running instance's pinned maps, and [`explain`]
//! names what [`decide`] found with the applied state (listener and backend names, groups,
//! weights). The flow hash, its seed and the half-open slot come from slb-common, as the data
//! plane's do; "what if this backend were removed" builds the table with the reconciler's own
//! [`ring_table`] and asks [`decide`] again over the maps as they would be.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use aya::maps::{Array, ArrayOfMaps, HashMap, MapData, MapError};
use serde::{Deserialize, Serialize};
use slb_common::hash::{flow_hash, FLOW_HASH_SEED};
use slb_common::{
    acl_set, addr_words, half_open_check, half_open_slot, ipv6_persistence_client, pinned,
    AclPrefix, Addr, Backend, Connection, FlowKey, HalfOpen, ListenerEntry, ListenerKey,
    NewFlowLimit, PersistKey, Persisted, WlcSet, BACKEND_F_DRAINING, BACKEND_F_PRESENT,
    CONN_F_CLOSING, HEALTH_DOWN, IPPROTO_TCP, IPPROTO_UDP, LISTENER_F_ACL_ALLOW,
    LISTENER_F_ACL_CUT_ESTABLISHED, LISTENER_F_ACL_DENY, LISTENER_F_ACTIVE_STANDBY,
    LISTENER_F_IGNORE_HEALTH, LISTENER_F_MAX_CONNECTIONS, LISTENER_F_NEW_FLOW_LIMIT,
    LISTENER_F_PERSIST, LISTENER_F_WLC, MAX_WLC_BACKENDS, NO_BACKEND,
};

use crate::applied::{AppliedBackend, AppliedListener, AppliedState, StateFileError};
use crate::config::{BackendName, GroupKind};
use crate::instance::pin_dir;
use crate::maps::{open, OpenMapError};
use crate::reconcile::{addr_of_data_plane, data_plane_addr, maglev_identity, ring_table};

// ---------------------------------------------------------------------------------------------
// Arguments

/// The L4 protocol of `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn ip_protocol(self) -> u8 {
        match self {
            L4::Tcp => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
        }
    }
}

impl fmt::Display for L4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        })
    }
}

/// `--to VIP:PORT/tcp|udp`: a TCP/UDP listener's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: L4,
}

impl fmt::Display for ListenerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )
    }
}

impl FromStr for ListenerAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<ListenerAddr, String> {
        let expected = "expected VIP:PORT/tcp or VIP:PORT/udp, e.g. 192.0.2.10:80/tcp or \
                        [2001:db8::10]:53/udp";
        let (endpoint, protocol) = text
            .rsplit_once('/')
            .ok_or_else(|| format!("{text:?} has no /tcp or /udp; {expected}"))?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => L4::Tcp,
            "udp" => L4::Udp,
            other => return Err(format!("{other:?} is not tcp or udp; {expected}")),
        };
        let socket: SocketAddr = endpoint
            .parse()
            .map_err(|_| format!("{endpoint:?} is not an address:port; {expected}"))?;
        Ok(ListenerAddr {
            vip: socket.ip(),
            port: socket.port(),
            protocol,
        })
    }
}

/// `--from ADDR:PORT` (IPv6 as `[ADDR]:PORT`).
pub fn parse_client(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not a client address and port; expected ADDR:PORT, e.g. \
             198.51.100.7:40000 or [2001:db8::7]:40000"
        )
    })
}

/// The flow key the data plane builds for a packet from `client` to the listener `to`.
pub fn flow_key(client: SocketAddr, to: &ListenerAddr) -> Option<FlowKey> {
    let protocol = to.protocol.ip_protocol();
    match (client.ip(), to.vip) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => Some(FlowKey::ipv4(
            src.octets(),
            dst.octets(),
            client.port(),
            to.port,
            protocol,
        )),
        (IpAddr::V6(src), IpAddr::V6(dst)) => Some(FlowKey::ipv6(
            addr_words(&src.octets()),
            addr_words(&dst.octets()),
            client.port(),
            to.port,
            protocol,
        )),
        _ => None,
    }
}

/// The address persistence keys `flow`'s client by on `listener`: its source, or for IPv6 the
/// data plane's prefix of it (`slb_common::ipv6_persistence_client`).
pub fn persistence_client(flow: &FlowKey, listener: &ListenerEntry, ipv6: bool) -> Addr {
    if ipv6 {
        ipv6_persistence_client(flow, listener)
    } else {
        flow.src
    }
}

// ---------------------------------------------------------------------------------------------
// Decide: the data plane's order, over any map contents

/// Which persistence table an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PersistTable {
    /// PERSISTENCE: written when a connection of the client was established.
    Established,
    /// PERSIST_PENDING: written by a handshake under way.
    Pending,
}

/// The maps [`decide`] reads, as the data plane reads them.
pub trait FlowMaps {
    /// CONNECTIONS.
    fn connection(&self, flow: &FlowKey) -> Option<Connection>;
    /// HALF_OPEN slot `slot`.
    fn half_open(&self, slot: u32) -> Option<HalfOpen>;
    /// PERSISTENCE or PERSIST_PENDING.
    fn persisted(&self, table: PersistTable, key: &PersistKey) -> Option<Persisted>;
    /// BACKENDS (present or not: the caller checks `BACKEND_F_PRESENT`).
    fn backend(&self, id: u32) -> Option<Backend>;
    /// BACKEND_HEALTH (an array: unwritten ids read as up).
    fn health(&self, id: u32) -> u32;
    /// Slot `slot` of ring `ring_index` of RINGS.
    fn ring_slot(&self, ring_index: u32, slot: u32) -> Option<u32>;
    /// Whether set `set` of ACL has a prefix holding `client`.
    fn acl_lists(&self, set: u32, client: &Addr) -> bool;
    /// NEW_FLOW_LIMITS entry `index`.
    fn new_flow_limit(&self, index: u32) -> Option<NewFlowLimit>;
    /// BACKEND_CONNECTIONS: the backend's open connections (`slb_common::open_connections`).
    fn open_connections(&self, id: u32) -> u32;
    /// WLC_SETS entry `ring_index` (the listener's live ring slot).
    fn wlc_set(&self, ring_index: u32) -> Option<WlcSet>;
}

/// How a flow's backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Via {
    /// The connection table's entry: the flow keeps its backend.
    Connection { age_ns: u64, closing: bool },
    /// The half-open table: a TCP flow between its first packet and its next non-SYN one.
    HalfOpen,
    /// An active/standby listener: the active while healthy, else the standby.
    ActiveStandby { active: u32, active_healthy: bool },
    /// A persistence entry of the client address, `age_ns` old.
    Persistence {
        table: PersistTable,
        client: Addr,
        age_ns: u64,
    },
    /// Slot `slot` of the listener's Maglev ring of `size` slots.
    Ring { slot: u32, size: u32 },
    /// The member of the listener's WLC set with the fewest open connections per weight (of
    /// those with room, when its backends have `max_connections`).
    LeastConnections {
        open: u32,
        weight: u32,
        members: u32,
    },
}

/// Why a flow has no backend (the data plane drops its packets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum NoBackend {
    /// The ring slot holds no backend (every backend of the listener has weight 0).
    EmptySlot { slot: u32, size: u32 },
    /// The listener has no ring, or its ring cannot be read.
    NoRing,
    /// The policy named a backend that is not present (dropped as a failed lookup).
    NotPresent { id: u32 },
    /// The listener's access list refuses the client (and the flow is not an established one
    /// the list lets go on).
    AclRefused { allow_list: bool, cut: bool },
    /// A new flow, and the listener's bucket of new flows is empty now.
    RateLimited { per_second: u64 },
    /// A new flow, and every backend that could take it is at its `max_connections`.
    AtCapacity,
}

/// What the data plane does with the next packet of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The backend, or why there is none.
    pub backend: Result<u32, NoBackend>,
    /// How it was chosen (for `Err`, the step that failed).
    pub via: Option<Via>,
    /// The backend the connection or half-open table named, which is no longer usable (removed
    /// or unhealthy): the flow is balanced again.
    pub repicked_from: Option<u32>,
    /// The backend the policy picked for a new flow, at its `max_connections`: the flow goes to
    /// the least loaded backend with room instead (or is dropped when none has).
    #[serde(default)]
    pub full: Option<u32>,
}

fn present<M: FlowMaps + ?Sized>(maps: &M, id: u32) -> Option<Backend> {
    maps.backend(id)
        .filter(|b| b.flags & BACKEND_F_PRESENT != 0)
}

/// As the data plane's `usable_backend`: present, and healthy unless the listener ignores
/// health.
fn usable<M: FlowMaps + ?Sized>(maps: &M, id: u32, listener: &ListenerEntry) -> Option<Backend> {
    let backend = present(maps, id)?;
    if listener.flags & LISTENER_F_IGNORE_HEALTH == 0 && maps.health(id) == HEALTH_DOWN {
        return None;
    }
    Some(backend)
}

/// The data plane's decision for the next packet of `flow` (client address for persistence
/// `client`) to `listener` at monotonic time `now`: `balancer::pick_backend`'s order, without
/// its writes.
pub fn decide<M: FlowMaps + ?Sized>(
    maps: &M,
    flow: &FlowKey,
    client: &Addr,
    listener: &ListenerEntry,
    now: u64,
) -> Decision {
    if let Some(refused) = acl_refusal(maps, flow, listener) {
        return Decision {
            backend: Err(refused),
            via: None,
            repicked_from: None,
            full: None,
        };
    }
    let mut repicked_from = None;
    if let Some(conn) = maps.connection(flow) {
        if usable(maps, conn.backend_id, listener).is_some() {
            return Decision {
                backend: Ok(conn.backend_id),
                via: Some(Via::Connection {
                    age_ns: now.saturating_sub(conn.last_seen_ns),
                    closing: conn.flags & CONN_F_CLOSING != 0,
                }),
                repicked_from: None,
                full: None,
            };
        }
        repicked_from = Some(conn.backend_id);
    }
    let repicked_from_connection = repicked_from.is_some();
    let hash = flow_hash(flow, FLOW_HASH_SEED);
    if let Some(slot) = half_open_entry(maps, flow, hash) {
        if usable(maps, slot.backend_id, listener).is_some() {
            return Decision {
                backend: Ok(slot.backend_id),
                via: Some(Via::HalfOpen),
                repicked_from,
                full: None,
            };
        }
        repicked_from.get_or_insert(slot.backend_id);
    }
    // As a SYN or a UDP flow's first packet would be (a later packet of an unknown TCP flow,
    // or one whose connection-table entry is re-picked, is never limited).
    if !repicked_from_connection {
        if let Some(per_second) = rate_limited(maps, listener, now) {
            return Decision {
                backend: Err(NoBackend::RateLimited { per_second }),
                via: None,
                repicked_from,
                full: None,
            };
        }
    }
    // The same packets as the limit above: a SYN or a UDP flow's first packet.
    let new_flow = !repicked_from_connection;
    let (picked, mut via) = policy(maps, client, hash, listener, now, new_flow);
    let mut backend = match picked {
        Ok(id) if present(maps, id).is_none() => Err(NoBackend::NotPresent { id }),
        other => other,
    };
    let mut full = None;
    if let Ok(id) = backend {
        let checked = new_flow && listener.flags & LISTENER_F_MAX_CONNECTIONS != 0;
        if checked && at_capacity(maps, id) {
            full = Some(id);
            (backend, via) = match least_loaded(maps, listener, hash, true) {
                Scan::Picked(p) => (Ok(p.id), Some(p.via)),
                Scan::AllFull | Scan::Nobody => (Err(NoBackend::AtCapacity), None),
            };
        }
    }
    Decision {
        backend,
        via,
        repicked_from,
        full,
    }
}

/// Whether backend `id` has `max_connections` and as many open connections.
fn at_capacity<M: FlowMaps + ?Sized>(maps: &M, id: u32) -> bool {
    maps.backend(id)
        .is_some_and(|b| b.max_connections != 0 && maps.open_connections(id) >= b.max_connections)
}

/// A least-connections pick.
struct Picked {
    id: u32,
    via: Via,
}

/// What a scan of the listener's WLC set found.
enum Scan {
    Picked(Picked),
    /// Members could take the flow but every one is at its `max_connections`.
    AllFull,
    /// No member with weight that is usable.
    Nobody,
}

/// The member of the listener's WLC set with the fewest open connections per weight, as the
/// data plane scans it: from `hash % count` on, a tie drawn per flow (`wlc_tie_wins`); members
/// of weight 0 and
/// unusable ones skipped, and with `room` those at their `max_connections`.
fn least_loaded<M: FlowMaps + ?Sized>(
    maps: &M,
    listener: &ListenerEntry,
    hash: u32,
    room: bool,
) -> Scan {
    let Some(set) = maps.wlc_set(listener.ring_index) else {
        return Scan::Nobody;
    };
    let count = set.count.min(MAX_WLC_BACKENDS);
    if count == 0 {
        return Scan::Nobody;
    }
    let mut best: Option<(u32, u32, u32)> = None;
    let mut full = false;
    let mut ties = 0;
    for k in 0..count {
        let m = set.members[((hash % count + k) % count) as usize];
        if m.weight == 0 || usable(maps, m.id, listener).is_none() {
            continue;
        }
        if room && at_capacity(maps, m.id) {
            full = true;
            continue;
        }
        let open = maps.open_connections(m.id);
        let better = best.is_none_or(|(_, o, w)| slb_common::less_loaded(open, m.weight, o, w));
        let tied =
            !better && best.is_some_and(|(_, o, w)| !slb_common::less_loaded(o, w, open, m.weight));
        if better {
            ties = 1;
        } else if tied {
            ties += 1;
        }
        if better || tied && slb_common::wlc_tie_wins(hash, ties) {
            best = Some((m.id, open, m.weight));
        }
    }
    match best {
        Some((id, open, weight)) => Scan::Picked(Picked {
            id,
            via: Via::LeastConnections {
                open,
                weight,
                members: count,
            },
        }),
        None if full => Scan::AllFull,
        None => Scan::Nobody,
    }
}

/// The half-open table's entry for `flow` (hash `hash`), when its slot holds that flow and
/// its check.
fn half_open_entry<M: FlowMaps + ?Sized>(maps: &M, flow: &FlowKey, hash: u32) -> Option<HalfOpen> {
    maps.half_open(half_open_slot(hash))
        .filter(|s| s.flow == *flow && s.check == half_open_check(hash, s.backend_id))
}

/// Why the listener's access list drops the flow's packets, if it does
/// (`policy::acl_admits`): the client is refused, and the flow is not established (in the
/// connection or half-open table) or the listener cuts established flows.
fn acl_refusal<M: FlowMaps + ?Sized>(
    maps: &M,
    flow: &FlowKey,
    listener: &ListenerEntry,
) -> Option<NoBackend> {
    let mode = listener.flags & (LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_DENY);
    if mode == 0 {
        return None;
    }
    let listed = maps.acl_lists(acl_set(listener.index, listener.flags), &flow.src);
    if listed == (mode == LISTENER_F_ACL_ALLOW) {
        return None;
    }
    let cut = listener.flags & LISTENER_F_ACL_CUT_ESTABLISHED != 0;
    let hash = flow_hash(flow, FLOW_HASH_SEED);
    let established =
        maps.connection(flow).is_some() || half_open_entry(maps, flow, hash).is_some();
    (cut || !established).then_some(NoBackend::AclRefused {
        allow_list: mode == LISTENER_F_ACL_ALLOW,
        cut,
    })
}

/// The listener's limit per second when its bucket of new flows is empty at `now`
/// (`policy::new_flow_admitted`).
fn rate_limited<M: FlowMaps + ?Sized>(maps: &M, listener: &ListenerEntry, now: u64) -> Option<u64> {
    if listener.flags & LISTENER_F_NEW_FLOW_LIMIT == 0 {
        return None;
    }
    let limit = maps.new_flow_limit(listener.index)?;
    limit
        .admit(now)
        .is_none()
        .then(|| 1_000_000_000 / limit.interval_ns.max(1))
}

/// A new flow's backend by the listener's policy (`balancer::policy_backend`); `new_flow`: the
/// packet is a SYN (or a UDP flow's first), which a `wlc` listener balances by least
/// connections.
fn policy<M: FlowMaps + ?Sized>(
    maps: &M,
    client: &Addr,
    hash: u32,
    listener: &ListenerEntry,
    now: u64,
    new_flow: bool,
) -> (Result<u32, NoBackend>, Option<Via>) {
    if listener.flags & LISTENER_F_ACTIVE_STANDBY != 0 {
        let active_healthy = maps.health(listener.active_id) != HEALTH_DOWN;
        let id = if active_healthy {
            listener.active_id
        } else {
            listener.standby_id
        };
        let via = Via::ActiveStandby {
            active: listener.active_id,
            active_healthy,
        };
        return (Ok(id), Some(via));
    }
    if listener.flags & LISTENER_F_PERSIST != 0 {
        let key = PersistKey {
            client: *client,
            listener_index: listener.index,
        };
        for table in [PersistTable::Established, PersistTable::Pending] {
            if let Some((id, age_ns)) = persisted_in(maps, table, &key, listener, now) {
                let via = Via::Persistence {
                    table,
                    client: *client,
                    age_ns,
                };
                return (Ok(id), Some(via));
            }
        }
    }
    if new_flow && listener.flags & LISTENER_F_WLC != 0 {
        let room = listener.flags & LISTENER_F_MAX_CONNECTIONS != 0;
        match least_loaded(maps, listener, hash, room) {
            Scan::Picked(p) => return (Ok(p.id), Some(p.via)),
            Scan::AllFull => return (Err(NoBackend::AtCapacity), None),
            // No member takes flows: the ring, built from the same input, says why.
            Scan::Nobody => {}
        }
    }
    if listener.ring_size == 0 {
        return (Err(NoBackend::NoRing), None);
    }
    let slot = hash % listener.ring_size;
    let via = Some(Via::Ring {
        slot,
        size: listener.ring_size,
    });
    match maps.ring_slot(listener.ring_index, slot) {
        None => (Err(NoBackend::NoRing), via),
        Some(NO_BACKEND) => (
            Err(NoBackend::EmptySlot {
                slot,
                size: listener.ring_size,
            }),
            via,
        ),
        Some(id) => (Ok(id), via),
    }
}

/// The backend `table` persists the client to while the entry is fresh and the backend still
/// takes new flows, with the entry's age (`balancer::persisted_in`).
fn persisted_in<M: FlowMaps + ?Sized>(
    maps: &M,
    table: PersistTable,
    key: &PersistKey,
    listener: &ListenerEntry,
    now: u64,
) -> Option<(u32, u64)> {
    let entry = maps.persisted(table, key)?;
    let age = now.wrapping_sub(entry.last_seen_ns);
    if age > u64::from(listener.persist_timeout_s) * 1_000_000_000 {
        return None;
    }
    let backend = usable(maps, entry.backend_id, listener)?;
    if backend.flags & BACKEND_F_DRAINING != 0 {
        return None;
    }
    Some((entry.backend_id, age))
}

/// `maps` as they would be once backend `removed` left the listener: its entry no longer
/// present, and the listener's ring rebuilt without it (`ring`).
pub struct Without<'a, M: ?Sized> {
    pub maps: &'a M,
    pub removed: u32,
    pub ring: &'a [u32],
}

impl<M: FlowMaps + ?Sized> FlowMaps for Without<'_, M> {
    fn connection(&self, flow: &FlowKey) -> Option<Connection> {
        self.maps.connection(flow)
    }
    fn half_open(&self, slot: u32) -> Option<HalfOpen> {
        self.maps.half_open(slot)
    }
    fn persisted(&self, table: PersistTable, key: &PersistKey) -> Option<Persisted> {
        self.maps.persisted(table, key)
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        (id != self.removed)
            .then(|| self.maps.backend(id))
            .flatten()
    }
    fn health(&self, id: u32) -> u32 {
        self.maps.health(id)
    }
    fn ring_slot(&self, _ring_index: u32, slot: u32) -> Option<u32> {
        self.ring.get(slot as usize).copied()
    }
    fn acl_lists(&self, set: u32, client: &Addr) -> bool {
        self.maps.acl_lists(set, client)
    }
    fn new_flow_limit(&self, index: u32) -> Option<NewFlowLimit> {
        self.maps.new_flow_limit(index)
    }
    fn open_connections(&self, id: u32) -> u32 {
        self.maps.open_connections(id)
    }
    fn wlc_set(&self, ring_index: u32) -> Option<WlcSet> {
        self.maps.wlc_set(ring_index)
    }
}

// ---------------------------------------------------------------------------------------------
// The pinned maps of a running instance

/// The maps [`decide`] reads, opened from an instance's pins (read only: lookups from user
/// space do not refresh LRU entries nor change what the data plane does).
pub struct PinnedFlowMaps {
    connections: HashMap<MapData, FlowKey, Connection>,
    half_open: Array<MapData, HalfOpen>,
    persistence: HashMap<MapData, PersistKey, Persisted>,
    persist_pending: HashMap<MapData, PersistKey, Persisted>,
    backends: Array<MapData, Backend>,
    health: Array<MapData, u32>,
    listeners: HashMap<MapData, ListenerKey, ListenerEntry>,
    rings: ArrayOfMaps<MapData, MapData>,
    acl: aya::maps::lpm_trie::LpmTrie<MapData, AclPrefix, u32>,
    new_flow_limits: Array<MapData, NewFlowLimit>,
    backend_connections: crate::maps::BackendConnections,
    wlc_sets: Array<MapData, WlcSet>,
    /// Rings read so far, by their slot in RINGS.
    ring_cache: std::cell::RefCell<BTreeMap<u32, Option<std::rc::Rc<Vec<u32>>>>>,
}

impl PinnedFlowMaps {
    pub fn open(dir: &std::path::Path) -> Result<PinnedFlowMaps, OpenMapError> {
        Ok(PinnedFlowMaps {
            connections: open(dir, &pinned::CONNECTIONS)?,
            half_open: open(dir, &pinned::HALF_OPEN)?,
            persistence: open(dir, &pinned::PERSISTENCE)?,
            persist_pending: open(dir, &pinned::PERSIST_PENDING)?,
            backends: open(dir, &pinned::BACKENDS)?,
            health: open(dir, &pinned::BACKEND_HEALTH)?,
            listeners: open(dir, &pinned::LISTENERS)?,
            rings: open(dir, &pinned::RINGS)?,
            acl: open(dir, &pinned::ACL)?,
            new_flow_limits: open(dir, &pinned::NEW_FLOW_LIMITS)?,
            backend_connections: crate::maps::BackendConnections::open(dir)?,
            wlc_sets: open(dir, &pinned::WLC_SETS)?,
            ring_cache: Default::default(),
        })
    }

    pub fn listener(&self, key: &ListenerKey) -> Option<ListenerEntry> {
        self.listeners.get(key, 0).ok()
    }

    /// The whole ring at `ring_index` of RINGS, read once through its memory mapping.
    pub fn ring(&self, ring_index: u32) -> Option<std::rc::Rc<Vec<u32>>> {
        self.ring_cache
            .borrow_mut()
            .entry(ring_index)
            .or_insert_with(|| {
                let inner = self.rings.get(&ring_index, 0).ok()?;
                let mapped = crate::maps::MappedRing::map(inner).ok()?;
                let slots = (0..mapped.len())
                    .map(|i| {
                        mapped
                            .slot(i)
                            .map_or(NO_BACKEND, |s| s.load(std::sync::atomic::Ordering::Relaxed))
                    })
                    .collect();
                Some(std::rc::Rc::new(slots))
            })
            .clone()
    }
}

impl FlowMaps for PinnedFlowMaps {
    fn connection(&self, flow: &FlowKey) -> Option<Connection> {
        self.connections.get(flow, 0).ok()
    }
    fn half_open(&self, slot: u32) -> Option<HalfOpen> {
        self.half_open.get(&slot, 0).ok()
    }
    fn persisted(&self, table: PersistTable, key: &PersistKey) -> Option<Persisted> {
        match table {
            PersistTable::Established => self.persistence.get(key, 0).ok(),
            PersistTable::Pending => self.persist_pending.get(key, 0).ok(),
        }
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id, 0).ok()
    }
    fn health(&self, id: u32) -> u32 {
        self.health.get(&id, 0).unwrap_or(0)
    }
    fn ring_slot(&self, ring_index: u32, slot: u32) -> Option<u32> {
        self.ring(ring_index)?.get(slot as usize).copied()
    }
    fn acl_lists(&self, set: u32, client: &Addr) -> bool {
        let prefix = AclPrefix {
            set: set.to_be_bytes(),
            addr: *client,
        };
        let key = aya::maps::lpm_trie::Key::new(AclPrefix::FULL_BITS, prefix);
        self.acl.get(&key, 0).is_ok()
    }
    fn new_flow_limit(&self, index: u32) -> Option<NewFlowLimit> {
        self.new_flow_limits.get(&index, 0).ok()
    }
    fn open_connections(&self, id: u32) -> u32 {
        self.backend_connections.open_connections(id)
    }
    fn wlc_set(&self, ring_index: u32) -> Option<WlcSet> {
        self.wlc_sets.get(&ring_index, 0).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Explanations: the decision with names

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error(transparent)]
    Maps(#[from] OpenMapError),
    #[error("{0}")]
    Bpffs(String),
    #[error(
        "no listener {to} in instance {instance:?}; its listeners: {listeners}",
        listeners = if listeners.is_empty() { "none".to_string() } else { listeners.join(", ") }
    )]
    NoListener {
        to: ListenerAddr,
        instance: String,
        listeners: Vec<String>,
    },
    #[error(
        "{to} is {protocol} listener {name:?}, served by slb's proxy in the daemon, not by the XDP \
         program: it picks a backend per request (rules, weighted round robin or least \
         connections, cookies), which `slb explain` cannot tell; see `slb status` and the access log"
    )]
    Proxied {
        to: ListenerAddr,
        name: String,
        protocol: String,
    },
    #[error("listener {listener:?} is on {vip}; {client} is a client of the other address family")]
    Family {
        listener: String,
        vip: IpAddr,
        client: SocketAddr,
    },
    #[error(
        "listener {listener:?} is in the state file but not in the LISTENERS map of {dir}: is the \
         daemon applying a change? Try again"
    )]
    NotInMaps { listener: String, dir: PathBuf },
    #[error(
        "--without {backend}: listener {listener:?} has no such backend; its backends: {backends}"
    )]
    NoSuchBackend {
        backend: BackendName,
        listener: String,
        backends: String,
    },
    #[error(
        "--without {backend}: more than one backend of listener {listener:?} has that address \
         ({backends}); give its port"
    )]
    AmbiguousBackend {
        backend: BackendName,
        listener: String,
        backends: String,
    },
    #[error(
        "--without {backend}: listener {listener:?} is active/standby, whose group has exactly \
         two servers: slb refuses to remove one"
    )]
    ActiveStandbyRemoval {
        backend: BackendName,
        listener: String,
    },
    #[error("--without {backend}: listener {listener:?}: {source}")]
    Maglev {
        backend: BackendName,
        listener: String,
        source: slb_common::maglev::MaglevError,
    },
    #[error("reading map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

/// A backend as `slb explain` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedBackend {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    /// Its group in the applied state (`None` if the state does not know the id).
    pub group: Option<String>,
    pub weight: Option<u32>,
}

impl fmt::Display for NamedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.address, self.port))?;
        match (&self.group, self.weight) {
            (Some(g), Some(w)) => write!(f, " (group {g}, weight {w})"),
            _ => write!(f, " (id {}, not in the applied state)", self.id),
        }
    }
}

/// Why the flow goes where it goes, with names and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reason {
    Connection {
        /// Since the flow's last packet.
        last_packet_ms: u64,
        closing: bool,
        idle_timeout_s: u32,
    },
    HalfOpen,
    ActiveStandby {
        active: NamedBackend,
        active_healthy: bool,
    },
    Persistence {
        table: PersistTable,
        /// The client address (an IPv6 client's prefix) the entry is for.
        client: String,
        age_ms: u64,
        expires_in_ms: u64,
    },
    Ring {
        slot: u32,
        size: u32,
        /// Slots of the ring the backend holds.
        backend_slots: u32,
        table_share_pct: f64,
        /// Its share of the weights the ring was built from.
        weight_share_pct: Option<f64>,
    },
    LeastConnections {
        /// The backend's open connections and weight.
        open: u32,
        weight: u32,
        /// Members of the listener's set.
        members: u32,
    },
}

/// The answer for one flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The backend, `None` when the data plane drops the flow's packets.
    pub backend: Option<NamedBackend>,
    pub reason: Option<Reason>,
    /// When there is no backend: why.
    pub no_backend: Option<String>,
    /// The backend the connection or half-open table named, no longer usable: the flow is
    /// balanced again by the policy.
    pub repicked_from: Option<NamedBackend>,
    /// The backend the policy picked, at its `max_connections`, with its open connections
    /// and its limit: a new flow goes elsewhere.
    #[serde(default)]
    pub full: Option<(NamedBackend, u32, u32)>,
}

/// The answer for one flow, and what a removal would change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub instance: String,
    pub listener: String,
    pub from: SocketAddr,
    pub to: ListenerAddr,
    #[serde(flatten)]
    pub answer: Answer,
    /// With `--without`: where the flow would go once that backend were removed.
    pub without: Option<WithoutAnswer>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WithoutAnswer {
    pub removed: NamedBackend,
    #[serde(flatten)]
    pub answer: Answer,
    /// The flow would go to another backend than now.
    pub moves: bool,
}

/// A ring's figures: slots per backend id, and the ids and weights it was built from.
struct RingFacts {
    counts: BTreeMap<u32, u32>,
    input: Vec<(u32, u32)>,
}

/// The listener of an instance that `to` names, and what explains its flows.
struct Context<'a> {
    state: &'a AppliedState,
    applied: &'a AppliedListener,
    entry: ListenerEntry,
    /// The live ring's.
    ring: RingFacts,
}

/// Explains the flows from each of `clients` to `to` on `instance`, with `without` removed
/// when given.
pub fn explain(
    instance: &str,
    to: &ListenerAddr,
    clients: &[SocketAddr],
    without: Option<&BackendName>,
) -> Result<Vec<Explanation>, ExplainError> {
    crate::dataplane::ensure_bpffs().map_err(|e| ExplainError::Bpffs(e.to_string()))?;
    let state = AppliedState::read(instance)?;
    let applied = find_listener(&state, to)?;
    let dir = pin_dir(instance);
    let maps = PinnedFlowMaps::open(&dir)?;
    let key = ListenerKey {
        vip: data_plane_addr(to.vip),
        port: to.port,
        protocol: to.protocol.ip_protocol(),
        _pad: 0,
    };
    let entry = maps.listener(&key).ok_or_else(|| ExplainError::NotInMaps {
        listener: applied.name.clone(),
        dir: dir.clone(),
    })?;
    let ring_counts = if entry.flags & LISTENER_F_ACTIVE_STANDBY == 0 {
        maps.ring(entry.ring_index)
            .map(|ring| slot_counts(&ring))
            .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    let cx = Context {
        state: &state,
        applied,
        entry,
        ring: RingFacts {
            counts: ring_counts,
            input: applied.ring_input.clone(),
        },
    };
    let removal = without.map(|name| removal(&cx, &maps, name)).transpose()?;
    let now = crate::flows::monotonic_ns();
    clients
        .iter()
        .map(|&client| {
            let flow = flow_key(client, to).ok_or_else(|| ExplainError::Family {
                listener: applied.name.clone(),
                vip: to.vip,
                client,
            })?;
            let persist_client = persistence_client(&flow, &cx.entry, to.vip.is_ipv6());
            let decision = decide(&maps, &flow, &persist_client, &cx.entry, now);
            let answer = cx.answer(&maps, &decision, &cx.ring, to.vip.is_ipv6());
            let without = removal.as_ref().map(|r| {
                let view = Without {
                    maps: &maps,
                    removed: r.removed.id,
                    ring: &r.table,
                };
                let after = decide(&view, &flow, &persist_client, &cx.entry, now);
                let moves = after.backend != decision.backend;
                WithoutAnswer {
                    removed: r.removed.clone(),
                    answer: cx.answer(&view, &after, &r.ring, to.vip.is_ipv6()),
                    moves,
                }
            });
            Ok(Explanation {
                instance: state.instance.clone(),
                listener: applied.name.clone(),
                from: client,
                to: *to,
                answer,
                without,
            })
        })
        .collect()
}

/// The TCP/UDP listener `to` names, or an error naming the proxy's listener there, or the
/// instance's listeners.
fn find_listener<'a>(
    state: &'a AppliedState,
    to: &ListenerAddr,
) -> Result<&'a AppliedListener, ExplainError> {
    let same = |vip: IpAddr, port: u16| vip == to.vip && port == to.port;
    if let Some(l) = state
        .listeners
        .iter()
        .find(|l| same(l.vip, l.port) && l.protocol.ip_protocol() == to.protocol.ip_protocol())
    {
        return Ok(l);
    }
    if to.protocol == L4::Tcp {
        if let Some(p) = state.proxy_listeners.iter().find(|p| same(p.vip, p.port)) {
            return Err(ExplainError::Proxied {
                to: *to,
                name: p.name.clone(),
                protocol: format!("{:?}", p.protocol).to_uppercase(),
            });
        }
    }
    let mut listeners: Vec<String> = state
        .listeners
        .iter()
        .map(|l| {
            let protocol = if l.protocol.ip_protocol() == IPPROTO_UDP {
                L4::Udp
            } else {
                L4::Tcp
            };
            format!("{} {}/{protocol}", l.name, SocketAddr::new(l.vip, l.port))
        })
        .collect();
    listeners.extend(state.proxy_listeners.iter().map(|p| {
        format!(
            "{} {} ({}, the proxy's)",
            p.name,
            SocketAddr::new(p.vip, p.port),
            format!("{:?}", p.protocol).to_lowercase()
        )
    }));
    Err(ExplainError::NoListener {
        to: *to,
        instance: state.instance.clone(),
        listeners,
    })
}

/// Slots per backend id of `ring`.
pub fn slot_counts(ring: &[u32]) -> BTreeMap<u32, u32> {
    let mut counts = BTreeMap::new();
    for &id in ring {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// The backend `--without` names, the listener's table without it, and its slot counts.
struct Removal {
    removed: NamedBackend,
    /// The table without it.
    table: Vec<u32>,
    ring: RingFacts,
}

/// The [`Removal`] of the backend of the listener that `name` names.
fn removal(
    cx: &Context<'_>,
    maps: &PinnedFlowMaps,
    name: &BackendName,
) -> Result<Removal, ExplainError> {
    let listener = &cx.applied.name;
    let backends = cx.listener_backends();
    let list = || {
        backends
            .iter()
            .map(|b| b.key.endpoint().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let matching: Vec<&&AppliedBackend> = backends
        .iter()
        .filter(|b| b.key.address == name.address && name.port.is_none_or(|p| p == b.key.port))
        .collect();
    let removed = match matching.as_slice() {
        [one] => **one,
        [] => {
            return Err(ExplainError::NoSuchBackend {
                backend: *name,
                listener: listener.clone(),
                backends: list(),
            })
        }
        _ => {
            return Err(ExplainError::AmbiguousBackend {
                backend: *name,
                listener: listener.clone(),
                backends: list(),
            })
        }
    };
    if cx.applied.group_kind == GroupKind::ActiveStandby {
        return Err(ExplainError::ActiveStandbyRemoval {
            backend: *name,
            listener: listener.clone(),
        });
    }
    let input: Vec<(u32, u32)> = cx
        .applied
        .ring_input
        .iter()
        .copied()
        .filter(|(id, _)| *id != removed.id)
        .collect();
    let identities: Vec<String> = input
        .iter()
        .map(|(id, _)| {
            cx.state
                .backends
                .iter()
                .find(|b| b.id == *id)
                .map(|b| maglev_identity(&b.key))
                .unwrap_or_default()
        })
        .collect();
    let table = ring_table(&identities, &input, cx.entry.ring_size).map_err(|source| {
        ExplainError::Maglev {
            backend: *name,
            listener: listener.clone(),
            source,
        }
    })?;
    let counts = slot_counts(&table);
    Ok(Removal {
        removed: cx.name(maps, removed.id),
        table,
        ring: RingFacts { counts, input },
    })
}

impl Context<'_> {
    fn listener_backends(&self) -> Vec<&AppliedBackend> {
        self.state
            .backends
            .iter()
            .filter(|b| b.key.listener == self.applied.name)
            .collect()
    }

    fn name<M: FlowMaps + ?Sized>(&self, maps: &M, id: u32) -> NamedBackend {
        let applied = self
            .state
            .backends
            .iter()
            .find(|b| b.id == id && b.key.listener == self.applied.name)
            .or_else(|| self.state.backends.iter().find(|b| b.id == id));
        match applied {
            Some(b) => NamedBackend {
                id,
                address: b.key.address,
                port: b.key.port,
                group: Some(b.group.clone()),
                weight: Some(b.weight),
            },
            None => {
                let entry = maps.backend(id).unwrap_or_default();
                NamedBackend {
                    id,
                    address: addr_of_data_plane(entry.addr),
                    port: entry.port,
                    group: None,
                    weight: None,
                }
            }
        }
    }

    fn answer<M: FlowMaps + ?Sized>(
        &self,
        maps: &M,
        decision: &Decision,
        ring: &RingFacts,
        ipv6: bool,
    ) -> Answer {
        let repicked_from = decision.repicked_from.map(|id| self.name(maps, id));
        let full = decision.full.map(|id| {
            let max = maps.backend(id).map_or(0, |b| b.max_connections);
            (self.name(maps, id), maps.open_connections(id), max)
        });
        let id = match decision.backend {
            Ok(id) => id,
            Err(why) => {
                let no_backend = match why {
                    NoBackend::EmptySlot { slot, size } => format!(
                        "ring slot {slot} of {size} holds no backend (every backend of the \
                         listener has weight 0, or is down): its packets are dropped"
                    ),
                    NoBackend::NoRing => "the listener's ring cannot be read".to_string(),
                    NoBackend::NotPresent { id } => format!(
                        "the policy names backend id {id}, which is not present in BACKENDS: its \
                         packets are dropped"
                    ),
                    NoBackend::AclRefused { allow_list, cut } => format!(
                        "the listener's access list {}: its packets are dropped{}",
                        if allow_list {
                            "does not allow the client"
                        } else {
                            "denies the client"
                        },
                        if cut {
                            " (established flows too: established = \"cut\")"
                        } else {
                            ""
                        }
                    ),
                    NoBackend::RateLimited { per_second } => format!(
                        "a new flow now would be dropped: the listener's {per_second} new \
                         flows a second are taken"
                    ),
                    NoBackend::AtCapacity => "a new flow now would be dropped: every backend \
                         is at its max_connections"
                        .to_string(),
                };
                return Answer {
                    backend: None,
                    reason: None,
                    no_backend: Some(no_backend),
                    repicked_from,
                    full,
                };
            }
        };
        let reason = decision.via.map(|via| match via {
            Via::Connection { age_ns, closing } => Reason::Connection {
                last_packet_ms: age_ns / 1_000_000,
                closing,
                idle_timeout_s: self.applied.idle_timeout_s,
            },
            Via::HalfOpen => Reason::HalfOpen,
            Via::ActiveStandby {
                active,
                active_healthy,
            } => Reason::ActiveStandby {
                active: self.name(maps, active),
                active_healthy,
            },
            Via::Persistence {
                table,
                client,
                age_ns,
            } => {
                let timeout_ns = u64::from(self.entry.persist_timeout_s) * 1_000_000_000;
                let address = addr_of_data_plane(client);
                let prefix = self.entry.persist_ipv6_prefix;
                let client = if ipv6 && prefix > 0 && prefix < 128 {
                    format!("{address}/{prefix}")
                } else {
                    address.to_string()
                };
                Reason::Persistence {
                    table,
                    client,
                    age_ms: age_ns / 1_000_000,
                    expires_in_ms: timeout_ns.saturating_sub(age_ns) / 1_000_000,
                }
            }
            Via::Ring { slot, size } => {
                let held = ring.counts.get(&id).copied().unwrap_or(0);
                let total_weight: u64 = ring.input.iter().map(|(_, w)| u64::from(*w)).sum();
                let weight = ring
                    .input
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, w)| u64::from(*w));
                let weight_share_pct = weight
                    .filter(|_| total_weight > 0)
                    .map(|w| 100.0 * w as f64 / total_weight as f64);
                Reason::Ring {
                    slot,
                    size,
                    backend_slots: held,
                    table_share_pct: 100.0 * f64::from(held) / f64::from(size.max(1)),
                    weight_share_pct,
                }
            }
            Via::LeastConnections {
                open,
                weight,
                members,
            } => Reason::LeastConnections {
                open,
                weight,
                members,
            },
        });
        Answer {
            backend: Some(self.name(maps, id)),
            reason,
            no_backend: None,
            repicked_from,
            full,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Connection {
                last_packet_ms,
                closing,
                idle_timeout_s,
            } => {
                let state = if *closing {
                    "closing (FIN or RST seen)"
                } else {
                    "established"
                };
                write!(
                    f,
                    "connection table: {state}, last packet {} ago (idle timeout {idle_timeout_s} s)",
                    seconds(*last_packet_ms)
                )
            }
            Reason::HalfOpen => write!(
                f,
                "half-open: its first packet (a SYN, usually) was seen and sent here; it enters \
                 the connection table with its next non-SYN packet"
            ),
            Reason::ActiveStandby {
                active,
                active_healthy: true,
            } => write!(
                f,
                "active/standby: active healthy ({})",
                SocketAddr::new(active.address, active.port)
            ),
            Reason::ActiveStandby {
                active,
                active_healthy: false,
            } => write!(
                f,
                "active/standby: standby (active {} unhealthy)",
                SocketAddr::new(active.address, active.port)
            ),
            Reason::Persistence {
                table,
                client,
                age_ms,
                expires_in_ms,
            } => {
                let by = match table {
                    PersistTable::Established => "an established connection",
                    PersistTable::Pending => "a handshake under way",
                };
                write!(
                    f,
                    "persistence: client {client} persisted here by {by} {} ago (expires in {})",
                    seconds(*age_ms),
                    seconds(*expires_in_ms)
                )
            }
            Reason::Ring {
                slot,
                size,
                backend_slots,
                table_share_pct,
                weight_share_pct,
            } => {
                write!(
                    f,
                    "ring: slot {slot} of {size} → this backend, which holds {backend_slots} \
                     slots ({table_share_pct:.1} % of the table"
                )?;
                match weight_share_pct {
                    Some(w) => write!(f, "; weight share {w:.1} %)"),
                    None => write!(f, ")"),
                }
            }
            Reason::LeastConnections {
                open,
                weight,
                members,
            } => write!(
                f,
                "least connections: {open} open connection(s) for weight {weight}, the fewest \
                 per weight of the {members} backend(s) of the listener's set on this node"
            ),
        }
    }
}

fn render_answer(out: &mut String, answer: &Answer, indent: &str) {
    use std::fmt::Write as _;
    if let Some(old) = &answer.repicked_from {
        let _ = writeln!(
            out,
            "{indent}re-picked: its table entry named {}, which is removed or unhealthy",
            SocketAddr::new(old.address, old.port)
        );
    }
    if let Some((b, open, max)) = &answer.full {
        let _ = writeln!(
            out,
            "{indent}at capacity: the policy picked {}, which has {open} open connection(s) of \
             its max_connections {max}; a new flow goes to the least loaded backend with room",
            SocketAddr::new(b.address, b.port)
        );
    }
    match (&answer.backend, &answer.reason) {
        (Some(b), reason) => {
            let _ = writeln!(out, "{indent}backend:  {b}");
            if let Some(r) = reason {
                let _ = writeln!(out, "{indent}why:      {r}");
            }
        }
        (None, _) => {
            let why = answer.no_backend.as_deref().unwrap_or("no backend");
            let _ = writeln!(out, "{indent}backend:  none: {why}");
        }
    }
}

/// The human-readable answers, a block per flow.
pub fn render(explanations: &[Explanation]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (i, e) in explanations.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "flow {} → {} (listener {}, instance {})",
            e.from, e.to, e.listener, e.instance
        );
        render_answer(&mut out, &e.answer, "  ");
        if let Some(w) = &e.without {
            let removed = SocketAddr::new(w.removed.address, w.removed.port);
            let verdict = if w.moves {
                "the flow would move"
            } else {
                "the flow would stay"
            };
            let _ = writeln!(out, "  without {removed}: {verdict}");
            render_answer(&mut out, &w.answer, "    ");
        }
    }
    out
}

#[cfg(test)]
mod tests;
