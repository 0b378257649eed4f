//! HTTP suite: requests per second and latency through slb's HTTP and HTTPS listeners and
//! through HAProxy in HTTP mode, on the same namespace topology, driven by the same clients:
//! `wrk` for HTTP/1.1 over TCP, `h2load` for HTTP/2 over TLS (both balancers serve the same
//! self-signed certificate, ALPN h2). Both balancers run side by side on their own ports, and
//! each case is measured in [`ROUNDS`] rounds that alternate between them, so that a slow spell
//! of the shared machine falls on both rather than on whichever balancer ran then; the table
//! shows each balancer's median round.
//!
//! Both balancers do the same work per request: round robin over three `slb-http-backend`
//! servers with equal weights, no health checks, no access log, pooled keep-alive connections
//! to the backends, and X-Forwarded-For / X-Forwarded-Proto / X-Real-IP added (checked with a
//! probe request before each balancer is measured).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde::Deserialize;
use serde_json::json;
use slb_tests::config::{http_listener, https_listener, Scheduler};
use slb_tests::exec::ChildGuard;
use slb_tests::http::{
    add_local_vip, tcp_connect_in, vip_http, vip_https, Echo, HttpBackends, HTTPS_PORT, HTTP_PORT,
};
use slb_tests::slb::unique_instance;
use slb_tests::VIP;
use slb_tests::{SlbConfig, SlbDaemon, Topology, BACKEND_PORT, CLIENT_ADDR};

use super::h2load::{self, H2loadResult, Latency};
use super::{
    busy_between, clock_ticks_per_sec, cpu_jiffies, pin_process, pinned_in,
    place_network_processing, process_cpu_ticks, spawn_haproxy, BenchEnv, Section, BALANCER_CPU,
    GENERATOR_CPU,
};

const BACKENDS: usize = 3;
/// Same weight for every backend, in both balancers.
const WEIGHT: u32 = 1;
/// wrk connections of each measured run: a loaded row (throughput) and a single connection
/// (per-request latency with nothing queued).
const CONNECTION_COUNTS: [u32; 2] = [50, 1];
/// h2load connections and concurrent streams per connection of the HTTP/2-over-TLS row.
const H2_CLIENTS: u32 = 10;
const H2_STREAMS: u32 = 10;
/// The certificate's name (both balancers serve it; h2load connects by address, without SNI).
const CERT_NAME: &str = "slb-bench.example";
const WARM_UP: Duration = Duration::from_secs(1);
/// Measured runs of each case per balancer, alternating between the balancers.
const ROUNDS: usize = 3;
/// HAProxy's ports on the VIP (slb's are [`HTTP_PORT`] and [`HTTPS_PORT`]).
const HAPROXY_HTTP_PORT: u16 = 9000;
const HAPROXY_HTTPS_PORT: u16 = 9443;
/// How long a balancer has to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the line the wrk script prints with the run's figures as JSON.
const RESULT_MARKER: &str = "SLB_BENCH_WRK";

/// wrk's `done()` hook, printing the summary as one JSON line so nothing depends on the
/// human-readable report and its mixed units. Latencies are in microseconds. `%.0f` rather
/// than `%d` because byte counts of long runs exceed 32 bits.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SLB_BENCH_WRK {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"mean":%.1f,"max":%.0f}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"#;

/// The figures of one wrk run, as the script prints them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct WrkResult {
    duration_us: f64,
    requests: u64,
    bytes: u64,
    errors: WrkErrors,
    latency_us: Latency,
}

/// wrk's error counters. `status` counts answers with a status above 399.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct WrkErrors {
    connect: u64,
    read: u64,
    write: u64,
    status: u64,
    timeout: u64,
}

impl WrkResult {
    /// Finds the script's line in wrk's stdout.
    fn parse(stdout: &str) -> anyhow::Result<WrkResult> {
        let line = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(RESULT_MARKER))
            .with_context(|| {
                format!("wrk printed no {RESULT_MARKER} line (did the script run?):\n{stdout}")
            })?;
        serde_json::from_str(line.trim())
            .with_context(|| format!("parsing wrk's {RESULT_MARKER} line {line:?}"))
    }

    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / (self.duration_us / 1e6)
    }

    fn socket_errors(&self) -> u64 {
        self.errors.connect + self.errors.read + self.errors.write + self.errors.timeout
    }

    fn bytes_per_response(&self) -> f64 {
        self.bytes as f64 / self.requests.max(1) as f64
    }
}

