//! Connection tracking for the policy: remembers the flows it allowed, so
//! an established flow costs one lookup and its replies pass.
//!
//! Every entry carries the version of the policy (and identities) that
//! allowed it. After a reload nothing is flushed: an entry from an older
//! version is decided again at its next packet, so flows that stay
//! allowed never drop and flows the change forbids stop at once. Denied
//! flows are never stored (a flood of them cannot fill the table), and the
//! table is bounded; when full, a new flow is decided every packet.
//! Must never: do IO, read the clock (time is an argument), or let a
//! packet through that the current policy would not allow.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::{Action, Decision, Flow, Identities, Policy, Protocol, Tier};

/// Flows remembered at most; enough for a busy host, small enough that
/// the table stays a few MiB.
pub const CAPACITY: usize = 65_536;
/// How long an idle flow stays tracked.
const TCP_IDLE: Duration = Duration::from_secs(600);
const OTHER_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Entry {
    version: u64,
    rule: Option<usize>,
    tier: Tier,
    last_seen: Instant,
}

#[derive(Debug)]
pub struct Conntrack {
    flows: HashMap<Flow, Entry>,
    capacity: usize,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

/// The policy and identities as one versioned value, swapped whole.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub policy: Policy,
    pub identities: Identities,
    /// Rises with every change of either.
    pub version: u64,
}

impl Rules {
    /// Decides a flow nobody tracks.
    pub fn decide(&self, flow: &Flow) -> Decision {
        self.policy.decide(
            flow,
            self.identities.get(flow.src),
            self.identities.get(flow.dst),
        )
    }
}

impl Conntrack {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            flows: HashMap::new(),
            capacity,
        }
    }

    /// The verdict for one packet of `flow`. `related` is the flow an ICMP
    /// error quotes (the packet that caused it), when it is one.
    pub fn check(
        &mut self,
        now: Instant,
        rules: &Rules,
        flow: &Flow,
        related: Option<&Flow>,
    ) -> Decision {
        if let Some(decision) = self.tracked(now, rules, flow) {
            return decision;
        }
        let reply = flow.reversed();
        if let Some(original) = self.tracked(now, rules, &reply) {
            return reply_of(original);
        }
        if let Some(quoted) = related {
            // The error travels against the quoted packet's direction.
            if let Some(original) = self.tracked(now, rules, quoted) {
                return reply_of(original);
            }
        }
        let decision = rules.decide(flow);
        if decision.action == Action::Allow {
            self.remember(now, rules.version, flow, decision);
        }
        decision
    }

    /// Forgets flows idle past their timeout.
    pub fn expire(&mut self, now: Instant) {
        self.flows
            .retain(|flow, e| now.saturating_duration_since(e.last_seen) < idle_limit(flow));
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// An entry's decision, re-made if an older policy made it; a flow the
    /// current policy denies is forgotten.
    fn tracked(&mut self, now: Instant, rules: &Rules, flow: &Flow) -> Option<Decision> {
        let entry = self.flows.get_mut(flow)?;
        if entry.version != rules.version {
            let decision = rules.decide(flow);
            if decision.action != Action::Allow {
                self.flows.remove(flow);
                return Some(decision);
            }
            entry.version = rules.version;
            entry.rule = decision.rule;
            entry.tier = decision.tier;
        }
        entry.last_seen = now;
        Some(Decision {
            action: Action::Allow,
            tier: entry.tier,
            rule: entry.rule,
        })
    }

    fn remember(&mut self, now: Instant, version: u64, flow: &Flow, decision: Decision) {
        if self.flows.len() >= self.capacity {
            self.expire(now);
            if self.flows.len() >= self.capacity {
                return;
            }
        }
        self.flows.insert(
            *flow,
            Entry {
                version,
                rule: decision.rule,
                tier: decision.tier,
                last_seen: now,
            },
        );
    }
}

fn reply_of(original: Decision) -> Decision {
    match original.action {
        Action::Allow => Decision {
            action: Action::Allow,
            tier: Tier::Reply,
            rule: original.rule,
        },
        Action::Deny => original,
    }
}

fn idle_limit(flow: &Flow) -> Duration {
    match flow.protocol {
        Protocol::Tcp => TCP_IDLE,
        Protocol::Udp | Protocol::Icmp => OTHER_IDLE,
    }
}

/// A packet's flow and, for an ICMP error, the flow it quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub flow: Flow,
    pub related: Option<Flow>,
}

/// Reads the flow of an IPv4 packet: TCP and UDP by ports, ICMP echo by
/// its identifier (in both port fields, so a reply is the reverse), ICMP
/// errors by the packet they quote. `None` for anything else, which the
/// policy treats as unknown (a fragment after the first, say).
pub fn classify(packet: &[u8]) -> Option<Classified> {
    let (src, dst, protocol, payload) = ipv4_parts(packet)?;
    match protocol {
        Protocol::Tcp | Protocol::Udp => {
            let (src_port, dst_port) = ports(payload)?;
            Some(Classified {
                flow: Flow {
                    src,
                    dst,
                    protocol,
                    src_port,
                    dst_port,
                },
                related: None,
            })
        }
        Protocol::Icmp => classify_icmp(src, dst, payload),
    }
}

fn classify_icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp: &[u8]) -> Option<Classified> {
    let kind = *icmp.first()?;
    let flow = |id: u16| Flow {
        src,
        dst,
        protocol: Protocol::Icmp,
        src_port: id,
        dst_port: id,
    };
    match kind {
        // Echo request and reply: the identifier ties them together.
        0 | 8 => {
            let id = u16::from_be_bytes([*icmp.get(4)?, *icmp.get(5)?]);
            Some(Classified {
                flow: flow(id),
                related: None,
            })
        }
        // Unreachable, time exceeded, parameter problem: quote a packet.
        3 | 11 | 12 => {
            let quoted = classify(icmp.get(8..)?).map(|c| c.flow);
            Some(Classified {
                flow: flow(0),
                related: quoted,
            })
        }
        _ => Some(Classified {
            flow: flow(0),
            related: None,
        }),
    }
}

fn ipv4_parts(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, Protocol, &[u8])> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header = usize::from(first & 0x0f) * 4;
    let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
    if header < 20 || fragment != 0 {
        return None;
    }
    let protocol = Protocol::from_number(*packet.get(9)?)?;
    let address = |at: usize| -> Option<Ipv4Addr> {
        let octets: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(octets))
    };
    let (src, dst) = (address(12)?, address(16)?);
    Some((src, dst, protocol, packet.get(header..)?))
}

fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    let b = l4.get(..4)?;
    Some((
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
    ))
}

#[cfg(test)]
mod tests;
