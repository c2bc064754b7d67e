//! The bodies of the fuzz targets: one function per parser or decision
//! that takes outside input. `fuzz/fuzz_targets/*.rs` hand them libFuzzer's
//! bytes; `tests/fuzz_corpus.rs` replays the committed corpora through the
//! same functions on the stable toolchain. A target fails by panicking:
//! each states what must hold for every input.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use meshnet::core::ethernet::Mac;
use meshnet::core::{Identity, LinkMode, Node, Outbox};
use meshnet::dns::answer::{self, Decision, Transport};
use meshnet::dns::sync::RecordsSync;
use meshnet::dns::{ContainerRecord, HostRecords, Zone};
use meshnet::keys::{PrivateKey, PublicKey};
use meshnet::membership::{Membership, PeerSpec};

/// The device MTU the fuzzed node seals for.
const MTU: u16 = 1420;

/// A target's body: libFuzzer's bytes in, a panic on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("tun_packet", tun_packet),
    ("tap_frame", tap_frame),
    ("arp", arp),
    ("datagram", datagram),
    ("dns_answer", dns_answer),
    ("forwarder", forwarder),
    ("records_sync", records_sync),
    ("config", config),
    ("control", control),
    ("uapi", uapi),
    ("coalesce", coalesce),
    ("split", split),
];

fn key(seed: u8) -> PrivateKey {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode([seed; 32]);
    PrivateKey::from_base64(&text).unwrap()
}

const A: u8 = 1;
const B: u8 = 2;
const B_ENDPOINT: &str = "192.0.2.2:51820";

fn node(mode: LinkMode, now: Instant) -> Node {
    let identity = Identity {
        name: "h1".into(),
        private_key: key(A),
        subnet: "10.42.1.0/24".parse().unwrap(),
        overlay: "10.42.0.0/16".parse().unwrap(),
    };
    let mut node = Node::new(&identity, mode, MTU, now);
    node.apply_membership(&membership());
    node
}

fn membership() -> Membership {
    Membership {
        peers: vec![
            PeerSpec {
                name: "h2".into(),
                public_key: key(B).public_key(),
                endpoint: Some(B_ENDPOINT.parse().unwrap()),
                subnet: "10.42.2.0/24".parse().unwrap(),
                keepalive: Some(25),
                preshared_key: None,
            },
            PeerSpec {
                name: "h3".into(),
                public_key: key(3).public_key(),
                endpoint: None,
                subnet: "10.42.3.0/24".parse().unwrap(),
                keepalive: None,
                preshared_key: None,
            },
        ],
    }
}

/// Whatever the node put out must be well-formed: datagrams no larger than
/// a packet plus WireGuard's overhead, device packets within an IP packet.
fn check(out: &Outbox) {
    for (_, d) in out.network() {
        assert!(
            !d.is_empty() && d.len() <= 65535 + 32,
            "datagram {}",
            d.len()
        );
    }
    for p in out.device() {
        assert!(p.len() <= 65535 + 14, "device packet {}", p.len());
    }
}

/// A packet from the TUN device (the host's own traffic).
pub fn tun_packet(data: &[u8]) {
    let now = Instant::now();
    let mut node = node(LinkMode::Tun, now);
    let mut out = Outbox::default();
    node.handle_device_packet(now, data, &mut out);
    check(&out);
    node.handle_timers(now + Duration::from_millis(100), &mut out);
    check(&out);
}

/// A frame from the TAP device: ARP, IPv4, anything a container sends.
pub fn tap_frame(data: &[u8]) {
    let now = Instant::now();
    let mut node = node(LinkMode::Tap, now);
    let local = Ipv4Addr::new(10, 42, 1, 2);
    node.set_neighbour(local, Mac::of_container(local));
    let mut out = Outbox::default();
    node.handle_device_frame(now, data, &mut out);
    check(&out);
    for frame in out.device() {
        assert!(frame.len() >= 14, "a frame without an Ethernet header");
    }
}

