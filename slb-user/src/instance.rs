//! Instance names. A name becomes a path component under /sys/fs/bpf/slb and /run/slb, so an
//! unchecked one (`""`, `..`, `a/../b`) would let `slb stop` remove pins and state that belong
//! to other instances or to nothing of slb's at all. Every name from the command line or a config
//! file is parsed into [`InstanceName`], which only holds names that are safe as one component.
//!
//! This module also owns every place an instance keeps things, so no other module joins a path
//! under /run/slb or /sys/fs/bpf/slb by hand.

use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where each instance keeps its state directory.
pub const STATE_ROOT: &str = "/run/slb";
/// Where each instance pins its maps, program and links (on the bpf filesystem).
pub const PIN_ROOT: &str = "/sys/fs/bpf/slb";

/// `/run/slb/<instance>`: the state, lock, socket, flows, links and history files. The daemon
/// removes it on its way out.
pub fn state_dir(instance: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(instance)
}

/// The applied state the daemon publishes for `slb status` and `slb report`, and adopts after a
/// restart.
pub fn state_file(instance: &str) -> PathBuf {
    state_dir(instance).join("state.json")
}

/// The file whose flock marks the instance's daemon; it holds that daemon's pid.
pub fn lock_file(instance: &str) -> PathBuf {
    state_dir(instance).join("daemon.lock")
}

/// The admin API's unix socket.
pub fn socket_path(instance: &str) -> PathBuf {
    state_dir(instance).join("admin.sock")
}

/// The 10-second samples of new-connection counters for `slb report --since`.
pub fn history_file(instance: &str) -> PathBuf {
    state_dir(instance).join("history.jsonl")
}

/// What the daemon did about each interface's link (re-attachments, disappearances).
pub fn links_file(instance: &str) -> PathBuf {
    state_dir(instance).join("links.json")
}

/// The connection-table sweeper's last counts.
pub fn flows_file(instance: &str) -> PathBuf {
    state_dir(instance).join("flows.json")
}

/// Where instances write their BIRD include files by default (`include
/// "/run/slb/.bird/*.conf";` in BIRD's config takes them all): under the state root, so the
/// systemd unit's sandbox lets slb write there, but by a name no instance can have.
pub const ANNOUNCE_DIR: &str = "/run/slb/.bird";

/// `/run/slb/.bird/<instance>.conf`: the instance's BIRD include file unless its config names
/// another.
pub fn default_include_file(instance: &str) -> PathBuf {
    Path::new(ANNOUNCE_DIR).join(format!("{instance}.conf"))
}

/// The announcer's last word: what it asked BIRD to announce, and how BIRD took it.
pub fn announce_file(instance: &str) -> PathBuf {
    state_dir(instance).join("announce.json")
}

/// The HTTP(S) proxy's counters, as the daemon last wrote them.
pub fn proxy_counters_file(instance: &str) -> PathBuf {
    state_dir(instance).join("proxy_counters.json")
}

/// `/sys/fs/bpf/slb/<instance>`: the pinned maps (by name), the program and the links.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// The directory of a pin directory that holds one pinned link per interface.
pub const LINKS_DIR: &str = "links";

/// The pinned link of `iface` under `pin_dir` (an instance's, or a test bed's own).
pub fn link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(LINKS_DIR).join(iface)
}

/// Longest instance name.
pub const MAX_INSTANCE_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "instance name {0:?} is invalid: use 1-{MAX_INSTANCE_LEN} characters of letters, digits, '-' or '_'"
)]
pub struct InvalidInstanceName(pub String);

/// A validated instance name: `[A-Za-z0-9_-]{1,64}`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceName(String);

impl InstanceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InstanceName {
    type Err = InvalidInstanceName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= MAX_INSTANCE_LEN
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if valid {
            Ok(InstanceName(s.to_owned()))
        } else {
            Err(InvalidInstanceName(s.to_owned()))
        }
    }
}

impl TryFrom<String> for InstanceName {
    type Error = InvalidInstanceName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<InstanceName> for String {
    fn from(name: InstanceName) -> String {
        name.0
    }
}

impl Deref for InstanceName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for InstanceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<Path> for InstanceName {
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for InstanceName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for InstanceName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in [
            "default",
            "web",
            "a",
            "A-b_9",
            &"x".repeat(MAX_INSTANCE_LEN),
        ] {
            let parsed: InstanceName = name.parse().unwrap();
            assert_eq!(parsed.as_str(), name);
        }
    }

    #[test]
    fn refuses_names_that_are_not_one_safe_path_component() {
        let too_long = "x".repeat(MAX_INSTANCE_LEN + 1);
        for name in [
            "", ".", "..", "a/../b", "a/b", "/", "/etc", "a b", "a\0b", "é", "a.b", &too_long,
        ] {
            let err = name.parse::<InstanceName>().unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(&format!("{name:?}")) && message.contains("letters, digits"),
                "{message}"
            );
        }
    }

    #[test]
    fn serde_goes_through_the_same_check() {
        #[derive(serde::Deserialize)]
        struct T {
            #[allow(dead_code)]
            instance: InstanceName,
        }
        let err = toml::from_str::<T>("instance = \"..\"")
            .err()
            .expect("\"..\" must be refused")
            .to_string();
        assert!(err.contains("instance name \"..\" is invalid"), "{err}");
        let ok: T = toml::from_str("instance = \"web-1\"").unwrap();
        assert_eq!(ok.instance, "web-1");
    }
}
