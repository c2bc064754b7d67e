//! The shared store of cluster membership (etcd): key layout, record
//! encoding, block claims, the watched view and its on-disk snapshot.
//!
//! Everything here except `etcd` is pure: it decides which block to claim,
//! what a listing or a watch event changes, which hosts become peers, how
//! long to back off, without a socket or a clock (time and randomness are
//! arguments). `etcd` is the thin tokio shell that talks to the server and
//! publishes the resulting `Membership`. Must never: remove a peer because
//! of a connection error (only an observed delete or a re-list diff does),
//! or let the data path wait on the store.

pub mod backoff;
pub mod claim;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod layout;
pub mod pace;
pub mod status;
pub mod view;

pub use claim::{ClaimError, Plan};
pub use layout::{BlockRecord, ClusterRecord, HostRecord, Key, Layout};
pub use status::{StoreReport, StoreStatus};
pub use view::{Snapshot, View};
