//! ICMP for balanced flows, so path MTU discovery works through the VIP:
//! - a packet too big for the next hop with DF set is answered here with "fragmentation
//!   needed", quoting the packet as its sender sent it (the NAT rewrite would otherwise make the
//!   kernel's own error quote an address the sender never used, and the sender would ignore it);
//! - destination-unreachable and time-exceeded errors about a balanced flow are translated:
//!   errors about a packet the VIP sent (a reply, e.g. from a router on the client's side) go to
//!   the backend serving the flow, quoting backend → client; errors about a packet sent to a
//!   backend (from a router on the backend's side) go to the client, quoting client → VIP.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
    EbpfContext,
};
use core::ops::ControlFlow;
use slb_common::{
    checksum::{fold, replace_u16, replace_u32},
    hash::flow_hash,
    ipv4_mapped, mapped_ipv4, Backend, BackendEndpoint, FlowKey, GlobalCounters, ListenerKey,
    ReplyNat, IPPROTO_TCP, IPPROTO_UDP, LISTENER_F_DSR,
};

use crate::{
    balancer::{decrement_ttl, present_backend, ttl_expired, FLOW_HASH_SEED},
    forward::{now_ns, route_ipv4, send, send_direct, Route},
    half_open,
    maps::{CONNECTIONS, LISTENERS, NEXT_HOP_BACKEND, REPLY_NAT},
    packet::{ptr_at, EthHdr, Ipv4Hdr, Ports, ETH_HDR_LEN, ETH_P_IP},
};

pub const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// What an ICMP error quotes at least: the IP header and 8 bytes of its payload.
const QUOTED: usize = 28;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    unused: u16,
    /// Next-hop MTU of "fragmentation needed".
    mtu: u16,
}

/// An ICMP error from its IP header to the first 8 bytes of the quoted packet's payload.
#[repr(C)]
struct IcmpError {
    ip: Ipv4Hdr,
    icmp: IcmpHdr,
    inner: Ipv4Hdr,
    ports: Ports,
    /// UDP: length and checksum; TCP: the sequence number.
    rest: [u16; 2],
}

/// The frame "fragmentation needed" is built in.
#[repr(C)]
struct TooBigFrame {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp: IcmpHdr,
    quoted: [u16; QUOTED / 2],
}

/// The Internet checksum of `N` 16-bit words (whose checksum field is zero), as they sit in
/// memory.
#[inline(always)]
pub(crate) unsafe fn checksum<const N: usize>(words: *const [u16; N]) -> u16 {
    !fold(unsafe { sum16(words) })
}

/// The one's-complement sum (unfolded) of `N` 16-bit words as they sit in memory.
#[inline(always)]
pub(crate) unsafe fn sum16<const N: usize>(words: *const [u16; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum += u32::from(unsafe { (*words)[i] });
        i += 1;
    }
    sum
}

/// Turns the frame in `ctx` into an `F` (an error's headers, then the quoted packet): `prefix`
/// bytes of room in front (the old Ethernet header is overwritten), the rest cut after `F`'s
/// size. `None`, counted, when the frame cannot be resized.
#[inline(always)]
pub(crate) fn reframe<F>(
    ctx: &XdpContext,
    prefix: usize,
    counters: &mut GlobalCounters,
) -> Option<*mut F> {
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(prefix as i32)) } != 0 {
        counters.icmp_errors_failed += 1;
        return None;
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let keep = core::mem::size_of::<F>() as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, keep - len) } != 0 {
        counters.icmp_errors_failed += 1;
        return None;
    }
    let frame = ptr_at::<F>(ctx, 0);
    if frame.is_none() {
        counters.icmp_errors_failed += 1;
    }
    frame
}

/// Answers the packet in `ctx` (as received: nothing rewritten yet) with ICMP "fragmentation
/// needed, next-hop MTU `mtu`" back out of the interface it came in on, from the address the
/// packet was sent to.
#[inline(always)]
pub fn reply_too_big(ctx: &XdpContext, mtu: u16, counters: &mut GlobalCounters) -> u32 {
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN),
    ) else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    let (sender_mac, our_mac, sender, addressed) =
        unsafe { ((*eth).src, (*eth).dst, (*ip).src, (*ip).dst) };
    // Room for the new IP and ICMP headers in front of the quoted packet.
    let prefix = core::mem::size_of::<Ipv4Hdr>() + core::mem::size_of::<IcmpHdr>();
    let Some(frame) = reframe::<TooBigFrame>(ctx, prefix, counters) else {
        return XDP_DROP;
    };
    let keep = core::mem::size_of::<TooBigFrame>();
    unsafe {
        (*frame).eth = EthHdr {
            dst: sender_mac,
            src: our_mac,
            ether_type: ETH_P_IP.to_be(),
        };
        (*frame).ip = Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0,
            total_len: ((keep as usize - ETH_HDR_LEN) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: 64,
            protocol: IPPROTO_ICMP,
            check: 0,
            src: addressed,
            dst: sender,
        };
        (*frame).icmp = IcmpHdr {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            check: 0,
            unused: 0,
            mtu: mtu.to_be(),
        };
        (*frame).ip.check = checksum(&raw const (*frame).ip as *const [u16; 10]);
        (*frame).icmp.check = checksum(&raw const (*frame).icmp as *const [u16; 4 + QUOTED / 2]);
    }
    counters.icmp_too_big_sent += 1;
    XDP_TX
}

