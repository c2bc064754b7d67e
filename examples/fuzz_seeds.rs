//! Seeds the fuzz corpora (`fuzz/corpus/<target>/`) from real traffic: a
//! two-host TAP mesh in namespaces with containers that ping, resolve
//! names and talk across hosts, captured with tcpdump on the underlay and
//! on the agent's TAP device; plus the agents' real configs, control
//! requests, status and records. Run as root:
//! `cargo run --example fuzz_seeds` (tcpdump, dig and ping installed).
//! Existing seeds are kept; new ones are named by a hash of their bytes.
//! `cargo run --example fuzz_seeds -- --derived` captures nothing: it only
//! derives the seeds built from other targets' committed seeds (device
//! reads for `split`, from the writes the `coalesce` batches plan).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshnet::config::Mode;
use meshnet::control::{AttachRequest, Request};
use meshnet::core::PeerState;
use meshnet::core::coalesce::Coalescer;
use meshnet::dns::sync::{Message, Stamp, encode_snapshot};
use meshnet::dns::{ContainerRecord, HostRecords};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, exec_in, pcap_packets, wait_until};

const ETHERNET: usize = 14;
/// Seeds kept per target: enough shapes, small enough to replay in a test.
const MAX_SEEDS: usize = 48;

fn main() -> Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    if std::env::args().any(|a| a == "--derived") {
        return save_derived(&corpus);
    }
    let bins = Binaries::beside_current_exe()?;
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new("seeds", &options, bins)?;
    bed.start_all()?;
    ensure!(
        wait_until(Duration::from_secs(15), || (0..2).all(|i| bed
            .peers(i)
            .is_ok_and(|p| p.iter().all(|p| p.state == PeerState::Up)))),
        "mesh did not come up"
    );
    let c1 = bed.add_container_ns(0, "c1")?;
    let c2 = bed.add_container_ns(1, "c2")?;
    let underlay = bed.capture(&bed.hosts[0].ns, "ul0", "udp port 51820")?;
    let tap = bed.capture(&bed.hosts[0].ns, "mesh0", "")?;
    let bridge = bed.capture(&bed.hosts[0].ns, "mesh-br0", "udp port 53")?;
    let web = [
        "--stack",
        "shop",
        "--service",
        "web",
        "--port",
        "http:8080/tcp",
    ];
    bed.attach(0, &c1, "web1", &web)?;
    bed.attach(1, &c2, "db", &["--stack", "shop"])?;
    std::thread::sleep(Duration::from_millis(500));
    traffic(&c1)?;
    let frames: Vec<Vec<u8>> = pcap_packets(&tap.finish()?)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let dns_frames: Vec<Vec<u8>> = pcap_packets(&bridge.finish()?)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let datagrams: Vec<Vec<u8>> = pcap_packets(&underlay.finish()?)
        .into_iter()
        .filter_map(udp_payload_of_frame)
        .collect();

    let packets: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| f.get(12..14) == Some(&[0x08, 0x00]))
        .map(|f| f[ETHERNET..].to_vec())
        .collect();
    save(&corpus, "tap_frame", frames.clone())?;
    save(&corpus, "tun_packet", packets.clone())?;
    save(&corpus, "coalesce", coalesce_seeds(&packets, &frames))?;
    save_derived(&corpus)?;
    let mut datagram_seeds: Vec<Vec<u8>> = datagrams.iter().map(|d| prefixed(0, d)).collect();
    datagram_seeds.extend(packets.iter().map(|p| prefixed(1, p)));
    save(&corpus, "datagram", datagram_seeds)?;
    let queries: Vec<Vec<u8>> = packets.iter().filter_map(|p| udp_payload(p, 53)).collect();
    save(
        &corpus,
        "dns_answer",
        queries.iter().map(|q| prefixed(0, q)).collect(),
    )?;
    let arp = frames
        .iter()
        .filter(|f| f.get(12..14) == Some(&[0x08, 0x06]))
        .map(|f| [&f[6..12], &f[ETHERNET..]].concat());
    save(&corpus, "arp", arp.collect())?;
    let answers: Vec<Vec<u8>> = dns_frames
        .iter()
        .filter_map(|f| udp_payload_from(f.get(ETHERNET..)?, 53))
        .collect();
    save(&corpus, "forwarder", forwarder_seeds(&queries, &answers))?;
    save(&corpus, "records_sync", sync_seeds(&bed)?)?;
    save(&corpus, "config", config_seeds(&bed)?)?;
    save(&corpus, "control", control_seeds(&c1))?;
    save(&corpus, "uapi", uapi_seeds(&bed)?)?;
    println!("seeds written under {}", corpus.display());
    Ok(())
}

