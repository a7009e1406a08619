//! The scaled-out queue store: jobs in PostgreSQL, shared by every keel node that
//! points `queue.url` at the same database and `queue.schema`.
//!
//! Each operation is one transaction on a pooled connection and is answered only after
//! its COMMIT returned, so no caller hears "ok" for a change PostgreSQL could still
//! lose. Behaviour is the redb store's, operation for operation (the conformance suite
//! in `conformance.rs` runs the same tests against both):
//!
//! - Reserves lock waiting rows with `FOR UPDATE SKIP LOCKED`, highest priority then
//!   oldest first, so nodes reserving at once never wait on or double-lease a job.
//!   Every other change locks the job's row first (`FOR UPDATE`) and checks the lease
//!   token under that lock, so a stale token can never touch a re-leased job.
//! - Time is the injected [`Clock`]'s, passed as parameters (never `now()`), so tests
//!   with a `ManualClock` behave the same on both backends.
//! - Wake-ups: the committing node signals its own [`Wakeups`] after COMMIT, and the
//!   transaction also `NOTIFY`s `keel_queue_<schema>` (PostgreSQL delivers it only on
//!   commit). A dedicated LISTEN connection per node turns the other nodes'
//!   notifications into the same signals, and reconnects with backoff.
//! - A schedule tick is recorded by a conditional `UPDATE ... WHERE last_tick < tick`
//!   in the transaction that enqueues its job: the row lock serialises two nodes firing
//!   the same tick, and the second finds the tick recorded and enqueues nothing.
//! - Counts per queue and state are kept in `counts` (striped rows, summed on read),
//!   changed in the same transaction as the jobs, so stats and retention never count
//!   job rows.
//!
//! Tables, all in the configured schema: `jobs` (id, indexed columns, the job as
//! JSONB), `unique_keys`, `queues` (pause flag), `counts`, `schedules`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::job::{Job, JobState, Millis, NewJob};
use super::store::{
    Ack, DueReport, Effects, Enqueued, Failed, Lease, Page, QueueCounts, QueueStore, Schedule,
    decode_cursor, encode_cursor, truncate,
};
use super::{Clock, QueueError, QueueMetrics, RetentionPolicies, Wakeups, random_u64};
use crate::observe::Dependency;
use crate::pg_pool::{PgPool, PgPoolError};

/// Most rows one maintenance step (due work, retention, drain) touches, as in redb.
const STEP_ROWS: usize = 2_000;
/// Rows each (queue, state) count is spread over, so concurrent transactions on one
/// queue rarely wait on the same counter row.
const COUNT_STRIPES: u64 = 8;
/// How long opening a connection may take before the store reports PostgreSQL
/// unavailable (start-up fails, a request answers 503).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Unacknowledged data (or keepalive probes) for this long means the server is gone.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the store lives: from `queue.url`, `queue.schema` and `queue.pool_size`, and
/// the dependency its calls report to (`postgres`).
#[derive(Clone)]
pub struct PgSettings {
    pub url: String,
    pub schema: String,
    pub pool_size: usize,
    pub dependency: Dependency,
}

/// True for names usable unquoted as a schema and inside the NOTIFY channel name
/// (`keel_queue_` + schema stays within PostgreSQL's 63-byte identifiers).
pub fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    (1..=48).contains(&schema.len())
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub struct PgQueueStore {
    pool: Arc<PgPool>,
    sql: Arc<Statements>,
    channel: String,
    clock: Arc<dyn Clock>,
    wakeups: Arc<Wakeups>,
    metrics: QueueMetrics,
    policies: RetentionPolicies,
    /// Stops the LISTEN task and the pool's probe when the store goes away.
    _tasks: DropGuard,
}

/// A PostgreSQL error as the queue reports it: a lost or refused connection is
/// `Unavailable` (retry later), anything PostgreSQL answered is `Storage`.
fn pg(error: tokio_postgres::Error) -> QueueError {
    match error.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // 08: connection exception, 53: insufficient resources, 57P: shutting down.
            if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") {
                QueueError::Unavailable(format!("PostgreSQL: {db}"))
            } else {
                QueueError::Storage(format!("PostgreSQL: {db}"))
            }
        }
        // The cause (refused, timed out, reset) is in the source, not the message.
        None => match std::error::Error::source(&error) {
            Some(cause) => QueueError::Unavailable(format!("PostgreSQL: {error}: {cause}")),
            None => QueueError::Unavailable(format!("PostgreSQL: {error}")),
        },
    }
}

fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn job_of(row: &Row) -> Result<Job, QueueError> {
    row.try_get::<_, Json<Job>>("body")
        .map(|json| json.0)
        .map_err(|e| QueueError::Storage(format!("undecodable job: {e}")))
}

/// Finished jobs list in finish order; the others in id (enqueue) order.
fn order_of(job: &Job) -> u64 {
    match job.state {
        JobState::Completed | JobState::Dead => job.finished_at.unwrap_or(0),
        _ => job.id,
    }
}

fn state_code(state: JobState) -> i16 {
    i16::from(state.code())
}

/// The SQL of every operation, written once with the schema in it.
struct Statements {
    ddl: String,
    next_id: String,
    get: String,
    load: String,
    insert: String,
    update: String,
    delete: String,
    reserve: String,
    in_state: String,
    due_delayed: String,
    due_leases: String,
    next_due: String,
    list: String,
    unique_lock: String,
    unique_get: String,
    unique_put: String,
    unique_release_finishing: String,
    unique_release: String,
    touch_queue: String,
    paused: String,
    set_paused: String,
    count_get: String,
    count_add: String,
    queues_all: String,
    counts_all: String,
    oldest_waiting: String,
    schedules_all: String,
    schedule_get: String,
    schedule_put: String,
    schedule_delete: String,
    schedule_fire: String,
    notify: String,
}

