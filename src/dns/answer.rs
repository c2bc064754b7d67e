//! Turning a DNS query into an answer, a forward, or nothing.
//!
//! Authoritative for the cluster domain and the overlay's reverse zone;
//! everything else is forwarded upstream. Must never: panic on any input,
//! answer ANY with more than one record (no amplification), or send a UDP
//! answer over 512 bytes (it is truncated with TC so the client retries on
//! TCP).

use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::records::Zone;

/// TTL of the agent's own records: containers come and go within seconds.
pub const RECORD_TTL: u32 = 5;
/// The classic DNS-over-UDP limit.
pub const UDP_LIMIT: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: ask the upstream servers (cache key: lowercase name, type).
    Forward { name: String, qtype: u16 },
    /// Not worth an answer (too short to even carry an id).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Answers `query` from `zone`. `rotation` turns the order of multi-address
/// answers so load spreads over a service's members.
pub fn answer(zone: &Zone, query: &[u8], transport: Transport, rotation: usize) -> Decision {
    let Ok(request) = Message::from_vec(query) else {
        return format_error(query);
    };
    let meta = &request.metadata;
    if meta.message_type != MessageType::Query {
        return Decision::Drop;
    }
    if meta.op_code != OpCode::Query {
        return reply_code(&request, ResponseCode::NotImp, transport);
    }
    let [question] = request.queries.as_slice() else {
        return reply_code(&request, ResponseCode::FormErr, transport);
    };
    let name = question.name().to_lowercase().to_ascii();
    let name = if name.ends_with('.') {
        name
    } else {
        format!("{name}.")
    };
    if !zone.is_authoritative(&name) {
        return Decision::Forward {
            name,
            qtype: u16::from(question.query_type()),
        };
    }
    let mut response = respond_to(&request);
    response.metadata.authoritative = true;
    let qname = question.name().clone();
    match question.query_type() {
        RecordType::A => response.answers = a_records(zone, &name, &qname, rotation),
        RecordType::ANY => {
            response.answers = a_records(zone, &name, &qname, rotation)
                .into_iter()
                .take(1)
                .collect()
        }
        RecordType::PTR => {
            response.answers = zone
                .ptr(&name)
                .iter()
                .filter_map(|target| Name::from_str(target).ok())
                .map(|target| {
                    Record::from_rdata(qname.clone(), RECORD_TTL, RData::PTR(PTR(target)))
                })
                .collect();
        }
        RecordType::SRV => {
            for (port, target) in zone.srv(&name) {
                let Ok(target_name) = Name::from_str(target) else {
                    continue;
                };
                let srv = SRV::new(0, 0, *port, target_name.clone());
                response.answers.push(Record::from_rdata(
                    qname.clone(),
                    RECORD_TTL,
                    RData::SRV(srv),
                ));
                response
                    .additionals
                    .extend(a_records(zone, target, &target_name, 0));
            }
        }
        _ => {}
    }
    if response.answers.is_empty() && !zone.exists(&name) {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    finish(response, transport)
}

/// A SERVFAIL for `query` (all upstreams failed).
pub fn server_failure(query: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    match reply_code(&request, ResponseCode::ServFail, transport) {
        Decision::Reply(bytes) => Some(bytes),
        _ => None,
    }
}

/// Truncates an upstream's UDP answer to the 512-byte limit (with TC).
pub fn limit_for_udp(response: Vec<u8>) -> Vec<u8> {
    if response.len() <= UDP_LIMIT {
        return response;
    }
    match Message::from_vec(&response) {
        Ok(message) => truncated(message).unwrap_or(response),
        Err(_) => response,
    }
}

fn a_records(zone: &Zone, name: &str, qname: &Name, rotation: usize) -> Vec<Record> {
    let addrs = zone.a(name);
    let n = addrs.len().max(1);
    (0..addrs.len())
        .map(|i| addrs[(i + rotation) % n])
        .map(|a: Ipv4Addr| Record::from_rdata(qname.clone(), RECORD_TTL, RData::A(A(a))))
        .collect()
}

fn respond_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.queries = request.queries.clone();
    response
}

fn reply_code(request: &Message, code: ResponseCode, transport: Transport) -> Decision {
    let mut response = respond_to(request);
    response.metadata.response_code = code;
    finish(response, transport)
}

fn finish(response: Message, transport: Transport) -> Decision {
    let Ok(bytes) = response.to_vec() else {
        return Decision::Drop;
    };
    if transport == Transport::Udp && bytes.len() > UDP_LIMIT {
        return truncated(response).map_or(Decision::Drop, Decision::Reply);
    }
    Decision::Reply(bytes)
}

