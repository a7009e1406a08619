//! The durable job queue: the [`Queue`] handle the API and processors call, over a
//! [`QueueStore`] that keeps jobs (redb in `queue.redb` first; PostgreSQL when scaled out).
//!
//! Background work the handle owns: the due-timer (delayed jobs become waiting at
//! their time and expired leases return, driven by the earliest time the store
//! reports, never by polling), the scheduler (cron ticks), the built-in processors and
//! a retention sweep for age limits.

#[cfg(test)]
mod conformance;
mod job;
mod metrics;
pub mod pg_store;
pub mod processor;
pub mod redb_store;
mod schedule;
mod store;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{QueueConfig, Retention as RetentionConfig};

pub use job::{
    Backoff, BackoffKind, DurationValue, Job, JobLimits, JobSpec, JobState, Millis, NewJob,
    check_queue_name,
};
pub use metrics::QueueMetrics;
pub use processor::{Processor, ProcessorRegistry};
pub use schedule::{ScheduleError, ScheduleSpec};
pub use store::{
    Ack, CatchUp, DueReport, Enqueued, Failed, Lease, Page, QueueCounts, QueueStore, Retention,
    Schedule,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String },
    #[error("the payload is {size} bytes; the limit is {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("no job {0}")]
    NotFound(u64),
    #[error("job {id} is {} and this lease token is not its current one", .state.as_str())]
    LeaseLost { id: u64, state: JobState },
    #[error("no schedule {0:?}")]
    ScheduleNotFound(String),
    #[error("queue storage failed: {0}")]
    Storage(String),
    /// The store cannot be reached (PostgreSQL down or out of connections): nothing
    /// was changed, or at least nothing was acknowledged; try again later.
    #[error("queue storage unavailable: {0}")]
    Unavailable(String),
    #[error("the queue is shutting down")]
    Closed,
}

/// Wall-clock milliseconds; a seam so tests can move time by hand.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to.
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(start: Millis) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicU64::new(start))
    }

    pub fn now(&self) -> Millis {
        self.now_ms()
    }

    pub fn advance(&self, by: Duration) {
        self.0
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// 64 unpredictable bits (lease tokens, jitter) from std's randomly keyed SipHash.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    std::collections::hash_map::RandomState::new()
        .hash_one(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

const READY_STRIPES: usize = 64;
/// How often a long-polling reserve asks again while the store is unreachable (its
/// breaker answers at once, so this only paces the loop).
const STORE_RETRY: Duration = Duration::from_millis(250);

/// How stores tell the handle that something changed, after they committed it.
pub struct Wakeups {
    /// Reservers of a queue wait on its stripe; sharing a stripe only costs a retry.
    ready: [Notify; READY_STRIPES],
    /// The earliest time a delayed job or a lease is due; the due-timer sleeps to it.
    due: watch::Sender<Option<Millis>>,
    schedules: Notify,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            ready: std::array::from_fn(|_| Notify::new()),
            due: watch::Sender::new(None),
            schedules: Notify::new(),
        }
    }
}

impl Wakeups {
    fn stripe(&self, queue: &str) -> &Notify {
        let mut hasher = std::hash::DefaultHasher::new();
        queue.hash(&mut hasher);
        &self.ready[hasher.finish() as usize % READY_STRIPES]
    }

    pub fn job_ready(&self, queue: &str) {
        self.stripe(queue).notify_waiters();
    }

    /// Wakes every parked reserve (after notifications may have been missed).
    pub fn all_ready(&self) {
        for stripe in &self.ready {
            stripe.notify_waiters();
        }
    }

    /// Something is due at `at`: wake the timer if that is earlier than it knew.
    pub fn due_at(&self, at: Millis) {
        self.due.send_if_modified(|due| match due {
            Some(current) if *current <= at => false,
            _ => {
                *due = Some(at);
                true
            }
        });
    }

    /// The store's own answer after a pass over due work replaces what the timer knew.
    pub fn due_reset(&self, next: Option<Millis>) {
        self.due.send_replace(next);
    }

    pub fn schedules_changed(&self) {
        self.schedules.notify_one();
    }
}

/// Retention per queue and finished state, from `[queue.queues.NAME]`.
#[derive(Clone, Default)]
pub struct RetentionPolicies {
    per_queue: Arc<HashMap<String, (Retention, Retention)>>,
}

/// Finished jobs kept per queue and state when the configuration says nothing, so a
/// queue that runs for years does not grow its file without bound.
pub const DEFAULT_KEEP: u64 = 100_000;

