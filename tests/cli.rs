//! The binaries at their edges: keys compatible with `wg`, exit codes and
//! messages for bad configs, and that a bad config touches no device.
//!
//! Needs root, iproute2 and wireguard-tools; fails (never skips) without.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

use meshnet::keys::PrivateKey;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

fn run_with_stdin(program: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); scripts/test.sh installs what the tests need")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn keys_move_freely_between_wg_and_meshctl() {
    let wg_private = stdout(&run_with_stdin("wg", &["genkey"], ""));
    let wg_public = stdout(&run_with_stdin("wg", &["pubkey"], &wg_private));
    assert_eq!(
        stdout(&run_with_stdin(MESHCTL, &["pubkey"], &wg_private)),
        wg_public
    );

    let ours = stdout(&run_with_stdin(MESHCTL, &["genkey"], ""));
    assert_eq!(ours.len(), 44);
    assert_eq!(
        stdout(&run_with_stdin("wg", &["pubkey"], &ours)),
        stdout(&run_with_stdin(MESHCTL, &["pubkey"], &ours))
    );
}

#[test]
fn pubkey_rejects_garbage() {
    let out = run_with_stdin(MESHCTL, &["pubkey"], "not a key\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not hold a private key"));
}

#[test]
fn genkey_out_writes_a_private_file_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.key");
    let p = path.to_str().unwrap();
    assert!(
        run_with_stdin(MESHCTL, &["genkey", "--out", p], "")
            .status
            .success()
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read_to_string(&path).unwrap();
    assert!(PrivateKey::from_base64(&first).is_ok());
    let again = run_with_stdin(MESHCTL, &["genkey", "--out", p], "");
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
}

#[test]
fn meshctl_without_an_agent_says_so_in_one_line() {
    let out = run_with_stdin(MESHCTL, &["--socket", "/nonexistent/x.sock", "peers"], "");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("meshd is not running") && err.contains("/nonexistent/x.sock"),
        "{err}"
    );
}

/// A fresh namespace; removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("mn-{}-cli-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (iproute2) is needed");
        assert!(
            ok.success(),
            "cannot create a namespace: the tests need root"
        );
        Self(name)
    }

    fn links(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0, "-o", "link"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn config_dir(config: &str, key_mode: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("h1.key");
    std::fs::write(&key, PrivateKey::generate().unwrap().to_base64()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).unwrap();
    std::fs::write(dir.path().join("h1.toml"), config).unwrap();
    dir
}

fn meshd_in(ns: &Netns, dir: &tempfile::TempDir, extra: &[&str]) -> Output {
    let config = dir.path().join("h1.toml");
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            MESHD,
            "--config",
            config.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap()
}

const VALID: &str = "name = \"h1\"\nprivate_key_file = \"h1.key\"\nsubnet = \"10.42.1.0/24\"\n\
control_socket = \"/tmp/meshnet-cli-test-unused.sock\"\n";

#[test]
fn a_broken_config_exits_2_naming_file_line_and_key_and_touches_no_device() {
    let ns = Netns::new("bad");
    let broken = format!(
        "{VALID}\n[[peer]]\nname = \"h2\"\npublic_key = \"{}\"\nsubnet = \"10.42.1.128/25\"\n",
        PrivateKey::generate().unwrap().public_key()
    );
    let dir = config_dir(&broken, 0o600);
    let out = meshd_in(&ns, &dir, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("h1.toml:9: peer.h2.subnet: 10.42.1.128/25 overlaps this host's subnet"),
        "{err}"
    );
    assert!(
        !ns.links().contains("mesh0"),
        "a device was created: {}",
        ns.links()
    );
}

#[test]
fn a_bad_policy_exits_2_naming_file_line_and_key_and_touches_no_device() {
    let ns = Netns::new("policy");
    let cases = [
        (
            "default = \"dney\"\n",
            7,
            "policy.default",
            "unknown action",
        ),
        (
            "[[policy.rule]]\nname = \"a\"\nfrom = { stack = \"x\" }\nto = { stack = \"y\" }\nports = [\"65536/tcp\"]\naction = \"allow\"\n",
            11,
            "policy.rule.a.ports",
            "out of range",
        ),
        ("defualt = \"deny\"\n", 7, "defualt", "unknown field"),
    ];
    for (policy, line, key, message) in cases {
        let dir = config_dir(&format!("{VALID}\n[policy]\n{policy}"), 0o600);
        let out = meshd_in(&ns, &dir, &[]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("h1.toml:{line}: {key}:")) && err.contains(message),
            "{err}"
        );
        assert!(!ns.links().contains("mesh0"));
    }
}

