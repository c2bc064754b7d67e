use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::keys::PresharedKey;

struct Fixture {
    dir: tempfile::TempDir,
    own: PrivateKey,
    peer_keys: Vec<PublicKey>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let own = PrivateKey::generate().unwrap();
        let key_path = dir.path().join("h1.key");
        std::fs::write(&key_path, own.to_base64()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let peer_keys = (0..3)
            .map(|_| PrivateKey::generate().unwrap().public_key())
            .collect();
        Self {
            dir,
            own,
            peer_keys,
        }
    }

    /// `{k0}`..`{k2}` stand for peer public keys, `{own}` for ours.
    fn parse(&self, text: &str) -> Result<Config, ConfigError> {
        let mut text = text.replace("{own}", &self.own.public_key().to_string());
        for (i, k) in self.peer_keys.iter().enumerate() {
            text = text.replace(&format!("{{k{i}}}"), &k.to_string());
        }
        let path = self.dir.path().join("h1.toml");
        std::fs::write(&path, &text).unwrap();
        load(&path)
    }

    fn err(&self, text: &str) -> ConfigError {
        match self.parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e,
        }
    }
}

const HEAD: &str = r#"name = "h1"
private_key_file = "h1.key"
subnet = "10.42.1.0/24"
"#;

fn with_peers(peers: &str) -> String {
    format!("{HEAD}{peers}")
}

const PEER2: &str = r#"
[[peer]]
name = "h2"
public_key = "{k0}"
endpoint = "192.0.2.2:51820"
subnet = "10.42.2.0/24"
"#;

#[test]
fn minimal_config_gets_documented_defaults() {
    let f = Fixture::new();
    let c = f.parse(HEAD).unwrap();
    assert_eq!(c.name, "h1");
    assert_eq!(c.listen, "0.0.0.0:51820".parse().unwrap());
    assert_eq!(c.overlay, "10.42.0.0/16".parse().unwrap());
    assert_eq!(c.device, "mesh0");
    assert_eq!(c.mode, Mode::Tun);
    assert_eq!(c.control_socket, PathBuf::from("/run/meshnet/mesh0.sock"));
    assert_eq!(c.mtu, None);
    assert!(c.offload, "offloads are on unless turned off");
    assert_eq!(c.bridge, "mesh-br0");
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/meshnet/mesh0"));
    assert!(c.membership.peers.is_empty());
    assert_eq!(c.public_key(), f.own.public_key());
}

#[test]
fn full_config_from_the_issue_parses() {
    let f = Fixture::new();
    let c = f
        .parse(
            r#"name = "h1"
private_key_file = "h1.key"
listen = "0.0.0.0:51821"
overlay = "10.42.0.0/16"
subnet = "10.42.1.0/24"
device = "mesh7"
mode = "tun"
control_socket = "/tmp/x.sock"
mtu = 1380
offload = false

[[peer]]
name = "h2"
public_key = "{k0}"
endpoint = "192.0.2.2:51820"
subnet = "10.42.2.0/24"
keepalive = 25

[[peer]]
name = "h3"
public_key = "{k1}"
subnet = "10.42.3.0/24"
"#,
        )
        .unwrap();
    assert_eq!(c.device, "mesh7");
    assert_eq!(c.control_socket, PathBuf::from("/tmp/x.sock"));
    assert_eq!(c.mtu, Some(1380));
    assert!(!c.offload);
    let p = &c.membership.peers;
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].public_key, f.peer_keys[0]);
    assert_eq!(p[0].endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    assert_eq!(p[0].keepalive, Some(25));
    assert_eq!(p[1].endpoint, None);
    assert_eq!(p[1].keepalive, None);
}

#[test]
fn tap_mode_with_its_bridge_and_state_dir() {
    let f = Fixture::new();
    let c = f
        .parse(&format!(
            "{HEAD}mode = \"tap\"\nbridge = \"br-x\"\nstate_dir = \"/tmp/st\"\n"
        ))
        .unwrap();
    assert_eq!(c.mode, Mode::Tap);
    assert_eq!(c.bridge, "br-x");
    assert_eq!(c.state_dir, PathBuf::from("/tmp/st"));
}

