//! What a running daemon has applied: the contract between the daemon, which publishes it in the
//! instance's state file, and `slb status`, `slb report`, the metrics and the next run, which
//! read it. The reconciler keeps the part that names what the maps hold ([`AppliedMaps`]); the
//! daemon owns the rest and copies that part in when it publishes.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::config::Endpoint;
use crate::config::{GroupKind, Listener, Protocol, ResolvedBackend};
use crate::instance::state_file;

/// A backend of a listener, on its effective port. Health, counters and ids are per listener,
/// so two listeners sharing a group can check and count their backends independently.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendKey {
    pub listener: String,
    pub address: IpAddr,
    pub port: u16,
}

impl BackendKey {
    /// The key of `backend` as it serves `listener`.
    pub fn of(listener: &Listener, backend: &ResolvedBackend) -> BackendKey {
        BackendKey {
            listener: listener.name.clone(),
            address: backend.address,
            port: backend.port,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.address, self.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Active,
    Standby,
}

/// A health check's verdict on a backend, as `slb status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthStatus {
    pub healthy: bool,
    pub reason: String,
    /// Unix time in nanoseconds of the last change (or of the start of checking).
    pub since_unix_ns: u128,
    /// The checks have given a verdict (the first ones confirm "healthy until proven
    /// otherwise"); a state file from before this field had only verdicts.
    #[serde(default = "verdicts_were_confirmed")]
    pub confirmed: bool,
    /// While a backend that became healthy ramps up (its group's `slow_start`): the share of
    /// its weight its listeners' rings give it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_percent: Option<u32>,
}

fn verdicts_were_confirmed() -> bool {
    true
}

/// Runtime changes listed in the state and `slb status`: a script that makes thousands must not
/// grow them without bound; the log has every one.
pub const RUNTIME_CHANGES_LISTED: usize = 50;

/// `listed` (after `earlier` unlisted ones) with `change` added: the latest
/// [`RUNTIME_CHANGES_LISTED`] and the new count of earlier ones.
pub fn add_runtime_change(
    mut listed: Vec<String>,
    earlier: u64,
    change: String,
) -> (Vec<String>, u64) {
    listed.push(change);
    let over = listed.len().saturating_sub(RUNTIME_CHANGES_LISTED);
    listed.drain(..over);
    (listed, earlier + over as u64)
}

/// What `slb status` needs to name what the maps hold; written to the state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    /// Incremented by every applied config change (file reload or API), not by health changes.
    pub generation: u64,
    pub instance: String,
    pub ring_size: u32,
    pub interfaces: Vec<String>,
    /// Changes made through the admin API since the file was last read: the latest
    /// [`RUNTIME_CHANGES_LISTED`], and how many came before them.
    #[serde(default)]
    pub runtime_changes: Vec<String>,
    #[serde(default)]
    pub runtime_changes_earlier: u64,
    // Not one flattened `AppliedMaps`: serde buffers flattened fields in a form without u128,
    // and health verdicts carry u128 times.
    pub listeners: Vec<AppliedListener>,
    pub backends: Vec<AppliedBackend>,
    /// HTTP(S) listeners, served by the proxy (not in the maps).
    #[serde(default)]
    pub proxy_listeners: Vec<ProxyListenerInfo>,
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// Backends being drained (`slb backend drain`), and how the last ones ended.
    #[serde(default)]
    pub drains: Vec<Drain>,
}

/// A backend drained with a deadline: weight 0 until its connections are gone or the deadline
/// passes, then removed or left at weight 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub group: String,
    /// The backend as named (its address, and its port when it has one).
    pub backend: crate::config::BackendName,
    /// The listeners' backends it is: whose connections it waits for.
    pub keys: Vec<BackendKey>,
    pub deadline_unix_ns: u128,
    /// Remove it from the group when drained (or at the deadline, cutting what is left).
    pub remove: bool,
    pub phase: DrainPhase,
    /// Its established connections at the last look.
    pub left: u64,
    /// The sweep (Unix seconds) after which `left` was first seen at 0. Between sweeps the
    /// count adds what opened and closed since the last one, and a flow that closed while a
    /// sweep walked the table can be missed once: the drain ends only when a later sweep still
    /// finds none, so it never removes a backend with a connection left.
    #[serde(default)]
    pub zero_since_sweep: Option<u64>,
    /// Why it ended otherwise than planned (a failed removal, another change).
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainPhase {
    Draining,
    /// No connection left; still in the group at weight 0.
    Drained,
    /// No connection left, and removed from the group.
    Removed,
    /// The deadline passed with `left` connections; still at weight 0.
    TimedOut,
    /// The deadline passed with `left` connections, which the removal ended.
    RemovedAtDeadline,
    /// The removal was refused (see the note); the backend is still in the group at weight 0.
    RemoveFailed,
    /// Another change to the backend (a reweight, a removal) ended the drain (see the note).
    Ended,
}

/// Finished drains `slb status` keeps listing (the latest ones).
pub const FINISHED_DRAINS_LISTED: usize = 20;

impl Drain {
    pub fn describe(&self) -> String {
        format!("{} in group {}", self.backend, self.group)
    }

    pub fn finished(&self) -> bool {
        self.phase != DrainPhase::Draining
    }

    /// Whether this is the drain of `backend` in `group`.
    pub fn is_of(&self, group: &str, backend: &crate::config::BackendName) -> bool {
        self.group == group && self.backend == *backend
    }
}

