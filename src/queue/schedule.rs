//! Recurring jobs: cron with seconds and an IANA time zone, fired once per tick.
//!
//! Why not tokio-cron-scheduler: its persistence is its own (PostgreSQL or NATS) and
//! its "fire" is a callback that cannot share a transaction with our enqueue. Exactly
//! once across restarts needs "record the tick" and "enqueue the job" to commit
//! together, so timing is croner plus this small timer, and the fire is one store
//! transaction ([`QueueStore::fire_schedule`]).
//!
//! Daylight saving time (croner's rules, tested below): a tick that falls in the gap of
//! a spring-forward change runs at the first valid time after it (02:30 in
//! Europe/Berlin runs at 03:00 that day); a tick in the repeated hour of a fall-back
//! change runs once, at its first occurrence.

use std::str::FromStr;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::Value;

use super::store::{CatchUp, Schedule};
use super::{JobSpec, Millis, Queue, QueueError, check_queue_name};
use crate::config::ScheduleConfig;

/// Most missed ticks `catch_up = "all"` fires after a long stop.
const MAX_CATCH_UP: usize = 1000;
/// A tick fired this late still counts as on time (`catch_up = "none"` skips older).
const ON_TIME: Millis = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{0}")]
    Invalid(String),
}

/// A schedule as the API takes it (`POST /v1/schedules`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    pub queue: String,
    pub cron: String,
    #[serde(default = "utc")]
    pub timezone: String,
    /// The job's name; the schedule's when absent.
    pub job: Option<String>,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A parsed cron expression in its time zone.
pub(super) struct Timing {
    cron: croner::Cron,
    zone: Tz,
}

impl Timing {
    pub(super) fn parse(cron: &str, timezone: &str) -> Result<Timing, QueueError> {
        let invalid = |detail: String| QueueError::Invalid {
            code: "bad_schedule",
            detail,
        };
        let cron = crate::config::parse_cron(cron).map_err(|error| {
            invalid(format!(
                "{cron:?}: {error} (six fields, seconds first: \"0 0 2 * * *\")"
            ))
        })?;
        let zone = Tz::from_str(timezone).map_err(|_| {
            invalid(format!(
                "{timezone:?} is not an IANA time zone such as \"UTC\" or \"Europe/Paris\""
            ))
        })?;
        Ok(Timing { cron, zone })
    }

    /// The first tick strictly after `after`.
    pub(super) fn next_after(&self, after: Millis) -> Option<Millis> {
        // Cron ticks are whole seconds, but croner keeps the start's milliseconds in the
        // occurrence it finds: from 10:00:03.500 it would answer 10:00:04.500. Searching
        // strictly after the whole second below `after` gives the same tick on the
        // second boundary.
        let whole_second = after - after % 1000;
        let start = Utc
            .timestamp_millis_opt(i64::try_from(whole_second).ok()?)
            .single()?
            .with_timezone(&self.zone);
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }

    /// Ticks in `(after, until]`, oldest first, at most `limit`.
    pub(super) fn ticks_between(&self, after: Millis, until: Millis, limit: usize) -> Vec<Millis> {
        let mut ticks = Vec::new();
        let mut cursor = after;
        while ticks.len() < limit {
            match self.next_after(cursor) {
                Some(tick) if tick <= until => {
                    ticks.push(tick);
                    cursor = tick;
                }
                _ => break,
            }
        }
        ticks
    }
}

impl Schedule {
    /// When the schedule fires next: its first tick after both `now` and the last tick
    /// it fired. `None` when the cron has no later tick (or no longer parses).
    pub fn next_run(&self, now: Millis) -> Option<Millis> {
        let timing = Timing::parse(&self.cron, &self.timezone).ok()?;
        timing.next_after(now.max(self.last_tick.unwrap_or(0)))
    }
}

