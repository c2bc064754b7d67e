//! The store as this host last saw it, kept current from a listing and
//! the watch events after it, and turned into the agent's `Membership`.
//!
//! Only what etcd says changes the view: a put, an observed delete, or a
//! re-list (after compaction) whose diff removes what vanished meanwhile.
//! A connection error changes nothing, so the data plane keeps its peers
//! through an outage. The view persists as a `Snapshot` so a restart during
//! an outage starts from it. Must never: panic on a value from the store
//! (it is skipped and counted), or let a host record count as a peer
//! unless its block's owner record names the same host and key.
//!
//! DNS record sets (`records/<name>`) are held here as read; whether one
//! is valid for its host (names, limits, addresses inside that host's
//! block) is decided by `dns::sync::RecordsSync`, like a mesh snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::layout::{self, BlockRecord, ClusterRecord, HostRecord, Key, Layout};
use crate::dns::HostRecords;
use crate::keys::PresharedKey;
use crate::membership::{Membership, PeerSpec};

/// One change seen on the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
}

/// What a re-list changed: host names that vanished or appeared while the
/// watch was not looking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub removed: Vec<String>,
    pub added: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The store revision this view includes.
    pub revision: i64,
    pub cluster: Option<ClusterRecord>,
    pub hosts: BTreeMap<String, HostRecord>,
    pub blocks: BTreeMap<Ipv4Net, BlockRecord>,
    /// Each host's DNS records, as its `records/<name>` key holds them.
    /// (`default`: snapshots written before records lived in etcd.)
    #[serde(default)]
    pub records: BTreeMap<String, Arc<HostRecords>>,
    /// Values this version could not read (skipped).
    #[serde(skip)]
    pub undecodable: u64,
}

impl View {
    /// Applies one watch event at `revision`.
    pub fn apply(&mut self, layout: &Layout, event: Event<'_>, revision: i64) {
        self.revision = self.revision.max(revision);
        match event {
            Event::Put { key, value } => self.put(layout.parse(key), value),
            Event::Delete { key } => match layout.parse(key) {
                Some(Key::Config) => self.cluster = None,
                Some(Key::Host(name)) => {
                    self.hosts.remove(&name);
                }
                Some(Key::Block(b)) => {
                    self.blocks.remove(&b);
                }
                Some(Key::Records(name)) => {
                    self.records.remove(&name);
                }
                None => {}
            },
        }
    }

    fn put(&mut self, key: Option<Key>, value: &[u8]) {
        let ok = match key {
            None => true,
            Some(Key::Config) => layout::decode(value)
                .map(|c| self.cluster = Some(c))
                .is_some(),
            Some(Key::Host(name)) => layout::decode(value)
                .map(|h| self.hosts.insert(name, h))
                .is_some(),
            Some(Key::Block(b)) => layout::decode(value)
                .map(|o| self.blocks.insert(b, o))
                .is_some(),
            Some(Key::Records(name)) => layout::decode(value)
                .map(|r| self.records.insert(name, Arc::new(r)))
                .is_some(),
        };
        if !ok {
            self.undecodable += 1;
        }
    }

    /// Replaces the view with a full listing at `revision` and says which
    /// hosts the watch missed (deleted or added meanwhile).
    pub fn relist<'a>(
        &mut self,
        layout: &Layout,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        revision: i64,
    ) -> Diff {
        let mut fresh = View {
            revision,
            undecodable: self.undecodable,
            ..View::default()
        };
        for (key, value) in kvs {
            fresh.put(layout.parse(key), value);
        }
        let diff = Diff {
            removed: self
                .hosts
                .keys()
                .filter(|n| !fresh.hosts.contains_key(*n))
                .cloned()
                .collect(),
            added: fresh
                .hosts
                .keys()
                .filter(|n| !self.hosts.contains_key(*n))
                .cloned()
                .collect(),
        };
        *self = fresh;
        diff
    }

    /// The peers this host should have: every live host whose block's
    /// owner record names it with the same key, except `own` and any block
    /// overlapping `own_block`.
    pub fn membership(
        &self,
        own: &str,
        own_block: Ipv4Net,
        psk: Option<&PresharedKey>,
        keepalive: Option<u16>,
    ) -> Membership {
        let peers = self
            .hosts
            .iter()
            .filter(|(name, h)| {
                name.as_str() != own
                    && !h.block.contains(&own_block)
                    && !own_block.contains(&h.block)
                    && self
                        .blocks
                        .get(&h.block)
                        .is_some_and(|b| &b.owner == *name && b.public_key == h.public_key)
            })
            .map(|(name, h)| PeerSpec {
                name: name.clone(),
                public_key: h.public_key,
                endpoint: h.endpoints.first().copied(),
                subnet: h.block,
                keepalive,
                preshared_key: psk.cloned(),
            })
            .collect();
        Membership { peers }
    }

    /// Every other host's DNS records as etcd holds them (the records
    /// sync checks each against that host's block before using it).
    pub fn host_records(&self, own: &str) -> BTreeMap<String, Arc<HostRecords>> {
        self.records
            .iter()
            .filter(|(name, _)| name.as_str() != own)
            .map(|(name, r)| (name.clone(), r.clone()))
            .collect()
    }
}

