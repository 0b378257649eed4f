//! A private place to run the XDP programs on crafted frames (BPF_PROG_TEST_RUN), shared by the
//! packet tests and the data-plane benchmark: a fresh network namespace (per thread) with two
//! veth pairs — `in0` towards clients (10.10.0.1/24), `out0` towards backends (10.20.0.1/24) —
//! static neighbours so FIB lookups have real answers, and the object loaded with its maps
//! pinned in a directory of its own.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use slb_common::GlobalCounters;

use crate::config::Config;
use crate::dataplane::{ensure_bpffs, load_object, load_programs, TableSizes, PROGRAM_NAME};
use crate::maps::PinnedMaps;
use crate::reconcile::Reconciler;

/// The reference program the benchmark compares against.
pub const FLOOR_PROGRAM: &str = "xdp_floor";
/// The MAC the testbed's client frames come from (a static neighbour of `in0`).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The MAC of every backend neighbour on `out0` (10.20.0.2 - 10.20.3.254).
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The index of interface `name` in this thread's namespace.
pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated name; if_nametoindex has no other preconditions.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {name}");
    Ok(index)
}

/// The MAC of an interface in this thread's namespace (sysfs shows the namespace it was mounted
/// in, so ask `ip`).
pub fn mac_of(iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", iface])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no MAC for {iface} in {text:?}"))?;
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("malformed MAC {mac}"))
}

/// Runs `f` on a thread inside a new network namespace (namespaces are per thread in Linux).
pub fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET): are we root?"
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The testbed's links, addresses and static neighbours in this thread's (fresh) namespace:
/// `in0` (10.10.0.1/24, fd00:10::1/64) towards clients, `out0` (10.20.0.1/22, fd00:20::1/64)
/// towards backends, each with a veth peer, forwarding on for both families.
pub fn setup_network() -> anyhow::Result<()> {
    // Before any link exists: an address under duplicate address detection stays tentative
    // for a while, and the FIB does not use it.
    sh(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.all.forwarding=1",
    ])?;
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&[
        "ip", "link", "add", "in0", "type", "veth", "peer", "name", "in1",
    ])?;
    sh(&[
        "ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1",
    ])?;
    for l in ["in0", "in1", "out0", "out1"] {
        sh(&["ip", "link", "set", l, "up"])?;
    }
    sh(&["ip", "addr", "add", "10.10.0.1/24", "dev", "in0"])?;
    sh(&["ip", "addr", "add", "10.20.0.1/22", "dev", "out0"])?;
    sh(&[
        "ip",
        "neigh",
        "replace",
        "10.10.0.2",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "in0",
        "nud",
        "permanent",
    ])?;
    sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:10::1/64",
        "dev",
        "in0",
        "nodad",
    ])?;
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:20::1/64",
        "dev",
        "out0",
        "nodad",
    ])?;
    let mut batch =
        String::from("neigh replace fd00:10::2 lladdr 02:00:00:00:00:01 dev in0 nud permanent\n");
    for host in 2..32 {
        batch.push_str(&format!(
            "neigh replace fd00:20::{host:x} lladdr 02:00:00:00:00:02 dev out0 nud permanent\n"
        ));
    }
    for third in 0..4 {
        for fourth in 2..255 {
            batch.push_str(&format!(
                "neigh replace 10.20.{third}.{fourth} lladdr 02:00:00:00:00:02 dev out0 nud permanent\n"
            ));
        }
    }
    static NEXT_BATCH: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "slb-testbed-neigh-{}-{}",
        std::process::id(),
        NEXT_BATCH.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, batch)?;
    let result = sh(&["ip", "-batch", path.to_str().expect("utf-8 temp path")]);
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(())
}

/// The `struct xdp_md` a BPF_PROG_TEST_RUN of an XDP program takes as its context: a frame of
/// `frame_len` bytes arriving on interface `ingress` (of the caller's namespace).
pub fn xdp_md(frame_len: usize, ingress: u32) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0u32, frame_len as u32, 0, ingress, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// Removes the pin directory however the test ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Testbed {
    ebpf: Ebpf,
    pub reconciler: Reconciler,
    _pins: PinDir,
    pub in_index: u32,
    pub out_index: u32,
    pub in_mac: [u8; 6],
    pub out_mac: [u8; 6],
}

/// One program run.
pub struct Run {
    pub verdict: u32,
    pub frame: Vec<u8>,
    /// The kernel's own measurement of the run.
    pub duration: Duration,
}

impl Testbed {
    /// Sets up the namespace (call from inside [`in_fresh_netns`]) and applies `config`.
    pub fn new(config: &str, ring_size: u32) -> anyhow::Result<Testbed> {
        setup_network()?;
        ensure_bpffs()?;
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/slb-testbed-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&pin_dir)?;
        let pins = PinDir(pin_dir.clone());
        let sizes = TableSizes {
            ring_size,
            max_connections: Config::parse(config, "testbed config")?.max_connections,
        };
        let mut ebpf = load_object(&pin_dir, sizes)?;
        load_programs(&mut ebpf).context("the verifier refused the data plane's programs")?;
        let floor: &mut Xdp = ebpf
            .program_mut(FLOOR_PROGRAM)
            .with_context(|| format!("no program {FLOOR_PROGRAM}"))?
            .try_into()?;
        crate::dataplane::load_xdp(floor)
            .with_context(|| format!("the verifier refused {FLOOR_PROGRAM}"))?;
        let (in_index, out_index) = (ifindex("in0")?, ifindex("out0")?);
        {
            let mut egress: aya::maps::DevMapHash<_> = ebpf
                .map_mut("EGRESS")
                .context("no EGRESS map")?
                .try_into()?;
            egress.insert(in_index, in_index, None, 0)?;
            egress.insert(out_index, out_index, None, 0)?;
        }
        let maps = PinnedMaps::open(&pin_dir)?;
        let config = Config::parse(config, "testbed config")?;
        let mut reconciler = Reconciler::new(maps, &config.instance, ring_size);
        reconciler.apply(&config, &Default::default())?;
        Ok(Testbed {
            ebpf,
            reconciler,
            _pins: pins,
            in_index,
            out_index,
            in_mac: mac_of("in0")?,
            out_mac: mac_of("out0")?,
        })
    }

    /// Where the testbed's maps are pinned.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self._pins.0
    }

    /// Runs `program` once on `frame` as if it arrived on `ingress`.
    pub fn run_program(&self, program: &str, frame: &[u8], ingress: u32) -> anyhow::Result<Run> {
        let program: &Xdp = self
            .ebpf
            .program(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        let ctx = xdp_md(frame.len(), ingress);
        let mut out = vec![0u8; frame.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            verdict: result.return_value,
            frame: out,
            duration: result.duration,
        })
    }

    /// Runs slb's program; panics on a syscall failure (for tests).
    pub fn run(&self, frame: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        let run = self
            .run_program(PROGRAM_NAME, frame, ingress)
            .expect("BPF_PROG_TEST_RUN");
        (run.verdict, run.frame)
    }

    pub fn counters(&self) -> GlobalCounters {
        self.reconciler
            .maps()
            .counters
            .global()
            .expect("GLOBAL_STATS")
    }
}
