//! Traffic generators that run inside the client namespace.
//!
//! Every request carries a unique line; the test server answers
//! `<backend name> <peer ip>:<peer port> <line>`, so each answer tells which backend served
//! it and which source address that backend saw.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};

use crate::exec::in_netns;
use crate::Family;

/// How many connections or flows to run, and how.
#[derive(Debug, Clone)]
pub struct TrafficOptions {
    pub count: usize,
    /// Requests in flight at once (one thread each).
    pub concurrency: usize,
    /// Timeout of a connect, and of each wait for a reply.
    pub timeout: Duration,
    /// Stop starting new requests once this many have failed, so that a broken data plane
    /// fails a test in seconds rather than after `count` timeouts.
    pub max_failures: usize,
}

impl TrafficOptions {
    /// `count` requests, 32 at a time, 2 s timeouts, stop after 50 failures.
    pub fn new(count: usize) -> Self {
        TrafficOptions {
            count,
            concurrency: 32,
            timeout: Duration::from_secs(2),
            max_failures: 50,
        }
    }
}

/// What a batch of connections or flows saw.
#[derive(Debug, Default, Clone)]
pub struct TrafficReport {
    /// Requests started (less than the requested count if the run was aborted).
    pub attempted: usize,
    /// Answers per backend name.
    pub counts: BTreeMap<String, usize>,
    /// Source addresses each backend reported for its peers.
    pub peers: BTreeMap<String, BTreeSet<IpAddr>>,
    /// One line per failed request.
    pub failures: Vec<String>,
    /// Distinct client source ports among the answered requests.
    pub distinct_source_ports: usize,
    /// The backend that answered, by the client's source port.
    pub backend_by_port: BTreeMap<u16, String>,
    /// True if the run stopped early after `max_failures` failures.
    pub aborted: bool,
    pub elapsed: Duration,
}

impl TrafficReport {
    pub fn answered(&self) -> usize {
        self.counts.values().sum()
    }

    /// Source addresses seen by any backend.
    pub fn peer_ips(&self) -> BTreeSet<IpAddr> {
        self.peers.values().flatten().copied().collect()
    }

    /// A one-paragraph summary, including the first few failures.
    pub fn summary(&self, what: &str) -> String {
        let mut s = format!(
            "{what}: {} attempted, {} answered, {} failed{} in {:.2?}; {} distinct source ports; peers seen {:?}",
            self.attempted,
            self.answered(),
            self.failures.len(),
            if self.aborted { " (aborted)" } else { "" },
            self.elapsed,
            self.distinct_source_ports,
            self.peer_ips(),
        );
        for f in self.failures.iter().take(10) {
            s.push_str("\n  failure: ");
            s.push_str(f);
        }
        if self.failures.len() > 10 {
            s.push_str(&format!("\n  ... and {} more", self.failures.len() - 10));
        }
        s
    }
}

/// One answered request.
#[derive(Debug)]
struct Answer {
    backend: String,
    peer: SocketAddr,
    local_port: u16,
}

/// Splits a server reply into backend name and peer, checking that it echoes `sent`.
pub fn parse_reply(reply: &str, sent: &str) -> anyhow::Result<(String, SocketAddr)> {
    let reply = reply.trim_end_matches(['\r', '\n']);
    let mut parts = reply.splitn(3, ' ');
    let (Some(name), Some(peer), Some(echo)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed reply {reply:?}");
    };
    let peer: SocketAddr = peer
        .parse()
        .with_context(|| format!("bad peer address in reply {reply:?}"))?;
    ensure!(echo == sent, "reply {reply:?} does not echo {sent:?}");
    Ok((name.to_owned(), peer))
}

