//! Per-packet cost of meshnet's core beside the physical floor of its
//! crypto: `cargo bench --bench encap`.
//!
//! encap: a packet from the device through `Node` (route lookup, WireGuard
//! encryption into the outbox). decap: a datagram through `Node` (session
//! lookup, authentication, decryption, cryptokey check). seal / open:
//! ring's ChaCha20-Poly1305 alone on the same sizes, the library
//! boringtun's data path uses. After the runs, a table of the ratios and the
//! bytes each packet costs on the wire.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use meshnet::core::{Identity, LinkMode, Node, Outbox};
use meshnet::keys::PrivateKey;
use meshnet::membership::{Membership, PeerSpec};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

/// 1400 needs padding (to 1408), the others do not.
const SIZES: [usize; 4] = [64, 512, 1400, 1420];
const GROUP: &str = "per_packet";

struct Pair {
    a: Node,
    b: Node,
    a_addr: SocketAddr,
}

fn node(key: &PrivateKey, subnet: &str) -> Node {
    let identity = Identity {
        name: "bench".into(),
        private_key: key.clone(),
        subnet: subnet.parse().expect("subnet"),
        overlay: "10.42.0.0/16".parse().expect("overlay"),
    };
    Node::new(&identity, LinkMode::Tun, 1420, Instant::now())
}

fn peer(name: &str, key: &PrivateKey, addr: SocketAddr, subnet: &str) -> Membership {
    Membership {
        peers: vec![PeerSpec {
            name: name.into(),
            public_key: key.public_key(),
            endpoint: Some(addr),
            subnet: subnet.parse().expect("subnet"),
            keepalive: None,
            preshared_key: None,
        }],
    }
}

/// Two nodes with an established session, shuttled in memory.
fn pair() -> Pair {
    let ka = PrivateKey::generate().expect("rng");
    let kb = PrivateKey::generate().expect("rng");
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
    let b_addr: SocketAddr = "192.0.2.2:51820".parse().expect("addr");
    let mut p = Pair {
        a: node(&ka, "10.42.1.0/24"),
        b: node(&kb, "10.42.2.0/24"),
        a_addr,
    };
    p.a.apply_membership(&peer("b", &kb, b_addr, "10.42.2.0/24"));
    p.b.apply_membership(&peer("a", &ka, a_addr, "10.42.1.0/24"));
    let (mut out_a, mut out_b) = (Outbox::default(), Outbox::default());
    p.a.handle_timers(Instant::now(), &mut out_a);
    for _ in 0..10 {
        let to_b: Vec<Vec<u8>> = out_a.network().map(|(_, d)| d.to_vec()).collect();
        let to_a: Vec<Vec<u8>> = out_b.network().map(|(_, d)| d.to_vec()).collect();
        out_a.clear();
        out_b.clear();
        for d in &to_b {
            p.b.handle_datagram(Instant::now(), a_addr, d, &mut out_b);
        }
        for d in &to_a {
            p.a.handle_datagram(Instant::now(), b_addr, d, &mut out_a);
        }
    }
    p
}

/// An IPv4/UDP packet of exactly `size` bytes from a to b.
fn packet(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    PacketBuilder::ipv4([10, 42, 1, 1], [10, 42, 2, 1], 64)
        .udp(4000, 5000)
        .write(&mut v, &vec![0x5a; size - 28])
        .expect("packet");
    v
}

fn per_packet(c: &mut Criterion) {
    let mut group = c.benchmark_group(GROUP);
    let mut p = pair();
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]).expect("key"));
    for size in SIZES {
        let pkt = packet(size);
        group.throughput(Throughput::Bytes(size as u64));
        let mut out = Outbox::default();
        group.bench_with_input(BenchmarkId::new("encap", size), &pkt, |bench, pkt| {
            bench.iter(|| {
                p.a.handle_device_packet(Instant::now(), black_box(pkt), &mut out);
                out.clear();
            })
        });
        let (a, b, a_addr) = (&mut p.a, &mut p.b, p.a_addr);
        let (mut sealed, mut delivered) = (Outbox::default(), Outbox::default());
        group.bench_with_input(BenchmarkId::new("decap", size), &pkt, |bench, pkt| {
            bench.iter_batched(
                || {
                    a.handle_device_packet(Instant::now(), pkt, &mut sealed);
                    let d = sealed.network().next().map(|(_, d)| d.to_vec());
                    sealed.clear();
                    d.expect("sealed")
                },
                |datagram| {
                    b.handle_datagram(Instant::now(), a_addr, black_box(&datagram), &mut delivered);
                    assert_eq!(delivered.device().len(), 1, "the packet was not delivered");
                    delivered.clear();
                },
                BatchSize::SmallInput,
            )
        });
        let mut buf = pkt.clone();
        group.bench_with_input(BenchmarkId::new("seal", size), &size, |bench, _| {
            bench.iter(|| {
                let nonce = Nonce::assume_unique_for_key([0; 12]);
                black_box(
                    key.seal_in_place_separate_tag(nonce, Aad::empty(), &mut buf)
                        .expect("seal"),
                )
            })
        });
        let mut sealed_raw = pkt.clone();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut sealed_raw,
            )
            .expect("seal");
        sealed_raw.extend_from_slice(tag.as_ref());
        group.bench_with_input(BenchmarkId::new("open", size), &size, |bench, _| {
            bench.iter_batched_ref(
                || sealed_raw.clone(),
                |ct| {
                    let nonce = Nonce::assume_unique_for_key([0; 12]);
                    black_box(
                        key.open_in_place(nonce, Aad::empty(), ct)
                            .expect("open")
                            .len(),
                    )
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Bytes a packet costs on the wire, measured from a real encapsulation.
fn wire_overhead() -> usize {
    let mut p = pair();
    let pkt = packet(512);
    let mut out = Outbox::default();
    p.a.handle_device_packet(Instant::now(), &pkt, &mut out);
    let datagram = out
        .network()
        .next()
        .map(|(_, d)| d.len())
        .expect("datagram");
    datagram - pkt.len()
}

fn mean_ns(function: &str, size: usize) -> Option<f64> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let path = target
        .join("criterion")
        .join(GROUP)
        .join(function)
        .join(size.to_string())
        .join("new/estimates.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn report() {
    let wg = wire_overhead();
    println!(
        "\nBytes on the wire per packet: WireGuard {wg} + UDP 8 + IPv4 20 = {} (IPv6 underlay: {})",
        wg + 28,
        wg + 48
    );
    println!(
        "\n{:>6}  {:>9}  {:>9}  {:>9}  {:>9}  {:>10}  {:>10}",
        "size", "encap ns", "seal ns", "decap ns", "open ns", "encap/seal", "decap/open"
    );
    for size in SIZES {
        let [encap, seal, decap, open] =
            ["encap", "seal", "decap", "open"].map(|f| mean_ns(f, size));
        let (Some(encap), Some(seal), Some(decap), Some(open)) = (encap, seal, decap, open) else {
            println!("{size:>6}  (no estimates: run with `cargo bench --bench encap`)");
            continue;
        };
        println!(
            "{size:>6}  {encap:>9.0}  {seal:>9.0}  {decap:>9.0}  {open:>9.0}  {:>10.2}  {:>10.2}",
            encap / seal,
            decap / open
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    per_packet(&mut c);
    c.final_summary();
    // Under `cargo test` criterion runs each benchmark once as a check;
    // estimates only exist after a real `cargo bench`.
    if std::env::args().any(|a| a == "--bench") {
        report();
    }
}
