//! The records sync between agents, simulated in memory with fixed time.

use std::time::{Duration, Instant};

use super::*;
use crate::dns::ServicePort;
use crate::membership::PeerSpec;

const WITHDRAW: Duration = Duration::from_secs(30);

fn key(n: u8) -> PublicKey {
    PublicKey::from([n; 32])
}

fn spec(n: u8) -> PeerSpec {
    PeerSpec {
        name: format!("h{n}"),
        public_key: key(n),
        endpoint: None,
        subnet: format!("10.42.{n}.0/24").parse().unwrap(),
        keepalive: None,
        preshared_key: None,
    }
}

fn container(host: u8, i: usize) -> ContainerRecord {
    ContainerRecord {
        name: format!("c{i}"),
        stack: "shop".into(),
        service: Some("web".into()),
        address: std::net::Ipv4Addr::new(10, 42, host, 2 + (i % 250) as u8),
        ports: vec![],
    }
}

fn records(host: u8, containers: Vec<ContainerRecord>) -> HostRecords {
    HostRecords {
        host: format!("h{host}"),
        address: host_address(spec(host).subnet),
        containers,
    }
}

/// Agent `n` of a mesh whose other members are `peers`.
fn agent(n: u8, peers: &[u8], containers: usize, t0: Instant) -> RecordsSync {
    let local = records(n, (0..containers).map(|i| container(n, i)).collect());
    let mut s = RecordsSync::new("mesh.internal", WITHDRAW, local, 1000, t0);
    let membership = Membership {
        peers: peers.iter().map(|&p| spec(p)).collect(),
    };
    s.set_members(&membership, t0);
    s
}

/// Delivers everything `from` (agent `n`) has queued for `to`; returns
/// how many messages went.
fn pump(from: &mut RecordsSync, n: u8, to: &mut RecordsSync, me: u8, now: Instant) -> usize {
    let mut sent = 0;
    while let Some(t) = from.poll_transmit() {
        if t.to == key(me) {
            sent += 1;
            let _ = to.handle_message(now, key(n), &t.payload);
        }
    }
    sent
}

fn remote_names(s: &RecordsSync) -> Vec<String> {
    s.hosts()
        .iter()
        .skip(1)
        .flat_map(|h| {
            h.containers
                .iter()
                .map(|c| format!("{}@{}", c.name, h.host))
        })
        .collect()
}

fn part(stamp: Stamp, index: u32, total: u32, containers: Vec<ContainerRecord>) -> Vec<u8> {
    serde_json::to_vec(&Message::Part {
        stamp,
        index,
        total,
        containers,
    })
    .unwrap()
}

const fn stamp(version: u64) -> Stamp {
    Stamp {
        epoch: 5000,
        version,
    }
}

#[test]
fn two_agents_learn_each_others_records() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 3, t0);
    let mut b = agent(2, &[1], 1, t0);
    assert!(pump(&mut a, 1, &mut b, 2, t0) > 0);
    pump(&mut b, 2, &mut a, 1, t0);
    assert_eq!(remote_names(&b), ["c0@h1", "c1@h1", "c2@h1"]);
    assert_eq!(remote_names(&a), ["c0@h2"]);
    assert!(b.take_changed());
    assert!(!b.take_changed(), "changed is reported once");
    assert_eq!(b.hosts()[1].address, std::net::Ipv4Addr::new(10, 42, 1, 1));
}

