//! ICMPv6 for balanced flows. IPv6 routers never fragment, so path MTU discovery is mandatory:
//! a packet too big for the next hop is always answered here with Packet Too Big (RFC 4443
//! §3.2), quoting the packet as its sender sent it, from the address it was sent to (the
//! kernel's own error, after the NAT rewrite, would quote an address the sender never used).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
    EbpfContext,
};
use slb_common::{checksum::fold, GlobalCounters};

use crate::{
    icmp::sum16,
    packet::{ptr_at, EthHdr, Ipv6Hdr, ETH_HDR_LEN, ETH_P_IPV6},
};

pub const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
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
    // The new IPv6 and ICMPv6 headers go in front of the quoted packet (the old Ethernet header
    // is overwritten), which is cut after the quoted part.
    let prefix = (core::mem::size_of::<Ipv6Hdr>() + core::mem::size_of::<Icmp6Hdr>()) as i32;
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -prefix) } != 0 {
        counters.icmp_errors_failed += 1;
        return XDP_DROP;
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    let keep = core::mem::size_of::<TooBigFrame>() as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, keep - len) } != 0 {
        counters.icmp_errors_failed += 1;
        return XDP_DROP;
    }
    let Some(frame) = ptr_at::<TooBigFrame>(ctx, 0) else {
        counters.icmp_errors_failed += 1;
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
