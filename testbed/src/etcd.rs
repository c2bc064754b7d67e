//! A real single-node etcd (Debian's etcd-server) for tests and the
//! simulation: on loopback in the root namespace, or on a testbed
//! namespace's underlay address, with a temporary data dir.
//!
//! Stopped (SIGKILL) and its data dir removed on drop, also when a test
//! panics. Must never: listen on anything but loopback or an address
//! inside a namespace the caller created.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::Testbed;

/// etcd answers about a second after start; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Etcd {
    /// The namespace it runs in; `None`: the root namespace (loopback).
    ns: Option<String>,
    ip: Ipv4Addr,
    client_port: u16,
    peer_port: u16,
    data: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// On 127.0.0.1 in the root namespace, on free ports.
    pub fn on_loopback() -> Result<Self> {
        Self::start(None, Ipv4Addr::LOCALHOST, free_port()?, free_port()?)
    }

    /// On `ip` (an address of that namespace) inside namespace `ns`.
    pub fn in_namespace(ns: &str, ip: Ipv4Addr) -> Result<Self> {
        Self::start(Some(ns.to_owned()), ip, 2379, 2380)
    }

    fn start(ns: Option<String>, ip: Ipv4Addr, client_port: u16, peer_port: u16) -> Result<Self> {
        which("etcd")?;
        which("etcdctl")?;
        let data = tempfile::Builder::new().prefix("meshnet-etcd-").tempdir()?;
        let log = data.path().join("etcd.log");
        let mut etcd = Self {
            ns,
            ip,
            client_port,
            peer_port,
            log,
            data,
            child: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// The client URL, for `[store] endpoints`.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    /// (Re)starts the server on the same data dir and waits until healthy.
    pub fn resume(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "etcd already runs");
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let dir = self.data.path().join("data");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.command("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--log-level", "warn", "--logger", "zap"])
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .context("starting etcd (apt-get install etcd-server)")?,
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if self
                .ctl(&["endpoint", "health"])
                .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd did not become healthy:\n{}", self.log())
    }

    /// Kills the server (as a crash or an outage would); data stays.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Runs etcdctl against this server.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url(), "--command-timeout", "5s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl (apt-get install etcd-client)")
    }

    /// `etcdctl` that must succeed; its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        ensure!(
            out.status.success(),
            "etcdctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The current revision of the store.
    pub fn revision(&self) -> Result<i64> {
        let out = self.ctl_ok(&[
            "get",
            "/",
            "--prefix",
            "--keys-only",
            "--limit",
            "1",
            "-w",
            "json",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"]
            .as_i64()
            .context("no revision in etcdctl output")
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) -> Result<i64> {
        let rev = self.revision()?;
        self.ctl_ok(&["compact", &rev.to_string(), "--physical"])?;
        Ok(rev)
    }

    /// The server's process id (for CPU figures).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn command(&self, program: &str) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Rewrites host `i`'s config to take its peers and block from the store
/// at `url` (no `[[peer]]`, no `subnet`); `extra` goes before `[store]`.
pub fn use_store(bed: &Testbed, i: usize, url: &str, extra: &str) -> Result<()> {
    let h = &bed.hosts[i];
    let state = bed.dir().join(format!("{}-state", h.name));
    let text = format!(
        "name = \"{}\"\nprivate_key_file = \"{}.key\"\nlisten = \"{}:51820\"\n\
         control_socket = \"{}\"\nstate_dir = \"{}\"\n{extra}\n\
         [store]\nkind = \"etcd\"\nendpoints = [\"{url}\"]\nlease_ttl = 15\n",
        h.name,
        h.name,
        h.underlay,
        h.socket.display(),
        state.display(),
    );
    std::fs::write(&h.config, text)?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

fn which(tool: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()?;
    ensure!(
        found.status.success(),
        "{tool} is missing: run scripts/test.sh, which installs etcd-server and etcd-client"
    );
    Ok(())
}
