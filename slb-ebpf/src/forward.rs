//! Sending a rewritten IPv4 packet on its way: the next hop comes from a per-CPU cache or, at
//! most once a second per destination, from the kernel FIB (the largest single cost of the fast
//! path); then the packet leaves by XDP_TX or XDP_REDIRECT, or goes to the stack when only the
//! stack can proceed.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_ktime_get_ns, generated::bpf_fib_lookup},
    programs::XdpContext,
    EbpfContext,
};
use core::mem::{size_of, zeroed};

use crate::{
    maps::EGRESS,
    packet::{EthHdr, Ipv4Hdr},
};
use slb_common::{GlobalCounters, NextHop, NEXT_HOP_TTL_NS};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_BLACKHOLE: i64 = 1;
const BPF_FIB_LKUP_RET_UNREACHABLE: i64 = 2;
const BPF_FIB_LKUP_RET_PROHIBIT: i64 = 3;

/// Forwards the packet whose IPv4 header (already rewritten) is `ip`, counting the outcome.
/// `cache` (may be null) is this CPU's next-hop slot for the destination.
#[inline(always)]
pub fn forward_ipv4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *const Ipv4Hdr,
    protocol: u8,
    cache: *mut NextHop,
    counters: &mut GlobalCounters,
) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    let dst = unsafe { (*ip).dst };
    let now = unsafe { bpf_ktime_get_ns() };
    let cached = !cache.is_null()
        && unsafe {
            (*cache).ifindex != 0
                && (*cache).dst == dst
                && now.wrapping_sub((*cache).checked_ns) < NEXT_HOP_TTL_NS
        };
    let hop = if cached {
        counters.next_hop_cached += 1;
        unsafe { *cache }
    } else {
        counters.fib_lookups += 1;
        match fib_next_hop(ctx, ip, protocol, ingress, now, counters) {
            Ok(hop) => {
                if !cache.is_null() {
                    unsafe { *cache = hop };
                }
                hop
            }
            Err(action) => return action,
        }
    };
    let egress = hop.ifindex;
    if egress != ingress && EGRESS.get_ifindex(egress).is_none() {
        // An interface slb is not attached to: let the stack forward it.
        counters.fib_passed += 1;
        return xdp_action::XDP_PASS;
    }
    unsafe {
        (*eth).dst = hop.dmac;
        (*eth).src = hop.smac;
    }
    if egress == ingress {
        counters.tx += 1;
        return xdp_action::XDP_TX;
    }
    match EGRESS.redirect(egress, 0) {
        Ok(action) => {
            counters.redirected += 1;
            action
        }
        Err(_) => {
            counters.redirect_failed += 1;
            xdp_action::XDP_DROP
        }
    }
}

/// Asks the FIB; `Err` carries the verdict when the packet cannot take the fast path.
#[inline(always)]
fn fib_next_hop(
    ctx: &XdpContext,
    ip: *const Ipv4Hdr,
    protocol: u8,
    ingress: u32,
    now: u64,
    counters: &mut GlobalCounters,
) -> Result<NextHop, u32> {
    let mut params: FibParams = unsafe { zeroed() };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = protocol;
        params.__bindgen_anon_1.tot_len = u16::from_be((*ip).total_len);
        params.__bindgen_anon_2.tos = (*ip).tos;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst);
        params.ifindex = ingress;
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            dst: unsafe { (*ip).dst },
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
            checked_ns: now,
        }),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            counters.fib_dropped += 1;
            Err(xdp_action::XDP_DROP)
        }
        // No neighbour entry yet, destination is local, forwarding disabled, MTU exceeded: the
        // stack routes the rewritten packet (resolving ARP, or sending the ICMP error) itself.
        _ => {
            counters.fib_passed += 1;
            Err(xdp_action::XDP_PASS)
        }
    }
}
