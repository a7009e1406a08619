//! L2 in a redb file of its own (`cache.redb`), so cache commits never queue behind
//! job-queue commits.
//!
//! Three tables: `entries` (key → encoded entry), `expiry` ((expires_at, key) → ()) for
//! the sweeper, and `tags` ((tag, key) → ()) so invalidation by tag reads only that
//! tag's keys. All three change in the same transaction, so they never disagree.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use super::Target;
use super::entry::Entry;
use super::glob::{Pattern, prefix_successor};
use super::store::{CacheStore, StoreError, StoreOp};

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("expiry");
const TAGS: TableDefinition<(&str, &[u8]), ()> = TableDefinition::new("tags");

pub struct RedbCacheStore {
    db: Arc<Database>,
}

fn fail(error: impl std::fmt::Display) -> StoreError {
    StoreError(error.to_string())
}

impl RedbCacheStore {
    /// Opens (or creates) the file. `page_cache_bytes` bounds redb's own page cache,
    /// which is most of this layer's memory.
    pub fn open(path: &Path, page_cache_bytes: usize) -> Result<RedbCacheStore, StoreError> {
        let db = Database::builder()
            .set_cache_size(page_cache_bytes)
            .create(path)
            .map_err(|error| StoreError(format!("cannot open {}: {error}", path.display())))?;
        let store = RedbCacheStore { db: Arc::new(db) };
        store.create_tables()?;
        Ok(store)
    }

    fn create_tables(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(fail)?;
        txn.open_table(ENTRIES).map_err(fail)?;
        txn.open_table(EXPIRY).map_err(fail)?;
        txn.open_table(TAGS).map_err(fail)?;
        txn.commit().map_err(fail)
    }

    fn apply_blocking(db: &Database, batch: &[StoreOp], durable: bool) -> Result<(), StoreError> {
        let mut txn = db.begin_write().map_err(fail)?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(fail)?;
        {
            let mut tables = Tables::open(&txn)?;
            for op in batch {
                match op {
                    StoreOp::Put { key, entry } => tables.put(key, entry)?,
                    StoreOp::Delete { key } => {
                        tables.delete(key)?;
                    }
                }
            }
        }
        txn.commit().map_err(fail)
    }

    /// Removes the entries `extract` takes out of the entries table, and their index
    /// rows, in one transaction.
    fn delete_blocking(
        db: &Database,
        extract: impl FnOnce(
            &mut redb::Table<'_, &'static [u8], &'static [u8]>,
        ) -> Result<Vec<(Bytes, Option<Entry>)>, StoreError>,
    ) -> Result<Vec<Bytes>, StoreError> {
        let mut txn = db.begin_write().map_err(fail)?;
        txn.set_durability(Durability::None).map_err(fail)?;
        let deleted;
        {
            let mut tables = Tables::open(&txn)?;
            let removed = extract(&mut tables.entries)?;
            for (key, old) in &removed {
                if let Some(old) = old {
                    tables.unindex(key, old)?;
                }
            }
            deleted = removed.into_iter().map(|(key, _)| key).collect();
        }
        txn.commit().map_err(fail)?;
        Ok(deleted)
    }

    fn keys_matching_blocking(
        db: &Database,
        pattern: &Pattern,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, StoreError> {
        let txn = db.begin_read().map_err(fail)?;
        let entries = txn.open_table(ENTRIES).map_err(fail)?;
        let prefix = pattern.literal_prefix();
        let mut keys = Vec::new();
        let live = |encoded: &[u8]| match encoded.get(..8) {
            Some(head) => {
                let at = u64::from_le_bytes(head.try_into().expect("8 bytes"));
                at == 0 || now_ms == 0 || at > now_ms
            }
            None => false,
        };
        if pattern.is_exact() {
            if entries
                .get(prefix)
                .map_err(fail)?
                .is_some_and(|value| live(value.value()))
            {
                keys.push(Bytes::copy_from_slice(prefix));
            }
            return Ok(keys);
        }
        let end = prefix_successor(prefix);
        let range = match &end {
            Some(end) => entries.range::<&[u8]>(prefix..end.as_slice()),
            None => entries.range::<&[u8]>(prefix..),
        }
        .map_err(fail)?;
        for item in range {
            let (key, value) = item.map_err(fail)?;
            if pattern.matches(key.value()) && live(value.value()) {
                keys.push(Bytes::copy_from_slice(key.value()));
                if keys.len() >= limit {
                    break;
                }
            }
        }
        Ok(keys)
    }
}

impl RedbCacheStore {
    /// Every key in the entries table matching `pattern`, expired or not, reading only
    /// its literal prefix's range.
    fn matching_keys(
        entries: &impl ReadableTable<&'static [u8], &'static [u8]>,
        pattern: &Pattern,
    ) -> Result<Vec<Bytes>, StoreError> {
        let prefix = pattern.literal_prefix();
        let end = prefix_successor(prefix);
        let range = match &end {
            Some(end) => entries.range::<&[u8]>(prefix..end.as_slice()),
            None => entries.range::<&[u8]>(prefix..),
        }
        .map_err(fail)?;
        let mut keys = Vec::new();
        for item in range {
            let (key, _) = item.map_err(fail)?;
            if pattern.matches(key.value()) {
                keys.push(Bytes::copy_from_slice(key.value()));
            }
        }
        Ok(keys)
    }

