//! Keep-alive HTTP/1.1 connections to backends, pooled per backend address: a request takes an
//! idle connection or opens one (holding one of the backend's connection permits for as long as
//! the connection lives), and its connection comes back to the pool when the response body has
//! been read to its end. A request sent on a reused connection that the backend had closed
//! before it was sent is sent again on another: the request never reached the backend.
//!
//! slb's own rather than hyper-util's pooled client, which per request hashes the pool key,
//! races a lazy connect against the checkout and spawns a task to put the connection back (about
//! a tenth of the proxy's CPU in the HTTP benchmark).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::client_body::WatchedBody;
use super::limits::{BackendCap, BoxError};

/// How long a connection may wait unused in the pool before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<B> Idle<B> {
    /// Neither closed by the backend nor idle for [`IDLE_TIMEOUT`].
    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.since.elapsed() < IDLE_TIMEOUT
    }
}

/// The pools of all backends, shared by the proxy threads; `B` is the request body.
pub struct BackendPool<B = WatchedBody> {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle<B>>>>,
    /// Told whenever a connection comes back: a request waiting for a connection permit of a
    /// backend at its `max_connections` takes an idle connection instead (the permit it waits
    /// for may be held by that very connection).
    returned: tokio::sync::Notify,
}

impl<B> Default for BackendPool<B> {
    fn default() -> Self {
        BackendPool {
            idle: Mutex::new(HashMap::new()),
            returned: tokio::sync::Notify::new(),
        }
    }
}

