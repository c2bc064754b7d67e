//! Proxy ARP: the agent answers for every address another host owns.
//!
//! Containers carry a /16, so every overlay address looks on-link to them
//! and they ARP for it. The agent answers, with its own MAC, for addresses
//! inside another peer's subnet and for the service address; the frames
//! then come to the agent, which tunnels them. It never answers for its own
//! subnet (local containers answer for themselves), for anything outside
//! the overlay, for gratuitous ARP or for replies.
//!
//! Replies go to the frame's Ethernet source, and a request whose ARP
//! sender MAC is not that source is ignored: the agent never aims a reply
//! at a MAC the asker merely wrote into its payload. Each source MAC has
//! its own budget per second, under a global ceiling, so one container
//! cannot spend the answers its neighbours need.
//! Must never: answer without a matching rule, answer faster than its
//! rate limits, or track more sources than `MAX_SOURCES`.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etherparse::{ArpOperation, ArpPacket};
use ipnet::Ipv4Net;

use super::ethernet::{ETHERNET_HEADER, ETHERTYPE_ARP, Mac, write_header};

/// ARP replies per second, at most: far above what a host's containers
/// need (each caches a reply for minutes), low enough that a flood of
/// requests cannot turn the agent into a packet cannon.
pub const REPLIES_PER_SECOND: u32 = 500;
/// Replies per second to one source MAC: a container resolving fifty
/// remote peers at once is answered in the first second (the kernel
/// retries a miss each second anyway), and ten busy containers together
/// cannot use up the global ceiling.
pub const REPLIES_PER_SOURCE: u32 = 50;
/// Sources tracked per one-second window. The table is emptied every
/// window and an entry is made only for a reply the global ceiling allows,
/// so it cannot grow past `REPLIES_PER_SECOND` entries; this bound is the
/// explicit guard.
pub const MAX_SOURCES: usize = 1024;
/// Length of an Ethernet + ARP-for-IPv4 reply.
pub const REPLY_LEN: usize = ETHERNET_HEADER + 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpVerdict {
    /// Reply with this many bytes written to the output buffer.
    Reply(usize),
    Ignore(ArpIgnore),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpIgnore {
    Malformed,
    NotARequest,
    Gratuitous,
    OutsideOverlay,
    OwnSubnet,
    Unowned,
    /// The ARP sender MAC is not the frame's source (or the source is a
    /// multicast MAC): someone asking on another's behalf.
    SenderMismatch,
    /// The global ceiling is spent for this second.
    RateLimited,
    /// This source's own budget is spent for this second.
    SourceRateLimited,
}

/// What the responder needs to know about the world.
pub trait Owners {
    /// Whether another host of the mesh owns `addr`.
    fn remote(&self, addr: Ipv4Addr) -> bool;

    /// Whether the agent stands in for a container of this host towards
    /// another of its containers (so the policy sees their traffic).
    fn hairpin(&self, _addr: Ipv4Addr, _asker: Mac) -> bool {
        false
    }
}

pub struct ArpResponder {
    agent_mac: Mac,
    overlay: Ipv4Net,
    own_subnet: Ipv4Net,
    service: Ipv4Addr,
    budget: u32,
    window: Instant,
    /// Replies sent to each source MAC in the current window.
    per_source: HashMap<Mac, u32>,
}

impl ArpResponder {
    pub fn new(
        agent_mac: Mac,
        overlay: Ipv4Net,
        own_subnet: Ipv4Net,
        service: Ipv4Addr,
        now: Instant,
    ) -> Self {
        Self {
            agent_mac,
            overlay,
            own_subnet,
            service,
            budget: REPLIES_PER_SECOND,
            window: now,
            per_source: HashMap::new(),
        }
    }

    /// Decides about the ARP payload of a frame sent from `source` (its
    /// Ethernet source MAC); a reply is written to `out` (which must hold
    /// `REPLY_LEN` bytes).
    pub fn handle(
        &mut self,
        now: Instant,
        source: Mac,
        arp: &[u8],
        owners: &impl Owners,
        out: &mut [u8],
    ) -> ArpVerdict {
        let Some(request) = ArpPacket::from_slice(arp)
            .ok()
            .and_then(|p| p.try_eth_ipv4().ok())
        else {
            return ArpVerdict::Ignore(ArpIgnore::Malformed);
        };
        if request.operation != ArpOperation::REQUEST {
            return ArpVerdict::Ignore(ArpIgnore::NotARequest);
        }
        if source.is_multicast() || request.sender_mac != source.0 {
            return ArpVerdict::Ignore(ArpIgnore::SenderMismatch);
        }
        let target = request.target_ipv4_addr();
        let sender = request.sender_ipv4_addr();
        if sender == target || sender.is_unspecified() {
            // Gratuitous ARP announces, and address-conflict probes (sender
            // 0.0.0.0) must stay unanswered or DAD would see a conflict.
            return ArpVerdict::Ignore(ArpIgnore::Gratuitous);
        }
        let verdict = if target == self.service {
            None
        } else if !self.overlay.contains(&target) {
            Some(ArpIgnore::OutsideOverlay)
        } else if self.own_subnet.contains(&target) {
            (!owners.hairpin(target, source)).then_some(ArpIgnore::OwnSubnet)
        } else if !owners.remote(target) {
            Some(ArpIgnore::Unowned)
        } else {
            None
        };
        if let Some(ignore) = verdict {
            return ArpVerdict::Ignore(ignore);
        }
        if let Err(limited) = self.take_budget(now, source) {
            return ArpVerdict::Ignore(limited);
        }
        let mut reply = request.clone();
        reply.operation = ArpOperation::REPLY;
        reply.sender_mac = self.agent_mac.0;
        reply.sender_ipv4 = target.octets();
        reply.target_mac = source.0;
        reply.target_ipv4 = sender.octets();
        write_header(out, source, self.agent_mac, ETHERTYPE_ARP);
        out[ETHERNET_HEADER..REPLY_LEN].copy_from_slice(&reply.to_bytes());
        ArpVerdict::Reply(REPLY_LEN)
    }

    /// Spends one reply from `source`'s budget and the global one.
    fn take_budget(&mut self, now: Instant, source: Mac) -> Result<(), ArpIgnore> {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.budget = REPLIES_PER_SECOND;
            self.per_source.clear();
        }
        let used = self.per_source.get(&source).copied().unwrap_or(0);
        if used >= REPLIES_PER_SOURCE {
            return Err(ArpIgnore::SourceRateLimited);
        }
        if self.budget == 0 || (used == 0 && self.per_source.len() >= MAX_SOURCES) {
            return Err(ArpIgnore::RateLimited);
        }
        self.budget -= 1;
        self.per_source.insert(source, used + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use etherparse::ArpEthIpv4Packet;

    use super::*;

    struct Peers;
    impl Owners for Peers {
        fn remote(&self, addr: Ipv4Addr) -> bool {
            "10.42.2.0/24".parse::<Ipv4Net>().unwrap().contains(&addr)
        }
    }

    const AGENT: Mac = Mac([2, 1, 2, 3, 4, 5]);
    const ASKER: [u8; 6] = [0x0a, 0x42, 10, 42, 1, 5];

    fn responder() -> ArpResponder {
        ArpResponder::new(
            AGENT,
            "10.42.0.0/16".parse().unwrap(),
            "10.42.1.0/24".parse().unwrap(),
            Ipv4Addr::new(169, 254, 169, 250),
            Instant::now(),
        )
    }

    fn request(sender: [u8; 4], target: [u8; 4], op: ArpOperation) -> Vec<u8> {
        request_from(ASKER, sender, target, op)
    }

    fn request_from(mac: [u8; 6], sender: [u8; 4], target: [u8; 4], op: ArpOperation) -> Vec<u8> {
        let p = ArpEthIpv4Packet {
            operation: op,
            sender_mac: mac,
            sender_ipv4: sender,
            target_mac: [0; 6],
            target_ipv4: target,
        };
        p.to_bytes().to_vec()
    }

    fn ask(r: &mut ArpResponder, target: [u8; 4]) -> ArpVerdict {
        let mut out = [0u8; REPLY_LEN];
        r.handle(
            Instant::now(),
            Mac(ASKER),
            &request([10, 42, 1, 5], target, ArpOperation::REQUEST),
            &Peers,
            &mut out,
        )
    }

    #[test]
    fn answers_for_a_remote_hosts_address_with_the_agent_mac() {
        let mut r = responder();
        let mut out = [0u8; REPLY_LEN];
        let req = request([10, 42, 1, 5], [10, 42, 2, 9], ArpOperation::REQUEST);
        assert_eq!(
            r.handle(Instant::now(), Mac(ASKER), &req, &Peers, &mut out),
            ArpVerdict::Reply(REPLY_LEN)
        );
        assert_eq!(&out[0..6], &ASKER, "reply goes to the asker");
        assert_eq!(&out[6..12], &AGENT.0);
        let reply = ArpPacket::from_slice(&out[ETHERNET_HEADER..])
            .unwrap()
            .try_eth_ipv4()
            .unwrap();
        assert_eq!(reply.operation, ArpOperation::REPLY);
        assert_eq!(reply.sender_mac, AGENT.0);
        assert_eq!(reply.sender_ipv4, [10, 42, 2, 9]);
        assert_eq!(reply.target_mac, ASKER);
        assert_eq!(reply.target_ipv4, [10, 42, 1, 5]);
    }

    #[test]
    fn answers_for_the_service_address() {
        assert_eq!(
            ask(&mut responder(), [169, 254, 169, 250]),
            ArpVerdict::Reply(REPLY_LEN)
        );
    }

    #[test]
    fn never_answers_for_local_outside_or_unowned_addresses() {
        let mut r = responder();
        assert_eq!(
            ask(&mut r, [10, 42, 1, 7]),
            ArpVerdict::Ignore(ArpIgnore::OwnSubnet)
        );
        assert_eq!(
            ask(&mut r, [10, 42, 1, 1]),
            ArpVerdict::Ignore(ArpIgnore::OwnSubnet)
        );
        assert_eq!(
            ask(&mut r, [192, 168, 1, 1]),
            ArpVerdict::Ignore(ArpIgnore::OutsideOverlay)
        );
        assert_eq!(
            ask(&mut r, [169, 254, 169, 251]),
            ArpVerdict::Ignore(ArpIgnore::OutsideOverlay)
        );
        assert_eq!(
            ask(&mut r, [10, 42, 99, 1]),
            ArpVerdict::Ignore(ArpIgnore::Unowned)
        );
    }

    #[test]
    fn ignores_gratuitous_probes_replies_and_garbage() {
        let mut r = responder();
        let mut out = [0u8; REPLY_LEN];
        let now = Instant::now();
        let gratuitous = request([10, 42, 2, 9], [10, 42, 2, 9], ArpOperation::REQUEST);
        assert_eq!(
            r.handle(now, Mac(ASKER), &gratuitous, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::Gratuitous)
        );
        let probe = request([0, 0, 0, 0], [10, 42, 2, 9], ArpOperation::REQUEST);
        assert_eq!(
            r.handle(now, Mac(ASKER), &probe, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::Gratuitous)
        );
        let reply = request([10, 42, 1, 5], [10, 42, 2, 9], ArpOperation::REPLY);
        assert_eq!(
            r.handle(now, Mac(ASKER), &reply, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::NotARequest)
        );
        for garbage in [&[][..], &[0, 1, 8, 0, 6, 4, 0, 1][..], &[0xff; 60][..]] {
            assert_eq!(
                r.handle(now, Mac(ASKER), garbage, &Peers, &mut out),
                ArpVerdict::Ignore(ArpIgnore::Malformed)
            );
        }
    }

    /// Replies given to `mac` asking `n` times at `now`.
    fn answered(r: &mut ArpResponder, now: Instant, mac: [u8; 6], n: u32) -> usize {
        let req = request_from(mac, [10, 42, 1, 5], [10, 42, 2, 9], ArpOperation::REQUEST);
        let mut out = [0u8; REPLY_LEN];
        (0..n)
            .filter(|_| {
                matches!(
                    r.handle(now, Mac(mac), &req, &Peers, &mut out),
                    ArpVerdict::Reply(_)
                )
            })
            .count()
    }

    fn source(i: u32) -> [u8; 6] {
        let b = i.to_be_bytes();
        [0x0a, 0x42, b[0], b[1], b[2], b[3]]
    }

    #[test]
    fn one_source_cannot_spend_its_neighbours_budget() {
        let mut r = responder();
        let t0 = Instant::now();
        assert_eq!(
            answered(&mut r, t0, source(1), REPLIES_PER_SECOND),
            REPLIES_PER_SOURCE as usize
        );
        let mut out = [0u8; REPLY_LEN];
        let req = request_from(
            source(1),
            [10, 42, 1, 5],
            [10, 42, 2, 9],
            ArpOperation::REQUEST,
        );
        assert_eq!(
            r.handle(t0, Mac(source(1)), &req, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::SourceRateLimited)
        );
        assert_eq!(
            answered(&mut r, t0, source(2), 1),
            1,
            "the neighbour is still answered"
        );
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            answered(&mut r, later, source(1), 1),
            1,
            "a new second refills"
        );
    }

    #[test]
    fn many_sources_together_stop_at_the_global_ceiling() {
        let mut r = responder();
        let t0 = Instant::now();
        let total: usize = (0..2 * MAX_SOURCES as u32)
            .map(|i| answered(&mut r, t0, source(i), 2))
            .sum();
        assert_eq!(total, REPLIES_PER_SECOND as usize);
        assert!(r.per_source.len() <= MAX_SOURCES);
        assert_eq!(
            answered(&mut r, t0 + Duration::from_secs(1), source(9999), 1),
            1
        );
        assert_eq!(r.per_source.len(), 1, "the table is emptied each window");
    }

    #[test]
    fn a_request_on_behalf_of_another_mac_is_ignored() {
        let mut r = responder();
        let mut out = [0u8; REPLY_LEN];
        let victim = [0x0a, 0x42, 10, 42, 1, 7];
        let req = request_from(
            victim,
            [10, 42, 1, 5],
            [10, 42, 2, 9],
            ArpOperation::REQUEST,
        );
        assert_eq!(
            r.handle(Instant::now(), Mac(ASKER), &req, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::SenderMismatch)
        );
        let multicast = [0x0b, 0x42, 10, 42, 1, 5];
        let req = request_from(
            multicast,
            [10, 42, 1, 5],
            [10, 42, 2, 9],
            ArpOperation::REQUEST,
        );
        assert_eq!(
            r.handle(Instant::now(), Mac(multicast), &req, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::SenderMismatch)
        );
    }

    #[test]
    fn replies_are_addressed_to_the_frames_source() {
        let mut r = responder();
        let mut out = [0u8; REPLY_LEN];
        let asker = [0x0a, 0x42, 10, 42, 1, 8];
        let req = request_from(asker, [10, 42, 1, 8], [10, 42, 2, 9], ArpOperation::REQUEST);
        assert_eq!(
            r.handle(Instant::now(), Mac(asker), &req, &Peers, &mut out),
            ArpVerdict::Reply(REPLY_LEN)
        );
        assert_eq!(&out[0..6], &asker);
        assert_eq!(&out[ETHERNET_HEADER + 18..ETHERNET_HEADER + 24], &asker);
    }
}
