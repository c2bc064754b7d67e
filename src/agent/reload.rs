//! The reload task: on `meshctl reload` (SIGHUP reaches it the same way),
//! re-reads the config file, asks `config::diff` what changed, and hands
//! each change to the task that owns it: peers to the packet task, DNS
//! upstreams to the DNS server, the withdraw time to the records sync, the
//! metrics listener to the metrics server, the policy to the packet task.
//!
//! All or nothing: a file that does not validate, a setting that needs a
//! restart, or a metrics address that cannot be bound refuses the reload
//! with its error and changes nothing. Must never: read the file on the
//! packet task, or decide what may change (the diff does).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use super::{dns_server, metrics};
use crate::config::diff::{self, Change, Plan};
use crate::config::{self, Config};
use crate::control::Response;
use crate::membership::Membership;

/// Where each run-time setting goes.
pub struct Ends {
    pub membership: watch::Sender<Membership>,
    pub upstreams: watch::Sender<Vec<SocketAddr>>,
    pub withdraw_after: watch::Sender<Duration>,
    pub metrics: mpsc::Sender<Option<TcpListener>>,
    pub policy: watch::Sender<crate::policy::Policy>,
}

/// Starts the task; each reply sent on the returned channel asks for one
/// reload and gets its outcome.
pub fn spawn(running: Config, ends: Ends) -> mpsc::Sender<oneshot::Sender<Response>> {
    let (tx, mut rx) = mpsc::channel::<oneshot::Sender<Response>>(4);
    tokio::spawn(async move {
        let mut running = running;
        while let Some(reply) = rx.recv().await {
            let response = match reload(&mut running, &ends).await {
                Ok(changes) => Response::Reloaded(changes),
                Err(e) => {
                    tracing::error!("{e}");
                    Response::Error(e)
                }
            };
            let _ = reply.send(response);
        }
    });
    tx
}

/// Applies the file's run-time changes; the lines `meshctl reload` prints.
async fn reload(running: &mut Config, ends: &Ends) -> Result<Vec<String>, String> {
    let file = running.file.clone();
    let fresh = tokio::task::spawn_blocking(move || config::load(&file))
        .await
        .map_err(|e| format!("reload refused: {e}"))?
        .map_err(|e| format!("reload refused, keeping the running config: {e}"))?;
    let mut fresh = fresh;
    if running.store.is_some() {
        // The block and overlay came from the store at start, not the file.
        fresh.subnet = running.subnet;
        fresh.overlay = running.overlay;
    }
    let plan = diff::plan(running, &fresh).map_err(|e| e.to_string())?;
    // The one step that can fail comes first, so a failure changes nothing.
    let listener = match (plan.metrics_changed(), fresh.metrics_listen) {
        (true, Some(at)) => Some(Some(metrics::bind(at).await.map_err(|e| {
            format!("reload refused, nothing changed: metrics_listen {at}: {e}")
        })?)),
        (true, None) => Some(None),
        (false, _) => None,
    };
    apply(&plan, &fresh, listener, ends).await;
    let lines: Vec<String> = plan.changes.iter().map(ToString::to_string).collect();
    tracing::info!(changes = ?lines, "config reloaded");
    *running = fresh;
    Ok(lines)
}

async fn apply(plan: &Plan, fresh: &Config, listener: Option<Option<TcpListener>>, ends: &Ends) {
    if plan.peers_changed() {
        ends.membership.send_replace(fresh.membership.clone());
    }
    if plan.policy_changed() {
        ends.policy.send_replace(fresh.policy.clone());
    }
    for change in &plan.changes {
        match change {
            Change::DnsUpstream(list) => {
                let list = list.clone().unwrap_or_else(dns_server::system_upstreams);
                ends.upstreams.send_replace(list);
            }
            Change::WithdrawAfter(_) => {
                ends.withdraw_after.send_replace(fresh.dns.withdraw_after);
            }
            Change::PeerAdded(_)
            | Change::PeerRemoved(_)
            | Change::PeerChanged { .. }
            | Change::MetricsListen(_)
            | Change::Policy(_) => {}
        }
    }
    if let Some(listener) = listener {
        let _ = ends.metrics.send(listener).await;
    }
}
