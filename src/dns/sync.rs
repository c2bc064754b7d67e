//! Sharing DNS records between agents: every rule of the records sync,
//! without IO.
//!
//! Each agent tells every peer what it publishes (`HostRecords`) in small
//! messages that ride inside the WireGuard tunnels: the node hands this
//! module only messages it decrypted from a peer's session and that came
//! from that peer's host address, so a message's sender is the peer whose
//! key sealed it (`from` below), never what the message says. A snapshot
//! is split into parts that each fit one packet; a heartbeat with the
//! snapshot's stamp goes to every peer every `HEARTBEAT`; a receiver that
//! sees a newer stamp asks for the snapshot again. Records of a peer not
//! heard from for `withdraw_after`, or gone from the membership, are
//! withdrawn.
//!
//! With a membership store, hosts also publish their records there
//! (`store`: etcd's `records/<name>`); for those hosts the store's set is
//! the one served, and the mesh snapshot waits in reserve.
//!
//! Must never: accept records from anyone but a current peer, or records
//! that do not validate (`HostRecords::validate`: labels, lengths, counts,
//! addresses inside the peer's subnet); let an older snapshot replace a
//! newer one; do work per message that grows with what a peer sends beyond
//! the fixed caps (message size, parts, containers, messages per second).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::records::{ContainerRecord, HostRecords, MAX_CONTAINERS_PER_HOST};
use crate::keys::PublicKey;
use crate::membership::{Membership, host_address};

/// The overlay UDP port agents share records on. The node reserves it: no
/// packet from a device may use it, and packets to it are handed here.
pub const SYNC_PORT: u16 = 7301;
/// Largest sync message. The node builds these packets itself, so they fit
/// a 1280-byte inner MTU with room to spare (IPv4 20 + UDP 8 + 1200).
pub const MAX_MESSAGE: usize = 1200;
/// Parts one snapshot may have: enough for `MAX_CONTAINERS_PER_HOST`
/// containers of the largest size (see the test that packs them).
pub const MAX_PARTS: u32 = MAX_CONTAINERS_PER_HOST as u32;
/// How often each agent tells every peer its snapshot's stamp.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Messages a peer may send per second, with a burst of the same size:
/// a full snapshot of the largest host (about 600 parts) in under a
/// second, while a peer that floods costs at most this many small parses.
pub const MESSAGES_PER_SECOND: f64 = 2000.0;
/// A peer gets the whole snapshot resent at most this often (a request
/// must not turn this agent into an amplifier).
const RESEND_INTERVAL: Duration = Duration::from_secs(1);
/// Messages waiting to be sent, at most: the largest snapshot to a hundred
/// peers at once. Past it a peer catches up by asking after its next
/// heartbeat.
const MAX_QUEUED: usize = 1 << 16;

/// Orders snapshots: the sender's start time (Unix milliseconds) first, so
/// a restarted agent's snapshots win, then its change counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub epoch: u64,
    pub version: u64,
}

/// What travels between agents, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Part `index` of `total` of the snapshot with `stamp`.
    Part {
        stamp: Stamp,
        index: u32,
        total: u32,
        containers: Vec<ContainerRecord>,
    },
    /// The sender's current snapshot is `stamp`.
    Heartbeat { stamp: Stamp },
    /// Send me your snapshot.
    Request,
}

/// Why a message was not taken (for counters and debug logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncReject {
    #[error("not from a current peer")]
    UnknownPeer,
    #[error("larger than {MAX_MESSAGE} bytes")]
    Oversized,
    #[error("over the peer's message rate")]
    RateLimited,
    #[error("not a sync message")]
    Malformed,
    #[error("part {index} of {total} is out of range")]
    BadPart { index: u32, total: u32 },
    #[error("older than the snapshot already held")]
    Stale,
    #[error("records refused: {0}")]
    Invalid(String),
}

/// A message to send to one peer. Snapshot parts are encoded once and
/// shared between all peers.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    pub to: PublicKey,
    pub payload: Arc<[u8]>,
}

/// One peer as membership describes it.
#[derive(Debug, Clone, PartialEq)]
struct Member {
    name: String,
    subnet: Ipv4Net,
}

/// What this agent knows of one peer's records.
#[derive(Debug)]
struct Remote {
    /// The snapshot in force, with when it was first accepted (its
    /// precedence in the zone) and last confirmed.
    held: Option<Held>,
    /// A newer snapshot being assembled.
    pending: Option<Pending>,
    /// A snapshot stamp refused whole: its other parts are ignored.
    refused: Option<Stamp>,
    tokens: f64,
    refilled: Instant,
    last_resend: Option<Instant>,
    last_request: Option<Instant>,
}

