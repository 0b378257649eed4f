//! IPv4 fragments of TCP/UDP datagrams. Only the first fragment (offset 0) carries the L4 header,
//! so it goes through the ordinary path (listener → backend, or reply → VIP), with the L4
//! checksum updated there for the address and port change (it covers the whole datagram). What
//! its IP header became is then recorded under the datagram's identity (src, dst, protocol, IP
//! id) in FRAGMENTS, and the later fragments get the same addresses, without ports (or, for a
//! DSR listener, go unchanged to the backend the first one was sent to). A later
//! fragment whose first fragment was not seen is dropped when it is ours (to a VIP, from a
//! backend address): forwarded as it is, a reply fragment would show the client the backend's
//! address, and a request fragment has nowhere to go. TCP is handled the same way: rare (TCP
//! avoids fragmentation), but a passed TCP reply fragment would leak the backend's address too.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use slb_common::{
    checksum::{apply, delta_u32},
    mapped_ipv4, FragmentEntry, FragmentKey, GlobalCounters, FRAGMENT_DIRECT, FRAGMENT_DROP,
    FRAGMENT_PASS, FRAGMENT_TIMEOUT_NS, FRAGMENT_TO_BACKEND, FRAGMENT_TO_CLIENT, FRAGMENT_TUNNEL,
    LISTENER_F_DSR, LISTENER_F_TUNNEL, NAT_ADDRESS_F_BACKEND, NAT_ADDRESS_F_VIP, NO_BACKEND,
};

use crate::{
    balancer::{decrement_ttl_unchecked, present_backend},
    forward::{now_ns, route_ipv4, send, send_direct},
    maps::{FRAGMENTS, NAT_ADDRESSES, NEXT_HOP_BACKEND, NEXT_HOP_CLIENT},
    packet::{ptr_at, EthHdr, Ipv4Hdr, ETH_HDR_LEN, IPV4_FRAGMENT_OFFSET_MASK},
    tunnel,
};

/// True for the first fragment of a fragmented datagram (`frag_off` in host order, MF or an
/// offset set): offset 0, MF set.
#[inline(always)]
pub fn is_first(frag_off: u16) -> bool {
    frag_off & IPV4_FRAGMENT_OFFSET_MASK == 0
}

/// The datagram the fragment at `ip` belongs to, as it arrived (read before any rewrite).
#[inline(always)]
pub fn key(ip: *const Ipv4Hdr) -> FragmentKey {
    unsafe {
        FragmentKey {
            src: (*ip).src,
            dst: (*ip).dst,
            id: (*ip).id,
            protocol: (*ip).protocol,
            _pad: 0,
        }
    }
}

/// What the ordinary path did with a datagram's first fragment.
pub struct Sent {
    pub verdict: u32,
    /// What the later fragments do if the first went on: `FRAGMENT_TO_BACKEND` or
    /// `FRAGMENT_TO_CLIENT` when it was rewritten, `FRAGMENT_DIRECT` or `FRAGMENT_TUNNEL` when
    /// it was sent to a DSR listener's backend.
    pub action: u32,
    /// The backend a DSR listener's first fragment was sent to, else `NO_BACKEND`.
    pub direct_to: u32,
}

/// [`Sent::action`] of a listener's first fragment, by the listener's flags.
#[inline(always)]
pub fn to_backend_action(listener_flags: u32) -> u32 {
    if listener_flags & LISTENER_F_DSR == 0 {
        FRAGMENT_TO_BACKEND
    } else if listener_flags & LISTENER_F_TUNNEL == 0 {
        FRAGMENT_DIRECT
    } else {
        FRAGMENT_TUNNEL
    }
}

