//! The packaged systemd unit (deploy/meshd.service) and its example config
//! (deploy/meshd.toml): `systemd-analyze verify` finds nothing to say about
//! the unit, the unit's paths are meshd's defaults, and the example config
//! validates.
//!
//! Needs `systemd-analyze` (Debian package systemd; it works without
//! systemd as PID 1); fails, never skips, without it.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use meshnet::config;

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const UNIT: &str = include_str!("../deploy/meshd.service");
const EXAMPLE_CONFIG: &str = include_str!("../deploy/meshd.toml");
/// Where the unit expects meshd to be installed.
const INSTALLED_MESHD: &str = "/usr/local/bin/meshd";

/// The unit's value for `key` (the last assignment wins, as in systemd).
fn unit_value(key: &str) -> String {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .unwrap_or_else(|| panic!("the unit sets no {key}"))
        .trim()
        .to_owned()
}

#[test]
fn unit_verifies_clean() {
    // verify checks that ExecStart's program exists: point it at the
    // binary this test run built, and only there.
    assert!(
        UNIT.contains(INSTALLED_MESHD),
        "the unit runs {INSTALLED_MESHD}"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("meshd.service");
    std::fs::write(&unit, UNIT.replace(INSTALLED_MESHD, MESHD)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd): scripts/test.sh installs it");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{said}"
    );
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warns:\n{said}"
    );
}

#[test]
fn unit_verify_catches_a_mistake() {
    // The clean verdict above means something: the same check on a unit
    // with a misspelt key and a bad device right reports both.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("meshd.service");
    let broken = UNIT
        .replace(INSTALLED_MESHD, MESHD)
        .replace("ProtectHome=yes", "ProtectHom=yes")
        .replace("/dev/net/tun rw", "/dev/net/tun rwz");
    std::fs::write(&unit, broken).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd): scripts/test.sh installs it");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Unknown key 'ProtectHom'"), "{said}");
    assert!(said.contains("Invalid device rights 'rwz'"), "{said}");
}

#[test]
fn unit_paths_are_meshds_defaults() {
    assert_eq!(unit_value("StateDirectory"), "meshnet");
    assert_eq!(
        Path::new("/var/lib").join(unit_value("StateDirectory")),
        Path::new(config::STATE_DIR)
    );
    assert_eq!(
        Path::new("/run").join(unit_value("RuntimeDirectory")),
        Path::new(config::CONTROL_SOCKET_DIR)
    );
    assert_eq!(
        unit_value("ExecStart"),
        format!("{INSTALLED_MESHD} --config /etc/meshnet/meshd.toml")
    );
    assert_eq!(unit_value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(unit_value("DeviceAllow"), "/dev/net/tun rw");
    let bounding = unit_value("CapabilityBoundingSet");
    assert!(bounding.contains("CAP_NET_ADMIN"), "{bounding}");
    assert_eq!(unit_value("AmbientCapabilities"), bounding);
    assert_eq!(
        unit_value("RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    );
}

#[test]
fn example_config_validates_with_default_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meshd.toml");
    std::fs::write(&file, EXAMPLE_CONFIG).unwrap();
    let key = dir.path().join("private.key");
    std::fs::write(
        &key,
        meshnet::keys::PrivateKey::generate().unwrap().to_base64(),
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let loaded = config::load(&file).unwrap();
    assert_eq!(
        loaded.control_socket,
        config::default_control_socket(config::DEFAULT_DEVICE)
    );
    assert!(loaded.state_dir.starts_with(config::STATE_DIR));
    assert_eq!(loaded.mode, config::Mode::Tap);

    let out = Command::new(MESHD)
        .args(["--check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
