use super::*;

fn id(host: &str, stack: &str, service: Option<&str>, last: u8) -> Identity {
    Identity {
        address: Ipv4Addr::new(10, 42, 1, last),
        host: host.into(),
        name: format!("c{last}"),
        stack: stack.into(),
        service: service.map(Into::into),
    }
}

fn flow(src: &Identity, dst: &Identity, port: &str) -> Flow {
    let spec: PortSpec = port.parse().unwrap();
    Flow {
        src: src.address,
        dst: dst.address,
        protocol: spec.protocol,
        src_port: 40000,
        dst_port: spec.port.unwrap_or(0),
    }
}

fn sel(stack: Option<&str>, service: Option<&str>) -> Selector {
    Selector {
        stack: stack.map(Into::into),
        service: service.map(Into::into),
        tenant: None,
    }
}

fn rule(name: &str, from: Selector, to: Selector, ports: &[&str], action: Action) -> Rule {
    Rule {
        name: name.into(),
        from,
        to,
        ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        action,
    }
}

#[test]
fn no_policy_allows_everything() {
    let p = Policy::default();
    let (a, b) = (id("h1", "web", None, 2), id("h2", "db", None, 3));
    assert!(p.allows_everything());
    assert_eq!(
        p.decide(&flow(&a, &b, "5432/tcp"), Some(&a), Some(&b))
            .action,
        Action::Allow
    );
}

#[test]
fn port_specs_parse_and_refuse_bad_ones() {
    let ok: PortSpec = "5432/TCP".parse().unwrap();
    assert_eq!((ok.protocol, ok.port), (Protocol::Tcp, Some(5432)));
    assert_eq!("icmp".parse::<PortSpec>().unwrap().port, None);
    assert!(matches!(
        "0/tcp".parse::<PortSpec>(),
        Err(PortSpecError::Range(_))
    ));
    assert!(matches!(
        "65536/tcp".parse::<PortSpec>(),
        Err(PortSpecError::Range(_))
    ));
    assert!(matches!(
        "53/sctp".parse::<PortSpec>(),
        Err(PortSpecError::Protocol(_))
    ));
    assert!(matches!(
        "53".parse::<PortSpec>(),
        Err(PortSpecError::Shape(_))
    ));
    assert!(matches!(
        "-1/udp".parse::<PortSpec>(),
        Err(PortSpecError::Shape(_))
    ));
}

#[test]
fn tiers_apply_in_order() {
    let web = id("h1", "web", Some("api"), 2);
    let db = id("h2", "db", Some("pg"), 3);
    let other = id("h3", "web", Some("api"), 4);
    let p = Policy {
        default: Action::Deny,
        within: Some(Within::Stack),
        tenants: vec![
            Tenant {
                name: "blue".into(),
                hosts: vec!["h1".into(), "h2".into()],
            },
            Tenant {
                name: "red".into(),
                hosts: vec!["h3".into()],
            },
        ],
        rules: vec![
            rule(
                "web-db",
                sel(Some("web"), None),
                sel(Some("db"), Some("pg")),
                &["5432/tcp"],
                Action::Allow,
            ),
            rule(
                "no-web",
                sel(Some("web"), None),
                sel(Some("web"), None),
                &["22/tcp"],
                Action::Deny,
            ),
        ],
        ..Policy::default()
    };
    let d = p.decide(&flow(&web, &db, "5432/tcp"), Some(&web), Some(&db));
    assert_eq!(
        (d.action, d.tier, d.rule),
        (Action::Allow, Tier::Rule, Some(0))
    );
    // Another port: no rule, different stacks, `within` denies.
    let d = p.decide(&flow(&web, &db, "5433/tcp"), Some(&web), Some(&db));
    assert_eq!((d.action, d.tier), (Action::Deny, Tier::Within));
    // Same stack, but across tenants: the tenant tier denies before `within`.
    let d = p.decide(&flow(&web, &other, "80/tcp"), Some(&web), Some(&other));
    assert_eq!((d.action, d.tier), (Action::Deny, Tier::Tenant));
    // An explicit rule closes one path inside a stack.
    let web2 = id("h2", "web", None, 5);
    let d = p.decide(&flow(&web, &web2, "22/tcp"), Some(&web), Some(&web2));
    assert_eq!(
        (d.action, d.tier, d.rule),
        (Action::Deny, Tier::Rule, Some(1))
    );
    let d = p.decide(&flow(&web, &web2, "80/tcp"), Some(&web), Some(&web2));
    assert_eq!((d.action, d.tier), (Action::Allow, Tier::Within));
}

