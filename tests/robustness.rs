//! Arbitrary input never panics the parsers or the core, and bad input is
//! counted, never forwarded.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Instant;

use meshnet::core::{Identity, LinkMode, Node, Outbox};
use meshnet::dns::answer::{Decision, Transport, answer};
use meshnet::dns::forward::{Mismatch, Query, Verdict};
use meshnet::keys::PrivateKey;
use meshnet::membership::{Membership, PeerSpec};
use proptest::prelude::*;

fn node() -> Node {
    let identity = Identity {
        name: "h1".into(),
        private_key: PrivateKey::generate().unwrap(),
        subnet: "10.42.1.0/24".parse().unwrap(),
        overlay: "10.42.0.0/16".parse().unwrap(),
    };
    let mut node = Node::new(&identity, LinkMode::Tun, 1420, Instant::now());
    let peer = PeerSpec {
        name: "h2".into(),
        public_key: PrivateKey::generate().unwrap().public_key(),
        endpoint: Some("192.0.2.2:51820".parse().unwrap()),
        subnet: "10.42.2.0/24".parse().unwrap(),
        keepalive: None,
        preshared_key: None,
    };
    node.apply_membership(&Membership { peers: vec![peer] });
    node
}

/// Datagrams shaped like WireGuard messages (right type byte and length)
/// reach deeper than uniformly random bytes.
fn wireguard_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        (
            1u8..=4,
            prop_oneof![Just(148usize), Just(92), Just(64), 32usize..200]
        )
            .prop_flat_map(|(t, len)| proptest::collection::vec(any::<u8>(), len - 4)
                .prop_map(move |rest| {
                    let mut v = vec![t, 0, 0, 0];
                    v.extend(rest);
                    v
                })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_datagrams_are_dropped_not_delivered(datagrams in proptest::collection::vec(wireguard_like(), 1..8)) {
        let mut node = node();
        let mut out = Outbox::default();
        let from: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        for d in &datagrams {
            node.handle_datagram(Instant::now(), from, d, &mut out);
        }
        prop_assert_eq!(out.device().len(), 0, "unauthenticated bytes reached the device");
        prop_assert_eq!(node.drops().total(), datagrams.len() as u64);
    }

    #[test]
    fn arbitrary_device_packets_never_panic(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..8)) {
        let mut node = node();
        let mut out = Outbox::default();
        for p in &packets {
            node.handle_device_packet(Instant::now(), p, &mut out);
        }
        node.handle_timers(Instant::now(), &mut out);
        let h2: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        prop_assert!(out.network().all(|(to, _)| to == h2), "something was sent somewhere but the peer");
    }

    #[test]
    fn arbitrary_dns_queries_never_panic_or_amplify(query in proptest::collection::vec(any::<u8>(), 0..600)) {
        let zone = meshnet::dns::Zone::build("mesh.internal", "10.42.0.0/16".parse().unwrap(), &[]);
        for transport in [Transport::Udp, Transport::Tcp] {
            if let Decision::Reply(bytes) = answer(&zone, &query, transport, 0) {
                prop_assert!(transport == Transport::Tcp || bytes.len() <= 512);
                prop_assert!(bytes.len() >= 12);
            }
        }
    }

    #[test]
    fn arbitrary_upstream_replies_never_panic_or_match_another_id(
        name in "[a-zA-Z0-9]{1,20}(\\.[a-zA-Z0-9]{1,20}){0,3}",
        id in any::<u16>(),
        reply in proptest::collection::vec(any::<u8>(), 0..200),
        keep in 0usize..40,
    ) {
        let bytes = meshnet::dns::answer::query_message(0x1234, &format!("{name}."), hickory_proto::rr::RecordType::A).unwrap();
        let query = Query::parse(&bytes).unwrap();
        // Random bytes, and the real query's prefix followed by random bytes.
        let mut prefixed = query.upstream(id);
        prefixed.truncate(keep.min(prefixed.len()));
        prefixed.extend_from_slice(&reply);
        for candidate in [&reply, &prefixed] {
            for transport in [Transport::Udp, Transport::Tcp] {
                let verdict = query.check(id, candidate, transport);
                if verdict != Verdict::Mismatch(Mismatch::Id) && verdict != Verdict::Mismatch(Mismatch::Malformed) {
                    prop_assert_eq!(&candidate[..2], &id.to_be_bytes());
                }
            }
            let _ = query.for_client(candidate);
            let _ = Query::parse(candidate);
        }
    }

    #[test]
    fn arbitrary_config_text_is_an_error_not_a_panic(text in "\\PC{0,300}") {
        let _ = meshnet::config::parse(&text, std::path::Path::new("/nonexistent/fuzz.toml"));
    }

    #[test]
    fn arbitrary_key_text_is_an_error_not_a_panic(text in "\\PC{0,60}") {
        let _ = PrivateKey::from_base64(&text);
    }
}
