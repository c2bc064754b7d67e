//! What a reload changes: the running configuration against the file as
//! it is now, as a plan of run-time changes or a refusal naming every
//! setting that needs a restart.
//!
//! Peers are matched by public key (the key names a tunnel; a peer whose
//! key changed is a new peer). Must never: apply anything, or read a file:
//! the caller loads and validates the new config and applies the plan.

use std::fmt;
use std::net::SocketAddr;

use crate::config::Config;
use crate::membership::PeerSpec;

/// One change a reload makes at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    PeerAdded(String),
    PeerRemoved(String),
    /// A peer kept its key; `what` says which of its settings changed.
    PeerChanged {
        name: String,
        what: Vec<String>,
    },
    DnsUpstream(Option<Vec<SocketAddr>>),
    WithdrawAfter(u64),
    MetricsListen(Option<SocketAddr>),
    /// The `[policy]` table changed; tracked flows are decided again at
    /// their next packet.
    Policy(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::PeerAdded(name) => write!(f, "peer {name} added"),
            Change::PeerRemoved(name) => write!(f, "peer {name} removed"),
            Change::PeerChanged { name, what } => write!(f, "peer {name}: {}", what.join(", ")),
            Change::DnsUpstream(None) => write!(f, "dns.upstream: the host's resolv.conf"),
            Change::DnsUpstream(Some(list)) => {
                let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                write!(f, "dns.upstream: {}", list.join(", "))
            }
            Change::WithdrawAfter(secs) => write!(f, "dns.withdraw_after: {secs} s"),
            Change::MetricsListen(None) => write!(f, "metrics_listen: off"),
            Change::MetricsListen(Some(at)) => write!(f, "metrics_listen: {at}"),
            Change::Policy(summary) => write!(f, "policy: {summary}"),
        }
    }
}

/// Everything a reload changes; empty when the file says what runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn peers_changed(&self) -> bool {
        self.changes.iter().any(|c| {
            matches!(
                c,
                Change::PeerAdded(_) | Change::PeerRemoved(_) | Change::PeerChanged { .. }
            )
        })
    }

    pub fn policy_changed(&self) -> bool {
        self.changes.iter().any(|c| matches!(c, Change::Policy(_)))
    }

    pub fn metrics_changed(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c, Change::MetricsListen(_)))
    }
}

/// A reload refused because settings changed that only a restart applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "reload refused, nothing changed: {} {} a restart of meshd",
    .settings.join(", "),
    if .settings.len() == 1 { "needs" } else { "need" }
)]
pub struct RestartNeeded {
    pub settings: Vec<&'static str>,
}

/// Compares `running` with `fresh`: the run-time changes, or every setting
/// that changed but needs a restart (then nothing may be applied).
pub fn plan(running: &Config, fresh: &Config) -> Result<Plan, RestartNeeded> {
    let settings = restart_only(running, fresh);
    if !settings.is_empty() {
        return Err(RestartNeeded { settings });
    }
    let mut changes = peer_changes(&running.membership.peers, &fresh.membership.peers);
    if running.dns.upstream != fresh.dns.upstream {
        changes.push(Change::DnsUpstream(fresh.dns.upstream.clone()));
    }
    if running.dns.withdraw_after != fresh.dns.withdraw_after {
        changes.push(Change::WithdrawAfter(fresh.dns.withdraw_after.as_secs()));
    }
    if running.metrics_listen != fresh.metrics_listen {
        changes.push(Change::MetricsListen(fresh.metrics_listen));
    }
    if running.policy != fresh.policy {
        changes.push(Change::Policy(policy_summary(&fresh.policy)));
    }
    Ok(Plan { changes })
}

/// The settings that shape the device, sockets and identity the agent
/// was started with.
fn restart_only(a: &Config, b: &Config) -> Vec<&'static str> {
    [
        ("name", a.name == b.name),
        ("private_key_file", a.public_key() == b.public_key()),
        ("listen", a.listen == b.listen),
        ("overlay", a.overlay == b.overlay),
        ("subnet", a.subnet == b.subnet),
        ("device", a.device == b.device),
        ("mode", a.mode == b.mode),
        ("control_socket", a.control_socket == b.control_socket),
        ("bridge", a.bridge == b.bridge),
        ("state_dir", a.state_dir == b.state_dir),
        ("mtu", a.mtu == b.mtu),
        ("offload", a.offload == b.offload),
        ("store", a.store == b.store),
        ("dns.domain", a.dns.domain == b.dns.domain),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(name, _)| name)
    .collect()
}

fn peer_changes(old: &[PeerSpec], new: &[PeerSpec]) -> Vec<Change> {
    let mut changes: Vec<Change> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.public_key == o.public_key))
        .map(|o| Change::PeerRemoved(o.name.clone()))
        .collect();
    for n in new {
        match old.iter().find(|o| o.public_key == n.public_key) {
            None => changes.push(Change::PeerAdded(n.name.clone())),
            Some(o) => {
                let what = peer_fields(o, n);
                if !what.is_empty() {
                    changes.push(Change::PeerChanged {
                        name: n.name.clone(),
                        what,
                    });
                }
            }
        }
    }
    changes
}

/// What changed on one peer, values shown except the preshared key's.
fn peer_fields(o: &PeerSpec, n: &PeerSpec) -> Vec<String> {
    let mut what = Vec::new();
    if o.name != n.name {
        what.push(format!("renamed from {}", o.name));
    }
    if o.endpoint != n.endpoint {
        what.push(format!("endpoint {}", shown(n.endpoint)));
    }
    if o.subnet != n.subnet {
        what.push(format!("subnet {}", n.subnet));
    }
    if o.keepalive != n.keepalive {
        what.push(format!(
            "keepalive {}",
            shown(n.keepalive.map(|k| format!("{k} s")))
        ));
    }
    if o.preshared_key != n.preshared_key {
        what.push("preshared key (new handshake)".to_owned());
    }
    what
}