/// What persists under the state dir: the view and this host's block, so
/// an agent restarted while etcd is down keeps its block and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version of this file.
    pub version: u32,
    pub name: String,
    pub block: Ipv4Net,
    pub view: View,
}

pub const SNAPSHOT_VERSION: u32 = 1;
/// The snapshot's file name under the state dir.
pub const SNAPSHOT_FILE: &str = "store-snapshot.json";

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// `None` for a file this version cannot read, or another host's.
    pub fn decode(bytes: &[u8], name: &str) -> Option<Self> {
        let s: Self = serde_json::from_slice(bytes).ok()?;
        (s.version == SNAPSHOT_VERSION && s.name == name).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys::PublicKey;

    fn l() -> Layout {
        Layout::new(layout::DEFAULT_PREFIX)
    }

    fn host(k: u8, block: &str) -> Vec<u8> {
        layout::encode(&HostRecord {
            public_key: PublicKey::from([k; 32]),
            endpoints: vec![format!("192.0.2.{k}:51820").parse().unwrap()],
            block: block.parse().unwrap(),
        })
    }

    fn owner(name: &str, k: u8) -> Vec<u8> {
        layout::encode(&BlockRecord {
            owner: name.into(),
            public_key: PublicKey::from([k; 32]),
        })
    }

    fn put<'a>(key: &'a str, value: &'a [u8]) -> Event<'a> {
        Event::Put {
            key: key.as_bytes(),
            value,
        }
    }

    fn own() -> Ipv4Net {
        "10.42.1.0/24".parse().unwrap()
    }

    /// h2 (block 2) and h3 (block 3) registered, plus this host h1.
    fn three() -> View {
        let mut v = View::default();
        let l = l();
        for (i, (k, val)) in [
            ("/meshnet/v1/blocks/10.42.1.0-24", owner("h1", 1)),
            ("/meshnet/v1/hosts/h1", host(1, "10.42.1.0/24")),
            ("/meshnet/v1/blocks/10.42.2.0-24", owner("h2", 2)),
            ("/meshnet/v1/hosts/h2", host(2, "10.42.2.0/24")),
            ("/meshnet/v1/blocks/10.42.3.0-24", owner("h3", 3)),
            ("/meshnet/v1/hosts/h3", host(3, "10.42.3.0/24")),
        ]
        .iter()
        .enumerate()
        {
            v.apply(&l, put(k, val), i64::try_from(i).unwrap() + 10);
        }
        v
    }

    fn names(m: &Membership) -> Vec<&str> {
        m.peers.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn hosts_with_matching_block_owners_become_peers_except_self() {
        let v = three();
        assert_eq!(v.revision, 15);
        let m = v.membership("h1", own(), None, None);
        assert_eq!(names(&m), ["h2", "h3"]);
        assert_eq!(
            m.peers[0].subnet,
            "10.42.2.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(
            m.peers[0].endpoint,
            Some("192.0.2.2:51820".parse().unwrap())
        );
    }

    #[test]
    fn a_host_record_without_its_block_or_with_another_key_is_not_a_peer() {
        let mut v = three();
        let l = l();
        // h4 says it has block 2 (h2's): not a peer, h2 still is.
        let h4 = host(4, "10.42.2.0/24");
        v.apply(&l, put("/meshnet/v1/hosts/h4", &h4), 20);
        // h3's record now carries another key than its block's owner record.
        let h3 = host(9, "10.42.3.0/24");
        v.apply(&l, put("/meshnet/v1/hosts/h3", &h3), 21);
        // A host claiming this host's own block.
        let h5 = host(5, "10.42.1.0/24");
        v.apply(&l, put("/meshnet/v1/hosts/h5", &h5), 22);
        assert_eq!(names(&v.membership("h1", own(), None, None)), ["h2"]);
    }

    #[test]
    fn lease_expiry_removes_the_peer_but_the_block_stays_owned() {
        let mut v = three();
        v.apply(
            &l(),
            Event::Delete {
                key: b"/meshnet/v1/hosts/h2",
            },
            30,
        );
        assert_eq!(names(&v.membership("h1", own(), None, None)), ["h3"]);
        assert_eq!(v.blocks.len(), 3, "liveness is not ownership");
        assert_eq!(v.revision, 30);
    }

    #[test]
    fn garbage_values_and_foreign_keys_are_skipped_and_counted() {
        let mut v = three();
        v.apply(&l(), put("/meshnet/v1/hosts/h7", b"not json"), 40);
        v.apply(&l(), put("/other/thing", b"x"), 41);
        assert_eq!(v.undecodable, 1);
        assert_eq!(v.hosts.len(), 3);
    }

    #[test]
    fn relist_reports_what_the_watch_missed() {
        let mut v = three();
        let l = l();
        let b4 = owner("h4", 4);
        let h4 = host(4, "10.42.4.0/24");
        let (b1, h1, b2, b3, h3) = (
            owner("h1", 1),
            host(1, "10.42.1.0/24"),
            owner("h2", 2),
            owner("h3", 3),
            host(3, "10.42.3.0/24"),
        );
        let listing: Vec<(&[u8], &[u8])> = vec![
            (b"/meshnet/v1/blocks/10.42.1.0-24", &b1),
            (b"/meshnet/v1/hosts/h1", &h1),
            (b"/meshnet/v1/blocks/10.42.2.0-24", &b2),
            (b"/meshnet/v1/blocks/10.42.3.0-24", &b3),
            (b"/meshnet/v1/hosts/h3", &h3),
            (b"/meshnet/v1/blocks/10.42.4.0-24", &b4),
            (b"/meshnet/v1/hosts/h4", &h4),
        ];
        let diff = v.relist(&l, listing, 99);
        assert_eq!(diff.removed, ["h2"]);
        assert_eq!(diff.added, ["h4"]);
        assert_eq!(v.revision, 99);
        assert_eq!(names(&v.membership("h1", own(), None, None)), ["h3", "h4"]);
    }

    fn dns(host: &str, k: u8) -> Vec<u8> {
        layout::encode(&HostRecords {
            host: host.into(),
            address: std::net::Ipv4Addr::new(10, 42, k, 1),
            containers: vec![],
        })
    }

    #[test]
    fn records_keys_are_held_until_deleted_or_relisted_away() {
        let mut v = three();
        let l = l();
        let (r1, r2, r3) = (dns("h1", 1), dns("h2", 2), dns("h3", 3));
        v.apply(&l, put("/meshnet/v1/records/h1", &r1), 50);
        v.apply(&l, put("/meshnet/v1/records/h2", &r2), 51);
        v.apply(&l, put("/meshnet/v1/records/h3", &r3), 52);
        // A garbage value leaves the last readable one in place.
        v.apply(&l, put("/meshnet/v1/records/h3", b"{}"), 53);
        assert_eq!(v.undecodable, 1);
        let others = v.host_records("h1");
        assert_eq!(others.keys().collect::<Vec<_>>(), ["h2", "h3"]);
        assert_eq!(others["h3"].host, "h3");
        v.apply(
            &l,
            Event::Delete {
                key: b"/meshnet/v1/records/h2",
            },
            54,
        );
        assert_eq!(v.host_records("h1").len(), 1);
        // A re-list without h3's key drops it too.
        v.relist(&l, vec![(&b"/meshnet/v1/records/h1"[..], &r1[..])], 60);
        assert!(v.host_records("h1").is_empty());
        assert_eq!(v.records.len(), 1);
    }

    #[test]
    fn snapshots_keep_records_and_older_ones_without_them_still_load() {
        let mut view = three();
        let r2 = dns("h2", 2);
        view.apply(&l(), put("/meshnet/v1/records/h2", &r2), 70);
        let s = Snapshot {
            version: SNAPSHOT_VERSION,
            name: "h1".into(),
            block: own(),
            view,
        };
        let back = Snapshot::decode(&s.encode(), "h1").unwrap();
        assert_eq!(back.view.host_records("h1").len(), 1);
        let mut old: serde_json::Value = serde_json::from_slice(&s.encode()).unwrap();
        old["view"].as_object_mut().unwrap().remove("records");
        let old = serde_json::to_vec(&old).unwrap();
        assert!(
            Snapshot::decode(&old, "h1")
                .unwrap()
                .view
                .records
                .is_empty()
        );
    }

    #[test]
    fn snapshot_round_trips_and_refuses_another_hosts_file() {
        let s = Snapshot {
            version: SNAPSHOT_VERSION,
            name: "h1".into(),
            block: own(),
            view: three(),
        };
        let bytes = s.encode();
        assert_eq!(Snapshot::decode(&bytes, "h1"), Some(s));
        assert_eq!(Snapshot::decode(&bytes, "h2"), None);
        assert_eq!(Snapshot::decode(b"{", "h1"), None);
    }
}
