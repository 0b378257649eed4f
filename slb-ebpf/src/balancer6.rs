//! The `slb_xdp6` program, to which `slb_xdp` hands every IPv6 frame: the same path (parse →
//! listener → connection/ring → rewrite → forward → count) and the same policy and tables as
//! IPv4 (flows and endpoints are keyed by 16-byte addresses already). A program of its own
//! because, inlined into `slb_xdp`, its 16-byte addresses would not fit the 512-byte stack.
//!
//! What IPv6 does differently: no header checksum (the L4 checksum alone covers the addresses),
//! a hop limit in place of the TTL, no fragmentation by routers (a packet too big is always
//! answered with Packet Too Big), and extension headers, which the fast path does not walk.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use core::ops::ControlFlow;
use slb_common::{
    addr_from_words, addr_words,
    checksum::{apply, delta_addr_words, delta_u16},
    ipv6_filter_fold, ipv6_persistence_client, BackendEndpoint, FlowKey, GlobalCounters,
    ListenerEntry, ListenerKey, ReplyNat, ENDPOINT_F_BACKEND, ENDPOINT_F_LISTENER,
    FRAGMENT_TO_CLIENT, IPPROTO_TCP, IPPROTO_UDP, LISTENER_F_DSR, LISTENER_F_TUNNEL, NO_BACKEND,
    PROGRAM_SLOT_IPV6_FRAGMENT, PROGRAM_SLOT_IPV6_ICMP,
};

use crate::{
    balancer::{count_traffic, endpoint_may_be, l4_header, pick_backend, Endpoint, L4},
    forward::{cache_slot, now_ns, route_ipv6, send, send_direct, Route},
    fragments::{to_backend_action, Sent},
    fragments6::{self, FragmentHdr, NEXTHDR_FRAGMENT},
    icmp6::{self, IPPROTO_ICMPV6},
    maps::{LISTENERS, NEXT_HOP_BACKEND6, NEXT_HOP_CLIENT6, PROGRAMS, REPLY_NAT},
    packet::{ptr_at, EthHdr, Ipv6Hdr, ETH_HDR_LEN, IPV6_HDR_LEN},
    tunnel,
};

/// Extension headers (RFC 8200 §4, IANA's list) that may stand between the IPv6 header and
/// TCP/UDP, but for the fragment header, which is followed: hop-by-hop, routing, destination
/// options, AH, mobility, HIP, shim6, and the two experimental numbers.
const EXTENSION_HEADERS: [u8; 9] = [0, 43, 60, 51, 135, 139, 140, 253, 254];

#[xdp]
pub fn slb_xdp6(ctx: XdpContext) -> u32 {
    let Some(counters) = crate::maps::global_counters() else {
        return XDP_PASS;
    };
    balance(&ctx, counters)
}

#[inline(always)]
fn balance(ctx: &XdpContext, counters: &mut GlobalCounters) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    let header = match parse_ipv6(ctx, counters) {
        ControlFlow::Continue(header) => header,
        ControlFlow::Break(verdict) => return verdict,
    };
    let (l4, flow) = match parse_l4(ctx, &header, counters) {
        ControlFlow::Continue(parsed) => parsed,
        ControlFlow::Break(verdict) => return verdict,
    };
    dispatch(ctx, eth, &header, &l4, &flow, counters)
}

/// An IPv6 header that passed the checks, followed by TCP or UDP (directly, or after the
/// fragment header of a datagram's first fragment or of an atomic fragment).
struct Ipv6Header {
    ip: *mut Ipv6Hdr,
    protocol: u8,
    /// Where the TCP/UDP header starts in the frame.
    l4_offset: usize,
    /// Bytes from there to the end of the packet, as the header says (within the frame).
    l4_len: usize,
    /// The first fragment of the datagram with this identification.
    first_fragment_of: Option<u32>,
}

