//! L2 on a Redis server shared by several keel nodes (`cache.l2 = "redis://..."`).
//!
//! Layout, everything under the configured prefix (`cache.redis_prefix`, `keel:` by
//! default): `{prefix}c:{key}` holds the encoded entry (`Entry::encode`, the same bytes
//! redb stores) with a Redis-native expiry (`PXAT`), so Redis expires keys itself and
//! [`CacheStore::expired`] has nothing to report; `{prefix}t:{tag}` is a set of the keys
//! written with that tag. Tag sets are not cleaned when a key is overwritten without
//! the tag, deleted or expires: invalidating a tag checks each member's current tags
//! (inside one Lua script, so atomically) and deletes only those that still carry it.
//! A set is dropped when its tag is invalidated.
//!
//! Every change is published on `{prefix}invalidate` (in the same MULTI as the change,
//! so the message follows it) for the other nodes' L1. Messages carry this node's id so
//! a node skips its own.
//!
//! What Redis cannot do like redb: it has no key order, so patterns and `scan` use
//! SCAN over the prefix (the literal prefix narrows the MATCH, not the work: Redis
//! visits every key) and `scan` sorts what it collected; `key_count` counts with SCAN.
//! Pattern deletes are done page by page with UNLINK, not in one atomic step: a key
//! written while one runs may survive it. Durability is Redis's own (its `appendfsync`
//! and snapshots); `apply(_, durable)` cannot ask for more.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::entry::Entry;
use super::glob::Pattern;
use super::store::{CacheStore, RemoteInvalidation, StoreError, StoreOp};
use crate::redis_client::{RedisCallError, RedisClient, is_stale_connection};

/// Keys asked for per SCAN step and unlinked per round trip.
const PAGE: usize = 1000;
/// Keys per published message at most, so one large batch does not make one huge
/// message every node must parse at once.
const KEYS_PER_MESSAGE: usize = 512;
/// Wait between attempts to re-subscribe while Redis is away (a retry delay, not
/// synchronisation).
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);

const KIND_KEYS: u8 = b'k';
const KIND_PATTERN: u8 = b'p';
const KIND_TAGS: u8 = b't';
const KIND_ALL: u8 = b'a';

/// Deletes the members of the tag sets in KEYS that still carry one of the tags in
/// ARGV[2..] (their entry is re-read and its tag list parsed), drops the sets, and
/// returns the deleted keys (without the prefix in ARGV[1]). One script, so no write
/// from another node lands between the check and the delete.
const DELETE_TAGGED: &str = r#"
local function has_tag(value, wanted)
  if #value < 10 then return false end
  local count = string.byte(value, 9) + 256 * string.byte(value, 10)
  local at = 11
  for _ = 1, count do
    local len = string.byte(value, at) + 256 * string.byte(value, at + 1)
    if wanted[string.sub(value, at + 2, at + 1 + len)] then return true end
    at = at + 2 + len
  end
  return false
end
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local removed = {}
for _, set in ipairs(KEYS) do
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    local full = ARGV[1] .. member
    local value = redis.call('GET', full)
    if value and has_tag(value, wanted) then
      redis.call('UNLINK', full)
      table.insert(removed, member)
    end
  end
  redis.call('UNLINK', set)
end
return removed
"#;

pub struct RedisCacheStore {
    redis: Arc<RedisClient>,
    /// The configured prefix, e.g. `keel:`.
    prefix: String,
    /// `{prefix}c:`: entries.
    entries: Vec<u8>,
    channel: String,
    /// Random per process: tells this node's messages from the others'.
    node: u64,
    l1_max_age: Duration,
    delete_tagged: redis::Script,
    /// Handed to the cache once; the subscriber task feeds it.
    remote: Mutex<Option<mpsc::UnboundedReceiver<RemoteInvalidation>>>,
    remote_sender: mpsc::UnboundedSender<RemoteInvalidation>,
    /// Stops the subscriber and probe tasks when the store goes away.
    stop: CancellationToken,
}

fn fail(error: RedisCallError) -> StoreError {
    StoreError(error.0)
}