#[derive(Debug)]
struct Held {
    stamp: Stamp,
    records: Arc<HostRecords>,
    order: u64,
    last_heard: Instant,
}

#[derive(Debug)]
struct Pending {
    stamp: Stamp,
    parts: Vec<Option<Vec<ContainerRecord>>>,
    containers: usize,
}

pub struct RecordsSync {
    domain: String,
    withdraw_after: Duration,
    local: Arc<HostRecords>,
    stamp: Stamp,
    parts: Vec<Arc<[u8]>>,
    members: HashMap<PublicKey, Member>,
    remotes: HashMap<PublicKey, Remote>,
    outbox: VecDeque<Transmit>,
    next_heartbeat: Instant,
    next_order: u64,
    changed: bool,
    /// Records from the membership store, when there is one.
    store: store::FromStore,
}

impl RecordsSync {
    /// `epoch` is the agent's start time in Unix milliseconds (see `Stamp`).
    /// A reload changed how long a silent host keeps its records; the next
    /// `handle_timeout` applies it.
    pub fn set_withdraw_after(&mut self, withdraw_after: Duration) {
        self.withdraw_after = withdraw_after;
    }

    pub fn new(
        domain: &str,
        withdraw_after: Duration,
        local: HostRecords,
        epoch: u64,
        now: Instant,
    ) -> Self {
        let stamp = Stamp { epoch, version: 1 };
        let parts = encode_snapshot(stamp, &local.containers);
        Self {
            domain: domain.to_owned(),
            withdraw_after,
            local: Arc::new(local),
            stamp,
            parts,
            members: HashMap::new(),
            remotes: HashMap::new(),
            outbox: VecDeque::new(),
            next_heartbeat: now,
            next_order: 0,
            changed: true,
            store: store::FromStore::default(),
        }
    }

    /// This host publishes `records` now: every peer gets the new snapshot.
    pub fn set_local(&mut self, records: HostRecords) {
        if *self.local == records {
            return;
        }
        self.stamp.version += 1;
        self.parts = encode_snapshot(self.stamp, &records.containers);
        self.local = Arc::new(records);
        self.changed = true;
        let peers: Vec<PublicKey> = self.members.keys().copied().collect();
        for peer in peers {
            self.queue_snapshot(peer);
        }
    }

    /// The peer set changed: a peer that left (or moved to another subnet)
    /// loses its records at once; a new one gets our snapshot.
    pub fn set_members(&mut self, membership: &Membership, now: Instant) {
        let wanted: HashMap<PublicKey, Member> = membership
            .peers
            .iter()
            .map(|p| {
                let member = Member {
                    name: p.name.clone(),
                    subnet: p.subnet,
                };
                (p.public_key, member)
            })
            .collect();
        // A peer whose name or subnet changed starts over too: its held
        // records were checked against the old subnet.
        let before = self.remotes.len();
        let members = &self.members;
        self.remotes
            .retain(|key, _| wanted.get(key).is_some_and(|w| members.get(key) == Some(w)));
        if self.remotes.len() != before {
            self.changed = true;
        }
        let new: Vec<PublicKey> = wanted
            .iter()
            .filter(|(k, w)| self.members.get(k) != Some(w))
            .map(|(k, _)| *k)
            .collect();
        self.members = wanted;
        for peer in new {
            self.queue_snapshot(peer);
            self.remote(peer, now);
        }
        self.store_members_changed();
    }

