//! Where each record lives under the store prefix, and how it is encoded.
//!
//! ```text
//! <prefix>/config                 {"overlay":"10.42.0.0/16","block_prefix":24}   written once
//! <prefix>/hosts/<name>           {"public_key":..,"endpoints":[..],"block":..}  on the host's lease
//! <prefix>/blocks/10.42.7.0-24    {"owner":"h1","public_key":..}                 durable, no lease
//! <prefix>/records/<name>         {"host":..,"address":..,"containers":[..]}     on the host's lease
//! ```
//! `records/<name>` is the host's whole DNS record set (`dns::HostRecords`,
//! the same value the mesh's records sync shares): one key per host, never
//! one per container.
//! Values are JSON so an operator can read them with `etcdctl get`. Must
//! never: trust a value: every decode is fallible and a bad one is skipped.

use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;

/// The store prefix unless configured; `v1` names this layout.
pub const DEFAULT_PREFIX: &str = "/meshnet/v1";

/// The cluster-wide settings the first host writes and the rest adopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub overlay: Ipv4Net,
    pub block_prefix: u8,
}

/// A live host: what peers need to build a tunnel to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub public_key: PublicKey,
    /// Where peers reach it, best first; empty waits to be contacted.
    pub endpoints: Vec<SocketAddr>,
    pub block: Ipv4Net,
}

/// Who owns a block. The full public key is the fingerprint: it is public,
/// and a host record only counts when its key matches its block's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub owner: String,
    pub public_key: PublicKey,
}

/// A key under the prefix, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Config,
    Host(String),
    Block(Ipv4Net),
    Records(String),
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything this layout owns (for list and watch with a prefix).
    pub fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn config(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn host(&self, name: &str) -> String {
        format!("{}/hosts/{name}", self.prefix)
    }

    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }

    pub fn records(&self, name: &str) -> String {
        format!("{}/records/{name}", self.prefix)
    }

    pub fn blocks(&self) -> String {
        format!("{}/blocks/", self.prefix)
    }

    /// `blocks/10.42.7.0-24`: '/' cannot appear inside a key segment.
    pub fn block(&self, block: Ipv4Net) -> String {
        format!(
            "{}/blocks/{}-{}",
            self.prefix,
            block.network(),
            block.prefix_len()
        )
    }

    /// Parses a key of this layout; `None` for anything else (another
    /// version's keys, garbage).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        if rest == "config" {
            return Some(Key::Config);
        }
        if let Some(name) = rest.strip_prefix("hosts/") {
            return crate::membership::is_dns_label(name).then(|| Key::Host(name.to_owned()));
        }
        if let Some(name) = rest.strip_prefix("records/") {
            return crate::membership::is_dns_label(name).then(|| Key::Records(name.to_owned()));
        }
        let (addr, len) = rest.strip_prefix("blocks/")?.split_once('-')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let net = Ipv4Net::new(addr, len.parse().ok()?).ok()?;
        (net.trunc() == net).then_some(Key::Block(net))
    }
}

/// Encodes a record as its JSON value.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty value would be
    // refused by every decoder anyway.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes a record; `None` for a value this version cannot read.
pub fn decode<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Option<T> {
    serde_json::from_slice(value).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from([n; 32])
    }

    #[test]
    fn keys_round_trip() {
        let l = Layout::new("/meshnet/v1/");
        assert_eq!(l.config(), "/meshnet/v1/config");
        assert_eq!(l.host("h1"), "/meshnet/v1/hosts/h1");
        let b: Ipv4Net = "10.42.7.0/24".parse().unwrap();
        assert_eq!(l.block(b), "/meshnet/v1/blocks/10.42.7.0-24");
        assert_eq!(l.parse(l.block(b).as_bytes()), Some(Key::Block(b)));
        assert_eq!(
            l.parse(b"/meshnet/v1/hosts/h1"),
            Some(Key::Host("h1".into()))
        );
        assert_eq!(l.parse(b"/meshnet/v1/config"), Some(Key::Config));
        assert_eq!(l.records("h1"), "/meshnet/v1/records/h1");
        assert_eq!(
            l.parse(l.records("h1").as_bytes()),
            Some(Key::Records("h1".into()))
        );
    }

    #[test]
    fn foreign_or_malformed_keys_are_ignored() {
        let l = Layout::new(DEFAULT_PREFIX);
        for bad in [
            &b"/meshnet/v2/config"[..],
            b"/meshnet/v1/hosts/bad name",
            b"/meshnet/v1/hosts/",
            b"/meshnet/v1/records/",
            b"/meshnet/v1/records/a.b",
            b"/meshnet/v1/records/h1/x",
            b"/meshnet/v1/blocks/10.42.7.1-24",
            b"/meshnet/v1/blocks/10.42.7.0-33",
            b"/meshnet/v1/blocks/10.42.7.0",
            b"/meshnet/v1x/config",
            b"\xff\xfe",
        ] {
            assert_eq!(l.parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let h = HostRecord {
            public_key: key(1),
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            block: "10.42.7.0/24".parse().unwrap(),
        };
        assert_eq!(decode::<HostRecord>(&encode(&h)), Some(h));
        let b = BlockRecord {
            owner: "h1".into(),
            public_key: key(2),
        };
        assert_eq!(decode::<BlockRecord>(&encode(&b)), Some(b));
        assert_eq!(decode::<HostRecord>(b"{\"public_key\":1}"), None);
        assert_eq!(decode::<ClusterRecord>(b""), None);
    }
}
