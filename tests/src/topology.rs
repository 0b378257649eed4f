//! Client / load balancer / backends, each in its own network namespace, joined by veths.
//! Every topology is dual stack:
//!
//! ```text
//!  client ns                 slb ns                                backend ns i
//!  c0 10.200.1.2      ─── s0 10.200.1.1
//!     fd00:200:1::2/64        fd00:200:1::1/64
//!                            s<i> 10.200.(10+i).1     ───────── b0 10.200.(10+i).2
//!                                 fd00:200:(10+i)::1/64            fd00:200:(10+i)::2/64
//! ```
//!
//! The client's default routes (both families) point at the slb namespace, so traffic to the
//! VIP (10.200.100.10 or fd00:200:100::10, on no interface) arrives on `s0`, where the XDP
//! program picks it up. Each backend's default routes point back at the slb namespace. IPv6
//! duplicate address detection is off in every namespace (set before any link exists there), so
//! addresses are usable at once, and the slb namespace learns its neighbours (client and
//! backends) when the links come up, so `bpf_fib_lookup` has answers for the first packets. In
//! backend namespaces `net.ipv6.bindv6only` is 1, so a server binds `0.0.0.0:P` and `[::]:P`
//! side by side and sees IPv4 peers as IPv4 addresses. Every name carries a per-process
//! unique prefix, and everything is deleted when the [`Topology`] is dropped, panics included.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};

use crate::exec::{self, ChildGuard, CommandError};
use crate::{
    BACKEND_PORT, CLIENT_ADDR, CLIENT_ADDR6, SECOND_BACKEND_PORT, SLB_CLIENT_SIDE_ADDR,
    SLB_CLIENT_SIDE_ADDR6,
};

static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

/// Highest backend index the 10.200.(10+i).0/24 addressing allows.
pub const MAX_BACKENDS: usize = 200;

/// Builder for [`Topology`].
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    tag: String,
    backends: usize,
    test_server: Option<PathBuf>,
}

impl TopologyBuilder {
    /// Short tag that starts every namespace name (default `slbt`).
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag.to_owned();
        self
    }

    /// Number of backend namespaces created up front (more can be added with
    /// [`Topology::add_backend`]).
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Starts this `slb-test-server` binary in every backend [`build`](Self::build) creates
    /// (as [`Topology::start_backend_server`] would).
    pub fn test_servers(mut self, server_bin: &Path) -> Self {
        self.test_server = Some(server_bin.to_owned());
        self
    }

    pub fn build(self) -> anyhow::Result<Topology> {
        ensure!(
            !self.tag.is_empty()
                && self.tag.len() <= 8
                && self
                    .tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "topology tag {:?} must be 1-8 characters of [A-Za-z0-9-]",
            self.tag
        );
        let n = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}-{}-{n}", self.tag, std::process::id());
        let mut topo = Topology {
            client: format!("{prefix}-cli"),
            slb: format!("{prefix}-lb"),
            prefix,
            backends: Vec::new(),
            created: Vec::new(),
            servers: BTreeMap::new(),
            xdp_links: Vec::new(),
        };
        // From here on, a failure drops `topo`, which deletes whatever was created.
        topo.create_core()
            .with_context(|| format!("creating topology {}", topo.prefix))?;
        for _ in 0..self.backends {
            let i = topo.add_backend()?;
            if let Some(server) = &self.test_server {
                topo.start_backend_server(i, server)?;
            }
        }
        Ok(topo)
    }
}

/// A set of namespaces and veths that is torn down on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    client: String,
    slb: String,
    /// Backend namespaces; backend `i` (1-based) is `backends[i - 1]`.
    backends: Vec<String>,
    /// Namespaces created so far, in creation order.
    created: Vec<String>,
    /// Test servers by backend index: the command line (for restarts) and the running
    /// process, if any. Killed before the namespaces are deleted.
    servers: BTreeMap<usize, BackendServer>,
    /// The XDP links that keep a pass-everything program on `c0` and every `b0` (see
    /// [`attach_xdp_pass`]).
    xdp_links: Vec<OwnedFd>,
}

