//! IP packet classification and the ICMP errors the agent originates.
//!
//! Must never: trust a length or field from the packet without checking it,
//! or originate an ICMP error about an ICMP error (RFC 1812 4.3.2.7).

use std::net::Ipv4Addr;

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
    let builder = PacketBuilder::ipv4(header.destination(), header.source(), 64).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host),
    );
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
}
