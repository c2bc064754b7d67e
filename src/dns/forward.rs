//! Forwarding a query upstream, pure parts: the upstream query with a fresh
//! id, whether an upstream reply answers it, and the reply as the client
//! must see it.
//!
//! The forwarder is transparent: flags, EDNS options and records go through
//! as the client and the upstream wrote them; only the id (and, on the way
//! back, the case of the question name) is rewritten. That is why this is
//! hand-written rather than hickory's resolver or server crates: the
//! resolver re-creates queries and answers from its own parsed records
//! (dropping options it does not model, re-deciding EDNS and DNSSEC bits,
//! caching by its own rules) and the server would own the sockets the
//! agent must bound and rate-limit itself. The matching rules here are
//! those a stub must apply anyway (RFC 5452 section 9.1).
//!
//! Must never: do IO or read the clock, accept a reply whose id, question
//! name (case-insensitively), type or class differ from the query's, or
//! panic on any bytes.

use super::answer::Transport;
use super::cache::Key;

/// Bytes of the fixed header.
const HEADER: usize = 12;
/// Longest name in wire format (RFC 1035 section 2.3.4).
const MAX_NAME: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("the query has no single well-formed question")]
    Question,
}

/// Why an upstream datagram was not taken as the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// Shorter than a header and question.
    Malformed,
    /// QR is not set: not a response.
    NotResponse,
    /// Another id: stray, late or spoofed.
    Id,
    /// Not exactly one question.
    QuestionCount,
    /// The question differs in name, type or class.
    Question,
}

/// What to do with one datagram from the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The answer: cache it and give the client `Query::for_client` of it.
    Match,
    /// The upstream truncated its UDP answer: ask it again over TCP.
    RetryTcp,
    /// Not the answer: ignore it and keep waiting.
    Mismatch(Mismatch),
}

/// A client's query on its way upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// As the client sent it.
    bytes: Vec<u8>,
    /// Where the question (name, type, class) ends in `bytes`.
    question_end: usize,
    key: Key,
}

impl Query {
    /// Reads the question of a client's query (the caller has already
    /// decided that it is a standard query for a name that is not ours).
    pub fn parse(bytes: &[u8]) -> Result<Self, ForwardError> {
        if bytes.len() < HEADER || qdcount(bytes) != 1 {
            return Err(ForwardError::Question);
        }
        let question = Question::parse(bytes).ok_or(ForwardError::Question)?;
        Ok(Self {
            bytes: bytes.to_vec(),
            question_end: question.end,
            key: question.key(bytes),
        })
    }

    /// The cache key: lowercase name, type and class.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The query as the client sent it.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The id the client chose.
    pub fn client_id(&self) -> u16 {
        u16::from_be_bytes([self.bytes[0], self.bytes[1]])
    }

    /// The client's query with `id` in place of the client's own id; `id`
    /// must be fresh and random for every upstream attempt.
    pub fn upstream(&self, id: u16) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        bytes[..2].copy_from_slice(&id.to_be_bytes());
        bytes
    }

    /// Whether `reply`, received over `transport`, answers the upstream
    /// query that carried `id`.
    pub fn check(&self, id: u16, reply: &[u8], transport: Transport) -> Verdict {
        match self.mismatch(id, reply) {
            Some(m) => Verdict::Mismatch(m),
            None if transport == Transport::Udp && reply[2] & FLAG_TC != 0 => Verdict::RetryTcp,
            None => Verdict::Match,
        }
    }

    fn mismatch(&self, id: u16, reply: &[u8]) -> Option<Mismatch> {
        if reply.len() < self.question_end {
            return Some(Mismatch::Malformed);
        }
        if reply[..2] != id.to_be_bytes() {
            return Some(Mismatch::Id);
        }
        if reply[2] & FLAG_QR == 0 {
            return Some(Mismatch::NotResponse);
        }
        if qdcount(reply) != 1 {
            return Some(Mismatch::QuestionCount);
        }
        // Same length, so the question sits at the same offsets; names
        // compare ignoring ASCII case (label lengths are below 64, so they
        // are never letters).
        let ours = &self.bytes[HEADER..self.question_end];
        let theirs = &reply[HEADER..self.question_end];
        if !ours.eq_ignore_ascii_case(theirs) {
            return Some(Mismatch::Question);
        }
        None
    }

    /// A matched (or cached) reply as this client must see it: its own id,
    /// and its question name in its own case (clients that randomise the
    /// case, "0x20", check it).
    pub fn for_client(&self, reply: &[u8]) -> Vec<u8> {
        let mut out = reply.to_vec();
        if out.len() >= self.question_end {
            out[..2].copy_from_slice(&self.bytes[..2]);
            out[HEADER..self.question_end].copy_from_slice(&self.bytes[HEADER..self.question_end]);
        }
        out
    }
}

