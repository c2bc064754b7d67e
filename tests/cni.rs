//! meshnet-cni driven by the real runtime: podman (CNI network backend,
//! runc) runs a container on a `meshnet` network inside one host's
//! namespace, next to that host's real meshd (TAP mode); the container
//! reaches a container on the other host and resolves it by name. CHECK
//! passes, DEL is idempotent, and bad input gets the spec's error JSON.
//!
//! Needs root, iproute2, nftables, util-linux (nsenter), podman,
//! containernetworking-plugins, runc and busybox-static (scripts/deps.sh
//! installs them); fails (never skips) without them. No registry: the
//! image is built `FROM scratch` with the host's static busybox.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use meshnet::config::Mode;
use meshnet_testbed::{MeshOptions, Testbed, exec_in, require_tools};
use serde_json::Value;

const PLUGIN: &str = env!("CARGO_BIN_EXE_meshnet-cni");
/// A plugin's environment.
type Env<'a> = Vec<(&'a str, &'a str)>;

const IMAGE: &str = "localhost/meshnet-cni-test:busybox";

fn tap_mesh(tag: &str) -> Testbed {
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let bins = meshnet_testbed::this_build!();
    let mut bed = Testbed::new(tag, &options, bins).expect("building the testbed");
    bed.start_all().expect("starting agents");
    bed.wait_all_up(Duration::from_secs(15)).unwrap();
    bed
}

/// podman with its own storage, CNI config and plugin directory, run in
/// the host's network namespace (nsenter keeps the root mount namespace,
/// so the netns files podman mounts under /run/netns reach the agent).
struct Podman {
    dir: tempfile::TempDir,
    host_ns: String,
}

