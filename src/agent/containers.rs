//! TAP mode's containers: attach and detach as background operations, the
//! IPAM table with its persistence, and restoring both after a restart.
//!
//! An attach reserves its address first (so concurrent attaches cannot
//! collide), runs the `ip` plumbing in a task of its own, then saves the
//! table and writes the container's resolv.conf off the packet task, and
//! is committed (neighbour entry, records) or rolled back when that
//! reports. Must never: persist a container whose link was not made, leave
//! a reservation behind when an attach fails, or write a file on the
//! packet task.

use std::collections::HashSet;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::netops::{self, ContainerLink, NetopsError};
use super::state::{StateError, StateFile, StateWriter};
use super::{AgentError, Shell};
use crate::config::Config;
use crate::control::{AttachRequest, Response};
use crate::core::Node;
use crate::core::ethernet::Mac;
use crate::core::ipam::{Container, DEFAULT_STACK, Ipam, NetnsRef, check_netns_name};
use crate::core::isolation::Port;

pub struct Containers {
    ipam: Ipam,
    writer: StateWriter,
    bridge: String,
    mtu: u16,
    prefix: u8,
    /// The cluster's DNS domain: names must fit in it.
    domain: String,
    /// Namespaces with an attach or detach under way.
    busy: HashSet<String>,
    /// Whether attach configures the container's side itself (it may
    /// enter other namespaces), or leaves it to the caller.
    inside: bool,
}

/// What a background save is for.
#[derive(Clone, Copy)]
enum Change {
    Attached,
    Detached,
}

/// A finished background operation, with the client waiting for it.
pub enum OpDone {
    Attached {
        container: Container,
        result: Result<(), NetopsError>,
        reply: oneshot::Sender<Response>,
    },
    Detached {
        container: Container,
        result: Result<(), NetopsError>,
        reply: oneshot::Sender<Response>,
    },
    /// The table with an attached container is saved (or not).
    AttachSaved {
        container: Container,
        saved: Result<(), StateError>,
        reply: oneshot::Sender<Response>,
    },
    /// The table without a detached container is saved (or not).
    DetachSaved {
        container: Container,
        saved: Result<(), StateError>,
        reply: oneshot::Sender<Response>,
    },
}

impl Containers {
    /// Rebuilds the table from saved state: containers whose link vanished
    /// while the agent was down are freed, the rest are put back on the
    /// bridge (which may be new) and into the node's neighbour table.
    pub async fn restore(
        config: &Config,
        mtu: u16,
        saved: Vec<Container>,
        node: &mut Node,
    ) -> Result<Self, AgentError> {
        let (mut ipam, refused) = Ipam::restore(config.subnet, saved);
        for (c, e) in refused {
            warn!(container = %c.name, error = %e, "saved container refused");
        }
        let vanished: Vec<String> = ipam
            .containers()
            .filter(|c| !netops::link_exists(&c.host_veth))
            .map(|c| c.netns.clone())
            .collect();
        for netns in vanished {
            if let Some(c) = ipam.release(&netns) {
                info!(container = %c.name, address = %c.address, "container vanished while the agent was down; address freed");
            }
        }
        install_filter(&mut ipam, !config.policy.allows_everything()).await?;
        for c in ipam.containers() {
            netops::enslave(&c.host_veth, &config.bridge).await?;
            node.set_neighbour(c.address, c.mac);
        }
        let state = StateFile::in_dir(&config.state_dir);
        // Before the agent serves anything: the one write allowed here.
        state.save(ipam.containers())?;
        let containers = Self {
            ipam,
            writer: StateWriter::start(state),
            bridge: config.bridge.clone(),
            mtu,
            prefix: config.overlay.prefix_len(),
            domain: config.dns.domain.clone(),
            busy: HashSet::new(),
            inside: netops::can_enter_namespaces(),
        };
        info!(
            containers = containers.ipam.containers().count(),
            "containers restored"
        );
        if !containers.inside {
            info!(
                "no CAP_SYS_ADMIN: attach makes each container's eth0, and the caller \
                 (meshctl attach, meshnet-cni) gives it its address inside the namespace"
            );
        }
        Ok(containers)
    }

