//! The overlay device: creating the TUN interface with its address and MTU.
//!
//! The device disappears with the file descriptor, so neither a clean exit
//! nor a crash leaves it behind. It is created down: `netops` turns off its
//! IPv6 addresses and brings it up over netlink. Must never: touch any
//! interface but the one it creates.

use std::net::Ipv4Addr;
use tun_rs::{AsyncDevice, DeviceBuilder, Layer};

/// Underlay overhead WireGuard needs in the worst case (IPv6 underlay):
/// 40 IPv6 + 8 UDP + 32 WireGuard.
pub const TUNNEL_OVERHEAD: u16 = 80;
/// Used when no underlay interface is found.
const FALLBACK_UNDERLAY_MTU: u16 = 1500;

#[derive(Debug, thiserror::Error)]
#[error("cannot create TUN device {name}: {source}{hint}")]
pub struct DeviceError {
    name: String,
    source: std::io::Error,
    hint: &'static str,
}

/// An up, non-loopback interface as read from the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mtu: u16,
    pub up: bool,
    pub loopback: bool,
}

/// The inner MTU: the smallest MTU of the up underlay interfaces, minus the
/// tunnel overhead, so tunnelled packets never need fragmenting.
pub fn inner_mtu(interfaces: &[Interface], own_device: &str) -> u16 {
    interfaces
        .iter()
        .filter(|i| i.up && !i.loopback && i.name != own_device)
        .map(|i| i.mtu)
        .min()
        .unwrap_or(FALLBACK_UNDERLAY_MTU)
        .saturating_sub(TUNNEL_OVERHEAD)
}

/// Reads interfaces from /sys/class/net (this network namespace's view).
pub fn system_interfaces() -> Vec<Interface> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let base = entry.path();
            let read = |f: &str| std::fs::read_to_string(base.join(f)).ok();
            // Loopback reports 65536, one more than fits an IP length field.
            let mtu: u32 = read("mtu")?.trim().parse().ok()?;
            let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
            let flags =
                u32::from_str_radix(read("flags")?.trim().trim_start_matches("0x"), 16).ok()?;
            Some(Interface {
                name,
                mtu,
                up: flags & libc_flags::IFF_UP != 0,
                loopback: flags & libc_flags::IFF_LOOPBACK != 0,
            })
        })
        .collect()
}

mod libc_flags {
    pub const IFF_UP: u32 = 0x1;
    pub const IFF_LOOPBACK: u32 = 0x8;
}

/// Creates the TUN device, addressed, down (netops brings it up once
/// IPv6 address generation is off). With `offload`, it asks for
/// segmentation offload (IFF_VNET_HDR + TUNSETOFFLOAD: TCP super-packets
/// in both directions); a kernel that refuses gets a plain device and one
/// warning. The device's `tcp_gso()` tells which one was made.
pub fn create_tun(
    name: &str,
    address: Ipv4Addr,
    prefix: u8,
    mtu: u16,
    offload: bool,
) -> Result<AsyncDevice, DeviceError> {
    let builder = || {
        DeviceBuilder::new()
            .name(name)
            .ipv4(address, prefix, None)
            .mtu(mtu)
            .enable(false)
    };
    build_offloaded(builder, name, offload)
}

/// Creates the TAP device, down, without an address (the host's address
/// lives on the bridge the device joins); offload as for `create_tun`.
pub fn create_tap(name: &str, mtu: u16, offload: bool) -> Result<AsyncDevice, DeviceError> {
    let builder = || {
        DeviceBuilder::new()
            .name(name)
            .layer(Layer::L2)
            .mtu(mtu)
            .enable(false)
    };
    build_offloaded(builder, name, offload)
}

fn build_offloaded(
    builder: impl Fn() -> DeviceBuilder,
    name: &str,
    offload: bool,
) -> Result<AsyncDevice, DeviceError> {
    if !offload {
        return build(builder(), name);
    }
    let refused = match build(builder().offload(true), name) {
        Ok(device) => return Ok(device),
        Err(refused) => refused,
    };
    // If a plain device fails too, the fault was not the offload: that
    // error is the one to report.
    let device = build(builder(), name)?;
    tracing::warn!(
        error = %refused.source,
        "the kernel refused device segmentation offload; running without it"
    );
    Ok(device)
}

fn build(builder: DeviceBuilder, name: &str) -> Result<AsyncDevice, DeviceError> {
    let device = builder.build_async().map_err(|source| {
        let hint = match source.raw_os_error() {
            Some(16) => " (a device of that name is in use: is another meshd running?)",
            Some(1) | Some(13) => " (creating devices needs root or CAP_NET_ADMIN)",
            Some(2) | Some(19) => " (is /dev/net/tun available? load the tun module)",
            _ => "",
        };
        DeviceError {
            name: name.to_owned(),
            source,
            hint,
        }
    })?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, mtu: u16, up: bool, loopback: bool) -> Interface {
        Interface {
            name: name.into(),
            mtu,
            up,
            loopback,
        }
    }

    #[test]
    fn inner_mtu_is_smallest_up_underlay_minus_80() {
        let ifs = [
            iface("lo", u16::MAX, true, true),
            iface("eth0", 1500, true, false),
            iface("eth1", 9000, true, false),
            iface("down0", 1280, false, false),
            iface("mesh0", 1000, true, false),
        ];
        assert_eq!(inner_mtu(&ifs, "mesh0"), 1420);
    }

    #[test]
    fn inner_mtu_falls_back_to_1500_underlay() {
        assert_eq!(inner_mtu(&[iface("lo", 65535, true, true)], "mesh0"), 1420);
    }

    #[test]
    fn this_namespace_has_a_loopback() {
        assert!(
            system_interfaces().iter().any(|i| i.loopback),
            "no loopback in /sys/class/net"
        );
    }
}