impl RetentionPolicies {
    pub fn from_config(config: &QueueConfig) -> RetentionPolicies {
        let convert = |retention: &Option<RetentionConfig>| Retention {
            count: retention
                .as_ref()
                .and_then(|r| r.count)
                .unwrap_or(DEFAULT_KEEP),
            age_ms: retention
                .as_ref()
                .and_then(|r| r.age)
                .map(|age| age.0.as_millis() as u64),
        };
        RetentionPolicies {
            per_queue: Arc::new(
                config
                    .queues
                    .iter()
                    .map(|(name, definition)| {
                        (
                            name.clone(),
                            (
                                convert(&definition.remove_on_complete),
                                convert(&definition.remove_on_fail),
                            ),
                        )
                    })
                    .collect(),
            ),
        }
    }

    pub fn for_queue(&self, queue: &str, state: JobState) -> Retention {
        let default = Retention {
            count: DEFAULT_KEEP,
            age_ms: None,
        };
        match self.per_queue.get(queue) {
            Some((completed, _)) if state == JobState::Completed => *completed,
            Some((_, dead)) if state == JobState::Dead => *dead,
            _ => default,
        }
    }

    fn queues_with_age(&self) -> Vec<String> {
        self.per_queue
            .iter()
            .filter(|(_, (completed, dead))| completed.age_ms.is_some() || dead.age_ms.is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// Settings the handle applies to every call.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub limits: JobLimits,
    pub default_lease_ms: Millis,
    /// Most jobs one reserve returns and one enqueue batch may hold.
    pub max_batch: usize,
    pub max_wait: Duration,
    pub max_lease_ms: Millis,
}

impl QueueSettings {
    pub fn from_config(config: &QueueConfig) -> QueueSettings {
        QueueSettings {
            limits: JobLimits {
                max_payload_bytes: config.max_payload_bytes.0 as usize,
                default_attempts: config.default_attempts.max(1),
                ..JobLimits::default()
            },
            default_lease_ms: config.default_lease.0.as_millis() as u64,
            max_batch: 1000,
            max_wait: Duration::from_secs(60),
            max_lease_ms: 24 * 3_600_000,
        }
    }
}

/// What a reserve asks for.
#[derive(Debug, Clone, Copy)]
pub struct ReserveRequest {
    pub max: usize,
    pub lease_ms: Option<Millis>,
    pub wait: Duration,
}

/// Stats for one queue as the API shows them.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    #[serde(flatten)]
    pub counts: QueueCounts,
    pub oldest_waiting_age_ms: Option<Millis>,
    /// Completions per second over the last minute.
    pub completed_per_sec: f64,
}

/// The queue subsystem's handle. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn QueueStore>,
    clock: Arc<dyn Clock>,
    wakeups: Arc<Wakeups>,
    metrics: QueueMetrics,
    settings: QueueSettings,
    limiters: HashMap<String, DefaultDirectRateLimiter>,
    throughput: Mutex<Throughput>,
    shutdown: CancellationToken,
}

impl Queue {
    /// Wraps a store. Nothing runs until [`Queue::start`].
    pub fn new(
        store: Arc<dyn QueueStore>,
        clock: Arc<dyn Clock>,
        wakeups: Arc<Wakeups>,
        metrics: QueueMetrics,
        config: &QueueConfig,
        shutdown: CancellationToken,
    ) -> Queue {
        let limiters = config
            .queues
            .iter()
            .filter_map(|(name, definition)| {
                let rate = definition.rate_limit?;
                let quota = Quota::with_period(rate.per / rate.count.max(1))?
                    .allow_burst(NonZeroU32::new(rate.count)?);
                Some((name.clone(), RateLimiter::direct(quota)))
            })
            .collect();
        Queue {
            inner: Arc::new(Inner {
                store,
                clock,
                wakeups,
                metrics,
                settings: QueueSettings::from_config(config),
                limiters,
                throughput: Mutex::new(Throughput::default()),
                shutdown,
            }),
        }
    }

    /// Starts the due-timer, the scheduler (after syncing `[[queue.schedules]]` into
    /// the store), the processors and the retention sweep.
    pub async fn start(
        &self,
        config: &QueueConfig,
        processors: &ProcessorRegistry,
    ) -> Result<(), QueueError> {
        schedule::sync_config(self, &config.schedules).await?;
        tokio::spawn(self.clone().due_timer());
        tokio::spawn(schedule::run(self.clone()));
        processor::start(self, config, processors);
        let policies = RetentionPolicies::from_config(config).queues_with_age();
        if !policies.is_empty() {
            tokio::spawn(self.clone().retention_sweep(policies));
        }
        tokio::spawn(self.clone().refresh_gauges());
        Ok(())
    }

