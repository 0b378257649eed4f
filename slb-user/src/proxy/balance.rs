//! Choosing a backend within a group: smooth weighted round robin (nginx's scheme: spreads each
//! backend's turns evenly through the cycle) or weighted least connections. A weight of 0 means
//! "not available" (drained or unhealthy).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::cookies::CookieKey;
use super::limits::BackendCap;
use crate::config::Scheduler;

/// A backend as the proxy balances over it.
pub struct Backend {
    pub addr: SocketAddr,
    /// Config weight, or 0 when unhealthy.
    pub weight: u32,
    /// The token naming the backend in cookies (see [`super::cookies::CookieKey::token`]);
    /// empty when no listener uses cookies.
    pub token: String,
    /// Requests sent to it whose response has not finished; kept across reloads (the manager
    /// owns one counter per backend), read by least connections.
    pub in_flight: Arc<AtomicUsize>,
    /// Its bounds on connections, shared by every group it is in.
    pub cap: Arc<BackendCap>,
}

impl Backend {
    pub fn new(
        addr: SocketAddr,
        weight: u32,
        in_flight: Arc<AtomicUsize>,
        cookie_key: Option<&CookieKey>,
        cap: Arc<BackendCap>,
    ) -> Backend {
        Backend {
            addr,
            weight,
            token: cookie_key.map(|k| k.token(addr)).unwrap_or_default(),
            in_flight,
            cap,
        }
    }
}

/// A VServer group as a listener's requests see it.
pub struct BackendGroup {
    pub name: String,
    pub backends: Vec<Backend>,
    /// Round robin's position; held only for one pick, never across an await.
    pub wrr: Mutex<SmoothWrr>,
}

/// The backend chosen for a request.
pub struct Picked<'a> {
    pub backend: &'a Backend,
    /// The client's cookie already names this backend (no cookie to set).
    pub sticky: bool,
}

impl BackendGroup {
    /// The available backend the cookie token names, else the scheduler's choice; `None` when
    /// no backend is available.
    pub fn pick(&self, scheduler: Scheduler, sticky_token: Option<&str>) -> Option<Picked<'_>> {
        if let Some(token) = sticky_token {
            if let Some(backend) = self
                .backends
                .iter()
                .find(|b| b.token == token && b.weight > 0)
            {
                return Some(Picked {
                    backend,
                    sticky: true,
                });
            }
        }
        let weights: Vec<u32> = self.backends.iter().map(|b| b.weight).collect();
        let index = match scheduler {
            // Validation gives HTTP(S) listeners no maglev; round robin is their default.
            Scheduler::Wrr | Scheduler::Maglev => {
                self.wrr.lock().expect("wrr lock").pick(&weights)?
            }
            Scheduler::Wlc => {
                let in_flight: Vec<usize> = self
                    .backends
                    .iter()
                    .map(|b| b.in_flight.load(Ordering::Relaxed))
                    .collect();
                least_connections(&weights, &in_flight)?
            }
        };
        Some(Picked {
            backend: &self.backends[index],
            sticky: false,
        })
    }
}

/// Counts a request in its backend's in-flight requests until dropped (with the response body).
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn start(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

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

    fn group(weights: &[u32]) -> BackendGroup {
        BackendGroup {
            name: "g".into(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 80));
                    let key = CookieKey::from_secret(b"a secret for the tests");
                    let cap = Arc::new(BackendCap::new(Default::default()));
                    Backend::new(addr, w, Arc::default(), Some(&key), cap)
                })
                .collect(),
            wrr: Mutex::default(),
        }
    }

    #[test]
    fn a_cookie_naming_an_available_backend_wins_over_the_scheduler() {
        let g = group(&[1, 1, 0]);
        let second = g.backends[1].token.clone();
        let picked = g.pick(Scheduler::Wrr, Some(&second)).unwrap();
        assert!(picked.sticky && picked.backend.addr == g.backends[1].addr);
        let drained = g.backends[2].token.clone();
        let picked = g.pick(Scheduler::Wrr, Some(&drained)).unwrap();
        assert!(!picked.sticky, "a drained backend's cookie is not followed");
        assert_ne!(picked.backend.addr, g.backends[2].addr);
        let _busy = InFlight::start(&g.backends[0].in_flight);
        let picked = g.pick(Scheduler::Wlc, None).unwrap();
        assert_eq!(picked.backend.addr, g.backends[1].addr);
        assert!(group(&[0, 0]).pick(Scheduler::Wrr, None).is_none());
    }
}
