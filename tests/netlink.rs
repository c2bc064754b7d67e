//! The agent sets up links over netlink alone: TAP-mode meshd runs with no
//! `ip` on its PATH, and with /proc/sys read-only (as in an unprivileged
//! container), and still attaches containers that reach each other across
//! hosts. Both restrictions come from a wrapper script the testbed starts
//! in place of meshd. Namespaces given by path (/run/netns/NAME and
//! /proc/PID/ns/net) attach and detach like names; a file that is no
//! namespace is refused.
//!
//! Needs root, iproute2 (for the test bed itself), nftables, util-linux
//! (unshare, mount) and ping; fails (never skips) without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnet::config::Mode;
use meshnet_testbed::{Binaries, MeshOptions, Testbed, exec_in};

/// Writes an executable wrapper `name` in `dir` that runs `body` then
/// execs the real meshd with the wrapper's arguments.
fn wrapper(dir: &Path, name: &str, body: &str) -> PathBuf {
    let meshd = env!("CARGO_BIN_EXE_meshd");
    let path = dir.join(name);
    let script = format!("#!/bin/sh\nset -e\n{body}\nexec {meshd} \"$@\"\n");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn tap_mesh(tag: &str, meshd: PathBuf) -> Testbed {
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let bins = Binaries {
        meshd,
        meshctl: env!("CARGO_BIN_EXE_meshctl").into(),
    };
    let mut bed = Testbed::new(tag, &options, bins).expect("building the testbed");
    if let Err(e) = bed.start_all() {
        panic!("meshd did not start under the wrapper: {e:#}");
    }
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    bed
}

/// One container per host; the first pings the second across the mesh.
/// Then the bridge carries the ARP settings and no device has IPv6
/// addresses: what the agent set over netlink really took effect.
fn containers_reach_each_other(bed: &mut Testbed) {
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(1, "c2").unwrap();
    bed.attach(0, &c1, "web", &[]).unwrap();
    // By path, as a runtime names it.
    let a2 = bed
        .attach(1, &format!("/run/netns/{c2}"), "db", &[])
        .unwrap();
    let out = exec_in(
        &c1,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", &a2.to_string()],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "ping across hosts failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        bed.log(0)
    );
    for (knob, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let path = format!("/proc/sys/net/ipv4/conf/mesh-br0/{knob}");
        let read = bed.exec(0, &["cat", &path]).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&read.stdout).trim(),
            value,
            "{knob}"
        );
    }
    for dev in ["mesh0", "mesh-br0"] {
        let v6 = bed
            .exec(0, &["ip", "-d", "addr", "show", "dev", dev])
            .unwrap();
        assert!(v6.status.success(), "{dev} missing");
        let text = String::from_utf8_lossy(&v6.stdout);
        let link = bed
            .exec(0, &["ip", "-d", "link", "show", "dev", dev])
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        assert!(
            !text.contains("inet6"),
            "{dev} has IPv6 addresses:\n{text}\n{link}\n{}",
            bed.log(0)
        );
    }
    let eth0 = exec_in(&c1, &["ip", "-br", "link", "show", "eth0"]).unwrap();
    assert!(String::from_utf8_lossy(&eth0.stdout).contains("UP"));
}

/// A process in an anonymous network namespace of its own; killed on drop.
struct Unshared(std::process::Child);

impl Unshared {
    fn start() -> Self {
        let child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "60"])
            .spawn()
            .expect("unshare (util-linux)");
        let me = std::fs::read_link("/proc/self/ns/net").unwrap();
        let path = format!("/proc/{}/ns/net", child.id());
        let moved = meshnet_testbed::wait_until(Duration::from_secs(5), || {
            std::fs::read_link(&path).is_ok_and(|ns| ns != me)
        });
        assert!(moved, "unshare -n did not get a namespace of its own");
        Self(child)
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.0.id())
    }
}

impl Drop for Unshared {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace no `ip netns` knows, given as /proc/PID/ns/net: attached,
/// reachable from a neighbour on the bridge, detached by the same path; a
/// file that is no namespace is refused clearly.
fn attach_by_proc_path(bed: &Testbed) {
    let process = Unshared::start();
    let address = bed.attach(0, &process.netns(), "anon", &[]).unwrap();
    let neighbour = bed
        .containers(0)
        .unwrap()
        .into_iter()
        .find(|c| c.name == "web")
        .unwrap();
    let out = exec_in(
        &neighbour.netns,
        &[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &address.to_string(),
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "ping {address} failed:\n{}",
        bed.log(0)
    );
    let detach = bed
        .meshctl(0, &["detach", "--netns", &process.netns()])
        .unwrap();
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    assert!(bed.containers(0).unwrap().iter().all(|c| c.name != "anon"));
    let refused = bed
        .meshctl(0, &["attach", "--netns", "/etc/hostname", "--name", "x"])
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("is not a network namespace"), "{err}");
}

#[test]
fn tap_mode_spawns_no_ip_tool() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // nft stays (the bridge filter); nothing else is reachable.
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nft not installed (Debian package nftables)");
    std::os::unix::fs::symlink(nft, bin.join("nft")).unwrap();
    let body = format!(
        "export PATH={bin}\ncommand -v ip >/dev/null 2>&1 && exit 97\n:",
        bin = bin.display()
    );
    let mut bed = tap_mesh("noip", wrapper(dir.path(), "meshd-noip", &body));
    containers_reach_each_other(&mut bed);
    attach_by_proc_path(&bed);
}

#[test]
fn tap_mode_writes_nothing_under_proc_sys() {
    let dir = tempfile::tempdir().unwrap();
    // A mount namespace of meshd's own, where /proc/sys is read-only; the
    // wrapper refuses to go on if a write there still succeeds.
    let body = r#"if [ -z "$MESHNET_RO" ]; then
  export MESHNET_RO=1
  exec unshare -m --propagation slave "$0" "$@"
fi
mount --bind /proc/sys /proc/sys
mount -o remount,ro,bind /proc/sys
if (echo 0 > /proc/sys/net/ipv4/conf/lo/arp_ignore) 2>/dev/null; then exit 98; fi"#;
    let mut bed = tap_mesh("rosys", wrapper(dir.path(), "meshd-rosys", body));
    containers_reach_each_other(&mut bed);
}
