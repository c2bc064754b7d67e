//! The forwarder's answer cache (per TTL) and the per-client rate limit.
//!
//! Must never: grow without bound, or serve an entry past its TTL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};

/// Entries kept at most; past that the cache is cleared (simple, bounded).
const MAX_ENTRIES: usize = 10_000;
/// Longest an upstream answer is kept, whatever its TTL says.
const MAX_TTL: u32 = 3600;
/// How long a name that does not exist upstream is remembered.
const NEGATIVE_TTL: u32 = 30;

#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<(String, u16), (Vec<u8>, Instant)>,
}

impl Cache {
    /// A cached answer for the key, with the asker's `id` written in.
    pub fn get(&mut self, name: &str, qtype: u16, id: u16, now: Instant) -> Option<Vec<u8>> {
        let key = (name.to_owned(), qtype);
        let (bytes, expires) = self.entries.get(&key)?;
        if now >= *expires {
            self.entries.remove(&key);
            return None;
        }
        let mut bytes = bytes.clone();
        bytes[..2].copy_from_slice(&id.to_be_bytes());
        Some(bytes)
    }

    /// Keeps an upstream answer for its smallest TTL (NXDOMAIN for 30 s);
    /// failures and answers that do not parse are not kept.
    pub fn put(&mut self, name: &str, qtype: u16, response: &[u8], now: Instant) {
        let Ok(message) = Message::from_vec(response) else {
            return;
        };
        let ttl = match message.metadata.response_code {
            ResponseCode::NoError => message
                .answers
                .iter()
                .map(|r| r.ttl)
                .min()
                .unwrap_or(NEGATIVE_TTL),
            ResponseCode::NXDomain => NEGATIVE_TTL,
            _ => return,
        };
        if ttl == 0 || response.len() < 2 {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        let expires = now + Duration::from_secs(ttl.min(MAX_TTL).into());
        self.entries
            .insert((name.to_owned(), qtype), (response.to_vec(), expires));
    }
}

/// Queries per second a client may make, with a burst of the same size.
pub const QUERIES_PER_SECOND: f64 = 100.0;

/// A token bucket per client address.
#[derive(Debug, Default)]
pub struct RateLimit {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimit {
    pub fn allow(&mut self, client: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_ENTRIES {
            self.buckets
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < Duration::from_secs(1));
        }
        let (tokens, at) = self
            .buckets
            .entry(client)
            .or_insert((QUERIES_PER_SECOND, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * QUERIES_PER_SECOND;
        *tokens = (*tokens + refill).min(QUERIES_PER_SECOND);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record};

    use super::*;

    fn response(ttl: u32, code: ResponseCode) -> Vec<u8> {
        let mut m = Message::response(7, hickory_proto::op::OpCode::Query);
        m.metadata.response_code = code;
        if code == ResponseCode::NoError {
            m.answers.push(Record::from_rdata(
                Name::from_ascii("example.com.").unwrap(),
                ttl,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn answers_live_for_their_ttl_and_take_the_askers_id() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put("example.com.", 1, &response(60, ResponseCode::NoError), t0);
        let hit = c
            .get("example.com.", 1, 0xbeef, t0 + Duration::from_secs(59))
            .unwrap();
        assert_eq!(&hit[..2], &[0xbe, 0xef]);
        assert!(c.get("example.com.", 28, 1, t0).is_none(), "other type");
        assert!(
            c.get("example.com.", 1, 1, t0 + Duration::from_secs(60))
                .is_none(),
            "expired"
        );
    }

    #[test]
    fn failures_are_not_cached_and_nxdomain_briefly() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put("a.", 1, &response(0, ResponseCode::ServFail), t0);
        assert!(c.get("a.", 1, 1, t0).is_none());
        c.put("b.", 1, &response(0, ResponseCode::NXDomain), t0);
        assert!(c.get("b.", 1, 1, t0 + Duration::from_secs(29)).is_some());
        assert!(c.get("b.", 1, 1, t0 + Duration::from_secs(31)).is_none());
    }

    #[test]
    fn clients_are_limited_separately_and_refill() {
        let mut r = RateLimit::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.42.1.2".parse().unwrap();
        let b: IpAddr = "10.42.1.3".parse().unwrap();
        let allowed = (0..150).filter(|_| r.allow(a, t0)).count();
        assert_eq!(allowed, QUERIES_PER_SECOND as usize);
        assert!(r.allow(b, t0), "another client is not punished");
        assert!(r.allow(a, t0 + Duration::from_millis(50)), "tokens refill");
    }
}
