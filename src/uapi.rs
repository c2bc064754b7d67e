//! The WireGuard cross-platform userspace API (UAPI), read side: what
//! `wg show` asks a userspace implementation over
//! `/var/run/wireguard/<device>.sock`, and the `wg show dump` text format.
//!
//! Pure formatting of the agent's status. Must never: include a private or
//! preshared key; `wg show` then prints the interface without its keys, and
//! `meshctl status` shows the public key.

use std::fmt::Write;
use std::time::Duration;

use crate::control::HostStatus;
use crate::core::PeerStatus;
use crate::keys::PublicKey;

/// What a UAPI client asked, from the first line it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UapiRequest {
    Get,
    /// Refused: the config file is the source of truth.
    Set,
    /// Anything else is not answered at all.
    Unknown,
}

pub fn parse_request(first_line: &str) -> UapiRequest {
    match first_line.trim_end_matches(['\r', '\n']) {
        "get=1" => UapiRequest::Get,
        "set=1" => UapiRequest::Set,
        _ => UapiRequest::Unknown,
    }
}

/// The answer to `get=1`: `key=value` lines, one block per peer, then
/// `errno=0` and an empty line.
pub fn get_response(host: &HostStatus, peers: &[PeerStatus], now_unix: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "listen_port={}", host.listen.port());
    for p in peers {
        let _ = writeln!(s, "public_key={}", hex(&p.public_key));
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let (secs, nanos) = handshake_time(p, now_unix);
        let _ = writeln!(s, "last_handshake_time_sec={secs}");
        let _ = writeln!(s, "last_handshake_time_nsec={nanos}");
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.keepalive.unwrap_or(0)
        );
        let _ = writeln!(s, "allowed_ip={}", p.subnet);
    }
    s.push_str("errno=0\n\n");
    s
}

/// The answer to a request this read-only API does not serve (`set=1`).
pub const NOT_SUPPORTED: &str = "errno=1\n\n";

/// `wg show <device> dump`: the interface line (private key, public key,
/// listen port, fwmark), then one tab-separated line per peer (public key,
/// preshared key, endpoint, allowed ips, latest handshake, rx, tx,
/// keepalive). Secret columns say `(hidden)` when set, `(none)` when not.
pub fn dump(host: &HostStatus, peers: &[PeerStatus], now_unix: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "(hidden)\t{}\t{}\toff",
        host.public_key,
        host.listen.port()
    );
    for p in peers {
        let psk = if p.has_preshared_key {
            "(hidden)"
        } else {
            "(none)"
        };
        let endpoint = p
            .endpoint
            .map_or_else(|| "(none)".to_owned(), |e| e.to_string());
        let keepalive = p
            .keepalive
            .map_or_else(|| "off".to_owned(), |k| k.to_string());
        let (latest, _) = handshake_time(p, now_unix);
        let _ = writeln!(
            s,
            "{}\t{psk}\t{endpoint}\t{}\t{latest}\t{}\t{}\t{keepalive}",
            p.public_key, p.subnet, p.rx_bytes, p.tx_bytes
        );
    }
    s
}

/// Latest handshake as Unix time (0, 0 when never).
fn handshake_time(p: &PeerStatus, now_unix: Duration) -> (u64, u32) {
    match p.last_handshake_secs_ago {
        Some(ago) => {
            let at = now_unix.saturating_sub(Duration::from_secs(ago));
            (at.as_secs(), 0)
        }
        None => (0, 0),
    }
}

fn hex(key: &PublicKey) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::PeerState;
    use crate::keys::PrivateKey;

    fn host() -> HostStatus {
        HostStatus {
            name: "h1".into(),
            public_key: PrivateKey::generate().unwrap().public_key(),
            listen: "0.0.0.0:51820".parse().unwrap(),
            mode: "tun".into(),
            device: "mesh0".into(),
            bridge: None,
            agent_mac: None,
            containers: None,
            mtu: 1420,
            address: "10.42.1.1".parse().unwrap(),
            subnet: "10.42.1.0/24".parse().unwrap(),
            overlay: "10.42.0.0/16".parse().unwrap(),
            uptime_secs: 5,
            peers: 1,
            peers_up: 1,
            peers_connecting: 0,
            peers_down: 0,
            dropped: Default::default(),
        }
    }

    fn peer(handshake: Option<u64>) -> PeerStatus {
        PeerStatus {
            name: "h2".into(),
            public_key: PublicKey::from([0xab; 32]),
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            subnet: "10.42.2.0/24".parse().unwrap(),
            state: PeerState::Up,
            last_handshake_secs_ago: handshake,
            rx_bytes: 10,
            tx_bytes: 20,
            rx_packets: 1,
            tx_packets: 2,
            dropped: 0,
            keepalive: Some(25),
            handshakes: 1,
            handshake_failures: 0,
            reason: None,
            has_preshared_key: true,
        }
    }

    #[test]
    fn get_lists_every_peer_field_wg_reads_and_no_secret() {
        let now = Duration::from_secs(1_000_000);
        let text = get_response(&host(), &[peer(Some(12))], now);
        for line in [
            "listen_port=51820",
            &format!("public_key={}", "ab".repeat(32)),
            "protocol_version=1",
            "endpoint=192.0.2.2:51820",
            "last_handshake_time_sec=999988",
            "tx_bytes=20",
            "rx_bytes=10",
            "persistent_keepalive_interval=25",
            "allowed_ip=10.42.2.0/24",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("errno=0\n\n"));
        assert!(!text.contains("private_key") && !text.contains("preshared_key"));
    }

    #[test]
    fn dump_has_wgs_columns() {
        let h = host();
        let text = dump(&h, &[peer(None)], Duration::from_secs(5));
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
        assert_eq!(
            lines[0],
            vec!["(hidden)", &h.public_key.to_string(), "51820", "off"]
        );
        let key = PublicKey::from([0xab; 32]).to_string();
        assert_eq!(
            lines[1],
            vec![
                key.as_str(),
                "(hidden)",
                "192.0.2.2:51820",
                "10.42.2.0/24",
                "0",
                "10",
                "20",
                "25"
            ]
        );
    }
}
