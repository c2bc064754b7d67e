//! MAC addresses and Ethernet framing for TAP mode.
//!
//! Must never: produce a multicast or globally-administered MAC; every MAC
//! meshnet invents has the locally-administered bit set.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

pub const ETHERNET_HEADER: usize = 14;
pub const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
pub const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// The agent's MAC: stable across restarts because it comes from the
    /// host's public key, so neighbour caches stay valid.
    pub fn of_agent(key: &PublicKey) -> Mac {
        Self::local(0x02, key.as_bytes())
    }

    /// The bridge's MAC (the host's own overlay address lives there).
    pub fn of_bridge(key: &PublicKey) -> Mac {
        Self::local(0x06, key.as_bytes())
    }

    /// A container's MAC, from its overlay address (unique in the cluster).
    pub fn of_container(addr: Ipv4Addr) -> Mac {
        let o = addr.octets();
        Mac([0x0a, 0x42, o[0], o[1], o[2], o[3]])
    }

    fn local(first: u8, key: &[u8; 32]) -> Mac {
        Mac([first, key[0], key[1], key[2], key[3], key[4]])
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let mut mac = [0u8; 6];
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        for (byte, part) in mac.iter_mut().zip(parts) {
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(mac))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The fields of an Ethernet II header meshnet looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub destination: Mac,
    pub source: Mac,
    pub ethertype: [u8; 2],
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    pub fn parse(frame: &'a [u8]) -> Option<Self> {
        let header = frame.get(..ETHERNET_HEADER)?;
        let mac = |r: std::ops::Range<usize>| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&header[r]);
            Mac(m)
        };
        Some(Frame {
            destination: mac(0..6),
            source: mac(6..12),
            ethertype: [header[12], header[13]],
            payload: &frame[ETHERNET_HEADER..],
        })
    }
}

/// Writes an Ethernet II header into the first 14 bytes of `out`.
pub fn write_header(out: &mut [u8], destination: Mac, source: Mac, ethertype: [u8; 2]) {
    out[0..6].copy_from_slice(&destination.0);
    out[6..12].copy_from_slice(&source.0);
    out[12..14].copy_from_slice(&ethertype);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    #[test]
    fn invented_macs_are_local_unicast_and_stable() {
        let key = PrivateKey::generate().unwrap().public_key();
        for mac in [
            Mac::of_agent(&key),
            Mac::of_bridge(&key),
            Mac::of_container(Ipv4Addr::new(10, 42, 1, 5)),
        ] {
            assert_eq!(
                mac.0[0] & 0b11,
                0b10,
                "{mac} is not locally administered unicast"
            );
        }
        assert_eq!(Mac::of_agent(&key), Mac::of_agent(&key));
        assert_ne!(Mac::of_agent(&key), Mac::of_bridge(&key));
        assert_eq!(
            Mac::of_container(Ipv4Addr::new(10, 42, 1, 5)).to_string(),
            "0a:42:0a:2a:01:05"
        );
    }

    #[test]
    fn mac_text_round_trips() {
        let mac: Mac = "0a:42:0a:2a:01:05".parse().unwrap();
        assert_eq!(mac.to_string(), "0a:42:0a:2a:01:05");
        assert!("0a:42".parse::<Mac>().is_err());
        assert!("zz:42:0a:2a:01:05".parse::<Mac>().is_err());
    }

    #[test]
    fn frames_parse_and_short_ones_do_not() {
        let mut f = [0u8; 20];
        write_header(
            &mut f,
            Mac::BROADCAST,
            Mac([2, 0, 0, 0, 0, 1]),
            ETHERTYPE_ARP,
        );
        let parsed = Frame::parse(&f).unwrap();
        assert_eq!(parsed.destination, Mac::BROADCAST);
        assert!(parsed.destination.is_multicast());
        assert_eq!(parsed.ethertype, ETHERTYPE_ARP);
        assert_eq!(parsed.payload.len(), 6);
        assert!(Frame::parse(&f[..13]).is_none());
    }
}
