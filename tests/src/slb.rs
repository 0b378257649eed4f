//! The `slb` daemon under test: where its binary is, and the one driver that runs it in a
//! namespace ([`Instance`]: a config file and every `slb run` started for it; [`SlbDaemon`]: an
//! instance with one daemon, started and waited for). What it reports is read into slb's own
//! types ([`Status`], [`AppliedState`]).

use std::fs::{self, File};
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::config::SlbConfig;
use crate::exec;
use anyhow::{bail, ensure, Context as _};
pub use slb_user::applied::{AppliedState, HealthStatus, Role};
pub use slb_user::instance::{pin_dir, state_dir, state_file};
pub use slb_user::links::InterfaceState;
pub use slb_user::status::{BackendStatus, ListenerStatus, Status};

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// An instance name no other test (in this or a concurrent process) uses: `<tag>-<pid>-<n>`.
pub fn unique_instance(tag: &str) -> String {
    let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// Path of the `slb` binary: `$SLB_BIN` if set, else `slb` next to the running executable's
/// profile directory (`target/<profile>/`, also when the executable is a test binary in
/// `deps/`), else `target/<profile>/slb` under the workspace root. Panics with a hint if none
/// exists.
pub fn slb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SLB_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SLB_BIN={} does not exist; build it with `cargo build -p slb-user`",
            path.display()
        );
        return path;
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(mut dir) = exe.parent().map(Path::to_path_buf) {
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.pop();
            }
            candidates.push(dir.join("slb"));
        }
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("slb-tests lives inside the workspace");
    candidates.push(workspace.join("target").join(profile).join("slb"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the slb binary is missing (looked at {}); build it with `cargo build -p slb-user` \
                 or point SLB_BIN at it",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// How long a start (program load and attach, or adoption, and the first apply) may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reload may take.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon has to exit after SIGTERM or `slb stop`.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// What the daemon logs once it serves (after attaching and applying the config).
pub const READY_LINE: &str = "slb ready";

/// One `slb run` process with its own log file. Dropping it kills the process (SIGKILL) if it
/// still runs; [`SlbDaemon`] stops its daemon with SIGTERM first.
#[derive(Debug)]
pub struct DaemonProcess {
    pub label: String,
    child: Option<Child>,
    log_path: PathBuf,
    /// When the process was started.
    pub spawned_at: Instant,
}

impl DaemonProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    pub fn log_block(&self) -> String {
        format!(
            "---- slb log ({}) ----\n{}---- end of slb log ----",
            self.label,
            self.log()
        )
    }

    /// How often `needle` occurs in the log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{}: not running", self.label),
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits until `needle` occurs at least `count` times in the log. Fails (with the log) if
    /// the process exits or `timeout` passes first.
    pub fn wait_for_log(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_until(
            timeout,
            Duration::from_millis(10),
            || format!("log {needle:?} {count} time(s)"),
            |daemon| (daemon.log_count(needle) >= count).then_some(()),
        )
    }

    /// Polls `ready` every `every` until it gives a value. Fails, naming `what` it waited for
    /// (`log "x" 2 time(s)`, said after "before" and "did not") and with the log, if the process
    /// exits or `timeout` passes first.
    pub fn wait_until<T>(
        &mut self,
        timeout: Duration,
        every: Duration,
        what: impl Fn() -> String,
        mut ready: impl FnMut(&mut Self) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = ready(self) {
                return Ok(value);
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before it would {}\n{}",
                    self.label,
                    what(),
                    self.log_block()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not {} within {timeout:?}\n{}",
                    self.label,
                    what(),
                    self.log_block()
                );
            }
            std::thread::sleep(every);
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.label,
                    self.log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal`; fails if the process has already exited.
    pub fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!(
                "{} already exited ({status})\n{}",
                self.label,
                self.log_block()
            );
        }
        let pid = libc::pid_t::try_from(self.pid().context("no child")?)?;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped child, so
        // the id cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// SIGKILL, as in a crash; returns once the process is reaped.
    pub fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// SIGTERM; returns the exit status (SIGKILL and an error after [`EXIT_TIMEOUT`]). Fails if
    /// the process has already exited.
    pub fn sigterm(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match self.wait_exit(EXIT_TIMEOUT) {
            Ok(status) => Ok(status),
            Err(e) => {
                let _ = self.signal(libc::SIGKILL);
                let _ = self.wait_exit(EXIT_TIMEOUT);
                Err(e.context(format!("{} was killed", self.label)))
            }
        }
    }

    /// [`sigterm`](Self::sigterm), or the exit status if the process has already exited.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        match self.try_wait()? {
            Some(status) => Ok(status),
            None => self.sigterm(),
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// An slb instance under test: its config file and every `slb run` started for it, each with
/// its own log. The logs of all its daemons are printed if the test panics. With
/// [`stop_on_drop`](Self::stop_on_drop) (for a data plane that outlives its daemons,
/// `--keep-serving`), dropping it ends whatever runs with `slb stop`, so the XDP links and pins
/// never outlive the test (the topology must be dropped after it).
#[derive(Debug)]
pub struct Instance {
    pub bin: PathBuf,
    pub netns: String,
    pub instance: String,
    /// Holds the config file and the logs; removed on drop.
    dir: tempfile::TempDir,
    config_path: PathBuf,
    /// Every daemon started so far; the last one is the current.
    daemons: Vec<DaemonProcess>,
    stop_on_drop: bool,
}

impl Instance {
    /// Writes `toml` (which must name `instance`) to a temporary config file.
    pub fn new(bin: &Path, netns: &str, instance: &str, toml: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("slb-{instance}-"))
            .tempdir()
            .context("creating the instance's temporary directory")?;
        let config_path = dir.path().join("slb.toml");
        let me = Instance {
            bin: bin.to_owned(),
            netns: netns.to_owned(),
            instance: instance.to_owned(),
            dir,
            config_path,
            daemons: Vec::new(),
            stop_on_drop: false,
        };
        me.write_config(toml)?;
        Ok(me)
    }

    /// On drop, run `slb stop` for whatever of the instance is left (daemons, pins, state).
    pub fn stop_on_drop(mut self) -> Self {
        self.stop_on_drop = true;
        self
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the config file (a daemon reads it on its next reload); written and renamed, so
    /// a daemon never reads a half-written file.
    pub fn write_config(&self, toml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join("slb.toml.new");
        fs::write(&tmp, toml).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.config_path)
            .with_context(|| format!("replacing {}", self.config_path.display()))
    }

    pub fn state_path(&self) -> PathBuf {
        state_file(&self.instance)
    }

    /// Generation in the state file, if it exists and parses.
    pub fn generation(&self) -> Option<u64> {
        applied_state(&self.instance).map(|s| s.generation)
    }

    /// Starts `slb --netns <ns> run -c <config> <extra_args...>` with `env` added, logging to
    /// its own file, without waiting for anything.
    pub fn spawn(
        &mut self,
        extra_args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<&mut DaemonProcess> {
        let n = self.daemons.len() + 1;
        let label = format!("daemon #{n} of instance {}", self.instance);
        let log_path = self.dir.path().join(format!("slb-{n}.log"));
        let log = File::create(&log_path).context("creating the daemon log")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--netns")
            .arg(&self.netns)
            .arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let spawned_at = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.daemons.push(DaemonProcess {
            label,
            child: Some(child),
            log_path,
            spawned_at,
        });
        Ok(self.current())
    }

    /// [`spawn`](Self::spawn), then waits until the daemon logs that it is ready (it has
    /// attached and applied the config, and published its state).
    pub fn start(
        &mut self,
        extra_args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<&mut DaemonProcess> {
        let daemon = self.spawn(extra_args, env)?;
        daemon.wait_for_log(READY_LINE, 1, START_TIMEOUT)?;
        Ok(daemon)
    }

    /// The daemon started last.
    pub fn current(&mut self) -> &mut DaemonProcess {
        self.daemons.last_mut().expect("no daemon started yet")
    }

    pub fn daemons(&self) -> &[DaemonProcess] {
        &self.daemons
    }

    /// Waits until the state file reports at least generation `n`. Fails if the current daemon
    /// exits or `timeout` passes first; the error includes its log.
    pub fn wait_generation(&mut self, n: u64, timeout: Duration) -> anyhow::Result<u64> {
        let instance = self.instance.clone();
        let generation = || applied_state(&instance).map(|s| s.generation);
        self.current().wait_until(
            timeout,
            Duration::from_millis(50),
            || {
                format!(
                    "reach generation {n} (state file {}, now {:?})",
                    state_file(&instance).display(),
                    generation()
                )
            },
            |_| generation().filter(|&g| g >= n),
        )
    }

    /// Runs `slb --netns <ns> <args...>` to completion (whatever its exit status) and returns
    /// what it did, e.g. `inst.cli(["reload", "-i", &inst.instance])`.
    pub fn cli<I, S>(&self, args: I) -> anyhow::Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        slb_cli(&self.bin, &self.netns, args)
    }

    /// `slb --netns <ns> status --instance <name> --json`, read into slb's own [`Status`].
    pub fn status(&self) -> anyhow::Result<Status> {
        let out = self.cli(["status", "--instance", &self.instance, "--json"])?;
        let text = out.expect_success()?;
        serde_json::from_str(text).with_context(|| format!("slb status printed no status: {text}"))
    }

    /// `slb stop -i <instance>`; afterwards no daemon of the instance runs.
    pub fn stop(&mut self) -> anyhow::Result<CliOutput> {
        let out = self.cli(["stop", "-i", &self.instance])?;
        for d in &mut self.daemons {
            if d.running() {
                d.wait_exit(EXIT_TIMEOUT)?;
            }
        }
        Ok(out)
    }

    /// What [`stop_on_drop`](Self::stop_on_drop) does: `slb stop` for whatever of the instance
    /// is left, then SIGKILL for a daemon that did not go, and its pins and state removed.
    fn clean_up(&mut self) {
        let anything_left = pin_dir(&self.instance).exists()
            || state_dir(&self.instance).exists()
            || self.daemons.iter_mut().any(DaemonProcess::running);
        if !anything_left {
            return;
        }
        match self.stop() {
            Ok(out) if !out.success() && pin_dir(&self.instance).exists() => {
                eprintln!("warning: cleaning up instance {}: {out}", self.instance)
            }
            Err(e) => eprintln!("warning: cleaning up instance {}: {e:#}", self.instance),
            _ => {}
        }
        // A daemon that did not go in time was killed: remove what it left.
        for d in &mut self.daemons {
            if d.running() {
                let _ = d.signal(libc::SIGKILL);
                let _ = d.wait_exit(EXIT_TIMEOUT);
            }
        }
        if pin_dir(&self.instance).exists() {
            let _ = self.cli(["stop", "-i", &self.instance]);
        }
        let _ = fs::remove_dir_all(state_dir(&self.instance));
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.clean_up();
        }
        if std::thread::panicking() {
            for d in &self.daemons {
                eprintln!("{}", d.log_block());
            }
        }
        // Whatever still runs is killed by DaemonProcess's drop.
    }
}

/// An [`Instance`] with one `slb --netns <ns> run -c <config>`, started and waited for.
/// Dropping it stops the daemon (SIGTERM, then SIGKILL); if the thread is panicking, the
/// daemon's log is printed.
#[derive(Debug)]
pub struct SlbDaemon {
    inst: Instance,
}

impl SlbDaemon {
    /// Writes `config` to a temporary file, starts `bin --netns <netns> run -c <file>` and
    /// waits until the daemon is ready.
    pub fn start(bin: &Path, netns: &str, config: &SlbConfig) -> anyhow::Result<Self> {
        Self::start_toml(bin, netns, config.instance(), &config.to_toml())
    }

    /// [`SlbDaemon::start`] with the Prometheus endpoint on a port free in `netns`, which it
    /// returns with the daemon.
    pub fn start_with_prometheus(
        bin: &Path,
        netns: &str,
        config: &SlbConfig,
    ) -> anyhow::Result<(Self, u16)> {
        // The namespace is fresh, but ask its kernel anyway.
        let port = exec::in_netns(netns, || {
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
        })??
        .port();
        let mut config = config.clone();
        config.metrics.prometheus_port = Some(port);
        let daemon = Self::start(bin, netns, &config)?;
        Ok((daemon, port))
    }

    /// [`start`](Self::start) with the config given as TOML text (e.g. one with values
    /// [`SlbConfig`] cannot hold); `instance` must be the one the text names.
    pub fn start_toml(bin: &Path, netns: &str, instance: &str, toml: &str) -> anyhow::Result<Self> {
        Self::start_toml_with(bin, netns, instance, toml, &[])
    }

    /// [`start_toml`](Self::start_toml) with extra `slb run` options, e.g.
    /// `["--worker-threads", "1"]`.
    pub fn start_toml_with(
        bin: &Path,
        netns: &str,
        instance: &str,
        toml: &str,
        run_options: &[&str],
    ) -> anyhow::Result<Self> {
        let mut daemon = SlbDaemon {
            inst: Instance::new(bin, netns, instance, toml)?,
        };
        // The instance name is unique to this run, so a state file left there is stale.
        let state = daemon.state_path();
        if state.exists() {
            fs::remove_file(&state)
                .with_context(|| format!("removing stale {}", state.display()))?;
        }
        daemon.inst.start(run_options, &[])?;
        Ok(daemon)
    }

    pub fn instance(&self) -> &str {
        &self.inst.instance
    }

    /// Namespace the daemon runs in.
    pub fn netns(&self) -> &str {
        &self.inst.netns
    }

    /// Process id of the running daemon, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.inst.daemons.last().and_then(DaemonProcess::pid)
    }

    /// The `slb` binary the daemon runs.
    pub fn bin(&self) -> &Path {
        &self.inst.bin
    }

    /// Runs `slb --netns <ns> <args...>` to completion (whatever its exit status) and returns
    /// what it did, e.g. `daemon.cli(["reload", "-i", daemon.instance()])`.
    pub fn cli<I, S>(&self, args: I) -> anyhow::Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.inst.cli(args)
    }

    /// Sends SIGHUP without waiting for anything (see [`reload`](Self::reload) for a reload
    /// that must apply).
    pub fn sighup(&mut self) -> anyhow::Result<()> {
        self.inst.current().signal(libc::SIGHUP)
    }

    /// How often `needle` occurs in the daemon's log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.process().log_count(needle)
    }

    /// Waits until `needle` occurs at least `count` times in the daemon's log. Fails (with the
    /// log) if the daemon exits or `timeout` passes first.
    pub fn wait_for_log(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.inst.current().wait_for_log(needle, count, timeout)
    }

    pub fn config_path(&self) -> &Path {
        self.inst.config_path()
    }

    pub fn state_path(&self) -> PathBuf {
        self.inst.state_path()
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        self.process().log()
    }

    /// Generation in the state file, if the file exists and parses.
    pub fn generation(&self) -> Option<u64> {
        self.inst.generation()
    }

    /// Waits until the state file reports at least generation `n`. Fails if the daemon exits
    /// or `timeout` passes first; the error includes the daemon's log.
    pub fn wait_generation(&mut self, n: u64, timeout: Duration) -> anyhow::Result<u64> {
        self.inst.wait_generation(n, timeout)
    }

    /// Replaces the config file (the daemon reads it on the next reload).
    pub fn write_config(&mut self, config: &SlbConfig) -> anyhow::Result<()> {
        ensure!(
            config.instance() == self.instance(),
            "config is for instance {}, daemon runs {}",
            config.instance(),
            self.instance()
        );
        self.write_config_text(&config.to_toml())
    }

    /// Replaces the config file with raw text, e.g. to test a rejected reload.
    pub fn write_config_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.inst.write_config(text)
    }

    /// Sends SIGHUP and waits for the next generation, which it returns.
    pub fn reload(&mut self) -> anyhow::Result<u64> {
        let current = self
            .generation()
            .with_context(|| format!("no generation in {}", self.state_path().display()))?;
        self.sighup()?;
        self.wait_generation(current + 1, RELOAD_TIMEOUT)
            .context("waiting for the reload to apply")
    }

    /// [`write_config`](Self::write_config) then [`reload`](Self::reload).
    pub fn reload_with(&mut self, config: &SlbConfig) -> anyhow::Result<u64> {
        self.write_config(config)?;
        self.reload()
    }

    /// `slb --netns <ns> status --instance <name> --json`, read into slb's own [`Status`].
    pub fn status(&self) -> anyhow::Result<Status> {
        self.inst.status()
    }

    /// Waits (at most 5 s) until `slb status` shows proxy counter `name` at `want` (the daemon
    /// writes them once a second); returns what it shows at the end, 0 for a counter not shown.
    pub fn wait_proxy_counter(&self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let shown = self
                .status()
                .ok()
                .and_then(|s| s.proxy_counters.get(name).copied())
                .unwrap_or(0);
            if shown == want || Instant::now() > deadline {
                return shown;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `slb status --json` until the backend at `address` of `listener` reports
    /// `healthy == want`, and returns that status entry. Fails after `timeout`.
    pub fn wait_backend_health(
        &self,
        listener: &str,
        address: impl Into<IpAddr>,
        want: bool,
        timeout: Duration,
    ) -> anyhow::Result<BackendStatus> {
        let address = address.into();
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            let Some(backend) = status
                .backends
                .into_iter()
                .find(|b| b.listener == listener && b.address == address)
            else {
                bail!("slb status lists no backend {address} on listener {listener}");
            };
            if backend.healthy == want {
                return Ok(backend);
            }
            if Instant::now() >= deadline {
                bail!(
                    "backend {address} on listener {listener} did not become {} within {timeout:?}: {backend:#?}\n{}",
                    if want { "healthy" } else { "unhealthy" },
                    self.process().log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon with SIGTERM and returns how it exited (SIGKILL after 10 s).
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.inst.current().terminate()
    }

    fn process(&self) -> &DaemonProcess {
        self.inst
            .daemons
            .last()
            .expect("SlbDaemon starts its daemon")
    }
}

impl Drop for SlbDaemon {
    fn drop(&mut self) {
        // The instance prints the log if the thread is panicking.
        let daemon = self.inst.current();
        if daemon.running() {
            if let Err(e) = daemon.terminate() {
                eprintln!("warning: stopping slb: {e:#}");
            }
        }
    }
}

/// What a `slb` command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stderr on one line: its non-empty lines up to a backtrace, joined with " / " (anyhow
    /// prints the error chain as `Error: ...`, `Caused by:`, one cause per line).
    pub fn error_summary(&self) -> String {
        self.stderr
            .lines()
            .take_while(|l| !l.starts_with("Stack backtrace:"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" / ")
    }

    /// Fails, showing the output, unless the command exited 0; returns stdout.
    pub fn expect_success(&self) -> anyhow::Result<&str> {
        ensure!(self.success(), "{self}");
        Ok(&self.stdout)
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// The entry of `slb status` for the backend at `address` as `listener` uses it.
pub fn status_backend<'a>(
    status: &'a Status,
    listener: &str,
    address: impl Into<IpAddr>,
) -> Option<&'a BackendStatus> {
    let address = address.into();
    status
        .backends
        .iter()
        .find(|b| b.listener == listener && b.address == address)
}

/// The listener named `name` in `slb status`.
pub fn status_listener<'a>(status: &'a Status, name: &str) -> Option<&'a ListenerStatus> {
    status.listeners.iter().find(|l| l.name == name)
}

/// Unix time now, in nanoseconds (the unit of `health.since_unix_ns` and peer logs).
pub fn unix_ns_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The instance's state file (what its daemon applied), if it exists and parses.
pub fn applied_state(instance: &str) -> Option<AppliedState> {
    let text = fs::read_to_string(state_file(instance)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs `bin --netns <netns> <args...>` to completion, whatever its exit status.
pub fn slb_cli<I, S>(bin: &Path, netns: &str, args: I) -> anyhow::Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(bin);
    cmd.arg("--netns").arg(netns).args(args);
    let command = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command}"))?;
    Ok(CliOutput {
        command,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