/// A measured case: HTTP/1.1 over TCP with wrk at a connection count, or HTTP/2 over TLS with
/// h2load ([`H2_CLIENTS`] connections × [`H2_STREAMS`] streams).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Http1 { connections: u32 },
    H2Tls,
}

/// Every case, in the order they are measured and shown.
const CASES: [Case; 3] = [
    Case::Http1 {
        connections: CONNECTION_COUNTS[0],
    },
    Case::Http1 {
        connections: CONNECTION_COUNTS[1],
    },
    Case::H2Tls,
];

impl Case {
    fn label(self) -> String {
        match self {
            Case::Http1 { connections } => format!("HTTP/1.1, {connections} connection(s)"),
            Case::H2Tls => {
                format!("HTTP/2 over TLS, {H2_CLIENTS} connections × {H2_STREAMS} streams")
            }
        }
    }
}

/// A client's figures for one run.
#[derive(Debug, Clone)]
enum Load {
    Wrk(WrkResult),
    H2load(H2loadResult),
}

impl Load {
    fn requests_per_sec(&self) -> f64 {
        match self {
            Load::Wrk(wrk) => wrk.requests_per_sec(),
            Load::H2load(h2) => h2.requests_per_sec,
        }
    }

    /// Requests answered in the run (the CPU time is divided by these).
    fn requests(&self) -> u64 {
        match self {
            Load::Wrk(wrk) => wrk.requests,
            Load::H2load(h2) => h2.succeeded,
        }
    }

    fn latency_us(&self) -> &Latency {
        match self {
            Load::Wrk(wrk) => &wrk.latency_us,
            Load::H2load(h2) => &h2.latency_us,
        }
    }

    /// Whether any request got a status below 400.
    fn any_success(&self) -> bool {
        match self {
            Load::Wrk(wrk) => wrk.errors.status < wrk.requests,
            Load::H2load(h2) => h2.succeeded > 0,
        }
    }

    /// The table's errors cell.
    fn errors(&self) -> String {
        match self {
            Load::Wrk(wrk) => match (wrk.errors.status, wrk.socket_errors()) {
                (0, 0) => "0".to_owned(),
                (status, socket) => format!("{status} status ≥ 400, {socket} socket"),
            },
            Load::H2load(h2) if h2.errors() == 0 => "0".to_owned(),
            Load::H2load(h2) => format!(
                "{} failed ({} status ≥ 400)",
                h2.errors(),
                h2.status_4xx_5xx
            ),
        }
    }
}

/// One measured run through one balancer.
#[derive(Debug, Clone)]
struct Measurement {
    balancer: &'static str,
    case: Case,
    /// 1 to [`ROUNDS`].
    round: usize,
    load: Load,
    /// CPU time of the balancer's process per request, in microseconds.
    balancer_cpu_us_per_request: f64,
    /// Busy share of [CPU 0 (clients, backends), CPU 1 (balancer)] during the run, in percent.
    cpu_busy_percent: [f64; 2],
}

/// A balancer listening on `http` and `https` in the slb namespace.
struct Balancer<'a> {
    name: &'static str,
    pid: u32,
    http: SocketAddr,
    https: SocketAddr,
    topo: &'a Topology,
    script: &'a Path,
    /// Where h2load writes its per-request log.
    work_dir: &'a Path,
    duration: Duration,
    ticks_per_sec: f64,
}

