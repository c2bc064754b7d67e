//! The meshnet demo: three hosts in network namespaces, each running meshd,
//! then pings across the overlay and `meshctl peers`, narrated.
//!
//! Run it through `scripts/demo.sh`, which installs what it needs and
//! builds the binaries first. Everything it creates is removed at the end.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use meshnet::core::PeerState;
use meshnet::testbed::{Binaries, MeshOptions, Testbed, wait_until};

fn main() -> Result<()> {
    let bins = Binaries::beside_current_exe()?;
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(5),
        ..MeshOptions::default()
    };
    println!(
        "== Building 3 hosts (network namespaces h1, h2, h3) on a bridged underlay 192.0.2.0/24"
    );
    let mut bed = Testbed::new("demo", &options, bins)?;
    println!("   h1's config ({}):\n", bed.hosts[0].config.display());
    let config = std::fs::read_to_string(&bed.hosts[0].config)?;
    println!("{}", indent(&config));

    println!("== Starting meshd on every host");
    bed.start_all()?;
    let up = wait_until(Duration::from_secs(15), || {
        (0..3).all(|i| {
            bed.peers(i)
                .is_ok_and(|p| p.iter().all(|p| p.state == PeerState::Up))
        })
    });
    ensure!(up, "the mesh did not come up; h1's log:\n{}", bed.log(0));
    println!("   all 6 tunnels are up\n");

    for (from, to) in [(0, 1), (0, 2), (1, 2)] {
        let target = bed.hosts[to].overlay.to_string();
        println!(
            "== {} $ ping -c 3 {target}   ({})",
            bed.hosts[from].name, bed.hosts[to].name
        );
        let out = bed.exec(from, &["ping", "-c", "3", "-i", "0.2", &target])?;
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
        ensure!(out.status.success(), "ping failed");
        println!();
    }

    println!("== h1 $ ping -c 1 10.42.99.1   (an overlay address no host owns)");
    let out = bed.exec(0, &["ping", "-c", "1", "-W", "1", "10.42.99.1"])?;
    println!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

    for args in [&["peers"][..], &["status"][..]] {
        println!("== h1 $ meshctl {}", args.join(" "));
        let out = bed.meshctl(0, args)?;
        println!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    }

    println!("== Stopping h1's agent (SIGTERM): its device and socket go away");
    let status = bed.stop(0)?;
    let link = Command::new("ip")
        .args(["-n", &bed.hosts[0].ns, "link", "show", "mesh0"])
        .output()?;
    println!(
        "   meshd exited with {status}; mesh0 present afterwards: {}",
        link.status.success()
    );
    let dir = bed.dir().to_owned();
    drop(bed);
    println!(
        "\n== Done: namespaces, agents and files removed ({} gone: {})",
        dir.display(),
        !dir.exists()
    );
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("   {l}\n"))
        .collect::<String>()
}