#[test]
fn a_key_file_readable_by_others_is_refused_before_anything_starts() {
    let ns = Netns::new("key");
    let dir = config_dir(VALID, 0o644);
    let out = meshd_in(&ns, &dir, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("h1.toml:2: private_key_file:") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!ns.links().contains("mesh0"));
}

#[test]
fn check_validates_without_starting() {
    let ns = Netns::new("check");
    let dir = config_dir(VALID, 0o600);
    let out = meshd_in(&ns, &dir, &["--check"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is valid"));
    assert!(!ns.links().contains("mesh0"));
}

#[test]
fn the_documented_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/meshd.toml"))
            .unwrap();
    std::fs::create_dir(dir.path().join("examples")).unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let key = dir.path().join("keys/h1.key");
    std::fs::write(&key, PrivateKey::generate().unwrap().to_base64()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.path().join("examples/meshd.toml");
    std::fs::write(&path, example).unwrap();
    let config = meshnet::config::load(&path).unwrap();
    assert_eq!(config.membership.peers.len(), 2);
    assert_eq!(config.device, "mesh0");
}

fn meshctl(args: &[&str]) -> Output {
    Command::new(MESHCTL).args(args).output().unwrap()
}

/// The subcommands `meshctl --help` lists (without clap's `help`).
fn subcommands() -> Vec<String> {
    let help = stdout(&meshctl(&["--help"]));
    let list = help
        .split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .split("\n\n")
        .next()
        .unwrap()
        .to_owned();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_has_an_example_and_every_listing_has_json() {
    let commands = subcommands();
    for expected in ["peers", "status", "reload", "completions", "man"] {
        assert!(commands.iter().any(|c| c == expected), "{commands:?}");
    }
    assert!(stdout(&meshctl(&["--help"])).contains("Examples:\n  meshctl status"));
    for command in &commands {
        let help = stdout(&meshctl(&[command, "--help"]));
        assert!(
            help.contains("Example") && help.contains("  meshctl "),
            "meshctl {command} --help has no example:\n{help}"
        );
    }
    for listing in [
        "peers",
        "status",
        "dns",
        "containers",
        "reload",
        "attach",
        "detach",
        "drops",
    ] {
        let help = stdout(&meshctl(&[listing, "--help"]));
        assert!(help.contains("--json"), "meshctl {listing} has no --json");
    }
}

#[test]
fn completions_are_valid_scripts_that_know_every_command() {
    let bash = stdout(&meshctl(&["completions", "bash"]));
    let check = run_with_stdin("bash", &["-n"], &bash);
    assert!(check.status.success(), "bash -n: {check:?}");
    // What bash offers after `meshctl re<TAB>` and `meshctl peers --f<TAB>`.
    let complete = |words: &str, cword: usize| {
        let script = format!(
            "{bash}\nCOMP_WORDS=({words}); COMP_CWORD={cword}; \
             _meshctl meshctl \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        stdout(&run_with_stdin("bash", &[], &script))
    };
    assert_eq!(complete("meshctl re", 1), "reload");
    assert_eq!(complete("meshctl peers --f", 2), "--format");
    assert!(stdout(&meshctl(&["completions", "zsh"])).starts_with("#compdef meshctl"));
    assert!(stdout(&meshctl(&["completions", "fish"])).contains("complete -c meshctl"));
    let bad = meshctl(&["completions", "tcsh"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value 'tcsh'"));
}

#[test]
fn man_pages_render_without_warnings_for_meshctl_and_each_command() {
    let mut pages = vec![(String::from("meshctl"), meshctl(&["man"]))];
    for command in subcommands() {
        pages.push((format!("meshctl-{command}"), meshctl(&["man", &command])));
    }
    for (name, page) in pages {
        let roff = stdout(&page);
        assert!(roff.contains(&format!(".TH {name} 1")), "{name}:\n{roff}");
        let lint = run_with_stdin("groff", &["-man", "-Tutf8", "-ww", "-z"], &roff);
        assert!(
            lint.status.success() && lint.stderr.is_empty(),
            "groff warns about {name}: {}",
            String::from_utf8_lossy(&lint.stderr)
        );
    }
    let unknown = meshctl(&["man", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no command \"nope\""));
}

#[test]
fn reload_without_an_agent_fails_and_says_why() {
    let out = meshctl(&["--socket", "/nonexistent/meshd.sock", "reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("meshd is not running"));
}
