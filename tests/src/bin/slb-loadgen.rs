//! Closed-loop load generator for the L4 benchmarks (`cargo xtask bench --suites l4`).
//!
//! `tcp-crr`: each worker connects, sends one line, reads the one-line answer of
//! `slb-test-server` and closes, again and again: new connections per second with a short
//! request/response exchange. `udp-rr`: each worker owns one UDP socket (one flow) and sends a
//! datagram, waits for the answer, and sends the next. Workers are plain threads with blocking
//! sockets, so the generator costs little per operation. At the end it prints one JSON line:
//! operations, errors, rate and latency percentiles.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// TCP connect, request, response, close.
    TcpCrr,
    /// UDP request/response on a long-lived socket per worker.
    UdpRr,
}

#[derive(Debug, Parser)]
#[command(about = "Closed-loop TCP/UDP load generator against slb-test-server")]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// Address to load (a VIP, or a backend).
    #[arg(long)]
    target: SocketAddr,
    /// Concurrent workers (threads), each with one operation in flight.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// How long to generate load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// How long one operation may take before it counts as an error.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(b"bench\n")?;
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line)? == 0 || !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before the answer",
        ));
    }
    Ok(())
}

fn udp_socket(target: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

/// One request/response on `socket`. A late answer to an earlier, timed-out request is
/// skipped by its sequence number.
fn udp_once(socket: &UdpSocket, seq: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let request = format!("{seq}");
    socket.send(request.as_bytes())?;
    loop {
        let n = socket.recv(buf)?;
        // slb-test-server answers `<name> <peer> <what was received>`.
        if buf[..n].ends_with(request.as_bytes())
            && buf[..n.saturating_sub(request.len())].ends_with(b" ")
        {
            return Ok(());
        }
    }
}

fn worker(args: &Args, stop: &AtomicBool) -> WorkerResult {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut result = WorkerResult::default();
    let record_error = |result: &mut WorkerResult, e: std::io::Error| {
        result.errors += 1;
        result.first_error.get_or_insert_with(|| e.to_string());
    };
    match args.mode {
        Mode::TcpCrr => {
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                match tcp_once(args.target, timeout) {
                    Ok(()) => result.latencies_us.push(elapsed_us(start)),
                    Err(e) => record_error(&mut result, e),
                }
            }
        }
        Mode::UdpRr => {
            let socket = match udp_socket(args.target, timeout) {
                Ok(s) => s,
                Err(e) => {
                    record_error(&mut result, e);
                    return result;
                }
            };
            let mut buf = [0u8; 512];
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let start = Instant::now();
                match udp_once(&socket, seq, &mut buf) {
                    Ok(()) => result.latencies_us.push(elapsed_us(start)),
                    Err(e) => record_error(&mut result, e),
                }
            }
        }
    }
    result
}

fn elapsed_us(start: Instant) -> u32 {
    u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    anyhow::ensure!(args.workers > 0, "--workers must be at least 1");
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds.is_finite(),
        "--seconds must be positive"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..args.workers)
        .map(|_| {
            let (args, stop) = (args.clone(), stop.clone());
            std::thread::spawn(move || worker(&args, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        let r = h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))?;
        latencies.extend(r.latencies_us);
        errors += r.errors;
        first_error = first_error.or(r.first_error);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    println!(
        "{}",
        json!({
            "mode": format!("{:?}", args.mode),
            "target": args.target.to_string(),
            "workers": args.workers,
            "seconds": elapsed,
            "ops": latencies.len(),
            "errors": errors,
            "first_error": first_error,
            "per_second": latencies.len() as f64 / elapsed,
            "p50_us": percentile(&latencies, 0.50),
            "p99_us": percentile(&latencies, 0.99),
        })
    );
    Ok(())
}
