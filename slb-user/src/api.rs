//! The admin API: JSON lines over a root-only unix socket (/run/slb/<instance>/admin.sock, mode
//! 0600). The daemon applies each request to its running config; the CLI is a thin client.
//!
//! Rule: the config file is the source of truth. Changes made through the API apply at once on
//! top of it, show in `slb status` (under `runtime_changes`), and last until the next reload of
//! the file (SIGHUP or `slb reload`), which drops them. Write a change into the file to keep it.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::{BackendSpec, Config, DEFAULT_GROUP};
use crate::instance::socket_path;

const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    BackendAdd {
        group: String,
        address: IpAddr,
        port: Option<u16>,
        weight: u32,
    },
    BackendRemove {
        group: String,
        address: IpAddr,
        port: Option<u16>,
    },
    BackendSetWeight {
        group: String,
        address: IpAddr,
        port: Option<u16>,
        weight: u32,
    },
    /// Re-read the config file, dropping runtime changes.
    Reload,
    /// Detach, remove the pins and exit (even when running with `--keep-serving`).
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    /// Config generation after the request.
    pub generation: u64,
}

fn describe(address: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{address}:{p}"),
        None => address.to_string(),
    }
}

/// Applies a backend request to a copy of `config`; returns the new config and a description of
/// the change, or an error naming what is wrong. The result is validated as a whole.
pub fn edit_config(config: &Config, request: &Request) -> Result<(Config, String), String> {
    let mut next = config.clone();
    let (group, address, port) = match request {
        Request::BackendAdd {
            group,
            address,
            port,
            ..
        }
        | Request::BackendRemove {
            group,
            address,
            port,
        }
        | Request::BackendSetWeight {
            group,
            address,
            port,
            ..
        } => (group, *address, *port),
        Request::Reload | Request::Stop => return Err("not a backend change".into()),
    };
    let backends = if group == DEFAULT_GROUP {
        &mut next.default_group.backends
    } else {
        let names: Vec<String> = next.groups.iter().map(|g| g.name.clone()).collect();
        &mut next
            .groups
            .iter_mut()
            .find(|g| &g.name == group)
            .ok_or_else(|| {
                format!(
                    "group: no group named {group:?} (groups: {DEFAULT_GROUP}, {})",
                    names.join(", ")
                )
            })?
            .backends
    };
    let position = backends
        .iter()
        .position(|b| b.address == address && b.port == port);
    let what = describe(address, port);
    let description = match (request, position) {
        (Request::BackendAdd { weight, .. }, None) => {
            backends.push(BackendSpec {
                address,
                port,
                weight: *weight,
            });
            format!("added backend {what} with weight {weight} to group {group}")
        }
        (Request::BackendAdd { .. }, Some(_)) => {
            return Err(format!("backend {what} is already in group {group}"))
        }
        (Request::BackendRemove { .. }, Some(i)) => {
            backends.remove(i);
            format!("removed backend {what} from group {group}")
        }
        (Request::BackendSetWeight { weight, .. }, Some(i)) => {
            let old = backends[i].weight;
            backends[i].weight = *weight;
            format!("set weight of backend {what} in group {group} from {old} to {weight}")
        }
        (_, None) => return Err(format!("backend {what} is not in group {group}")),
        (Request::Reload | Request::Stop, _) => unreachable!("handled above"),
    };
    next.validate().map_err(|e| e.to_string())?;
    Ok((next, description))
}

pub type Call = (Request, oneshot::Sender<Response>);

