//! Weighted Maglev (Eisenbud et al., NSDI 2016) with a credit scheme for weights: in each round
//! every backend earns its weight in credit and takes one preferred slot per `max_weight` credit,
//! so slot shares follow weight shares while each backend still walks its own permutation — which
//! is what keeps disruption near 1/N when a backend comes or goes.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::hash::hash_bytes64;
use crate::NO_BACKEND;

const OFFSET_SEED: u64 = 0x5eed_0001;
const SKIP_SEED: u64 = 0x5eed_0002;

/// One backend as Maglev sees it: a stable identity (so every node builds the same table) and a
/// weight (0 = drained: no slots).
#[derive(Clone, Copy, Debug)]
pub struct MaglevBackend<'a> {
    pub identity: &'a [u8],
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaglevError {
    SizeNotPrime(u32),
    SizeTooSmall { size: u32, backends: usize },
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SizeNotPrime(m) => write!(f, "Maglev table size {m} is not prime"),
            Self::SizeTooSmall { size, backends } => write!(
                f,
                "Maglev table size {size} is too small for {backends} backends (needs at least 10 slots per backend)"
            ),
        }
    }
}

impl core::error::Error for MaglevError {}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= u64::from(n) {
        if u64::from(n) % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds a table of `size` slots, each holding the index (into `backends`) of the backend that
/// owns it, or [`NO_BACKEND`] everywhere when no backend has weight.
pub fn build_table(backends: &[MaglevBackend<'_>], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime(size));
    }
    if (size as usize) < backends.len() * 10 {
        return Err(MaglevError::SizeTooSmall {
            size,
            backends: backends.len(),
        });
    }
    let m = u64::from(size);
    let mut table = vec![NO_BACKEND; size as usize];

    // Visiting backends in identity order makes the table independent of config order.
    let mut active: Vec<(usize, u64, u64, u32)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(i, b)| {
            let offset = hash_bytes64(OFFSET_SEED, b.identity) % m;
            let skip = hash_bytes64(SKIP_SEED, b.identity) % (m - 1) + 1;
            (i, offset, skip, b.weight)
        })
        .collect();
    if active.is_empty() {
        return Ok(table);
    }
    active.sort_by(|a, b| backends[a.0].identity.cmp(backends[b.0].identity));
    let max_weight = u64::from(active.iter().map(|a| a.3).max().unwrap_or(1));

