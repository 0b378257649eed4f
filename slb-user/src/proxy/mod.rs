//! The L7 proxy for HTTP and HTTPS listeners (hyper, rustls): routes requests by domain and path
//! to groups, picks a healthy backend by weighted round robin or least connections, keeps
//! sessions by cookie, streams bodies both ways, and logs one JSON line per request.
//!
//! - `manager`: the daemon's handle; each apply builds a `ListenerSnapshot` (`listener`) per
//!   listener and swaps it in, so requests in flight and open keep-alive connections carry on.
//! - `serve`: accepting connections, the TLS handshake, then HTTP/1.1 and HTTP/2 by one server.
//! - `request`: one request in phases: pick upstream, rewrite request, forward, rewrite
//!   response, log; `route`, `balance`, `cookies`, `client_body` and `websocket` serve the
//!   phases.
//! - `pool`: keep-alive connections to backends, reused request after request;
//!   `backend_connection`: one of them, driven by the request's own task; `backend_wire`: the
//!   HTTP/1.1 it speaks (request and response heads, body framing, chunked coding);
//! - `limits`: the bounds on backend connections (`max_connections`, the queue before 503);
//!   `stall`: the bound on a client that stops reading; `counters`: what they count.
//! - `access_log`: the log record, written by a thread of its own.
//! - `workers`: the proxy's threads, a current-thread runtime each.

pub mod access_log;
mod backend_connection;
mod backend_wire;
pub mod balance;
mod client_body;
pub mod cookies;
pub mod counters;
mod limits;
mod listener;
mod manager;
mod pool;
mod request;
pub mod route;
mod serve;
mod stall;
pub mod tls;
mod websocket;
mod workers;

pub use manager::{describe, ApplyError, ProxyManager};