/// An ARP payload from a container's frame: the first six bytes are the
/// frame's source MAC. A reply is a whole frame back to that source, from
/// the agent's MAC.
pub fn arp(data: &[u8]) {
    use meshnet::core::arp::{ArpResponder, ArpVerdict, Owners, REPLY_LEN};
    struct Remote;
    impl Owners for Remote {
        fn remote(&self, addr: Ipv4Addr) -> bool {
            addr.octets()[..3] == [10, 42, 2]
        }
    }
    let Some((source, payload)) = data.split_first_chunk::<6>() else {
        return;
    };
    let now = Instant::now();
    let agent = Mac([0x02, 1, 2, 3, 4, 5]);
    let mut responder = ArpResponder::new(
        agent,
        "10.42.0.0/16".parse().unwrap(),
        "10.42.1.0/24".parse().unwrap(),
        Ipv4Addr::new(169, 254, 169, 250),
        now,
    );
    let mut out = [0u8; REPLY_LEN];
    if let ArpVerdict::Reply(n) = responder.handle(now, Mac(*source), payload, &Remote, &mut out) {
        assert_eq!(n, REPLY_LEN);
        assert_eq!(&out[..6], source, "a reply goes to the frame's source");
        assert_eq!(out[6..12], agent.0);
    }
}

/// The forwarder's matching: a client query, the id it went upstream with,
/// and a datagram from the upstream. Input: id (2 bytes), query length
/// (2 bytes), the query, then the reply.
pub fn forwarder(data: &[u8]) {
    use meshnet::dns::forward::{Query, Verdict};
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let id = u16::from_be_bytes([head[0], head[1]]);
    let len = usize::from(u16::from_be_bytes([head[2], head[3]])).min(rest.len());
    let (query, reply) = rest.split_at(len);
    let Ok(query) = Query::parse(query) else {
        return;
    };
    let upstream = query.upstream(id);
    assert_eq!(upstream[..2], id.to_be_bytes());
    assert_eq!(upstream.len(), query.bytes().len());
    for transport in [Transport::Udp, Transport::Tcp] {
        let verdict = query.check(id, reply, transport);
        if matches!(verdict, Verdict::Match | Verdict::RetryTcp) {
            assert_eq!(reply[..2], id.to_be_bytes(), "matched another id");
            let to_client = query.for_client(reply);
            assert_eq!(to_client[..2], query.client_id().to_be_bytes());
            assert_eq!(to_client.len(), reply.len());
        }
        if transport == Transport::Tcp {
            assert_ne!(verdict, Verdict::RetryTcp, "TCP answers are never retried");
        }
    }
}

/// A datagram from the underlay. The first byte picks the path: 0 sends
/// the rest as it is, from the peer's endpoint; anything else runs a real
/// handshake with the peer (a boringtun session holding h2's key) first
/// and seals the rest as the inner packet, so decryption, cryptokey
/// routing, the sync port and delivery see arbitrary inner bytes.
pub fn datagram(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut node = node(LinkMode::Tun, now);
    let mut out = Outbox::default();
    let from: SocketAddr = B_ENDPOINT.parse().unwrap();
    if mode == 0 {
        node.handle_datagram(now, from, rest, &mut out);
        return check(&out);
    }
    let mut peer = Tunn::new(
        key(B).to_x25519(),
        key(A).public_key().to_x25519(),
        None,
        None,
        1,
        None,
    );
    let mut buf = vec![0u8; 65536 + 64];
    let TunnResult::WriteToNetwork(init) = peer.format_handshake_initiation(&mut buf, false) else {
        return;
    };
    node.handle_datagram(now, from, init, &mut out);
    let response: Vec<Vec<u8>> = out.network().map(|(_, d)| d.to_vec()).collect();
    out.clear();
    for r in response {
        let mut scratch = vec![0u8; 65536 + 64];
        if let TunnResult::WriteToNetwork(keepalive) =
            peer.decapsulate(Some(from.ip()), &r, &mut scratch)
        {
            node.handle_datagram(now, from, keepalive, &mut out);
        }
    }
    out.clear();
    if let TunnResult::WriteToNetwork(sealed) = peer.encapsulate(rest, &mut buf) {
        node.handle_datagram(now, from, sealed, &mut out);
    }
    check(&out);
    for (from, message) in out.sync() {
        assert_eq!(from, key(B).public_key(), "sync from a peer but the sealer");
        assert!(message.len() <= 65535);
    }
}

