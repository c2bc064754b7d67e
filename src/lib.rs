//! meshnet: an encrypted overlay network for containers.
//!
//! Layers, innermost first: `keys`, `config` and `membership` are plain
//! values; `core` decides everything about packets and peers without IO;
//! `agent` is the tokio shell that moves bytes between the TUN device, the
//! UDP socket and the core; `control` is the protocol `meshctl` speaks to
//! the agent. The binaries only parse arguments and call in.

pub mod agent;
pub mod cni;
pub mod config;
pub mod control;
pub mod core;
pub mod dns;
pub mod keys;
pub mod membership;
pub mod policy;
pub mod report;
pub mod sockstat;
pub mod store;
pub mod uapi;
