//! The L7 proxy for HTTP and HTTPS listeners (hyper, rustls): routes requests by domain and path
//! to groups, picks a healthy backend by weighted round robin or least connections, keeps
//! sessions by cookie, streams bodies both ways, and logs one JSON line per request. Listener
//! settings live behind an `ArcSwap`: a reload swaps them for new requests while requests in
//! flight and open keep-alive connections carry on.

pub mod access_log;
pub mod balance;
pub mod route;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ServerConfig;

use crate::applied::{BackendKey, HealthStatus, ProxyBackendInfo, ProxyListenerInfo};
use crate::config::{
    Config, CookiePersistence, Protocol, ResolvedListener, Scheduler, INSERT_COOKIE,
};
use access_log::{AccessLog, AccessLogRecord};
use balance::{least_connections, SmoothWrr};
use route::Router;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Limit on a request's header block; larger ones get 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;

struct BackendRt {
    addr: SocketAddr,
    /// Config weight, or 0 when unhealthy.
    weight: u32,
    /// Stable token naming the backend in cookies (same on every node).
    token: String,
    in_flight: Arc<AtomicUsize>,
}

struct GroupRt {
    name: String,
    backends: Vec<BackendRt>,
    wrr: Mutex<SmoothWrr>,
}

/// Everything a request needs to know about its listener; replaced whole on reload.
struct ListenerRt {
    name: String,
    protocol: Protocol,
    scheduler: Scheduler,
    cookie: Option<CookiePersistence>,
    forwarded_headers: bool,
    backend_timeout: Duration,
    header_timeout: Duration,
    router: Router,
    /// Index of the listener's own group in `groups`.
    default_group: usize,
    groups: Vec<GroupRt>,
    tls: Option<Arc<ServerConfig>>,
}

struct RunningListener {
    bind: (SocketAddr, Protocol),
    runtime: Arc<ArcSwap<ListenerRt>>,
    task: JoinHandle<()>,
}

struct Shared {
    client: Client<HttpConnector, Incoming>,
    access_log: AccessLog,
}

/// The daemon's handle on all HTTP(S) listeners.
pub struct ProxyManager {
    running: BTreeMap<String, RunningListener>,
    in_flight: HashMap<BackendKey, Arc<AtomicUsize>>,
    shared: Arc<Shared>,
}

fn backend_token(addr: SocketAddr) -> String {
    format!(
        "{:016x}",
        slb_common::hash::hash_bytes64(0x5eed_c00c, addr.to_string().as_bytes())
    )
}

impl Default for ProxyManager {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyManager {
    pub fn new() -> ProxyManager {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(connector);
        ProxyManager {
            running: BTreeMap::new(),
            in_flight: HashMap::new(),
            shared: Arc::new(Shared {
                client,
                access_log: AccessLog::start(),
            }),
        }
    }

    /// Makes the running HTTP(S) listeners match `config` and `health`. Everything that can fail
    /// (certificates, binding) is prepared before anything running changes.
    pub fn apply(
        &mut self,
        config: &Config,
        health: &BTreeMap<BackendKey, HealthStatus>,
    ) -> anyhow::Result<()> {
        let mut runtimes = BTreeMap::new();
        for resolved in config.resolved_listeners() {
            let l = resolved.listener;
            if !l.protocol.is_l7() {
                continue;
            }
            runtimes.insert(
                l.name.clone(),
                (
                    SocketAddr::new(l.vip, l.port),
                    l.protocol,
                    self.build(&resolved, health)?,
                ),
            );
        }
        let mut bound = BTreeMap::new();
        for (name, (addr, protocol, _)) in &runtimes {
            let reuse = self
                .running
                .get(name)
                .is_some_and(|r| r.bind == (*addr, *protocol))
                || self.running.values().any(|r| r.bind.0 == *addr);
            if !reuse {
                bound.insert(name.clone(), bind(*addr)?);
            }
        }
        self.shared
            .access_log
            .set_file(config.access_log.as_deref())?;

        // Listeners that are gone or moved stop accepting; their open connections finish.
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| {
                runtimes
                    .get(*name)
                    .is_none_or(|(a, p, _)| r.bind != (*a, *p))
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut freed = BTreeMap::new();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                r.task.abort();
                freed.insert(r.bind.0, ());
            }
        }
        for (name, (addr, protocol, runtime)) in runtimes {
            if let Some(r) = self.running.get(&name) {
                r.runtime.store(Arc::new(runtime));
                continue;
            }
            let listener = match bound.remove(&name) {
                Some(l) => l,
                None => bind(addr)?, // its address was held by a listener stopped just above
            };
            let runtime = Arc::new(ArcSwap::from_pointee(runtime));
            let task = tokio::spawn(accept_loop(listener, runtime.clone(), self.shared.clone()));
            tracing::info!(listener = %name, %addr, %protocol, "proxy listening");
            self.running.insert(
                name,
                RunningListener {
                    bind: (addr, protocol),
                    runtime,
                    task,
                },
            );
        }
        Ok(())
    }