/// A DNS query against a zone with containers, services and ports.
pub fn dns_answer(data: &[u8]) {
    let Some((&flags, query)) = data.split_first() else {
        return;
    };
    let transport = if flags & 1 == 0 {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let zone = zone();
    match answer::answer(&zone, query, transport, usize::from(flags)) {
        Decision::Reply(bytes) => {
            assert!(bytes.len() >= 12, "a reply without a header");
            if transport == Transport::Udp {
                assert!(answer::limit_for_udp(bytes).len() <= 512);
            }
        }
        Decision::Forward { name, .. } => assert!(!zone.is_authoritative(&name)),
        Decision::Drop => {}
    }
    let _ = answer::server_failure(query, transport);
}

fn zone() -> Zone {
    let web = |name: &str, address: [u8; 4]| ContainerRecord {
        name: name.into(),
        stack: "shop".into(),
        service: Some("web".into()),
        address: address.into(),
        ports: vec!["http:8080/tcp".parse().unwrap()],
    };
    let hosts = [
        HostRecords {
            host: "h1".into(),
            address: [10, 42, 1, 1].into(),
            containers: vec![web("web1", [10, 42, 1, 2])],
        },
        HostRecords {
            host: "h2".into(),
            address: [10, 42, 2, 1].into(),
            containers: vec![web("web2", [10, 42, 2, 2])],
        },
    ];
    Zone::build("mesh.internal", "10.42.0.0/16".parse().unwrap(), &hosts)
}

/// Records-sync messages from a peer: the input is split at newlines into
/// messages, each from h2 (odd lines from h3), a millisecond apart.
pub fn records_sync(data: &[u8]) {
    let t0 = Instant::now();
    let local = HostRecords {
        host: "h1".into(),
        address: [10, 42, 1, 1].into(),
        containers: Vec::new(),
    };
    let mut sync = RecordsSync::new("mesh.internal", Duration::from_secs(30), local, 1, t0);
    sync.set_members(&membership(), t0);
    let senders: [PublicKey; 2] = [key(B).public_key(), key(3).public_key()];
    for (i, message) in data.split(|b| *b == b'\n').enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        let _ = sync.handle_message(now, senders[i % 2], message);
    }
    sync.handle_timeout(t0 + Duration::from_secs(1));
    while sync.poll_transmit().is_some() {}
    let hosts = sync.hosts();
    for h in hosts.iter().skip(1) {
        let subnet = membership()
            .peers
            .into_iter()
            .find(|p| p.name == h.host)
            .map(|p| p.subnet)
            .expect("records only from members");
        assert_eq!(h.validate("mesh.internal", subnet), Ok(()));
    }
    let _ = Zone::build(
        "mesh.internal",
        "10.42.0.0/16".parse().unwrap(),
        hosts.iter().map(|h| &**h),
    );
}

/// A config file's text. Key files it names are looked up next to a
/// config path that does not exist, so only the parser and validator run.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = meshnet::config::parse(text, Path::new("/nonexistent/meshd.toml")) {
        let message = e.to_string();
        assert!(message.starts_with("/nonexistent/meshd.toml"), "{message}");
    }
}

/// A control-protocol request line, as `meshctl` sends it: what parses
/// must survive a round trip.
pub fn control(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<meshnet::control::Request>(data) {
        let again = serde_json::to_vec(&request).unwrap();
        let back: meshnet::control::Request = serde_json::from_slice(&again).unwrap();
        assert_eq!(back, request);
    }
    let _ = serde_json::from_slice::<meshnet::control::Response>(data);
}

/// The UAPI: a request line, answered from an agent status and peers given
/// as JSON (two lines after the request): the answer is `key=value` lines
/// and ends the way `wg` expects.
pub fn uapi(data: &[u8]) {
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let request = lines.next().unwrap_or_default();
    let host = lines.next().unwrap_or_default();
    let peers = lines.next().unwrap_or_default();
    let request = String::from_utf8_lossy(request);
    let Ok(host) = serde_json::from_slice::<meshnet::control::HostStatus>(host) else {
        return;
    };
    let peers: Vec<meshnet::core::PeerStatus> = serde_json::from_slice(peers).unwrap_or_default();
    let now = Duration::from_secs(1_800_000_000);
    match meshnet::uapi::parse_request(&request) {
        meshnet::uapi::UapiRequest::Get => {
            let answer = meshnet::uapi::get_response(&host, &peers, now);
            assert!(answer.ends_with("errno=0\n\n"), "{answer}");
            for line in answer.trim_end().lines() {
                assert!(line.contains('='), "{line:?}");
            }
        }
        meshnet::uapi::UapiRequest::Set | meshnet::uapi::UapiRequest::Unknown => {}
    }
    let dump = meshnet::uapi::dump(&host, &peers, now);
    assert_eq!(dump.lines().count(), 1 + peers.len(), "{dump}");
}

