//! The records sync under attack, with the real binaries: a container that
//! takes a peer host's address, a hostile peer host (wireguard-go holding
//! that host's key) sending oversized, dotted, too many and too fast
//! records, and a peer removed from the membership.
//!
//! Needs root, iproute2, ping, wireguard-go and wireguard-tools; fails
//! (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshnet::config::Mode;
use meshnet::dns::ContainerRecord;
use meshnet::dns::sync::{MAX_PARTS, Message, SYNC_PORT, Stamp, encode_snapshot};
use meshnet_testbed::{
    Binaries, MeshOptions, Testbed, WireguardGo, exec_in, in_netns, unique_name, wait_until,
};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

const H1: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 1);
const H2: Ipv4Addr = Ipv4Addr::new(10, 42, 2, 1);

/// The A records host `i` serves for `name` (without the domain).
fn addresses(bed: &Testbed, i: usize, name: &str) -> Vec<String> {
    let fqdn = format!("{name}.mesh.internal.");
    bed.records(i)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "A" && r.name == fqdn)
        .map(|r| r.value)
        .collect()
}

fn json(message: &Message) -> Vec<u8> {
    serde_json::to_vec(message).unwrap()
}

fn part(stamp: Stamp, index: u32, total: u32, containers: Vec<ContainerRecord>) -> Vec<u8> {
    json(&Message::Part {
        stamp,
        index,
        total,
        containers,
    })
}

fn record(name: &str, address: Ipv4Addr) -> ContainerRecord {
    ContainerRecord {
        name: name.into(),
        stack: "big".into(),
        service: None,
        address,
        ports: vec![],
    }
}

