//! The bpftool commands the README gives ("Inspecting maps with bpftool") work on a running
//! instance, and the BTF-defined maps dump with the field names the README promises.

use std::path::Path;
use std::process::Command;

use slb_tests::slb::{pin_dir, slb_binary, unique_instance};
use slb_tests::traffic::tcp_connections;
use slb_tests::{require_root, vip_tcp, SlbConfig, SlbDaemon, Topology, TrafficOptions};

const SERVER: &str = env!("CARGO_BIN_EXE_slb-test-server");
const README: &str = include_str!("../../README.md");

/// The commands of the first ```sh block after the "Inspecting maps with bpftool" heading,
/// without their comments.
fn readme_bpftool_commands() -> Vec<String> {
    let section = README
        .split_once("### Inspecting maps with bpftool")
        .expect("README has the section \"Inspecting maps with bpftool\"")
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("the section has a ```sh block")
        .1
        .split_once("```")
        .expect("the block ends")
        .0;
    block
        .lines()
        .map(|l| {
            l.split_once('#')
                .map_or(l, |(cmd, _)| cmd)
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn bpftool(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("run bpftool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `bpftool -j map dump pinned <path>`, parsed: one `(key, value)` per entry, taken from the
/// BTF-formatted form (`formatted`) when bpftool gives one.
fn dump_json(path: &Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    let path = path.to_str().expect("UTF-8 path");
    let (ok, stdout, stderr) = bpftool(&["-j", "map", "dump", "pinned", path]);
    assert!(ok, "bpftool -j map dump pinned {path} failed: {stderr}");
    let entries: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bpftool -j printed no JSON ({e}): {stdout}"));
    entries
        .as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {stdout}"))
        .iter()
        .map(|e| {
            let e = e.get("formatted").unwrap_or(e);
            (e["key"].clone(), e["value"].clone())
        })
        .collect()
}

/// The last four bytes of a byte array in bpftool's JSON (slb keeps IPv4 addresses
/// IPv4-mapped in 16 bytes).
fn tail4(v: &serde_json::Value) -> Option<[u8; 4]> {
    let bytes: Vec<u8> = v
        .as_array()?
        .iter()
        .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
        .collect::<Option<_>>()?;
    bytes.get(bytes.len().checked_sub(4)?..)?.try_into().ok()
}

fn ipv4_tail(addr: &std::net::Ipv4Addr) -> [u8; 4] {
    addr.octets()
}

fn has_fields(v: &serde_json::Value, fields: &[&str]) -> bool {
    fields.iter().all(|f| v.get(f).is_some())
}

#[test]
fn bpftool_commands_from_the_readme() {
    require_root("bpftool_commands_from_the_readme");
    let commands = readme_bpftool_commands();
    println!("README bpftool commands: {commands:#?}");
    assert!(
        commands.len() >= 5 && commands.iter().all(|c| c.starts_with("bpftool ")),
        "unexpected commands in the README block: {commands:?}"
    );

    let slb = slb_binary();
    let topo = Topology::builder()
        .tag("bpft")
        .backends(2)
        .test_servers(Path::new(SERVER))
        .build()
        .expect("create topology");
    let config = SlbConfig::standard(&unique_instance("bpft"), &[1, 1]);
    let daemon = SlbDaemon::start(&slb, topo.slb_ns(), &config).expect("start slb");
    let instance = daemon.instance().to_owned();
    let report = tcp_connections(topo.client_ns(), vip_tcp(), &TrafficOptions::new(50))
        .expect("TCP connections");
    assert!(
        report.failures.is_empty() && report.answered() == 50,
        "{}",
        report.summary("TCP connections")
    );

    let mut pinned_mentioned = 0;
    let mut prog_id: Option<String> = None;
    for command in &commands {
        let command = command.replace("/slb/demo/", &format!("/slb/{instance}/"));
        if command.contains("/slb/") {
            pinned_mentioned += 1;
            assert!(
                command.contains(&instance),
                "{command} does not use the instance"
            );
        }
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let (ok, stdout, stderr) = bpftool(&args);
        println!(
            "$ {command}: {} lines of output{}",
            stdout.lines().count(),
            if ok { "" } else { " (FAILED)" }
        );
        assert!(ok, "`{command}` failed: {stderr}\n{stdout}");
        assert!(!stdout.trim().is_empty(), "`{command}` printed nothing");
        if command.contains("prog show") {
            assert!(stdout.contains("xdp"), "not an XDP program:\n{stdout}");
            prog_id = stdout.split(':').next().map(|id| id.trim().to_owned());
        }
        if command.contains("link list") {
            // The README lists `prog show` first: the links must run that program.
            let id = prog_id.as_deref().expect("prog show ran before link list");
            let ours = stdout
                .lines()
                .filter(|l| l.contains("xdp") && l.contains(&format!("prog {id}")))
                .count();
            println!("  {ours} XDP links run program {id}");
            assert!(
                ours >= 3,
                "bpftool link list should show the instance's XDP links (s0..s2) on program {id}:\n{stdout}"
            );
        }
    }
    assert!(
        pinned_mentioned >= 5,
        "the README commands should use the pins"
    );

    let dir = pin_dir(&instance);
    let listeners = dump_json(&dir.join("LISTENERS"));
    println!("LISTENERS: {listeners:?}");
    assert_eq!(
        listeners.len(),
        2,
        "two listeners in the config: {listeners:?}"
    );
    for (key, value) in &listeners {
        assert!(
            has_fields(key, &["vip", "port", "protocol"]),
            "LISTENERS key lacks vip/port/protocol: {key}"
        );
        assert!(
            has_fields(value, &["index", "ring_index"]),
            "LISTENERS value lacks index/ring_index: {value}"
        );
    }

    let vip = ipv4_tail(&slb_tests::VIP);
    assert!(
        listeners
            .iter()
            .any(|(k, _)| k["port"] == 80 && k["protocol"] == 6 && tail4(&k["vip"]) == Some(vip)),
        "no LISTENERS entry for {}:80/tcp: {listeners:?}",
        slb_tests::VIP
    );

    // BACKENDS is an array map: every slot dumps; the used ones carry the backends.
    let backends = dump_json(&dir.join("BACKENDS"));
    assert!(!backends.is_empty(), "BACKENDS is empty");
    for (_key, value) in &backends {
        assert!(
            has_fields(value, &["addr", "port", "flags"]),
            "BACKENDS value lacks addr/port/flags: {value}"
        );
    }
    let used: Vec<&(serde_json::Value, serde_json::Value)> = backends
        .iter()
        .filter(|(_, v)| tail4(&v["addr"]).is_some_and(|a| a != [0; 4]))
        .collect();
    println!(
        "BACKENDS: {} slots, {} used: {used:?}",
        backends.len(),
        used.len()
    );
    for i in 1..=2 {
        let addr = ipv4_tail(&Topology::backend_addr(i));
        assert!(
            used.iter().any(|(_, v)| tail4(&v["addr"]) == Some(addr)),
            "backend {i} ({addr:?}) is not in BACKENDS: {used:?}"
        );
    }
    let used_ids: Vec<&serde_json::Value> = used.iter().map(|(k, _)| k).collect();

    let connections = dump_json(&dir.join("CONNECTIONS"));
    println!(
        "CONNECTIONS: {} entries, e.g. {:?}",
        connections.len(),
        connections.first()
    );
    assert!(
        connections.len() >= 50,
        "expected an entry per connection made, got {}",
        connections.len()
    );
    assert!(
        connections
            .iter()
            .all(|(_, v)| has_fields(v, &["backend_id", "listener_index", "last_seen_ns"])),
        "CONNECTIONS values lack backend_id/listener_index/last_seen_ns: {:?}",
        connections.first()
    );
    assert!(
        connections
            .iter()
            .all(|(_, v)| used_ids.contains(&&v["backend_id"])),
        "a connection names a backend_id that is not in BACKENDS (ids {used_ids:?})"
    );

    let exit = daemon.stop().expect("stop slb");
    assert!(exit.success(), "slb exited with {exit} on SIGTERM");
}
