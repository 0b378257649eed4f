//! Sending a packet on its way: the next hop comes from a per-CPU cache or, at most once a
//! second per destination, from the kernel FIB (the largest single cost of the fast path); then
//! the packet leaves by XDP_TX or XDP_REDIRECT, or goes to the stack when only the stack can
//! proceed. Routing is apart from sending so a reply can be routed before it is rewritten: a
//! packet from a backend's endpoint to this host is no reply to translate.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    btf_maps::LruPerCpuHashMap,
    helpers::{
        bpf_ktime_get_coarse_ns,
        generated::{bpf_check_mtu, bpf_fib_lookup},
    },
    programs::XdpContext,
    EbpfContext,
};
use core::mem::size_of;

use crate::{
    maps::{EGRESS, FIB_PARAMS},
    packet::{EthHdr, Ipv4Hdr, Ipv6Hdr, IPV6_HDR_LEN},
};
use slb_common::{GlobalCounters, NextHop, NextHop6, NEXT_HOP_TTL_NS};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_BLACKHOLE: i64 = 1;
const BPF_FIB_LKUP_RET_UNREACHABLE: i64 = 2;
const BPF_FIB_LKUP_RET_PROHIBIT: i64 = 3;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// Where a packet goes next.
pub enum Route {
    /// Out of an interface, to this next hop.
    Hop(NextHop),
    /// The destination is this host.
    Local,
    /// Only the stack can proceed (no neighbour entry yet, MTU exceeded, an interface slb is
    /// not attached to): the packet is passed, already rewritten.
    Stack,
    /// No route (blackhole, unreachable, prohibited).
    Drop,
    /// Larger than the path's MTU (the value).
    TooBig(u16),
}

/// The data plane's clock, read once per packet: CLOCK_MONOTONIC at tick resolution, which is
/// all that ages in seconds and a 1 s next-hop cache need, at a fraction of the cost of
/// `bpf_ktime_get_ns` (~40 ns here).
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The next hop towards `dst` for the packet whose IPv4 header is `ip` (routed before it is
/// rewritten, so an oversized packet can still be answered with an ICMP error that quotes it as
/// its sender sent it), from this CPU's `cache` slot (may be null) or the FIB, counting cache
/// hits and lookups.
#[inline(always)]
pub fn route_ipv4(
    ctx: &XdpContext,
    ip: *const Ipv4Hdr,
    dst: [u8; 4],
    protocol: u8,
    cache: *mut NextHop,
    now: u64,
    counters: &mut GlobalCounters,
) -> Route {
    let cached = !cache.is_null()
        && unsafe {
            (*cache).ifindex != 0
                && (*cache).dst == dst
                && now.wrapping_sub((*cache).checked_ns) < NEXT_HOP_TTL_NS
        };
    let hop = if cached {
        counters.next_hop_cached += 1;
        unsafe { *cache }
    } else {
        counters.fib_lookups += 1;
        let ingress = ctx.ingress_ifindex() as u32;
        let found = fib_next_hop(ctx, ip, dst, protocol, ingress, now);
        match found {
            FibAnswer::Hop(hop) => {
                if !cache.is_null() {
                    unsafe { *cache = hop };
                }
                hop
            }
            FibAnswer::Route(route) => return route,
        }
    };
    route_of(hop, usize::from(u16::from_be(unsafe { (*ip).total_len })))
}

/// [`route_ipv4`]'s twin for the IPv6 packet whose header is `ip`, towards `dst` (words in
/// memory order), from this CPU's `cache` slot (may be null) or the FIB.
#[inline(always)]
pub fn route_ipv6(
    ctx: &XdpContext,
    ip: *const Ipv6Hdr,
    dst: [u32; 4],
    protocol: u8,
    cache: *mut NextHop6,
    now: u64,
    counters: &mut GlobalCounters,
) -> Route {
    let cached = !cache.is_null()
        && unsafe {
            let cached_dst = &*((&raw const (*cache).dst) as *const [u32; 4]);
            (*cache).hop.ifindex != 0
                && *cached_dst == dst
                && now.wrapping_sub((*cache).hop.checked_ns) < NEXT_HOP_TTL_NS
        };
    let hop = if cached {
        counters.next_hop_cached += 1;
        unsafe { (*cache).hop }
    } else {
        counters.fib_lookups += 1;
        let ingress = ctx.ingress_ifindex() as u32;
        match fib_next_hop6(ctx, ip, dst, protocol, ingress, now) {
            FibAnswer::Hop(hop) => {
                if !cache.is_null() {
                    unsafe {
                        *((&raw mut (*cache).dst) as *mut [u32; 4]) = dst;
                        (*cache).hop = hop;
                    }
                }
                hop
            }
            FibAnswer::Route(route) => return route,
        }
    };
    let packet_len = IPV6_HDR_LEN + usize::from(u16::from_be(unsafe { (*ip).payload_len }));
    route_of(hop, packet_len)
}

/// Where a packet of `packet_len` bytes (IP header on) goes with next hop `hop`.
#[inline(always)]
fn route_of(hop: NextHop, packet_len: usize) -> Route {
    if hop.local != 0 {
        return Route::Local;
    }
    if packet_len > usize::from(hop.mtu) {
        return Route::TooBig(hop.mtu);
    }
    Route::Hop(hop)
}

/// This CPU's next-hop cache slot for `key` in `map`, made (zeroed: empty) when there is none;
/// null when the LRU cannot take it (the lookup then goes to the FIB).
#[inline(always)]
pub fn cache_slot<K, V, const N: usize>(map: &LruPerCpuHashMap<K, V, N>, key: K) -> *mut V {
    if let Some(slot) = map.get_ptr_mut(&key) {
        return slot;
    }
    let mut empty = core::mem::MaybeUninit::<V>::uninit();
    let _ = map.insert(&key, &*zero_in_place(&mut empty), 0);
    map.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut())
}

