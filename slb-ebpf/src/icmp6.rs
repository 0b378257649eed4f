//! ICMPv6 for balanced flows. IPv6 routers never fragment, so path MTU discovery is mandatory:
//! - a packet too big for the next hop is always answered here with Packet Too Big (RFC 4443
//!   §3.2), quoting the packet as its sender sent it, from the address it was sent to (the
//!   kernel's own error, after the NAT rewrite, would quote an address the sender never used);
//! - Destination Unreachable, Packet Too Big and Time Exceeded about a balanced flow are
//!   translated as their ICMP twins are (`icmp.rs`): about a packet the VIP sent, to the backend
//!   serving the flow; about a packet sent to a backend, to the client, quoting the VIP. Unlike
//!   ICMP's, the ICMPv6 checksum covers the outer addresses (a pseudo-header), so changing the
//!   outer destination changes it too.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use core::ops::ControlFlow;
use slb_common::{
    addr_from_words, addr_words,
    checksum::{apply, delta_addr_words, delta_u16, fold},
    BackendEndpoint, FlowKey, GlobalCounters, ListenerKey, ReplyNat, IPPROTO_TCP, IPPROTO_UDP,
    LISTENER_F_DSR,
};

use crate::{
    balancer6::hop_limit_expired,
    forward::{now_ns, route_ipv6, Route},
    icmp::{flow_backend, reframe, send_translated, sum16},
    maps::{LISTENERS, NEXT_HOP_BACKEND6, REPLY_NAT},
    packet::{ptr_at, EthHdr, Ipv6Hdr, Ports, ETH_HDR_LEN, ETH_P_IPV6},
};

pub const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// The smallest MTU an IPv6 link may have (RFC 8200 §5).
const IPV6_MIN_MTU: u32 = 1280;
/// What Packet Too Big quotes: the IPv6 header and the first 8 bytes of its payload (the ports
/// and, for TCP, the sequence number: all a receiver needs to find its socket).
const QUOTED: usize = 48;

#[repr(C)]
struct Icmp6Hdr {
    kind: u8,
    code: u8,
    check: u16,
    /// Packet Too Big: the MTU, network order.
    mtu: u32,
}

/// The frame Packet Too Big is built in. Packed to 2: the IPv6 header's 32-bit fields would
/// otherwise put 2 bytes of padding after the 14-byte Ethernet header.
#[repr(C, packed(2))]
struct TooBigFrame {
    eth: EthHdr,
    ip: Ipv6Hdr,
    icmp: Icmp6Hdr,
    quoted: [u16; QUOTED / 2],
}

/// Answers the IPv6 packet in `ctx` (as received: nothing rewritten yet) with Packet Too Big,
/// MTU `mtu`, back out of the interface it came in on.
#[inline(always)]
pub fn reply_too_big(ctx: &XdpContext, mtu: u16, counters: &mut GlobalCounters) -> u32 {
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv6Hdr>(ctx, ETH_HDR_LEN),
    ) else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    let (sender_mac, our_mac, sender, addressed) =
        unsafe { ((*eth).src, (*eth).dst, (*ip).src, (*ip).dst) };
    // Room for the new IPv6 and ICMPv6 headers in front of the quoted packet.
    let prefix = core::mem::size_of::<Ipv6Hdr>() + core::mem::size_of::<Icmp6Hdr>();
    let Some(frame) = reframe::<TooBigFrame>(ctx, prefix, counters) else {
        return XDP_DROP;
    };
    let icmp_len = (core::mem::size_of::<Icmp6Hdr>() + QUOTED) as u16;
    unsafe {
        (*frame).eth = EthHdr {
            dst: sender_mac,
            src: our_mac,
            ether_type: ETH_P_IPV6.to_be(),
        };
        (*frame).ip = Ipv6Hdr {
            version_class_flow: (6u32 << 28).to_be(),
            payload_len: icmp_len.to_be(),
            next_header: IPPROTO_ICMPV6,
            hop_limit: 64,
            src: addressed,
            dst: sender,
        };
        (*frame).icmp = Icmp6Hdr {
            kind: ICMPV6_PACKET_TOO_BIG,
            code: 0,
            check: 0,
            mtu: u32::from(mtu).max(IPV6_MIN_MTU).to_be(),
        };
        // The pseudo-header: both addresses (contiguous in the header), the upper-layer length
        // and the next header, each a 32-bit big-endian field.
        let addresses = sum16(&raw const (*frame).ip.src as *const [u16; 16]);
        let pseudo =
            addresses + u32::from(icmp_len.to_be()) + u32::from(u16::from(IPPROTO_ICMPV6).to_be());
        let message = sum16(&raw const (*frame).icmp as *const [u16; 4 + QUOTED / 2]);
        (*frame).icmp.check = !fold(pseudo + message);
    }
    counters.icmp_too_big_sent += 1;
    XDP_TX
}

/// An ICMPv6 error from its IPv6 header to the first 8 bytes of the quoted packet's payload.
#[repr(C)]
struct IcmpError {
    ip: Ipv6Hdr,
    icmp: Icmp6Hdr,
    inner: Ipv6Hdr,
    ports: Ports,
    /// UDP: length and checksum; TCP: the sequence number.
    rest: [u16; 2],
}

