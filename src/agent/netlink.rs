//! rtnetlink requests for the agent's link plumbing: links, addresses,
//! routes and per-device IPv4/IPv6 settings, in this namespace or in a
//! container's (a netlink socket opened inside it, on a dedicated thread).
//!
//! Replaces `ip` and /proc/sys writes, so the agent needs neither iproute2
//! nor a writable /proc/sys (an unprivileged sidecar container has
//! neither). What to ask for is decided in `netops`; this file only moves
//! requests, plus the byte layout of IFLA_AF_SPEC, which is pure.
//! Must never: touch a link it was not named; never spawn a process.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("netlink: {what} failed: {error}")]
pub struct NetlinkError {
    pub what: String,
    pub error: String,
}

impl NetlinkError {
    pub fn new(what: impl Into<String>, error: impl std::fmt::Display) -> Self {
        Self {
            what: what.into(),
            error: error.to_string(),
        }
    }
}

/// IPV4_DEVCONF_* indexes (include/uapi/linux/ip.h, one more than the
/// kernel's array index): the nla types inside IFLA_INET_CONF.
pub const IPV4_DEVCONF_ARP_ANNOUNCE: u16 = 18;
pub const IPV4_DEVCONF_ARP_IGNORE: u16 = 19;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IFLA_INET_CONF: u16 = 1;
const IFLA_INET6_ADDR_GEN_MODE: u16 = 8;
const IN6_ADDR_GEN_MODE_NONE: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const ENODEV: i32 = 19;
const EAFNOSUPPORT: i32 = 97;

/// A connection to the kernel's routing netlink in this thread's
/// namespace; its driver runs as a task on the current runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetlinkError::new("open a socket", e))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs `work` with a netlink handle in the namespace `netns`: on a thread
/// of its own (setns changes the whole thread) with a current-thread
/// runtime, so no thread of the agent ever leaves its namespace.
pub async fn in_netns<T, F, Fut>(netns: OwnedFd, work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("meshd-netns".into())
        .spawn(move || {
            let _ = tx.send(run_in_netns(netns, work));
        });
    spawned.map_err(|e| NetlinkError::new("start a namespace thread", e))?;
    rx.await
        .map_err(|_| NetlinkError::new("namespace thread", "ended without an answer"))?
}

fn run_in_netns<T, F, Fut>(netns: OwnedFd, work: F) -> Result<T, NetlinkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    rustix::thread::move_into_link_name_space(
        netns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| NetlinkError::new("enter the container's namespace", e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| NetlinkError::new("start a namespace runtime", e))?;
    runtime.block_on(async move { work(connect()?).await })
}

/// The index of link `name`, or `None` when there is none.
pub async fn index(handle: &Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -ENODEV => Ok(None),
        Err(e) => Err(NetlinkError::new(format!("look up link {name}"), e)),
    }
}

/// The index of link `name`, which must exist.
pub async fn existing(handle: &Handle, name: &str) -> Result<u32, NetlinkError> {
    index(handle, name)
        .await?
        .ok_or_else(|| NetlinkError::new(format!("look up link {name}"), "no such link"))
}

/// Creates a bridge, down.
pub async fn add_bridge(handle: &Handle, name: &str) -> Result<(), NetlinkError> {
    let what = || format!("create bridge {name}");
    // Created down (LinkBridge::new would bring it up): IPv6 addresses are
    // turned off before it goes up.
    let message = LinkMessageBuilder::<LinkBridge>::new(name).build();
    execute(handle.link().add(message).execute(), what).await
}

/// Sets a link's MAC address and MTU.
pub async fn set_mac_mtu(
    handle: &Handle,
    index: u32,
    mac: [u8; 6],
    mtu: u16,
) -> Result<(), NetlinkError> {
    let message = LinkUnspec::new_with_index(index)
        .address(mac.to_vec())
        .mtu(u32::from(mtu))
        .build();
    let what = || format!("set MAC and MTU of link {index}");
    execute(handle.link().set(message).execute(), what).await
}

/// Brings a link up, on bridge `master` when one is given.
pub async fn set_up(handle: &Handle, index: u32, master: Option<u32>) -> Result<(), NetlinkError> {
    let mut message = LinkUnspec::new_with_index(index).up();
    if let Some(master) = master {
        message = message.controller(master);
    }
    let what = || format!("bring link {index} up");
    execute(handle.link().set(message.build()).execute(), what).await
}

/// Sets IFLA_AF_SPEC attributes (`af_spec_*` below) on a link.
pub async fn set_af_spec(handle: &Handle, index: u32, spec: Vec<u8>) -> Result<(), NetlinkError> {
    let message = LinkUnspec::new_with_index(index)
        .append_extra_attribute(LinkAttribute::AfSpecUnknown(spec))
        .build();
    let what = || format!("set per-device IP settings of link {index}");
    execute(handle.link().set(message).execute(), what).await
}

/// Turns off IPv6 addresses on a link. A link without IPv6 at all (MTU
/// under 1280, or IPv6 disabled in the kernel) answers EAFNOSUPPORT: there
/// is nothing to turn off, which is what was asked.
pub async fn no_ipv6_addresses(handle: &Handle, index: u32) -> Result<(), NetlinkError> {
    let message = LinkUnspec::new_with_index(index)
        .append_extra_attribute(LinkAttribute::AfSpecUnknown(af_spec_no_ipv6_addresses()))
        .build();
    match handle.link().set(message).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EAFNOSUPPORT => Ok(()),
        other => other.map_err(|e| NetlinkError::new(format!("turn off IPv6 on link {index}"), e)),
    }
}

