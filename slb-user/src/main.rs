use anyhow::Context as _;
use clap::{CommandFactory, Parser};
use slb_user::cli::{enter_netns, Cli, Command, DecapAction, ReportKind};
use slb_user::config::Config;
use slb_user::instance::{pin_dir, socket_path, state_dir};
use slb_user::{api, daemon, dataplane, decap, explain, report, snat, status};

/// The proxy allocates and frees small buffers for every request (headers, body chunks, tasks):
/// glibc's malloc took about 7 % of the daemon's CPU in the HTTP benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn stats(instance: &str, json: bool, watch: Option<f64>) -> anyhow::Result<()> {
    let Some(seconds) = watch else {
        let s = status::collect(instance)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", status::render_stats(&s, None));
        }
        return Ok(());
    };
    let mut previous: Option<(status::Status, std::time::Instant)> = None;
    loop {
        let s = status::collect(instance)?;
        let now = std::time::Instant::now();
        let prev = previous
            .as_ref()
            .map(|(p, t)| (p, now.duration_since(*t).as_secs_f64()));
        // Clear the screen and home the cursor, as watch(1) does.
        print!("\x1b[2J\x1b[H{}", status::render_stats(&s, prev));
        use std::io::Write as _;
        std::io::stdout().flush()?;
        previous = Some((s, now));
        std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
    }
}