/// The IPv6 header, or the verdict on a packet that does not go on to the listener lookups:
/// malformed, with an extension header, ICMPv6 (translated as an error about a balanced flow),
/// a later fragment (which follows its first one), or neither TCP nor UDP.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, counters: &mut GlobalCounters) -> ControlFlow<u32, Ipv6Header> {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN) else {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    };
    let (version_class_flow, payload_len, next_header, src_first_word) = unsafe {
        (
            u32::from_be((*ip).version_class_flow),
            usize::from(u16::from_be((*ip).payload_len)),
            (*ip).next_header,
            u32::from_be((*ip).src[0]),
        )
    };
    // What the kernel's own IPv6 input would discard is never rewritten or given state: a
    // wrong version, a payload longer than the frame, a multicast source. (A jumbogram's zero
    // payload length comes with a hop-by-hop header, which is passed below.)
    let frame_payload_len = ctx.data_end() - ctx.data() - ETH_HDR_LEN - IPV6_HDR_LEN;
    if version_class_flow >> 28 != 6
        || payload_len > frame_payload_len
        || src_first_word >> 24 == 0xff
    {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    }
    match next_header {
        IPPROTO_TCP | IPPROTO_UDP => ControlFlow::Continue(Ipv6Header {
            ip,
            protocol: next_header,
            l4_offset: ETH_HDR_LEN + IPV6_HDR_LEN,
            l4_len: payload_len,
            first_fragment_of: None,
        }),
        NEXTHDR_FRAGMENT => parse_fragment(ctx, ip, payload_len, counters),
        _ if EXTENSION_HEADERS.contains(&next_header) => {
            counters.ipv6_extension_headers_passed += 1;
            ControlFlow::Break(XDP_PASS)
        }
        // Errors about balanced flows are translated; neighbour discovery, router
        // advertisements, echo and MLD are the stack's.
        IPPROTO_ICMPV6 => {
            // Returns only when PROGRAMS has no `slb_xdp6_icmp`.
            unsafe { PROGRAMS.tail_call(ctx, PROGRAM_SLOT_IPV6_ICMP) };
            counters.ipv6_passed += 1;
            ControlFlow::Break(XDP_PASS)
        }
        _ => {
            counters.not_for_us_passed += 1;
            ControlFlow::Break(XDP_PASS)
        }
    }
}

/// A packet with a fragment header: its first fragment (or an atomic fragment) goes on to the
/// listener lookups; a later fragment follows its first one.
#[inline(always)]
fn parse_fragment(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    payload_len: usize,
    counters: &mut GlobalCounters,
) -> ControlFlow<u32, Ipv6Header> {
    let fragment_len = core::mem::size_of::<FragmentHdr>();
    let Some(fragment) = ptr_at::<FragmentHdr>(ctx, ETH_HDR_LEN + IPV6_HDR_LEN) else {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    };
    let Some(l4_len) = payload_len.checked_sub(fragment_len) else {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    };
    let (protocol, offset_flags, id) = unsafe {
        (
            (*fragment).next_header,
            (*fragment).offset_flags,
            (*fragment).id,
        )
    };
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        counters.fragments_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    }
    let first_fragment_of = match fragments6::place(offset_flags) {
        fragments6::Place::Later => {
            // Returns only when PROGRAMS has no `slb_xdp6_fragment`.
            unsafe { PROGRAMS.tail_call(ctx, PROGRAM_SLOT_IPV6_FRAGMENT) };
            counters.ipv6_passed += 1;
            return ControlFlow::Break(XDP_PASS);
        }
        fragments6::Place::Atomic => None,
        fragments6::Place::First => Some(id),
    };
    ControlFlow::Continue(Ipv6Header {
        ip,
        protocol,
        l4_offset: ETH_HDR_LEN + IPV6_HDR_LEN + fragment_len,
        l4_len,
        first_fragment_of,
    })
}

