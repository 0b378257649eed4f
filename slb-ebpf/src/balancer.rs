//! The `slb_xdp` program: parse → listener → connection/ring → rewrite → forward → count.
//! Replies from backends take the same entry and are translated back to the VIP by their
//! source endpoint alone (no per-flow state on the way back).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::LruHashMap,
    macros::xdp,
    programs::XdpContext,
};
use core::ops::ControlFlow;
use slb_common::{
    checksum::{apply, delta_u16, delta_u32},
    endpoint_filter_bits,
    hash::flow_hash,
    mapped_ipv4, Addr, Backend, BackendEndpoint, Connection, FlowKey, FragmentKey, GlobalCounters,
    ListenerEntry, ListenerKey, PersistKey, Persisted, ReplyNat, BACKEND_F_DRAINING,
    BACKEND_F_PRESENT, CONN_F_CLOSING, ENDPOINT_F_BACKEND, ENDPOINT_F_LISTENER, FRAGMENT_TO_CLIENT,
    HEALTH_DOWN, IPPROTO_TCP, IPPROTO_UDP, LISTENER_F_ACTIVE_STANDBY, LISTENER_F_DSR,
    LISTENER_F_FULLNAT, LISTENER_F_IGNORE_HEALTH, LISTENER_F_MAX_CONNECTIONS, LISTENER_F_PERSIST,
    LISTENER_F_TUNNEL, LISTENER_F_WLC, NO_BACKEND, PROGRAM_SLOT_FULLNAT, PROGRAM_SLOT_IPV4,
    PROGRAM_SLOT_IPV6, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
};

use crate::{
    forward::{cache_slot, now_ns, route_ipv4, send, send_direct, Route},
    fragments, half_open,
    icmp::{self, IPPROTO_ICMP},
    load::{self, Prior},
    maps::{
        BACKENDS, BACKEND_HEALTH, BACKEND_STATS, CONNECTIONS, ENDPOINT_FILTER, LISTENERS,
        LISTENER_STATS, NEXT_HOP_BACKEND, NEXT_HOP_CLIENT, PERSISTENCE, PERSIST_PENDING, PROGRAMS,
        REPLY_NAT, RINGS, SNAT_MAPPINGS,
    },
    packet::{
        ptr_at, EthHdr, Ipv4Hdr, Ports, TcpHdr, UdpHdr, ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6,
        IPV4_DONT_FRAGMENT, IPV4_FRAGMENT_MASK, IPV4_HDR_LEN, IPV4_RESERVED_FLAG, TCP_HDR_LEN,
        UDP_HDR_LEN,
    },
    pick, policy, tunnel,
};

pub(crate) use slb_common::hash::FLOW_HASH_SEED;

#[xdp]
pub fn slb_xdp(ctx: XdpContext) -> u32 {
    let Some(counters) = crate::maps::global_counters() else {
        return XDP_PASS;
    };
    balance(&ctx, counters)
}

#[inline(always)]
fn balance(ctx: &XdpContext, counters: &mut GlobalCounters) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        counters.malformed += 1;
        return XDP_DROP;
    };
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {}
        ETH_P_IPV6 => {
            // Returns only when PROGRAMS has no `slb_xdp6`.
            unsafe { PROGRAMS.tail_call(ctx, PROGRAM_SLOT_IPV6) };
            counters.ipv6_passed += 1;
            return XDP_PASS;
        }
        _ => {
            counters.non_ip_passed += 1;
            return XDP_PASS;
        }
    }
    let header = match parse_ipv4(ctx, eth, counters) {
        ControlFlow::Continue(header) => header,
        ControlFlow::Break(verdict) => return verdict,
    };
    // The datagram a first fragment starts, remembered for its later fragments. Built here, not
    // carried in `Ipv4Header`: moved out of `parse_ipv4`'s result, it took 24 more bytes of stack.
    let fragment = header.first_fragment.then(|| fragments::key(header.ip));
    let (l4, flow) = match parse_l4(ctx, &header, counters) {
        ControlFlow::Continue(parsed) => parsed,
        ControlFlow::Break(verdict) => return verdict,
    };
    dispatch(ctx, eth, &header, &fragment, &l4, &flow, counters)
}

/// An IPv4 header that passed the checks, of a TCP or UDP packet (or a datagram's first
/// fragment) without options.
struct Ipv4Header {
    ip: *mut Ipv4Hdr,
    protocol: u8,
    /// Flags and fragment offset, host order.
    frag_off: u16,
    total_len: usize,
    /// The first fragment of a datagram.
    first_fragment: bool,
}

