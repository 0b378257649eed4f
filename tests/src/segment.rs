//! One L2 segment holding slb and the backends, with the client behind a router: the shape
//! direct server return needs (the backends answer the client through the router, past slb).
//! Every name carries a per-process unique prefix, and everything is deleted on drop.
//!
//! ```text
//!  client ns                router ns                       slb ns
//!  c0 10.202.1.2    ─── r0 10.202.1.1
//!     fd00:202:1::2         fd00:202:1::1
//!                           br0 10.202.0.1, fd00:202::1
//!                             ├─ p0 ──────────────────────── l0 10.202.0.2, fd00:202::2
//!                             └─ p<i> ─── backend ns i: b0 10.202.0.(10+i), fd00:202::(10+i)
//! ```
//!
//! Each backend also has a remote address on `lo` (10.203.0.(10+i), fd00:203::(10+i)) that
//! only the router knows a route to: as slb sees it, a backend in another subnet.
//!
//! The router sends the VIPs ([`crate::VIP`], [`crate::VIP6`]) to slb; each backend has them on
//! `lo` (`arp_ignore=1`, `arp_announce=2`: it does not answer ARP for the VIP, nor use it as the
//! source of its own ARP requests) and its default routes via the router. Each backend's test
//! server listens on TCP port [`crate::VIP_TCP_PORT`] (any address) and UDP port
//! [`crate::VIP_UDP_PORT`] on the VIPs, so its UDP answers leave from the VIP.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context as _};

use crate::exec::{self, ChildGuard};
use crate::topology::{add_addr6, add_namespace, attach_xdp_pass, endpoint_offloads, ip};
use crate::{Family, VIP, VIP6, VIP_TCP_PORT, VIP_UDP_PORT};

static NEXT_SEGMENT: AtomicU32 = AtomicU32::new(0);

pub const SEGMENT_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 202, 1, 2);
pub const SEGMENT_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 1, 0, 0, 0, 0, 2);
const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const ROUTER_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 1);
const SLB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const SLB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 2);
/// slb's interface on the segment.
pub const SLB_INTERFACE: &str = "l0";

/// Client, router, slb and backends on one segment; torn down on drop.
#[derive(Debug)]
pub struct Segment {
    client: String,
    router: String,
    slb: String,
    /// slb nodes besides the first ([`Segment::add_node`]).
    more_nodes: Vec<String>,
    backends: Vec<String>,
    created: Vec<String>,
    /// Backend `i`'s test server: its command line and, while it runs, the process.
    servers: Vec<(Vec<OsString>, Option<ChildGuard>)>,
    /// Pass-everything XDP programs on the router's port towards slb (slb sends back out of
    /// `l0` with XDP_TX, which a veth delivers only to a peer with an XDP program) and on the
    /// client's `c0`.
    xdp_links: Vec<OwnedFd>,
    /// The slb binary that attached decapsulators to the backends, which detaches them.
    decapsulators: Option<std::path::PathBuf>,
}

impl Segment {
    /// The segment with `backends` backends, each running `server_bin` (slb-test-server).
    /// `tag`: 1-8 characters of [A-Za-z0-9-].
    pub fn build(tag: &str, backends: usize, server_bin: &Path) -> anyhow::Result<Segment> {
        ensure!(
            (1..=8).contains(&tag.len())
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "segment tag {tag:?} must be 1-8 characters of [A-Za-z0-9-]"
        );
        ensure!((1..=100).contains(&backends), "1 to 100 backends");
        let n = NEXT_SEGMENT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{tag}-{}-{n}", std::process::id());
        let mut segment = Segment {
            client: format!("{prefix}-cli"),
            router: format!("{prefix}-rt"),
            slb: format!("{prefix}-lb"),
            more_nodes: Vec::new(),
            backends: Vec::new(),
            created: Vec::new(),
            servers: Vec::new(),
            xdp_links: Vec::new(),
            decapsulators: None,
        };
        // From here on, a failure drops `segment`, which deletes whatever was created.
        segment
            .create_core()
            .with_context(|| format!("creating segment {prefix}"))?;
        for i in 1..=backends {
            segment
                .add_backend(i, server_bin)
                .with_context(|| format!("creating backend {i} of segment {prefix}"))?;
        }
        Ok(segment)
    }

    pub fn client_ns(&self) -> &str {
        &self.client
    }

    pub fn router_ns(&self) -> &str {
        &self.router
    }

    pub fn slb_ns(&self) -> &str {
        &self.slb
    }

