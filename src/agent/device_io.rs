//! Batched reads and writes on the overlay device, with or without
//! segmentation offload.
//!
//! With offload (IFF_VNET_HDR), one read brings a TCP super-packet of up to
//! 64 KiB that tun-rs splits into MTU-sized packets, and a batch of packets
//! for the device is coalesced (GRO) into as few writes as possible: one
//! system call per super-packet instead of one per 1420 bytes. Without it,
//! one packet per read and per write, as before. A TAP device (frames)
//! splits the same way behind the Ethernet header, which is copied onto
//! every segment; its writes are coalesced by the same GRO (which reads
//! IP packets only) with the Ethernet header staged in front of the
//! virtio header and moved behind it before the write. Must never: look
//! into a packet beyond what the splitting and coalescing need (decisions
//! are the core's), reorder packets, coalesce frames of one flow bound for
//! different MACs, or hold more than one batch of buffers.

use std::io;
use std::sync::Arc;

use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN, VirtioNetHdr};

/// Largest packet or frame read without offload (and the largest
/// unsegmented packet with it).
const READ_BUFFER: usize = 65536;
/// A split segment never exceeds the device MTU; this covers any MTU an
/// Ethernet underlay allows with room to spare.
const SEGMENT_BUFFER: usize = 9216;
/// Room in each buffer for the device writes: a coalesced TCP flow grows
/// to 64 KiB, and tun-rs wants twice the virtio header on top. Capacity
/// that is never written is never resident: only the first packet of each
/// flow in a batch grows into it.
const COALESCE_BUFFER: usize = 65536 + 2 * VIRTIO_NET_HDR_LEN;
/// Destination and source MAC, EtherType.
const ETHERNET_HEADER: usize = 14;
/// virtio-net header fields (include/uapi/linux/virtio_net.h).
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;
const F_NEEDS_CSUM: u8 = 1;

/// The reading half of the device, driven by the agent task.
pub struct DeviceIo {
    device: Arc<AsyncDevice>,
    offload: bool,
    /// TAP: reads and writes are Ethernet frames.
    frames: bool,
    /// Offload: the raw read, virtio header and super-packet.
    raw: Vec<u8>,
    /// The packets of the last read (split segments with offload).
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

/// The writing half, used by one writer at a time (the send stage).
/// Writes are plain system calls: a TUN/TAP write never waits.
pub struct DeviceWriter {
    device: Arc<AsyncDevice>,
    offload: bool,
    frames: bool,
    /// Offload: packets to write, each behind room for the virtio header;
    /// coalescing appends to the first of a flow.
    pending: Vec<Vec<u8>>,
    gro: GROTable,
}

impl DeviceIo {
    pub fn new(device: AsyncDevice, frames: bool) -> Self {
        let offload = device.tcp_gso();
        let (count, first) = if offload {
            (IDEAL_BATCH_SIZE, READ_BUFFER)
        } else {
            (1, READ_BUFFER)
        };
        let mut packets = vec![vec![0u8; SEGMENT_BUFFER]; count];
        packets[0] = vec![0u8; first];
        Self {
            device: Arc::new(device),
            offload,
            frames,
            raw: if offload {
                vec![0u8; VIRTIO_NET_HDR_LEN + READ_BUFFER]
            } else {
                Vec::new()
            },
            packets,
            sizes: vec![0; count],
        }
    }

    /// The writing half. Make one: writes from two writers could interleave.
    pub fn writer(&self) -> DeviceWriter {
        DeviceWriter {
            device: Arc::clone(&self.device),
            offload: self.offload,
            frames: self.frames,
            pending: Vec::new(),
            gro: GROTable::new(),
        }
    }

    /// Whether segmentation offload is on.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Waits for the next read; returns how many packets it brought (see
    /// `packet`).
    pub async fn recv(&mut self) -> io::Result<usize> {
        if !self.offload {
            let n = self.device.recv(&mut self.packets[0]).await?;
            self.sizes[0] = n;
            return Ok(1);
        }
        if self.frames {
            let n = self.device.recv(&mut self.raw).await?;
            return self.split_frame(n);
        }
        self.device
            .recv_multiple(&mut self.raw, &mut self.packets, &mut self.sizes, 0)
            .await
    }

    /// Like `recv`, but returns `WouldBlock` instead of waiting.
    pub fn try_recv(&mut self) -> io::Result<usize> {
        if !self.offload {
            let n = self.device.try_recv(&mut self.packets[0])?;
            self.sizes[0] = n;
            return Ok(1);
        }
        if self.frames {
            let n = self.device.try_recv(&mut self.raw)?;
            return self.split_frame(n);
        }
        self.device
            .try_recv_multiple(&mut self.raw, &mut self.packets, &mut self.sizes, 0)
    }

