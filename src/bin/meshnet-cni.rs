//! `meshnet-cni`: the CNI 1.0.0 plugin. Reads the runtime's environment and
//! config, asks the local agent over its control socket, prints the result
//! (or the spec's error JSON, exiting non-zero). Decisions live in
//! `meshnet::cni`; this file only moves bytes.
#![allow(clippy::print_stdout)]

use std::io::Read;
use std::path::Path;

use meshnet::cni::{self, CniError, Command, ErrorCode, Invocation, NetConf};
use meshnet::control::{self, AttachRequest, ControlError, Request, Response};

fn main() {
    match run() {
        Ok(out) => println!("{out}"),
        Err(e) => {
            println!("{}", e.to_json());
            std::process::exit(1);
        }
    }
}

fn run() -> Result<String, CniError> {
    let invocation = Invocation::from_env(|k| std::env::var(k).ok())?;
    if invocation.command == Command::Version {
        return Ok(cni::version_result().to_string());
    }
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Io,
            "cannot read the network config",
            e.to_string(),
        )
    })?;
    let conf = NetConf::parse(&stdin)?;
    let socket = conf.control_socket.clone().unwrap_or_else(|| {
        meshnet::config::default_control_socket(meshnet::config::DEFAULT_DEVICE)
    });
    match invocation.command {
        Command::Add => add(&invocation, &conf, &socket),
        Command::Del => del(&invocation, &socket),
        Command::Check => check(&invocation, &conf, &socket),
        Command::Version => Ok(cni::version_result().to_string()),
    }
}

fn add(invocation: &Invocation, conf: &NetConf, socket: &Path) -> Result<String, CniError> {
    cni::check_ifname(&invocation.ifname)?;
    let netns = invocation.netns.clone().unwrap_or_default();
    let identity = cni::identity(invocation, conf);
    let prefix = overlay_prefix(socket)?;
    let request = Request::Attach(AttachRequest {
        netns: netns.clone(),
        name: identity.name,
        stack: identity.stack,
        service: identity.service,
        ip: None,
        ports: Vec::new(),
    });
    match ask(socket, &request)? {
        Response::Container(c) => {
            // The agent may not enter namespaces (a sidecar without
            // CAP_SYS_ADMIN): the plugin, run as root, finishes eth0.
            if let Err(e) =
                meshnet::agent::netops::configure_container_now(&netns, c.address, prefix)
            {
                let _ = ask(
                    socket,
                    &Request::Detach {
                        netns: netns.clone(),
                    },
                );
                return Err(CniError::new(
                    ErrorCode::Io,
                    format!("configuring eth0 inside {netns} failed"),
                    e.to_string(),
                ));
            }
            Ok(cni::add_result(&c, prefix, conf.domain(), &netns).to_string())
        }
        other => Err(unexpected(&other)),
    }
}

/// Idempotent: a namespace the agent does not know (never attached,
/// already detached, or no CNI_NETNS at all) is already in the asked state.
fn del(invocation: &Invocation, socket: &Path) -> Result<String, CniError> {
    let Some(netns) = invocation.netns.clone() else {
        return Ok(String::new());
    };
    if !attached(socket)?.iter().any(|c| c.netns == netns) {
        return Ok(String::new());
    }
    match ask(socket, &Request::Detach { netns })? {
        Response::Container(_) => Ok(String::new()),
        other => Err(unexpected(&other)),
    }
}

fn check(invocation: &Invocation, conf: &NetConf, socket: &Path) -> Result<String, CniError> {
    cni::check_ifname(&invocation.ifname)?;
    let netns = invocation.netns.clone().unwrap_or_default();
    let Some(container) = attached(socket)?.into_iter().find(|c| c.netns == netns) else {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            format!("no container is attached in namespace {netns}"),
            "the agent has no record of it (was it detached, or the agent's state lost?)",
        ));
    };
    cni::check(&container, conf.prev_result.as_ref())?;
    Ok(String::new())
}

fn attached(socket: &Path) -> Result<Vec<meshnet::core::ipam::Container>, CniError> {
    match ask(socket, &Request::Containers)? {
        Response::Containers(list) => Ok(list),
        other => Err(unexpected(&other)),
    }
}

fn overlay_prefix(socket: &Path) -> Result<u8, CniError> {
    match ask(socket, &Request::Status)? {
        Response::Status(status) => Ok(status.overlay.prefix_len()),
        other => Err(unexpected(&other)),
    }
}

fn ask(socket: &Path, request: &Request) -> Result<Response, CniError> {
    control::request(socket, request).map_err(|e| {
        let code = match e {
            ControlError::Agent(_) => ErrorCode::AgentRefused,
            ControlError::NotRunning(_) => ErrorCode::TryAgainLater,
            _ => ErrorCode::Io,
        };
        CniError::new(
            code,
            e.to_string(),
            format!("control socket {}", socket.display()),
        )
    })
}

fn unexpected(response: &Response) -> CniError {
    CniError::new(
        ErrorCode::Io,
        "the agent sent an unexpected response",
        format!("{response:?}"),
    )
}
