//! Incremental Internet checksum updates (RFC 1624, eqn. 3). The 16-bit words are taken exactly as
//! they sit in memory (native-endian loads of network-order bytes); one's-complement sums do not
//! depend on byte order as long as every word is loaded the same way.

/// Folds a sum of 16-bit words into 16 bits (one's complement addition).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

/// The checksum after one 32-bit word (two 16-bit words) changed from `old` to `new`.
#[inline(always)]
pub fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// The one's-complement sum that turns a checksum over `old` into one over `new` (a 32-bit word,
/// two 16-bit words): add the deltas of every change, then [`apply`] them once.
#[inline(always)]
pub fn delta_u32(old: u32, new: u32) -> u32 {
    u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16)
}

/// [`delta_u32`] for a 16-bit word.
#[inline(always)]
pub fn delta_u16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// The checksum after the changes whose deltas sum to `delta` (at most a few dozen words).
#[inline(always)]
pub fn apply(check: u16, delta: u32) -> u16 {
    !fold(u32::from(!check) + delta)
}

/// The checksum after a 16-byte address changed from `old` to `new`.
#[inline(always)]
pub fn replace_addr16(mut check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut i = 0;
    while i < 16 {
        let o = u32::from_ne_bytes([old[i], old[i + 1], old[i + 2], old[i + 3]]);
        let n = u32::from_ne_bytes([new[i], new[i + 1], new[i + 2], new[i + 3]]);
        check = replace_u32(check, o, n);
        i += 4;
    }
    check
}

/// The delta (see [`delta_u32`]) of a 16-byte address changed from `old` to `new`: the four 32-bit
/// words, loaded natively like every other word the data plane sums. Written out word by word so
/// the eBPF verifier sees straight-line code (no loop, no memcpy).
#[inline(always)]
pub fn delta_addr16(old: &[u8; 16], new: &[u8; 16]) -> u32 {
    delta_addr_words(crate::addr_words(old), crate::addr_words(new))
}

/// [`delta_addr16`] for addresses held as their four words in memory order, as the data plane
/// reads them from packets (word loads, where bytes would take sixteen loads an address).
#[inline(always)]
pub fn delta_addr_words(old: [u32; 4], new: [u32; 4]) -> u32 {
    delta_u32(old[0], new[0])
        + delta_u32(old[1], new[1])
        + delta_u32(old[2], new[2])
        + delta_u32(old[3], new[3])
}

/// Full Internet checksum of `data` (with `initial` added), for tests and packet building.
pub fn internet_checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    !fold_wide(sum as u64)
}

