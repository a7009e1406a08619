//! Observability shared by every subsystem: the Prometheus registry and the HTTP
//! metrics (`metrics`), logging with a live-reloadable level (`log`), and readiness of
//! the dependencies `/readyz` reports (`readiness`).
//!
//! Subsystems receive the registry at construction and register typed metrics in it;
//! there are no global metrics.

mod log;
mod metrics;
mod readiness;

pub use log::{LogHandle, init_logging};
pub use metrics::{BuildInfo, Metrics};
pub use readiness::{DependencyState, Readiness};