/// The IPv4 header, or the verdict on a packet that does not go on to the listener lookups:
/// malformed, ICMP (translated as an error about a balanced flow), neither TCP nor UDP, a later
/// fragment (which follows its first one), or with options.
#[inline(always)]
fn parse_ipv4(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    counters: &mut GlobalCounters,
) -> ControlFlow<u32, Ipv4Header> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HDR_LEN) else {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    };
    let (version_ihl, protocol, frag_off, total_len) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
            usize::from(u16::from_be((*ip).total_len)),
        )
    };
    // What the kernel's own IPv4 input would discard is never rewritten or given state.
    let frame_ip_len = ctx.data_end() - ctx.data() - ETH_HDR_LEN;
    if version_ihl >> 4 != 4
        || version_ihl & 0x0f < 5
        || total_len > frame_ip_len
        || total_len < usize::from(version_ihl & 0x0f) * 4
    {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    }
    if protocol == IPPROTO_ICMP && frag_off & IPV4_FRAGMENT_MASK == 0 && version_ihl == 0x45 {
        return ControlFlow::Break(icmp::translate_error(ctx, counters));
    }
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        counters.not_for_us_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    }
    // A first fragment takes the ordinary path.
    let first_fragment = frag_off & IPV4_FRAGMENT_MASK != 0;
    if first_fragment && !fragments::is_first(frag_off) {
        return ControlFlow::Break(fragments::later(ctx, eth, ip, counters));
    }
    if version_ihl & 0x0f != 5 {
        counters.ip_options_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    }
    ControlFlow::Continue(Ipv4Header {
        ip,
        protocol,
        frag_off,
        total_len,
        first_fragment,
    })
}

/// The L4 header and the flow, or the verdict on a packet too short for its L4 header or
/// (cheaply told) for no listener nor backend.
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    header: &Ipv4Header,
    counters: &mut GlobalCounters,
) -> ControlFlow<u32, (L4, FlowKey)> {
    let protocol = header.protocol;
    let first_fragment = header.first_fragment;
    let l4 = header
        .total_len
        .checked_sub(IPV4_HDR_LEN)
        .and_then(|l4_len| {
            l4_header(
                ctx,
                ETH_HDR_LEN + IPV4_HDR_LEN,
                protocol,
                l4_len,
                first_fragment,
            )
        });
    let Some(l4) = l4 else {
        counters.malformed += 1;
        return ControlFlow::Break(XDP_DROP);
    };
    let (src, dst, src_port, dst_port) = unsafe {
        (
            (*header.ip).src,
            (*header.ip).dst,
            u16::from_be((*l4.ports).src),
            u16::from_be((*l4.ports).dst),
        )
    };
    // Before any 40-byte key is built or hashed: neither a listener's endpoint nor a backend's
    // (a filter: false positives take the full lookups below, there are no false negatives).
    // Fragments take the full path: their later fragments follow what the first one did.
    if !first_fragment
        && !endpoint_may_be(dst, dst_port, protocol, ENDPOINT_F_LISTENER)
        && !endpoint_may_be(src, src_port, protocol, ENDPOINT_F_BACKEND)
    {
        counters.not_for_us_passed += 1;
        return ControlFlow::Break(XDP_PASS);
    }
    let flow = FlowKey::ipv4(src, dst, src_port, dst_port, protocol);
    ControlFlow::Continue((l4, flow))
}

/// To a listener: balanced to a backend. From a backend's endpoint: a reply translated back to
/// the VIP. Anything else passes.
#[inline(always)]
fn dispatch(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    header: &Ipv4Header,
    fragment: &Option<FragmentKey>,
    l4: &L4,
    flow: &FlowKey,
    counters: &mut GlobalCounters,
) -> u32 {
    let listener_key = ListenerKey {
        vip: flow.dst,
        port: flow.dst_port,
        protocol: header.protocol,
        _pad: 0,
    };
    if let Some(listener) = unsafe { LISTENERS.get(&listener_key) } {
        let listener = *listener;
        if !l4.valid || header.frag_off & IPV4_RESERVED_FLAG != 0 {
            counters.malformed += 1;
            return XDP_DROP;
        }
        if !policy::acl_admits(flow, &listener, l4.tcp_flags, counters) {
            return XDP_DROP;
        }
        if listener.flags & LISTENER_F_FULLNAT != 0 {
            return hand_to_full_nat(ctx, counters);
        }
        let mut sent_direct_to = NO_BACKEND;
        let verdict = to_backend(
            ctx,
            eth,
            header.ip,
            l4,
            flow,
            &listener,
            &mut sent_direct_to,
            counters,
        );
        if let Some(key) = fragment {
            let sent = fragments::Sent {
                verdict,
                action: fragments::to_backend_action(listener.flags),
                direct_to: sent_direct_to,
            };
            fragments::remember(ctx, key, sent, counters);
        }
        return verdict;
    }
    let endpoint = BackendEndpoint {
        addr: flow.src,
        port: flow.src_port,
        protocol: header.protocol,
        _pad: 0,
    };
    if let Some(nat) = unsafe { REPLY_NAT.get(&endpoint) } {
        let nat = *nat;
        if !l4.valid {
            counters.malformed += 1;
            return XDP_DROP;
        }
        let verdict = to_client(ctx, eth, header.ip, l4, &nat, counters);
        if let Some(key) = fragment {
            let sent = fragments::Sent {
                verdict,
                action: FRAGMENT_TO_CLIENT,
                direct_to: NO_BACKEND,
            };
            fragments::remember(ctx, key, sent, counters);
        }
        return verdict;
    }
    if unsafe { SNAT_MAPPINGS.get(flow) }.is_some() {
        if !l4.valid {
            counters.malformed += 1;
            return XDP_DROP;
        }
        return hand_to_full_nat(ctx, counters);
    }
    if let Some(key) = fragment {
        return fragments::pass_first(key, counters);
    }
    counters.not_for_us_passed += 1;
    XDP_PASS
}

