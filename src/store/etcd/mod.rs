//! The etcd shell: joins the cluster (cluster settings, block claim, host
//! record on a lease), then keeps the lease alive and the view current,
//! publishing `Membership` and other hosts' DNS records to the agent and a
//! `StoreReport` for `meshctl`, and writing this host's DNS records
//! (`records`) on its lease.
//!
//! Every decision (which block, what an event changes, who is a peer, how
//! long to wait) is made by the pure modules beside this one. Must never:
//! remove a peer because etcd is unreachable, re-put the host record to keep
//! it alive (the lease's keep-alive stream does that), retry without
//! backoff, or block the agent's packet loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, TxnOp, TxnOpResponse,
};
use ipnet::Ipv4Net;
use tokio::sync::watch;

mod records;
mod session;
use session::Session;

use super::claim::{self, ClaimError, Grid, Plan};
use super::layout::{self, BlockRecord, ClusterRecord, HostRecord, Layout};
use super::status::StoreReport;
use super::view::{self, Snapshot, View};
use crate::config::{Config, StoreConfig};
use crate::dns::HostRecords;
use crate::dns::sync::StoreRecords;
use crate::keys::{PresharedKey, PublicKey};
use crate::membership::Membership;

/// How long meshd waits for etcd at start before falling back to the
/// snapshot (or giving up when there is none).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a single unary request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings: a dead connection is noticed within interval + timeout.
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// The snapshot is written at most this often.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Watch events within this long are folded into one new `Membership`:
/// when a fleet boots, each agent rebuilds its peer list a few times a
/// second instead of once per joining host (the 1,000-host simulation
/// could not converge without it), for at most this much added latency.
const COALESCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd ({endpoints}): {source}")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd ({0}): no answer within {1:?}")]
    Timeout(String, Duration),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("reading TLS file {}: {source}", .file.display())]
    Tls {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("block {0} is no longer this host's in etcd (decommissioned?); not re-registering")]
    NotOwner(Ipv4Net),
    #[error("the lease ran out; registering again")]
    LeaseLost,
    #[error("this host's record was deleted; registering again")]
    RecordLost,
    #[error("the watch stream closed")]
    WatchClosed,
    #[error("etcd is unreachable ({reason}) and {} holds no snapshot to start from", .path.display())]
    NoSnapshot { path: PathBuf, reason: String },
    #[error("no host {0:?} and no block owned by it in etcd")]
    UnknownHost(String),
}

/// What meshd needs from a started store.
pub struct Started {
    pub block: Ipv4Net,
    pub cluster: ClusterRecord,
    pub membership: watch::Receiver<Membership>,
    pub report: watch::Receiver<StoreReport>,
    /// Other hosts' DNS records as etcd holds them.
    pub records: watch::Receiver<StoreRecords>,
    /// This host's DNS records, for the store to write (`None`: nothing
    /// to write yet).
    pub publish: watch::Sender<Option<Arc<HostRecords>>>,
}

/// This host, as the store task needs it.
#[derive(Clone)]
struct Own {
    name: String,
    key: PublicKey,
    psk: Option<PresharedKey>,
    /// `None`: no snapshot (the simulation's thousand clients).
    snapshot: Option<PathBuf>,
}

/// A host joining the store: what `start` needs from its config.
#[derive(Clone)]
pub struct Member {
    pub name: String,
    pub key: PublicKey,
    pub psk: Option<PresharedKey>,
    pub overlay: Ipv4Net,
    /// Where the snapshot lives; `None` keeps none.
    pub state_dir: Option<PathBuf>,
}

impl Member {
    pub fn of(config: &Config) -> Self {
        Self {
            name: config.name.clone(),
            key: config.public_key(),
            psk: config.cluster_psk.clone(),
            overlay: config.overlay,
            state_dir: Some(config.state_dir.clone()),
        }
    }
}

/// Joins (or, with etcd unreachable, restores the snapshot) and spawns the
/// task that keeps membership current. Claim errors (block owned by
/// another host, full overlay) are final.
pub async fn start(member: Member, store: &StoreConfig) -> Result<Started, StoreError> {
    let own = Own {
        name: member.name,
        key: member.key,
        psk: member.psk,
        snapshot: member.state_dir.map(|d| d.join(view::SNAPSHOT_FILE)),
    };
    let wanted = ClusterRecord {
        overlay: member.overlay,
        block_prefix: store.block_prefix,
    };
    let joined = tokio::time::timeout(JOIN_TIMEOUT, join(store, &own, wanted)).await;
    let mut session = match joined {
        Ok(Ok(s)) => s,
        Ok(Err(e @ (StoreError::Claim(_) | StoreError::Tls { .. }))) => return Err(e),
        Ok(Err(e)) => restore(store, &own, &e.to_string())?,
        Err(_) => restore(store, &own, "no answer at start")?,
    };
    let (membership_tx, membership) = watch::channel(session.membership());
    let (report_tx, report) = watch::channel(StoreReport::default());
    let (records_tx, records) = watch::channel(session.view.host_records(&own.name));
    let (publish, local) = watch::channel(None);
    session.membership_tx = Some(membership_tx);
    session.report_tx = Some(report_tx);
    session.records_tx = Some(records_tx);
    session.local = Some(local);
    session.publish();
    let started = Started {
        block: session.block,
        cluster: session.cluster,
        membership,
        report,
        records,
        publish,
    };
    tokio::spawn(session.run());
    Ok(started)
}

