//! Human-readable output for `meshctl`, in the manner of `wg show`.
//!
//! Pure formatting of control-protocol values. Must never: reach the agent
//! or print anything itself.

use std::fmt::Write;

use crate::control::HostStatus;
use crate::core::PeerStatus;
use crate::core::ipam::Container;

/// "12 seconds ago", "1 minute, 5 seconds ago", "never".
pub fn ago(secs: Option<u64>) -> String {
    let Some(secs) = secs else {
        return "never".to_owned();
    };
    if secs == 0 {
        return "just now".to_owned();
    }
    format!("{} ago", duration(secs))
}

/// "3 days, 1 hour, 2 seconds"; zero units are left out.
pub fn duration(secs: u64) -> String {
    let units = [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ];
    let mut left = secs;
    let mut parts = Vec::new();
    for (name, size) in units {
        let n = left / size;
        left %= size;
        if n > 0 {
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        }
    }
    if parts.is_empty() {
        return "0 seconds".to_owned();
    }
    parts.join(", ")
}

/// Bytes in binary units as `wg` prints them: "1.50 KiB", "12 B".
pub fn bytes(n: u64) -> String {
    let units = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = units[0];
    for next in &units[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.2} {unit}")
}

/// One block per peer, like `wg show`.
pub fn peers(peers: &[PeerStatus]) -> String {
    if peers.is_empty() {
        return "no peers configured\n".to_owned();
    }
    let mut s = String::new();
    for (i, p) in peers.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        let endpoint = p.endpoint.map_or_else(
            || "(none, waiting to be contacted)".to_owned(),
            |e| e.to_string(),
        );
        let _ = writeln!(s, "peer: {}", p.name);
        let _ = writeln!(s, "  public key: {}", p.public_key);
        let _ = writeln!(s, "  endpoint: {endpoint}");
        let _ = writeln!(s, "  subnet: {}", p.subnet);
        let _ = writeln!(s, "  state: {}", p.state.as_str());
        if let Some(reason) = &p.reason {
            let _ = writeln!(s, "  not up because: {reason}");
        }
        let _ = writeln!(s, "  latest handshake: {}", ago(p.last_handshake_secs_ago));
        let _ = writeln!(
            s,
            "  transfer: {} received, {} sent",
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        );
        let _ = writeln!(s, "  packets dropped: {}", p.dropped);
        if let Some(k) = p.keepalive {
            let _ = writeln!(s, "  persistent keepalive: every {}", duration(k.into()));
        }
    }
    s
}

pub fn status(h: &HostStatus) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "host: {}", h.name);
    let _ = writeln!(s, "  public key: {}", h.public_key);
    let _ = writeln!(s, "  listening on: {}", h.listen);
    let _ = writeln!(s, "  device: {} ({} mode, mtu {})", h.device, h.mode, h.mtu);
    if let (Some(bridge), Some(mac)) = (&h.bridge, h.agent_mac) {
        let _ = writeln!(s, "  bridge: {bridge} (agent MAC {mac})");
    }
    let _ = writeln!(s, "  address: {}/{}", h.address, h.overlay.prefix_len());
    let _ = writeln!(s, "  subnet: {} (overlay {})", h.subnet, h.overlay);
    let _ = writeln!(s, "  uptime: {}", duration(h.uptime_secs));
    let _ = writeln!(
        s,
        "  peers: {} ({} up, {} connecting, {} down)",
        h.peers, h.peers_up, h.peers_connecting, h.peers_down
    );
    if let Some(n) = h.containers {
        let _ = writeln!(s, "  containers: {n}");
    }
    if h.dropped.is_empty() {
        let _ = writeln!(s, "  dropped: none");
    } else {
        let list: Vec<String> = h.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "  dropped: {}", list.join(", "));
    }
    s
}

/// One row per DNS record, aligned.
pub fn records(list: &[crate::dns::RecordView]) -> String {
    if list.is_empty() {
        return "no records\n".to_owned();
    }
    let width = list.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut s = String::new();
    for r in list {
        let host = if r.host.is_empty() {
            String::new()
        } else {
            format!("  ({})", r.host)
        };
        let _ = writeln!(s, "{:<width$}  {:<4} {}{host}", r.name, r.kind, r.value);
    }
    s
}

