//! meshctl: inspect and operate a running meshd, and make keys.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use meshnet::config::{DEFAULT_DEVICE, default_control_socket};
use meshnet::control::{self, AttachRequest, Request, Response};
use meshnet::keys::{PresharedKey, PrivateKey};
use meshnet::report;

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Inspect and operate a meshnet agent",
    after_help = "Examples:\n  meshctl status\n  meshctl peers --json\n  meshctl --device mesh1 reload"
)]
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
    #[command(after_help = "Example:\n  meshctl genkey --out /etc/meshnet/h1.key")]
    Genkey {
        /// Write the key to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read a private key on stdin, print its public key (as `wg pubkey`).
    #[command(after_help = "Example:\n  meshctl pubkey < /etc/meshnet/h1.key")]
    Pubkey,
    /// Show every tunnel: endpoint, state, handshake, transfer, drops.
    #[command(
        after_help = "Examples:\n  meshctl peers\n  meshctl peers --json | jq '.[] | select(.state != \"up\")'\n  meshctl peers --format dump"
    )]
    Peers {
        /// Same as --format json.
        #[arg(long)]
        json: bool,
        /// text, json, or dump (the tab-separated lines of `wg show dump`).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print a new preshared key (base64, as `wg genpsk`).
    #[command(after_help = "Example:\n  meshctl genpsk --out /etc/meshnet/cluster.psk")]
    Genpsk {
        /// Write the key to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show this host: identity, addresses, uptime, peer counts, drops.
    #[command(after_help = "Examples:\n  meshctl status\n  meshctl status --json")]
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Give the container in a network namespace an overlay address (TAP
    /// mode): a veth into the namespace as eth0. Prints the address.
    #[command(
        after_help = "Example:\n  meshctl attach --netns web1 --name web1 --stack shop --service web --port http:8080/tcp"
    )]
    Attach {
        /// The container's network namespace: an `ip netns` name, or the path
        /// of a namespace file (/proc/PID/ns/net, a runtime's netns file).
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
        /// Print the container's record as JSON instead of its address.
        #[arg(long)]
        json: bool,
    },
    /// List the DNS records this agent serves and knows from its peers.
    #[command(after_help = "Examples:\n  meshctl dns\n  meshctl dns --json")]
    Dns {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Undo an attach: remove the veth, free the address.
    #[command(after_help = "Example:\n  meshctl detach --netns web1")]
    Detach {
        /// The container's network namespace, as given to attach.
        #[arg(long)]
        netns: String,
        /// Print the detached container's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the containers attached on this host.
    #[command(after_help = "Examples:\n  meshctl containers\n  meshctl containers --json")]
    Containers {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the agent re-read its config file and apply what can change
    /// while it runs (peers, DNS upstreams and withdraw time, metrics
    /// listener). A change that needs a restart refuses the whole reload,
    /// as does a config with an error; nothing changes then. SIGHUP does
    /// the same.
    #[command(after_help = "Examples:\n  meshctl reload\n  meshctl --device mesh1 reload --json")]
    Reload {
        /// Print the changes as a JSON list.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for meshctl.
    #[command(
        after_help = "Examples:\n  meshctl completions bash > /etc/bash_completion.d/meshctl\n  meshctl completions zsh > \"${fpath[1]}/_meshctl\""
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print meshctl's man page (roff), or a subcommand's (the
    /// meshctl-COMMAND(1) pages the main page refers to).
    #[command(
        after_help = "Examples:\n  meshctl man > /usr/share/man/man1/meshctl.1\n  meshctl man reload > /usr/share/man/man1/meshctl-reload.1"
    )]
    Man {
        /// A subcommand, for its own page.
        command: Option<String>,
    },
    /// Show the membership store: backend, endpoints, revision, lease, last error.
    #[command(after_help = "Examples:\n  meshctl store\n  meshctl store --json")]
    Store {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Free a host's block in etcd and delete its record (compare-and-swap):
    /// the only way a block is ever released.
    #[command(
        after_help = "Examples:\n  meshctl decommission h7 --config /etc/meshnet/meshd.toml\n  \
                      meshctl decommission h7 --endpoints http://127.0.0.1:2379"
    )]
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
    /// Explain the network policy.
    #[command(
        subcommand,
        after_help = "Example:\n  meshctl policy test web1.web db1.db 5432/tcp"
    )]
    Policy(PolicyCommand),
    /// Show recent packets the policy dropped, with direction, tier and rule.
    #[command(
        after_help = "Examples:\n  meshctl drops\n  meshctl drops --follow\n  meshctl drops --json"
    )]
    Drops {
        /// Keep printing new drops as they happen (until interrupted).
        #[arg(long)]
        follow: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The verdict for a first packet from SRC to DST, with its tier, rule and
    /// reason, decided by the same function the data path calls. Exit status:
    /// 0 allow, 1 deny, 2 bad input.
    #[command(
        after_help = "Example:\n  meshctl policy test web1.web db1.db 5432/tcp\n  \
                            meshctl policy test 10.42.1.2 10.42.3.2 icmp"
    )]
    Test {
        /// Source: an overlay address, NAME.STACK, or a host name.
        src: String,
        /// Destination: an overlay address, NAME.STACK, or a host name.
        dst: String,
        /// PORT/PROTO (5432/tcp, 53/udp) or icmp.
        port: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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
            json,
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
                    finish_attach(&socket, &c)?;
                    show(&c, json, |c| format!("{}\n", c.address))
                }
                other => unexpected(other),
            }
        }
        Command::Detach { netns, json } => {
            match control::request(&socket, &Request::Detach { netns })? {
                Response::Container(c) => show(&c, json, |c| {
                    format!(
                        "detached {} ({}), address {} is free\n",
                        c.name, c.netns, c.address
                    )
                }),
                other => unexpected(other),
            }
        }
        Command::Reload { json } => match control::request(&socket, &Request::Reload)? {
            Response::Reloaded(changes) => show(&changes, json, |c| reload_report(c)),
            other => unexpected(other),
        },
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a closed pipe.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "meshctl", &mut script);
            write_stdout(&script)
        }
        Command::Man { command } => write_stdout(&man_page(command.as_deref())?),
        Command::Containers { json } => match control::request(&socket, &Request::Containers)? {
            Response::Containers(list) => show(&list, json, |l| report::containers(l)),
            other => unexpected(other),
        },
        Command::Policy(PolicyCommand::Test {
            src,
            dst,
            port,
            json,
        }) => policy_test(&socket, src, dst, port, json),
        Command::Drops { follow, json } => drops(&socket, follow, json),
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

