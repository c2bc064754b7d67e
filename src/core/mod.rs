//! The sans-IO core: every decision about packets and peers.
//!
//! Inputs are bytes plus the current time; outputs are bytes placed in an
//! [`Outbox`] for the shell to send. Must never: import tokio, open a
//! socket or device, read the clock itself, or panic on network input.
//! (boringtun's `Tunn` keeps its own protocol timers; everything meshnet
//! decides is driven by the `now` passed in.)

pub mod arp;
pub mod checksum;
pub mod coalesce;
pub mod drops;
pub mod ethernet;
pub mod handshake_gate;
pub mod ipam;
pub mod isolation;
pub mod liveness;
pub mod node;
pub mod outbox;
pub mod packet;
pub mod padding;
pub mod peer;
pub mod route;
pub mod service;
pub mod split;
pub mod virtio;

pub use drops::{DropCounters, DropReason};
pub use liveness::PeerState;
pub use node::{Identity, LinkMode, Node};
pub use outbox::Outbox;
pub use peer::PeerStatus;
