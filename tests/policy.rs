//! Network policy with the real meshd (issue 18): containers as network
//! namespaces on three TAP-mode hosts, two stacks and two tenants; for
//! every cell of the matrix, what `meshctl policy test` says equals what a
//! real TCP connection attempt does, between hosts and between containers
//! of one host. A sender without egress policy is
//! stopped at the receiver, counted exactly; DNS works under default deny.
//!
//! Needs root, iproute2, ping, nft (nftables), dig (dnsutils) and python3;
//! fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshnet::config::Mode;
use meshnet_testbed::{Binaries, MeshOptions, Testbed, exec_in, wait_until};

fn bins() -> Binaries {
    Binaries {
        meshd: env!("CARGO_BIN_EXE_meshd").into(),
        meshctl: env!("CARGO_BIN_EXE_meshctl").into(),
    }
}

const POLICY: &str = r#"
[policy]
default = "deny"
within = "stack"

[[policy.tenant]]
name = "blue"
hosts = ["h0", "h1"]

[[policy.tenant]]
name = "red"
hosts = ["h2"]

[[policy.rule]]
name = "web-db"
from = { stack = "web" }
to = { stack = "db" }
ports = ["5432/tcp"]
action = "allow"

[[policy.test]]
from = { stack = "web", host = "h0" }
to = { stack = "db", host = "h1" }
port = "5432/tcp"
expect = "allow"
"#;

fn require_tools() {
    for tool in ["nft", "dig", "python3", "ping"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "{tool} is missing: run scripts/test.sh (installs nftables, dnsutils, iputils-ping)"
        );
    }
}

/// Three TAP hosts; `with_policy[i]` says whether host i has [policy].
fn mesh(tag: &str, with_policy: [bool; 3]) -> Testbed {
    require_tools();
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
    for (i, on) in with_policy.iter().enumerate() {
        if *on {
            bed.append_config(i, POLICY).unwrap();
        }
    }
    bed.start_all().expect("starting agents");
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    bed
}

struct Container {
    host: usize,
    ns: String,
    name: &'static str,
    stack: &'static str,
    address: Ipv4Addr,
}

fn add(bed: &mut Testbed, host: usize, name: &'static str, stack: &'static str) -> Container {
    let ns = bed.add_container_ns(host, name).unwrap();
    let address = bed.attach(host, &ns, name, &["--stack", stack]).unwrap();
    Container {
        host,
        ns,
        name,
        stack,
        address,
    }
}

/// A TCP server in `ns` accepting on every port in `ports`, until killed.
struct Listener(Child);

