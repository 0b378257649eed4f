//! Backend for the slb tests. Answers every TCP line and every UDP datagram with
//! `<name> <peer ip>:<peer port> <what was received>`, so the client learns which backend
//! served it and which source address that backend saw. TCP connections stay open until the
//! client closes them. Prints `ready` on stdout once its sockets are bound.
//!
//! With `--log-peers FILE` it also appends one line per accepted TCP connection and per
//! received UDP datagram to FILE: `<unix time ns> <tcp|udp> <peer ip>:<peer port>`, so a test
//! can tell who reached the server (clients, health checks) and when.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(about = "Echo server that names itself and the peer it saw")]
struct Args {
    /// Name put at the start of every answer.
    #[arg(long)]
    name: String,
    /// TCP address to listen on (repeat for several).
    #[arg(long)]
    tcp: Vec<SocketAddr>,
    /// UDP address to listen on (repeat for several).
    #[arg(long)]
    udp: Vec<SocketAddr>,
    /// Append `<unix ns> <tcp|udp> <peer>` to this file for every accepted connection and
    /// every received datagram (the file is created if missing, never truncated).
    #[arg(long, value_name = "FILE")]
    log_peers: Option<PathBuf>,
}

/// Where peers are logged, if anywhere. Each line is written with one `write` on an
/// append-mode file, so a reader never sees half a line from a concurrent writer.
#[derive(Clone, Default)]
struct PeerLog(Option<Arc<Mutex<File>>>);

impl PeerLog {
    fn open(path: Option<&PathBuf>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(PeerLog(None));
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening peer log {}", path.display()))?;
        Ok(PeerLog(Some(Arc::new(Mutex::new(file)))))
    }

    fn record(&self, proto: &str, peer: SocketAddr) {
        let Some(file) = &self.0 else { return };
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let line = format!("{ns} {proto} {peer}\n");
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            eprintln!("peer log: {e}");
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        !args.tcp.is_empty() || !args.udp.is_empty(),
        "give --tcp, --udp or both"
    );
    raise_fd_limit();
    let log = PeerLog::open(args.log_peers.as_ref())?;
    let name: Arc<str> = args.name.into();
    let mut tasks = tokio::task::JoinSet::new();
    for addr in args.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind TCP {addr}"))?;
        tasks.spawn(serve_tcp(listener, name.clone(), log.clone()));
    }
    for addr in args.udp {
        let socket = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("bind UDP {addr}"))?;
        tasks.spawn(serve_udp(socket, name.clone(), log.clone()));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        Some(res) = tasks.join_next() => res.context("server task panicked")?,
    }
}

async fn serve_tcp(listener: TcpListener, name: Arc<str>, log: PeerLog) -> anyhow::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                log.record("tcp", peer);
                tokio::spawn(tcp_connection(stream, peer, name.clone()));
            }
            Err(e) => {
                // Typically EMFILE under a connection storm: back off and keep serving.
                eprintln!("{name}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn tcp_connection(stream: TcpStream, peer: SocketAddr, name: Arc<str>) {
    if let Err(e) = echo_lines(stream, peer, &name).await {
        // Resets from clients that close early are normal; anything else is worth seeing.
        if !matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ) {
            eprintln!("{name}: connection from {peer}: {e}");
        }
    }
}

async fn echo_lines(stream: TcpStream, peer: SocketAddr, name: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let text = line.trim_end_matches(['\r', '\n']);
        write
            .write_all(format!("{name} {peer} {text}\n").as_bytes())
            .await?;
    }
}

async fn serve_udp(socket: UdpSocket, name: Arc<str>, log: PeerLog) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await.context("UDP receive")?;
        log.record("udp", peer);
        let payload = String::from_utf8_lossy(&buf[..n]);
        let reply = format!("{name} {peer} {}", payload.trim_end_matches(['\r', '\n']));
        if let Err(e) = socket.send_to(reply.as_bytes(), peer).await {
            eprintln!("{name}: UDP reply to {peer}: {e}");
        }
    }
}

/// Lifts the open-file soft limit to the hard limit so thousands of connections fit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!(
                    "warning: cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
