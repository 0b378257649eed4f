//! The `slb_xdp` program: parse → listener → connection/ring → rewrite → forward → count.
//! Replies from backends take the same entry and are translated back to the VIP.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    macros::xdp,
    programs::XdpContext,
};
use slb_common::{
    checksum::{replace_u16, replace_u32},
    hash::flow_hash,
    ipv4_mapped, Addr, Backend, Connection, FlowKey, GlobalCounters, ListenerEntry, ListenerKey,
    NextHop, PersistKey, Persisted, ReverseNat, BACKEND_F_DRAINING, BACKEND_F_PRESENT, HEALTH_DOWN,
    IPPROTO_TCP, IPPROTO_UDP, LISTENER_F_ACTIVE_STANDBY, LISTENER_F_IGNORE_HEALTH,
    LISTENER_F_PERSIST, NO_BACKEND,
};

use crate::{
    forward::forward_ipv4,
    maps::{
        BACKENDS, BACKEND_HEALTH, BACKEND_STATS, CONNECTIONS, GLOBAL_STATS, LISTENERS,
        LISTENER_STATS, NEXT_HOP_BACKEND, NEXT_HOP_CLIENT, PERSISTENCE, REVERSE_NAT, RINGS,
    },
    packet::{
        ptr_at, EthHdr, Ipv4Hdr, Ports, TcpHdr, UdpHdr, ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6,
        IPV4_FRAGMENT_MASK, IPV4_HDR_LEN,
    },
};

const FLOW_HASH_SEED: u32 = 0;

#[xdp]
pub fn slb_xdp(ctx: XdpContext) -> u32 {
    let Some(counters) = GLOBAL_STATS.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    // Per-CPU slot: no other CPU writes it while this program runs.
    let counters = unsafe { &mut *counters };
    balance(&ctx, counters)
}

/// The L4 header fields the rewrite touches.
struct L4 {
    ports: *mut Ports,
    check: *mut u16,
    protocol: u8,
}

#[inline(always)]
fn balance(ctx: &XdpContext, counters: &mut GlobalCounters) -> u32 {
    // Parse.
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        counters.malformed += 1;
        return XDP_PASS;
    };
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {}
        ETH_P_IPV6 => {
            counters.ipv6_passed += 1;
            return XDP_PASS;
        }
        _ => {
            counters.non_ip_passed += 1;
            return XDP_PASS;
        }
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN) else {
        counters.malformed += 1;
        return XDP_PASS;
    };
    let (version_ihl, protocol, frag_off) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
        )
    };
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        counters.malformed += 1;
        return XDP_PASS;
    }
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        counters.not_for_us_passed += 1;
        return XDP_PASS;
    }
    if frag_off & IPV4_FRAGMENT_MASK != 0 {
        counters.fragments_passed += 1;
        return XDP_PASS;
    }
    if version_ihl & 0x0f != 5 {
        counters.ip_options_passed += 1;
        return XDP_PASS;
    }
    let Some(l4) = l4_header(ctx, protocol) else {
        counters.malformed += 1;
        return XDP_PASS;
    };
    let flow = unsafe {
        FlowKey {
            src: ipv4_mapped((*ip).src),
            dst: ipv4_mapped((*ip).dst),
            src_port: u16::from_be((*l4.ports).src),
            dst_port: u16::from_be((*l4.ports).dst),
            protocol,
            _pad: [0; 3],
        }
    };

    // Listener.
    let listener_key = ListenerKey {
        vip: flow.dst,
        port: flow.dst_port,
        protocol,
        _pad: 0,
    };
    if let Some(listener) = unsafe { LISTENERS.get(&listener_key) } {
        let listener = *listener;
        return to_backend(ctx, eth, ip, &l4, &flow, &listener, counters);
    }
    if let Some(nat) = unsafe { REVERSE_NAT.get(&flow) } {
        let nat = *nat;
        return to_client(ctx, eth, ip, &l4, &nat, counters);
    }
    counters.not_for_us_passed += 1;
    XDP_PASS
}

#[inline(always)]
fn l4_header(ctx: &XdpContext, protocol: u8) -> Option<L4> {
    let offset = ETH_HDR_LEN + IPV4_HDR_LEN;
    if protocol == IPPROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, offset)?;
        Some(unsafe {
            L4 {
                ports: &raw mut (*tcp).ports,
                check: &raw mut (*tcp).check,
                protocol,
            }
        })
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, offset)?;
        Some(unsafe {
            L4 {
                ports: &raw mut (*udp).ports,
                check: &raw mut (*udp).check,
                protocol,
            }
        })
    }
}

enum Pick {
    Backend {
        id: u32,
        backend: Backend,
        new_flow: bool,
    },
    NoBackend,
    LookupFailed,
}

