//! Real multi-host meshes in network namespaces, for tests, the demo and
//! benchmarks.
//!
//! A testbed is one namespace holding a bridge (the underlay switch) and one
//! namespace per host, joined by veth pairs created directly inside those
//! namespaces, so nothing is added to the root namespace. Underlay addresses
//! come from 192.0.2.0/24 (TEST-NET-1) and exist only inside the testbed.
//! Every namespace, process and file it makes is removed on drop, also when
//! a test panics; namespaces left by a killed test process are swept when
//! the next testbed starts.
//! Must never: touch an interface, route or address of the root namespace,
//! or send traffic anywhere but its own namespaces.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

pub mod clock;
pub mod dns;
pub mod etcd;
pub mod fleet;
pub mod flood;
pub mod measure;
pub mod relay;

use meshnet::config::Mode;
use meshnet::control::{self, Request, Response};
use meshnet::core::{PeerState, PeerStatus};
use meshnet::keys::PrivateKey;

/// Every testbed namespace starts with this, then the owning pid.
const NS_PREFIX: &str = "mn-";
/// Longest wait for an agent to answer after it starts. A guard against a
/// hung agent, not a performance bound: fifty agents starting at once on
/// two busy cores were seen to take over 10 s.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the meshd and meshctl binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub meshd: PathBuf,
    pub meshctl: PathBuf,
}

impl Binaries {
    /// The binaries in the target directory the running executable was
    /// built into (for examples and benches, which live one level deeper).
    pub fn beside_current_exe() -> Result<Self> {
        let exe = std::env::current_exe()?;
        for dir in exe.ancestors().skip(1).take(3) {
            let meshd = dir.join("meshd");
            let meshctl = dir.join("meshctl");
            if meshd.is_file() && meshctl.is_file() {
                return Ok(Self { meshd, meshctl });
            }
        }
        bail!(
            "meshd and meshctl not found near {}: run `cargo build --release` first",
            exe.display()
        )
    }
}

/// Options for building a mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub hosts: usize,
    /// Persistent keepalive for every peer; also what makes a dead peer
    /// show as down within 2 x keepalive + 5 s.
    pub keepalive: Option<u16>,
    pub mode: Mode,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            hosts: 3,
            keepalive: Some(1),
            mode: Mode::Tun,
        }
    }
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub underlay: Ipv4Addr,
    pub overlay: Ipv4Addr,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub key: PrivateKey,
    agent: Option<Child>,
}

/// A running set of namespaces; see the module docs.
pub struct Testbed {
    pub bridge_ns: String,
    base: String,
    pub hosts: Vec<Host>,
    pub bins: Binaries,
    dir: tempfile::TempDir,
    namespaces: Vec<String>,
}

