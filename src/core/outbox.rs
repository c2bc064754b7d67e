//! The batch of packets the core hands back to the shell.
//!
//! One arena of bytes, reused for every batch: the core writes each packet
//! into spare room at the end, then commits it as bound for the network (a
//! UDP datagram to an address) or for the device. The shell sends all of a
//! batch, then `clear`s it; nothing is allocated per packet once the arena
//! has grown to its working size. This is the seam where UDP GSO and TUN
//! offloads can later turn a batch into fewer syscalls.
//! Must never: do IO, or hand out a packet that was not committed.

use std::net::SocketAddr;
use std::ops::Range;

use crate::keys::PublicKey;

/// The largest packet the core ever places here: a 64 KiB IP packet plus
/// WireGuard's 32 bytes.
pub const MAX_PACKET: usize = 65535 + 32;

#[derive(Debug)]
pub struct Outbox {
    arena: Vec<u8>,
    used: usize,
    network: Vec<(SocketAddr, Range<usize>)>,
    device: Vec<Range<usize>>,
    /// Records-sync messages decrypted from a peer, by the peer's key.
    sync: Vec<(PublicKey, Range<usize>)>,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::with_capacity(64 * 2048)
    }
}

impl Outbox {
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            arena: vec![0; bytes],
            used: 0,
            network: Vec::with_capacity(64),
            device: Vec::with_capacity(64),
            sync: Vec::new(),
        }
    }

    /// Room for the next packet, at least `len` bytes long. Nothing is kept
    /// until it is committed.
    pub fn spare(&mut self, len: usize) -> &mut [u8] {
        let end = self.used + len;
        if self.arena.len() < end {
            self.arena.resize(end.max(self.arena.len() * 2), 0);
        }
        &mut self.arena[self.used..end]
    }

    /// Keeps the packet at `placed` in the last spare room as a datagram
    /// for `to`.
    pub fn commit_network(&mut self, to: SocketAddr, placed: Placed) {
        let range = self.take(placed);
        self.network.push((to, range));
    }

    /// Keeps the packet at `placed` in the last spare room as a packet for
    /// the device.
    pub fn commit_device(&mut self, placed: Placed) {
        let range = self.take(placed);
        self.device.push(range);
    }

    /// Keeps the packet at `placed` as a frame for the device, with
    /// `header` written into the headroom just before it (the packet must
    /// have been placed at least `header.len()` bytes into its room).
    pub fn commit_device_framed(&mut self, placed: Placed, header: &[u8]) {
        assert!(
            placed.offset >= header.len(),
            "no headroom for the frame header"
        );
        let framed = Placed {
            offset: placed.offset - header.len(),
            len: placed.len + header.len(),
        };
        let start = self.used + framed.offset;
        self.arena[start..start + header.len()].copy_from_slice(header);
        self.commit_device(framed);
    }

    /// Keeps the bytes at `placed` as a records-sync message that `from`'s
    /// session decrypted.
    pub fn commit_sync(&mut self, from: PublicKey, placed: Placed) {
        let range = self.take(placed);
        self.sync.push((from, range));
    }

    /// The bytes of a placed, not yet committed packet.
    pub fn placed_bytes(&self, placed: Placed) -> &[u8] {
        let start = self.used + placed.offset;
        &self.arena[start..start + placed.len]
    }

    pub fn network(&self) -> impl ExactSizeIterator<Item = (SocketAddr, &[u8])> {
        self.network
            .iter()
            .map(|(to, r)| (*to, &self.arena[r.clone()]))
    }

    pub fn device(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        self.device.iter().map(|r| &self.arena[r.clone()])
    }

    pub fn sync(&self) -> impl ExactSizeIterator<Item = (PublicKey, &[u8])> {
        self.sync
            .iter()
            .map(|(from, r)| (*from, &self.arena[r.clone()]))
    }

    pub fn is_empty(&self) -> bool {
        self.network.is_empty() && self.device.is_empty() && self.sync.is_empty()
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.network.clear();
        self.device.clear();
        self.sync.clear();
    }

    fn take(&mut self, placed: Placed) -> Range<usize> {
        let start = self.used + placed.offset;
        let end = start + placed.len;
        assert!(
            end <= self.arena.len(),
            "placed packet lies outside the spare room"
        );
        self.used = end;
        start..end
    }
}

/// Where a packet lies within the spare room it was written into, as plain
/// offsets, so the borrow of the room can end before the packet is
/// committed. The protocol library returns sub-slices of the room it was
/// given, which is why packets are found by address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    offset: usize,
    len: usize,
}

impl Placed {
    /// `room_start` is `room.as_ptr()` of the spare room `packet` lies in.
    pub fn within(room_start: *const u8, packet: &[u8]) -> Self {
        let offset = (packet.as_ptr() as usize).wrapping_sub(room_start as usize);
        Self {
            offset,
            len: packet.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `range` of this packet (say, a UDP payload within its IP
    /// packet); `range` is clamped to the packet.
    pub fn slice(self, range: Range<usize>) -> Self {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        Self {
            offset: self.offset + start,
            len: end - start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_destinations_and_reuse_the_arena() {
        let mut out = Outbox::with_capacity(16);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        for i in 0..10u8 {
            let room = out.spare(100);
            let start = room.as_ptr();
            // Like boringtun: the packet is a sub-slice of the room.
            room[5..8].copy_from_slice(&[i, i, i]);
            let placed = Placed::within(start, &room[5..8]);
            if i % 2 == 0 {
                out.commit_network(a, placed);
            } else {
                out.commit_device(placed);
            }
        }
        let net: Vec<_> = out.network().map(|(to, p)| (to, p.to_vec())).collect();
        let dev: Vec<_> = out.device().map(<[u8]>::to_vec).collect();
        assert_eq!(net.len(), 5);
        assert_eq!(dev.len(), 5);
        assert!(net.iter().all(|(to, _)| *to == a));
        assert_eq!(net[2].1, vec![4, 4, 4]);
        assert_eq!(dev[4], vec![9, 9, 9]);
        let grown = out.arena.len();
        out.clear();
        assert!(out.is_empty());
        let _ = out.spare(100);
        assert_eq!(out.arena.len(), grown, "a cleared outbox reuses its arena");
    }

    #[test]
    fn framed_commits_prepend_the_header_in_the_headroom() {
        let mut out = Outbox::with_capacity(64);
        let room = out.spare(30);
        let start = room.as_ptr();
        room[14..17].copy_from_slice(b"abc");
        let placed = Placed::within(start, &room[14..17]);
        assert_eq!(out.placed_bytes(placed), b"abc");
        out.commit_device_framed(placed, &[9; 14]);
        let frames: Vec<_> = out.device().collect();
        assert_eq!(
            frames,
            vec![&[9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, b'a', b'b', b'c'][..]]
        );
    }

    #[test]
    fn uncommitted_room_is_reused() {
        let mut out = Outbox::with_capacity(64);
        let first = out.spare(10).as_ptr();
        let second = out.spare(10).as_ptr();
        assert_eq!(first, second);
    }
}
