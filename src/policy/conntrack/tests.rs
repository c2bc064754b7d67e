use super::*;
use crate::dns::HostRecords;
use crate::dns::records::ContainerRecord;
use crate::policy::{Rule, Selector};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 2);
const DB: Ipv4Addr = Ipv4Addr::new(10, 42, 2, 2);

fn rules(allow_web_db: bool, version: u64) -> Rules {
    let container = |name: &str, stack: &str, address| ContainerRecord {
        name: name.into(),
        stack: stack.into(),
        service: None,
        address,
        ports: Vec::new(),
    };
    let h1 = HostRecords {
        host: "h1".into(),
        address: Ipv4Addr::new(10, 42, 1, 1),
        containers: vec![container("web1", "web", WEB)],
    };
    let h2 = HostRecords {
        host: "h2".into(),
        address: Ipv4Addr::new(10, 42, 2, 1),
        containers: vec![container("db1", "db", DB)],
    };
    let stack = |s: &str| Selector {
        stack: Some(s.into()),
        service: None,
        tenant: None,
    };
    let policy = Policy {
        default: Action::Deny,
        rules: allow_web_db
            .then(|| Rule {
                name: "web-db".into(),
                from: stack("web"),
                to: stack("db"),
                ports: vec!["5432/tcp".parse().unwrap()],
                action: Action::Allow,
            })
            .into_iter()
            .collect(),
        ..Policy::default()
    };
    Rules {
        policy,
        identities: Identities::build([&h1, &h2]),
        version,
    }
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Flow {
    Flow {
        src,
        dst,
        protocol: Protocol::Tcp,
        src_port: sport,
        dst_port: dport,
    }
}

#[test]
fn an_allowed_flow_is_remembered_and_its_replies_pass() {
    let (mut ct, r, now) = (Conntrack::default(), rules(true, 1), Instant::now());
    let out = tcp(WEB, DB, 40000, 5432);
    assert_eq!(ct.check(now, &r, &out, None).tier, Tier::Rule);
    assert_eq!(ct.len(), 1);
    let back = ct.check(now, &r, &out.reversed(), None);
    assert_eq!((back.action, back.tier), (Action::Allow, Tier::Reply));
    // The same direction from the db side, not a reply, is denied.
    let d = ct.check(now, &r, &tcp(DB, WEB, 5432, 40001), None);
    assert_eq!(d.action, Action::Deny);
}

#[test]
fn denied_flows_are_never_stored() {
    let (mut ct, r, now) = (Conntrack::default(), rules(true, 1), Instant::now());
    for port in 1..100 {
        assert_eq!(
            ct.check(now, &r, &tcp(WEB, DB, port, 80), None).action,
            Action::Deny
        );
    }
    assert!(ct.is_empty());
}

#[test]
fn a_new_policy_revalidates_at_the_next_packet() {
    let (mut ct, now) = (Conntrack::default(), Instant::now());
    let out = tcp(WEB, DB, 40000, 5432);
    ct.check(now, &rules(true, 1), &out, None);
    // A reload that keeps the flow allowed: it goes on.
    assert_eq!(
        ct.check(now, &rules(true, 2), &out, None).action,
        Action::Allow
    );
    assert_eq!(
        ct.check(now, &rules(true, 2), &out.reversed(), None).tier,
        Tier::Reply
    );
    // One that removes the rule: both directions stop, the entry is gone.
    let removed = rules(false, 3);
    assert_eq!(
        ct.check(now, &removed, &out.reversed(), None).action,
        Action::Deny
    );
    assert_eq!(ct.check(now, &removed, &out, None).action, Action::Deny);
    assert!(ct.is_empty());
}

#[test]
fn the_table_is_bounded_and_idle_flows_expire() {
    let (mut ct, r, now) = (Conntrack::with_capacity(4), rules(true, 1), Instant::now());
    for port in 0..10 {
        assert_eq!(
            ct.check(now, &r, &tcp(WEB, DB, port, 5432), None).action,
            Action::Allow
        );
    }
    assert_eq!(ct.len(), 4, "full: further flows are decided, not stored");
    ct.expire(now + Duration::from_secs(599));
    assert_eq!(ct.len(), 4);
    ct.expire(now + Duration::from_secs(601));
    assert!(ct.is_empty());
}

#[test]
fn an_icmp_error_about_an_allowed_flow_is_related() {
    let (mut ct, r, now) = (Conntrack::default(), rules(true, 1), Instant::now());
    let out = tcp(WEB, DB, 40000, 5432);
    ct.check(now, &r, &out, None);
    let error = Flow {
        protocol: Protocol::Icmp,
        src_port: 0,
        dst_port: 0,
        ..out.reversed()
    };
    assert_eq!(ct.check(now, &r, &error, Some(&out)).tier, Tier::Reply);
    let unrelated = tcp(WEB, DB, 40001, 5432);
    let unrelated_error = Flow {
        protocol: Protocol::Icmp,
        src_port: 0,
        dst_port: 0,
        ..unrelated.reversed()
    };
    assert_eq!(
        ct.check(now, &r, &unrelated_error, Some(&unrelated)).action,
        Action::Deny
    );
}

fn ipv4(protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0];
    p.extend_from_slice(&WEB.octets());
    p.extend_from_slice(&DB.octets());
    p.extend_from_slice(payload);
    p
}

#[test]
fn classify_reads_ports_echo_ids_and_quoted_packets() {
    let c = classify(&ipv4(6, &[0x9c, 0x40, 0x15, 0x38, 0, 0, 0, 0])).unwrap();
    assert_eq!(c.flow, tcp(WEB, DB, 40000, 5432));
    let echo = classify(&ipv4(1, &[8, 0, 0, 0, 0x12, 0x34, 0, 1])).unwrap();
    assert_eq!((echo.flow.src_port, echo.flow.dst_port), (0x1234, 0x1234));
    let quoted = ipv4(17, &[0, 53, 0, 54, 0, 8, 0, 0]);
    let mut error = vec![3, 3, 0, 0, 0, 0, 0, 0];
    error.extend_from_slice(&quoted);
    let c = classify(&ipv4(1, &error)).unwrap();
    assert_eq!(c.related.unwrap().dst_port, 54);
    // A later fragment has no ports; nor does a truncated or non-IPv4 packet.
    let mut fragment = ipv4(6, &[0; 8]);
    fragment[7] = 1;
    assert!(classify(&fragment).is_none());
    assert!(classify(&ipv4(6, &[0, 1])).is_none());
    assert!(classify(&[0x60; 40]).is_none());
    assert!(classify(&[]).is_none());
}

proptest::proptest! {
    #[test]
    fn classify_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
        let _ = classify(&bytes);
    }
}
