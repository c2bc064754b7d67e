//! Cluster DNS at 169.254.169.250: two hosts in TAP mode, containers in
//! stacks on both, queried with `dig` from inside a container; an upstream
//! DNS server (dnsmasq) in the underlay switch namespace.
//!
//! Needs root, iproute2, ping, dnsutils and dnsmasq; fails (never skips)
//! without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshnet::config::Mode;
use meshnet_testbed::dns::{self, Dnsmasq, UPSTREAM};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, exec_in, wait_until};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn dig(ns: &str, args: &[&str]) -> String {
    dns::dig(ns, args)
}

/// `dig +short` at the agent, answers sorted.
fn short(ns: &str, args: &[&str]) -> Vec<String> {
    let mut full = vec!["@169.254.169.250", "+short"];
    full.extend_from_slice(args);
    let mut lines: Vec<String> = dig(ns, &full).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

fn status_of(ns: &str, name: &str) -> String {
    dns::status_of(ns, &[name])
}

struct Cluster {
    bed: Testbed,
    _upstream: Dnsmasq,
    c1: String,
    c3: String,
}

fn cluster(tag: &str) -> Cluster {
    cluster_with(tag, "")
}

fn cluster_with(tag: &str, dns_extra: &str) -> Cluster {
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new(tag, &options, bins()).unwrap();
    for i in 0..2 {
        bed.append_config(
            i,
            &format!("\n[dns]\nupstream = [\"{UPSTREAM}:53\"]\n{dns_extra}"),
        )
        .unwrap();
    }
    let upstream = Dnsmasq::start(&bed).unwrap();
    bed.start_all().unwrap();
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(1, "c2").unwrap();
    let c3 = bed.add_container_ns(1, "c3").unwrap();
    let web = [
        "--stack",
        "shop",
        "--service",
        "web",
        "--port",
        "http:8080/tcp",
    ];
    assert_eq!(
        bed.attach(0, &c1, "web1", &web).unwrap().to_string(),
        "10.42.1.2"
    );
    assert_eq!(
        bed.attach(1, &c2, "web2", &web).unwrap().to_string(),
        "10.42.2.2"
    );
    assert_eq!(
        bed.attach(1, &c3, "db", &["--stack", "shop"])
            .unwrap()
            .to_string(),
        "10.42.2.3"
    );
    Cluster {
        bed,
        _upstream: upstream,
        c1,
        c3,
    }
}

#[test]
fn containers_find_each_other_by_name_across_hosts() {
    let c = cluster("dns");
    let c1 = &c.c1;
    assert!(
        wait_until(Duration::from_secs(2), || short(
            c1,
            &["web2.shop.mesh.internal"]
        ) == ["10.42.2.2"]),
        "h2's container is not in h1's DNS: {:?}\n{}",
        short(c1, &["web2.shop.mesh.internal"]),
        c.bed.log(0)
    );
    assert_eq!(
        short(c1, &["WEB2.Shop.Mesh.Internal"]),
        ["10.42.2.2"],
        "case-insensitive"
    );
    assert_eq!(
        short(c1, &["web.shop.mesh.internal"]),
        ["10.42.1.2", "10.42.2.2"],
        "service on both hosts"
    );
    assert_eq!(short(c1, &["h2.hosts.mesh.internal"]), ["10.42.2.1"]);
    assert_eq!(
        short(c1, &["-x", "10.42.2.2"]),
        ["web2.shop.mesh.internal."]
    );
    assert_eq!(
        short(c1, &["SRV", "_http._tcp.web.shop.mesh.internal"]),
        [
            "0 0 8080 web1.shop.mesh.internal.",
            "0 0 8080 web2.shop.mesh.internal."
        ]
    );
    assert_eq!(
        short(c1, &["+tcp", "web.shop.mesh.internal"]),
        ["10.42.1.2", "10.42.2.2"],
        "over TCP"
    );
    assert_eq!(status_of(c1, "nothing.shop.mesh.internal"), "NXDOMAIN");

    // Short names through the search list attach wrote into resolv.conf.
    let resolv = std::fs::read_to_string(format!("/etc/netns/{c1}/resolv.conf")).unwrap();
    assert!(
        resolv.contains("nameserver 169.254.169.250")
            && resolv.contains("search shop.mesh.internal mesh.internal"),
        "{resolv}"
    );
    let out = exec_in(c1, &["getent", "hosts", "db"]).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("10.42.2.3"),
        "getent hosts db: {out:?}"
    );
    assert_eq!(dig(c1, &["+search", "+short", "web2"]).trim(), "10.42.2.2");

    // A name outside the cluster comes from the upstream, through the agent.
    assert_eq!(short(c1, &["outside.example"]), ["192.0.2.99"]);

    let records = String::from_utf8(c.bed.meshctl(0, &["dns"]).unwrap().stdout).unwrap();
    assert!(
        records.contains("web2.shop.mesh.internal.") && records.contains("(h2)"),
        "{records}"
    );
}

