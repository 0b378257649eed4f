//! One request's way through the proxy, in named phases as in well-known proxies (pingora's
//! `ProxyHttp`): pick the upstream, rewrite the request, forward it, rewrite the response, log.
//! A phase that fails answers with an error response, which the log phase records as well.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{HeaderMap, Request, Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use super::access_log::{AccessLog, AccessLogRecord};
use super::balance::{BackendGroup, InFlight, Picked};
use super::client_body::{BodyWatch, ClientBodyFault, Progress, WatchedBody};
use super::cookies::{self, Session};
use super::counters::{ProxyCounters, ProxyEvent};
use super::limits::{is_out_of_files, BackendCap, BoxError, QueueRefusal};
use super::listener::ListenerSnapshot;
use super::pool::{BackendPool, PooledBody};
use super::stall::ClientPacedBody;
use super::websocket;

pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What the requests of all listeners share.
pub struct SharedByListeners {
    /// Pooled keep-alive connections to backends, at most `max_connections` per backend.
    pub backend_pool: Arc<BackendPool>,
    pub access_log: AccessLog,
    pub counters: Arc<ProxyCounters>,
    /// This daemon's name in `Via` headers (`slb-<random>`): a request that already names it
    /// has come round in a loop.
    pub via: Via,
}

/// The `Via` entries naming this slb, made once for the protocol versions clients speak.
pub struct Via {
    pub name: String,
    http10: HeaderValue,
    http11: HeaderValue,
    http2: HeaderValue,
}

impl Via {
    pub fn new(name: String) -> Via {
        let value = |protocol: &str| {
            HeaderValue::try_from(format!("{protocol} {name}")).expect("the name is a token")
        };
        Via {
            http10: value("1.0"),
            http11: value("1.1"),
            http2: value("2"),
            name,
        }
    }

    /// `<version the client spoke> <name>` (RFC 9110 §7.6.3).
    fn entry(&self, version: hyper::Version) -> HeaderValue {
        match version {
            hyper::Version::HTTP_10 => self.http10.clone(),
            hyper::Version::HTTP_2 => self.http2.clone(),
            hyper::Version::HTTP_09 => self.other("0.9"),
            hyper::Version::HTTP_3 => self.other("3"),
            _ => self.http11.clone(),
        }
    }

    fn other(&self, protocol: &str) -> HeaderValue {
        HeaderValue::try_from(format!("{protocol} {}", self.name)).expect("the name is a token")
    }
}

/// The client end of a connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    /// The connection came in over TLS (for X-Forwarded-Proto).
    pub https: bool,
    /// The client's IP address as X-Forwarded-For and X-Real-IP carry it, made once per
    /// connection.
    ip_header: HeaderValue,
}

impl Client {
    /// A peer an IPv6 socket saw as `::ffff:a.b.c.d` is the IPv4 client a.b.c.d: it is named so
    /// in headers and logs, as it would be had it come in over IPv4. IPv6 clients are named by
    /// their bare address, the X-Forwarded-For convention (no brackets, no port).
    pub fn new(addr: SocketAddr, https: bool) -> Client {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        Client {
            addr,
            https,
            ip_header: HeaderValue::try_from(addr.ip().to_string())
                .expect("an IP address is a header value"),
        }
    }
}

/// What the phases learn about a request, for the phases after them and the log.
struct RequestContext<'a> {
    listener: &'a ListenerSnapshot,
    client: Client,
    /// The Host header, or the URI's authority (HTTP/2).
    host: String,
    method: String,
    path: String,
    /// The client speaks HTTP/2 (its streams share one connection).
    http2: bool,
    started: Instant,
    group: &'a BackendGroup,
    /// The backend and when the request was sent to it, once it was.
    sent_to: Option<(SocketAddr, Instant)>,
}

impl<'a> RequestContext<'a> {
    fn new(req: &Request<Incoming>, client: Client, listener: &'a ListenerSnapshot) -> Self {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(String::from)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let path = req.uri().path().to_string();
        RequestContext {
            listener,
            client,
            group: listener.route(&host, &path),
            host,
            method: req.method().to_string(),
            path,
            http2: req.version() == hyper::Version::HTTP_2,
            started: Instant::now(),
            sent_to: None,
        }
    }
}

