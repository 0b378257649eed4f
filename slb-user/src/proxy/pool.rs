//! Keep-alive HTTP/1.1 connections to backends, pooled per backend address: a request takes an
//! idle connection or opens one (holding one of the backend's connection permits for as long as
//! the connection lives), and its connection comes back to the pool when the response body has
//! been read to its end. A bodiless idempotent request that a reused connection leaves
//! unanswered (the backend had closed it as the request went out) is sent again on another.
//!
//! slb's own rather than hyper-util's pooled client, which per request hashes the pool key,
//! races a lazy connect against the checkout and spawns a task to put the connection back (about
//! a tenth of the proxy's CPU in the HTTP benchmark).

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::backend_connection::{Answer, BackendConnection, BodyReader, ExchangeError};
use super::backend_wire::{encode_request_head, RequestFraming};
use super::limits::{BackendCap, BoxError};

/// How long a connection may wait unused in the pool before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Idle {
    connection: BackendConnection,
    since: Instant,
}

impl Idle {
    /// Neither closed by the backend nor idle for [`IDLE_TIMEOUT`].
    fn usable(&self) -> bool {
        self.since.elapsed() < IDLE_TIMEOUT && self.connection.idle_usable()
    }
}

/// The pools of all backends, shared by the proxy threads.
#[derive(Default)]
pub struct BackendPool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// Told whenever a connection comes back: a request waiting for a connection permit of a
    /// backend at its `max_connections` takes an idle connection instead (the permit it waits
    /// for may be held by that very connection).
    returned: tokio::sync::Notify,
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
    #[error("exchange with {addr}: {source}")]
    Exchange {
        addr: SocketAddr,
        source: ExchangeError,
    },
}

