//! Shared pieces of the operations tests (`ops_*.rs`): an `slb run` started with extra
//! arguments and environment (`--keep-serving`, `NOTIFY_SOCKET`) that can be killed with
//! SIGKILL and restarted on the same config, and a guard that runs `slb stop` for an instance
//! whose data plane outlives its daemons.

#![allow(dead_code)] // each test file uses a different part

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
pub use slb_tests::slb::{pin_dir, slb_cli};
use slb_tests::slb::{state_dir, CliOutput, Status};

/// How long a start (load, attach or adopt, apply) may take.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon has to exit after SIGTERM or `slb stop`.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// What the daemon logs once it serves (after attaching and applying the config).
pub const READY_LINE: &str = "slb ready";
/// What a daemon logs when it takes over the pins of a previous run.
pub const ADOPT_LINE: &str = "adopting the pinned maps and links of a previous run";

/// One `slb run` process with its own log file. Dropping it kills the process (SIGKILL) if it
/// still runs; the [`Instance`] that started it cleans up the data plane.
#[derive(Debug)]
pub struct RunningDaemon {
    pub label: String,
    child: Option<Child>,
    log_path: PathBuf,
    /// When the process was started.
    pub spawned_at: Instant,
}

impl RunningDaemon {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

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

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{}: not started", self.label),
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle`; fails (with the log) if the process exits or
    /// `timeout` passes first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?}\n{}",
                    self.label,
                    self.log_block()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}\n{}",
                    self.label,
                    self.log_block()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
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

    pub fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!(
                "{} already exited ({status})\n{}",
                self.label,
                self.log_block()
            );
        }
        let pid = libc::pid_t::try_from(self.pid().context("no child")?)?;
        // SAFETY: `pid` is our own unreaped child, so the id cannot have been reused.
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

    /// SIGTERM; returns the exit status (SIGKILL and an error after [`EXIT_TIMEOUT`]).
    pub fn sigterm(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        match self.wait_exit(EXIT_TIMEOUT) {
            Ok(status) => Ok(status),
            Err(e) => {
                let _ = self.signal(libc::SIGKILL);
                let _ = self.wait_exit(EXIT_TIMEOUT);
                Err(e)
            }
        }
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// An slb instance whose data plane may outlive its daemons (`--keep-serving`): holds the
/// config file and the daemons' logs, and on drop ends whatever runs with `slb stop`, so the
/// XDP links and pins never outlive the test (the topology must be dropped after it). Logs of
/// every daemon are printed if the test panics.
pub struct Instance {
    pub bin: PathBuf,
    pub netns: String,
    pub instance: String,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    /// Every daemon started so far; the last one is the current.
    daemons: Vec<RunningDaemon>,
}

impl Instance {
    /// Writes `toml` (which must name `instance`) to a temporary config file.
    pub fn new(bin: &Path, netns: &str, instance: &str, toml: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("slb-ops-{instance}-"))
            .tempdir()?;
        let config_path = dir.path().join("slb.toml");
        let me = Instance {
            bin: bin.to_owned(),
            netns: netns.to_owned(),
            instance: instance.to_owned(),
            dir,
            config_path,
            daemons: Vec::new(),
        };
        me.write_config(toml)?;
        Ok(me)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn write_config(&self, toml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join("slb.toml.new");
        fs::write(&tmp, toml)?;
        fs::rename(&tmp, &self.config_path)?;
        Ok(())
    }

    pub fn state_path(&self) -> PathBuf {
        state_dir(&self.instance).join("state.json")
    }

    /// Generation in the state file, if it exists and parses.
    pub fn generation(&self) -> Option<u64> {
        let text = fs::read_to_string(self.state_path()).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        state.get("generation")?.as_u64()
    }

    /// Starts `slb --netns <ns> run -c <config> <extra_args...>` with `env` added, logging to
    /// its own file, without waiting for anything.
    pub fn spawn(
        &mut self,
        extra_args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<&mut RunningDaemon> {
        let n = self.daemons.len() + 1;
        let label = format!("daemon #{n} of instance {}", self.instance);
        let log_path = self.dir.path().join(format!("slb-{n}.log"));
        let log = File::create(&log_path)?;
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
        self.daemons.push(RunningDaemon {
            label,
            child: Some(child),
            log_path,
            spawned_at,
        });
        Ok(self.daemons.last_mut().expect("just pushed"))
    }

    /// [`spawn`](Self::spawn), then waits until the daemon logs that it is ready.
    pub fn start(
        &mut self,
        extra_args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<&mut RunningDaemon> {
        let daemon = self.spawn(extra_args, env)?;
        daemon.wait_for_log(READY_LINE, START_TIMEOUT)?;
        Ok(daemon)
    }

    /// The daemon started last.
    pub fn current(&mut self) -> &mut RunningDaemon {
        self.daemons.last_mut().expect("no daemon started yet")
    }

    pub fn daemons(&self) -> &[RunningDaemon] {
        &self.daemons
    }

    /// `slb --netns <ns> <args...>`.
    pub fn cli<I, S>(&self, args: I) -> anyhow::Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        slb_cli(&self.bin, &self.netns, args)
    }

    /// `slb status -i <instance> --json`, read into slb's own [`Status`].
    pub fn status(&self) -> anyhow::Result<Status> {
        let out = self.cli(["status", "-i", &self.instance, "--json"])?;
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
}

impl Drop for Instance {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let anything_left = pin_dir(&self.instance).exists()
            || state_dir(&self.instance).exists()
            || self.daemons.iter_mut().any(RunningDaemon::running);
        if anything_left {
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
        if panicking {
            for d in &self.daemons {
                eprintln!("{}", d.log_block());
            }
        }
        // Whatever still runs is killed by RunningDaemon's drop.
    }
}

/// `ip -n <ns> link show <iface>`.
pub fn link_show(netns: &str, iface: &str) -> String {
    slb_tests::exec::run(Command::new("ip").args(["-n", netns, "link", "show", iface]))
        .unwrap_or_else(|e| format!("(ip link show failed: {e})"))
}

/// `ip link` marks an attached XDP program with a mode flag (`xdp`, `xdpgeneric`, ...) and a
/// `prog/xdp id N` line.
pub fn has_xdp(link: &str) -> bool {
    link.contains("xdp")
}

/// `address:port -> new_connections` of the backends of `listener` in `slb status`.
pub fn backend_new_connections(status: &Status, listener: &str) -> Vec<(String, u64)> {
    status
        .backends
        .iter()
        .filter(|b| b.listener == listener)
        .map(|b| (format!("{}:{}", b.address, b.port), b.new_connections))
        .collect()
}

/// The new connections the listener named `listener` counted, per `slb status`.
pub fn listener_new_connections(status: &Status, listener: &str) -> u64 {
    slb_tests::slb::status_listener(status, listener).map_or(0, |l| l.new_connections)
}
