//! Testbed helpers for large meshes and for hosts cut off from the switch:
//! starting every agent at the same moment, pinning underlay neighbours,
//! pinging many pairs at once, and reading tunnel state changes back from
//! an agent's log.
//!
//! Must never: touch the root namespace (every command runs inside the
//! testbed's namespaces), or leave a process running past its call.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::{Testbed, ip, wait_bounded};

/// How many pings run at once in `ping_pairs`: enough to finish 100 pairs
/// in seconds, few enough not to starve 50 agents on two cores.
const PING_PARALLELISM: usize = 16;

/// One "tunnel <state>" line of an agent's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The log line's time stamp, as written.
    pub stamp: String,
    pub peer: String,
    pub from: String,
    pub to: String,
}

impl Testbed {
    /// Spawns every host's agent before waiting for any, so all of them
    /// start handshaking within the same instant (`start_all` starts them
    /// one after another).
    pub fn start_all_together(&mut self) -> Result<()> {
        for i in 0..self.hosts.len() {
            self.spawn_agent(i, &[])?;
        }
        for i in 0..self.hosts.len() {
            self.wait_answering(i)?;
        }
        Ok(())
    }

    /// Pins every host's underlay neighbours (`nud permanent`). The kernel's
    /// neighbour table is shared by all namespaces and garbage-collects
    /// learned entries past 1,024 (`gc_thresh3`); a full mesh of 50 hosts
    /// learns 2,450, so without pinning ARP resolution itself fails and
    /// takes tunnels down with it. Permanent entries are not collected.
    pub fn pin_underlay_neighbours(&self) -> Result<()> {
        let macs = self
            .hosts
            .iter()
            .map(|h| underlay_mac(&h.ns))
            .collect::<Result<Vec<_>>>()?;
        for (i, host) in self.hosts.iter().enumerate() {
            // One `ip -batch` per host instead of 49 processes.
            let mut batch = String::new();
            for (j, other) in self.hosts.iter().enumerate().filter(|(j, _)| *j != i) {
                batch.push_str(&format!(
                    "neigh replace {} lladdr {} dev ul0 nud permanent\n",
                    other.underlay, macs[j]
                ));
            }
            ip_batch(&host.ns, &batch)?;
        }
        Ok(())
    }

    /// Takes host `i`'s port on the underlay switch down (`up == false`)
    /// or back up: the host is cut off, its agent keeps running.
    pub fn set_switch_port(&self, i: usize, up: bool) -> Result<()> {
        let port = format!("p{}", i + 1);
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.bridge_ns, "link", "set", &port, state])
    }

    /// Pings every `(from, to)` host pair over the overlay, several at a
    /// time; returns the pairs where no ping of `count` was answered.
    pub fn ping_pairs(&self, pairs: &[(usize, usize)], count: u32) -> Result<Vec<(usize, usize)>> {
        let mut failed = Vec::new();
        for chunk in pairs.chunks(PING_PARALLELISM) {
            let mut children = Vec::new();
            for &(from, to) in chunk {
                children.push(((from, to), self.spawn_ping(from, to, count)?));
            }
            for (pair, ping) in children {
                let status = ping.wait(Duration::from_secs(u64::from(count) + 10))?;
                if !status.success() {
                    failed.push(pair);
                }
            }
        }
        Ok(failed)
    }

    /// Starts `ping -c count` from host `from` to host `to`'s overlay
    /// address (0.5 s apart, 2 s for the last answer); read it with
    /// `PingRun::finish`, or it is killed when dropped.
    pub fn spawn_ping(&self, from: usize, to: usize, count: u32) -> Result<PingRun> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[from].ns, "ping", "-q", "-n"])
            .args(["-c", &count.to_string(), "-i", "0.5", "-W", "2"])
            .arg(self.hosts[to].overlay.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping")?;
        Ok(PingRun { child: Some(child) })
    }

    /// The tunnel state changes in host `i`'s log, from byte `since` on
    /// (take `log(i).len()` earlier to see only what happened after).
    pub fn state_changes(&self, i: usize, since: usize) -> Vec<StateChange> {
        let log = self.log(i);
        log.get(since..)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_state_change)
            .collect()
    }
}

/// A `ping` running in the background (`Testbed::spawn_ping`).
pub struct PingRun {
    child: Option<Child>,
}

impl PingRun {
    /// Waits (at most `timeout`) for the ping to end; returns how many
    /// echo requests it sent and how many were answered.
    pub fn finish(mut self, timeout: Duration) -> Result<(u32, u32)> {
        let mut child = self.child.take().context("ping already finished")?;
        let deadline = Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("ping did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output()?;
        ping_summary(&String::from_utf8_lossy(&out.stdout))
    }

    fn wait(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("ping already finished")?;
        wait_bounded(&mut child, timeout)
    }
}

impl Drop for PingRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// "N packets transmitted, M received, ..." as (N, M).
fn ping_summary(text: &str) -> Result<(u32, u32)> {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary in {text:?}"))?;
    let numbers: Vec<u32> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    match numbers[..] {
        [sent, received, ..] => Ok((sent, received)),
        _ => bail!("cannot read ping summary {line:?}"),
    }
}

/// Parses `... peer{name=h3}: ...: tunnel down from="up" to="down" ...`.
fn parse_state_change(line: &str) -> Option<StateChange> {
    let stamp = line.split_whitespace().next()?.to_owned();
    let rest = &line[line.find("peer{name=")? + "peer{name=".len()..];
    let peer = rest[..rest.find('}')?].to_owned();
    let message = &rest[rest.find(": tunnel ")? + ": tunnel ".len()..];
    let to = message.split_whitespace().next()?.to_owned();
    let from = field(message, "from=")?;
    Some(StateChange {
        stamp,
        peer,
        from,
        to,
    })
}

fn field(text: &str, name: &str) -> Option<String> {
    let value = &text[text.find(name)? + name.len()..];
    let value = value.split_whitespace().next()?;
    Some(value.trim_matches('"').to_owned())
}

fn underlay_mac(ns: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "ul0"])
        .output()
        .context("running ip")?;
    ensure!(out.status.success(), "no ul0 in {ns}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .map(str::to_owned)
        .with_context(|| format!("no MAC address in {text:?}"))
}

fn ip_batch(ns: &str, commands: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    child
        .stdin
        .take()
        .context("ip stdin")?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ip -n {ns} -batch: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_state_change_line() {
        let line = "2026-11-23T12:00:00.000001Z  INFO peer{name=h3}: meshnet::core::peer: \
                    tunnel down from=\"up\" to=\"down\" endpoint=Some(192.0.2.3:51820)";
        assert_eq!(
            parse_state_change(line),
            Some(StateChange {
                stamp: "2026-11-23T12:00:00.000001Z".into(),
                peer: "h3".into(),
                from: "up".into(),
                to: "down".into()
            })
        );
        assert_eq!(parse_state_change("INFO meshd: config reloaded"), None);
    }

    #[test]
    fn reads_a_ping_summary() {
        let text = "--- 10.42.2.1 ping statistics ---\n\
                    270 packets transmitted, 268 received, 0.7% packet loss, time 134s\n";
        assert_eq!(ping_summary(text).unwrap(), (270, 268));
        assert!(ping_summary("ping: connect: Network is unreachable").is_err());
    }
}
