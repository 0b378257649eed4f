//! Map keys and values. Every address is 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`)
//! so IPv6 needs no new layout. Ports are in host byte order, which keeps `bpftool` dumps readable.

/// Listeners one instance can hold.
pub const MAX_LISTENERS: u32 = 64;
/// Backend ids index the backends array, so this is also the largest id plus one. A backend id
/// belongs to one listener (health and counters are per listener), so 64 listeners × 256.
pub const MAX_BACKENDS: u32 = 16384;
/// Entries of the source-address persistence table.
pub const MAX_PERSISTENCE: u32 = 1 << 18;
/// Each listener owns two Maglev rings: the daemon fills the idle one, then flips the listener to
/// it, so the data plane never reads a half-written table.
pub const RINGS_PER_LISTENER: u32 = 2;
/// Slots of RINGS, the array of ring maps: ring `r` of listener `i` is at `i × 2 + r`.
pub const RING_SLOTS: u32 = MAX_LISTENERS * RINGS_PER_LISTENER;
/// Flags of each ring (an inner map of RINGS, created by the daemon for the listeners it has, so
/// ring memory follows the config): `BPF_F_MMAPABLE`, so the daemon writes a ring as memory
/// instead of one syscall per slot, and `BPF_F_INNER_MAP`, so rings may have any size
/// (`maglev_table_size`) whatever the template compiled into the program.
pub const RINGS_MAP_FLAGS: u32 = (1 << 10) | (1 << 12);
/// Default Maglev ring size (prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Largest ring size the config accepts (prime, as Maglev needs).
pub const MAX_RING_SIZE: u32 = 655373;
/// Entries of the connection table (established flows) as compiled; the daemon sizes the map
/// from the config's `max_connections` at load time.
pub const MAX_CONNECTIONS: u32 = 1 << 20;
/// `max_connections` when the config does not say: ~30 MiB of kernel memory.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1 << 18;
/// Bounds of `max_connections`.
pub const MIN_MAX_CONNECTIONS: u32 = 1 << 10;
pub const MAX_MAX_CONNECTIONS: u32 = 1 << 24;
/// Slots of the half-open table: TCP flows between their SYN and their first non-SYN packet.
/// A SYN flood churns only this table; at 150k SYN/s a slot keeps its flow ~0.9 s on average,
/// far longer than a real client's handshake, and a flow whose slot was taken over is still
/// balanced by the ring. A power of two (the slot is the flow hash's low bits).
pub const MAX_HALF_OPEN: u32 = 1 << 17;
/// How long a TCP flow stays in the connection table after the client's FIN or RST (the backend
/// may still be sending; its replies need no state, the client's ACKs refresh the entry).
pub const TCP_CLOSING_TIMEOUT_S: u32 = 10;
/// Default idle timeouts of a flow in the connection table (a listener's `idle_timeout`).
pub const DEFAULT_TCP_IDLE_TIMEOUT_S: u32 = 900;
pub const DEFAULT_UDP_IDLE_TIMEOUT_S: u32 = 90;
/// Interfaces the devmap can redirect to.
pub const MAX_INTERFACES: u32 = 64;
/// Client addresses whose next hop the reply path caches (per CPU).
pub const MAX_CLIENT_NEXT_HOPS: u32 = 65536;
/// The program array PROGRAMS: the programs `slb_xdp` and `slb_xdp6` hand frames to.
pub const TAIL_CALL_PROGRAMS: u32 = 6;
/// PROGRAMS' slot of `slb_xdp6`, to which `slb_xdp` hands every IPv6 frame (a program of its
/// own: inlined into `slb_xdp`, its 16-byte addresses would not fit the 512-byte stack).
pub const PROGRAM_SLOT_IPV6: u32 = 0;
/// PROGRAMS' slot of `slb_xdp6_fragment`, to which `slb_xdp6` hands IPv6 fragments after the
/// first (a program of its own for the same reason).
pub const PROGRAM_SLOT_IPV6_FRAGMENT: u32 = 1;
/// PROGRAMS' slot of `slb_xdp6_icmp`, to which `slb_xdp6` hands ICMPv6.
pub const PROGRAM_SLOT_IPV6_ICMP: u32 = 2;
/// PROGRAMS' slot of `slb_xdp_fullnat`, to which `slb_xdp` hands full NAT listeners' packets
/// and their flows' replies (a program of its own: the mapping's path does not fit beside the
/// rest on the stack).
pub const PROGRAM_SLOT_FULLNAT: u32 = 3;
/// PROGRAMS' slot of `slb_xdp` itself, to which `slb_xdp_pick` hands an IPv4 frame back.
pub const PROGRAM_SLOT_IPV4: u32 = 4;
/// PROGRAMS' slot of `slb_xdp_pick`, which decides a new flow's backend by load (least
/// connections, `max_connections`) with a stack of its own.
pub const PROGRAM_SLOT_PICK: u32 = 5;
/// How long a cached FIB answer is used before it is looked up again: route and neighbour
/// changes reach the fast path within this time.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// Entries of the fragment table: IPv4 datagrams whose later fragments are still expected. A
/// datagram's fragments arrive within microseconds of each other, so even at 100k fragmented
/// datagrams/s an entry lives long enough; an evicted entry only turns the rest of its datagram
/// into dropped orphans.
pub const MAX_FRAGMENTS: u32 = 16384;
/// How long a fragment entry is used: the kernel's own reassembly gives up after 30 s
/// (`ipfrag_time`), and an older entry may belong to an earlier datagram with the same IP id.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;
/// Entries of the address table: every VIP and backend address (IPv4, network order as u32, as
/// the next-hop cache of client addresses).
pub const MAX_NAT_ADDRESSES: u32 = MAX_LISTENERS + MAX_BACKENDS;
/// Address flag: a VIP of a TCP/UDP listener.
pub const NAT_ADDRESS_F_VIP: u32 = 1;
/// Address flag: the address of a TCP/UDP listener's backend.
pub const NAT_ADDRESS_F_BACKEND: u32 = 2;

// What the later fragments of a datagram get (`FragmentEntry::action`).
/// The first fragment was balanced: later ones get its addresses and are forwarded.
pub const FRAGMENT_TO_BACKEND: u32 = 1;
/// The first fragment was a reply translated to the VIP: later ones get its addresses too.
pub const FRAGMENT_TO_CLIENT: u32 = 2;
/// The first fragment was passed untouched (to this host, or not a listener's): so are they.
pub const FRAGMENT_PASS: u32 = 3;
/// The first fragment was dropped (no backend, no route): so are they.
pub const FRAGMENT_DROP: u32 = 4;
/// The first fragment was a DSR listener's, sent unchanged to a backend's MAC address: later
/// ones go unchanged to the same backend (`backend_id` in the entry).
pub const FRAGMENT_DIRECT: u32 = 5;
/// As `FRAGMENT_DIRECT`, for a tunnelling DSR listener: later ones are encapsulated too.
pub const FRAGMENT_TUNNEL: u32 = 6;

