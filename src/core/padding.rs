//! Padding a packet before it is sealed, as WireGuard asks.
//!
//! The protocol pads every plaintext with zeros to a multiple of 16 bytes,
//! never past the tunnel's MTU, so that a sealed message shows less of the
//! length of what it carries (the paper, section 5.4.6; Linux, wireguard-go
//! and GotaTun all do it). boringtun seals what it is given and leaves this
//! to its user. The receiver needs nothing: the IP header says where the
//! packet ends, and every implementation cuts there after opening.
//!
//! Must never: pad past the MTU (the datagram would no longer fit the
//! underlay), change a byte of the packet itself, or copy a packet that
//! needs no padding (a full-size segment, the bulk of any transfer, is
//! sealed from where it was read).

/// What the length of every sealed plaintext is rounded up to.
pub const MULTIPLE: usize = 16;

/// How many zero bytes go after a packet of `len` bytes in a tunnel whose
/// packets may be `mtu` bytes long.
pub fn padding(len: usize, mtu: usize) -> usize {
    if len >= mtu {
        return 0;
    }
    len.next_multiple_of(MULTIPLE).min(mtu) - len
}

/// Pads packets in a buffer it keeps, so padding allocates nothing.
#[derive(Debug)]
pub struct Padder {
    mtu: usize,
    buf: Vec<u8>,
}

impl Padder {
    pub fn new(mtu: u16) -> Self {
        Self {
            mtu: usize::from(mtu),
            buf: Vec::new(),
        }
    }

    /// `packet` as it is to be sealed: itself if it needs no padding,
    /// otherwise a copy followed by its padding.
    pub fn pad<'a>(&'a mut self, packet: &'a [u8]) -> &'a [u8] {
        let extra = padding(packet.len(), self.mtu);
        if extra == 0 {
            return packet;
        }
        self.buf.clear();
        self.buf.extend_from_slice(packet);
        self.buf.resize(packet.len() + extra, 0);
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_up_to_sixteen_but_never_past_the_mtu() {
        assert_eq!(padding(0, 1420), 0, "a keepalive stays empty");
        assert_eq!(padding(1, 1420), 15);
        assert_eq!(padding(16, 1420), 0);
        assert_eq!(padding(17, 1420), 15);
        assert_eq!(padding(84, 1420), 12);
        // 1417 rounds to 1424, over the MTU: only up to the MTU.
        assert_eq!(padding(1417, 1420), 3);
        assert_eq!(padding(1420, 1420), 0);
        assert_eq!(padding(1500, 1420), 0, "never more than the MTU");
        for mtu in [576, 1280, 1420, 9000] {
            for len in 0..=mtu + 20 {
                let padded = len + padding(len, mtu);
                assert!(padded >= len);
                assert!(padded <= mtu.max(len), "{len} in {mtu} padded to {padded}");
                assert!(
                    padded.is_multiple_of(MULTIPLE) || padded == mtu || len >= mtu,
                    "{len} in {mtu} padded to {padded}"
                );
                assert!(padded - len < MULTIPLE);
            }
        }
    }

    #[test]
    fn a_padded_packet_is_the_packet_followed_by_zeros() {
        let mut padder = Padder::new(1420);
        let packet: Vec<u8> = (1..=45).collect();
        let padded = padder.pad(&packet).to_vec();
        assert_eq!(padded.len(), 48);
        assert_eq!(&padded[..45], &packet[..]);
        assert_eq!(&padded[45..], &[0, 0, 0]);
        // A reused buffer must not leak the longer packet before it.
        let long = vec![0xab; 200];
        assert_eq!(padder.pad(&long).len(), 208);
        let short = [0xcd; 5];
        assert_eq!(
            padder.pad(&short),
            &[
                0xcd, 0xcd, 0xcd, 0xcd, 0xcd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn a_packet_that_needs_no_padding_is_not_copied() {
        let mut padder = Padder::new(1420);
        let full = vec![7u8; 1420];
        assert!(std::ptr::eq(padder.pad(&full), &full[..]));
        let aligned = vec![7u8; 64];
        assert!(std::ptr::eq(padder.pad(&aligned), &aligned[..]));
    }
}
