//! The `slb` daemon under test: its config file, where its binary is, and a handle that runs it
//! in a namespace.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::config::SlbConfig;
use crate::exec;
use anyhow::{bail, ensure, Context as _};
pub use slb_user::applied::{AppliedState, HealthStatus, Role};
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

/// Directory where `slb` keeps the state of `instance`.
pub fn state_dir(instance: &str) -> PathBuf {
    Path::new("/run/slb").join(instance)
}

/// A running `slb --netns <ns> run -c <config>`. Dropping it stops the daemon (SIGTERM, then
/// SIGKILL); if the thread is panicking, the daemon's log is printed.
#[derive(Debug)]
pub struct SlbDaemon {
    bin: PathBuf,
    netns: String,
    instance: String,
    child: Option<Child>,
    /// Holds the config file and the log; removed on drop.
    dir: tempfile::TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
}

/// How long the first apply (program load and attach) may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reload may take.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon has to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl SlbDaemon {
    /// Writes `config` to a temporary file, starts `bin --netns <netns> run -c <file>` and
    /// waits until the daemon reports generation 1 in its state file.
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

    /// [`start`](Self::start) with the config given as TOML text (e.g. one with fields
    /// [`SlbConfig`] does not model); `instance` must be the one the text names.
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
        let dir = tempfile::Builder::new()
            .prefix(&format!("slb-{instance}-"))
            .tempdir()
            .context("creating the daemon's temporary directory")?;
        let config_path = dir.path().join("slb.toml");
        let log_path = dir.path().join("slb.log");
        let mut daemon = SlbDaemon {
            bin: bin.to_owned(),
            netns: netns.to_owned(),
            instance: instance.to_owned(),
            child: None,
            dir,
            config_path,
            log_path,
        };
        daemon.write_config_text(toml)?;
        // The instance name is unique to this run, so a state file left there is stale.
        let state = daemon.state_path();
        if state.exists() {
            fs::remove_file(&state)
                .with_context(|| format!("removing stale {}", state.display()))?;
        }
        let log = File::create(&daemon.log_path).context("creating the daemon log")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--netns")
            .arg(netns)
            .arg("run")
            .arg("-c")
            .arg(&daemon.config_path)
            .args(run_options)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        daemon.child = Some(child);
        daemon.wait_generation(1, START_TIMEOUT)?;
        Ok(daemon)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Namespace the daemon runs in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Process id of the running daemon, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The `slb` binary the daemon runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `slb --netns <ns> <args...>` to completion (whatever its exit status) and returns
    /// what it did, e.g. `daemon.cli(["reload", "-i", daemon.instance()])`.
    pub fn cli<I, S>(&self, args: I) -> anyhow::Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        slb_cli(&self.bin, &self.netns, args)
    }

    /// Sends SIGHUP without waiting for anything (see [`reload`](Self::reload) for a reload
    /// that must apply).
    pub fn sighup(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGHUP)
    }

    /// How often `needle` occurs in the daemon's log so far.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until `needle` occurs at least `count` times in the daemon's log. Fails (with the
    /// log) if the daemon exits or `timeout` passes first.
    pub fn wait_for_log(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_count(needle) >= count {
                return Ok(());
            }
            if let Some(status) = self.child_mut()?.try_wait()? {
                bail!(
                    "slb exited ({status}) before logging {needle:?} {count} time(s)\n{}",
                    self.log_block()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "slb did not log {needle:?} {count} time(s) within {timeout:?}\n{}",
                    self.log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_path(&self) -> PathBuf {
        state_dir(&self.instance).join("state.json")
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// Generation in the state file, if the file exists and parses.
    pub fn generation(&self) -> Option<u64> {
        applied_state(&self.instance).map(|s| s.generation)
    }

    /// Waits until the state file reports at least generation `n`. Fails if the daemon exits
    /// or `timeout` passes first; the error includes the daemon's log.
    pub fn wait_generation(&mut self, n: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.generation().filter(|&g| g >= n) {
                return Ok(g);
            }
            if let Some(status) = self.child_mut()?.try_wait()? {
                bail!(
                    "slb exited ({status}) before reaching generation {n}\n{}",
                    self.log_block()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "slb did not reach generation {n} within {timeout:?} (state file {}, now {:?})\n{}",
                    self.state_path().display(),
                    self.generation(),
                    self.log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Replaces the config file (the daemon reads it on the next reload).
    pub fn write_config(&mut self, config: &SlbConfig) -> anyhow::Result<()> {
        ensure!(
            config.instance() == self.instance,
            "config is for instance {}, daemon runs {}",
            config.instance(),
            self.instance
        );
        self.write_config_text(&config.to_toml())
    }

    /// Replaces the config file with raw text, e.g. to test a rejected reload.
    pub fn write_config_text(&mut self, text: &str) -> anyhow::Result<()> {
        // Write and rename, so the daemon never reads a half-written file.
        let tmp = self.dir.path().join("slb.toml.new");
        fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.config_path)
            .with_context(|| format!("replacing {}", self.config_path.display()))
    }

    /// Sends SIGHUP and waits for the next generation, which it returns.
    pub fn reload(&mut self) -> anyhow::Result<u64> {
        let current = self
            .generation()
            .with_context(|| format!("no generation in {}", self.state_path().display()))?;
        self.signal(libc::SIGHUP)?;
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
        let out = exec::run(
            Command::new(&self.bin)
                .arg("--netns")
                .arg(&self.netns)
                .args(["status", "--instance", &self.instance, "--json"]),
        )?;
        serde_json::from_str(&out).with_context(|| format!("slb status printed no status: {out}"))
    }

    /// Polls `slb status --json` until the backend at `address` of `listener` reports
    /// `healthy == want`, and returns that status entry. Fails after `timeout`.
    pub fn wait_backend_health(
        &self,
        listener: &str,
        address: Ipv4Addr,
        want: bool,
        timeout: Duration,
    ) -> anyhow::Result<BackendStatus> {
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
                    self.log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon with SIGTERM and returns how it exited (SIGKILL after 10 s).
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("slb is not running");
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        send_signal(&child, libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                bail!(
                    "slb did not exit within {STOP_TIMEOUT:?} of SIGTERM and was killed\n{}",
                    self.log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        let child = self.child_mut()?;
        if let Some(status) = child.try_wait()? {
            bail!("slb already exited ({status})\n{}", self.log_block());
        }
        send_signal(self.child_mut()?, signal)
    }

    fn child_mut(&mut self) -> anyhow::Result<&mut Child> {
        self.child.as_mut().context("slb is not running")
    }

    fn log_block(&self) -> String {
        format!(
            "---- slb log (instance {}) ----\n{}---- end of slb log ----",
            self.instance,
            self.log()
        )
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
    address: Ipv4Addr,
) -> Option<&'a BackendStatus> {
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

fn send_signal(child: &Child, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped child, so the
    // id cannot have been reused.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

impl Drop for SlbDaemon {
    fn drop(&mut self) {
        let stopped = if self.child.is_some() {
            self.terminate().map(|_| ())
        } else {
            Ok(())
        };
        if std::thread::panicking() {
            eprintln!("{}", self.log_block());
        }
        if let Err(e) = stopped {
            eprintln!("warning: stopping slb: {e:#}");
        }
    }
}

/// The instance's state file (what its daemon applied), if it exists and parses.
pub fn applied_state(instance: &str) -> Option<AppliedState> {
    let text = fs::read_to_string(state_dir(instance).join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Where slb pins an instance's maps, programs and links: `/sys/fs/bpf/slb/<instance>`.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/slb").join(instance)
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