    /// Every key carrying any of `tags`, once each, from the tag index alone.
    fn tagged_keys(
        tag_rows: &impl ReadableTable<(&'static str, &'static [u8]), ()>,
        tags: &[String],
    ) -> Result<Vec<Bytes>, StoreError> {
        let empty: &[u8] = &[];
        let mut keys = Vec::new();
        for tag in tags {
            // Every (tag, key) row sorts between (tag, "") and (tag + "\0", "").
            let after = format!("{tag}\0");
            for row in tag_rows
                .range((tag.as_str(), empty)..(after.as_str(), empty))
                .map_err(fail)?
            {
                let (row, _) = row.map_err(fail)?;
                keys.push(Bytes::copy_from_slice(row.value().1));
            }
        }
        if tags.len() > 1 {
            keys.sort_unstable();
            keys.dedup();
        }
        Ok(keys)
    }
}

/// The three tables of one write transaction, kept consistent with each other.
struct Tables<'txn> {
    entries: redb::Table<'txn, &'static [u8], &'static [u8]>,
    expiry: redb::Table<'txn, (u64, &'static [u8]), ()>,
    tags: redb::Table<'txn, (&'static str, &'static [u8]), ()>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Tables<'txn>, StoreError> {
        Ok(Tables {
            entries: txn.open_table(ENTRIES).map_err(fail)?,
            expiry: txn.open_table(EXPIRY).map_err(fail)?,
            tags: txn.open_table(TAGS).map_err(fail)?,
        })
    }

    fn put(&mut self, key: &[u8], entry: &Entry) -> Result<(), StoreError> {
        // Index rows are touched only when the old or the new version has some.
        let old = self
            .entries
            .insert(key, entry.encode().as_slice())
            .map_err(fail)?
            .and_then(|old| indexed(old.value()));
        if let Some(old) = old {
            self.unindex(key, &old)?;
        }
        if let Some(at) = entry.expires_at {
            self.expiry.insert((at, key), ()).map_err(fail)?;
        }
        for tag in entry.tags() {
            self.tags.insert((tag.as_str(), key), ()).map_err(fail)?;
        }
        Ok(())
    }

    /// True when the key existed.
    fn delete(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        let old = match self.entries.remove(key).map_err(fail)? {
            None => return Ok(false),
            Some(old) => indexed(old.value()),
        };
        if let Some(old) = old {
            self.unindex(key, &old)?;
        }
        Ok(true)
    }

    fn unindex(&mut self, key: &[u8], old: &Entry) -> Result<(), StoreError> {
        if let Some(at) = old.expires_at {
            self.expiry.remove((at, key)).map_err(fail)?;
        }
        for tag in old.tags() {
            self.tags.remove((tag.as_str(), key)).map_err(fail)?;
        }
        Ok(())
    }
}

/// The decoded entry when it has index rows (an expiry or tags), else `None`: most
/// entries have neither and are never decoded.
fn indexed(encoded: &[u8]) -> Option<Entry> {
    Entry::peek_header(encoded)
        .filter(|(at, tags)| at.is_some() || *tags > 0)
        .and_then(|_| Entry::decode(encoded))
}

