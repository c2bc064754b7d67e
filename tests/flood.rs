//! A handshake flood against a real agent: initiations with a valid mac1
//! (anyone who knows the public key can make them) from several source
//! addresses of a third namespace, as fast as one sender goes, while an
//! established tunnel carries pings and a genuine peer restarts.
//!
//! Needs root, iproute2 and ping; fails (never skips) without them. The
//! CPU the flood costs is a figure of `cargo bench --bench flood`, not an
//! assertion here.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshnet::core::PeerState;
use meshnet_testbed::flood::plan;
use meshnet_testbed::{Binaries, MeshOptions, Testbed, wait_until};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

const TARGET: usize = 0;
const PEER: usize = 1;
const FLOODER: usize = 2;

#[test]
fn a_handshake_flood_is_refused_cheaply_and_tunnels_keep_working() {
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(1),
        ..MeshOptions::default()
    };
    let mut bed = Testbed::new("flood", &options, bins()).unwrap();
    // The third host is only a namespace on the underlay: the flooder.
    bed.start(TARGET).unwrap();
    bed.start(PEER).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || bed
            .ping(PEER, bed.hosts[TARGET].overlay, 1)
            .unwrap()),
        "no tunnel before the flood:\n{}",
        bed.log(TARGET)
    );

    let report = plan(&bed, TARGET, FLOODER, PEER, 8)
        .unwrap()
        .run(6)
        .unwrap();
    eprintln!("{report:?}; {:.0} initiations/s", report.rate());
    assert!(report.sent > 10_000, "the flood did not happen: {report:?}");
    let refused = bed.dropped(TARGET, "handshake_flood").unwrap();
    assert!(
        refused > report.sent / 2,
        "most of the flood should die at the per-source gate: {refused} of {}",
        report.sent
    );
    assert!(
        report.cookies > 0,
        "cookie replies never engaged: {report:?}"
    );
    // A flood faster than the agent's share of the CPU overflows its
    // socket, and the kernel drops from it without looking: pings go in
    // the same proportion as the flood (measured: 14 % of pings lost with
    // 16 % of the datagrams, 22 % with 22 %, 26 % with 34 %, the agent
    // getting 0.4-0.8 of a core on a loaded machine). What the agent
    // answers is judged against what reached it; a tunnel the flood
    // starves in the agent itself still fails both bounds.
    let delivered = 1.0 - report.rcvbuf_errors as f64 / report.sent.max(1) as f64;
    let expected = f64::from(report.pings_sent) * delivered;
    assert!(
        report.pings_answered as f64 >= 0.8 * expected,
        "the agent lost pings the kernel delivered ({expected:.0} expected): {report:?}"
    );
    assert!(
        report.pings_answered * 2 >= report.pings_sent as usize,
        "the established tunnel lost most pings under the flood: {report:?}"
    );

    // The genuine peer restarts while the flood goes on (cookies engaged):
    // it must connect.
    let flood = plan(&bed, TARGET, FLOODER, PEER, 8).unwrap();
    let flooding = std::thread::spawn(move || flood.run(20));
    std::thread::sleep(Duration::from_secs(1));
    bed.kill(PEER).unwrap();
    bed.start(PEER).unwrap();
    // Generous: a loaded debug build under a full-core flood answers
    // slowly; only a peer that cannot connect at all fails this.
    let back = wait_until(Duration::from_secs(15), || {
        bed.peers(PEER)
            .is_ok_and(|p| p.iter().any(|p| p.name == "h1" && p.state == PeerState::Up))
    });
    let during = flooding.join().unwrap().unwrap();
    assert!(
        back,
        "a restarted peer could not connect during the flood ({during:?}):\n{}",
        bed.log(TARGET)
    );
    assert!(bed.status(TARGET).is_ok(), "the control socket answers");
}
