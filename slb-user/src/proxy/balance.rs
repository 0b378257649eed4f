//! Choosing a backend within a group: smooth weighted round robin (nginx's scheme: spreads each
//! backend's turns evenly through the cycle) or weighted least connections. A weight of 0 means
//! "not available" (drained or unhealthy).

/// Smooth weighted round robin state of one group.
#[derive(Debug, Default)]
pub struct SmoothWrr {
    current: Vec<i64>,
}

impl SmoothWrr {
    pub fn pick(&mut self, weights: &[u32]) -> Option<usize> {
        if self.current.len() != weights.len() {
            self.current = vec![0; weights.len()];
        }
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        if total == 0 {
            return None;
        }
        let mut best = None;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 {
                continue;
            }
            self.current[i] += i64::from(w);
            if best.is_none_or(|b: usize| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        self.current[chosen] -= total;
        Some(chosen)
    }
}

/// The available backend with the fewest in-flight requests per unit of weight (ties: the
/// heavier backend, then the first).
pub fn least_connections(weights: &[u32], in_flight: &[usize]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &w) in weights.iter().enumerate() {
        if w == 0 {
            continue;
        }
        best = match best {
            None => Some(i),
            Some(b) => {
                // in_flight[i] / w < in_flight[b] / weights[b], without division.
                let lhs = in_flight[i] as u128 * u128::from(weights[b]);
                let rhs = in_flight[b] as u128 * u128::from(w);
                if lhs < rhs || (lhs == rhs && w > weights[b]) {
                    Some(i)
                } else {
                    Some(b)
                }
            }
        };
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_follows_weights_exactly_per_cycle_and_interleaves() {
        let mut wrr = SmoothWrr::default();
        let picks: Vec<usize> = (0..6).map(|_| wrr.pick(&[1, 2, 3]).unwrap()).collect();
        let mut counts = [0; 3];
        for &p in &picks {
            counts[p] += 1;
        }
        assert_eq!(counts, [1, 2, 3]);
        assert_ne!(
            picks[0], picks[1],
            "the heaviest backend does not take its turns back to back"
        );
        let mut counts = [0; 3];
        for _ in 0..6000 {
            counts[wrr.pick(&[1, 2, 3]).unwrap()] += 1;
        }
        assert_eq!(counts, [1000, 2000, 3000]);
    }

    #[test]
    fn zero_weight_is_never_picked_and_all_zero_is_none() {
        let mut wrr = SmoothWrr::default();
        for _ in 0..100 {
            assert_ne!(wrr.pick(&[0, 1, 1]), Some(0));
        }
        assert_eq!(wrr.pick(&[0, 0]), None);
        assert_eq!(least_connections(&[0, 0], &[0, 0]), None);
    }

    #[test]
    fn least_connections_weighs_in_flight_requests() {
        assert_eq!(least_connections(&[1, 1], &[3, 1]), Some(1));
        // 4/2 = 2 in flight per weight unit vs 3/1 = 3.
        assert_eq!(least_connections(&[1, 2], &[3, 4]), Some(1));
        assert_eq!(
            least_connections(&[1, 3], &[0, 0]),
            Some(1),
            "ties go to the heavier backend"
        );
        assert_eq!(least_connections(&[1, 0], &[9, 0]), Some(0));
    }
}