    /// Splits the frame of `len` bytes in `raw` (virtio header first) into
    /// `packets`, as tun-rs does for IP packets, keeping the Ethernet
    /// header on each.
    fn split_frame(&mut self, len: usize) -> io::Result<usize> {
        let raw = self
            .raw
            .get_mut(..len)
            .ok_or_else(|| invalid("read past the buffer"))?;
        if len <= VIRTIO_NET_HDR_LEN + ETHERNET_HEADER {
            return Err(invalid("frame shorter than its headers"));
        }
        let (header, frame) = raw.split_at_mut(VIRTIO_NET_HDR_LEN);
        let mut hdr = VirtioNetHdr::decode(header)?;
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(frame, hdr.csum_start, hdr.csum_offset)?;
            }
            let first = &mut self.packets[0];
            first
                .get_mut(..frame.len())
                .ok_or_else(|| invalid("frame too long"))?
                .copy_from_slice(frame);
            self.sizes[0] = frame.len();
            return Ok(1);
        }
        let (ethernet, ip) = frame.split_at_mut(ETHERNET_HEADER);
        let is_v6 = match hdr.gso_type & !GSO_ECN {
            GSO_TCPV4 => false,
            GSO_TCPV6 => true,
            GSO_UDP_L4 => ip.first().is_some_and(|b| b >> 4 == 6),
            _ => return Err(invalid("unknown GSO type")),
        };
        // The offsets count from the frame's start; the split wants them
        // from the IP header's.
        let behind = |v: u16| {
            v.checked_sub(ETHERNET_HEADER as u16)
                .ok_or_else(|| invalid("offsets inside the Ethernet header"))
        };
        hdr.csum_start = behind(hdr.csum_start)?;
        hdr.hdr_len = behind(hdr.hdr_len)?;
        let n = tun_rs::gso_split(
            ip,
            hdr,
            &mut self.packets,
            &mut self.sizes,
            ETHERNET_HEADER,
            is_v6,
        )?;
        for (packet, size) in self.packets.iter_mut().zip(&mut self.sizes).take(n) {
            packet[..ETHERNET_HEADER].copy_from_slice(ethernet);
            *size += ETHERNET_HEADER;
        }
        Ok(n)
    }

    /// Packet `i` of the last read.
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.packets[i][..self.sizes[i]]
    }
}

impl DeviceWriter {
    /// Writes `packets` in order; returns how many writes failed (each a
    /// counted drop for the caller).
    pub fn write_all<'a>(&mut self, packets: impl Iterator<Item = &'a [u8]>) -> u64 {
        if !self.offload {
            let mut failed = 0;
            for packet in packets {
                if let Err(e) = write_to(&self.device, packet) {
                    tracing::debug!(error = %e, "device write failed");
                    failed += 1;
                }
            }
            return failed;
        }
        let mut failed = 0;
        let mut packets = packets.peekable();
        while packets.peek().is_some() {
            if self.frames {
                failed += self.write_frames(&mut packets);
                continue;
            }
            let n = self.stage(&mut packets);
            // The device's own (blocking-style) write path: tun-rs's async
            // one would wait on the agent thread's runtime.
            let device: &tun_rs::DeviceImpl = &self.device;
            let sent =
                device.send_multiple(&mut self.gro, &mut self.pending[..n], VIRTIO_NET_HDR_LEN);
            if let Err(e) = sent {
                tracing::debug!(error = %e, "device write failed");
                failed += 1;
            }
        }
        failed
    }

    /// Writes up to one batch of frames, the TCP segments of a flow
    /// coalesced like the IP packets of a TUN device: tun-rs's GRO works
    /// on IP packets, so each frame is staged as [Ethernet header][virtio
    /// header][IP packet] and the first two swap places before the write.
    /// Frames of one IP flow with different Ethernet headers (a MAC that
    /// changed within the batch) turn coalescing off for that batch.
    fn write_frames<'a>(&mut self, frames: &mut impl Iterator<Item = &'a [u8]>) -> u64 {
        let mut failed = 0;
        let mut n = 0;
        for frame in frames.take(IDEAL_BATCH_SIZE) {
            let Some((ethernet, ip)) = frame.split_at_checked(ETHERNET_HEADER) else {
                failed += 1;
                continue;
            };
            if self.pending.len() == n {
                self.pending.push(Vec::with_capacity(COALESCE_BUFFER));
            }
            let buf = &mut self.pending[n];
            buf.clear();
            buf.extend_from_slice(ethernet);
            buf.extend_from_slice(&COALESCED_AWAY);
            buf.extend_from_slice(ip);
            n += 1;
        }
        let batch = &mut self.pending[..n];
        let coalesce = ethernet_consistent(batch);
        if coalesce && let Err(e) = self.gro.apply_gro(batch, FRAME_OFFSET, false) {
            tracing::debug!(error = %e, "coalescing frames failed");
        }
        for buf in batch.iter_mut() {
            // With coalescing off (or failed), every frame goes out behind
            // an all-zero virtio header: not segmented, checksums done.
            let written = match tap_frame(buf, coalesce) {
                Ok(true) => write_to(&self.device, buf),
                Ok(false) => continue,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "device write failed");
                failed += 1;
            }
        }
        failed
    }

    /// Copies up to one batch of packets behind room for the virtio header.
    fn stage<'a>(&mut self, packets: &mut impl Iterator<Item = &'a [u8]>) -> usize {
        let mut n = 0;
        for packet in packets.take(IDEAL_BATCH_SIZE) {
            if self.pending.len() == n {
                self.pending.push(Vec::with_capacity(COALESCE_BUFFER));
            }
            // tun-rs coalesces only into a buffer whose capacity already
            // holds the result (it never grows one): with room for one
            // packet, every write carried a single packet.
            let buf = &mut self.pending[n];
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(packet);
            n += 1;
        }
        n
    }
}

