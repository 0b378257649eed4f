//! Building and checking Ethernet frames (IPv4 or IPv6; TCP, UDP, ICMPv6), for packet tests and
//! benchmarks.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::checksum::{internet_checksum, ipv4_pseudo_header_sum, ipv6_pseudo_header_sum};
use crate::{IPPROTO_TCP, IPPROTO_UDP};

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug)]
pub struct L4Spec {
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// UDP only: send checksum 0 ("none").
    pub zero_udp_checksum: bool,
}

impl L4Spec {
    pub fn tcp(src_port: u16, dst_port: u16, tcp_flags: u8) -> L4Spec {
        L4Spec {
            protocol: IPPROTO_TCP,
            src_port,
            dst_port,
            tcp_flags,
            zero_udp_checksum: false,
        }
    }

    pub fn udp(src_port: u16, dst_port: u16) -> L4Spec {
        L4Spec {
            protocol: IPPROTO_UDP,
            src_port,
            dst_port,
            tcp_flags: 0,
            zero_udp_checksum: false,
        }
    }
}

/// The payload every built TCP/UDP frame carries unless told otherwise.
pub const DEFAULT_PAYLOAD: &[u8] = b"hello slb";

/// An Ethernet + IPv4 + TCP/UDP frame with valid checksums and a small payload.
pub fn ipv4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    l4: L4Spec,
) -> Vec<u8> {
    let mut seg = l4_segment(&l4, DEFAULT_PAYLOAD);
    if !l4.zero_udp_checksum {
        let sum = ipv4_pseudo_header_sum(src, dst, l4.protocol, seg.len() as u16);
        write_l4_checksum(&mut seg, l4.protocol, sum);
    }
    ipv4_packet_frame(dst_mac, src_mac, src, dst, l4.protocol, &seg)
}

/// The TCP or UDP segment `l4` describes around `payload`, with its checksum field still 0.
fn l4_segment(l4: &L4Spec, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&l4.src_port.to_be_bytes());
    seg.extend_from_slice(&l4.dst_port.to_be_bytes());
    if l4.protocol == IPPROTO_TCP {
        // seq 1, ack 0, data offset 5 words, flags, window 65535, checksum, urgent.
        seg.extend_from_slice(&[
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0x50,
            l4.tcp_flags,
            0xff,
            0xff,
            0,
            0,
            0,
            0,
        ]);
    } else {
        seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        seg.extend_from_slice(&[0, 0]);
    }
    seg.extend_from_slice(payload);
    seg
}

/// Where a TCP or UDP header keeps its checksum.
fn l4_checksum_at(protocol: u8) -> usize {
    if protocol == IPPROTO_TCP {
        16
    } else {
        6
    }
}

/// Fills in the checksum of `seg` over the pseudo-header sum `pseudo_header_sum`. A UDP checksum
/// that computes to 0 is sent as 0xffff (RFC 768): 0 would mean "no checksum".
fn write_l4_checksum(seg: &mut [u8], protocol: u8, pseudo_header_sum: u32) {
    let at = l4_checksum_at(protocol);
    let mut c = internet_checksum(pseudo_header_sum, seg);
    if protocol == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An Ethernet + IPv4 frame (DF set, TTL 64, valid header checksum) around `payload`.
pub fn ipv4_packet_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = internet_checksum(0, &ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(payload);
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedFrame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ttl: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub l4_checksum: u16,
}

/// Parses an IPv4 TCP/UDP frame without options, checking both checksums. Bytes after the IPv4
/// total length (Ethernet padding) are ignored.
pub fn parse_ipv4_frame(f: &[u8]) -> Result<ParsedFrame, String> {
    if f.len() < 42 {
        return Err(format!("frame of {} bytes is too short", f.len()));
    }
    let ip = &f[14..34];
    if internet_checksum(0, ip) != 0 {
        return Err("IPv4 header checksum is invalid".into());
    }
    let protocol = ip[9];
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total_len < 20 || 14 + total_len > f.len() {
        return Err(format!(
            "IPv4 total length {total_len} does not fit the {}-byte frame",
            f.len()
        ));
    }
    let seg = &f[34..14 + total_len];
    let check_at = l4_checksum_at(protocol);
    if seg.len() < check_at + 2 {
        return Err(format!("L4 segment of {} bytes is too short", seg.len()));
    }
    let l4_checksum = u16::from_be_bytes([seg[check_at], seg[check_at + 1]]);
    if !(protocol == IPPROTO_UDP && l4_checksum == 0) {
        let sum = ipv4_pseudo_header_sum(src, dst, protocol, seg.len() as u16);
        if internet_checksum(sum, seg) != 0 {
            return Err("L4 checksum is invalid".into());
        }
    }
    Ok(ParsedFrame {
        dst_mac: [f[0], f[1], f[2], f[3], f[4], f[5]],
        src_mac: [f[6], f[7], f[8], f[9], f[10], f[11]],
        ttl: ip[8],
        src,
        dst,
        src_port: u16::from_be_bytes([seg[0], seg[1]]),
        dst_port: u16::from_be_bytes([seg[2], seg[3]]),
        l4_checksum,
    })
}

// IPv6 next-header values the builders and parsers know.
pub const NEXTHDR_HOP_BY_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const NEXTHDR_DEST_OPTS: u8 = 60;

/// The smallest MTU an IPv6 link may have (RFC 8200 §5).
pub const IPV6_MIN_MTU: usize = 1280;

const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const ETH_LEN: usize = 14;
const IPV6_LEN: usize = 40;

/// What an IPv6 TCP/UDP frame carries besides its addresses and L4 header. The default is what
/// [`ipv6_frame`] sends: hop limit 64, [`DEFAULT_PAYLOAD`], no extension header.
#[derive(Clone, Copy, Debug)]
pub struct Ipv6FrameOptions<'a> {
    pub hop_limit: u8,
    pub payload: &'a [u8],
    /// An 8-byte extension header of this type between the IPv6 and the L4 header:
    /// [`NEXTHDR_HOP_BY_HOP`] or [`NEXTHDR_DEST_OPTS`] (one PadN option), or [`NEXTHDR_ROUTING`]
    /// (experimental type 253 with no segments left, so every node goes on to the L4 header).
    pub extension_header: Option<u8>,
}

