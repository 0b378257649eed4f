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

use core::{
    ffi::c_void,
    intrinsics::{atomic_xadd, AtomicOrdering},
};

use aya_ebpf::helpers::bpf_loop;

use aya_ebpf::bindings::BPF_NOEXIST;
use slb_common::{
    less_loaded, open_connections, wlc_tie_wins, FlowKey, ListenerEntry, BACKEND_F_DRAINING,
    CONN_F_CLOSING, MAX_WLC_BACKENDS, NO_BACKEND,
};

use crate::{
    balancer::{present_backend, usable_backend_for, Refusal},
    maps::{
        BACKEND_CONNECTIONS, BACKEND_STATS, CONNECTIONS, CONNECTION_SCRATCH, LISTENER_STATS,
        WLC_SCRATCH, WLC_SETS,
    },
};

/// A least-connections scan under way (see [`least_loaded`]).
#[repr(C)]
pub struct WlcScan {
    ring_index: u32,
    listener_flags: u32,
    start: u32,
    count: u32,
    best: u32,
    best_load: u32,
    best_weight: u32,
    full: u32,
    /// The flow's hash, and how many members tied with the best so far: a tie replaces the
    /// best with probability 1/ties, so equally loaded members share new flows evenly
    /// whatever their place in the set.
    hash: u32,
    ties: u32,
}

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
/// flow's next packet finds the table as it is. The entry is built in this CPU's
/// `CONNECTION_SCRATCH` entry, field by field: on the stack it pushed the IPv6 program past
/// 512 bytes.
#[inline(always)]
fn link(flow: &FlowKey, backend_id: u32, listener_index: u32, flags: u32, now: u64) {
    let Some(entry) = CONNECTION_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let linked = unsafe {
        (*entry).backend_id = backend_id;
        (*entry).listener_index = listener_index;
        (*entry).last_seen_ns = now;
        (*entry).flags = flags;
        (*entry)._pad = 0;
        CONNECTIONS
            .insert(flow, &*entry, u64::from(BPF_NOEXIST))
            .is_ok()
    };
    if linked && flags & CONN_F_CLOSING == 0 {
        add(backend_id, 1);
    }
}

/// The least loaded of the listener's usable backends with room (open connections per weight,
/// `WLC_SETS`), scanning from the flow's hash so that equal ones share a burst of new flows.
/// `AtCapacity` when every usable one is at its `max_connections`, `NoBackend` when none is
/// usable, `NoSet` when the listener has no set (the ring decides).
///
/// The scan is a `bpf_loop` over the members, its state in this CPU's `WLC_SCRATCH` entry: the
/// verifier checks the body once (unrolled, 64 members with their branches took it past its
/// million instructions), and no stack is spent on it.
#[inline(always)]
pub(crate) fn least_loaded(hash: u32, listener: &ListenerEntry) -> Result<u32, Refusal> {
    let Some(scan) = WLC_SCRATCH.get_ptr_mut(0) else {
        return Err(Refusal::LookupFailed);
    };
    let Some(set) = WLC_SETS.get_ptr(listener.ring_index) else {
        return Err(Refusal::NoSet);
    };
    let count = unsafe { (*set).count };
    if count == 0 || count > MAX_WLC_BACKENDS {
        return Err(Refusal::NoSet);
    }
    unsafe {
        // Field by field: a struct written whole is built on the stack first.
        (*scan).ring_index = listener.ring_index;
        (*scan).listener_flags = listener.flags;
        (*scan).start = hash % count;
        (*scan).count = count;
        (*scan).best = NO_BACKEND;
        (*scan).best_load = 0;
        (*scan).best_weight = 0;
        (*scan).full = 0;
        (*scan).hash = hash;
        (*scan).ties = 0;
        bpf_loop(count, scan_member as *mut c_void, core::ptr::null_mut(), 0);
    }
    let (best, full) = unsafe { ((*scan).best, (*scan).full) };
    if best != NO_BACKEND {
        return Ok(best);
    }
    Err(if full != 0 {
        Refusal::AtCapacity
    } else {
        Refusal::NoBackend
    })
}

/// One step of [`least_loaded`]'s scan: member `start + i` (mod count) of the set, kept as the
/// best so far when usable, with room and less loaded. Returns 0: go on.
#[inline(never)]
extern "C" fn scan_member(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(scan) = WLC_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let scan = unsafe { &mut *scan };
    let Some(set) = WLC_SETS.get_ptr(scan.ring_index) else {
        return 1;
    };
    let mut at = scan.start.wrapping_add(i as u32);
    if at >= scan.count {
        at = at.wrapping_sub(scan.count);
    }
    // SAFETY: masked into the 64 members of the set.
    let member = unsafe { (*set).members[(at & (MAX_WLC_BACKENDS - 1)) as usize] };
    if member.weight == 0 {
        return 0;
    }
    let Some(backend) = usable_backend_for(member.id, scan.listener_flags) else {
        return 0;
    };
    if backend.flags & BACKEND_F_DRAINING != 0 {
        return 0;
    }
    let load = open(member.id);
    if backend.max_connections != 0 && load >= backend.max_connections {
        scan.full = 1;
        return 0;
    }
    let better = scan.best == NO_BACKEND
        || less_loaded(load, member.weight, scan.best_load, scan.best_weight);
    let tied = !better && !less_loaded(scan.best_load, scan.best_weight, load, member.weight);
    if tied {
        scan.ties += 1;
    }
    if better || tied && wlc_tie_wins(scan.hash, scan.ties) {
        if better {
            scan.ties = 1;
        }
        scan.best = member.id;
        scan.best_load = load;
        scan.best_weight = member.weight;
    }
    0
}

/// `id`, picked for a new flow, unless it is at its `max_connections`: then the least loaded
/// backend with room (see [`least_loaded`]). The backend passed over is counted.
#[inline(always)]
pub(crate) fn with_room(id: u32, hash: u32, listener: &ListenerEntry) -> Result<u32, Refusal> {
    let Some(backend) = present_backend(id) else {
        return Ok(id);
    };
    if backend.max_connections == 0 || open(id) < backend.max_connections {
        return Ok(id);
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(id) {
        unsafe { (*c).at_capacity += 1 };
    }
    match least_loaded(hash, listener) {
        Err(Refusal::NoSet) => Err(Refusal::AtCapacity),
        picked => picked,
    }
}

/// Counts a new flow of the listener dropped because no backend had room.
#[inline(always)]
pub(crate) fn count_at_capacity(listener: &ListenerEntry) {
    if let Some(c) = LISTENER_STATS.get_ptr_mut(listener.index) {
        unsafe { (*c).at_capacity += 1 };
    }
}