/// What containers do: ping across hosts and the agent, resolve names of
/// every kind, open a TCP connection across the mesh.
fn traffic(c1: &str) -> Result<()> {
    let run = |args: &[&str]| exec_in(c1, args).map(|_| ());
    run(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.42.2.2"])?;
    run(&["ping", "-c", "1", "-W", "1", "169.254.169.250"])?;
    for query in [
        vec!["db.shop.mesh.internal"],
        vec!["web.shop.mesh.internal"],
        vec!["-t", "SRV", "_http._tcp.web.shop.mesh.internal"],
        vec!["-x", "10.42.2.2"],
        vec!["nope.shop.mesh.internal"],
        vec!["-t", "AAAA", "db.shop.mesh.internal"],
        vec!["+tcp", "db.shop.mesh.internal"],
        vec!["-t", "ANY", "h2.hosts.mesh.internal"],
    ] {
        let mut args = vec!["dig", "@169.254.169.250", "+time=1", "+tries=1"];
        args.extend(query);
        run(&args)?;
    }
    run(&["bash", "-c", "echo hello > /dev/tcp/10.42.2.2/9 || true"])?;
    Ok(())
}

/// The seeds built from other targets' seeds on disk.
fn save_derived(corpus: &Path) -> Result<()> {
    let mut batches = Vec::new();
    for entry in std::fs::read_dir(corpus.join("coalesce"))? {
        batches.push(std::fs::read(entry?.path())?);
    }
    batches.sort();
    save(corpus, "split", split_seeds(&batches))
}

/// Device reads for the splitting target (link flag, then the read): what
/// the kernel would hand over for each write the coalescing of `batches`
/// (coalesce seeds) plans, super-packets and single packets alike.
fn split_seeds(batches: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut super_packets = Vec::new();
    let mut singles = Vec::new();
    for batch in batches {
        let Some((&flags, mut rest)) = batch.split_first() else {
            continue;
        };
        let mut packets = Vec::new();
        while let Some((len, tail)) = rest.split_first_chunk::<2>() {
            let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
            packets.push(&tail[..len]);
            rest = &tail[len..];
        }
        let coalescer = Coalescer {
            link_header: if flags & 1 != 0 { ETHERNET } else { 0 },
            udp: flags & 2 != 0,
        };
        let mut at = 0;
        while at < packets.len() {
            let plan = coalescer.plan(&packets[at..]);
            let mut seed = vec![flags & 1];
            seed.extend_from_slice(plan.prefix());
            for packet in &packets[at..at + plan.count] {
                seed.extend_from_slice(&packet[plan.skip..]);
            }
            at += plan.count;
            if plan.count > 1 {
                super_packets.push(seed);
            } else {
                singles.push(seed);
            }
        }
    }
    // Every super-packet first: they are the few shapes that matter most.
    super_packets.extend(singles.into_iter().take(16));
    super_packets
}

/// Batches for the coalescing target (flags byte, then each packet behind
/// its length): runs of consecutive captured packets as they are, TUN and
/// TAP, and a captured TCP segment repeated as its flow's next segments
/// would come (sequence number and IP ID counting on, ACK only), the shape
/// coalescing merges.
fn coalesce_seeds(packets: &[Vec<u8>], frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let batch = |flags: u8, run: &[Vec<u8>]| {
        let mut seed = vec![flags];
        for packet in run {
            seed.extend_from_slice(&(packet.len() as u16).to_be_bytes());
            seed.extend_from_slice(packet);
        }
        seed
    };
    let mut seeds: Vec<Vec<u8>> = packets.chunks(6).map(|run| batch(0, run)).collect();
    seeds.extend(frames.chunks(6).map(|run| batch(1, run)));
    let segments = packets
        .iter()
        .filter_map(|p| tcp_payload_len(p).map(|n| (p, n)));
    for (i, (packet, payload)) in segments.take(8).enumerate() {
        let run: Vec<Vec<u8>> = (0..5u16)
            .map(|k| {
                let mut next = packet.clone();
                let ihl = usize::from(next[0] & 0x0f) * 4;
                let id = u16::from_be_bytes([next[4], next[5]]).wrapping_add(k);
                next[4..6].copy_from_slice(&id.to_be_bytes());
                let seq = &mut next[ihl + 4..ihl + 8];
                let at = u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]);
                let at = at.wrapping_add(payload * u32::from(k));
                seq.copy_from_slice(&at.to_be_bytes());
                next[ihl + 13] = 0x10;
                next
            })
            .collect();
        seeds.push(batch(if i % 2 == 0 { 0 } else { 2 }, &run));
    }
    seeds
}

/// The payload length of an IPv4 TCP packet that carries one.
fn tcp_payload_len(packet: &[u8]) -> Option<u32> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let header = ihl + usize::from(packet.get(ihl + 12)? >> 4) * 4;
    let is_tcp = packet[0] >> 4 == 4 && packet.get(9) == Some(&6);
    let payload = packet.len().checked_sub(header)?;
    (is_tcp && payload > 0).then_some(payload as u32)
}

