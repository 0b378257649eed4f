//! `cargo xtask demo`: namespaces (client, slb, backends), slb with a dual-stack listener pair
//! (TCP and UDP on an IPv4 VIP and the same on an IPv6 VIP, each over the same backends and
//! weights), traffic of both families, and the distributions over the backends.
//!
//! The test topology (`slb_tests::Topology`) is IPv4-only, so the demo adds the IPv6 half itself
//! ([`Ipv6Plan`]): addresses, routes, forwarding, and a second test server per backend bound to
//! the backend's IPv6 address (the topology's servers listen on 0.0.0.0 only). Once the test
//! crate's topology and traffic generators speak IPv6, this half should go (one owner).

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use slb_tests::config::{Listener, POOL_GROUP, TCP_LISTENER, UDP_LISTENER};
use slb_tests::exec::{exec_in, in_netns, spawn_in, ChildGuard};
use slb_tests::slb::unique_instance;
use slb_tests::traffic::{parse_reply, tcp_connections, udp_flows};
use slb_tests::{
    vip_tcp, vip_udp, Distribution, SlbConfig, SlbDaemon, Topology, TrafficOptions, TrafficReport,
    BACKEND_PORT, VIP_TCP_PORT, VIP_UDP_PORT,
};

/// The IPv6 VIP (on no interface: the client's default route brings it to `s0`, like the IPv4
/// VIP).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0x100, 0, 0, 0, 0, 0x10);
/// The group of the IPv6 listeners: the `pool` backends at their IPv6 addresses.
const POOL6_GROUP: &str = "pool6";
/// UDP source ports of the flows: IPv4 from this one up, IPv6 likewise (a socket per flow).
const UDP_BASE_PORT: u16 = 20000;

pub fn demo(bin_dir: &Path, connections: usize, weights: &[u32]) -> anyhow::Result<()> {
    let slb = bin_dir.join("slb");
    let server = bin_dir.join("slb-test-server");
    let steps = Steps::stopped_by_ctrl_c()?;

    // Declared before the daemon, so it is dropped (namespaces deleted) after the daemon stops.
    steps.next(&format!(
        "creating namespaces (client, slb, {} backends, IPv4 and IPv6) and starting the backend \
         servers",
        weights.len()
    ))?;
    let topo = Topology::builder()
        .tag("demo")
        .backends(weights.len())
        .test_servers(&server)
        .build()?;
    let ipv6 = Ipv6Plan::add_to(&topo)?;
    // Dropped before the topology: they run in its backend namespaces.
    let _servers6 = ipv6.start_servers(&topo, &server)?;
    let config = dual_stack_config(&unique_instance("demo"), weights);
    steps.next(&format!(
        "starting slb in namespace {} with this config:\n{}",
        topo.slb_ns(),
        config.to_toml()
    ))?;
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config)?;
    let pool = config.pool_weights();
    let mut reports = Vec::new();
    for family in [Family::V4, Family::V6] {
        reports.extend(family_traffic(&steps, &topo, family, connections, &pool)?);
    }
    print_status(&steps, &daemon)?;

    steps.next("stopping slb and deleting the namespaces")?;
    let exit = daemon.stop()?;
    println!("slb exited: {exit}");
    let failed: Vec<String> = reports
        .iter()
        .filter(|(_, r)| !r.failures.is_empty())
        .map(|(what, r)| format!("{} {what}", r.failures.len()))
        .collect();
    ensure!(failed.is_empty(), "requests failed: {}", failed.join(", "));
    Ok(())
}

/// The tests' standard config (TCP VIP:80 and UDP VIP:53 over group `pool`) and its IPv6 twins:
/// the same listeners on [`VIP6`] over group `pool6`, the same backends (at their IPv6 addresses)
/// with the same weights.
fn dual_stack_config(instance: &str, weights: &[u32]) -> SlbConfig {
    let mut config = SlbConfig::standard(instance, weights);
    let mut pool6 = config.group_mut(POOL_GROUP).clone();
    pool6.name = POOL6_GROUP.to_owned();
    for (i, backend) in pool6.backends.iter_mut().enumerate() {
        backend.address = Ipv6Plan::backend_addr(i + 1).into();
    }
    config.groups.push(pool6);
    for name in [TCP_LISTENER, UDP_LISTENER] {
        let twin = Listener {
            name: format!("{name}6"),
            vip: VIP6.into(),
            group: Some(POOL6_GROUP.to_owned()),
            ..config.listener_mut(name).clone()
        };
        config.listener(twin);
    }
    config
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn vip_tcp(self) -> SocketAddr {
        match self {
            Family::V4 => vip_tcp(),
            Family::V6 => (VIP6, VIP_TCP_PORT).into(),
        }
    }

    fn vip_udp(self) -> SocketAddr {
        match self {
            Family::V4 => vip_udp(),
            Family::V6 => (VIP6, VIP_UDP_PORT).into(),
        }
    }
}