/// Connection errors that name what failed; the cause (an `io::Error` for EMFILE) stays in the
/// chain.
#[derive(Debug, thiserror::Error)]
enum PoolError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimedOut { addr: SocketAddr },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("sending to {addr}: {source}")]
    Send {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl<B> BackendPool<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Sends `req` (its target in origin form, as the backend gets it) to `addr` over a pooled
    /// connection or a new one, and waits for the response head. The response body gives the
    /// connection back to the pool when it has been read to its end.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        cap: &Arc<BackendCap>,
        mut req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, BoxError> {
        loop {
            let (mut sender, reused) = self.checkout(addr, cap).await?;
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pool = Arc::downgrade(self);
                    return Ok(response.map(|body| PooledBody {
                        inner: body,
                        checkin: Some(Checkin { pool, addr, sender }),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // The backend closed the idle connection before the request went out.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        return Err(PoolError::Send {
                            addr,
                            source: e.into_error(),
                        }
                        .into())
                    }
                },
            }
        }
    }

    /// An idle connection (reused: true) or a new one, whichever comes first when the backend is
    /// at its `max_connections`.
    async fn checkout(
        &self,
        addr: SocketAddr,
        cap: &Arc<BackendCap>,
    ) -> Result<(SendRequest<B>, bool), BoxError> {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(sender) = self.take_idle(addr).await {
                return Ok((sender, true));
            }
            let permit = match cap.try_connection_permit() {
                Some(permit) => permit,
                None => tokio::select! {
                    permit = cap.connection_permit() => permit,
                    () = &mut returned => continue,
                },
            };
            return Ok((self.connect(addr, permit).await?, false));
        }
    }

    /// An idle connection to `addr` that is ready for a request; closed and expired ones are
    /// dropped on the way.
    async fn take_idle(&self, addr: SocketAddr) -> Option<SendRequest<B>> {
        loop {
            let idle = {
                let mut idle = self.idle.lock().expect("pool lock");
                idle.get_mut(&addr)?.pop()?
            };
            if !idle.usable() {
                continue;
            }
            let mut sender = idle.sender;
            // Given back as its body ended: the connection may still be finishing that
            // response, which takes no longer than the task's next turn.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<SendRequest<B>, BoxError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::ConnectTimedOut { addr })?
            .map_err(|source| PoolError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| PoolError::Handshake { addr, source })?;
        tokio::spawn(async move {
            // The permit counts the connection until it closes.
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(backend = %addr, "backend connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

impl<B> BackendPool<B> {
    /// Closes the connections idle for [`IDLE_TIMEOUT`] or closed by their backend.
    fn sweep(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        idle.retain(|_, connections| {
            connections.retain(Idle::usable);
            !connections.is_empty()
        });
    }

    /// Connections waiting in the pool.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        idle.entry(addr).or_default().push(Idle {
            sender,
            since: Instant::now(),
        });
        drop(idle);
        self.returned.notify_waiters();
    }
}

/// Sweeps `pool` every few seconds until it is gone.
pub async fn sweep_until_dropped<B>(pool: Weak<BackendPool<B>>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 12);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

struct Checkin<B> {
    pool: Weak<BackendPool<B>>,
    addr: SocketAddr,
    sender: SendRequest<B>,
}

/// A backend's response body; its connection goes back to the pool once the body has ended
/// (dropped before its end, the connection is closed: what is left of the body would be read
/// as the next response).
pub struct PooledBody<B = WatchedBody> {
    inner: Incoming,
    /// Taken when the connection goes back: at the body's end, or when it is dropped with
    /// nothing left to read.
    checkin: Option<Checkin<B>>,
}

impl<B> PooledBody<B> {
    /// A body whose connection is no pool's (an upgrade's).
    pub fn unpooled(inner: Incoming) -> PooledBody<B> {
        PooledBody {
            inner,
            checkin: None,
        }
    }

    fn check_in(&mut self) {
        if let Some(Checkin { pool, addr, sender }) = self.checkin.take() {
            if let Some(pool) = pool.upgrade() {
                pool.put(addr, sender);
            }
        }
    }
}

impl<B> hyper::body::Body for PooledBody<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.check_in();
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

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.check_in();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt as _, Empty};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::config::ConnectionLimits;

    /// A backend on IPv4 loopback answering each request with `body_len` bytes; it counts the
    /// connections it accepted, and closes each after its first answer when `close` is set.
    async fn backend(body_len: usize, close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        backend_on("127.0.0.1:0", body_len, close).await
    }

    /// [`backend`] on `bind`.
    async fn backend_on(
        bind: &str,
        body_len: usize,
        close: bool,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    loop {
                        while !head.ends_with(b"\r\n\r\n") {
                            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        head.clear();
                        let answer =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {body_len}\r\n\r\n");
                        let sent = async {
                            stream.write_all(answer.as_bytes()).await?;
                            stream.write_all(&vec![b'x'; body_len]).await
                        };
                        if sent.await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn cap(max_connections: u32) -> Arc<BackendCap> {
        Arc::new(BackendCap::new(ConnectionLimits {
            max_connections,
            max_queued_requests: 0,
            queue_timeout: Duration::from_millis(10),
        }))
    }

    fn get(addr: SocketAddr) -> Request<Empty<Bytes>> {
        Request::get("/")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::new())
            .unwrap()
    }

    async fn read_all(response: Response<PooledBody<Empty<Bytes>>>) -> usize {
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_body_has_ended() {
        let (addr, accepted) = backend(10, false).await;
        let (pool, cap) = (Arc::new(BackendPool::default()), cap(4));
        for _ in 0..3 {
            let response = pool.send(addr, &cap, get(addr)).await.unwrap();
            assert_eq!(read_all(response).await, 10);
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_ipv6_backends_connection_is_reused_too() {
        let (addr, accepted) = backend_on("[::1]:0", 10, false).await;
        let (pool, cap) = (Arc::new(BackendPool::default()), cap(4));
        for _ in 0..3 {
            let response = pool.send(addr, &cap, get(addr)).await.unwrap();
            assert_eq!(read_all(response).await, 10);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted) = backend(1 << 20, false).await;
        let (pool, cap) = (Arc::new(BackendPool::default()), cap(1));
        let mut body = pool.send(addr, &cap, get(addr)).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(pool.idle_count(), 0);
        // With max_connections 1, this waits for the closed connection's permit.
        let response = pool.send(addr, &cap, get(addr)).await.unwrap();
        assert_eq!(read_all(response).await, 1 << 20);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_used_again() {
        let (addr, accepted) = backend(10, true).await;
        let (pool, cap) = (Arc::new(BackendPool::default()), cap(4));
        for _ in 0..3 {
            // Taken from the pool closed or not yet seen closed (then sent again on a new one),
            // the request is answered.
            let response = pool.send(addr, &cap, get(addr)).await.unwrap();
            assert_eq!(read_all(response).await, 10);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn connections_in_use_hold_the_backends_permits() {
        let (addr, accepted) = backend(1 << 20, false).await;
        let (pool, cap) = (Arc::new(BackendPool::default()), cap(1));
        let busy = pool.send(addr, &cap, get(addr)).await.unwrap();
        let second = pool.send(addr, &cap, get(addr));
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut second)
                .await
                .is_err(),
            "a second connection was opened beyond max_connections 1"
        );
        assert_eq!(read_all(busy).await, 1 << 20);
        let response = second.await.unwrap();
        assert_eq!(read_all(response).await, 1 << 20);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reused the first's connection"
        );
    }
}
