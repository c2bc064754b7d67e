//! The control protocol between `meshctl` and `meshd`: one JSON request
//! line, one JSON response line, over the agent's Unix socket.
//!
//! The client side here is blocking std IO, so `meshctl` needs no runtime.
//! Must never: carry private key material in either direction.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::core::PeerStatus;
use crate::core::ethernet::Mac;
use crate::core::ipam::Container;
use crate::keys::PublicKey;

/// Longest a request may take before the client gives up (an attach runs
/// a handful of `ip` commands).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request line the agent reads; requests are tiny.
pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Peers,
    Status,
    Containers,
    Attach(AttachRequest),
    Detach {
        netns: String,
    },
    Dns,
    /// `meshctl policy test`: the verdict for a first packet.
    PolicyTest {
        from: String,
        to: String,
        port: String,
    },
    /// `meshctl drops`: policy drops after a sequence number.
    Drops {
        after: u64,
    },
    /// Re-read the config file and apply what can change at run time.
    Reload,
    /// Every counter, for the metrics endpoint.
    Metrics,
    /// `meshctl store`: the membership store's state.
    Store,
}

/// `meshctl attach`: give the container in `netns` an overlay address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub netns: String,
    pub name: String,
    pub stack: Option<String>,
    pub service: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// Named ports, `NAME:PORT/PROTO` (SRV records).
    #[serde(default)]
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Peers(Vec<PeerStatus>),
    Status(HostStatus),
    Containers(Vec<Container>),
    Container(Container),
    Records(Vec<crate::dns::RecordView>),
    Verdict(crate::policy::explain::VerdictView),
    Drops(Vec<crate::policy::explain::DropView>),
    /// What a reload changed, one line each (empty: nothing).
    Reloaded(Vec<String>),
    Metrics(MetricsSnapshot),
    Store(crate::store::StoreStatus),
    Error(String),
}

/// Everything the agent counts, as one consistent snapshot taken by the
/// packet task between two wake-ups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub peers: Vec<PeerStatus>,
    /// Drops by reason, every reason (zeros too, so series exist).
    pub drops: BTreeMap<String, u64>,
    /// TAP mode: ARP requests answered.
    pub arp_replies: Option<u64>,
    /// DNS queries by result, every result.
    pub dns_queries: BTreeMap<String, u64>,
    /// TAP mode: containers attached.
    pub containers: Option<usize>,
    /// Policy drops by direction, tier and rule ("" when no rule decided).
    #[serde(default)]
    pub policy_drops: Vec<PolicyDropCount>,
}

/// One policy drop counter, for the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDropCount {
    pub direction: String,
    pub tier: String,
    pub rule: String,
    pub count: u64,
}

/// This host as `meshctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub public_key: PublicKey,
    pub listen: SocketAddr,
    /// "tun" or "tap".
    pub mode: String,
    pub device: String,
    /// TAP mode: the bridge, the agent's MAC, and how many containers.
    pub bridge: Option<String>,
    pub agent_mac: Option<Mac>,
    pub containers: Option<usize>,
    pub mtu: u16,
    pub address: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub overlay: Ipv4Net,
    pub uptime_secs: u64,
    pub peers: usize,
    pub peers_up: usize,
    pub peers_connecting: usize,
    pub peers_down: usize,
    /// Drop counters by reason, non-zero ones only.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("meshd is not running (no agent listening on {})", .0.display())]
    NotRunning(PathBuf),
    #[error("permission denied on {}: run as root (the socket is mode 0600)", .0.display())]
    PermissionDenied(PathBuf),
    #[error("talking to meshd on {}: {}", .path.display(), .reason)]
    Io { path: PathBuf, reason: String },
    #[error("meshd sent a response this meshctl does not understand: {0}")]
    Protocol(String),
    #[error("meshd: {0}")]
    Agent(String),
}

/// Sends one request and reads the response.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let io = |e: std::io::Error| ControlError::Io {
        path: socket.to_owned(),
        reason: e.to_string(),
    };
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning(socket.to_owned())
        }
        std::io::ErrorKind::PermissionDenied => ControlError::PermissionDenied(socket.to_owned()),
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(io)?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    match serde_json::from_str(&reply).map_err(|e| ControlError::Protocol(e.to_string()))? {
        Response::Error(msg) => Err(ControlError::Agent(msg)),
        ok => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_with_a_tag() {
        assert_eq!(
            serde_json::to_string(&Request::Peers).unwrap(),
            r#"{"request":"peers"}"#
        );
        let back: Request = serde_json::from_str(r#"{"request":"status"}"#).unwrap();
        assert_eq!(back, Request::Status);
        let attach = Request::Attach(AttachRequest {
            netns: "c1".into(),
            name: "web".into(),
            stack: Some("shop".into()),
            service: None,
            ip: Some(Ipv4Addr::new(10, 42, 1, 9)),
            ports: vec!["http:80/tcp".into()],
        });
        let line = serde_json::to_string(&attach).unwrap();
        assert!(
            line.starts_with(r#"{"request":"attach","netns":"c1""#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), attach);
    }

    #[test]
    fn missing_socket_means_not_running() {
        let err = request(Path::new("/nonexistent/meshnet.sock"), &Request::Peers).unwrap_err();
        assert!(matches!(err, ControlError::NotRunning(_)), "{err}");
        assert!(err.to_string().starts_with("meshd is not running"));
    }

    #[test]
    fn stale_socket_file_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = request(&path, &Request::Peers).unwrap_err();
        assert!(matches!(err, ControlError::NotRunning(_)), "{err}");
    }
}
