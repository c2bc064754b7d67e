//! meshctl: inspect and operate a running meshd, and make keys.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshnet::config::{DEFAULT_DEVICE, default_control_socket};
use meshnet::control::{self, AttachRequest, Request, Response};
use meshnet::keys::{PresharedKey, PrivateKey};
use meshnet::report;

#[derive(Parser)]
#[command(version, about = "Inspect and operate a meshnet agent")]
struct Args {
    /// The agent's control socket [default: /run/meshnet/<device>.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The agent's device, to find its default control socket.
    #[arg(long, global = true, default_value = DEFAULT_DEVICE)]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
    Dump,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key (base64, as `wg genkey`).
    Genkey {
        /// Write the key to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read a private key on stdin, print its public key (as `wg pubkey`).
    Pubkey,
    /// Show every tunnel: endpoint, state, handshake, transfer, drops.
    Peers {
        /// Same as --format json.
        #[arg(long)]
        json: bool,
        /// text, json, or dump (the tab-separated lines of `wg show dump`).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print a new preshared key (base64, as `wg genpsk`).
    Genpsk {
        /// Write the key to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show this host: identity, addresses, uptime, peer counts, drops.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Give the container in a network namespace an overlay address (TAP
    /// mode): a veth into the namespace as eth0. Prints the address.
    Attach {
        /// The container's network namespace (`ip netns` name).
        #[arg(long)]
        netns: String,
        /// The container's name (a DNS label).
        #[arg(long)]
        name: String,
        /// Its stack [default: default].
        #[arg(long)]
        stack: Option<String>,
        /// The service it is an instance of.
        #[arg(long)]
        service: Option<String>,
        /// A specific address of this host's subnet instead of the next free.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// A named port of the service, NAME:PORT/PROTO (e.g. http:8080/tcp):
        /// published as _NAME._PROTO.<service>.<stack>.<domain> SRV. Repeatable.
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    /// List the DNS records this agent serves and knows from its peers.
    Dns {
        #[arg(long)]
        json: bool,
    },
    /// Undo an attach: remove the veth, free the address.
    Detach {
        #[arg(long)]
        netns: String,
    },
    /// List the containers attached on this host.
    Containers {
        #[arg(long)]
        json: bool,
    },
    /// Show the membership store: backend, endpoints, revision, lease, last error.
    Store {
        #[arg(long)]
        json: bool,
    },
    /// Free a host's block in etcd and delete its record (compare-and-swap):
    /// the only way a block is ever released.
    Decommission {
        /// The host to remove.
        name: String,
        /// A meshd config whose [store] names the etcd (TLS included).
        #[arg(long, required_unless_present = "endpoints")]
        config: Option<PathBuf>,
        /// etcd endpoints, comma-separated, instead of --config.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// The key prefix, with --endpoints.
        #[arg(long, default_value = meshnet::store::layout::DEFAULT_PREFIX)]
        prefix: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let socket = args
        .socket
        .unwrap_or_else(|| default_control_socket(&args.device));
    match args.command {
        Command::Genkey { out } => write_secret(&PrivateKey::generate()?.to_base64(), out),
        Command::Pubkey => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            let key =
                PrivateKey::from_base64(&text).context("stdin does not hold a private key")?;
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Peers { json, format } => {
            let format = if json { Format::Json } else { format };
            let Response::Peers(peers) = control::request(&socket, &Request::Peers)? else {
                anyhow::bail!("unexpected response to peers");
            };
            match format {
                Format::Json => print_json(&peers),
                Format::Text => {
                    print!("{}", report::peers(&peers));
                    Ok(())
                }
                Format::Dump => {
                    let Response::Status(host) = control::request(&socket, &Request::Status)?
                    else {
                        anyhow::bail!("unexpected response to status");
                    };
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                    print!("{}", meshnet::uapi::dump(&host, &peers, now));
                    Ok(())
                }
            }
        }
        Command::Genpsk { out } => write_secret(&PresharedKey::generate()?.to_base64(), out),
        Command::Status { json } => match control::request(&socket, &Request::Status)? {
            Response::Status(status) => show(&status, json, report::status),
            other => unexpected(other),
        },
        Command::Dns { json } => match control::request(&socket, &Request::Dns)? {
            Response::Records(records) => show(&records, json, |r| report::records(r)),
            other => unexpected(other),
        },
        Command::Attach {
            netns,
            name,
            stack,
            service,
            ip,
            ports,
        } => {
            let req = Request::Attach(AttachRequest {
                netns,
                name,
                stack,
                service,
                ip,
                ports,
            });
            match control::request(&socket, &req)? {
                Response::Container(c) => {
                    println!("{}", c.address);
                    Ok(())
                }
                other => unexpected(other),
            }
        }
        Command::Detach { netns } => match control::request(&socket, &Request::Detach { netns })? {
            Response::Container(c) => {
                println!(
                    "detached {} ({}), address {} is free",
                    c.name, c.netns, c.address
                );
                Ok(())
            }
            other => unexpected(other),
        },
        Command::Containers { json } => match control::request(&socket, &Request::Containers)? {
            Response::Containers(list) => show(&list, json, |l| report::containers(l)),
            other => unexpected(other),
        },
        Command::Store { json } => match control::request(&socket, &Request::Store)? {
            Response::Store(status) => show(&status, json, |s| s.to_text()),
            other => unexpected(other),
        },
        Command::Decommission {
            name,
            config,
            endpoints,
            prefix,
        } => decommission(&name, config, endpoints, &prefix),
    }
}

#[cfg(feature = "etcd")]
fn decommission(
    name: &str,
    config: Option<PathBuf>,
    endpoints: Vec<String>,
    prefix: &str,
) -> anyhow::Result<()> {
    let store = match config {
        Some(path) => meshnet::config::load(&path)?
            .store
            .with_context(|| format!("{} has no [store] table", path.display()))?,
        None => meshnet::config::StoreConfig {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_owned(),
            block_prefix: meshnet::config::store_defaults::BLOCK_PREFIX,
            advertise: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            requested: None,
            lease_ttl: meshnet::config::store_defaults::LEASE_TTL,
            keepalive: None,
            tls: None,
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let freed = runtime.block_on(meshnet::store::etcd::decommission(&store, name))?;
    let blocks: Vec<String> = freed.iter().map(ToString::to_string).collect();
    println!(
        "decommissioned {name}: freed {}",
        if blocks.is_empty() {
            "no block".to_owned()
        } else {
            blocks.join(", ")
        }
    );
    Ok(())
}

#[cfg(not(feature = "etcd"))]
fn decommission(_: &str, _: Option<PathBuf>, _: Vec<String>, _: &str) -> anyhow::Result<()> {
    anyhow::bail!("decommission needs a meshctl built with the `etcd` feature (the default)")
}

/// Prints a new secret, or writes it to a new file only root can read.
fn write_secret(secret: &str, out: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(path) = out else {
        println!("{secret}");
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{secret}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Prints a response as JSON or as text.
fn show<T: serde::Serialize>(
    value: &T,
    json: bool,
    text: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        return print_json(value);
    }
    print!("{}", text(value));
    Ok(())
}

fn unexpected(response: Response) -> anyhow::Result<()> {
    anyhow::bail!("meshd sent an unexpected response: {response:?}")
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
