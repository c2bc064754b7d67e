//! This host's DNS records in etcd, and other hosts' records to the agent.
//!
//! The agent hands over its whole record set (`HostRecords`) whenever it
//! changes; it goes to `records/<name>` on this host's lease, paced by
//! `store::pace` (at most once a second, and only when the key differs).
//! Other hosts' sets travel from the view to the agent's records sync with
//! the membership, on the same coalescing. Must never: write one key per
//! container, write without the lease (a dead host's records must expire
//! with it), or delete records because etcd is unreachable.

use std::sync::Arc;
use std::time::Instant;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;

use super::session::Session;
use super::{StoreError, call};
use crate::dns::HostRecords;
use crate::store::layout;
use crate::store::pace::{self, Action};

/// This host's records as the agent last published them.
pub(super) type Local = watch::Receiver<Option<Arc<HostRecords>>>;

/// Completes when the agent published new records; never without an
/// agent (or once it is gone).
pub(super) async fn local_changed(local: &mut Option<Local>) {
    if let Some(rx) = local {
        if rx.changed().await.is_ok() {
            return;
        }
        *local = None;
    }
    std::future::pending().await
}

impl Session {
    /// The records this host wants in etcd, if the agent said yet.
    fn wanted_records(&self) -> Option<Arc<HostRecords>> {
        self.local.as_ref().and_then(|rx| rx.borrow().clone())
    }

    /// Something may have changed this host's records or their key: write
    /// (or check) as soon as the pace allows.
    pub(super) fn schedule_records(&mut self) {
        if self.wanted_records().is_some() {
            self.records_pace.schedule(Instant::now());
        }
    }

    /// The view shows this host's key other than wanted (deleted with an
    /// old lease, overwritten by hand): write it again.
    pub(super) fn check_own_records(&mut self) {
        let Some(wanted) = self.wanted_records() else {
            return;
        };
        if self.view.records.get(&self.own.name) != Some(&wanted) {
            self.records_pace.schedule(Instant::now());
        }
    }

    /// Puts this host's records on its lease unless etcd already holds
    /// exactly that (value and lease).
    pub(super) async fn write_records(&mut self, client: &mut Client) -> Result<(), StoreError> {
        self.records_pace.done(Instant::now());
        let (Some(wanted), Some(lease)) = (self.wanted_records(), self.lease) else {
            return Ok(());
        };
        let key = self.layout.records(&self.own.name);
        let value = layout::encode(&*wanted);
        let current = call(&self.store, client.get(key.clone(), None)).await?;
        let kv = current.kvs().first().map(|kv| (kv.value(), kv.lease()));
        match pace::action(kv, &value, lease) {
            Action::Keep => return Ok(()),
            Action::Put => {}
            Action::Delete => {
                tracing::warn!(
                    bytes = value.len(),
                    max = pace::MAX_VALUE,
                    "this host's DNS records are too large for etcd: removed there, peers use the mesh sync"
                );
                call(&self.store, client.delete(key, None)).await?;
                return Ok(());
            }
        }
        let options = PutOptions::new().with_lease(lease);
        call(&self.store, client.put(key, value, Some(options))).await?;
        tracing::debug!(
            containers = wanted.containers.len(),
            "wrote this host's DNS records to etcd"
        );
        Ok(())
    }

    /// Sends other hosts' records to the agent if they changed.
    pub(super) fn publish_records(&self) {
        let Some(tx) = &self.records_tx else { return };
        let fresh = self.view.host_records(&self.own.name);
        tx.send_if_modified(|held| {
            let differs = *held != fresh;
            if differs {
                *held = fresh;
            }
            differs
        });
    }
}