/// The starting point when etcd cannot be reached: the last snapshot.
fn restore(store: &StoreConfig, own: &Own, why: &str) -> Result<Session, StoreError> {
    let path = own.snapshot.clone().unwrap_or_default();
    let none = || StoreError::NoSnapshot {
        path: path.clone(),
        reason: why.to_owned(),
    };
    let snap = std::fs::read(&path)
        .ok()
        .and_then(|b| Snapshot::decode(&b, &own.name))
        .ok_or_else(none)?;
    let cluster = snap.view.cluster.ok_or_else(none)?;
    tracing::warn!(
        reason = why,
        block = %snap.block,
        revision = snap.view.revision,
        hosts = snap.view.hosts.len(),
        "etcd unreachable at start: running from the last snapshot"
    );
    let mut s = Session::new(store.clone(), own.clone(), snap.block, cluster, snap.view);
    s.last_error = Some(why.to_owned());
    Ok(s)
}

/// Connects, settles the cluster record, claims or keeps a block, and
/// registers this host on a fresh lease.
async fn join(
    store: &StoreConfig,
    own: &Own,
    wanted: ClusterRecord,
) -> Result<Session, StoreError> {
    let layout = Layout::new(&store.prefix);
    let mut client = connect(store).await?;
    let cluster = settle_cluster(&mut client, store, &layout, wanted).await?;
    let grid = Grid {
        overlay: cluster.overlay,
        block_prefix: cluster.block_prefix,
    };
    let lease = call(store, client.lease_grant(i64::from(store.lease_ttl), None)).await?;
    let lease = lease.id();
    let mut view = View::default();
    let mut block = None;
    for _ in 0..claim::MAX_CLAIM_ATTEMPTS {
        let listing = call(
            store,
            client.get(layout.root(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        view.relist(
            &layout,
            listing.kvs().iter().map(|kv| (kv.key(), kv.value())),
            revision,
        );
        let plan = claim::plan(&view.blocks, &own.name, own.key, store.requested, grid)?;
        if try_register(&mut client, store, &layout, own, plan, lease).await? {
            block = Some(plan);
            break;
        }
    }
    let Some(plan) = block else {
        return Err(ClaimError::TooManyRaces(claim::MAX_CLAIM_ATTEMPTS).into());
    };
    let block = match plan {
        Plan::Keep(b) => {
            tracing::info!(block = %b, "etcd still names this host the owner of its block");
            b
        }
        Plan::Claim(b) => {
            tracing::info!(block = %b, "claimed a block in etcd");
            b
        }
    };
    let mut s = Session::new(store.clone(), own.clone(), block, cluster, view);
    s.client = Some(client);
    s.lease = Some(lease);
    s.lease_expires = Some(Instant::now() + Duration::from_secs(u64::from(store.lease_ttl)));
    Ok(s)
}

/// Writes the cluster record if none exists, else reads it; this host
/// adopts the stored overlay and block size.
async fn settle_cluster(
    client: &mut Client,
    store: &StoreConfig,
    layout: &Layout,
    wanted: ClusterRecord,
) -> Result<ClusterRecord, StoreError> {
    let key = layout.config();
    let txn = etcd_client::Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), layout::encode(&wanted), None)])
        .or_else([TxnOp::get(key, None)]);
    let resp = call(store, client.txn(txn)).await?;
    if resp.succeeded() {
        tracing::info!(overlay = %wanted.overlay, block_prefix = wanted.block_prefix, "wrote the cluster settings to etcd");
        return Ok(wanted);
    }
    let stored = first_get(&resp).and_then(|v| layout::decode::<ClusterRecord>(&v));
    match stored {
        Some(c) if c != wanted => {
            tracing::info!(overlay = %c.overlay, block_prefix = c.block_prefix, "adopting the cluster settings stored in etcd");
            Ok(c)
        }
        Some(c) => Ok(c),
        None => {
            tracing::warn!("the cluster settings in etcd are unreadable; using this host's");
            Ok(wanted)
        }
    }
}

