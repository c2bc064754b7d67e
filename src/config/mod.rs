//! The agent's TOML configuration: parsing and every validation rule.
//!
//! `load` turns a file into a `Config` that is valid by construction, or a
//! `ConfigError` naming the file, line and key. Must never: touch a device,
//! socket or route, so a broken config changes nothing on the host.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::Spanned;

use crate::keys::{PresharedKey, PrivateKey, PublicKey};
use crate::membership::{Membership, PeerSpec};

mod store;
pub use store::{StoreConfig, TlsFiles};

/// `[store]` defaults, for tools that build a `StoreConfig` themselves.
pub mod store_defaults {
    pub const BLOCK_PREFIX: u8 = super::store::DEFAULT_BLOCK_PREFIX;
    pub const LEASE_TTL: u16 = super::store::DEFAULT_LEASE_TTL;
}

/// The whole overlay unless configured: 10.42.0.0/16, as Rancher used.
pub const DEFAULT_OVERLAY: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 42, 0, 0), 16);
/// WireGuard's customary port.
pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_DEVICE: &str = "mesh0";
/// TAP mode's bridge unless configured.
pub const DEFAULT_BRIDGE: &str = "mesh-br0";
/// Where persistent state lives unless configured (`<dir>/<device>`).
pub const STATE_DIR: &str = "/var/lib/meshnet";
/// Where control sockets live unless the config says otherwise.
pub const CONTROL_SOCKET_DIR: &str = "/run/meshnet";

/// Smallest MTU every IPv4 host must accept (RFC 791).
const MIN_MTU: u16 = 576;

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` when the whole file is at fault (unreadable).
    pub line: Option<usize>,
    /// The offending key, as a dotted path (`peer.h2.subnet`).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tun,
    Tap,
}

/// The `[dns]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub domain: String,
    /// `None`: the servers in the host's /etc/resolv.conf.
    pub upstream: Option<Vec<SocketAddr>>,
    /// Records of a host not heard from this long are withdrawn.
    pub withdraw_after: std::time::Duration,
}

/// Seconds after which an unreachable host's records are withdrawn.
pub const DEFAULT_WITHDRAW_AFTER: u64 = 30;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub name: String,
    pub private_key: PrivateKey,
    pub listen: SocketAddr,
    pub overlay: Ipv4Net,
    /// This host's block. With `[store]` and no `subnet` configured it is
    /// the whole overlay until meshd sets it from the block it claims.
    pub subnet: Ipv4Net,
    pub device: String,
    pub mode: Mode,
    pub control_socket: PathBuf,
    /// TAP mode: the bridge the device and containers share.
    pub bridge: String,
    /// Persistent state (container addresses).
    pub state_dir: PathBuf,
    pub dns: DnsConfig,
    /// Inner MTU; `None` means underlay MTU minus 80.
    pub mtu: Option<u16>,
    /// Segmentation offloads (TUN TSO/GRO, UDP GSO/GRO) where the kernel
    /// offers them; `offload = false` turns them off.
    pub offload: bool,
    /// Where Prometheus metrics are served over HTTP; `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    pub membership: Membership,
    /// Who may reach whom; allows everything without a `[policy]` table.
    pub policy: crate::policy::Policy,
    /// `[store]`: peers come from etcd instead of `[[peer]]`.
    pub store: Option<StoreConfig>,
    /// Mixed into every tunnel whose peer has no key of its own (and every
    /// tunnel to a peer from the store).
    pub cluster_psk: Option<PresharedKey>,
}

impl Config {
    pub fn public_key(&self) -> PublicKey {
        self.private_key.public_key()
    }
}