/// The L4 header and the flow, or the verdict on a packet too short for its L4 header or
/// (cheaply told) for no listener nor backend.
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    header: &Ipv6Header,
    counters: &mut GlobalCounters,
) -> ControlFlow<u32, (L4, FlowKey)> {
    let protocol = header.protocol;
    let first_fragment = header.first_fragment_of.is_some();
    let Some(mut l4) = l4_header(
        ctx,
        header.l4_offset,
        protocol,
        header.l4_len,
        first_fragment,
    ) else {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    };
    // IPv6 has no header checksum, so UDP's is mandatory (RFC 8200 §8.1): a zero is malformed.
    if protocol == IPPROTO_UDP && unsafe { *l4.check } == 0 {
        l4.valid = false;
    }
    let (src, dst, src_port, dst_port) = unsafe {
        (
            (*header.ip).src,
            (*header.ip).dst,
            u16::from_be((*l4.ports).src),
            u16::from_be((*l4.ports).dst),
        )
    };
    // First fragments take the full path: their later fragments follow what they did.
    if !first_fragment
        && !endpoint_may_be(
            ipv6_filter_fold(dst),
            dst_port,
            protocol,
            ENDPOINT_F_LISTENER,
        )
        && !endpoint_may_be(
            ipv6_filter_fold(src),
            src_port,
            protocol,
            ENDPOINT_F_BACKEND,
        )
    {
        counters.not_for_us_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    }
    ControlFlow::Continue((l4, FlowKey::ipv6(src, dst, src_port, dst_port, protocol)))
}

/// To a listener: balanced to a backend. From a backend's endpoint: a reply translated back to
/// the VIP. Anything else passes.
#[inline(always)]
fn dispatch(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    header: &Ipv6Header,
    l4: &L4,
    flow: &FlowKey,
    counters: &mut GlobalCounters,
) -> u32 {
    let ip = header.ip;
    let listener_key = ListenerKey {
        vip: flow.dst,
        port: flow.dst_port,
        protocol: flow.protocol,
        _pad: 0,
    };
    if let Some(listener) = unsafe { LISTENERS.get(&listener_key) } {
        let listener = *listener;
        if !l4.valid {
            counters.malformed += 1;
            return XDP_DROP;
        }
        if !crate::policy::acl_admits(flow, &listener, l4.tcp_flags, counters) {
            return XDP_DROP;
        }
        let mut sent_direct_to = NO_BACKEND;
        let verdict = to_backend(
            ctx,
            eth,
            ip,
            l4,
            flow,
            &listener,
            &mut sent_direct_to,
            counters,
        );
        if let Some(id) = header.first_fragment_of {
            let sent = Sent {
                verdict,
                action: to_backend_action(listener.flags),
                direct_to: sent_direct_to,
            };
            fragments6::remember(ctx, flow, id, sent, counters);
        }
        return verdict;
    }
    let endpoint = BackendEndpoint {
        addr: flow.src,
        port: flow.src_port,
        protocol: flow.protocol,
        _pad: 0,
    };
    if let Some(nat) = unsafe { REPLY_NAT.get(&endpoint) } {
        let nat = *nat;
        if !l4.valid {
            counters.malformed += 1;
            return XDP_DROP;
        }
        let verdict = to_client(ctx, eth, ip, l4, &nat, counters);
        if let Some(id) = header.first_fragment_of {
            let sent = Sent {
                verdict,
                action: FRAGMENT_TO_CLIENT,
                direct_to: NO_BACKEND,
            };
            fragments6::remember(ctx, flow, id, sent, counters);
        }
        return verdict;
    }
    if let Some(id) = header.first_fragment_of {
        return fragments6::pass_first(flow, id, counters);
    }
    counters.not_for_us_passed += 1;
    XDP_PASS
}

