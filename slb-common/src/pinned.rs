//! The maps the control plane pins, described once: their names, key and value sizes and
//! entries. The daemon pins exactly these, checks pinned maps against them before adopting a
//! previous run's, and opens them by these names; a unit test in slb-user checks the table
//! against the maps the built XDP object declares (slb-ebpf's `maps.rs`).

use core::mem::size_of;

use crate::types::*;

/// How many entries a pinned map has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entries {
    /// Fixed by this build.
    Fixed(u32),
    /// `max_connections` of the config (the object declares [`MAX_CONNECTIONS`]).
    MaxConnections,
}

/// One pinned map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedMap {
    /// The map's name in the object, and its pin's file name.
    pub name: &'static str,
    pub key_size: usize,
    pub value_size: usize,
    pub entries: Entries,
}

const fn map(name: &'static str, key_size: usize, value_size: usize, entries: u32) -> PinnedMap {
    PinnedMap {
        name,
        key_size,
        value_size,
        entries: Entries::Fixed(entries),
    }
}

pub const LISTENERS: PinnedMap = map(
    "LISTENERS",
    size_of::<ListenerKey>(),
    size_of::<ListenerEntry>(),
    MAX_LISTENERS,
);
/// An array of maps: its values are the inner rings' ids; the rings' size is checked apart.
pub const RINGS: PinnedMap = map("RINGS", 4, 4, RING_SLOTS);
pub const BACKENDS: PinnedMap = map("BACKENDS", 4, size_of::<Backend>(), MAX_BACKENDS);
pub const BACKEND_HEALTH: PinnedMap = map("BACKEND_HEALTH", 4, 4, MAX_BACKENDS);
pub const PERSISTENCE: PinnedMap = map(
    "PERSISTENCE",
    size_of::<PersistKey>(),
    size_of::<Persisted>(),
    MAX_PERSISTENCE,
);
pub const CONNECTIONS: PinnedMap = PinnedMap {
    name: "CONNECTIONS",
    key_size: size_of::<FlowKey>(),
    value_size: size_of::<Connection>(),
    entries: Entries::MaxConnections,
};
pub const PERSIST_PENDING: PinnedMap = map(
    "PERSIST_PENDING",
    size_of::<PersistKey>(),
    size_of::<Persisted>(),
    MAX_HALF_OPEN,
);
pub const HALF_OPEN: PinnedMap = map("HALF_OPEN", 4, size_of::<HalfOpen>(), MAX_HALF_OPEN);
pub const REPLY_NAT: PinnedMap = map(
    "REPLY_NAT",
    size_of::<BackendEndpoint>(),
    size_of::<ReplyNat>(),
    MAX_BACKENDS,
);
pub const LISTENER_STATS: PinnedMap = map(
    "LISTENER_STATS",
    4,
    size_of::<TrafficCounters>(),
    MAX_LISTENERS,
);
pub const BACKEND_STATS: PinnedMap = map(
    "BACKEND_STATS",
    4,
    size_of::<TrafficCounters>(),
    MAX_BACKENDS,
);
pub const FRAGMENTS: PinnedMap = map(
    "FRAGMENTS",
    size_of::<FragmentKey>(),
    size_of::<FragmentEntry>(),
    MAX_FRAGMENTS,
);
pub const NAT_ADDRESSES: PinnedMap = map("NAT_ADDRESSES", 4, 4, MAX_NAT_ADDRESSES);
pub const FRAGMENTS6: PinnedMap = map(
    "FRAGMENTS6",
    size_of::<FragmentKey6>(),
    size_of::<FragmentEntry6>(),
    MAX_FRAGMENTS,
);
pub const NAT_ADDRESSES6: PinnedMap =
    map("NAT_ADDRESSES6", size_of::<Addr>(), 4, MAX_NAT_ADDRESSES);
pub const ENDPOINT_FILTER: PinnedMap = map("ENDPOINT_FILTER", 4, 4, ENDPOINT_FILTER_WORDS);
pub const GLOBAL_STATS: PinnedMap = map("GLOBAL_STATS", 4, size_of::<GlobalCounters>(), 1);
/// A devmap's value is `struct bpf_devmap_val` (ifindex and program fd).
pub const EGRESS: PinnedMap = map("EGRESS", 4, 8, MAX_INTERFACES);
pub const NEXT_HOP_BACKEND: PinnedMap =
    map("NEXT_HOP_BACKEND", 4, size_of::<NextHop>(), MAX_BACKENDS);
