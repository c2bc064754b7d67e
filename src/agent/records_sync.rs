//! The records-sync task: moves messages between the packet task and the
//! pure `dns::sync::RecordsSync`, and rebuilds the zone off the packet task.
//!
//! Messages arrive only from the packet task, which hands over what it
//! decrypted from a peer's session and addressed to this host's sync port
//! from that peer's host address (`Node::handle_datagram`); what the sync
//! sends goes back to the packet task to be sealed for one peer
//! (`Node::send_sync`). No socket is bound: no local process or container
//! can speak to this task. With a membership store, this host's records
//! also go to the store (which writes them to etcd) and other hosts'
//! records come from it into the same pure sync. Zone rebuilds run on the blocking pool, at most
//! one at a time and at most every `REBUILD_INTERVAL`, however fast peers
//! change their records. Must never: decide anything about records (the
//! pure module does), or block the packet task.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::dns::sync::{RecordsSync, StoreRecords, Transmit};
use crate::dns::{HostRecords, Zone};
use crate::keys::PublicKey;
use crate::membership::Membership;

/// Messages queued from the packet task, at most; past it they are
/// dropped and counted (`sync_backlog`), the sender catches up later.
pub const INBOUND_QUEUE: usize = 1024;
/// Messages queued for sealing, at most (back-pressure on this task only).
pub const OUTBOUND_QUEUE: usize = 1024;
/// Zone rebuilds at most this often: a peer changing its records a
/// thousand times a second costs ten rebuilds.
const REBUILD_INTERVAL: Duration = Duration::from_millis(100);
/// Messages handled per wake-up before the task looks at its other inputs.
const BATCH: usize = 256;

/// A message the packet task decrypted from a peer's session.
pub type Inbound = (PublicKey, Vec<u8>);

/// The store's ends: other hosts' records in, this host's records out.
pub type StoreEnds = (
    watch::Receiver<StoreRecords>,
    watch::Sender<Option<Arc<HostRecords>>>,
);

pub struct SyncTask {
    pub sync: RecordsSync,
    pub domain: String,
    pub overlay: Ipv4Net,
    pub membership: watch::Receiver<Membership>,
    /// This host's records, with the version of the change.
    pub local: watch::Receiver<(u64, HostRecords)>,
    pub inbound: mpsc::Receiver<Inbound>,
    pub outbound: mpsc::Sender<Transmit>,
    pub zone: watch::Sender<Arc<Zone>>,
    /// The newest local version the published zone includes.
    pub zone_includes: watch::Sender<u64>,
    /// Messages the sync refused (`sync_refused` in `meshctl status`).
    pub refused: Arc<AtomicU64>,
    /// `dns.withdraw_after`, as a reload changes it.
    pub withdraw_after: watch::Receiver<Duration>,
    /// The membership store's records, when there is one.
    pub store: Option<StoreEnds>,
}

impl SyncTask {
    pub async fn run(mut self) {
        self.sync.set_members(
            &self.membership.borrow_and_update(),
            std::time::Instant::now(),
        );
        let mut rebuild: Option<(u64, JoinHandle<Zone>)> = None;
        let mut local_version = 0;
        let mut dirty = self.sync.take_changed();
        let mut next_rebuild = Instant::now();
        let mut conflicts = 0;
        let (mut store_records, publish) = match self.store.take() {
            Some((records, publish)) => (Some(records), Some(publish)),
            None => (None, None),
        };
        if let Some(rx) = &mut store_records {
            self.sync.set_store_records(rx.borrow_and_update().clone());
            dirty |= self.sync.take_changed();
        }
        publish_local(publish.as_ref(), &self.local.borrow().1);
        loop {
            let due = self.sync.poll_timeout().into();
            let rebuild_due = (dirty && rebuild.is_none()).then_some(next_rebuild);
            tokio::select! {
                received = self.inbound.recv() => {
                    let Some(first) = received else { return };
                    self.receive(first);
                    for _ in 1..BATCH {
                        let Ok(more) = self.inbound.try_recv() else { break };
                        self.receive(more);
                    }
                }
                changed = self.local.changed() => {
                    if changed.is_err() { return; }
                    let (version, records) = self.local.borrow_and_update().clone();
                    local_version = version;
                    publish_local(publish.as_ref(), &records);
                    self.sync.set_local(records);
                    // Always rebuild: the control reply waits for it.
                    dirty = true;
                }
                changed = self.membership.changed() => {
                    if changed.is_err() { return; }
                    let membership = self.membership.borrow_and_update().clone();
                    self.sync.set_members(&membership, std::time::Instant::now());
                }
                () = store_changed(&mut store_records) => {
                    if let Some(rx) = &mut store_records {
                        self.sync.set_store_records(rx.borrow_and_update().clone());
                    }
                }
                Ok(()) = self.withdraw_after.changed() => {
                    let after = *self.withdraw_after.borrow_and_update();
                    self.sync.set_withdraw_after(after);
                }
                () = tokio::time::sleep_until(due) => {
                    self.sync.handle_timeout(std::time::Instant::now());
                }
                () = sleep_until_some(rebuild_due) => {
                    let hosts = self.sync.hosts();
                    let (domain, overlay) = (self.domain.clone(), self.overlay);
                    rebuild = Some((local_version, tokio::task::spawn_blocking(move || {
                        Zone::build(&domain, overlay, hosts.iter().map(|h| &**h))
                    })));
                    dirty = false;
                    next_rebuild = Instant::now() + REBUILD_INTERVAL;
                }
                (includes, built) = join_some(&mut rebuild) => {
                    rebuild = None;
                    let Ok(zone) = built else { continue };
                    if zone.conflicts() != conflicts {
                        conflicts = zone.conflicts();
                        if conflicts > 0 {
                            tracing::warn!(conflicts, "names claimed by two hosts: the first claim keeps them");
                        }
                    }
                    self.zone.send_replace(Arc::new(zone));
                    self.zone_includes.send_replace(includes);
                }
            }
            dirty |= self.sync.take_changed();
            if !self.flush().await {
                return;
            }
        }
    }

    fn receive(&mut self, (from, bytes): Inbound) {
        let now = std::time::Instant::now();
        if let Err(reason) = self.sync.handle_message(now, from, &bytes) {
            tracing::debug!(peer = %from, %reason, "records-sync message refused");
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands what the sync wants sent to the packet task; false once the
    /// packet task is gone.
    async fn flush(&mut self) -> bool {
        while let Some(transmit) = self.sync.poll_transmit() {
            if self.outbound.send(transmit).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Hands this host's records to the store, when there is one.
fn publish_local(publish: Option<&watch::Sender<Option<Arc<HostRecords>>>>, records: &HostRecords) {
    if let Some(tx) = publish {
        tx.send_replace(Some(Arc::new(records.clone())));
    }
}

/// Completes when the store's records changed; never without a store (or
/// once it is gone: the records held stay).
async fn store_changed(records: &mut Option<watch::Receiver<StoreRecords>>) {
    if let Some(rx) = records {
        if rx.changed().await.is_ok() {
            return;
        }
        *records = None;
    }
    std::future::pending().await
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn join_some(
    handle: &mut Option<(u64, JoinHandle<Zone>)>,
) -> (u64, Result<Zone, tokio::task::JoinError>) {
    match handle {
        Some((includes, h)) => (*includes, h.await),
        None => std::future::pending().await,
    }
}