/// Sends the (rewritten) packet along `route`, counting the outcome.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    route: Route,
    counters: &mut GlobalCounters,
) -> u32 {
    let hop = match route {
        Route::Hop(hop) => hop,
        // A balanced packet for this host: the stack delivers it. One too big for the path
        // without DF set: the stack fragments it.
        Route::Local | Route::Stack | Route::TooBig(_) => {
            counters.fib_passed += 1;
            return xdp_action::XDP_PASS;
        }
        Route::Drop => {
            counters.fib_dropped += 1;
            return xdp_action::XDP_DROP;
        }
    };
    let ingress = ctx.ingress_ifindex() as u32;
    let egress = hop.ifindex;
    if egress == ingress {
        set_macs(eth, &hop);
        counters.tx += 1;
        return xdp_action::XDP_TX;
    }
    // The redirect happens after the program returns; the helper only looks the interface up,
    // answering XDP_PASS for one slb is not attached to (the stack forwards those, and must see
    // this host's MAC as the destination), so the MACs are written only after it said yes.
    match EGRESS.redirect(egress, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => {
            set_macs(eth, &hop);
            counters.redirected += 1;
            action
        }
        Err(_) => {
            counters.egress_not_attached_passed += 1;
            xdp_action::XDP_PASS
        }
    }
}

/// Sends a DSR listener's packet, unchanged, in a frame to its backend's MAC address. Only a
/// backend on the link itself can take it: through a gateway, or handed to the stack to resolve
/// the address, the packet would be routed by its destination, the VIP, back here.
#[inline(always)]
pub fn send_direct(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    route: Route,
    counters: &mut GlobalCounters,
) -> u32 {
    match route {
        Route::Hop(hop) if hop.on_link == 0 => {
            counters.dsr_backend_off_link += 1;
            xdp_action::XDP_DROP
        }
        Route::Stack => {
            counters.dsr_next_hop_unresolved += 1;
            xdp_action::XDP_DROP
        }
        Route::TooBig(_) => {
            counters.dsr_too_big_dropped += 1;
            xdp_action::XDP_DROP
        }
        route => send(ctx, eth, route, counters),
    }
}

#[inline(always)]
fn set_macs(eth: *mut EthHdr, hop: &NextHop) {
    unsafe {
        (*eth).dst = hop.dmac;
        (*eth).src = hop.smac;
    }
}

/// `bpf_fib_lookup`'s parameters, 8-byte aligned for [`zero_words`].
#[repr(C, align(8))]
pub struct AlignedFibParams(FibParams);

/// Zeroes `value` in place with 64-bit volatile stores and hands it out initialised. `T` must be
/// 8-byte aligned, a multiple of 8 bytes, and valid all-zero. `mem::zeroed`, zero literals and
/// a zeroed value moved into place all become calls to a byte-by-byte `memset` in the BPF
/// program; volatile stores into the final place are not merged back into one.
#[inline(always)]
pub fn zero_in_place<T>(value: &mut core::mem::MaybeUninit<T>) -> &mut T {
    // SAFETY: a MaybeUninit<T> is valid for writes of a T.
    unsafe { zero_words(value.as_mut_ptr()) }
}

/// [`zero_in_place`] for a value behind a pointer (a map value).
///
/// # Safety
/// `value` must be valid for writes of a `T`, and nothing else may refer to it meanwhile.
#[inline(always)]
pub unsafe fn zero_words<'a, T>(value: *mut T) -> &'a mut T {
    const { assert!(size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() == 8) };
    let words = value.cast::<u64>();
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: in bounds of `value`, 8-byte aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
    // SAFETY: every byte was written, and all-zero is a valid T (checked by the callers' types:
    // plain integers and byte arrays).
    unsafe { &mut *value }
}

enum FibAnswer {
    /// A next hop worth caching: a neighbour to send to, or this host.
    Hop(NextHop),
    Route(Route),
}