pub const NEXT_HOP_CLIENT: PinnedMap = map(
    "NEXT_HOP_CLIENT",
    4,
    size_of::<NextHop>(),
    MAX_CLIENT_NEXT_HOPS,
);

pub const NEXT_HOP_BACKEND6: PinnedMap =
    map("NEXT_HOP_BACKEND6", 4, size_of::<NextHop6>(), MAX_BACKENDS);
pub const NEXT_HOP_CLIENT6: PinnedMap = map(
    "NEXT_HOP_CLIENT6",
    size_of::<Addr>(),
    size_of::<NextHop6>(),
    MAX_CLIENT_NEXT_HOPS,
);
/// Pinned like the rest: the kernel empties a program array once no file descriptor nor pin
/// holds it, so a daemon that exits with `--keep-serving` would leave IPv6 unbalanced.
pub const PROGRAMS: PinnedMap = map("PROGRAMS", 4, 4, TAIL_CALL_PROGRAMS);

pub const SNAT_POOLS: PinnedMap = map("SNAT_POOLS", 4, size_of::<SnatPool>(), MAX_LISTENERS);
pub const SNAT_MAPPINGS: PinnedMap = map(
    "SNAT_MAPPINGS",
    size_of::<FlowKey>(),
    size_of::<SnatMapping>(),
    MAX_SNAT_MAPPINGS,
);

/// An LPM trie: its key is the 32-bit prefix length, then the data.
pub const ACL: PinnedMap = map("ACL", 4 + size_of::<AclPrefix>(), 4, MAX_ACL_ENTRIES);
pub const NEW_FLOW_LIMITS: PinnedMap = map(
    "NEW_FLOW_LIMITS",
    4,
    size_of::<NewFlowLimit>(),
    MAX_LISTENERS,
);

/// Open connections per backend id (`open_connections`), shared by all CPUs.
pub const BACKEND_CONNECTIONS: PinnedMap = map("BACKEND_CONNECTIONS", 4, 8, MAX_BACKENDS);
/// Least-connections sets (`WlcSet`), at their listener's ring slot.
pub const WLC_SETS: PinnedMap = map("WLC_SETS", 4, size_of::<WlcSet>(), RING_SLOTS);

/// Every map the daemon pins, in the order it checks them.
pub const PINNED_MAPS: [PinnedMap; 29] = [
    LISTENERS,
    RINGS,
    BACKENDS,
    BACKEND_HEALTH,
    PERSISTENCE,
    CONNECTIONS,
    PERSIST_PENDING,
    HALF_OPEN,
    REPLY_NAT,
    LISTENER_STATS,
    BACKEND_STATS,
    FRAGMENTS,
    NAT_ADDRESSES,
    FRAGMENTS6,
    NAT_ADDRESSES6,
    ENDPOINT_FILTER,
    GLOBAL_STATS,
    EGRESS,
    NEXT_HOP_BACKEND,
    NEXT_HOP_CLIENT,
    NEXT_HOP_BACKEND6,
    NEXT_HOP_CLIENT6,
    PROGRAMS,
    SNAT_POOLS,
    SNAT_MAPPINGS,
    ACL,
    NEW_FLOW_LIMITS,
    BACKEND_CONNECTIONS,
    WLC_SETS,
];

/// Maps of the object that are never pinned: per-CPU scratch space of the program
/// (`FIB_PARAMS`) and the benchmark wrapper's own maps (`REPLAY_*`, see `xdp_replay`).
pub const UNPINNED_MAPS: [&str; 10] = [
    "FIB_PARAMS",
    "PICK_SCRATCH",
    "PERSIST_KEY_SCRATCH",
    "CONNECTION_SCRATCH",
    "WLC_SCRATCH",
    "ACL_SCRATCH",
    "SNAT_SCRATCH",
    "REPLAY_TEMPLATE",
    "REPLAY_COUNTER",
    "REPLAY_TARGET",
];
