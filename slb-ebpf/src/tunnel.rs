//! Direct server return through a tunnel: the client's packet, unchanged, inside an outer IP
//! header from the listener's tunnel source to the backend (IPv4 in IPv4, RFC 2003; IPv6 in
//! IPv6, RFC 2473). The outer packet is routed like any other, so the backend may sit behind
//! gateways; the backend strips the outer header (`slb decap`) and answers the client from the
//! VIP itself. The outer header makes the packet longer: one that no longer fits the link is
//! answered with "fragmentation needed" (or Packet Too Big) naming the MTU less the outer
//! header, so the client's path MTU discovery shrinks its packets for the tunnel.

use aya_ebpf::{
    bindings::xdp_action::XDP_DROP, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext,
    EbpfContext,
};
use slb_common::{
    addr_words, mapped_ipv4, Backend, GlobalCounters, NextHop, IPPROTO_IPIP, IPPROTO_IPV6_IN_IP,
};

use crate::{
    forward::{send, Route},
    icmp::{self, checksum},
    icmp6,
    packet::{
        ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, IPV4_DONT_FRAGMENT,
        IPV4_HDR_LEN, IPV6_HDR_LEN,
    },
};

const OUTER_IPV4_LEN: usize = IPV4_HDR_LEN;
const OUTER_IPV6_LEN: usize = IPV6_HDR_LEN;
const OUTER_TTL: u8 = 64;
const IPV4_DONT_FRAGMENT_BE: u16 = IPV4_DONT_FRAGMENT.to_be();

/// Whether a packet of `inner_len` bytes still fits next hop `hop` with `overhead` bytes of
/// outer header; the MTU left for the inner packet when it does not.
#[inline(always)]
fn room(route: &Route, inner_len: usize, overhead: usize) -> Result<(), u16> {
    let mtu = match route {
        Route::Hop(NextHop { mtu, .. }) => *mtu,
        Route::TooBig(mtu) => *mtu,
        _ => return Ok(()),
    };
    if inner_len + overhead > usize::from(mtu) {
        return Err(mtu.saturating_sub(overhead as u16));
    }
    Ok(())
}

/// The verdict on the IPv4 packet in `ctx` (`ip`: its header) when it would not fit `route`
/// with the outer header: "fragmentation needed" with the MTU left for it when DF is set, else
/// dropped. `None` when it fits.
#[inline(always)]
pub fn too_big_ipv4(
    ctx: &XdpContext,
    ip: *const Ipv4Hdr,
    route: &Route,
    counters: &mut GlobalCounters,
) -> Option<u32> {
    let (inner_len, frag_off) = unsafe { (u16::from_be((*ip).total_len), (*ip).frag_off) };
    let mtu = room(route, usize::from(inner_len), OUTER_IPV4_LEN).err()?;
    if frag_off & IPV4_DONT_FRAGMENT_BE != 0 {
        return Some(icmp::reply_too_big(ctx, mtu, counters));
    }
    counters.dsr_too_big_dropped += 1;
    Some(XDP_DROP)
}

/// The verdict on the IPv6 packet in `ctx` when it would not fit `route` with the outer header:
/// Packet Too Big with the MTU left for it. `None` when it fits.
#[inline(always)]
pub fn too_big_ipv6(
    ctx: &XdpContext,
    ip: *const Ipv6Hdr,
    route: &Route,
    counters: &mut GlobalCounters,
) -> Option<u32> {
    let inner_len = OUTER_IPV6_LEN + usize::from(u16::from_be(unsafe { (*ip).payload_len }));
    let mtu = room(route, inner_len, OUTER_IPV6_LEN).err()?;
    Some(icmp6::reply_too_big(ctx, mtu, counters))
}

