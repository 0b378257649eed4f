//! Control-plane faults around the data plane: a second daemon for a running instance, instance
//! names that are paths, accept errors in the admin API and the Prometheus endpoint, and a reload
//! that is refused halfway through attaching interfaces.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use slb_tests::config::{AttachMode, Interface};
use slb_tests::slb::{pin_dir, slb_binary, state_dir, unique_instance, Instance, InterfaceState};
use slb_tests::traffic::tcp_connections;
use slb_tests::{in_netns, require_root, vip_tcp, SlbConfig, SlbDaemon, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");

fn topology(tag: &str) -> Topology {
    Topology::builder()
        .tag(tag)
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology")
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

/// A `slb` command with `RUST_BACKTRACE` unset, so its stderr is only the error.
fn slb_command(slb: &Path, netns: &str) -> Command {
    let mut cmd = Command::new(slb);
    cmd.env_remove("RUST_BACKTRACE")
        .arg("--netns")
        .arg(netns)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Every path under `dir`, recursively, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A second `slb run` for an instance that is being served refuses, names the pid of the daemon
/// that serves it, and leaves that daemon's pins, socket and state alone; the first daemon keeps
/// serving and `slb stop` still reaches it.
#[test]
fn second_daemon_for_an_instance_is_refused() {
    require_root("second_daemon_for_an_instance_is_refused");
    let slb = slb_binary();
    let topo = topology("dup");
    let config = SlbConfig::standard(&unique_instance("dup"), &[1, 1]);
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let instance = daemon.instance().to_owned();
    let pid = daemon.pid().expect("the daemon runs");
    let socket = state_dir(&instance).join("admin.sock");
    // Start waits until the daemon is ready, which it is once the socket is bound; checked
    // anyway, as what follows depends on it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no admin socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The pins, and the socket and lock file by inode: a second daemon that took over would
    // have re-bound the socket and re-created or re-written the lock.
    let snapshot = || {
        let inode = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
        let lock = state_dir(&instance).join("daemon.lock");
        (
            tree(&pin_dir(&instance)),
            inode(&socket),
            inode(&lock),
            std::fs::read_to_string(&lock).ok(),
        )
    };
    let before = snapshot();
    assert_eq!(
        before.3.as_deref().map(str::trim),
        Some(pid.to_string().as_str()),
        "the lock file does not hold the daemon's pid"
    );

    let mut second = slb_command(&slb, topo.slb_ns())
        .args(["run", "-c"])
        .arg(daemon.config_path())
        .spawn()
        .expect("start a second slb run");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait for the second slb run") {
            break status;
        }
        if Instant::now() >= deadline {
            // It took the instance over; stop it so the test cleans up, and fail.
            unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
            let out = second
                .wait_with_output()
                .expect("wait for the second slb run");
            panic!(
                "a second slb run for instance {instance} kept running:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    println!("second slb run: {status}: {}", stderr.trim());
    assert!(!status.success(), "the second slb run exited 0:\n{stderr}");
    assert!(
        stderr.contains("already served by slb pid") && stderr.contains(&format!("pid {pid}")),
        "the error does not name pid {pid} of the running daemon:\n{stderr}"
    );

    // Nothing of the first daemon's was touched, and it still serves and answers.
    assert_eq!(
        snapshot(),
        before,
        "the second slb run changed the pins, the admin socket or the lock"
    );
    traffic_flows(&topo, "after the second slb run was refused");
    daemon
        .cli(["status", "-i", &instance])
        .expect("run slb status")
        .expect_success()
        .expect("slb status");
    let out = daemon
        .cli(["reload", "-i", &instance])
        .expect("run slb reload");
    out.expect_success()
        .expect("slb reload through the first daemon's admin socket");
    let out = daemon.cli(["stop", "-i", &instance]).expect("run slb stop");
    out.expect_success().expect("slb stop");
    assert!(
        !pin_dir(&instance).exists(),
        "slb stop left {}",
        pin_dir(&instance).display()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.generation().is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let exit = daemon.stop().expect("the first daemon exited");
    assert!(exit.success(), "the first daemon exited with {exit}");
}

/// Instance names are checked before any path is built from them: `""`, `..` and `a/../b` are
/// refused with an error naming the value, and nothing is removed.
#[test]
fn instance_names_that_are_paths_are_refused() {
    require_root("instance_names_that_are_paths_are_refused");
    let slb = slb_binary();
    let topo = topology("iname");
    let config = SlbConfig::standard(&unique_instance("iname"), &[1, 1]);
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let instance = daemon.instance().to_owned();
    // Stand-ins for what `-i ""` (every instance) and `-i ..` (all of bpffs) would reach; other
    // tests' instances come and go meanwhile, so only these and our own pins are compared.
    let sentinels = [
        pin_dir(&format!("{instance}-sentinel")),
        Path::new("/sys/fs/bpf").join(format!("{instance}-sentinel")),
    ];
    for dir in &sentinels {
        std::fs::create_dir(dir).expect("create a sentinel directory in bpffs");
    }
    let snapshot = || {
        (
            tree(&pin_dir(&instance)),
            state_dir(&instance).join("state.json").exists(),
            sentinels.iter().map(|d| d.exists()).collect::<Vec<_>>(),
        )
    };
    let before = snapshot();

    // `<instance>/../<instance>` is the running instance by another spelling.
    let dotted = format!("{instance}/../{instance}");
    for bad in ["", "..", "a/../b", dotted.as_str()] {
        for command in ["stop", "status", "reload"] {
            let out = slb_command(&slb, topo.slb_ns())
                .args([command, "-i", bad])
                .output()
                .expect("run slb");
            let stderr = String::from_utf8_lossy(&out.stderr);
            println!("slb {command} -i {bad:?}: {}", stderr.trim());
            assert!(
                !out.status.success()
                    && stderr.contains(&format!("instance name {bad:?} is invalid")),
                "slb {command} -i {bad:?} did not refuse the name ({}):\n{stderr}",
                out.status
            );
        }
        assert_eq!(
            snapshot(),
            before,
            "slb -i {bad:?} removed pins, state or a sentinel"
        );
    }
    let out = slb_command(&slb, topo.slb_ns())
        .args(["backend", "add", "-i", "..", "--group", "pool"])
        .args(["--address", "10.0.0.1"])
        .output()
        .expect("run slb backend add");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("instance name \"..\" is invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same rule for the config file.
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("bad.toml");
    let text = config
        .to_toml()
        .replace(&format!("instance = \"{instance}\""), "instance = \"../x\"");
    assert!(
        text.contains("../x"),
        "could not rewrite the instance:\n{text}"
    );
    std::fs::write(&file, text).expect("write the config");
    for args in [vec!["check-config"], vec!["run", "-c"]] {
        let out = slb_command(&slb, topo.slb_ns())
            .args(&args)
            .arg(&file)
            .output()
            .expect("run slb");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("instance name \"../x\" is invalid"),
            "slb {args:?} accepted instance \"../x\":\n{stderr}"
        );
    }

    traffic_flows(&topo, "after the refused names");
    daemon.stop().expect("stop slb");
    for dir in &sentinels {
        std::fs::remove_dir(dir).expect("remove a sentinel directory");
    }
}

/// Counts the open file descriptors of `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .count()
}

fn prlimit_nofile(pid: u32, soft: u64, hard: u64) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:{hard}"))
        .output()
        .expect("run prlimit");
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `(soft, hard)` RLIMIT_NOFILE of `pid`.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    (fields[0], fields[1])
}

fn metrics_answer(ns: &str, port: u16) -> anyhow::Result<String> {
    in_netns(ns, || -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
        )?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?
}

/// The admin API and the Prometheus endpoint survive accept errors: with the daemon out of file
/// descriptors (RLIMIT_NOFILE lowered under it), accepts fail with EMFILE; once descriptors are
/// available again, both answer again.
#[test]
fn accept_errors_do_not_end_the_admin_api_or_metrics() {
    require_root("accept_errors_do_not_end_the_admin_api_or_metrics");
    let slb = slb_binary();
    let topo = topology("emfile");
    let config = SlbConfig::standard(&unique_instance("emfile"), &[1, 1]);
    let (daemon, port) =
        SlbDaemon::start_with_prometheus(&slb, topo.slb_ns(), &config).expect("start slb");
    let instance = daemon.instance().to_owned();
    let pid = daemon.pid().expect("the daemon runs");
    let socket = state_dir(&instance).join("admin.sock");
    assert!(metrics_answer(topo.slb_ns(), port)
        .expect("metrics before")
        .starts_with("HTTP/1.1 200"));

    let limits = nofile(pid);
    // Room for a few connections, not for all of the ones below.
    let soft = fd_count(pid) as u64 + 3;
    prlimit_nofile(pid, soft, limits.1);
    let mut held_unix = Vec::new();
    let mut held_tcp = Vec::new();
    for _ in 0..8 {
        held_unix.push(UnixStream::connect(&socket).expect("connect to the admin socket"));
    }
    in_netns(topo.slb_ns(), || {
        for _ in 0..8 {
            held_tcp.push(
                TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port"),
            );
        }
    })
    .expect("enter the slb namespace");
    // Both loops hit EMFILE (the old code logged it once and ended the loop for good).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log();
        let failed = |listener: &str| {
            log.lines()
                .any(|l| l.contains("Too many open files") && l.contains(listener))
        };
        if failed("admin API") && failed("Prometheus") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no EMFILE accept error logged for both listeners:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    prlimit_nofile(pid, limits.0, limits.1);
    drop(held_unix);
    drop(held_tcp);

    // The backoff is at most 1 s; give it a few.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let api = daemon
            .cli(["reload", "-i", &instance])
            .expect("run slb reload");
        let metrics = metrics_answer(topo.slb_ns(), port);
        let metrics_ok = metrics
            .as_ref()
            .is_ok_and(|m| m.starts_with("HTTP/1.1 200"));
        if api.success() && metrics_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the limit was raised again: admin API: {}; metrics: {:?}\n{}",
            api.error_summary(),
            metrics.map(|m| m.lines().next().unwrap_or_default().to_owned()),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.log_count("accepting again") >= 2, "{}", daemon.log());
    traffic_flows(&topo, "after the accept errors");
    daemon.stop().expect("stop slb");
}

/// A reload whose interface list names one new interface that exists and one that does not is
/// refused as a whole: the existing one is not attached, no link is pinned for it, and the old
/// config keeps serving.
#[test]
fn rejected_reload_attaches_nothing() {
    require_root("rejected_reload_attaches_nothing");
    const NEW: &str = "fa0";
    const NEW_PEER: &str = "fa1";
    let slb = slb_binary();
    let topo = topology("rrel");
    let config = SlbConfig::standard(&unique_instance("rrel"), &[1, 1]);
    let mut daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let instance = daemon.instance().to_owned();
    topo.exec_in(
        topo.slb_ns(),
        [
            "ip", "link", "add", NEW, "type", "veth", "peer", "name", NEW_PEER,
        ],
    )
    .expect("create a veth pair in the slb namespace");
    for iface in [NEW, NEW_PEER] {
        topo.exec_in(topo.slb_ns(), ["ip", "link", "set", iface, "up"])
            .expect("set the veth up");
    }
    let generation = daemon.generation().expect("a generation");

    // Sorted before the missing one, so attaching in order would reach it first.
    let mut next = config.clone();
    next.interfaces.push(Interface {
        name: NEW.into(),
        mode: AttachMode::Generic,
    });
    next.interfaces.push(Interface {
        name: "zz-missing".into(),
        mode: AttachMode::Generic,
    });
    daemon.write_config(&next).expect("write the config");
    let out = daemon
        .cli(["reload", "-i", &instance])
        .expect("run slb reload");
    println!("reload: {}", out.error_summary());
    assert!(
        !out.success() && out.stderr.contains("zz-missing"),
        "the reload was not refused naming the missing interface:\n{out}"
    );

    let link = topo
        .exec_in(topo.slb_ns(), ["ip", "-d", "link", "show", NEW])
        .expect("ip link show");
    assert!(
        !link.contains("xdp"),
        "the refused reload left XDP attached to {NEW}:\n{link}"
    );
    let pin = pin_dir(&instance).join("links").join(NEW);
    assert!(!pin.exists(), "the refused reload pinned {}", pin.display());
    assert_eq!(
        daemon.generation(),
        Some(generation),
        "the generation moved"
    );
    traffic_flows(&topo, "after the refused reload");

    // And the valid part alone applies.
    next.interfaces.pop();
    daemon
        .reload_with(&next)
        .expect("reload with the valid interface");
    let link = topo
        .exec_in(topo.slb_ns(), ["ip", "-d", "link", "show", NEW])
        .expect("ip link show");
    assert!(link.contains("xdp"), "{NEW} is not attached:\n{link}");
    traffic_flows(&topo, "after the valid reload");
    daemon.stop().expect("stop slb");
    let _ = topo.exec_in(topo.slb_ns(), ["ip", "link", "del", NEW]);
}

/// Deletes backend 1's veth pair (`s1` in the slb namespace, `b0` in the backend's) and
/// creates it again: same names, new devices.
fn flap_backend_link(topo: &Topology) {
    topo.exec_in(topo.slb_ns(), ["ip", "link", "del", "s1"])
        .expect("delete s1");
    create_backend_link(topo);
}

/// Creates backend 1's veth pair as the topology did: names, addresses, route and offloads.
fn create_backend_link(topo: &Topology) {
    let (slb_ns, backend_ns) = (topo.slb_ns(), topo.backend_ns(1));
    let ip = |ns: &str, args: &[&str]| {
        topo.exec_in(ns, std::iter::once("ip").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("ip {args:?} in {ns}: {e}"));
    };
    let backend_netns = format!("/var/run/netns/{backend_ns}");
    ip(
        slb_ns,
        &[
            "link",
            "add",
            "s1",
            "type",
            "veth",
            "peer",
            "name",
            "b0",
            "netns",
            &backend_netns,
        ],
    );
    ip(slb_ns, &["addr", "add", "10.200.11.1/24", "dev", "s1"]);
    ip(slb_ns, &["link", "set", "s1", "up"]);
    ip(backend_ns, &["addr", "add", "10.200.11.2/24", "dev", "b0"]);
    ip(backend_ns, &["link", "set", "b0", "up"]);
    ip(
        backend_ns,
        &["route", "add", "default", "via", "10.200.11.1"],
    );
    for (ns, iface, opts) in [
        (backend_ns, "b0", &["tx", "off"][..]),
        (backend_ns, "b0", &["gro", "on"][..]),
        (slb_ns, "s1", &["gro", "on"][..]),
    ] {
        topo.exec_in(
            ns,
            ["ethtool", "-K", iface]
                .into_iter()
                .chain(opts.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("ethtool -K {iface} {opts:?}: {e}"));
    }
}

/// `interface_states` entry of `iface` in `slb status --json`.
fn interface_state(inst: &Instance, iface: &str) -> InterfaceState {
    let status = inst.status().expect("slb status --json");
    status
        .interface_states
        .iter()
        .find(|s| s.name == iface)
        .cloned()
        .unwrap_or_else(|| panic!("no interface_states entry for {iface}: {status:#?}"))
}

/// Traffic through the VIP works again within `timeout`.
fn wait_traffic(topo: &Topology, timeout: Duration, when: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(10))
            .expect("run TCP connections");
        if report.failures.is_empty() && report.answered() == 10 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: traffic did not come back within {timeout:?}: {}",
            report.summary(when)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An attached interface that is deleted and re-created (same name, new device) gets the
/// program back within seconds, `slb status` shows what happened, and a restart over pins whose
/// link was severed that way works.
#[test]
fn interface_flap_is_noticed_and_reattached() {
    require_root("interface_flap_is_noticed_and_reattached");
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("flap")
        .backends(1)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("flap"), &[1]);
    let keep = ["--keep-serving"];
    // Declared after the topology: on drop, `slb stop` ends what a failed test left, so pins a
    // `--keep-serving` daemon leaves do not outlive it.
    let mut inst = Instance::new(&slb, topo.slb_ns(), &config.instance, &config.to_toml())
        .expect("write the config")
        .stop_on_drop();
    inst.start(&keep, &[]).expect("start slb");
    let instance = inst.instance.clone();
    traffic_flows(&topo, "before the flap");
    assert!(interface_state(&inst, "s1").attached);

    // Gone: noticed and shown.
    topo.exec_in(topo.slb_ns(), ["ip", "link", "del", "s1"])
        .expect("delete s1");
    let state = interface_state(&inst, "s1");
    assert!(!state.attached, "{state:?}");
    assert_eq!(state.state, "detached: interface gone", "{state:?}");
    let text = inst
        .cli(["status", "-i", &instance])
        .expect("run slb status");
    assert!(
        text.stdout.contains("s1 (detached: interface gone)"),
        "{}",
        text.stdout
    );
    // Back under the same name: re-attached, and traffic flows again.
    // (Deleting s1 took b0 with it; this re-creates both.)
    create_backend_link(&topo);
    wait_traffic(&topo, Duration::from_secs(10), "after s1 was re-created");
    let state = interface_state(&inst, "s1");
    assert!(state.attached, "{state:?}");
    assert_eq!(state.history.reattached, 1, "{state:?}");
    let link = topo
        .exec_in(topo.slb_ns(), ["ip", "-d", "link", "show", "s1"])
        .expect("ip link show");
    assert!(link.contains("xdp"), "s1 has no XDP program:\n{link}");
    let text = inst
        .cli(["status", "-i", &instance])
        .expect("run slb status");
    assert!(
        text.stdout.contains("s1 (re-attached 1 time"),
        "{}",
        text.stdout
    );

    // `slb attach` over a link severed while no daemon runs: the pinned program serves again.
    inst.current()
        .terminate()
        .expect("stop slb (--keep-serving)");
    flap_backend_link(&topo);
    slb_tests::slb::slb_cli(
        &slb,
        topo.slb_ns(),
        ["attach", "-i", &instance, "--iface", "s1"],
    )
    .expect("run slb attach")
    .expect_success()
    .expect("slb attach over a severed link");
    wait_traffic(&topo, Duration::from_secs(10), "after slb attach");

    // A restart over a link severed while no daemon ran.
    flap_backend_link(&topo);
    inst.start(&keep, &[])
        .expect("restart slb over the severed link");
    wait_traffic(&topo, Duration::from_secs(10), "after the restart");
    assert!(interface_state(&inst, "s1").attached);
    inst.cli(["stop", "-i", &instance])
        .expect("run slb stop")
        .expect_success()
        .expect("slb stop");
}
