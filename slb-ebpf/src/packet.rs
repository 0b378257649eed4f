//! Wire headers and the one bounds-checked accessor every read and write goes through.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_HDR_LEN: usize = size_of::<EthHdr>();
pub const IPV4_HDR_LEN: usize = size_of::<Ipv4Hdr>();
/// More-fragments flag and fragment offset.
pub const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
/// Don't fragment.
pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// Fragment offset alone: 0 in the first fragment (the one with the L4 header), not in the rest.
pub const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// The reserved ("evil") bit of the flags.
pub const IPV4_RESERVED_FLAG: u16 = 0x8000;
pub const IPV6_HDR_LEN: usize = size_of::<Ipv6Hdr>();
pub const TCP_HDR_LEN: usize = size_of::<TcpHdr>();
pub const UDP_HDR_LEN: usize = size_of::<UdpHdr>();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// The IPv6 header. Addresses are read and written as 32-bit words, as the kernel's own
/// `struct ipv6hdr` does: they sit 2 bytes off a word boundary behind the Ethernet header, which
/// the verifier allows for packet data (no strict alignment) and the JITs handle, while byte
/// arrays would cost 16 single-byte loads an address.
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version, traffic class and flow label.
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// The part of the TCP and UDP headers this program touches: ports, then (at a protocol-specific
/// offset) the checksum.
#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

#[repr(C)]
pub struct TcpHdr {
    pub ports: Ports,
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub offset_flags: u16,
    pub window: u16,
    pub check: u16,
    pub urgent: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub ports: Ports,
    pub len: u16,
    pub check: u16,
}

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
