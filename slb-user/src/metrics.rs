//! What the daemon exports while it runs: a Prometheus endpoint on localhost (when configured)
//! and a counter history that `slb report distribution --since` reads.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};

use crate::instance::history_file;
use crate::status;

/// Serves `GET /metrics` on 127.0.0.1:`port`.
pub async fn serve_prometheus(instance: String, port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics: binding {addr}"))?;
    tracing::info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    let mut backoff = crate::accept::AcceptBackoff::new("Prometheus metrics");
    loop {
        let stream = backoff.next(|| listener.accept()).await;
        let instance = instance.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let instance = instance.clone();
                async move {
                    let response = if req.uri().path() != "/metrics" {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from("try /metrics\n")))
                    } else {
                        match tokio::task::spawn_blocking(move || status::collect(&instance)).await
                        {
                            Ok(Ok(s)) => Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
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
pub async fn record_history(instance: String) {
    let mut ticker = tokio::time::interval(HISTORY_INTERVAL);
    loop {
        ticker.tick().await;
        let instance = instance.clone();
        let result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let s = sample(&status::collect(&instance)?);
            let path = history_file(&instance);
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(file, "{}", serde_json::to_string(&s)?)?;
            let samples = read_history(&instance);
            if samples.len() > HISTORY_KEEP + HISTORY_KEEP / 10 {
                let keep: Vec<String> = samples[samples.len() - HISTORY_KEEP..]
                    .iter()
                    .filter_map(|s| serde_json::to_string(s).ok())
                    .collect();
                std::fs::write(&path, keep.join("\n") + "\n")?;
            }
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::debug!("recording counter history: {e:#}");
        }
    }
}
