//! A handshake flood against one agent, for the flood test and benchmark.
//!
//! Anyone who knows an agent's public key can make initiations with a
//! valid mac1. The flooder sends one such initiation (from a key the agent
//! does not know) as fast as it can, round-robin from several source
//! addresses of a namespace of the testbed, for a bounded time, and counts
//! the cookie replies that come back. Meanwhile an established tunnel is
//! pinged and the agent's CPU time is read from /proc. Test tooling: it
//! sends only inside the testbed's namespaces.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use boringtun::noise::{Tunn, TunnResult};

use super::measure;
use super::{Testbed, exec_in, in_netns};
use meshnet::keys::PrivateKey;

/// What one flood did and cost.
#[derive(Debug, Clone)]
pub struct FloodReport {
    pub seconds: f64,
    /// Initiations sent, and how many the sender's kernel refused.
    pub sent: u64,
    pub send_errors: u64,
    /// Cookie replies the flooder received.
    pub cookies: u64,
    /// CPU seconds the flooded agent spent per second of flood.
    pub agent_cpu: f64,
    /// Pings across the established tunnel during the flood.
    pub pings_sent: u32,
    pub pings_answered: usize,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    /// Datagrams the target's kernel dropped because the agent's socket
    /// buffer was full (Udp RcvbufErrors in its namespace): lost pings
    /// with a high count here were lost before the agent saw them.
    pub rcvbuf_errors: u64,
}

impl FloodReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.seconds.max(f64::EPSILON)
    }
}

/// A flood ready to go: everything it needs from the testbed, so the
/// testbed stays free (to restart an agent, say) while it runs.
pub struct Flood {
    ns: String,
    sources: Vec<Ipv4Addr>,
    to: SocketAddr,
    initiation: Vec<u8>,
    pid: u32,
    pinger_ns: String,
    overlay: Ipv4Addr,
    target_ns: String,
}

/// Prepares a flood of host `target`'s agent from host `flooder`'s
/// namespace (whose agent is not running), from `sources` addresses added
/// to its underlay, while host `pinger` pings `target`'s overlay address.
pub fn plan(
    bed: &Testbed,
    target: usize,
    flooder: usize,
    pinger: usize,
    sources: u8,
) -> Result<Flood> {
    let ns = bed.hosts[flooder].ns.clone();
    let sources: Vec<Ipv4Addr> = (0..sources)
        .map(|i| Ipv4Addr::new(192, 0, 2, 150 + i))
        .collect();
    for a in &sources {
        let out = exec_in(
            &ns,
            &["ip", "addr", "replace", &format!("{a}/24"), "dev", "ul0"],
        )?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Flood {
        ns,
        sources,
        to: SocketAddr::new(bed.hosts[target].underlay.into(), 51820),
        initiation: initiation_for(&bed.hosts[target].key.public_key())?,
        pid: bed
            .agent_pid(target)
            .context("the target agent is not running")?,
        pinger_ns: bed.hosts[pinger].ns.clone(),
        overlay: bed.hosts[target].overlay,
        target_ns: bed.hosts[target].ns.clone(),
    })
}

impl Flood {
    /// Floods for `seconds`, pinging across the established tunnel.
    pub fn run(self, seconds: u64) -> Result<FloodReport> {
        let ticks = measure::clock_ticks_per_second()?;
        let before = measure::sample_process(self.pid, ticks)?;
        let rcvbuf_before = udp_rcvbuf_errors(&self.target_ns)?;
        let pings = (seconds * 20) as u32;
        let (pinger_ns, overlay) = (self.pinger_ns.clone(), self.overlay.to_string());
        let ping = std::thread::spawn(move || {
            let count = pings.to_string();
            exec_in(
                &pinger_ns,
                &["ping", "-c", &count, "-i", "0.05", "-W", "1", &overlay],
            )
        });
        let started = Instant::now();
        let (sources, to, initiation) = (self.sources, self.to, self.initiation);
        let (sent, send_errors, cookies) = in_netns(&self.ns, move || {
            send_for(&sources, to, &initiation, Duration::from_secs(seconds))
        })?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = measure::sample_process(self.pid, ticks)?;
        let rcvbuf_errors = udp_rcvbuf_errors(&self.target_ns)?.saturating_sub(rcvbuf_before);
        let output = ping
            .join()
            .map_err(|_| anyhow::anyhow!("the ping thread panicked"))??;
        let rtts = measure::parse_ping_rtts(&String::from_utf8_lossy(&output.stdout));
        Ok(FloodReport {
            seconds: elapsed,
            sent,
            send_errors,
            cookies,
            agent_cpu: (after.cpu_seconds - before.cpu_seconds) / elapsed,
            pings_sent: pings,
            pings_answered: rtts.len(),
            rtt_p50_ms: measure::percentile(&rtts, 50.0),
            rtt_p99_ms: measure::percentile(&rtts, 99.0),
            rcvbuf_errors,
        })
    }
}

/// Udp RcvbufErrors of namespace `ns` (/proc/net/snmp: a header line of
/// field names, then a line of values).
fn udp_rcvbuf_errors(ns: &str) -> Result<u64> {
    let out = exec_in(ns, &["cat", "/proc/net/snmp"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next(), udp.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("no Udp lines in /proc/net/snmp of {ns}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .context("no RcvbufErrors in /proc/net/snmp")?
        .1
        .parse()
        .context("RcvbufErrors is not a number")
}

/// One initiation to `target` from a key it does not know: a valid mac1,
/// which is all a flooder needs.
fn initiation_for(target: &meshnet::keys::PublicKey) -> Result<Vec<u8>> {
    let stranger = PrivateKey::generate()?;
    let mut tunn = Tunn::new(
        stranger.to_x25519(),
        target.to_x25519(),
        None,
        None,
        1,
        None,
    );
    let mut buf = [0u8; 256];
    match tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(m) => Ok(m.to_vec()),
        _ => anyhow::bail!("boringtun made no initiation"),
    }
}

/// Sends `datagram` round-robin from one socket per source address until
/// `duration` passes; returns (sent, send errors, cookie replies seen).
fn send_for(
    sources: &[Ipv4Addr],
    to: SocketAddr,
    datagram: &[u8],
    duration: Duration,
) -> Result<(u64, u64, u64)> {
    let sockets = sources
        .iter()
        .map(|a| {
            let s = UdpSocket::bind((*a, 0))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let deadline = Instant::now() + duration;
    let (mut sent, mut errors, mut cookies) = (0u64, 0u64, 0u64);
    let mut reply = [0u8; 128];
    while Instant::now() < deadline {
        for socket in &sockets {
            // A burst per socket between clock reads keeps the rate high.
            for _ in 0..64 {
                match socket.send_to(datagram, to) {
                    Ok(_) => sent += 1,
                    Err(_) => errors += 1,
                }
            }
            while let Ok((n, _)) = socket.recv_from(&mut reply) {
                if n == 64 && reply[0] == 3 {
                    cookies += 1;
                }
            }
        }
    }
    Ok((sent, errors, cookies))
}