impl ScheduleSpec {
    pub fn into_schedule(self, now: Millis, from_config: bool) -> Result<Schedule, QueueError> {
        if self.name.is_empty() || self.name.len() > 128 {
            return Err(QueueError::Invalid {
                code: "bad_schedule",
                detail: "a schedule name is 1 to 128 bytes".to_owned(),
            });
        }
        check_queue_name(&self.queue)?;
        Timing::parse(&self.cron, &self.timezone)?;
        Ok(Schedule {
            job_name: self.job.unwrap_or_else(|| self.name.clone()),
            name: self.name,
            queue: self.queue,
            cron: self.cron,
            timezone: self.timezone,
            payload: self.payload,
            catch_up: self.catch_up,
            // Ticks before a schedule existed never fire; the store keeps the old
            // value when an unchanged schedule is written again.
            last_tick: Some(now),
            from_config,
        })
    }
}

fn spec_from_config(config: &ScheduleConfig) -> Option<ScheduleSpec> {
    Some(ScheduleSpec {
        name: config.name.clone()?,
        queue: config.queue.clone()?,
        cron: config.cron.clone()?,
        timezone: config.timezone.clone(),
        job: config.job.clone(),
        payload: config
            .payload
            .as_ref()
            .and_then(|payload| serde_json::to_value(payload).ok())
            .unwrap_or(Value::Null),
        catch_up: config.catch_up,
    })
}

/// Writes `[[queue.schedules]]` into the store and removes config schedules that are
/// no longer configured. API-made schedules are left alone.
pub(super) async fn sync_config(
    queue: &Queue,
    configured: &[ScheduleConfig],
) -> Result<(), QueueError> {
    let now = queue.now_ms();
    let mut names = std::collections::HashSet::new();
    for config in configured {
        let Some(spec) = spec_from_config(config) else {
            continue;
        };
        names.insert(spec.name.clone());
        queue
            .store()
            .put_schedule(spec.into_schedule(now, true)?)
            .await?;
    }
    for stored in queue.store().schedules().await? {
        if stored.from_config && !names.contains(&stored.name) {
            queue.store().delete_schedule(&stored.name).await?;
        }
    }
    Ok(())
}

impl Queue {
    pub async fn schedules(&self) -> Result<Vec<Schedule>, QueueError> {
        self.store().schedules().await
    }

    pub async fn put_schedule(&self, spec: ScheduleSpec) -> Result<Schedule, QueueError> {
        let schedule = spec.into_schedule(self.now_ms(), false)?;
        self.store().put_schedule(schedule.clone()).await?;
        Ok(schedule)
    }

    pub async fn delete_schedule(&self, name: &str) -> Result<(), QueueError> {
        if self.store().delete_schedule(name).await? {
            Ok(())
        } else {
            Err(QueueError::ScheduleNotFound(name.to_owned()))
        }
    }

    /// Fires every due tick of every schedule by its catch-up rule; returns when the
    /// next tick is due.
    pub async fn fire_due_schedules(&self) -> Result<Option<Millis>, QueueError> {
        let now = self.now_ms();
        let mut next_due: Option<Millis> = None;
        for schedule in self.store().schedules().await? {
            let timing = match Timing::parse(&schedule.cron, &schedule.timezone) {
                Ok(timing) => timing,
                Err(error) => {
                    tracing::error!(schedule = schedule.name, %error, "schedule cannot run");
                    continue;
                }
            };
            let last = schedule.last_tick.unwrap_or(now);
            let due = timing.ticks_between(last, now, MAX_CATCH_UP);
            let mut fired_until = last;
            for (tick, fire) in plan(schedule.catch_up, &due, now) {
                let job = fire.then(|| self.scheduled_job(&schedule)).transpose()?;
                let enqueued = self
                    .store()
                    .fire_schedule(&schedule.name, tick, job)
                    .await?;
                if let Some(enqueued) = enqueued {
                    self.inner
                        .metrics
                        .schedule_fired
                        .with_label_values(&[schedule.name.as_str()])
                        .inc();
                    tracing::info!(
                        schedule = schedule.name,
                        tick,
                        job = enqueued.id,
                        "schedule fired"
                    );
                }
                fired_until = tick;
            }
            if let Some(next) = timing.next_after(fired_until.max(now)) {
                next_due = Some(next_due.map_or(next, |current| current.min(next)));
            }
        }
        Ok(next_due)
    }

    fn scheduled_job(&self, schedule: &Schedule) -> Result<super::NewJob, QueueError> {
        JobSpec {
            name: Some(schedule.job_name.clone()),
            payload: schedule.payload.clone(),
            ..JobSpec::default()
        }
        .validate(&self.inner.settings.limits, self.now_ms())
    }
}

