//! In-process history of the key series, for the dashboard: sampled from the Prometheus
//! registry once a second, kept at 1 s resolution for 15 minutes and at 10 s (the mean
//! of ten samples) for 24 hours. Bounded by construction: 900 + 8,640 points of a fixed
//! number of series (≈ 1 MiB), whatever the traffic.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use prometheus::proto::MetricFamily;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const FINE_POINTS: usize = 900;
const COARSE_POINTS: usize = 8_640;
const COARSE_EVERY: usize = 10;

/// Where a series comes from in the registry.
enum Source {
    /// Per-second rate of counters (or histogram sample counts), summed over the named
    /// families and the label sets `keep` accepts.
    Rate(&'static [&'static str], Filter),
    /// The sum of gauges.
    Gauge(&'static str, Filter),
    /// A quantile of the observations made since the previous sample, in milliseconds,
    /// across the named histogram families.
    Quantile(&'static [&'static str], f64),
    /// hits / (hits + misses) since the previous sample, for one cache layer.
    HitRatio(&'static str),
    /// This process's CPU use in percent of one core, from `/proc/self/stat` in clock
    /// ticks: the Prometheus collector's `process_cpu_seconds_total` counts whole seconds
    /// only, which at one sample a second reads as 0 % or 100 %.
    CpuPercent,
}

/// Which label sets count: `(label, accepted value prefix)`.
type Filter = Option<(&'static str, &'static str)>;

const SERIES: &[(&str, Source)] = &[
    (
        "requests_per_sec",
        Source::Rate(
            &["keel_http_requests_total", "keel_gateway_requests_total"],
            None,
        ),
    ),
    (
        "errors_per_sec",
        Source::Rate(&["keel_gateway_requests_total"], Some(("class", "5"))),
    ),
    (
        "latency_p50_ms",
        Source::Quantile(
            &[
                "keel_http_request_duration_seconds",
                "keel_gateway_request_seconds",
            ],
            0.50,
        ),
    ),
    (
        "latency_p95_ms",
        Source::Quantile(
            &[
                "keel_http_request_duration_seconds",
                "keel_gateway_request_seconds",
            ],
            0.95,
        ),
    ),
    (
        "latency_p99_ms",
        Source::Quantile(
            &[
                "keel_http_request_duration_seconds",
                "keel_gateway_request_seconds",
            ],
            0.99,
        ),
    ),
    ("cache_l1_hit_ratio", Source::HitRatio("l1")),
    ("cache_l2_hit_ratio", Source::HitRatio("l2")),
    (
        "queue_waiting",
        Source::Gauge("keel_queue_jobs", Some(("state", "waiting"))),
    ),
    (
        "queue_active",
        Source::Gauge("keel_queue_jobs", Some(("state", "active"))),
    ),
    (
        "queue_completed_per_sec",
        Source::Rate(&["keel_queue_completed_total"], None),
    ),
    (
        "sql_statements_per_sec",
        Source::Rate(&["keel_sql_statements_total"], None),
    ),
    (
        "ratelimit_rejected_per_sec",
        Source::Rate(&["keel_ratelimit_rejected_total"], None),
    ),
    (
        "rss_bytes",
        Source::Gauge("process_resident_memory_bytes", None),
    ),
    ("cpu_percent", Source::CpuPercent),
];

/// One point: Unix seconds and a value per series (in `series()` order; `None` when
/// the series has nothing to say yet, such as a hit ratio without lookups).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub at: u64,
    pub values: Vec<Option<f64>>,
}

/// What a sample read from the registry: running totals and gauges by series.
#[derive(Default, Clone)]
struct Reading {
    totals: HashMap<&'static str, f64>,
    /// Cache misses of the hit-ratio series (their hits are in `totals`).
    misses: HashMap<&'static str, f64>,
    buckets: HashMap<&'static str, Vec<(f64, u64)>>,
}

pub struct History {
    registry: Registry,
    inner: Mutex<Rings>,
    live: broadcast::Sender<Point>,
}

#[derive(Default)]
struct Rings {
    fine: VecDeque<Point>,
    coarse: VecDeque<Point>,
    pending: Vec<Point>,
    previous: Option<Reading>,
}

fn labels_pass(metric: &prometheus::proto::Metric, filter: Filter) -> bool {
    match filter {
        None => true,
        Some((name, prefix)) => metric
            .get_label()
            .iter()
            .any(|label| label.name() == name && label.value().starts_with(prefix)),
    }
}

impl History {
    pub fn new(registry: Registry) -> Arc<History> {
        Arc::new(History {
            registry,
            inner: Mutex::new(Rings::default()),
            live: broadcast::channel(64).0,
        })
    }

