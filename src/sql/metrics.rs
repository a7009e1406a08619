//! SQL metrics (`keel_sql_*`): statements by kind, errors by kind, the reader pool,
//! the writer queue, slow queries and the named-query cache.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct SqlMetrics {
    pub statements: IntCounterVec,
    pub statement_seconds: HistogramVec,
    pub errors: IntCounterVec,
    pub readers_in_use: IntGauge,
    pub readers_idle: IntGauge,
    pub reader_wait_seconds: Histogram,
    pub writer_queue: IntGauge,
    pub slow_queries: IntCounter,
    pub named_cache: IntCounterVec,
    /// The two children of `named_cache`, resolved once for the hot path.
    pub named_cache_hits: IntCounter,
    pub named_cache_misses: IntCounter,
}

const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl SqlMetrics {
    pub fn new(registry: &Registry) -> SqlMetrics {
        let named_cache = IntCounterVec::new(
            Opts::new(
                "keel_sql_named_cache_total",
                "Cached named-query lookups, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let metrics = SqlMetrics {
            named_cache_hits: named_cache.with_label_values(&["hit"]),
            named_cache_misses: named_cache.with_label_values(&["miss"]),
            statements: IntCounterVec::new(
                Opts::new(
                    "keel_sql_statements_total",
                    "Statements run, by kind (read, write, batch).",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            statement_seconds: HistogramVec::new(
                HistogramOpts::new("keel_sql_statement_seconds", "Statement time, by kind.")
                    .buckets(BUCKETS.to_vec()),
                &["kind"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new("keel_sql_errors_total", "Failed statements, by error kind."),
                &["code"],
            )
            .expect("valid metric"),
            readers_in_use: IntGauge::new(
                "keel_sql_readers_in_use",
                "Reader connections running a statement.",
            )
            .expect("valid metric"),
            readers_idle: IntGauge::new(
                "keel_sql_readers_idle",
                "Reader connections waiting for work.",
            )
            .expect("valid metric"),
            reader_wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keel_sql_reader_wait_seconds",
                    "Time a read waited for a reader connection.",
                )
                .buckets(BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            writer_queue: IntGauge::new(
                "keel_sql_writer_queue",
                "Writes waiting for the writer connection.",
            )
            .expect("valid metric"),
            slow_queries: IntCounter::new(
                "keel_sql_slow_queries_total",
                "Statements slower than sql.slow_query_ms.",
            )
            .expect("valid metric"),
            named_cache,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 9] = [
            Box::new(metrics.statements.clone()),
            Box::new(metrics.statement_seconds.clone()),
            Box::new(metrics.errors.clone()),
            Box::new(metrics.readers_in_use.clone()),
            Box::new(metrics.readers_idle.clone()),
            Box::new(metrics.reader_wait_seconds.clone()),
            Box::new(metrics.writer_queue.clone()),
            Box::new(metrics.slow_queries.clone()),
            Box::new(metrics.named_cache.clone()),
        ];
        for collector in collectors {
            let _ = registry.register(collector);
        }
        metrics
    }
}
