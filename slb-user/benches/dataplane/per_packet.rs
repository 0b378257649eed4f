//! Per-packet cost of the XDP program of a running slb, measured from outside.
//!
//! Each program under test (a *subject*: this build's `slb`, and with `SLB_BENCH_AGAINST` another
//! revision's) runs as a real daemon (`slb run`) in a network namespace of its own, with the
//! testbed's links and neighbours, and pins its program. A wrapper (`xdp_replay` of this build,
//! loaded with maps of its own) restores a frame template before every run and tail-calls the
//! subject's pinned program, so BPF_PROG_TEST_RUN can repeat a packet 100 000 times and the
//! kernel's average per run is the packet's own cost plus the wrapper's. The baseline is the
//! same wrapper, on the same template (so cycling flows costs both alike), tail-calling
//! `xdp_floor` (swap MACs, XDP_TX); a row's figure is its time minus the mean of its baselines
//! run just before and after it, and the median over rounds. Rounds alternate between subjects,
//! so both see the same machine.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use aya::maps::{Array, PerCpuArray, PerCpuValues, ProgramArray};
use aya::programs::{ProgramFd, TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use aya_obj::programs::XdpAttachType;
use serde_json::json;
use slb_common::wire::{
    ipv4_frame, ipv6_frame, parse_ipv4_frame, parse_ipv6_frame, L4Spec, TCP_ACK, TCP_SYN,
};
use slb_common::{ReplayTemplate, REPLAY_EVERY_RUN_NEW, REPLAY_FRAME_BYTES};
use slb_user::dataplane::{load_object, TableSizes};
use slb_user::instance::{pin_dir, state_dir};
use slb_user::testbed::{
    ifindex, mac_of, setup_network, xdp_md, BACKEND_MAC, CLIENT_MAC, FLOOR_PROGRAM,
};

/// Runs per BPF_PROG_TEST_RUN call: enough that the syscall's own cost disappears.
const REPEAT: u32 = 100_000;
/// Flows the "many flows" rows cycle through (more than the per-CPU caches hold).
const CYCLED_FLOWS: u32 = 65_536;
const VIP: [u8; 4] = [10, 99, 0, 10];
/// The client of the single-flow rows and of the reply (it has a neighbour entry on `in0`).
const CLIENT: [u8; 4] = [10, 10, 0, 2];
const CLIENT_PORT: u16 = 40_000;
/// Source addresses of the cycled, new and prefilled flows: distinct, so rows never share a flow.
const CYCLED_TCP_BASE: [u8; 4] = [10, 30, 0, 2];
const CYCLED_UDP_BASE: [u8; 4] = [10, 31, 0, 2];
const NEW_FLOW_BASE: [u8; 4] = [10, 32, 0, 2];
const NEW_FLOW_PAIRS_BASE: [u8; 4] = [10, 34, 0, 2];
const PREFILL_BASE: [u8; 4] = [10, 33, 0, 2];
/// The DSR listener's port (TCP, group `dsrpool`: the IPv4 backends on this port), above the
/// IPv4 listeners' 80 + n.
const DSR_PORT: u16 = 200;
/// The IP-in-IP DSR listener's port (group `tunnelpool`: the IPv4 backends on this port), and
/// the full NAT listener's (group `fullnatpool`: the IPv4 backends on port 9202).
const TUNNEL_PORT: u16 = 201;
const FULLNAT_PORT: u16 = 202;
/// The full NAT listener's SNAT addresses (on `out0`'s subnet): 16, so the new-flow row's
/// flows do not run out of ports.
const SNAT_ADDRESSES: usize = 16;

/// Which forwarding modes' listeners a subject's config has: older revisions know fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modes {
    NatOnly,
    /// And a DSR listener on the L2 segment.
    Dsr,
    /// And IP-in-IP DSR and full NAT listeners too.
    All,
}
/// The IPv6 listener's VIP (TCP port 80, group `ipv6pool`: `pool<n>` are the IPv4 listeners' groups).
const VIP6: [u8; 16] = ipv6_octets([0xfd00, 0x99, 0, 0, 0, 0, 0, 0x10]);
/// The IPv6 client of the single-flow rows and of the reply (a neighbour of `in0` in the
/// testbed).
const CLIENT6: [u8; 16] = ipv6_octets([0xfd00, 0x10, 0, 0, 0, 0, 0, 2]);
/// Source addresses of the IPv6 new flows.
const NEW_FLOW6_BASE: [u8; 16] = ipv6_octets([0xfd00, 0x32, 0, 0, 0, 0, 0, 2]);
/// The first of the IPv6 backends the testbed has neighbours for on `out0`, and how many there
/// are (the next addresses up).
const FIRST_IPV6_BACKEND: [u8; 16] = ipv6_octets([0xfd00, 0x20, 0, 0, 0, 0, 0, 2]);
const MAX_IPV6_BACKENDS: usize = 30;
/// The CPU the measuring thread runs on; the daemons stay on the other one.
const MEASURE_CPU: usize = 1;
const DAEMON_CPU: usize = 0;

/// A program under test: an `slb` binary and what to call it in the tables.
#[derive(Debug, Clone)]
pub struct Subject {
    pub label: String,
    pub slb: PathBuf,
}

/// The subjects of this run: this build, and `SLB_BENCH_AGAINST` (a path to another revision's
/// `slb`, labelled by `SLB_BENCH_AGAINST_LABEL`) when set.
pub fn subjects() -> Vec<Subject> {
    let mut subjects = vec![Subject {
        label: "this build".into(),
        slb: PathBuf::from(env!("CARGO_BIN_EXE_slb")),
    }];
    if let Ok(path) = std::env::var("SLB_BENCH_AGAINST") {
        subjects.push(Subject {
            label: std::env::var("SLB_BENCH_AGAINST_LABEL").unwrap_or_else(|_| path.clone()),
            slb: PathBuf::from(path),
        });
    }
    subjects
}

