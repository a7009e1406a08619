//! The Prometheus registry and the metrics every process has: build info, uptime,
//! process figures (RSS, CPU seconds, open fds) and HTTP requests by route.
//!
//! Names follow `keel_<subsystem>_<what>_<unit>`; the process collector keeps the
//! standard `process_*` names that dashboards and alerts already know.

use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// What `keel --version` and `keel_build_info` say about this binary.
#[derive(Debug, Clone, Copy)]
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: &'static str,
    pub profile: &'static str,
}

impl BuildInfo {
    pub const CURRENT: BuildInfo = BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("KEEL_GIT_COMMIT"),
        profile: env!("KEEL_BUILD_PROFILE"),
    };
}

pub struct Metrics {
    registry: Registry,
    started: Instant,
    uptime: Gauge,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    dependency_up: IntGaugeVec,
    dependency_errors: IntCounterVec,
}

impl Metrics {
    pub fn new(build: BuildInfo) -> Self {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "keel_build_info",
                "Always 1; labels say which keel this is.",
            ),
            &["version", "commit", "profile"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[build.version, build.commit, build.profile])
            .set(1);
        let uptime = Gauge::new("keel_uptime_seconds", "Seconds since this process started.")
            .expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "keel_http_requests_total",
                "HTTP requests answered by the api listener.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "keel_http_request_duration_seconds",
                "Time to answer an api request.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["route", "status"],
        )
        .expect("valid metric");
        // Shared by every external dependency (`redis`, `postgres`), so one dashboard
        // panel and one alert cover them all.
        let dependency_up = IntGaugeVec::new(
            Opts::new(
                "keel_dependency_up",
                "1 while the external dependency answers (circuit closed), else 0.",
            ),
            &["dependency"],
        )
        .expect("valid metric");
        let dependency_errors = IntCounterVec::new(
            Opts::new(
                "keel_dependency_errors_total",
                "Failed calls to an external dependency.",
            ),
            &["dependency"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(dependency_up.clone()),
            Box::new(dependency_errors.clone()),
            Box::new(uptime.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_duration.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
        Metrics {
            registry,
            started: Instant::now(),
            uptime,
            http_requests,
            http_duration,
            dependency_up,
            dependency_errors,
        }
    }

    /// The up gauge and error counter of one external dependency.
    pub fn dependency(&self, name: &str) -> (prometheus::IntGauge, prometheus::IntCounter) {
        (
            self.dependency_up.with_label_values(&[name]),
            self.dependency_errors.with_label_values(&[name]),
        )
    }

    /// Time since this process started (since `Metrics` was made, first thing at start).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The registry subsystems register their own metrics in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One answered request. `route` is the matched route pattern, never the raw path,
    /// so the number of series stays bounded whatever clients send.
    pub fn observe_http(&self, route: &str, status: u16, elapsed: Duration) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests.with_label_values(&[route, class]).inc();
        self.http_duration
            .with_label_values(&[route, class])
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
