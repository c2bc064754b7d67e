//! Batched reads and writes on the overlay device, with or without
//! segmentation offload.
//!
//! With offload (IFF_VNET_HDR), one read brings a TCP super-packet of up to
//! 64 KiB that tun-rs splits into MTU-sized packets, and a batch of packets
//! for the device is coalesced (GRO) into as few writes as possible: one
//! system call per super-packet instead of one per 1420 bytes. Without it,
//! one packet per read and per write, as before. Must never: look into a
//! packet beyond what the splitting and coalescing need (decisions are the
//! core's), reorder packets, or hold more than one batch of buffers.

use std::io;

use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Largest packet or frame read without offload (and the largest
/// unsegmented packet with it).
const READ_BUFFER: usize = 65536;
/// A split segment never exceeds the device MTU; this covers any MTU an
/// Ethernet underlay allows with room to spare.
const SEGMENT_BUFFER: usize = 9216;

pub struct DeviceIo {
    device: AsyncDevice,
    offload: bool,
    /// Offload: the raw read, virtio header and super-packet.
    raw: Vec<u8>,
    /// The packets of the last read (split segments with offload).
    packets: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Offload: packets to write, each behind room for the virtio header;
    /// coalescing appends to the first of a flow.
    pending: Vec<Vec<u8>>,
    gro: GROTable,
}

impl DeviceIo {
    pub fn new(device: AsyncDevice) -> Self {
        let offload = device.tcp_gso();
        let (count, first) = if offload {
            (IDEAL_BATCH_SIZE, READ_BUFFER)
        } else {
            (1, READ_BUFFER)
        };
        let mut packets = vec![vec![0u8; SEGMENT_BUFFER]; count];
        packets[0] = vec![0u8; first];
        Self {
            device,
            offload,
            raw: if offload {
                vec![0u8; VIRTIO_NET_HDR_LEN + READ_BUFFER]
            } else {
                Vec::new()
            },
            packets,
            sizes: vec![0; count],
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
        self.device
            .try_recv_multiple(&mut self.raw, &mut self.packets, &mut self.sizes, 0)
    }

    /// Packet `i` of the last read.
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.packets[i][..self.sizes[i]]
    }

    /// Writes `packets` in order; returns how many writes failed (each a
    /// counted drop for the caller).
    pub async fn send_all<'a>(&mut self, packets: impl Iterator<Item = &'a [u8]>) -> u64 {
        if !self.offload {
            let mut failed = 0;
            for packet in packets {
                if let Err(e) = self.device.send(packet).await {
                    tracing::debug!(error = %e, "device write failed");
                    failed += 1;
                }
            }
            return failed;
        }
        let mut failed = 0;
        let mut packets = packets.peekable();
        while packets.peek().is_some() {
            let n = self.stage(&mut packets);
            let sent = self
                .device
                .send_multiple(&mut self.gro, &mut self.pending[..n], VIRTIO_NET_HDR_LEN)
                .await;
            if let Err(e) = sent {
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
                self.pending.push(Vec::with_capacity(2048));
            }
            // A buffer a coalesced flow grew keeps its room (at most 64
            // KiB each, IDEAL_BATCH_SIZE of them): growing it anew every
            // batch would copy each super-packet several times.
            let buf = &mut self.pending[n];
            buf.clear();
            buf.resize(VIRTIO_NET_HDR_LEN, 0);
            buf.extend_from_slice(packet);
            n += 1;
        }
        n
    }
}
