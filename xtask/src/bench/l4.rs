//! L4 suite: new TCP connections per second (connect, one-line request and answer, close) and
//! UDP request/response rate, through (a) slb's XDP program, (b) HAProxy in TCP mode, (c)
//! nftables DNAT, one after the other on the same namespace topology, backends, generator and
//! CPU placement. HAProxy has no UDP load balancing, so its UDP row is empty.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use serde_json::json;
use slb_tests::exec;
use slb_tests::slb::unique_instance;
use slb_tests::{vip_tcp, vip_udp, SlbConfig, SlbDaemon, Topology, BACKEND_PORT, VIP};

use super::{
    busy_between, clock_ticks_per_sec, cpu_jiffies, pin_process, pinned_in,
    place_network_processing, process_cpu_ticks, spawn_haproxy, BenchEnv, Section, BALANCER_CPU,
    GENERATOR_CPU,
};

pub(super) const WEIGHTS: [u32; 3] = [1, 2, 3];
const TCP_WORKERS: usize = 16;
const UDP_WORKERS: usize = 16;
const WARM_UP: Duration = Duration::from_secs(1);

/// What `slb-loadgen` prints.
#[derive(Debug, Clone, Deserialize)]
struct LoadResult {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    per_second: f64,
    p50_us: u32,
    p99_us: u32,
}

/// One measured run: the generator's result, and how busy each CPU was meanwhile.
#[derive(Debug, Clone)]
struct Measured {
    load: LoadResult,
    /// Busy fraction of CPUs 0 and 1.
    busy: [f64; 2],
    /// CPU time of the client's and backends' veth processing (their NAPI threads) per
    /// operation, in µs.
    endpoint_napi_us_per_op: f64,
    /// slb's XDP program, from the kernel's own statistics: ns per packet and packets.
    xdp: Option<(f64, u64)>,
}

impl Measured {
    fn balancer_busy(&self) -> f64 {
        self.busy[BALANCER_CPU as usize]
    }

    /// CPU time the balancer's CPU spent per operation, in µs.
    fn balancer_us_per_op(&self) -> f64 {
        if self.load.per_second > 0.0 {
            self.balancer_busy() / self.load.per_second * 1e6
        } else {
            f64::NAN
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "per_second": self.load.per_second,
            "ops": self.load.ops,
            "errors": self.load.errors,
            "first_error": self.load.first_error,
            "p50_us": self.load.p50_us,
            "p99_us": self.load.p99_us,
            "busy_per_cpu": self.busy,
            "balancer_cpu_us_per_op": self.balancer_us_per_op(),
            "endpoint_napi_cpu_us_per_op": self.endpoint_napi_us_per_op,
            "xdp_ns_per_packet": self.xdp.map(|x| x.0),
            "xdp_packets": self.xdp.map(|x| x.1),
        })
    }
}

struct Row {
    balancer: &'static str,
    tcp: Measured,
    udp: Option<Measured>,
}

/// Run time and run count summed over every loaded XDP program named `slb_xdp`.
fn xdp_stats() -> Option<(u64, u64)> {
    let out = exec::run(Command::new("bpftool").args(["prog", "show", "--json"])).ok()?;
    let progs: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
    let mut sum = (0, 0);
    for p in progs.iter().filter(|p| p["name"] == "slb_xdp") {
        sum.0 += p["run_time_ns"].as_u64().unwrap_or(0);
        sum.1 += p["run_cnt"].as_u64().unwrap_or(0);
    }
    Some(sum)
}

fn loadgen(
    env: &BenchEnv,
    topo: &Topology,
    mode: &str,
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let loadgen = env.bin("slb-loadgen");
    let out = exec::run(&mut pinned_in(
        topo.client_ns(),
        GENERATOR_CPU,
        &[
            loadgen.as_os_str(),
            mode.as_ref(),
            "--target".as_ref(),
            target.to_string().as_ref(),
            "--workers".as_ref(),
            workers.to_string().as_ref(),
            "--seconds".as_ref(),
            duration.as_secs_f64().to_string().as_ref(),
        ],
    ))?;
    serde_json::from_str(out.trim()).with_context(|| format!("slb-loadgen printed {out:?}"))
}

