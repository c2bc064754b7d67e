//! The meshnet demo: three hosts in network namespaces, each running meshd
//! in TAP mode with a container attached; pings between containers across
//! hosts, the agent's service address, names resolved through the cluster
//! DNS, `meshctl containers`, `meshctl dns` and `meshctl peers`, narrated.
//!
//! Run it through `scripts/demo.sh`, which installs what it needs and
//! builds the binaries first. Everything it creates is removed at the end.

use std::time::Duration;

use anyhow::{Result, ensure};
use meshnet::config::Mode;
use meshnet::core::PeerState;
use meshnet_testbed::{Binaries, MeshOptions, Testbed, exec_in, wait_until};

fn main() -> Result<()> {
    let bins = Binaries::beside_current_exe()?;
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(5),
        mode: Mode::Tap,
    };
    say("Building 3 hosts (network namespaces) on a bridged underlay 192.0.2.0/24");
    let mut bed = Testbed::new("demo", &options, bins)?;
    println!("   h1's config:\n");
    print!(
        "{}",
        indent(&std::fs::read_to_string(&bed.hosts[0].config)?)
    );

    say("Starting meshd on every host");
    bed.start_all()?;
    let up = wait_until(Duration::from_secs(15), || {
        (0..3).all(|i| {
            bed.peers(i)
                .is_ok_and(|p| p.iter().all(|p| p.state == PeerState::Up))
        })
    });
    ensure!(up, "the mesh did not come up; h1's log:\n{}", bed.log(0));
    println!("   all 6 tunnels are up");

    let mut containers = Vec::new();
    for (host, name, stack, extra) in [
        (
            0,
            "web",
            "shop",
            &["--service", "www", "--port", "http:8080/tcp"][..],
        ),
        (1, "api", "shop", &[][..]),
        (2, "db", "shop", &[][..]),
    ] {
        let ns = bed.add_container_ns(host, name)?;
        say(&format!(
            "{} $ meshctl attach --netns {ns} --name {name} --stack {stack} {}",
            bed.hosts[host].name,
            extra.join(" ")
        ));
        let mut args = vec!["--stack", stack];
        args.extend_from_slice(extra);
        let addr = bed.attach(host, &ns, name, &args)?;
        println!("   {addr}");
        containers.push((name, ns, addr));
    }
    let (web, api, db) = (&containers[0], &containers[1], &containers[2]);
    for (from, to) in [(web, api), (api, db), (db, web)] {
        run_in(
            &from.1,
            from.0,
            &["ping", "-c", "2", "-i", "0.2", &to.2.to_string()],
        )?;
    }
    run_in(&web.1, web.0, &["ping", "-c", "1", "169.254.169.250"])?;
    // Records reach every host through the mesh within moments.
    std::thread::sleep(Duration::from_millis(500));
    run_in(&web.1, web.0, &["getent", "hosts", "db"])?;
    run_in(&web.1, web.0, &["dig", "+short", "api.shop.mesh.internal"])?;
    run_in(
        &db.1,
        db.0,
        &["dig", "+short", "SRV", "_http._tcp.www.shop.mesh.internal"],
    )?;
    run_in(&db.1, db.0, &["dig", "+short", "-x", &web.2.to_string()])?;
    say("web $ ip neigh   (remote containers sit at the agent's MAC)");
    print!(
        "{}",
        indent(&String::from_utf8_lossy(
            &exec_in(&web.1, &["ip", "neigh"])?.stdout
        ))
    );

    for args in [
        &["containers"][..],
        &["dns"][..],
        &["peers"][..],
        &["status"][..],
    ] {
        say(&format!("h1 $ meshctl {}", args.join(" ")));
        let out = bed.meshctl(0, args)?;
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    }

    let dir = bed.dir().to_owned();
    drop(bed);
    say(&format!(
        "Done: namespaces, agents and files removed ({} gone: {})",
        dir.display(),
        !dir.exists()
    ));
    Ok(())
}

fn say(what: &str) {
    println!("\n== {what}");
}

fn run_in(ns: &str, who: &str, args: &[&str]) -> Result<()> {
    say(&format!("{who} $ {}", args.join(" ")));
    let out = exec_in(ns, args)?;
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    ensure!(out.status.success(), "{} failed", args.join(" "));
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("   {l}\n"))
        .collect::<String>()
}
