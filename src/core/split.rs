//! Splitting device reads (segmentation offload), in place: a read from
//! an overlay device opened with IFF_VNET_HDR is a virtio-net header and
//! then a packet of up to 64 KiB, which may be a TCP or UDP super-packet
//! that the kernel left for us to cut into segments of `gso_size` bytes.
//!
//! The segments are cut where the read landed, without copying a payload:
//! segment `i`'s headers are written into the bytes just in front of its
//! payload, which belong to segment `i - 1`'s payload. So [`Segments::next`]
//! hands out one segment at a time, each valid until the next call; the
//! caller seals it (the one copy on the way out) before asking for the
//! next. Each segment gets what the kernel's own segmentation would give
//! it: its IP total (or payload) length, IPv4 ID counting on and a fresh
//! header checksum, TCP sequence number counting on, FIN and PSH only on
//! the last segment and CWR only on the first, UDP length, and a complete
//! transport checksum (the super-packet's is only the pseudo-header's, and
//! a peer may check it). A packet that is not a super-packet goes out as
//! it is, its checksum finished if the kernel left it partial.
//!
//! Must never: copy a payload, trust the virtio header's `hdr_len` (the
//! kernel may report the whole first buffer), hand out a segment past the
//! read, or panic on any read.

use etherparse::IpNumber;
use thiserror::Error;

use super::checksum;
use super::virtio::{self, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};

/// Link, IP and transport headers of a super-packet at most: an Ethernet
/// header, an IPv6 header with room for extension headers, and a TCP
/// header with the most options.
const HEADERS_MAX: usize = 256;
const PROTO_TCP: u8 = IpNumber::TCP.0;
const PROTO_UDP: u8 = IpNumber::UDP.0;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a read could not be split. The read is dropped and counted.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum SplitError {
    #[error("read shorter than its headers")]
    Short,
    #[error("unknown GSO type {0:#x}")]
    GsoType(u8),
    #[error("super-packet without a partial checksum or with gso_size 0")]
    NotSegmentable,
    #[error("checksum offsets outside the packet")]
    ChecksumOffsets,
    #[error("IP header does not match the GSO type")]
    IpHeader,
    #[error("headers longer than {HEADERS_MAX} bytes")]
    HeadersTooLong,
    #[error("a segment longer than its IP length field can say")]
    SegmentTooLong,
}

/// The segments of one read, handed out in order by [`Segments::next`].
pub struct Segments {
    /// Bytes of the read.
    len: usize,
    /// The next segment's index.
    next: usize,
    /// Where the packet starts when the read is not a super-packet.
    start: usize,
    packet: Option<SuperPacket>,
}

/// A super-packet's shape, and its headers as they were read: segments
/// after the first overwrite the read's own copy.
struct SuperPacket {
    headers: [u8; HEADERS_MAX],
    /// Link, IP and transport headers, from the frame's start.
    headers_len: usize,
    link: usize,
    /// Where the transport header starts, from the frame's start.
    transport: usize,
    protocol: u8,
    v6: bool,
    gso_size: usize,
    count: usize,
}

impl Default for Segments {
    /// No segments: what a failed read leaves.
    fn default() -> Self {
        Self {
            len: 0,
            next: usize::MAX,
            start: 0,
            packet: None,
        }
    }
}

impl Segments {
    /// A read from a device without offload: one packet, `len` bytes.
    pub fn whole(len: usize) -> Self {
        Self {
            len,
            next: 0,
            start: 0,
            packet: None,
        }
    }

    /// A read from a device with offload: the virtio header, then the
    /// packet or frame (behind `link` bytes of Ethernet header on TAP). A
    /// partial checksum of a single packet is finished here, in `read`.
    pub fn parse(read: &mut [u8], link: usize) -> Result<Self, SplitError> {
        let header = virtio::Header::read(read).ok_or(SplitError::Short)?;
        let [gso_size, csum_start, csum_offset] =
            [header.gso_size, header.csum_start, header.csum_offset].map(usize::from);
        let len = read.len();
        let frame = &mut read[virtio::HEADER_LEN..];
        if frame.len() <= link {
            return Err(SplitError::Short);
        }
        let packet = if header.gso_type == GSO_NONE {
            if header.flags & F_NEEDS_CSUM != 0 {
                finish_partial(frame, csum_start, csum_offset)?;
            }
            None
        } else if header.flags & F_NEEDS_CSUM == 0 || gso_size == 0 {
            return Err(SplitError::NotSegmentable);
        } else {
            Some(SuperPacket::parse(
                frame,
                link,
                header.gso_type,
                gso_size,
                csum_start,
                csum_offset,
            )?)
        };
        Ok(Self {
            len,
            next: 0,
            start: virtio::HEADER_LEN,
            packet,
        })
    }

