//! `xdp_replay`: the driver of the capacity benchmark, which pushes frames through
//! BPF_PROG_TEST_RUN in live-frames mode (an in-kernel packet generator). That mode hands the
//! same pages back run after run without undoing what the program rewrote, so a NAT program
//! would see its own output. This program writes the frame template back first (with a new
//! source port per run when asked, so every frame is a new flow), then tail-calls the program
//! under test; with none installed the frame goes to the kernel stack (XDP_PASS), which is how
//! the kernel's own forwarding and nftables are measured.

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use slb_common::{REPLAY_FRAME_BYTES, REPLAY_SOURCE_PORT_AT};

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
    if template.new_flows != 0 {
        if let Some(counter) = REPLAY_COUNTER.get_ptr_mut(0) {
            unsafe {
                *counter = (*counter).wrapping_add(1);
                // Ports 1024..=65535; the template's UDP checksum is 0 (none), so no fix-up.
                let port = (1024 + (*counter % 64512) as u16).to_be_bytes();
                (*frame)[REPLAY_SOURCE_PORT_AT] = port[0];
                (*frame)[REPLAY_SOURCE_PORT_AT + 1] = port[1];
            }
        }
    }
    unsafe { REPLAY_TARGET.tail_call(&ctx, 0) };
    XDP_PASS
}