    pub fn store(&self) -> &Arc<dyn QueueStore> {
        &self.inner.store
    }

    pub fn now_ms(&self) -> Millis {
        self.inner.clock.now_ms()
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    pub async fn enqueue(
        &self,
        queue: &str,
        specs: Vec<JobSpec>,
    ) -> Result<Vec<Enqueued>, QueueError> {
        check_queue_name(queue)?;
        if specs.is_empty() || specs.len() > self.inner.settings.max_batch {
            return Err(QueueError::Invalid {
                code: "bad_batch",
                detail: format!("a batch holds 1 to {} jobs", self.inner.settings.max_batch),
            });
        }
        let now = self.now_ms();
        let jobs = specs
            .into_iter()
            .map(|spec| spec.validate(&self.inner.settings.limits, now))
            .collect::<Result<Vec<_>, _>>()?;
        let answers = self.inner.store.enqueue(queue, jobs).await?;
        let fresh = answers.iter().filter(|answer| !answer.duplicate).count();
        self.inner
            .metrics
            .enqueued
            .with_label_values(&[queue])
            .inc_by(fresh as u64);
        Ok(answers)
    }

    /// Leases up to `max` jobs, waiting up to `wait` for one to arrive. Woken by the
    /// store's commit of a runnable job, so pickup does not depend on any polling.
    pub async fn reserve(
        &self,
        queue: &str,
        request: ReserveRequest,
    ) -> Result<Vec<Job>, QueueError> {
        check_queue_name(queue)?;
        let settings = &self.inner.settings;
        if request.max == 0 || request.max > settings.max_batch {
            return Err(QueueError::Invalid {
                code: "bad_reserve",
                detail: format!("max is 1 to {}", settings.max_batch),
            });
        }
        if request.wait > settings.max_wait {
            return Err(QueueError::Invalid {
                code: "bad_reserve",
                detail: format!("wait is at most {}s", settings.max_wait.as_secs()),
            });
        }
        if let Some(lease) = request.lease_ms
            && (lease == 0 || lease > settings.max_lease_ms)
        {
            return Err(QueueError::Invalid {
                code: "bad_reserve",
                detail: "lease is longer than 0 and at most 24h".to_owned(),
            });
        }
        let deadline = tokio::time::Instant::now() + request.wait;
        loop {
            // While the store is unreachable a worker gets nothing rather than an error:
            // it keeps polling as it would on an empty queue, and picks work up again
            // as soon as the store answers (enqueues, which must not pretend, do fail).
            let mut store_away = false;
            let signal = self.inner.wakeups.stripe(queue);
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let (allowed, retry_in) = self.permits(queue, request.max);
            if allowed > 0 {
                let lease = Lease {
                    max_jobs: allowed,
                    lease_ms: request.lease_ms,
                    default_ms: settings.default_lease_ms,
                };
                match self.inner.store.reserve(queue, lease).await {
                    Ok(jobs) if !jobs.is_empty() => {
                        self.observe_pickup(queue, &jobs);
                        return Ok(jobs);
                    }
                    Ok(_) => {}
                    Err(QueueError::Unavailable(error)) => {
                        tracing::debug!(queue, %error, "reserve: store unavailable, answering no jobs");
                        store_away = true;
                    }
                    Err(error) => return Err(error),
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake_at = match (retry_in, store_away) {
                (_, true) => deadline.min(now + STORE_RETRY),
                (Some(retry_in), false) => deadline.min(now + retry_in),
                (None, false) => deadline,
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.inner.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// How many jobs the queue's rate limit allows now, and when to ask again if none.
    fn permits(&self, queue: &str, wanted: usize) -> (usize, Option<Duration>) {
        let Some(limiter) = self.inner.limiters.get(queue) else {
            return (wanted, None);
        };
        let mut allowed = 0;
        while allowed < wanted {
            match limiter.check() {
                Ok(()) => allowed += 1,
                Err(not_until) if allowed == 0 => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    return (0, Some(wait.max(Duration::from_millis(1))));
                }
                Err(_) => break,
            }
        }
        (allowed, None)
    }

    fn observe_pickup(&self, queue: &str, jobs: &[Job]) {
        let now = self.now_ms();
        let histogram = self
            .inner
            .metrics
            .pickup_seconds
            .with_label_values(&[queue]);
        for job in jobs {
            histogram.observe(now.saturating_sub(job.run_at) as f64 / 1000.0);
            if job.attempts_made > 1 {
                self.inner.metrics.retried.with_label_values(&[queue]).inc();
            }
        }
    }

    pub async fn ack(&self, acks: Vec<Ack>) -> Result<Vec<Result<Job, QueueError>>, QueueError> {
        if acks.is_empty() || acks.len() > self.inner.settings.max_batch {
            return Err(QueueError::Invalid {
                code: "bad_batch",
                detail: format!("a batch holds 1 to {} acks", self.inner.settings.max_batch),
            });
        }
        let results = self.inner.store.ack(acks).await?;
        let now = self.now_ms();
        let mut per_queue: HashMap<&str, u64> = HashMap::new();
        for job in results.iter().flatten() {
            *per_queue.entry(job.queue.as_str()).or_default() += 1;
            if let Some(started) = job.started_at {
                self.inner
                    .metrics
                    .run_seconds
                    .with_label_values(&[job.queue.as_str()])
                    .observe(now.saturating_sub(started) as f64 / 1000.0);
            }
        }
        let mut throughput = self
            .inner
            .throughput
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (queue, completed) in per_queue {
            self.inner
                .metrics
                .completed
                .with_label_values(&[queue])
                .inc_by(completed);
            throughput.record(queue, completed, now);
        }
        Ok(results)
    }

    pub async fn fail(
        &self,
        id: u64,
        lease_token: &str,
        error: &str,
    ) -> Result<Failed, QueueError> {
        let failed = self.inner.store.fail(id, lease_token, error).await?;
        let queue = failed.job.queue.as_str();
        self.inner.metrics.failed.with_label_values(&[queue]).inc();
        if failed.dead {
            self.inner.metrics.dead.with_label_values(&[queue]).inc();
        }
        Ok(failed)
    }

    pub async fn heartbeat(
        &self,
        id: u64,
        lease_token: &str,
        lease_ms: Option<Millis>,
    ) -> Result<Job, QueueError> {
        if let Some(lease) = lease_ms
            && (lease == 0 || lease > self.inner.settings.max_lease_ms)
        {
            return Err(QueueError::Invalid {
                code: "bad_lease",
                detail: "lease is longer than 0 and at most 24h".to_owned(),
            });
        }
        self.inner
            .store
            .heartbeat(
                id,
                lease_token,
                lease_ms,
                self.inner.settings.default_lease_ms,
            )
            .await
    }

    pub async fn progress(
        &self,
        id: u64,
        lease_token: &str,
        progress: Value,
    ) -> Result<(), QueueError> {
        let size = serde_json::to_vec(&progress).map_or(usize::MAX, |v| v.len());
        let limit = self.inner.settings.limits.max_payload_bytes;
        if size > limit {
            return Err(QueueError::PayloadTooLarge { size, limit });
        }
        self.inner.store.progress(id, lease_token, progress).await
    }

    pub async fn get(&self, id: u64) -> Result<Job, QueueError> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or(QueueError::NotFound(id))
    }

    pub async fn delete(&self, id: u64) -> Result<(), QueueError> {
        if self.inner.store.delete(id).await? {
            Ok(())
        } else {
            Err(QueueError::NotFound(id))
        }
    }

    pub async fn list(
        &self,
        queue: &str,
        state: JobState,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, QueueError> {
        check_queue_name(queue)?;
        let limit = limit.clamp(1, 1000);
        self.inner.store.list(queue, state, cursor, limit).await
    }

    pub async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        let now = self.now_ms();
        let counts = self.inner.store.stats().await?;
        let throughput = self
            .inner
            .throughput
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(counts
            .into_iter()
            .map(|counts| QueueStats {
                oldest_waiting_age_ms: counts
                    .oldest_waiting_since
                    .map(|since| now.saturating_sub(since)),
                completed_per_sec: throughput.per_second(&counts.queue, now),
                counts,
            })
            .collect())
    }

    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), QueueError> {
        check_queue_name(queue)?;
        self.inner.store.set_paused(queue, paused).await
    }

    pub async fn drain(&self, queue: &str) -> Result<u64, QueueError> {
        check_queue_name(queue)?;
        self.inner.store.drain(queue).await
    }

    pub async fn retry_dead(&self, queue: &str, ids: Option<Vec<u64>>) -> Result<u64, QueueError> {
        check_queue_name(queue)?;
        self.inner.store.retry_dead(queue, ids).await
    }

    /// Applies retention to every known queue now; returns how many jobs went.
    pub async fn retain_all(&self) -> Result<u64, QueueError> {
        let mut removed = 0;
        for queue in self.inner.store.stats().await? {
            removed += self.inner.store.retain(&queue.queue).await?;
        }
        Ok(removed)
    }

    /// One pass over due work; the timer calls it, tests with a manual clock too.
    pub async fn run_due(&self) -> Result<DueReport, QueueError> {
        let report = self.inner.store.run_due().await?;
        for (queue, back, dead) in &report.expired {
            let queue = queue.as_str();
            self.inner
                .metrics
                .failed
                .with_label_values(&[queue])
                .inc_by(back + dead);
            self.inner
                .metrics
                .dead
                .with_label_values(&[queue])
                .inc_by(*dead);
            self.inner
                .metrics
                .lease_expired
                .with_label_values(&[queue])
                .inc_by(back + dead);
        }
        Ok(report)
    }

    async fn due_timer(self) {
        let mut due = self.inner.wakeups.due.subscribe();
        loop {
            match self.run_due().await {
                Ok(report) if report.more => continue,
                // The store already told `due` when the next thing is due.
                Ok(_) => {}
                Err(QueueError::Closed) => return,
                Err(error) => {
                    tracing::error!(%error, "queue: promoting due jobs failed; retrying in 1s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = self.inner.shutdown.cancelled() => return,
                    }
                }
            }
            loop {
                let next = *due.borrow_and_update();
                let wait = match next {
                    Some(at) => Duration::from_millis(at.saturating_sub(self.now_ms())),
                    None => Duration::from_secs(3600),
                };
                if wait.is_zero() {
                    break;
                }
                tokio::select! {
                    changed = due.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(wait) => break,
                    _ = self.inner.shutdown.cancelled() => return,
                }
            }
        }
    }

    async fn retention_sweep(self, queues: Vec<String>) {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            for queue in &queues {
                if let Err(error) = self.inner.store.retain(queue).await {
                    tracing::warn!(%error, queue, "queue retention sweep failed");
                }
            }
        }
    }

    /// Depth per state and oldest waiting age, from the store's counters each second.
    async fn refresh_gauges(self) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            if let Ok(stats) = self.stats().await {
                self.inner.metrics.set_depths(&stats);
            }
        }
    }
}

