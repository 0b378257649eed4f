//! `slb attach` and `slb detach` put a running instance's program on one more interface and
//! take it off again; both refuse what makes no sense with a clear error.

use std::path::Path;

use slb_tests::slb::{slb_binary, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::{require_root, vip_tcp, SlbConfig, SlbDaemon, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
/// A veth pair created inside the slb namespace for the test.
const EXTRA: &str = "xa0";
const EXTRA_PEER: &str = "xa1";

/// `ip -n <ns> link show <iface>`.
fn link_show(topo: &Topology, iface: &str) -> String {
    topo.exec_in(topo.slb_ns(), ["ip", "link", "show", iface])
        .expect("ip link show")
}

/// `ip link` shows an attached XDP program as a mode flag (`xdp`, `xdpgeneric`, ...) and a
/// `prog/xdp id N` line.
fn has_xdp(link: &str) -> bool {
    link.contains("xdp")
}

fn traffic_flows(topo: &Topology, when: &str) {
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(30))
        .expect("run TCP connections");
    assert!(
        report.failures.is_empty() && report.answered() == 30,
        "{}",
        report.summary(when)
    );
}

#[test]
fn attach_and_detach_commands() {
    require_root("attach_and_detach_commands");
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("att")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("att"), &[1, 1]);
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let instance = daemon.instance().to_owned();

    topo.exec_in(
        topo.slb_ns(),
        [
            "ip", "link", "add", EXTRA, "type", "veth", "peer", "name", EXTRA_PEER,
        ],
    )
    .expect("create a veth pair in the slb namespace");
    for iface in [EXTRA, EXTRA_PEER] {
        topo.exec_in(topo.slb_ns(), ["ip", "link", "set", iface, "up"])
            .expect("set the veth up");
    }
    assert!(
        !has_xdp(&link_show(&topo, EXTRA)),
        "{EXTRA} has XDP before the attach"
    );

    // Attach.
    let out = daemon
        .cli([
            "attach", "-i", &instance, "--iface", EXTRA, "--mode", "generic",
        ])
        .expect("run slb attach");
    out.expect_success().expect("slb attach");
    let link = link_show(&topo, EXTRA);
    println!("after attach: {}", link.trim());
    assert!(
        link.contains("xdpgeneric") && link.contains("prog/xdp"),
        "ip link shows no generic XDP program on {EXTRA}:\n{link}"
    );

    // Attaching again is refused.
    let again = daemon
        .cli([
            "attach", "-i", &instance, "--iface", EXTRA, "--mode", "generic",
        ])
        .expect("run slb attach");
    println!("second attach: {}", again.error_summary());
    assert!(!again.success(), "a second attach succeeded:\n{again}");
    assert!(
        again.stderr.contains("already attached") && again.stderr.contains(EXTRA),
        "the second attach's error should say {EXTRA} is already attached:\n{again}"
    );
    assert!(
        has_xdp(&link_show(&topo, EXTRA)),
        "the refused attach removed the program"
    );
    traffic_flows(&topo, "with the extra interface attached");

    // Detach.
    let out = daemon
        .cli(["detach", "-i", &instance, "--iface", EXTRA])
        .expect("run slb detach");
    out.expect_success().expect("slb detach");
    let link = link_show(&topo, EXTRA);
    println!("after detach: {}", link.trim());
    assert!(
        !has_xdp(&link),
        "{EXTRA} still has XDP after the detach:\n{link}"
    );

    // Detaching what is not attached is refused, naming the interface.
    for iface in [EXTRA, EXTRA_PEER] {
        let out = daemon
            .cli(["detach", "-i", &instance, "--iface", iface])
            .expect("run slb detach");
        println!("detach of unattached {iface}: {}", out.error_summary());
        assert!(
            !out.success(),
            "detaching unattached {iface} succeeded:\n{out}"
        );
        assert!(
            out.stderr.contains(iface) && out.stderr.contains("not attached"),
            "the error should say {iface} is not attached:\n{out}"
        );
    }

    // The instance's own interfaces are untouched.
    let s0 = link_show(&topo, "s0");
    assert!(has_xdp(&s0), "s0 lost its program:\n{s0}");
    traffic_flows(&topo, "after the detach");

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
