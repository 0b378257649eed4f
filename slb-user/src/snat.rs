//! `slb snat`: the full NAT mappings the data plane holds, so an operator can tell which client
//! a backend's connection from an SNAT address and port is (backends never see the client's
//! address in full NAT). Read from the pinned `SNAT_MAPPINGS`, the map the data plane itself
//! translates replies by.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::Context as _;
use serde::Serialize;
use slb_common::{pinned, FlowKey, SnatMapping, CONN_F_CLOSING, SNAT_F_CONFIRMED};

use crate::applied::AppliedState;
use crate::instance::pin_dir;
use crate::reconcile::addr_of_data_plane;

/// One full NAT flow.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnatFlow {
    pub protocol: &'static str,
    /// What the client connected to, and from where.
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The listener's name (its index when the applied state does not name it).
    pub listener: String,
    /// What the backend sees: the connection comes from `snat`.
    pub snat: SocketAddr,
    pub backend: SocketAddr,
    /// Seconds since the flow's last packet.
    pub idle_s: u64,
    /// Past the handshake (a non-SYN packet, or any UDP datagram, from the client).
    pub confirmed: bool,
    /// The client sent FIN or RST.
    pub closing: bool,
}

fn socket(addr: &slb_common::Addr, port: u16) -> SocketAddr {
    SocketAddr::new(addr_of_data_plane(*addr), port)
}

/// `key` (a reply's flow: backend → SNAT endpoint) and its mapping as a [`SnatFlow`].
pub fn describe(
    key: &FlowKey,
    mapping: &SnatMapping,
    state: &AppliedState,
    now_ns: u64,
) -> SnatFlow {
    let listener = state
        .listeners
        .iter()
        .find(|l| l.index == mapping.listener_index)
        .map_or_else(
            || format!("#{}", mapping.listener_index),
            |l| l.name.clone(),
        );
    SnatFlow {
        protocol: match key.protocol {
            slb_common::IPPROTO_TCP => "tcp",
            slb_common::IPPROTO_UDP => "udp",
            _ => "?",
        },
        client: socket(&mapping.client, mapping.client_port),
        vip: socket(&mapping.vip, mapping.vip_port),
        listener,
        snat: socket(&key.dst, key.dst_port),
        backend: socket(&key.src, key.src_port),
        idle_s: now_ns.saturating_sub(mapping.last_seen_ns) / 1_000_000_000,
        confirmed: mapping.flags & SNAT_F_CONFIRMED != 0,
        closing: mapping.flags & CONN_F_CLOSING != 0,
    }
}

/// The instance's full NAT flows, those of `address` only when given (a client's address, or
/// an SNAT address), sorted by SNAT endpoint.
pub fn flows(instance: &str, address: Option<IpAddr>) -> anyhow::Result<Vec<SnatFlow>> {
    crate::dataplane::ensure_bpffs()?;
    let state = AppliedState::read(instance)?;
    let map = crate::maps::open_data(&pin_dir(instance), &pinned::SNAT_MAPPINGS)?;
    let now = crate::flows::monotonic_ns();
    let mut flows = Vec::new();
    crate::flows::for_each_entry(
        map.fd().as_fd().as_raw_fd(),
        |key: &FlowKey, mapping: &SnatMapping| {
            let flow = describe(key, mapping, &state, now);
            if address.is_none_or(|a| flow.client.ip() == a || flow.snat.ip() == a) {
                flows.push(flow);
            }
        },
    )
    .context("reading SNAT_MAPPINGS")?;
    flows.sort_by_key(|f| (f.snat, f.backend));
    Ok(flows)
}

/// `slb snat`'s text: one line per flow.
pub fn render(flows: &[SnatFlow]) -> String {
    if flows.is_empty() {
        return "no full NAT flows\n".into();
    }
    let mut out = String::new();
    for f in flows {
        let state = match (f.confirmed, f.closing) {
            (_, true) => "closing",
            (true, false) => "open",
            (false, false) => "handshake",
        };
        out.push_str(&format!(
            "{} {} -> {} ({}) as {} -> backend {}, {state}, idle {}s\n",
            f.protocol, f.client, f.vip, f.listener, f.snat, f.backend, f.idle_s
        ));
    }
    out
}
