//! The `[store]` table: where cluster membership comes from when it is not
//! the static `[[peer]]` list.
//!
//! ```toml
//! [store]
//! kind = "etcd"
//! endpoints = ["http://10.0.0.5:2379"]
//! prefix = "/meshnet/v1"      # default
//! block_prefix = 24           # default; the first host writes it to etcd
//! advertise = "192.0.2.7:51820"  # default: `listen` when it names an address
//! lease_ttl = 45              # seconds, default
//! keepalive = 25              # toward every peer; default off
//! ca_file = "etcd-ca.pem"     # optional TLS; cert_file + key_file for mTLS
//! ```
//! Must never: touch the network; this only validates.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

pub const DEFAULT_BLOCK_PREFIX: u8 = 24;
/// Lease TTL: the issue's 30-60 s; a dead host's record goes within it.
pub const DEFAULT_LEASE_TTL: u16 = 45;

/// A validated `[store]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub block_prefix: u8,
    /// The endpoint peers use to reach this host.
    pub advertise: SocketAddr,
    /// The configured `subnet`, if any: claimed if free, an error if owned.
    pub requested: Option<Ipv4Net>,
    pub lease_ttl: u16,
    /// Persistent keepalive toward every peer from the store, as
    /// `[[peer]] keepalive`.
    pub keepalive: Option<u16>,
    pub tls: Option<TlsFiles>,
}

/// TLS files, resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    kind: Spanned<String>,
    endpoints: Spanned<Vec<Spanned<String>>>,
    prefix: Option<Spanned<String>>,
    block_prefix: Option<Spanned<i64>>,
    advertise: Option<Spanned<String>>,
    lease_ttl: Option<Spanned<i64>>,
    keepalive: Option<Spanned<i64>>,
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
}

impl Validator<'_> {
    pub(super) fn store(
        &self,
        raw: &RawStore,
        listen: SocketAddr,
        overlay: Ipv4Net,
        requested: Option<Ipv4Net>,
    ) -> Result<StoreConfig, ConfigError> {
        if raw.kind.get_ref() != "etcd" {
            return Err(self.error(
                raw.kind.span(),
                "store.kind",
                format!("unknown store {:?}; expected \"etcd\"", raw.kind.get_ref()),
            ));
        }
        let endpoints = self.endpoints(&raw.endpoints)?;
        let prefix = match &raw.prefix {
            Some(p) => self.prefix(p)?,
            None => crate::store::layout::DEFAULT_PREFIX.to_owned(),
        };
        let block_prefix = match &raw.block_prefix {
            Some(b) => self.block_prefix(b, overlay)?,
            None => DEFAULT_BLOCK_PREFIX.max(overlay.prefix_len()),
        };
        let advertise = self.advertise(raw.advertise.as_ref(), listen)?;
        let lease_ttl = match &raw.lease_ttl {
            Some(t) => u16::try_from(*t.get_ref())
                .ok()
                .filter(|t| (10..=600).contains(t))
                .ok_or_else(|| self.error(t.span(), "store.lease_ttl", "seconds, 10-600"))?,
            None => DEFAULT_LEASE_TTL,
        };
        let keepalive = raw
            .keepalive
            .as_ref()
            .map(|k| self.keepalive(k, "store.keepalive"))
            .transpose()?
            .flatten();
        Ok(StoreConfig {
            endpoints,
            prefix,
            block_prefix,
            advertise,
            requested,
            lease_ttl,
            keepalive,
            tls: self.tls(raw)?,
        })
    }

    fn endpoints(&self, list: &Spanned<Vec<Spanned<String>>>) -> Result<Vec<String>, ConfigError> {
        if list.get_ref().is_empty() {
            return Err(self.error(list.span(), "store.endpoints", "needs at least one URL"));
        }
        list.get_ref()
            .iter()
            .map(|e| {
                let url = e.get_ref();
                let ok = ["http://", "https://"]
                    .iter()
                    .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
                if ok {
                    Ok(url.clone())
                } else {
                    Err(self.error(
                        e.span(),
                        "store.endpoints",
                        format!("{url:?} is not a URL such as \"http://127.0.0.1:2379\""),
                    ))
                }
            })
            .collect()
    }

    fn prefix(&self, p: &Spanned<String>) -> Result<String, ConfigError> {
        let text = p.get_ref().trim_end_matches('/');
        if !text.starts_with('/') || text.len() < 2 || text.contains(char::is_whitespace) {
            return Err(self.error(
                p.span(),
                "store.prefix",
                format!(
                    "{:?} is not a key prefix such as \"/meshnet/v1\"",
                    p.get_ref()
                ),
            ));
        }
        Ok(text.to_owned())
    }

    fn block_prefix(&self, b: &Spanned<i64>, overlay: Ipv4Net) -> Result<u8, ConfigError> {
        u8::try_from(*b.get_ref())
            .ok()
            .filter(|b| (overlay.prefix_len()..=30).contains(b))
            .ok_or_else(|| {
                self.error(
                    b.span(),
                    "store.block_prefix",
                    format!(
                        "a block is a /{}../30 inside the overlay {overlay}",
                        overlay.prefix_len()
                    ),
                )
            })
    }

    fn advertise(
        &self,
        raw: Option<&Spanned<String>>,
        listen: SocketAddr,
    ) -> Result<SocketAddr, ConfigError> {
        match raw {
            Some(a) => {
                let addr = self.socket_addr(a, "store.advertise")?;
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(self.error(
                        a.span(),
                        "store.advertise",
                        "peers need a real address and port here",
                    ));
                }
                Ok(addr)
            }
            None if !listen.ip().is_unspecified() && listen.port() != 0 => Ok(listen),
            None => Err(ConfigError {
                file: self.file.to_owned(),
                line: None,
                key: Some("store.advertise".into()),
                message: format!(
                    "required when listen ({listen}) names no address: the endpoint peers use, such as \"192.0.2.7:{}\"",
                    listen.port()
                ),
            }),
        }
    }

    fn tls(&self, raw: &RawStore) -> Result<Option<TlsFiles>, ConfigError> {
        let base = self.file.parent().unwrap_or(std::path::Path::new("."));
        let path = |f: &Spanned<String>| base.join(f.get_ref());
        let identity = match (&raw.cert_file, &raw.key_file) {
            (Some(c), Some(k)) => Some((path(c), path(k))),
            (None, None) => None,
            (Some(f), None) | (None, Some(f)) => {
                return Err(self.error(
                    f.span(),
                    "store.cert_file",
                    "cert_file and key_file go together",
                ));
            }
        };
        let ca_file = raw.ca_file.as_ref().map(path);
        Ok((ca_file.is_some() || identity.is_some()).then_some(TlsFiles { ca_file, identity }))
    }
}