/// After the first fragment of datagram `key` went through the ordinary path: records what it
/// became, so the later fragments follow it exactly. Sent to a DSR listener's backend, they go
/// to the same backend; else what it became is read back from its header (unchanged addresses:
/// passed untouched, as when its TTL expired or it was a backend's packet to this host).
/// The header is read anew: the path may have rebuilt the frame (an ICMP error in its place).
#[inline(always)]
pub fn remember(ctx: &XdpContext, key: &FragmentKey, sent: Sent, counters: &mut GlobalCounters) {
    if let Some(action) = sent_direct(&sent) {
        record(key, key.src, key.dst, action, sent.direct_to, counters);
        return;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN) else {
        record(key, key.src, key.dst, FRAGMENT_DROP, NO_BACKEND, counters);
        return;
    };
    let (src, dst, protocol) = unsafe { ((*ip).src, (*ip).dst, (*ip).protocol) };
    let action = if sent.verdict == XDP_DROP || protocol != key.protocol {
        FRAGMENT_DROP
    } else if src == key.src && dst == key.dst {
        FRAGMENT_PASS
    } else {
        sent.action
    };
    record(key, src, dst, action, NO_BACKEND, counters);
}

/// The action of a first fragment that went to a DSR listener's backend (not dropped, its
/// later fragments follow it whatever the verdict: one passed was handed to the stack already
/// encapsulated, or is for this host).
#[inline(always)]
pub(crate) fn sent_direct(sent: &Sent) -> Option<u32> {
    (sent.direct_to != NO_BACKEND && sent.verdict != XDP_DROP).then_some(sent.action)
}

/// A first fragment that is not a listener's nor a reply: if its addresses are ours (another
/// port of a VIP, a backend's other traffic), its later fragments must pass as it does rather
/// than be dropped as orphans.
#[inline(always)]
pub fn pass_first(key: &FragmentKey, counters: &mut GlobalCounters) -> u32 {
    if ours(key) {
        record(key, key.src, key.dst, FRAGMENT_PASS, NO_BACKEND, counters);
    }
    counters.fragments_passed += 1;
    XDP_PASS
}

#[inline(always)]
fn record(
    key: &FragmentKey,
    src: [u8; 4],
    dst: [u8; 4],
    action: u32,
    backend_id: u32,
    counters: &mut GlobalCounters,
) {
    let entry = FragmentEntry {
        src,
        dst,
        action,
        backend_id,
        created_ns: now_ns(),
    };
    // An LRU insert fails only under memory pressure: the later fragments are then orphans,
    // dropped and counted.
    let _ = FRAGMENTS.insert(key, entry, 0);
    counters.fragments_tracked += 1;
}

/// Whether a packet with these addresses is a listener's or a backend's.
#[inline(always)]
fn ours(key: &FragmentKey) -> bool {
    let flags = |addr: [u8; 4]| unsafe { NAT_ADDRESSES.get(u32::from_ne_bytes(addr)) };
    matches!(flags(key.dst), Some(f) if f & NAT_ADDRESS_F_VIP != 0)
        || matches!(flags(key.src), Some(f) if f & NAT_ADDRESS_F_BACKEND != 0)
}

/// A later fragment whose first fragment was not seen (or whose entry expired): dropped when
/// its addresses are `ours` (forwarded as it is, it would leak a backend's address or go
/// nowhere), passed otherwise.
#[inline(always)]
pub(crate) fn without_first(ours: bool, counters: &mut GlobalCounters) -> u32 {
    if ours {
        counters.fragments_dropped_orphan += 1;
        return XDP_DROP;
    }
    counters.fragments_passed += 1;
    XDP_PASS
}

/// What a later fragment of a datagram whose first fragment had `action` does, counted: the
/// verdict when it stops here (dropped or passed with its first), `None` when it is forwarded.
#[inline(always)]
pub(crate) fn stops_here(action: u32, counters: &mut GlobalCounters) -> Option<u32> {
    match action {
        FRAGMENT_TO_BACKEND | FRAGMENT_DIRECT | FRAGMENT_TUNNEL => counters.fragments_balanced += 1,
        FRAGMENT_TO_CLIENT => counters.fragments_translated += 1,
        FRAGMENT_DROP => {
            counters.fragments_dropped_with_first += 1;
            return Some(XDP_DROP);
        }
        _ => {
            counters.fragments_passed += 1;
            return Some(XDP_PASS);
        }
    }
    None
}