/// Writes generated text to stdout; a reader that went away (`| head`) is not an error.
fn print_output(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    match std::io::stdout()
        .write_all(bytes)
        .and_then(|()| std::io::stdout().flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `slb stop`: asks the daemon, or cleans up the pins of one that is gone.
fn decap(action: DecapAction) -> anyhow::Result<()> {
    match action {
        DecapAction::Attach {
            iface,
            sources,
            vips,
            mode,
        } => {
            let accepted = decap::Accepted { sources, vips };
            let attached = decap::attach(&iface, &accepted, mode.into())?;
            let what = if attached {
                "attached to"
            } else {
                "updated on"
            };
            println!("decapsulator {what} {iface}");
            Ok(())
        }
        DecapAction::Detach { iface } => {
            decap::detach(&iface)?;
            println!("decapsulator detached from {iface}");
            Ok(())
        }
        DecapAction::Status { iface, json } => {
            let status = decap::status(&iface)?;
            print_json_or_text(json, &status, decap::render)
        }
    }
}

fn stop(instance: &str) -> anyhow::Result<()> {
    if socket_path(instance).exists() {
        if let Ok(response) = api::call(instance, &api::Request::Stop {}) {
            println!("{}", response.message);
            // The daemon removes the pins on its way out, after it has withdrawn its
            // announcements and forwarded through their grace; wait for that.
            let withdrawal = slb_user::announce::AnnounceStatus::read(instance)
                .map_or(std::time::Duration::ZERO, |a| {
                    a.target.withdraw_grace + slb_user::announce::WITHDRAW_TIMEOUT
                });
            let polls = 100 + withdrawal.as_millis() as u64 / 100;
            for _ in 0..polls {
                if !pin_dir(instance).exists() {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            anyhow::bail!(
                "the daemon did not remove {} within {} s",
                pin_dir(instance).display(),
                polls / 10
            );
        }
    }
    // Cleaning up under a daemon that is alive but did not answer would pull its data plane
    // from under it.
    if let Some(pid) = daemon::InstanceLock::holder(instance) {
        anyhow::bail!(
            "instance {instance:?} is served by slb pid {pid}, whose admin socket {} did not \
             answer; nothing was removed (end that process, then run `slb stop` again)",
            socket_path(instance).display()
        );
    }
    dataplane::ensure_bpffs()?;
    let dir = pin_dir(instance);
    if !dir.exists() {
        anyhow::bail!(
            "instance {instance:?} is not running here (no {})",
            dir.display()
        );
    }
    // Before the data plane goes: the routers are to stop sending here first.
    match slb_user::announce::withdraw_left_over(instance) {
        Ok(Some((answer, grace))) => {
            println!(
                "withdrew the daemon's announcements through BIRD ({answer}); forwarding on for {}",
                humantime::format_duration(grace)
            );
            std::thread::sleep(grace);
        }
        Ok(None) => {}
        Err(e) => eprintln!(
            "warning: could not withdraw the daemon's announcements (the include file no longer \
             announces anything; `birdc configure` once BIRD is reachable withdraws them): {e}"
        ),
    }
    dataplane::remove_pins(&dir)?;
    let _ = std::fs::remove_dir_all(state_dir(instance));
    println!("no daemon was running; detached instance {instance:?} and removed its pins");
    Ok(())
}

/// Reports a drain's progress from the daemon's state once a second until it ends; an error
/// when connections were left at the deadline, or the drain ended otherwise. Gives up some
/// seconds past the deadline if the daemon stopped following it.
fn follow_drain(
    instance: &str,
    group: &str,
    backend: slb_user::config::BackendName,
) -> anyhow::Result<()> {
    use slb_user::applied::DrainPhase;
    let mut last_left = None;
    let name = format!("{backend} in group {group}");
    loop {
        let state = slb_user::applied::AppliedState::read(instance)?;
        let Some(drain) = state.drains.iter().find(|d| d.is_of(group, &backend)) else {
            anyhow::bail!(
                "the drain of {name} is gone: a reload or a restart of the daemon ended it"
            );
        };
        let now = slb_user::health::unix_ns(std::time::SystemTime::now());
        if drain.phase == DrainPhase::Draining {
            if now > drain.deadline_unix_ns + 15_000_000_000 {
                anyhow::bail!(
                    "the daemon stopped following the drain of {name} (is it running? `slb status -i {instance}`)"
                );
            }
            if last_left != Some(drain.left) {
                println!(
                    "{name}: {} connection(s) left, {} s to the deadline",
                    drain.left,
                    drain.deadline_unix_ns.saturating_sub(now) / 1_000_000_000
                );
                last_left = Some(drain.left);
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            continue;
        }
        let note = drain.note.clone().unwrap_or_default();
        return match drain.phase {
            DrainPhase::Drained => {
                println!("{name}: drained, no connection left (weight 0)");
                Ok(())
            }
            DrainPhase::Removed => {
                println!("{name}: drained and removed");
                Ok(())
            }
            DrainPhase::RemovedAtDeadline => anyhow::bail!(
                "{name}: removed at the deadline, ending its {} connection(s) left",
                drain.left
            ),
            DrainPhase::TimedOut => anyhow::bail!(
                "{name}: {} connection(s) left at the deadline; it stays at weight 0 \
                 (drain again, or remove it with `slb backend remove`)",
                drain.left
            ),
            DrainPhase::RemoveFailed => {
                anyhow::bail!("{name}: drained, but the removal was refused: {note}")
            }
            DrainPhase::Ended => anyhow::bail!("{name}: {note}"),
            DrainPhase::Draining => unreachable!("handled above"),
        };
    }
}

/// Prints the daemon's answer; a refusal is an error (non-zero exit).
fn answer(response: api::Response) -> anyhow::Result<()> {
    if response.ok {
        println!(
            "{} (config generation {})",
            response.message, response.generation
        );
        Ok(())
    } else {
        anyhow::bail!("{}", response.message)
    }
}

fn main() -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in the journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log that cannot be written (a full disk) loses the event: by default the subscriber
        // reports that with eprintln!, which panics the thread that logged.
        .log_internal_errors(false)
        .finish()
        .with(slb_user::proxy::tls::RustlsLogFilter)
        .init();
    let cli = Cli::parse();
    execute(cli).map_err(explain_missing_privileges)
}

/// A refusal of the kernel or of root's files, met by a user who is not root, says what slb
/// needs instead of only "Permission denied".
fn explain_missing_privileges(e: anyhow::Error) -> anyhow::Error {
    let refused = e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            || cause.to_string().contains("Operation not permitted")
            || cause.to_string().contains("Permission denied")
    });
    if refused && unsafe { libc::geteuid() } != 0 {
        return e.context(
            "slb needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN, and access to /run/slb and /sys/fs/bpf/slb)",
        );
    }
    e
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    // Before any thread exists, so every thread the runtime starts is in the namespace too.
    if let Some(netns) = &cli.netns {
        enter_netns(netns)?;
    }
    match cli.command {
        Command::Run {
            config,
            keep_serving,
            worker_threads,
        } => {
            // What the daemon writes (state, history, access log) is root's alone, as under
            // the unit's UMask=0077, also when it is started by hand.
            unsafe { libc::umask(0o077) };
            daemon::run(daemon::RunOptions {
                config,
                keep_serving,
                worker_threads,
            })
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Status { instance, json } => {
            let status = status::collect(&instance)?;
            print_json_or_text(json, &status, status::render)
        }
        Command::Backend { action } => {
            let wait = matches!(
                action,
                slb_user::cli::BackendAction::Drain { no_wait: false, .. }
            );
            let (instance, request) = action.request()?;
            answer(api::call(&instance, &request)?)?;
            match (request.backend_edit()?, &request) {
                (Some(edit), api::Request::BackendDrain { .. }) if wait => {
                    let backend = edit.backend();
                    follow_drain(&instance, &edit.group, backend)
                }
                _ => Ok(()),
            }
        }
        Command::Decap { action } => decap(action),
        Command::Snat {
            instance,
            address,
            json,
        } => {
            let flows = snat::flows(&instance, address)?;
            print_json_or_text(json, &flows, |f| snat::render(f))
        }
        Command::Explain {
            instance,
            from,
            to,
            without,
            json,
        } => {
            let answers = explain::explain(&instance, &to, &from, without.as_ref())?;
            print_json_or_text(json, &answers, |a| explain::render(a))
        }
        Command::Stop { instance } => stop(&instance),
        Command::Stats {
            instance,
            json,
            watch,
        } => stats(&instance, json, watch),
        Command::Report {
            report:
                ReportKind::Distribution {
                    instance,
                    listener,
                    since,
                    json,
                },
        } => {
            let report = report::distribution(&instance, listener.as_deref(), since)?;
            print_json_or_text(json, &report, report::render)
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "slb", &mut out);
            print_output(&out)
        }
        Command::Manpage { dir: None } => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            print_output(&out)
        }
        Command::Manpage { dir: Some(dir) } => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("writing man pages into {}", dir.display())),
        Command::Reload { instance } => answer(api::call(&instance, &api::Request::Reload {})?),
        Command::Attach {
            instance,
            iface,
            mode,
        } => dataplane::attach_pinned(&instance, &iface, mode.into())
            .with_context(|| format!("attaching instance {instance:?} to {iface}")),
        Command::Detach { instance, iface } => dataplane::detach_pinned(&instance, &iface)
            .with_context(|| format!("detaching instance {instance:?} from {iface}")),
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    // What `slb run` reads besides the file and its certificates: a bad secret would refuse
    // the start.
    let uses_cookies = config.listeners.iter().any(|l| l.cookie.is_some());
    let path = &config.cookie_secret_file;
    let secret = if uses_cookies {
        Some(slb_user::proxy::cookies::CookieKey::load(path)?.is_some())
    } else {
        None
    };
    println!(
        "{}: ok — instance {:?}, {} listener(s), {} VServer group(s), {} default-group backend(s), {} interface(s)",
        file.display(),
        config.instance.as_str(),
        config.listeners.len(),
        config.groups.len(),
        config.default_group.backends.len(),
        config.interfaces.len()
    );
    match secret {
        Some(true) => println!("cookie secret {}: ok", path.display()),
        Some(false) => println!(
            "cookie secret {}: missing; slb run creates one (copy it to every node that serves these listeners)",
            path.display()
        ),
        None => {}
    }
    for l in &config.listeners {
        if l.protocol == slb_user::config::Protocol::Tcp {
            let how = match l.scheduler() {
                slb_user::config::Scheduler::Wlc => {
                    "a new connection goes to the backend with the fewest open connections per \
                     weight on this node"
                }
                _ => "flows are hashed onto the Maglev ring, the same backend on every node",
            };
            println!("listener {}: scheduler {}: {how}", l.name, l.scheduler());
        }
        if let Some(acl) = &l.acl {
            println!(
                "listener {}: {} list of {} prefix(es); established flows it comes to refuse are {}",
                l.name,
                acl.mode.as_str(),
                acl.cidrs.len(),
                acl.established.describe()
            );
        }
        if let Some(rate) = l.max_new_connections_per_second {
            println!(
                "listener {}: at most {rate} new flows a second, bursts of {}",
                l.name,
                l.new_connections_burst.unwrap_or(rate)
            );
        }
    }
    let groups = std::iter::once((
        slb_user::config::DEFAULT_GROUP,
        &config.default_group.backends,
    ))
    .chain(config.groups.iter().map(|g| (g.name.as_str(), &g.backends)));
    for (group, backends) in groups {
        for b in backends {
            if let Some(max) = b.max_connections {
                let backend = slb_user::config::BackendName {
                    address: b.address,
                    port: b.port,
                };
                println!(
                    "group {group}: backend {backend} takes new flows up to {max} open connections"
                );
            }
        }
    }
    if let Some(a) = &config.announce {
        let target = slb_user::announce::Target::of(a, &config.instance);
        let [v4, v6] = slb_user::announce::protocol_names(&target.protocol);
        println!(
            "announce: through BIRD at {}, protocols {v4} and {v6} in {} (BIRD's config must include it)",
            target.bird_socket.display(),
            target.include_file.display()
        );
    }
    Ok(())
}

/// `--json` prints `value` as JSON, else its `render`ed text.
fn print_json_or_text<T: serde::Serialize>(
    json: bool,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}
