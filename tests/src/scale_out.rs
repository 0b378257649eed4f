//! Several slb nodes behind an ECMP router: the [`Segment`] with more slb nodes on it, BIRD on
//! the router and on every node, BGP with BFD between them, and the router's kernel spreading
//! flows over the nodes by a hash of the 5-tuple.
//!
//! ```text
//!  client ── router (BIRD: a BGP session per node, kernel protocol merging the paths)
//!              br0 ├─ p0 ── node 1 (slb + BIRD)      ├─ p1 ── backend 1
//!                  ├─ n2 ── node 2 (slb + BIRD)      ├─ p2 ── backend 2
//!                  └─ n3 ── node 3 (slb + BIRD)      └─ p3 ── backend 3
//! ```
//!
//! Each node's BIRD includes the file its slb writes ([`ScaleOut::include_file`]) and exports
//! the routes of slb's protocols ([`PROTOCOL`]) to the router; the router installs one multipath
//! route per VIP. The BIRD configs are the ones the README's "Running several slb nodes" gives,
//! with the test's addresses.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use slb_user::config::Announce;

use crate::bird::Bird;
use crate::config::{
    group, health_check, listener_on, AllUnhealthy, BackendSpec, CheckKind, DsrMode, Forwarding,
    GroupKind, HealthCheck, Protocol,
};
use crate::exec;
use crate::segment::{Segment, SLB_INTERFACE};
use crate::slb::{unique_instance, Instance};
use crate::topology::ip;
use crate::{Family, SlbConfig, VIP_TCP_PORT, VIP_UDP_PORT};

/// The prefix of the BIRD protocols slb writes on every node (`announce.protocol`).
pub const PROTOCOL: &str = "slb_vips";
/// BFD's interval and multiplier: a silent peer is declared down after 300 ms.
pub const BFD_INTERVAL_MS: u64 = 100;
pub const BFD_MULTIPLIER: u64 = 3;
const ROUTER_AS: u32 = 65000;
const NODE_AS: u32 = 65001;

/// The segment with `nodes` slb nodes, BIRD everywhere; slb itself is the test's to start.
#[derive(Debug)]
pub struct ScaleOut {
    // Dropped first: BIRD stops before its namespace goes.
    pub router_bird: Bird,
    node_birds: Vec<Bird>,
    pub segment: Segment,
    dir: tempfile::TempDir,
    /// Nodes whose packets the router drops ([`ScaleOut::hang`]).
    hung: BTreeSet<usize>,
}

impl ScaleOut {
    /// Builds the segment with `nodes` slb nodes and `backends` backends, and starts BIRD on
    /// the router and on every node. No VIP is routed until the nodes' slb announce them.
    pub fn build(
        tag: &str,
        nodes: usize,
        backends: usize,
        server_bin: &Path,
    ) -> anyhow::Result<ScaleOut> {
        ensure!((2..=8).contains(&nodes), "2 to 8 slb nodes");
        let mut segment = Segment::build(tag, backends, server_bin)?;
        for _ in 2..=nodes {
            segment.add_node()?;
        }
        segment.remove_static_vip_routes()?;
        let router = segment.router_ns().to_owned();
        // The 5-tuple, as a router hashes packets off a wire. Policy 1 would do the same there,
        // but a veth hands the router the client socket's own random hash, which TCP changes
        // on every retransmission timeout: flows would hop between nodes as no router makes
        // them.
        for key in [
            "net.ipv4.fib_multipath_hash_policy=3",
            "net.ipv4.fib_multipath_hash_fields=0x37",
            "net.ipv6.fib_multipath_hash_policy=3",
            "net.ipv6.fib_multipath_hash_fields=0x37",
        ] {
            exec::exec_in(&router, ["sysctl", "-q", "-w", key])?;
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("slb-{tag}-bird-"))
            .tempdir()
            .context("creating the BIRD directory")?;
        let mut node_birds = Vec::new();
        for k in 1..=nodes {
            ip([
                "-n",
                segment.node_ns(k),
                "addr",
                "add",
                &format!("{}/32", Self::snat_addr(k)),
                "dev",
                "lo",
            ])?;
            let node_dir = dir.path().join(format!("node{k}"));
            std::fs::create_dir_all(&node_dir)?;
            let config = node_config(k, &node_dir);
            node_birds.push(Bird::start(segment.node_ns(k), &node_dir, "bird", &config)?);
        }
        let router_bird = Bird::start(
            &router,
            dir.path(),
            "router",
            &router_config(nodes, dir.path()),
        )?;
        Ok(ScaleOut {
            router_bird,
            node_birds,
            segment,
            dir,
            hung: BTreeSet::new(),
        })
    }

