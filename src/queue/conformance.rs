//! One behaviour suite for every [`QueueStore`]: each test below is a plain function
//! over a [`Harness`], and `conformance_suite!` runs every one of them against redb and
//! against PostgreSQL (garage's `test_suite(db)` pattern). A behaviour that differs
//! between backends fails here, not in production.
//!
//! PostgreSQL runs read `KEEL_TEST_POSTGRES_URL` (exported by `scripts/test`); each
//! test creates its own schema `keel_test_<random>` and drops it when the harness
//! goes, even after a failed assertion. Without the variable the PostgreSQL tests say
//! they are skipped, or fail under `KEEL_REQUIRE_EXTERNAL=1`.
//!
//! Time is a [`ManualClock`] shared by the store and the test: nothing sleeps.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::job::BackoffSpec;
use super::pg_store::{PgQueueStore, PgSettings};
use super::redb_store::RedbQueueStore;
use super::{
    Ack, BackoffKind, CatchUp, DurationValue, JobLimits, JobSpec, JobState, Lease, ManualClock,
    NewJob, Queue, QueueError, QueueMetrics, QueueStore, ReserveRequest, RetentionPolicies,
    Schedule, ScheduleSpec, Wakeups,
};
use crate::config::{QueueConfig, QueueDefinition, Retention as RetentionConfig, Span};

/// 2027-01-15T10:00:30Z: half a minute past a minute boundary (the schedule tests).
const START: u64 = 1_800_007_230_000;
const LEASE_MS: u64 = 10_000;

/// A store under test, its clock, and what to clean up after it.
pub(super) struct Harness {
    pub store: Arc<dyn QueueStore>,
    pub clock: Arc<ManualClock>,
    pub wakeups: Arc<Wakeups>,
    /// The redb file, for [`Harness::reopen`].
    redb_path: Option<std::path::PathBuf>,
    /// The PostgreSQL schema to drop when done (set for PostgreSQL harnesses).
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// Retention the suite relies on: `kept` keeps 2 completed and 1 dead job, `aged`
/// keeps completed jobs for a minute.
fn policies() -> RetentionPolicies {
    let mut config = QueueConfig::default();
    config.queues.insert(
        "kept".to_owned(),
        QueueDefinition {
            remove_on_complete: Some(RetentionConfig {
                count: Some(2),
                age: None,
            }),
            remove_on_fail: Some(RetentionConfig {
                count: Some(1),
                age: None,
            }),
            ..QueueDefinition::default()
        },
    );
    config.queues.insert(
        "aged".to_owned(),
        QueueDefinition {
            remove_on_complete: Some(RetentionConfig {
                count: None,
                age: Some(Span(Duration::from_secs(60))),
            }),
            ..QueueDefinition::default()
        },
    );
    RetentionPolicies::from_config(&config)
}

fn metrics() -> QueueMetrics {
    QueueMetrics::new(&prometheus::Registry::new())
}

/// The PostgreSQL to test against, or `None` (after saying so) when there is none.
pub(super) fn postgres_url() -> Option<String> {
    match std::env::var("KEEL_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("KEEL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "KEEL_TEST_POSTGRES_URL is not set and KEEL_REQUIRE_EXTERNAL=1: the PostgreSQL \
                 queue tests must run (scripts/test starts PostgreSQL and sets it)"
            );
            // Shown by the test harness; a silent pass would hide that nothing ran.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIPPED: KEEL_TEST_POSTGRES_URL is not set (scripts/test sets it)");
            }
            None
        }
    }
}

pub(super) fn test_schema() -> String {
    format!("keel_test_{:016x}", super::random_u64())
}

impl Harness {
    pub(super) async fn redb() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.redb");
        let db = Arc::new(::redb::Database::create(&path).unwrap());
        let clock = Arc::new(ManualClock::new(START));
        let wakeups = Arc::new(Wakeups::default());
        let store = RedbQueueStore::open(
            db,
            &path,
            clock.clone(),
            wakeups.clone(),
            metrics(),
            policies(),
        )
        .unwrap();
        Harness {
            store: Arc::new(store),
            clock,
            wakeups,
            redb_path: Some(path),
            pg: None,
            _dir: Some(dir),
        }
    }

    pub(super) async fn postgres() -> Option<Harness> {
        let url = postgres_url()?;
        let schema = test_schema();
        let clock = Arc::new(ManualClock::new(START));
        let wakeups = Arc::new(Wakeups::default());
        let store = open_pg(&url, &schema, clock.clone(), wakeups.clone()).await;
        Some(Harness {
            store: Arc::new(store),
            clock,
            wakeups,
            redb_path: None,
            pg: Some((url, schema)),
            _dir: None,
        })
    }

    /// A second node on the same PostgreSQL schema: its own wake-ups, the same clock.
    pub(super) async fn other_node(&self) -> Harness {
        let (url, schema) = self.pg.clone().expect("a PostgreSQL harness");
        let wakeups = Arc::new(Wakeups::default());
        let store = open_pg(&url, &schema, self.clock.clone(), wakeups.clone()).await;
        Harness {
            store: Arc::new(store),
            clock: self.clock.clone(),
            wakeups,
            redb_path: None,
            // The first node drops the schema.
            pg: None,
            _dir: None,
        }
    }

    /// Keel restarting: the store is closed and opened again on the same file or schema.
    pub(super) async fn reopen(&mut self) {
        if let Some((url, schema)) = &self.pg {
            self.store =
                Arc::new(open_pg(url, schema, self.clock.clone(), self.wakeups.clone()).await);
            return;
        }
        let path = self
            .redb_path
            .clone()
            .expect("a redb or PostgreSQL harness");
        // redb opens a file once per process: the old store (and its writer thread)
        // must let go of it first, so an in-memory store stands in meanwhile.
        let stand_in = ::redb::Database::builder()
            .create_with_backend(::redb::backends::InMemoryBackend::new())
            .unwrap();
        self.store = Arc::new(
            RedbQueueStore::open(
                Arc::new(stand_in),
                &path,
                self.clock.clone(),
                self.wakeups.clone(),
                metrics(),
                policies(),
            )
            .unwrap(),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let db = loop {
            match ::redb::Database::create(&path) {
                Ok(db) => break Arc::new(db),
                Err(error) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "reopen {path:?}: {error}"
                    );
                    tokio::task::yield_now().await;
                }
            }
        };
        self.store = Arc::new(
            RedbQueueStore::open(
                db,
                &path,
                self.clock.clone(),
                self.wakeups.clone(),
                metrics(),
                policies(),
            )
            .unwrap(),
        );
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    fn new_job(&self, spec: JobSpec) -> NewJob {
        spec.validate(&JobLimits::default(), self.now()).unwrap()
    }

    async fn enqueue(&self, queue: &str, spec: JobSpec) -> u64 {
        let answers = self
            .store
            .enqueue(queue, vec![self.new_job(spec)])
            .await
            .unwrap();
        assert!(!answers[0].duplicate);
        answers[0].id
    }

    async fn reserve(&self, queue: &str, max: usize) -> Vec<super::Job> {
        self.store
            .reserve(
                queue,
                Lease {
                    max_jobs: max,
                    lease_ms: Some(LEASE_MS),
                    default_ms: 30_000,
                },
            )
            .await
            .unwrap()
    }

    async fn ack(&self, job: &super::Job) -> Result<super::Job, QueueError> {
        self.store
            .ack(vec![ack_of(job)])
            .await
            .unwrap()
            .pop()
            .unwrap()
    }

    async fn counts(&self, queue: &str) -> super::QueueCounts {
        self.store
            .stats()
            .await
            .unwrap()
            .into_iter()
            .find(|counts| counts.queue == queue)
            .unwrap_or_else(|| super::QueueCounts::empty(queue))
    }

    /// A `Queue` handle over this store (not started), for what the handle drives.
    fn queue(&self) -> Queue {
        Queue::new(
            self.store.clone(),
            self.clock.clone(),
            self.wakeups.clone(),
            metrics(),
            &QueueConfig::default(),
            CancellationToken::new(),
        )
    }
}

