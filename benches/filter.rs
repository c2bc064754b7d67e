//! What the bridge filter costs traffic between two containers of one
//! host (TAP mode): `cargo bench --bench filter`.
//!
//! One host's two containers, iperf3 TCP between them, in alternating
//! rounds with the agent's `bridge meshnet` nftables table loaded and
//! deleted. Prints each round and the medians. Under `cargo test` (no
//! `--bench`) a one-round, one-second self-check of each case runs
//! instead.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use meshnet::config::Mode;
use meshnet_testbed::{MeshOptions, Testbed, exec_in, measure, require_tools};

fn main() -> Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let (rounds, seconds) = if bench {
        (6, 3)
    } else {
        eprintln!("filter bench self-check (run `cargo bench --bench filter` for the figures)");
        (2, 1)
    };
    require_tools(
        &["nft", "iperf3"],
        "run scripts/test.sh (installs nftables and iperf3)",
    );
    let bins = meshnet_testbed::this_build!();
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new("l2perf", &options, bins)?;
    bed.start_all()?;
    bed.wait_all_up(Duration::from_secs(15))?;
    let (c1, c2) = (
        bed.add_container_ns(0, "c1")?,
        bed.add_container_ns(0, "c2")?,
    );
    bed.attach(0, &c1, "c1", &[])?;
    let a2 = bed.attach(0, &c2, "c2", &[])?;
    let host = bed.hosts[0].ns.clone();
    let listed = bed.exec(0, &["nft", "list", "table", "bridge", "meshnet"])?;
    ensure!(listed.status.success(), "no bridge filter: {listed:?}");
    let table = String::from_utf8_lossy(&listed.stdout).into_owned();

    let mut results: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..2 * rounds {
        let filtered = round % 2 == 0;
        if filtered {
            let mut nft = Command::new("ip")
                .args(["netns", "exec", &host, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()?;
            nft.stdin
                .take()
                .context("nft's stdin")?
                .write_all(table.as_bytes())?;
            ensure!(nft.wait()?.success(), "loading the filter failed");
        } else {
            let out = exec_in(&host, &["nft", "delete", "table", "bridge", "meshnet"])?;
            ensure!(out.status.success(), "deleting the filter: {out:?}");
        }
        let mut server = Command::new("ip")
            .args(["netns", "exec", &c2, "iperf3", "-s", "-1"])
            .stdout(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        let secs = seconds.to_string();
        let out = exec_in(&c1, &["iperf3", "-J", "-t", &secs, "-c", &a2.to_string()])?;
        let _ = server.wait();
        let r = measure::parse_iperf3(&String::from_utf8_lossy(&out.stdout))?;
        let gbps = r.bits_per_second / 1e9;
        let label = if filtered {
            "with filter"
        } else {
            "without filter"
        };
        eprintln!(
            "[round {}] same-host TCP {label}: {gbps:.2} Gbit/s",
            round / 2 + 1
        );
        results[usize::from(!filtered)].push(gbps);
    }
    for (label, r) in ["with filter", "without filter"].iter().zip(&results) {
        let median = measure::median(r).context("no rounds")?;
        println!("same-host TCP {label}: {r:.2?} Gbit/s, median {median:.2}");
    }
    Ok(())
}
