//! Running as a service: the packaged unit passes `systemd-analyze verify` and says what the
//! README says; the daemon speaks sd_notify (READY only once attached, RELOADING/READY around
//! SIGHUP, STOPPING on exit); completions and the man page come from the binary.

mod ops_common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ops_common::{has_xdp, instance_stopped_on_drop, link_show};
use slb_tests::slb::{pin_dir, slb_binary, unique_instance, EXIT_TIMEOUT, START_TIMEOUT};
use slb_tests::traffic::tcp_connections;
use slb_tests::{require_root, vip_tcp, SlbConfig, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const UNIT: &str = include_str!("../../packaging/slb.service");

/// The values of `key=` lines in the unit.
fn unit_values(key: &str) -> Vec<&'static str> {
    UNIT.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// Receives notify datagrams until one contains `want`; returns every message received, the
/// one with `want` last.
fn receive_until(socket: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {want:?} within {timeout:?}; received {messages:?}"
        );
        socket
            .set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .expect("set_read_timeout");
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = message.lines().any(|l| l == want);
                messages.push(message);
                if done {
                    return messages;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("receiving on the notify socket: {e}"),
        }
    }
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

#[test]
fn systemd_unit_says_what_the_readme_says_and_verifies() {
    require_root("systemd_unit_says_what_the_readme_says_and_verifies");
    let slb = slb_binary();

    // The unit, as the README describes it.
    assert_eq!(unit_values("Type"), ["notify"], "Type=notify");
    let reload = unit_values("ExecReload");
    assert!(
        reload.len() == 1 && reload[0].contains("kill") && reload[0].contains("HUP"),
        "ExecReload should send SIGHUP: {reload:?}"
    );
    assert_eq!(unit_values("Restart"), ["on-failure"], "Restart=on-failure");
    let caps = unit_values("CapabilityBoundingSet");
    assert!(
        caps.len() == 1
            && ["CAP_BPF", "CAP_NET_ADMIN"]
                .iter()
                .all(|c| caps[0].contains(c)),
        "CapabilityBoundingSet should hold CAP_BPF and CAP_NET_ADMIN: {caps:?}"
    );
    let start = unit_values("ExecStart");
    assert!(
        start.len() == 1 && start[0].contains(" run ") && start[0].contains("--keep-serving"),
        "ExecStart should run with --keep-serving: {start:?}"
    );

    // systemd-analyze verify, with the unit pointing at the built binary.
    let dir = tempfile::tempdir().expect("temporary directory");
    let unit_path = dir.path().join("slb.service");
    let unit = UNIT.replace("/usr/bin/slb", slb.to_str().expect("UTF-8 path"));
    assert!(
        unit.contains(slb.to_str().unwrap()),
        "no /usr/bin/slb to replace"
    );
    std::fs::write(&unit_path, &unit).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "systemd-analyze verify: {} with {} lines of output",
        out.status,
        text.lines().count()
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("slb.service") || l.contains(dir.path().to_str().unwrap()))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify complains about the unit:\n{}",
        about_unit.join("\n")
    );
}

