//! Gateway metrics (`keel_gateway_*`), labelled by route name and upstream server as
//! configured (never by anything a client sends), so series stay bounded.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_idle: IntGaugeVec,
    pub rejected: IntCounterVec,
    pub cache_results: IntCounterVec,
    pub bytes: IntCounterVec,
}

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl GatewayMetrics {
    pub fn new(registry: &Registry) -> GatewayMetrics {
        let metrics = GatewayMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "keel_gateway_requests_total",
                    "Requests answered, by route and status class.",
                ),
                &["route", "class"],
            )
            .expect("valid metric"),
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "keel_gateway_request_seconds",
                    "Time to the response head, by route.",
                )
                .buckets(BUCKETS.to_vec()),
                &["route"],
            )
            .expect("valid metric"),
            upstream_requests: IntCounterVec::new(
                Opts::new(
                    "keel_gateway_upstream_requests_total",
                    "Requests sent to upstream servers, by outcome (ok, failed, retried).",
                ),
                &["upstream", "server", "outcome"],
            )
            .expect("valid metric"),
            upstream_healthy: IntGaugeVec::new(
                Opts::new(
                    "keel_gateway_upstream_healthy",
                    "1 when the server passes its health checks.",
                ),
                &["upstream", "server"],
            )
            .expect("valid metric"),
            upstream_idle: IntGaugeVec::new(
                Opts::new(
                    "keel_gateway_upstream_idle_connections",
                    "Keep-alive connections to the server waiting for a request (at most 256 each).",
                ),
                &["upstream", "server"],
            )
            .expect("valid metric"),
            rejected: IntCounterVec::new(
                Opts::new(
                    "keel_gateway_rejected_total",
                    "Requests refused before any upstream saw them, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            bytes: IntCounterVec::new(
                Opts::new(
                    "keel_gateway_bytes_total",
                    "Body bytes by route and direction (in: from clients, out: to clients).",
                ),
                &["route", "direction"],
            )
            .expect("valid metric"),
            cache_results: IntCounterVec::new(
                Opts::new(
                    "keel_gateway_cache_total",
                    "Response-cache lookups by route and result (hit, miss, stale, coalesced, bypass).",
                ),
                &["route", "result"],
            )
            .expect("valid metric"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 8] = [
            Box::new(metrics.bytes.clone()),
            Box::new(metrics.cache_results.clone()),
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_seconds.clone()),
            Box::new(metrics.upstream_requests.clone()),
            Box::new(metrics.upstream_healthy.clone()),
            Box::new(metrics.upstream_idle.clone()),
            Box::new(metrics.rejected.clone()),
        ];
        for collector in collectors {
            let _ = registry.register(collector);
        }
        metrics
    }
}

/// One route's series, resolved once when the route table is built: a label lookup
/// hashes its strings under a lock, which the per-request path should not pay.
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
    pub seconds: Histogram,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}

impl RouteMetrics {
    /// Requests answered so far, by status class.
    pub fn requests_by_class(&self) -> BTreeMap<&'static str, u64> {
        CLASSES
            .iter()
            .zip(&self.by_class)
            .map(|(class, counter)| (*class, counter.get()))
            .collect()
    }

    pub fn class(&self, status: u16) -> &IntCounter {
        &self.by_class[match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        }]
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl GatewayMetrics {
    pub fn for_route(&self, route: &str) -> Arc<RouteMetrics> {
        Arc::new(RouteMetrics {
            by_class: CLASSES.map(|class| self.requests.with_label_values(&[route, class])),
            seconds: self.request_seconds.with_label_values(&[route]),
            bytes_in: self.bytes.with_label_values(&[route, "in"]),
            bytes_out: self.bytes.with_label_values(&[route, "out"]),
        })
    }

    /// A route's response-cache lookups so far, by result. Read from the collected
    /// series, so a route without a cache gets no empty series made for it.
    pub fn cache_results_of(&self, route: &str) -> BTreeMap<String, u64> {
        use prometheus::core::Collector;
        self.cache_results
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|metric| label_value(metric, "route") == Some(route))
            .filter_map(|metric| {
                let result = label_value(metric, "result")?.to_owned();
                Some((result, metric.get_counter().get_value() as u64))
            })
            .collect()
    }
}

fn label_value<'a>(metric: &'a prometheus::proto::Metric, name: &str) -> Option<&'a str> {
    metric
        .get_label()
        .iter()
        .find(|pair| pair.name() == name)
        .map(|pair| pair.value())
}
