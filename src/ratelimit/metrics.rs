//! Rate-limit metrics (`keel_ratelimit_*`), labelled by limiter name (a route, `api`, a
//! queue): never by client, so series stay bounded by the configuration.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// What every limiter is built with: the metric families, and the shared (Redis)
/// limits when `ratelimit.shared` is set.
#[derive(Clone)]
pub struct RateLimitMetrics {
    pub(super) shared: Option<std::sync::Arc<super::SharedLimits>>,
    keys: IntGaugeVec,
    rejected: IntCounterVec,
    overflow: IntCounterVec,
    bans: IntCounterVec,
}

/// One limiter's children, resolved once: a label lookup costs more than a check.
pub(super) struct LimiterMetrics {
    pub(super) bucket_keys: IntGauge,
    pub(super) penalty_keys: IntGauge,
    pub(super) rejected_limit: IntCounter,
    pub(super) rejected_banned: IntCounter,
    pub(super) bucket_overflow: IntCounter,
    pub(super) penalty_overflow: IntCounter,
    pub(super) bans: IntCounter,
}

impl RateLimitMetrics {
    pub fn new(registry: &Registry) -> RateLimitMetrics {
        let metrics = RateLimitMetrics {
            shared: None,
            keys: IntGaugeVec::new(
                Opts::new(
                    "keel_ratelimit_keys",
                    "Keys a limiter tracks, per table (buckets, penalties).",
                ),
                &["limiter", "table"],
            )
            .expect("valid metric"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "keel_ratelimit_rejected_total",
                    "Requests rejected, by reason: limit (out of quota) or banned (penalty box).",
                ),
                &["limiter", "reason"],
            )
            .expect("valid metric"),
            overflow: IntCounterVec::new(
                Opts::new(
                    "keel_ratelimit_overflow_total",
                    "Keys met while a table was full: buckets share the overflow bucket, \
                     penalties go uncounted.",
                ),
                &["limiter", "table"],
            )
            .expect("valid metric"),
            bans: IntCounterVec::new(
                Opts::new(
                    "keel_ratelimit_bans_total",
                    "Bans the penalty box handed out.",
                ),
                &["limiter"],
            )
            .expect("valid metric"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(metrics.keys.clone()),
            Box::new(metrics.rejected.clone()),
            Box::new(metrics.overflow.clone()),
            Box::new(metrics.bans.clone()),
        ];
        for collector in collectors {
            // A second registration (tests building two sets on one registry) is harmless.
            let _ = registry.register(collector);
        }
        metrics
    }

    /// Limiters built from now on check `shared` first (see [`super::Limiter::check_shared`]).
    pub fn with_shared(mut self, shared: std::sync::Arc<super::SharedLimits>) -> RateLimitMetrics {
        self.shared = Some(shared);
        self
    }

    pub(super) fn for_limiter(&self, name: &str) -> LimiterMetrics {
        LimiterMetrics {
            bucket_keys: self.keys.with_label_values(&[name, "buckets"]),
            penalty_keys: self.keys.with_label_values(&[name, "penalties"]),
            rejected_limit: self.rejected.with_label_values(&[name, "limit"]),
            rejected_banned: self.rejected.with_label_values(&[name, "banned"]),
            bucket_overflow: self.overflow.with_label_values(&[name, "buckets"]),
            penalty_overflow: self.overflow.with_label_values(&[name, "penalties"]),
            bans: self.bans.with_label_values(&[name]),
        }
    }
}