/// hyper's service for one request of `listener` (the snapshot current when it arrived).
pub async fn handle(
    req: Request<Incoming>,
    client: Client,
    listener: Arc<ListenerSnapshot>,
    shared: Arc<SharedByListeners>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut ctx = RequestContext::new(&req, client, &listener);
    let response = proxy(&mut ctx, req, &shared)
        .await
        .unwrap_or_else(Failure::response);
    log(ctx, response.status(), &shared.access_log);
    Ok(response)
}

/// The phases up to the response the client gets.
async fn proxy(
    ctx: &mut RequestContext<'_>,
    mut req: Request<Incoming>,
    shared: &SharedByListeners,
) -> Result<Response<ProxyBody>, Failure> {
    check_request(&req).inspect_err(|failure| {
        tracing::debug!(listener = %ctx.listener.name, peer = %ctx.client.addr, ?failure, "refused before forwarding");
    })?;
    check_loop(req.headers(), &shared.via.name).inspect_err(|_| {
        shared.counters.count(ProxyEvent::LoopRefused);
        tracing::warn!(listener = %ctx.listener.name, peer = %ctx.client.addr, "508: the request has passed this slb before (its Via names {}): a forwarding loop", shared.via.name);
    })?;
    let session = Session::read(req.headers(), ctx.listener.cookie.as_ref());
    let picked = pick_upstream(ctx, &session)?;
    let connection = admit(ctx, &picked, &shared.counters).await?;
    let client_upgrade = websocket::client_upgrade(&mut req);
    let (req, body_watch) = watch_body(req);
    let upstream = rewrite_request(ctx, req, &session, client_upgrade.is_some(), &shared.via)?;
    let in_flight = InFlight::start(&picked.backend.in_flight);
    ctx.sent_to = Some((picked.backend.addr, Instant::now()));
    let (response, connection) = forward(
        ctx,
        upstream,
        client_upgrade,
        connection,
        &picked.backend.cap,
        &body_watch,
        shared,
    )
    .await?;
    Ok(rewrite_response(
        ctx,
        response,
        &picked,
        in_flight,
        connection,
        &shared.counters,
    ))
}

fn watch_body(req: Request<Incoming>) -> (Request<WatchedBody>, BodyWatch) {
    let (parts, body) = req.into_parts();
    let (body, watch) = WatchedBody::new(body);
    (Request::from_parts(parts, body), watch)
}

