//! The IO shell: moves bytes between the overlay device, the underlay UDP
//! socket and the core, drives its timers, and answers the control socket.
//!
//! One task owns the `Node` and selects over device, socket, timer, control
//! requests, membership changes and finished container operations; each
//! wake-up reads a batch of what is ready and hands the core's `Outbox` to
//! the send stage in one go (written on a thread of its own where the host
//! has cores to spare). Must never: make a decision about a packet (that
//! is the core's job), spawn a task or take a lock per packet, or wait on a
//! membership source or an `ip` command in the data path.

pub mod containers;
pub mod control_server;
pub mod device;
pub mod device_io;
pub mod dns_server;
pub mod limits;
pub mod metrics;
pub mod netlink;
pub mod netops;
pub mod records_sync;
pub mod reload;
pub mod send_stage;
pub mod state;
pub mod uapi_server;
pub mod underlay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::config::{Config, Mode};
use crate::control::{HostStatus, Request, Response};
use crate::core::ethernet::Mac;
use crate::core::{Identity, LinkMode, Node, Outbox};
use crate::membership::{self, Membership};
use containers::{Containers, OpDone};
use control_server::{ControlRequest, ControlSocket, ControlSocketError};
use device::DeviceError;
use device_io::DeviceIo;
use netops::NetopsError;
use send_stage::SendStage;
use state::StateError;
use underlay::{Underlay, UnderlayError};

