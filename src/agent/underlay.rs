//! The underlay UDP socket WireGuard messages travel on.
//!
//! Must never: bind with SO_REUSEADDR/SO_REUSEPORT (a second agent on the
//! same port must fail, not share the traffic).

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Socket buffers big enough to absorb bursts while the one agent task is
/// busy (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

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
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    UdpSocket::from_std(socket.into()).map_err(fail)
}
