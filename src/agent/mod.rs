//! The IO shell: moves bytes between the overlay device, the underlay UDP
//! socket and the core, drives its timers, and answers the control socket.
//!
//! One task owns the `Node` and selects over device, socket, timer, control
//! requests, membership changes and finished container operations; each
//! wake-up reads a batch of what is ready and flushes the core's `Outbox`
//! in one go. Must never: make a decision about a packet (that is the
//! core's job), spawn a task or take a lock per packet, or wait on a
//! membership source or an `ip` command in the data path.

pub mod containers;
pub mod control_server;
pub mod device;
pub mod dns_server;
pub mod limits;
pub mod netops;
pub mod records_sync;
pub mod state;
pub mod uapi_server;
pub mod underlay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tun_rs::AsyncDevice;

use crate::config::{Config, Mode};
use crate::control::{HostStatus, Request, Response};
use crate::core::ethernet::Mac;
use crate::core::{Identity, LinkMode, Node, Outbox};
use crate::membership::{self, Membership};
use containers::{Containers, OpDone};
use control_server::{ControlRequest, ControlSocket, ControlSocketError};
use device::DeviceError;
use netops::NetopsError;
use state::StateError;
use underlay::UnderlayError;

/// boringtun wants its timers driven every 100-250 ms.
const TICK: Duration = Duration::from_millis(100);
/// Packets read per wake-up before the loop looks at other sources again:
/// enough to amortise the wake-up, small enough to keep latency fair.
const BATCH: usize = 64;
/// Largest packet or frame read from the device or socket.
const READ_BUFFER: usize = 65536;

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
    #[error("the overlay device {device} failed: {source}; was it deleted?")]
    DeviceLost {
        device: String,
        source: std::io::Error,
    },
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

/// `run`, with membership from a store whose state `meshctl store` shows.
pub async fn run_with_store(
    config: Config,
    mut membership: watch::Receiver<Membership>,
    store: Option<watch::Receiver<crate::store::StoreReport>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    limits::raise_open_files();
    // Everything that can fail because of another running agent, or bad
    // state, is checked before the device is created.
    control_server::clear_stale(&config.control_socket)?;
    let udp = underlay::bind(config.listen)?;
    let listen = udp.local_addr().unwrap_or(config.listen);
    let mtu = config
        .mtu
        .unwrap_or_else(|| device::inner_mtu(&device::system_interfaces(), &config.device));
    let address = membership::host_address(config.subnet);
    let identity = Identity {
        name: config.name.clone(),
        private_key: config.private_key.clone(),
        subnet: config.subnet,
        overlay: config.overlay,
    };
    let (tun, containers, mut node) = match config.mode {
        Mode::Tun => {
            let tun =
                device::create_tun(&config.device, address, config.overlay.prefix_len(), mtu)?;
            (
                tun,
                None,
                Node::new(&identity, LinkMode::Tun, Instant::now()),
            )
        }
        Mode::Tap => {
            let records = state::StateFile::in_dir(&config.state_dir).load()?;
            let key = config.public_key();
            let prefix = config.overlay.prefix_len();
            netops::ensure_bridge(&config.bridge, Mac::of_bridge(&key), address, prefix, mtu)
                .await?;
            let tap = device::create_tap(&config.device, mtu)?;
            netops::enslave(&config.device, &config.bridge).await?;
            let mut node = Node::new(&identity, LinkMode::Tap, Instant::now());
            let containers = Containers::restore(&config, mtu, records, &mut node).await?;
            (tap, Some(containers), node)
        }
    };
    netops::set_up_service_address((config.mode == Mode::Tap).then_some(config.bridge.as_str()))
        .await?;
    let sync = start_records_sync(&config, address, &membership);
    let upstreams = config
        .dns
        .upstream
        .clone()
        .unwrap_or_else(dns_server::system_upstreams);
    let dns_counters = dns_server::serve(sync.zone.clone(), upstreams, config.subnet).await?;
    let mut control = ControlSocket::bind(&config.control_socket)?;
    let (control_tx, control_rx) = mpsc::channel(16);
    let uapi = uapi_server::serve(
        std::path::Path::new(uapi_server::UAPI_DIR),
        &config.device,
        control_tx.clone(),
    );
    control.serve(control_tx);
    node.apply_membership(&membership.borrow_and_update());
    tracing::info!(
        name = %config.name,
        public_key = %config.public_key(),
        mode = ?config.mode,
        device = %config.device,
        address = %address,
        mtu,
        listen = %listen,
        peers = membership.borrow().peers.len(),
        "meshd running"
    );

    let (ops_tx, ops_rx) = mpsc::channel(16);
    let shell = Shell {
        config,
        node,
        udp,
        device: tun,
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
        store,
    };
    let mut shell = shell;
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
    udp: UdpSocket,
    device: AsyncDevice,
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
}

