//! Full NAT: a listener's packet leaves from one of its SNAT addresses and ports to the
//! backend, so the backend answers slb whatever its routes. The mapping lives in one map,
//! `SNAT_MAPPINGS`, keyed by the flow of the backend's replies, so a reply finds it with the
//! key it arrives with. The client's side finds it again by trying its flow's attempts
//! (`snat_attempt`: the same sequence of (address, port) every time) until one holds this
//! client flow; a new flow claims the first free attempt with `BPF_NOEXIST`, atomic across CPUs,
//! and counts `snat_ports_exhausted` when none is free. Looking through every attempt before
//! claiming (not stopping at the first free one) keeps a flow on its mapping when an earlier
//! attempt's mapping was removed since.

use aya_ebpf::bindings::BPF_NOEXIST;
use slb_common::{
    hash::flow_hash, snat_attempt, Addr, Backend, FlowKey, GlobalCounters, ListenerEntry,
    SnatMapping, CONN_F_CLOSING, IPPROTO_UDP, SNAT_F_CONFIRMED, SNAT_PROBES, TCP_FLAG_ACK,
    TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
};

use crate::maps::{SNAT_MAPPINGS, SNAT_POOLS, SNAT_SCRATCH};

/// Seed of the hash that picks a flow's attempts (not the ring's: the two choices stay
/// independent).
const SNAT_HASH_SEED: u32 = 0x5eed_0001;

/// A mapping's key and value while it is looked for or made.
#[repr(C)]
pub struct Scratch {
    key: FlowKey,
    mapping: SnatMapping,
}

const KEY_WORDS: usize = core::mem::size_of::<FlowKey>() / 4;

/// Writes the reply flow `from` → (`to`, `to_port`) into `key`, word by word (a struct copy
/// becomes a memcpy call).
#[inline(always)]
unsafe fn write_reply_key(
    key: *mut FlowKey,
    from: &Addr,
    from_port: u16,
    to: &Addr,
    to_port: u16,
    protocol: u8,
) {
    let words = key.cast::<u32>();
    // Word by word from the bytes: `addr_words` copies of the two addresses took 32 bytes of
    // stack that `slb_xdp_fullnat` does not have.
    let word = |a: &Addr, i: usize| {
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    };
    let (f, t) = (from_port.to_ne_bytes(), to_port.to_ne_bytes());
    unsafe {
        let mut i = 0;
        while i < 4 {
            words.add(i).write_volatile(word(from, i));
            words.add(4 + i).write_volatile(word(to, i));
            i += 1;
        }
        words
            .add(8)
            .write_volatile(u32::from_ne_bytes([f[0], f[1], t[0], t[1]]));
        words
            .add(9)
            .write_volatile(u32::from_ne_bytes([protocol, 0, 0, 0]));
    }
    const { assert!(KEY_WORDS == 10) };
}

/// Whether `mapping` is the client flow `flow`'s. Without a branch per field: in the probe
/// loop, every branch multiplies what the verifier walks through.
#[inline(always)]
fn belongs(mapping: *const SnatMapping, flow: &FlowKey) -> bool {
    let (client, vip) = unsafe {
        (
            (&raw const (*mapping).client).cast::<u32>(),
            (&raw const (*mapping).vip).cast::<u32>(),
        )
    };
    let (src, dst) = (
        (&raw const flow.src).cast::<u32>(),
        (&raw const flow.dst).cast::<u32>(),
    );
    let mut diff = unsafe {
        u32::from((*mapping).client_port ^ flow.src_port)
            | u32::from((*mapping).vip_port ^ flow.dst_port)
    };
    let mut i = 0;
    while i < 4 {
        // SAFETY: in bounds of the 16-byte addresses, which start 4-byte aligned (map value,
        // key on the stack).
        diff |= unsafe {
            (client.add(i).read_volatile() ^ src.add(i).read())
                | (vip.add(i).read_volatile() ^ dst.add(i).read())
        };
        i += 1;
    }
    diff == 0
}

