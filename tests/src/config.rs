//! The config the tests give `slb`: slb's own config schema ([`slb_user::config::Config`] and
//! its parts), so what the tests write cannot drift from what the product reads, with
//! constructors for the topology's backends and listeners. Unset options are filled in by
//! deserializing, so they take exactly slb's defaults.

use std::net::IpAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
pub use slb_user::config::{
    AllUnhealthy, AttachMode, BackendSpec, Certificate, CheckKind, Config, CookiePersistence,
    DsrMode, Forwarding, Group, GroupKind, HealthCheck, Interface, Listener, Persistence, Protocol,
    Rule, Scheduler,
};

use crate::topology::Topology;
use crate::{Family, BACKEND_PORT, SECOND_BACKEND_PORT, VIP, VIP_TCP_PORT, VIP_UDP_PORT};

/// Name of the group [`SlbConfig::standard`] puts every backend in.
pub const POOL_GROUP: &str = "pool";
/// The group [`SlbConfig::add_second_pool`] adds.
pub const SECOND_POOL_GROUP: &str = "pool-2";
/// Name of the TCP listener (VIP:80) of [`SlbConfig::standard`].
pub const TCP_LISTENER: &str = "tcp-echo";
/// Name of the UDP listener (VIP:53) of [`SlbConfig::standard`].
pub const UDP_LISTENER: &str = "udp-echo";
/// The group of the IPv6 twins in [`SlbConfig::standard_dual_stack`]: the `pool` backends at
/// their IPv6 addresses.
pub const POOL6_GROUP: &str = "pool6";
/// Name of the TCP listener (`[VIP6]:80`) of [`SlbConfig::standard_dual_stack`].
pub const TCP6_LISTENER: &str = "tcp-echo6";
/// Name of the UDP listener (`[VIP6]:53`) of [`SlbConfig::standard_dual_stack`].
pub const UDP6_LISTENER: &str = "udp-echo6";

/// An `slb` config file: slb's [`Config`] (reach its fields through `Deref`), with the
/// tests' constructors and lookups.
#[derive(Debug, Clone, PartialEq)]
pub struct SlbConfig(pub Config);

impl Deref for SlbConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0
    }
}

impl DerefMut for SlbConfig {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.0
    }
}

/// `T` as slb reads it from `table`: the fields `table` leaves out take slb's defaults.
fn with_defaults<T: DeserializeOwned>(table: toml::Table) -> T {
    let text = table.to_string();
    toml::from_str(&text).unwrap_or_else(|e| panic!("slb does not read {text:?}: {e}"))
}

fn string(s: impl Into<String>) -> toml::Value {
    toml::Value::String(s.into())
}

/// A listener on `VIP:port` forwarding to `group` (the default group if `None`), every
/// option at slb's default (no health check, no persistence).
pub fn listener(name: &str, protocol: Protocol, port: u16, group: Option<&str>) -> Listener {
    listener_on(VIP.into(), name, protocol, port, group)
}

/// [`listener`] on `vip:port` (e.g. [`crate::VIP6`]).
pub fn listener_on(
    vip: IpAddr,
    name: &str,
    protocol: Protocol,
    port: u16,
    group: Option<&str>,
) -> Listener {
    let mut t = toml::Table::new();
    t.insert("name".into(), string(name));
    t.insert("protocol".into(), string(protocol.to_string()));
    t.insert("vip".into(), string(vip.to_string()));
    t.insert("port".into(), toml::Value::Integer(port.into()));
    if let Some(group) = group {
        t.insert("group".into(), string(group));
    }
    with_defaults(t)
}

/// An HTTP listener on `VIP:port` whose default group is `group`.
pub fn http_listener(name: &str, port: u16, group: &str) -> Listener {
    listener(name, Protocol::Http, port, Some(group))
}

