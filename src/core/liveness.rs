//! Whether a tunnel is up: the peer state machine.
//!
//! The protocol library knows sessions; this module turns protocol events
//! into the state an operator sees (up / connecting / down) and decides
//! when meshd should start a handshake on its own. WireGuard gives up after
//! 90 s of unanswered handshakes; a mesh must notice when a host comes back,
//! so meshd tries again after `RETRY_BACKOFF`.
//! Must never: read the clock (time comes in as `now`) or do IO.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// WireGuard's REKEY_TIMEOUT: a handshake unanswered this long is retried.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after WireGuard gave up meshd starts a fresh attempt.
pub const RETRY_BACKOFF: Duration = Duration::from_secs(30);
/// WireGuard's REJECT_AFTER_TIME: no session outlives it unconfirmed.
const REJECT_AFTER: Duration = Duration::from_secs(180);
/// Grace beyond REKEY_TIMEOUT before an unanswered handshake counts as a
/// failing tunnel rather than a routine rekey (which answers in one RTT).
const HANDSHAKE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// A session is established and the peer is not known to be silent.
    Up,
    /// meshd is trying to establish a session.
    Connecting,
    /// No session and no attempt under way.
    Down,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Connecting => "connecting",
            PeerState::Down => "down",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Liveness {
    /// Our persistent keepalive; peers of a mesh use the same value, so a
    /// peer silent for two intervals plus REKEY_TIMEOUT is taken as gone.
    keepalive: Option<Duration>,
    last_rx: Option<Instant>,
    last_handshake: Option<Instant>,
    /// Start of the current unanswered handshake attempt.
    attempt_since: Option<Instant>,
    /// When WireGuard last gave up on the peer.
    gave_up_at: Option<Instant>,
    /// When the tunnel last proved to work both ways: a handshake response
    /// accepted, or data received on a session. Answering an initiation
    /// proves nothing: with differing preshared keys the responder cannot
    /// tell, only the initiator can.
    confirmed_at: Option<Instant>,
}

impl Liveness {
    pub fn new(keepalive: Option<u16>) -> Self {
        Self {
            keepalive: keepalive.map(|k| Duration::from_secs(k.into())),
            last_rx: None,
            last_handshake: None,
            attempt_since: None,
            gave_up_at: None,
            confirmed_at: None,
        }
    }

    pub fn set_keepalive(&mut self, keepalive: Option<u16>) {
        self.keepalive = keepalive.map(|k| Duration::from_secs(k.into()));
    }

    /// We sent a handshake initiation (first or retransmitted).
    pub fn on_initiation_sent(&mut self, now: Instant) {
        self.attempt_since.get_or_insert(now);
    }

    /// The peer accepted our initiation: the tunnel works.
    pub fn on_response(&mut self, now: Instant) {
        self.last_handshake = Some(now);
        self.confirmed_at = Some(now);
        self.attempt_since = None;
        self.gave_up_at = None;
    }

    /// We answered the peer's initiation. Our own attempt, if any, is not
    /// over: the session becomes usable only once the peer sends data on it.
    pub fn on_initiation_answered(&mut self, now: Instant) {
        self.last_handshake = Some(now);
        self.gave_up_at = None;
    }

    /// Any authenticated message arrived (data, keepalive, handshake).
    /// Data on a usable session proves the tunnel works both ways.
    pub fn on_authenticated(&mut self, now: Instant, is_data: bool, has_session: bool) {
        self.last_rx = Some(now);
        if is_data && has_session {
            self.confirmed_at = Some(now);
            self.attempt_since = None;
            self.gave_up_at = None;
        }
    }

    /// The protocol gave up on the peer (no answer within 90 s, or no new
    /// keys for 540 s). Repeated reports of the same failure change nothing.
    pub fn on_expired(&mut self, now: Instant) {
        if self.attempt_since.is_some() || self.gave_up_at.is_none() {
            self.gave_up_at = Some(now);
            self.attempt_since = None;
        }
    }

    /// Whether a handshake of ours is under way.
    pub fn attempting(&self) -> bool {
        self.attempt_since.is_some()
    }