#[inline(always)]
fn present_backend(id: u32) -> Option<Backend> {
    let backend = BACKENDS.get(id)?;
    if backend.flags & BACKEND_F_PRESENT == 0 {
        return None;
    }
    Some(*backend)
}

#[inline(always)]
fn is_healthy(id: u32) -> bool {
    !matches!(BACKEND_HEALTH.get(id), Some(&HEALTH_DOWN))
}

/// A backend a flow may (still) use: present, and healthy unless the listener ignores health.
#[inline(always)]
fn usable_backend(id: u32, listener: &ListenerEntry) -> Option<Backend> {
    let backend = present_backend(id)?;
    if listener.flags & LISTENER_F_IGNORE_HEALTH == 0 && !is_healthy(id) {
        return None;
    }
    Some(backend)
}

/// Connection table first (a known flow keeps its backend whatever the ring says now, unless
/// that backend was removed or declared unhealthy), then the listener's policy for a new flow:
/// active/standby by the active's health flag, or persistence, or the Maglev ring.
#[inline(always)]
fn pick_backend(
    flow: &FlowKey,
    listener: &ListenerEntry,
    now: u64,
    counters: &mut GlobalCounters,
) -> Pick {
    if let Some(conn) = CONNECTIONS.get_ptr_mut(flow) {
        let id = unsafe { (*conn).backend_id };
        if let Some(backend) = usable_backend(id, listener) {
            unsafe { (*conn).last_seen_ns = now };
            return Pick::Backend {
                id,
                backend,
                new_flow: false,
            };
        }
        counters.flows_repicked += 1;
    }
    let id = if listener.flags & LISTENER_F_ACTIVE_STANDBY != 0 {
        if is_healthy(listener.active_id) {
            listener.active_id
        } else {
            counters.standby_picks += 1;
            listener.standby_id
        }
    } else {
        match persisted_backend(flow, listener, now, counters) {
            Some(id) => id,
            None => match ring_backend(flow, listener) {
                Ok(id) => id,
                Err(pick) => return pick,
            },
        }
    };
    let Some(backend) = present_backend(id) else {
        return Pick::LookupFailed;
    };
    if listener.flags & LISTENER_F_PERSIST != 0 {
        let key = PersistKey {
            client: flow.src,
            listener_index: listener.index,
        };
        let value = Persisted {
            backend_id: id,
            _pad: 0,
            last_seen_ns: now,
        };
        let _ = PERSISTENCE.insert(&key, &value, 0);
    }
    let conn = Connection {
        backend_id: id,
        listener_index: listener.index,
        last_seen_ns: now,
    };
    let reply = FlowKey {
        src: backend.addr,
        dst: flow.src,
        src_port: backend.port,
        dst_port: flow.src_port,
        protocol: flow.protocol,
        _pad: [0; 3],
    };
    let nat = ReverseNat {
        vip: flow.dst,
        vip_port: flow.dst_port,
        _pad: 0,
        listener_index: listener.index,
        backend_id: id,
    };
    // LRU inserts only fail under memory pressure; the packet still goes out and the next one
    // of the flow hashes to the same slot.
    let _ = CONNECTIONS.insert(flow, &conn, 0);
    let _ = REVERSE_NAT.insert(&reply, &nat, 0);
    Pick::Backend {
        id,
        backend,
        new_flow: true,
    }
}

/// The backend this client address is persisted to, while the entry is fresh and the backend
/// still takes new flows.
#[inline(always)]
fn persisted_backend(
    flow: &FlowKey,
    listener: &ListenerEntry,
    now: u64,
    counters: &mut GlobalCounters,
) -> Option<u32> {
    if listener.flags & LISTENER_F_PERSIST == 0 {
        return None;
    }
    let key = PersistKey {
        client: flow.src,
        listener_index: listener.index,
    };
    let entry = unsafe { PERSISTENCE.get(&key) }?;
    let age = now.wrapping_sub(entry.last_seen_ns);
    if age > u64::from(listener.persist_timeout_s) * 1_000_000_000 {
        return None;
    }
    let id = entry.backend_id;
    let backend = usable_backend(id, listener)?;
    if backend.flags & BACKEND_F_DRAINING != 0 {
        return None;
    }
    counters.persistence_hits += 1;
    Some(id)
}

#[inline(always)]
fn ring_backend(flow: &FlowKey, listener: &ListenerEntry) -> Result<u32, Pick> {
    if listener.ring_size == 0 {
        return Err(Pick::LookupFailed);
    }
    let slot = listener.ring_base + flow_hash(flow, FLOW_HASH_SEED) % listener.ring_size;
    match RINGS.get(slot) {
        None => Err(Pick::LookupFailed),
        Some(&NO_BACKEND) => Err(Pick::NoBackend),
        Some(&id) => Ok(id),
    }
}

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
    let now = unsafe { bpf_ktime_get_ns() };
    let (id, backend, new_flow) = match pick_backend(flow, listener, now, counters) {
        Pick::Backend {
            id,
            backend,
            new_flow,
        } => (id, backend, new_flow),
        Pick::NoBackend => {
            counters.no_backend_dropped += 1;
            return XDP_DROP;
        }
        Pick::LookupFailed => {
            counters.lookup_failed_dropped += 1;
            return XDP_DROP;
        }
    };
    unsafe { translate(ip, l4, Endpoint::Destination, &backend.addr, backend.port) };
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(listener.index, id, bytes, new_flow);
    let cache = NEXT_HOP_BACKEND
        .get_ptr_mut(id)
        .unwrap_or(core::ptr::null_mut());
    forward_ipv4(ctx, eth, ip, l4.protocol, cache, counters)
}

