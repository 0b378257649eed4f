//! `slb_xdp_pick`: where a flow that opens on a listener placed by load (least connections,
//! `max_connections`) gets its backend. The scan of the listener's backends needs more stack
//! than the balancing programs have left, and a tail call starts on a fresh stack; so the
//! balancing program leaves the question in this CPU's `PICK_SCRATCH` entry and hands the
//! frame here, and this program leaves the answer there and hands the frame back to the
//! balancing program, which runs again from the start, unchanged frame and all, and takes the
//! answer when it reaches the same question. Nothing between a program's start and the
//! question is written, so the second run does what the first did.

use aya_ebpf::{bindings::xdp_action::XDP_DROP, macros::xdp, programs::XdpContext};
use slb_common::{Addr, FlowKey, ListenerEntry, PROGRAM_SLOT_PICK};

use crate::{
    balancer::{new_flow_choice, Refusal},
    forward::now_ns,
    maps::{PICK_SCRATCH, PROGRAMS},
    words,
};

/// Nothing asked.
const IDLE: u32 = 0;
/// A balancing program asked about `flow` and handed the frame to `slb_xdp_pick`.
const ASKED: u32 = 1;
/// `slb_xdp_pick` answered (`answer`) and handed the frame back.
const ANSWERED: u32 = 2;

/// One question and its answer, per CPU (a tail call stays on its CPU, and XDP programs do not
/// nest on one).
#[repr(C)]
pub struct PickScratch {
    flow: FlowKey,
    client: Addr,
    listener: ListenerEntry,
    hash_how: u64,
    now: u64,
    back_slot: u32,
    state: u32,
    /// `Ok(id)` as the id, `Err(refusal)` as `1 << 32 | refusal`.
    answer: u64,
}

/// The backend of `flow`, which opens here on a listener placed by load: the answer
/// `slb_xdp_pick` left for it, or else the question left for it and the frame handed to it
/// (this call then does not return: the frame comes back to `BACK_SLOT`). `LookupFailed` when
/// the hand-over fails.
#[inline(always)]
pub(crate) fn decided<const BACK_SLOT: u32>(
    ctx: &XdpContext,
    flow: &FlowKey,
    client: &Addr,
    listener: &ListenerEntry,
    hash_how: u64,
) -> Result<u32, Refusal> {
    let answer = answer_or_ask(flow, client, listener, hash_how, BACK_SLOT);
    if answer != UNANSWERED {
        return decode(answer);
    }
    // Here, in the program's own body: a tail call from a BPF call would need the callers'
    // frames under 256 bytes.
    unsafe { PROGRAMS.tail_call(ctx, PROGRAM_SLOT_PICK) };
    Err(Refusal::LookupFailed)
}

/// `answer_or_ask`'s "no answer yet: asked".
const UNANSWERED: u64 = u64::MAX;

/// The answer left for `flow` (taken), or else [`UNANSWERED`] with the question about `flow`
/// left in this CPU's scratch entry. A call of its own: inlined, its registers pushed the
/// balancing programs past 512 bytes of stack.
#[inline(never)]
fn answer_or_ask(
    flow: &FlowKey,
    client: &Addr,
    listener: &ListenerEntry,
    hash_how: u64,
    back_slot: u32,
) -> u64 {
    let Some(scratch) = PICK_SCRATCH.get_ptr_mut(0) else {
        return encode(Err(Refusal::LookupFailed));
    };
    unsafe {
        if (*scratch).state == ANSWERED && words::same(&raw const (*scratch).flow, flow) {
            (*scratch).state = IDLE;
            return (*scratch).answer;
        }
        words::copy(&raw mut (*scratch).flow, flow);
        words::copy(&raw mut (*scratch).listener, listener);
        // Byte by byte: an address may sit anywhere on the caller's stack.
        let to = (&raw mut (*scratch).client).cast::<u8>();
        let mut i = 0;
        while i < 16 {
            to.add(i).write_volatile(client[i]);
            i += 1;
        }
        (*scratch).hash_how = hash_how;
        (*scratch).now = now_ns();
        (*scratch).back_slot = back_slot;
        (*scratch).state = ASKED;
    }
    UNANSWERED
}

#[xdp]
pub fn slb_xdp_pick(ctx: XdpContext) -> u32 {
    let Some(counters) = crate::maps::global_counters() else {
        return XDP_DROP;
    };
    let Some(scratch) = PICK_SCRATCH.get_ptr_mut(0) else {
        counters.lookup_failed_dropped += 1;
        return XDP_DROP;
    };
    let scratch = unsafe { &mut *scratch };
    if scratch.state != ASKED {
        counters.lookup_failed_dropped += 1;
        return XDP_DROP;
    }
    let chosen = new_flow_choice::<true>(
        &scratch.client,
        scratch.hash_how,
        &scratch.listener,
        scratch.now,
        counters,
    );
    scratch.answer = encode(chosen);
    scratch.state = ANSWERED;
    let back = scratch.back_slot;
    unsafe { PROGRAMS.tail_call(&ctx, back) };
    scratch.state = IDLE;
    counters.lookup_failed_dropped += 1;
    XDP_DROP
}

#[inline(always)]
fn encode(chosen: Result<u32, Refusal>) -> u64 {
    match chosen {
        Ok(id) => u64::from(id),
        Err(refusal) => 1 << 32 | refusal as u64,
    }
}

#[inline(always)]
fn decode(answer: u64) -> Result<u32, Refusal> {
    if answer >> 32 == 0 {
        return Ok(answer as u32);
    }
    Err(match answer as u32 {
        x if x == Refusal::NoBackend as u32 => Refusal::NoBackend,
        x if x == Refusal::RateLimited as u32 => Refusal::RateLimited,
        x if x == Refusal::AtCapacity as u32 => Refusal::AtCapacity,
        _ => Refusal::LookupFailed,
    })
}
