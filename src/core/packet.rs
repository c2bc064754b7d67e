//! IP packet classification and the ICMP errors the agent originates.
//!
//! Must never: trust a length or field from the packet without checking it,
//! or originate an ICMP error about an ICMP error (RFC 1812 4.3.2.7).

use std::net::Ipv4Addr;
use std::ops::Range;

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{IpNumber, Ipv4HeaderSlice, PacketBuilder};

use super::DropReason;

/// The addresses of an IPv4 packet, checked enough to route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Addresses {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
}

/// Reads the source and destination of a packet from the device.
pub fn ipv4_addresses(packet: &[u8]) -> Result<Ipv4Addresses, DropReason> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {}
        Some(_) => return Err(DropReason::NotIpv4),
        None => return Err(DropReason::Malformed),
    }
    let header = Ipv4HeaderSlice::from_slice(packet).map_err(|_| DropReason::Malformed)?;
    Ok(Ipv4Addresses {
        source: header.source_addr(),
        destination: header.destination_addr(),
    })
}

/// A decrypted packet as the records sync sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncPort {
    /// Not for this host's sync port: deliver as usual.
    Other,
    /// A whole sync message from the peer's agent: its UDP payload.
    Message(Range<usize>),
    /// Aimed at this host's sync port from anywhere else, or as a fragment.
    Misused,
}

const UDP: u8 = 17;
const UDP_HEADER: usize = 8;

/// Classifies a packet the peer whose host address is `peer_host` sent to
/// this host (`own_host`). Only the peer's agent may use the sync port.
pub fn sync_inbound(packet: &[u8], own_host: Ipv4Addr, peer_host: Ipv4Addr, port: u16) -> SyncPort {
    let Some(udp) = udp_to(packet, own_host, port) else {
        return SyncPort::Other;
    };
    let Ok(header) = Ipv4HeaderSlice::from_slice(packet) else {
        return SyncPort::Other;
    };
    let whole = !header.more_fragments();
    let source_port = packet
        .get(udp..udp + 2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]));
    let udp_len = packet
        .get(udp + 4..udp + 6)
        .map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
    let end = (udp + udp_len).min(packet.len());
    if whole
        && header.source_addr() == peer_host
        && source_port == Some(port)
        && udp_len >= UDP_HEADER
    {
        return SyncPort::Message(udp + UDP_HEADER..end);
    }
    SyncPort::Misused
}

/// Whether a packet from this host's device is aimed at the sync port of
/// the host `peer_host`: only the agent itself may speak there.
pub fn targets_sync_port(packet: &[u8], peer_host: Ipv4Addr, port: u16) -> bool {
    udp_to(packet, peer_host, port).is_some()
}

/// The offset of the UDP header of a first (or only) fragment sent to
/// `host:port`.
fn udp_to(packet: &[u8], host: Ipv4Addr, port: u16) -> Option<usize> {
    if packet.get(9) != Some(&UDP) || packet.get(16..20)? != host.octets() {
        return None;
    }
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let first_fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff == 0;
    let destination_port = packet.get(ihl + 2..ihl + 4)?;
    (first_fragment
        && ihl >= 20
        && u16::from_be_bytes([destination_port[0], destination_port[1]]) == port)
        .then_some(ihl)
}

/// ICMP types that are errors themselves, about which no error is sent.
const ICMP_ERROR_TYPES: [u8; 5] = [3, 4, 5, 11, 12];
/// How much of the offending datagram an ICMP error quotes: the header plus
/// 8 bytes is the minimum (RFC 792); like Linux we quote more, within 576.
const ICMP_QUOTE_MAX: usize = 576 - 20 - 8;
/// The largest ICMP error `host_unreachable` writes.
pub const ICMP_ERROR_MAX: usize = 576;

/// Writes an ICMP "destination host unreachable" about `original` into
/// `out`, returning its length, or `None` when no error may be sent.
///
/// The error comes *from* the unreachable destination: a source address
/// this host owns would be dropped by the kernel as a martian when it comes
/// back in through the device.
pub fn host_unreachable(original: &[u8], out: &mut [u8]) -> Option<usize> {
    unreachable(original, DestUnreachableHeader::Host, out)
}

/// Writes an ICMP "communication administratively prohibited" about
/// `original` (the policy's `reject`), like `host_unreachable`.
pub fn prohibited(original: &[u8], out: &mut [u8]) -> Option<usize> {
    unreachable(original, DestUnreachableHeader::FilterProhibited, out)
}

