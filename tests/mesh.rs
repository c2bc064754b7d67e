//! Three hosts in network namespaces running the real meshd: connectivity,
//! `meshctl peers`, containment of unowned traffic, encryption on the wire,
//! crash and restart, clean shutdown, reload.
//!
//! Needs root, iproute2, ping and tcpdump; fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshnet::config::Mode;
use meshnet::core::{PeerState, PeerStatus};
use meshnet_testbed::{
    Binaries, MeshOptions, Testbed, pcap_packet_count, pcap_summary, wait_until,
};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn mesh(tag: &str) -> Testbed {
    let mut bed = Testbed::new(tag, &MeshOptions::default(), bins()).expect("building the testbed");
    bed.start_all().expect("starting agents");
    wait_all_up(&bed);
    bed
}

/// Two hosts without keepalive, agents started (not waited for).
fn two_started_hosts(tag: &str) -> Testbed {
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
    bed.start_all().expect("starting agents");
    bed
}

fn all_up(peers: &[PeerStatus]) -> bool {
    peers
        .iter()
        .all(|p| p.state == PeerState::Up && p.last_handshake_secs_ago.is_some())
}

fn wait_all_up(bed: &Testbed) {
    let n = bed.hosts.len();
    let ok = wait_until(Duration::from_secs(15), || {
        (0..n).all(|i| bed.peers(i).is_ok_and(|p| p.len() == n - 1 && all_up(&p)))
    });
    let views: Vec<_> = (0..n)
        .map(|i| bed.peers(i).map(|p| format!("{p:#?}")))
        .collect();
    assert!(ok, "mesh did not come up: {views:#?}\n{}", bed.log(0));
}

fn peer<'a>(peers: &'a [PeerStatus], name: &str) -> &'a PeerStatus {
    peers
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no peer {name} in {peers:?}"))
}

#[test]
fn every_host_reaches_every_other_and_meshctl_shows_the_tunnels() {
    let bed = mesh("full");
    for i in 0..3 {
        for j in (0..3).filter(|j| *j != i) {
            let to = bed.hosts[j].overlay;
            assert!(
                bed.ping(i, to, 2).unwrap(),
                "{} cannot reach {to}",
                bed.hosts[i].name
            );
        }
    }
    for i in 0..3 {
        let peers = bed.peers(i).unwrap();
        assert_eq!(peers.len(), 2);
        for p in &peers {
            assert_eq!(p.state, PeerState::Up, "{p:?}");
            assert!(p.last_handshake_secs_ago.is_some_and(|s| s < 60), "{p:?}");
            assert!(
                p.rx_bytes >= 2 * 84 && p.tx_bytes >= 2 * 84,
                "pings were not counted: {p:?}"
            );
            let owner = bed.hosts.iter().find(|h| h.name == p.name).unwrap();
            assert_eq!(p.public_key, owner.key.public_key());
            assert_eq!(p.endpoint.map(|e| e.ip()), Some(owner.underlay.into()));
        }
    }
    // DNS works in TUN mode too: the host itself asks 169.254.169.250.
    let resolves = wait_until(Duration::from_secs(3), || {
        bed.exec(
            0,
            &[
                "dig",
                "+short",
                "+time=1",
                "@169.254.169.250",
                "h3.hosts.mesh.internal",
            ],
        )
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "10.42.3.1")
    });
    assert!(resolves, "h1 cannot resolve h3.hosts.mesh.internal");
    // The JSON carries the documented field names.
    let out = bed.meshctl(0, &["peers", "--json"]).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in [
        "name",
        "public_key",
        "endpoint",
        "subnet",
        "state",
        "last_handshake_secs_ago",
        "rx_bytes",
        "tx_bytes",
    ] {
        assert!(json[0].get(field).is_some(), "missing {field} in {json}");
    }
    let text = String::from_utf8(bed.meshctl(0, &["peers"]).unwrap().stdout).unwrap();
    assert!(
        text.contains("peer: h2")
            && text.contains("state: up")
            && text.contains("latest handshake:"),
        "{text}"
    );
    let status = String::from_utf8(bed.meshctl(0, &["status"]).unwrap().stdout).unwrap();
    assert!(
        status.contains("host: h1") && status.contains("peers: 2 (2 up, 0 connecting, 0 down)"),
        "{status}"
    );
    assert!(
        status.contains("address: 10.42.1.1/16") && status.contains("mtu 1420"),
        "{status}"
    );
    // Private keys never reach a log or meshctl's output.
    for (i, host) in bed.hosts.iter().enumerate() {
        let secret = host.key.to_base64();
        assert!(
            !bed.log(i).contains(&secret),
            "{}'s private key is in its log",
            host.name
        );
        for cmd in [&["peers", "--json"][..], &["status", "--json"][..]] {
            let out = bed.meshctl(i, cmd).unwrap();
            assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret));
        }
    }
}

