//! Typed handles on the pinned maps of an instance, shared by the daemon and `slb status`.

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use slb_common::{
    Backend, Connection, FlowKey, GlobalCounters, ListenerEntry, ListenerKey, ReverseNat,
    TrafficCounters,
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
    pub reverse_nat: HashMap<MapData, FlowKey, ReverseNat>,
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
            reverse_nat: open(dir, "REVERSE_NAT")?,
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
        })
}
