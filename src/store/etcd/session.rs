//! The store task's connected life: one session per connection, run
//! again with jittered backoff after each failure; lease keep-alives,
//! watch events, re-lists after compaction, the snapshot on disk, and
//! this host's DNS records written when they change (`super::records`).
//!
//! Must never: remove a peer on a connection error, re-put the host record
//! to keep it alive, or watch a compacted revision twice.

use std::path::Path;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchStream};
use ipnet::Ipv4Net;
use tokio::sync::watch;

use super::records::{Local, local_changed};
use super::{COALESCE, Own, PERSIST_EVERY, StoreError, call, connect, host_value, try_register};
use crate::config::StoreConfig;
use crate::dns::sync::StoreRecords;
use crate::membership::Membership;
use crate::store::backoff::Backoff;
use crate::store::claim::Plan;
use crate::store::layout::{ClusterRecord, Layout};
use crate::store::pace::Pacer;
use crate::store::status::{StoreReport, StoreStatus};
use crate::store::view::{self, Event, Snapshot, View};

/// One connected session's streams.
struct Live {
    client: Client,
    keeper: etcd_client::LeaseKeeper,
    kept: etcd_client::LeaseKeepAliveStream,
    watch: WatchStream,
}

/// The long-lived state of the store task.
pub(super) struct Session {
    pub(super) store: StoreConfig,
    pub(super) layout: Layout,
    pub(super) own: Own,
    pub(super) block: Ipv4Net,
    pub(super) cluster: ClusterRecord,
    pub(super) view: View,
    pub(super) client: Option<Client>,
    pub(super) lease: Option<i64>,
    pub(super) lease_expires: Option<Instant>,
    pub(super) last_error: Option<String>,
    pub(super) connected: bool,
    pub(super) relists: u64,
    pub(super) dirty: bool,
    /// When the pending membership change is published.
    pub(super) flush_at: Option<tokio::time::Instant>,
    pub(super) membership_tx: Option<watch::Sender<Membership>>,
    pub(super) report_tx: Option<watch::Sender<StoreReport>>,
    /// Other hosts' DNS records, to the agent.
    pub(super) records_tx: Option<watch::Sender<StoreRecords>>,
    /// This host's DNS records, from the agent.
    pub(super) local: Option<Local>,
    /// When this host's records are next written.
    pub(super) records_pace: Pacer,
}

impl Session {
    pub(super) fn new(
        store: StoreConfig,
        own: Own,
        block: Ipv4Net,
        cluster: ClusterRecord,
        view: View,
    ) -> Self {
        Self {
            layout: Layout::new(&store.prefix),
            store,
            own,
            block,
            cluster,
            view,
            client: None,
            lease: None,
            lease_expires: None,
            last_error: None,
            connected: false,
            relists: 0,
            dirty: true,
            flush_at: None,
            membership_tx: None,
            report_tx: None,
            records_tx: None,
            local: None,
            records_pace: Pacer::default(),
        }
    }

    pub(super) fn membership(&self) -> Membership {
        self.view.membership(
            &self.own.name,
            self.block,
            self.own.psk.as_ref(),
            self.store.keepalive,
        )
    }

