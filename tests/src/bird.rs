//! BIRD 2 daemons in test namespaces: each with its own config, control socket and log in a
//! directory of the test's, killed on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::exec::{self, ChildGuard};

/// One `bird` process in a namespace.
#[derive(Debug)]
pub struct Bird {
    ns: String,
    name: String,
    dir: PathBuf,
    child: Option<ChildGuard>,
}

impl Bird {
    /// Writes `config` to `<dir>/<name>.conf` and starts BIRD on it in `ns`, in the foreground
    /// (`-f`), its control socket at [`Bird::socket`]; returns once the socket answers.
    pub fn start(ns: &str, dir: &Path, name: &str, config: &str) -> anyhow::Result<Bird> {
        let mut bird = Bird {
            ns: ns.to_owned(),
            name: name.to_owned(),
            dir: dir.to_owned(),
            child: None,
        };
        std::fs::write(bird.config_path(), config)
            .with_context(|| format!("writing {}", bird.config_path().display()))?;
        bird.restart()?;
        Ok(bird)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(format!("{}.conf", self.name))
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(format!("{}.ctl", self.name))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The log BIRD wrote (the config sends it to [`Bird::log_path`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts BIRD (again, after [`Bird::kill9`]) on its config.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "BIRD {} already runs", self.name);
        let _ = std::fs::remove_file(self.socket());
        let config = self.config_path();
        let socket = self.socket();
        let pid_file = self.dir.join(format!("{}.pid", self.name));
        let child = exec::spawn_in(
            &self.ns,
            [
                "bird".as_ref(),
                "-f".as_ref(),
                "-c".as_ref(),
                config.as_os_str(),
                "-s".as_ref(),
                socket.as_os_str(),
                "-P".as_ref(),
                pid_file.as_os_str(),
            ],
        )?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.birdc("show status").is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!(
                    "BIRD {} in {} exited ({status}) at start; its log:\n{}",
                    self.name,
                    self.ns,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "BIRD {} in {} did not answer within 10 s",
                    self.name,
                    self.ns
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: no BGP notification goes out.
    pub fn kill9(&mut self) {
        // ChildGuard's drop is a SIGKILL and a wait.
        self.child = None;
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `birdc -s <socket> <command>`.
    pub fn birdc(&self, command: &str) -> anyhow::Result<String> {
        let mut args = vec![
            "birdc".to_string(),
            "-s".into(),
            self.socket().display().to_string(),
        ];
        args.extend(command.split_whitespace().map(str::to_owned));
        Ok(exec::run(
            std::process::Command::new(&args[0]).args(&args[1..]),
        )?)
    }
}