/// Runs `count` requests with `concurrency` threads; `request(i)` performs request `i`.
/// Must be called on a thread inside the client namespace (threads inherit it).
fn run_batch<F>(opts: &TrafficOptions, request: F) -> TrafficReport
where
    F: Fn(usize) -> anyhow::Result<Answer> + Sync,
{
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::with_capacity(opts.count));
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..opts.concurrency.max(1) {
            scope.spawn(|| loop {
                if failed.load(Ordering::Relaxed) >= opts.max_failures {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.count {
                    break;
                }
                match request(i) {
                    Ok(a) => answers.lock().unwrap().push(a),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(format!("#{i}: {e:#}"));
                    }
                }
            });
        }
    });
    let answers = answers.into_inner().unwrap();
    let failures = failures.into_inner().unwrap();
    // Threads that stop on the failure limit do not take an index, so fewer than `count`
    // indices taken means the run was cut short.
    let taken = next.load(Ordering::Relaxed);
    let mut report = TrafficReport {
        attempted: taken.min(opts.count),
        aborted: taken < opts.count,
        failures,
        elapsed: start.elapsed(),
        ..TrafficReport::default()
    };
    let mut ports = BTreeSet::new();
    for a in answers {
        *report.counts.entry(a.backend.clone()).or_default() += 1;
        report
            .backend_by_port
            .insert(a.local_port, a.backend.clone());
        report
            .peers
            .entry(a.backend)
            .or_default()
            .insert(a.peer.ip());
        ports.insert(a.local_port);
    }
    report.distinct_source_ports = ports.len();
    report
}

/// Opens `opts.count` TCP connections from namespace `ns` to `target`, each from a new
/// ephemeral source port; on each sends one line, reads the answer, and closes.
pub fn tcp_connections(
    ns: &str,
    target: SocketAddr,
    opts: &TrafficOptions,
) -> anyhow::Result<TrafficReport> {
    in_netns(ns, || {
        run_batch(opts, |i| {
            let line = format!("tcp request {i}");
            let (reply, local) = tcp_exchange(target, &line, opts.timeout)?;
            let (backend, peer) = parse_reply(&reply, &line)?;
            Ok(Answer {
                backend,
                peer,
                local_port: local.port(),
            })
        })
    })
}

/// One TCP request from namespace `ns` with source address `source` (a second address of the
/// client, say): the backend that answered, or why none did.
pub fn tcp_request_from(
    ns: &str,
    source: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    in_netns(ns, || {
        let domain = socket2::Domain::for_address(target);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket
            .connect_timeout(&target.into(), timeout)
            .with_context(|| format!("connect {source} → {target}"))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(timeout))?;
        let line = format!("tcp request from {source}");
        (&stream).write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        let (backend, _) = parse_reply(&reply, &line)?;
        Ok::<_, anyhow::Error>(backend)
    })?
}

/// Connects, sends `line`, returns the reply line and the local address.
fn tcp_exchange(
    target: SocketAddr,
    line: &str,
    timeout: Duration,
) -> anyhow::Result<(String, SocketAddr)> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    (&stream)
        .write_all(format!("{line}\n").as_bytes())
        .with_context(|| format!("send from {local}"))?;
    let mut reply = String::new();
    let n = BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("read reply on {local}"))?;
    ensure!(n > 0, "connection from {local} closed without a reply");
    Ok((reply, local))
}

