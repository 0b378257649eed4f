//! The `slb_xdp_fullnat` program: IPv4 packets of full NAT listeners and their flows' replies,
//! handed over by `slb_xdp` (which checked their headers) through PROGRAMS. A listener's packet
//! leaves from its SNAT address and port to the backend; a reply leaves from the VIP to the
//! client (see `fullnat.rs` for the mapping between them).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use slb_common::{
    mapped_ipv4, FlowKey, GlobalCounters, ListenerEntry, ListenerKey, SnatMapping,
    FRAGMENT_TO_BACKEND, FRAGMENT_TO_CLIENT, LISTENER_F_FULLNAT, NO_BACKEND,
};

use crate::{
    balancer::{
        count_traffic, dont_fragment, l4_header, pick_backend, rewrite, translate, ttl_expired,
        Endpoint, L4,
    },
    forward::{cache_slot, now_ns, route_ipv4, send, Route},
    fragments::{self, Sent},
    fullnat::{refresh, snat_for},
    icmp,
    maps::{LISTENERS, NEXT_HOP_BACKEND, NEXT_HOP_CLIENT, SNAT_MAPPINGS},
    packet::{ptr_at, EthHdr, Ipv4Hdr, ETH_HDR_LEN, IPV4_FRAGMENT_MASK, IPV4_HDR_LEN},
};

#[xdp]
pub fn slb_xdp_fullnat(ctx: XdpContext) -> u32 {
    let Some(counters) = crate::maps::global_counters() else {
        return XDP_PASS;
    };
    // `slb_xdp` checked the frame: an IPv4 TCP/UDP packet (or a datagram's first fragment)
    // without options, whose L4 header is within it. Read again, not checked again.
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr>(&ctx, 0),
        ptr_at::<Ipv4Hdr>(&ctx, ETH_HDR_LEN),
    ) else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    let (protocol, frag_off, total_len) = unsafe {
        (
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
            usize::from(u16::from_be((*ip).total_len)),
        )
    };
    let first_fragment = frag_off & IPV4_FRAGMENT_MASK != 0;
    let l4 = total_len.checked_sub(IPV4_HDR_LEN).and_then(|l4_len| {
        l4_header(
            &ctx,
            ETH_HDR_LEN + IPV4_HDR_LEN,
            protocol,
            l4_len,
            first_fragment,
        )
    });
    let Some(l4) = l4 else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    let flow = unsafe {
        FlowKey::ipv4(
            (*ip).src,
            (*ip).dst,
            u16::from_be((*l4.ports).src),
            u16::from_be((*l4.ports).dst),
            protocol,
        )
    };
    let fragment = first_fragment.then(|| fragments::key(ip));
    let listener_key = ListenerKey {
        vip: flow.dst,
        port: flow.dst_port,
        protocol,
        _pad: 0,
    };
    let (verdict, action) = if let Some(listener) = unsafe { LISTENERS.get(&listener_key) } {
        let listener = *listener;
        if listener.flags & LISTENER_F_FULLNAT == 0 {
            // Changed by a reload since `slb_xdp` looked: `slb_xdp` takes its next packet.
            counters.lookup_failed_dropped += 1;
            return XDP_DROP;
        }
        let verdict = to_backend(&ctx, eth, ip, &l4, &flow, &listener, counters);
        (verdict, FRAGMENT_TO_BACKEND)
    } else if let Some(mapping) = SNAT_MAPPINGS.get_ptr_mut(&flow) {
        (
            to_client(&ctx, eth, ip, &l4, mapping, counters),
            FRAGMENT_TO_CLIENT,
        )
    } else {
        // Removed since `slb_xdp` looked (a reload, the daemon's upkeep).
        counters.not_for_us_passed += 1;
        return XDP_PASS;
    };
    if let Some(key) = fragment {
        let sent = Sent {
            verdict,
            action,
            direct_to: NO_BACKEND,
        };
        fragments::remember(&ctx, &key, sent, counters);
    }
    verdict
}

/// A full NAT listener's packet: from its SNAT address and port to the backend.
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    flow: &FlowKey,
    listener: &ListenerEntry,
    counters: &mut GlobalCounters,
) -> u32 {
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    let now = now_ns();
    let picked = pick_backend::<{ slb_common::PROGRAM_SLOT_FULLNAT }>(
        ctx,
        flow,
        &flow.src,
        listener,
        l4.tcp_flags,
        now,
        counters,
    );
    let Some((id, backend, new_flow)) = picked.or_count(counters) else {
        return XDP_DROP;
    };
    let cache = NEXT_HOP_BACKEND
        .get_ptr_mut(id)
        .unwrap_or(core::ptr::null_mut());
    let backend_addr = mapped_ipv4(&backend.addr);
    let route = route_ipv4(ctx, ip, backend_addr, l4.protocol, cache, now, counters);
    // Every way but out of an interface is settled before a mapping is claimed: the kernel
    // would drop a packet from one of its own addresses (the SNAT address) as a martian.
    match route {
        Route::Hop(_) => {}
        Route::TooBig(mtu) if dont_fragment(ip) => {
            return icmp::reply_too_big(ctx, mtu, counters);
        }
        Route::Stack => {
            // The backend's address is not resolved yet: the kernel gets this packet with only
            // the destination rewritten, as in NAT mode, and resolves the address on the way;
            // the flow's next packet (a retransmitted SYN, the next datagram) takes full NAT.
            unsafe { translate(ip, l4, Endpoint::Destination, &backend.addr, backend.port) };
            counters.snat_next_hop_unresolved += 1;
            return XDP_PASS;
        }
        Route::Drop => {
            counters.fib_dropped += 1;
            return XDP_DROP;
        }
        // Too big without DF (slb cannot fragment), or the backend is this host.
        Route::TooBig(_) | Route::Local => {
            counters.snat_not_forwarded_dropped += 1;
            return XDP_DROP;
        }
    }
    let Some((snat_addr, snat_port)) =
        snat_for(flow, listener, id, backend, l4.tcp_flags, now, counters)
    else {
        return XDP_DROP;
    };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(listener.index, id, bytes, new_flow);
    unsafe {
        translate(ip, l4, Endpoint::Destination, &backend.addr, backend.port);
        rewrite(ip, l4, Endpoint::Source, snat_addr, snat_port, false);
    }
    send(ctx, eth, route, counters)
}

/// A reply of a full NAT flow (`mapping`): from the VIP to the client, unless it is for this
/// host.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    mapping: *mut SnatMapping,
    counters: &mut GlobalCounters,
) -> u32 {
    let client = unsafe { mapped_ipv4(&(*mapping).client) };
    let now = now_ns();
    let cache = cache_slot(&NEXT_HOP_CLIENT, u32::from_ne_bytes(client));
    // Routed towards the client before the rewrite; an error quotes the reply as it came.
    let route = route_ipv4(ctx, ip, client, l4.protocol, cache, now, counters);
    match route {
        Route::Local => {
            counters.local_from_backend_passed += 1;
            return XDP_PASS;
        }
        Route::TooBig(mtu) if dont_fragment(ip) => {
            return icmp::reply_too_big(ctx, mtu, counters);
        }
        _ => {}
    }
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    refresh(mapping, false, false, false, now);
    unsafe {
        translate(
            ip,
            l4,
            Endpoint::Source,
            &(*mapping).vip,
            (*mapping).vip_port,
        );
        rewrite(
            ip,
            l4,
            Endpoint::Destination,
            &(*mapping).client,
            (*mapping).client_port,
            false,
        );
    }
    counters.snat_replies_translated += 1;
    send(ctx, eth, route, counters)
}