/// A table shape: listeners, backends, and how many flows fill the connection table first.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub label: &'static str,
    pub listeners: usize,
    pub backends: usize,
    pub prefill: u32,
    /// Also measure the rows of many flows on both CPUs at once.
    pub scaling: bool,
}

const fn ipv6_octets(words: [u16; 8]) -> [u8; 16] {
    std::net::Ipv6Addr::new(
        words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7],
    )
    .octets()
}

/// One measured packet kind.
#[derive(Debug, Clone)]
struct Row {
    name: &'static str,
    template: ReplayTemplate,
    ingress: Ingress,
}

impl Row {
    /// The IPv6 rows stay out of what describes the IPv4 ones (the absolute baseline, the
    /// scaling table), so those keep their meaning.
    fn is_ipv6(&self) -> bool {
        self.template.ipv4_check_at == 0
    }

    /// The DSR rows, measured when the subject takes the DSR listener.
    fn is_dsr(&self) -> bool {
        self.name.starts_with("DSR:")
    }

    /// A row that claims a full NAT mapping every run: the SNAT table is emptied before it, or
    /// its 100 000 claims a run would fill it within a few rounds.
    fn claims_snat_mappings(&self) -> bool {
        self.name == "Full NAT: new flow (SYN)"
    }

    /// The IP-in-IP DSR and full NAT rows, measured when the subject takes their listeners.
    fn is_later_mode(&self) -> bool {
        self.name.starts_with("DSR IP-in-IP:") || self.name.starts_with("Full NAT:")
    }
}

#[derive(Debug, Clone, Copy)]
enum Ingress {
    Clients,
    Backends,
}

fn template(frame: &[u8], flows: u32, packets_per_flow: u32) -> ReplayTemplate {
    ReplayTemplate::new(frame, flows, packets_per_flow)
        .unwrap_or_else(|e| panic!("not a template frame ({e}): {frame:02x?}"))
}

/// `listeners` TCP listeners (VIP:80, 81, ...) and a UDP one (VIP:53), each over `backends`
/// servers; TCP listener `l` reaches them on port 8080 + l (a backend endpoint serves one tcp/udp
/// listener), the UDP one on 8080. And an IPv6 TCP listener ([`VIP6`]:80) over as many IPv6
/// servers as the testbed has neighbours for (up to [`MAX_IPV6_BACKENDS`]), on port 8080, when
/// `ipv6_listener` (the per-packet rows; not the other measurements, which keep their configs).
/// `max_connections` only when the subject knows the key.
pub fn config(
    instance: &str,
    listeners: usize,
    backends: usize,
    max_connections: bool,
    ipv6_listener: bool,
    modes: Modes,
) -> String {
    use std::fmt::Write as _;
    let mut c = format!("instance = \"{instance}\"\n");
    if max_connections {
        c.push_str("max_connections = 1048576\n");
    }
    c.push_str("[[interfaces]]\nname = \"in0\"\n[[interfaces]]\nname = \"out0\"\n");
    for l in 0..listeners {
        let _ = write!(
            c,
            "[[listeners]]\nname = \"tcp{l}\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = {}\ngroup = \"pool{l}\"\n",
            80 + l
        );
    }
    let _ = write!(c, "[[listeners]]\nname = \"udp\"\nprotocol = \"udp\"\nvip = \"10.99.0.10\"\nport = 53\ngroup = \"pool0\"\n");
    for l in 0..listeners.max(1) {
        let _ = write!(c, "[[groups]]\nname = \"pool{l}\"\nbackends = [\n");
        for b in 0..backends {
            let _ = writeln!(
                c,
                "  {{ address = \"10.20.{}.{}\", port = {} }},",
                b / 253,
                2 + b % 253,
                8080 + l
            );
        }
        c.push_str("]\n");
    }
    if modes != Modes::NatOnly {
        // Its check probes backends that do not exist; at this interval it declares nothing
        // during a run.
        let _ = write!(c, "[[listeners]]\nname = \"dsr-tcp\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = {DSR_PORT}\ngroup = \"dsrpool\"\nforwarding = \"dsr\"\nhealth_check = {{ type = \"tcp\", interval = \"300s\" }}\n[[groups]]\nname = \"dsrpool\"\nbackends = [\n");
        for b in 0..backends.max(1) {
            let _ = writeln!(
                c,
                "  {{ address = \"10.20.{}.{}\" }},",
                b / 253,
                2 + b % 253
            );
        }
        c.push_str("]\n");
    }
    if modes == Modes::All {
        let _ = write!(c, "[[listeners]]\nname = \"tunnel-tcp\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = {TUNNEL_PORT}\ngroup = \"tunnelpool\"\nforwarding = \"dsr\"\ndsr = \"ipip\"\ntunnel_source = \"10.20.0.1\"\nhealth_check = {{ type = \"tcp\", interval = \"300s\" }}\n");
        let snat: Vec<String> = (0..SNAT_ADDRESSES)
            .map(|k| format!("\"10.20.3.{}\"", 200 + k))
            .collect();
        let _ = write!(c, "[[listeners]]\nname = \"fullnat-tcp\"\nprotocol = \"tcp\"\nvip = \"10.99.0.10\"\nport = {FULLNAT_PORT}\ngroup = \"fullnatpool\"\nforwarding = \"fullnat\"\nsnat_addresses = [{}]\n", snat.join(", "));
        for (group, port) in [("tunnelpool", TUNNEL_PORT), ("fullnatpool", 9202)] {
            let _ = write!(c, "[[groups]]\nname = \"{group}\"\nbackends = [\n");
            for b in 0..backends.max(1) {
                let _ = writeln!(
                    c,
                    "  {{ address = \"10.20.{}.{}\", port = {port} }},",
                    b / 253,
                    2 + b % 253
                );
            }
            c.push_str("]\n");
        }
    }
    if !ipv6_listener {
        return c;
    }
    let vip6 = std::net::Ipv6Addr::from(VIP6);
    let _ = write!(c, "[[listeners]]\nname = \"ipv6-tcp\"\nprotocol = \"tcp\"\nvip = \"{vip6}\"\nport = 80\ngroup = \"ipv6pool\"\n[[groups]]\nname = \"ipv6pool\"\nbackends = [\n");
    for b in 0..backends.clamp(1, MAX_IPV6_BACKENDS) {
        let address = std::net::Ipv6Addr::from(u128::from_be_bytes(FIRST_IPV6_BACKEND) + b as u128);
        let _ = writeln!(c, "  {{ address = \"{address}\", port = 8080 }},");
    }
    c.push_str("]\n");
    c
}

