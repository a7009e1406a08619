//! The keyed GCRA state behind governor: a capped [`Table`] of theoretical arrival times
//! and one shared overflow bucket.
//!
//! governor's own keyed stores (a locked `HashMap`, or `DashMap`) insert every key they
//! are asked about, so nothing outside them can stop a flood of fresh addresses from
//! growing memory. This store decides where the insert happens, under the shard's lock:
//! a key that finds the table full shares the overflow bucket instead. The shards give
//! the concurrency `DashMap` would, without another dependency.

use std::cell::Cell;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use prometheus::{IntCounter, IntGauge};

use super::key::Key;
use super::table::Table;

/// The question a limiter asks governor, and the store's answer on the way back.
///
/// governor passes the key by reference into [`StateStore::measure_and_replace`] and
/// returns only its verdict, so the state a `Decision`'s numbers come from (the key's
/// theoretical arrival time) travels back in the probe's cells.
#[derive(Clone)]
pub(super) struct Probe {
    pub(super) key: Key,
    /// `false` for a peek: run the GCRA test but keep the old state.
    pub(super) consume: bool,
    /// The key's theoretical arrival time after the call, in nanoseconds since the
    /// limiter started; 0 for a bucket that was never used.
    pub(super) tat: Cell<u64>,
}

impl Probe {
    pub(super) fn new(key: Key, consume: bool) -> Probe {
        Probe {
            key,
            consume,
            tat: Cell::new(0),
        }
    }
}

// governor wants `Hash + Eq` keys; a probe is its key.
impl PartialEq for Probe {
    fn eq(&self, other: &Probe) -> bool {
        self.key == other.key
    }
}

impl Eq for Probe {}

impl Hash for Probe {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

/// Shared by the governor limiter (through [`BoundedStore`]) and the `Limiter` around
/// it, which reads the counts and sweeps.
pub(super) struct Buckets {
    pub(super) table: Table<u64>,
    /// The one bucket every new key shares while the table is full.
    overflow: AtomicU64,
    overflow_uses: IntCounter,
}

impl Buckets {
    pub(super) fn new(max_keys: usize, tracked: IntGauge, overflow_uses: IntCounter) -> Buckets {
        Buckets {
            table: Table::new(max_keys, tracked),
            overflow: AtomicU64::new(0),
            overflow_uses,
        }
    }

    fn measure<T, E>(
        &self,
        probe: &Probe,
        f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    ) -> Result<T, E> {
        let mut shard = self.table.shard(&probe.key);
        if let Some(tat) = shard.get_mut(&probe.key) {
            return measure_locked(tat, probe, f);
        }
        if !probe.consume && !self.table.is_full() {
            // A peek at an unknown key sees a full bucket and leaves nothing behind.
            return measure_locked(&mut 0, probe, f);
        }
        if probe.consume && self.table.reserve() {
            let mut fresh = 0;
            let result = measure_locked(&mut fresh, probe, f);
            if result.is_ok() {
                shard.insert(probe.key, fresh);
            } else {
                // A fresh bucket always admits one; should governor ever refuse, keep
                // no entry rather than a slot that holds nothing.
                self.table.release();
            }
            return result;
        }
        drop(shard);
        self.overflow_uses.inc();
        measure_atomic(&self.overflow, probe, f)
    }
}

fn previous(tat: u64) -> Option<Nanos> {
    NonZeroU64::new(tat).map(|tat| Nanos::from(tat.get()))
}

/// GCRA under the shard's lock: governor's closure decides, the store writes.
fn measure_locked<T, E>(
    tat: &mut u64,
    probe: &Probe,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let result = f(previous(*tat)).map(|(verdict, next)| {
        if probe.consume {
            *tat = next.as_u64();
        }
        verdict
    });
    probe.tat.set(*tat);
    result
}

/// GCRA on the lock-free overflow bucket, retried when another thread got there first.
fn measure_atomic<T, E>(
    cell: &AtomicU64,
    probe: &Probe,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let mut current = cell.load(Ordering::Acquire);
    loop {
        match f(previous(current)) {
            Ok((verdict, next)) if probe.consume => {
                let next = next.as_u64();
                match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        probe.tat.set(next);
                        return Ok(verdict);
                    }
                    Err(actual) => current = actual,
                }
            }
            result => {
                probe.tat.set(current);
                return result.map(|(verdict, _)| verdict);
            }
        }
    }
}

/// What governor owns: a handle on the shared [`Buckets`].
pub(super) struct BoundedStore(pub(super) Arc<Buckets>);

impl StateStore for BoundedStore {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, probe: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure(probe, f)
    }
}

impl ShrinkableKeyedStateStore<Probe> for BoundedStore {
    /// Called by governor's `retain_recent` with the arrival time below which a bucket
    /// is indistinguishable from a fresh one.
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.0.table.retain(|tat| *tat > drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.table.shrink();
    }

    fn len(&self) -> usize {
        self.0.table.len()
    }

    fn is_empty(&self) -> bool {
        self.0.table.len() == 0
    }
}
