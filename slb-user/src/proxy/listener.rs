//! What the requests of one HTTP(S) listener use, built from the config at each apply.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::rustls::ServerConfig;

use super::balance::{Backend, BackendGroup};
use super::cookies::CookieKey;
use super::limits::BackendCap;
use super::route::Router;
use super::tls;
use crate::applied::{BackendKey, HealthStatus};
use crate::config::{CookiePersistence, LoadedCertificates, Protocol, ResolvedListener, Scheduler};

/// A listener's settings, rules, groups and certificates as of one apply. A reload builds a new
/// one and swaps it in whole: each request reads one snapshot, so it never sees half a reload.
pub struct ListenerSnapshot {
    pub name: String,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub cookie: Option<CookiePersistence>,
    pub forwarded_headers: bool,
    pub backend_timeout: Duration,
    pub header_timeout: Duration,
    pub client_timeout: Duration,
    pub router: Router,
    /// The listener's own group (first), then each other group its rules name.
    pub groups: Vec<BackendGroup>,
    pub tls: Option<Arc<ServerConfig>>,
}

#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: {message}")]
pub struct BuildError {
    listener: String,
    message: String,
}

/// The TLS server config of an HTTPS listener, from the certificates loaded with the config.
pub fn tls_for(
    resolved: &ResolvedListener<'_>,
    loaded: &LoadedCertificates,
) -> Result<Option<Arc<ServerConfig>>, BuildError> {
    let l = resolved.listener;
    match l.protocol {
        Protocol::Https => tls::server_config(&l.certificates, loaded)
            .map(Some)
            .map_err(|message| BuildError {
                listener: l.name.clone(),
                message,
            }),
        _ => Ok(None),
    }
}

impl ListenerSnapshot {
    /// Unhealthy backends get weight 0; `in_flight` holds one counter per backend that outlives
    /// snapshots, so least connections still counts requests started before a reload. `tls` is
    /// the listener's [`tls_for`], or the running snapshot's when only health changed;
    /// `cookie_key` names backends in cookies (the listener's, when it uses them); `caps` has
    /// the connection bounds of every backend address.
    pub fn build(
        resolved: &ResolvedListener<'_>,
        health: &BTreeMap<BackendKey, HealthStatus>,
        in_flight: &mut HashMap<BackendKey, Arc<AtomicUsize>>,
        tls: Option<Arc<ServerConfig>>,
        cookie_key: Option<&CookieKey>,
        caps: &HashMap<SocketAddr, Arc<BackendCap>>,
    ) -> ListenerSnapshot {
        let l = resolved.listener;
        let cookie_key = cookie_key.filter(|_| l.cookie.is_some());
        let groups = resolved
            .groups
            .iter()
            .map(|group| BackendGroup {
                name: group.name.to_string(),
                backends: group
                    .backends
                    .iter()
                    .map(|b| {
                        let key = BackendKey::of(l, b);
                        let healthy = health.get(&key).is_none_or(|h| h.healthy);
                        let counter = in_flight.entry(key).or_default().clone();
                        let weight = if healthy { b.weight } else { 0 };
                        let addr = SocketAddr::new(b.address, b.port);
                        let cap = caps
                            .get(&addr)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(BackendCap::new(group.limits)));
                        Backend::new(addr, weight, counter, cookie_key, cap)
                    })
                    .collect(),
                wrr: Mutex::default(),
            })
            .collect();
        let targets: Vec<usize> = l
            .rules
            .iter()
            .map(|r| {
                resolved
                    .groups
                    .iter()
                    .position(|g| g.name == r.group)
                    .expect("resolve collects every group a rule names")
            })
            .collect();
        ListenerSnapshot {
            name: l.name.clone(),
            protocol: l.protocol,
            scheduler: l.scheduler(),
            cookie: l.cookie.clone(),
            forwarded_headers: l.forwarded_headers,
            backend_timeout: l.backend_timeout,
            header_timeout: l.header_timeout,
            client_timeout: l.client_timeout,
            router: Router::new(&l.rules, &targets),
            groups,
            tls,
        }
    }

    /// The group a request for `host` and `path` goes to: the first matching rule's, else the
    /// listener's own.
    pub fn route(&self, host: &str, path: &str) -> &BackendGroup {
        &self.groups[self.router.route(host, path).unwrap_or(0)]
    }
}