/// The topology of the suite and the NAPI threads of its client and backend interfaces.
struct Bed {
    topo: Topology,
    endpoint_napi: Vec<u32>,
    ticks_per_sec: f64,
}

impl Bed {
    fn endpoint_napi_ticks(&self) -> anyhow::Result<u64> {
        self.endpoint_napi
            .iter()
            .map(|&pid| process_cpu_ticks(pid))
            .sum()
    }
}

/// A warm-up run, then a measured run of `mode` against `target`.
fn measure(
    env: &BenchEnv,
    bed: &Bed,
    balancer: &str,
    mode: &str,
    target: SocketAddr,
    workers: usize,
) -> anyhow::Result<Measured> {
    let topo = &bed.topo;
    loadgen(env, topo, mode, target, workers, WARM_UP)?;
    let cpu0 = cpu_jiffies()?;
    let napi0 = bed.endpoint_napi_ticks()?;
    let xdp0 = xdp_stats();
    let load = loadgen(env, topo, mode, target, workers, env.duration)?;
    let cpu1 = cpu_jiffies()?;
    let napi1 = bed.endpoint_napi_ticks()?;
    let xdp1 = xdp_stats();
    let busy = busy_between(&cpu0, &cpu1);
    let endpoint_napi_us_per_op = if load.ops > 0 {
        (napi1 - napi0) as f64 / bed.ticks_per_sec / load.ops as f64 * 1e6
    } else {
        f64::NAN
    };
    let xdp = match (xdp0, xdp1) {
        (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
            Some(((t1 - t0) as f64 / (n1 - n0) as f64, n1 - n0))
        }
        _ => None,
    };
    let measured = Measured {
        load,
        busy,
        endpoint_napi_us_per_op,
        xdp,
    };
    println!(
        "    {balancer:10} {mode:8} {:>9.0}/s  p50 {:>5} us  p99 {:>6} us  errors {}  CPU busy {:?}  balancer CPU {:.1} us/op  endpoint NAPI {:.1} us/op{}",
        measured.load.per_second,
        measured.load.p50_us,
        measured.load.p99_us,
        measured.load.errors,
        measured.busy.iter().map(|b| format!("{:.0}%", b * 100.0)).collect::<Vec<_>>(),
        measured.balancer_us_per_op(),
        measured.endpoint_napi_us_per_op,
        xdp.map(|(ns, _)| format!("  XDP {ns:.0} ns/packet"))
            .unwrap_or_default()
    );
    Ok(measured)
}

fn sysctl(ns: &str, setting: &str) -> anyhow::Result<()> {
    exec::exec_in(ns, ["sysctl", "-q", "-w", setting])?;
    Ok(())
}

fn haproxy_config() -> String {
    let mut c = String::from(
        "global\n    nbthread 1\n    maxconn 5000\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
         frontend bench\n",
    );
    let _ = writeln!(c, "    bind {}", vip_tcp());
    c.push_str("    default_backend pool\nbackend pool\n    balance roundrobin\n");
    for (k, w) in WEIGHTS.iter().enumerate() {
        let i = k + 1;
        let _ = writeln!(
            c,
            "    server {} {}:{BACKEND_PORT} weight {w}",
            Topology::backend_name(i),
            Topology::backend_addr(i)
        );
    }
    c
}