/// The control socket path for a device when the config names none.
pub fn default_control_socket(device: &str) -> PathBuf {
    Path::new(CONTROL_SOCKET_DIR).join(format!("{device}.sock"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Spanned<String>,
    private_key_file: Spanned<String>,
    listen: Option<Spanned<String>>,
    overlay: Option<Spanned<String>>,
    subnet: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    offload: Option<bool>,
    cluster_psk_file: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    #[serde(default)]
    peer: Vec<Spanned<RawPeer>>,
    dns: Option<RawDns>,
    policy: Option<policy::RawPolicy>,
    store: Option<store::RawStore>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    domain: Option<Spanned<String>>,
    upstream: Option<Vec<Spanned<String>>>,
    withdraw_after: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    public_key: Spanned<String>,
    endpoint: Option<Spanned<String>>,
    subnet: Spanned<String>,
    keepalive: Option<Spanned<i64>>,
    preshared_key_file: Option<Spanned<String>>,
}

/// Reads and validates a config file. Key files named in it are read (and
/// their permissions checked) relative to the config file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Validates config text as if read from `path`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let v = Validator { text, file: path };
    let raw: RawConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
    v.config(raw)
}

struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Validator<'_> {
    fn error(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_of(span.start)),
            key: Some(key.into()),
            message: msg.into(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        // The error's span points at the offending key or value; a bare
        // identifier there is the key to name.
        let at = self.text.get(span.clone()).unwrap_or("").trim();
        let key = at
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            .then(|| at.to_owned())
            .filter(|k| !k.is_empty());
        ConfigError {
            file: self.file.to_owned(),
            line: e.span().map(|s| self.line_of(s.start)),
            key,
            message: e.message().trim().to_owned(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let name = self.name(&raw.name, "name")?;
        let private_key = self.private_key(&raw.private_key_file)?;
        let listen = match &raw.listen {
            Some(l) => self.socket_addr(l, "listen")?,
            None => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_PORT),
        };
        let overlay = match &raw.overlay {
            Some(o) => self.network(o, "overlay")?,
            None => DEFAULT_OVERLAY,
        };
        let requested = raw
            .subnet
            .as_ref()
            .map(|s| self.subnet(s, "subnet", overlay))
            .transpose()?;
        let store = raw
            .store
            .as_ref()
            .map(|s| self.store(s, listen, overlay, requested))
            .transpose()?;
        let subnet = self.own_subnet(requested, &raw, overlay)?;
        let device = match &raw.device {
            Some(d) if d.get_ref().starts_with(crate::core::isolation::PORT_PREFIX) => {
                return Err(self.error(
                    d.span(),
                    "device",
                    "names starting with \"mv\" belong to container ports, which the \
                     bridge filter treats as untrusted",
                ));
            }
            Some(d) => self.interface(d, "device")?,
            None => DEFAULT_DEVICE.to_owned(),
        };
        let bridge = match &raw.bridge {
            Some(b) if b.get_ref() == &device => {
                return Err(self.error(
                    b.span(),
                    "bridge",
                    "the bridge needs a name of its own, not the device's",
                ));
            }
            Some(b) => self.interface(b, "bridge")?,
            None => DEFAULT_BRIDGE.to_owned(),
        };
        let state_dir = match &raw.state_dir {
            Some(d) if d.get_ref().is_empty() => {
                return Err(self.error(d.span(), "state_dir", "must not be empty"));
            }
            Some(d) => PathBuf::from(d.get_ref()),
            None => Path::new(STATE_DIR).join(&device),
        };
        let mode = match raw.mode.as_ref().map(|m| (m.get_ref().as_str(), m)) {
            None | Some(("tun", _)) => Mode::Tun,
            Some(("tap", _)) => Mode::Tap,
            Some((other, m)) => {
                return Err(self.error(
                    m.span(),
                    "mode",
                    format!("unknown mode {other:?}; expected \"tun\" or \"tap\""),
                ));
            }
        };
        let control_socket = match &raw.control_socket {
            Some(s) if s.get_ref().is_empty() => {
                return Err(self.error(s.span(), "control_socket", "must not be empty"));
            }
            Some(s) => PathBuf::from(s.get_ref()),
            None => default_control_socket(&device),
        };
        let dns = self.dns(raw.dns.as_ref())?;
        let mtu = raw.mtu.as_ref().map(|m| self.mtu(m)).transpose()?;
        let metrics_listen = raw
            .metrics_listen
            .as_ref()
            .map(|m| self.socket_addr(m, "metrics_listen"))
            .transpose()?;
        let cluster_psk = raw
            .cluster_psk_file
            .as_ref()
            .map(|f| self.preshared_key(f, "cluster_psk_file"))
            .transpose()?;
        let own = Own {
            name: &name,
            key: private_key.public_key(),
            subnet,
            cluster_psk: cluster_psk.clone(),
        };
        let peers = self.peers(&raw.peer, &own, overlay)?;
        let policy = self.policy(raw.policy.as_ref())?;
        Ok(Config {
            file: self.file.to_owned(),
            name,
            private_key,
            listen,
            overlay,
            subnet,
            device,
            mode,
            control_socket,
            bridge,
            state_dir,
            dns,
            mtu,
            offload: raw.offload.unwrap_or(true),
            metrics_listen,
            membership: Membership { peers },
            policy,
            store,
            cluster_psk,
        })
    }

    /// `subnet` is required unless `[store]` claims a block; with a store,
    /// `[[peer]]` sections are refused (etcd is the one source of peers).
    fn own_subnet(
        &self,
        requested: Option<Ipv4Net>,
        raw: &RawConfig,
        overlay: Ipv4Net,
    ) -> Result<Ipv4Net, ConfigError> {
        if raw.store.is_some() {
            if let Some(p) = raw.peer.first() {
                return Err(self.error(
                    p.span(),
                    "peer",
                    "[[peer]] and [store] do not mix: with a store, peers come from etcd",
                ));
            }
            return Ok(requested.unwrap_or(overlay));
        }
        requested.ok_or_else(|| ConfigError {
            file: self.file.to_owned(),
            line: None,
            key: Some("subnet".into()),
            message: "missing: this host's block of the overlay, such as \"10.42.1.0/24\" \
                      (or a [store] table to claim one)"
                .into(),
        })
    }

    fn name(&self, name: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let n = name.get_ref();
        // Host names become DNS labels, so they follow the label rules.
        let ok = crate::membership::is_dns_label(n);
        if !ok {
            return Err(self.error(
                name.span(),
                key,
                format!("{n:?} is not a valid host name: use 1-63 letters, digits or '-', not starting or ending with '-'"),
            ));
        }
        Ok(n.clone())
    }

    fn preshared_key(
        &self,
        file: &Spanned<String>,
        key: &str,
    ) -> Result<PresharedKey, ConfigError> {
        let base = self.file.parent().unwrap_or(Path::new("."));
        PresharedKey::load(&base.join(file.get_ref()))
            .map_err(|e| self.error(file.span(), key, e.to_string()))
    }

    fn private_key(&self, file: &Spanned<String>) -> Result<PrivateKey, ConfigError> {
        let base = self.file.parent().unwrap_or(Path::new("."));
        let path = base.join(file.get_ref());
        PrivateKey::load(&path)
            .map_err(|e| self.error(file.span(), "private_key_file", e.to_string()))
    }

    fn socket_addr(&self, value: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        value.get_ref().parse().map_err(|_| {
            self.error(
                value.span(),
                key,
                format!(
                    "{:?} is not an address:port such as \"192.0.2.1:51820\"",
                    value.get_ref()
                ),
            )
        })
    }

    fn network(&self, value: &Spanned<String>, key: &str) -> Result<Ipv4Net, ConfigError> {
        let text = value.get_ref();
        let net: Ipv4Net = text.parse().map_err(|_| {
            self.error(
                value.span(),
                key,
                format!("{text:?} is not an IPv4 network such as \"10.42.1.0/24\""),
            )
        })?;
        if net.trunc() != net {
            return Err(self.error(
                value.span(),
                key,
                format!("{text} has host bits set; did you mean {}?", net.trunc()),
            ));
        }
        Ok(net)
    }

    fn subnet(
        &self,
        value: &Spanned<String>,
        key: &str,
        overlay: Ipv4Net,
    ) -> Result<Ipv4Net, ConfigError> {
        let net = self.network(value, key)?;
        if !overlay.contains(&net) {
            return Err(self.error(
                value.span(),
                key,
                format!("{net} is outside the overlay {overlay}"),
            ));
        }
        // A host needs its own address plus room for at least one more.
        if net.prefix_len() > 30 {
            return Err(self.error(
                value.span(),
                key,
                format!("{net} is too small: use a /30 or larger block"),
            ));
        }
        Ok(net)
    }

    fn interface(&self, value: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let d = value.get_ref();
        // Linux interface names: at most 15 bytes, no '/', no whitespace.
        let ok = !d.is_empty()
            && d.len() <= 15
            && d != "."
            && d != ".."
            && !d.contains(['/', ':'])
            && !d.chars().any(char::is_whitespace);
        if !ok {
            return Err(self.error(
                value.span(),
                key,
                format!(
                    "{d:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
                ),
            ));
        }
        Ok(d.clone())
    }

    fn dns(&self, raw: Option<&RawDns>) -> Result<DnsConfig, ConfigError> {
        let domain = match raw.and_then(|d| d.domain.as_ref()) {
            Some(d) => {
                let text = d.get_ref().trim_end_matches('.').to_lowercase();
                if text.is_empty() || !text.split('.').all(crate::membership::is_dns_label) {
                    return Err(self.error(
                        d.span(),
                        "dns.domain",
                        format!("{:?} is not a domain name", d.get_ref()),
                    ));
                }
                text
            }
            None => crate::dns::records::DEFAULT_DOMAIN.to_owned(),
        };
        let upstream = match raw.and_then(|d| d.upstream.as_ref()) {
            Some(list) => {
                let mut servers = Vec::with_capacity(list.len());
                for s in list {
                    let addr = self.socket_addr(s, "dns.upstream")?;
                    if addr.ip() == std::net::IpAddr::V4(crate::core::service::SERVICE_ADDRESS) {
                        return Err(self.error(
                            s.span(),
                            "dns.upstream",
                            "the agent cannot forward to itself",
                        ));
                    }
                    servers.push(addr);
                }
                Some(servers)
            }
            None => None,
        };
        let withdraw_after = match raw.and_then(|d| d.withdraw_after.as_ref()) {
            Some(w) => match u64::try_from(*w.get_ref()) {
                Ok(secs) if secs >= 5 => std::time::Duration::from_secs(secs),
                _ => return Err(self.error(w.span(), "dns.withdraw_after", "seconds, at least 5")),
            },
            None => std::time::Duration::from_secs(DEFAULT_WITHDRAW_AFTER),
        };
        Ok(DnsConfig {
            domain,
            upstream,
            withdraw_after,
        })
    }

    fn mtu(&self, value: &Spanned<i64>) -> Result<u16, ConfigError> {
        let m = *value.get_ref();
        u16::try_from(m)
            .ok()
            .filter(|m| *m >= MIN_MTU)
            .ok_or_else(|| {
                self.error(
                    value.span(),
                    "mtu",
                    format!("{m} is not a usable MTU ({MIN_MTU}-65535)"),
                )
            })
    }

    fn keepalive(&self, value: &Spanned<i64>, key: &str) -> Result<Option<u16>, ConfigError> {
        match u16::try_from(*value.get_ref()) {
            Ok(0) => Ok(None),
            Ok(k) => Ok(Some(k)),
            Err(_) => Err(self.error(
                value.span(),
                key,
                "keepalive is seconds from 0 (off) to 65535",
            )),
        }
    }

    fn peers(
        &self,
        raw: &[Spanned<RawPeer>],
        own: &Own,
        overlay: Ipv4Net,
    ) -> Result<Vec<PeerSpec>, ConfigError> {
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<PublicKey, String> = HashMap::new();
        let mut peers: Vec<PeerSpec> = Vec::with_capacity(raw.len());
        for p in raw.iter().map(Spanned::get_ref) {
            let name = self.name(&p.name, "peer.name")?;
            let at = |field: &str| format!("peer.{name}.{field}");
            if name == own.name || names.contains_key(&name) {
                return Err(self.error(
                    p.name.span(),
                    "peer.name",
                    format!("duplicate host name {name:?}"),
                ));
            }
            names.insert(name.clone(), peers.len());
            let public_key = PublicKey::from_base64(p.public_key.get_ref())
                .map_err(|e| self.error(p.public_key.span(), at("public_key"), e.to_string()))?;
            if public_key == own.key {
                return Err(self.error(
                    p.public_key.span(),
                    at("public_key"),
                    "this is this host's own public key; a host is not its own peer",
                ));
            }
            if let Some(other) = keys.insert(public_key, name.clone()) {
                return Err(self.error(
                    p.public_key.span(),
                    at("public_key"),
                    format!("same public key as peer {other:?}"),
                ));
            }
            let endpoint = p
                .endpoint
                .as_ref()
                .map(|e| self.socket_addr(e, &at("endpoint")))
                .transpose()?;
            let subnet = self.subnet(&p.subnet, &at("subnet"), overlay)?;
            if subnet.contains(&own.subnet) || own.subnet.contains(&subnet) {
                return Err(self.error(
                    p.subnet.span(),
                    at("subnet"),
                    format!("{subnet} overlaps this host's subnet {}", own.subnet),
                ));
            }
            if let Some(other) = peers
                .iter()
                .find(|o| o.subnet.contains(&subnet) || subnet.contains(&o.subnet))
            {
                return Err(self.error(
                    p.subnet.span(),
                    at("subnet"),
                    format!(
                        "{subnet} overlaps the subnet {} of peer {:?}",
                        other.subnet, other.name
                    ),
                ));
            }
            let keepalive = p
                .keepalive
                .as_ref()
                .map(|k| self.keepalive(k, &at("keepalive")))
                .transpose()?
                .flatten();
            // A peer's own key overrides the cluster's.
            let preshared_key = match &p.preshared_key_file {
                Some(f) => Some(self.preshared_key(f, &at("preshared_key_file"))?),
                None => own.cluster_psk.clone(),
            };
            peers.push(PeerSpec {
                name,
                public_key,
                endpoint,
                subnet,
                keepalive,
                preshared_key,
            });
        }
        Ok(peers)
    }
}

struct Own<'a> {
    cluster_psk: Option<PresharedKey>,
    name: &'a str,
    key: PublicKey,
    subnet: Ipv4Net,
}

pub mod diff;
mod policy;

#[cfg(test)]
mod tests;