/// Hands a full NAT listener's packet, or a reply of a full NAT flow, to `slb_xdp_fullnat`
/// (a program of its own: its mapping does not fit this one's stack).
#[inline(always)]
fn hand_to_full_nat(ctx: &XdpContext, counters: &mut GlobalCounters) -> u32 {
    // Returns only when PROGRAMS has no program in the slot.
    unsafe { PROGRAMS.tail_call(ctx, PROGRAM_SLOT_FULLNAT) };
    counters.lookup_failed_dropped += 1;
    XDP_DROP
}

#[inline(always)]
pub(crate) fn endpoint_may_be(addr: [u8; 4], port: u16, protocol: u8, bit: u32) -> bool {
    let (word, mask) = endpoint_filter_bits(addr, port, protocol, bit);
    match ENDPOINT_FILTER.get(word) {
        Some(bits) => *bits & mask != 0,
        None => true,
    }
}

/// The L4 header fields the rewrite touches, and whether the header is sane enough to balance.
pub(crate) struct L4 {
    pub(crate) ports: *mut Ports,
    pub(crate) check: *mut u16,
    pub(crate) protocol: u8,
    /// TCP flags (FIN, SYN, RST, ACK ...); 0 for UDP.
    pub(crate) tcp_flags: u8,
    /// Lengths within the IP packet, a TCP data offset of at least 5, no SYN with FIN.
    pub(crate) valid: bool,
}

/// The TCP or UDP header at `offset`, `l4_len` bytes of the IP packet from there on (the first
/// fragment of a datagram when `first_fragment`).
#[inline(always)]
pub(crate) fn l4_header(
    ctx: &XdpContext,
    offset: usize,
    protocol: u8,
    l4_len: usize,
    first_fragment: bool,
) -> Option<L4> {
    if protocol == IPPROTO_TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, offset)?;
        let offset_flags = u16::from_be(unsafe { (*tcp).offset_flags });
        let header_len = usize::from(offset_flags >> 12) * 4;
        let tcp_flags = offset_flags as u8;
        let valid = header_len >= TCP_HDR_LEN
            && header_len <= l4_len
            && tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN) != (TCP_FLAG_SYN | TCP_FLAG_FIN);
        Some(unsafe {
            L4 {
                ports: &raw mut (*tcp).ports,
                check: &raw mut (*tcp).check,
                protocol,
                tcp_flags,
                valid,
            }
        })
    } else {
        let udp = ptr_at::<UdpHdr>(ctx, offset)?;
        let udp_len = usize::from(u16::from_be(unsafe { (*udp).len }));
        // A first fragment holds the whole header and only part of what the UDP length covers.
        let valid = udp_len >= UDP_HDR_LEN
            && l4_len >= UDP_HDR_LEN
            && if first_fragment {
                udp_len > l4_len
            } else {
                udp_len <= l4_len
            };
        Some(unsafe {
            L4 {
                ports: &raw mut (*udp).ports,
                check: &raw mut (*udp).check,
                protocol,
                tcp_flags: 0,
                valid,
            }
        })
    }
}

pub(crate) enum Pick {
    Backend {
        id: u32,
        /// In BACKENDS (array elements stay put): copies of it on the stack, one per call
        /// site, pushed the program past 512 bytes.
        backend: &'static Backend,
        new_flow: bool,
    },
    Refused(Refusal),
}

/// Why a flow gets no backend.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NoBackend,
    LookupFailed,
    /// A new flow over the listener's `max_new_connections_per_second`.
    RateLimited,
    /// A new flow that every backend able to take it is too full for (`max_connections`).
    AtCapacity,
    /// The listener has no least-connections set: its ring decides (never a flow's fate).
    NoSet,
}

