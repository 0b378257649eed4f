//! A SYN flood much larger than the connection table does not break established connections
//! (issue 9, item 1).
//!
//! slb runs with `max_connections = 16384`; 20 idle and 20 active long-lived TCP connections go
//! through the VIP to the echo servers. Then `slb-synflood` sends ~20x the table size in SYNs
//! with spoofed sources (10.251.0.0/16) from the client namespace to the VIP, while the active
//! connections exchange a line every 20 ms (recording the largest gap between answers) and a
//! loop opens new connections through the VIP. Afterwards: every idle connection still
//! answers, no active one broke or stalled long enough to need a retransmission, new
//! connections all succeed, the flood went to the half-open table and not the connection
//! table, and every connection-table entry has a reply-table entry back to its VIP.
//!
//! Timing: the stall bound is loose (1 s, which still catches a lost packet: a TCP
//! retransmission takes at least 200 ms, a broken flow never answers); the measured figures are
//! printed on one `SYN-FLOOD SUMMARY` line.
//!
//! The SYN-ACKs the backends send to the spoofed sources are translated by the data plane and
//! then find no route in the slb namespace (nothing routes 10.251.0.0/16): they are dropped
//! there, as they would be on the internet when the spoofed host does not exist.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slb_tests::exec::{command_in, run};
use slb_tests::slb::{pin_dir, slb_binary, unique_instance, unix_ns_now, Status};
use slb_tests::traffic::{parse_reply, tcp_connections, ConnectionLoop};
use slb_tests::{
    in_netns, require_root, vip_tcp, SlbConfig, SlbDaemon, Topology, TrafficOptions, CLIENT_ADDR,
    VIP, VIP_TCP_PORT,
};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const SYNFLOOD: &str = env!("CARGO_BIN_EXE_slb-synflood");

const IDLE: usize = 20;
const ACTIVE: usize = 20;
/// Connection-table size for this test; the flood is ~20x larger.
const MAX_CONNECTIONS: u32 = 16_384;
const FLOOD_SYNS: u64 = 320_000;
/// Bounds of the flood: at most this long, at most this rate (the two cores of a test machine
/// also run the backends, the pingers and the connection loop).
const FLOOD_MAX_SECONDS: f64 = 15.0;
const FLOOD_RATE: u64 = 100_000;
const FLOOD_CIDR: &str = "10.251.0.0/16";
/// The active connections send a line this often.
const PING_PERIOD: Duration = Duration::from_millis(20);
/// Loose bound on the largest gap between two answers on an active connection (see the module
/// documentation); the measured value is printed.
const STALL_BOUND: Duration = Duration::from_secs(1);
/// Read/connect timeout of the long-lived connections: a flow that stops answering fails.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
const NEW_AFTER: usize = 200;

/// One long-lived connection and what it saw.
struct Conn {
    id: usize,
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    backend: String,
    pings: u64,
}

