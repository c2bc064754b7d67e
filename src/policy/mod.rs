//! Network policy: which container may reach which, decided in one pure
//! function that both the data path and `meshctl policy test` call, so an
//! explanation can never disagree with what a packet meets.
//!
//! A verdict walks the tiers in order and stops at the first that decides:
//! implicit allows (the cluster DNS and ICMP to the service address, the
//! agents' own traffic between host addresses), tenant isolation, the
//! explicit rules (first match), the `within` shorthand, then the default.
//! Replies of tracked flows are allowed by `conntrack`, before any tier.
//! Who an address is comes from `identity`, built from the records hosts
//! share; an address nobody claims matches no selector.
//! Must never: do IO, read the clock, or allocate per decision.

pub mod conntrack;
pub mod enforcer;
pub mod explain;
pub mod identity;

use std::fmt;
use std::net::Ipv4Addr;

pub use identity::{Identities, Identity};

use crate::core::service::SERVICE_ADDRESS;

/// The stack host addresses belong to, for selectors.
pub const HOSTS_STACK: &str = "hosts";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            1 => Some(Protocol::Icmp),
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        })
    }
}

/// `5432/tcp`, `53/udp`, or `icmp` (which has no port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub protocol: Protocol,
    /// `None` for ICMP.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    #[error("{0:?} is not PORT/PROTO such as \"5432/tcp\", \"53/udp\" or \"icmp\"")]
    Shape(String),
    #[error("port {0} is out of range: use 1-65535")]
    Range(String),
    #[error("unknown protocol {0:?}: use tcp, udp or icmp")]
    Protocol(String),
}

impl std::str::FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("icmp") {
            return Ok(PortSpec {
                protocol: Protocol::Icmp,
                port: None,
            });
        }
        let (port, proto) = text
            .split_once('/')
            .ok_or_else(|| PortSpecError::Shape(text.to_owned()))?;
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(PortSpecError::Protocol(proto.to_owned())),
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PortSpecError::Shape(text.to_owned()));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| PortSpecError::Range(port.to_owned()))?;
        Ok(PortSpec {
            protocol,
            port: Some(port),
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{port}/{}", self.protocol),
            None => write!(f, "{}", self.protocol),
        }
    }
}

/// Who a rule is about. Both fields empty matches nothing, so a typo that
/// empties a selector can never open everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub stack: Option<String>,
    pub service: Option<String>,
    /// Narrows a selector to one tenant's hosts.
    pub tenant: Option<String>,
}