impl Default for Ipv6FrameOptions<'_> {
    fn default() -> Self {
        Ipv6FrameOptions {
            hop_limit: 64,
            payload: DEFAULT_PAYLOAD,
            extension_header: None,
        }
    }
}

/// An Ethernet + IPv6 + TCP/UDP frame with a valid L4 checksum and a small payload: the twin of
/// [`ipv4_frame`].
pub fn ipv6_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    l4: L4Spec,
) -> Vec<u8> {
    ipv6_frame_with(dst_mac, src_mac, src, dst, l4, &Ipv6FrameOptions::default())
}

/// [`ipv6_frame`] with another hop limit, payload or an extension header.
pub fn ipv6_frame_with(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    l4: L4Spec,
    options: &Ipv6FrameOptions,
) -> Vec<u8> {
    let mut seg = l4_segment(&l4, options.payload);
    if !l4.zero_udp_checksum {
        let sum = ipv6_pseudo_header_sum(&src, &dst, seg.len() as u32, l4.protocol);
        write_l4_checksum(&mut seg, l4.protocol, sum);
    }
    let (next_header, payload) = match options.extension_header {
        None => (l4.protocol, seg),
        Some(kind) => {
            let mut with_header = extension_header(kind, l4.protocol).to_vec();
            with_header.extend_from_slice(&seg);
            (kind, with_header)
        }
    };
    ipv6_packet(
        dst_mac,
        src_mac,
        (src, dst),
        next_header,
        options.hop_limit,
        &payload,
    )
}

/// An 8-byte extension header of type `kind` followed by `next_header`.
fn extension_header(kind: u8, next_header: u8) -> [u8; 8] {
    match kind {
        // Header length 0 (8 bytes); the six option bytes are one PadN option (type 1, 4 bytes).
        NEXTHDR_HOP_BY_HOP | NEXTHDR_DEST_OPTS => [next_header, 0, 1, 4, 0, 0, 0, 0],
        // Type 253 (RFC 4727 experiment) with segments left 0 is skipped by every node, unlike the
        // deprecated type 0, which RFC 5095 has dropped.
        NEXTHDR_ROUTING => [next_header, 0, 253, 0, 0, 0, 0, 0],
        _ => panic!("no extension header of type {kind} is built; use ipv6_packet_frame"),
    }
}

/// An Ethernet + IPv6 frame (hop limit 64, traffic class and flow label 0) around `payload`, the
/// twin of [`ipv4_packet_frame`]; `payload` starts with the `next_header` header.
pub fn ipv6_packet_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    next_header: u8,
    payload: &[u8],
) -> Vec<u8> {
    ipv6_packet(dst_mac, src_mac, (src, dst), next_header, 64, payload)
}

fn ipv6_packet(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    (src, dst): ([u8; 16], [u8; 16]),
    next_header: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_LEN + IPV6_LEN + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETHERTYPE_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next_header, hop_limit]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(payload);
    f
}

/// An IPv6 TCP/UDP frame as [`parse_ipv6_frame`] found it, the twin of [`ParsedFrame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedFrame6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub l4_checksum: u16,
}

/// The fixed IPv6 header of `f` checked: long enough, IPv6, version 6, and a payload length that
/// fits the frame. Returns the payload (bytes after it, Ethernet padding, are cut off).
fn ipv6_payload(f: &[u8]) -> Result<&[u8], String> {
    if f.len() < ETH_LEN + IPV6_LEN {
        return Err(format!("frame of {} bytes is too short for IPv6", f.len()));
    }
    if f[12..14] != ETHERTYPE_IPV6 {
        return Err(format!("ethertype {:02x?} is not IPv6", &f[12..14]));
    }
    if f[14] >> 4 != 6 {
        return Err(format!("IP version {} is not 6", f[14] >> 4));
    }
    let payload_len = usize::from(u16::from_be_bytes([f[18], f[19]]));
    let end = ETH_LEN + IPV6_LEN + payload_len;
    if end > f.len() {
        return Err(format!(
            "IPv6 payload length {payload_len} does not fit the {}-byte frame",
            f.len()
        ));
    }
    Ok(&f[ETH_LEN + IPV6_LEN..end])
}

fn ipv6_addrs(f: &[u8]) -> ([u8; 16], [u8; 16]) {
    let addr = |at: usize| -> [u8; 16] { f[at..at + 16].try_into().unwrap() };
    (addr(22), addr(38))
}

