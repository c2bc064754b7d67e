//! End-to-end cost of the tunnel: `cargo bench --bench netns`.
//!
//! Two hosts in network namespaces over veth; in turn (A B A B ...) plain
//! veth, meshd (TUN, offloads on), meshd with `offload = false` (the
//! one-syscall-per-packet path), meshd in TAP mode (the containers' path),
//! wireguard-go, and gotatun and boringtun-cli when installed
//! (scripts/peers.sh, which scripts/bench.sh runs, installs them). For each: iperf3 TCP with 1 and 4 streams, UDP
//! at full blast (received rate and loss), ping RTT p50/p99 idle and under
//! TCP load, CPU seconds per GB of the tunnel processes (both ends), and
//! their peak RSS. The same run measures two floors the figures are read
//! against: the cryptographic one (ring's ChaCha20-Poly1305 sealing and
//! opening 1420-byte packets on one core, in seconds per GB) and the
//! round-trip one (ping through a plain TUN-UDP relay without crypto, the
//! least any user-space tunnel does per packet). Every tunnel run is
//! checked against the implementation's own transfer counters, so traffic
//! that bypassed the tunnel is an error, not a fast result. Prints a table
//! with ratios, writes target/netns-bench.json and target/netns-bench.svg.
//!
//! Environment: MESHNET_BENCH_ROUNDS (default 2), MESHNET_BENCH_SECONDS
//! (default 4). Under `cargo test` (no `--bench`), a short self-check of
//! the floors and of meshd alone runs instead and writes nothing.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshnet::config::Mode;
use meshnet::core::PeerState;
use meshnet_testbed::measure::{self, IperfResult};
use meshnet_testbed::{
    Binaries, MeshOptions, Testbed, WireguardGo, cargo_binary, exec_in, unique_name, wait_until,
};
use plotters::prelude::*;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Tunnel {
    Veth,
    Meshd,
    MeshdSendThread,
    MeshdNoOffload,
    MeshdTap,
    WireguardGo,
    Gotatun,
    BoringtunCli,
}

