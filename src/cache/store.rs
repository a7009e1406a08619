//! The L2 seam: what a persistent cache layer must do. The embedded implementation
//! (`RedbCacheStore`) comes first; Redis fits the same trait when scaled out.
//!
//! A store shared between nodes (Redis) also says so (`is_shared`), bounds how long L1
//! may trust an entry (`l1_max_age`), refuses writes while it is unreachable
//! (`available`), and hands the cache the invalidations other nodes publish
//! (`remote_invalidations`).
//!
//! Only the cache's writer task calls the mutating methods, one batch at a time, so an
//! implementation needs no write coordination of its own. Reads come from any task.

use async_trait::async_trait;
use bytes::Bytes;

use super::Target;
use super::entry::Entry;
use super::glob::Pattern;

#[derive(Debug, Clone, thiserror::Error)]
#[error("cache store: {0}")]
pub struct StoreError(pub String);

/// What another node changed in a shared L2, so this node's L1 must forget it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteInvalidation {
    Keys(Vec<Bytes>),
    Pattern(Pattern),
    Tags(Vec<String>),
    /// Everything: a clear on another node, or this node's subscription was down and
    /// messages may have been missed.
    All,
}

/// One change, applied in order within a batch.
#[derive(Debug, Clone)]
pub enum StoreOp {
    Put { key: Bytes, entry: Entry },
    Delete { key: Bytes },
}

#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// A short name for logs and `/readyz` (`redb`, `redis`).
    fn kind(&self) -> &'static str;

    /// True when other nodes write the same L2, so L1 can never be trusted to hold
    /// every key.
    fn is_shared(&self) -> bool {
        false
    }

    /// How long an L1 entry may be served without looking at L2 again: the staleness
    /// bound when an invalidation message from another node is lost. `None`: forever.
    fn l1_max_age(&self) -> Option<std::time::Duration> {
        None
    }

    /// `Err` while the store is known to be unreachable (its circuit is open): the
    /// cache then refuses writes and invalidations instead of accepting what it cannot
    /// share.
    fn available(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The stream of other nodes' invalidations, once (the cache takes it at start).
    fn remote_invalidations(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<RemoteInvalidation>> {
        None
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError>;

    /// Applies a batch atomically. `durable` asks for the batch and everything before it
    /// to be on stable storage when this returns; otherwise it may be lost on power loss
    /// (never corrupted).
    async fn apply(&self, batch: Vec<StoreOp>, durable: bool) -> Result<(), StoreError>;

    /// Keys matching `pattern` that have not expired at `now_ms` (0: include expired
    /// ones), at most `limit`. Patterns with a literal prefix must be answered without
    /// reading keys outside that prefix.
    async fn keys_matching(
        &self,
        pattern: &Pattern,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, StoreError>;

    /// Deletes every key matching `pattern` in one atomic step and returns them. A
    /// literal prefix must bound the scan, as for `keys_matching`. (A shared store
    /// cannot lock out other nodes for a whole scan: Redis deletes page by page, and a
    /// key another node writes meanwhile may survive; see `redis_store.rs`.)
    async fn delete_matching(&self, pattern: &Pattern) -> Result<Vec<Bytes>, StoreError>;

    /// Deletes every key carrying any of `tags` in one atomic step and returns them,
    /// reading only those tags' index rows.
    async fn delete_tagged(&self, tags: &[String]) -> Result<Vec<Bytes>, StoreError>;

    /// The keys an invalidation of `target` covers (expired ones included), read
    /// without changing anything, or `None` when the store deletes them itself
    /// (`delete_matching`, `delete_tagged`). A write-behind store lists them: its writer
    /// then answers the invalidation once L1 and the pending records hide the keys, and
    /// deletes them from the store as its next batch. A shared store must have deleted
    /// them before anyone is answered, so it keeps the default.
    async fn covered_keys(&self, _target: &Target) -> Result<Option<Vec<Bytes>>, StoreError> {
        Ok(None)
    }

    /// Up to `count` keys after `after` in key order (expired ones included), and
    /// whether more follow.
    async fn scan(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<(Vec<Bytes>, bool), StoreError>;

    /// Keys whose expiry is at or before `now_ms`, oldest first, at most `limit`.
    async fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Bytes>, StoreError>;

    /// Number of keys stored (expired ones not yet swept included).
    async fn key_count(&self) -> Result<u64, StoreError>;

    /// Removes everything.
    async fn clear(&self) -> Result<(), StoreError>;
}
