//! meshd against implementations nobody here wrote: wireguard-go from
//! Debian, and GotaTun and boringtun-cli, configured with `wg` and `ip`.
//! Plus preshared keys, cluster keys, and `wg show` against meshd's UAPI
//! socket.
//!
//! Needs root, iproute2, ping, wireguard-go, wireguard-tools, socat, and
//! gotatun and boringtun-cli (scripts/peers.sh); fails (never skips)
//! without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshnet::core::{PeerState, PeerStatus};
use meshnet::keys::PresharedKey;
use meshnet_testbed::{
    Binaries, MeshOptions, Testbed, WireguardGo, exec_in, unique_name, wait_until,
};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

const MESHD: usize = 0;
const WG: usize = 1;
const MESHD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 1);
const WG_ADDR: Ipv4Addr = Ipv4Addr::new(10, 42, 2, 1);

/// h1 runs meshd, h2 runs wireguard-go. Who knows whose endpoint decides
/// who can initiate.
struct Pair {
    bed: Testbed,
    _wg: WireguardGo,
    device: String,
}

#[derive(Default)]
struct PairOptions<'a> {
    meshd_knows_endpoint: bool,
    wg_knows_endpoint: bool,
    meshd_psk: Option<&'a PresharedKey>,
    wg_psk: Option<&'a PresharedKey>,
    /// The peer on h2 when it is not wireguard-go: a Rust peer installed
    /// with cargo (`gotatun`, `boringtun-cli`).
    rust_peer: Option<&'a str>,
}

fn pair(tag: &str, o: PairOptions) -> Pair {
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new(tag, &options, bins()).unwrap();
    let device = unique_name("mx");
    bed.prepend_config(MESHD, &format!("device = \"{device}\""))
        .unwrap();
    if !o.meshd_knows_endpoint {
        let config = std::fs::read_to_string(&bed.hosts[MESHD].config).unwrap();
        let without: String = config
            .lines()
            .filter(|l| !l.starts_with("endpoint"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&bed.hosts[MESHD].config, without).unwrap();
    }
    if let Some(psk) = o.meshd_psk {
        bed.write_secret("meshd.psk", &psk.to_base64()).unwrap();
        bed.append_config(MESHD, "preshared_key_file = \"meshd.psk\"")
            .unwrap();
    }

    let (ns, name) = (&bed.hosts[WG].ns, unique_name("wg"));
    let wg = match o.rust_peer {
        Some(binary) => WireguardGo::start_rust_peer(ns, &name, binary),
        None => WireguardGo::start(ns, &name),
    }
    .unwrap();
    let psk = o
        .wg_psk
        .map(|psk| bed.write_secret("wg.psk", &psk.to_base64()).unwrap());
    wg.configure(&bed, WG, MESHD, o.wg_knows_endpoint, psk.as_deref())
        .unwrap();
    bed.start(MESHD).unwrap();
    Pair {
        bed,
        _wg: wg,
        device,
    }
}

fn ping(bed: &Testbed, from: usize, to: Ipv4Addr, count: u32) -> bool {
    bed.ping(from, to, count).unwrap()
}

fn wg_peer(p: &Pair) -> PeerStatus {
    p.bed.peers(MESHD).unwrap().remove(0)
}

/// Sends 2 MiB of random bytes over TCP from `from` to `to` (socat) and
/// checks they arrive intact.
fn transfer(bed: &Testbed, from: usize, to: usize, to_addr: Ipv4Addr) {
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sent = bed.dir().join(format!("sent-{from}"));
    let received = bed.dir().join(format!("received-{to}"));
    std::fs::write(&sent, &data).unwrap();
    let listen = format!("OPEN:{},creat,trunc", received.display());
    let mut server = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.hosts[to].ns,
            "socat",
            "-u",
            "TCP-LISTEN:5001,reuseaddr",
            &listen,
        ])
        .spawn()
        .expect("socat (apt-get install socat)");
    std::thread::sleep(Duration::from_millis(300));
    let source = format!("OPEN:{}", sent.display());
    let target = format!("TCP:{to_addr}:5001");
    let client = exec_in(
        &bed.hosts[from].ns,
        &["timeout", "20", "socat", "-u", &source, &target],
    )
    .unwrap();
    let done = wait_until(Duration::from_secs(20), || {
        server.try_wait().ok().flatten().is_some()
    });
    if !done {
        let _ = server.kill();
    }
    assert!(
        client.status.success() && done,
        "transfer failed: {client:?}"
    );
    let got = std::fs::read(&received).unwrap();
    assert_eq!(got.len(), data.len(), "transfer truncated");
    assert!(got == data, "transfer corrupted");
}

