//! The virtio-net header that leads every read and write on an overlay
//! device opened with IFF_VNET_HDR (include/uapi/linux/virtio_net.h, the
//! legacy layout without `num_buffers`): the values both the splitting of
//! reads and the coalescing of writes speak. Multi-byte fields are in the
//! host's byte order. Must never: hold anything but the format's values.

/// Bytes in the header.
pub const HEADER_LEN: usize = 10;
/// `flags`: the transport checksum is to be finished from `csum_start`,
/// the field at `csum_start + csum_offset` holding the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a super-packet.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (USO), IPv4 and IPv6 alike.
pub const GSO_UDP_L4: u8 = 5;
/// Or-ed into a TCP `gso_type` when the segments carry ECN's CWR.
pub const GSO_ECN: u8 = 0x80;
