//! Who an overlay address belongs to: its host, stack and service, as the
//! records hosts share say. Built once per change of the zone and swapped
//! whole; the data path only looks addresses up.
//!
//! The records sync has already refused any record for an address outside
//! its sender's subnet, so a host can only label its own addresses.
//! Must never: do IO, or label an address from anything but the records.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::dns::HostRecords;

use super::HOSTS_STACK;

/// The labels of one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub address: Ipv4Addr,
    /// The host the address lives on.
    pub host: String,
    /// The container's name, or the host's for a host address.
    pub name: String,
    /// `hosts` for a host address.
    pub stack: String,
    pub service: Option<String>,
}

impl Identity {
    /// `name.stack`, as `meshctl policy test` accepts it.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.name, self.stack)
    }
}

/// Every labelled address of the mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities {
    by_address: HashMap<Ipv4Addr, Identity>,
}

impl Identities {
    /// Labels every address the records name. The first claim of an
    /// address wins, as it does for names in the zone (this host's own
    /// records come first).
    pub fn build<'a>(records: impl IntoIterator<Item = &'a HostRecords>) -> Self {
        let mut by_address = HashMap::new();
        for host in records {
            by_address.entry(host.address).or_insert_with(|| Identity {
                address: host.address,
                host: host.host.clone(),
                name: host.host.clone(),
                stack: HOSTS_STACK.to_owned(),
                service: None,
            });
            for c in &host.containers {
                by_address.entry(c.address).or_insert_with(|| Identity {
                    address: c.address,
                    host: host.host.clone(),
                    name: c.name.clone(),
                    stack: c.stack.clone(),
                    service: c.service.clone(),
                });
            }
        }
        Self { by_address }
    }

    pub fn get(&self, address: Ipv4Addr) -> Option<&Identity> {
        self.by_address.get(&address)
    }

    /// Finds `name.stack` (or a host's name); case-insensitive as DNS is.
    pub fn find(&self, qualified: &str) -> Option<&Identity> {
        let wanted = qualified.trim_end_matches('.').to_ascii_lowercase();
        self.by_address
            .values()
            .filter(|i| {
                i.qualified_name().eq_ignore_ascii_case(&wanted)
                    || (i.stack == HOSTS_STACK && i.name.eq_ignore_ascii_case(&wanted))
            })
            .min_by_key(|i| i.address)
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::ContainerRecord;

    fn host(name: &str, address: [u8; 4], containers: &[(&str, &str, [u8; 4])]) -> HostRecords {
        HostRecords {
            host: name.into(),
            address: address.into(),
            containers: containers
                .iter()
                .map(|(n, stack, a)| ContainerRecord {
                    name: (*n).into(),
                    stack: (*stack).into(),
                    service: Some("svc".into()),
                    address: (*a).into(),
                    ports: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn labels_hosts_and_containers_first_claim_wins() {
        let a = host("h1", [10, 42, 1, 1], &[("web1", "web", [10, 42, 1, 2])]);
        let b = host("h2", [10, 42, 2, 1], &[("evil", "db", [10, 42, 1, 2])]);
        let ids = Identities::build([&a, &b]);
        let web = ids.get([10, 42, 1, 2].into()).unwrap();
        assert_eq!((web.host.as_str(), web.stack.as_str()), ("h1", "web"));
        assert_eq!(ids.get([10, 42, 2, 1].into()).unwrap().stack, HOSTS_STACK);
        assert_eq!(ids.len(), 3);
        assert!(ids.get([10, 42, 9, 9].into()).is_none());
    }

    #[test]
    fn finds_by_qualified_name_or_host_name() {
        let a = host("h1", [10, 42, 1, 1], &[("web1", "web", [10, 42, 1, 2])]);
        let ids = Identities::build([&a]);
        assert_eq!(
            ids.find("WEB1.web.").unwrap().address,
            Ipv4Addr::new(10, 42, 1, 2)
        );
        assert_eq!(ids.find("h1").unwrap().address, Ipv4Addr::new(10, 42, 1, 1));
        assert!(ids.find("web1").is_none());
    }
}