/// A fragment after the first: it follows its datagram's entry.
#[inline(always)]
pub fn later(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    counters: &mut GlobalCounters,
) -> u32 {
    let key = key(ip);
    let now = now_ns();
    let entry = match FRAGMENTS.get_ptr_mut(key) {
        Some(e) if now.wrapping_sub(unsafe { (*e).created_ns }) < FRAGMENT_TIMEOUT_NS => e,
        _ => return without_first(ours(&key), counters),
    };
    let action = unsafe { (*entry).action };
    if let Some(verdict) = stops_here(action, counters) {
        return verdict;
    }
    if action == FRAGMENT_DIRECT || action == FRAGMENT_TUNNEL {
        let backend_id = unsafe { (*entry).backend_id };
        return later_direct(ctx, eth, ip, backend_id, action, now, counters);
    }
    if unsafe { (*ip).ttl } <= 1 {
        // As for whole packets: the stack sends the ICMP error (for a first fragment only).
        counters.ttl_expired_passed += 1;
        return XDP_PASS;
    }
    let client = unsafe {
        let (new_src, new_dst) = ((*entry).src, (*entry).dst);
        // Both addresses and the TTL in one update of the header checksum.
        let delta = delta_u32(u32::from_ne_bytes((*ip).src), u32::from_ne_bytes(new_src))
            + delta_u32(u32::from_ne_bytes((*ip).dst), u32::from_ne_bytes(new_dst))
            + decrement_ttl_unchecked(ip);
        (*ip).check = apply((*ip).check, delta);
        (*ip).src = new_src;
        (*ip).dst = new_dst;
        u32::from_ne_bytes(new_dst)
    };
    // A reply's first fragment filled this CPU's slot for the client (usually this CPU: one
    // flow, one receive queue); a balanced datagram's next hop comes from the FIB (the backend
    // id that keys that cache is not in the entry; fragments are rare).
    let cache = if action == FRAGMENT_TO_CLIENT {
        NEXT_HOP_CLIENT.get_ptr_mut(client).unwrap_or_default()
    } else {
        core::ptr::null_mut()
    };
    let protocol = unsafe { (*ip).protocol };
    let route = route_ipv4(
        ctx,
        ip,
        unsafe { (*ip).dst },
        protocol,
        cache,
        now,
        counters,
    );
    send(ctx, eth, route, counters)
}

/// A later fragment of a DSR listener's datagram: unchanged, to its first fragment's backend
/// (encapsulated as it was with `FRAGMENT_TUNNEL`).
#[inline(always)]
fn later_direct(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *const Ipv4Hdr,
    backend_id: u32,
    action: u32,
    now: u64,
    counters: &mut GlobalCounters,
) -> u32 {
    let Some(backend) = present_backend(backend_id) else {
        counters.lookup_failed_dropped += 1;
        return XDP_DROP;
    };
    let backend_addr = mapped_ipv4(&backend.addr);
    let cache = NEXT_HOP_BACKEND
        .get_ptr_mut(backend_id)
        .unwrap_or(core::ptr::null_mut());
    let protocol = unsafe { (*ip).protocol };
    let route = route_ipv4(ctx, ip, backend_addr, protocol, cache, now, counters);
    if action == FRAGMENT_TUNNEL {
        // Without DF (a fragment), so never an ICMP error: dropped if it does not fit.
        if let Some(verdict) = tunnel::too_big_ipv4(ctx, ip, &route, counters) {
            return verdict;
        }
        return tunnel::send_ipv4(ctx, ip, backend, route, counters);
    }
    send_direct(ctx, eth, route, counters)
}