impl Selector {
    fn matches(&self, who: Option<&Identity>, tenant: Option<&str>) -> bool {
        let Some(who) = who else { return false };
        if self.stack.is_none() && self.service.is_none() {
            return false;
        }
        let stack_ok = self.stack.as_deref().is_none_or(|s| s == who.stack);
        let service_ok = self
            .service
            .as_deref()
            .is_none_or(|s| who.service.as_deref() == Some(s));
        let tenant_ok = self.tenant.is_none() || self.tenant.as_deref() == tenant;
        stack_ok && service_ok && tenant_ok
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.stack, &self.service) {
            (Some(stack), Some(service)) => write!(f, "service {service} of stack {stack}"),
            (Some(stack), None) => write!(f, "stack {stack}"),
            (None, Some(service)) => write!(f, "service {service}"),
            (None, None) => f.write_str("nothing"),
        }?;
        match &self.tenant {
            Some(tenant) => write!(f, " in tenant {tenant}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub from: Selector,
    pub to: Selector,
    /// Empty: every port and protocol.
    pub ports: Vec<PortSpec>,
    pub action: Action,
}

impl Rule {
    fn matches(&self, flow: &Flow, src: Party<'_>, dst: Party<'_>) -> bool {
        self.from.matches(src.0, src.1)
            && self.to.matches(dst.0, dst.1)
            && (self.ports.is_empty() || self.ports.iter().any(|p| flow.matches(p)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Within {
    Stack,
    Service,
}

impl fmt::Display for Within {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Within::Stack => "stack",
            Within::Service => "service",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub hosts: Vec<String>,
}

/// A `[[policy.test]]`: a flow between two hypothetical endpoints and the
/// verdict it must get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    pub from: Identity,
    pub to: Identity,
    pub port: PortSpec,
    pub expect: Action,
    /// 1-based line of the test in its file, for the error.
    pub line: usize,
}

/// The compiled `[policy]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default: Action,
    /// Deny with TCP RST / ICMP prohibited rather than silence.
    pub reject: bool,
    pub within: Option<Within>,
    pub tenants: Vec<Tenant>,
    pub rules: Vec<Rule>,
    pub tests: Vec<PolicyTest>,
}

impl Default for Policy {
    /// No `[policy]`: everything is allowed, as before policy existed.
    fn default() -> Self {
        Self {
            default: Action::Allow,
            reject: false,
            within: None,
            tenants: Vec::new(),
            rules: Vec::new(),
            tests: Vec::new(),
        }
    }
}

/// One packet's flow, as the policy sees it (the destination port of its
/// first packet; ICMP has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: Protocol,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Flow {
    fn matches(&self, spec: &PortSpec) -> bool {
        spec.protocol == self.protocol && spec.port.is_none_or(|p| p == self.dst_port)
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Flow {
        Flow {
            src: self.dst,
            dst: self.src,
            protocol: self.protocol,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// The tier that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Implicit,
    Reply,
    Tenant,
    Rule,
    Within,
    Default,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Implicit => "implicit",
            Tier::Reply => "reply",
            Tier::Tenant => "tenant",
            Tier::Rule => "rule",
            Tier::Within => "within",
            Tier::Default => "default",
        })
    }
}

/// A decision, as the data path keeps it: no text, nothing allocated.
/// `rule` indexes `Policy::rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub tier: Tier,
    pub rule: Option<usize>,
}

/// A decision and why, for people. `rule` names the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    pub tier: Tier,
    pub rule: Option<String>,
    pub reason: String,
}

impl Policy {
    /// Whether any flow can be denied: without tenants or `within`, with
    /// only allowing rules and an allowing default, the data path skips
    /// the check.
    pub fn allows_everything(&self) -> bool {
        self.default == Action::Allow
            && self.within.is_none()
            && self.tenants.is_empty()
            && self.rules.iter().all(|r| r.action == Action::Allow)
    }

    /// The tenant a host belongs to, if any.
    pub fn tenant_of(&self, host: &str) -> Option<&str> {
        self.tenants
            .iter()
            .find(|t| t.hosts.iter().any(|h| h == host))
            .map(|t| t.name.as_str())
    }

    /// Decides a new flow: the one function the data path and every
    /// explanation call. `src` and `dst` are who the addresses belong to,
    /// `None` when no host claims them.
    pub fn decide(&self, flow: &Flow, src: Option<&Identity>, dst: Option<&Identity>) -> Decision {
        let decided = |action, tier, rule| Decision { action, tier, rule };
        if implicit(flow, src, dst) {
            return decided(Action::Allow, Tier::Implicit, None);
        }
        if self.tenants_differ(src, dst).is_some() {
            return decided(Action::Deny, Tier::Tenant, None);
        }
        let (src_party, dst_party) = (self.party(src), self.party(dst));
        if let Some(i) = self
            .rules
            .iter()
            .position(|r| r.matches(flow, src_party, dst_party))
        {
            return decided(self.rules[i].action, Tier::Rule, Some(i));
        }
        if let Some(within) = self.within {
            let action = if same_group(within, src, dst) {
                Action::Allow
            } else {
                Action::Deny
            };
            return decided(action, Tier::Within, None);
        }
        decided(self.default, Tier::Default, None)
    }