/// An ICMP error arriving at the balancer (outer header without options, not a fragment):
/// translated when it is about a balanced flow, passed otherwise.
#[inline(always)]
pub fn translate_error(ctx: &XdpContext, counters: &mut GlobalCounters) -> u32 {
    let (err, quoted) = match parse_error(ctx, counters) {
        ControlFlow::Continue(parsed) => parsed,
        ControlFlow::Break(verdict) => return verdict,
    };
    // About a packet the VIP sent: to the backend serving the flow.
    let listener = ListenerKey {
        vip: ipv4_mapped(quoted.src),
        port: quoted.src_port,
        protocol: quoted.protocol,
        _pad: 0,
    };
    if let Some(entry) = unsafe { LISTENERS.get(&listener) } {
        let direct = entry.flags & LISTENER_F_DSR != 0;
        return error_to_backend(ctx, err, &quoted, direct, counters);
    }
    // About a packet sent to a backend: to the client, quoting the VIP.
    let endpoint = BackendEndpoint {
        addr: ipv4_mapped(quoted.dst),
        port: quoted.dst_port,
        protocol: quoted.protocol,
        _pad: 0,
    };
    if let Some(nat) = unsafe { REPLY_NAT.get(&endpoint) } {
        let nat = *nat;
        return error_to_client(ctx, err, &nat, counters);
    }
    counters.not_for_us_passed += 1;
    XDP_PASS
}

/// The TCP or UDP packet an ICMP error quotes: addresses, ports (host order), protocol.
struct Quoted {
    src: [u8; 4],
    dst: [u8; 4],
    src_port: u16,
    dst_port: u16,
    protocol: u8,
}

/// The error and the packet it quotes, or the verdict (pass) on ICMP that is not an error this
/// program translates: another type, a quoted header with options, neither TCP nor UDP.
#[inline(always)]
fn parse_error(
    ctx: &XdpContext,
    counters: &mut GlobalCounters,
) -> ControlFlow<u32, (*mut IcmpError, Quoted)> {
    let Some(err) = ptr_at::<IcmpError>(ctx, ETH_HDR_LEN) else {
        counters.not_for_us_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    };
    let (kind, inner_vihl, protocol) = unsafe {
        (
            (*err).icmp.kind,
            (*err).inner.version_ihl,
            (*err).inner.protocol,
        )
    };
    if (kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED)
        || inner_vihl != 0x45
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        counters.not_for_us_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    }
    let quoted = unsafe {
        Quoted {
            src: (*err).inner.src,
            dst: (*err).inner.dst,
            src_port: u16::from_be((*err).ports.src),
            dst_port: u16::from_be((*err).ports.dst),
            protocol,
        }
    };
    ControlFlow::Continue((err, quoted))
}

/// The backend serving `flow` (client → VIP) by the connection or the half-open table; `None`,
/// counted as unmatched, for a flow this node does not know.
#[inline(always)]
pub(crate) fn flow_backend(
    flow: &FlowKey,
    counters: &mut GlobalCounters,
) -> Option<(u32, &'static Backend)> {
    let id = match unsafe { CONNECTIONS.get(flow) } {
        Some(conn) => Some(conn.backend_id),
        None => half_open::picked(flow, flow_hash(flow, FLOW_HASH_SEED)),
    };
    let found = id.and_then(|id| present_backend(id).map(|backend| (id, backend)));
    if found.is_none() {
        counters.icmp_errors_unmatched += 1;
    }
    found
}

