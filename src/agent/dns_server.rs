//! DNS at 169.254.169.250:53, UDP and TCP, for this host's containers (and,
//! in TUN mode, the host itself): the sockets, tasks and timeouts.
//!
//! The service address lives on the host's loopback; the agent binds
//! ordinary sockets there. Answers come from the shared zone (a `watch` the
//! record sync publishes); other names are forwarded to the upstream
//! servers, each attempt from a fresh socket (a kernel-chosen random port)
//! with a fresh random id. Which reply counts, what is cached and who may
//! ask how much are decided in `crate::dns` (`forward`, `cache`, `rate`).
//! Must never: answer a client outside this host's subnet (no open
//! resolver on the underlay), forward to the service address itself, let a
//! slow upstream or a client holding connections hold up other queries,
//! or block the accept loop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};

use crate::core::service::SERVICE_ADDRESS;
use crate::dns::Zone;
use crate::dns::answer::{self, Decision, Transport};
use crate::dns::cache::Cache;
use crate::dns::forward::{Query, Verdict};
use crate::dns::rate::{Client, RateLimit, TcpSlots};
use crate::membership;

/// How long one upstream gets (per transport) before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay silent, or take to send one message.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// How long a TCP client may take to read an answer.
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest query read from a client over UDP (EDNS clients offer 1232-4096).
const UDP_QUERY_BUFFER: usize = 4096;
/// Largest UDP answer taken from an upstream; anything longer is asked
/// again over TCP. The buffer is one byte more, to notice.
const UDP_ANSWER_BUFFER: usize = 4096;
/// UDP forwards waiting on upstreams at once. Each holds a socket and a
/// 4 KiB buffer for at most 2 s per upstream; 256 of them serve over
/// 100 forwards/s even from a slow upstream. Past it, queries are dropped
/// (and counted): the client retries.
const MAX_UDP_FORWARDS: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("cannot serve DNS on {transport} {SERVICE_ADDRESS}:53: {source}")]
pub struct DnsError {
    transport: &'static str,
    source: std::io::Error,
}

/// What was refused or ignored: in the debug log and `meshctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    rate_limited: AtomicU64,
    forwards_busy: AtomicU64,
    tcp_refused: AtomicU64,
    upstream_mismatch: AtomicU64,
    /// Queries by how they were answered (for metrics).
    local: AtomicU64,
    cached: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    ignored: AtomicU64,
}