async fn open_pg(
    url: &str,
    schema: &str,
    clock: Arc<ManualClock>,
    wakeups: Arc<Wakeups>,
) -> PgQueueStore {
    PgQueueStore::open(
        PgSettings {
            url: url.to_owned(),
            schema: schema.to_owned(),
            pool_size: 8,
            dependency: crate::observe::Dependency::detached("postgres"),
        },
        clock,
        wakeups,
        metrics(),
        policies(),
    )
    .await
    .unwrap_or_else(|error| panic!("cannot open the PostgreSQL queue store at {url}: {error}"))
}

impl Drop for Harness {
    fn drop(&mut self) {
        let Some((url, schema)) = self.pg.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot block on a future: a thread
        // with its own runtime drops the schema, also after a failed assertion.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(PgQueueStore::drop_schema(&url, &schema))
        })
        .join();
        if !std::thread::panicking() {
            dropped.unwrap().unwrap();
        }
    }
}

fn named(name: &str) -> JobSpec {
    JobSpec {
        name: Some(name.to_owned()),
        payload: json!({ "name": name }),
        ..JobSpec::default()
    }
}

fn ack_of(job: &super::Job) -> Ack {
    Ack {
        id: job.id,
        lease_token: job.lease_token.clone().unwrap(),
        result: Some(json!({ "done": job.id })),
    }
}

fn ids(jobs: &[super::Job]) -> Vec<u64> {
    jobs.iter().map(|job| job.id).collect()
}

fn fixed_backoff(attempts: u32, delay_ms: u64) -> JobSpec {
    JobSpec {
        attempts: Some(attempts),
        backoff: Some(BackoffSpec {
            kind: BackoffKind::Fixed,
            delay: Some(DurationValue(Duration::from_millis(delay_ms))),
            max_delay: None,
            jitter: None,
        }),
        ..named("retried")
    }
}

// --- the suite ----------------------------------------------------------------------

pub(super) async fn enqueue_reserve_ack(h: &Harness) {
    let id = h.enqueue("q", named("a")).await;
    let job = h.store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Waiting);
    assert_eq!((job.queue.as_str(), job.name.as_str()), ("q", "a"));
    assert_eq!(job.payload, json!({ "name": "a" }));
    assert_eq!(job.created_at, START);

    let leased = h.reserve("q", 10).await;
    assert_eq!(ids(&leased), vec![id]);
    let job = &leased[0];
    assert_eq!(job.state, JobState::Active);
    assert_eq!(job.attempts_made, 1);
    assert_eq!(job.started_at, Some(START));
    assert_eq!(job.lease_deadline, Some(START + LEASE_MS));
    assert!(job.lease_token.is_some());
    assert!(
        h.reserve("q", 10).await.is_empty(),
        "a leased job is not handed out twice"
    );
    assert_eq!(h.counts("q").await.active, 1);

    h.advance(5);
    let done = h.ack(job).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.finished_at, Some(START + 5));
    assert_eq!(done.result, Some(json!({ "done": id })));
    assert_eq!(done.lease_token, None);
    assert_eq!(h.store.get(id).await.unwrap().unwrap(), done);
    let counts = h.counts("q").await;
    assert_eq!((counts.waiting, counts.active, counts.completed), (0, 0, 1));
    // Acking again: the lease is gone.
    assert!(matches!(
        h.ack(job).await,
        Err(QueueError::LeaseLost {
            state: JobState::Completed,
            ..
        })
    ));
    assert!(h.store.get(id + 1000).await.unwrap().is_none());
}

pub(super) async fn batch_enqueue_and_ack(h: &Harness) {
    let jobs = (0..5).map(|i| h.new_job(named(&format!("j{i}")))).collect();
    let answers = h.store.enqueue("batch", jobs).await.unwrap();
    assert_eq!(answers.len(), 5);
    let mut enqueued: Vec<u64> = answers.iter().map(|a| a.id).collect();
    enqueued.dedup();
    assert_eq!(enqueued.len(), 5, "distinct ids");
    let leased = h.reserve("batch", 3).await;
    assert_eq!(ids(&leased), enqueued[..3].to_vec(), "oldest first");
    let mut acks: Vec<Ack> = leased.iter().map(ack_of).collect();
    acks.push(Ack {
        id: enqueued[4],
        lease_token: "not-a-lease".to_owned(),
        result: None,
    });
    acks.push(Ack {
        id: u64::MAX / 4,
        lease_token: "x".to_owned(),
        result: None,
    });
    let results = h.store.ack(acks).await.unwrap();
    assert!(results[..3].iter().all(|r| r.is_ok()));
    assert!(matches!(results[3], Err(QueueError::LeaseLost { .. })));
    assert!(matches!(results[4], Err(QueueError::NotFound(_))));
    let counts = h.counts("batch").await;
    assert_eq!((counts.waiting, counts.completed), (2, 3));
}

pub(super) async fn priorities_then_ids(h: &Harness) {
    let mut made = Vec::new();
    for priority in [0, 5, 5, -1, 10] {
        made.push(
            h.enqueue(
                "p",
                JobSpec {
                    priority: Some(priority),
                    ..named("p")
                },
            )
            .await,
        );
    }
    let leased = h.reserve("p", 10).await;
    assert_eq!(
        ids(&leased),
        vec![made[4], made[1], made[2], made[0], made[3]]
    );
}

