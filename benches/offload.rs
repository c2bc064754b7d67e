//! What splitting device reads and coalescing device writes cost per
//! super-packet, beside tun-rs's copying split that meshd used before:
//! `cargo bench --bench offload`.
//!
//! split: one 64 KiB TCP super-packet (45 segments of 1448 bytes) cut into
//! segments with complete checksums, in place by the core's `split`, or
//! copied out segment by segment by `tun_rs::gso_split`. coalesce:
//! planning one write for the 45 segments.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput};
use etherparse::PacketBuilder;
use meshnet::core::checksum;
use meshnet::core::coalesce::Coalescer;
use meshnet::core::split::Segments;
use meshnet::core::virtio;

const SEGMENTS: usize = 45;
const MSS: usize = 1448;

/// A flow's segments as the receiving agent opens them.
fn segments() -> Vec<Vec<u8>> {
    (0..SEGMENTS)
        .map(|i| {
            let payload: Vec<u8> = (0..MSS).map(|k| (k * 31 + i) as u8).collect();
            let builder = PacketBuilder::ipv4([10, 42, 1, 5], [10, 42, 2, 9], 64)
                .tcp(40000, 5201, 1_000 + (i * MSS) as u32, 500)
                .ack(7);
            let mut packet = Vec::new();
            builder.write(&mut packet, &payload).unwrap();
            // Consecutive IP IDs, as a sender's kernel gives them.
            packet[4..6].copy_from_slice(&(100 + i as u16).to_be_bytes());
            packet[10..12].fill(0);
            let c = checksum::finish(checksum::sum(&packet[..20], 0));
            packet[10..12].copy_from_slice(&c.to_be_bytes());
            packet
        })
        .collect()
}

/// The flow as one read from a device with offload: virtio header, headers,
/// payloads.
fn super_packet(packets: &[&[u8]]) -> Vec<u8> {
    let coalescer = Coalescer {
        link_header: 0,
        udp: false,
    };
    let plan = coalescer.plan(packets);
    assert_eq!(plan.count, SEGMENTS, "the flow must coalesce whole");
    let mut read = plan.prefix().to_vec();
    for packet in packets {
        read.extend_from_slice(&packet[plan.skip..]);
    }
    read
}

fn offload(c: &mut Criterion) {
    let owned = segments();
    let packets: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
    let read = super_packet(&packets);
    let bytes = (SEGMENTS * MSS) as u64;

    let mut group = c.benchmark_group("split");
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("in_place", |b| {
        b.iter_batched_ref(
            || read.clone(),
            |read| {
                let mut segments = Segments::parse(read, 0).unwrap();
                let mut total = 0;
                while let Some(segment) = segments.next(read) {
                    total += black_box(segment).len();
                }
                total
            },
            BatchSize::SmallInput,
        )
    });
    let mut out = vec![vec![0u8; 2048]; SEGMENTS];
    let mut sizes = vec![0usize; SEGMENTS];
    group.bench_function("tun_rs_copy", |b| {
        b.iter_batched_ref(
            || read.clone(),
            |read| {
                let (header, packet) = read.split_at_mut(virtio::HEADER_LEN);
                let hdr = tun_rs::VirtioNetHdr::decode(header).unwrap();
                let n = tun_rs::gso_split(packet, hdr, &mut out, &mut sizes, 0, false).unwrap();
                black_box(&out);
                n
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("coalesce");
    group.throughput(Throughput::Bytes(bytes));
    let coalescer = Coalescer {
        link_header: 0,
        udp: false,
    };
    group.bench_function("plan", |b| {
        b.iter(|| coalescer.plan(black_box(&packets)).count)
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    offload(&mut c);
    c.final_summary();
}
