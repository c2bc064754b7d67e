//! The Prometheus endpoint of a real meshd: a live scrape passes
//! `promtool check metrics`, and its counters follow traffic the test sent
//! (pings, and garbage datagrams counted by drop reason); in TAP mode
//! the ARP replies and attached containers.
//!
//! Needs root, iproute2, ping and promtool (Debian's prometheus package);
//! fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream, UdpSocket};

use std::time::Duration;

use meshnet::config::Mode;
use meshnet_testbed::{Binaries, METRICS_LISTEN, MeshOptions, Testbed, in_netns, promtool_check};

const METRICS: &str = METRICS_LISTEN;

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

/// Two hosts, h1 serving metrics on its namespace's loopback.
fn bed(tag: &str) -> Testbed {
    bed_in(tag, Mode::Tun)
}

fn bed_in(tag: &str, mode: Mode) -> Testbed {
    let options = MeshOptions {
        hosts: 2,
        keepalive: None,
        mode,
    };
    let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
    bed.prepend_config(0, &format!("metrics_listen = \"{METRICS}\""))
        .unwrap();
    bed.start_all().expect("starting agents");
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    bed
}

/// `GET path` inside host `i`'s namespace: the status line and the body.
fn get(bed: &Testbed, i: usize, path: &str) -> (String, String) {
    bed.http_get(i, path).unwrap()
}

fn scrape(bed: &Testbed) -> String {
    let (status, body) = get(bed, 0, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// The value of the sample named exactly `series` (name and labels).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn promtool(text: &str) -> std::process::Output {
    promtool_check(text).unwrap()
}

#[test]
fn a_live_scrape_passes_promtool_and_counts_what_was_sent() {
    let bed = bed("metrics");
    let first = scrape(&bed);
    let checked = promtool(&first);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{first}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for series in [
        "meshnet_build_info{version=\"0.1.0\"}",
        "meshnet_peer_state{peer=\"h2\",state=\"up\"}",
        "meshnet_peer_handshakes_total{peer=\"h2\"}",
    ] {
        assert_eq!(value(&first, series), 1.0, "{series}");
    }

    const PINGS: u32 = 10;
    assert!(bed.ping(0, bed.hosts[1].overlay, PINGS).unwrap());
    // Garbage to h1's WireGuard port, from h2's underlay address.
    const GARBAGE: u64 = 7;
    let to: SocketAddr = (bed.hosts[0].underlay, 51820).into();
    in_netns(&bed.hosts[1].ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        for i in 0..GARBAGE {
            socket.send_to(&[0xee; 40][..20 + i as usize], to)?;
        }
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let then = scrape(&bed);
    let rose = |series: &str| value(&then, series) - value(&first, series);
    for series in [
        "meshnet_peer_sent_packets_total{peer=\"h2\"}",
        "meshnet_peer_received_packets_total{peer=\"h2\"}",
    ] {
        assert!(
            rose(series) >= f64::from(PINGS),
            "{series} rose by {}",
            rose(series)
        );
    }
    assert!(rose("meshnet_peer_sent_bytes_total{peer=\"h2\"}") >= f64::from(PINGS * 84));
    assert_eq!(
        rose("meshnet_dropped_packets_total{reason=\"invalid_datagram\"}"),
        GARBAGE as f64
    );
    assert_eq!(rose("meshnet_peer_handshakes_total{peer=\"h2\"}"), 0.0);
    // The kernel's count for the underlay socket is there from the start.
    let overflow = "meshnet_dropped_packets_total{reason=\"underlay_overflow\"}";
    assert_eq!(value(&then, overflow), 0.0);
    // The DNS service answers a cluster name from its zone: a local result.
    let dig = bed
        .exec(
            0,
            &[
                "dig",
                "+time=1",
                "+tries=2",
                "+short",
                "@169.254.169.250",
                "h2.hosts.mesh.internal",
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dig.stdout).trim(),
        "10.42.2.1",
        "{dig:?}"
    );
    let after_dns = scrape(&bed);
    assert!(
        value(&after_dns, "meshnet_dns_queries_total{result=\"local\"}")
            > value(&then, "meshnet_dns_queries_total{result=\"local\"}")
    );
    assert!(promtool(&after_dns).status.success());
}

#[test]
fn only_metrics_is_served_and_the_listener_is_off_by_default() {
    let bed = bed("metrics404");
    assert_eq!(get(&bed, 0, "/").0, "HTTP/1.1 404 Not Found");
    // h2 has no metrics_listen: nothing listens there.
    let refused = in_netns(
        &bed.hosts[1].ns,
        || Ok(TcpStream::connect(METRICS).is_err()),
    )
    .unwrap();
    assert!(refused, "h2 serves metrics without metrics_listen");
}

#[test]
fn tap_mode_counts_arp_replies_and_attached_containers() {
    let mut bed = bed_in("metricstap", Mode::Tap);
    let empty = scrape(&bed);
    assert_eq!(value(&empty, "meshnet_containers"), 0.0);
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(1, "c2").unwrap();
    bed.attach(0, &c1, "one", &[]).unwrap();
    let a2 = bed.attach(1, &c2, "two", &[]).unwrap();
    let before = scrape(&bed);
    // c1 asks who has c2's address: the agent answers for the remote host.
    let ping = meshnet_testbed::ping_in(&c1, a2, 2).unwrap();
    assert!(ping.status.success(), "{ping:?}");
    let after = scrape(&bed);
    assert_eq!(value(&after, "meshnet_containers"), 1.0);
    assert!(
        value(&after, "meshnet_arp_replies_total") > value(&before, "meshnet_arp_replies_total"),
        "no ARP reply counted:\n{after}"
    );
    let checked = promtool(&after);
    assert!(checked.status.success(), "{checked:?}");
}