/// Adds (or, with `replace`, replaces) an IPv4 address on a link.
pub async fn add_address(
    handle: &Handle,
    index: u32,
    address: Ipv4Addr,
    prefix: u8,
    replace: bool,
) -> Result<(), NetlinkError> {
    let mut request = handle.address().add(index, IpAddr::V4(address), prefix);
    if replace {
        request = request.replace();
    }
    let what = || format!("add address {address}/{prefix} to link {index}");
    execute(request.execute(), what).await
}

/// `add_link_route`, where an existing route is success.
pub async fn ensure_link_route(
    handle: &Handle,
    index: u32,
    destination: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    const EEXIST: i32 = 17;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination, prefix)
        .output_interface(index)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .build();
    match handle.route().add(route).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => Ok(()),
        other => other.map_err(|e| {
            NetlinkError::new(
                format!("route add {destination}/{prefix} on link {index}"),
                e,
            )
        }),
    }
}

/// A link-scope route to `destination/prefix` out of link `index`.
pub async fn add_link_route(
    handle: &Handle,
    index: u32,
    destination: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination, prefix)
        .output_interface(index)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .build();
    let what = || format!("route add {destination}/{prefix} on link {index}");
    execute(handle.route().add(route).execute(), what).await
}

/// The peer end of a new veth pair, as the namespace will receive it.
pub struct VethPeer<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub netns: &'a OwnedFd,
}

/// Creates veth `host` on `master`, with MTU `mtu`, up; its peer is made
/// directly in the peer's namespace (IFLA_NET_NS_FD), with its MAC and MTU.
pub async fn add_veth(
    handle: &Handle,
    host: &str,
    master: u32,
    peer: &VethPeer<'_>,
) -> Result<(), NetlinkError> {
    let peer_message = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.name.to_owned())
        .address(peer.mac.to_vec())
        .mtu(u32::from(peer.mtu))
        .setns_by_fd(peer.netns.as_raw_fd())
        .build();
    let message = LinkVeth::new(host, peer.name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
        .mtu(u32::from(peer.mtu))
        .controller(master)
        .up()
        .build();
    let what = || format!("create veth pair {host}");
    execute(handle.link().add(message).execute(), what).await
}

pub async fn delete(handle: &Handle, index: u32) -> Result<(), NetlinkError> {
    let what = || format!("delete link {index}");
    execute(handle.link().del(index).execute(), what).await
}

async fn execute(
    request: impl Future<Output = Result<(), rtnetlink::Error>>,
    what: impl FnOnce() -> String,
) -> Result<(), NetlinkError> {
    request.await.map_err(|e| NetlinkError::new(what(), e))
}

/// IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { index: u32 ... } } }: only
/// the settings named change (the kernel sets each nla it is given).
pub fn af_spec_inet_conf(settings: &[(u16, u32)]) -> Vec<u8> {
    let conf: Vec<u8> = settings
        .iter()
        .flat_map(|(index, value)| nla(*index, &value.to_ne_bytes()))
        .collect();
    nla(
        AF_INET | NLA_F_NESTED,
        &nla(IFLA_INET_CONF | NLA_F_NESTED, &conf),
    )
}

/// IFLA_AF_SPEC { AF_INET6 { IFLA_INET6_ADDR_GEN_MODE: NONE } }: the link
/// gets no IPv6 link-local address, so the kernel sends no router
/// solicitations out of it. (IFLA_INET6_CONF, where disable_ipv6 lives,
/// is read-only over netlink.)
pub fn af_spec_no_ipv6_addresses() -> Vec<u8> {
    let mode = nla(IFLA_INET6_ADDR_GEN_MODE, &[IN6_ADDR_GEN_MODE_NONE]);
    nla(AF_INET6 | NLA_F_NESTED, &mode)
}

/// One netlink attribute: length, type, value, padded to 4 bytes.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let length = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(value.len() + 8);
    out.extend_from_slice(&length.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_conf_nests_each_setting_by_its_devconf_index() {
        let spec =
            af_spec_inet_conf(&[(IPV4_DEVCONF_ARP_IGNORE, 1), (IPV4_DEVCONF_ARP_ANNOUNCE, 2)]);
        let mut expected = Vec::new();
        for (len, kind) in [
            (24u16, AF_INET | NLA_F_NESTED),
            (20, IFLA_INET_CONF | NLA_F_NESTED),
        ] {
            expected.extend_from_slice(&len.to_ne_bytes());
            expected.extend_from_slice(&kind.to_ne_bytes());
        }
        for (kind, value) in [(19u16, 1u32), (18, 2)] {
            expected.extend_from_slice(&8u16.to_ne_bytes());
            expected.extend_from_slice(&kind.to_ne_bytes());
            expected.extend_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(spec, expected);
    }

    #[test]
    fn addr_gen_mode_is_one_padded_byte() {
        let spec = af_spec_no_ipv6_addresses();
        assert_eq!(spec.len(), 12);
        assert_eq!(u16::from_ne_bytes([spec[0], spec[1]]), 12);
        assert_eq!(
            u16::from_ne_bytes([spec[2], spec[3]]),
            AF_INET6 | NLA_F_NESTED
        );
        assert_eq!(u16::from_ne_bytes([spec[4], spec[5]]), 5);
        assert_eq!(u16::from_ne_bytes([spec[6], spec[7]]), 8);
        assert_eq!(&spec[8..], &[1, 0, 0, 0]);
    }
}