#[derive(Debug)]
struct BackendServer {
    args: Vec<OsString>,
    child: Option<ChildGuard>,
}

/// Options of a backend's test server beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `--log-peers FILE`: the server appends `<unix ns> <tcp|udp> <peer>` for every accepted
    /// connection and received datagram (read it with [`read_peer_log`]).
    pub log_peers: Option<PathBuf>,
}

/// One line of a test server's peer log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLogEntry {
    /// When the server accepted the connection or received the datagram, unix time in ns.
    pub at_unix_ns: u128,
    /// `true` for TCP, `false` for UDP.
    pub tcp: bool,
    pub peer: SocketAddr,
}

/// Reads a peer log written by `slb-test-server --log-peers`. A missing file is an empty log.
pub fn read_peer_log(path: &Path) -> anyhow::Result<Vec<PeerLogEntry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut parts = line.split_whitespace();
            let (Some(at), Some(proto), Some(peer), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                bail!("malformed peer log line {line:?} in {}", path.display());
            };
            let tcp = match proto {
                "tcp" => true,
                "udp" => false,
                other => bail!("unknown protocol {other:?} in peer log line {line:?}"),
            };
            Ok(PeerLogEntry {
                at_unix_ns: at
                    .parse()
                    .with_context(|| format!("bad time in peer log line {line:?}"))?,
                tcp,
                peer: peer
                    .parse()
                    .with_context(|| format!("bad peer in peer log line {line:?}"))?,
            })
        })
        .collect()
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            tag: "slbt".to_owned(),
            backends: 0,
            test_server: None,
        }
    }

    /// Unique prefix of every namespace name of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client_ns(&self) -> &str {
        &self.client
    }

    pub fn slb_ns(&self) -> &str {
        &self.slb
    }

    /// Namespace of backend `i` (1-based).
    pub fn backend_ns(&self, i: usize) -> &str {
        assert!(
            (1..=self.backends.len()).contains(&i),
            "no backend {i} (have {})",
            self.backends.len()
        );
        &self.backends[i - 1]
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Address of backend `i`: 10.200.(10+i).2.
    pub fn backend_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, subnet(i), 2)
    }

    /// IPv6 address of backend `i`: fd00:200:(10+i)::2 (the group is the decimal digits of
    /// 10+i, as in the IPv4 address).
    pub fn backend_addr6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, subnet6(i), 0, 0, 0, 0, 2)
    }

    /// The slb namespace's IPv6 address on backend `i`'s link: fd00:200:(10+i)::1.
    fn slb_backend_side_addr6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, subnet6(i), 0, 0, 0, 0, 1)
    }

    /// Name the test server of backend `i` reports: `b<i>`.
    pub fn backend_name(i: usize) -> String {
        format!("b{i}")
    }

    /// Interfaces in the slb namespace: `s0` (client side) then `s1..sN`.
    pub fn slb_interfaces(&self) -> Vec<String> {
        (0..=self.backends.len()).map(|i| format!("s{i}")).collect()
    }

    /// Runs `args` in namespace `ns` and returns stdout.
    pub fn exec_in<I, S>(&self, ns: &str, args: I) -> Result<String, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec::exec_in(ns, args)
    }

    /// Starts `args` in namespace `ns`; the caller owns the process (killed on drop).
    pub fn spawn_in<I, S>(&self, ns: &str, args: I) -> Result<ChildGuard, CommandError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec::spawn_in(ns, args)
    }

    /// Runs `f` on a thread inside namespace `ns` (see [`exec::in_netns`]).
    pub fn in_netns<T, F>(&self, ns: &str, f: F) -> anyhow::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        exec::in_netns(ns, f)
    }

    /// Starts `server_bin` (the `slb-test-server` binary) in backend `i`, answering TCP and UDP
    /// on ports 8080 and 8081 of both families as `b<i>`, and waits until it listens. The process lives as long as the
    /// topology, unless stopped with [`Topology::stop_backend_server`].
    pub fn start_backend_server(&mut self, i: usize, server_bin: &Path) -> anyhow::Result<()> {
        self.start_backend_server_with(i, server_bin, &ServerOptions::default())
    }

    /// [`start_backend_server`](Self::start_backend_server) with extra options.
    pub fn start_backend_server_with(
        &mut self,
        i: usize,
        server_bin: &Path,
        options: &ServerOptions,
    ) -> anyhow::Result<()> {
        self.backend_ns(i); // checks the index
        ensure!(
            self.servers.get(&i).is_none_or(|s| s.child.is_none()),
            "backend {i} already runs a test server"
        );
        let mut args: Vec<OsString> = vec![
            server_bin.into(),
            "--name".into(),
            Self::backend_name(i).into(),
        ];
        let listens = [BACKEND_PORT, SECOND_BACKEND_PORT]
            .into_iter()
            .flat_map(|port| [format!("0.0.0.0:{port}"), format!("[::]:{port}")]);
        for listen in listens {
            args.extend([
                "--tcp".into(),
                listen.clone().into(),
                "--udp".into(),
                listen.into(),
            ]);
        }
        if let Some(path) = &options.log_peers {
            args.push("--log-peers".into());
            args.push(path.into());
        }
        self.servers.insert(i, BackendServer { args, child: None });
        self.restart_backend_server(i)
    }

    /// Kills backend `i`'s test server (SIGKILL, as in a crash) and waits until it is gone:
    /// from then on its kernel refuses TCP connections and answers UDP with ICMP port
    /// unreachable.
    pub fn stop_backend_server(&mut self, i: usize) -> anyhow::Result<()> {
        let server = self
            .servers
            .get_mut(&i)
            .with_context(|| format!("backend {i} has no test server"))?;
        let child = server
            .child
            .take()
            .with_context(|| format!("the test server of backend {i} is not running"))?;
        drop(child); // kills and reaps
        Ok(())
    }

    /// Starts backend `i`'s test server again with the command line it was first started with
    /// and waits until it listens.
    pub fn restart_backend_server(&mut self, i: usize) -> anyhow::Result<()> {
        let ns = self.backend_ns(i).to_owned();
        let server = self
            .servers
            .get_mut(&i)
            .with_context(|| format!("backend {i} has no test server to restart"))?;
        ensure!(
            server.child.is_none(),
            "the test server of backend {i} is already running"
        );
        let mut child = exec::spawn_in(&ns, &server.args)?;
        child
            .wait_for_line("ready", Duration::from_secs(10))
            .with_context(|| format!("starting the test server of backend {i}"))?;
        server.child = Some(child);
        Ok(())
    }

    /// Process id of backend `i`'s test server, if it runs.
    pub fn backend_server_pid(&self, i: usize) -> Option<u32> {
        self.servers
            .get(&i)
            .and_then(|s| s.child.as_ref())
            .map(ChildGuard::id)
    }

    /// True if backend `i`'s test server is running.
    pub fn backend_server_running(&mut self, i: usize) -> bool {
        self.servers
            .get_mut(&i)
            .and_then(|s| s.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Creates backend namespace `i = backend_count() + 1`, its veth pair to the slb namespace
    /// (`s<i>` there, `b0` in the backend) and addresses, and returns `i`. Works while a load
    /// balancer is running; it only has to be told about `s<i>` and the backend.
    pub fn add_backend(&mut self) -> anyhow::Result<usize> {
        let i = self.backends.len() + 1;
        ensure!(i <= MAX_BACKENDS, "at most {MAX_BACKENDS} backends");
        let ns = format!("{}-b{i}", self.prefix);
        self.add_namespace(&ns)?;
        self.backends.push(ns.clone());
        let slb_if = format!("s{i}");
        let net = subnet(i);
        (|| -> anyhow::Result<()> {
            // Before the server binds 0.0.0.0:P and [::]:P.
            exec::exec_in(&ns, ["sysctl", "-q", "-w", "net.ipv6.bindv6only=1"])?;
            ip([
                "link", "add", "b0", "netns", &ns, "type", "veth", "peer", "name", &slb_if,
                "netns", &self.slb,
            ])?;
            ip([
                "-n",
                &self.slb,
                "addr",
                "add",
                &format!("10.200.{net}.1/24"),
                "dev",
                &slb_if,
            ])?;
            add_addr6(&self.slb, &slb_if, Self::slb_backend_side_addr6(i))?;
            ip(["-n", &self.slb, "link", "set", &slb_if, "up"])?;
            ip([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.200.{net}.2/24"),
                "dev",
                "b0",
            ])?;
            add_addr6(&ns, "b0", Self::backend_addr6(i))?;
            ip(["-n", &ns, "link", "set", "b0", "up"])?;
            ip([
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.200.{net}.1"),
            ])?;
            ip([
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &Self::slb_backend_side_addr6(i).to_string(),
            ])?;
            endpoint_offloads(&ns, "b0")?;
            self.xdp_links.push(attach_xdp_pass(&ns, "b0")?);
            exec::exec_in(&self.slb, ["ethtool", "-K", &slb_if, "gro", "on"])?;
            prime_neighbour6(&self.slb, Self::backend_addr6(i))?;
            Ok(())
        })()
        .with_context(|| format!("creating backend {i} ({ns})"))?;
        Ok(i)
    }

    fn create_core(&mut self) -> anyhow::Result<()> {
        let (client, slb) = (self.client.clone(), self.slb.clone());
        self.add_namespace(&client)?;
        self.add_namespace(&slb)?;
        ip([
            "link", "add", "c0", "netns", &client, "type", "veth", "peer", "name", "s0", "netns",
            &slb,
        ])?;
        ip([
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/24"),
            "dev",
            "c0",
        ])?;
        add_addr6(&client, "c0", CLIENT_ADDR6)?;
        ip(["-n", &client, "link", "set", "c0", "up"])?;
        ip([
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            &SLB_CLIENT_SIDE_ADDR.to_string(),
        ])?;
        ip([
            "-n",
            &client,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &SLB_CLIENT_SIDE_ADDR6.to_string(),
        ])?;
        endpoint_offloads(&client, "c0")?;
        self.xdp_links.push(attach_xdp_pass(&client, "c0")?);
        ip([
            "-n",
            &slb,
            "addr",
            "add",
            &format!("{SLB_CLIENT_SIDE_ADDR}/24"),
            "dev",
            "s0",
        ])?;
        add_addr6(&slb, "s0", SLB_CLIENT_SIDE_ADDR6)?;
        ip(["-n", &slb, "link", "set", "s0", "up"])?;
        exec::exec_in(&slb, ["ethtool", "-K", "s0", "gro", "on"])?;
        exec::exec_in(&slb, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        exec::exec_in(
            &slb,
            ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"],
        )?;
        prime_neighbour6(&slb, CLIENT_ADDR6)?;
        Ok(())
    }

    /// Creates namespace `ns` (see [`add_namespace`]) and records it for teardown.
    fn add_namespace(&mut self, ns: &str) -> anyhow::Result<()> {
        add_namespace(ns, &mut self.created)
    }
}

/// Creates namespace `ns` with `lo` up and IPv6 duplicate address detection off (set before any
/// link is created there, or its addresses would stay tentative for ~2 s); `ns` joins `created`
/// (deleted on teardown) as soon as it exists.
pub(crate) fn add_namespace(ns: &str, created: &mut Vec<String>) -> anyhow::Result<()> {
    ip(["netns", "add", ns])?;
    created.push(ns.to_owned());
    exec::exec_in(
        ns,
        [
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )?;
    ip(["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes first, so nothing keeps a namespace alive after its name is gone.
        self.servers.clear();
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(["netns", "del", ns]) {
                eprintln!("warning: could not delete namespace {ns}: {e}");
            }
        }
    }
}

/// Third octet of backend `i`'s subnet.
fn subnet(i: usize) -> u8 {
    assert!(
        (1..=MAX_BACKENDS).contains(&i),
        "backend index {i} out of range"
    );
    (10 + i) as u8
}

/// The group of backend `i`'s IPv6 subnet: the decimal digits of 10+i read as hex, so
/// backend 1 is fd00:200:11::/64 as it is 10.200.11.0/24.
fn subnet6(i: usize) -> u16 {
    u16::from_str_radix(&subnet(i).to_string(), 16).expect("decimal digits are hex digits")
}

/// Adds `addr`/64 to `ifname` in `ns`, usable at once (`nodad`).
pub(crate) fn add_addr6(ns: &str, ifname: &str, addr: Ipv6Addr) -> Result<String, CommandError> {
    ip([
        "-n",
        ns,
        "-6",
        "addr",
        "add",
        &format!("{addr}/64"),
        "dev",
        ifname,
        "nodad",
    ])
}

/// Makes the slb namespace resolve `addr`'s link-layer address now (one echo, answered within
/// 3 s): until it has, `bpf_fib_lookup` finds no neighbour and the XDP program hands the first
/// packets of a flow to the stack, which, for an oversized segment, answers with a Packet Too
/// Big quoting the rewritten packet (the backend's address) that the client ignores.
fn prime_neighbour6(slb_ns: &str, addr: Ipv6Addr) -> Result<String, CommandError> {
    exec::exec_in(
        slb_ns,
        [
            "ping",
            "-6",
            "-q",
            "-c",
            "1",
            "-i",
            "0.2",
            "-w",
            "3",
            &addr.to_string(),
        ],
    )
}

pub(crate) fn ip<const N: usize>(args: [&str; N]) -> Result<String, CommandError> {
    exec::run(Command::new("ip").args(args))
}

/// Attaches an XDP program that passes every packet to `ifname` in `ns` (native mode), for as
/// long as the returned link is open.
///
/// A veth only delivers what its peer's XDP program sent back with `XDP_TX` (slb's Packet Too
/// Big and "fragmentation needed") once something schedules its NAPI: the kernel's flush after
/// `XDP_TX` (`veth_xdp_flush`) does so only if the receiving end has an XDP program of its own,
/// although GRO alone already queues the frames there. Without one, the frames wait until the
/// next ordinary packet for that end (a neighbour probe, seconds later), and a client that
/// needs the error stalls that long.
pub(crate) fn attach_xdp_pass(ns: &str, ifname: &str) -> anyhow::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u32 = 6;
    const BPF_XDP: u32 = 37;
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    const XDP_PASS: u8 = 2;
    // r0 = XDP_PASS; exit
    let insns: [[u8; 8]; 2] = [
        [0xb7, 0, 0, 0, XDP_PASS, 0, 0, 0],
        [0x95, 0, 0, 0, 0, 0, 0, 0],
    ];
    let license = c"GPL";
    let bpf = |cmd: libc::c_long, attr: &mut [u8; 128], what: &str| -> anyhow::Result<OwnedFd> {
        // SAFETY: `attr` is a zeroed bpf_attr of the given size with the fields `cmd` reads;
        // the pointers in it outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{what} for {ifname} in {ns}"));
        }
        // SAFETY: the syscall returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    let mut load = [0u8; 128];
    load[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    load[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    load[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    load[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let prog = bpf(BPF_PROG_LOAD, &mut load, "loading an XDP pass program")?;
    let name = std::ffi::CString::new(ifname)?;
    // Interface indexes are per namespace, and so is the link's lookup of it.
    exec::in_netns(ns, || -> anyhow::Result<OwnedFd> {
        // SAFETY: `name` is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {ifname} in {ns}");
        let mut link = [0u8; 128];
        link[0..4].copy_from_slice(&(std::os::fd::AsRawFd::as_raw_fd(&prog) as u32).to_ne_bytes());
        link[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        link[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
        link[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
        bpf(BPF_LINK_CREATE, &mut link, "attaching an XDP pass program")
    })?
}

/// Offloads on a client or backend veth end: no TX checksum offload, so local sockets send
/// complete checksums the XDP program can update incrementally, and GRO on, which veth needs to
/// accept frames that XDP_REDIRECT sends into its peer.
pub(crate) fn endpoint_offloads(ns: &str, ifname: &str) -> Result<(), CommandError> {
    exec::exec_in(ns, ["ethtool", "-K", ifname, "tx", "off"])?;
    exec::exec_in(ns, ["ethtool", "-K", ifname, "gro", "on"])?;
    Ok(())
}