impl Testbed {
    /// Builds the namespaces, underlay, keys and configs for a full mesh;
    /// agents are not started. `tag` names the testbed in namespace names
    /// (short: it is for humans reading `ip netns`).
    pub fn new(tag: &str, options: &MeshOptions, bins: Binaries) -> Result<Self> {
        preflight()?;
        sweep_dead_testbeds();
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let base = format!(
            "{NS_PREFIX}{}-{}-{tag}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("meshnet-testbed-")
            .tempdir()?;
        let mut bed = Self {
            bridge_ns: format!("{base}-sw"),
            base: base.clone(),
            hosts: Vec::new(),
            bins,
            dir,
            namespaces: Vec::new(),
        };
        bed.add_namespace(&bed.bridge_ns.clone())?;
        ip(&["-n", &bed.bridge_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bed.bridge_ns, "link", "set", "br0", "up"])?;
        for i in 1..=options.hosts {
            bed.add_host(&base, i)?;
        }
        bed.write_configs(options)?;
        Ok(bed)
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    fn add_host(&mut self, base: &str, i: usize) -> Result<()> {
        ensure!(i < 250, "at most 249 hosts");
        let name = format!("h{i}");
        let ns = format!("{base}-{name}");
        self.add_namespace(&ns)?;
        let port = format!("p{i}");
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        let underlay = Ipv4Addr::new(192, 0, 2, i as u8);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{underlay}/24"),
            "dev",
            "ul0",
        ])?;
        ip(&["-n", &ns, "link", "set", "ul0", "up"])?;
        let key = PrivateKey::generate()?;
        let key_path = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&key_path, key.to_base64())?;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
        self.hosts.push(Host {
            overlay: Ipv4Addr::new(10, 42, i as u8, 1),
            config: self.dir.path().join(format!("{name}.toml")),
            socket: self.dir.path().join(format!("{name}.sock")),
            log: self.dir.path().join(format!("{name}.log")),
            name,
            ns,
            underlay,
            key,
            agent: None,
        });
        Ok(())
    }

    fn write_configs(&self, options: &MeshOptions) -> Result<()> {
        for (i, host) in self.hosts.iter().enumerate() {
            let mut text = format!(
                "name = \"{}\"\nprivate_key_file = \"{}.key\"\nlisten = \"0.0.0.0:51820\"\n\
                 subnet = \"10.42.{}.0/24\"\ncontrol_socket = \"{}\"\n",
                host.name,
                host.name,
                i + 1,
                host.socket.display()
            );
            if options.mode == Mode::Tap {
                let state = self.dir.path().join(format!("{}-state", host.name));
                text.push_str(&format!(
                    "mode = \"tap\"\nstate_dir = \"{}\"\n",
                    state.display()
                ));
            }
            for (j, peer) in self.hosts.iter().enumerate().filter(|(j, _)| *j != i) {
                text.push_str(&format!(
                    "\n[[peer]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}:51820\"\nsubnet = \"10.42.{}.0/24\"\n",
                    peer.name,
                    peer.key.public_key(),
                    peer.underlay,
                    j + 1
                ));
                if let Some(k) = options.keepalive {
                    text.push_str(&format!("keepalive = {k}\n"));
                }
            }
            std::fs::write(&host.config, text)?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Makes host `i`'s underlay link cut UDP GSO batches into their
    /// datagrams before they leave it, as a real NIC does on the wire. A
    /// veth otherwise carries a GSO batch whole to the receiver, and a
    /// capture on the way sees one oversized datagram instead of several.
    pub fn segment_on_the_wire(&self, i: usize) -> Result<()> {
        ip(&[
            "-n",
            &self.hosts[i].ns,
            "link",
            "set",
            "ul0",
            "gso_max_segs",
            "1",
        ])
    }

    /// Adds a top-level key (`offload = false`) to every host's config;
    /// takes effect for agents started afterwards.
    pub fn set_config_key(&self, line: &str) -> Result<()> {
        for host in &self.hosts {
            let text = std::fs::read_to_string(&host.config)?;
            // Top-level keys must come before the first [[peer]] table.
            std::fs::write(&host.config, format!("{line}\n{text}"))?;
        }
        Ok(())
    }

    /// Sends `len` bytes of a fixed pattern over TCP (socat) from host
    /// `from` to `to_addr`, port 5001, in host `to`'s namespace, and fails
    /// unless they arrive complete and intact within 30 s.
    pub fn transfer(&self, from: usize, to: usize, to_addr: Ipv4Addr, len: usize) -> Result<()> {
        let data: Vec<u8> = (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let sent = self.dir().join(format!("sent-{from}-{to}"));
        let received = self.dir().join(format!("received-{from}-{to}"));
        std::fs::write(&sent, &data)?;
        let listen = format!("OPEN:{},creat,trunc", received.display());
        let mut server = Command::new("ip")
            .args(["netns", "exec", &self.hosts[to].ns])
            .args([
                "timeout",
                "30",
                "socat",
                "-u",
                "TCP-LISTEN:5001,reuseaddr",
                &listen,
            ])
            .spawn()
            .context("starting socat (apt-get install socat)")?;
        std::thread::sleep(Duration::from_millis(300));
        let source = format!("OPEN:{}", sent.display());
        let target = format!("TCP:{to_addr}:5001");
        let client = exec_in(
            &self.hosts[from].ns,
            &["timeout", "30", "socat", "-u", &source, &target],
        );
        let done = wait_until(Duration::from_secs(30), || {
            server.try_wait().ok().flatten().is_some()
        });
        if !done {
            let _ = server.kill();
            let _ = server.wait();
        }
        let client = client?;
        ensure!(
            client.status.success() && done,
            "transfer failed: {client:?}"
        );
        let got = std::fs::read(&received)?;
        ensure!(
            got.len() == data.len(),
            "transfer truncated: {} of {len} bytes",
            got.len()
        );
        ensure!(got == data, "transfer corrupted");
        Ok(())
    }

    /// Starts every host's agent and waits until each answers.
    pub fn start_all(&mut self) -> Result<()> {
        self.start_all_with_env(&[])
    }

    /// `start_all` with extra environment variables for every agent.
    pub fn start_all_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        for i in 0..self.hosts.len() {
            self.spawn_agent(i, env)?;
            self.wait_answering(i)?;
        }
        Ok(())
    }

    /// Starts host `i`'s agent (log appended to its log file) and waits
    /// until its control socket answers.
    pub fn start(&mut self, i: usize) -> Result<()> {
        self.spawn_agent(i, &[])?;
        self.wait_answering(i)
    }

    /// Spawns host `i`'s agent with extra environment variables, without
    /// waiting for it (see `wait_answering`).
    fn spawn_agent(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let host = &mut self.hosts[i];
        ensure!(host.agent.is_none(), "{} already runs an agent", host.name);
        let log = File::options().create(true).append(true).open(&host.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(&self.bins.meshd)
            .arg("--config")
            .arg(&host.config)
            .env(
                "RUST_LOG",
                std::env::var("MESHNET_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting meshd")?;
        host.agent = Some(child);
        Ok(())
    }

    /// Waits until host `i`'s spawned agent answers on its control socket.
    fn wait_answering(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if control::request(&self.hosts[i].socket, &Request::Status).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.hosts[i]
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.hosts[i].agent = None;
                bail!(
                    "meshd on {} exited with {status}:\n{}",
                    self.hosts[i].name,
                    self.log(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "meshd on {} did not answer within {AGENT_START_TIMEOUT:?}:\n{}",
                    self.hosts[i].name,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops host `i`'s agent with SIGTERM and returns its exit status.
    pub fn stop(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let mut child = self.hosts[i].agent.take().context("no agent running")?;
        signal(child.id(), "TERM")?;
        wait_bounded(&mut child, Duration::from_secs(10))
    }

    /// Kills host `i`'s agent with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let mut child = self.hosts[i].agent.take().context("no agent running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Whether host `i`'s agent has exited by itself (reaps it if so).
    pub fn agent_exited(&mut self, i: usize) -> bool {
        let exited = self.hosts[i]
            .agent
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if exited {
            self.hosts[i].agent = None;
        }
        exited
    }

    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.hosts[i].agent.as_ref().map(Child::id)
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }

    /// Runs a command inside host `i`'s namespace.
    pub fn exec(&self, i: usize, args: &[&str]) -> Result<Output> {
        exec_in(&self.hosts[i].ns, args)
    }

    /// Sends `count` pings from host `i`; true when all were answered.
    pub fn ping(&self, i: usize, to: Ipv4Addr, count: u32) -> Result<bool> {
        Ok(ping_in(&self.hosts[i].ns, to, count)?.status.success())
    }

    /// Runs `meshctl` against host `i`'s agent.
    pub fn meshctl(&self, i: usize, args: &[&str]) -> Result<Output> {
        Command::new(&self.bins.meshctl)
            .arg("--socket")
            .arg(&self.hosts[i].socket)
            .args(args)
            .output()
            .context("running meshctl")
    }

    /// Host `i`'s peers, through `meshctl peers --json`.
    pub fn peers(&self, i: usize) -> Result<Vec<PeerStatus>> {
        let out = self.meshctl(i, &["peers", "--json"])?;
        ensure!(
            out.status.success(),
            "meshctl peers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until every running agent reports every tunnel up; fails after
    /// `timeout` with the first host's log.
    pub fn wait_all_up(&self, timeout: Duration) -> Result<()> {
        let hosts: Vec<usize> = (0..self.hosts.len())
            .filter(|i| self.agent_pid(*i).is_some())
            .collect();
        let up = wait_until(timeout, || {
            hosts.iter().all(|i| {
                self.peers(*i)
                    .is_ok_and(|p| p.iter().all(|p| p.state == PeerState::Up))
            })
        });
        ensure!(up, "the mesh did not come up:\n{}", self.log(0));
        Ok(())
    }

    /// How many packets host `i`'s agent dropped for `reason` (as
    /// `meshctl status` names it; 0 when it never did).
    pub fn dropped(&self, i: usize, reason: &str) -> Result<u64> {
        Ok(self.status(i)?.dropped.get(reason).copied().unwrap_or(0))
    }

    /// Host `i`'s agent MAC (TAP mode), through its status.
    pub fn agent_mac(&self, i: usize) -> Result<meshnet::core::ethernet::Mac> {
        self.status(i)?
            .agent_mac
            .context("the agent reports no MAC: is it in TAP mode?")
    }

    /// Host `i`'s status, through the control socket.
    pub fn status(&self, i: usize) -> Result<control::HostStatus> {
        match control::request(&self.hosts[i].socket, &Request::Status)? {
            Response::Status(s) => Ok(s),
            other => bail!("unexpected response {other:?}"),
        }
    }

    /// Inserts top-level keys at the start of host `i`'s config.
    pub fn prepend_config(&self, i: usize, text: &str) -> Result<()> {
        let path = &self.hosts[i].config;
        let old = std::fs::read_to_string(path)?;
        std::fs::write(path, format!("{text}\n{old}"))?;
        Ok(())
    }

    /// Appends lines to host `i`'s config: inside its last `[[peer]]`.
    pub fn append_config(&self, i: usize, text: &str) -> Result<()> {
        let path = &self.hosts[i].config;
        let old = std::fs::read_to_string(path)?;
        std::fs::write(path, format!("{old}{text}\n"))?;
        Ok(())
    }

    /// Writes a secret file (mode 0600) in the testbed directory.
    pub fn write_secret(&self, name: &str, base64: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, base64)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// Creates a network namespace standing for a container on host `i`
    /// (removed with the testbed) and returns its name.
    pub fn add_container_ns(&mut self, i: usize, name: &str) -> Result<String> {
        let ns = format!("{}-{}-{name}", self.base, self.hosts[i].name);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }

    /// `meshctl attach` on host `i`; returns the address it printed.
    pub fn attach(&self, i: usize, netns: &str, name: &str, extra: &[&str]) -> Result<Ipv4Addr> {
        let mut args = vec!["attach", "--netns", netns, "--name", name];
        args.extend_from_slice(extra);
        let out = self.meshctl(i, &args)?;
        ensure!(
            out.status.success(),
            "attach failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// The DNS records host `i` serves, through the control socket.
    pub fn records(&self, i: usize) -> Result<Vec<meshnet::dns::RecordView>> {
        match control::request(&self.hosts[i].socket, &Request::Dns)? {
            Response::Records(r) => Ok(r),
            other => bail!("unexpected response {other:?}"),
        }
    }

    /// The peak resident memory of host `i`'s agent, in KiB (VmHWM).
    pub fn agent_peak_rss_kib(&self, i: usize) -> Result<u64> {
        let pid = self.agent_pid(i).context("agent not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")
    }

    /// Rewrites host `i`'s config without its `[[peer]]` named `peer`.
    pub fn remove_peer_from_config(&self, i: usize, peer: &str) -> Result<()> {
        let path = &self.hosts[i].config;
        let old = std::fs::read_to_string(path)?;
        let mut sections: Vec<String> = old.split("\n[[peer]]\n").map(str::to_owned).collect();
        let before = sections.len();
        sections.retain(|s| !s.starts_with(&format!("name = \"{peer}\"\n")));
        ensure!(
            sections.len() + 1 == before,
            "no [[peer]] {peer} in {}",
            path.display()
        );
        std::fs::write(path, sections.join("\n[[peer]]\n"))?;
        Ok(())
    }

    /// Sends SIGHUP to host `i`'s agent (reload its config).
    pub fn reload(&self, i: usize) -> Result<()> {
        let pid = self.agent_pid(i).context("agent not running")?;
        signal(pid, "HUP")
    }

    /// Host `i`'s containers, through `meshctl containers --json`.
    pub fn containers(&self, i: usize) -> Result<Vec<meshnet::core::ipam::Container>> {
        let out = self.meshctl(i, &["containers", "--json"])?;
        ensure!(
            out.status.success(),
            "meshctl containers failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Starts a packet capture on `iface` in namespace `ns`.
    pub fn capture(&self, ns: &str, iface: &str, filter: &str) -> Result<Capture> {
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let file = self.dir.path().join(format!(
            "capture-{}.pcap",
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        Capture::start(ns, iface, filter, file)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // SIGTERM first, so agents remove what they made outside the
        // namespaces (UAPI sockets); SIGKILL whatever does not stop.
        for host in &mut self.hosts {
            if let Some(child) = host.agent.as_ref() {
                let _ = signal(child.id(), "TERM");
            }
        }
        for host in &mut self.hosts {
            if let Some(mut child) = host.agent.take() {
                let _ = wait_bounded(&mut child, Duration::from_secs(3));
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            // Per-namespace files (a container's resolv.conf) outlive it.
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// A peer installed with `cargo install`: on PATH or in cargo's bin.
pub fn cargo_binary(name: &str) -> Option<PathBuf> {
    let from_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&from_path.stdout).trim().to_owned();
    if !path.is_empty() {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin").join(name)).filter(|p| p.is_file())
}

/// A wireguard-go interface in a namespace, configured with `wg` and `ip`;
/// stopped, with its UAPI socket removed, on drop.
pub struct WireguardGo {
    pub name: String,
    child: Option<Child>,
}

impl WireguardGo {
    /// Starts `wireguard-go -f NAME` in `ns` (NAME at most 15 bytes and
    /// unique on the machine: the UAPI socket directory is shared).
    pub fn start(ns: &str, name: &str) -> Result<Self> {
        Self::start_program(ns, name, &["wireguard-go", "-f"])
    }

    /// Starts one of the Rust peers installed with `cargo install`
    /// (`gotatun`, `boringtun-cli`; `scripts/peers.sh` installs both), in
    /// the foreground and as root; an error names the install command when
    /// it is missing.
    pub fn start_rust_peer(ns: &str, name: &str, binary: &str) -> Result<Self> {
        let path = cargo_binary(binary).with_context(|| {
            format!("{binary} is not installed: run scripts/peers.sh (cargo install)")
        })?;
        let path = path.display().to_string();
        Self::start_program(ns, name, &[&path, "-f", "--disable-drop-privileges"])
    }

    /// Starts another userspace WireGuard speaking the same UAPI, e.g.
    /// `["boringtun-cli", "-f", "--disable-drop-privileges"]`; the interface
    /// name is appended.
    pub fn start_program(ns: &str, name: &str, program: &[&str]) -> Result<Self> {
        let socket = Path::new("/var/run/wireguard").join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(program)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program:?} (is it installed?)"))?;
        let wg = Self {
            name: name.to_owned(),
            child: Some(child),
        };
        ensure!(
            wait_until(Duration::from_secs(5), || socket.exists()),
            "wireguard-go did not create {}",
            socket.display()
        );
        Ok(wg)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Configures this interface as host `i` of `bed`, the way meshd would
    /// be configured there: host `i`'s key and address (its subnet's first,
    /// with the overlay prefix), MTU 1420, and host `peer` as its one peer
    /// (allowed IPs: that host's subnet; its endpoint only when `endpoint`;
    /// a preshared key file when given).
    pub fn configure(
        &self,
        bed: &Testbed,
        i: usize,
        peer: usize,
        endpoint: bool,
        psk: Option<&Path>,
    ) -> Result<()> {
        let ns = &bed.hosts[i].ns;
        let key = bed.write_secret(&format!("{}.key", self.name), &bed.hosts[i].key.to_base64())?;
        let key = key.display().to_string();
        let peer_key = bed.hosts[peer].key.public_key().to_string();
        let allowed = format!("10.42.{}.0/24", peer + 1);
        let peer_endpoint = format!("{}:51820", bed.hosts[peer].underlay);
        let psk = psk.map(|p| p.display().to_string());
        let mut args = vec![
            "set",
            &self.name,
            "listen-port",
            "51820",
            "private-key",
            &key,
        ];
        args.extend(["peer", &peer_key, "allowed-ips", &allowed]);
        if endpoint {
            args.extend(["endpoint", &peer_endpoint]);
        }
        if let Some(psk) = &psk {
            args.extend(["preshared-key", psk]);
        }
        self.wg(ns, &args)?;
        let address = format!("{}/16", bed.hosts[i].overlay);
        for cmd in [
            vec!["ip", "addr", "add", &address, "dev", &self.name],
            vec!["ip", "link", "set", &self.name, "up", "mtu", "1420"],
        ] {
            let out = exec_in(ns, &cmd)?;
            ensure!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `wg ARGS` against this interface from `ns`.
    pub fn wg(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["wg"];
        full.extend_from_slice(args);
        let out = exec_in(ns, &full)?;
        ensure!(
            out.status.success(),
            "wg {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(
            Path::new("/var/run/wireguard").join(format!("{}.sock", self.name)),
        );
    }
}

/// A name no other test process uses at the same time (for interfaces
/// whose UAPI sockets share one directory): `prefix` plus pid and serial,
/// at most 15 bytes.
pub fn unique_name(prefix: &str) -> String {
    static SERIAL: AtomicUsize = AtomicUsize::new(0);
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("{prefix}{:x}{n:x}", std::process::id() % 0x10000);
    name.truncate(15);
    name
}

/// A running tcpdump writing to a pcap file; stopped on drop.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, iface: &str, filter: &str, file: PathBuf) -> Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "tcpdump",
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
                "-i",
                iface,
                "-w",
            ])
            .arg(&file)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (apt-get install tcpdump)")?;
        // tcpdump says "listening on" once the capture is live.
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let mut capture = Self {
            child: Some(child),
            file,
        };
        if rx.recv_timeout(Duration::from_secs(5)).is_err() {
            capture.stop()?;
            bail!("tcpdump did not start capturing on {iface} in {ns}");
        }
        Ok(capture)
    }

    /// Stops the capture and returns the raw pcap bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.stop()?;
        Ok(std::fs::read(&self.file)?)
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "INT")?;
            wait_bounded(&mut child, Duration::from_secs(5))?;
        }
        Ok(())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Counts the packets in a pcap file (classic format, as tcpdump writes).
pub fn pcap_packet_count(pcap: &[u8]) -> usize {
    pcap_packets(pcap).len()
}

/// The captured bytes of every packet in a pcap file (classic format,
/// little-endian, as tcpdump writes on this machine).
pub fn pcap_packets(pcap: &[u8]) -> Vec<&[u8]> {
    const GLOBAL_HEADER: usize = 24;
    const RECORD_HEADER: usize = 16;
    let mut offset = GLOBAL_HEADER;
    let mut packets = Vec::new();
    while let Some(header) = pcap.get(offset..offset + RECORD_HEADER) {
        let captured = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let start = offset + RECORD_HEADER;
        let Some(packet) = pcap.get(start..start + captured) else {
            break;
        };
        packets.push(packet);
        offset = start + captured;
    }
    packets
}

/// tcpdump's one-line decoding of every packet in a pcap, for messages.
pub fn pcap_summary(pcap: &[u8]) -> String {
    let Ok(mut child) = Command::new("tcpdump")
        .args(["-n", "-r", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return "(tcpdump unavailable)".into();
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(pcap);
    }
    child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The MAC namespace `ns` has in its neighbour table for `addr`, if any.
pub fn neighbour_mac(ns: &str, addr: Ipv4Addr) -> Option<meshnet::core::ethernet::Mac> {
    let out = exec_in(ns, &["ip", "neigh", "show", &addr.to_string()]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next()?.parse().ok()
}

/// Runs `f` inside network namespace `ns`, on a thread of its own (a
/// namespace switch holds for the calling thread only), and returns what
/// it returned. Sockets `f` opens live in `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    spawn_in_netns(ns, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))?
}

/// Like `in_netns`, but returns the thread's handle at once.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    use std::os::fd::AsFd;
    let path = Path::new("/run/netns").join(ns);
    let handle = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(
            handle.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .context("setns")?;
        f()
    }))
}

/// `count` quiet pings from namespace `ns` to `to`, 0.2 s apart, each
/// waited for at most a second.
pub fn ping_in(ns: &str, to: Ipv4Addr, count: u32) -> Result<Output> {
    let (count, to) = (count.to_string(), to.to_string());
    exec_in(
        ns,
        &["ping", "-c", &count, "-i", "0.2", "-W", "1", "-q", &to],
    )
}

pub fn exec_in(ns: &str, args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} in {ns}"))
}

/// Fails loudly (never skips) when the testbed cannot work here.
fn preflight() -> Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id")?;
    ensure!(
        String::from_utf8_lossy(&uid.stdout).trim() == "0",
        "the namespace tests need root (they create network namespaces): run them as root, \
         e.g. through scripts/test.sh"
    );
    for tool in ["ip", "ping", "tcpdump"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?;
        ensure!(
            found.status.success(),
            "{tool} is missing: run scripts/test.sh, which installs iproute2, iputils-ping and tcpdump"
        );
    }
    Ok(())
}

/// Deletes testbed namespaces whose owning process is gone (a test that
/// was killed before its guards could run).
fn sweep_dead_testbeds() {
    let dead = |name: &str| {
        name.strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .is_some_and(|pid| pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists())
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if dead(name) {
                // Agents and tools a killed test left running would
                // outlive the namespace's name (and keep it alive).
                if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
                    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-KILL", pid]).status();
                    }
                }
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_str().is_some_and(dead) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (apt-get install iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Sends signal `name` ("TERM", "STOP", ...) to process `pid` with kill(1).
pub fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "process {} did not exit within {timeout:?}; killed",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where tests have meshd serve metrics, on each namespace's loopback.
pub const METRICS_LISTEN: &str = "127.0.0.1:9586";

impl Testbed {
    /// `GET path` from `METRICS_LISTEN` inside host `i`'s namespace: the
    /// status line and the body.
    pub fn http_get(&self, i: usize, path: &str) -> Result<(String, String)> {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {METRICS_LISTEN}\r\nConnection: close\r\n\r\n");
        let reply = in_netns(&self.hosts[i].ns, move || {
            use std::io::Read;
            let mut stream = std::net::TcpStream::connect(METRICS_LISTEN)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        })?;
        let (head, body) = reply.split_once("\r\n\r\n").context("not an HTTP reply")?;
        Ok((
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        ))
    }
}

/// `promtool check metrics` on an exposition (Debian's prometheus package).
pub fn promtool_check(text: &str) -> Result<Output> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool missing: scripts/test.sh installs the prometheus package")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// Fails loudly, naming the tool and how to get it, when a tool a test
/// needs is not on PATH (tests never skip).
pub fn require_tools(tools: &[&str], hint: &str) {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing: {hint}");
    }
}

/// The meshd and meshctl of the build running the calling test: cargo
/// names them to integration tests and benches only, so this expands in the
/// caller.
#[macro_export]
macro_rules! this_build {
    () => {
        $crate::Binaries {
            meshd: env!("CARGO_BIN_EXE_meshd").into(),
            meshctl: env!("CARGO_BIN_EXE_meshctl").into(),
        }
    };
}
