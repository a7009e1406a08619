//! One behavioural suite for every `CacheStore`: redb always, Redis when
//! `KEEL_TEST_REDIS_URL` names a server (`scripts/test` sets it). The seam stays honest
//! only if both answer the same way; where they may differ (Redis expires keys itself,
//! redb keeps them until swept) the suite accepts exactly what the trait allows.
//!
//! Redis runs use a random prefix and remove only their own keys (`clear` touches
//! nothing outside the prefix): the server may be shared.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::entry::{Entry, now_ms};
use super::glob::Pattern;
use super::redb_store::RedbCacheStore;
use super::redis_store::RedisCacheStore;
use super::store::{CacheStore, StoreOp};
use super::{Cache, CacheMetrics, Limits};
use crate::observe::{BuildInfo, Dependency, Metrics, Readiness};
use crate::redis_client::RedisClient;

/// The Redis URL for external-store tests, or `None` (after saying so) when they
/// should be skipped. `KEEL_REQUIRE_EXTERNAL=1` turns a missing URL into a failure,
/// so CI cannot pass by skipping.
// A skipped test must say so where `cargo test` shows it: on stderr.
#[allow(clippy::print_stderr)]
pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("KEEL_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() == Ok("1") => {
            panic!("KEEL_REQUIRE_EXTERNAL=1 but KEEL_TEST_REDIS_URL is not set")
        }
        _ => {
            eprintln!(
                "skipped: set KEEL_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to run against Redis"
            );
            None
        }
    }
}

/// A prefix no other run uses.
pub(crate) fn unique_prefix() -> String {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("random");
    format!("keeltest:{:016x}:", u64::from_le_bytes(bytes))
}

/// Removes every key under the prefix, and only those, however the test ends (a
/// failed assertion included).
pub(crate) struct Cleanup(pub(crate) String, pub(crate) String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(mut redis) = redis::Client::open(self.0.as_str()).and_then(|c| c.get_connection())
        else {
            return;
        };
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg(format!("{}*", self.1))
            .query(&mut redis)
            .unwrap_or_default();
        for key in keys {
            let _: redis::RedisResult<i64> = redis::cmd("UNLINK").arg(key).query(&mut redis);
        }
    }
}

pub(crate) fn redis_store(url: &str, prefix: &str, l1_max_age: Duration) -> RedisCacheStore {
    let metrics = Metrics::new(BuildInfo::CURRENT);
    let dependency = Dependency::new("redis", true, &metrics, &Readiness::default());
    let client = RedisClient::new(url, dependency).expect("a valid Redis URL");
    RedisCacheStore::new(Arc::new(client), prefix, l1_max_age)
}

fn entry(value: &str, expires_at: Option<u64>, tags: &[&str]) -> Entry {
    Entry {
        value: Bytes::copy_from_slice(value.as_bytes()),
        expires_at,
        tags: (!tags.is_empty()).then(|| tags.iter().map(|tag| tag.to_string()).collect()),
    }
}

fn put(key: &[u8], entry: Entry) -> StoreOp {
    StoreOp::Put {
        key: Bytes::copy_from_slice(key),
        entry,
    }
}

fn sorted(mut keys: Vec<Bytes>) -> Vec<Bytes> {
    keys.sort();
    keys
}

fn keys(list: &[&[u8]]) -> Vec<Bytes> {
    list.iter().map(|key| Bytes::copy_from_slice(key)).collect()
}

