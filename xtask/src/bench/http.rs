//! HTTP suite: requests per second and latency through slb's HTTP listener and through HAProxy
//! in HTTP mode, on the same namespace topology, driven by the same `wrk` command, one after
//! the other in one run.
//!
//! Both balancers do the same work per request: round robin over three `slb-http-backend`
//! servers with equal weights, no health checks, no access log, pooled keep-alive connections
//! to the backends, and X-Forwarded-For / X-Forwarded-Proto / X-Real-IP added (checked with a
//! probe request before each balancer is measured).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::Shutdown;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde::Deserialize;
use serde_json::json;
use slb_tests::config::{http_listener, Scheduler};
use slb_tests::exec::ChildGuard;
use slb_tests::http::{add_local_vip, tcp_connect_in, vip_http, Echo, HttpBackends, HTTP_PORT};
use slb_tests::slb::unique_instance;
use slb_tests::{SlbConfig, SlbDaemon, Topology, BACKEND_PORT, CLIENT_ADDR, VIP};

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
const WARM_UP: Duration = Duration::from_secs(1);
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
    latency_us: WrkLatency,
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
struct WrkLatency {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
    max: f64,
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

/// One measured wrk run through one balancer.
#[derive(Debug, Clone)]
struct Measurement {
    balancer: &'static str,
    connections: u32,
    wrk: WrkResult,
    /// CPU time of the balancer's process per request, in microseconds.
    balancer_cpu_us_per_request: f64,
    /// Busy share of [CPU 0 (wrk, backends), CPU 1 (balancer)] during the run, in percent.
    cpu_busy_percent: [f64; 2],
}

/// A balancer listening on `VIP:8000` in the slb namespace.
struct Balancer<'a> {
    name: &'static str,
    pid: u32,
    topo: &'a Topology,
    script: &'a Path,
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
        let url = format!("http://{}/", vip_http());
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

    /// Checks that the balancer answers with a backend's echo carrying the forwarded headers,
    /// warms it up, then measures each connection count.
    fn measure(&self) -> anyhow::Result<Vec<Measurement>> {
        probe(self.topo).with_context(|| format!("probe request through {}", self.name))?;
        let warm_up = self
            .wrk(CONNECTION_COUNTS[0], WARM_UP)
            .with_context(|| format!("warming up {}", self.name))?;
        ensure!(
            warm_up.errors.status < warm_up.requests,
            "every warm-up request through {} failed with an error status",
            self.name
        );
        let mut measurements = Vec::new();
        for connections in CONNECTION_COUNTS {
            let cpu_before = cpu_jiffies()?;
            let ticks_before = process_cpu_ticks(self.pid)?;
            let wrk = self.wrk(connections, self.duration)?;
            let ticks = process_cpu_ticks(self.pid)? - ticks_before;
            let cpu_after = cpu_jiffies()?;
            let cpu_busy_percent = busy_between(&cpu_before, &cpu_after).map(|b| 100.0 * b);
            let measurement = Measurement {
                balancer: self.name,
                connections,
                balancer_cpu_us_per_request: ticks as f64 / self.ticks_per_sec * 1e6
                    / wrk.requests as f64,
                cpu_busy_percent,
                wrk,
            };
            println!(
                "    {}, {} connection(s): {:.0} requests/s, p99 {}, {} error(s)",
                self.name,
                connections,
                measurement.wrk.requests_per_sec(),
                format_latency(measurement.wrk.latency_us.p99),
                measurement.wrk.errors.status + measurement.wrk.socket_errors(),
            );
            measurements.push(measurement);
        }
        Ok(measurements)
    }
}

