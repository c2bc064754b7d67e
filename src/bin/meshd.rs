//! meshd: the meshnet network agent. Parses arguments, sets up logging and
//! signals, and runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshnet::config::{self, Config};
use meshnet::control;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;
/// Log filter when RUST_LOG is unset. boringtun logs every handshake
/// retransmission at warn and every expiry at error; meshd reports the
/// resulting state changes itself, once each.
const DEFAULT_LOG: &str = "info,boringtun=off";

#[derive(Parser)]
#[command(
    version,
    about = "meshnet network agent: encrypted overlay for containers"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the configuration and exit without touching the system.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check {
        eprintln!(
            "meshd: {} is valid ({} peers)",
            args.config.display(),
            config.membership.peers.len()
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let hangup = signal(SignalKind::hangup())?;
    let (_membership, membership_rx) = watch::channel(config.membership.clone());
    tokio::spawn(reload_on_hangup(hangup, config.control_socket.clone()));
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    meshnet::agent::run(config, membership_rx, shutdown).await?;
    Ok(())
}

/// SIGHUP does what `meshctl reload` does, through the same control
/// socket, so both take one path: the agent re-reads its config file and
/// applies what can change at run time, or refuses the whole reload (the
/// agent logs the outcome either way).
async fn reload_on_hangup(mut hangup: tokio::signal::unix::Signal, socket: PathBuf) {
    while hangup.recv().await.is_some() {
        let socket = socket.clone();
        let asked = tokio::task::spawn_blocking(move || {
            control::request(&socket, &control::Request::Reload)
        })
        .await;
        // The agent logs the outcome; only not reaching it is ours to say
        // (a SIGHUP before the control socket is up, say).
        if let Ok(Err(e @ control::ControlError::NotRunning(_))) = asked {
            tracing::warn!("SIGHUP ignored: {e}");
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}
