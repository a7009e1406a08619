//! The L2 writer: one task owns every change to L2 and commits them in batches.
//!
//! Callers update L1 and record the write as *pending* before queueing it; the writer
//! drains whatever has queued, applies it as one batch, and only then clears the
//! pending records. A read that misses L1 consults the pending records before L2, so it
//! never sees an older L2 value while a newer write is queued.
//!
//! With a shared L2 (Redis) every write waits for its batch: it is answered only once
//! Redis stored it, or with the error when Redis did not. The writer never waits for
//! more writes then (group commit): it applies what has queued, answers everyone, and
//! what queued meanwhile is the next batch. A write Redis did not store is forgotten
//! from L1 before it is answered, so this node never serves a value no other node has.
//!
//! With the embedded L2 (redb) writes are write-behind: answered once L1 holds them,
//! committed in batches that wait up to `BATCH_WINDOW` for more. Commits are not
//! flushed to disk one by one: at least one durable commit per second (`DURABLE_EVERY`)
//! and none in between, so a power cut can lose the last second of cache writes.
//! redb's commit protocol never leaves a torn file: after a crash it holds the last
//! durable commit.
//!
//! Invalidations, barriers and clears travel through the same queue, so they apply
//! after every write queued before them. With redb, an invalidation lists the keys it
//! covers and is answered at once: until the writer has deleted them from L2 (its next
//! batch, as write-behind as any write) and evicted them from L1, reads treat every
//! version older than the invalidation as absent (`Shared::hidden`). A shared L2
//! deletes them before the answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::entry::now_ms;
use super::store::{CacheStore, StoreError, StoreOp};
use super::{Shared, Target};

pub(super) const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How long the writer keeps collecting write-behind writes after the first one queued,
/// unless `EARLY_COMMIT` writes queue up first. Nobody waits for it (reads see pending
/// writes), and in a B-tree with copy-on-write pages a few large commits cost far less
/// than many small ones: each commit copies every page it touches.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
const EARLY_COMMIT: i64 = 8 * 1024;
const POLL: Duration = Duration::from_millis(5);
/// Ops per transaction at most: bounds a commit's size and the time between commits.
const MAX_BATCH: usize = 64 * 1024;
/// Keys handled per step of a sweep.
const STEP: usize = 4096;
/// Expired keys the sweeper removes per tick at most, so it never monopolises the writer.
const SWEEP_PER_TICK: usize = 16 * 1024;

/// Answered once the batch holding a write was applied to a shared L2, or failed.
pub(super) type StoredReply = oneshot::Sender<Result<(), StoreError>>;

pub(super) enum Message {
    Write {
        seq: u64,
        op: StoreOp,
        budget: OwnedSemaphorePermit,
        /// `None`: write-behind (redb), nobody waits for it.
        stored: Option<StoredReply>,
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

/// A write in the batch being applied: its pending record to clear, and who waits.
struct Batched {
    seq: u64,
    key: Bytes,
    stored: Option<StoredReply>,
}

/// An invalidation's outcome: how many keys it covered, and those still to delete from
/// a write-behind L2.
struct Invalidated {
    count: usize,
    hidden: Vec<Bytes>,
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
            let mut batched = Vec::new();
            for message in messages.drain(..) {
                match message {
                    // The budget goes back as the write joins a batch: memory stays
                    // bounded by the budget plus one batch (MAX_BATCH writes).
                    Message::Write {
                        seq,
                        op,
                        budget,
                        stored,
                    } => {
                        batched.push(Batched {
                            seq,
                            key: op_key(&op).clone(),
                            stored,
                        });
                        ops.push(op);
                        drop(budget);
                    }
                    other => {
                        self.shared
                            .controls_queued
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        let ops = last_write_per_key(std::mem::take(&mut ops));
                        self.commit(ops, std::mem::take(&mut batched), &mut durability, false)
                            .await;
                        if let Message::Close { reply } = other {
                            self.commit(Vec::new(), Vec::new(), &mut durability, true)
                                .await;
                            let _ = reply.send(());
                            return;
                        }
                        self.control(other, &mut durability).await;
                    }
                }
            }
            let ops = last_write_per_key(ops);
            self.commit(ops, batched, &mut durability, false).await;
            self.shared.metrics.l2_queue_ops.set(self.shared.queued());
        }
    }