/// An HTTPS listener on `VIP:port` serving `certificates` (the first is the fallback).
pub fn https_listener(
    name: &str,
    port: u16,
    group: &str,
    certificates: Vec<Certificate>,
) -> Listener {
    Listener {
        certificates,
        ..listener(name, Protocol::Https, port, Some(group))
    }
}

/// A `kind` health check with every option at slb's default.
pub fn health_check_of(kind: CheckKind) -> HealthCheck {
    let kind = match kind {
        CheckKind::Tcp => "tcp",
        CheckKind::Http => "http",
        CheckKind::Udp => "udp",
    };
    let mut t = toml::Table::new();
    t.insert("type".into(), string(kind));
    with_defaults(t)
}

/// A `kind` check probing every `interval`, each probe given `timeout`, with the given
/// healthy / unhealthy thresholds.
pub fn health_check(
    kind: CheckKind,
    interval: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
) -> HealthCheck {
    HealthCheck {
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
        ..health_check_of(kind)
    }
}

/// Backend `i` of the topology (10.200.(10+i).2:8080) with `weight`.
pub fn backend(i: usize, weight: u32) -> BackendSpec {
    backend_in(Family::V4, i, weight)
}

/// Backend `i` of the topology at its `family` address, port 8080, with `weight`.
pub fn backend_in(family: Family, i: usize, weight: u32) -> BackendSpec {
    BackendSpec {
        address: family.backend_addr(i),
        port: Some(BACKEND_PORT),
        weight,
        max_connections: None,
    }
}

/// A group of kind `kind` (`vserver` or `active-standby`) of `backends`, every other option at
/// slb's default.
pub fn group(name: &str, kind: GroupKind, backends: Vec<BackendSpec>) -> Group {
    let mut t = toml::Table::new();
    t.insert("name".into(), string(name));
    t.insert(
        "type".into(),
        toml::Value::try_from(kind).expect("a group kind is a TOML string"),
    );
    Group {
        backends,
        ..with_defaults(t)
    }
}

/// A forwarding rule for an exact or `*.` wildcard domain.
pub fn domain_rule(domain: &str, group: &str) -> Rule {
    Rule {
        domain: Some(domain.to_owned()),
        path: None,
        group: group.to_owned(),
    }
}

/// A forwarding rule for a path prefix.
pub fn path_rule(path: &str, group: &str) -> Rule {
    Rule {
        domain: None,
        path: Some(path.to_owned()),
        group: group.to_owned(),
    }
}

impl SlbConfig {
    /// XDP on `s0..sN` for a topology with `backends` backends, no listeners, no groups.
    pub fn new(instance: &str, backends: usize) -> Self {
        let mut t = toml::Table::new();
        t.insert("instance".into(), string(instance));
        let interfaces = (0..=backends)
            .map(|i| {
                let mut iface = toml::Table::new();
                iface.insert("name".into(), string(format!("s{i}")));
                toml::Value::Table(iface)
            })
            .collect();
        t.insert("interfaces".into(), toml::Value::Array(interfaces));
        SlbConfig(with_defaults(t))
    }

    /// The config the L4 tests use: XDP on `s0..sN` (N = `weights.len()`), a TCP listener on
    /// VIP:80 and a UDP listener on VIP:53, both served by group `pool`, in which backend `i`
    /// (1-based) is 10.200.(10+i).2:8080 with weight `weights[i - 1]`.
    pub fn standard(instance: &str, weights: &[u32]) -> Self {
        Self::standard_in(Family::V4, instance, weights)
    }

    /// [`standard`](Self::standard) over IPv6: the listeners on [`crate::VIP6`], backend `i`
    /// at fd00:200:(10+i)::2:8080.
    pub fn standard_v6(instance: &str, weights: &[u32]) -> Self {
        Self::standard_in(Family::V6, instance, weights)
    }