/// The policy's `reject` for TCP: a reset from the destination, as its
/// stack would send for a closed port (RFC 793), so a connect fails at
/// once. `None` for anything but a first-fragment TCP segment without RST.
pub fn tcp_reset(original: &[u8], out: &mut [u8]) -> Option<usize> {
    let ip = Ipv4HeaderSlice::from_slice(original).ok()?;
    if ip.protocol() != IpNumber::TCP || ip.fragments_offset().value() != 0 {
        return None;
    }
    let total = usize::from(ip.total_len()).clamp(ip.slice().len(), original.len());
    let segment = original.get(ip.slice().len()..total)?;
    let tcp = etherparse::TcpHeaderSlice::from_slice(segment).ok()?;
    if tcp.rst() {
        return None;
    }
    let payload = segment.len().saturating_sub(tcp.slice().len());
    let builder = PacketBuilder::ipv4(ip.destination(), ip.source(), 64);
    let builder = if tcp.ack() {
        builder
            .tcp(
                tcp.destination_port(),
                tcp.source_port(),
                tcp.acknowledgment_number(),
                0,
            )
            .rst()
    } else {
        let length = u32::try_from(payload).unwrap_or(u32::MAX)
            + u32::from(tcp.syn())
            + u32::from(tcp.fin());
        builder
            .tcp(tcp.destination_port(), tcp.source_port(), 0, 0)
            .rst()
            .ack(tcp.sequence_number().wrapping_add(length))
    };
    if out.len() < builder.size(0) {
        return None;
    }
    builder.write_to_slice(out, &[]).ok()
}

