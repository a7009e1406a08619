//! The L2 writer: one task owns every change to L2 and commits them in batches.
//!
//! Callers update L1 and record the write as *pending* before queueing it, and return
//! at once; the writer drains whatever has queued, applies it in one transaction, and
//! only then clears the pending records. A read that misses L1 consults the pending
//! records before L2, so it never sees an older L2 value while a newer write is queued.
//!
//! Commits are not flushed to disk one by one: at least one durable commit per second
//! (`DURABLE_EVERY`) and none in between, so a power cut can lose the last second of
//! cache writes. redb's
//! commit protocol never leaves a torn file: after a crash it holds the last durable
//! commit.
//!
//! Invalidations, barriers and clears travel through the same queue, so they apply
//! after every write queued before them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::entry::now_ms;
use super::store::{CacheStore, StoreError, StoreOp};
use super::{Shared, Target};

pub(super) const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How long the writer keeps collecting after the first queued write, unless
/// `EARLY_COMMIT` writes queue up first. Callers never wait for it (reads see pending
/// writes), and in a B-tree with copy-on-write pages a few large commits cost far less
/// than many small ones: each commit copies every page it touches.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// The window with a shared L2 (Redis): other nodes see a write, and drop their L1 copy
/// of the key, only once it is committed, so it waits one poll at most. Redis has no
/// copy-on-write pages to amortise; pipelining a batch is what it needs.
const SHARED_BATCH_WINDOW: Duration = POLL;
const EARLY_COMMIT: i64 = 8 * 1024;
const POLL: Duration = Duration::from_millis(5);
/// Ops per transaction at most: bounds a commit's size and the time between commits.
const MAX_BATCH: usize = 64 * 1024;
/// Keys handled per step of a sweep.
const STEP: usize = 4096;
/// Expired keys the sweeper removes per tick at most, so it never monopolises the writer.
const SWEEP_PER_TICK: usize = 16 * 1024;

pub(super) enum Message {
    Write {
        seq: u64,
        op: StoreOp,
        budget: OwnedSemaphorePermit,
    },
    Invalidate {
        target: Target,
        seq: u64,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// Answered once everything queued before it is committed.
    Barrier { reply: oneshot::Sender<()> },
    Clear {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Final durable commit, then the writer stops.
    Close { reply: oneshot::Sender<()> },
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) store: Arc<dyn CacheStore>,
    pub(super) inbox: mpsc::UnboundedReceiver<Message>,
}

/// When the last durable commit happened, and whether non-durable ones came after it.
struct FlushState {
    last_durable: Instant,
    dirty: bool,
}

impl Writer {
    pub(super) async fn run(mut self) {
        let mut durability = FlushState {
            last_durable: Instant::now(),
            dirty: false,
        };
        let mut ticker = tokio::time::interval(DURABLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut messages = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                received = self.inbox.recv_many(&mut messages, MAX_BATCH) => {
                    if received == 0 {
                        self.commit(Vec::new(), Vec::new(), &mut durability, true).await;
                        return;
                    }
                    self.fill(&mut messages).await;
                }
                _ = ticker.tick() => {
                    if durability.dirty {
                        self.commit(Vec::new(), Vec::new(), &mut durability, true).await;
                    }
                    self.sweep().await;
                    continue;
                }
            }
            let mut ops = Vec::new();
            let mut seqs = Vec::new();
            for message in messages.drain(..) {
                match message {
                    // The budget goes back as the write joins a batch: memory stays
                    // bounded by the budget plus one batch (MAX_BATCH writes).
                    Message::Write { seq, op, budget } => {
                        seqs.push((seq, op_key(&op).clone()));
                        ops.push(op);
                        drop(budget);
                    }
                    other => {
                        self.shared
                            .controls_queued
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        let ops = last_write_per_key(std::mem::take(&mut ops));
                        self.commit(ops, std::mem::take(&mut seqs), &mut durability, false)
                            .await;
                        if let Message::Close { reply } = other {
                            self.commit(Vec::new(), Vec::new(), &mut durability, true)
                                .await;
                            let _ = reply.send(());
                            return;
                        }
                        self.control(other).await;
                    }
                }
            }
            let ops = last_write_per_key(ops);
            self.commit(ops, seqs, &mut durability, false).await;
            self.shared.metrics.l2_queue_ops.set(self.shared.queued());
        }
    }

    /// Lets writes accumulate for `BATCH_WINDOW` (unless a control message, which
    /// someone waits for, is already here), then takes everything queued. Sleeping
    /// rather than listening means senders do not wake the writer once per write.
    async fn fill(&mut self, messages: &mut Vec<Message>) {
        if messages
            .iter()
            .all(|message| matches!(message, Message::Write { .. }))
            && messages.len() < MAX_BATCH
        {
            let window = if self.store.is_shared() {
                SHARED_BATCH_WINDOW
            } else {
                BATCH_WINDOW
            };
            let deadline = tokio::time::Instant::now() + window;
            while tokio::time::Instant::now() < deadline
                && self.shared.queued() < EARLY_COMMIT
                && self
                    .shared
                    .controls_queued
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0
            {
                tokio::time::sleep(POLL).await;
            }
        }
        while messages.len() < MAX_BATCH {
            match self.inbox.try_recv() {
                Ok(message) => messages.push(message),
                Err(_) => break,
            }
        }
    }

