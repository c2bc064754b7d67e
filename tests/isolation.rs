//! L2 isolation on the TAP bridge (issue 13, item 2): two hosts running the
//! real meshd, containers as network namespaces, attacks made from inside
//! a container with raw frames (python3, AF_PACKET) and `ip`.
//!
//! Needs root, iproute2, ping, nft (nftables), dig (dnsutils) and python3;
//! fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use meshnet::config::Mode;
use meshnet::core::ethernet::Mac;
use meshnet_testbed::{
    Binaries, MeshOptions, Testbed, exec_in, neighbour_mac, require_tools, wait_until,
};

const SERVICE: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 250);

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn tap_mesh(tag: &str) -> Testbed {
    require_tools(
        &["nft", "dig", "python3"],
        "run scripts/test.sh (installs nftables and dnsutils; python3 is expected)",
    );
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
    bed.start_all().expect("starting agents");
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    bed
}

/// Whether `count` pings from `ns` to `to` (optionally from address
/// `from`) were all answered.
fn pings(ns: &str, to: Ipv4Addr, from: Option<Ipv4Addr>, count: u32) -> bool {
    let (count, to) = (count.to_string(), to.to_string());
    let mut args = vec!["ping", "-c", &count, "-i", "0.2", "-W", "1", "-q"];
    let from = from.map(|f| f.to_string());
    if let Some(from) = &from {
        args.extend(["-I", from]);
    }
    args.push(&to);
    exec_in(ns, &args).unwrap().status.success()
}

fn run(ns: &str, args: &[&str]) {
    let out = exec_in(ns, args).unwrap();
    assert!(out.status.success(), "{args:?} in {ns}: {out:?}");
}

