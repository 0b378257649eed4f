//! Test harness for `slb`: network-namespace topologies, a backend echo server, traffic
//! generators that run inside a namespace, a distribution table, the config builder (on slb's
//! own config schema) and the driver of the `slb` daemon.
//!
//! Everything here needs root (namespaces, veths, XDP). Integration tests call
//! [`require_root`] first, so that a run without root fails saying why instead of passing
//! without having asserted anything.

pub mod config;
pub mod exec;
pub mod http;
pub mod report;
pub mod slb;
pub mod topology;
pub mod traffic;

pub use config::SlbConfig;
pub use exec::{in_netns, CommandError};
pub use report::Distribution;
pub use slb::SlbDaemon;
pub use topology::Topology;
pub use traffic::{LongLivedStreams, TrafficOptions, TrafficReport};

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Virtual IP the listeners use. No interface carries it: the client reaches it through its
/// default route and the XDP program on the slb side of the client veth intercepts it.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 10);
/// Address of the client (`c0` in the client namespace).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// Address of the load balancer on the client side (`s0` in the slb namespace).
pub const SLB_CLIENT_SIDE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// Port the test server listens on (TCP and UDP) in every backend namespace.
pub const BACKEND_PORT: u16 = 8080;
/// The test servers also answer here: a second tcp/udp listener over the same backends needs a
/// backend port of its own (slb knows a reply's listener by the backend's endpoint).
pub const SECOND_BACKEND_PORT: u16 = 8081;
/// Port of the TCP listener in [`SlbConfig::standard`].
pub const VIP_TCP_PORT: u16 = 80;
/// Port of the UDP listener in [`SlbConfig::standard`].
pub const VIP_UDP_PORT: u16 = 53;

/// `VIP:80`, the TCP listener of [`SlbConfig::standard`].
pub fn vip_tcp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_TCP_PORT))
}

/// `VIP:53`, the UDP listener of [`SlbConfig::standard`].
pub fn vip_udp() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_UDP_PORT))
}

/// Fails `test` unless it runs as root: a test that returned early would show green while
/// asserting nothing.
pub fn require_root(test: &str) {
    assert!(
        is_root(),
        "{test} needs root for network namespaces, veth and XDP (run `cargo xtask test` as root)"
    );
}

/// True when the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
