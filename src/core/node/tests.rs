//! Several nodes against each other in memory: real WireGuard handshakes and
//! encryption, a simulated underlay, and time passed in explicitly.

use std::collections::HashSet;

use etherparse::PacketBuilder;

use super::*;

/// The device MTU the simulated hosts seal for.
const MTU: u16 = 1420;

struct Host {
    node: Node,
    addr: SocketAddr,
    out: Outbox,
    /// Packets the node wrote to its device.
    delivered: Vec<Vec<u8>>,
    /// Records-sync messages handed over, with the key that sealed them.
    synced: Vec<(PublicKey, Vec<u8>)>,
}

struct Sim {
    hosts: Vec<Host>,
    dead: HashSet<usize>,
    now: Instant,
    /// Every datagram that crossed the underlay, for leak checks.
    wire: Vec<Vec<u8>>,
}

struct HostDef {
    key: PrivateKey,
    subnet: &'static str,
    addr: &'static str,
}

fn def(subnet: &'static str, addr: &'static str) -> HostDef {
    HostDef {
        key: PrivateKey::generate().unwrap(),
        subnet,
        addr,
    }
}

fn spec(name: &str, d: &HostDef, with_endpoint: bool, keepalive: Option<u16>) -> PeerSpec {
    PeerSpec {
        name: name.to_owned(),
        public_key: d.key.public_key(),
        endpoint: with_endpoint.then(|| d.addr.parse().unwrap()),
        subnet: d.subnet.parse().unwrap(),
        keepalive,
        preshared_key: None,
    }
}

impl Sim {
    /// A full mesh where every host knows every other's endpoint.
    fn mesh(defs: &[HostDef], keepalive: Option<u16>) -> Self {
        Self::mesh_with_link(defs, keepalive, LinkMode::Tun)
    }

    fn mesh_with_link(defs: &[HostDef], keepalive: Option<u16>, mode: LinkMode) -> Self {
        let now = Instant::now();
        let hosts = defs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let identity = Identity {
                    name: format!("h{i}"),
                    private_key: d.key.clone(),
                    subnet: d.subnet.parse().unwrap(),
                    overlay: "10.42.0.0/16".parse().unwrap(),
                };
                let mut node = Node::new(&identity, mode, MTU, now);
                let peers = defs
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(j, o)| spec(&format!("h{j}"), o, true, keepalive))
                    .collect();
                node.apply_membership(&Membership { peers });
                Host {
                    node,
                    addr: d.addr.parse().unwrap(),
                    out: Outbox::default(),
                    delivered: Vec::new(),
                    synced: Vec::new(),
                }
            })
            .collect();
        Self {
            hosts,
            dead: HashSet::new(),
            now,
            wire: Vec::new(),
        }
    }

    fn send_from_device(&mut self, host: usize, packet: &[u8]) {
        let h = &mut self.hosts[host];
        h.node.handle_device_packet(self.now, packet, &mut h.out);
    }

    fn tick(&mut self) {
        for h in &mut self.hosts {
            h.node.handle_timers(self.now, &mut h.out);
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// Moves datagrams until the network is quiet (bounded).
    fn run(&mut self) {
        for _ in 0..50 {
            let mut in_flight = Vec::new();
            for (i, h) in self.hosts.iter_mut().enumerate() {
                in_flight.extend(h.out.network().map(|(to, d)| (i, to, d.to_vec())));
                h.delivered.extend(h.out.device().map(<[u8]>::to_vec));
                h.synced
                    .extend(h.out.sync().map(|(from, m)| (from, m.to_vec())));
                h.out.clear();
            }
            if in_flight.is_empty() {
                return;
            }
            for (from, to, datagram) in in_flight {
                self.wire.push(datagram.clone());
                let from_addr = self.hosts[from].addr;
                let Some(dst) = self.hosts.iter().position(|h| h.addr == to) else {
                    continue;
                };
                if self.dead.contains(&dst) || self.dead.contains(&from) {
                    continue;
                }
                let h = &mut self.hosts[dst];
                h.node
                    .handle_datagram(self.now, from_addr, &datagram, &mut h.out);
            }
        }
        panic!("network did not settle");
    }

    fn status(&self, host: usize, peer: &str) -> PeerStatus {
        self.hosts[host]
            .node
            .peer_statuses(self.now)
            .into_iter()
            .find(|p| p.name == peer)
            .unwrap()
    }
}

fn icmp_echo(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut v, payload)
        .unwrap();
    v
}

