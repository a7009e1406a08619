//! Rate limiting for the gateway's routes, the api listener and queues: keyed GCRA
//! limiters (governor) with a hard cap on tracked keys, a penalty box for keys that keep
//! exceeding, a login mode that counts only failures, and the IETF `RateLimit` header
//! fields.
//!
//! Not here: choosing the client address (the gateway applies its trusted proxies and
//! passes an `IpAddr`), answering HTTP (callers get a [`Decision`] and write its header
//! fields into their response). Limits shared between nodes through Redis
//! (`ratelimit.shared`) are in `shared.rs`; [`Limiter::check_shared`] uses them and
//! falls back to the local limiter when Redis cannot answer.
//!
//! How a caller uses a [`Limiter`]:
//! - Ordinary limit: `limiter.check(key)` before serving. Not allowed: answer 429 and
//!   serve nothing. Either way, [`Limiter::write_headers`] puts `RateLimit-Policy`,
//!   `RateLimit` and, on a rejection, `Retry-After` on the response.
//! - Login mode, where only failed attempts count (a login route should not lock out a
//!   user who logs in often): [`Limiter::peek`] before forwarding, which rejects a key
//!   that has no capacity left or is banned without using any. When the upstream answers
//!   with a status of 400 or more, [`Limiter::record_failure`] uses one unit, and its
//!   decision is the one whose header fields go on that response; on success the
//!   peek's decision goes on it. Concurrent attempts that all passed the peek can take
//!   a key past its limit by their number; the next peek rejects it.
//!
//! Memory is bounded per limiter: at most `max_keys` buckets and `max_keys` penalty
//! records. [`Limiter::sweep`] (the app calls [`RateLimits::sweep_all`] on a timer)
//! drops buckets that refilled and penalty records with nothing left to remember. When
//! the table is full and a new key arrives, the limiter sweeps first (at most once a
//! second); if it is still full, the new key shares one overflow bucket with every
//! other key that did not fit, so a flood of fresh addresses degrades into one shared
//! limit instead of growing memory.

mod key;
mod metrics;
mod penalty;
mod registry;
mod shared;
mod store;
mod table;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::{Quota, RateLimiter};
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};

use crate::config::{Rate, RouteRateLimitConfig};

pub use key::{Key, KeyKind, KeyKindError};
pub use metrics::RateLimitMetrics;
pub use penalty::PenaltyPolicy;
pub use registry::RateLimits;
pub use shared::SharedLimits;

use metrics::LimiterMetrics;
use penalty::PenaltyBox;
use store::{BoundedStore, Buckets, Probe};

/// Buckets (and penalty records) one limiter tracks unless configured otherwise: a few
/// MiB of buckets (about 50 bytes a key, measured at a million keys).
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// A full table sweeps on a new key at most this often. Under a flood of new keys that
/// all stay busy, a sweep per request would cost O(max_keys) each and free nothing.
const FORCED_SWEEP_GAP: u64 = 1_000_000_000;

/// The longest time a full bucket may take to refill. GCRA works in u64 nanoseconds
/// (584 years); this keeps every sum of two windows far from overflowing.
const MAX_WINDOW: Duration = Duration::from_secs(10 * 365 * 86_400);

