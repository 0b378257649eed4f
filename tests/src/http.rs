//! Helpers for the HTTP/HTTPS (L7) listener tests: the config of an L7 `slb`, the
//! `slb-http-backend` processes in the backend namespaces, a tokio runtime whose sockets live
//! in a namespace, and raw TCP connections from a namespace.
//!
//! An L7 listener's VIP must be a local address of the slb namespace ([`add_local_vip`]); the
//! client still reaches it through its default route, and the XDP program on `s0` passes the
//! traffic up to the proxy because no L4 listener claims that port.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde::Deserialize;

use crate::exec::{self, ChildGuard};
use crate::topology::Topology;
use crate::{BACKEND_PORT, VIP, VIP6};
pub use slb_user::proxy::access_log::AccessLogRecord;

/// Port of the HTTP listener the L7 tests use.
pub const HTTP_PORT: u16 = 8000;
/// Port of the HTTPS listener the L7 tests use.
pub const HTTPS_PORT: u16 = 8443;

/// `VIP:8000`.
pub fn vip_http() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, HTTP_PORT))
}

/// `VIP:8443`.
pub fn vip_https() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, HTTPS_PORT))
}

/// Puts the VIP and VIP6 on `lo` of the slb namespace, as HTTP/HTTPS listeners need.
pub fn add_local_vip(topo: &Topology) -> anyhow::Result<()> {
    topo.exec_in(
        topo.slb_ns(),
        ["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    )?;
    topo.exec_in(
        topo.slb_ns(),
        [
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
        ],
    )?;
    Ok(())
}

/// What `slb-http-backend` answers (its JSON body).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Echo {
    pub backend: String,
    pub peer: String,
    pub method: String,
    pub version: String,
    pub host: Option<String>,
    pub path: String,
    pub query: Option<String>,
    pub x_forwarded_for: Option<String>,
    pub x_forwarded_proto: Option<String>,
    pub x_real_ip: Option<String>,
    pub cookie: Option<String>,
}

impl Echo {
    pub fn parse(body: &[u8]) -> anyhow::Result<Echo> {
        serde_json::from_slice(body).with_context(|| {
            format!(
                "not a backend echo: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )
        })
    }
}

/// The 64-bit FNV-1a hash of `bytes`: how `slb-http-backend`'s `/upload` names what it
/// received, so a test can tell that a body arrived intact.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `slb-http-backend` processes in the backend namespaces of a topology, each answering as
/// `b<i>` on port 8080. Killed on drop.
#[derive(Debug)]
pub struct HttpBackends {
    bin: PathBuf,
    servers: BTreeMap<usize, (String, Option<ChildGuard>)>,
}

impl HttpBackends {
    /// Starts a backend in each of the topology's backend namespaces.
    pub fn start_all(topo: &Topology, bin: &Path) -> anyhow::Result<Self> {
        let mut backends = HttpBackends {
            bin: bin.to_owned(),
            servers: BTreeMap::new(),
        };
        for i in 1..=topo.backend_count() {
            backends
                .servers
                .insert(i, (topo.backend_ns(i).to_owned(), None));
            backends.restart(i)?;
        }
        Ok(backends)
    }

    /// Process ids of the running backends (`ip netns exec` execs the server, so these are
    /// the servers themselves), e.g. to pin them to a CPU.
    pub fn pids(&self) -> Vec<u32> {
        self.servers
            .values()
            .filter_map(|(_, child)| child.as_ref().map(ChildGuard::id))
            .collect()
    }

    /// Kills backend `i` (SIGKILL, as in a crash): from then on its host refuses connections.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        let (_, child) = self
            .servers
            .get_mut(&i)
            .with_context(|| format!("no HTTP backend {i}"))?;
        let child = child
            .take()
            .with_context(|| format!("HTTP backend {i} is not running"))?;
        drop(child);
        Ok(())
    }

    /// Starts backend `i` again and waits until it listens.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let (ns, child) = self
            .servers
            .get_mut(&i)
            .with_context(|| format!("no HTTP backend {i}"))?;
        ensure!(child.is_none(), "HTTP backend {i} is already running");
        let args: Vec<OsString> = vec![
            self.bin.clone().into(),
            "--name".into(),
            Topology::backend_name(i).into(),
            "--listen".into(),
            format!("0.0.0.0:{BACKEND_PORT}").into(),
        ];
        let mut guard = exec::spawn_in(ns, &args)?;
        guard
            .wait_for_line("ready", Duration::from_secs(10))
            .with_context(|| format!("starting HTTP backend {i}"))?;
        *child = Some(guard);
        Ok(())
    }
}

/// A multi-threaded tokio runtime whose worker threads were started inside a network
/// namespace, so every socket its tasks open lives there. Connections (e.g. a keep-alive
/// client pool) survive between [`run`](Self::run) calls.
pub struct NetnsRuntime {
    rt: tokio::runtime::Runtime,
}

impl NetnsRuntime {
    pub fn new(ns: &str) -> anyhow::Result<Self> {
        let rt = exec::in_netns(ns, || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
        })??;
        Ok(NetnsRuntime { rt })
    }

    /// Runs `f` as a task on the runtime's workers (never on the calling thread, which is in
    /// another namespace) and returns its output; a panic in `f` is propagated.
    pub fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.rt.block_on(self.rt.spawn(f)) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("task failed: {e}"),
        }
    }

    /// Starts `f` on the runtime and returns its handle (await it inside [`run`](Self::run),
    /// or use [`join`](Self::join)).
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt.spawn(f)
    }

    /// Waits for a task started with [`spawn`](Self::spawn).
    pub fn join<T: Send + 'static>(&self, handle: tokio::task::JoinHandle<T>) -> T {
        match self.rt.block_on(handle) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("task failed: {e}"),
        }
    }
}

/// A blocking TCP connection to `addr` opened from namespace `ns` (the socket stays in `ns`
/// whichever thread uses it).
pub fn tcp_connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = exec::in_netns(ns, || TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("connecting to {addr} from {ns}"))?;
    Ok(stream)
}

/// Reads an access log into slb's own records (every line must be one); a missing file is an
/// empty log.
/// The access log's records once `complete` says they are all there (at most 5 s): slb's
/// writer thread flushes once its queue is empty, so the last records may land just after the
/// last answer. What is there by then, if `complete` never says so.
pub fn wait_access_log(
    path: &Path,
    complete: impl Fn(&[AccessLogRecord]) -> bool,
) -> Vec<AccessLogRecord> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let records = read_access_log(path).expect("access log");
        if complete(&records) || std::time::Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn read_access_log(path: &Path) -> anyhow::Result<Vec<AccessLogRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("access log line {l:?}")))
        .collect()
}
