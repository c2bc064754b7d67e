//! The underlay UDP socket WireGuard messages travel on.
//!
//! Must never: bind with SO_REUSEADDR/SO_REUSEPORT (a second agent on the
//! same port must fail, not share the traffic).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Socket buffers big enough to absorb bursts while the one agent task is
/// busy (the kernel caps them at net.core.[rw]mem_max). Under a saturating
/// transfer the receive buffer fills, so its size is also the queueing
/// delay it adds (4 MiB at 1 Gbit/s: 33 ms). Measured with the netns
/// bench (README, Performance): 256 KiB cost up to a third of the
/// throughput; 4 MiB raised the RTT under load (p99 29-36 ms against 17-25
/// at 1 MiB) without carrying more. Measured again after step 12 (step
/// 13): with cubic, the common default, 1 MiB loses almost nothing and
/// keeps four streams' p99 under 10 ms, which 4 MiB nearly triples.
const SOCKET_BUFFER: usize = 1 << 20;
/// Overrides `SOCKET_BUFFER`, in bytes: for measuring the trade-off, not a
/// documented setting.
const SOCKET_BUFFER_ENV: &str = "MESHNET_SOCKET_BUFFER";

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on UDP {addr}: {source}{hint}")]
pub struct UnderlayError {
    addr: SocketAddr,
    source: std::io::Error,
    hint: &'static str,
}

pub fn bind(addr: SocketAddr) -> Result<UdpSocket, UnderlayError> {
    let fail = |source: std::io::Error| {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (the port is in use: is another meshd or WireGuard running?)"
            }
            std::io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
            _ => "",
        };
        UnderlayError { addr, source, hint }
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(fail)?;
    }
    // Buffer sizes are best effort: a smaller kernel limit is not an error.
    let size = std::env::var(SOCKET_BUFFER_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SOCKET_BUFFER);
    let _ = socket.set_recv_buffer_size(size);
    let _ = socket.set_send_buffer_size(size);
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    UdpSocket::from_std(socket.into()).map_err(fail)
}

/// Datagrams received per system call (recvmmsg), each buffer holding up
/// to `GRO_BUFFER` bytes of coalesced datagrams from one sender.
const RECV_BATCH: usize = 8;
/// What one GRO read can return: 64 KiB of coalesced datagrams.
const GRO_BUFFER: usize = 65536;

/// The underlay socket with batching: UDP GSO (one send per run of
/// equal-sized datagrams to one peer) and GRO with recvmmsg (many datagrams
/// per receive), through quinn-udp, where the kernel offers them. Without
/// offload, one datagram per system call as before.
pub struct Underlay {
    socket: Arc<UdpSocket>,
    /// `None`: offload turned off; plain send_to/recv_from.
    batched: Option<Arc<quinn_udp::UdpSocketState>>,
    bufs: Vec<Vec<u8>>,
    meta: Vec<quinn_udp::RecvMeta>,
}

impl Underlay {
    pub fn new(socket: UdpSocket, offload: bool) -> Self {
        let batched = offload
            .then(|| quinn_udp::UdpSocketState::new((&socket).into()))
            .and_then(|state| match state {
                Ok(state) => Some(state),
                Err(e) => {
                    tracing::warn!(error = %e, "UDP batching unavailable; one datagram per system call");
                    None
                }
            });
        if let Some(state) = &batched
            && (state.max_gso_segments() <= 1 || state.gro_segments() <= 1)
        {
            tracing::warn!(
                gso_segments = state.max_gso_segments(),
                gro_segments = state.gro_segments(),
                "the kernel refused UDP GSO or GRO; sending or receiving without it"
            );
        }
        let (count, size) = if batched.is_some() {
            (RECV_BATCH, GRO_BUFFER)
        } else {
            (1, GRO_BUFFER)
        };
        Self {
            socket: Arc::new(socket),
            batched: batched.map(Arc::new),
            bufs: vec![vec![0u8; size]; count],
            meta: vec![quinn_udp::RecvMeta::default(); count],
        }
    }

