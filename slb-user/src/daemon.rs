//! `slb run`: load, attach, apply the config, then serve signals, admin-API calls and health
//! verdicts until told to stop. SIGHUP (or `slb reload`) re-reads the file; a bad file is logged
//! and the running config stays.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::announce::{self, Announcer};
use crate::api::{self, Call, Request, Response};
use crate::applied::{AppliedState, BackendKey, HealthStatus, StateFileError};
use crate::config::{AttachMode, Config, GroupKind, InitialHealth, ResolvedBackend};
use crate::dataplane::{detach_pinned, Dataplane, TableSizes};
use crate::health::{unix_ns, CheckTarget, HealthEvent, HealthMonitor};
use crate::instance::{lock_file, socket_path, state_dir};
use crate::links::{self, LinkHistory};
use crate::maps::PinnedMaps;
use crate::metrics::{LiveStatus, Published};
use crate::proxy::ProxyManager;
use crate::reconcile::Reconciler;

/// How often the daemon checks that each attached interface still has the program.
const LINK_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "instance {instance:?} is already served by slb pid {pid} (it holds {path}); stop it with \
         `slb stop -i {instance}` or use another instance name"
    )]
    Held {
        instance: String,
        pid: String,
        path: PathBuf,
    },
    #[error("locking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive flock on the instance's lock file, held for the daemon's life. Without it a
/// second `slb run` for the same instance would adopt the first one's pins and admin socket and,
/// on its way out, detach everything while the first keeps running blind. The kernel drops the
/// lock when the process dies, however it dies, so a stale file never blocks a restart.
pub struct InstanceLock {
    _file: fs::File,
}

impl InstanceLock {
    pub fn acquire(instance: &str) -> Result<InstanceLock, LockError> {
        use std::io::{Read as _, Seek as _, Write as _};
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::MetadataExt as _;

        let path = lock_file(instance);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let dir = path.parent().expect("lock file has a directory");
        loop {
            fs::create_dir_all(dir).map_err(io)?;
            // Also when an earlier run (or someone) left it open to others.
            fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io)?;
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io)?;
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(io(e));
                }
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = match pid.trim() {
                    "" => "unknown".to_string(),
                    p => p.to_string(),
                };
                return Err(LockError::Held {
                    instance: instance.into(),
                    pid,
                    path,
                });
            }
            // A daemon that exits removes the state directory, lock file included, while it
            // still holds the lock: if that happened between our open and our flock, we locked
            // a file nobody else can see. Start over on the path's current file.
            let ours = file.metadata().map_err(io)?;
            match fs::metadata(&path) {
                Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => {}
                _ => continue,
            }
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            writeln!(file, "{}", std::process::id()).map_err(io)?;
            return Ok(InstanceLock { _file: file });
        }
    }

    /// The pid of the daemon holding `instance`'s lock, or `None` when no daemon holds it.
    pub fn holder(instance: &str) -> Option<String> {
        use std::os::fd::AsRawFd as _;
        let path = lock_file(instance);
        let file = fs::File::open(&path).ok()?;
        // A shared lock succeeds only when no daemon holds the exclusive one.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return None;
        }
        let pid = fs::read_to_string(&path).unwrap_or_default();
        Some(match pid.trim() {
            "" => "unknown".to_string(),
            p => p.to_string(),
        })
    }
}

pub struct RunOptions {
    pub config: PathBuf,
    /// Leave programs attached and maps pinned on exit.
    pub keep_serving: bool,
    /// Proxy threads; `None` for one per CPU the process may use.
    pub worker_threads: Option<u16>,
}

/// Raises the soft limit on open files to the hard one (often 1024 against 524288): every proxied
/// connection takes two descriptors. Returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill and then to set.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// The control plane's runtime: applies run on the thread `slb run` started on, health checks,
/// the admin API and metrics on one worker thread (the proxy has threads of its own).
fn control_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

pub fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&options.config)?;
    let instance = config.instance.clone();
    // Before anything else touches the instance's pins, socket or state.
    let _lock = InstanceLock::acquire(&instance)?;
    let descriptors = raise_descriptor_limit();
    tracing::info!(
        descriptors,
        "file descriptor budget (proxy connections, health checks, maps)"
    );
    // available_parallelism honours the CPU affinity and cgroup quota slb was started with.
    let worker_threads = options.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let runtime = control_runtime()?;
    // Before the data plane is loaded: a SIGTERM from here on waits for the loop (and its
    // clean-up) instead of killing a daemon that has pinned things.
    let signals = runtime.block_on(async { StopSignals::install() })?;
    let mut dataplane = Dataplane::load(&config.instance, TableSizes::of(&config))
        .context("loading the data plane")?;
    let previous = if dataplane.adopted() {
        read_state(&instance)
    } else {
        None
    };
    let proxy = ProxyManager::new(worker_threads).context("starting the proxy's threads")?;
    let outcome = runtime.block_on(serve(
        &mut dataplane,
        config,
        previous,
        &options,
        signals,
        proxy,
    ));

    let keep = match &outcome {
        Ok(Exit::KeepServing) => options.keep_serving,
        Ok(Exit::Shutdown) => false,
        // A failed adoption must not take down a data plane that was serving before we came.
        Err(_) => dataplane.adopted(),
    };
    if keep {
        dataplane.keep_serving();
    } else {
        dataplane
            .shutdown()
            .context("detaching and removing pins")?;
        let _ = fs::remove_dir_all(state_dir(&instance));
        tracing::info!(%instance, "detached and unpinned; bye");
    }
    outcome.map(|_| ())
}