/// Sends `opts.count` UDP flows from namespace `ns` to `target`: flow `i` is a socket bound to
/// source port `base_port + i`, sends one datagram and waits `opts.timeout` for the answer,
/// resending up to 3 times. A reply from an address other than `target` is a failure.
pub fn udp_flows(
    ns: &str,
    target: SocketAddr,
    base_port: u16,
    opts: &TrafficOptions,
) -> anyhow::Result<TrafficReport> {
    ensure!(
        usize::from(base_port) + opts.count <= usize::from(u16::MAX) + 1,
        "{} flows do not fit in source ports from {base_port}",
        opts.count
    );
    in_netns(ns, || {
        run_batch(opts, |i| {
            let port = base_port + i as u16;
            let socket = UdpSocket::bind((Family::of(target.ip()).unspecified(), port))
                .with_context(|| format!("bind UDP source port {port}"))?;
            socket.set_read_timeout(Some(opts.timeout))?;
            let payload = format!("udp flow {i}");
            let mut buf = [0u8; 2048];
            for _attempt in 0..=3 {
                socket
                    .send_to(payload.as_bytes(), target)
                    .with_context(|| format!("send from port {port}"))?;
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        ensure!(
                            from == target,
                            "port {port}: reply came from {from}, expected {target}"
                        );
                        let reply = String::from_utf8_lossy(&buf[..n]);
                        let (backend, peer) = parse_reply(&reply, &payload)?;
                        return Ok(Answer {
                            backend,
                            peer,
                            local_port: port,
                        });
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        continue
                    }
                    Err(e) => return Err(e).with_context(|| format!("receive on port {port}")),
                }
            }
            bail!("port {port}: no reply after 4 sends")
        })
    })
}

/// One UDP request of `payload_len` bytes (past the MTU, so the kernel fragments it) from a
/// port of its own, from inside the client namespace; checks the answer came from `target` and
/// is longer than the request (the server echoes it, so the answer is fragmented too). Returns
/// the backend's name and the client address it saw.
pub fn fragmented_udp_request(
    i: usize,
    target: SocketAddr,
    payload_len: usize,
) -> anyhow::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind((Family::of(target.ip()).unspecified(), 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut payload = format!("fragmented {i} ");
    payload.extend(std::iter::repeat_n('x', payload_len - payload.len()));
    let mut buf = vec![0u8; 65536];
    for _attempt in 0..3 {
        socket.send_to(payload.as_bytes(), target)?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                // A fragment that went astray would not reassemble with the others: no answer.
                ensure!(
                    from == target,
                    "request {i}: answer from {from}, expected {target}"
                );
                ensure!(n > payload_len, "request {i}: answer of {n} bytes");
                return parse_reply(&String::from_utf8_lossy(&buf[..n]), &payload);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("receive"),
        }
    }
    bail!("request {i}: no answer after 3 sends")
}

/// One TCP connection from namespace `ns` to `target` carrying a line of `bytes` bytes (so
/// full-size segments both ways: the test server echoes it). Returns the backend's name and how
/// many of the line's bytes came back.
pub fn tcp_transfer(ns: &str, target: SocketAddr, bytes: usize) -> anyhow::Result<(String, usize)> {
    in_netns(ns, || -> anyhow::Result<(String, usize)> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connect to {target}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut line = "x".repeat(bytes);
        line.push('\n');
        (&stream)
            .write_all(line.as_bytes())
            .context("send the transfer")?;
        let mut answer = String::new();
        BufReader::new(&stream)
            .read_line(&mut answer)
            .context("read the echo")?;
        ensure!(
            answer.ends_with('\n'),
            "the echo stopped after {} bytes",
            answer.len()
        );
        let backend = answer.split(' ').next().unwrap_or_default().to_owned();
        let echoed = answer.bytes().filter(|&b| b == b'x').count();
        Ok((backend, echoed))
    })?
}

/// Long-lived TCP connections, each expected to stay on the backend that first answered it.
#[derive(Debug)]
pub struct LongLivedStreams {
    streams: Vec<Stream>,
    timeout: Duration,
}

#[derive(Debug)]
struct Stream {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    backend: String,
    pings: u64,
}