const NEVER: u64 = u64::MAX;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimiterError {
    #[error(transparent)]
    Key(#[from] KeyKindError),
    #[error("a rate must allow at least one request")]
    ZeroRate,
    #[error("rate {count}/{per:?} is faster than one request per nanosecond")]
    RateTooFast { count: u32, per: Duration },
    #[error("burst must be at least 1")]
    ZeroBurst,
    #[error("a burst of {burst} takes longer than ten years to refill at this rate")]
    WindowTooLong { burst: u32 },
    #[error("max_keys must be at least 1")]
    ZeroMaxKeys,
    #[error("penalty: {0}")]
    Penalty(&'static str),
}

/// What one limiter enforces. `rate` is the sustained rate; `burst` how many requests a
/// key may make at once after being idle (the rate's count when absent, so `100/s`
/// admits 100 at once and then one every 10 ms).
#[derive(Debug, Clone)]
pub struct LimiterConfig {
    pub key: KeyKind,
    pub rate: Rate,
    pub burst: Option<u32>,
    pub max_keys: usize,
    pub penalty: Option<PenaltyPolicy>,
}

impl LimiterConfig {
    pub fn new(key: KeyKind, rate: Rate) -> LimiterConfig {
        LimiterConfig {
            key,
            rate,
            burst: None,
            max_keys: DEFAULT_MAX_KEYS,
            penalty: None,
        }
    }

    /// A route's `rate_limit = { key, rate, burst }`.
    pub fn from_route(config: &RouteRateLimitConfig) -> Result<LimiterConfig, LimiterError> {
        let base = LimiterConfig::new(config.key.parse()?, config.rate);
        Ok(LimiterConfig {
            burst: config.burst,
            max_keys: config.max_keys.unwrap_or(base.max_keys),
            penalty: config.penalty.as_ref().map(|penalty| PenaltyPolicy {
                after: penalty.after,
                within: penalty.within.0,
                ban: penalty.ban.0,
                max_ban: penalty.max_ban.0,
            }),
            ..base
        })
    }
}

/// Whether a request may go ahead, and the numbers its response's header fields carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The quota: requests a full bucket admits at once (the burst).
    pub limit: u32,
    /// Requests the key may still make right now.
    pub remaining: u32,
    /// With quota remaining: until the bucket is full again. With none: until the next
    /// request will be admitted (for a ban, until it ends).
    pub reset: Duration,
    /// On a rejection, how long until a retry can succeed.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// Out of quota.
    Limited,
    /// In the penalty box.
    Banned,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }
}

/// One named, keyed limit. `C` is governor's clock; tests pass a `FakeRelativeClock`.
pub struct Limiter<C: Clock = DefaultClock> {
    name: Arc<str>,
    key_kind: KeyKind,
    gcra: RateLimiter<Probe, BoundedStore, C, NoOpMiddleware<C::Instant>>,
    /// The same buckets governor holds, for the counts and the full-table check.
    buckets: Arc<Buckets>,
    /// Read just before governor reads its own, so times measured from here run ahead of
    /// governor's by the nanoseconds between two clock reads.
    start: C::Instant,
    limit: u32,
    /// Nanoseconds per unit of quota (GCRA's emission interval, T).
    interval: u64,
    /// The policy's name as a structured-field string, quotes and escapes included.
    sf_name: Box<str>,
    /// `RateLimit-Policy` never changes for a limiter, so it is rendered once.
    policy: HeaderValue,
    penalty: Option<PenaltyBox>,
    /// Set with `ratelimit.shared`: `check_shared` asks Redis first.
    shared: Option<Arc<SharedLimits>>,
    /// Nanoseconds since start of the last sweep a full table forced; [`NEVER`] before.
    last_forced_sweep: AtomicU64,
    metrics: LimiterMetrics,
}

