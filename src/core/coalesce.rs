//! Coalescing for device writes (receive offload): which consecutive
//! packets of one TCP or UDP flow go to the overlay device as one
//! super-packet, and the headers that describe it to the kernel.
//!
//! A device opened with IFF_VNET_HDR takes, in one write, a virtio-net
//! header and then a packet of up to 64 KiB that the kernel handles as a
//! run of segments of `gso_size` bytes (the last may be shorter), the way
//! its own GRO would have merged them. [`Coalescer::plan`] looks at the
//! packets from the first on and says how many go into the next write and
//! with which prefix: the virtio header, the link header (TAP) and the
//! run's IP and transport headers. The shell writes that prefix and then,
//! for every packet of the run, its bytes behind the headers the prefix
//! stands for, gathered in one `writev`: no payload is copied here.
//!
//! Checksums are not verified on the way in. An opened packet has passed
//! the tunnel's authentication, which is what Linux's own WireGuard relies
//! on when it marks every decrypted packet CHECKSUM_UNNECESSARY. The
//! super-packet's transport checksum is left to the kernel (NEEDS_CSUM),
//! as for segmentation offload on the sending side.
//!
//! Must never: reorder packets, merge packets whose headers differ in
//! anything but what segmentation rewrites (IP total length, ID and
//! checksum; TCP sequence number, checksum and PSH on the last segment;
//! UDP length and checksum), merge frames behind different Ethernet
//! headers, or panic on any input.

use etherparse::IpNumber;

use super::checksum;
use super::ethernet::ETHERNET_HEADER;
use super::virtio::{self, F_NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4};

/// Segments per write at most: Linux's limit for UDP segmentation
/// (UDP_MAX_SEGMENTS), and more than a 64 KiB TCP super-packet of
/// 1420-byte segments holds.
pub const MAX_SEGMENTS: usize = 64;
/// The longest prefix: virtio header, Ethernet header, IPv4 header without
/// options, TCP header with the most options.
const PREFIX_MAX: usize = virtio::HEADER_LEN + ETHERNET_HEADER + IPV4_HEADER + 60;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const PROTO_TCP: u8 = IpNumber::TCP.0;
const PROTO_UDP: u8 = IpNumber::UDP.0;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// What the device takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalescer {
    /// Bytes in front of each IP packet: 0 on a TUN device, the Ethernet
    /// header on a TAP device.
    pub link_header: usize,
    /// Whether the device takes UDP super-packets (TUN_F_USO4, Linux 6.2
    /// and later); TCP it always takes when offload is on.
    pub udp: bool,
}

/// The next write: the first `count` packets, each without its first
/// `skip` bytes, behind `prefix()`.
#[derive(Clone, Copy)]
pub struct Plan {
    pub count: usize,
    /// Bytes of every packet of the run that the prefix stands for: its
    /// link, IP and transport headers for a super-packet, none for a
    /// packet written as it is.
    pub skip: usize,
    prefix: [u8; PREFIX_MAX],
    prefix_len: usize,
}

impl Plan {
    pub fn prefix(&self) -> &[u8] {
        &self.prefix[..self.prefix_len]
    }