/// A network namespace this thread can enter and leave (namespaces are per thread).
struct Netns(OwnedFd);

impl Netns {
    fn current() -> anyhow::Result<Netns> {
        let file = std::fs::File::open(format!("/proc/self/task/{}/ns/net", unsafe {
            libc::gettid()
        }))?;
        Ok(Netns(file.into()))
    }

    /// A new namespace, entered.
    fn fresh() -> anyhow::Result<Netns> {
        ensure!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        Netns::current()
    }

    fn enter(&self) -> anyhow::Result<()> {
        ensure!(
            unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) } == 0,
            "setns: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

/// A daemon serving a bench config, stopped (SIGTERM: detach, unpin) when dropped.
pub struct Daemon {
    child: Child,
    instance: String,
    dir: PathBuf,
}

impl Daemon {
    /// Starts `slb` (pinned to `cpu` when given) on `config` as instance `instance`, and waits
    /// until it serves; an exit before that is an error carrying the daemon's log.
    pub fn spawn(
        slb: &Path,
        instance: &str,
        config: &str,
        cpu: Option<usize>,
    ) -> anyhow::Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("slb-bench-{instance}"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("slb.toml");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join("slb.log"))?;
        let mut command = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(slb);
                c
            }
            None => Command::new(slb),
        };
        let child = command
            .args(["run", "-c"])
            .arg(&path)
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", slb.display()))?;
        // Dropped (stopped, its directory removed) on every way out but success.
        let mut daemon = Daemon {
            child,
            instance: instance.into(),
            dir,
        };
        let state = state_dir(instance).join("state.json");
        let started = Instant::now();
        while !state.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                let log = std::fs::read_to_string(daemon.dir.join("slb.log")).unwrap_or_default();
                bail!("{} exited ({status}) before serving:\n{log}", slb.display());
            }
            ensure!(
                started.elapsed() < Duration::from_secs(120),
                "{} did not serve within 120 s",
                slb.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// A subject's daemon for `shape`, on the daemons' CPU, whether it took the IPv6 listener,
    /// and whether it took the DSR listener.
    fn start(
        subject: &Subject,
        instance: &str,
        shape: Shape,
    ) -> anyhow::Result<(Daemon, bool, Modes)> {
        let mut modes = Modes::All;
        loop {
            match Self::start_with(subject, instance, shape, modes) {
                // An older revision does not know the later modes' keys, or `forwarding` at
                // all: measured without them, their rows empty.
                Err(e)
                    if modes == Modes::All
                        && (e.to_string().contains("unknown field `dsr`")
                            || e.to_string().contains("fullnat")) =>
                {
                    eprintln!(
                        "  {}: does not take the IP-in-IP or full NAT listeners; their rows stay empty",
                        subject.label
                    );
                    modes = Modes::Dsr;
                }
                Err(e)
                    if modes != Modes::NatOnly
                        && e.to_string().contains("unknown field `forwarding`") =>
                {
                    eprintln!(
                        "  {}: does not take the DSR listener; its DSR rows stay empty",
                        subject.label
                    );
                    modes = Modes::NatOnly;
                }
                started => return started.map(|(daemon, ipv6)| (daemon, ipv6, modes)),
            }
        }
    }

    /// [`start`](Self::start) with or without the DSR listener: the daemon, and whether it took
    /// the IPv6 listener.
    fn start_with(
        subject: &Subject,
        instance: &str,
        shape: Shape,
        modes: Modes,
    ) -> anyhow::Result<(Daemon, bool)> {
        let text = |max_connections, ipv6| {
            config(
                instance,
                shape.listeners,
                shape.backends,
                max_connections,
                ipv6,
                modes,
            )
        };
        let spawn = |text: &str| Daemon::spawn(&subject.slb, instance, text, Some(DAEMON_CPU));
        let mut max_connections = true;
        let with_ipv6 = match spawn(&text(max_connections, true)) {
            // An older revision may not know `max_connections` (its table had a fixed size).
            Err(e) if e.to_string().contains("unknown field `max_connections`") => {
                eprintln!(
                    "  {}: does not know max_connections; its connection table keeps its own size",
                    subject.label
                );
                max_connections = false;
                spawn(&text(max_connections, true))
            }
            other => other,
        };
        match with_ipv6 {
            Ok(daemon) => Ok((daemon, true)),
            // An older revision refuses IPv6 VIPs ("... are not supported yet"): measured on
            // IPv4, its IPv6 rows empty. Any other refusal is the config's fault, not the
            // revision's.
            Err(e) if !e.to_string().contains("not supported yet") => Err(e),
            Err(e) => match spawn(&text(max_connections, false)) {
                Ok(daemon) => {
                    eprintln!(
                        "  {}: does not take the IPv6 listener ({}); its IPv6 rows stay empty",
                        subject.label,
                        e.to_string().lines().next().unwrap_or("")
                    );
                    Ok((daemon, false))
                }
                Err(_) => Err(e),
            },
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn program(&self) -> anyhow::Result<Xdp> {
        let pin = pin_dir(&self.instance).join("prog");
        Xdp::from_pin(&pin, XdpAttachType::Interface)
            .with_context(|| format!("the program pinned at {}", pin.display()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The wrapper (this build's `xdp_replay` and `xdp_floor`, with maps of their own).
struct Wrapper {
    ebpf: Ebpf,
    _pins: tempfile::TempDir,
    /// Bytes of the frames runs send: the current template's.
    frame_bytes: usize,
}

impl Wrapper {
    fn load() -> anyhow::Result<Wrapper> {
        let pins = tempfile::Builder::new()
            .prefix("slb-bench-wrapper-")
            .tempdir_in("/sys/fs/bpf")?;
        let sizes = TableSizes {
            ring_size: 257,
            max_connections: 1024,
        };
        let mut ebpf = load_object(pins.path(), sizes)?;
        for name in ["xdp_replay", FLOOR_PROGRAM] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            slb_user::dataplane::load_xdp(program).with_context(|| format!("loading {name}"))?;
        }
        Ok(Wrapper {
            ebpf,
            _pins: pins,
            frame_bytes: REPLAY_FRAME_BYTES,
        })
    }

    fn floor(&self) -> anyhow::Result<ProgramFd> {
        let floor: &Xdp = self
            .ebpf
            .program(FLOOR_PROGRAM)
            .context("no floor program")?
            .try_into()?;
        Ok(floor.fd()?.try_clone()?)
    }

    fn set_target(&mut self, target: &ProgramFd) -> anyhow::Result<()> {
        let fd = target.try_clone()?;
        let mut slot: ProgramArray<_> = self
            .ebpf
            .map_mut("REPLAY_TARGET")
            .context("no REPLAY_TARGET")?
            .try_into()?;
        slot.set(0, &fd, 0)?;
        Ok(())
    }

    fn set_template(&mut self, template: ReplayTemplate) -> anyhow::Result<()> {
        let mut slot: Array<_, ReplayTemplate> = self
            .ebpf
            .map_mut("REPLAY_TEMPLATE")
            .context("no REPLAY_TEMPLATE")?
            .try_into()?;
        slot.set(0, template, 0)?;
        self.frame_bytes = template.sent_frame().len();
        Ok(())
    }

    /// Pins `xdp_replay` in the wrapper's directory, for threads that run it on their own.
    fn pin_replay(&mut self) -> anyhow::Result<PathBuf> {
        let path = self._pins.path().join("replay_prog");
        if !path.exists() {
            let replay: &mut Xdp = self
                .ebpf
                .program_mut("xdp_replay")
                .context("no xdp_replay")?
                .try_into()?;
            replay.pin(&path)?;
        }
        Ok(path)
    }

    /// Restarts the flow numbering (on every CPU).
    fn reset_flows(&mut self) -> anyhow::Result<()> {
        let mut counter: PerCpuArray<_, u32> = self
            .ebpf
            .map_mut("REPLAY_COUNTER")
            .context("no REPLAY_COUNTER")?
            .try_into()?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        counter.set(0, PerCpuValues::try_from(vec![0u32; cpus])?, 0)?;
        Ok(())
    }

    /// Runs the wrapper `repeat` times on the template as if it arrived on `ingress`: the
    /// kernel's mean time per run, and the frame as the last run left it.
    fn run(&self, ingress: u32, repeat: u32) -> anyhow::Result<(Duration, Vec<u8>)> {
        let replay: &Xdp = self
            .ebpf
            .program("xdp_replay")
            .context("no xdp_replay")?
            .try_into()?;
        run_replay(replay, ingress, repeat, self.frame_bytes)
    }
}

/// One BPF_PROG_TEST_RUN of `replay` on a frame of `frame_bytes` (the template's: the wrapper
/// restores the template itself, so the frame passed in is only its room): the kernel's mean
/// time per run and the frame the last run left.
fn run_replay(
    replay: &Xdp,
    ingress: u32,
    repeat: u32,
    frame_bytes: usize,
) -> anyhow::Result<(Duration, Vec<u8>)> {
    let frame = vec![0u8; frame_bytes];
    let ctx = xdp_md(frame_bytes, ingress);
    let mut out = vec![0u8; REPLAY_FRAME_BYTES + 256];
    let result = replay.test_run(TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.duration, out))
}

/// One subject set up for a shape: its namespace, daemon and program, and the rows.
struct Bench {
    subject: Subject,
    netns: Netns,
    _daemon: Daemon,
    /// The daemon's pinned program.
    program: ProgramFd,
    in_index: u32,
    out_index: u32,
    rows: Vec<Row>,
    /// The subject took the IPv6 listener (else its IPv6 rows are not measured).
    ipv6: bool,
    /// Whether the subject took the DSR listener (else its DSR rows stay empty).
    dsr: bool,
    /// Whether it took the IP-in-IP and full NAT listeners (else their rows stay empty).
    later_modes: bool,
    /// Per row, the ns above the baseline of each round; and the one-flow baselines.
    samples: Vec<Vec<f64>>,
    baselines: Vec<f64>,
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Bench {
    /// Sets up `subject` for `shape` in a namespace of its own (entered: the caller's thread is
    /// left in it), and fills the connection table.
    fn new(
        subject: &Subject,
        index: usize,
        shape: Shape,
        wrapper: &mut Wrapper,
    ) -> anyhow::Result<Bench> {
        let netns = Netns::fresh()?;
        setup_network()?;
        let instance = format!("bench-pp{index}-{}", std::process::id());
        let (daemon, ipv6, modes) = Daemon::start(subject, &instance, shape)?;
        let dsr = modes != Modes::NatOnly;
        let later_modes = modes == Modes::All;
        let program = daemon.program()?.fd()?.try_clone()?;
        let (in_index, out_index) = (ifindex("in0")?, ifindex("out0")?);
        let in_mac = mac_of("in0")?;
        let tcp = |src, sport, flags| {
            ipv4_frame(in_mac, CLIENT_MAC, src, VIP, L4Spec::tcp(sport, 80, flags))
        };
        let udp = |src| ipv4_frame(in_mac, CLIENT_MAC, src, VIP, L4Spec::udp(CLIENT_PORT, 53));
        let baseline = template(&tcp(CLIENT, CLIENT_PORT, TCP_ACK), 1, 1);

        wrapper.set_target(&program)?;
        wrapper.reset_flows()?;
        if shape.prefill > 0 {
            // Two packets per flow: the second moves a TCP flow from the half-open table in.
            wrapper.set_template(template(&tcp(PREFILL_BASE, 0, TCP_ACK), shape.prefill, 2))?;
            wrapper.run(in_index, shape.prefill * 2)?;
        }
        // The established single flows, and the backend the TCP one went to, for the reply.
        wrapper.set_template(baseline)?;
        let (_, first) = wrapper.run(in_index, 2)?;
        let backend = parse_ipv4_frame(&first).map_err(anyhow::Error::msg)?;
        ensure!(
            backend.dst != VIP,
            "{}: the established TCP flow was not balanced",
            subject.label
        );
        wrapper.set_template(template(&udp(CLIENT), 1, 1))?;
        wrapper.run(in_index, 2)?;
        let reply = ipv4_frame(
            mac_of("out0")?,
            BACKEND_MAC,
            backend.dst,
            CLIENT,
            L4Spec::tcp(backend.dst_port, CLIENT_PORT, TCP_ACK),
        );
        // The IPv6 twins: the established flow, and the backend it went to for the reply.
        let tcp6 = |src, sport, dport, flags| {
            ipv6_frame(
                in_mac,
                CLIENT_MAC,
                src,
                VIP6,
                L4Spec::tcp(sport, dport, flags),
            )
        };
        let baseline6 = template(&tcp6(CLIENT6, CLIENT_PORT, 80, TCP_ACK), 1, 1);
        // Without the IPv6 listener the rows stay (for the tables' sake) but are not measured,
        // and the reply comes from the first IPv6 backend.
        let (backend6, backend6_port) = if ipv6 {
            wrapper.set_template(baseline6)?;
            let (_, first6) = wrapper.run(in_index, 2)?;
            let backend6 = parse_ipv6_frame(&first6).map_err(anyhow::Error::msg)?;
            ensure!(
                backend6.dst != VIP6,
                "{}: the established IPv6 TCP flow was not balanced",
                subject.label
            );
            (backend6.dst, backend6.dst_port)
        } else {
            (FIRST_IPV6_BACKEND, 8080)
        };
        // The DSR listener's established flow.
        let dsr_tcp = |src, flags| {
            ipv4_frame(
                in_mac,
                CLIENT_MAC,
                src,
                VIP,
                L4Spec::tcp(CLIENT_PORT, DSR_PORT, flags),
            )
        };
        let dsr_established = template(&dsr_tcp(CLIENT, TCP_ACK), 1, 1);
        if dsr {
            wrapper.set_template(dsr_established)?;
            let (_, first) = wrapper.run(in_index, 2)?;
            let sent = parse_ipv4_frame(&first).map_err(anyhow::Error::msg)?;
            ensure!(
                sent.dst == VIP && sent.dst_mac == BACKEND_MAC,
                "{}: the DSR flow did not go unchanged to a backend's MAC address",
                subject.label
            );
        }
        // The IP-in-IP and full NAT listeners' established flows, and the full NAT reply.
        let port_tcp = |src, port, flags| {
            ipv4_frame(
                in_mac,
                CLIENT_MAC,
                src,
                VIP,
                L4Spec::tcp(CLIENT_PORT, port, flags),
            )
        };
        let tunnel_established = template(&port_tcp(CLIENT, TUNNEL_PORT, TCP_ACK), 1, 1);
        let fullnat_established = template(&port_tcp(CLIENT, FULLNAT_PORT, TCP_ACK), 1, 1);
        let mut fullnat_reply = template(&reply, 1, 1);
        if later_modes {
            wrapper.set_template(tunnel_established)?;
            let (_, first) = wrapper.run(in_index, 2)?;
            ensure!(
                first.len() > 34 && first[23] == 4,
                "{}: the IP-in-IP flow was not encapsulated",
                subject.label
            );
            wrapper.set_template(fullnat_established)?;
            let (_, first) = wrapper.run(in_index, 2)?;
            let sent = parse_ipv4_frame(&first).map_err(anyhow::Error::msg)?;
            ensure!(
                sent.dst != VIP && sent.src != CLIENT,
                "{}: the full NAT flow was not translated both ways",
                subject.label
            );
            fullnat_reply = template(
                &ipv4_frame(
                    mac_of("out0")?,
                    BACKEND_MAC,
                    sent.dst,
                    sent.src,
                    L4Spec::tcp(sent.dst_port, sent.src_port, TCP_ACK),
                ),
                1,
                1,
            );
        }
        let reply6 = ipv6_frame(
            mac_of("out0")?,
            BACKEND_MAC,
            backend6,
            CLIENT6,
            L4Spec::tcp(backend6_port, CLIENT_PORT, TCP_ACK),
        );
        let rows = vec![
            Row {
                name: "established TCP, one flow",
                template: baseline,
                ingress: Ingress::Clients,
            },
            Row {
                name: "established TCP, 65 536 flows",
                template: template(&tcp(CYCLED_TCP_BASE, 0, TCP_ACK), CYCLED_FLOWS, 1),
                ingress: Ingress::Clients,
            },
            Row {
                name: "established UDP, one flow",
                template: template(&udp(CLIENT), 1, 1),
                ingress: Ingress::Clients,
            },
            Row {
                name: "established UDP, 65 536 flows",
                template: template(&udp(CYCLED_UDP_BASE), CYCLED_FLOWS, 1),
                ingress: Ingress::Clients,
            },
            Row {
                name: "new flow (SYN)",
                template: template(&tcp(NEW_FLOW_BASE, 0, TCP_SYN), REPLAY_EVERY_RUN_NEW, 1),
                ingress: Ingress::Clients,
            },
            Row {
                name: "new flow, first two packets (mean; the second enters the connection table)",
                template: template(
                    &tcp(NEW_FLOW_PAIRS_BASE, 0, TCP_ACK),
                    REPLAY_EVERY_RUN_NEW,
                    2,
                ),
                ingress: Ingress::Clients,
            },
            Row {
                name: "reply (backend to client)",
                template: template(&reply, 1, 1),
                ingress: Ingress::Backends,
            },
            Row {
                name: "not for a listener",
                template: template(
                    &ipv4_frame(
                        in_mac,
                        CLIENT_MAC,
                        CLIENT,
                        VIP,
                        L4Spec::tcp(CLIENT_PORT, 22, TCP_SYN),
                    ),
                    1,
                    1,
                ),
                ingress: Ingress::Clients,
            },
            Row {
                name: "DSR: established TCP, one flow",
                template: dsr_established,
                ingress: Ingress::Clients,
            },
            Row {
                name: "DSR: new flow (SYN)",
                template: template(&dsr_tcp(NEW_FLOW_BASE, TCP_SYN), REPLAY_EVERY_RUN_NEW, 1),
                ingress: Ingress::Clients,
            },
            Row {
                name: "DSR IP-in-IP: established TCP, one flow",
                template: tunnel_established,
                ingress: Ingress::Clients,
            },
            Row {
                name: "DSR IP-in-IP: new flow (SYN)",
                template: template(
                    &port_tcp(NEW_FLOW_BASE, TUNNEL_PORT, TCP_SYN),
                    REPLAY_EVERY_RUN_NEW,
                    1,
                ),
                ingress: Ingress::Clients,
            },
            Row {
                name: "Full NAT: established TCP, one flow",
                template: fullnat_established,
                ingress: Ingress::Clients,
            },
            Row {
                name: "Full NAT: new flow (SYN)",
                template: template(
                    &port_tcp(NEW_FLOW_BASE, FULLNAT_PORT, TCP_SYN),
                    REPLAY_EVERY_RUN_NEW,
                    1,
                ),
                ingress: Ingress::Clients,
            },
            Row {
                name: "Full NAT: reply (backend to client)",
                template: fullnat_reply,
                ingress: Ingress::Backends,
            },
            Row {
                name: "IPv6: established TCP, one flow",
                template: baseline6,
                ingress: Ingress::Clients,
            },
            Row {
                name: "IPv6: new flow (SYN)",
                template: template(
                    &tcp6(NEW_FLOW6_BASE, 0, 80, TCP_SYN),
                    REPLAY_EVERY_RUN_NEW,
                    1,
                ),
                ingress: Ingress::Clients,
            },
            Row {
                name: "IPv6: reply (backend to client)",
                template: template(&reply6, 1, 1),
                ingress: Ingress::Backends,
            },
            Row {
                name: "IPv6: not for a listener",
                template: template(&tcp6(CLIENT6, CLIENT_PORT, 22, TCP_SYN), 1, 1),
                ingress: Ingress::Clients,
            },
        ];
        // Establish the cycled flows as clients do: two packets each in a row (a TCP flow's
        // first packet waits in the half-open table, its second enters the connection table).
        for row in rows.iter().filter(|r| r.template.flows == CYCLED_FLOWS) {
            wrapper.reset_flows()?;
            wrapper.set_template(ReplayTemplate {
                packets_per_flow: 2,
                ..row.template
            })?;
            wrapper.run(in_index, CYCLED_FLOWS * 2)?;
        }
        let samples = vec![Vec::new(); rows.len()];
        Ok(Bench {
            subject: subject.clone(),
            netns,
            _daemon: daemon,
            program,
            in_index,
            out_index,
            rows,
            ipv6,
            dsr,
            later_modes,
            samples,
            baselines: Vec::new(),
        })
    }

    fn run_row(
        &self,
        wrapper: &mut Wrapper,
        target: &ProgramFd,
        template: ReplayTemplate,
        ingress: Ingress,
    ) -> anyhow::Result<f64> {
        wrapper.set_target(target)?;
        wrapper.set_template(template)?;
        let ingress = match ingress {
            Ingress::Clients => self.in_index,
            Ingress::Backends => self.out_index,
        };
        Ok(wrapper.run(ingress, REPEAT)?.0.as_nanos() as f64)
    }

    /// Removes the full NAT mappings of the subject's daemon but the established row's, which
    /// the reply row's frame is addressed to.
    fn empty_snat_table(&self) -> anyhow::Result<()> {
        let data =
            aya::maps::MapData::from_pin(pin_dir(&self._daemon.instance).join("SNAT_MAPPINGS"))?;
        let mut map: aya::maps::HashMap<_, slb_common::FlowKey, slb_common::SnatMapping> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
        let keys: Vec<slb_common::FlowKey> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, m)| !(m.client_port == CLIENT_PORT && m.vip_port == FULLNAT_PORT))
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// One round: per row, its baseline (the wrapper doing the same work on the same template,
    /// then the floor program), the row, the baseline again.
    fn round(&mut self, wrapper: &mut Wrapper, floor: &ProgramFd) -> anyhow::Result<()> {
        self.netns.enter()?;
        for i in 0..self.rows.len() {
            let row = self.rows[i].clone();
            if (row.is_ipv6() && !self.ipv6)
                || (row.is_dsr() && !self.dsr)
                || (row.is_later_mode() && !self.later_modes)
            {
                continue;
            }
            let before = self.run_row(wrapper, floor, row.template, row.ingress)?;
            if row.claims_snat_mappings() {
                self.empty_snat_table()?;
            }
            let ns = self.run_row(wrapper, &self.program, row.template, row.ingress)?;
            let after = self.run_row(wrapper, floor, row.template, row.ingress)?;
            self.samples[i].push(ns - (before + after) / 2.0);
            if row.template.flows <= 1 && !row.is_ipv6() && !row.is_dsr() && !row.is_later_mode() {
                self.baselines.extend([before, after]);
            }
        }
        Ok(())
    }
}

/// Runs the pinned wrapper on `cpu` inside `netns`, `times` times: the median mean per run.
fn run_on_cpu(
    replay_pin: &Path,
    netns: &OwnedFd,
    cpu: usize,
    (ingress, frame_bytes): (u32, usize),
    times: usize,
    start: &std::sync::Barrier,
) -> anyhow::Result<f64> {
    pin_to_cpu(cpu)?;
    Netns(netns.try_clone()?).enter()?;
    let replay = Xdp::from_pin(replay_pin, XdpAttachType::Interface)?;
    let mut samples = Vec::new();
    for _ in 0..times {
        start.wait();
        let (duration, _) = run_replay(&replay, ingress, REPEAT, frame_bytes)?;
        samples.push(duration.as_nanos() as f64);
    }
    Ok(quartiles(&samples).0)
}

impl Bench {
    /// The wrapper's mean per run of `template` on `target`: on CPU `MEASURE_CPU` alone, and
    /// on each of both CPUs at once (the mean of the two).
    fn alone_and_both(
        &self,
        wrapper: &mut Wrapper,
        target: &ProgramFd,
        template: ReplayTemplate,
    ) -> anyhow::Result<(f64, f64)> {
        const TIMES: usize = 5;
        wrapper.set_target(target)?;
        wrapper.set_template(template)?;
        let frame_bytes = wrapper.frame_bytes;
        let pin = wrapper.pin_replay()?;
        let alone_start = std::sync::Barrier::new(1);
        let both_start = std::sync::Barrier::new(2);
        std::thread::scope(|scope| -> anyhow::Result<(f64, f64)> {
            let alone = scope
                .spawn(|| {
                    run_on_cpu(
                        &pin,
                        &self.netns.0,
                        MEASURE_CPU,
                        (self.in_index, frame_bytes),
                        TIMES,
                        &alone_start,
                    )
                })
                .join()
                .expect("measuring thread")?;
            let both: Vec<_> = [DAEMON_CPU, MEASURE_CPU]
                .into_iter()
                .map(|cpu| {
                    let (pin, netns, start) = (&pin, &self.netns.0, &both_start);
                    scope.spawn(move || {
                        run_on_cpu(pin, netns, cpu, (self.in_index, frame_bytes), TIMES, start)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().expect("measuring thread"))
                .collect::<anyhow::Result<_>>()?;
            Ok((alone, both.iter().sum::<f64>() / both.len() as f64))
        })
    }

    /// How a row's cost (above its baseline) changes when both CPUs run it at once, each with
    /// flows of its own (only rows that cycle through flows: one flow would be one CPU's).
    fn scaling(
        &self,
        wrapper: &mut Wrapper,
        floor: &ProgramFd,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        self.netns.enter()?;
        let mut out = Vec::new();
        for row in self
            .rows
            .iter()
            // The full NAT new-flow row claims a mapping per run; on two CPUs with no emptying
            // between runs it would fill the SNAT table and measure exhaustion.
            .filter(|r| r.template.flows > 1 && !r.is_ipv6() && !r.claims_snat_mappings())
        {
            if row.template.flows == CYCLED_FLOWS {
                // Establish the other CPU's flows (the setup established this CPU's).
                wrapper.set_target(&self.program)?;
                wrapper.reset_flows()?;
                let warm = ReplayTemplate {
                    packets_per_flow: 2,
                    ..row.template
                };
                wrapper.set_template(warm)?;
                let pin = wrapper.pin_replay()?;
                let start = std::sync::Barrier::new(1);
                std::thread::scope(|scope| {
                    scope
                        .spawn(|| {
                            run_on_cpu(
                                &pin,
                                &self.netns.0,
                                DAEMON_CPU,
                                (self.in_index, wrapper.frame_bytes),
                                3,
                                &start,
                            )
                        })
                        .join()
                        .expect("warming thread")
                })?;
            }
            let (row_alone, row_both) =
                self.alone_and_both(wrapper, &self.program, row.template)?;
            let (floor_alone, floor_both) = self.alone_and_both(wrapper, floor, row.template)?;
            let (alone, both) = (row_alone - floor_alone, row_both - floor_both);
            out.push(json!({
                "packet": row.name,
                "one_cpu_ns": alone,
                "both_cpus_ns": both,
                "scaling": 2.0 * alone / both,
            }));
        }
        Ok(out)
    }
}

/// Median and quartiles (NaN of no samples: a row the subject could not run).
fn quartiles(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.25), at(0.75))
}

/// Measures every subject on `shape` over `rounds` rounds; the caller's thread is left in a
/// namespace of the measurement (call it from a thread of its own).
pub fn measure(
    shape: Shape,
    subjects: &[Subject],
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let home = Netns::current()?;
    pin_to_cpu(MEASURE_CPU)?;
    let mut wrapper = Wrapper::load()?;
    let floor = wrapper.floor()?;
    let mut benches = Vec::new();
    for (i, subject) in subjects.iter().enumerate() {
        eprintln!(
            "  {}: setting up {} ({})",
            shape.label,
            subject.label,
            subject.slb.display()
        );
        benches.push(Bench::new(subject, i, shape, &mut wrapper)?);
    }
    for _ in 0..rounds {
        for bench in &mut benches {
            bench.round(&mut wrapper, &floor)?;
        }
    }
    let mut scaling = Vec::new();
    for bench in &benches {
        scaling.push(if shape.scaling {
            bench.scaling(&mut wrapper, &floor)?
        } else {
            Vec::new()
        });
    }
    let subjects_json: Vec<_> = benches
        .iter()
        .zip(scaling)
        .map(|(b, scaling)| {
            let (baseline, ..) = quartiles(&b.baselines);
            // The full NAT new-flow row claims a mapping per run: had the table filled, the
            // row would have measured the exhaustion path instead.
            let exhausted = slb_user::maps::CounterMaps::open(&pin_dir(&b._daemon.instance))
                .ok()
                .and_then(|c| c.global().ok())
                .map_or(0, |g| g.snat_ports_exhausted);
            if exhausted > 0 {
                eprintln!(
                    "  {}: {exhausted} full NAT flows found no SNAT port: the full NAT new-flow row is not the claim's cost",
                    b.subject.label
                );
            }
            let rows: Vec<_> = b
                .rows
                .iter()
                .zip(&b.samples)
                .map(|(row, samples)| {
                    let (median, p25, p75) = quartiles(samples);
                    json!({"packet": row.name, "ns_above_baseline": median, "p25": p25, "p75": p75})
                })
                .collect();
            json!({"subject": b.subject.label, "baseline_ns": baseline, "rows": rows, "scaling": scaling, "snat_ports_exhausted": exhausted})
        })
        .collect();
    // Stop the daemons inside their namespaces' lifetime, then come home.
    drop(benches);
    home.enter()?;
    Ok(json!({
        "tables": shape.label,
        "listeners": shape.listeners,
        "backends": shape.backends,
        "connections_prefilled": shape.prefill,
        "rounds": rounds,
        "repeat": REPEAT,
        "subjects": subjects_json,
    }))
}

/// The markdown table of one shape: ns above the baseline per subject, and the ratio to the
/// first subject when there are two.
pub fn markdown(result: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let subjects = result["subjects"].as_array().cloned().unwrap_or_default();
    let mut md = format!(
        "### {}\n\n| packet |",
        result["tables"].as_str().unwrap_or("")
    );
    for s in &subjects {
        let _ = write!(
            md,
            " {} (ns above baseline, p25–p75) |",
            s["subject"].as_str().unwrap_or("")
        );
    }
    if subjects.len() == 2 {
        md.push_str(" ratio |");
    }
    md.push_str("\n|---|");
    for _ in 0..subjects.len() + usize::from(subjects.len() == 2) {
        md.push_str("---:|");
    }
    md.push('\n');
    let rows = subjects
        .first()
        .and_then(|s| s["rows"].as_array().cloned())
        .unwrap_or_default();
    for (i, row) in rows.iter().enumerate() {
        let _ = write!(md, "| {} |", row["packet"].as_str().unwrap_or(""));
        let mut medians = Vec::new();
        for s in &subjects {
            let r = &s["rows"][i];
            let median = r["ns_above_baseline"].as_f64().unwrap_or(f64::NAN);
            medians.push(median);
            let _ = write!(
                md,
                " {:.0} ({:.0}–{:.0}) |",
                median,
                r["p25"].as_f64().unwrap_or(f64::NAN),
                r["p75"].as_f64().unwrap_or(f64::NAN)
            );
        }
        if medians.len() == 2 {
            let _ = write!(md, " {:.2} |", medians[0] / medians[1]);
        }
        md.push('\n');
    }
    let _ = write!(
        md,
        "| *baseline: wrapper + floor program, one flow, absolute ns* |"
    );
    for s in &subjects {
        let _ = write!(
            md,
            " {:.0} |",
            s["baseline_ns"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if subjects.len() == 2 {
        md.push_str(" |");
    }
    md.push_str("\n\n");
    for s in &subjects {
        let rows = s["scaling"].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "{}, one CPU alone and both CPUs at once (each CPU its own flows; ns above the \
             baseline measured the same way):\n\n| packet | one CPU | each of 2 CPUs | 1 → 2 CPUs |\n|---|---:|---:|---:|",
            s["subject"].as_str().unwrap_or("")
        );
        for r in rows {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | ×{:.2} |",
                r["packet"].as_str().unwrap_or(""),
                r["one_cpu_ns"].as_f64().unwrap_or(f64::NAN),
                r["both_cpus_ns"].as_f64().unwrap_or(f64::NAN),
                r["scaling"].as_f64().unwrap_or(f64::NAN)
            );
        }
        md.push('\n');
    }
    md
}