impl Counters {
    /// The counters that are not zero, by the name `meshctl status` shows.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [
            ("dns_rate_limited", &self.rate_limited),
            ("dns_forwards_busy", &self.forwards_busy),
            ("dns_tcp_refused", &self.tcp_refused),
            ("dns_upstream_mismatch", &self.upstream_mismatch),
        ]
        .into_iter()
        .map(|(name, c)| (name, c.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
    }

    /// Queries by result, every result (zeros too): answered from the
    /// cluster's zone, from the cache, by an upstream, SERVFAIL, ignored
    /// (not a query), refused for the rate limit or a full forward queue.
    pub fn results(&self) -> [(&'static str, u64); 7] {
        [
            ("local", &self.local),
            ("cached", &self.cached),
            ("forwarded", &self.forwarded),
            ("servfail", &self.failed),
            ("ignored", &self.ignored),
            ("rate_limited", &self.rate_limited),
            ("forwards_busy", &self.forwards_busy),
        ]
        .map(|(name, c)| (name, c.load(Ordering::Relaxed)))
    }

    fn count(counter: &AtomicU64, what: &str) {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(total = n, "dns: {what}");
    }
}

struct Shared {
    zone: watch::Receiver<Arc<Zone>>,
    /// Changed by a reload.
    upstreams: watch::Receiver<Vec<SocketAddr>>,
    subnet: Ipv4Net,
    /// The host's own addresses: clients from them are local processes.
    local: [IpAddr; 2],
    cache: Mutex<Cache>,
    limit: Mutex<RateLimit>,
    tcp: Mutex<TcpSlots>,
    forwards: Arc<Semaphore>,
    rotation: AtomicUsize,
    counters: Arc<Counters>,
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

/// Binds the UDP and TCP sockets (either failing is an error: the caller
/// stops the agent) and serves until the runtime stops. `upstreams` is
/// read at each forward, so a reload applies to the next query.
pub async fn serve(
    zone: watch::Receiver<Arc<Zone>>,
    upstreams: watch::Receiver<Vec<SocketAddr>>,
    subnet: Ipv4Net,
) -> Result<Arc<Counters>, DnsError> {
    let at = SocketAddr::new(SERVICE_ADDRESS.into(), 53);
    let udp = UdpSocket::bind(at).await.map_err(|source| DnsError {
        transport: "UDP",
        source,
    })?;
    let tcp = TcpListener::bind(at).await.map_err(|source| DnsError {
        transport: "TCP",
        source,
    })?;
    if upstreams.borrow().is_empty() {
        tracing::warn!("no upstream DNS servers: names outside the cluster get SERVFAIL");
    }
    let shared = Arc::new(Shared {
        zone,
        upstreams,
        subnet,
        local: [
            SERVICE_ADDRESS.into(),
            membership::host_address(subnet).into(),
        ],
        cache: Mutex::new(Cache::default()),
        limit: Mutex::new(RateLimit::default()),
        tcp: Mutex::new(TcpSlots::default()),
        forwards: Arc::new(Semaphore::new(MAX_UDP_FORWARDS)),
        rotation: AtomicUsize::new(0),
        counters: Arc::default(),
    });
    let counters = shared.counters.clone();
    tokio::spawn(serve_tcp(tcp, shared.clone()));
    tokio::spawn(serve_udp(Arc::new(udp), shared));
    Ok(counters)
}

/// What to do with one query.
enum Step {
    Reply(Vec<u8>),
    Forward(Query),
    Drop,
}

impl Shared {
    /// Only this host's own addresses are clients.
    fn is_local_client(&self, from: SocketAddr) -> bool {
        match from.ip() {
            IpAddr::V4(ip) => self.subnet.contains(&ip) || ip == SERVICE_ADDRESS,
            IpAddr::V6(_) => false,
        }
    }

    /// Within its rate (and takes a token).
    fn within_rate(&self, client: Client) -> bool {
        let allowed = self
            .limit
            .lock()
            .is_ok_and(|mut l| l.allow(client, Instant::now()));
        if !allowed {
            Counters::count(&self.counters.rate_limited, "query over the rate limit");
        }
        allowed
    }

    /// Answers from the zone or the cache, or says what to forward.
    fn decide(&self, bytes: &[u8], transport: Transport) -> Step {
        let zone = self.zone.borrow().clone();
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let counters = &self.counters;
        match answer::answer(&zone, bytes, transport, rotation) {
            Decision::Reply(reply) => {
                counters.local.fetch_add(1, Ordering::Relaxed);
                return Step::Reply(reply);
            }
            Decision::Drop => {
                counters.ignored.fetch_add(1, Ordering::Relaxed);
                return Step::Drop;
            }
            Decision::Forward { .. } => {}
        }
        let Ok(query) = Query::parse(bytes) else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return answer::server_failure(bytes, transport).map_or(Step::Drop, Step::Reply);
        };
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(query.key(), Instant::now()));
        match cached {
            Some(hit) => {
                counters.cached.fetch_add(1, Ordering::Relaxed);
                Step::Reply(for_transport(query.for_client(&hit), transport))
            }
            None => Step::Forward(query),
        }
    }

    /// Asks the upstreams in turn; the answer as the client must see it,
    /// or SERVFAIL when none gave one.
    async fn forward(&self, query: &Query, transport: Transport) -> Option<Vec<u8>> {
        let upstreams: Vec<SocketAddr> = self
            .upstreams
            .borrow()
            .iter()
            .copied()
            .filter(|u| u.ip() != IpAddr::V4(SERVICE_ADDRESS))
            .collect();
        for upstream in &upstreams {
            let reply = match self.ask_udp(query, *upstream).await {
                Upstream::Answer(reply) => Some(reply),
                Upstream::RetryTcp => self.ask_tcp(query, *upstream).await,
                Upstream::Failed => None,
            };
            if let Some(reply) = reply {
                if let Ok(mut c) = self.cache.lock() {
                    c.put(query.key(), &reply, Instant::now());
                }
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                return Some(for_transport(query.for_client(&reply), transport));
            }
            tracing::debug!(%upstream, "upstream DNS server gave no answer");
        }
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        answer::server_failure(query.bytes(), transport)
    }

    async fn ask_udp(&self, query: &Query, upstream: SocketAddr) -> Upstream {
        let Some(id) = random_id() else {
            return Upstream::Failed;
        };
        // A new socket per attempt: the kernel picks a random source port.
        let Ok(socket) = UdpSocket::bind(unspecified(upstream)).await else {
            return Upstream::Failed;
        };
        // Connected: the kernel drops datagrams from anyone else.
        if socket.connect(upstream).await.is_err()
            || socket.send(&query.upstream(id)).await.is_err()
        {
            return Upstream::Failed;
        }
        let mut buf = vec![0u8; UDP_ANSWER_BUFFER + 1];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            match query.check(id, &buf[..n], Transport::Udp) {
                Verdict::Match if n > UDP_ANSWER_BUFFER => return Upstream::RetryTcp,
                Verdict::Match => return Upstream::Answer(buf[..n].to_vec()),
                Verdict::RetryTcp => return Upstream::RetryTcp,
                Verdict::Mismatch(why) => {
                    tracing::debug!(%upstream, ?why, "upstream reply ignored");
                    Counters::count(&self.counters.upstream_mismatch, "upstream mismatch");
                }
            }
        }
        Upstream::Failed
    }

    /// The same question over TCP, after a truncated UDP answer.
    async fn ask_tcp(&self, query: &Query, upstream: SocketAddr) -> Option<Vec<u8>> {
        let id = random_id()?;
        let exchange = async {
            let mut stream = TcpStream::connect(upstream).await.ok()?;
            stream.write_all(&framed(&query.upstream(id))?).await.ok()?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.ok()?;
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply).await.ok()?;
            Some(reply)
        };
        let reply = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
            .await
            .ok()??;
        match query.check(id, &reply, Transport::Tcp) {
            Verdict::Match => Some(reply),
            other => {
                tracing::debug!(%upstream, ?other, "upstream TCP reply ignored");
                Counters::count(&self.counters.upstream_mismatch, "upstream mismatch");
                None
            }
        }
    }

    /// The reply for a query over TCP (forwards are bounded by the
    /// connection cap, so they run in the connection's task).
    async fn respond_tcp(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        match self.decide(bytes, Transport::Tcp) {
            Step::Reply(reply) => Some(reply),
            Step::Drop => None,
            Step::Forward(query) => self.forward(&query, Transport::Tcp).await,
        }
    }
}

