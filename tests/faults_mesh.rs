//! Faults a mesh must survive, with the real meshd in network namespaces:
//! fifty agents started at the same moment, a host cut off for minutes, a
//! host whose wall clock is set back, an agent too slow for what arrives.
//!
//! Timings are printed (run with `--nocapture`), never asserted beyond
//! generous bounds that only a wedge would exceed. Needs root, iproute2,
//! ping, tcpdump and libfaketime (the faketime package); fails (never
//! skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use meshnet::core::{PeerState, PeerStatus};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, in_netns, signal, wait_until};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn all_up(peers: &[PeerStatus], expected: usize) -> bool {
    peers.len() == expected && peers.iter().all(|p| p.state == PeerState::Up)
}

fn peer<'a>(peers: &'a [PeerStatus], name: &str) -> &'a PeerStatus {
    peers
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no peer {name} in {peers:?}"))
}

/// Host indices whose agent does not yet see every tunnel up.
fn not_converged(bed: &Testbed, hosts: &[usize]) -> Vec<usize> {
    let n = bed.hosts.len();
    hosts
        .iter()
        .copied()
        .filter(|&i| !bed.peers(i).is_ok_and(|p| all_up(&p, n - 1)))
        .collect()
}

// ---------------------------------------------------------------------
// 50 hosts, 2,450 tunnels

const FLEET: usize = 50;
/// Generous: convergence takes 9-14 s here. With the crossing-handshake
/// fix reverted it took 97 s (pairs stuck until WireGuard gave up after
/// 90 s and retried); without pinned neighbours 40 hosts never converged.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(60);
/// Generous: an idle agent with 49 peers sits near 10 MiB.
const RSS_BOUND_KIB: u64 = 48 * 1024;

#[test]
fn fifty_hosts_started_together_converge_and_carry_traffic() {
    let options = MeshOptions {
        hosts: FLEET,
        // 1 s keepalives on 2,450 tunnels would be 2,450 packets a second
        // of overhead on two shared cores; 5 s still shows a dead tunnel
        // down within 15 s.
        keepalive: Some(5),
        ..MeshOptions::default()
    };
    let built = Instant::now();
    let mut bed = Testbed::new("fifty", &options, bins()).expect("building the testbed");
    bed.pin_underlay_neighbours().unwrap();
    println!("50 hosts built in {:?}", built.elapsed());

    let started = Instant::now();
    bed.start_all_together().unwrap();
    let mut pending: Vec<usize> = (0..FLEET).collect();
    let converged = wait_until(CONVERGENCE_BOUND, || {
        pending = not_converged(&bed, &pending);
        pending.is_empty()
    });
    let took = started.elapsed();
    assert!(converged, "{}", stuck_report(&bed, &pending));
    // Every host at once, now that each has been seen converged.
    let all: Vec<usize> = (0..FLEET).collect();
    let relapsed = not_converged(&bed, &all);
    assert!(relapsed.is_empty(), "{}", stuck_report(&bed, &relapsed));
    println!("50 agents, 2,450 tunnels: all up {took:?} after starting together");

    let failed = bed.ping_pairs(&ping_sample(), 3).unwrap();
    assert!(failed.is_empty(), "no ping answered between {failed:?}");

    let peaks: Vec<u64> = (0..FLEET)
        .map(|i| bed.agent_peak_rss_kib(i).unwrap())
        .collect();
    let max = peaks.iter().copied().max().unwrap();
    println!("peak RSS per agent: max {max} KiB");
    assert!(
        max < RSS_BOUND_KIB,
        "an agent peaked at {max} KiB: {peaks:?}"
    );
}

/// Every host to its next and to the one halfway round the ring (both
/// directions of every distance that way), plus the corners.
fn ping_sample() -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = (0..FLEET)
        .flat_map(|i| [(i, (i + 1) % FLEET), (i, (i + FLEET / 2 + 1) % FLEET)])
        .collect();
    pairs.extend([(0, FLEET - 1), (FLEET - 1, 0), (16, 32), (48, 2)]);
    pairs
}