/// `connections` TCP connections, then as many UDP flows, to the `family` VIP from the client
/// namespace, each printed as a summary and the distribution over the backends of `pool`.
fn family_traffic(
    steps: &Steps,
    topo: &Topology,
    family: Family,
    connections: usize,
    pool: &[(String, u32)],
) -> anyhow::Result<[(String, TrafficReport); 2]> {
    let name = family.name();
    let opts = TrafficOptions::new(connections);
    steps.next(&format!(
        "{connections} {name} TCP connections to {}",
        family.vip_tcp()
    ))?;
    let tcp = tcp_connections(topo.client_ns(), family.vip_tcp(), &opts)?;
    let tcp_what = format!("{name} TCP");
    println!("{}", tcp.summary(&tcp_what));
    println!(
        "{}",
        Distribution::new(
            &format!("{name} TCP connections per backend"),
            pool,
            &tcp.counts
        )
    );

    steps.next(&format!(
        "{connections} {name} UDP flows to {}",
        family.vip_udp()
    ))?;
    let udp = match family {
        Family::V4 => udp_flows(topo.client_ns(), family.vip_udp(), UDP_BASE_PORT, &opts)?,
        Family::V6 => udp6_flows(topo.client_ns(), family.vip_udp(), UDP_BASE_PORT, &opts)?,
    };
    let udp_what = format!("{name} UDP");
    println!("{}", udp.summary(&udp_what));
    println!(
        "{}",
        Distribution::new(&format!("{name} UDP flows per backend"), pool, &udp.counts)
    );
    Ok([(tcp_what, tcp), (udp_what, udp)])
}

/// The IPv6 half of the topology, mirroring its IPv4 plan: `fd00:200:<n>::/64` where the IPv4
/// topology has `10.200.<n>.0/24` (client link n = 1, backend i's link n = 10 + i), the slb
/// namespace `::1` on each link, the client and the backends `::2`.
struct Ipv6Plan;

impl Ipv6Plan {
    fn subnet_addr(link: u16, host: u16) -> Ipv6Addr {
        // n's decimal digits as the group's hex digits: backend 1 is fd00:200:11::2 as it is
        // 10.200.11.2, which whoever reads `slb status` can match at a glance.
        let group = u16::from_str_radix(&link.to_string(), 16).expect("n < 10000");
        Ipv6Addr::new(0xfd00, 0x200, group, 0, 0, 0, 0, host)
    }

    fn backend_addr(i: usize) -> Ipv6Addr {
        Self::subnet_addr(Self::backend_link(i), 2)
    }

    fn backend_link(i: usize) -> u16 {
        10 + u16::try_from(i).expect("backend index fits the topology")
    }

    /// Addresses, routes and forwarding for IPv6 in every namespace of `topo`, and neighbours
    /// primed, so the first packets of the demo are not spent on neighbour discovery.
    fn add_to(topo: &Topology) -> anyhow::Result<Ipv6Plan> {
        let slb = topo.slb_ns();
        // (namespace, its interface, slb's interface on that link, link number)
        let mut links = vec![(
            topo.client_ns().to_owned(),
            "c0".to_owned(),
            "s0".to_owned(),
            1,
        )];
        for i in 1..=topo.backend_count() {
            links.push((
                topo.backend_ns(i).to_owned(),
                "b0".to_owned(),
                format!("s{i}"),
                Self::backend_link(i),
            ));
        }
        let namespaces: Vec<&str> = std::iter::once(slb)
            .chain(links.iter().map(|(ns, ..)| ns.as_str()))
            .collect();
        for ns in &namespaces {
            // Without this an address stays tentative (unusable) for about 2 s of duplicate
            // address detection. The topology created the links already, so their own setting
            // (copied from `default` at creation) is turned off as well.
            let mut keys = vec!["all".to_owned(), "default".to_owned()];
            keys.extend(interfaces_in(ns)?);
            for key in keys {
                sysctl(ns, &format!("net.ipv6.conf.{key}.accept_dad=0"))?;
            }
        }
        sysctl(slb, "net.ipv6.conf.all.forwarding=1")?;
        for (ns, iface, slb_iface, link) in &links {
            let slb_addr = Self::subnet_addr(*link, 1);
            let addr = Self::subnet_addr(*link, 2);
            add_addr(slb, slb_iface, slb_addr)?;
            add_addr(ns, iface, addr)?;
            exec_in(
                ns,
                [
                    "ip",
                    "-6",
                    "route",
                    "replace",
                    "default",
                    "via",
                    &slb_addr.to_string(),
                ],
            )?;
        }
        for (ns, _, _, link) in &links {
            // Both ends learn each other's MAC (the slb side's FIB lookups need the neighbour).
            ping6(ns, Self::subnet_addr(*link, 1))?;
            ping6(slb, Self::subnet_addr(*link, 2))?;
        }
        Ok(Ipv6Plan)
    }

