//! `xdp_replay`: the driver of the benchmarks, which push frames through BPF_PROG_TEST_RUN —
//! `repeat` times on one frame (per-packet cost), or in live-frames mode (an in-kernel packet
//! generator, capacity). Both hand the same frame back run after run without undoing what the
//! program rewrote, so a NAT program would see its own output. This program writes the frame
//! template back first (cycling through the template's flows when asked, so that runs can be
//! new flows or many established ones), then tail-calls the program under test; with none
//! installed the frame goes to the kernel stack (XDP_PASS), which is how the kernel's own
//! forwarding and nftables are measured.

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS},
    helpers::bpf_get_smp_processor_id,
    macros::xdp,
    programs::XdpContext,
};
use slb_common::{
    replay_flow, REPLAY_FRAME_BYTES, REPLAY_SOURCE_ADDR_LOW_AT, REPLAY_SOURCE_PORT_AT,
};

use crate::maps::{REPLAY_COUNTER, REPLAY_TARGET, REPLAY_TEMPLATE};
use crate::packet::ptr_at;

#[xdp]
pub fn xdp_replay(ctx: XdpContext) -> u32 {
    let Some(template) = REPLAY_TEMPLATE.get(0) else {
        return XDP_ABORTED;
    };
    let Some(frame) = ptr_at::<[u8; REPLAY_FRAME_BYTES]>(&ctx, 0) else {
        return XDP_ABORTED;
    };
    // Word by word with volatile accesses: a plain copy becomes a memcpy call, and the
    // verifier does not follow packet pointers into it.
    let src = template.frame.as_ptr().cast::<u64>();
    let dst = frame.cast::<u64>();
    for i in 0..REPLAY_FRAME_BYTES / 8 {
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
    if template.flows > 1 {
        let Some(counter) = REPLAY_COUNTER.get_ptr_mut(0) else {
            return XDP_ABORTED;
        };
        let run = unsafe { *counter };
        unsafe { *counter = run.wrapping_add(1) };
        let per_flow = if template.packets_per_flow == 0 {
            1
        } else {
            template.packets_per_flow
        };
        let cpu = unsafe { bpf_get_smp_processor_id() };
        let (port, address_addend) = replay_flow((run / per_flow) % template.flows, cpu);
        // The L4 checksum is left as it was: slb updates checksums incrementally and never
        // checks them, so a stale one costs nothing and changes nothing it measures.
        unsafe {
            let port = port.to_be_bytes();
            (*frame)[REPLAY_SOURCE_PORT_AT] = port[0];
            (*frame)[REPLAY_SOURCE_PORT_AT + 1] = port[1];
            let at = REPLAY_SOURCE_ADDR_LOW_AT;
            let low = u16::from_be_bytes([(*frame)[at], (*frame)[at + 1]])
                .wrapping_add(address_addend)
                .to_be_bytes();
            (*frame)[at] = low[0];
            (*frame)[at + 1] = low[1];
        }
    }
    unsafe { REPLAY_TARGET.tail_call(&ctx, 0) };
    XDP_PASS
}