/// Whether a reply has the truncation flag (it is then not cached).
pub fn is_truncated(reply: &[u8]) -> bool {
    reply.get(2).is_some_and(|b| b & FLAG_TC != 0)
}

const FLAG_QR: u8 = 0x80;
const FLAG_TC: u8 = 0x02;

fn qdcount(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[4], bytes[5]])
}

/// The first question's name, type and class, in wire format.
struct Question {
    name_end: usize,
    end: usize,
}

impl Question {
    /// Reads the question after the header. A compression pointer is
    /// refused: the first name of a message has nothing before it to
    /// point to.
    fn parse(bytes: &[u8]) -> Option<Self> {
        let mut at = HEADER;
        loop {
            let len = usize::from(*bytes.get(at)?);
            if len & 0xc0 != 0 {
                return None;
            }
            at += 1 + len;
            if at - HEADER > MAX_NAME {
                return None;
            }
            if len == 0 {
                break;
            }
        }
        let end = at + 4;
        (end <= bytes.len()).then_some(Self { name_end: at, end })
    }

    fn key(&self, bytes: &[u8]) -> Key {
        let field = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        Key {
            name: bytes[HEADER..self.name_end].to_ascii_lowercase(),
            qtype: field(self.name_end),
            qclass: field(self.name_end + 2),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use hickory_proto::op::{Message, MessageType, Query as HQuery};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

    use super::*;
    use crate::dns::answer::query_message;

    /// A client's query; hickory writes names in lowercase, so the
    /// client's case is put back into the wire bytes by hand.
    fn query(id: u16, name: &str, qtype: RecordType) -> Query {
        let mut bytes = query_message(id, name, qtype).unwrap();
        let wire: Vec<u8> = name
            .trim_end_matches('.')
            .split('.')
            .flat_map(|l| std::iter::once(l.len() as u8).chain(l.bytes()))
            .collect();
        bytes[12..12 + wire.len()].copy_from_slice(&wire);
        Query::parse(&bytes).unwrap()
    }

    /// An upstream's answer to `name`/`qtype`/`class` with `id`.
    fn reply(id: u16, name: &str, qtype: RecordType, class: DNSClass) -> Vec<u8> {
        let mut m = Message::response(id, hickory_proto::op::OpCode::Query);
        let mut q = HQuery::query(Name::from_ascii(name).unwrap(), qtype);
        q.set_query_class(class);
        m.add_query(q);
        m.answers.push(Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn the_upstream_sees_a_fresh_id_and_otherwise_the_clients_bytes() {
        let bytes = query_message(0x1234, "example.com.", RecordType::A).unwrap();
        let q = Query::parse(&bytes).unwrap();
        let up = q.upstream(0xabcd);
        assert_eq!(&up[..2], &[0xab, 0xcd]);
        assert_eq!(&up[2..], &bytes[2..]);
        assert_eq!(q.client_id(), 0x1234);
    }

    #[test]
    fn only_the_reply_to_this_question_and_id_matches() {
        let q = query(1, "Example.COM.", RecordType::A);
        let udp = Transport::Udp;
        let good = reply(7, "example.com.", RecordType::A, DNSClass::IN);
        assert_eq!(q.check(7, &good, udp), Verdict::Match);
        assert_eq!(q.check(8, &good, udp), Verdict::Mismatch(Mismatch::Id));
        let other_name = reply(7, "example.net.", RecordType::A, DNSClass::IN);
        assert_eq!(
            q.check(7, &other_name, udp),
            Verdict::Mismatch(Mismatch::Question)
        );
        let longer = reply(7, "www.example.com.", RecordType::A, DNSClass::IN);
        assert!(matches!(q.check(7, &longer, udp), Verdict::Mismatch(_)));
        let aaaa = reply(7, "example.com.", RecordType::AAAA, DNSClass::IN);
        assert_eq!(
            q.check(7, &aaaa, udp),
            Verdict::Mismatch(Mismatch::Question)
        );
        let chaos = reply(7, "example.com.", RecordType::A, DNSClass::CH);
        assert_eq!(
            q.check(7, &chaos, udp),
            Verdict::Mismatch(Mismatch::Question)
        );
    }

    #[test]
    fn queries_two_questions_and_short_replies_do_not_match() {
        let q = query(1, "example.com.", RecordType::A);
        let mut as_query = reply(7, "example.com.", RecordType::A, DNSClass::IN);
        as_query[2] &= !FLAG_QR;
        assert_eq!(
            q.check(7, &as_query, Transport::Udp),
            Verdict::Mismatch(Mismatch::NotResponse)
        );
        let mut two = Message::response(7, hickory_proto::op::OpCode::Query);
        two.metadata.message_type = MessageType::Response;
        for n in ["example.com.", "example.net."] {
            two.add_query(HQuery::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        assert_eq!(
            q.check(7, &two.to_vec().unwrap(), Transport::Udp),
            Verdict::Mismatch(Mismatch::QuestionCount)
        );
        let good = reply(7, "example.com.", RecordType::A, DNSClass::IN);
        for n in 0..q.question_end {
            assert!(matches!(
                q.check(7, &good[..n], Transport::Udp),
                Verdict::Mismatch(_)
            ));
        }
    }

    #[test]
    fn a_truncated_udp_answer_is_retried_over_tcp_only() {
        let q = query(1, "example.com.", RecordType::A);
        let mut tc = reply(7, "example.com.", RecordType::A, DNSClass::IN);
        tc[2] |= FLAG_TC;
        assert!(is_truncated(&tc));
        assert_eq!(q.check(7, &tc, Transport::Udp), Verdict::RetryTcp);
        assert_eq!(q.check(7, &tc, Transport::Tcp), Verdict::Match);
        assert_eq!(
            q.check(8, &tc, Transport::Udp),
            Verdict::Mismatch(Mismatch::Id)
        );
    }

    #[test]
    fn the_client_gets_its_id_and_its_case_back() {
        let q = query(0x1234, "ExAmPlE.com.", RecordType::A);
        assert_eq!(&q.bytes()[13..20], b"ExAmPlE");
        let up = reply(7, "example.com.", RecordType::A, DNSClass::IN);
        assert_eq!(q.check(7, &up, Transport::Udp), Verdict::Match);
        let back = Message::from_vec(&q.for_client(&up)).unwrap();
        assert_eq!(back.metadata.id, 0x1234);
        assert_eq!(back.queries[0].name().to_ascii(), "ExAmPlE.com.");
        assert_eq!(back.answers.len(), 1);
    }

    #[test]
    fn the_key_is_lowercase_name_type_and_class() {
        let a = query(1, "Example.COM.", RecordType::A);
        let b = query(2, "example.com.", RecordType::A);
        assert_eq!(a.key(), b.key());
        assert_ne!(a.key(), query(1, "example.com.", RecordType::AAAA).key());
        assert_eq!(a.key().qclass, 1);
    }

    #[test]
    fn malformed_questions_are_refused() {
        let good = query_message(1, "example.com.", RecordType::A).unwrap();
        for n in 0..good.len() {
            assert!(Query::parse(&good[..n]).is_err(), "{n} bytes");
        }
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert!(Query::parse(&pointer).is_err());
        let mut long = good[..12].to_vec();
        for _ in 0..5 {
            long.push(63);
            long.extend([b'a'; 63]);
        }
        long.extend([0, 0, 1, 0, 1]);
        assert!(Query::parse(&long).is_err(), "name over 255 bytes");
    }
}
