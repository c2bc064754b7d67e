//! An impaired underlay for tests: a UDP relay between two hosts' agents
//! that drops, delays (jitter) and reorders datagrams, since this kernel
//! has no `sch_netem`.
//!
//! The relay runs in the testbed's switch namespace on an extra address of
//! `br0`; each host's configured endpoint for the other is one of the
//! relay's two sockets, so every datagram between them passes through it.
//! What happens to a datagram is decided by `Impairer`, pure code with a
//! seeded xorshift (same seed, same fates) that owns the delay queue and
//! counts what it did; the relay thread only moves bytes. Bounded: at most
//! `MAX_QUEUED` datagrams wait (more are dropped and counted), and the
//! thread ends on drop or after `MAX_LIFETIME`, whichever comes first.
//! Must never: send anywhere but the two host addresses it was given, or
//! outlive its `Relay`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::{Testbed, ip, spawn_in_netns};

/// Datagrams waiting in the relay, at most (about 12 MiB of 1500-byte
/// datagrams); past it a datagram is dropped and counted as `overflowed`.
pub const MAX_QUEUED: usize = 8192;
/// The relay thread stops by itself after this long, even if its `Relay`
/// was leaked.
pub const MAX_LIFETIME: Duration = Duration::from_secs(900);
/// The relay's address on the switch bridge (outside the hosts' range).
pub const RELAY_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 250);
/// The agents' listening port (see `Testbed`'s configs).
const AGENT_PORT: u16 = 51820;

/// What the relay does to the underlay, in both directions alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Share of datagrams dropped (0.0-1.0).
    pub loss: f64,
    /// Share of forwarded datagrams held back past their successors.
    pub reorder: f64,
    /// Each datagram waits a uniform 0..jitter; in-order ones never pass
    /// each other, so jitter alone does not reorder (a queue would not).
    pub jitter: Duration,
    pub seed: u64,
}

impl Impairment {
    /// Passes everything at once, in order.
    pub const NONE: Self = Self {
        loss: 0.0,
        reorder: 0.0,
        jitter: Duration::ZERO,
        seed: 1,
    };
}

/// What the relay did; `reordered` counts datagrams actually delivered
/// after one that arrived later in the same direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    pub received: u64,
    pub dropped: u64,
    pub overflowed: u64,
    pub held_back: u64,
    pub reordered: u64,
    pub forwarded: u64,
    pub send_errors: u64,
    /// Sum, sum of squares and maximum of the delay given to forwarded
    /// datagrams (the mean and the spread, i.e. the jitter seen).
    pub delay_total_us: u64,
    pub delay_squares_us2: u64,
    pub delay_max_us: u64,
}

impl RelayCounters {
    /// Dropped by the impairment, as a share of what arrived.
    pub fn loss_ratio(&self) -> f64 {
        ratio(self.dropped, self.received)
    }

    /// Delivered out of order, as a share of what was forwarded.
    pub fn reorder_ratio(&self) -> f64 {
        ratio(self.reordered, self.forwarded)
    }

    pub fn mean_delay(&self) -> Duration {
        Duration::from_micros(self.delay_total_us / self.forwarded.max(1))
    }

    /// The standard deviation of the delay.
    pub fn delay_spread(&self) -> Duration {
        let n = self.forwarded.max(1) as f64;
        let mean = self.delay_total_us as f64 / n;
        let variance = (self.delay_squares_us2 as f64 / n - mean * mean).max(0.0);
        Duration::from_micros(variance.sqrt() as u64)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    AToB,
    BToA,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Self::AToB => 0,
            Self::BToA => 1,
        }
    }
}

/// xorshift64*: ten lines instead of a crate; good enough to pick fates.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's one fixed point.
        Self(seed.max(1))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    release: Instant,
    seq: u64,
    direction: Direction,
    delay: Duration,
    bytes: Vec<u8>,
}

/// The relay's decisions: which datagram is dropped, how long each waits,
/// which are held back; time comes in as `now`.
#[derive(Debug)]
pub struct Impairer {
    impairment: Impairment,
    rng: XorShift,
    queue: BinaryHeap<Reverse<Queued>>,
    next_seq: u64,
    /// Per direction: when the last in-order datagram leaves (later
    /// in-order ones never leave before it).
    in_order_release: [Option<Instant>; 2],
    /// Per direction: the newest arrival delivered so far.
    newest_delivered: [Option<u64>; 2],
    counters: RelayCounters,
}

impl Impairer {
    pub fn new(impairment: Impairment) -> Self {
        Self {
            rng: XorShift::new(impairment.seed),
            impairment,
            queue: BinaryHeap::new(),
            next_seq: 0,
            in_order_release: [None; 2],
            newest_delivered: [None; 2],
            counters: RelayCounters::default(),
        }
    }