    fn build(
        &mut self,
        resolved: &ResolvedListener<'_>,
        health: &BTreeMap<BackendKey, HealthStatus>,
    ) -> anyhow::Result<ListenerRt> {
        let l = resolved.listener;
        let groups = resolved
            .groups
            .iter()
            .map(|group| {
                let backends = group
                    .backends
                    .iter()
                    .map(|b| {
                        let addr = SocketAddr::new(b.address, b.port);
                        let key = BackendKey::of(l, b);
                        let healthy = health.get(&key).is_none_or(|h| h.healthy);
                        let in_flight = self.in_flight.entry(key.clone()).or_default().clone();
                        BackendRt {
                            addr,
                            weight: if healthy { b.weight } else { 0 },
                            token: backend_token(addr),
                            in_flight,
                        }
                    })
                    .collect();
                GroupRt {
                    name: group.name.to_string(),
                    backends,
                    wrr: Mutex::new(SmoothWrr::default()),
                }
            })
            .collect();
        let targets: Vec<usize> = l
            .rules
            .iter()
            .map(|r| {
                resolved
                    .groups
                    .iter()
                    .position(|g| g.name == r.group)
                    .expect("collected")
            })
            .collect();
        let tls = match l.protocol {
            Protocol::Https => Some(
                tls::server_config(&l.certificates)
                    .map_err(|e| anyhow::anyhow!("listener {}: {e}", l.name))?,
            ),
            _ => None,
        };
        Ok(ListenerRt {
            name: l.name.clone(),
            protocol: l.protocol,
            scheduler: l.scheduler,
            cookie: l.cookie.clone(),
            forwarded_headers: l.forwarded_headers,
            backend_timeout: l.backend_timeout,
            header_timeout: l.header_timeout,
            router: Router::new(&l.rules, &targets),
            default_group: 0,
            groups,
            tls,
        })
    }
}

impl Drop for ProxyManager {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

/// What `slb status` and the distribution report show of the HTTP(S) listeners.
pub fn describe(
    config: &Config,
    health: &BTreeMap<BackendKey, HealthStatus>,
) -> Vec<ProxyListenerInfo> {
    config
        .resolved_listeners()
        .into_iter()
        .filter(|resolved| resolved.listener.protocol.is_l7())
        .map(|resolved| {
            let l = resolved.listener;
            ProxyListenerInfo {
                name: l.name.clone(),
                protocol: l.protocol,
                vip: l.vip,
                port: l.port,
                cookie_persistence: l.cookie.is_some(),
                backends: resolved
                    .groups
                    .iter()
                    .flat_map(|g| {
                        g.backends.iter().map(|b| {
                            let key = BackendKey::of(l, b);
                            ProxyBackendInfo {
                                group: g.name.to_string(),
                                address: b.address,
                                port: b.port,
                                weight: b.weight,
                                health: health.get(&key).cloned(),
                            }
                        })
                    })
                    .collect(),
            }
        })
        .collect()
}

fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        anyhow::anyhow!(
            "binding {addr}: {e} (an http/https VIP must be a local address of the slb host)"
        )
    })?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into())?)
}