impl LongLivedStreams {
    /// Opens `k` connections from namespace `ns` to `target` and sends one line on each. Fails
    /// if any of them does not answer.
    pub fn open(ns: &str, target: SocketAddr, k: usize, timeout: Duration) -> anyhow::Result<Self> {
        let streams = in_netns(ns, || -> anyhow::Result<Vec<Stream>> {
            (0..k)
                .map(|id| {
                    let stream = TcpStream::connect_timeout(&target, timeout)
                        .with_context(|| format!("stream {id}: connect {target}"))?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    stream.set_nodelay(true)?;
                    let local = stream.local_addr()?;
                    let mut s = Stream {
                        reader: BufReader::new(stream),
                        local,
                        backend: String::new(),
                        pings: 0,
                    };
                    s.backend = s
                        .ping(id)
                        .with_context(|| format!("stream {id}: first exchange"))?;
                    Ok(s)
                })
                .collect()
        })??;
        Ok(LongLivedStreams { streams, timeout })
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Each stream's local address, in opening order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.streams.iter().map(|s| s.local).collect()
    }

    /// Backend that serves each stream, in opening order.
    pub fn backends(&self) -> Vec<String> {
        self.streams.iter().map(|s| s.backend.clone()).collect()
    }

    /// Streams per backend.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for s in &self.streams {
            *counts.entry(s.backend.clone()).or_default() += 1;
        }
        counts
    }

    /// [`ping_all`](Self::ping_all) `rounds` times, `pause` apart, panicking with the failures
    /// (`when` says at which point of the test) if any stream fails.
    pub fn assert_all_answer(&mut self, rounds: usize, pause: Duration, when: &str) {
        for round in 1..=rounds {
            let failures = self.ping_all();
            assert!(
                failures.is_empty(),
                "{when}, round {round}: {} of {} streams failed:\n  {}",
                failures.len(),
                self.len(),
                failures.join("\n  ")
            );
            std::thread::sleep(pause);
        }
    }

    /// Sends one line on every stream and checks that the same backend answers it. Returns one
    /// message per stream that failed; empty means all are fine.
    pub fn ping_all(&mut self) -> Vec<String> {
        self.ping_each()
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Sends one line on every stream: for each, in opening order, `Ok` if the backend that
    /// served it answered, or why not.
    pub fn ping_each(&mut self) -> Vec<Result<(), String>> {
        (0..self.streams.len())
            .map(|id| self.ping_one(id))
            .collect()
    }

    /// Sends one line on stream `id` (in opening order): `Ok` if the backend that served it
    /// answered, or why not.
    pub fn ping_one(&mut self, id: usize) -> Result<(), String> {
        let s = &mut self.streams[id];
        match s.ping(id) {
            Ok(backend) if backend == s.backend => Ok(()),
            Ok(backend) => Err(format!(
                "stream {id} from {}: answered by {backend}, was {}",
                s.local, s.backend
            )),
            Err(e) => Err(format!(
                "stream {id} from {} (backend {}): {e:#}",
                s.local, s.backend
            )),
        }
    }

    /// Moves the streams that `backend` serves out of this set into a set of their own.
    pub fn split_off_backend(&mut self, backend: &str) -> LongLivedStreams {
        let (taken, kept) = std::mem::take(&mut self.streams)
            .into_iter()
            .partition(|s| s.backend == backend);
        self.streams = kept;
        LongLivedStreams {
            streams: taken,
            timeout: self.timeout,
        }
    }
}

impl Stream {
    /// Sends one line and returns the name of the backend that answered it.
    fn ping(&mut self, id: usize) -> anyhow::Result<String> {
        self.pings += 1;
        let line = format!("stream {id} ping {}", self.pings);
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .context("send")?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).context("read reply")?;
        ensure!(n > 0, "closed by the other side");
        let (backend, _peer) = parse_reply(&reply, &line)?;
        Ok(backend)
    }
}