    /// A message the node decrypted from `from`'s session.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: PublicKey,
        bytes: &[u8],
    ) -> Result<(), SyncReject> {
        let Some(member) = self.members.get(&from).cloned() else {
            return Err(SyncReject::UnknownPeer);
        };
        if bytes.len() > MAX_MESSAGE {
            return Err(SyncReject::Oversized);
        }
        let remote = self.remote(from, now);
        if !remote.take_token(now) {
            return Err(SyncReject::RateLimited);
        }
        let message: Message = serde_json::from_slice(bytes).map_err(|_| SyncReject::Malformed)?;
        match message {
            Message::Heartbeat { stamp } => {
                self.heartbeat(now, from, stamp);
                Ok(())
            }
            Message::Request => {
                self.resend(now, from);
                Ok(())
            }
            Message::Part {
                stamp,
                index,
                total,
                containers,
            } => self.part(now, from, &member, stamp, (index, total), containers),
        }
    }

    /// Sends heartbeats and withdraws silent peers' records when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + HEARTBEAT;
            let beat: Arc<[u8]> = encode(&Message::Heartbeat { stamp: self.stamp }).into();
            for &to in self.members.keys() {
                self.outbox.push_back(Transmit {
                    to,
                    payload: beat.clone(),
                });
            }
        }
        for (key, remote) in &mut self.remotes {
            let silent = remote.held.as_ref().is_some_and(|h| {
                now.saturating_duration_since(h.last_heard) >= self.withdraw_after
            });
            if silent {
                let name = self.members.get(key).map_or("?", |m| m.name.as_str());
                tracing::info!(host = %name, "no word from host: its DNS records are withdrawn");
                // A fresh start: whatever stamp it sends next is taken (an
                // agent restarted with its clock set back recovers here).
                remote.held = None;
                remote.pending = None;
                remote.refused = None;
                self.changed = true;
            }
        }
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Instant {
        let withdrawals = self
            .remotes
            .values()
            .filter_map(|r| r.held.as_ref())
            .map(|h| h.last_heard + self.withdraw_after);
        withdrawals
            .chain(std::iter::once(self.next_heartbeat))
            .min()
            .unwrap_or(self.next_heartbeat)
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// Whether the zone's inputs changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Every host's records in zone precedence: this host first, then the
    /// others in the order their records were first accepted. A host the
    /// store serves is taken from the store, not the mesh.
    pub fn hosts(&self) -> Vec<Arc<HostRecords>> {
        let mesh = self
            .remotes
            .iter()
            .filter(|(key, _)| {
                self.members
                    .get(*key)
                    .is_none_or(|m| !self.store.serves(&m.name))
            })
            .filter_map(|(_, r)| r.held.as_ref())
            .map(|h| (h.order, &h.records));
        let stored = self.store.held().map(|h| (h.order, h.records()));
        let mut held: Vec<(u64, &Arc<HostRecords>)> = mesh.chain(stored).collect();
        held.sort_by_key(|(order, _)| *order);
        std::iter::once(self.local.clone())
            .chain(held.into_iter().map(|(_, r)| r.clone()))
            .collect()
    }

    fn remote(&mut self, key: PublicKey, now: Instant) -> &mut Remote {
        self.remotes.entry(key).or_insert_with(|| Remote {
            held: None,
            pending: None,
            refused: None,
            tokens: MESSAGES_PER_SECOND,
            refilled: now,
            last_resend: None,
            last_request: None,
        })
    }

    fn heartbeat(&mut self, now: Instant, from: PublicKey, stamp: Stamp) {
        let remote = self.remote(from, now);
        let held = remote.held.as_ref().map(|h| h.stamp);
        if held == Some(stamp) {
            if let Some(h) = remote.held.as_mut() {
                h.last_heard = now;
            }
            return;
        }
        // An older stamp is a stale or reordered heartbeat: it neither
        // refreshes the records nor asks for anything.
        let newer = held.is_none_or(|h| stamp > h) && remote.refused != Some(stamp);
        let asked_lately = remote
            .last_request
            .is_some_and(|t| now.saturating_duration_since(t) < RESEND_INTERVAL);
        if newer && !asked_lately {
            remote.last_request = Some(now);
            self.outbox.push_back(Transmit {
                to: from,
                payload: encode(&Message::Request).into(),
            });
        }
    }

    fn resend(&mut self, now: Instant, to: PublicKey) {
        let remote = self.remote(to, now);
        if remote
            .last_resend
            .is_some_and(|t| now.saturating_duration_since(t) < RESEND_INTERVAL)
        {
            return;
        }
        remote.last_resend = Some(now);
        self.queue_snapshot(to);
    }

    fn queue_snapshot(&mut self, to: PublicKey) {
        if self.outbox.len() + self.parts.len() > MAX_QUEUED {
            // The peer's next heartbeat shows it behind; it asks again.
            return;
        }
        for part in &self.parts {
            self.outbox.push_back(Transmit {
                to,
                payload: part.clone(),
            });
        }
    }

    fn part(
        &mut self,
        now: Instant,
        from: PublicKey,
        member: &Member,
        stamp: Stamp,
        (index, total): (u32, u32),
        containers: Vec<ContainerRecord>,
    ) -> Result<(), SyncReject> {
        if total == 0 || total > MAX_PARTS || index >= total {
            return Err(SyncReject::BadPart { index, total });
        }
        match self
            .remote(from, now)
            .accept_part(now, stamp, index, total, containers)
        {
            PartOutcome::Kept => Ok(()),
            PartOutcome::Complete => self.complete(now, from, member),
            PartOutcome::Stale => Err(SyncReject::Stale),
            PartOutcome::Inconsistent => Err(SyncReject::BadPart { index, total }),
            PartOutcome::TooManyContainers => Err(self.refuse(
                from,
                stamp,
                "more than the containers a host may publish".into(),
            )),
        }
    }

    /// All parts of the pending snapshot are in: validate and hold it.
    fn complete(
        &mut self,
        now: Instant,
        from: PublicKey,
        member: &Member,
    ) -> Result<(), SyncReject> {
        let Some(remote) = self.remotes.get_mut(&from) else {
            return Ok(());
        };
        let Some(pending) = remote.pending.take() else {
            return Ok(());
        };
        let records = HostRecords {
            host: member.name.clone(),
            address: host_address(member.subnet),
            containers: pending.parts.into_iter().flatten().flatten().collect(),
        };
        if let Err(e) = records.validate(&self.domain, member.subnet) {
            return Err(self.refuse(from, pending.stamp, e.to_string()));
        }
        let same = remote.held.as_ref().is_some_and(|h| *h.records == records);
        let order = match &remote.held {
            Some(h) => h.order,
            None => {
                self.next_order += 1;
                self.next_order
            }
        };
        remote.held = Some(Held {
            stamp: pending.stamp,
            records: Arc::new(records),
            order,
            last_heard: now,
        });
        self.changed |= !same;
        Ok(())
    }

    fn refuse(&mut self, from: PublicKey, stamp: Stamp, reason: String) -> SyncReject {
        if let Some(remote) = self.remotes.get_mut(&from) {
            remote.pending = None;
            remote.refused = Some(stamp);
        }
        let name = self.members.get(&from).map_or("?", |m| m.name.as_str());
        tracing::warn!(peer = %name, %reason, "refused DNS records from peer");
        SyncReject::Invalid(reason)
    }
}