async fn accept_loop(
    listener: TcpListener,
    runtime: Arc<ArcSwap<ListenerRt>>,
    shared: Arc<Shared>,
) {
    let mut backoff = crate::accept::AcceptBackoff::new("HTTP proxy");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        backoff.succeeded();
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            peer,
            runtime.clone(),
            shared.clone(),
        ));
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    runtime: Arc<ArcSwap<ListenerRt>>,
    shared: Arc<Shared>,
) {
    let current = runtime.load_full();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(current.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let https = current.protocol == Protocol::Https;
    let service = hyper::service::service_fn(move |req| {
        handle(req, peer, https, runtime.clone(), shared.clone())
    });
    let result = match &current.tls {
        None => match first_bytes_within(stream, current.header_timeout).await {
            Some(io) => {
                builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .await
            }
            None => {
                tracing::debug!(listener = %current.name, %peer, "client sent nothing within header_timeout");
                return;
            }
        },
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let tls_stream = match tokio::time::timeout(
                current.header_timeout,
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(e)) => {
                    tracing::debug!(listener = %current.name, %peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(listener = %current.name, %peer, "TLS handshake timed out");
                    return;
                }
            };
            match first_bytes_within(tls_stream, current.header_timeout).await {
                Some(io) => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(io), service)
                        .await
                }
                None => {
                    tracing::debug!(listener = %current.name, %peer, "client sent nothing within header_timeout");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = %current.name, %peer, "connection ended: {e}");
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, at most `limit`, until the client has sent enough to tell HTTP/1 from HTTP/2: hyper's
/// header timeout only starts once a request has begun, and its protocol detection waits for a
/// full HTTP/2 preface without one, so a silent or stalled client would stay connected for good.
async fn first_bytes_within<T>(mut io: T, limit: Duration) -> Option<Prefixed<T>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
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

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<T> {
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

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<T> {
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

fn text_response(status: StatusCode, text: &str) -> Response<ProxyBody> {
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

/// Keeps a backend's in-flight count up while its response body streams.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct GuardedBody {
    inner: Incoming,
    _in_flight: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Values of the request's cookies named `name`.
fn cookie_values<'a>(
    req: &'a Request<Incoming>,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == hyper::Version::HTTP_11
        && req.headers().get(header::UPGRADE).is_some()
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

struct Picked<'a> {
    group: &'a GroupRt,
    index: usize,
    /// The cookie already names this backend.
    sticky: bool,
}

fn pick<'a>(
    rt: &'a ListenerRt,
    group: &'a GroupRt,
    sticky_token: Option<&str>,
) -> Option<Picked<'a>> {
    if let Some(token) = sticky_token {
        if let Some(index) = group
            .backends
            .iter()
            .position(|b| b.token == token && b.weight > 0)
        {
            return Some(Picked {
                group,
                index,
                sticky: true,
            });
        }
    }
    let weights: Vec<u32> = group.backends.iter().map(|b| b.weight).collect();
    let index = match rt.scheduler {
        Scheduler::Wrr => group.wrr.lock().expect("wrr lock").pick(&weights)?,
        Scheduler::Wlc => {
            let in_flight: Vec<usize> = group
                .backends
                .iter()
                .map(|b| b.in_flight.load(Ordering::Relaxed))
                .collect();
            least_connections(&weights, &in_flight)?
        }
    };
    Some(Picked {
        group,
        index,
        sticky: false,
    })
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    https: bool,
    runtime: Arc<ArcSwap<ListenerRt>>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let rt = runtime.load_full();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    let group = &rt.groups[rt.router.route(&host, &path).unwrap_or(rt.default_group)];
    let record = RequestRecord {
        listener: &rt.name,
        group: &group.name,
        peer,
        host: &host,
        method: &method,
        path: &path,
        started,
    };

    // Session persistence: which backend the client's cookie names, if any.
    let (sticky_token, rewrite_value) = match &rt.cookie {
        Some(CookiePersistence::Insert { .. }) => (
            cookie_values(&req, INSERT_COOKIE).next().map(String::from),
            None,
        ),
        Some(CookiePersistence::Rewrite { name }) => {
            match cookie_values(&req, name).find_map(|v| v.split_once('.')) {
                Some((token, original)) => (
                    Some(token.to_string()),
                    Some((name.clone(), original.to_string())),
                ),
                None => (None, None),
            }
        }
        None => (None, None),
    };
    let Some(picked) = pick(&rt, group, sticky_token.as_deref()) else {
        tracing::warn!(listener = %rt.name, group = %group.name, "503: no healthy backend in the group");
        let response = text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: no healthy backend",
        );
        record.log(&shared, response.status(), None);
        return Ok(response);
    };
    let backend = &picked.group.backends[picked.index];
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = match format!("http://{}{}", backend.addr, path_and_query).parse() {
        Ok(uri) => uri,
        Err(_) => {
            return Ok(text_response(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: invalid path",
            ))
        }
    };
    parts.version = hyper::Version::HTTP_11;
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(h) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, h);
        }
    }
    if !upgrade {
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
    }
    if rt.forwarded_headers {
        let client_ip = peer.ip().to_string();
        let forwarded_for = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(previous) => format!("{previous}, {client_ip}"),
            None => client_ip.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            parts.headers.insert("x-forwarded-for", v);
        }
        parts.headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if https { "https" } else { "http" }),
        );
        if let Ok(v) = HeaderValue::from_str(&client_ip) {
            parts.headers.insert("x-real-ip", v);
        }
    }
    if let Some((name, original)) = &rewrite_value {
        // Give the application its own cookie value back.
        let cookies: Vec<String> = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(|pair| {
                let pair = pair.trim();
                match pair.split_once('=') {
                    Some((k, _)) if k == name => format!("{name}={original}"),
                    _ => pair.to_string(),
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&cookies.join("; ")) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    let upstream = Request::from_parts(parts, body);
    let in_flight = InFlight::start(&backend.in_flight);
    let backend_started = Instant::now();

    let result = if let Some(client_upgrade) = client_upgrade {
        tokio::time::timeout(
            rt.backend_timeout,
            forward_upgrade(upstream, backend.addr, client_upgrade),
        )
        .await
    } else {
        tokio::time::timeout(rt.backend_timeout, async {
            shared
                .client
                .request(upstream)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    };
    let response = match result {
        Err(_) => {
            tracing::warn!(listener = %rt.name, backend = %backend.addr, "504: backend did not answer within {}", humantime::format_duration(rt.backend_timeout));
            text_response(
                StatusCode::GATEWAY_TIMEOUT,
                "504 Gateway Timeout: the backend did not answer in time",
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(listener = %rt.name, backend = %backend.addr, "502: backend failed: {e}");
            text_response(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the backend failed",
            )
        }
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            match &rt.cookie {
                Some(CookiePersistence::Insert { timeout }) if !picked.sticky => {
                    let cookie = format!(
                        "{INSERT_COOKIE}={}; Max-Age={}; Path=/; HttpOnly",
                        backend.token,
                        timeout.as_secs()
                    );
                    if let Ok(v) = HeaderValue::from_str(&cookie) {
                        parts.headers.append(header::SET_COOKIE, v);
                    }
                }
                Some(CookiePersistence::Rewrite { name }) => {
                    rewrite_set_cookies(&mut parts.headers, name, &backend.token)
                }
                _ => {}
            }
            Response::from_parts(
                parts,
                GuardedBody {
                    inner: body,
                    _in_flight: in_flight,
                }
                .boxed(),
            )
        }
    };
    record.log(&shared, response.status(), Some((backend, backend_started)));
    Ok(response)
}

/// Prefixes the application's session cookie with the backend's token, so the next request
/// names its backend; the prefix is stripped again before the request reaches the backend.
fn rewrite_set_cookies(headers: &mut hyper::HeaderMap, name: &str, token: &str) {
    let values: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    if values.is_empty() {
        return;
    }
    headers.remove(header::SET_COOKIE);
    for v in values {
        let rewritten = v.to_str().ok().and_then(|s| {
            let rest = s.strip_prefix(name)?.strip_prefix('=')?;
            HeaderValue::from_str(&format!("{name}={token}.{rest}")).ok()
        });
        headers.append(header::SET_COOKIE, rewritten.unwrap_or(v));
    }
}

/// HTTP/1.1 Upgrade (WebSocket): a dedicated backend connection; after 101 both sides are
/// spliced together.
async fn forward_upgrade(
    upstream: Request<Incoming>,
    backend: SocketAddr,
    client_upgrade: hyper::upgrade::OnUpgrade,
) -> Result<Response<Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(backend)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut response = sender
        .send_request(upstream)
        .await
        .map_err(|e| e.to_string())?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((client, backend)) => {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(backend),
                    )
                    .await;
                }
                Err(e) => tracing::debug!("upgrade failed: {e}"),
            }
        });
    }
    Ok(response)
}

/// One request as the access log records it.
struct RequestRecord<'a> {
    listener: &'a str,
    group: &'a str,
    peer: SocketAddr,
    host: &'a str,
    method: &'a str,
    path: &'a str,
    started: Instant,
}

impl RequestRecord<'_> {
    /// Queues the record for the access log's writer thread; never waits for the disk.
    fn log(&self, shared: &Shared, status: StatusCode, backend: Option<(&BackendRt, Instant)>) {
        if !shared.access_log.enabled() {
            return;
        }
        shared.access_log.write(AccessLogRecord {
            time: SystemTime::now(),
            listener: self.listener.to_string(),
            client: self.peer,
            host: self.host.to_string(),
            method: self.method.to_string(),
            path: self.path.to_string(),
            status: status.as_u16(),
            group: self.group.to_string(),
            backend: backend.map(|(b, _)| b.addr),
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            backend_ms: backend.map(|(_, t)| t.elapsed().as_secs_f64() * 1000.0),
        });
    }
}
