//! DNS at 169.254.169.250:53, UDP and TCP, for this host's containers (and,
//! in TUN mode, the host itself).
//!
//! The service address lives on the host's loopback; the agent binds
//! ordinary sockets there. Answers come from the shared zone (a `watch` the
//! record sync publishes); other names are forwarded to the upstream
//! servers, cached per TTL. Must never: answer a client outside this host's
//! subnet (no open resolver on the underlay), forward to the service
//! address itself, or let a slow upstream hold up other queries.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use crate::core::service::SERVICE_ADDRESS;
use crate::dns::Zone;
use crate::dns::answer::{self, Decision, Transport};
use crate::dns::cache::{Cache, RateLimit};

/// How long one upstream gets before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may take per message.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot serve DNS on {SERVICE_ADDRESS}:53: {0}")]
pub struct DnsError(String);

struct Shared {
    zone: watch::Receiver<Arc<Zone>>,
    upstreams: Vec<SocketAddr>,
    subnet: Ipv4Net,
    cache: Mutex<Cache>,
    limit: Mutex<RateLimit>,
    rotation: std::sync::atomic::AtomicUsize,
}

/// The upstream servers of the host's /etc/resolv.conf, without the
/// service address.
pub fn system_upstreams() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(SERVICE_ADDRESS))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Binds the UDP and TCP sockets and serves until the runtime stops.
pub async fn serve(
    zone: watch::Receiver<Arc<Zone>>,
    upstreams: Vec<SocketAddr>,
    subnet: Ipv4Net,
) -> Result<(), DnsError> {
    let at = SocketAddr::new(SERVICE_ADDRESS.into(), 53);
    let udp = UdpSocket::bind(at)
        .await
        .map_err(|e| DnsError(e.to_string()))?;
    let tcp = TcpListener::bind(at)
        .await
        .map_err(|e| DnsError(e.to_string()))?;
    let upstreams: Vec<SocketAddr> = upstreams
        .into_iter()
        .filter(|u| u.ip() != IpAddr::V4(SERVICE_ADDRESS))
        .collect();
    if upstreams.is_empty() {
        tracing::warn!("no upstream DNS servers: names outside the cluster get SERVFAIL");
    }
    let shared = Arc::new(Shared {
        zone,
        upstreams,
        subnet,
        cache: Mutex::new(Cache::default()),
        limit: Mutex::new(RateLimit::default()),
        rotation: Default::default(),
    });
    tokio::spawn(serve_tcp(tcp, shared.clone()));
    tokio::spawn(serve_udp(Arc::new(udp), shared));
    Ok(())
}

impl Shared {
    /// Only this host's own addresses are clients.
    fn admits(&self, client: SocketAddr, now: Instant) -> bool {
        let local = match client.ip() {
            IpAddr::V4(ip) => self.subnet.contains(&ip) || ip == SERVICE_ADDRESS,
            IpAddr::V6(_) => false,
        };
        local
            && self
                .limit
                .lock()
                .is_ok_and(|mut l| l.allow(client.ip(), now))
    }

    /// The answer to send, forwarding upstream if the name is not ours.
    async fn respond(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let zone = self.zone.borrow().clone();
        let rotation = self
            .rotation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (name, qtype) = match answer::answer(&zone, query, transport, rotation) {
            Decision::Reply(bytes) => return Some(bytes),
            Decision::Drop => return None,
            Decision::Forward { name, qtype } => (name, qtype),
        };
        let id = u16::from_be_bytes([query[0], query[1]]);
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(&name, qtype, id, Instant::now()));
        let response = match cached {
            Some(hit) => hit,
            None => match self.forward(query, id).await {
                Some(r) => {
                    if let Ok(mut c) = self.cache.lock() {
                        c.put(&name, qtype, &r, Instant::now());
                    }
                    r
                }
                None => return answer::server_failure(query, transport),
            },
        };
        Some(match transport {
            Transport::Udp => answer::limit_for_udp(response),
            Transport::Tcp => response,
        })
    }

    async fn forward(&self, query: &[u8], id: u16) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            let bind: SocketAddr = if upstream.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                "[::]:0".parse().ok()?
            };
            let Ok(socket) = UdpSocket::bind(bind).await else {
                continue;
            };
            if socket.send_to(query, upstream).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65535];
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
            // Skip stray datagrams: only the upstream's answer to this id.
            while let Ok(Ok((n, from))) =
                tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
            {
                if from == *upstream && n >= 12 && buf[..2] == id.to_be_bytes() {
                    return Some(buf[..n].to_vec());
                }
            }
            tracing::debug!(%upstream, "upstream DNS server did not answer");
        }
        None
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if !shared.admits(client, Instant::now()) {
            continue;
        }
        let query = buf[..n].to_vec();
        let (socket, shared) = (socket.clone(), shared.clone());
        // Forwarding may wait on an upstream: never in this loop.
        tokio::spawn(async move {
            if let Some(reply) = shared.respond(&query, Transport::Udp).await {
                let _ = socket.send_to(&reply, client).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !shared.admits(client, Instant::now()) {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_client(stream, client, &shared).await;
        });
    }
}

async fn serve_tcp_client(
    mut stream: TcpStream,
    client: SocketAddr,
    shared: &Shared,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        if tokio::time::timeout(TCP_TIMEOUT, stream.read_exact(&mut len))
            .await
            .is_err()
        {
            return Ok(());
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_TIMEOUT, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if !shared.admits(client, Instant::now()) {
            return Ok(());
        }
        let Some(reply) = shared.respond(&query, Transport::Tcp).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(&reply).await?;
    }
}
