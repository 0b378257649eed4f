//! Turns a validated config plus the health verdicts into map contents. Backend ids and listener
//! indices stay stable across reloads (a connection keeps pointing at the same id); Maglev rings
//! are written into the idle half of a listener's ring pair and then switched to with one map
//! update; removed backends are retired only after no ring references them.

mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use aya::maps::lpm_trie::Key;
use aya::maps::MapError;
use slb_common::maglev::{build_table, MaglevBackend, MaglevError};
use slb_common::{
    Backend, BackendEndpoint, ReplyNat, WlcSet, HEALTH_DOWN, HEALTH_UP, LISTENER_F_ACL_ALLOW,
    LISTENER_F_ACL_DENY, LISTENER_F_ACL_SET, NO_BACKEND, RINGS_PER_LISTENER,
};

use crate::applied::{AppliedMaps, BackendKey, HealthStatus};
use crate::config::Config;
use crate::maps::{clear_map_slot, set_ring_slots, MappedRing, PinnedMaps};
pub use plan::{addr_of_data_plane, data_plane_addr, maglev_identity};
use plan::{
    ring_slot, HealthWrite, Plan, PlannedListener, ReplyEndpoint, VerdictPlan, VerdictWrite,
};

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
    #[error(
        "listener {listener}: snat_addresses and snat_ports cannot change while it runs (its established connections find their SNAT mappings by them); give the new ones to a new listener, or remove this one first"
    )]
    SnatPoolChanged { listener: String },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> ReconcileError {
    move |source| ReconcileError::Map { map, source }
}