fn three_hosts() -> Vec<HostDef> {
    vec![
        def("10.42.1.0/24", "192.0.2.1:51820"),
        def("10.42.2.0/24", "192.0.2.2:51820"),
        def("10.42.3.0/24", "192.0.2.3:51820"),
    ]
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

#[test]
fn sync_messages_reach_only_the_sync_task_and_name_their_sealer() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    let h0 = defs[0].key.public_key();
    let h1 = defs[1].key.public_key();
    let h = &mut sim.hosts[0];
    h.node
        .send_sync(sim.now, &h1, br#"{"kind":"request"}"#, &mut h.out);
    sim.run();
    assert_eq!(
        sim.hosts[1].synced,
        vec![(h0, br#"{"kind":"request"}"#.to_vec())]
    );
    assert!(
        sim.hosts[1].delivered.is_empty(),
        "never reaches the device"
    );
    assert!(sim.hosts[2].synced.is_empty());
}

#[test]
fn no_device_packet_reaches_a_peers_sync_port() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    sim.tick();
    sim.run();
    // The host itself (any local process) posing as its agent, and a
    // container aiming at the port.
    for forged in [
        udp([10, 42, 1, 1], [10, 42, 2, 1], 7301, 7301, b"{}"),
        udp([10, 42, 1, 9], [10, 42, 2, 1], 4000, 7301, b"{}"),
    ] {
        sim.send_from_device(0, &forged);
    }
    sim.run();
    assert!(sim.hosts[1].synced.is_empty());
    assert!(sim.hosts[1].delivered.is_empty());
    assert_eq!(sim.hosts[0].node.drops().get(DropReason::SyncPort), 2);
    // Other ports of the peer's host address still work.
    let fine = udp([10, 42, 1, 1], [10, 42, 2, 1], 7301, 7302, b"{}");
    sim.send_from_device(0, &fine);
    sim.run();
    assert_eq!(sim.hosts[1].delivered, vec![fine]);
}

#[test]
fn eager_handshakes_bring_the_full_mesh_up() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    sim.tick();
    sim.run();
    for (host, peers) in [(0, ["h1", "h2"]), (1, ["h0", "h2"]), (2, ["h0", "h1"])] {
        for peer in peers {
            let s = sim.status(host, peer);
            assert_eq!(s.state, PeerState::Up, "h{host} -> {peer}: {s:?}");
            assert_eq!(s.last_handshake_secs_ago, Some(0));
        }
    }
}

#[test]
fn packets_cross_the_mesh_intact_and_only_to_their_owner() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    let ping = icmp_echo([10, 42, 1, 1], [10, 42, 3, 1], b"payload-0123456789");
    // Sent before any handshake: queued, then drained once it completes.
    sim.send_from_device(0, &ping);
    sim.run();
    assert_eq!(sim.hosts[2].delivered, vec![ping.clone()]);
    assert!(sim.hosts[1].delivered.is_empty());
    let s = sim.status(0, "h2");
    assert_eq!(s.tx_packets, 1);
    // 46 bytes, sealed with their padding to 48.
    assert_eq!(s.tx_bytes, 48);
    assert_eq!(sim.status(2, "h0").rx_packets, 1);
    assert_eq!(sim.status(2, "h0").rx_bytes, 48);
    assert!(
        !sim.wire
            .iter()
            .any(|d| d.windows(18).any(|w| w == b"payload-0123456789")),
        "payload crossed the underlay in clear"
    );
}

#[test]
fn data_is_sealed_padded_to_sixteen_bytes_and_arrives_as_it_was_sent() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    sim.send_from_device(0, &icmp_echo([10, 42, 1, 1], [10, 42, 2, 1], b""));
    sim.run();
    sim.wire.clear();
    sim.hosts[1].delivered.clear();
    let (tx_before, rx_before) = (sim.status(0, "h1").tx_bytes, sim.status(1, "h0").rx_bytes);
    // Every length from the smallest IPv4 packet to the MTU, across the
    // point where rounding up would pass it (1417 and up).
    let sent: Vec<Vec<u8>> = (0..=usize::from(MTU) - 28)
        .step_by(7)
        .chain(1389..=usize::from(MTU) - 28)
        .map(|payload| {
            udp(
                [10, 42, 1, 1],
                [10, 42, 2, 1],
                5000,
                5001,
                &vec![0xa5; payload],
            )
        })
        .collect();
    for packet in &sent {
        sim.send_from_device(0, packet);
    }
    sim.run();
    assert_eq!(
        sim.hosts[1].delivered, sent,
        "padding must not reach the device"
    );
    let sealed: Vec<usize> = sim
        .wire
        .iter()
        .filter(|d| d.first() == Some(&4))
        .map(|d| d.len() - 32)
        .collect();
    assert_eq!(sealed.len(), sent.len());
    for (packet, sealed) in sent.iter().zip(&sealed) {
        let expected = packet.len().next_multiple_of(16).min(usize::from(MTU));
        assert_eq!(*sealed, expected, "a {}-byte packet", packet.len());
    }
    let bytes: usize = sealed.iter().sum();
    assert_eq!(sim.status(0, "h1").tx_bytes - tx_before, bytes as u64);
    assert_eq!(sim.status(1, "h0").rx_bytes - rx_before, bytes as u64);
}

#[test]
fn several_packets_queued_behind_a_handshake_all_arrive_in_order() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    let packets: Vec<_> = (0..5u8)
        .map(|i| icmp_echo([10, 42, 1, 1], [10, 42, 2, 1], &[i; 32]))
        .collect();
    for p in &packets {
        sim.send_from_device(0, p);
    }
    sim.run();
    assert_eq!(sim.hosts[1].delivered, packets);
}

#[test]
fn unowned_destination_gets_icmp_and_never_reaches_the_network() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    let ping = icmp_echo([10, 42, 1, 1], [10, 42, 99, 1], b"x");
    sim.send_from_device(0, &ping);
    let h = &sim.hosts[0];
    assert_eq!(h.out.network().len(), 0);
    let icmp: Vec<_> = h.out.device().map(<[u8]>::to_vec).collect();
    assert_eq!(icmp.len(), 1);
    assert_eq!(icmp[0][9], 1, "protocol is ICMP");
    assert_eq!(icmp[0][20], 3, "destination unreachable");
    assert_eq!(&icmp[0][16..20], &[10, 42, 1, 1]);
    assert_eq!(h.node.drops().get(DropReason::NoRoute), 1);
}

#[test]
fn icmp_errors_are_rate_limited() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    let ping = icmp_echo([10, 42, 1, 1], [10, 42, 99, 1], b"x");
    for _ in 0..ICMP_ERRORS_PER_SECOND + 50 {
        sim.send_from_device(0, &ping);
    }
    assert_eq!(
        sim.hosts[0].out.device().len(),
        ICMP_ERRORS_PER_SECOND as usize
    );
    assert_eq!(
        sim.hosts[0].node.drops().get(DropReason::NoRoute),
        u64::from(ICMP_ERRORS_PER_SECOND) + 50
    );
}

