//! The seam between the queue's handle and where jobs live. The embedded redb store
//! comes first; a PostgreSQL store (`FOR UPDATE SKIP LOCKED`) fits the same trait.
//!
//! Every mutating call returns only once its change is durable (fsynced). Stores wake
//! waiting reservers through [`Wakeups`] after they commit, never before.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::collections::{HashMap, HashSet};

use super::job::{Job, JobState, Millis, NewJob};
use super::{QueueError, QueueMetrics, Wakeups};

/// The answer to one enqueued job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Enqueued {
    pub id: u64,
    pub state: JobState,
    /// True when `unique_key` matched a live job: `id` is that job's and nothing new was stored.
    pub duplicate: bool,
}

/// One ack in a batch.
#[derive(Debug, Clone, Deserialize)]
pub struct Ack {
    pub id: u64,
    pub lease_token: String,
    #[serde(default)]
    pub result: Option<Value>,
}

/// What a reserve takes.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub max_jobs: usize,
    /// The lease length; `None` takes each job's `timeout`, else `default_ms`.
    pub lease_ms: Option<Millis>,
    pub default_ms: Millis,
}

/// Per-queue figures, read from maintained counters (no scan).
#[derive(Debug, Clone, Serialize)]
pub struct QueueCounts {
    pub queue: String,
    pub paused: bool,
    pub waiting: u64,
    pub delayed: u64,
    pub active: u64,
    pub completed: u64,
    pub failed: u64,
    pub dead: u64,
    /// When the oldest waiting job became runnable.
    pub oldest_waiting_since: Option<Millis>,
}

impl QueueCounts {
    pub fn empty(queue: &str) -> QueueCounts {
        QueueCounts {
            queue: queue.to_owned(),
            paused: false,
            waiting: 0,
            delayed: 0,
            active: 0,
            completed: 0,
            failed: 0,
            dead: 0,
            oldest_waiting_since: None,
        }
    }

    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Waiting => self.waiting,
            JobState::Delayed => self.delayed,
            JobState::Active => self.active,
            JobState::Completed => self.completed,
            JobState::Failed => self.failed,
            JobState::Dead => self.dead,
        }
    }

    pub fn set(&mut self, state: JobState, value: u64) {
        let slot = match state {
            JobState::Waiting => &mut self.waiting,
            JobState::Delayed => &mut self.delayed,
            JobState::Active => &mut self.active,
            JobState::Completed => &mut self.completed,
            JobState::Failed => &mut self.failed,
            JobState::Dead => &mut self.dead,
        };
        *slot = value;
    }
}

/// One page of a listing; `next` is the opaque cursor of the following page.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub jobs: Vec<Job>,
    pub next: Option<String>,
}

/// What a pass over due work did: delayed and retrying jobs made runnable, expired
/// leases returned or buried, and when the next such thing is due.
#[derive(Debug, Clone, Default)]
pub struct DueReport {
    pub promoted: Vec<(String, u64)>,
    /// Jobs whose lease expired: `(queue, back to waiting, dead)`.
    pub expired: Vec<(String, u64, u64)>,
    /// True when the pass stopped at its bound and more is already due.
    pub more: bool,
    pub next_due: Option<Millis>,
}

/// How a failure ended.
#[derive(Debug, Clone)]
pub struct Failed {
    pub job: Job,
    /// True: no attempts left, the job is dead.
    pub dead: bool,
}

/// Keep-the-last-N and keep-for-T of finished jobs, per queue and state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub count: u64,
    pub age_ms: Option<Millis>,
}

/// A recurring job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    pub queue: String,
    pub cron: String,
    pub timezone: String,
    pub job_name: String,
    #[serde(default)]
    pub payload: Value,
    pub catch_up: CatchUp,
    /// The last tick that fired (or was skipped); ticks at or before it never fire again.
    pub last_tick: Option<Millis>,
    /// Set when it came from `[[queue.schedules]]`: start-up removes those no longer there.
    #[serde(default)]
    pub from_config: bool,
}

pub use crate::config::CatchUp;

