//! The batch of packets the core hands back to the shell.
//!
//! One arena of bytes, reused for every batch: the core writes each packet
//! into spare room at the end, then commits it as bound for the network (a
//! UDP datagram to an address) or for the device. The shell sends all of a
//! batch, then `clear`s it; nothing is allocated per packet once the arena
//! has grown to its working size. This is the seam where UDP GSO turns a
//! batch into fewer syscalls: boringtun writes each datagram at the start
//! of its room, so consecutive datagrams lie back to back in the arena and
//! `network_runs` hands a run of them (one destination, one size, the last
//! possibly shorter) to a single UDP_SEGMENT send without copying.
//! Must never: do IO, hand out a packet that was not committed, or join
//! datagrams that are not adjacent, not for one destination, or not in
//! their committed order.

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

    /// The datagrams grouped into runs for segmentation offload, in order;
    /// see [`Run`]. With `limits.max_segments == 1` every datagram is a run
    /// of its own.
    pub fn network_runs(&self, limits: RunLimits) -> impl Iterator<Item = Run<'_>> {
        group_runs(&self.network, limits).map(|(to, range, segment)| Run {
            to,
            contents: &self.arena[range],
            segment,
        })
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

/// Datagrams for one destination sent with one system call: `contents` is
/// `segment`-sized datagrams back to back, the last possibly shorter (the
/// UDP_SEGMENT contract). A run of one datagram has `segment ==
/// contents.len()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run<'a> {
    pub to: SocketAddr,
    pub contents: &'a [u8],
    pub segment: usize,
}

impl Run<'_> {
    pub fn datagrams(&self) -> usize {
        self.contents.len().div_ceil(self.segment.max(1))
    }
}

/// What the kernel accepts in one segmented send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Datagrams per send (UDP_MAX_SEGMENTS; 1 without GSO).
    pub max_segments: usize,
    /// Bytes per send: a UDP payload's limit over IPv4.
    pub max_bytes: usize,
}

impl RunLimits {
    /// One datagram per send: no offload.
    pub const SINGLE: Self = Self {
        max_segments: 1,
        max_bytes: usize::MAX,
    };

    pub fn gso(max_segments: usize) -> Self {
        Self {
            max_segments: max_segments.max(1),
            // 65535 minus the IPv4 and UDP headers.
            max_bytes: 65507,
        }
    }
}

/// Groups committed datagrams into runs: a run continues while the next
/// datagram goes to the same place, starts where the last one ended, and
/// has the run's size; a shorter one ends the run (only the last segment
/// may be short), and so do the limits.
fn group_runs(
    entries: &[(SocketAddr, Range<usize>)],
    limits: RunLimits,
) -> impl Iterator<Item = (SocketAddr, Range<usize>, usize)> + '_ {
    let mut rest = entries;
    std::iter::from_fn(move || {
        let ((to, first), tail) = rest.split_first()?;
        let segment = first.len();
        let mut range = first.clone();
        let mut taken = 1;
        for (next_to, next) in tail {
            let fits = taken < limits.max_segments
                && range.len() + next.len() <= limits.max_bytes
                && next_to == to
                && next.start == range.end
                && next.len() <= segment
                && !next.is_empty();
            if !fits {
                break;
            }
            range.end = next.end;
            taken += 1;
            if next.len() < segment {
                break;
            }
        }
        rest = &rest[taken..];
        Some((*to, range, segment))
    })
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

    fn entries(spec: &[(u16, usize, usize)]) -> Vec<(SocketAddr, Range<usize>)> {
        spec.iter()
            .map(|&(port, start, len)| {
                let to = SocketAddr::from(([192, 0, 2, 1], port));
                (to, start..start + len)
            })
            .collect()
    }

    fn runs(spec: &[(u16, usize, usize)], limits: RunLimits) -> Vec<(u16, Range<usize>, usize)> {
        group_runs(&entries(spec), limits)
            .map(|(to, r, s)| (to.port(), r, s))
            .collect()
    }

    #[test]
    fn runs_join_adjacent_equal_datagrams_for_one_destination() {
        let gso = RunLimits::gso(64);
        // Three full segments and a short tail: one run.
        let spec = [(1, 0, 100), (1, 100, 100), (1, 200, 100), (1, 300, 40)];
        assert_eq!(runs(&spec, gso), vec![(1, 0..340, 100)]);
        // A short datagram ends the run, even if a full one follows.
        let spec = [(1, 0, 100), (1, 100, 40), (1, 140, 100)];
        assert_eq!(runs(&spec, gso), vec![(1, 0..140, 100), (1, 140..240, 100)]);
        // A longer one cannot join (segments are never larger than the first).
        let spec = [(1, 0, 100), (1, 100, 120)];
        assert_eq!(runs(&spec, gso), vec![(1, 0..100, 100), (1, 100..220, 120)]);
    }

    #[test]
    fn runs_split_on_destination_gap_and_limits() {
        let gso = RunLimits::gso(2);
        // Another destination, a gap in the arena, then the segment limit.
        let spec = [
            (1, 0, 100),
            (2, 100, 100),
            (2, 250, 100),
            (2, 350, 100),
            (2, 450, 100),
        ];
        assert_eq!(
            runs(&spec, gso),
            vec![
                (1, 0..100, 100),
                (2, 100..200, 100),
                (2, 250..450, 100),
                (2, 450..550, 100)
            ]
        );
        let bytes = RunLimits {
            max_segments: 64,
            max_bytes: 250,
        };
        let spec = [(1, 0, 100), (1, 100, 100), (1, 200, 100)];
        assert_eq!(
            runs(&spec, bytes),
            vec![(1, 0..200, 100), (1, 200..300, 100)]
        );
        // Without offload every datagram is its own run, in order.
        let spec = [(1, 0, 100), (1, 100, 100)];
        assert_eq!(
            runs(&spec, RunLimits::SINGLE),
            vec![(1, 0..100, 100), (1, 100..200, 100)]
        );
        assert!(runs(&[], gso).is_empty());
    }

    #[test]
    fn encrypted_datagrams_lie_back_to_back_and_form_one_run() {
        let mut out = Outbox::with_capacity(64);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        for len in [64, 64, 64, 30] {
            // Like boringtun's encapsulate: the datagram starts the room.
            let room = out.spare(148);
            let start = room.as_ptr();
            room[..len].fill(len as u8);
            let placed = Placed::within(start, &room[..len]);
            out.commit_network(a, placed);
        }
        let runs: Vec<_> = out.network_runs(RunLimits::gso(64)).collect();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].segment, runs[0].datagrams()), (64, 4));
        assert_eq!(runs[0].contents.len(), 64 * 3 + 30);
        assert_eq!(runs[0].contents[64 * 3], 30);
        let single: Vec<_> = out.network_runs(RunLimits::SINGLE).collect();
        assert_eq!(single.len(), 4);
        assert!(single.iter().all(|r| r.datagrams() == 1));
    }

    #[test]
    fn uncommitted_room_is_reused() {
        let mut out = Outbox::with_capacity(64);
        let first = out.spare(10).as_ptr();
        let second = out.spare(10).as_ptr();
        assert_eq!(first, second);
    }
}
