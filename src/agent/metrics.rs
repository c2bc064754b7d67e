//! Prometheus metrics over HTTP (`metrics_listen`, off by default): a
//! small HTTP/1.1 responder for `GET /metrics`, and the exposition.
//!
//! A scrape asks the packet task for a `MetricsSnapshot` over the control
//! channel, the same way `meshctl status` asks: the packet task copies its
//! counters between two wake-ups (and reads the kernel's drop count for its
//! socket) and goes on; the encoding happens here.
//! The exposition is built with `prometheus-client` and served in the
//! classic text format (version 0.0.4) with each counter's HELP and TYPE
//! under its full `_total` name: Prometheus 2.x's `promtool check metrics`
//! reads that, while it reports "no help text" on the crate's OpenMetrics
//! output, whose HELP/TYPE lines drop the suffix. Must never: hold up the
//! packet task (one bounded request per scrape), serve anything but
//! `/metrics`, or keep a connection past its timeout.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::control_server::ControlRequest;
use crate::control::{MetricsSnapshot, Request, Response};
use crate::core::PeerStatus;

/// How long a client gets to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8192;
/// The classic text format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(String, String)>;
/// A per-peer counter: its name, help, and where its value comes from.
type PeerCounter = (&'static str, &'static str, fn(&PeerStatus) -> u64);

/// Binds the metrics listener (at start and on a reload that moves it).
pub async fn bind(at: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(at).await
}

/// Serves scrapes on `listener` (none: serve nothing until a reload sends
/// one). Each new listener sent replaces the old, `None` closes it.
pub fn spawn(
    listener: Option<TcpListener>,
    requests: mpsc::Sender<ControlRequest>,
) -> mpsc::Sender<Option<TcpListener>> {
    let (tx, mut rx) = mpsc::channel::<Option<TcpListener>>(1);
    tokio::spawn(async move {
        let mut listener = listener;
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(next) => listener = next,
                    None => return,
                },
                accepted = accept(listener.as_ref()) => {
                    let Ok((stream, _)) = accepted else {
                        // Out of descriptors, say: back off, don't spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, requests).await {
                            tracing::debug!(error = %e, "metrics connection failed");
                        }
                    });
                }
            }
        }
    });
    tx
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn answer(
    mut stream: TcpStream,
    requests: mpsc::Sender<ControlRequest>,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(CLIENT_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let response = match route(&head) {
        Route::Metrics => match snapshot(&requests).await {
            Some(s) => http(200, "OK", CONTENT_TYPE, &render(&s)),
            None => http(503, "Service Unavailable", "text/plain", "agent busy\n"),
        },
        Route::NotFound => http(404, "Not Found", "text/plain", "only /metrics\n"),
        Route::BadMethod => http(405, "Method Not Allowed", "text/plain", "GET only\n"),
    };
    tokio::time::timeout(CLIENT_TIMEOUT, stream.write_all(response.as_bytes()))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    stream.shutdown().await
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
}

fn route(head: &str) -> Route {
    let mut words = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", _) => Route::NotFound,
        _ => Route::BadMethod,
    }
}