    pub fn backend_ns(&self, i: usize) -> &str {
        &self.backends[i - 1]
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Backend `i`'s own address in `family`.
    pub fn backend_addr(family: Family, i: usize) -> IpAddr {
        let host = 10 + i as u8;
        match family {
            Family::V4 => Ipv4Addr::new(10, 202, 0, host).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, u16::from(host)).into(),
        }
    }

    /// Backend `i`'s remote address in `family`: reachable from slb only through the router.
    pub fn remote_backend_addr(family: Family, i: usize) -> IpAddr {
        let host = 10 + i as u8;
        match family {
            Family::V4 => Ipv4Addr::new(10, 203, 0, host).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, u16::from(host)).into(),
        }
    }

    /// slb's address on the segment in `family`.
    pub fn slb_addr(family: Family) -> IpAddr {
        Self::node_addr(family, 1)
    }

    /// slb node `k`'s address on the segment: 10.202.0.(1+k), fd00:202::(1+k) (node 1 is
    /// [`Segment::slb_ns`], the others come from [`Segment::add_node`]).
    pub fn node_addr(family: Family, k: usize) -> IpAddr {
        let host = 1 + k as u8;
        match family {
            Family::V4 => Ipv4Addr::new(10, 202, 0, host).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, u16::from(host)).into(),
        }
    }

    /// The router's address on the segment.
    pub fn router_addr(family: Family) -> IpAddr {
        match family {
            Family::V4 => ROUTER_ADDR.into(),
            Family::V6 => ROUTER_ADDR6.into(),
        }
    }

    /// slb node `k`'s namespace (1-based; 1 is [`Segment::slb_ns`]).
    pub fn node_ns(&self, k: usize) -> &str {
        if k == 1 {
            &self.slb
        } else {
            &self.more_nodes[k - 2]
        }
    }

    /// The router's bridge port towards slb node `k`.
    pub fn node_port(k: usize) -> String {
        if k == 1 {
            "p0".into()
        } else {
            format!("n{k}")
        }
    }

    /// Another slb node on the segment, set up as the first ([`Segment::slb_ns`]): interface
    /// [`SLB_INTERFACE`] at [`Segment::node_addr`], neighbours of the backends resolved.
    /// Returns its number. At most 8 nodes (the backends' addresses begin at .11).
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let k = self.more_nodes.len() + 2;
        ensure!(k <= 8, "at most 8 slb nodes on a segment");
        let ns = format!("{}{k}", self.slb);
        self.add_namespace(&ns)?;
        self.more_nodes.push(ns.clone());
        self.setup_node(k)?;
        for i in 1..=self.backends.len() {
            for family in [Family::V4, Family::V6] {
                let target = Self::backend_addr(family, i).to_string();
                exec::exec_in(&ns, ["ping", "-q", "-c", "1", "-w", "3", &target])?;
            }
        }
        Ok(k)
    }

    /// Deletes the router's static routes of the VIPs (to slb node 1): with several nodes, a
    /// routing daemon installs them.
    pub fn remove_static_vip_routes(&self) -> anyhow::Result<()> {
        ip(["-n", &self.router, "route", "del", &format!("{VIP}/32")])?;
        ip([
            "-n",
            &self.router,
            "-6",
            "route",
            "del",
            &format!("{VIP6}/128"),
        ])?;
        Ok(())
    }

    /// Attaches slb's decapsulator (`slb decap attach`, run from `slb_bin`) to every backend's
    /// interface, accepting tunnels from slb's segment addresses to the VIPs; they are
    /// detached when the segment is dropped.
    pub fn attach_decapsulators(&mut self, slb_bin: &Path) -> anyhow::Result<()> {
        self.decapsulators = Some(slb_bin.to_owned());
        for ns in &self.backends {
            // `slb --netns`, not `ip netns exec`, whose private mount of /sys hides bpffs (the
            // pins would vanish with the command, and the program with them).
            let mut args: Vec<String> = vec![
                "--netns".into(),
                ns.clone(),
                "decap".into(),
                "attach".into(),
                "--iface".into(),
                "b0".into(),
            ];
            for source in [SLB_ADDR.to_string(), SLB_ADDR6.to_string()] {
                args.extend(["--source".into(), source]);
            }
            for vip in [VIP.to_string(), VIP6.to_string()] {
                args.extend(["--vip".into(), vip]);
            }
            exec::run(std::process::Command::new(slb_bin).args(&args))
                .with_context(|| format!("slb decap attach in {ns}"))?;
        }
        Ok(())
    }

    pub fn client_addr(family: Family) -> IpAddr {
        match family {
            Family::V4 => SEGMENT_CLIENT_ADDR.into(),
            Family::V6 => SEGMENT_CLIENT_ADDR6.into(),
        }
    }

    /// Packets received and sent by `iface` in `ns` so far.
    pub fn interface_packets(ns: &str, iface: &str) -> anyhow::Result<(u64, u64)> {
        let read = |what: &str| -> anyhow::Result<u64> {
            let text = exec::exec_in(
                ns,
                [
                    "cat",
                    &format!("/sys/class/net/{iface}/statistics/{what}_packets"),
                ],
            )?;
            text.trim()
                .parse()
                .with_context(|| format!("{what}_packets of {iface} in {ns}: {text:?}"))
        };
        Ok((read("rx")?, read("tx")?))
    }

    fn add_namespace(&mut self, ns: &str) -> anyhow::Result<()> {
        add_namespace(ns, &mut self.created)
    }

    fn create_core(&mut self) -> anyhow::Result<()> {
        let (client, router, slb) = (self.client.clone(), self.router.clone(), self.slb.clone());
        for ns in [&client, &router, &slb] {
            self.add_namespace(ns)?;
        }
        ip([
            "link", "add", "c0", "netns", &client, "type", "veth", "peer", "name", "r0", "netns",
            &router,
        ])?;
        ip(["-n", &client, "addr", "add", "10.202.1.2/24", "dev", "c0"])?;
        add_addr6(&client, "c0", SEGMENT_CLIENT_ADDR6)?;
        ip(["-n", &client, "link", "set", "c0", "up"])?;
        ip([
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            "10.202.1.1",
        ])?;
        ip([
            "-n",
            &client,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:202:1::1",
        ])?;
        endpoint_offloads(&client, "c0")?;
        self.xdp_links.push(attach_xdp_pass(&client, "c0")?);

        ip(["-n", &router, "addr", "add", "10.202.1.1/24", "dev", "r0"])?;
        add_addr6(&router, "r0", "fd00:202:1::1".parse()?)?;
        ip(["-n", &router, "link", "set", "r0", "up"])?;
        ip(["-n", &router, "link", "add", "br0", "type", "bridge"])?;
        ip([
            "-n",
            &router,
            "addr",
            "add",
            &format!("{ROUTER_ADDR}/24"),
            "dev",
            "br0",
        ])?;
        add_addr6(&router, "br0", ROUTER_ADDR6)?;
        ip(["-n", &router, "link", "set", "br0", "up"])?;
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            exec::exec_in(&router, ["sysctl", "-q", "-w", key])?;
        }

        self.setup_node(1)?;
        // The VIPs are slb's to balance.
        ip([
            "-n",
            &router,
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &SLB_ADDR.to_string(),
        ])?;
        ip([
            "-n",
            &router,
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &SLB_ADDR6.to_string(),
        ])?;
        Ok(())
    }

    /// slb node `k`'s interface, addresses, routes and forwarding.
    fn setup_node(&mut self, k: usize) -> anyhow::Result<()> {
        let (router, node, port) = (
            self.router.clone(),
            self.node_ns(k).to_owned(),
            Self::node_port(k),
        );
        self.add_port(&port, &node, SLB_INTERFACE)?;
        let addr = Self::node_addr(Family::V4, k);
        ip([
            "-n",
            &node,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            SLB_INTERFACE,
        ])?;
        let IpAddr::V6(addr6) = Self::node_addr(Family::V6, k) else {
            unreachable!("an IPv6 node address")
        };
        add_addr6(&node, SLB_INTERFACE, addr6)?;
        ip(["-n", &node, "link", "set", SLB_INTERFACE, "up"])?;
        default_routes_via_router(&node)?;
        exec::exec_in(&node, ["ethtool", "-K", SLB_INTERFACE, "gro", "on"])?;
        // The FIB answers the data plane's lookups only for an interface that forwards.
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            exec::exec_in(&node, ["sysctl", "-q", "-w", key])?;
        }
        // slb's XDP_TX back out of l0 reaches the bridge only through an XDP program on the
        // router's port.
        self.xdp_links.push(attach_xdp_pass(&router, &port)?);
        Ok(())
    }

    /// A veth from the router's bridge (port `port`) to `peer_if` in `ns`.
    fn add_port(&mut self, port: &str, ns: &str, peer_if: &str) -> anyhow::Result<()> {
        let router = self.router.clone();
        ip([
            "link", "add", port, "netns", &router, "type", "veth", "peer", "name", peer_if,
            "netns", ns,
        ])?;
        ip(["-n", &router, "link", "set", port, "master", "br0"])?;
        ip(["-n", &router, "link", "set", port, "up"])?;
        Ok(())
    }

    fn add_backend(&mut self, i: usize, server_bin: &Path) -> anyhow::Result<()> {
        let ns = format!("{}-b{i}", self.slb.trim_end_matches("-lb"));
        self.add_namespace(&ns)?;
        self.backends.push(ns.clone());
        for key in [
            "net.ipv6.bindv6only=1",
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
            "net.ipv4.conf.default.arp_ignore=1",
            "net.ipv4.conf.default.arp_announce=2",
        ] {
            exec::exec_in(&ns, ["sysctl", "-q", "-w", key])?;
        }
        self.add_port(&format!("p{i}"), &ns, "b0")?;
        let addr = Self::backend_addr(Family::V4, i);
        let addr6 = Self::backend_addr(Family::V6, i);
        ip(["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "b0"])?;
        let IpAddr::V6(addr6) = addr6 else {
            unreachable!("an IPv6 backend address")
        };
        add_addr6(&ns, "b0", addr6)?;
        ip(["-n", &ns, "link", "set", "b0", "up"])?;
        ip(["-n", &ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        ip([
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        default_routes_via_router(&ns)?;
        for family in [Family::V4, Family::V6] {
            let (remote, own) = (
                Self::remote_backend_addr(family, i),
                Self::backend_addr(family, i),
            );
            let (flag, prefix) = match family {
                Family::V4 => ("-4", 32),
                Family::V6 => ("-6", 128),
            };
            let address = format!("{remote}/{prefix}");
            match family {
                Family::V4 => ip(["-n", &ns, flag, "addr", "add", &address, "dev", "lo"])?,
                Family::V6 => ip([
                    "-n", &ns, flag, "addr", "add", &address, "dev", "lo", "nodad",
                ])?,
            };
            ip([
                "-n",
                &self.router,
                flag,
                "route",
                "add",
                &format!("{remote}/{prefix}"),
                "via",
                &own.to_string(),
            ])?;
        }
        endpoint_offloads(&ns, "b0")?;
        let args: Vec<OsString> = vec![
            server_bin.into(),
            "--name".into(),
            crate::Topology::backend_name(i).into(),
            "--tcp".into(),
            format!("0.0.0.0:{VIP_TCP_PORT}").into(),
            "--tcp".into(),
            format!("[::]:{VIP_TCP_PORT}").into(),
            "--udp".into(),
            format!("{VIP}:{VIP_UDP_PORT}").into(),
            "--udp".into(),
            format!("[{VIP6}]:{VIP_UDP_PORT}").into(),
        ];
        self.servers.push((args, None));
        self.start_server(i)?;
        // slb's neighbour entries, as its health checks would make them.
        for target in [addr, IpAddr::V6(addr6)] {
            exec::exec_in(
                &self.slb,
                ["ping", "-q", "-c", "1", "-w", "3", &target.to_string()],
            )?;
        }
        Ok(())
    }
}

impl Segment {
    /// Starts backend `i`'s test server (again).
    pub fn start_server(&mut self, i: usize) -> anyhow::Result<()> {
        let ns = self.backend_ns(i).to_owned();
        let (args, child) = &mut self.servers[i - 1];
        ensure!(child.is_none(), "backend {i}'s server already runs");
        let mut started = exec::spawn_in(&ns, &*args)?;
        started
            .wait_for_line("ready", Duration::from_secs(10))
            .with_context(|| format!("starting the test server of backend {i}"))?;
        *child = Some(started);
        Ok(())
    }

    /// Kills backend `i`'s test server (as a crash would): its host refuses connections from
    /// then on.
    pub fn stop_server(&mut self, i: usize) {
        self.servers[i - 1].1 = None;
    }
}

/// Both families' default routes of `ns` via the router's address on the segment.
fn default_routes_via_router(ns: &str) -> anyhow::Result<()> {
    for (family, router) in [
        ("-4", ROUTER_ADDR.to_string()),
        ("-6", ROUTER_ADDR6.to_string()),
    ] {
        ip(["-n", ns, family, "route", "add", "default", "via", &router])?;
    }
    Ok(())
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.servers.clear();
        if let Some(slb_bin) = self.decapsulators.take() {
            for ns in &self.backends {
                let args = ["--netns", ns, "decap", "detach", "--iface", "b0"];
                if let Err(e) = exec::run(std::process::Command::new(&slb_bin).args(args)) {
                    eprintln!("warning: could not detach the decapsulator in {ns}: {e}");
                }
            }
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(["netns", "del", ns]) {
                eprintln!("warning: could not delete namespace {ns}: {e}");
            }
        }
    }
}
