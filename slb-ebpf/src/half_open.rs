//! The half-open table: where a TCP flow's pick waits between its first packet and its next
//! non-SYN one (see `slb_common::HalfOpen`). An array slot per flow hash, read and written in
//! place: no LRU insert (its eviction was most of a new flow's cost), no lock. Two CPUs may
//! write one slot at once for two flows; the slot's check then fails and it reads as empty.

use slb_common::{half_open_check, half_open_slot, FlowKey};

use crate::{maps::HALF_OPEN, words};

/// The backend picked for `flow` (hash `hash`) when its slot still holds it.
#[inline(always)]
pub fn picked(flow: &FlowKey, hash: u32) -> Option<u32> {
    let slot = HALF_OPEN.get(half_open_slot(hash))?;
    // SAFETY: both are FlowKeys.
    if !unsafe { words::same(&slot.flow, flow) } {
        return None;
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
    unsafe {
        words::copy(&raw mut (*slot).flow, flow);
        (&raw mut (*slot).backend_id).write_volatile(id);
        (&raw mut (*slot).check).write_volatile(half_open_check(hash, id));
    }
}
