//! L2 isolation on the TAP bridge: the nftables ruleset, as text.
//!
//! The kernel filters every frame a container puts on the bridge. Without
//! a policy that can deny, the agent never sees container-to-container
//! frames; with one, the forward chain sends them through the agent. One table, `bridge meshnet`, holds:
//!
//! ```text
//! prerouting (hook, policy accept)
//!   iifname vmap @ports            -> the sending port's own chain
//!   iifname "mv*" drop             fail closed: a port without a chain
//! c_<port>
//!   ether saddr != MAC drop        its own MAC only
//!   ip saddr ADDR accept           IPv4 from its own address only
//!   arp ... saddr MAC/ADDR accept  ARP only about itself
//!   drop                           any other source or ethertype
//! input (hook, policy accept)
//!   iifname "mv*" ether type != arp drop
//! forward (hook, policy accept)
//!   iifname "mv*" oifname "mv*" drop   only under a policy that can deny
//! ```
//!
//! The input rule keeps containers off the host's own addresses (frames
//! for the bridge itself); ARP still passes, because the host resolves a
//! container's MAC to answer the DNS the agent hands it from the TAP port.
//! 169.254.169.250 stays reachable: the agent answers ARP for it, so
//! those frames go to the agent's TAP port (forwarded, not input).
//! The kernel has no bridge conntrack, so every rule is stateless.
//!
//! Must never: do IO, or emit a name it has not checked (the text is a
//! script for `nft -f`); every script is one atomic transaction.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::ethernet::Mac;

/// The agent's table in the bridge family.
pub const TABLE: &str = "meshnet";
/// Host ends of container veths are named `mv` + 8 hex digits; the
/// fail-closed rule drops anything from such a port that has no chain.
pub const PORT_PREFIX: &str = "mv";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsolationError {
    #[error("{0:?} is not a container port name (mv followed by 8 hex digits)")]
    BadPortName(String),
}

/// The host end of a container's veth, checked: it is written into an
/// nft script, so nothing but the shape the agent gives host veths passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortName(String);

impl PortName {
    pub fn new(name: &str) -> Result<Self, IsolationError> {
        let hex = name
            .strip_prefix(PORT_PREFIX)
            .filter(|h| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        match hex {
            Some(_) => Ok(Self(name.to_owned())),
            None => Err(IsolationError::BadPortName(name.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn chain(&self) -> String {
        format!("c_{}", self.0)
    }
}

/// A container's port on the bridge and what it may send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: PortName,
    pub mac: Mac,
    pub address: Ipv4Addr,
}

impl Port {
    pub fn new(name: &str, mac: Mac, address: Ipv4Addr) -> Result<Self, IsolationError> {
        Ok(Self {
            name: PortName::new(name)?,
            mac,
            address,
        })
    }
}

/// Replaces the whole table with one holding exactly `ports`. The first
/// line creates the table if it is missing, so the delete cannot fail:
/// a stale or tampered table is swapped out in the same transaction.
/// With `hairpin` (a policy that can deny), containers cannot reach each
/// other directly: the agent answers their ARP for each other, and their
/// traffic passes the policy on its way through it.
pub fn full_table(ports: &[Port], hairpin: bool) -> String {
    let mut s = format!("table bridge {TABLE}\ndelete table bridge {TABLE}\n");
    let _ = writeln!(s, "table bridge {TABLE} {{");
    s.push_str("  map ports { type ifname : verdict; }\n");
    for port in ports {
        let _ = writeln!(s, "  chain {} {{", port.name.chain());
        for rule in port_rules(port) {
            let _ = writeln!(s, "    {rule}");
        }
        s.push_str("  }\n");
    }
    let _ = write!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority filter; policy accept;\n    \
         iifname vmap @ports\n    iifname \"{PORT_PREFIX}*\" drop\n  }}\n  \
         chain input {{\n    type filter hook input priority filter; policy accept;\n    \
         iifname \"{PORT_PREFIX}*\" ether type != arp drop\n  }}\n"
    );
    let _ = write!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{}  }}\n}}\n",
        if hairpin { HAIRPIN_RULE_INDENTED } else { "" }
    );
    for port in ports {
        s.push_str(&map_add(&port.name));
    }
    s
}

const HAIRPIN_RULE_INDENTED: &str = "    iifname \"mv*\" oifname \"mv*\" drop\n";

/// Sets whether containers reach each other only through the agent, in
/// one transaction, leaving every port's chain alone.
pub fn hairpin(on: bool) -> String {
    let mut s = format!(
        "add chain bridge {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain bridge {TABLE} forward\n"
    );
    if on {
        let _ = writeln!(
            s,
            "add rule bridge {TABLE} forward iifname \"{PORT_PREFIX}*\" oifname \"{PORT_PREFIX}*\" drop"
        );
    }
    s
}

/// Gives a new port its chain. A leftover chain of the same name is
/// emptied first, so the result is the same whatever was there.
pub fn add_port(port: &Port) -> String {
    let chain = port.name.chain();
    let mut s = format!("add chain bridge {TABLE} {chain}\nflush chain bridge {TABLE} {chain}\n");
    for rule in port_rules(port) {
        let _ = writeln!(s, "add rule bridge {TABLE} {chain} {rule}");
    }
    s.push_str(&map_add(&port.name));
    s
}

