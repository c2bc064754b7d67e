//! The whole protocol state of one host: its identity, its peers, the
//! overlay routes between them, and the drop counters.
//!
//! `Node` is owned by exactly one task. Every input is a method taking the
//! current time and an [`Outbox`] to fill; nothing here blocks, allocates
//! per packet in steady state, or takes a lock shared with other tasks
//! (boringtun's rate limiter is atomics plus a once-a-second reset).
//! Must never: do IO, or route a packet to anything but the peer that owns
//! its destination.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::Ipv4Net;
use tracing::{info, trace, warn};

use super::arp::{self, ArpResponder, ArpVerdict};
use super::ethernet::{ETHERNET_HEADER, ETHERTYPE_ARP, ETHERTYPE_IPV4, Frame, Mac, write_header};
use super::handshake_gate::HandshakeGate;
use super::outbox::{Outbox, Placed};
use super::packet::{self, ICMP_ERROR_MAX, SyncPort};
use super::padding::Padder;
use super::peer::{Peer, PeerStatus};
use super::route::RouteTable;
use super::service::{self, SERVICE_ADDRESS};
use super::{DropCounters, DropReason, PeerState};
use crate::dns::sync::SYNC_PORT;
use crate::keys::{PrivateKey, PublicKey};
use crate::membership::{self, Membership, PeerSpec};
use crate::policy::Action;
use crate::policy::conntrack::Rules;
use crate::policy::enforcer::{Direction, Enforcer};

/// Handshakes per second answered before cookies are required; the value
/// boringtun's own device uses.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// ICMP errors the agent originates per second, at most.
const ICMP_ERRORS_PER_SECOND: u32 = 100;
/// Session indices are 24 bits; boringtun uses the low 8 for rotation.
const MAX_PEERS: usize = 1 << 24;

/// Who this host is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub private_key: PrivateKey,
    pub subnet: Ipv4Net,
    pub overlay: Ipv4Net,
}

/// What the overlay device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// IP packets (a TUN device).
    Tun,
    /// Ethernet frames (a TAP device on the bridge the containers share).
    Tap,
}

/// TAP mode's view of the local link.
struct Tap {
    agent_mac: Mac,
    /// Local addresses and the MACs that own them: the host's own address
    /// (the bridge) and every attached container, as told at attach time.
    neighbours: HashMap<Ipv4Addr, Mac>,
    arp: ArpResponder,
}

/// Who the agent answers ARP for: remote addresses always; with a policy
/// that can deny, also this host's containers when another of them asks,
/// so same-host traffic passes the policy too (the bridge filter keeps
/// containers from reaching each other directly then).
struct ArpOwners<'a> {
    routes: &'a RouteTable<usize>,
    neighbours: &'a HashMap<Ipv4Addr, Mac>,
    host: Ipv4Addr,
    hairpin: bool,
}

impl arp::Owners for ArpOwners<'_> {
    fn remote(&self, addr: Ipv4Addr) -> bool {
        self.routes.lookup(addr).is_some()
    }

    fn hairpin(&self, addr: Ipv4Addr, asker: Mac) -> bool {
        self.hairpin
            && addr != self.host
            && self
                .neighbours
                .get(&addr)
                .is_some_and(|owner| *owner != asker)
    }
}

/// Host-level view for `meshctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub peers: usize,
    pub up: usize,
    pub connecting: usize,
    pub down: usize,
}

pub struct Node {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    subnet: Ipv4Net,
    /// Screens every handshake message once, with the sender's real
    /// address, before any Diffie-Hellman: mac1, then cookies under load.
    rate_limiter: Arc<RateLimiter>,
    /// Per-source budgets for handshake messages, checked before anything.
    gate: HandshakeGate,
    /// What the peers' sessions check again inside boringtun: mac1 only.
    /// Its limit is never reached, so a message is counted once, above.
    screened: Arc<RateLimiter>,
    /// Slot = session index; freed slots are reused.
    peers: Vec<Option<Peer>>,
    free_slots: Vec<usize>,
    by_key: HashMap<PublicKey, usize>,
    routes: RouteTable<usize>,
    drops: DropCounters,
    icmp_budget: u32,
    icmp_window: Instant,
    tap: Option<Tap>,
    /// Where records-sync packets are built before sealing (reused).
    sync_packet: Vec<u8>,
    /// Who may reach whom, and the flows it allowed.
    policy: Enforcer,
    /// TAP mode: ARP requests answered (for metrics).
    arp_replies: u64,
    /// Pads what is sealed to the protocol's multiple of 16 bytes.
    padder: Padder,
}