impl Statements {
    fn new(s: &str) -> Statements {
        // State codes (JobState::code): 0 waiting, 1 delayed, 2 active, 3 completed,
        // 4 failed (waiting for its retry), 5 dead.
        Statements {
            ddl: format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.jobs (
                     id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                     queue TEXT NOT NULL,
                     state SMALLINT NOT NULL,
                     priority INTEGER NOT NULL,
                     run_at BIGINT NOT NULL,
                     lease_deadline BIGINT,
                     ord BIGINT NOT NULL,
                     body JSONB NOT NULL);
                 CREATE INDEX IF NOT EXISTS jobs_waiting ON {s}.jobs (queue, priority DESC, id)
                     WHERE state = 0;
                 CREATE INDEX IF NOT EXISTS jobs_due ON {s}.jobs (run_at, id)
                     WHERE state IN (1, 4);
                 CREATE INDEX IF NOT EXISTS jobs_leases ON {s}.jobs (lease_deadline, id)
                     WHERE state = 2;
                 CREATE INDEX IF NOT EXISTS jobs_by_state ON {s}.jobs (queue, state, ord, id);
                 CREATE TABLE IF NOT EXISTS {s}.unique_keys (
                     queue TEXT NOT NULL,
                     key TEXT NOT NULL,
                     job_id BIGINT NOT NULL,
                     until BIGINT,
                     PRIMARY KEY (queue, key));
                 CREATE TABLE IF NOT EXISTS {s}.queues (
                     name TEXT PRIMARY KEY,
                     paused BOOLEAN NOT NULL DEFAULT false);
                 CREATE TABLE IF NOT EXISTS {s}.counts (
                     queue TEXT NOT NULL,
                     state SMALLINT NOT NULL,
                     stripe SMALLINT NOT NULL,
                     n BIGINT NOT NULL,
                     PRIMARY KEY (queue, state, stripe));
                 CREATE TABLE IF NOT EXISTS {s}.schedules (
                     name TEXT PRIMARY KEY,
                     body JSONB NOT NULL,
                     last_tick BIGINT);"
            ),
            next_id: format!("SELECT nextval(pg_get_serial_sequence('{s}.jobs', 'id'))"),
            get: format!("SELECT body FROM {s}.jobs WHERE id = $1"),
            load: format!("SELECT body FROM {s}.jobs WHERE id = $1 FOR UPDATE"),
            insert: format!(
                "INSERT INTO {s}.jobs (id, queue, state, priority, run_at, lease_deadline, ord, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ),
            update: format!(
                "UPDATE {s}.jobs SET state = $2, priority = $3, run_at = $4, lease_deadline = $5,
                 ord = $6, body = $7 WHERE id = $1"
            ),
            delete: format!("DELETE FROM {s}.jobs WHERE id = $1"),
            reserve: format!(
                "SELECT body FROM {s}.jobs WHERE queue = $1 AND state = 0
                 ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            in_state: format!(
                "SELECT body FROM {s}.jobs WHERE queue = $1 AND state = $2
                 ORDER BY ord, id LIMIT $3 FOR UPDATE SKIP LOCKED"
            ),
            due_delayed: format!(
                "SELECT body FROM {s}.jobs WHERE state IN (1, 4) AND run_at <= $1
                 ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            due_leases: format!(
                "SELECT body FROM {s}.jobs WHERE state = 2 AND lease_deadline <= $1
                 ORDER BY lease_deadline, id LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            next_due: format!(
                "SELECT (SELECT min(run_at) FROM {s}.jobs WHERE state IN (1, 4)),
                        (SELECT min(lease_deadline) FROM {s}.jobs WHERE state = 2)"
            ),
            list: format!(
                "SELECT body FROM {s}.jobs WHERE queue = $1 AND state = $2 AND (ord, id) > ($3, $4)
                 ORDER BY ord, id LIMIT $5"
            ),
            unique_lock: "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))".to_owned(),
            unique_get: format!(
                "SELECT job_id, until FROM {s}.unique_keys WHERE queue = $1 AND key = $2"
            ),
            unique_put: format!(
                "INSERT INTO {s}.unique_keys (queue, key, job_id, until) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (queue, key) DO UPDATE SET job_id = excluded.job_id,
                 until = excluded.until"
            ),
            unique_release_finishing: format!(
                "DELETE FROM {s}.unique_keys
                 WHERE queue = $1 AND key = $2 AND job_id = $3 AND until IS NULL"
            ),
            unique_release: format!(
                "DELETE FROM {s}.unique_keys WHERE queue = $1 AND key = $2 AND job_id = $3"
            ),
            touch_queue: format!(
                "INSERT INTO {s}.queues (name, paused) VALUES ($1, false) ON CONFLICT DO NOTHING"
            ),
            paused: format!("SELECT paused FROM {s}.queues WHERE name = $1"),
            set_paused: format!(
                "INSERT INTO {s}.queues (name, paused) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused"
            ),
            count_get: format!(
                "SELECT coalesce(sum(n), 0)::BIGINT FROM {s}.counts WHERE queue = $1 AND state = $2"
            ),
            count_add: format!(
                "INSERT INTO {s}.counts (queue, state, stripe, n) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (queue, state, stripe) DO UPDATE SET n = {s}.counts.n + excluded.n"
            ),
            queues_all: format!("SELECT name, paused FROM {s}.queues ORDER BY name COLLATE \"C\""),
            counts_all: format!(
                "SELECT queue, state, sum(n)::BIGINT FROM {s}.counts GROUP BY queue, state"
            ),
            oldest_waiting: format!(
                "SELECT run_at FROM {s}.jobs WHERE queue = $1 AND state = 0 ORDER BY ord, id LIMIT 1"
            ),
            schedules_all: format!(
                "SELECT body, last_tick FROM {s}.schedules ORDER BY name COLLATE \"C\""
            ),
            schedule_get: format!(
                "SELECT body, last_tick FROM {s}.schedules WHERE name = $1 FOR UPDATE"
            ),
            schedule_put: format!(
                "INSERT INTO {s}.schedules (name, body, last_tick) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body, last_tick = excluded.last_tick"
            ),
            schedule_delete: format!("DELETE FROM {s}.schedules WHERE name = $1"),
            schedule_fire: format!(
                "UPDATE {s}.schedules SET last_tick = $2
                 WHERE name = $1 AND (last_tick IS NULL OR last_tick < $2) RETURNING body"
            ),
            notify: "SELECT pg_notify($1, $2)".to_owned(),
        }
    }
}

fn schedule_of(row: &Row) -> Result<Schedule, QueueError> {
    let mut schedule = row
        .try_get::<_, Json<Schedule>>("body")
        .map_err(|e| QueueError::Storage(format!("undecodable schedule: {e}")))?
        .0;
    // The column is the record of fired ticks; the body's copy is only what was put.
    schedule.last_tick = row
        .try_get::<_, Option<i64>>("last_tick")
        .map_err(pg)?
        .map(uint);
    Ok(schedule)
}

impl PgQueueStore {
    /// Connects, creates the schema and tables if missing, and starts listening for
    /// the other nodes' notifications. Fails (rather than waiting) when PostgreSQL
    /// cannot be reached within [`CONNECT_TIMEOUT`].
    pub async fn open(
        settings: PgSettings,
        clock: Arc<dyn Clock>,
        wakeups: Arc<Wakeups>,
        metrics: QueueMetrics,
        policies: RetentionPolicies,
    ) -> Result<PgQueueStore, QueueError> {
        if !valid_schema(&settings.schema) {
            return Err(QueueError::Invalid {
                code: "bad_schema",
                detail: format!(
                    "{:?} is not a schema name keel uses: 1 to 48 of a-z 0-9 _, not starting with a digit",
                    settings.schema
                ),
            });
        }
        let mut config: tokio_postgres::Config =
            settings.url.parse().map_err(|e| QueueError::Invalid {
                code: "bad_url",
                detail: format!("not a PostgreSQL URL: {e}"),
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A server that vanished without closing its sockets (a dead host, a dropped
        // route) must still fail calls in seconds rather than leave them waiting on
        // TCP retransmissions for minutes; the keepalives find it on idle connections,
        // the LISTEN one included.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(DEAD_PEER_TIMEOUT);
        }
        config.keepalives_idle(DEAD_PEER_TIMEOUT);
        // Names this store's connections in pg_stat_activity (and lets the tests find
        // exactly their own).
        config.application_name(format!("keel-queue-{}", settings.schema));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            // Bounded waits: with PostgreSQL gone, a call fails in seconds instead of
            // hanging its caller.
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| QueueError::Storage(format!("cannot build the PostgreSQL pool: {e}")))?;
        let pool = Arc::new(PgPool::new(pool, settings.dependency));
        let sql = Arc::new(Statements::new(&settings.schema));
        {
            let mut client = pool.get().await.map_err(pool_error)?;
            let created = async {
                let txn = client.transaction().await.map_err(pg)?;
                // Two nodes starting together would race on CREATE ... IF NOT EXISTS (it
                // is not atomic against a concurrent create); one lock orders them.
                txn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('keel_queue_schema', 0))",
                    &[],
                )
                .await
                .map_err(pg)?;
                txn.batch_execute(&sql.ddl).await.map_err(pg)?;
                txn.commit().await.map_err(pg)
            }
            .await;
            pool.report(&created, unreachable);
            created?;
        }
        let channel = format!("keel_queue_{}", settings.schema);
        let stop = CancellationToken::new();
        tokio::spawn(listen(
            config,
            channel.clone(),
            wakeups.clone(),
            clock.clone(),
            stop.clone(),
        ));
        tokio::spawn(pool.clone().probe(stop.clone()));
        Ok(PgQueueStore {
            pool,
            sql,
            channel,
            clock,
            wakeups,
            metrics,
            policies,
            _tasks: stop.drop_guard(),
        })
    }

    /// A pooled connection; refused at once while PostgreSQL's breaker is open. Whoever
    /// gets one reports what the call on it said (`reported`).
    async fn client(&self) -> Result<deadpool_postgres::Object, QueueError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Tells PostgreSQL's dependency whether a call on a connection from `client`
    /// reached it; the outcome passes through.
    fn reported<T>(&self, outcome: Result<T, QueueError>) -> Result<T, QueueError> {
        self.pool.report(&outcome, unreachable);
        outcome
    }

    async fn begin<'c>(
        &'c self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<Tx<'c>, QueueError> {
        let txn = client.transaction().await.map_err(pg)?;
        Ok(Tx {
            txn,
            sql: &self.sql,
            channel: &self.channel,
            now: self.clock.now_ms(),
            policies: &self.policies,
            stripe: (random_u64() % COUNT_STRIPES) as i16,
            count_deltas: BTreeMap::new(),
            effects: Effects::default(),
        })
    }

    /// Tells this process what a committed transaction changed.
    fn after_commit(&self, effects: Effects, started: Instant) {
        self.metrics.commit_batch_size.observe(1.0);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        effects.publish(&self.wakeups, &self.metrics);
    }

    /// Drops a schema and everything in it: for tests, which each use their own.
    pub async fn drop_schema(url: &str, schema: &str) -> Result<(), QueueError> {
        if !valid_schema(schema) {
            return Err(QueueError::Invalid {
                code: "bad_schema",
                detail: format!("{schema:?}"),
            });
        }
        let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(pg)?;
        let driver = tokio::spawn(connection);
        let outcome = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .map_err(pg);
        drop(client);
        let _ = driver.await;
        outcome
    }
}

fn pool_error(error: PgPoolError) -> QueueError {
    match error {
        PgPoolError::Pool(deadpool_postgres::PoolError::Backend(error)) => pg(error),
        other => QueueError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

/// The errors that say PostgreSQL could not be reached (its dependency's failures).
fn unreachable(error: &QueueError) -> bool {
    matches!(error, QueueError::Unavailable(_))
}

/// Runs one operation in one transaction: begin, the body, commit, then the effects.
/// An error anywhere drops the transaction, which rolls it back.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let store = $store;
        let started = Instant::now();
        let mut client = store.client().await?;
        let committed = async {
            #[allow(unused_mut)]
            let mut $tx = store.begin(&mut client).await?;
            let outcome = $body?;
            let effects = $tx.commit().await?;
            Ok::<_, QueueError>((outcome, effects))
        }
        .await;
        let (outcome, effects) = store.reported(committed)?;
        store.after_commit(effects, started);
        Ok::<_, QueueError>(outcome)
    }};
}

/// One open transaction and the bookkeeping that keeps `counts` in step with it.
struct Tx<'c> {
    txn: deadpool_postgres::Transaction<'c>,
    sql: &'c Statements,
    channel: &'c str,
    now: Millis,
    policies: &'c RetentionPolicies,
    /// The counter row this transaction adds to.
    stripe: i16,
    /// Applied at commit, in key order, so two transactions take counter rows in the
    /// same order and never deadlock on them.
    count_deltas: BTreeMap<(String, i16), i64>,
    effects: Effects,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Tx<'_> {
    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, QueueError> {
        let statement = self.txn.prepare_cached(sql).await.map_err(pg)?;
        self.txn.query(&statement, params).await.map_err(pg)
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, QueueError> {
        let statement = self.txn.prepare_cached(sql).await.map_err(pg)?;
        self.txn.execute(&statement, params).await.map_err(pg)
    }

    async fn jobs(&self, sql: &str, params: Params<'_>) -> Result<Vec<Job>, QueueError> {
        self.query(sql, params).await?.iter().map(job_of).collect()
    }

    /// Flushes the counts, sends the notifications (delivered by PostgreSQL only if
    /// the commit succeeds) and commits.
    async fn commit(mut self) -> Result<Effects, QueueError> {
        for ((queue, state), delta) in std::mem::take(&mut self.count_deltas) {
            if delta != 0 {
                self.execute(&self.sql.count_add, &[&queue, &state, &self.stripe, &delta])
                    .await?;
            }
        }
        let mut payloads: Vec<String> =
            self.effects.ready.iter().map(|q| format!("r{q}")).collect();
        if let Some(at) = self.effects.earliest_due {
            payloads.push(format!("d{at}"));
        }
        if self.effects.schedules_changed {
            payloads.push("s".to_owned());
        }
        for payload in payloads {
            self.execute(&self.sql.notify, &[&self.channel, &payload])
                .await?;
        }
        self.txn.commit().await.map_err(pg)?;
        Ok(self.effects)
    }

    fn count(&mut self, job: &Job, delta: i64) {
        *self
            .count_deltas
            .entry((job.queue.clone(), state_code(job.state)))
            .or_default() += delta;
    }

    async fn stored_count(&self, queue: &str, state: JobState) -> Result<u64, QueueError> {
        let rows = self
            .query(&self.sql.count_get, &[&queue, &state_code(state)])
            .await?;
        let stored: i64 = rows.first().map_or(0, |row| row.get(0));
        let delta = self
            .count_deltas
            .get(&(queue.to_owned(), state_code(state)))
            .copied()
            .unwrap_or(0);
        Ok(uint(stored + delta))
    }

    async fn load(&self, id: u64) -> Result<Option<Job>, QueueError> {
        Ok(self.jobs(&self.sql.load, &[&int(id)]).await?.pop())
    }

    fn due(&mut self, at: Millis) {
        self.effects.earliest_due = Some(self.effects.earliest_due.map_or(at, |e| e.min(at)));
    }

    /// Counts the job in its state and notes what its state means for the timers.
    fn indexed(&mut self, job: &Job) {
        match job.state {
            JobState::Waiting => {
                self.effects.ready.insert(job.queue.clone());
            }
            JobState::Delayed | JobState::Failed => self.due(job.run_at),
            JobState::Active => self.due(job.lease_deadline.unwrap_or(0)),
            JobState::Completed | JobState::Dead => {}
        }
        self.count(job, 1);
    }

    async fn insert(&mut self, job: &Job) -> Result<(), QueueError> {
        self.indexed(job);
        self.execute(
            &self.sql.insert,
            &[
                &int(job.id),
                &job.queue,
                &state_code(job.state),
                &job.priority,
                &int(job.run_at),
                &job.lease_deadline.map(int),
                &int(order_of(job)),
                &Json(job),
            ],
        )
        .await?;
        Ok(())
    }

    async fn save(&self, job: &Job) -> Result<(), QueueError> {
        self.execute(
            &self.sql.update,
            &[
                &int(job.id),
                &state_code(job.state),
                &job.priority,
                &int(job.run_at),
                &job.lease_deadline.map(int),
                &int(order_of(job)),
                &Json(job),
            ],
        )
        .await?;
        Ok(())
    }

    /// Moves a locked job to a new state: `change` edits it between the two counts.
    async fn transition(
        &mut self,
        mut job: Job,
        change: impl FnOnce(&mut Job),
    ) -> Result<Job, QueueError> {
        self.count(&job, -1);
        change(&mut job);
        self.indexed(&job);
        self.save(&job).await?;
        if job.state.is_finished() {
            self.release_unique(&job, true).await?;
        }
        Ok(job)
    }

    /// Frees the job's unique key if it still points at this job. `finishing`: only
    /// keys held "while unfinished" (`until` NULL) are freed; timed ones stay.
    async fn release_unique(&self, job: &Job, finishing: bool) -> Result<(), QueueError> {
        let Some(key) = job.unique_key.as_deref() else {
            return Ok(());
        };
        let sql = if finishing {
            &self.sql.unique_release_finishing
        } else {
            &self.sql.unique_release
        };
        self.execute(sql, &[&job.queue, &key, &int(job.id)]).await?;
        Ok(())
    }

    async fn remove(&mut self, job: &Job) -> Result<(), QueueError> {
        self.count(job, -1);
        self.execute(&self.sql.delete, &[&int(job.id)]).await?;
        self.release_unique(job, false).await
    }

    async fn leased(&self, id: u64, lease_token: &str) -> Result<Job, QueueError> {
        let job = self.load(id).await?.ok_or(QueueError::NotFound(id))?;
        if job.state != JobState::Active || job.lease_token.as_deref() != Some(lease_token) {
            return Err(QueueError::LeaseLost {
                id,
                state: job.state,
            });
        }
        Ok(job)
    }

    // --- operations ---------------------------------------------------------------

    async fn enqueue(
        &mut self,
        queue: &str,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        self.execute(&self.sql.touch_queue, &[&queue]).await?;
        let mut answers = Vec::with_capacity(jobs.len());
        for new in jobs {
            if let Some(key) = new.unique_key.as_deref() {
                // Serialises enqueues of one key across nodes until commit, so the
                // check below and the insert after it cannot interleave with another's.
                // Queue names hold no '/', so the text names one (queue, key).
                let lock = format!("{}/{queue}/{key}", self.channel);
                self.execute(&self.sql.unique_lock, &[&lock]).await?;
            }
            if let Some(existing) = self.duplicate_of(queue, &new).await? {
                answers.push(Enqueued {
                    id: existing.id,
                    state: existing.state,
                    duplicate: true,
                });
                continue;
            }
            let rows = self.query(&self.sql.next_id, &[]).await?;
            let id = uint(rows[0].get::<_, i64>(0));
            let unique = new
                .unique_key
                .clone()
                .map(|key| (key, new.unique_until.map(int)));
            let job = new.into_job(id, queue, self.now);
            self.insert(&job).await?;
            if let Some((key, until)) = unique {
                self.execute(&self.sql.unique_put, &[&queue, &key, &int(id), &until])
                    .await?;
            }
            answers.push(Enqueued {
                id,
                state: job.state,
                duplicate: false,
            });
        }
        Ok(answers)
    }

    async fn duplicate_of(&self, queue: &str, new: &NewJob) -> Result<Option<Job>, QueueError> {
        let Some(key) = new.unique_key.as_deref() else {
            return Ok(None);
        };
        let rows = self.query(&self.sql.unique_get, &[&queue, &key]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let (id, until): (i64, Option<i64>) = (row.get(0), row.get(1));
        // Read, not locked: the advisory lock already orders enqueues of this key, and
        // a lock here would make the holder's own ack wait for this answer.
        let Some(job) = self.jobs(&self.sql.get, &[&id]).await?.pop() else {
            return Ok(None);
        };
        let live = match until {
            None => !job.state.is_finished(),
            Some(until) => uint(until) > self.now,
        };
        Ok(live.then_some(job))
    }

    async fn reserve(&mut self, queue: &str, lease: Lease) -> Result<Vec<Job>, QueueError> {
        let rows = self.query(&self.sql.paused, &[&queue]).await?;
        let paused = rows.first().is_some_and(|row| row.get::<_, bool>(0));
        if paused || lease.max_jobs == 0 {
            return Ok(Vec::new());
        }
        let waiting = self
            .jobs(&self.sql.reserve, &[&queue, &(lease.max_jobs as i64)])
            .await?;
        let mut leased = Vec::with_capacity(waiting.len());
        for job in waiting {
            let lease_ms = lease
                .lease_ms
                .or(job.timeout)
                .unwrap_or(lease.default_ms)
                .max(1);
            let now = self.now;
            let job = self
                .transition(job, |job| {
                    job.state = JobState::Active;
                    job.attempts_made += 1;
                    job.started_at = Some(now);
                    job.lease_token = Some(format!("{:016x}", random_u64()));
                    job.lease_deadline = Some(now.saturating_add(lease_ms));
                })
                .await?;
            leased.push(job);
        }
        Ok(leased)
    }

    async fn ack(&mut self, ack: Ack) -> Result<Result<Job, QueueError>, QueueError> {
        let job = match self.leased(ack.id, &ack.lease_token).await {
            Ok(job) => job,
            Err(error @ (QueueError::Storage(_) | QueueError::Unavailable(_))) => {
                return Err(error);
            }
            Err(refused) => return Ok(Err(refused)),
        };
        let now = self.now;
        let job = self
            .transition(job, |job| {
                job.state = JobState::Completed;
                job.finished_at = Some(now);
                job.result = ack.result;
                job.lease_token = None;
                job.lease_deadline = None;
            })
            .await?;
        self.retain(&job.queue, JobState::Completed).await?;
        Ok(Ok(job))
    }

    /// An attempt that did not succeed: retry after the backoff (or at once, for an
    /// expired lease), or bury the job when no attempts are left.
    async fn finish_attempt(
        &mut self,
        job: Job,
        error: &str,
        retry_now: bool,
    ) -> Result<(Job, bool), QueueError> {
        let now = self.now;
        let dead = job.attempts_made >= job.max_attempts;
        let error = truncate(error, 4096);
        let job = self
            .transition(job, |job| {
                job.last_error = Some(error);
                job.lease_token = None;
                job.lease_deadline = None;
                if dead {
                    job.state = JobState::Dead;
                    job.finished_at = Some(now);
                } else if retry_now {
                    job.state = JobState::Waiting;
                    job.run_at = now;
                } else {
                    let random = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    job.state = JobState::Failed;
                    job.run_at =
                        now.saturating_add(job.backoff.delay_after(job.attempts_made, random));
                }
            })
            .await?;
        if dead {
            self.retain(&job.queue, JobState::Dead).await?;
        }
        Ok((job, dead))
    }

    async fn drain(&mut self, queue: &str) -> Result<u64, QueueError> {
        let mut removed = 0u64;
        for state in [JobState::Waiting, JobState::Delayed, JobState::Failed] {
            let budget = STEP_ROWS.saturating_sub(removed as usize) as i64;
            for job in self
                .jobs(&self.sql.in_state, &[&queue, &state_code(state), &budget])
                .await?
            {
                self.remove(&job).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn retry_dead(&mut self, queue: &str, ids: Option<Vec<u64>>) -> Result<u64, QueueError> {
        let jobs = match ids {
            Some(ids) => {
                let mut jobs = Vec::with_capacity(ids.len());
                for id in ids {
                    jobs.extend(self.load(id).await?);
                }
                jobs
            }
            None => {
                let dead = state_code(JobState::Dead);
                self.jobs(&self.sql.in_state, &[&queue, &dead, &(STEP_ROWS as i64)])
                    .await?
            }
        };
        let now = self.now;
        let mut retried = 0;
        for job in jobs {
            if job.queue != queue || job.state != JobState::Dead {
                continue;
            }
            self.transition(job, |job| {
                job.state = JobState::Waiting;
                job.attempts_made = 0;
                job.run_at = now;
                job.finished_at = None;
            })
            .await?;
            retried += 1;
        }
        Ok(retried)
    }

    async fn run_due(&mut self) -> Result<DueReport, QueueError> {
        let now = int(self.now);
        let limit = STEP_ROWS as i64;
        let mut report = DueReport::default();
        let mut promoted: BTreeMap<String, u64> = BTreeMap::new();
        let due = self.jobs(&self.sql.due_delayed, &[&now, &limit]).await?;
        report.more |= due.len() == STEP_ROWS;
        for job in due {
            *promoted.entry(job.queue.clone()).or_default() += 1;
            self.transition(job, |job| job.state = JobState::Waiting)
                .await?;
        }
        let mut expired: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let stale = self.jobs(&self.sql.due_leases, &[&now, &limit]).await?;
        report.more |= stale.len() == STEP_ROWS;
        for job in stale {
            let queue = job.queue.clone();
            let (_, dead) = self.finish_attempt(job, "lease expired", true).await?;
            let entry = expired.entry(queue).or_default();
            if dead {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
        report.promoted = promoted.into_iter().collect();
        report.expired = expired
            .into_iter()
            .map(|(queue, (back, dead))| (queue, back, dead))
            .collect();
        let rows = self.query(&self.sql.next_due, &[]).await?;
        let (delayed, leases): (Option<i64>, Option<i64>) = (rows[0].get(0), rows[0].get(1));
        report.next_due = match (delayed.map(uint), leases.map(uint)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Rows this pass changed (none are due) are in next_due already.
        self.effects.earliest_due = None;
        self.effects.due_reset = Some(report.next_due);
        Ok(report)
    }

    /// Trims one queue's finished jobs of one state to its retention; bounded per call.
    async fn retain(&mut self, queue: &str, state: JobState) -> Result<u64, QueueError> {
        let policy = self.policies.for_queue(queue, state);
        let count = self.stored_count(queue, state).await?;
        let over = count.saturating_sub(policy.count) as usize;
        let cutoff = policy.age_ms.map(|age| self.now.saturating_sub(age));
        if over == 0 && cutoff.is_none() {
            return Ok(0);
        }
        // As in redb: only the rows over the count plus a few to check for age, since
        // this runs on every finish.
        let limit = (over.min(STEP_ROWS) + if cutoff.is_some() { 32 } else { 0 }) as i64;
        let mut removed = 0u64;
        let oldest = self
            .jobs(&self.sql.in_state, &[&queue, &state_code(state), &limit])
            .await?;
        for (index, job) in oldest.into_iter().enumerate() {
            let too_many = index < over;
            let too_old = cutoff.is_some_and(|cutoff| order_of(&job) < cutoff);
            if !too_many && !too_old {
                break;
            }
            self.remove(&job).await?;
            removed += 1;
        }
        if removed > 0 {
            *self
                .effects
                .retention_removed
                .entry(queue.to_owned())
                .or_default() += removed;
        }
        Ok(removed)
    }

    async fn put_schedule(&mut self, mut schedule: Schedule) -> Result<(), QueueError> {
        let rows = self
            .query(&self.sql.schedule_get, &[&schedule.name])
            .await?;
        if let Some(row) = rows.first() {
            let old = schedule_of(row)?;
            let same_timing = old.cron == schedule.cron && old.timezone == schedule.timezone;
            if same_timing && schedule.last_tick.is_none() {
                schedule.last_tick = old.last_tick;
            }
        }
        self.execute(
            &self.sql.schedule_put,
            &[
                &schedule.name,
                &Json(&schedule),
                &schedule.last_tick.map(int),
            ],
        )
        .await?;
        self.effects.schedules_changed = true;
        Ok(())
    }

    async fn fire_schedule(
        &mut self,
        name: &str,
        tick: Millis,
        job: Option<NewJob>,
    ) -> Result<Option<Enqueued>, QueueError> {
        // The row lock this UPDATE takes makes a second node firing the same tick wait
        // for this commit, then find `last_tick < tick` false and change nothing.
        let rows = self
            .query(&self.sql.schedule_fire, &[&name, &int(tick)])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let schedule = row
            .try_get::<_, Json<Schedule>>("body")
            .map_err(|e| QueueError::Storage(format!("undecodable schedule: {e}")))?
            .0;
        match job {
            Some(job) => Ok(self.enqueue(&schedule.queue, vec![job]).await?.pop()),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl QueueStore for PgQueueStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn enqueue(&self, queue: &str, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        in_tx!(self, |tx| tx.enqueue(queue, jobs).await)
    }

    async fn reserve(&self, queue: &str, lease: Lease) -> Result<Vec<Job>, QueueError> {
        in_tx!(self, |tx| tx.reserve(queue, lease).await)
    }

    async fn ack(&self, acks: Vec<Ack>) -> Result<Vec<Result<Job, QueueError>>, QueueError> {
        in_tx!(self, |tx| {
            let mut results = Vec::with_capacity(acks.len());
            let mut failure = None;
            for ack in acks {
                match tx.ack(ack).await {
                    Ok(result) => results.push(result),
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            match failure {
                Some(error) => Err(error),
                None => Ok(results),
            }
        })
    }

    async fn fail(&self, id: u64, lease_token: &str, error: &str) -> Result<Failed, QueueError> {
        in_tx!(self, |tx| {
            match tx.leased(id, lease_token).await {
                Ok(job) => tx
                    .finish_attempt(job, error, false)
                    .await
                    .map(|(job, dead)| Failed { job, dead }),
                Err(error) => Err(error),
            }
        })
    }

    async fn heartbeat(
        &self,
        id: u64,
        lease_token: &str,
        lease_ms: Option<Millis>,
        default_ms: Millis,
    ) -> Result<Job, QueueError> {
        in_tx!(self, |tx| {
            match tx.leased(id, lease_token).await {
                Ok(job) => {
                    let lease_ms = lease_ms.or(job.timeout).unwrap_or(default_ms).max(1);
                    let deadline = tx.now.saturating_add(lease_ms);
                    tx.transition(job, |job| job.lease_deadline = Some(deadline))
                        .await
                }
                Err(error) => Err(error),
            }
        })
    }

    async fn progress(
        &self,
        id: u64,
        lease_token: &str,
        progress: Value,
    ) -> Result<(), QueueError> {
        in_tx!(self, |tx| {
            match tx.leased(id, lease_token).await {
                Ok(mut job) => {
                    job.progress = Some(progress);
                    tx.save(&job).await
                }
                Err(error) => Err(error),
            }
        })
    }

    async fn get(&self, id: u64) -> Result<Option<Job>, QueueError> {
        let client = self.client().await?;
        let rows = self.reported(
            async {
                let statement = client.prepare_cached(&self.sql.get).await.map_err(pg)?;
                client.query(&statement, &[&int(id)]).await.map_err(pg)
            }
            .await,
        )?;
        rows.first().map(job_of).transpose()
    }

    async fn delete(&self, id: u64) -> Result<bool, QueueError> {
        in_tx!(self, |tx| {
            match tx.load(id).await {
                Ok(Some(job)) => tx.remove(&job).await.map(|()| true),
                Ok(None) => Ok(false),
                Err(error) => Err(error),
            }
        })
    }

    async fn list(
        &self,
        queue: &str,
        state: JobState,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, QueueError> {
        let (order, id) = match cursor.map(decode_cursor).transpose()? {
            Some((order, id)) => (int(order), int(id)),
            None => (-1, -1),
        };
        let client = self.client().await?;
        let rows = self.reported(
            async {
                let statement = client.prepare_cached(&self.sql.list).await.map_err(pg)?;
                client
                    .query(
                        &statement,
                        &[&queue, &state_code(state), &order, &id, &(limit as i64)],
                    )
                    .await
                    .map_err(pg)
            }
            .await,
        )?;
        let jobs = rows.iter().map(job_of).collect::<Result<Vec<_>, _>>()?;
        let next = match jobs.last() {
            Some(last) if jobs.len() == limit => Some(encode_cursor(order_of(last), last.id)),
            _ => None,
        };
        Ok(Page { jobs, next })
    }

    async fn stats(&self) -> Result<Vec<QueueCounts>, QueueError> {
        let mut client = self.client().await?;
        let counted = async {
            // One snapshot for the queues, their counts and their oldest jobs.
            let txn = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg)?;
            let mut counts: HashMap<String, QueueCounts> = HashMap::new();
            for row in txn
                .query(self.sql.counts_all.as_str(), &[])
                .await
                .map_err(pg)?
            {
                let (queue, state, n): (String, i16, i64) = (row.get(0), row.get(1), row.get(2));
                let Some(state) = u8::try_from(state).ok().and_then(JobState::from_code) else {
                    continue;
                };
                counts
                    .entry(queue.clone())
                    .or_insert_with(|| QueueCounts::empty(&queue))
                    .set(state, uint(n));
            }
            let mut all = Vec::new();
            for row in txn
                .query(self.sql.queues_all.as_str(), &[])
                .await
                .map_err(pg)?
            {
                let (name, paused): (String, bool) = (row.get(0), row.get(1));
                let mut figures = counts
                    .remove(&name)
                    .unwrap_or_else(|| QueueCounts::empty(&name));
                figures.paused = paused;
                if figures.waiting > 0 {
                    let oldest = txn
                        .query(self.sql.oldest_waiting.as_str(), &[&name])
                        .await
                        .map_err(pg)?;
                    figures.oldest_waiting_since = oldest.first().map(|row| uint(row.get(0)));
                }
                all.push(figures);
            }
            txn.commit().await.map_err(pg)?;
            Ok(all)
        }
        .await;
        self.reported(counted)
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), QueueError> {
        in_tx!(self, |tx| {
            let outcome = tx.execute(&tx.sql.set_paused, &[&queue, &paused]).await;
            if !paused {
                tx.effects.ready.insert(queue.to_owned());
            }
            outcome.map(|_| ())
        })
    }

    async fn drain(&self, queue: &str) -> Result<u64, QueueError> {
        let mut total = 0;
        loop {
            let removed: u64 = in_tx!(self, |tx| tx.drain(queue).await)?;
            total += removed;
            if removed < STEP_ROWS as u64 {
                return Ok(total);
            }
        }
    }

    async fn retry_dead(&self, queue: &str, ids: Option<Vec<u64>>) -> Result<u64, QueueError> {
        if ids.is_some() {
            return in_tx!(self, |tx| tx.retry_dead(queue, ids).await);
        }
        let mut total = 0;
        loop {
            let retried: u64 = in_tx!(self, |tx| tx.retry_dead(queue, None).await)?;
            total += retried;
            if retried < STEP_ROWS as u64 {
                return Ok(total);
            }
        }
    }

    async fn run_due(&self) -> Result<DueReport, QueueError> {
        in_tx!(self, |tx| tx.run_due().await)
    }

    async fn retain(&self, queue: &str) -> Result<u64, QueueError> {
        let mut total = 0;
        for state in [JobState::Completed, JobState::Dead] {
            loop {
                let removed: u64 = in_tx!(self, |tx| tx.retain(queue, state).await)?;
                total += removed;
                if removed == 0 {
                    break;
                }
            }
        }
        Ok(total)
    }

    async fn schedules(&self) -> Result<Vec<Schedule>, QueueError> {
        let client = self.client().await?;
        let rows = self.reported(
            client
                .query(self.sql.schedules_all.as_str(), &[])
                .await
                .map_err(pg),
        )?;
        rows.iter().map(schedule_of).collect()
    }

    async fn put_schedule(&self, schedule: Schedule) -> Result<(), QueueError> {
        in_tx!(self, |tx| tx.put_schedule(schedule).await)
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool, QueueError> {
        in_tx!(self, |tx| {
            let outcome = tx.execute(&tx.sql.schedule_delete, &[&name]).await;
            tx.effects.schedules_changed = true;
            outcome.map(|deleted| deleted > 0)
        })
    }

    async fn fire_schedule(
        &self,
        name: &str,
        tick: Millis,
        job: Option<NewJob>,
    ) -> Result<Option<Enqueued>, QueueError> {
        in_tx!(self, |tx| tx.fire_schedule(name, tick, job).await)
    }

    async fn backup(&self, _destination: &std::path::Path) -> Result<(), QueueError> {
        Err(QueueError::Invalid {
            code: "external_backup",
            detail: "the queue is in PostgreSQL: back it up with pg_dump (or your database's \
                     own backups), not with keel backup"
                .to_owned(),
        })
    }
}

/// The LISTEN side of wake-ups: one connection per node, outside the pool, turning
/// other nodes' commits into local signals. Reconnects with backoff until stopped.
async fn listen(
    config: tokio_postgres::Config,
    channel: String,
    wakeups: Arc<Wakeups>,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listen_once(&config, &channel, &wakeups, &clock, &stop, &mut backoff).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(
                %error,
                retry_in_ms = backoff.as_millis() as u64,
                "queue: the PostgreSQL LISTEN connection is down; reconnecting"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// One LISTEN connection's life: `Ok` when told to stop, `Err` when it was lost.
async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    wakeups: &Wakeups,
    clock: &Arc<dyn Clock>,
    stop: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), QueueError> {
    let (client, mut connection) = tokio::select! {
        connected = config.connect(NoTls) => connected.map_err(pg)?,
        _ = stop.cancelled() => return Ok(()),
    };
    let (sender, mut payloads) = mpsc::unbounded_channel::<String>();
    // The connection must be polled for the client's requests to make progress and
    // for notifications to arrive; this task does both and forwards the latter.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(note))) => {
                    if sender.send(note.payload().to_owned()).is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            }
        }
    });
    let outcome = async {
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(pg)?;
        *backoff = Duration::from_millis(100);
        // Commits made while nothing listened were missed: wake every parked reserve,
        // the due-timer and the scheduler once, and let them look for themselves.
        wakeups.all_ready();
        wakeups.due_at(clock.now_ms());
        wakeups.schedules_changed();
        loop {
            tokio::select! {
                payload = payloads.recv() => match payload {
                    Some(payload) => signal(wakeups, &payload),
                    None => return Err(QueueError::Unavailable(
                        "PostgreSQL closed the LISTEN connection".to_owned(),
                    )),
                },
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    outcome
}

/// A notification payload: `r<queue>` a job is ready, `d<millis>` something is due
/// then, `s` schedules changed.
fn signal(wakeups: &Wakeups, payload: &str) {
    match payload.split_at_checked(1) {
        Some(("r", queue)) => wakeups.job_ready(queue),
        Some(("d", at)) => {
            if let Ok(at) = at.parse() {
                wakeups.due_at(at);
            }
        }
        Some(("s", _)) => wakeups.schedules_changed(),
        _ => tracing::debug!(payload, "queue: unknown notification"),
    }
}
