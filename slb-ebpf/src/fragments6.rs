//! IPv6 fragments of TCP/UDP datagrams, as `fragments.rs` handles IPv4's: the first fragment
//! (offset 0, the one with the L4 header) takes the ordinary path and what it became is
//! recorded under the datagram's identity (source, destination, fragment identification,
//! protocol); later fragments get the same addresses. IPv6 fragments carry no checksum of
//! their own and the L4 checksum was fixed in the first fragment, so a later fragment needs
//! only its addresses and hop limit changed. A later fragment of ours whose first fragment was
//! not seen is dropped, never forwarded untranslated.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use slb_common::{
    addr_words, FlowKey, FragmentEntry6, FragmentKey6, GlobalCounters, FRAGMENT_DIRECT,
    FRAGMENT_DROP, FRAGMENT_PASS, FRAGMENT_TIMEOUT_NS, FRAGMENT_TO_CLIENT, FRAGMENT_TUNNEL,
    NAT_ADDRESS_F_BACKEND, NAT_ADDRESS_F_VIP, NO_BACKEND,
};

use crate::{
    balancer::present_backend,
    balancer6::hop_limit_expired,
    forward::{now_ns, route_ipv6, send, send_direct, Route},
    fragments::{sent_direct, stops_here, without_first, Sent},
    icmp6,
    maps::{FRAGMENTS6, NAT_ADDRESSES6, NEXT_HOP_BACKEND6, NEXT_HOP_CLIENT6},
    packet::{ptr_at, EthHdr, Ipv6Hdr, ETH_HDR_LEN, IPV6_HDR_LEN},
    tunnel,
};

/// The `slb_xdp6_fragment` program, to which `slb_xdp6` hands every IPv6 fragment after the
/// first (whose headers it has checked): a program of its own, as inlined into `slb_xdp6` the
/// fragment's two 16-byte keys would not fit its 512-byte stack.
#[xdp]
pub fn slb_xdp6_fragment(ctx: XdpContext) -> u32 {
    let Some(counters) = crate::maps::global_counters() else {
        return XDP_PASS;
    };
    // The fragment header is the farthest: its bounds cover the other two.
    let Some(fragment) = ptr_at::<FragmentHdr>(&ctx, ETH_HDR_LEN + IPV6_HDR_LEN) else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    let eth = ctx.data() as *mut EthHdr;
    let ip = (ctx.data() + ETH_HDR_LEN) as *mut Ipv6Hdr;
    later(&ctx, eth, ip, fragment, counters)
}

/// The fragment header (RFC 8200 §4.5).
#[repr(C)]
pub struct FragmentHdr {
    pub next_header: u8,
    pub reserved: u8,
    /// Offset in 8-byte units (13 bits), 2 reserved bits, the M (more fragments) flag.
    pub offset_flags: u16,
    /// Network order.
    pub id: u32,
}

pub const NEXTHDR_FRAGMENT: u8 = 44;
const MORE_FRAGMENTS: u16 = 1;
const OFFSET_MASK: u16 = 0xfff8;

/// Where a fragment stands in its datagram.
pub enum Place {
    /// Offset 0 and no more fragments: a whole datagram in a fragment header (RFC 6946).
    Atomic,
    /// Offset 0 with more to come: carries the L4 header.
    First,
    /// The rest.
    Later,
}

#[inline(always)]
pub fn place(offset_flags: u16) -> Place {
    let offset_flags = u16::from_be(offset_flags);
    match (
        offset_flags & OFFSET_MASK == 0,
        offset_flags & MORE_FRAGMENTS != 0,
    ) {
        (true, false) => Place::Atomic,
        (true, true) => Place::First,
        (false, _) => Place::Later,
    }
}

/// After the first fragment of `flow`'s datagram `id` went the ordinary path: records what it
/// became, as IPv4's `remember` does (the frame may even have become an ICMPv6 error in its
/// place).
#[inline(always)]
pub fn remember(
    ctx: &XdpContext,
    flow: &FlowKey,
    id: u32,
    sent: Sent,
    counters: &mut GlobalCounters,
) {
    let (flow_src, flow_dst) = (addr_words(&flow.src), addr_words(&flow.dst));
    let key = FragmentKey6::new(flow_src, flow_dst, id, flow.protocol);
    if let Some(action) = sent_direct(&sent) {
        record(&key, flow_src, flow_dst, action, sent.direct_to, counters);
        return;
    }
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN) else {
        record(
            &key,
            flow_src,
            flow_dst,
            FRAGMENT_DROP,
            NO_BACKEND,
            counters,
        );
        return;
    };
    let (src, dst, next) = unsafe { ((*ip).src, (*ip).dst, (*ip).next_header) };
    let action = if sent.verdict == XDP_DROP || next != NEXTHDR_FRAGMENT {
        FRAGMENT_DROP
    } else if src == flow_src && dst == flow_dst {
        FRAGMENT_PASS
    } else {
        sent.action
    };
    record(&key, src, dst, action, NO_BACKEND, counters);
}

