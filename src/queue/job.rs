//! The job model: what a job is, the states it moves through, and the enqueue options
//! a client may give. Validation lives here so every backend refuses the same input.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::QueueError;

/// Milliseconds since the Unix epoch. Jobs outlive the process, so times are wall-clock.
pub type Millis = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Waiting,
    Delayed,
    Active,
    Completed,
    /// Failed, with attempts left: waits for its backoff to pass, then runs again.
    Failed,
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Waiting,
        JobState::Delayed,
        JobState::Active,
        JobState::Completed,
        JobState::Failed,
        JobState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Delayed => "delayed",
            JobState::Active => "active",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    /// The stable byte stored in index keys.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<JobState> {
        JobState::ALL.get(code as usize).copied()
    }

    /// Completed and dead jobs are finished: only retention or an operator moves them.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Dead)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackoffKind {
    Fixed,
    Exponential,
}

/// How long a failed job waits before its next attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    #[serde(rename = "type")]
    pub kind: BackoffKind,
    /// Milliseconds: the fixed delay, or the first delay that exponential doubles.
    pub delay: Millis,
    pub max_delay: Option<Millis>,
    /// 0.0..=1.0: the share of the delay that is randomised (taken off, never added).
    #[serde(default)]
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            kind: BackoffKind::Exponential,
            delay: 1_000,
            max_delay: Some(3_600_000),
            jitter: 0.0,
        }
    }
}

impl Backoff {
    /// The wait after the `attempts_made`-th failure (1-based). `random` is in [0, 1).
    pub fn delay_after(&self, attempts_made: u32, random: f64) -> Millis {
        let base = match self.kind {
            BackoffKind::Fixed => self.delay,
            BackoffKind::Exponential => {
                let doublings = attempts_made.saturating_sub(1).min(62);
                self.delay.saturating_mul(1u64 << doublings)
            }
        };
        let capped = self.max_delay.map_or(base, |max| base.min(max));
        let taken_off = (capped as f64 * self.jitter.clamp(0.0, 1.0) * random) as u64;
        capped - taken_off.min(capped)
    }
}

/// One job as stored. Serialised as JSON in the embedded store and on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub queue: String,
    pub name: String,
    pub payload: Value,
    pub state: JobState,
    pub priority: i32,
    pub attempts_made: u32,
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// When the job may run (enqueue time unless delayed; the retry time after a failure).
    pub run_at: Millis,
    pub created_at: Millis,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_deadline: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// The lease a reserve gives when it names none; processors stop the job after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Millis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What a client sends to enqueue one job (`POST /v1/queues/{queue}/jobs`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: Option<String>,
    #[serde(default)]
    pub payload: Value,
    pub priority: Option<i32>,
    pub delay: Option<DurationValue>,
    /// Unix milliseconds, or an RFC 3339 timestamp.
    pub run_at: Option<TimeValue>,
    pub attempts: Option<u32>,
    pub backoff: Option<BackoffSpec>,
    pub unique_key: Option<String>,
    pub unique_for: Option<DurationValue>,
    pub timeout: Option<DurationValue>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    #[serde(rename = "type")]
    pub kind: BackoffKind,
    pub delay: Option<DurationValue>,
    pub max_delay: Option<DurationValue>,
    pub jitter: Option<f64>,
}

/// A duration on the wire: `"30s"`, `"1m30s"` or whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DurationValue(pub Duration);

/// Either form a duration or time takes on the wire: a number of milliseconds, or text.
#[derive(Deserialize)]
#[serde(untagged)]
enum MillisOrText {
    Millis(i64),
    Text(String),
}

impl MillisOrText {
    /// The milliseconds, refused when negative (`what` names the value in the error),
    /// or the text for the caller to parse.
    fn read<E: serde::de::Error>(self, what: &str) -> Result<Result<u64, String>, E> {
        match self {
            MillisOrText::Millis(ms) if ms < 0 => {
                Err(E::custom(format!("{what} cannot be negative: {ms}")))
            }
            MillisOrText::Millis(ms) => Ok(Ok(ms as u64)),
            MillisOrText::Text(text) => Ok(Err(text)),
        }
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match MillisOrText::deserialize(deserializer)?.read("a duration")? {
            Ok(ms) => Ok(DurationValue(Duration::from_millis(ms))),
            Err(text) => text
                .parse::<crate::config::Span>()
                .map(|span| DurationValue(span.0))
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A point in time on the wire: Unix milliseconds or RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeValue(pub Millis);

impl<'de> Deserialize<'de> for TimeValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match MillisOrText::deserialize(deserializer)?.read("a time (milliseconds since 1970)")? {
            Ok(ms) => Ok(TimeValue(ms)),
            Err(text) => chrono::DateTime::parse_from_rfc3339(&text)
                .ok()
                .and_then(|time| u64::try_from(time.timestamp_millis()).ok())
                .map(TimeValue)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("not an RFC 3339 time after 1970: {text:?}"))
                }),
        }
    }
}

/// Limits and defaults every enqueue is checked against.
#[derive(Debug, Clone)]
pub struct JobLimits {
    pub max_payload_bytes: usize,
    pub max_name_bytes: usize,
    pub max_attempts: u32,
    pub default_attempts: u32,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_payload_bytes: 1 << 20,
            max_name_bytes: 256,
            max_attempts: 1000,
            default_attempts: 3,
        }
    }
}

/// A validated job, ready for a store to give an id and insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    pub payload: Value,
    pub priority: i32,
    pub run_at: Millis,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub unique_key: Option<String>,
    /// Until when a duplicate enqueue returns this job; `None`: while it is unfinished.
    pub unique_until: Option<Millis>,
    pub timeout: Option<Millis>,
}

