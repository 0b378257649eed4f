//! Loading the XDP object, pinning it, and attaching it to interfaces. Everything lives under
//! /sys/fs/bpf/slb/<instance>: the maps (by name), the program (`prog`) and one link per
//! interface (`links/<iface>`), so `bpftool`, `slb status` and `slb attach` find them.

use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{DevMapHash, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use slb_common::pinned::{self, Entries, PinnedMap, PINNED_MAPS};

use crate::config::AttachMode;
use crate::instance::{link_pin, LINKS_DIR};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PROGRAM_NAME: &str = "slb_xdp";
/// The programs of PROGRAMS, with their slots, in the order they are loaded: new flows placed
/// by load go to the first, IPv6 frames to the second (which hands later fragments and ICMPv6 on
/// to the next two), full NAT to the fifth; last `PROGRAM_NAME` itself, which hands frames to
/// them and which `slb_xdp_pick` hands IPv4 frames back to.
const TAIL_CALLED_PROGRAMS: [(&str, u32); 6] = [
    ("slb_xdp_pick", slb_common::PROGRAM_SLOT_PICK),
    ("slb_xdp6", slb_common::PROGRAM_SLOT_IPV6),
    ("slb_xdp6_fragment", slb_common::PROGRAM_SLOT_IPV6_FRAGMENT),
    ("slb_xdp6_icmp", slb_common::PROGRAM_SLOT_IPV6_ICMP),
    ("slb_xdp_fullnat", slb_common::PROGRAM_SLOT_FULLNAT),
    (PROGRAM_NAME, slb_common::PROGRAM_SLOT_IPV4),
];
const PROGRAM_PIN: &str = "prog";

/// The compiled XDP object, built by build.rs through aya-build.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/slb"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{BPFFS} is not a mounted bpf filesystem and mounting it failed: {0}")]
    Bpffs(std::io::Error),
    #[error("cannot prepare pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("interface {iface:?}: {message}")]
    Interface { iface: String, message: String },
    #[error(transparent)]
    OpenMap(#[from] crate::maps::OpenMapError),
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("handing IPv6 to its programs through the program array: {0}")]
    ProgramArray(#[from] aya::maps::MapError),
    #[error(
        "pinned maps under {dir} do not match this build: {detail}; stop the old instance and remove its pins with `slb stop -i <instance>` first"
    )]
    Layout { dir: PathBuf, detail: String },
    #[error("instance {instance:?} has no pinned program under {path}; is `slb run` serving it?")]
    NotRunning { instance: String, path: PathBuf },
}

/// The sizes of the maps that the config decides, fixed for as long as the maps are pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// Slots of one Maglev ring (`maglev_table_size`).
    pub ring_size: u32,
    /// Entries of CONNECTIONS (`max_connections`).
    pub max_connections: u32,
}

impl TableSizes {
    pub fn of(config: &crate::config::Config) -> TableSizes {
        TableSizes {
            ring_size: config.maglev_table_size,
            max_connections: config.max_connections,
        }
    }

    /// The sizes of an instance's pinned maps.
    pub fn from_pins(dir: &Path) -> Result<TableSizes, DataplaneError> {
        let entries = |name: &str| {
            aya::maps::MapInfo::from_pin(dir.join(name))
                .map(|info| info.max_entries())
                .map_err(|e| DataplaneError::Layout {
                    dir: dir.into(),
                    detail: format!("map {name} cannot be opened: {e}"),
                })
        };
        Ok(TableSizes {
            ring_size: pinned_ring_size(dir)?.unwrap_or(slb_common::DEFAULT_RING_SIZE),
            max_connections: entries(pinned::CONNECTIONS.name)?,
        })
    }
}

pub use crate::instance::pin_dir;

pub fn xdp_mode(mode: AttachMode) -> XdpMode {
    match mode {
        AttachMode::Native => XdpMode::Driver,
        AttachMode::Generic => XdpMode::Skb,
    }
}

