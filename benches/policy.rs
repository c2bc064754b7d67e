//! What the policy costs a packet, beside what sealing it costs:
//! `cargo bench --bench policy`.
//!
//! check/established: one packet of a tracked flow through the enforcer
//! (classify, conntrack lookup, version check) under a policy of 50 rules
//! and 4,000 labelled addresses. check/new_flow: the first packet of a new
//! flow decided through every tier (the worst case: no rule matches).
//! seal/1420: ring's ChaCha20-Poly1305 on a 1420-byte packet, the work the
//! check must stay far below. The ratios are printed after the runs.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use etherparse::PacketBuilder;
use meshnet::dns::HostRecords;
use meshnet::dns::records::ContainerRecord;
use meshnet::policy::conntrack::Rules;
use meshnet::policy::enforcer::{Direction, Enforcer};
use meshnet::policy::{Action, Identities, Policy, Rule, Selector};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

/// 40 hosts x 100 containers, stacks s0..s9.
fn identities() -> Identities {
    let hosts: Vec<HostRecords> = (0..40u8)
        .map(|h| HostRecords {
            host: format!("h{h}"),
            address: Ipv4Addr::new(10, 42, h, 1),
            containers: (0..100u8)
                .map(|c| ContainerRecord {
                    name: format!("c{c}"),
                    stack: format!("s{}", c % 10),
                    service: Some(format!("svc{}", c % 5)),
                    address: Ipv4Addr::new(10, 42, h, c + 2),
                    ports: Vec::new(),
                })
                .collect(),
        })
        .collect();
    Identities::build(&hosts)
}

fn rules() -> Arc<Rules> {
    let stack = |s: String| Selector {
        stack: Some(s),
        service: None,
        tenant: None,
    };
    let rules = (0..50)
        .map(|i| Rule {
            name: format!("r{i}"),
            from: stack(format!("s{}", i % 10)),
            to: stack(format!("x{i}")),
            ports: vec!["5432/tcp".parse().unwrap()],
            action: Action::Allow,
        })
        .collect();
    Arc::new(Rules {
        policy: Policy {
            default: Action::Deny,
            rules,
            ..Policy::default()
        },
        identities: identities(),
        version: 1,
    })
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .tcp(sport, 5432, 1, 65535)
        .write(&mut v, &vec![0u8; payload])
        .unwrap();
    v
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let mut group = c.benchmark_group("policy");

    // An established flow: allowed by `within`-free default allow on a
    // rule set that can deny, so the enforcer really tracks it.
    let mut allowing = (*rules()).clone();
    allowing.policy.default = Action::Allow;
    let mut enforcer = Enforcer::new(Arc::new(allowing));
    let packet = tcp([10, 42, 1, 2], [10, 42, 2, 2], 40000, 1380);
    let now = Instant::now();
    assert_eq!(
        enforcer.check(now, Direction::Egress, &packet).action,
        Action::Allow
    );
    group.bench_function("check/established", |b| {
        b.iter(|| black_box(enforcer.check(now, Direction::Egress, black_box(&packet))))
    });

    let denying = rules();
    let first = tcp([10, 42, 1, 2], [10, 42, 2, 3], 40000, 0);
    group.bench_function("check/new_flow", |b| {
        b.iter(|| {
            black_box(denying.decide(&black_box(
                meshnet::policy::conntrack::classify(&first).unwrap().flow,
            )))
        })
    });

    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]).unwrap());
    let mut buffer = vec![0u8; 1420];
    group.bench_function("seal/1420", |b| {
        b.iter(|| {
            let nonce = Nonce::assume_unique_for_key([0; 12]);
            black_box(
                key.seal_in_place_separate_tag(nonce, Aad::empty(), black_box(&mut buffer))
                    .unwrap(),
            )
        })
    });
    group.finish();
    c.final_summary();
    print_ratios();
}

/// Reads criterion's estimates back and prints check : seal.
fn print_ratios() {
    let read = |id: &str| -> Option<f64> {
        let path = format!("target/criterion/policy/{id}/new/estimates.json");
        let text = std::fs::read_to_string(path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["mean"]["point_estimate"].as_f64()
    };
    let (Some(est), Some(new), Some(seal)) = (
        read("check_established"),
        read("check_new_flow"),
        read("seal_1420"),
    ) else {
        println!("(ratios unavailable: criterion estimates not found)");
        return;
    };
    println!("\npolicy cost per packet, beside sealing 1420 bytes ({seal:.0} ns):");
    println!(
        "  established flow: {est:.1} ns ({:.1} % of a seal)",
        est / seal * 100.0
    );
    println!(
        "  new flow, every tier: {new:.1} ns ({:.1} % of a seal)",
        new / seal * 100.0
    );
}
