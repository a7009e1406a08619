//! What `/readyz` reports: each dependency keel needs before it can serve, and its state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum DependencyState {
    Starting,
    Ready,
    Failed(String),
    /// Down, but keel serves without it (what needs it answers 503, the rest works):
    /// named in `/readyz`, which stays 200 so a load balancer keeps the node.
    Degraded(String),
}

/// Shared, cheap to clone. A std `Mutex` is enough: it is held for a map update and
/// never across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    dependencies: Arc<Mutex<BTreeMap<&'static str, DependencyState>>>,
}

impl Readiness {
    /// A readiness with these dependencies, all starting.
    pub fn new(names: &[&'static str]) -> Self {
        let readiness = Readiness::default();
        for name in names {
            readiness.set(name, DependencyState::Starting);
        }
        readiness
    }

    pub fn set(&self, name: &'static str, state: DependencyState) {
        self.lock().insert(name, state);
    }

    /// Ready when every dependency is ready or degraded.
    pub fn is_ready(&self) -> bool {
        self.lock()
            .values()
            .all(|state| matches!(state, DependencyState::Ready | DependencyState::Degraded(_)))
    }

    /// True when some dependency is degraded.
    pub fn is_degraded(&self) -> bool {
        self.lock()
            .values()
            .any(|state| matches!(state, DependencyState::Degraded(_)))
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, DependencyState> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, DependencyState>> {
        // A panic while holding this lock cannot leave the map half-written.
        self.dependencies
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