/// One row per container, aligned.
pub fn containers(list: &[Container]) -> String {
    if list.is_empty() {
        return "no containers attached\n".to_owned();
    }
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|c| {
            [
                c.name.clone(),
                c.stack.clone(),
                c.service.clone().unwrap_or_else(|| "-".into()),
                c.address.to_string(),
                c.mac.to_string(),
                c.netns.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "STACK", "SERVICE", "ADDRESS", "MAC", "NETNS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut s = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(s, "{}", cells.join("  ").trim_end());
    }
    s
}

/// `meshctl policy test`: the verdict, then why.
pub fn verdict(v: &crate::policy::explain::VerdictView) -> String {
    let mut s = format!("{}: {} -> {} {}\n", v.action, v.from, v.to, v.port);
    let _ = writeln!(s, "  tier:   {}", v.tier);
    if let Some(rule) = &v.rule {
        let _ = writeln!(s, "  rule:   {rule}");
    }
    let _ = writeln!(s, "  reason: {}", v.reason);
    s
}

/// `meshctl drops`: one line per dropped packet, oldest first. With
/// `empty_note`, an empty list says so.
pub fn drops(list: &[crate::policy::explain::DropView], empty_note: bool) -> String {
    if list.is_empty() {
        return if empty_note {
            "no packets dropped by the policy recently\n".to_owned()
        } else {
            String::new()
        };
    }
    let mut s = String::new();
    for d in list {
        let who = match (&d.from, &d.to) {
            (None, None) => String::new(),
            (from, to) => format!(
                "  {} -> {}",
                from.as_deref().unwrap_or("?"),
                to.as_deref().unwrap_or("?")
            ),
        };
        let rule = d
            .rule
            .as_deref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:>8}  {:<7}  {}{who}  [{}{rule}]",
            format!("{:.1}s ago", d.age_ms as f64 / 1000.0),
            d.direction,
            d.flow,
            d.tier
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::PeerState;
    use crate::keys::PrivateKey;

    #[test]
    fn ages_read_like_wg() {
        assert_eq!(ago(None), "never");
        assert_eq!(ago(Some(0)), "just now");
        assert_eq!(ago(Some(1)), "1 second ago");
        assert_eq!(ago(Some(12)), "12 seconds ago");
        assert_eq!(ago(Some(65)), "1 minute, 5 seconds ago");
        assert_eq!(ago(Some(90_061)), "1 day, 1 hour, 1 minute, 1 second ago");
    }

    #[test]
    fn byte_counts_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.00 MiB");
        assert_eq!(bytes(3 << 40), "3.00 TiB");
    }

    #[test]
    fn containers_table_has_a_row_each() {
        use crate::core::ethernet::Mac;
        let addr = std::net::Ipv4Addr::new(10, 42, 1, 2);
        let c = Container {
            name: "web".into(),
            stack: "shop".into(),
            service: None,
            netns: "c1".into(),
            address: addr,
            mac: Mac::of_container(addr),
            host_veth: "mv0a2a0102".into(),
            ports: Vec::new(),
        };
        let text = containers(&[c]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(
            lines[1].contains("web")
                && lines[1].contains("10.42.1.2")
                && lines[1].contains("0a:42:0a:2a:01:02")
        );
        assert_eq!(containers(&[]), "no containers attached\n");
    }

    #[test]
    fn peer_block_shows_every_field() {
        let key = PrivateKey::generate().unwrap().public_key();
        let p = PeerStatus {
            name: "h2".into(),
            public_key: key,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            subnet: "10.42.2.0/24".parse().unwrap(),
            state: PeerState::Up,
            last_handshake_secs_ago: Some(12),
            rx_bytes: 2048,
            tx_bytes: 100,
            rx_packets: 3,
            tx_packets: 1,
            dropped: 4,
            keepalive: Some(25),
            handshakes: 1,
            handshake_failures: 0,
            reason: Some("no handshake answer from 192.0.2.2:51820 yet".into()),
            has_preshared_key: false,
        };
        let text = peers(&[
            p.clone(),
            PeerStatus {
                endpoint: None,
                last_handshake_secs_ago: None,
                ..p
            },
        ]);
        for needle in [
            "peer: h2",
            &format!("public key: {key}"),
            "endpoint: 192.0.2.2:51820",
            "subnet: 10.42.2.0/24",
            "state: up",
            "latest handshake: 12 seconds ago",
            "transfer: 2.00 KiB received, 100 B sent",
            "packets dropped: 4",
            "persistent keepalive: every 25 seconds",
            "endpoint: (none, waiting to be contacted)",
            "not up because: no handshake answer from 192.0.2.2:51820 yet",
            "latest handshake: never",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }
}
