//! The CNI 1.0.0 plugin's decisions (`meshnet-cni`): reading the runtime's
//! environment and network config, choosing the container's name, stack
//! and service, and writing results and the spec's error JSON.
//!
//! The plugin asks the local agent to attach (ADD) and detach (DEL) the
//! namespace at CNI_NETNS; the binary only moves bytes between the runtime,
//! the control socket and this module.
//! Must never: do IO (no env reads, no sockets: they come in as arguments).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::core::ipam::Container;
use crate::core::service::SERVICE_ADDRESS;

/// The only version this plugin speaks (results carry `mac`, as podman 4.3
/// requires).
pub const CNI_VERSION: &str = "1.0.0";

/// The spec's well-known error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// Plugin-specific: the agent refused the request.
    AgentRefused = 100,
}

/// A failure as the runtime receives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error JSON the spec has the plugin print on stdout.
    pub fn to_json(&self) -> String {
        json!({
            "cniVersion": CNI_VERSION,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// What the runtime put in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// Absent only for DEL (the spec allows it) and VERSION.
    pub netns: Option<String>,
    pub ifname: String,
    /// CNI_ARGS, `K=V;K=V`.
    pub args: Vec<(String, String)>,
}

/// The interface the agent gives every container.
pub const IFNAME: &str = "eth0";

impl Invocation {
    /// Reads the CNI_* variables through `env`.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let missing = |name: &str| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("{name} is not set"),
                "meshnet-cni is run by a container runtime (CNI 1.0.0)",
            )
        };
        let command = match env("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND {other:?}"),
                    "expected ADD, DEL, CHECK or VERSION",
                ));
            }
            None => return Err(missing("CNI_COMMAND")),
        };
        let nonempty = |name: &str| env(name).filter(|v| !v.is_empty());
        let mut invocation = Self {
            command,
            container_id: nonempty("CNI_CONTAINERID").unwrap_or_default(),
            netns: nonempty("CNI_NETNS"),
            ifname: nonempty("CNI_IFNAME").unwrap_or_else(|| IFNAME.to_owned()),
            args: parse_args(&env("CNI_ARGS").unwrap_or_default()),
        };
        if command == Command::Version {
            return Ok(invocation);
        }
        if invocation.container_id.is_empty() {
            return Err(missing("CNI_CONTAINERID"));
        }
        if command != Command::Del && invocation.netns.is_none() {
            return Err(missing("CNI_NETNS"));
        }
        if nonempty("CNI_IFNAME").is_none() && command != Command::Del {
            return Err(missing("CNI_IFNAME"));
        }
        invocation.ifname = invocation.ifname.trim().to_owned();
        Ok(invocation)
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

fn parse_args(text: &str) -> Vec<(String, String)> {
    text.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The network configuration on stdin.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    /// The agent's control socket; the agent's default when absent.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// The agent's DNS domain (its `dns.domain`), for the resolver config.
    #[serde(default)]
    pub domain: Option<String>,
    /// Runtime labels, the CNI convention: `args.cni.labels`.
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default, rename = "prevResult")]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: Self = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "cannot decode the network configuration",
                e.to_string(),
            )
        })?;
        if conf.cni_version != CNI_VERSION {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("cniVersion {} is not supported", conf.cni_version),
                format!("meshnet-cni speaks {CNI_VERSION}"),
            ));
        }
        Ok(conf)
    }

    pub fn domain(&self) -> &str {
        self.domain
            .as_deref()
            .unwrap_or(crate::dns::records::DEFAULT_DOMAIN)
    }

    fn label(&self, key: &str) -> Option<String> {
        let labels = self.args.as_ref()?.get("cni")?.get("labels")?.as_array()?;
        labels
            .iter()
            .find(|l| l.get("key").and_then(Value::as_str) == Some(key))
            .and_then(|l| l.get("value")?.as_str().map(str::to_owned))
            .filter(|v| !v.is_empty())
    }
}

/// Who the container is on the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub stack: Option<String>,
    pub service: Option<String>,
}

/// Name, stack and service: a runtime label (`meshnet.name`,
/// `meshnet.stack`, `meshnet.service`) wins over CNI_ARGS (`MESHNET_NAME`,
/// `MESHNET_STACK`, `MESHNET_SERVICE`, then Kubernetes' `K8S_POD_NAME` and
/// `K8S_POD_NAMESPACE`); the name falls back to the container id's first
/// 12 characters (as `podman ps` shows it).
pub fn identity(invocation: &Invocation, conf: &NetConf) -> Identity {
    let pick = |label: &str, keys: &[&str]| {
        conf.label(label).or_else(|| {
            keys.iter()
                .find_map(|k| invocation.arg(k))
                .map(str::to_owned)
        })
    };
    let name = pick("meshnet.name", &["MESHNET_NAME", "K8S_POD_NAME"])
        .unwrap_or_else(|| invocation.container_id.chars().take(12).collect::<String>());
    Identity {
        name: name.to_lowercase(),
        stack: pick("meshnet.stack", &["MESHNET_STACK", "K8S_POD_NAMESPACE"]),
        service: pick("meshnet.service", &["MESHNET_SERVICE"]),
    }
}