/// Checks ordinary (non-load-balanced) TCP to the load balancer host itself: listens on
/// `addr` in `server_ns`, connects from `client_ns`, and exchanges one line each way.
pub fn tcp_roundtrip_to_host(
    server_ns: &str,
    client_ns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<()> {
    let listener = in_netns(server_ns, || TcpListener::bind(addr))?
        .with_context(|| format!("listen on {addr} in {server_ns}"))?;
    listener.set_nonblocking(true)?;
    std::thread::scope(|scope| {
        let server = scope.spawn(|| -> anyhow::Result<()> {
            let deadline = Instant::now() + timeout;
            let (stream, peer) = loop {
                match listener.accept() {
                    Ok(conn) => break conn,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(timeout))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            (&stream).write_all(format!("host {peer} {line}").as_bytes())?;
            Ok(())
        });
        let client = in_netns(client_ns, || tcp_exchange(addr, "hello host", timeout))?;
        let server = server.join().expect("host listener thread panicked");
        let (reply, _local) = client.with_context(|| format!("connect to host {addr}"))?;
        server.context("host listener")?;
        let (name, _peer) = parse_reply(&reply, "hello host")?;
        ensure!(name == "host", "unexpected reply {reply:?}");
        Ok(())
    })
}

/// Unix time now, in nanoseconds.
fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One TCP connection of a [`ConnectionLoop`].
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the connect started and when the exchange ended (answered or failed), unix ns.
    pub start_unix_ns: u128,
    pub end_unix_ns: u128,
    /// The backend that answered, or why the attempt failed.
    pub outcome: Result<String, String>,
}

impl Attempt {
    /// The backend that answered, if any.
    pub fn backend(&self) -> Option<&str> {
        self.outcome.as_deref().ok()
    }
}

/// Answered attempts by the backend that answered.
pub fn per_backend<'a>(attempts: impl Iterator<Item = &'a Attempt>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in attempts {
        if let Some(b) = a.backend() {
            *counts.entry(b.to_owned()).or_default() += 1;
        }
    }
    counts
}

/// A difference of unix-ns times in milliseconds, for messages.
pub fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

/// New TCP connections, opened continuously from a namespace until stopped: `workers` threads
/// each connect, send one line, read the answer, close, pause, and start over. Every attempt
/// is recorded with its times and outcome.
#[derive(Debug)]
pub struct ConnectionLoop {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ConnectionLoop {
    /// Starts the loop in namespace `ns` against `target`; `timeout` bounds the connect and the
    /// wait for the answer.
    pub fn start(
        ns: &str,
        target: SocketAddr,
        workers: usize,
        pause: Duration,
        timeout: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (ns, stop, attempts) = (ns.to_owned(), stop.clone(), attempts.clone());
            std::thread::spawn(move || {
                in_netns(&ns, || {
                    std::thread::scope(|scope| {
                        for _ in 0..workers.max(1) {
                            scope.spawn(|| {
                                while !stop.load(Ordering::Relaxed) {
                                    let i = next.fetch_add(1, Ordering::Relaxed);
                                    let line = format!("loop request {i}");
                                    let start_unix_ns = unix_ns();
                                    let outcome = tcp_exchange(target, &line, timeout)
                                        .and_then(|(reply, _)| parse_reply(&reply, &line))
                                        .map(|(backend, _)| backend)
                                        .map_err(|e| format!("{e:#}"));
                                    attempts.lock().unwrap().push(Attempt {
                                        start_unix_ns,
                                        end_unix_ns: unix_ns(),
                                        outcome,
                                    });
                                    std::thread::sleep(pause);
                                }
                            });
                        }
                    })
                })
            })
        };
        ConnectionLoop {
            stop,
            attempts,
            handle: Some(handle),
        }
    }