    /// Reconnects forever with jittered backoff; each pass runs one
    /// connected session until it fails.
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            let err = self.connected(&mut backoff).await;
            self.connected = false;
            let delay = backoff.next(random());
            let text = err.to_string();
            // Only a changed error is logged: a long outage is one line.
            if self.last_error.as_deref() != Some(text.as_str()) {
                tracing::warn!(error = %text, retry_in = ?delay, "etcd session ended; peers kept as last seen");
            }
            self.last_error = Some(text);
            if self.flush_at.is_some() {
                self.flush_membership();
            }
            if matches!(err, StoreError::Etcd { .. } | StoreError::Timeout(..)) {
                self.client = None;
            }
            self.publish();
            self.persist().await;
            tokio::time::sleep(delay).await;
        }
    }

    /// One connected session: register, (re-)list or resume the watch,
    /// then serve keep-alives and watch events until something fails.
    async fn connected(&mut self, backoff: &mut Backoff) -> StoreError {
        match self.establish().await {
            Ok(mut live) => {
                backoff.reset();
                self.connected = true;
                self.last_error = None;
                self.publish();
                self.serve(&mut live).await
            }
            Err(e) => e,
        }
    }

    /// Connects if needed, registers, and opens the keep-alive stream and
    /// the watch.
    async fn establish(&mut self) -> Result<Live, StoreError> {
        let mut client = match self.client.clone() {
            Some(c) => c,
            None => connect(&self.store).await?,
        };
        self.client = Some(client.clone());
        self.register(&mut client).await?;
        let lease = self.lease.ok_or(StoreError::LeaseLost)?;
        let (keeper, kept) = call(&self.store, client.lease_keep_alive(lease)).await?;
        let watch = self.open_watch(&mut client).await?;
        // A new session checks the records key (a new lease, a missed
        // delete): a GET, and a put only if it differs.
        self.schedule_records();
        Ok(Live {
            client,
            keeper,
            kept,
            watch,
        })
    }

    /// Renews the lease every third of its TTL, applies watch events,
    /// persists and publishes, until something fails.
    async fn serve(&mut self, live: &mut Live) -> StoreError {
        let ttl = Duration::from_secs(u64::from(self.store.lease_ttl));
        let mut renew = tokio::time::interval(ttl / 3);
        let mut persist = tokio::time::interval(PERSIST_EVERY);
        loop {
            let flush_at = self.flush_at;
            let records_due = self.records_pace.due().map(tokio::time::Instant::from_std);
            let step = tokio::select! {
                _ = renew.tick() => call(&self.store, live.keeper.keep_alive()).await,
                msg = live.kept.message() => self.on_keep_alive(msg, ttl),
                msg = live.watch.message() => match msg {
                    Ok(Some(resp)) => self.on_watch(&mut live.client, &mut live.watch, resp).await,
                    Ok(None) => Err(StoreError::WatchClosed),
                    Err(source) => Err(self.etcd_error(source)),
                },
                _ = persist.tick() => {
                    self.persist().await;
                    Ok(())
                }
                () = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)),
                    if flush_at.is_some() => {
                    self.flush_membership();
                    Ok(())
                }
                () = local_changed(&mut self.local) => {
                    self.schedule_records();
                    Ok(())
                }
                () = tokio::time::sleep_until(records_due.unwrap_or_else(tokio::time::Instant::now)),
                    if records_due.is_some() => self.write_records(&mut live.client).await,
            };
            if let Err(e) = step {
                return e;
            }
        }
    }

    fn etcd_error(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.store.endpoints.join(","),
            source,
        }
    }

    fn on_keep_alive(
        &mut self,
        msg: Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match msg {
            Ok(Some(r)) if r.ttl() > 0 => {
                self.lease_expires = Some(Instant::now() + ttl);
                self.publish();
                Ok(())
            }
            Ok(_) => {
                self.lease = None;
                self.lease_expires = None;
                Err(StoreError::LeaseLost)
            }
            Err(source) => Err(self.etcd_error(source)),
        }
    }

    /// Puts the host record on the current lease (a fresh one if it ran
    /// out), guarded by the block still naming this host.
    async fn register(&mut self, client: &mut Client) -> Result<(), StoreError> {
        if let Some(lease) = self.lease {
            let ttl = call(&self.store, client.lease_time_to_live(lease, None)).await?;
            if ttl.ttl() <= 0 {
                self.lease = None;
            }
        }
        let lease = match self.lease {
            Some(l) => l,
            None => {
                let l = call(
                    &self.store,
                    client.lease_grant(i64::from(self.store.lease_ttl), None),
                )
                .await?;
                self.lease = Some(l.id());
                l.id()
            }
        };
        self.lease_expires =
            Some(Instant::now() + Duration::from_secs(u64::from(self.store.lease_ttl)));
        // A record already there on this lease is left alone: after an etcd
        // restart a thousand hosts reconnect, and a put each would send a
        // million events to the watchers.
        let current = call(
            &self.store,
            client.get(self.layout.host(&self.own.name), None),
        )
        .await?;
        let wanted = host_value(&self.store, &self.own, self.block);
        if current
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == lease && kv.value() == wanted.as_slice())
        {
            return Ok(());
        }
        let store = self.store.clone();
        let kept = try_register(
            client,
            &store,
            &self.layout,
            &self.own,
            Plan::Keep(self.block),
            lease,
        )
        .await?;
        if kept {
            Ok(())
        } else {
            Err(StoreError::NotOwner(self.block))
        }
    }

    /// Watches from the view's revision + 1; a view that never listed
    /// (revision 0) lists first.
    async fn open_watch(&mut self, client: &mut Client) -> Result<WatchStream, StoreError> {
        if self.view.revision == 0 {
            self.relist(client, false).await?;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(self.view.revision + 1);
        call(&self.store, client.watch(self.layout.root(), Some(options))).await
    }

    /// A full listing replaces the view; the diff applies deletes the
    /// watch missed. `compacted`: log it (once per compaction).
    async fn relist(&mut self, client: &mut Client, compacted: bool) -> Result<(), StoreError> {
        let opts = GetOptions::new().with_prefix();
        let listing = call(&self.store, client.get(self.layout.root(), Some(opts))).await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let before = self.view.revision;
        let kvs = listing.kvs().iter().map(|kv| (kv.key(), kv.value()));
        let diff = self.view.relist(&self.layout, kvs, revision);
        if compacted {
            self.relists += 1;
            tracing::warn!(
                from = before,
                to = revision,
                removed = ?diff.removed,
                added = ?diff.added,
                "etcd compacted the watched history: re-listed and applied the difference"
            );
        }
        self.changed();
        self.check_own_records();
        Ok(())
    }

    async fn on_watch(
        &mut self,
        client: &mut Client,
        watch: &mut WatchStream,
        resp: etcd_client::WatchResponse,
    ) -> Result<(), StoreError> {
        if resp.compact_revision() > 0 || resp.canceled() {
            // Never watch the compacted revision again: list, then resume
            // after the listing's revision.
            self.relist(client, true).await?;
            *watch = self.open_watch(client).await?;
            return Ok(());
        }
        let header_rev = resp.header().map_or(0, |h| h.revision());
        let own_key = self.layout.host(&self.own.name);
        let mut own_deleted = false;
        for e in resp.events() {
            let Some(kv) = e.kv() else { continue };
            let event = match e.event_type() {
                EventType::Put => Event::Put {
                    key: kv.key(),
                    value: kv.value(),
                },
                EventType::Delete => {
                    own_deleted |= kv.key() == own_key.as_bytes();
                    Event::Delete { key: kv.key() }
                }
            };
            self.view.apply(&self.layout, event, kv.mod_revision());
        }
        self.view.revision = self.view.revision.max(header_rev);
        if !resp.events().is_empty() {
            self.changed();
            self.check_own_records();
        }
        // Our record gone (lease expired while etcd could not hear us, or
        // deleted by hand): register again, if the block is still ours.
        if own_deleted {
            return Err(StoreError::RecordLost);
        }
        Ok(())
    }

    /// The view changed: persist it and publish the membership soon.
    fn changed(&mut self) {
        self.dirty = true;
        if self.flush_at.is_none() {
            self.flush_at = Some(tokio::time::Instant::now() + COALESCE);
        }
        self.publish();
    }

    fn flush_membership(&mut self) {
        self.flush_at = None;
        self.publish_records();
        let fresh = self.membership();
        if let Some(tx) = &self.membership_tx {
            tx.send_if_modified(|m| {
                let differs = *m != fresh;
                if differs {
                    tracing::info!(
                        peers = fresh.peers.len(),
                        revision = self.view.revision,
                        "membership from etcd changed"
                    );
                    *m = fresh;
                }
                differs
            });
        }
        self.publish();
    }

    pub(super) fn publish(&self) {
        let Some(tx) = &self.report_tx else { return };
        tx.send_replace(StoreReport {
            status: StoreStatus {
                backend: "etcd".into(),
                endpoints: self.store.endpoints.clone(),
                prefix: self.store.prefix.clone(),
                connected: self.connected,
                revision: self.view.revision,
                block: Some(self.block),
                lease_id: self.lease,
                lease_secs_left: None,
                hosts: self.view.hosts.len(),
                blocks: self.view.blocks.len(),
                relists: self.relists,
                last_error: self.last_error.clone(),
            },
            lease_expires: self.lease_expires,
        });
    }

    /// Writes the snapshot if the view changed (atomically, off the
    /// packet thread).
    async fn persist(&mut self) {
        if !self.dirty || self.view.revision == 0 {
            return;
        }
        self.dirty = false;
        let mut view = self.view.clone();
        view.cluster = Some(self.cluster);
        let snap = Snapshot {
            version: view::SNAPSHOT_VERSION,
            name: self.own.name.clone(),
            block: self.block,
            view,
        };
        let Some(path) = self.own.snapshot.clone() else {
            return;
        };
        let written =
            tokio::task::spawn_blocking(move || write_atomically(&path, &snap.encode())).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, "cannot write the store snapshot");
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}