/// The ADD (and CHECK's expected) result for an attached container.
pub fn add_result(container: &Container, prefix: u8, domain: &str, netns: &str) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "interfaces": [{
            "name": IFNAME,
            "mac": container.mac.to_string(),
            "sandbox": netns,
        }],
        "ips": [{
            "address": format!("{}/{prefix}", container.address),
            "interface": 0,
        }],
        "routes": [{ "dst": format!("{SERVICE_ADDRESS}/32") }],
        "dns": {
            "nameservers": [SERVICE_ADDRESS.to_string()],
            "domain": domain,
            "search": [format!("{}.{domain}", container.stack), domain.to_owned()],
        },
    })
}

/// CHECK: the agent's record must still be the one ADD reported.
pub fn check(container: &Container, prev_result: Option<&Value>) -> Result<(), CniError> {
    let Some(prev) = prev_result else {
        return Ok(());
    };
    let expected = container.address;
    let listed: Vec<Ipv4Addr> = prev
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok())
        .collect();
    if listed.contains(&expected) {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::AgentRefused,
        format!("the container holds {expected}, not the address its ADD result reported"),
        format!("prevResult ips: {listed:?}"),
    ))
}

/// VERSION's answer.
pub fn version_result() -> Value {
    json!({ "cniVersion": CNI_VERSION, "supportedVersions": [CNI_VERSION] })
}

/// The interface name a runtime asked for must be the one the agent makes.
pub fn check_ifname(ifname: &str) -> Result<(), CniError> {
    if ifname == IFNAME {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::InvalidConfig,
        format!("meshnet names the container's interface {IFNAME}, not {ifname:?}"),
        "use meshnet as the container's first network",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::core::ethernet::Mac;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0123456789abcdef0123"),
        ("CNI_NETNS", "/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
    ];

    fn conf(text: &str) -> NetConf {
        NetConf::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn add_needs_netns_and_ifname_but_del_does_not() {
        let inv = Invocation::from_env(env(ADD)).unwrap();
        assert_eq!(inv.netns.as_deref(), Some("/run/netns/cni-1"));
        let no_netns: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .collect();
        let err = Invocation::from_env(env(&no_netns)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.msg.contains("CNI_NETNS"), "{err}");
        let del: Vec<_> = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "x")].to_vec();
        assert_eq!(Invocation::from_env(env(&del)).unwrap().netns, None);
        let bad = Invocation::from_env(env(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert!(bad.msg.contains("FROB"));
        assert!(Invocation::from_env(env(&[("CNI_COMMAND", "VERSION")])).is_ok());
    }

    #[test]
    fn config_must_be_json_of_version_1_0_0() {
        let err = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(err.code, ErrorCode::Decode);
        let old = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"m"}"#).unwrap_err();
        assert_eq!(old.code, ErrorCode::IncompatibleVersion);
        let ok = conf(r#"{"cniVersion":"1.0.0","name":"meshnet","type":"meshnet-cni"}"#);
        assert_eq!(ok.domain(), "mesh.internal");
    }

    #[test]
    fn labels_win_over_cni_args_and_the_id_is_the_last_resort() {
        let inv = Invocation::from_env(env(ADD)).unwrap();
        let plain = conf(r#"{"cniVersion":"1.0.0","name":"m"}"#);
        assert_eq!(identity(&inv, &plain).name, "web");
        assert_eq!(identity(&inv, &plain).stack, None);
        let labelled = conf(
            r#"{"cniVersion":"1.0.0","name":"m","args":{"cni":{"labels":[
                {"key":"meshnet.name","value":"api"},{"key":"meshnet.stack","value":"shop"},
                {"key":"meshnet.service","value":"api"}]}}}"#,
        );
        let id = identity(&inv, &labelled);
        assert_eq!(
            (id.name.as_str(), id.stack.as_deref(), id.service.as_deref()),
            ("api", Some("shop"), Some("api"))
        );
        let bare: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_ARGS")
            .collect();
        let inv = Invocation::from_env(env(&bare)).unwrap();
        assert_eq!(identity(&inv, &plain).name, "0123456789ab");
    }

    fn container() -> Container {
        let address = Ipv4Addr::new(10, 42, 1, 2);
        Container {
            name: "web".into(),
            stack: "default".into(),
            service: None,
            netns: "/run/netns/cni-1".into(),
            address,
            mac: Mac::of_container(address),
            host_veth: "mv0a2a0102".into(),
            ports: Vec::new(),
        }
    }

    #[test]
    fn add_result_carries_mac_ips_routes_and_dns() {
        let c = container();
        let r = add_result(&c, 16, "mesh.internal", "/run/netns/cni-1");
        assert_eq!(r["interfaces"][0]["mac"], c.mac.to_string());
        assert_eq!(r["ips"][0]["address"], "10.42.1.2/16");
        assert_eq!(r["routes"][0]["dst"], "169.254.169.250/32");
        assert_eq!(r["dns"]["nameservers"][0], "169.254.169.250");
        assert_eq!(r["dns"]["search"][0], "default.mesh.internal");
        assert!(check(&c, Some(&r)).is_ok());
        let other = add_result(
            &Container {
                address: Ipv4Addr::new(10, 42, 1, 9),
                ..c.clone()
            },
            16,
            "mesh.internal",
            "x",
        );
        assert!(check(&c, Some(&other)).is_err());
    }

    #[test]
    fn errors_follow_the_spec_shape() {
        let e = CniError::new(ErrorCode::Decode, "bad", "why");
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["code"], 6);
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "why");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(check_ifname("net1").is_err());
    }
}
