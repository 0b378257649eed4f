//! Loading the XDP object, pinning it, and attaching it to interfaces. Everything lives under
//! /sys/fs/bpf/slb/<instance>: the maps (by name), the program (`prog`) and one link per
//! interface (`links/<iface>`), so `bpftool`, `slb status` and `slb attach` find them.

use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::{DevMapHash, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use slb_common::{MAX_LISTENERS, RINGS_PER_LISTENER};

use crate::config::AttachMode;

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PROGRAM_NAME: &str = "slb_xdp";
const PROGRAM_PIN: &str = "prog";
const LINKS_DIR: &str = "links";

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
    #[error("map {name}: {source}")]
    Map {
        name: String,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("instance {instance:?} has no pinned program under {path}; is `slb run` serving it?")]
    NotRunning { instance: String, path: PathBuf },
}

pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPFFS).join("slb").join(instance)
}

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
}

impl Dataplane {
    /// Loads the object with `ring_size`-slot rings and pins maps and program under the
    /// instance's directory. Leftovers of an instance that did not exit cleanly are removed first
    /// (their links detached), so a start is always from a known state.
    pub fn load(instance: &str, ring_size: u32) -> Result<Dataplane, DataplaneError> {
        ensure_bpffs()?;
        let dir = pin_dir(instance);
        if dir.exists() {
            tracing::warn!(dir = %dir.display(), "removing pins left by a previous run");
            remove_pins(&dir)?;
        }
        fs::create_dir_all(dir.join(LINKS_DIR)).map_err(|source| DataplaneError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries("RINGS", MAX_LISTENERS * RINGS_PER_LISTENER * ring_size)
            .load(XDP_OBJECT)?;
        let program: &mut Xdp = program_mut(&mut ebpf)?;
        program.load()?;
        let prog_pin = dir.join(PROGRAM_PIN);
        program.pin(&prog_pin).map_err(|e| DataplaneError::Pin {
            path: prog_pin,
            message: e.to_string(),
        })?;
        Ok(Dataplane { ebpf, dir })
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
    let link_pin = dir.join(LINKS_DIR).join(iface);
    if link_pin.exists() {
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
    fd_link.pin(&link_pin).map_err(|e| DataplaneError::Pin {
        path: link_pin.clone(),
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
    let path = dir.join("EGRESS");
    let data = MapData::from_pin(&path).map_err(|source| DataplaneError::Map {
        name: "EGRESS".into(),
        source,
    })?;
    let map = Map::from_map_data(data).map_err(|source| DataplaneError::Map {
        name: "EGRESS".into(),
        source,
    })?;
    DevMapHash::try_from(map).map_err(|source| DataplaneError::Map {
        name: "EGRESS".into(),
        source,
    })
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
    let link_pin = dir.join(LINKS_DIR).join(iface);
    if !link_pin.exists() {
        return Err(DataplaneError::Interface {
            iface: iface.into(),
            message: format!("instance {instance:?} is not attached to it"),
        });
    }
    unpin_link(&link_pin)?;
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
