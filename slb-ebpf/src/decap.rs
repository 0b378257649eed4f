//! `slb_decap`: strips the outer header of packets tunnelled by slb (IPv4 in IPv4, IPv6 in
//! IPv6) from an accepted source to an accepted VIP, and hands the client's packet to the stack,
//! which delivers it to the VIP on the backend's loopback. This kernel needs no tunnel device
//! for it. Every other packet passes untouched.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    btf_maps::{HashMap, PerCpuArray},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{btf_map, xdp},
    programs::XdpContext,
    EbpfContext,
};
use slb_common::{
    addr_from_words, ipv4_mapped, Addr, DecapCounters, IPPROTO_IPIP, IPPROTO_IPV6_IN_IP,
    MAX_DECAP_ADDRESSES,
};

use crate::packet::{
    ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, IPV4_FRAGMENT_MASK,
    IPV4_HDR_LEN, IPV6_HDR_LEN,
};

const ADDRESSES: usize = MAX_DECAP_ADDRESSES as usize;

/// Outer source addresses accepted (IPv4-mapped for IPv4): the slb nodes' tunnel sources.
#[btf_map]
static DECAP_SOURCES: HashMap<Addr, u32, ADDRESSES> = HashMap::new();

/// Inner destination addresses accepted: the VIPs this backend serves.
#[btf_map]
static DECAP_VIPS: HashMap<Addr, u32, ADDRESSES> = HashMap::new();

#[btf_map]
static DECAP_STATS: PerCpuArray<DecapCounters, 1> = PerCpuArray::new();

#[xdp]
pub fn slb_decap(ctx: XdpContext) -> u32 {
    let Some(counters) = DECAP_STATS.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    // SAFETY: this CPU's slot; XDP programs do not nest on a CPU.
    let counters = unsafe { &mut *counters };
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return XDP_PASS;
    };
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => decapsulate_ipv4(&ctx, counters),
        ETH_P_IPV6 => decapsulate_ipv6(&ctx, counters),
        _ => XDP_PASS,
    }
}

#[inline(always)]
fn decapsulate_ipv4(ctx: &XdpContext, counters: &mut DecapCounters) -> u32 {
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN) else {
        return XDP_PASS;
    };
    if unsafe { (*outer).protocol } != IPPROTO_IPIP {
        return XDP_PASS;
    }
    let inner = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN + IPV4_HDR_LEN);
    let (version_ihl, frag_off) = unsafe { ((*outer).version_ihl, (*outer).frag_off) };
    let Some(inner) =
        inner.filter(|_| version_ihl == 0x45 && u16::from_be(frag_off) & IPV4_FRAGMENT_MASK == 0)
    else {
        counters.unhandled += 1;
        return XDP_PASS;
    };
    let (source, vip) = unsafe { (ipv4_mapped((*outer).src), ipv4_mapped((*inner).dst)) };
    if let Some(verdict) = refused(&source, &vip, counters) {
        return verdict;
    }
    strip(ctx, IPV4_HDR_LEN, ETH_P_IP, counters)
}

#[inline(always)]
fn decapsulate_ipv6(ctx: &XdpContext, counters: &mut DecapCounters) -> u32 {
    let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN) else {
        return XDP_PASS;
    };
    if unsafe { (*outer).next_header } != IPPROTO_IPV6_IN_IP {
        return XDP_PASS;
    }
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN + IPV6_HDR_LEN) else {
        counters.unhandled += 1;
        return XDP_PASS;
    };
    let (source, vip) = unsafe { (addr_from_words((*outer).src), addr_from_words((*inner).dst)) };
    if let Some(verdict) = refused(&source, &vip, counters) {
        return verdict;
    }
    strip(ctx, IPV6_HDR_LEN, ETH_P_IPV6, counters)
}

/// The verdict on a tunnelled packet from `source` to `vip` that is not accepted (passed as it
/// is, counted); `None` when it is.
#[inline(always)]
fn refused(source: &Addr, vip: &Addr, counters: &mut DecapCounters) -> Option<u32> {
    if unsafe { DECAP_SOURCES.get(source) }.is_none() {
        counters.refused_source += 1;
        return Some(XDP_PASS);
    }
    if unsafe { DECAP_VIPS.get(vip) }.is_none() {
        counters.refused_vip += 1;
        return Some(XDP_PASS);
    }
    None
}

/// Removes the `outer_len`-byte outer header behind the Ethernet header, which moves up to the
/// inner packet with `ether_type`.
#[inline(always)]
fn strip(ctx: &XdpContext, outer_len: usize, ether_type: u16, counters: &mut DecapCounters) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        counters.unhandled += 1;
        return XDP_PASS;
    };
    let (dst, src) = unsafe { ((*eth).dst, (*eth).src) };
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, outer_len as i32) } != 0 {
        counters.unhandled += 1;
        return XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        // Cannot happen (the inner header was there); the frame is no longer whole.
        counters.unhandled += 1;
        return aya_ebpf::bindings::xdp_action::XDP_DROP;
    };
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
        (*eth).ether_type = ether_type.to_be();
    }
    counters.decapsulated += 1;
    XDP_PASS
}
