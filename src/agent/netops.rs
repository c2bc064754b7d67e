//! Link plumbing over rtnetlink, and nftables: the TAP-mode bridge,
//! container veths, and the bridge filter that isolates them
//! (`core::isolation` writes the nft scripts; this file only runs them).
//!
//! Links, addresses, routes and per-device settings go through `netlink`
//! (no `ip`, no /proc/sys writes); the filter through `nft -f -`. All of it
//! is asynchronous, so the agent's data path never waits on it. A container
//! namespace is referenced by path (`/run/netns/NAME` for a named one) and
//! must be an nsfs file. An attach installs the port's filter before the
//! veth exists, and one that fails part-way removes what it made.
//! Must never: touch a link it did not create or was not named; never
//! remove the bridge or the filter table (containers keep working, and
//! stay isolated, while the agent restarts).

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::netlink::{self, NetlinkError, VethPeer};
use crate::core::ethernet::Mac;
use crate::core::ipam::NetnsRef;
use crate::core::isolation::{self, IsolationError, Port, PortName};
use crate::core::service::SERVICE_ADDRESS;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetopsError {
    #[error("network namespace {0} does not exist (create it with `ip netns add {0}`)")]
    NoNamespace(String),
    #[error("{path} is not a network namespace: {why}")]
    NotNamespace { path: String, why: String },
    #[error("network namespace {0} already has an eth0")]
    Eth0Exists(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
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
    /// A namespace name or path (see `NetnsRef`).
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

/// nsfs's f_type (include/uapi/linux/magic.h).
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// Opens the namespace file and checks that it is one: a named namespace
/// that is missing, a path that is missing, and a file that is not a
/// namespace each get their own error.
pub fn open_netns(netns: NetnsRef<'_>) -> Result<OwnedFd, NetopsError> {
    let path = netns.path();
    let not_ns = |why: String| NetopsError::NotNamespace {
        path: path.display().to_string(),
        why,
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(match netns.name() {
                Some(name) => NetopsError::NoNamespace(name.to_owned()),
                None => not_ns("no such file".into()),
            });
        }
        Err(e) => return Err(not_ns(e.to_string())),
    };
    let fs = rustix::fs::fstatfs(&file).map_err(|e| not_ns(e.to_string()))?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs per arch
    if fs.f_type as u64 != NSFS_MAGIC {
        return Err(not_ns(
            "not an nsfs file (expected /run/netns/NAME, /proc/PID/ns/net or a runtime's netns file)"
                .into(),
        ));
    }
    Ok(file.into())
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
    let handle = netlink::connect()?;
    if netlink::index(&handle, name).await?.is_none() {
        netlink::add_bridge(&handle, name).await?;
    }
    let index = netlink::existing(&handle, name).await?;
    netlink::no_ipv6_addresses(&handle, index).await?;
    netlink::set_mac_mtu(&handle, index, mac.0, mtu).await?;
    netlink::add_address(&handle, index, address, prefix, true).await?;
    Ok(netlink::set_up(&handle, index, None).await?)
}

/// Gives the host the service address (on loopback, where the agent's DNS
/// sockets bind). In TAP mode the bridge stops the kernel from answering
/// ARP for it: the agent answers, and passes what it does not serve itself
/// to the host.
pub async fn set_up_service_address(bridge: Option<&str>) -> Result<(), NetopsError> {
    let handle = netlink::connect()?;
    let lo = netlink::existing(&handle, "lo").await?;
    netlink::set_up(&handle, lo, None).await?;
    netlink::add_address(&handle, lo, SERVICE_ADDRESS, 32, true).await?;
    if let Some(bridge) = bridge {
        // arp_ignore 1 (answer only for addresses on the bridge itself).
        // arp_announce 2: when the host resolves a container to answer its
        // DNS, the request's sender is the bridge's own address, never the
        // reply's source (the service address). Otherwise the container
        // would learn 169.254.169.250 at the bridge's MAC and send its next
        // queries to the host directly, where the bridge filter drops them.
        let index = netlink::existing(&handle, bridge).await?;
        let spec = netlink::af_spec_inet_conf(&[
            (netlink::IPV4_DEVCONF_ARP_IGNORE, 1),
            (netlink::IPV4_DEVCONF_ARP_ANNOUNCE, 2),
        ]);
        netlink::set_af_spec(&handle, index, spec).await?;
    }
    Ok(())
}

/// Puts a link on the bridge and brings it up.
pub async fn enslave(link: &str, bridge: &str) -> Result<(), NetopsError> {
    let handle = netlink::connect()?;
    let master = netlink::existing(&handle, bridge).await?;
    let index = netlink::existing(&handle, link).await?;
    Ok(netlink::set_up(&handle, index, Some(master)).await?)
}

/// Brings an overlay device (TUN or TAP) up without IPv6 addresses: the
/// overlay is IPv4-only, and a link-local address would make the kernel
/// send router solicitations into the device, which would only be dropped.
pub async fn bring_up_device(name: &str) -> Result<(), NetopsError> {
    let handle = netlink::connect()?;
    let index = netlink::existing(&handle, name).await?;
    netlink::no_ipv6_addresses(&handle, index).await?;
    Ok(netlink::set_up(&handle, index, None).await?)
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

/// Creates the veth pair, its peer made as `eth0` inside the namespace, and
/// configures it; on failure removes the pair again. The port's filter is
/// in place before the pair exists (and removed again on failure).
///
/// With `inside` false (an agent without CAP_SYS_ADMIN, such as the
/// sidecar image, cannot enter another namespace), the pair is made but
/// the container's side is left for the caller: `configure_container`,
/// which `meshctl attach` and `meshnet-cni` run as root on the host.
pub async fn attach(link: &ContainerLink<'_>, inside: bool) -> Result<(), NetopsError> {
    let reference = NetnsRef::parse(link.netns).map_err(|e| NetopsError::NotNamespace {
        path: link.netns.to_owned(),
        why: e.to_string(),
    })?;
    let netns = open_netns(reference)?;
    let shown = reference.path().display().to_string();
    if !inside {
        // The kernel refuses a second eth0 when the pair is made there.
        let port = Port::new(link.host_veth, link.mac, link.address)?;
        nft(&["-f", "-"], &isolation::add_port(&port)).await?;
        let made = make_pair(link, netns, false).await;
        if made.is_err() {
            let _ = nft(&["-f", "-"], &isolation::remove_port(&port.name)).await;
        }
        return made;
    }
    let probe = netns.try_clone().map_err(|e| NetopsError::NotNamespace {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let has_eth0 = netlink::in_netns(probe, |handle| async move {
        netlink::index(&handle, "eth0").await
    })
    .await?;
    if has_eth0.is_some() {
        return Err(NetopsError::Eth0Exists(shown));
    }
    let port = Port::new(link.host_veth, link.mac, link.address)?;
    nft(&["-f", "-"], &isolation::add_port(&port)).await?;
    let made = make_pair(link, netns, true).await;
    if made.is_err() {
        let _ = nft(&["-f", "-"], &isolation::remove_port(&port.name)).await;
    }
    made
}

/// Whether this process may enter other network namespaces (setns needs
/// CAP_SYS_ADMIN); without it, attach leaves the container's side to the
/// caller.
pub fn can_enter_namespaces() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_ADMIN)
    })
}

