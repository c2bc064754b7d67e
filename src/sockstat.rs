//! How many datagrams the kernel dropped for one UDP socket, read from the
//! text of `/proc/net/udp` and `/proc/net/udp6`.
//!
//! The kernel counts, per socket, what it could not queue because the
//! receive buffer was full (`sk_drops`): traffic that reached the host but
//! never reached the agent. It counts buffers, not datagrams: a peer's UDP
//! GSO batch arrives as one (UDP GRO) and is dropped as one, up to 64
//! datagrams in a single count. Nothing else reports it per socket without
//! a control message on every receive. Pure: the shell reads the files,
//! this finds the socket's row by inode. Must never open a file.

/// Field positions in a row of `/proc/net/udp{,6}`. The header's names
/// do not line up with the rows (`tx_queue rx_queue` is one field there),
/// so the positions are fixed, as the kernel has printed them since 2.6.
const INODE_FIELD: usize = 9;
const DROPS_FIELD: usize = 12;

/// The drop count of the socket with inode `inode` in `table`, the text of
/// one of the files; `None` when no row has that inode.
pub fn udp_socket_drops(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|row| {
        let fields: Vec<&str> = row.split_ascii_whitespace().collect();
        let row_inode: u64 = fields.get(INODE_FIELD)?.parse().ok()?;
        (row_inode == inode).then(|| fields.get(DROPS_FIELD)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // As Linux 6.18 prints it: an agent's socket on 51820 (0xCAAC) with
    // 168 drops, and another socket.
    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  148: 00000000:CAAC 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 48213 2 0000000000000000 168
  331: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 48297 2 0000000000000000 0
";

    #[test]
    fn finds_the_socket_by_inode() {
        assert_eq!(udp_socket_drops(TABLE, 48213), Some(168));
        assert_eq!(udp_socket_drops(TABLE, 48297), Some(0));
    }

    #[test]
    fn an_absent_socket_or_a_short_row_is_none() {
        assert_eq!(udp_socket_drops(TABLE, 1), None);
        // The header never matches, even when a number sits at the place.
        assert_eq!(udp_socket_drops("a b c d e f g h i 7 k l 3\n", 7), None);
        let short = "header\n 1: 0:0 0:0 07 0:0 0:0 0 0 0 48213 2\n";
        assert_eq!(udp_socket_drops(short, 48213), None);
        assert_eq!(udp_socket_drops("", 48213), None);
    }
}
