//! Turns a validated config plus the health verdicts into map contents. Backend ids and listener
//! indices stay stable across reloads (a connection keeps pointing at the same id); Maglev rings
//! are written into the idle half of a listener's ring pair and then switched to with one map
//! update; removed backends are retired only after no ring references them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use aya::maps::MapError;
use slb_common::maglev::{build_table, MaglevBackend, MaglevError};
use slb_common::{
    endpoint_filter_bits, ipv4_mapped, Backend, BackendEndpoint, ListenerEntry, ListenerKey,
    ReplyNat, BACKEND_F_DRAINING, BACKEND_F_PRESENT, ENDPOINT_F_BACKEND, ENDPOINT_F_LISTENER,
    HEALTH_DOWN, HEALTH_UP, LISTENER_F_ACTIVE_STANDBY, LISTENER_F_IGNORE_HEALTH,
    LISTENER_F_PERSIST, MAX_BACKENDS, MAX_LISTENERS, NAT_ADDRESS_F_BACKEND, NAT_ADDRESS_F_VIP,
    NO_BACKEND, RINGS_PER_LISTENER,
};

use crate::applied::{
    AppliedBackend, AppliedListener, AppliedMaps, BackendKey, HealthStatus, Role,
};
use crate::config::{
    AllUnhealthy, Config, GroupKind, Listener, Protocol, ResolvedBackend, ResolvedListener,
};
use crate::maps::{clear_map_slot, set_ring_slots, MappedRing, PinnedMaps};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("writing map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("listener {listener}: {source}")]
    Maglev {
        listener: String,
        source: MaglevError,
    },
    #[error(
        "maglev_table_size cannot change while running ({running} → {requested}); restart slb"
    )]
    RingSizeChanged { running: u32, requested: u32 },
    #[error("out of {what}")]
    Exhausted { what: &'static str },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> ReconcileError {
    move |source| ReconcileError::Map { map, source }
}

pub struct Reconciler {
    maps: PinnedMaps,
    /// The rings this run created or adopted, by their slot in RINGS, mapped into our memory:
    /// only the writer maps them, readers such as `slb status` never need to.
    mapped_rings: BTreeMap<u32, MappedRing>,
    ring_size: u32,
    /// Names in logs which instance's maps these are.
    instance: String,
    applied: AppliedMaps,
    /// What each (listener index, ring) holds, so a rebuild writes only the slots that differ.
    rings: BTreeMap<(u32, u32), Vec<u32>>,
    /// What BACKEND_HEALTH holds per id.
    health_written: Written<u32, u32>,
    /// What BACKENDS, REPLY_NAT and NAT_ADDRESSES hold.
    backends_written: Written<u32, Backend>,
    replies_written: Written<ReplyEndpoint, ReplyNat>,
    addresses_written: Written<IpAddr, u32>,
    /// The words of ENDPOINT_FILTER this run wrote (after a restart, bits the previous run set
    /// for endpoints that are gone stay: false positives cost only the full lookups).
    filter_written: Written<u32, u32>,
}

fn ipv4_octets(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => unreachable!("IPv6 addresses are rejected by config validation"),
    }
}

fn listener_key(protocol: Protocol, vip: IpAddr, port: u16) -> ListenerKey {
    ListenerKey {
        vip: ipv4_mapped(ipv4_octets(vip)),
        port,
        protocol: protocol.ip_protocol(),
        _pad: 0,
    }
}

/// The ENDPOINT_FILTER words of the TCP/UDP listeners and their backends, by word index.
fn endpoint_filter(listeners: &[&Listener], plans: &[PlannedListener]) -> BTreeMap<u32, u32> {
    let mut filter = BTreeMap::new();
    for (l, plan) in listeners.iter().zip(plans) {
        let protocol = l.protocol.ip_protocol();
        let (word, mask) =
            endpoint_filter_bits(ipv4_octets(l.vip), l.port, protocol, ENDPOINT_F_LISTENER);
        *filter.entry(word).or_default() |= mask;
        for (key, _) in &plan.members {
            let (word, mask) = endpoint_filter_bits(
                ipv4_octets(key.address),
                key.port,
                protocol,
                ENDPOINT_F_BACKEND,
            );
            *filter.entry(word).or_default() |= mask;
        }
    }
    filter
}

