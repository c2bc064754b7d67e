//! The virtio-net header that leads every read and write on an overlay
//! device opened with IFF_VNET_HDR (include/uapi/linux/virtio_net.h, the
//! legacy layout without `num_buffers`): the values both the splitting of
//! reads and the coalescing of writes speak. Multi-byte fields are in the
//! host's byte order (a legacy header on a device never switched with
//! TUNSETVNETBE/LE). Must never: hold anything but the format.

/// Bytes in the header.
pub const HEADER_LEN: usize = 10;
/// `flags`: the transport checksum is to be finished from `csum_start`,
/// the field at `csum_start + csum_offset` holding the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a super-packet.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (USO), IPv4 and IPv6 alike.
pub const GSO_UDP_L4: u8 = 5;
/// Or-ed into a TCP `gso_type` when the segments carry ECN's CWR.
pub const GSO_ECN: u8 = 0x80;

/// The header's fields. The offsets are in bytes from the start of the
/// frame (the link header on TAP, else the IP header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub gso_type: u8,
    /// Link, IP and transport headers of a super-packet.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the transport checksum's sum starts.
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

impl Header {
    /// The header at the start of `bytes`, or `None` if they are fewer.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..HEADER_LEN)?;
        let word = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
        })
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (at, word) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
        ] {
            b[at..at + 2].copy_from_slice(&word.to_ne_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_as_written() {
        let header = Header {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[..2], &[F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN]);
        assert_eq!(&bytes[4..6], &1448u16.to_ne_bytes());
        assert_eq!(Header::read(&bytes), Some(header));
        assert_eq!(Header::read(&bytes[..9]), None);
    }
}
