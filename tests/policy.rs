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
use meshnet_testbed::{
    Binaries, METRICS_LISTEN, MeshOptions, Testbed, exec_in, promtool_check, require_tools,
    wait_until,
};

fn bins() -> Binaries {
    meshnet_testbed::this_build!()
}

const POLICY: &str = r#"
[policy]
default = "deny"
within = "stack"

[[policy.tenant]]
name = "blue"
hosts = ["h1", "h2"]

[[policy.tenant]]
name = "red"
hosts = ["h3"]

[[policy.rule]]
name = "web-db"
from = { stack = "web" }
to = { stack = "db" }
ports = ["5432/tcp"]
action = "allow"

[[policy.test]]
from = { stack = "web", host = "h1" }
to = { stack = "db", host = "h2" }
port = "5432/tcp"
expect = "allow"
"#;

fn require_policy_tools() {
    require_tools(
        &["nft", "dig", "python3", "ping"],
        "run scripts/test.sh (installs nftables, dnsutils, iputils-ping)",
    );
}

/// Three TAP hosts (h1, h2, h3 at indices 0-2); `with_policy[i]` says
/// whether host i has [policy].
fn mesh(tag: &str, with_policy: [bool; 3]) -> Testbed {
    require_policy_tools();
    let options = MeshOptions {
        hosts: 3,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let mut bed = Testbed::new(tag, &options, bins()).expect("building the testbed");
    for (i, on) in with_policy.iter().enumerate() {
        bed.prepend_config(i, &format!("metrics_listen = \"{METRICS_LISTEN}\""))
            .unwrap();
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
    // h1 enforces nothing, as a plain WireGuard peer would; h2 does.
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
    let out = meshnet_testbed::ping_in(&web.ns, db.address, SENT).unwrap();
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
    // The metrics say the same, by direction, tier and rule.
    let (status, body) = bed.http_get(1, "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let series =
        "meshnet_policy_dropped_packets_total{direction=\"ingress\",tier=\"within\",rule=\"\"}";
    let line = body
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"));
    assert_eq!(line.trim(), (u64::from(SENT) + before).to_string());
    let check = promtool_check(&body).unwrap();
    assert!(
        check.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// A TCP server in `ns` on port 5432 that hashes what it receives, keeps
/// the byte count in `count_file`, and answers the SHA-256 at EOF.
const HASH_SERVER: &str = r#"
import hashlib, socket, sys
count_file = sys.argv[1]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 5432)); s.listen(4)
print('ready', flush=True)
while True:
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        h.update(b); n += len(b)
        open(count_file, 'w').write(str(n))
    c.sendall(h.hexdigest().encode()); c.close()
"#;

/// A client driven by lines on stdin: `send N` sends N random bytes and
/// answers `sent`; `finish` half-closes and prints whether the server's
/// SHA-256 matches what was sent.
const HASH_CLIENT: &str = r#"
import hashlib, os, socket, sys
c = socket.create_connection((sys.argv[1], 5432), timeout=30)
h = hashlib.sha256()
print('connected', flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == 'send':
        b = os.urandom(int(cmd[1])); h.update(b); c.sendall(b)
        print('sent', flush=True)
    elif cmd[0] == 'finish':
        c.shutdown(socket.SHUT_WR)
        got = b''
        while True:
            b = c.recv(100)
            if not b:
                break
            got += b
        print('match' if got.decode() == h.hexdigest() else 'mismatch', flush=True)
        break
"#;

struct Driven {
    child: Child,
    lines: std::io::BufReader<std::process::ChildStdout>,
}

impl Driven {
    fn start(ns: &str, script: &str, args: &[&str], expect: &str) -> Self {
        let mut argv = vec!["netns", "exec", ns, "python3", "-c", script];
        argv.extend_from_slice(args);
        let mut child = Command::new("ip")
            .args(&argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut me = Self { child, lines };
        assert_eq!(me.line(), expect);
        me
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.lines, &mut line).unwrap();
        line.trim().to_owned()
    }

    fn say(&mut self, what: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{what}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rewrites the policy part of every host's config and reloads it with
/// `meshctl reload`, which must report the policy change.
fn reload_policy(bed: &Testbed, policy: &str) {
    for (i, host) in bed.hosts.iter().enumerate() {
        let text = std::fs::read_to_string(&host.config).unwrap();
        let base = text.split("\n[policy]").next().unwrap();
        std::fs::write(&host.config, format!("{base}{policy}")).unwrap();
        let out = bed.meshctl(i, &["reload"]).unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("policy:"),
            "reload on host {i}: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn byte_count(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_stream_survives_reloads_that_keep_it_and_stops_when_its_rule_goes() {
    let mut bed = mesh("pol-reload", [true; 3]);
    let web = add(&mut bed, 0, "web1", "web");
    let db = add(&mut bed, 1, "db1", "db");
    assert!(wait_until(Duration::from_secs(20), || {
        (0..2).all(|h| {
            let r = bed.records(h).unwrap_or_default();
            [web.address, db.address]
                .iter()
                .all(|a| r.iter().any(|x| x.value == a.to_string()))
        })
    }));
    let dir = tempfile::tempdir().unwrap();
    let counts = dir.path().join("count");
    let _server = Driven::start(&db.ns, HASH_SERVER, &[counts.to_str().unwrap()], "ready");
    let mut client = Driven::start(
        &web.ns,
        HASH_CLIENT,
        &[&db.address.to_string()],
        "connected",
    );

    // Ten reloads that change the policy but keep web -> db:5432 allowed.
    for round in 0..10 {
        client.say("send 65536");
        assert_eq!(client.line(), "sent");
        let extra = format!(
            "{POLICY}\n[[policy.rule]]\nname = \"extra{round}\"\nfrom = {{ stack = \"x{round}\" }}\nto = {{ stack = \"db\" }}\naction = \"allow\"\n"
        );
        reload_policy(&bed, &extra);
    }
    client.say("send 65536");
    assert_eq!(client.line(), "sent");
    client.say("finish");
    assert_eq!(
        client.line(),
        "match",
        "the stream lost or changed bytes across reloads"
    );

    // A long-lived flow, then its rule goes: it stops at its next packet.
    let mut client = Driven::start(
        &web.ns,
        HASH_CLIENT,
        &[&db.address.to_string()],
        "connected",
    );
    client.say("send 1000");
    assert_eq!(client.line(), "sent");
    assert!(wait_until(Duration::from_secs(5), || byte_count(&counts) == 1000));
    let denied_before = bed.dropped(0, "policy_egress").unwrap();
    let without_rule = POLICY.replace("ports = [\"5432/tcp\"]", "ports = [\"5433/tcp\"]");
    let without_rule = without_rule.replace(
        "[[policy.test]]\nfrom = { stack = \"web\", host = \"h1\" }\nto = { stack = \"db\", host = \"h2\" }\nport = \"5432/tcp\"",
        "[[policy.test]]\nfrom = { stack = \"web\", host = \"h1\" }\nto = { stack = \"db\", host = \"h2\" }\nport = \"5433/tcp\"",
    );
    reload_policy(&bed, &without_rule);
    client.say("send 1000");
    assert_eq!(client.line(), "sent");
    assert!(
        wait_until(Duration::from_secs(5), || {
            bed.dropped(0, "policy_egress").unwrap() > denied_before
        }),
        "the flow's next packet was not dropped"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        byte_count(&counts),
        1000,
        "bytes crossed after the rule went"
    );
}