/// The status nginx logs for a client that went away before its request was complete.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Why a request is answered by slb instead of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request breaks HTTP rules a backend should not have to judge (why, for the client).
    BadRequest(&'static str),
    /// A request form slb does not forward (CONNECT, `OPTIONS *`).
    NotImplemented(&'static str),
    /// The headers add up to more than [`MAX_HEADER_LIST_BYTES`].
    HeadersTooLarge,
    NoHealthyBackend,
    /// The request target does not make a URI with the backend's address.
    InvalidPath,
    /// The client's request body failed while it was forwarded.
    ClientBody(ClientBodyFault),
    /// The client sent no byte of its request body for `client_timeout`.
    ClientBodyTimedOut,
    /// The request has passed this slb before.
    Loop,
    /// The backend's connections were all busy and its queue full, or the wait too long.
    AtConnectionCap(QueueRefusal),
    /// slb itself is out of file descriptors.
    OutOfFiles,
    BackendFailed,
    BackendTimedOut,
}

impl Failure {
    /// A short plain-text answer; the phase that failed has logged the details.
    fn response(self) -> Response<ProxyBody> {
        let (status, text) = match self {
            Failure::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            Failure::NotImplemented(why) => (StatusCode::NOT_IMPLEMENTED, why),
            Failure::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "431 Request Header Fields Too Large",
            ),
            Failure::NoHealthyBackend => (
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: no healthy backend",
            ),
            Failure::InvalidPath => (StatusCode::BAD_REQUEST, "400 Bad Request: invalid path"),
            Failure::ClientBody(ClientBodyFault::Malformed) => (
                StatusCode::BAD_REQUEST,
                "400 Bad Request: malformed request body",
            ),
            // Most likely nobody reads it; the access log shows who gave up.
            Failure::ClientBody(ClientBodyFault::Aborted) => (
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("a valid status code"),
                "499 Client Closed Request",
            ),
            Failure::ClientBodyTimedOut => (
                StatusCode::REQUEST_TIMEOUT,
                "408 Request Timeout: the request body stalled",
            ),
            Failure::Loop => (
                StatusCode::LOOP_DETECTED,
                "508 Loop Detected: the request has passed this load balancer before",
            ),
            Failure::AtConnectionCap(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: the backend's connections are all busy",
            ),
            Failure::OutOfFiles => (
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Unavailable: the load balancer is out of file descriptors",
            ),
            Failure::BackendFailed => (
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the backend failed",
            ),
            Failure::BackendTimedOut => (
                StatusCode::GATEWAY_TIMEOUT,
                "504 Gateway Timeout: the backend did not answer in time",
            ),
        };
        let mut response = Response::new(
            Full::new(Bytes::from(format!("{text}\n")))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

/// The largest header list a request may have, counted as RFC 9113 §6.5.2 counts it for both
/// protocols (names and values plus 32 bytes per field), so HTTP/1.1 and HTTP/2 have one limit.
pub(super) const MAX_HEADER_LIST_BYTES: usize = 64 * 1024;

fn header_list_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// Phase 0: what slb refuses to forward. Headers over [`MAX_HEADER_LIST_BYTES`]: 431. Host: exactly one over HTTP/1.1 (RFC 9112 §3.2), at
/// most one otherwise, since the rules route on it and a backend could read the other one. The
/// request target: origin form (`/path`) or absolute form; `GET p41` would otherwise reach the
/// backend as `GET /`. CONNECT (slb is no forward proxy) and `OPTIONS *` (a backend
/// connection is sent origin form, never the asterisk form) are answered 501.
fn check_request<B>(req: &Request<B>) -> Result<(), Failure> {
    if req.method() == hyper::Method::CONNECT {
        return Err(Failure::NotImplemented(
            "501 Not Implemented: CONNECT is not supported",
        ));
    }
    if header_list_size(req.headers()) > MAX_HEADER_LIST_BYTES {
        return Err(Failure::HeadersTooLarge);
    }
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(Failure::BadRequest(
            "400 Bad Request: more than one Host header",
        ));
    }
    if hosts == 0 && req.version() == hyper::Version::HTTP_11 {
        return Err(Failure::BadRequest("400 Bad Request: no Host header"));
    }
    let uri = req.uri();
    if uri.scheme().is_some() {
        return Ok(());
    }
    match uri.path_and_query().map(|p| p.as_str()) {
        Some("*") if req.method() == hyper::Method::OPTIONS => Err(Failure::NotImplemented(
            "501 Not Implemented: OPTIONS * is not supported",
        )),
        Some(target) if target.starts_with('/') => Ok(()),
        _ => Err(Failure::BadRequest(
            "400 Bad Request: the request target is not a path",
        )),
    }
}

/// Phase 0: a request whose `Via` names this slb has been forwarded round a loop (through
/// another proxy, or a backend that forwards back to the VIP) and is refused; every request
/// forwarded carries the name, so a loop ends after one round.
fn check_loop(headers: &HeaderMap, via_name: &str) -> Result<(), Failure> {
    let looped = headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        // `received-protocol received-by [comment]`
        .any(|hop| hop.split_whitespace().nth(1) == Some(via_name));
    if looped {
        return Err(Failure::Loop);
    }
    Ok(())
}

/// Phase 1b: a place among the backend's `max_connections` requests, now or after waiting in
/// its queue; 503 when the queue is full or the wait too long.
async fn admit(
    ctx: &RequestContext<'_>,
    picked: &Picked<'_>,
    counters: &ProxyCounters,
) -> Result<OwnedSemaphorePermit, Failure> {
    let backend = picked.backend;
    match backend.cap.admit().await {
        Ok(admitted) => {
            if admitted.waited {
                counters.count(ProxyEvent::RequestQueued);
            }
            Ok(admitted.permit)
        }
        Err(refusal) => {
            let limits = backend.cap.limits;
            counters.count(match refusal {
                QueueRefusal::Full => ProxyEvent::QueueFull,
                QueueRefusal::TimedOut => ProxyEvent::QueueTimedOut,
            });
            tracing::warn!(
                listener = %ctx.listener.name,
                backend = %backend.addr,
                "503: all {} connections to the backend are busy and {}",
                limits.max_connections,
                match refusal {
                    QueueRefusal::Full => format!("{} requests wait already", limits.max_queued_requests),
                    QueueRefusal::TimedOut => format!("none came free within {}", humantime::format_duration(limits.queue_timeout)),
                }
            );
            Err(Failure::AtConnectionCap(refusal))
        }
    }
}

/// Phase 1: the backend, within the group the rules chose, that the session cookie names or
/// the scheduler picks.
fn pick_upstream<'a>(ctx: &RequestContext<'a>, session: &Session) -> Result<Picked<'a>, Failure> {
    let picked = ctx
        .group
        .pick(ctx.listener.scheduler, session.token.as_deref());
    picked.ok_or_else(|| {
        tracing::warn!(listener = %ctx.listener.name, group = %ctx.group.name, "503: no healthy backend in the group");
        Failure::NoHealthyBackend
    })
}