impl Pick {
    /// The backend (id, entry, whether the flow is new), or `None` with the drop counted.
    #[inline(always)]
    pub(crate) fn or_count(
        self,
        counters: &mut GlobalCounters,
    ) -> Option<(u32, &'static Backend, bool)> {
        let refusal = match self {
            Pick::Backend {
                id,
                backend,
                new_flow,
            } => return Some((id, backend, new_flow)),
            Pick::Refused(refusal) => refusal,
        };
        match refusal {
            Refusal::NoBackend => counters.no_backend_dropped += 1,
            Refusal::LookupFailed | Refusal::NoSet => counters.lookup_failed_dropped += 1,
            Refusal::RateLimited => counters.new_flows_rate_limited += 1,
            Refusal::AtCapacity => counters.backends_full_dropped += 1,
        }
        None
    }
}

#[inline(always)]
pub(crate) fn present_backend(id: u32) -> Option<&'static Backend> {
    let backend = BACKENDS.get(id)?;
    if backend.flags & BACKEND_F_PRESENT == 0 {
        return None;
    }
    Some(backend)
}

#[inline(always)]
fn is_healthy(id: u32) -> bool {
    !matches!(BACKEND_HEALTH.get(id), Some(&HEALTH_DOWN))
}

/// A backend a flow may (still) use: present, and healthy unless the listener ignores health.
#[inline(always)]
pub(crate) fn usable_backend(id: u32, listener: &ListenerEntry) -> Option<&'static Backend> {
    usable_backend_for(id, listener.flags)
}

/// [`usable_backend`] for a listener with flags `listener_flags`.
#[inline(always)]
pub(crate) fn usable_backend_for(id: u32, listener_flags: u32) -> Option<&'static Backend> {
    let backend = present_backend(id)?;
    if listener_flags & LISTENER_F_IGNORE_HEALTH == 0 && !is_healthy(id) {
        return None;
    }
    Some(backend)
}

/// Connection table first (a known flow keeps its backend whatever the ring says now, unless
/// that backend was removed or declared unhealthy), then the half-open table (a TCP flow between
/// its SYN and its first non-SYN packet), then the listener's policy for a new flow:
/// active/standby by the active's health flag, or persistence, or the Maglev ring.
///
/// A TCP flow enters the connection table only with its first non-SYN packet after one the
/// half-open table holds, so floods of spoofed SYNs or ACKs churn the half-open table and cannot
/// evict an established flow. A non-SYN packet of a flow this node never saw (another node's, or
/// one whose entry expired) is balanced by the same policy, which picks what the SYN would have
/// picked while nothing changed, and tracked from its next packet on.
///
/// `client` is the address persistence keys the flow's client by (its source address, or an
/// IPv6 source's prefix).
///
/// A flow that opens here on a listener whose new flows are placed by load (least connections,
/// `max_connections`), and any new flow of the IPv6 program, is decided by `slb_xdp_pick` (see
/// `pick`), which comes back to
/// `BACK_SLOT` of PROGRAMS with the answer: the load scan's stack does not fit beside the
/// balancing programs' own.
#[inline(always)]
pub(crate) fn pick_backend<const BACK_SLOT: u32>(
    ctx: &XdpContext,
    flow: &FlowKey,
    client: &Addr,
    listener: &ListenerEntry,
    tcp_flags: u8,
    now: u64,
    counters: &mut GlobalCounters,
) -> Pick {
    let closing = tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
    let opening = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let prior = match connection_backend(flow, listener, closing, opening, now) {
        Tracked::Usable(id, backend) => {
            return Pick::Backend {
                id,
                backend,
                new_flow: false,
            }
        }
        Tracked::Unusable(prior) => prior,
        Tracked::Unknown => Prior::Absent,
    };
    let established = prior != Prior::Absent;
    // One hash for the half-open slot and the ring.
    let hash = flow_hash(flow, FLOW_HASH_SEED);
    // Re-picks are counted once decided: a flow decided by `slb_xdp_pick` comes this way twice.
    let mut stale_half_open = false;
    let half_open = half_open_backend(flow, hash, listener, &mut stale_half_open);
    let (id, backend) = match half_open {
        Some(picked) => {
            if established {
                counters.flows_repicked += 1;
            }
            picked
        }
        None => {
            // Opens here: a SYN, or a UDP flow's first packet, of a flow no table knew.
            let opens_here = (opening || flow.protocol != IPPROTO_TCP) && !established;
            let how =
                u32::from(opens_here) * NEW_FLOW_OPENS_HERE + u32::from(opening) * NEW_FLOW_SYN;
            let hash_how = u64::from(hash) | u64::from(how) << 32;
            let by_load = listener.flags & (LISTENER_F_WLC | LISTENER_F_MAX_CONNECTIONS) != 0;
            // The IPv6 program has no room for the policy's code beside its own: all its new
            // flows are decided there.
            let chosen = if opens_here && by_load || BACK_SLOT == PROGRAM_SLOT_IPV6 {
                pick::decided::<BACK_SLOT>(ctx, flow, client, listener, hash_how)
            } else {
                new_flow_choice::<false>(client, hash_how, listener, now, counters)
            };
            if established || stale_half_open {
                counters.flows_repicked += 1;
            }
            let id = match chosen {
                Ok(id) => id,
                Err(refusal) => return Pick::Refused(refusal),
            };
            let Some(backend) = present_backend(id) else {
                return Pick::Refused(Refusal::LookupFailed);
            };
            (id, backend)
        }
    };
    // A SYN, or the first packet of a TCP flow neither table knows (another node's flow, one
    // that idled out, or a spoofed ACK): the half-open table. The flow enters the connection
    // table with its next non-SYN packet, so floods of spoofed SYNs or ACKs (one packet per
    // flow) churn only the half-open table.
    let probation = flow.protocol == IPPROTO_TCP && half_open.is_none() && !established;
    if opening || probation {
        if half_open.is_none() {
            track_half_open(flow, client, hash, listener, id, now, counters);
        }
        return Pick::Backend {
            id,
            backend,
            new_flow: false,
        };
    }
    track_connection(flow, client, listener, id, closing, now, prior);
    Pick::Backend {
        id,
        backend,
        new_flow: true,
    }
}

