//! A map from [`Key`] to per-key state with a hard cap on its keys, split into shards so
//! concurrent requests for different keys rarely wait on one lock. Both the buckets and
//! the penalty box keep their state in one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus::IntGauge;

use super::key::Key;

/// A power of two; enough that a handful of cores rarely meet on one lock.
const SHARDS: usize = 32;

pub(super) struct Table<V> {
    shards: Box<[Mutex<HashMap<Key, V>>]>,
    /// Keys across all shards. A slot is reserved here before an insert, so the cap
    /// holds exactly even while shards insert concurrently.
    len: AtomicUsize,
    max_keys: usize,
    tracked: IntGauge,
}

impl<V> Table<V> {
    pub(super) fn new(max_keys: usize, tracked: IntGauge) -> Table<V> {
        Table {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            len: AtomicUsize::new(0),
            max_keys,
            tracked,
        }
    }

    /// The shard that holds `key`. Inserting into it takes a [`Table::reserve`] first.
    pub(super) fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, V>> {
        let index = (key.spread() >> (64 - SHARDS.trailing_zeros())) as usize;
        lock(&self.shards[index])
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub(super) fn is_full(&self) -> bool {
        self.len() >= self.max_keys
    }

    /// Claims room for one more key; `false` when the table is full.
    pub(super) fn reserve(&self) -> bool {
        let reserved = self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |len| {
                (len < self.max_keys).then_some(len + 1)
            })
            .is_ok();
        if reserved {
            self.tracked.inc();
        }
        reserved
    }

    /// Gives back a slot reserved for a key that was not inserted after all.
    pub(super) fn release(&self) {
        self.len.fetch_sub(1, Ordering::AcqRel);
        self.tracked.dec();
    }

    /// Keeps the entries `keep` says yes to, one shard at a time, so a request waits at
    /// most for one shard's pass.
    pub(super) fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        let mut removed = 0;
        for shard in &self.shards {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|_, value| keep(value));
            removed += before - map.len();
        }
        let len = self.len.fetch_sub(removed, Ordering::AcqRel) - removed;
        self.tracked.set(len as i64);
    }

    /// Gives memory back, but only from shards that are mostly empty: shrinking a map
    /// that refills before the next sweep would trade the memory for rehashing.
    pub(super) fn shrink(&self) {
        for shard in &self.shards {
            let mut map = lock(shard);
            if map.capacity() > 4 * map.len() + 64 {
                let keep = map.len() * 2;
                map.shrink_to(keep);
            }
        }
    }
}

/// A panic while a shard was locked cannot leave a torn entry behind (entries are
/// written whole), so a poisoned shard keeps serving.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