/// The container's side of an attach, as a privileged caller does it when
/// the agent could not: loopback up, eth0 up with its address, the service
/// address on the link. Idempotent, so a caller may always run it.
pub async fn configure_container(
    netns: &str,
    address: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetopsError> {
    let reference = NetnsRef::parse(netns).map_err(|e| NetopsError::NotNamespace {
        path: netns.to_owned(),
        why: e.to_string(),
    })?;
    let fd = open_netns(reference)?;
    Ok(netlink::in_netns(fd, move |handle| async move {
        let lo = netlink::existing(&handle, "lo").await?;
        netlink::set_up(&handle, lo, None).await?;
        let eth0 = netlink::existing(&handle, "eth0").await?;
        netlink::add_address(&handle, eth0, address, prefix, true).await?;
        netlink::set_up(&handle, eth0, None).await?;
        netlink::ensure_link_route(&handle, eth0, SERVICE_ADDRESS, 32).await
    })
    .await?)
}

/// `configure_container` for a caller without a runtime (meshctl, the CNI
/// plugin): on a runtime of its own, for this one call.
pub fn configure_container_now(
    netns: &str,
    address: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetopsError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| NetopsError::Netlink(NetlinkError::new("start a runtime", e)))?;
    runtime.block_on(configure_container(netns, address, prefix))
}