/// The signals the daemon loop answers: SIGHUP reloads, SIGTERM and SIGINT stop.
struct StopSignals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// How the daemon was asked to stop.
pub enum Exit {
    /// SIGTERM/SIGINT: with `--keep-serving`, leave the data plane running for the next start.
    KeepServing,
    /// `slb stop`: detach and unpin whatever the flag says.
    Shutdown,
}

/// The state a previous run left, for adoption after a restart.
fn read_state(instance: &str) -> Option<AppliedState> {
    match AppliedState::read(instance) {
        Ok(state) => Some(state),
        Err(StateFileError::NotRunning { .. }) => None,
        Err(e) => {
            let e = anyhow::Error::from(e);
            tracing::warn!("ignoring the previous run's state: {e:#}");
            None
        }
    }
}

async fn serve(
    dataplane: &mut Dataplane,
    config: Config,
    previous: Option<AppliedState>,
    options: &RunOptions,
    signals: StopSignals,
    proxy: ProxyManager,
) -> anyhow::Result<Exit> {
    let path = options.config.as_path();
    let (health_tx, mut health_rx) = mpsc::channel(1024);
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    let admin_socket = api::bind(&config.instance)?;
    let (mut daemon, background) = start_daemon(dataplane, config, previous, health_tx, proxy)?;
    let tasks = Tasks {
        api: tokio::spawn(api::serve(admin_socket, call_tx)),
        background,
    };
    tracing::info!(
        instance = %daemon.file_config.instance,
        listeners = daemon.config.listeners.len(),
        interfaces = ?daemon.interfaces.keys().collect::<Vec<_>>(),
        socket = %socket_path(&daemon.file_config.instance).display(),
        "slb ready"
    );
    daemon.notify_systemd(&[sd_notify::NotifyState::Ready]);

    // How soon a deleted and re-created interface gets the program back.
    let mut link_check = tokio::time::interval(LINK_CHECK_INTERVAL);
    link_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let StopSignals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                daemon.notify_systemd(&[sd_notify::NotifyState::Reloading]);
                let response = daemon.reload(dataplane, path);
                daemon.notify_systemd(&[sd_notify::NotifyState::Ready]);
                log_response("SIGHUP reload", &response);
            }
            Some((request, reply)) = call_rx.recv() => {
                let response = match request {
                    Request::Reload {} => daemon.reload(dataplane, path),
                    Request::Stop {} => {
                        daemon.notify_systemd(&[sd_notify::NotifyState::Stopping]);
                        let _ = reply.send(Response { ok: true, message: "stopping: detaching and removing pins".into(), generation: 0 });
                        tasks.abort();
                        daemon.stop_announcing(true).await;
                        return Ok(Exit::Shutdown);
                    }
                    Request::BackendDrain { timeout_s, remove, .. } => {
                        daemon.start_drain(&request, timeout_s, remove)
                    }
                    other => {
                        let response = daemon.runtime_change(&other);
                        if response.ok {
                            daemon.end_drains_changed_by(&other, &response.message);
                        }
                        response
                    }
                };
                log_response("admin API", &response);
                let _ = reply.send(response);
            }
            Some(event) = health_rx.recv() => daemon.health_changed(event),
            _ = link_check.tick() => {
                daemon.check_links(dataplane);
                daemon.check_drains();
                daemon.check_slow_starts();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    daemon.notify_systemd(&[sd_notify::NotifyState::Stopping]);
    tasks.abort();
    // With --keep-serving the data plane forwards on: the announcements stay.
    daemon.stop_announcing(!options.keep_serving).await;
    Ok(Exit::KeepServing)
}

/// The daemon with its first config applied, and its background tasks running.
fn start_daemon(
    dataplane: &mut Dataplane,
    config: Config,
    previous: Option<AppliedState>,
    health_tx: mpsc::Sender<HealthEvent>,
    proxy: ProxyManager,
) -> anyhow::Result<(Daemon, Vec<tokio::task::JoinHandle<()>>)> {
    let (plan_tx, plan_rx) = watch::channel(crate::flows::SweepPlan::default());
    let (published_tx, published_rx) = watch::channel(Published::default());
    let (flows_tx, flows_rx) = watch::channel(crate::flows::FlowCounts::default());
    let mut daemon = Daemon::start(
        dataplane,
        config,
        previous,
        HealthMonitor::new(health_tx),
        Publishers {
            sweep_plan: plan_tx,
            published: published_tx,
        },
        proxy,
    )?;
    let proxy_counters = daemon.proxy.counters();
    let live = LiveStatus::new(
        published_rx,
        flows_rx,
        dataplane.dir(),
        proxy_counters.clone(),
    )?;
    daemon.live = Some(live.clone());
    let mut background = spawn_background(
        &daemon.file_config,
        dataplane.dir(),
        plan_rx,
        flows_tx,
        live,
    );
    background.push(tokio::spawn(
        crate::proxy::tls::report_refused_renegotiations(
            RENEGOTIATION_REPORT_INTERVAL,
            proxy_counters.clone(),
        ),
    ));
    background.push(tokio::spawn(crate::proxy::counters::publish(
        daemon.file_config.instance.to_string(),
        proxy_counters,
    )));
    Ok((daemon, background))
}