/// A first fragment that is no listener's nor a reply: if its addresses are ours, its later
/// fragments pass as it does rather than be dropped as orphans.
#[inline(always)]
pub fn pass_first(flow: &FlowKey, id: u32, counters: &mut GlobalCounters) -> u32 {
    let (src, dst) = (addr_words(&flow.src), addr_words(&flow.dst));
    let key = FragmentKey6::new(src, dst, id, flow.protocol);
    if ours(&key) {
        record(&key, src, dst, FRAGMENT_PASS, NO_BACKEND, counters);
    }
    counters.fragments_passed += 1;
    XDP_PASS
}

#[inline(always)]
fn record(
    key: &FragmentKey6,
    src: [u32; 4],
    dst: [u32; 4],
    action: u32,
    backend_id: u32,
    counters: &mut GlobalCounters,
) {
    let entry = FragmentEntry6::new(src, dst, action, backend_id, now_ns());
    // An LRU insert fails only under memory pressure: the later fragments are then orphans.
    let _ = FRAGMENTS6.insert(key, &entry, 0);
    counters.fragments_tracked += 1;
}

/// Whether a packet with these addresses is a listener's or a backend's.
#[inline(always)]
fn ours(key: &FragmentKey6) -> bool {
    let flags = |addr: &slb_common::Addr| unsafe { NAT_ADDRESSES6.get(addr) };
    matches!(flags(&key.dst), Some(f) if f & NAT_ADDRESS_F_VIP != 0)
        || matches!(flags(&key.src), Some(f) if f & NAT_ADDRESS_F_BACKEND != 0)
}

/// A fragment after the first: it follows its datagram's entry.
#[inline(always)]
fn later(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
    fragment: *const FragmentHdr,
    counters: &mut GlobalCounters,
) -> u32 {
    let key = unsafe {
        FragmentKey6::new(
            (*ip).src,
            (*ip).dst,
            (*fragment).id,
            (*fragment).next_header,
        )
    };
    let now = now_ns();
    let entry = match FRAGMENTS6.get_ptr_mut(&key) {
        Some(e) if now.wrapping_sub(unsafe { (*e).created_ns }) < FRAGMENT_TIMEOUT_NS => e,
        _ => return without_first(ours(&key), counters),
    };
    let action = unsafe { (*entry).action };
    if let Some(verdict) = stops_here(action, counters) {
        return verdict;
    }
    let protocol = unsafe { (*fragment).next_header };
    if action == FRAGMENT_DIRECT || action == FRAGMENT_TUNNEL {
        let backend_id = unsafe { (*entry).backend_id };
        return later_direct(ctx, eth, ip, (backend_id, action), protocol, now, counters);
    }
    if hop_limit_expired(ip, counters) {
        return XDP_PASS;
    }
    let (new_src, new_dst) = unsafe {
        (
            *((&raw const (*entry).src) as *const [u32; 4]),
            *((&raw const (*entry).dst) as *const [u32; 4]),
        )
    };
    // A reply's first fragment filled this CPU's slot for the client; a balanced datagram's
    // next hop comes from the FIB (fragments are rare).
    let cache = if action == FRAGMENT_TO_CLIENT {
        NEXT_HOP_CLIENT6
            .get_ptr_mut(unsafe { &(*entry).dst })
            .unwrap_or(core::ptr::null_mut())
    } else {
        core::ptr::null_mut()
    };
    let route = route_ipv6(ctx, ip, new_dst, protocol, cache, now, counters);
    if let Route::TooBig(mtu) = route {
        return icmp6::reply_too_big(ctx, mtu, counters);
    }
    unsafe {
        (*ip).src = new_src;
        (*ip).dst = new_dst;
        (*ip).hop_limit -= 1;
    }
    send(ctx, eth, route, counters)
}

/// A later fragment of a DSR listener's datagram: unchanged, to its first fragment's backend
/// (encapsulated as it was with `FRAGMENT_TUNNEL`).
#[inline(always)]
fn later_direct(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *const Ipv6Hdr,
    (backend_id, action): (u32, u32),
    protocol: u8,
    now: u64,
    counters: &mut GlobalCounters,
) -> u32 {
    let Some(backend) = present_backend(backend_id) else {
        counters.lookup_failed_dropped += 1;
        return XDP_DROP;
    };
    let cache = NEXT_HOP_BACKEND6
        .get_ptr_mut(backend_id)
        .unwrap_or(core::ptr::null_mut());
    let route = route_ipv6(
        ctx,
        ip,
        addr_words(&backend.addr),
        protocol,
        cache,
        now,
        counters,
    );
    if action == FRAGMENT_TUNNEL {
        if let Some(verdict) = tunnel::too_big_ipv6(ctx, ip, &route, counters) {
            return verdict;
        }
        return tunnel::send_ipv6(ctx, ip, backend, route, counters);
    }
    send_direct(ctx, eth, route, counters)
}