/// A listener's ring as the data plane reads it: for each of `size` slots the backend id that
/// owns it (or `NO_BACKEND`), from the Maglev identity of each backend of `ring_input` (see
/// [`maglev_identity`]) and the ids and weights of `ring_input`. The one builder of rings: the
/// reconciler writes what it returns, `slb explain --without` asks it what a change would write.
pub fn ring_table<S: AsRef<str>>(
    identities: &[S],
    ring_input: &[(u32, u32)],
    size: u32,
) -> Result<Vec<u32>, MaglevError> {
    let maglev: Vec<MaglevBackend<'_>> = identities
        .iter()
        .zip(ring_input)
        .map(|(identity, (_, weight))| MaglevBackend {
            identity: identity.as_ref().as_bytes(),
            weight: *weight,
        })
        .collect();
    let table = build_table(&maglev, size)?;
    Ok(table
        .into_iter()
        .map(|owner| {
            if owner == NO_BACKEND {
                NO_BACKEND
            } else {
                ring_input[owner as usize].0
            }
        })
        .collect())
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
    /// What WLC_SETS holds per ring slot. Empty after a restart, so the first apply writes the
    /// set of every live ring, whether the map was adopted or created.
    wlc_sets_written: Written<u32, WlcSet>,
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

/// The key REPLY_NAT holds a backend endpoint's translation under.
fn reply_key((address, port, protocol): ReplyEndpoint) -> BackendEndpoint {
    BackendEndpoint {
        addr: data_plane_addr(address),
        port,
        protocol,
        _pad: 0,
    }
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
            wlc_sets_written: Written::new(),
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
        let live_acl_sets = self.live_acl_sets()?;
        let plan = plan::plan(
            config,
            health,
            &self.applied,
            self.ring_size,
            &live_acl_sets,
        )?;

        // 1. Health flags going down on active/standby servers first: that one write is the
        //    failover. Flags going up are written before any ring names the backend again.
        for &(id, write) in &plan.health {
            match write {
                HealthWrite::Up => self.write_health(id, HEALTH_UP)?,
                HealthWrite::DownFirst => self.write_health(id, HEALTH_DOWN)?,
                HealthWrite::DownLast => {}
            }
        }
        // 2. Backends, so every id a ring will name is valid.
        for &(id, backend) in &plan.backends {
            self.write_backend(id, backend)?;
        }
        // 3. Addresses first (a reply fragment from a new backend is then never passed
        //    untranslated), then rings, reply translations and listener entries. The endpoint
        //    filter gains the new endpoints' bits before any map names them, and loses the bits
        //    of endpoints that are gone only at the end.
        self.write_filter(&plan.filter, true)?;
        for (&address, &flags) in &plan.addresses {
            self.addresses_written
                .put(address, flags, |address, flags| {
                    self.maps
                        .insert_nat_address(*address, *flags)
                        .map_err(map_err("NAT_ADDRESSES"))
                })?;
        }
        self.ensure_rings(&plan.ring_slots)?;
        for listener in &plan.listeners {
            self.write_listener(listener)?;
        }
        // 4. Health flags going down on Maglev groups: their rings no longer name them, so
        //    only their pinned flows move (re-balanced by the data plane).
        for &(id, write) in &plan.health {
            if write == HealthWrite::DownLast {
                self.write_health(id, HEALTH_DOWN)?;
            }
        }
        self.remove_gone(&plan)?;
        self.applied = plan.applied;
        Ok(&self.applied)
    }

    /// Applies a health verdict on `key` (already in `health`; `config` is the one applied
    /// last): the backend's flag, and its listener's ring and entry when they change, in the
    /// order [`apply`](Self::apply) writes them. No other listener is planned or written.
    pub fn apply_verdict(
        &mut self,
        config: &Config,
        health: &BTreeMap<BackendKey, HealthStatus>,
        key: &BackendKey,
    ) -> Result<&AppliedMaps, ReconcileError> {
        let live_acl_sets = self.live_acl_sets()?;
        let plan = plan::plan_verdict(
            config,
            health,
            &self.applied,
            self.ring_size,
            &live_acl_sets,
            key,
        );
        let VerdictWrite {
            id,
            health: write,
            listener,
            applied_listener,
        } = match plan {
            VerdictPlan::Write(write) => *write,
            VerdictPlan::PlanEverything => return self.apply(config, health),
            VerdictPlan::NotInMaps => return Ok(&self.applied),
        };
        match write {
            HealthWrite::Up => self.write_health(id, HEALTH_UP)?,
            HealthWrite::DownFirst => self.write_health(id, HEALTH_DOWN)?,
            HealthWrite::DownLast => {}
        }
        self.write_listener(&listener)?;
        if write == HealthWrite::DownLast {
            self.write_health(id, HEALTH_DOWN)?;
        }
        for b in self.applied.backends.iter_mut().filter(|b| &b.key == key) {
            b.health = health.get(key).cloned();
        }
        if let Some(l) = self
            .applied
            .listeners
            .iter_mut()
            .find(|l| l.name == applied_listener.name)
        {
            *l = applied_listener;
        }
        Ok(&self.applied)
    }

    /// Which ACL set each listener index's entry in LISTENERS reads now.
    fn live_acl_sets(&self) -> Result<plan::LiveAclSets, ReconcileError> {
        let mut live = plan::LiveAclSets::new();
        for entry in self.maps.listeners.iter() {
            let (_, entry) = entry.map_err(map_err("LISTENERS"))?;
            if entry.flags & (LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_DENY) != 0 {
                live.insert(
                    entry.index,
                    u32::from(entry.flags & LISTENER_F_ACL_SET != 0),
                );
            }
        }
        Ok(live)
    }

    /// One listener's ring (when it changed), reply translations and entry.
    fn write_listener(&mut self, l: &PlannedListener) -> Result<(), ReconcileError> {
        if let Some(ring) = l.rebuild {
            self.write_ring(&l.name, l.index, ring, &l.ring_identities, &l.ring_input)?;
        }
        // Before the listener entry, with its ring: a least-connections pick at the slot the
        // entry switches to scans that ring's members.
        if let Some(set) = &l.wlc_set {
            self.wlc_sets_written
                .put(l.entry.ring_index, *set, |slot, set| {
                    self.maps
                        .wlc_sets
                        .set(*slot, *set, 0)
                        .map_err(map_err("WLC_SETS"))
                })?;
        }
        // Before the listener entry: the first full NAT packet needs its addresses.
        if let Some(pool) = &l.snat_pool {
            self.maps
                .snat_pools
                .set(l.index, *pool, 0)
                .map_err(map_err("SNAT_POOLS"))?;
        }
        // Before the listener entry: the set it switches to holds the whole list, and the
        // limit it turns on is there.
        if let Some(acl) = &l.acl_write {
            self.maps.clear_acl_set(acl.set).map_err(map_err("ACL"))?;
            for (bits, prefix) in &acl.keys {
                self.maps
                    .acl
                    .insert(&Key::new(*bits, *prefix), 1, 0)
                    .map_err(map_err("ACL"))?;
            }
        }
        if let Some(limit) = &l.new_flow_limit {
            self.maps
                .new_flow_limits
                .set(l.index, *limit, 0)
                .map_err(map_err("NEW_FLOW_LIMITS"))?;
        }
        // Before the listener entry: a backend answers only once a packet reached it.
        for &(endpoint, nat) in &l.replies {
            self.replies_written.put(endpoint, nat, |endpoint, nat| {
                self.maps
                    .reply_nat
                    .insert(reply_key(*endpoint), *nat, 0)
                    .map_err(map_err("REPLY_NAT"))
            })?;
        }
        self.maps
            .listeners
            .insert(l.key, l.entry, 0)
            .map_err(map_err("LISTENERS"))?;
        if let Some(old_key) = &l.old_key {
            let _ = self.maps.listeners.remove(old_key);
        }
        for &set in &l.acl_clear_after {
            self.maps.clear_acl_set(set).map_err(map_err("ACL"))?;
        }
        Ok(())
    }

    /// Steps 5 to 7 of an apply: what the config no longer has leaves the maps.
    fn remove_gone(&mut self, plan: &Plan) -> Result<(), ReconcileError> {
        // 5. Listeners that are gone, and their ring memory (unless the index was reused).
        for gone in &plan.gone_listeners {
            if let Some(key) = &gone.remove_key {
                let _ = self.maps.listeners.remove(key);
            }
            for r in 0..RINGS_PER_LISTENER {
                self.rings.remove(&(gone.index, r));
            }
            for &set in &gone.clear_acl_sets {
                self.maps.clear_acl_set(set).map_err(map_err("ACL"))?;
            }
            for &slot in &gone.free_ring_slots {
                self.mapped_rings.remove(&slot);
                clear_map_slot(&self.maps.rings_map, slot).map_err(|e| ReconcileError::Map {
                    map: "RINGS",
                    source: MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_delete_elem",
                        io_error: e,
                    }),
                })?;
            }
        }
        // 6. Backends that are gone: no ring names them any more. Flows still pinned to them
        //    are re-balanced by the data plane on their next packet.
        for &id in &plan.gone_backend_ids {
            self.write_backend(id, Backend::default())?;
            self.write_health(id, HEALTH_UP)?;
        }
        self.write_filter(&plan.filter, false)?;
        // 7. Reply translations of endpoints no backend has any more, and addresses no
        //    listener or backend has.
        for endpoint in &plan.gone_replies {
            let _ = self.maps.reply_nat.remove(&reply_key(*endpoint));
            self.replies_written.forget(endpoint);
        }
        for address in &plan.gone_addresses {
            self.maps.remove_nat_address(*address);
            self.addresses_written.forget(address);
        }
        Ok(())
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
        identities: &[String],
        ring_input: &[(u32, u32)],
    ) -> Result<(), ReconcileError> {
        let table = ring_table(identities, ring_input, self.ring_size).map_err(|source| {
            ReconcileError::Maglev {
                listener: listener.into(),
                source,
            }
        })?;
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
    fn written_writes_only_what_changed() {
        let mut written = Written::new();
        let mut writes = Vec::new();
        let mut put = |written: &mut Written<u32, u32>, key, value| {
            written
                .put(key, value, |k, v| {
                    writes.push((*k, *v));
                    Ok::<(), ()>(())
                })
                .unwrap()
        };
        put(&mut written, 1, 10);
        put(&mut written, 1, 10);
        put(&mut written, 1, 11);
        written.forget(&1);
        put(&mut written, 1, 11);
        assert_eq!(writes, vec![(1, 10), (1, 11), (1, 11)]);
    }
}
