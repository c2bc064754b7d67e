//! What a host publishes to the cluster's DNS, and the zone built from all
//! hosts' records.
//!
//! Each agent is authoritative for its own host name and the containers it
//! attached (`HostRecords`); the zone is rebuilt whenever any host's records
//! change. Names are kept lowercase with the trailing dot.
//! Must never: let a host's records claim an address outside its subnet
//! (the receiver checks, see `HostRecords::within`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::membership::is_dns_label;

/// The domain unless configured.
pub const DEFAULT_DOMAIN: &str = "mesh.internal";
/// The label under which host names live: `<host>.hosts.<domain>`.
const HOSTS_LABEL: &str = "hosts";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A named port a container declared at attach (`http:8080/tcp`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

impl FromStr for ServicePort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{s:?} is not a port: use NAME:PORT/tcp or NAME:PORT/udp, e.g. http:8080/tcp")
        };
        let (name, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, protocol) = rest.split_once('/').unwrap_or((rest, "tcp"));
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad()),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if !is_dns_label(name) || port == 0 {
            return Err(bad());
        }
        Ok(ServicePort {
            name: name.to_owned(),
            port,
            protocol,
        })
    }
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}:{}/{proto}", self.name, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub name: String,
    pub stack: String,
    pub service: Option<String>,
    pub address: Ipv4Addr,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// Everything one host publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecords {
    pub host: String,
    pub address: Ipv4Addr,
    pub containers: Vec<ContainerRecord>,
}

impl HostRecords {
    /// Whether every address in these records lies in `subnet` (the
    /// sender's, as this host knows it).
    pub fn within(&self, subnet: Ipv4Net) -> bool {
        subnet.contains(&self.address)
            && self.containers.iter().all(|c| subnet.contains(&c.address))
    }
}

/// One record as `meshctl dns` lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordView {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    /// The host that published it.
    pub host: String,
}

/// All names the agent answers for, indexed for lookup.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    domain: String,
    overlay: Option<Ipv4Net>,
    a: HashMap<String, Vec<Ipv4Addr>>,
    ptr: HashMap<Ipv4Addr, Vec<String>>,
    srv: HashMap<String, Vec<(u16, String)>>,
    /// Every name that exists, including empty non-terminals, so a name
    /// with no record of the asked type is NODATA, not NXDOMAIN.
    names: BTreeSet<String>,
    views: Vec<RecordView>,
}

