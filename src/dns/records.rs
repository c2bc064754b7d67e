//! What a host publishes to the cluster's DNS, and the zone built from all
//! hosts' records.
//!
//! Each agent is authoritative for its own host name and the containers it
//! attached (`HostRecords`); the zone is rebuilt whenever any host's records
//! change. Names are kept lowercase with the trailing dot.
//!
//! Ownership: a host name or container name belongs to exactly one host, the
//! first that claimed it (this host's own records come first); a service
//! name is shared by the hosts running its members but can never be a name
//! another host owns. Must never: let a host's records claim an address
//! outside its subnet (see `ContainerRecord::validate`), or add an address
//! to a name another host owns.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::membership::is_dns_label;

/// The domain unless configured.
pub const DEFAULT_DOMAIN: &str = "mesh.internal";
/// The label under which host names live: `<host>.hosts.<domain>`; no
/// stack may take it.
pub const HOSTS_LABEL: &str = "hosts";
/// Containers one host may publish: a /20 of containers. Bounds what a
/// peer's records can cost every other host (memory, zone rebuilds).
pub const MAX_CONTAINERS_PER_HOST: usize = 4096;
/// Named ports one container may publish (SRV records of its service).
pub const MAX_PORTS_PER_CONTAINER: usize = 8;
/// Longest DNS name in text form, without the trailing dot (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;

/// Why a record cannot be published or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{what} {value:?} is not valid: use 1-63 letters, digits or '-'")]
    NotALabel { what: &'static str, value: String },
    #[error("stack name {HOSTS_LABEL:?} is reserved for host names")]
    ReservedStack,
    #[error("name {name:?} would be longer than {MAX_NAME_LEN} characters")]
    NameTooLong { name: String },
    #[error("{0} ports; a container publishes at most {MAX_PORTS_PER_CONTAINER}")]
    TooManyPorts(usize),
    #[error("ports need a service: they are published as SRV records of the service")]
    PortsWithoutService,
    #[error("address {address} is outside the host's subnet {subnet}")]
    OutsideSubnet { address: Ipv4Addr, subnet: Ipv4Net },
    #[error("{0} containers; a host publishes at most {MAX_CONTAINERS_PER_HOST}")]
    TooManyContainers(usize),
}

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

impl ContainerRecord {
    /// Checks everything a host may publish about one container: names are
    /// DNS labels and every name built from them fits, the stack is not
    /// the hosts' label, ports are few and belong to a service, and the
    /// address lies in the publishing host's `subnet`.
    pub fn validate(&self, domain: &str, subnet: Ipv4Net) -> Result<(), RecordError> {
        label("container name", &self.name)?;
        label("stack", &self.stack)?;
        if self.stack.eq_ignore_ascii_case(HOSTS_LABEL) {
            return Err(RecordError::ReservedStack);
        }
        fits(&format!("{}.{}.{domain}", self.name, self.stack))?;
        if let Some(service) = &self.service {
            label("service", service)?;
        }
        if self.ports.len() > MAX_PORTS_PER_CONTAINER {
            return Err(RecordError::TooManyPorts(self.ports.len()));
        }
        for port in &self.ports {
            let Some(service) = &self.service else {
                return Err(RecordError::PortsWithoutService);
            };
            label("port name", &port.name)?;
            fits(&format!(
                "_{}._udp.{service}.{}.{domain}",
                port.name, self.stack
            ))?;
        }
        if !subnet.contains(&self.address) {
            return Err(RecordError::OutsideSubnet {
                address: self.address,
                subnet,
            });
        }
        Ok(())
    }
}

impl HostRecords {
    /// Checks a whole host's records (see `ContainerRecord::validate`).
    pub fn validate(&self, domain: &str, subnet: Ipv4Net) -> Result<(), RecordError> {
        label("host name", &self.host)?;
        fits(&format!("{}.{HOSTS_LABEL}.{domain}", self.host))?;
        if !subnet.contains(&self.address) {
            return Err(RecordError::OutsideSubnet {
                address: self.address,
                subnet,
            });
        }
        if self.containers.len() > MAX_CONTAINERS_PER_HOST {
            return Err(RecordError::TooManyContainers(self.containers.len()));
        }
        self.containers
            .iter()
            .try_for_each(|c| c.validate(domain, subnet))
    }
}

fn label(what: &'static str, value: &str) -> Result<(), RecordError> {
    if is_dns_label(value) {
        return Ok(());
    }
    Err(RecordError::NotALabel {
        what,
        value: shortened(value),
    })
}

fn fits(name: &str) -> Result<(), RecordError> {
    if name.trim_end_matches('.').len() <= MAX_NAME_LEN {
        return Ok(());
    }
    Err(RecordError::NameTooLong {
        name: shortened(name),
    })
}

/// A value as an error message may quote it: a hostile peer's 30 kB name
/// must not become a 30 kB log line.
fn shortened(value: &str) -> String {
    const QUOTED: usize = 64;
    match value.char_indices().nth(QUOTED) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_owned(),
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
    conflicts: usize,
    /// Who each address is, for the policy.
    identities: crate::policy::Identities,
}