/// Makes sure /sys/fs/bpf is a bpf filesystem (it is not, e.g., in a fresh mount namespace).
pub fn ensure_bpffs() -> Result<(), DataplaneError> {
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(BPFFS).expect("no NUL");
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::Bpffs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The loaded program of a running `slb run`.
pub struct Dataplane {
    ebpf: Ebpf,
    dir: PathBuf,
    adopted: bool,
}

impl Dataplane {
    /// Loads the object with `ring_size`-slot rings and pins maps and program under the
    /// instance's directory. When an earlier `slb run` left its pins (killed, or stopped with
    /// `--keep-serving`), the pinned maps are adopted — connection tables and all — after
    /// checking their layout matches this build; the new program replaces the old one on each
    /// pinned link without a gap in service.
    pub fn load(instance: &str, sizes: TableSizes) -> Result<Dataplane, DataplaneError> {
        ensure_bpffs()?;
        let dir = pin_dir(instance);
        let adopted = dir.join(pinned::LISTENERS.name).exists();
        if adopted {
            check_pinned_layout(&dir, sizes)?;
            tracing::info!(dir = %dir.display(), "adopting the pinned maps and links of a previous run");
        }
        fs::create_dir_all(dir.join(LINKS_DIR)).map_err(|source| DataplaneError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut ebpf = load_object(&dir, sizes)?;
        load_programs(&mut ebpf)?;
        let program: &mut Xdp = program_mut(&mut ebpf)?;
        let prog_pin = dir.join(PROGRAM_PIN);
        let _ = fs::remove_file(&prog_pin);
        program.pin(&prog_pin).map_err(|e| DataplaneError::Pin {
            path: prog_pin,
            message: e.to_string(),
        })?;
        Ok(Dataplane { ebpf, dir, adopted })
    }

    /// Whether `load` adopted the pins of an earlier run.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Interfaces an earlier run left attached (pinned links).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.join(LINKS_DIR))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Moves a pinned link of an earlier run to this run's program (one atomic link update).
    pub fn adopt_link(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let path = link_pin(&self.dir, iface);
        let pin_err = |message: String| DataplaneError::Pin {
            path: path.clone(),
            message,
        };
        let pinned = PinnedLink::from_pin(&path).map_err(|e| pin_err(e.to_string()))?;
        let fd_link: FdLink = pinned.into();
        let xdp_link =
            aya::programs::xdp::XdpLink::try_from(fd_link).map_err(|e| pin_err(e.to_string()))?;
        let program = program_mut(&mut self.ebpf)?;
        let id = program.attach_to_link(xdp_link)?;
        // The pin keeps the link; this run's handle only needs to be closed.
        drop(program.take_link(id)?);
        tracing::info!(iface, "kept attached; now running this build's program");
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), DataplaneError> {
        let dir = self.dir.clone();
        attach_program(program_mut(&mut self.ebpf)?, &dir, iface, mode)
    }

    /// Detaches from every interface and removes all pins: the instance stops serving.
    pub fn shutdown(self) -> Result<(), DataplaneError> {
        let dir = self.dir.clone();
        drop(self.ebpf);
        remove_pins(&dir)
    }

    /// Leaves programs attached and maps pinned: traffic keeps flowing without the daemon.
    pub fn keep_serving(self) {
        tracing::info!(dir = %self.dir.display(), "leaving the data plane attached and pinned");
    }
}

/// Loads the XDP object with every map of [`PINNED_MAPS`] pinned (or, when already pinned,
/// reused) under `dir`, CONNECTIONS sized as `sizes` says (rings are created by the
/// reconciler). The program is not loaded into the kernel yet.
pub fn load_object(dir: &Path, sizes: TableSizes) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(pinned::CONNECTIONS.name, sizes.max_connections);
    for map in &PINNED_MAPS {
        loader.map_pin_path(map.name, dir.join(map.name));
    }
    Ok(loader.load(XDP_OBJECT)?)
}

/// Loads the data plane's programs into the kernel, each put into its PROGRAMS slot (replacing
/// an earlier run's, at once for every interface): the ones `slb_xdp` hands frames to first,
/// then `slb_xdp`.
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let missing = |name: &str| DataplaneError::Pin {
        path: name.into(),
        message: "program missing from the object".into(),
    };
    for (name, slot) in TAIL_CALLED_PROGRAMS {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()?;
        load_xdp(program)?;
        let fd = program.fd()?.try_clone().map_err(|e| DataplaneError::Pin {
            path: name.into(),
            message: e.to_string(),
        })?;
        let map = ebpf
            .map_mut(pinned::PROGRAMS.name)
            .ok_or_else(|| missing(pinned::PROGRAMS.name))?;
        aya::maps::ProgramArray::try_from(map)?.set(slot, &fd, 0)?;
    }
    Ok(())
}

