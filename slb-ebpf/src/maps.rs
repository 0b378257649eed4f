//! Every map of the data plane. They are pinned by name under the instance's directory so a
//! restarted daemon and `bpftool` find them.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use slb_common::{
    Backend, Connection, FlowKey, GlobalCounters, ListenerEntry, ListenerKey, PersistKey,
    Persisted, ReverseNat, TrafficCounters, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_CONNECTIONS,
    MAX_INTERFACES, MAX_LISTENERS, MAX_PERSISTENCE, RINGS_PER_LISTENER,
};

#[map]
pub static LISTENERS: HashMap<ListenerKey, ListenerEntry> = HashMap::pinned(MAX_LISTENERS, 0);

/// All Maglev rings back to back; the daemon resizes this map at load time for its ring size.
#[map]
pub static RINGS: Array<u32> =
    Array::pinned(MAX_LISTENERS * RINGS_PER_LISTENER * DEFAULT_RING_SIZE, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// `HEALTH_UP`/`HEALTH_DOWN` per backend id, written by the health checker. Separate from
/// `BACKENDS` so a verdict is one 4-byte map write that the next packet sees.
#[map]
pub static BACKEND_HEALTH: Array<u32> = Array::pinned(MAX_BACKENDS, 0);

/// Source-address persistence: client address on a listener → backend.
#[map]
pub static PERSISTENCE: LruHashMap<PersistKey, Persisted> = LruHashMap::pinned(MAX_PERSISTENCE, 0);

#[map]
pub static CONNECTIONS: LruHashMap<FlowKey, Connection> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map]
pub static REVERSE_NAT: LruHashMap<FlowKey, ReverseNat> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map]
pub static LISTENER_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::pinned(MAX_LISTENERS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map]
pub static GLOBAL_STATS: PerCpuArray<GlobalCounters> = PerCpuArray::pinned(1, 0);

/// Interfaces the program may redirect to, keyed by ifindex.
#[map]
pub static EGRESS: DevMapHash = DevMapHash::pinned(MAX_INTERFACES, 0);