/// Binds the instance's socket. The daemon does it before it writes its state file, so a CLI
/// that sees the state file finds the socket too (requests wait in the backlog until `serve`).
pub fn bind(instance: &str) -> anyhow::Result<UnixListener> {
    let path = socket_path(instance);
    let dir = path.parent().expect("socket has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// Answers the requests on `listener`, forwarding each to the daemon loop.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    let mut backoff = crate::accept::AcceptBackoff::new("admin API");
    loop {
        let stream = backoff.next(|| listener.accept()).await;
        let calls = calls.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader =
                tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
            let response = match reader.read_line(&mut line).await {
                Err(e) => Response {
                    ok: false,
                    message: format!("reading request: {e}"),
                    generation: 0,
                },
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Err(e) => Response {
                        ok: false,
                        message: format!("bad request: {e}"),
                        generation: 0,
                    },
                    Ok(request) => {
                        let (tx, rx) = oneshot::channel();
                        if calls.send((request, tx)).await.is_err() {
                            return;
                        }
                        match rx.await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                },
            };
            let mut bytes = serde_json::to_vec(&response).unwrap_or_default();
            bytes.push(b'\n');
            let _ = write.write_all(&bytes).await;
        });
    }
}

/// Sends one request to a running instance and waits for its answer.
pub fn call(instance: &str, request: &Request) -> anyhow::Result<Response> {
    let path = socket_path(instance);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "instance {instance:?} is not running here (cannot connect to {})",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut bytes = serde_json::to_vec(request)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("reading the daemon's answer")?;
    serde_json::from_str(&line).with_context(|| format!("parsing the daemon's answer {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
instance = "api"
[[interfaces]]
name = "eth0"
[[listeners]]
name = "web"
protocol = "tcp"
vip = "10.0.0.10"
port = 80
group = "pool"
[[groups]]
name = "pool"
backends = [{ address = "10.0.1.2", port = 8080 }]
[[groups]]
name = "db"
type = "active-standby"
backends = [{ address = "10.0.2.2", port = 5432 }, { address = "10.0.2.3", port = 5432 }]
"#,
            "api.toml",
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn add_set_weight_and_remove_edit_the_named_group() {
        let c = config();
        let add = Request::BackendAdd {
            group: "pool".into(),
            address: ip("10.0.1.3"),
            port: Some(8080),
            weight: 3,
        };
        let (c, what) = edit_config(&c, &add).unwrap();
        assert_eq!(
            what,
            "added backend 10.0.1.3:8080 with weight 3 to group pool"
        );
        assert_eq!(c.groups[0].backends.len(), 2);
        let set = Request::BackendSetWeight {
            group: "pool".into(),
            address: ip("10.0.1.2"),
            port: Some(8080),
            weight: 0,
        };
        let (c, _) = edit_config(&c, &set).unwrap();
        assert_eq!(c.groups[0].backends[0].weight, 0);
        let remove = Request::BackendRemove {
            group: "pool".into(),
            address: ip("10.0.1.3"),
            port: Some(8080),
        };
        let (c, _) = edit_config(&c, &remove).unwrap();
        assert_eq!(c.groups[0].backends.len(), 1);
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let c = config();
        let e = edit_config(
            &c,
            &Request::BackendAdd {
                group: "nope".into(),
                address: ip("10.0.1.3"),
                port: None,
                weight: 1,
            },
        )
        .unwrap_err();
        assert!(e.contains("no group named \"nope\""), "{e}");
        let e = edit_config(
            &c,
            &Request::BackendRemove {
                group: "pool".into(),
                address: ip("10.9.9.9"),
                port: Some(1),
            },
        )
        .unwrap_err();
        assert!(e.contains("10.9.9.9:1 is not in group pool"), "{e}");
        let e = edit_config(
            &c,
            &Request::BackendAdd {
                group: "db".into(),
                address: ip("10.0.2.4"),
                port: Some(5432),
                weight: 1,
            },
        )
        .unwrap_err();
        assert!(e.contains("exactly two servers"), "{e}");
        let e = edit_config(
            &c,
            &Request::BackendSetWeight {
                group: "pool".into(),
                address: ip("10.0.1.2"),
                port: Some(8080),
                weight: 100_000,
            },
        )
        .unwrap_err();
        assert!(e.contains("weight") && e.contains("100000"), "{e}");
        let bad: Result<Request, _> = serde_json::from_str(
            r#"{"command":"backend-set-weight","group":"pool","address":"10.0.1.2","port":8080,"weight":-1}"#,
        );
        assert!(bad.unwrap_err().to_string().contains("-1"));
    }
}