impl Balancer<'_> {
    /// `wrk` with `connections` connections for `duration`, from the client namespace, pinned
    /// to the generator CPU.
    fn wrk(&self, connections: u32, duration: Duration) -> anyhow::Result<WrkResult> {
        let connections = connections.to_string();
        let seconds = format!("{}s", duration.as_secs().max(1));
        let script = self.script.to_string_lossy();
        let url = format!("http://{}/", self.http);
        let mut cmd = pinned_in(
            self.topo.client_ns(),
            GENERATOR_CPU,
            &[
                "wrk",
                "-t1",
                "-c",
                &connections,
                "-d",
                &seconds,
                "--latency",
                "-s",
                &script,
                &url,
            ],
        );
        let stdout = slb_tests::exec::run(&mut cmd)
            .with_context(|| format!("running wrk against {}", self.name))?;
        let result = WrkResult::parse(&stdout)?;
        ensure!(
            result.requests > 0,
            "wrk completed no request through {} in {seconds}:\n{stdout}",
            self.name
        );
        Ok(result)
    }

    /// `h2load` over TLS with [`H2_CLIENTS`] × [`H2_STREAMS`] for `duration`, from the client
    /// namespace, pinned to the generator CPU; it must have negotiated h2.
    fn h2load(&self, duration: Duration) -> anyhow::Result<H2loadResult> {
        let log = self.work_dir.join("h2load.log");
        // h2load appends to its log: each run starts from an empty one.
        match std::fs::remove_file(&log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", log.display()))
            }
            _ => {}
        }
        let url = format!("https://{}/", self.https);
        let args = h2load::args(&url, H2_CLIENTS, H2_STREAMS, duration, &log);
        let mut cmd = pinned_in(self.topo.client_ns(), GENERATOR_CPU, &args);
        let stdout = slb_tests::exec::run(&mut cmd)
            .with_context(|| format!("running h2load against {}", self.name))?;
        let log_text = std::fs::read_to_string(&log)
            .with_context(|| format!("reading h2load's log {}", log.display()))?;
        let result = H2loadResult::parse(&stdout, &log_text)
            .with_context(|| format!("h2load through {}", self.name))?;
        ensure!(
            result.protocol == "h2" && result.succeeded > 0,
            "h2load through {} negotiated {:?} and completed {} request(s):\n{stdout}",
            self.name,
            result.protocol,
            result.succeeded
        );
        Ok(result)
    }

    /// Runs `case` once for `duration`.
    fn load(&self, case: Case, duration: Duration) -> anyhow::Result<Load> {
        Ok(match case {
            Case::Http1 { connections } => Load::Wrk(self.wrk(connections, duration)?),
            Case::H2Tls => Load::H2load(self.h2load(duration)?),
        })
    }

    /// Checks that the balancer answers with a backend's echo carrying the forwarded headers
    /// over HTTP and over HTTPS with h2.
    fn probe(&self) -> anyhow::Result<()> {
        probe(self.topo, self.http)
            .with_context(|| format!("probe request through {}", self.name))?;
        probe_h2(self.topo, self.https)
            .with_context(|| format!("HTTP/2 probe through {}", self.name))
    }

    /// Runs `case` for [`WARM_UP`], unmeasured.
    fn warm_up(&self, case: Case) -> anyhow::Result<()> {
        let warm_up = self
            .load(case, WARM_UP)
            .with_context(|| format!("warming up {}", self.name))?;
        ensure!(
            warm_up.any_success(),
            "every warm-up request through {} failed",
            self.name
        );
        Ok(())
    }

    /// One measured run of `case`, with the balancer's CPU time and both CPUs' busy shares.
    fn measure_case(&self, case: Case, round: usize) -> anyhow::Result<Measurement> {
        let cpu_before = cpu_jiffies()?;
        let ticks_before = process_cpu_ticks(self.pid)?;
        let load = self.load(case, self.duration)?;
        let ticks = process_cpu_ticks(self.pid)? - ticks_before;
        let cpu_after = cpu_jiffies()?;
        let measurement = Measurement {
            balancer: self.name,
            case,
            round,
            balancer_cpu_us_per_request: ticks as f64 / self.ticks_per_sec * 1e6
                / load.requests().max(1) as f64,
            cpu_busy_percent: busy_between(&cpu_before, &cpu_after).map(|b| 100.0 * b),
            load,
        };
        println!(
            "    round {round}, {}, {}: {:.0} requests/s, p99 {}, error(s): {}",
            self.name,
            case.label(),
            measurement.load.requests_per_sec(),
            format_latency(measurement.load.latency_us().p99),
            measurement.load.errors(),
        );
        Ok(measurement)
    }
}

/// Every case in [`ROUNDS`] rounds, each balancer in turn within a round (the order swapped from
/// one round to the next); each case is warmed up on each balancer before its first round.
fn measure_alternating(balancers: &[Balancer]) -> anyhow::Result<Vec<Measurement>> {
    for balancer in balancers {
        balancer.probe()?;
    }
    let mut measurements = Vec::new();
    for round in 1..=ROUNDS {
        for case in CASES {
            let mut order: Vec<&Balancer> = balancers.iter().collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for balancer in order {
                if round == 1 {
                    balancer.warm_up(case)?;
                }
                measurements.push(balancer.measure_case(case, round)?);
            }
        }
    }
    Ok(measurements)
}

