//! The sidecar image, built and run with podman as an operator would: the
//! Containerfile's runtime stage from binaries compiled here (no registry),
//! meshd in the container with a test namespace as its host network,
//! NET_ADMIN, NET_BIND_SERVICE and /dev/net/tun only, in TAP mode, peered
//! with a bare meshd on a second host; and the committed Pod manifest under
//! `podman kube play`.
//!
//! The image is built once per run and shared by the tests (`SharedImage`).
//! Everything a test creates (containers, pod, image, namespaces) is
//! removed on drop, also on failure. Needs root, podman, runc and catatonit (kube play's pause
//! image); fails, never skips, without them.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use meshnet::config::Mode;
use meshnet::core::{PeerState, PeerStatus};
use meshnet_testbed::{Binaries, MeshOptions, Testbed, exec_in, wait_until};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The committed Pod manifest and the names in it the test replaces.
const POD_MANIFEST: &str = include_str!("../deploy/kubernetes/meshd-pod.yaml");
const MANIFEST_IMAGE: &str = "localhost/meshnet:latest";
/// How long an agent in a container gets to answer its control socket.
const AGENT_START: Duration = Duration::from_secs(20);

/// podman with this test's engine settings: runc (crun refuses this
/// machine's hybrid cgroups) and explicit ulimits (no CAP_SYS_RESOURCE
/// here to raise them), for `run` and `kube play` alike.
struct Podman {
    conf: PathBuf,
    /// The shared image (see `SharedImage`), once acquired.
    image: String,
    containers: Vec<String>,
    /// Pods started with `kube play`, with the manifest that made them.
    pods: Vec<(String, PathBuf)>,
}

