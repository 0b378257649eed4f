use anyhow::Context as _;
use clap::Parser;
use slb_user::cli::{enter_netns, Cli, Command};
use slb_user::config::Config;
use slb_user::{api, daemon, dataplane, status};

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Before any thread exists, so every thread the runtime starts is in the namespace too.
    if let Some(netns) = &cli.netns {
        enter_netns(netns)?;
    }
    match cli.command {
        Command::Run {
            config,
            keep_serving,
        } => daemon::run(daemon::RunOptions {
            config,
            keep_serving,
        }),
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            println!(
                "{}: ok — instance {:?}, {} listener(s), {} VServer group(s), {} default-group backend(s), {} interface(s)",
                file.display(),
                config.instance,
                config.listeners.len(),
                config.groups.len(),
                config.default_group.backends.len(),
                config.interfaces.len()
            );
            Ok(())
        }
        Command::Status { instance, json } => {
            let status = status::collect(&instance)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            Ok(())
        }
        Command::Backend { action } => {
            let (instance, request) = action.request();
            answer(api::call(&instance, &request)?)
        }
        Command::Reload { instance } => answer(api::call(&instance, &api::Request::Reload)?),
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
