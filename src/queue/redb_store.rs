//! The embedded queue store: `queue.redb`, written by one thread that group-commits.
//!
//! Every mutation is a closure sent to the writer thread. The writer takes whatever
//! closures are waiting (up to [`MAX_BATCH`]), runs them inside one write transaction,
//! commits with `Durability::Immediate` (fsync) and only then answers each caller. So
//! a burst of 500 enqueues costs one fsync, and no caller hears "ok" for a change a
//! crash could still lose.
//!
//! Tables (all changed in the same transaction, so they never disagree):
//! - `jobs`: id → job (JSON)
//! - `waiting`: (queue, inverted priority, id): reserve reads the first N
//! - `delayed`: (run_at, id): delayed jobs and failed jobs waiting for their retry
//! - `active`: (lease deadline, id): lease expiry reads the first
//! - `by_state`: (queue, state, order, id): listing and retention; order is the id,
//!   or for finished jobs the finish time, so "oldest finished" is the first row
//! - `unique`: (queue, unique key) → (id, until)
//! - `counts`: (queue, state) → jobs, kept in step so stats never count rows
//! - `queues`: queue → flags (paused)
//! - `meta`: "next_id"
//! - `schedules`: name → schedule (JSON)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::job::{Job, JobState, Millis, NewJob};
use super::store::{
    Ack, DueReport, Effects, Enqueued, Failed, Lease, Page, QueueCounts, QueueStore, Schedule,
    decode_cursor, encode_cursor, truncate,
};
use super::{Clock, QueueError, QueueMetrics, RetentionPolicies, Wakeups, random_u64};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const WAITING: TableDefinition<(&str, u32, u64), ()> = TableDefinition::new("waiting");
const DELAYED: TableDefinition<(u64, u64), ()> = TableDefinition::new("delayed");
const ACTIVE: TableDefinition<(u64, u64), ()> = TableDefinition::new("active");
const BY_STATE: TableDefinition<(&str, u8, u64, u64), ()> = TableDefinition::new("by_state");
const UNIQUE: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("unique");
const COUNTS: TableDefinition<(&str, u8), u64> = TableDefinition::new("counts");
const QUEUES: TableDefinition<&str, u8> = TableDefinition::new("queues");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");

/// Most closures one transaction takes; more wait for the next commit.
const MAX_BATCH: usize = 4096;
/// Most rows one maintenance step (due work, retention, drain) touches, so a backlog
/// never makes one commit, and everyone waiting on it, slow.
const STEP_ROWS: usize = 2_000;
const PAUSED: u8 = 1;

type Op = Box<dyn FnOnce(&mut Tx<'_>) -> Deliver + Send>;

/// What the writer thread is sent: a change for its next transaction, or work that
/// must run between transactions with nothing in flight (a file copy for a backup).
enum Work {
    Change(Op),
    Exclusive(Box<dyn FnOnce() + Send>),
}
type Deliver = Box<dyn FnOnce(Result<(), QueueError>) + Send>;

pub struct RedbQueueStore {
    db: Arc<Database>,
    path: std::path::PathBuf,
    ops: mpsc::Sender<Work>,
    clock: Arc<dyn Clock>,
}

fn storage(error: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(error.to_string())
}

fn decode(bytes: &[u8]) -> Result<Job, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| storage(format!("undecodable job: {e}")))
}

fn encode(job: &Job) -> Vec<u8> {
    serde_json::to_vec(job).expect("a job always serialises")
}

/// Waiting jobs sort by priority, highest first, then by id.
fn priority_key(priority: i32) -> u32 {
    (i64::from(i32::MAX) - i64::from(priority)) as u32
}

/// Finished jobs list in finish order; the others in id (enqueue) order.
fn order_of(job: &Job) -> u64 {
    match job.state {
        JobState::Completed | JobState::Dead => job.finished_at.unwrap_or(0),
        _ => job.id,
    }
}

