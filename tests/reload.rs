//! Reload of a real meshd (`meshctl reload` and SIGHUP): run-time changes
//! apply, untouched tunnels keep their sessions (their handshake counters
//! do not move), a changed keepalive applies in place, a restart-only
//! change or a broken file is refused whole.
//!
//! Needs root, iproute2 and ping; fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::process::Output;
use std::time::Duration;

use meshnet::core::{PeerState, PeerStatus};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, in_netns, wait_until};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn peer(peers: &[PeerStatus], name: &str) -> PeerStatus {
    peers
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no peer {name} in {peers:#?}"))
        .clone()
}

/// Handshakes on both ends of h1's tunnel to `name` (host index `j`).
fn handshakes(bed: &Testbed, name: &str, j: usize) -> (u64, u64) {
    (
        peer(&bed.peers(0).unwrap(), name).handshakes,
        peer(&bed.peers(j).unwrap(), "h1").handshakes,
    )
}

fn reload(bed: &Testbed) -> Output {
    bed.meshctl(0, &["reload"]).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn edit(bed: &Testbed, f: impl FnOnce(String) -> String) {
    let path = &bed.hosts[0].config;
    let old = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(old)).unwrap();
}

#[test]
fn reload_applies_run_time_changes_and_keeps_untouched_sessions() {
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(2),
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("reload", &options, bins()).expect("building the testbed");
    bed.start_all().expect("starting agents");
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    let original = std::fs::read_to_string(&bed.hosts[0].config).unwrap();
    let h2_before = handshakes(&bed, "h2", 1);
    let h3_before = handshakes(&bed, "h3", 2);

    // A changed keepalive on h2, and a metrics listener: applied in place.
    edit(&bed, |t| {
        let t = t.replacen(
            "subnet = \"10.42.2.0/24\"\nkeepalive = 2",
            "subnet = \"10.42.2.0/24\"\nkeepalive = 5",
            1,
        );
        format!("metrics_listen = \"127.0.0.1:9587\"\n{t}")
    });
    let out = reload(&bed);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "reloaded:\n  peer h2: keepalive 5 s\n  metrics_listen: 127.0.0.1:9587\n"
    );
    assert_eq!(peer(&bed.peers(0).unwrap(), "h2").keepalive, Some(5));
    let listening = in_netns(&bed.hosts[0].ns, || {
        Ok(TcpStream::connect("127.0.0.1:9587").is_ok())
    });
    assert!(
        listening.unwrap(),
        "the reloaded metrics listener is not there"
    );
    // Several keepalive intervals later, still the same sessions.
    assert!(bed.ping(0, bed.hosts[1].overlay, 3).unwrap());
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        handshakes(&bed, "h2", 1),
        h2_before,
        "keepalive change cost a handshake"
    );
    assert_eq!(
        handshakes(&bed, "h3", 2),
        h3_before,
        "h3's tunnel was disturbed"
    );
    assert_eq!(peer(&bed.peers(0).unwrap(), "h2").state, PeerState::Up);

    // Removing h3 and adding it back leaves h2's session alone.
    let with_h3 = std::fs::read_to_string(&bed.hosts[0].config).unwrap();
    bed.remove_peer_from_config(0, "h3").unwrap();
    let out = reload(&bed);
    assert_eq!(
        text(&out.stdout),
        "reloaded:\n  peer h3 removed\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(bed.peers(0).unwrap().len(), 1);
    assert!(!bed.ping(0, bed.hosts[2].overlay, 1).unwrap());
    std::fs::write(&bed.hosts[0].config, &with_h3).unwrap();
    let out = reload(&bed);
    assert_eq!(
        text(&out.stdout),
        "reloaded:\n  peer h3 added\n",
        "{}",
        text(&out.stderr)
    );
    assert!(bed.ping(0, bed.hosts[2].overlay, 1).unwrap());
    assert_eq!(
        handshakes(&bed, "h2", 1),
        h2_before,
        "h2's tunnel was disturbed"
    );
    let out = reload(&bed);
    assert_eq!(text(&out.stdout), "reloaded: nothing changed\n");

    // A restart-only change refuses everything in the file, peers too.
    let h3_now = handshakes(&bed, "h3", 2);
    bed.remove_peer_from_config(0, "h3").unwrap();
    edit(&bed, |t| format!("mode = \"tap\"\n{t}"));
    let out = reload(&bed);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("reload refused, nothing changed: mode needs a restart"),
        "{err}"
    );
    assert_eq!(
        bed.peers(0).unwrap().len(),
        2,
        "the peer change was applied anyway"
    );
    assert_eq!(bed.status(0).unwrap().mode, "tun");

    // A broken file is refused with its error, the running state kept.
    std::fs::write(&bed.hosts[0].config, "name = \"h1\"\nbogus = 1\n").unwrap();
    let out = reload(&bed);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("h1.toml:2: bogus") && err.contains("keeping the running config"),
        "{err}"
    );
    assert_eq!(bed.peers(0).unwrap().len(), 2);
    assert_eq!(handshakes(&bed, "h2", 1), h2_before);
    assert_eq!(handshakes(&bed, "h3", 2), h3_now);

    // SIGHUP takes the same path.
    std::fs::write(&bed.hosts[0].config, &original).unwrap();
    bed.remove_peer_from_config(0, "h3").unwrap();
    bed.reload(0).unwrap();
    assert!(wait_until(Duration::from_secs(5), || bed
        .peers(0)
        .is_ok_and(|p| p.len() == 1)));
    let log = bed.log(0);
    assert!(log.contains("reload refused"), "{log}");
    assert_eq!(handshakes(&bed, "h2", 1), h2_before);
    bed.stop(0).unwrap();
}

/// `dig +short NAME` at the agent's DNS service from host `i`.
fn resolve(bed: &Testbed, i: usize, name: &str) -> String {
    meshnet_testbed::dns::dig(&bed.hosts[i].ns, &["@169.254.169.250", "+short", name])
        .trim()
        .to_owned()
}

#[test]
fn reload_moves_dns_to_a_new_upstream_and_changes_the_withdraw_time() {
    use meshnet_testbed::dns::{Dnsmasq, UPSTREAM};
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("reloaddns", &options, bins()).expect("building the testbed");
    // At first an upstream nobody serves (an unused address of the test's
    // own underlay).
    bed.append_config(0, "\n[dns]\nupstream = [\"192.0.2.201:53\"]\n")
        .unwrap();
    let _upstream = Dnsmasq::start(&bed).unwrap();
    bed.start_all().expect("starting agents");
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    let before = resolve(&bed, 0, "outside.example");
    assert!(
        !before.contains("192.0.2.99"),
        "answered without an upstream: {before}"
    );
    let handshakes_before = handshakes(&bed, "h2", 1);

    edit(&bed, |t| {
        t.replace(
            "upstream = [\"192.0.2.201:53\"]",
            &format!("upstream = [\"{UPSTREAM}:53\"]\nwithdraw_after = 60"),
        )
    });
    let out = reload(&bed);
    assert_eq!(
        text(&out.stdout),
        format!("reloaded:\n  dns.upstream: {UPSTREAM}:53\n  dns.withdraw_after: 60 s\n"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(resolve(&bed, 0, "outside.example"), "192.0.2.99");
    assert_eq!(resolve(&bed, 0, "h2.hosts.mesh.internal"), "10.42.2.1");
    assert_eq!(handshakes(&bed, "h2", 1), handshakes_before);
}
