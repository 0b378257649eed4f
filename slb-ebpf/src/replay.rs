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
    checksum::{apply, delta_u16},
    replay_flow, IPPROTO_TCP, REPLAY_FRAME_BYTES, REPLAY_SOURCE_ADDR_LOW_AT, REPLAY_SOURCE_PORT_AT,
};

const IPV4_PROTOCOL_AT: usize = 14 + 9;
const IPV4_CHECK_AT: usize = 14 + 10;

type Frame = [u8; REPLAY_FRAME_BYTES];

/// A 16-bit word of the frame as it sits in memory (network order bytes, native load).
#[inline(always)]
unsafe fn read_u16(frame: *const Frame, at: usize) -> u16 {
    unsafe { u16::from_ne_bytes([(*frame)[at], (*frame)[at + 1]]) }
}

#[inline(always)]
unsafe fn write_u16(frame: *mut Frame, at: usize, value: u16) {
    let bytes = value.to_ne_bytes();
    unsafe {
        (*frame)[at] = bytes[0];
        (*frame)[at + 1] = bytes[1];
    }
}

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
        // Checksums follow (the IPv4 header's, and the L4 one unless it is a UDP "none"): the
        // kernel stack drops frames whose header checksum is wrong.
        unsafe {
            let at = REPLAY_SOURCE_ADDR_LOW_AT;
            let old_low = read_u16(frame, at);
            let new_low = u16::from_be(old_low).wrapping_add(address_addend).to_be();
            let old_port = read_u16(frame, REPLAY_SOURCE_PORT_AT);
            let new_port = port.to_be();
            let address = delta_u16(old_low, new_low);
            write_u16(
                frame,
                IPV4_CHECK_AT,
                apply(read_u16(frame, IPV4_CHECK_AT), address),
            );
            let tcp = (*frame)[IPV4_PROTOCOL_AT] == IPPROTO_TCP;
            let l4_check_at = REPLAY_SOURCE_PORT_AT + if tcp { 16 } else { 6 };
            let l4_check = read_u16(frame, l4_check_at);
            if tcp || l4_check != 0 {
                let mut check = apply(l4_check, address + delta_u16(old_port, new_port));
                if !tcp && check == 0 {
                    check = 0xffff;
                }
                write_u16(frame, l4_check_at, check);
            }
            write_u16(frame, at, new_low);
            write_u16(frame, REPLAY_SOURCE_PORT_AT, new_port);
        }
    }
    unsafe { REPLAY_TARGET.tail_call(&ctx, 0) };
    XDP_PASS
}