/// The tasks that stop with the daemon's loop: the admin API and the background tasks.
struct Tasks {
    api: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Tasks {
    fn abort(&self) {
        self.api.abort();
        self.background.iter().for_each(|t| t.abort());
    }
}

/// How often refused TLS renegotiations are summed up in the log (see
/// [`crate::proxy::tls::RustlsLogFilter`]).
const RENEGOTIATION_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The daemon's tasks besides its loop: the connection-table sweeper, the counter history and,
/// when configured, the Prometheus endpoint.
fn spawn_background(
    config: &Config,
    pin_dir: &Path,
    sweep_plan: watch::Receiver<crate::flows::SweepPlan>,
    sweep_found: watch::Sender<crate::flows::FlowCounts>,
    live: LiveStatus,
) -> Vec<tokio::task::JoinHandle<()>> {
    let instance = config.instance.to_string();
    let mut background = vec![
        tokio::spawn(crate::flows::run(
            instance.clone(),
            pin_dir.to_path_buf(),
            sweep_plan,
            sweep_found,
        )),
        tokio::spawn(crate::metrics::record_history(instance, live.clone())),
    ];
    if let Some(port) = config.metrics.prometheus_port {
        // Bound here, before the daemon says it is ready; served by a task.
        match crate::metrics::bind_prometheus(port) {
            Ok(listener) => background.push(tokio::spawn(crate::metrics::serve_prometheus(
                live, listener,
            ))),
            Err(e) => tracing::error!("Prometheus endpoint not started: {e:#}"),
        }
    }
    background
}

fn log_response(source: &str, response: &Response) {
    if response.ok {
        tracing::info!(
            generation = response.generation,
            "{source}: {}",
            response.message
        );
    } else {
        tracing::error!(
            "{source} rejected, the running config stays: {}",
            response.message
        );
    }
}

/// One attach or detach a reload made, to undo it when the reload fails.
#[derive(Debug)]
enum InterfaceStep {
    Attached(String),
    Detached(String, AttachMode),
}

/// Whether `name` is an interface in this network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

struct Daemon {
    reconciler: Reconciler,
    /// What the daemon publishes in the state file; the maps part is the reconciler's.
    state: AppliedState,
    interfaces: BTreeMap<String, AttachMode>,
    /// The file as last read successfully.
    file_config: Config,
    /// What runs: the file plus runtime changes.
    config: Config,
    health: BTreeMap<BackendKey, HealthStatus>,
    monitor: HealthMonitor,
    proxy: ProxyManager,
    publishers: Publishers,
    /// Re-attachments after interface flaps, for `slb status`.
    links: BTreeMap<String, LinkHistory>,
    /// Announces the VIPs through BIRD, with `[announce]`.
    announcer: Option<Announcer>,
    /// The first config has been applied: a backend checked from now on is an addition.
    applied_once: bool,
    /// What the daemon's own status reads (counters, the sweeper's counts): how many
    /// connections a drained backend has left.
    live: Option<LiveStatus>,
    /// When each backend in slow start began it, on the monotonic clock (a step of the wall
    /// clock must not restart or skip a ramp).
    slow_start_began: BTreeMap<BackendKey, std::time::Instant>,
}

/// Where the daemon publishes in memory, besides the files the CLI reads.
struct Publishers {
    /// What the connection-table sweeper needs of the applied state.
    sweep_plan: watch::Sender<crate::flows::SweepPlan>,
    /// The applied state and link history, for Prometheus and the counter history.
    published: watch::Sender<Published>,
}

/// The announcer `config` asks for, told what the previous run announced; or, with no
/// `[announce]`, the previous run's announcements withdrawn.
fn start_announcing(config: &Config) -> Option<Announcer> {
    let instance = config.instance.to_string();
    let previous = announce::AnnounceStatus::read(&instance);
    match &config.announce {
        Some(a) => Some(Announcer::start(
            &instance,
            announce::Target::of(a, &instance),
            previous,
        )),
        None => {
            if let Some(p) = previous {
                tokio::spawn(async move {
                    announce::retire(&instance, &p.target).await;
                    let _ = fs::remove_file(crate::instance::announce_file(&instance));
                });
            }
            None
        }
    }
}

/// Every backend of every listener of `config`, as health and counters key them.
fn backend_keys(config: &Config) -> BTreeSet<BackendKey> {
    config
        .resolved_listeners()
        .iter()
        .flat_map(|r| {
            r.groups
                .iter()
                .flat_map(|g| g.backends.iter().map(|b| BackendKey::of(r.listener, b)))
        })
        .collect()
}

/// A newly checked backend's health until its checks answer: healthy at the daemon's start
/// (unless its group says otherwise) or when it only gains a check, unhealthy when `added` to
/// a running daemon, so that it takes no new flows before it has passed its checks.
fn initial_status(target: &CheckTarget, added: bool, now_unix_ns: u128) -> HealthStatus {
    let (healthy, reason) = if added {
        (false, "added: no new flows until it passes its checks")
    } else if target.initial_health == InitialHealth::Unhealthy {
        (
            false,
            "initial_health = \"unhealthy\": no new flows until it passes its checks",
        )
    } else {
        (true, "checking (healthy until proven otherwise)")
    };
    HealthStatus {
        healthy,
        reason: reason.into(),
        since_unix_ns: now_unix_ns,
        confirmed: false,
        slow_start_percent: None,
    }
}

/// The share of its weight a backend in slow start gets `elapsed` after it became healthy,
/// in steps (each a ring rebuilt): 10 %, 25 %, 50 %, 75 %, then its full weight.
pub fn slow_start_percent(elapsed: Duration, slow_start: Duration) -> Option<u32> {
    let step = (elapsed.as_nanos() * 4 / slow_start.as_nanos().max(1)).min(4) as usize;
    SLOW_START_STEPS.get(step).copied()
}

const SLOW_START_STEPS: [u32; 4] = [10, 25, 50, 75];

/// How far into its slow start a backend at `percent` is (the start of that step): where a
/// restarted daemon, which kept the step but not the clock, goes on from.
fn slow_start_elapsed(percent: u32, slow_start: Duration) -> Duration {
    let step = SLOW_START_STEPS
        .iter()
        .position(|p| *p == percent)
        .unwrap_or(0);
    slow_start * step as u32 / 4
}

/// The `slow_start` of the group `key`'s listener serves it from.
fn slow_start_of(config: &Config, key: &BackendKey) -> Option<Duration> {
    let listener = config.listeners.iter().find(|l| l.name == key.listener)?;
    config
        .resolve(listener)
        .groups
        .iter()
        .find(|g| {
            g.backends
                .iter()
                .any(|b| b.address == key.address && b.port == key.port)
        })?
        .slow_start
}

/// The backends `config` health-checks: every backend of a checked Maglev listener, and only the
/// active server of an active/standby group.
fn check_targets(config: &Config) -> Vec<CheckTarget> {
    let mut targets = Vec::new();
    for resolved in config.resolved_listeners() {
        let l = resolved.listener;
        let Some(check) = &l.health_check else {
            continue;
        };
        let mut checked: Vec<(ResolvedBackend, InitialHealth)> = Vec::new();
        for group in &resolved.groups {
            // Only the active server of an active/standby group is probed.
            let probed = if group.kind == GroupKind::ActiveStandby {
                &group.backends[..1]
            } else {
                &group.backends[..]
            };
            for b in probed {
                if !checked
                    .iter()
                    .any(|(c, _)| c.address == b.address && c.port == b.port)
                {
                    checked.push((*b, group.initial_health));
                }
            }
        }
        for (b, initial_health) in checked {
            targets.push(CheckTarget {
                key: BackendKey::of(l, &b),
                address: SocketAddr::new(b.address, check.port.unwrap_or(b.port)),
                check: check.clone(),
                initial_health,
            });
        }
    }
    targets
}

impl Daemon {
    /// Tells systemd (Type=notify) where we are, with a one-line status; a no-op elsewhere.
    fn notify_systemd(&self, states: &[sd_notify::NotifyState<'_>]) {
        let stopping = states
            .iter()
            .any(|s| matches!(s, sd_notify::NotifyState::Stopping));
        let status = if stopping {
            "stopping".to_string()
        } else {
            format!(
                "serving {} listener(s) on {}; config generation {}",
                self.config.listeners.len(),
                self.interfaces
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                self.state.generation
            )
        };
        let mut all = states.to_vec();
        all.push(sd_notify::NotifyState::Status(&status));
        if let Err(e) = sd_notify::notify(false, &all) {
            tracing::debug!("sd_notify: {e}");
        }
    }

    fn start(
        dataplane: &mut Dataplane,
        config: Config,
        previous: Option<AppliedState>,
        monitor: HealthMonitor,
        publishers: Publishers,
        proxy: ProxyManager,
    ) -> anyhow::Result<Daemon> {
        let maps = PinnedMaps::open(dataplane.dir())?;
        let mut reconciler = Reconciler::new(maps, &config.instance, config.maglev_table_size);
        let mut state = AppliedState {
            instance: config.instance.to_string(),
            ring_size: config.maglev_table_size,
            ..Default::default()
        };
        let mut health = BTreeMap::new();
        if let Some(previous) = previous {
            // Same ids and rings as before, so pinned connections keep their backends; and the
            // last verdicts, so a restart does not flap backends.
            for b in &previous.backends {
                if let Some(h) = &b.health {
                    health.insert(b.key.clone(), h.clone());
                }
            }
            tracing::info!(
                generation = previous.generation,
                backends = previous.backends.len(),
                "adopted the previous run's state"
            );
            state.generation = previous.generation;
            reconciler.adopt(previous.maps());
        }
        let mut daemon = Daemon {
            reconciler,
            state,
            interfaces: BTreeMap::new(),
            file_config: config.clone(),
            config: config.clone(),
            health,
            monitor,
            proxy,
            publishers,
            links: BTreeMap::new(),
            announcer: start_announcing(&config),
            applied_once: false,
            live: None,
            slow_start_began: BTreeMap::new(),
        };
        for iface in dataplane.pinned_interfaces() {
            let pin = crate::instance::link_pin(dataplane.dir(), &iface);
            let on_its_device =
                links::link_ifindex(&pin).is_some_and(|l| links::ifindex_of(&iface) == Some(l));
            match config.interfaces.iter().find(|i| i.name == iface) {
                Some(i) if on_its_device => {
                    dataplane.adopt_link(&iface)?;
                    daemon.interfaces.insert(iface, i.mode);
                }
                Some(_) => {
                    // The interface was deleted (and maybe re-created) since the link was made:
                    // the link is defunct and cannot be updated; drop it and attach afresh below.
                    tracing::warn!(
                        iface,
                        "the pinned link no longer runs on this interface; attaching anew"
                    );
                    detach_pinned(&config.instance, &iface)?;
                }
                None => detach_pinned(&config.instance, &iface)?,
            }
        }
        daemon.sync_interfaces(dataplane, &config)?;
        daemon.apply(config, Vec::new(), 0)?;
        Ok(daemon)
    }

    /// Applies a new running config (a config change: the generation advances).
    fn apply(
        &mut self,
        config: Config,
        runtime_changes: Vec<String>,
        runtime_changes_earlier: u64,
    ) -> anyhow::Result<u64> {
        let targets = check_targets(&config);
        // Before the checkers start, so each starts from its backend's verdict. Only a backend
        // the running config did not have is an addition: one that merely gains a check (or
        // whose check changes) is not.
        let now = unix_ns(SystemTime::now());
        let before = if self.applied_once {
            backend_keys(&self.config)
        } else {
            BTreeSet::new()
        };
        for t in &targets {
            let added = self.applied_once && !before.contains(&t.key);
            self.health
                .entry(t.key.clone())
                .or_insert_with(|| initial_status(t, added, now));
        }
        let stopped = self.monitor.set_targets(targets.clone(), &self.health);
        // A backend whose check merely changed keeps its verdict (its new checker starts from
        // it); only the ones no longer checked are forgotten.
        for key in stopped {
            if !targets.iter().any(|t| t.key == key) {
                self.health.remove(&key);
            }
        }
        self.proxy.apply(&config, &self.health)?;
        self.reconciler.apply(&config, &self.health)?;
        self.state.generation += 1;
        self.state.runtime_changes = runtime_changes;
        self.state.runtime_changes_earlier = runtime_changes_earlier;
        self.state.interfaces = config.interfaces.iter().map(|i| i.name.clone()).collect();
        self.config = config;
        self.applied_once = true;
        self.publish()?;
        Ok(self.state.generation)
    }

    /// Writes the state file `slb status` and `slb report` read.
    fn publish(&mut self) -> anyhow::Result<()> {
        self.state.set_maps(self.reconciler.state());
        self.state.proxy_listeners = crate::proxy::describe(&self.config, &self.health);
        self.state.access_log = self.config.access_log.clone();
        let plan = crate::flows::SweepPlan::from_state(self.reconciler.state());
        self.publishers.sweep_plan.send_if_modified(|current| {
            let changed = *current != plan;
            *current = plan;
            changed
        });
        self.publishers
            .published
            .send_modify(|published| published.state.clone_from(&self.state));
        self.state.write()?;
        self.announce();
        Ok(())
    }

    /// Tells the announcer what this node can serve now.
    fn announce(&self) {
        if let Some(announcer) = &self.announcer {
            announcer.update(announce::plan(
                &self.config.vips,
                &self.state,
                &self.serving(),
            ));
        }
    }

    /// Whether the data plane runs on every configured interface, or why not.
    fn serving(&self) -> Result<(), String> {
        for i in &self.config.interfaces {
            let gone = self
                .links
                .get(&i.name)
                .is_some_and(|h| h.gone_since_unix_ns.is_some());
            if gone {
                return Err(format!("interface {} is gone", i.name));
            }
            if !self.interfaces.contains_key(&i.name) {
                return Err(format!("the data plane is not attached to {}", i.name));
            }
        }
        Ok(())
    }

    /// Withdraws everything through BIRD first (when `withdraw`), so that the routers move
    /// the flows to other nodes while this one still forwards; then stops the announcer.
    async fn stop_announcing(&mut self, withdraw: bool) {
        let Some(announcer) = self.announcer.take() else {
            return;
        };
        if withdraw {
            announcer
                .withdraw_all("slb is stopping", announce::WITHDRAW_TIMEOUT)
                .await;
        } else {
            announcer.stop().await;
        }
    }

    /// Attaches and detaches so that the program runs on exactly `config`'s interfaces. All or
    /// nothing: every name must resolve before anything changes, and when a step still fails
    /// (the kernel refuses a mode, an interface vanishes meanwhile) the steps already taken are
    /// undone, so a refused reload leaves the interfaces as they were. The steps are returned
    /// for [`undo_interfaces`](Self::undo_interfaces) in case a later part of the reload fails.
    fn sync_interfaces(
        &mut self,
        dataplane: &mut Dataplane,
        config: &Config,
    ) -> anyhow::Result<Vec<InterfaceStep>> {
        let wanted: BTreeMap<String, AttachMode> = config
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), i.mode))
            .collect();
        let missing: Vec<&str> = wanted
            .keys()
            .filter(|name| self.interfaces.get(*name) != wanted.get(*name))
            .filter(|name| !interface_exists(name))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "interfaces: no interface named {} in this network namespace; nothing was attached or detached",
                missing
                    .iter()
                    .map(|n| format!("{n:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut steps = Vec::new();
        if let Err(e) = self.sync_steps(dataplane, config, &wanted, &mut steps) {
            self.undo_interfaces(dataplane, &config.instance, steps);
            return Err(e.context("interfaces: the changes made so far were undone"));
        }
        Ok(steps)
    }

    fn sync_steps(
        &mut self,
        dataplane: &mut Dataplane,
        config: &Config,
        wanted: &BTreeMap<String, AttachMode>,
        steps: &mut Vec<InterfaceStep>,
    ) -> anyhow::Result<()> {
        for (name, mode) in wanted {
            match self.interfaces.get(name).copied() {
                Some(m) if m == *mode => {}
                Some(old) => {
                    detach_pinned(&config.instance, name)?;
                    self.interfaces.remove(name);
                    steps.push(InterfaceStep::Detached(name.clone(), old));
                    dataplane.attach(name, *mode)?;
                    self.interfaces.insert(name.clone(), *mode);
                    steps.push(InterfaceStep::Attached(name.clone()));
                }
                None => {
                    dataplane.attach(name, *mode)?;
                    self.interfaces.insert(name.clone(), *mode);
                    steps.push(InterfaceStep::Attached(name.clone()));
                }
            }
        }
        let gone: Vec<(String, AttachMode)> = self
            .interfaces
            .iter()
            .filter(|(n, _)| !wanted.contains_key(*n))
            .map(|(n, m)| (n.clone(), *m))
            .collect();
        for (name, old) in gone {
            detach_pinned(&config.instance, &name)?;
            self.interfaces.remove(&name);
            steps.push(InterfaceStep::Detached(name, old));
        }
        Ok(())
    }

    /// Reverts `steps` (newest first). Best effort: a step that cannot be reverted is logged,
    /// and the rest are still tried.
    fn undo_interfaces(
        &mut self,
        dataplane: &mut Dataplane,
        instance: &str,
        steps: Vec<InterfaceStep>,
    ) {
        for step in steps.into_iter().rev() {
            let result = match &step {
                InterfaceStep::Attached(name) => detach_pinned(instance, name).map(|()| {
                    self.interfaces.remove(name);
                }),
                InterfaceStep::Detached(name, mode) => dataplane.attach(name, *mode).map(|()| {
                    self.interfaces.insert(name.clone(), *mode);
                }),
            };
            match result {
                Ok(()) => tracing::info!(?step, "undone"),
                Err(e) => tracing::error!(?step, "cannot undo: {e}"),
            }
        }
    }

    /// Re-attaches the program to every interface that was deleted and re-created since it was
    /// attached (same name, new device), and notes the ones that are gone, for `slb status`.
    fn check_links(&mut self, dataplane: &mut Dataplane) {
        let instance = self.file_config.instance.clone();
        let mut changed = false;
        for (name, mode) in self.interfaces.clone() {
            let pin = crate::instance::link_pin(dataplane.dir(), &name);
            let link = links::link_ifindex(&pin);
            let current = links::ifindex_of(&name);
            if current.is_some() && link == current {
                continue;
            }
            let history = self.links.entry(name.clone()).or_default();
            let Some(ifindex) = current else {
                if history.gone_since_unix_ns.is_none() {
                    tracing::warn!(
                        iface = %name,
                        "interface gone: the program is detached from it; re-attaching when it returns"
                    );
                    history.gone_since_unix_ns = Some(unix_ns(SystemTime::now()));
                    changed = true;
                }
                continue;
            };
            let result = if pin.exists() {
                detach_pinned(&instance, &name)
            } else {
                Ok(())
            }
            .and_then(|()| dataplane.attach(&name, mode));
            match result {
                Ok(()) => {
                    tracing::info!(iface = %name, ifindex, "interface re-created: re-attached");
                    history.reattached += 1;
                    history.last_reattached_unix_ns = Some(unix_ns(SystemTime::now()));
                    history.gone_since_unix_ns = None;
                    changed = true;
                }
                // Tried again on the next check.
                Err(e) => tracing::warn!(iface = %name, "re-attaching failed: {e}"),
            }
        }
        if changed {
            self.announce();
            self.publishers
                .published
                .send_modify(|published| published.links.clone_from(&self.links));
            if let Err(e) = links::write_history(&instance, &self.links) {
                tracing::warn!(
                    "writing {}: {e}",
                    crate::instance::links_file(&instance).display()
                );
            }
        }
    }

    fn response(&self, result: anyhow::Result<String>) -> Response {
        let generation = self.state.generation;
        match result {
            Ok(message) => Response {
                ok: true,
                message,
                generation,
            },
            Err(e) => Response {
                ok: false,
                message: format!("{e:#}"),
                generation,
            },
        }
    }

    fn reload(&mut self, dataplane: &mut Dataplane, path: &Path) -> Response {
        let result = (|| {
            let config = Config::load(path)?;
            if config.instance != self.file_config.instance {
                anyhow::bail!(
                    "instance: cannot change from {:?} to {:?} while running; restart slb",
                    self.file_config.instance,
                    config.instance
                );
            }
            if config.announce != self.file_config.announce {
                anyhow::bail!(
                    "announce: cannot change while running; restart slb (with --keep-serving \
                     the data plane forwards on and nothing is withdrawn meanwhile)"
                );
            }
            // A flapped interface counts as attached only once it really is again.
            self.check_links(dataplane);
            let steps = self.sync_interfaces(dataplane, &config)?;
            let generation = match self.apply(config.clone(), Vec::new(), 0) {
                Ok(generation) => generation,
                Err(e) => {
                    self.undo_interfaces(dataplane, &config.instance, steps);
                    return Err(e);
                }
            };
            self.file_config = config;
            // The file's weights are back: drains under way end.
            if self.state.drains.iter().any(|d| !d.finished()) {
                tracing::info!("reload: the drains under way end (the file's weights are back)");
            }
            self.state.drains.retain(|d| d.finished());
            self.publish()?;
            Ok(format!(
                "config file {} applied as generation {generation}",
                path.display()
            ))
        })();
        self.response(result)
    }

    fn runtime_change(&mut self, request: &Request) -> Response {
        let result = (|| {
            let edit = request
                .backend_edit()?
                .ok_or_else(|| anyhow::anyhow!("not a backend change"))?;
            let (config, description) = self.config.edit_backend(&edit)?;
            let (changes, earlier) = crate::applied::add_runtime_change(
                self.state.runtime_changes.clone(),
                self.state.runtime_changes_earlier,
                description.clone(),
            );
            self.apply(config, changes, earlier)?;
            tracing::info!(change = %description, "runtime change applied");
            Ok(description)
        })();
        self.response(result)
    }

    /// `slb backend drain`: weight 0 now; [`check_drains`](Self::check_drains) follows it.
    fn start_drain(&mut self, request: &Request, timeout_s: u64, remove: bool) -> Response {
        let drain = match self.plan_drain(request, timeout_s, remove) {
            Ok(drain) => drain,
            Err(e) => return self.response(Err(e)),
        };
        let response = self.runtime_change(request);
        if !response.ok {
            return response;
        }
        // A new drain of the same backend replaces the old one.
        self.state
            .drains
            .retain(|d| !d.is_of(&drain.group, &drain.backend));
        self.state.drains.push(drain.clone());
        // Its connections counted now, so the first report has them (and a backend without
        // any is drained at once).
        self.check_drains();
        if let Err(e) = self.publish() {
            return self.response(Err(e));
        }
        let now = self
            .state
            .drains
            .iter()
            .find(|d| d.is_of(&drain.group, &drain.backend))
            .cloned()
            .unwrap_or(drain);
        let message = match now.phase {
            crate::applied::DrainPhase::Draining => format!(
                "draining {} (weight 0, {} connection(s)) for up to {timeout_s} s; then {}",
                now.describe(),
                now.left,
                if remove { "removed" } else { "reported" }
            ),
            phase => format!("{}: no connection to wait for ({phase:?})", now.describe()),
        };
        tracing::info!("{message}");
        self.response(Ok(message))
    }

    /// The drain `request` asks for, checked against the running config: the listener backends
    /// it covers, and a refusal where weights do not apply (active/standby) or where slb does
    /// not follow connections per backend (HTTP(S), served by the proxy).
    fn plan_drain(
        &self,
        request: &Request,
        timeout_s: u64,
        remove: bool,
    ) -> anyhow::Result<crate::applied::Drain> {
        const MAX_TIMEOUT_S: u64 = 24 * 3600;
        if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
            anyhow::bail!("timeout: {timeout_s} s; a drain's timeout is 1 s to 24 h");
        }
        let edit = request
            .backend_edit()?
            .expect("a drain is a backend change");
        let backend = edit.backend();
        let mut keys = Vec::new();
        for r in self.config.resolved_listeners() {
            for g in r.groups.iter().filter(|g| g.name == edit.group) {
                if g.kind == GroupKind::ActiveStandby {
                    anyhow::bail!(
                        "group {}: an active/standby pair has no weights to drain by; remove \
                         or replace the server instead",
                        edit.group
                    );
                }
                if r.listener.protocol.is_l7() {
                    anyhow::bail!(
                        "group {} serves {} listener {}, whose connections slb does not follow \
                         per backend: use `slb backend set-weight ... --weight 0`",
                        edit.group,
                        r.listener.protocol,
                        r.listener.name
                    );
                }
                let spec = crate::config::BackendSpec {
                    address: edit.address,
                    port: edit.port,
                    weight: 0,
                    max_connections: None,
                };
                keys.push(BackendKey::of(
                    r.listener,
                    &crate::config::ResolvedBackend::of(&spec, r.listener),
                ));
            }
        }
        Ok(crate::applied::Drain {
            group: edit.group,
            backend,
            keys,
            deadline_unix_ns: unix_ns(SystemTime::now()) + u128::from(timeout_s) * 1_000_000_000,
            remove,
            phase: crate::applied::DrainPhase::Draining,
            left: 0,
            zero_since_sweep: None,
            note: None,
        })
    }

