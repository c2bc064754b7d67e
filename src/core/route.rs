//! Overlay routing: which peer owns an address.
//!
//! Subnets never overlap (config validation guarantees it), so the owner of
//! an address is the subnet with the greatest start at or below it, if that
//! subnet contains the address: one ordered-map lookup, O(log peers).
//! Must never: hold anything but subnets and their owners.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{new} overlaps {existing}, which is already routed")]
pub struct Overlap {
    pub new: Ipv4Net,
    pub existing: Ipv4Net,
}

#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    by_start: BTreeMap<u32, (Ipv4Net, T)>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            by_start: BTreeMap::new(),
        }
    }
}

impl<T> RouteTable<T> {
    pub fn insert(&mut self, net: Ipv4Net, owner: T) -> Result<(), Overlap> {
        if let Some(existing) = self.overlapping(net) {
            return Err(Overlap { new: net, existing });
        }
        self.by_start.insert(u32::from(net.network()), (net, owner));
        Ok(())
    }

    pub fn remove(&mut self, net: Ipv4Net) -> Option<T> {
        let start = u32::from(net.network());
        match self.by_start.get(&start) {
            Some((n, _)) if *n == net => self.by_start.remove(&start).map(|(_, t)| t),
            _ => None,
        }
    }

    pub fn lookup(&self, addr: Ipv4Addr) -> Option<&T> {
        let (_, (net, owner)) = self.by_start.range(..=u32::from(addr)).next_back()?;
        net.contains(&addr).then_some(owner)
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    fn overlapping(&self, net: Ipv4Net) -> Option<Ipv4Net> {
        let start = u32::from(net.network());
        let end = u32::from(net.broadcast());
        // Either a subnet starting at or before `net` reaches into it, or one
        // starts inside it.
        let before = self
            .by_start
            .range(..=start)
            .next_back()
            .map(|(_, (n, _))| *n);
        let inside = self
            .by_start
            .range(start..=end)
            .next()
            .map(|(_, (n, _))| *n);
        before.filter(|n| n.contains(&net.network())).or(inside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn table() -> RouteTable<&'static str> {
        let mut t = RouteTable::default();
        t.insert(net("10.42.2.0/24"), "h2").unwrap();
        t.insert(net("10.42.3.0/24"), "h3").unwrap();
        t.insert(net("10.42.128.0/17"), "big").unwrap();
        t
    }

    #[test]
    fn finds_the_owner_of_every_address_in_a_subnet() {
        let t = table();
        for (addr, owner) in [
            ("10.42.2.0", Some("h2")),
            ("10.42.2.1", Some("h2")),
            ("10.42.2.255", Some("h2")),
            ("10.42.3.77", Some("h3")),
            ("10.42.200.9", Some("big")),
            ("10.42.255.255", Some("big")),
            ("10.42.1.1", None),
            ("10.42.4.0", None),
            ("10.42.127.255", None),
            ("10.43.0.1", None),
            ("0.0.0.0", None),
        ] {
            assert_eq!(t.lookup(addr.parse().unwrap()).copied(), owner, "{addr}");
        }
    }

    #[test]
    fn overlapping_inserts_are_refused_either_way_round() {
        let mut t = table();
        let e = t.insert(net("10.42.2.128/25"), "x").unwrap_err();
        assert_eq!(e.existing, net("10.42.2.0/24"));
        let e = t.insert(net("10.42.0.0/22"), "x").unwrap_err();
        assert_eq!(e.existing, net("10.42.2.0/24"));
        let e = t.insert(net("10.42.3.0/24"), "x").unwrap_err();
        assert_eq!(e.existing, net("10.42.3.0/24"));
        assert_eq!(t.len(), 3);
        t.insert(net("10.42.4.0/24"), "h4").unwrap();
        assert_eq!(t.lookup("10.42.4.4".parse().unwrap()), Some(&"h4"));
    }

    #[test]
    fn remove_takes_exactly_that_subnet() {
        let mut t = table();
        assert_eq!(t.remove(net("10.42.2.0/25")), None);
        assert_eq!(t.remove(net("10.42.2.0/24")), Some("h2"));
        assert_eq!(t.lookup("10.42.2.1".parse().unwrap()), None);
        assert_eq!(t.lookup("10.42.3.1".parse().unwrap()), Some(&"h3"));
    }
}