/// Sends the IPv4 packet in `ctx` (`ip`: its header; it fits `route` with the outer header, see
/// [`too_big_ipv4`]) to `backend` inside an outer IPv4 header.
#[inline(always)]
pub fn send_ipv4(
    ctx: &XdpContext,
    ip: *const Ipv4Hdr,
    backend: &Backend,
    route: Route,
    counters: &mut GlobalCounters,
) -> u32 {
    let (tos, inner_len, frag_off) =
        unsafe { ((*ip).tos, u16::from_be((*ip).total_len), (*ip).frag_off) };
    if let Some(verdict) = not_out_of_an_interface(&route, counters) {
        return verdict;
    }
    let Some((eth, macs)) = make_room(ctx, OUTER_IPV4_LEN, counters) else {
        return XDP_DROP;
    };
    let Some(outer) = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN) else {
        counters.tunnel_failed += 1;
        return XDP_DROP;
    };
    unsafe {
        write_eth(eth, &macs, ETH_P_IP);
        *outer = Ipv4Hdr {
            version_ihl: 0x45,
            tos,
            total_len: (inner_len + OUTER_IPV4_LEN as u16).to_be(),
            id: 0,
            // RFC 2003 §3.1: DF copied from the inner header.
            frag_off: frag_off & IPV4_DONT_FRAGMENT_BE,
            ttl: OUTER_TTL,
            protocol: IPPROTO_IPIP,
            check: 0,
            src: mapped_ipv4(&backend.tunnel_source),
            dst: mapped_ipv4(&backend.addr),
        };
        (*outer).check = checksum(outer as *const [u16; 10]);
    }
    counters.tunnel_encapsulated += 1;
    send(ctx, eth, route, counters)
}

/// [`send_ipv4`] for the IPv6 packet whose header is `ip`: inside an outer IPv6 header.
#[inline(always)]
pub fn send_ipv6(
    ctx: &XdpContext,
    ip: *const Ipv6Hdr,
    backend: &Backend,
    route: Route,
    counters: &mut GlobalCounters,
) -> u32 {
    let (version_class_flow, payload_len) =
        unsafe { ((*ip).version_class_flow, u16::from_be((*ip).payload_len)) };
    let inner_len = OUTER_IPV6_LEN as u16 + payload_len;
    if let Some(verdict) = not_out_of_an_interface(&route, counters) {
        return verdict;
    }
    let Some((eth, macs)) = make_room(ctx, OUTER_IPV6_LEN, counters) else {
        return XDP_DROP;
    };
    let Some(outer) = ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN) else {
        counters.tunnel_failed += 1;
        return XDP_DROP;
    };
    unsafe {
        write_eth(eth, &macs, ETH_P_IPV6);
        // Traffic class and flow label as the client set them (the label spreads the
        // backends' receive load as the client's flows do).
        (*outer).version_class_flow = version_class_flow;
        (*outer).payload_len = inner_len.to_be();
        (*outer).next_header = IPPROTO_IPV6_IN_IP;
        (*outer).hop_limit = OUTER_TTL;
        // Word by word: whole 16-byte copies into the header became `memmove` calls.
        let (src, dst) = (
            addr_words(&backend.tunnel_source),
            addr_words(&backend.addr),
        );
        for i in 0..4 {
            core::ptr::write_volatile(&raw mut (*outer).src[i], src[i]);
            core::ptr::write_volatile(&raw mut (*outer).dst[i], dst[i]);
        }
    }
    counters.tunnel_encapsulated += 1;
    send(ctx, eth, route, counters)
}

/// The verdict on a packet whose route is not out of an interface, counted: the kernel would
/// drop a packet from `tunnel_source`, one of its own addresses, as a martian, so none is
/// handed to it (an unresolved next hop waits for the health checks to resolve it).
#[inline(always)]
fn not_out_of_an_interface(route: &Route, counters: &mut GlobalCounters) -> Option<u32> {
    match route {
        Route::Hop(_) => return None,
        Route::Stack => counters.dsr_next_hop_unresolved += 1,
        Route::Drop => counters.fib_dropped += 1,
        // Too big was answered before; the backend is this host.
        Route::TooBig(_) | Route::Local => counters.tunnel_failed += 1,
    }
    Some(XDP_DROP)
}

/// The frame's MAC addresses, kept across the move.
struct Macs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// Grows the frame by `outer_len` bytes in front: the Ethernet header then moves there (written
/// by the caller from the returned addresses), and the outer header takes its old place and
/// what was added.
#[inline(always)]
fn make_room(
    ctx: &XdpContext,
    outer_len: usize,
    counters: &mut GlobalCounters,
) -> Option<(*mut EthHdr, Macs)> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        counters.tunnel_failed += 1;
        return None;
    };
    let macs = unsafe {
        Macs {
            dst: (*eth).dst,
            src: (*eth).src,
        }
    };
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(outer_len as i32)) } != 0 {
        counters.tunnel_failed += 1;
        return None;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        counters.tunnel_failed += 1;
        return None;
    };
    Some((eth, macs))
}

#[inline(always)]
unsafe fn write_eth(eth: *mut EthHdr, macs: &Macs, ether_type: u16) {
    unsafe {
        (*eth).dst = macs.dst;
        (*eth).src = macs.src;
        (*eth).ether_type = ether_type.to_be();
    }
}