#[test]
fn device_packets_from_foreign_sources_or_not_ipv4_are_dropped() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    sim.send_from_device(0, &icmp_echo([192, 0, 2, 1], [10, 42, 2, 1], b"x"));
    sim.send_from_device(0, &[0x60; 48]);
    sim.send_from_device(0, &[0x45, 0]);
    let h = &sim.hosts[0];
    assert!(h.out.is_empty());
    assert_eq!(h.node.drops().get(DropReason::ForeignSource), 1);
    assert_eq!(h.node.drops().get(DropReason::NotIpv4), 1);
    assert_eq!(h.node.drops().get(DropReason::Malformed), 1);
}

/// h1 owns 10.42.1.0/24, but h0 believes h1 owns 10.42.2.0/24.
fn mismatched_pair() -> Sim {
    let defs = vec![
        def("10.42.0.0/24", "192.0.2.1:51820"),
        def("10.42.1.0/24", "192.0.2.2:51820"),
    ];
    let mut sim = Sim::mesh(&defs, None);
    let mut wrong_h1 = spec("h1", &defs[1], true, None);
    wrong_h1.subnet = "10.42.2.0/24".parse().unwrap();
    sim.hosts[0].node.apply_membership(&Membership {
        peers: vec![wrong_h1],
    });
    sim
}

#[test]
fn decrypted_packet_from_outside_the_senders_subnet_is_dropped() {
    let mut sim = mismatched_pair();
    sim.send_from_device(1, &icmp_echo([10, 42, 1, 1], [10, 42, 0, 1], b"spoof"));
    sim.run();
    assert!(sim.hosts[0].delivered.is_empty());
    assert_eq!(
        sim.hosts[0].node.drops().get(DropReason::CryptokeyMismatch),
        1
    );
    assert_eq!(sim.status(0, "h1").dropped, 1);
    // A drop, not a reception (as the kernel counts it).
    assert_eq!(sim.status(0, "h1").rx_bytes, 0);
}

#[test]
fn decrypted_packet_for_another_subnet_is_dropped() {
    let defs = vec![
        def("10.42.0.0/24", "192.0.2.1:51820"),
        def("10.42.1.0/24", "192.0.2.2:51820"),
    ];
    let mut sim = Sim::mesh(&defs, None);
    // h1 believes h0 owns a /22 reaching beyond h0's own /24.
    let mut wide_h0 = spec("h0", &defs[0], true, None);
    wide_h0.subnet = "10.42.4.0/22".parse().unwrap();
    sim.hosts[1].node.apply_membership(&Membership {
        peers: vec![wide_h0],
    });
    sim.send_from_device(1, &icmp_echo([10, 42, 1, 1], [10, 42, 5, 1], b"x"));
    sim.run();
    assert!(sim.hosts[0].delivered.is_empty());
    assert_eq!(sim.hosts[0].node.drops().get(DropReason::NotForUs), 1);
    assert_eq!(sim.status(0, "h1").rx_bytes, 0);
}

#[test]
fn handshake_from_an_unknown_key_is_dropped_silently() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    // h2 forgets about h0's peers list: h0 does not know h2 at all.
    let known = spec("h1", &defs[1], true, None);
    sim.hosts[0]
        .node
        .apply_membership(&Membership { peers: vec![known] });
    sim.send_from_device(2, &icmp_echo([10, 42, 3, 1], [10, 42, 1, 1], b"x"));
    sim.run();
    assert!(sim.hosts[0].node.drops().get(DropReason::UnknownPeer) >= 1);
    assert_eq!(sim.status(2, "h0").state, PeerState::Connecting);
    assert!(sim.hosts[0].delivered.is_empty());
}

#[test]
fn garbage_and_tampered_datagrams_are_counted_not_delivered() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    sim.tick();
    sim.run();
    let from: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    let h = &mut sim.hosts[0];
    h.node
        .handle_datagram(sim.now, from, b"\x04junk", &mut h.out);
    h.node.handle_datagram(sim.now, from, &[], &mut h.out);
    assert_eq!(h.node.drops().get(DropReason::InvalidDatagram), 2);

    // A real data message with one flipped ciphertext bit.
    let ping = icmp_echo([10, 42, 2, 1], [10, 42, 1, 1], b"x");
    sim.send_from_device(1, &ping);
    let mut datagram = sim.hosts[1].out.network().next().unwrap().1.to_vec();
    sim.hosts[1].out.clear();
    datagram[20] ^= 1;
    let h = &mut sim.hosts[0];
    h.node.handle_datagram(sim.now, from, &datagram, &mut h.out);
    assert!(h.out.is_empty());
    assert_eq!(h.node.drops().get(DropReason::Rejected), 1);
    // A replay of a genuine message is rejected too.
    datagram[20] ^= 1;
    h.node.handle_datagram(sim.now, from, &datagram, &mut h.out);
    assert_eq!(h.out.device().len(), 1);
    h.out.clear();
    h.node.handle_datagram(sim.now, from, &datagram, &mut h.out);
    assert!(h.out.is_empty());
    assert_eq!(h.node.drops().get(DropReason::Rejected), 2);
}

#[test]
fn endpoint_roams_to_the_source_of_authenticated_packets() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    sim.tick();
    sim.run();
    let moved: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    sim.hosts[1].addr = moved;
    sim.send_from_device(1, &icmp_echo([10, 42, 2, 1], [10, 42, 1, 1], b"x"));
    sim.run();
    assert_eq!(sim.status(0, "h1").endpoint, Some(moved));
    // Replies now go to the new address.
    sim.send_from_device(0, &icmp_echo([10, 42, 1, 1], [10, 42, 2, 1], b"y"));
    assert_eq!(sim.hosts[0].out.network().next().unwrap().0, moved);
}