fn stuck_report(bed: &Testbed, hosts: &[usize]) -> String {
    let mut report = format!("{} hosts not converged: {hosts:?}\n", hosts.len());
    for &i in hosts.iter().take(3) {
        let down: Vec<String> = bed
            .peers(i)
            .map(|p| {
                p.into_iter()
                    .filter(|p| p.state != PeerState::Up)
                    .map(|p| format!("{} {:?} {:?}", p.name, p.state, p.reason))
                    .collect()
            })
            .unwrap_or_default();
        report.push_str(&format!("{}: {down:?}\n", bed.hosts[i].name));
    }
    report
}

// ---------------------------------------------------------------------
// A host cut off for minutes

/// Long enough for WireGuard to give up on the lost peer (90 s of
/// unanswered handshakes) and for the next attempt to go out unanswered
/// too: meshd's own retry comes 30 s after the give-up, but records-sync
/// heartbeats (every 2 s) make boringtun start one within a second.
const OUTAGE: Duration = Duration::from_secs(135);
/// The retry backoff (30 s) plus a handshake retransmission and margin.
const RECONNECT_BOUND: Duration = Duration::from_secs(60);

#[test]
fn a_host_cut_off_for_minutes_is_reconnected_and_each_change_logged_once() {
    let mut bed = Testbed::new("outage", &MeshOptions::default(), bins()).unwrap();
    bed.start_all().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || not_converged(&bed, &[0, 1, 2])
            .is_empty()),
        "mesh did not come up:\n{}",
        bed.log(0)
    );
    let marks: Vec<usize> = (0..3).map(|i| bed.log(i).len()).collect();

    bed.set_switch_port(2, false).unwrap();
    let cut = Instant::now();
    // h1 and h2 ping each other for the whole outage.
    let count = (OUTAGE.as_secs() * 2) as u32;
    let pings = [
        bed.spawn_ping(0, 1, count).unwrap(),
        bed.spawn_ping(1, 0, count).unwrap(),
    ];
    assert!(
        wait_until(Duration::from_secs(20), || {
            [0, 1].iter().all(|&i| {
                bed.peers(i)
                    .is_ok_and(|p| peer(&p, "h3").state != PeerState::Up)
            })
        }),
        "h1 and h2 still see h3 up 20 s after it was cut off"
    );
    std::thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    for ping in pings {
        let (sent, received) = ping.finish(Duration::from_secs(30)).unwrap();
        println!("h1 <-> h2 during the outage: {received}/{sent} answered");
        assert!(
            received * 100 >= sent * 98,
            "h1 and h2 lost each other while h3 was away: {received}/{sent}"
        );
    }

    bed.set_switch_port(2, true).unwrap();
    let back = Instant::now();
    let reconnected = wait_until(RECONNECT_BOUND, || {
        not_converged(&bed, &[0, 1, 2]).is_empty()
    });
    let took = back.elapsed();
    assert!(
        reconnected,
        "h3 not reconnected {took:?} after it returned: {:#?}\n{}",
        bed.peers(0),
        bed.log(2)
    );
    println!("h3 reconnected {took:?} after its port came back (outage {OUTAGE:?})");
    assert!(bed.ping(0, bed.hosts[2].overlay, 2).unwrap());
    assert_logged_once(&bed, &marks);
}