#[test]
fn the_largest_host_syncs_in_parts_that_each_fit_a_packet() {
    let t0 = Instant::now();
    let long = "x".repeat(63);
    let big: Vec<ContainerRecord> = (0..MAX_CONTAINERS_PER_HOST)
        .map(|i| ContainerRecord {
            name: format!("{}{i:04}", &long[..59]),
            stack: long.clone(),
            service: Some(long.clone()),
            address: std::net::Ipv4Addr::new(10, 42, 16 + (i / 256) as u8, (i % 256) as u8),
            ports: (0..crate::dns::records::MAX_PORTS_PER_CONTAINER)
                .map(|p| ServicePort {
                    name: format!("{}{p}", &long[..62]),
                    port: 65535,
                    protocol: crate::dns::records::Protocol::Udp,
                })
                .collect(),
        })
        .collect();
    let parts = encode_snapshot(stamp(1), &big);
    assert!(parts.iter().all(|p| p.len() <= MAX_MESSAGE));
    assert!(parts.len() <= MAX_PARTS as usize, "{} parts", parts.len());

    let mut receiver = RecordsSync::new("mesh.internal", WITHDRAW, records(1, vec![]), 1, t0);
    let mut wide = spec(16);
    wide.subnet = "10.42.16.0/20".parse().unwrap();
    receiver.set_members(&Membership { peers: vec![wide] }, t0);
    // Out of order, with duplicates, as UDP may deliver them.
    // Paced at 1,000 a second, under the per-peer rate.
    for (p, ms) in parts.iter().rev().chain(parts.iter().take(3)).zip(0..) {
        receiver
            .handle_message(t0 + Duration::from_millis(ms), key(16), p)
            .unwrap();
    }
    let hosts = receiver.hosts();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[1].containers, big);
}

#[test]
fn messages_from_anyone_but_a_current_peer_are_refused() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    let p = part(stamp(1), 0, 1, vec![container(3, 0)]);
    assert_eq!(
        a.handle_message(t0, key(3), &p),
        Err(SyncReject::UnknownPeer)
    );
    assert_eq!(
        a.handle_message(t0, key(2), &vec![b' '; MAX_MESSAGE + 1]),
        Err(SyncReject::Oversized)
    );
    assert_eq!(
        a.handle_message(t0, key(2), b"{\"kind\":\"nonsense\"}"),
        Err(SyncReject::Malformed)
    );
    assert_eq!(a.hosts().len(), 1);
}

#[test]
fn an_older_snapshot_never_replaces_a_newer_one() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    let newer = part(stamp(3), 0, 1, vec![container(2, 0)]);
    let older = part(stamp(2), 0, 1, vec![container(2, 1)]);
    a.handle_message(t0, key(2), &newer).unwrap();
    assert_eq!(a.handle_message(t0, key(2), &older), Err(SyncReject::Stale));
    let restarted_earlier = part(
        Stamp {
            epoch: 4999,
            version: 99,
        },
        0,
        1,
        vec![],
    );
    assert_eq!(
        a.handle_message(t0, key(2), &restarted_earlier),
        Err(SyncReject::Stale)
    );
    assert_eq!(remote_names(&a), ["c0@h2"]);
    // A pending newer snapshot is not displaced by an older one either.
    a.handle_message(t0, key(2), &part(stamp(5), 0, 2, vec![]))
        .unwrap();
    assert_eq!(
        a.handle_message(t0, key(2), &part(stamp(4), 0, 1, vec![])),
        Err(SyncReject::Stale)
    );
    a.handle_message(t0, key(2), &part(stamp(5), 1, 2, vec![container(2, 7)]))
        .unwrap();
    assert_eq!(remote_names(&a), ["c7@h2"]);
}

#[test]
fn heartbeats_keep_records_ask_for_newer_and_ignore_older() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    while a.poll_transmit().is_some() {}
    a.handle_message(t0, key(2), &part(stamp(3), 0, 1, vec![container(2, 0)]))
        .unwrap();
    let beat = |v| serde_json::to_vec(&Message::Heartbeat { stamp: stamp(v) }).unwrap();
    let t1 = t0 + WITHDRAW - Duration::from_secs(1);
    a.handle_message(t1, key(2), &beat(3)).unwrap();
    assert!(a.poll_transmit().is_none(), "same stamp: nothing to ask");
    a.handle_message(t1, key(2), &beat(2)).unwrap();
    assert!(a.poll_transmit().is_none(), "older stamp: ignored");
    a.handle_message(t1, key(2), &beat(4)).unwrap();
    let ask = a.poll_transmit().expect("a request for the newer snapshot");
    assert_eq!(ask.to, key(2));
    assert_eq!(&*ask.payload, br#"{"kind":"request"}"#);
    a.handle_message(t1, key(2), &beat(4)).unwrap();
    assert!(a.poll_transmit().is_none(), "asks at most once a second");
    // Confirmed at t1 by the same-stamp heartbeat: withdrawn a full
    // withdraw_after later, not before.
    a.handle_timeout(t1 + WITHDRAW - Duration::from_millis(1));
    assert_eq!(remote_names(&a), ["c0@h2"]);
    assert!(a.poll_timeout() <= t1 + WITHDRAW);
    a.handle_timeout(t1 + WITHDRAW);
    assert!(remote_names(&a).is_empty(), "silent peer withdrawn");
}

