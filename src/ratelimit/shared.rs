//! Limits shared by every node (`ratelimit.shared = "redis://..."`): the same GCRA as
//! the local limiter, its state (one theoretical arrival time per key) kept in Redis
//! and updated by one Lua script, so N nodes enforce one limit. The script reads
//! Redis's own clock (`TIME`), so the nodes' clocks do not have to agree.
//!
//! When Redis cannot answer (an error, or its circuit is open) the caller falls back to
//! its local limiter: a Redis outage must never block all traffic. Each node then
//! enforces the limit on its own, so N nodes admit up to N times the limit until Redis
//! returns. `keel_ratelimit_shared_fallbacks_total` counts those checks, and a warning
//! is logged at most every `LOG_EVERY`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, Registry};

use super::Key;
use crate::observe::Dependency;
use crate::redis_client::{RedisCallError, RedisClient};

const LOG_EVERY: Duration = Duration::from_secs(10);

/// GCRA on Redis. KEYS[1]: the key's TAT (µs since the epoch, Redis clock).
/// ARGV[1]: the emission interval T in µs; ARGV[2]: the limit (burst). A request is
/// admitted while `now >= tat - tau`, `tau = T * (limit - 1)`; admitting moves the TAT
/// by T and keeps it only as long as it matters. Returns `{admitted, tat - now}`.
const GCRA: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tau = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if now < tat - tau then
  return {0, tat - now}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
return {1, tat - now}
"#;

pub struct SharedLimits {
    redis: Arc<RedisClient>,
    prefix: String,
    script: redis::Script,
    fallbacks: IntCounter,
    /// Milliseconds since `started` of the last fallback warning (0: none yet).
    last_warning: AtomicU64,
    started: Instant,
}

impl SharedLimits {
    pub fn new(
        url: &str,
        prefix: &str,
        dependency: Dependency,
        registry: &Registry,
    ) -> Result<SharedLimits, RedisCallError> {
        let fallbacks = IntCounter::new(
            "keel_ratelimit_shared_fallbacks_total",
            "Shared rate-limit checks answered by the local limiter because Redis could not.",
        )
        .expect("valid metric");
        // Only tests register twice; the first one keeps the series.
        let _ = registry.register(Box::new(fallbacks.clone()));
        Ok(SharedLimits {
            redis: Arc::new(RedisClient::new(url, dependency)?),
            prefix: prefix.to_owned(),
            script: redis::Script::new(GCRA),
            fallbacks,
            last_warning: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    pub fn redis(&self) -> &Arc<RedisClient> {
        &self.redis
    }

    /// One admission check of `key` under `limiter`: whether it was admitted and the
    /// key's TAT relative to now, in nanoseconds.
    pub(super) async fn check(
        &self,
        limiter: &str,
        key: &Key,
        interval_ns: u64,
        limit: u32,
    ) -> Result<(bool, u64), RedisCallError> {
        let name = format!("{}{limiter}:{}", self.prefix, key.stable_id());
        let mut connection = self.redis.connection().await?;
        let (admitted, tat_us): (i64, i64) = self.redis.record(
            self.script
                .key(name)
                .arg((interval_ns / 1000).max(1))
                .arg(limit)
                .invoke_async(&mut connection)
                .await,
        )?;
        Ok((admitted == 1, (tat_us.max(0) as u64) * 1000))
    }

    /// Counts a fallback to the local limiter and warns, at most every `LOG_EVERY`.
    pub(super) fn fell_back(&self, limiter: &str, error: &RedisCallError) {
        self.fallbacks.inc();
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_warning.load(Ordering::Relaxed);
        if (last == 0 || now - last >= LOG_EVERY.as_millis() as u64)
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                limiter,
                %error,
                "shared rate limit unavailable; enforcing it on this node only"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::conformance::{Cleanup, redis_url, unique_prefix};
    use crate::config::Rate;
    use crate::observe::{BuildInfo, Metrics, Readiness};
    use crate::ratelimit::{KeyKind, Limiter, LimiterConfig, RateLimitMetrics};

    fn node(url: &str, prefix: &str) -> (Limiter, Arc<SharedLimits>) {
        let metrics = Metrics::new(BuildInfo::CURRENT);
        let dependency = Dependency::new("redis", true, &metrics, &Readiness::default());
        let shared =
            Arc::new(SharedLimits::new(url, prefix, dependency, metrics.registry()).unwrap());
        let context = RateLimitMetrics::new(metrics.registry()).with_shared(shared.clone());
        // 20 per hour: nothing refills during the test, so the count is exact.
        let rate = Rate {
            count: 20,
            per: Duration::from_secs(3600),
        };
        let limiter = Limiter::new(
            "shared_test",
            &LimiterConfig::new(KeyKind::Global, rate),
            &context,
        )
        .unwrap();
        (limiter, shared)
    }

    /// Two nodes on one prefix admit the limit between them, not each.
    #[tokio::test]
    async fn two_nodes_share_one_limit() {
        let Some(url) = redis_url() else { return };
        let prefix = unique_prefix();
        let _cleanup = Cleanup(url.clone(), prefix.clone());
        let (a, _) = node(&url, &prefix);
        let (b, shared) = node(&url, &prefix);
        let mut admitted = 0;
        for round in 0..30 {
            let limiter = if round % 2 == 0 { &a } else { &b };
            for _ in 0..2 {
                if limiter.check_shared(Key::GLOBAL).await.is_allowed() {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, 20);
        let refused = b.check_shared(Key::GLOBAL).await;
        assert!(!refused.is_allowed());
        assert!(
            refused
                .retry_after
                .is_some_and(|wait| wait > Duration::from_secs(60))
        );
        assert_eq!(shared.fallbacks.get(), 0);
        let _: i64 = shared
            .redis
            .query(redis::cmd("DEL").arg(format!("{prefix}shared_test:g")))
            .await
            .unwrap();
    }

    /// With Redis unreachable the local limiter decides: traffic is never blocked
    /// wholesale, and the fallback is counted.
    #[tokio::test]
    async fn unreachable_redis_falls_back_to_the_local_limit() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let (limiter, shared) = node("redis://127.0.0.1:1/0", &unique_prefix());
        let mut admitted = 0;
        for _ in 0..25 {
            if limiter.check_shared(Key::GLOBAL).await.is_allowed() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 20);
        assert_eq!(shared.fallbacks.get(), 25);
    }
}
