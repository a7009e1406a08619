//! An external service keel depends on (Redis, PostgreSQL): its state for `/readyz`, the
//! `keel_dependency_up` and `keel_dependency_errors_total` metrics, and a circuit
//! breaker so that a dead service is not hammered by every request.
//!
//! The breaker opens after `FAILURES_TO_OPEN` consecutive failures; while open,
//! [`Dependency::allow`] refuses at once (callers answer from what they have, or a clear
//! 503). After `COOL_DOWN` one caller is let through as a probe: its success closes the
//! breaker, its failure starts another cool-down. Callers report every outcome with
//! [`Dependency::success`] or [`Dependency::failure`]; the owner of the client also
//! probes on a timer, so a dependency that comes back is noticed without traffic.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

use super::{DependencyState, Metrics, Readiness};

/// Consecutive failures that open the breaker.
const FAILURES_TO_OPEN: u32 = 3;
/// How long an open breaker refuses before letting one probe through.
const COOL_DOWN: Duration = Duration::from_secs(1);
/// A probe that has not reported after this long is taken as lost, and another goes.
const PROBE_LOST: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
#[error("{dependency} is unavailable (circuit open after repeated failures: {last_error})")]
pub struct Unavailable {
    pub dependency: &'static str,
    pub last_error: String,
}

#[derive(Clone)]
pub struct Dependency {
    inner: Arc<Inner>,
}

struct Inner {
    name: &'static str,
    /// Whether keel can serve without it: then an outage marks it degraded in
    /// `/readyz` (still 200) instead of failed (503).
    optional: bool,
    up: IntGauge,
    errors: IntCounter,
    readiness: Readiness,
    breaker: Mutex<Breaker>,
}

struct Breaker {
    consecutive_failures: u32,
    /// Set while open: when the next probe may go.
    open_until: Option<Instant>,
    /// When the probe that is out was let through; everyone else is refused until it
    /// reports, or until `PROBE_LOST` says it never will (a caller dropped mid-call).
    probing: Option<Instant>,
    last_error: String,
    /// When a call last reported, either way: an owner's timer need not probe a
    /// dependency that traffic is reporting on anyway.
    last_report: Option<Instant>,
}

impl Dependency {
    /// Registers the dependency as starting in `readiness`: `/readyz` is 503 until the
    /// first call succeeds or the breaker first opens. `optional`: keel serves without
    /// it (Redis: L1, local limits), so an outage is `degraded` and `/readyz` stays 200
    /// (a load balancer must not take every node out because Redis went away); else
    /// `failed`, and 503.
    pub fn new(
        name: &'static str,
        optional: bool,
        metrics: &Metrics,
        readiness: &Readiness,
    ) -> Dependency {
        readiness.set(name, DependencyState::Starting);
        let (up, errors) = metrics.dependency(name);
        up.set(0);
        Dependency {
            inner: Arc::new(Inner {
                name,
                optional,
                up,
                errors,
                readiness: readiness.clone(),
                breaker: Mutex::new(Breaker {
                    consecutive_failures: 0,
                    open_until: None,
                    probing: None,
                    last_error: String::new(),
                    last_report: None,
                }),
            }),
        }
    }

    /// One that reports to nothing keel serves (its own metrics and readiness): for
    /// `keel migrate` and tests, which open a backend without a running keel.
    pub fn detached(name: &'static str) -> Dependency {
        Dependency::new(
            name,
            true,
            &Metrics::new(super::BuildInfo::CURRENT),
            &Readiness::default(),
        )
    }

    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // Held for a few field updates; a panic cannot leave it half-written.
        self.inner
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a call may go out now. While the breaker is open this refuses without
    /// touching the network, except for one probe per cool-down.
    pub fn allow(&self) -> Result<(), Unavailable> {
        let mut breaker = self.breaker();
        let Some(until) = breaker.open_until else {
            return Ok(());
        };
        let now = Instant::now();
        let probe_out = breaker
            .probing
            .is_some_and(|since| now.duration_since(since) < PROBE_LOST);
        if !probe_out && now >= until {
            breaker.probing = Some(now);
            return Ok(());
        }
        Err(Unavailable {
            dependency: self.inner.name,
            last_error: breaker.last_error.clone(),
        })
    }

    /// For callers that only want to know whether to accept work that will reach the
    /// dependency later: yes only while the breaker is closed. It never takes the probe,
    /// and an open breaker refuses after its cool-down too, until a probe (the owner's
    /// timer) succeeds: work accepted then would itself become the probe and, acknowledged
    /// already, be lost when the probe fails.
    pub fn check(&self) -> Result<(), Unavailable> {
        let breaker = self.breaker();
        match breaker.open_until {
            Some(_) => Err(Unavailable {
                dependency: self.inner.name,
                last_error: breaker.last_error.clone(),
            }),
            None => Ok(()),
        }
    }

