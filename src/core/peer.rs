//! One remote host: its WireGuard session, endpoint, liveness and counters.
//!
//! Wraps boringtun's `noise::Tunn` and adds what the protocol library leaves
//! to its user: the cryptokey check on decrypted packets, endpoint roaming,
//! draining packets queued behind a handshake, and the operator-visible
//! state. Must never: pass a decrypted packet on without the cryptokey
//! check, or log per packet above trace level.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tracing::{info, trace, warn};

use super::DropReason;
use super::liveness::{Liveness, PeerState};
use super::outbox::{MAX_PACKET, Outbox, Placed};
use super::padding::Padder;
use crate::keys::{PresharedKey, PublicKey};
use crate::membership::PeerSpec;

/// WireGuard message types (first byte of every message).
const MSG_INITIATION: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;
/// Room boringtun requires for any message it writes.
const MIN_ROOM: usize = 148;
/// Data message overhead: header 16 + tag 16.
pub const WG_OVERHEAD: usize = 32;
/// Upper bound on packets drained after one handshake (boringtun queues
/// at most 256).
const MAX_DRAIN: usize = 257;

/// What an operator sees of a peer (`meshctl peers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub subnet: Ipv4Net,
    pub state: PeerState,
    pub last_handshake_secs_ago: Option<u64>,
    /// Bytes opened from and sealed for this peer: the inner packets with
    /// their padding to 16 bytes (`core::padding`), without WireGuard's
    /// headers, so both ends of a tunnel count the same.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Packets from or for this peer that were dropped.
    pub dropped: u64,
    pub keepalive: Option<u16>,
    /// Handshakes that gave this peer a session (initiated or answered).
    #[serde(default)]
    pub handshakes: u64,
    /// Handshake attempts given up on, and responses that did not
    /// authenticate.
    #[serde(default)]
    pub handshake_failures: u64,
    /// Why the tunnel is not up, when it is not.
    pub reason: Option<String>,
    pub has_preshared_key: bool,
}

/// The last thing that went wrong with a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The peer answered our initiation, but its answer did not
    /// authenticate: with the right static keys on both sides (or the MAC
    /// check would have dropped it first), that is a preshared key mismatch.
    ResponseRejected,
}

pub(crate) struct Peer {
    spec: PeerSpec,
    endpoint: Option<SocketAddr>,
    tunn: Tunn,
    liveness: Liveness,
    reported: PeerState,
    /// Inner bytes delivered: counted here with `rx_packets`, not taken
    /// from boringtun, which also counts packets decrypted and then
    /// dropped (cryptokey mismatch, not for us); the kernel counts those
    /// as errors, not as received.
    rx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    dropped: u64,
    failure: Option<Failure>,
    /// boringtun holds packets queued behind a handshake.
    queued: bool,
    /// When we last answered a stale initiation with one of our own.
    countered_at: Option<Instant>,
    handshakes: u64,
    handshake_failures: u64,
    /// When the next persistent keepalive is due. meshd sends them itself,
    /// not boringtun, whose interval is fixed when the `Tunn` is made: a
    /// reload that changes the interval must not cost the session.
    keepalive_due: Option<Instant>,
    span: tracing::Span,
}

impl Peer {
    pub(crate) fn new(
        spec: PeerSpec,
        secret: x25519::StaticSecret,
        index: u32,
        rate_limiter: Arc<RateLimiter>,
    ) -> Self {
        let tunn = Tunn::new(
            secret,
            spec.public_key.to_x25519(),
            spec.preshared_key.as_ref().map(PresharedKey::to_bytes),
            None,
            index,
            Some(rate_limiter),
        );
        let span = tracing::info_span!("peer", name = %spec.name);
        Self {
            endpoint: spec.endpoint,
            liveness: Liveness::new(spec.keepalive),
            spec,
            tunn,
            reported: PeerState::Down,
            rx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            dropped: 0,
            failure: None,
            queued: false,
            countered_at: None,
            handshakes: 0,
            handshake_failures: 0,
            keepalive_due: None,
            span,
        }
    }

    pub(crate) fn spec(&self) -> &PeerSpec {
        &self.spec
    }