impl Tunnel {
    fn label(self) -> &'static str {
        match self {
            Tunnel::Veth => "veth",
            Tunnel::Meshd => "meshd",
            Tunnel::MeshdSendThread => "meshd-2threads",
            Tunnel::MeshdNoOffload => "meshd-nooffl",
            Tunnel::MeshdTap => "meshd-tap",
            Tunnel::WireguardGo => "wireguard-go",
            Tunnel::Gotatun => "gotatun",
            Tunnel::BoringtunCli => "boringtun-cli",
        }
    }

    fn is_meshd(self) -> bool {
        matches!(
            self,
            Tunnel::Meshd | Tunnel::MeshdSendThread | Tunnel::MeshdNoOffload | Tunnel::MeshdTap
        )
    }

    /// The user-space peers meshd is measured against.
    fn is_peer(self) -> bool {
        matches!(
            self,
            Tunnel::WireguardGo | Tunnel::Gotatun | Tunnel::BoringtunCli
        )
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct Sample {
    tcp1_gbps: f64,
    tcp4_gbps: f64,
    udp_gbps: f64,
    udp_loss_percent: f64,
    rtt_idle_p50_ms: f64,
    rtt_idle_p99_ms: f64,
    rtt_load_p50_ms: f64,
    rtt_load_p99_ms: f64,
    cpu_seconds_per_gb: Option<f64>,
    /// The busiest single thread of either end's tunnel process: one
    /// flow's bound where every thread has a core of its own.
    busiest_thread_seconds_per_gb: Option<f64>,
    peak_rss_mib: Option<f64>,
}

#[derive(Serialize)]
struct Run {
    tunnel: Tunnel,
    round: usize,
    sample: Sample,
}

/// One tunnel set up between the two hosts.
struct Setup {
    bed: Testbed,
    wgs: Vec<WireguardGo>,
    target: Ipv4Addr,
    pids: Vec<u32>,
}

fn main() -> Result<()> {
    if let Ok(spec) = std::env::var(RELAY_ENV) {
        return plain_relay(&spec);
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let bins = meshnet_testbed::this_build!();
    let (rounds, seconds, tunnels) = if bench {
        let mut tunnels = vec![
            Tunnel::Veth,
            Tunnel::Meshd,
            Tunnel::MeshdSendThread,
            Tunnel::MeshdNoOffload,
            Tunnel::MeshdTap,
            Tunnel::WireguardGo,
        ];
        match cargo_binary("gotatun") {
            Some(_) => tunnels.push(Tunnel::Gotatun),
            None => eprintln!("gotatun not found (scripts/peers.sh installs it): left out"),
        }
        match cargo_binary("boringtun-cli") {
            Some(_) => tunnels.push(Tunnel::BoringtunCli),
            None => eprintln!("boringtun-cli not found (scripts/peers.sh installs it): left out"),
        }
        if let Ok(only) = std::env::var("MESHNET_BENCH_ONLY") {
            tunnels.retain(|t| only.split(',').any(|o| o == t.label()));
        }
        (
            env_number("MESHNET_BENCH_ROUNDS", 2),
            env_number("MESHNET_BENCH_SECONDS", 4),
            tunnels,
        )
    } else {
        eprintln!("netns bench self-check (run `cargo bench --bench netns` for the comparison)");
        (1, 1, vec![Tunnel::Meshd])
    };
    let ticks = measure::clock_ticks_per_second()?;
    let floor = crypto_floor_seconds_per_gb();
    eprintln!("seal+open floor: {floor:.2} s/GB (ring ChaCha20-Poly1305, 1420 B, one core)");
    // Under `cargo test`, a few round trips: a check that the floors
    // still measure, not a figure.
    let floors = round_trip_floors(&bins, if bench { 200 } else { 20 })?;
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for &tunnel in &tunnels {
            eprintln!("[round {round}/{rounds}] {}: setting up", tunnel.label());
            let setup = set_up(tunnel, &bins)?;
            let sample = measure_one(tunnel, &setup, seconds, ticks)?;
            eprintln!(
                "[round {round}/{rounds}] {}: tcp {:.2} Gbit/s, tcp x4 {:.2}, udp {:.2} ({:.1}% lost), rtt p50 {:.3} ms",
                tunnel.label(),
                sample.tcp1_gbps,
                sample.tcp4_gbps,
                sample.udp_gbps,
                sample.udp_loss_percent,
                sample.rtt_idle_p50_ms
            );
            runs.push(Run {
                tunnel,
                round,
                sample,
            });
        }
    }
    let medians: Vec<(Tunnel, Sample)> = tunnels
        .iter()
        .map(|&t| (t, median_sample(&runs, t)))
        .collect();
    print_table(&medians, rounds, seconds, floor, &floors);
    if bench {
        let target = target_dir();
        write_json(
            &target.join("netns-bench.json"),
            &runs,
            &medians,
            seconds,
            floor,
            &floors,
        )?;
        draw_chart(&target.join("netns-bench.svg"), &medians)?;
        eprintln!(
            "wrote {} and {}",
            target.join("netns-bench.json").display(),
            target.join("netns-bench.svg").display()
        );
    }
    Ok(())
}

fn set_up(tunnel: Tunnel, bins: &Binaries) -> Result<Setup> {
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        mode: if tunnel == Tunnel::MeshdTap {
            Mode::Tap
        } else {
            Mode::Tun
        },
    };
    let bed = Testbed::new("bench", &options, bins.clone())?;
    if tunnel == Tunnel::MeshdNoOffload {
        bed.set_config_key("offload = false")?;
    }
    let mut setup = Setup {
        target: bed.hosts[1].underlay,
        bed,
        wgs: Vec::new(),
        pids: Vec::new(),
    };
    match tunnel {
        Tunnel::Veth => {}
        Tunnel::Meshd | Tunnel::MeshdSendThread | Tunnel::MeshdNoOffload | Tunnel::MeshdTap => {
            // The send stage's thread (on by default from four cores) is
            // what a second core per host is for.
            let env: &[(&str, &str)] = if tunnel == Tunnel::MeshdSendThread {
                &[("MESHNET_SEND_THREAD", "1")]
            } else {
                &[]
            };
            setup.bed.start_all_with_env(env)?;
            let up = wait_until(Duration::from_secs(10), || {
                setup
                    .bed
                    .peers(0)
                    .is_ok_and(|p| p.iter().all(|p| p.state == PeerState::Up))
            });
            ensure!(up, "meshd tunnel did not come up");
            setup.target = setup.bed.hosts[1].overlay;
            setup.pids = (0..2).filter_map(|i| setup.bed.agent_pid(i)).collect();
        }
        Tunnel::WireguardGo | Tunnel::Gotatun | Tunnel::BoringtunCli => {
            for i in 0..2 {
                let ns = &setup.bed.hosts[i].ns;
                let name = unique_name("bw");
                let wg = match tunnel {
                    Tunnel::Gotatun => WireguardGo::start_rust_peer(ns, &name, "gotatun")?,
                    Tunnel::BoringtunCli => {
                        WireguardGo::start_rust_peer(ns, &name, "boringtun-cli")?
                    }
                    _ => WireguardGo::start(ns, &name)?,
                };
                wg.configure(&setup.bed, i, 1 - i, true, None)?;
                setup.pids.extend(wg.pid());
                setup.wgs.push(wg);
            }
            setup.target = setup.bed.hosts[1].overlay;
        }
    }
    Ok(setup)
}

