//! The first, cheapest check on a handshake message: a budget per source
//! address, before any MAC, cookie or Diffie-Hellman.
//!
//! Anyone who knows a host's public key can make initiations with a valid
//! mac1. WireGuard's answer is the cookie reply, but computing and sending
//! one per message still costs a MAC, an encryption and a system call each:
//! a single sender at 140 k messages a second took a whole core and starved
//! the established tunnels. A sender over its budget is dropped here for
//! the price of a table lookup; the cookie mechanism still guards against
//! many spoofed sources, which share one small budget once the table is
//! full. Must never: allocate past `MAX_SOURCES` entries, or take the
//! budget of one source from another.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake messages one source address may send per second (and burst).
/// A peer needs a handful per rekey; a NAT with a few dozen hosts behind
/// it still fits.
pub const PER_SOURCE_PER_SECOND: u32 = 50;
/// Sources tracked at once. Past it, unknown sources share one budget of
/// `PER_SOURCE_PER_SECOND`: a flood from spoofed addresses cannot grow the
/// table or crowd out the peers already in it.
pub const MAX_SOURCES: usize = 4096;
/// A source quiet this long gives its entry back.
const IDLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
struct Budget {
    left: u32,
    window: Instant,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Self {
            left: PER_SOURCE_PER_SECOND,
            window: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.left = PER_SOURCE_PER_SECOND;
        }
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

#[derive(Debug)]
pub struct HandshakeGate {
    sources: HashMap<IpAddr, Budget>,
    overflow: Budget,
    last_sweep: Instant,
}

impl HandshakeGate {
    pub fn new(now: Instant) -> Self {
        Self {
            sources: HashMap::new(),
            overflow: Budget::new(now),
            last_sweep: now,
        }
    }

    /// Whether a handshake message from `source` may be looked at.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if let Some(budget) = self.sources.get_mut(&source) {
            return budget.take(now);
        }
        if self.sources.len() >= MAX_SOURCES {
            self.sweep(now);
        }
        if self.sources.len() >= MAX_SOURCES {
            return self.overflow.take(now);
        }
        let mut budget = Budget::new(now);
        let allowed = budget.take(now);
        self.sources.insert(source, budget);
        allowed
    }

    /// Forgets sources that have been quiet; at most once a second, so a
    /// full table of active sources does not cost a sweep per message.
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = now;
        self.sources
            .retain(|_, b| now.saturating_duration_since(b.window) < IDLE);
    }

    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400 + n))
    }

    #[test]
    fn a_flooding_source_is_cut_off_and_others_are_not() {
        let t0 = Instant::now();
        let mut gate = HandshakeGate::new(t0);
        let allowed = (0..10_000).filter(|_| gate.allow(ip(1), t0)).count();
        assert_eq!(allowed, PER_SOURCE_PER_SECOND as usize);
        assert!(gate.allow(ip(2), t0), "another source keeps its budget");
        let next = t0 + Duration::from_secs(1);
        assert!(gate.allow(ip(1), next), "the budget comes back");
    }

    #[test]
    fn spoofed_sources_cannot_grow_the_table_or_crowd_out_known_ones() {
        let t0 = Instant::now();
        let mut gate = HandshakeGate::new(t0);
        assert!(gate.allow(ip(0), t0));
        let spoofed = (1..100_000u32).filter(|n| gate.allow(ip(*n), t0)).count();
        assert_eq!(gate.tracked(), MAX_SOURCES);
        assert_eq!(
            spoofed,
            MAX_SOURCES - 1 + PER_SOURCE_PER_SECOND as usize,
            "past the table, unknown sources share one budget"
        );
        assert!(gate.allow(ip(0), t0), "a source in the table is unaffected");
        // Once the spoofed entries go quiet, new sources get entries again.
        let later = t0 + IDLE + Duration::from_secs(1);
        assert!(gate.allow(ip(200_000), later));
        assert!(gate.tracked() < MAX_SOURCES);
    }
}
