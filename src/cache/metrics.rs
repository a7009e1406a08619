//! Cache metrics (`keel_cache_*`): per-layer hits, misses, bytes, entries and evictions,
//! loader calls and latency, coalesced waiters, invalidation time.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: IntCounterVec,
    pub misses: IntCounterVec,
    pub evictions: IntCounter,
    pub bytes: IntGaugeVec,
    pub entries: IntGaugeVec,
    pub loader_calls: IntCounterVec,
    pub loader_seconds: Histogram,
    pub coalesced_waiters: IntCounter,
    pub invalidation_seconds: Histogram,
    pub l2_queue_ops: IntGauge,
    pub l2_errors: IntCounter,
    /// L2 commits that reached the disk (fsync); the ones between are only ordered.
    pub l2_durable_commits: IntCounter,
    /// Invalidations other nodes published (shared L2) that this node applied to L1.
    pub remote_invalidations: IntCounter,
    /// The per-layer children, resolved once: label lookups cost more than the read.
    pub l1_hits: IntCounter,
    pub l1_misses: IntCounter,
    pub l2_hits: IntCounter,
    pub l2_misses: IntCounter,
}

impl CacheMetrics {
    pub fn new(registry: &Registry) -> CacheMetrics {
        let layer = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["layer"]).expect("valid metric")
        };
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["layer"]).expect("valid metric")
        };
        let hits = layer("keel_cache_hits_total", "Reads answered by a layer.");
        let misses = layer("keel_cache_misses_total", "Reads a layer could not answer.");
        let metrics = CacheMetrics {
            l1_hits: hits.with_label_values(&["l1"]),
            l1_misses: misses.with_label_values(&["l1"]),
            l2_hits: hits.with_label_values(&["l2"]),
            l2_misses: misses.with_label_values(&["l2"]),
            hits,
            misses,
            evictions: IntCounter::new(
                "keel_cache_l1_evictions_total",
                "Entries L1 evicted to stay within l1_max_bytes.",
            )
            .expect("valid metric"),
            bytes: gauge(
                "keel_cache_bytes",
                "Bytes held by a layer (L1: weighted size).",
            ),
            entries: gauge("keel_cache_entries", "Entries held by a layer."),
            loader_calls: IntCounterVec::new(
                Opts::new(
                    "keel_cache_loader_calls_total",
                    "Loader calls by namespace and outcome.",
                ),
                &["namespace", "outcome"],
            )
            .expect("valid metric"),
            loader_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keel_cache_loader_duration_seconds",
                    "Time a loader call took.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ]),
            )
            .expect("valid metric"),
            coalesced_waiters: IntCounter::new(
                "keel_cache_coalesced_waiters_total",
                "Misses that waited for a load already in flight instead of calling the loader.",
            )
            .expect("valid metric"),
            invalidation_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keel_cache_invalidation_duration_seconds",
                    "Time to invalidate by pattern or tag.",
                )
                .buckets(vec![0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric"),
            l2_queue_ops: IntGauge::new(
                "keel_cache_l2_queue_ops",
                "Writes waiting for the L2 writer.",
            )
            .expect("valid metric"),
            l2_errors: IntCounter::new("keel_cache_l2_errors_total", "L2 operations that failed.")
                .expect("valid metric"),
            l2_durable_commits: IntCounter::new(
                "keel_cache_l2_durable_commits_total",
                "L2 commits flushed to disk; cache writes older than the last one survive a power cut.",
            )
            .expect("valid metric"),
            remote_invalidations: IntCounter::new(
                "keel_cache_remote_invalidations_total",
                "Invalidations received from other nodes over the shared L2 and applied to L1.",
            )
            .expect("valid metric"),
        };
        for collector in [
            Box::new(metrics.hits.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.misses.clone()),
            Box::new(metrics.evictions.clone()),
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.entries.clone()),
            Box::new(metrics.loader_calls.clone()),
            Box::new(metrics.loader_seconds.clone()),
            Box::new(metrics.coalesced_waiters.clone()),
            Box::new(metrics.invalidation_seconds.clone()),
            Box::new(metrics.l2_queue_ops.clone()),
            Box::new(metrics.l2_errors.clone()),
            Box::new(metrics.l2_durable_commits.clone()),
            Box::new(metrics.remote_invalidations.clone()),
        ] {
            // Only tests build two caches on one registry; the first one keeps its series.
            let _ = registry.register(collector);
        }
        metrics
    }
}