    /// One packet as it is, behind an all-zero virtio header (no
    /// segmentation, checksum already in place).
    fn single() -> Self {
        Self {
            count: 1,
            skip: 0,
            prefix: [0; PREFIX_MAX],
            prefix_len: virtio::HEADER_LEN,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

/// A packet that may be part of a super-packet.
#[derive(Debug, Clone, Copy)]
struct Segment<'a> {
    transport: Transport,
    link: &'a [u8],
    ip: &'a [u8],
    /// The transport header, options included.
    header: &'a [u8],
    payload: usize,
}

impl<'a> Segment<'a> {
    fn parse(packet: &'a [u8], link_header: usize, udp: bool) -> Option<Self> {
        let (link, rest) = packet.split_at_checked(link_header)?;
        let ip = rest.get(..IPV4_HEADER)?;
        // IPv4 without options, the whole packet (no link padding behind
        // it), not a fragment.
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[0] != 0x45 || total != rest.len() || ip[6] & 0x3f != 0 || ip[7] != 0 {
            return None;
        }
        let l4 = &rest[IPV4_HEADER..];
        let (transport, header_len) = match ip[9] {
            PROTO_TCP => {
                let len = usize::from(l4.get(12)? >> 4) * 4;
                let flags = *l4.get(13)?;
                if len < 20 || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH) {
                    return None;
                }
                (Transport::Tcp, len)
            }
            PROTO_UDP if udp => {
                let length = u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]);
                if usize::from(length) != l4.len() {
                    return None;
                }
                (Transport::Udp, UDP_HEADER)
            }
            _ => return None,
        };
        let header = l4.get(..header_len)?;
        let payload = l4.len() - header_len;
        (payload > 0).then_some(Self {
            transport,
            link,
            ip,
            header,
            payload,
        })
    }

    fn psh(&self) -> bool {
        self.transport == Transport::Tcp && self.header[13] & TCP_PSH != 0
    }

    fn seq(&self) -> u32 {
        u32::from_be_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    fn id(&self) -> u16 {
        u16::from_be_bytes([self.ip[4], self.ip[5]])
    }

    /// Whether `next` continues the run that starts with `self` (the
    /// run's first segment) and ends with `last`: alike in everything the
    /// kernel copies from the first segment when it segments the run, and
    /// numbered as it numbers the segments (IP IDs counting on, as Linux's
    /// own GRO requires of segments without DF).
    fn continued_by(&self, last: &Segment, next: &Segment) -> bool {
        let ip_same = self.ip[..2] == next.ip[..2]
            && next.id() == last.id().wrapping_add(1)
            && self.ip[6..10] == next.ip[6..10]
            && self.ip[12..20] == next.ip[12..20];
        let same_shape = self.transport == next.transport
            && self.link == next.link
            && ip_same
            && self.header.len() == next.header.len();
        if !same_shape || next.payload > self.payload {
            return false;
        }
        match self.transport {
            // Ports, acknowledgement, header length and flags, window,
            // urgent pointer and options alike; the sequence number
            // continues the last segment's.
            Transport::Tcp => {
                let (a, b) = (self.header, next.header);
                a[..4] == b[..4]
                    && a[8..13] == b[8..13]
                    && a[14..16] == b[14..16]
                    && a[18..] == b[18..]
                    && next.seq() == last.seq().wrapping_add(last.payload as u32)
            }
            Transport::Udp => self.header[..4] == next.header[..4],
        }
    }
}

impl Coalescer {
    /// The next write for `packets` (which must not be empty): as many of
    /// the first packets as form one super-packet, or the first alone.
    pub fn plan(&self, packets: &[&[u8]]) -> Plan {
        let Some(first) = packets
            .first()
            .and_then(|p| Segment::parse(p, self.link_header, self.udp))
        else {
            return Plan::single();
        };
        let mut last = first;
        let mut count = 1;
        let mut payload = first.payload;
        let headers = IPV4_HEADER + first.header.len();
        for packet in &packets[1..] {
            // Only the last segment may be short or carry PSH.
            if count == MAX_SEGMENTS || last.payload < first.payload || last.psh() {
                break;
            }
            let Some(next) = Segment::parse(packet, self.link_header, self.udp) else {
                break;
            };
            if !first.continued_by(&last, &next) || headers + payload + next.payload > 65535 {
                break;
            }
            payload += next.payload;
            last = next;
            count += 1;
        }
        if count == 1 {
            return Plan::single();
        }
        self.super_packet(&first, &last, count, payload)
    }

