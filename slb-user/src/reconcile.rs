//! Turns a validated config into map contents. Backend ids and listener indices stay stable
//! across reloads (a connection keeps pointing at the same id), Maglev rings are written into the
//! idle half of a listener's ring pair and then switched to with one map update, and removed
//! backends are retired only after no ring references them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::maps::MapError;
use serde::{Deserialize, Serialize};
use slb_common::maglev::{build_table, MaglevBackend, MaglevError};
use slb_common::{
    ipv4_mapped, Backend, ListenerEntry, ListenerKey, BACKEND_F_PRESENT, MAX_BACKENDS,
    MAX_LISTENERS, NO_BACKEND, RINGS_PER_LISTENER,
};

use crate::config::{BackendSpec, Config, Protocol, DEFAULT_GROUP};
use crate::maps::PinnedMaps;

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

/// A backend is the same backend across reloads when group, address and port match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendKey {
    pub group: String,
    pub address: IpAddr,
    pub port: u16,
}

impl BackendKey {
    fn identity(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }
}

/// What `slb status` needs to name what the maps hold; written to the state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub generation: u64,
    pub instance: String,
    pub ring_size: u32,
    pub interfaces: Vec<String>,
    pub listeners: Vec<AppliedListener>,
    pub backends: Vec<AppliedBackend>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedListener {
    pub name: String,
    pub protocol: Protocol,
    pub vip: IpAddr,
    pub port: u16,
    pub group: String,
    pub index: u32,
    /// Which of the listener's two rings is live.
    pub ring: u32,
    /// Backend ids in ring order of config, with weights.
    pub backends: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedBackend {
    pub id: u32,
    #[serde(flatten)]
    pub key: BackendKey,
    pub weight: u32,
}

pub struct Reconciler {
    maps: PinnedMaps,
    ring_size: u32,
    state: AppliedState,
}

fn ipv4_octets(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(v4) => v4.octets(),
        // Validation rejects IPv6 until the IPv6 data plane lands.
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

fn lowest_free(used: &BTreeSet<u32>, limit: u32) -> Option<u32> {
    (0..limit).find(|i| !used.contains(i))
}

impl Reconciler {
    pub fn new(maps: PinnedMaps, instance: &str, ring_size: u32) -> Reconciler {
        Reconciler {
            maps,
            ring_size,
            state: AppliedState {
                instance: instance.into(),
                ring_size,
                ..Default::default()
            },
        }
    }

    pub fn state(&self) -> &AppliedState {
        &self.state
    }

    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// Applies `config`; on success the returned state has the next generation.
    pub fn apply(&mut self, config: &Config) -> Result<&AppliedState, ReconcileError> {
        if config.maglev_table_size != self.ring_size {
            return Err(ReconcileError::RingSizeChanged {
                running: self.ring_size,
                requested: config.maglev_table_size,
            });
        }
        let groups: BTreeMap<&str, &[BackendSpec]> = config
            .groups
            .iter()
            .map(|g| (g.name.as_str(), &g.backends[..]))
            .collect();

        // Backend ids: keep the id of every backend that stays.
        let old_ids: BTreeMap<BackendKey, u32> = self
            .state
            .backends
            .iter()
            .map(|b| (b.key.clone(), b.id))
            .collect();
        let mut wanted: BTreeMap<BackendKey, u32> = BTreeMap::new();
        let mut listener_backends: Vec<(String, Vec<(BackendKey, u32)>)> = Vec::new();
        for l in &config.listeners {
            let (group, specs) = match &l.group {
                Some(g) => (g.as_str(), groups[g.as_str()]),
                None => (DEFAULT_GROUP, &config.default_group.backends[..]),
            };
            let members: Vec<(BackendKey, u32)> = specs
                .iter()
                .map(|b| {
                    let key = BackendKey {
                        group: group.into(),
                        address: b.address,
                        port: b.port.unwrap_or(l.port),
                    };
                    wanted.insert(key.clone(), b.weight);
                    (key, b.weight)
                })
                .collect();
            listener_backends.push((group.into(), members));
        }
        let mut used: BTreeSet<u32> = wanted
            .keys()
            .filter_map(|k| old_ids.get(k).copied())
            .collect();
        let mut ids: BTreeMap<BackendKey, u32> = BTreeMap::new();
        for key in wanted.keys() {
            let id = match old_ids.get(key) {
                Some(&id) => id,
                None => {
                    let id = lowest_free(&used, MAX_BACKENDS).ok_or(ReconcileError::Exhausted {
                        what: "backend ids",
                    })?;
                    used.insert(id);
                    id
                }
            };
            ids.insert(key.clone(), id);
        }

        // 1. Backends first, so every id a ring will name is valid.
        for (key, &id) in &ids {
            let backend = Backend {
                addr: ipv4_mapped(ipv4_octets(key.address)),
                port: key.port,
                flags: BACKEND_F_PRESENT,
                _pad: 0,
            };
            self.maps
                .backends
                .set(id, backend, 0)
                .map_err(map_err("BACKENDS"))?;
        }

        // 2. Rings and listener entries.
        let old_listeners: BTreeMap<String, AppliedListener> = self
            .state
            .listeners
            .drain(..)
            .map(|l| (l.name.clone(), l))
            .collect();
        let mut used_index: BTreeSet<u32> = config
            .listeners
            .iter()
            .filter_map(|l| old_listeners.get(&l.name).map(|o| o.index))
            .collect();
        let mut applied = Vec::new();
        for (l, (group, members)) in config.listeners.iter().zip(listener_backends) {
            let member_ids: Vec<(u32, u32)> = members.iter().map(|(k, w)| (ids[k], *w)).collect();
            let old = old_listeners.get(&l.name);
            let index = match old {
                Some(o) => o.index,
                None => {
                    let i = lowest_free(&used_index, MAX_LISTENERS).ok_or(
                        ReconcileError::Exhausted {
                            what: "listener slots",
                        },
                    )?;
                    used_index.insert(i);
                    i
                }
            };
            let key = listener_key(l.protocol, l.vip, l.port);
            let ring = match old {
                Some(o) if o.backends == member_ids => o.ring,
                _ => {
                    let ring = old.map_or(0, |o| (o.ring + 1) % RINGS_PER_LISTENER);
                    self.write_ring(&l.name, index, ring, &members, &member_ids)?;
                    ring
                }
            };
            let entry = ListenerEntry {
                index,
                ring_base: self.ring_base(index, ring),
                ring_size: self.ring_size,
                ..Default::default()
            };
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
            applied.push(AppliedListener {
                name: l.name.clone(),
                protocol: l.protocol,
                vip: l.vip,
                port: l.port,
                group,
                index,
                ring,
                backends: member_ids,
            });
        }
        // 3. Listeners that are gone.
        for (name, o) in &old_listeners {
            if !applied.iter().any(|a| &a.name == name) {
                let key = listener_key(o.protocol, o.vip, o.port);
                if !applied
                    .iter()
                    .any(|a| listener_key(a.protocol, a.vip, a.port) == key)
                {
                    let _ = self.maps.listeners.remove(&key);
                }
            }
        }
        // 4. Backends that are gone: no ring names them any more. Flows still pinned to them
        //    are re-balanced by the data plane on their next packet.
        for (key, &id) in &old_ids {
            if !ids.contains_key(key) {
                self.maps
                    .backends
                    .set(id, Backend::default(), 0)
                    .map_err(map_err("BACKENDS"))?;
            }
        }

        self.state.generation += 1;
        self.state.interfaces = config.interfaces.iter().map(|i| i.name.clone()).collect();
        self.state.listeners = applied;
        self.state.backends = ids
            .into_iter()
            .map(|(key, id)| {
                let weight = wanted[&key];
                AppliedBackend { id, key, weight }
            })
            .collect();
        Ok(&self.state)
    }

    fn ring_base(&self, index: u32, ring: u32) -> u32 {
        (index * RINGS_PER_LISTENER + ring) * self.ring_size
    }

    fn write_ring(
        &mut self,
        listener: &str,
        index: u32,
        ring: u32,
        members: &[(BackendKey, u32)],
        member_ids: &[(u32, u32)],
    ) -> Result<(), ReconcileError> {
        let identities: Vec<String> = members.iter().map(|(k, _)| k.identity()).collect();
        let maglev: Vec<MaglevBackend<'_>> = identities
            .iter()
            .zip(members)
            .map(|(id, (_, weight))| MaglevBackend {
                identity: id.as_bytes(),
                weight: *weight,
            })
            .collect();
        let table =
            build_table(&maglev, self.ring_size).map_err(|source| ReconcileError::Maglev {
                listener: listener.into(),
                source,
            })?;
        let base = self.ring_base(index, ring);
        for (slot, owner) in table.iter().enumerate() {
            let id = if *owner == NO_BACKEND {
                NO_BACKEND
            } else {
                member_ids[*owner as usize].0
            };
            self.maps
                .rings
                .set(base + slot as u32, id, 0)
                .map_err(map_err("RINGS"))?;
        }
        tracing::debug!(listener, ring, "ring written");
        Ok(())
    }
}