    /// Takes a datagram that arrived at `now`: dropped, or queued.
    pub fn push(&mut self, now: Instant, direction: Direction, bytes: &[u8]) {
        self.counters.received += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.rng.unit() < self.impairment.loss {
            self.counters.dropped += 1;
            return;
        }
        if self.queue.len() >= MAX_QUEUED {
            self.counters.overflowed += 1;
            return;
        }
        let jitter = self.impairment.jitter.mul_f64(self.rng.unit());
        let held_back = self.rng.unit() < self.impairment.reorder;
        let release = if held_back {
            // Held past the in-order queue by up to one more jitter (at
            // least 1 ms), so what arrives next overtakes it.
            self.counters.held_back += 1;
            let extra = Duration::from_millis(1) + self.impairment.jitter.mul_f64(self.rng.unit());
            let behind = self.in_order_release[direction.index()].unwrap_or(now);
            behind.max(now + jitter) + extra
        } else {
            let slot = &mut self.in_order_release[direction.index()];
            let release = slot.map_or(now + jitter, |last| last.max(now + jitter));
            *slot = Some(release);
            release
        };
        self.queue.push(Reverse(Queued {
            release,
            seq,
            direction,
            delay: release.saturating_duration_since(now),
            bytes: bytes.to_vec(),
        }));
    }

    /// When the next queued datagram is due, if any is queued.
    pub fn next_release(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse(q)| q.release)
    }

    /// A datagram due at `now`, with its direction; counts it forwarded.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Direction, Vec<u8>)> {
        if self.next_release()? > now {
            return None;
        }
        let Reverse(q) = self.queue.pop()?;
        let newest = &mut self.newest_delivered[q.direction.index()];
        if newest.is_some_and(|n| n > q.seq) {
            self.counters.reordered += 1;
        }
        *newest = Some(newest.map_or(q.seq, |n| n.max(q.seq)));
        let delay = u64::try_from(q.delay.as_micros()).unwrap_or(u64::MAX);
        self.counters.forwarded += 1;
        self.counters.delay_total_us = self.counters.delay_total_us.saturating_add(delay);
        self.counters.delay_squares_us2 = self
            .counters
            .delay_squares_us2
            .saturating_add(delay.saturating_mul(delay));
        self.counters.delay_max_us = self.counters.delay_max_us.max(delay);
        Some((q.direction, q.bytes))
    }

    /// A forwarded datagram the socket refused (full buffer).
    pub fn count_send_error(&mut self) {
        self.counters.send_errors += 1;
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn counters(&self) -> RelayCounters {
        self.counters
    }

    #[cfg(test)]
    fn reorder_off_for_test(&mut self) {
        self.impairment.reorder = 0.0;
    }
}

/// Where the relay sits between hosts A and B.
#[derive(Debug, Clone, Copy)]
pub struct RelayPlan {
    /// Host A's and B's agents.
    pub a: SocketAddr,
    pub b: SocketAddr,
    /// A's configured endpoint for B: the socket A's datagrams arrive on.
    pub b_for_a: SocketAddr,
    /// B's configured endpoint for A.
    pub a_for_b: SocketAddr,
}

