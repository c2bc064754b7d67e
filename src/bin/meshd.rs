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

async fn run(mut config: Config) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let hangup = signal(SignalKind::hangup())?;
    // The membership source: the store when configured, else the file
    // (whose peers reloads then change).
    let (_file_peers, file_membership) = watch::channel(config.membership.clone());
    let (membership_rx, store_link) = match config.store.clone() {
        Some(store) => {
            let (membership, link) = start_store(&mut config, &store).await?;
            (membership, Some(link))
        }
        None => (file_membership, None),
    };
    tokio::spawn(reload_on_hangup(hangup, config.control_socket.clone()));
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    meshnet::agent::run_with_store(config, membership_rx, store_link, shutdown).await?;
    Ok(())
}

/// Joins the etcd store: this host's block and the cluster's overlay come
/// from it, then peers and other hosts' DNS records follow its watch.
#[cfg(feature = "etcd")]
async fn start_store(
    config: &mut Config,
    store: &meshnet::config::StoreConfig,
) -> anyhow::Result<(
    watch::Receiver<meshnet::membership::Membership>,
    meshnet::agent::StoreLink,
)> {
    let started =
        meshnet::store::etcd::start(meshnet::store::etcd::Member::of(config), store).await?;
    config.subnet = started.block;
    config.overlay = started.cluster.overlay;
    let link = meshnet::agent::StoreLink {
        report: started.report,
        records: started.records,
        publish: started.publish,
    };
    Ok((started.membership, link))
}

#[cfg(not(feature = "etcd"))]
async fn start_store(
    _: &mut Config,
    _: &meshnet::config::StoreConfig,
) -> anyhow::Result<(
    watch::Receiver<meshnet::membership::Membership>,
    meshnet::agent::StoreLink,
)> {
    anyhow::bail!("[store] needs a meshd built with the `etcd` feature (the default)")
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
