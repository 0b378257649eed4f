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
    replay_flow, IPPROTO_TCP, REPLAY_FRAME_BYTES, REPLAY_MIN_FRAME_BYTES,
};

use crate::maps::{REPLAY_COUNTER, REPLAY_TARGET, REPLAY_TEMPLATE};
use crate::packet::ptr_at;

/// The 16-bit word of the frame at `at` (a template's field offset, inside the template's
/// frame): bounds-checked against the frame, and masked to the template's room first, because
/// the verifier only accepts a packet bound check whose variable offset it knows to be small
/// (a u16 from a map could reach 65535).
#[inline(always)]
fn word_at(ctx: &XdpContext, at: u16) -> Option<*mut u16> {
    const _: () = assert!(REPLAY_FRAME_BYTES.is_power_of_two());
    ptr_at::<u16>(ctx, usize::from(at) & (REPLAY_FRAME_BYTES - 1))
}

#[xdp]
pub fn xdp_replay(ctx: XdpContext) -> u32 {
    let Some(template) = REPLAY_TEMPLATE.get(0) else {
        return XDP_ABORTED;
    };
    // Word by word with volatile accesses: a plain copy becomes a memcpy call, and the
    // verifier does not follow packet pointers into it. The first 64 bytes under one bound check
    // (every frame has them: IPv4 frames are exactly that, and cost what they did before IPv6
    // frames needed more room), then as many more words as the frame holds (the caller sends
    // the template's `frame_bytes`).
    let Some(head) = ptr_at::<[u8; REPLAY_MIN_FRAME_BYTES]>(&ctx, 0) else {
        return XDP_ABORTED;
    };
    let src = template.frame.as_ptr().cast::<u64>();
    let dst = head.cast::<u64>();
    for i in 0..REPLAY_MIN_FRAME_BYTES / 8 {
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
    }
    for i in REPLAY_MIN_FRAME_BYTES / 8..REPLAY_FRAME_BYTES / 8 {
        let Some(dst) = ptr_at::<u64>(&ctx, i * 8) else {
            break;
        };
        unsafe { dst.write_volatile(src.add(i).read_volatile()) };
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
        let (Some(addr_low), Some(source_port), Some(l4_check)) = (
            word_at(&ctx, template.source_addr_low_at),
            word_at(&ctx, template.source_port_at),
            word_at(&ctx, template.l4_check_at),
        ) else {
            return XDP_ABORTED;
        };
        // Checksums follow (the IPv4 header's, and the L4 one unless it is a UDP "none"): the
        // kernel stack drops frames whose checksums are wrong. Words are kept in network order
        // (loaded natively), as the checksum helpers take them.
        unsafe {
            let old_low = addr_low.read_unaligned();
            let new_low = u16::from_be(old_low).wrapping_add(address_addend).to_be();
            let old_port = source_port.read_unaligned();
            let new_port = port.to_be();
            let address = delta_u16(old_low, new_low);
            if template.ipv4_check_at != 0 {
                let Some(ipv4_check) = word_at(&ctx, template.ipv4_check_at) else {
                    return XDP_ABORTED;
                };
                ipv4_check.write_unaligned(apply(ipv4_check.read_unaligned(), address));
            }
            let tcp = template.l4_protocol == IPPROTO_TCP;
            let old_check = l4_check.read_unaligned();
            if tcp || old_check != 0 {
                let mut check = apply(old_check, address + delta_u16(old_port, new_port));
                if !tcp && check == 0 {
                    check = 0xffff;
                }
                l4_check.write_unaligned(check);
            }
            addr_low.write_unaligned(new_low);
            source_port.write_unaligned(new_port);
        }
    }
    unsafe { REPLAY_TARGET.tail_call(&ctx, 0) };
    XDP_PASS
}
