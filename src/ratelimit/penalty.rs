//! The penalty box: a key that keeps running into its limit is banned, each ban twice as
//! long as the one before, up to a maximum. Bounded like the buckets: at most `max_keys`
//! records, and sweeps drop records with nothing left to remember.

use std::collections::hash_map::Entry;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use super::key::Key;
use super::nanos;
use super::table::Table;

/// `after` rejections within `within` ban a key for `ban`; each further ban of the same
/// key lasts twice as long as the one before, up to `max_ban`. While banned, every
/// request of the key is rejected without touching its bucket.
///
/// A key's ban count is forgotten once it has stayed out of the box for `max_ban` after
/// its last ban ended; its next ban starts again at `ban`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PenaltyPolicy {
    pub after: u32,
    pub within: Duration,
    pub ban: Duration,
    pub max_ban: Duration,
}

struct Record {
    /// When the current window of rejections began (nanoseconds since the limiter started).
    window_start: u64,
    strikes: u32,
    /// Bans so far; the next one lasts `ban * 2^bans`.
    bans: u32,
    banned_until: u64,
}

/// The policy in nanoseconds (the limiter's time unit), and the records.
pub(super) struct PenaltyBox {
    after: u32,
    within: u64,
    ban: u64,
    max_ban: u64,
    records: Table<Record>,
    untracked: IntCounter,
    bans: IntCounter,
}

impl PenaltyBox {
    pub(super) fn new(
        policy: &PenaltyPolicy,
        max_keys: usize,
        tracked: IntGauge,
        untracked: IntCounter,
        bans: IntCounter,
    ) -> PenaltyBox {
        PenaltyBox {
            after: policy.after,
            within: nanos(policy.within),
            ban: nanos(policy.ban),
            max_ban: nanos(policy.max_ban),
            records: Table::new(max_keys, tracked),
            untracked,
            bans,
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.records.is_full()
    }

    /// How long the key's ban still runs, if it is banned.
    pub(super) fn ban_left(&self, key: &Key, now: u64) -> Option<u64> {
        // Most of the time nobody is in the box; learn that without taking a lock.
        if self.records.len() == 0 {
            return None;
        }
        self.records
            .shard(key)
            .get(key)
            .filter(|record| record.banned_until > now)
            .map(|record| record.banned_until - now)
    }

    /// Counts one rejection of the key; returns the ban's length when it starts one.
    /// While the box is full, keys it does not know go uncounted (the overflow metric
    /// says how often); their buckets still limit them.
    pub(super) fn strike(&self, key: &Key, now: u64) -> Option<u64> {
        let mut shard = self.records.shard(key);
        let record = match shard.entry(*key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                if !self.records.reserve() {
                    self.untracked.inc();
                    return None;
                }
                entry.insert(Record {
                    window_start: now,
                    strikes: 0,
                    bans: 0,
                    banned_until: 0,
                })
            }
        };
        if now.saturating_sub(record.window_start) >= self.within {
            record.window_start = now;
            record.strikes = 0;
        }
        record.strikes += 1;
        if record.strikes < self.after {
            return None;
        }
        let length = 2u64
            .saturating_pow(record.bans)
            .saturating_mul(self.ban)
            .min(self.max_ban);
        record.bans = record.bans.saturating_add(1);
        record.strikes = 0;
        record.window_start = now;
        record.banned_until = now.saturating_add(length);
        self.bans.inc();
        Some(length)
    }

    /// Drops the records that neither ban, nor count strikes in an open window, nor
    /// remember a ban that ended less than `max_ban` ago.
    pub(super) fn sweep(&self, now: u64) {
        self.records.retain(|record| {
            let counting = record.window_start.saturating_add(self.within) > now;
            // A running ban, or one that ended less than `max_ban` ago.
            let remembered =
                record.bans > 0 && record.banned_until.saturating_add(self.max_ban) > now;
            counting || remembered
        });
        self.records.shrink();
    }
}