    fn super_packet(&self, first: &Segment, last: &Segment, count: usize, payload: usize) -> Plan {
        let link = self.link_header;
        let l4_len = first.header.len() + payload;
        let total = IPV4_HEADER + l4_len;
        let skip = link + IPV4_HEADER + first.header.len();
        let mut prefix = [0u8; PREFIX_MAX];
        let (virtio, rest) = prefix.split_at_mut(virtio::HEADER_LEN);
        let (gso_type, csum_offset) = match first.transport {
            Transport::Tcp => (GSO_TCPV4, 16u16),
            Transport::Udp => (GSO_UDP_L4, 6),
        };
        let header = virtio::Header {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: skip as u16,
            gso_size: first.payload as u16,
            csum_start: (link + IPV4_HEADER) as u16,
            csum_offset,
        };
        virtio.copy_from_slice(&header.to_bytes());

        rest[..link].copy_from_slice(first.link);
        let ip = &mut rest[link..link + IPV4_HEADER];
        ip.copy_from_slice(first.ip);
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[10..12].fill(0);
        let ip_checksum = checksum::finish(checksum::sum(ip, 0));
        ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());

        let l4 = &mut rest[link + IPV4_HEADER..skip];
        l4.copy_from_slice(first.header);
        match first.transport {
            Transport::Tcp => {
                if last.psh() {
                    l4[13] |= TCP_PSH;
                }
            }
            Transport::Udp => l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes()),
        }
        // The kernel finishes the checksum from here: the field holds the
        // pseudo-header's sum, folded but not inverted.
        let pseudo = checksum::pseudo_header(&first.ip[12..20], first.ip[9], l4_len);
        let at = usize::from(csum_offset);
        l4[at..at + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
        Plan {
            count,
            skip,
            prefix,
            prefix_len: virtio::HEADER_LEN + skip,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::core::checksum::{fold, sum};
    use crate::core::split::Segments;
    use proptest::prelude::*;

    const MAC: [u8; 14] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];

    /// What a packet of the tests looks like; `build` gives it valid
    /// checksums.
    #[derive(Debug, Clone)]
    struct Spec {
        link: Vec<u8>,
        tos: u8,
        id: u16,
        flags_frag: u16,
        ttl: u8,
        udp: bool,
        src_port: u16,
        seq: u32,
        ack: u32,
        tcp_flags: u8,
        window: u16,
        options: Vec<u8>,
        payload: Vec<u8>,
    }

    impl Spec {
        fn tcp(seq: u32, payload_len: usize) -> Self {
            Self {
                link: Vec::new(),
                tos: 0,
                id: 100,
                flags_frag: 0x4000,
                ttl: 64,
                udp: false,
                src_port: 40000,
                seq,
                ack: 7,
                tcp_flags: TCP_ACK,
                window: 500,
                options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                payload: (0..payload_len).map(|i| (i as u32 ^ seq) as u8).collect(),
            }
        }

        fn udp(id: u16, payload_len: usize) -> Self {
            Self {
                udp: true,
                id,
                options: Vec::new(),
                ..Self::tcp(u32::from(id), payload_len)
            }
        }

        fn build(&self) -> Vec<u8> {
            let mut l4 = Vec::new();
            if self.udp {
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&53u16.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            } else {
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&5201u16.to_be_bytes());
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&self.ack.to_be_bytes());
                l4.push((((20 + self.options.len()) / 4) as u8) << 4);
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&self.window.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]);
                l4.extend_from_slice(&self.options);
            }
            l4.extend_from_slice(&self.payload);
            let proto = if self.udp { PROTO_UDP } else { PROTO_TCP };
            let mut ip = vec![0x45, self.tos];
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&self.id.to_be_bytes());
            ip.extend_from_slice(&self.flags_frag.to_be_bytes());
            ip.extend_from_slice(&[self.ttl, proto, 0, 0, 10, 42, 1, 5, 10, 42, 2, 9]);
            finish_checksums(&mut ip, &mut l4);
            [self.link.clone(), ip, l4].concat()
        }
    }

    /// Fills in the IP header's and the transport's checksums.
    fn finish_checksums(ip: &mut [u8], l4: &mut [u8]) {
        ip[10..12].fill(0);
        let c = !fold(sum(ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let at = if ip[9] == PROTO_TCP { 16 } else { 6 };
        l4[at..at + 2].fill(0);
        let pseudo = sum(&ip[12..20], u64::from(ip[9]) + l4.len() as u64);
        let mut c = !fold(sum(l4, pseudo));
        if ip[9] == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// What the kernel makes of a write: the super-packet cut back into
    /// segments, each with its own length, IP ID, sequence number and
    /// checksums, PSH only on the last.
    fn segment(plan: &Plan, run: &[&[u8]], link_header: usize) -> Vec<Vec<u8>> {
        let prefix = plan.prefix();
        let (virtio, headers) = prefix.split_at(virtio::HEADER_LEN);
        if virtio == [0; virtio::HEADER_LEN] {
            assert_eq!((run.len(), plan.skip), (1, 0));
            return vec![run[0].to_vec()];
        }
        let header = virtio::Header::read(virtio).unwrap();
        let [hdr_len, gso_size, csum_start, csum_offset] = [
            header.hdr_len,
            header.gso_size,
            header.csum_start,
            header.csum_offset,
        ]
        .map(usize::from);
        assert_eq!(header.flags, F_NEEDS_CSUM);
        assert_eq!(hdr_len, headers.len());
        assert_eq!(csum_start, link_header + IPV4_HEADER);
        let payload: Vec<u8> = run.iter().flat_map(|p| p[plan.skip..].to_vec()).collect();
        // The super-packet as the kernel sees it must be consistent.
        let ip = &headers[link_header..link_header + IPV4_HEADER];
        assert_eq!(fold(sum(ip, 0)), 0xffff, "IP checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, headers.len() - link_header + payload.len());
        let is_tcp = header.gso_type == GSO_TCPV4;
        assert_eq!(csum_offset, if is_tcp { 16 } else { 6 });
        let id = u16::from_be_bytes([ip[4], ip[5]]);
        let chunks: Vec<&[u8]> = payload.chunks(gso_size).collect();
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut ip = headers[link_header..link_header + IPV4_HEADER].to_vec();
            let mut l4 = headers[link_header + IPV4_HEADER..].to_vec();
            l4.extend_from_slice(chunk);
            ip[2..4].copy_from_slice(&((IPV4_HEADER + l4.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            if is_tcp {
                let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
                let seq = seq.wrapping_add((i * gso_size) as u32);
                l4[4..8].copy_from_slice(&seq.to_be_bytes());
                if i + 1 < chunks.len() {
                    l4[13] &= !TCP_PSH;
                }
            } else {
                let len = l4.len() as u16;
                l4[4..6].copy_from_slice(&len.to_be_bytes());
            }
            finish_checksums(&mut ip, &mut l4);
            out.push([headers[..link_header].to_vec(), ip, l4].concat());
        }
        out
    }

    /// Plans writes for all of `packets` and checks that they take every
    /// packet once, in order, and that each write segments back into its
    /// packets. Returns the run lengths.
    fn runs(coalescer: Coalescer, packets: &[Vec<u8>]) -> Vec<usize> {
        let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut at = 0;
        let mut counts = Vec::new();
        while at < slices.len() {
            let plan = coalescer.plan(&slices[at..]);
            assert!(plan.count >= 1 && at + plan.count <= slices.len());
            let run = &slices[at..at + plan.count];
            let segments = segment(&plan, run, coalescer.link_header);
            assert_eq!(segments.len(), run.len(), "segments of the write at {at}");
            for (k, (got, want)) in segments.iter().zip(run).enumerate() {
                assert_eq!(got, want, "packet {} differs after segmentation", at + k);
            }
            // Read back as a device read, our own splitting gives the
            // packets too.
            let mut read = plan.prefix().to_vec();
            for packet in run {
                read.extend_from_slice(&packet[plan.skip..]);
            }
            let mut split = Segments::parse(&mut read, coalescer.link_header).unwrap();
            assert_eq!(split.count(), run.len(), "split of the write at {at}");
            for (k, want) in run.iter().enumerate() {
                let got = split.next(&mut read).unwrap().to_vec();
                assert_eq!(&got, want, "packet {} differs after splitting", at + k);
            }
            counts.push(plan.count);
            at += plan.count;
        }
        counts
    }

    const TUN: Coalescer = Coalescer {
        link_header: 0,
        udp: true,
    };
    const TAP: Coalescer = Coalescer {
        link_header: 14,
        udp: true,
    };

    /// A flow's segments of `size` bytes, ids and sequence numbers counting
    /// on, the last one `last` bytes.
    fn flow(n: usize, size: usize, last: usize) -> Vec<Spec> {
        (0..n)
            .map(|i| {
                let len = if i + 1 == n { last } else { size };
                let mut spec = Spec::tcp(1_000 + (i * size) as u32, len);
                spec.id = 100 + i as u16;
                spec
            })
            .collect()
    }

    fn built(specs: &[Spec]) -> Vec<Vec<u8>> {
        specs.iter().map(Spec::build).collect()
    }

    #[test]
    fn a_tcp_flow_becomes_one_super_packet_that_segments_back_into_it() {
        let mut specs = flow(5, 1368, 200);
        specs[4].tcp_flags = TCP_ACK | TCP_PSH;
        assert_eq!(runs(TUN, &built(&specs)), vec![5]);
        for spec in &mut specs {
            spec.link = MAC.to_vec();
        }
        assert_eq!(runs(TAP, &built(&specs)), vec![5]);
        let plan = TAP.plan(&built(&specs).iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert_eq!(plan.skip, 14 + 20 + 32);
        assert_eq!(
            &plan.prefix()[virtio::HEADER_LEN..virtio::HEADER_LEN + 14],
            &MAC
        );
    }

    #[test]
    fn anything_segmentation_would_not_restore_ends_the_run() {
        type Change = fn(&mut Spec);
        let changes: [(&str, Change); 18] = [
            ("other port", |s| s.src_port += 1),
            ("sequence gap", |s| s.seq += 1),
            ("other ack", |s| s.ack += 1),
            ("other window", |s| s.window += 1),
            ("other timestamp", |s| s.options[11] += 1),
            ("no options", |s| s.options.clear()),
            ("other TTL", |s| s.ttl -= 1),
            ("other TOS", |s| s.tos = 4),
            ("DF cleared", |s| s.flags_frag = 0),
            ("more fragments", |s| s.flags_frag |= 0x2000),
            ("SYN", |s| s.tcp_flags |= 0x02),
            ("FIN", |s| s.tcp_flags |= 0x01),
            ("RST", |s| s.tcp_flags |= 0x04),
            ("CWR", |s| s.tcp_flags |= 0x80),
            ("URG", |s| s.tcp_flags |= 0x20),
            ("longer than the first", |s| s.payload.push(0)),
            ("UDP", |s| *s = Spec::udp(s.id, s.payload.len())),
            ("IP ID not counting on", |s| s.id += 1),
        ];
        for (what, change) in changes {
            let mut specs = flow(3, 1000, 1000);
            change(&mut specs[1]);
            let counts = runs(TUN, &built(&specs));
            assert_eq!(counts[0], 1, "{what}: {counts:?}");
        }
        // Only the last segment may be short or carry PSH.
        let mut specs = flow(4, 1000, 1000);
        specs[1].tcp_flags |= TCP_PSH;
        assert_eq!(runs(TUN, &built(&specs)), vec![2, 2]);
        let mut specs = flow(4, 1000, 1000);
        specs[1].payload.truncate(10);
        specs[2].seq = specs[1].seq + 10;
        specs[3].seq = specs[2].seq + 1000;
        assert_eq!(runs(TUN, &built(&specs)), vec![2, 2]);
        // A frame behind another Ethernet header.
        let mut specs = flow(3, 1000, 1000);
        for spec in &mut specs {
            spec.link = MAC.to_vec();
        }
        specs[2].link[0] = 4;
        assert_eq!(runs(TAP, &built(&specs)), vec![2, 1]);
    }

    #[test]
    fn what_is_not_a_full_ipv4_tcp_or_udp_packet_goes_alone() {
        let good = Spec::tcp(1, 100).build();
        let mut options = good.clone();
        options[0] = 0x46;
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        let mut empty = Spec::tcp(1, 0).build();
        empty.truncate(52);
        let arp = vec![0u8; 28];
        for (what, packet) in [
            ("IP options", options),
            ("padding behind the packet", padded),
            ("no payload", empty),
            ("not IPv4", arp),
            ("truncated", good[..30].to_vec()),
        ] {
            let packets = [packet.as_slice(), &good, &good];
            let plan = TUN.plan(&packets);
            assert_eq!((plan.count, plan.skip), (1, 0), "{what}");
            assert_eq!(plan.prefix(), &[0; virtio::HEADER_LEN], "{what}");
        }
    }

    #[test]
    fn udp_datagrams_of_one_size_coalesce_only_where_the_device_takes_them() {
        let specs: Vec<Spec> = (0..6).map(|i| Spec::udp(i, 1200)).collect();
        let mut mixed = specs.clone();
        mixed[3].payload.truncate(300);
        assert_eq!(runs(TUN, &built(&specs)), vec![6]);
        assert_eq!(runs(TUN, &built(&mixed)), vec![4, 2]);
        let no_uso = Coalescer {
            link_header: 0,
            udp: false,
        };
        assert_eq!(runs(no_uso, &built(&specs)), vec![1; 6]);
        let mut other = specs.clone();
        other[2].src_port = 9;
        assert_eq!(runs(TUN, &built(&other)), vec![2, 1, 3]);
    }

    #[test]
    fn a_write_holds_at_most_64_segments_and_64_kib() {
        let small = built(&flow(100, 100, 100));
        assert_eq!(runs(TUN, &small), vec![64, 36]);
        // 1448-byte payloads behind 52 bytes of headers: 45 fit in 65,535.
        let large = built(&flow(50, 1448, 1448));
        assert_eq!(runs(TUN, &large), vec![45, 5]);
    }

    /// Packets of three flows, interleaved in stretches, with random sizes
    /// and flags.
    fn mixed_packets() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let step = (
            0..3usize,
            1..6usize,
            1..1400usize,
            any::<bool>(),
            any::<bool>(),
        );
        proptest::collection::vec(step, 1..40).prop_map(|steps| {
            let mut seqs = [0u32, 5_000, 90_000];
            let mut ids = [0u16, 300, 60_000];
            let mut packets = Vec::new();
            for (flow, n, size, psh, short) in steps {
                for k in 0..n {
                    let len = if short && k + 1 == n {
                        size / 2 + 1
                    } else {
                        size
                    };
                    let mut spec = if flow == 2 {
                        Spec::udp(0, len)
                    } else {
                        Spec::tcp(seqs[flow], len)
                    };
                    spec.src_port = 1000 + flow as u16;
                    spec.id = ids[flow];
                    ids[flow] = ids[flow].wrapping_add(1);
                    if psh && k + 1 == n {
                        spec.tcp_flags |= TCP_PSH;
                    }
                    seqs[flow] = seqs[flow].wrapping_add(len as u32);
                    packets.push(spec.build());
                }
            }
            packets
        })
    }

    proptest! {
        #[test]
        fn every_packet_is_written_once_in_order_and_segments_back(packets in mixed_packets()) {
            // `runs` asserts order, completeness and segmentation.
            runs(TUN, &packets);
        }

        #[test]
        fn any_bytes_give_a_plan_and_never_a_panic(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..8),
            link in 0..16usize,
        ) {
            let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
            let plan = Coalescer { link_header: link, udp: true }.plan(&slices);
            prop_assert!(plan.count >= 1 && plan.count <= slices.len());
            for packet in &slices[..plan.count] {
                prop_assert!(plan.skip <= packet.len());
            }
        }
    }
}
