//! The etcd membership store against a real etcd (Debian's etcd-server):
//! claim races and decommission at the etcd level (etcd on loopback), then
//! hosts in network namespaces that find each other through etcd running
//! on the testbed's underlay, an etcd outage, compaction while a host
//! is cut off from etcd, and DNS records carried by etcd (`records/<host>`).
//!
//! Needs root, iproute2, ping, tcpdump, dig, etcd and etcdctl; fails
//! (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use meshnet::config::{Mode, StoreConfig};
use meshnet::dns::{ContainerRecord, HostRecords};
use meshnet::keys::PrivateKey;
use meshnet::store::claim::ClaimError;
use meshnet::store::etcd::{self, StoreError};
use meshnet::store::layout::encode;
use meshnet::store::{BlockRecord, ClusterRecord, HostRecord, Layout, StoreStatus};
use meshnet_testbed::etcd::{Etcd, use_store};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, wait_until};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

fn store(url: &str, prefix: &str) -> StoreConfig {
    StoreConfig {
        endpoints: vec![url.to_owned()],
        prefix: prefix.to_owned(),
        block_prefix: 24,
        advertise: "192.0.2.1:51820".parse().unwrap(),
        requested: None,
        lease_ttl: 30,
        keepalive: None,
        tls: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The owner etcd names for `block` under `prefix`.
fn owner(etcd: &Etcd, prefix: &str, block: Ipv4Net) -> Option<String> {
    let key = Layout::new(prefix).block(block);
    let out = etcd.ctl_ok(&["get", &key, "--print-value-only"]).unwrap();
    let rec: BlockRecord = serde_json::from_str(out.trim()).ok()?;
    Some(rec.owner)
}

#[test]
fn two_hosts_racing_for_one_block_fifty_times_leave_exactly_one_owner() {
    let etcd = Etcd::on_loopback().expect("starting etcd");
    let rt = runtime();
    let overlay: Ipv4Net = "10.42.0.0/16".parse().unwrap();
    let wanted: Ipv4Net = "10.42.7.0/24".parse().unwrap();
    let (ka, kb) = (
        PrivateKey::generate().unwrap().public_key(),
        PrivateKey::generate().unwrap().public_key(),
    );
    for round in 0..50 {
        let prefix = format!("/race/{round}");
        let mut s = store(&etcd.url(), &prefix);
        s.requested = Some(wanted);
        let (a, b) = rt.block_on(async {
            tokio::join!(
                etcd::claim(&s, "a", ka, overlay),
                etcd::claim(&s, "b", kb, overlay)
            )
        });
        let winners: Vec<&str> = [("a", &a), ("b", &b)]
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {a:?} / {b:?}");
        let loser = if a.is_ok() { &b } else { &a };
        assert!(
            matches!(
                loser,
                Err(StoreError::Claim(ClaimError::OwnedByOther { .. }))
            ),
            "round {round}: the loser is told who owns it: {loser:?}"
        );
        assert_eq!(owner(&etcd, &prefix, wanted).as_deref(), Some(winners[0]));
    }
}

#[test]
fn hosts_without_a_subnet_racing_get_distinct_blocks_and_decommission_frees_one() {
    let etcd = Etcd::on_loopback().expect("starting etcd");
    let rt = runtime();
    // Two blocks only: the racers collide on their first choice half the
    // time and must end on different ones.
    let overlay: Ipv4Net = "10.42.0.0/23".parse().unwrap();
    let keys: Vec<_> = (0..3)
        .map(|_| PrivateKey::generate().unwrap().public_key())
        .collect();
    for round in 0..20 {
        let s = store(&etcd.url(), &format!("/spread/{round}"));
        let (a, b) = rt.block_on(async {
            tokio::join!(
                etcd::claim(&s, "a", keys[0], overlay),
                etcd::claim(&s, "b", keys[1], overlay)
            )
        });
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a, b, "round {round}");
    }
    let s = store(&etcd.url(), "/spread/0");
    // Full: a third host gets a clear error, not a loop.
    let full = rt.block_on(etcd::claim(&s, "c", keys[2], overlay));
    assert!(
        matches!(full, Err(StoreError::Claim(ClaimError::Full { .. }))),
        "{full:?}"
    );
    // A restarted host keeps its block; the same name with another key
    // does not get it.
    let again = rt.block_on(etcd::claim(&s, "a", keys[0], overlay)).unwrap();
    let stolen = rt.block_on(etcd::claim(&s, "a", keys[2], overlay));
    assert!(
        matches!(
            stolen,
            Err(StoreError::Claim(ClaimError::NameHasOtherKey { .. }))
        ),
        "{stolen:?}"
    );
    // A lost lease never costs a host its block: revoke every lease (the
    // host records go), and a's next join keeps the same block.
    let leases = etcd.ctl_ok(&["lease", "list"]).unwrap();
    for id in leases
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        etcd.ctl_ok(&["lease", "revoke", id]).unwrap();
    }
    let host_a = etcd.ctl_ok(&["get", "/spread/0/hosts/a"]).unwrap();
    assert!(
        host_a.trim().is_empty(),
        "the host record went with its lease"
    );
    assert_eq!(owner(&etcd, "/spread/0", again).as_deref(), Some("a"));
    let back = rt.block_on(etcd::claim(&s, "a", keys[0], overlay)).unwrap();
    assert_eq!(back, again);
    // meshctl decommission frees a's block (and deletes its DNS records);
    // then c can claim it.
    etcd.ctl_ok(&["put", "/spread/0/records/a", "{}"]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "decommission",
            "a",
            "--endpoints",
            &etcd.url(),
            "--prefix",
            "/spread/0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&again.to_string()), "{text}");
    assert_eq!(owner(&etcd, "/spread/0", again), None);
    let records_a = etcd.ctl_ok(&["get", "/spread/0/records/a"]).unwrap();
    assert!(records_a.trim().is_empty(), "records/a: {records_a}");
    let c = rt.block_on(etcd::claim(&s, "c", keys[2], overlay)).unwrap();
    assert_eq!(c, again);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "decommission",
            "nobody",
            "--endpoints",
            &etcd.url(),
            "--prefix",
            "/spread/0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no host \"nobody\""));
}

