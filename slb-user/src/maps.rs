//! Typed handles on the pinned maps of an instance, shared by the daemon and `slb status`.

use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, ArrayOfMaps, HashMap, Map, MapData, MapError, PerCpuArray};
use slb_common::pinned::{self, PinnedMap};
use slb_common::{
    AclPrefix, Addr, Backend, BackendEndpoint, Connection, FlowKey, GlobalCounters, ListenerEntry,
    ListenerKey, NewFlowLimit, ReplyNat, SnatPool, TrafficCounters, WlcSet,
};

#[derive(Debug, thiserror::Error)]
#[error("pinned map {name} under {dir}: {source}")]
pub struct OpenMapError {
    pub name: &'static str,
    pub dir: String,
    pub source: MapError,
}

pub struct PinnedMaps {
    pub listeners: HashMap<MapData, ListenerKey, ListenerEntry>,
    pub rings: ArrayOfMaps<MapData, MapData>,
    /// RINGS again, for what aya's `ArrayOfMaps` cannot do (emptying a slot).
    pub rings_map: MapData,
    pub backends: Array<MapData, Backend>,
    pub backend_health: Array<MapData, u32>,
    pub connections: HashMap<MapData, FlowKey, Connection>,
    pub reply_nat: HashMap<MapData, BackendEndpoint, ReplyNat>,
    /// NAT_ADDRESSES and NAT_ADDRESSES6: written through [`PinnedMaps::insert_nat_address`].
    nat_addresses: HashMap<MapData, u32, u32>,
    nat_addresses6: HashMap<MapData, Addr, u32>,
    pub endpoint_filter: Array<MapData, u32>,
    pub snat_pools: Array<MapData, SnatPool>,
    pub acl: LpmTrie<MapData, AclPrefix, u32>,
    pub new_flow_limits: Array<MapData, NewFlowLimit>,
    /// Least-connections sets by ring slot (the listener entry's `ring_index`).
    pub wlc_sets: Array<MapData, WlcSet>,
    pub counters: CounterMaps,
}

impl PinnedMaps {
    /// Marks `address` as a VIP's or backend's (`NAT_ADDRESS_F_*`) in its family's map.
    pub fn insert_nat_address(&mut self, address: IpAddr, flags: u32) -> Result<(), MapError> {
        match address {
            IpAddr::V4(v4) => self
                .nat_addresses
                .insert(u32::from_ne_bytes(v4.octets()), flags, 0),
            IpAddr::V6(v6) => self.nat_addresses6.insert(v6.octets(), flags, 0),
        }
    }

    /// Empties set `set` of ACL: every key of it found in the map, so whatever an earlier run
    /// left there goes too.
    pub fn clear_acl_set(&mut self, set: u32) -> Result<(), MapError> {
        let wanted = set.to_be_bytes();
        let keys: Vec<Key<AclPrefix>> = self
            .acl
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.data().set == wanted)
            .collect();
        for key in keys {
            match self.acl.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Forgets `address` (absent already is fine).
    pub fn remove_nat_address(&mut self, address: IpAddr) {
        let _ = match address {
            IpAddr::V4(v4) => self.nat_addresses.remove(&u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => self.nat_addresses6.remove(&v6.octets()),
        };
    }
}

/// The data plane's traffic counters, opened once by whoever reads them again and again (the
/// sweeper, the daemon's Prometheus endpoint and history) or once (`slb status`).
pub struct CounterMaps {
    pub listener_stats: PerCpuArray<MapData, TrafficCounters>,
    pub backend_stats: PerCpuArray<MapData, TrafficCounters>,
    pub global_stats: PerCpuArray<MapData, GlobalCounters>,
    /// BACKEND_CONNECTIONS: each backend id's open connections, exact now (the sweep's tally
    /// is as of its last walk of the connection table).
    pub backend_connections: BackendConnections,
}

impl CounterMaps {
    pub fn open(dir: &Path) -> Result<CounterMaps, OpenMapError> {
        Ok(CounterMaps {
            listener_stats: open(dir, &pinned::LISTENER_STATS)?,
            backend_stats: open(dir, &pinned::BACKEND_STATS)?,
            global_stats: open(dir, &pinned::GLOBAL_STATS)?,
            backend_connections: BackendConnections::open(dir)?,
        })
    }

    /// The listener's counters summed over CPUs.
    pub fn listener(&self, index: u32) -> Result<TrafficCounters, MapError> {
        Ok(sum_traffic(&self.listener_stats.get(&index, 0)?))
    }

    /// The backend's counters summed over CPUs.
    pub fn backend(&self, id: u32) -> Result<TrafficCounters, MapError> {
        Ok(sum_traffic(&self.backend_stats.get(&id, 0)?))
    }

    /// The global counters summed over CPUs.
    pub fn global(&self) -> Result<GlobalCounters, MapError> {
        let mut total = GlobalCounters::default();
        for per_cpu in self.global_stats.get(&0, 0)?.iter() {
            total.add(per_cpu);
        }
        Ok(total)
    }
}

/// The pinned map `map` under `dir`, as the map type `T`.
pub(crate) fn open<T>(dir: &Path, map: &PinnedMap) -> Result<T, OpenMapError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = open_data(dir, map)?;
    let err = open_error(dir, map);
    T::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)
}