/// boringtun wants its timers driven every 100-250 ms.
const TICK: Duration = Duration::from_millis(100);
/// Reads per wake-up before the loop looks at other sources again: enough
/// to amortise the wake-up, small enough to keep latency fair.
const BATCH: usize = 64;
/// Bytes a wake-up may read before it flushes, whatever `BATCH` says: with
/// offloads one read brings up to 64 KiB (a super-packet) or 512 KiB (GRO
/// over recvmmsg), and everything read waits in the Outbox until the
/// flush. Without this bound 64 GRO reads grew the agent to 41 MiB RSS.
const BATCH_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    ControlSocket(#[from] ControlSocketError),
    #[error(transparent)]
    Underlay(#[from] UnderlayError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("setting up bridge: {0}")]
    Bridge(#[from] NetopsError),
    #[error(transparent)]
    Dns(#[from] dns_server::DnsError),
    #[error("cannot serve metrics on {at}: {source}")]
    Metrics {
        at: SocketAddr,
        source: std::io::Error,
    },
    #[error("the overlay device {device} failed: {source}; was it deleted?")]
    DeviceLost {
        device: String,
        source: std::io::Error,
    },
}

/// The interfaces whose MTU the tunnel must fit in: all but TAP mode's
/// bridge and its ports. Those already carry the inner MTU and outlive a
/// restart; counting them took 80 bytes off the MTU at every restart.
fn underlay_candidates(config: &Config) -> Vec<device::Interface> {
    let on_bridge = |name: &str| {
        std::fs::read_link(
            std::path::Path::new("/sys/class/net")
                .join(name)
                .join("master"),
        )
        .is_ok_and(|m| m.file_name() == Some(config.bridge.as_ref()))
    };
    device::system_interfaces()
        .into_iter()
        .filter(|i| i.name != config.bridge && !on_bridge(&i.name))
        .collect()
}

/// Runs the agent until `shutdown` completes. Peers come from `membership`
/// (its current value at start, then every change). The device and control
/// socket are removed on return; in TAP mode the bridge and the containers
/// on it stay, so local traffic survives an agent restart.
pub async fn run(
    config: Config,
    membership: watch::Receiver<Membership>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_with_store(config, membership, None, shutdown).await
}

/// What the agent exchanges with a membership store besides `Membership`.
pub struct StoreLink {
    /// The store's state, for `meshctl store`.
    pub report: watch::Receiver<crate::store::StoreReport>,
    /// Other hosts' DNS records as the store holds them.
    pub records: watch::Receiver<crate::dns::sync::StoreRecords>,
    /// This host's DNS records, for the store to publish.
    pub publish: watch::Sender<Option<Arc<crate::dns::HostRecords>>>,
}

/// `run`, with membership and DNS records from a store whose state
/// `meshctl store` shows.
pub async fn run_with_store(
    config: Config,
    membership: watch::Receiver<Membership>,
    store: Option<StoreLink>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    limits::raise_open_files();
    // Everything that can fail because of another running agent, or bad
    // state, is checked before the device is created.
    control_server::clear_stale(&config.control_socket)?;
    let udp = Underlay::new(underlay::bind(config.listen)?, config.offload);
    let metrics_listener = match config.metrics_listen {
        Some(at) => Some(
            metrics::bind(at)
                .await
                .map_err(|source| AgentError::Metrics { at, source })?,
        ),
        None => None,
    };
    let (members, mut membership) = follow(membership);
    let listen = udp.local_addr().unwrap_or(config.listen);
    let mtu = config
        .mtu
        .unwrap_or_else(|| device::inner_mtu(&underlay_candidates(&config), &config.device));
    let address = membership::host_address(config.subnet);
    let identity = Identity {
        name: config.name.clone(),
        private_key: config.private_key.clone(),
        subnet: config.subnet,
        overlay: config.overlay,
    };
    let (tun, containers, mut node) = match config.mode {
        Mode::Tun => {
            let tun = device::create_tun(
                &config.device,
                address,
                config.overlay.prefix_len(),
                mtu,
                config.offload,
            )?;
            netops::bring_up_device(&config.device).await?;
            (
                tun,
                None,
                Node::new(&identity, LinkMode::Tun, mtu, Instant::now()),
            )
        }
        Mode::Tap => {
            let records = state::StateFile::in_dir(&config.state_dir).load()?;
            let key = config.public_key();
            let prefix = config.overlay.prefix_len();
            netops::ensure_bridge(&config.bridge, Mac::of_bridge(&key), address, prefix, mtu)
                .await?;
            let tap = device::create_tap(&config.device, mtu, config.offload)?;
            netops::bring_up_device(&config.device).await?;
            netops::enslave(&config.device, &config.bridge).await?;
            let mut node = Node::new(&identity, LinkMode::Tap, mtu, Instant::now());
            let containers = Containers::restore(&config, mtu, records, &mut node).await?;
            (tap, Some(containers), node)
        }
    };
    netops::set_up_service_address((config.mode == Mode::Tap).then_some(config.bridge.as_str()))
        .await?;
    let (store, store_records) = match store {
        Some(link) => (Some(link.report), Some((link.records, link.publish))),
        None => (None, None),
    };
    let sync = start_records_sync(&config, address, &membership, store_records);
    let upstreams = config
        .dns
        .upstream
        .clone()
        .unwrap_or_else(dns_server::system_upstreams);
    let (upstreams, upstreams_rx) = watch::channel(upstreams);
    let dns_counters = dns_server::serve(sync.zone.clone(), upstreams_rx, config.subnet).await?;
    let mut control = ControlSocket::bind(&config.control_socket)?;
    let (control_tx, control_rx) = mpsc::channel(16);
    let uapi = uapi_server::serve(
        std::path::Path::new(uapi_server::UAPI_DIR),
        &config.device,
        control_tx.clone(),
    );
    let (policy_tx, policy_rx) = watch::channel(config.policy.clone());
    let reloads = reload::spawn(
        config.clone(),
        reload::Ends {
            membership: members,
            upstreams,
            withdraw_after: sync.withdraw_after,
            metrics: metrics::spawn(metrics_listener, control_tx.clone()),
            policy: policy_tx,
        },
    );
    control.serve(control_tx);
    node.apply_membership(&membership.borrow_and_update());
    let device = DeviceIo::new(tun, config.mode == Mode::Tap);
    let send = SendStage::new(udp.sender(), device.writer());
    let (udp_gso, udp_gro) = udp.offloads();
    tracing::info!(
        name = %config.name,
        public_key = %config.public_key(),
        mode = ?config.mode,
        device = %config.device,
        address = %address,
        mtu,
        listen = %listen,
        peers = membership.borrow().peers.len(),
        tun_offload = device.offload(),
        device_uso = device.udp_offload(),
        udp_gso,
        udp_gro,
        send_thread = send.threaded(),
        metrics = ?config.metrics_listen,
        "meshd running"
    );

    let (ops_tx, ops_rx) = mpsc::channel(16);
    let shell = Shell {
        config,
        node,
        udp,
        device,
        send,
        mtu,
        listen,
        started: Instant::now(),
        containers,
        ops: ops_tx,
        local_records: sync.local,
        local_version: 0,
        zone_includes: sync.zone_includes,
        awaiting_zone: Vec::new(),
        zone: sync.zone,
        sync_in: sync.inbound,
        sync_out: sync.outbound,
        sync_refused: sync.refused,
        dns_counters,
        policy_version: 0,
        policy: policy_rx,
        reloads,
        store,
    };
    let mut shell = shell;
    shell.refresh_policy();
    shell.publish_records();
    let result = shell
        .serve(control_rx, ops_rx, &mut membership, shutdown)
        .await;
    drop(control);
    drop(uapi);
    if result.is_ok() {
        tracing::info!("meshd stopped; device and control socket removed");
    }
    result
}

struct Shell {
    config: Config,
    node: Node,
    udp: Underlay,
    device: DeviceIo,
    send: SendStage,
    mtu: u16,
    listen: SocketAddr,
    started: Instant,
    /// TAP mode: attached containers and their plumbing.
    containers: Option<Containers>,
    /// Where background container operations report back.
    ops: mpsc::Sender<OpDone>,
    /// What this host publishes to the cluster's DNS, with a version that
    /// counts the changes.
    local_records: watch::Sender<(u64, crate::dns::HostRecords)>,
    local_version: u64,
    /// The newest local version the published zone includes.
    zone_includes: watch::Receiver<u64>,
    /// Control replies that wait for the zone to include a change.
    awaiting_zone: Vec<(u64, tokio::sync::oneshot::Sender<Response>, Response)>,
    /// The zone as the record sync last built it.
    zone: watch::Receiver<Arc<crate::dns::Zone>>,
    /// Records-sync messages decrypted from peers, to the sync task.
    sync_in: mpsc::Sender<records_sync::Inbound>,
    /// Records-sync messages to seal for a peer, from the sync task.
    sync_out: mpsc::Receiver<crate::dns::sync::Transmit>,
    sync_refused: Arc<AtomicU64>,
    dns_counters: Arc<dns_server::Counters>,
    /// Rises with every new policy or set of identities.
    policy_version: u64,
    /// The `[policy]` table, as reloads change it.
    policy: watch::Receiver<crate::policy::Policy>,
    /// `meshctl reload` requests, to the reload task.
    reloads: mpsc::Sender<tokio::sync::oneshot::Sender<Response>>,
    /// The membership store's report, when peers come from one.
    store: Option<watch::Receiver<crate::store::StoreReport>>,
}

/// The packet task's ends of the records sync.
struct SyncEnds {
    local: watch::Sender<(u64, crate::dns::HostRecords)>,
    zone_includes: watch::Receiver<u64>,
    zone: watch::Receiver<Arc<crate::dns::Zone>>,
    inbound: mpsc::Sender<records_sync::Inbound>,
    outbound: mpsc::Receiver<crate::dns::sync::Transmit>,
    refused: Arc<AtomicU64>,
    withdraw_after: watch::Sender<Duration>,
}

/// The agent's own view of the membership: what `source` publishes, and
/// what a reload of the config file sets.
fn follow(
    mut source: watch::Receiver<Membership>,
) -> (watch::Sender<Membership>, watch::Receiver<Membership>) {
    let (tx, rx) = watch::channel(source.borrow_and_update().clone());
    let forward = tx.clone();
    tokio::spawn(async move {
        while source.changed().await.is_ok() {
            forward.send_replace(source.borrow_and_update().clone());
        }
    });
    (tx, rx)
}

/// Starts the records-sync task. The zone starts from this host's own
/// records, so the domain is answered from the first query on.
fn start_records_sync(
    config: &Config,
    address: std::net::Ipv4Addr,
    membership: &watch::Receiver<Membership>,
    store: Option<records_sync::StoreEnds>,
) -> SyncEnds {
    let records = crate::dns::HostRecords {
        host: config.name.clone(),
        address,
        containers: Vec::new(),
    };
    let zone = crate::dns::Zone::build(&config.dns.domain, config.overlay, [&records]);
    let (zone_tx, zone_rx) = watch::channel(Arc::new(zone));
    let (local_tx, local_rx) = watch::channel((0, records.clone()));
    let (includes_tx, includes_rx) = watch::channel(0);
    let (in_tx, in_rx) = mpsc::channel(records_sync::INBOUND_QUEUE);
    let (out_tx, out_rx) = mpsc::channel(records_sync::OUTBOUND_QUEUE);
    let refused = Arc::new(AtomicU64::new(0));
    let (withdraw_tx, withdraw_rx) = watch::channel(config.dns.withdraw_after);
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let sync = crate::dns::sync::RecordsSync::new(
        &config.dns.domain,
        config.dns.withdraw_after,
        records,
        epoch,
        Instant::now(),
    );
    tokio::spawn(
        records_sync::SyncTask {
            sync,
            domain: config.dns.domain.clone(),
            overlay: config.overlay,
            membership: membership.clone(),
            local: local_rx,
            inbound: in_rx,
            outbound: out_tx,
            zone: zone_tx,
            zone_includes: includes_tx,
            refused: refused.clone(),
            withdraw_after: withdraw_rx,
            store,
        }
        .run(),
    );
    SyncEnds {
        local: local_tx,
        zone_includes: includes_rx,
        zone: zone_rx,
        inbound: in_tx,
        outbound: out_rx,
        refused,
        withdraw_after: withdraw_tx,
    }
}

impl Shell {
    async fn serve(
        mut self,
        mut control: mpsc::Receiver<ControlRequest>,
        mut ops: mpsc::Receiver<OpDone>,
        membership: &mut watch::Receiver<Membership>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut out = Outbox::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut membership_open = true;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => self.node.handle_timers(Instant::now(), &mut out),
                Some((req, reply)) = control.recv() => self.answer(req, reply),
                Some(done) = ops.recv() => self.finish_op(done),
                Ok(()) = self.zone_includes.changed() => self.release_replies(),
                Ok(()) = self.zone.changed() => self.refresh_policy(),
                Ok(()) = self.policy.changed() => self.reload_policy(),
                Some(transmit) = self.sync_out.recv() => {
                    let now = Instant::now();
                    self.node.send_sync(now, &transmit.to, &transmit.payload, &mut out);
                    for _ in 1..BATCH {
                        let Ok(t) = self.sync_out.try_recv() else { break };
                        self.node.send_sync(now, &t.to, &t.payload, &mut out);
                    }
                }
                changed = membership.changed(), if membership_open => match changed {
                    Ok(()) => self.node.apply_membership(&membership.borrow_and_update()),
                    Err(_) => membership_open = false,
                },
                ready = self.udp.readable() => match ready {
                    Ok(()) => {
                        let now = Instant::now();
                        let node = &mut self.node;
                        self.udp.drain(BATCH, BATCH_BYTES, |from, datagram| {
                            node.handle_datagram(now, from, datagram, &mut out);
                        });
                    }
                    Err(e) => tracing::debug!(error = %e, "underlay receive failed"),
                },
                read = self.device.recv() => self.device_input(read, &mut out)?,
            }
            if !out.is_empty() {
                self.flush(&mut out).await;
            }
        }
        Ok(())
    }

    /// Sends `response` once the published zone includes local version
    /// `version`.
    fn reply_once_published(
        &mut self,
        version: u64,
        reply: tokio::sync::oneshot::Sender<Response>,
        response: Response,
    ) {
        self.awaiting_zone.push((version, reply, response));
        self.release_replies();
    }

    fn release_replies(&mut self) {
        let published = *self.zone_includes.borrow_and_update();
        let (ready, waiting) = std::mem::take(&mut self.awaiting_zone)
            .into_iter()
            .partition(|(v, _, _)| *v <= published);
        self.awaiting_zone = waiting;
        for (_, reply, response) in ready {
            let _ = reply.send(response);
        }
    }

    /// Hands the packets of a device read, then of up to a batch more
    /// reads that are ready, to the core. A read the offload could not
    /// split is a counted drop; only an error from the device itself ends
    /// the agent.
    fn device_input(
        &mut self,
        mut read: std::io::Result<usize>,
        out: &mut Outbox,
    ) -> Result<(), AgentError> {
        let now = Instant::now();
        let mut taken = 0;
        for _ in 0..BATCH {
            match read {
                Ok(_) => {
                    while let Some(bytes) = self.device.next_packet() {
                        taken += bytes.len();
                        match self.config.mode {
                            Mode::Tun => self.node.handle_device_packet(now, bytes, out),
                            Mode::Tap => self.node.handle_device_frame(now, bytes, out),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(source) if source.raw_os_error().is_some() => {
                    let device = self.config.device.clone();
                    return Err(AgentError::DeviceLost { device, source });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "unusable read from the device");
                    self.node.count_io_drop();
                }
            }
            if taken >= BATCH_BYTES {
                break;
            }
            read = self.device.try_recv();
        }
        Ok(())
    }

    /// Sends everything the core produced; a failed send is a counted drop.
    async fn flush(&mut self, out: &mut Outbox) {
        for (from, message) in out.sync() {
            if self.sync_in.try_send((from, message.to_vec())).is_err() {
                self.node.count_sync_backlog();
            }
        }
        for _ in 0..self.send.submit(out).await {
            self.node.count_io_drop();
        }
    }

    /// A reload's new `[policy]`. In TAP mode, whether containers of this
    /// host must pass through the agent follows whether it can deny.
    fn reload_policy(&mut self) {
        let fresh = self.policy.borrow_and_update().clone();
        let hairpin = !fresh.allows_everything();
        let was = !self.config.policy.allows_everything();
        self.config.policy = fresh;
        self.refresh_policy();
        if self.config.mode == Mode::Tap && hairpin != was {
            tokio::spawn(async move {
                match netops::set_hairpin(hairpin).await {
                    Ok(()) => tracing::info!(hairpin, "bridge filter updated for the new policy"),
                    Err(e) => tracing::error!(error = %e, "updating the bridge filter failed"),
                }
            });
        }
    }

    /// Gives the node the configured policy with the identities of the
    /// newest zone, as one new version.
    fn refresh_policy(&mut self) {
        let identities = self.zone.borrow_and_update().identities().clone();
        self.policy_version += 1;
        self.node
            .set_policy(Arc::new(crate::policy::conntrack::Rules {
                policy: self.config.policy.clone(),
                identities,
                version: self.policy_version,
            }));
    }

    fn answer(&mut self, req: Request, reply: tokio::sync::oneshot::Sender<Response>) {
        let now = Instant::now();
        let response = match req {
            Request::Peers => Response::Peers(self.node.peer_statuses(now)),
            Request::Status => Response::Status(self.status(now)),
            Request::Containers => match &self.containers {
                Some(c) => Response::Containers(c.list()),
                None => Response::Containers(Vec::new()),
            },
            Request::Dns => Response::Records(self.zone.borrow().views().to_vec()),
            Request::PolicyTest { from, to, port } => {
                let rules = self.node.policy().rules();
                match crate::policy::explain::test(rules, &from, &to, &port) {
                    Ok(verdict) => Response::Verdict(verdict),
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::Drops { after } => {
                let policy = self.node.policy();
                let records = policy.recent_drops(after);
                Response::Drops(crate::policy::explain::drops(policy.rules(), records, now))
            }
            Request::Attach(req) => return self.begin_attach(req, reply),
            Request::Detach { netns } => return self.begin_detach(netns, reply),
            Request::Metrics => Response::Metrics(self.metrics(now)),
            Request::Reload => {
                if let Err(busy) = self.reloads.try_send(reply) {
                    let answer = Response::Error("a reload is already under way".into());
                    let _ = busy.into_inner().send(answer);
                }
                return;
            }
            Request::Store => match &self.store {
                Some(s) => Response::Store(s.borrow().status(now)),
                None => Response::Error(
                    "no [store] configured: peers come from the [[peer]] list".into(),
                ),
            },
        };
        let _ = reply.send(response);
    }

    /// Every counter, copied between two wake-ups for a scrape.
    fn metrics(&self, now: Instant) -> crate::control::MetricsSnapshot {
        let mut drops: std::collections::BTreeMap<String, u64> = crate::core::DropReason::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), self.node.drops().get(*r)))
            .collect();
        drops.extend(self.shell_drops().map(|(r, n)| (r.to_owned(), n)));
        let tap = self.config.mode == Mode::Tap;
        crate::control::MetricsSnapshot {
            peers: self.node.peer_statuses(now),
            drops,
            arp_replies: tap.then(|| self.node.arp_replies()),
            dns_queries: self
                .dns_counters
                .results()
                .iter()
                .map(|(r, n)| ((*r).to_owned(), *n))
                .collect(),
            containers: self.containers.as_ref().map(|c| c.list().len()),
            policy_drops: self
                .node
                .policy()
                .counters()
                .iter()
                .map(
                    |((direction, tier, rule), n)| crate::control::PolicyDropCount {
                        direction: direction.as_str().to_owned(),
                        tier: tier.to_string(),
                        rule: rule.as_deref().unwrap_or("").to_owned(),
                        count: *n,
                    },
                )
                .collect(),
        }
    }

    /// The drops counted outside the core, by reason: records refused by
    /// the sync, and datagrams the kernel dropped at the underlay socket
    /// (nearly always a full receive buffer; what SO_RXQ_OVFL reports).
    fn shell_drops(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("sync_refused", self.sync_refused.load(Ordering::Relaxed)),
            ("underlay_overflow", self.udp.kernel_drops()),
        ]
        .into_iter()
    }

    fn status(&self, now: Instant) -> HostStatus {
        let summary = self.node.summary(now);
        let tap = self.config.mode == Mode::Tap;
        HostStatus {
            name: self.config.name.clone(),
            public_key: self.config.public_key(),
            listen: self.listen,
            mode: if tap { "tap" } else { "tun" }.to_owned(),
            device: self.config.device.clone(),
            bridge: tap.then(|| self.config.bridge.clone()),
            agent_mac: self.node.agent_mac(),
            containers: self.containers.as_ref().map(|c| c.list().len()),
            mtu: self.mtu,
            address: self.node.address(),
            subnet: self.config.subnet,
            overlay: self.config.overlay,
            uptime_secs: now.duration_since(self.started).as_secs(),
            peers: summary.peers,
            peers_up: summary.up,
            peers_connecting: summary.connecting,
            peers_down: summary.down,
            dropped: self
                .node
                .drops()
                .nonzero()
                .map(|(r, n)| (r.as_str(), n))
                .chain(self.shell_drops().filter(|(_, n)| *n > 0))
                .chain(self.dns_counters.nonzero())
                .map(|(r, n)| (r.to_owned(), n))
                .collect(),
        }
    }
}
