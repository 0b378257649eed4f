//! The `slb` command line (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use std::str::FromStr as _;

use crate::config::{AttachMode, BackendName, EndpointSyntaxError};
use crate::explain::{parse_client, ListenerAddr};
use crate::instance::InstanceName;

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
        /// Threads of the L7 proxy, each serving its share of the connections; the default is
        /// the number of CPUs slb may run on. Health checks and the admin API run on a thread
        /// of their own.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
        worker_threads: Option<u16>,
    },
    /// Validate a config file and print what it defines.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Show listeners, backends, weights, connections and counters of a running instance.
    Status {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        #[arg(long)]
        json: bool,
    },
    /// Traffic per listener and backend (packets, bytes, new and current connections, health).
    Stats {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh every SECONDS (0.1 to 3600), with rates.
        #[arg(long, value_name = "SECONDS", value_parser = parse_watch_seconds)]
        watch: Option<f64>,
    },
    /// Which backend a flow goes to, and why: its connection-table entry, the half-open table,
    /// the active/standby rule, the client's persistence entry, or the slot of the listener's
    /// Maglev ring — read from the maps the data plane reads. With --without, also where it
    /// would go once that backend were removed.
    Explain {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        /// The client's address and source port (ADDR:PORT, IPv6 as [ADDR]:PORT); repeat it
        /// for several flows to the same listener, one answer each.
        #[arg(long = "from", value_name = "ADDR:PORT", required = true, value_parser = parse_client)]
        from: Vec<std::net::SocketAddr>,
        /// The listener: VIP:PORT/tcp or VIP:PORT/udp (IPv6 as [VIP]:PORT/tcp).
        #[arg(long, value_name = "VIP:PORT/PROTO", value_parser = ListenerAddr::from_str)]
        to: ListenerAddr,
        /// Also answer as if this backend of the listener were removed (ADDR or ADDR:PORT, as
        /// `slb backend remove` names it).
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = BackendName::from_str)]
        without: Option<BackendName>,
        /// A JSON array, one object per flow.
        #[arg(long)]
        json: bool,
    },
    /// Reports on what slb did.
    Report {
        #[command(subcommand)]
        report: ReportKind,
    },
    /// Attach a running instance's program to one more interface.
    Attach {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        #[arg(long, value_name = "IF")]
        iface: String,
        #[arg(long, value_enum, default_value = "native")]
        mode: ModeArg,
    },
    /// Change backends of a running instance (until the next reload of its config file).
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Full NAT flows: which client each SNAT address and port stands for (backends see only
    /// the SNAT address).
    Snat {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        /// Only the flows of this client address or SNAT address.
        #[arg(long, value_name = "ADDR")]
        address: Option<std::net::IpAddr>,
        #[arg(long)]
        json: bool,
    },
    /// On a backend of a tunnelling DSR listener (`dsr = "ipip"`): slb's decapsulator, which
    /// strips the outer header of packets from slb's tunnel sources to the VIPs.
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
    /// Re-read the config file of a running instance (drops runtime changes).
    Reload {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
    },
    /// Stop an instance for good: detach its program everywhere, remove its pins and state, and
    /// end its daemon (works on the pins alone when no daemon runs).
    Stop {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
    },
    /// Print shell completions for `slb`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) for `slb`.
    Manpage {
        /// Instead, write slb.1 and a page for each subcommand (slb-run.1, slb-backend-add.1,
        /// ...) into this directory, as the Debian package installs them.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Detach a running instance's program from an interface.
    Detach {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        #[arg(long, value_name = "IF")]
        iface: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReportKind {
    /// Each backend's share of new connections (L4) or requests (HTTP(S)) next to its weight
    /// share, the deviation and a verdict.
    Distribution {
        #[arg(short, long, default_value = "default")]
        instance: InstanceName,
        /// Only this listener.
        #[arg(long)]
        listener: Option<String>,
        /// Only the last DURATION (e.g. 10m, 1h); default: since the data plane started.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
}

/// Which backend of which group.
#[derive(Debug, clap::Args)]
pub struct BackendRef {
    #[arg(short, long, default_value = "default")]
    pub instance: InstanceName,
    /// Group name; `default` is the default server group.
    #[arg(long)]
    pub group: String,
    /// Backend address, with its port or without: 10.0.0.1, 10.0.0.1:8080, 2001:db8::1,
    /// [2001:db8::1] or [2001:db8::1]:8080.
    #[arg(long, value_parser = BackendName::from_str)]
    pub address: BackendName,
    /// Backend port, when the address has none (omit both for default-group backends that use
    /// the listener's port).
    #[arg(long)]
    pub port: Option<u16>,
}

impl BackendRef {
    /// The instance, the group and the backend, its port from `--address` or `--port`.
    fn resolve(self) -> Result<(InstanceName, String, BackendName), EndpointSyntaxError> {
        let backend = self.address.with_port(self.port)?;
        Ok((self.instance, self.group, backend))
    }
}

#[derive(Debug, Subcommand)]
pub enum BackendAction {
    /// Add a backend to a group; it takes new connections at once, or, on a listener with
    /// health checks, once it has passed them.
    Add {
        #[command(flatten)]
        backend: BackendRef,
        /// Its weight (0: added drained).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = parse_weight)]
        weight: u32,
        /// TCP/UDP: open connections past which it takes no new flow (default: no limit).
        #[arg(long)]
        max_connections: Option<u32>,
    },
    /// Remove a backend from a group; its established flows are re-balanced.
    Remove {
        #[command(flatten)]
        backend: BackendRef,
    },
    /// Drain a backend: weight 0 (no new connections, established ones kept) until its
    /// connections are gone or the deadline passes; then, with --remove, remove it. Waits and
    /// reports progress unless --no-wait; fails if connections are left at the deadline.
    Drain {
        #[command(flatten)]
        backend: BackendRef,
        /// How long to wait for its connections to end (e.g. 60s, 10m; at most 24h).
        #[arg(long, default_value = "60s", value_parser = parse_drain_timeout)]
        timeout: std::time::Duration,
        /// Remove it from the group once drained, or at the deadline (ending what is left).
        #[arg(long)]
        remove: bool,
        /// Return once the drain has begun; `slb status` follows it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Change a backend's weight (0 drains it: no new connections, established ones kept).
    SetWeight {
        #[command(flatten)]
        backend: BackendRef,
        /// The new weight.
        #[arg(long, allow_negative_numbers = true, value_parser = parse_weight)]
        weight: u32,
    },
}

impl BackendAction {
    /// The instance and the admin-API request this action sends. The request carries the port
    /// in `port` and the bare address in `address`, as daemons before `[A]:P` addresses read it.
    pub fn request(self) -> Result<(InstanceName, crate::api::Request), EndpointSyntaxError> {
        use crate::api::Request;
        let bare = |backend: BackendName| BackendName {
            port: None,
            ..backend
        };
        Ok(match self {
            BackendAction::Add {
                backend,
                weight,
                max_connections,
            } => {
                let (instance, group, b) = backend.resolve()?;
                let request = Request::BackendAdd {
                    group,
                    address: bare(b),
                    port: b.port,
                    weight,
                    max_connections,
                };
                (instance, request)
            }
            BackendAction::Remove { backend } => {
                let (instance, group, b) = backend.resolve()?;
                let request = Request::BackendRemove {
                    group,
                    address: bare(b),
                    port: b.port,
                };
                (instance, request)
            }
            BackendAction::Drain {
                backend,
                timeout,
                remove,
                ..
            } => {
                let (instance, group, b) = backend.resolve()?;
                let request = Request::BackendDrain {
                    group,
                    address: bare(b),
                    port: b.port,
                    timeout_s: timeout.as_secs(),
                    remove,
                };
                (instance, request)
            }
            BackendAction::SetWeight { backend, weight } => {
                let (instance, group, b) = backend.resolve()?;
                let request = Request::BackendSetWeight {
                    group,
                    address: bare(b),
                    port: b.port,
                    weight,
                };
                (instance, request)
            }
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum DecapAction {
    /// Attach the decapsulator to an interface (or, when it is attached, replace what it
    /// accepts). It stays attached after the command exits.
    Attach {
        #[arg(long, value_name = "IF")]
        iface: String,
        /// An slb node's tunnel source address whose tunnelled packets are taken apart
        /// (repeat for several nodes).
        #[arg(long = "source", value_name = "ADDR", required = true)]
        sources: Vec<std::net::IpAddr>,
        /// A VIP this backend serves (repeat for several); it must also be on a local
        /// interface, e.g. `ip addr add VIP/32 dev lo`.
        #[arg(long = "vip", value_name = "ADDR", required = true)]
        vips: Vec<std::net::IpAddr>,
        #[arg(long, value_enum, default_value = "native")]
        mode: ModeArg,
    },
    /// Detach the decapsulator from an interface.
    Detach {
        #[arg(long, value_name = "IF")]
        iface: String,
    },
    /// What the decapsulator on an interface accepts, and its counters.
    Status {
        #[arg(long, value_name = "IF")]
        iface: String,
        #[arg(long)]
        json: bool,
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

fn parse_watch_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&seconds) {
        return Err(format!("{text} is not between 0.1 and 3600 seconds"));
    }
    Ok(seconds)
}

/// Longest `slb backend drain --timeout`.
const MAX_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn parse_drain_timeout(text: &str) -> Result<std::time::Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if timeout < std::time::Duration::from_secs(1) || timeout > MAX_DRAIN_TIMEOUT {
        return Err(format!("{text:?}: a drain's timeout is 1s to 24h"));
    }
    Ok(timeout)
}

fn parse_weight(text: &str) -> Result<u32, String> {
    let value: i64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if value < 0 {
        return Err(format!(
            "{value} is negative; weights are 0 (drain) to {}",
            crate::config::MAX_WEIGHT
        ));
    }
    if value > i64::from(crate::config::MAX_WEIGHT) {
        return Err(format!(
            "{value} is above the maximum {}",
            crate::config::MAX_WEIGHT
        ));
    }
    Ok(value as u32)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_takes_a_finite_interval_within_bounds() {
        for bad in ["inf", "NaN", "0", "0.05", "3601", "-1", "soon"] {
            let e = Cli::try_parse_from(["slb", "stats", &format!("--watch={bad}")])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--watch"), "{bad}: {e}");
            assert!(
                e.contains("between 0.1 and 3600") || e.contains("not a number"),
                "{bad}: {e}"
            );
        }
        let ok = Cli::try_parse_from(["slb", "stats", "--watch", "0.5"]).unwrap();
        assert!(matches!(ok.command, Command::Stats { watch: Some(w), .. } if w == 0.5));
    }

    #[test]
    fn explain_takes_flows_and_a_listener_and_names_bad_syntax() {
        let cli = Cli::try_parse_from([
            "slb",
            "explain",
            "--from",
            "198.51.100.7:40000",
            "--from",
            "[2001:db8::7]:1",
            "--to",
            "192.0.2.10:80/tcp",
            "--without",
            "10.0.0.2:8080",
        ])
        .unwrap();
        let Command::Explain {
            instance,
            from,
            to,
            without,
            json,
        } = cli.command
        else {
            unreachable!("an explain command")
        };
        assert_eq!(instance.as_str(), "default");
        assert_eq!(from.len(), 2);
        assert_eq!(to.to_string(), "192.0.2.10:80/tcp");
        assert_eq!(without.unwrap().to_string(), "10.0.0.2:8080");
        assert!(!json);

        let error = |args: &[&str]| {
            let mut argv = vec!["slb", "explain"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap_err().to_string()
        };
        let e = error(&["--from", "198.51.100.7", "--to", "192.0.2.10:80/tcp"]);
        assert!(
            e.contains("--from") && e.contains("expected ADDR:PORT"),
            "{e}"
        );
        let e = error(&["--from", "198.51.100.7:1", "--to", "192.0.2.10:80"]);
        assert!(
            e.contains("--to") && e.contains("expected VIP:PORT/tcp"),
            "{e}"
        );
        let e = error(&["--to", "192.0.2.10:80/udp"]);
        assert!(e.contains("--from"), "{e}");
    }

    fn backend_request(args: &[&str]) -> Result<String, String> {
        let mut argv = vec!["slb", "backend", "remove", "--group", "pool"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Backend { action } = cli.command else {
            unreachable!("a backend command")
        };
        let (_, request) = action.request().map_err(|e| e.to_string())?;
        Ok(serde_json::to_string(&request).unwrap())
    }

    #[test]
    fn backend_addresses_take_an_optional_port_in_both_families() {
        let sent = |address: &str, port: &str| {
            format!(
                r#"{{"command":"backend-remove","group":"pool","address":"{address}","port":{port}}}"#
            )
        };
        let cases: [(&[&str], String); 7] = [
            (&["--address", "10.0.1.2"], sent("10.0.1.2", "null")),
            (
                &["--address", "10.0.1.2", "--port", "8080"],
                sent("10.0.1.2", "8080"),
            ),
            (&["--address", "10.0.1.2:8080"], sent("10.0.1.2", "8080")),
            (&["--address", "2001:db8::2"], sent("2001:db8::2", "null")),
            (
                &["--address", "[2001:db8::2]", "--port", "8080"],
                sent("2001:db8::2", "8080"),
            ),
            (
                &["--address", "2001:db8::2", "--port", "8080"],
                sent("2001:db8::2", "8080"),
            ),
            (
                &["--address", "[2001:db8::2]:8080"],
                sent("2001:db8::2", "8080"),
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(backend_request(args), Ok(expected), "{args:?}");
        }
        let e = backend_request(&["--address", "[2001:db8::2]:8080", "--port", "80"]).unwrap_err();
        assert_eq!(
            e,
            "the port is given twice, in the address [2001:db8::2]:8080 and as the port 80; give it once"
        );
        let e = backend_request(&["--address", "2001:db8::2]:80"]).unwrap_err();
        assert!(
            e.contains("--address") && e.contains("is not an address or address:port"),
            "{e}"
        );
    }
}
