//! Queue metrics (`keel_queue_*`): per-queue counters of what happened to jobs, depth
//! per state, pickup latency and run time, and the writer's commit batch sizes.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::{JobState, QueueStats};

#[derive(Clone)]
pub struct QueueMetrics {
    pub enqueued: IntCounterVec,
    pub completed: IntCounterVec,
    pub failed: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead: IntCounterVec,
    pub lease_expired: IntCounterVec,
    pub retention_removed: IntCounterVec,
    pub schedule_fired: IntCounterVec,
    pub depth: IntGaugeVec,
    pub oldest_waiting_seconds: IntGaugeVec,
    pub pickup_seconds: HistogramVec,
    pub run_seconds: HistogramVec,
    pub commit_batch_size: Histogram,
    pub commit_seconds: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

impl QueueMetrics {
    pub fn new(registry: &Registry) -> QueueMetrics {
        let per_queue = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["queue"]).expect("valid metric")
        };
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                &["queue"],
            )
            .expect("valid metric")
        };
        let metrics = QueueMetrics {
            enqueued: per_queue(
                "keel_queue_enqueued_total",
                "Jobs stored by enqueues (duplicates not counted).",
            ),
            completed: per_queue("keel_queue_completed_total", "Jobs acked."),
            failed: per_queue(
                "keel_queue_failed_total",
                "Attempts that failed (fail calls and expired leases).",
            ),
            retried: per_queue(
                "keel_queue_retried_total",
                "Reservations of a job that had run before.",
            ),
            dead: per_queue("keel_queue_dead_total", "Jobs that ran out of attempts."),
            lease_expired: per_queue(
                "keel_queue_lease_expired_total",
                "Leases that ran out before an ack or fail (stalled jobs).",
            ),
            retention_removed: per_queue(
                "keel_queue_retention_removed_total",
                "Finished jobs removed by retention.",
            ),
            schedule_fired: IntCounterVec::new(
                Opts::new(
                    "keel_queue_schedule_fired_total",
                    "Jobs enqueued by a schedule.",
                ),
                &["schedule"],
            )
            .expect("valid metric"),
            depth: IntGaugeVec::new(
                Opts::new("keel_queue_jobs", "Jobs per queue and state."),
                &["queue", "state"],
            )
            .expect("valid metric"),
            oldest_waiting_seconds: IntGaugeVec::new(
                Opts::new(
                    "keel_queue_oldest_waiting_seconds",
                    "Age of the oldest waiting job.",
                ),
                &["queue"],
            )
            .expect("valid metric"),
            pickup_seconds: histogram(
                "keel_queue_pickup_seconds",
                "From runnable (enqueue or run_at) to reserved.",
            ),
            run_seconds: histogram("keel_queue_run_seconds", "From reserved to acked."),
            commit_batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "keel_queue_commit_batch_size",
                    "Operations per queue commit (one fsync).",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                ]),
            )
            .expect("valid metric"),
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "keel_queue_commit_seconds",
                    "Time of one queue commit, fsync included.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 14] = [
            Box::new(metrics.enqueued.clone()),
            Box::new(metrics.completed.clone()),
            Box::new(metrics.failed.clone()),
            Box::new(metrics.retried.clone()),
            Box::new(metrics.dead.clone()),
            Box::new(metrics.lease_expired.clone()),
            Box::new(metrics.retention_removed.clone()),
            Box::new(metrics.schedule_fired.clone()),
            Box::new(metrics.depth.clone()),
            Box::new(metrics.oldest_waiting_seconds.clone()),
            Box::new(metrics.pickup_seconds.clone()),
            Box::new(metrics.run_seconds.clone()),
            Box::new(metrics.commit_batch_size.clone()),
            Box::new(metrics.commit_seconds.clone()),
        ];
        for collector in collectors {
            // A second registration (tests building two queues on one registry) is harmless.
            let _ = registry.register(collector);
        }
        metrics
    }

    pub fn set_depths(&self, stats: &[QueueStats]) {
        for queue in stats {
            let name = queue.counts.queue.as_str();
            for state in JobState::ALL {
                self.depth
                    .with_label_values(&[name, state.as_str()])
                    .set(queue.counts.get(state) as i64);
            }
            self.oldest_waiting_seconds
                .with_label_values(&[name])
                .set(queue.oldest_waiting_age_ms.map_or(0, |ms| ms / 1000) as i64);
        }
    }
}