/// Parses an IPv6 TCP/UDP frame, checking the L4 checksum over the IPv6 pseudo-header. Hop-by-hop,
/// routing and destination options headers are skipped, and so is an atomic fragment header
/// (offset 0, no more fragments); any other fragment is an error. A UDP checksum of 0 is an error:
/// IPv6 makes the UDP checksum mandatory (RFC 8200 §8.1).
pub fn parse_ipv6_frame(f: &[u8]) -> Result<ParsedFrame6, String> {
    let payload = ipv6_payload(f)?;
    let (src, dst) = ipv6_addrs(f);
    let mut next_header = f[20];
    let mut at = 0;
    while next_header != IPPROTO_TCP && next_header != IPPROTO_UDP {
        if payload.len() < at + 8 {
            return Err(format!(
                "extension header {next_header} at payload byte {at} is cut short"
            ));
        }
        let header = &payload[at..at + 8];
        at += match next_header {
            NEXTHDR_HOP_BY_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST_OPTS => {
                (usize::from(header[1]) + 1) * 8
            }
            NEXTHDR_FRAGMENT => {
                let offset_and_more = u16::from_be_bytes([header[2], header[3]]);
                if offset_and_more & 0xfff9 != 0 {
                    return Err(format!(
                        "a fragment (offset {}, more {}), not a whole datagram",
                        (offset_and_more >> 3) * 8,
                        offset_and_more & 1
                    ));
                }
                8
            }
            other => return Err(format!("next header {other} is neither TCP nor UDP")),
        };
        next_header = header[0];
    }
    let seg = payload.get(at..).ok_or_else(|| {
        format!(
            "extension headers run past the {}-byte payload",
            payload.len()
        )
    })?;
    let protocol = next_header;
    let header_len = if protocol == IPPROTO_TCP { 20 } else { 8 };
    if seg.len() < header_len {
        return Err(format!("L4 segment of {} bytes is too short", seg.len()));
    }
    if protocol == IPPROTO_UDP {
        let udp_len = usize::from(u16::from_be_bytes([seg[4], seg[5]]));
        if udp_len != seg.len() {
            return Err(format!(
                "UDP length {udp_len} is not the {}-byte segment's",
                seg.len()
            ));
        }
    }
    let check_at = l4_checksum_at(protocol);
    let l4_checksum = u16::from_be_bytes([seg[check_at], seg[check_at + 1]]);
    if protocol == IPPROTO_UDP && l4_checksum == 0 {
        return Err("UDP checksum 0 is invalid over IPv6".into());
    }
    let sum = ipv6_pseudo_header_sum(&src, &dst, seg.len() as u32, protocol);
    if internet_checksum(sum, seg) != 0 {
        return Err("L4 checksum is invalid".into());
    }
    Ok(ParsedFrame6 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        hop_limit: f[21],
        src,
        dst,
        src_port: u16::from_be_bytes([seg[0], seg[1]]),
        dst_port: u16::from_be_bytes([seg[2], seg[3]]),
        l4_checksum,
    })
}

// ICMPv6 message types (RFC 4443, RFC 4861).
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
pub const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// ff02::1, where router advertisements go.
pub const IPV6_ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// ff02::2, where router solicitations go.
pub const IPV6_ALL_ROUTERS: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// An Ethernet + IPv6 + ICMPv6 frame of type `kind` and `code` whose message body (everything
/// after the checksum) is `body`, with a valid checksum. Neighbour discovery messages (133-137)
/// get hop limit 255, as RFC 4861 receivers drop them otherwise; the others 64.
pub fn icmpv6_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    kind: u8,
    code: u8,
    body: &[u8],
) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0];
    message.extend_from_slice(body);
    let sum = ipv6_pseudo_header_sum(&src, &dst, message.len() as u32, IPPROTO_ICMPV6);
    let c = internet_checksum(sum, &message);
    message[2..4].copy_from_slice(&c.to_be_bytes());
    let hop_limit = if (133..=137).contains(&kind) { 255 } else { 64 };
    ipv6_packet(
        dst_mac,
        src_mac,
        (src, dst),
        IPPROTO_ICMPV6,
        hop_limit,
        &message,
    )
}

/// An ICMPv6 error (`kind`, `code`, and the 32-bit field after the checksum: the MTU of a Packet
/// Too Big, the pointer of a Parameter Problem, 0 otherwise) from `src` to `dst`, quoting
/// `quoted`: an IPv6 packet or its start, such as `&frame[14..]` or `&frame[14..62]` (header and
/// 8 bytes, as slb's own Packet Too Big quotes). The quote is cut so the message fits the IPv6
/// minimum MTU, as RFC 4443 §2.4 (c) asks of senders.
pub fn icmpv6_error(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    (kind, code, mtu): (u8, u8, u32),
    quoted: &[u8],
) -> Vec<u8> {
    let quoted = &quoted[..quoted.len().min(IPV6_MIN_MTU - IPV6_LEN - 8)];
    let mut body = mtu.to_be_bytes().to_vec();
    body.extend_from_slice(quoted);
    icmpv6_frame(dst_mac, src_mac, src, dst, kind, code, &body)
}

/// An ICMPv6 frame as [`parse_icmpv6_frame`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedIcmpv6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub kind: u8,
    pub code: u8,
    /// Everything after the checksum.
    pub body: Vec<u8>,
}

