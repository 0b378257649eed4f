//! Every map of the data plane. They are BTF-defined, so `bpftool map dump` prints their keys and
//! values with field names; the daemon pins each one by name under the instance's directory so a
//! restarted daemon and `bpftool` find them.

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap,
        PerCpuArray, ProgramArray,
    },
    macros::btf_map,
};
use slb_common::{
    AclPrefix, Addr, Backend, BackendEndpoint, Connection, FlowKey, FragmentEntry, FragmentEntry6,
    FragmentKey, FragmentKey6, GlobalCounters, HalfOpen, ListenerEntry, ListenerKey, NewFlowLimit,
    NextHop, NextHop6, PersistKey, Persisted, ReplayTemplate, ReplyNat, SnatMapping, SnatPool,
    TrafficCounters, DEFAULT_RING_SIZE, ENDPOINT_FILTER_WORDS, MAX_ACL_ENTRIES, MAX_BACKENDS,
    MAX_CLIENT_NEXT_HOPS, MAX_CONNECTIONS, MAX_FRAGMENTS, MAX_HALF_OPEN, MAX_INTERFACES,
    MAX_LISTENERS, MAX_NAT_ADDRESSES, MAX_PERSISTENCE, MAX_SNAT_MAPPINGS, RINGS_MAP_FLAGS,
    RING_SLOTS, TAIL_CALL_PROGRAMS,
};
use slb_common::{WlcSet, BACKEND_CONNECTIONS_MAP_FLAGS};

const LISTENERS_MAX: usize = MAX_LISTENERS as usize;
const BACKENDS_MAX: usize = MAX_BACKENDS as usize;
const CONNECTIONS_MAX: usize = MAX_CONNECTIONS as usize;

#[btf_map]
pub static LISTENERS: HashMap<ListenerKey, ListenerEntry, LISTENERS_MAX> = HashMap::new();

/// Listeners' access lists: (set, client prefix) → 1, set by `slb_common::acl_set`.
#[btf_map]
pub static ACL: LpmTrie<AclPrefix, u32, { MAX_ACL_ENTRIES as usize }> = LpmTrie::new();

/// Room for the ACL key being looked up (per CPU): on the stack it would not fit beside the
/// rest of the IPv6 path.
#[btf_map]
pub static ACL_SCRATCH: PerCpuArray<aya_ebpf::btf_maps::lpm_trie::Key<AclPrefix>, 1> =
    PerCpuArray::new();

/// Listeners' limits on new flows, by listener index (`policy::new_flow_admitted`).
#[btf_map]
pub static NEW_FLOW_LIMITS: Array<NewFlowLimit, LISTENERS_MAX> = Array::new();

/// The Maglev rings: one array map of `maglev_table_size` backend ids per (listener, ring),
/// created by the daemon only for the listeners it has. The inner definition is the template
/// the kernel checks rings against (`BPF_F_INNER_MAP` lets their size differ).
#[btf_map]
pub static RINGS: ArrayOfMaps<
    Array<u32, { DEFAULT_RING_SIZE as usize }, { RINGS_MAP_FLAGS as usize }>,
    { RING_SLOTS as usize },
> = ArrayOfMaps::new();

#[btf_map]
pub static BACKENDS: Array<Backend, BACKENDS_MAX> = Array::new();

/// Open connections per backend id (`slb_common::open_connections`): shared by every CPU and
/// changed only by atomic adds, +1 when a flow's entry is linked into CONNECTIONS open, -1 when
/// it closes or is unlinked (`load`). The daemon's sweeper subtracts the flows it expires
/// through its own mapping of the array.
#[btf_map]
pub static BACKEND_CONNECTIONS: Array<
    u64,
    BACKENDS_MAX,
    { BACKEND_CONNECTIONS_MAP_FLAGS as usize },
> = Array::new();

/// Each listener's backends and weights for a least-connections pick, at its ring's slot.
#[btf_map]
pub static WLC_SETS: Array<WlcSet, { RING_SLOTS as usize }> = Array::new();

