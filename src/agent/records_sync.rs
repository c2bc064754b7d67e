//! Sharing DNS records between agents, through the encrypted mesh.
//!
//! Each agent sends its own records (`HostRecords`) from its overlay host
//! address to every peer's host address on UDP `SYNC_PORT`: that traffic
//! is routed into the overlay device and crosses the WireGuard tunnels like
//! any other, so it is authenticated and encrypted with no channel of its
//! own. A full snapshot goes out on every change; a heartbeat with the
//! version every `HEARTBEAT`; a receiver that sees a newer version asks for
//! the snapshot. Records of a host not heard from for `withdraw_after` are
//! withdrawn. Must never: accept records from an address other than the
//! sending peer's host address, or records outside that peer's subnet.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::dns::{HostRecords, Zone};
use crate::membership::{Membership, host_address};

/// The overlay port agents share records on.
pub const SYNC_PORT: u16 = 7301;
/// How often each agent tells every peer its records' version.
const HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum SyncMessage {
    Snapshot { version: u64, records: HostRecords },
    Heartbeat { host: String, version: u64 },
    Request,
}

struct Remote {
    version: u64,
    records: HostRecords,
    last_heard: Instant,
}

pub struct RecordsSync {
    pub domain: String,
    pub overlay: Ipv4Net,
    pub address: Ipv4Addr,
    pub withdraw_after: Duration,
    pub membership: watch::Receiver<Membership>,
    pub local: watch::Receiver<HostRecords>,
    pub zone: watch::Sender<Arc<Zone>>,
}

impl RecordsSync {
    pub async fn run(mut self) {
        let socket = match UdpSocket::bind((self.address, SYNC_PORT)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot share DNS records: peers will not see this host's names");
                return;
            }
        };
        let mut remotes: HashMap<String, Remote> = HashMap::new();
        let mut version: u64 = 1;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut buf = vec![0u8; 65536];
        self.publish(&remotes);
        self.broadcast(&socket, &self.snapshot(version)).await;
        loop {
            tokio::select! {
                changed = self.local.changed() => {
                    if changed.is_err() { return; }
                    version += 1;
                    self.publish(&remotes);
                    self.broadcast(&socket, &self.snapshot(version)).await;
                }
                _ = heartbeat.tick() => {
                    let host = self.local.borrow().host.clone();
                    self.broadcast(&socket, &SyncMessage::Heartbeat { host, version }).await;
                    let before = remotes.len();
                    remotes.retain(|host, r| {
                        let alive = r.last_heard.elapsed() < self.withdraw_after;
                        if !alive {
                            tracing::info!(%host, "no word from host: its DNS records are withdrawn");
                        }
                        alive
                    });
                    if remotes.len() != before {
                        self.publish(&remotes);
                    }
                }
                received = socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = received else { continue };
                    if self.receive(&buf[..n], from, &mut remotes, &socket, version).await {
                        self.publish(&remotes);
                    }
                }
            }
        }
    }

    fn snapshot(&self, version: u64) -> SyncMessage {
        SyncMessage::Snapshot {
            version,
            records: self.local.borrow().clone(),
        }
    }

    /// Handles one message; true when the zone must be rebuilt.
    async fn receive(
        &self,
        bytes: &[u8],
        from: SocketAddr,
        remotes: &mut HashMap<String, Remote>,
        socket: &UdpSocket,
        version: u64,
    ) -> bool {
        let Some((name, subnet)) = self.sender(from) else {
            return false;
        };
        let Ok(message) = serde_json::from_slice::<SyncMessage>(bytes) else {
            return false;
        };
        match message {
            SyncMessage::Snapshot {
                version: v,
                records,
            } => {
                if records.host != name || !records.within(subnet) {
                    tracing::warn!(peer = %name, "refused DNS records that are not the peer's own");
                    return false;
                }
                let changed = remotes.get(&name).is_none_or(|r| r.records != records);
                remotes.insert(
                    name,
                    Remote {
                        version: v,
                        records,
                        last_heard: Instant::now(),
                    },
                );
                changed
            }
            SyncMessage::Heartbeat { version: v, .. } => {
                match remotes.get_mut(&name) {
                    Some(r) if r.version == v => r.last_heard = Instant::now(),
                    _ => send(socket, &SyncMessage::Request, from).await,
                }
                false
            }
            SyncMessage::Request => {
                send(socket, &self.snapshot(version), from).await;
                false
            }
        }
    }

    /// The peer whose host address sent this, with its subnet.
    fn sender(&self, from: SocketAddr) -> Option<(String, Ipv4Net)> {
        let membership = self.membership.borrow();
        membership
            .peers
            .iter()
            .find(|p| {
                from.port() == SYNC_PORT
                    && from.ip() == std::net::IpAddr::V4(host_address(p.subnet))
            })
            .map(|p| (p.name.clone(), p.subnet))
    }

    async fn broadcast(&self, socket: &UdpSocket, message: &SyncMessage) {
        let targets: Vec<SocketAddr> = self
            .membership
            .borrow()
            .peers
            .iter()
            .map(|p| SocketAddr::new(host_address(p.subnet).into(), SYNC_PORT))
            .collect();
        for to in targets {
            send(socket, message, to).await;
        }
    }

    fn publish(&self, remotes: &HashMap<String, Remote>) {
        let mut hosts: Vec<HostRecords> = vec![self.local.borrow().clone()];
        hosts.extend(remotes.values().map(|r| r.records.clone()));
        self.zone
            .send_replace(Arc::new(Zone::build(&self.domain, self.overlay, &hosts)));
    }
}

async fn send(socket: &UdpSocket, message: &SyncMessage, to: SocketAddr) {
    let Ok(bytes) = serde_json::to_vec(message) else {
        return;
    };
    if let Err(e) = socket.send_to(&bytes, to).await {
        tracing::debug!(error = %e, %to, "record sync send failed");
    }
}
