//! Cluster DNS, pure parts: the records hosts share and the rules of
//! sharing them, the zone built from them, answering queries, and the
//! forwarder's matching, cache and rate limits.
//!
//! Must never: do IO. The agent's `dns_server` and `records_sync` tasks
//! move the bytes.

pub mod answer;
pub mod cache;
pub mod forward;
pub mod rate;
pub mod records;
pub mod sync;

pub use records::{ContainerRecord, HostRecords, RecordView, ServicePort, Zone};