fn http(code: u16, reason: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn snapshot(requests: &mpsc::Sender<ControlRequest>) -> Option<MetricsSnapshot> {
    let (tx, rx) = oneshot::channel();
    requests.send((Request::Metrics, tx)).await.ok()?;
    match tokio::time::timeout(CLIENT_TIMEOUT, rx).await {
        Ok(Ok(Response::Metrics(s))) => Some(s),
        _ => None,
    }
}

/// The exposition of one snapshot, in the classic text format.
pub fn render(s: &MetricsSnapshot) -> String {
    let mut registry = Registry::with_prefix("meshnet");
    register_peers(&mut registry, s);
    let labelled = |key: &str, pairs: &mut dyn Iterator<Item = (String, u64)>| {
        let family = Family::<Labels, Counter>::default();
        for (value, n) in pairs {
            family
                .get_or_create(&vec![(key.to_owned(), value)])
                .inc_by(n);
        }
        family
    };
    let drops = labelled("reason", &mut s.drops.iter().map(|(r, n)| (r.clone(), *n)));
    registry.register("dropped_packets", "Packets dropped, by reason", drops);
    let dns = labelled(
        "result",
        &mut s.dns_queries.iter().map(|(r, n)| (r.clone(), *n)),
    );
    registry.register(
        "dns_queries",
        "DNS queries to the service address, by result",
        dns,
    );
    // Series appear with the first drop: a label set per rule cannot be
    // known before.
    let policy = Family::<Labels, Counter>::default();
    for d in &s.policy_drops {
        let labels = vec![
            ("direction".to_owned(), d.direction.clone()),
            ("tier".to_owned(), d.tier.clone()),
            ("rule".to_owned(), d.rule.clone()),
        ];
        policy.get_or_create(&labels).inc_by(d.count);
    }
    if !s.policy_drops.is_empty() {
        registry.register(
            "policy_dropped_packets",
            "Packets the network policy dropped, by direction, tier and rule",
            policy,
        );
    }
    if let Some(n) = s.arp_replies {
        let arp: Counter = Counter::default();
        arp.inc_by(n);
        registry.register("arp_replies", "ARP requests answered (TAP mode)", arp);
    }
    if let Some(n) = s.containers {
        let gauge: Gauge = Gauge::default();
        gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        registry.register("containers", "Containers attached on this host", gauge);
    }
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
        .set(1);
    registry.register("build_info", "meshd's version; always 1", build);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode_registry(&mut text, &registry);
    classic(&text)
}

fn register_peers(registry: &mut Registry, s: &MetricsSnapshot) {
    let counters: [PeerCounter; 7] = [
        (
            "peer_received_bytes",
            "Inner bytes opened from the peer, with their padding",
            |p| p.rx_bytes,
        ),
        (
            "peer_sent_bytes",
            "Inner bytes sealed for the peer, with their padding",
            |p| p.tx_bytes,
        ),
        (
            "peer_received_packets",
            "Inner packets received from the peer",
            |p| p.rx_packets,
        ),
        ("peer_sent_packets", "Inner packets sent to the peer", |p| {
            p.tx_packets
        }),
        (
            "peer_dropped_packets",
            "Packets from or for the peer that were dropped",
            |p| p.dropped,
        ),
        (
            "peer_handshakes",
            "Handshakes that gave the peer a session",
            |p| p.handshakes,
        ),
        (
            "peer_handshake_failures",
            "Handshakes given up or not authenticated",
            |p| p.handshake_failures,
        ),
    ];
    for (name, help, value) in counters {
        let family = Family::<Labels, Counter>::default();
        for p in &s.peers {
            family.get_or_create(&peer_label(p)).inc_by(value(p));
        }
        registry.register(name, help, family);
    }
    let age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let state = Family::<Labels, Gauge>::default();
    for p in &s.peers {
        if let Some(secs) = p.last_handshake_secs_ago {
            age.get_or_create(&peer_label(p)).set(secs as f64);
        }
        for st in ["up", "connecting", "down"] {
            let mut labels = peer_label(p);
            labels.push(("state".into(), st.into()));
            state
                .get_or_create(&labels)
                .set(i64::from(p.state.as_str() == st));
        }
    }
    registry.register(
        "peer_last_handshake_age_seconds",
        "Seconds since the peer's last handshake (absent: never)",
        age,
    );
    registry.register("peer_state", "1 for the state the tunnel is in", state);
}

fn peer_label(p: &PeerStatus) -> Labels {
    vec![("peer".into(), p.name.clone())]
}

/// Turns the crate's OpenMetrics text into the classic format: counters'
/// HELP and TYPE carry the `_total` their samples have, and no `# EOF`.
fn classic(openmetrics: &str) -> String {
    let lines: Vec<&str> = openmetrics.lines().collect();
    let mut out = String::with_capacity(openmetrics.len() + 256);
    for (i, line) in lines.iter().enumerate() {
        let next = lines.get(i + 1).copied().unwrap_or("");
        let counter_help = line.starts_with("# HELP ") && type_is_counter(next);
        let line = if counter_help || (line.starts_with("# TYPE ") && type_is_counter(line)) {
            with_total(line)
        } else if *line == "# EOF" {
            continue;
        } else {
            (*line).to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn type_is_counter(line: &str) -> bool {
    line.starts_with("# TYPE ") && line.ends_with(" counter")
}

/// `# HELP name text` -> `# HELP name_total text` (the same for TYPE).
fn with_total(line: &str) -> String {
    let mut parts = line.splitn(4, ' ');
    let (hash, kind, name, rest) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    format!("{hash} {kind} {name}_total {rest}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use super::*;
    use crate::core::PeerState;
    use crate::keys::PublicKey;

    fn snapshot() -> MetricsSnapshot {
        let peer = PeerStatus {
            name: "h2".into(),
            public_key: PublicKey::from([7; 32]),
            endpoint: None,
            subnet: "10.42.2.0/24".parse().unwrap(),
            state: PeerState::Connecting,
            last_handshake_secs_ago: Some(12),
            rx_bytes: 2048,
            tx_bytes: 4096,
            rx_packets: 3,
            tx_packets: 5,
            dropped: 1,
            keepalive: None,
            handshakes: 2,
            handshake_failures: 1,
            reason: None,
            has_preshared_key: false,
        };
        MetricsSnapshot {
            peers: vec![peer],
            drops: BTreeMap::from([("no_route".into(), 4), ("rejected".into(), 0)]),
            arp_replies: Some(9),
            dns_queries: BTreeMap::from([("local".into(), 6)]),
            containers: Some(2),
            policy_drops: vec![crate::control::PolicyDropCount {
                direction: "ingress".into(),
                tier: "rule".into(),
                rule: "no-ssh".into(),
                count: 3,
            }],
        }
    }

    #[test]
    fn counters_have_full_names_in_help_type_and_samples() {
        let text = render(&snapshot());
        for line in [
            "# HELP meshnet_peer_received_bytes_total Inner bytes opened from the peer, with their padding.",
            "# TYPE meshnet_peer_received_bytes_total counter",
            "meshnet_peer_received_bytes_total{peer=\"h2\"} 2048",
            "meshnet_peer_sent_packets_total{peer=\"h2\"} 5",
            "meshnet_peer_handshakes_total{peer=\"h2\"} 2",
            "meshnet_peer_handshake_failures_total{peer=\"h2\"} 1",
            "meshnet_peer_last_handshake_age_seconds{peer=\"h2\"} 12.0",
            "meshnet_peer_state{peer=\"h2\",state=\"connecting\"} 1",
            "meshnet_peer_state{peer=\"h2\",state=\"up\"} 0",
            "meshnet_dropped_packets_total{reason=\"no_route\"} 4",
            "meshnet_dropped_packets_total{reason=\"rejected\"} 0",
            "meshnet_dns_queries_total{result=\"local\"} 6",
            "# TYPE meshnet_arp_replies_total counter",
            "meshnet_arp_replies_total 9",
            "# TYPE meshnet_containers gauge",
            "meshnet_containers 2",
            "meshnet_build_info{version=\"0.1.0\"} 1",
            "meshnet_policy_dropped_packets_total{direction=\"ingress\",tier=\"rule\",rule=\"no-ssh\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        // Every HELP and TYPE names a metric that has samples by that name.
        for l in text.lines().filter(|l| l.starts_with('#')) {
            let name = l.split(' ').nth(2).unwrap();
            assert!(
                text.lines()
                    .any(|s| !s.starts_with('#') && s.starts_with(name)),
                "{l}"
            );
        }
    }

    #[test]
    fn tun_mode_has_no_arp_or_container_series() {
        let mut s = snapshot();
        s.arp_replies = None;
        s.containers = None;
        let text = render(&s);
        assert!(!text.contains("arp_replies") && !text.contains("meshnet_containers"));
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(""), Route::BadMethod);
    }
}