/// One write, as a plain system call: tun-rs's async one would wait on
/// the agent thread's runtime, and a TUN/TAP write never waits anyway.
fn write_to(device: &tun_rs::DeviceImpl, bytes: &[u8]) -> io::Result<()> {
    rustix::io::write(device, bytes)?;
    Ok(())
}

/// Where a staged frame's IP packet starts: behind its Ethernet header and
/// the virtio header tun-rs's GRO writes in front of the packet.
const FRAME_OFFSET: usize = ETHERNET_HEADER + VIRTIO_NET_HDR_LEN;
/// A virtio header no write carries (GSO type 0xff): tun-rs's GRO encodes
/// a header for every packet it writes, so a frame still holding this one
/// was coalesced into another.
const COALESCED_AWAY: [u8; VIRTIO_NET_HDR_LEN] = [0xff; VIRTIO_NET_HDR_LEN];
const F_GSO_TYPE_AT: usize = 1;

/// Whether the frames of each IP source and destination pair share one
/// Ethernet header, so that coalescing them cannot send one's payload to
/// another's MAC. Non-IP frames are never coalesced and do not count; a
/// frame with nothing behind its Ethernet header turns coalescing off.
fn ethernet_consistent(batch: &[Vec<u8>]) -> bool {
    let mut seen: Vec<(&[u8], &[u8])> = Vec::new();
    for buf in batch {
        if buf.len() <= FRAME_OFFSET {
            return false;
        }
        let (ethernet, ip) = (&buf[..ETHERNET_HEADER], &buf[FRAME_OFFSET..]);
        let addresses = match ip.first().map(|b| b >> 4) {
            Some(4) => ip.get(12..20),
            Some(6) => ip.get(8..40),
            _ => None,
        };
        let Some(addresses) = addresses else { continue };
        match seen.iter().find(|(a, _)| *a == addresses) {
            Some((_, e)) if *e != ethernet => return false,
            Some(_) => {}
            None => seen.push((addresses, ethernet)),
        }
    }
    true
}