#[test]
fn meshd_initiates_to_wireguard_go_and_traffic_flows_both_ways() {
    let p = pair(
        "wgmi",
        PairOptions {
            meshd_knows_endpoint: true,
            ..Default::default()
        },
    );
    assert!(
        wait_until(Duration::from_secs(10), || wg_peer(&p).state
            == PeerState::Up),
        "{:?}\n{}",
        wg_peer(&p),
        p.bed.log(MESHD)
    );
    assert!(ping(&p.bed, MESHD, WG_ADDR, 3));
    assert!(ping(&p.bed, WG, MESHD_ADDR, 3));
    transfer(&p.bed, MESHD, WG, WG_ADDR);
    transfer(&p.bed, WG, MESHD, MESHD_ADDR);
}

#[test]
fn wireguard_go_initiates_to_meshd_which_learns_its_endpoint() {
    let p = pair(
        "wggi",
        PairOptions {
            wg_knows_endpoint: true,
            ..Default::default()
        },
    );
    assert_eq!(wg_peer(&p).endpoint, None);
    assert!(
        !ping(&p.bed, MESHD, WG_ADDR, 1),
        "meshd cannot know where wireguard-go is yet"
    );
    assert!(
        ping(&p.bed, WG, MESHD_ADDR, 3),
        "wireguard-go's handshake was not answered:\n{}",
        p.bed.log(MESHD)
    );
    assert_eq!(
        wg_peer(&p).endpoint.map(|e| e.ip()),
        Some(Ipv4Addr::new(192, 0, 2, 2).into())
    );
    assert!(ping(&p.bed, MESHD, WG_ADDR, 3));
    transfer(&p.bed, WG, MESHD, MESHD_ADDR);
    transfer(&p.bed, MESHD, WG, WG_ADDR);
}