/// The SNAT address and port of the client flow `flow` (to a full NAT `listener`) towards
/// backend `backend_id`: its mapping, refreshed by this packet, or a new one. `None` (counted)
/// when no attempt is free.
#[inline(always)]
pub fn snat_for(
    flow: &FlowKey,
    listener: &ListenerEntry,
    backend_id: u32,
    backend: &Backend,
    tcp_flags: u8,
    now: u64,
    counters: &mut GlobalCounters,
) -> Option<(&'static Addr, u16)> {
    let Some(pool) = SNAT_POOLS.get(listener.index) else {
        counters.lookup_failed_dropped += 1;
        return None;
    };
    if pool.count == 0 {
        counters.lookup_failed_dropped += 1;
        return None;
    }
    let scratch = SNAT_SCRATCH.get_ptr_mut(0)?;
    let key = unsafe { &raw mut (*scratch).key };
    let hash = flow_hash(flow, SNAT_HASH_SEED);
    let confirmed =
        flow.protocol == IPPROTO_UDP || tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN;
    let closing = tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
    let opening = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    let mut attempt = 0;
    while attempt < SNAT_PROBES {
        let (index, port) =
            snat_attempt(hash, attempt, pool.count, pool.first_port, pool.port_count);
        let addr = pool.addrs.get(index as usize)?;
        unsafe { write_reply_key(key, &backend.addr, backend.port, addr, port, flow.protocol) };
        if let Some(mapping) = SNAT_MAPPINGS.get_ptr_mut(unsafe { &*key }) {
            if belongs(mapping, flow) {
                refresh(mapping, confirmed, closing, opening, now);
                return Some((addr, port));
            }
        }
        attempt += 1;
    }
    let mapping = unsafe { &raw mut (*scratch).mapping };
    unsafe {
        (*mapping).client = flow.src;
        (*mapping).vip = flow.dst;
        (*mapping).client_port = flow.src_port;
        (*mapping).vip_port = flow.dst_port;
        (*mapping).listener_index = listener.index;
        (*mapping).backend_id = backend_id;
        (*mapping).flags =
            if confirmed { SNAT_F_CONFIRMED } else { 0 } | if closing { CONN_F_CLOSING } else { 0 };
        (*mapping).last_seen_ns = now;
    }
    let mut attempt = 0;
    while attempt < SNAT_PROBES {
        let (index, port) =
            snat_attempt(hash, attempt, pool.count, pool.first_port, pool.port_count);
        let addr = pool.addrs.get(index as usize)?;
        unsafe { write_reply_key(key, &backend.addr, backend.port, addr, port, flow.protocol) };
        let claimed = SNAT_MAPPINGS.insert(
            unsafe { &*key },
            unsafe { &*mapping },
            u64::from(BPF_NOEXIST),
        );
        if claimed.is_ok() {
            counters.snat_mappings_made += 1;
            return Some((addr, port));
        }
        attempt += 1;
    }
    counters.snat_ports_exhausted += 1;
    None
}

/// A packet of the mapping's flow was seen now (`confirmed`: past the handshake; `closing`: a
/// FIN or RST from the client; `opening`: a SYN, which opens a closed flow's port again).
#[inline(always)]
pub fn refresh(mapping: *mut SnatMapping, confirmed: bool, closing: bool, opening: bool, now: u64) {
    unsafe {
        // Written only when it changes: most packets of a busy flow see the same tick.
        if (*mapping).last_seen_ns != now {
            (*mapping).last_seen_ns = now;
        }
        let flags = (*mapping).flags;
        let mut wanted = flags;
        if confirmed {
            wanted |= SNAT_F_CONFIRMED;
        }
        if closing {
            wanted |= CONN_F_CLOSING;
        } else if opening {
            wanted &= !CONN_F_CLOSING;
        }
        if wanted != flags {
            (*mapping).flags = wanted;
        }
    }
}
