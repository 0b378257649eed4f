//! The client's request body on its way to the backend, watched: when it breaks off (the
//! client went away, or sent a malformed chunk), the forward that fails because of it is the
//! client's fault, and must not be answered or logged as a backend failure. The watch also
//! tells when the body was complete (the backend's time to answer counts from then) and when it
//! last moved (an upload may take any time, but may not stall).

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::Notify;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};

/// How a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBodyFault {
    /// The body was not valid HTTP (a bad chunk size line, say).
    Malformed,
    /// The client closed or reset before the body was complete.
    Aborted,
}

impl ClientBodyFault {
    fn of(error: &hyper::Error) -> ClientBodyFault {
        // hyper's body decoder reports malformed input as InvalidInput or InvalidData; an
        // early end of the connection comes as UnexpectedEof or other errors.
        let malformed = std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
                )
            });
        if malformed {
            ClientBodyFault::Malformed
        } else {
            ClientBodyFault::Aborted
        }
    }
}

/// A request body that notes in its [`BodyWatch`] how it failed, if it does, and how far it
/// got.
pub struct WatchedBody {
    inner: Incoming,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    fault: OnceLock<ClientBodyFault>,
    progress: Mutex<Progress>,
    /// Woken when the body is complete.
    completed: Notify,
}

/// How far a request body got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// When the last frame came in (or the body was created).
    pub moved: Instant,
    /// When the last frame came in, if it was the last.
    pub complete: Option<Instant>,
    /// The backend side asked for more and waits for the client.
    pub waiting_on_client: bool,
}

/// Tells, during and after the forward, how the client's body fares.
#[derive(Debug, Clone)]
pub struct BodyWatch(Arc<Shared>);

impl BodyWatch {
    pub fn fault(&self) -> Option<ClientBodyFault> {
        self.0.fault.get().copied()
    }

    pub fn progress(&self) -> Progress {
        *self.0.progress.lock().expect("progress lock")
    }

    /// Returns once the body is complete (at once if it was already).
    pub async fn completed(&self) {
        let notified = self.0.completed.notified();
        if self.progress().complete.is_some() {
            return;
        }
        notified.await;
    }
}

impl WatchedBody {
    pub fn new(inner: Incoming) -> (WatchedBody, BodyWatch) {
        let now = Instant::now();
        let shared = Arc::new(Shared {
            fault: OnceLock::new(),
            // A request without a body is complete from the start.
            progress: Mutex::new(Progress {
                moved: now,
                complete: inner.is_end_stream().then_some(now),
                waiting_on_client: false,
            }),
            completed: Notify::new(),
        });
        (
            WatchedBody {
                inner,
                shared: shared.clone(),
            },
            BodyWatch(shared),
        )
    }

    fn note(&self, polled: &Poll<Option<Result<Frame<Bytes>, hyper::Error>>>) {
        let mut progress = self.shared.progress.lock().expect("progress lock");
        match polled {
            Poll::Pending => progress.waiting_on_client = true,
            Poll::Ready(Some(Err(e))) => {
                let _ = self.shared.fault.set(ClientBodyFault::of(e));
                progress.waiting_on_client = false;
            }
            Poll::Ready(frame) => {
                let now = Instant::now();
                progress.moved = now;
                progress.waiting_on_client = false;
                // hyper stops polling a body that says it has ended, so the end is either.
                if (frame.is_none() || self.inner.is_end_stream()) && progress.complete.is_none() {
                    progress.complete = Some(now);
                    self.shared.completed.notify_waiters();
                }
            }
        }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.note(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