#[test]
fn dns_and_host_traffic_are_implicitly_allowed_under_default_deny() {
    let p = Policy {
        default: Action::Deny,
        ..Policy::default()
    };
    let web = id("h1", "web", None, 2);
    let dns = Flow {
        src: web.address,
        dst: SERVICE_ADDRESS,
        protocol: Protocol::Udp,
        src_port: 5353,
        dst_port: 53,
    };
    assert_eq!(p.decide(&dns, Some(&web), None).tier, Tier::Implicit);
    let not_dns = Flow {
        dst_port: 80,
        protocol: Protocol::Tcp,
        ..dns
    };
    assert_eq!(p.decide(&not_dns, Some(&web), None).action, Action::Deny);
    let (h1, h2) = (
        id("h1", HOSTS_STACK, None, 1),
        id("h2", HOSTS_STACK, None, 9),
    );
    let d = p.decide(&flow(&h1, &h2, "7301/udp"), Some(&h1), Some(&h2));
    assert_eq!((d.action, d.tier), (Action::Allow, Tier::Implicit));
    // A container to a host is not the agents' own traffic.
    assert_eq!(
        p.decide(&flow(&web, &h2, "22/tcp"), Some(&web), Some(&h2))
            .action,
        Action::Deny
    );
}

#[test]
fn an_empty_selector_or_unknown_address_matches_nothing() {
    let p = Policy {
        default: Action::Deny,
        rules: vec![rule(
            "all",
            sel(None, None),
            sel(None, None),
            &[],
            Action::Allow,
        )],
        ..Policy::default()
    };
    let (a, b) = (id("h1", "web", None, 2), id("h2", "db", None, 3));
    assert_eq!(
        p.decide(&flow(&a, &b, "80/tcp"), Some(&a), Some(&b)).tier,
        Tier::Default
    );
    let q = Policy {
        default: Action::Deny,
        rules: vec![rule(
            "web",
            sel(Some("web"), None),
            sel(Some("db"), None),
            &[],
            Action::Allow,
        )],
        ..Policy::default()
    };
    assert_eq!(
        q.decide(&flow(&a, &b, "80/tcp"), None, Some(&b)).action,
        Action::Deny
    );
    assert_eq!(
        q.decide(&flow(&a, &b, "80/tcp"), Some(&a), Some(&b)).action,
        Action::Allow
    );
}

#[test]
fn within_service_needs_the_same_stack_and_service() {
    let p = Policy {
        default: Action::Allow,
        within: Some(Within::Service),
        ..Policy::default()
    };
    let a = id("h1", "web", Some("api"), 2);
    let b = id("h2", "web", Some("api"), 3);
    let c = id("h2", "web", Some("ui"), 4);
    let d = id("h2", "web", None, 5);
    let e = id("h2", "web", None, 6);
    let f = |x: &Identity, y: &Identity| p.decide(&flow(x, y, "80/tcp"), Some(x), Some(y)).action;
    assert_eq!(f(&a, &b), Action::Allow);
    assert_eq!(f(&a, &c), Action::Deny);
    assert_eq!(f(&d, &e), Action::Deny, "no service is not one service");
}

#[test]
fn explain_gives_the_rule_and_reason_of_decide() {
    let web = id("h1", "web", None, 2);
    let db = id("h2", "db", None, 3);
    let p = Policy {
        default: Action::Deny,
        rules: vec![rule(
            "web-db",
            sel(Some("web"), None),
            sel(Some("db"), None),
            &["5432/tcp"],
            Action::Allow,
        )],
        tests: vec![PolicyTest {
            from: web.clone(),
            to: db.clone(),
            port: "5432/tcp".parse().unwrap(),
            expect: Action::Allow,
            line: 7,
        }],
        ..Policy::default()
    };
    let v = p.explain(&flow(&web, &db, "5432/tcp"), Some(&web), Some(&db));
    assert_eq!(v.rule.as_deref(), Some("web-db"));
    assert!(
        v.reason
            .contains("rule web-db allows stack web to stack db"),
        "{}",
        v.reason
    );
    assert!(p.failing_test().is_none());
    let mut q = p.clone();
    q.tests[0].port = "5433/tcp".parse().unwrap();
    let (test, verdict) = q.failing_test().unwrap();
    assert_eq!((test.line, verdict.tier), (7, Tier::Default));
}