    pub fn list(&self) -> Vec<Container> {
        self.ipam.containers().cloned().collect()
    }

    /// Checks an attach request and reserves its address.
    fn reserve(&mut self, req: AttachRequest) -> Result<Container, String> {
        let netns = NetnsRef::parse(&req.netns).map_err(|e| e.to_string())?;
        let stack = req
            .stack
            .clone()
            .unwrap_or_else(|| DEFAULT_STACK.to_owned());
        // Opened once here for a clear error; attach opens it again.
        netops::open_netns(netns).map_err(|e| e.to_string())?;
        if self.busy.contains(&req.netns) {
            return Err(format!(
                "an attach or detach of {} is already under way",
                req.netns
            ));
        }
        let ports = req
            .ports
            .iter()
            .map(|p| p.parse::<crate::dns::ServicePort>())
            .collect::<Result<Vec<_>, _>>()?;
        if !ports.is_empty() && req.service.is_none() {
            return Err(
                "--port needs --service: ports are published as SRV records of the service".into(),
            );
        }
        // What every peer will check before publishing this container.
        let record = crate::dns::ContainerRecord {
            name: req.name.clone(),
            stack: stack.clone(),
            service: req.service.clone(),
            address: crate::membership::host_address(self.ipam.subnet()),
            ports: ports.clone(),
        };
        record
            .validate(&self.domain, self.ipam.subnet())
            .map_err(|e| e.to_string())?;
        if self.ipam.containers().count() >= crate::dns::records::MAX_CONTAINERS_PER_HOST {
            return Err(crate::dns::records::RecordError::TooManyContainers(
                crate::dns::records::MAX_CONTAINERS_PER_HOST + 1,
            )
            .to_string());
        }
        let address = self.ipam.choose(req.ip).map_err(|e| e.to_string())?;
        let container = Container {
            name: req.name,
            stack,
            service: req.service,
            netns: req.netns,
            address,
            mac: Mac::of_container(address),
            host_veth: netops::host_veth_name(address),
            ports,
        };
        self.ipam
            .insert(container.clone())
            .map_err(|e| e.to_string())?;
        self.busy.insert(container.netns.clone());
        Ok(container)
    }
}

impl Shell {
    pub(super) fn begin_attach(&mut self, req: AttachRequest, reply: oneshot::Sender<Response>) {
        let Some(containers) = self.containers.as_mut() else {
            let _ = reply.send(Response::Error(tap_only("attach")));
            return;
        };
        let container = match containers.reserve(req) {
            Ok(c) => c,
            Err(msg) => {
                let _ = reply.send(Response::Error(msg));
                return;
            }
        };
        let (bridge, mtu, prefix) = (containers.bridge.clone(), containers.mtu, containers.prefix);
        let inside = containers.inside;
        let ops = self.ops.clone();
        tokio::spawn(async move {
            let link = ContainerLink {
                netns: &container.netns,
                host_veth: &container.host_veth,
                bridge: &bridge,
                address: container.address,
                prefix,
                mac: container.mac,
                mtu,
            };
            let result = netops::attach(&link, inside).await;
            report(
                &ops,
                OpDone::Attached {
                    container,
                    result,
                    reply,
                },
            )
            .await;
        });
    }