enum Upstream {
    Answer(Vec<u8>),
    RetryTcp,
    Failed,
}

fn for_transport(reply: Vec<u8>, transport: Transport) -> Vec<u8> {
    match transport {
        Transport::Udp => answer::limit_for_udp(reply),
        Transport::Tcp => reply,
    }
}

/// A random query id, or none if the system cannot give one (then the
/// query fails rather than go out with a guessable id).
fn random_id() -> Option<u16> {
    let mut bytes = [0u8; 2];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(u16::from_be_bytes(bytes))
}

fn unspecified(upstream: SocketAddr) -> SocketAddr {
    match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A DNS message with its TCP length prefix.
fn framed(message: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(message.len()).ok()?;
    let mut out = Vec::with_capacity(message.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Some(out)
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; UDP_QUERY_BUFFER];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if !shared.is_local_client(from) || !shared.within_rate(Client::of(from, &shared.local)) {
            continue;
        }
        let query = match shared.decide(&buf[..n], Transport::Udp) {
            Step::Reply(reply) => {
                let _ = socket.send_to(&reply, from).await;
                continue;
            }
            Step::Drop => continue,
            Step::Forward(query) => query,
        };
        // Forwarding waits on an upstream: never in this loop, and only
        // so many at once.
        let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
            Counters::count(
                &shared.counters.forwards_busy,
                "too many forwards, query dropped",
            );
            continue;
        };
        let (socket, shared) = (socket.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = shared.forward(&query, Transport::Udp).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

/// A TCP connection's slot, given back when the connection ends.
struct Slot {
    shared: Arc<Shared>,
    client: Client,
}

impl Slot {
    fn take(shared: &Arc<Shared>, client: Client) -> Option<Self> {
        let taken = shared.tcp.lock().is_ok_and(|mut s| s.open(client));
        taken.then(|| Self {
            shared: shared.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.shared.tcp.lock() {
            slots.close(self.client);
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(error = %e, "dns: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !shared.is_local_client(from) {
            continue;
        }
        // Over the caps the connection is closed at once (dropped here).
        let Some(slot) = Slot::take(&shared, Client::of(from, &shared.local)) else {
            Counters::count(
                &shared.counters.tcp_refused,
                "TCP connection over the cap closed",
            );
            continue;
        };
        tokio::spawn(async move {
            let _ = serve_tcp_client(stream, &slot).await;
        });
    }
}

async fn serve_tcp_client(mut stream: TcpStream, slot: &Slot) -> std::io::Result<()> {
    let shared = &slot.shared;
    loop {
        let mut len = [0u8; 2];
        let Ok(read) = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await else {
            return Ok(());
        };
        read?;
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if !shared.within_rate(slot.client) {
            return Ok(());
        }
        let Some(reply) = shared.respond_tcp(&query).await.and_then(|r| framed(&r)) else {
            return Ok(());
        };
        tokio::time::timeout(TCP_WRITE_TIMEOUT, stream.write_all(&reply))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
}
