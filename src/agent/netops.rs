//! Link plumbing with iproute2 and nftables: the TAP-mode bridge, container
//! veths, and the bridge filter that isolates them (`core::isolation`
//! writes the nft scripts; this file only runs them).
//!
//! Every step runs `ip` or `nft -f -` asynchronously, so the agent's data
//! path never waits on it. An attach installs the port's filter before the
//! veth exists, and one that fails part-way removes what it made.
//! Must never: touch a link it did not create or was not named; never
//! remove the bridge or the filter table (containers keep working, and
//! stay isolated, while the agent restarts).

use std::net::Ipv4Addr;
use std::path::Path;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::core::ethernet::Mac;
use crate::core::isolation::{self, IsolationError, Port, PortName};
use crate::core::service::SERVICE_ADDRESS;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetopsError {
    #[error("network namespace {0} does not exist (create it with `ip netns add {0}`)")]
    NoNamespace(String),
    #[error("network namespace {0} already has an eth0")]
    Eth0Exists(String),
    #[error("`ip {command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error(
        "TAP mode needs the `nft` tool (Debian package nftables) to isolate containers \
         on the bridge: {0}"
    )]
    NftMissing(String),
    #[error("the bridge filter (nftables table bridge {table}) was refused: {stderr}", table = isolation::TABLE)]
    Nft { stderr: String },
    #[error(transparent)]
    Isolation(#[from] IsolationError),
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
/// First checks that the bridge filter can be installed at all, so an
/// agent without `nft` stops before it touches a device.
pub async fn ensure_bridge(
    name: &str,
    mac: Mac,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
) -> Result<(), NetopsError> {
    check_filter().await?;
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
        // arp_announce 2: when the host resolves a container to answer its
        // DNS, the request's sender is the bridge's own address, never the
        // reply's source (the service address). Otherwise the container
        // would learn 169.254.169.250 at the bridge's MAC and send its next
        // queries to the host directly, where the bridge filter drops them.
        for (knob, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            let path = Path::new("/proc/sys/net/ipv4/conf").join(bridge).join(knob);
            std::fs::write(&path, value).map_err(|e| NetopsError::Command {
                command: format!("write {}", path.display()),
                stderr: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// Puts a link on the bridge and brings it up.
pub async fn enslave(link: &str, bridge: &str) -> Result<(), NetopsError> {
    ip(&["link", "set", link, "master", bridge, "up"]).await
}

/// Dry-runs the empty filter table (`nft -c`: the kernel checks it, nothing
/// changes): fails when `nft` is missing or the kernel lacks bridge
/// filtering.
async fn check_filter() -> Result<(), NetopsError> {
    nft(&["-c", "-f", "-"], &isolation::full_table(&[], true)).await
}

/// Replaces the bridge filter with one for exactly `ports`, atomically;
/// with `hairpin`, containers reach each other only through the agent.
pub async fn install_filter(ports: &[Port], hairpin: bool) -> Result<(), NetopsError> {
    nft(&["-f", "-"], &isolation::full_table(ports, hairpin)).await
}

/// Turns on or off the rule that makes containers of this host reach each
/// other only through the agent; the ports' own chains stay as they are.
pub async fn set_hairpin(hairpin: bool) -> Result<(), NetopsError> {
    nft(&["-f", "-"], &isolation::hairpin(hairpin)).await
}

/// Creates the veth pair, moves one end into the namespace as `eth0`, and
/// configures it; on failure removes the pair again. The port's filter is
/// in place before the pair exists (and removed again on failure).
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
    let port = Port::new(link.host_veth, link.mac, link.address)?;
    nft(&["-f", "-"], &isolation::add_port(&port)).await?;
    let made = make_pair(link).await;
    if made.is_err() {
        let _ = nft(&["-f", "-"], &isolation::remove_port(&port.name)).await;
    }
    made
}

async fn make_pair(link: &ContainerLink<'_>) -> Result<(), NetopsError> {
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

/// Removes a container's veth pair, then its filter; either already gone
/// (say, with its namespace) is fine. Between the two steps the port is
/// unmapped-or-absent, and the fail-closed rule covers it.
pub async fn detach(host_veth: &str) -> Result<(), NetopsError> {
    let name = PortName::new(host_veth)?;
    if link_exists(host_veth) {
        ip(&["link", "del", host_veth]).await?;
    }
    nft(&["-f", "-"], &isolation::remove_port(&name)).await
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

/// Runs `nft` with `script` on stdin: one atomic transaction.
async fn nft(args: &[&str], script: &str) -> Result<(), NetopsError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| NetopsError::NftMissing(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means nft exited early; its status says why.
        let _ = stdin.write_all(script.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetopsError::Nft {
            stderr: format!("nft did not finish: {e}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetopsError::Nft {
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
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
