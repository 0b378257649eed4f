//! A client connection whose writes may stall for a limited time only. A client that stops
//! reading fills its socket's send buffer; from then on every write waits, and so does the
//! response body and the backend connection behind it. After `limit` without a byte taken the
//! write fails, hyper ends the connection and the backend connection is released.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::counters::{ProxyCounters, ProxyEvent};

pub struct WriteStallLimit<T> {
    inner: T,
    limit: Duration,
    /// Armed by the first write that has to wait, disarmed by any write that goes through.
    stalled: Option<Pin<Box<Sleep>>>,
    counters: Arc<ProxyCounters>,
}

impl<T> WriteStallLimit<T> {
    pub fn new(inner: T, limit: Duration, counters: Arc<ProxyCounters>) -> Self {
        WriteStallLimit {
            inner,
            limit,
            stalled: None,
            counters,
        }
    }

    /// `polled`, unless the writes have waited `limit` already: then a timeout error.
    fn bounded<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.counters.count(ProxyEvent::ClientSendTimeout);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the client took no data for {} (client_timeout)",
                humantime::format_duration(limit)
            ),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteStallLimit<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteStallLimit<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body an HTTP/2 client must keep taking: once a piece is handed to hyper, the next
/// must be asked for within `limit`. An HTTP/2 client that grants its stream no flow-control
/// window stalls the stream alone, not the connection (it still reads the socket, so
/// [`WriteStallLimit`] sees nothing); hyper then polls this body no more, so a watchdog task
/// drops the backend's body (and the backend connection with it) when the wait runs out, and
/// the stream ends with an error. Waiting for the backend's next piece is not a stall.
pub struct ClientPacedBody<B> {
    shared: Arc<std::sync::Mutex<Paced<B>>>,
    limit: Duration,
    counters: Arc<ProxyCounters>,
    /// Started with the first piece handed out that is not the last (most responses are one
    /// piece and need none); dropping this ends it at once, rather than after `limit`.
    watchdog: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Paced<B> {
    /// The backend's body, until it ends, the client goes, or the watchdog cuts it.
    inner: Option<B>,
    /// When a piece was last handed out, while the next one is not asked for yet.
    handed_at: Option<tokio::time::Instant>,
    cut: bool,
}

impl<B> ClientPacedBody<B>
where
    B: Send + 'static,
{
    pub fn new(inner: B, limit: Duration, counters: Arc<ProxyCounters>) -> Self {
        let shared = Arc::new(std::sync::Mutex::new(Paced {
            inner: Some(inner),
            handed_at: None,
            cut: false,
        }));
        ClientPacedBody {
            shared,
            limit,
            counters,
            watchdog: None,
        }
    }

    fn start_watchdog(&mut self) {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(watch_pace(
            Arc::downgrade(&self.shared),
            self.limit,
            self.counters.clone(),
            stopped,
        ));
        self.watchdog = Some(stop);
    }
}

/// Cuts the body off when a piece handed out waits longer than `limit` for the next request.
async fn watch_pace<B>(
    shared: std::sync::Weak<std::sync::Mutex<Paced<B>>>,
    limit: Duration,
    counters: Arc<ProxyCounters>,
    mut body_dropped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let wake = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut paced = shared.lock().expect("pace lock");
            if paced.inner.is_none() {
                return;
            }
            let now = tokio::time::Instant::now();
            match paced.handed_at {
                Some(handed) if now >= handed + limit => {
                    paced.inner = None;
                    paced.cut = true;
                    counters.count(ProxyEvent::ClientSendTimeout);
                    tracing::debug!(
                        "an HTTP/2 client took no data of its response stream for {}",
                        humantime::format_duration(limit)
                    );
                    return;
                }
                Some(handed) => handed + limit,
                None => now + limit,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = &mut body_dropped => return,
        }
    }
}

impl<B> hyper::body::Body for ClientPacedBody<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: Into<super::limits::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = super::limits::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut paced = this.shared.lock().expect("pace lock");
        paced.handed_at = None;
        let Some(inner) = paced.inner.as_mut() else {
            return Poll::Ready(if paced.cut {
                Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client took no data of its response (client_timeout)",
                )
                .into()))
            } else {
                None
            });
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_)))
                if !paced.inner.as_ref().is_some_and(|b| b.is_end_stream()) =>
            {
                paced.handed_at = Some(tokio::time::Instant::now());
                if this.watchdog.is_none() {
                    drop(paced);
                    this.start_watchdog();
                }
            }
            // The end, or the backend's error: nothing more to watch.
            Poll::Ready(_) => paced.inner = None,
            Poll::Pending => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        let paced = self.shared.lock().expect("pace lock");
        !paced.cut && paced.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