fn measure_one(tunnel: Tunnel, s: &Setup, seconds: u64, ticks: f64) -> Result<Sample> {
    // Warm the path (handshake, ARP) before anything is timed.
    ensure!(
        s.bed.ping(0, s.target, 2)?,
        "{} does not carry traffic",
        tunnel.label()
    );
    let cpu_before = cpu_seconds(&s.pids, ticks)?;
    let threads_before = thread_seconds(&s.pids, ticks)?;
    let counter_before = tunnel_tx_bytes(tunnel, s)?;
    let tcp1 = iperf(s, &[], seconds)?;
    let cpu = cpu_seconds(&s.pids, ticks)? - cpu_before;
    let busiest_thread = thread_seconds(&s.pids, ticks)?
        .into_iter()
        .map(|(thread, after)| after - threads_before.get(&thread).copied().unwrap_or(0.0))
        .fold(0.0, f64::max);
    // Clock ticks are 10 ms: a thread's share may round above the total.
    ensure!(
        busiest_thread <= cpu + 0.05,
        "one thread ({busiest_thread:.2} s) used more CPU than its processes ({cpu:.2} s)"
    );
    if let (Some(before), Some(after)) = (counter_before, tunnel_tx_bytes(tunnel, s)?) {
        // The tunnel's own counter must have seen the payload (plus headers).
        ensure!(
            after - before >= tcp1.bytes * 9 / 10,
            "{}: only {} bytes crossed the tunnel for {} bytes measured: traffic bypassed it",
            tunnel.label(),
            after - before,
            tcp1.bytes
        );
    }
    let tcp4 = iperf(s, &["-P", "4"], seconds)?;
    let udp = iperf(s, &["-u", "-b", "0", "-l", "1372"], seconds)?;
    let idle = ping(s, 200)?;
    let loaded = ping_under_load(s, seconds)?;
    let gb = tcp1.bytes as f64 / 1e9;
    let peak_rss = s
        .pids
        .iter()
        .map(|&pid| measure::sample_process(pid, ticks).map(|p| p.peak_rss_kib))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max();
    let pct = |v: &[f64], p| measure::percentile(v, p).context("no ping replies");
    Ok(Sample {
        tcp1_gbps: tcp1.bits_per_second / 1e9,
        tcp4_gbps: tcp4.bits_per_second / 1e9,
        udp_gbps: udp.bits_per_second / 1e9,
        udp_loss_percent: udp.lost_percent.unwrap_or(0.0),
        rtt_idle_p50_ms: pct(&idle, 50.0)?,
        rtt_idle_p99_ms: pct(&idle, 99.0)?,
        rtt_load_p50_ms: pct(&loaded, 50.0)?,
        rtt_load_p99_ms: pct(&loaded, 99.0)?,
        cpu_seconds_per_gb: (!s.pids.is_empty()).then(|| cpu / gb),
        busiest_thread_seconds_per_gb: (!s.pids.is_empty()).then(|| busiest_thread / gb),
        peak_rss_mib: peak_rss.map(|kib| kib as f64 / 1024.0),
    })
}