#[test]
fn peer_without_endpoint_waits_then_learns_it() {
    let defs = vec![
        def("10.42.1.0/24", "192.0.2.1:51820"),
        def("10.42.2.0/24", "192.0.2.2:51820"),
    ];
    let mut sim = Sim::mesh(&defs, None);
    // Re-applying a spec without endpoint keeps a known one, so start over.
    sim.hosts[0].node.apply_membership(&Membership::default());
    sim.hosts[0].node.apply_membership(&Membership {
        peers: vec![spec("h1", &defs[1], false, None)],
    });
    let ping = icmp_echo([10, 42, 1, 1], [10, 42, 2, 1], b"x");
    sim.send_from_device(0, &ping);
    assert_eq!(sim.hosts[0].node.drops().get(DropReason::NoEndpoint), 1);
    assert!(sim.hosts[0].out.network().len() == 0);
    sim.hosts[0].out.clear();
    assert_eq!(sim.status(0, "h1").state, PeerState::Down);
    sim.tick();
    sim.run();
    assert_eq!(
        sim.status(0, "h1").endpoint,
        Some(defs[1].addr.parse().unwrap())
    );
    assert_eq!(sim.status(0, "h1").state, PeerState::Up);
    sim.send_from_device(0, &ping);
    sim.run();
    assert_eq!(sim.hosts[1].delivered, vec![ping]);
}

#[test]
fn silent_peer_goes_down_and_a_restarted_peer_comes_back_up() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, Some(2));
    sim.tick();
    sim.run();
    assert_eq!(sim.status(0, "h2").state, PeerState::Up);
    sim.dead.insert(2);
    sim.advance(Duration::from_secs(10));
    sim.tick();
    sim.run();
    let s = sim.status(0, "h2");
    assert_ne!(s.state, PeerState::Up, "{s:?}");
    assert_eq!(
        sim.status(0, "h1").state,
        PeerState::Up,
        "other tunnels are untouched"
    );

    // h2's agent restarts: same key and config, fresh state.
    sim.dead.clear();
    let fresh = Sim::mesh(&defs, Some(2));
    sim.hosts[2].node = fresh.hosts.into_iter().nth(2).unwrap().node;
    sim.tick();
    sim.run();
    let s = sim.status(0, "h2");
    assert_eq!(s.state, PeerState::Up, "{s:?}");
    let ping = icmp_echo([10, 42, 1, 1], [10, 42, 3, 1], b"back");
    sim.send_from_device(0, &ping);
    sim.run();
    assert_eq!(sim.hosts[2].delivered, vec![ping]);
}

fn with_psks(defs: &[HostDef], psks: [Option<&crate::keys::PresharedKey>; 2]) -> Sim {
    let mut sim = Sim::mesh(defs, None);
    for (i, psk) in psks.iter().enumerate() {
        let other = 1 - i;
        let mut peer = spec(&format!("h{other}"), &defs[other], true, None);
        peer.preshared_key = psk.cloned();
        sim.hosts[i]
            .node
            .apply_membership(&Membership { peers: vec![peer] });
    }
    sim
}

#[test]
fn matching_preshared_keys_form_a_tunnel() {
    let defs = vec![
        def("10.42.1.0/24", "192.0.2.1:51820"),
        def("10.42.2.0/24", "192.0.2.2:51820"),
    ];
    let psk = crate::keys::PresharedKey::generate().unwrap();
    let mut sim = with_psks(&defs, [Some(&psk), Some(&psk)]);
    sim.tick();
    sim.run();
    assert_eq!(sim.status(0, "h1").state, PeerState::Up);
    assert_eq!(sim.status(0, "h1").reason, None);
}

#[test]
fn differing_preshared_keys_never_form_a_tunnel_and_say_why() {
    let defs = vec![
        def("10.42.1.0/24", "192.0.2.1:51820"),
        def("10.42.2.0/24", "192.0.2.2:51820"),
    ];
    let (a, b) = (
        crate::keys::PresharedKey::generate().unwrap(),
        crate::keys::PresharedKey::generate().unwrap(),
    );
    for psks in [[Some(&a), Some(&b)], [Some(&a), None]] {
        let mut sim = with_psks(&defs, psks);
        sim.tick();
        sim.run();
        let ping = icmp_echo([10, 42, 1, 1], [10, 42, 2, 1], b"x");
        sim.send_from_device(0, &ping);
        sim.run();
        assert!(sim.hosts[1].delivered.is_empty());
        for (host, peer) in [(0, "h1"), (1, "h0")] {
            let s = sim.status(host, peer);
            assert_ne!(s.state, PeerState::Up, "{s:?}");
            assert!(
                s.reason.as_deref().is_some_and(|r| r.contains("preshared")),
                "{s:?}"
            );
        }
    }
}

#[test]
fn membership_changes_add_remove_and_keep_sessions() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    sim.tick();
    sim.run();
    let node = &mut sim.hosts[0].node;
    node.apply_membership(&Membership {
        peers: vec![spec("h1", &defs[1], true, None)],
    });
    assert_eq!(node.summary(sim.now).peers, 1);
    assert_eq!(
        sim.status(0, "h1").state,
        PeerState::Up,
        "unchanged peer keeps its session"
    );
    sim.send_from_device(0, &icmp_echo([10, 42, 1, 1], [10, 42, 3, 1], b"x"));
    assert_eq!(sim.hosts[0].node.drops().get(DropReason::NoRoute), 1);
    sim.hosts[0].out.clear();
    let both = vec![
        spec("h1", &defs[1], true, None),
        spec("h2", &defs[2], true, None),
    ];
    sim.hosts[0]
        .node
        .apply_membership(&Membership { peers: both });
    let ping = icmp_echo([10, 42, 1, 1], [10, 42, 3, 1], b"again");
    sim.send_from_device(0, &ping);
    sim.run();
    assert_eq!(sim.hosts[2].delivered, vec![ping]);
}

