//! Reconnect delays: exponential with jitter, so a fleet that lost etcd
//! at the same moment does not come back at the same moment.
//!
//! Pure: the random draw is an argument. Must never: return zero (a tight
//! reconnect loop) or more than `MAX`.

use std::time::Duration;

/// First retry delay (before jitter).
pub const BASE: Duration = Duration::from_millis(250);
/// Longest delay: a returning etcd is noticed within this, and 1,000 hosts
/// spread over it reconnect at about 100 per second.
pub const MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt: uniform in [cap/2, cap], where
    /// cap doubles per failure up to `MAX` ("equal jitter").
    pub fn next(&mut self, random: u64) -> Duration {
        let cap = BASE
            .checked_mul(1u32.checked_shl(self.failures).unwrap_or(u32::MAX))
            .unwrap_or(MAX)
            .min(MAX);
        self.failures = self.failures.saturating_add(1).min(31);
        let half = u64::try_from(cap.as_millis() / 2)
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(half + random % (half + 1))
    }

    /// After a success: the next failure starts from `BASE` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.next(0);
        assert_eq!(first, BASE / 2);
        let mut last = first;
        for _ in 0..40 {
            last = b.next(u64::MAX);
            assert!(last <= MAX && last > Duration::ZERO);
        }
        assert!(last >= MAX / 2, "capped at MAX: {last:?}");
        b.reset();
        assert!(b.next(12345) <= BASE);
    }

    #[test]
    fn jitter_spreads_the_same_attempt() {
        let draws: std::collections::BTreeSet<_> = (0..50u64)
            .map(|r| {
                let mut b = Backoff::default();
                for _ in 0..5 {
                    b.next(0);
                }
                b.next(r.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            })
            .collect();
        assert!(draws.len() > 20);
    }
}