#[test]
fn a_detach_on_one_host_removes_the_name_everywhere() {
    let c = cluster("dnsdet");
    assert!(wait_until(Duration::from_secs(2), || short(
        &c.c1,
        &["db.shop.mesh.internal"]
    ) == ["10.42.2.3"]));
    let out = c.bed.meshctl(1, &["detach", "--netns", &c.c3]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(2), || status_of(
            &c.c1,
            "db.shop.mesh.internal"
        ) == "NXDOMAIN"),
        "db is still in h1's DNS two seconds after its detach"
    );
    assert!(
        !std::path::Path::new(&format!("/etc/netns/{}/resolv.conf", c.c3)).exists(),
        "resolv.conf left behind"
    );
}

#[test]
fn the_resolver_is_not_open_to_the_underlay() {
    let c = cluster("dnsopen");
    let sw = &c.bed.bridge_ns;
    let route = exec_in(
        sw,
        &[
            "ip",
            "route",
            "add",
            "169.254.169.250/32",
            "via",
            "192.0.2.1",
        ],
    )
    .unwrap();
    assert!(route.status.success(), "{route:?}");
    // The controls: the underlay's packets do reach h1 (its kernel answers
    // a ping there), and the agent does answer its own containers.
    let ping = exec_in(sw, &["ping", "-c", "1", "-W", "1", "169.254.169.250"]).unwrap();
    assert!(
        ping.status.success(),
        "the route to h1 does not work, so the test proves nothing"
    );
    assert_eq!(short(&c.c1, &["web1.shop.mesh.internal"]), ["10.42.1.2"]);
    let from_underlay = dig(
        sw,
        &["@169.254.169.250", "+short", "web1.shop.mesh.internal"],
    );
    assert!(
        from_underlay.contains("timed out") || from_underlay.trim().is_empty(),
        "answered the underlay: {from_underlay}"
    );
    let tcp = dig(
        sw,
        &[
            "@169.254.169.250",
            "+tcp",
            "+short",
            "web1.shop.mesh.internal",
        ],
    );
    assert!(
        !tcp.contains("10.42.1.2"),
        "answered the underlay over TCP: {tcp}"
    );
}

#[test]
fn records_of_an_unreachable_host_are_withdrawn() {
    let mut c = cluster_with("dnsgone", "withdraw_after = 5");
    assert!(wait_until(Duration::from_secs(2), || short(
        &c.c1,
        &["web2.shop.mesh.internal"]
    ) == ["10.42.2.2"]));
    c.bed.kill(1).unwrap();
    assert!(
        wait_until(Duration::from_secs(12), || status_of(
            &c.c1,
            "web2.shop.mesh.internal"
        ) == "NXDOMAIN"),
        "h2's records outlived withdraw_after"
    );
    assert_eq!(
        short(&c.c1, &["web1.shop.mesh.internal"]),
        ["10.42.1.2"],
        "local records stay"
    );
    assert_eq!(
        short(&c.c1, &["web.shop.mesh.internal"]),
        ["10.42.1.2"],
        "the service shrinks to what is left"
    );
}