fn prefixed(first: u8, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    v.extend_from_slice(rest);
    v
}

/// The UDP payload of an Ethernet + IPv4 + UDP frame.
fn udp_payload_of_frame(frame: &[u8]) -> Option<Vec<u8>> {
    udp_payload(frame.get(ETHERNET..)?, 0)
}

/// The UDP payload of an IPv4 packet, if to `port` (any port for 0).
fn udp_payload(packet: &[u8], port: u16) -> Option<Vec<u8>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if *packet.get(9)? != 17 {
        return None;
    }
    let udp = packet.get(ihl..)?;
    let to = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    (port == 0 || to == port).then(|| udp.get(8..).map(<[u8]>::to_vec))?
}

/// The UDP payload of an IPv4 packet from `port`.
fn udp_payload_from(packet: &[u8], port: u16) -> Option<Vec<u8>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let udp = packet.get(ihl..)?;
    let from = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    (*packet.get(9)? == 17 && from == port).then(|| udp.get(8..).map(<[u8]>::to_vec))?
}

/// Each query with the answer that carried its id, as the forwarder saw
/// them: the upstream id (here the answer's), the query's length, the
/// query, the answer.
fn forwarder_seeds(queries: &[Vec<u8>], answers: &[Vec<u8>]) -> Vec<Vec<u8>> {
    queries
        .iter()
        .filter_map(|q| {
            let answer = answers.iter().find(|a| a.get(..2) == q.get(..2))?;
            let len = u16::try_from(q.len()).ok()?;
            Some([&answer[..2], &len.to_be_bytes()[..], q, answer].concat())
        })
        .collect()
}

fn sync_seeds(bed: &Testbed) -> Result<Vec<Vec<u8>>> {
    let containers: Vec<ContainerRecord> = bed
        .containers(1)?
        .into_iter()
        .map(|c| ContainerRecord {
            name: c.name,
            stack: c.stack,
            service: c.service,
            address: c.address,
            ports: c.ports,
        })
        .collect();
    let records = HostRecords {
        host: "h2".into(),
        address: Ipv4Addr::new(10, 42, 2, 1),
        containers,
    };
    let stamp = Stamp {
        epoch: 1_700_000_000_000,
        version: 3,
    };
    let parts = encode_snapshot(stamp, &records.containers);
    let beat = serde_json::to_vec(&Message::Heartbeat { stamp })?;
    let request = serde_json::to_vec(&Message::Request)?;
    let mut session = Vec::new();
    for line in [beat.clone(), parts.concat(), request.clone()] {
        session.extend(line);
        session.push(b'\n');
    }
    let mut seeds: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
    seeds.extend([beat, request, session]);
    Ok(seeds)
}

fn config_seeds(bed: &Testbed) -> Result<Vec<Vec<u8>>> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/meshd.toml");
    let mut seeds = vec![std::fs::read(example)?];
    for host in &bed.hosts {
        seeds.push(std::fs::read(&host.config)?);
    }
    Ok(seeds)
}

fn control_seeds(netns: &str) -> Vec<Vec<u8>> {
    let attach = AttachRequest {
        netns: netns.into(),
        name: "web1".into(),
        stack: Some("shop".into()),
        service: Some("web".into()),
        ip: Some(Ipv4Addr::new(10, 42, 1, 9)),
        ports: vec!["http:8080/tcp".into()],
    };
    [
        Request::Peers,
        Request::Status,
        Request::Containers,
        Request::Dns,
        Request::Attach(attach),
        Request::Detach {
            netns: netns.into(),
        },
    ]
    .iter()
    .filter_map(|r| serde_json::to_vec(r).ok())
    .collect()
}

fn uapi_seeds(bed: &Testbed) -> Result<Vec<Vec<u8>>> {
    let status = serde_json::to_vec(&bed.status(0)?)?;
    let peers = serde_json::to_vec(&bed.peers(0)?)?;
    Ok(["get=1", "set=1", "get=2"]
        .iter()
        .map(|request| [request.as_bytes(), b"\n", &status, b"\n", &peers].concat())
        .collect())
}

/// Writes each distinct seed as `fuzz/corpus/<target>/<hash>`, at most
/// `MAX_SEEDS` new ones per target.
fn save(corpus: &Path, target: &str, seeds: Vec<Vec<u8>>) -> Result<()> {
    let dir: PathBuf = corpus.join(target);
    std::fs::create_dir_all(&dir)?;
    let mut written = 0;
    for seed in seeds.into_iter().filter(|s| !s.is_empty()) {
        let path = dir.join(format!("{:016x}", fnv1a(&seed)));
        if written == MAX_SEEDS || path.exists() {
            continue;
        }
        std::fs::write(&path, &seed).with_context(|| path.display().to_string())?;
        written += 1;
    }
    println!("{target}: {written} new seeds");
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
