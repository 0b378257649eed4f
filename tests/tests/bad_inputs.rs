//! Bad configs and bad admin-API changes are refused with a message naming what is wrong, and
//! the running config keeps serving: `slb check-config` fails, a SIGHUP with the bad file is
//! logged and ignored, and `slb backend ...` refuses without changing the generation.

use std::path::Path;
use std::time::Duration;

use slb_tests::config::{
    backend, group, health_check_of, listener, BackendSpec, CheckKind, GroupKind, Protocol,
    POOL_GROUP, TCP_LISTENER, UDP_LISTENER,
};
use slb_tests::slb::{slb_binary, unique_instance, SlbDaemon};
use slb_tests::traffic::tcp_connections;
use slb_tests::{require_root, vip_tcp, SlbConfig, Topology, TrafficOptions, BACKEND_PORT};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const PAIR: &str = "pair";
const REJECTED: &str = "SIGHUP reload rejected, the running config stays";

/// The running config: the standard pool of three (1:1:1) behind tcp-echo and udp-echo, plus
/// an active/standby pair (backends 1 and 2) behind a TCP listener on port 82.
const PAIR_BACKEND_PORT: u16 = 8082;

fn good_config(instance: &str) -> SlbConfig {
    let mut config = SlbConfig::standard(instance, &[1, 1, 1]);
    config.groups.push(group(
        PAIR,
        GroupKind::ActiveStandby,
        // A backend port of its own: slb knows a reply's listener by the backend's endpoint.
        vec![
            BackendSpec {
                port: Some(PAIR_BACKEND_PORT),
                ..backend(1, 1)
            },
            BackendSpec {
                port: Some(PAIR_BACKEND_PORT),
                ..backend(2, 1)
            },
        ],
    ));
    config
        .listeners
        .push(listener("tcp-pair", Protocol::Tcp, 82, Some(PAIR)));
    config
}

/// `(what, config text, strings the error must contain)`.
fn bad_variants(good: &SlbConfig) -> Vec<(&'static str, String, Vec<&'static str>)> {
    let mut three = good.clone();
    three.group_mut(PAIR).backends.push(backend(3, 1));

    let mut negative = good.to_toml_value();
    let weight = negative
        .get_mut("groups")
        .and_then(|g| g.get_mut(0))
        .and_then(|g| g.get_mut("backends"))
        .and_then(|b| b.get_mut(0))
        .and_then(|b| b.get_mut("weight"))
        .expect("groups[0].backends[0].weight");
    *weight = toml::Value::Integer(-1);

    let mut unknown_group = good.clone();
    unknown_group.listener_mut(TCP_LISTENER).group = Some("nope".to_owned());

    let mut http_on_udp = good.clone();
    http_on_udp.listener_mut(UDP_LISTENER).health_check = Some(health_check_of(CheckKind::Http));

    vec![
        (
            "an active/standby group with three servers",
            three.to_toml(),
            vec!["pair", "exactly two"],
        ),
        (
            "a backend weight of -1",
            toml::to_string(&negative).expect("render TOML"),
            vec!["weight", "-1"],
        ),
        (
            "a listener naming an unknown group",
            unknown_group.to_toml(),
            vec!["listeners[0] (tcp-echo).group", "\"nope\""],
        ),
        (
            "an HTTP health check on a UDP listener",
            http_on_udp.to_toml(),
            vec!["listeners[1] (udp-echo).health_check.type", "HTTP"],
        ),
    ]
}

/// `line` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The daemon's log split into records: a record starts with a timestamped line
/// (`2026-...`) and takes the continuation lines after it (e.g. a TOML error's snippet).
fn log_records(log: &str) -> Vec<String> {
    let mut records: Vec<String> = Vec::new();
    for line in log.lines().map(strip_ansi) {
        let timestamped = line.len() > 5
            && line[..4].chars().all(|c| c.is_ascii_digit())
            && line[4..].starts_with('-');
        match records.last_mut() {
            Some(last) if !timestamped => {
                last.push('\n');
                last.push_str(&line);
            }
            _ => records.push(line),
        }
    }
    records
}

/// New connections still reach exactly the three configured backends.
fn traffic_flows(topo: &Topology, when: &str) {
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(90))
        .expect("run TCP connections");
    println!("{}", report.summary(when));
    assert!(
        report.failures.is_empty() && report.answered() == 90,
        "{}",
        report.summary(when)
    );
    assert_eq!(
        report.counts.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["b1", "b2", "b3"],
        "{when}: the old backends should serve: {:?}",
        report.counts
    );
}

