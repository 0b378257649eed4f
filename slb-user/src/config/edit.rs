//! Changes to a running config's backends (the admin API's backend commands): each is applied to
//! a copy and the result is validated as a whole, so a refused change leaves nothing behind.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use super::{BackendSpec, Config, ConfigError, DEFAULT_GROUP};

/// One change to one backend of a group. Without a port, the backend is the one that serves on
/// its listeners' ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendEdit {
    pub group: String,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub action: EditAction,
}

impl BackendEdit {
    /// The backend the edit names, as the group lists it.
    pub fn backend(&self) -> BackendName {
        BackendName {
            address: self.address,
            port: self.port,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditAction {
    Add {
        weight: u32,
        /// TCP/UDP: its `max_connections` (none: no limit).
        max_connections: Option<u32>,
    },
    Remove,
    SetWeight {
        weight: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("group: no group named {group:?} (groups: {DEFAULT_GROUP}, {known})")]
    NoGroup { group: String, known: String },
    #[error("backend {backend} is already in group {group}")]
    AlreadyInGroup { backend: BackendName, group: String },
    #[error("backend {backend} is not in group {group}")]
    NotInGroup { backend: BackendName, group: String },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// A backend as a group lists it: `address:port` (`[2001:db8::1]:80` for IPv6, as `SocketAddr`
/// prints it), or the address alone when it has no port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendName {
    pub address: IpAddr,
    pub port: Option<u16>,
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}", SocketAddr::new(self.address, port)),
            None => write!(f, "{}", self.address),
        }
    }
}

/// Why a backend argument (the CLI's `--address`, the admin API's `address`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointSyntaxError {
    #[error(
        "{0:?} is not an address or address:port (write 10.0.0.1, 10.0.0.1:8080, 2001:db8::1, \
         [2001:db8::1] or [2001:db8::1]:8080)"
    )]
    Malformed(String),
    #[error(
        "the port is given twice, in the address {endpoint} and as the port {port}; give it once"
    )]
    PortTwice { endpoint: BackendName, port: u16 },
}

/// The one parser of a backend as a user names it: `A`, `[A]` (IPv6), `A:P` (IPv4) or `[A]:P`.
/// A bare IPv6 address takes no port: in `2001:db8::1:80` the `:80` is part of the address.
impl FromStr for BackendName {
    type Err = EndpointSyntaxError;

    fn from_str(text: &str) -> Result<BackendName, EndpointSyntaxError> {
        if let Ok(address) = text.parse::<IpAddr>() {
            return Ok(BackendName {
                address,
                port: None,
            });
        }
        if let Ok(socket) = text.parse::<SocketAddr>() {
            return Ok(BackendName {
                address: socket.ip(),
                port: Some(socket.port()),
            });
        }
        let bracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
        if let Some(Ok(v6)) = bracketed.map(str::parse::<Ipv6Addr>) {
            return Ok(BackendName {
                address: IpAddr::V6(v6),
                port: None,
            });
        }
        Err(EndpointSyntaxError::Malformed(text.to_string()))
    }
}

impl<'de> serde::Deserialize<'de> for BackendName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for BackendName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl BackendName {
    /// The backend named by an address argument that may carry a port and a port argument:
    /// at most one of them may give the port.
    pub fn with_port(self, port: Option<u16>) -> Result<BackendName, EndpointSyntaxError> {
        match (self.port, port) {
            (Some(_), Some(port)) => Err(EndpointSyntaxError::PortTwice {
                endpoint: self,
                port,
            }),
            (Some(_), None) => Ok(self),
            (None, port) => Ok(BackendName { port, ..self }),
        }
    }
}