/// The agent's bridge filter on host `i`, as `nft list` prints it.
fn filter_table(bed: &Testbed, i: usize) -> String {
    let out = bed
        .exec(i, &["nft", "list", "table", "bridge", "meshnet"])
        .unwrap();
    assert!(
        out.status.success(),
        "no bridge filter on host {i}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `count` ARP packets (one every 100 ms) from `eth0` in `ns`, as
/// raw frames: nothing in the sender's kernel checks what they claim.
const ARP_SENDER: &str = r#"
import socket, struct, sys, time
eth_src, eth_dst, op, sha, spa, tha, tpa, count = sys.argv[1:9]
mac = lambda s: bytes.fromhex(s.replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, int(op))
arp += mac(sha) + socket.inet_aton(spa) + mac(tha) + socket.inet_aton(tpa)
frame = mac(eth_dst) + mac(eth_src) + b"\x08\x06" + arp
for _ in range(int(count)):
    s.send(frame)
    time.sleep(0.1)
"#;

struct Arp {
    eth_src: Mac,
    eth_dst: Mac,
    op: u16,
    sender: (Mac, Ipv4Addr),
    target: (Mac, Ipv4Addr),
}

fn send_arp(ns: &str, arp: &Arp, count: u32) {
    let args = [
        arp.eth_src.to_string(),
        arp.eth_dst.to_string(),
        arp.op.to_string(),
        arp.sender.0.to_string(),
        arp.sender.1.to_string(),
        arp.target.0.to_string(),
        arp.target.1.to_string(),
        count.to_string(),
    ];
    let mut full = vec!["python3", "-c", ARP_SENDER];
    full.extend(args.iter().map(String::as_str));
    run(ns, &full);
}

#[test]
fn forged_arp_replies_do_not_move_a_neighbours_entries() {
    let mut bed = tap_mesh("l2arp");
    let (attacker, victim, remote) = (
        bed.add_container_ns(0, "att").unwrap(),
        bed.add_container_ns(0, "vic").unwrap(),
        bed.add_container_ns(1, "rem").unwrap(),
    );
    let a = bed.attach(0, &attacker, "att", &[]).unwrap();
    let v = bed.attach(0, &victim, "vic", &[]).unwrap();
    let r = bed.attach(1, &remote, "rem", &[]).unwrap();
    let agent = bed.agent_mac(0).unwrap();
    let (a_mac, v_mac) = (Mac::of_container(a), Mac::of_container(v));
    assert!(pings(&victim, SERVICE, None, 2), "victim reaches DNS");
    assert!(pings(&victim, r, None, 2), "victim reaches the remote");
    assert!(pings(&attacker, v, None, 2), "neighbours reach each other");
    assert_eq!(neighbour_mac(&victim, SERVICE), Some(agent));
    assert_eq!(neighbour_mac(&victim, r), Some(agent));

    // Unsolicited replies to the victim and gratuitous broadcasts, from
    // the attacker's own MAC and from the agent's, for both addresses; 3 s
    // of them, well past the kernel's 1 s ARP locktime.
    let mut forged = Vec::new();
    for stolen in [SERVICE, r] {
        for eth_src in [a_mac, agent] {
            forged.push(Arp {
                eth_src,
                eth_dst: v_mac,
                op: 2,
                sender: (a_mac, stolen),
                target: (v_mac, v),
            });
            forged.push(Arp {
                eth_src,
                eth_dst: Mac::BROADCAST,
                op: 1,
                sender: (a_mac, stolen),
                target: (Mac([0; 6]), stolen),
            });
        }
    }
    let senders: Vec<_> = forged
        .into_iter()
        .map(|arp| {
            let ns = attacker.clone();
            std::thread::spawn(move || send_arp(&ns, &arp, 30))
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }

    assert_eq!(
        neighbour_mac(&victim, SERVICE),
        Some(agent),
        "the victim's DNS moved"
    );
    assert_eq!(
        neighbour_mac(&victim, r),
        Some(agent),
        "the victim's remote neighbour moved"
    );
    assert!(
        pings(&victim, r, None, 2),
        "victim still reaches the remote"
    );
    assert!(
        pings(&attacker, v, None, 2),
        "the attacker's own traffic passes"
    );
}

#[test]
fn a_container_sends_only_from_its_own_mac_and_address() {
    let mut bed = tap_mesh("l2src");
    let (c1, c2, c3) = (
        bed.add_container_ns(0, "c1").unwrap(),
        bed.add_container_ns(0, "c2").unwrap(),
        bed.add_container_ns(1, "c3").unwrap(),
    );
    let a1 = bed.attach(0, &c1, "c1", &[]).unwrap();
    let a2 = bed.attach(0, &c2, "c2", &[]).unwrap();
    let a3 = bed.attach(1, &c3, "c3", &[]).unwrap();
    assert!(pings(&c1, a2, None, 2) && pings(&c1, a3, None, 2));

    // Another address: the kernel sends from it, the bridge drops it.
    run(&c1, &["ip", "addr", "add", "10.42.1.200/16", "dev", "eth0"]);
    let other = Some(Ipv4Addr::new(10, 42, 1, 200));
    assert!(
        !pings(&c1, a2, other, 2),
        "neighbour reached from a stolen address"
    );
    assert!(
        !pings(&c1, a3, other, 2),
        "remote reached from a stolen address"
    );
    assert!(pings(&c1, a2, Some(a1), 2), "own address to the neighbour");
    assert!(pings(&c1, a3, Some(a1), 2), "own address to the remote");
    run(&c1, &["ip", "addr", "del", "10.42.1.200/16", "dev", "eth0"]);

    // Another MAC: nothing it sends passes, ARP or IPv4.
    run(&c1, &["ip", "neigh", "flush", "dev", "eth0"]);
    run(&c1, &["ip", "link", "set", "eth0", "down"]);
    run(
        &c1,
        &["ip", "link", "set", "eth0", "address", "0a:42:99:99:99:99"],
    );
    run(&c1, &["ip", "link", "set", "eth0", "up"]);
    run(
        &c1,
        &[
            "ip",
            "route",
            "replace",
            "169.254.169.250/32",
            "dev",
            "eth0",
        ],
    );
    assert!(!pings(&c1, a2, None, 2), "neighbour reached from a new MAC");
    assert!(!pings(&c1, a3, None, 2), "remote reached from a new MAC");
    run(&c1, &["ip", "link", "set", "eth0", "down"]);
    let own = Mac::of_container(a1).to_string();
    run(&c1, &["ip", "link", "set", "eth0", "address", &own]);
    run(&c1, &["ip", "link", "set", "eth0", "up"]);
    assert!(pings(&c1, a2, None, 3), "own MAC to the neighbour");
    assert!(pings(&c1, a3, None, 3), "own MAC to the remote");

    // IPv6 (or any other ethertype) does not leave the port either.
    let filter = format!("ip6 and ether src {}", Mac::of_container(a1));
    let cap = bed.capture(&c2, "eth0", &filter).unwrap();
    run(&c1, &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"]);
    let _ = exec_in(
        &c1,
        &[
            "ping",
            "-6",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "ff02::1%eth0",
        ],
    );
    let seen = cap.finish().unwrap();
    assert_eq!(
        meshnet_testbed::pcap_packet_count(&seen),
        0,
        "IPv6 from c1 reached its neighbour:\n{}",
        meshnet_testbed::pcap_summary(&seen)
    );
}

#[test]
fn the_host_is_out_of_reach_but_its_dns_answers() {
    let mut bed = tap_mesh("l2host");
    let (c1, c2) = (
        bed.add_container_ns(0, "c1").unwrap(),
        bed.add_container_ns(1, "c2").unwrap(),
    );
    bed.attach(0, &c1, "c1", &[]).unwrap();
    let a2 = bed.attach(1, &c2, "web", &[]).unwrap();
    // DNS first, while the host has never heard from c1: answering makes
    // the host resolve c1, and that must not teach c1 that the service
    // address sits at the bridge (whose filter drops the next query).
    let answered = wait_until(Duration::from_secs(10), || {
        let out = exec_in(&c1, &["dig", "+search", "+short", "+time=1", "web"]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == a2.to_string()
    });
    assert!(
        answered,
        "DNS at 169.254.169.250 did not answer:\n{}",
        bed.log(0)
    );
    assert_eq!(neighbour_mac(&c1, SERVICE), Some(bed.agent_mac(0).unwrap()));
    for name in ["web", "c1"] {
        let out = exec_in(&c1, &["dig", "+search", "+short", "+time=1", name]).unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "{name} did not resolve: {out:?}"
        );
    }
    assert!(pings(&c1, SERVICE, None, 2), "service address unreachable");

    assert!(
        !pings(&c1, Ipv4Addr::new(10, 42, 1, 1), None, 2),
        "host reached"
    );
    let tcp = exec_in(
        &c1,
        &["dig", "+tcp", "+time=1", "+tries=1", "@10.42.1.1", "web"],
    )
    .unwrap();
    assert!(!tcp.status.success(), "host's port 53 reached: {tcp:?}");
    assert!(
        pings(&c1, Ipv4Addr::new(10, 42, 2, 1), None, 2),
        "remote host"
    );
}

#[test]
fn rules_follow_attach_and_detach_and_are_rebuilt_at_restart() {
    let mut bed = tap_mesh("l2rules");
    let (c1, c2) = (
        bed.add_container_ns(0, "c1").unwrap(),
        bed.add_container_ns(0, "c2").unwrap(),
    );
    let a1 = bed.attach(0, &c1, "c1", &[]).unwrap();
    let chain1 = format!("c_{}", meshnet::agent::netops::host_veth_name(a1));
    let table = filter_table(&bed, 0);
    assert!(table.contains(&chain1), "{table}");
    assert!(table.contains(&format!("ip saddr {a1} accept")), "{table}");

    let out = bed.meshctl(0, &["detach", "--netns", &c1]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = filter_table(&bed, 0);
    assert!(!table.contains(&chain1), "detach left the chain:\n{table}");
    assert!(table.contains("iifname \"mv*\" drop"), "{table}");

    // Namespace names that would leave /run/netns or read as options.
    for netns in ["--netns=..", "--netns=-n"] {
        for verb in [
            &["attach", netns, "--name", "x"][..],
            &["detach", netns][..],
        ] {
            let out = bed.meshctl(0, verb).unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("network namespace name"),
                "{verb:?}: {err}"
            );
        }
    }

    let a2 = bed.attach(0, &c2, "c2", &[]).unwrap();
    let chain2 = format!("c_{}", meshnet::agent::netops::host_veth_name(a2));
    assert!(pings(&c2, SERVICE, None, 2));
    bed.stop(0).unwrap();
    // Tampered while the agent was down: the container's chain is gone and
    // a rule lets everything through before the fail-closed one.
    run(
        &bed.hosts[0].ns,
        &["nft", "flush", "chain", "bridge", "meshnet", &chain2],
    );
    run(
        &bed.hosts[0].ns,
        &[
            "nft",
            "insert",
            "rule",
            "bridge",
            "meshnet",
            "prerouting",
            "accept",
        ],
    );
    bed.start(0).unwrap();
    let table = filter_table(&bed, 0);
    assert!(table.contains(&format!("ip saddr {a2} accept")), "{table}");
    assert!(
        !table.contains("policy accept;\n\t\taccept"),
        "tampered rule survived:\n{table}"
    );
    assert!(pings(&c2, SERVICE, None, 3), "after restart");
}

#[test]
fn a_tap_agent_without_nft_refuses_to_start() {
    let bed = Testbed::new(
        "l2nonft",
        &MeshOptions {
            hosts: 1,
            keepalive: None,
            mode: Mode::Tap,
        },
        bins(),
    )
    .unwrap();
    // A PATH holding `ip` and nothing else.
    let bin = bed.dir().join("only-ip");
    std::fs::create_dir(&bin).unwrap();
    let ip = Command::new("sh")
        .args(["-c", "command -v ip"])
        .output()
        .unwrap();
    let ip = String::from_utf8_lossy(&ip.stdout).trim().to_owned();
    std::os::unix::fs::symlink(&ip, bin.join("ip")).unwrap();
    let out = Command::new(&ip)
        .args(["netns", "exec", &bed.hosts[0].ns])
        .arg(&bed.bins.meshd)
        .arg("--config")
        .arg(&bed.hosts[0].config)
        .env("PATH", &bin)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nft") && stderr.contains("nftables"),
        "the error names neither the tool nor the package: {stderr}"
    );
    let links = bed.exec(0, &["ip", "-o", "link"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains(meshnet::config::DEFAULT_BRIDGE),
        "a bridge was made: {links}"
    );
}