/// A running relay thread; stopped and joined on drop.
pub struct Relay {
    pub plan: RelayPlan,
    counters: Arc<Mutex<RelayCounters>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Relay {
    /// Starts a relay in namespace `ns` (where the plan's relay addresses
    /// must exist) and returns once its sockets are bound.
    pub fn start(ns: &str, plan: RelayPlan, impairment: Impairment) -> Result<Self> {
        let counters = Arc::new(Mutex::new(RelayCounters::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready, bound) = std::sync::mpsc::channel();
        let shared = counters.clone();
        let thread = spawn_in_netns(ns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let sockets = {
                let _inside = runtime.enter();
                bind_pair(&plan)
            };
            let _ = ready.send(sockets.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
            let (a_side, b_side) = sockets?;
            runtime.block_on(relay_loop(
                a_side,
                b_side,
                plan,
                Impairer::new(impairment),
                stopped,
                shared,
            ))
        })?;
        let relay = Self {
            plan,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        };
        match bound.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(relay),
            Ok(Err(e)) => bail!("relay sockets: {e}"),
            Err(_) => bail!("the relay thread did not start"),
        }
    }

    /// What the relay has done so far.
    pub fn counters(&self) -> RelayCounters {
        self.counters.lock().map(|c| *c).unwrap_or_default()
    }

    /// Stops the relay and returns its final counters.
    pub fn stop(mut self) -> Result<RelayCounters> {
        self.shut_down()?;
        Ok(self.counters())
    }

    fn shut_down(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the relay thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// Puts a relay between hosts `a` and `b` of `bed`, whose agents must not
/// run yet: adds `RELAY_ADDRESS` to the switch bridge and points each
/// host's configured endpoint for the other at the relay.
pub fn relay_between(bed: &Testbed, a: usize, b: usize, impairment: Impairment) -> Result<Relay> {
    let address = format!("{RELAY_ADDRESS}/24");
    let has = super::exec_in(&bed.bridge_ns, &["ip", "-o", "addr", "show", "dev", "br0"])?;
    if !String::from_utf8_lossy(&has.stdout).contains(&address) {
        ip(&["-n", &bed.bridge_ns, "addr", "add", &address, "dev", "br0"])?;
    }
    let agent = |i: usize| SocketAddr::V4(SocketAddrV4::new(bed.hosts[i].underlay, AGENT_PORT));
    let face = |i: usize| SocketAddr::V4(SocketAddrV4::new(RELAY_ADDRESS, 52000 + i as u16));
    let plan = RelayPlan {
        a: agent(a),
        b: agent(b),
        b_for_a: face(b),
        a_for_b: face(a),
    };
    point_endpoint(bed, a, plan.b, plan.b_for_a)?;
    point_endpoint(bed, b, plan.a, plan.a_for_b)?;
    Relay::start(&bed.bridge_ns, plan, impairment)
}

/// Rewrites host `i`'s configured endpoint `old` to `new`.
fn point_endpoint(bed: &Testbed, i: usize, old: SocketAddr, new: SocketAddr) -> Result<()> {
    let path = &bed.hosts[i].config;
    let text = std::fs::read_to_string(path)?;
    let from = format!("endpoint = \"{old}\"");
    ensure!(text.contains(&from), "{} has no {from}", path.display());
    std::fs::write(path, text.replace(&from, &format!("endpoint = \"{new}\"")))?;
    Ok(())
}

fn bind_pair(plan: &RelayPlan) -> Result<(tokio::net::UdpSocket, tokio::net::UdpSocket)> {
    let bind = |at: SocketAddr| -> Result<std::net::UdpSocket> {
        let socket = UdpSocket::bind(at).with_context(|| format!("binding {at}"))?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    };
    // Call inside the relay's runtime: tokio registers them with it.
    Ok((
        tokio::net::UdpSocket::from_std(bind(plan.b_for_a)?)?,
        tokio::net::UdpSocket::from_std(bind(plan.a_for_b)?)?,
    ))
}

/// Moves datagrams: what arrives on `a_side` (from A) goes out of
/// `b_side` to B and back, each when the impairer says.
async fn relay_loop(
    a_side: tokio::net::UdpSocket,
    b_side: tokio::net::UdpSocket,
    plan: RelayPlan,
    mut impairer: Impairer,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    shared: Arc<Mutex<RelayCounters>>,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + MAX_LIFETIME;
    let (mut from_a, mut from_b) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        let wake = impairer
            .next_release()
            .map_or(deadline, tokio::time::Instant::from_std)
            .min(deadline);
        tokio::select! {
            _ = &mut stop => return Ok(()),
            () = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    return Ok(());
                }
            }
            r = a_side.recv_from(&mut from_a) => {
                if let Ok((n, _)) = r {
                    impairer.push(Instant::now(), Direction::AToB, &from_a[..n]);
                }
            }
            r = b_side.recv_from(&mut from_b) => {
                if let Ok((n, _)) = r {
                    impairer.push(Instant::now(), Direction::BToA, &from_b[..n]);
                }
            }
        }
        let now = Instant::now();
        while let Some((direction, bytes)) = impairer.pop_due(now) {
            let (socket, to) = match direction {
                Direction::AToB => (&b_side, plan.b),
                Direction::BToA => (&a_side, plan.a),
            };
            if socket.try_send_to(&bytes, to).is_err() {
                impairer.count_send_error();
            }
        }
        if let Ok(mut counters) = shared.lock() {
            *counters = impairer.counters();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const TARGET: Impairment = Impairment {
        loss: 0.05,
        reorder: 0.25,
        jitter: Duration::from_millis(20),
        seed: 14,
    };

    /// Feeds `count` numbered datagrams A to B, one every `gap`, and
    /// returns the numbers in the order they came out.
    fn run(impairer: &mut Impairer, count: u32, gap: Duration) -> Vec<u32> {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut drain = |impairer: &mut Impairer, now| {
            while let Some((direction, bytes)) = impairer.pop_due(now) {
                assert_eq!(direction, Direction::AToB);
                out.push(u32::from_le_bytes(bytes.try_into().unwrap()));
            }
        };
        for n in 0..count {
            let now = start + gap * n;
            drain(impairer, now);
            impairer.push(now, Direction::AToB, &n.to_le_bytes());
        }
        drain(impairer, start + gap * count + Duration::from_secs(1));
        assert_eq!(impairer.queued(), 0);
        out
    }

    #[test]
    fn no_impairment_passes_everything_at_once_in_order() {
        let mut impairer = Impairer::new(Impairment::NONE);
        let out = run(&mut impairer, 1000, Duration::from_micros(10));
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
        let c = impairer.counters();
        assert_eq!(
            (c.received, c.forwarded, c.dropped, c.reordered),
            (1000, 1000, 0, 0)
        );
        assert_eq!(c.delay_max_us, 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_fates() {
        let gap = Duration::from_micros(100);
        let first = run(&mut Impairer::new(TARGET), 5000, gap);
        let again = run(&mut Impairer::new(TARGET), 5000, gap);
        let other = run(
            &mut Impairer::new(Impairment { seed: 15, ..TARGET }),
            5000,
            gap,
        );
        assert_eq!(first, again);
        assert_ne!(first, other);
    }

    #[test]
    fn rates_converge_on_the_targets() {
        let mut impairer = Impairer::new(TARGET);
        let out = run(&mut impairer, 100_000, Duration::from_micros(100));
        let c = impairer.counters();
        assert_eq!(c.forwarded as usize, out.len());
        assert_eq!(c.received, c.dropped + c.forwarded);
        assert!((0.045..0.055).contains(&c.loss_ratio()), "{c:?}");
        let held = c.held_back as f64 / c.forwarded as f64;
        assert!((0.24..0.26).contains(&held), "{c:?}");
        // At one datagram per 100 us every held one is overtaken.
        assert!((0.22..0.28).contains(&c.reorder_ratio()), "{c:?}");
        assert!(c.delay_max_us <= 41_000, "{c:?}");
        assert!(c.mean_delay() >= Duration::from_millis(5), "{c:?}");
        assert!(c.delay_spread() >= Duration::from_millis(2), "{c:?}");
        // Every survivor comes out exactly once.
        let mut sorted = out.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), out.len());
    }

    #[test]
    fn jitter_alone_never_reorders() {
        let mut impairer = Impairer::new(Impairment {
            reorder: 0.0,
            ..TARGET
        });
        let out = run(&mut impairer, 10_000, Duration::from_micros(50));
        assert!(out.windows(2).all(|w| w[0] < w[1]));
        let c = impairer.counters();
        assert_eq!(c.reordered, 0);
        assert!(c.delay_max_us > 15_000 && c.delay_max_us <= 20_000, "{c:?}");
        assert!(c.delay_spread() > Duration::ZERO, "{c:?}");
    }

    #[test]
    fn a_held_back_datagram_is_overtaken_and_counted() {
        let mut impairer = Impairer::new(Impairment {
            loss: 0.0,
            reorder: 1.0,
            jitter: Duration::ZERO,
            seed: 3,
        });
        let now = Instant::now();
        impairer.push(now, Direction::BToA, b"held");
        // Nothing is due before its extra millisecond.
        assert_eq!(impairer.pop_due(now), None);
        impairer.reorder_off_for_test();
        impairer.push(now, Direction::BToA, b"next");
        assert_eq!(
            impairer.pop_due(now),
            Some((Direction::BToA, b"next".to_vec()))
        );
        let later = now + Duration::from_millis(2);
        assert_eq!(
            impairer.pop_due(later),
            Some((Direction::BToA, b"held".to_vec()))
        );
        assert_eq!(impairer.counters().reordered, 1);
        assert_eq!(impairer.counters().held_back, 1);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut impairer = Impairer::new(Impairment {
            jitter: Duration::from_secs(1),
            ..Impairment::NONE
        });
        let now = Instant::now();
        for n in 0..MAX_QUEUED + 10 {
            impairer.push(now, Direction::AToB, &n.to_le_bytes());
        }
        assert_eq!(impairer.queued(), MAX_QUEUED);
        assert_eq!(impairer.counters().overflowed, 10);
    }

    #[test]
    fn directions_keep_their_own_order() {
        let mut impairer = Impairer::new(Impairment::NONE);
        let now = Instant::now();
        impairer.push(now, Direction::AToB, b"1");
        impairer.push(now, Direction::BToA, b"2");
        assert_eq!(
            impairer.pop_due(now),
            Some((Direction::AToB, b"1".to_vec()))
        );
        assert_eq!(
            impairer.pop_due(now),
            Some((Direction::BToA, b"2".to_vec()))
        );
        assert_eq!(impairer.counters().reordered, 0);
    }
}