/// Removes a port's chain. It first adds what it removes (both `add`s are
/// no-ops when present), so removing an absent port succeeds too.
pub fn remove_port(name: &PortName) -> String {
    let chain = name.chain();
    format!(
        "add chain bridge {TABLE} {chain}\n{}delete element bridge {TABLE} ports {{ \"{}\" }}\n\
         flush chain bridge {TABLE} {chain}\ndelete chain bridge {TABLE} {chain}\n",
        map_add(name),
        name.0,
    )
}

fn map_add(name: &PortName) -> String {
    format!(
        "add element bridge {TABLE} ports {{ \"{}\" : jump {} }}\n",
        name.0,
        name.chain()
    )
}

/// The rules of one port's chain, in order. Reached only for frames from
/// that port, so everything not accepted here is dropped.
fn port_rules(port: &Port) -> [String; 4] {
    let (mac, addr) = (port.mac, port.address);
    [
        format!("ether saddr != {mac} drop"),
        format!("ether type ip ip saddr {addr} accept"),
        format!(
            "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
             arp saddr ether {mac} arp saddr ip {addr} accept"
        ),
        "drop".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn port() -> Port {
        let addr = Ipv4Addr::new(10, 42, 1, 5);
        Port::new("mv0a2a0105", Mac::of_container(addr), addr).unwrap()
    }

    #[test]
    fn port_names_must_have_the_agents_shape() {
        assert!(PortName::new("mv0a2a0105").is_ok());
        for bad in [
            "",
            "mv",
            "eth0",
            "mv0a2a010",
            "mv0a2a01055",
            "mv0a2a01g5",
            "mv0a2a\"0105",
            "mv0a2a01;5",
            "xx0a2a0105",
        ] {
            assert_eq!(
                PortName::new(bad),
                Err(IsolationError::BadPortName(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_full_table_replaces_any_old_one_and_fails_closed() {
        assert_eq!(
            full_table(&[port()], false),
            "table bridge meshnet\n\
             delete table bridge meshnet\n\
             table bridge meshnet {\n  \
               map ports { type ifname : verdict; }\n  \
               chain c_mv0a2a0105 {\n    \
                 ether saddr != 0a:42:0a:2a:01:05 drop\n    \
                 ether type ip ip saddr 10.42.1.5 accept\n    \
                 ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 0a:42:0a:2a:01:05 arp saddr ip 10.42.1.5 accept\n    \
                 drop\n  \
               }\n  \
               chain prerouting {\n    \
                 type filter hook prerouting priority filter; policy accept;\n    \
                 iifname vmap @ports\n    \
                 iifname \"mv*\" drop\n  \
               }\n  \
               chain input {\n    \
                 type filter hook input priority filter; policy accept;\n    \
                 iifname \"mv*\" ether type != arp drop\n  \
               }\n  \
               chain forward {\n    \
                 type filter hook forward priority filter; policy accept;\n  \
               }\n\
             }\n\
             add element bridge meshnet ports { \"mv0a2a0105\" : jump c_mv0a2a0105 }\n"
        );
    }

    #[test]
    fn an_empty_table_still_has_the_fail_closed_hooks() {
        let text = full_table(&[], false);
        assert!(text.contains("iifname \"mv*\" drop"));
        assert!(text.contains("iifname \"mv*\" ether type != arp drop"));
        assert!(!text.contains("add element"));
    }

    #[test]
    fn adding_a_port_resets_its_chain_then_maps_it() {
        assert_eq!(
            add_port(&port()),
            "add chain bridge meshnet c_mv0a2a0105\n\
             flush chain bridge meshnet c_mv0a2a0105\n\
             add rule bridge meshnet c_mv0a2a0105 ether saddr != 0a:42:0a:2a:01:05 drop\n\
             add rule bridge meshnet c_mv0a2a0105 ether type ip ip saddr 10.42.1.5 accept\n\
             add rule bridge meshnet c_mv0a2a0105 ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 0a:42:0a:2a:01:05 arp saddr ip 10.42.1.5 accept\n\
             add rule bridge meshnet c_mv0a2a0105 drop\n\
             add element bridge meshnet ports { \"mv0a2a0105\" : jump c_mv0a2a0105 }\n"
        );
    }

    #[test]
    fn removing_a_port_unmaps_before_deleting_and_tolerates_absence() {
        assert_eq!(
            remove_port(&port().name),
            "add chain bridge meshnet c_mv0a2a0105\n\
             add element bridge meshnet ports { \"mv0a2a0105\" : jump c_mv0a2a0105 }\n\
             delete element bridge meshnet ports { \"mv0a2a0105\" }\n\
             flush chain bridge meshnet c_mv0a2a0105\n\
             delete chain bridge meshnet c_mv0a2a0105\n"
        );
    }

    #[test]
    fn hairpin_keeps_containers_from_reaching_each_other_directly() {
        let with = full_table(&[port()], true);
        assert!(with.contains("chain forward"), "{with}");
        assert!(
            with.contains("iifname \"mv*\" oifname \"mv*\" drop"),
            "{with}"
        );
        assert!(!full_table(&[port()], false).contains("oifname"));
        assert!(hairpin(true).contains("oifname \"mv*\" drop"));
        assert!(!hairpin(false).contains("add rule"));
        assert!(hairpin(false).contains("flush chain bridge meshnet forward"));
        // Still one table, closed once.
        assert_eq!(with.matches("\n}\n").count(), 1, "{with}");
    }
}