fn fold_wide(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Pseudo-header sum for an IPv4 TCP/UDP checksum (big-endian words).
pub fn ipv4_pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u32 {
    u32::from(u16::from_be_bytes([src[0], src[1]]))
        + u32::from(u16::from_be_bytes([src[2], src[3]]))
        + u32::from(u16::from_be_bytes([dst[0], dst[1]]))
        + u32::from(u16::from_be_bytes([dst[2], dst[3]]))
        + u32::from(protocol)
        + u32::from(l4_len)
}

/// Pseudo-header sum for an IPv6 upper-layer checksum (TCP, UDP, ICMPv6; RFC 8200 §8.1), in
/// big-endian words like [`internet_checksum`]. `upper_layer_len` is the length of the TCP/UDP/ICMPv6
/// message itself, without any extension header before it. Straight-line, so eBPF can use it.
#[inline(always)]
pub fn ipv6_pseudo_header_sum(
    src: &[u8; 16],
    dst: &[u8; 16],
    upper_layer_len: u32,
    next_header: u8,
) -> u32 {
    be_words_sum16(src)
        + be_words_sum16(dst)
        + (upper_layer_len >> 16)
        + (upper_layer_len & 0xffff)
        + u32::from(next_header)
}

#[inline(always)]
fn be_words_sum16(a: &[u8; 16]) -> u32 {
    let w = |at: usize| u32::from(u16::from_be_bytes([a[at], a[at + 1]]));
    w(0) + w(2) + w(4) + w(6) + w(8) + w(10) + w(12) + w(14)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn ipv4_header(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut h = std::vec![0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        let c = internet_checksum(0, &h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn incremental_ipv4_header_update_matches_full_recompute() {
        let mut h = ipv4_header([10, 0, 0, 1], [192, 168, 1, 10]);
        assert_eq!(internet_checksum(0, &h), 0, "valid header sums to zero");
        let old = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        let new_dst = [10, 1, 2, 250];
        let new = u32::from_ne_bytes(new_dst);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let updated = replace_u32(check, old, new);
        h[16..20].copy_from_slice(&new_dst);
        h[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(internet_checksum(0, &h), 0);
        assert_eq!(h, ipv4_header([10, 0, 0, 1], new_dst));
    }

    #[test]
    fn incremental_port_and_address_update_of_tcp_checksum() {
        let src = [10, 0, 0, 1];
        let dst = [192, 168, 1, 10];
        let mut seg = std::vec![0u8; 24];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[12] = 0x50;
        seg[20..24].copy_from_slice(b"ping");
        let full = |s: [u8; 4], d: [u8; 4], seg: &[u8]| {
            let mut z = seg.to_vec();
            z[16] = 0;
            z[17] = 0;
            internet_checksum(ipv4_pseudo_header_sum(s, d, 6, seg.len() as u16), &z)
        };
        let c = full(src, dst, &seg);
        seg[16..18].copy_from_slice(&c.to_be_bytes());

        let new_dst = [10, 9, 8, 7];
        let mut check = u16::from_ne_bytes([seg[16], seg[17]]);
        check = replace_u32(check, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
        let old_port = u16::from_ne_bytes([seg[2], seg[3]]);
        let new_port = 8080u16.to_be();
        check = replace_u16(check, old_port, new_port);
        seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(check.to_ne_bytes(), full(src, new_dst, &seg).to_be_bytes());
    }

    #[test]
    fn one_merged_update_equals_the_updates_one_by_one() {
        // Deltas of an address, a port and a TTL applied at once, for any start checksum
        // (including the ones whose fold carries twice).
        for check in [0u16, 1, 0x7fff, 0xfffe, 0xffff, 0x1234] {
            for (old, new) in [(0u32, 0xffff_ffff), (0x0a00_0001, 0x0a14_0002), (7, 7)] {
                let (old_port, new_port) = (0xffffu16, 0x1f90u16);
                let by_one = replace_u16(replace_u32(check, old, new), old_port, new_port);
                let merged = apply(check, delta_u32(old, new) + delta_u16(old_port, new_port));
                // One's complement has two zeros: 0x0000 and 0xffff sum alike.
                assert!(
                    by_one == merged || (by_one | merged == 0xffff && by_one & merged == 0),
                    "check {check:#x}, {old:#x} -> {new:#x}: {by_one:#x} vs {merged:#x}"
                );
            }
        }
    }

    #[test]
    fn address16_update_equals_four_word_updates() {
        let a = [1u8; 16];
        let mut b = [2u8; 16];
        b[15] = 77;
        let c = 0x1234;
        let mut expect = c;
        for i in (0..16).step_by(4) {
            let o = u32::from_ne_bytes(a[i..i + 4].try_into().unwrap());
            let n = u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
            expect = replace_u32(expect, o, n);
        }
        assert_eq!(replace_addr16(c, &a, &b), expect);
        assert_eq!(replace_addr16(c, &a, &a), c);
    }

    /// A TCP (checksum at 16) or UDP (checksum at 6) segment from `src`:`src_port` to
    /// `dst`:`dst_port` over IPv6, with its checksum computed in full.
    fn ipv6_segment(
        protocol: u8,
        (src, src_port): ([u8; 16], u16),
        (dst, dst_port): ([u8; 16], u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let (header_len, check_at) = if protocol == 6 { (20, 16) } else { (8, 6) };
        let mut seg = std::vec![0u8; header_len];
        seg[0..2].copy_from_slice(&src_port.to_be_bytes());
        seg[2..4].copy_from_slice(&dst_port.to_be_bytes());
        if protocol == 6 {
            seg[12] = 0x50;
        } else {
            seg[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        }
        seg.extend_from_slice(payload);
        let sum = ipv6_pseudo_header_sum(&src, &dst, seg.len() as u32, protocol);
        let mut c = internet_checksum(sum, &seg);
        if protocol == 17 && c == 0 {
            c = 0xffff;
        }
        seg[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        seg
    }

    #[test]
    fn ipv6_pseudo_header_sum_follows_rfc_8200() {
        // Summed by hand from the RFC 8200 §8.1 layout: src, dst, a 32-bit length, three zero
        // bytes and the next header, as big-endian 16-bit words.
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xab, 0xcd];
        let mut header = Vec::new();
        header.extend_from_slice(&src);
        header.extend_from_slice(&dst);
        header.extend_from_slice(&0x0001_0010u32.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 58]);
        let by_bytes = !internet_checksum(0, &header);
        assert_eq!(
            fold(ipv6_pseudo_header_sum(&src, &dst, 0x0001_0010, 58)),
            by_bytes
        );
    }

    #[test]
    fn a_segment_checksummed_with_the_ipv6_pseudo_header_verifies_to_zero() {
        for protocol in [6, 17] {
            let (src, dst) = ([0x20; 16], [0xfd; 16]);
            let seg = ipv6_segment(protocol, (src, 40000), (dst, 443), b"odd length");
            let sum = ipv6_pseudo_header_sum(&src, &dst, seg.len() as u32, protocol);
            assert_eq!(internet_checksum(sum, &seg), 0, "protocol {protocol}");
            // Another destination gives another checksum: the addresses are covered.
            let sum = ipv6_pseudo_header_sum(&src, &[0xfe; 16], seg.len() as u32, protocol);
            assert_ne!(internet_checksum(sum, &seg), 0, "protocol {protocol}");
        }
    }

    #[test]
    fn delta_addr16_is_the_sum_of_the_four_word_deltas() {
        let old: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        let new: [u8; 16] = core::array::from_fn(|i| 255 - i as u8 * 3);
        let mut by_words = 0;
        for at in (0..16).step_by(4) {
            by_words += delta_u32(
                u32::from_ne_bytes(old[at..at + 4].try_into().unwrap()),
                u32::from_ne_bytes(new[at..at + 4].try_into().unwrap()),
            );
        }
        assert_eq!(delta_addr16(&old, &new), by_words);
        // An unchanged address changes no checksum.
        assert_eq!(apply(0x1234, delta_addr16(&old, &old)), 0x1234);
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// What the IPv6 NAT does to a segment (one address and one port replaced, on either
        /// side), applied as one delta, gives the checksum a full recomputation gives.
        #[test]
        fn incremental_ipv6_nat_update_matches_full_recompute(
            tcp in any::<bool>(),
            rewrite_source in any::<bool>(),
            src in any::<[u8; 16]>(),
            dst in any::<[u8; 16]>(),
            new_addr in any::<[u8; 16]>(),
            ports in any::<(u16, u16, u16)>(),
            payload in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let (protocol, check_at) = if tcp { (6, 16) } else { (17, 6) };
            let (src_port, dst_port, new_port) = ports;
            let mut seg = ipv6_segment(protocol, (src, src_port), (dst, dst_port), &payload);

            let (old_addr, port_at) = if rewrite_source { (src, 0) } else { (dst, 2) };
            let old_port = u16::from_ne_bytes([seg[port_at], seg[port_at + 1]]);
            let delta = delta_addr16(&old_addr, &new_addr)
                + delta_u16(old_port, new_port.to_be());
            let check = u16::from_ne_bytes([seg[check_at], seg[check_at + 1]]);
            let mut updated = apply(check, delta);
            if protocol == 17 && updated == 0 {
                updated = 0xffff;
            }
            seg[port_at..port_at + 2].copy_from_slice(&new_port.to_be_bytes());
            seg[check_at..check_at + 2].copy_from_slice(&updated.to_ne_bytes());

            let (new_src, new_dst) = if rewrite_source {
                ((new_addr, new_port), (dst, dst_port))
            } else {
                ((src, src_port), (new_addr, new_port))
            };
            let full = ipv6_segment(protocol, new_src, new_dst, &payload);
            prop_assert_eq!(&seg[check_at..check_at + 2], &full[check_at..check_at + 2]);
            let sum = ipv6_pseudo_header_sum(&new_src.0, &new_dst.0, seg.len() as u32, protocol);
            prop_assert_eq!(internet_checksum(sum, &seg), 0);
        }
    }
}
