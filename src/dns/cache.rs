//! The forwarder's answer cache: upstream answers kept for their TTL,
//! bounded in bytes, least-recently-used evicted first.
//!
//! Keyed on (lowercase wire name, type, class). A client asking for many
//! new names evicts only the least recently used entries, one at a time,
//! never the whole cache; with the per-client rate limit in front, one
//! client needs minutes of its whole budget to push a name everyone else
//! keeps using out. Must never: grow past `MAX_BYTES`, serve an entry past
//! its TTL, or keep a failure or a truncated answer.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};

/// Bytes the cache may hold, counting each answer, its key and
/// `ENTRY_OVERHEAD`. Typical forwarded answers are 60-300 bytes, so this
/// keeps some 15,000-40,000 names: far more than one host's containers
/// resolve within a TTL, and small next to the agent's other memory.
pub const MAX_BYTES: usize = 4 << 20;
/// What one entry costs beyond its bytes: the map slots, the LRU index,
/// the allocations' headers (measured order of magnitude, not exact).
const ENTRY_OVERHEAD: usize = 96;
/// Larger answers are not kept: a few of them would push out hundreds of
/// ordinary ones.
const MAX_ENTRY: usize = MAX_BYTES / 256;
/// Longest an upstream answer is kept, whatever its TTL says.
const MAX_TTL: u32 = 3600;
/// How long a name that does not exist upstream is remembered.
const NEGATIVE_TTL: u32 = 30;

/// What an answer is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The name in wire format (length-prefixed labels), ASCII lowercase.
    pub name: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
}

#[derive(Debug)]
struct Entry {
    bytes: Vec<u8>,
    expires: Instant,
    /// Position in `Cache::order`.
    used: u64,
}

#[derive(Debug, Default)]
pub struct Cache {
    entries: HashMap<Key, Entry>,
    /// Use stamps, oldest first: the eviction order.
    order: BTreeMap<u64, Key>,
    clock: u64,
    bytes: usize,
}

impl Cache {
    /// The cached answer for `key`, as the upstream sent it (the caller
    /// writes the asker's id in); marks it as recently used.
    pub fn get(&mut self, key: &Key, now: Instant) -> Option<Vec<u8>> {
        let entry = self.entries.get(key)?;
        if now >= entry.expires {
            self.remove(key);
            return None;
        }
        self.clock += 1;
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.used);
        entry.used = self.clock;
        self.order.insert(self.clock, key.clone());
        Some(entry.bytes.clone())
    }

    /// Keeps an upstream answer for its smallest TTL (NXDOMAIN for 30 s);
    /// failures, truncated answers and answers that do not parse are not
    /// kept. Evicts the least recently used entries to make room.
    pub fn put(&mut self, key: &Key, response: &[u8], now: Instant) {
        let Some(ttl) = cache_ttl(response) else {
            return;
        };
        let cost = cost(key, response);
        if cost > MAX_ENTRY {
            return;
        }
        self.remove(key);
        while self.bytes + cost > MAX_BYTES {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.remove(&oldest);
        }
        self.clock += 1;
        self.bytes += cost;
        self.order.insert(self.clock, key.clone());
        let expires = now + Duration::from_secs(ttl.min(MAX_TTL).into());
        let entry = Entry {
            bytes: response.to_vec(),
            expires,
            used: self.clock,
        };
        self.entries.insert(key.clone(), entry);
    }

    /// Bytes held, as counted against `MAX_BYTES`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&entry.used);
            self.bytes -= cost(key, &entry.bytes);
        }
    }
}

fn cost(key: &Key, response: &[u8]) -> usize {
    response.len() + key.name.len() + ENTRY_OVERHEAD
}