impl Config {
    /// The config with `edit` applied, and a description of the change.
    pub fn edit_backend(&self, edit: &BackendEdit) -> Result<(Config, String), EditError> {
        let mut next = self.clone();
        let group = &edit.group;
        let backends = if group == DEFAULT_GROUP {
            &mut next.default_group.backends
        } else {
            let known: Vec<String> = next.groups.iter().map(|g| g.name.clone()).collect();
            &mut next
                .groups
                .iter_mut()
                .find(|g| &g.name == group)
                .ok_or_else(|| EditError::NoGroup {
                    group: group.clone(),
                    known: known.join(", "),
                })?
                .backends
        };
        let position = backends
            .iter()
            .position(|b| b.address == edit.address && b.port == edit.port);
        let backend = BackendName {
            address: edit.address,
            port: edit.port,
        };
        let description = match (edit.action, position) {
            (
                EditAction::Add {
                    weight,
                    max_connections,
                },
                None,
            ) => {
                backends.push(BackendSpec {
                    address: edit.address,
                    port: edit.port,
                    weight,
                    max_connections,
                });
                let limit = max_connections
                    .map(|max| format!(" and max_connections {max}"))
                    .unwrap_or_default();
                format!("added backend {backend} with weight {weight}{limit} to group {group}")
            }
            (EditAction::Add { .. }, Some(_)) => {
                return Err(EditError::AlreadyInGroup {
                    backend,
                    group: group.clone(),
                })
            }
            (EditAction::Remove, Some(i)) => {
                backends.remove(i);
                format!("removed backend {backend} from group {group}")
            }
            (EditAction::SetWeight { weight }, Some(i)) => {
                let old = backends[i].weight;
                backends[i].weight = weight;
                format!("set weight of backend {backend} in group {group} from {old} to {weight}")
            }
            (EditAction::Remove | EditAction::SetWeight { .. }, None) => {
                return Err(EditError::NotInGroup {
                    backend,
                    group: group.clone(),
                })
            }
        };
        next.validate()?;
        Ok((next, description))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::GOOD;

    /// GOOD with an active-standby pair, which takes no third server.
    fn config() -> Config {
        let pair = "[[groups]]\nname = \"db\"\ntype = \"active-standby\"\n\
                    backends = [{ address = \"10.0.2.2\", port = 5432 }, { address = \"10.0.2.3\", port = 5432 }]\n";
        Config::parse(&format!("{GOOD}{pair}"), "api.toml").unwrap()
    }

    fn edit(group: &str, address: &str, port: Option<u16>, action: EditAction) -> BackendEdit {
        BackendEdit {
            group: group.into(),
            address: address.parse().unwrap(),
            port,
            action,
        }
    }

    #[test]
    fn backend_names_bracket_ipv6_addresses_that_have_a_port() {
        let name = |address: &str, port| {
            BackendName {
                address: address.parse().unwrap(),
                port,
            }
            .to_string()
        };
        assert_eq!(name("10.0.1.2", Some(8080)), "10.0.1.2:8080");
        assert_eq!(name("10.0.1.2", None), "10.0.1.2");
        assert_eq!(name("2001:db8::1", Some(80)), "[2001:db8::1]:80");
        assert_eq!(name("2001:db8::1", None), "2001:db8::1");
    }

    #[test]
    fn backends_are_named_with_or_without_a_port_in_both_families() {
        let parsed = |text: &str| text.parse::<BackendName>().map(|b| (b.address, b.port));
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(parsed("10.0.1.2"), Ok((ip("10.0.1.2"), None)));
        assert_eq!(parsed("10.0.1.2:8080"), Ok((ip("10.0.1.2"), Some(8080))));
        assert_eq!(parsed("2001:db8::1"), Ok((ip("2001:db8::1"), None)));
        assert_eq!(parsed("[2001:db8::1]"), Ok((ip("2001:db8::1"), None)));
        assert_eq!(
            parsed("[2001:db8::1]:80"),
            Ok((ip("2001:db8::1"), Some(80)))
        );
        assert_eq!(parsed("2001:db8::1:80"), Ok((ip("2001:db8::1:80"), None)));
        for bad in [
            "",
            "[10.0.1.2]",
            "[10.0.1.2]:80",
            "10.0.1.2:",
            "10.0.1.2:65536",
            "[2001:db8::1]:",
            "[2001:db8::1",
            "2001:db8::1]",
            "backend.example",
            " 10.0.1.2",
        ] {
            let e = parsed(bad).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "{bad:?} is not an address or address:port (write 10.0.0.1, 10.0.0.1:8080, \
                     2001:db8::1, [2001:db8::1] or [2001:db8::1]:8080)"
                )
            );
        }
        for text in [
            "10.0.1.2",
            "10.0.1.2:8080",
            "2001:db8::1",
            "[2001:db8::1]:80",
        ] {
            assert_eq!(text.parse::<BackendName>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn a_port_comes_from_the_address_or_the_port_argument_not_both() {
        let name = |text: &str| text.parse::<BackendName>().unwrap();
        assert_eq!(
            name("[2001:db8::1]:80").with_port(None),
            Ok(name("[2001:db8::1]:80"))
        );
        assert_eq!(
            name("2001:db8::1").with_port(Some(80)),
            Ok(name("[2001:db8::1]:80"))
        );
        assert_eq!(name("10.0.1.2").with_port(None), Ok(name("10.0.1.2")));
        assert_eq!(
            name("[2001:db8::1]:80")
                .with_port(Some(8080))
                .unwrap_err()
                .to_string(),
            "the port is given twice, in the address [2001:db8::1]:80 and as the port 8080; give it once"
        );
    }

    #[test]
    fn add_set_weight_and_remove_edit_the_named_group() {
        let c = config();
        let add = edit(
            "pool",
            "10.0.1.4",
            Some(8080),
            EditAction::Add {
                weight: 3,
                max_connections: None,
            },
        );
        let (c, what) = c.edit_backend(&add).unwrap();
        assert_eq!(
            what,
            "added backend 10.0.1.4:8080 with weight 3 to group pool"
        );
        assert_eq!(c.groups[0].backends.len(), 3);
        let set = edit(
            "pool",
            "10.0.1.2",
            Some(8080),
            EditAction::SetWeight { weight: 0 },
        );
        let (c, what) = c.edit_backend(&set).unwrap();
        assert_eq!(
            what,
            "set weight of backend 10.0.1.2:8080 in group pool from 2 to 0"
        );
        assert_eq!(c.groups[0].backends[0].weight, 0);
        let remove = edit("pool", "10.0.1.4", Some(8080), EditAction::Remove);
        let (c, what) = c.edit_backend(&remove).unwrap();
        assert_eq!(what, "removed backend 10.0.1.4:8080 from group pool");
        assert_eq!(c.groups[0].backends.len(), 2);
    }

    #[test]
    fn bad_edits_are_refused_with_the_reason() {
        let c = config();
        let refusal = |e: BackendEdit| c.edit_backend(&e).unwrap_err().to_string();
        let e = refusal(edit(
            "nope",
            "10.0.1.3",
            None,
            EditAction::Add {
                weight: 1,
                max_connections: None,
            },
        ));
        assert_eq!(
            e,
            "group: no group named \"nope\" (groups: default, pool, db)"
        );
        let e = refusal(edit("pool", "10.9.9.9", Some(1), EditAction::Remove));
        assert_eq!(e, "backend 10.9.9.9:1 is not in group pool");
        let e = refusal(edit(
            "pool",
            "10.0.1.2",
            Some(8080),
            EditAction::Add {
                weight: 1,
                max_connections: None,
            },
        ));
        assert_eq!(e, "backend 10.0.1.2:8080 is already in group pool");
        let e = refusal(edit(
            "db",
            "10.0.2.4",
            Some(5432),
            EditAction::Add {
                weight: 1,
                max_connections: None,
            },
        ));
        assert!(e.contains("exactly two servers"), "{e}");
        let e = refusal(edit(
            "pool",
            "10.0.1.2",
            Some(8080),
            EditAction::SetWeight { weight: 100_000 },
        ));
        assert!(e.contains("weight") && e.contains("100000"), "{e}");
    }

    #[test]
    fn a_runtime_edit_keeps_to_the_listeners_address_family() {
        let c = config();
        let e = c
            .edit_backend(&edit(
                "pool",
                "2001:db8::2",
                Some(8080),
                EditAction::Add {
                    weight: 1,
                    max_connections: None,
                },
            ))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "listeners[0] (web): backend [2001:db8::2]:8080 of group \"pool\" is IPv6 but the \
             listener's VIP 10.0.0.10 is IPv4 (tcp/udp listeners rewrite addresses, not address families)"
        );
    }
}