/// meshd with one of the Rust peers of the field, GotaTun or boringtun's
/// own CLI, configured with `wg set` like wireguard-go. meshd pads what it
/// seals to 16 bytes and boringtun-cli does not pad at all: pings of sizes
/// that need padding, and one at the MTU, go both ways, and a TCP transfer
/// each way arrives intact.
fn a_rust_peer_is_a_peer_like_any_other(binary: &str, tag: &str) {
    let p = pair(
        tag,
        PairOptions {
            meshd_knows_endpoint: true,
            wg_knows_endpoint: true,
            rust_peer: Some(binary),
            ..Default::default()
        },
    );
    assert!(
        wait_until(Duration::from_secs(10), || ping(&p.bed, MESHD, WG_ADDR, 1)),
        "no tunnel to {binary}: {:?}\n{}",
        wg_peer(&p),
        p.bed.log(MESHD)
    );
    // ICMP payloads of 1, 13, 100 and 1001 bytes make IP packets of 29, 41,
    // 128 and 1029 bytes; 1392 makes one of exactly the MTU, 1420.
    for size in [1, 13, 100, 1001, 1392] {
        for (from, to) in [(MESHD, WG_ADDR), (WG, MESHD_ADDR)] {
            let (size, to) = (size.to_string(), to.to_string());
            let ping = ["ping", "-c2", "-i0.2", "-W1", "-q", "-s", &size, &to];
            let out = exec_in(&p.bed.hosts[from].ns, &ping).unwrap();
            assert!(
                out.status.success(),
                "{binary}: ping of {size} bytes from host {from} failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    transfer(&p.bed, MESHD, WG, WG_ADDR);
    transfer(&p.bed, WG, MESHD, MESHD_ADDR);
    let peer = wg_peer(&p);
    assert_eq!(peer.state, PeerState::Up, "{binary}: {peer:?}");
    assert_eq!(peer.dropped, 0, "{binary}: {peer:?}");
}

#[test]
fn gotatun_is_a_peer_like_any_other() {
    a_rust_peer_is_a_peer_like_any_other("gotatun", "gota");
}

#[test]
fn boringtun_cli_is_a_peer_like_any_other() {
    a_rust_peer_is_a_peer_like_any_other("boringtun-cli", "btcli");
}

#[test]
fn matching_preshared_keys_work_with_wireguard_go() {
    let psk = PresharedKey::generate().unwrap();
    let both = PairOptions {
        meshd_knows_endpoint: true,
        wg_knows_endpoint: true,
        meshd_psk: Some(&psk),
        wg_psk: Some(&psk),
        ..Default::default()
    };
    let p = pair("pskok", both);
    assert!(ping(&p.bed, MESHD, WG_ADDR, 3));
    assert!(ping(&p.bed, WG, MESHD_ADDR, 3));
    assert!(wg_peer(&p).has_preshared_key);
}

#[test]
fn differing_preshared_keys_fail_cleanly_and_meshctl_says_why() {
    let (a, b) = (
        PresharedKey::generate().unwrap(),
        PresharedKey::generate().unwrap(),
    );
    let p = pair(
        "pskbad",
        PairOptions {
            meshd_knows_endpoint: true,
            wg_knows_endpoint: true,
            meshd_psk: Some(&a),
            wg_psk: Some(&b),
            ..Default::default()
        },
    );
    assert!(!ping(&p.bed, MESHD, WG_ADDR, 2));
    assert!(!ping(&p.bed, WG, MESHD_ADDR, 2));
    let peer = wg_peer(&p);
    assert_ne!(peer.state, PeerState::Up);
    assert!(
        peer.reason
            .as_deref()
            .is_some_and(|r| r.contains("preshared")),
        "{peer:?}"
    );
    let text = String::from_utf8(p.bed.meshctl(MESHD, &["peers"]).unwrap().stdout).unwrap();
    assert!(
        text.contains("not up because:") && text.contains("preshared"),
        "{text}"
    );
}

#[test]
fn wg_show_reads_meshd_and_agrees_with_meshctl() {
    let p = pair(
        "wgshow",
        PairOptions {
            meshd_knows_endpoint: true,
            ..Default::default()
        },
    );
    assert!(ping(&p.bed, MESHD, WG_ADDR, 2));
    let show = exec_in(&p.bed.hosts[MESHD].ns, &["wg", "show", &p.device]).unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{show:?}");
    let peer = wg_peer(&p);
    assert!(
        text.contains(&format!("interface: {}", p.device))
            && text.contains("listening port: 51820"),
        "{text}"
    );
    assert!(
        text.contains(&format!("peer: {}", peer.public_key))
            && text.contains("allowed ips: 10.42.2.0/24"),
        "{text}"
    );

    let dump = exec_in(&p.bed.hosts[MESHD].ns, &["wg", "show", &p.device, "dump"]).unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    let ours = String::from_utf8(
        p.bed
            .meshctl(MESHD, &["peers", "--format", "dump"])
            .unwrap()
            .stdout,
    )
    .unwrap();
    let json = wg_peer(&p);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (source, text) in [("wg show dump", &dump), ("meshctl --format dump", &ours)] {
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(lines.len(), 2, "{source}: {text}");
        assert_eq!(lines[0][2], "51820", "{source}");
        let f = &lines[1];
        assert_eq!(f.len(), 8, "{source}: {text}");
        assert_eq!(f[0], json.public_key.to_string(), "{source}");
        assert_eq!(f[2], json.endpoint.unwrap().to_string(), "{source}");
        assert_eq!(f[3], json.subnet.to_string(), "{source}");
        let latest: u64 = f[4].parse().unwrap();
        let expected = now - json.last_handshake_secs_ago.unwrap();
        assert!(
            latest.abs_diff(expected) <= 2,
            "{source}: handshake {latest} vs {expected}"
        );
        assert_eq!(f[5].parse::<u64>().unwrap(), json.rx_bytes, "{source}: rx");
        assert_eq!(f[6].parse::<u64>().unwrap(), json.tx_bytes, "{source}: tx");
        assert_eq!(f[7], "off", "{source}");
    }
    assert!(
        !dump.contains(&p.bed.hosts[MESHD].key.to_base64()),
        "the private key left through UAPI"
    );
}

#[test]
fn rekeying_keeps_the_tunnel_alive_past_two_minutes_of_traffic() {
    let p = pair(
        "rekey",
        PairOptions {
            meshd_knows_endpoint: true,
            wg_knows_endpoint: true,
            ..Default::default()
        },
    );
    assert!(ping(&p.bed, MESHD, WG_ADDR, 2));
    let first = wg_peer(&p).last_handshake_secs_ago.unwrap();
    // 150 s of pings, one every half second: past REKEY_AFTER_TIME (120 s).
    let out = exec_in(
        &p.bed.hosts[MESHD].ns,
        &[
            "ping",
            "-q",
            "-i",
            "0.5",
            "-c",
            "300",
            "-W",
            "1",
            &WG_ADDR.to_string(),
        ],
    )
    .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let lost: u32 = summary
        .split(',')
        .find(|s| s.contains("received"))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .map_or(300, |received| 300 - received);
    assert!(
        lost <= 2,
        "lost {lost} of 300 pings across the rekey:\n{summary}"
    );
    let peer = wg_peer(&p);
    assert!(
        peer.last_handshake_secs_ago.unwrap() < 120 + first,
        "no new handshake in 150 s: {peer:?}"
    );
    assert!(
        peer.last_handshake_secs_ago.unwrap() < 60,
        "the last handshake is old: {peer:?}"
    );
    assert_eq!(peer.state, PeerState::Up);
}

#[test]
fn clusters_with_different_keys_never_connect_unless_a_peer_key_overrides() {
    let options = MeshOptions {
        hosts: 3,
        keepalive: None,
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("cluster", &options, bins()).unwrap();
    let (a, b, pair_key) = (
        PresharedKey::generate().unwrap(),
        PresharedKey::generate().unwrap(),
        PresharedKey::generate().unwrap(),
    );
    bed.write_secret("a.psk", &a.to_base64()).unwrap();
    bed.write_secret("b.psk", &b.to_base64()).unwrap();
    bed.write_secret("pair.psk", &pair_key.to_base64()).unwrap();
    // h1 and h2 are cluster A, h3 is cluster B; h1 and h3 also share a key
    // of their own (h3 is h1's last peer and h1 is h3's last... first peer).
    bed.prepend_config(0, "cluster_psk_file = \"a.psk\"")
        .unwrap();
    bed.prepend_config(1, "cluster_psk_file = \"a.psk\"")
        .unwrap();
    bed.prepend_config(2, "cluster_psk_file = \"b.psk\"")
        .unwrap();
    bed.append_config(0, "preshared_key_file = \"pair.psk\"")
        .unwrap();
    let h3 = std::fs::read_to_string(&bed.hosts[2].config).unwrap();
    let h3 = h3.replacen(
        "subnet = \"10.42.1.0/24\"\n",
        "subnet = \"10.42.1.0/24\"\npreshared_key_file = \"pair.psk\"\n",
        1,
    );
    std::fs::write(&bed.hosts[2].config, h3).unwrap();
    bed.start_all().unwrap();

    let state = |i: usize, name: &str| {
        bed.peers(i)
            .unwrap()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap()
    };
    assert!(wait_until(Duration::from_secs(10), || state(0, "h2").state
        == PeerState::Up
        && state(0, "h3").state == PeerState::Up));
    assert!(
        bed.ping(0, bed.hosts[1].overlay, 1).unwrap(),
        "same cluster"
    );
    assert!(
        bed.ping(0, bed.hosts[2].overlay, 1).unwrap(),
        "the per-peer key overrides the cluster key"
    );
    assert!(
        !bed.ping(1, bed.hosts[2].overlay, 2).unwrap(),
        "different clusters connected"
    );
    for (i, other) in [(1, "h3"), (2, "h2")] {
        let s = state(i, other);
        assert_ne!(s.state, PeerState::Up, "{s:?}");
        assert!(
            s.reason.as_deref().is_some_and(|r| r.contains("preshared")),
            "{s:?}"
        );
    }
}