pub(super) async fn lease_expiry_returns_the_job_and_refuses_the_stale_token(h: &Harness) {
    let id = h.enqueue("lease", fixed_backoff(3, 1000)).await;
    let first = h.reserve("lease", 1).await.remove(0);
    let report = h.store.run_due().await.unwrap();
    assert!(report.expired.is_empty());
    assert_eq!(report.next_due, Some(START + LEASE_MS));

    h.advance(LEASE_MS);
    let report = h.store.run_due().await.unwrap();
    assert_eq!(report.expired, vec![("lease".to_owned(), 1, 0)]);
    let job = h.store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Waiting);
    assert_eq!(job.attempts_made, 1, "the expired attempt counts");
    assert_eq!(job.last_error.as_deref(), Some("lease expired"));

    let second = h.reserve("lease", 1).await.remove(0);
    assert_eq!(second.attempts_made, 2);
    assert_ne!(second.lease_token, first.lease_token);
    let stale = first.lease_token.as_deref().unwrap();
    for refused in [
        h.ack(&first).await.map(|_| ()),
        h.store.fail(id, stale, "late").await.map(|_| ()),
        h.store.heartbeat(id, stale, None, 1000).await.map(|_| ()),
        h.store.progress(id, stale, json!(50)).await,
    ] {
        assert!(
            matches!(
                refused,
                Err(QueueError::LeaseLost {
                    state: JobState::Active,
                    ..
                })
            ),
            "{refused:?}"
        );
    }
    assert!(matches!(
        h.store.fail(u64::MAX / 4, stale, "x").await,
        Err(QueueError::NotFound(_))
    ));
    // The current holder is untouched and can finish.
    assert_eq!(h.ack(&second).await.unwrap().state, JobState::Completed);
}

pub(super) async fn lease_expiry_on_the_last_attempt_buries_the_job(h: &Harness) {
    let id = h.enqueue("last", fixed_backoff(1, 1000)).await;
    h.reserve("last", 1).await;
    h.advance(LEASE_MS + 1);
    let report = h.store.run_due().await.unwrap();
    assert_eq!(report.expired, vec![("last".to_owned(), 0, 1)]);
    assert_eq!(report.next_due, None);
    let job = h.store.get(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.finished_at, Some(h.now()));
    assert_eq!(h.counts("last").await.dead, 1);
}

pub(super) async fn failures_back_off_then_die(h: &Harness) {
    let id = h.enqueue("fail", fixed_backoff(2, 5000)).await;
    let job = h.reserve("fail", 1).await.remove(0);
    let failed = h
        .store
        .fail(id, job.lease_token.as_deref().unwrap(), "boom")
        .await
        .unwrap();
    assert!(!failed.dead);
    assert_eq!(failed.job.state, JobState::Failed);
    assert_eq!(failed.job.run_at, START + 5000);
    assert_eq!(failed.job.last_error.as_deref(), Some("boom"));
    assert_eq!(h.counts("fail").await.failed, 1);
    assert!(
        h.reserve("fail", 1).await.is_empty(),
        "not before its backoff"
    );

    h.advance(4999);
    let report = h.store.run_due().await.unwrap();
    assert!(report.promoted.is_empty());
    assert_eq!(report.next_due, Some(START + 5000));
    h.advance(1);
    let report = h.store.run_due().await.unwrap();
    assert_eq!(report.promoted, vec![("fail".to_owned(), 1)]);

    let job = h.reserve("fail", 1).await.remove(0);
    assert_eq!(job.attempts_made, 2);
    let long_error = "x".repeat(10_000);
    let failed = h
        .store
        .fail(id, job.lease_token.as_deref().unwrap(), &long_error)
        .await
        .unwrap();
    assert!(failed.dead);
    assert_eq!(failed.job.state, JobState::Dead);
    assert_eq!(failed.job.last_error.as_ref().map(String::len), Some(4096));
    let counts = h.counts("fail").await;
    assert_eq!((counts.failed, counts.dead, counts.active), (0, 1, 0));
}

pub(super) async fn heartbeat_and_progress(h: &Harness) {
    let id = h
        .enqueue(
            "beat",
            JobSpec {
                timeout: Some(DurationValue(Duration::from_secs(60))),
                ..named("beat")
            },
        )
        .await;
    let job = h.reserve("beat", 1).await.remove(0);
    let token = job.lease_token.clone().unwrap();
    h.advance(1000);
    let beat = h.store.heartbeat(id, &token, None, 1).await.unwrap();
    assert_eq!(
        beat.lease_deadline,
        Some(START + 1000 + 60_000),
        "the job's timeout"
    );
    let beat = h.store.heartbeat(id, &token, Some(5000), 1).await.unwrap();
    assert_eq!(beat.lease_deadline, Some(START + 1000 + 5000));
    h.store
        .progress(id, &token, json!({ "pct": 40 }))
        .await
        .unwrap();
    let stored = h.store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.progress, Some(json!({ "pct": 40 })));
    assert_eq!(stored.lease_deadline, Some(START + 6000));
    // The extended lease is the one that expires.
    h.advance(4999);
    assert!(h.store.run_due().await.unwrap().expired.is_empty());
    h.advance(1);
    assert_eq!(
        h.store.run_due().await.unwrap().expired,
        vec![("beat".to_owned(), 1, 0)]
    );
}

pub(super) async fn delayed_jobs_wait_for_their_time(h: &Harness) {
    let id = h
        .enqueue(
            "later",
            JobSpec {
                delay: Some(DurationValue(Duration::from_secs(10))),
                ..named("later")
            },
        )
        .await;
    let job = h.store.get(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.run_at), (JobState::Delayed, START + 10_000));
    assert_eq!(h.counts("later").await.delayed, 1);
    assert!(h.reserve("later", 1).await.is_empty());
    assert_eq!(
        h.store.run_due().await.unwrap().next_due,
        Some(START + 10_000)
    );
    h.advance(10_000);
    let report = h.store.run_due().await.unwrap();
    assert_eq!(report.promoted, vec![("later".to_owned(), 1)]);
    assert_eq!(report.next_due, None);
    assert_eq!(ids(&h.reserve("later", 1).await), vec![id]);
}

pub(super) async fn unique_keys(h: &Harness) {
    let keyed = |key: &str| JobSpec {
        unique_key: Some(key.to_owned()),
        ..named("u")
    };
    let first = h.enqueue("uniq", keyed("k")).await;
    let again = h
        .store
        .enqueue("uniq", vec![h.new_job(keyed("k"))])
        .await
        .unwrap();
    assert_eq!((again[0].id, again[0].duplicate), (first, true));
    assert_eq!(again[0].state, JobState::Waiting);
    // The same key in another queue is another key.
    h.enqueue("uniq2", keyed("k")).await;
    // Within one batch, the second is a duplicate of the first.
    let batch = h
        .store
        .enqueue("uniq", vec![h.new_job(keyed("b")), h.new_job(keyed("b"))])
        .await
        .unwrap();
    assert!(!batch[0].duplicate && batch[1].duplicate);
    assert_eq!(batch[0].id, batch[1].id);

    // Held while unfinished: after the ack the key is free again.
    let job = h.reserve("uniq", 1).await.remove(0);
    assert_eq!(job.id, first);
    let again = h
        .store
        .enqueue("uniq", vec![h.new_job(keyed("k"))])
        .await
        .unwrap();
    assert_eq!((again[0].id, again[0].state), (first, JobState::Active));
    h.ack(&job).await.unwrap();
    let fresh = h.enqueue("uniq", keyed("k")).await;
    assert_ne!(fresh, first);

    // `unique_for`: held for the span even after the job finished.
    let timed = JobSpec {
        unique_for: Some(DurationValue(Duration::from_secs(60))),
        ..keyed("t")
    };
    let held = h.enqueue("timed", timed.clone()).await;
    let job = h.reserve("timed", 1).await.remove(0);
    h.ack(&job).await.unwrap();
    let again = h
        .store
        .enqueue("timed", vec![h.new_job(timed.clone())])
        .await
        .unwrap();
    assert_eq!(
        (again[0].id, again[0].state, again[0].duplicate),
        (held, JobState::Completed, true)
    );
    h.advance(60_000);
    assert_ne!(h.enqueue("timed", timed).await, held);

    // Deleting the holder frees its key.
    assert!(h.store.delete(fresh).await.unwrap());
    assert_ne!(h.enqueue("uniq", keyed("k")).await, fresh);
}

