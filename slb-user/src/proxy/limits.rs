//! Bounds on what the proxy opens towards backends, so no number of clients or HTTP/2 streams
//! can make it open more: per backend address at most `max_connections` requests in flight
//! (each needs a connection of its own over HTTP/1.1) and at most `max_connections` connections
//! open, busy or idle in the pool or being opened; requests beyond that wait in a bounded queue
//! for a bounded time, then get 503.
//!
//! Both counts are needed: a request's permit is given back when its response ends while its
//! connection stays open in the pool, and two requests may each open a connection while one
//! waits to be reused; only a permit per connection, taken when the pool opens it, keeps the
//! backend's count of open connections at the limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ConnectionLimits;

/// One backend address's bounds, shared by every listener and group that forwards to it.
pub struct BackendCap {
    pub limits: ConnectionLimits,
    /// Requests sent and not finished (their response body still streaming).
    requests: Arc<Semaphore>,
    /// Connections open or being opened.
    connections: Arc<Semaphore>,
    /// Requests waiting for a request permit.
    queued: AtomicUsize,
}

/// Why a request got no connection to its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefusal {
    /// `max_queued_requests` were waiting already.
    Full,
    /// It waited `queue_timeout` in vain.
    TimedOut,
}

/// A request's right to a backend connection, held until its response is done.
pub struct Admitted {
    pub permit: OwnedSemaphorePermit,
    /// It had to wait for it.
    pub waited: bool,
}

impl BackendCap {
    pub fn new(limits: ConnectionLimits) -> BackendCap {
        let permits = limits.max_connections as usize;
        BackendCap {
            limits,
            requests: Arc::new(Semaphore::new(permits)),
            connections: Arc::new(Semaphore::new(permits)),
            queued: AtomicUsize::new(0),
        }
    }

    /// A request permit now, or after waiting in the queue; refused when the queue is full or
    /// the wait exceeds `queue_timeout`.
    pub async fn admit(&self) -> Result<Admitted, QueueRefusal> {
        if let Ok(permit) = self.requests.clone().try_acquire_owned() {
            return Ok(Admitted {
                permit,
                waited: false,
            });
        }
        let _slot = QueueSlot::take(&self.queued, self.limits.max_queued_requests as usize)
            .ok_or(QueueRefusal::Full)?;
        match tokio::time::timeout(
            self.limits.queue_timeout,
            self.requests.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(Admitted {
                permit,
                waited: true,
            }),
            // The semaphore is never closed; a closed one would admit nobody either.
            Ok(Err(_)) | Err(_) => Err(QueueRefusal::TimedOut),
        }
    }

