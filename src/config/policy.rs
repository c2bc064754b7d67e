//! The `[policy]` table: parsed into `policy::Policy` with every rule
//! checked, each error naming the offending key's own line. The policy's
//! `[[policy.test]]`s run here too, so a config whose tests fail is
//! refused like any other broken config.
//! Must never: decide a packet (that is `policy`'s job).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};
use crate::policy::{
    Action, Identity, Policy, PolicyTest, PortSpec, Rule, Selector, Tenant, Within,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    default: Option<Spanned<String>>,
    reject: Option<Spanned<bool>>,
    within: Option<Spanned<String>>,
    #[serde(default)]
    tenant: Vec<RawTenant>,
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    test: Vec<RawTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: Spanned<String>,
    hosts: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    stack: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    tenant: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    from: Spanned<RawSelector>,
    to: Spanned<RawSelector>,
    #[serde(default)]
    ports: Vec<Spanned<String>>,
    action: Spanned<String>,
}

/// A hypothetical endpoint of a `[[policy.test]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    stack: Spanned<String>,
    service: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Spanned<RawEndpoint>,
    to: Spanned<RawEndpoint>,
    port: Spanned<String>,
    expect: Spanned<String>,
}

impl Validator<'_> {
    pub(super) fn policy(&self, raw: Option<&RawPolicy>) -> Result<Policy, ConfigError> {
        let Some(raw) = raw else {
            return Ok(Policy::default());
        };
        let default = match &raw.default {
            Some(d) => self.action(d, "policy.default")?,
            None => Action::Allow,
        };
        let within = raw.within.as_ref().map(|w| self.within(w)).transpose()?;
        let tenants = self.tenants(&raw.tenant)?;
        let mut policy = Policy {
            default,
            reject: raw.reject.as_ref().is_some_and(|r| *r.get_ref()),
            within,
            tenants,
            rules: Vec::new(),
            tests: Vec::new(),
        };
        policy.rules = self.rules(&raw.rule, &policy)?;
        policy.tests = raw
            .test
            .iter()
            .map(|t| self.policy_test(t))
            .collect::<Result<_, _>>()?;
        if let Some((test, verdict)) = policy.failing_test() {
            return Err(ConfigError {
                file: self.file.to_owned(),
                line: Some(test.line),
                key: Some("policy.test".into()),
                message: format!(
                    "expected {} but the policy says {} ({} tier: {})",
                    test.expect, verdict.action, verdict.tier, verdict.reason
                ),
            });
        }
        Ok(policy)
    }

    fn action(&self, value: &Spanned<String>, key: &str) -> Result<Action, ConfigError> {
        match value.get_ref().as_str() {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            other => Err(self.error(
                value.span(),
                key,
                format!("unknown action {other:?}; expected \"allow\" or \"deny\""),
            )),
        }
    }

    fn within(&self, value: &Spanned<String>) -> Result<Within, ConfigError> {
        match value.get_ref().as_str() {
            "stack" => Ok(Within::Stack),
            "service" => Ok(Within::Service),
            other => Err(self.error(
                value.span(),
                "policy.within",
                format!("unknown grouping {other:?}; expected \"stack\" or \"service\""),
            )),
        }
    }

    fn tenants(&self, raw: &[RawTenant]) -> Result<Vec<Tenant>, ConfigError> {
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut tenants = Vec::with_capacity(raw.len());
        for t in raw {
            let name = self.label(&t.name, "policy.tenant.name")?;
            if tenants.iter().any(|o: &Tenant| o.name == name) {
                return Err(self.error(
                    t.name.span(),
                    "policy.tenant.name",
                    format!("duplicate tenant {name:?}"),
                ));
            }
            let key = format!("policy.tenant.{name}.hosts");
            if t.hosts.get_ref().is_empty() {
                return Err(self.error(t.hosts.span(), key, "a tenant needs at least one host"));
            }
            let mut hosts = Vec::new();
            for h in t.hosts.get_ref() {
                let host = self.label(h, &key)?;
                if let Some(other) = owner.insert(host.clone(), name.clone()) {
                    return Err(self.error(
                        h.span(),
                        key,
                        format!("host {host:?} is already in tenant {other:?}"),
                    ));
                }
                hosts.push(host);
            }
            tenants.push(Tenant { name, hosts });
        }
        Ok(tenants)
    }

    fn rules(&self, raw: &[RawRule], policy: &Policy) -> Result<Vec<Rule>, ConfigError> {
        let mut rules: Vec<Rule> = Vec::with_capacity(raw.len());
        for r in raw {
            let name = self.label(&r.name, "policy.rule.name")?;
            if rules.iter().any(|o| o.name == name) {
                return Err(self.error(
                    r.name.span(),
                    "policy.rule.name",
                    format!("duplicate rule name {name:?}"),
                ));
            }
            let at = |field: &str| format!("policy.rule.{name}.{field}");
            let from = self.selector(&r.from, &at("from"), policy)?;
            let to = self.selector(&r.to, &at("to"), policy)?;
            if let (Some(a), Some(b)) = (&from.tenant, &to.tenant)
                && a != b
            {
                let span =
                    r.to.get_ref()
                        .tenant
                        .as_ref()
                        .map_or(r.to.span(), Spanned::span);
                return Err(self.error(
                    span,
                    at("to.tenant"),
                    format!("tenants never reach each other: no rule can open {a} to {b}"),
                ));
            }
            let ports = r
                .ports
                .iter()
                .map(|p| self.port_spec(p, &at("ports")))
                .collect::<Result<_, _>>()?;
            let action = self.action(&r.action, &at("action"))?;
            rules.push(Rule {
                name,
                from,
                to,
                ports,
                action,
            });
        }
        Ok(rules)
    }

    fn selector(
        &self,
        raw: &Spanned<RawSelector>,
        key: &str,
        policy: &Policy,
    ) -> Result<Selector, ConfigError> {
        let s = raw.get_ref();
        let label = |v: &Option<Spanned<String>>, field: &str| {
            v.as_ref()
                .map(|v| self.label(v, &format!("{key}.{field}")))
                .transpose()
        };
        let selector = Selector {
            stack: label(&s.stack, "stack")?,
            service: label(&s.service, "service")?,
            tenant: label(&s.tenant, "tenant")?,
        };
        if selector.stack.is_none() && selector.service.is_none() {
            return Err(self.error(
                raw.span(),
                key,
                "a selector needs a stack or a service (an empty one would match nothing)",
            ));
        }
        if let (Some(t), Some(v)) = (&selector.tenant, &s.tenant)
            && !policy.tenants.iter().any(|known| &known.name == t)
        {
            return Err(self.error(
                v.span(),
                format!("{key}.tenant"),
                format!("unknown tenant {t:?}; declare it in [[policy.tenant]]"),
            ));
        }
        Ok(selector)
    }

    fn port_spec(&self, value: &Spanned<String>, key: &str) -> Result<PortSpec, ConfigError> {
        value
            .get_ref()
            .parse()
            .map_err(|e: crate::policy::PortSpecError| self.error(value.span(), key, e.to_string()))
    }

    fn policy_test(&self, raw: &RawTest) -> Result<PolicyTest, ConfigError> {
        let port = self.port_spec(&raw.port, "policy.test.port")?;
        let expect = self.action(&raw.expect, "policy.test.expect")?;
        Ok(PolicyTest {
            from: self.endpoint(&raw.from, "policy.test.from")?,
            to: self.endpoint(&raw.to, "policy.test.to")?,
            port,
            expect,
            line: self.line_of(raw.port.span().start.min(raw.from.span().start)),
        })
    }

    fn endpoint(&self, raw: &Spanned<RawEndpoint>, key: &str) -> Result<Identity, ConfigError> {
        let e = raw.get_ref();
        let address = match &e.address {
            Some(a) => a.get_ref().parse::<Ipv4Addr>().map_err(|_| {
                self.error(
                    a.span(),
                    format!("{key}.address"),
                    format!("{:?} is not an IPv4 address", a.get_ref()),
                )
            })?,
            None => Ipv4Addr::UNSPECIFIED,
        };
        let stack = self.label(&e.stack, &format!("{key}.stack"))?;
        Ok(Identity {
            address,
            host: e
                .host
                .as_ref()
                .map(|h| h.get_ref().clone())
                .unwrap_or_default(),
            name: stack.clone(),
            stack,
            service: e.service.as_ref().map(|s| s.get_ref().clone()),
        })
    }

    fn label(&self, value: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let v = value.get_ref();
        if !crate::membership::is_dns_label(v) {
            return Err(self.error(
                value.span(),
                key,
                format!("{v:?} is not a name: use 1-63 letters, digits or '-'"),
            ));
        }
        Ok(v.clone())
    }
}
