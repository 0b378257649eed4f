//! The half-open table: where a TCP flow's pick waits between its first packet and its next
//! non-SYN one (see `slb_common::HalfOpen`). An array slot per flow hash, read and written in
//! place: no LRU insert (its eviction was most of a new flow's cost), no lock. Two CPUs may
//! write one slot at once for two flows; the slot's check then fails and it reads as empty.

use slb_common::{half_open_check, half_open_slot, FlowKey};

use crate::maps::HALF_OPEN;

const FLOW_WORDS: usize = core::mem::size_of::<FlowKey>() / 4;

#[inline(always)]
fn words(flow: &FlowKey) -> *const u32 {
    (flow as *const FlowKey).cast()
}

/// The backend picked for `flow` (hash `hash`) when its slot still holds it.
#[inline(always)]
pub fn picked(flow: &FlowKey, hash: u32) -> Option<u32> {
    let slot = HALF_OPEN.get(half_open_slot(hash))?;
    let (held, wanted) = (words(&slot.flow), words(flow));
    let mut i = 0;
    while i < FLOW_WORDS {
        // SAFETY: both are FlowKeys (40 bytes, 4-byte aligned).
        if unsafe { held.add(i).read_volatile() != wanted.add(i).read() } {
            return None;
        }
        i += 1;
    }
    let id = unsafe { (&raw const slot.backend_id).read_volatile() };
    let check = unsafe { (&raw const slot.check).read_volatile() };
    (check == half_open_check(hash, id)).then_some(id)
}

/// Records that `flow` (hash `hash`) was sent to backend `id`, taking its slot over.
#[inline(always)]
pub fn remember(flow: &FlowKey, hash: u32, id: u32) {
    let Some(slot) = HALF_OPEN.get_ptr_mut(half_open_slot(hash)) else {
        return;
    };
    // Word by word with volatile stores: a struct copy becomes a memcpy call.
    let held = unsafe { (&raw mut (*slot).flow).cast::<u32>() };
    let wanted = words(flow);
    let mut i = 0;
    while i < FLOW_WORDS {
        // SAFETY: in bounds of the slot's FlowKey and of `flow`.
        unsafe { held.add(i).write_volatile(wanted.add(i).read()) };
        i += 1;
    }
    unsafe {
        (&raw mut (*slot).backend_id).write_volatile(id);
        (&raw mut (*slot).check).write_volatile(half_open_check(hash, id));
    }
}
