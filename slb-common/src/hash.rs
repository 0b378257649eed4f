//! Hashes used by both sides: the flow hash that picks a Maglev slot in the kernel, and the
//! backend-identity hashes that build the Maglev permutations in the daemon. Both are fixed
//! functions of their input so every slb node agrees.

use crate::types::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// The seed of the flow hash that picks a flow's Maglev slot and half-open slot: the data plane
/// hashes with it, and `slb explain` with it again to name the same slots.
pub const FLOW_HASH_SEED: u32 = 0;

/// MurmurHash3 (x86, 32-bit) of the flow's addresses, ports and protocol.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, word(&key.src, 0));
    h = mix(h, word(&key.src, 4));
    h = mix(h, word(&key.src, 8));
    h = mix(h, word(&key.src, 12));
    h = mix(h, word(&key.dst, 0));
    h = mix(h, word(&key.dst, 4));
    h = mix(h, word(&key.dst, 8));
    h = mix(h, word(&key.dst, 12));
    h = mix(h, u32::from(key.src_port) | (u32::from(key.dst_port) << 16));
    h = mix(h, u32::from(key.protocol));
    finish(h, 40)
}

/// 64-bit FNV-1a followed by the SplitMix64 finaliser, for backend identities.
pub fn hash_bytes64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_depends_on_every_field_and_is_stable() {
        let base = FlowKey {
            src: crate::ipv4_mapped([10, 0, 0, 1]),
            dst: crate::ipv4_mapped([10, 0, 0, 100]),
            src_port: 40000,
            dst_port: 80,
            protocol: 6,
            _pad: [0; 3],
        };
        let h = flow_hash(&base, 0);
        assert_eq!(h, flow_hash(&base, 0));
        let mut k = base;
        k.src_port += 1;
        assert_ne!(h, flow_hash(&k, 0));
        let mut k = base;
        k.dst[15] = 101;
        assert_ne!(h, flow_hash(&k, 0));
        let mut k = base;
        k.protocol = 17;
        assert_ne!(h, flow_hash(&k, 0));
        assert_ne!(h, flow_hash(&base, 1));
    }

    #[test]
    fn flow_hash_spreads_source_ports_evenly() {
        let mut buckets = [0u32; 16];
        let mut k = FlowKey {
            src: crate::ipv4_mapped([10, 0, 0, 1]),
            dst: crate::ipv4_mapped([10, 0, 0, 100]),
            protocol: 6,
            dst_port: 80,
            ..Default::default()
        };
        for port in 0..16000u32 {
            k.src_port = port as u16;
            buckets[(flow_hash(&k, 0) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "bucket {b} of 1000 expected");
        }
    }
}