/// Sends each datagram from `from` to `to` inside `ns`, pacing them so a
/// full batch stays under the per-peer message rate when `pace` is set.
fn send_all(ns: &str, from: SocketAddr, to: SocketAddr, datagrams: Vec<Vec<u8>>, pace: bool) {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(from)?;
        for d in &datagrams {
            // Sends may fail transiently (a full queue): that is a drop.
            let _ = socket.send_to(d, to);
            if pace {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_container_holding_a_peers_address_cannot_speak_for_it() {
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new("syncforge", &options, bins()).unwrap();
    bed.start_all().unwrap();
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(1, "c2").unwrap();
    bed.attach(0, &c1, "evil", &["--stack", "shop"]).unwrap();
    bed.attach(1, &c2, "web", &["--stack", "shop"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || addresses(&bed, 0, "web.shop")
            == ["10.42.2.2"]),
        "h1 never learned h2's container:\n{}",
        bed.log(0)
    );

    let stamp = Stamp {
        epoch: u64::MAX / 2,
        version: 1,
    };
    let lie = part(
        stamp,
        0,
        1,
        vec![record("web", Ipv4Addr::new(10, 42, 2, 66))],
    );
    let mut lies = vec![lie.clone(); 20];
    lies.push(json(&Message::Heartbeat { stamp }));
    // From its own address, through its agent, to h2's sync port.
    let own = SocketAddr::new(Ipv4Addr::new(10, 42, 1, 2).into(), SYNC_PORT);
    let to_h2 = SocketAddr::new(H2.into(), SYNC_PORT);
    send_all(&c1, own, to_h2, lies.clone(), false);
    // Then it takes h2's overlay address and speaks to h1 over the bridge.
    let out = exec_in(&c1, &["ip", "addr", "add", "10.42.2.1/32", "dev", "eth0"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let to_h1 = SocketAddr::new(H1.into(), SYNC_PORT);
    let as_h2 = SocketAddr::new(H2.into(), SYNC_PORT);
    send_all(&c1, as_h2, to_h1, lies, false);

    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        addresses(&bed, 0, "web.shop"),
        ["10.42.2.2"],
        "h1 was fooled"
    );
    assert_eq!(
        addresses(&bed, 1, "web.shop"),
        ["10.42.2.2"],
        "h2 was fooled"
    );
    assert!(
        bed.dropped(0, "sync_port").unwrap() >= 20,
        "h1's agent did not refuse the container's packets to h2's sync port: {:?}",
        bed.status(0).unwrap().dropped
    );
    // The real sync still works afterwards.
    let c3 = bed.add_container_ns(1, "c3").unwrap();
    bed.attach(1, &c3, "db", &["--stack", "shop"]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || addresses(
        &bed, 0, "db.shop"
    ) == ["10.42.2.3"]));
}

/// h1 runs meshd; h2 is wireguard-go holding h2's key: a peer host that
/// sends whatever it likes from its own overlay address.
struct HostilePeer {
    bed: Testbed,
    _wg: WireguardGo,
}

fn hostile_peer(tag: &str) -> HostilePeer {
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new(tag, &options, bins()).unwrap();
    bed.prepend_config(0, &format!("device = \"{}\"", unique_name("ms")))
        .unwrap();
    let wg = WireguardGo::start(&bed.hosts[1].ns, &unique_name("wg")).unwrap();
    wg.configure(&bed, 1, 0, true, None).unwrap();
    bed.start(0).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || bed.ping(1, H1, 1).unwrap()),
        "no tunnel between meshd and wireguard-go:\n{}",
        bed.log(0)
    );
    HostilePeer { bed, _wg: wg }
}

#[test]
fn a_hostile_peer_cannot_bloat_poison_or_stall_the_agent() {
    let p = hostile_peer("synchost");
    let bed = &p.bed;
    let ns = bed.hosts[1].ns.clone();
    let from = SocketAddr::new(H2.into(), SYNC_PORT);
    let to = SocketAddr::new(H1.into(), SYNC_PORT);
    let junk = Stamp {
        epoch: 1,
        version: 1,
    };
    let dotted = "a.".repeat(15_000);
    // One 62 kB snapshot with 30 kB dotted names (IP-fragmented on the way).
    let oversized = json(&Message::Part {
        stamp: junk,
        index: 0,
        total: 1,
        containers: vec![ContainerRecord {
            name: dotted.clone(),
            stack: "s".into(),
            service: Some(dotted.clone()),
            address: Ipv4Addr::new(10, 42, 2, 9),
            ports: vec![],
        }],
    });
    assert!(oversized.len() > 60_000);
    let mut attack = vec![oversized; 20];
    // Dotted names small enough for one packet; a reserved stack; another
    // host's address; more parts and more containers than a host may have.
    let small_dotted = record("a.b.c", Ipv4Addr::new(10, 42, 2, 9));
    let mut reserved = record("h1", Ipv4Addr::new(10, 42, 2, 9));
    reserved.stack = "hosts".into();
    let foreign = record("x", Ipv4Addr::new(10, 42, 1, 9));
    for (v, bad) in [(2, small_dotted), (3, reserved), (4, foreign)] {
        attack.push(part(
            Stamp {
                epoch: 1,
                version: v,
            },
            0,
            1,
            vec![bad],
        ));
    }
    attack.push(part(
        Stamp {
            epoch: 1,
            version: 5,
        },
        0,
        MAX_PARTS + 1,
        vec![],
    ));
    let many: Vec<ContainerRecord> = (0..9)
        .map(|i| record(&format!("m{i}"), Ipv4Addr::new(10, 42, 2, 9)))
        .collect();
    for index in 0..500 {
        attack.push(part(
            Stamp {
                epoch: 1,
                version: 6,
            },
            index,
            500,
            many.clone(),
        ));
    }
    send_all(&ns, from, to, attack, true);
    // A thousand snapshots a second and more: a flood of parts, as fast as
    // one sender goes, bounded in count.
    let flood: Vec<Vec<u8>> = (0..20_000u64)
        .map(|v| {
            part(
                Stamp {
                    epoch: 1,
                    version: 100 + v,
                },
                0,
                1,
                vec![],
            )
        })
        .collect();
    let started = Instant::now();
    send_all(&ns, from, to, flood, false);
    let flood_secs = started.elapsed().as_secs_f64();
    let status = bed
        .status(0)
        .expect("the control socket answers after the flood");
    assert!(status.peers_up == 1, "{status:?}");
    assert!(bed.dropped(0, "sync_refused").unwrap() > 0);
    assert!(
        bed.dropped(0, "sync_port").unwrap() >= 20,
        "fragments of the 62 kB snapshot"
    );
    let names: Vec<String> = bed
        .records(0)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("a.b.c") || n.starts_with("m0.")),
        "refused records were served: {names:?}"
    );
    eprintln!("flood of 20,000 parts sent in {flood_secs:.2} s");

    // The same peer, now honest, with thousands of containers: chunked,
    // reassembled, served.
    std::thread::sleep(Duration::from_millis(1500));
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let containers: Vec<ContainerRecord> = (0..3000u32)
        .map(|i| {
            record(
                &format!("c{i}"),
                Ipv4Addr::new(10, 42, 2, 2 + (i % 250) as u8),
            )
        })
        .collect();
    let parts: Vec<Vec<u8>> = encode_snapshot(Stamp { epoch, version: 1 }, &containers)
        .iter()
        .map(|p| p.to_vec())
        .collect();
    let count = parts.len();
    send_all(&ns, from, to, parts, true);
    assert!(
        wait_until(Duration::from_secs(10), || addresses(bed, 0, "c2999.big")
            == ["10.42.2.251"]),
        "a 3,000-container snapshot in {count} parts did not arrive:\n{}",
        bed.log(0)
    );
    assert_eq!(addresses(bed, 0, "c0.big"), ["10.42.2.2"]);
    let peak = bed.agent_peak_rss_kib(0).unwrap();
    eprintln!("meshd peak RSS {peak} KiB; 3,000 containers in {count} parts");
    assert!(peak < 64 * 1024, "meshd grew to {peak} KiB");
}

#[test]
fn a_peer_removed_from_membership_loses_its_records_at_once() {
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new("syncgone", &options, bins()).unwrap();
    bed.start_all().unwrap();
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    let c2 = bed.add_container_ns(1, "c2").unwrap();
    let c3 = bed.add_container_ns(2, "c3").unwrap();
    bed.attach(1, &c2, "two", &[]).unwrap();
    bed.attach(2, &c3, "three", &[]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        addresses(&bed, 0, "two.default").len() == 1
            && addresses(&bed, 0, "three.default").len() == 1
    }));
    bed.remove_peer_from_config(0, "h2").unwrap();
    bed.reload(0).unwrap();
    // Withdrawal by silence would take minutes: removal must not wait.
    assert!(
        wait_until(Duration::from_secs(2), || addresses(&bed, 0, "two.default")
            .is_empty()),
        "h2's records outlived its removal:\n{}",
        bed.log(0)
    );
    assert!(addresses(&bed, 0, "h2.hosts").is_empty());
    assert_eq!(addresses(&bed, 0, "three.default"), ["10.42.3.2"]);
}
