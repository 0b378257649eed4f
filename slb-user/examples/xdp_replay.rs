//! Capacity benchmark driver (`cargo xtask bench --suites capacity` runs it): pushes one frame,
//! over and over, into an interface with BPF_PROG_TEST_RUN in live-frames mode, the kernel's
//! built-in packet generator, and reports how long each frame took on this CPU.
//!
//! `--target slb` hands each frame to slb's XDP program, loaded against the maps a running
//! instance pinned (so it sees that instance's listeners, backends and connection table), whose
//! XDP_REDIRECT then really transmits it. `--target stack` passes each frame to the kernel
//! stack as if it had arrived on the interface (forwarding, conntrack, nftables). Either way the
//! frame goes through `xdp_replay`, which restores the template first: live-frames mode does
//! not undo what a NAT program rewrote.
//!
//! Run it inside the balancer's network namespace, pinned to the CPU to measure.

use std::net::SocketAddrV4;
use std::path::PathBuf;

use anyhow::Context as _;
use aya::maps::{Array, ProgramArray};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};
use clap::{Parser, ValueEnum};
use slb_common::wire::{ipv4_frame, L4Spec};
use slb_common::ReplayTemplate;
use slb_user::dataplane::{load_object, load_programs, TableSizes, PROGRAM_NAME};
use slb_user::testbed::{ifindex, mac_of, xdp_md};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// slb's XDP program, on the maps of a running instance (`--pins`).
    Slb,
    /// The kernel stack (XDP_PASS).
    Stack,
}

#[derive(Debug, Parser)]
#[command(about = "Push frames through an interface with BPF_PROG_TEST_RUN live frames")]
struct Args {
    /// Network namespace to work in (entered with setns, so /sys/fs/bpf stays the host's).
    #[arg(long)]
    netns: Option<String>,
    #[arg(long, value_enum)]
    target: Target,
    /// The interface the frames arrive on (its MAC is the frame's destination).
    #[arg(long)]
    iface: String,
    /// Source MAC of the frames (the sender on the other end of the interface).
    #[arg(long)]
    src_mac: String,
    /// UDP source and destination of the frames.
    #[arg(long)]
    src: SocketAddrV4,
    #[arg(long)]
    dst: SocketAddrV4,
    /// A new source port for every frame (a new flow each), instead of one flow.
    #[arg(long)]
    new_flows: bool,
    /// The running instance's pin directory (/sys/fs/bpf/slb/<instance>), for `--target slb`.
    #[arg(long)]
    pins: Option<PathBuf>,
    /// The instance's Maglev ring size.
    #[arg(long, default_value_t = slb_common::DEFAULT_RING_SIZE)]
    ring_size: u32,
    /// Frames to push.
    #[arg(long, default_value_t = 2_000_000)]
    frames: u32,
    /// Frames per batch inside the kernel.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Start pushing at this time (milliseconds since the Unix epoch), once loaded: several
    /// drivers on several CPUs then push at the same time.
    #[arg(long)]
    start_at_unix_ms: Option<u64>,
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{text:?} is not a MAC address"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{text:?} is not a MAC address"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(netns) = &args.netns {
        slb_user::cli::enter_netns(netns).with_context(|| format!("entering netns {netns}"))?;
    }
    let own_pins;
    let pins = match (&args.pins, args.target) {
        (Some(dir), _) => dir.clone(),
        (None, Target::Stack) => {
            // Nothing is shared: the maps only have to exist somewhere for the object to load.
            own_pins = tempfile::Builder::new()
                .prefix("slb-replay-")
                .tempdir_in("/sys/fs/bpf")
                .context("a temporary pin directory under /sys/fs/bpf")?;
            own_pins.path().to_owned()
        }
        (None, Target::Slb) => anyhow::bail!("--target slb needs --pins of a running instance"),
    };
    let sizes = match &args.pins {
        // A running instance's maps are reused as pinned: take their sizes.
        Some(_) => TableSizes::from_pins(&pins)?,
        None => TableSizes {
            ring_size: args.ring_size,
            max_connections: slb_common::DEFAULT_MAX_CONNECTIONS,
        },
    };
    let mut ebpf = load_object(&pins, sizes)?;
    load_programs(&mut ebpf).context("loading the data plane's programs")?;
    let replay: &mut Xdp = ebpf
        .program_mut("xdp_replay")
        .context("no program xdp_replay")?
        .try_into()?;
    replay.load().context("loading xdp_replay")?;
    if args.target == Target::Slb {
        let slb: &Xdp = ebpf
            .program(PROGRAM_NAME)
            .context("no slb program")?
            .try_into()?;
        let fd = slb.fd()?.try_clone()?;
        let mut target: ProgramArray<_> = ebpf
            .map_mut("REPLAY_TARGET")
            .context("no REPLAY_TARGET map")?
            .try_into()?;
        target.set(0, &fd, 0)?;
    }

    let udp = L4Spec {
        zero_udp_checksum: true,
        ..L4Spec::udp(args.src.port(), args.dst.port())
    };
    let frame = ipv4_frame(
        mac_of(&args.iface)?,
        parse_mac(&args.src_mac)?,
        args.src.ip().octets(),
        args.dst.ip().octets(),
        udp,
    );
    let flows = if args.new_flows {
        slb_common::REPLAY_EVERY_RUN_NEW
    } else {
        1
    };
    let template = ReplayTemplate::new(&frame, flows, 1).map_err(anyhow::Error::msg)?;
    let frame_bytes = template.sent_frame().to_vec();
    let mut templates: Array<_, ReplayTemplate> = ebpf
        .map_mut("REPLAY_TEMPLATE")
        .context("no REPLAY_TEMPLATE map")?
        .try_into()?;
    templates.set(0, template, 0)?;

    let ingress = ifindex(&args.iface)?;
    let ctx = xdp_md(frame_bytes.len(), ingress);
    let replay: &Xdp = ebpf
        .program("xdp_replay")
        .context("no xdp_replay")?
        .try_into()?;
    if let Some(at) = args.start_at_unix_ms {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at);
        if let Ok(wait) = at.duration_since(std::time::SystemTime::now()) {
            std::thread::sleep(wait);
        }
    }
    let started = std::time::Instant::now();
    let result = replay
        .test_run(TestRunOptions {
            data_in: Some(&frame_bytes),
            ctx_in: Some(&ctx),
            repeat: args.frames,
            attrs: TestRunAttrs::new().xdp_live_frames(args.batch),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN in live-frames mode")?;
    let wall = started.elapsed();
    let ns_per_frame = wall.as_nanos() as f64 / f64::from(args.frames);
    println!(
        "{}",
        serde_json::json!({
            "target": format!("{:?}", args.target),
            "new_flows": args.new_flows,
            "frames": args.frames,
            "seconds": wall.as_secs_f64(),
            "ns_per_frame": ns_per_frame,
            "kernel_ns_per_frame": result.duration.as_nanos() as f64,
            "frames_per_second": 1e9 / ns_per_frame,
        })
    );
    Ok(())
}