/// Slots of the endpoint filter: a listener's (VIP, port, protocol) and a backend's (address,
/// port, protocol) set a bit in the slot they hash to, so the data plane can tell most packets
/// that are neither for a listener nor from a backend after one array lookup per direction,
/// before it builds or hashes a 40-byte key. Collisions only cost the full lookups: with 5000
/// endpoints about 0.5 % of other packets take them.
pub const ENDPOINT_FILTER_SLOTS: u32 = 1 << 20;
/// Two bits a slot, sixteen slots to each 32-bit word of ENDPOINT_FILTER (256 KiB in all).
pub const ENDPOINT_FILTER_SLOTS_PER_WORD: u32 = 16;
pub const ENDPOINT_FILTER_WORDS: u32 = ENDPOINT_FILTER_SLOTS / ENDPOINT_FILTER_SLOTS_PER_WORD;
/// Endpoint filter bit: a listener's endpoint hashes here.
pub const ENDPOINT_F_LISTENER: u32 = 1;
/// Endpoint filter bit: a backend's endpoint hashes here.
pub const ENDPOINT_F_BACKEND: u32 = 2;

/// The endpoint filter slot of an IPv4 endpoint (port in host order), the same on both sides:
/// murmur3's finalizer over the address mixed with the port and protocol, so that runs of
/// addresses and ports (clients, backends) spread like random ones; its top 20 bits.
#[inline(always)]
pub fn endpoint_filter_slot(addr: [u8; 4], port: u16, protocol: u8) -> u32 {
    let port_protocol = (u32::from(port) << 8) | u32::from(protocol);
    let mut h = u32::from_be_bytes(addr) ^ port_protocol.wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h >> (32 - ENDPOINT_FILTER_SLOTS.trailing_zeros())
}

/// Where an endpoint's `flags` (`ENDPOINT_F_*`) live: the ENDPOINT_FILTER word, and the mask of
/// those bits within it.
#[inline(always)]
pub fn endpoint_filter_bits(addr: [u8; 4], port: u16, protocol: u8, flags: u32) -> (u32, u32) {
    let slot = endpoint_filter_slot(addr, port, protocol);
    (
        slot / ENDPOINT_FILTER_SLOTS_PER_WORD,
        flags << ((slot % ENDPOINT_FILTER_SLOTS_PER_WORD) * 2),
    )
}

/// An IPv6 address (as the four 32-bit words of its 16 bytes, in memory order) folded to the
/// 4 bytes the endpoint filter hashes: the words rotated apart so that addresses differing in
/// one word (a /64's hosts, a subnet's) spread. IPv4 and IPv6 endpoints share the filter; one
/// that folds to an IPv4 endpoint's slot only costs the full lookups.
#[inline(always)]
pub fn ipv6_filter_fold(words: [u32; 4]) -> [u8; 4] {
    let folded = u32::from_be(words[0])
        ^ u32::from_be(words[1]).rotate_left(8)
        ^ u32::from_be(words[2]).rotate_left(16)
        ^ u32::from_be(words[3]).rotate_left(24);
    folded.to_be_bytes()
}

/// The four 32-bit words of an address, in memory order (how the data plane reads it).
#[inline(always)]
pub fn addr_words(addr: &Addr) -> [u32; 4] {
    // SAFETY: [u8; 16] and [u32; 4] have the same size and every bit pattern is valid for both.
    unsafe { core::mem::transmute::<Addr, [u32; 4]>(*addr) }
}

/// The address whose words (in memory order) these are: [`addr_words`] undone.
#[inline(always)]
pub fn addr_from_words(words: [u32; 4]) -> Addr {
    // SAFETY: as in `addr_words`.
    unsafe { core::mem::transmute::<[u32; 4], Addr>(words) }
}

/// A ring slot with no backend (a listener whose backends all have weight 0).
pub const NO_BACKEND: u32 = u32::MAX;

pub const IPPROTO_TCP: u8 = 6;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Connection flag: the client sent FIN or RST; the entry expires after
/// `TCP_CLOSING_TIMEOUT_S` of silence instead of the listener's idle timeout.
pub const CONN_F_CLOSING: u32 = 1;
pub const IPPROTO_UDP: u8 = 17;

/// Backend flag: the id is in use.
pub const BACKEND_F_PRESENT: u8 = 1;
/// Backend flag: weight 0, takes no new flows (established ones continue).
pub const BACKEND_F_DRAINING: u8 = 2;

/// `BACKEND_HEALTH` value of a backend that may receive traffic. Zero, the array's initial
/// value, so a backend nobody has checked yet is usable.
pub const HEALTH_UP: u32 = 0;
/// `BACKEND_HEALTH` value of a backend its health check declared unhealthy.
pub const HEALTH_DOWN: u32 = 1;

/// Listener flag: the group is active/standby; `active_id` gets every new flow while its
/// health flag is up, `standby_id` otherwise.
pub const LISTENER_F_ACTIVE_STANDBY: u32 = 1;
/// Listener flag: every backend of the group is unhealthy and the listener is configured to keep
/// forwarding to all of them, so health flags must not move flows.
pub const LISTENER_F_IGNORE_HEALTH: u32 = 2;
/// Listener flag: source-address persistence is on (`persist_timeout_s`).
pub const LISTENER_F_PERSIST: u32 = 4;
/// Listener flag: direct server return on the L2 segment. The client's packet goes on
/// unchanged, in a frame to the backend's MAC address (the backend holds the VIP and answers the
/// client itself); replies do not pass slb.
pub const LISTENER_F_DSR: u32 = 8;
/// Listener flag, with `LISTENER_F_DSR`: the client's packet goes to its backend inside an
/// outer IP header (IPv4 in IPv4, IPv6 in IPv6) from the backend's `tunnel_source`, so the
/// backend may be anywhere routable; the backend strips the outer header (`slb decap`).
pub const LISTENER_F_TUNNEL: u32 = 16;
/// Listener flag: full NAT. The client's packet leaves from one of the listener's SNAT
/// addresses (`SNAT_POOLS`) to the backend; the mapping (SNAT address and port ↔ client) is in
/// `SNAT_MAPPINGS`, keyed as the backend's replies arrive, which are translated back to the
/// VIP and the client by it.
pub const LISTENER_F_FULLNAT: u32 = 32;
/// Listener flag: an access list admits only the client addresses in it (`ACL`).
pub const LISTENER_F_ACL_ALLOW: u32 = 64;
/// Listener flag: an access list drops the client addresses in it (`ACL`).
pub const LISTENER_F_ACL_DENY: u32 = 128;
/// Listener flag, with an access list: which of the listener's two entry sets in `ACL` is live
/// (`acl_set`), so a changed list is written whole into the other set and switched to at once.
pub const LISTENER_F_ACL_SET: u32 = 256;
/// Listener flag, with an access list: packets of flows the list no longer admits are dropped
/// even when the flow is established (otherwise established flows go on until they end).
pub const LISTENER_F_ACL_CUT_ESTABLISHED: u32 = 512;
/// Listener flag: new flows are limited by the listener's `NEW_FLOW_LIMITS` entry.
pub const LISTENER_F_NEW_FLOW_LIMIT: u32 = 1024;
/// Listener flag: a new TCP flow (its SYN) goes to the member of the listener's `WLC_SETS`
/// entry with the fewest open connections for its weight, not to its ring slot's backend.
pub const LISTENER_F_WLC: u32 = 2048;
/// Listener flag: a backend of the listener has `max_connections`, so a new flow's pick is
/// checked against its open connections (and moved to the least loaded member with room).
pub const LISTENER_F_MAX_CONNECTIONS: u32 = 4096;
/// Members of a listener's `WLC_SETS` entry: a least-connections pick scans at most this many.
pub const MAX_WLC_BACKENDS: u32 = 64;
/// Flags of `BACKEND_CONNECTIONS`: `BPF_F_MMAPABLE`, so the daemon's sweeper subtracts the
/// flows it expires with atomic instructions on the memory the data plane adds to.
pub const BACKEND_CONNECTIONS_MAP_FLAGS: u32 = 1 << 10;
/// Entries of `ACL`: prefixes of every listener's access list together (each list is written
/// twice while it changes).
pub const MAX_ACL_ENTRIES: u32 = 1 << 17;
/// Prefixes in one listener's access list: two full sets fit `ACL` beside the other lists.
pub const MAX_ACL_PREFIXES_PER_LISTENER: usize = 1 << 14;