impl Podman {
    fn new(host_ns: &str, control_socket: &Path) -> Self {
        require_tools(
            &["podman", "runc", "nsenter", "busybox"],
            "scripts/deps.sh podman containernetworking-plugins runc busybox-static",
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for sub in ["plugins", "net.d", "image"] {
            std::fs::create_dir(p.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(PLUGIN, p.join("plugins/meshnet-cni")).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "meshnet",
            "plugins": [{ "type": "meshnet-cni", "control_socket": control_socket }],
        });
        std::fs::write(p.join("net.d/meshnet.conflist"), conflist.to_string()).unwrap();
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
            p.join("plugins").display()
        );
        std::fs::write(p.join("containers.conf"), conf).unwrap();
        std::fs::copy("/bin/busybox", p.join("image/busybox")).unwrap();
        std::fs::write(
            p.join("image/Containerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\n",
        )
        .unwrap();
        Self {
            dir,
            host_ns: host_ns.to_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let p = self.dir.path();
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host_ns))
            .arg("podman")
            .arg("--root")
            .arg(p.join("root"))
            .arg("--runroot")
            .arg(p.join("runroot"))
            .args(["--runtime", "runc", "--network-backend", "cni"])
            .arg("--cni-config-dir")
            .arg(p.join("net.d"))
            .args(args)
            .env("CONTAINERS_CONF", p.join("containers.conf"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-f", "-t", "0", "--all"]);
    }
}

/// Runs the plugin by hand, as a runtime would, in the host's namespace.
fn plugin(host_ns: &str, env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{host_ns}"))
        .arg(PLUGIN)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // A plugin may refuse its environment before it reads the config, as
    // the spec allows; runtimes then see a closed pipe, and so may we.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (out.status.success(), value)
}

fn netconf(socket: &Path, prev: Option<Value>) -> String {
    let mut conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "meshnet",
        "type": "meshnet-cni",
        "control_socket": socket,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev;
    }
    conf.to_string()
}

#[test]
fn podman_runs_a_container_on_the_mesh_through_meshnet_cni() {
    let mut bed = tap_mesh("cni");
    let far = bed.add_container_ns(1, "db").unwrap();
    let far_address = bed.attach(1, &far, "db", &[]).unwrap();
    let (host_ns, socket) = (bed.hosts[0].ns.clone(), bed.hosts[0].socket.clone());
    let podman = Podman::new(&host_ns, &socket);
    let image_dir = podman.dir.path().join("image");
    podman.ok(&["build", "-q", "-t", IMAGE, image_dir.to_str().unwrap()]);
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "meshnet",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        IMAGE,
        "/bin/busybox",
        "sleep",
        "600",
    ]);

    let attached = bed.containers(0).unwrap();
    assert_eq!(attached.len(), 1, "{attached:?}");
    let web = &attached[0];
    assert_eq!(web.name, "web", "the name comes from K8S_POD_NAME");
    let inspected = podman.ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.SandboxKey}} {{.NetworkSettings.Networks.meshnet.IPAddress}} {{.NetworkSettings.Networks.meshnet.MacAddress}}",
        "web",
    ]);
    let fields: Vec<&str> = inspected.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{inspected}");
    let (netns, ip, mac) = (fields[0], fields[1], fields[2]);
    assert_eq!(web.netns, netns);
    assert_eq!(ip, web.address.to_string());
    assert_eq!(mac, web.mac.to_string());

    let ping = podman.run(&[
        "exec",
        "web",
        "/bin/busybox",
        "ping",
        "-c",
        "3",
        "-W",
        "2",
        &far_address.to_string(),
    ]);
    assert!(
        ping.status.success(),
        "ping across hosts failed:\n{}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        bed.log(0)
    );
    // podman writes the result's dns into the container's resolv.conf.
    let resolv = podman.ok(&["exec", "web", "/bin/busybox", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("search default.mesh.internal mesh.internal")
            && resolv.lines().find(|l| l.starts_with("nameserver"))
                == Some("nameserver 169.254.169.250"),
        "{resolv}"
    );
    let lookup = podman.ok(&[
        "exec",
        "web",
        "/bin/busybox",
        "nslookup",
        "db.default.mesh.internal",
    ]);
    assert!(lookup.contains(&far_address.to_string()), "{lookup}");

    // CHECK, as a runtime sends it: the ADD result as prevResult.
    let prev = serde_json::json!({
        "cniVersion": "1.0.0",
        "ips": [{ "address": format!("{ip}/16"), "interface": 0 }],
    });
    let env = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", "web"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    let (ok, out) = plugin(&host_ns, &env, &netconf(&socket, Some(prev)));
    assert!(ok, "CHECK failed: {out}");

    // DEL through podman, then again by hand: both succeed.
    podman.ok(&["rm", "-f", "-t", "0", "web"]);
    assert!(
        bed.containers(0).unwrap().is_empty(),
        "DEL left the container attached"
    );
    let del = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "web"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, out) = plugin(&host_ns, &del, &netconf(&socket, None));
    assert!(ok, "a second DEL failed: {out}");
    assert!(exec_in(&far, &["true"]).unwrap().status.success());
}

#[test]
fn bad_input_gets_the_spec_error_and_a_failing_exit() {
    let bed = tap_mesh("cnibad");
    let (host_ns, socket) = (bed.hosts[0].ns.clone(), bed.hosts[0].socket.clone());
    fn add(netns: Option<&str>) -> Vec<(&str, &str)> {
        let mut env = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x1"),
            ("CNI_IFNAME", "eth0"),
        ];
        if let Some(netns) = netns {
            env.push(("CNI_NETNS", netns));
        }
        env
    }
    let cases: [(Env, String, u64); 4] = [
        (add(None), netconf(&socket, None), 4),
        (add(Some("/run/netns/x")), "{not json".into(), 6),
        (vec![("CNI_COMMAND", "FROB")], netconf(&socket, None), 4),
        (add(Some("/etc/hostname")), netconf(&socket, None), 100),
    ];
    for (env, stdin, code) in cases {
        let (ok, out) = plugin(&host_ns, &env, &stdin);
        assert!(!ok, "accepted: {env:?}");
        assert_eq!(out["code"], code, "{env:?}: {out}");
        assert_eq!(out["cniVersion"], "1.0.0");
        assert!(out["msg"].as_str().is_some_and(|m| !m.is_empty()), "{out}");
    }
    assert!(bed.containers(0).unwrap().is_empty());
    let (ok, out) = plugin(&host_ns, &[("CNI_COMMAND", "VERSION")], "");
    assert!(ok);
    assert_eq!(out["supportedVersions"][0], "1.0.0");
}