/// During the outage each agent logs each state change of the tunnel to
/// the lost peer once: a handful of lines per peer, each leaving the
/// state the previous one entered, and none about the tunnel that
/// stayed up.
fn assert_logged_once(bed: &Testbed, marks: &[usize]) {
    for (i, lost) in [(0, vec!["h3"]), (1, vec!["h3"]), (2, vec!["h1", "h2"])] {
        let changes = bed.state_changes(i, marks[i]);
        let log = bed.log(i);
        let outage = log.get(marks[i]..).unwrap_or_default();
        // boringtun warns once per handshake retransmission (every 5 s per
        // lost peer) in its own target; meshd's lines are counted.
        let ours = outage
            .lines()
            .filter(|l| !l.contains(" boringtun::"))
            .count();
        let theirs = outage.lines().count() - ours;
        println!(
            "{}: {ours} meshd log lines, {theirs} boringtun lines; state changes:",
            bed.hosts[i].name
        );
        for c in &changes {
            println!("  {} {}: {} -> {}", c.stamp, c.peer, c.from, c.to);
        }
        // Nothing per packet or per retransmission from meshd.
        assert!(
            ours <= 2 * changes.len() + 6,
            "{}: {ours} meshd log lines in the outage:\n{outage}",
            bed.hosts[i].name
        );
        for peer in &lost {
            let mine: Vec<_> = changes.iter().filter(|c| c.peer == *peer).collect();
            let downs = mine.iter().filter(|c| c.to == "down").count();
            // Silent (down), given up after 90 s (down): two; three if
            // the retry after the backoff also ran out.
            assert!(
                (1..=3).contains(&downs),
                "{}: {downs} 'tunnel down' lines for {peer}: {mine:?}",
                bed.hosts[i].name
            );
            assert!(
                mine.len() <= 8,
                "{}: a storm for {peer}: {mine:?}",
                bed.hosts[i].name
            );
            assert!(
                mine.windows(2)
                    .all(|w| w[0].to == w[1].from && w[0].to != w[1].to),
                "{}: a change for {peer} logged twice or missed: {mine:?}",
                bed.hosts[i].name
            );
            assert!(
                mine.iter()
                    .any(|c| c.from == "connecting" && c.to == "down")
                    && mine
                        .iter()
                        .any(|c| c.from == "down" && c.to == "connecting"),
                "{}: WireGuard's give-up and meshd's retry not both seen for {peer}: {mine:?}",
                bed.hosts[i].name
            );
            assert_eq!(mine.last().map(|c| c.to.as_str()), Some("up"));
        }
    }
}

// ---------------------------------------------------------------------
// A wall clock set back

/// With the counter-initiation the tunnels are back within milliseconds.
/// Without it, a peer that accepted h2's handshakes before refuses its
/// new ones (stamped in the past) until WireGuard's own timer notices
/// data sent and unanswered (KEEPALIVE + REKEY_TIMEOUT, 15 s; records-sync
/// keeps data flowing). The bound is generous yet below that fallback, so
/// the test fails without the fix (checked by hand: 14.8 s).
const CLOCK_RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// How far a log's wall clock may be from the expected offset (the line
/// read may be a few seconds old; debug builds start slowly).
const CLOCK_SLACK_SECS: i64 = 60;

#[test]
fn a_host_restarted_with_its_clock_set_back_is_not_wedged() {
    // No keepalive: with one, the others would notice h2 silent and
    // initiate themselves after 7 s, hiding a wedge.
    let options = MeshOptions {
        keepalive: None,
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("clockback", &options, bins()).unwrap();
    bed.start_all().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || not_converged(&bed, &[0, 1, 2])
            .is_empty()),
        "mesh did not come up:\n{}",
        bed.log(0)
    );
    // Old handshakes are then at least 2 s old: `handshook_since` tells them apart.
    std::thread::sleep(Duration::from_secs(2));

    bed.stop(1).unwrap();
    let clock = bed.start_with_fake_clock(1, "-1h").unwrap();
    let restarted = Instant::now();
    let recovered = wait_until(CLOCK_RECOVERY_BOUND, || handshook_since(&bed, restarted));
    let took = restarted.elapsed();
    assert!(
        recovered,
        "h2, restarted an hour back, still not connected after {took:?}: {:#?}\n{:#?}\nh1:\n{}\nh2:\n{}",
        bed.peers(1),
        bed.peers(0),
        bed.log(0),
        bed.log(1)
    );
    println!("h2 restarted with its clock 1 h back: tunnels up again after {took:?}");
    assert_clock_offset(&bed, 1, -3600);
    let pairs = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)];
    let failed = bed.ping_pairs(&pairs, 2).unwrap();
    assert!(
        failed.is_empty(),
        "no answer between {failed:?} after the restart"
    );

    // The wall clock jumps back another hour while the agent runs.
    let mark = bed.log(1).len();
    clock.set("-2h").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_clock_offset(&bed, 1, -7200);
    let failed = bed.ping_pairs(&pairs, 2).unwrap();
    assert!(
        failed.is_empty(),
        "no answer between {failed:?} after the jump"
    );
    assert!(
        not_converged(&bed, &[1]).is_empty(),
        "h2's tunnels went down across the jump: {:#?}",
        bed.peers(1)
    );
    let changes = bed.state_changes(1, mark);
    assert!(
        changes.is_empty(),
        "h2's tunnels flapped across the jump: {changes:?}"
    );
}

