//! The IO shell: moves bytes between the TUN device, the underlay UDP
//! socket and the core, drives its timers, and answers the control socket.
//!
//! One task owns the `Node` and selects over device, socket, timer, control
//! requests and membership changes; each wake-up reads a batch of what is
//! ready and flushes the core's `Outbox` in one go. Must never: make a
//! decision about a packet (that is the core's job), spawn a task or take a
//! lock per packet, or wait on a membership source in the data path.

pub mod control_server;
pub mod device;
pub mod underlay;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tun_rs::AsyncDevice;

use crate::config::Config;
use crate::control::{HostStatus, Request, Response};
use crate::core::{Identity, LinkMode, Node, Outbox};
use crate::membership::{self, Membership};
use control_server::{ControlRequest, ControlSocket, ControlSocketError};
use device::DeviceError;
use underlay::UnderlayError;

/// boringtun wants its timers driven every 100-250 ms.
const TICK: Duration = Duration::from_millis(100);
/// Packets read per wake-up before the loop looks at other sources again:
/// enough to amortise the wake-up, small enough to keep latency fair.
const BATCH: usize = 64;
/// Largest packet read from the device or socket.
const READ_BUFFER: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    ControlSocket(#[from] ControlSocketError),
    #[error(transparent)]
    Underlay(#[from] UnderlayError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("the overlay device {device} failed: {source}; was it deleted?")]
    DeviceLost {
        device: String,
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` completes. Peers come from `membership`
/// (its current value at start, then every change). The device and control
/// socket are removed on return.
pub async fn run(
    config: Config,
    mut membership: watch::Receiver<Membership>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    // Order matters: everything that can fail because of another running
    // agent is checked before the device is created.
    control_server::clear_stale(&config.control_socket)?;
    let udp = underlay::bind(config.listen)?;
    let listen = udp.local_addr().unwrap_or(config.listen);
    let mtu = config
        .mtu
        .unwrap_or_else(|| device::inner_mtu(&device::system_interfaces(), &config.device));
    let address = membership::host_address(config.subnet);
    let tun = device::create_tun(&config.device, address, config.overlay.prefix_len(), mtu)?;
    let mut control = ControlSocket::bind(&config.control_socket)?;
    let (control_tx, control_rx) = mpsc::channel(16);
    control.serve(control_tx);

    let identity = Identity {
        name: config.name.clone(),
        private_key: config.private_key.clone(),
        subnet: config.subnet,
        overlay: config.overlay,
    };
    let mut node = Node::new(&identity, LinkMode::Tun, Instant::now());
    node.apply_membership(&membership.borrow_and_update());
    tracing::info!(
        name = %config.name,
        public_key = %config.public_key(),
        device = %config.device,
        address = %address,
        mtu,
        listen = %listen,
        peers = membership.borrow().peers.len(),
        "meshd running"
    );

    let shell = Shell {
        config,
        node,
        udp,
        tun,
        mtu,
        listen,
        started: Instant::now(),
    };
    let result = shell.serve(control_rx, &mut membership, shutdown).await;
    drop(control);
    if result.is_ok() {
        tracing::info!("meshd stopped; device and control socket removed");
    }
    result
}

struct Shell {
    config: Config,
    node: Node,
    udp: UdpSocket,
    tun: AsyncDevice,
    mtu: u16,
    listen: SocketAddr,
    started: Instant,
}

impl Shell {
    async fn serve(
        mut self,
        mut control: mpsc::Receiver<ControlRequest>,
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
                Some((req, reply)) = control.recv() => {
                    let _ = reply.send(self.answer(req));
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
                read = self.tun.recv(&mut device_buf) => match read {
                    Ok(n) => {
                        let now = Instant::now();
                        self.node.handle_device_packet(now, &device_buf[..n], &mut out);
                        for _ in 1..BATCH {
                            let Ok(n) = self.tun.try_recv(&mut device_buf) else { break };
                            self.node.handle_device_packet(now, &device_buf[..n], &mut out);
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

    /// Sends everything the core produced; a failed send is a counted drop.
    async fn flush(&mut self, out: &mut Outbox) {
        for (to, datagram) in out.network() {
            if let Err(e) = self.udp.send_to(datagram, to).await {
                tracing::debug!(error = %e, %to, "send failed");
                self.node.count_io_drop();
            }
        }
        for packet in out.device() {
            if let Err(e) = self.tun.send(packet).await {
                tracing::debug!(error = %e, "device write failed");
                self.node.count_io_drop();
            }
        }
        out.clear();
    }

    fn answer(&self, req: Request) -> Response {
        let now = Instant::now();
        match req {
            Request::Peers => Response::Peers(self.node.peer_statuses(now)),
            Request::Status => {
                let summary = self.node.summary(now);
                Response::Status(HostStatus {
                    name: self.config.name.clone(),
                    public_key: self.config.public_key(),
                    listen: self.listen,
                    device: self.config.device.clone(),
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
                        .collect(),
                })
            }
        }
    }
}
