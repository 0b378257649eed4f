//! `slb decap`: the decapsulator a backend of a tunnelling DSR listener (`dsr = "ipip"`) runs on
//! its interface. slb's own XDP program strips the outer header of packets from the accepted
//! slb tunnel sources to the accepted VIPs, so the backend needs no tunnel device (this kernel
//! has no ipip module). The link and maps are pinned under
//! `/sys/fs/bpf/slb-decap/<netns>-<interface>/`: the program stays after the command exits, and
//! running `attach` again replaces the accepted addresses in place.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::Xdp;
use aya::EbpfLoader;
use serde::Serialize;
use slb_common::{
    Addr, DecapCounters, DECAP_SOURCES_MAP, DECAP_STATS_MAP, DECAP_VIPS_MAP, MAX_DECAP_ADDRESSES,
};

use crate::config::AttachMode;
use crate::dataplane::{ensure_bpffs, load_xdp, xdp_mode, DataplaneError};
use crate::reconcile::data_plane_addr;

pub static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/slb-decap"));
const PROGRAM: &str = "slb_decap";
const ROOT: &str = "/sys/fs/bpf/slb-decap";
const LINK_PIN: &str = "link";

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("interface {0:?} does not exist in this network namespace")]
    NoInterface(String),
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("no decapsulator on {0} (attach one with `slb decap attach`)")]
    NotAttached(String),
    #[error("{context}: {detail}")]
    Bpf { context: String, detail: String },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

fn bpf_err(context: impl Into<String>) -> impl FnOnce(String) -> DecapError {
    let context = context.into();
    move |detail| DecapError::Bpf { context, detail }
}

/// What a decapsulator accepts.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Outer source addresses: the slb nodes' `tunnel_source`s.
    pub sources: Vec<IpAddr>,
    /// Inner destinations: the VIPs this backend serves.
    pub vips: Vec<IpAddr>,
}

impl Accepted {
    fn validate(&self) -> Result<(), DecapError> {
        for (what, list) in [("--source", &self.sources), ("--vip", &self.vips)] {
            if list.is_empty() {
                return Err(DecapError::Invalid {
                    what,
                    detail: "give at least one address".into(),
                });
            }
            if list.len() > MAX_DECAP_ADDRESSES as usize {
                return Err(DecapError::Invalid {
                    what,
                    detail: format!("{} addresses, at most {MAX_DECAP_ADDRESSES}", list.len()),
                });
            }
            if let Some(bad) = list.iter().find(|a| a.is_unspecified() || a.is_multicast()) {
                return Err(DecapError::Invalid {
                    what,
                    detail: format!("{bad} is no unicast address"),
                });
            }
        }
        Ok(())
    }
}