    /// [`standard`](Self::standard) with the VIP and the backends of `family`.
    pub fn standard_in(family: Family, instance: &str, weights: &[u32]) -> Self {
        let mut config = SlbConfig::new(instance, weights.len());
        config.standard_listeners(family, POOL_GROUP, [TCP_LISTENER, UDP_LISTENER], weights);
        config
    }

    /// [`standard`](Self::standard) and its IPv6 twins: listeners `tcp-echo6` and `udp-echo6`
    /// on the same ports of [`crate::VIP6`], over group `pool6`, the same backends (at their
    /// IPv6 addresses) with the same weights.
    pub fn standard_dual_stack(instance: &str, weights: &[u32]) -> Self {
        let mut config = Self::standard(instance, weights);
        config.standard_listeners(
            Family::V6,
            POOL6_GROUP,
            [TCP6_LISTENER, UDP6_LISTENER],
            weights,
        );
        config
    }

    /// Adds group `group` of backends `1..=weights.len()` at their `family` addresses with
    /// `weights`, and over it listeners `tcp` (TCP, port 80) and `udp` (UDP, port 53) on the
    /// `family` VIP.
    fn standard_listeners(
        &mut self,
        family: Family,
        group: &str,
        [tcp, udp]: [&str; 2],
        weights: &[u32],
    ) -> &mut Self {
        let pool = weights
            .iter()
            .enumerate()
            .map(|(k, &weight)| (k + 1, weight))
            .collect::<Vec<_>>();
        self.group_in(family, group, &pool);
        for (name, protocol, port) in [
            (tcp, Protocol::Tcp, VIP_TCP_PORT),
            (udp, Protocol::Udp, VIP_UDP_PORT),
        ] {
            self.listener(listener_on(family.vip(), name, protocol, port, Some(group)));
        }
        self
    }

    /// The instance the config names.
    pub fn instance(&self) -> &str {
        self.0.instance.as_str()
    }

    /// Adds group `name` of topology backends `(index, weight)` on port 8080.
    pub fn group(&mut self, name: &str, backends: &[(usize, u32)]) -> &mut Self {
        self.group_in(Family::V4, name, backends)
    }

    /// [`group`](Self::group) with the backends' `family` addresses.
    pub fn group_in(&mut self, family: Family, name: &str, backends: &[(usize, u32)]) -> &mut Self {
        let backends = backends
            .iter()
            .map(|&(i, w)| backend_in(family, i, w))
            .collect();
        self.0
            .groups
            .push(group(name, GroupKind::Vserver, backends));
        self
    }

    pub fn listener(&mut self, listener: Listener) -> &mut Self {
        self.0.listeners.push(listener);
        self
    }

    /// Where HTTP(S) listeners log their requests.
    pub fn access_log(&mut self, path: PathBuf) -> &mut Self {
        self.0.access_log = Some(path);
        self
    }

    /// The listener named `name`; panics if there is none.
    pub fn listener_mut(&mut self, name: &str) -> &mut Listener {
        self.0
            .listeners
            .iter_mut()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no listener {name:?} in the config"))
    }

    /// The group named `name`; panics if there is none.
    pub fn group_mut(&mut self, name: &str) -> &mut Group {
        self.0
            .groups
            .iter_mut()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("no group {name:?} in the config"))
    }

    /// Adds group `pool-2`: the `pool` backends with the same weights on the test servers'
    /// second port, for a second tcp listener over the same servers (each backend endpoint
    /// belongs to one tcp/udp listener). Returns its name.
    pub fn add_second_pool(&mut self) -> &'static str {
        let mut second = self.group_mut(POOL_GROUP).clone();
        second.name = SECOND_POOL_GROUP.to_owned();
        for b in &mut second.backends {
            b.port = Some(SECOND_BACKEND_PORT);
        }
        self.0.groups.push(second);
        SECOND_POOL_GROUP
    }

    /// `(backend name, weight)` for every backend of the `pool` group, as
    /// [`crate::Distribution::new`] wants them.
    pub fn pool_weights(&self) -> Vec<(String, u32)> {
        self.group_weights(POOL_GROUP)
    }

    /// `(backend name, weight)` of group `name`, as [`crate::Distribution::new`] wants them.
    pub fn group_weights(&self, name: &str) -> Vec<(String, u32)> {
        let group = self
            .0
            .groups
            .iter()
            .find(|g| g.name == name)
            .unwrap_or_else(|| panic!("no group {name:?} in the config"));
        group
            .backends
            .iter()
            .map(|b| (Topology::backend_name(backend_index(b.address)), b.weight))
            .collect()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(&self.0).expect("slb's config always serializes to TOML")
    }

    /// The config as a TOML document tree, to write values the typed fields cannot hold
    /// (e.g. a negative weight) before rendering it with `toml::to_string`.
    pub fn to_toml_value(&self) -> toml::Value {
        toml::Value::try_from(&self.0).expect("slb's config always serializes to TOML")
    }
}

