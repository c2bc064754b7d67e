//! Proxy ARP: the agent answers for every address another host owns.
//!
//! Containers carry a /16, so every overlay address looks on-link to them
//! and they ARP for it. The agent answers, with its own MAC, for addresses
//! inside another peer's subnet and for the service address; the frames
//! then come to the agent, which tunnels them. It never answers for its own
//! subnet (local containers answer for themselves), for anything outside
//! the overlay, for gratuitous ARP or for replies.
//! Must never: answer without a matching rule, or answer faster than its
//! rate limit.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etherparse::{ArpOperation, ArpPacket};
use ipnet::Ipv4Net;

use super::ethernet::{ETHERNET_HEADER, ETHERTYPE_ARP, Mac, write_header};

/// ARP replies per second, at most: far above what a host's containers
/// need (each caches a reply for minutes), low enough that a flood of
/// requests cannot turn the agent into a packet cannon.
pub const REPLIES_PER_SECOND: u32 = 500;
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
    RateLimited,
}

/// What the responder needs to know about the world.
pub trait Owners {
    /// Whether another host of the mesh owns `addr`.
    fn remote(&self, addr: Ipv4Addr) -> bool;
}

pub struct ArpResponder {
    agent_mac: Mac,
    overlay: Ipv4Net,
    own_subnet: Ipv4Net,
    service: Ipv4Addr,
    budget: u32,
    window: Instant,
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
        }
    }

    /// Decides about the ARP payload of a frame; a reply is written to
    /// `out` (which must hold `REPLY_LEN` bytes).
    pub fn handle(
        &mut self,
        now: Instant,
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
            Some(ArpIgnore::OwnSubnet)
        } else if !owners.remote(target) {
            Some(ArpIgnore::Unowned)
        } else {
            None
        };
        if let Some(ignore) = verdict {
            return ArpVerdict::Ignore(ignore);
        }
        if !self.take_budget(now) {
            return ArpVerdict::Ignore(ArpIgnore::RateLimited);
        }
        let mut reply = request.clone();
        reply.operation = ArpOperation::REPLY;
        reply.sender_mac = self.agent_mac.0;
        reply.sender_ipv4 = target.octets();
        reply.target_mac = request.sender_mac;
        reply.target_ipv4 = sender.octets();
        write_header(out, Mac(request.sender_mac), self.agent_mac, ETHERTYPE_ARP);
        out[ETHERNET_HEADER..REPLY_LEN].copy_from_slice(&reply.to_bytes());
        ArpVerdict::Reply(REPLY_LEN)
    }

    fn take_budget(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.budget = REPLIES_PER_SECOND;
        }
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        true
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
        let p = ArpEthIpv4Packet {
            operation: op,
            sender_mac: ASKER,
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
            r.handle(Instant::now(), &req, &Peers, &mut out),
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
            r.handle(now, &gratuitous, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::Gratuitous)
        );
        let probe = request([0, 0, 0, 0], [10, 42, 2, 9], ArpOperation::REQUEST);
        assert_eq!(
            r.handle(now, &probe, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::Gratuitous)
        );
        let reply = request([10, 42, 1, 5], [10, 42, 2, 9], ArpOperation::REPLY);
        assert_eq!(
            r.handle(now, &reply, &Peers, &mut out),
            ArpVerdict::Ignore(ArpIgnore::NotARequest)
        );
        for garbage in [&[][..], &[0, 1, 8, 0, 6, 4, 0, 1][..], &[0xff; 60][..]] {
            assert_eq!(
                r.handle(now, garbage, &Peers, &mut out),
                ArpVerdict::Ignore(ArpIgnore::Malformed)
            );
        }
    }

    #[test]
    fn replies_are_rate_limited_per_second() {
        let mut r = responder();
        let t0 = Instant::now();
        let req = request([10, 42, 1, 5], [10, 42, 2, 9], ArpOperation::REQUEST);
        let mut out = [0u8; REPLY_LEN];
        let answered = (0..REPLIES_PER_SECOND + 10)
            .filter(|_| matches!(r.handle(t0, &req, &Peers, &mut out), ArpVerdict::Reply(_)))
            .count();
        assert_eq!(answered, REPLIES_PER_SECOND as usize);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            r.handle(later, &req, &Peers, &mut out),
            ArpVerdict::Reply(REPLY_LEN)
        );
    }
}