impl RedbQueueStore {
    /// Takes the opened `queue.redb`, creates missing tables and starts the writer.
    pub fn open(
        db: Arc<Database>,
        path: &std::path::Path,
        clock: Arc<dyn Clock>,
        wakeups: Arc<Wakeups>,
        metrics: QueueMetrics,
        policies: RetentionPolicies,
    ) -> Result<RedbQueueStore, QueueError> {
        let txn = db.begin_write().map_err(storage)?;
        Tx::open(&txn, 0, &policies)?;
        txn.commit().map_err(storage)?;

        let (ops, receiver) = mpsc::channel::<Work>(MAX_BATCH * 4);
        let writer = Writer {
            db: db.clone(),
            clock: clock.clone(),
            wakeups,
            metrics,
            policies,
        };
        std::thread::Builder::new()
            .name("keel-queue-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|e| storage(format!("cannot start the queue writer: {e}")))?;
        Ok(RedbQueueStore {
            db,
            path: path.to_owned(),
            ops,
            clock,
        })
    }

    /// Runs `change` in the writer's next transaction; answers after the commit.
    async fn submit<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Tx<'_>) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let (reply, answer) = oneshot::channel();
        let op: Op = Box::new(move |tx| {
            let outcome = change(tx);
            if let Err(QueueError::Storage(message)) = &outcome {
                tx.failed = Some(message.clone());
            }
            Box::new(move |committed| {
                let _ = reply.send(committed.and(outcome));
            })
        });
        self.ops
            .send(Work::Change(op))
            .await
            .map_err(|_| QueueError::Closed)?;
        answer.await.map_err(|_| QueueError::Closed)?
    }

    fn read<T>(
        &self,
        read: impl FnOnce(&redb::ReadTransaction) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let txn = self.db.begin_read().map_err(storage)?;
        read(&txn)
    }
}

/// The writer thread: batches, one transaction, one fsync, then the answers.
struct Writer {
    db: Arc<Database>,
    clock: Arc<dyn Clock>,
    wakeups: Arc<Wakeups>,
    metrics: QueueMetrics,
    policies: RetentionPolicies,
}

impl Writer {
    fn run(self, mut receiver: mpsc::Receiver<Work>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut exclusive = None;
        while let Some(first) = receiver.blocking_recv() {
            match first {
                Work::Change(op) => batch.push(op),
                Work::Exclusive(work) => exclusive = Some(work),
            }
            while exclusive.is_none() && batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(Work::Change(op)) => batch.push(op),
                    Ok(Work::Exclusive(work)) => exclusive = Some(work),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if let Some(work) = exclusive.take() {
                work();
            }
        }
    }

    fn commit(&self, batch: &mut Vec<Op>) {
        let started = Instant::now();
        let size = batch.len();
        let now = self.clock.now_ms();
        let mut delivers = Vec::with_capacity(size);
        let mut effects = Effects::default();
        let result = (|| -> Result<(), QueueError> {
            let mut txn = self.db.begin_write().map_err(storage)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut tx = Tx::open(&txn, now, &self.policies)?;
                for op in batch.drain(..) {
                    delivers.push(op(&mut tx));
                }
                if let Some(message) = tx.failed.take() {
                    return Err(QueueError::Storage(message));
                }
                tx.flush_counts()?;
                effects = std::mem::take(&mut tx.effects);
            }
            txn.commit().map_err(storage)
        })();
        // Ops not yet run when an error struck: their callers see the channel close.
        batch.clear();
        self.metrics.commit_batch_size.observe(size as f64);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => effects.publish(&self.wakeups, &self.metrics),
            Err(error) => tracing::error!(%error, jobs = size, "queue commit failed"),
        }
        for deliver in delivers {
            deliver(result.clone());
        }
    }
}

/// The tables of one write transaction and the bookkeeping that keeps them in step.
struct Tx<'t> {
    now: Millis,
    jobs: redb::Table<'t, u64, &'static [u8]>,
    waiting: redb::Table<'t, (&'static str, u32, u64), ()>,
    delayed: redb::Table<'t, (u64, u64), ()>,
    active: redb::Table<'t, (u64, u64), ()>,
    by_state: redb::Table<'t, (&'static str, u8, u64, u64), ()>,
    unique: redb::Table<'t, (&'static str, &'static str), (u64, u64)>,
    counts: redb::Table<'t, (&'static str, u8), u64>,
    queues: redb::Table<'t, &'static str, u8>,
    meta: redb::Table<'t, &'static str, u64>,
    schedules: redb::Table<'t, &'static str, &'static [u8]>,
    count_deltas: BTreeMap<(String, u8), i64>,
    next_id: Option<u64>,
    policies: &'t RetentionPolicies,
    effects: Effects,
    /// Set when a closure hit a storage error: the transaction must not commit.
    failed: Option<String>,
}

