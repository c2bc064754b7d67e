//! The underlay UDP socket WireGuard messages travel on.
//!
//! Must never: bind with SO_REUSEADDR/SO_REUSEPORT (a second agent on the
//! same port must fail, not share the traffic).

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Socket buffers big enough to absorb bursts while the one agent task is
/// busy (the kernel caps them at net.core.[rw]mem_max). Under a saturating
/// transfer the receive buffer fills, so its size is also the queueing
/// delay it adds (4 MiB at 1 Gbit/s: 33 ms). Measured with the netns
/// bench (README, Performance): 256 KiB cost up to a third of the
/// throughput; 4 MiB raised the RTT under load (p99 29-36 ms against 17-25
/// at 1 MiB) without carrying more.
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
    socket: UdpSocket,
    /// `None`: offload turned off; plain send_to/recv_from.
    batched: Option<quinn_udp::UdpSocketState>,
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
            socket,
            batched,
            bufs: vec![vec![0u8; size]; count],
            meta: vec![quinn_udp::RecvMeta::default(); count],
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// How sends may be grouped: the GSO segment limit, or one datagram.
    pub fn run_limits(&self) -> crate::core::outbox::RunLimits {
        match &self.batched {
            Some(state) if state.max_gso_segments() > 1 => {
                crate::core::outbox::RunLimits::gso(state.max_gso_segments())
            }
            _ => crate::core::outbox::RunLimits::SINGLE,
        }
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
        let socket = &self.socket;
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

    /// Sends `contents` to `to`: one datagram, or `segment`-sized ones
    /// with GSO.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> std::io::Result<()> {
        let Some(state) = &self.batched else {
            return self.socket.send_to(contents, to).await.map(drop);
        };
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: (segment < contents.len()).then_some(segment),
            src_ip: None,
        };
        loop {
            self.socket.writable().await?;
            let sent = self.socket.try_io(tokio::io::Interest::WRITABLE, || {
                state.try_send((&self.socket).into(), &transmit)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}