/// A question for `slb_xdp_pick` and its answer, per CPU (`pick`).
#[btf_map]
pub static PICK_SCRATCH: PerCpuArray<crate::pick::PickScratch, 1> = PerCpuArray::new();

/// Room for a persistence key being looked up, per CPU (`balancer::persisted_backend`).
#[btf_map]
pub static PERSIST_KEY_SCRATCH: PerCpuArray<PersistKey, 1> = PerCpuArray::new();

/// Room for a connection entry being linked, per CPU (`load::link`).
#[btf_map]
pub static CONNECTION_SCRATCH: PerCpuArray<Connection, 1> = PerCpuArray::new();

/// A least-connections scan's state, per CPU (`load::least_loaded`).
#[btf_map]
pub static WLC_SCRATCH: PerCpuArray<crate::load::WlcScan, 1> = PerCpuArray::new();

/// `HEALTH_UP`/`HEALTH_DOWN` per backend id, written by the health checker. Separate from
/// `BACKENDS` so a verdict is one 4-byte map write that the next packet sees.
#[btf_map]
pub static BACKEND_HEALTH: Array<u32, BACKENDS_MAX> = Array::new();

/// Source-address persistence: client address on a listener → backend.
#[btf_map]
pub static PERSISTENCE: LruHashMap<PersistKey, Persisted, { MAX_PERSISTENCE as usize }> =
    LruHashMap::new();

/// Persistence of handshakes under way (written by SYNs): a client's concurrent first
/// connections follow the first one's pick, while a SYN flood of spoofed sources churns this
/// table, never the persistence of established clients.
#[btf_map]
pub static PERSIST_PENDING: LruHashMap<PersistKey, Persisted, { MAX_HALF_OPEN as usize }> =
    LruHashMap::new();

/// Established flows (TCP from the client's first non-SYN packet, UDP from the first): the
/// one per-flow state. The daemon sizes it from `max_connections` and removes idle entries.
#[btf_map]
pub static CONNECTIONS: LruHashMap<FlowKey, Connection, CONNECTIONS_MAX> = LruHashMap::new();

/// TCP flows that have sent only SYNs, one slot per flow hash (`half_open.rs`): a SYN flood
/// churns this table, never `CONNECTIONS`.
#[btf_map]
pub static HALF_OPEN: Array<HalfOpen, { MAX_HALF_OPEN as usize }> = Array::new();

/// `ENDPOINT_F_*` bits of 16 slots a word (`endpoint_filter_bits`): the early test for traffic
/// that is not ours.
#[btf_map]
pub static ENDPOINT_FILTER: Array<u32, { ENDPOINT_FILTER_WORDS as usize }> = Array::new();

/// Backend endpoint → its listener's VIP and port: replies are translated without per-flow
/// state, so the two directions of a flow cannot disagree and any node can translate a reply.
#[btf_map]
pub static REPLY_NAT: HashMap<BackendEndpoint, ReplyNat, BACKENDS_MAX> = HashMap::new();

/// IPv4 datagrams being fragmented through: (src, dst, protocol, IP id) of the first fragment →
/// what it became. Later fragments have no ports, so they follow this entry. An LRU, as in
/// Cilium: entries of finished datagrams are simply pushed out.
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// Every VIP and backend address (IPv4, network order as u32) → `NAT_ADDRESS_F_*`, written by the daemon. A later
/// fragment without a fragment entry shows only addresses: this says whether it is ours (dropped,
/// never forwarded untranslated) or someone else's (passed).
#[btf_map]
pub static NAT_ADDRESSES: HashMap<u32, u32, { MAX_NAT_ADDRESSES as usize }> = HashMap::new();