const MAX_UNIQUE_KEY_BYTES: usize = 1024;

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl JobSpec {
    /// Checks every field and resolves times against `now`.
    pub fn validate(self, limits: &JobLimits, now: Millis) -> Result<NewJob, QueueError> {
        let invalid = |code: &'static str, detail: String| QueueError::Invalid { code, detail };
        let name = self.name.unwrap_or_else(|| "job".to_owned());
        if name.is_empty() || name.len() > limits.max_name_bytes {
            return Err(invalid(
                "bad_job_name",
                format!("a job name is 1 to {} bytes", limits.max_name_bytes),
            ));
        }
        let payload_bytes = serde_json::to_vec(&self.payload).map_or(usize::MAX, |v| v.len());
        if payload_bytes > limits.max_payload_bytes {
            return Err(QueueError::PayloadTooLarge {
                size: payload_bytes,
                limit: limits.max_payload_bytes,
            });
        }
        let run_at = match (self.delay, self.run_at) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "bad_schedule",
                    "give either delay or run_at, not both".to_owned(),
                ));
            }
            (Some(delay), None) => now.saturating_add(millis(delay.0)),
            (None, Some(at)) => at.0,
            (None, None) => now,
        };
        let max_attempts = self.attempts.unwrap_or(limits.default_attempts);
        if max_attempts == 0 || max_attempts > limits.max_attempts {
            return Err(invalid(
                "bad_attempts",
                format!("attempts is 1 to {}", limits.max_attempts),
            ));
        }
        let backoff = match self.backoff {
            None => Backoff::default(),
            Some(spec) => {
                let jitter = spec.jitter.unwrap_or(0.0);
                if !(0.0..=1.0).contains(&jitter) {
                    return Err(invalid(
                        "bad_backoff",
                        format!("backoff.jitter is between 0 and 1, not {jitter}"),
                    ));
                }
                Backoff {
                    kind: spec.kind,
                    delay: spec.delay.map_or(1_000, |d| millis(d.0)),
                    max_delay: spec.max_delay.map(|d| millis(d.0)),
                    jitter,
                }
            }
        };
        if let Some(key) = &self.unique_key
            && (key.is_empty() || key.len() > MAX_UNIQUE_KEY_BYTES)
        {
            return Err(invalid(
                "bad_unique_key",
                format!("a unique_key is 1 to {MAX_UNIQUE_KEY_BYTES} bytes"),
            ));
        }
        if self.unique_for.is_some() && self.unique_key.is_none() {
            return Err(invalid(
                "bad_unique_key",
                "unique_for needs a unique_key".to_owned(),
            ));
        }
        let timeout = self.timeout.map(|d| millis(d.0));
        if timeout == Some(0) {
            return Err(invalid(
                "bad_timeout",
                "timeout must be longer than 0".to_owned(),
            ));
        }
        Ok(NewJob {
            name,
            payload: self.payload,
            priority: self.priority.unwrap_or(0),
            run_at,
            max_attempts,
            backoff,
            unique_until: self
                .unique_for
                .map(|span| now.saturating_add(millis(span.0))),
            unique_key: self.unique_key,
            timeout,
        })
    }
}

impl NewJob {
    pub fn into_job(self, id: u64, queue: &str, now: Millis) -> Job {
        Job {
            id,
            queue: queue.to_owned(),
            name: self.name,
            payload: self.payload,
            state: if self.run_at > now {
                JobState::Delayed
            } else {
                JobState::Waiting
            },
            priority: self.priority,
            attempts_made: 0,
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            run_at: self.run_at.max(now),
            created_at: now,
            started_at: None,
            finished_at: None,
            lease_token: None,
            lease_deadline: None,
            unique_key: self.unique_key,
            timeout: self.timeout,
            progress: None,
            result: None,
            last_error: None,
        }
    }
}

/// Queue names as the configuration and the API accept them: `[A-Za-z0-9_.:-]{1,128}`.
pub fn check_queue_name(name: &str) -> Result<(), QueueError> {
    if crate::config::valid_queue_name(name) {
        Ok(())
    } else {
        Err(QueueError::Invalid {
            code: "bad_queue_name",
            detail: format!(
                "{:?} is not a queue name: 1 to 128 of A-Z a-z 0-9 _ . : -",
                name.chars().take(140).collect::<String>()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_backoff_doubles_and_caps() {
        let backoff = Backoff {
            kind: BackoffKind::Exponential,
            delay: 1_000,
            max_delay: Some(5_000),
            jitter: 0.0,
        };
        let delays: Vec<_> = (1..=5).map(|n| backoff.delay_after(n, 0.5)).collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(backoff.delay_after(u32::MAX, 0.0), 5_000);
    }

    #[test]
    fn jitter_only_shortens() {
        let backoff = Backoff {
            kind: BackoffKind::Fixed,
            delay: 1_000,
            max_delay: None,
            jitter: 0.5,
        };
        assert_eq!(backoff.delay_after(3, 0.0), 1_000);
        assert_eq!(backoff.delay_after(3, 0.5), 750);
    }

    #[test]
    fn state_codes_round_trip() {
        for state in JobState::ALL {
            assert_eq!(JobState::from_code(state.code()), Some(state));
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
    }

    #[test]
    fn durations_refuse_negatives_and_read_units() {
        let parse = |text: &str| serde_json::from_str::<DurationValue>(text);
        assert!(parse("-5").is_err());
        assert_eq!(parse("1500").unwrap().0, Duration::from_millis(1500));
        assert_eq!(parse("\"2s\"").unwrap().0, Duration::from_secs(2));
        assert!(parse("\"soon\"").is_err());
    }
}