#[test]
fn device_name_sets_default_control_socket() {
    let f = Fixture::new();
    let c = f.parse(&format!("{HEAD}device = \"ovl1\"\n")).unwrap();
    assert_eq!(c.control_socket, PathBuf::from("/run/meshnet/ovl1.sock"));
}

fn assert_at(e: &ConfigError, line: usize, key: &str, needle: &str) {
    assert_eq!(e.line, Some(line), "wrong line in: {e}");
    assert_eq!(e.key.as_deref(), Some(key), "wrong key in: {e}");
    assert!(e.message.contains(needle), "message lacks {needle:?}: {e}");
    assert!(e.file.ends_with("h1.toml"), "no file in: {e}");
    let shown = e.to_string();
    assert!(
        shown.contains(&format!("h1.toml:{line}: {key}: ")),
        "display: {shown}"
    );
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let f = Fixture::new();
    let e = f.err(&format!("{HEAD}lisen = \"0.0.0.0:1\"\n"));
    assert_at(&e, 4, "lisen", "unknown field");
}

#[test]
fn unknown_key_inside_a_peer_is_named() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&PEER2.replace("endpoint", "endpont")));
    assert_at(&e, 8, "endpont", "unknown field");
}

#[test]
fn toml_syntax_error_has_a_line() {
    let f = Fixture::new();
    let e = f.err(&format!("{HEAD}device = \n"));
    assert_eq!(e.line, Some(4), "{e}");
}

#[test]
fn overlapping_peer_subnets_are_rejected() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&format!(
        "{PEER2}\n[[peer]]\nname = \"h3\"\npublic_key = \"{{k1}}\"\nsubnet = \"10.42.2.128/25\"\n"
    )));
    assert_at(
        &e,
        14,
        "peer.h3.subnet",
        "overlaps the subnet 10.42.2.0/24 of peer \"h2\"",
    );
}

#[test]
fn peer_subnet_overlapping_our_own_is_rejected() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&PEER2.replace("10.42.2.0/24", "10.42.0.0/23")));
    assert_at(&e, 9, "peer.h2.subnet", "overlaps this host's subnet");
}

#[test]
fn subnet_outside_overlay_is_rejected() {
    let f = Fixture::new();
    let e = f.err(&HEAD.replace("10.42.1.0/24", "10.43.1.0/24"));
    assert_at(&e, 3, "subnet", "outside the overlay 10.42.0.0/16");
    let e = f.err(&with_peers(
        &PEER2.replace("10.42.2.0/24", "192.168.2.0/24"),
    ));
    assert_at(&e, 9, "peer.h2.subnet", "outside the overlay");
}

#[test]
fn subnet_with_host_bits_suggests_the_network() {
    let f = Fixture::new();
    let e = f.err(&HEAD.replace("10.42.1.0/24", "10.42.1.7/24"));
    assert_at(&e, 3, "subnet", "did you mean 10.42.1.0/24");
}

#[test]
fn duplicate_peer_names_are_rejected() {
    let f = Fixture::new();
    let dup = PEER2
        .replace("{k0}", "{k1}")
        .replace("10.42.2.0/24", "10.42.3.0/24");
    let e = f.err(&with_peers(&format!("{PEER2}{dup}")));
    assert_at(&e, 12, "peer.name", "duplicate host name \"h2\"");
}

#[test]
fn peer_named_like_this_host_is_rejected() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&PEER2.replace("\"h2\"", "\"h1\"")));
    assert_at(&e, 6, "peer.name", "duplicate host name \"h1\"");
}

#[test]
fn duplicate_peer_keys_are_rejected() {
    let f = Fixture::new();
    let dup = PEER2
        .replace("\"h2\"", "\"h3\"")
        .replace("10.42.2.0/24", "10.42.3.0/24");
    let e = f.err(&with_peers(&format!("{PEER2}{dup}")));
    assert_at(
        &e,
        13,
        "peer.h3.public_key",
        "same public key as peer \"h2\"",
    );
}