#[test]
fn a_packet_to_an_unowned_overlay_address_never_leaves_the_host() {
    let bed = mesh("unowned");
    let before: Vec<u64> = bed.peers(0).unwrap().iter().map(|p| p.tx_packets).collect();
    let drops_before = bed
        .status(0)
        .unwrap()
        .dropped
        .get("no_route")
        .copied()
        .unwrap_or(0);
    // Anything IPv4 on h1's underlay that is not a tunnel message would show
    // here (but for the kernel's own IGMP reports on a fresh interface).
    let capture = bed
        .capture(
            &bed.hosts[0].ns,
            "ul0",
            "ip and not udp port 51820 and not igmp",
        )
        .unwrap();
    let out = bed
        .exec(
            0,
            &["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.42.99.1"],
        )
        .unwrap();
    let pcap = capture.finish().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("Destination Host Unreachable"),
        "no ICMP error: {text}"
    );
    assert_eq!(
        pcap_packet_count(&pcap),
        0,
        "non-tunnel traffic left the host:\n{}",
        pcap_summary(&pcap)
    );
    let after: Vec<u64> = bed.peers(0).unwrap().iter().map(|p| p.tx_packets).collect();
    assert_eq!(before, after, "a packet was sent to a peer");
    let drops_after = bed
        .status(0)
        .unwrap()
        .dropped
        .get("no_route")
        .copied()
        .unwrap_or(0);
    assert!(
        drops_after >= drops_before + 3,
        "drops {drops_before} -> {drops_after}"
    );
}

