//! What an apply will write, worked out from the config, the health verdicts and what the maps
//! hold now, without touching a map: backend ids and listener slots (kept for what stays), the
//! map entries, which ring each listener switches to and what it is built from, and what is
//! gone. [`super::Reconciler::apply`] writes the plan in an order the data plane never sees
//! half of.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use slb_common::{
    acl_set, addr_words, endpoint_filter_bits, ipv4_mapped, ipv6_filter_fold, AclPrefix, Addr,
    Backend, ListenerEntry, ListenerKey, NewFlowLimit, ReplyNat, SnatPool, WlcMember, WlcSet,
    BACKEND_F_DRAINING, BACKEND_F_PRESENT, ENDPOINT_F_BACKEND, ENDPOINT_F_LISTENER,
    LISTENER_F_ACL_ALLOW, LISTENER_F_ACL_CUT_ESTABLISHED, LISTENER_F_ACL_DENY, LISTENER_F_ACL_SET,
    LISTENER_F_ACTIVE_STANDBY, LISTENER_F_DSR, LISTENER_F_FULLNAT, LISTENER_F_IGNORE_HEALTH,
    LISTENER_F_MAX_CONNECTIONS, LISTENER_F_NEW_FLOW_LIMIT, LISTENER_F_PERSIST, LISTENER_F_TUNNEL,
    LISTENER_F_WLC, MAX_BACKENDS, MAX_LISTENERS, MAX_SNAT_ADDRESSES, MAX_WLC_BACKENDS,
    NAT_ADDRESS_F_BACKEND, NAT_ADDRESS_F_VIP, RINGS_PER_LISTENER,
};

use super::ReconcileError;
use crate::applied::{
    AppliedAcl, AppliedBackend, AppliedListener, AppliedMaps, AppliedNewFlowLimit, AppliedSnat,
    BackendKey, HealthStatus, Role,
};
use crate::config::{
    AclEstablished, AclMode, AllUnhealthy, Config, DsrMode, Forwarding, GroupKind, Listener,
    Protocol, ResolvedBackend, ResolvedListener, Scheduler,
};

/// A backend's (address, port, protocol): what its replies are recognised by.
pub(super) type ReplyEndpoint = (IpAddr, u16, u8);

/// When a backend's health flag goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HealthWrite {
    Up,
    /// First of all: for an active/standby pair this one write is the failover.
    DownFirst,
    /// After the rings: a Maglev ring no longer names the backend by then, so only the flows
    /// pinned to it move.
    DownLast,
}

/// One TCP/UDP listener as the apply writes it.
#[derive(Debug)]
pub(super) struct PlannedListener {
    pub name: String,
    pub key: ListenerKey,
    /// The key it had before, when that was another one (its VIP, port or protocol changed).
    pub old_key: Option<ListenerKey>,
    pub index: u32,
    /// Backend ids with the weights the ring is built from (Maglev groups only).
    pub ring_input: Vec<(u32, u32)>,
    /// With `rebuild`: the Maglev identity of each backend of `ring_input` (`address:port`, so
    /// every node builds the same ring).
    pub ring_identities: Vec<String>,
    /// Which of the listener's two rings to write and switch to; `None` when the live ring
    /// already holds `ring_input`.
    pub rebuild: Option<u32>,
    /// Maglev groups: the WLC_SETS entry at the live ring's slot (`entry.ring_index`), the
    /// ring's input, written before the entry so a least-connections pick or a move off a full
    /// backend never scans another ring's members.
    pub wlc_set: Option<WlcSet>,
    /// Reply translations of its backends, written before the entry.
    pub replies: Vec<(ReplyEndpoint, ReplyNat)>,
    /// A full NAT listener's SNAT addresses and ports, written before the entry.
    pub snat_pool: Option<SnatPool>,
    /// Its access list's new set (emptied, then filled before the entry is switched to it),
    /// when the list changed.
    pub acl_write: Option<AclWrite>,
    /// Sets of the listener's index in ACL to empty after the entry is written: the set it
    /// switched away from, or both once it has no list.
    pub acl_clear_after: Vec<u32>,
    /// Its limit on new flows, written before the entry when it changed (an unchanged one keeps
    /// the data plane's bucket as it is).
    pub new_flow_limit: Option<NewFlowLimit>,
    pub entry: ListenerEntry,
}

/// A listener's access list to write into one set of ACL.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AclWrite {
    pub set: u32,
    pub keys: Vec<AclKey>,
}

/// An ACL map key: the prefix length in bits, then the data.
pub(super) type AclKey = (u32, AclPrefix);

/// A listener of the previous apply that is gone.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct GoneListener {
    pub index: u32,
    /// Its key, unless a listener of this apply has the same one.
    pub remove_key: Option<ListenerKey>,
    /// Its rings' slots in RINGS, unless a listener of this apply took over its index.
    pub free_ring_slots: Vec<u32>,
    /// Its sets in ACL, to empty unless a listener of this apply took over its index.
    pub clear_acl_sets: Vec<u32>,
}