/// Hop-by-hop headers: about the client's connection, not for the backend's.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Phase 2: the request as the backend gets it: HTTP/1.1 in origin form, the Host kept, hop-by-hop headers dropped (an upgrade keeps the two it needs), forwarded headers
/// added, the application's own cookie restored, this slb named in `Via`.
fn rewrite_request<B>(
    ctx: &RequestContext<'_>,
    req: Request<B>,
    session: &Session,
    upgrade: bool,
    via: &Via,
) -> Result<Request<B>, Failure> {
    let (mut parts, body) = req.into_parts();
    parts.uri = origin_form(&parts.uri).ok_or_else(|| {
        tracing::debug!(listener = %ctx.listener.name, uri = %parts.uri, "400: not a path a backend can be sent");
        Failure::InvalidPath
    })?;
    parts.headers.append(header::VIA, via.entry(parts.version));
    parts.version = hyper::Version::HTTP_11;
    // Before Host is settled: a client's `Connection: host` must not take it away.
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(h) = HeaderValue::from_str(&ctx.host) {
            parts.headers.insert(header::HOST, h);
        }
    }
    if ctx.listener.forwarded_headers {
        add_forwarded_headers(&mut parts.headers, &ctx.client);
    }
    session.restore_application_cookie(&mut parts.headers);
    Ok(Request::from_parts(parts, body))
}

