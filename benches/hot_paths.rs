//! In-process hot paths of the queue and the SQL API, without sockets or disks:
//! validating an enqueue and encoding the job as stored, normalizing a statement for
//! the statistics, and the cache key of a named query. Run with
//! `cargo bench --bench hot_paths`.

use criterion::{Criterion, criterion_group, criterion_main};
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

criterion_group!(benches, queue, sql);
criterion_main!(benches);
