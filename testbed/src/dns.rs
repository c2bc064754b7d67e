//! DNS fixtures for the namespace tests: upstream servers in the underlay
//! switch namespace (dnsmasq, or a misbehaving one in python3), `dig`, and
//! helper processes run inside a namespace.
//!
//! Every process here is killed on drop; the python helpers also exit by
//! themselves within two minutes. Must never: listen or send outside the
//! testbed's namespaces.

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::{Testbed, exec_in, wait_until};

/// The upstream's address, on the switch namespace's bridge.
pub const UPSTREAM: &str = "192.0.2.200";
/// The cluster DNS service address.
pub const SERVICE: &str = "169.254.169.250";

const FAKE_DNS: &str = include_str!("py/fake_dns.py");
const HOLD_TCP: &str = include_str!("py/hold_tcp.py");
const OCCUPY: &str = include_str!("py/occupy.py");
const QUERY: &str = include_str!("py/query.py");

/// A process inside a namespace, killed on drop, its stdout readable by
/// line.
pub struct NsProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl NsProcess {
    /// Starts `args` in `ns`; `what` names the package for the error.
    pub fn start(ns: &str, args: &[&str], what: &str) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?} ({what})"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Self {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// A python3 script from `src/testbed/py` with its arguments.
    fn python(ns: &str, script: &str, args: &[&str]) -> Result<Self> {
        let mut full = vec!["python3", "-c", script];
        full.extend_from_slice(args);
        Self::start(ns, &full, "python3")
    }

    /// The next line of output; an error if the process ended first.
    /// (Blocking: the scripts here print within their own bounded time.)
    pub fn next_line(&mut self) -> Result<String> {
        match self.lines.next() {
            Some(line) => Ok(line?),
            None => bail!("the process ended: {:?}", self.child.try_wait()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Puts the upstream's address on the switch namespace's bridge.
fn add_upstream_address(bed: &Testbed) -> Result<()> {
    let out = exec_in(
        &bed.bridge_ns,
        &["ip", "addr", "add", &format!("{UPSTREAM}/24"), "dev", "br0"],
    )?;
    ensure!(out.status.success(), "adding {UPSTREAM}: {out:?}");
    Ok(())
}

/// dnsmasq answering `outside.example` (192.0.2.99) in the switch
/// namespace.
pub struct Dnsmasq {
    _process: NsProcess,
}

impl Dnsmasq {
    pub fn start(bed: &Testbed) -> Result<Self> {
        require(&["dnsmasq"], "apt-get install dnsmasq")?;
        require(&["dig"], "apt-get install dnsutils")?;
        add_upstream_address(bed)?;
        let listen = format!("--listen-address={UPSTREAM}");
        let args = [
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &listen,
            "--address=/outside.example/192.0.2.99",
            "--pid-file",
            "--user=root",
        ];
        let up = Self {
            _process: NsProcess::start(&bed.bridge_ns, &args, "apt-get install dnsmasq")?,
        };
        let ready = wait_until(Duration::from_secs(5), || {
            dig(
                &bed.bridge_ns,
                &[&format!("@{UPSTREAM}"), "+short", "outside.example"],
            )
            .contains("192.0.2.99")
        });
        ensure!(ready, "dnsmasq did not come up");
        Ok(up)
    }
}

/// How the fake upstream misbehaves (see `py/fake_dns.py`).
#[derive(Debug, Clone, Copy)]
pub enum Fake {
    /// Every answer carries the question `evil.example`.
    OtherName,
    /// Logs every UDP query's id.
    LogIds,
    /// UDP answers are empty and truncated; TCP answers are full.
    Truncate,
}

/// The python3 upstream in the switch namespace, writing to a log file.
pub struct FakeUpstream {
    _process: NsProcess,
    log: PathBuf,
}

impl FakeUpstream {
    pub fn start(bed: &Testbed, mode: Fake) -> Result<Self> {
        require(&["python3"], "python3 runs the fake upstream")?;
        add_upstream_address(bed)?;
        let mode = match mode {
            Fake::OtherName => "other-name",
            Fake::LogIds => "log-ids",
            Fake::Truncate => "truncate",
        };
        let log = bed.dir().join(format!("upstream-{mode}.log"));
        let log_arg = log.to_string_lossy().into_owned();
        let process = NsProcess::python(&bed.bridge_ns, FAKE_DNS, &[mode, UPSTREAM, &log_arg])?;
        let up = Self {
            _process: process,
            log,
        };
        let ready = wait_until(Duration::from_secs(5), || up.log().contains("ready"));
        ensure!(
            ready,
            "the fake upstream did not come up (python3 missing?)"
        );
        Ok(up)
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The ids of the UDP queries it saw (mode `LogIds`).
    pub fn ids(&self) -> Vec<u16> {
        self.log()
            .lines()
            .filter_map(|l| l.strip_prefix("id "))
            .filter_map(|h| u16::from_str_radix(h, 16).ok())
            .collect()
    }
}

/// Holds `count` TCP connections to the DNS service from `ns` for `hold`
/// seconds (see `py/hold_tcp.py`).
pub fn hold_tcp(ns: &str, count: usize, hold: u32) -> Result<NsProcess> {
    NsProcess::python(
        ns,
        HOLD_TCP,
        &[SERVICE, &count.to_string(), &hold.to_string()],
    )
}

/// Sends `count` A queries for `q<i>.<suffix>` from `ns` to the DNS
/// service, all with the id `id`, and returns (id, rcode, answer count) of
/// each answer; `None` for a query that got none within 3 s.
pub fn fixed_id_queries(
    ns: &str,
    count: usize,
    suffix: &str,
    id: u16,
) -> Result<Vec<Option<(u16, u8, u16)>>> {
    let mut p = NsProcess::python(
        ns,
        QUERY,
        &[SERVICE, &count.to_string(), suffix, &format!("{id:04x}")],
    )?;
    (0..count)
        .map(|_| {
            let line = p.next_line()?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            Ok(match fields.as_slice() {
                ["answer", id, rcode, count] => {
                    Some((u16::from_str_radix(id, 16)?, rcode.parse()?, count.parse()?))
                }
                _ => None,
            })
        })
        .collect()
}

/// Holds `address:port` (`kind` "udp" or "tcp") bound in `ns`, returning
/// once it does.
pub fn occupy(ns: &str, kind: &str, address: &str, port: u16) -> Result<NsProcess> {
    let mut p = NsProcess::python(ns, OCCUPY, &[kind, address, &port.to_string()])?;
    let line = p.next_line()?;
    ensure!(
        line == "bound",
        "could not occupy {kind} {address}:{port}: {line}"
    );
    Ok(p)
}

/// Fails loudly unless every tool is on the PATH (`package` says where
/// to get them).
pub fn require(tools: &[&str], package: &str) -> Result<()> {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()?;
        ensure!(found.status.success(), "{tool} is missing: {package}");
    }
    Ok(())
}

/// `dig` in `ns` with a short timeout; its whole output (empty if it
/// cannot run: call `require` first for a clear failure).
pub fn dig(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["dig", "+time=1", "+tries=2"];
    full.extend_from_slice(args);
    exec_in(ns, &full)
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// The status of an answer from the DNS service (NOERROR, NXDOMAIN, ...),
/// or "no answer".
pub fn status_of(ns: &str, args: &[&str]) -> String {
    let at = format!("@{SERVICE}");
    let mut full = vec![at.as_str()];
    full.extend_from_slice(args);
    let out = dig(ns, &full);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_owned()
}