    /// How many segments the read holds.
    pub fn count(&self) -> usize {
        self.packet.as_ref().map_or(1, |p| p.count)
    }

    /// The next segment, cut in `read` (the buffer `parse` was given, or
    /// that `whole`'s read landed in); `None` after the last. Spoils the
    /// segments handed out before it.
    pub fn next<'a>(&mut self, read: &'a mut [u8]) -> Option<&'a [u8]> {
        let i = self.next;
        if i >= self.count() {
            return None;
        }
        self.next += 1;
        let read = read.get_mut(..self.len)?;
        match &self.packet {
            None => read.get(self.start..),
            Some(packet) => Some(packet.cut(read, i)),
        }
    }
}

impl SuperPacket {
    fn parse(
        frame: &[u8],
        link: usize,
        gso_type: u8,
        gso_size: usize,
        csum_start: usize,
        csum_offset: usize,
    ) -> Result<Self, SplitError> {
        let ip = &frame[link..];
        let version = ip[0] >> 4;
        let (protocol, v6) = match gso_type & !GSO_ECN {
            GSO_TCPV4 => (PROTO_TCP, false),
            GSO_TCPV6 => (PROTO_TCP, true),
            GSO_UDP_L4 if gso_type & GSO_ECN == 0 => (PROTO_UDP, version == 6),
            _ => return Err(SplitError::GsoType(gso_type)),
        };
        let expected_offset = if protocol == PROTO_TCP { 16 } else { 6 };
        if csum_offset != expected_offset {
            return Err(SplitError::ChecksumOffsets);
        }
        let ip_len = csum_start
            .checked_sub(link)
            .ok_or(SplitError::ChecksumOffsets)?;
        let ip_ok = if v6 {
            version == 6 && ip_len >= 40 && ip.len() >= 40 && (ip_len > 40 || ip[6] == protocol)
        } else {
            version == 4
                && ip.len() >= 20
                && ip_len >= 20
                && usize::from(ip[0] & 0x0f) * 4 == ip_len
                && ip[9] == protocol
        };
        if !ip_ok {
            return Err(SplitError::IpHeader);
        }
        // The transport header's length from the header itself.
        let transport_len = if protocol == PROTO_TCP {
            let offset = frame.get(csum_start + 12).ok_or(SplitError::Short)?;
            usize::from(offset >> 4) * 4
        } else {
            8
        };
        let headers_len = csum_start + transport_len;
        let transport_min = if protocol == PROTO_TCP { 20 } else { 8 };
        if transport_len < transport_min || frame.len() < headers_len {
            return Err(SplitError::Short);
        }
        if headers_len > HEADERS_MAX {
            return Err(SplitError::HeadersTooLong);
        }
        let mut headers = [0; HEADERS_MAX];
        headers[..headers_len].copy_from_slice(&frame[..headers_len]);
        let payload = frame.len() - headers_len;
        // IPv4's total length counts its header, IPv6's payload length not.
        let ip_header_uncounted = if v6 { 40 } else { 0 };
        let longest = headers_len - link - ip_header_uncounted + payload.min(gso_size);
        if longest > usize::from(u16::MAX) {
            return Err(SplitError::SegmentTooLong);
        }
        Ok(Self {
            headers,
            headers_len,
            link,
            transport: csum_start,
            protocol,
            v6,
            gso_size,
            count: payload.div_ceil(gso_size).max(1),
        })
    }

    /// Writes segment `i`'s headers in front of its payload in `read` and
    /// returns the segment.
    fn cut<'a>(&self, read: &'a mut [u8], i: usize) -> &'a [u8] {
        let payload_total = read.len() - virtio::HEADER_LEN - self.headers_len;
        let offset = i * self.gso_size;
        let payload = self.gso_size.min(payload_total - offset);
        // Segment i's payload starts at HEADER_LEN + headers_len + offset;
        // its headers go right in front of it.
        let start = virtio::HEADER_LEN + offset;
        let segment = &mut read[start..start + self.headers_len + payload];
        segment[..self.headers_len].copy_from_slice(&self.headers[..self.headers_len]);
        let last = i + 1 == self.count;
        let transport_len = self.headers_len - self.transport + payload;
        let (link, transport) = (self.link, self.transport);
        let ip_len = self.headers_len - link + payload;
        let ip = &mut segment[link..transport];
        let addresses = if self.v6 {
            put16(ip, 4, (ip_len - 40) as u16);
            8..40
        } else {
            put16(ip, 2, ip_len as u16);
            let id = u16::from_be_bytes([ip[4], ip[5]]).wrapping_add(i as u16);
            put16(ip, 4, id);
            put16(ip, 10, 0);
            put16(ip, 10, checksum::finish(checksum::sum(ip, 0)));
            12..20
        };
        let pseudo = checksum::pseudo_header(&ip[addresses], self.protocol, transport_len);
        let l4 = &mut segment[transport..];
        let field = if self.protocol == PROTO_TCP {
            let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
            l4[4..8].copy_from_slice(&seq.wrapping_add(offset as u32).to_be_bytes());
            if !last {
                l4[13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                l4[13] &= !TCP_CWR;
            }
            16
        } else {
            put16(l4, 4, transport_len as u16);
            6
        };
        put16(l4, field, 0);
        let mut sum = checksum::finish(checksum::sum(l4, pseudo));
        if self.protocol == PROTO_UDP && sum == 0 {
            sum = 0xffff;
        }
        put16(l4, field, sum);
        segment
    }
}