/// Which set of `ACL` a listener's access list lives in: its two sets are `index × 2 + 0 or 1`.
#[inline(always)]
pub const fn acl_set(listener_index: u32, flags: u32) -> u32 {
    listener_index * 2 + (flags & LISTENER_F_ACL_SET != 0) as u32
}

/// The data of an `ACL` key (an LPM trie; its key is this behind a 32-bit prefix length): the
/// set, matched whole, then the client address (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AclPrefix {
    /// Big-endian, so that the trie matches it from its first byte like the address.
    pub set: [u8; 4],
    pub addr: Addr,
}

impl AclPrefix {
    /// The prefix length to give the trie for `prefix_bits` bits of `addr` (an IPv4 prefix
    /// counts the 96 bits of the IPv4-mapped form before it).
    pub const fn key_bits(ipv4: bool, prefix_bits: u32) -> u32 {
        32 + if ipv4 { 96 + prefix_bits } else { prefix_bits }
    }

    /// The bits of a full client address: what the data plane looks up.
    pub const FULL_BITS: u32 = 32 + 128;
}

/// A listener's limit on new flows, a generic cell rate algorithm (a token bucket kept as one
/// time): a new flow is admitted when `next_ns` is at most `burst_ns` ahead of now, and moves
/// it `interval_ns` on. One entry for all CPUs: only admitted flows write it, so a flood that is
/// being dropped only reads it, and two CPUs admitting at the same instant may both pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewFlowLimit {
    /// 10^9 / the limit per second.
    pub interval_ns: u64,
    /// How far ahead `next_ns` may run: (burst - 1) × `interval_ns`.
    pub burst_ns: u64,
    /// When the bucket is full again (the data plane's; the daemon writes 0, a full bucket).
    pub next_ns: u64,
}

impl NewFlowLimit {
    /// The bucket's `next_ns` after admitting one more new flow at `now`, or `None` when it is
    /// empty: the data plane's rule, which `slb explain` follows.
    #[inline(always)]
    pub fn admit(&self, now: u64) -> Option<u64> {
        let start = if self.next_ns > now {
            self.next_ns
        } else {
            now
        };
        (start - now <= self.burst_ns).then_some(start + self.interval_ns)
    }
}

/// SNAT addresses per full NAT listener.
pub const MAX_SNAT_ADDRESSES: usize = 16;
/// (address, port) pairs a new full NAT flow tries before it counts `snat_ports_exhausted`;
/// also how far a packet looks for its flow's mapping.
pub const SNAT_PROBES: u32 = 16;
/// Entries of `SNAT_MAPPINGS`: full NAT flows at once, all listeners together.
pub const MAX_SNAT_MAPPINGS: u32 = 1 << 18;
/// A full NAT mapping made by a SYN whose handshake never went on (no non-SYN packet from the
/// client) is removed after this long, so spoofed SYNs cannot hold the ports for long.
pub const SNAT_UNCONFIRMED_TIMEOUT_S: u32 = 10;
/// `SnatMapping::flags`: a packet past the handshake (any non-SYN; any UDP datagram) was seen.
pub const SNAT_F_CONFIRMED: u32 = 2;
/// Default SNAT ports: below the kernel's default ephemeral range (32768-60999), so slb's
/// mappings and the host's own connections from the same address do not meet.
pub const DEFAULT_SNAT_FIRST_PORT: u16 = 1024;
pub const DEFAULT_SNAT_LAST_PORT: u16 = 32767;

/// A full NAT listener's SNAT addresses and ports (`SNAT_POOLS`, by listener index).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPool {
    /// IPv4-mapped for IPv4; the first `count` are used.
    pub addrs: [Addr; MAX_SNAT_ADDRESSES],
    pub count: u32,
    pub first_port: u16,
    /// Ports from `first_port` on (1 to 65535).
    pub port_count: u16,
}

impl Default for SnatPool {
    fn default() -> Self {
        SnatPool {
            addrs: [[0; 16]; MAX_SNAT_ADDRESSES],
            count: 0,
            first_port: 0,
            port_count: 0,
        }
    }
}

/// Attempt `attempt` (0..SNAT_PROBES) of the flow with SNAT hash `hash` in `pool`: the index of
/// the SNAT address and the port. A flow's attempts are the same every time, so any packet of
/// it finds its mapping again; they move to the next address and the next port together,
/// starting where the hash says.
#[inline(always)]
pub fn snat_attempt(
    hash: u32,
    attempt: u32,
    count: u32,
    first_port: u16,
    port_count: u16,
) -> (u32, u16) {
    let count = if count == 0 { 1 } else { count };
    let ports = if port_count == 0 {
        1
    } else {
        u32::from(port_count)
    };
    let address = (hash.wrapping_add(attempt)) % count;
    let port = ((hash >> 7).wrapping_add(attempt)) % ports;
    (address, first_port.wrapping_add(port as u16))
}

/// Value of `SNAT_MAPPINGS`, keyed by the backend's replies' flow (backend → SNAT address and
/// port): the client's flow they belong to, and its upkeep.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatMapping {
    pub client: Addr,
    pub vip: Addr,
    pub client_port: u16,
    pub vip_port: u16,
    pub listener_index: u32,
    pub backend_id: u32,
    /// `CONN_F_CLOSING` (the client sent FIN/RST), `SNAT_F_CONFIRMED`.
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// IP protocol numbers of the encapsulations: IPv4 in IP (RFC 2003), IPv6 in IP (RFC 2473).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6_IN_IP: u8 = 41;

pub type Addr = [u8; 16];

