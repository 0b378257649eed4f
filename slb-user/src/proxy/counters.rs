//! What the proxy counts of the bounds it holds clients and itself to: requests that waited for
//! or were refused a backend connection, clients cut off for stalling, loops refused, file
//! descriptors run out, TLS renegotiations refused. Shown by `slb status` and Prometheus (`slb_proxy_events_total`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

/// One kind of event the proxy counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyEvent {
    /// A request waited in a backend's queue for a connection.
    RequestQueued,
    /// A request got 503: its backend's queue was full.
    QueueFull,
    /// A request got 503: it waited `queue_timeout` for a connection in vain.
    QueueTimedOut,
    /// A client took no byte of its response for `client_timeout`; its connection was closed.
    ClientSendTimeout,
    /// A client sent no byte of its request body for `client_timeout` (408).
    ClientBodyTimeout,
    /// A request that had passed this slb already (its `Via` names it) got 508.
    LoopRefused,
    /// A connect or accept failed with EMFILE/ENFILE.
    OutOfFileDescriptors,
    /// A TLS 1.2 client asked to renegotiate and was refused (see
    /// [`super::tls::report_refused_renegotiations`]).
    RenegotiationRefused,
}

impl ProxyEvent {
    pub const ALL: [ProxyEvent; 8] = [
        ProxyEvent::RequestQueued,
        ProxyEvent::QueueFull,
        ProxyEvent::QueueTimedOut,
        ProxyEvent::ClientSendTimeout,
        ProxyEvent::ClientBodyTimeout,
        ProxyEvent::LoopRefused,
        ProxyEvent::OutOfFileDescriptors,
        ProxyEvent::RenegotiationRefused,
    ];

    /// Its name in `slb status` and the Prometheus label.
    pub fn name(self) -> &'static str {
        match self {
            ProxyEvent::RequestQueued => "requests_queued",
            ProxyEvent::QueueFull => "requests_refused_queue_full",
            ProxyEvent::QueueTimedOut => "requests_refused_queue_timeout",
            ProxyEvent::ClientSendTimeout => "client_send_timeouts",
            ProxyEvent::ClientBodyTimeout => "client_body_timeouts",
            ProxyEvent::LoopRefused => "loops_refused",
            ProxyEvent::OutOfFileDescriptors => "out_of_file_descriptors",
            ProxyEvent::RenegotiationRefused => "tls_renegotiations_refused",
        }
    }
}

/// The proxy's counters, since the daemon started.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    counts: [AtomicU64; ProxyEvent::ALL.len()],
}

impl ProxyCounters {
    pub fn count(&self, event: ProxyEvent) {
        self.add(event, 1);
    }

    pub fn add(&self, event: ProxyEvent, n: u64) {
        self.counts[event as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        ProxyEvent::ALL
            .iter()
            .map(|&e| {
                (
                    e.name().to_owned(),
                    self.counts[e as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// How often the daemon writes the counters for `slb status` when they changed.
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Writes the counters to the instance's state directory whenever they changed, for the CLI
/// (Prometheus reads them from memory).
pub async fn publish(instance: String, counters: Arc<ProxyCounters>) {
    let mut ticker = tokio::time::interval(PUBLISH_INTERVAL);
    let mut written = None;
    loop {
        ticker.tick().await;
        let now = counters.snapshot();
        if written.as_ref() == Some(&now) {
            continue;
        }
        match write(&instance, &now) {
            Ok(()) => written = Some(now),
            Err(e) => tracing::debug!("writing the proxy counters: {e:#}"),
        }
    }
}

fn write(instance: &str, counters: &BTreeMap<String, u64>) -> anyhow::Result<()> {
    let path = crate::instance::proxy_counters_file(instance);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(counters)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The counters the daemon last wrote; none before it did (or without HTTP(S) traffic yet).
pub fn read(instance: &str) -> BTreeMap<String, u64> {
    std::fs::read(crate::instance::proxy_counters_file(instance))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_counts_under_its_own_name() {
        let counters = ProxyCounters::default();
        for (i, &event) in ProxyEvent::ALL.iter().enumerate() {
            assert_eq!(event as usize, i, "ALL is in declaration order");
            for _ in 0..=i {
                counters.count(event);
            }
        }
        let snapshot = counters.snapshot();
        assert_eq!(snapshot.len(), ProxyEvent::ALL.len());
        for (i, event) in ProxyEvent::ALL.iter().enumerate() {
            assert_eq!(snapshot[event.name()], i as u64 + 1);
        }
    }
}