/// The TCP/UDP listeners and backends the reconciler wrote into the maps, with the ids, slots
/// and rings it gave them: what a restarted daemon adopts so pinned connections keep their
/// meaning.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedMaps {
    pub listeners: Vec<AppliedListener>,
    pub backends: Vec<AppliedBackend>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyListenerInfo {
    pub name: String,
    pub protocol: Protocol,
    pub vip: IpAddr,
    pub port: u16,
    pub cookie_persistence: bool,
    pub backends: Vec<ProxyBackendInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyBackendInfo {
    pub group: String,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub health: Option<HealthStatus>,
}

impl ProxyBackendInfo {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.address, self.port)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedListener {
    pub name: String,
    pub protocol: Protocol,
    pub vip: IpAddr,
    pub port: u16,
    pub group: String,
    pub group_kind: GroupKind,
    pub index: u32,
    /// Which of the listener's two rings is live.
    pub ring: u32,
    /// The ring's input: backend ids with the weights the ring was built from.
    pub ring_input: Vec<(u32, u32)>,
    pub flags: u32,
    pub persistence_timeout_s: Option<u32>,
    /// How long a silent flow stays in the connection table.
    #[serde(default)]
    pub idle_timeout_s: u32,
    pub health_check: bool,
    /// A full NAT listener's SNAT addresses and ports, as its flows' mappings were made with.
    #[serde(default)]
    pub snat: Option<AppliedSnat>,
    /// Its access list, as the data plane holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<AppliedAcl>,
    /// `max_new_connections_per_second` and the burst, as NEW_FLOW_LIMITS holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<AppliedNewFlowLimit>,
}

/// A listener's access list in the ACL map: which of its two sets is live, and a digest of
/// the prefixes written there (the state file does not repeat thousands of prefixes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedAcl {
    pub mode: crate::config::AclMode,
    pub established: crate::config::AclEstablished,
    pub set: u32,
    pub prefixes: usize,
    pub digest: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedNewFlowLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// What a full NAT listener's flows find their mappings by: changed under them, their packets
/// would look for their mappings elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSnat {
    pub addresses: Vec<IpAddr>,
    pub first_port: u16,
    pub last_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedBackend {
    pub id: u32,
    #[serde(flatten)]
    pub key: BackendKey,
    pub group: String,
    pub weight: u32,
    /// TCP/UDP: open connections past which it takes no new flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    pub role: Option<Role>,
    /// `None` when the listener has no health check (or, for a standby, it is never probed).
    pub health: Option<HealthStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("instance {instance:?} is not running here (no {})", path.display())]
    NotRunning {
        instance: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("parsing {}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl AppliedState {
    /// The part the reconciler adopts after a restart.
    pub fn maps(&self) -> AppliedMaps {
        AppliedMaps {
            listeners: self.listeners.clone(),
            backends: self.backends.clone(),
        }
    }

    /// Takes the listeners and backends the maps hold now.
    pub fn set_maps(&mut self, maps: &AppliedMaps) {
        self.listeners.clone_from(&maps.listeners);
        self.backends.clone_from(&maps.backends);
    }

    /// The state the instance's daemon published last.
    pub fn read(instance: &str) -> Result<AppliedState, StateFileError> {
        let path = state_file(instance);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => {
                return Err(StateFileError::NotRunning {
                    instance: instance.into(),
                    path,
                    source,
                })
            }
        };
        serde_json::from_str(&text).map_err(|source| StateFileError::Parse { path, source })
    }

    /// Publishes the state in the instance's state file, whole: readers never see half of it.
    pub fn write(&self) -> Result<(), StateFileError> {
        let path = state_file(&self.instance);
        let tmp = path.with_extension("json.tmp");
        let written = (|| {
            std::fs::create_dir_all(path.parent().expect("state file has a directory"))?;
            std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
            std::fs::rename(&tmp, &path)
        })();
        written.map_err(|source| StateFileError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runtime_changes_keep_the_latest_and_count_the_rest() {
        let (mut listed, mut earlier) = (Vec::new(), 0);
        for i in 0..10_000 {
            (listed, earlier) = super::add_runtime_change(listed, earlier, format!("change {i}"));
        }
        assert_eq!(listed.len(), super::RUNTIME_CHANGES_LISTED);
        assert_eq!(earlier, 10_000 - super::RUNTIME_CHANGES_LISTED as u64);
        assert_eq!(listed.last().map(String::as_str), Some("change 9999"));
        assert_eq!(listed[0], format!("change {earlier}"));
    }

    use super::*;

    #[test]
    fn the_state_file_reads_back_as_written() {
        let state = AppliedState {
            generation: 3,
            instance: "web".into(),
            backends: vec![AppliedBackend {
                id: 7,
                key: BackendKey {
                    listener: "dns".into(),
                    address: "10.0.1.2".parse().unwrap(),
                    port: 53,
                },
                group: "default".into(),
                weight: 1,
                max_connections: None,
                role: None,
                health: Some(HealthStatus {
                    healthy: false,
                    reason: "connection refused".into(),
                    since_unix_ns: 1_764_000_000_000_000_000,
                    confirmed: true,
                    slow_start_percent: None,
                }),
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["generation"], 3);
        assert_eq!(json["listeners"], serde_json::json!([]));
        assert_eq!(json["backends"][0]["id"], 7);
        assert_eq!(json["backends"][0]["address"], "10.0.1.2");
        let back: AppliedState = serde_json::from_value(json).unwrap();
        assert_eq!(back.backends[0].key, state.backends[0].key);
        assert_eq!(back.backends[0].health, state.backends[0].health);
    }
}