pub(super) async fn pause_stops_reserves(h: &Harness) {
    let id = h.enqueue("paused", named("p")).await;
    h.store.set_paused("paused", true).await.unwrap();
    assert!(h.counts("paused").await.paused);
    assert!(h.reserve("paused", 1).await.is_empty());
    h.store.set_paused("paused", false).await.unwrap();
    assert!(!h.counts("paused").await.paused);
    assert_eq!(ids(&h.reserve("paused", 1).await), vec![id]);
    // Pausing a queue that never had a job makes it known.
    h.store.set_paused("empty", true).await.unwrap();
    let empty = h.counts("empty").await;
    assert!(empty.paused && empty.waiting == 0);
}

pub(super) async fn drain_removes_all_but_active(h: &Harness) {
    // One failed job waiting for its retry, two waiting, one delayed, one active.
    let failing = h
        .enqueue(
            "drain",
            JobSpec {
                priority: Some(10),
                ..fixed_backoff(3, 1000)
            },
        )
        .await;
    let job = h.reserve("drain", 1).await.remove(0);
    assert_eq!(job.id, failing);
    h.store
        .fail(failing, job.lease_token.as_deref().unwrap(), "x")
        .await
        .unwrap();
    for _ in 0..3 {
        h.enqueue("drain", named("w")).await;
    }
    let active = h.reserve("drain", 1).await.remove(0);
    h.enqueue(
        "drain",
        JobSpec {
            delay: Some(DurationValue(Duration::from_secs(5))),
            ..named("d")
        },
    )
    .await;
    let counts = h.counts("drain").await;
    assert_eq!(
        (counts.waiting, counts.delayed, counts.failed, counts.active),
        (2, 1, 1, 1)
    );

    assert_eq!(h.store.drain("drain").await.unwrap(), 4);
    let counts = h.counts("drain").await;
    assert_eq!(
        (counts.waiting, counts.delayed, counts.failed, counts.active),
        (0, 0, 0, 1)
    );
    assert!(h.store.get(failing).await.unwrap().is_none());
    assert_eq!(
        h.store.get(active.id).await.unwrap().unwrap().state,
        JobState::Active
    );
    assert_eq!(h.store.drain("drain").await.unwrap(), 0);
    // Nothing drained comes back when its time passes.
    h.advance(5_000);
    assert!(h.store.run_due().await.unwrap().promoted.is_empty());
}

pub(super) async fn retry_dead_revives_jobs(h: &Harness) {
    let mut dead = Vec::new();
    for _ in 0..3 {
        let id = h.enqueue("dead", fixed_backoff(1, 1000)).await;
        let job = h.reserve("dead", 1).await.remove(0);
        h.store
            .fail(id, job.lease_token.as_deref().unwrap(), "x")
            .await
            .unwrap();
        dead.push(id);
    }
    let elsewhere = h.enqueue("other", named("o")).await;
    assert_eq!(h.counts("dead").await.dead, 3);
    // Named ids: only dead jobs of this queue.
    let retried = h
        .store
        .retry_dead("dead", Some(vec![dead[0], elsewhere, u64::MAX / 4]))
        .await
        .unwrap();
    assert_eq!(retried, 1);
    let job = h.store.get(dead[0]).await.unwrap().unwrap();
    assert_eq!((job.state, job.attempts_made), (JobState::Waiting, 0));
    assert_eq!(job.finished_at, None);
    assert_eq!(h.store.retry_dead("dead", None).await.unwrap(), 2);
    let counts = h.counts("dead").await;
    assert_eq!((counts.dead, counts.waiting), (0, 3));
    assert_eq!(h.reserve("dead", 10).await.len(), 3);
}

pub(super) async fn delete_removes_the_job(h: &Harness) {
    let id = h.enqueue("del", named("d")).await;
    let other = h.enqueue("del", named("e")).await;
    h.reserve("del", 1).await;
    assert!(h.store.delete(id).await.unwrap());
    assert!(h.store.get(id).await.unwrap().is_none());
    assert!(!h.store.delete(id).await.unwrap());
    assert!(h.store.delete(other).await.unwrap());
    let counts = h.counts("del").await;
    assert_eq!((counts.waiting, counts.active), (0, 0));
    // The deleted active job's lease no longer expires into anything.
    h.advance(LEASE_MS);
    assert!(h.store.run_due().await.unwrap().expired.is_empty());
}

pub(super) async fn list_pages_in_order(h: &Harness) {
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(h.enqueue("list", named(&format!("l{i}"))).await);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = h
            .store
            .list("list", JobState::Waiting, cursor.as_deref(), 2)
            .await
            .unwrap();
        pages += 1;
        seen.extend(ids(&page.jobs));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, made);
    assert_eq!(pages, 3);

    // Finished jobs list in finish order, not id order.
    let leased = h.reserve("list", 3).await;
    for job in leased.iter().rev() {
        h.advance(1);
        h.ack(job).await.unwrap();
    }
    let page = h
        .store
        .list("list", JobState::Completed, None, 10)
        .await
        .unwrap();
    assert_eq!(ids(&page.jobs), vec![made[2], made[1], made[0]]);
    assert!(page.next.is_none());
    assert!(matches!(
        h.store
            .list("list", JobState::Waiting, Some("nope"), 2)
            .await,
        Err(QueueError::Invalid {
            code: "bad_cursor",
            ..
        })
    ));
}

pub(super) async fn stats_count_every_state(h: &Harness) {
    assert!(h.store.stats().await.unwrap().is_empty());
    h.enqueue("b-stats", named("x")).await;
    h.advance(100);
    h.enqueue("b-stats", named("y")).await;
    h.enqueue(
        "b-stats",
        JobSpec {
            delay: Some(DurationValue(Duration::from_secs(1))),
            ..named("z")
        },
    )
    .await;
    h.enqueue("a-stats", named("x")).await;
    let active = h.reserve("a-stats", 1).await;
    assert_eq!(active.len(), 1);
    let all = h.store.stats().await.unwrap();
    let names: Vec<&str> = all.iter().map(|c| c.queue.as_str()).collect();
    assert_eq!(names, vec!["a-stats", "b-stats"]);
    let b = &all[1];
    assert_eq!((b.waiting, b.delayed, b.active), (2, 1, 0));
    assert_eq!(b.oldest_waiting_since, Some(START));
    let a = &all[0];
    assert_eq!((a.waiting, a.active), (0, 1));
    assert_eq!(a.oldest_waiting_since, None);
}