#[async_trait]
pub trait QueueStore: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    /// Stores every job of the batch in one transaction, or none.
    async fn enqueue(&self, queue: &str, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError>;
    /// Leases up to `lease.max_jobs` waiting jobs, highest priority then oldest first.
    async fn reserve(&self, queue: &str, lease: Lease) -> Result<Vec<Job>, QueueError>;
    /// Each ack is checked and applied on its own; the batch commits once.
    async fn ack(&self, acks: Vec<Ack>) -> Result<Vec<Result<Job, QueueError>>, QueueError>;
    async fn fail(&self, id: u64, lease_token: &str, error: &str) -> Result<Failed, QueueError>;
    async fn heartbeat(
        &self,
        id: u64,
        lease_token: &str,
        lease_ms: Option<Millis>,
        default_ms: Millis,
    ) -> Result<Job, QueueError>;
    async fn progress(&self, id: u64, lease_token: &str, progress: Value)
    -> Result<(), QueueError>;

    async fn get(&self, id: u64) -> Result<Option<Job>, QueueError>;
    async fn delete(&self, id: u64) -> Result<bool, QueueError>;
    async fn list(
        &self,
        queue: &str,
        state: JobState,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, QueueError>;
    /// Every queue that has or had jobs, plus `known` ones that never had any.
    async fn stats(&self) -> Result<Vec<QueueCounts>, QueueError>;

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), QueueError>;
    /// Removes waiting, delayed and retrying jobs (not active ones). Returns how many.
    async fn drain(&self, queue: &str) -> Result<u64, QueueError>;
    /// Dead jobs back to waiting with fresh attempts: all of the queue's, or these ids.
    async fn retry_dead(&self, queue: &str, ids: Option<Vec<u64>>) -> Result<u64, QueueError>;

    /// Promotes due delayed jobs and expires due leases, in bounded steps.
    async fn run_due(&self) -> Result<DueReport, QueueError>;
    /// Applies retention to finished jobs of one queue now (also done on every finish).
    async fn retain(&self, queue: &str) -> Result<u64, QueueError>;

    async fn schedules(&self) -> Result<Vec<Schedule>, QueueError>;
    /// Creates or replaces; keeps `last_tick` when the timing did not change.
    async fn put_schedule(&self, schedule: Schedule) -> Result<(), QueueError>;
    async fn delete_schedule(&self, name: &str) -> Result<bool, QueueError>;
    /// Records `tick` as fired and enqueues `job` in one transaction, unless the tick
    /// already fired. `job: None` records a skipped tick.
    async fn fire_schedule(
        &self,
        name: &str,
        tick: Millis,
        job: Option<NewJob>,
    ) -> Result<Option<Enqueued>, QueueError>;

    /// Writes a consistent copy of the store's file (embedded stores; external ones
    /// are backed up by their own tools and answer `Invalid`).
    async fn backup(&self, destination: &std::path::Path) -> Result<(), QueueError>;
}

/// The first `max` bytes of `text`, cut on a character boundary: stored job errors are
/// bounded whatever a worker sends.
pub(super) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A listing's paging cursor: the sort position and the job id, opaque to clients and
/// the same for every store, so a cursor survives a change of backend's code path.
pub(super) fn encode_cursor(order: u64, id: u64) -> String {
    format!("{order:x}.{id:x}")
}

pub(super) fn decode_cursor(cursor: &str) -> Result<(u64, u64), QueueError> {
    let bad = || QueueError::Invalid {
        code: "bad_cursor",
        detail: "the cursor is not one this listing gave out".to_owned(),
    };
    let (order, id) = cursor.split_once('.').ok_or_else(bad)?;
    Ok((
        u64::from_str_radix(order, 16).map_err(|_| bad())?,
        u64::from_str_radix(id, 16).map_err(|_| bad())?,
    ))
}

/// What a committed transaction must tell the rest of the process: collected inside the
/// transaction, published only after its commit, by every store the same way.
#[derive(Default)]
pub(super) struct Effects {
    pub(super) ready: HashSet<String>,
    pub(super) earliest_due: Option<Millis>,
    /// Set by a pass over due work: what the timer knew is replaced by this.
    pub(super) due_reset: Option<Option<Millis>>,
    pub(super) retention_removed: HashMap<String, u64>,
    pub(super) schedules_changed: bool,
}

impl Effects {
    pub(super) fn publish(&self, wakeups: &Wakeups, metrics: &QueueMetrics) {
        for (queue, removed) in &self.retention_removed {
            metrics
                .retention_removed
                .with_label_values(&[queue.as_str()])
                .inc_by(*removed);
        }
        for queue in &self.ready {
            wakeups.job_ready(queue);
        }
        // Replaced here, in commit order, so an earlier deadline committed after the
        // pass is never overwritten by the pass's answer.
        if let Some(next) = self.due_reset {
            wakeups.due_reset(next);
        }
        if let Some(at) = self.earliest_due {
            wakeups.due_at(at);
        }
        if self.schedules_changed {
            wakeups.schedules_changed();
        }
    }
}