    /// The attempts finished so far, in order of completion.
    pub fn snapshot(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// Stops the loop, waits for the attempts in flight, and returns every attempt.
    pub fn stop(mut self) -> anyhow::Result<Vec<Attempt>> {
        self.finish()?;
        Ok(std::mem::take(&mut *self.attempts.lock().unwrap()))
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            match handle.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    }
}

impl Drop for ConnectionLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A reply a [`UdpStream`] received.
#[derive(Debug, Clone)]
pub struct UdpReply {
    /// Sequence number of the datagram it answers.
    pub seq: u64,
    pub at_unix_ns: u128,
    pub backend: String,
    /// Source address the backend saw.
    pub peer: SocketAddr,
}

/// What a [`UdpStream`] sent and received.
#[derive(Debug, Clone, Default)]
pub struct UdpStreamReport {
    /// `(sequence number, unix ns)` of every datagram sent.
    pub sent: Vec<(u64, u128)>,
    pub replies: Vec<UdpReply>,
    /// Datagrams that did not come from the target or did not parse.
    pub bad_replies: Vec<String>,
}

impl UdpStreamReport {
    /// Sequence numbers that got no reply.
    pub fn unanswered(&self) -> Vec<u64> {
        let answered: BTreeSet<u64> = self.replies.iter().map(|r| r.seq).collect();
        self.sent
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| !answered.contains(seq))
            .collect()
    }
}

/// One UDP flow that lives until stopped: a single socket in the client namespace sends
/// `udp stream <seq>` to the target every `period` and records every reply.
#[derive(Debug)]
pub struct UdpStream {
    local: SocketAddr,
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    report: Arc<Mutex<UdpStreamReport>>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

impl UdpStream {
    pub fn start(ns: &str, target: SocketAddr, period: Duration) -> anyhow::Result<Self> {
        // A socket stays in the namespace it was created in, whichever thread uses it.
        let unspecified = Family::of(target.ip()).unspecified();
        let socket = in_netns(ns, || UdpSocket::bind((unspecified, 0)))?
            .context("bind the UDP stream's socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let local = socket.local_addr()?;
        let socket = Arc::new(socket);
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(UdpStreamReport::default()));
        let sender = {
            let (socket, stop, report) = (socket.clone(), stop_sending.clone(), report.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let at = unix_ns();
                    // An error (e.g. a queued ICMP error) loses this datagram, like the network.
                    let _ = socket.send_to(format!("udp stream {seq}").as_bytes(), target);
                    report.lock().unwrap().sent.push((seq, at));
                    seq += 1;
                    let next = start + period * u32::try_from(seq).unwrap_or(u32::MAX);
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })
        };
        let receiver = {
            let (stop, report) = (stop_receiving.clone(), report.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let (n, from) = match socket.recv_from(&mut buf) {
                        Ok(r) => r,
                        Err(_) => continue, // timeout, or an ICMP error surfacing
                    };
                    let at_unix_ns = unix_ns();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let parsed = (|| -> anyhow::Result<UdpReply> {
                        ensure!(from == target, "reply came from {from}, expected {target}");
                        let mut parts = text.splitn(5, ' ');
                        let (Some(backend), Some(peer), Some("udp"), Some("stream"), Some(seq)) = (
                            parts.next(),
                            parts.next(),
                            parts.next(),
                            parts.next(),
                            parts.next(),
                        ) else {
                            bail!("malformed reply");
                        };
                        Ok(UdpReply {
                            seq: seq.parse()?,
                            at_unix_ns,
                            backend: backend.to_owned(),
                            peer: peer.parse()?,
                        })
                    })();
                    let mut report = report.lock().unwrap();
                    match parsed {
                        Ok(reply) => report.replies.push(reply),
                        Err(e) => report.bad_replies.push(format!("{text:?}: {e:#}")),
                    }
                }
            })
        };
        Ok(UdpStream {
            local,
            stop_sending,
            stop_receiving,
            report,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// The stream's source address (its flow is `local → target`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// What was sent and received so far.
    pub fn snapshot(&self) -> UdpStreamReport {
        self.report.lock().unwrap().clone()
    }

    /// Stops sending, waits briefly for the last replies, and returns everything.
    pub fn stop(mut self) -> UdpStreamReport {
        self.halt();
        std::mem::take(&mut *self.report.lock().unwrap())
    }

    fn halt(&mut self) {
        // Stop the sender first and give the last datagrams time to be answered.
        self.stop_sending.store(true, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop_receiving.store(true, Ordering::Relaxed);
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.halt();
    }
}