/// What one part did to a peer's pending snapshot.
enum PartOutcome {
    Kept,
    Complete,
    Stale,
    Inconsistent,
    TooManyContainers,
}

impl Remote {
    fn accept_part(
        &mut self,
        now: Instant,
        stamp: Stamp,
        index: u32,
        total: u32,
        containers: Vec<ContainerRecord>,
    ) -> PartOutcome {
        if self.refused == Some(stamp) {
            return PartOutcome::Stale;
        }
        if let Some(held) = self.held.as_mut() {
            if stamp == held.stamp {
                held.last_heard = now;
                return PartOutcome::Kept;
            }
            if stamp < held.stamp {
                return PartOutcome::Stale;
            }
        }
        let pending = match &mut self.pending {
            Some(p) if p.stamp == stamp => p,
            Some(p) if p.stamp > stamp => return PartOutcome::Stale,
            slot => slot.insert(Pending {
                stamp,
                parts: vec![None; total as usize],
                containers: 0,
            }),
        };
        if pending.parts.len() != total as usize {
            return PartOutcome::Inconsistent;
        }
        let Some(slot) = pending.parts.get_mut(index as usize) else {
            return PartOutcome::Inconsistent;
        };
        if slot.is_some() {
            return PartOutcome::Kept;
        }
        pending.containers += containers.len();
        if pending.containers > MAX_CONTAINERS_PER_HOST {
            return PartOutcome::TooManyContainers;
        }
        *slot = Some(containers);
        if pending.parts.iter().all(Option::is_some) {
            PartOutcome::Complete
        } else {
            PartOutcome::Kept
        }
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let refill =
            now.saturating_duration_since(self.refilled).as_secs_f64() * MESSAGES_PER_SECOND;
        self.tokens = (self.tokens + refill).min(MESSAGES_PER_SECOND);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Splits a snapshot into parts of at most `MAX_MESSAGE` bytes each.
pub fn encode_snapshot(stamp: Stamp, containers: &[ContainerRecord]) -> Vec<Arc<[u8]>> {
    let mut groups: Vec<Vec<ContainerRecord>> = vec![Vec::new()];
    for c in containers {
        let mut grown = groups.last().cloned().unwrap_or_default();
        grown.push(c.clone());
        let fits = part_len(stamp, &grown) <= MAX_MESSAGE;
        match groups.last_mut() {
            Some(last) if fits || last.is_empty() => *last = grown,
            _ => groups.push(vec![c.clone()]),
        }
    }
    let total = u32::try_from(groups.len()).unwrap_or(u32::MAX);
    groups
        .into_iter()
        .zip(0..)
        .map(|(containers, index)| {
            encode(&Message::Part {
                stamp,
                index,
                total,
                containers,
            })
            .into()
        })
        .collect()
}

/// The encoded length of a part holding `containers` (the largest index
/// and total, so a group that fits here fits wherever it lands).
fn part_len(stamp: Stamp, containers: &[ContainerRecord]) -> usize {
    encode(&Message::Part {
        stamp,
        index: MAX_PARTS,
        total: MAX_PARTS,
        containers: containers.to_vec(),
    })
    .len()
}

fn encode(message: &Message) -> Vec<u8> {
    // Serializing plain data to a Vec cannot fail.
    serde_json::to_vec(message).unwrap_or_default()
}

mod store;
pub use store::StoreRecords;

#[cfg(test)]
mod tests;