#[test]
fn a_request_is_answered_with_the_snapshot_at_most_once_a_second() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 2, t0);
    while a.poll_transmit().is_some() {}
    let request = serde_json::to_vec(&Message::Request).unwrap();
    a.handle_message(t0, key(2), &request).unwrap();
    assert_eq!(std::iter::from_fn(|| a.poll_transmit()).count(), 1);
    a.handle_message(t0 + Duration::from_millis(500), key(2), &request)
        .unwrap();
    assert_eq!(std::iter::from_fn(|| a.poll_transmit()).count(), 0);
    a.handle_message(t0 + Duration::from_secs(1), key(2), &request)
        .unwrap();
    assert_eq!(std::iter::from_fn(|| a.poll_transmit()).count(), 1);
}

#[test]
fn heartbeats_go_to_every_peer_on_time() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2, 3], 0, t0);
    while a.poll_transmit().is_some() {}
    a.handle_timeout(t0);
    let beats: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert_eq!(beats.len(), 2);
    assert!(a.poll_timeout() <= t0 + HEARTBEAT);
    a.handle_timeout(t0 + HEARTBEAT / 2);
    assert!(a.poll_transmit().is_none());
}

#[test]
fn a_peer_removed_from_membership_loses_its_records_at_once() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2, 3], 0, t0);
    a.handle_message(t0, key(2), &part(stamp(1), 0, 1, vec![container(2, 0)]))
        .unwrap();
    a.handle_message(t0, key(3), &part(stamp(1), 0, 1, vec![container(3, 0)]))
        .unwrap();
    a.take_changed();
    a.set_members(
        &Membership {
            peers: vec![spec(3)],
        },
        t0,
    );
    assert!(a.take_changed());
    assert_eq!(remote_names(&a), ["c0@h3"]);
    let p = part(stamp(2), 0, 1, vec![container(2, 1)]);
    assert_eq!(
        a.handle_message(t0, key(2), &p),
        Err(SyncReject::UnknownPeer)
    );
    // A peer whose subnet changes starts over as well.
    let mut moved = spec(3);
    moved.subnet = "10.42.33.0/24".parse().unwrap();
    a.set_members(&Membership { peers: vec![moved] }, t0);
    assert!(remote_names(&a).is_empty());
}

#[test]
fn a_flooding_peer_costs_a_bounded_number_of_parses() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    let p = part(stamp(1), 0, 1, vec![container(2, 0)]);
    let taken = (0..10_000)
        .filter(|_| a.handle_message(t0, key(2), &p) != Err(SyncReject::RateLimited))
        .count();
    assert_eq!(taken, MESSAGES_PER_SECOND as usize);
    assert_eq!(
        a.handle_message(t0, key(3), &p),
        Err(SyncReject::UnknownPeer)
    );
    let later = t0 + Duration::from_millis(10);
    assert_eq!(a.handle_message(later, key(2), &p), Ok(()), "tokens refill");
}

#[test]
fn invalid_records_refuse_the_whole_snapshot() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    let mut dotted = container(2, 1);
    dotted.name = "a.b.c".into();
    let mut reserved = container(2, 2);
    reserved.stack = "hosts".into();
    let mut foreign = container(2, 3);
    foreign.address = [10, 42, 1, 9].into();
    for (v, bad) in [(1, dotted), (2, reserved), (3, foreign)] {
        let first = part(stamp(v), 0, 2, vec![container(2, 0)]);
        a.handle_message(t0, key(2), &first).unwrap();
        let second = part(stamp(v), 1, 2, vec![bad]);
        assert!(matches!(
            a.handle_message(t0, key(2), &second),
            Err(SyncReject::Invalid(_))
        ));
        assert!(remote_names(&a).is_empty(), "version {v}");
        assert_eq!(
            a.handle_message(t0, key(2), &first),
            Err(SyncReject::Stale),
            "the refused snapshot's parts are ignored"
        );
    }
    let good = part(stamp(4), 0, 1, vec![container(2, 0)]);
    a.handle_message(t0, key(2), &good).unwrap();
    assert_eq!(remote_names(&a), ["c0@h2"]);
}