    /// Ends the drains a runtime change of their backend overtakes (a reweight, a removal).
    fn end_drains_changed_by(&mut self, request: &Request, description: &str) {
        let Ok(Some(edit)) = request.backend_edit() else {
            return;
        };
        let backend = edit.backend();
        let mut ended = false;
        for d in self
            .state
            .drains
            .iter_mut()
            .filter(|d| !d.finished() && d.is_of(&edit.group, &backend))
        {
            d.phase = crate::applied::DrainPhase::Ended;
            d.note = Some(format!("ended by a runtime change: {description}"));
            tracing::info!("drain of {} ended by a runtime change", d.describe());
            ended = true;
        }
        if ended {
            if let Err(e) = self.publish() {
                tracing::error!("publishing the drains failed: {e:#}");
            }
        }
    }

    /// Follows the drains under way: a backend whose connections are gone is drained (and
    /// removed, if asked); one still holding connections at the deadline is reported (or
    /// removed, cutting them). Publishes only when something moved.
    fn check_drains(&mut self) {
        use crate::applied::DrainPhase;
        if self.state.drains.iter().all(|d| d.finished()) {
            return;
        }
        // Without the counts, the deadline still holds (with the last count).
        let counts = self.live.as_ref().and_then(|live| match live.collect() {
            Ok(status) => Some(status),
            Err(e) => {
                tracing::warn!("drains: reading the connection counts failed: {e:#}");
                None
            }
        });
        let now = unix_ns(SystemTime::now());
        let mut changed = false;
        let mut removals = Vec::new();
        for (i, d) in self.state.drains.iter_mut().enumerate() {
            if d.finished() {
                continue;
            }
            let mut confirmed_zero = false;
            if let Some(status) = &counts {
                let left = status
                    .backends
                    .iter()
                    .filter(|b| d.keys.contains(&b.key()))
                    .map(|b| b.connections)
                    .sum();
                changed |= left != d.left;
                d.left = left;
                let swept = status.connection_table.swept_at_unix_s;
                match (left, d.zero_since_sweep) {
                    (0, None) => d.zero_since_sweep = Some(swept),
                    (0, Some(first)) => confirmed_zero = swept > first,
                    _ => d.zero_since_sweep = None,
                }
            }
            let over = now >= d.deadline_unix_ns;
            // At the deadline, a count of 0 is taken as it is.
            let gone = d.left == 0 && (confirmed_zero || over);
            d.phase = match (gone, over, d.remove) {
                (true, _, true) => DrainPhase::Removed,
                (true, _, false) => DrainPhase::Drained,
                (false, true, true) => DrainPhase::RemovedAtDeadline,
                (false, true, false) => DrainPhase::TimedOut,
                (false, false, _) => continue,
            };
            changed = true;
            tracing::info!(phase = ?d.phase, left = d.left, "drain of {} ended", d.describe());
            if d.remove {
                removals.push((
                    i,
                    Request::BackendRemove {
                        group: d.group.clone(),
                        address: crate::config::BackendName {
                            port: None,
                            ..d.backend
                        },
                        port: d.backend.port,
                    },
                ));
            }
        }
        for (i, removal) in removals {
            let response = self.runtime_change(&removal);
            if !response.ok {
                let d = &mut self.state.drains[i];
                tracing::error!(
                    "drain of {}: the removal failed: {}",
                    d.describe(),
                    response.message
                );
                d.phase = DrainPhase::RemoveFailed;
                d.note = Some(response.message);
            }
        }
        // Keep the latest finished drains, and every one under way.
        let finished = self.state.drains.iter().filter(|d| d.finished()).count();
        let mut drop_finished = finished.saturating_sub(crate::applied::FINISHED_DRAINS_LISTED);
        self.state.drains.retain(|d| {
            if drop_finished > 0 && d.finished() {
                drop_finished -= 1;
                false
            } else {
                true
            }
        });
        if changed {
            if let Err(e) = self.publish() {
                tracing::error!("publishing the drains failed: {e:#}");
            }
        }
    }

