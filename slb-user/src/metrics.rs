//! What the daemon exports while it runs: a Prometheus endpoint on localhost (when configured)
//! and a counter history that `slb report distribution --since` reads, both from the status the
//! daemon holds in memory ([`LiveStatus`]), not from the files it publishes for the CLI.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

use tokio::sync::watch;

use crate::applied::AppliedState;
use crate::flows::FlowCounts;
use crate::instance::history_file;
use crate::links::{self, LinkHistory};
use crate::maps::{CounterMaps, OpenMapError};
use crate::proxy::counters::ProxyCounters;
use crate::status::{self, Status, StatusError};

/// What the daemon last published, kept in memory for its own readers.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub state: AppliedState,
    pub links: BTreeMap<String, LinkHistory>,
}

/// The running daemon's status, built from what it holds instead of the files and pins the CLI
/// reads: the state it published last, the sweeper's last counts, and the counter maps opened
/// once. Only the counters are read anew for each status.
#[derive(Clone)]
pub struct LiveStatus {
    published: watch::Receiver<Published>,
    flows: watch::Receiver<FlowCounts>,
    counters: Arc<CounterMaps>,
    proxy_counters: Arc<ProxyCounters>,
    pin_dir: PathBuf,
}

impl LiveStatus {
    pub fn new(
        published: watch::Receiver<Published>,
        flows: watch::Receiver<FlowCounts>,
        pin_dir: &Path,
        proxy_counters: Arc<ProxyCounters>,
    ) -> Result<LiveStatus, OpenMapError> {
        Ok(LiveStatus {
            published,
            flows,
            counters: Arc::new(CounterMaps::open(pin_dir)?),
            proxy_counters,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// The status now. Reads the counter maps: call it where blocking is fine.
    pub fn collect(&self) -> Result<Status, StatusError> {
        // Copies, so no borrow of a channel is held across the map reads.
        let published = self.published.borrow().clone();
        let flows = self.flows.borrow().clone();
        let interface_states =
            links::interface_states(&self.pin_dir, &published.state.interfaces, published.links);
        Status::build(
            &published.state,
            &self.counters,
            &flows,
            interface_states,
            self.proxy_counters.snapshot(),
        )
    }
}

/// Binds 127.0.0.1:`port` for [`serve_prometheus`]; the daemon does so before it says it is
/// ready, so a ready daemon's endpoint takes connections.
pub fn bind_prometheus(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("metrics: binding {addr}"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("metrics: {addr} non-blocking"))?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("metrics: registering {addr}"))?;
    tracing::info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` (from [`bind_prometheus`]).
pub async fn serve_prometheus(live: LiveStatus, listener: tokio::net::TcpListener) {
    let mut backoff = crate::accept::AcceptBackoff::new("Prometheus metrics");
    loop {
        let stream = backoff.next(|| listener.accept()).await;
        let live = live.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let live = live.clone();
                async move {
                    let response = if req.uri().path() != "/metrics" {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from("try /metrics\n")))
                    } else {
                        match tokio::task::spawn_blocking(move || live.collect()).await {
                            Ok(Ok(s)) => Response::builder()
                                .header("content-type", status::PROMETHEUS_CONTENT_TYPE)
                                .body(Full::new(Bytes::from(status::render_prometheus(&s)))),
                            Ok(Err(e)) => Response::builder()
                                .status(StatusCode::INTERNAL_SERVER_ERROR)
                                .body(Full::new(Bytes::from(format!("{e:#}\n")))),
                            Err(e) => Response::builder()
                                .status(StatusCode::INTERNAL_SERVER_ERROR)
                                .body(Full::new(Bytes::from(format!("{e}\n")))),
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response.expect("static response parts"))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// How often the daemon records new-connection counters for `--since` reports.
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept (24 h at the interval above).
const HISTORY_KEEP: usize = 8640;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub unix_s: u64,
    /// (listener, "address:port") → new connections so far.
    pub new_connections: Vec<(String, String, u64)>,
}

pub fn read_history(instance: &str) -> Vec<Sample> {
    std::fs::read_to_string(history_file(instance))
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn sample(status: &status::Status) -> Sample {
    Sample {
        unix_s: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        new_connections: status
            .backends
            .iter()
            .map(|b| {
                (
                    b.listener.clone(),
                    b.endpoint().to_string(),
                    b.new_connections,
                )
            })
            .collect(),
    }
}

/// Appends a sample every interval; keeps the file to a day.
pub async fn record_history(instance: String, live: LiveStatus) {
    let mut ticker = tokio::time::interval(HISTORY_INTERVAL);
    // Samples a previous run left (after a restart that kept serving); counted from here on.
    let mut kept = read_history(&instance).len();
    loop {
        ticker.tick().await;
        let instance = instance.clone();
        let live = live.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            append_sample(&instance, &sample(&live.collect()?), kept)
        })
        .await;
        match result {
            Ok(Ok(now_kept)) => kept = now_kept,
            Ok(Err(e)) => tracing::debug!("recording counter history: {e:#}"),
            Err(e) => tracing::debug!("recording counter history: {e}"),
        }
    }
}

/// Appends `sample` to the history file that holds `kept` samples, cutting it back to
/// `HISTORY_KEEP` once it holds a tenth more; returns how many it holds then.
fn append_sample(instance: &str, sample: &Sample, kept: usize) -> anyhow::Result<usize> {
    let path = history_file(instance);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    writeln!(file, "{}", serde_json::to_string(sample)?)?;
    let now_kept = kept + 1;
    if now_kept <= HISTORY_KEEP + HISTORY_KEEP / 10 {
        return Ok(now_kept);
    }
    let samples = read_history(instance);
    let keep: Vec<String> = samples[samples.len().saturating_sub(HISTORY_KEEP)..]
        .iter()
        .filter_map(|s| serde_json::to_string(s).ok())
        .collect();
    std::fs::write(&path, keep.join("\n") + "\n")?;
    Ok(keep.len())
}