#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    nat: &ReverseNat,
    counters: &mut GlobalCounters,
) -> u32 {
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    unsafe { translate(ip, l4, Endpoint::Source, &nat.vip, nat.vip_port) };
    counters.replies_translated += 1;
    let client = u32::from_ne_bytes(unsafe { (*ip).dst });
    let cache = match NEXT_HOP_CLIENT.get_ptr_mut(client) {
        Some(slot) => slot,
        None => {
            let _ = NEXT_HOP_CLIENT.insert(client, NextHop::default(), 0);
            NEXT_HOP_CLIENT
                .get_ptr_mut(client)
                .unwrap_or(core::ptr::null_mut())
        }
    };
    forward_ipv4(ctx, eth, ip, l4.protocol, cache, counters)
}

/// A packet whose TTL would run out here goes to the stack, which sends the ICMP error.
#[inline(always)]
fn ttl_expired(ip: *const Ipv4Hdr, counters: &mut GlobalCounters) -> bool {
    let expired = unsafe { (*ip).ttl } <= 1;
    if expired {
        counters.ttl_expired_passed += 1;
    }
    expired
}

enum Endpoint {
    /// Towards a backend: the destination becomes the backend.
    Destination,
    /// Towards the client: the source becomes the VIP.
    Source,
}

/// The NAT rewrite: one end's address (IPv4-mapped `addr`) and port (host order) replaced,
/// checksums fixed incrementally, TTL decremented as a router does.
#[inline(always)]
unsafe fn translate(ip: *mut Ipv4Hdr, l4: &L4, end: Endpoint, addr: &Addr, port: u16) {
    let new_addr = [addr[12], addr[13], addr[14], addr[15]];
    unsafe {
        let (addr_field, port_field) = match end {
            Endpoint::Destination => (&raw mut (*ip).dst, &raw mut (*l4.ports).dst),
            Endpoint::Source => (&raw mut (*ip).src, &raw mut (*l4.ports).src),
        };
        let old_addr = *addr_field;
        rewrite_ipv4_addr(ip, addr_field, old_addr, new_addr);
        rewrite_l4(l4, port_field, old_addr, new_addr, port.to_be());
        decrement_ttl(ip);
    }
}

/// Writes `new` over the address at `field` (the IPv4 source or destination) and fixes the
/// header checksum.
#[inline(always)]
unsafe fn rewrite_ipv4_addr(ip: *mut Ipv4Hdr, field: *mut [u8; 4], old: [u8; 4], new: [u8; 4]) {
    unsafe {
        (*ip).check = replace_u32(
            (*ip).check,
            u32::from_ne_bytes(old),
            u32::from_ne_bytes(new),
        );
        *field = new;
    }
}

/// Writes `new_port` (network order) over `port` and fixes the L4 checksum for it and for the
/// address change in the pseudo-header. A UDP checksum of 0 means "none" and stays 0.
#[inline(always)]
unsafe fn rewrite_l4(l4: &L4, port: *mut u16, old_addr: [u8; 4], new_addr: [u8; 4], new_port: u16) {
    unsafe {
        let old_port = *port;
        *port = new_port;
        let check = *l4.check;
        if l4.protocol == IPPROTO_UDP && check == 0 {
            return;
        }
        let mut check = replace_u32(
            check,
            u32::from_ne_bytes(old_addr),
            u32::from_ne_bytes(new_addr),
        );
        check = replace_u16(check, old_port, new_port);
        if l4.protocol == IPPROTO_UDP && check == 0 {
            check = 0xffff;
        }
        *l4.check = check;
    }
}

#[inline(always)]
unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    unsafe {
        let ttl = (*ip).ttl;
        let protocol = (*ip).protocol;
        let old = u16::from_ne_bytes([ttl, protocol]);
        let new = u16::from_ne_bytes([ttl - 1, protocol]);
        (*ip).check = replace_u16((*ip).check, old, new);
        (*ip).ttl = ttl - 1;
    }
}

#[inline(always)]
fn count_traffic(listener_index: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    let new = u64::from(new_flow);
    if let Some(c) = LISTENER_STATS.get_ptr_mut(listener_index) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_connections += new;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_connections += new;
        }
    }
}