/// A testbed of `hosts` agents plus one namespace running etcd (the last
/// testbed host, which runs no meshd); configs take everything from etcd.
fn bed_with_etcd(tag: &str, hosts: usize) -> (Testbed, Etcd) {
    bed_with_etcd_in(tag, hosts, Mode::Tun)
}

fn bed_with_etcd_in(tag: &str, hosts: usize, mode: Mode) -> (Testbed, Etcd) {
    let options = MeshOptions {
        hosts: hosts + 1,
        keepalive: None,
        mode,
    };
    let bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
    let e = &bed.hosts[hosts];
    let etcd = Etcd::in_namespace(&e.ns, e.underlay).expect("starting etcd");
    let extra = if mode == Mode::Tap {
        "mode = \"tap\""
    } else {
        ""
    };
    for i in 0..hosts {
        use_store(&bed, i, &etcd.url(), extra).unwrap();
    }
    (bed, etcd)
}

fn store_status(bed: &Testbed, i: usize) -> StoreStatus {
    let out = bed.meshctl(i, &["store", "--json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn peer_names(bed: &Testbed, i: usize) -> BTreeSet<String> {
    bed.peers(i)
        .map(|p| p.into_iter().map(|p| p.name).collect())
        .unwrap_or_default()
}

fn address(bed: &Testbed, i: usize) -> Ipv4Addr {
    bed.status(i).unwrap().address
}

/// Waits until hosts `of` each list exactly the others of `of` as peers.
fn wait_converged(bed: &Testbed, of: &[usize]) {
    let ok = wait_until(Duration::from_secs(30), || {
        of.iter().all(|&i| {
            let want: BTreeSet<String> = of
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| bed.hosts[j].name.clone())
                .collect();
            peer_names(bed, i) == want
        })
    });
    let views: Vec<_> = of.iter().map(|&i| peer_names(bed, i)).collect();
    assert!(
        ok,
        "membership did not converge: {views:?}\n{}",
        bed.log(of[0])
    );
}

fn ping_all(bed: &Testbed, of: &[usize]) {
    for &i in of {
        for &j in of.iter().filter(|&&j| j != i) {
            let to = address(bed, j);
            let ok = wait_until(Duration::from_secs(15), || {
                bed.ping(i, to, 1).unwrap_or(false)
            });
            assert!(
                ok,
                "{} cannot ping {} ({to})\n{}",
                bed.hosts[i].name,
                bed.hosts[j].name,
                bed.log(i)
            );
        }
    }
}

#[test]
fn three_hosts_with_no_peers_and_no_subnet_find_each_other_ping_and_resolve() {
    let (mut bed, etcd) = bed_with_etcd("etcd3", 3);
    bed.start_all().expect("starting agents");
    wait_converged(&bed, &[0, 1, 2]);
    let blocks: BTreeSet<Ipv4Net> = (0..3).map(|i| bed.status(i).unwrap().subnet).collect();
    assert_eq!(blocks.len(), 3, "distinct blocks: {blocks:?}");
    ping_all(&bed, &[0, 1, 2]);
    // Names travel in etcd (records/<host>) and over the mesh's records
    // sync to every etcd-found peer.
    let h2 = address(&bed, 1).to_string();
    let ok = wait_until(Duration::from_secs(15), || {
        bed.exec(
            0,
            &[
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                "@169.254.169.250",
                "h2.hosts.mesh.internal",
            ],
        )
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == h2)
    });
    assert!(ok, "h1 does not resolve h2 to {h2}");
    let s = store_status(&bed, 0);
    assert_eq!(s.backend, "etcd");
    assert!(s.connected && s.revision > 0 && s.hosts == 3, "{s:?}");
    assert!(s.lease_secs_left.is_some_and(|l| l > 0 && l <= 15), "{s:?}");
    assert_eq!(s.last_error, None);
    let text = bed.meshctl(0, &["store"]).unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("lease left:"));
    // A restarted host keeps its block (etcd still names it the owner).
    let before = bed.status(2).unwrap().subnet;
    bed.stop(2).unwrap();
    bed.start(2).unwrap();
    assert_eq!(bed.status(2).unwrap().subnet, before);
    // Asking for another host's block is a clear error at start.
    let taken = bed.status(0).unwrap().subnet;
    bed.stop(1).unwrap();
    use_store(&bed, 1, &etcd.url(), &format!("subnet = \"{taken}\"")).unwrap();
    assert!(bed.start(1).is_err());
    assert!(bed.log(1).contains("already owns block"), "{}", bed.log(1));
}

