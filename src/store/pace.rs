//! When this host writes its DNS records to the store: the rules, with
//! time as an argument.
//!
//! Records change with every container attach or detach; a host that
//! attaches a hundred containers in a second writes once, then once more
//! with whatever came after, each write at least `WRITE_EVERY` after the
//! last. A write happens only when the key differs from what this host
//! wants (value or lease), so a reconnect costs a read, not a watch event
//! for every other host. Must never: write more often than `WRITE_EVERY`,
//! or lose a change (a change while a write is pending rides on it).

use std::time::{Duration, Instant};

/// The shortest time between two writes of this host's records: the
/// issue's "at most once per second", which bounds what a busy host
/// costs etcd and every watcher (one event per host per second).
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

/// Paces the writes of one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pacer {
    due: Option<Instant>,
    last: Option<Instant>,
}

impl Pacer {
    /// Something changed at `now`: a write is due as soon as the pace
    /// allows (a pending one already covers it).
    pub fn schedule(&mut self, now: Instant) {
        if self.due.is_none() {
            let earliest = self.last.map_or(now, |l| l + WRITE_EVERY);
            self.due = Some(earliest.max(now));
        }
    }

    /// When the pending write is due; `None`: nothing to write.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The write (or the check that found nothing to write) ran at `now`.
    pub fn done(&mut self, now: Instant) {
        self.due = None;
        self.last = Some(now);
    }
}

/// The largest record set written to etcd, encoded. etcd refuses requests
/// over 1.5 MiB by default (`--max-request-bytes`); a host at the
/// container limit with long names and many ports can exceed that (about
/// 1 kB a container). Such a host's peers fall back to its mesh snapshot.
pub const MAX_VALUE: usize = 1 << 20;

/// What to do with the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// etcd already holds this value on this lease.
    Keep,
    Put,
    /// Too large for etcd: remove a smaller, older set so peers do not
    /// serve it as authoritative, and let the mesh sync carry this host.
    Delete,
}

/// `current` is the key's (value, lease) as read, `None` when absent.
pub fn action(current: Option<(&[u8], i64)>, wanted: &[u8], lease: i64) -> Action {
    if wanted.len() > MAX_VALUE {
        return match current {
            Some(_) => Action::Delete,
            None => Action::Keep,
        };
    }
    match current {
        Some((value, on)) if value == wanted && on == lease => Action::Keep,
        _ => Action::Put,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_change_is_written_at_once_then_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        assert_eq!(p.due(), None);
        p.schedule(t0);
        assert_eq!(p.due(), Some(t0));
        p.done(t0);
        // A hundred changes in the next half second: one write, a second
        // after the last.
        for ms in 0..100 {
            p.schedule(t0 + Duration::from_millis(5 * ms));
        }
        assert_eq!(p.due(), Some(t0 + WRITE_EVERY));
        p.done(t0 + WRITE_EVERY);
        // A change long after: at once again.
        let later = t0 + Duration::from_secs(10);
        p.schedule(later);
        assert_eq!(p.due(), Some(later));
    }

    #[test]
    fn a_change_while_a_write_is_pending_rides_on_it() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        p.done(t0);
        p.schedule(t0 + Duration::from_millis(100));
        p.schedule(t0 + Duration::from_millis(900));
        assert_eq!(p.due(), Some(t0 + WRITE_EVERY));
    }

    #[test]
    fn only_a_differing_value_or_lease_is_put() {
        assert_eq!(action(None, b"v", 7), Action::Put);
        assert_eq!(action(Some((b"old", 7)), b"v", 7), Action::Put);
        assert_eq!(action(Some((b"v", 6)), b"v", 7), Action::Put, "old lease");
        assert_eq!(action(Some((b"v", 7)), b"v", 7), Action::Keep);
    }

    #[test]
    fn a_set_too_large_for_etcd_removes_the_key_instead() {
        let big = vec![b'x'; MAX_VALUE + 1];
        assert_eq!(action(Some((b"old", 7)), &big, 7), Action::Delete);
        assert_eq!(action(None, &big, 7), Action::Keep);
        let fits = vec![b'x'; MAX_VALUE];
        assert_eq!(action(None, &fits, 7), Action::Put);
    }
}