/// Finishes a checksum the kernel left partial (CHECKSUM_PARTIAL): the
/// field at `start + offset` holds the pseudo-header sum, and the sum runs
/// from `start` to the end of `packet`.
fn finish_partial(packet: &mut [u8], start: usize, offset: usize) -> Result<(), SplitError> {
    let at = start + offset;
    if at + 2 > packet.len() {
        return Err(SplitError::ChecksumOffsets);
    }
    let partial = u16::from_be_bytes([packet[at], packet[at + 1]]);
    put16(packet, at, 0);
    let sum = checksum::finish(checksum::sum(&packet[start..], u64::from(partial)));
    put16(packet, at, sum);
    Ok(())
}

fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::core::checksum::{fold, pseudo_header, sum};
    use proptest::prelude::*;

    const V6_SRC: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const V6_DST: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A read as the kernel hands it over: virtio header, IPv6 header,
    /// transport header with only the pseudo-header sum in its checksum
    /// field, and `payload`.
    fn v6_read(udp: bool, tcp_flags: u8, gso_type: u8, gso_size: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = if udp {
            vec![0x30, 0x39, 0, 53, 0, 0, 0, 0]
        } else {
            let mut tcp = vec![0x9c, 0x40, 0x14, 0x51, 0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 7];
            tcp.extend_from_slice(&[0x50, tcp_flags, 1, 0, 0, 0, 0, 0]);
            tcp
        };
        let protocol = if udp { PROTO_UDP } else { PROTO_TCP };
        let at = if udp { 6 } else { 16 };
        let l4_len = l4.len() + payload.len();
        let partial = fold(pseudo_header(&[V6_SRC, V6_DST].concat(), protocol, l4_len));
        l4[at..at + 2].copy_from_slice(&partial.to_be_bytes());
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(l4_len as u16).to_be_bytes());
        ip.extend_from_slice(&[protocol, 64]);
        ip.extend_from_slice(&V6_SRC);
        ip.extend_from_slice(&V6_DST);
        let virtio = virtio::Header {
            flags: F_NEEDS_CSUM,
            gso_type,
            // As the kernel may give it: the whole first buffer.
            hdr_len: (ip.len() + l4_len) as u16,
            gso_size,
            csum_start: 40,
            csum_offset: at as u16,
        };
        [&virtio.to_bytes()[..], &ip, &l4, payload].concat()
    }

    /// Checks a segment's lengths and transport checksum; returns its
    /// transport header and payload.
    fn check_v6(segment: &[u8]) -> &[u8] {
        let (ip, l4) = segment.split_at(40);
        assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), l4.len());
        assert_eq!(
            fold(sum(l4, pseudo_header(&ip[8..40], ip[6], l4.len()))),
            0xffff,
            "transport checksum"
        );
        l4
    }

    #[test]
    fn a_tcp_super_packet_is_cut_in_place_like_the_kernel_would() {
        let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        let flags = TCP_CWR | TCP_PSH | TCP_FIN | 0x10;
        let mut read = v6_read(false, flags, GSO_TCPV6 | GSO_ECN, 1000, &payload);
        let base = read.as_ptr() as usize;
        let mut segments = Segments::parse(&mut read, 0).unwrap();
        assert_eq!(segments.count(), 3);
        let mut got = Vec::new();
        for i in 0..3 {
            let segment = segments.next(&mut read).unwrap();
            // In place: segment i starts gso_size bytes after segment i-1.
            assert_eq!(
                segment.as_ptr() as usize,
                base + virtio::HEADER_LEN + i * 1000
            );
            let l4 = check_v6(segment);
            let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1000 * i as u32));
            let want_flags = match i {
                0 => TCP_CWR | 0x10,
                1 => 0x10,
                _ => TCP_PSH | TCP_FIN | 0x10,
            };
            assert_eq!(l4[13], want_flags, "flags of segment {i}");
            got.extend_from_slice(&l4[20..]);
        }
        assert_eq!(got, payload);
        assert!(segments.next(&mut read).is_none());
    }

    #[test]
    fn a_udp_super_packet_gives_datagrams_with_their_own_length() {
        let payload = vec![0u8; 2100];
        let mut read = v6_read(true, 0, GSO_UDP_L4, 1000, &payload);
        let mut segments = Segments::parse(&mut read, 0).unwrap();
        let mut lengths = Vec::new();
        while let Some(segment) = segments.next(&mut read) {
            let l4 = check_v6(segment);
            assert_eq!(usize::from(u16::from_be_bytes([l4[4], l4[5]])), l4.len());
            // An all-zero payload sums to the headers' sum alone; the field is
            // never 0 (which says "no checksum" in IPv4).
            assert_ne!(&l4[6..8], &[0, 0]);
            lengths.push(l4.len() - 8);
        }
        assert_eq!(lengths, vec![1000, 1000, 100]);
    }

    #[test]
    fn a_single_packet_gets_its_partial_checksum_finished() {
        let payload = b"hello";
        let mut read = v6_read(true, 0, GSO_NONE, 0, payload);
        let mut segments = Segments::parse(&mut read, 0).unwrap();
        assert_eq!(segments.count(), 1);
        let packet = segments.next(&mut read).unwrap();
        assert_eq!(packet.len(), 40 + 8 + payload.len());
        check_v6(packet);
        assert!(segments.next(&mut read).is_none());
        // Without offload, the read is the packet.
        let mut plain = vec![0x45, 1, 2, 3];
        let mut whole = Segments::whole(3);
        assert_eq!(whole.next(&mut plain).unwrap(), &[0x45, 1, 2]);
        assert!(whole.next(&mut plain).is_none());
    }

    #[test]
    fn reads_that_cannot_be_cut_are_refused() {
        let payload = vec![1u8; 3000];
        let good = v6_read(false, 0x10, GSO_TCPV6, 1000, &payload);
        type Change = fn(&mut Vec<u8>);
        let cases: [(&str, Change, SplitError); 8] = [
            ("no virtio header", |r| r.truncate(4), SplitError::Short),
            ("unknown GSO type", |r| r[1] = 3, SplitError::GsoType(3)),
            (
                "gso_size 0",
                |r| r[4..6].fill(0),
                SplitError::NotSegmentable,
            ),
            (
                "no partial checksum",
                |r| r[0] = 0,
                SplitError::NotSegmentable,
            ),
            (
                "checksum offset not TCP's",
                |r| r[8] = 6,
                SplitError::ChecksumOffsets,
            ),
            (
                "IPv4 header for TCPv6",
                |r| r[10] = 0x45,
                SplitError::IpHeader,
            ),
            (
                "TCP data offset 4",
                |r| r[10 + 40 + 12] = 0x40,
                SplitError::Short,
            ),
            (
                "truncated TCP header",
                |r| r.truncate(10 + 40 + 10),
                SplitError::Short,
            ),
        ];
        for (what, change, error) in cases {
            let mut read = good.clone();
            change(&mut read);
            assert_eq!(Segments::parse(&mut read, 0).err(), Some(error), "{what}");
        }
        // A segment's IPv6 payload length (TCP header and data) must fit
        // in 16 bits: 20 + 65,515 bytes does, 20 + 65,516 does not.
        let mut read = v6_read(false, 0x10, GSO_TCPV6, 65_515, &vec![0; 65_515]);
        assert_eq!(Segments::parse(&mut read, 0).unwrap().count(), 1);
        let mut read = v6_read(false, 0x10, GSO_TCPV6, 65_516, &vec![0; 65_516]);
        assert_eq!(
            Segments::parse(&mut read, 0).err(),
            Some(SplitError::SegmentTooLong)
        );
        // A single packet's partial checksum pointing past its end.
        let mut read = v6_read(true, 0, GSO_NONE, 0, b"x");
        read[8] = 200;
        assert_eq!(
            Segments::parse(&mut read, 0).err(),
            Some(SplitError::ChecksumOffsets)
        );
    }

    proptest! {
        #[test]
        fn any_read_is_cut_within_itself_or_refused(
            mut read in proptest::collection::vec(any::<u8>(), 0..300),
            gso_type in prop_oneof![Just(GSO_TCPV4), Just(GSO_TCPV6), Just(GSO_UDP_L4), any::<u8>()],
            version in prop_oneof![Just(0x45u8), Just(0x60u8), any::<u8>()],
            link in 0..16usize,
        ) {
            if read.len() > virtio::HEADER_LEN + link {
                read[0] = F_NEEDS_CSUM;
                read[1] = gso_type;
                read[virtio::HEADER_LEN + link] = version;
            }
            let len = read.len();
            if let Ok(mut segments) = Segments::parse(&mut read, link) {
                let mut n = 0;
                while let Some(segment) = segments.next(&mut read) {
                    prop_assert!(!segment.is_empty() && segment.len() <= len);
                    n += 1;
                }
                prop_assert_eq!(n, segments.count());
            }
        }
    }
}