pub(super) async fn retention_trims_finished_jobs(h: &Harness) {
    let mut done = Vec::new();
    for i in 0..4 {
        let id = h.enqueue("kept", named(&format!("k{i}"))).await;
        let job = h.reserve("kept", 1).await.remove(0);
        h.advance(1);
        h.ack(&job).await.unwrap();
        done.push(id);
    }
    let page = h
        .store
        .list("kept", JobState::Completed, None, 10)
        .await
        .unwrap();
    assert_eq!(ids(&page.jobs), done[2..].to_vec(), "the last two are kept");
    assert_eq!(h.counts("kept").await.completed, 2);
    for _ in 0..2 {
        let id = h.enqueue("kept", fixed_backoff(1, 1)).await;
        let job = h.reserve("kept", 1).await.remove(0);
        h.store
            .fail(id, job.lease_token.as_deref().unwrap(), "x")
            .await
            .unwrap();
    }
    assert_eq!(h.counts("kept").await.dead, 1);

    // Age: completed jobs of `aged` older than a minute go on the next retain.
    let old = h.enqueue("aged", named("old")).await;
    let job = h.reserve("aged", 1).await.remove(0);
    h.ack(&job).await.unwrap();
    h.advance(30_000);
    let young = h.enqueue("aged", named("young")).await;
    let job = h.reserve("aged", 1).await.remove(0);
    h.ack(&job).await.unwrap();
    assert_eq!(h.store.retain("aged").await.unwrap(), 0);
    h.advance(30_001);
    assert_eq!(h.store.retain("aged").await.unwrap(), 1);
    assert!(h.store.get(old).await.unwrap().is_none());
    assert!(h.store.get(young).await.unwrap().is_some());
    assert_eq!(h.counts("aged").await.completed, 1);
}

fn every_second(name: &str, catch_up: CatchUp, last_tick: u64) -> Schedule {
    Schedule {
        name: name.to_owned(),
        queue: format!("{name}-jobs"),
        cron: "* * * * * *".to_owned(),
        timezone: "UTC".to_owned(),
        job_name: name.to_owned(),
        payload: json!({ "from": name }),
        catch_up,
        last_tick: Some(last_tick),
        from_config: false,
    }
}

pub(super) async fn schedules_fire_each_tick_once(h: &Harness) {
    h.store
        .put_schedule(every_second("tick", CatchUp::One, START))
        .await
        .unwrap();
    let tick = START + 1000;
    let job = || Some(h.new_job(named("tick")));
    let fired = h.store.fire_schedule("tick", tick, job()).await.unwrap();
    let fired = fired.expect("the first fire of a tick enqueues");
    let stored = h.store.get(fired.id).await.unwrap().unwrap();
    assert_eq!(stored.queue, "tick-jobs");
    assert!(
        h.store
            .fire_schedule("tick", tick, job())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        h.store
            .fire_schedule("tick", START, job())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        h.store
            .fire_schedule("nope", tick, job())
            .await
            .unwrap()
            .is_none()
    );
    // A skipped tick is recorded without a job.
    assert!(
        h.store
            .fire_schedule("tick", tick + 1000, None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        h.store
            .fire_schedule("tick", tick + 1000, job())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(h.counts("tick-jobs").await.waiting, 1);

    let stored = h.store.schedules().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].last_tick, Some(tick + 1000));
    assert_eq!(stored[0].payload, json!({ "from": "tick" }));
    // Written again with the same timing and no last tick: the fired record stays.
    let mut again = every_second("tick", CatchUp::One, 0);
    again.last_tick = None;
    h.store.put_schedule(again).await.unwrap();
    assert_eq!(
        h.store.schedules().await.unwrap()[0].last_tick,
        Some(tick + 1000)
    );
    // New timing: what is put wins.
    let mut changed = every_second("tick", CatchUp::One, START);
    changed.cron = "*/2 * * * * *".to_owned();
    h.store.put_schedule(changed).await.unwrap();
    assert_eq!(h.store.schedules().await.unwrap()[0].last_tick, Some(START));

    h.store
        .put_schedule(every_second("b", CatchUp::One, START))
        .await
        .unwrap();
    let names: Vec<String> = h
        .store
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["b", "tick"]);
    assert!(h.store.delete_schedule("tick").await.unwrap());
    assert!(!h.store.delete_schedule("tick").await.unwrap());
}

pub(super) async fn schedules_catch_up(h: &Harness) {
    let queue = h.queue();
    h.store
        .put_schedule(every_second("all", CatchUp::All, START))
        .await
        .unwrap();
    h.store
        .put_schedule(every_second("one", CatchUp::One, START))
        .await
        .unwrap();
    h.store
        .put_schedule(every_second("none", CatchUp::None, START))
        .await
        .unwrap();
    h.advance(3_500);
    let next = queue.fire_due_schedules().await.unwrap();
    assert!(next.is_some_and(|next| next > h.now()), "{next:?}");
    assert_eq!(h.counts("all-jobs").await.waiting, 3);
    assert_eq!(h.counts("one-jobs").await.waiting, 1);
    assert_eq!(
        h.counts("none-jobs").await.waiting,
        1,
        "500 ms late is on time"
    );
    // Nothing new is due: a second pass fires nothing.
    queue.fire_due_schedules().await.unwrap();
    assert_eq!(h.counts("all-jobs").await.waiting, 3);
    assert_eq!(h.counts("one-jobs").await.waiting, 1);
    // Far behind: `all` fires every missed tick, `one` and `none` only the latest (for
    // `none` because it is on time: a tick fell within the last second).
    h.advance(60_000);
    queue.fire_due_schedules().await.unwrap();
    assert_eq!(h.counts("all-jobs").await.waiting, 3 + 60);
    assert_eq!(h.counts("one-jobs").await.waiting, 2);
    assert_eq!(h.counts("none-jobs").await.waiting, 2);
}

/// A reserve parked on the handle is woken by the commit of a job, not by a timeout.
pub(super) async fn enqueue_wakes_a_parked_reserve(h: &Harness) {
    let queue = h.queue();
    let parked = tokio::spawn({
        let queue = queue.clone();
        async move {
            queue
                .reserve(
                    "wake",
                    ReserveRequest {
                        max: 1,
                        lease_ms: None,
                        wait: Duration::from_secs(50),
                    },
                )
                .await
        }
    });
    tokio::task::yield_now().await;
    let id = h.enqueue("wake", named("w")).await;
    let jobs = tokio::time::timeout(Duration::from_secs(20), parked)
        .await
        .expect("woken well before the wait ends")
        .unwrap()
        .unwrap();
    assert_eq!(ids(&jobs), vec![id]);
}