impl<B> Drop for ClientPacedBody<B> {
    fn drop(&mut self) {
        // The client went (or the response ended): release the backend's body now, not when
        // the watchdog next wakes.
        if let Ok(mut paced) = self.shared.lock() {
            paced.inner = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn a_reader_that_stops_is_cut_off_and_one_that_reads_is_not() {
        let counters = Arc::new(ProxyCounters::default());
        let limit = Duration::from_millis(100);
        // A pipe with a small buffer: the writer waits as soon as the reader stops taking data.
        let (client, server) = tokio::io::duplex(1024);
        let mut server = WriteStallLimit::new(server, limit, counters.clone());
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut client = client;
            let mut buf = vec![0u8; 4096];
            // Reads 64 KiB slowly (every write waits, but never for long), then stops.
            let mut total = 0;
            while total < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += client.read(&mut buf).await.expect("read");
            }
            client // kept open, not read
        });
        let chunk = vec![b'x'; 4096];
        let started = std::time::Instant::now();
        let mut written = 0;
        let error = loop {
            match server.write_all(&chunk).await {
                Ok(()) => written += chunk.len(),
                Err(e) => break e,
            }
        };
        assert!(
            written >= 64 * 1024 - 1024,
            "a slow reader is served: {written}"
        );
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);
        assert_eq!(counters.snapshot()[ProxyEvent::ClientSendTimeout.name()], 1);
        drop(reader.await);
    }

    /// A backend body of `pieces` frames of one byte; after them it waits (Pending) for good.
    struct Pieces {
        left: usize,
    }

    impl hyper::body::Body for Pieces {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Pending;
            }
            self.left -= 1;
            Poll::Ready(Some(Ok(hyper::body::Frame::data(
                bytes::Bytes::from_static(b"x"),
            ))))
        }
    }

    async fn next_frame<B: hyper::body::Body + Unpin>(
        body: &mut B,
    ) -> Option<Result<hyper::body::Frame<B::Data>, B::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test]
    async fn a_piece_not_asked_for_within_the_limit_cuts_the_body() {
        let counters = Arc::new(ProxyCounters::default());
        let limit = Duration::from_millis(50);
        let mut body = ClientPacedBody::new(Pieces { left: 3 }, limit, counters.clone());
        // Asked for steadily, well within the limit: served.
        for _ in 0..2 {
            assert!(matches!(next_frame(&mut body).await, Some(Ok(_))));
            tokio::time::sleep(limit / 5).await;
        }
        assert!(matches!(next_frame(&mut body).await, Some(Ok(_))));
        // The client asks for nothing more (hyper stops polling when its stream has no window).
        tokio::time::sleep(limit * 3).await;
        let cut = next_frame(&mut body).await;
        assert!(matches!(cut, Some(Err(_))), "the body ends in an error");
        assert!(!hyper::body::Body::is_end_stream(&body));
        assert_eq!(counters.snapshot()[ProxyEvent::ClientSendTimeout.name()], 1);
    }

    #[tokio::test]
    async fn waiting_for_the_backend_is_no_stall() {
        let counters = Arc::new(ProxyCounters::default());
        let limit = Duration::from_millis(50);
        let mut body = ClientPacedBody::new(Pieces { left: 1 }, limit, counters.clone());
        assert!(matches!(next_frame(&mut body).await, Some(Ok(_))));
        // Asked for the next piece, which the backend does not send (yet).
        let waiting = tokio::time::timeout(limit * 4, next_frame(&mut body)).await;
        assert!(waiting.is_err(), "still waiting for the backend");
        assert_eq!(counters.snapshot()[ProxyEvent::ClientSendTimeout.name()], 0);
    }

    /// Tasks alive on this runtime once the ones woken have run.
    async fn alive_tasks() -> usize {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    #[tokio::test]
    async fn the_watchdog_lives_only_while_a_body_is_handed_out_in_pieces() {
        let counters = Arc::new(ProxyCounters::default());
        let limit = Duration::from_secs(30);
        let before = alive_tasks().await;

        // A response of one piece needs no watchdog.
        let one = http_body_util::Full::new(bytes::Bytes::from_static(b"whole"));
        let mut body = ClientPacedBody::new(one, limit, counters.clone());
        assert!(next_frame(&mut body).await.unwrap().is_ok());
        assert_eq!(alive_tasks().await, before);
        drop(body);

        // One of several pieces starts it; the body dropped ends it then, not `limit` later.
        let mut body = ClientPacedBody::new(Pieces { left: 3 }, limit, counters.clone());
        assert!(next_frame(&mut body).await.unwrap().is_ok());
        assert_eq!(alive_tasks().await, before + 1);
        drop(body);
        assert_eq!(alive_tasks().await, before);
    }
}
