//! Test harness for `slb`: network-namespace topologies, a backend echo server, traffic
//! generators that run inside a namespace, a distribution table, the config builder (on slb's
//! own config schema) and the driver of the `slb` daemon.
//!
//! Everything here needs root (namespaces, veths, XDP). Integration tests call
//! [`require_root`] first, so that a run without root fails saying why instead of passing
//! without having asserted anything.

pub mod bird;
pub mod config;
pub mod exec;
pub mod http;
pub mod report;
pub mod scale_out;
pub mod segment;
pub mod slb;
pub mod topology;
pub mod traffic;

pub use config::SlbConfig;
pub use exec::{in_netns, CommandError};
pub use report::Distribution;
pub use slb::SlbDaemon;
pub use topology::Topology;
pub use traffic::{LongLivedStreams, TrafficOptions, TrafficReport};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How far, in percentage points, a backend's share of a few thousand connections may be from
/// its weight's share in the tests that check a distribution (about four standard deviations
/// at 1600 connections).
pub const SHARE_TOLERANCE_PP: f64 = 5.0;
/// Virtual IP the listeners use. No interface carries it: the client reaches it through its
/// default route and the XDP program on the slb side of the client veth intercepts it.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 10);
/// Address of the client (`c0` in the client namespace).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
/// Address of the load balancer on the client side (`s0` in the slb namespace).
pub const SLB_CLIENT_SIDE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// The IPv6 VIP (on no interface, like [`VIP`]).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0x100, 0, 0, 0, 0, 0x10);
/// IPv6 address of the client (`c0`).
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 2);
/// IPv6 address of the load balancer on the client side (`s0`).
pub const SLB_CLIENT_SIDE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 1);
/// Port the test server listens on (TCP and UDP) in every backend namespace.
pub const BACKEND_PORT: u16 = 8080;
/// The test servers also answer here: a second tcp/udp listener over the same backends needs a
/// backend port of its own (slb knows a reply's listener by the backend's endpoint).
pub const SECOND_BACKEND_PORT: u16 = 8081;
/// Port of the TCP listener in [`SlbConfig::standard`].
pub const VIP_TCP_PORT: u16 = 80;
/// Port of the UDP listener in [`SlbConfig::standard`].
pub const VIP_UDP_PORT: u16 = 53;

/// Every topology is dual stack: the tests pick a family, and the addresses of the VIP, the
/// client and the backends, the listeners of [`SlbConfig::standard_in`] and the sockets of the
/// traffic generators follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `IPv4` or `IPv6`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// [`VIP`] or [`VIP6`].
    pub fn vip(self) -> IpAddr {
        match self {
            Family::V4 => VIP.into(),
            Family::V6 => VIP6.into(),
        }
    }

    /// [`CLIENT_ADDR`] or [`CLIENT_ADDR6`].
    pub fn client_addr(self) -> IpAddr {
        match self {
            Family::V4 => CLIENT_ADDR.into(),
            Family::V6 => CLIENT_ADDR6.into(),
        }
    }

    /// [`SLB_CLIENT_SIDE_ADDR`] or [`SLB_CLIENT_SIDE_ADDR6`].
    pub fn slb_client_side_addr(self) -> IpAddr {
        match self {
            Family::V4 => SLB_CLIENT_SIDE_ADDR.into(),
            Family::V6 => SLB_CLIENT_SIDE_ADDR6.into(),
        }
    }

    /// Address of backend `i` (1-based): [`Topology::backend_addr`] or
    /// [`Topology::backend_addr6`].
    pub fn backend_addr(self, i: usize) -> IpAddr {
        match self {
            Family::V4 => Topology::backend_addr(i).into(),
            Family::V6 => Topology::backend_addr6(i).into(),
        }
    }

    /// The unspecified address (`0.0.0.0` or `::`), to bind a client socket of this family.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `VIP:80` of this family, the TCP listener of [`SlbConfig::standard_in`].
    pub fn vip_tcp(self) -> SocketAddr {
        SocketAddr::new(self.vip(), VIP_TCP_PORT)
    }

    /// `VIP:53` of this family, the UDP listener of [`SlbConfig::standard_in`].
    pub fn vip_udp(self) -> SocketAddr {
        SocketAddr::new(self.vip(), VIP_UDP_PORT)
    }
}

/// `VIP:80`, the TCP listener of [`SlbConfig::standard`].
pub fn vip_tcp() -> SocketAddr {
    Family::V4.vip_tcp()
}

/// `VIP:53`, the UDP listener of [`SlbConfig::standard`].
pub fn vip_udp() -> SocketAddr {
    Family::V4.vip_udp()
}

/// `[VIP6]:80`, the TCP listener of [`SlbConfig::standard_v6`].
pub fn vip6_tcp() -> SocketAddr {
    Family::V6.vip_tcp()
}

/// `[VIP6]:53`, the UDP listener of [`SlbConfig::standard_v6`].
pub fn vip6_udp() -> SocketAddr {
    Family::V6.vip_udp()
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