/// `new_flow_backend`'s `how`: the flow opens on this node (a SYN, or a UDP flow's first
/// packet, of a flow no table knew), so the listener's limits apply.
const NEW_FLOW_OPENS_HERE: u32 = 1;
/// `new_flow_backend`'s `how`: the packet is a SYN.
const NEW_FLOW_SYN: u32 = 2;

/// The backend for a flow neither table holds (its hash in the low half of `hash_how`): by the
/// listener's policy, within its limits when the flow opens here (`NEW_FLOW_*` in the high
/// half); `BY_LOAD`, by its backends' open connections too (only `slb_xdp_pick` has the stack
/// for it).
#[inline(always)]
pub(crate) fn new_flow_choice<const BY_LOAD: bool>(
    client: &Addr,
    hash_how: u64,
    listener: &ListenerEntry,
    now: u64,
    counters: &mut GlobalCounters,
) -> Result<u32, Refusal> {
    let (hash, how) = (hash_how as u32, (hash_how >> 32) as u32);
    let opens_here = how & NEW_FLOW_OPENS_HERE != 0;
    // A flow that opens here is new to every node; an unknown TCP flow's later packet, or a
    // re-picked one, is not, and is never refused by the limits.
    if opens_here && !policy::new_flow_admitted(listener) {
        return Err(Refusal::RateLimited);
    }
    let syn = opens_here && how & NEW_FLOW_SYN != 0;
    let id = policy_backend(client, hash, listener, BY_LOAD && syn, now, counters)?;
    if !BY_LOAD || !opens_here || listener.flags & LISTENER_F_MAX_CONNECTIONS == 0 {
        return Ok(id);
    }
    let picked = load::with_room(id, hash, listener);
    if picked == Err(Refusal::AtCapacity) {
        load::count_at_capacity(listener);
    }
    picked
}