/// The TCP or UDP packet an ICMPv6 error quotes: addresses (words), ports (host order),
/// protocol.
struct Quoted {
    src: [u32; 4],
    dst: [u32; 4],
    src_port: u16,
    dst_port: u16,
    protocol: u8,
}

/// The `slb_xdp6_icmp` program, to which `slb_xdp6` hands ICMPv6 (whose IPv6 header it has
/// checked): a program of its own, as inlined into `slb_xdp6` it would not fit its 512-byte
/// stack.
#[xdp]
pub fn slb_xdp6_icmp(ctx: XdpContext) -> u32 {
    let Some(counters) = crate::maps::global_counters() else {
        return XDP_PASS;
    };
    translate_error(&ctx, counters)
}

/// An ICMPv6 packet arriving at the balancer: an error about a balanced flow is translated;
/// anything else (neighbour discovery, router advertisements, echo, MLD, errors about other
/// traffic) passes.
#[inline(always)]
fn translate_error(ctx: &XdpContext, counters: &mut GlobalCounters) -> u32 {
    let (err, quoted) = match parse_error(ctx, counters) {
        ControlFlow::Continue(parsed) => parsed,
        ControlFlow::Break(verdict) => return verdict,
    };
    // About a packet the VIP sent: to the backend serving the flow.
    let listener = ListenerKey {
        vip: addr_from_words(quoted.src),
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
        addr: addr_from_words(quoted.dst),
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

/// The error and the packet it quotes, or the verdict (pass) on ICMPv6 that is not an error this
/// program translates: another type, a quoted packet with extension headers, neither TCP nor UDP.
#[inline(always)]
fn parse_error(
    ctx: &XdpContext,
    counters: &mut GlobalCounters,
) -> ControlFlow<u32, (*mut IcmpError, Quoted)> {
    let Some(err) = ptr_at::<IcmpError>(ctx, ETH_HDR_LEN) else {
        counters.not_for_us_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    };
    let (kind, inner_version, protocol) = unsafe {
        (
            (*err).icmp.kind,
            u32::from_be((*err).inner.version_class_flow) >> 28,
            (*err).inner.next_header,
        )
    };
    if !matches!(
        kind,
        ICMPV6_DEST_UNREACHABLE | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
    ) || inner_version != 6
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
    let flow = FlowKey::ipv6(
        quoted.dst,
        quoted.src,
        quoted.dst_port,
        quoted.src_port,
        quoted.protocol,
    );
    let Some((id, backend)) = flow_backend(&flow, counters) else {
        return XDP_PASS;
    };
    let addr = addr_words(&backend.addr);
    let ip = unsafe { &raw mut (*err).ip };
    let cache = NEXT_HOP_BACKEND6
        .get_ptr_mut(id)
        .unwrap_or(core::ptr::null_mut());
    let route = route_ipv6(ctx, ip, addr, IPPROTO_ICMPV6, cache, now_ns(), counters);
    if hop_limit_expired(ip, counters) {
        return XDP_PASS;
    }
    if direct {
        return send_translated(ctx, route, true, counters);
    }
    unsafe {
        // The outer destination is in the ICMPv6 checksum's pseudo-header.
        let outer_delta = delta_addr_words((*ip).dst, addr);
        (*ip).dst = addr;
        rewrite_quoted(err, true, addr, backend.port.to_be(), outer_delta);
        (*ip).hop_limit -= 1;
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
    let route = route_ipv6(
        ctx,
        ip,
        client,
        IPPROTO_ICMPV6,
        core::ptr::null_mut(),
        now_ns(),
        counters,
    );
    if matches!(route, Route::Local) {
        // About this host's own packet to a backend (a health check).
        counters.local_from_backend_passed += 1;
        return XDP_PASS;
    }
    if hop_limit_expired(ip, counters) {
        return XDP_PASS;
    }
    unsafe {
        rewrite_quoted(err, false, addr_words(&nat.vip), nat.vip_port.to_be(), 0);
        (*ip).hop_limit -= 1;
    }
    send_translated(ctx, route, false, counters)
}

/// Rewrites the quoted packet's source (`source`) or destination address and port (network
/// order), fixing its UDP checksum (TCP's lies past the 8 quoted bytes; the quoted IPv6 header
/// has none) and the ICMPv6 checksum, which covers all of them plus `outer_delta`, the change
/// of the outer addresses.
#[inline(always)]
unsafe fn rewrite_quoted(
    err: *mut IcmpError,
    source: bool,
    addr: [u32; 4],
    port: u16,
    outer_delta: u32,
) {
    unsafe {
        let inner = &raw mut (*err).inner;
        let (addr_field, port_field) = if source {
            (&raw mut (*inner).src, &raw mut (*err).ports.src)
        } else {
            (&raw mut (*inner).dst, &raw mut (*err).ports.dst)
        };
        let quoted_delta = delta_addr_words(*addr_field, addr) + delta_u16(*port_field, port);
        let mut icmp_delta = outer_delta + quoted_delta;
        if (*inner).next_header == IPPROTO_UDP {
            let old_udp = (*err).rest[1];
            let mut udp = apply(old_udp, quoted_delta);
            if udp == 0 {
                udp = 0xffff;
            }
            icmp_delta += delta_u16(old_udp, udp);
            (*err).rest[1] = udp;
        }
        *addr_field = addr;
        *port_field = port;
        (*err).icmp.check = apply((*err).icmp.check, icmp_delta);
    }
}