#[test]
fn own_key_as_peer_is_rejected() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&PEER2.replace("{k0}", "{own}")));
    assert_at(&e, 7, "peer.h2.public_key", "own public key");
}

#[test]
fn bad_base64_key_is_rejected() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&PEER2.replace("{k0}", "not-base64!")));
    assert_at(&e, 7, "peer.h2.public_key", "not a valid key");
}

#[test]
fn bad_endpoint_is_rejected() {
    let f = Fixture::new();
    let e = f.err(&with_peers(&PEER2.replace("192.0.2.2:51820", "192.0.2.2")));
    assert_at(&e, 8, "peer.h2.endpoint", "address:port");
}

#[test]
fn key_file_readable_by_others_is_a_config_error() {
    let f = Fixture::new();
    let key = f.dir.path().join("h1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = f.err(HEAD);
    assert_at(&e, 2, "private_key_file", "chmod 600");
}

#[test]
fn missing_key_file_is_a_config_error() {
    let f = Fixture::new();
    let e = f.err(&HEAD.replace("h1.key", "nope.key"));
    assert_at(&e, 2, "private_key_file", "cannot read key file");
}

#[test]
fn missing_required_key_is_reported() {
    let f = Fixture::new();
    let e = f.err("name = \"h1\"\nprivate_key_file = \"h1.key\"\n");
    assert!(e.message.starts_with("missing"), "{e}");
    assert_eq!(e.key.as_deref(), Some("subnet"));
}

#[test]
fn invalid_values_are_rejected() {
    let f = Fixture::new();
    let cases = [
        (
            format!("{HEAD}bridge = \"mesh0\"\n"),
            "bridge",
            "name of its own",
        ),
        (
            format!("{HEAD}bridge = \"a b\"\n"),
            "bridge",
            "not a valid interface name",
        ),
        (
            format!("{HEAD}state_dir = \"\"\n"),
            "state_dir",
            "must not be empty",
        ),
        (format!("{HEAD}mode = \"l2\"\n"), "mode", "unknown mode"),
        (format!("{HEAD}mtu = 100\n"), "mtu", "not a usable MTU"),
        (
            format!("{HEAD}device = \"mv0a2a0105\"\n"),
            "device",
            "belong to container ports",
        ),
        (
            format!("{HEAD}device = \"a/b\"\n"),
            "device",
            "not a valid interface name",
        ),
        (
            format!("{HEAD}device = \"abcdefghijklmnop\"\n"),
            "device",
            "not a valid interface name",
        ),
        (
            HEAD.replace("\"h1\"", "\"h 1\""),
            "name",
            "not a valid host name",
        ),
        (
            HEAD.replace("10.42.1.0/24", "10.42.1.0/31"),
            "subnet",
            "too small",
        ),
        (
            format!("{HEAD}overlay = \"10.42.0.0/33\"\n"),
            "overlay",
            "not an IPv4 network",
        ),
        (
            with_peers(&format!("{PEER2}keepalive = -1\n")),
            "peer.h2.keepalive",
            "keepalive",
        ),
    ];
    for (text, key, needle) in cases {
        let e = f.err(&text);
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        assert!(e.message.contains(needle), "{e}");
        assert!(e.line.is_some(), "{e}");
    }
}

#[test]
fn offload_must_be_a_boolean() {
    let f = Fixture::new();
    let e = f.err(&format!("{HEAD}offload = \"no\"\n"));
    assert!(e.message.contains("bool"), "{e}");
    assert_eq!(e.line, Some(HEAD.lines().count() + 1), "{e}");
}

#[test]
fn keepalive_zero_means_off() {
    let f = Fixture::new();
    let c = f
        .parse(&with_peers(&format!("{PEER2}keepalive = 0\n")))
        .unwrap();
    assert_eq!(c.membership.peers[0].keepalive, None);
}

#[test]
fn unreadable_config_names_the_file() {
    let e = load(Path::new("/nonexistent/meshd.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/meshd.toml: cannot read"),
        "{e}"
    );
}

#[test]
fn peer_psk_overrides_the_cluster_psk() {
    let f = Fixture::new();
    let write = |name: &str, psk: &PresharedKey| {
        let path = f.dir.path().join(name);
        std::fs::write(&path, psk.to_base64()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let (cluster, own) = (
        PresharedKey::generate().unwrap(),
        PresharedKey::generate().unwrap(),
    );
    write("cluster.psk", &cluster);
    write("h2.psk", &own);
    let h3 = "\n[[peer]]\nname = \"h3\"\npublic_key = \"{k1}\"\nsubnet = \"10.42.3.0/24\"\n";
    let text = format!(
        "cluster_psk_file = \"cluster.psk\"\n{}{}preshared_key_file = \"h2.psk\"\n{h3}",
        HEAD, PEER2
    );
    let c = f.parse(&text).unwrap();
    assert_eq!(c.membership.peers[0].preshared_key.as_ref(), Some(&own));
    assert_eq!(c.membership.peers[1].preshared_key.as_ref(), Some(&cluster));
}

#[test]
fn open_psk_files_are_refused() {
    let f = Fixture::new();
    let path = f.dir.path().join("cluster.psk");
    std::fs::write(&path, PresharedKey::generate().unwrap().to_base64()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = f.err(&format!("cluster_psk_file = \"cluster.psk\"\n{HEAD}"));
    assert_at(&e, 1, "cluster_psk_file", "chmod 600");
    let e = f.err(&with_peers(&format!(
        "{PEER2}preshared_key_file = \"cluster.psk\"\n"
    )));
    assert_at(&e, 10, "peer.h2.preshared_key_file", "chmod 600");
}

#[test]
fn dns_table_defaults_and_values() {
    let f = Fixture::new();
    let c = f.parse(HEAD).unwrap();
    assert_eq!(c.dns.domain, "mesh.internal");
    assert_eq!(c.dns.upstream, None);
    assert_eq!(c.dns.withdraw_after, std::time::Duration::from_secs(30));
    let c = f
        .parse(&format!("{HEAD}[dns]\ndomain = \"Corp.Example.\"\nupstream = [\"192.0.2.53:53\"]\nwithdraw_after = 10\n"))
        .unwrap();
    assert_eq!(c.dns.domain, "corp.example");
    assert_eq!(c.dns.upstream, Some(vec!["192.0.2.53:53".parse().unwrap()]));
    let e = f.err(&format!(
        "{HEAD}[dns]\nupstream = [\"169.254.169.250:53\"]\n"
    ));
    assert_at(&e, 5, "dns.upstream", "cannot forward to itself");
    let e = f.err(&format!("{HEAD}[dns]\ndomian = \"x\"\n"));
    assert_eq!(e.key.as_deref(), Some("domian"), "{e}");
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
to = { stack = "db", service = "pg" }
ports = ["5432/tcp"]
action = "allow"

[[policy.test]]
from = { stack = "web", host = "h1" }
to = { stack = "db", service = "pg", host = "h2" }
port = "5432/tcp"
expect = "allow"

[[policy.test]]
from = { stack = "web", host = "h1" }
to = { stack = "web", host = "h3" }
port = "80/tcp"
expect = "deny"
"#;

#[test]
fn a_policy_parses_and_its_tests_pass() {
    let f = Fixture::new();
    let c = f.parse(&format!("{HEAD}{POLICY}")).unwrap();
    let p = &c.policy;
    assert_eq!(p.default, crate::policy::Action::Deny);
    assert_eq!(p.within, Some(crate::policy::Within::Stack));
    assert_eq!(p.tenants.len(), 2);
    assert_eq!(p.rules[0].ports[0].port, Some(5432));
    assert_eq!(p.tests.len(), 2);
    assert!(f.parse(HEAD).unwrap().policy.allows_everything());
}

/// The line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn bad_policies_name_the_line_and_key() {
    let f = Fixture::new();
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "default = \"deny\"",
            "default = \"dney\"",
            "policy.default",
            "unknown action",
        ),
        (
            "\"5432/tcp\"",
            "\"0/tcp\"",
            "policy.rule.web-db.ports",
            "out of range",
        ),
        (
            "\"5432/tcp\"",
            "\"65536/tcp\"",
            "policy.rule.web-db.ports",
            "out of range",
        ),
        (
            "\"5432/tcp\"",
            "\"5432/sctp\"",
            "policy.rule.web-db.ports",
            "unknown protocol",
        ),
        (
            "within = \"stack\"",
            "within = \"stak\"",
            "policy.within",
            "unknown grouping",
        ),
        (
            "action = \"allow\"",
            "action = \"alow\"",
            "policy.rule.web-db.action",
            "unknown action",
        ),
        (
            "within = \"stack\"",
            "withn = \"stack\"",
            "withn",
            "unknown field",
        ),
        (
            "hosts = [\"h3\"]",
            "hosts = [\"h1\"]",
            "policy.tenant.red.hosts",
            "already in tenant",
        ),
    ];
    for (from, to, key, message) in cases {
        let text = format!("{HEAD}{POLICY}").replacen(from, to, 1);
        let e = f.err(&text);
        assert_eq!(e.key.as_deref(), Some(*key), "{to}: {e}");
        assert_eq!(e.line, Some(line_of(&text, to)), "{to}: {e}");
        assert!(e.message.contains(message), "{to}: {e}");
    }
}

#[test]
fn duplicate_rules_cross_tenant_rules_and_failing_tests_are_refused() {
    let f = Fixture::new();
    let dup = format!(
        "{HEAD}{POLICY}\n[[policy.rule]]\nname = \"web-db\"\nfrom = {{ stack = \"a\" }}\nto = {{ stack = \"b\" }}\naction = \"deny\"\n"
    );
    let e = f.err(&dup);
    assert_eq!(
        (e.key.as_deref(), e.line),
        (Some("policy.rule.name"), Some(dup.lines().count() - 3))
    );
    let across = format!(
        "{HEAD}{POLICY}\n[[policy.rule]]\nname = \"x\"\nfrom = {{ stack = \"a\", tenant = \"blue\" }}\nto = {{ stack = \"b\", tenant = \"red\" }}\naction = \"allow\"\n"
    );
    let e = f.err(&across);
    assert_eq!(e.key.as_deref(), Some("policy.rule.x.to.tenant"));
    assert_eq!(e.line, Some(line_of(&across, "tenant = \"red\" }")));
    assert!(e.message.contains("tenants never reach each other"), "{e}");
    let failing = format!("{HEAD}{POLICY}").replacen("expect = \"deny\"", "expect = \"allow\"", 1);
    let e = f.err(&failing);
    assert_eq!(e.key.as_deref(), Some("policy.test"));
    assert!(
        e.message.contains("tenant blue never reaches tenant red"),
        "{e}"
    );
    let empty = format!("{HEAD}{POLICY}").replacen("from = { stack = \"web\" }", "from = {}", 1);
    assert!(f.err(&empty).message.contains("needs a stack or a service"));
}

#[test]
fn metrics_listen_is_off_unless_set_and_must_be_an_address() {
    let f = Fixture::new();
    assert_eq!(f.parse(HEAD).unwrap().metrics_listen, None);
    let on = f.parse(&format!("metrics_listen = \"127.0.0.1:9586\"\n{HEAD}"));
    assert_eq!(
        on.unwrap().metrics_listen,
        Some("127.0.0.1:9586".parse().unwrap())
    );
    let e = f.err(&format!("{HEAD}metrics_listen = \"9586\"\n"));
    assert_at(&e, 4, "metrics_listen", "is not an address:port");
}
mod store_table {
    use super::*;

    const BASE: &str = "name = \"h1\"\nprivate_key_file = \"h1.key\"\n";

    #[test]
    fn store_without_subnet_claims_later_with_documented_defaults() {
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{BASE}listen = \"192.0.2.7:51820\"\n[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
            ))
            .unwrap();
        let s = c.store.unwrap();
        assert_eq!(s.prefix, "/meshnet/v1");
        assert_eq!(s.block_prefix, 24);
        assert_eq!(s.lease_ttl, 45);
        assert_eq!(s.advertise, "192.0.2.7:51820".parse().unwrap());
        assert_eq!(s.requested, None);
        assert_eq!(s.tls, None);
        assert_eq!(c.subnet, c.overlay, "placeholder until the claim");
    }

    #[test]
    fn store_with_subnet_requests_it_and_tls_files_resolve_beside_the_config() {
        let f = Fixture::new();
        let c = f
            .parse(&format!(
                "{BASE}subnet = \"10.42.9.0/24\"\n[store]\nkind = \"etcd\"\nendpoints = [\"https://e1:2379\", \"https://e2:2379\"]\n\
                 prefix = \"/x/\"\nblock_prefix = 24\nadvertise = \"192.0.2.7:51820\"\nlease_ttl = 30\nkeepalive = 25\n\
                 ca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n"
            ))
            .unwrap();
        let s = c.store.unwrap();
        assert_eq!(s.requested, Some("10.42.9.0/24".parse().unwrap()));
        assert_eq!(c.subnet, "10.42.9.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(s.prefix, "/x");
        assert_eq!(s.keepalive, Some(25));
        assert_eq!(s.endpoints.len(), 2);
        let tls = s.tls.unwrap();
        assert_eq!(tls.ca_file, Some(f.dir.path().join("ca.pem")));
        assert!(tls.identity.is_some());
    }

    #[test]
    fn bad_store_tables_name_file_line_and_key() {
        let f = Fixture::new();
        let head = format!("{BASE}listen = \"192.0.2.7:51820\"\n[store]\n");
        let ep = "endpoints = [\"http://127.0.0.1:2379\"]\n";
        let cases = [
            (
                format!("{head}kind = \"consul\"\n{ep}"),
                5,
                "store.kind",
                "unknown store",
            ),
            (
                format!("{head}kind = \"etcd\"\nendpoints = []\n"),
                6,
                "store.endpoints",
                "at least one",
            ),
            (
                format!("{head}kind = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]\n"),
                6,
                "store.endpoints",
                "not a URL",
            ),
            (
                format!("{head}kind = \"etcd\"\n{ep}prefix = \"meshnet\"\n"),
                7,
                "store.prefix",
                "not a key prefix",
            ),
            (
                format!("{head}kind = \"etcd\"\n{ep}block_prefix = 8\n"),
                7,
                "store.block_prefix",
                "/16../30",
            ),
            (
                format!("{head}kind = \"etcd\"\n{ep}lease_ttl = 2\n"),
                7,
                "store.lease_ttl",
                "10-600",
            ),
            (
                format!("{head}kind = \"etcd\"\n{ep}advertise = \"0.0.0.0:1\"\n"),
                7,
                "store.advertise",
                "real address",
            ),
            (
                format!("{head}kind = \"etcd\"\n{ep}cert_file = \"c.pem\"\n"),
                7,
                "store.cert_file",
                "go together",
            ),
        ];
        for (text, line, key, needle) in cases {
            let e = f.err(&text);
            assert_at(&e, line, key, needle);
        }
    }

    #[test]
    fn store_needs_an_advertised_endpoint_and_refuses_static_peers() {
        let f = Fixture::new();
        let e = f.err(&format!(
            "{BASE}[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
        ));
        assert_eq!(e.key.as_deref(), Some("store.advertise"), "{e}");
        let e = f.err(&format!(
            "{BASE}listen = \"192.0.2.7:51820\"\n{PEER2}\n[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n"
        ));
        assert!(e.message.contains("do not mix"), "{e}");
    }
}
