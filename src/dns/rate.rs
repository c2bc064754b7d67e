//! Who may ask the DNS service how much: query rate buckets per real
//! client, and TCP connection slots.
//!
//! A container is one client: its address. The host's own processes (all
//! of them in TUN mode) arrive from host-local addresses, so an address
//! would put every process in one bucket and one of them could starve the
//! rest; there a client is an address and port (one socket), and all
//! host-local sockets together share `LOCAL_QUERIES_PER_SECOND`, so a
//! process that opens a fresh socket per query is still bounded.
//! Must never: do IO, read the clock (time is an argument), or grow
//! without bound.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Queries per second one client may make, with a burst of the same size.
pub const QUERIES_PER_SECOND: f64 = 100.0;
/// Queries per second all host-local sockets together may make: ten busy
/// local resolvers' worth, and the most a local flood costs the agent.
pub const LOCAL_QUERIES_PER_SECOND: f64 = 1000.0;
/// Buckets kept; past that, buckets idle for a second (full again, so
/// nothing is lost by forgetting them) are dropped first.
const MAX_BUCKETS: usize = 10_000;
/// Concurrent TCP connections in total: well above what DNS over TCP needs
/// (truncated answers, zone-sized replies), well below the fd limit.
pub const MAX_TCP_TOTAL: usize = 256;
/// Concurrent TCP connections one container address may hold.
pub const MAX_TCP_PER_CLIENT: usize = 8;
/// Concurrent TCP connections all host-local clients together may hold.
pub const MAX_TCP_LOCAL: usize = 64;

/// One real client, as far as limits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    /// A container (or anything not on this host): its address.
    Remote(IpAddr),
    /// A socket of a process on this host.
    Local(SocketAddr),
}

