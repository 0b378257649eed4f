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
}