/// Parses an IPv6 frame carrying ICMPv6 right after the IPv6 header, checking the ICMPv6
/// checksum, which covers the IPv6 pseudo-header.
pub fn parse_icmpv6_frame(f: &[u8]) -> Result<ParsedIcmpv6, String> {
    let message = ipv6_payload(f)?;
    if f[20] != IPPROTO_ICMPV6 {
        return Err(format!("next header {} is not ICMPv6", f[20]));
    }
    if message.len() < 4 {
        return Err(format!(
            "ICMPv6 message of {} bytes is too short",
            message.len()
        ));
    }
    let (src, dst) = ipv6_addrs(f);
    let sum = ipv6_pseudo_header_sum(&src, &dst, message.len() as u32, IPPROTO_ICMPV6);
    if internet_checksum(sum, message) != 0 {
        return Err("ICMPv6 checksum is invalid".into());
    }
    Ok(ParsedIcmpv6 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        hop_limit: f[21],
        src,
        dst,
        kind: message[0],
        code: message[1],
        body: message[4..].to_vec(),
    })
}

/// An ICMPv6 error as [`parse_icmpv6_error`] found it: outer and quoted addresses and ports, the
/// twin of the packet tests' IPv4 `IcmpSeen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedIcmpv6Error {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub hop_limit: u8,
    pub kind: u8,
    pub code: u8,
    /// The 32-bit field after the checksum (the MTU of a Packet Too Big).
    pub mtu: u32,
    pub inner_src: [u8; 16],
    pub inner_dst: [u8; 16],
    pub inner_ports: (u16, u16),
}

/// Parses an ICMPv6 error (types 1-4) quoting a TCP or UDP packet over IPv6, checking the ICMPv6
/// checksum. The quoted L4 checksum is not checked: a quote is usually cut short.
pub fn parse_icmpv6_error(f: &[u8]) -> Result<ParsedIcmpv6Error, String> {
    let icmp = parse_icmpv6_frame(f)?;
    if !(ICMPV6_DEST_UNREACHABLE..=ICMPV6_PARAMETER_PROBLEM).contains(&icmp.kind) {
        return Err(format!("ICMPv6 type {} is not an error", icmp.kind));
    }
    // The 4-byte field, the quoted IPv6 header and the ports.
    let body = &icmp.body;
    if body.len() < 4 + IPV6_LEN + 4 {
        return Err(format!(
            "ICMPv6 error quoting {} bytes is too short",
            body.len().saturating_sub(4)
        ));
    }
    let inner = &body[4..];
    if inner[0] >> 4 != 6 {
        return Err(format!("quoted IP version {} is not 6", inner[0] >> 4));
    }
    if inner[6] != IPPROTO_TCP && inner[6] != IPPROTO_UDP {
        return Err(format!(
            "quoted next header {} is neither TCP nor UDP",
            inner[6]
        ));
    }
    let port = |at: usize| u16::from_be_bytes([inner[at], inner[at + 1]]);
    Ok(ParsedIcmpv6Error {
        src: icmp.src,
        dst: icmp.dst,
        hop_limit: icmp.hop_limit,
        kind: icmp.kind,
        code: icmp.code,
        mtu: u32::from_be_bytes(body[0..4].try_into().unwrap()),
        inner_src: inner[8..24].try_into().unwrap(),
        inner_dst: inner[24..40].try_into().unwrap(),
        inner_ports: (port(40), port(42)),
    })
}

/// The Ethernet address an IPv6 multicast address maps to (RFC 2464 §7).
pub fn ipv6_multicast_mac(group: [u8; 16]) -> [u8; 6] {
    [0x33, 0x33, group[12], group[13], group[14], group[15]]
}

/// The solicited-node multicast group of `addr` (RFC 4291 §2.7.1), where its solicitations go.
pub fn solicited_node_group(addr: [u8; 16]) -> [u8; 16] {
    let mut group = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    group[13..16].copy_from_slice(&addr[13..16]);
    group
}

/// A link-layer address option (type 1 source, 2 target) of `mac`.
fn link_layer_option(kind: u8, mac: [u8; 6]) -> [u8; 8] {
    [kind, 1, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]
}

/// A neighbour solicitation for `target` from `src` (`::` for duplicate address detection, which
/// carries no source link-layer option) to `target`'s solicited-node group.
pub fn neighbour_solicitation(src_mac: [u8; 6], src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
    let group = solicited_node_group(target);
    let mut body = vec![0; 4];
    body.extend_from_slice(&target);
    if src != [0; 16] {
        body.extend_from_slice(&link_layer_option(1, src_mac));
    }
    icmpv6_frame(
        ipv6_multicast_mac(group),
        src_mac,
        src,
        group,
        ICMPV6_NEIGHBOUR_SOLICITATION,
        0,
        &body,
    )
}

/// A solicited neighbour advertisement (Solicited and Override set) of `target` at `src_mac`.
pub fn neighbour_advertisement(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    target: [u8; 16],
) -> Vec<u8> {
    let mut body = vec![0x60, 0, 0, 0];
    body.extend_from_slice(&target);
    body.extend_from_slice(&link_layer_option(2, src_mac));
    icmpv6_frame(
        dst_mac,
        src_mac,
        src,
        dst,
        ICMPV6_NEIGHBOUR_ADVERTISEMENT,
        0,
        &body,
    )
}

/// A router solicitation from `src` to all routers.
pub fn router_solicitation(src_mac: [u8; 6], src: [u8; 16]) -> Vec<u8> {
    let mut body = vec![0; 4];
    if src != [0; 16] {
        body.extend_from_slice(&link_layer_option(1, src_mac));
    }
    icmpv6_frame(
        ipv6_multicast_mac(IPV6_ALL_ROUTERS),
        src_mac,
        src,
        IPV6_ALL_ROUTERS,
        ICMPV6_ROUTER_SOLICITATION,
        0,
        &body,
    )
}

