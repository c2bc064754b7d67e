//! Batched reads and writes on the overlay device, with or without
//! segmentation offload.
//!
//! With offload (IFF_VNET_HDR), one read brings a TCP super-packet of up to
//! 64 KiB that tun-rs splits into MTU-sized packets, and a batch of packets
//! for the device goes out in as few writes as possible: consecutive
//! segments of one flow become one super-packet (the core's `coalesce`
//! decides which, and with what headers), written with `writev` straight
//! from where the packets were opened, so no payload is copied on the way.
//! Without offload, one packet per read and per write, as before. A TAP
//! device (frames) splits the same way behind the Ethernet header, which is
//! copied onto every segment, and coalesces behind it. Must never: look
//! into a packet beyond what the splitting needs (decisions are the
//! core's), reorder packets, or hold more than one batch of buffers.

use std::io::{self, IoSlice};
use std::sync::Arc;

use tun_rs::{AsyncDevice, IDEAL_BATCH_SIZE, VirtioNetHdr};

use crate::core::coalesce::{Coalescer, MAX_SEGMENTS};
use crate::core::ethernet::ETHERNET_HEADER;
use crate::core::virtio;

/// Largest packet or frame read without offload (and the largest
/// unsegmented packet with it).
const READ_BUFFER: usize = 65536;
/// A split segment never exceeds the device MTU; this covers any MTU an
/// Ethernet underlay allows with room to spare.
const SEGMENT_BUFFER: usize = 9216;

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
    /// With offload: which packets go out as one super-packet.
    coalescer: Option<Coalescer>,
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
                vec![0u8; virtio::HEADER_LEN + READ_BUFFER]
            } else {
                Vec::new()
            },
            packets,
            sizes: vec![0; count],
        }
    }

    /// The writing half. Make one: writes from two writers could interleave.
    pub fn writer(&self) -> DeviceWriter {
        let coalescer = self.offload.then(|| Coalescer {
            link_header: if self.frames { ETHERNET_HEADER } else { 0 },
            udp: self.device.udp_gso(),
        });
        DeviceWriter {
            device: Arc::clone(&self.device),
            coalescer,
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
        if len <= virtio::HEADER_LEN + ETHERNET_HEADER {
            return Err(invalid("frame shorter than its headers"));
        }
        let (header, frame) = raw.split_at_mut(virtio::HEADER_LEN);
        let mut hdr = VirtioNetHdr::decode(header)?;
        if hdr.gso_type == virtio::GSO_NONE {
            if hdr.flags & virtio::F_NEEDS_CSUM != 0 {
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
        let is_v6 = match hdr.gso_type & !virtio::GSO_ECN {
            virtio::GSO_TCPV4 => false,
            virtio::GSO_TCPV6 => true,
            virtio::GSO_UDP_L4 => ip.first().is_some_and(|b| b >> 4 == 6),
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
    /// Writes `packets` in order; returns how many of them were not
    /// written (each a counted drop for the caller).
    pub fn write_all<'a>(&mut self, packets: impl Iterator<Item = &'a [u8]>) -> u64 {
        let device: &tun_rs::DeviceImpl = &self.device;
        let Some(coalescer) = self.coalescer else {
            let mut failed = 0;
            for packet in packets {
                if let Err(e) = rustix::io::write(device, packet) {
                    tracing::debug!(error = %e, "device write failed");
                    failed += 1;
                }
            }
            return failed;
        };
        let batch: Vec<&[u8]> = packets.collect();
        let mut failed = 0;
        let mut at = 0;
        while at < batch.len() {
            let plan = coalescer.plan(&batch[at..]);
            let run = &batch[at..at + plan.count];
            at += plan.count;
            let mut parts = [IoSlice::new(&[]); MAX_SEGMENTS + 1];
            parts[0] = IoSlice::new(plan.prefix());
            for (part, packet) in parts[1..].iter_mut().zip(run) {
                *part = IoSlice::new(packet.get(plan.skip..).unwrap_or_default());
            }
            // A plain system call: tun-rs's async write would wait on the
            // agent thread's runtime, and a TUN/TAP write never waits.
            if let Err(e) = rustix::io::writev(device, &parts[..=run.len()]) {
                tracing::debug!(error = %e, packets = run.len(), "device write failed");
                failed += run.len() as u64;
            }
        }
        failed
    }
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
}