/// One `GET /` from the client namespace on a fresh connection: the answer must be a 200 with
/// a backend's echo ([`check_echo`]).
fn probe(topo: &Topology, http: SocketAddr) -> anyhow::Result<()> {
    let mut stream = tcp_connect_in(topo.client_ns(), http, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("reading the answer")?;
    let _ = stream.shutdown(Shutdown::Both);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("answer without a header end: {text:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "answer is not a 200: {head}"
    );
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    check_echo(body.as_bytes(), "http")
}

/// One `GET /` over TLS with HTTP/2 (`nghttp`, which speaks nothing else; the certificate is
/// self-signed) from the client namespace: a backend's echo with the forwarded headers and
/// X-Forwarded-Proto `https`.
fn probe_h2(topo: &Topology, https: SocketAddr) -> anyhow::Result<()> {
    let url = format!("https://{https}/");
    let body = slb_tests::exec::exec_in(topo.client_ns(), ["nghttp", "-y", "-t", "5", &url])?;
    check_echo(body.as_bytes(), "https")
}

/// `body` is a backend's echo showing X-Forwarded-For, X-Forwarded-Proto `proto` and
/// X-Real-IP of the client, so that both balancers are known to do the same header work.
fn check_echo(body: &[u8], proto: &str) -> anyhow::Result<()> {
    let echo = Echo::parse(body)?;
    let client = CLIENT_ADDR.to_string();
    ensure!(
        echo.x_forwarded_for.as_deref() == Some(client.as_str())
            && echo.x_forwarded_proto.as_deref() == Some(proto)
            && echo.x_real_ip.as_deref() == Some(client.as_str()),
        "the backend did not get X-Forwarded-For/-Proto ({proto}) and X-Real-IP for {client}: \
         {echo:?}"
    );
    Ok(())
}

/// The payload of a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body
            .split_once("\r\n")
            .with_context(|| format!("chunked body without a size line: {body:?}"))?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let (chunk, after) = (rest.get(..size), rest.get(size + 2..));
        let (Some(chunk), Some(after)) = (chunk, after) else {
            bail!("chunk shorter than its size {size}");
        };
        out.push_str(chunk);
        body = after;
    }
}

/// Waits until HAProxy's ports accept TCP connections from the client namespace; fails early if
/// its process exits.
fn wait_accepting(topo: &Topology, name: &str, process: &mut ChildGuard) -> anyhow::Result<()> {
    let (http, https) = haproxy_addresses();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = process.try_wait()? {
            bail!("{name} exited ({status}) before accepting connections");
        }
        let accepting = [http, https]
            .into_iter()
            .all(|addr| tcp_connect_in(topo.client_ns(), addr, Duration::from_millis(200)).is_ok());
        if accepting {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name} does not accept connections on {http} and {https} within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// slb's config: an HTTP and an HTTPS listener (serving `cert`) over the three backends,
/// weighted round robin, no health check, no access log, forwarded headers on (the default,
/// spelled out).
fn slb_config(topo: &Topology, cert: &Certificate) -> SlbConfig {
    let mut config = SlbConfig::new(&unique_instance("bhttp"), topo.backend_count());
    let backends: Vec<(usize, u32)> = (1..=topo.backend_count()).map(|i| (i, WEIGHT)).collect();
    let certificate = slb_tests::config::Certificate {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        domains: vec![CERT_NAME.to_owned()],
    };
    config.group("pool", &backends);
    for mut listener in [
        http_listener("web", HTTP_PORT, "pool"),
        https_listener("web-tls", HTTPS_PORT, "pool", vec![certificate]),
    ] {
        listener.scheduler = Some(Scheduler::Wrr);
        listener.forwarded_headers = true;
        config.listener(listener);
    }
    config
}

/// A self-signed certificate (ECDSA P-256) made with `openssl` for the run: the PEM files
/// slb reads, and the certificate and key in one file, as HAProxy reads them.
struct Certificate {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    combined: std::path::PathBuf,
}

impl Certificate {
    fn generate(dir: &Path) -> anyhow::Result<Certificate> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let combined = dir.join("cert-and-key.pem");
        let subject = format!("/CN={CERT_NAME}");
        let san = format!("subjectAltName=DNS:{CERT_NAME},IP:{VIP}");
        let (cert_arg, key_arg) = (cert.to_string_lossy(), key.to_string_lossy());
        slb_tests::exec::run(std::process::Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            &san,
            "-keyout",
            &key_arg,
            "-out",
            &cert_arg,
        ]))
        .context("making a self-signed certificate with openssl")?;
        let pem = std::fs::read_to_string(&cert)? + &std::fs::read_to_string(&key)?;
        std::fs::write(&combined, pem)
            .with_context(|| format!("writing {}", combined.display()))?;
        Ok(Certificate {
            cert,
            key,
            combined,
        })
    }
}