impl Zone {
    /// Builds the zone from every host's records, in precedence order:
    /// a name two hosts claim goes to the earlier one (pass this host's
    /// own records first, then the others in the order they were first
    /// accepted); the later claim is left out and counted in `conflicts`.
    pub fn build<'a>(
        domain: &str,
        overlay: Ipv4Net,
        hosts: impl IntoIterator<Item = &'a HostRecords>,
    ) -> Self {
        let hosts: Vec<&HostRecords> = hosts.into_iter().collect();
        let domain = fqdn(domain);
        let mut z = Zone {
            domain: domain.clone(),
            overlay: Some(overlay),
            ..Zone::default()
        };
        z.names.insert(domain.clone());
        z.identities = crate::policy::Identities::build(hosts.iter().copied());
        // Names that belong to one host: host names and container names.
        let mut owners: HashMap<String, &str> = HashMap::new();
        let mut services: BTreeMap<String, Vec<&ContainerRecord>> = BTreeMap::new();
        for h in &hosts {
            let host_name = format!("{}.{HOSTS_LABEL}.{domain}", h.host.to_lowercase());
            if z.claim(&mut owners, &host_name, &h.host) {
                z.add_a(&host_name, h.address, &h.host);
            }
            for c in &h.containers {
                let stack = c.stack.to_lowercase();
                let name = format!("{}.{stack}.{domain}", c.name.to_lowercase());
                if !z.claim(&mut owners, &name, &h.host) {
                    continue;
                }
                z.add_a(&name, c.address, &h.host);
                if let Some(service) = &c.service {
                    services
                        .entry(format!("{}.{stack}.{domain}", service.to_lowercase()))
                        .or_default()
                        .push(c);
                }
            }
        }
        for (name, members) in services {
            if owners.contains_key(&name) {
                // A service may not add addresses to a host's or
                // container's name.
                z.conflicts += members.len();
                continue;
            }
            z.add_service(&name, &members);
        }
        z.views.sort();
        z
    }

    /// Names claimed by two hosts (or a service named like a container)
    /// and left out of the zone.
    pub fn conflicts(&self) -> usize {
        self.conflicts
    }

    /// Who each address is, as the policy labels it.
    pub fn identities(&self) -> &crate::policy::Identities {
        &self.identities
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

    /// Whether `host` may have `name`: nobody had it, or `host` already
    /// does (a host's own containers may share a name).
    fn claim<'a>(
        &mut self,
        owners: &mut HashMap<String, &'a str>,
        name: &str,
        host: &'a str,
    ) -> bool {
        match owners.get(name) {
            Some(owner) if *owner != host => {
                self.conflicts += 1;
                false
            }
            Some(_) => true,
            None => {
                owners.insert(name.to_owned(), host);
                true
            }
        }
    }

    fn add_service(&mut self, name: &str, members: &[&ContainerRecord]) {
        let domain = self.domain.clone();
        for c in members {
            let target = format!(
                "{}.{}.{domain}",
                c.name.to_lowercase(),
                c.stack.to_lowercase()
            );
            self.add_a_only(name, c.address);
            for p in &c.ports {
                let proto = match p.protocol {
                    Protocol::Tcp => "_tcp",
                    Protocol::Udp => "_udp",
                };
                let srv_name = format!("_{}.{proto}.{name}", p.name.to_lowercase());
                self.insert_name(&srv_name);
                self.srv
                    .entry(srv_name.clone())
                    .or_default()
                    .push((p.port, target.clone()));
                self.views.push(view(
                    &srv_name,
                    "SRV",
                    format!("0 0 {} {target}", p.port),
                    "",
                ));
            }
        }
        let addrs = self.a.get(name).cloned().unwrap_or_default();
        self.views.push(view(name, "A", join(&addrs), "(service)"));
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

    fn record(name: &str, stack: &str, addr: [u8; 4]) -> ContainerRecord {
        ContainerRecord {
            name: name.into(),
            stack: stack.into(),
            service: None,
            address: addr.into(),
            ports: vec![],
        }
    }

    fn host(name: &str, third: u8, containers: Vec<ContainerRecord>) -> HostRecords {
        HostRecords {
            host: name.into(),
            address: [10, 42, third, 1].into(),
            containers,
        }
    }

    #[test]
    fn records_outside_the_senders_subnet_are_refused() {
        let subnet: Ipv4Net = "10.42.2.0/24".parse().unwrap();
        let mut h = host("h2", 2, vec![record("x", "s", [10, 42, 2, 2])]);
        assert_eq!(h.validate("mesh.internal", subnet), Ok(()));
        h.containers.push(record("y", "s", [10, 42, 1, 2]));
        assert!(matches!(
            h.validate("mesh.internal", subnet),
            Err(RecordError::OutsideSubnet { .. })
        ));
        let mut h = host("h2", 2, vec![]);
        h.address = [10, 42, 1, 1].into();
        assert!(h.validate("mesh.internal", subnet).is_err(), "host address");
    }

    #[test]
    fn names_must_be_labels_that_fit_and_hosts_is_reserved() {
        let subnet: Ipv4Net = "10.42.2.0/24".parse().unwrap();
        let check = |c: ContainerRecord| c.validate("mesh.internal", subnet);
        assert_eq!(check(record("web", "shop", [10, 42, 2, 2])), Ok(()));
        let dotted = "a.".repeat(15_000);
        let err = check(record(&dotted, "shop", [10, 42, 2, 2])).unwrap_err();
        assert!(matches!(
            err,
            RecordError::NotALabel {
                what: "container name",
                ..
            }
        ));
        assert!(
            err.to_string().len() < 200,
            "a huge name is not quoted whole"
        );
        assert!(check(record("web", "a.b", [10, 42, 2, 2])).is_err());
        assert!(check(record("", "shop", [10, 42, 2, 2])).is_err());
        assert_eq!(
            check(record("h1", "HOSTS", [10, 42, 2, 2])),
            Err(RecordError::ReservedStack)
        );
        let long = "x".repeat(63);
        let fits = record(&long, &long, [10, 42, 2, 2]);
        assert_eq!(check(fits.clone()), Ok(()));
        let mut too_long = fits;
        too_long.service = Some(long.clone());
        too_long.ports = vec![ServicePort {
            name: long.clone(),
            port: 80,
            protocol: Protocol::Tcp,
        }];
        assert!(matches!(
            too_long.validate(&format!("{long}.internal"), subnet),
            Err(RecordError::NameTooLong { .. })
        ));
    }

    #[test]
    fn ports_are_few_and_need_a_service() {
        let subnet: Ipv4Net = "10.42.2.0/24".parse().unwrap();
        let mut c = record("web", "shop", [10, 42, 2, 2]);
        c.ports = vec!["http:80/tcp".parse().unwrap()];
        assert_eq!(
            c.validate("mesh.internal", subnet),
            Err(RecordError::PortsWithoutService)
        );
        c.service = Some("web".into());
        assert_eq!(c.validate("mesh.internal", subnet), Ok(()));
        c.ports = (1..=9)
            .map(|i| format!("p{i}:{i}/tcp").parse().unwrap())
            .collect();
        assert_eq!(
            c.validate("mesh.internal", subnet),
            Err(RecordError::TooManyPorts(9))
        );
    }

    #[test]
    fn too_many_containers_are_refused() {
        let subnet: Ipv4Net = "10.42.0.0/16".parse().unwrap();
        let containers = (0..=MAX_CONTAINERS_PER_HOST)
            .map(|i| record(&format!("c{i}"), "s", [10, 42, 3, 3]))
            .collect();
        let h = HostRecords {
            host: "big".into(),
            address: [10, 42, 0, 1].into(),
            containers,
        };
        assert_eq!(
            h.validate("mesh.internal", subnet),
            Err(RecordError::TooManyContainers(MAX_CONTAINERS_PER_HOST + 1))
        );
    }

    #[test]
    fn a_name_belongs_to_the_host_that_claimed_it_first() {
        let overlay = "10.42.0.0/16".parse().unwrap();
        let own = host("h1", 1, vec![record("db", "shop", [10, 42, 1, 2])]);
        let thief = host(
            "h2",
            2,
            vec![
                record("db", "shop", [10, 42, 2, 2]),
                record("ok", "shop", [10, 42, 2, 3]),
            ],
        );
        let z = Zone::build("mesh.internal", overlay, [&own, &thief]);
        assert_eq!(z.a("db.shop.mesh.internal."), [Ipv4Addr::new(10, 42, 1, 2)]);
        assert_eq!(z.a("ok.shop.mesh.internal."), [Ipv4Addr::new(10, 42, 2, 3)]);
        assert_eq!(z.conflicts(), 1);
        // In the other order the other host keeps it: precedence, not name.
        let z = Zone::build("mesh.internal", overlay, [&thief, &own]);
        assert_eq!(z.a("db.shop.mesh.internal."), [Ipv4Addr::new(10, 42, 2, 2)]);
    }

    #[test]
    fn a_service_cannot_add_addresses_to_a_container_name() {
        let overlay = "10.42.0.0/16".parse().unwrap();
        let own = host("h1", 1, vec![record("db", "shop", [10, 42, 1, 2])]);
        let mut member = record("x", "shop", [10, 42, 2, 2]);
        member.service = Some("db".into());
        let other = host("h2", 2, vec![member]);
        let z = Zone::build("mesh.internal", overlay, [&own, &other]);
        assert_eq!(z.a("db.shop.mesh.internal."), [Ipv4Addr::new(10, 42, 1, 2)]);
        assert_eq!(z.conflicts(), 1);
    }

    #[test]
    fn one_hosts_containers_may_share_a_name_and_services_span_hosts() {
        let overlay = "10.42.0.0/16".parse().unwrap();
        let z = sample();
        assert_eq!(z.conflicts(), 0);
        let twins = host(
            "h3",
            3,
            vec![
                record("t", "s", [10, 42, 3, 2]),
                record("t", "s", [10, 42, 3, 3]),
            ],
        );
        let z = Zone::build("mesh.internal", overlay, [&twins]);
        assert_eq!(z.a("t.s.mesh.internal.").len(), 2);
    }
}