impl Conn {
    fn open(id: usize) -> anyhow::Result<Self> {
        let stream = TcpStream::connect_timeout(&vip_tcp(), STREAM_TIMEOUT)?;
        stream.set_read_timeout(Some(STREAM_TIMEOUT))?;
        stream.set_write_timeout(Some(STREAM_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let mut conn = Conn {
            id,
            reader: BufReader::new(stream),
            local,
            backend: String::new(),
            pings: 0,
        };
        conn.backend = conn.ping()?;
        Ok(conn)
    }

    /// Sends one line, returns the backend that answered it.
    fn ping(&mut self) -> anyhow::Result<String> {
        self.pings += 1;
        let line = format!("conn {} ping {}", self.id, self.pings);
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply)?;
        anyhow::ensure!(n > 0, "closed by the other side");
        let (backend, _peer) = parse_reply(&reply, &line)?;
        Ok(backend)
    }

    /// Pings and checks the backend did not change.
    fn check(&mut self) -> Result<(), String> {
        match self.ping() {
            Ok(b) if b == self.backend => Ok(()),
            Ok(b) => Err(format!(
                "conn {} from {}: answered by {b}, was {}",
                self.id, self.local, self.backend
            )),
            Err(e) => Err(format!(
                "conn {} from {} (backend {}) after {} pings: {e:#}",
                self.id, self.local, self.backend, self.pings
            )),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct ActiveStats {
    pings: u64,
    /// Largest time between two consecutive answers (includes the ping period).
    max_gap: Duration,
    /// Largest round-trip time of one line.
    max_rtt: Duration,
    failure: Option<String>,
}

/// An active connection pinging on its own thread every [`PING_PERIOD`].
struct Active {
    pings: Arc<AtomicU64>,
    handle: JoinHandle<(Conn, ActiveStats)>,
}

fn start_active(mut conn: Conn, stop: Arc<AtomicBool>) -> Active {
    let pings = Arc::new(AtomicU64::new(0));
    let counter = pings.clone();
    let handle = std::thread::spawn(move || {
        let mut stats = ActiveStats::default();
        let mut last_answer = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            if let Err(e) = conn.check() {
                stats.failure = Some(e);
                break;
            }
            let now = Instant::now();
            stats.max_rtt = stats.max_rtt.max(now - sent);
            stats.max_gap = stats.max_gap.max(now - last_answer);
            last_answer = now;
            stats.pings += 1;
            counter.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(PING_PERIOD);
        }
        (conn, stats)
    });
    Active { pings, handle }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `bpftool -j map dump pinned <path>`: `(key, value)` per entry from the BTF-formatted form.
fn dump_map(path: &Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path))
    .unwrap_or_else(|e| panic!("dumping {}: {e}", path.display()));
    let entries: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bpftool printed no JSON for {} ({e})", path.display()));
    entries
        .as_array()
        .unwrap_or_else(|| panic!("bpftool dump of {} is not an array", path.display()))
        .iter()
        .map(|e| {
            let e = e.get("formatted").unwrap_or(e);
            (e["key"].clone(), e["value"].clone())
        })
        .collect()
}

/// `(rx, tx)` dropped packets of interface `ifname` in namespace `ns`, from `ip -s -j link`.
fn link_drops(ns: &str, ifname: &str) -> (u64, u64) {
    let out = run(&mut command_in(
        ns,
        ["ip", "-s", "-j", "link", "show", ifname],
    ))
    .unwrap_or_else(|e| panic!("ip -s link show {ifname} in {ns}: {e}"));
    let links: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j printed no JSON ({e}): {out}"));
    let stats = &links[0]["stats64"];
    (
        stats["rx"]["dropped"].as_u64().unwrap_or(0),
        stats["tx"]["dropped"].as_u64().unwrap_or(0),
    )
}

/// The IPv4 address in the last four bytes of an `Addr` (16 bytes, IPv4-mapped) in bpftool JSON.
fn ipv4(v: &serde_json::Value) -> Option<Ipv4Addr> {
    let bytes: Vec<u8> = v
        .as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect::<Option<_>>()?;
    let tail: [u8; 4] = bytes.get(bytes.len().checked_sub(4)?..)?.try_into().ok()?;
    Some(Ipv4Addr::from(tail))
}

/// Global counter `name` of `slb status` (0 when absent).
fn counter(status: &Status, name: &str) -> u64 {
    status.counters.get(name).copied().unwrap_or(0)
}

fn u64_of(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned number: {v}"))
}

#[test]
fn syn_flood_keeps_established_connections() {
    require_root("syn_flood_keeps_established_connections");
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("synf")
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let instance = unique_instance("synf");
    let mut config = SlbConfig::standard(&instance, &[1, 1, 1]);
    config.max_connections = MAX_CONNECTIONS;
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let client = topo.client_ns().to_owned();
    // The SYN-ACKs to the spoofed sources go back toward the client side, as they would toward
    // the internet: the data plane translates and forwards them, and the client namespace
    // (no such address, no forwarding) drops them.
    topo.exec_in(
        topo.slb_ns(),
        [
            "ip",
            "route",
            "add",
            FLOOD_CIDR,
            "via",
            &CLIENT_ADDR.to_string(),
            "dev",
            "s0",
        ],
    )
    .expect("route the flood's source range back toward the client");

    // 20 idle and 20 active long-lived connections.
    let conns: Vec<Conn> = in_netns(&client, || {
        (0..IDLE + ACTIVE)
            .map(|id| Conn::open(id).map_err(|e| format!("conn {id}: {e:#}")))
            .collect::<Result<Vec<_>, _>>()
    })
    .expect("enter the client namespace")
    .unwrap_or_else(|e| panic!("opening the long-lived connections: {e}"));
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &conns {
        *per_backend.entry(c.backend.as_str()).or_default() += 1;
    }
    println!("long-lived connections per backend: {per_backend:?}");
    let mut conns = conns.into_iter();
    let mut idle: Vec<Conn> = conns.by_ref().take(IDLE).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let active: Vec<Active> = conns.map(|c| start_active(c, stop.clone())).collect();
    assert_eq!(active.len(), ACTIVE);

    // New connections throughout, from before the flood to its end.
    let new_loop = ConnectionLoop::start(
        &client,
        vip_tcp(),
        4,
        Duration::from_millis(20),
        Duration::from_secs(3),
    );
    wait_until(
        "the pingers and the connection loop to run",
        Duration::from_secs(20),
        || {
            active.iter().all(|a| a.pings.load(Ordering::Relaxed) >= 3)
                && new_loop
                    .snapshot()
                    .iter()
                    .filter(|a| a.backend().is_some())
                    .count()
                    >= 10
        },
    );
    let before_status = daemon.status().expect("slb status before the flood");
    let half_open_before = counter(&before_status, "half_open_tracked");

    let drops_before = (link_drops(&client, "c0"), link_drops(topo.slb_ns(), "s0"));

    // The flood, bounded in count and time.
    let flood_start_ns = unix_ns_now();
    let flood_out = run(&mut command_in(
        &client,
        [
            SYNFLOOD.to_owned(),
            "--interface".to_owned(),
            "c0".to_owned(),
            "--target".to_owned(),
            format!("{VIP}:{VIP_TCP_PORT}"),
            "--source-cidr".to_owned(),
            FLOOD_CIDR.to_owned(),
            "--count".to_owned(),
            FLOOD_SYNS.to_string(),
            "--duration".to_owned(),
            FLOOD_MAX_SECONDS.to_string(),
            "--rate".to_owned(),
            FLOOD_RATE.to_string(),
            "--batch".to_owned(),
            "16".to_owned(),
        ],
    ))
    .expect("run slb-synflood");
    let flood_end_ns = unix_ns_now();
    // Drops on the client link (the flood shares it with the real connections): a lost packet
    // of an active connection shows as a stall of >= 200 ms that slb did not cause.
    let (c0, s0) = (link_drops(&client, "c0"), link_drops(topo.slb_ns(), "s0"));
    let link_dropped = format!(
        "c0 rx/tx {}/{}, s0 rx/tx {}/{}",
        c0.0 - drops_before.0 .0,
        c0.1 - drops_before.0 .1,
        s0.0 - drops_before.1 .0,
        s0.1 - drops_before.1 .1
    );
    let flood: serde_json::Value = serde_json::from_str(flood_out.trim())
        .unwrap_or_else(|e| panic!("slb-synflood printed no JSON ({e}): {flood_out}"));
    println!("slb-synflood: {flood}");
    let sent = u64_of(&flood["sent"]);
    let pps = flood["pps"].as_f64().unwrap_or(0.0);

    let attempts = new_loop.stop().expect("stop the connection loop");
    let during: Vec<_> = attempts
        .iter()
        .filter(|a| a.start_unix_ns >= flood_start_ns && a.start_unix_ns <= flood_end_ns)
        .collect();
    let during_ok = during.iter().filter(|a| a.backend().is_some()).count();
    let during_failures: Vec<String> = during
        .iter()
        .filter_map(|a| a.outcome.as_ref().err().cloned())
        .collect();

    // After the flood: the idle connections answer, the active ones stop and report.
    let idle_failures: Vec<String> = idle.iter_mut().filter_map(|c| c.check().err()).collect();
    stop.store(true, Ordering::Relaxed);
    let (active_conns, active_stats): (Vec<Conn>, Vec<ActiveStats>) = active
        .into_iter()
        .map(|a| match a.handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .unzip();
    let active_failures: Vec<&str> = active_stats
        .iter()
        .filter_map(|s| s.failure.as_deref())
        .collect();
    let max_gap = active_stats
        .iter()
        .map(|s| s.max_gap)
        .max()
        .unwrap_or_default();
    let max_rtt = active_stats
        .iter()
        .map(|s| s.max_rtt)
        .max()
        .unwrap_or_default();
    let active_pings: u64 = active_stats.iter().map(|s| s.pings).sum();

    let after = tcp_connections(
        &client,
        vip_tcp(),
        &TrafficOptions {
            timeout: Duration::from_secs(3),
            ..TrafficOptions::new(NEW_AFTER)
        },
    )
    .expect("new connections after the flood");

    // The data plane's view, once the daemon swept the connection table after all of the
    // above (it sweeps every few seconds; `connection_table` is as of the last sweep).
    let traffic_done_s = (unix_ns_now() / 1_000_000_000) as u64;
    let mut status = None;
    wait_until(
        "a connection-table sweep after the flood",
        Duration::from_secs(30),
        || {
            let now = daemon.status().expect("slb status after the flood");
            let swept = now.connection_table.swept_at_unix_s > traffic_done_s;
            status = Some(now);
            swept
        },
    );
    let status = status.expect("wait_until polled at least once");
    println!("status counters after the flood: {:?}", status.counters);
    let half_open = counter(&status, "half_open_tracked") - half_open_before;
    let malformed = counter(&status, "malformed");
    let table_entries = status.connection_table.entries;
    let table_capacity = u64::from(status.connection_table.capacity);

    let dir = pin_dir(&instance);
    let connections = dump_map(&dir.join("CONNECTIONS"));
    let backends: BTreeMap<u64, (Option<Ipv4Addr>, u64)> = dump_map(&dir.join("BACKENDS"))
        .into_iter()
        .map(|(k, v)| (u64_of(&k), (ipv4(&v["addr"]), u64_of(&v["port"]))))
        .collect();
    let reply_nat: BTreeMap<(Option<Ipv4Addr>, u64, u64), serde_json::Value> =
        dump_map(&dir.join("REPLY_NAT"))
            .into_iter()
            .map(|(k, v)| {
                (
                    (ipv4(&k["addr"]), u64_of(&k["port"]), u64_of(&k["protocol"])),
                    v,
                )
            })
            .collect();
    let flood_net = Ipv4Addr::new(10, 251, 0, 0);
    let mut from_flood = 0usize;
    let mut without_way_back = Vec::new();
    for (key, value) in &connections {
        let src = ipv4(&key["src"]);
        if src.is_some_and(|a| u32::from(a) & 0xffff_0000 == u32::from(flood_net)) {
            from_flood += 1;
        }
        let id = u64_of(&value["backend_id"]);
        let protocol = u64_of(&key["protocol"]);
        let way_back = backends.get(&id).and_then(|(addr, port)| {
            let nat = reply_nat.get(&(*addr, *port, protocol))?;
            (u64_of(&nat["backend_id"]) == id
                && ipv4(&nat["vip"]) == ipv4(&key["dst"])
                && nat["vip_port"] == key["dst_port"])
                .then_some(())
        });
        if way_back.is_none() {
            without_way_back.push(format!("{key} -> {value}"));
        }
    }
    // Every long-lived connection is in the table, on the backend that answers it.
    let mut missing_long_lived = Vec::new();
    for c in idle.iter().chain(&active_conns) {
        let tracked = connections.iter().any(|(k, v)| {
            ipv4(&k["src"]) == Some(CLIENT_ADDR)
                && k["src_port"] == c.local.port()
                && k["dst_port"] == VIP_TCP_PORT
                && backends
                    .get(&u64_of(&v["backend_id"]))
                    .is_some_and(|(addr, _)| {
                        *addr == Some(Topology::backend_addr(backend_index(&c.backend)))
                    })
        });
        if !tracked {
            missing_long_lived.push(format!("conn {} from {} ({})", c.id, c.local, c.backend));
        }
    }

    let during_pct = if during.is_empty() {
        0.0
    } else {
        during_ok as f64 * 100.0 / during.len() as f64
    };
    println!(
        "SYN-FLOOD SUMMARY: flood {sent} SYNs in {:.2} s ({pps:.0} pps), half-open tracked {half_open} \
         ({:.1} % of sent), connection table {} of {} entries ({} in the map dump, {from_flood} from \
         the flood range, {} without a way back); long-lived broken {}/{} (idle {}/{IDLE}, active \
         {}/{ACTIVE}); active max gap between answers {:.0} ms, max RTT {:.1} ms over {active_pings} \
         pings; link drops during the flood ({link_dropped}); new connections during the flood {during_ok}/{} ({during_pct:.2} %), after {}/{NEW_AFTER}; \
         malformed {malformed}",
        flood["seconds"].as_f64().unwrap_or(0.0),
        half_open as f64 * 100.0 / sent.max(1) as f64,
        table_entries,
        table_capacity,
        connections.len(),
        without_way_back.len(),
        idle_failures.len() + active_failures.len(),
        IDLE + ACTIVE,
        idle_failures.len(),
        active_failures.len(),
        max_gap.as_secs_f64() * 1000.0,
        max_rtt.as_secs_f64() * 1000.0,
        during.len(),
        after.answered(),
    );

    assert!(
        idle_failures.is_empty() && active_failures.is_empty(),
        "long-lived connections broke during the flood:\n  {}\n  {}",
        idle_failures.join("\n  "),
        active_failures.join("\n  ")
    );
    assert!(
        max_gap < STALL_BOUND,
        "an active connection stalled for {max_gap:?} (bound {STALL_BOUND:?}): a lost packet"
    );
    assert!(
        sent * 10 >= FLOOD_SYNS * 9,
        "the flood sent only {sent} of {FLOOD_SYNS} SYNs within {FLOOD_MAX_SECONDS} s: {flood}"
    );
    assert!(
        sent >= u64::from(MAX_CONNECTIONS) * 10,
        "the flood ({sent} SYNs) should be >= 10x the connection table ({MAX_CONNECTIONS})"
    );
    assert!(
        half_open * 2 >= sent,
        "only {half_open} of {sent} flood SYNs were tracked as half-open"
    );
    assert!(
        during.len() >= 20,
        "too few new connections during the flood to judge: {}",
        during.len()
    );
    assert!(
        during_ok * 100 >= during.len() * 99,
        "only {during_ok} of {} new connections during the flood succeeded:\n  {}",
        during.len(),
        during_failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(
        after.failures.is_empty() && after.answered() == NEW_AFTER,
        "{}",
        after.summary("new connections after the flood")
    );
    assert_eq!(
        table_capacity,
        u64::from(MAX_CONNECTIONS),
        "connection table capacity should be max_connections"
    );
    // Only real connections may be in the table: the long-lived ones and those the test made.
    let made = IDLE + ACTIVE + attempts.len() + after.attempted;
    assert!(
        table_entries <= table_capacity && table_entries <= made as u64,
        "connection table has {table_entries} entries (capacity {table_capacity}), but the test \
         made only {made} connections"
    );
    assert_eq!(
        from_flood, 0,
        "flood SYNs (sources in {FLOOD_CIDR}) entered the connection table"
    );
    assert!(
        without_way_back.is_empty(),
        "{} of {} connection-table entries have no reply-table entry back to their VIP, e.g.:\n  {}",
        without_way_back.len(),
        connections.len(),
        without_way_back
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(
        missing_long_lived.is_empty(),
        "long-lived connections missing from the connection table: {missing_long_lived:?}"
    );

    drop(idle);
    drop(active_conns);
    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}

/// `b<i>` → `i`.
fn backend_index(name: &str) -> usize {
    name.strip_prefix('b')
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("unexpected backend name {name:?}"))
}
