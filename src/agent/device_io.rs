//! Batched reads and writes on the overlay device, with or without
//! segmentation offload.
//!
//! With offload (IFF_VNET_HDR), one read brings a TCP super-packet of up to
//! 64 KiB that the core's `split` cuts into MTU-sized packets where it
//! landed, one at a time, each sealed before the next, and a batch of packets
//! for the device goes out in as few writes as possible: consecutive
//! segments of one flow become one super-packet (the core's `coalesce`
//! decides which, and with what headers), written with `writev` straight
//! from where the packets were opened, so no payload is copied on the way.
//! Without offload, one packet per read and per write, as before. A TAP
//! device (frames) splits the same way behind the Ethernet header, which
//! every segment carries, and coalesces behind it. Must never: look
//! into a packet beyond what the splitting needs (decisions are the
//! core's), reorder packets, or hold more than one batch of buffers.

use std::io::{self, IoSlice};
use std::sync::Arc;

use tun_rs::AsyncDevice;

use crate::core::coalesce::{Coalescer, MAX_SEGMENTS};
use crate::core::ethernet::ETHERNET_HEADER;
use crate::core::split::Segments;
use crate::core::virtio;

/// Largest packet or frame read (with offload, behind its virtio header).
const READ_BUFFER: usize = 65536;

/// The reading half of the device, driven by the agent task.
pub struct DeviceIo {
    device: Arc<AsyncDevice>,
    offload: bool,
    /// TAP: reads and writes are Ethernet frames.
    frames: bool,
    /// The last read (with offload: virtio header, then the packet or
    /// super-packet), cut into packets where it landed.
    read: Vec<u8>,
    segments: Segments,
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
        let header = if offload { virtio::HEADER_LEN } else { 0 };
        Self {
            device: Arc::new(device),
            offload,
            frames,
            read: vec![0u8; header + READ_BUFFER],
            segments: Segments::default(),
        }
    }

    /// The writing half. Make one: writes from two writers could interleave.
    pub fn writer(&self) -> DeviceWriter {
        let coalescer = self.offload.then(|| Coalescer {
            link_header: self.link_header(),
            udp: self.udp_offload(),
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

    /// Whether the device also takes and gives UDP super-packets (USO,
    /// Linux 6.2 and later).
    pub fn udp_offload(&self) -> bool {
        self.offload && self.device.udp_gso()
    }

    fn link_header(&self) -> usize {
        if self.frames { ETHERNET_HEADER } else { 0 }
    }

    /// Waits for the next read; returns how many packets it brought (see
    /// `next_packet`).
    pub async fn recv(&mut self) -> io::Result<usize> {
        self.segments = Segments::default();
        let n = self.device.recv(&mut self.read).await?;
        self.cut(n)
    }

    /// Like `recv`, but returns `WouldBlock` instead of waiting.
    pub fn try_recv(&mut self) -> io::Result<usize> {
        self.segments = Segments::default();
        let n = self.device.try_recv(&mut self.read)?;
        self.cut(n)
    }

    /// Prepares the read of `len` bytes to be handed out packet by packet;
    /// a read that cannot be split is an `InvalidData` error.
    fn cut(&mut self, len: usize) -> io::Result<usize> {
        let link_header = self.link_header();
        let read = self
            .read
            .get_mut(..len)
            .ok_or_else(|| invalid("read past the buffer"))?;
        self.segments = if self.offload {
            Segments::parse(read, link_header)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        } else {
            Segments::whole(len)
        };
        Ok(self.segments.count())
    }

    /// The next packet of the last read, cut in place (segments of a
    /// super-packet one at a time: each is valid until the next call).
    pub fn next_packet(&mut self) -> Option<&[u8]> {
        self.segments.next(&mut self.read)
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
        // No write holds more than MAX_SEGMENTS packets, so the plan never
        // needs to see more of the batch than that: a window on the stack,
        // not a collected batch per flush.
        let mut packets = packets.fuse();
        let mut window: [&[u8]; MAX_SEGMENTS] = [&[]; MAX_SEGMENTS];
        let mut filled = 0;
        let mut failed = 0;
        loop {
            for (slot, packet) in window[filled..].iter_mut().zip(&mut packets) {
                *slot = packet;
                filled += 1;
            }
            if filled == 0 {
                return failed;
            }
            let plan = coalescer.plan(&window[..filled]);
            let run = &window[..plan.count];
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
            window.copy_within(plan.count..filled, 0);
            filled -= plan.count;
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}
