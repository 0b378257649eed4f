//! Accepting and serving client connections: plain ones directly, TLS ones after the handshake,
//! both by the same HTTP/1.1 + HTTP/2 server.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::ServerConfig;

use super::counters::ProxyEvent;
use super::limits::is_out_of_files;
use super::listener::ListenerSnapshot;
use super::request::{handle, Client, SharedByListeners, MAX_HEADER_LIST_BYTES};
use super::stall::WriteStallLimit;
use super::workers::ProxyRuntimes;
use crate::config::Protocol;

/// What hyper may read of a request's head (HTTP/1) or header list (HTTP/2, pseudo-headers
/// included) before it answers 431 itself: room above [`MAX_HEADER_LIST_BYTES`], which the
/// request phase checks exactly and alike for both protocols (hyper's HTTP/1 limit is a read
/// buffer's, which one read may overshoot).
const MAX_HEAD_READ_BYTES: usize = 2 * MAX_HEADER_LIST_BYTES;

/// Accepts connections on `listener` (bound, not yet registered with a runtime: this runs on a
/// proxy thread) and hands each to a proxy thread in turn.
pub async fn accept_loop(
    listener: std::net::TcpListener,
    snapshot: Arc<ArcSwap<ListenerSnapshot>>,
    shared: Arc<SharedByListeners>,
    runtimes: ProxyRuntimes,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %snapshot.load().name, "cannot accept connections: {e}");
            return;
        }
    };
    let mut backoff = crate::accept::AcceptBackoff::new("HTTP proxy");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if is_out_of_files(&e) {
                    shared.counters.count(ProxyEvent::OutOfFileDescriptors);
                }
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.succeeded();
        let _ = stream.set_nodelay(true);
        let (snapshot, shared) = (snapshot.clone(), shared.clone());
        if runtimes.is_single() {
            tokio::spawn(serve_connection(stream, peer, snapshot, shared));
            continue;
        }
        // Moved as a plain socket: a tokio stream belongs to the runtime it was registered on.
        match stream.into_std() {
            Ok(stream) => {
                runtimes.next().spawn(async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => serve_connection(stream, peer, snapshot, shared).await,
                        Err(e) => tracing::debug!(%peer, "connection lost between threads: {e}"),
                    }
                });
            }
            Err(e) => tracing::debug!(%peer, "connection lost between threads: {e}"),
        }
    }
}

/// Serves one client connection. Its TLS and timeouts are those of the snapshot current when it
/// was accepted; each request reads the snapshot current when it arrives.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    snapshot: Arc<ArcSwap<ListenerSnapshot>>,
    shared: Arc<SharedByListeners>,
) {
    let current = snapshot.load_full();
    let client = Client::new(peer, current.protocol == Protocol::Https);
    let stream = WriteStallLimit::new(stream, current.client_timeout, shared.counters.clone());
    let served = match &current.tls {
        None => serve_http(stream, client, &current, snapshot, shared).await,
        Some(tls) => match tls_handshake(stream, tls, &current, peer).await {
            Some(tls_stream) => serve_http(tls_stream, client, &current, snapshot, shared).await,
            None => return,
        },
    };
    if let Err(e) = served {
        tracing::debug!(listener = %current.name, %peer, "connection ended: {e}");
    }
}

async fn tls_handshake(
    stream: WriteStallLimit<TcpStream>,
    tls: &Arc<ServerConfig>,
    current: &ListenerSnapshot,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<WriteStallLimit<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
    match tokio::time::timeout(current.header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => Some(tls_stream),
        Ok(Err(e)) => {
            tracing::debug!(listener = %current.name, %peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(listener = %current.name, %peer, "TLS handshake timed out");
            None
        }
    }
}

/// HTTP/1.1 (with upgrades) or HTTP/2 over `io`, a TCP or TLS stream.
async fn serve_http<T>(
    io: T,
    client: Client,
    current: &ListenerSnapshot,
    snapshot: Arc<ArcSwap<ListenerSnapshot>>,
    shared: Arc<SharedByListeners>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(io) = first_bytes_within(io, current.header_timeout).await else {
        tracing::debug!(listener = %current.name, peer = %client.addr, "client sent nothing within header_timeout");
        return Ok(());
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(current.header_timeout)
        .max_buf_size(MAX_HEAD_READ_BYTES);
    builder
        .http2()
        .max_header_list_size(MAX_HEAD_READ_BYTES as u32)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let service = hyper::service::service_fn(move |req| {
        handle(req, client.clone(), snapshot.load_full(), shared.clone())
    });
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, at most `limit`, until the client has sent enough to tell HTTP/1 from HTTP/2: hyper's
/// header timeout only starts once a request has begun, and its protocol detection waits for a
/// full HTTP/2 preface without one, so a silent or stalled client would stay connected for good.
async fn first_bytes_within<T>(mut io: T, limit: Duration) -> Option<Prefixed<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut prefix = Vec::with_capacity(H2_PREFACE.len());
    let read = async {
        let mut chunk = [0u8; 64];
        // Enough when it is no longer a prefix of the HTTP/2 preface, or is the whole preface.
        while prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&prefix) {
            let n = io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            prefix.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(limit, read).await.ok()??;
    Some(Prefixed {
        prefix,
        consumed: 0,
        inner: io,
    })
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<T> {
    prefix: Vec<u8>,
    consumed: usize,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.consumed < self.prefix.len() {
            let rest = &self.prefix[self.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.consumed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