#[test]
fn a_marker_sent_through_the_tunnel_never_appears_in_clear_on_the_underlay() {
    let bed = mesh("marker");
    const MARKER: &[u8; 16] = b"MESHNET-MARKER!!";
    let pattern: String = MARKER.iter().map(|b| format!("{b:02x}")).collect();
    let underlay = bed.capture(&bed.bridge_ns, "br0", "").unwrap();
    let overlay = bed.capture(&bed.hosts[0].ns, "mesh0", "").unwrap();
    let to = bed.hosts[1].overlay.to_string();
    let out = bed
        .exec(
            0,
            &[
                "ping", "-c", "5", "-i", "0.2", "-s", "400", "-p", &pattern, &to,
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let clear = overlay.finish().unwrap();
    let wire = underlay.finish().unwrap();
    let contains = |haystack: &[u8]| haystack.windows(MARKER.len()).any(|w| w == MARKER);
    // The control: the same capture method does see the marker in clear.
    assert!(
        contains(&clear),
        "the marker is not in the overlay capture; the test sees nothing"
    );
    assert!(
        pcap_packet_count(&wire) >= 10,
        "the underlay capture saw no tunnel traffic"
    );
    assert!(!contains(&wire), "the marker crossed the underlay in clear");
}

#[test]
fn a_crashed_agent_shows_down_and_a_restart_restores_traffic_without_touching_the_others() {
    let mut bed = mesh("crash");
    let others = [bed.agent_pid(0), bed.agent_pid(1)];
    bed.kill(2).unwrap();
    let h3_gone = |p: &[PeerStatus]| peer(p, "h3").state != PeerState::Up;
    assert!(
        wait_until(Duration::from_secs(20), || (0..2)
            .all(|i| bed.peers(i).is_ok_and(|p| h3_gone(&p)))),
        "h3 still shows up: {:?}",
        bed.peers(0)
    );
    assert!(
        bed.ping(0, bed.hosts[1].overlay, 2).unwrap(),
        "h1 <-> h2 broke when h3 died"
    );
    assert_eq!(peer(&bed.peers(0).unwrap(), "h2").state, PeerState::Up);

    // The crash left its control socket behind; the restart must cope.
    assert!(
        bed.hosts[2].socket.exists(),
        "expected a stale socket after SIGKILL"
    );
    bed.start(2).unwrap();
    wait_all_up(&bed);
    assert!(bed.ping(0, bed.hosts[2].overlay, 2).unwrap());
    assert!(bed.ping(2, bed.hosts[1].overlay, 2).unwrap());
    assert_eq!(
        [bed.agent_pid(0), bed.agent_pid(1)],
        others,
        "other agents were restarted"
    );
}

#[test]
fn sigterm_removes_device_and_socket_and_a_second_agent_is_refused() {
    let mut bed = two_started_hosts("term");
    wait_all_up(&bed);

    // A second agent with the same config must not disturb the first.
    let second = std::process::Command::new("ip")
        .args(["netns", "exec", &bed.hosts[0].ns])
        .arg(&bed.bins.meshd)
        .arg("--config")
        .arg(&bed.hosts[0].config)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already running"),
        "{second:?}"
    );
    assert!(
        bed.ping(0, bed.hosts[1].overlay, 1).unwrap(),
        "the first agent was disturbed"
    );

    let status = bed.stop(0).unwrap();
    assert!(status.success(), "meshd exited with {status}");
    let link = bed.exec(0, &["ip", "link", "show", "mesh0"]).unwrap();
    assert!(!link.status.success(), "mesh0 still exists after SIGTERM");
    let route = bed
        .exec(0, &["ip", "route", "show", "10.42.0.0/16"])
        .unwrap();
    assert!(
        route.stdout.is_empty(),
        "overlay route left behind: {route:?}"
    );
    assert!(!bed.hosts[0].socket.exists(), "control socket left behind");
    let out = bed.meshctl(0, &["peers"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("meshd is not running"), "{err}");

    bed.start(0).unwrap();
    wait_all_up(&bed);
}

#[test]
fn sighup_applies_a_changed_peer_list_without_dropping_other_tunnels() {
    let mut bed = mesh("reload");
    let config = bed.hosts[0].config.clone();
    let full = std::fs::read_to_string(&config).unwrap();
    // Drop h3's [[peer]] section from h1's config.
    let without_h3: String = full
        .split("\n[[peer]]")
        .filter(|s| !s.contains("name = \"h3\""))
        .collect::<Vec<_>>()
        .join("\n[[peer]]");
    std::fs::write(&config, &without_h3).unwrap();
    let pid = bed.agent_pid(0).unwrap().to_string();
    let hup = || {
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .map(|s| s.success())
    };
    assert!(hup().unwrap());
    assert!(wait_until(Duration::from_secs(5), || bed
        .peers(0)
        .is_ok_and(|p| p.len() == 1)));
    assert_eq!(
        peer(&bed.peers(0).unwrap(), "h2").state,
        PeerState::Up,
        "h2's tunnel was disturbed"
    );
    let out = bed
        .exec(
            0,
            &[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                &bed.hosts[2].overlay.to_string(),
            ],
        )
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Unreachable"));

    // A broken config on reload changes nothing.
    std::fs::write(&config, "name = \"h1\"\nbogus = 1\n").unwrap();
    assert!(hup().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(bed.peers(0).unwrap().len(), 1);
    assert!(bed.log(0).contains("reload refused"), "{}", bed.log(0));

    std::fs::write(&config, &full).unwrap();
    assert!(hup().unwrap());
    wait_all_up(&bed);
    assert!(bed.ping(0, bed.hosts[2].overlay, 1).unwrap());
    bed.stop(0).unwrap();
}

#[test]
fn a_deleted_device_stops_the_agent_with_a_clear_error() {
    let mut bed = two_started_hosts("lost");
    let out = bed.exec(0, &["ip", "link", "del", "mesh0"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let exited = wait_until(Duration::from_secs(5), || bed.agent_exited(0));
    assert!(
        exited,
        "meshd kept running without its device; its threads:\n{}\nits log:\n{}",
        bed.agent_pid(0).map(thread_states).unwrap_or_default(),
        bed.log(0)
    );
    assert!(
        bed.log(0).contains("the overlay device mesh0 failed"),
        "{}",
        bed.log(0)
    );
    assert!(!bed.hosts[0].socket.exists(), "control socket left behind");
}

/// Each thread of process `pid`: its name, state and the kernel function
/// it waits in, for a report on an agent that hangs.
fn thread_states(pid: u32) -> String {
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    tasks
        .flatten()
        .map(|task| {
            let stat = read(task.path().join("stat"));
            let state = stat.rsplit(") ").next().unwrap_or("").split(' ').next();
            format!(
                "{} {} {} {}\n",
                task.file_name().to_string_lossy(),
                read(task.path().join("comm")).trim(),
                state.unwrap_or("?"),
                read(task.path().join("wchan")),
            )
        })
        .collect()
}

/// Bulk TCP over the tunnel with segmentation offload on (the default)
/// and off, and in TAP mode (frames split behind their Ethernet header):
/// the bytes arrive intact, both ends' peer byte counters account for
/// them, nothing is dropped, and the log says which path ran. Under
/// offload one device read carries a TCP super-packet that is split,
/// sealed and sent as one GSO run; the receiver coalesces it again.
#[test]
fn bulk_tcp_arrives_intact_with_offload_on_and_off() {
    const LEN: usize = 16 << 20;
    for (mode, offload) in [(Mode::Tun, true), (Mode::Tun, false), (Mode::Tap, true)] {
        let options = MeshOptions {
            hosts: 2,
            keepalive: None,
            mode,
        };
        let tag = match (mode, offload) {
            (Mode::Tap, _) => "offltap",
            (_, true) => "offl",
            (_, false) => "nooffl",
        };
        let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
        if !offload {
            bed.set_config_key("offload = false").unwrap();
        }
        bed.start_all().expect("starting agents");
        wait_all_up(&bed);
        let tx_before = peer(&bed.peers(0).unwrap(), "h2").tx_bytes;
        let rx_before = peer(&bed.peers(1).unwrap(), "h1").rx_bytes;
        // What the receiving agent wrote to its device: bytes and writes
        // (the kernel counts a write as one received packet).
        let written_before = device_counters(&bed.hosts[1].ns, "mesh0");
        bed.transfer(0, 1, bed.hosts[1].overlay, LEN)
            .unwrap_or_else(|e| panic!("offload {offload}: {e:#}\n{}", bed.log(0)));
        let written = device_counters(&bed.hosts[1].ns, "mesh0");
        let bytes_per_write =
            (written[0] - written_before[0]) / (written[1] - written_before[1]).max(1);
        // With offload the segments of the stream are coalesced into
        // super-packets (46 segments at most, 55-58 KB on average here);
        // without, one per write. The bound leaves room for a slow sender,
        // whose TCP sends smaller super-packets to begin with.
        if offload {
            assert!(
                bytes_per_write > 4 * 1420,
                "{mode:?}: {bytes_per_write} bytes per device write"
            );
        } else {
            assert!(
                bytes_per_write <= 1420,
                "{bytes_per_write} bytes per device write"
            );
        }
        let tx = peer(&bed.peers(0).unwrap(), "h2").tx_bytes - tx_before;
        let rx = peer(&bed.peers(1).unwrap(), "h1").rx_bytes - rx_before;
        assert!(
            tx >= LEN as u64,
            "offload {offload}: sender counted {tx} bytes"
        );
        assert!(
            rx >= LEN as u64,
            "offload {offload}: receiver counted {rx} bytes"
        );
        for i in 0..2 {
            // The kernel may send an IPv6 solicitation into the device
            // before IPv6 is turned off on it: that drop is not the data path's.
            let mut dropped = bed.status(i).unwrap().dropped;
            dropped.remove("not_ipv4");
            assert!(dropped.is_empty(), "offload {offload}: drops {dropped:?}");
            let log = bed.log(i);
            let expected = format!("tun_offload={offload}");
            assert!(log.contains(&expected), "offload {offload}: {log}");
            let gso = format!("udp_gso={offload}");
            assert!(log.contains(&gso), "offload {offload}: {log}");
        }
    }
}

/// The size of datagram `seq` in the ordering test: mostly full-sized,
/// with short ones between, so a batch mixes sizes and a GSO run ends
/// early (only a run's last segment may be short).
fn ordered_datagram_len(seq: u32) -> usize {
    const LENS: [usize; 8] = [1392, 1392, 1392, 64, 1392, 700, 8, 1392];
    LENS[seq as usize % LENS.len()]
}

fn ordered_datagram(seq: u32) -> Vec<u8> {
    numbered_datagram(seq, ordered_datagram_len(seq))
}

/// Datagram `seq` of `len` bytes: its number, then bytes that depend on
/// it, so that an altered or misplaced datagram shows.
fn numbered_datagram(seq: u32, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect();
    bytes[..4].copy_from_slice(&seq.to_be_bytes());
    bytes
}

/// Receives datagrams on host 1 at `to:port` in a thread of its own until
/// datagram `last` or 2 s of silence (60 s at most), each checked against
/// `expected(seq)` by the number in its first four bytes; returns the
/// numbers in the order they arrived. Returns once the socket is bound.
fn spawn_receiver(
    bed: &Testbed,
    to: std::net::Ipv4Addr,
    port: u16,
    last: u32,
    expected: fn(u32) -> Vec<u8>,
) -> std::thread::JoinHandle<anyhow::Result<Vec<u32>>> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let receiver = meshnet_testbed::spawn_in_netns(&bed.hosts[1].ns, move || {
        let socket = std::net::UdpSocket::bind((to, port))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        bound_tx.send(())?;
        let mut received = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            anyhow::ensure!(n >= 4, "a datagram of {n} bytes");
            let seq = u32::from_be_bytes(buf[..4].try_into()?);
            anyhow::ensure!(
                buf[..n] == expected(seq)[..],
                "datagram {seq} arrived altered ({n} bytes)"
            );
            received.push(seq);
            if seq == last {
                break;
            }
        }
        Ok(received)
    })
    .expect("starting the receiver");
    bound_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the receiver did not bind");
    receiver
}

/// A counter of `/proc/net/netstat` or `/proc/net/snmp` ("TcpExt",
/// "TCPOFOQueue") as the namespace `ns` sees it.
fn net_counter(ns: &str, file: &'static str, group: &'static str, name: &'static str) -> u64 {
    meshnet_testbed::in_netns(ns, move || {
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))?;
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (lines.next(), lines.next());
        let (Some(names), Some(values)) = (names, values) else {
            anyhow::bail!("no {group} in {file}");
        };
        let at = names.split_whitespace().position(|n| n == name);
        let value = at.and_then(|at| values.split_whitespace().nth(at));
        let value = value.ok_or_else(|| anyhow::anyhow!("no {group} {name} in {file}"))?;
        Ok(value.parse::<u64>()?)
    })
    .unwrap_or_else(|e| panic!("reading {group} {name} in {ns}: {e:#}"))
}

/// The counters of `device` in `/proc/net/dev` as the namespace `ns`
/// sees them: received bytes, packets, errs, drop, ..., transmitted bytes
/// (the 9th), ... drop (the 12th).
fn device_counters(ns: &str, device: &'static str) -> Vec<u64> {
    meshnet_testbed::in_netns(ns, move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{device}:")))
            .ok_or_else(|| anyhow::anyhow!("no {device} in /proc/net/dev"))?;
        let fields = line.split_once(':').map(|(_, f)| f).unwrap_or_default();
        Ok(fields
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<Vec<u64>, _>>()?)
    })
    .unwrap_or_else(|e| panic!("reading {device}'s counters in {ns}: {e:#}"))
}

