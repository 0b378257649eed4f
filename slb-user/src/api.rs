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

use crate::config::{BackendEdit, EditAction};
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

impl Request {
    /// The change to the config a backend command asks for; `None` for the other commands.
    pub fn backend_edit(&self) -> Option<BackendEdit> {
        let (group, address, port, action) = match self {
            Request::BackendAdd {
                group,
                address,
                port,
                weight,
            } => (group, address, port, EditAction::Add { weight: *weight }),
            Request::BackendRemove {
                group,
                address,
                port,
            } => (group, address, port, EditAction::Remove),
            Request::BackendSetWeight {
                group,
                address,
                port,
                weight,
            } => (
                group,
                address,
                port,
                EditAction::SetWeight { weight: *weight },
            ),
            Request::Reload | Request::Stop => return None,
        };
        Some(BackendEdit {
            group: group.clone(),
            address: *address,
            port: *port,
            action,
        })
    }
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

    #[test]
    fn backend_commands_become_edits_and_the_others_do_not() {
        let request: Request = serde_json::from_str(
            r#"{"command":"backend-set-weight","group":"pool","address":"10.0.1.2","port":8080,"weight":0}"#,
        )
        .unwrap();
        assert_eq!(
            request.backend_edit(),
            Some(BackendEdit {
                group: "pool".into(),
                address: "10.0.1.2".parse().unwrap(),
                port: Some(8080),
                action: EditAction::SetWeight { weight: 0 },
            })
        );
        let remove = Request::BackendRemove {
            group: "default".into(),
            address: "10.0.1.3".parse().unwrap(),
            port: None,
        };
        assert_eq!(
            remove.backend_edit().map(|e| (e.port, e.action)),
            Some((None, EditAction::Remove))
        );
        assert_eq!(Request::Reload.backend_edit(), None);
        assert_eq!(Request::Stop.backend_edit(), None);
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        let bad: Result<Request, _> = serde_json::from_str(
            r#"{"command":"backend-set-weight","group":"pool","address":"10.0.1.2","port":8080,"weight":-1}"#,
        );
        assert!(bad.unwrap_err().to_string().contains("-1"));
    }
}