    /// A connection permit, once one of the backend's `max_connections` is free; held by the
    /// connection for as long as it is open (busy or idle in the pool).
    pub fn try_connection_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// [`try_connection_permit`](Self::try_connection_permit), waiting for one.
    pub async fn connection_permit(&self) -> OwnedSemaphorePermit {
        self.connections
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Requests waiting now.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// A place in a backend's queue, given back when dropped (also when the waiting request is
/// cancelled because its client went away).
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn take(queued: &'a AtomicUsize, max: usize) -> Option<QueueSlot<'a>> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(queued))
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Each backend address's bounds as the config sets them: when groups share an address, the
/// smallest of each bound, since one pool of connections serves them all.
pub fn limits_by_address<'a>(
    groups: impl IntoIterator<Item = (SocketAddr, ConnectionLimits)> + 'a,
) -> HashMap<SocketAddr, ConnectionLimits> {
    let mut by_address: HashMap<SocketAddr, ConnectionLimits> = HashMap::new();
    for (addr, limits) in groups {
        by_address
            .entry(addr)
            .and_modify(|l| {
                l.max_connections = l.max_connections.min(limits.max_connections);
                l.max_queued_requests = l.max_queued_requests.min(limits.max_queued_requests);
                l.queue_timeout = l.queue_timeout.min(limits.queue_timeout);
            })
            .or_insert(limits);
    }
    by_address
}

/// The bounds of every backend address, swapped whole by each apply.
pub type BackendCaps = Arc<ArcSwap<HashMap<SocketAddr, Arc<BackendCap>>>>;

/// The caps for `wanted`, keeping the running cap (and its permits in use) of each address
/// whose limits did not change; a changed one starts afresh and applies to new requests.
pub fn next_caps(
    current: &HashMap<SocketAddr, Arc<BackendCap>>,
    wanted: HashMap<SocketAddr, ConnectionLimits>,
) -> HashMap<SocketAddr, Arc<BackendCap>> {
    wanted
        .into_iter()
        .map(|(addr, limits)| {
            let cap = match current.get(&addr) {
                Some(cap) if cap.limits == limits => cap.clone(),
                _ => Arc::new(BackendCap::new(limits)),
            };
            (addr, cap)
        })
        .collect()
}

/// A warning when the backend connections the caps allow, with a client connection each, could
/// take more file descriptors than the process may open (`open_files_limit`, RLIMIT_NOFILE):
/// requests would then fail on slb's own exhaustion before any cap holds them back.
pub fn descriptor_budget_warning(
    caps: &HashMap<SocketAddr, Arc<BackendCap>>,
    open_files_limit: u64,
) -> Option<String> {
    let backend_connections: u64 = caps
        .values()
        .map(|cap| u64::from(cap.limits.max_connections))
        .sum();
    (2 * backend_connections > open_files_limit).then(|| {
        format!(
            "the HTTP(S) backends may have {backend_connections} connections open \
             (max_connections summed over {} backends), each with a client connection, but slb \
             may open only {open_files_limit} files: raise its open-files limit or lower \
             max_connections, or requests will fail with 503 (out of file descriptors)",
            caps.len()
        )
    })
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The process (EMFILE) or the host (ENFILE) is out of file descriptors somewhere in `error`'s
/// chain: slb's own exhaustion, not the backend's failure.
pub fn is_out_of_files(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max_connections: u32, max_queued_requests: u32, queue_ms: u64) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            max_queued_requests,
            queue_timeout: Duration::from_millis(queue_ms),
        }
    }

    #[tokio::test]
    async fn requests_beyond_the_cap_queue_then_are_refused() {
        let cap = Arc::new(BackendCap::new(limits(2, 1, 50)));
        let first = cap.admit().await.expect("first");
        let second = cap.admit().await.expect("second");
        assert!(!first.waited && !second.waited);
        let waiting = tokio::spawn({
            let cap = cap.clone();
            async move { cap.admit().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(cap.queued(), 1);
        assert_eq!(cap.admit().await.err(), Some(QueueRefusal::Full));
        drop(first);
        let third = waiting
            .await
            .unwrap()
            .expect("a freed permit goes to the queue");
        assert!(third.waited);
        assert_eq!(cap.queued(), 0);
        // The queue's wait is bounded.
        let started = std::time::Instant::now();
        assert_eq!(cap.admit().await.err(), Some(QueueRefusal::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(cap.queued(), 0, "a refused request leaves the queue");
        drop((second, third));
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_its_place_back() {
        let cap = Arc::new(BackendCap::new(limits(1, 1, 60_000)));
        let _held = cap.admit().await.expect("first");
        let waiting = tokio::spawn({
            let cap = cap.clone();
            async move { cap.admit().await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert_eq!(cap.queued(), 1);
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(cap.queued(), 0);
    }

    #[tokio::test]
    async fn no_queue_refuses_at_once() {
        let cap = BackendCap::new(limits(1, 0, 1000));
        let _held = cap.admit().await.expect("first");
        assert_eq!(cap.admit().await.err(), Some(QueueRefusal::Full));
    }

    #[test]
    fn a_backend_in_several_groups_takes_the_smallest_bounds() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let merged = limits_by_address([
            (a, limits(10, 5, 300)),
            (a, limits(20, 2, 500)),
            (b, limits(7, 7, 700)),
        ]);
        assert_eq!(merged[&a], limits(10, 2, 300));
        assert_eq!(merged[&b], limits(7, 7, 700));
    }

    #[test]
    fn an_apply_keeps_unchanged_caps_and_replaces_changed_ones() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let first = next_caps(
            &HashMap::new(),
            HashMap::from([(a, limits(4, 4, 100)), (b, limits(4, 4, 100))]),
        );
        let second = next_caps(
            &first,
            HashMap::from([(a, limits(4, 4, 100)), (b, limits(8, 4, 100))]),
        );
        assert!(Arc::ptr_eq(&first[&a], &second[&a]));
        assert!(!Arc::ptr_eq(&first[&b], &second[&b]));
        assert_eq!(second[&b].limits.max_connections, 8);
    }

    #[test]
    fn a_budget_beyond_the_open_files_limit_is_warned_about() {
        let caps: HashMap<SocketAddr, Arc<BackendCap>> = (1..=3)
            .map(|i| {
                let addr = SocketAddr::from(([10, 0, 0, i], 80));
                (addr, Arc::new(BackendCap::new(limits(1024, 0, 100))))
            })
            .collect();
        let warning = descriptor_budget_warning(&caps, 4096).expect("3072 x 2 > 4096");
        assert!(
            warning.contains("3072") && warning.contains("4096"),
            "{warning}"
        );
        assert_eq!(descriptor_budget_warning(&caps, 1 << 20), None);
    }

    #[test]
    fn out_of_files_is_found_in_the_chain() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("tcp open error")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let emfile = Wrapper(std::io::Error::from_raw_os_error(libc::EMFILE));
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        let refused = Wrapper(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(is_out_of_files(&emfile));
        assert!(is_out_of_files(&enfile));
        assert!(!is_out_of_files(&refused));
    }
}