    /// Receives the kernel dropped at this socket, nearly always because
    /// its receive buffer was full: they reached the host but never the
    /// agent. One count is one datagram, or a whole GSO batch of up to 64
    /// that the kernel kept together (see `sockstat`). Reads the
    /// namespace's socket table (for a status request or a scrape, never
    /// per packet); 0 when it cannot be read.
    pub fn kernel_drops(&self) -> u64 {
        let Ok(stat) = rustix::fs::fstat(&*self.socket) else {
            return 0;
        };
        // An IPv6 socket, dual-stack too, is listed in udp6 only.
        let table = match self.socket.local_addr() {
            Ok(SocketAddr::V6(_)) => "/proc/self/net/udp6",
            _ => "/proc/self/net/udp",
        };
        std::fs::read_to_string(table)
            .ok()
            .and_then(|table| crate::sockstat::udp_socket_drops(&table, stat.st_ino))
            .unwrap_or(0)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// (UDP GSO on, UDP GRO on).
    pub fn offloads(&self) -> (bool, bool) {
        self.batched.as_ref().map_or((false, false), |s| {
            (s.max_gso_segments() > 1, s.gro_segments() > 1)
        })
    }

    pub async fn readable(&self) -> std::io::Result<()> {
        self.socket.readable().await
    }

    /// Reads what is ready without waiting, at most `reads` system calls
    /// and about `bytes` bytes, handing every datagram to `handle` in
    /// arrival order.
    pub fn drain(&mut self, reads: usize, bytes: usize, mut handle: impl FnMut(SocketAddr, &[u8])) {
        let taken = std::cell::Cell::new(0);
        let mut counted = |from: SocketAddr, datagram: &[u8]| {
            taken.set(taken.get() + datagram.len());
            handle(from, datagram);
        };
        for _ in 0..reads {
            if taken.get() >= bytes {
                return;
            }
            match self.try_recv(&mut counted) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                // Transient (an ICMP error surfacing on the socket).
                Err(e) => tracing::debug!(error = %e, "underlay receive failed"),
            }
        }
    }

    fn try_recv(&mut self, handle: &mut impl FnMut(SocketAddr, &[u8])) -> std::io::Result<()> {
        let Some(state) = &self.batched else {
            let (n, from) = self.socket.try_recv_from(&mut self.bufs[0])?;
            handle(from, &self.bufs[0][..n]);
            return Ok(());
        };
        let mut slices: Vec<std::io::IoSliceMut<'_>> = self
            .bufs
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        let socket = &*self.socket;
        let meta = &mut self.meta;
        let n = socket.try_io(tokio::io::Interest::READABLE, || {
            state.recv(socket.into(), &mut slices, meta)
        })?;
        drop(slices);
        for (buf, meta) in self.bufs.iter().zip(&self.meta).take(n) {
            let stride = meta.stride.max(1);
            for datagram in buf[..meta.len.min(buf.len())].chunks(stride) {
                handle(meta.addr, datagram);
            }
        }
        Ok(())
    }

    /// The sending half, for the send stage's thread.
    pub fn sender(&self) -> UnderlaySender {
        UnderlaySender {
            socket: Arc::clone(&self.socket),
            batched: self.batched.clone(),
        }
    }
}

/// How long a send waits for room in a full socket buffer before the
/// datagrams count as dropped.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// The sending half of the underlay socket. Sends are system calls made
/// where they are called, on the agent task or the send stage's thread,
/// never through the runtime's readiness (which only the agent's thread
/// drives).
pub struct UnderlaySender {
    socket: Arc<UdpSocket>,
    batched: Option<Arc<quinn_udp::UdpSocketState>>,
}

impl UnderlaySender {
    /// How sends may be grouped: the GSO segment limit, or one datagram.
    pub fn run_limits(&self) -> crate::core::outbox::RunLimits {
        match &self.batched {
            Some(state) if state.max_gso_segments() > 1 => {
                crate::core::outbox::RunLimits::gso(state.max_gso_segments())
            }
            _ => crate::core::outbox::RunLimits::SINGLE,
        }
    }

    /// Sends `contents` to `to`: one datagram, or `segment`-sized ones
    /// with GSO. A full socket buffer is waited on, once, for at most
    /// `SEND_WAIT`.
    pub fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> std::io::Result<()> {
        let attempt = || match &self.batched {
            Some(state) => {
                let transmit = quinn_udp::Transmit {
                    destination: to,
                    ecn: None,
                    contents,
                    segment_size: (segment < contents.len()).then_some(segment),
                    src_ip: None,
                };
                state.try_send((&*self.socket).into(), &transmit)
            }
            None => socket2::SockRef::from(&*self.socket)
                .send_to(contents, &to.into())
                .map(drop),
        };
        match attempt() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.wait_writable()?;
                attempt()
            }
            other => other,
        }
    }

    fn wait_writable(&self) -> std::io::Result<()> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let fd = self.socket.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: SEND_WAIT.as_nanos() as _,
        };
        poll(&mut fds, Some(&timeout))?;
        Ok(())
    }
}
