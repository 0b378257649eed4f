//! `slb run`: load, attach, apply the config, then serve signals until told to stop. SIGHUP
//! re-reads the file; a bad file is logged and the running config stays.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{AttachMode, Config};
use crate::dataplane::{detach_pinned, Dataplane};
use crate::maps::PinnedMaps;
use crate::reconcile::{AppliedState, Reconciler};

pub const STATE_ROOT: &str = "/run/slb";

pub fn state_file(instance: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(instance).join("state.json")
}

fn write_state(state: &AppliedState) -> anyhow::Result<()> {
    let path = state_file(&state.instance);
    let dir = path.parent().expect("state file has a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join("state.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

pub struct RunOptions {
    pub config: PathBuf,
    /// Leave programs attached and maps pinned on exit.
    pub keep_serving: bool,
}

pub fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&options.config)?;
    let mut dataplane = Dataplane::load(&config.instance, config.maglev_table_size)
        .context("loading the data plane")?;
    let mut daemon = match Daemon::start(&mut dataplane, &config) {
        Ok(d) => d,
        Err(e) => {
            let _ = dataplane.shutdown();
            return Err(e);
        }
    };
    tracing::info!(
        instance = %config.instance,
        listeners = config.listeners.len(),
        interfaces = ?daemon.interfaces.keys().collect::<Vec<_>>(),
        "slb ready"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hup.recv() => daemon.reload(&mut dataplane, &options.config),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        anyhow::Ok(())
    });

    let instance = config.instance.clone();
    if options.keep_serving {
        dataplane.keep_serving();
    } else {
        dataplane
            .shutdown()
            .context("detaching and removing pins")?;
        let _ = fs::remove_dir_all(Path::new(STATE_ROOT).join(&instance));
        tracing::info!(instance, "detached and unpinned; bye");
    }
    outcome
}

struct Daemon {
    reconciler: Reconciler,
    interfaces: BTreeMap<String, AttachMode>,
    instance: String,
}

impl Daemon {
    fn start(dataplane: &mut Dataplane, config: &Config) -> anyhow::Result<Daemon> {
        let maps = PinnedMaps::open(dataplane.dir())?;
        let mut daemon = Daemon {
            reconciler: Reconciler::new(maps, &config.instance, config.maglev_table_size),
            interfaces: BTreeMap::new(),
            instance: config.instance.clone(),
        };
        daemon.sync_interfaces(dataplane, config)?;
        let state = daemon.reconciler.apply(config)?;
        write_state(state)?;
        Ok(daemon)
    }

    fn sync_interfaces(
        &mut self,
        dataplane: &mut Dataplane,
        config: &Config,
    ) -> anyhow::Result<()> {
        let wanted: BTreeMap<String, AttachMode> = config
            .interfaces
            .iter()
            .map(|i| (i.name.clone(), i.mode))
            .collect();
        for (name, mode) in &wanted {
            match self.interfaces.get(name) {
                Some(m) if m == mode => {}
                Some(_) => {
                    detach_pinned(&self.instance, name)?;
                    self.interfaces.remove(name);
                    dataplane.attach(name, *mode)?;
                    self.interfaces.insert(name.clone(), *mode);
                }
                None => {
                    dataplane.attach(name, *mode)?;
                    self.interfaces.insert(name.clone(), *mode);
                }
            }
        }
        let gone: Vec<String> = self
            .interfaces
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            detach_pinned(&self.instance, &name)?;
            self.interfaces.remove(&name);
        }
        Ok(())
    }

    fn reload(&mut self, dataplane: &mut Dataplane, path: &Path) {
        match self.try_reload(dataplane, path) {
            Ok(generation) => tracing::info!(generation, "config reloaded"),
            Err(e) => tracing::error!("reload rejected, the running config stays: {e:#}"),
        }
    }

    fn try_reload(&mut self, dataplane: &mut Dataplane, path: &Path) -> anyhow::Result<u64> {
        let config = Config::load(path)?;
        if config.instance != self.instance {
            anyhow::bail!(
                "instance: cannot change from {:?} to {:?} while running; restart slb",
                self.instance,
                config.instance
            );
        }
        self.sync_interfaces(dataplane, &config)?;
        let state = self.reconciler.apply(&config)?;
        write_state(state)?;
        Ok(state.generation)
    }
}
