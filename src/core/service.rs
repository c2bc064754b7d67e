//! The agent's own service address, 169.254.169.250: what it answers there
//! itself (ICMP echo, so containers have a health check).
//!
//! Must never: answer anything but an echo request addressed to the
//! service address.

use std::net::Ipv4Addr;

use etherparse::{Icmpv4Type, IpNumber, Ipv4HeaderSlice, PacketBuilder};

/// The link-local address every container's resolver and health checks use.
pub const SERVICE_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 250);

/// Writes an echo reply to `request` into `out` and returns its length, or
/// `None` if `request` is not an ICMP echo request to the service address.
pub fn echo_reply(request: &[u8], out: &mut [u8]) -> Option<usize> {
    let ip = Ipv4HeaderSlice::from_slice(request).ok()?;
    if ip.destination_addr() != SERVICE_ADDRESS
        || ip.protocol() != IpNumber::ICMP
        || ip.is_fragmenting_payload()
    {
        return None;
    }
    let end = usize::from(ip.total_len()).min(request.len());
    let icmp = request.get(ip.slice().len()..end)?;
    let (header, payload) = etherparse::Icmpv4Header::from_slice(icmp).ok()?;
    let Icmpv4Type::EchoRequest(echo) = header.icmp_type else {
        return None;
    };
    let builder = PacketBuilder::ipv4(SERVICE_ADDRESS.octets(), ip.source(), 64)
        .icmpv4_echo_reply(echo.id, echo.seq);
    if out.len() < builder.size(payload.len()) {
        return None;
    }
    builder.write_to_slice(out, payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(dst: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ipv4([10, 42, 1, 5], dst, 64)
            .icmpv4_echo_request(77, 3)
            .write(&mut v, b"are you there")
            .unwrap();
        v
    }

    #[test]
    fn answers_echo_to_the_service_address() {
        let mut out = [0u8; 1500];
        let n = echo_reply(&ping(SERVICE_ADDRESS.octets()), &mut out).unwrap();
        let reply = etherparse::PacketHeaders::from_ip_slice(&out[..n]).unwrap();
        let Some(etherparse::NetHeaders::Ipv4(ip, _)) = reply.net else {
            panic!("not ipv4")
        };
        assert_eq!(ip.source, SERVICE_ADDRESS.octets());
        assert_eq!(ip.destination, [10, 42, 1, 5]);
        let Some(etherparse::TransportHeader::Icmpv4(icmp)) = reply.transport else {
            panic!("not icmp")
        };
        assert!(matches!(icmp.icmp_type, Icmpv4Type::EchoReply(e) if e.id == 77 && e.seq == 3));
        assert_eq!(reply.payload.slice(), b"are you there");
    }

    #[test]
    fn ignores_everything_else() {
        let mut out = [0u8; 1500];
        assert!(echo_reply(&ping([10, 42, 2, 1]), &mut out).is_none());
        let mut udp = Vec::new();
        PacketBuilder::ipv4([10, 42, 1, 5], SERVICE_ADDRESS.octets(), 64)
            .udp(1, 53)
            .write(&mut udp, b"x")
            .unwrap();
        assert!(echo_reply(&udp, &mut out).is_none());
        assert!(echo_reply(&[0x45, 0, 0], &mut out).is_none());
        assert!(echo_reply(&ping(SERVICE_ADDRESS.octets()), &mut out[..10]).is_none());
    }
}