#[test]
fn a_changed_keepalive_applies_in_place_without_a_new_handshake() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    sim.tick();
    sim.run();
    // Both ends initiated at once: each answered one and had one answered.
    let (before, before_h1) = (
        sim.status(0, "h1").handshakes,
        sim.status(1, "h0").handshakes,
    );
    assert!(before >= 1);
    let with_keepalive = vec![
        spec("h1", &defs[1], true, Some(5)),
        spec("h2", &defs[2], true, None),
    ];
    sim.hosts[0].node.apply_membership(&Membership {
        peers: with_keepalive,
    });
    let s = sim.status(0, "h1");
    assert_eq!(
        (s.keepalive, s.state, s.handshakes),
        (Some(5), PeerState::Up, before)
    );
    // Every 5 s an empty data message (32 bytes) goes to h1, and only then.
    let mut sent = Vec::new();
    for _ in 0..12 {
        sim.advance(Duration::from_secs(1));
        sim.tick();
        let h = &mut sim.hosts[0];
        sent.push(h.out.network().filter(|(_, d)| d.len() == 32).count());
        sim.run();
    }
    assert_eq!(sent.iter().sum::<usize>(), 2, "{sent:?}");
    let at: Vec<usize> = (0..sent.len()).filter(|i| sent[*i] == 1).collect();
    assert_eq!(at[1] - at[0], 5, "every 5 s: {sent:?}");
    assert!(at[0] <= 5, "the first within a tick of 5 s: {sent:?}");
    assert_eq!(sim.status(0, "h1").handshakes, before, "no new handshake");
    assert_eq!(
        sim.status(1, "h0").handshakes,
        before_h1,
        "none on the other side"
    );
}

#[test]
fn a_rejected_handshake_response_counts_as_a_failure() {
    let key = crate::keys::PresharedKey::generate().unwrap();
    let other = crate::keys::PresharedKey::generate().unwrap();
    let defs = vec![
        def("10.42.1.0/24", "192.0.2.1:51820"),
        def("10.42.2.0/24", "192.0.2.2:51820"),
    ];
    let mut sim = with_psks(&defs, [Some(&key), Some(&other)]);
    sim.tick();
    sim.run();
    let s = sim.status(0, "h1");
    assert!(s.handshake_failures >= 1, "{s:?}");
    assert_eq!(sim.status(0, "h1").state, PeerState::Connecting);
}

mod tap {
    use etherparse::{ArpEthIpv4Packet, ArpOperation};

    use super::*;