/// The IPv4 address `a.b.c.d` of `::ffff:a.b.c.d`: [`ipv4_mapped`] undone.
#[inline(always)]
pub fn mapped_ipv4(addr: &Addr) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// `a.b.c.d` as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn ipv4_mapped(octets: [u8; 4]) -> Addr {
    // Built as four 32-bit words: as a byte array with a run of zeros, the BPF backend turns it
    // into a byte-by-byte memset call on every packet.
    let words: [u32; 4] = [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(octets),
    ];
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u32; 4], Addr>(words) }
}

/// Keys are 4-byte aligned (their layout does not change) so the data plane builds them with
/// word stores, not memset calls.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenerKey {
    pub vip: Addr,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerEntry {
    /// Index into the per-listener counters.
    pub index: u32,
    /// The ring in use: its slot in RINGS (`index × 2 + 0 or 1`).
    pub ring_index: u32,
    /// Number of slots in that ring (prime).
    pub ring_size: u32,
    /// `LISTENER_F_*`.
    pub flags: u32,
    /// Active/standby groups only.
    pub active_id: u32,
    pub standby_id: u32,
    /// With `LISTENER_F_PERSIST`: how long a client address stays with its backend.
    pub persist_timeout_s: u32,
    /// With `LISTENER_F_PERSIST` on an IPv6 VIP: how many leading bits of the client address
    /// persist (128: the address; 64: its /64, as clients rotate their interface identifiers).
    pub persist_ipv6_prefix: u32,
}

/// Key of the persistence table: one client address on one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PersistKey {
    pub client: Addr,
    pub listener_index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Persisted {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
    /// The outer source address of packets tunnelled to this backend (a `LISTENER_F_TUNNEL`
    /// listener's; IPv4-mapped for IPv4), else zero.
    pub tunnel_source: Addr,
    /// Open connections (`BACKEND_CONNECTIONS`) past which the backend takes no new flow; 0:
    /// no limit.
    pub max_connections: u32,
}

/// A flow as seen on the wire, in the direction the packet travels.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// An IPv4 flow, built as ten 32-bit words (same layout): field by field, the zero bytes
    /// become memset calls in the BPF program.
    #[inline(always)]
    pub fn ipv4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16, protocol: u8) -> FlowKey {
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        let (s, d) = (src_port.to_ne_bytes(), dst_port.to_ne_bytes());
        let words: [u32; 10] = [
            0,
            0,
            mapped,
            u32::from_ne_bytes(src),
            0,
            0,
            mapped,
            u32::from_ne_bytes(dst),
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
            u32::from_ne_bytes([protocol, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is repr(C) plain bytes of the same size (40), align 4.
        unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
    }

    /// An IPv6 flow from the addresses' words as the header holds them, built as ten 32-bit
    /// words like [`FlowKey::ipv4`].
    #[inline(always)]
    pub fn ipv6(
        src: [u32; 4],
        dst: [u32; 4],
        src_port: u16,
        dst_port: u16,
        protocol: u8,
    ) -> FlowKey {
        let (s, d) = (src_port.to_ne_bytes(), dst_port.to_ne_bytes());
        let words: [u32; 10] = [
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
            u32::from_ne_bytes([protocol, 0, 0, 0]),
        ];
        // SAFETY: as in `ipv4`.
        unsafe { core::mem::transmute::<[u32; 10], FlowKey>(words) }
    }
}

/// The first `prefix` bits of an address (as words in memory order), the rest zero: the client
/// an IPv6 persistence entry is for.
#[inline(always)]
pub fn ipv6_prefix_words(words: [u32; 4], prefix: u32) -> [u32; 4] {
    let mut masked = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = i as u32 * 32;
        let keep = if prefix >= start + 32 {
            u32::MAX
        } else if prefix <= start {
            0
        } else {
            u32::MAX << (32 - (prefix - start))
        };
        masked[i] = words[i] & keep.to_be();
        i += 1;
    }
    masked
}

/// The address persistence keys an IPv6 flow's client by on `listener`: its source, or the
/// source's first `persist_ipv6_prefix` bits (clients rotate the rest of their addresses).
/// The data plane's rule, which `slb explain` follows.
#[inline(always)]
pub fn ipv6_persistence_client(flow: &FlowKey, listener: &ListenerEntry) -> Addr {
    let prefix = listener.persist_ipv6_prefix;
    if listener.flags & LISTENER_F_PERSIST == 0 || prefix == 0 || prefix >= 128 {
        return flow.src;
    }
    addr_from_words(ipv6_prefix_words(addr_words(&flow.src), prefix))
}

/// A slot of the half-open table HALF_OPEN, an array of `MAX_HALF_OPEN` slots: a TCP flow
/// between its first packet (a SYN, usually) and its next non-SYN one, with the backend picked
/// for it. The slot is the flow hash's low bits; a newer flow of the same slot takes it over (as
/// an LRU evicts under a flood), and the older flow's next packet asks its listener's policy
/// again. Writing a slot is a cache line, where an insert into a full LRU hash map cost ~700 ns.
/// One cache line each.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HalfOpen {
    pub flow: FlowKey,
    pub backend_id: u32,
    /// [`half_open_check`] of the flow and the backend: a slot two CPUs wrote at once (torn)
    /// fails it and reads as empty.
    pub check: u32,
    pub _pad: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<HalfOpen>() == 64);

/// The half-open slot of a flow with hash `flow_hash`.
#[inline(always)]
pub fn half_open_slot(flow_hash: u32) -> u32 {
    flow_hash & (MAX_HALF_OPEN - 1)
}

/// What a half-open slot's `check` holds for a flow with hash `flow_hash` picked to `backend_id`.
#[inline(always)]
pub fn half_open_check(flow_hash: u32, backend_id: u32) -> u32 {
    flow_hash ^ backend_id.wrapping_mul(0x9e37_79b1)
}

/// Value of the connection table, keyed by the client → VIP flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Connection {
    pub backend_id: u32,
    pub listener_index: u32,
    pub last_seen_ns: u64,
    /// `CONN_F_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// Key of the reply table: a backend's address, port and protocol, as the source of its
/// replies. Config validation makes each one belong to one listener, so a reply needs no
/// per-flow state to find its VIP.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendEndpoint {
    pub addr: Addr,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of the reply table: what a reply's source must become so the client sees only the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplyNat {
    pub vip: Addr,
    pub vip_port: u16,
    pub _pad: u16,
    pub listener_index: u32,
    pub backend_id: u32,
}

/// Key of the fragment table: an IPv4 datagram as reassembly identifies it (RFC 791: source,
/// destination, protocol, IP id), before any rewrite. Unlike the other keys its addresses are
/// plain IPv4 (network order): the 16-bit id is IPv4's alone (IPv6 fragments carry a 32-bit id in
/// an extension header and will need a key of their own anyway), a 12-byte key hashes cheaply,
/// and it is copied straight from the header, without the zero run of an IPv4-mapped address
/// that the BPF backend turns into a `memset` call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// The IP id, network order.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of the fragment table: what the first fragment became, so the later ones (which carry
/// no L4 header, hence no ports) become the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentEntry {
    /// Source and destination the first fragment left with.
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// `FRAGMENT_*`.
    pub action: u32,
    /// With `FRAGMENT_DIRECT`: the backend the first fragment was sent to (its addresses did
    /// not change, so they cannot tell).
    pub backend_id: u32,
    pub created_ns: u64,
}