/// How long an answer may be kept, if at all.
fn cache_ttl(response: &[u8]) -> Option<u32> {
    let message = Message::from_vec(response).ok()?;
    if message.metadata.truncation {
        return None;
    }
    let ttl = match message.metadata.response_code {
        ResponseCode::NoError => message
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .unwrap_or(NEGATIVE_TTL),
        ResponseCode::NXDomain => NEGATIVE_TTL,
        _ => return None,
    };
    (ttl > 0).then_some(ttl)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

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

    fn key(name: &str, qtype: u16) -> Key {
        Key {
            name: name.as_bytes().to_vec(),
            qtype,
            qclass: 1,
        }
    }

    #[test]
    fn answers_live_for_their_ttl() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put(
            &key("example.com", 1),
            &response(60, ResponseCode::NoError),
            t0,
        );
        let hit = c.get(&key("example.com", 1), t0 + Duration::from_secs(59));
        assert_eq!(hit, Some(response(60, ResponseCode::NoError)));
        assert!(c.get(&key("example.com", 28), t0).is_none(), "other type");
        assert!(
            c.get(&key("example.com", 1), t0 + Duration::from_secs(60))
                .is_none(),
            "expired"
        );
        assert_eq!((c.len(), c.bytes()), (0, 0), "expired entries are freed");
    }

    #[test]
    fn the_class_is_part_of_the_key() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put(
            &key("version.bind", 16),
            &response(60, ResponseCode::NoError),
            t0,
        );
        let chaos = Key {
            qclass: 3,
            ..key("version.bind", 16)
        };
        assert!(c.get(&chaos, t0).is_none());
        assert!(c.get(&key("version.bind", 16), t0).is_some());
    }

    #[test]
    fn failures_and_truncated_answers_are_not_cached_and_nxdomain_briefly() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        c.put(&key("a", 1), &response(0, ResponseCode::ServFail), t0);
        assert!(c.get(&key("a", 1), t0).is_none());
        let mut tc = Message::from_vec(&response(60, ResponseCode::NoError)).unwrap();
        tc.metadata.truncation = true;
        c.put(&key("t", 1), &tc.to_vec().unwrap(), t0);
        assert!(c.get(&key("t", 1), t0).is_none());
        c.put(&key("b", 1), &response(0, ResponseCode::NXDomain), t0);
        assert!(c.get(&key("b", 1), t0 + Duration::from_secs(29)).is_some());
        assert!(c.get(&key("b", 1), t0 + Duration::from_secs(31)).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        let answer = response(600, ResponseCode::NoError);
        let per = cost(&key("name-00000000", 1), &answer);
        let fits = MAX_BYTES / per;
        for i in 0..fits + 1000 {
            c.put(&key(&format!("name-{i:08}"), 1), &answer, t0);
            assert!(c.bytes() <= MAX_BYTES);
        }
        assert_eq!(c.len(), fits, "full, not cleared");
        assert_eq!(c.bytes(), fits * per);
        assert!(c.get(&key("name-00000000", 1), t0).is_none(), "oldest gone");
        let newest = format!("name-{:08}", fits + 999);
        assert!(c.get(&key(&newest, 1), t0).is_some());
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        let answer = response(600, ResponseCode::NoError);
        let per = cost(&key("name-00000000", 1), &answer);
        let fits = MAX_BYTES / per;
        for i in 0..fits {
            c.put(&key(&format!("name-{i:08}"), 1), &answer, t0);
        }
        // The first name is used again, so the second is now the oldest.
        assert!(c.get(&key("name-00000000", 1), t0).is_some());
        c.put(&key("newcomer-000", 1), &answer, t0);
        assert!(c.get(&key("name-00000000", 1), t0).is_some(), "kept: used");
        assert!(c.get(&key("name-00000001", 1), t0).is_none(), "evicted");
        assert_eq!(c.len(), fits);
    }

    #[test]
    fn a_replaced_entry_is_counted_once_and_huge_answers_are_skipped() {
        let mut c = Cache::default();
        let t0 = Instant::now();
        let answer = response(600, ResponseCode::NoError);
        c.put(&key("a", 1), &answer, t0);
        c.put(&key("a", 1), &answer, t0);
        assert_eq!(c.bytes(), cost(&key("a", 1), &answer));
        let mut big = Message::from_vec(&answer).unwrap();
        for i in 0..2000u32 {
            big.answers.push(Record::from_rdata(
                Name::from_ascii("example.com.").unwrap(),
                60,
                RData::A(A::from(std::net::Ipv4Addr::from(i))),
            ));
        }
        c.put(&key("big", 1), &big.to_vec().unwrap(), t0);
        assert!(c.get(&key("big", 1), t0).is_none());
    }
}