/// A ping loop from host `i` to `to` in the background: (child, count).
fn ping_loop(bed: &Testbed, i: usize, to: Ipv4Addr, count: u32) -> std::process::Child {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.hosts[i].ns,
            "ping",
            "-q",
            "-i",
            "0.5",
            "-W",
            "1",
        ])
        .args(["-c", &count.to_string(), &to.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// (sent, received) from a finished `ping -q`.
fn ping_result(child: std::process::Child) -> (u32, u32) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("received"))
        .unwrap_or_default()
        .to_owned();
    let num = |word: &str| -> u32 {
        let before = line.split(word).next().unwrap_or_default();
        before
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (num(" packets transmitted"), num(" received"))
}

/// The issue's outage: etcd gone for two minutes. Traffic between the
/// hosts goes on (the agents keep their last-known peers), a host
/// restarted during the outage comes back from its snapshot, and a fourth
/// host that joins after etcd returns is seen by every host.
#[test]
fn etcd_down_two_minutes_traffic_goes_on_then_a_fourth_host_joins() {
    const OUTAGE: Duration = Duration::from_secs(120);
    let (mut bed, mut etcd) = bed_with_etcd("etcdout", 4);
    for i in 0..3 {
        bed.start(i).unwrap();
    }
    wait_converged(&bed, &[0, 1, 2]);
    ping_all(&bed, &[0, 1, 2]);
    let h2_block = bed.status(1).unwrap().subnet;
    // Let the snapshots land (written at most once a second).
    std::thread::sleep(Duration::from_secs(2));
    let pings = (OUTAGE.as_secs() * 2 + 20) as u32;
    let to_h3 = ping_loop(&bed, 0, address(&bed, 2), pings);
    let to_h1 = ping_loop(&bed, 2, address(&bed, 0), pings);
    etcd.stop().unwrap();
    let down = std::time::Instant::now();
    let ok = wait_until(Duration::from_secs(30), || !store_status(&bed, 0).connected);
    assert!(ok, "h1 never noticed etcd was gone");
    // A restart during the outage starts from the snapshot.
    bed.stop(1).unwrap();
    bed.start(1).unwrap();
    assert_eq!(bed.status(1).unwrap().subnet, h2_block);
    assert!(
        bed.log(1).contains("running from the last snapshot"),
        "{}",
        bed.log(1)
    );
    wait_converged(&bed, &[0, 1, 2]);
    ping_all(&bed, &[0, 1, 2]);
    let s = store_status(&bed, 0);
    assert!(!s.connected && s.last_error.is_some(), "{s:?}");
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    etcd.resume().unwrap();
    bed.start(3).unwrap();
    wait_converged(&bed, &[0, 1, 2, 3]);
    ping_all(&bed, &[0, 1, 2, 3]);
    for i in 0..4 {
        let ok = wait_until(Duration::from_secs(30), || {
            let s = store_status(&bed, i);
            s.connected && s.last_error.is_none()
        });
        assert!(
            ok,
            "{} did not reconnect: {:?}",
            bed.hosts[i].name,
            store_status(&bed, i)
        );
    }
    for (name, child) in [("h1 -> h3", to_h3), ("h3 -> h1", to_h1)] {
        let (sent, received) = ping_result(child);
        eprintln!("{name}: {received}/{sent} answered across the outage");
        assert!(sent >= pings - 1, "{name}: ping loop cut short ({sent})");
        // Every ping every half second answered, but allow a couple for a
        // debug build on a loaded 2-core machine.
        assert!(
            received + 2 >= sent,
            "{name}: traffic stopped: {received}/{sent}"
        );
    }
}

/// Compaction while a host is cut off from etcd: on reconnect its watch
/// revision is gone; it re-lists, applies the delete it missed, and says
/// so in one log line (not a loop).
#[test]
fn compaction_while_disconnected_relists_and_converges_with_one_log_line() {
    let (mut bed, etcd) = bed_with_etcd("etcdcmp", 2);
    bed.start_all().unwrap();
    wait_converged(&bed, &[0, 1]);
    // A third host, registered straight in etcd (its endpoint leads
    // nowhere; only membership matters here).
    let ghost_key = PrivateKey::generate().unwrap().public_key();
    let block = "10.42.200.0/24";
    etcd.ctl_ok(&[
        "put",
        "/meshnet/v1/blocks/10.42.200.0-24",
        &format!(r#"{{"owner":"ghost","public_key":"{ghost_key}"}}"#),
    ])
    .unwrap();
    etcd.ctl_ok(&[
        "put",
        "/meshnet/v1/hosts/ghost",
        &format!(
            r#"{{"public_key":"{ghost_key}","endpoints":["192.0.2.99:51820"],"block":"{block}"}}"#
        ),
    ])
    .unwrap();
    let ok = wait_until(Duration::from_secs(10), || {
        peer_names(&bed, 1).contains("ghost")
    });
    assert!(ok, "h2 never saw ghost");
    // Cut h2 off from etcd (the mesh underlay stays).
    let etcd_ip = bed.hosts[2].underlay.to_string();
    let cut = ["route", "add", "blackhole", &format!("{etcd_ip}/32")];
    assert!(
        bed.exec(
            1,
            &["ip"].iter().chain(cut.iter()).copied().collect::<Vec<_>>()
        )
        .unwrap()
        .status
        .success()
    );
    let ok = wait_until(Duration::from_secs(30), || !store_status(&bed, 1).connected);
    assert!(ok, "h2 never noticed it was cut off");
    etcd.ctl_ok(&["del", "/meshnet/v1/hosts/ghost"]).unwrap();
    etcd.ctl_ok(&["del", "/meshnet/v1/blocks/10.42.200.0-24"])
        .unwrap();
    for n in 0..20 {
        etcd.ctl_ok(&["put", "/meshnet/v1/churn", &n.to_string()])
            .unwrap();
    }
    etcd.compact().unwrap();
    assert!(
        peer_names(&bed, 1).contains("ghost"),
        "nothing is removed on a connection error"
    );
    let heal = ["route", "del", "blackhole", &format!("{etcd_ip}/32")];
    assert!(
        bed.exec(
            1,
            &["ip"]
                .iter()
                .chain(heal.iter())
                .copied()
                .collect::<Vec<_>>()
        )
        .unwrap()
        .status
        .success()
    );
    let ok = wait_until(Duration::from_secs(40), || {
        let s = store_status(&bed, 1);
        s.connected && s.relists == 1 && !peer_names(&bed, 1).contains("ghost")
    });
    assert!(
        ok,
        "h2 did not re-list: {:?}\n{}",
        store_status(&bed, 1),
        bed.log(1)
    );
    wait_converged(&bed, &[0, 1]);
    // Stays settled: no watch loop on the compacted revision.
    std::thread::sleep(Duration::from_secs(3));
    let log = bed.log(1);
    assert_eq!(
        log.matches("etcd compacted the watched history").count(),
        1,
        "{log}"
    );
    assert_eq!(store_status(&bed, 1).relists, 1);
    ping_all(&bed, &[0, 1]);
}

/// The A records host `i` serves for `name` (without the domain).
fn served(bed: &Testbed, i: usize, name: &str) -> Vec<String> {
    let fqdn = format!("{name}.mesh.internal.");
    bed.records(i)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.kind == "A" && r.name == fqdn)
        .map(|r| r.value)
        .collect()
}

/// The DNS records etcd holds for `host`, and whether they are on a lease.
fn records_in_etcd(etcd: &Etcd, host: &str) -> Option<(HostRecords, bool)> {
    let key = Layout::new("/meshnet/v1").records(host);
    let out = etcd.ctl_ok(&["get", &key, "-w", "json"]).ok()?;
    let json: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    let kv = json["kvs"].get(0)?;
    let value = base64_decode(kv["value"].as_str()?)?;
    let leased = kv["lease"].as_i64().unwrap_or(0) != 0;
    Some((serde_json::from_slice(&value).ok()?, leased))
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn put_json<T: serde::Serialize>(etcd: &Etcd, key: &str, value: &T) {
    let text = String::from_utf8(encode(value)).unwrap();
    etcd.ctl_ok(&["put", key, &text]).unwrap();
}

/// DNS records through etcd: a container attached on h1 lands in
/// `records/h1` (one key, on h1's lease) and h2 serves it; a host that
/// exists only in etcd (no endpoint, no mesh sync with anyone) is
/// resolved by both agents from its `records/` key alone; an update
/// outside its block is refused (the last valid set stays); deleting the
/// key withdraws its names.
#[test]
fn container_records_travel_through_etcd_and_a_host_without_mesh_sync_resolves() {
    let (mut bed, etcd) = bed_with_etcd_in("etcdrec", 2, Mode::Tap);
    bed.start_all().unwrap();
    wait_converged(&bed, &[0, 1]);
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let attached = std::time::Instant::now();
    let web = bed.attach(0, &c1, "web", &["--stack", "shop"]).unwrap();
    let ok = wait_until(Duration::from_secs(10), || {
        records_in_etcd(&etcd, "h1").is_some_and(|(r, leased)| {
            leased
                && r.containers
                    .iter()
                    .any(|c| c.name == "web" && c.address == web)
        })
    });
    assert!(
        ok,
        "records/h1 never held web: {:?}",
        records_in_etcd(&etcd, "h1")
    );
    let ok = wait_until(Duration::from_secs(10), || {
        served(&bed, 1, "web.shop") == [web.to_string()]
    });
    assert!(ok, "h2 does not serve web.shop\n{}", bed.log(1));
    // A figure for the report, not an assertion.
    eprintln!("attach on h1 -> served by h2: {:?}", attached.elapsed());

    // ghost: in etcd only, with a free block of the cluster's overlay.
    let cluster: ClusterRecord = serde_json::from_str(
        etcd.ctl_ok(&["get", "/meshnet/v1/config", "--print-value-only"])
            .unwrap()
            .trim(),
    )
    .unwrap();
    let taken = [bed.status(0).unwrap().subnet, bed.status(1).unwrap().subnet];
    let block = cluster
        .overlay
        .subnets(cluster.block_prefix)
        .unwrap()
        .filter(|b| !taken.contains(b))
        .last()
        .unwrap();
    let key = PrivateKey::generate().unwrap().public_key();
    let l = Layout::new("/meshnet/v1");
    put_json(
        &etcd,
        &l.block(block),
        &BlockRecord {
            owner: "ghost".into(),
            public_key: key,
        },
    );
    put_json(
        &etcd,
        &l.host("ghost"),
        &HostRecord {
            public_key: key,
            endpoints: vec![],
            block,
        },
    );
    let host_addr = meshnet::membership::host_address(block);
    let db = Ipv4Addr::from(u32::from(block.network()) + 5);
    let ghost = |address: Ipv4Addr| HostRecords {
        host: "ghost".into(),
        address: host_addr,
        containers: vec![ContainerRecord {
            name: "db".into(),
            stack: "shop".into(),
            service: None,
            address,
            ports: vec![],
        }],
    };
    let put = std::time::Instant::now();
    put_json(&etcd, &l.records("ghost"), &ghost(db));
    for i in 0..2 {
        let ok = wait_until(Duration::from_secs(10), || {
            served(&bed, i, "db.shop") == [db.to_string()]
                && served(&bed, i, "ghost.hosts") == [host_addr.to_string()]
        });
        eprintln!("records/ghost put -> served by {i}: {:?}", put.elapsed());
        assert!(
            ok,
            "{} does not resolve ghost's names\n{}",
            bed.hosts[i].name,
            bed.log(i)
        );
    }
    // An address outside ghost's block is refused; the valid set stays.
    put_json(&etcd, &l.records("ghost"), &ghost(web));
    let ok = wait_until(Duration::from_secs(10), || {
        bed.log(1).contains("refused DNS records from etcd")
    });
    assert!(ok, "h2 did not refuse ghost's bad records\n{}", bed.log(1));
    assert_eq!(served(&bed, 1, "db.shop"), [db.to_string()]);
    // Key deleted: the names go (the host stays a peer).
    etcd.ctl_ok(&["del", &l.records("ghost")]).unwrap();
    let ok = wait_until(Duration::from_secs(10), || {
        served(&bed, 1, "db.shop").is_empty() && served(&bed, 0, "db.shop").is_empty()
    });
    assert!(ok, "ghost's records were not withdrawn");
    assert!(peer_names(&bed, 1).contains("ghost"));
    // Detach on h1: records/h1 is rewritten without web, h2 drops it.
    let out = bed.meshctl(0, &["detach", "--netns", &c1]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = wait_until(Duration::from_secs(10), || {
        records_in_etcd(&etcd, "h1").is_some_and(|(r, _)| r.containers.is_empty())
            && served(&bed, 1, "web.shop").is_empty()
    });
    assert!(
        ok,
        "web stayed after detach: {:?}",
        records_in_etcd(&etcd, "h1")
    );
}
