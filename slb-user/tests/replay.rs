//! The benchmarks' frame driver (`xdp_replay`) run through BPF_PROG_TEST_RUN: every template
//! frame it restores and moves to another flow, IPv4 and IPv6, TCP and UDP, is still a valid
//! frame (checksums included) of the flow `replay_flow` names. Needs root, like the packet tests.

use aya::maps::{Array, PerCpuArray, PerCpuValues};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use slb_common::wire::{
    ipv4_frame, ipv6_frame, parse_ipv4_frame, parse_ipv6_frame, L4Spec, TCP_ACK, TCP_SYN,
};
use slb_common::{replay_flow, ReplayTemplate, REPLAY_EVERY_RUN_NEW, REPLAY_PORTS_PER_ADDRESS};
use slb_user::dataplane::{load_object, TableSizes};
use slb_user::testbed::{in_fresh_netns, xdp_md, CLIENT_MAC};

const XDP_PASS: u32 = 2;
const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const CLIENT4: [u8; 4] = [10, 10, 0x12, 0xff];
const VIP4: [u8; 4] = [10, 99, 0, 10];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe];
const VIP6: [u8; 16] = [0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
/// Runs per template, from this flow on: the last two ports of the first source address, then
/// the first two of the next (the address changes too).
const RUNS: u32 = 4;
const FIRST_FLOW: u32 = REPLAY_PORTS_PER_ADDRESS - 2;
/// The CPU the runs are pinned to: the driver numbers flows per CPU.
const CPU: u32 = 0;

/// The source port and address of a frame, and whether its checksums are right (the parsers
/// check them).
fn flow_of(frame: &[u8]) -> (u16, Vec<u8>) {
    let invalid = |e: String| -> ! { panic!("{e}: {frame:02x?}") };
    if frame[12..14] == [0x86, 0xdd] {
        let p = parse_ipv6_frame(frame).unwrap_or_else(|e| invalid(e));
        (p.src_port, p.src.to_vec())
    } else {
        let p = parse_ipv4_frame(frame).unwrap_or_else(|e| invalid(e));
        (p.src_port, p.src.to_vec())
    }
}

/// `address` with `addend` added to its low 16 bits (as the driver does: no carry beyond them).
fn with_low_addend(address: &[u8], addend: u16) -> Vec<u8> {
    let mut a = address.to_vec();
    let n = a.len();
    let low = u16::from_be_bytes([a[n - 2], a[n - 1]]).wrapping_add(addend);
    a[n - 2..].copy_from_slice(&low.to_be_bytes());
    a
}

#[test]
fn replayed_flows_are_valid_frames_of_both_families() {
    in_fresh_netns(|| {
        pin_to_cpu(CPU);
        let pins = tempfile::Builder::new()
            .prefix("slb-replay-test-")
            .tempdir_in("/sys/fs/bpf")
            .expect("a pin directory under /sys/fs/bpf (root?)");
        let sizes = TableSizes {
            ring_size: 257,
            max_connections: 1024,
        };
        let mut ebpf = load_object(pins.path(), sizes).expect("the object loads");
        let replay: &mut Xdp = ebpf
            .program_mut("xdp_replay")
            .expect("xdp_replay")
            .try_into()
            .unwrap();
        replay.load().expect("the verifier accepts xdp_replay");
        let frames = [
            ipv4_frame(
                DST_MAC,
                CLIENT_MAC,
                CLIENT4,
                VIP4,
                L4Spec::tcp(1, 80, TCP_ACK),
            ),
            ipv4_frame(DST_MAC, CLIENT_MAC, CLIENT4, VIP4, L4Spec::udp(1, 53)),
            ipv4_frame(
                DST_MAC,
                CLIENT_MAC,
                CLIENT4,
                VIP4,
                L4Spec {
                    zero_udp_checksum: true,
                    ..L4Spec::udp(1, 53)
                },
            ),
            ipv6_frame(
                DST_MAC,
                CLIENT_MAC,
                CLIENT6,
                VIP6,
                L4Spec::tcp(1, 80, TCP_SYN),
            ),
            ipv6_frame(DST_MAC, CLIENT_MAC, CLIENT6, VIP6, L4Spec::udp(1, 53)),
        ];
        for frame in &frames {
            let template = ReplayTemplate::new(frame, REPLAY_EVERY_RUN_NEW, 1).unwrap();
            {
                let mut slot: Array<_, ReplayTemplate> =
                    ebpf.map_mut("REPLAY_TEMPLATE").unwrap().try_into().unwrap();
                slot.set(0, template, 0).unwrap();
            }
            let sent = template.sent_frame();
            let ctx = xdp_md(sent.len(), 1);
            start_flows_at(&mut ebpf, FIRST_FLOW);
            let replay: &Xdp = ebpf.program("xdp_replay").unwrap().try_into().unwrap();
            for flow in FIRST_FLOW..FIRST_FLOW + RUNS {
                let mut out = vec![0u8; sent.len() + 256];
                // The frame passed in is only room: the driver writes the template into it.
                let result = replay
                    .test_run(TestRunOptions {
                        data_in: Some(&vec![0u8; sent.len()]),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        repeat: 1,
                        ..Default::default()
                    })
                    .unwrap();
                assert_eq!(result.return_value, XDP_PASS, "no target: to the stack");
                out.truncate(result.data_size_out as usize);
                assert_eq!(out.len(), sent.len(), "the frame keeps its length");
                let (port, address) = replay_flow(flow, CPU);
                assert_eq!(
                    flow_of(&out),
                    (port, with_low_addend(&flow_of(frame).1, address)),
                    "flow {flow} of {frame:02x?}"
                );
            }
        }
    });
}

/// Sets the driver's run counter (the next run replays flow `first`, on every CPU).
fn start_flows_at(ebpf: &mut aya::Ebpf, first: u32) {
    let mut counter: PerCpuArray<_, u32> =
        ebpf.map_mut("REPLAY_COUNTER").unwrap().try_into().unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    counter
        .set(0, PerCpuValues::try_from(vec![first; cpus]).unwrap(), 0)
        .unwrap();
}

fn pin_to_cpu(cpu: u32) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}