    let mut next = vec![0u64; active.len()];
    let mut credit = vec![0u64; active.len()];
    let mut filled = 0u64;
    loop {
        for (n, &(index, offset, skip, weight)) in active.iter().enumerate() {
            credit[n] += u64::from(weight);
            while credit[n] >= max_weight {
                credit[n] -= max_weight;
                let mut slot = ((offset + next[n] * skip) % m) as usize;
                while table[slot] != NO_BACKEND {
                    next[n] += 1;
                    slot = ((offset + next[n] * skip) % m) as usize;
                }
                table[slot] = index as u32;
                next[n] += 1;
                filled += 1;
                if filled == m {
                    return Ok(table);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::format;
    use alloc::string::String;
    use proptest::prelude::*;
    use std::println;

    fn identities(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:8080", i / 256, i % 256))
            .collect()
    }

    fn backends<'a>(ids: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        ids.iter()
            .zip(weights)
            .map(|(id, &weight)| MaglevBackend {
                identity: id.as_bytes(),
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in table {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn rejects_sizes_that_are_not_prime_or_too_small() {
        let ids = identities(3);
        let b = backends(&ids, &[1, 1, 1]);
        assert_eq!(
            build_table(&b, 65536),
            Err(MaglevError::SizeNotPrime(65536))
        );
        assert!(matches!(
            build_table(&b, 7),
            Err(MaglevError::SizeTooSmall { .. })
        ));
        assert!(is_prime(65537) && is_prime(655373) && !is_prime(1) && is_prime(2));
    }

    #[test]
    fn weights_one_two_three_get_their_share_within_one_percent() {
        let ids = identities(3);
        let table = build_table(&backends(&ids, &[1, 2, 3]), 65537).unwrap();
        let c = counts(&table, 3);
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = c[i] as f64 / 65537.0;
            let want = w / 6.0;
            assert!(
                (share - want).abs() / want < 0.01,
                "backend {i}: {share} vs {want}"
            );
        }
    }

    #[test]
    fn weight_zero_gets_no_slot_and_all_zero_means_no_backend() {
        let ids = identities(3);
        let table = build_table(&backends(&ids, &[0, 1, 1]), 65537).unwrap();
        assert_eq!(counts(&table, 3)[0], 0);
        assert!(table.iter().all(|&s| s == 1 || s == 2));
        let empty = build_table(&backends(&ids, &[0, 0, 0]), 65537).unwrap();
        assert!(empty.iter().all(|&s| s == NO_BACKEND));
    }

    #[test]
    fn table_is_the_same_whatever_the_order_of_backends() {
        let ids = identities(5);
        let a = build_table(&backends(&ids, &[1, 2, 3, 4, 5]), 65537).unwrap();
        let again = build_table(&backends(&ids, &[1, 2, 3, 4, 5]), 65537).unwrap();
        assert_eq!(a, again);
        let rev_ids: Vec<String> = ids.iter().rev().cloned().collect();
        let b = build_table(&backends(&rev_ids, &[5, 4, 3, 2, 1]), 65537).unwrap();
        // Same backends, listed backwards: map indices back before comparing.
        assert!(a.iter().zip(&b).all(|(&x, &y)| x == 4 - y));
    }

    /// Fraction of slots whose owner changes when backend `removed` of `n` equal ones goes away.
    fn removal_disruption(n: usize, removed: usize, size: u32) -> f64 {
        let ids = identities(n);
        let before = build_table(&backends(&ids, &vec![1; n]), size).unwrap();
        let mut weights = vec![1; n];
        weights[removed] = 0;
        let after = build_table(&backends(&ids, &weights), size).unwrap();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        moved as f64 / f64::from(size)
    }

    #[test]
    /// Measured here: ratio 1.00 at N=3 rising to ~1.54 near N=90..100 at M=65537; Maglev trades
    /// that extra movement for its balance and lookup speed. Bound: 1.6/N.
    fn removing_one_of_n_backends_moves_little_more_than_its_own_slots() {
        println!("  N   moved    ideal 1/N   ratio");
        let mut worst: f64 = 0.0;
        for n in 3..=100 {
            let moved = removal_disruption(n, n / 2, 65537);
            let ideal = 1.0 / n as f64;
            worst = worst.max(moved / ideal);
            if n <= 5 || n % 10 == 0 {
                println!("{n:3}  {moved:.5}  {ideal:.5}     {:.3}", moved / ideal);
            }
            assert!(
                moved <= 1.6 * ideal,
                "N={n}: {moved} of slots moved, ideal {ideal}"
            );
        }
        println!("worst ratio to ideal for N=3..100: {worst:.3}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn every_share_is_within_one_point_of_its_weight_share(
            weights in proptest::collection::vec(0u32..=100, 1..=30)
        ) {
            let ids = identities(weights.len());
            let table = build_table(&backends(&ids, &weights), 65537).unwrap();
            let total: u32 = weights.iter().sum();
            if total == 0 {
                prop_assert!(table.iter().all(|&s| s == NO_BACKEND));
            } else {
                let c = counts(&table, weights.len());
                for (i, &w) in weights.iter().enumerate() {
                    let share = c[i] as f64 / 65537.0;
                    let want = f64::from(w) / f64::from(total);
                    prop_assert!((share - want).abs() <= 0.01, "backend {} weight {}: {} vs {}", i, w, share, want);
                    if w == 0 { prop_assert_eq!(c[i], 0); }
                }
            }
        }
    }
}