// --- through the `Queue` handle --------------------------------------------------------

fn spec(value: Value) -> JobSpec {
    serde_json::from_value(value).expect("job spec")
}

fn take(max: usize) -> ReserveRequest {
    ReserveRequest {
        max,
        lease_ms: None,
        wait: Duration::ZERO,
    }
}

async fn ack(queue: &Queue, id: u64, token: &str) -> Result<(), QueueError> {
    let mut results = queue
        .ack(vec![Ack {
            id,
            lease_token: token.to_owned(),
            result: Some(json!("done")),
        }])
        .await?;
    results.pop().unwrap().map(|_| ())
}

pub(super) async fn failed_jobs_wait_out_their_backoff_then_die_after_the_last_attempt(
    h: &mut Harness,
) {
    let (queue, clock) = (h.queue(), h.clock.clone());
    let job = json!({"attempts": 3, "backoff": {"type": "exponential", "delay": "1s"}});
    let id = queue.enqueue("mail", vec![spec(job)]).await.unwrap()[0].id;

    for (attempt, backoff) in [(1, 1_000u64), (2, 2_000)] {
        let leased = queue.reserve("mail", take(1)).await.unwrap();
        assert_eq!(leased[0].attempts_made, attempt);
        let token = leased[0].lease_token.clone().unwrap();
        let failed = queue.fail(id, &token, "smtp down").await.unwrap();
        assert!(!failed.dead);
        assert_eq!(failed.job.state, JobState::Failed);
        assert_eq!(failed.job.run_at, clock.now() + backoff);

        clock.advance(Duration::from_millis(backoff - 1));
        queue.run_due().await.unwrap();
        assert!(
            queue.reserve("mail", take(1)).await.unwrap().is_empty(),
            "too early"
        );
        clock.advance(Duration::from_millis(1));
        let report = queue.run_due().await.unwrap();
        assert_eq!(report.promoted, [("mail".to_owned(), 1)]);
    }
    let leased = queue.reserve("mail", take(1)).await.unwrap();
    let token = leased[0].lease_token.clone().unwrap();
    let failed = queue.fail(id, &token, "still down").await.unwrap();
    assert!(failed.dead);
    let job = queue.get(id).await.unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.last_error.as_deref(), Some("still down"));

    assert_eq!(queue.retry_dead("mail", None).await.unwrap(), 1);
    let again = queue.reserve("mail", take(1)).await.unwrap();
    assert_eq!(again[0].id, id);
    assert_eq!(
        again[0].attempts_made, 1,
        "a retried dead job gets fresh attempts"
    );
}

pub(super) async fn delayed_jobs_become_runnable_at_their_time_and_the_timer_knows_when(
    h: &mut Harness,
) {
    let (queue, clock) = (h.queue(), h.clock.clone());
    let answer = queue
        .enqueue("later", vec![spec(json!({"delay": "5s"}))])
        .await
        .unwrap();
    assert_eq!(answer[0].state, JobState::Delayed);
    let report = queue.run_due().await.unwrap();
    assert_eq!(report.next_due, Some(START + 5_000));
    clock.advance(Duration::from_millis(4_999));
    queue.run_due().await.unwrap();
    assert!(queue.reserve("later", take(1)).await.unwrap().is_empty());
    clock.advance(Duration::from_millis(1));
    queue.run_due().await.unwrap();
    assert_eq!(queue.reserve("later", take(1)).await.unwrap().len(), 1);

    // run_at in the past is simply runnable.
    let past = queue
        .enqueue("later", vec![spec(json!({"run_at": 1_000}))])
        .await
        .unwrap();
    assert_eq!(past[0].state, JobState::Waiting);
}

pub(super) async fn reserve_takes_higher_priority_first_then_oldest(h: &mut Harness) {
    let queue = h.queue();
    let jobs = [("a", 0), ("b", 10), ("c", 0), ("d", -5), ("e", 10)];
    let specs = jobs
        .iter()
        .map(|(name, priority)| spec(json!({"name": name, "priority": priority})))
        .collect();
    queue.enqueue("p", specs).await.unwrap();
    let order: Vec<String> = queue
        .reserve("p", take(10))
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.name)
        .collect();
    assert_eq!(order, ["b", "e", "a", "c", "d"]);
}

pub(super) async fn unique_keys_return_the_live_job_and_free_up_when_it_finishes_or_the_window_ends(
    h: &mut Harness,
) {
    let (queue, clock) = (h.queue(), h.clock.clone());
    let first = queue
        .enqueue("u", vec![spec(json!({"unique_key": "user:1"}))])
        .await
        .unwrap()[0]
        .clone();
    let again = queue
        .enqueue("u", vec![spec(json!({"unique_key": "user:1"}))])
        .await
        .unwrap()[0]
        .clone();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    // Same key in one batch: the second is the first.
    let batch = queue
        .enqueue(
            "u",
            vec![
                spec(json!({"unique_key": "user:2"})),
                spec(json!({"unique_key": "user:2"})),
            ],
        )
        .await
        .unwrap();
    assert_eq!(batch[1].id, batch[0].id);
    assert!(batch[1].duplicate);

    let leased = queue.reserve("u", take(1)).await.unwrap();
    assert_eq!(leased[0].id, first.id);
    let token = leased[0].lease_token.clone().unwrap();
    ack(&queue, first.id, &token).await.unwrap();
    let after = queue
        .enqueue("u", vec![spec(json!({"unique_key": "user:1"}))])
        .await
        .unwrap();
    assert!(
        !after[0].duplicate,
        "a finished job no longer holds its key"
    );

    // A timed window holds the key even after the job finished, then lets go.
    let timed = json!({"unique_key": "report", "unique_for": "1m"});
    let one = queue.enqueue("t", vec![spec(timed.clone())]).await.unwrap();
    let two = queue.enqueue("t", vec![spec(timed.clone())]).await.unwrap();
    assert!(two[0].duplicate);
    clock.advance(Duration::from_secs(61));
    let three = queue.enqueue("t", vec![spec(timed)]).await.unwrap();
    assert!(!three[0].duplicate);
    assert_ne!(three[0].id, one[0].id);
}

