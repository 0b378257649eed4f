//! A listener's admission policy, applied before a packet creates any state: its access list
//! (checked on every packet) and its limit on new flows (checked when a flow would be new).

use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_ns};
use slb_common::{
    acl_set, hash::flow_hash, AclPrefix, FlowKey, GlobalCounters, ListenerEntry, CONN_F_CLOSING,
    LISTENER_F_ACL_ALLOW, LISTENER_F_ACL_CUT_ESTABLISHED, LISTENER_F_ACL_DENY,
    LISTENER_F_NEW_FLOW_LIMIT, TCP_FLAG_ACK, TCP_FLAG_SYN,
};

use crate::{
    balancer::FLOW_HASH_SEED,
    half_open,
    maps::{ACL, ACL_SCRATCH, CONNECTIONS, LISTENER_STATS, NEW_FLOW_LIMITS},
};

/// Whether the listener's access list lets this packet of `flow` through. A packet the list
/// refuses still passes when the flow is established (in the connection table, or between its
/// SYN and its next packet), unless the listener cuts established flows. A dropped packet is
/// counted.
#[inline(always)]
pub(crate) fn acl_admits(
    flow: &FlowKey,
    listener: &ListenerEntry,
    tcp_flags: u8,
    counters: &mut GlobalCounters,
) -> bool {
    let mode = listener.flags & (LISTENER_F_ACL_ALLOW | LISTENER_F_ACL_DENY);
    if mode == 0 {
        return true;
    }
    let Some(key) = acl_key(flow, listener) else {
        return true;
    };
    let listed = ACL.get(key).is_some();
    if listed == (mode == LISTENER_F_ACL_ALLOW) {
        return true;
    }
    // A SYN opens a flow: on a closed flow's entry (its port reused) it is a new one.
    let opening = tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if listener.flags & LISTENER_F_ACL_CUT_ESTABLISHED == 0 && established(flow, opening) {
        return true;
    }
    counters.acl_dropped += 1;
    if let Some(c) = LISTENER_STATS.get_ptr_mut(listener.index) {
        unsafe { (*c).acl_dropped += 1 };
    }
    false
}

/// The trie key of the flow's client address in the listener's live set, built in this CPU's
/// scratch entry (on the stack it did not fit beside the rest of the IPv6 path), word by word
/// (a byte-wise copy becomes a memcpy call).
#[inline(always)]
fn acl_key(flow: &FlowKey, listener: &ListenerEntry) -> Option<&'static Key<AclPrefix>> {
    let key = ACL_SCRATCH.get_ptr_mut(0)?;
    let src = (&raw const flow.src).cast::<u32>();
    unsafe {
        // SAFETY: the key is packed: its fields are written unaligned.
        (&raw mut (*key).prefix_len).write_unaligned(AclPrefix::FULL_BITS);
        let data = (&raw mut (*key).data).cast::<u32>();
        data.write_unaligned(u32::from_ne_bytes(
            acl_set(listener.index, listener.flags).to_be_bytes(),
        ));
        // SAFETY: `src` is the 16 bytes of a 4-byte aligned FlowKey's first field, and the
        // prefix's address the 16 bytes after its set.
        let mut i = 0;
        while i < 4 {
            data.add(1 + i).write_unaligned(src.add(i).read());
            i += 1;
        }
        Some(&*key)
    }
}

/// A flow this node carries: in the connection table (open, unless this packet only opens a
/// flow on a closed one's entry) or the half-open table. A function of its own (a BPF call):
/// inlined, its hash's registers pushed the IPv6 path past 512 bytes.
#[inline(never)]
fn established(flow: &FlowKey, opening: bool) -> bool {
    if let Some(conn) = unsafe { CONNECTIONS.get(flow) } {
        return !opening || conn.flags & CONN_F_CLOSING == 0;
    }
    half_open::picked(flow, flow_hash(flow, FLOW_HASH_SEED)).is_some()
}

/// Whether the listener admits one more new flow now. Only an admitted flow writes the
/// shared entry, so a flood being dropped reads it and never bounces its cache line between
/// CPUs; CPUs that read it at the same instant may each admit a flow on the same credit. A
/// refused flow is counted.
#[inline(always)]
pub(crate) fn new_flow_admitted(listener: &ListenerEntry) -> bool {
    if listener.flags & LISTENER_F_NEW_FLOW_LIMIT == 0 {
        return true;
    }
    // The fine clock (the coarse one moves a tick at a time, which would admit at most a
    // burst per tick whatever the rate); only flows that open here on a limited listener
    // pay for it.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(limit) = NEW_FLOW_LIMITS.get_ptr_mut(listener.index) else {
        return true;
    };
    match unsafe { (*limit).admit(now) } {
        Some(next) => {
            unsafe { (*limit).next_ns = next };
            true
        }
        None => {
            if let Some(c) = LISTENER_STATS.get_ptr_mut(listener.index) {
                unsafe { (*c).rate_limited += 1 };
            }
            false
        }
    }
}