#[async_trait]
impl CacheStore for RedbCacheStore {
    fn kind(&self) -> &'static str {
        "redb"
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        // A point read from redb's page cache takes microseconds: not worth a thread hop.
        let txn = self.db.begin_read().map_err(fail)?;
        let entries = txn.open_table(ENTRIES).map_err(fail)?;
        let found = entries.get(key).map_err(fail)?;
        Ok(found.and_then(|bytes| Entry::decode(bytes.value())))
    }

    async fn apply(&self, batch: Vec<StoreOp>, durable: bool) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || Self::apply_blocking(&db, &batch, durable))
            .await
            .map_err(fail)?
    }

    async fn keys_matching(
        &self,
        pattern: &Pattern,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, StoreError> {
        let db = self.db.clone();
        let pattern = pattern.clone();
        tokio::task::spawn_blocking(move || {
            Self::keys_matching_blocking(&db, &pattern, now_ms, limit)
        })
        .await
        .map_err(fail)?
    }

    async fn delete_matching(&self, pattern: &Pattern) -> Result<Vec<Bytes>, StoreError> {
        let db = self.db.clone();
        let pattern = pattern.clone();
        tokio::task::spawn_blocking(move || {
            Self::delete_blocking(&db, |entries| {
                // Collect, then remove in key order: redb's extract_from_if measured
                // several times slower than point removals along the range.
                let keys = Self::matching_keys(entries, &pattern)?;
                let mut removed = Vec::with_capacity(keys.len());
                for key in keys {
                    if let Some(old) = entries.remove(key.as_ref()).map_err(fail)? {
                        let old = indexed(old.value());
                        removed.push((key, old));
                    }
                }
                Ok(removed)
            })
        })
        .await
        .map_err(fail)?
    }

    async fn delete_tagged(&self, tags: &[String]) -> Result<Vec<Bytes>, StoreError> {
        let db = self.db.clone();
        let tags = tags.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut txn = db.begin_write().map_err(fail)?;
            txn.set_durability(Durability::None).map_err(fail)?;
            let mut deleted = Vec::new();
            {
                let mut tables = Tables::open(&txn)?;
                for key in Self::tagged_keys(&tables.tags, &tags)? {
                    if tables.delete(&key)? {
                        deleted.push(key);
                    }
                }
            }
            txn.commit().map_err(fail)?;
            Ok(deleted)
        })
        .await
        .map_err(fail)?
    }

    async fn covered_keys(&self, target: &Target) -> Result<Option<Vec<Bytes>>, StoreError> {
        let db = self.db.clone();
        let target = target.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(fail)?;
            let keys = match &target {
                Target::Pattern(pattern) => {
                    Self::matching_keys(&txn.open_table(ENTRIES).map_err(fail)?, pattern)?
                }
                Target::Tags(tags) => {
                    Self::tagged_keys(&txn.open_table(TAGS).map_err(fail)?, tags)?
                }
            };
            Ok(Some(keys))
        })
        .await
        .map_err(fail)?
    }

    async fn scan(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<(Vec<Bytes>, bool), StoreError> {
        let db = self.db.clone();
        let after = after.map(<[u8]>::to_vec);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(fail)?;
            let entries = txn.open_table(ENTRIES).map_err(fail)?;
            let range = match &after {
                Some(after) => entries.range::<&[u8]>((
                    std::ops::Bound::Excluded(after.as_slice()),
                    std::ops::Bound::Unbounded,
                )),
                None => entries.range::<&[u8]>(..),
            }
            .map_err(fail)?;
            let mut keys = Vec::with_capacity(count);
            for item in range {
                let (key, _) = item.map_err(fail)?;
                if keys.len() == count {
                    return Ok((keys, true));
                }
                keys.push(Bytes::copy_from_slice(key.value()));
            }
            Ok((keys, false))
        })
        .await
        .map_err(fail)?
    }

    async fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Bytes>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(fail)?;
            let expiry = txn.open_table(EXPIRY).map_err(fail)?;
            let empty: &[u8] = &[];
            let mut keys = Vec::new();
            for item in expiry.range((0u64, empty)..).map_err(fail)? {
                let (row, _) = item.map_err(fail)?;
                let (at, key) = row.value();
                if at > now_ms || keys.len() >= limit {
                    break;
                }
                keys.push(Bytes::copy_from_slice(key));
            }
            Ok(keys)
        })
        .await
        .map_err(fail)?
    }

    async fn key_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(fail)?;
        let entries = txn.open_table(ENTRIES).map_err(fail)?;
        entries.len().map_err(fail)
    }

    async fn clear(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut txn = db.begin_write().map_err(fail)?;
            txn.set_durability(Durability::Immediate).map_err(fail)?;
            txn.delete_table(ENTRIES).map_err(fail)?;
            txn.delete_table(EXPIRY).map_err(fail)?;
            txn.delete_table(TAGS).map_err(fail)?;
            txn.open_table(ENTRIES).map_err(fail)?;
            txn.open_table(EXPIRY).map_err(fail)?;
            txn.open_table(TAGS).map_err(fail)?;
            txn.commit().map_err(fail)
        })
        .await
        .map_err(fail)?
    }
}