/// nftables DNAT of both listeners to the backends, with the weights as ranges of a random
/// number (1:2:3 → 0, 1-2, 3-5).
pub(super) fn nft_ruleset() -> String {
    let mut map = Vec::new();
    let mut next = 0;
    for (k, &w) in WEIGHTS.iter().enumerate() {
        let range = if w == 1 {
            format!("{next}")
        } else {
            format!("{next}-{}", next + w - 1)
        };
        map.push(format!("{range} : {}", Topology::backend_addr(k + 1)));
        next += w;
    }
    let map = map.join(", ");
    let rule = |proto: &str, port: u16| {
        format!(
            "    ip daddr {VIP} {proto} dport {port} dnat to numgen random mod {next} map {{ {map} }} : {BACKEND_PORT}\n"
        )
    };
    format!(
        "table ip slbbench {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{}{}  }}\n}}\n",
        rule("tcp", vip_tcp().port()),
        rule("udp", vip_udp().port()),
    )
}

/// Waits until `target` accepts a TCP connection from the client namespace.
fn wait_listening(topo: &Topology, target: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..100 {
        let connected = topo.in_netns(topo.client_ns(), || {
            std::net::TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok()
        })?;
        if connected {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{target} does not accept connections")
}

fn bench_slb(env: &BenchEnv, bed: &Bed) -> anyhow::Result<Row> {
    let topo = &bed.topo;
    let config = SlbConfig::standard(&unique_instance("bl4"), &WEIGHTS);
    let daemon = SlbDaemon::start(&env.slb(), topo.slb_ns(), &config)?;
    if let Some(pid) = daemon.pid() {
        pin_process(pid, BALANCER_CPU)?;
    }
    let tcp = measure(env, bed, "slb", "tcp-crr", vip_tcp(), TCP_WORKERS)?;
    let udp = measure(env, bed, "slb", "udp-rr", vip_udp(), UDP_WORKERS)?;
    daemon.stop()?;
    Ok(Row {
        balancer: "slb (XDP)",
        tcp,
        udp: Some(udp),
    })
}

fn bench_haproxy(env: &BenchEnv, bed: &Bed) -> anyhow::Result<Row> {
    let topo = &bed.topo;
    let dir = tempfile::Builder::new().prefix("slb-bench-l4-").tempdir()?;
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, haproxy_config())?;
    let vip = format!("{VIP}/32");
    exec::exec_in(topo.slb_ns(), ["ip", "addr", "add", &vip, "dev", "lo"])?;
    let result = (|| -> anyhow::Result<Row> {
        let _haproxy = spawn_haproxy(topo.slb_ns(), &config)?;
        wait_listening(topo, vip_tcp())?;
        let tcp = measure(env, bed, "HAProxy", "tcp-crr", vip_tcp(), TCP_WORKERS)?;
        Ok(Row {
            balancer: "HAProxy 2.6 (TCP mode, 1 thread)",
            tcp,
            udp: None,
        })
    })();
    exec::exec_in(topo.slb_ns(), ["ip", "addr", "del", &vip, "dev", "lo"])?;
    result
}

/// Runs `f` with the DNAT rules of [`nft_ruleset`] loaded in the balancer namespace, and
/// removes them afterwards, whatever `f` returned.
pub(super) fn with_nft_dnat<T>(
    topo: &Topology,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let dir = tempfile::Builder::new()
        .prefix("slb-bench-nft-")
        .tempdir()?;
    let rules = dir.path().join("dnat.nft");
    std::fs::write(&rules, nft_ruleset())?;
    exec::exec_in(
        topo.slb_ns(),
        ["nft".as_ref(), "-f".as_ref(), rules.as_os_str()],
    )
    .context("loading the DNAT rules")?;
    let result = f();
    exec::exec_in(topo.slb_ns(), ["nft", "delete", "table", "ip", "slbbench"])?;
    result
}

fn bench_nftables(env: &BenchEnv, bed: &Bed) -> anyhow::Result<Row> {
    with_nft_dnat(&bed.topo, || {
        let tcp = measure(env, bed, "nftables", "tcp-crr", vip_tcp(), TCP_WORKERS)?;
        let udp = measure(env, bed, "nftables", "udp-rr", vip_udp(), UDP_WORKERS)?;
        Ok(Row {
            balancer: "nftables DNAT (conntrack)",
            tcp,
            udp: Some(udp),
        })
    })
}

pub fn run(env: &BenchEnv) -> anyhow::Result<Section> {
    // Kernel-measured run time of the XDP program under real traffic (run_time_ns / run_cnt).
    exec::run(Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=1"]))?;
    let topo = Topology::builder()
        .tag("bl4")
        .backends(WEIGHTS.len())
        .test_servers(&env.bin("slb-test-server"))
        .build()?;
    let endpoint_napi = place_network_processing(&topo)?;
    for i in 1..=WEIGHTS.len() {
        let pid = topo
            .backend_server_pid(i)
            .context("backend server has no pid")?;
        pin_process(pid, GENERATOR_CPU)?;
    }
    // Tens of thousands of short connections a second: ports in TIME_WAIT must be reusable,
    // on the client and on the HAProxy side (it opens its own connections to the backends).
    for ns in [topo.client_ns().to_owned(), topo.slb_ns().to_owned()] {
        sysctl(&ns, "net.ipv4.ip_local_port_range=1024 65535")?;
        sysctl(&ns, "net.ipv4.tcp_tw_reuse=1")?;
    }

    let bed = Bed {
        topo,
        endpoint_napi,
        ticks_per_sec: clock_ticks_per_sec()?,
    };
    let rows = vec![
        bench_slb(env, &bed)?,
        bench_haproxy(env, &bed)?,
        bench_nftables(env, &bed)?,
    ];
    Ok(section(env, &rows))
}

fn section(env: &BenchEnv, rows: &[Row]) -> Section {
    let mut md = String::from("## L4 end to end: slb vs HAProxy vs nftables DNAT\n\n");
    write_setup(&mut md, env);
    write_table(&mut md, rows);
    md.push('\n');
    write_ratios(&mut md, rows);
    write_xdp_cost(&mut md, &rows[0]);
    md.push_str(
        "\nWhere the balancer CPU is not saturated, the rate is bounded by the generator and the \
         backends (user-space sockets sharing one CPU), and the balancer CPU µs per operation \
         is the figure to compare.\n",
    );
    Section {
        markdown: md,
        json: section_json(env, rows),
    }
}

/// `a / b`, NaN when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn write_setup(md: &mut String, env: &BenchEnv) {
    let _ = writeln!(
        md,
        "Namespace topology: client → balancer namespace → 3 backends (`slb-test-server`, weights \
         1:2:3). Generator `slb-loadgen` in the client namespace, {TCP_WORKERS} TCP / \
         {UDP_WORKERS} UDP workers, closed loop, {} s per run after a {} s warm-up, one balancer \
         after the other. CPU {GENERATOR_CPU}: generator, backends and the packet processing of \
         their interfaces; CPU {BALANCER_CPU}: the balancer — the packet processing of the \
         balancer namespace's interfaces (threaded NAPI: slb's XDP program, nftables' forwarding \
         and conntrack, the TCP stack under HAProxy) and the HAProxy process (1 thread). \
         \"Balancer CPU µs/conn\" is CPU {BALANCER_CPU}'s busy time divided by the operations: \
         the cost of balancing one connection or request. \"Endpoint veth CPU\" is the CPU \
         time of the client's and backends' veth receive processing (their NAPI threads, on CPU \
         {GENERATOR_CPU}) per operation. TCP: connect, one-line request and answer, close. UDP: one datagram and \
         its answer per operation, one socket (flow) per worker.\n",
        env.duration.as_secs(),
        WARM_UP.as_secs()
    );
}

fn write_table(md: &mut String, rows: &[Row]) {
    md.push_str(
        "| balancer | TCP conn/s | p50 / p99 (µs) | balancer CPU busy | balancer CPU µs/conn | endpoint veth CPU µs/conn | UDP req/s | p50 / p99 (µs) | balancer CPU busy | balancer CPU µs/req | endpoint veth CPU µs/req | errors TCP/UDP |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let udp = r.udp.as_ref();
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} / {} | {:.0}% | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} / {} |",
            r.balancer,
            r.tcp.load.per_second,
            r.tcp.load.p50_us,
            r.tcp.load.p99_us,
            r.tcp.balancer_busy() * 100.0,
            r.tcp.balancer_us_per_op(),
            r.tcp.endpoint_napi_us_per_op,
            udp.map_or("n/a".to_owned(), |u| format!("{:.0}", u.load.per_second)),
            udp.map_or("n/a".to_owned(), |u| format!(
                "{} / {}",
                u.load.p50_us, u.load.p99_us
            )),
            udp.map_or("n/a".to_owned(), |u| format!(
                "{:.0}%",
                u.balancer_busy() * 100.0
            )),
            udp.map_or("n/a".to_owned(), |u| format!(
                "{:.1}",
                u.balancer_us_per_op()
            )),
            udp.map_or("n/a".to_owned(), |u| format!(
                "{:.1}",
                u.endpoint_napi_us_per_op
            )),
            r.tcp.load.errors,
            udp.map_or("n/a".to_owned(), |u| u.load.errors.to_string()),
        );
    }
}