async fn make_pair(
    link: &ContainerLink<'_>,
    netns: OwnedFd,
    inside: bool,
) -> Result<(), NetopsError> {
    let handle = netlink::connect()?;
    let master = netlink::existing(&handle, link.bridge).await?;
    let peer = VethPeer {
        name: "eth0",
        mac: link.mac.0,
        mtu: link.mtu,
        netns: &netns,
    };
    netlink::add_veth(&handle, link.host_veth, master, &peer)
        .await
        .map_err(|e| match e.error.contains("File exists") {
            true => NetopsError::Eth0Exists(link.netns.to_owned()),
            false => e.into(),
        })?;
    if !inside {
        return Ok(());
    }
    let (address, prefix) = (link.address, link.prefix);
    let configured =
        netlink::in_netns(netns, move |handle| configure(handle, address, prefix)).await;
    if configured.is_err()
        && let Ok(Some(index)) = netlink::index(&handle, link.host_veth).await
    {
        let _ = netlink::delete(&handle, index).await;
    }
    Ok(configured?)
}

/// Inside the container's namespace: loopback up, eth0 up with its
/// address, and the service address reachable on the link.
async fn configure(
    handle: rtnetlink::Handle,
    address: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    let lo = netlink::existing(&handle, "lo").await?;
    netlink::set_up(&handle, lo, None).await?;
    let eth0 = netlink::existing(&handle, "eth0").await?;
    netlink::add_address(&handle, eth0, address, prefix, false).await?;
    netlink::set_up(&handle, eth0, None).await?;
    netlink::add_link_route(&handle, eth0, SERVICE_ADDRESS, 32).await
}

/// Removes a container's veth pair, then its filter; either already gone
/// (say, with its namespace) is fine. Between the two steps the port is
/// unmapped-or-absent, and the fail-closed rule covers it.
pub async fn detach(host_veth: &str) -> Result<(), NetopsError> {
    let name = PortName::new(host_veth)?;
    let handle = netlink::connect()?;
    if let Some(index) = netlink::index(&handle, host_veth).await? {
        netlink::delete(&handle, index).await?;
    }
    nft(&["-f", "-"], &isolation::remove_port(&name)).await
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
#[allow(clippy::unwrap_used)]
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
    fn a_file_that_is_not_a_namespace_is_refused() {
        let path = "/proc/self/status";
        let err = open_netns(NetnsRef::Path(Path::new(path))).unwrap_err();
        assert!(matches!(err, NetopsError::NotNamespace { .. }), "{err}");
        let missing = open_netns(NetnsRef::Name("meshnet-no-such-ns")).unwrap_err();
        assert_eq!(
            missing,
            NetopsError::NoNamespace("meshnet-no-such-ns".into())
        );
    }

    #[test]
    fn this_process_namespace_is_a_namespace() {
        assert!(open_netns(NetnsRef::Path(Path::new("/proc/self/ns/net"))).is_ok());
    }
}