impl Node {
    /// `mtu` is the largest packet the device carries: padding stops there.
    pub fn new(identity: &Identity, mode: LinkMode, mtu: u16, now: Instant) -> Self {
        let public_key = identity.private_key.public_key();
        let tap = (mode == LinkMode::Tap).then(|| {
            let agent_mac = Mac::of_agent(&public_key);
            let host = membership::host_address(identity.subnet);
            Tap {
                agent_mac,
                neighbours: HashMap::from([(host, Mac::of_bridge(&public_key))]),
                arp: ArpResponder::new(
                    agent_mac,
                    identity.overlay,
                    identity.subnet,
                    SERVICE_ADDRESS,
                    now,
                ),
            }
        });
        Self {
            tap,
            secret: identity.private_key.to_x25519(),
            public: public_key.to_x25519(),
            subnet: identity.subnet,
            rate_limiter: Arc::new(RateLimiter::new(
                &public_key.to_x25519(),
                HANDSHAKE_RATE_LIMIT,
            )),
            screened: Arc::new(RateLimiter::new(&public_key.to_x25519(), u64::MAX)),
            gate: HandshakeGate::new(now),
            peers: Vec::new(),
            free_slots: Vec::new(),
            by_key: HashMap::new(),
            routes: RouteTable::default(),
            drops: DropCounters::default(),
            icmp_budget: ICMP_ERRORS_PER_SECOND,
            icmp_window: now,
            sync_packet: Vec::new(),
            policy: Enforcer::default(),
            arp_replies: 0,
            padder: Padder::new(mtu),
        }
    }

    /// TAP mode: the MAC the agent answers ARP with and sends from.
    pub fn agent_mac(&self) -> Option<Mac> {
        self.tap.as_ref().map(|t| t.agent_mac)
    }

    /// TAP mode: a local address is now held by `mac` (an attach).
    pub fn set_neighbour(&mut self, addr: Ipv4Addr, mac: Mac) {
        if let Some(tap) = self.tap.as_mut() {
            tap.neighbours.insert(addr, mac);
        }
    }

    /// TAP mode: a local address is free again (a detach).
    pub fn remove_neighbour(&mut self, addr: Ipv4Addr) {
        if let Some(tap) = self.tap.as_mut() {
            tap.neighbours.remove(&addr);
        }
    }

    /// TAP mode: a frame the bridge passed to the agent. ARP requests are
    /// answered; IPv4 frames addressed to the agent's MAC are routed like
    /// TUN packets; anything else (the bridge floods) is not for us.
    pub fn handle_device_frame(&mut self, now: Instant, frame: &[u8], out: &mut Outbox) {
        let Some(tap) = self.tap.as_mut() else {
            return self.drop(DropReason::Malformed);
        };
        let Some(frame) = Frame::parse(frame) else {
            return self.drop(DropReason::Malformed);
        };
        if frame.ethertype == ETHERTYPE_ARP {
            let room = out.spare(arp::REPLY_LEN);
            let start = room.as_ptr();
            let owners = ArpOwners {
                routes: &self.routes,
                neighbours: &tap.neighbours,
                host: membership::host_address(self.subnet),
                hairpin: self.policy.can_deny(),
            };
            if let ArpVerdict::Reply(n) =
                tap.arp
                    .handle(now, frame.source, frame.payload, &owners, room)
            {
                let placed = Placed::within(start, &room[..n]);
                out.commit_device(placed);
                self.arp_replies += 1;
            }
            return;
        }
        if frame.destination != tap.agent_mac || frame.ethertype != ETHERTYPE_IPV4 {
            return;
        }
        let agent_mac = tap.agent_mac;
        let packet = without_ethernet_padding(frame.payload);
        let addrs = match packet::ipv4_addresses(packet) {
            Ok(a) => a,
            Err(reason) => return self.drop(reason),
        };
        // A local address speaks only from the MAC that holds it (the
        // bridge for the host, a container's own from attach): a container
        // cannot borrow another's address, or the host's.
        if tap.neighbours.get(&addrs.source) != Some(&frame.source) {
            return self.drop(DropReason::SpoofedSource);
        }
        if addrs.destination == SERVICE_ADDRESS {
            return self.answer_service(packet, frame.source, agent_mac, out);
        }
        if self.subnet.contains(&addrs.destination) && self.policy.can_deny() {
            return self.hairpin(now, packet, out);
        }
        // The binding above already proves the source is this host's.
        self.forward(now, packet, addrs.destination, out);
    }