/// What the connection table says about a flow.
enum Tracked {
    /// Its backend, which it keeps.
    Usable(u32, &'static Backend),
    /// Its backend was removed or declared unhealthy: the flow is balanced again, and the
    /// entry (as it was) replaced when the flow is tracked.
    Unusable(Prior),
    /// Not in the table.
    Unknown,
}

/// The flow's backend by the connection table, whose entry this packet refreshes, and closes
/// (counting the close once) or opens again: relinked with its new flags (see `load`).
#[inline(always)]
fn connection_backend(
    flow: &FlowKey,
    listener: &ListenerEntry,
    closing: bool,
    opening: bool,
    now: u64,
) -> Tracked {
    let Some(conn) = CONNECTIONS.get_ptr_mut(flow) else {
        return Tracked::Unknown;
    };
    let (id, flags, last_seen_ns) =
        unsafe { ((*conn).backend_id, (*conn).flags, (*conn).last_seen_ns) };
    let Some(backend) = usable_backend(id, listener) else {
        return Tracked::Unusable(Prior::of(id, flags));
    };
    let was_closing = flags & CONN_F_CLOSING != 0;
    if closing && !was_closing {
        reflag(flow, conn, flags | CONN_F_CLOSING, now);
        count_closed(listener.index, id);
    } else if opening && was_closing {
        // The client reuses the port of a closed flow: same backend, open again.
        reflag(flow, conn, flags & !CONN_F_CLOSING, now);
    } else if last_seen_ns != now {
        // The clock moves once a tick: most packets of a busy flow would write the same value,
        // dirtying a line other CPUs read.
        unsafe { (*conn).last_seen_ns = now };
    }
    Tracked::Usable(id, backend)
}

/// The flow's entry, relinked with `flags` and seen `now` (see `load::relink`).
#[inline(always)]
fn reflag(flow: &FlowKey, conn: *const Connection, flags: u32, now: u64) {
    let (backend_id, listener_index, old_flags) =
        unsafe { ((*conn).backend_id, (*conn).listener_index, (*conn).flags) };
    let prior = Prior::of(backend_id, old_flags);
    load::relink(flow, backend_id, listener_index, flags, now, prior);
}

/// The backend the half-open table picked for this flow, while it is still usable (`stale`
/// when it picked one that is not).
#[inline(always)]
fn half_open_backend(
    flow: &FlowKey,
    hash: u32,
    listener: &ListenerEntry,
    stale: &mut bool,
) -> Option<(u32, &'static Backend)> {
    let id = half_open::picked(flow, hash)?;
    let usable = usable_backend(id, listener).map(|backend| (id, backend));
    *stale = usable.is_none();
    usable
}

/// A flow on probation: its pick in the half-open table (and, for a persistent listener, in the
/// pending persistence table, so that the client's concurrent handshakes agree).
#[inline(always)]
fn track_half_open(
    flow: &FlowKey,
    client: &Addr,
    hash: u32,
    listener: &ListenerEntry,
    id: u32,
    now: u64,
    counters: &mut GlobalCounters,
) {
    half_open::remember(flow, hash, id);
    counters.half_open_tracked += 1;
    if listener.flags & LISTENER_F_PERSIST != 0 {
        persist(&PERSIST_PENDING, client, listener, id, now);
    }
}

/// A flow past its handshake: into the connection table, in place of the entry it had
/// (`prior`), and into the persistence table.
#[inline(always)]
fn track_connection(
    flow: &FlowKey,
    client: &Addr,
    listener: &ListenerEntry,
    id: u32,
    closing: bool,
    now: u64,
    prior: Prior,
) {
    if listener.flags & LISTENER_F_PERSIST != 0 {
        persist(&PERSISTENCE, client, listener, id, now);
    }
    let flags = if closing { CONN_F_CLOSING } else { 0 };
    load::relink(flow, id, listener.index, flags, now, prior);
    if closing {
        count_closed(listener.index, id);
    }
}

/// A new flow's backend by the listener's policy (`syn`: a SYN that opens a flow here, which a
/// least-connections listener balances by load).
#[inline(always)]
fn policy_backend(
    client: &Addr,
    hash: u32,
    listener: &ListenerEntry,
    syn: bool,
    now: u64,
    counters: &mut GlobalCounters,
) -> Result<u32, Refusal> {
    if listener.flags & LISTENER_F_ACTIVE_STANDBY != 0 {
        if is_healthy(listener.active_id) {
            return Ok(listener.active_id);
        }
        counters.standby_picks += 1;
        return Ok(listener.standby_id);
    }
    if let Some(id) = persisted_backend(client, listener, now, counters) {
        return Ok(id);
    }
    if syn && listener.flags & LISTENER_F_WLC != 0 {
        // No set, or no member usable (the ring, built from the same input, names none either
        // unless a verdict is between its flag and its ring): the ring decides.
        match load::least_loaded(hash, listener) {
            Err(Refusal::NoSet | Refusal::NoBackend) => {}
            picked => return picked,
        }
    }
    ring_backend(hash, listener)
}

/// Records in `table` that `client` uses `id`, unless a fresh entry already
/// names another usable backend (two connections of one client racing through their
/// handshakes: the first wins, so later ones follow it).
#[inline(always)]
fn persist<const N: usize>(
    table: &LruHashMap<PersistKey, Persisted, N>,
    client: &Addr,
    listener: &ListenerEntry,
    id: u32,
    now: u64,
) {
    let key = PersistKey {
        client: *client,
        listener_index: listener.index,
    };
    if let Some(entry) = table.get_ptr_mut(&key) {
        let (named, seen) = unsafe { ((*entry).backend_id, (*entry).last_seen_ns) };
        let fresh = now.wrapping_sub(seen) <= u64::from(listener.persist_timeout_s) * 1_000_000_000;
        if fresh && named != id && usable_backend(named, listener).is_some() {
            return;
        }
        unsafe {
            (*entry).backend_id = id;
            (*entry).last_seen_ns = now;
        }
        return;
    }
    let value = Persisted {
        backend_id: id,
        _pad: 0,
        last_seen_ns: now,
    };
    let _ = table.insert(&key, &value, 0);
}

/// The backend `table` persists this client address to, while the entry is fresh and the
/// backend still takes new flows.
#[inline(always)]
fn persisted_in<const N: usize>(
    table: &LruHashMap<PersistKey, Persisted, N>,
    key: &PersistKey,
    listener: &ListenerEntry,
    now: u64,
) -> Option<u32> {
    let entry = unsafe { table.get(key) }?;
    let age = now.wrapping_sub(entry.last_seen_ns);
    if age > u64::from(listener.persist_timeout_s) * 1_000_000_000 {
        return None;
    }
    let id = entry.backend_id;
    let backend = usable_backend(id, listener)?;
    if backend.flags & BACKEND_F_DRAINING != 0 {
        return None;
    }
    Some(id)
}

/// The backend `client` is persisted to: by an established connection, or else by
/// a handshake under way (so that a client's concurrent first connections agree).
#[inline(always)]
fn persisted_backend(
    client: &Addr,
    listener: &ListenerEntry,
    now: u64,
    counters: &mut GlobalCounters,
) -> Option<u32> {
    if listener.flags & LISTENER_F_PERSIST == 0 {
        return None;
    }
    // The key in this CPU's scratch entry, word by word: on the stack it pushed the IPv6
    // program's new-flow call past what its stack allows.
    let key = crate::maps::PERSIST_KEY_SCRATCH.get_ptr_mut(0)?;
    unsafe {
        let words = (&raw mut (*key).client).cast::<u32>();
        let from = (client as *const Addr).cast::<u32>();
        let mut i = 0;
        while i < 4 {
            words.add(i).write_volatile(from.add(i).read_unaligned());
            i += 1;
        }
        (*key).listener_index = listener.index;
    }
    let key = unsafe { &*key };
    let id = match persisted_in(&PERSISTENCE, key, listener, now) {
        Some(id) => id,
        None => persisted_in(&PERSIST_PENDING, key, listener, now)?,
    };
    counters.persistence_hits += 1;
    Some(id)
}

#[inline(always)]
fn ring_backend(hash: u32, listener: &ListenerEntry) -> Result<u32, Refusal> {
    if listener.ring_size == 0 {
        return Err(Refusal::LookupFailed);
    }
    let slot = hash % listener.ring_size;
    match RINGS.get_value(listener.ring_index, &slot) {
        None => Err(Refusal::LookupFailed),
        Some(&NO_BACKEND) => Err(Refusal::NoBackend),
        Some(&id) => Ok(id),
    }
}

/// A listener's packet to its backend: translated (NAT), or sent unchanged to the backend's MAC
/// address (DSR, the backend's id then left in `sent_direct_to` for a first fragment's record).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    flow: &FlowKey,
    listener: &ListenerEntry,
    sent_direct_to: &mut u32,
    counters: &mut GlobalCounters,
) -> u32 {
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    let now = now_ns();
    let picked = pick_backend::<PROGRAM_SLOT_IPV4>(
        ctx,
        flow,
        &flow.src,
        listener,
        l4.tcp_flags,
        now,
        counters,
    );
    let Some((id, backend, new_flow)) = picked.or_count(counters) else {
        return XDP_DROP;
    };
    let cache = NEXT_HOP_BACKEND
        .get_ptr_mut(id)
        .unwrap_or(core::ptr::null_mut());
    let backend_addr = mapped_ipv4(&backend.addr);
    let route = route_ipv4(ctx, ip, backend_addr, l4.protocol, cache, now, counters);
    let tunnel = listener.flags & LISTENER_F_TUNNEL != 0;
    if tunnel {
        if let Some(verdict) = tunnel::too_big_ipv4(ctx, ip, &route, counters) {
            return verdict;
        }
    } else if let Route::TooBig(mtu) = route {
        if dont_fragment(ip) {
            return icmp::reply_too_big(ctx, mtu, counters);
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(listener.index, id, bytes, new_flow);
    if listener.flags & LISTENER_F_DSR != 0 {
        *sent_direct_to = id;
        if tunnel {
            return tunnel::send_ipv4(ctx, ip, backend, route, counters);
        }
        return send_direct(ctx, eth, route, counters);
    }
    unsafe { translate(ip, l4, Endpoint::Destination, &backend.addr, backend.port) };
    send(ctx, eth, route, counters)
}

/// A packet from a backend's endpoint: a reply to translate back to the VIP, unless it is for
/// this host (a health check's or the proxy's own connection to the backend).
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    nat: &ReplyNat,
    counters: &mut GlobalCounters,
) -> u32 {
    let client = u32::from_ne_bytes(unsafe { (*ip).dst });
    let cache = cache_slot(&NEXT_HOP_CLIENT, client);
    // Routed before the rewrite: the route to the client does not depend on the source.
    let route = route_ipv4(
        ctx,
        ip,
        unsafe { (*ip).dst },
        l4.protocol,
        cache,
        now_ns(),
        counters,
    );
    match route {
        Route::Local => {
            counters.local_from_backend_passed += 1;
            return XDP_PASS;
        }
        Route::TooBig(mtu) if dont_fragment(ip) => {
            return icmp::reply_too_big(ctx, mtu, counters);
        }
        _ => {}
    }
    if ttl_expired(ip, counters) {
        return XDP_PASS;
    }
    unsafe { translate(ip, l4, Endpoint::Source, &nat.vip, nat.vip_port) };
    counters.replies_translated += 1;
    send(ctx, eth, route, counters)
}

#[inline(always)]
pub(crate) fn dont_fragment(ip: *const Ipv4Hdr) -> bool {
    u16::from_be(unsafe { (*ip).frag_off }) & IPV4_DONT_FRAGMENT != 0
}

/// A packet whose TTL would run out here goes to the stack, which sends the ICMP error.
#[inline(always)]
pub(crate) fn ttl_expired(ip: *const Ipv4Hdr, counters: &mut GlobalCounters) -> bool {
    let expired = unsafe { (*ip).ttl } <= 1;
    if expired {
        counters.ttl_expired_passed += 1;
    }
    expired
}

/// Which end of a packet the NAT rewrite replaces.
pub(crate) enum Endpoint {
    /// Towards a backend: the destination becomes the backend.
    Destination,
    /// Towards the client: the source becomes the VIP.
    Source,
}

/// The NAT rewrite: one end's address (IPv4-mapped `addr`) and port (host order) replaced, TTL
/// decremented as a router does, and both checksums fixed with one incremental update each
/// (the address is in the IP header and in the L4 pseudo-header).
#[inline(always)]
pub(crate) unsafe fn translate(ip: *mut Ipv4Hdr, l4: &L4, end: Endpoint, addr: &Addr, port: u16) {
    unsafe { rewrite(ip, l4, end, addr, port, true) }
}

/// [`translate`], with the TTL decremented or not (full NAT rewrites both ends of a packet,
/// which passes this hop once).
#[inline(always)]
pub(crate) unsafe fn rewrite(
    ip: *mut Ipv4Hdr,
    l4: &L4,
    end: Endpoint,
    addr: &Addr,
    port: u16,
    decrement_ttl: bool,
) {
    let new_addr = mapped_ipv4(addr);
    let new_port = port.to_be();
    unsafe {
        let (addr_field, port_field) = match end {
            Endpoint::Destination => (&raw mut (*ip).dst, &raw mut (*l4.ports).dst),
            Endpoint::Source => (&raw mut (*ip).src, &raw mut (*l4.ports).src),
        };
        let addr_delta = delta_u32(
            u32::from_ne_bytes(*addr_field),
            u32::from_ne_bytes(new_addr),
        );
        let ttl_delta = if decrement_ttl {
            decrement_ttl_unchecked(ip)
        } else {
            0
        };
        (*ip).check = apply((*ip).check, addr_delta + ttl_delta);
        *addr_field = new_addr;

        let check = *l4.check;
        let port_delta = delta_u16(*port_field, new_port);
        *port_field = new_port;
        // A UDP checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xffff.
        if l4.protocol == IPPROTO_UDP && check == 0 {
            return;
        }
        let mut check = apply(check, addr_delta + port_delta);
        if l4.protocol == IPPROTO_UDP && check == 0 {
            check = 0xffff;
        }
        *l4.check = check;
    }
}

/// Decrements the TTL, leaving the header checksum to the caller: the delta it needs is
/// returned, to be applied with the packet's other changes in one update.
#[inline(always)]
pub(crate) unsafe fn decrement_ttl_unchecked(ip: *mut Ipv4Hdr) -> u32 {
    unsafe {
        let (ttl, protocol) = ((*ip).ttl, (*ip).protocol);
        (*ip).ttl = ttl - 1;
        delta_u16(
            u16::from_ne_bytes([ttl, protocol]),
            u16::from_ne_bytes([ttl - 1, protocol]),
        )
    }
}

/// Decrements the TTL and fixes the header checksum for it.
#[inline(always)]
pub(crate) unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    unsafe {
        let delta = decrement_ttl_unchecked(ip);
        (*ip).check = apply((*ip).check, delta);
    }
}

#[inline(always)]
fn count_closed(listener_index: u32, backend_id: u32) {
    if let Some(c) = LISTENER_STATS.get_ptr_mut(listener_index) {
        unsafe { (*c).closed_connections += 1 };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe { (*c).closed_connections += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_traffic(listener_index: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    let new = u64::from(new_flow);
    if let Some(c) = LISTENER_STATS.get_ptr_mut(listener_index) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_connections += new;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_connections += new;
        }
    }
}