/// HAProxy's config matching [`slb_config`]: one thread, keep-alive on both sides with
/// backend connections reused, the same forwarded headers, slb's default timeouts
/// (`backend_timeout` 30 s, `header_timeout` 10 s), no checks, no logging.
fn haproxy_addresses() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from((VIP, HAPROXY_HTTP_PORT)),
        SocketAddr::from((VIP, HAPROXY_HTTPS_PORT)),
    )
}

fn haproxy_config(backends: usize, cert: &Path) -> String {
    let cert = cert.display();
    let mut config = format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    option forwardfor
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 30s

frontend web
    bind {VIP}:{HAPROXY_HTTP_PORT}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Real-IP %[src]
    default_backend pool

frontend web-tls
    bind {VIP}:{HAPROXY_HTTPS_PORT} ssl crt {cert} alpn h2,http/1.1
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Real-IP %[src]
    default_backend pool

backend pool
    balance roundrobin
"
    );
    for i in 1..=backends {
        let _ = writeln!(
            config,
            "    server {} {}:{BACKEND_PORT} weight {WEIGHT}",
            Topology::backend_name(i),
            Topology::backend_addr(i)
        );
    }
    config
}

/// What both balancers' runs share: the topology, the wrk script, the directory of the
/// certificate and h2load's log, the run length and the clock.
struct Shared<'a> {
    env: &'a BenchEnv,
    topo: &'a Topology,
    script: &'a Path,
    work_dir: &'a Path,
    cert: &'a Certificate,
    ticks_per_sec: f64,
}

impl Shared<'_> {
    fn balancer(
        &self,
        name: &'static str,
        pid: u32,
        (http, https): (SocketAddr, SocketAddr),
    ) -> Balancer<'_> {
        Balancer {
            name,
            pid,
            http,
            https,
            topo: self.topo,
            script: self.script,
            work_dir: self.work_dir,
            duration: self.env.duration,
            ticks_per_sec: self.ticks_per_sec,
        }
    }
}

fn start_slb(shared: &Shared) -> anyhow::Result<SlbDaemon> {
    let config = slb_config(shared.topo, shared.cert);
    let toml = config.to_toml();
    // One proxy thread, as HAProxy gets `nbthread 1`.
    let daemon = SlbDaemon::start_toml_with(
        &shared.env.slb(),
        shared.topo.slb_ns(),
        &config.instance,
        &toml,
        &["--worker-threads", "1"],
    )
    .with_context(|| format!("starting slb with\n{toml}"))?;
    let pid = daemon.pid().context("slb exited right after starting")?;
    pin_process(pid, BALANCER_CPU)?;
    Ok(daemon)
}

fn start_haproxy(shared: &Shared) -> anyhow::Result<ChildGuard> {
    let config_path = shared.work_dir.join("haproxy.cfg");
    let config = haproxy_config(shared.topo.backend_count(), &shared.cert.combined);
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut haproxy =
        spawn_haproxy(shared.topo.slb_ns(), &config_path).context("starting HAProxy")?;
    wait_accepting(shared.topo, "HAProxy", &mut haproxy)?;
    Ok(haproxy)
}

pub fn run(env: &BenchEnv) -> anyhow::Result<Section> {
    let mut script = tempfile::Builder::new()
        .prefix("slb-bench-wrk-")
        .suffix(".lua")
        .tempfile()
        .context("creating the wrk script file")?;
    script
        .write_all(WRK_SCRIPT.as_bytes())
        .context("writing the wrk script")?;
    let work_dir = tempfile::Builder::new()
        .prefix("slb-bench-http-")
        .tempdir()
        .context("creating a directory for the certificate, configs and logs")?;
    let cert = Certificate::generate(work_dir.path())?;

    // Dropped in reverse order: the backends die before the namespaces go.
    let topo = Topology::builder()
        .tag("bhttp")
        .backends(BACKENDS)
        .build()
        .context("creating the namespaces")?;
    // The proxy's TCP/IP work is part of its cost: keep it on the balancer's CPU.
    place_network_processing(&topo).context("placing the veths' packet processing")?;
    add_local_vip(&topo).context("putting the VIP on lo in the slb namespace")?;
    let backends = HttpBackends::start_all(&topo, &env.bin("slb-http-backend"))
        .context("starting the HTTP backends")?;
    for pid in backends.pids() {
        pin_process(pid, GENERATOR_CPU)?;
    }
    let shared = Shared {
        env,
        topo: &topo,
        script: script.path(),
        work_dir: work_dir.path(),
        cert: &cert,
        ticks_per_sec: clock_ticks_per_sec()?,
    };

    println!("==> HTTP and HTTPS through slb and HAProxy, {ROUNDS} rounds");
    let slb = start_slb(&shared)?;
    let slb_pid = slb.pid().context("slb exited")?;
    let haproxy = start_haproxy(&shared)?;
    let balancers = [
        shared.balancer("slb", slb_pid, (vip_http(), vip_https())),
        shared.balancer("HAProxy", haproxy.id(), haproxy_addresses()),
    ];
    let measurements = measure_alternating(&balancers)?;
    drop(haproxy);
    let status = slb.stop().context("stopping slb")?;
    ensure!(status.success(), "slb exited with {status} when stopped");
    Ok(section(env, &measurements))
}