    /// Whether the policy denies a packet from this host's side; with
    /// `reject`, the local sender is told.
    fn denied(
        &mut self,
        now: Instant,
        direction: Direction,
        packet: &[u8],
        out: &mut Outbox,
    ) -> bool {
        if self.policy.check(now, direction, packet).action == Action::Allow {
            return false;
        }
        if self.policy.rules().policy.reject {
            self.reply_prohibited(packet, out);
        }
        true
    }

    /// TAP mode under a policy that can deny: one container to another of
    /// this host, through the agent so the policy sees it.
    fn hairpin(&mut self, now: Instant, packet: &[u8], out: &mut Outbox) {
        if self.denied(now, Direction::Local, packet, out) {
            return self.drop(DropReason::PolicyLocal);
        }
        let room = out.spare(ETHERNET_HEADER + packet.len());
        let start = room.as_ptr();
        room[ETHERNET_HEADER..].copy_from_slice(packet);
        let placed = Placed::within(start, &room[ETHERNET_HEADER..]);
        self.deliver(placed, out);
    }

    /// This host's overlay address.
    pub fn address(&self) -> Ipv4Addr {
        membership::host_address(self.subnet)
    }

    /// Makes the peer set equal to `membership`: new peers are added,
    /// missing ones removed, changed ones updated: endpoint and keepalive in
    /// place, rebuilt when their subnet or preshared key changed (the key
    /// names the peer). Sessions of unchanged peers survive.
    pub fn apply_membership(&mut self, membership: &Membership) {
        let wanted: HashMap<PublicKey, &PeerSpec> =
            membership.peers.iter().map(|p| (p.public_key, p)).collect();
        let gone: Vec<PublicKey> = self
            .by_key
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.remove_peer(key);
        }
        for spec in &membership.peers {
            self.upsert_peer(spec);
        }
    }

    /// A packet the host sent into the overlay device.
    pub fn handle_device_packet(&mut self, now: Instant, packet: &[u8], out: &mut Outbox) {
        let addrs = match packet::ipv4_addresses(packet) {
            Ok(a) => a,
            Err(reason) => return self.drop(reason),
        };
        if !self.subnet.contains(&addrs.source) {
            return self.drop(DropReason::ForeignSource);
        }
        self.forward(now, packet, addrs.destination, out);
    }

    /// Sends a checked packet from this host to the peer that owns its
    /// destination, or answers that no one does.
    fn forward(&mut self, now: Instant, packet: &[u8], destination: Ipv4Addr, out: &mut Outbox) {
        let Some(&slot) = self.routes.lookup(destination) else {
            self.reply_unreachable(packet, out);
            return self.drop(DropReason::NoRoute);
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return self.drop(DropReason::NoRoute);
        };
        // Only the agent speaks for this host on the sync port (send_sync):
        // no local process or container may pose as it.
        let peer_host = membership::host_address(peer.spec().subnet);
        if packet::targets_sync_port(packet, peer_host, SYNC_PORT) {
            return self.drop(DropReason::SyncPort);
        }
        if self.denied(now, Direction::Egress, packet, out) {
            return self.drop(DropReason::PolicyEgress);
        }
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return self.drop(DropReason::NoRoute);
        };
        if let Err(reason) = peer.send(now, packet, &mut self.padder, out) {
            peer.count_drop();
            self.drop(reason);
        }
    }

    /// A datagram that arrived on the underlay socket.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Outbox,
    ) {
        let packet = Tunn::parse_incoming_packet(datagram);
        let handshake = matches!(
            packet,
            Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_))
        );
        if handshake && !self.gate.allow(from.ip(), now) {
            return self.drop(DropReason::HandshakeFlood);
        }
        let slot = match packet {
            Ok(Packet::HandshakeInit(init)) => {
                match self.initiator_of(from, datagram, &init, out) {
                    Ok(Some(slot)) => slot,
                    Ok(None) => return,
                    Err(reason) => return self.drop(reason),
                }
            }
            Ok(Packet::HandshakeResponse(m)) => match self.screen_handshake(from, datagram, out) {
                Ok(true) => slot_of_index(m.receiver_idx),
                Ok(false) => return,
                Err(reason) => return self.drop(reason),
            },
            Ok(Packet::PacketCookieReply(m)) => slot_of_index(m.receiver_idx),
            Ok(Packet::PacketData(m)) => slot_of_index(m.receiver_idx),
            Err(_) => return self.drop(DropReason::InvalidDatagram),
        };
        let subnet = self.subnet;
        let headroom = self.headroom();
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return self.drop(DropReason::UnknownIndex);
        };
        match peer.receive(now, from, datagram, subnet, headroom, out) {
            Ok(Some(placed)) => {
                let key = peer.spec().public_key;
                let peer_host = membership::host_address(peer.spec().subnet);
                let own_host = membership::host_address(subnet);
                match packet::sync_inbound(out.placed_bytes(placed), own_host, peer_host, SYNC_PORT)
                {
                    SyncPort::Other => {
                        let packet = out.placed_bytes(placed);
                        if self.policy.check(now, Direction::Ingress, packet).action == Action::Deny
                        {
                            self.drop(DropReason::PolicyIngress);
                        } else {
                            self.deliver(placed, out);
                        }
                    }
                    SyncPort::Message(payload) => out.commit_sync(key, placed.slice(payload)),
                    SyncPort::Misused => self.drop(DropReason::SyncPort),
                }
            }
            Ok(None) => {}
            Err(reason) => {
                peer.count_drop();
                self.drop(reason);
            }
        }
        if let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) {
            peer.send_queued(out);
        }
    }

    /// Drives every peer's timers; call every 100-250 ms.
    pub fn handle_timers(&mut self, now: Instant, out: &mut Outbox) {
        self.rate_limiter.reset_count();
        if now.saturating_duration_since(self.icmp_window) >= Duration::from_secs(1) {
            self.icmp_window = now;
            self.icmp_budget = ICMP_ERRORS_PER_SECOND;
        }
        for peer in self.peers.iter_mut().flatten() {
            peer.tick(now, out);
        }
        self.policy.tick(now);
    }

    /// Swaps in new policy rules (a reload, or new records): tracked flows
    /// are decided again at their next packet.
    pub fn set_policy(&mut self, rules: Arc<Rules>) {
        self.policy.set_rules(rules);
    }

    pub fn policy(&self) -> &Enforcer {
        &self.policy
    }

    pub fn peer_statuses(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers.iter().flatten().map(|p| p.status(now)).collect()
    }

    pub fn summary(&self, now: Instant) -> NodeSummary {
        let mut s = NodeSummary {
            peers: 0,
            up: 0,
            connecting: 0,
            down: 0,
        };
        for peer in self.peers.iter().flatten() {
            s.peers += 1;
            match peer.state(now) {
                PeerState::Up => s.up += 1,
                PeerState::Connecting => s.connecting += 1,
                PeerState::Down => s.down += 1,
            }
        }
        s
    }

    /// ARP requests answered so far (TAP mode).
    pub fn arp_replies(&self) -> u64 {
        self.arp_replies
    }

    pub fn drops(&self) -> &DropCounters {
        &self.drops
    }

    /// Counts a drop the shell saw (a failed send or write).
    pub fn count_io_drop(&mut self) {
        self.drop(DropReason::IoError);
    }

    /// Counts a records-sync message the shell could not hand on.
    pub fn count_sync_backlog(&mut self) {
        self.drop(DropReason::SyncBacklog);
    }

    /// Seals a records-sync message for the peer with key `to`, from this
    /// host's address and sync port to the peer's: the only way anything
    /// reaches a peer's sync port.
    pub fn send_sync(&mut self, now: Instant, to: &PublicKey, payload: &[u8], out: &mut Outbox) {
        let Some(&slot) = self.by_key.get(to) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let source = membership::host_address(self.subnet);
        let destination = membership::host_address(peer.spec().subnet);
        let mut packet = std::mem::take(&mut self.sync_packet);
        packet.clear();
        let built = etherparse::PacketBuilder::ipv4(source.octets(), destination.octets(), 64)
            .udp(SYNC_PORT, SYNC_PORT)
            .write(&mut packet, payload);
        let sent = match built {
            Ok(()) => peer.send(now, &packet, &mut self.padder, out),
            Err(_) => Err(DropReason::Malformed),
        };
        self.sync_packet = packet;
        if let Err(reason) = sent {
            self.drop(reason);
        }
    }

    fn drop(&mut self, reason: DropReason) {
        trace!(reason = reason.as_str(), "drop");
        self.drops.count(reason);
    }

    /// Checks a handshake message's mac1 and, under load, its cookie (mac2),
    /// answering with a cookie reply when it has none. True when the
    /// message may go on to the expensive work.
    fn screen_handshake(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Outbox,
    ) -> Result<bool, DropReason> {
        let room = out.spare(ICMP_ERROR_MAX);
        let start = room.as_ptr();
        match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, room)
        {
            Ok(_) => Ok(true),
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let placed = Placed::within(start, cookie);
                out.commit_network(from, placed);
                Ok(false)
            }
            Err(_) => Err(DropReason::Rejected),
        }
    }

    /// Finds which peer sent a handshake initiation. Screens it first, so
    /// the expensive Diffie-Hellman of identifying the sender is only done
    /// for well-formed messages within the load limit.
    fn initiator_of(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit<'_>,
        out: &mut Outbox,
    ) -> Result<Option<usize>, DropReason> {
        if !self.screen_handshake(from, datagram, out)? {
            return Ok(None);
        }
        let half = parse_handshake_anon(&self.secret, &self.public, init)
            .map_err(|_| DropReason::Rejected)?;
        let key = PublicKey::from(half.peer_static_public);
        self.by_key
            .get(&key)
            .copied()
            .map(Some)
            .ok_or(DropReason::UnknownPeer)
    }

    fn reply_unreachable(&mut self, packet: &[u8], out: &mut Outbox) {
        self.reply_error(packet, out, packet::host_unreachable);
    }

    /// The policy's `reject`: tells the local sender at once (a TCP reset,
    /// else ICMP administratively prohibited).
    fn reply_prohibited(&mut self, packet: &[u8], out: &mut Outbox) {
        self.reply_error(packet, out, |p, room| {
            packet::tcp_reset(p, room).or_else(|| packet::prohibited(p, room))
        });
    }

    /// Writes the answer `write` makes about `packet` back to the device,
    /// within the per-second budget of errors the agent originates.
    fn reply_error(
        &mut self,
        packet: &[u8],
        out: &mut Outbox,
        write: impl FnOnce(&[u8], &mut [u8]) -> Option<usize>,
    ) {
        if self.icmp_budget == 0 {
            return;
        }
        let headroom = self.headroom();
        let room = out.spare(headroom + ICMP_ERROR_MAX);
        let start = room.as_ptr();
        if let Some(len) = write(packet, &mut room[headroom..]) {
            let placed = Placed::within(start, &room[headroom..headroom + len]);
            self.icmp_budget -= 1;
            self.deliver(placed, out);
        }
    }

    /// Bytes kept free before packets bound for the device, so TAP mode can
    /// frame them in place.
    fn headroom(&self) -> usize {
        if self.tap.is_some() {
            ETHERNET_HEADER
        } else {
            0
        }
    }

    /// Hands a placed IP packet to the device; in TAP mode framed for the
    /// MAC that holds its destination.
    fn deliver(&mut self, placed: Placed, out: &mut Outbox) {
        let Some(tap) = &self.tap else {
            return out.commit_device(placed);
        };
        let destination = out
            .placed_bytes(placed)
            .get(16..20)
            .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]));
        let Some(mac) = destination.and_then(|d| tap.neighbours.get(&d).copied()) else {
            return self.drop(DropReason::NoNeighbour);
        };
        let mut header = [0u8; ETHERNET_HEADER];
        write_header(&mut header, mac, tap.agent_mac, ETHERTYPE_IPV4);
        out.commit_device_framed(placed, &header);
    }

    /// Answers what the agent serves itself at the service address (ICMP
    /// echo) and hands the rest (DNS) to the host, whose sockets serve it:
    /// the frame goes back out framed for the bridge.
    fn answer_service(&mut self, packet: &[u8], asker: Mac, agent_mac: Mac, out: &mut Outbox) {
        let room = out.spare(ETHERNET_HEADER + packet.len().max(64));
        let start = room.as_ptr();
        if let Some(n) = service::echo_reply(packet, &mut room[ETHERNET_HEADER..]) {
            write_header(room, asker, agent_mac, ETHERTYPE_IPV4);
            let placed = Placed::within(start, &room[..ETHERNET_HEADER + n]);
            return out.commit_device(placed);
        }
        let host = membership::host_address(self.subnet);
        let Some(bridge) = self
            .tap
            .as_ref()
            .and_then(|t| t.neighbours.get(&host).copied())
        else {
            return;
        };
        room[ETHERNET_HEADER..ETHERNET_HEADER + packet.len()].copy_from_slice(packet);
        write_header(room, bridge, agent_mac, ETHERTYPE_IPV4);
        let placed = Placed::within(start, &room[..ETHERNET_HEADER + packet.len()]);
        out.commit_device(placed);
    }

    fn upsert_peer(&mut self, spec: &PeerSpec) {
        if let Some(&slot) = self.by_key.get(&spec.public_key) {
            let Some(peer) = self.peers[slot].as_mut() else {
                return;
            };
            let old = peer.spec();
            if old.subnet == spec.subnet && old.preshared_key == spec.preshared_key {
                peer.update_spec(spec.clone());
                return;
            }
            self.remove_peer(spec.public_key);
        }
        self.add_peer(spec);
    }

    fn add_peer(&mut self, spec: &PeerSpec) {
        if spec.subnet.contains(&self.subnet) || self.subnet.contains(&spec.subnet) {
            warn!(peer = %spec.name, subnet = %spec.subnet, "peer subnet overlaps ours; peer ignored");
            return;
        }
        let Some(slot) = self.free_slots.pop().or_else(|| self.new_slot()) else {
            warn!(peer = %spec.name, "too many peers; peer ignored");
            return;
        };
        let Ok(index) = u32::try_from(slot) else {
            return;
        };
        if let Err(e) = self.routes.insert(spec.subnet, slot) {
            warn!(peer = %spec.name, error = %e, "peer ignored");
            self.free_slots.push(slot);
            return;
        }
        self.peers[slot] = Some(Peer::new(
            spec.clone(),
            self.secret.clone(),
            index,
            self.screened.clone(),
        ));
        self.by_key.insert(spec.public_key, slot);
        info!(peer = %spec.name, subnet = %spec.subnet, endpoint = ?spec.endpoint, "peer added");
    }

    fn new_slot(&mut self) -> Option<usize> {
        if self.peers.len() >= MAX_PEERS {
            return None;
        }
        self.peers.push(None);
        Some(self.peers.len() - 1)
    }

    fn remove_peer(&mut self, key: PublicKey) {
        let Some(slot) = self.by_key.remove(&key) else {
            return;
        };
        if let Some(peer) = self.peers[slot].take() {
            self.routes.remove(peer.spec().subnet);
            info!(peer = %peer.spec().name, "peer removed");
        }
        self.free_slots.push(slot);
    }
}

/// An IPv4 packet without the padding a minimum-size Ethernet frame adds.
fn without_ethernet_padding(payload: &[u8]) -> &[u8] {
    match payload.get(2..4) {
        Some(len) => {
            let total = usize::from(u16::from_be_bytes([len[0], len[1]]));
            &payload[..total.clamp(payload.len().min(20), payload.len())]
        }
        None => payload,
    }
}

fn slot_of_index(receiver_index: u32) -> usize {
    (receiver_index >> 8) as usize
}

#[cfg(test)]
mod tests;