/// Packets the kernel dropped on the way into or out of the tunnel on
/// host `ns`: the overlay device's queue (a segment meshd never read) and
/// the underlay socket's buffer (a datagram meshd never received).
fn kernel_drops(ns: &str, device: &'static str) -> u64 {
    let udp = net_counter(ns, "snmp", "Udp", "RcvbufErrors");
    let fields = device_counters(ns, device);
    // rx drop is the 4th field, tx drop the 12th.
    udp + fields.get(3).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0)
}

/// No reordering within a flow, with every batching stage in play
/// (device reads, GSO runs that a short datagram ends, GRO on receive,
/// coalesced device writes). 20,000 numbered UDP datagrams of mixed
/// sizes, sent as fast as the sender can: some may be lost under load,
/// but those that arrive must arrive in order and intact. Then a TCP
/// stream: the receiver's kernel must not have queued a single segment
/// out of order, unless a segment was lost on the way (which the kernel
/// counts).
#[test]
fn packets_of_one_flow_arrive_in_the_order_they_were_sent() {
    use std::net::UdpSocket;
    const DATAGRAMS: u32 = 20_000;
    const PORT: u16 = 5301;
    // With the send stage's thread (batches written beside the agent
    // task) and without it (the agent writes everything itself).
    for (mode, thread) in [(Mode::Tun, true), (Mode::Tap, true), (Mode::Tun, false)] {
        let options = MeshOptions {
            hosts: 2,
            keepalive: None,
            mode,
        };
        let tag = match (mode, thread) {
            (Mode::Tap, _) => "ordtap",
            (_, true) => "ordtun",
            (_, false) => "ord1t",
        };
        let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
        let env = [("MESHNET_SEND_THREAD", if thread { "1" } else { "0" })];
        bed.start_all_with_env(&env).expect("starting agents");
        wait_all_up(&bed);
        for i in 0..2 {
            let expected = format!("send_thread={thread}");
            assert!(bed.log(i).contains(&expected), "{}", bed.log(i));
        }
        let to = bed.hosts[1].overlay;
        // In TAP mode the first packets wait in the kernel for the proxy
        // ARP answer and may be overtaken by later ones when it comes (a
        // reordering of the sending kernel's, before meshd sees them).
        assert!(bed.ping(0, to, 2).unwrap(), "{}", bed.log(0));

        let receiver = spawn_receiver(&bed, to, PORT, DATAGRAMS - 1, ordered_datagram);
        meshnet_testbed::in_netns(&bed.hosts[0].ns, move || {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            socket.connect((to, PORT))?;
            for seq in 0..DATAGRAMS {
                socket.send(&ordered_datagram(seq))?;
                // Bursts of 200, which the agents batch, with a pause
                // between them: unpaced, a release build of this test
                // sent so fast that at times under a tenth arrived.
                if seq % 200 == 199 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Ok(())
        })
        .expect("sending");
        let received = receiver
            .join()
            .expect("the receiver panicked")
            .expect("receiving");
        let misordered: Vec<_> = received
            .windows(2)
            .filter(|pair| pair[1] <= pair[0])
            .take(10)
            .collect();
        assert!(
            misordered.is_empty(),
            "{mode:?}, thread {thread}: out of order (previous, next): {misordered:?} among {} received",
            received.len()
        );
        assert!(
            received.len() as u32 >= DATAGRAMS / 10,
            "{mode:?}, thread {thread}: only {} of {DATAGRAMS} arrived: too few to judge the order\n{}",
            received.len(),
            bed.log(1)
        );

        let device = meshnet::config::DEFAULT_DEVICE;
        let (sender, receiver) = (&bed.hosts[0].ns, &bed.hosts[1].ns);
        let ofo_before = net_counter(receiver, "netstat", "TcpExt", "TCPOFOQueue");
        let drops_before = kernel_drops(sender, device) + kernel_drops(receiver, device);
        bed.transfer(0, 1, to, 16 << 20)
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}\n{}", bed.log(0)));
        let ofo = net_counter(receiver, "netstat", "TcpExt", "TCPOFOQueue") - ofo_before;
        let drops = kernel_drops(sender, device) + kernel_drops(receiver, device) - drops_before;
        let mut dropped = bed.status(1).unwrap().dropped;
        dropped.remove("not_ipv4");
        assert!(
            ofo == 0 || drops > 0 || !dropped.is_empty(),
            "{mode:?}, thread {thread}: the receiver queued {ofo} TCP segments out of order \
             with nothing lost on the way"
        );
        eprintln!(
            "{mode:?}, thread {thread}: {} of {DATAGRAMS} datagrams in order; TCP: {ofo} \
             out of order, {drops} kernel drops, agent drops {dropped:?}",
            received.len()
        );
    }
}

