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
    up: IntGauge,
    errors: IntCounter,
    readiness: Readiness,
    breaker: Mutex<Breaker>,
}

struct Breaker {
    consecutive_failures: u32,
    /// Set while open: when the next probe may go.
    open_until: Option<Instant>,
    /// A probe is out; everyone else is refused until it reports.
    probing: bool,
    last_error: String,
}

impl Dependency {
    /// Registers the dependency as starting in `readiness`: `/readyz` is 503 until the
    /// first successful call.
    pub fn new(name: &'static str, metrics: &Metrics, readiness: &Readiness) -> Dependency {
        readiness.set(name, DependencyState::Starting);
        let (up, errors) = metrics.dependency(name);
        up.set(0);
        Dependency {
            inner: Arc::new(Inner {
                name,
                up,
                errors,
                readiness: readiness.clone(),
                breaker: Mutex::new(Breaker {
                    consecutive_failures: 0,
                    open_until: None,
                    probing: false,
                    last_error: String::new(),
                }),
            }),
        }
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
        if !breaker.probing && Instant::now() >= until {
            breaker.probing = true;
            return Ok(());
        }
        Err(Unavailable {
            dependency: self.inner.name,
            last_error: breaker.last_error.clone(),
        })
    }

    /// True while the breaker is closed (the last calls succeeded).
    pub fn is_up(&self) -> bool {
        self.breaker().open_until.is_none()
    }

    pub fn success(&self) {
        let mut breaker = self.breaker();
        let was_down = breaker.open_until.is_some() || self.inner.up.get() == 0;
        breaker.consecutive_failures = 0;
        breaker.open_until = None;
        breaker.probing = false;
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
        let opens =
            breaker.open_until.is_none() && breaker.consecutive_failures >= FAILURES_TO_OPEN;
        if opens || breaker.probing {
            breaker.open_until = Some(Instant::now() + COOL_DOWN);
            breaker.probing = false;
        }
        let detail = breaker.last_error.clone();
        drop(breaker);
        if opens {
            self.inner.up.set(0);
            self.inner.readiness.set(
                self.inner.name,
                DependencyState::Failed(format!("unreachable: {detail}")),
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