/// Bytes host 1's tunnel says it sent to host 2 (None for no tunnel).
fn tunnel_tx_bytes(tunnel: Tunnel, s: &Setup) -> Result<Option<u64>> {
    match tunnel {
        Tunnel::Veth => Ok(None),
        Tunnel::Meshd | Tunnel::MeshdSendThread | Tunnel::MeshdNoOffload | Tunnel::MeshdTap => {
            Ok(s.bed.peers(0)?.first().map(|p| p.tx_bytes))
        }
        Tunnel::WireguardGo | Tunnel::Gotatun | Tunnel::BoringtunCli => {
            let wg = &s.wgs[0];
            let out = wg.wg(&s.bed.hosts[0].ns, &["show", &wg.name, "dump"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            let peer = text.lines().nth(1).context("wg show dump has no peer")?;
            Ok(Some(
                peer.split('\t')
                    .nth(6)
                    .context("no transfer-tx column")?
                    .parse()?,
            ))
        }
    }
}

/// CPU seconds of every thread of `pids`, by (process, thread).
fn thread_seconds(pids: &[u32], ticks: f64) -> Result<HashMap<(u32, u32), f64>> {
    let mut threads = HashMap::new();
    for &pid in pids {
        for (tid, seconds) in measure::sample_threads(pid, ticks)? {
            threads.insert((pid, tid), seconds);
        }
    }
    Ok(threads)
}

fn cpu_seconds(pids: &[u32], ticks: f64) -> Result<f64> {
    pids.iter()
        .map(|&pid| measure::sample_process(pid, ticks).map(|s| s.cpu_seconds))
        .sum()
}

fn iperf_server(s: &Setup) -> Result<Child> {
    let server = Command::new("ip")
        .args(["netns", "exec", &s.bed.hosts[1].ns, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (apt-get install iperf3)")?;
    // iperf3 needs a moment to bind before the client connects.
    std::thread::sleep(Duration::from_millis(500));
    Ok(server)
}

fn iperf(s: &Setup, extra: &[&str], seconds: u64) -> Result<IperfResult> {
    let mut server = iperf_server(s)?;
    let (target, secs) = (s.target.to_string(), seconds.to_string());
    let mut args = vec!["timeout", "60", "iperf3", "-c", &target, "-t", &secs, "-J"];
    args.extend_from_slice(extra);
    let out = exec_in(&s.bed.hosts[0].ns, &args)?;
    finish(&mut server);
    measure::parse_iperf3(&String::from_utf8_lossy(&out.stdout))
}

fn ping(s: &Setup, count: u32) -> Result<Vec<f64>> {
    let (count, target) = (count.to_string(), s.target.to_string());
    let out = exec_in(
        &s.bed.hosts[0].ns,
        &["ping", "-i", "0.01", "-c", &count, "-W", "1", &target],
    )?;
    Ok(measure::parse_ping_rtts(&String::from_utf8_lossy(
        &out.stdout,
    )))
}

fn ping_under_load(s: &Setup, seconds: u64) -> Result<Vec<f64>> {
    let mut server = iperf_server(s)?;
    let (target, secs) = (s.target.to_string(), (seconds + 1).to_string());
    let mut client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.bed.hosts[0].ns,
            "iperf3",
            "-c",
            &target,
            "-t",
            &secs,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let rtts = ping(s, (seconds * 80) as u32);
    finish(&mut client);
    finish(&mut server);
    rtts
}

/// Waits (bounded) for a helper process, killing it if it lingers.
fn finish(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn median_sample(runs: &[Run], tunnel: Tunnel) -> Sample {
    let of = |f: &dyn Fn(&Sample) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.tunnel == tunnel)
            .map(|r| f(&r.sample))
            .collect();
        measure::median(&v).unwrap_or(f64::NAN)
    };
    let opt = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.tunnel == tunnel)
            .filter_map(|r| f(&r.sample))
            .collect();
        measure::median(&v)
    };
    Sample {
        tcp1_gbps: of(&|s| s.tcp1_gbps),
        tcp4_gbps: of(&|s| s.tcp4_gbps),
        udp_gbps: of(&|s| s.udp_gbps),
        udp_loss_percent: of(&|s| s.udp_loss_percent),
        rtt_idle_p50_ms: of(&|s| s.rtt_idle_p50_ms),
        rtt_idle_p99_ms: of(&|s| s.rtt_idle_p99_ms),
        rtt_load_p50_ms: of(&|s| s.rtt_load_p50_ms),
        rtt_load_p99_ms: of(&|s| s.rtt_load_p99_ms),
        cpu_seconds_per_gb: opt(&|s| s.cpu_seconds_per_gb),
        busiest_thread_seconds_per_gb: opt(&|s| s.busiest_thread_seconds_per_gb),
        peak_rss_mib: opt(&|s| s.peak_rss_mib),
    }
}

fn print_table(
    medians: &[(Tunnel, Sample)],
    rounds: usize,
    seconds: u64,
    floor: f64,
    floors: &RoundTripFloors,
) {
    println!(
        "\nMedians of {rounds} round(s), {seconds} s per iperf3 run, 2 namespaces over veth:\n"
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>7} {:>13} {:>13} {:>9} {:>8}",
        "tunnel",
        "tcp Gb/s",
        "tcp x4",
        "udp Gb/s",
        "loss %",
        "rtt idle ms",
        "rtt load ms",
        "cpu s/GB",
        "rss MiB"
    );
    let or_dash = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    for (t, s) in medians {
        println!(
            "{:<14} {:>9.3} {:>9.3} {:>9.3} {:>7.1} {:>6.3}/{:<6.3} {:>6.3}/{:<6.3} {:>9} {:>8}",
            t.label(),
            s.tcp1_gbps,
            s.tcp4_gbps,
            s.udp_gbps,
            s.udp_loss_percent,
            s.rtt_idle_p50_ms,
            s.rtt_idle_p99_ms,
            s.rtt_load_p50_ms,
            s.rtt_load_p99_ms,
            or_dash(s.cpu_seconds_per_gb),
            or_dash(s.peak_rss_mib)
        );
    }
    println!("(rtt columns: p50/p99; cpu: both ends' tunnel processes per GB carried)");
    println!("seal+open floor: {floor:.2} s/GB (ring ChaCha20-Poly1305, 1420 B, one core)");
    for (t, s) in medians.iter().filter(|(t, _)| t.is_meshd()) {
        if let Some(cpu) = s.cpu_seconds_per_gb {
            println!("{:<13} cpu / floor {:.2}x", t.label(), cpu / floor);
        }
    }
    // How a tunnel would scale with cores to spare: one flow can go no
    // faster than its busiest thread gets through the bytes.
    for (t, s) in medians.iter().filter(|(t, _)| *t != Tunnel::Veth) {
        if let Some(busiest) = s.busiest_thread_seconds_per_gb {
            println!(
                "{:<13} busiest thread {busiest:.2} s/GB: one flow's bound with a core per thread {:.1} Gbit/s",
                t.label(),
                8.0 / busiest
            );
        }
    }
    println!(
        "idle rtt floor: a plain TUN-UDP relay without crypto adds {:.3} ms to the kernel's ping",
        floors.relay_added_ms()
    );
    if let Some((_, veth)) = medians.iter().find(|(t, _)| *t == Tunnel::Veth) {
        for (t, s) in medians.iter().filter(|(t, _)| *t != Tunnel::Veth) {
            println!(
                "{:<13} idle rtt added over veth {:.3} ms ({:+.3} ms over the relay floor)",
                t.label(),
                s.rtt_idle_p50_ms - veth.rtt_idle_p50_ms,
                s.rtt_idle_p50_ms - veth.rtt_idle_p50_ms - floors.relay_added_ms()
            );
        }
    }
    let Some((_, meshd)) = medians.iter().find(|(t, _)| *t == Tunnel::Meshd) else {
        return;
    };
    let best_peer = medians
        .iter()
        .filter(|(t, _)| t.is_peer())
        .map(|(_, s)| s.tcp1_gbps)
        .fold(f64::NAN, f64::max);
    if let Some((_, veth)) = medians.iter().find(|(t, _)| *t == Tunnel::Veth) {
        println!(
            "meshd tcp: {:.3} x veth, {:.2} x the best user-space peer",
            meshd.tcp1_gbps / veth.tcp1_gbps,
            meshd.tcp1_gbps / best_peer
        );
    }
    for (t, other) in medians.iter().filter(|(t, _)| *t != Tunnel::Meshd) {
        println!(
            "meshd / {:<13} tcp {:.2}x  tcp x4 {:.2}x  udp {:.2}x  rtt p50 {:.2}x",
            t.label(),
            meshd.tcp1_gbps / other.tcp1_gbps,
            meshd.tcp4_gbps / other.tcp4_gbps,
            meshd.udp_gbps / other.udp_gbps,
            meshd.rtt_idle_p50_ms / other.rtt_idle_p50_ms
        );
    }
}