pub(super) async fn an_expired_lease_returns_the_job_and_the_old_token_cannot_ack(h: &mut Harness) {
    let (queue, clock) = (h.queue(), h.clock.clone());
    let id = queue.enqueue("l", vec![spec(json!({}))]).await.unwrap()[0].id;
    let first = queue
        .reserve(
            "l",
            ReserveRequest {
                lease_ms: Some(1_000),
                ..take(1)
            },
        )
        .await
        .unwrap();
    let stale = first[0].lease_token.clone().unwrap();

    // A heartbeat moves the deadline.
    let beat = queue.heartbeat(id, &stale, Some(2_000)).await.unwrap();
    assert_eq!(beat.lease_deadline, Some(START + 2_000));
    clock.advance(Duration::from_millis(2_001));
    let report = queue.run_due().await.unwrap();
    assert_eq!(report.expired, [("l".to_owned(), 1, 0)]);
    assert_eq!(queue.get(id).await.unwrap().state, JobState::Waiting);

    let second = queue.reserve("l", take(1)).await.unwrap();
    assert_eq!(second[0].attempts_made, 2, "the expired lease counted");
    let fresh = second[0].lease_token.clone().unwrap();
    assert_ne!(fresh, stale);
    match ack(&queue, id, &stale).await {
        Err(QueueError::LeaseLost { .. }) => {}
        other => panic!("a stale token must be refused, got {other:?}"),
    }
    assert!(matches!(
        queue.progress(id, &stale, json!(50)).await,
        Err(QueueError::LeaseLost { .. })
    ));
    queue.progress(id, &fresh, json!(50)).await.unwrap();
    ack(&queue, id, &fresh).await.unwrap();
    let done = queue.get(id).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.progress, Some(json!(50)));
    assert_eq!(done.result, Some(json!("done")));
}

pub(super) async fn retention_keeps_the_last_n_finished_jobs(h: &mut Harness) {
    // `kept` keeps its last two completed jobs (the suite's retention policies).
    let queue = h.queue();
    let ids: Vec<u64> = queue
        .enqueue("kept", (0..5).map(|_| spec(json!({}))).collect())
        .await
        .unwrap()
        .iter()
        .map(|answer| answer.id)
        .collect();
    for job in queue.reserve("kept", take(5)).await.unwrap() {
        ack(&queue, job.id, job.lease_token.as_deref().unwrap())
            .await
            .unwrap();
    }
    let kept: Vec<u64> = queue
        .list("kept", JobState::Completed, None, 100)
        .await
        .unwrap()
        .jobs
        .iter()
        .map(|job| job.id)
        .collect();
    assert_eq!(kept, ids[3..]);
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats[0].counts.completed, 2);
    assert!(matches!(
        queue.get(ids[0]).await,
        Err(QueueError::NotFound(_))
    ));
}

pub(super) async fn a_waiting_reserve_is_woken_by_an_enqueue(h: &mut Harness) {
    let queue = h.queue();
    let waiter = {
        let queue = queue.clone();
        tokio::spawn(async move {
            queue
                .reserve(
                    "w",
                    ReserveRequest {
                        wait: Duration::from_secs(30),
                        ..take(1)
                    },
                )
                .await
        })
    };
    // The reserve is parked (nothing to take yet) before the enqueue lands.
    tokio::task::yield_now().await;
    queue.enqueue("w", vec![spec(json!({}))]).await.unwrap();
    let jobs = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken long before its 30 s wait")
        .unwrap()
        .unwrap();
    assert_eq!(jobs.len(), 1);
}

pub(super) async fn a_schedule_fires_once_per_tick_across_a_restart_and_catches_up_by_its_rule(
    h: &mut Harness,
) {
    let clock = h.clock.clone();
    let waiting = |queue: Queue, name: &'static str| async move {
        queue
            .stats()
            .await
            .unwrap()
            .into_iter()
            .find(|stats| stats.counts.queue == name)
            .map_or(0, |stats| stats.counts.waiting)
    };
    let queue = h.queue();
    for (name, catch_up) in [
        ("one", CatchUp::One),
        ("all", CatchUp::All),
        ("none", CatchUp::None),
    ] {
        queue
            .put_schedule(ScheduleSpec {
                name: name.to_owned(),
                queue: name.to_owned(),
                cron: "0 * * * * *".to_owned(),
                timezone: "UTC".to_owned(),
                job: None,
                payload: json!({"from": name}),
                catch_up,
            })
            .await
            .unwrap();
    }
    let next = queue.fire_due_schedules().await.unwrap();
    assert_eq!(next, Some(START + 30_000), "the next minute boundary");
    clock.advance(Duration::from_secs(30));
    queue.fire_due_schedules().await.unwrap();
    queue.fire_due_schedules().await.unwrap();
    for name in ["one", "all", "none"] {
        assert_eq!(
            waiting(queue.clone(), name).await,
            1,
            "{name}: one tick, one job"
        );
    }
    drop(queue);

    // Keel restarts on the same file (schema); the tick that fired does not fire again.
    h.reopen().await;
    let queue = h.queue();
    queue.fire_due_schedules().await.unwrap();
    assert_eq!(waiting(queue.clone(), "one").await, 1);
    drop(queue);

    // Down across three ticks, then back.
    clock.advance(Duration::from_secs(195));
    h.reopen().await;
    let queue = h.queue();
    queue.fire_due_schedules().await.unwrap();
    assert_eq!(
        waiting(queue.clone(), "one").await,
        2,
        "one: once for all missed"
    );
    assert_eq!(
        waiting(queue.clone(), "all").await,
        4,
        "all: each missed tick"
    );
    assert_eq!(
        waiting(queue.clone(), "none").await,
        1,
        "none: missed ticks skipped"
    );
    let job = queue
        .list("one", JobState::Waiting, None, 10)
        .await
        .unwrap()
        .jobs
        .remove(0);
    assert_eq!(job.name, "one");
    assert_eq!(job.payload, json!({"from": "one"}));
}

macro_rules! conformance_suite {
    ($($test:ident),* $(,)?) => {
        mod redb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let mut harness = super::Harness::redb().await;
                    super::$test(&mut harness).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(mut harness) = super::Harness::postgres().await else { return };
                    super::$test(&mut harness).await;
                }
            )*
        }
    };
}

conformance_suite!(
    enqueue_reserve_ack,
    batch_enqueue_and_ack,
    priorities_then_ids,
    lease_expiry_returns_the_job_and_refuses_the_stale_token,
    lease_expiry_on_the_last_attempt_buries_the_job,
    failures_back_off_then_die,
    heartbeat_and_progress,
    delayed_jobs_wait_for_their_time,
    unique_keys,
    pause_stops_reserves,
    drain_removes_all_but_active,
    retry_dead_revives_jobs,
    delete_removes_the_job,
    list_pages_in_order,
    stats_count_every_state,
    retention_trims_finished_jobs,
    schedules_fire_each_tick_once,
    schedules_catch_up,
    enqueue_wakes_a_parked_reserve,
    failed_jobs_wait_out_their_backoff_then_die_after_the_last_attempt,
    delayed_jobs_become_runnable_at_their_time_and_the_timer_knows_when,
    reserve_takes_higher_priority_first_then_oldest,
    unique_keys_return_the_live_job_and_free_up_when_it_finishes_or_the_window_ends,
    an_expired_lease_returns_the_job_and_the_old_token_cannot_ack,
    retention_keeps_the_last_n_finished_jobs,
    a_waiting_reserve_is_woken_by_an_enqueue,
    a_schedule_fires_once_per_tick_across_a_restart_and_catches_up_by_its_rule,
);

/// What only a shared PostgreSQL can show: several nodes on one schema.
mod scaled_out {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;