/// The suite. Starts from an empty store and leaves it empty.
async fn suite(store: &dyn CacheStore) {
    store.clear().await.unwrap();
    assert_eq!(store.key_count().await.unwrap(), 0);
    assert_eq!(store.get(b"missing").await.unwrap(), None);

    // Round trip, binary keys included; the last op on a key in a batch wins.
    let later = now_ms() + 3_600_000;
    let tagged = entry("v1", Some(later), &["t1", "t2"]);
    store
        .apply(
            vec![
                put(b"user:1", tagged.clone()),
                put(b"user:2", entry("gone", None, &[])),
                StoreOp::Delete {
                    key: Bytes::from_static(b"user:2"),
                },
                put(b"bin\0\r\nkey", entry("b", None, &[])),
                put(b"user:3", entry("v3", None, &["t2"])),
                put(b"x[1]*", entry("special", None, &[])),
                put(b"x11*", entry("plain", None, &[])),
            ],
            true,
        )
        .await
        .unwrap();
    assert_eq!(store.get(b"user:1").await.unwrap(), Some(tagged));
    assert_eq!(store.get(b"user:2").await.unwrap(), None);
    assert_eq!(
        store.get(b"bin\0\r\nkey").await.unwrap().unwrap().value,
        Bytes::from_static(b"b")
    );
    assert_eq!(store.key_count().await.unwrap(), 5);

    // Patterns: prefix, exact, limit, and keys with glob specials matched literally.
    let now = now_ms();
    assert_eq!(
        sorted(
            store
                .keys_matching(&Pattern::new(b"user:*"), now, 100)
                .await
                .unwrap()
        ),
        keys(&[b"user:1", b"user:3"])
    );
    assert_eq!(
        store
            .keys_matching(&Pattern::new(b"user:1"), now, 100)
            .await
            .unwrap(),
        keys(&[b"user:1"])
    );
    assert_eq!(
        store
            .keys_matching(&Pattern::new(b"user:*"), now, 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .keys_matching(&Pattern::new(br"x\[1\]\*"), now, 100)
            .await
            .unwrap(),
        keys(&[b"x[1]*"])
    );
    assert_eq!(
        sorted(
            store
                .keys_matching(&Pattern::new(b"x[1]1*"), now, 100)
                .await
                .unwrap()
        ),
        keys(&[b"x11*"])
    );

    // Scan: key order, pages, `after` exclusive.
    let (first, more) = store.scan(None, 2).await.unwrap();
    assert_eq!(first, keys(&[b"bin\0\r\nkey", b"user:1"]));
    assert!(more);
    let (rest, more) = store.scan(Some(b"user:1"), 10).await.unwrap();
    assert_eq!(rest, keys(&[b"user:3", b"x11*", b"x[1]*"]));
    assert!(!more);

    // Expired entries are never live: not listed by pattern; `get` may still return
    // one (the caller checks), and after the sweep protocol (`expired`, then delete)
    // it is gone.
    store
        .apply(
            vec![put(b"user:old", entry("old", Some(now_ms() - 1000), &[]))],
            false,
        )
        .await
        .unwrap();
    assert!(
        store
            .get(b"user:old")
            .await
            .unwrap()
            .is_none_or(|entry| entry.is_expired(now_ms()))
    );
    assert!(
        !store
            .keys_matching(&Pattern::new(b"user:*"), now_ms(), 100)
            .await
            .unwrap()
            .contains(&Bytes::from_static(b"user:old"))
    );
    let expired = store.expired(now_ms(), 100).await.unwrap();
    assert!(expired.iter().all(|key| key.as_ref() == b"user:old"));
    store
        .apply(
            expired
                .into_iter()
                .map(|key| StoreOp::Delete { key })
                .collect(),
            false,
        )
        .await
        .unwrap();
    assert_eq!(store.get(b"user:old").await.unwrap(), None);

    // Tags: a key rewritten without a tag is not invalidated by it.
    store
        .apply(vec![put(b"user:4", entry("a", None, &["t1"]))], false)
        .await
        .unwrap();
    store
        .apply(vec![put(b"user:4", entry("b", None, &["t3"]))], false)
        .await
        .unwrap();
    assert_eq!(
        sorted(store.delete_tagged(&["t1".to_owned()]).await.unwrap()),
        keys(&[b"user:1"])
    );
    assert_eq!(store.get(b"user:1").await.unwrap(), None);
    assert!(store.get(b"user:4").await.unwrap().is_some());
    assert_eq!(
        sorted(
            store
                .delete_tagged(&["t2".to_owned(), "t3".to_owned()])
                .await
                .unwrap()
        ),
        keys(&[b"user:3", b"user:4"])
    );
    assert_eq!(
        store.delete_tagged(&["t2".to_owned()]).await.unwrap(),
        Vec::<Bytes>::new()
    );

    // Pattern deletes, literal specials included.
    assert_eq!(
        store
            .delete_matching(&Pattern::new(br"x\[1\]*"))
            .await
            .unwrap(),
        keys(&[b"x[1]*"])
    );
    assert_eq!(
        store.get(b"x11*").await.unwrap().unwrap().value,
        Bytes::from_static(b"plain")
    );
    assert_eq!(
        store.delete_matching(&Pattern::new(b"x11*")).await.unwrap(),
        keys(&[b"x11*"])
    );
    assert_eq!(
        store
            .delete_matching(&Pattern::new(b"nothing:*"))
            .await
            .unwrap(),
        Vec::<Bytes>::new()
    );

    // A thousand keys, past one SCAN page: all counted, scanned and deleted.
    let many: Vec<StoreOp> = (0..1500)
        .map(|index| put(format!("many:{index:05}").as_bytes(), entry("v", None, &[])))
        .collect();
    store.apply(many, false).await.unwrap();
    assert_eq!(store.key_count().await.unwrap(), 1501);
    let (page, more) = store.scan(Some(b"many:00999"), 3).await.unwrap();
    assert_eq!(page, keys(&[b"many:01000", b"many:01001", b"many:01002"]));
    assert!(more);
    assert_eq!(
        store
            .delete_matching(&Pattern::new(b"many:*"))
            .await
            .unwrap()
            .len(),
        1500
    );

    store.clear().await.unwrap();
    assert_eq!(store.key_count().await.unwrap(), 0);
    assert_eq!(store.get(b"bin\0\r\nkey").await.unwrap(), None);
}

#[tokio::test]
async fn redb_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbCacheStore::open(&dir.path().join("cache.redb"), 1 << 20).unwrap();
    suite(&store).await;
}