    const C1: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 5);
    const C2: Ipv4Addr = Ipv4Addr::new(10, 42, 2, 7);

    fn pair() -> Sim {
        let defs = vec![
            def("10.42.1.0/24", "192.0.2.1:51820"),
            def("10.42.2.0/24", "192.0.2.2:51820"),
        ];
        let mut sim = Sim::mesh_with_link(&defs, None, LinkMode::Tap);
        sim.hosts[0].node.set_neighbour(C1, Mac::of_container(C1));
        sim.hosts[1].node.set_neighbour(C2, Mac::of_container(C2));
        sim
    }

    fn agent_mac(sim: &Sim, host: usize) -> Mac {
        sim.hosts[host].node.agent_mac().unwrap()
    }

    fn frame(dst: Mac, src: Mac, ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETHERNET_HEADER];
        write_header(&mut f, dst, src, ethertype);
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4 frame from container C1 to h0's agent.
    fn from_c1(sim: &Sim, packet: &[u8]) -> Vec<u8> {
        frame(
            agent_mac(sim, 0),
            Mac::of_container(C1),
            ETHERTYPE_IPV4,
            packet,
        )
    }

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let req = ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: Mac::of_container(C1).0,
            sender_ipv4: C1.octets(),
            target_mac: [0; 6],
            target_ipv4: target.octets(),
        };
        frame(
            Mac::BROADCAST,
            Mac::of_container(C1),
            ETHERTYPE_ARP,
            &req.to_bytes(),
        )
    }

    fn from_device(sim: &mut Sim, host: usize, frame: &[u8]) -> Vec<Vec<u8>> {
        let h = &mut sim.hosts[host];
        h.node.handle_device_frame(sim.now, frame, &mut h.out);
        h.out.device().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn arp_for_a_remote_container_is_answered_with_the_agent_mac() {
        let mut sim = pair();
        let replies = from_device(&mut sim, 0, &arp_request(C2));
        assert_eq!(replies.len(), 1);
        assert_eq!(sim.hosts[0].node.arp_replies(), 1);
        let reply = Frame::parse(&replies[0]).unwrap();
        assert_eq!(reply.destination, Mac::of_container(C1));
        assert_eq!(reply.source, agent_mac(&sim, 0));
        assert_eq!(reply.ethertype, ETHERTYPE_ARP);
        sim.hosts[0].out.clear();
        assert!(
            from_device(&mut sim, 0, &arp_request(Ipv4Addr::new(10, 42, 1, 9))).is_empty(),
            "answered for a local address"
        );
    }

    #[test]
    fn frames_to_the_agent_cross_the_mesh_and_arrive_framed_for_the_container() {
        let mut sim = pair();
        let packet = icmp_echo(C1.octets(), C2.octets(), b"hello container");
        let sent = from_c1(&sim, &packet);
        assert!(from_device(&mut sim, 0, &sent).is_empty());
        sim.run();
        let delivered = &sim.hosts[1].delivered;
        assert_eq!(delivered.len(), 1);
        let f = Frame::parse(&delivered[0]).unwrap();
        assert_eq!(f.destination, Mac::of_container(C2));
        assert_eq!(f.source, agent_mac(&sim, 1));
        assert_eq!(f.ethertype, ETHERTYPE_IPV4);
        assert_eq!(f.payload, &packet[..]);
    }

    #[test]
    fn ethernet_padding_does_not_cross_the_tunnel() {
        let mut sim = pair();
        let mut packet = Vec::new();
        PacketBuilder::ipv4(C1.octets(), C2.octets(), 64)
            .udp(1, 2)
            .write(&mut packet, b"")
            .unwrap();
        assert_eq!(packet.len(), 28);
        let mut padded = packet.clone();
        padded.resize(46, 0);
        let sent = from_c1(&sim, &padded);
        sim.send_frame_and_run(0, &sent);
        let f = Frame::parse(&sim.hosts[1].delivered[0])
            .unwrap()
            .payload
            .to_vec();
        assert_eq!(f, packet);
    }

    #[test]
    fn a_packet_for_a_local_address_nobody_holds_is_dropped() {
        let mut sim = pair();
        let packet = icmp_echo(C1.octets(), [10, 42, 2, 99], b"x");
        let sent = from_c1(&sim, &packet);
        sim.send_frame_and_run(0, &sent);
        assert!(sim.hosts[1].delivered.is_empty());
        assert_eq!(sim.hosts[1].node.drops().get(DropReason::NoNeighbour), 1);
        // Once a container holds it, it is delivered; after detach, not.
        sim.hosts[1]
            .node
            .set_neighbour(Ipv4Addr::new(10, 42, 2, 99), Mac([0x0a, 0, 0, 0, 0, 9]));
        let sent = from_c1(&sim, &packet);
        sim.send_frame_and_run(0, &sent);
        assert_eq!(sim.hosts[1].delivered.len(), 1);
        sim.hosts[1]
            .node
            .remove_neighbour(Ipv4Addr::new(10, 42, 2, 99));
        let sent = from_c1(&sim, &packet);
        sim.send_frame_and_run(0, &sent);
        assert_eq!(sim.hosts[1].delivered.len(), 1);
    }

    #[test]
    fn the_host_address_is_delivered_to_the_bridge() {
        let mut sim = pair();
        let packet = icmp_echo(C1.octets(), [10, 42, 2, 1], b"to the host");
        let sent = from_c1(&sim, &packet);
        sim.send_frame_and_run(0, &sent);
        let f = Frame::parse(&sim.hosts[1].delivered[0]).unwrap();
        let bridge = Mac::of_bridge(&sim.hosts[1].node_public_key());
        assert_eq!(f.destination, bridge);
    }

    #[test]
    fn frames_for_other_macs_are_not_the_agents_business() {
        let mut sim = pair();
        let packet = icmp_echo(C1.octets(), C2.octets(), b"x");
        let other = frame(
            Mac([0x0a, 1, 1, 1, 1, 1]),
            Mac::of_container(C1),
            ETHERTYPE_IPV4,
            &packet,
        );
        assert!(from_device(&mut sim, 0, &other).is_empty());
        assert_eq!(sim.hosts[0].out.network().len(), 0);
        assert_eq!(sim.hosts[0].node.drops().total(), 0);
    }

    #[test]
    fn ping_to_the_service_address_is_answered_by_the_agent() {
        let mut sim = pair();
        let ping = icmp_echo(C1.octets(), SERVICE_ADDRESS.octets(), b"health");
        let sent = from_c1(&sim, &ping);
        let replies = from_device(&mut sim, 0, &sent);
        assert_eq!(replies.len(), 1);
        let f = Frame::parse(&replies[0]).unwrap();
        assert_eq!(f.destination, Mac::of_container(C1));
        assert_eq!(&f.payload[12..16], &SERVICE_ADDRESS.octets());
        assert_eq!(f.payload[20], 0, "echo reply");
        assert_eq!(sim.hosts[0].out.network().len(), 0);
    }

    #[test]
    fn unreachable_errors_go_back_to_the_container_framed() {
        let mut sim = pair();
        let packet = icmp_echo(C1.octets(), [10, 42, 99, 1], b"x");
        let sent = from_c1(&sim, &packet);
        let replies = from_device(&mut sim, 0, &sent);
        assert_eq!(replies.len(), 1);
        let f = Frame::parse(&replies[0]).unwrap();
        assert_eq!(f.destination, Mac::of_container(C1));
        assert_eq!(f.payload[20], 3, "destination unreachable");
    }

    #[test]
    fn a_container_cannot_speak_with_another_local_address() {
        let mut sim = pair();
        let other = Ipv4Addr::new(10, 42, 1, 9);
        sim.hosts[0]
            .node
            .set_neighbour(other, Mac::of_container(other));
        let host = Ipv4Addr::new(10, 42, 1, 1);
        for (claimed, why) in [
            (other, "another container"),
            (host, "the host"),
            (Ipv4Addr::new(10, 42, 1, 77), "an unattached address"),
        ] {
            let packet = icmp_echo(claimed.octets(), C2.octets(), b"spoof");
            let sent = from_c1(&sim, &packet);
            assert!(from_device(&mut sim, 0, &sent).is_empty(), "{why}");
            assert_eq!(
                sim.hosts[0].out.network().len(),
                0,
                "{why} crossed the mesh"
            );
        }
        assert_eq!(sim.hosts[0].node.drops().get(DropReason::SpoofedSource), 3);
    }

    #[test]
    fn garbage_frames_are_counted() {
        let mut sim = pair();
        assert!(from_device(&mut sim, 0, &[1, 2, 3]).is_empty());
        assert_eq!(sim.hosts[0].node.drops().get(DropReason::Malformed), 1);
    }
}

