//! Link plumbing with iproute2: the TAP-mode bridge and container veths.
//!
//! Every step runs `ip` asynchronously, so the agent's data path never
//! waits on it. An attach that fails part-way removes what it made.
//! Must never: touch a link it did not create or was not named; never
//! remove the bridge (containers keep working while the agent restarts).

use std::net::Ipv4Addr;
use std::path::Path;

use tokio::process::Command;

use crate::core::ethernet::Mac;
use crate::core::service::SERVICE_ADDRESS;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetopsError {
    #[error("network namespace {0} does not exist (create it with `ip netns add {0}`)")]
    NoNamespace(String),
    #[error("network namespace {0} already has an eth0")]
    Eth0Exists(String),
    #[error("`ip {command}` failed: {stderr}")]
    Command { command: String, stderr: String },
}

/// A container's link as attach creates it.
#[derive(Debug, Clone)]
pub struct ContainerLink<'a> {
    pub netns: &'a str,
    pub host_veth: &'a str,
    pub bridge: &'a str,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub mac: Mac,
    pub mtu: u16,
}

/// The host end of a container's veth: derived from its address, so it is
/// unique on the host and fits Linux's 15-byte limit.
pub fn host_veth_name(address: Ipv4Addr) -> String {
    format!("mv{:08x}", u32::from(address))
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub fn netns_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/run/netns").join(name).exists()
}

/// Creates the bridge if missing and gives it the host's address, MAC and
/// MTU; an existing bridge (from before a restart) is reused as it is.
pub async fn ensure_bridge(
    name: &str,
    mac: Mac,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
) -> Result<(), NetopsError> {
    if !link_exists(name) {
        ip(&["link", "add", name, "type", "bridge"]).await?;
    }
    let (mac, mtu) = (mac.to_string(), mtu.to_string());
    ip(&["link", "set", name, "address", &mac, "mtu", &mtu]).await?;
    ip(&[
        "addr",
        "replace",
        &format!("{address}/{prefix}"),
        "dev",
        name,
    ])
    .await?;
    disable_ipv6(name);
    ip(&["link", "set", name, "up"]).await
}

/// Gives the host the service address (on loopback, where the agent's DNS
/// sockets bind). In TAP mode the bridge stops the kernel from answering
/// ARP for it: the agent answers, and passes what it does not serve itself
/// to the host.
pub async fn set_up_service_address(bridge: Option<&str>) -> Result<(), NetopsError> {
    ip(&["link", "set", "lo", "up"]).await?;
    ip(&[
        "addr",
        "replace",
        &format!("{SERVICE_ADDRESS}/32"),
        "dev",
        "lo",
    ])
    .await?;
    if let Some(bridge) = bridge {
        let path = Path::new("/proc/sys/net/ipv4/conf")
            .join(bridge)
            .join("arp_ignore");
        std::fs::write(&path, "1").map_err(|e| NetopsError::Command {
            command: format!("write {}", path.display()),
            stderr: e.to_string(),
        })?;
    }
    Ok(())
}

/// Puts a link on the bridge and brings it up.
pub async fn enslave(link: &str, bridge: &str) -> Result<(), NetopsError> {
    ip(&["link", "set", link, "master", bridge, "up"]).await
}

/// Creates the veth pair, moves one end into the namespace as `eth0`, and
/// configures it; on failure removes the pair again.
pub async fn attach(link: &ContainerLink<'_>) -> Result<(), NetopsError> {
    if !netns_exists(link.netns) {
        return Err(NetopsError::NoNamespace(link.netns.to_owned()));
    }
    if ip(&["-n", link.netns, "link", "show", "eth0"])
        .await
        .is_ok()
    {
        return Err(NetopsError::Eth0Exists(link.netns.to_owned()));
    }
    ip(&[
        "link",
        "add",
        link.host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        link.netns,
    ])
    .await?;
    let configured = configure(link).await;
    if configured.is_err() {
        let _ = ip(&["link", "del", link.host_veth]).await;
    }
    configured
}

async fn configure(link: &ContainerLink<'_>) -> Result<(), NetopsError> {
    let (mac, mtu) = (link.mac.to_string(), link.mtu.to_string());
    let ns = link.netns;
    ip(&[
        "link",
        "set",
        link.host_veth,
        "master",
        link.bridge,
        "mtu",
        &mtu,
        "up",
    ])
    .await?;
    ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
    ip(&[
        "-n", ns, "link", "set", "eth0", "address", &mac, "mtu", &mtu, "up",
    ])
    .await?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/{}", link.address, link.prefix),
        "dev",
        "eth0",
    ])
    .await?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{SERVICE_ADDRESS}/32"),
        "dev",
        "eth0",
    ])
    .await
}

/// Removes a container's veth pair; one already gone (say, with its
/// namespace) is fine.
pub async fn detach(host_veth: &str) -> Result<(), NetopsError> {
    if !link_exists(host_veth) {
        return Ok(());
    }
    ip(&["link", "del", host_veth]).await
}

fn disable_ipv6(name: &str) {
    let path = Path::new("/proc/sys/net/ipv6/conf")
        .join(name)
        .join("disable_ipv6");
    let _ = std::fs::write(path, "1");
}

async fn ip(args: &[&str]) -> Result<(), NetopsError> {
    let failed = |stderr: String| NetopsError::Command {
        command: args.join(" "),
        stderr,
    };
    let out = Command::new("ip")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| failed(format!("cannot run ip (is iproute2 installed?): {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(failed(
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_unique_per_address_and_short() {
        let a = host_veth_name(Ipv4Addr::new(10, 42, 1, 5));
        assert_eq!(a, "mv0a2a0105");
        assert!(a.len() <= 15);
        assert_ne!(a, host_veth_name(Ipv4Addr::new(10, 42, 1, 6)));
    }

    #[test]
    fn namespace_names_cannot_escape_the_netns_directory() {
        assert!(!netns_exists("../../etc"));
        assert!(!netns_exists(""));
    }
}