/// One `GET /` from the client namespace on a fresh connection: the answer must be a 200 with
/// a backend's echo showing X-Forwarded-For, X-Forwarded-Proto and X-Real-IP, so that both
/// balancers are known to do the same header work.
fn probe(topo: &Topology) -> anyhow::Result<()> {
    let mut stream = tcp_connect_in(topo.client_ns(), vip_http(), Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        vip_http()
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
    let echo = Echo::parse(body.as_bytes())?;
    let client = CLIENT_ADDR.to_string();
    ensure!(
        echo.x_forwarded_for.as_deref() == Some(client.as_str())
            && echo.x_forwarded_proto.as_deref() == Some("http")
            && echo.x_real_ip.as_deref() == Some(client.as_str()),
        "the backend did not get X-Forwarded-For/-Proto and X-Real-IP for {client}: {echo:?}"
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

/// Waits until `VIP:8000` accepts TCP connections from the client namespace; fails early if
/// the balancer's process exits.
fn wait_accepting(topo: &Topology, name: &str, process: &mut ChildGuard) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = process.try_wait()? {
            bail!("{name} exited ({status}) before accepting connections");
        }
        if tcp_connect_in(topo.client_ns(), vip_http(), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name} does not accept connections on {} within {START_TIMEOUT:?}",
            vip_http()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// slb's config: one HTTP listener over the three backends, weighted round robin, no health
/// check, no access log, forwarded headers on (the default, spelled out).
fn slb_config(topo: &Topology) -> SlbConfig {
    let mut config = SlbConfig::new(&unique_instance("bhttp"), topo.backend_count());
    let backends: Vec<(usize, u32)> = (1..=topo.backend_count()).map(|i| (i, WEIGHT)).collect();
    let mut listener = http_listener("web", HTTP_PORT, "pool");
    listener.scheduler = Scheduler::Wrr;
    listener.forwarded_headers = true;
    config.group("pool", &backends).listener(listener);
    config
}

/// HAProxy's config matching [`slb_config`]: one thread, keep-alive on both sides with
/// backend connections reused, the same forwarded headers, slb's default timeouts
/// (`backend_timeout` 30 s, `header_timeout` 10 s), no checks, no logging.
fn haproxy_config(backends: usize) -> String {
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
    bind {VIP}:{HTTP_PORT}
    http-request set-header X-Forwarded-Proto http
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

fn bench_slb(
    env: &BenchEnv,
    topo: &Topology,
    script: &Path,
    ticks_per_sec: f64,
) -> anyhow::Result<Vec<Measurement>> {
    let config = slb_config(topo);
    let toml = config.to_toml();
    // One runtime thread, as HAProxy gets `nbthread 1`.
    let daemon = SlbDaemon::start_toml_with(
        &env.slb(),
        topo.slb_ns(),
        &config.instance,
        &toml,
        &["--worker-threads", "1"],
    )
    .with_context(|| format!("starting slb with\n{toml}"))?;
    let pid = daemon.pid().context("slb exited right after starting")?;
    pin_process(pid, BALANCER_CPU)?;
    let balancer = Balancer {
        name: "slb",
        pid,
        topo,
        script,
        duration: env.duration,
        ticks_per_sec,
    };
    let measurements = balancer.measure()?;
    let status = daemon.stop().context("stopping slb")?;
    ensure!(status.success(), "slb exited with {status} when stopped");
    Ok(measurements)
}

fn bench_haproxy(
    env: &BenchEnv,
    topo: &Topology,
    script: &Path,
    ticks_per_sec: f64,
) -> anyhow::Result<Vec<Measurement>> {
    let dir = tempfile::Builder::new()
        .prefix("slb-bench-http-")
        .tempdir()
        .context("creating a directory for the HAProxy config")?;
    let config_path = dir.path().join("haproxy.cfg");
    std::fs::write(&config_path, haproxy_config(topo.backend_count()))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let mut haproxy = spawn_haproxy(topo.slb_ns(), &config_path).context("starting HAProxy")?;
    wait_accepting(topo, "HAProxy", &mut haproxy)?;
    let balancer = Balancer {
        name: "HAProxy",
        pid: haproxy.id(),
        topo,
        script,
        duration: env.duration,
        ticks_per_sec,
    };
    balancer.measure()
}

pub fn run(env: &BenchEnv) -> anyhow::Result<Section> {
    let ticks_per_sec = clock_ticks_per_sec()?;
    let mut script = tempfile::Builder::new()
        .prefix("slb-bench-wrk-")
        .suffix(".lua")
        .tempfile()
        .context("creating the wrk script file")?;
    script
        .write_all(WRK_SCRIPT.as_bytes())
        .context("writing the wrk script")?;

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

    println!("==> HTTP through slb");
    let mut measurements = bench_slb(env, &topo, script.path(), ticks_per_sec)?;
    println!("==> HTTP through HAProxy");
    measurements.extend(bench_haproxy(env, &topo, script.path(), ticks_per_sec)?);
    Ok(section(env, &measurements))
}

/// Microseconds as `0.123 ms`.
fn format_latency(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

fn find<'a>(
    measurements: &'a [Measurement],
    balancer: &str,
    connections: u32,
) -> Option<&'a Measurement> {
    measurements
        .iter()
        .find(|m| m.balancer == balancer && m.connections == connections)
}

fn section(env: &BenchEnv, measurements: &[Measurement]) -> Section {
    let seconds = env.duration.as_secs().max(1);
    let mut md = String::from("## HTTP: slb's HTTP listener vs HAProxy 2.6 (HTTP mode)\n\n");
    write_setup(&mut md, seconds, measurements);
    write_table(&mut md, measurements);
    md.push('\n');
    let ratios = write_ratios(&mut md, measurements);
    md.push_str(
        "\nA requests/s ratio above 1 means slb serves more; a p99 ratio above 1 means slb's \
         p99 is longer. \"balancer CPU/request\" is the balancer process's own CPU time (not \
         the NAPI threads'). Both balancers run one worker thread on CPU 1 (slb \
         `--worker-threads 1`, HAProxy `nbthread 1`). Caveats: slb's XDP program stays attached on the slb namespace's interfaces \
         and passes this traffic up on CPU 1 (HAProxy runs without it); wrk is closed-loop \
         (a connection sends its next request when the answer arrives), so latencies are \
         taken at the rate each balancer sustains, not at one offered rate; when CPU 0 is near \
         100%, wrk and the backends rather than the balancer cap requests/s.\n",
    );
    let json = json!({
        "setup": {
            "generator": "wrk -t1",
            "generator_cpu": GENERATOR_CPU,
            "balancer_cpu": BALANCER_CPU,
            "backends": BACKENDS,
            "backend_weight": WEIGHT,
            "duration_s": seconds,
            "warm_up_s": WARM_UP.as_secs(),
            "url": format!("http://{}/", vip_http()),
        },
        "runs": measurements.iter().map(run_json).collect::<Vec<_>>(),
        "slb_over_haproxy": ratios,
    });
    Section { markdown: md, json }
}

fn write_setup(md: &mut String, seconds: u64, measurements: &[Measurement]) {
    let response_bytes = find(measurements, "slb", CONNECTION_COUNTS[0])
        .map(|m| m.wrk.bytes_per_response())
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "wrk (1 thread) and the three `slb-http-backend` servers on CPU {GENERATOR_CPU}, the \
         balancer and its namespace's packet processing (threaded NAPI) on CPU \
         {BALANCER_CPU}; {seconds} s per row after a {} s warm-up; `GET /` \
         answered with a JSON echo (~{response_bytes:.0} bytes with headers through slb), \
         round robin over 3 equal-weight backends, keep-alive both sides, forwarded headers \
         added, no health checks, no access log.\n",
        WARM_UP.as_secs()
    );
}

fn write_table(md: &mut String, measurements: &[Measurement]) {
    md.push_str(
        "| balancer | connections | requests/s | p50 | p90 | p99 | errors | balancer CPU/request \
         | CPU 0 / CPU 1 busy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for m in measurements {
        let errors = match (m.wrk.errors.status, m.wrk.socket_errors()) {
            (0, 0) => "0".to_owned(),
            (status, socket) => format!("{status} status ≥ 400, {socket} socket"),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} µs | {:.0}% / {:.0}% |",
            m.balancer,
            m.connections,
            m.wrk.requests_per_sec(),
            format_latency(m.wrk.latency_us.p50),
            format_latency(m.wrk.latency_us.p90),
            format_latency(m.wrk.latency_us.p99),
            errors,
            m.balancer_cpu_us_per_request,
            m.cpu_busy_percent[0],
            m.cpu_busy_percent[1],
        );
    }
}

/// slb against HAProxy at each connection count both were measured at; the ratios, also as
/// JSON.
fn write_ratios(md: &mut String, measurements: &[Measurement]) -> Vec<serde_json::Value> {
    let mut ratios = Vec::new();
    for connections in CONNECTION_COUNTS {
        let (Some(slb), Some(haproxy)) = (
            find(measurements, "slb", connections),
            find(measurements, "HAProxy", connections),
        ) else {
            continue;
        };
        let rps_ratio = slb.wrk.requests_per_sec() / haproxy.wrk.requests_per_sec();
        let p99_ratio = slb.wrk.latency_us.p99 / haproxy.wrk.latency_us.p99;
        let _ = writeln!(
            md,
            "slb/HAProxy ({connections} connection(s)): requests/s ratio {rps_ratio:.2}, \
             p99 ratio {p99_ratio:.2}  "
        );
        ratios.push(json!({
            "connections": connections,
            "requests_per_sec_ratio": rps_ratio,
            "p99_ratio": p99_ratio,
        }));
    }
    ratios
}

fn run_json(m: &Measurement) -> serde_json::Value {
    json!({
        "balancer": m.balancer,
        "connections": m.connections,
        "requests_per_sec": m.wrk.requests_per_sec(),
        "requests": m.wrk.requests,
        "duration_s": m.wrk.duration_us / 1e6,
        "bytes_per_response": m.wrk.bytes_per_response(),
        "latency_ms": {
            "p50": m.wrk.latency_us.p50 / 1000.0,
            "p90": m.wrk.latency_us.p90 / 1000.0,
            "p99": m.wrk.latency_us.p99 / 1000.0,
            "mean": m.wrk.latency_us.mean / 1000.0,
            "max": m.wrk.latency_us.max / 1000.0,
        },
        "errors": {
            "status_400_or_more": m.wrk.errors.status,
            "connect": m.wrk.errors.connect,
            "read": m.wrk.errors.read,
            "write": m.wrk.errors.write,
            "timeout": m.wrk.errors.timeout,
        },
        "balancer_cpu_us_per_request": m.balancer_cpu_us_per_request,
        "cpu_busy_percent": {
            "generator_cpu": m.cpu_busy_percent[0],
            "balancer_cpu": m.cpu_busy_percent[1],
        },
    })
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
        let config = haproxy_config(3);
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
        assert!(config.contains(&format!("bind {VIP}:{HTTP_PORT}")));
    }
}