/// Escapes Redis glob specials so `text` matches only itself in SCAN MATCH.
pub(super) fn escape_glob(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 4);
    for &byte in text {
        if matches!(byte, b'*' | b'?' | b'[' | b']' | b'\\' | b'^' | b'-') {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out
}

impl RedisCacheStore {
    pub fn new(redis: Arc<RedisClient>, prefix: &str, l1_max_age: Duration) -> RedisCacheStore {
        let (remote_sender, remote) = mpsc::unbounded_channel();
        RedisCacheStore {
            redis,
            prefix: prefix.to_owned(),
            entries: format!("{prefix}c:").into_bytes(),
            channel: format!("{prefix}invalidate"),
            node: node_id(),
            l1_max_age,
            delete_tagged: redis::Script::new(DELETE_TAGGED),
            remote: Mutex::new(Some(remote)),
            remote_sender,
            stop: CancellationToken::new(),
        }
    }

    fn entry_key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.entries.len() + key.len());
        full.extend_from_slice(&self.entries);
        full.extend_from_slice(key);
        full
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}t:{tag}", self.prefix)
    }

    /// A message: node id (8 bytes, big-endian), kind, then the payload.
    fn message(&self, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + payload.len());
        out.extend_from_slice(&self.node.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(payload);
        out
    }

    async fn publish(&self, kind: u8, payload: &[u8]) -> Result<(), StoreError> {
        self.redis
            .query::<i64>(
                redis::cmd("PUBLISH")
                    .arg(&self.channel)
                    .arg(self.message(kind, payload)),
            )
            .await
            .map(drop)
            .map_err(fail)
    }

    /// One `SCAN cursor MATCH match_pattern COUNT PAGE`: the next cursor (0 when done)
    /// and the full key names of this page.
    async fn scan_page(
        &self,
        connection: &mut redis::aio::ConnectionManager,
        cursor: u64,
        match_pattern: &[u8],
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        self.redis
            .record(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(match_pattern)
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(connection)
                    .await,
            )
            .map_err(fail)
    }

    /// Every key under `match_pattern` (a Redis glob over full names), stripped of
    /// the entries prefix and kept when `keep` says so, up to `limit`.
    async fn scan_keys(
        &self,
        match_pattern: &[u8],
        limit: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<Bytes>, StoreError> {
        let mut connection = self.redis.connection().await.map_err(fail)?;
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, page) = self
                .scan_page(&mut connection, cursor, match_pattern)
                .await?;
            for full in page {
                if let Some(key) = full.strip_prefix(self.entries.as_slice())
                    && keep(key)
                {
                    keys.push(Bytes::copy_from_slice(key));
                    if keys.len() >= limit {
                        return Ok(keys);
                    }
                }
            }
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// SCAN MATCH for `pattern` among entries: the escaped prefix, then the pattern,
    /// which already is a Redis glob.
    fn match_for(&self, pattern: &Pattern) -> Vec<u8> {
        let mut glob = escape_glob(&self.entries);
        glob.extend_from_slice(pattern.as_bytes());
        glob
    }

    /// Unlinks full names in pages; returns how many existed.
    async fn unlink(&self, names: &[Vec<u8>]) -> Result<Vec<bool>, StoreError> {
        let mut existed = Vec::with_capacity(names.len());
        for page in names.chunks(PAGE) {
            let mut pipe = redis::pipe();
            for name in page {
                pipe.cmd("UNLINK").arg(name);
            }
            let mut connection = self.redis.connection().await.map_err(fail)?;
            let counts: Vec<i64> = self
                .redis
                .record(pipe.query_async(&mut connection).await)
                .map_err(fail)?;
            existed.extend(counts.into_iter().map(|count| count > 0));
        }
        Ok(existed)
    }

    /// Listens on the channel until the store is dropped, re-subscribing whenever the
    /// connection is lost. Every (re)subscription is followed by `All`: messages may
    /// have been missed while it was down.
    async fn subscribe(
        client: redis::Client,
        channel: String,
        node: u64,
        sender: mpsc::UnboundedSender<RemoteInvalidation>,
        stop: CancellationToken,
    ) {
        let mut lost = false;
        loop {
            let subscribed = async {
                let mut pubsub =
                    tokio::time::timeout(Duration::from_secs(1), client.get_async_pubsub())
                        .await
                        .map_err(|_| "timed out connecting".to_owned())?
                        .map_err(|error| error.to_string())?;
                pubsub
                    .subscribe(&channel)
                    .await
                    .map_err(|error| error.to_string())?;
                Ok::<_, String>(pubsub)
            };
            let subscribed = tokio::select! {
                _ = stop.cancelled() => return,
                subscribed = subscribed => subscribed,
            };
            match subscribed {
                Ok(pubsub) => {
                    if lost {
                        tracing::info!("cache invalidation channel subscribed again; L1 cleared");
                    }
                    if sender.send(RemoteInvalidation::All).is_err() {
                        return;
                    }
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let message = tokio::select! {
                            _ = stop.cancelled() => return,
                            message = messages.next() => message,
                        };
                        let Some(message) = message else { break };
                        let payload: &[u8] = message.get_payload_bytes();
                        if let Some(invalidation) = decode(payload, node)
                            && sender.send(invalidation).is_err()
                        {
                            return;
                        }
                    }
                    tracing::warn!("cache invalidation channel lost; re-subscribing");
                    lost = true;
                }
                Err(error) => {
                    if !lost {
                        tracing::warn!(%error, "cannot subscribe to cache invalidations; retrying");
                    }
                    lost = true;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
        }
    }
}

impl Drop for RedisCacheStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A random id for this process's messages. A failed random source (never seen on
/// Linux) falls back to the pid and the clock, still distinct between nodes.
fn node_id() -> u64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 8];
    match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => (u64::from(std::process::id()) << 32) ^ super::entry::now_ms(),
    }
}