/// Gives the container's eth0 its address inside its namespace, in case
/// the agent could not (a sidecar without CAP_SYS_ADMIN); idempotent when
/// it did. On failure the attach is undone, so nothing is left half-made.
fn finish_attach(
    socket: &std::path::Path,
    c: &meshnet::core::ipam::Container,
) -> anyhow::Result<()> {
    let Response::Status(status) = control::request(socket, &Request::Status)? else {
        anyhow::bail!("unexpected response to status");
    };
    let prefix = status.overlay.prefix_len();
    if let Err(e) = meshnet::agent::netops::configure_container_now(&c.netns, c.address, prefix) {
        let _ = control::request(
            socket,
            &Request::Detach {
                netns: c.netns.clone(),
            },
        );
        anyhow::bail!(
            "configuring eth0 inside {} failed (attach undone): {e}",
            c.netns
        );
    }
    Ok(())
}

/// Exits 0 on allow, 1 on deny, 2 when the agent refused the input.
fn policy_test(
    socket: &std::path::Path,
    from: String,
    to: String,
    port: String,
    json: bool,
) -> anyhow::Result<()> {
    let req = Request::PolicyTest { from, to, port };
    match control::request(socket, &req) {
        Ok(Response::Verdict(v)) => {
            show(&v, json, report::verdict)?;
            std::process::exit(if v.action == "allow" { 0 } else { 1 });
        }
        Err(control::ControlError::Agent(message)) => {
            eprintln!("meshctl: {message}");
            std::process::exit(2);
        }
        Ok(other) => unexpected(other),
        Err(e) => Err(e.into()),
    }
}

/// How often `drops --follow` asks for new drops.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

fn drops(socket: &std::path::Path, follow: bool, json: bool) -> anyhow::Result<()> {
    let mut after = 0;
    loop {
        let Response::Drops(list) = control::request(socket, &Request::Drops { after })? else {
            anyhow::bail!("unexpected response to drops");
        };
        after = list.last().map_or(after, |d| d.sequence);
        if json {
            print_json(&list)?;
        } else {
            print!("{}", report::drops(&list, !follow || after == 0));
        }
        if !follow {
            return Ok(());
        }
        std::io::stdout().flush()?;
        std::thread::sleep(FOLLOW_EVERY);
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

/// The roff source of meshctl's page, or of `meshctl-<command>`'s.
fn man_page(command: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let mut top = Args::command();
    top.build();
    let page = match command {
        None => top,
        Some(name) => {
            let sub = top
                .find_subcommand(name)
                .with_context(|| format!("no command {name:?}; see `meshctl --help`"))?;
            sub.clone().name(format!("meshctl-{name}"))
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    Ok(out)
}

/// Writes generated text; a reader that went away early (`| head`) is
/// not an error worth a message.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// What `meshctl reload` prints: one line per change.
fn reload_report(changes: &[String]) -> String {
    if changes.is_empty() {
        return "reloaded: nothing changed\n".to_owned();
    }
    let mut text = String::from("reloaded:\n");
    for change in changes {
        text.push_str(&format!("  {change}\n"));
    }
    text
}

fn unexpected(response: Response) -> anyhow::Result<()> {
    anyhow::bail!("meshd sent an unexpected response: {response:?}")
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