#[test]
fn systemd_notify_ready_reloading_and_stopping() {
    require_root("systemd_notify_ready_reloading_and_stopping");
    let slb = slb_binary();

    // sd_notify.
    let topo = Topology::builder()
        .tag("sdn")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("sdn"), &[1, 1]);
    let mut inst =
        instance_stopped_on_drop(&slb, topo.slb_ns(), &config.instance, &config.to_toml());
    let socket_path = inst.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let link_before = link_show(topo.slb_ns(), "s0");
    assert!(!has_xdp(&link_before), "s0 has XDP before slb runs");

    let started = Instant::now();
    inst.spawn(&[], &[("NOTIFY_SOCKET", socket_path.as_os_str())])
        .expect("start slb");
    let messages = receive_until(&socket, "READY=1", START_TIMEOUT);
    // Right when READY arrives: attached, state published.
    let link = link_show(topo.slb_ns(), "s0");
    let state_exists = inst.state_path().exists();
    let generation = inst.generation();
    let ready = messages.last().unwrap();
    println!(
        "READY=1 after {:.2?}: {ready:?} (messages before it: {:?}); s0 then: {}",
        started.elapsed(),
        &messages[..messages.len() - 1],
        link.lines().next().unwrap_or("")
    );
    assert!(has_xdp(&link), "READY=1 arrived before s0 had XDP: {link}");
    assert!(
        state_exists,
        "READY=1 arrived before the state file existed"
    );
    assert_eq!(generation, Some(1), "READY=1 before the config was applied");
    assert!(
        messages[..messages.len() - 1]
            .iter()
            .all(|m| !m.contains("READY")),
        "{messages:?}"
    );
    let status_line = ready
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_else(|| panic!("READY=1 without a STATUS= line: {ready:?}"));
    assert!(
        status_line.contains("s0") && status_line.contains("generation 1"),
        "the status should name the interfaces and the generation: {status_line}"
    );
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(30))
        .expect("TCP connections");
    assert!(
        report.failures.is_empty() && report.answered() == 30,
        "{}",
        report.summary("after READY")
    );

    // SIGHUP: RELOADING=1, then READY=1.
    inst.current().signal(libc::SIGHUP).expect("SIGHUP");
    let messages = receive_until(&socket, "READY=1", Duration::from_secs(20));
    println!("after SIGHUP: {messages:?}");
    let reloading = messages
        .iter()
        .position(|m| has_line(m, "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 after SIGHUP: {messages:?}"));
    let ready = messages.len() - 1;
    assert!(
        reloading < ready,
        "RELOADING=1 must come in a notification before READY=1: {messages:?}"
    );
    assert!(
        messages[ready].contains("STATUS=") && messages[ready].contains("generation 2"),
        "READY=1 after the reload should report generation 2: {messages:?}"
    );
    assert_eq!(inst.generation(), Some(2));

    // SIGTERM: STOPPING=1, and (without --keep-serving) everything is removed.
    inst.current().signal(libc::SIGTERM).expect("SIGTERM");
    let messages = receive_until(&socket, "STOPPING=1", Duration::from_secs(10));
    println!("after SIGTERM: {messages:?}");
    let exit = inst
        .current()
        .wait_exit(EXIT_TIMEOUT)
        .expect("slb exits on SIGTERM");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
    assert!(
        !pin_dir(&inst.instance).exists(),
        "without --keep-serving, SIGTERM should unpin"
    );
    let link = link_show(topo.slb_ns(), "s0");
    assert!(!has_xdp(&link), "s0 still has XDP after SIGTERM: {link}");
}

#[test]
fn completions_and_man_page_come_from_the_binary() {
    require_root("completions_and_man_page_come_from_the_binary");
    let slb = slb_binary();

    // Completions and the man page.
    let out = Command::new(&slb)
        .args(["completions", "bash"])
        .output()
        .expect("run slb completions bash");
    let completions = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "slb completions bash: {}", out.status);
    println!(
        "slb completions bash: {} lines",
        completions.lines().count()
    );
    assert!(completions.contains("_slb"), "no _slb function");
    for sub in ["run", "status", "stats", "backend", "stop", "report"] {
        assert!(
            completions.contains(sub),
            "completions lack the subcommand {sub}"
        );
    }
    let out = Command::new(&slb)
        .arg("manpage")
        .output()
        .expect("run slb manpage");
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "slb manpage: {}", out.status);
    println!(
        "slb manpage: {} lines, starting {:?}",
        man.lines().count(),
        man.lines().next()
    );
    assert!(
        man.starts_with(".TH slb 1") || man.starts_with(".ie"),
        "not roff: {:?}",
        man.lines().next()
    );
    assert!(man.contains(".TH slb 1"), "no .TH slb 1 header");
    assert!(man.contains("run"), "the man page does not mention run");
}