/// Which due ticks fire (`true`) and which are only recorded as passed (`false`).
fn plan(catch_up: CatchUp, due: &[Millis], now: Millis) -> Vec<(Millis, bool)> {
    let Some(&latest) = due.last() else {
        return Vec::new();
    };
    match catch_up {
        CatchUp::All => due.iter().map(|&tick| (tick, true)).collect(),
        CatchUp::One => vec![(latest, true)],
        CatchUp::None => vec![(latest, now.saturating_sub(latest) <= ON_TIME)],
    }
}

/// The scheduler task: fire what is due, sleep until the next tick or a change.
pub(super) async fn run(queue: Queue) {
    let shutdown = queue.inner.shutdown.clone();
    loop {
        let wait = match queue.fire_due_schedules().await {
            Ok(Some(next)) => Duration::from_millis(next.saturating_sub(queue.now_ms())),
            Ok(None) => Duration::from_secs(3600),
            Err(QueueError::Closed) => return,
            Err(error) => {
                tracing::error!(%error, "scheduler pass failed; retrying in 1s");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = queue.inner.wakeups.schedules.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Millis {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis() as u64
    }

    fn utc_of(ms: Millis) -> String {
        Utc.timestamp_millis_opt(ms as i64)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    #[test]
    fn ticks_fall_on_whole_seconds_whatever_the_start() {
        let timing = Timing::parse("* * * * * *", "UTC").unwrap();
        assert_eq!(timing.next_after(1_000_003_500), Some(1_000_004_000));
        assert_eq!(timing.next_after(1_000_003_000), Some(1_000_004_000));
        assert_eq!(timing.next_after(1_000_002_999), Some(1_000_003_000));
        let every_five = Timing::parse("*/5 * * * * *", "UTC").unwrap();
        assert_eq!(every_five.next_after(1_000_000_001), Some(1_000_005_000));
    }

    #[test]
    fn spring_forward_runs_the_missing_time_at_the_end_of_the_gap() {
        // 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST; 02:30 does not exist.
        let timing = Timing::parse("0 30 2 * * *", "Europe/Berlin").unwrap();
        let ticks =
            timing.ticks_between(at("2026-03-27T12:00:00Z"), at("2026-03-31T12:00:00Z"), 10);
        let ticks: Vec<_> = ticks.into_iter().map(utc_of).collect();
        assert_eq!(
            ticks,
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST, the first time after the gap
                "2026-03-30T00:30:00Z", // 02:30 CEST
                "2026-03-31T00:30:00Z",
            ]
        );
    }

    #[test]
    fn fall_back_runs_the_repeated_time_once() {
        // 2026-10-25: Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
        let timing = Timing::parse("0 30 2 * * *", "Europe/Berlin").unwrap();
        let ticks =
            timing.ticks_between(at("2026-10-23T12:00:00Z"), at("2026-10-27T12:00:00Z"), 10);
        let ticks: Vec<_> = ticks.into_iter().map(utc_of).collect();
        assert_eq!(
            ticks,
            [
                "2026-10-24T00:30:00Z", // 02:30 CEST
                "2026-10-25T00:30:00Z", // the first 02:30 (CEST); the second is skipped
                "2026-10-26T01:30:00Z", // 02:30 CET
                "2026-10-27T01:30:00Z",
            ]
        );
    }

    #[test]
    fn catch_up_rules() {
        let due = [1_000, 2_000, 3_000];
        assert_eq!(plan(CatchUp::One, &due, 3_500), [(3_000, true)]);
        assert_eq!(
            plan(CatchUp::All, &due, 3_500),
            [(1_000, true), (2_000, true), (3_000, true)]
        );
        assert_eq!(plan(CatchUp::None, &due, 3_500), [(3_000, true)]);
        assert_eq!(
            plan(CatchUp::None, &due, 3_000 + ON_TIME + 1),
            [(3_000, false)]
        );
        assert!(plan(CatchUp::One, &[], 5).is_empty());
    }

    #[test]
    fn bad_timing_is_refused() {
        assert!(Timing::parse("0 30 2 * *", "UTC").is_err());
        assert!(Timing::parse("0 30 2 * * *", "Mars/Olympus").is_err());
    }
}