/// Microseconds as `0.123 ms`.
fn format_latency(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

/// `balancer`'s rounds of `case`, slowest first.
fn rounds<'a>(measurements: &'a [Measurement], balancer: &str, case: Case) -> Vec<&'a Measurement> {
    let mut rounds: Vec<&Measurement> = measurements
        .iter()
        .filter(|m| m.balancer == balancer && m.case == case)
        .collect();
    rounds.sort_by(|a, b| {
        a.load
            .requests_per_sec()
            .total_cmp(&b.load.requests_per_sec())
    });
    rounds
}

/// `balancer`'s median round of `case` by requests/s (the upper one of an even count).
fn median<'a>(
    measurements: &'a [Measurement],
    balancer: &str,
    case: Case,
) -> Option<&'a Measurement> {
    let rounds = rounds(measurements, balancer, case);
    rounds.get(rounds.len() / 2).copied()
}

const BALANCERS: [&str; 2] = ["slb", "HAProxy"];

fn section(env: &BenchEnv, measurements: &[Measurement]) -> Section {
    let seconds = env.duration.as_secs().max(1);
    let mut md = String::from("## HTTP: slb's HTTP/HTTPS listeners vs HAProxy 2.6 (HTTP mode)\n\n");
    write_setup(&mut md, seconds, measurements);
    write_table(&mut md, measurements);
    md.push('\n');
    let ratios = write_ratios(&mut md, measurements);
    let (haproxy_http, haproxy_https) = haproxy_addresses();
    let _ = writeln!(
        md,
        "\nA requests/s ratio above 1 means slb serves more; a p99 ratio above 1 means slb's \
         p99 is longer. \"balancer CPU/request\" is the balancer process's own CPU time (not \
         the NAPI threads'). Both balancers run one worker thread on CPU 1 (slb \
         `--worker-threads 1`: one proxy thread, its control plane on threads of its own; \
         HAProxy `nbthread 1`), side by side on their own ports (slb {} and {}, HAProxy {} \
         and {}); each row is the balancer's median of {ROUNDS} rounds, which alternate \
         between the balancers. Caveats: slb's XDP program is attached on the slb namespace's \
         interfaces and passes both balancers' traffic up on CPU 1; wrk and h2load are \
         closed-loop (a connection or stream sends its next request when the answer arrives), \
         so latencies are taken at the rate each balancer sustains, not at one offered rate; \
         when CPU 0 is near 100%, the clients and the backends rather than the balancer cap \
         requests/s.",
        vip_http(),
        vip_https(),
        haproxy_http,
        haproxy_https,
    );
    let json = json!({
        "setup": {
            "generator": "wrk -t1",
            "h2_generator": format!("h2load -t1 -c {H2_CLIENTS} -m {H2_STREAMS}"),
            "generator_cpu": GENERATOR_CPU,
            "balancer_cpu": BALANCER_CPU,
            "backends": BACKENDS,
            "backend_weight": WEIGHT,
            "duration_s": seconds,
            "warm_up_s": WARM_UP.as_secs(),
            "url": format!("http://{}/", vip_http()),
            "h2_url": format!("https://{}/", vip_https()),
            "haproxy_url": format!("http://{haproxy_http}/"),
            "haproxy_h2_url": format!("https://{haproxy_https}/"),
            "rounds": ROUNDS,
        },
        "runs": measurements.iter().map(run_json).collect::<Vec<_>>(),
        "slb_over_haproxy": ratios,
    });
    Section { markdown: md, json }
}