impl Client {
    /// `from` as a client; `local` are the host's own addresses (the
    /// service address and the host's overlay address).
    pub fn of(from: SocketAddr, local: &[IpAddr]) -> Self {
        if from.ip().is_loopback() || local.contains(&from.ip()) {
            Self::Local(from)
        } else {
            Self::Remote(from.ip())
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Self {
        Self {
            tokens: rate,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
    }
}

/// Token buckets per client, plus the shared one of host-local clients.
#[derive(Debug, Default)]
pub struct RateLimit {
    buckets: HashMap<Client, Bucket>,
    local_total: Option<Bucket>,
}

impl RateLimit {
    /// Whether `client` may ask one more query now (and takes the token).
    pub fn allow(&mut self, client: Client, now: Instant) -> bool {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&client) {
            self.forget_idle(now);
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let own = self
            .buckets
            .entry(client)
            .or_insert(Bucket::full(QUERIES_PER_SECOND, now));
        own.refill(QUERIES_PER_SECOND, now);
        if own.tokens < 1.0 {
            return false;
        }
        if let Client::Local(_) = client {
            let total = self
                .local_total
                .get_or_insert(Bucket::full(LOCAL_QUERIES_PER_SECOND, now));
            total.refill(LOCAL_QUERIES_PER_SECOND, now);
            if total.tokens < 1.0 {
                return false;
            }
            total.tokens -= 1.0;
        }
        if let Some(own) = self.buckets.get_mut(&client) {
            own.tokens -= 1.0;
        }
        true
    }

    fn forget_idle(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(1));
    }
}

/// Open TCP connections per client and in total.
#[derive(Debug, Default)]
pub struct TcpSlots {
    total: usize,
    local: usize,
    per_address: HashMap<IpAddr, usize>,
}

impl TcpSlots {
    /// Takes a slot for a new connection from `client`, or refuses it.
    pub fn open(&mut self, client: Client) -> bool {
        if self.total >= MAX_TCP_TOTAL {
            return false;
        }
        match client {
            Client::Local(_) if self.local >= MAX_TCP_LOCAL => return false,
            Client::Local(_) => self.local += 1,
            Client::Remote(ip) => {
                let n = self.per_address.entry(ip).or_insert(0);
                if *n >= MAX_TCP_PER_CLIENT {
                    return false;
                }
                *n += 1;
            }
        }
        self.total += 1;
        true
    }

    /// Gives back the slot of a connection `open` admitted.
    pub fn close(&mut self, client: Client) {
        let held = match client {
            Client::Local(_) => {
                let held = self.local;
                self.local = held.saturating_sub(1);
                held
            }
            Client::Remote(ip) => {
                let held = self.per_address.get(&ip).copied().unwrap_or(0);
                if held <= 1 {
                    self.per_address.remove(&ip);
                } else {
                    self.per_address.insert(ip, held - 1);
                }
                held
            }
        };
        if held > 0 {
            self.total = self.total.saturating_sub(1);
        }
    }

    pub fn open_connections(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const SERVICE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 250));

    fn remote(ip: &str) -> Client {
        Client::of(SocketAddr::new(ip.parse().unwrap(), 5353), &[SERVICE])
    }

    fn local(port: u16) -> Client {
        Client::of(SocketAddr::new(SERVICE, port), &[SERVICE])
    }

    #[test]
    fn containers_are_limited_separately_and_refill() {
        let mut r = RateLimit::default();
        let t0 = Instant::now();
        let (a, b) = (remote("10.42.1.2"), remote("10.42.1.3"));
        assert_eq!(a, remote("10.42.1.2"), "any port, same client");
        let allowed = (0..150).filter(|_| r.allow(a, t0)).count();
        assert_eq!(allowed, QUERIES_PER_SECOND as usize);
        assert!(r.allow(b, t0), "another client is not punished");
        assert!(r.allow(a, t0 + Duration::from_millis(50)), "tokens refill");
    }

    #[test]
    fn host_local_sockets_are_separate_clients_under_a_total_cap() {
        let mut r = RateLimit::default();
        let t0 = Instant::now();
        let flood = (0..150).filter(|_| r.allow(local(4000), t0)).count();
        assert_eq!(flood, QUERIES_PER_SECOND as usize);
        assert!(r.allow(local(4001), t0), "another local process still asks");
        // Many sockets: together no more than the local total.
        let all = (0..3000).filter(|p| r.allow(local(10_000 + p), t0)).count();
        assert_eq!(all + flood + 1, LOCAL_QUERIES_PER_SECOND as usize);
        assert!(r.allow(remote("10.42.1.9"), t0), "containers are not in it");
    }

    #[test]
    fn the_buckets_stay_bounded() {
        let mut r = RateLimit::default();
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS as u32 + 10) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            r.allow(Client::Remote(ip.into()), t0);
        }
        assert_eq!(r.buckets.len(), MAX_BUCKETS);
        let later = t0 + Duration::from_secs(2);
        assert!(
            r.allow(remote("10.99.0.1"), later),
            "idle ones are forgotten"
        );
        assert!(r.buckets.len() < 10);
    }

    #[test]
    fn tcp_slots_cap_each_client_locals_and_the_total() {
        let mut s = TcpSlots::default();
        let a = remote("10.42.1.2");
        let taken = (0..20).filter(|_| s.open(a)).count();
        assert_eq!(taken, MAX_TCP_PER_CLIENT);
        s.close(a);
        assert!(s.open(a), "a closed slot is free again");
        let locals = (0..100).filter(|p| s.open(local(*p))).count();
        assert_eq!(locals, MAX_TCP_LOCAL);
        let others = (0..=255u8)
            .flat_map(|x| (0..8).map(move |_| x))
            .filter(|x| s.open(remote(&format!("10.42.2.{x}"))))
            .count();
        assert_eq!(others, MAX_TCP_TOTAL - MAX_TCP_PER_CLIENT - MAX_TCP_LOCAL);
        assert_eq!(s.open_connections(), MAX_TCP_TOTAL);
        assert!(!s.open(remote("10.42.3.1")), "total cap");
        for p in 0..100 {
            s.close(local(p));
        }
        s.close(remote("10.42.9.9"));
        assert_eq!(s.open_connections(), MAX_TCP_TOTAL - MAX_TCP_LOCAL);
    }
}
