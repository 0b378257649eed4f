//! HTTP/1.1 backend for the slb L7 tests. Answers every request with 200 and a JSON body that
//! names the backend and echoes what it received (see [`Echo`]), and every response carries
//! `X-Backend: <name>`. Special paths:
//!
//! * `/slow?ms=N` waits N ms before answering;
//! * `/status/N` answers with status N;
//! * `/set-cookie/NAME/VALUE` answers with `Set-Cookie: NAME=VALUE; Path=/`;
//! * `/stream?kb=N[&ms=M]` streams N KiB in 1 KiB chunks (M ms apart, default 0);
//! * `/ws` accepts a WebSocket upgrade and echoes every text and binary message;
//! * `/upload` reads the whole request body and answers `received N bytes, fnv1a H, framed by
//!   F` (H the body's [`slb_tests::http::fnv1a64`] in hex, F `chunked`, `length` or `none`);
//! * `/connections` answers `{"open":..,"peak":..,"streams":..}`: client connections open now,
//!   the most ever open at once, and `/stream` bodies still being sent;
//! * `/relay?to=ADDR` sends the request on to `ADDR` (method, target and headers as received,
//!   `Via` included) and answers with what comes back: a server that forwards back to slb.
//!
//! Everything else (health checks hit `/`) gets the plain echo. Prints `ready` on stdout once
//! it listens.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Parser)]
#[command(about = "HTTP backend that names itself and echoes what it received")]
struct Args {
    /// Name reported in every answer (`backend` field, `X-Backend` header).
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

/// The JSON body of every answer (except `/stream` and `/ws`).
#[derive(Debug, Serialize)]
struct Echo<'a> {
    backend: &'a str,
    /// The TCP peer the backend saw (slb's address on the backend side).
    peer: String,
    method: &'a str,
    version: String,
    host: Option<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
    x_forwarded_for: Option<&'a str>,
    x_forwarded_proto: Option<&'a str>,
    x_real_ip: Option<&'a str>,
    cookie: Option<String>,
}

type Body = BoxBody<Bytes, Infallible>;

/// Connections and streams of this backend, for `/connections`.
struct Tally {
    open: AtomicUsize,
    peak: AtomicUsize,
    streams: AtomicUsize,
}

static TALLY: Tally = Tally {
    open: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    streams: AtomicUsize::new(0),
};

/// Counts a connection as open until dropped.
struct OpenConnection;

impl OpenConnection {
    fn start() -> OpenConnection {
        let open = TALLY.open.fetch_add(1, Ordering::SeqCst) + 1;
        TALLY.peak.fetch_max(open, Ordering::SeqCst);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        TALLY.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    builder.build()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let name: Arc<str> = args.name.into();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let name = name.clone();
                    tokio::spawn(async move {
                        let _open = OpenConnection::start();
                        let service = hyper::service::service_fn(move |req| {
                            handle(req, peer, name.clone())
                        });
                        // Errors here are clients going away mid-request; nothing to report.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    });
                }
                Err(e) => {
                    eprintln!("{name}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// Value of query parameter `key` in `query`.
fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    name: Arc<str>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let mut response = if path == "/ws" {
        websocket(req)
    } else if path == "/upload" {
        let framing = if req.headers().contains_key(header::TRANSFER_ENCODING) {
            "chunked"
        } else if req.headers().contains_key(header::CONTENT_LENGTH) {
            "length"
        } else {
            "none"
        };
        match req.into_body().collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                Response::new(full(format!(
                    "received {} bytes, fnv1a {:016x}, framed by {framing}\n",
                    body.len(),
                    slb_tests::http::fnv1a64(&body)
                )))
            }
            Err(e) => {
                let mut response = Response::new(full(format!("body failed: {e}\n")));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
            }
        }
    } else if path == "/connections" {
        Response::new(full(format!(
            "{{\"open\":{},\"peak\":{},\"streams\":{}}}",
            TALLY.open.load(Ordering::SeqCst),
            TALLY.peak.load(Ordering::SeqCst),
            TALLY.streams.load(Ordering::SeqCst)
        )))
    } else if path == "/relay" {
        let to = query_param(query.as_deref(), "to")
            .unwrap_or_default()
            .to_owned();
        relay(req, &to).await.unwrap_or_else(|e| {
            let mut response = Response::new(full(format!("relay to {to:?} failed: {e:#}\n")));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        })
    } else if path == "/stream" {
        let kb = query_param(query.as_deref(), "kb")
            .and_then(|v| v.parse().ok())
            .unwrap_or(64usize);
        let gap = query_param(query.as_deref(), "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64);
        stream(kb, Duration::from_millis(gap))
    } else {
        let mut status = StatusCode::OK;
        let mut set_cookie = None;
        if path == "/slow" {
            let ms = query_param(query.as_deref(), "ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000u64);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else if let Some(code) = path.strip_prefix("/status/") {
            status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
        } else if let Some(rest) = path.strip_prefix("/set-cookie/") {
            if let Some((k, v)) = rest.split_once('/') {
                set_cookie = HeaderValue::from_str(&format!("{k}={v}; Path=/")).ok();
            }
        }
        let header = |h: &str| req.headers().get(h).and_then(|v| v.to_str().ok());
        let cookies: Vec<&str> = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let echo = Echo {
            backend: &name,
            peer: peer.to_string(),
            method: req.method().as_str(),
            version: format!("{:?}", req.version()),
            host: header("host"),
            path: &path,
            query: query.as_deref(),
            x_forwarded_for: header("x-forwarded-for"),
            x_forwarded_proto: header("x-forwarded-proto"),
            x_real_ip: header("x-real-ip"),
            cookie: (!cookies.is_empty()).then(|| cookies.join("; ")),
        };
        let body = serde_json::to_vec(&echo).unwrap_or_default();
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(c) = set_cookie {
            response.headers_mut().insert(header::SET_COOKIE, c);
        }
        response
    };
    if let Ok(v) = HeaderValue::from_str(&name) {
        response.headers_mut().insert("x-backend", v);
    }
    Ok(response)
}

/// A body fed from a channel, so chunks go out as they are produced.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// Sends `req` on to `to` over a connection of its own and answers with the response.
async fn relay(req: Request<Incoming>, to: &str) -> anyhow::Result<Response<Body>> {
    let stream = tokio::net::TcpStream::connect(to).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (parts, _body) = req.into_parts();
    let mut onward = Request::builder()
        .method(parts.method)
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (name, value) in &parts.headers {
        onward = onward.header(name, value);
    }
    let response = sender
        .send_request(onward.body(full(Bytes::new()))?)
        .await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, full(body)))
}

/// Counts a `/stream` body as being sent until its producer ends.
struct ActiveStream;

impl ActiveStream {
    fn start() -> ActiveStream {
        TALLY.streams.fetch_add(1, Ordering::SeqCst);
        ActiveStream
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        TALLY.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn stream(kb: usize, gap: Duration) -> Response<Body> {
    let (tx, rx) = mpsc::channel(4);
    let active = ActiveStream::start();
    tokio::spawn(async move {
        let _active = active;
        for i in 0..kb {
            // Each chunk is 1 KiB of one letter, cycling a..z, so a client can check order.
            let chunk = Bytes::from(vec![b'a' + (i % 26) as u8; 1024]);
            if tx.send(chunk).await.is_err() {
                return;
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let is_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(accept) = key.filter(|_| is_websocket) else {
        let mut response = Response::new(full("expected a WebSocket upgrade\n"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(_) | Message::Binary(_) => msg,
                Message::Close(_) => break,
                _ => continue, // tungstenite answers pings itself
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
        let _ = ws.close(None).await;
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    response
}