/// A batch of packets for the device writes' coalescing: the first byte
/// picks TUN or TAP (bit 0) and whether UDP coalesces (bit 1); then the
/// packets, each behind its length in two bytes. Every packet goes into
/// exactly one write, in order, and a super-packet's headers agree with
/// the packets it stands for: lengths, segment size, link header and
/// addresses.
pub fn coalesce(data: &[u8]) {
    use meshnet::core::coalesce::{Coalescer, MAX_SEGMENTS};
    use meshnet::core::virtio::HEADER_LEN as VIRTIO_HEADER;
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let coalescer = Coalescer {
        link_header: if flags & 1 != 0 { 14 } else { 0 },
        udp: flags & 2 != 0,
    };
    let mut packets = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        packets.push(&tail[..len]);
        rest = &tail[len..];
    }
    let link = coalescer.link_header;
    let mut at = 0;
    while at < packets.len() {
        let plan = coalescer.plan(&packets[at..]);
        assert!(plan.count >= 1 && plan.count <= MAX_SEGMENTS);
        assert!(at + plan.count <= packets.len(), "a plan past the batch");
        let run = &packets[at..at + plan.count];
        at += plan.count;
        let prefix = plan.prefix();
        if plan.skip == 0 {
            assert_eq!(plan.count, 1, "several packets written as they are");
            assert_eq!(prefix, &[0; VIRTIO_HEADER]);
            continue;
        }
        assert!(plan.count >= 2, "a lone packet behind rewritten headers");
        assert_eq!(prefix.len(), VIRTIO_HEADER + plan.skip);
        let header = meshnet::core::virtio::Header::read(prefix).unwrap();
        let (hdr_len, gso_size) = (usize::from(header.hdr_len), usize::from(header.gso_size));
        assert_eq!(hdr_len, plan.skip);
        let ip = &prefix[VIRTIO_HEADER + link..];
        let payloads: Vec<usize> = run
            .iter()
            .map(|p| {
                p.len()
                    .checked_sub(plan.skip)
                    .expect("a packet shorter than its headers")
            })
            .collect();
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, plan.skip - link + payloads.iter().sum::<usize>());
        let (last, full) = payloads.split_last().unwrap();
        assert!(full.iter().all(|&n| n == gso_size) && (1..=gso_size).contains(last));
        for packet in run {
            assert_eq!(packet[..link], prefix[VIRTIO_HEADER..VIRTIO_HEADER + link]);
            assert_eq!(packet[link + 12..link + 20], ip[12..20], "other addresses");
        }
    }
}

/// A device read for the splitting of super-packets: the first byte picks
/// TUN or TAP (bit 0), the rest is the read (virtio header, then the
/// packet or frame). A read is refused or cut into exactly as many
/// segments as it says, in order, each inside the read; the last one ends
/// where the read ends; every IPv4 segment's total length and header
/// checksum are its own.
pub fn split(data: &[u8]) {
    use meshnet::core::checksum::{fold, sum};
    use meshnet::core::split::Segments;
    use meshnet::core::virtio::HEADER_LEN as VIRTIO_HEADER;
    let Some((&flags, read)) = data.split_first() else {
        return;
    };
    let link = if flags & 1 != 0 { 14 } else { 0 };
    let mut read = read.to_vec();
    let Ok(mut segments) = Segments::parse(&mut read, link) else {
        return;
    };
    let start = read.as_ptr() as usize;
    let (len, count) = (read.len(), segments.count());
    let is_super = read[1] != 0;
    let mut seen = 0;
    let mut previous = start;
    while let Some(segment) = segments.next(&mut read) {
        seen += 1;
        assert!(seen <= count, "more segments than counted");
        let at = segment.as_ptr() as usize;
        assert!(
            at >= previous && at + segment.len() <= start + len,
            "outside the read"
        );
        previous = at;
        if !is_super {
            assert_eq!(
                (at - start, segment.len()),
                (VIRTIO_HEADER, len - VIRTIO_HEADER)
            );
            continue;
        }
        if seen == count {
            assert_eq!(
                at + segment.len(),
                start + len,
                "the last segment ends early"
            );
        }
        let ip = &segment[link..];
        if ip[0] >> 4 == 4 {
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(total, ip.len(), "IPv4 total length");
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            assert_eq!(fold(sum(&ip[..ihl], 0)), 0xffff, "IPv4 header checksum");
        }
    }
    assert_eq!(seen, count);
}