impl Sim {
    fn send_frame_and_run(&mut self, host: usize, frame: &[u8]) {
        let h = &mut self.hosts[host];
        h.node.handle_device_frame(self.now, frame, &mut h.out);
        self.run();
    }
}

impl Host {
    fn node_public_key(&self) -> PublicKey {
        PublicKey::from(*self.node.public.as_bytes())
    }
}

#[test]
fn simultaneous_initiations_with_queued_packets_converge() {
    let mut sim = Sim::mesh(&three_hosts(), None);
    // Both ends have a packet waiting and start a handshake in the same
    // instant: each gets the other's initiation while its own is out.
    let a = icmp_echo([10, 42, 1, 1], [10, 42, 2, 1], b"from-a");
    let b = icmp_echo([10, 42, 2, 1], [10, 42, 1, 1], b"from-b");
    sim.send_from_device(0, &a);
    sim.send_from_device(1, &b);
    sim.run();
    assert_eq!(sim.hosts[1].delivered, vec![a]);
    assert_eq!(sim.hosts[0].delivered, vec![b]);
    assert_eq!(sim.status(0, "h1").state, PeerState::Up);
    assert_eq!(sim.status(1, "h0").state, PeerState::Up);
    let handshakes = sim
        .wire
        .iter()
        .filter(|d| matches!(d.first(), Some(1 | 2)))
        .count();
    assert!(
        handshakes <= 4,
        "{handshakes} handshake messages: a ping-pong"
    );
    assert_eq!(sim.hosts[0].node.drops().get(DropReason::Rejected), 0);
}

/// h1's side of the mesh as a bare boringtun session toward h0, to craft
/// initiations the way a peer would (each with a fresh timestamp).
struct RawPeer(Tunn);

impl RawPeer {
    fn of(defs: &[HostDef], from: usize, to: usize) -> Self {
        Self(Tunn::new(
            defs[from].key.to_x25519(),
            defs[to].key.public_key().to_x25519(),
            None,
            None,
            7,
            None,
        ))
    }

    fn initiation(&mut self) -> Vec<u8> {
        let mut buf = [0u8; 256];
        match self.0.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            _ => panic!("no initiation"),
        }
    }
}

#[test]
fn each_initiation_counts_once_against_the_handshake_limit() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    // A genuine peer (h1's key) initiating again and again within one
    // second: the first HANDSHAKE_RATE_LIMIT are all answered, none with
    // a cookie (each used to count twice: once to identify the sender,
    // once more inside boringtun).
    let mut h1 = RawPeer::of(&defs, 1, 0);
    let mut cookies = 0;
    let mut responses = 0;
    for n in 0..HANDSHAKE_RATE_LIMIT - 1 {
        // From as many addresses (a roaming peer), each within its own
        // per-source budget.
        let from = SocketAddr::new(
            std::net::Ipv4Addr::from(0xc000_0200 + n as u32).into(),
            51820,
        );
        let init = h1.initiation();
        let h = &mut sim.hosts[0];
        h.node.handle_datagram(sim.now, from, &init, &mut h.out);
        for (_, d) in h.out.network() {
            match d.first() {
                Some(2) => responses += 1,
                Some(3) => cookies += 1,
                _ => {}
            }
        }
        h.out.clear();
    }
    assert_eq!(cookies, 0);
    assert_eq!(responses, HANDSHAKE_RATE_LIMIT - 1);
}

#[test]
fn a_handshake_flood_from_one_source_is_dropped_before_any_crypto() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    let mut h1 = RawPeer::of(&defs, 1, 0);
    let init = h1.initiation();
    let flooder: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let h = &mut sim.hosts[0];
    let mut answered = 0;
    for _ in 0..5_000 {
        h.node.handle_datagram(sim.now, flooder, &init, &mut h.out);
        answered += h.out.network().count();
        h.out.clear();
    }
    let flood = h.node.drops().get(DropReason::HandshakeFlood);
    assert_eq!(
        flood,
        5_000 - crate::core::handshake_gate::PER_SOURCE_PER_SECOND as u64
    );
    assert!(answered <= crate::core::handshake_gate::PER_SOURCE_PER_SECOND as usize);
    // The genuine peer, from its own address, still gets through.
    sim.tick();
    sim.run();
    assert_eq!(sim.status(0, "h1").state, PeerState::Up);
}

#[test]
fn an_initiation_stamped_in_our_past_is_answered_by_initiating() {
    let defs = three_hosts();
    let mut sim = Sim::mesh(&defs, None);
    // h1 as a raw session: two initiations, the older sent last, as from
    // a restart whose clock went back.
    let mut h1 = RawPeer::of(&defs, 1, 0);
    let older = h1.initiation();
    let newer = h1.initiation();
    let from: SocketAddr = defs[1].addr.parse().unwrap();
    let initiations_to_h1 = |h: &Host| {
        h.out
            .network()
            .filter(|(to, d)| *to == from && d.first() == Some(&1))
            .count()
    };
    let h = &mut sim.hosts[0];
    h.node.handle_datagram(sim.now, from, &newer, &mut h.out);
    h.out.clear();
    h.node.handle_datagram(sim.now, from, &older, &mut h.out);
    assert_eq!(initiations_to_h1(h), 1, "h0 initiates itself");
    h.out.clear();
    h.node.handle_datagram(sim.now, from, &older, &mut h.out);
    assert_eq!(initiations_to_h1(h), 0, "at most once per REKEY_TIMEOUT");
}

