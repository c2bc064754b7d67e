//! IPAM: which overlay address each local container holds.
//!
//! One authoritative table per host, drawn from the host's subnet: the
//! network and broadcast addresses and the host's own address are never
//! handed out, no address goes to two containers, and neither a container
//! name (within its stack) nor a network namespace is attached twice.
//! The agent persists the table after every change.
//! Must never: do IO; persistence belongs to the shell.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::ethernet::Mac;
use crate::membership::host_address;

/// The stack of a container attached without `--stack`.
pub const DEFAULT_STACK: &str = "default";

/// One attached container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub name: String,
    pub stack: String,
    pub service: Option<String>,
    /// The network namespace it lives in (`ip netns` name).
    pub netns: String,
    pub address: Ipv4Addr,
    pub mac: Mac,
    /// The host end of its veth pair, on the bridge.
    pub host_veth: String,
    /// Named ports it declared (SRV records).
    #[serde(default)]
    pub ports: Vec<crate::dns::ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("{0} is outside this host's subnet {1}")]
    OutsideSubnet(Ipv4Addr, Ipv4Net),
    #[error("{0} is reserved (network, broadcast or the host's own address)")]
    Reserved(Ipv4Addr),
    #[error("{address} is already held by container {holder}")]
    AddressTaken { address: Ipv4Addr, holder: String },
    #[error("a container named {name} already exists in stack {stack}")]
    NameTaken { name: String, stack: String },
    #[error("network namespace {0} is already attached")]
    NetnsTaken(String),
    #[error(transparent)]
    BadNetns(#[from] NetnsNameError),
}

/// Why a network namespace name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetnsNameError {
    #[error("the network namespace name is empty")]
    Empty,
    #[error("network namespace name {0:?} is not a name (`.` and `..` name directories)")]
    Dot(String),
    #[error("network namespace name {0:?} contains '/' or NUL")]
    Separator(String),
    #[error("network namespace name is {0} bytes long; the limit is {NETNS_NAME_MAX}")]
    TooLong(usize),
    #[error("network namespace name {0:?} starts with '-' (it would read as an option)")]
    Dash(String),
}

/// Longest namespace name: a file name under /run/netns.
pub const NETNS_NAME_MAX: usize = 255;

/// How a request names a container's network namespace: a name under
/// /run/netns (as `ip netns add` makes), or the path of a namespace file a
/// runtime holds (`/proc/PID/ns/net`, a CNI runtime's netns file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsRef<'a> {
    Name(&'a str),
    Path(&'a Path),
}

impl<'a> NetnsRef<'a> {
    /// A leading '/' makes a path; anything else must be a plain name.
    pub fn parse(text: &'a str) -> Result<Self, NetnsNameError> {
        if !text.starts_with('/') {
            check_plain_name(text)?;
            return Ok(Self::Name(text));
        }
        if text.contains('\0') {
            return Err(NetnsNameError::Separator(text.to_owned()));
        }
        if text.len() > NETNS_PATH_MAX {
            return Err(NetnsNameError::TooLong(text.len()));
        }
        // No `.`/`..`: the path a record keeps is the one that was opened.
        let path = Path::new(text);
        if path
            .components()
            .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
            || text.contains("/./")
            || text.ends_with("/.")
        {
            return Err(NetnsNameError::Dot(text.to_owned()));
        }
        Ok(Self::Path(path))
    }

    /// The file to open.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Name(name) => Path::new("/run/netns").join(name),
            Self::Path(path) => path.to_path_buf(),
        }
    }

    /// The name, for a named namespace (only those get /etc/netns files).
    pub fn name(&self) -> Option<&'a str> {
        match self {
            Self::Name(name) => Some(name),
            Self::Path(_) => None,
        }
    }
}

/// Longest namespace path (PATH_MAX).
pub const NETNS_PATH_MAX: usize = 4096;

/// Checks that `name` is a namespace path (see [`NetnsRef`]) or can only
/// mean a file directly in /run/netns (and /etc/netns, where the agent
/// writes the container's resolv.conf).
pub fn check_netns_name(name: &str) -> Result<(), NetnsNameError> {
    NetnsRef::parse(name).map(|_| ())
}