fn policy_summary(p: &crate::policy::Policy) -> String {
    let within = p
        .within
        .map(|w| format!(", within {w}"))
        .unwrap_or_default();
    format!(
        "default {}{within}, {} rules, {} tenants, {} tests passed",
        p.default,
        p.rules.len(),
        p.tenants.len(),
        p.tests.len()
    )
}

fn shown<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::keys::PrivateKey;

    struct Files {
        dir: tempfile::TempDir,
        peers: Vec<String>,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for name in ["h1.key", "h1b.key"] {
                let path = dir.path().join(name);
                std::fs::write(&path, PrivateKey::generate().unwrap().to_base64()).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            let peers = (0..3)
                .map(|_| PrivateKey::generate().unwrap().public_key().to_string())
                .collect();
            Self { dir, peers }
        }

        /// A config with `head` lines and peers h2..h4 (`k0`..`k2`) as
        /// `[[peer]]` bodies in `peers`.
        fn config(&self, head: &str, peers: &[&str]) -> Config {
            let mut text = format!(
                "name = \"h1\"\nprivate_key_file = \"h1.key\"\nsubnet = \"10.42.1.0/24\"\n{head}\n"
            );
            for body in peers {
                let mut body = (*body).to_owned();
                for (i, k) in self.peers.iter().enumerate() {
                    body = body.replace(&format!("{{k{i}}}"), k);
                }
                text.push_str(&format!("[[peer]]\n{body}\n"));
            }
            crate::config::parse(&text, &self.dir.path().join("h1.toml")).unwrap()
        }
    }

    const H2: &str = "name = \"h2\"\npublic_key = \"{k0}\"\nsubnet = \"10.42.2.0/24\"\nendpoint = \"192.0.2.2:51820\"";
    const H3: &str = "name = \"h3\"\npublic_key = \"{k1}\"\nsubnet = \"10.42.3.0/24\"";

    #[test]
    fn the_same_file_changes_nothing() {
        let f = Files::new();
        let a = f.config("", &[H2, H3]);
        assert_eq!(plan(&a, &f.config("", &[H2, H3])).unwrap(), Plan::default());
    }

    #[test]
    fn peers_added_removed_and_changed_in_place() {
        let f = Files::new();
        let running = f.config("", &[H2, H3]);
        let h2 = format!("{H2}\nkeepalive = 25");
        let h2 = h2.replace("192.0.2.2", "192.0.2.22");
        let h4 = "name = \"h4\"\npublic_key = \"{k2}\"\nsubnet = \"10.42.4.0/24\"";
        let p = plan(&running, &f.config("", &[&h2, h4])).unwrap();
        assert_eq!(
            p.changes,
            vec![
                Change::PeerRemoved("h3".into()),
                Change::PeerChanged {
                    name: "h2".into(),
                    what: vec!["endpoint 192.0.2.22:51820".into(), "keepalive 25 s".into()],
                },
                Change::PeerAdded("h4".into()),
            ]
        );
        assert!(p.peers_changed());
        assert!(!p.metrics_changed());
        assert_eq!(
            p.changes[1].to_string(),
            "peer h2: endpoint 192.0.2.22:51820, keepalive 25 s"
        );
    }

    #[test]
    fn dns_and_metrics_settings_change_at_run_time() {
        let f = Files::new();
        let running = f.config("", &[H2]);
        let fresh = f.config(
            "metrics_listen = \"127.0.0.1:9586\"\n[dns]\nupstream = [\"192.0.2.53:53\"]\nwithdraw_after = 60",
            &[H2],
        );
        let p = plan(&running, &fresh).unwrap();
        let shown: Vec<String> = p.changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "dns.upstream: 192.0.2.53:53",
                "dns.withdraw_after: 60 s",
                "metrics_listen: 127.0.0.1:9586"
            ]
        );
        assert!(!p.peers_changed());
        assert!(p.metrics_changed());
    }

    #[test]
    fn a_restart_only_setting_refuses_the_whole_reload_by_name() {
        let f = Files::new();
        let running = f.config("", &[H2]);
        // A peer change rides along: it must not count for anything.
        let fresh = f.config("mode = \"tap\"\nmtu = 1300", &[H2, H3]);
        let err = plan(&running, &fresh).unwrap_err();
        assert_eq!(err.settings, ["mode", "mtu"]);
        assert_eq!(
            err.to_string(),
            "reload refused, nothing changed: mode, mtu need a restart of meshd"
        );
    }

    #[test]
    fn a_new_own_key_or_name_needs_a_restart() {
        let f = Files::new();
        let running = f.config("", &[H2]);
        let mut fresh = running.clone();
        fresh.private_key = PrivateKey::load(&f.dir.path().join("h1b.key")).unwrap();
        fresh.name = "h9".into();
        let err = plan(&running, &fresh).unwrap_err();
        assert_eq!(err.settings, ["name", "private_key_file"]);
    }

    #[test]
    fn a_peer_whose_key_changed_is_a_new_peer() {
        let f = Files::new();
        let running = f.config("", &[H2]);
        let h2 = H2.replace("{k0}", "{k2}");
        let p = plan(&running, &f.config("", &[&h2])).unwrap();
        assert_eq!(
            p.changes,
            vec![
                Change::PeerRemoved("h2".into()),
                Change::PeerAdded("h2".into())
            ]
        );
    }
}
