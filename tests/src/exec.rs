//! Running commands and Rust code inside network namespaces.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _};

/// A command that could not be started or did not exit successfully.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// Path of the bind mount `ip netns add` creates for a named namespace.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(ns)
}

/// `program args...` rendered for error messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion and returns its stdout; a non-zero exit is an error that carries
/// stderr.
pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    let command = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    stdout_of(command, output)
}

/// A finished command's stdout, or the failure with its stderr.
fn stdout_of(command: String, output: Output) -> Result<String, CommandError> {
    let Output {
        status,
        stdout,
        stderr,
    } = output;
    if status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            command,
            status,
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        })
    }
}

/// [`run`] with `input` on its stdin.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<String, CommandError> {
    use std::io::Write as _;
    let command = describe(cmd);
    let spawn_error = |source| CommandError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.to_owned();
    // Written from a thread: a child that answers as it reads would fill its stdout pipe
    // while we still write.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().map_err(spawn_error)?;
    let _ = writer.join();
    stdout_of(command, output)
}

/// Builds `ip netns exec <ns> <args...>`.
pub fn command_in<I, S>(ns: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Runs `args` inside namespace `ns` and returns its stdout.
pub fn exec_in<I, S>(ns: &str, args: I) -> Result<String, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut command_in(ns, args))
}

/// Starts `args` inside namespace `ns`. The process gets its own process group, so a Ctrl-C
/// on the terminal reaches only the harness, which then tears everything down in order.
/// stdout is piped (see [`ChildGuard::wait_for_line`]); stderr is inherited.
pub fn spawn_in<I, S>(ns: &str, args: I) -> Result<ChildGuard, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    ChildGuard::spawn(&mut command_in(ns, args))
}

/// A child process that is killed (and reaped) when the guard is dropped.
#[derive(Debug)]
pub struct ChildGuard {
    command: String,
    child: Child,
    /// stdout after [`ChildGuard::wait_for_line`] handed it to a reader thread.
    stdout: Option<mpsc::Receiver<String>>,
}

impl ChildGuard {
    /// Starts `cmd` in its own process group with stdin closed, stdout piped (see
    /// [`ChildGuard::wait_for_line`]) and stderr inherited.
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard, CommandError> {
        let command = describe(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| CommandError::Spawn {
                command: command.clone(),
                source,
            })?;
        Ok(ChildGuard {
            command,
            child,
            stdout: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn command(&self) -> &str {
        &self.command
    }

    /// Waits until the child prints `line` on stdout. Fails if it exits first or does not
    /// print it within `timeout`.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> anyhow::Result<()> {
        if self.stdout.is_none() {
            let out: ChildStdout = self
                .child
                .stdout
                .take()
                .context("child stdout is not piped")?;
            let (tx, rx) = mpsc::channel();
            // The thread ends at EOF, i.e. when the child exits.
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            self.stdout = Some(rx);
        }
        let rx = self.stdout.as_ref().expect("reader was just set");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.trim() == line => return Ok(()),
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "`{}` did not print {line:?} within {timeout:?}",
                        self.command
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "`{}` exited ({status}) before printing {line:?}",
                        self.command
                    )
                }
            }
        }
    }

    /// Returns the exit status if the child has already exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs `f` on a new thread that has joined network namespace `ns`, and returns its result.
///
/// The network namespace is a per-thread attribute in Linux, so this does not affect the
/// other threads of the process. Threads that `f` spawns inherit the namespace, and sockets
/// stay in the namespace they were created in whichever thread uses them later. A panic in
/// `f` is propagated to the caller.
pub fn in_netns<T, F>(ns: &str, f: F) -> anyhow::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = netns_path(ns);
    let file =
        File::open(&path).with_context(|| format!("cannot open namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || {
                // SAFETY: `file` is an open namespace file descriptor for the duration of the
                // call; setns only changes this thread's network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into {}", path.display()));
                }
                drop(file);
                Ok(f())
            })
            .context("cannot spawn namespace thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
