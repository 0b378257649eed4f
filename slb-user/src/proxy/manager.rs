//! The daemon's handle on the HTTP(S) listeners: starts, swaps and stops them as applies come.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;

use super::access_log::{AccessLog, OpenError};
use super::cookies::{CookieKey, CookieKeyError};
use super::counters::ProxyCounters;
use super::limits::{descriptor_budget_warning, limits_by_address, next_caps, BackendCaps};
use super::listener::{tls_for, BuildError, ListenerSnapshot};
use super::pool::{sweep_until_dropped, BackendPool};
use super::request::{SharedByListeners, Via};
use super::serve::accept_loop;
use super::workers::ProxyThreads;
use crate::applied::{BackendKey, HealthStatus, ProxyBackendInfo, ProxyListenerInfo};
use crate::config::{Config, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Listener(#[from] BuildError),
    #[error(
        "binding {addr}: {source} (an http/https VIP must be a local address of the slb host)"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    AccessLog(#[from] OpenError),
    #[error(transparent)]
    CookieKey(#[from] CookieKeyError),
}

/// A listener whose accept loop runs.
struct RunningListener {
    bind: (SocketAddr, Protocol),
    /// Swapped by each apply; its connections read it per request.
    snapshot: Arc<ArcSwap<ListenerSnapshot>>,
    accept_task: JoinHandle<()>,
}

/// A listener as the config wants it, before anything running changes.
struct Wanted {
    addr: SocketAddr,
    protocol: Protocol,
    snapshot: ListenerSnapshot,
}

/// The daemon's handle on all HTTP(S) listeners.
pub struct ProxyManager {
    running: BTreeMap<String, RunningListener>,
    /// One counter per backend for least connections, kept across applies.
    in_flight: HashMap<BackendKey, Arc<AtomicUsize>>,
    /// Read at each apply whose config has a listener with cookie persistence.
    cookie_key: Option<CookieKey>,
    /// The connection bounds of every backend address, given to the snapshots' backends.
    caps: BackendCaps,
    shared: Arc<SharedByListeners>,
    /// Declared last: dropped after the accept loops above are aborted.
    threads: ProxyThreads,
}

impl ProxyManager {
    /// A proxy with `threads` threads (at least one), listening nowhere until the first apply.
    pub fn new(threads: usize) -> std::io::Result<ProxyManager> {
        let caps = BackendCaps::default();
        let counters = Arc::new(ProxyCounters::default());
        // Idle connections count against the backend's max_connections, which bounds them.
        let backend_pool = Arc::new(BackendPool::default());
        let threads = ProxyThreads::start(threads)?;
        threads
            .runtimes()
            .next()
            .spawn(sweep_until_dropped(Arc::downgrade(&backend_pool)));
        Ok(ProxyManager {
            running: BTreeMap::new(),
            in_flight: HashMap::new(),
            cookie_key: None,
            caps,
            shared: Arc::new(SharedByListeners {
                backend_pool,
                access_log: AccessLog::start(),
                counters,
                via: Via::new(via_name()),
            }),
            threads,
        })
    }

    /// The proxy's counters, for status and metrics.
    pub fn counters(&self) -> Arc<ProxyCounters> {
        self.shared.counters.clone()
    }

    /// Makes the running HTTP(S) listeners match `config` and `health`. Everything that can fail
    /// (certificates, binding, the access log) is prepared before anything running changes.
    /// The errors are [`ApplyError`]s; anyhow because the daemon chains this with its other
    /// apply steps.
    pub fn apply(
        &mut self,
        config: &Config,
        health: &BTreeMap<BackendKey, HealthStatus>,
    ) -> anyhow::Result<()> {
        let uses_cookies = config
            .listeners
            .iter()
            .any(|l| l.protocol.is_l7() && l.cookie.is_some());
        let cookie_key = if uses_cookies {
            Some(CookieKey::load_or_create(&config.cookie_secret_file).map_err(ApplyError::from)?)
        } else {
            None
        };
        let l7: Vec<_> = config
            .resolved_listeners()
            .into_iter()
            .filter(|r| r.listener.protocol.is_l7())
            .collect();
        let caps = next_caps(
            &self.caps.load(),
            limits_by_address(l7.iter().flat_map(|r| {
                r.groups.iter().flat_map(|g| {
                    g.backends
                        .iter()
                        .map(|b| (SocketAddr::new(b.address, b.port), g.limits))
                })
            })),
        );
        let mut wanted = BTreeMap::new();
        for resolved in l7 {
            let l = resolved.listener;
            let tls = tls_for(&resolved, &config.certificates)?;
            let snapshot = ListenerSnapshot::build(
                &resolved,
                health,
                &mut self.in_flight,
                tls,
                cookie_key.as_ref(),
                &caps,
            );
            let addr = SocketAddr::new(l.vip, l.port);
            let protocol = l.protocol;
            wanted.insert(
                l.name.clone(),
                Wanted {
                    addr,
                    protocol,
                    snapshot,
                },
            );
        }
        let mut bound = self.bind_new_addresses(&wanted)?;
        self.shared
            .access_log
            .set_file(config.access_log.as_deref())
            .map_err(ApplyError::from)?;

        self.cookie_key = cookie_key;
        if let Some(warning) = descriptor_budget_warning(&caps, open_files_limit()) {
            tracing::warn!("{warning}");
        }
        self.caps.store(Arc::new(caps));
        self.stop_gone_or_moved(&wanted);
        for (name, w) in wanted {
            if let Some(r) = self.running.get(&name) {
                r.snapshot.store(Arc::new(w.snapshot));
                continue;
            }
            let listener = match bound.remove(&name) {
                Some(l) => l,
                None => bind(w.addr)?, // its address was held by a listener stopped just above
            };
            self.start(name, listener, w);
        }
        Ok(())
    }

    /// A health verdict on one of `listener`'s backends: its snapshot is rebuilt with the TLS
    /// config it runs with (no certificate is read, TLS sessions stay resumable), and nothing
    /// else changes (no bind, no access log reopened).
    pub fn apply_verdict(
        &mut self,
        config: &Config,
        health: &BTreeMap<BackendKey, HealthStatus>,
        listener: &str,
    ) {
        let Some(running) = self.running.get(listener) else {
            return; // not an HTTP(S) listener
        };
        let Some(l) = config.listeners.iter().find(|l| l.name == listener) else {
            return;
        };
        let tls = running.snapshot.load().tls.clone();
        // A verdict changes no limits: the caps of the last apply stand.
        let caps = self.caps.load();
        let snapshot = ListenerSnapshot::build(
            &config.resolve(l),
            health,
            &mut self.in_flight,
            tls,
            self.cookie_key.as_ref(),
            &caps,
        );
        running.snapshot.store(Arc::new(snapshot));
    }

    /// Binds the addresses no running listener holds yet.
    fn bind_new_addresses(
        &self,
        wanted: &BTreeMap<String, Wanted>,
    ) -> Result<BTreeMap<String, std::net::TcpListener>, ApplyError> {
        let mut bound = BTreeMap::new();
        for (name, w) in wanted {
            let reuse = self
                .running
                .get(name)
                .is_some_and(|r| r.bind == (w.addr, w.protocol))
                || self.running.values().any(|r| r.bind.0 == w.addr);
            if !reuse {
                bound.insert(name.clone(), bind(w.addr)?);
            }
        }
        Ok(bound)
    }

    /// Listeners that are gone or moved stop accepting; their open connections finish.
    fn stop_gone_or_moved(&mut self, wanted: &BTreeMap<String, Wanted>) {
        self.running.retain(|name, r| {
            let keep = wanted
                .get(name)
                .is_some_and(|w| r.bind == (w.addr, w.protocol));
            if !keep {
                r.accept_task.abort();
            }
            keep
        });
    }

    fn start(&mut self, name: String, listener: std::net::TcpListener, wanted: Wanted) {
        let snapshot = Arc::new(ArcSwap::from_pointee(wanted.snapshot));
        let runtimes = self.threads.runtimes();
        let accept_task = runtimes.next().spawn(accept_loop(
            listener,
            snapshot.clone(),
            self.shared.clone(),
            runtimes.clone(),
        ));
        tracing::info!(listener = %name, addr = %wanted.addr, protocol = %wanted.protocol, "proxy listening");
        self.running.insert(
            name,
            RunningListener {
                bind: (wanted.addr, wanted.protocol),
                snapshot,
                accept_task,
            },
        );
    }
}

impl Drop for ProxyManager {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.accept_task.abort();
        }
    }
}

/// The process's soft limit on open files (unlimited when it cannot be read).
fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into `limit`, valid for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::MAX;
    }
    limit.rlim_cur
}

