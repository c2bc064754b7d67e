//! The policy as the data path meets it: the current rules, the flows it
//! tracks, and what it dropped, per direction, tier and rule, with the
//! most recent drops kept for `meshctl drops`.
//!
//! Egress is checked before sealing (it saves the work, and lets `reject`
//! answer the local sender); ingress after decryption, where the tunnel
//! proves which host sealed the packet, so it holds even against a peer
//! that skips egress checks. Rules are swapped whole; nothing is flushed.
//! Must never: do IO, read the clock, or allocate for a packet of an
//! established flow.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conntrack::{self, Conntrack, Rules};
use super::{Action, Decision, Flow, Tier};

/// Drops remembered for `meshctl drops`.
pub const RECENT_DROPS: usize = 256;
/// How often idle flows are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From this host's containers, before sealing.
    Egress,
    /// From a peer, after decryption.
    Ingress,
    /// Between two containers of this host (TAP mode, through the agent).
    Local,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::Local => "local",
        }
    }
}

/// One dropped packet, as `meshctl drops` shows it. `flow` is `None` for a
/// packet the policy could not read (a later fragment, another protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropRecord {
    /// Rises by one per drop, so a follower can ask for what is new.
    pub sequence: u64,
    pub at: Instant,
    pub direction: Direction,
    pub flow: Option<Flow>,
    pub tier: Tier,
    pub rule: Option<Arc<str>>,
}

/// A drop counter's key: direction, tier, and the rule that decided.
pub type CounterKey = (Direction, Tier, Option<Arc<str>>);

#[derive(Debug)]
pub struct Enforcer {
    rules: Arc<Rules>,
    /// Whether `rules` can deny anything: derived once per swap, so a
    /// packet under an allow-all policy costs one branch.
    can_deny: bool,
    /// The rules' names, shared with the counters and drop records.
    rule_names: Vec<Arc<str>>,
    conntrack: Conntrack,
    counters: HashMap<CounterKey, u64>,
    recent: VecDeque<DropRecord>,
    sequence: u64,
    last_sweep: Option<Instant>,
}

impl Default for Enforcer {
    fn default() -> Self {
        Self::new(Arc::new(Rules::default()))
    }
}

impl Enforcer {
    pub fn new(rules: Arc<Rules>) -> Self {
        let mut enforcer = Self {
            rules: Arc::new(Rules::default()),
            can_deny: false,
            rule_names: Vec::new(),
            conntrack: Conntrack::default(),
            counters: HashMap::new(),
            recent: VecDeque::with_capacity(RECENT_DROPS),
            sequence: 0,
            last_sweep: None,
        };
        enforcer.set_rules(rules);
        enforcer
    }

    /// Swaps in new rules. Tracked flows stay; each is decided again at its
    /// next packet (their entries carry the old version).
    pub fn set_rules(&mut self, rules: Arc<Rules>) {
        self.rule_names = rules
            .policy
            .rules
            .iter()
            .map(|r| Arc::from(r.name.as_str()))
            .collect();
        self.can_deny = !rules.policy.allows_everything();
        self.rules = rules;
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Whether any packet can be denied (else the agent stays out of the
    /// way of same-host traffic).
    pub fn can_deny(&self) -> bool {
        self.can_deny
    }

    /// Whether `packet` may pass in `direction`; a denied one is counted
    /// and remembered. Without a policy that can deny, this is one branch.
    pub fn check(&mut self, now: Instant, direction: Direction, packet: &[u8]) -> Decision {
        if !self.can_deny {
            return ALLOWED;
        }
        let decision = match conntrack::classify(packet) {
            Some(c) => self
                .conntrack
                .check(now, &self.rules, &c.flow, c.related.as_ref()),
            // Unreadable for the policy: the default decides.
            None => Decision {
                action: self.rules.policy.default,
                tier: Tier::Default,
                rule: None,
            },
        };
        if decision.action == Action::Deny {
            let flow = conntrack::classify(packet).map(|c| c.flow);
            self.record_drop(now, direction, flow, decision);
        }
        decision
    }

    /// Sweeps idle flows now and then; call from the timer tick.
    pub fn tick(&mut self, now: Instant) {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if due {
            self.last_sweep = Some(now);
            self.conntrack.expire(now);
        }
    }

    pub fn counters(&self) -> &HashMap<CounterKey, u64> {
        &self.counters
    }

    /// Drops with a sequence above `after`, oldest first.
    pub fn recent_drops(&self, after: u64) -> impl Iterator<Item = &DropRecord> {
        self.recent.iter().filter(move |d| d.sequence > after)
    }

    pub fn tracked_flows(&self) -> usize {
        self.conntrack.len()
    }

    fn record_drop(
        &mut self,
        now: Instant,
        direction: Direction,
        flow: Option<Flow>,
        decision: Decision,
    ) {
        let rule = decision.rule.and_then(|i| self.rule_names.get(i).cloned());
        *self
            .counters
            .entry((direction, decision.tier, rule.clone()))
            .or_insert(0) += 1;
        self.sequence += 1;
        if self.recent.len() == RECENT_DROPS {
            self.recent.pop_front();
        }
        self.recent.push_back(DropRecord {
            sequence: self.sequence,
            at: now,
            direction,
            flow,
            tier: decision.tier,
            rule,
        });
    }
}

const ALLOWED: Decision = Decision {
    action: Action::Allow,
    tier: Tier::Default,
    rule: None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Identities, Policy};

    fn deny_all(version: u64) -> Arc<Rules> {
        Arc::new(Rules {
            policy: Policy {
                default: Action::Deny,
                ..Policy::default()
            },
            identities: Identities::default(),
            version,
        })
    }

    fn udp(dst_port: u8) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 42, 1, 2, 10, 42, 2, 2,
        ];
        p.extend_from_slice(&[0x9c, 0x40, 0, dst_port, 0, 8, 0, 0]);
        p
    }

    #[test]
    fn without_a_policy_nothing_is_tracked_or_counted() {
        let mut e = Enforcer::default();
        let d = e.check(Instant::now(), Direction::Egress, &udp(80));
        assert_eq!(d.action, Action::Allow);
        assert_eq!((e.tracked_flows(), e.counters().len()), (0, 0));
    }

    #[test]
    fn drops_are_counted_per_direction_and_kept_bounded() {
        let mut e = Enforcer::new(deny_all(1));
        let now = Instant::now();
        for _ in 0..3 {
            e.check(now, Direction::Ingress, &udp(80));
        }
        e.check(now, Direction::Egress, &udp(81));
        assert_eq!(e.counters()[&(Direction::Ingress, Tier::Default, None)], 3);
        assert_eq!(e.counters()[&(Direction::Egress, Tier::Default, None)], 1);
        let recent: Vec<_> = e.recent_drops(2).collect();
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[1].flow.unwrap().dst_port, 81);
        for _ in 0..(RECENT_DROPS * 2) {
            e.check(now, Direction::Ingress, &udp(1));
        }
        assert_eq!(e.recent_drops(0).count(), RECENT_DROPS);
    }

    #[test]
    fn unreadable_packets_get_the_default() {
        let mut e = Enforcer::new(deny_all(1));
        let mut fragment = udp(80);
        fragment[7] = 1;
        assert_eq!(
            e.check(Instant::now(), Direction::Ingress, &fragment)
                .action,
            Action::Deny
        );
        assert!(e.recent_drops(0).next().unwrap().flow.is_none());
    }
}