/// An error about a reply the VIP sent (to the client of a listener's flow): to the backend
/// serving the flow, quoting the backend instead of the VIP; for a `direct` (DSR) listener, whose
/// backend sent the reply from the VIP itself, unchanged to the backend's MAC address.
#[inline(always)]
fn error_to_backend(
    ctx: &XdpContext,
    err: *mut IcmpError,
    quoted: &Quoted,
    direct: bool,
    counters: &mut GlobalCounters,
) -> u32 {
    let flow = FlowKey::ipv4(
        quoted.dst,
        quoted.src,
        quoted.dst_port,
        quoted.src_port,
        quoted.protocol,
    );
    let Some((id, backend)) = flow_backend(&flow, counters) else {
        return XDP_PASS;
    };
    let addr = mapped_ipv4(&backend.addr);
    let ip = unsafe { &raw mut (*err).ip };
    let cache = NEXT_HOP_BACKEND
        .get_ptr_mut(id)
        .unwrap_or(core::ptr::null_mut());
    let route = route_ipv4(ctx, ip, addr, IPPROTO_ICMP, cache, now_ns(), counters);
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    if direct {
        return send_translated(ctx, route, true, counters);
    }
    unsafe {
        let old = (*ip).dst;
        (*ip).check = replace_u32(
            (*ip).check,
            u32::from_ne_bytes(old),
            u32::from_ne_bytes(addr),
        );
        (*ip).dst = addr;
        rewrite_quoted(err, true, addr, backend.port.to_be());
        decrement_ttl(ip);
    }
    send_translated(ctx, route, false, counters)
}

/// An error about a packet sent to a backend: to the client, quoting the VIP instead of the
/// backend.
#[inline(always)]
fn error_to_client(
    ctx: &XdpContext,
    err: *mut IcmpError,
    nat: &ReplyNat,
    counters: &mut GlobalCounters,
) -> u32 {
    let ip = unsafe { &raw mut (*err).ip };
    let client = unsafe { (*ip).dst };
    let route = route_ipv4(
        ctx,
        ip,
        client,
        IPPROTO_ICMP,
        core::ptr::null_mut(),
        now_ns(),
        counters,
    );
    if matches!(route, Route::Local) {
        // About this host's own packet to a backend (a health check).
        counters.local_from_backend_passed += 1;
        return XDP_PASS;
    }
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    let vip = mapped_ipv4(&nat.vip);
    unsafe {
        rewrite_quoted(err, false, vip, nat.vip_port.to_be());
        decrement_ttl(ip);
    }
    send_translated(ctx, route, false, counters)
}

/// Counts a translated error and forwards it on `route` (`direct`: unchanged, to a DSR
/// backend's MAC address).
#[inline(always)]
pub(crate) fn send_translated(
    ctx: &XdpContext,
    route: Route,
    direct: bool,
    counters: &mut GlobalCounters,
) -> u32 {
    counters.icmp_errors_translated += 1;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return XDP_DROP;
    };
    if direct {
        return send_direct(ctx, eth, route, counters);
    }
    send(ctx, eth, route, counters)
}

/// Rewrites the quoted packet's source (`source`) or destination address and port (network
/// order), fixing its IP checksum, its UDP checksum (TCP's lies past the 8 quoted bytes) and the
/// ICMP checksum, which covers all of them.
#[inline(always)]
unsafe fn rewrite_quoted(err: *mut IcmpError, source: bool, addr: [u8; 4], port: u16) {
    unsafe {
        let inner = &raw mut (*err).inner;
        let (addr_field, port_field) = if source {
            (&raw mut (*inner).src, &raw mut (*err).ports.src)
        } else {
            (&raw mut (*inner).dst, &raw mut (*err).ports.dst)
        };
        let old_addr = u32::from_ne_bytes(*addr_field);
        let new_addr = u32::from_ne_bytes(addr);
        let old_port = *port_field;
        let old_ip_check = (*inner).check;
        let new_ip_check = replace_u32(old_ip_check, old_addr, new_addr);
        let mut icmp = (*err).icmp.check;
        icmp = replace_u32(icmp, old_addr, new_addr);
        icmp = replace_u16(icmp, old_port, port);
        icmp = replace_u16(icmp, old_ip_check, new_ip_check);
        if (*inner).protocol == IPPROTO_UDP {
            let old_udp = (*err).rest[1];
            if old_udp != 0 {
                let mut udp = replace_u32(old_udp, old_addr, new_addr);
                udp = replace_u16(udp, old_port, port);
                if udp == 0 {
                    udp = 0xffff;
                }
                icmp = replace_u16(icmp, old_udp, udp);
                (*err).rest[1] = udp;
            }
        }
        *addr_field = addr;
        *port_field = port;
        (*inner).check = new_ip_check;
        (*err).icmp.check = icmp;
    }
}