    /// Takes a changed spec that keeps key, subnet and preshared key (the
    /// caller rebuilds the peer otherwise): a new endpoint or keepalive
    /// applies to the running session.
    pub(crate) fn update_spec(&mut self, spec: PeerSpec) {
        if spec.endpoint.is_some() && spec.endpoint != self.spec.endpoint {
            self.endpoint = spec.endpoint;
        }
        if spec.keepalive != self.spec.keepalive {
            self.liveness.set_keepalive(spec.keepalive);
            self.keepalive_due = None;
        }
        self.spec = spec;
    }

    pub(crate) fn count_drop(&mut self) {
        self.dropped += 1;
    }

    /// Pads a packet for this host (`padder`), encrypts it and queues it
    /// for the peer: every packet the agent seals passes here.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        packet: &[u8],
        padder: &mut Padder,
        out: &mut Outbox,
    ) -> Result<(), DropReason> {
        let Some(to) = self.endpoint else {
            return Err(DropReason::NoEndpoint);
        };
        let packet = padder.pad(packet);
        let room = out.spare((packet.len() + WG_OVERHEAD).max(MIN_ROOM));
        let start = room.as_ptr();
        match self.tunn.encapsulate(packet, room) {
            TunnResult::WriteToNetwork(msg) => {
                let is_initiation = msg.first() == Some(&MSG_INITIATION);
                let placed = Placed::within(start, msg);
                if is_initiation {
                    // The packet waits in boringtun's queue for the session.
                    self.liveness.on_initiation_sent(now);
                    self.queued = true;
                } else {
                    self.tx_packets += 1;
                }
                out.commit_network(to, placed);
                Ok(())
            }
            // Queued behind a handshake already under way.
            TunnResult::Done => {
                self.queued = true;
                Ok(())
            }
            TunnResult::Err(_)
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => Err(DropReason::Rejected),
        }
    }

    /// Handles a datagram routed to this peer. A decrypted packet for this
    /// host is returned, placed `headroom` bytes into its room so the caller
    /// can frame it, for the caller to deliver.
    pub(crate) fn receive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        host_subnet: Ipv4Net,
        headroom: usize,
        out: &mut Outbox,
    ) -> Result<Option<Placed>, DropReason> {
        let kind = datagram.first().copied().unwrap_or(0);
        let room = out.spare(headroom + datagram.len().max(MIN_ROOM));
        let start = room.as_ptr();
        match self
            .tunn
            .decapsulate(Some(from.ip()), datagram, &mut room[headroom..])
        {
            TunnResult::WriteToNetwork(reply) => {
                let is_cookie = reply.first() == Some(&MSG_COOKIE);
                let placed = Placed::within(start, reply);
                out.commit_network(from, placed);
                // A cookie reply means we are under load and the sender has
                // not proven its address yet: nothing is authenticated.
                if !is_cookie {
                    self.authenticated(now, from, kind);
                }
                // Only an initiator holds a usable session at once (its
                // answer is a keepalive on it). Having just answered an
                // initiation, there is none yet: draining would start a new
                // initiation of our own and drop the one the peer is
                // answering, and two peers initiating together would do so
                // to each other forever. A responder drains once the
                // initiator's first message confirms the session.
                if kind == MSG_RESPONSE {
                    self.drain_queue(out);
                }
                Ok(None)
            }
            TunnResult::WriteToTunnelV4(packet, source) => {
                let destination = packet
                    .get(16..20)
                    .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]));
                // What the sender sealed, padding included, so that both
                // ends of a tunnel count the same bytes.
                let len = datagram.len().saturating_sub(WG_OVERHEAD) as u64;
                let placed = Placed::within(start, packet);
                self.authenticated(now, from, kind);
                if !self.spec.subnet.contains(&source) {
                    return Err(DropReason::CryptokeyMismatch);
                }
                if !destination.is_some_and(|d| host_subnet.contains(&d)) {
                    return Err(DropReason::NotForUs);
                }
                self.rx_packets += 1;
                self.rx_bytes += len;
                Ok(Some(placed))
            }
            TunnResult::WriteToTunnelV6(..) => {
                self.authenticated(now, from, kind);
                Err(DropReason::NotIpv4)
            }
            TunnResult::Done => {
                // A keepalive (authenticated) or a consumed cookie reply.
                if kind != MSG_COOKIE {
                    self.authenticated(now, from, kind);
                }
                Ok(None)
            }
            TunnResult::Err(e) => {
                trace!(parent: &self.span, error = ?e, "rejected datagram");
                if kind == MSG_INITIATION && matches!(e, WireGuardError::WrongTai64nTimestamp) {
                    self.counter_stale_initiation(now, out);
                }
                // A response to an initiation since replaced (crossing
                // handshakes, a late retransmission) is "unexpected"; only
                // one that matches our initiation and still fails to
                // authenticate says the keys disagree.
                let stale = matches!(e, WireGuardError::UnexpectedPacket);
                if kind == MSG_RESPONSE && !stale {
                    self.handshake_failures += 1;
                }
                if kind == MSG_RESPONSE && !stale && self.failure.is_none() {
                    warn!(parent: &self.span, "handshake response did not authenticate: do the preshared keys differ?");
                    self.failure = Some(Failure::ResponseRejected);
                }
                Err(DropReason::Rejected)
            }
        }
    }

    /// Drives the protocol timers and meshd's own reconnect policy; call
    /// every 100-250 ms.
    pub(crate) fn tick(&mut self, now: Instant, out: &mut Outbox) {
        let room = out.spare(MIN_ROOM);
        let start = room.as_ptr();
        match self.tunn.update_timers(room) {
            TunnResult::WriteToNetwork(msg) => {
                let is_initiation = msg.first() == Some(&MSG_INITIATION);
                let placed = Placed::within(start, msg);
                if let Some(to) = self.endpoint {
                    if is_initiation {
                        self.liveness.on_initiation_sent(now);
                    }
                    out.commit_network(to, placed);
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                if self.liveness.attempting() {
                    self.handshake_failures += 1;
                }
                self.liveness.on_expired(now);
            }
            TunnResult::Err(e) => trace!(parent: &self.span, error = ?e, "timer error"),
            TunnResult::Done
            | TunnResult::WriteToTunnelV4(..)
            | TunnResult::WriteToTunnelV6(..) => {}
        }
        let has_session = self.has_session();
        if self.endpoint.is_some() && self.liveness.wants_handshake(now, has_session) {
            self.initiate(now, out);
        }
        self.persistent_keepalive(now, has_session, out);
        self.report_state_change(now);
    }

    /// Sends an empty data message every `keepalive` seconds while a session
    /// exists, as `wg`'s persistent keepalive does (keeping NAT and
    /// firewall state open). Without a session, `tick` handshakes instead.
    fn persistent_keepalive(&mut self, now: Instant, has_session: bool, out: &mut Outbox) {
        let (Some(secs), Some(to), true) = (self.spec.keepalive, self.endpoint, has_session) else {
            return;
        };
        let interval = std::time::Duration::from_secs(secs.into());
        let due = *self.keepalive_due.get_or_insert(now + interval);
        if now < due {
            return;
        }
        self.keepalive_due = Some(now + interval);
        let room = out.spare(MIN_ROOM);
        let start = room.as_ptr();
        if let TunnResult::WriteToNetwork(msg) = self.tunn.encapsulate(&[], room) {
            let placed = Placed::within(start, msg);
            out.commit_network(to, placed);
        }
    }

    pub(crate) fn status(&self, now: Instant) -> PeerStatus {
        let (_, tx_bytes, _, _, _) = self.tunn.stats();
        PeerStatus {
            name: self.spec.name.clone(),
            public_key: self.spec.public_key,
            endpoint: self.endpoint,
            subnet: self.spec.subnet,
            state: self.state(now),
            last_handshake_secs_ago: self
                .liveness
                .last_handshake()
                .map(|t| now.saturating_duration_since(t).as_secs()),
            rx_bytes: self.rx_bytes,
            tx_bytes: tx_bytes as u64,
            rx_packets: self.rx_packets,
            tx_packets: self.tx_packets,
            dropped: self.dropped,
            keepalive: self.spec.keepalive,
            handshakes: self.handshakes,
            handshake_failures: self.handshake_failures,
            reason: self.reason(now),
            has_preshared_key: self.spec.preshared_key.is_some(),
        }
    }

    fn reason(&self, now: Instant) -> Option<String> {
        let state = self.state(now);
        if state == PeerState::Up {
            return None;
        }
        if self.failure == Some(Failure::ResponseRejected) {
            return Some("the peer answers, but its handshake does not authenticate: preshared keys (or cluster keys) differ".into());
        }
        Some(match (self.endpoint, state) {
            (None, _) => "no endpoint known: waiting to be contacted".into(),
            (Some(e), PeerState::Connecting) => format!("no handshake answer from {e} yet"),
            (Some(e), _) => format!("no answer from {e}; retrying"),
        })
    }

    pub(crate) fn state(&self, now: Instant) -> PeerState {
        self.liveness.state(now, self.has_session())
    }

    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    /// The peer proved it holds its key (the initiation's timestamp
    /// decrypted) but stamped it earlier than one we already accepted: it
    /// restarted with its clock set back (or this is a replay). Its
    /// initiations will fail until its clock passes the old stamp, hours
    /// perhaps; ours carry our own clock, so we initiate instead, at most
    /// once per REKEY_TIMEOUT. A replay can make us do no more than that,
    /// to the endpoint we already know.
    fn counter_stale_initiation(&mut self, now: Instant, out: &mut Outbox) {
        if self
            .countered_at
            .is_some_and(|t| now.saturating_duration_since(t) < super::liveness::REKEY_TIMEOUT)
        {
            return;
        }
        self.countered_at = Some(now);
        tracing::debug!(parent: &self.span, "the peer's handshake is stamped in our past (clock set back?): initiating instead");
        let Some(to) = self.endpoint else { return };
        let room = out.spare(MIN_ROOM);
        let start = room.as_ptr();
        if let TunnResult::WriteToNetwork(msg) = self.tunn.format_handshake_initiation(room, true) {
            let placed = Placed::within(start, msg);
            self.liveness.on_initiation_sent(now);
            out.commit_network(to, placed);
        }
    }

    fn initiate(&mut self, now: Instant, out: &mut Outbox) {
        let Some(to) = self.endpoint else { return };
        let room = out.spare(MIN_ROOM);
        let start = room.as_ptr();
        if let TunnResult::WriteToNetwork(msg) = self.tunn.format_handshake_initiation(room, false)
        {
            let placed = Placed::within(start, msg);
            self.liveness.on_initiation_sent(now);
            out.commit_network(to, placed);
        }
    }

    fn authenticated(&mut self, now: Instant, from: SocketAddr, kind: u8) {
        let is_data = kind == MSG_DATA;
        if is_data && self.reported == PeerState::Up && self.endpoint == Some(from) {
            // The steady state, once per received packet: data on a working
            // tunnel from where it already was changes nothing but the
            // clocks, so the state is not re-evaluated.
            self.liveness.on_authenticated(now, true, true);
            return;
        }
        match kind {
            MSG_INITIATION => {
                self.liveness.on_initiation_answered(now);
                self.handshakes += 1;
            }
            MSG_RESPONSE => {
                self.liveness.on_response(now);
                self.failure = None;
                self.handshakes += 1;
            }
            _ => {}
        }
        // A data message that decrypted proves a session; only handshakes
        // need to ask the protocol library.
        let has_session = is_data || self.has_session();
        self.liveness.on_authenticated(now, is_data, has_session);
        if self.endpoint != Some(from) {
            info!(parent: &self.span, endpoint = %from, previous = ?self.endpoint, "endpoint changed");
            self.endpoint = Some(from);
        }
        self.report_state_change(now);
    }

    /// Sends what waited behind a handshake, once a data message or
    /// keepalive has confirmed the session (call after the packet that
    /// `receive` returned is committed or dropped: this reuses the room).
    pub(crate) fn send_queued(&mut self, out: &mut Outbox) {
        if self.queued && self.has_session() {
            self.drain_queue(out);
        }
    }

    /// Sends what boringtun queued while the handshake was under way.
    fn drain_queue(&mut self, out: &mut Outbox) {
        let Some(to) = self.endpoint else { return };
        self.queued = false;
        for _ in 0..MAX_DRAIN {
            let room = out.spare(MAX_PACKET);
            let start = room.as_ptr();
            let TunnResult::WriteToNetwork(msg) = self.tunn.decapsulate(None, &[], room) else {
                break;
            };
            if msg.len() > WG_OVERHEAD {
                self.tx_packets += 1;
            }
            let placed = Placed::within(start, msg);
            out.commit_network(to, placed);
        }
    }

    fn report_state_change(&mut self, now: Instant) {
        let state = self.state(now);
        if state == self.reported {
            return;
        }
        info!(
            parent: &self.span,
            from = self.reported.as_str(),
            to = state.as_str(),
            endpoint = ?self.endpoint,
            "tunnel {}",
            state.as_str()
        );
        self.reported = state;
    }
}