    /// Moves the backends in slow start to their next step: each step rebuilds the rings of
    /// the backend's listener (established flows keep their backends).
    fn check_slow_starts(&mut self) {
        let now = std::time::Instant::now();
        let mut stepped = Vec::new();
        for (key, status) in self.health.iter_mut() {
            let Some(percent) = status.slow_start_percent else {
                self.slow_start_began.remove(key);
                continue;
            };
            let slow_start = slow_start_of(&self.config, key).filter(|_| status.healthy);
            let began = *self.slow_start_began.entry(key.clone()).or_insert_with(|| {
                // Adopted from a previous run: on from the start of its step.
                now - slow_start.map_or(Duration::ZERO, |d| slow_start_elapsed(percent, d))
            });
            let next = slow_start.and_then(|d| slow_start_percent(now - began, d));
            if next != Some(percent) {
                status.slow_start_percent = next;
                stepped.push((key.clone(), percent));
            }
        }
        for (key, percent) in &stepped {
            match self.health[key].slow_start_percent {
                Some(p) => {
                    tracing::info!(listener = %key.listener, backend = %key.endpoint(), percent = p, "slow start: next step")
                }
                None => {
                    tracing::info!(listener = %key.listener, backend = %key.endpoint(), "slow start done: full weight")
                }
            }
            if let Err(e) = self
                .reconciler
                .apply_verdict(&self.config, &self.health, key)
            {
                // Stays where the rings are: the next tick tries the step again.
                tracing::error!("applying a slow start step to the data plane failed: {e:#}");
                if let Some(status) = self.health.get_mut(key) {
                    status.slow_start_percent = Some(*percent);
                }
            }
        }
        if !stepped.is_empty() {
            if let Err(e) = self.publish() {
                tracing::error!("publishing the state after a slow start step failed: {e:#}");
            }
        }
    }