/// Drops the fixed hop-by-hop headers and those the client's `Connection` names (RFC 9110
/// §7.6.1: they describe the client's connection only). An upgrade keeps `Upgrade` and gets
/// `Connection: upgrade`, which the backend needs to switch protocols.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    let upgrade_to = headers.get(header::UPGRADE).cloned().filter(|_| upgrade);
    for name in named {
        headers.remove(name.as_str());
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade_to {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The target as a backend gets it, origin form (`/path?query`, `/` when there is none): a
/// backend is no proxy. `None` for a target that is not a path.
fn origin_form(uri: &hyper::Uri) -> Option<hyper::Uri> {
    match uri.path_and_query() {
        Some(p) if p.as_str().starts_with('/') => Some(hyper::Uri::from(p.clone())),
        Some(_) => None,
        None => Some(hyper::Uri::from_static("/")),
    }
}

/// Forwarding headers slb does not set and so cannot vouch for: a client could claim any
/// host, port or address in them.
const UNTRUSTED_FORWARDED: [HeaderName; 3] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// X-Forwarded-For (slb's entry appended last to one already there), X-Forwarded-Proto and
/// X-Real-IP (both overwritten); the client's own `UNTRUSTED_FORWARDED` headers are dropped.
fn add_forwarded_headers(headers: &mut HeaderMap, client: &Client) {
    for name in UNTRUSTED_FORWARDED {
        headers.remove(name);
    }
    let forwarded_for = match headers.entry(X_FORWARDED_FOR) {
        hyper::http::header::Entry::Vacant(_) => Some(client.ip_header.clone()),
        hyper::http::header::Entry::Occupied(previous) => {
            let mut joined = Vec::new();
            for v in previous.iter().filter(|v| v.to_str().is_ok()) {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(client.ip_header.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
    };
    if let Some(v) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if client.https { "https" } else { "http" }),
    );
    headers.insert(X_REAL_IP, client.ip_header.clone());
}

/// Phase 3: sends the request (over the pool, or a connection of its own for an upgrade) and
/// waits for the response headers: at most `backend_timeout` from the end of the request
/// body, while the body itself may take any time but stall at most `client_timeout`. 502 when
/// the backend fails, 504 when it is too slow or stops taking the body, 408 when the client's
/// body stalls. Gives back the connection permit when the response goes on (an upgrade's
/// permit stays with the spliced connections).
async fn forward(
    ctx: &RequestContext<'_>,
    upstream: Request<WatchedBody>,
    client_upgrade: Option<OnUpgrade>,
    connection: OwnedSemaphorePermit,
    cap: &Arc<BackendCap>,
    body_watch: &BodyWatch,
    shared: &SharedByListeners,
) -> Result<(Response<PooledBody>, Option<OwnedSemaphorePermit>), Failure> {
    let (backend, _) = ctx.sent_to.expect("forwarded after the backend is chosen");
    type Sent =
        Pin<Box<dyn std::future::Future<Output = Result<Response<PooledBody>, BoxError>> + Send>>;
    let (sent, connection): (Sent, _) = match client_upgrade {
        Some(client_upgrade) => {
            let upgraded = websocket::forward(upstream, backend, client_upgrade, connection);
            (
                Box::pin(async { Ok(upgraded.await?.map(PooledBody::unpooled)) }),
                None,
            )
        }
        None => {
            let (pool, cap) = (shared.backend_pool.clone(), cap.clone());
            (
                Box::pin(async move { pool.send(backend, &cap, upstream).await }),
                Some(connection),
            )
        }
    };
    let timeouts = Timeouts {
        backend: ctx.listener.backend_timeout,
        client: ctx.listener.client_timeout,
    };
    let result = match within_timeouts(sent, body_watch, timeouts).await {
        Ok(result) => result,
        Err(TimedOut::Backend) => {
            tracing::warn!(listener = %ctx.listener.name, %backend, "504: backend did not answer within {} of the request's end", humantime::format_duration(timeouts.backend));
            return Err(Failure::BackendTimedOut);
        }
        Err(TimedOut::BackendNotReading) => {
            tracing::warn!(listener = %ctx.listener.name, %backend, "504: backend took no byte of the request body for {}", humantime::format_duration(timeouts.client));
            return Err(Failure::BackendTimedOut);
        }
        Err(TimedOut::ClientBody) => {
            shared.counters.count(ProxyEvent::ClientBodyTimeout);
            tracing::debug!(listener = %ctx.listener.name, peer = %ctx.client.addr, %backend, "408: the client sent no byte of its request body for {}", humantime::format_duration(timeouts.client));
            return Err(Failure::ClientBodyTimedOut);
        }
    };
    match result {
        Ok(response) => Ok((response, connection)),
        Err(e) => match body_watch.fault() {
            // The request failed because the client's body did: the backend is not to blame.
            Some(fault) => {
                tracing::debug!(listener = %ctx.listener.name, peer = %ctx.client.addr, %backend, ?fault, "the client's request body failed: {e}");
                Err(Failure::ClientBody(fault))
            }
            None if is_out_of_files(&*e) => {
                shared.counters.count(ProxyEvent::OutOfFileDescriptors);
                tracing::error!(listener = %ctx.listener.name, %backend, "503: slb is out of file descriptors (raise its open-files limit or lower max_connections): {}", error_chain(&*e));
                Err(Failure::OutOfFiles)
            }
            None => {
                tracing::warn!(listener = %ctx.listener.name, %backend, "502: backend failed: {}", error_chain(&*e));
                Err(Failure::BackendFailed)
            }
        },
    }
}

/// `error: its source: ...`, since hyper's own messages ("client error (Connect)") say little.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// From the end of the request body to the response headers.
    backend: Duration,
    /// Longest stall of the request body.
    client: Duration,
}

/// Which wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimedOut {
    /// No response headers within `backend` of the request body's end.
    Backend,
    /// The backend took no byte of the body for `client` (nobody polled the body).
    BackendNotReading,
    /// The client sent no byte of its body for `client` while the backend waited for it.
    ClientBody,
}

/// What the forward waits for next, judged from the body's progress: its end, then the backend.
fn next_deadline(progress: Progress, timeouts: Timeouts) -> (Instant, TimedOut) {
    match progress.complete {
        Some(complete) => (complete + timeouts.backend, TimedOut::Backend),
        None if progress.waiting_on_client => {
            (progress.moved + timeouts.client, TimedOut::ClientBody)
        }
        None => (
            progress.moved + timeouts.client,
            TimedOut::BackendNotReading,
        ),
    }
}

/// `sent`'s outcome, unless a deadline of [`next_deadline`] passes first.
async fn within_timeouts<T>(
    sent: impl std::future::Future<Output = T>,
    body_watch: &BodyWatch,
    timeouts: Timeouts,
) -> Result<T, TimedOut> {
    tokio::pin!(sent);
    loop {
        let (deadline, _) = next_deadline(body_watch.progress(), timeouts);
        tokio::select! {
            outcome = &mut sent => return Ok(outcome),
            // The deadline moves to the backend's once the body is complete.
            () = body_watch.completed(), if body_watch.progress().complete.is_none() => {}
            () = tokio::time::sleep_until(deadline.into()) => {
                // The body may have moved since the deadline was set; only a deadline that
                // still stands counts.
                let (now_deadline, now_which) = next_deadline(body_watch.progress(), timeouts);
                if now_deadline <= Instant::now() {
                    return Err(now_which);
                }
            }
        }
    }
}

/// Phase 4: the response as the client gets it: the session cookie names the backend, and the
/// body streams through while the backend's in-flight count stays up.
fn rewrite_response(
    ctx: &RequestContext<'_>,
    response: Response<PooledBody>,
    picked: &Picked<'_>,
    in_flight: InFlight,
    connection: Option<OwnedSemaphorePermit>,
    counters: &Arc<ProxyCounters>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    cookies::name_backend_in_response(
        &mut parts.headers,
        ctx.listener.cookie.as_ref(),
        &picked.backend.token,
        picked.sticky,
    );
    let body = CountedBody {
        inner: body,
        _in_flight: in_flight,
        _connection: connection,
    };
    // An HTTP/1 client that stops reading stalls its connection's writes (`WriteStallLimit`);
    // an HTTP/2 client can stall one stream alone.
    let body = if ctx.http2 {
        ClientPacedBody::new(body, ctx.listener.client_timeout, counters.clone()).boxed()
    } else {
        body.boxed()
    };
    Response::from_parts(parts, body)
}

/// Phase 5: one access log record, written off the request path.
fn log(ctx: RequestContext<'_>, status: StatusCode, access_log: &AccessLog) {
    if !access_log.enabled() {
        return;
    }
    access_log.write(AccessLogRecord {
        time: SystemTime::now(),
        listener: ctx.listener.name.clone(),
        client: ctx.client.addr,
        host: ctx.host,
        method: ctx.method,
        path: ctx.path,
        status: status.as_u16(),
        group: ctx.group.name.clone(),
        backend: ctx.sent_to.map(|(addr, _)| addr),
        duration_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
        backend_ms: ctx
            .sent_to
            .map(|(_, sent)| sent.elapsed().as_secs_f64() * 1000.0),
    });
}

/// A backend's response body that counts in its in-flight requests, and holds its place among
/// the backend's connections, until it is done.
struct CountedBody {
    /// First to drop: the connection goes back to the pool before the request's permit is
    /// given back to a request that may be waiting for it.
    inner: PooledBody,
    _in_flight: InFlight,
    _connection: Option<OwnedSemaphorePermit>,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &[(&str, &str)], method: &str, target: &str) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(target);
        for (name, value) in head {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn host_must_be_there_once() {
        let one = request(&[("host", "a")], "GET", "/");
        assert_eq!(check_request(&one), Ok(()));
        let two = request(&[("host", "a"), ("host", "b")], "GET", "/");
        assert!(matches!(check_request(&two), Err(Failure::BadRequest(_))));
        let none = request(&[], "GET", "/");
        assert!(matches!(check_request(&none), Err(Failure::BadRequest(_))));
        let mut http10 = request(&[], "GET", "/");
        *http10.version_mut() = hyper::Version::HTTP_10;
        assert_eq!(check_request(&http10), Ok(()), "HTTP/1.0 needs no Host");
        let mut http2 = request(&[], "GET", "https://a/x");
        *http2.version_mut() = hyper::Version::HTTP_2;
        assert_eq!(check_request(&http2), Ok(()), "HTTP/2 has :authority");
    }

    #[test]
    fn headers_count_as_rfc_9113_counts_them_against_one_limit() {
        // 1000 fields of 30-byte names and values: 1000 × (30 + 30 + 32) = 92000 bytes.
        let names: Vec<String> = (0..1000)
            .map(|i| format!("{}{i:04}", "x".repeat(26)))
            .collect();
        let value = "v".repeat(30);
        let head: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), value.as_str())).collect();
        let req = request(&head, "GET", "/");
        assert_eq!(header_list_size(req.headers()), 1000 * (30 + 30 + 32));
        assert_eq!(check_request(&req), Err(Failure::HeadersTooLarge));
        let req = request(&head[..500], "GET", "/");
        assert_eq!(header_list_size(req.headers()), 500 * 92);
        assert!(header_list_size(req.headers()) <= MAX_HEADER_LIST_BYTES);
    }

    #[test]
    fn request_targets_slb_does_not_forward() {
        let host = [("host", "a")];
        let refused = |method, target| check_request(&request(&host, method, target));
        assert!(matches!(
            refused("CONNECT", "a:443"),
            Err(Failure::NotImplemented(_))
        ));
        assert!(matches!(
            refused("OPTIONS", "*"),
            Err(Failure::NotImplemented(_))
        ));
        assert!(matches!(refused("GET", "p41"), Err(Failure::BadRequest(_))));
        assert!(matches!(refused("GET", "*"), Err(Failure::BadRequest(_))));
        assert_eq!(refused("OPTIONS", "/x"), Ok(()));
        assert_eq!(refused("GET", "http://a"), Ok(()), "absolute form");
    }

    #[test]
    fn headers_named_in_connection_are_dropped() {
        let mut req = request(
            &[
                ("connection", "keep-alive, X-Secret , x-other"),
                ("connection", "close"),
                ("x-secret", "1"),
                ("x-other", "2"),
                ("x-kept", "3"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
            ],
            "GET",
            "/",
        );
        strip_hop_by_hop(req.headers_mut(), false);
        let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_what_it_needs() {
        let mut req = request(
            &[
                ("connection", "Upgrade, x-secret"),
                ("upgrade", "websocket"),
                ("x-secret", "1"),
                ("sec-websocket-key", "k"),
            ],
            "GET",
            "/",
        );
        strip_hop_by_hop(req.headers_mut(), true);
        let h = req.headers();
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("sec-websocket-key").unwrap(), "k");
        assert!(h.get("x-secret").is_none());
    }

    #[test]
    fn forwarded_headers_slb_cannot_vouch_for_are_dropped() {
        let mut req = request(
            &[
                ("forwarded", "for=1.2.3.4;host=evil"),
                ("x-forwarded-host", "evil"),
                ("x-forwarded-port", "1"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-for", "5.6.7.8"),
                ("x-forwarded-proto", "https"),
                ("x-real-ip", "1.2.3.4"),
            ],
            "GET",
            "/",
        );
        let client = Client::new("10.0.0.9:5000".parse().unwrap(), false);
        add_forwarded_headers(req.headers_mut(), &client);
        let h = req.headers();
        for untrusted in UNTRUSTED_FORWARDED {
            assert!(h.get(&untrusted).is_none(), "{untrusted} passed through");
        }
        let xff: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["1.2.3.4, 5.6.7.8, 10.0.0.9"]);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-real-ip").unwrap(), "10.0.0.9");
    }

    #[test]
    fn ipv6_clients_are_forwarded_bare_and_v4_mapped_ones_as_ipv4() {
        let forwarded = |peer: &str| {
            let client = Client::new(peer.parse().unwrap(), true);
            let mut req = request(&[("x-forwarded-for", "192.0.2.1")], "GET", "/");
            add_forwarded_headers(req.headers_mut(), &client);
            let h = req.headers();
            (
                client.addr.to_string(),
                h.get("x-forwarded-for")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
                h.get("x-real-ip").unwrap().to_str().unwrap().to_string(),
            )
        };
        assert_eq!(
            forwarded("[2001:db8::7]:5000"),
            (
                "[2001:db8::7]:5000".into(),
                "192.0.2.1, 2001:db8::7".into(),
                "2001:db8::7".into()
            )
        );
        assert_eq!(
            forwarded("[::ffff:10.0.0.9]:5000"),
            (
                "10.0.0.9:5000".into(),
                "192.0.2.1, 10.0.0.9".into(),
                "10.0.0.9".into()
            )
        );
    }

    #[test]
    fn the_backend_gets_path_and_query_and_other_targets_are_refused() {
        let uri = |text: &str| text.parse::<hyper::Uri>().unwrap();
        assert_eq!(origin_form(&uri("/a/b?x=1&y")).unwrap(), "/a/b?x=1&y");
        assert_eq!(
            origin_form(&uri("https://example.com/p?q")).unwrap(),
            "/p?q"
        );
        assert_eq!(origin_form(&uri("http://example.com")).unwrap(), "/");
        assert!(origin_form(&uri("*")).is_none());
    }
}
