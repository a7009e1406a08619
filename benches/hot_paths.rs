//! In-process hot paths of the queue, the SQL API and the cache, without sockets:
//! validating an enqueue and encoding the job as stored, normalizing a statement for
//! the statistics, and a cache read that L1 answers, a write L1 takes while redb
//! stores it behind, and an invalidation. Run with `cargo bench --bench hot_paths`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use keel::cache::{Cache, CacheMetrics, Entry, Limits, RedbCacheStore};
use keel::queue::{JobLimits, JobSpec};
use keel::sql::normalize;
use serde_json::json;

fn queue(c: &mut Criterion) {
    let limits = JobLimits::default();
    let body = json!({"name": "email", "payload": {"to": "ada@example.com", "template": "welcome", "n": 42}, "priority": 5, "attempts": 5, "backoff": {"type": "exponential", "delay": "2s"}});
    c.bench_function("queue: parse + validate one job spec", |b| {
        b.iter(|| {
            let spec: JobSpec = serde_json::from_value(body.clone()).unwrap();
            spec.validate(&limits, 1_800_000_000_000).unwrap()
        })
    });
    let job = serde_json::from_value::<JobSpec>(body.clone())
        .unwrap()
        .validate(&limits, 1_800_000_000_000)
        .unwrap()
        .into_job(17, "email", 1_800_000_000_000);
    c.bench_function("queue: encode + decode a stored job", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(&job).unwrap();
            serde_json::from_slice::<keel::queue::Job>(&bytes).unwrap()
        })
    });
}

fn sql(c: &mut Criterion) {
    let statement = "SELECT p.id, p.title, u.name FROM posts p JOIN users u ON u.id = p.user_id \
                     WHERE p.user_id = 42 AND p.status IN ('a', 'b', 'c') ORDER BY p.id DESC LIMIT 20";
    c.bench_function("sql: normalize a statement", |b| {
        b.iter(|| normalize(statement))
    });
}

fn cache(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = runtime.block_on(async {
        let store = RedbCacheStore::open(&dir.path().join("cache.redb"), 64 << 20).unwrap();
        let limits = Limits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
        };
        let metrics = CacheMetrics::new(&prometheus::Registry::new());
        Cache::new(256 << 20, Some(Arc::new(store)), limits, metrics)
    });
    let keys: Vec<Bytes> = (0..10_000)
        .map(|n| Bytes::from(format!("user:{n}")))
        .collect();
    let value = Bytes::from(vec![b'x'; 100]);
    runtime.block_on(async {
        for key in &keys {
            cache.set(key, Entry::new(value.clone())).await.unwrap();
        }
    });
    let mut next = 0;
    c.bench_function("cache: get, answered by L1", |b| {
        b.to_async(&runtime).iter(|| {
            next = (next + 1) % keys.len();
            let (cache, key) = (&cache, &keys[next]);
            async move { cache.get(key).await.unwrap().expect("in L1") }
        })
    });
    c.bench_function("cache: set, 100-byte value (L1, then redb behind)", |b| {
        b.to_async(&runtime).iter(|| {
            next = (next + 1) % keys.len();
            let (cache, key, value) = (&cache, &keys[next], value.clone());
            async move { cache.set(key, Entry::new(value)).await.unwrap() }
        })
    });
    // A SQL write to a table some cached named query reads pays this before it is
    // answered, even when no result is cached at the moment.
    c.bench_function("cache: invalidate a tag no key carries", |b| {
        b.to_async(&runtime).iter(|| {
            let cache = &cache;
            async move {
                let tags = keel::cache::Target::Tags(vec!["sql:t:nothing".to_owned()]);
                cache.invalidate(tags).await.unwrap()
            }
        })
    });
}

criterion_group!(benches, queue, sql, cache);
criterion_main!(benches);
