//! Shared pieces of the operations tests (`ops_*.rs`), which drive an instance whose data plane
//! outlives its daemons (`--keep-serving`) with the harness's [`Instance`]: such an instance,
//! what a daemon logs when it adopts, and readers of links and status.

#![allow(dead_code)] // each test file uses a different part

use std::path::Path;
use std::process::Command;

use slb_tests::slb::{Instance, Status};

/// What a daemon logs when it takes over the pins of a previous run.
pub const ADOPT_LINE: &str = "adopting the pinned maps and links of a previous run";

/// An [`Instance`] of `bin` in `netns` with the config `toml` (which names `instance`) that
/// ends whatever of it is left with `slb stop` when dropped (declare it after the topology).
pub fn instance_stopped_on_drop(bin: &Path, netns: &str, instance: &str, toml: &str) -> Instance {
    Instance::new(bin, netns, instance, toml)
        .expect("write the config")
        .stop_on_drop()
}

/// `ip -n <ns> link show <iface>`.
pub fn link_show(netns: &str, iface: &str) -> String {
    slb_tests::exec::run(Command::new("ip").args(["-n", netns, "link", "show", iface]))
        .unwrap_or_else(|e| format!("(ip link show failed: {e})"))
}

/// `ip link` marks an attached XDP program with a mode flag (`xdp`, `xdpgeneric`, ...) and a
/// `prog/xdp id N` line.
pub fn has_xdp(link: &str) -> bool {
    link.contains("xdp")
}

/// `address:port -> new_connections` of the backends of `listener` in `slb status`.
pub fn backend_new_connections(status: &Status, listener: &str) -> Vec<(String, u64)> {
    status
        .backends
        .iter()
        .filter(|b| b.listener == listener)
        .map(|b| (format!("{}:{}", b.address, b.port), b.new_connections))
        .collect()
}

/// The new connections the listener named `listener` counted, per `slb status`.
pub fn listener_new_connections(status: &Status, listener: &str) -> u64 {
    slb_tests::slb::status_listener(status, listener).map_or(0, |l| l.new_connections)
}
