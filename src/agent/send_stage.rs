//! The send stage: writes what the core produced (sealed datagrams to the
//! underlay, opened packets to the device) on a thread of its own, while
//! the agent task reads and seals the next batch.
//!
//! Every write is a system call that does the kernel's share of the work
//! in the caller's time: copying into socket buffers, segmenting and
//! checksumming, and delivering a packet written to the device up through
//! the receiving TCP stack. On a host with a spare core that share runs
//! beside the crypto instead of after it. A small batch handed over while
//! the stage has nothing in hand is written at once on the agent's own
//! thread: a lone ping or ACK should not pay for waking another thread.
//!
//! Must never: reorder (batches are written whole, one at a time, in the
//! order they were handed over, and the agent writes itself only when the
//! stage holds nothing), look into a packet, or hold more than `POOL`
//! batches (the agent waits for one to come back instead).

use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::device_io::DeviceWriter;
use super::underlay::UnderlaySender;
use crate::core::Outbox;

/// Batches in circulation: one the agent fills, the rest with the stage.
const POOL: usize = 3;
/// Datagrams and packets in a batch small enough to write on the agent's
/// thread when the stage is idle.
const INLINE_MAX: usize = 4;
/// Cores a host needs before the stage gets a thread by default. The
/// thread pays only where a core would otherwise idle: on two vCPUs shared
/// by both ends of the netns harness and iperf3 it cost 6-20 % of the
/// throughput and 10 % more CPU per GB (README, Performance), the handing
/// over added to work that had no free core to move to.
const THREAD_MIN_CORES: usize = 4;
/// Overrides whether the stage gets a thread ("0" or "1"): for measuring,
/// not a documented setting.
const THREAD_ENV: &str = "MESHNET_SEND_THREAD";

/// The writes themselves, shared by the stage's thread and the agent's
/// inline path; never both at once (see `SendStage::submit`).
struct Writer {
    udp: UnderlaySender,
    device: DeviceWriter,
}

impl Writer {
    /// Writes `out`; returns how many datagrams and packets failed.
    fn write(&mut self, out: &Outbox) -> u64 {
        let mut failed = 0;
        for run in out.network_runs(self.udp.run_limits()) {
            if let Err(e) = self.udp.send(run.to, run.contents, run.segment) {
                tracing::debug!(error = %e, to = %run.to, "send failed");
                failed += run.datagrams() as u64;
            }
        }
        failed + self.device.write_all(out.device())
    }
}

fn lock(writer: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
    // A panic while writing leaves nothing half-updated that matters: the
    // buffers are refilled from scratch on every write.
    writer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct SendStage {
    writer: Arc<Mutex<Writer>>,
    /// Batches to the thread; `None` without one (or once it is gone).
    jobs: Option<std_mpsc::Sender<Outbox>>,
    /// Written batches back from the thread, with their failed writes.
    done: mpsc::UnboundedReceiver<(Outbox, u64)>,
    spare: Vec<Outbox>,
    in_hand: usize,
    thread: Option<JoinHandle<()>>,
}

impl SendStage {
    /// A stage with a thread when the host has cores to spare for it.
    pub fn new(udp: UnderlaySender, device: DeviceWriter) -> Self {
        let threaded = match std::env::var(THREAD_ENV).as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            _ => std::thread::available_parallelism().is_ok_and(|n| n.get() >= THREAD_MIN_CORES),
        };
        let writer = Arc::new(Mutex::new(Writer { udp, device }));
        let (done_tx, done) = mpsc::unbounded_channel();
        let mut stage = Self {
            writer,
            jobs: None,
            done,
            spare: (1..POOL).map(|_| Outbox::default()).collect(),
            in_hand: 0,
            thread: None,
        };
        if threaded {
            let (jobs, rx) = std_mpsc::channel::<Outbox>();
            let writer = Arc::clone(&stage.writer);
            let spawned = std::thread::Builder::new()
                .name("meshd-send".into())
                .spawn(move || {
                    for mut out in rx {
                        let failed = lock(&writer).write(&out);
                        out.clear();
                        if done_tx.send((out, failed)).is_err() {
                            break;
                        }
                    }
                });
            match spawned {
                Ok(thread) => {
                    stage.jobs = Some(jobs);
                    stage.thread = Some(thread);
                }
                Err(e) => tracing::warn!(error = %e, "no send thread; writing on the agent's"),
            }
        }
        stage
    }

    /// Whether writes run on a thread of their own.
    pub fn threaded(&self) -> bool {
        self.jobs.is_some()
    }

    /// Writes everything in `out`, now or on the stage's thread, and leaves
    /// an empty batch in its place. Returns the failed writes of the
    /// batches finished since the last call (each a counted drop).
    pub async fn submit(&mut self, out: &mut Outbox) -> u64 {
        let mut failed = self.collect();
        let small = out.network().len() + out.device().len() <= INLINE_MAX;
        if self.jobs.is_none() || (small && self.in_hand == 0) {
            return failed + self.write_here(out).await;
        }
        let empty = match self.spare.pop() {
            Some(empty) => empty,
            None => {
                failed += self.wait_one().await;
                self.spare.pop().unwrap_or_default()
            }
        };
        let full = std::mem::replace(out, empty);
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(full),
            None => Err(std_mpsc::SendError(full)),
        };
        match sent {
            Ok(()) => self.in_hand += 1,
            Err(std_mpsc::SendError(mut full)) => {
                tracing::warn!("the send thread is gone; writing on the agent's");
                self.jobs = None;
                failed += self.write_here(&mut full).await;
                self.spare.push(full);
            }
        }
        failed
    }

    /// Writes `out` on this thread, after whatever the stage still holds.
    async fn write_here(&mut self, out: &mut Outbox) -> u64 {
        let mut failed = 0;
        while self.in_hand > 0 {
            failed += self.wait_one().await;
        }
        failed += lock(&self.writer).write(out);
        out.clear();
        failed
    }

    /// Takes back the batches the thread has finished, without waiting.
    fn collect(&mut self) -> u64 {
        let mut failed = 0;
        while let Ok((out, f)) = self.done.try_recv() {
            failed += self.take_back(out, f);
        }
        failed
    }

    /// Waits for the thread to finish one batch.
    async fn wait_one(&mut self) -> u64 {
        match self.done.recv().await {
            Some((out, failed)) => self.take_back(out, failed),
            // The thread ended with batches in hand: they are lost.
            None => {
                let lost = std::mem::take(&mut self.in_hand);
                for _ in 0..lost {
                    self.spare.push(Outbox::default());
                }
                0
            }
        }
    }

    /// A written batch back from the thread; returns its failed writes.
    fn take_back(&mut self, out: Outbox, failed: u64) -> u64 {
        self.spare.push(out);
        self.in_hand -= 1;
        failed
    }
}

impl Drop for SendStage {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