impl Zone {
    pub fn build(domain: &str, overlay: Ipv4Net, hosts: &[HostRecords]) -> Self {
        let domain = fqdn(domain);
        let mut z = Zone {
            domain: domain.clone(),
            overlay: Some(overlay),
            ..Zone::default()
        };
        z.names.insert(domain.clone());
        let mut services: BTreeMap<String, Vec<&ContainerRecord>> = BTreeMap::new();
        for h in hosts {
            let host_name = format!("{}.{HOSTS_LABEL}.{domain}", h.host.to_lowercase());
            z.add_a(&host_name, h.address, &h.host);
            for c in &h.containers {
                let stack = c.stack.to_lowercase();
                z.add_a(
                    &format!("{}.{stack}.{domain}", c.name.to_lowercase()),
                    c.address,
                    &h.host,
                );
                if let Some(service) = &c.service {
                    services
                        .entry(format!("{}.{stack}.{domain}", service.to_lowercase()))
                        .or_default()
                        .push(c);
                }
            }
        }
        for (name, members) in services {
            for c in &members {
                let target = format!(
                    "{}.{}.{domain}",
                    c.name.to_lowercase(),
                    c.stack.to_lowercase()
                );
                z.add_a_only(&name, c.address);
                for p in &c.ports {
                    let proto = match p.protocol {
                        Protocol::Tcp => "_tcp",
                        Protocol::Udp => "_udp",
                    };
                    let srv_name = format!("_{}.{proto}.{name}", p.name.to_lowercase());
                    z.insert_name(&srv_name);
                    z.srv
                        .entry(srv_name.clone())
                        .or_default()
                        .push((p.port, target.clone()));
                    z.views.push(view(
                        &srv_name,
                        "SRV",
                        format!("0 0 {} {target}", p.port),
                        "",
                    ));
                }
            }
            let addrs = z.a.get(&name).cloned().unwrap_or_default();
            z.views.push(view(&name, "A", join(&addrs), "(service)"));
        }
        z.views.sort();
        z
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether `name` (lowercase, with trailing dot) is ours to answer.
    pub fn is_authoritative(&self, name: &str) -> bool {
        name == self.domain
            || name.ends_with(&format!(".{}", self.domain))
            || self.reverse(name).is_some()
    }

    pub fn a(&self, name: &str) -> &[Ipv4Addr] {
        self.a.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn srv(&self, name: &str) -> &[(u16, String)] {
        self.srv.get(name).map_or(&[], Vec::as_slice)
    }

    /// PTR targets for a reverse name inside the overlay.
    pub fn ptr(&self, name: &str) -> &[String] {
        self.reverse(name)
            .and_then(|a| self.ptr.get(&a))
            .map_or(&[], Vec::as_slice)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.names.contains(name) || !self.ptr(name).is_empty()
    }

    pub fn views(&self) -> &[RecordView] {
        &self.views
    }

    /// The overlay address a `d.c.b.a.in-addr.arpa.` name stands for.
    fn reverse(&self, name: &str) -> Option<Ipv4Addr> {
        let labels: Vec<&str> = name.strip_suffix(".in-addr.arpa.")?.split('.').collect();
        let [d, c, b, a] = labels.as_slice() else {
            return None;
        };
        let addr = Ipv4Addr::new(
            a.parse().ok()?,
            b.parse().ok()?,
            c.parse().ok()?,
            d.parse().ok()?,
        );
        self.overlay.filter(|o| o.contains(&addr)).map(|_| addr)
    }

    fn add_a(&mut self, name: &str, addr: Ipv4Addr, host: &str) {
        self.add_a_only(name, addr);
        self.ptr.entry(addr).or_default().push(name.to_owned());
        self.views.push(view(name, "A", addr.to_string(), host));
        self.views
            .push(view(&reverse_name(addr), "PTR", name.to_owned(), host));
    }

    fn add_a_only(&mut self, name: &str, addr: Ipv4Addr) {
        self.insert_name(name);
        let addrs = self.a.entry(name.to_owned()).or_default();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }

    /// Inserts `name` and its ancestors down to the domain.
    fn insert_name(&mut self, name: &str) {
        let mut rest = name;
        while rest.len() > self.domain.len() {
            self.names.insert(rest.to_owned());
            match rest.split_once('.') {
                Some((_, parent)) => rest = parent,
                None => break,
            }
        }
    }
}

fn fqdn(name: &str) -> String {
    let lower = name.to_lowercase();
    if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    }
}

pub fn reverse_name(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
}

fn view(name: &str, kind: &str, value: String, host: &str) -> RecordView {
    RecordView {
        name: name.to_owned(),
        kind: kind.to_owned(),
        value,
        host: host.to_owned(),
    }
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Zone {
        let web = |name: &str, addr: [u8; 4], port: bool| ContainerRecord {
            name: name.into(),
            stack: "shop".into(),
            service: Some("web".into()),
            address: addr.into(),
            ports: if port {
                vec!["http:8080/tcp".parse().unwrap()]
            } else {
                vec![]
            },
        };
        let hosts = vec![
            HostRecords {
                host: "h1".into(),
                address: [10, 42, 1, 1].into(),
                containers: vec![
                    web("web1", [10, 42, 1, 2], true),
                    ContainerRecord {
                        name: "db".into(),
                        stack: "shop".into(),
                        service: None,
                        address: [10, 42, 1, 3].into(),
                        ports: vec![],
                    },
                ],
            },
            HostRecords {
                host: "h2".into(),
                address: [10, 42, 2, 1].into(),
                containers: vec![web("web2", [10, 42, 2, 2], true)],
            },
        ];
        Zone::build("Mesh.Internal", "10.42.0.0/16".parse().unwrap(), &hosts)
    }

    #[test]
    fn names_for_containers_services_hosts_and_addresses() {
        let z = sample();
        assert_eq!(
            z.a("web1.shop.mesh.internal."),
            [Ipv4Addr::new(10, 42, 1, 2)]
        );
        assert_eq!(
            z.a("web.shop.mesh.internal."),
            [Ipv4Addr::new(10, 42, 1, 2), Ipv4Addr::new(10, 42, 2, 2)]
        );
        assert_eq!(
            z.a("h2.hosts.mesh.internal."),
            [Ipv4Addr::new(10, 42, 2, 1)]
        );
        assert_eq!(
            z.ptr("2.2.42.10.in-addr.arpa."),
            ["web2.shop.mesh.internal.".to_owned()]
        );
        assert_eq!(
            z.ptr("1.1.42.10.in-addr.arpa."),
            ["h1.hosts.mesh.internal.".to_owned()]
        );
        let srv = z.srv("_http._tcp.web.shop.mesh.internal.");
        assert_eq!(srv.len(), 2);
        assert!(srv.contains(&(8080, "web2.shop.mesh.internal.".to_owned())));
    }

    #[test]
    fn empty_non_terminals_exist_and_unknown_names_do_not() {
        let z = sample();
        assert!(z.exists("shop.mesh.internal."));
        assert!(z.exists("hosts.mesh.internal."));
        assert!(z.exists("_tcp.web.shop.mesh.internal."));
        assert!(!z.exists("nope.shop.mesh.internal."));
        assert!(!z.exists("9.9.42.10.in-addr.arpa."));
    }

    #[test]
    fn authority_covers_the_domain_and_the_overlay_reverse_zone_only() {
        let z = sample();
        assert!(z.is_authoritative("mesh.internal."));
        assert!(z.is_authoritative("x.y.mesh.internal."));
        assert!(z.is_authoritative("9.9.42.10.in-addr.arpa."));
        assert!(!z.is_authoritative("example.com."));
        assert!(!z.is_authoritative("notmesh.internal."));
        assert!(!z.is_authoritative("1.1.168.192.in-addr.arpa."));
    }

    #[test]
    fn ports_parse_and_reject_nonsense() {
        let p: ServicePort = "http:8080/tcp".parse().unwrap();
        assert_eq!(
            (p.name.as_str(), p.port, p.protocol),
            ("http", 8080, Protocol::Tcp)
        );
        assert_eq!(
            "dns:53/udp".parse::<ServicePort>().unwrap().protocol,
            Protocol::Udp
        );
        assert_eq!(
            "web:80".parse::<ServicePort>().unwrap().protocol,
            Protocol::Tcp
        );
        for bad in [
            "8080",
            "http:0/tcp",
            "http:99999/tcp",
            "http:80/sctp",
            "bad name:80/tcp",
        ] {
            assert!(bad.parse::<ServicePort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn records_outside_the_senders_subnet_are_detected() {
        let h = HostRecords {
            host: "h2".into(),
            address: [10, 42, 2, 1].into(),
            containers: vec![],
        };
        assert!(h.within("10.42.2.0/24".parse().unwrap()));
        let mut liar = h.clone();
        liar.containers.push(ContainerRecord {
            name: "x".into(),
            stack: "s".into(),
            service: None,
            address: [10, 42, 1, 2].into(),
            ports: vec![],
        });
        assert!(!liar.within("10.42.2.0/24".parse().unwrap()));
    }
}