/// Turns a staged [Ethernet][virtio][IP] buffer into the frame a TAP
/// device takes, [virtio][Ethernet][IP], the checksum and header offsets
/// moved behind the Ethernet header. `Ok(false)`: coalesced into another
/// frame, nothing to write.
fn tap_frame(buf: &mut [u8], coalesced: bool) -> io::Result<bool> {
    let header = buf
        .get_mut(ETHERNET_HEADER..FRAME_OFFSET)
        .ok_or_else(|| invalid("staged frame too short"))?;
    if !coalesced || header[F_GSO_TYPE_AT] == COALESCED_AWAY[F_GSO_TYPE_AT] {
        if coalesced {
            return Ok(false);
        }
        header.fill(0);
    } else {
        let mut hdr = VirtioNetHdr::decode(header)?;
        if hdr.gso_type != GSO_NONE || hdr.flags & F_NEEDS_CSUM != 0 {
            hdr.csum_start += ETHERNET_HEADER as u16;
            hdr.hdr_len += ETHERNET_HEADER as u16;
        }
        hdr.encode(header)?;
    }
    buf[..FRAME_OFFSET].rotate_left(ETHERNET_HEADER);
    Ok(true)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Fills in a checksum the kernel left partial (CHECKSUM_PARTIAL): the
/// field at `start + offset` holds the pseudo-header sum; the sum runs
/// from `start` to the end. Out-of-range offsets are an error, not a panic.
fn complete_checksum(frame: &mut [u8], start: u16, offset: u16) -> io::Result<()> {
    let (start, at) = (usize::from(start), usize::from(start) + usize::from(offset));
    if at + 2 > frame.len() || start > at {
        return Err(invalid("checksum offsets outside the frame"));
    }
    let initial = u16::from_be_bytes([frame[at], frame[at + 1]]);
    frame[at..at + 2].fill(0);
    let sum = tun_rs::checksum(&frame[start..], u64::from(initial));
    frame[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// RFC 1071's example: a checksum over the words, the partial sum
    /// seeded where the field is.
    #[test]
    fn partial_checksums_are_completed_and_bad_offsets_refused() {
        // A UDP-like segment: 4 bytes of data, then the checksum field at
        // offset 4 holding a pseudo-header sum of 0x0102.
        let mut frame = vec![0x00, 0x01, 0xf2, 0x03, 0x01, 0x02, 0xf4, 0xf5];
        complete_checksum(&mut frame, 0, 4).unwrap();
        // Verifying: the sum of everything including the pseudo-header
        // sum and the checksum folds to 0xffff.
        let mut check = frame.clone();
        let stored = u16::from_be_bytes([check[4], check[5]]);
        check[4..6].fill(0);
        let total = tun_rs::checksum(&check, u64::from(0x0102u16) + u64::from(stored));
        assert_eq!(total, 0xffff);
        assert!(complete_checksum(&mut frame, 0, 7).is_err());
        assert!(complete_checksum(&mut frame, 9, 0).is_err());
    }

    /// [Ethernet][virtio][IPv4 header from `src` to `dst`, 20 bytes].
    fn staged(mac: u8, src: u8, dst: u8) -> Vec<u8> {
        let mut buf = vec![mac; ETHERNET_HEADER];
        buf.extend_from_slice(&COALESCED_AWAY);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[15] = src;
        ip[19] = dst;
        buf.extend_from_slice(&ip);
        buf
    }

    #[test]
    fn frames_of_one_flow_with_different_macs_are_not_coalesced() {
        let batch = vec![staged(1, 1, 2), staged(1, 1, 2), staged(3, 1, 3)];
        assert!(ethernet_consistent(&batch));
        let batch = vec![staged(1, 1, 2), staged(3, 1, 3), staged(4, 1, 2)];
        assert!(!ethernet_consistent(&batch));
        let mut empty = staged(1, 1, 2);
        empty.truncate(FRAME_OFFSET);
        assert!(!ethernet_consistent(&[empty]));
    }

    #[test]
    fn tap_frames_get_the_virtio_header_first_and_offsets_behind_ethernet() {
        // Coalesced: tun-rs wrote a TCPv4 GSO header with IP-relative offsets.
        let mut buf = staged(7, 1, 2);
        let hdr = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: 1380,
            csum_start: 20,
            csum_offset: 16,
        };
        hdr.encode(&mut buf[ETHERNET_HEADER..FRAME_OFFSET]).unwrap();
        assert!(tap_frame(&mut buf, true).unwrap());
        let written = VirtioNetHdr::decode(&buf[..VIRTIO_NET_HDR_LEN]).unwrap();
        assert_eq!((written.csum_start, written.hdr_len), (34, 54));
        assert_eq!((written.gso_size, written.gso_type), (1380, GSO_TCPV4));
        assert_eq!(
            &buf[VIRTIO_NET_HDR_LEN..FRAME_OFFSET],
            &[7; ETHERNET_HEADER]
        );
        assert_eq!(buf[FRAME_OFFSET], 0x45);
        // Merged into another frame: not written.
        assert!(!tap_frame(&mut staged(7, 1, 2), true).unwrap());
        // Coalescing off: an all-zero header, whatever was staged.
        let mut plain = staged(7, 1, 2);
        assert!(tap_frame(&mut plain, false).unwrap());
        assert_eq!(&plain[..VIRTIO_NET_HDR_LEN], &[0; VIRTIO_NET_HDR_LEN]);
        assert_eq!(
            &plain[VIRTIO_NET_HDR_LEN..FRAME_OFFSET],
            &[7; ETHERNET_HEADER]
        );
    }
}