/// h2 sees both tunnels up, and h1 and h3 completed a handshake with it
/// after `since`.
fn handshook_since(bed: &Testbed, since: Instant) -> bool {
    let elapsed = since.elapsed().as_secs();
    let fresh = |i: usize| {
        bed.peers(i).is_ok_and(|p| {
            peer(&p, "h2")
                .last_handshake_secs_ago
                .is_some_and(|ago| ago <= elapsed)
        })
    };
    not_converged(bed, &[1]).is_empty() && fresh(0) && fresh(2)
}

/// Proves the agent runs on the faked clock: a reload makes it log a line
/// now, stamped with its own wall clock.
fn assert_clock_offset(bed: &Testbed, i: usize, expected: i64) {
    bed.reload(i).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let offset = bed.log_clock_offset_secs(i).unwrap().unwrap();
    assert!(
        (offset - expected).abs() < CLOCK_SLACK_SECS,
        "{}'s log is stamped {offset} s from now, not about {expected} s: is libfaketime working?",
        bed.hosts[i].name
    );
}

// ---------------------------------------------------------------------
// An agent that cannot keep up

/// Sends SIGCONT to the stopped process when dropped, also on failure.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal(pid, "STOP").unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

/// Datagrams the kernel throws away because the agent did not read them in
/// time are invisible to the agent's own counters; it reports the
/// socket's kernel count as the `underlay_overflow` drop reason.
#[test]
fn datagrams_the_kernel_drops_for_a_stalled_agent_are_counted() {
    const SENT: u64 = 20_000;
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("ovfl", &options, bins()).expect("building the testbed");
    bed.start_all().expect("starting agents");
    // Handshakes done, and no keepalives: only the flood will arrive.
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    assert_eq!(bed.dropped(0, "underlay_overflow").unwrap(), 0);
    let to: SocketAddr = (bed.hosts[0].underlay, 51820).into();
    {
        let _stopped = Stopped::new(bed.agent_pid(0).unwrap());
        // One byte each: far more datagrams than a 1 MiB buffer queues.
        in_netns(&bed.hosts[1].ns, move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..SENT {
                socket.send_to(b"x", to)?;
            }
            Ok(())
        })
        .unwrap();
    }
    let overflow = bed.dropped(0, "underlay_overflow").unwrap();
    println!("{overflow} of {SENT} datagrams dropped by the kernel");
    assert!((1..SENT).contains(&overflow), "{overflow} of {SENT}");
    // Every datagram is accounted for: the ones the kernel queued reached
    // the agent and were refused there as not WireGuard.
    let queued = SENT - overflow;
    let invalid = wait_until(Duration::from_secs(5), || {
        bed.dropped(0, "invalid_datagram").unwrap() == queued
    });
    assert!(invalid, "{:?}", bed.status(0).unwrap().dropped);
}