mod policy {
    use super::*;
    use crate::dns::HostRecords;
    use crate::dns::records::ContainerRecord;
    use crate::policy::conntrack::Rules;
    use crate::policy::{Identities, Policy, Rule, Selector};

    /// h0 and h2 each run one container; only web (h0) may reach db (h2)
    /// on 5432/udp; everything else is denied.
    fn rules(version: u64, allow: bool, reject: bool) -> Arc<Rules> {
        let host = |name: &str, last: u8, c: (&str, &str)| HostRecords {
            host: name.into(),
            address: Ipv4Addr::new(10, 42, last, 1),
            containers: vec![ContainerRecord {
                name: c.0.into(),
                stack: c.1.into(),
                service: None,
                address: Ipv4Addr::new(10, 42, last, 2),
                ports: Vec::new(),
            }],
        };
        let (h0, h2) = (host("h0", 1, ("web1", "web")), host("h2", 3, ("db1", "db")));
        let stack = |s: &str| Selector {
            stack: Some(s.into()),
            service: None,
            tenant: None,
        };
        Arc::new(Rules {
            policy: Policy {
                default: crate::policy::Action::Deny,
                reject,
                rules: allow
                    .then(|| Rule {
                        name: "web-db".into(),
                        from: stack("web"),
                        to: stack("db"),
                        ports: vec!["5432/udp".parse().unwrap()],
                        action: crate::policy::Action::Allow,
                    })
                    .into_iter()
                    .collect(),
                ..Policy::default()
            },
            identities: Identities::build([&h0, &h2]),
            version,
        })
    }

    #[test]
    fn egress_denies_before_sealing_and_replies_of_allowed_flows_pass() {
        let mut sim = Sim::mesh(&three_hosts(), None);
        for h in [0, 2] {
            sim.hosts[h].node.set_policy(rules(1, true, false));
        }
        let query = udp([10, 42, 1, 2], [10, 42, 3, 2], 40000, 5432, b"q");
        let other = udp([10, 42, 1, 2], [10, 42, 3, 2], 40000, 5433, b"x");
        sim.send_from_device(0, &query);
        sim.send_from_device(0, &other);
        sim.run();
        assert_eq!(sim.hosts[2].delivered, vec![query]);
        assert_eq!(sim.hosts[0].node.drops().get(DropReason::PolicyEgress), 1);
        // The answer goes back against the rule's direction: a reply.
        let answer = udp([10, 42, 3, 2], [10, 42, 1, 2], 5432, 40000, b"a");
        sim.send_from_device(2, &answer);
        sim.run();
        assert_eq!(sim.hosts[0].delivered, vec![answer]);
        // A new flow from db to web is not a reply.
        let unasked = udp([10, 42, 3, 2], [10, 42, 1, 2], 5432, 40001, b"u");
        sim.send_from_device(2, &unasked);
        sim.run();
        assert_eq!(sim.hosts[0].delivered.len(), 1);
        assert_eq!(sim.hosts[2].node.drops().get(DropReason::PolicyEgress), 1);
    }

    #[test]
    fn ingress_holds_against_a_sender_without_policy() {
        let mut sim = Sim::mesh(&three_hosts(), None);
        // Only the receiver has a policy, as with a plain WireGuard peer.
        sim.hosts[2].node.set_policy(rules(1, true, false));
        let forbidden = udp([10, 42, 1, 2], [10, 42, 3, 2], 40000, 22, b"f");
        for _ in 0..5 {
            sim.send_from_device(0, &forbidden);
        }
        sim.run();
        assert!(sim.hosts[2].delivered.is_empty());
        assert_eq!(sim.hosts[2].node.drops().get(DropReason::PolicyIngress), 5);
        let key = (Direction::Ingress, crate::policy::Tier::Default, None);
        assert_eq!(sim.hosts[2].node.policy().counters()[&key], 5);
    }

    #[test]
    fn a_removed_rule_stops_the_flow_at_its_next_packet() {
        let mut sim = Sim::mesh(&three_hosts(), None);
        sim.hosts[0].node.set_policy(rules(1, true, false));
        let query = udp([10, 42, 1, 2], [10, 42, 3, 2], 40000, 5432, b"q");
        sim.send_from_device(0, &query);
        sim.run();
        sim.hosts[0].node.set_policy(rules(2, true, false));
        sim.send_from_device(0, &query);
        sim.run();
        assert_eq!(
            sim.hosts[2].delivered.len(),
            2,
            "still allowed after a reload"
        );
        sim.hosts[0].node.set_policy(rules(3, false, false));
        sim.send_from_device(0, &query);
        sim.run();
        assert_eq!(sim.hosts[2].delivered.len(), 2);
        assert_eq!(sim.hosts[0].node.drops().get(DropReason::PolicyEgress), 1);
    }

    #[test]
    fn reject_answers_the_sender_with_a_reset_or_icmp_prohibited() {
        let mut sim = Sim::mesh(&three_hosts(), None);
        sim.hosts[0].node.set_policy(rules(1, true, true));
        let forbidden = udp([10, 42, 1, 2], [10, 42, 3, 2], 40000, 22, b"f");
        sim.send_from_device(0, &forbidden);
        let icmp: Vec<_> = sim.hosts[0].out.device().map(<[u8]>::to_vec).collect();
        assert_eq!(sim.hosts[0].out.network().len(), 0);
        assert_eq!(icmp.len(), 1);
        assert_eq!(
            (icmp[0][20], icmp[0][21]),
            (3, 13),
            "administratively prohibited"
        );
        assert_eq!(&icmp[0][16..20], &[10, 42, 1, 2]);
    }
}