/// What this run wrote into one map, entry by entry, so an apply writes only what changed: a
/// health verdict re-applies everything, and most of it is as it was. Empty after a restart,
/// so the first apply writes every entry once.
struct Written<K, V>(BTreeMap<K, V>);

impl<K: Ord, V: PartialEq> Written<K, V> {
    fn new() -> Self {
        Written(BTreeMap::new())
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.0.get(key)
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.keys()
    }

    /// Writes `value` at `key` with `write`, unless that is what the map holds already.
    fn put<E>(
        &mut self,
        key: K,
        value: V,
        write: impl FnOnce(&K, &V) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.0.get(&key) != Some(&value) {
            write(&key, &value)?;
            self.0.insert(key, value);
        }
        Ok(())
    }

    /// Notes that the entry at `key` was removed from the map.
    fn forget(&mut self, key: &K) {
        self.0.remove(key);
    }
}

/// A backend's (address, port, protocol): what its replies are recognised by.
type ReplyEndpoint = (IpAddr, u16, u8);

fn reply_key((address, port, protocol): ReplyEndpoint) -> BackendEndpoint {
    BackendEndpoint {
        addr: ipv4_mapped(ipv4_octets(address)),
        port,
        protocol,
        _pad: 0,
    }
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

/// The slot in RINGS of ring `ring` (0 or 1) of the listener with index `index`.
fn ring_slot(index: u32, ring: u32) -> u32 {
    index * RINGS_PER_LISTENER + ring
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

/// One listener's backends as the config and health make them.
struct PlannedListener {
    group: String,
    kind: GroupKind,
    members: Vec<(BackendKey, ResolvedBackend)>,
}

impl Reconciler {
    pub fn new(maps: PinnedMaps, instance: &str, ring_size: u32) -> Reconciler {
        Reconciler {
            mapped_rings: BTreeMap::new(),
            maps,
            ring_size,
            instance: instance.into(),
            applied: AppliedMaps::default(),
            rings: BTreeMap::new(),
            health_written: Written::new(),
            backends_written: Written::new(),
            replies_written: Written::new(),
            addresses_written: Written::new(),
            filter_written: Written::new(),
        }
    }

    /// Takes over what a previous run applied: ids, listener slots and live rings stay, so
    /// connections in the pinned tables keep their meaning. Ring contents are not known, so the
    /// first apply rewrites each changed listener's idle ring in full.
    pub fn adopt(&mut self, previous: AppliedMaps) {
        self.applied = previous;
    }

    /// What the maps hold now.
    pub fn state(&self) -> &AppliedMaps {
        &self.applied
    }

    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// The rings this run has mapped, by their slot in RINGS.
    pub fn mapped_rings(&self) -> &BTreeMap<u32, MappedRing> {
        &self.mapped_rings
    }

    /// Makes the maps match `config` and `health` (verdicts of checked backends; a backend
    /// without one is healthy).
    pub fn apply(
        &mut self,
        config: &Config,
        health: &BTreeMap<BackendKey, HealthStatus>,
    ) -> Result<&AppliedMaps, ReconcileError> {
        if config.maglev_table_size != self.ring_size {
            return Err(ReconcileError::RingSizeChanged {
                running: self.ring_size,
                requested: config.maglev_table_size,
            });
        }
        let healthy = |key: &BackendKey| health.get(key).is_none_or(|h| h.healthy);

        // HTTP(S) listeners are the proxy's: the XDP program lets their traffic through.
        let resolved: Vec<ResolvedListener<'_>> = config
            .resolved_listeners()
            .into_iter()
            .filter(|r| !r.listener.protocol.is_l7())
            .collect();
        let l4_listeners: Vec<&Listener> = resolved.iter().map(|r| r.listener).collect();
        let plans: Vec<PlannedListener> = resolved
            .iter()
            .map(|r| {
                let group = r.group();
                let members = group
                    .backends
                    .iter()
                    .map(|b| (BackendKey::of(r.listener, b), *b))
                    .collect();
                PlannedListener {
                    group: group.name.into(),
                    kind: group.kind,
                    members,
                }
            })
            .collect();

        // Backend ids: keep the id of every backend that stays.
        let old_ids: BTreeMap<BackendKey, u32> = self
            .applied
            .backends
            .iter()
            .map(|b| (b.key.clone(), b.id))
            .collect();
        let wanted: BTreeSet<&BackendKey> = plans
            .iter()
            .flat_map(|p| p.members.iter().map(|(k, _)| k))
            .collect();
        let mut free_ids = FreeIds::new(
            wanted
                .iter()
                .filter_map(|k| old_ids.get(*k).copied())
                .collect(),
            MAX_BACKENDS,
        );
        let mut ids: BTreeMap<BackendKey, u32> = BTreeMap::new();
        for key in wanted {
            let id = match old_ids.get(key) {
                Some(&id) => id,
                None => free_ids.take().ok_or(ReconcileError::Exhausted {
                    what: "backend ids",
                })?,
            };
            ids.insert(key.clone(), id);
        }

        // 1. Health flags going down on active/standby servers first: that one write is the
        //    failover. Flags going up are written before any ring names the backend again.
        let mut deferred_down = Vec::new();
        for plan in &plans {
            for (key, _) in &plan.members {
                let id = ids[key];
                if healthy(key) {
                    self.write_health(id, HEALTH_UP)?;
                } else if plan.kind == GroupKind::ActiveStandby {
                    self.write_health(id, HEALTH_DOWN)?;
                } else {
                    deferred_down.push(id);
                }
            }
        }

        // 2. Backends, so every id a ring will name is valid.
        for plan in &plans {
            for (key, spec) in &plan.members {
                let mut flags = BACKEND_F_PRESENT;
                if spec.weight == 0 && plan.kind == GroupKind::Vserver {
                    flags |= BACKEND_F_DRAINING;
                }
                let backend = Backend {
                    addr: ipv4_mapped(ipv4_octets(key.address)),
                    port: key.port,
                    flags,
                    _pad: 0,
                };
                self.write_backend(ids[key], backend)?;
            }
        }

        // 3. Addresses first (a reply fragment from a new backend is then never passed
        //    untranslated), then rings, reply translations and listener entries.
        let old_addresses = nat_addresses(
            self.applied.listeners.iter().map(|l| l.vip),
            self.applied.backends.iter().map(|b| b.key.address),
        );
        let addresses = nat_addresses(
            l4_listeners.iter().map(|l| l.vip),
            plans
                .iter()
                .flat_map(|p| p.members.iter().map(|(k, _)| k.address)),
        );
        // The endpoint filter gains the new endpoints' bits before any map names them, and
        // loses the bits of endpoints that are gone only at the end.
        let filter = endpoint_filter(&l4_listeners, &plans);
        self.write_filter(&filter, true)?;
        for (&address, &flags) in &addresses {
            self.addresses_written
                .put(address, flags, |address, flags| {
                    self.maps
                        .nat_addresses
                        .insert(u32::from_ne_bytes(ipv4_octets(*address)), *flags, 0)
                        .map_err(map_err("NAT_ADDRESSES"))
                })?;
        }
        let old_reply_endpoints = reply_endpoints(&self.applied);
        let old_listeners: BTreeMap<String, AppliedListener> = self
            .applied
            .listeners
            .drain(..)
            .map(|l| (l.name.clone(), l))
            .collect();
        let mut free_indices = FreeIds::new(
            l4_listeners
                .iter()
                .filter_map(|l| old_listeners.get(&l.name).map(|o| o.index))
                .collect(),
            MAX_LISTENERS,
        );
        let indices = l4_listeners
            .iter()
            .map(|l| match old_listeners.get(&l.name) {
                Some(o) => Ok(o.index),
                None => free_indices.take().ok_or(ReconcileError::Exhausted {
                    what: "listener slots",
                }),
            })
            .collect::<Result<Vec<u32>, ReconcileError>>()?;
        let ring_slots: Vec<u32> = indices
            .iter()
            .zip(&plans)
            .filter(|(_, p)| p.kind == GroupKind::Vserver)
            .flat_map(|(&index, _)| (0..RINGS_PER_LISTENER).map(move |r| ring_slot(index, r)))
            .collect();
        self.ensure_rings(&ring_slots)?;
        let mut applied = Vec::new();
        let mut applied_backends = Vec::new();
        for ((l, plan), &index) in l4_listeners.iter().zip(&plans).zip(&indices) {
            let old = old_listeners.get(&l.name);
            let mut entry = ListenerEntry {
                index,
                ring_size: self.ring_size,
                ..Default::default()
            };
            let mut ring = old.map_or(0, |o| o.ring);
            let mut ring_input = Vec::new();
            match plan.kind {
                GroupKind::ActiveStandby => {
                    entry.flags |= LISTENER_F_ACTIVE_STANDBY;
                    entry.active_id = ids[&plan.members[0].0];
                    entry.standby_id = ids[&plan.members[1].0];
                }
                GroupKind::Vserver => {
                    let healthy_weight: u64 = plan
                        .members
                        .iter()
                        .filter(|(k, _)| healthy(k))
                        .map(|(_, s)| u64::from(s.weight))
                        .sum();
                    let all_down =
                        healthy_weight == 0 && plan.members.iter().any(|(_, s)| s.weight > 0);
                    let ignore_health = all_down && l.on_all_unhealthy == AllUnhealthy::ForwardAll;
                    if ignore_health {
                        entry.flags |= LISTENER_F_IGNORE_HEALTH;
                    }
                    ring_input = plan
                        .members
                        .iter()
                        .map(|(k, s)| {
                            (
                                ids[k],
                                if healthy(k) || ignore_health {
                                    s.weight
                                } else {
                                    0
                                },
                            )
                        })
                        .collect();
                    let unchanged = old.is_some_and(|o| {
                        o.ring_input == ring_input && o.group_kind == GroupKind::Vserver
                    });
                    if !unchanged {
                        ring = old.map_or(0, |o| (o.ring + 1) % RINGS_PER_LISTENER);
                        self.write_ring(&l.name, index, ring, &plan.members, &ring_input)?;
                    }
                }
            }
            entry.ring_index = ring_slot(index, ring);
            if let Some(p) = &l.persistence {
                entry.flags |= LISTENER_F_PERSIST;
                entry.persist_timeout_s = p.timeout.as_secs() as u32;
            }
            // Before the listener entry: a backend answers only once a packet reached it.
            for (key, _) in &plan.members {
                let nat = ReplyNat {
                    vip: ipv4_mapped(ipv4_octets(l.vip)),
                    vip_port: l.port,
                    _pad: 0,
                    listener_index: index,
                    backend_id: ids[key],
                };
                let endpoint = (key.address, key.port, l.protocol.ip_protocol());
                self.replies_written.put(endpoint, nat, |endpoint, nat| {
                    self.maps
                        .reply_nat
                        .insert(reply_key(*endpoint), *nat, 0)
                        .map_err(map_err("REPLY_NAT"))
                })?;
            }
            let key = listener_key(l.protocol, l.vip, l.port);
            self.maps
                .listeners
                .insert(key, entry, 0)
                .map_err(map_err("LISTENERS"))?;
            if let Some(o) = old {
                let old_key = listener_key(o.protocol, o.vip, o.port);
                if old_key != key {
                    let _ = self.maps.listeners.remove(&old_key);
                }
            }
            for (i, (key, spec)) in plan.members.iter().enumerate() {
                let role = (plan.kind == GroupKind::ActiveStandby).then_some(if i == 0 {
                    Role::Active
                } else {
                    Role::Standby
                });
                applied_backends.push(AppliedBackend {
                    id: ids[key],
                    key: key.clone(),
                    group: plan.group.clone(),
                    weight: spec.weight,
                    role,
                    health: health.get(key).cloned(),
                });
            }
            applied.push(AppliedListener {
                name: l.name.clone(),
                protocol: l.protocol,
                vip: l.vip,
                port: l.port,
                group: plan.group.clone(),
                group_kind: plan.kind,
                index,
                ring,
                ring_input,
                flags: entry.flags,
                persistence_timeout_s: l.persistence.map(|p| p.timeout.as_secs() as u32),
                idle_timeout_s: l.idle_timeout_s(),
                health_check: l.health_check.is_some(),
            });
        }

        // 4. Health flags going down on Maglev groups: their rings no longer name them, so
        //    only their pinned flows move (re-balanced by the data plane).
        for id in deferred_down {
            self.write_health(id, HEALTH_DOWN)?;
        }

        // 5. Listeners that are gone.
        for (name, o) in &old_listeners {
            if !applied.iter().any(|a| &a.name == name) {
                let key = listener_key(o.protocol, o.vip, o.port);
                if !applied
                    .iter()
                    .any(|a| listener_key(a.protocol, a.vip, a.port) == key)
                {
                    let _ = self.maps.listeners.remove(&key);
                }
                for r in 0..RINGS_PER_LISTENER {
                    self.rings.remove(&(o.index, r));
                    // Its ring memory goes with it (unless the index was reused just now).
                    if !applied.iter().any(|a| a.index == o.index) {
                        let slot = ring_slot(o.index, r);
                        self.mapped_rings.remove(&slot);
                        clear_map_slot(&self.maps.rings_map, slot).map_err(|e| {
                            ReconcileError::Map {
                                map: "RINGS",
                                source: MapError::SyscallError(aya::sys::SyscallError {
                                    call: "bpf_map_delete_elem",
                                    io_error: e,
                                }),
                            }
                        })?;
                    }
                }
            }
        }
        // 6. Backends that are gone: no ring names them any more. Flows still pinned to them
        //    are re-balanced by the data plane on their next packet.
        for (key, &id) in &old_ids {
            if !ids.contains_key(key) {
                self.write_backend(id, Backend::default())?;
                self.write_health(id, HEALTH_UP)?;
            }
        }

        self.applied.listeners = applied;
        self.applied.backends = applied_backends;
        self.write_filter(&filter, false)?;
        // 7. Reply translations of endpoints no backend has any more.
        let current = reply_endpoints(&self.applied);
        for endpoint in old_reply_endpoints.difference(&current) {
            let _ = self.maps.reply_nat.remove(&reply_key(*endpoint));
            self.replies_written.forget(endpoint);
        }
        for address in old_addresses.keys() {
            if !addresses.contains_key(address) {
                let _ = self
                    .maps
                    .nat_addresses
                    .remove(&u32::from_ne_bytes(ipv4_octets(*address)));
                self.addresses_written.forget(address);
            }
        }
        Ok(&self.applied)
    }

    /// Writes `filter` into ENDPOINT_FILTER: with `widen`, only adding bits (slots keep what
    /// they had too); without, exactly `filter`.
    fn write_filter(
        &mut self,
        filter: &BTreeMap<u32, u32>,
        widen: bool,
    ) -> Result<(), ReconcileError> {
        let slots: BTreeSet<u32> = filter
            .keys()
            .chain(self.filter_written.keys())
            .copied()
            .collect();
        for slot in slots {
            let written = self.filter_written.get(&slot).copied().unwrap_or(0);
            let wanted = filter.get(&slot).copied().unwrap_or(0);
            let value = if widen { written | wanted } else { wanted };
            self.filter_written.put(slot, value, |slot, value| {
                self.maps
                    .endpoint_filter
                    .set(*slot, *value, 0)
                    .map_err(map_err("ENDPOINT_FILTER"))
            })?;
        }
        Ok(())
    }

    fn write_health(&mut self, id: u32, value: u32) -> Result<(), ReconcileError> {
        // BACKEND_HEALTH is an array: unwritten ids read as HEALTH_UP (0).
        self.health_written.put(id, value, |id, value| {
            self.maps
                .backend_health
                .set(*id, *value, 0)
                .map_err(map_err("BACKEND_HEALTH"))
        })
    }

    fn write_backend(&mut self, id: u32, backend: Backend) -> Result<(), ReconcileError> {
        self.backends_written.put(id, backend, |id, backend| {
            self.maps
                .backends
                .set(*id, *backend, 0)
                .map_err(map_err("BACKENDS"))
        })
    }

    /// Maps the rings at `slots` of RINGS: adopted from an earlier run, or created now and put
    /// in place with one batch update.
    fn ensure_rings(&mut self, slots: &[u32]) -> Result<(), ReconcileError> {
        let mut created = Vec::new();
        for &slot in slots {
            if self.mapped_rings.contains_key(&slot) {
                continue;
            }
            let ring = match self.maps.rings.get(&slot, 0) {
                Ok(existing) => {
                    let found = existing.info().map_err(map_err("RINGS"))?.max_entries();
                    if found != self.ring_size {
                        return Err(ReconcileError::RingSizeChanged {
                            running: found,
                            requested: self.ring_size,
                        });
                    }
                    MappedRing::map(existing).map_err(map_err("RINGS"))?
                }
                Err(MapError::KeyNotFound) => {
                    created.push(slot);
                    MappedRing::create(self.ring_size).map_err(map_err("RINGS"))?
                }
                Err(e) => return Err(map_err("RINGS")(e)),
            };
            self.mapped_rings.insert(slot, ring);
        }
        let new: Vec<(u32, &MappedRing)> = created
            .iter()
            .map(|slot| (*slot, &self.mapped_rings[slot]))
            .collect();
        set_ring_slots(&self.maps.rings_map, &new).map_err(|io_error| ReconcileError::Map {
            map: "RINGS",
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }),
        })
    }

    /// The mapped ring at `slot` of RINGS.
    fn ring(&mut self, slot: u32) -> Result<&MappedRing, ReconcileError> {
        self.ensure_rings(&[slot])?;
        Ok(&self.mapped_rings[&slot])
    }

    fn write_ring(
        &mut self,
        listener: &str,
        index: u32,
        ring: u32,
        members: &[(BackendKey, ResolvedBackend)],
        ring_input: &[(u32, u32)],
    ) -> Result<(), ReconcileError> {
        // Maglev identity: the same address and port get the same permutation on every node.
        let identities: Vec<String> = members
            .iter()
            .map(|(k, _)| k.endpoint().to_string())
            .collect();
        let maglev: Vec<MaglevBackend<'_>> = identities
            .iter()
            .zip(ring_input)
            .map(|(identity, (_, weight))| MaglevBackend {
                identity: identity.as_bytes(),
                weight: *weight,
            })
            .collect();
        let table =
            build_table(&maglev, self.ring_size).map_err(|source| ReconcileError::Maglev {
                listener: listener.into(),
                source,
            })?;
        let table: Vec<u32> = table
            .into_iter()
            .map(|owner| {
                if owner == NO_BACKEND {
                    NO_BACKEND
                } else {
                    ring_input[owner as usize].0
                }
            })
            .collect();
        let previous = self.rings.get(&(index, ring)).cloned();
        let mapped = self.ring(ring_slot(index, ring))?;
        let mut written = 0usize;
        for (slot, &id) in table.iter().enumerate() {
            if previous.as_ref().is_some_and(|p| p[slot] == id) {
                continue;
            }
            let Some(cell) = mapped.slot(slot) else {
                return Err(ReconcileError::RingSizeChanged {
                    running: mapped.len() as u32,
                    requested: self.ring_size,
                });
            };
            cell.store(id, Ordering::Relaxed);
            written += 1;
        }
        // The ring must be complete before the listener flips to it (a map update syscall,
        // which the kernel orders after this).
        std::sync::atomic::fence(Ordering::SeqCst);
        tracing::debug!(instance = %self.instance, listener, ring, written, "ring written");
        self.rings.insert((index, ring), table);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ids_are_the_lowest_unused_in_order() {
        let mut free = FreeIds::new(BTreeSet::from([0, 1, 3, 6]), 8);
        let taken: Vec<u32> = std::iter::from_fn(|| free.take()).collect();
        assert_eq!(taken, vec![2, 4, 5, 7]);
    }
}