fn write_json(
    path: &Path,
    runs: &[Run],
    medians: &[(Tunnel, Sample)],
    seconds: u64,
    floor: f64,
    floors: &RoundTripFloors,
) -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(0);
    let medians: Vec<_> = medians
        .iter()
        .map(|(t, s)| serde_json::json!({ "tunnel": t, "median": s }))
        .collect();
    let doc = serde_json::json!({
        "machine": { "cpus": cpus, "kernel": kernel.trim() },
        "seconds_per_run": seconds,
        "seal_open_floor_seconds_per_gb": floor,
        "round_trip_floors_ms": floors,
        "runs": runs,
        "medians": medians,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    Ok(())
}

fn draw_chart(path: &Path, medians: &[(Tunnel, Sample)]) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    // The veth ceiling is tens of times the tunnels: it goes in the title,
    // so the tunnels stay readable on a linear scale.
    let tunnels: Vec<&(Tunnel, Sample)> =
        medians.iter().filter(|(t, _)| *t != Tunnel::Veth).collect();
    let ceiling = medians
        .iter()
        .find(|(t, _)| *t == Tunnel::Veth)
        .map_or_else(String::new, |(_, s)| {
            format!(" (plain veth: {:.1})", s.tcp1_gbps)
        });
    let names: Vec<&str> = tunnels.iter().map(|(t, _)| t.label()).collect();
    let throughput: Vec<[f64; 3]> = tunnels
        .iter()
        .map(|(_, s)| [s.tcp1_gbps, s.tcp4_gbps, s.udp_gbps])
        .collect();
    let latency: Vec<[f64; 3]> = tunnels
        .iter()
        .map(|(_, s)| [s.rtt_idle_p50_ms, s.rtt_load_p50_ms, s.rtt_load_p99_ms])
        .collect();
    let title = format!("Throughput, Gbit/s{ceiling}");
    bars(&left, &title, &names, &throughput, ["tcp", "tcp x4", "udp"])?;
    bars(
        &right,
        "Ping RTT, ms",
        &names,
        &latency,
        ["idle p50", "load p50", "load p99"],
    )?;
    root.present()?;
    Ok(())
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    names: &[&str],
    values: &[[f64; 3]],
    series: [&str; 3],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let max = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..names.len() as f64, 0f64..max.max(1e-3))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                names.get(i).map(|n| n.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colours = [BLUE, GREEN, RED];
    for (k, (label, colour)) in series.iter().zip(colours).enumerate() {
        let rects = values.iter().enumerate().map(move |(i, v)| {
            let x0 = i as f64 + 0.1 + k as f64 * 0.27;
            Rectangle::new([(x0, 0.0), (x0 + 0.25, v[k])], colour.filled())
        });
        chart
            .draw_series(rects)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// What the machine itself charges a round trip, measured in this run so
/// the tunnels' idle RTT can be read against it (README, Performance).
#[derive(Debug, Clone, Copy, Serialize)]
struct RoundTripFloors {
    /// Kernel ping over the underlay veth, p50 ms.
    kernel_ping_ms: f64,
    /// A user-space UDP echo between the two namespaces: one thread woken
    /// on each side per round trip (threads of this process), p50 ms.
    udp_echo_ms: f64,
    /// Ping through the plain relay (`plain_relay`), p50 ms.
    plain_relay_ms: f64,
}

impl RoundTripFloors {
    /// What the least user-space tunnel adds to the kernel's round trip.
    fn relay_added_ms(&self) -> f64 {
        self.plain_relay_ms - self.kernel_ping_ms
    }
}

/// Measures `RoundTripFloors` on a fresh pair of namespaces.
fn round_trip_floors(bins: &Binaries, round_trips: usize) -> Result<RoundTripFloors> {
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        mode: Mode::Tun,
    };
    let bed = Testbed::new("floor", &options, bins.clone())?;
    let udp_echo_ms = udp_echo_p50(&bed, round_trips)?;
    let s = Setup {
        target: bed.hosts[1].underlay,
        bed,
        wgs: Vec::new(),
        pids: Vec::new(),
    };
    let kernel = ping(&s, round_trips as u32)?;
    let plain_relay_ms = {
        let _relays = PlainRelays::start(&s.bed)?;
        let through = Setup {
            target: RELAY_ADDRESSES[1],
            ..s
        };
        let rtts = ping(&through, round_trips as u32)?;
        ensure!(
            rtts.len() == round_trips,
            "the plain relay answered {} of {round_trips} pings",
            rtts.len()
        );
        p50(&rtts)
    };
    let floors = RoundTripFloors {
        kernel_ping_ms: p50(&kernel),
        udp_echo_ms,
        plain_relay_ms,
    };
    eprintln!(
        "round-trip floors (p50): kernel ping {:.3} ms, user-space UDP echo {:.3} ms, \
         plain TUN-UDP relay without crypto {:.3} ms ({:.3} ms over the kernel's)",
        floors.kernel_ping_ms,
        floors.udp_echo_ms,
        floors.plain_relay_ms,
        floors.relay_added_ms()
    );
    Ok(floors)
}

fn p50(v: &[f64]) -> f64 {
    measure::percentile(v, 50.0).unwrap_or(f64::NAN)
}

/// A UDP echo between the two namespaces, from threads of this process.
fn udp_echo_p50(bed: &Testbed, round_trips: usize) -> Result<f64> {
    let (client, server) = (bed.hosts[0].underlay, bed.hosts[1].underlay);
    let echo = meshnet_testbed::spawn_in_netns(&bed.hosts[1].ns, move || {
        let socket = std::net::UdpSocket::bind((server, 5400))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 64];
        for _ in 0..round_trips {
            let (n, from) = socket.recv_from(&mut buf)?;
            socket.send_to(&buf[..n], from)?;
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let rtts = meshnet_testbed::in_netns(&bed.hosts[0].ns, move || {
        let socket = std::net::UdpSocket::bind((client, 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.connect((server, 5400))?;
        let mut rtts = Vec::with_capacity(round_trips);
        let mut buf = [0u8; 64];
        for _ in 0..round_trips {
            let sent = Instant::now();
            socket.send(&[0u8; 56])?;
            socket.recv(&mut buf)?;
            rtts.push(sent.elapsed().as_secs_f64() * 1000.0);
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(rtts)
    })?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(p50(&rtts))
}

/// Turns this binary into one end of the plain relay: "TUN-ADDRESS
/// LOCAL-UNDERLAY PEER-UNDERLAY".
const RELAY_ENV: &str = "MESHNET_BENCH_RELAY";
/// The relay's TUN addresses, one per host (RFC 2544's benchmarking
/// range, inside the test namespaces only).
const RELAY_ADDRESSES: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)];
const RELAY_DEVICE: &str = "relay0";
const RELAY_PORT: u16 = 5401;
/// A relay left behind by a killed bench exits by itself after this.
const RELAY_LIFETIME: Duration = Duration::from_secs(120);

/// The two ends of the plain relay, as processes of their own (like two
/// tunnel agents); killed on drop.
struct PlainRelays(Vec<Child>);

impl PlainRelays {
    fn start(bed: &Testbed) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut relays = Self(Vec::new());
        for (i, host) in bed.hosts.iter().enumerate().take(2) {
            let peer = bed.hosts[1 - i].underlay;
            let spec = format!("{} {} {peer}", RELAY_ADDRESSES[i], host.underlay);
            let child = Command::new("ip")
                .args(["netns", "exec", &host.ns])
                .arg(&exe)
                .env(RELAY_ENV, spec)
                .stdin(Stdio::null())
                .spawn()
                .context("starting the plain relay")?;
            relays.0.push(child);
        }
        for (i, host) in bed.hosts.iter().enumerate().take(2) {
            let up = wait_until(Duration::from_secs(5), || {
                exec_in(&host.ns, &["ip", "-4", "addr", "show", "dev", RELAY_DEVICE]).is_ok_and(
                    |o| {
                        String::from_utf8_lossy(&o.stdout).contains(&RELAY_ADDRESSES[i].to_string())
                    },
                )
            });
            ensure!(
                up,
                "the plain relay's device did not come up in {}",
                host.ns
            );
        }
        Ok(relays)
    }
}

impl Drop for PlainRelays {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The least work a user-space tunnel end can do per packet: wait in
/// poll(2) on a TUN device and a UDP socket, move one packet, wait again.
/// No crypto, no batching, no runtime: what is left of a tunnel's round
/// trip is the machine's wake-ups, system calls and copies.
fn plain_relay(spec: &str) -> Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let parts: Vec<Ipv4Addr> = spec
        .split(' ')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{RELAY_ENV}={spec:?}"))?;
    let [address, local, peer] = parts[..] else {
        anyhow::bail!("{RELAY_ENV} wants three addresses, got {spec:?}");
    };
    let device = tun_rs::DeviceBuilder::new()
        .name(RELAY_DEVICE)
        .ipv4(address, 24, None)
        .build_sync()?;
    let socket = std::net::UdpSocket::bind((local, RELAY_PORT))?;
    let peer = std::net::SocketAddr::from((peer, RELAY_PORT));
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + RELAY_LIFETIME;
    let second = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    while Instant::now() < deadline {
        let mut fds = [
            PollFd::new(&*device, PollFlags::IN),
            PollFd::new(&socket, PollFlags::IN),
        ];
        poll(&mut fds, Some(&second))?;
        let (from_device, from_peer) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if from_device {
            let n = device.recv(&mut buf)?;
            socket.send_to(&buf[..n], peer)?;
        }
        if from_peer {
            let n = socket.recv(&mut buf)?;
            device.send(&buf[..n])?;
        }
    }
    Ok(())
}

/// ring's ChaCha20-Poly1305: the least CPU any WireGuard pair (one end
/// seals, the other opens) can spend per GB. Measured in this run, on this
/// machine, so the ratio to the tunnels' CPU is fair.
fn crypto_floor_seconds_per_gb() -> f64 {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    const PACKET: usize = 1420;
    const PACKETS: u64 = 200_000;
    let Ok(key) = UnboundKey::new(&CHACHA20_POLY1305, &[7; 32]) else {
        return f64::NAN;
    };
    let key = LessSafeKey::new(key);
    let mut buf = vec![0u8; PACKET + 16];
    let start = Instant::now();
    for i in 0..PACKETS {
        let nonce = |i: u64| {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&i.to_le_bytes());
            Nonce::assume_unique_for_key(n)
        };
        buf.truncate(PACKET);
        if key
            .seal_in_place_append_tag(nonce(i), Aad::empty(), &mut buf)
            .is_err()
            || key.open_in_place(nonce(i), Aad::empty(), &mut buf).is_err()
        {
            return f64::NAN;
        }
        std::hint::black_box(&buf);
    }
    let bytes = (PACKETS * PACKET as u64) as f64;
    start.elapsed().as_secs_f64() / (bytes / 1e9)
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}