/// Starts the records-sync task. The zone starts from this host's own
/// records, so the domain is answered from the first query on.
fn start_records_sync(
    config: &Config,
    address: std::net::Ipv4Addr,
    membership: &watch::Receiver<Membership>,
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
        let mut device_buf = vec![0u8; READ_BUFFER];
        let mut udp_buf = vec![0u8; READ_BUFFER];
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
                read = self.udp.recv_from(&mut udp_buf) => match read {
                    Ok((n, from)) => {
                        let now = Instant::now();
                        self.node.handle_datagram(now, from, &udp_buf[..n], &mut out);
                        for _ in 1..BATCH {
                            let Ok((n, from)) = self.udp.try_recv_from(&mut udp_buf) else { break };
                            self.node.handle_datagram(now, from, &udp_buf[..n], &mut out);
                        }
                    }
                    // Transient (an ICMP error surfacing on the socket).
                    Err(e) => tracing::debug!(error = %e, "underlay receive failed"),
                },
                read = self.device.recv(&mut device_buf) => match read {
                    Ok(n) => {
                        let now = Instant::now();
                        self.handle_device_input(now, &device_buf[..n], &mut out);
                        for _ in 1..BATCH {
                            let Ok(n) = self.device.try_recv(&mut device_buf) else { break };
                            self.handle_device_input(now, &device_buf[..n], &mut out);
                        }
                    }
                    Err(source) => {
                        return Err(AgentError::DeviceLost { device: self.config.device.clone(), source });
                    }
                },
            }
            self.flush(&mut out).await;
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

    fn handle_device_input(&mut self, now: Instant, bytes: &[u8], out: &mut Outbox) {
        match self.config.mode {
            Mode::Tun => self.node.handle_device_packet(now, bytes, out),
            Mode::Tap => self.node.handle_device_frame(now, bytes, out),
        }
    }

    /// Sends everything the core produced; a failed send is a counted drop.
    async fn flush(&mut self, out: &mut Outbox) {
        for (from, message) in out.sync() {
            if self.sync_in.try_send((from, message.to_vec())).is_err() {
                self.node.count_sync_backlog();
            }
        }
        for (to, datagram) in out.network() {
            if let Err(e) = self.udp.send_to(datagram, to).await {
                tracing::debug!(error = %e, %to, "send failed");
                self.node.count_io_drop();
            }
        }
        for packet in out.device() {
            if let Err(e) = self.device.send(packet).await {
                tracing::debug!(error = %e, "device write failed");
                self.node.count_io_drop();
            }
        }
        out.clear();
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
            Request::Attach(req) => return self.begin_attach(req, reply),
            Request::Detach { netns } => return self.begin_detach(netns, reply),
            Request::Store => match &self.store {
                Some(s) => Response::Store(s.borrow().status(now)),
                None => Response::Error(
                    "no [store] configured: peers come from the [[peer]] list".into(),
                ),
            },
        };
        let _ = reply.send(response);
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
                .map(|(r, n)| (r.as_str().to_owned(), n))
                .chain(
                    Some(self.sync_refused.load(Ordering::Relaxed))
                        .filter(|n| *n > 0)
                        .map(|n| ("sync_refused".to_owned(), n)),
                )
                .chain(self.dns_counters.nonzero().map(|(r, n)| (r.to_owned(), n)))
                .collect(),
        }
    }
}