impl<'t> Tx<'t> {
    fn open(
        txn: &'t redb::WriteTransaction,
        now: Millis,
        policies: &'t RetentionPolicies,
    ) -> Result<Tx<'t>, QueueError> {
        Ok(Tx {
            now,
            jobs: txn.open_table(JOBS).map_err(storage)?,
            waiting: txn.open_table(WAITING).map_err(storage)?,
            delayed: txn.open_table(DELAYED).map_err(storage)?,
            active: txn.open_table(ACTIVE).map_err(storage)?,
            by_state: txn.open_table(BY_STATE).map_err(storage)?,
            unique: txn.open_table(UNIQUE).map_err(storage)?,
            counts: txn.open_table(COUNTS).map_err(storage)?,
            queues: txn.open_table(QUEUES).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            schedules: txn.open_table(SCHEDULES).map_err(storage)?,
            count_deltas: BTreeMap::new(),
            next_id: None,
            policies,
            effects: Effects::default(),
            failed: None,
        })
    }

    fn allocate_id(&mut self) -> Result<u64, QueueError> {
        let next = match self.next_id {
            Some(next) => next,
            None => self
                .meta
                .get("next_id")
                .map_err(storage)?
                .map_or(1, |v| v.value()),
        };
        self.next_id = Some(next + 1);
        Ok(next)
    }

    fn flush_counts(&mut self) -> Result<(), QueueError> {
        if let Some(next) = self.next_id {
            self.meta.insert("next_id", next).map_err(storage)?;
        }
        for ((queue, state), delta) in std::mem::take(&mut self.count_deltas) {
            if delta == 0 {
                continue;
            }
            let key = (queue.as_str(), state);
            let current = self
                .counts
                .get(key)
                .map_err(storage)?
                .map_or(0, |v| v.value());
            let next = (current as i64 + delta).max(0) as u64;
            if next == 0 {
                self.counts.remove(key).map_err(storage)?;
            } else {
                self.counts.insert(key, next).map_err(storage)?;
            }
        }
        Ok(())
    }

    fn count(&self, queue: &str, state: JobState) -> Result<u64, QueueError> {
        let stored = self
            .counts
            .get((queue, state.code()))
            .map_err(storage)?
            .map_or(0, |v| v.value());
        let delta = self
            .count_deltas
            .get(&(queue.to_owned(), state.code()))
            .copied()
            .unwrap_or(0);
        Ok((stored as i64 + delta).max(0) as u64)
    }

    fn load(&self, id: u64) -> Result<Option<Job>, QueueError> {
        match self.jobs.get(id).map_err(storage)? {
            Some(bytes) => decode(bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    fn due(&mut self, at: Millis) {
        self.effects.earliest_due = Some(self.effects.earliest_due.map_or(at, |e| e.min(at)));
    }

    /// Adds the job's index rows for its current state and counts it.
    fn index(&mut self, job: &Job) -> Result<(), QueueError> {
        let queue = job.queue.as_str();
        match job.state {
            JobState::Waiting => {
                self.waiting
                    .insert((queue, priority_key(job.priority), job.id), ())
                    .map_err(storage)?;
                self.effects.ready.insert(job.queue.clone());
            }
            JobState::Delayed | JobState::Failed => {
                self.delayed
                    .insert((job.run_at, job.id), ())
                    .map_err(storage)?;
                self.due(job.run_at);
            }
            JobState::Active => {
                let deadline = job.lease_deadline.unwrap_or(0);
                self.active
                    .insert((deadline, job.id), ())
                    .map_err(storage)?;
                self.due(deadline);
            }
            JobState::Completed | JobState::Dead => {}
        }
        self.by_state
            .insert((queue, job.state.code(), order_of(job), job.id), ())
            .map_err(storage)?;
        *self
            .count_deltas
            .entry((job.queue.clone(), job.state.code()))
            .or_default() += 1;
        Ok(())
    }

    fn unindex(&mut self, job: &Job) -> Result<(), QueueError> {
        let queue = job.queue.as_str();
        match job.state {
            JobState::Waiting => {
                self.waiting
                    .remove((queue, priority_key(job.priority), job.id))
                    .map_err(storage)?;
            }
            JobState::Delayed | JobState::Failed => {
                self.delayed.remove((job.run_at, job.id)).map_err(storage)?;
            }
            JobState::Active => {
                self.active
                    .remove((job.lease_deadline.unwrap_or(0), job.id))
                    .map_err(storage)?;
            }
            JobState::Completed | JobState::Dead => {}
        }
        self.by_state
            .remove((queue, job.state.code(), order_of(job), job.id))
            .map_err(storage)?;
        *self
            .count_deltas
            .entry((job.queue.clone(), job.state.code()))
            .or_default() -= 1;
        Ok(())
    }

    fn save(&mut self, job: &Job) -> Result<(), QueueError> {
        self.jobs
            .insert(job.id, encode(job).as_slice())
            .map_err(storage)?;
        Ok(())
    }

    /// Moves a loaded job to a new state: `change` edits it between unindex and index.
    fn transition(
        &mut self,
        mut job: Job,
        change: impl FnOnce(&mut Job),
    ) -> Result<Job, QueueError> {
        self.unindex(&job)?;
        change(&mut job);
        self.index(&job)?;
        self.save(&job)?;
        if job.state.is_finished() {
            self.release_unique(&job, true)?;
        }
        Ok(job)
    }

    /// Frees the job's unique key if it still points at this job. `finishing`: only
    /// keys held "while unfinished" are freed; timed ones stay until they run out.
    fn release_unique(&mut self, job: &Job, finishing: bool) -> Result<(), QueueError> {
        let Some(key) = job.unique_key.as_deref() else {
            return Ok(());
        };
        let holder = self
            .unique
            .get((job.queue.as_str(), key))
            .map_err(storage)?
            .map(|v| v.value());
        if let Some((id, until)) = holder
            && id == job.id
            && (!finishing || until == u64::MAX)
        {
            self.unique
                .remove((job.queue.as_str(), key))
                .map_err(storage)?;
        }
        Ok(())
    }

    fn remove(&mut self, job: &Job) -> Result<(), QueueError> {
        self.unindex(job)?;
        self.jobs.remove(job.id).map_err(storage)?;
        self.release_unique(job, false)
    }

    fn touch_queue(&mut self, queue: &str) -> Result<(), QueueError> {
        if self.queues.get(queue).map_err(storage)?.is_none() {
            self.queues.insert(queue, 0).map_err(storage)?;
        }
        Ok(())
    }

    fn leased(&self, id: u64, lease_token: &str) -> Result<Job, QueueError> {
        let job = self.load(id)?.ok_or(QueueError::NotFound(id))?;
        if job.state != JobState::Active || job.lease_token.as_deref() != Some(lease_token) {
            return Err(QueueError::LeaseLost {
                id,
                state: job.state,
            });
        }
        Ok(job)
    }

    // --- operations ---------------------------------------------------------------

    fn enqueue(&mut self, queue: &str, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        self.touch_queue(queue)?;
        let mut answers = Vec::with_capacity(jobs.len());
        for new in jobs {
            if let Some(existing) = self.duplicate_of(queue, &new)? {
                answers.push(Enqueued {
                    id: existing.id,
                    state: existing.state,
                    duplicate: true,
                });
                continue;
            }
            let id = self.allocate_id()?;
            let unique = new
                .unique_key
                .clone()
                .map(|key| (key, new.unique_until.unwrap_or(u64::MAX)));
            let job = new.into_job(id, queue, self.now);
            self.index(&job)?;
            self.save(&job)?;
            if let Some((key, until)) = unique {
                self.unique
                    .insert((queue, key.as_str()), (id, until))
                    .map_err(storage)?;
            }
            answers.push(Enqueued {
                id,
                state: job.state,
                duplicate: false,
            });
        }
        Ok(answers)
    }

    fn duplicate_of(&self, queue: &str, new: &NewJob) -> Result<Option<Job>, QueueError> {
        let Some(key) = new.unique_key.as_deref() else {
            return Ok(None);
        };
        let Some((id, until)) = self
            .unique
            .get((queue, key))
            .map_err(storage)?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let Some(job) = self.load(id)? else {
            return Ok(None);
        };
        let live = if until == u64::MAX {
            !job.state.is_finished()
        } else {
            until > self.now
        };
        Ok(live.then_some(job))
    }

    fn reserve(&mut self, queue: &str, lease: Lease) -> Result<Vec<Job>, QueueError> {
        let paused = self
            .queues
            .get(queue)
            .map_err(storage)?
            .is_some_and(|flags| flags.value() & PAUSED != 0);
        if paused || lease.max_jobs == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = self
            .waiting
            .range((queue, 0u32, 0u64)..=(queue, u32::MAX, u64::MAX))
            .map_err(storage)?
            .take(lease.max_jobs)
            .map(|row| row.map(|(key, _)| key.value().2).map_err(storage))
            .collect::<Result<_, _>>()?;
        let mut leased = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(job) = self.load(id)? else {
                return Err(storage(format!("waiting index names missing job {id}")));
            };
            let lease_ms = lease
                .lease_ms
                .or(job.timeout)
                .unwrap_or(lease.default_ms)
                .max(1);
            let now = self.now;
            let job = self.transition(job, |job| {
                job.state = JobState::Active;
                job.attempts_made += 1;
                job.started_at = Some(now);
                job.lease_token = Some(format!("{:016x}", random_u64()));
                job.lease_deadline = Some(now.saturating_add(lease_ms));
            })?;
            leased.push(job);
        }
        Ok(leased)
    }

    fn ack(&mut self, ack: Ack) -> Result<Result<Job, QueueError>, QueueError> {
        let job = match self.leased(ack.id, &ack.lease_token) {
            Ok(job) => job,
            Err(QueueError::Storage(message)) => return Err(QueueError::Storage(message)),
            Err(refused) => return Ok(Err(refused)),
        };
        let now = self.now;
        let job = self.transition(job, |job| {
            job.state = JobState::Completed;
            job.finished_at = Some(now);
            job.result = ack.result;
            job.lease_token = None;
            job.lease_deadline = None;
        })?;
        self.retain(&job.queue, JobState::Completed)?;
        Ok(Ok(job))
    }

    fn fail(&mut self, id: u64, lease_token: &str, error: &str) -> Result<Failed, QueueError> {
        let job = self.leased(id, lease_token)?;
        let (job, dead) = self.finish_attempt(job, error, false)?;
        Ok(Failed { job, dead })
    }

    /// An attempt that did not succeed: retry after the backoff (or at once, for an
    /// expired lease), or bury the job when no attempts are left.
    fn finish_attempt(
        &mut self,
        job: Job,
        error: &str,
        retry_now: bool,
    ) -> Result<(Job, bool), QueueError> {
        let now = self.now;
        let dead = job.attempts_made >= job.max_attempts;
        let error = truncate(error, 4096);
        let job = self.transition(job, |job| {
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
                job.run_at = now.saturating_add(job.backoff.delay_after(job.attempts_made, random));
            }
        })?;
        if dead {
            self.retain(&job.queue, JobState::Dead)?;
        }
        Ok((job, dead))
    }

    fn heartbeat(
        &mut self,
        id: u64,
        lease_token: &str,
        lease_ms: Option<Millis>,
        default_ms: Millis,
    ) -> Result<Job, QueueError> {
        let job = self.leased(id, lease_token)?;
        let lease_ms = lease_ms.or(job.timeout).unwrap_or(default_ms).max(1);
        let deadline = self.now.saturating_add(lease_ms);
        self.transition(job, |job| job.lease_deadline = Some(deadline))
    }

    fn progress(&mut self, id: u64, lease_token: &str, progress: Value) -> Result<(), QueueError> {
        let mut job = self.leased(id, lease_token)?;
        job.progress = Some(progress);
        self.save(&job)
    }

    fn delete(&mut self, id: u64) -> Result<bool, QueueError> {
        match self.load(id)? {
            Some(job) => {
                self.remove(&job)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn set_paused(&mut self, queue: &str, paused: bool) -> Result<(), QueueError> {
        let flags = self
            .queues
            .get(queue)
            .map_err(storage)?
            .map_or(0, |v| v.value());
        let flags = if paused {
            flags | PAUSED
        } else {
            flags & !PAUSED
        };
        self.queues.insert(queue, flags).map_err(storage)?;
        if !paused {
            self.effects.ready.insert(queue.to_owned());
        }
        Ok(())
    }

    /// The first `limit` ids of one queue's jobs in one state, oldest first.
    fn ids_in_state(
        &self,
        queue: &str,
        state: JobState,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, QueueError> {
        let code = state.code();
        self.by_state
            .range((queue, code, 0u64, 0u64)..=(queue, code, u64::MAX, u64::MAX))
            .map_err(storage)?
            .take(limit)
            .map(|row| {
                row.map(|(key, _)| {
                    let (_, _, order, id) = key.value();
                    (order, id)
                })
                .map_err(storage)
            })
            .collect()
    }

    fn drain(&mut self, queue: &str) -> Result<u64, QueueError> {
        let mut removed = 0;
        for state in [JobState::Waiting, JobState::Delayed, JobState::Failed] {
            let budget = STEP_ROWS.saturating_sub(removed as usize);
            for (_, id) in self.ids_in_state(queue, state, budget)? {
                if let Some(job) = self.load(id)? {
                    self.remove(&job)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn retry_dead(&mut self, queue: &str, ids: Option<Vec<u64>>) -> Result<u64, QueueError> {
        let ids = match ids {
            Some(ids) => ids,
            None => self
                .ids_in_state(queue, JobState::Dead, STEP_ROWS)?
                .into_iter()
                .map(|(_, id)| id)
                .collect(),
        };
        let now = self.now;
        let mut retried = 0;
        for id in ids {
            let Some(job) = self.load(id)? else { continue };
            if job.queue != queue || job.state != JobState::Dead {
                continue;
            }
            self.transition(job, |job| {
                job.state = JobState::Waiting;
                job.attempts_made = 0;
                job.run_at = now;
                job.finished_at = None;
            })?;
            retried += 1;
        }
        Ok(retried)
    }

    fn run_due(&mut self) -> Result<DueReport, QueueError> {
        let now = self.now;
        let mut report = DueReport::default();
        let mut promoted: BTreeMap<String, u64> = BTreeMap::new();
        let due: Vec<u64> = first_keys(&self.delayed, now, STEP_ROWS)?;
        report.more |= due.len() == STEP_ROWS;
        for id in due {
            let Some(job) = self.load(id)? else { continue };
            *promoted.entry(job.queue.clone()).or_default() += 1;
            self.transition(job, |job| job.state = JobState::Waiting)?;
        }
        let mut expired: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let stale: Vec<u64> = first_keys(&self.active, now, STEP_ROWS)?;
        report.more |= stale.len() == STEP_ROWS;
        for id in stale {
            let Some(job) = self.load(id)? else { continue };
            let queue = job.queue.clone();
            let (_, dead) = self.finish_attempt(job, "lease expired", true)?;
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
        let first = |table: &redb::Table<'t, (u64, u64), ()>| -> Result<Option<u64>, QueueError> {
            Ok(table
                .first()
                .map_err(storage)?
                .map(|(key, _)| key.value().0))
        };
        report.next_due = match (first(&self.delayed)?, first(&self.active)?) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Rows indexed by this pass (none are due) are in next_due already.
        self.effects.earliest_due = None;
        self.effects.due_reset = Some(report.next_due);
        Ok(report)
    }

    /// Trims one queue's finished jobs of one state to its retention; bounded per call.
    fn retain(&mut self, queue: &str, state: JobState) -> Result<u64, QueueError> {
        let policy = self.policies.for_queue(queue, state);
        let count = self.count(queue, state)?;
        let over = count.saturating_sub(policy.count) as usize;
        let cutoff = policy.age_ms.map(|age| self.now.saturating_sub(age));
        if over == 0 && cutoff.is_none() {
            return Ok(0);
        }
        // Only the rows over the count, plus a few to check for age: this runs on every
        // finish, so it must not read hundreds of rows to remove none. The minute sweep
        // (and the next finishes) take the rest of an age backlog.
        let limit = over.min(STEP_ROWS) + if cutoff.is_some() { 32 } else { 0 };
        let mut removed = 0u64;
        for (index, (finished_at, id)) in self
            .ids_in_state(queue, state, limit)?
            .into_iter()
            .enumerate()
        {
            let too_many = index < over;
            let too_old = cutoff.is_some_and(|cutoff| finished_at < cutoff);
            if !too_many && !too_old {
                break;
            }
            if let Some(job) = self.load(id)? {
                self.remove(&job)?;
                removed += 1;
            }
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

    fn put_schedule(&mut self, mut schedule: Schedule) -> Result<(), QueueError> {
        if let Some(old) = self
            .schedules
            .get(schedule.name.as_str())
            .map_err(storage)?
        {
            let old: Schedule = serde_json::from_slice(old.value()).map_err(storage)?;
            let same_timing = old.cron == schedule.cron && old.timezone == schedule.timezone;
            if same_timing && schedule.last_tick.is_none() {
                schedule.last_tick = old.last_tick;
            }
        }
        let bytes = serde_json::to_vec(&schedule).map_err(storage)?;
        self.schedules
            .insert(schedule.name.as_str(), bytes.as_slice())
            .map_err(storage)?;
        self.effects.schedules_changed = true;
        Ok(())
    }

    fn fire_schedule(
        &mut self,
        name: &str,
        tick: Millis,
        job: Option<NewJob>,
    ) -> Result<Option<Enqueued>, QueueError> {
        let Some(bytes) = self.schedules.get(name).map_err(storage)? else {
            return Ok(None);
        };
        let mut schedule: Schedule = serde_json::from_slice(bytes.value()).map_err(storage)?;
        drop(bytes);
        if schedule.last_tick.is_some_and(|last| last >= tick) {
            return Ok(None);
        }
        schedule.last_tick = Some(tick);
        let encoded = serde_json::to_vec(&schedule).map_err(storage)?;
        self.schedules
            .insert(name, encoded.as_slice())
            .map_err(storage)?;
        match job {
            Some(job) => Ok(self.enqueue(&schedule.queue, vec![job])?.pop()),
            None => Ok(None),
        }
    }
}

/// Ids of the first rows of a `(time, id)` index whose time is at or before `now`.
fn first_keys<T: ReadableTable<(u64, u64), ()>>(
    table: &T,
    now: Millis,
    limit: usize,
) -> Result<Vec<u64>, QueueError> {
    table
        .range((0u64, 0u64)..=(now, u64::MAX))
        .map_err(storage)?
        .take(limit)
        .map(|row| row.map(|(key, _)| key.value().1).map_err(storage))
        .collect()
}

#[async_trait]
impl QueueStore for RedbQueueStore {
    fn kind(&self) -> &'static str {
        "redb"
    }

    async fn enqueue(&self, queue: &str, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        let queue = queue.to_owned();
        self.submit(move |tx| tx.enqueue(&queue, jobs)).await
    }

    async fn reserve(&self, queue: &str, lease: Lease) -> Result<Vec<Job>, QueueError> {
        let queue = queue.to_owned();
        self.submit(move |tx| tx.reserve(&queue, lease)).await
    }

    async fn ack(&self, acks: Vec<Ack>) -> Result<Vec<Result<Job, QueueError>>, QueueError> {
        self.submit(move |tx| acks.into_iter().map(|ack| tx.ack(ack)).collect())
            .await
    }

    async fn fail(&self, id: u64, lease_token: &str, error: &str) -> Result<Failed, QueueError> {
        let (token, error) = (lease_token.to_owned(), error.to_owned());
        self.submit(move |tx| tx.fail(id, &token, &error)).await
    }

    async fn heartbeat(
        &self,
        id: u64,
        lease_token: &str,
        lease_ms: Option<Millis>,
        default_ms: Millis,
    ) -> Result<Job, QueueError> {
        let token = lease_token.to_owned();
        self.submit(move |tx| tx.heartbeat(id, &token, lease_ms, default_ms))
            .await
    }

    async fn progress(
        &self,
        id: u64,
        lease_token: &str,
        progress: Value,
    ) -> Result<(), QueueError> {
        let token = lease_token.to_owned();
        self.submit(move |tx| tx.progress(id, &token, progress))
            .await
    }

    async fn get(&self, id: u64) -> Result<Option<Job>, QueueError> {
        self.read(|txn| {
            let jobs = txn.open_table(JOBS).map_err(storage)?;
            match jobs.get(id).map_err(storage)? {
                Some(bytes) => decode(bytes.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    async fn delete(&self, id: u64) -> Result<bool, QueueError> {
        self.submit(move |tx| tx.delete(id)).await
    }

    async fn list(
        &self,
        queue: &str,
        state: JobState,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, QueueError> {
        let after = cursor.map(decode_cursor).transpose()?;
        self.read(|txn| {
            let by_state = txn.open_table(BY_STATE).map_err(storage)?;
            let jobs = txn.open_table(JOBS).map_err(storage)?;
            let code = state.code();
            let start = match after {
                Some((order, id)) if id < u64::MAX => (order, id + 1),
                Some((order, _)) => (order.saturating_add(1), 0),
                None => (0, 0),
            };
            let mut page = Vec::with_capacity(limit.min(1000));
            let mut last = None;
            for row in by_state
                .range((queue, code, start.0, start.1)..=(queue, code, u64::MAX, u64::MAX))
                .map_err(storage)?
                .take(limit)
            {
                let (key, _) = row.map_err(storage)?;
                let (_, _, order, id) = key.value();
                if let Some(bytes) = jobs.get(id).map_err(storage)? {
                    page.push(decode(bytes.value())?);
                }
                last = Some((order, id));
            }
            let next = match last {
                Some(last) if page.len() == limit => Some(encode_cursor(last.0, last.1)),
                _ => None,
            };
            Ok(Page { jobs: page, next })
        })
    }

    async fn stats(&self) -> Result<Vec<QueueCounts>, QueueError> {
        self.read(|txn| {
            let queues = txn.open_table(QUEUES).map_err(storage)?;
            let counts = txn.open_table(COUNTS).map_err(storage)?;
            let by_state = txn.open_table(BY_STATE).map_err(storage)?;
            let jobs = txn.open_table(JOBS).map_err(storage)?;
            let mut all = Vec::new();
            for row in queues.iter().map_err(storage)? {
                let (name, flags) = row.map_err(storage)?;
                let mut figures = QueueCounts::empty(name.value());
                figures.paused = flags.value() & PAUSED != 0;
                for state in JobState::ALL {
                    let count = counts
                        .get((name.value(), state.code()))
                        .map_err(storage)?
                        .map_or(0, |v| v.value());
                    figures.set(state, count);
                }
                let waiting = JobState::Waiting.code();
                let oldest = by_state
                    .range(
                        (name.value(), waiting, 0u64, 0u64)
                            ..=(name.value(), waiting, u64::MAX, u64::MAX),
                    )
                    .map_err(storage)?
                    .next()
                    .transpose()
                    .map_err(storage)?
                    .map(|(key, _)| key.value().3);
                if let Some(id) = oldest
                    && let Some(bytes) = jobs.get(id).map_err(storage)?
                {
                    figures.oldest_waiting_since = Some(decode(bytes.value())?.run_at);
                }
                all.push(figures);
            }
            Ok(all)
        })
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), QueueError> {
        let queue = queue.to_owned();
        self.submit(move |tx| tx.set_paused(&queue, paused)).await
    }

    async fn drain(&self, queue: &str) -> Result<u64, QueueError> {
        let mut total = 0;
        loop {
            let queue = queue.to_owned();
            let removed = self.submit(move |tx| tx.drain(&queue)).await?;
            total += removed;
            if removed < STEP_ROWS as u64 {
                return Ok(total);
            }
        }
    }

    async fn retry_dead(&self, queue: &str, ids: Option<Vec<u64>>) -> Result<u64, QueueError> {
        if ids.is_some() {
            let queue = queue.to_owned();
            return self.submit(move |tx| tx.retry_dead(&queue, ids)).await;
        }
        let mut total = 0;
        loop {
            let queue = queue.to_owned();
            let retried = self.submit(move |tx| tx.retry_dead(&queue, None)).await?;
            total += retried;
            if retried < STEP_ROWS as u64 {
                return Ok(total);
            }
        }
    }

    async fn run_due(&self) -> Result<DueReport, QueueError> {
        self.submit(|tx| tx.run_due()).await
    }

    async fn retain(&self, queue: &str) -> Result<u64, QueueError> {
        let mut total = 0;
        for state in [JobState::Completed, JobState::Dead] {
            loop {
                let queue = queue.to_owned();
                let removed = self.submit(move |tx| tx.retain(&queue, state)).await?;
                total += removed;
                if removed == 0 {
                    break;
                }
            }
        }
        Ok(total)
    }

    async fn schedules(&self) -> Result<Vec<Schedule>, QueueError> {
        self.read(|txn| {
            let table = txn.open_table(SCHEDULES).map_err(storage)?;
            let mut all = Vec::new();
            for row in table.iter().map_err(storage)? {
                let (_, bytes) = row.map_err(storage)?;
                all.push(serde_json::from_slice(bytes.value()).map_err(storage)?);
            }
            Ok(all)
        })
    }

    async fn put_schedule(&self, schedule: Schedule) -> Result<(), QueueError> {
        self.submit(move |tx| tx.put_schedule(schedule)).await
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool, QueueError> {
        let name = name.to_owned();
        self.submit(move |tx| {
            let existed = tx
                .schedules
                .remove(name.as_str())
                .map_err(storage)?
                .is_some();
            tx.effects.schedules_changed = true;
            Ok(existed)
        })
        .await
    }

    async fn fire_schedule(
        &self,
        name: &str,
        tick: Millis,
        job: Option<NewJob>,
    ) -> Result<Option<Enqueued>, QueueError> {
        let name = name.to_owned();
        self.submit(move |tx| tx.fire_schedule(&name, tick, job))
            .await
    }

    async fn backup(&self, destination: &std::path::Path) -> Result<(), QueueError> {
        self.backup_to(destination).await
    }
}

impl RedbQueueStore {
    /// Copies the file to `destination` between two commits: every acknowledged change
    /// is in the copy and no commit is half in it.
    pub async fn backup_to(&self, destination: &std::path::Path) -> Result<(), QueueError> {
        let (reply, answer) = oneshot::channel();
        let (source, destination) = (self.path.clone(), destination.to_owned());
        let work = Box::new(move || {
            let _ = reply.send(std::fs::copy(&source, &destination).map(|_| ()));
        });
        self.ops
            .send(Work::Exclusive(work))
            .await
            .map_err(|_| QueueError::Closed)?;
        answer
            .await
            .map_err(|_| QueueError::Closed)?
            .map_err(|error| storage(format!("cannot copy the queue file: {error}")))
    }

    /// The store's clock (the handle and the store must agree on "now").
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Jobs stored, for tests and the dashboard.
    pub fn job_count(&self) -> Result<u64, QueueError> {
        self.read(|txn| {
            txn.open_table(JOBS)
                .map_err(storage)?
                .len()
                .map_err(storage)
        })
    }
}