#[test]
fn too_many_containers_or_parts_are_refused_early() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    let bad = part(stamp(1), 0, MAX_PARTS + 1, vec![]);
    assert!(matches!(
        a.handle_message(t0, key(2), &bad),
        Err(SyncReject::BadPart { .. })
    ));
    let bad = part(stamp(1), 3, 3, vec![]);
    assert!(matches!(
        a.handle_message(t0, key(2), &bad),
        Err(SyncReject::BadPart { .. })
    ));
    a.handle_message(t0, key(2), &part(stamp(2), 0, 3, vec![]))
        .unwrap();
    assert!(matches!(
        a.handle_message(t0, key(2), &part(stamp(2), 1, 4, vec![])),
        Err(SyncReject::BadPart { .. })
    ));
    // Parts that add up past the cap end the snapshot before it completes.
    let per_part = 5;
    let total = (MAX_CONTAINERS_PER_HOST / per_part + 2) as u32;
    let mut refused = false;
    for index in 0..total {
        let cs = (0..per_part).map(|i| container(2, i)).collect();
        if let Err(SyncReject::Invalid(_)) =
            a.handle_message(t0, key(2), &part(stamp(3), index, total, cs))
        {
            refused = true;
            break;
        }
    }
    assert!(refused);
    assert!(remote_names(&a).is_empty());
}

#[test]
fn a_local_change_sends_a_newer_snapshot_to_every_peer() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2, 3], 0, t0);
    let mut b = agent(2, &[1, 3], 0, t0);
    pump(&mut a, 1, &mut b, 2, t0);
    a.set_local(records(1, vec![container(1, 0)]));
    let queued: Vec<Transmit> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert_eq!(queued.len(), 2, "one part to each of two peers");
    for t in queued.iter().filter(|t| t.to == key(2)) {
        b.handle_message(t0, key(1), &t.payload).unwrap();
    }
    assert_eq!(remote_names(&b), ["c0@h1"]);
    a.set_local(records(1, vec![container(1, 0)]));
    assert!(a.poll_transmit().is_none(), "no change, nothing sent");
}

#[test]
fn a_peer_restarted_with_its_clock_set_back_is_heard_again_after_withdrawal() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    a.handle_message(t0, key(2), &part(stamp(3), 0, 1, vec![container(2, 0)]))
        .unwrap();
    let earlier = Stamp {
        epoch: 10,
        version: 1,
    };
    let restarted = part(earlier, 0, 1, vec![container(2, 5)]);
    assert_eq!(
        a.handle_message(t0, key(2), &restarted),
        Err(SyncReject::Stale)
    );
    a.handle_timeout(t0 + WITHDRAW);
    assert!(remote_names(&a).is_empty());
    let later = t0 + WITHDRAW + Duration::from_secs(1);
    a.handle_message(later, key(2), &restarted).unwrap();
    assert_eq!(remote_names(&a), ["c5@h2"]);
}

/// A host's records as the store hands them over.
fn offered(sets: &[(u8, Vec<ContainerRecord>)]) -> StoreRecords {
    sets.iter()
        .map(|(n, c)| (format!("h{n}"), Arc::new(records(*n, c.clone()))))
        .collect()
}

fn renamed(n: u8, c: usize) -> ContainerRecord {
    let mut r = container(n, c);
    r.name = format!("e{c}");
    r
}

#[test]
fn records_from_the_store_are_served_for_members_and_win_over_the_mesh() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2, 3], 0, t0);
    // h2 also speaks the mesh sync; h3 only ever shows up in etcd.
    a.handle_message(t0, key(2), &part(stamp(1), 0, 1, vec![container(2, 0)]))
        .unwrap();
    a.take_changed();
    let e = renamed(2, 0);
    a.set_store_records(offered(&[(2, vec![e]), (3, vec![container(3, 5)])]));
    assert!(a.take_changed());
    assert_eq!(
        remote_names(&a),
        ["e0@h2", "c5@h3"],
        "h2 from etcd, not mesh"
    );
    // The same sets again (a new map, equal values): nothing changes.
    let e = renamed(2, 0);
    a.set_store_records(offered(&[(2, vec![e]), (3, vec![container(3, 5)])]));
    assert!(!a.take_changed());
    // A non-member's set waits until it joins.
    a.set_store_records(offered(&[(4, vec![container(4, 1)])]));
    assert_eq!(remote_names(&a), ["c0@h2"], "h2 falls back to the mesh");
    a.set_members(
        &Membership {
            peers: vec![spec(2), spec(3), spec(4)],
        },
        t0,
    );
    assert_eq!(remote_names(&a), ["c0@h2", "c1@h4"]);
}

