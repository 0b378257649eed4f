//! The client's request body on its way to the backend, watched: when it breaks off (the
//! client went away, or sent a malformed chunk), the forward that fails because of it is the
//! client's fault, and must not be answered or logged as a backend failure.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

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

/// A request body that notes in its [`BodyWatch`] how it failed, if it does.
pub struct WatchedBody {
    inner: Incoming,
    fault: Arc<OnceLock<ClientBodyFault>>,
}

/// Tells, after the forward, whether the client's body failed.
#[derive(Debug, Clone)]
pub struct BodyWatch(Arc<OnceLock<ClientBodyFault>>);

impl BodyWatch {
    pub fn fault(&self) -> Option<ClientBodyFault> {
        self.0.get().copied()
    }
}

impl WatchedBody {
    pub fn new(inner: Incoming) -> (WatchedBody, BodyWatch) {
        let fault = Arc::new(OnceLock::new());
        (
            WatchedBody {
                inner,
                fault: fault.clone(),
            },
            BodyWatch(fault),
        )
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
        if let Poll::Ready(Some(Err(e))) = &polled {
            let _ = self.fault.set(ClientBodyFault::of(e));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