/// A topology with three backends and slb serving [`good_config`] (its generation, which the
/// traffic reached the three backends in).
fn start_good(tag: &str) -> (Topology, SlbDaemon, SlbConfig, u64) {
    let slb = slb_binary();
    let topo = Topology::builder()
        .tag(tag)
        .backends(3)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let good = good_config(&unique_instance(tag));
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &good).expect("start slb");
    let generation = daemon.generation().expect("generation");
    traffic_flows(&topo, "with the good config");
    (topo, daemon, good, generation)
}

/// After whatever was refused, the daemon still takes a good file, and stops cleanly.
fn still_takes_a_good_file(mut daemon: SlbDaemon, good: &SlbConfig, generation: u64) {
    let next = daemon.reload_with(good).expect("reload the good config");
    assert_eq!(next, generation + 1);

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}

/// Bad config files: `check-config` refuses each naming the field or group, and the running
/// daemon refuses it on SIGHUP and keeps serving the old config.
#[test]
fn bad_config_files_are_rejected_and_the_running_config_stays() {
    require_root("bad_config_files_are_rejected_and_the_running_config_stays");
    let (topo, mut daemon, good, generation) = start_good("badf");

    let files = tempfile::tempdir().expect("temp dir");
    for (k, (what, text, needles)) in bad_variants(&good).into_iter().enumerate() {
        // (a) check-config refuses it and names the field or group.
        let path = files.path().join(format!("bad-{k}.toml"));
        std::fs::write(&path, &text).expect("write bad config");
        let out = daemon
            .cli([Path::new("check-config").as_os_str(), path.as_os_str()])
            .expect("run slb check-config");
        assert!(!out.success(), "check-config accepted {what}:\n{out}");
        println!("{what}: check-config says: {}", out.error_summary());
        for needle in &needles {
            assert!(
                out.stderr.contains(needle),
                "check-config's error for {what} does not mention {needle:?}:\n{out}"
            );
        }

        // (b) the running daemon refuses it on SIGHUP and keeps serving the old config.
        let rejected_before = daemon.log_count(REJECTED);
        daemon.write_config_text(&text).expect("write config file");
        daemon.sighup().expect("SIGHUP");
        daemon
            .wait_for_log(REJECTED, rejected_before + 1, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: no rejection logged: {e:#}"));
        let line = log_records(&daemon.log())
            .into_iter()
            .filter(|r| r.contains(REJECTED))
            .nth(rejected_before)
            .expect("the rejection record");
        for needle in &needles {
            assert!(
                line.contains(needle),
                "the daemon's rejection of {what} does not mention {needle:?}: {line}"
            );
        }
        assert_eq!(
            daemon.generation(),
            Some(generation),
            "{what}: the generation changed"
        );
        traffic_flows(&topo, &format!("after SIGHUP with {what}"));
    }
    daemon.write_config(&good).expect("restore the good config");
    still_takes_a_good_file(daemon, &good, generation);
}

/// The admin API refuses bad changes, naming the problem, and the running config stays.
#[test]
fn bad_api_changes_are_refused_and_the_running_config_stays() {
    require_root("bad_api_changes_are_refused_and_the_running_config_stays");
    let (topo, daemon, good, generation) = start_good("bada");

    let b1 = Topology::backend_addr(1).to_string();
    let b3 = Topology::backend_addr(3).to_string();
    let port = BACKEND_PORT.to_string();
    let instance = daemon.instance().to_owned();
    let api_cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "set-weight -1",
            vec![
                "backend",
                "set-weight",
                "-i",
                &instance,
                "--group",
                POOL_GROUP,
                "--address",
                &b1,
                "--port",
                &port,
                "--weight",
                "-1",
            ],
            "negative",
        ),
        (
            "add to an unknown group",
            vec![
                "backend",
                "add",
                "-i",
                &instance,
                "--group",
                "nope",
                "--address",
                &b3,
                "--port",
                &port,
            ],
            "\"nope\"",
        ),
        (
            "add a third server to an active/standby group",
            vec![
                "backend",
                "add",
                "-i",
                &instance,
                "--group",
                PAIR,
                "--address",
                &b3,
                "--port",
                &port,
            ],
            "exactly two",
        ),
    ];
    for (what, args, needle) in api_cases {
        let out = daemon.cli(&args).expect("run slb backend");
        println!("{what}: {}", out.error_summary());
        assert!(!out.success(), "slb backend {what} succeeded:\n{out}");
        assert!(
            out.stderr.contains(needle),
            "the refusal of {what} does not mention {needle:?}:\n{out}"
        );
    }
    assert_eq!(
        daemon.generation(),
        Some(generation),
        "a refused API change changed the generation"
    );
    let status = daemon.status().expect("slb status");
    assert_eq!(
        status.runtime_changes.len(),
        0,
        "refused changes must not be listed: {status:#?}"
    );
    traffic_flows(&topo, "after the refused API changes");
    still_takes_a_good_file(daemon, &good, generation);
}
