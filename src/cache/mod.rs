//! The two-layer cache: L1 in process (`quick_cache`, bounded by bytes) over an optional
//! persistent L2 behind the `CacheStore` seam (redb embedded; Redis when scaled out).
//!
//! Reads go L1 → L2 and promote what L2 had. Writes update L1 and queue the L2 write for
//! the writer task (`writer.rs`), which commits in batches; until then the write is
//! *pending* and reads see it. With a shared L2 (Redis) a write is answered once Redis
//! stored it; with redb, at once (write-behind). Every write to a key happens under that
//! key's stripe lock, so read-modify-write commands (INCR, APPEND, SET NX...) are atomic.
//!
//! This module knows nothing of HTTP or RESP: `http/cache.rs` and `resp/` translate.

#[cfg(test)]
pub(crate) mod conformance;
mod entry;
mod glob;
mod l1;
pub mod loader;
mod metrics;
mod redb_store;
mod redis_store;
mod store;
pub mod warm;
mod writer;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use quick_cache::DefaultHashBuilder;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

pub use entry::{Entry, expires_in, now_ms};
pub use glob::Pattern;
pub use metrics::CacheMetrics;
pub use redb_store::RedbCacheStore;
pub use redis_store::RedisCacheStore;
pub use store::{CacheStore, RemoteInvalidation, StoreError, StoreOp};

use l1::{L1, Stored};
use writer::{Message, Writer};

/// Tags per entry, and bytes per tag, at most.
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_BYTES: usize = 1024;

/// Stripes of the per-key write lock: enough that unrelated keys rarely share one.
const STRIPES: usize = 1024;
const PENDING_SHARDS: usize = 64;
/// Bound on memory queued for the L2 writer, in `QUEUE_UNIT`s; writers wait
/// (backpressure) beyond it. 32 MiB: a tenth of a second of heavy writes.
const QUEUE_BUDGET_UNITS: u32 = 256 * 1024;
/// One unit of the queue budget in bytes; every queued write also pays one unit for
/// its own bookkeeping.
const QUEUE_UNIT: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("key is {len} bytes; the limit is {limit} (cache.max_key_bytes)")]
    KeyTooLarge { len: usize, limit: u64 },
    #[error("value is {len} bytes; the limit is {limit} (cache.max_value_bytes)")]
    ValueTooLarge { len: usize, limit: u64 },
    #[error("an entry may carry at most {MAX_TAGS} tags of at most {MAX_TAG_BYTES} bytes each")]
    TooManyTags,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shared L2 is known to be unreachable: writes and invalidations are refused
    /// rather than kept on this node only (reads still answer from L1).
    #[error("cache unavailable: {0}")]
    Unavailable(StoreError),
    #[error("the cache is shutting down")]
    Closed,
}

/// A write's answer from a shared L2: whether Redis stored it.
type Ack = oneshot::Receiver<Result<(), StoreError>>;

/// Writes issued through a `pipelined` handle that a shared L2 has not confirmed yet.
#[must_use = "the writes may not have been stored: wait for `confirmed`"]
#[derive(Default)]
pub struct Unconfirmed(Vec<Ack>);

impl Unconfirmed {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits until L2 answered for every write: `Ok` if it stored them all, else the
    /// first failure (a write that failed is already forgotten from L1).
    pub async fn confirmed(self) -> Result<(), CacheError> {
        let mut outcome = Ok(());
        for ack in self.0 {
            let answer = match ack.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(CacheError::Unavailable(error)),
                Err(_) => Err(CacheError::Closed),
            };
            if outcome.is_ok() {
                outcome = answer;
            }
        }
        outcome
    }
}

/// What a read-modify-write decides, with a result for the caller.
pub enum Mutation<T> {
    Keep(T),
    Put(Entry, T),
    Delete(T),
}

/// What an invalidation removes.
#[derive(Debug, Clone)]
pub enum Target {
    Pattern(Pattern),
    Tags(Vec<String>),
}