impl Podman {
    fn new(dir: &Path) -> Self {
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
             [engine]\nruntime = \"runc\"\n",
        )
        .unwrap();
        let mut podman = Self {
            conf,
            image: String::new(),
            containers: Vec::new(),
            pods: Vec::new(),
        };
        podman.image = SharedImage::acquire(&podman);
        podman
    }

    fn command(&self, netns: Option<&str>) -> Command {
        let mut cmd = match netns {
            // kube play cannot join a namespace by path ("pods presently do
            // not support network mode path"): run podman inside it, so the
            // pod's host network is that namespace.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("podman");
                c
            }
            None => Command::new("podman"),
        };
        cmd.env("CONTAINERS_CONF", &self.conf);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(None)
            .args(args)
            .output()
            .expect("podman (scripts/test.sh installs podman, runc and catatonit)")
    }

    /// Runs podman and returns its stdout; panics with its stderr.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds the runtime stage from this run's binaries: deploy/rootfs.sh
    /// makes the root file system, handed to the Containerfile as the
    /// `rootfs` build context in place of its builder stages.
    fn build(&self, image: &str) {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let made = Command::new(Path::new(REPO).join("deploy/rootfs.sh"))
            .arg(&rootfs)
            .args([MESHD, MESHCTL])
            .output()
            .unwrap();
        assert!(made.status.success(), "deploy/rootfs.sh: {made:?}");
        let context = dir.path().join("empty-context");
        std::fs::create_dir_all(&context).unwrap();
        let containerfile = Path::new(REPO).join("Containerfile");
        self.ok(&[
            "build",
            "--layers=false",
            "--build-context",
            &format!("rootfs={}", rootfs.display()),
            "-f",
            containerfile.to_str().unwrap(),
            "-t",
            image,
            context.to_str().unwrap(),
        ]);
    }

    fn exec(&self, container: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", container];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Waits until `meshctl status` inside the container answers; panics
    /// with the container's log when it does not, or the agent exits.
    fn wait_agent(&self, container: &str) {
        let mut exited = false;
        let up = wait_until(AGENT_START, || {
            if self
                .exec(container, &["meshctl", "status"])
                .status
                .success()
            {
                return true;
            }
            let state = self.run(&["inspect", "-f", "{{.State.Status}}", container]);
            exited = String::from_utf8_lossy(&state.stdout).trim() == "exited";
            exited
        });
        let logs = self.run(&["logs", "--tail", "20", container]);
        assert!(
            up && !exited,
            "meshd in {container} did not answer within {AGENT_START:?} (exited: {exited}):\n{}",
            String::from_utf8_lossy(&logs.stderr)
        );
    }

    /// The container's tunnels, as `meshctl peers --json` run inside it
    /// reports them.
    fn peers(&self, container: &str) -> Vec<PeerStatus> {
        let out = self.exec(container, &["meshctl", "peers", "--json"]);
        assert!(
            out.status.success(),
            "meshctl peers in {container}: {out:?}"
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn kube_play(&mut self, netns: &str, pod: &str, manifest: PathBuf) {
        let out = self
            .command(Some(netns))
            .args(["kube", "play"])
            .arg(&manifest)
            .output()
            .expect("nsenter and podman");
        self.pods.push((pod.to_owned(), manifest));
        assert!(out.status.success(), "kube play: {out:?}");
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for (pod, manifest) in &self.pods {
            let down = self.run(&["kube", "down", manifest.to_str().unwrap_or_default()]);
            if !down.status.success() {
                let _ = self.run(&["pod", "rm", "-f", pod]);
            }
        }
        for container in &self.containers {
            let _ = self.run(&["rm", "-f", "-t", "2", container]);
        }
        SharedImage::release(self);
    }
}

/// One image build per test run: the first test to ask builds it, the last
/// one to finish removes it.
struct SharedImage {
    name: Option<String>,
    users: usize,
}

static SHARED_IMAGE: Mutex<SharedImage> = Mutex::new(SharedImage {
    name: None,
    users: 0,
});

impl SharedImage {
    fn acquire(podman: &Podman) -> String {
        let mut shared = SHARED_IMAGE.lock().unwrap_or_else(PoisonError::into_inner);
        let name = match &shared.name {
            Some(name) => name.clone(),
            None => {
                let name = format!("localhost/{}:latest", podman_name("image"));
                podman.build(&name);
                shared.name = Some(name.clone());
                name
            }
        };
        shared.users += 1;
        name
    }

    fn release(podman: &Podman) {
        let mut shared = SHARED_IMAGE.lock().unwrap_or_else(PoisonError::into_inner);
        if podman.image.is_empty() {
            return;
        }
        shared.users = shared.users.saturating_sub(1);
        if shared.users == 0
            && let Some(name) = shared.name.take()
        {
            let _ = podman.run(&["rmi", "-f", &name]);
        }
    }
}

/// A name for a podman object, unique on this machine (the testbed's
/// `unique_name` is cut to fit an interface name, too short here).
fn podman_name(what: &str) -> String {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    format!("meshnet-test-{what}-{}-{n}", std::process::id())
}

/// A host's config, key and state for an agent in a container: meshd's
/// default state dir and control socket (inside the container), the key
/// next to the config. `run` is the host side of /run/meshnet.
struct Mounts {
    etc: PathBuf,
    state: PathBuf,
    run: PathBuf,
}

fn container_mounts(bed: &Testbed, i: usize) -> Mounts {
    let host = &bed.hosts[i];
    let base = bed.dir().join(format!("{}-container", host.name));
    let mounts = Mounts {
        etc: base.join("etc"),
        state: base.join("state"),
        run: base.join("run"),
    };
    for dir in [&mounts.etc, &mounts.state, &mounts.run] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let config: String = std::fs::read_to_string(&host.config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("control_socket") && !l.starts_with("state_dir"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace(
            &format!("private_key_file = \"{}.key\"", host.name),
            "private_key_file = \"private.key\"",
        );
    assert!(config.contains("private.key") && config.contains("mode = \"tap\""));
    std::fs::write(mounts.etc.join("meshd.toml"), config).unwrap();
    let key = mounts.etc.join("private.key");
    std::fs::write(&key, host.key.to_base64()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    mounts
}

/// `podman run` of the image as the sidecar on host `i`: the host's
/// network, the agent's only privileges, config read-only.
fn run_sidecar(podman: &mut Podman, bed: &Testbed, i: usize, mounts: &Mounts) -> String {
    let name = podman_name("sidecar");
    let netns = format!("ns:/run/netns/{}", bed.hosts[i].ns);
    let volume = |from: &Path, to: &str| format!("{}:{to}", from.display());
    podman.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &netns,
        "--cap-drop",
        "all",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_BIND_SERVICE",
        "--device",
        "/dev/net/tun",
        "--security-opt",
        "no-new-privileges",
        "--read-only",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        "-v",
        &volume(&mounts.etc, "/etc/meshnet:ro"),
        "-v",
        &volume(&mounts.state, "/var/lib/meshnet"),
        "-v",
        &volume(&mounts.run, "/run/meshnet"),
        "-v",
        "/run/netns:/run/netns:rslave",
        &podman.image,
    ]);
    podman.containers.push(name.clone());
    name
}

/// The committed Pod manifest with this run's image, pod name and host
/// paths, and a ConfigMap holding `mounts`' config (the key read from the
/// manifest's hostPath for keys).
fn pod_manifest(image: &str, pod: &str, mounts: &Mounts) -> String {
    let (_, pod_doc) = POD_MANIFEST
        .split_once("\n---\n")
        .expect("the manifest is a ConfigMap, then the Pod");
    let config = std::fs::read_to_string(mounts.etc.join("meshd.toml"))
        .unwrap()
        .replace("\"private.key\"", "\"/etc/meshnet-keys/private.key\"");
    let mut manifest = String::from(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: meshd-config\ndata:\n  meshd.toml: |\n",
    );
    for line in config.lines() {
        manifest.push_str(&format!("    {line}\n"));
    }
    manifest.push_str("---\n");
    let path = |p: &Path| format!(" path: {}\n", p.display());
    let replacements = [
        (MANIFEST_IMAGE.to_owned(), image.to_owned()),
        ("  name: meshd\n".to_owned(), format!("  name: {pod}\n")),
        (" path: /etc/meshnet/keys\n".to_owned(), path(&mounts.etc)),
        (" path: /var/lib/meshnet\n".to_owned(), path(&mounts.state)),
        (" path: /run/meshnet\n".to_owned(), path(&mounts.run)),
    ];
    let mut doc = pod_doc.to_owned();
    for (from, to) in replacements {
        assert!(
            doc.contains(&from),
            "the Pod manifest no longer has {from:?}"
        );
        doc = doc.replacen(&from, &to, 1);
    }
    manifest.push_str(&doc);
    manifest
}

fn ping(ns: &str, to: Ipv4Addr) -> bool {
    let to = to.to_string();
    exec_in(ns, &["ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", &to])
        .is_ok_and(|o| o.status.success())
}

fn peer_up(peers: &[PeerStatus], name: &str) -> bool {
    peers
        .iter()
        .any(|p| p.name == name && p.state == PeerState::Up)
}

fn tap_testbed(tag: &str) -> Testbed {
    let options = MeshOptions {
        hosts: 2,
        keepalive: Some(1),
        mode: Mode::Tap,
    };
    let bins = Binaries {
        meshd: MESHD.into(),
        meshctl: MESHCTL.into(),
    };
    Testbed::new(tag, &options, bins).expect("building the testbed")
}

/// Waits until the agent in `container` reports the tunnel to `peer` up,
/// through `meshctl peers` run inside the image.
fn wait_peer_up(podman: &Podman, container: &str, peer: &str, bed: &Testbed) {
    assert!(
        wait_until(Duration::from_secs(15), || peer_up(
            &podman.peers(container),
            peer
        )),
        "meshctl peers in {container} never showed {peer} up: {:?}\n{peer}'s log:\n{}",
        podman.peers(container),
        bed.log(1)
    );
}

/// The image as the sidecar on host 1 (`podman run`, TAP mode), a bare
/// meshd on host 2: the tunnel comes up, `meshctl` inside the image sees
/// it, and containers attached on both hosts reach each other.
#[test]
fn sidecar_image_serves_containers() {
    let mut bed = tap_testbed("img");
    let mut podman = Podman::new(bed.dir());
    let mounts = container_mounts(&bed, 0);
    let sidecar = run_sidecar(&mut podman, &bed, 0, &mounts);
    podman.wait_agent(&sidecar);
    bed.hosts[0].socket = mounts.run.join("mesh0.sock");
    bed.start(1).unwrap();
    let peer = bed.hosts[1].name.clone();
    wait_peer_up(&podman, &sidecar, &peer, &bed);
    // Host to host across the tunnel: the agent in the image carries it.
    assert!(
        ping(&bed.hosts[1].ns, bed.hosts[0].overlay),
        "host 2 cannot reach host 1's overlay address"
    );

    // A container on each host, attached through each agent's socket (the
    // image's through the /run/meshnet volume), reach each other.
    let c1 = bed.add_container_ns(0, "c1").unwrap();
    let c2 = bed.add_container_ns(1, "c2").unwrap();
    let a1 = bed
        .attach(0, &c1, "c1", &[])
        .expect("attach through the agent in the image");
    let a2 = bed.attach(1, &c2, "c2", &[]).unwrap();
    assert!(ping(&c1, a2), "{c1} ({a1}) cannot reach {a2}");
    assert!(ping(&c2, a1), "{c2} ({a2}) cannot reach {a1}");
}

/// The committed Pod manifest under `podman kube play` on host 1, with the
/// host's config in its ConfigMap: the agent comes up, `meshctl status`
/// answers inside the pod, the tunnel to host 2 comes up.
#[test]
fn kube_play_runs_the_pod_manifest() {
    let mut bed = tap_testbed("kube");
    let mut podman = Podman::new(bed.dir());
    let mounts = container_mounts(&bed, 0);
    let pod = podman_name("pod");
    let manifest = bed.dir().join("meshd-pod.yaml");
    std::fs::write(&manifest, pod_manifest(&podman.image, &pod, &mounts)).unwrap();
    podman.kube_play(&bed.hosts[0].ns, &pod, manifest);
    let in_pod = format!("{pod}-meshd");
    podman.wait_agent(&in_pod);
    let status = podman.exec(&in_pod, &["meshctl", "status"]);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && said.contains(&bed.hosts[0].name),
        "meshctl status in the pod: {status:?}"
    );
    bed.start(1).unwrap();
    let peer = bed.hosts[1].name.clone();
    wait_peer_up(&podman, &in_pod, &peer, &bed);
}