/// Which topology backend (`i` of 10.200.(10+i).2 or fd00:200:(10+i)::2) `address` is.
fn backend_index(address: IpAddr) -> usize {
    (1..=crate::topology::MAX_BACKENDS)
        .find(|&i| Family::of(address).backend_addr(i) == address)
        .unwrap_or_else(|| panic!("{address} is not a backend of the topology"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_config_reads_back_as_written() {
        let mut config = SlbConfig::standard("t", &[1, 2, 3]);
        config.add_second_pool();
        config.listener_mut(TCP_LISTENER).health_check = Some(health_check(
            CheckKind::Tcp,
            Duration::from_millis(200),
            Duration::from_millis(100),
            2,
            3,
        ));
        config.listener(http_listener("web", 8000, POOL_GROUP));
        let back: Config = toml::from_str(&config.to_toml()).expect("slb reads the config");
        assert_eq!(back, config.0);
        assert_eq!(
            config.pool_weights(),
            [
                ("b1".to_owned(), 1),
                ("b2".to_owned(), 2),
                ("b3".to_owned(), 3)
            ]
        );
    }

    #[test]
    fn dual_stack_config_is_standard_and_its_ipv6_twins() {
        let config = SlbConfig::standard_dual_stack("t", &[1, 2]);
        let back: Config = toml::from_str(&config.to_toml()).expect("slb reads the config");
        assert_eq!(back, config.0);
        let v4 = SlbConfig::standard("t", &[1, 2]);
        let v6 = SlbConfig::standard_v6("t", &[1, 2]);
        assert_eq!(config.groups[0], v4.groups[0]);
        assert_eq!(
            config.groups[1],
            Group {
                name: POOL6_GROUP.to_owned(),
                ..v6.groups[0].clone()
            }
        );
        let twins = v6
            .listeners
            .iter()
            .zip([TCP6_LISTENER, UDP6_LISTENER])
            .map(|(l, name)| Listener {
                name: name.to_owned(),
                group: Some(POOL6_GROUP.to_owned()),
                ..l.clone()
            });
        let expected: Vec<Listener> = v4.listeners.iter().cloned().chain(twins).collect();
        assert_eq!(config.listeners, expected);
        assert_eq!(config.group_weights(POOL6_GROUP), config.pool_weights());
    }

    #[test]
    fn standard_v6_config_names_ipv6_vip_and_backends() {
        let config = SlbConfig::standard_v6("t", &[1, 2]);
        let back: Config = toml::from_str(&config.to_toml()).expect("slb reads the config");
        assert_eq!(back, config.0);
        assert!(config
            .listeners
            .iter()
            .all(|l| l.vip == IpAddr::V6(crate::VIP6)));
        let addresses: Vec<String> = config.groups[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(addresses, ["fd00:200:11::2", "fd00:200:12::2"]);
        assert_eq!(
            config.pool_weights(),
            [("b1".to_owned(), 1), ("b2".to_owned(), 2)]
        );
    }
}
