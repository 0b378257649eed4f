//! Building and checking Ethernet/IPv4/TCP/UDP frames, for packet tests and benchmarks.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::checksum::{internet_checksum, ipv4_pseudo_header_sum};
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
}