    pub fn nodes(&self) -> usize {
        self.node_birds.len()
    }

    pub fn node_bird(&mut self, k: usize) -> &mut Bird {
        &mut self.node_birds[k - 1]
    }

    /// Node `k`'s own SNAT address, on its `lo`: 10.200.250.k.
    pub fn snat_addr(k: usize) -> IpAddr {
        std::net::Ipv4Addr::new(10, 200, 250, k as u8).into()
    }

    /// Node `k`'s BIRD control socket (`announce.bird_socket`).
    pub fn bird_socket(&self, k: usize) -> PathBuf {
        self.node_birds[k - 1].socket()
    }

    /// The file node `k`'s slb writes and its BIRD includes (`announce.include_file`).
    pub fn include_file(&self, k: usize) -> PathBuf {
        announce_dir(self.dir.path(), k).join("slb.conf")
    }

    /// The slb nodes the router's kernel route to the VIP of `family` leads to now.
    pub fn routed_nodes(&self, family: Family) -> anyhow::Result<BTreeSet<usize>> {
        self.routed_nodes_of(family.vip())
    }

    /// The slb nodes the router's kernel route to `address` (a host route) leads to now.
    pub fn routed_nodes_of(&self, address: IpAddr) -> anyhow::Result<BTreeSet<usize>> {
        let family = Family::of(address);
        let flag = match family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        let out = exec::exec_in(
            self.segment.router_ns(),
            ["ip", "-j", flag, "route", "show", &address.to_string()],
        )?;
        let routes: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("ip -j route show: {out:?}"))?;
        let mut gateways = BTreeSet::new();
        for route in routes.as_array().into_iter().flatten() {
            if let Some(gateway) = route.get("gateway").and_then(|g| g.as_str()) {
                gateways.insert(gateway.to_owned());
            }
            for hop in route
                .get("nexthops")
                .and_then(|n| n.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(gateway) = hop.get("gateway").and_then(|g| g.as_str()) {
                    gateways.insert(gateway.to_owned());
                }
            }
        }
        gateways
            .iter()
            .map(|g| self.node_of_gateway(family, g))
            .collect()
    }

    fn node_of_gateway(&self, family: Family, gateway: &str) -> anyhow::Result<usize> {
        let gateway: IpAddr = gateway.parse()?;
        (1..=self.nodes())
            .find(|&k| Segment::node_addr(family, k) == gateway)
            .with_context(|| format!("the router routes to {gateway}, not an slb node"))
    }

    /// Waits until the router routes the VIP of `family` to exactly `nodes`; returns how long
    /// that took, measured from `since`, polling every few milliseconds.
    pub fn wait_routed(
        &self,
        family: Family,
        nodes: &BTreeSet<usize>,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        self.wait_routed_of(family.vip(), nodes, since, timeout)
    }

    /// [`ScaleOut::wait_routed`] for the host route to `address`.
    pub fn wait_routed_of(
        &self,
        address: IpAddr,
        nodes: &BTreeSet<usize>,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        loop {
            let now = self.routed_nodes_of(address)?;
            if &now == nodes {
                return Ok(since.elapsed());
            }
            if since.elapsed() > timeout {
                bail!(
                    "the router routes {address} to nodes {now:?}, not {nodes:?}, {:?} after; \
                     router's BIRD:\n{}",
                    since.elapsed(),
                    self.router_bird
                        .birdc("show protocols")
                        .unwrap_or_else(|e| e.to_string())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `slb stop` on `node` (node `k`), which returns only once the node has detached, after
    /// its withdrawal and grace; meanwhile waits until the router routes the VIP of `family`
    /// to every node but `k`. Returns how long that took, and what `slb stop` printed (a
    /// failed stop is an error).
    pub fn stop_slb_watching(
        &self,
        node: &mut Instance,
        k: usize,
        family: Family,
        timeout: Duration,
    ) -> anyhow::Result<(Duration, crate::slb::CliOutput)> {
        let others: BTreeSet<usize> = (1..=self.nodes()).filter(|&n| n != k).collect();
        let t = Instant::now();
        std::thread::scope(|scope| {
            let stop = scope.spawn(|| node.stop());
            let converged = self.wait_routed(family, &others, t, timeout);
            let out = stop.join().expect("the slb stop thread panicked")?;
            ensure!(out.success(), "{out}");
            Ok((converged?, out))
        })
    }

    /// Makes node `k` a hung node: the router's bridge drops every frame from it and to it
    /// (nftables on its port), so BFD finds it silent.
    pub fn hang(&mut self, k: usize) -> anyhow::Result<()> {
        let port = Segment::node_port(k);
        let rules = format!(
            "table netdev slb_test_hang_{k} {{\n\
             \tchain from_node {{ type filter hook ingress device \"{port}\" priority 0; drop; }}\n\
             \tchain to_node {{ type filter hook egress device \"{port}\" priority 0; drop; }}\n\
             }}\n"
        );
        let mut cmd = exec::command_in(self.segment.router_ns(), ["nft", "-f", "-"]);
        exec::run_with_input(&mut cmd, &rules)?;
        self.hung.insert(k);
        Ok(())
    }

    pub fn unhang(&mut self, k: usize) -> anyhow::Result<()> {
        exec::exec_in(
            self.segment.router_ns(),
            [
                "nft",
                "delete",
                "table",
                "netdev",
                &format!("slb_test_hang_{k}"),
            ],
        )?;
        self.hung.remove(&k);
        Ok(())
    }

    /// Routes the client's traffic to the VIPs through node `k` alone (a policy rule on the
    /// router, ahead of the multipath route BIRD installed), or through all again (`None`).
    pub fn steer(&self, k: Option<usize>) -> anyhow::Result<()> {
        let router = self.segment.router_ns();
        for family in [Family::V4, Family::V6] {
            let flag = match family {
                Family::V4 => "-4",
                Family::V6 => "-6",
            };
            let _ = ip(["-n", router, flag, "rule", "del", "pref", "100"]);
            let _ = ip(["-n", router, flag, "route", "flush", "table", "100"]);
            if let Some(k) = k {
                ip([
                    "-n",
                    router,
                    flag,
                    "route",
                    "add",
                    &family.vip().to_string(),
                    "via",
                    &Segment::node_addr(family, k).to_string(),
                    "table",
                    "100",
                ])?;
                ip([
                    "-n", router, flag, "rule", "add", "pref", "100", "iif", "r0", "lookup", "100",
                ])?;
            }
        }
        Ok(())
    }
}

impl ScaleOut {
    /// Node `k`'s slb: the same listeners and backends as every other node (so the same
    /// Maglev rings): per family a TCP and a UDP listener by direct return on the segment over
    /// the backends weighted `weights`, quick TCP checks, no forwarding when every backend is
    /// down (so such a node withdraws), and announcements through the node's BIRD with slb's
    /// default grace and settle time.
    pub fn node_config(
        &self,
        instance: &str,
        k: usize,
        weights: &[u32],
        mode: NodeMode,
    ) -> SlbConfig {
        let mut config = SlbConfig::new(instance, 0);
        config.interfaces[0].name = SLB_INTERFACE.into();
        let check = health_check(
            CheckKind::Tcp,
            Duration::from_millis(200),
            Duration::from_millis(200),
            2,
            2,
        );
        for family in [Family::V4, Family::V6] {
            let pool = match family {
                Family::V4 => "pool",
                Family::V6 => "pool6",
            };
            let backends = (1..=weights.len())
                .map(|i| BackendSpec {
                    address: Segment::backend_addr(family, i),
                    port: None,
                    weight: weights[i - 1],
                    max_connections: None,
                })
                .collect();
            config
                .groups
                .push(group(pool, GroupKind::Vserver, backends));
            for (protocol, port) in [(Protocol::Tcp, VIP_TCP_PORT), (Protocol::Udp, VIP_UDP_PORT)] {
                let mut listener = listener_on(
                    family.vip(),
                    &listener_name(protocol, family),
                    protocol,
                    port,
                    Some(pool),
                );
                match (mode, family) {
                    (NodeMode::FullNat, Family::V4) => {
                        listener.forwarding = Forwarding::Fullnat;
                        listener.snat_addresses = vec![Self::snat_addr(k)];
                    }
                    _ => {
                        listener.forwarding = Forwarding::Dsr;
                        listener.dsr = Some(DsrMode::L2);
                    }
                }
                listener.on_all_unhealthy = AllUnhealthy::Drop;
                listener.health_check = Some(HealthCheck {
                    port: Some(VIP_TCP_PORT),
                    ..check.clone()
                });
                config.listener(listener);
            }
        }
        let mut announce: Announce =
            toml::from_str("").expect("[announce] with every option at slb's default");
        announce.bird_socket = self.bird_socket(k);
        announce.include_file = Some(self.include_file(k));
        announce.protocol = Some(PROTOCOL.into());
        config.announce = Some(announce);
        config
    }

    /// Starts slb (`bin`, with `run_options`) on every node with [`ScaleOut::node_config`];
    /// index `k - 1` is node `k`. `tag` names the instances.
    pub fn start_slb(
        &self,
        bin: &Path,
        tag: &str,
        weights: &[u32],
        mode: NodeMode,
        run_options: &[&str],
    ) -> anyhow::Result<Vec<Instance>> {
        (1..=self.nodes())
            .map(|k| {
                let instance = unique_instance(&format!("{tag}{k}"));
                let config = self.node_config(&instance, k, weights, mode);
                let mut inst =
                    Instance::new(bin, self.segment.node_ns(k), &instance, &config.to_toml())?
                        .stop_on_drop();
                inst.start(run_options, &[])?;
                Ok(inst)
            })
            .collect()
    }
}

/// How [`ScaleOut::node_config`]'s listeners forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    /// Every listener by direct return on the segment.
    Dsr,
    /// The IPv4 listeners by full NAT, each node from its own [`ScaleOut::snat_addr`] (the
    /// IPv6 ones by direct return: full NAT is IPv4 only).
    FullNat,
}

/// The name of [`ScaleOut::node_config`]'s listener of `protocol` and `family`.
pub fn listener_name(protocol: Protocol, family: Family) -> String {
    match family {
        Family::V4 => format!("{protocol}"),
        Family::V6 => format!("{protocol}6"),
    }
}

/// Runs `traffic` and returns, per node (index `k - 1`), how many new connections its
/// `listener` counted meanwhile (0 on a node whose slb is stopped).
pub fn new_connections_per_node<T>(
    nodes: &[Instance],
    listener: &str,
    traffic: impl FnOnce() -> T,
) -> anyhow::Result<(T, Vec<u64>)> {
    let count = |node: &Instance| -> anyhow::Result<u64> {
        if !node.state_path().exists() {
            return Ok(0);
        }
        Ok(node
            .status()?
            .listeners
            .iter()
            .find(|l| l.name == listener)
            .map_or(0, |l| l.new_connections))
    };
    let before = nodes
        .iter()
        .map(count)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = traffic();
    let after = nodes
        .iter()
        .map(count)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((out, after.iter().zip(before).map(|(a, b)| a - b).collect()))
}

/// Where node `k`'s slb writes its include file.
fn announce_dir(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("node{k}")).join("announce")
}

/// Node `k`'s BIRD: BFD on the segment, slb's protocols from the include file, and one BGP
/// session to the router carrying both families, exporting slb's routes and importing nothing.
fn node_config(k: usize, dir: &Path) -> String {
    let addr = Segment::node_addr(Family::V4, k);
    let router = Segment::router_addr(Family::V4);
    let include = announce_dir(dir.parent().expect("a node directory"), k);
    std::fs::create_dir_all(&include).expect("creating the announce directory");
    format!(
        r#"log "{log}" all;
router id {addr};
protocol device {{ }}
# slb writes its static protocols here; none yet is fine.
include "{include}/*.conf";
protocol bfd {{
	interface "l0" {{ interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};
}}
protocol bgp uplink {{
	local {addr} as {NODE_AS};
	neighbor {router} as {ROUTER_AS};
	bfd on;
	graceful restart off;
	hold time 3; keepalive time 1;
	connect delay time 1; connect retry time 1;
	error wait time 1, 5;
	ipv4 {{ import none; export where proto ~ "{PROTOCOL}_*"; }};
	ipv6 {{ import none; export where proto ~ "{PROTOCOL}_*"; }};
}}
"#,
        log = dir.join("bird.log").display(),
        include = include.display(),
    )
}

/// The router's BIRD: a BGP session per node, BFD, and kernel protocols that merge the nodes'
/// equal routes into one multipath route.
fn router_config(nodes: usize, dir: &Path) -> String {
    let router = Segment::router_addr(Family::V4);
    let mut config = format!(
        r#"log "{log}" all;
router id {router};
protocol device {{ }}
protocol kernel {{
	ipv4 {{ import none; export where source = RTS_BGP; }};
	merge paths on;
}}
protocol kernel {{
	ipv6 {{ import none; export where source = RTS_BGP; }};
	merge paths on;
}}
protocol bfd {{
	interface "br0" {{ interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};
}}
template bgp slb_node {{
	local {router} as {ROUTER_AS};
	bfd on;
	graceful restart off;
	hold time 3; keepalive time 1;
	connect delay time 1; connect retry time 1;
	error wait time 1, 5;
	ipv4 {{ import all; export none; }};
	ipv6 {{ import all; export none; }};
}}
"#,
        log = dir.join("router.log").display(),
    );
    for k in 1..=nodes {
        config.push_str(&format!(
            "protocol bgp node{k} from slb_node {{ neighbor {} as {NODE_AS}; }}\n",
            Segment::node_addr(Family::V4, k)
        ));
    }
    config
}
