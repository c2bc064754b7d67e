//! Containers on the mesh (TAP mode): two hosts running the real meshd,
//! containers as network namespaces attached with `meshctl attach`.
//!
//! Needs root, iproute2 and ping; fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::time::Duration;

use meshnet::config::Mode;
use meshnet::core::PeerState;
use meshnet_testbed::{Binaries, MeshOptions, Testbed, neighbour_mac, wait_until};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn tap_mesh(tag: &str) -> Testbed {
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

fn ping(bed: &Testbed, ns: &str, to: Ipv4Addr) -> bool {
    let out = meshnet_testbed::ping_in(ns, to, 2).unwrap();
    out.status.success()
        || panic!(
            "ping {to} from {ns} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            bed.log(0)
        )
}

/// The MAC `ns` has cached for `addr`.
fn host_links(bed: &Testbed, i: usize) -> String {
    String::from_utf8_lossy(&bed.exec(i, &["ip", "-o", "link"]).unwrap().stdout).into_owned()
}

#[test]
fn containers_on_different_hosts_reach_each_other_through_proxy_arp() {
    let mut bed = tap_mesh("ctr");
    let (c1, c3, c2) = (
        bed.add_container_ns(0, "c1").unwrap(),
        bed.add_container_ns(0, "c3").unwrap(),
        bed.add_container_ns(1, "c2").unwrap(),
    );
    let a1 = bed
        .attach(0, &c1, "web", &["--stack", "shop", "--service", "web"])
        .unwrap();
    let a3 = bed.attach(0, &c3, "db", &["--stack", "shop"]).unwrap();
    let a2 = bed.attach(1, &c2, "api", &[]).unwrap();
    assert_eq!(
        (a1, a3, a2),
        (
            Ipv4Addr::new(10, 42, 1, 2),
            Ipv4Addr::new(10, 42, 1, 3),
            Ipv4Addr::new(10, 42, 2, 2)
        )
    );

    assert!(ping(&bed, &c1, a2), "across hosts");
    assert!(ping(&bed, &c2, a1), "and back");
    assert!(ping(&bed, &c1, a3), "same host");
    assert!(
        ping(&bed, &c1, Ipv4Addr::new(10, 42, 2, 1)),
        "the other host itself"
    );
    assert!(
        ping(&bed, &c1, Ipv4Addr::new(169, 254, 169, 250)),
        "the agent's service address"
    );

    // A remote container sits at the agent's MAC; a local one at its own.
    assert_eq!(neighbour_mac(&c1, a2), Some(bed.agent_mac(0).unwrap()));
    let db = bed
        .containers(0)
        .unwrap()
        .into_iter()
        .find(|c| c.name == "db")
        .unwrap();
    assert_eq!(neighbour_mac(&c1, a3), Some(db.mac));
    assert_ne!(db.mac, bed.agent_mac(0).unwrap());

    // A container that takes another local address gets nowhere with it.
    let add = meshnet_testbed::exec_in(&c1, &["ip", "addr", "add", "10.42.1.99/16", "dev", "eth0"])
        .unwrap();
    assert!(add.status.success(), "{add:?}");
    let spoof = meshnet_testbed::exec_in(
        &c1,
        &[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "10.42.1.99",
            &a2.to_string(),
        ],
    )
    .unwrap();
    assert!(
        !spoof.status.success(),
        "a borrowed address crossed the mesh"
    );
    // The bridge filter drops these before the agent sees them (see
    // tests/isolation.rs); the agent's own SpoofedSource check stays as a
    // second line and is covered by the node's unit tests.

    // The container got what attach promises.
    let link = meshnet_testbed::exec_in(&c1, &["ip", "-o", "addr", "show", "eth0"]).unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("10.42.1.2/16"),
        "{link:?}"
    );
    let mtu = meshnet_testbed::exec_in(&c1, &["cat", "/sys/class/net/eth0/mtu"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1420");
    let listed = bed.containers(0).unwrap();
    let web = listed.iter().find(|c| c.name == "web").unwrap();
    assert_eq!(
        (
            web.stack.as_str(),
            web.service.as_deref(),
            web.netns.as_str()
        ),
        ("shop", Some("web"), c1.as_str())
    );
}

/// The MTU of host `i`'s bridge (the agent sets it to the inner MTU).
fn bridge_mtu(bed: &Testbed, i: usize) -> String {
    let out = bed
        .exec(i, &["cat", "/sys/class/net/mesh-br0/mtu"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn same_host_containers_talk_over_the_bridge_and_a_restart_keeps_every_address() {
    let mut bed = tap_mesh("restart");
    let (c1, c3, c2) = (
        bed.add_container_ns(0, "c1").unwrap(),
        bed.add_container_ns(0, "c3").unwrap(),
        bed.add_container_ns(1, "c2").unwrap(),
    );
    let a1 = bed.attach(0, &c1, "web", &[]).unwrap();
    let a3 = bed.attach(0, &c3, "db", &[]).unwrap();
    let a2 = bed.attach(1, &c2, "api", &[]).unwrap();
    let before = bed.containers(0).unwrap();
    let mtu = bridge_mtu(&bed, 0);

    // With h1's agent gone, local traffic still flows: it never used it.
    bed.stop(0).unwrap();
    assert!(ping(&bed, &c1, a3));

    bed.start(0).unwrap();
    assert_eq!(
        bed.containers(0).unwrap(),
        before,
        "addresses changed across a restart"
    );
    assert!(wait_until(Duration::from_secs(15), || bed
        .peers(0)
        .is_ok_and(|p| p[0].state == PeerState::Up)));
    assert!(
        ping(&bed, &c1, a2),
        "traffic did not resume after the restart"
    );
    // The bridge outlives the agent; it is not an underlay link whose MTU
    // the restarted agent must fit inside (that took 80 off every restart).
    assert_eq!(bridge_mtu(&bed, 0), mtu, "the MTU shrank across a restart");

    // The same after a crash.
    bed.kill(0).unwrap();
    bed.start(0).unwrap();
    assert_eq!(bed.containers(0).unwrap(), before);
    assert_eq!(bridge_mtu(&bed, 0), mtu, "the MTU shrank across a crash");
    assert!(wait_until(Duration::from_secs(15), || bed
        .peers(0)
        .is_ok_and(|p| p[0].state == PeerState::Up)));
    assert!(ping(&bed, &c2, a1));
}

#[test]
fn detach_removes_the_veth_and_frees_the_address() {
    let mut bed = tap_mesh("detach");
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c4 = bed.add_container_ns(0, "c4").unwrap();
    let a1 = bed.attach(0, &c1, "web", &[]).unwrap();
    assert!(host_links(&bed, 0).contains("mv0a2a0102"));

    let out = bed.meshctl(0, &["detach", "--netns", &c1]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let eth0 = meshnet_testbed::exec_in(&c1, &["ip", "link", "show", "eth0"]).unwrap();
    assert!(!eth0.status.success(), "eth0 is still in the container");
    assert!(
        !host_links(&bed, 0).contains("mv0a2a0102"),
        "host veth left behind"
    );
    assert!(bed.containers(0).unwrap().is_empty());

    assert_eq!(
        bed.attach(0, &c4, "other", &[]).unwrap(),
        a1,
        "the freed address was not reused"
    );
    let again = bed.meshctl(0, &["detach", "--netns", &c1]).unwrap();
    assert!(!again.status.success());
}

#[test]
fn bad_attaches_are_refused_clearly_and_leave_nothing_half_made() {
    let mut bed = tap_mesh("bad");
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(0, "c2").unwrap();
    let busy = bed.add_container_ns(0, "busy").unwrap();
    let routed = bed.add_container_ns(0, "routed").unwrap();
    let a1 = bed.attach(0, &c1, "web", &[]).unwrap();
    let refuse = |args: &[&str], needle: &str| {
        let mut full = vec!["attach"];
        full.extend_from_slice(args);
        let out = bed.meshctl(0, &full).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    };
    refuse(
        &["--netns", "no-such-ns-here", "--name", "x"],
        "does not exist",
    );
    refuse(
        &["--netns", &c2, "--name", "web"],
        "already exists in stack default",
    );
    refuse(&["--netns", &c1, "--name", "again"], "already attached");
    refuse(
        &["--netns", &c2, "--name", "x", "--ip", &a1.to_string()],
        "already held by container web",
    );
    refuse(
        &["--netns", &c2, "--name", "x", "--ip", "10.42.2.9"],
        "outside this host's subnet",
    );
    refuse(&["--netns", &c2, "--name", "bad name"], "not valid");
    refuse(
        &["--netns", &c2, "--name", "h1", "--stack", "hosts"],
        "reserved for host names",
    );
    let mut ports = vec!["--netns", &c2, "--name", "x", "--service", "s"];
    let many: Vec<String> = (1..=9).map(|i| format!("p{i}:{i}/tcp")).collect();
    for p in &many {
        ports.extend(["--port", p]);
    }
    refuse(&ports, "at most 8");

    // A failure half-way through the plumbing is rolled back.
    let dummy = meshnet_testbed::exec_in(
        &busy,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ],
    )
    .unwrap();
    assert!(dummy.status.success());
    refuse(&["--netns", &busy, "--name", "x"], "already has an eth0");
    // The last plumbing step fails (the route exists): everything before it
    // must be undone.
    for cmd in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "route", "add", "169.254.169.250/32", "dev", "lo"],
    ] {
        assert!(
            meshnet_testbed::exec_in(&routed, cmd)
                .unwrap()
                .status
                .success()
        );
    }
    refuse(
        &["--netns", &routed, "--name", "y"],
        "route add 169.254.169.250/32",
    );
    let eth0 = meshnet_testbed::exec_in(&routed, &["ip", "link", "show", "eth0"]).unwrap();
    assert!(
        !eth0.status.success(),
        "the half-made eth0 was left in the container"
    );
    assert_eq!(
        bed.containers(0).unwrap().len(),
        1,
        "a failed attach kept its reservation"
    );
    let veths = host_links(&bed, 0).matches("mv0a2a").count();
    assert_eq!(
        veths,
        1,
        "a failed attach left a veth behind:\n{}",
        host_links(&bed, 0)
    );
    assert_eq!(
        bed.attach(0, &c2, "x", &[]).unwrap(),
        Ipv4Addr::new(10, 42, 1, 3)
    );
}

#[test]
fn attach_in_tun_mode_says_what_is_needed() {
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        mode: Mode::Tun,
    };
    let mut bed = Testbed::new("tunattach", &options, bins()).unwrap();
    bed.start_all().unwrap();
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let out = bed
        .meshctl(0, &["attach", "--netns", &c1, "--name", "x"])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs mode = \"tap\""),
        "{out:?}"
    );
}

#[test]
fn an_attach_whose_state_cannot_be_saved_is_rolled_back() {
    let mut bed = tap_mesh("nosave");
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    // The agent writes containers.json through containers.json.tmp: a
    // directory in its place makes every save fail.
    let state = bed.dir().join("h1-state");
    std::fs::create_dir_all(state.join("containers.json.tmp")).unwrap();
    let out = bed
        .meshctl(0, &["attach", "--netns", &c1, "--name", "web"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "attached without saving");
    assert!(err.contains("rolled back"), "{err}");
    assert!(bed.containers(0).unwrap().is_empty());
    assert!(
        wait_until(Duration::from_secs(5), || !host_links(&bed, 0)
            .contains("mv0a2a")),
        "the veth of a rolled-back attach stayed:\n{}",
        host_links(&bed, 0)
    );
    // Once the state can be written again, the same attach works.
    std::fs::remove_dir(state.join("containers.json.tmp")).unwrap();
    assert_eq!(
        bed.attach(0, &c1, "web", &[]).unwrap(),
        Ipv4Addr::new(10, 42, 1, 2)
    );
    let saved = std::fs::read_to_string(state.join("containers.json")).unwrap();
    assert!(saved.contains("\"web\""), "{saved}");
}