    /// `decide`, with the reason spelled out.
    pub fn explain(&self, flow: &Flow, src: Option<&Identity>, dst: Option<&Identity>) -> Verdict {
        let decision = self.decide(flow, src, dst);
        self.verdict(decision, src, dst)
    }

    /// The words for a decision `decide` made about `src` and `dst`.
    pub fn verdict(
        &self,
        decision: Decision,
        src: Option<&Identity>,
        dst: Option<&Identity>,
    ) -> Verdict {
        let rule = decision.rule.and_then(|i| self.rules.get(i));
        let reason = match decision.tier {
            Tier::Implicit if src.is_some_and(is_host) && dst.is_some_and(is_host) => {
                "traffic between host addresses (the agents' own) is always allowed".to_owned()
            }
            Tier::Implicit => {
                "the cluster DNS and ICMP to 169.254.169.250 are always allowed".to_owned()
            }
            Tier::Reply => "a reply within a flow the policy allowed".to_owned(),
            Tier::Tenant => match self.tenants_differ(src, dst) {
                Some((a, b)) => format!("tenant {a} never reaches tenant {b}"),
                None => "tenants never reach each other".to_owned(),
            },
            Tier::Rule => match rule {
                Some(r) => format!("rule {} {}s {} to {}", r.name, r.action, r.from, r.to),
                None => "a rule that no longer exists".to_owned(),
            },
            Tier::Within => {
                let within = self.within.unwrap_or(Within::Stack);
                match decision.action {
                    Action::Allow => format!("same {within}: allowed within a {within}"),
                    Action::Deny => format!("different {within}s: denied across {within}s"),
                }
            }
            Tier::Default => format!("no rule matched; the default is {}", self.default),
        };
        Verdict {
            action: decision.action,
            tier: decision.tier,
            rule: rule.map(|r| r.name.clone()),
            reason,
        }
    }

    fn party<'a>(&'a self, who: Option<&'a Identity>) -> Party<'a> {
        (who, who.and_then(|w| self.tenant_of(&w.host)))
    }

    fn tenants_differ<'a>(
        &'a self,
        src: Option<&Identity>,
        dst: Option<&Identity>,
    ) -> Option<(&'a str, &'a str)> {
        let a = src.and_then(|s| self.tenant_of(&s.host))?;
        let b = dst.and_then(|d| self.tenant_of(&d.host))?;
        (a != b).then_some((a, b))
    }

    /// Runs every `[[policy.test]]`; the first that fails, with the verdict
    /// it got.
    pub fn failing_test(&self) -> Option<(&PolicyTest, Verdict)> {
        self.tests.iter().find_map(|test| {
            let flow = Flow {
                src: test.from.address,
                dst: test.to.address,
                protocol: test.port.protocol,
                src_port: 0,
                dst_port: test.port.port.unwrap_or(0),
            };
            let verdict = self.explain(&flow, Some(&test.from), Some(&test.to));
            (verdict.action != test.expect).then_some((test, verdict))
        })
    }
}

/// Who, and the tenant of their host.
type Party<'a> = (Option<&'a Identity>, Option<&'a str>);

fn is_host(who: &Identity) -> bool {
    who.stack == HOSTS_STACK
}

fn implicit(flow: &Flow, src: Option<&Identity>, dst: Option<&Identity>) -> bool {
    let to_service =
        flow.dst == SERVICE_ADDRESS && (flow.protocol == Protocol::Icmp || flow.dst_port == 53);
    to_service || (src.is_some_and(is_host) && dst.is_some_and(is_host))
}

fn same_group(within: Within, src: Option<&Identity>, dst: Option<&Identity>) -> bool {
    match (within, src, dst) {
        (Within::Stack, Some(s), Some(d)) => s.stack == d.stack,
        (Within::Service, Some(s), Some(d)) => {
            s.stack == d.stack && s.service.is_some() && s.service == d.service
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
