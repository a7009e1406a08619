//! Observability shared by every subsystem: the Prometheus registry and the HTTP
//! metrics (`metrics`), logging with a live-reloadable level (`log`), readiness of the
//! dependencies `/readyz` reports (`readiness`), and the in-process history of the key
//! series the dashboard draws (`history`).
//!
//! Subsystems receive the registry at construction and register typed metrics in it;
//! there are no global metrics.

mod dependency;
mod history;
mod log;
mod metrics;
mod readiness;

pub use dependency::{Dependency, Unavailable};
pub use history::{History, Point};
pub use log::{LogHandle, init_logging};
pub use metrics::{BuildInfo, Metrics};
pub use readiness::{DependencyState, Readiness};