impl Limiter {
    pub fn new(
        name: &str,
        config: &LimiterConfig,
        metrics: &RateLimitMetrics,
    ) -> Result<Limiter, LimiterError> {
        Limiter::with_clock(name, config, metrics, DefaultClock::default())
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(
        name: &str,
        config: &LimiterConfig,
        metrics: &RateLimitMetrics,
        clock: C,
    ) -> Result<Limiter<C>, LimiterError> {
        let rate = config.rate;
        if rate.count == 0 {
            return Err(LimiterError::ZeroRate);
        }
        let interval = rate.per / rate.count;
        let quota = Quota::with_period(interval).ok_or(LimiterError::RateTooFast {
            count: rate.count,
            per: rate.per,
        })?;
        let limit = config.burst.unwrap_or(rate.count);
        let burst = std::num::NonZeroU32::new(limit).ok_or(LimiterError::ZeroBurst)?;
        let window = interval
            .checked_mul(limit)
            .filter(|window| *window <= MAX_WINDOW)
            .ok_or(LimiterError::WindowTooLong { burst: limit })?;
        if config.max_keys == 0 {
            return Err(LimiterError::ZeroMaxKeys);
        }
        if let Some(policy) = &config.penalty {
            check_penalty(policy)?;
        }

        let metrics_context = metrics;
        let metrics = metrics.for_limiter(name);
        let buckets = Arc::new(Buckets::new(
            config.max_keys,
            metrics.bucket_keys.clone(),
            metrics.bucket_overflow.clone(),
        ));
        let penalty = config.penalty.map(|policy| {
            PenaltyBox::new(
                &policy,
                config.max_keys,
                metrics.penalty_keys.clone(),
                metrics.penalty_overflow.clone(),
                metrics.bans.clone(),
            )
        });
        let sf_name = sf_string(name);
        let policy = header_value(format!(
            "{sf_name};q={limit};w={}",
            whole_seconds(window).max(1)
        ));
        let start = clock.now();
        let gcra = RateLimiter::new(
            quota.allow_burst(burst),
            BoundedStore(buckets.clone()),
            clock,
        );
        Ok(Limiter {
            name: name.into(),
            key_kind: config.key.clone(),
            gcra,
            buckets,
            start,
            limit,
            interval: nanos(interval),
            sf_name: sf_name.into(),
            policy,
            penalty,
            shared: metrics_context.shared.clone(),
            last_forced_sweep: AtomicU64::new(NEVER),
            metrics,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests this limiter (by name, so across reloads) has rejected since start:
    /// out of quota or banned.
    pub fn rejected(&self) -> u64 {
        self.metrics.rejected_limit.get() + self.metrics.rejected_banned.get()
    }

    /// The key this limiter counts the request against (see [`KeyKind::key_for`]).
    pub fn key_for(&self, client: std::net::IpAddr, headers: &HeaderMap, route: &str) -> Key {
        self.key_kind.key_for(client, headers, route)
    }

    /// Uses one unit of the key's quota if it has one.
    pub fn check(&self, key: Key) -> Decision {
        self.decide(key, true)
    }

    /// Like [`Limiter::check`], but against the limit all nodes share when
    /// `ratelimit.shared` is set: one atomic script in Redis. If Redis cannot answer,
    /// the local limiter decides (never fail closed), counted and logged. The penalty
    /// box stays per node.
    pub async fn check_shared(&self, key: Key) -> Decision {
        let Some(shared) = &self.shared else {
            return self.check(key);
        };
        if let Some(penalty) = &self.penalty
            && let Some(left) = penalty.ban_left(&key, self.now())
        {
            self.metrics.rejected_banned.inc();
            return self.banned(left);
        }
        match shared
            .check(&self.name, &key, self.interval, self.limit)
            .await
        {
            Ok((true, tat)) => self.decision_at(Outcome::Allowed, tat, 0),
            Ok((false, tat)) => {
                self.metrics.rejected_limit.inc();
                if let Some(penalty) = &self.penalty
                    && let Some(ban) = penalty.strike(&key, self.now())
                {
                    return self.banned(ban);
                }
                self.decision_at(Outcome::Limited, tat, 0)
            }
            Err(error) => {
                shared.fell_back(&self.name, &error);
                self.check(key)
            }
        }
    }

    /// Login mode, before the request: rejects a key that has no capacity left or is
    /// banned, and uses nothing.
    pub fn peek(&self, key: Key) -> Decision {
        self.decide(key, false)
    }

    /// Login mode, after a response with a status of 400 or more: uses one unit.
    pub fn record_failure(&self, key: Key) -> Decision {
        self.decide(key, true)
    }

    /// Drops buckets that have refilled (they are indistinguishable from new ones) and
    /// penalty records with nothing left to remember, and gives memory back from tables
    /// that emptied. Holds one shard's lock at a time.
    pub fn sweep(&self) {
        self.gcra.retain_recent();
        self.gcra.shrink_to_fit();
        if let Some(penalty) = &self.penalty {
            penalty.sweep(self.now());
        }
    }

    /// Writes `RateLimit-Policy`, `RateLimit` and, for a rejection, `Retry-After`,
    /// following draft-ietf-httpapi-ratelimit-headers-10 (September 2025):
    /// `RateLimit-Policy: "NAME";q=LIMIT;w=WINDOW` and `RateLimit: "NAME";r=REMAINING;t=RESET`.
    ///
    /// `w` is the seconds a bucket takes to refill from empty, so `q` per `w` is the
    /// sustained rate; a GCRA bucket also admits its burst at once, which a window
    /// cannot say exactly. `t` is [`Decision::reset`]: draft-10 defines it as the seconds
    /// until more quota is made available, which for a bucket that is out is the next
    /// request's time, and for one that is not, the time it is full again. Seconds round
    /// up, so a client that waits `t` or `Retry-After` never comes back too early.
    ///
    /// The two list fields are appended, not replaced, so every limiter a request passed
    /// shows up in them; `Retry-After` keeps the longest wait of those that set one.
    pub fn write_headers(&self, decision: &Decision, headers: &mut HeaderMap) {
        headers.append(RATELIMIT_POLICY, self.policy.clone());
        headers.append(
            RATELIMIT,
            header_value(format!(
                "{};r={};t={}",
                self.sf_name,
                decision.remaining,
                whole_seconds(decision.reset)
            )),
        );
        if let Some(wait) = decision.retry_after {
            let seconds = whole_seconds(wait).max(1);
            let longer = headers
                .get(RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
                .is_none_or(|existing| seconds > existing);
            if longer {
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
            }
        }
    }

    fn now(&self) -> u64 {
        self.gcra.clock().now().duration_since(self.start).as_u64()
    }

    fn decide(&self, key: Key, consume: bool) -> Decision {
        let now = self.now();
        if let Some(penalty) = &self.penalty
            && let Some(left) = penalty.ban_left(&key, now)
        {
            self.metrics.rejected_banned.inc();
            return self.banned(left);
        }
        if self.buckets.table.is_full() && !self.buckets.table.shard(&key).contains_key(&key) {
            self.sweep_if_due(now);
        }
        let probe = Probe::new(key, consume);
        let admitted = self.gcra.check_key(&probe).is_ok();
        let tat = probe.tat.get();
        if admitted {
            return self.decision_at(Outcome::Allowed, tat, now);
        }
        self.metrics.rejected_limit.inc();
        if let Some(penalty) = &self.penalty {
            if penalty.is_full() {
                self.sweep_if_due(now);
            }
            if let Some(ban) = penalty.strike(&key, now) {
                return self.banned(ban);
            }
        }
        self.decision_at(Outcome::Limited, tat, now)
    }

    /// The numbers of a decision from the key's theoretical arrival time (TAT) after it.
    /// A bucket admits a request while `now >= tat - tau`, with `tau = T * (limit - 1)`;
    /// it holds `(now + tau + T - tat) / T` units and is full once `tat <= now`.
    fn decision_at(&self, outcome: Outcome, tat: u64, now: u64) -> Decision {
        let interval = self.interval;
        let tau = interval * u64::from(self.limit - 1);
        let remaining = ((now + tau + interval).saturating_sub(tat) / interval)
            .min(u64::from(self.limit)) as u32;
        let reset = if remaining == 0 {
            tat.saturating_sub(tau).saturating_sub(now)
        } else {
            tat.saturating_sub(now)
        };
        Decision {
            outcome,
            limit: self.limit,
            remaining,
            reset: Duration::from_nanos(reset),
            retry_after: (outcome != Outcome::Allowed).then(|| Duration::from_nanos(reset)),
        }
    }

    fn banned(&self, left: u64) -> Decision {
        let left = Duration::from_nanos(left);
        Decision {
            outcome: Outcome::Banned,
            limit: self.limit,
            remaining: 0,
            reset: left,
            retry_after: Some(left),
        }
    }

    fn sweep_if_due(&self, now: u64) {
        let last = self.last_forced_sweep.load(Ordering::Acquire);
        if last != NEVER && now.saturating_sub(last) < FORCED_SWEEP_GAP {
            return;
        }
        // One of the requests that find the table full sweeps; the others carry on.
        if self
            .last_forced_sweep
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.sweep();
        }
    }
}

fn check_penalty(policy: &PenaltyPolicy) -> Result<(), LimiterError> {
    if policy.after == 0 {
        return Err(LimiterError::Penalty("after must be at least 1"));
    }
    if policy.within.is_zero() || policy.ban.is_zero() {
        return Err(LimiterError::Penalty(
            "within and ban must be longer than 0",
        ));
    }
    if policy.max_ban < policy.ban {
        return Err(LimiterError::Penalty("max_ban must be at least ban"));
    }
    if policy.max_ban > MAX_WINDOW || policy.within > MAX_WINDOW {
        return Err(LimiterError::Penalty(
            "max_ban and within must be at most ten years",
        ));
    }
    Ok(())
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// A structured-field String (RFC 9651 §3.3.3): printable ASCII in quotes, with `"` and
/// `\` escaped. Anything else in a limiter's name becomes `?`, since a String cannot
/// carry it.
fn sf_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            ' '..='~' => quoted.push(c),
            _ => quoted.push('?'),
        }
    }
    quoted.push('"');
    quoted
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("rate-limit fields are printable ASCII")
}

/// The limiters' time unit; durations beyond 584 years saturate.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Whole seconds, rounded up.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}
