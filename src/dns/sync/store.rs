//! Host records from the membership store (etcd's `records/<name>`), the
//! second source of the records sync: the rules for taking them, without IO.
//!
//! The store shell hands over every other host's record set as etcd holds
//! it, whole, whenever one changes. A set counts only for a current member
//! of that name, and only once it validates exactly like a mesh snapshot
//! (`HostRecords::validate` against the member's block as etcd names it,
//! plus the value's host name and address matching that member). For a
//! host whose records etcd holds, etcd is authoritative: its mesh snapshot
//! is kept but not served. Hosts without a `records/` key (a static peer,
//! an agent without the store) keep being served from the mesh sync.
//!
//! Must never: withdraw a set for any reason but its key gone from the
//! store's view (an observed delete or a re-list) or its host leaving the
//! membership; let an invalid set replace a valid one (the last valid set
//! stays, as a refused mesh snapshot leaves the held one); re-check a set
//! that did not change.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::RecordsSync;
use crate::dns::records::HostRecords;
use crate::keys::PublicKey;
use crate::membership::host_address;

/// Record sets keyed by host name, as the store's view holds them.
pub type StoreRecords = BTreeMap<String, Arc<HostRecords>>;

/// What the records sync knows from the store.
#[derive(Debug, Default)]
pub(super) struct FromStore {
    /// The latest sets the store handed over, valid or not.
    offered: StoreRecords,
    /// Sets in force, by host name.
    held: HashMap<String, StoreHeld>,
    /// Sets refused, with the block they were checked against: not
    /// checked (nor logged) again until the value or the block changes.
    refused: HashMap<String, (Arc<HostRecords>, Ipv4Net)>,
    /// Each member's key and block by name (the store names hosts).
    members: HashMap<String, (PublicKey, Ipv4Net)>,
}

#[derive(Debug)]
pub(super) struct StoreHeld {
    /// The offered value this was taken from (to skip re-checking it).
    offered: Arc<HostRecords>,
    /// The block it was checked against.
    subnet: Ipv4Net,
    pub(super) order: u64,
}

impl StoreHeld {
    pub(super) fn records(&self) -> &Arc<HostRecords> {
        &self.offered
    }
}

impl FromStore {
    /// Whether the store holds records in force for host `name`.
    pub(super) fn serves(&self, name: &str) -> bool {
        self.held.contains_key(name)
    }

    pub(super) fn held(&self) -> impl Iterator<Item = &StoreHeld> {
        self.held.values()
    }
}

impl RecordsSync {
    /// The store's current record sets of other hosts (the whole set each
    /// time; unchanged entries cost a pointer compare).
    pub fn set_store_records(&mut self, offered: StoreRecords) {
        self.store.offered = offered;
        self.reconcile_store();
    }

    /// Re-indexes members by name; called when the membership changed.
    pub(super) fn store_members_changed(&mut self) {
        self.store.members = self
            .members
            .iter()
            .map(|(key, m)| (m.name.clone(), (*key, m.subnet)))
            .collect();
        self.reconcile_store();
    }

    /// Brings the held sets in line with what is offered and who is a
    /// member: withdraws what vanished or changed hands, takes what is new.
    fn reconcile_store(&mut self) {
        let before = self.store.held.len();
        let (offered, members) = (&self.store.offered, &self.store.members);
        self.store.held.retain(|name, h| {
            offered.contains_key(name) && members.get(name).is_some_and(|m| m.1 == h.subnet)
        });
        if self.store.held.len() != before {
            self.changed = true;
        }
        self.store
            .refused
            .retain(|name, (_, subnet)| members.get(name).is_some_and(|m| m.1 == *subnet));
        let store = &self.store;
        let fresh: Vec<(String, Arc<HostRecords>)> = store
            .offered
            .iter()
            .filter(|(name, r)| {
                let held = store.held.get(*name).map(|h| &h.offered);
                let refused = store.refused.get(*name).map(|r| &r.0);
                !same(held, r) && !same(refused, r)
            })
            .map(|(name, r)| (name.clone(), r.clone()))
            .collect();
        for (name, records) in fresh {
            self.take_from_store(name, records);
        }
    }

    /// Validates one offered set for its member and holds it; an invalid
    /// one is logged and leaves the previous set in force.
    fn take_from_store(&mut self, name: String, records: Arc<HostRecords>) {
        let Some(&(key, subnet)) = self.store.members.get(&name) else {
            return; // not (yet) a member: offered stays, checked on join
        };
        if let Err(reason) = check(&self.domain, &name, subnet, &records) {
            tracing::warn!(host = %name, %reason, "refused DNS records from etcd");
            self.store.refused.insert(name, (records, subnet));
            return;
        }
        self.store.refused.remove(&name);
        // Precedence is kept across sources: the first acceptance counts,
        // whether it came over the mesh or from the store.
        let mesh_order = self
            .remotes
            .get(&key)
            .and_then(|r| r.held.as_ref())
            .map(|h| h.order);
        let order = match (self.store.held.get(&name), mesh_order) {
            (Some(h), _) => h.order,
            (None, Some(o)) => o,
            (None, None) => {
                self.next_order += 1;
                self.next_order
            }
        };
        let same = self
            .store
            .held
            .get(&name)
            .is_some_and(|h| *h.offered == *records);
        self.store.held.insert(
            name,
            StoreHeld {
                offered: records,
                subnet,
                order,
            },
        );
        self.changed |= !same;
    }
}

fn same(a: Option<&Arc<HostRecords>>, b: &Arc<HostRecords>) -> bool {
    a.is_some_and(|a| Arc::ptr_eq(a, b) || **a == **b)
}

/// The mesh's rules for a host's records, plus what the mesh derives from
/// the sender and etcd carries in the value: its host name and address.
fn check(domain: &str, name: &str, subnet: Ipv4Net, records: &HostRecords) -> Result<(), String> {
    if records.host != name {
        return Err(format!(
            "the value names host {:?}, the key {name:?}",
            records.host
        ));
    }
    let address = host_address(subnet);
    if records.address != address {
        return Err(format!(
            "host address {} is not the block's {address}",
            records.address
        ));
    }
    records.validate(domain, subnet).map_err(|e| e.to_string())
}