fn truncated(mut response: Message) -> Option<Vec<u8>> {
    response.metadata.truncation = true;
    response.answers.clear();
    response.authorities.clear();
    response.additionals.clear();
    response.to_vec().ok()
}

/// FORMERR for a query that does not parse but carries an id; nothing for
/// fewer bytes than a header.
fn format_error(query: &[u8]) -> Decision {
    let Some(id) = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return Decision::Drop;
    };
    if query.len() < 12 {
        return Decision::Drop;
    }
    let mut response = Message::response(id, OpCode::Query);
    response.metadata.response_code = ResponseCode::FormErr;
    response.to_vec().map_or(Decision::Drop, Decision::Reply)
}

/// A query message for tests and the forwarder's own checks.
pub fn query_message(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).ok()?, qtype));
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::{ContainerRecord, HostRecords};

    fn zone(web_members: u8) -> Zone {
        let containers = (0..web_members)
            .map(|i| ContainerRecord {
                name: format!("web{i}"),
                stack: "shop".into(),
                service: Some("web".into()),
                address: Ipv4Addr::new(10, 42, 1, 10 + i),
                ports: vec!["http:8080/tcp".parse().unwrap()],
            })
            .collect();
        let hosts = vec![HostRecords {
            host: "h1".into(),
            address: [10, 42, 1, 1].into(),
            containers,
        }];
        Zone::build("mesh.internal", "10.42.0.0/16".parse().unwrap(), &hosts)
    }

    fn ask(
        z: &Zone,
        name: &str,
        qtype: RecordType,
        transport: Transport,
        rotation: usize,
    ) -> Message {
        let q = query_message(0x1234, name, qtype).unwrap();
        match answer(z, &q, transport, rotation) {
            Decision::Reply(bytes) => {
                assert!(transport == Transport::Tcp || bytes.len() <= UDP_LIMIT);
                Message::from_vec(&bytes).unwrap()
            }
            other => panic!("{name}: {other:?}"),
        }
    }

    fn addrs(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| {
                if let RData::A(a) = &r.data {
                    Some(a.0)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn a_records_for_containers_services_and_hosts() {
        let z = zone(2);
        let m = ask(
            &z,
            "web0.shop.mesh.internal.",
            RecordType::A,
            Transport::Udp,
            0,
        );
        assert_eq!(
            (
                m.metadata.id,
                m.metadata.response_code,
                m.metadata.authoritative
            ),
            (0x1234, ResponseCode::NoError, true)
        );
        assert_eq!(addrs(&m), [Ipv4Addr::new(10, 42, 1, 10)]);
        assert_eq!(
            addrs(&ask(
                &z,
                "web.shop.mesh.internal.",
                RecordType::A,
                Transport::Udp,
                0
            ))
            .len(),
            2
        );
        assert_eq!(
            addrs(&ask(
                &z,
                "h1.hosts.mesh.internal.",
                RecordType::A,
                Transport::Udp,
                0
            )),
            [Ipv4Addr::new(10, 42, 1, 1)]
        );
    }

    #[test]
    fn service_answers_rotate() {
        let z = zone(3);
        let first = addrs(&ask(
            &z,
            "web.shop.mesh.internal.",
            RecordType::A,
            Transport::Udp,
            0,
        ));
        let second = addrs(&ask(
            &z,
            "web.shop.mesh.internal.",
            RecordType::A,
            Transport::Udp,
            1,
        ));
        assert_ne!(first[0], second[0]);
        let mut a = first.clone();
        let mut b = second.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "rotation changes order, not membership");
    }

    #[test]
    fn names_are_case_insensitive() {
        let z = zone(1);
        assert_eq!(
            addrs(&ask(
                &z,
                "WEB0.Shop.MESH.internal.",
                RecordType::A,
                Transport::Udp,
                0
            )),
            [Ipv4Addr::new(10, 42, 1, 10)]
        );
    }

    #[test]
    fn ptr_and_srv() {
        let z = zone(1);
        let m = ask(
            &z,
            "10.1.42.10.in-addr.arpa.",
            RecordType::PTR,
            Transport::Udp,
            0,
        );
        let RData::PTR(target) = &m.answers[0].data else {
            panic!("not a PTR")
        };
        assert_eq!(target.0.to_ascii(), "web0.shop.mesh.internal.");
        let m = ask(
            &z,
            "_http._tcp.web.shop.mesh.internal.",
            RecordType::SRV,
            Transport::Udp,
            0,
        );
        let RData::SRV(srv) = &m.answers[0].data else {
            panic!("not an SRV")
        };
        assert_eq!(
            (srv.port, srv.target.to_ascii().as_str()),
            (8080, "web0.shop.mesh.internal.")
        );
        let mut glue = m.clone();
        glue.answers = m.additionals.clone();
        assert_eq!(addrs(&glue), [Ipv4Addr::new(10, 42, 1, 10)]);
    }

    #[test]
    fn nxdomain_versus_nodata() {
        let z = zone(1);
        let m = ask(
            &z,
            "nope.shop.mesh.internal.",
            RecordType::A,
            Transport::Udp,
            0,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask(
            &z,
            "web0.shop.mesh.internal.",
            RecordType::AAAA,
            Transport::Udp,
            0,
        );
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
        let m = ask(&z, "shop.mesh.internal.", RecordType::A, Transport::Udp, 0);
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0),
            "empty non-terminal"
        );
        let m = ask(
            &z,
            "9.9.42.10.in-addr.arpa.",
            RecordType::PTR,
            Transport::Udp,
            0,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn any_gets_one_record() {
        let z = zone(5);
        assert_eq!(
            ask(
                &z,
                "web.shop.mesh.internal.",
                RecordType::ANY,
                Transport::Udp,
                0
            )
            .answers
            .len(),
            1
        );
    }

    #[test]
    fn big_udp_answers_are_truncated_and_tcp_ones_are_not() {
        let z = zone(60);
        let udp = ask(
            &z,
            "web.shop.mesh.internal.",
            RecordType::A,
            Transport::Udp,
            0,
        );
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = ask(
            &z,
            "web.shop.mesh.internal.",
            RecordType::A,
            Transport::Tcp,
            0,
        );
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 60);
    }

    #[test]
    fn other_names_are_forwarded_lowercased() {
        let z = zone(1);
        let q = query_message(1, "Example.COM.", RecordType::A).unwrap();
        assert_eq!(
            answer(&z, &q, Transport::Udp, 0),
            Decision::Forward {
                name: "example.com.".into(),
                qtype: 1
            }
        );
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let z = zone(1);
        assert_eq!(answer(&z, &[], Transport::Udp, 0), Decision::Drop);
        assert_eq!(answer(&z, &[1, 2, 3], Transport::Udp, 0), Decision::Drop);
        let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0xc0, 0xff, 0xff]);
        let Decision::Reply(bytes) = answer(&z, &junk, Transport::Udp, 0) else {
            panic!("no FORMERR")
        };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0xabcd, ResponseCode::FormErr)
        );
    }

    #[test]
    fn servfail_echoes_the_question_and_id() {
        let q = query_message(0x4242, "unreachable.example.", RecordType::A).unwrap();
        let m = Message::from_vec(&server_failure(&q, Transport::Udp).unwrap()).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0x4242, ResponseCode::ServFail)
        );
        assert_eq!(m.queries[0].name().to_ascii(), "unreachable.example.");
        assert!(server_failure(&[1, 2], Transport::Udp).is_none());
    }

    #[test]
    fn a_container_without_a_stack_lives_in_default() {
        let hosts = vec![HostRecords {
            host: "h1".into(),
            address: [10, 42, 1, 1].into(),
            containers: vec![ContainerRecord {
                name: "solo".into(),
                stack: crate::core::ipam::DEFAULT_STACK.into(),
                service: None,
                address: [10, 42, 1, 9].into(),
                ports: vec![],
            }],
        }];
        let z = Zone::build("mesh.internal", "10.42.0.0/16".parse().unwrap(), &hosts);
        assert_eq!(
            addrs(&ask(
                &z,
                "solo.default.mesh.internal.",
                RecordType::A,
                Transport::Udp,
                0
            )),
            [Ipv4Addr::new(10, 42, 1, 9)]
        );
    }

    #[test]
    fn oversized_upstream_answers_are_truncated_for_udp() {
        let z = zone(60);
        let q = query_message(9, "web.shop.mesh.internal.", RecordType::A).unwrap();
        let Decision::Reply(big) = answer(&z, &q, Transport::Tcp, 0) else {
            panic!()
        };
        assert!(big.len() > UDP_LIMIT);
        let cut = limit_for_udp(big);
        assert!(cut.len() <= UDP_LIMIT);
        assert!(Message::from_vec(&cut).unwrap().metadata.truncation);
    }
}