/// How often a program load the verifier gave up on because a signal arrived is tried again.
const LOAD_ATTEMPTS: usize = 5;

/// Loads `program` into the kernel. The verifier stops with EAGAIN when the loading thread has
/// a signal pending, which says nothing about the program: the load is tried again, as libbpf
/// does.
pub fn load_xdp(program: &mut Xdp) -> Result<(), aya::programs::ProgramError> {
    let mut attempt = 1;
    loop {
        match program.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::debug!(
                    attempt,
                    "program load interrupted by a signal; loading again"
                );
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The entries `map` has with the config's `sizes`.
fn entries_of(map: &PinnedMap, sizes: TableSizes) -> u32 {
    match map.entries {
        Entries::Fixed(entries) => entries,
        Entries::MaxConnections => sizes.max_connections,
    }
}

/// Refuses to adopt pinned maps whose layout differs from this build's (an upgrade that changed
/// a map, or a different `maglev_table_size`): reading them with the wrong layout would corrupt
/// the data plane.
pub fn check_pinned_layout(dir: &Path, sizes: TableSizes) -> Result<(), DataplaneError> {
    if let Some(found) = pinned_ring_size(dir)? {
        if found != sizes.ring_size {
            return Err(DataplaneError::Layout {
                dir: dir.into(),
                detail: format!(
                    "map RINGS holds rings of {found} slots, this config needs {} (was maglev_table_size changed?)",
                    sizes.ring_size
                ),
            });
        }
    }
    for map in &PINNED_MAPS {
        let name = map.name;
        let (key, value, entries) = (map.key_size, map.value_size, entries_of(map, sizes));
        let path = dir.join(name);
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| DataplaneError::Layout {
            dir: dir.into(),
            detail: format!("map {name} cannot be opened: {e}"),
        })?;
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key, value, entries) {
            let hint = match map.entries {
                _ if *map == pinned::RINGS => " (was maglev_table_size changed?)",
                Entries::MaxConnections => " (was max_connections changed?)",
                Entries::Fixed(_) => "",
            };
            return Err(DataplaneError::Layout {
                dir: dir.into(),
                detail: format!(
                    "map {name} has key/value/entries {}/{}/{}, this build needs {key}/{value}/{entries}{hint}",
                    found.0, found.1, found.2
                ),
            });
        }
    }
    Ok(())
}

/// The slots of the rings a pinned RINGS holds (all have the same), or `None` without rings.
fn pinned_ring_size(dir: &Path) -> Result<Option<u32>, DataplaneError> {
    let layout = |detail: String| DataplaneError::Layout {
        dir: dir.into(),
        detail,
    };
    let data = MapData::from_pin(dir.join(pinned::RINGS.name))
        .map_err(|e| layout(format!("map RINGS cannot be opened: {e}")))?;
    let rings: aya::maps::ArrayOfMaps<MapData, MapData> =
        aya::maps::ArrayOfMaps::try_from(Map::ArrayOfMaps(data))
            .map_err(|e| layout(format!("map RINGS is not an array of rings: {e}")))?;
    for slot in 0..rings.len() {
        if let Ok(ring) = rings.get(&slot, 0) {
            let info = ring
                .info()
                .map_err(|e| layout(format!("a ring of RINGS cannot be read: {e}")))?;
            return Ok(Some(info.max_entries()));
        }
    }
    Ok(None)
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let program = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| DataplaneError::Pin {
            path: PROGRAM_NAME.into(),
            message: "program missing from the object".into(),
        })?;
    Ok(program.try_into()?)
}