    /// Applies a batch, then forgets the pending records it covered. The commit is
    /// durable when asked, or when the last durable one is `DURABLE_EVERY` old.
    async fn commit(
        &self,
        ops: Vec<StoreOp>,
        seqs: Vec<(u64, Bytes)>,
        durability: &mut FlushState,
        force: bool,
    ) {
        let durable = force || durability.last_durable.elapsed() >= DURABLE_EVERY;
        if ops.is_empty() && !durable {
            return;
        }
        let count = seqs.len();
        match self.store.apply(ops, durable).await {
            Ok(()) if durable => self.shared.metrics.l2_durable_commits.inc(),
            Ok(()) => {}
            Err(error) => {
                // The writes stay in L1; L2 misses them until they are written again.
                self.shared.metrics.l2_errors.inc();
                tracing::error!(%error, count, "cache L2 batch failed");
            }
        }
        if durable {
            durability.last_durable = Instant::now();
            durability.dirty = false;
        } else {
            durability.dirty = true;
        }
        for (seq, key) in seqs {
            self.shared.pending.clear(&key, seq);
        }
        self.shared
            .queued_ops
            .fetch_sub(count as i64, std::sync::atomic::Ordering::Relaxed);
    }

    async fn control(&self, message: Message) {
        match message {
            Message::Invalidate { target, seq, reply } => {
                let _ = reply.send(self.invalidate(target, seq).await);
            }
            Message::Barrier { reply } => {
                let _ = reply.send(());
            }
            Message::Clear { reply } => {
                let outcome = self.store.clear().await;
                self.shared.l1.clear();
                let _ = reply.send(outcome);
            }
            Message::Write { .. } | Message::Close { .. } => unreachable!("handled by run"),
        }
    }

    /// Deletes matching keys from L2 in one transaction, then each from L1 unless L1
    /// holds a write newer than the invalidation.
    async fn invalidate(&self, target: Target, seq: u64) -> Result<usize, StoreError> {
        let started = Instant::now();
        let keys = match &target {
            Target::Pattern(pattern) => self.store.delete_matching(pattern).await?,
            Target::Tags(tags) => self.store.delete_tagged(tags).await?,
        };
        let l2_done = started.elapsed();
        self.evict_l1(&keys, seq).await;
        tracing::debug!(
            keys = keys.len(),
            l2_ms = l2_done.as_millis() as u64,
            l1_ms = (started.elapsed() - l2_done).as_millis() as u64,
            "invalidated"
        );
        Ok(keys.len())
    }

    async fn evict_l1(&self, keys: &[Bytes], seq: u64) {
        for key in keys {
            // Under the key's lock, so a concurrent miss cannot promote the old value
            // back from a read of L2 it made before the delete.
            let _guard = self.shared.stripe(key).lock().await;
            self.shared.l1.remove_if(key, |stored| stored.seq <= seq);
        }
    }

    /// Removes expired keys from L2 in bounded steps; readers never wait for it.
    async fn sweep(&self) {
        let mut swept = 0;
        while swept < SWEEP_PER_TICK {
            let now = now_ms();
            let keys = match self.store.expired(now, STEP).await {
                Ok(keys) => keys,
                Err(error) => {
                    tracing::warn!(%error, "cache sweep failed");
                    return;
                }
            };
            if keys.is_empty() {
                return;
            }
            let ops = keys
                .iter()
                .map(|key| StoreOp::Delete { key: key.clone() })
                .collect();
            if let Err(error) = self.store.apply(ops, false).await {
                tracing::warn!(%error, "cache sweep failed");
                return;
            }
            for key in &keys {
                let _guard = self.shared.stripe(key).lock().await;
                self.shared
                    .l1
                    .remove_if(key, |stored| stored.entry.is_expired(now));
            }
            swept += keys.len();
            if keys.len() < STEP {
                return;
            }
        }
    }
}

/// Only the last write to a key in a batch reaches L2: a hot key written a thousand times
/// between two commits costs one B-tree update.
fn last_write_per_key(ops: Vec<StoreOp>) -> Vec<StoreOp> {
    let mut last: std::collections::HashMap<&Bytes, usize, quick_cache::DefaultHashBuilder> =
        std::collections::HashMap::with_capacity_and_hasher(ops.len(), Default::default());
    for (index, op) in ops.iter().enumerate() {
        last.insert(op_key(op), index);
    }
    if last.len() == ops.len() {
        return ops;
    }
    let keep: Vec<bool> = (0..ops.len())
        .map(|index| last.get(op_key(&ops[index])) == Some(&index))
        .collect();
    ops.into_iter()
        .zip(keep)
        .filter_map(|(op, keep)| keep.then_some(op))
        .collect()
}

fn op_key(op: &StoreOp) -> &Bytes {
    match op {
        StoreOp::Put { key, .. } | StoreOp::Delete { key } => key,
    }
}
