//! The DNS forwarder against hostile upstreams and clients, with the real
//! meshd and meshctl: one host in TAP mode with two containers, an
//! upstream (dnsmasq or a misbehaving python3 one) in the underlay switch
//! namespace; and a DNS port that cannot be bound.
//!
//! Needs root, iproute2, dnsutils, dnsmasq and python3; fails (never
//! skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshnet::config::Mode;
use meshnet::dns::rate::MAX_TCP_PER_CLIENT;
use meshnet_testbed::dns::{self, Dnsmasq, Fake, FakeUpstream, SERVICE, UPSTREAM, dig, status_of};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, wait_until};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

/// One TAP host using `UPSTREAM`, with containers `c1` (web1) and `c2`
/// (db) in stack `shop`. `upstream` starts the upstream before the agent.
struct Host<U> {
    bed: Testbed,
    upstream: U,
    c1: String,
    c2: String,
}

fn host<U>(tag: &str, upstream: impl FnOnce(&Testbed) -> U) -> Host<U> {
    dns::require(&["dig"], "apt-get install dnsutils").unwrap();
    dns::require(&["python3"], "python3 runs the test clients").unwrap();
    let options = MeshOptions {
        hosts: 1,
        keepalive: None,
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new(tag, &options, bins()).unwrap();
    bed.append_config(0, &format!("\n[dns]\nupstream = [\"{UPSTREAM}:53\"]\n"))
        .unwrap();
    let upstream = upstream(&bed);
    bed.start(0).unwrap();
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(0, "c2").unwrap();
    bed.attach(0, &c1, "web1", &["--stack", "shop"]).unwrap();
    bed.attach(0, &c2, "db", &["--stack", "shop"]).unwrap();
    Host {
        bed,
        upstream,
        c1,
        c2,
    }
}

fn fake(tag: &str, mode: Fake) -> Host<FakeUpstream> {
    host(tag, |bed| FakeUpstream::start(bed, mode).unwrap())
}

/// `dig +short` at the agent.
fn short(ns: &str, args: &[&str]) -> Vec<String> {
    let at = format!("@{SERVICE}");
    let mut full = vec![at.as_str(), "+short"];
    full.extend_from_slice(args);
    let mut lines: Vec<String> = dig(ns, &full).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn a_reply_for_another_question_never_reaches_the_client() {
    let h = fake("dnsq", Fake::OtherName);
    let at = format!("@{SERVICE}");
    let out = dig(&h.c1, &[&at, "+time=6", "+tries=1", "victim.example"]);
    assert!(
        !h.upstream.ids().is_empty(),
        "the upstream was never asked, so the test proves nothing: {}",
        h.bed.log(0)
    );
    assert!(
        !out.contains("192.0.2.66") && !out.contains("evil.example"),
        "the answer to another question reached the client:\n{out}"
    );
    assert!(out.contains("status: SERVFAIL"), "{out}");
    // The agent's own names still answer.
    assert_eq!(short(&h.c1, &["db.shop.mesh.internal"]), ["10.42.1.3"]);
}

#[test]
fn upstream_query_ids_are_fresh_and_random() {
    let h = fake("dnsid", Fake::LogIds);
    let answers = dns::fixed_id_queries(&h.c1, 10, "idtest.example", 0x1234).unwrap();
    for a in &answers {
        assert_eq!(*a, Some((0x1234, 0, 1)), "the client gets its own id back");
    }
    let ids = h.upstream.ids();
    assert_eq!(ids.len(), 10, "{ids:04x?}");
    let same = ids.iter().filter(|&&id| id == 0x1234).count();
    assert!(
        same <= 1,
        "the client's id went upstream {same} times: {ids:04x?}"
    );
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 9, "ids repeat: {ids:04x?}");
}

#[test]
fn a_truncated_upstream_answer_is_fetched_again_over_tcp() {
    let h = fake("dnstc", Fake::Truncate);
    // +ignore: dig itself would retry over TCP on a truncated answer.
    let answer = short(&h.c1, &["+ignore", "big.example"]);
    assert_eq!(
        answer,
        ["192.0.2.100", "192.0.2.101", "192.0.2.102"],
        "upstream log:\n{}\nagent log:\n{}",
        h.upstream.log(),
        h.bed.log(0)
    );
    assert!(h.upstream.log().contains("tcp"), "{}", h.upstream.log());
}

#[test]
fn held_tcp_connections_do_not_starve_neighbours_or_the_agent() {
    // A common default soft limit, inherited by the agent: it must raise
    // its own to the hard limit (this test binary needs no more).
    let hard = getrlimit(Resource::Nofile).maximum;
    let soft = Rlimit {
        current: Some(1024),
        maximum: hard,
    };
    setrlimit(Resource::Nofile, soft).unwrap();
    let h = host("dnshold", |bed| Dnsmasq::start(bed).unwrap());
    let pid = h.bed.agent_pid(0).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "soft limit not raised: {limits}"
    );
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let idle_fds = fds();
    let mut holder = dns::hold_tcp(&h.c1, 1500, 20).unwrap();
    let connected = holder.next_line().unwrap();
    let open = holder.next_line().unwrap();
    let held_fds = fds();
    eprintln!("{connected}; {open}; agent fds idle {idle_fds}, with 1,500 connections {held_fds}");
    let still_open: usize = open.strip_prefix("open ").unwrap().parse().unwrap();
    assert!(
        still_open <= MAX_TCP_PER_CLIENT,
        "one container holds {still_open} connections ({connected})"
    );
    assert!(
        held_fds < idle_fds + 64,
        "{idle_fds} fds idle, {held_fds} held"
    );

    // The neighbour resolves, over UDP and TCP, ours and the upstream's
    // names, and the control socket answers, while the connections are held.
    assert_eq!(short(&h.c2, &["web1.shop.mesh.internal"]), ["10.42.1.2"]);
    assert_eq!(
        short(&h.c2, &["+tcp", "web1.shop.mesh.internal"]),
        ["10.42.1.2"]
    );
    assert_eq!(short(&h.c2, &["outside.example"]), ["192.0.2.99"]);
    assert_eq!(short(&h.c2, &["+tcp", "outside.example"]), ["192.0.2.99"]);
    assert_eq!(
        status_of(&h.c2, &["nothing.shop.mesh.internal"]),
        "NXDOMAIN"
    );
    let status = h.bed.status(0).unwrap();
    assert_eq!(status.containers, Some(2));
    drop(holder);
    let mut bed = h.bed;
    assert!(!bed.agent_exited(0), "the agent died:\n{}", bed.log(0));
    assert!(
        wait_until(Duration::from_secs(10), || fds() <= idle_fds + 4),
        "fds not given back: {} (idle {idle_fds})",
        fds()
    );
}

#[test]
fn a_dns_port_that_cannot_be_bound_stops_the_agent() {
    dns::require(&["python3"], "python3 occupies the port").unwrap();
    let options = MeshOptions {
        hosts: 1,
        keepalive: None,
        mode: Mode::Tun,
    };
    let mut bed = Testbed::new("dnsbind", &options, bins()).unwrap();
    let ns = bed.hosts[0].ns.clone();
    for kind in ["udp", "tcp"] {
        let occupier = dns::occupy(&ns, kind, SERVICE, 53).unwrap();
        let error = format!("{:#}", bed.start(0).expect_err("started without DNS"));
        let named = format!("{} {SERVICE}:53", kind.to_uppercase());
        assert!(
            error.contains("exit status: 1") && error.contains(&named) && error.contains("in use"),
            "{kind}: {error}"
        );
        drop(occupier);
    }
    // The control: with the port free, the same agent starts and answers.
    bed.start(0).unwrap();
    assert_ne!(status_of(&ns, &["h1.hosts.mesh.internal"]), "no answer");
}