fn write_setup(md: &mut String, seconds: u64, measurements: &[Measurement]) {
    let response_bytes = measurements
        .iter()
        .find_map(|m| match &m.load {
            Load::Wrk(wrk) if m.balancer == "slb" => Some(wrk.bytes_per_response()),
            _ => None,
        })
        .unwrap_or_default();
    let cipher = measurements
        .iter()
        .find_map(|m| match &m.load {
            Load::H2load(h2) => Some(h2.cipher.as_str()),
            Load::Wrk(_) => None,
        })
        .unwrap_or("?");
    let _ = writeln!(
        md,
        "wrk (1 thread) or h2load (1 thread) and the three `slb-http-backend` servers on CPU \
         {GENERATOR_CPU}, the balancer and its namespace's packet processing (threaded NAPI) \
         on CPU {BALANCER_CPU}; {seconds} s per row after a {} s warm-up; `GET /` answered \
         with a JSON echo (~{response_bytes:.0} bytes with headers through slb over HTTP/1.1), \
         round robin over 3 equal-weight backends, keep-alive both sides (HTTP/1.1 to the \
         backends), forwarded headers added, no health checks, no access log. HTTP/2: \
         `h2load -c {H2_CLIENTS} -m {H2_STREAMS}` to `https://{}/`, both balancers serving \
         the same self-signed ECDSA P-256 certificate with ALPN h2 (TLS 1.3, {cipher}); \
         latency percentiles from h2load's per-request log.\n",
        WARM_UP.as_secs(),
        vip_https(),
    );
}

fn write_table(md: &mut String, measurements: &[Measurement]) {
    md.push_str(
        "| balancer | load | requests/s | p50 | p90 | p99 | errors | balancer CPU/request \
         | CPU 0 / CPU 1 busy |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for case in CASES {
        for m in BALANCERS
            .iter()
            .filter_map(|balancer| median(measurements, balancer, case))
        {
            let latency = m.load.latency_us();
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} µs | {:.0}% / {:.0}% |",
                m.balancer,
                case.label(),
                m.load.requests_per_sec(),
                format_latency(latency.p50),
                format_latency(latency.p90),
                format_latency(latency.p99),
                m.load.errors(),
                m.balancer_cpu_us_per_request,
                m.cpu_busy_percent[0],
                m.cpu_busy_percent[1],
            );
        }
    }
}

/// slb against HAProxy in each case both were measured in; the ratios, also as JSON.
fn write_ratios(md: &mut String, measurements: &[Measurement]) -> Vec<serde_json::Value> {
    let mut ratios = Vec::new();
    for case in CASES {
        let (Some(slb), Some(haproxy)) = (
            median(measurements, "slb", case),
            median(measurements, "HAProxy", case),
        ) else {
            continue;
        };
        let rps_ratio = slb.load.requests_per_sec() / haproxy.load.requests_per_sec();
        let p99_ratio = slb.load.latency_us().p99 / haproxy.load.latency_us().p99;
        let cpu_ratio = slb.balancer_cpu_us_per_request / haproxy.balancer_cpu_us_per_request;
        let _ = writeln!(
            md,
            "slb/HAProxy ({}): requests/s ratio {rps_ratio:.2}, p99 ratio {p99_ratio:.2}, \
             CPU/request ratio {cpu_ratio:.2} (requests/s of the rounds: slb {}; HAProxy {})  ",
            case.label(),
            rounds_requests_per_sec(measurements, "slb", case),
            rounds_requests_per_sec(measurements, "HAProxy", case),
        );
        let mut ratio = json!({
            "protocol": case_protocol(case),
            "requests_per_sec_ratio": rps_ratio,
            "p99_ratio": p99_ratio,
            "cpu_per_request_ratio": cpu_ratio,
        });
        add_case_fields(&mut ratio, case);
        ratios.push(ratio);
    }
    ratios
}

