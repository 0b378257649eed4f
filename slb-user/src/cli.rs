//! The `slb` command line (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::AttachMode;

#[derive(Debug, Parser)]
#[command(name = "slb", version, about = "eBPF/XDP server load balancer")]
pub struct Cli {
    /// Run inside this network namespace (a name under /var/run/netns, or a path), as
    /// `ip netns exec` would but keeping the host's /sys/fs/bpf.
    #[arg(long, global = true, value_name = "NAME")]
    pub netns: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, attach and serve the config until SIGTERM/SIGINT; SIGHUP reloads the file.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// On exit, leave the programs attached and the maps pinned (traffic keeps flowing).
        #[arg(long)]
        keep_serving: bool,
    },
    /// Validate a config file and print what it defines.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show listeners, backends, weights, connections and counters of a running instance.
    Status {
        #[arg(short, long, default_value = "default")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach a running instance's program to one more interface.
    Attach {
        #[arg(short, long, default_value = "default")]
        instance: String,
        #[arg(long, value_name = "IF")]
        iface: String,
        #[arg(long, value_enum, default_value = "native")]
        mode: ModeArg,
    },
    /// Detach a running instance's program from an interface.
    Detach {
        #[arg(short, long, default_value = "default")]
        instance: String,
        #[arg(long, value_name = "IF")]
        iface: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    Native,
    Generic,
}

impl From<ModeArg> for AttachMode {
    fn from(m: ModeArg) -> AttachMode {
        match m {
            ModeArg::Native => AttachMode::Native,
            ModeArg::Generic => AttachMode::Generic,
        }
    }
}

/// Enters a network namespace for this thread and every thread it creates later.
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/var/run/netns").join(name)
    };
    let file = std::fs::File::open(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", path.display()),
        )
    })?;
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("entering network namespace {}: {e}", path.display()),
        ));
    }
    Ok(())
}