/// As IPv4's `to_backend`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
    l4: &L4,
    flow: &FlowKey,
    listener: &ListenerEntry,
    sent_direct_to: &mut u32,
    counters: &mut GlobalCounters,
) -> u32 {
    if hop_limit_expired(ip, counters) {
        return XDP_PASS;
    }
    let now = now_ns();
    let client = ipv6_persistence_client(flow, listener);
    let picked = pick_backend::<{ slb_common::PROGRAM_SLOT_IPV6 }>(
        ctx,
        flow,
        &client,
        listener,
        l4.tcp_flags,
        now,
        counters,
    );
    let Some((id, backend, new_flow)) = picked.or_count(counters) else {
        return XDP_DROP;
    };
    let cache = NEXT_HOP_BACKEND6
        .get_ptr_mut(id)
        .unwrap_or(core::ptr::null_mut());
    let backend_addr = addr_words(&backend.addr);
    let route = route_ipv6(ctx, ip, backend_addr, l4.protocol, cache, now, counters);
    let tunnel = listener.flags & LISTENER_F_TUNNEL != 0;
    if tunnel {
        if let Some(verdict) = tunnel::too_big_ipv6(ctx, ip, &route, counters) {
            return verdict;
        }
    } else if let Route::TooBig(mtu) = route {
        return icmp6::reply_too_big(ctx, mtu, counters);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(listener.index, id, bytes, new_flow);
    if listener.flags & LISTENER_F_DSR != 0 {
        *sent_direct_to = id;
        if tunnel {
            return tunnel::send_ipv6(ctx, ip, backend, route, counters);
        }
        return send_direct(ctx, eth, route, counters);
    }
    unsafe { translate(ip, l4, Endpoint::Destination, backend_addr, backend.port) };
    send(ctx, eth, route, counters)
}

/// A packet from a backend's endpoint: a reply to translate back to the VIP, unless it is for
/// this host (a health check's or the proxy's own connection to the backend).
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
    l4: &L4,
    nat: &ReplyNat,
    counters: &mut GlobalCounters,
) -> u32 {
    let client_words = unsafe { (*ip).dst };
    let cache = cache_slot(&NEXT_HOP_CLIENT6, addr_from_words(client_words));
    // Routed before the rewrite: the route to the client does not depend on the source.
    let route = route_ipv6(
        ctx,
        ip,
        client_words,
        l4.protocol,
        cache,
        now_ns(),
        counters,
    );
    match route {
        Route::Local => {
            counters.local_from_backend_passed += 1;
            return XDP_PASS;
        }
        Route::TooBig(mtu) => return icmp6::reply_too_big(ctx, mtu, counters),
        _ => {}
    }
    if hop_limit_expired(ip, counters) {
        return XDP_PASS;
    }
    unsafe { translate(ip, l4, Endpoint::Source, addr_words(&nat.vip), nat.vip_port) };
    counters.replies_translated += 1;
    send(ctx, eth, route, counters)
}

/// A packet whose hop limit would run out here goes to the stack, which sends Time Exceeded.
#[inline(always)]
pub(crate) fn hop_limit_expired(ip: *const Ipv6Hdr, counters: &mut GlobalCounters) -> bool {
    let expired = unsafe { (*ip).hop_limit } <= 1;
    if expired {
        counters.ttl_expired_passed += 1;
    }
    expired
}

/// The NAT rewrite: one end's address (`addr`, words in memory order) and port (host order)
/// replaced, the hop limit decremented as a router does, and the L4 checksum fixed with one
/// incremental update (the addresses are in its pseudo-header; IPv6 has no header checksum).
#[inline(always)]
unsafe fn translate(ip: *mut Ipv6Hdr, l4: &L4, end: Endpoint, addr: [u32; 4], port: u16) {
    let new_port = port.to_be();
    unsafe {
        let (addr_field, port_field) = match end {
            Endpoint::Destination => (&raw mut (*ip).dst, &raw mut (*l4.ports).dst),
            Endpoint::Source => (&raw mut (*ip).src, &raw mut (*l4.ports).src),
        };
        let addr_delta = delta_addr_words(*addr_field, addr);
        *addr_field = addr;
        (*ip).hop_limit -= 1;

        let port_delta = delta_u16(*port_field, new_port);
        *port_field = new_port;
        let mut check = apply(*l4.check, addr_delta + port_delta);
        // A computed 0 is sent as 0xffff (UDP's 0 would mean "no checksum", which IPv6 forbids).
        if l4.protocol == IPPROTO_UDP && check == 0 {
            check = 0xffff;
        }
        *l4.check = check;
    }
}