    /// Takes everything queued. While nobody waits for what is here (write-behind
    /// writes only), it first lets writes accumulate for `BATCH_WINDOW`, unless a control
    /// message arrives; sleeping rather than listening means senders do not wake the
    /// writer once per write. Someone waits for every write to a shared store: those go
    /// at once, and what queues while they are applied forms the next batch.
    async fn fill(&mut self, messages: &mut Vec<Message>) {
        if messages
            .iter()
            .all(|message| matches!(message, Message::Write { stored: None, .. }))
            && messages.len() < MAX_BATCH
        {
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
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

    /// Applies a batch, then forgets the pending records it covered and answers whoever
    /// waits for its writes. The commit is durable when asked, or when the last durable
    /// one is `DURABLE_EVERY` old.
    async fn commit(
        &self,
        ops: Vec<StoreOp>,
        batched: Vec<Batched>,
        durability: &mut FlushState,
        force: bool,
    ) {
        let durable = force || durability.last_durable.elapsed() >= DURABLE_EVERY;
        if ops.is_empty() && !durable {
            return;
        }
        let count = batched.len();
        let outcome = self.store.apply(ops, durable).await;
        match &outcome {
            Ok(()) if durable => self.shared.metrics.l2_durable_commits.inc(),
            Ok(()) => {}
            Err(error) => {
                self.shared.metrics.l2_errors.inc();
                tracing::error!(%error, count, "cache L2 batch failed");
                if self.store.is_shared() {
                    // Its writers get the error: L1 must not keep serving what no other
                    // node can read.
                    self.forget(&batched).await;
                }
                // Write-behind (redb): the writes stay in L1; L2 misses them until they
                // are written again.
            }
        }
        if durable {
            durability.last_durable = Instant::now();
            durability.dirty = false;
        } else {
            durability.dirty = true;
        }
        for write in batched {
            self.shared.pending.clear(&write.key, write.seq);
            if let Some(stored) = write.stored {
                let _ = stored.send(outcome.clone());
            }
        }
        self.shared
            .queued_ops
            .fetch_sub(count as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops failed writes from L1 and from the pending records, each only if no newer
    /// write to its key replaced it meanwhile. Under the key's lock, so a miss cannot
    /// read the pending record after L1 forgot the write.
    async fn forget(&self, batched: &[Batched]) {
        for write in batched {
            let _guard = self.shared.stripe(&write.key).lock().await;
            self.shared
                .l1
                .remove_if(&write.key, |stored| stored.seq == write.seq);
            self.shared.pending.clear(&write.key, write.seq);
        }
    }

    async fn control(&self, message: Message, durability: &mut FlushState) {
        match message {
            Message::Invalidate { target, seq, reply } => {
                match self.invalidate(target, seq).await {
                    Ok(Invalidated { count, hidden }) => {
                        let _ = reply.send(Ok(count));
                        self.delete_hidden(hidden, seq, durability).await;
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
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

    /// Takes what `target` covers out of both layers; writes newer than `seq` survive.
    /// A write-behind L2 lists the keys, which are hidden from then on and deleted after
    /// the answer (`hidden`); otherwise L2 deletes them first, in one step.
    async fn invalidate(&self, target: Target, seq: u64) -> Result<Invalidated, StoreError> {
        let started = Instant::now();
        if let Some(keys) = self.store.covered_keys(&target).await? {
            self.shared.start_hiding(target, seq);
            tracing::debug!(
                keys = keys.len(),
                list_ms = started.elapsed().as_millis() as u64,
                "invalidated; deletes follow"
            );
            return Ok(Invalidated {
                count: keys.len(),
                hidden: keys,
            });
        }
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
        Ok(Invalidated {
            count: keys.len(),
            hidden: Vec::new(),
        })
    }

    async fn evict_l1(&self, keys: &[Bytes], seq: u64) {
        for key in keys {
            // Under the key's lock, so a concurrent miss cannot promote the old value
            // back from a read of L2 it made before the delete.
            let _guard = self.shared.stripe(key).lock().await;
            self.shared.l1.remove_if(key, |stored| stored.seq <= seq);
        }
    }

    /// Deletes an answered invalidation's keys from L2 in batches and evicts them
    /// from L1, then stops hiding them.
    async fn delete_hidden(&self, keys: Vec<Bytes>, seq: u64, durability: &mut FlushState) {
        for chunk in keys.chunks(MAX_BATCH) {
            let ops = chunk
                .iter()
                .map(|key| StoreOp::Delete { key: key.clone() })
                .collect();
            self.commit(ops, Vec::new(), durability, false).await;
        }
        self.evict_l1(&keys, seq).await;
        self.shared.stop_hiding();
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::super::entry::{Entry, now_ms};
    use super::super::glob::Pattern;
    use super::super::store::{CacheStore, StoreError, StoreOp};
    use super::super::{Cache, CacheError, CacheMetrics, Limits, Mutation, Target, queue_units};
    use super::op_key;

    /// An L2 whose `apply` reports each batch's keys and waits for the test to decide
    /// its outcome, so a test holds a batch "in flight" as long as it likes.
    struct GatedStore {
        shared: bool,
        entries: std::sync::Mutex<HashMap<Bytes, Entry>>,
        applying: mpsc::UnboundedSender<Vec<Bytes>>,
        outcomes: tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<(), StoreError>>>,
    }

    /// The test's side of a `GatedStore`.
    struct Gate {
        applying: mpsc::UnboundedReceiver<Vec<Bytes>>,
        outcomes: mpsc::UnboundedSender<Result<(), StoreError>>,
    }

    impl Gate {
        /// The keys of the next batch the writer applies.
        async fn next_batch(&mut self) -> Vec<Bytes> {
            tokio::time::timeout(Duration::from_secs(10), self.applying.recv())
                .await
                .expect("a batch within 10 s")
                .expect("the writer runs")
        }

        fn answer(&self, outcome: Result<(), StoreError>) {
            self.outcomes.send(outcome).unwrap();
        }
    }

    fn gated(shared: bool) -> (Cache, Gate) {
        let (applying_sender, applying) = mpsc::unbounded_channel();
        let (outcomes, outcomes_receiver) = mpsc::unbounded_channel();
        let store = GatedStore {
            shared,
            entries: Default::default(),
            applying: applying_sender,
            outcomes: tokio::sync::Mutex::new(outcomes_receiver),
        };
        let cache = Cache::new(
            1 << 20,
            Some(std::sync::Arc::new(store)),
            Limits {
                max_key_bytes: 1024,
                max_value_bytes: 1024,
            },
            CacheMetrics::new(&prometheus::Registry::new()),
        );
        (cache, Gate { applying, outcomes })
    }

    #[async_trait]
    impl CacheStore for GatedStore {
        fn kind(&self) -> &'static str {
            "gated"
        }

        fn is_shared(&self) -> bool {
            self.shared
        }

        async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
            Ok(self.entries.lock().unwrap().get(key).cloned())
        }

        async fn apply(&self, batch: Vec<StoreOp>, _durable: bool) -> Result<(), StoreError> {
            if batch.is_empty() {
                return Ok(());
            }
            let _ = self
                .applying
                .send(batch.iter().map(|op| op_key(op).clone()).collect());
            let outcome = self
                .outcomes
                .lock()
                .await
                .recv()
                .await
                .unwrap_or_else(|| Err(StoreError("the test is over".to_owned())));
            if outcome.is_ok() {
                let mut entries = self.entries.lock().unwrap();
                for op in batch {
                    match op {
                        StoreOp::Put { key, entry } => entries.insert(key, entry),
                        StoreOp::Delete { key } => entries.remove(&key),
                    };
                }
            }
            outcome
        }

        async fn keys_matching(
            &self,
            _pattern: &Pattern,
            _now_ms: u64,
            _limit: usize,
        ) -> Result<Vec<Bytes>, StoreError> {
            unreachable!("not used by these tests")
        }

        async fn delete_matching(&self, _pattern: &Pattern) -> Result<Vec<Bytes>, StoreError> {
            unreachable!("not used by these tests")
        }

        async fn delete_tagged(&self, _tags: &[String]) -> Result<Vec<Bytes>, StoreError> {
            unreachable!("not used by these tests")
        }

        async fn covered_keys(&self, target: &Target) -> Result<Option<Vec<Bytes>>, StoreError> {
            if self.shared {
                return Ok(None);
            }
            let entries = self.entries.lock().unwrap();
            let mut keys: Vec<Bytes> = entries
                .iter()
                .filter(|(key, entry)| target.covers(key, entry))
                .map(|(key, _)| key.clone())
                .collect();
            keys.sort();
            Ok(Some(keys))
        }

        async fn scan(
            &self,
            _after: Option<&[u8]>,
            _count: usize,
        ) -> Result<(Vec<Bytes>, bool), StoreError> {
            unreachable!("not used by these tests")
        }

        async fn expired(&self, _now_ms: u64, _limit: usize) -> Result<Vec<Bytes>, StoreError> {
            Ok(Vec::new())
        }

        async fn key_count(&self) -> Result<u64, StoreError> {
            Ok(self.entries.lock().unwrap().len() as u64)
        }

        async fn clear(&self) -> Result<(), StoreError> {
            unreachable!("not used by these tests")
        }
    }

    fn entry(value: &'static str) -> Entry {
        Entry::new(Bytes::from_static(value.as_bytes()))
    }

    async fn read(cache: &Cache, key: &[u8]) -> Option<Bytes> {
        cache.get(key).await.unwrap().map(|entry| entry.value)
    }

    /// Until `key` reads `value` (from L1: the write was issued).
    async fn issued(cache: &Cache, key: &[u8], value: &'static str) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while read(cache, key).await.as_deref() != Some(value.as_bytes()) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the write was issued within 10 s");
    }

    fn tagged(value: &'static str, tag: &str) -> Entry {
        Entry {
            tags: Some(vec![tag.to_owned()].into()),
            ..entry(value)
        }
    }

    /// Answers batches until every one of `keys` was in one.
    async fn store_all(gate: &mut Gate, keys: &[&[u8]]) {
        let mut seen = Vec::new();
        while !keys
            .iter()
            .all(|key| seen.iter().any(|seen: &Bytes| seen == key))
        {
            seen.extend(gate.next_batch().await);
            gate.answer(Ok(()));
        }
    }

    /// A `set` on a task of its own, so the test can hold its batch in the gate.
    fn spawn_set(
        cache: &Cache,
        key: &'static [u8],
        value: &'static str,
    ) -> tokio::task::JoinHandle<Result<(), CacheError>> {
        let cache = cache.clone();
        tokio::spawn(async move { cache.set(key, entry(value)).await })
    }

    fn failure() -> Result<(), StoreError> {
        Err(StoreError("redis: connection refused".to_owned()))
    }

    #[tokio::test]
    async fn a_shared_store_answers_a_write_once_stored_and_forgets_a_failed_one() {
        let (cache, mut gate) = gated(true);
        let set = spawn_set(&cache, b"k", "one");
        assert_eq!(gate.next_batch().await, vec![Bytes::from_static(b"k")]);
        assert!(!set.is_finished(), "answered before L2 stored it");
        gate.answer(Ok(()));
        set.await.unwrap().unwrap();

        let failing = spawn_set(&cache, b"k", "two");
        gate.next_batch().await;
        gate.answer(failure());
        assert!(matches!(
            failing.await.unwrap(),
            Err(CacheError::Unavailable(_))
        ));
        // Forgotten from L1: the read goes to L2, which still has the stored value.
        assert_eq!(read(&cache, b"k").await.as_deref(), Some(&b"one"[..]));
    }

    /// A failed write undoes only itself: a newer write to the same key, made while the
    /// failing batch was in flight, stays in L1 and is stored by the next batch, which
    /// takes every write that queued meanwhile (group commit).
    #[tokio::test]
    async fn a_failed_write_spares_a_newer_one_and_the_next_batch_takes_all_queued() {
        let (cache, mut gate) = gated(true);
        let failing = spawn_set(&cache, b"k", "old");
        assert_eq!(gate.next_batch().await, vec![Bytes::from_static(b"k")]);
        let mut waiting = Vec::new();
        for (key, value) in [(&b"k"[..], "new"), (b"a", "a"), (b"b", "b")] {
            waiting.push(spawn_set(&cache, key, value));
            issued(&cache, key, value).await;
        }
        gate.answer(failure());
        assert!(failing.await.unwrap().is_err());
        assert_eq!(read(&cache, b"k").await.as_deref(), Some(&b"new"[..]));

        let mut next = gate.next_batch().await;
        next.sort();
        assert_eq!(next, [&b"a"[..], b"b", b"k"]);
        gate.answer(Ok(()));
        for set in waiting {
            set.await.unwrap().unwrap();
        }
        assert_eq!(read(&cache, b"k").await.as_deref(), Some(&b"new"[..]));
    }

    /// A pipelined handle issues writes without waiting; their answers come together.
    #[tokio::test]
    async fn a_pipelined_handle_leaves_the_wait_to_its_caller() {
        let (cache, mut gate) = gated(true);
        let pipeline = cache.pipelined();
        pipeline.set(b"a", entry("a")).await.unwrap();
        pipeline.set(b"b", entry("b")).await.unwrap();
        let writes = pipeline.take_unconfirmed();
        assert!(!writes.is_empty());
        assert!(pipeline.take_unconfirmed().is_empty());
        let confirmed = tokio::spawn(writes.confirmed());
        let mut keys = gate.next_batch().await;
        gate.answer(Ok(()));
        // The writer may have taken the first write before the second was issued.
        if keys.len() < 2 {
            keys.extend(gate.next_batch().await);
            gate.answer(Ok(()));
        }
        confirmed.await.unwrap().unwrap();
    }

    /// With the embedded store an invalidation is answered before its deletes reach
    /// L2. Meanwhile the old versions read as absent from both layers, and a write made
    /// after the invalidation survives it.
    #[tokio::test]
    async fn an_embedded_store_answers_an_invalidation_first_and_hides_its_keys_meanwhile() {
        let (cache, mut gate) = gated(false);
        cache.set(b"t:1", tagged("old", "t")).await.unwrap();
        cache.set(b"t:2", tagged("old", "t")).await.unwrap();
        cache.set(b"u", entry("kept")).await.unwrap();
        store_all(&mut gate, &[b"t:1", b"t:2", b"u"]).await;

        let invalidated = cache.invalidate(Target::Tags(vec!["t".to_owned()]));
        let invalidated = tokio::time::timeout(Duration::from_secs(10), invalidated)
            .await
            .expect("answered while its deletes wait in the gate");
        assert_eq!(invalidated.unwrap(), 2);
        assert_eq!(
            gate.next_batch().await,
            [&b"t:1"[..], b"t:2"],
            "the deletes are the next batch"
        );
        // L1 and L2 both still hold the old versions.
        assert_eq!(read(&cache, b"t:1").await, None);
        assert_eq!(read(&cache, b"t:2").await, None);
        assert_eq!(read(&cache, b"u").await.as_deref(), Some(&b"kept"[..]));
        cache.set(b"t:1", tagged("new", "t")).await.unwrap();
        assert_eq!(read(&cache, b"t:1").await.as_deref(), Some(&b"new"[..]));

        gate.answer(Ok(()));
        store_all(&mut gate, &[b"t:1"]).await;
        assert_eq!(
            cache.key_count().await.unwrap(),
            2,
            "L2 holds t:1 (new) and u"
        );
        assert_eq!(read(&cache, b"t:1").await.as_deref(), Some(&b"new"[..]));
        assert_eq!(read(&cache, b"t:2").await, None);
    }

    /// A read that took an L1 entry just before an invalidation ran its whole course
    /// (answered, keys deleted and evicted, hiding over) does not serve that entry: by
    /// the time it checks, no hiding covers it, so it must notice the generation moved.
    #[tokio::test]
    async fn a_read_overtaken_by_a_whole_invalidation_does_not_serve_the_old_version() {
        let (cache, mut gate) = gated(false);
        cache.set(b"t:1", tagged("old", "t")).await.unwrap();
        store_all(&mut gate, &[b"t:1"]).await;
        let shared = &cache.inner.shared;
        let seen = shared.hiding_generation();
        let stored = shared.l1.get(&b"t:1"[..]).expect("in L1");

        let invalidated = cache.invalidate(Target::Tags(vec!["t".to_owned()]));
        assert_eq!(invalidated.await.unwrap(), 1);
        store_all(&mut gate, &[b"t:1"]).await;
        cache.barrier().await.unwrap();
        assert_eq!(shared.hiding_generation(), seen + 2, "the hiding is over");

        let answer = cache.live_l1(b"t:1", stored, seen, now_ms());
        assert!(
            !matches!(answer, Some(Some(_))),
            "served the invalidated version: {answer:?}"
        );
        assert_eq!(read(&cache, b"t:1").await, None);
    }

    /// A read-modify-write holds L2 queue room for the value it decided on (an APPEND
    /// that grows a value, a SET NX of a large one), not only for its key; when the
    /// queue has no room, it waits outside the key's lock and decides again.
    #[tokio::test]
    async fn a_read_modify_write_reserves_queue_room_for_the_value_it_decided_on() {
        let (cache, mut gate) = gated(false);
        cache.set(b"first", entry("x")).await.unwrap();
        assert_eq!(gate.next_batch().await, [&b"first"[..]]);
        // The writer waits in the gate: later writes stay queued, holding their room.
        let budget = cache.inner.budget.clone();
        let room = budget.available_permits();
        let value = Bytes::from(vec![b'v'; 1000]);
        let stored = |_: Option<&Entry>| Mutation::Put(Entry::new(value.clone()), ());
        cache.mutate(b"k", stored).await.unwrap();
        let held = queue_units(b"k".len() + 1000) as usize;
        assert_eq!(room - budget.available_permits(), held);

        // Room for the key alone, not for the value: the write waits for room.
        let hog = budget
            .clone()
            .try_acquire_many_owned((budget.available_permits() - 3) as u32)
            .unwrap();
        let decided = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiting = tokio::spawn({
            let (cache, decided, value) = (cache.clone(), decided.clone(), value.clone());
            async move {
                cache
                    .mutate(b"j", |_| {
                        decided.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Mutation::Put(Entry::new(value.clone()), ())
                    })
                    .await
            }
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while decided.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("decided once within 10 s");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "queued past the budget");
        assert_eq!(
            read(&cache, b"j").await,
            None,
            "nothing stored while it waits"
        );
        drop(hog);
        waiting.await.unwrap().unwrap();
        assert_eq!(decided.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(read(&cache, b"j").await, Some(value));

        gate.answer(Ok(()));
        store_all(&mut gate, &[b"k", b"j"]).await;
    }

    /// The embedded store stays write-behind: a write is answered while its batch has
    /// not even been applied.
    #[tokio::test]
    async fn an_embedded_store_answers_writes_before_they_are_stored() {
        let (cache, mut gate) = gated(false);
        cache.set(b"k", entry("v")).await.unwrap();
        assert!(cache.pipelined().take_unconfirmed().is_empty());
        assert_eq!(gate.next_batch().await, vec![Bytes::from_static(b"k")]);
        gate.answer(Ok(()));
    }
}