/// IPv6 datagrams being fragmented through, as FRAGMENTS for IPv4.
#[btf_map]
pub static FRAGMENTS6: LruHashMap<FragmentKey6, FragmentEntry6, { MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// Every IPv6 VIP and backend address → `NAT_ADDRESS_F_*`, as NAT_ADDRESSES for IPv4.
#[btf_map]
pub static NAT_ADDRESSES6: HashMap<Addr, u32, { MAX_NAT_ADDRESSES as usize }> = HashMap::new();

#[btf_map]
pub static LISTENER_STATS: PerCpuArray<TrafficCounters, LISTENERS_MAX> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters, BACKENDS_MAX> = PerCpuArray::new();

#[btf_map]
pub static GLOBAL_STATS: PerCpuArray<GlobalCounters, 1> = PerCpuArray::new();

/// This CPU's data-plane counters, which every program's entry takes first.
#[inline(always)]
pub fn global_counters() -> Option<&'static mut GlobalCounters> {
    let counters = GLOBAL_STATS.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot: no other CPU writes it, and programs do not nest on a CPU.
    Some(unsafe { &mut *counters })
}

/// Interfaces the program may redirect to, keyed by ifindex.
/// Scratch space for `bpf_fib_lookup`'s parameters, one per CPU (see `forward.rs`).
#[btf_map]
pub static FIB_PARAMS: PerCpuArray<crate::forward::AlignedFibParams, 1> = PerCpuArray::new();

#[btf_map]
pub static EGRESS: DevMapHash<{ MAX_INTERFACES as usize }> = DevMapHash::new();

/// Next hop towards each backend id, cached from the FIB (per CPU).
#[btf_map]
pub static NEXT_HOP_BACKEND: PerCpuArray<NextHop, BACKENDS_MAX> = PerCpuArray::new();

/// Next hop towards client addresses (IPv4, network order as u32), for replies (per CPU).
#[btf_map]
pub static NEXT_HOP_CLIENT: LruPerCpuHashMap<u32, NextHop, { MAX_CLIENT_NEXT_HOPS as usize }> =
    LruPerCpuHashMap::new();

/// Next hop towards each IPv6 backend id (per CPU).
#[btf_map]
pub static NEXT_HOP_BACKEND6: PerCpuArray<NextHop6, BACKENDS_MAX> = PerCpuArray::new();

/// Next hop towards IPv6 client addresses, for replies (per CPU).
#[btf_map]
pub static NEXT_HOP_CLIENT6: LruPerCpuHashMap<Addr, NextHop6, { MAX_CLIENT_NEXT_HOPS as usize }> =
    LruPerCpuHashMap::new();

/// The programs `slb_xdp` hands frames to: `slb_xdp6` in `PROGRAM_SLOT_IPV6`, set by the daemon.
#[btf_map]
pub static PROGRAMS: ProgramArray<{ TAIL_CALL_PROGRAMS as usize }> = ProgramArray::new();

/// Full NAT listeners' SNAT addresses and ports, by listener index.
#[btf_map]
pub static SNAT_POOLS: Array<SnatPool, LISTENERS_MAX> = Array::new();

/// Full NAT flows: the flow of a backend's replies (backend → SNAT address and port) → the
/// client flow it belongs to. A plain hash, not an LRU: a live flow's mapping is never pushed
/// out; the daemon removes idle ones, and a full table counts as exhausted ports.
#[btf_map]
pub static SNAT_MAPPINGS: HashMap<FlowKey, SnatMapping, { MAX_SNAT_MAPPINGS as usize }> =
    HashMap::new();

/// Room for the key and value of a mapping being looked for or made (per CPU): on the stack
/// they would not fit beside the rest of the path.
#[btf_map]
pub static SNAT_SCRATCH: PerCpuArray<crate::fullnat::Scratch, 1> = PerCpuArray::new();

/// `xdp_replay` (benchmarks only; never pinned): the frame it restores before each run, the
/// port counter for new flows, and the program it hands the frame to.
#[btf_map]
pub static REPLAY_TEMPLATE: Array<ReplayTemplate, 1> = Array::new();

#[btf_map]
pub static REPLAY_COUNTER: PerCpuArray<u32, 1> = PerCpuArray::new();

#[btf_map]
pub static REPLAY_TARGET: ProgramArray<1> = ProgramArray::new();