    pub fn series() -> Vec<&'static str> {
        SERIES.iter().map(|(name, _)| *name).collect()
    }

    /// Points at 1 s (`fine`) or 10 s resolution, oldest first.
    pub fn points(&self, fine: bool) -> Vec<Point> {
        let rings = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ring = if fine { &rings.fine } else { &rings.coarse };
        ring.iter().cloned().collect()
    }

    /// New 1 s points as they are taken.
    pub fn subscribe(&self) -> broadcast::Receiver<Point> {
        self.live.subscribe()
    }

    fn read(&self) -> Reading {
        let families: Vec<MetricFamily> = self.registry.gather();
        let by_name: HashMap<&str, &MetricFamily> = families
            .iter()
            .map(|family| (family.name(), family))
            .collect();
        let mut reading = Reading::default();
        for (series, source) in SERIES {
            match source {
                Source::Rate(names, filter) => {
                    let total: f64 = names
                        .iter()
                        .filter_map(|name| by_name.get(name))
                        .flat_map(|family| family.get_metric())
                        .filter(|metric| labels_pass(metric, *filter))
                        .map(|metric| {
                            metric.get_counter().get_value()
                                + metric.get_histogram().get_sample_count() as f64
                        })
                        .sum();
                    reading.totals.insert(series, total);
                }
                Source::Gauge(name, filter) => {
                    let total = by_name
                        .get(name)
                        .map(|family| {
                            family
                                .get_metric()
                                .iter()
                                .filter(|metric| labels_pass(metric, *filter))
                                .map(|metric| metric.get_gauge().get_value())
                                .sum()
                        })
                        .unwrap_or(0.0);
                    reading.totals.insert(series, total);
                }
                Source::Quantile(names, _) => {
                    let mut merged: Vec<(f64, u64)> = Vec::new();
                    for family in names.iter().filter_map(|name| by_name.get(name)) {
                        for metric in family.get_metric() {
                            for bucket in metric.get_histogram().get_bucket() {
                                let bound = bucket.upper_bound();
                                match merged.iter_mut().find(|(b, _)| *b == bound) {
                                    Some(slot) => slot.1 += bucket.cumulative_count(),
                                    None => merged.push((bound, bucket.cumulative_count())),
                                }
                            }
                        }
                    }
                    merged.sort_by(|a, b| a.0.total_cmp(&b.0));
                    reading.buckets.insert(series, merged);
                }
                Source::CpuPercent => {
                    reading.totals.insert(series, process_cpu_seconds());
                }
                Source::HitRatio(layer) => {
                    let count = |name: &str| {
                        by_name
                            .get(name)
                            .map(|family| {
                                family
                                    .get_metric()
                                    .iter()
                                    .filter(|metric| labels_pass(metric, Some(("layer", layer))))
                                    .map(|metric| metric.get_counter().get_value())
                                    .sum::<f64>()
                            })
                            .unwrap_or(0.0)
                    };
                    reading
                        .totals
                        .insert(series, count("keel_cache_hits_total"));
                    reading
                        .misses
                        .insert(series, count("keel_cache_misses_total"));
                }
            }
        }
        reading
    }

    /// Takes one sample `elapsed` after the previous one.
    pub fn sample(&self, at: u64, elapsed: Duration) {
        let reading = self.read();
        let mut rings = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(previous) = rings.previous.replace(reading.clone()) else {
            return;
        };
        let seconds = elapsed.as_secs_f64().max(0.001);
        let values = SERIES
            .iter()
            .map(|(series, source)| match source {
                Source::Rate(..) => {
                    let delta = reading.totals[series] - previous.totals[series];
                    Some(delta.max(0.0) / seconds)
                }
                Source::CpuPercent => {
                    let delta = reading.totals[series] - previous.totals[series];
                    Some(delta.max(0.0) / seconds * 100.0)
                }
                Source::Gauge(..) => Some(reading.totals[series]),
                Source::Quantile(_, quantile) => quantile_ms(
                    &previous.buckets[series],
                    &reading.buckets[series],
                    *quantile,
                ),
                Source::HitRatio(_) => {
                    let hits = reading.totals[series] - previous.totals[series];
                    let misses = reading.misses[series] - previous.misses[series];
                    (hits + misses > 0.0).then(|| hits / (hits + misses))
                }
            })
            .collect();
        let point = Point { at, values };
        let _ = self.live.send(point.clone());
        push_bounded(&mut rings.fine, point.clone(), FINE_POINTS);
        rings.pending.push(point);
        if rings.pending.len() == COARSE_EVERY {
            let pending = std::mem::take(&mut rings.pending);
            let coarse = mean(&pending);
            push_bounded(&mut rings.coarse, coarse, COARSE_POINTS);
        }
    }

    /// Samples every second until `shutdown`.
    pub fn spawn_sampler(self: &Arc<Self>, shutdown: CancellationToken) {
        let history = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let now = tokio::time::Instant::now();
                history.sample(crate::cache::now_ms() / 1000, now - last);
                last = now;
            }
        });
    }
}