/// UDP segmentation offload end to end: an application that hands its
/// kernel super-datagrams (UDP_SEGMENT, through quinn-udp) makes the
/// overlay device give meshd UDP super-packets, which meshd must cut into
/// the datagrams the application meant, every one intact on the other
/// host. The sender's device counts a super-packet as one packet, so its
/// bytes per packet show that meshd read super-packets.
#[test]
fn udp_super_datagrams_arrive_as_the_datagrams_they_hold() {
    use std::net::UdpSocket;
    const SUPERS: u32 = 200;
    const SEGMENTS: u32 = 8;
    const SEGMENT: usize = 1200;
    const PORT: u16 = 5302;
    let device = meshnet::config::DEFAULT_DEVICE;
    for mode in [Mode::Tun, Mode::Tap] {
        let options = MeshOptions {
            hosts: 2,
            keepalive: None,
            mode,
        };
        let tag = if mode == Mode::Tap {
            "usotap"
        } else {
            "usotun"
        };
        let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
        bed.start_all().expect("starting agents");
        wait_all_up(&bed);
        assert!(
            bed.log(0).contains("device_uso=true"),
            "{mode:?}: the overlay device does not take UDP segmentation offload \
             (TUN_F_USO4, Linux 6.2 or later), which this test needs:\n{}",
            bed.log(0)
        );
        let to = bed.hosts[1].overlay;
        assert!(bed.ping(0, to, 2).unwrap(), "{}", bed.log(0));

        let receiver = spawn_receiver(&bed, to, PORT, SUPERS * SEGMENTS - 1, |seq| {
            numbered_datagram(seq, SEGMENT)
        });

        let before = device_counters(&bed.hosts[0].ns, device);
        meshnet_testbed::in_netns(&bed.hosts[0].ns, move || {
            let socket = UdpSocket::bind(("0.0.0.0", 0))?;
            let state = quinn_udp::UdpSocketState::new((&socket).into())?;
            anyhow::ensure!(
                state.max_gso_segments() > 1,
                "no UDP_SEGMENT on this kernel"
            );
            let destination = std::net::SocketAddr::from((to, PORT));
            for k in 0..SUPERS {
                let contents: Vec<u8> = (0..SEGMENTS)
                    .flat_map(|i| numbered_datagram(k * SEGMENTS + i, SEGMENT))
                    .collect();
                let transmit = quinn_udp::Transmit {
                    destination,
                    ecn: None,
                    contents: &contents,
                    segment_size: Some(SEGMENT),
                    src_ip: None,
                };
                state.try_send((&socket).into(), &transmit)?;
                // Paced, so that loss does not hide what arrives.
                if k % 10 == 9 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Ok(())
        })
        .expect("sending");
        let after = device_counters(&bed.hosts[0].ns, device);
        let received = receiver
            .join()
            .expect("the receiver panicked")
            .unwrap_or_else(|e| panic!("{mode:?}: {e:#}\n{}", bed.log(1)))
            .len() as u32;
        // Transmit bytes are the 9th field, packets the 10th.
        let (bytes, packets) = (after[8] - before[8], after[9] - before[9]);
        let per_packet = bytes / packets.max(1);
        eprintln!(
            "{mode:?}: {received} of {} datagrams arrived intact; the sender's device \
             gave meshd {packets} packets, {per_packet} bytes each",
            SUPERS * SEGMENTS
        );
        assert!(
            per_packet > 4 * SEGMENT as u64,
            "{mode:?}: meshd read {per_packet} bytes per packet: no UDP super-packets"
        );
        assert!(
            received >= SUPERS * SEGMENTS / 2,
            "{mode:?}: only {received} of {} datagrams arrived\n{}",
            SUPERS * SEGMENTS,
            bed.log(1)
        );
    }
}
