//! The limiters of one keel by name (a route, `api`, a queue), and the timer that sweeps
//! them all.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Limiter;

type ByName<C> = HashMap<Arc<str>, Arc<Limiter<C>>>;

/// A clonable handle on the limiters by name. Callers keep the `Arc<Limiter>` that
/// [`RateLimits::get`] returns for the life of a request; replacing a limiter (a reload)
/// starts its keys afresh and lets requests in flight finish on the old one.
pub struct RateLimits<C: Clock = DefaultClock> {
    limiters: Arc<RwLock<ByName<C>>>,
}

impl<C: Clock> Clone for RateLimits<C> {
    fn clone(&self) -> Self {
        RateLimits {
            limiters: self.limiters.clone(),
        }
    }
}

impl<C: Clock> Default for RateLimits<C> {
    fn default() -> Self {
        RateLimits {
            limiters: Arc::default(),
        }
    }
}

impl<C: Clock> RateLimits<C> {
    pub fn new() -> RateLimits<C> {
        RateLimits::default()
    }

    /// Adds the limiter under its name, replacing one of the same name.
    pub fn insert(&self, limiter: Limiter<C>) -> Arc<Limiter<C>> {
        let limiter = Arc::new(limiter);
        self.limiters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(limiter.name.clone(), limiter.clone());
        limiter
    }

    pub fn get(&self, name: &str) -> Option<Arc<Limiter<C>>> {
        self.limiters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Limiter<C>>> {
        self.limiters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
    }

    /// Sweeps every limiter (see [`Limiter::sweep`]), outside the registry's lock so
    /// lookups never wait for a sweep.
    pub fn sweep_all(&self) {
        let limiters: Vec<_> = self
            .limiters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for limiter in limiters {
            limiter.sweep();
        }
    }
}

impl<C: Clock + Send + Sync + 'static> RateLimits<C> {
    /// Calls [`RateLimits::sweep_all`] every `every` until `shutdown`. Buckets are
    /// droppable once idle for their refill window, so anything from a few seconds to a
    /// minute works; 10 s keeps idle keys from outliving their use by much. A sweep of a
    /// full default table takes ~0.2 ms (benches/ratelimit.rs), short enough to run on
    /// the runtime.
    pub fn spawn_sweeper(&self, every: Duration, shutdown: CancellationToken) -> JoinHandle<()> {
        let limits = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => limits.sweep_all(),
                    () = shutdown.cancelled() => break,
                }
            }
        })
    }
}