    /// True while the breaker is closed (the last calls succeeded).
    pub fn is_up(&self) -> bool {
        self.breaker().open_until.is_none()
    }

    /// Whether some call reported success or failure within `period`.
    pub fn reported_within(&self, period: Duration) -> bool {
        self.breaker()
            .last_report
            .is_some_and(|at| at.elapsed() < period)
    }

    pub fn success(&self) {
        let mut breaker = self.breaker();
        let was_down = breaker.open_until.is_some() || self.inner.up.get() == 0;
        breaker.last_report = Some(Instant::now());
        breaker.consecutive_failures = 0;
        breaker.open_until = None;
        breaker.probing = None;
        drop(breaker);
        if was_down {
            self.inner.up.set(1);
            self.inner
                .readiness
                .set(self.inner.name, DependencyState::Ready);
            tracing::info!(dependency = self.inner.name, "dependency is up");
        }
    }

    pub fn failure(&self, error: &dyn std::fmt::Display) {
        self.inner.errors.inc();
        let mut breaker = self.breaker();
        breaker.consecutive_failures += 1;
        breaker.last_error = error.to_string();
        breaker.last_report = Some(Instant::now());
        let opens =
            breaker.open_until.is_none() && breaker.consecutive_failures >= FAILURES_TO_OPEN;
        if opens || breaker.probing.is_some() {
            breaker.open_until = Some(Instant::now() + COOL_DOWN);
            breaker.probing = None;
        }
        let detail = breaker.last_error.clone();
        drop(breaker);
        if opens {
            self.inner.up.set(0);
            let state = format!("unreachable: {detail}");
            self.inner.readiness.set(
                self.inner.name,
                if self.inner.optional {
                    DependencyState::Degraded(state)
                } else {
                    DependencyState::Failed(state)
                },
            );
            tracing::warn!(
                dependency = self.inner.name,
                error = %detail,
                "dependency down: circuit open, probing every {:?}",
                COOL_DOWN
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::BuildInfo;

    #[test]
    fn the_breaker_opens_lets_one_probe_through_and_closes_on_success() {
        let metrics = Metrics::new(BuildInfo::CURRENT);
        let readiness = Readiness::default();
        let redis = Dependency::new("redis", false, &metrics, &readiness);
        assert!(!readiness.is_ready(), "starting until the first success");
        redis.success();
        assert!(readiness.is_ready());
        for _ in 0..FAILURES_TO_OPEN {
            assert!(redis.allow().is_ok());
            redis.failure(&"connection refused");
        }
        assert!(redis.allow().is_err(), "open: refused without a call");
        assert!(redis.check().is_err());
        assert!(!readiness.is_ready());
        assert!(
            matches!(&readiness.snapshot()["redis"], DependencyState::Failed(detail) if detail.contains("connection refused"))
        );
        // After the cool-down exactly one probe goes, and `check` never takes it: it
        // refuses until a probe succeeded (accepting work then lost acknowledged cache
        // writes; tests/it/scaleout.rs `outages_...`).
        redis.breaker().open_until = Some(Instant::now());
        assert!(redis.check().is_err(), "open until a probe succeeds");
        assert!(redis.allow().is_ok());
        assert!(redis.allow().is_err(), "one probe at a time");
        assert!(redis.check().is_err());
        redis.failure(&"still refused");
        assert!(
            redis.allow().is_err(),
            "a failed probe starts another cool-down"
        );
        redis.breaker().open_until = Some(Instant::now());
        assert!(redis.allow().is_ok());
        redis.success();
        assert!(redis.allow().is_ok() && redis.check().is_ok());
        assert!(readiness.is_ready());
        let (up, errors) = metrics.dependency("redis");
        assert_eq!((up.get(), errors.get()), (1, 4));
    }

    #[test]
    fn an_optional_dependency_down_is_degraded_and_still_ready() {
        let metrics = Metrics::new(BuildInfo::CURRENT);
        let readiness = Readiness::default();
        let redis = Dependency::new("redis", true, &metrics, &readiness);
        assert!(!readiness.is_ready());
        for _ in 0..FAILURES_TO_OPEN {
            redis.failure(&"connection refused");
        }
        assert!(readiness.is_ready() && readiness.is_degraded());
        assert!(matches!(
            &readiness.snapshot()["redis"],
            DependencyState::Degraded(_)
        ));
        redis.breaker().open_until = Some(Instant::now());
        assert!(redis.allow().is_ok());
        redis.success();
        assert!(readiness.is_ready() && !readiness.is_degraded());
    }
}