impl Listener {
    fn start(ns: &str, ports: &[u16]) -> Self {
        let script = format!(
            "import socket, select\n\
             socks = []\n\
             for p in {ports:?}:\n\
             \x20   s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             \x20   s.bind(('0.0.0.0', p)); s.listen(64); socks.append(s)\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   for s in select.select(socks, [], [], 60)[0]:\n\
             \x20       c, _ = s.accept(); c.close()\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = child;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "listener in {ns} did not start");
        Listener(child)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a TCP connection from `ns` to `to:port` is established within
/// 1.5 s.
fn connects(ns: &str, to: Ipv4Addr, port: u16) -> bool {
    let script = format!(
        "import socket, sys\n\
         try:\n\
         \x20   socket.create_connection(('{to}', {port}), timeout=1.5).close()\n\
         except OSError:\n\
         \x20   sys.exit(1)\n"
    );
    exec_in(ns, &["python3", "-c", &script])
        .unwrap()
        .status
        .success()
}

/// `meshctl policy test` on `host`: Some(true) allow (exit 0),
/// Some(false) deny (exit 1), None anything else.
fn policy_says(bed: &Testbed, host: usize, src: &str, dst: &str, port: &str) -> Option<bool> {
    let out = bed
        .meshctl(host, &["policy", "test", src, dst, port])
        .unwrap();
    match out.status.code() {
        Some(0) => Some(true),
        Some(1) => Some(false),
        _ => None,
    }
}

#[test]
fn every_cell_of_the_matrix_does_what_policy_test_says() {
    let mut bed = mesh("pol-matrix", [true; 3]);
    let containers = vec![
        add(&mut bed, 0, "web1", "web"),
        add(&mut bed, 1, "db1", "db"),
        add(&mut bed, 1, "web2", "web"),
        add(&mut bed, 2, "web3", "web"),
        add(&mut bed, 2, "db3", "db"),
    ];
    // Every host must know every container before verdicts mean anything.
    let all_known = wait_until(Duration::from_secs(20), || {
        (0..3).all(|h| {
            let records = bed.records(h).unwrap_or_default();
            containers
                .iter()
                .all(|c| records.iter().any(|r| r.value == c.address.to_string()))
        })
    });
    assert!(all_known, "records did not reach every host");
    let _listeners: Vec<Listener> = containers
        .iter()
        .map(|c| Listener::start(&c.ns, &[5432, 80]))
        .collect();

    let mut cells = 0;
    let mut allowed = 0;
    for src in &containers {
        for dst in containers.iter().filter(|d| d.name != src.name) {
            for port in [5432u16, 80] {
                let spec = format!("{port}/tcp");
                let (s, d) = (
                    format!("{}.{}", src.name, src.stack),
                    format!("{}.{}", dst.name, dst.stack),
                );
                let said = policy_says(&bed, src.host, &s, &d, &spec)
                    .unwrap_or_else(|| panic!("policy test {s} {d} {spec} failed"));
                let did = connects(&src.ns, dst.address, port);
                assert_eq!(
                    said,
                    did,
                    "{s} -> {d} {spec}: meshctl policy test says {said}, a connection {}",
                    if did { "was made" } else { "was not" }
                );
                cells += 1;
                allowed += usize::from(did);
            }
        }
    }
    // The matrix has both verdicts (and stays the same size): 40 cells,
    // 8 of them between containers of one host.
    assert_eq!(cells, 40);
    assert!(
        allowed > 0 && allowed < cells,
        "allowed {allowed} of {cells}"
    );

    // DNS still works under default deny.
    let out = exec_in(
        &containers[0].ns,
        &[
            "dig",
            "@169.254.169.250",
            "+short",
            "+time=1",
            "db1.db.mesh.internal",
        ],
    )
    .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains(&containers[1].address.to_string()),
        "db1.db did not resolve under default deny: {answer:?}"
    );
    // The drops are explained.
    let drops = bed.meshctl(0, &["drops"]).unwrap();
    let text = String::from_utf8_lossy(&drops.stdout);
    assert!(drops.status.success());
    assert!(text.contains("egress"), "no egress drop listed:\n{text}");
    // Bad input is exit 2.
    let bad = bed
        .meshctl(0, &["policy", "test", "web1.web", "db1.db", "0/tcp"])
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn a_sender_without_egress_policy_is_stopped_at_the_receiver() {
    // h0 enforces nothing, as a plain WireGuard peer would; h1 does.
    let mut bed = mesh("pol-ingress", [false, true, true]);
    let web = add(&mut bed, 0, "web1", "web");
    let db = add(&mut bed, 1, "db1", "db");
    assert!(wait_until(Duration::from_secs(20), || {
        bed.records(1)
            .unwrap_or_default()
            .iter()
            .any(|r| r.value == web.address.to_string())
    }));
    let before = bed.dropped(1, "policy_ingress").unwrap();
    const SENT: u32 = 7;
    let to = db.address.to_string();
    let out = exec_in(
        &web.ns,
        &[
            "ping",
            "-c",
            &SENT.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            "-q",
            &to,
        ],
    )
    .unwrap();
    assert!(!out.status.success(), "forbidden pings were answered");
    assert!(wait_until(Duration::from_secs(5), || {
        bed.dropped(1, "policy_ingress").unwrap() - before == u64::from(SENT)
    }));
    // Exactly the count sent, no more, after a quiet moment.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        bed.dropped(1, "policy_ingress").unwrap() - before,
        u64::from(SENT)
    );
    assert_eq!(bed.dropped(0, "policy_egress").unwrap(), 0);
}
