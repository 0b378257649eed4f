//! `xdp_floor`: the cheapest useful XDP program — swap the MAC addresses and send the frame back
//! out. Benchmarks report slb's per-packet cost against it.

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};

use crate::packet::{ptr_at, EthHdr};

#[xdp]
pub fn xdp_floor(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return XDP_PASS;
    };
    unsafe {
        let dst = (*eth).dst;
        (*eth).dst = (*eth).src;
        (*eth).src = dst;
    }
    XDP_TX
}