fn interface_index(iface: &str) -> Result<u32, DataplaneError> {
    let name = std::ffi::CString::new(iface).map_err(|_| DataplaneError::Interface {
        iface: iface.into(),
        message: "name contains NUL".into(),
    })?;
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(DataplaneError::Interface {
            iface: iface.into(),
            message: "no such interface in this network namespace".into(),
        }),
        index => Ok(index),
    }
}

fn attach_program(
    program: &mut Xdp,
    dir: &Path,
    iface: &str,
    mode: AttachMode,
) -> Result<(), DataplaneError> {
    let ifindex = interface_index(iface)?;
    let pinned_link = link_pin(dir, iface);
    if pinned_link.exists() && crate::links::link_ifindex(&pinned_link) != Some(ifindex) {
        // The pinned link is severed: the interface was deleted (and maybe created again)
        // since. Attach afresh.
        tracing::info!(
            iface,
            "the pinned link no longer holds the interface: re-attaching"
        );
        unpin_link(&pinned_link)?;
    }
    if pinned_link.exists() {
        return Err(DataplaneError::Interface {
            iface: iface.into(),
            message: "already attached".into(),
        });
    }
    let link_id = program
        .attach_to_if_index(ifindex, xdp_mode(mode))
        .map_err(|e| DataplaneError::Interface {
            iface: iface.into(),
            message: format!("attach ({mode:?} mode) failed: {e}"),
        })?;
    let link = program.take_link(link_id)?;
    let fd_link: FdLink = link.try_into().map_err(|e| DataplaneError::Interface {
        iface: iface.into(),
        message: format!("kernel gave no bpf_link to pin: {e}"),
    })?;
    fd_link.pin(&pinned_link).map_err(|e| DataplaneError::Pin {
        path: pinned_link.clone(),
        message: e.to_string(),
    })?;

    let mut egress = open_devmap(dir)?;
    egress
        .insert(ifindex, ifindex, None, 0)
        .map_err(|e| DataplaneError::Interface {
            iface: iface.into(),
            message: format!("adding to EGRESS devmap: {e}"),
        })?;
    tracing::info!(iface, ifindex, ?mode, "attached");
    Ok(())
}

fn open_devmap(dir: &Path) -> Result<DevMapHash<MapData>, DataplaneError> {
    Ok(crate::maps::open(dir, &pinned::EGRESS)?)
}

/// `slb attach`: attaches the pinned program of a running instance to one more interface.
pub fn attach_pinned(instance: &str, iface: &str, mode: AttachMode) -> Result<(), DataplaneError> {
    ensure_bpffs()?;
    let dir = pin_dir(instance);
    let prog_pin = dir.join(PROGRAM_PIN);
    if !prog_pin.exists() {
        return Err(DataplaneError::NotRunning {
            instance: instance.into(),
            path: dir,
        });
    }
    let mut program = Xdp::from_pin(&prog_pin, aya_obj::programs::XdpAttachType::Interface)?;
    attach_program(&mut program, &dir, iface, mode)
}

