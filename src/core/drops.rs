//! Why a packet was dropped, and how many were.
//!
//! A drop is not an error: it is counted here and logged at debug level at
//! most. Must never: log per packet at info level or above.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// From the device: not IPv4 (the overlay is IPv4-only).
    NotIpv4,
    /// From the device: an IPv4 header that does not parse.
    Malformed,
    /// From the device: the source is not an address of this host's subnet.
    ForeignSource,
    /// TAP mode: a local source address from a MAC that does not hold it.
    SpoofedSource,
    /// From the device: no peer owns the destination.
    NoRoute,
    /// The owning peer has no known endpoint yet.
    NoEndpoint,
    /// From the underlay: not a WireGuard message.
    InvalidDatagram,
    /// A handshake from a key that is not one of our peers.
    UnknownPeer,
    /// A message for a session index no peer has.
    UnknownIndex,
    /// Failed authentication, replay, or a handshake refused.
    Rejected,
    /// Decrypted, but the inner source is outside the sender's subnet.
    CryptokeyMismatch,
    /// Decrypted, but the inner destination is not this host's subnet.
    NotForUs,
    /// TAP mode: decrypted for a local address no container holds.
    NoNeighbour,
    /// The device or socket refused a packet.
    IoError,
    /// To or from the records-sync port, but not between two agents: a
    /// local process, a container, or anything but the peer's own agent.
    SyncPort,
    /// A records-sync message arrived faster than the sync task takes them.
    SyncBacklog,
    /// A handshake message from a source over its per-second budget.
    HandshakeFlood,
    /// The policy denied a packet from this host's side, before sealing.
    PolicyEgress,
    /// The policy denied a packet a peer sealed, after decryption.
    PolicyIngress,
    /// The policy denied a packet between two containers of this host.
    PolicyLocal,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::NotIpv4,
        DropReason::Malformed,
        DropReason::ForeignSource,
        DropReason::SpoofedSource,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::InvalidDatagram,
        DropReason::UnknownPeer,
        DropReason::UnknownIndex,
        DropReason::Rejected,
        DropReason::CryptokeyMismatch,
        DropReason::NotForUs,
        DropReason::NoNeighbour,
        DropReason::IoError,
        DropReason::SyncPort,
        DropReason::SyncBacklog,
        DropReason::HandshakeFlood,
        DropReason::PolicyEgress,
        DropReason::PolicyIngress,
        DropReason::PolicyLocal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::Malformed => "malformed",
            DropReason::ForeignSource => "foreign_source",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::InvalidDatagram => "invalid_datagram",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::UnknownIndex => "unknown_index",
            DropReason::Rejected => "rejected",
            DropReason::CryptokeyMismatch => "cryptokey_mismatch",
            DropReason::NotForUs => "not_for_us",
            DropReason::NoNeighbour => "no_neighbour",
            DropReason::IoError => "io_error",
            DropReason::SyncPort => "sync_port",
            DropReason::SyncBacklog => "sync_backlog",
            DropReason::HandshakeFlood => "handshake_flood",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::PolicyLocal => "policy_local",
        }
    }
}

/// One counter per reason; a plain array so counting is one add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    pub fn count(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Non-zero counters, for reports.
    pub fn nonzero(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.get(*r)))
            .filter(|(_, n)| *n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let mut c = DropCounters::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            for _ in 0..=i {
                c.count(*r);
            }
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(c.get(*r), i as u64 + 1, "{}", r.as_str());
        }
        assert_eq!(c.nonzero().count(), DropReason::ALL.len());
    }
}