/// A message from another node, or `None` for our own and for anything malformed.
fn decode(payload: &[u8], node: u64) -> Option<RemoteInvalidation> {
    let origin = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    if origin == node {
        return None;
    }
    let body = &payload[9..];
    match *payload.get(8)? {
        KIND_KEYS => Some(RemoteInvalidation::Keys(
            split(body)?
                .into_iter()
                .map(Bytes::copy_from_slice)
                .collect(),
        )),
        KIND_PATTERN => Some(RemoteInvalidation::Pattern(Pattern::new(body))),
        KIND_TAGS => Some(RemoteInvalidation::Tags(
            split(body)?
                .into_iter()
                .map(|tag| String::from_utf8(tag.to_vec()).ok())
                .collect::<Option<_>>()?,
        )),
        KIND_ALL => Some(RemoteInvalidation::All),
        _ => None,
    }
}

/// Items as `len: u32 BE` + bytes.
fn join<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

fn split(mut body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut items = Vec::new();
    while !body.is_empty() {
        let len = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
        items.push(body.get(4..4 + len)?);
        body = &body[4 + len..];
    }
    Some(items)
}

#[async_trait]
impl CacheStore for RedisCacheStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn l1_max_age(&self) -> Option<Duration> {
        Some(self.l1_max_age)
    }

    fn available(&self) -> Result<(), StoreError> {
        // `check`, not `allow`: asking must not use up the breaker's one probe.
        self.redis
            .dependency()
            .check()
            .map_err(|error| StoreError(error.to_string()))
    }

    fn remote_invalidations(&self) -> Option<mpsc::UnboundedReceiver<RemoteInvalidation>> {
        let remote = self
            .remote
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()?;
        tokio::spawn(Self::subscribe(
            self.redis.client().clone(),
            self.channel.clone(),
            self.node,
            self.remote_sender.clone(),
            self.stop.clone(),
        ));
        tokio::spawn(self.redis.clone().probe(self.stop.clone()));
        Some(remote)
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let found: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(self.entry_key(key)))
            .await
            .map_err(fail)?;
        Ok(found.and_then(|bytes| Entry::decode(&bytes)))
    }

    async fn apply(&self, batch: Vec<StoreOp>, _durable: bool) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut written: Vec<&[u8]> = Vec::with_capacity(batch.len());
        for op in &batch {
            match op {
                StoreOp::Put { key, entry } => {
                    let command = pipe.cmd("SET").arg(self.entry_key(key)).arg(entry.encode());
                    if let Some(at) = entry.expires_at {
                        command.arg("PXAT").arg(at.max(1));
                    }
                    command.ignore();
                    for tag in entry.tags() {
                        pipe.cmd("SADD")
                            .arg(self.tag_key(tag))
                            .arg(key.as_ref())
                            .ignore();
                    }
                    written.push(key);
                }
                StoreOp::Delete { key } => {
                    pipe.cmd("UNLINK").arg(self.entry_key(key)).ignore();
                    written.push(key);
                }
            }
        }
        // In the same transaction, so every node hears of the change only after it.
        for chunk in written.chunks(KEYS_PER_MESSAGE) {
            pipe.cmd("PUBLISH")
                .arg(&self.channel)
                .arg(self.message(KIND_KEYS, &join(chunk.iter().copied())))
                .ignore();
        }
        let mut connection = self.redis.connection().await.map_err(fail)?;
        let mut sent = pipe.query_async::<()>(&mut connection).await;
        if sent.as_ref().is_err_and(is_stale_connection) {
            // Once: the first call after Redis came back can still fail on the dead
            // connection (the manager reconnects only then), while the breaker is
            // already closed (another client's probe, e.g. the shared limits', closed
            // it): the writes in this batch would be refused although Redis is back.
            // Applying a batch twice is harmless: whole values, UNLINKs, set members,
            // invalidation messages.
            sent = pipe.query_async::<()>(&mut connection).await;
        }
        self.redis.record(sent).map_err(fail)
    }

    async fn keys_matching(
        &self,
        pattern: &Pattern,
        _now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>, StoreError> {
        // Redis never returns a key past its expiry, so `now_ms` has nothing to add.
        if pattern.is_exact() {
            let exists: i64 = self
                .redis
                .query(redis::cmd("EXISTS").arg(self.entry_key(pattern.as_bytes())))
                .await
                .map_err(fail)?;
            return Ok(if exists > 0 && limit > 0 {
                vec![Bytes::copy_from_slice(pattern.as_bytes())]
            } else {
                Vec::new()
            });
        }
        // Our matcher has the last word, so Redis's and ours can never disagree.
        self.scan_keys(&self.match_for(pattern), limit, |key| pattern.matches(key))
            .await
    }

    async fn delete_matching(&self, pattern: &Pattern) -> Result<Vec<Bytes>, StoreError> {
        let candidates = if pattern.is_exact() {
            vec![Bytes::copy_from_slice(pattern.as_bytes())]
        } else {
            self.scan_keys(&self.match_for(pattern), usize::MAX, |key| {
                pattern.matches(key)
            })
            .await?
        };
        let names: Vec<Vec<u8>> = candidates.iter().map(|key| self.entry_key(key)).collect();
        let existed = self.unlink(&names).await?;
        let removed = candidates
            .into_iter()
            .zip(existed)
            .filter_map(|(key, existed)| existed.then_some(key))
            .collect();
        self.publish(KIND_PATTERN, pattern.as_bytes()).await?;
        Ok(removed)
    }

    async fn delete_tagged(&self, tags: &[String]) -> Result<Vec<Bytes>, StoreError> {
        let mut invocation = self.delete_tagged.prepare_invoke();
        for tag in tags {
            invocation.key(self.tag_key(tag));
        }
        invocation.arg(self.entries.as_slice());
        for tag in tags {
            invocation.arg(tag.as_str());
        }
        let mut connection = self.redis.connection().await.map_err(fail)?;
        let removed: Vec<Vec<u8>> = self
            .redis
            .record(invocation.invoke_async(&mut connection).await)
            .map_err(fail)?;
        self.publish(KIND_TAGS, &join(tags.iter().map(|tag| tag.as_bytes())))
            .await?;
        Ok(removed.into_iter().map(Bytes::from).collect())
    }

    async fn scan(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<(Vec<Bytes>, bool), StoreError> {
        // Redis has no key order: collect everything past `after`, sort, cut.
        let mut match_all = escape_glob(&self.entries);
        match_all.push(b'*');
        let mut keys = self
            .scan_keys(&match_all, usize::MAX, |key| {
                after.is_none_or(|after| key > after)
            })
            .await?;
        keys.sort_unstable();
        let more = keys.len() > count;
        keys.truncate(count);
        Ok((keys, more))
    }

    async fn expired(&self, _now_ms: u64, _limit: usize) -> Result<Vec<Bytes>, StoreError> {
        // Redis expires entries itself (PXAT); there is nothing to sweep.
        Ok(Vec::new())
    }

    async fn key_count(&self) -> Result<u64, StoreError> {
        let mut match_all = escape_glob(&self.entries);
        match_all.push(b'*');
        let mut count = 0u64;
        self.scan_keys(&match_all, usize::MAX, |_| {
            count += 1;
            false
        })
        .await?;
        Ok(count)
    }

    async fn clear(&self) -> Result<(), StoreError> {
        // Only this keel's keys: the Redis may be shared with anything else.
        let mut match_all = escape_glob(self.prefix.as_bytes());
        match_all.extend_from_slice(b"[ct]:*");
        let mut connection = self.redis.connection().await.map_err(fail)?;
        let mut cursor: u64 = 0;
        loop {
            let (next, page) = self.scan_page(&mut connection, cursor, &match_all).await?;
            if !page.is_empty() {
                self.unlink(&page).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        self.publish(KIND_ALL, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_escape_every_special() {
        assert_eq!(escape_glob(b"keel:c:"), b"keel:c:".to_vec());
        assert_eq!(
            escape_glob(br"a*b?c[d]e\f^g-h"),
            br"a\*b\?c\[d\]e\\f\^g\-h".to_vec()
        );
        // What an escaped prefix matches: itself only (checked with our matcher, which
        // follows Redis's rules).
        let prefix = br"we[i]rd*:";
        let mut glob = escape_glob(prefix);
        glob.push(b'*');
        let pattern = Pattern::new(&glob);
        assert!(pattern.matches(br"we[i]rd*:key"));
        assert!(!pattern.matches(b"weird*:key"));
        assert!(!pattern.matches(br"we[i]rdX:key"));
    }

    #[test]
    fn messages_round_trip_and_skip_our_own() {
        let body = join([&b"a"[..], b"", b"\0\r\n"].into_iter());
        let mut message = 7u64.to_be_bytes().to_vec();
        message.push(KIND_KEYS);
        message.extend_from_slice(&body);
        assert_eq!(decode(&message, 7), None);
        assert_eq!(
            decode(&message, 8),
            Some(RemoteInvalidation::Keys(vec![
                Bytes::from_static(b"a"),
                Bytes::new(),
                Bytes::from_static(b"\0\r\n")
            ]))
        );
        assert_eq!(decode(&[1, 2, 3], 8), None);
    }
}