    pub(super) fn begin_detach(&mut self, netns: String, reply: oneshot::Sender<Response>) {
        let Some(containers) = self.containers.as_mut() else {
            let _ = reply.send(Response::Error(tap_only("detach")));
            return;
        };
        if let Err(e) = check_netns_name(&netns) {
            let _ = reply.send(Response::Error(e.to_string()));
            return;
        }
        let Some(container) = containers.ipam.by_netns(&netns).cloned() else {
            let _ = reply.send(Response::Error(format!(
                "no container is attached in namespace {netns}"
            )));
            return;
        };
        if !containers.busy.insert(netns.clone()) {
            let _ = reply.send(Response::Error(format!(
                "an attach or detach of {netns} is already under way"
            )));
            return;
        }
        let ops = self.ops.clone();
        tokio::spawn(async move {
            let result = netops::detach(&container.host_veth).await;
            report(
                &ops,
                OpDone::Detached {
                    container,
                    result,
                    reply,
                },
            )
            .await;
        });
    }

    pub(super) fn finish_op(&mut self, done: OpDone) {
        let Some(containers) = self.containers.as_mut() else {
            return;
        };
        let (response, reply) = match done {
            OpDone::Attached {
                container,
                result: Ok(()),
                reply,
            } => return self.save_in_background(container, reply, Change::Attached),
            OpDone::Attached {
                container,
                result: Err(e),
                reply,
            } => {
                containers.busy.remove(&container.netns);
                containers.ipam.release(&container.netns);
                (Response::Error(e.to_string()), reply)
            }
            OpDone::AttachSaved {
                container,
                saved,
                reply,
            } => {
                containers.busy.remove(&container.netns);
                let response = match saved {
                    Ok(()) => {
                        self.node.set_neighbour(container.address, container.mac);
                        info!(container = %container.name, stack = %container.stack, address = %container.address, "container attached");
                        Response::Container(container)
                    }
                    Err(e) => {
                        containers.ipam.release(&container.netns);
                        let veth = container.host_veth.clone();
                        tokio::spawn(async move { netops::detach(&veth).await });
                        Response::Error(format!("attached, but {e}; rolled back"))
                    }
                };
                (response, reply)
            }
            OpDone::Detached {
                container,
                result: Ok(()),
                reply,
            } => {
                containers.ipam.release(&container.netns);
                self.node.remove_neighbour(container.address);
                info!(container = %container.name, address = %container.address, "container detached");
                return self.save_in_background(container, reply, Change::Detached);
            }
            OpDone::Detached {
                container,
                result: Err(e),
                reply,
            } => {
                containers.busy.remove(&container.netns);
                (Response::Error(e.to_string()), reply)
            }
            OpDone::DetachSaved {
                container,
                saved,
                reply,
            } => {
                containers.busy.remove(&container.netns);
                let response = match saved {
                    Ok(()) => Response::Container(container),
                    Err(e) => Response::Error(format!("detached, but {e}")),
                };
                (response, reply)
            }
        };
        // The reply waits for the zone that includes the change, so a name
        // resolves on this host as soon as `meshctl attach` returns.
        let version = self.publish_records();
        self.reply_once_published(version, reply, response);
    }

    /// Saves the table as it is now, then writes or removes the
    /// container's resolv.conf, all off the packet task, and reports back
    /// (`AttachSaved` or `DetachSaved`) to commit or roll back.
    fn save_in_background(
        &self,
        container: Container,
        reply: oneshot::Sender<Response>,
        change: Change,
    ) {
        let Some(containers) = self.containers.as_ref() else {
            return;
        };
        let (writer, table) = (containers.writer.clone(), containers.list());
        let (domain, ops) = (self.config.dns.domain.clone(), self.ops.clone());
        tokio::spawn(async move {
            let saved = writer.save(table).await;
            let done = match change {
                Change::Attached => {
                    if saved.is_ok() {
                        write_resolv_conf_off_task(&container, domain).await;
                    }
                    OpDone::AttachSaved {
                        container,
                        saved,
                        reply,
                    }
                }
                Change::Detached => {
                    let netns = container.netns.clone();
                    let _ = tokio::task::spawn_blocking(move || remove_resolv_conf(&netns)).await;
                    OpDone::DetachSaved {
                        container,
                        saved,
                        reply,
                    }
                }
            };
            report(&ops, done).await;
        });
    }