/// This CPU's `bpf_fib_lookup` parameters, zeroed: in a per-CPU map, not on the stack, where
/// 64 bytes pushed the program past 512.
#[inline(always)]
fn fib_params<'a>() -> Option<&'a mut FibParams> {
    let scratch = FIB_PARAMS.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; XDP programs do not nest on a CPU.
    Some(unsafe { &mut zero_words(scratch).0 })
}

/// Asks the FIB.
#[inline(always)]
fn fib_next_hop(
    ctx: &XdpContext,
    ip: *const Ipv4Hdr,
    dst: [u8; 4],
    protocol: u8,
    ingress: u32,
    now: u64,
) -> FibAnswer {
    let Some(params) = fib_params() else {
        return FibAnswer::Route(Route::Stack);
    };
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = protocol;
        params.__bindgen_anon_1.tot_len = u16::from_be((*ip).total_len);
        params.__bindgen_anon_2.tos = (*ip).tos;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
        params.ifindex = ingress;
    }
    fib_answer(ctx, params, dst, ingress, now)
}

/// [`fib_next_hop`] for an IPv6 packet.
#[inline(always)]
fn fib_next_hop6(
    ctx: &XdpContext,
    ip: *const Ipv6Hdr,
    dst: [u32; 4],
    protocol: u8,
    ingress: u32,
    now: u64,
) -> FibAnswer {
    let Some(params) = fib_params() else {
        return FibAnswer::Route(Route::Stack);
    };
    unsafe {
        params.family = AF_INET6;
        params.l4_protocol = protocol;
        // The kernel checks the route's MTU against it, as for IPv4.
        params.__bindgen_anon_1.tot_len =
            (IPV6_HDR_LEN as u16).wrapping_add(u16::from_be((*ip).payload_len));
        // Traffic class and flow label (the version bits are ignored).
        params.__bindgen_anon_2.flowinfo = (*ip).version_class_flow & 0xffff_ff0fu32;
        let (src_field, dst_field) = (
            &raw mut params.__bindgen_anon_3.ipv6_src,
            &raw mut params.__bindgen_anon_4.ipv6_dst,
        );
        let src = (*ip).src;
        // Word by word: whole 16-byte copies into the union became `memmove` calls.
        for i in 0..4 {
            core::ptr::write_volatile(&raw mut (*src_field)[i], src[i]);
            core::ptr::write_volatile(&raw mut (*dst_field)[i], dst[i]);
        }
        params.ifindex = ingress;
    }
    match fib_answer(ctx, params, [0; 4], ingress, now) {
        FibAnswer::Hop(mut hop) => {
            let answered = &raw const params.__bindgen_anon_4.ipv6_dst;
            let mut same = true;
            for i in 0..4 {
                same &= unsafe { core::ptr::read_volatile(&raw const (*answered)[i]) } == dst[i];
            }
            hop.on_link = u8::from(same);
            FibAnswer::Hop(hop)
        }
        other => other,
    }
}

/// Asks the FIB with `params` filled in, and turns its answer into a next hop for IPv4
/// destination `dst` (zero for IPv6: [`NextHop6`] holds the address).
#[inline(always)]
fn fib_answer(
    ctx: &XdpContext,
    params: &mut FibParams,
    dst: [u8; 4],
    ingress: u32,
    now: u64,
) -> FibAnswer {
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => FibAnswer::Hop(NextHop {
            dst,
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
            local: 0,
            // The FIB writes a gateway, when there is one, over the destination (IPv6: set
            // by the caller, which knows the whole address).
            on_link: u8::from(
                unsafe { params.__bindgen_anon_4.ipv4_dst } == u32::from_ne_bytes(dst),
            ),
            mtu: device_mtu(ctx, params.ifindex),
            checked_ns: now,
        }),
        // Cached too: replies from a backend's endpoint to this host (health checks, the
        // proxy) come at the proxy's packet rate.
        BPF_FIB_LKUP_RET_NOT_FWDED => FibAnswer::Hop(NextHop {
            dst,
            ifindex: ingress,
            // Not used for this host; the FIB's bytes avoid a memset of zero arrays.
            smac: params.smac,
            dmac: params.dmac,
            local: 1,
            on_link: 0,
            mtu: u16::MAX,
            checked_ns: now,
        }),
        // The route's MTU is smaller than the packet (the FIB checks it against tot_len).
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            FibAnswer::Route(Route::TooBig(unsafe { params.__bindgen_anon_1.mtu_result }))
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            FibAnswer::Route(Route::Drop)
        }
        // No neighbour entry yet, forwarding disabled, MTU exceeded: the stack routes the
        // rewritten packet (resolving ARP, or sending the ICMP error) itself.
        _ => FibAnswer::Route(Route::Stack),
    }
}

/// The MTU of interface `ifindex` (the kernel writes the device MTU back whatever the check
/// says); 1500 when the helper refuses.
#[inline(always)]
fn device_mtu(ctx: &XdpContext, ifindex: u32) -> u16 {
    let mut mtu: u32 = 0;
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, 0, 0) };
    if rc < 0 || mtu == 0 || mtu > u32::from(u16::MAX) {
        return 1500;
    }
    mtu as u16
}