/// Completions per queue in one-second buckets over the last minute. Bounded: queues
/// beyond [`Throughput::MAX_QUEUES`] are not tracked.
#[derive(Default)]
struct Throughput {
    queues: HashMap<String, Window>,
}

struct Window {
    second: u64,
    buckets: [u32; 60],
}

impl Throughput {
    const MAX_QUEUES: usize = 4096;

    fn record(&mut self, queue: &str, completed: u64, now: Millis) {
        let second = now / 1000;
        if !self.queues.contains_key(queue) && self.queues.len() >= Self::MAX_QUEUES {
            return;
        }
        let window = self.queues.entry(queue.to_owned()).or_insert(Window {
            second,
            buckets: [0; 60],
        });
        window.advance(second);
        let slot = &mut window.buckets[(second % 60) as usize];
        *slot = slot.saturating_add(completed as u32);
    }

    fn per_second(&self, queue: &str, now: Millis) -> f64 {
        let second = now / 1000;
        match self.queues.get(queue) {
            Some(window) if second.saturating_sub(window.second) < 60 => {
                // `now` is read before the lock, so a completion recorded meanwhile may
                // have moved the window past it: then nothing is stale.
                let stale = second.saturating_sub(window.second);
                let live: u64 = (0..60u64)
                    .filter(|age| *age >= stale)
                    .map(|age| u64::from(window.buckets[((second - age) % 60) as usize]))
                    .sum();
                live as f64 / 60.0
            }
            _ => 0.0,
        }
    }
}

impl Window {
    fn advance(&mut self, second: u64) {
        if second <= self.second {
            return;
        }
        let gap = (second - self.second).min(60);
        for step in 1..=gap {
            self.buckets[((self.second + step) % 60) as usize] = 0;
        }
        self.second = second;
    }
}

#[cfg(test)]
mod throughput_tests {
    use super::Throughput;

    #[test]
    fn a_reading_older_than_the_last_completion_counts_and_does_not_panic() {
        let mut throughput = Throughput::default();
        throughput.record("q", 6, 100_500);
        // Read with a `now` taken before that completion was recorded: it still counts
        // (the ring holds it) and the reading must not underflow.
        assert_eq!(throughput.per_second("q", 99_900), 0.1);
        assert_eq!(throughput.per_second("q", 100_900), 0.1);
    }
}