/// One registration transaction. Claim: the block key must not exist
/// (create-revision 0). Keep: the block's value must still name this host.
/// Either way the host record goes on `lease`. `false`: lost the race.
async fn try_register(
    client: &mut Client,
    store: &StoreConfig,
    layout: &Layout,
    own: &Own,
    plan: Plan,
    lease: i64,
) -> Result<bool, StoreError> {
    let (Plan::Keep(block) | Plan::Claim(block)) = plan;
    let owner = layout::encode(&BlockRecord {
        owner: own.name.clone(),
        public_key: own.key,
    });
    let host = host_value(store, own, block);
    let put_host = TxnOp::put(
        layout.host(&own.name),
        host,
        Some(PutOptions::new().with_lease(lease)),
    );
    let bkey = layout.block(block);
    let txn = match plan {
        Plan::Claim(_) => etcd_client::Txn::new()
            .when([Compare::create_revision(bkey.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(bkey, owner, None), put_host]),
        Plan::Keep(_) => etcd_client::Txn::new()
            .when([Compare::value(bkey, CompareOp::Equal, owner)])
            .and_then([put_host]),
    };
    Ok(call(store, client.txn(txn)).await?.succeeded())
}

fn host_value(store: &StoreConfig, own: &Own, block: Ipv4Net) -> Vec<u8> {
    layout::encode(&HostRecord {
        public_key: own.key,
        endpoints: vec![store.advertise],
        block,
    })
}

fn first_get(resp: &etcd_client::TxnResponse) -> Option<Vec<u8>> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    })
}

/// Connects with pings on, so a dead server is noticed without traffic.
pub async fn connect(store: &StoreConfig) -> Result<Client, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &store.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    call(store, Client::connect(&store.endpoints, Some(options))).await
}

fn tls_options(tls: &crate::config::TlsFiles) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| StoreError::Tls {
            file: p.to_owned(),
            source,
        })
    };
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca_file {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// A unary request, bounded in time, its error naming the endpoints.
async fn call<T>(
    store: &StoreConfig,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    let endpoints = store.endpoints.join(",");
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(StoreError::Etcd { endpoints, source }),
        Err(_) => Err(StoreError::Timeout(endpoints, REQUEST_TIMEOUT)),
    }
}

/// `meshctl decommission`: frees a host's blocks and deletes its host and
/// DNS records in one compare-and-swap (each block's value and the host
/// key's revision must be as read), so a concurrent re-registration is not
/// lost silently.
pub async fn decommission(store: &StoreConfig, name: &str) -> Result<Vec<Ipv4Net>, StoreError> {
    let layout = Layout::new(&store.prefix);
    let mut client = connect(store).await?;
    for _ in 0..claim::MAX_CLAIM_ATTEMPTS {
        let listing = call(
            store,
            client.get(layout.root(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut compares = Vec::new();
        let mut deletes = Vec::new();
        let mut freed = Vec::new();
        let host_key = layout.host(name);
        let mut host_rev = 0;
        for kv in listing.kvs() {
            match layout.parse(kv.key()) {
                Some(layout::Key::Block(b))
                    if layout::decode::<BlockRecord>(kv.value())
                        .is_some_and(|o| o.owner == name) =>
                {
                    compares.push(Compare::value(kv.key(), CompareOp::Equal, kv.value()));
                    deletes.push(TxnOp::delete(kv.key(), None));
                    freed.push(b);
                }
                Some(layout::Key::Host(h)) if h == name => host_rev = kv.mod_revision(),
                _ => {}
            }
        }
        if freed.is_empty() && host_rev == 0 {
            return Err(StoreError::UnknownHost(name.to_owned()));
        }
        compares.push(if host_rev == 0 {
            Compare::create_revision(host_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(host_key.clone(), CompareOp::Equal, host_rev)
        });
        deletes.push(TxnOp::delete(host_key, None));
        // The DNS records go with the host (no compare: nothing else
        // depends on them, and a stale set would only linger until the
        // host's lease ran out).
        deletes.push(TxnOp::delete(layout.records(name), None));
        let txn = etcd_client::Txn::new().when(compares).and_then(deletes);
        if call(store, client.txn(txn)).await?.succeeded() {
            return Ok(freed);
        }
    }
    Err(ClaimError::TooManyRaces(claim::MAX_CLAIM_ATTEMPTS).into())
}

/// Joins once (cluster record, block claim, host record on a lease)
/// without starting the watch task: the claim race test and the
/// simulation drive this directly.
pub async fn claim(
    store: &StoreConfig,
    name: &str,
    key: PublicKey,
    overlay: Ipv4Net,
) -> Result<Ipv4Net, StoreError> {
    let own = Own {
        name: name.to_owned(),
        key,
        psk: None,
        snapshot: None,
    };
    let wanted = ClusterRecord {
        overlay,
        block_prefix: store.block_prefix,
    };
    join(store, &own, wanted).await.map(|s| s.block)
}