/// This daemon's name in `Via` headers: `slb-` and 64 random bits, so it names this process and
/// no other slb (another node forwarding to it is no loop).
fn via_name() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(since_epoch) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(since_epoch.as_nanos());
    }
    format!("slb-{:016x}", hasher.finish())
}

/// A listening socket, registered with no runtime yet: its accept loop runs on a proxy thread.
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ApplyError> {
    let listen_error = |source| ApplyError::Listen { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(listen_error)?;
    socket.set_reuse_address(true).map_err(listen_error)?;
    if addr.is_ipv6() {
        // An IPv6 socket takes only IPv6: with net.ipv6.bindv6only=0 one on `::` would also
        // take IPv4 connections, which belong to the listener of an IPv4 VIP on the same port.
        socket.set_only_v6(true).map_err(listen_error)?;
    }
    socket.set_nonblocking(true).map_err(listen_error)?;
    socket
        .bind(&addr.into())
        .map_err(|source| ApplyError::Bind { addr, source })?;
    socket.listen(4096).map_err(listen_error)?;
    Ok(socket.into())
}

/// What `slb status` and the distribution report show of the HTTP(S) listeners.
pub fn describe(
    config: &Config,
    health: &BTreeMap<BackendKey, HealthStatus>,
) -> Vec<ProxyListenerInfo> {
    config
        .resolved_listeners()
        .into_iter()
        .filter(|resolved| resolved.listener.protocol.is_l7())
        .map(|resolved| {
            let l = resolved.listener;
            ProxyListenerInfo {
                name: l.name.clone(),
                protocol: l.protocol,
                vip: l.vip,
                port: l.port,
                cookie_persistence: l.cookie.is_some(),
                backends: resolved
                    .groups
                    .iter()
                    .flat_map(|g| {
                        g.backends.iter().map(|b| {
                            let key = BackendKey::of(l, b);
                            ProxyBackendInfo {
                                group: g.name.to_string(),
                                address: b.address,
                                port: b.port,
                                weight: b.weight,
                                health: health.get(&key).cloned(),
                            }
                        })
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_binds_an_ipv6_address_for_ipv6_only() {
        let listener = bind("[::1]:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(addr.ip(), "::1".parse::<std::net::IpAddr>().unwrap());
        assert!(socket2::SockRef::from(&listener).only_v6().unwrap());
        std::net::TcpStream::connect(addr).unwrap();
        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(v4.local_addr().unwrap().ip(), std::net::Ipv4Addr::LOCALHOST);
    }
}
