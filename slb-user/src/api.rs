//! The admin API: JSON lines over a root-only unix socket (/run/slb/<instance>/admin.sock, mode
//! 0600). The daemon applies each request to its running config; the CLI is a thin client.
//!
//! Rule: the config file is the source of truth. Changes made through the API apply at once on
//! top of it, show in `slb status` (under `runtime_changes`), and last until the next reload of
//! the file (SIGHUP or `slb reload`), which drops them. Write a change into the file to keep it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::{BackendEdit, BackendName, EditAction, EndpointSyntaxError};
use crate::instance::socket_path;

const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long a connection may take to send its request line: a client that connects and says
/// nothing would otherwise hold a task and a descriptor for good.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
///
/// A backend's `address` is `A`, `[A]`, `A:P` or `[A]:P` (see [`BackendName`]); its port may be
/// there or in `port`, not in both.
pub enum Request {
    BackendAdd {
        group: String,
        address: BackendName,
        port: Option<u16>,
        weight: u32,
        /// TCP/UDP: open connections past which it takes no new flow. Left out when absent, so
        /// a daemon from before it still takes the request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_connections: Option<u32>,
    },
    BackendRemove {
        group: String,
        address: BackendName,
        port: Option<u16>,
    },
    BackendSetWeight {
        group: String,
        address: BackendName,
        port: Option<u16>,
        weight: u32,
    },
    /// Weight 0, then, once the backend's connections are gone or at the deadline, removed
    /// (`remove`) or left drained; the daemon follows it and `slb status` shows it.
    BackendDrain {
        group: String,
        address: BackendName,
        port: Option<u16>,
        timeout_s: u64,
        remove: bool,
    },
    // Braces, not unit variants: serde lets unknown fields through on a unit variant of an
    // internally tagged enum, deny_unknown_fields or not.
    /// Re-read the config file, dropping runtime changes.
    Reload {},
    /// Detach, remove the pins and exit (even when running with `--keep-serving`).
    Stop {},
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
    pub fn backend_edit(&self) -> Result<Option<BackendEdit>, EndpointSyntaxError> {
        let (group, address, port, action) = match self {
            Request::BackendAdd {
                group,
                address,
                port,
                weight,
                max_connections,
            } => (
                group,
                address,
                port,
                EditAction::Add {
                    weight: *weight,
                    max_connections: *max_connections,
                },
            ),
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
            // A drain begins as weight 0.
            Request::BackendDrain {
                group,
                address,
                port,
                ..
            } => (group, address, port, EditAction::SetWeight { weight: 0 }),
            Request::Reload {} | Request::Stop {} => return Ok(None),
        };
        let backend = address.with_port(*port)?;
        Ok(Some(BackendEdit {
            group: group.clone(),
            address: backend.address,
            port: backend.port,
            action,
        }))
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
    serve_with_timeout(listener, calls, REQUEST_TIMEOUT).await
}

async fn serve_with_timeout(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    request_timeout: Duration,
) {
    let mut backoff = crate::accept::AcceptBackoff::new("admin API");
    loop {
        let stream = backoff.next(|| listener.accept()).await;
        let calls = calls.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader =
                tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
            let read = tokio::time::timeout(request_timeout, reader.read_line(&mut line)).await;
            let response = match read.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no request within {request_timeout:?}"),
                ))
            }) {
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
            Ok(Some(BackendEdit {
                group: "pool".into(),
                address: "10.0.1.2".parse().unwrap(),
                port: Some(8080),
                action: EditAction::SetWeight { weight: 0 },
            }))
        );
        let remove = Request::BackendRemove {
            group: "default".into(),
            address: "10.0.1.3".parse().unwrap(),
            port: None,
        };
        assert_eq!(
            remove.backend_edit().map(|e| e.map(|e| (e.port, e.action))),
            Ok(Some((None, EditAction::Remove)))
        );
        assert_eq!(Request::Reload {}.backend_edit(), Ok(None));
        assert_eq!(Request::Stop {}.backend_edit(), Ok(None));
    }

    #[test]
    fn a_backend_address_may_carry_its_port_in_either_family() {
        let edit_of = |line: &str| {
            serde_json::from_str::<Request>(line)
                .map_err(|e| e.to_string())?
                .backend_edit()
                .map(|e| e.map(|e| (e.address, e.port)))
                .map_err(|e| e.to_string())
        };
        let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
        let line = |address: &str, port: &str| {
            format!(r#"{{"command":"backend-remove","group":"pool","address":"{address}"{port}}}"#)
        };
        for (address, port, expected) in [
            ("10.0.1.2", r#","port":8080"#, (ip("10.0.1.2"), Some(8080))),
            ("10.0.1.2:8080", "", (ip("10.0.1.2"), Some(8080))),
            ("10.0.1.2", "", (ip("10.0.1.2"), None)),
            (
                "2001:db8::2",
                r#","port":8080"#,
                (ip("2001:db8::2"), Some(8080)),
            ),
            (
                "[2001:db8::2]",
                r#","port":8080"#,
                (ip("2001:db8::2"), Some(8080)),
            ),
            (
                "[2001:db8::2]:8080",
                r#","port":null"#,
                (ip("2001:db8::2"), Some(8080)),
            ),
        ] {
            assert_eq!(
                edit_of(&line(address, port)),
                Ok(Some(expected)),
                "{address}"
            );
        }
        let e = edit_of(&line("[2001:db8::2]:8080", r#","port":8080"#)).unwrap_err();
        assert_eq!(
            e,
            "the port is given twice, in the address [2001:db8::2]:8080 and as the port 8080; give it once"
        );
        let e = edit_of(&line("[10.0.1.2]:8080", "")).unwrap_err();
        assert!(
            e.starts_with("\"[10.0.1.2]:8080\" is not an address or address:port"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_refused_on_every_command() {
        for line in [
            r#"{"command":"reload","x":1}"#,
            r#"{"command":"stop","force":true}"#,
            r#"{"command":"backend-remove","group":"g","address":"10.0.0.1","x":1}"#,
        ] {
            let e = serde_json::from_str::<Request>(line)
                .unwrap_err()
                .to_string();
            assert!(e.contains("unknown field"), "{line}: {e}");
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"reload"}"#).unwrap(),
            Request::Reload {}
        );
        assert_eq!(
            serde_json::to_string(&Request::Stop {}).unwrap(),
            r#"{"command":"stop"}"#
        );
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_answered_and_closed_after_the_timeout() {
        let dir = std::env::temp_dir().join(format!("slb-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let (calls, _rx) = mpsc::channel(1);
        let server = tokio::spawn(serve_with_timeout(
            listener,
            calls,
            Duration::from_millis(200),
        ));
        let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut answer = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer),
        )
        .await;
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
        read.expect("closed within the timeout").unwrap();
        let response: Response = serde_json::from_str(answer.trim()).unwrap();
        assert!(!response.ok);
        assert!(
            response.message.contains("no request within"),
            "{}",
            response.message
        );
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        let bad: Result<Request, _> = serde_json::from_str(
            r#"{"command":"backend-set-weight","group":"pool","address":"10.0.1.2","port":8080,"weight":-1}"#,
        );
        assert!(bad.unwrap_err().to_string().contains("-1"));
    }
}