/// A decapsulator's state as `slb decap status` shows it.
#[derive(Debug, Serialize)]
pub struct DecapStatus {
    pub interface: String,
    pub sources: Vec<IpAddr>,
    pub vips: Vec<IpAddr>,
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Where the decapsulator of `iface` in this network namespace is pinned (interface names repeat
/// across namespaces, which share bpffs).
pub fn pin_dir(iface: &str) -> Result<PathBuf, DecapError> {
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| bpf_err("reading this network namespace")(e.to_string()))?
        .ino();
    Ok(Path::new(ROOT).join(format!("{netns}-{iface}")))
}

fn ifindex(iface: &str) -> Result<u32, DecapError> {
    crate::links::ifindex_of(iface).ok_or_else(|| DecapError::NoInterface(iface.into()))
}

/// Attaches the decapsulator to `iface` accepting `accepted`, or, when it is attached already,
/// replaces what it accepts (no packet misses it meanwhile). Returns whether it was attached now.
pub fn attach(iface: &str, accepted: &Accepted, mode: AttachMode) -> Result<bool, DecapError> {
    accepted.validate()?;
    let index = ifindex(iface)?;
    ensure_bpffs()?;
    let dir = pin_dir(iface)?;
    let link = dir.join(LINK_PIN);
    if link.exists() && crate::links::link_ifindex(&link) != Some(index) {
        // The interface went away (and maybe came back) since: start afresh.
        remove(&dir)?;
    }
    if link.exists() {
        write_accepted(&dir, accepted)?;
        return Ok(false);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| bpf_err(format!("creating {}", dir.display()))(e.to_string()))?;
    let attached = load_and_attach(&dir, index, accepted, mode);
    if attached.is_err() {
        let _ = remove(&dir);
    }
    attached.map(|()| true)
}

fn load_and_attach(
    dir: &Path,
    index: u32,
    accepted: &Accepted,
    mode: AttachMode,
) -> Result<(), DecapError> {
    let mut loader = EbpfLoader::new();
    for name in [DECAP_SOURCES_MAP, DECAP_VIPS_MAP, DECAP_STATS_MAP] {
        loader.map_pin_path(name, dir.join(name));
    }
    let mut ebpf = loader
        .load(DECAP_OBJECT)
        .map_err(|e| bpf_err("loading the decapsulator")(e.to_string()))?;
    // Filled before the program sees a packet.
    write_accepted(dir, accepted)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| bpf_err("the decapsulator object")(format!("no program {PROGRAM}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| bpf_err(PROGRAM)(e.to_string()))?;
    load_xdp(program)
        .map_err(|e| bpf_err("the verifier refused the decapsulator")(e.to_string()))?;
    let link_id = program
        .attach_to_if_index(index, xdp_mode(mode))
        .map_err(|e| bpf_err(format!("attaching ({mode:?} mode)"))(e.to_string()))?;
    let link: FdLink = program
        .take_link(link_id)
        .map_err(|e| bpf_err("taking the link")(e.to_string()))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| bpf_err("the link")(e.to_string()))?;
    link.pin(dir.join(LINK_PIN))
        .map_err(|e| bpf_err("pinning the link")(e.to_string()))?;
    Ok(())
}

fn open_map(dir: &Path, name: &str) -> Result<MapData, DecapError> {
    MapData::from_pin(dir.join(name)).map_err(|e| bpf_err(format!("opening {name}"))(e.to_string()))
}

fn address_map(dir: &Path, name: &str) -> Result<HashMap<MapData, Addr, u32>, DecapError> {
    HashMap::try_from(Map::HashMap(open_map(dir, name)?))
        .map_err(|e| bpf_err(format!("opening {name}"))(e.to_string()))
}

/// Makes the maps hold exactly `accepted`: the new addresses first, then the old ones removed,
/// so an address in both is never missing.
fn write_accepted(dir: &Path, accepted: &Accepted) -> Result<(), DecapError> {
    for (name, list) in [
        (DECAP_SOURCES_MAP, &accepted.sources),
        (DECAP_VIPS_MAP, &accepted.vips),
    ] {
        let mut map = address_map(dir, name)?;
        let wanted: BTreeSet<Addr> = list.iter().map(|a| data_plane_addr(*a)).collect();
        for addr in &wanted {
            map.insert(addr, 1, 0)
                .map_err(|e| bpf_err(format!("writing {name}"))(e.to_string()))?;
        }
        let stale: Vec<Addr> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(k))
            .collect();
        for addr in stale {
            map.remove(&addr)
                .map_err(|e| bpf_err(format!("writing {name}"))(e.to_string()))?;
        }
    }
    Ok(())
}

/// Detaches the decapsulator from `iface` and removes its pins.
pub fn detach(iface: &str) -> Result<(), DecapError> {
    let dir = pin_dir(iface)?;
    if !dir.exists() {
        return Err(DecapError::NotAttached(iface.into()));
    }
    remove(&dir)
}

fn remove(dir: &Path) -> Result<(), DecapError> {
    let link = dir.join(LINK_PIN);
    if link.exists() {
        let pinned =
            PinnedLink::from_pin(&link).map_err(|e| bpf_err("opening the link")(e.to_string()))?;
        // Dropping the last reference to the link detaches the program.
        drop(
            pinned
                .unpin()
                .map_err(|e| bpf_err("unpinning the link")(e.to_string()))?,
        );
    }
    std::fs::remove_dir_all(dir)
        .map_err(|e| bpf_err(format!("removing {}", dir.display()))(e.to_string()))
}

/// What the decapsulator of `iface` accepts and has done.
pub fn status(iface: &str) -> Result<DecapStatus, DecapError> {
    let dir = pin_dir(iface)?;
    if !dir.join(LINK_PIN).exists() {
        return Err(DecapError::NotAttached(iface.into()));
    }
    let addresses = |name| -> Result<Vec<IpAddr>, DecapError> {
        Ok(address_map(&dir, name)?
            .keys()
            .filter_map(Result::ok)
            .map(crate::reconcile::addr_of_data_plane)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect())
    };
    let stats: PerCpuArray<MapData, DecapCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(open_map(&dir, DECAP_STATS_MAP)?))
            .map_err(|e| bpf_err("opening DECAP_STATS")(e.to_string()))?;
    let mut total = DecapCounters::default();
    for per_cpu in stats
        .get(&0, 0)
        .map_err(|e| bpf_err("reading DECAP_STATS")(e.to_string()))?
        .iter()
    {
        total.add(per_cpu);
    }
    Ok(DecapStatus {
        interface: iface.into(),
        sources: addresses(DECAP_SOURCES_MAP)?,
        vips: addresses(DECAP_VIPS_MAP)?,
        counters: DecapCounters::FIELDS
            .iter()
            .map(|f| f.to_string())
            .zip(total.values())
            .collect(),
    })
}

/// `slb decap status`'s text.
pub fn render(status: &DecapStatus) -> String {
    let list = |l: &[IpAddr]| {
        l.iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "decapsulator on {}\n  accepts tunnels from: {}\n  to VIPs: {}\n",
        status.interface,
        list(&status.sources),
        list(&status.vips)
    );
    for (name, value) in &status.counters {
        out.push_str(&format!("  {name}: {value}\n"));
    }
    out
}