#[test]
fn store_records_are_validated_like_a_mesh_snapshot() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2], 0, t0);
    let mut foreign = container(2, 3);
    foreign.address = [10, 42, 1, 9].into();
    let mut dotted = container(2, 1);
    dotted.name = "a.b".into();
    let mut other_name = records(2, vec![]);
    other_name.host = "h9".into();
    let mut other_address = records(2, vec![]);
    other_address.address = [10, 42, 2, 7].into();
    let too_many = records(
        2,
        (0..=MAX_CONTAINERS_PER_HOST)
            .map(|i| container(2, i))
            .collect(),
    );
    for bad in [
        records(2, vec![foreign]),
        records(2, vec![dotted]),
        other_name,
        other_address,
        too_many,
    ] {
        a.set_store_records([("h2".to_owned(), Arc::new(bad))].into());
        assert!(remote_names(&a).is_empty());
        assert!(a.hosts().len() == 1, "nothing served for h2");
    }
    // A valid set is taken; a bad update leaves it in force.
    a.set_store_records(offered(&[(2, vec![container(2, 0)])]));
    assert_eq!(remote_names(&a), ["c0@h2"]);
    let mut bad = container(2, 1);
    bad.address = [10, 42, 3, 1].into();
    a.take_changed();
    a.set_store_records(offered(&[(2, vec![bad])]));
    assert!(!a.take_changed());
    assert_eq!(remote_names(&a), ["c0@h2"]);
}

#[test]
fn store_records_are_withdrawn_only_when_their_key_or_member_goes() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2, 3], 0, t0);
    a.set_store_records(offered(&[
        (2, vec![container(2, 0)]),
        (3, vec![container(3, 0)]),
    ]));
    // Silence on the mesh does not withdraw what etcd holds.
    a.handle_timeout(t0 + WITHDRAW * 3);
    assert_eq!(remote_names(&a), ["c0@h2", "c0@h3"]);
    a.take_changed();
    // Key deleted (lease expired, decommission): withdrawn.
    a.set_store_records(offered(&[(3, vec![container(3, 0)])]));
    assert!(a.take_changed());
    assert_eq!(remote_names(&a), ["c0@h3"]);
    // Member gone: withdrawn; member back: served again.
    a.set_members(
        &Membership {
            peers: vec![spec(2)],
        },
        t0,
    );
    assert!(remote_names(&a).is_empty());
    a.set_members(
        &Membership {
            peers: vec![spec(2), spec(3)],
        },
        t0,
    );
    assert_eq!(remote_names(&a), ["c0@h3"]);
    // A member whose block moved: its set is checked against the new
    // block (and refused, its addresses being in the old one).
    let mut moved = spec(3);
    moved.subnet = "10.42.33.0/24".parse().unwrap();
    a.set_members(
        &Membership {
            peers: vec![spec(2), moved],
        },
        t0,
    );
    assert!(remote_names(&a).is_empty());
}

#[test]
fn precedence_follows_first_acceptance_across_both_sources() {
    let t0 = Instant::now();
    let mut a = agent(1, &[2, 3], 0, t0);
    // h3 over the mesh first, then h2 from etcd, then h3 from etcd too:
    // h3 keeps its earlier place.
    a.handle_message(t0, key(3), &part(stamp(1), 0, 1, vec![container(3, 0)]))
        .unwrap();
    a.set_store_records(offered(&[(2, vec![container(2, 0)])]));
    assert_eq!(remote_names(&a), ["c0@h3", "c0@h2"]);
    a.set_store_records(offered(&[
        (2, vec![container(2, 0)]),
        (3, vec![container(3, 1)]),
    ]));
    assert_eq!(remote_names(&a), ["c1@h3", "c0@h2"]);
}
