//! Backend load: each backend's open connections (`BACKEND_CONNECTIONS`), and the picks that
//! read them (least connections, `max_connections`).
//!
//! A count changes only where a flow's entry of CONNECTIONS is linked or unlinked, by whoever
//! did it: +1 for an open entry linked (`BPF_NOEXIST`: of two CPUs racing to link one flow, only
//! the one that linked it counts it), -1 for an open entry unlinked (the delete that succeeded:
//! of the data plane and the daemon's sweeper removing one entry at once, only one does). A
//! flow that closes or opens again is unlinked and linked anew with its new flags, rather than
//! flagged in place, so that the sweeper, which cannot change an entry in place, never races a
//! flag with its own removal. The counts stay exact while CONNECTIONS has room: an LRU eviction
//! of an open entry when it is full is not seen.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::bindings::BPF_NOEXIST;
use slb_common::{
    less_loaded, open_connections, Connection, FlowKey, ListenerEntry, BACKEND_F_DRAINING,
    CONN_F_CLOSING, MAX_WLC_BACKENDS, NO_BACKEND,
};

use crate::{
    balancer::{present_backend, usable_backend, Choice, Refusal},
    maps::{BACKEND_CONNECTIONS, BACKEND_STATS, CONNECTIONS, LISTENER_STATS, WLC_SETS},
};

/// What a flow's entry in CONNECTIONS was before this packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prior {
    Absent,
    /// Open, for this backend.
    Open(u32),
    Closing,
}

impl Prior {
    /// An entry for `backend_id` with `flags`.
    #[inline(always)]
    pub(crate) fn of(backend_id: u32, flags: u32) -> Prior {
        if flags & CONN_F_CLOSING == 0 {
            Prior::Open(backend_id)
        } else {
            Prior::Closing
        }
    }
}

#[inline(always)]
fn add(id: u32, delta: u64) {
    if let Some(word) = BACKEND_CONNECTIONS.get_ptr_mut(id) {
        // SAFETY: an 8-byte aligned u64 of an array map, which every CPU and the daemon change
        // only with atomic adds. The result is unused: one `lock xadd`.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(word, delta) };
    }
}

/// Backend `id`'s open connections now.
#[inline(always)]
pub(crate) fn open(id: u32) -> u32 {
    match BACKEND_CONNECTIONS.get_ptr(id) {
        // SAFETY: as in `add`; a plain 8-byte load of an aligned word is atomic.
        Some(word) => open_connections(unsafe { word.read_volatile() }),
        None => 0,
    }
}

/// Puts an entry for `flow` into CONNECTIONS (backend `backend_id`, `flags`, seen `now`), where
/// the flow had `prior`: the old entry unlinked (counted off when open and this delete removed
/// it), the new one linked (see [`link`]).
#[inline(always)]
pub(crate) fn relink(
    flow: &FlowKey,
    backend_id: u32,
    listener_index: u32,
    flags: u32,
    now: u64,
    prior: Prior,
) {
    if prior != Prior::Absent {
        let removed = CONNECTIONS.remove(flow).is_ok();
        if let (true, Prior::Open(id)) = (removed, prior) {
            add(id, u64::MAX);
        }
    }
    link(flow, backend_id, listener_index, flags, now);
}

/// Links a new entry for `flow`, counted when open and this insert made it. An insert that
/// fails (another CPU linked the flow first, or the map is out of memory) counts nothing; the
/// flow's next packet finds the table as it is. A call of its own: the entry it builds on the
/// stack pushed the IPv6 program past 512 bytes when inlined.
#[inline(never)]
fn link(flow: &FlowKey, backend_id: u32, listener_index: u32, flags: u32, now: u64) {
    let entry = Connection {
        backend_id,
        listener_index,
        last_seen_ns: now,
        flags,
        _pad: 0,
    };
    let linked = CONNECTIONS
        .insert(flow, &entry, u64::from(BPF_NOEXIST))
        .is_ok();
    if linked && flags & CONN_F_CLOSING == 0 {
        add(backend_id, 1);
    }
}

/// The least loaded of the listener's usable backends with room (open connections per weight,
/// `WLC_SETS`), scanning from the flow's hash so that equal ones share a burst of new flows.
/// `AtCapacity` when every usable one is at its `max_connections`, `NoBackend` when none is
/// usable, `NoSet` when the listener has no set (the ring decides). A call of its own, for the
/// stack of the programs that pick.
#[inline(never)]
pub(crate) fn least_loaded(hash: u32, listener: &ListenerEntry) -> Choice {
    Choice::of(scan(hash, listener))
}

#[inline(always)]
fn scan(hash: u32, listener: &ListenerEntry) -> Result<u32, Refusal> {
    let Some(set) = WLC_SETS.get_ptr(listener.ring_index) else {
        return Err(Refusal::NoSet);
    };
    let count = unsafe { (*set).count };
    if count == 0 || count > MAX_WLC_BACKENDS {
        return Err(Refusal::NoSet);
    }
    let start = hash % count;
    let (mut best, mut best_load, mut best_weight) = (NO_BACKEND, 0, 0);
    let mut full = false;
    let mut i = 0;
    while i < MAX_WLC_BACKENDS {
        if i >= count {
            break;
        }
        let mut at = start + i;
        if at >= count {
            at -= count;
        }
        i += 1;
        // SAFETY: `at` < count ≤ MAX_WLC_BACKENDS, masked again for the verifier.
        let member = unsafe { (*set).members[(at & (MAX_WLC_BACKENDS - 1)) as usize] };
        if member.weight == 0 {
            continue;
        }
        let Some(backend) = usable_backend(member.id, listener) else {
            continue;
        };
        if backend.flags & BACKEND_F_DRAINING != 0 {
            continue;
        }
        let load = open(member.id);
        if backend.max_connections != 0 && load >= backend.max_connections {
            full = true;
            continue;
        }
        if best == NO_BACKEND || less_loaded(load, member.weight, best_load, best_weight) {
            (best, best_load, best_weight) = (member.id, load, member.weight);
        }
    }
    if best != NO_BACKEND {
        return Ok(best);
    }
    Err(if full {
        Refusal::AtCapacity
    } else {
        Refusal::NoBackend
    })
}

/// `id`, picked for a new flow, unless it is at its `max_connections`: then the least loaded
/// backend with room (see [`least_loaded`]). The backend passed over is counted.
#[inline(never)]
pub(crate) fn with_room(id: u32, hash: u32, listener: &ListenerEntry) -> Choice {
    let Some(backend) = present_backend(id) else {
        return Choice::of(Ok(id));
    };
    if backend.max_connections == 0 || open(id) < backend.max_connections {
        return Choice::of(Ok(id));
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(id) {
        unsafe { (*c).at_capacity += 1 };
    }
    Choice::of(match scan(hash, listener) {
        Err(Refusal::NoSet) => Err(Refusal::AtCapacity),
        picked => picked,
    })
}

/// Counts a new flow of the listener dropped because no backend had room.
#[inline(always)]
pub(crate) fn count_at_capacity(listener: &ListenerEntry) {
    if let Some(c) = LISTENER_STATS.get_ptr_mut(listener.index) {
        unsafe { (*c).at_capacity += 1 };
    }
}