/// A router advertisement from `src` (a link-local address) to all nodes: hop limit 64, router
/// lifetime 1800 s, and its link-layer address.
pub fn router_advertisement(src_mac: [u8; 6], src: [u8; 16]) -> Vec<u8> {
    let mut body = vec![64, 0];
    body.extend_from_slice(&1800u16.to_be_bytes());
    // Reachable time and retransmission timer: unspecified.
    body.extend_from_slice(&[0; 8]);
    body.extend_from_slice(&link_layer_option(1, src_mac));
    icmpv6_frame(
        ipv6_multicast_mac(IPV6_ALL_NODES),
        src_mac,
        src,
        IPV6_ALL_NODES,
        ICMPV6_ROUTER_ADVERTISEMENT,
        0,
        &body,
    )
}

/// An echo request (identifier `id`, sequence `seq`, [`DEFAULT_PAYLOAD`]).
pub fn echo_request(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    (id, seq): (u16, u16),
) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(DEFAULT_PAYLOAD);
    icmpv6_frame(dst_mac, src_mac, src, dst, ICMPV6_ECHO_REQUEST, 0, &body)
}

/// A UDP datagram with `payload_len` bytes of payload cut into IPv6 fragments for a link of `mtu`
/// bytes, as the sender's kernel does: one frame per fragment, each with a fragment header
/// (identification `id`, offset, M flag), the UDP checksum over the whole datagram in the first.
/// A datagram that fits in one fragment gives one atomic fragment (offset 0, M clear).
pub fn ipv6_udp_fragments(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    (src, src_port): ([u8; 16], u16),
    (dst, dst_port): ([u8; 16], u16),
    payload_len: usize,
    id: u32,
    mtu: usize,
) -> Vec<Vec<u8>> {
    assert!(
        mtu >= IPV6_LEN + 16,
        "an MTU of {mtu} leaves no room for 8 bytes of a fragment"
    );
    // Every fragment but the last carries a multiple of 8 bytes (offsets count 8-byte units).
    let per_fragment = (mtu - IPV6_LEN - 8) / 8 * 8;
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7) as u8).collect();
    let mut datagram = l4_segment(&L4Spec::udp(src_port, dst_port), &payload);
    let sum = ipv6_pseudo_header_sum(&src, &dst, datagram.len() as u32, IPPROTO_UDP);
    write_l4_checksum(&mut datagram, IPPROTO_UDP, sum);
    let chunks: Vec<&[u8]> = datagram.chunks(per_fragment).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(k, chunk)| {
            let more = u16::from(k + 1 < chunks.len());
            let offset_and_more = (k * per_fragment) as u16 | more;
            let mut payload = vec![IPPROTO_UDP, 0];
            payload.extend_from_slice(&offset_and_more.to_be_bytes());
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(chunk);
            ipv6_packet_frame(dst_mac, src_mac, src, dst, NEXTHDR_FRAGMENT, &payload)
        })
        .collect()
}