impl Target {
    fn covers(&self, key: &[u8], entry: &Entry) -> bool {
        match self {
            Target::Pattern(pattern) => pattern.matches(key),
            Target::Tags(tags) => entry.tags().iter().any(|tag| tags.contains(tag)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_key_bytes: u64,
    pub max_value_bytes: u64,
}

/// Per-layer figures for `/v1/cache/stats` and INFO.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStats {
    pub l1: LayerStats,
    pub l2: Option<LayerStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerStats {
    pub kind: &'static str,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: f64,
    pub entries: u64,
    pub bytes: Option<u64>,
    pub capacity_bytes: Option<u64>,
    pub evictions: Option<u64>,
    pub queued_writes: Option<i64>,
}

/// State the handle and the writer task share.
pub(crate) struct Shared {
    l1: L1,
    /// True while L1 is known to hold every live key: L2 was empty when the cache
    /// opened and L1 has evicted nothing since. A miss is then a miss in both layers,
    /// answered without touching L2. The first eviction clears it for good.
    l1_complete: AtomicBool,
    /// Set by L1 on its first eviction.
    l1_evicted: Arc<AtomicBool>,
    pending: Pending,
    stripes: Box<[Mutex<()>]>,
    hasher: DefaultHashBuilder,
    metrics: CacheMetrics,
    queued_ops: AtomicI64,
    /// Control messages (invalidate, barrier, clear, close) queued: someone waits for
    /// each, so the writer cuts its batching window short.
    controls_queued: AtomicI64,
    /// The invalidation already answered whose keys the writer is still deleting from
    /// the layers (see `writer.rs`), with its sequence: until it is done, a key it
    /// covers reads as absent, unless L1 holds a newer write to it. One at most: the
    /// writer finishes each before it takes the next message.
    hiding: std::sync::RwLock<Option<(Target, u64)>>,
    /// Odd while `hiding` holds an invalidation, bumped as one starts and as it ends:
    /// reads skip `hiding`'s lock almost always, and a read that took an L1 entry
    /// without the key's lock learns whether an invalidation began or ended meanwhile
    /// (it may have evicted the entry and stopped hiding it since).
    hiding_generation: AtomicU64,
}

impl Shared {
    /// Whether a key absent from L1 is absent everywhere.
    fn l1_is_complete(&self) -> bool {
        self.l1_complete.load(Ordering::Relaxed) && !self.l1_evicted.load(Ordering::Relaxed)
    }

    fn stripe(&self, key: &[u8]) -> &Mutex<()> {
        &self.stripes[(self.hasher.hash_one(key) as usize) % STRIPES]
    }

    fn queued(&self) -> i64 {
        self.queued_ops.load(Ordering::Relaxed)
    }

    fn hiding_generation(&self) -> u64 {
        self.hiding_generation.load(Ordering::Acquire)
    }

    /// Whether an answered invalidation hides this version of the key (`seq` 0 for a
    /// version read from L2, which is never newer than the invalidation). Exact under
    /// the key's lock, which the writer's evictions take; without it see `live_l1`.
    fn hidden(&self, key: &[u8], entry: &Entry, seq: u64) -> bool {
        self.hiding_generation() % 2 == 1 && self.hiding_covers(key, entry, seq)
    }

    fn hiding_covers(&self, key: &[u8], entry: &Entry, seq: u64) -> bool {
        self.hiding
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(|(target, at)| seq <= *at && target.covers(key, entry))
    }

    /// The target is in place before the generation turns odd, and stays until after it
    /// turns even: a reader that sees an odd generation finds it, unless the
    /// generation has moved on by the time it looks again.
    fn start_hiding(&self, target: Target, seq: u64) {
        *self
            .hiding
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((target, seq));
        self.hiding_generation.fetch_add(1, Ordering::AcqRel);
    }

    fn stop_hiding(&self) {
        self.hiding_generation.fetch_add(1, Ordering::AcqRel);
        *self
            .hiding
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

/// The queue budget a write of `bytes` (key and value) takes: one unit for the write
/// itself, one per `QUEUE_UNIT` bytes, and never more than the whole budget.
fn queue_units(bytes: usize) -> u32 {
    (1 + bytes.div_ceil(QUEUE_UNIT)).min(QUEUE_BUDGET_UNITS as usize) as u32
}

/// One shard of pending writes: key → (sequence, entry or `None` for a delete).
type PendingShard = HashMap<Bytes, (u64, Option<Entry>), DefaultHashBuilder>;

/// Writes queued for L2 but not yet committed, by key: the newest one wins.
struct Pending {
    shards: Box<[std::sync::Mutex<PendingShard>]>,
    hasher: DefaultHashBuilder,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            shards: (0..PENDING_SHARDS)
                .map(|_| std::sync::Mutex::new(HashMap::default()))
                .collect(),
            hasher: DefaultHashBuilder::default(),
        }
    }

    fn shard(
        &self,
        key: &[u8],
    ) -> std::sync::MutexGuard<'_, HashMap<Bytes, (u64, Option<Entry>), DefaultHashBuilder>> {
        let index = (self.hasher.hash_one(key) as usize) % PENDING_SHARDS;
        // Held for one map operation; a panic there cannot leave the map inconsistent.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `Some(None)`: a delete is pending. `None`: nothing is pending.
    fn get(&self, key: &[u8]) -> Option<Option<Entry>> {
        self.shard(key).get(key).map(|(_, entry)| entry.clone())
    }

    fn set(&self, key: Bytes, seq: u64, entry: Option<Entry>) {
        self.shard(&key).insert(key, (seq, entry));
    }

    /// Forgets a committed write, unless a newer one for the key is still queued.
    fn clear(&self, key: &[u8], seq: u64) {
        let mut shard = self.shard(key);
        if shard
            .get(key)
            .is_some_and(|(pending_seq, _)| *pending_seq == seq)
        {
            shard.remove(key);
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    store: Option<Arc<dyn CacheStore>>,
    writer: Option<mpsc::UnboundedSender<Message>>,
    budget: Arc<Semaphore>,
    /// A shared L2: a write is answered only once L2 stored it (see `writer.rs`).
    write_through: bool,
    limits: Limits,
    /// Orders writes: L1 entries remember theirs so invalidation spares newer writes.
    seq: AtomicU64,
    l1_capacity: u64,
    /// From a shared store: how long an L1 entry is served before L2 is asked again.
    l1_max_age_ms: Option<u64>,
}

/// The cache handle: cheap to clone, shared by the REST and RESP front ends.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
    /// On a handle from `pipelined` (with a shared L2): what its writes left for the
    /// caller to wait for.
    unconfirmed: Option<Arc<std::sync::Mutex<Unconfirmed>>>,
}

impl Cache {
    /// Builds the cache and, with an L2, spawns its writer (call inside a runtime).
    pub fn new(
        l1_max_bytes: u64,
        store: Option<Arc<dyn CacheStore>>,
        limits: Limits,
        metrics: CacheMetrics,
    ) -> Cache {
        let l1_evicted = Arc::new(AtomicBool::new(false));
        let evictions = l1::EvictionCounter {
            counter: metrics.evictions.clone(),
            evicted: l1_evicted.clone(),
        };
        let shared = Arc::new(Shared {
            l1: l1::new_l1(l1_max_bytes, evictions),
            l1_complete: AtomicBool::new(store.is_none()),
            l1_evicted,
            pending: Pending::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: DefaultHashBuilder::default(),
            metrics,
            queued_ops: AtomicI64::new(0),
            controls_queued: AtomicI64::new(0),
            hiding: std::sync::RwLock::new(None),
            hiding_generation: AtomicU64::new(0),
        });
        if let Some(remote) = store
            .as_ref()
            .and_then(|store| store.remote_invalidations())
        {
            tokio::spawn(apply_remote_invalidations(shared.clone(), remote));
        }
        let l1_max_age_ms = store
            .as_ref()
            .and_then(|store| store.l1_max_age())
            .map(|age| age.as_millis() as u64);
        let writer = store.as_ref().map(|store| {
            let (sender, inbox) = mpsc::unbounded_channel();
            tokio::spawn(
                Writer {
                    shared: shared.clone(),
                    store: store.clone(),
                    inbox,
                }
                .run(),
            );
            sender
        });
        let write_through = store.as_ref().is_some_and(|store| store.is_shared());
        Cache {
            inner: Arc::new(Inner {
                shared,
                store,
                writer,
                budget: Arc::new(Semaphore::new(QUEUE_BUDGET_UNITS as usize)),
                write_through,
                limits,
                seq: AtomicU64::new(1),
                l1_capacity: l1_max_bytes,
                l1_max_age_ms,
            }),
            unconfirmed: None,
        }
    }

    /// A handle whose writes return as soon as they are issued (L1 holds them, the
    /// writer has them), leaving what a shared L2 has not confirmed yet to
    /// `take_unconfirmed`. A caller with many writes (MSET, a RESP pipeline) waits for
    /// Redis once for all of them instead of once per write; it must wait before it
    /// reports them done. Without a shared L2 it is an ordinary handle.
    pub fn pipelined(&self) -> Cache {
        Cache {
            inner: self.inner.clone(),
            unconfirmed: self
                .inner
                .write_through
                .then(|| Arc::new(std::sync::Mutex::new(Unconfirmed::default()))),
        }
    }

    /// The writes this handle issued since the last call that L2 has not confirmed yet
    /// (none on a handle that is not `pipelined`).
    pub fn take_unconfirmed(&self) -> Unconfirmed {
        match &self.unconfirmed {
            Some(unconfirmed) => std::mem::take(
                &mut *unconfirmed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            ),
            None => Unconfirmed::default(),
        }
    }

    /// Waits until a shared L2 stored a write; a `pipelined` handle leaves that to its
    /// caller.
    async fn stored(&self, ack: Option<Ack>) -> Result<(), CacheError> {
        let Some(ack) = ack else {
            return Ok(());
        };
        match &self.unconfirmed {
            Some(unconfirmed) => {
                unconfirmed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0
                    .push(ack);
                Ok(())
            }
            None => Unconfirmed(vec![ack]).confirmed().await,
        }
    }

    /// A failure of a shared L2 is Redis being unavailable, answered as a refusal is;
    /// one of the embedded L2 is a storage fault.
    fn store_failure(&self, error: StoreError) -> CacheError {
        if self.inner.write_through {
            CacheError::Unavailable(error)
        } else {
            CacheError::Store(error)
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Lets misses skip L2 while L1 provably holds every key: call once at start-up,
    /// before any write.
    pub async fn trust_l1_if_l2_is_empty(&self) -> Result<(), CacheError> {
        if let Some(store) = &self.inner.store {
            if store.is_shared() {
                // Other nodes write it: L1 never holds every key.
                return Ok(());
            }
            let empty = store.key_count().await? == 0;
            self.inner
                .shared
                .l1_complete
                .store(empty, Ordering::Relaxed);
        }
        Ok(())
    }

    fn check_key(&self, key: &[u8]) -> Result<(), CacheError> {
        let limit = self.inner.limits.max_key_bytes;
        if key.len() as u64 > limit {
            return Err(CacheError::KeyTooLarge {
                len: key.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Whether `set` would accept this key and entry, for callers that check a whole
    /// batch before storing any of it.
    pub fn validate(&self, key: &[u8], entry: &Entry) -> Result<(), CacheError> {
        self.check_key(key)?;
        self.check_value(entry)
    }

    fn check_value(&self, entry: &Entry) -> Result<(), CacheError> {
        let limit = self.inner.limits.max_value_bytes;
        if entry.value.len() as u64 > limit {
            return Err(CacheError::ValueTooLarge {
                len: entry.value.len(),
                limit,
            });
        }
        // L2's layout stores tag counts and lengths in 16 bits; these limits keep every
        // entry encodable, and far below that.
        let tags = entry.tags();
        if tags.len() > MAX_TAGS || tags.iter().any(|tag| tag.len() > MAX_TAG_BYTES) {
            return Err(CacheError::TooManyTags);
        }
        Ok(())
    }

    /// Reads a key: L1, then pending writes, then L2 (promoting what it finds). With a
    /// shared L2, an L1 entry older than its max age is looked up again, and served
    /// anyway if L2 cannot answer.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Entry>, CacheError> {
        self.check_key(key)?;
        let shared = &self.inner.shared;
        let now = now_ms();
        let mut aged = None;
        let generation = shared.hiding_generation();
        if let Some(stored) = shared.l1.get(key) {
            if self.too_old(&stored, now) {
                aged = Some(stored);
            } else if let Some(answer) = self.live_l1(key, stored, generation, now) {
                return Ok(answer);
            }
        }
        shared.metrics.l1_misses.inc();
        let Some(store) = &self.inner.store else {
            return Ok(None);
        };
        if shared.l1_is_complete() {
            return Ok(None);
        }
        let _guard = shared.stripe(key).lock().await;
        // Another reader may have promoted it, or a writer written it, while we waited.
        if let Some(stored) = shared.l1.peek(key)
            && !self.too_old(&stored, now)
        {
            return Ok(Some(stored.entry)
                .filter(|entry| !entry.is_expired(now) && !shared.hidden(key, entry, stored.seq)));
        }
        if let Some(pending) = shared.pending.get(key) {
            return Ok(pending.filter(|entry| !entry.is_expired(now)));
        }
        let found = match store.get(key).await {
            Ok(found) => found,
            Err(error) => {
                return match aged {
                    // L1 keeps serving while L2 is away.
                    Some(stored) => Ok(Some(stored.entry).filter(|entry| !entry.is_expired(now))),
                    None => Err(error.into()),
                };
            }
        };
        match found {
            Some(entry) if !entry.is_expired(now) && !shared.hidden(key, &entry, 0) => {
                shared.metrics.l2_hits.inc();
                shared.l1.insert(
                    Bytes::copy_from_slice(key),
                    Stored {
                        entry: entry.clone(),
                        seq: 0,
                        cached_at: now,
                    },
                );
                Ok(Some(entry))
            }
            _ => {
                shared.metrics.l2_misses.inc();
                if let Some(aged) = aged {
                    shared.l1.remove_if(key, |current| current.seq == aged.seq);
                }
                Ok(None)
            }
        }
    }

    /// Whether an L1 entry is past the shared store's max age.
    fn too_old(&self, stored: &Stored, now: u64) -> bool {
        self.inner
            .l1_max_age_ms
            .is_some_and(|max_age| now.saturating_sub(stored.cached_at) > max_age)
    }

    /// Refuses a write or invalidation while a shared L2 is known to be unreachable.
    fn check_available(&self) -> Result<(), CacheError> {
        match &self.inner.store {
            Some(store) => store.available().map_err(CacheError::Unavailable),
            None => Ok(()),
        }
    }

    /// The answer for an L1 entry read without the key's lock when the hiding
    /// generation was `seen`; `None` when L1 no longer holds the key.
    fn live_l1(
        &self,
        key: &[u8],
        mut stored: Stored,
        mut seen: u64,
        now: u64,
    ) -> Option<Option<Entry>> {
        let shared = &self.inner.shared;
        loop {
            let hidden = seen % 2 == 1 && shared.hiding_covers(key, &stored.entry, stored.seq);
            let generation = shared.hiding_generation();
            if generation == seen {
                if hidden {
                    shared.metrics.l1_misses.inc();
                    return Some(None);
                }
                break;
            }
            // An invalidation began or ended since the read: it may have evicted this
            // entry and stopped hiding it already. Read the key again.
            seen = generation;
            stored = shared.l1.peek(key)?;
        }
        if stored.entry.is_expired(now) {
            shared.metrics.l1_misses.inc();
            // Lazy expiry; only this version, in case a newer write just landed.
            shared.l1.remove_if(key, |current| {
                current.seq == stored.seq && current.entry.is_expired(now)
            });
            return Some(None);
        }
        shared.metrics.l1_hits.inc();
        Some(Some(stored.entry))
    }

    /// Stores a value unconditionally.
    pub async fn set(&self, key: &[u8], entry: Entry) -> Result<(), CacheError> {
        self.check_key(key)?;
        self.check_value(&entry)?;
        self.check_available()?;
        let budget = self.reserve(key.len() + entry.value.len()).await?;
        let ack = {
            let _guard = self.inner.shared.stripe(key).lock().await;
            self.write(key, Some(entry), budget)
        };
        self.stored(ack).await
    }

    /// Atomic read-modify-write of one key: `decide` sees the live current entry (if
    /// any) and says what to store. Every conditional command is built on this.
    ///
    /// What the write holds in the L2 queue is known only once `decide` has chosen, so
    /// the queue budget starts at the key and grows by what the decided value needs.
    /// When the budget cannot grow at once, `decide` runs again after waiting for room
    /// outside the key's lock: waiting under it could wait on the writer, which takes
    /// key locks when a shared L2 refuses a batch.
    pub async fn mutate<T>(
        &self,
        key: &[u8],
        mut decide: impl FnMut(Option<&Entry>) -> Mutation<T>,
    ) -> Result<T, CacheError> {
        self.check_key(key)?;
        let mut reserved = key.len();
        loop {
            let mut budget = self.reserve(reserved).await?;
            // The key's lock is not held while L2 stores the write: other writes to the
            // key go on, each ordered by its sequence.
            let (result, ack) = {
                let _guard = self.inner.shared.stripe(key).lock().await;
                let current = self.current_locked(key).await?;
                match decide(current.as_ref()) {
                    Mutation::Keep(result) => return Ok(result),
                    Mutation::Put(entry, result) => {
                        self.check_value(&entry)?;
                        self.check_available()?;
                        let needed = key.len() + entry.value.len();
                        if !self.grow(&mut budget, reserved, needed) {
                            reserved = needed;
                            continue;
                        }
                        (result, self.write(key, Some(entry), budget))
                    }
                    Mutation::Delete(result) => {
                        if current.is_none() {
                            return Ok(result);
                        }
                        self.check_available()?;
                        (result, self.write(key, None, budget))
                    }
                }
            };
            self.stored(ack).await?;
            return Ok(result);
        }
    }

    /// Deletes a key; true if it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, CacheError> {
        self.mutate(key, |current| Mutation::Delete(current.is_some()))
            .await
    }

    /// The live entry, read under the key's stripe lock.
    async fn current_locked(&self, key: &[u8]) -> Result<Option<Entry>, CacheError> {
        let shared = &self.inner.shared;
        let now = now_ms();
        if let Some(stored) = shared.l1.peek(key)
            && !self.too_old(&stored, now)
        {
            return Ok(Some(stored.entry)
                .filter(|entry| !entry.is_expired(now) && !shared.hidden(key, entry, stored.seq)));
        }
        let Some(store) = &self.inner.store else {
            return Ok(None);
        };
        if shared.l1_is_complete() {
            return Ok(None);
        }
        if let Some(pending) = shared.pending.get(key) {
            return Ok(pending.filter(|entry| !entry.is_expired(now)));
        }
        Ok(store
            .get(key)
            .await?
            .filter(|entry| !entry.is_expired(now) && !shared.hidden(key, entry, 0)))
    }

    /// Waits for room in the L2 queue. Without an L2 there is nothing to wait for.
    async fn reserve(&self, bytes: usize) -> Result<Option<OwnedSemaphorePermit>, CacheError> {
        if self.inner.writer.is_none() {
            return Ok(None);
        }
        let permit = self
            .inner
            .budget
            .clone()
            .acquire_many_owned(queue_units(bytes))
            .await
            .map_err(|_| CacheError::Closed)?;
        Ok(Some(permit))
    }

    /// Extends a reservation made for `reserved` bytes to `needed` without waiting;
    /// false when the queue has no room for the difference now.
    fn grow(
        &self,
        budget: &mut Option<OwnedSemaphorePermit>,
        reserved: usize,
        needed: usize,
    ) -> bool {
        let Some(permit) = budget else {
            return true;
        };
        let more = queue_units(needed).saturating_sub(queue_units(reserved));
        if more == 0 {
            return true;
        }
        match self.inner.budget.clone().try_acquire_many_owned(more) {
            Ok(extra) => {
                permit.merge(extra);
                true
            }
            Err(_) => false,
        }
    }

    /// Applies a decided write to L1 and queues it for L2; with a shared L2, returns
    /// the answer to wait for. The caller holds the key's stripe lock.
    fn write(
        &self,
        key: &[u8],
        entry: Option<Entry>,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Option<Ack> {
        let inner = &self.inner;
        let shared = &inner.shared;
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let key = Bytes::copy_from_slice(key);
        match &entry {
            Some(entry) => {
                let stored = Stored {
                    entry: entry.clone(),
                    seq,
                    cached_at: now_ms(),
                };
                shared
                    .l1
                    .insert_with_lifecycle(key.clone(), stored, &mut Some(key.clone()));
            }
            None => {
                shared.l1.remove(&key);
            }
        }
        let (Some(writer), Some(budget)) = (&inner.writer, budget) else {
            return None;
        };
        shared.pending.set(key.clone(), seq, entry.clone());
        let op = match entry {
            Some(entry) => StoreOp::Put { key, entry },
            None => StoreOp::Delete { key },
        };
        let (stored, ack) = inner.write_through.then(oneshot::channel).unzip();
        shared.queued_ops.fetch_add(1, Ordering::Relaxed);
        let message = Message::Write {
            seq,
            op,
            budget,
            stored,
        };
        if writer.send(message).is_err() {
            // A waiting caller hears `Closed`: the answer was dropped with the message.
            shared.queued_ops.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("cache writer stopped; the write stays in L1 only");
        }
        ack
    }

    /// Queues a message someone will wait for.
    fn send_control(
        &self,
        writer: &mpsc::UnboundedSender<Message>,
        message: Message,
    ) -> Result<(), CacheError> {
        self.inner
            .shared
            .controls_queued
            .fetch_add(1, Ordering::Relaxed);
        writer.send(message).map_err(|_| {
            self.inner
                .shared
                .controls_queued
                .fetch_sub(1, Ordering::Relaxed);
            CacheError::Closed
        })
    }

    /// Removes every key matching a pattern or carrying one of the tags, from both
    /// layers. Writes made after the call started survive.
    pub async fn invalidate(&self, target: Target) -> Result<usize, CacheError> {
        let started = Instant::now();
        self.check_available()?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let removed = match &self.inner.writer {
            Some(writer) => {
                let (reply, answer) = oneshot::channel();
                self.send_control(writer, Message::Invalidate { target, seq, reply })?;
                answer
                    .await
                    .map_err(|_| CacheError::Closed)?
                    .map_err(|error| self.store_failure(error))?
            }
            None => self.invalidate_l1_only(&target, seq),
        };
        self.inner
            .shared
            .metrics
            .invalidation_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(removed)
    }

    fn invalidate_l1_only(&self, target: &Target, seq: u64) -> usize {
        let removed = std::cell::Cell::new(0);
        self.inner.shared.l1.retain(|key, stored| {
            let remove = stored.seq <= seq && target.covers(key, &stored.entry);
            removed.set(removed.get() + usize::from(remove));
            !remove
        });
        removed.get()
    }

    /// Waits until every write queued so far is in L2, so scans of L2 see them.
    async fn barrier(&self) -> Result<(), CacheError> {
        if let Some(writer) = &self.inner.writer {
            let (reply, answer) = oneshot::channel();
            self.send_control(writer, Message::Barrier { reply })?;
            answer.await.map_err(|_| CacheError::Closed)?;
        }
        Ok(())
    }

    /// Live keys matching a pattern, at most `limit` (KEYS).
    pub async fn keys(&self, pattern: &Pattern, limit: usize) -> Result<Vec<Bytes>, CacheError> {
        let now = now_ms();
        match &self.inner.store {
            Some(store) => {
                self.barrier().await?;
                Ok(store.keys_matching(pattern, now, limit).await?)
            }
            None => {
                let mut keys = Vec::new();
                for (key, stored) in self.inner.shared.l1.iter() {
                    if keys.len() >= limit {
                        break;
                    }
                    if !stored.entry.is_expired(now) && pattern.matches(&key) {
                        keys.push(key);
                    }
                }
                Ok(keys)
            }
        }
    }

    /// Up to `count` keys after `after`, in key order, and whether more follow (SCAN).
    pub async fn scan(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<(Vec<Bytes>, bool), CacheError> {
        match &self.inner.store {
            Some(store) => {
                self.barrier().await?;
                Ok(store.scan(after, count).await?)
            }
            None => {
                let mut keys: Vec<Bytes> = self
                    .inner
                    .shared
                    .l1
                    .iter()
                    .map(|(key, _)| key)
                    .filter(|key| after.is_none_or(|after| key.as_ref() > after))
                    .collect();
                keys.sort_unstable();
                let more = keys.len() > count;
                keys.truncate(count);
                Ok((keys, more))
            }
        }
    }

    /// Number of keys (DBSIZE). With an L2, keys expired but not yet swept count too,
    /// as in Redis.
    pub async fn key_count(&self) -> Result<u64, CacheError> {
        match &self.inner.store {
            Some(store) => {
                self.barrier().await?;
                Ok(store.key_count().await?)
            }
            None => Ok(self.inner.shared.l1.len() as u64),
        }
    }

    /// Removes everything from both layers (FLUSHALL).
    pub async fn clear(&self) -> Result<(), CacheError> {
        self.check_available()?;
        match &self.inner.writer {
            Some(writer) => {
                let (reply, answer) = oneshot::channel();
                self.send_control(writer, Message::Clear { reply })?;
                answer
                    .await
                    .map_err(|_| CacheError::Closed)?
                    .map_err(|error| self.store_failure(error))?;
            }
            None => self.inner.shared.l1.clear(),
        }
        Ok(())
    }

    /// Commits what is queued durably and stops the writer. Part of shutdown.
    pub async fn close(&self) {
        if let Some(writer) = &self.inner.writer {
            let (reply, answer) = oneshot::channel();
            if self.send_control(writer, Message::Close { reply }).is_ok() {
                let _ = answer.await;
            }
        }
    }

    pub async fn stats(&self) -> CacheStats {
        let shared = &self.inner.shared;
        let metrics = &shared.metrics;
        let l1_bytes = shared.l1.weight();
        let l1_entries = shared.l1.len() as u64;
        metrics
            .bytes
            .with_label_values(&["l1"])
            .set(l1_bytes as i64);
        metrics
            .entries
            .with_label_values(&["l1"])
            .set(l1_entries as i64);
        let ratio = |hits: u64, misses: u64| {
            if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            }
        };
        let (l1_hits, l1_misses) = (metrics.l1_hits.get(), metrics.l1_misses.get());
        let l1 = LayerStats {
            kind: "memory",
            hits: l1_hits,
            misses: l1_misses,
            hit_ratio: ratio(l1_hits, l1_misses),
            entries: l1_entries,
            bytes: Some(l1_bytes),
            capacity_bytes: Some(self.inner.l1_capacity),
            evictions: Some(metrics.evictions.get()),
            queued_writes: None,
        };
        let l2 = match &self.inner.store {
            Some(store) => {
                let entries = store.key_count().await.unwrap_or(0);
                metrics
                    .entries
                    .with_label_values(&["l2"])
                    .set(entries as i64);
                let (hits, misses) = (metrics.l2_hits.get(), metrics.l2_misses.get());
                Some(LayerStats {
                    kind: store.kind(),
                    hits,
                    misses,
                    hit_ratio: ratio(hits, misses),
                    entries,
                    bytes: None,
                    capacity_bytes: None,
                    evictions: None,
                    queued_writes: Some(shared.queued()),
                })
            }
            None => None,
        };
        CacheStats { l1, l2 }
    }
}

/// Evicts from L1 what other nodes changed in the shared L2, until the store goes
/// away. Key evictions take the key's stripe lock, so a concurrent miss cannot put
/// back a value it read from L2 before the change.
async fn apply_remote_invalidations(
    shared: Arc<Shared>,
    mut remote: mpsc::UnboundedReceiver<RemoteInvalidation>,
) {
    while let Some(invalidation) = remote.recv().await {
        match invalidation {
            RemoteInvalidation::Keys(keys) => {
                for key in keys {
                    let _guard = shared.stripe(&key).lock().await;
                    shared.l1.remove(&key);
                }
            }
            // Without stripe locks (a pattern may match any key): a miss that read the
            // old value from L2 just before the delete can still put it in L1; the
            // max age bounds how long it is served.
            RemoteInvalidation::Pattern(pattern) => {
                shared.l1.retain(|key, _| !pattern.matches(key));
            }
            RemoteInvalidation::Tags(tags) => {
                shared
                    .l1
                    .retain(|_, stored| !stored.entry.tags().iter().any(|tag| tags.contains(tag)));
            }
            RemoteInvalidation::All => shared.l1.clear(),
        }
        shared.metrics.remote_invalidations.inc();
    }
}
