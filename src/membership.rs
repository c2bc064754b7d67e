//! The set of peers this host should have tunnels to: the one seam through
//! which membership reaches the agent.
//!
//! Today the source is the static TOML config (and its reload on SIGHUP);
//! later sources (records shared over the mesh, etcd) publish the same
//! `Membership` value. The agent watches for a new value and applies it
//! between packets; the data path never waits on a source.
//!
//! Must never: do IO or block. These are plain values.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;

use crate::keys::{PresharedKey, PublicKey};

/// One remote host of the mesh, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    pub public_key: PublicKey,
    /// Where to reach it; `None` waits to be contacted (its endpoint is then
    /// learned from its first authenticated packet).
    pub endpoint: Option<SocketAddr>,
    /// The block of the overlay this peer owns: traffic to it goes to this
    /// peer, and only this peer may send from it.
    pub subnet: Ipv4Net,
    /// Persistent keepalive interval in seconds, as in `wg`.
    pub keepalive: Option<u16>,
    /// Mixed into every handshake with this peer (the peer's own key, or
    /// the cluster's).
    pub preshared_key: Option<PresharedKey>,
}

/// Everything the agent needs to know about the rest of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub peers: Vec<PeerSpec>,
}

/// The overlay address a host takes for itself: the first of its subnet.
pub fn host_address(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
}

/// Whether `name` can be a DNS label (host, container, stack and service
/// names all become parts of DNS names): 1-63 letters, digits or '-', not
/// starting or ending with '-'.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["h1", "web-2", "A", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a b", "a.b", "ä", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