/// Key of the IPv6 fragment table: a datagram as reassembly identifies it (RFC 8200 §4.5:
/// source, destination, the fragment header's 32-bit identification), before any rewrite, and
/// the upper-layer protocol.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey6 {
    pub src: Addr,
    pub dst: Addr,
    /// The identification, network order.
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FragmentKey6 {
    /// Built as ten 32-bit words (same layout), from the addresses' words as the header holds
    /// them: field by field, the padding and the 16-byte copies become memset/memmove calls in
    /// the BPF program.
    #[inline(always)]
    pub fn new(src: [u32; 4], dst: [u32; 4], id: u32, protocol: u8) -> FragmentKey6 {
        let words: [u32; 10] = [
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            id,
            u32::from_ne_bytes([protocol, 0, 0, 0]),
        ];
        // SAFETY: FragmentKey6 is repr(C) plain bytes of the same size (40), align 4.
        unsafe { core::mem::transmute::<[u32; 10], FragmentKey6>(words) }
    }
}

/// Value of the IPv6 fragment table: what the first fragment became.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentEntry6 {
    pub src: Addr,
    pub dst: Addr,
    /// `FRAGMENT_*`.
    pub action: u32,
    /// As [`FragmentEntry::backend_id`].
    pub backend_id: u32,
    pub created_ns: u64,
}

impl FragmentEntry6 {
    /// Built from words, as [`FragmentKey6::new`].
    #[inline(always)]
    pub fn new(
        src: [u32; 4],
        dst: [u32; 4],
        action: u32,
        backend_id: u32,
        created_ns: u64,
    ) -> FragmentEntry6 {
        #[repr(C)]
        struct Words {
            words: [u32; 10],
            created_ns: u64,
        }
        let words = Words {
            words: [
                src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], action, backend_id,
            ],
            created_ns,
        };
        // SAFETY: both are repr(C) plain integers of the same size (48) and alignment (8).
        unsafe { core::mem::transmute::<Words, FragmentEntry6>(words) }
    }
}

/// A cached FIB answer for one destination (per CPU, so no torn reads).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// The IPv4 destination this answer is for (a reused backend id or a stale entry never
    /// matches another address).
    pub dst: [u8; 4],
    /// Egress interface; 0 = empty.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Non-zero: the destination is this host (health-check and proxy traffic from a backend's
    /// endpoint): such packets are not replies to translate.
    pub local: u8,
    /// Non-zero: the next hop is `dst` itself, on a link of this host (no gateway between), as
    /// direct server return needs.
    pub on_link: u8,
    /// The egress device's MTU: larger packets need fragmenting or an ICMP error.
    pub mtu: u16,
    pub checked_ns: u64,
}

/// A cached FIB answer for one IPv6 destination: the address it is for, and the answer (whose
/// own IPv4 `dst` stays zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop6 {
    pub dst: Addr,
    pub hop: NextHop,
}

/// Per-listener and per-backend traffic, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows that entered the connection table (TCP at their first non-SYN packet).
    pub new_connections: u64,
    /// TCP flows whose client sent FIN or RST.
    pub closed_connections: u64,
    /// Listeners only: packets dropped by the access list.
    pub acl_dropped: u64,
    /// Listeners only: new flows dropped by `max_new_connections_per_second`.
    pub rate_limited: u64,
    /// Listeners: new flows dropped because every backend that could take them was at its
    /// `max_connections`. Backends: new flows sent elsewhere because this one was.
    pub at_capacity: u64,
}

/// One member of a listener's least-connections set: a backend id and its weight (as the
/// listener's ring was built with it: 0 while unhealthy or draining).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WlcMember {
    pub id: u32,
    pub weight: u32,
}

/// A listener's backends for a least-connections pick (`LISTENER_F_WLC`) or a move away from a
/// backend at its `max_connections`: its ring's input, kept at the ring's slot (`ring_index`),
/// so it changes with the ring, at once, when the listener entry switches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WlcSet {
    pub count: u32,
    pub _pad: u32,
    pub members: [WlcMember; MAX_WLC_BACKENDS as usize],
}

impl Default for WlcSet {
    fn default() -> Self {
        WlcSet {
            count: 0,
            _pad: 0,
            members: [WlcMember::default(); MAX_WLC_BACKENDS as usize],
        }
    }
}

/// Whether a backend with `load` open connections and weight `weight` is less loaded than one
/// with `best_load` and `best_weight`: connections per unit of weight, compared without
/// division (both products fit in 64 bits).
#[inline(always)]
pub fn less_loaded(load: u32, weight: u32, best_load: u32, best_weight: u32) -> bool {
    u64::from(load) * u64::from(best_weight) < u64::from(best_load) * u64::from(weight)
}