    /// A plain connection for looking at (and cutting) the store's own connections.
    async fn admin(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Waits until `n` LISTEN connections of this schema's stores are up.
    async fn listeners_up(admin: &tokio_postgres::Client, schema: &str, n: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let row = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                    &[&format!("keel-queue-{schema}")],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} LISTEN connections"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pg_of(h: &Harness) -> (String, String) {
        h.pg.clone().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_complete_each_job_exactly_once() {
        let Some(a) = Harness::postgres().await else {
            return;
        };
        let b = a.other_node().await;
        const JOBS: usize = 400;
        for batch in 0..JOBS / 100 {
            let jobs = (0..100)
                .map(|i| a.new_job(named(&format!("j{batch}-{i}"))))
                .collect();
            a.store.enqueue("shared", jobs).await.unwrap();
        }
        let completed = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for store in [&a.store, &a.store, &b.store, &b.store] {
            let (store, completed) = (store.clone(), completed.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let lease = Lease {
                        max_jobs: 7,
                        lease_ms: Some(LEASE_MS),
                        default_ms: LEASE_MS,
                    };
                    let jobs = store.reserve("shared", lease).await.unwrap();
                    if jobs.is_empty() {
                        let stats = store.stats().await.unwrap();
                        if stats.iter().all(|c| c.queue != "shared" || c.waiting == 0) {
                            return;
                        }
                        continue;
                    }
                    let acks = jobs.iter().map(ack_of).collect();
                    for result in store.ack(acks).await.unwrap() {
                        let job = result.expect("the lease holder's ack is accepted");
                        completed.lock().unwrap().push(job.id);
                    }
                }
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        let completed = completed.lock().unwrap().clone();
        let distinct: HashSet<u64> = completed.iter().copied().collect();
        assert_eq!(completed.len(), JOBS, "every job completed once");
        assert_eq!(distinct.len(), JOBS, "no job completed twice");
        let counts = a.counts("shared").await;
        assert_eq!(
            (counts.waiting, counts.active, counts.completed),
            (0, 0, JOBS as u64),
            "the striped counters add up across nodes"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_fired_by_two_nodes_enqueues_one_job() {
        let Some(a) = Harness::postgres().await else {
            return;
        };
        let b = a.other_node().await;
        a.store
            .put_schedule(every_second("shared", CatchUp::One, START))
            .await
            .unwrap();
        const TICKS: u64 = 25;
        for i in 1..=TICKS {
            let tick = START + i * 1000;
            let (x, y) = tokio::join!(
                a.store
                    .fire_schedule("shared", tick, Some(a.new_job(named("s")))),
                b.store
                    .fire_schedule("shared", tick, Some(b.new_job(named("s")))),
            );
            let fired = [x.unwrap(), y.unwrap()];
            assert_eq!(
                fired.iter().filter(|f| f.is_some()).count(),
                1,
                "tick {i}: {fired:?}"
            );
        }
        assert_eq!(a.counts("shared-jobs").await.waiting, TICKS);

        // Both nodes' schedulers catching up at once: still one job per tick.
        a.advance((TICKS + 5) * 1000);
        let (qa, qb) = (a.queue(), b.queue());
        let (x, y) = tokio::join!(qa.fire_due_schedules(), qb.fire_due_schedules());
        x.unwrap();
        y.unwrap();
        assert_eq!(a.counts("shared-jobs").await.waiting, TICKS + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_on_one_node_wakes_a_reserve_parked_on_another() {
        let Some(a) = Harness::postgres().await else {
            return;
        };
        let b = a.other_node().await;
        let (url, schema) = pg_of(&a);
        let admin = admin(&url).await;
        listeners_up(&admin, &schema, 2).await;
        let parked = park(&b, "remote");
        let id = a.enqueue("remote", named("r")).await;
        let jobs = tokio::time::timeout(Duration::from_secs(20), parked)
            .await
            .expect("woken by the NOTIFY, well before the wait ends")
            .unwrap()
            .unwrap();
        assert_eq!(ids(&jobs), vec![id]);
    }

    fn park(
        h: &Harness,
        queue: &'static str,
    ) -> tokio::task::JoinHandle<Result<Vec<super::super::Job>, QueueError>> {
        let handle = h.queue();
        tokio::spawn(async move {
            handle
                .reserve(
                    queue,
                    ReserveRequest {
                        max: 1,
                        lease_ms: None,
                        wait: Duration::from_secs(50),
                    },
                )
                .await
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovers_after_postgresql_drops_its_connections() {
        let Some(a) = Harness::postgres().await else {
            return;
        };
        let b = a.other_node().await;
        let (url, schema) = pg_of(&a);
        let admin = admin(&url).await;
        a.enqueue("before", named("b")).await;
        listeners_up(&admin, &schema, 2).await;

        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1",
                &[&format!("keel-queue-{schema}")],
            )
            .await
            .unwrap();

        // Calls on cut connections fail as "unavailable", never as a success; the pool
        // replaces them without help.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut answered = Vec::new();
        while answered.len() < 3 {
            match a.store.enqueue("after", vec![a.new_job(named("a"))]).await {
                Ok(enqueued) => answered.push(enqueued[0].id),
                Err(QueueError::Unavailable(_)) => {}
                Err(other) => panic!("a cut connection is `Unavailable`: {other:?}"),
            }
            assert!(tokio::time::Instant::now() < deadline, "the pool recovers");
        }
        for id in &answered {
            assert!(
                a.store.get(*id).await.unwrap().is_some(),
                "acknowledged means stored"
            );
        }
        // The LISTEN connections come back too, and carry wake-ups again.
        listeners_up(&admin, &schema, 2).await;
        let parked = park(&b, "after-wake");
        let id = a.enqueue("after-wake", named("w")).await;
        let jobs = tokio::time::timeout(Duration::from_secs(20), parked)
            .await
            .expect("woken across nodes after the reconnect")
            .unwrap()
            .unwrap();
        assert_eq!(ids(&jobs), vec![id]);
    }

    /// Needs no PostgreSQL: nothing listens on the port, or something listens and never
    /// answers. Either way opening fails in seconds, as `Unavailable`.
    #[tokio::test]
    async fn opening_fails_fast_when_postgresql_is_unreachable() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let refused_port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        for port in [refused_port, silent.local_addr().unwrap().port()] {
            let started = std::time::Instant::now();
            let opened = PgQueueStore::open(
                PgSettings {
                    url: format!("postgres://keel@127.0.0.1:{port}/keel"),
                    schema: test_schema(),
                    pool_size: 2,
                    dependency: crate::observe::Dependency::detached("postgres"),
                },
                Arc::new(ManualClock::new(START)),
                Arc::new(Wakeups::default()),
                metrics(),
                policies(),
            )
            .await;
            assert!(
                matches!(opened, Err(QueueError::Unavailable(_))),
                "port {port}: {:?}",
                opened.err()
            );
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{:?}",
                started.elapsed()
            );
        }
    }
}