/// `slb detach`: removes the instance's program from one interface.
pub fn detach_pinned(instance: &str, iface: &str) -> Result<(), DataplaneError> {
    ensure_bpffs()?;
    let dir = pin_dir(instance);
    let pinned_link = link_pin(&dir, iface);
    if !pinned_link.exists() {
        return Err(DataplaneError::Interface {
            iface: iface.into(),
            message: format!("instance {instance:?} is not attached to it"),
        });
    }
    unpin_link(&pinned_link)?;
    if let Ok(ifindex) = interface_index(iface) {
        let mut egress = open_devmap(&dir)?;
        let _ = egress.remove(ifindex);
    }
    tracing::info!(iface, "detached");
    Ok(())
}

fn unpin_link(path: &Path) -> Result<(), DataplaneError> {
    let link = PinnedLink::from_pin(path).map_err(|e| DataplaneError::Pin {
        path: path.into(),
        message: e.to_string(),
    })?;
    // Dropping the last reference to the link detaches the program.
    let fd_link = link.unpin().map_err(|e| DataplaneError::Pin {
        path: path.into(),
        message: e.to_string(),
    })?;
    drop(fd_link);
    Ok(())
}

/// Detaches every pinned link and removes the instance's directory.
pub fn remove_pins(dir: &Path) -> Result<(), DataplaneError> {
    let links = dir.join(LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for entry in entries.flatten() {
            unpin_link(&entry.path())?;
        }
    }
    fs::remove_dir_all(dir).map_err(|source| DataplaneError::PinDir {
        path: dir.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};
    use slb_common::pinned::{Entries, PINNED_MAPS, UNPINNED_MAPS};

    /// The table of pinned maps in slb-common describes the maps the object declares: every map
    /// of the object is in it (or is one of the few never pinned), with the same key size,
    /// value size and entries, so the pins, the layout check and the openers all agree with it.
    #[test]
    fn the_pinned_map_table_matches_the_object() {
        let object = aya_obj::Object::parse(super::XDP_OBJECT).expect("the XDP object parses");
        for (name, map) in &object.maps {
            if UNPINNED_MAPS.contains(&name.as_str()) {
                continue;
            }
            let described = PINNED_MAPS
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("map {name} of the object is not in PINNED_MAPS"));
            let entries = match described.entries {
                Entries::Fixed(entries) => entries,
                Entries::MaxConnections => slb_common::MAX_CONNECTIONS,
            };
            assert_eq!(
                (
                    map.key_size() as usize,
                    map.value_size() as usize,
                    map.max_entries()
                ),
                (described.key_size, described.value_size, entries),
                "map {name}: key size, value size and entries in the object and in PINNED_MAPS"
            );
        }
        for described in PINNED_MAPS.iter().map(|m| m.name).chain(UNPINNED_MAPS) {
            assert!(
                object.maps.contains_key(described),
                "{described} is described but the object has no such map"
            );
        }
    }

    /// The XDP programs call no `memset`: the BPF backend turns keys built from byte arrays
    /// with runs of zeros into calls to a byte-by-byte memset (~30 ns per packet), so keys are
    /// built as words (`ipv4_mapped`, `FlowKey::ipv4`) and scratch space is zeroed in place
    /// (`forward::zero_in_place`). This fails when a change brings such a call back.
    #[test]
    fn the_xdp_programs_call_no_memset() {
        let file = object::File::parse(super::XDP_OBJECT).expect("the XDP object is ELF");
        // The programs' sections and `.text`, where the compiler may put a program's body (the
        // section then holds a stub that calls it) and the helpers themselves live.
        let called: Vec<String> = file
            .sections()
            .filter(|section| section.kind() == object::SectionKind::Text)
            .flat_map(|section| section.relocations().collect::<Vec<_>>())
            .filter_map(|(_, relocation)| match relocation.target() {
                RelocationTarget::Symbol(index) => file.symbol_by_index(index).ok(),
                _ => None,
            })
            .filter_map(|symbol| symbol.name().ok().map(str::to_owned))
            .filter(|name| name.starts_with("mem"))
            .collect();
        assert!(
            called.is_empty(),
            "the XDP programs call {called:?}; build the key or buffer with word stores"
        );
    }
}