/// Whether, in a least-connections scan, the `ties`-th member found as loaded as the best so
/// far takes its place: with probability 1/ties, drawn from the flow's hash (reservoir
/// sampling), so equally loaded members share new flows evenly whatever their place in the
/// set.
#[inline(always)]
pub fn wlc_tie_wins(hash: u32, ties: u32) -> bool {
    let mixed = (hash ^ ties.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
    ties != 0 && (mixed >> 8).is_multiple_of(ties)
}

/// A backend's open connections from its `BACKEND_CONNECTIONS` word, which both sides change
/// with atomic adds of +1 and -1 (two's complement): never below 0 however the adds raced.
#[inline(always)]
pub fn open_connections(word: u64) -> u32 {
    (word as i64).clamp(0, i64::from(u32::MAX)) as u32
}

/// Declares a per-CPU counter struct once: the struct both sides share, plus the names and
/// values the control plane prints and sums.
macro_rules! counters {
    ($(#[doc = $sdoc:literal])* $name:ident { $($(#[doc = $doc:literal])* $field:ident,)* }) => {
        $(#[doc = $sdoc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
        pub struct $name {
            $($(#[doc = $doc])* pub $field: u64,)*
        }

        impl $name {
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            pub fn values(&self) -> impl Iterator<Item = u64> {
                [$(self.$field),*].into_iter()
            }

            pub fn add(&mut self, other: &$name) {
                $(self.$field += other.$field;)*
            }
        }
    };
}

counters! {
    /// What happened to packets that did not take the fast path, one per CPU. Every branch of
    /// the data plane that does not forward a listener packet ends in one of these.
    GlobalCounters {
    /// Frames too short for the header they claim.
    malformed,
    /// Not IPv4/IPv6 (ARP, LLDP, VLAN-tagged ...): passed to the stack.
    non_ip_passed,
    /// IPv6 frames that could not be handed to the IPv6 programs (their slots in PROGRAMS are
    /// empty: never so while a daemon has loaded the data plane): passed to the stack.
    ipv6_passed,
    /// IPv6 packets with an extension header before TCP/UDP (hop-by-hop, routing, destination
    /// options, ...), which the fast path does not walk: passed to the stack.
    ipv6_extension_headers_passed,
    /// IPv4 fragments that are no listener's nor a backend's: passed untouched (also the later
    /// fragments of a datagram whose first fragment was passed).
    fragments_passed,
    /// First fragments of a listener's or a backend's datagram, recorded in the fragment table
    /// for their later fragments (the first fragment itself is balanced or translated as usual).
    fragments_tracked,
    /// Later fragments of a client datagram, sent to the backend its first fragment went to
    /// (translated as it was, or unchanged for a DSR listener).
    fragments_balanced,
    /// Later fragments of a backend's reply, their source rewritten to the VIP.
    fragments_translated,
    /// Later fragments to a VIP or from a backend address whose first fragment this node has not
    /// seen (lost, reordered, evicted, expired): dropped, never forwarded untranslated.
    fragments_dropped_orphan,
    /// Later fragments of a datagram whose first fragment was dropped.
    fragments_dropped_with_first,
    /// IPv4 with options: passed to the stack.
    ip_options_passed,
    /// IP traffic that is not for a listener nor a reply from a backend: passed.
    not_for_us_passed,
    /// Listener packets dropped because the listener has no backend with weight > 0.
    no_backend_dropped,
    /// Listener packets whose ring or backend entry is missing (control-plane race): dropped.
    lookup_failed_dropped,
    /// Listener packets from a client address the listener's access list refuses: dropped.
    acl_dropped,
    /// New flows over their listener's `max_new_connections_per_second`: dropped (a TCP
    /// client retransmits its SYN).
    new_flows_rate_limited,
    /// New flows dropped because every backend that could take them was at its
    /// `max_connections`.
    backends_full_dropped,
    /// Rewritten packets handed to the kernel because the FIB could not resolve the next hop yet.
    fib_passed,
    /// Rewritten packets dropped because the FIB has no route (or forwarding is off).
    fib_dropped,
    /// Packets forwarded with XDP_TX (egress = ingress).
    tx,
    /// Packets forwarded with XDP_REDIRECT.
    redirected,
    /// Rewritten packets whose next hop is out of an interface slb is not attached to (not in
    /// the devmap): passed to the stack, which forwards them. Attach that interface too.
    egress_not_attached_passed,
    /// Replies from backends translated back to the VIP.
    replies_translated,
    /// Packets from a backend's endpoint that the FIB does not forward: to this host (health
    /// checks, the L7 proxy) or to a destination without a route. Passed untouched.
    local_from_backend_passed,
    /// TCP flows recorded in the half-open table: SYNs, and first packets of flows neither table
    /// knew (they enter the connection table with their next non-SYN packet).
    half_open_tracked,
    /// Packets too big for the next hop with DF set, answered with ICMP "fragmentation needed"
    /// quoting them as their sender sent them.
    icmp_too_big_sent,
    /// ICMP errors about a balanced flow, translated and forwarded (to the backend or client).
    icmp_errors_translated,
    /// ICMP errors about a VIP's packet whose flow this node does not know: passed.
    icmp_errors_unmatched,
    /// ICMP errors that could not be built (the frame could not be resized): packet dropped.
    icmp_errors_failed,
    /// Packets whose TTL ran out at the balancer: passed so the kernel sends ICMP.
    ttl_expired_passed,
    /// Packets of known flows whose backend was removed or declared unhealthy: re-balanced.
    flows_repicked,
    /// New flows of active/standby listeners sent to the standby because the active is down.
    standby_picks,
    /// New flows sent to the backend their client address is persisted to.
    persistence_hits,
    /// Forwarded packets that needed a FIB lookup (next-hop cache empty or older than 1 s).
    fib_lookups,
    /// Forwarded packets whose next hop came from the cache.
    next_hop_cached,
    /// Packets of a DSR listener whose backend is not on a link of this host (a gateway would
    /// route the unchanged packet back to the VIP): dropped.
    dsr_backend_off_link,
    /// Packets of a DSR listener whose next hop's MAC address the kernel has not resolved yet
    /// (the stack would route the unchanged packet to the VIP, not to the backend, and drop a
    /// tunnelled one from its own address): dropped. The health checks resolve it.
    dsr_next_hop_unresolved,
    /// Packets of a DSR listener too big for the link to their backend (with the outer header,
    /// when tunnelled), without DF set (fragmented by the stack, they would be routed to the
    /// VIP, not to the backend): dropped.
    dsr_too_big_dropped,
    /// Packets of a tunnelling DSR listener sent to their backend inside an outer IP header.
    tunnel_encapsulated,
    /// Packets of a tunnelling DSR listener that could not be given their outer header (no
    /// room in front of the frame), or whose backend is this host: dropped.
    tunnel_failed,
    /// Full NAT flows given an SNAT address and port (a mapping made).
    snat_mappings_made,
    /// New full NAT flows that found no free SNAT port in `SNAT_PROBES` tries (the listener's
    /// ports towards that backend are taken, or `SNAT_MAPPINGS` is full): dropped.
    snat_ports_exhausted,
    /// Replies of full NAT flows translated back to the VIP and the client.
    snat_replies_translated,
    /// Full NAT packets whose backend's address the kernel has not resolved yet: passed with
    /// only the destination rewritten (the kernel does not forward a packet from its own SNAT
    /// address), so the kernel resolves it; the flow's next packet takes full NAT.
    snat_next_hop_unresolved,
    /// Full NAT packets the data plane cannot send on and the kernel would not forward from an
    /// SNAT address (too big for the backend's link without DF set, or a backend that is this
    /// host): dropped, without a mapping.
    snat_not_forwarded_dropped,
}
}

counters! {
    /// What the decapsulator (`slb decap`, on a DSR backend) did with tunnelled packets, one per
    /// CPU. Other packets pass untouched and are not counted.
    DecapCounters {
    /// Tunnelled packets from an accepted source to an accepted VIP: the outer header stripped,
    /// the client's packet handed to the stack.
    decapsulated,
    /// Tunnelled packets from a source that is not accepted: passed as they are (the stack,
    /// without a tunnel of its own, drops them).
    refused_source,
    /// Tunnelled packets whose inner packet is not to an accepted VIP: passed as they are.
    refused_vip,
    /// Tunnelled packets the decapsulator does not take apart (outer IPv4 options, an outer
    /// fragment, a truncated inner header): passed as they are.
    unhandled,
}
}

/// The decapsulator's maps (pinned under its directory): accepted outer sources and inner
/// destinations (IPv4-mapped for IPv4), and its counters.
pub const DECAP_SOURCES_MAP: &str = "DECAP_SOURCES";
pub const DECAP_VIPS_MAP: &str = "DECAP_VIPS";
pub const DECAP_STATS_MAP: &str = "DECAP_STATS";
/// Entries of each of `DECAP_SOURCES` and `DECAP_VIPS`.
pub const MAX_DECAP_ADDRESSES: u32 = 1024;

/// Room for the frame `xdp_replay` (the benchmark driver) writes back before each run: an
/// IPv6 TCP frame (74 bytes and a small payload) fits.
pub const REPLAY_FRAME_BYTES: usize = 128;
/// The shortest frame a template sends: an IPv4 frame is padded to this, as before IPv6 frames
/// needed more room, so IPv4 runs keep their length.
pub const REPLAY_MIN_FRAME_BYTES: usize = 64;
/// Source ports a replayed flow number maps to (1024..=65535), before the address changes.
pub const REPLAY_PORTS_PER_ADDRESS: u32 = 64512;
/// Flow numbers each CPU owns: CPU c replays flows c * this + n, so two CPUs never share one.
pub const REPLAY_FLOWS_PER_CPU: u32 = 1 << 26;
/// `ReplayTemplate::flows` for "a new flow every run" (until 2^26 flows have been replayed).
pub const REPLAY_EVERY_RUN_NEW: u32 = REPLAY_FLOWS_PER_CPU;

/// What `xdp_replay` restores into every frame: BPF_PROG_TEST_RUN reuses the frame (with
/// `repeat`, and pages in live-frames mode) without undoing what a NAT program rewrote. Built by
/// [`ReplayTemplate::new`], which also finds where the fields a flow number changes are, so the
/// driver knows no frame layout of its own (IPv4 and IPv6 alike).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ReplayTemplate {
    pub frame: [u8; REPLAY_FRAME_BYTES],
    /// How many flows the runs cycle through; 0 or 1: the template's own flow every run. Flow
    /// n (counted per CPU) has source port 1024 + n % 64512 and the template's source address
    /// plus n / 64512 (low 16 bits), see [`replay_flow`].
    pub flows: u32,
    /// Consecutive runs that replay one flow before the next (2: a TCP flow's first packet and
    /// the one that moves it from the half-open table into the connection table).
    pub packets_per_flow: u32,
    /// Bytes of `frame` a run sends (a multiple of 8, as the driver restores 8 at a time):
    /// the frame padded, [`REPLAY_MIN_FRAME_BYTES`] at least.
    pub frame_bytes: u16,
    /// Where the TCP/UDP source port is.
    pub source_port_at: u16,
    /// Where the low 16 bits of the source address are.
    pub source_addr_low_at: u16,
    /// Where the IPv4 header checksum is; 0: none (IPv6 has no header checksum).
    pub ipv4_check_at: u16,
    /// Where the TCP/UDP checksum is.
    pub l4_check_at: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`]: a UDP checksum of 0 means "none" and stays 0.
    pub l4_protocol: u8,
    /// Explicit, so that the map value has no uninitialised bytes.
    pub _padding: u8,
}

impl ReplayTemplate {
    /// A template of `frame` (Ethernet + IPv4 without options or IPv6 without extension
    /// headers, then TCP or UDP), replaying `flows` flows `packets_per_flow` runs each.
    pub fn new(frame: &[u8], flows: u32, packets_per_flow: u32) -> Result<Self, &'static str> {
        const ETH: usize = 14;
        if frame.len() > REPLAY_FRAME_BYTES {
            return Err("the frame is larger than the template");
        }
        if frame.len() < ETH + 20 {
            return Err("the frame is too short for an IP packet");
        }
        let (l4_at, l4_protocol, source_addr_low_at, ipv4_check_at) =
            match u16::from_be_bytes([frame[12], frame[13]]) {
                0x0800 => {
                    if frame[ETH] != 0x45 {
                        return Err("IPv4 with options: the driver expects a 20-byte header");
                    }
                    // Source address at 12, its low half at 14; checksum at 10.
                    (ETH + 20, frame[ETH + 9], ETH + 14, ETH + 10)
                }
                // Next header at 6; source address at 8, its last two bytes at 22.
                0x86dd if frame.len() >= ETH + 40 => (ETH + 40, frame[ETH + 6], ETH + 22, 0),
                0x86dd => return Err("the frame is too short for an IPv6 header"),
                _ => return Err("neither IPv4 nor IPv6"),
            };
        let l4_check_at = match l4_protocol {
            IPPROTO_TCP => l4_at + 16,
            IPPROTO_UDP => l4_at + 6,
            _ => return Err("neither TCP nor UDP (or an IPv6 extension header)"),
        };
        if l4_check_at + 2 > frame.len() {
            return Err("the frame is too short for its L4 header");
        }
        let frame_bytes = frame.len().next_multiple_of(8).max(REPLAY_MIN_FRAME_BYTES);
        let mut template = ReplayTemplate {
            frame: [0; REPLAY_FRAME_BYTES],
            flows,
            packets_per_flow,
            frame_bytes: frame_bytes as u16,
            source_port_at: l4_at as u16,
            source_addr_low_at: source_addr_low_at as u16,
            ipv4_check_at: ipv4_check_at as u16,
            l4_check_at: l4_check_at as u16,
            l4_protocol,
            _padding: 0,
        };
        template.frame[..frame.len()].copy_from_slice(frame);
        Ok(template)
    }

    /// The frame a run sends, before the driver changes its flow.
    pub fn sent_frame(&self) -> &[u8] {
        &self.frame[..usize::from(self.frame_bytes)]
    }
}

/// The source port and the addend to the source address's low 16 bits of replayed flow `n` on
/// `cpu`: one rule for the driver program and the benchmarks that predict its flows.
#[inline(always)]
pub fn replay_flow(n: u32, cpu: u32) -> (u16, u16) {
    let flow = (cpu % 64)
        .wrapping_mul(REPLAY_FLOWS_PER_CPU)
        .wrapping_add(n);
    (
        (1024 + flow % REPLAY_PORTS_PER_ADDRESS) as u16,
        (flow / REPLAY_PORTS_PER_ADDRESS) as u16,
    )
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for ListenerEntry {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Connection {}
    unsafe impl aya::Pod for ReplyNat {}
    unsafe impl aya::Pod for BackendEndpoint {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for GlobalCounters {}
    unsafe impl aya::Pod for DecapCounters {}
    unsafe impl aya::Pod for SnatPool {}
    unsafe impl aya::Pod for SnatMapping {}
    unsafe impl aya::Pod for PersistKey {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for Persisted {}
    unsafe impl aya::Pod for ReplayTemplate {}
    unsafe impl aya::Pod for HalfOpen {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentEntry {}
    unsafe impl aya::Pod for AclPrefix {}
    unsafe impl aya::Pod for NewFlowLimit {}
    unsafe impl aya::Pod for WlcSet {}
}

#[cfg(test)]
mod endpoint_filter_tests {
    use super::*;

    #[test]
    fn endpoints_spread_over_the_filter() {
        let mut slots = alloc::collections::BTreeSet::new();
        for i in 0..2000u32 {
            let addr = [10, 20, (i / 250) as u8, (i % 250) as u8];
            let slot = endpoint_filter_slot(addr, 8080, IPPROTO_TCP);
            assert!(slot < ENDPOINT_FILTER_SLOTS);
            slots.insert(slot);
        }
        // 2000 endpoints in 2^20 slots: a few collisions at most.
        assert!(slots.len() >= 1990, "{} distinct slots", slots.len());
        // Runs of client endpoints hit the backends' slots about as often as random ones would
        // (2000 of 2^20 slots taken: about 125 of 65536 clients), not in lumps.
        let hits = (0..65536u32)
            .filter(|i| {
                let addr = [10, 10, (i >> 8) as u8, *i as u8];
                slots.contains(&endpoint_filter_slot(addr, 40000, IPPROTO_TCP))
            })
            .count();
        assert!(
            hits < 250,
            "{hits} of 65536 client endpoints share a backend's slot"
        );
        let (word, mask) = endpoint_filter_bits([10, 0, 0, 1], 80, IPPROTO_TCP, ENDPOINT_F_BACKEND);
        assert!(word < ENDPOINT_FILTER_WORDS);
        assert_eq!(mask.count_ones(), 1);
        // The port and the protocol take part.
        let addr = [192, 0, 2, 10];
        assert_ne!(
            endpoint_filter_slot(addr, 80, IPPROTO_TCP),
            endpoint_filter_slot(addr, 81, IPPROTO_TCP)
        );
        assert_ne!(
            endpoint_filter_slot(addr, 53, IPPROTO_TCP),
            endpoint_filter_slot(addr, 53, IPPROTO_UDP)
        );
    }
}

#[cfg(all(test, feature = "alloc"))]
mod replay_template_tests {
    use super::*;
    use crate::wire::{
        ipv4_frame, ipv6_frame, parse_ipv4_frame, parse_ipv6_frame, L4Spec, TCP_ACK, TCP_SYN,
    };

    const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
    const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34];
    const VIP6: [u8; 16] = [0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

    fn word(frame: &[u8], at: u16) -> u16 {
        let at = usize::from(at);
        u16::from_be_bytes([frame[at], frame[at + 1]])
    }

    #[test]
    fn ipv6_templates_are_valid_frames_whose_fields_the_driver_finds() {
        for (l4, protocol) in [
            (L4Spec::tcp(40000, 80, TCP_ACK), IPPROTO_TCP),
            (L4Spec::tcp(40000, 22, TCP_SYN), IPPROTO_TCP),
            (L4Spec::udp(40000, 53), IPPROTO_UDP),
        ] {
            let frame = ipv6_frame(DST_MAC, SRC_MAC, CLIENT6, VIP6, l4);
            let template = ReplayTemplate::new(&frame, REPLAY_EVERY_RUN_NEW, 1).unwrap();
            let sent = template.sent_frame();
            assert!(sent.len() >= frame.len() && sent.len().is_multiple_of(8));
            assert!(sent.len() <= REPLAY_FRAME_BYTES);
            // What the driver sends parses (checksum included), padding and all.
            let parsed = parse_ipv6_frame(sent).unwrap();
            assert_eq!((parsed.src, parsed.dst), (CLIENT6, VIP6));
            assert_eq!(word(sent, template.source_port_at), parsed.src_port);
            assert_eq!(word(sent, template.source_addr_low_at), 0x1234);
            assert_eq!(word(sent, template.l4_check_at), parsed.l4_checksum);
            assert_eq!(template.ipv4_check_at, 0, "IPv6 has no header checksum");
            assert_eq!(template.l4_protocol, protocol);
        }
        // An IPv6 TCP frame needs more than the 64 bytes IPv4 frames use.
        let tcp = ipv6_frame(DST_MAC, SRC_MAC, CLIENT6, VIP6, L4Spec::tcp(1, 80, TCP_ACK));
        assert!(tcp.len() > REPLAY_MIN_FRAME_BYTES);
    }

    #[test]
    fn ipv4_templates_keep_their_length_and_offsets() {
        let client = [10, 10, 0x12, 0x34];
        for (l4, l4_check_at) in [
            (L4Spec::tcp(40000, 80, TCP_ACK), 14 + 20 + 16),
            (L4Spec::udp(40000, 53), 14 + 20 + 6),
        ] {
            let frame = ipv4_frame(DST_MAC, SRC_MAC, client, [10, 99, 0, 10], l4);
            let template = ReplayTemplate::new(&frame, 1, 1).unwrap();
            assert_eq!(template.sent_frame().len(), REPLAY_MIN_FRAME_BYTES);
            parse_ipv4_frame(template.sent_frame()).unwrap();
            assert_eq!(template.source_port_at, 14 + 20);
            assert_eq!(template.source_addr_low_at, 14 + 12 + 2);
            assert_eq!(template.ipv4_check_at, 14 + 10);
            assert_eq!(template.l4_check_at, l4_check_at);
            assert_eq!(
                word(template.sent_frame(), template.source_addr_low_at),
                0x1234
            );
        }
    }

    #[test]
    fn frames_the_driver_cannot_rewrite_are_refused() {
        let frame = ipv6_frame(DST_MAC, SRC_MAC, CLIENT6, VIP6, L4Spec::tcp(1, 80, TCP_ACK));
        assert!(ReplayTemplate::new(&frame[..40], 1, 1).is_err());
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(ReplayTemplate::new(&arp, 1, 1).is_err());
        let mut icmp = frame.clone();
        icmp[14 + 6] = 58;
        assert!(ReplayTemplate::new(&icmp, 1, 1).is_err());
        let mut long = frame;
        long.resize(REPLAY_FRAME_BYTES + 1, 0);
        assert!(ReplayTemplate::new(&long, 1, 1).is_err());
    }
}

#[cfg(test)]
mod snat_tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn a_flows_attempts_cover_distinct_ports_and_move_over_the_addresses() {
        for hash in [0u32, 1, 0xdead_beef, u32::MAX] {
            let attempts: Vec<(u32, u16)> = (0..SNAT_PROBES)
                .map(|a| snat_attempt(hash, a, 3, 20000, 100))
                .collect();
            let distinct: std::collections::BTreeSet<_> = attempts.iter().collect();
            assert_eq!(distinct.len(), SNAT_PROBES as usize, "{attempts:?}");
            assert!(attempts
                .iter()
                .all(|&(i, p)| i < 3 && (20000..20100).contains(&p)));
            // The same every time: any packet of the flow finds its mapping again.
            assert_eq!(snat_attempt(hash, 5, 3, 20000, 100), attempts[5]);
        }
        // Four ports, one address: the attempts wrap around the range.
        let ports: std::collections::BTreeSet<u16> = (0..SNAT_PROBES)
            .map(|a| snat_attempt(7, a, 1, 20000, 4).1)
            .collect();
        assert_eq!(ports, (20000..20004).collect());
        // The whole port space: no overflow past 65535.
        let (_, port) = snat_attempt(u32::MAX, SNAT_PROBES - 1, 1, 1, u16::MAX);
        assert!(port >= 1);
    }
}