/// slb (the first row) against each other balancer.
fn write_ratios(md: &mut String, rows: &[Row]) {
    let slb = &rows[0];
    for other in &rows[1..] {
        let _ = write!(
            md,
            "slb / {}: TCP conn/s ×{:.2}",
            other.balancer,
            ratio(slb.tcp.load.per_second, other.tcp.load.per_second)
        );
        if let (Some(a), Some(b)) = (&slb.udp, &other.udp) {
            let _ = write!(
                md,
                ", UDP req/s ×{:.2}",
                ratio(a.load.per_second, b.load.per_second)
            );
        }
        let _ = write!(
            md,
            "; balancer CPU per connection ×{:.2}",
            ratio(slb.tcp.balancer_us_per_op(), other.tcp.balancer_us_per_op())
        );
        if let (Some(a), Some(b)) = (&slb.udp, &other.udp) {
            let _ = write!(
                md,
                ", per UDP request ×{:.2}",
                ratio(a.balancer_us_per_op(), b.balancer_us_per_op())
            );
        }
        md.push_str(".  \n");
    }
}

fn write_xdp_cost(md: &mut String, slb: &Row) {
    let Some((ns, packets)) = slb.tcp.xdp else {
        return;
    };
    let _ = write!(
        md,
        "slb's XDP program under this load (kernel bpf_stats): {ns:.0} ns/packet over {packets} TCP packets",
    );
    if let Some((uns, upackets)) = slb.udp.as_ref().and_then(|u| u.xdp) {
        let _ = write!(md, ", {uns:.0} ns/packet over {upackets} UDP packets");
    }
    md.push_str(".\n");
}

fn section_json(env: &BenchEnv, rows: &[Row]) -> serde_json::Value {
    let slb = &rows[0];
    json!({
        "weights": WEIGHTS,
        "seconds": env.duration.as_secs_f64(),
        "tcp_workers": TCP_WORKERS,
        "udp_workers": UDP_WORKERS,
        "rows": rows.iter().map(|r| json!({
            "balancer": r.balancer,
            "tcp": r.tcp.json(),
            "udp": r.udp.as_ref().map(Measured::json),
        })).collect::<Vec<_>>(),
        "ratios": rows[1..].iter().map(|o| json!({
            "versus": o.balancer,
            "tcp_balancer_cpu_per_op": ratio(slb.tcp.balancer_us_per_op(), o.tcp.balancer_us_per_op()),
            "tcp": ratio(slb.tcp.load.per_second, o.tcp.load.per_second),
            "udp": match (&slb.udp, &o.udp) {
                (Some(a), Some(b)) => Some(ratio(a.load.per_second, b.load.per_second)),
                _ => None,
            },
        })).collect::<Vec<_>>(),
    })
}