#[tokio::test]
async fn redis_store_conforms() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix();
    let _cleanup = Cleanup(url.clone(), prefix.clone());
    let store = redis_store(&url, &prefix, Duration::from_secs(5));
    suite(&store).await;
}

/// Polls `check` until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    check().await
}

/// A cache on `store`, once its subscription is up (subscribing clears L1, since
/// messages may have been missed: a test must not mistake that clear for a message).
async fn cache_on(store: RedisCacheStore) -> Cache {
    let metrics = CacheMetrics::new(&prometheus::Registry::new());
    let cache = Cache::new(
        8 << 20,
        Some(Arc::new(store)),
        Limits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
        },
        metrics.clone(),
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            metrics.remote_invalidations.get() >= 1
        })
        .await,
        "subscribed"
    );
    cache
}

/// Two caches on one Redis prefix: what one writes the other reads, and what one
/// invalidates leaves the other's L1 (pub/sub), by key, pattern and tag.
#[tokio::test]
async fn invalidations_reach_the_other_nodes_l1() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix();
    let _cleanup = Cleanup(url.clone(), prefix.clone());
    // A long max age, so only the messages can explain an eviction.
    let a = cache_on(redis_store(&url, &prefix, Duration::from_secs(600))).await;
    let b = cache_on(redis_store(&url, &prefix, Duration::from_secs(600))).await;
    let value = |cache: &Cache, key: &'static [u8]| {
        let cache = cache.clone();
        async move { cache.get(key).await.unwrap().map(|entry| entry.value) }
    };
    // Both subscribed: a write on A then reaches B's L1 as an eviction.
    for (key, tags) in [(&b"k:1"[..], &["t"][..]), (b"k:2", &[]), (b"p:1", &[])] {
        a.set(key, entry("one", None, tags)).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), async || value(&b, b"k:1")
            .await
            .is_some())
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), async || value(&b, b"k:2")
            .await
            .is_some())
        .await
    );
    assert!(
        eventually(Duration::from_secs(5), async || value(&b, b"p:1")
            .await
            .is_some())
        .await
    );

    // B holds "one" in L1 now; A overwrites: B's L1 copy is evicted and it reads "two".
    a.set(b"k:2", entry("two", None, &[])).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || value(&b, b"k:2").await
            == Some(Bytes::from_static(b"two")))
        .await
    );

    a.invalidate(super::Target::Tags(vec!["t".to_owned()]))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_millis(500), async || value(&b, b"k:1")
            .await
            .is_none())
        .await
    );
    a.invalidate(super::Target::Pattern(Pattern::new(b"p:*")))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_millis(500), async || value(&b, b"p:1")
            .await
            .is_none())
        .await
    );
    a.delete(b"k:2").await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), async || value(&b, b"k:2")
            .await
            .is_none())
        .await
    );

    a.clear().await.unwrap();
    a.close().await;
    b.close().await;
}

/// A lost invalidation message cannot leave a stale L1 entry for longer than the max
/// age: another node's write that this cache never hears of (written to Redis here
/// without a message) is read once the entry is older than `l1_max_age`.
#[tokio::test]
async fn l1_max_age_bounds_staleness_when_a_message_is_lost() {
    let Some(url) = redis_url() else { return };
    let prefix = unique_prefix();
    let _cleanup = Cleanup(url.clone(), prefix.clone());
    let cache = cache_on(redis_store(&url, &prefix, Duration::from_millis(200))).await;
    cache.set(b"k", entry("old", None, &[])).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || {
            cache.key_count().await.unwrap() == 1
        })
        .await
    );
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg(format!("{prefix}c:k"))
        .arg(entry("new", None, &[]).encode())
        .query_async(&mut redis)
        .await
        .unwrap();
    let written = std::time::Instant::now();
    assert_eq!(
        cache.get(b"k").await.unwrap().unwrap().value,
        Bytes::from_static(b"old"),
        "served from L1 while young"
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            cache.get(b"k").await.unwrap().unwrap().value == Bytes::from_static(b"new")
        })
        .await
    );
    assert!(written.elapsed() < Duration::from_secs(2));
    cache.clear().await.unwrap();
    cache.close().await;
}