/// The pinned map `map` under `dir`, untyped.
pub(crate) fn open_data(dir: &Path, map: &PinnedMap) -> Result<MapData, OpenMapError> {
    MapData::from_pin(dir.join(map.name)).map_err(open_error(dir, map))
}

fn open_error<'a>(dir: &'a Path, map: &PinnedMap) -> impl Fn(MapError) -> OpenMapError + Copy + 'a {
    let name = map.name;
    move |source| OpenMapError {
        name,
        dir: dir.display().to_string(),
        source,
    }
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<PinnedMaps, OpenMapError> {
        Ok(PinnedMaps {
            listeners: open(dir, &pinned::LISTENERS)?,
            rings: open(dir, &pinned::RINGS)?,
            rings_map: open_data(dir, &pinned::RINGS)?,
            backends: open(dir, &pinned::BACKENDS)?,
            backend_health: open(dir, &pinned::BACKEND_HEALTH)?,
            connections: open(dir, &pinned::CONNECTIONS)?,
            reply_nat: open(dir, &pinned::REPLY_NAT)?,
            nat_addresses: open(dir, &pinned::NAT_ADDRESSES)?,
            nat_addresses6: open(dir, &pinned::NAT_ADDRESSES6)?,
            endpoint_filter: open(dir, &pinned::ENDPOINT_FILTER)?,
            snat_pools: open(dir, &pinned::SNAT_POOLS)?,
            acl: open(dir, &pinned::ACL)?,
            new_flow_limits: open(dir, &pinned::NEW_FLOW_LIMITS)?,
            wlc_sets: open(dir, &pinned::WLC_SETS)?,
            counters: CounterMaps::open(dir)?,
        })
    }
}

/// Sums the per-CPU copies of a traffic counter.
pub fn sum_traffic(values: &[TrafficCounters]) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |a, v| TrafficCounters {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
            new_connections: a.new_connections + v.new_connections,
            closed_connections: a.closed_connections + v.closed_connections,
            acl_dropped: a.acl_dropped + v.acl_dropped,
            rate_limited: a.rate_limited + v.rate_limited,
            at_capacity: a.at_capacity + v.at_capacity,
        })
}

/// One Maglev ring (an inner map of RINGS, created `BPF_F_MMAPABLE`) mapped into our memory and
/// shared with the kernel, so writing a ring costs memory stores, not a syscall per slot. The
/// kernel stores array elements 8-byte aligned, so slot `i` is the `u32` at offset `8 × i`.
pub struct MappedRing {
    /// Keeps the map alive and names it.
    map: MapData,
    base: NonNull<AtomicU32>,
    len: usize,
    bytes: usize,
}

/// Distance between two slots, in u32s (`round_up(value_size, 8)` bytes).
const SLOT_STRIDE: usize = 2;

// SAFETY: the mapping is plain shared memory that the kernel reads concurrently; every access
// goes through AtomicU32.
unsafe impl Send for MappedRing {}
unsafe impl Sync for MappedRing {}

impl MappedRing {
    /// Creates a ring of `slots` slots, every slot `NO_BACKEND`-free (0) until written.
    pub fn create(slots: u32) -> Result<MappedRing, MapError> {
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY,
            4,
            4,
            slots,
            slb_common::RINGS_MAP_FLAGS,
        );
        MappedRing::map(MapData::create(obj, "slb_ring", None)?)
    }

    /// Maps an existing ring.
    pub fn map(map: MapData) -> Result<MappedRing, MapError> {
        let info = map.info()?;
        let len = info.max_entries() as usize;
        if info.value_size() != 4 || info.map_flags() & slb_common::RINGS_MAP_FLAGS == 0 {
            return Err(MapError::InvalidValueSize {
                size: info.value_size() as usize,
                expected: 4,
            });
        }
        let (base, bytes) = map_shared(&map, len * SLOT_STRIDE * 4)?;
        Ok(MappedRing {
            map,
            base: base.cast(),
            len,
            bytes,
        })
    }

    pub fn map_data(&self) -> &MapData {
        &self.map
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slot `index`, or `None` past the end.
    pub fn slot(&self, index: usize) -> Option<&AtomicU32> {
        // SAFETY: in bounds of the live mapping (len × 8 bytes), 8-byte aligned.
        (index < self.len).then(|| unsafe { self.base.add(index * SLOT_STRIDE).as_ref() })
    }
}