fn check_plain_name(name: &str) -> Result<(), NetnsNameError> {
    if name.is_empty() {
        return Err(NetnsNameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(NetnsNameError::Dot(name.to_owned()));
    }
    if name.contains(['/', '\0']) {
        return Err(NetnsNameError::Separator(name.to_owned()));
    }
    if name.len() > NETNS_NAME_MAX {
        return Err(NetnsNameError::TooLong(name.len()));
    }
    if name.starts_with('-') {
        return Err(NetnsNameError::Dash(name.to_owned()));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Ipam {
    subnet: Ipv4Net,
    by_address: BTreeMap<Ipv4Addr, Container>,
}

impl Ipam {
    pub fn new(subnet: Ipv4Net) -> Self {
        Self {
            subnet,
            by_address: BTreeMap::new(),
        }
    }

    /// The block addresses are chosen from.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// Rebuilds the table from persisted records, refusing any record
    /// that breaks a rule (it is returned with the reason, for logging).
    pub fn restore(
        subnet: Ipv4Net,
        records: Vec<Container>,
    ) -> (Self, Vec<(Container, IpamError)>) {
        let mut ipam = Self::new(subnet);
        let mut refused = Vec::new();
        for c in records {
            if let Err(e) = ipam.insert(c.clone()) {
                refused.push((c, e));
            }
        }
        (ipam, refused)
    }

    /// The address a new container would get: `requested` if it is free,
    /// otherwise the lowest free one.
    pub fn choose(&self, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        if let Some(addr) = requested {
            self.check_free(addr)?;
            return Ok(addr);
        }
        self.assignable()
            .find(|a| !self.by_address.contains_key(a))
            .ok_or(IpamError::Exhausted(self.subnet))
    }

    /// Records a container, checking every rule.
    pub fn insert(&mut self, container: Container) -> Result<(), IpamError> {
        check_netns_name(&container.netns)?;
        self.check_free(container.address)?;
        if let Some(other) = self
            .by_address
            .values()
            .find(|c| c.netns == container.netns)
        {
            return Err(IpamError::NetnsTaken(other.netns.clone()));
        }
        if self
            .by_address
            .values()
            .any(|c| c.name == container.name && c.stack == container.stack)
        {
            return Err(IpamError::NameTaken {
                name: container.name,
                stack: container.stack,
            });
        }
        self.by_address.insert(container.address, container);
        Ok(())
    }

    /// Frees the container in `netns`, returning its record.
    pub fn release(&mut self, netns: &str) -> Option<Container> {
        let addr = self.by_address.values().find(|c| c.netns == netns)?.address;
        self.by_address.remove(&addr)
    }

    pub fn by_netns(&self, netns: &str) -> Option<&Container> {
        self.by_address.values().find(|c| c.netns == netns)
    }

    pub fn containers(&self) -> impl Iterator<Item = &Container> {
        self.by_address.values()
    }

    fn check_free(&self, addr: Ipv4Addr) -> Result<(), IpamError> {
        if !self.subnet.contains(&addr) {
            return Err(IpamError::OutsideSubnet(addr, self.subnet));
        }
        if addr == self.subnet.network()
            || addr == self.subnet.broadcast()
            || addr == host_address(self.subnet)
        {
            return Err(IpamError::Reserved(addr));
        }
        if let Some(holder) = self.by_address.get(&addr) {
            return Err(IpamError::AddressTaken {
                address: addr,
                holder: holder.name.clone(),
            });
        }
        Ok(())
    }

    fn assignable(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(host_address(self.subnet)) + 1;
        let last = u32::from(self.subnet.broadcast());
        (first..last).map(Ipv4Addr::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, netns: &str, address: Ipv4Addr) -> Container {
        Container {
            name: name.into(),
            stack: DEFAULT_STACK.into(),
            service: None,
            netns: netns.into(),
            address,
            mac: Mac::of_container(address),
            host_veth: format!("mv{name}"),
            ports: Vec::new(),
        }
    }

    fn ipam() -> Ipam {
        Ipam::new("10.42.1.0/29".parse().unwrap())
    }

    fn attach(ipam: &mut Ipam, name: &str) -> Result<Ipv4Addr, IpamError> {
        let addr = ipam.choose(None)?;
        ipam.insert(container(name, &format!("ns-{name}"), addr))?;
        Ok(addr)
    }

    #[test]
    fn allocates_lowest_free_addresses_skipping_reserved_ones() {
        let mut ipam = ipam();
        let got: Vec<_> = (0..5)
            .map(|i| attach(&mut ipam, &format!("c{i}")).unwrap())
            .collect();
        let want: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(10, 42, 1, i)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut ipam = ipam();
        for i in 0..5 {
            attach(&mut ipam, &format!("c{i}")).unwrap();
        }
        assert_eq!(
            attach(&mut ipam, "c5"),
            Err(IpamError::Exhausted("10.42.1.0/29".parse().unwrap()))
        );
    }

    #[test]
    fn released_addresses_return_to_the_pool() {
        let mut ipam = ipam();
        attach(&mut ipam, "a").unwrap();
        let b = attach(&mut ipam, "b").unwrap();
        attach(&mut ipam, "c").unwrap();
        assert_eq!(ipam.release("ns-b").unwrap().address, b);
        assert_eq!(ipam.release("ns-b"), None);
        assert_eq!(attach(&mut ipam, "d").unwrap(), b);
    }

    #[test]
    fn requested_addresses_are_checked() {
        let mut ipam = ipam();
        let a = attach(&mut ipam, "a").unwrap();
        assert_eq!(
            ipam.choose(Some(Ipv4Addr::new(10, 42, 1, 5))),
            Ok(Ipv4Addr::new(10, 42, 1, 5))
        );
        assert!(matches!(
            ipam.choose(Some(a)),
            Err(IpamError::AddressTaken { .. })
        ));
        assert!(matches!(
            ipam.choose(Some(Ipv4Addr::new(10, 42, 2, 5))),
            Err(IpamError::OutsideSubnet(..))
        ));
        for reserved in [0, 1, 7] {
            let addr = Ipv4Addr::new(10, 42, 1, reserved);
            assert_eq!(ipam.choose(Some(addr)), Err(IpamError::Reserved(addr)));
        }
    }

    #[test]
    fn names_and_namespaces_are_unique() {
        let mut ipam = ipam();
        attach(&mut ipam, "web").unwrap();
        let same_name = container("web", "ns-other", Ipv4Addr::new(10, 42, 1, 5));
        assert!(matches!(
            ipam.insert(same_name.clone()),
            Err(IpamError::NameTaken { .. })
        ));
        let other_stack = Container {
            stack: "shop".into(),
            ..same_name
        };
        assert!(
            ipam.insert(other_stack).is_ok(),
            "the same name in another stack is fine"
        );
        let same_ns = container("db", "ns-web", Ipv4Addr::new(10, 42, 1, 6));
        assert!(matches!(
            ipam.insert(same_ns),
            Err(IpamError::NetnsTaken(_))
        ));
    }

    #[test]
    fn persisted_records_round_trip_and_bad_ones_are_refused() {
        let mut ipam = ipam();
        attach(&mut ipam, "a").unwrap();
        attach(&mut ipam, "b").unwrap();
        let json = serde_json::to_string(&ipam.containers().cloned().collect::<Vec<_>>()).unwrap();
        let mut records: Vec<Container> = serde_json::from_str(&json).unwrap();
        records.push(container("dup", "ns-dup", Ipv4Addr::new(10, 42, 1, 2)));
        let (restored, refused) = Ipam::restore("10.42.1.0/29".parse().unwrap(), records);
        assert_eq!(restored.containers().count(), 2);
        assert_eq!(
            restored.by_netns("ns-a").unwrap().address,
            Ipv4Addr::new(10, 42, 1, 2)
        );
        assert_eq!(refused.len(), 1);
        assert!(matches!(refused[0].1, IpamError::AddressTaken { .. }));
    }

    #[test]
    fn netns_names_that_escape_or_read_as_options_are_refused() {
        for ok in [
            "c1",
            "web-1",
            ".hidden",
            "a..b",
            "x".repeat(255).as_str(),
            "ns.with.dots",
        ] {
            assert_eq!(check_netns_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_netns_name(""), Err(NetnsNameError::Empty));
        for dot in [".", ".."] {
            assert_eq!(check_netns_name(dot), Err(NetnsNameError::Dot(dot.into())));
        }
        for sep in ["a/b", "../etc", "a\0b", "/abs\0"] {
            assert_eq!(
                check_netns_name(sep),
                Err(NetnsNameError::Separator(sep.into()))
            );
        }
        assert_eq!(
            check_netns_name(&"x".repeat(256)),
            Err(NetnsNameError::TooLong(256))
        );
        for dash in ["-n", "--all", "-"] {
            assert_eq!(
                check_netns_name(dash),
                Err(NetnsNameError::Dash(dash.into()))
            );
        }
        let err = check_netns_name("..").unwrap_err().to_string();
        assert!(err.contains("\"..\""), "{err}");
    }

    #[test]
    fn namespace_paths_are_accepted_without_dot_components() {
        assert_eq!(
            NetnsRef::parse("/proc/42/ns/net"),
            Ok(NetnsRef::Path(Path::new("/proc/42/ns/net")))
        );
        assert_eq!(
            NetnsRef::parse("c1").map(|r| r.path()),
            Ok(PathBuf::from("/run/netns/c1"))
        );
        assert_eq!(NetnsRef::parse("c1").map(|r| r.name()), Ok(Some("c1")));
        assert_eq!(NetnsRef::parse("/run/netns/c1").map(|r| r.name()), Ok(None));
        for dots in ["/run/netns/../x", "/run/./netns/x", "/run/netns/."] {
            assert_eq!(
                NetnsRef::parse(dots),
                Err(NetnsNameError::Dot(dots.into())),
                "{dots}"
            );
        }
        let long = format!("/{}", "x".repeat(NETNS_PATH_MAX));
        assert_eq!(
            check_netns_name(&long),
            Err(NetnsNameError::TooLong(long.len()))
        );
    }

    #[test]
    fn saved_records_with_bad_netns_names_are_refused() {
        let records = vec![container("a", "..", Ipv4Addr::new(10, 42, 1, 2))];
        let (restored, refused) = Ipam::restore("10.42.1.0/29".parse().unwrap(), records);
        assert_eq!(restored.containers().count(), 0);
        assert!(matches!(
            refused[0].1,
            IpamError::BadNetns(NetnsNameError::Dot(_))
        ));
    }
}