fn unreachable(original: &[u8], kind: DestUnreachableHeader, out: &mut [u8]) -> Option<usize> {
    let header = Ipv4HeaderSlice::from_slice(original).ok()?;
    let first_fragment = header.fragments_offset().value() == 0;
    let about_icmp_error = header.protocol() == IpNumber::ICMP
        && original
            .get(header.slice().len())
            .is_some_and(|t| ICMP_ERROR_TYPES.contains(t));
    let source = header.source_addr();
    if !first_fragment || about_icmp_error || source.is_unspecified() || source.is_broadcast() {
        return None;
    }
    let total = usize::from(header.total_len()).clamp(header.slice().len(), original.len());
    let quoted = &original[..total.min(ICMP_QUOTE_MAX)];
    let builder = PacketBuilder::ipv4(header.destination(), header.source(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(kind));
    if out.len() < builder.size(quoted.len()) {
        return None;
    }
    builder.write_to_slice(out, quoted).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, PacketHeaders, TransportHeader};

    fn udp_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(4000, 53)
            .write(&mut v, b"hello")
            .unwrap();
        v
    }

    #[test]
    fn reads_ipv4_addresses() {
        let p = udp_packet([10, 42, 1, 1], [10, 42, 2, 9]);
        let a = ipv4_addresses(&p).unwrap();
        assert_eq!(a.source, Ipv4Addr::new(10, 42, 1, 1));
        assert_eq!(a.destination, Ipv4Addr::new(10, 42, 2, 9));
    }

    #[test]
    fn classifies_bad_input_without_panicking() {
        assert_eq!(ipv4_addresses(&[]), Err(DropReason::Malformed));
        assert_eq!(ipv4_addresses(&[0x60; 40]), Err(DropReason::NotIpv4));
        assert_eq!(ipv4_addresses(&[0x45, 0, 0]), Err(DropReason::Malformed));
        // Header length field larger than the packet.
        let mut p = udp_packet([10, 42, 1, 1], [10, 42, 2, 9]);
        p[0] = 0x4f;
        p.truncate(24);
        assert_eq!(ipv4_addresses(&p), Err(DropReason::Malformed));
    }

    #[test]
    fn unreachable_error_quotes_the_packet_and_swaps_addresses() {
        let p = udp_packet([10, 42, 1, 1], [10, 42, 99, 1]);
        let mut out = [0u8; ICMP_ERROR_MAX];
        let n = host_unreachable(&p, &mut out).unwrap();
        let parsed = PacketHeaders::from_ip_slice(&out[..n]).unwrap();
        let ip = match parsed.net.unwrap() {
            etherparse::NetHeaders::Ipv4(h, _) => h,
            other => panic!("not ipv4: {other:?}"),
        };
        assert_eq!(ip.source, [10, 42, 99, 1]);
        assert_eq!(ip.destination, [10, 42, 1, 1]);
        match parsed.transport.unwrap() {
            TransportHeader::Icmpv4(h) => assert_eq!(
                h.icmp_type,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host)
            ),
            other => panic!("not icmp: {other:?}"),
        }
        assert_eq!(parsed.payload.slice(), &p[..]);
    }

    #[test]
    fn no_error_about_an_icmp_error() {
        let p = udp_packet([10, 42, 1, 1], [10, 42, 99, 1]);
        let mut err = [0u8; ICMP_ERROR_MAX];
        let n = host_unreachable(&p, &mut err).unwrap();
        let mut again = [0u8; ICMP_ERROR_MAX];
        assert_eq!(host_unreachable(&err[..n], &mut again), None);
    }

    #[test]
    fn no_error_for_later_fragments_or_tiny_buffers() {
        let mut p = udp_packet([10, 42, 1, 1], [10, 42, 99, 1]);
        let mut out = [0u8; ICMP_ERROR_MAX];
        assert!(host_unreachable(&p, &mut out[..20]).is_none());
        p[6] = 0x00;
        p[7] = 0x10; // fragment offset 16 (x8 bytes)
        assert!(host_unreachable(&p, &mut out).is_none());
        assert!(host_unreachable(&[0x45, 1, 2], &mut out).is_none());
    }

    fn sync_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut v, b"{}")
            .unwrap();
        v
    }

    #[test]
    fn only_the_peers_agent_reaches_the_sync_port() {
        let own = Ipv4Addr::new(10, 42, 1, 1);
        let peer = Ipv4Addr::new(10, 42, 2, 1);
        let ok = sync_packet([10, 42, 2, 1], [10, 42, 1, 1], 7301, 7301);
        assert_eq!(
            sync_inbound(&ok, own, peer, 7301),
            SyncPort::Message(28..30)
        );
        for misused in [
            sync_packet([10, 42, 2, 9], [10, 42, 1, 1], 7301, 7301),
            sync_packet([10, 42, 2, 1], [10, 42, 1, 1], 40000, 7301),
        ] {
            assert_eq!(sync_inbound(&misused, own, peer, 7301), SyncPort::Misused);
        }
        let mut first_fragment = ok.clone();
        first_fragment[6] |= 0x20;
        assert_eq!(
            sync_inbound(&first_fragment, own, peer, 7301),
            SyncPort::Misused
        );
        for other in [
            sync_packet([10, 42, 2, 1], [10, 42, 1, 1], 7301, 53),
            sync_packet([10, 42, 2, 1], [10, 42, 1, 5], 7301, 7301),
            udp_packet([10, 42, 2, 1], [10, 42, 1, 1]),
        ] {
            assert_eq!(sync_inbound(&other, own, peer, 7301), SyncPort::Other);
        }
        assert_eq!(
            sync_inbound(&ok[..22], own, peer, 7301),
            SyncPort::Other,
            "truncated"
        );
    }

    #[test]
    fn the_device_may_not_aim_at_a_peers_sync_port() {
        let peer = Ipv4Addr::new(10, 42, 2, 1);
        let forged = sync_packet([10, 42, 1, 1], [10, 42, 2, 1], 7301, 7301);
        assert!(targets_sync_port(&forged, peer, 7301));
        let container = sync_packet([10, 42, 1, 7], [10, 42, 2, 1], 5555, 7301);
        assert!(targets_sync_port(&container, peer, 7301));
        let elsewhere = sync_packet([10, 42, 1, 1], [10, 42, 2, 7], 7301, 7301);
        assert!(!targets_sync_port(&elsewhere, peer, 7301));
        assert!(!targets_sync_port(&[0x45, 0, 0], peer, 7301));
    }

    #[test]
    fn a_rejected_syn_gets_a_reset_that_acknowledges_it() {
        let mut syn = Vec::new();
        PacketBuilder::ipv4([10, 42, 1, 2], [10, 42, 3, 2], 64)
            .tcp(40000, 22, 1000, 65535)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let mut out = [0u8; 64];
        let n = tcp_reset(&syn, &mut out).unwrap();
        let parsed = PacketHeaders::from_ip_slice(&out[..n]).unwrap();
        let Some(TransportHeader::Tcp(rst)) = parsed.transport else {
            panic!("not TCP: {parsed:?}");
        };
        assert!(rst.rst && rst.ack);
        assert_eq!((rst.source_port, rst.destination_port), (22, 40000));
        assert_eq!(rst.acknowledgment_number, 1001);
        // A reset is never answered with one, nor is UDP.
        assert!(tcp_reset(&out[..n], &mut [0u8; 64]).is_none());
        assert!(tcp_reset(&udp_packet([10, 42, 1, 1], [10, 42, 2, 1]), &mut out).is_none());
    }
}
