//! Whether each pinned XDP link still runs on the interface it is named after. An XDP link holds
//! a device, not a name: when the interface is deleted the kernel detaches the program and
//! leaves the link defunct (its ifindex reads 0, updating it fails with "Link has been
//! severed"), and an interface re-created under the same name is a new device without the
//! program. The pin stays either way, so the pin alone says nothing; the daemon compares the
//! link's device with the one the name resolves to now, re-attaches when they differ, and
//! records what it did for `slb status`.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The ifindex `name` resolves to in this network namespace, if it exists.
pub fn ifindex_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => None,
        index => Some(index),
    }
}

/// The ifindex of the device the XDP link pinned at `pin` runs on; `None` when there is no such
/// pin or the link is defunct (its device was deleted).
pub fn link_ifindex(pin: &Path) -> Option<u32> {
    let fd = bpf_obj_get(pin).ok()?;
    match xdp_link_ifindex(&fd) {
        Ok(0) => None,
        Ok(index) => Some(index),
        Err(e) => {
            tracing::debug!(pin = %pin.display(), "reading link info: {e}");
            None
        }
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zeroed, 8-aligned buffer larger than any bpf_attr this module uses;
    // the kernel reads and writes only within the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn bpf_obj_get(pin: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // bpf_attr for BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `bpf_link_info.xdp.ifindex` of the link `fd`; 0 when its device is gone.
fn xdp_link_ifindex(fd: &OwnedFd) -> std::io::Result<u32> {
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; union { ...;
    // struct { __u32 ifindex; } xdp; ... }; } with the union 8-aligned: ifindex is at byte 16.
    const BPF_LINK_TYPE_XDP: u32 = 6;
    let mut info = [0u64; 32];
    let mut attr = [0u64; 16];
    // bpf_attr for BPF_OBJ_GET_INFO_BY_FD: { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = info[0] as u32;
    if link_type != BPF_LINK_TYPE_XDP {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an XDP link (type {link_type})"),
        ));
    }
    Ok(info[2] as u32)
}

/// What the daemon did about one interface's link, kept in `/run/slb/<instance>/links.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkHistory {
    /// How often the daemon re-attached the program after the interface was re-created.
    pub reattached: u32,
    #[serde(default, deserialize_with = "unix_ns_from_u64")]
    pub last_reattached_unix_ns: Option<u128>,
    /// Since when the interface has been missing (None while it exists).
    #[serde(default, deserialize_with = "unix_ns_from_u64")]
    pub gone_since_unix_ns: Option<u128>,
}

/// Unix nanoseconds read as a u64 (enough until 2554): [`InterfaceState`] flattens the history,
/// and serde reads flattened fields from a buffer that cannot give a u128.
fn unix_ns_from_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u128>, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.map(u128::from))
}

pub fn write_history(
    instance: &str,
    history: &BTreeMap<String, LinkHistory>,
) -> std::io::Result<()> {
    let path = crate::instance::links_file(instance);
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(history)?)?;
    fs::rename(&tmp, &path)
}

/// The history the instance's daemon wrote last (for the CLI; the daemon holds its own).
pub fn read_history(instance: &str) -> BTreeMap<String, LinkHistory> {
    fs::read_to_string(crate::instance::links_file(instance))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// One configured interface as `slb status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceState {
    pub name: String,
    /// The program runs on the device the name resolves to now.
    pub attached: bool,
    /// `attached`, or why not.
    pub state: String,
    /// The device the name resolves to now.
    pub ifindex: Option<u32>,
    #[serde(flatten)]
    pub history: LinkHistory,
}

/// The state of each of `names`, from the pins under `pin_dir` and the daemon's history.
pub fn interface_states(
    pin_dir: &Path,
    names: &[String],
    mut history: BTreeMap<String, LinkHistory>,
) -> Vec<InterfaceState> {
    names
        .iter()
        .map(|name| {
            let pin = crate::instance::link_pin(pin_dir, name);
            let current = ifindex_of(name);
            let link = link_ifindex(&pin);
            let (attached, state) = match (pin.exists(), link, current) {
                (false, _, _) => (false, "detached: no pinned link".to_string()),
                (true, _, None) => (false, "detached: interface gone".to_string()),
                (true, Some(l), Some(c)) if l == c => (true, "attached".to_string()),
                (true, Some(l), Some(c)) => (
                    false,
                    format!("detached: the link is on ifindex {l}, the interface is now {c}"),
                ),
                (true, None, Some(c)) => (
                    false,
                    format!("detached: interface was re-created (now ifindex {c})"),
                ),
            };
            InterfaceState {
                name: name.clone(),
                attached,
                state,
                ifindex: current,
                history: history.remove(name).unwrap_or_default(),
            }
        })
        .collect()
}

/// `s0, s1 (detached: interface gone), s2 (re-attached 1 time)` for the status header.
pub fn describe(states: &[InterfaceState]) -> String {
    states
        .iter()
        .map(|s| {
            let mut notes = Vec::new();
            if !s.attached {
                notes.push(s.state.clone());
            }
            if s.history.reattached > 0 {
                notes.push(format!(
                    "re-attached {} time{} after the interface was re-created",
                    s.history.reattached,
                    if s.history.reattached == 1 { "" } else { "s" }
                ));
            }
            if notes.is_empty() {
                s.name.clone()
            } else {
                format!("{} ({})", s.name, notes.join("; "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_state_reads_back_what_status_prints() {
        let state = InterfaceState {
            name: "s1".to_string(),
            attached: true,
            state: "attached".to_string(),
            ifindex: Some(7),
            history: LinkHistory {
                reattached: 1,
                last_reattached_unix_ns: Some(1_764_000_000_123_456_789),
                gone_since_unix_ns: None,
            },
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: InterfaceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