/// Checks that `frames` are the fragments of one UDP datagram, in order: the same addresses, hop
/// limit and identification, offsets that follow on, M set on all but the last. Reassembles them
/// and checks the UDP length and checksum (0 is refused, as in [`parse_ipv6_frame`]). The MACs are
/// the first frame's.
pub fn parse_ipv6_udp_fragments(frames: &[Vec<u8>]) -> Result<ParsedFrame6, String> {
    let first = frames.first().ok_or("no fragments")?;
    let mut datagram = Vec::new();
    let mut first_id = None;
    for (k, f) in frames.iter().enumerate() {
        let payload = ipv6_payload(f)?;
        if f[20] != NEXTHDR_FRAGMENT {
            return Err(format!(
                "frame {k}: next header {} is not a fragment header",
                f[20]
            ));
        }
        if payload.len() < 8 {
            return Err(format!("frame {k}: the fragment header is cut short"));
        }
        if (f[21], ipv6_addrs(f)) != (first[21], ipv6_addrs(first)) {
            return Err(format!(
                "frame {k}: addresses or hop limit differ from the first's"
            ));
        }
        let header = &payload[..8];
        let id = u32::from_be_bytes(header[4..8].try_into().unwrap());
        if *first_id.get_or_insert(id) != id {
            return Err(format!(
                "frame {k}: identification {id:#x} differs from the first's"
            ));
        }
        if header[0] != IPPROTO_UDP {
            return Err(format!(
                "frame {k}: the fragment's next header {} is not UDP",
                header[0]
            ));
        }
        let offset_and_more = u16::from_be_bytes([header[2], header[3]]);
        let offset = usize::from(offset_and_more & 0xfff8);
        if offset != datagram.len() {
            return Err(format!(
                "frame {k}: offset {offset}, expected {}",
                datagram.len()
            ));
        }
        let more = offset_and_more & 1 == 1;
        if more != (k + 1 < frames.len()) {
            return Err(format!("frame {k} of {}: M flag {more}", frames.len()));
        }
        datagram.extend_from_slice(&payload[8..]);
    }
    if datagram.len() < 8 {
        return Err(format!(
            "reassembled datagram of {} bytes is too short",
            datagram.len()
        ));
    }
    let udp_len = usize::from(u16::from_be_bytes([datagram[4], datagram[5]]));
    if udp_len != datagram.len() {
        return Err(format!(
            "UDP length {udp_len} is not the reassembled {} bytes",
            datagram.len()
        ));
    }
    let l4_checksum = u16::from_be_bytes([datagram[6], datagram[7]]);
    if l4_checksum == 0 {
        return Err("UDP checksum 0 is invalid over IPv6".into());
    }
    let (src, dst) = ipv6_addrs(first);
    let sum = ipv6_pseudo_header_sum(&src, &dst, datagram.len() as u32, IPPROTO_UDP);
    if internet_checksum(sum, &datagram) != 0 {
        return Err("L4 checksum is invalid".into());
    }
    Ok(ParsedFrame6 {
        dst_mac: first[0..6].try_into().unwrap(),
        src_mac: first[6..12].try_into().unwrap(),
        hop_limit: first[21],
        src,
        dst,
        src_port: u16::from_be_bytes([datagram[0], datagram[1]]),
        dst_port: u16::from_be_bytes([datagram[2], datagram[3]]),
        l4_checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_and_corruption_is_caught() {
        let f = ipv4_frame(
            [1; 6],
            [2; 6],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            L4Spec::tcp(1234, 80, TCP_SYN),
        );
        let p = parse_ipv4_frame(&f).unwrap();
        assert_eq!(
            (p.src_port, p.dst_port, p.ttl, p.dst_mac),
            (1234, 80, 64, [1; 6])
        );
        let mut bad = f.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            parse_ipv4_frame(&bad).unwrap_err(),
            "L4 checksum is invalid"
        );
        let mut spec = L4Spec::udp(5, 53);
        spec.zero_udp_checksum = true;
        let u = ipv4_frame([1; 6], [2; 6], [10, 0, 0, 1], [10, 0, 0, 2], spec);
        assert_eq!(parse_ipv4_frame(&u).unwrap().l4_checksum, 0);
    }

    const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const VIP6: [u8; 16] = [0xfd, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

    #[test]
    fn ipv6_frames_parse_back_with_their_checksum_hop_limit_and_ports() {
        for l4 in [L4Spec::tcp(40000, 80, TCP_SYN), L4Spec::udp(40001, 53)] {
            let f = ipv6_frame([1; 6], [2; 6], CLIENT6, VIP6, l4);
            assert_eq!(f.len(), 14 + 40 + if l4.protocol == 6 { 20 } else { 8 } + 9);
            assert_eq!(
                (&f[12..14], f[14] >> 4, f[20]),
                (&[0x86, 0xdd][..], 6, l4.protocol)
            );
            let p = parse_ipv6_frame(&f).unwrap();
            let check_at = 54 + l4_checksum_at(l4.protocol);
            assert_eq!(
                p,
                ParsedFrame6 {
                    dst_mac: [1; 6],
                    src_mac: [2; 6],
                    hop_limit: 64,
                    src: CLIENT6,
                    dst: VIP6,
                    src_port: l4.src_port,
                    dst_port: l4.dst_port,
                    l4_checksum: u16::from_be_bytes([f[check_at], f[check_at + 1]]),
                }
            );
            // Ethernet padding after the IPv6 payload is not part of the segment.
            let mut padded = f.clone();
            padded.extend_from_slice(&[0; 6]);
            assert_eq!(parse_ipv6_frame(&padded), Ok(p));
        }
    }

    #[test]
    fn ipv6_frame_options_set_hop_limit_payload_and_extension_header() {
        let payload = [7u8; 101];
        for extension in [NEXTHDR_HOP_BY_HOP, NEXTHDR_ROUTING, NEXTHDR_DEST_OPTS] {
            let options = Ipv6FrameOptions {
                hop_limit: 1,
                payload: &payload,
                extension_header: Some(extension),
            };
            let f = ipv6_frame_with(
                [1; 6],
                [2; 6],
                CLIENT6,
                VIP6,
                L4Spec::tcp(1, 443, TCP_ACK),
                &options,
            );
            assert_eq!(
                f[20], extension,
                "the IPv6 header points at the extension header"
            );
            assert_eq!(f[54], IPPROTO_TCP, "which points at TCP");
            assert_eq!(
                usize::from(u16::from_be_bytes([f[18], f[19]])),
                8 + 20 + 101
            );
            let p = parse_ipv6_frame(&f).unwrap();
            assert_eq!((p.hop_limit, p.src_port, p.dst_port), (1, 1, 443));
            assert_eq!(&f[f.len() - 101..], &payload[..]);
        }
    }

    #[test]
    fn ipv6_corruption_short_frames_and_zero_udp_checksums_are_reported() {
        let f = ipv6_frame(
            [1; 6],
            [2; 6],
            CLIENT6,
            VIP6,
            L4Spec::tcp(1234, 80, TCP_SYN),
        );
        // Any flipped byte the checksum covers: an address, a port, the payload.
        for at in [22, 53, 54, f.len() - 1] {
            let mut bad = f.clone();
            bad[at] ^= 0x40;
            assert_eq!(
                parse_ipv6_frame(&bad).unwrap_err(),
                "L4 checksum is invalid",
                "byte {at}"
            );
        }
        // The hop limit is in no checksum.
        let mut hop = f.clone();
        hop[21] = 1;
        assert_eq!(parse_ipv6_frame(&hop).unwrap().hop_limit, 1);

        let mut spec = L4Spec::udp(5, 53);
        spec.zero_udp_checksum = true;
        let u = ipv6_frame([1; 6], [2; 6], CLIENT6, VIP6, spec);
        assert_eq!(
            parse_ipv6_frame(&u).unwrap_err(),
            "UDP checksum 0 is invalid over IPv6"
        );

        let mut version4 = f.clone();
        version4[14] = 0x40;
        assert!(parse_ipv6_frame(&version4)
            .unwrap_err()
            .contains("version 4"));
        let mut too_long = f.clone();
        too_long[18..20].copy_from_slice(&1000u16.to_be_bytes());
        assert!(parse_ipv6_frame(&too_long)
            .unwrap_err()
            .contains("does not fit"));
        assert!(parse_ipv6_frame(&f[..50])
            .unwrap_err()
            .contains("too short"));
        assert!(parse_ipv4_frame(&f).is_err(), "not an IPv4 frame");
    }

    #[test]
    fn a_computed_udp_checksum_of_zero_is_sent_as_all_ones() {
        // Payload words chosen so the datagram sums to 0xffff: its checksum computes to 0.
        let l4 = L4Spec::udp(0, 0);
        let seg = l4_segment(&l4, &[0, 0]);
        let sum = ipv6_pseudo_header_sum(&[0; 16], &[0; 16], seg.len() as u32, IPPROTO_UDP);
        let rest = 0xffff - fold_sum(sum + u32::from(u16::from_be_bytes([seg[4], seg[5]])));
        let payload = rest.to_be_bytes();
        let mut unfixed = l4_segment(&l4, &payload);
        unfixed[6..8].fill(0);
        assert_eq!(
            internet_checksum(sum, &unfixed),
            0,
            "the checksum computes to 0"
        );
        let options = Ipv6FrameOptions {
            payload: &payload,
            ..Default::default()
        };
        let f = ipv6_frame_with([1; 6], [2; 6], [0; 16], [0; 16], l4, &options);
        let p = parse_ipv6_frame(&f).unwrap();
        assert_eq!(p.l4_checksum, 0xffff);
    }

    fn fold_sum(mut sum: u32) -> u16 {
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn icmpv6_errors_parse_back_with_their_quote_and_checksum() {
        let router = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];
        for l4 in [L4Spec::tcp(80, 40000, TCP_ACK), L4Spec::udp(53, 40001)] {
            let reply = ipv6_frame([3; 6], [4; 6], VIP6, CLIENT6, l4);
            for (kind, code, mtu) in [
                (ICMPV6_DEST_UNREACHABLE, 4, 0),
                (ICMPV6_PACKET_TOO_BIG, 0, 1280),
                (ICMPV6_TIME_EXCEEDED, 0, 0),
            ] {
                for quoted in [&reply[14..], &reply[14..62]] {
                    let f = icmpv6_error([1; 6], [2; 6], router, VIP6, (kind, code, mtu), quoted);
                    assert_eq!(f.len(), 14 + 40 + 8 + quoted.len());
                    assert_eq!(&f[62..], quoted, "quoted as given");
                    assert_eq!(
                        parse_icmpv6_error(&f),
                        Ok(ParsedIcmpv6Error {
                            src: router,
                            dst: VIP6,
                            hop_limit: 64,
                            kind,
                            code,
                            mtu,
                            inner_src: VIP6,
                            inner_dst: CLIENT6,
                            inner_ports: (l4.src_port, l4.dst_port),
                        })
                    );
                }
            }
        }
    }

    #[test]
    fn icmpv6_error_checksums_cover_the_pseudo_header_and_the_quote() {
        let reply = ipv6_frame([3; 6], [4; 6], VIP6, CLIENT6, L4Spec::udp(53, 40001));
        let f = icmpv6_error([1; 6], [2; 6], CLIENT6, VIP6, (2, 0, 1400), &reply[14..]);
        // Outer source, outer destination (only in the pseudo-header), the MTU, a quoted port.
        for at in [30, 53, 61, 62 + 41] {
            let mut bad = f.clone();
            bad[at] ^= 1;
            assert_eq!(
                parse_icmpv6_error(&bad).unwrap_err(),
                "ICMPv6 checksum is invalid",
                "byte {at}"
            );
        }
        let mut not_an_error = f.clone();
        not_an_error[54] = ICMPV6_ECHO_REQUEST;
        assert!(parse_icmpv6_error(&not_an_error).is_err());
        // A quote too short for the ports, and one of a non-TCP/UDP packet, are refused.
        let short = icmpv6_error([1; 6], [2; 6], CLIENT6, VIP6, (1, 0, 0), &reply[14..56]);
        assert!(parse_icmpv6_error(&short)
            .unwrap_err()
            .contains("too short"));
        let echo = echo_request([1; 6], [2; 6], VIP6, CLIENT6, (1, 1));
        let about_echo = icmpv6_error([1; 6], [2; 6], CLIENT6, VIP6, (1, 0, 0), &echo[14..]);
        assert!(parse_icmpv6_error(&about_echo)
            .unwrap_err()
            .contains("neither TCP nor UDP"));
    }

    #[test]
    fn an_icmpv6_error_quote_is_cut_to_fit_the_minimum_mtu() {
        let payload = [9u8; 1500];
        let options = Ipv6FrameOptions {
            payload: &payload,
            ..Default::default()
        };
        let big = ipv6_frame_with(
            [1; 6],
            [2; 6],
            CLIENT6,
            VIP6,
            L4Spec::tcp(1, 80, TCP_ACK),
            &options,
        );
        let f = icmpv6_error([2; 6], [1; 6], VIP6, CLIENT6, (2, 0, 1280), &big[14..]);
        assert_eq!(f.len() - 14, IPV6_MIN_MTU);
        assert_eq!(&f[62..], &big[14..14 + 1232]);
        assert_eq!(parse_icmpv6_error(&f).unwrap().inner_ports, (1, 80));
    }

    #[test]
    fn neighbour_discovery_and_echo_frames_are_valid_icmpv6() {
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0xff, 0xfe, 0, 0, 1];
        let target = [
            0xfd, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56,
        ];
        let group = [
            0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0x12, 0x34, 0x56,
        ];
        let mac = [2, 0, 0, 0, 0, 1];
        let cases = [
            (
                neighbour_solicitation(mac, link_local, target),
                135,
                255,
                group,
                28,
            ),
            (
                neighbour_solicitation(mac, [0; 16], target),
                135,
                255,
                group,
                20,
            ),
            (
                neighbour_advertisement([7; 6], mac, target, link_local, target),
                136,
                255,
                link_local,
                28,
            ),
            (
                router_solicitation(mac, link_local),
                133,
                255,
                IPV6_ALL_ROUTERS,
                12,
            ),
            (
                router_advertisement(mac, link_local),
                134,
                255,
                IPV6_ALL_NODES,
                20,
            ),
            (
                echo_request([7; 6], mac, CLIENT6, VIP6, (7, 1)),
                128,
                64,
                VIP6,
                13,
            ),
        ];
        for (f, kind, hop_limit, dst, body_len) in cases {
            let p = parse_icmpv6_frame(&f).unwrap_or_else(|e| panic!("{e}: {f:02x?}"));
            assert_eq!(
                (p.kind, p.code, p.hop_limit, p.dst, p.body.len()),
                (kind, 0, hop_limit, dst, body_len),
                "{f:02x?}"
            );
            assert_eq!(p.src_mac, mac);
            if dst[0] == 0xff {
                assert_eq!(p.dst_mac, [0x33, 0x33, dst[12], dst[13], dst[14], dst[15]]);
            }
            let mut bad = f.clone();
            *bad.last_mut().unwrap() ^= 0x80;
            assert_eq!(
                parse_icmpv6_frame(&bad).unwrap_err(),
                "ICMPv6 checksum is invalid"
            );
        }
    }

    #[test]
    fn ipv6_udp_fragments_carry_the_fragment_header_and_reassemble() {
        let frames = ipv6_udp_fragments(
            [1; 6],
            [2; 6],
            (CLIENT6, 41000),
            (VIP6, 53),
            3000,
            0xdead_beef,
            1500,
        );
        // 3008 datagram bytes at 1448 per fragment (1500 - 40 - 8, a multiple of 8).
        assert_eq!(
            frames.iter().map(Vec::len).collect::<Vec<_>>(),
            [1510, 1510, 14 + 48 + 112]
        );
        for (k, f) in frames.iter().enumerate() {
            assert_eq!((f[20], f[54]), (NEXTHDR_FRAGMENT, IPPROTO_UDP));
            let offset_and_more = u16::from_be_bytes([f[56], f[57]]);
            assert_eq!(usize::from(offset_and_more & 0xfff8), k * 1448);
            assert_eq!(offset_and_more & 1 == 1, k < 2);
            assert_eq!(&f[58..62], &0xdead_beefu32.to_be_bytes());
        }
        let p = parse_ipv6_udp_fragments(&frames).unwrap();
        assert_eq!(
            (p.src, p.src_port, p.dst, p.dst_port, p.hop_limit),
            (CLIENT6, 41000, VIP6, 53, 64)
        );
        // A first fragment alone is no whole datagram.
        assert!(parse_ipv6_frame(&frames[0])
            .unwrap_err()
            .contains("a fragment"));
    }

    #[test]
    fn broken_fragment_sets_are_reported() {
        let frames =
            ipv6_udp_fragments([1; 6], [2; 6], (CLIENT6, 41000), (VIP6, 53), 3000, 9, 1280);
        let check = |frames: &[Vec<u8>], expect: &str| {
            let e = parse_ipv6_udp_fragments(frames).unwrap_err();
            assert!(e.contains(expect), "{e:?} should say {expect:?}");
        };
        let mut corrupt = frames.clone();
        corrupt[2][70] ^= 1;
        check(&corrupt, "L4 checksum is invalid");
        check(&frames[..2], "M flag");
        check(&[frames[0].clone(), frames[2].clone()], "offset");
        let mut other_id = frames.clone();
        other_id[1][61] ^= 1;
        check(&other_id, "identification");
        let mut other_src = frames.clone();
        other_src[1][37] ^= 1;
        check(&other_src, "addresses");
    }

    #[test]
    fn a_datagram_that_fits_is_one_atomic_fragment_parsed_as_whole() {
        let frames = ipv6_udp_fragments([1; 6], [2; 6], (CLIENT6, 41000), (VIP6, 53), 100, 3, 1500);
        assert_eq!(frames.len(), 1);
        assert_eq!(&frames[0][56..58], &[0, 0], "offset 0, M clear");
        let whole = parse_ipv6_frame(&frames[0]).unwrap();
        assert_eq!(parse_ipv6_udp_fragments(&frames), Ok(whole));
        assert_eq!((whole.src_port, whole.dst_port), (41000, 53));
    }
}