/// A shared, writable mapping of `map` (an array created `BPF_F_MMAPABLE`) covering `len`
/// bytes, rounded up to whole pages: its address and length. The kernel keeps the map alive
/// while mapped, whatever happens to the fd.
fn map_shared(map: &MapData, len: usize) -> Result<(NonNull<u8>, usize), MapError> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let bytes = len.div_ceil(page) * page;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh shared mapping of the map's fd.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "mmap",
            io_error: std::io::Error::last_os_error(),
        }));
    }
    Ok((
        NonNull::new(ptr.cast()).expect("mmap returned a non-null mapping"),
        bytes,
    ))
}

/// BACKEND_CONNECTIONS mapped into our memory: the open connections of each backend id, which
/// the data plane changes with atomic adds. The sweeper takes off the flows it expires with the
/// same atomic adds (a map update would overwrite whatever the data plane added meanwhile).
pub struct BackendConnections {
    /// Keeps the map alive.
    _map: MapData,
    base: NonNull<AtomicU64>,
    len: usize,
    bytes: usize,
}

// SAFETY: shared memory the kernel changes concurrently; every access goes through AtomicU64.
unsafe impl Send for BackendConnections {}
unsafe impl Sync for BackendConnections {}

impl BackendConnections {
    pub fn open(dir: &Path) -> Result<BackendConnections, OpenMapError> {
        let err = open_error(dir, &pinned::BACKEND_CONNECTIONS);
        let map = open_data(dir, &pinned::BACKEND_CONNECTIONS)?;
        let info = map.info().map_err(err)?;
        if info.value_size() != 8
            || info.map_flags() & slb_common::BACKEND_CONNECTIONS_MAP_FLAGS == 0
        {
            return Err(err(MapError::InvalidValueSize {
                size: info.value_size() as usize,
                expected: 8,
            }));
        }
        let len = info.max_entries() as usize;
        let (base, bytes) = map_shared(&map, len * 8).map_err(err)?;
        Ok(BackendConnections {
            _map: map,
            base: base.cast(),
            len,
            bytes,
        })
    }

    fn word(&self, id: u32) -> Option<&AtomicU64> {
        let index = id as usize;
        // SAFETY: in bounds of the live mapping (len × 8 bytes), 8-byte aligned.
        (index < self.len).then(|| unsafe { self.base.add(index).as_ref() })
    }

    /// Backend `id`'s open connections now.
    pub fn open_connections(&self, id: u32) -> u32 {
        self.word(id).map_or(0, |w| {
            slb_common::open_connections(w.load(Ordering::Relaxed))
        })
    }

    /// One open connection of backend `id` is gone.
    pub fn take_one(&self, id: u32) {
        if let Some(w) = self.word(id) {
            w.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for BackendConnections {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what open() mapped; no reference into it outlives self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what map() mapped; no reference into it outlives self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}

/// Empties slot `index` of an array of maps (aya has no remove for it): the kernel frees the
/// inner map once no program run still uses it.
pub fn clear_map_slot(outer: &MapData, index: u32) -> std::io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let mut attr = ElemAttr {
        map_fd: outer.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &index as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    match bpf_elem(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// The `bpf_attr` of the element commands (for what aya does not offer).
#[repr(C)]
pub(crate) struct ElemAttr {
    pub map_fd: u32,
    pub _pad: u32,
    pub key: u64,
    pub value: u64,
    pub flags: u64,
}

pub(crate) fn bpf_elem(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<()> {
    // SAFETY: a valid bpf_attr prefix for the element commands; the caller's key and value
    // outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `bpf_attr` of the batch commands (aya has no batch operations).
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

pub(crate) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// One batch command; on return `attr.count` says how many elements were done.
pub(crate) fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix for the batch commands; the buffers it points to
    // outlive the call and hold `count` elements.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Puts `rings` into their slots of the array of maps `outer` with one batch update: the kernel
/// waits for running programs after every update of a map of maps (an RCU grace period,
/// ~5 ms here), so one batch instead of one update per ring.
pub fn set_ring_slots(outer: &MapData, rings: &[(u32, &MappedRing)]) -> std::io::Result<()> {
    if rings.is_empty() {
        return Ok(());
    }
    let keys: Vec<u32> = rings.iter().map(|(slot, _)| *slot).collect();
    let fds: Vec<u32> = rings
        .iter()
        .map(|(_, ring)| ring.map_data().fd().as_fd().as_raw_fd() as u32)
        .collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: fds.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: outer.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)
}
