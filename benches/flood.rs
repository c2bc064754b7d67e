//! What a handshake flood costs the agent: `cargo bench --bench flood`.
//!
//! Three hosts in namespaces; host 3 floods host 1's agent with valid-mac1
//! initiations (`meshnet_testbed::flood`) from one source address, then
//! from eight, while host 2 pings host 1 through their tunnel. Prints, per
//! run: initiations sent per second, the flooded agent's CPU (cores), the
//! cookie replies the flooder got, and the pings answered with their RTT,
//! beside the same pings with no flood. Environment: MESHNET_FLOOD_SECONDS
//! (default 10). Under `cargo test` (no `--bench`) a one-second self-check
//! runs instead.

use std::time::Duration;

use anyhow::{Result, ensure};
use meshnet_testbed::flood::{FloodReport, plan};
use meshnet_testbed::{MeshOptions, Testbed, measure, wait_until};

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let seconds = if bench {
        std::env::var("MESHNET_FLOOD_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10)
    } else {
        eprintln!("flood bench self-check (run `cargo bench --bench flood` for the figures)");
        1
    };
    let bins = meshnet_testbed::this_build!();
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(1),
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("floodb", &options, bins)?;
    bed.start(0)?;
    bed.start(1)?;
    let target = bed.hosts[0].overlay;
    ensure!(
        wait_until(Duration::from_secs(15), || bed
            .ping(1, target, 1)
            .unwrap_or(false)),
        "no tunnel"
    );
    let idle = bed.exec(
        1,
        &[
            "ping",
            "-c",
            "100",
            "-i",
            "0.01",
            "-W",
            "1",
            &target.to_string(),
        ],
    )?;
    let idle = measure::parse_ping_rtts(&String::from_utf8_lossy(&idle.stdout));
    println!(
        "no flood: rtt p50 {:.3} ms, p99 {:.3} ms ({} of 100 answered)",
        measure::percentile(&idle, 50.0).unwrap_or(f64::NAN),
        measure::percentile(&idle, 99.0).unwrap_or(f64::NAN),
        idle.len()
    );
    for sources in [1, 8] {
        let report = plan(&bed, 0, 2, 1, sources)?.run(seconds)?;
        print_report(sources, &report);
        ensure!(report.sent > 0, "the flood sent nothing");
    }
    Ok(())
}

fn print_report(sources: u8, r: &FloodReport) {
    println!(
        "flood from {sources} source(s): {:.0} initiations/s sent ({} refused by the sender's kernel), \
         agent CPU {:.2} cores, {} cookie replies; pings {}/{} answered, rtt p50 {:.3} ms, p99 {:.3} ms",
        r.rate(),
        r.send_errors,
        r.agent_cpu,
        r.cookies,
        r.pings_answered,
        r.pings_sent,
        r.rtt_p50_ms.unwrap_or(f64::NAN),
        r.rtt_p99_ms.unwrap_or(f64::NAN),
    );
}
