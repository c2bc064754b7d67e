//! `meshctl policy test` and `meshctl drops`: the policy's decisions in
//! words, from the same rules and the same `decide` the data path uses.
//! Must never: decide anything itself.

use std::net::Ipv4Addr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::conntrack::Rules;
use super::enforcer::DropRecord;
use super::{Flow, Identity, PortSpec, PortSpecError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("{0:?} is neither an overlay address nor a known name (NAME.STACK or a host name)")]
    UnknownEndpoint(String),
    #[error(transparent)]
    Port(#[from] PortSpecError),
}

/// A verdict as `meshctl policy test` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictView {
    pub from: String,
    pub to: String,
    pub port: String,
    /// "allow" or "deny".
    pub action: String,
    pub tier: String,
    pub rule: Option<String>,
    pub reason: String,
}

/// One recent drop as `meshctl drops` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropView {
    pub sequence: u64,
    pub age_ms: u64,
    pub direction: String,
    /// `10.42.1.2:40000 -> 10.42.3.2:22/tcp`, or `unreadable`.
    pub flow: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub tier: String,
    pub rule: Option<String>,
}

/// Decides a hypothetical first packet from `from` to `to` on `port`.
pub fn test(rules: &Rules, from: &str, to: &str, port: &str) -> Result<VerdictView, ExplainError> {
    let port: PortSpec = port.parse()?;
    let (src, src_id) = resolve(rules, from)?;
    let (dst, dst_id) = resolve(rules, to)?;
    let flow = Flow {
        src,
        dst,
        protocol: port.protocol,
        src_port: 0,
        dst_port: port.port.unwrap_or(0),
    };
    let verdict = rules.policy.explain(&flow, src_id, dst_id);
    Ok(VerdictView {
        from: describe(src, src_id),
        to: describe(dst, dst_id),
        port: port.to_string(),
        action: verdict.action.to_string(),
        tier: verdict.tier.to_string(),
        rule: verdict.rule,
        reason: verdict.reason,
    })
}

/// Drops after sequence `after`, oldest first, labelled by `rules`.
pub fn drops<'a>(
    rules: &Rules,
    records: impl Iterator<Item = &'a DropRecord>,
    now: Instant,
) -> Vec<DropView> {
    let name = |a: Ipv4Addr| rules.identities.get(a).map(Identity::qualified_name);
    records
        .map(|d| DropView {
            sequence: d.sequence,
            age_ms: u64::try_from(now.saturating_duration_since(d.at).as_millis())
                .unwrap_or(u64::MAX),
            direction: d.direction.as_str().to_owned(),
            flow: d
                .flow
                .map_or_else(|| "unreadable".to_owned(), |f| flow_text(&f)),
            from: d.flow.and_then(|f| name(f.src)),
            to: d.flow.and_then(|f| name(f.dst)),
            tier: d.tier.to_string(),
            rule: d.rule.as_deref().map(str::to_owned),
        })
        .collect()
}

fn flow_text(f: &Flow) -> String {
    match f.protocol {
        super::Protocol::Icmp => format!("{} -> {} icmp", f.src, f.dst),
        p => format!("{}:{} -> {}:{}/{p}", f.src, f.src_port, f.dst, f.dst_port),
    }
}

fn resolve<'a>(
    rules: &'a Rules,
    text: &str,
) -> Result<(Ipv4Addr, Option<&'a Identity>), ExplainError> {
    if let Ok(address) = text.parse::<Ipv4Addr>() {
        return Ok((address, rules.identities.get(address)));
    }
    let who = rules
        .identities
        .find(text)
        .ok_or_else(|| ExplainError::UnknownEndpoint(text.to_owned()))?;
    Ok((who.address, Some(who)))
}

fn describe(address: Ipv4Addr, who: Option<&Identity>) -> String {
    match who {
        Some(w) => format!("{} ({address}, host {})", w.qualified_name(), w.host),
        None => format!("{address} (no host claims it)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::HostRecords;
    use crate::dns::records::ContainerRecord;
    use crate::policy::{Action, Identities, Policy};

    fn rules() -> Rules {
        let h1 = HostRecords {
            host: "h1".into(),
            address: Ipv4Addr::new(10, 42, 1, 1),
            containers: vec![ContainerRecord {
                name: "web1".into(),
                stack: "web".into(),
                service: None,
                address: Ipv4Addr::new(10, 42, 1, 2),
                ports: Vec::new(),
            }],
        };
        Rules {
            policy: Policy {
                default: Action::Deny,
                ..Policy::default()
            },
            identities: Identities::build([&h1]),
            version: 1,
        }
    }

    #[test]
    fn names_and_addresses_resolve_and_the_verdict_is_decides() {
        let v = test(&rules(), "web1.web", "10.42.9.9", "80/tcp").unwrap();
        assert_eq!((v.action.as_str(), v.tier.as_str()), ("deny", "default"));
        assert!(v.from.starts_with("web1.web (10.42.1.2"), "{}", v.from);
        assert!(v.to.contains("no host claims it"));
        let dns = test(&rules(), "web1.web", "169.254.169.250", "53/udp").unwrap();
        assert_eq!(dns.action, "allow");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            test(&rules(), "nope.web", "h1", "80/tcp"),
            Err(ExplainError::UnknownEndpoint(_))
        ));
        assert!(matches!(
            test(&rules(), "h1", "h1", "80/sctp"),
            Err(ExplainError::Port(_))
        ));
    }
}
