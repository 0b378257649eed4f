//! Typed handles on the pinned maps of an instance, shared by the daemon and `slb status`.

use std::os::fd::AsFd as _;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use aya::maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray};
use slb_common::{
    Backend, BackendEndpoint, Connection, FlowKey, GlobalCounters, ListenerEntry, ListenerKey,
    ReplyNat, TrafficCounters,
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
    pub rings: Array<MapData, u32>,
    pub backends: Array<MapData, Backend>,
    pub backend_health: Array<MapData, u32>,
    pub connections: HashMap<MapData, FlowKey, Connection>,
    pub reply_nat: HashMap<MapData, BackendEndpoint, ReplyNat>,
    pub nat_addresses: HashMap<MapData, u32, u32>,
    pub listener_stats: PerCpuArray<MapData, TrafficCounters>,
    pub backend_stats: PerCpuArray<MapData, TrafficCounters>,
    pub global_stats: PerCpuArray<MapData, GlobalCounters>,
}

fn open<T>(dir: &Path, name: &'static str) -> Result<T, OpenMapError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let err = |source| OpenMapError {
        name,
        dir: dir.display().to_string(),
        source,
    };
    let data = MapData::from_pin(dir.join(name)).map_err(err)?;
    let map = Map::from_map_data(data).map_err(err)?;
    T::try_from(map).map_err(err)
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<PinnedMaps, OpenMapError> {
        Ok(PinnedMaps {
            listeners: open(dir, "LISTENERS")?,
            rings: open(dir, "RINGS")?,
            backends: open(dir, "BACKENDS")?,
            backend_health: open(dir, "BACKEND_HEALTH")?,
            connections: open(dir, "CONNECTIONS")?,
            reply_nat: open(dir, "REPLY_NAT")?,
            nat_addresses: open(dir, "NAT_ADDRESSES")?,
            listener_stats: open(dir, "LISTENER_STATS")?,
            backend_stats: open(dir, "BACKEND_STATS")?,
            global_stats: open(dir, "GLOBAL_STATS")?,
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
        })
}

/// An mmap of the RINGS array (created with `BPF_F_MMAPABLE`), shared with the kernel, so writing
/// a ring costs memory stores, not a syscall per slot. The kernel stores array elements 8-byte
/// aligned, so slot `i` is the `u32` at offset `8 × i`.
pub struct MappedRings {
    base: NonNull<AtomicU32>,
    len: usize,
    /// Distance between two slots, in u32s.
    stride: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory that the kernel reads concurrently; every access
// goes through AtomicU32.
unsafe impl Send for MappedRings {}
unsafe impl Sync for MappedRings {}

impl MappedRings {
    /// Maps RINGS, or `None` (with the reason logged) when it cannot be mapped, e.g. a map
    /// pinned by an slb without `BPF_F_MMAPABLE`; then the caller writes slots through the
    /// syscall.
    pub fn new(rings: &Array<MapData, u32>) -> Option<MappedRings> {
        let data = rings.map();
        let info = data.info().ok()?;
        if info.map_flags() & slb_common::RINGS_MAP_FLAGS == 0 {
            tracing::info!(
                "RINGS is not mmap-able (pinned by an older slb): rings are written slot by slot"
            );
            return None;
        }
        let len = info.max_entries() as usize;
        if info.value_size() != 4 {
            tracing::warn!(
                "RINGS values are {} bytes, not 4: rings are written slot by slot",
                info.value_size()
            );
            return None;
        }
        let element = 8; // round_up(value_size, 8), as the kernel lays out array elements
                         // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        let bytes = (len * element).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's fd; the kernel keeps the map alive while
        // mapped, whatever happens to the fd.
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
            tracing::warn!(
                "mmap of RINGS failed ({}): rings are written slot by slot",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(MappedRings {
            base: NonNull::new(ptr.cast())?,
            len,
            stride: element / 4,
            bytes,
        })
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
        (index < self.len).then(|| unsafe { self.base.add(index * self.stride).as_ref() })
    }
}

impl Drop for MappedRings {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what open() mapped; no reference into it outlives self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}