    pub fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }

    /// The state an operator sees, given whether the protocol holds a
    /// usable session.
    pub fn state(&self, now: Instant, has_session: bool) -> PeerState {
        let confirmed = self
            .confirmed_at
            .is_some_and(|t| now.saturating_duration_since(t) < REJECT_AFTER);
        if has_session && confirmed && !self.is_silent(now) && !self.handshake_failing(now) {
            PeerState::Up
        } else if self.attempt_since.is_some() {
            PeerState::Connecting
        } else {
            PeerState::Down
        }
    }

    /// Whether meshd should start a handshake now (for a peer whose endpoint
    /// it knows): the tunnel is not up, none is under way, and any backoff
    /// after a failure has passed.
    pub fn wants_handshake(&self, now: Instant, has_session: bool) -> bool {
        self.attempt_since.is_none()
            && self.state(now, has_session) != PeerState::Up
            && self
                .gave_up_at
                .is_none_or(|t| now.saturating_duration_since(t) >= RETRY_BACKOFF)
    }

    fn is_silent(&self, now: Instant) -> bool {
        let Some(keepalive) = self.keepalive else {
            return false;
        };
        let since = self.last_rx.or(self.last_handshake);
        since.is_none_or(|t| now.saturating_duration_since(t) > 2 * keepalive + REKEY_TIMEOUT)
    }

    fn handshake_failing(&self, now: Instant) -> bool {
        self.attempt_since
            .is_some_and(|t| now.saturating_duration_since(t) > REKEY_TIMEOUT + HANDSHAKE_GRACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn fresh_peer_is_down_and_wants_a_handshake() {
        let t0 = Instant::now();
        let l = Liveness::new(None);
        assert_eq!(l.state(t0, false), PeerState::Down);
        assert!(l.wants_handshake(t0, false));
    }

    #[test]
    fn handshake_in_flight_is_connecting_then_up_when_answered() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.on_initiation_sent(t0);
        assert_eq!(l.state(t0, false), PeerState::Connecting);
        assert!(!l.wants_handshake(t0, false));
        l.on_response(t0 + S);
        l.on_authenticated(t0 + S, false, true);
        assert_eq!(l.state(t0 + S, true), PeerState::Up);
        assert!(!l.wants_handshake(t0 + S, true));
        assert_eq!(l.last_handshake(), Some(t0 + S));
    }

    #[test]
    fn routine_rekey_keeps_the_tunnel_up() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Some(25));
        l.on_response(t0);
        l.on_authenticated(t0 + 100 * S, true, true);
        l.on_initiation_sent(t0 + 120 * S);
        assert_eq!(l.state(t0 + 120 * S, true), PeerState::Up);
        l.on_authenticated(t0 + 120 * S, false, true);
        l.on_response(t0 + 120 * S);
        assert_eq!(l.state(t0 + 121 * S, true), PeerState::Up);
    }

    #[test]
    fn unanswered_rehandshake_turns_up_into_connecting() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.on_response(t0);
        l.on_initiation_sent(t0 + 20 * S);
        assert_eq!(l.state(t0 + 26 * S, true), PeerState::Up);
        assert_eq!(l.state(t0 + 27 * S, true), PeerState::Connecting);
    }

    #[test]
    fn silent_peer_with_keepalive_is_down_after_two_intervals() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Some(2));
        l.on_response(t0);
        l.on_authenticated(t0 + S, true, true);
        // 2 x 2 s + 5 s after the last packet.
        assert_eq!(l.state(t0 + 10 * S, true), PeerState::Up);
        assert_eq!(l.state(t0 + 11 * S, true), PeerState::Down);
        assert!(l.wants_handshake(t0 + 11 * S, true));
        l.on_authenticated(t0 + 11 * S, true, true);
        assert_eq!(l.state(t0 + 11 * S, true), PeerState::Up);
    }

    #[test]
    fn idle_peer_without_keepalive_stays_up_while_the_session_lives() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.on_response(t0);
        assert_eq!(l.state(t0 + 170 * S, true), PeerState::Up);
        assert_eq!(l.state(t0 + 181 * S, false), PeerState::Down);
    }

    #[test]
    fn simultaneous_initiation_stays_connecting_until_the_tunnel_is_proven() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.on_initiation_sent(t0);
        // We answer the peer's initiation; its session is not usable yet.
        l.on_initiation_answered(t0);
        l.on_authenticated(t0, false, false);
        assert_eq!(l.state(t0, false), PeerState::Connecting);
        // The peer's first data on that session proves it.
        l.on_authenticated(t0 + S, true, true);
        assert_eq!(l.state(t0 + S, true), PeerState::Up);
        assert_eq!(l.last_handshake(), Some(t0));
    }

    #[test]
    fn an_answered_initiation_alone_is_not_a_working_tunnel() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.on_initiation_answered(t0);
        l.on_authenticated(t0, false, true);
        assert_ne!(l.state(t0, true), PeerState::Up);
        l.on_authenticated(t0 + S, true, true);
        assert_eq!(l.state(t0 + S, true), PeerState::Up);
    }

    #[test]
    fn after_giving_up_retries_only_after_backoff() {
        let t0 = Instant::now();
        let mut l = Liveness::new(None);
        l.on_initiation_sent(t0);
        l.on_expired(t0 + 90 * S);
        assert_eq!(l.state(t0 + 90 * S, false), PeerState::Down);
        assert!(!l.wants_handshake(t0 + 100 * S, false));
        // Repeated expiry reports do not push the retry further out.
        l.on_expired(t0 + 110 * S);
        assert!(l.wants_handshake(t0 + 120 * S, false));
        l.on_initiation_sent(t0 + 120 * S);
        assert_eq!(l.state(t0 + 120 * S, false), PeerState::Connecting);
    }
}