/// Each round's requests/s in round order, e.g. `31020, 29800, 30550`.
fn rounds_requests_per_sec(measurements: &[Measurement], balancer: &str, case: Case) -> String {
    let mut rounds = rounds(measurements, balancer, case);
    rounds.sort_by_key(|m| m.round);
    rounds
        .iter()
        .map(|m| format!("{:.0}", m.load.requests_per_sec()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `http/1.1` or `h2-tls`, as the JSON names a case's protocol.
fn case_protocol(case: Case) -> &'static str {
    match case {
        Case::Http1 { .. } => "http/1.1",
        Case::H2Tls => "h2-tls",
    }
}

/// The case's connection (and stream) counts, added to a JSON object.
fn add_case_fields(value: &mut serde_json::Value, case: Case) {
    let (connections, streams) = match case {
        Case::Http1 { connections } => (connections, 1),
        Case::H2Tls => (H2_CLIENTS, H2_STREAMS),
    };
    value["connections"] = json!(connections);
    value["streams_per_connection"] = json!(streams);
}

fn run_json(m: &Measurement) -> serde_json::Value {
    let latency = m.load.latency_us();
    let mut run = json!({
        "balancer": m.balancer,
        "round": m.round,
        "protocol": case_protocol(m.case),
        "requests_per_sec": m.load.requests_per_sec(),
        "requests": m.load.requests(),
        "latency_ms": {
            "p50": latency.p50 / 1000.0,
            "p90": latency.p90 / 1000.0,
            "p99": latency.p99 / 1000.0,
            "mean": latency.mean / 1000.0,
            "max": latency.max / 1000.0,
        },
        "balancer_cpu_us_per_request": m.balancer_cpu_us_per_request,
        "cpu_busy_percent": {
            "generator_cpu": m.cpu_busy_percent[0],
            "balancer_cpu": m.cpu_busy_percent[1],
        },
    });
    add_case_fields(&mut run, m.case);
    match &m.load {
        Load::Wrk(wrk) => {
            run["duration_s"] = json!(wrk.duration_us / 1e6);
            run["bytes_per_response"] = json!(wrk.bytes_per_response());
            run["errors"] = json!({
                "status_400_or_more": wrk.errors.status,
                "connect": wrk.errors.connect,
                "read": wrk.errors.read,
                "write": wrk.errors.write,
                "timeout": wrk.errors.timeout,
            });
        }
        Load::H2load(h2) => run["h2load"] = h2.json(),
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.1's report followed by the script's line.
    const WRK_OUTPUT: &str = "Running 5s test @ http://10.200.100.10:8000/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  512.00us  14.20ms   88.00%
    Req/Sec    24.01k     1.20k   26.00k    80.00%
  Latency Distribution
     50%    1.98ms
     75%    2.20ms
     90%    2.60ms
     99%    4.10ms
  119500 requests in 5.00s, 41.03MB read
  Non-2xx or 3xx responses: 2
Requests/sec:  23900.00
Transfer/sec:      8.21MB
SLB_BENCH_WRK {\"duration_us\":5000000,\"requests\":119500,\"bytes\":43022643,\"errors\":{\"connect\":0,\"read\":1,\"write\":0,\"status\":2,\"timeout\":3},\"latency_us\":{\"p50\":1980,\"p90\":2600,\"p99\":4100,\"mean\":2100.5,\"max\":14200}}
";

    #[test]
    fn parses_the_script_line_and_ignores_the_report() {
        let r = WrkResult::parse(WRK_OUTPUT).unwrap();
        assert_eq!(r.requests, 119_500);
        assert_eq!(r.requests_per_sec(), 23_900.0);
        assert_eq!(r.latency_us.p99, 4100.0);
        assert_eq!(r.errors.status, 2);
        assert_eq!(r.socket_errors(), 4);
        assert!((r.bytes_per_response() - 360.02).abs() < 0.01);
    }

    #[test]
    fn missing_script_line_is_an_error() {
        let report = WRK_OUTPUT
            .lines()
            .filter(|l| !l.starts_with(RESULT_MARKER))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(WrkResult::parse(&report).is_err());
    }

    #[test]
    fn dechunks_a_body() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").unwrap(),
            "hello world"
        );
        assert!(dechunk("zz\r\nhello").is_err());
    }

    #[test]
    fn haproxy_config_lists_every_backend() {
        let config = haproxy_config(3, Path::new("/tmp/c.pem"));
        for i in 1..=3 {
            let server = format!(
                "server b{i} {}:{BACKEND_PORT} weight {WEIGHT}",
                Topology::backend_addr(i)
            );
            assert!(
                config.contains(&server),
                "{server:?} missing from\n{config}"
            );
        }
        assert!(config.contains(&format!("bind {VIP}:{HAPROXY_HTTP_PORT}")));
        assert!(config.contains(&format!(
            "bind {VIP}:{HAPROXY_HTTPS_PORT} ssl crt /tmp/c.pem alpn h2,http/1.1"
        )));
    }
}