impl BackendPool {
    /// Sends `req` (its target in origin form, as the backend gets it) to `addr` over a pooled
    /// connection or a new one, and waits for the response head. The response body gives the
    /// connection back to the pool when it has been read to its end.
    pub async fn send<B>(
        self: &Arc<Self>,
        addr: SocketAddr,
        cap: &Arc<BackendCap>,
        req: Request<B>,
    ) -> Result<Response<PooledBody>, BoxError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        let framing = RequestFraming::settle(
            &parts.method,
            &mut parts.headers,
            body.is_end_stream(),
            &body.size_hint(),
        );
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let head = encode_request_head(&parts.method, target, &parts.headers);
        let mut body = Some(body);
        let_this_pass_run_first().await;
        loop {
            let (mut connection, reused) = self.checkout(addr, cap).await?;
            let exchanged = match (framing, body.take()) {
                (RequestFraming::Empty, _) => {
                    connection.exchange_bodiless(&head, &parts.method).await
                }
                (_, Some(body)) => {
                    connection
                        .exchange(&head, &parts.method, framing, body)
                        .await
                }
                (_, None) => unreachable!("a request with a body is sent once"),
            };
            match exchanged {
                Ok(Answer {
                    response,
                    body,
                    reusable,
                }) => {
                    // The response goes to the client in the next pass, with the others'.
                    let_this_pass_run_first().await;
                    let checkin = reusable.then(|| Checkin {
                        pool: Arc::downgrade(self),
                        addr,
                    });
                    return Ok(response.map(|()| PooledBody {
                        source: Source::Backend {
                            connection: Some(connection),
                            body,
                            checkin,
                        },
                    }));
                }
                // The backend closed the idle connection as the request went out: the request
                // was not acted on, and a bodiless idempotent one is safe to send again.
                Err(e)
                    if reused
                        && e.unanswered()
                        && framing == RequestFraming::Empty
                        && parts.method.is_idempotent() =>
                {
                    tracing::debug!(backend = %addr, "a reused connection went unanswered, sending again: {e}");
                }
                Err(source) => return Err(PoolError::Exchange { addr, source }.into()),
            }
        }
    }

    /// An idle connection (reused: true) or a new one, whichever comes first when the backend is
    /// at its `max_connections`.
    async fn checkout(
        &self,
        addr: SocketAddr,
        cap: &Arc<BackendCap>,
    ) -> Result<(BackendConnection, bool), BoxError> {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(connection) = self.take_idle(addr) {
                return Ok((connection, true));
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
    fn take_idle(&self, addr: SocketAddr) -> Option<BackendConnection> {
        let mut idle = self.idle.lock().expect("pool lock");
        let connections = idle.get_mut(&addr)?;
        while let Some(candidate) = connections.pop() {
            if candidate.usable() {
                return Some(candidate.connection);
            }
        }
        None
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<BackendConnection, BoxError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| PoolError::ConnectTimedOut { addr })?
            .map_err(|source| PoolError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(BackendConnection::new(stream, permit))
    }

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

    fn put(&self, addr: SocketAddr, connection: BackendConnection) {
        if !connection.clean() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        idle.entry(addr).or_default().push(Idle {
            connection,
            since: Instant::now(),
        });
        drop(idle);
        self.returned.notify_waiters();
    }
}

/// Sweeps `pool` every few seconds until it is gone.
pub async fn sweep_until_dropped(pool: Weak<BackendPool>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 12);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// Lets the tasks that are ready in this pass of the proxy thread's scheduler run before this
/// one goes on, so that the pass's writes to backends (and then to clients) leave back to back.
/// Written as each request comes up, they would be spread over the pass: the receiving side
/// (a veth peer's NAPI thread, a NIC's queue) is then woken once per packet rather than once
/// per burst. Measured in the HTTP benchmark (50 connections): rescheduling interrupts to the
/// other CPU 12.5k/s → 4.7k/s, balancer CPU per request 14.5 → 12.6 µs.
async fn let_this_pass_run_first() {
    // Woken at once, the task goes behind those already ready: unlike `yield_now`, which
    // waits for the I/O driver, this costs no system call when nothing else is ready.
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// Where a connection goes back to once its response body has ended.
struct Checkin {
    pool: Weak<BackendPool>,
    addr: SocketAddr,
}

/// A backend's response body; its connection goes back to the pool once the body has ended
/// (dropped before its end, the connection is closed: what is left of the body would be read
/// as the next response).
pub struct PooledBody {
    source: Source,
}

enum Source {
    Backend {
        /// Taken when the body ends: back to the pool, or closed.
        connection: Option<BackendConnection>,
        body: BodyReader,
        /// `None` when the connection closes after this body.
        checkin: Option<Checkin>,
    },
    /// An upgrade's answer, over a connection of its own.
    Upgrade(Incoming),
}

impl PooledBody {
    /// A body whose connection is no pool's (an upgrade's).
    pub fn unpooled(inner: Incoming) -> PooledBody {
        PooledBody {
            source: Source::Upgrade(inner),
        }
    }

    /// The body has ended: the connection goes back to its pool or closes.
    fn release(&mut self) {
        if let Source::Backend {
            connection,
            checkin,
            ..
        } = &mut self.source
        {
            if let (Some(connection), Some(Checkin { pool, addr })) =
                (connection.take(), checkin.take())
            {
                if let Some(pool) = pool.upgrade() {
                    pool.put(addr, connection);
                }
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.source {
            Source::Upgrade(inner) => {
                return Pin::new(inner).poll_frame(cx).map_err(BoxError::from)
            }
            Source::Backend {
                connection: Some(connection),
                body,
                ..
            } => connection.poll_body_frame(body, cx),
            Source::Backend {
                connection: None, ..
            } => return Poll::Ready(None),
        };
        match polled {
            Poll::Ready(None) => {
                self.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // The connection is in no state for another request.
                if let Source::Backend { connection, .. } = &mut self.source {
                    connection.take();
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.is_end_stream() {
                    self.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upgrade(inner) => inner.is_end_stream(),
            Source::Backend {
                connection: Some(_),
                body,
                ..
            } => body.ended(),
            Source::Backend {
                connection: None, ..
            } => true,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.source {
            Source::Upgrade(inner) => inner.size_hint(),
            Source::Backend { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.is_end_stream() {
            self.release();
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

    async fn read_all(response: Response<PooledBody>) -> usize {
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