/// User + system CPU seconds of this process, at clock-tick resolution; 0 where
/// `/proc` cannot be read (the chart then stays flat instead of failing the sample).
fn process_cpu_seconds() -> f64 {
    procfs::process::Process::myself()
        .and_then(|process| process.stat())
        .map_or(0.0, |stat| {
            (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64
        })
}

fn push_bounded(ring: &mut VecDeque<Point>, point: Point, bound: usize) {
    if ring.len() == bound {
        ring.pop_front();
    }
    ring.push_back(point);
}

/// The mean of each series over the points (ignoring `None`), stamped with the last time.
fn mean(points: &[Point]) -> Point {
    let width = points.first().map_or(0, |point| point.values.len());
    let values = (0..width)
        .map(|index| {
            let present: Vec<f64> = points
                .iter()
                .filter_map(|point| point.values[index])
                .collect();
            (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
        })
        .collect();
    Point {
        at: points.last().map_or(0, |point| point.at),
        values,
    }
}

/// The quantile of the observations between two cumulative bucket readings, in ms:
/// the upper bound of the bucket where the quantile falls (Prometheus' convention,
/// without interpolation).
fn quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], quantile: f64) -> Option<f64> {
    let count_before = |bound: f64| {
        before
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0, |(_, count)| *count)
    };
    let deltas: Vec<(f64, u64)> = after
        .iter()
        .map(|(bound, count)| (*bound, count.saturating_sub(count_before(*bound))))
        .collect();
    let total = deltas.last().map_or(0, |(_, count)| *count);
    if total == 0 {
        return None;
    }
    let wanted = (total as f64 * quantile).ceil() as u64;
    deltas
        .iter()
        .find(|(_, count)| *count >= wanted)
        .map(|(bound, _)| bound * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

    #[test]
    fn rates_gauges_quantiles_and_ratios_from_the_registry() {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("keel_gateway_requests_total", "r"),
            &["route", "class"],
        )
        .unwrap();
        let seconds = HistogramVec::new(
            HistogramOpts::new("keel_gateway_request_seconds", "s").buckets(vec![0.001, 0.01, 0.1]),
            &["route"],
        )
        .unwrap();
        let jobs =
            IntGaugeVec::new(Opts::new("keel_queue_jobs", "j"), &["queue", "state"]).unwrap();
        let hits = IntCounterVec::new(Opts::new("keel_cache_hits_total", "h"), &["layer"]).unwrap();
        let misses =
            IntCounterVec::new(Opts::new("keel_cache_misses_total", "m"), &["layer"]).unwrap();
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(seconds.clone()),
            Box::new(jobs.clone()),
            Box::new(hits.clone()),
            Box::new(misses.clone()),
        ] {
            registry.register(collector).unwrap();
        }
        let history = History::new(registry);
        history.sample(100, Duration::from_secs(1));
        requests.with_label_values(&["a", "2xx"]).inc_by(18);
        requests.with_label_values(&["a", "5xx"]).inc_by(2);
        for _ in 0..9 {
            seconds.with_label_values(&["a"]).observe(0.0005);
        }
        seconds.with_label_values(&["a"]).observe(0.05);
        jobs.with_label_values(&["q", "waiting"]).set(7);
        hits.with_label_values(&["l1"]).inc_by(3);
        misses.with_label_values(&["l1"]).inc_by(1);
        history.sample(102, Duration::from_secs(2));

        let names = History::series();
        let point = &history.points(true)[0];
        let value = |name: &str| point.values[names.iter().position(|n| *n == name).unwrap()];
        assert_eq!(point.at, 102);
        assert_eq!(value("requests_per_sec"), Some(10.0));
        assert_eq!(value("errors_per_sec"), Some(1.0));
        assert_eq!(value("latency_p50_ms"), Some(1.0));
        assert_eq!(value("latency_p99_ms"), Some(100.0));
        assert_eq!(value("queue_waiting"), Some(7.0));
        assert_eq!(value("cache_l1_hit_ratio"), Some(0.75));
        assert_eq!(value("cache_l2_hit_ratio"), None, "no lookups, no ratio");
    }

    #[test]
    fn rings_are_bounded_and_coarse_points_are_means() {
        let history = History::new(Registry::new());
        for second in 0..(FINE_POINTS as u64 + 25) {
            history.sample(second, Duration::from_secs(1));
        }
        assert_eq!(history.points(true).len(), FINE_POINTS);
        // The first sample only sets the baseline: 924 points, 92 full groups of ten.
        assert_eq!(history.points(false).len(), 92);
        let means = mean(&[
            Point {
                at: 1,
                values: vec![Some(1.0), None],
            },
            Point {
                at: 2,
                values: vec![Some(3.0), None],
            },
        ]);
        assert_eq!(means.values, [Some(2.0), None]);
        assert_eq!(means.at, 2);
    }
}
