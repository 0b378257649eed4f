//! What an accept loop does when `accept` fails. Most failures are about the system, not the
//! listener (EMFILE/ENFILE when the process or the host is out of file descriptors, ENOBUFS,
//! ENOMEM, a connection aborted before it was accepted), and they pass: ending the loop on the
//! first one would leave a socket that is bound but never answers again. Retrying at once would
//! spin (the pending connection stays in the backlog, so accept fails straight away again).
//! So: log, sleep, retry, sleeping longer while the failures go on.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(10);
const MAX: Duration = Duration::from_secs(1);

/// Backoff state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    next: Duration,
    failures: u64,
}

impl AcceptBackoff {
    /// `what` names the listener in the log (e.g. "admin API").
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            next: FIRST,
            failures: 0,
        }
    }

    /// The next accepted connection of `accept` (a listener's accept call), riding out failures.
    pub async fn next<S, A, F, Fut>(&mut self, mut accept: F) -> S
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<(S, A)>>,
    {
        loop {
            match accept().await {
                Ok((stream, _)) => {
                    self.succeeded();
                    return stream;
                }
                Err(e) => self.failed(&e).await,
            }
        }
    }

    /// Logs `error` and waits before the next accept: 10 ms, doubling up to 1 s.
    pub async fn failed(&mut self, error: &std::io::Error) {
        let delay = self.record_failure();
        // slb's own exhaustion, said as such: the clients and backends are not to blame.
        let whose = match error.raw_os_error() {
            Some(libc::EMFILE) => " (slb is out of file descriptors: raise its open-files limit)",
            Some(libc::ENFILE) => " (the host is out of file descriptors)",
            _ => "",
        };
        tracing::warn!(
            listener = self.what,
            failures = self.failures,
            retry_in = ?delay,
            "accept failed: {error}{whose}"
        );
        tokio::time::sleep(delay).await;
    }

    /// Counts a failure and returns how long to wait before the next accept.
    fn record_failure(&mut self) -> Duration {
        self.failures += 1;
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
        delay
    }

    /// An accept succeeded: the next failure starts the backoff over.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                listener = self.what,
                failures = self.failures,
                "accepting again"
            );
            self.failures = 0;
            self.next = FIRST;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_to_one_second_and_resets_after_a_success() {
        let mut b = AcceptBackoff::new("test");
        let seen: Vec<u128> = (0..9).map(|_| b.record_failure().as_millis()).collect();
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.record_failure(), FIRST);
    }
}