    /// Tells the record sync what this host now publishes; returns the
    /// version the zone will carry once it includes this.
    pub(super) fn publish_records(&mut self) -> u64 {
        let containers = self
            .containers
            .as_ref()
            .map(|c| c.list())
            .unwrap_or_default();
        self.local_version += 1;
        let records = crate::dns::HostRecords {
            host: self.config.name.clone(),
            address: self.node.address(),
            containers: containers
                .into_iter()
                .map(|c| crate::dns::ContainerRecord {
                    name: c.name,
                    stack: c.stack,
                    service: c.service,
                    address: c.address,
                    ports: c.ports,
                })
                .collect(),
        };
        self.local_records
            .send_replace((self.local_version, records));
        self.local_version
    }
}

/// Rebuilds the bridge filter for exactly the restored containers, in one
/// transaction, so a stale or tampered table is replaced before any port
/// is (re)enslaved. A record whose port name the filter cannot take is
/// freed rather than left unfiltered.
async fn install_filter(ipam: &mut Ipam, hairpin: bool) -> Result<(), NetopsError> {
    let mut ports = Vec::new();
    let mut refused = Vec::new();
    for c in ipam.containers() {
        match Port::new(&c.host_veth, c.mac, c.address) {
            Ok(port) => ports.push(port),
            Err(e) => {
                warn!(container = %c.name, error = %e, "saved container refused");
                refused.push(c.netns.clone());
            }
        }
    }
    for netns in refused {
        ipam.release(&netns);
    }
    netops::install_filter(&ports, hairpin).await?;
    info!(ports = ports.len(), hairpin, "bridge filter installed");
    Ok(())
}

/// Writes the container's resolv.conf on the blocking pool; a failure is
/// logged (the container works, it just lacks the search list).
async fn write_resolv_conf_off_task(container: &Container, domain: String) {
    let (netns, stack, name) = (
        container.netns.clone(),
        container.stack.clone(),
        container.name.clone(),
    );
    let written =
        tokio::task::spawn_blocking(move || write_resolv_conf(&netns, &stack, &domain)).await;
    if let Ok(Err(e)) = written {
        warn!(container = %name, error = %e, "cannot write the container's resolv.conf");
    }
}

/// The container's resolver: `ip netns exec` binds /etc/netns/NS/resolv.conf
/// over /etc/resolv.conf inside the namespace.
/// A namespace given by path has no /etc/netns: its runtime sets up the
/// resolver (a CNI runtime from the plugin's result).
fn write_resolv_conf(netns: &str, stack: &str, domain: &str) -> std::io::Result<()> {
    let Ok(NetnsRef::Name(netns)) = NetnsRef::parse(netns) else {
        return Ok(());
    };
    let dir = std::path::Path::new("/etc/netns").join(netns);
    std::fs::create_dir_all(&dir)?;
    let text = format!(
        "# written by meshd for container namespace {netns}\nnameserver {}\nsearch {stack}.{domain} {domain}\n",
        crate::core::service::SERVICE_ADDRESS
    );
    let tmp = dir.join("resolv.conf.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("resolv.conf"))
}

fn remove_resolv_conf(netns: &str) {
    let Ok(NetnsRef::Name(netns)) = NetnsRef::parse(netns) else {
        return;
    };
    let dir = std::path::Path::new("/etc/netns").join(netns);
    let _ = std::fs::remove_file(dir.join("resolv.conf"));
    let _ = std::fs::remove_dir(dir);
}

async fn report(ops: &mpsc::Sender<OpDone>, done: OpDone) {
    // The agent is gone only when it is shutting down; nothing to report to.
    let _ = ops.send(done).await;
}

fn tap_only(what: &str) -> String {
    format!("{what} needs mode = \"tap\" in the agent's config (this agent runs in tun mode)")
}