    fn health_changed(&mut self, event: HealthEvent) {
        let Some(status) = self.health.get_mut(&event.key) else {
            return; // a check that was stopped meanwhile
        };
        if unix_ns(event.at) < status.since_unix_ns {
            // From a checker stopped before this status began (the backend removed and added
            // again meanwhile): not about it.
            return;
        }
        let key = &event.key;
        if event.healthy == status.healthy {
            // The first checks confirmed the verdict it started with (healthy at start, or
            // unhealthy when added): the rings stay as they are, but what waits for real
            // verdicts (the announcements) may go on.
            tracing::info!(listener = %key.listener, backend = %key.endpoint(), reason = %event.reason, healthy = event.healthy, "backend's first checks confirm its verdict");
            status.confirmed = true;
            status.reason = event.reason;
        } else {
            if event.healthy {
                tracing::info!(listener = %key.listener, backend = %key.endpoint(), reason = %event.reason, "backend is healthy");
            } else {
                tracing::warn!(listener = %key.listener, backend = %key.endpoint(), reason = %event.reason, "backend is unhealthy");
            }
            // A backend that comes back (or in, once added) ramps up when its group says so.
            let slow_start_percent = slow_start_of(&self.config, key)
                .filter(|_| event.healthy)
                .and_then(|d| slow_start_percent(Duration::ZERO, d));
            self.slow_start_began
                .insert(key.clone(), std::time::Instant::now());
            *status = HealthStatus {
                healthy: event.healthy,
                reason: event.reason,
                since_unix_ns: unix_ns(event.at),
                confirmed: true,
                slow_start_percent,
            };
        }
        // The verdict's listener only: its flag (and ring) in the maps, or its proxy snapshot.
        if let Err(e) = self
            .reconciler
            .apply_verdict(&self.config, &self.health, &event.key)
        {
            tracing::error!("applying a health change to the data plane failed: {e:#}");
        }
        self.proxy
            .apply_verdict(&self.config, &self.health, &event.key.listener);
        if let Err(e) = self.publish() {
            tracing::error!("publishing the state after a health change failed: {e:#}");
        }
        let group_without_healthy = self.reconciler.state().listeners.iter().find(|l| {
            l.health_check
                && self
                    .reconciler
                    .state()
                    .backends
                    .iter()
                    .filter(|b| b.key.listener == l.name)
                    .all(|b| b.health.as_ref().is_some_and(|h| !h.healthy))
        });
        if let Some(l) = group_without_healthy {
            tracing::warn!(listener = %l.name, group = %l.group, "no healthy backend left in the group");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_steps_up_by_quarters_of_its_duration() {
        let d = Duration::from_secs(40);
        let at = |s: u64| slow_start_percent(Duration::from_secs(s), d);
        assert_eq!(
            [
                at(0),
                at(9),
                at(10),
                at(19),
                at(20),
                at(30),
                at(39),
                at(40),
                at(400)
            ],
            [
                Some(10),
                Some(10),
                Some(25),
                Some(25),
                Some(50),
                Some(75),
                Some(75),
                None,
                None
            ]
        );
        for percent in SLOW_START_STEPS {
            let from = slow_start_elapsed(percent, d);
            assert_eq!(
                slow_start_percent(from, d),
                Some(percent),
                "a restart goes on at {percent}"
            );
        }
    }
}