    /// A test server in every backend whose own does not answer on its IPv6 address yet,
    /// answering TCP and UDP there (port 8080) as that backend. Bound to the address, not
    /// `[::]`, which would collide with the IPv4 server's 0.0.0.0 on the same port.
    fn start_servers(&self, topo: &Topology, server: &Path) -> anyhow::Result<Vec<ChildGuard>> {
        let mut started = Vec::new();
        for i in 1..=topo.backend_count() {
            let addr = SocketAddr::from((Self::backend_addr(i), BACKEND_PORT));
            let answers = in_netns(topo.backend_ns(i), || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            })?;
            if answers {
                continue;
            }
            started.push({
                let listen = addr.to_string();
                let mut child = spawn_in(
                    topo.backend_ns(i),
                    [
                        server.as_os_str(),
                        "--name".as_ref(),
                        Topology::backend_name(i).as_ref(),
                        "--tcp".as_ref(),
                        listen.as_ref(),
                        "--udp".as_ref(),
                        listen.as_ref(),
                    ],
                )?;
                child
                    .wait_for_line("ready", Duration::from_secs(10))
                    .with_context(|| format!("starting the IPv6 test server of backend {i}"))?;
                child
            });
        }
        Ok(started)
    }
}

fn interfaces_in(ns: &str) -> anyhow::Result<Vec<String>> {
    let out = exec_in(ns, ["ip", "-o", "link", "show"])?;
    // "2: c0@if3: <...>": the name, without the peer suffix.
    Ok(out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or("").to_owned())
        .filter(|name| !name.is_empty())
        .collect())
}

fn sysctl(ns: &str, setting: &str) -> anyhow::Result<()> {
    exec_in(ns, ["sysctl", "-qw", setting])?;
    Ok(())
}

fn add_addr(ns: &str, iface: &str, addr: Ipv6Addr) -> anyhow::Result<()> {
    // `replace`, so a topology that already carries the address is fine; `nodad`: usable now.
    exec_in(
        ns,
        [
            "ip",
            "-6",
            "addr",
            "replace",
            &format!("{addr}/64"),
            "dev",
            iface,
            "nodad",
        ],
    )?;
    Ok(())
}

fn ping6(ns: &str, addr: Ipv6Addr) -> anyhow::Result<()> {
    exec_in(ns, ["ping", "-6", "-c", "1", "-W", "2", &addr.to_string()])
        .with_context(|| format!("ping -6 {addr} from {ns}"))?;
    Ok(())
}

/// [`udp_flows`] for an IPv6 target (that one binds its sockets to 0.0.0.0): flow `i` is a socket
/// bound to `[::]:base_port + i`, sends one datagram and waits for the answer, resending up to
/// 3 times; a reply from another address than `target` is a failure. One flow at a time: the
/// demo's few thousand flows take a second or two.
fn udp6_flows(
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
        let started = Instant::now();
        let mut report = TrafficReport::default();
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..opts.count {
            if report.failures.len() >= opts.max_failures {
                report.aborted = true;
                break;
            }
            report.attempted += 1;
            let port = base_port + i as u16;
            let payload = format!("udp flow {i}");
            match udp6_exchange(target, port, &payload, opts.timeout) {
                Ok((backend, peer)) => {
                    *report.counts.entry(backend.clone()).or_default() += 1;
                    report.peers.entry(backend).or_default().insert(peer.ip());
                    ports.insert(port);
                }
                Err(e) => report.failures.push(format!("flow {i}: {e:#}")),
            }
        }
        report.distinct_source_ports = ports.len();
        report.elapsed = started.elapsed();
        report
    })
}

fn udp6_exchange(
    target: SocketAddr,
    port: u16,
    payload: &str,
    timeout: Duration,
) -> anyhow::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind((IpAddr::from(Ipv6Addr::UNSPECIFIED), port))
        .with_context(|| format!("bind UDP source port {port}"))?;
    socket.set_read_timeout(Some(timeout))?;
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
                return parse_reply(&String::from_utf8_lossy(&buf[..n]), payload);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e).with_context(|| format!("receive on port {port}")),
        }
    }
    anyhow::bail!("port {port}: no answer after 4 tries")
}

/// The demo's steps, announced one by one; after a Ctrl-C, the next one fails instead, so the
/// demo stops and cleans up.
struct Steps {
    interrupted: Arc<AtomicBool>,
}

impl Steps {
    fn stopped_by_ctrl_c() -> anyhow::Result<Self> {
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        ctrlc::set_handler(move || {
            if !flag.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted: stopping after the current step and cleaning up");
            }
        })
        .context("installing the Ctrl-C handler")?;
        Ok(Self { interrupted })
    }

    fn next(&self, what: &str) -> anyhow::Result<()> {
        ensure!(!self.interrupted.load(Ordering::SeqCst), "interrupted");
        println!("==> {what}");
        Ok(())
    }
}

fn print_status(steps: &Steps, daemon: &SlbDaemon) -> anyhow::Result<()> {
    steps.next("slb status")?;
    let instance = daemon.instance().to_owned();
    print!(
        "{}",
        daemon
            .cli(["status", "--instance", &instance])?
            .expect_success()?
    );
    steps.next("slb report distribution")?;
    print!(
        "{}",
        daemon
            .cli(["report", "distribution", "--instance", &instance])?
            .expect_success()?
    );
    Ok(())
}