#[derive(Debug)]
pub(super) struct Plan {
    /// Health flags by backend id, in the order they are written.
    pub health: Vec<(u32, HealthWrite)>,
    /// BACKENDS entries by id.
    pub backends: Vec<(u32, Backend)>,
    /// ENDPOINT_FILTER words by index.
    pub filter: BTreeMap<u32, u32>,
    /// NAT_ADDRESSES: VIPs and backend addresses with their flags.
    pub addresses: BTreeMap<IpAddr, u32>,
    /// The slots in RINGS of every ring of a Maglev listener: they must exist.
    pub ring_slots: Vec<u32>,
    pub listeners: Vec<PlannedListener>,
    pub gone_listeners: Vec<GoneListener>,
    /// Ids of backends that are gone: their entries are cleared.
    pub gone_backend_ids: Vec<u32>,
    pub gone_replies: Vec<ReplyEndpoint>,
    pub gone_addresses: Vec<IpAddr>,
    /// What the maps hold once the plan is written.
    pub applied: AppliedMaps,
}

/// An address as the data plane's keys and values hold it: IPv6 as is, IPv4 mapped
/// (`::ffff:a.b.c.d`, which validation refuses as an IPv6 address, so the two never meet).
pub fn data_plane_addr(addr: IpAddr) -> Addr {
    match addr {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// [`data_plane_addr`]'s inverse.
pub fn addr_of_data_plane(addr: Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The ENDPOINT_FILTER word and mask of an endpoint, as the data plane computes them for its
/// address family.
fn filter_bits(addr: IpAddr, port: u16, protocol: u8, flags: u32) -> (u32, u32) {
    let folded = match addr {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => ipv6_filter_fold(addr_words(&v6.octets())),
    };
    endpoint_filter_bits(folded, port, protocol, flags)
}

pub(super) fn listener_key(protocol: Protocol, vip: IpAddr, port: u16) -> ListenerKey {
    ListenerKey {
        vip: data_plane_addr(vip),
        port,
        protocol: protocol.ip_protocol(),
        _pad: 0,
    }
}

/// The slot in RINGS of ring `ring` (0 or 1) of the listener with index `index`.
pub(super) fn ring_slot(index: u32, ring: u32) -> u32 {
    index * RINGS_PER_LISTENER + ring
}

/// Hands out the lowest ids below `limit` not in `used`, in increasing order: one pass over the
/// id space per apply, however many ids it hands out (5000 new backends used to cost a scan
/// from 0 each).
struct FreeIds {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl FreeIds {
    fn new(used: BTreeSet<u32>, limit: u32) -> FreeIds {
        FreeIds {
            used,
            next: 0,
            limit,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.next < self.limit && self.used.contains(&self.next) {
            self.next += 1;
        }
        if self.next >= self.limit {
            return None;
        }
        let id = self.next;
        self.used.insert(id);
        self.next += 1;
        Some(id)
    }
}

/// One TCP/UDP listener's group and backends as the config makes them.
struct Members<'a> {
    listener: &'a Listener,
    group: String,
    kind: GroupKind,
    members: Vec<(BackendKey, ResolvedBackend)>,
}

impl<'a> Members<'a> {
    fn of(r: ResolvedListener<'a>) -> Members<'a> {
        let group = r.group();
        Members {
            listener: r.listener,
            group: group.name.into(),
            kind: group.kind,
            members: group
                .backends
                .iter()
                .map(|b| (BackendKey::of(r.listener, b), *b))
                .collect(),
        }
    }
}

/// What `config` and `health` (verdicts of checked backends; a backend without one is
/// healthy) make of the maps, which hold `previous` now.
pub(super) fn plan(
    config: &Config,
    health: &BTreeMap<BackendKey, HealthStatus>,
    previous: &AppliedMaps,
    ring_size: u32,
    live_acl_sets: &LiveAclSets,
) -> Result<Plan, ReconcileError> {
    if config.maglev_table_size != ring_size {
        return Err(ReconcileError::RingSizeChanged {
            running: ring_size,
            requested: config.maglev_table_size,
        });
    }
    let healthy = |key: &BackendKey| health.get(key).is_none_or(|h| h.healthy);
    // HTTP(S) listeners are the proxy's: the XDP program lets their traffic through.
    let groups: Vec<Members<'_>> = config
        .resolved_listeners()
        .into_iter()
        .filter(|r| !r.listener.protocol.is_l7())
        .map(Members::of)
        .collect();
    let ids = backend_ids(&groups, previous)?;
    let old_listeners: BTreeMap<&str, &AppliedListener> = previous
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l))
        .collect();
    let indices = listener_indices(&groups, &old_listeners)?;
    refuse_snat_changes(&groups, &old_listeners)?;

    let entries = backend_entries(&groups, &ids, &healthy);
    let mut listeners = Vec::new();
    let mut applied = AppliedMaps::default();
    for (g, &index) in groups.iter().zip(&indices) {
        let old = old_listeners.get(g.listener.name.as_str()).copied();
        let (planned, listener) = plan_listener(
            g,
            index,
            old,
            &ids,
            health,
            live_acl_sets.get(&index).copied(),
            ring_size,
        );
        applied.backends.extend(applied_backends(g, &ids, health));
        applied.listeners.push(listener);
        listeners.push(planned);
    }
    let ring_slots = groups
        .iter()
        .zip(&indices)
        .filter(|(g, _)| g.kind == GroupKind::Vserver)
        .flat_map(|(_, &index)| (0..RINGS_PER_LISTENER).map(move |r| ring_slot(index, r)))
        .collect();
    let addresses = nat_addresses(
        groups.iter().map(|g| g.listener.vip),
        groups
            .iter()
            .flat_map(|g| g.members.iter().map(|(k, _)| k.address)),
    );
    let gone = gone(previous, &applied, &ids, &addresses, live_acl_sets);
    Ok(Plan {
        health: entries.health,
        backends: entries.backends,
        filter: endpoint_filter(&groups),
        addresses,
        ring_slots,
        listeners,
        gone_listeners: gone.listeners,
        gone_backend_ids: gone.backend_ids,
        gone_replies: gone.replies,
        gone_addresses: gone.addresses,
        applied,
    })
}

/// A running full NAT listener keeps its SNAT addresses and ports: its flows find their
/// mappings by the attempts those make, so a change would cut every established connection.
fn refuse_snat_changes(
    groups: &[Members<'_>],
    old_listeners: &BTreeMap<&str, &AppliedListener>,
) -> Result<(), ReconcileError> {
    for g in groups {
        let l = g.listener;
        let Some(old) = old_listeners
            .get(l.name.as_str())
            .and_then(|o| o.snat.as_ref())
        else {
            continue;
        };
        if l.forwarding != Forwarding::Fullnat {
            continue;
        }
        let ports = l.snat_ports();
        if old.addresses != l.snat_addresses
            || (old.first_port, old.last_port) != (ports.first, ports.last)
        {
            return Err(ReconcileError::SnatPoolChanged {
                listener: l.name.clone(),
            });
        }
    }
    Ok(())
}

/// Health flags and BACKENDS entries by backend id, in the order they are written.
struct BackendEntries {
    health: Vec<(u32, HealthWrite)>,
    backends: Vec<(u32, Backend)>,
}

fn backend_entries(
    groups: &[Members<'_>],
    ids: &BTreeMap<BackendKey, u32>,
    healthy: &dyn Fn(&BackendKey) -> bool,
) -> BackendEntries {
    let mut health = Vec::new();
    let mut deferred_down = Vec::new();
    let mut backends = Vec::new();
    for g in groups {
        for (key, b) in &g.members {
            let id = ids[key];
            match health_write(g.kind, healthy(key)) {
                HealthWrite::DownLast => deferred_down.push((id, HealthWrite::DownLast)),
                write => health.push((id, write)),
            }
            let mut flags = BACKEND_F_PRESENT;
            if b.weight == 0 && g.kind == GroupKind::Vserver {
                flags |= BACKEND_F_DRAINING;
            }
            let backend = Backend {
                addr: data_plane_addr(key.address),
                port: key.port,
                flags,
                _pad: 0,
                tunnel_source: tunnel_source(g.listener),
                max_connections: b.max_connections.unwrap_or(0),
            };
            backends.push((id, backend));
        }
    }
    health.extend(deferred_down);
    BackendEntries { health, backends }
}

/// The outer source of a tunnelling listener's packets, as its backends' entries hold it (zero
/// for any other listener).
fn tunnel_source(l: &Listener) -> Addr {
    match (l.dsr_mode(), l.tunnel_source) {
        (Some(DsrMode::Ipip), Some(source)) => data_plane_addr(source),
        _ => Addr::default(),
    }
}

/// When a backend's health flag is written, by its group's kind and its verdict.
fn health_write(kind: GroupKind, healthy: bool) -> HealthWrite {
    match (healthy, kind) {
        (true, _) => HealthWrite::Up,
        (false, GroupKind::ActiveStandby) => HealthWrite::DownFirst,
        (false, GroupKind::Vserver) => HealthWrite::DownLast,
    }
}

/// What one health verdict changes in the maps.
#[derive(Debug)]
pub(super) enum VerdictPlan {
    /// The backend is not a TCP/UDP listener's (the proxy balances HTTP(S)): nothing.
    NotInMaps,
    /// The maps do not hold the listener or one of its backends (an earlier apply failed):
    /// only a whole plan can say what to write.
    PlanEverything,
    /// The backend's flag, and its listener's entry and ring.
    Write(Box<VerdictWrite>),
}

/// A verdict's writes: the backend's flag, and its listener's entry and ring (rebuilt only when
/// the ring input changed: a Maglev group's weights; an active/standby pair's failover is the
/// flag alone).
#[derive(Debug)]
pub(super) struct VerdictWrite {
    pub id: u32,
    pub health: HealthWrite,
    pub listener: PlannedListener,
    pub applied_listener: AppliedListener,
}

/// What a verdict on `key` (already in `health`) changes, worked out from that one listener
/// and what the maps hold (`previous`), without planning the others.
pub(super) fn plan_verdict(
    config: &Config,
    health: &BTreeMap<BackendKey, HealthStatus>,
    previous: &AppliedMaps,
    ring_size: u32,
    live_acl_sets: &LiveAclSets,
    key: &BackendKey,
) -> VerdictPlan {
    let Some(l) = config
        .listeners
        .iter()
        .find(|l| l.name == key.listener && !l.protocol.is_l7())
    else {
        return VerdictPlan::NotInMaps;
    };
    let g = Members::of(config.resolve(l));
    let ids: BTreeMap<BackendKey, u32> = previous
        .backends
        .iter()
        .filter(|b| b.key.listener == l.name)
        .map(|b| (b.key.clone(), b.id))
        .collect();
    let old = previous.listeners.iter().find(|o| o.name == l.name);
    let (Some(old), Some(&id)) = (old, ids.get(key)) else {
        return VerdictPlan::PlanEverything;
    };
    if g.members.iter().any(|(k, _)| !ids.contains_key(k)) {
        return VerdictPlan::PlanEverything;
    }
    let healthy = |k: &BackendKey| health.get(k).is_none_or(|h| h.healthy);
    let (listener, applied_listener) = plan_listener(
        &g,
        old.index,
        Some(old),
        &ids,
        health,
        live_acl_sets.get(&old.index).copied(),
        ring_size,
    );
    VerdictPlan::Write(Box::new(VerdictWrite {
        id,
        health: health_write(g.kind, healthy(key)),
        listener,
        applied_listener,
    }))
}

/// Backend ids: every backend that stays keeps its id; new ones get the lowest free ids. The
/// ids of backends that are gone are not free yet: the apply clears their entries after it
/// wrote the new ones.
fn backend_ids(
    groups: &[Members<'_>],
    previous: &AppliedMaps,
) -> Result<BTreeMap<BackendKey, u32>, ReconcileError> {
    let old_ids: BTreeMap<&BackendKey, u32> =
        previous.backends.iter().map(|b| (&b.key, b.id)).collect();
    let wanted: BTreeSet<&BackendKey> = groups
        .iter()
        .flat_map(|g| g.members.iter().map(|(k, _)| k))
        .collect();
    let mut free_ids = FreeIds::new(old_ids.values().copied().collect(), MAX_BACKENDS);
    let mut ids = BTreeMap::new();
    for key in wanted {
        let id = match old_ids.get(key) {
            Some(&id) => id,
            None => free_ids.take().ok_or(ReconcileError::Exhausted {
                what: "backend ids",
            })?,
        };
        ids.insert(key.clone(), id);
    }
    Ok(ids)
}

/// Listener slots: every listener that stays keeps its slot; new ones get the lowest free.
fn listener_indices(
    groups: &[Members<'_>],
    old_listeners: &BTreeMap<&str, &AppliedListener>,
) -> Result<Vec<u32>, ReconcileError> {
    let mut free_indices = FreeIds::new(
        groups
            .iter()
            .filter_map(|g| old_listeners.get(g.listener.name.as_str()).map(|o| o.index))
            .collect(),
        MAX_LISTENERS,
    );
    groups
        .iter()
        .map(|g| match old_listeners.get(g.listener.name.as_str()) {
            Some(o) => Ok(o.index),
            None => free_indices.take().ok_or(ReconcileError::Exhausted {
                what: "listener slots",
            }),
        })
        .collect()
}

/// One listener's entry, ring and reply translations, and what the state records of it.
fn plan_listener(
    g: &Members<'_>,
    index: u32,
    old: Option<&AppliedListener>,
    ids: &BTreeMap<BackendKey, u32>,
    health: &BTreeMap<BackendKey, HealthStatus>,
    live_acl_set: Option<u32>,
    ring_size: u32,
) -> (PlannedListener, AppliedListener) {
    let healthy = |k: &BackendKey| health.get(k).is_none_or(|h| h.healthy);
    let l = g.listener;
    let mut entry = ListenerEntry {
        index,
        ring_size,
        ..Default::default()
    };
    let ring = match g.kind {
        GroupKind::ActiveStandby => {
            entry.flags |= LISTENER_F_ACTIVE_STANDBY;
            entry.active_id = ids[&g.members[0].0];
            entry.standby_id = ids[&g.members[1].0];
            PlannedRing {
                ring: old.map_or(0, |o| o.ring),
                ..PlannedRing::default()
            }
        }
        GroupKind::Vserver => {
            let (ring, ignore_health) = plan_ring(g, old, ids, &healthy, health);
            if ignore_health {
                entry.flags |= LISTENER_F_IGNORE_HEALTH;
            }
            ring
        }
    };
    entry.ring_index = ring_slot(index, ring.ring);
    if l.scheduler() == Scheduler::Wlc {
        entry.flags |= LISTENER_F_WLC;
    }
    if g.members.iter().any(|(_, b)| b.max_connections.is_some()) {
        entry.flags |= LISTENER_F_MAX_CONNECTIONS;
    }
    let wlc_set = (g.kind == GroupKind::Vserver).then(|| wlc_set(&ring.input));
    if let Some(p) = &l.persistence {
        entry.flags |= LISTENER_F_PERSIST;
        entry.persist_timeout_s = p.timeout.as_secs() as u32;
        entry.persist_ipv6_prefix = u32::from(l.persist_ipv6_prefix());
    }
    match l.dsr_mode() {
        Some(DsrMode::L2) => entry.flags |= LISTENER_F_DSR,
        Some(DsrMode::Ipip) => entry.flags |= LISTENER_F_DSR | LISTENER_F_TUNNEL,
        None => {}
    }
    let snat_pool = (l.forwarding == Forwarding::Fullnat).then(|| {
        entry.flags |= LISTENER_F_FULLNAT;
        snat_pool(l)
    });
    let acl = plan_acl(l, index, old, live_acl_set);
    entry.flags |= acl.flags;
    let new_flow_limit = plan_new_flow_limit(l, old);
    if new_flow_limit.applied.is_some() {
        entry.flags |= LISTENER_F_NEW_FLOW_LIMIT;
    }
    let replies = reply_translations(g, index, ids);
    let key = listener_key(l.protocol, l.vip, l.port);
    let old_key = old
        .map(|o| listener_key(o.protocol, o.vip, o.port))
        .filter(|old_key| *old_key != key);
    let applied = AppliedListener {
        name: l.name.clone(),
        protocol: l.protocol,
        vip: l.vip,
        port: l.port,
        group: g.group.clone(),
        group_kind: g.kind,
        index,
        ring: ring.ring,
        ring_input: ring.input.clone(),
        flags: entry.flags,
        persistence_timeout_s: l.persistence.map(|p| p.timeout.as_secs() as u32),
        idle_timeout_s: l.idle_timeout_s(),
        health_check: l.health_check.is_some(),
        snat: (l.forwarding == Forwarding::Fullnat).then(|| AppliedSnat {
            addresses: l.snat_addresses.clone(),
            first_port: l.snat_ports().first,
            last_port: l.snat_ports().last,
        }),
        acl: acl.applied,
        new_flow_limit: new_flow_limit.applied,
    };
    let planned = PlannedListener {
        name: l.name.clone(),
        key,
        old_key,
        index,
        ring_input: ring.input,
        ring_identities: ring.identities,
        rebuild: ring.rebuild,
        wlc_set,
        replies,
        snat_pool,
        acl_write: acl.write,
        acl_clear_after: acl.clear_after,
        new_flow_limit: new_flow_limit.write,
        entry,
    };
    (planned, applied)
}

/// The two sets of ACL a listener index owns.
pub(super) fn acl_sets(index: u32) -> [u32; 2] {
    [acl_set(index, 0), acl_set(index, LISTENER_F_ACL_SET)]
}

/// What a listener's access list makes of its entry's flags and of ACL.
#[derive(Debug, Default)]
struct PlannedAcl {
    flags: u32,
    write: Option<AclWrite>,
    clear_after: Vec<u32>,
    applied: Option<AppliedAcl>,
}

/// The set of ACL each listener index's entry in LISTENERS uses now (read from the map before
/// each plan: what the data plane reads, whatever an earlier apply that failed or a crashed run
/// left in the state).
pub(super) type LiveAclSets = BTreeMap<u32, u32>;

/// A listener's access list: the set the data plane reads (`live_set`) stays while it holds
/// the list the state records and the prefixes are unchanged (a change of mode or of what it
/// does to established flows is the entry's flags alone); otherwise the list goes whole into
/// the other set, which the entry then switches to. The set the listener leaves is emptied
/// after the switch; one of a listener that is gone, by the gone listener's removal.
fn plan_acl(
    l: &Listener,
    index: u32,
    old: Option<&AppliedListener>,
    live_set: Option<u32>,
) -> PlannedAcl {
    let recorded = old.and_then(|o| o.acl.as_ref());
    // Sets this listener's own entry left behind (another listener's, whose index this one
    // takes, go with that listener).
    let own_live = live_set.filter(|_| old.is_some());
    let Some(acl) = &l.acl else {
        return PlannedAcl {
            clear_after: if recorded.is_some() || own_live.is_some() {
                acl_sets(index).to_vec()
            } else {
                Vec::new()
            },
            ..PlannedAcl::default()
        };
    };
    let digest = acl_digest(&acl.cidrs);
    let holds_it = recorded.is_some_and(|a| a.digest == digest && Some(a.set) == live_set);
    let (set, write, clear_after) = if holds_it {
        (live_set.unwrap_or(0), None, Vec::new())
    } else {
        let set = live_set.map_or(0, |live| 1 - live);
        let flags = if set == 1 { LISTENER_F_ACL_SET } else { 0 };
        // Parsed only to be written (a verdict's plan of the listener keeps the list): validated,
        // every entry is a prefix of the VIP's family.
        let keys = acl
            .prefixes(l.vip)
            .unwrap_or_default()
            .iter()
            .map(|p| acl_key(acl_set(index, flags), p))
            .collect();
        let clear_after = own_live
            .map(|live| vec![acl_sets(index)[live as usize]])
            .unwrap_or_default();
        let write = AclWrite {
            set: acl_set(index, flags),
            keys,
        };
        (set, Some(write), clear_after)
    };
    let mut flags = match acl.mode {
        AclMode::Allow => LISTENER_F_ACL_ALLOW,
        AclMode::Deny => LISTENER_F_ACL_DENY,
    };
    if set == 1 {
        flags |= LISTENER_F_ACL_SET;
    }
    if acl.established == AclEstablished::Cut {
        flags |= LISTENER_F_ACL_CUT_ESTABLISHED;
    }
    PlannedAcl {
        flags,
        write,
        clear_after,
        applied: Some(AppliedAcl {
            mode: acl.mode,
            established: acl.established,
            set,
            prefixes: acl.cidrs.len(),
            digest,
        }),
    }
}

/// The ACL key of `prefix` in `set`.
pub(super) fn acl_key(set: u32, prefix: &ipnet::IpNet) -> AclKey {
    let bits = AclPrefix::key_bits(prefix.addr().is_ipv4(), u32::from(prefix.prefix_len()));
    (
        bits,
        AclPrefix {
            set: set.to_be_bytes(),
            addr: data_plane_addr(prefix.addr()),
        },
    )
}

/// A digest of a list as the config writes it, fixed across runs (the state file keeps it):
/// the same list written otherwise is rewritten once, which costs an apply, not a packet.
fn acl_digest(cidrs: &[String]) -> u64 {
    slb_common::hash::hash_bytes64(0, cidrs.join("\n").as_bytes())
}

struct PlannedNewFlowLimit {
    write: Option<NewFlowLimit>,
    applied: Option<AppliedNewFlowLimit>,
}

/// A listener's limit on new flows; written only when it changed, so the data plane's bucket
/// is not refilled by every apply.
fn plan_new_flow_limit(l: &Listener, old: Option<&AppliedListener>) -> PlannedNewFlowLimit {
    let applied = l
        .max_new_connections_per_second
        .map(|per_second| AppliedNewFlowLimit {
            per_second,
            burst: l.new_connections_burst.unwrap_or(per_second),
        });
    let unchanged = old.is_some_and(|o| o.new_flow_limit == applied);
    PlannedNewFlowLimit {
        write: applied.filter(|_| !unchanged).map(new_flow_limit),
        applied,
    }
}

/// The data plane's form of a limit of `per_second` new flows with bursts of `burst`.
pub(super) fn new_flow_limit(limit: AppliedNewFlowLimit) -> NewFlowLimit {
    let interval_ns = 1_000_000_000 / u64::from(limit.per_second.max(1));
    NewFlowLimit {
        interval_ns,
        burst_ns: interval_ns * u64::from(limit.burst.max(1) - 1),
        next_ns: 0,
    }
}

/// A full NAT listener's SNAT addresses and ports as the data plane reads them.
fn snat_pool(l: &Listener) -> SnatPool {
    let mut pool = SnatPool::default();
    for (slot, addr) in pool.addrs.iter_mut().zip(&l.snat_addresses) {
        *slot = data_plane_addr(*addr);
    }
    let ports = l.snat_ports();
    pool.count = l.snat_addresses.len().min(MAX_SNAT_ADDRESSES) as u32;
    pool.first_port = ports.first;
    // A range of all 65535 ports does not fit the u16 count: one fewer is as good.
    pool.port_count = ports.count().min(u32::from(u16::MAX)) as u16;
    pool
}

/// Which of a listener's rings is live after the apply, and what it is built from.
#[derive(Default)]
struct PlannedRing {
    ring: u32,
    rebuild: Option<u32>,
    input: Vec<(u32, u32)>,
    identities: Vec<String>,
}

/// The identity a backend has in its listener's Maglev table: its `address:port`, so that every
/// node builds the same table whatever its ids.
pub fn maglev_identity(key: &BackendKey) -> String {
    key.endpoint().to_string()
}

/// A Maglev listener's ring: the one it has when the input is as it was, else the other one,
/// rebuilt; and whether health is ignored (see [`maglev_input`]).
fn plan_ring(
    g: &Members<'_>,
    old: Option<&AppliedListener>,
    ids: &BTreeMap<BackendKey, u32>,
    healthy: &dyn Fn(&BackendKey) -> bool,
    health: &BTreeMap<BackendKey, HealthStatus>,
) -> (PlannedRing, bool) {
    let (input, ignore_health) = maglev_input(g, ids, healthy, health);
    let unchanged =
        old.is_some_and(|o| o.ring_input == input && o.group_kind == GroupKind::Vserver);
    let ring = if unchanged {
        PlannedRing {
            ring: old.map_or(0, |o| o.ring),
            rebuild: None,
            input,
            identities: Vec::new(),
        }
    } else {
        let ring = old.map_or(0, |o| (o.ring + 1) % RINGS_PER_LISTENER);
        PlannedRing {
            ring,
            rebuild: Some(ring),
            input,
            identities: g.members.iter().map(|(k, _)| maglev_identity(k)).collect(),
        }
    };
    (ring, ignore_health)
}

/// A Maglev listener's ring input (backend ids with the weights its health leaves them), and
/// whether health is ignored because every backend with weight is down and the listener
/// forwards to all then. While a backend of the listener is in slow start, every weight is
/// given in hundredths: the others' at 100 %, the starting one's at its percentage.
fn maglev_input(
    g: &Members<'_>,
    ids: &BTreeMap<BackendKey, u32>,
    healthy: &dyn Fn(&BackendKey) -> bool,
    health: &BTreeMap<BackendKey, HealthStatus>,
) -> (Vec<(u32, u32)>, bool) {
    let ramp = |k: &BackendKey| health.get(k).and_then(|h| h.slow_start_percent);
    let ramping = g
        .members
        .iter()
        .any(|(k, _)| healthy(k) && ramp(k).is_some());
    let healthy_weight: u64 = g
        .members
        .iter()
        .filter(|(k, _)| healthy(k))
        .map(|(_, b)| u64::from(b.weight))
        .sum();
    let all_down = healthy_weight == 0 && g.members.iter().any(|(_, b)| b.weight > 0);
    let ignore_health = all_down && g.listener.on_all_unhealthy == AllUnhealthy::ForwardAll;
    let input = g
        .members
        .iter()
        .map(|(k, b)| {
            let weight = if healthy(k) || ignore_health {
                b.weight
            } else {
                0
            };
            let weight = if ramping {
                weight * ramp(k).unwrap_or(100).clamp(1, 100)
            } else {
                weight
            };
            (ids[k], weight)
        })
        .collect();
    (input, ignore_health)
}

/// A Maglev listener's least-connections set: its ring's input, ids and weights as the ring was
/// built with them. A group larger than the data plane scans gets an empty set: validation
/// gives such a group neither `wlc` nor `max_connections`, so nothing reads it.
pub(super) fn wlc_set(ring_input: &[(u32, u32)]) -> WlcSet {
    let mut set = WlcSet::default();
    if ring_input.len() > MAX_WLC_BACKENDS as usize {
        return set;
    }
    for (member, &(id, weight)) in set.members.iter_mut().zip(ring_input) {
        *member = WlcMember { id, weight };
    }
    set.count = ring_input.len() as u32;
    set
}

/// How replies from each of a listener's backends are translated back to its VIP.
fn reply_translations(
    g: &Members<'_>,
    index: u32,
    ids: &BTreeMap<BackendKey, u32>,
) -> Vec<(ReplyEndpoint, ReplyNat)> {
    let l = g.listener;
    // Direct return: backends answer from the VIP, past slb; full NAT: replies are found by
    // their flow's mapping. Nothing to translate by endpoint.
    if l.forwarding != Forwarding::Nat {
        return Vec::new();
    }
    g.members
        .iter()
        .map(|(key, _)| {
            let nat = ReplyNat {
                vip: data_plane_addr(l.vip),
                vip_port: l.port,
                _pad: 0,
                listener_index: index,
                backend_id: ids[key],
            };
            ((key.address, key.port, l.protocol.ip_protocol()), nat)
        })
        .collect()
}

/// What the state records of one listener's backends.
fn applied_backends<'a>(
    g: &'a Members<'_>,
    ids: &'a BTreeMap<BackendKey, u32>,
    health: &'a BTreeMap<BackendKey, HealthStatus>,
) -> impl Iterator<Item = AppliedBackend> + 'a {
    g.members.iter().enumerate().map(move |(i, (key, b))| {
        let role = (g.kind == GroupKind::ActiveStandby).then_some(if i == 0 {
            Role::Active
        } else {
            Role::Standby
        });
        AppliedBackend {
            id: ids[key],
            key: key.clone(),
            group: g.group.clone(),
            weight: b.weight,
            max_connections: b.max_connections,
            role,
            health: health.get(key).cloned(),
        }
    })
}

/// The ENDPOINT_FILTER words of the TCP/UDP listeners and their backends, by word index.
fn endpoint_filter(groups: &[Members<'_>]) -> BTreeMap<u32, u32> {
    let mut filter = BTreeMap::new();
    for g in groups {
        let l = g.listener;
        let protocol = l.protocol.ip_protocol();
        let (word, mask) = filter_bits(l.vip, l.port, protocol, ENDPOINT_F_LISTENER);
        *filter.entry(word).or_default() |= mask;
        for (key, _) in &g.members {
            let (word, mask) = filter_bits(key.address, key.port, protocol, ENDPOINT_F_BACKEND);
            *filter.entry(word).or_default() |= mask;
        }
    }
    filter
}

/// VIP and backend addresses of TCP/UDP listeners with their `NAT_ADDRESS_F_*` flags: how the
/// data plane tells whether a fragment without ports is ours.
fn nat_addresses(
    vips: impl Iterator<Item = IpAddr>,
    backends: impl Iterator<Item = IpAddr>,
) -> BTreeMap<IpAddr, u32> {
    let mut flags = BTreeMap::new();
    for vip in vips {
        *flags.entry(vip).or_default() |= NAT_ADDRESS_F_VIP;
    }
    for backend in backends {
        *flags.entry(backend).or_default() |= NAT_ADDRESS_F_BACKEND;
    }
    flags
}

/// The reply endpoints of the applied backends.
fn reply_endpoints(state: &AppliedMaps) -> BTreeSet<ReplyEndpoint> {
    let protocols: BTreeMap<&str, u8> = state
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.protocol.ip_protocol()))
        .collect();
    state
        .backends
        .iter()
        .filter_map(|b| {
            let protocol = protocols.get(b.key.listener.as_str())?;
            Some((b.key.address, b.key.port, *protocol))
        })
        .collect()
}

struct Gone {
    listeners: Vec<GoneListener>,
    backend_ids: Vec<u32>,
    replies: Vec<ReplyEndpoint>,
    addresses: Vec<IpAddr>,
}

/// What `previous` has that `applied` no longer does.
fn gone(
    previous: &AppliedMaps,
    applied: &AppliedMaps,
    ids: &BTreeMap<BackendKey, u32>,
    addresses: &BTreeMap<IpAddr, u32>,
    live_acl_sets: &LiveAclSets,
) -> Gone {
    let listeners = previous
        .listeners
        .iter()
        .filter(|o| !applied.listeners.iter().any(|a| a.name == o.name))
        .map(|o| {
            let key = listener_key(o.protocol, o.vip, o.port);
            let key_taken = applied
                .listeners
                .iter()
                .any(|a| listener_key(a.protocol, a.vip, a.port) == key);
            let index_taken = applied.listeners.iter().any(|a| a.index == o.index);
            GoneListener {
                index: o.index,
                remove_key: (!key_taken).then_some(key),
                free_ring_slots: if index_taken {
                    Vec::new()
                } else {
                    (0..RINGS_PER_LISTENER)
                        .map(|r| ring_slot(o.index, r))
                        .collect()
                },
                clear_acl_sets: if o.acl.is_none() && !live_acl_sets.contains_key(&o.index) {
                    Vec::new()
                } else {
                    let taker_set = applied
                        .listeners
                        .iter()
                        .find(|a| a.index == o.index)
                        .and_then(|a| a.acl.as_ref())
                        .map(|a| acl_sets(o.index)[a.set as usize]);
                    acl_sets(o.index)
                        .into_iter()
                        .filter(|set| Some(*set) != taker_set)
                        .collect()
                },
            }
        })
        .collect();
    let old_ids: BTreeMap<&BackendKey, u32> =
        previous.backends.iter().map(|b| (&b.key, b.id)).collect();
    let backend_ids = old_ids
        .iter()
        .filter(|(key, _)| !ids.contains_key(**key))
        .map(|(_, &id)| id)
        .collect();
    let current = reply_endpoints(applied);
    let replies = reply_endpoints(previous)
        .difference(&current)
        .copied()
        .collect();
    let old_addresses = nat_addresses(
        previous.listeners.iter().map(|l| l.vip),
        previous.backends.iter().map(|b| b.key.address),
    );
    let addresses = old_addresses
        .into_keys()
        .filter(|address| !addresses.contains_key(address))
        .collect();
    Gone {
        listeners,
        backend_ids,
        replies,
        addresses,
    }
}

#[cfg(test)]
mod tests;
